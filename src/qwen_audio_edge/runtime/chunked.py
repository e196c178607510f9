"""Chunked stream mode: a block-causal encoder whose finished blocks are final, so they can be prefilled early.

Exact mode must wait for the end of the utterance, because the encoder attends over the whole window and
the Whisper clamp uses the utterance's global max. Chunked mode (opt-in) changes the computation so that
work can be done while the person speaks:

- **blocks**: the valid mel frames are cut into blocks of `block` frames (`chunk_seconds` × 100; a
  multiple of 4, so each full block gives exactly block/4 audio tokens). A block's tokens attend to the
  cached keys/values of every earlier block, to their own block and to `lookahead` frames after it
  (runtime/block_encoder.py), and keep their learned positions in the utterance. The convolutions see
  two real frames on each side. So a block is final once frames up to its end + lookahead + 2 exist.
- **clamp rule**: block k is clamped at max(running max up to its last input frame, CLAMP_FLOOR) − 8.
  Later, louder audio cannot change a finished block. The floor matters: an utterance that starts in
  digital silence has a running max of −10 (the 1e-10 power floor), and clamping its first block
  against that turns the silence into loud noise (Whisper's decoder then hallucinates). −1 sits well
  below speech peaks (espeak-ng speech peaks near +1) and above any silence.
- the last, partial block is encoded at the end of the utterance from the same zero-padded tail as the
  exact recipe.

Why this rule (measured by bench/fidelity.py on trained Whisper tiny.en weights, its own decoder reading
the states; table in docs/fidelity.md, data in bench/results/cpu/fidelity_tiny_en.json): the first rule,
attention inside each block only, as Qwen2.5-Omni's encoder (trained that way), cost 52.4 % WER against
11.5 % exact with 2 s blocks (clean speech). Attending to all earlier blocks plus a look-ahead brings the
default (3 s blocks + 2 s look-ahead) to 13.5 % clean and 43.1 % at 10 dB SNR (exact: 42.2 %), while at
most block + look-ahead = 5 s of audio is left to encode and prefill at the end of an utterance.

The audio token count is always the same as in exact mode, so the prompt ids are identical and the two
modes can be compared token by token (`qwen-audio-edge compare A --chunked 3`).
"""

from __future__ import annotations

import math

import torch

from .audio import IncrementalMel, MelFrontEnd
from .block_encoder import BlockInput
from .errors import OptionsError

CLAMP_FLOOR = -1.0  # log10 mel power; the running max is held at least here (see the module docstring)
DEFAULT_CHUNK_S = 3.0  # block + look-ahead ≤ 5 s keeps end() → first token flat; see docs/fidelity.md
DEFAULT_LOOKAHEAD_S = 2.0


# WER of trained Whisper tiny.en's own decoder on the block-causal states, per (block s, look-ahead s):
# (clean, noisy at 10 dB SNR), and the exact-mode WER of the same run. Copied from
# bench/results/cpu/fidelity_tiny_en.json (bench/fidelity.py); tests/test_stream_chunked.py checks that
# the two agree. Targets (issue #10): clean ≤ 1.1× exact, noisy ≤ 1.2× exact.
MEASURED_WER: dict[tuple[float, float], tuple[float, float]] = {
    (0.48, 0.5): (0.18181818181818182, 0.4909090909090909),
    (1.0, 0.5): (0.18545454545454546, 0.6),
    (2.0, 0.5): (0.2018181818181818, 0.43454545454545457),
    (2.0, 2.0): (0.13636363636363635, 0.49272727272727274),
    (2.0, 3.0): (0.15272727272727274, 0.4254545454545455),
    (2.0, 4.0): (0.14545454545454545, 0.4254545454545455),
    (2.6, 2.4): (0.15454545454545454, 0.43272727272727274),
    (3.0, 2.0): (0.13454545454545455, 0.4309090909090909),
    (3.0, 3.0): (0.13454545454545455, 0.4254545454545455),
    (3.2, 1.8): (0.13272727272727272, 0.4290909090909091),
    (3.6, 1.4): (0.13818181818181818, 0.42363636363636364),
    (4.0, 0.5): (0.14181818181818182, 0.4309090909090909),
    (4.0, 1.0): (0.13636363636363635, 0.42363636363636364),
    (4.0, 1.5): (0.14363636363636365, 0.42727272727272725),
    (4.0, 2.0): (0.12181818181818181, 0.4254545454545455),
}
EXACT_WER: tuple[float, float] = (0.11454545454545455, 0.4218181818181818)
TARGET_RATIO = (1.1, 1.2)


def fidelity_note(chunk_seconds: float, lookahead_seconds: float) -> str | None:
    """What a chunked setting is measured to cost, when it misses the targets or is unmeasured (else None)."""
    key = (round(chunk_seconds, 2), round(lookahead_seconds, 2))
    where = "bench/fidelity.py, trained Whisper tiny.en, its own decoder"
    got = MEASURED_WER.get(key)
    if got is None:
        return (
            f"chunked stream mode with {chunk_seconds:g} s blocks + {lookahead_seconds:g} s look-ahead is approximate "
            f"and its cost was not measured ({where}); check it with `compare ARTIFACTS --chunked {chunk_seconds:g}`"
        )
    if got[0] <= TARGET_RATIO[0] * EXACT_WER[0] and got[1] <= TARGET_RATIO[1] * EXACT_WER[1]:
        return None
    return (
        f"chunked stream mode is approximate: with {chunk_seconds:g} s blocks + {lookahead_seconds:g} s look-ahead the "
        f"measured WER was {got[0]:.1%} vs {EXACT_WER[0]:.1%} exact on clean speech and {got[1]:.1%} vs "
        f"{EXACT_WER[1]:.1%} at 10 dB SNR ({where}); use --stream-mode exact where accuracy matters most"
    )


def lookahead_frames(seconds: float, front: MelFrontEnd) -> int:
    """Look-ahead frames for `seconds` (whole frames, ≥ 0)."""
    cfg = front.config
    frames = seconds * cfg.sampling_rate / cfg.hop_length
    if not math.isfinite(frames) or frames < 0 or abs(frames - round(frames)) > 1e-6:
        raise OptionsError(
            f"--lookahead-seconds must be ≥ 0 and a whole number of {cfg.hop_length / cfg.sampling_rate:g} s "
            f"frames, got {seconds}"
        )
    return round(frames)


def block_frames(chunk_seconds: float, front: MelFrontEnd) -> int:
    """Mel frames per block for `chunk_seconds`; must be a whole multiple of 4 frames (0.04 s at 16 kHz)."""
    cfg = front.config
    frames_per_s = cfg.sampling_rate / cfg.hop_length
    frames = chunk_seconds * frames_per_s
    quantum = 4 / frames_per_s
    if not math.isfinite(frames) or abs(frames - round(frames)) > 1e-6 or round(frames) % 4:
        raise OptionsError(
            f"--chunk-seconds {chunk_seconds} is not a multiple of {quantum:g} s "
            f"(4 mel frames, one pair of audio tokens); e.g. use 2 or 1.28"
        )
    frames = round(frames)
    if not 8 <= frames <= cfg.nb_max_frames:
        raise OptionsError(
            f"--chunk-seconds must be between {8 / frames_per_s:g} and "
            f"{cfg.nb_max_frames / frames_per_s:g} s, got {chunk_seconds}"
        )
    return frames


def causal_block_input(
    front: MelFrontEnd, logspec: torch.Tensor, n_valid: int, block: int, index: int, lookahead: int
) -> BlockInput:
    """Block-causal encoder input of block `index` (runtime/block_encoder.py) from unclamped frames [n_mels, T].

    Two real frames before the block feed the convolutions (none for the first block), then the block,
    up to `lookahead` frames after it (fewer at the utterance's end) and two more for the convolutions.
    The clamp is the running max up to the last frame used, so later audio never changes the block.
    """
    first = index * block
    count = min(block, n_valid - first)
    ahead = max(0, min(lookahead, n_valid - first - count))
    start = max(first - 2, 0)
    stop = min(first + count + ahead + 2, logspec.shape[1])
    rows = (count - 1) // 2 + 1
    extra = (count + ahead - 1) // 2 + 1 - rows
    mel = front.normalize(logspec[:, start:stop], torch.clamp(logspec[:, :stop].max(), min=CLAMP_FLOOR))
    return BlockInput(mel=mel, left=first - start, rows=rows, extra_rows=extra, pos_offset=first // 2)


def causal_blocks(
    front: MelFrontEnd, logspec: torch.Tensor, n_valid: int, block: int, lookahead: int, first_index: int = 0
) -> list[BlockInput]:
    """Block-causal inputs of every block from `first_index` to the end of the utterance."""
    return [
        causal_block_input(front, logspec, n_valid, block, i, lookahead)
        for i in range(first_index, -(-n_valid // block))
    ]


def causal_utterance(front: MelFrontEnd, waveform, block: int, lookahead: int) -> list[BlockInput]:
    """The batch twin of a streamed block-causal utterance (≤ 30 s)."""
    logspec, n_valid = front.log_spectrogram(waveform)
    return causal_blocks(front, logspec, n_valid, block, lookahead)


class BlockStream:
    """Block-causal encoder inputs of a streamed utterance, handed out as soon as each block is final.

    Reads the unclamped frames of an `IncrementalMel`; `ready()` returns the blocks that became final
    since the last call, `tail()` the rest once the utterance has ended. Together they equal
    `causal_utterance` of the same audio, tensor for tensor.
    """

    def __init__(self, mel: IncrementalMel, block: int, lookahead: int):
        self.mel = mel
        self.block = block
        self.lookahead = lookahead
        self.done = 0  # blocks handed out by ready()

    def ready(self) -> list[BlockInput]:
        out = []
        logspec = None
        cap = self.mel.cfg.nb_max_frames
        while (self.done + 1) * self.block + self.lookahead + 2 <= min(self.mel.frames_ready, cap):
            if logspec is None:
                logspec = self.mel.ready_logspec()
            known = (self.done + 1) * self.block + self.lookahead  # the utterance has at least this many valid frames
            out.append(causal_block_input(self.mel.front, logspec, known, self.block, self.done, self.lookahead))
            self.done += 1
        return out

    def tail(self) -> list[BlockInput]:
        """The blocks not handed out yet, computed from the utterance's end (does not consume the state)."""
        logspec, n_valid = self.mel.finish_unclamped()
        return causal_blocks(self.mel.front, logspec, n_valid, self.block, self.lookahead, self.done)
