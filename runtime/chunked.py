"""Chunked stream mode: a block-wise encoder whose finished blocks are final, so they can be prefilled early.

Exact mode must wait for the end of the utterance, because the encoder attends over the whole window and
the Whisper clamp uses the utterance's global max. Chunked mode (opt-in) changes the computation so that
work can be done while the person speaks, in the manner of Qwen2.5-Omni's block-wise audio encoder:

- **blocks**: the valid mel frames are cut into blocks of `block` frames (`chunk_seconds` × 100; a
  multiple of 4, so each full block gives exactly block/4 audio tokens). Each block is encoded on its
  own — attention stays inside the block — but keeps its learned positions in the utterance (block k
  starts at position k·block/2). Qwen2.5-Omni restarts positions per block, but it was trained that way;
  Qwen2-Audio was trained on whole 30 s windows, and on the fixture models restarting measured a mean
  audio-embedding cosine of 0.67–0.75 to exact mode against 0.96–0.97 with kept positions. A block
  also receives the two frames after it (as the exact recipe gives the last valid frames their right
  neighbours), so a full block is final once frames up to block end + 2 are.
- **clamp rule (running max)**: block k is clamped at (max over all frames from the start of the
  utterance up to the end of block k's input) − 8. Later, louder audio cannot change a finished block.
- the last, partial block is encoded at the end of the utterance from the same zero-padded tail as the
  exact recipe; one of ≤ 2 frames (≤ 20 ms) yields no token and is dropped, as the encoder would.

The audio token count is always the same as in exact mode (blocks are multiples of 4 frames), so the
prompt ids are identical and the two modes can be compared token by token (`qwen-audio-edge compare
A --chunked 2`). How far the answers move is model- and data-dependent: check it on your own audio.
"""

from __future__ import annotations

import math

import torch

from .audio import IncrementalMel, MelFrontEnd, num_audio_tokens
from .errors import OptionsError


def block_frames(chunk_seconds: float, front: MelFrontEnd) -> int:
    """Mel frames per block for `chunk_seconds`; must be a whole multiple of 4 frames (0.04 s at 16 kHz)."""
    cfg = front.config
    frames_per_s = cfg.sampling_rate / cfg.hop_length
    frames = chunk_seconds * frames_per_s
    quantum = 4 / frames_per_s
    if not math.isfinite(frames) or abs(frames - round(frames)) > 1e-6 or round(frames) % 4:
        raise OptionsError(f"--chunk-seconds {chunk_seconds} is not a multiple of {quantum:g} s "
                           f"(4 mel frames, one pair of audio tokens); e.g. use 2 or 1.28")
    frames = int(round(frames))
    if not 8 <= frames <= cfg.nb_max_frames:
        raise OptionsError(f"--chunk-seconds must be between {8 / frames_per_s:g} and "
                           f"{cfg.nb_max_frames / frames_per_s:g} s, got {chunk_seconds}")
    return frames


def block_input(front: MelFrontEnd, logspec: torch.Tensor, n_valid: int, block: int, index: int) -> tuple[torch.Tensor, int, int]:
    """Encoder input (mel, valid frames, position offset) of block `index` from unclamped frames `logspec` [n_mels, T].

    `logspec` must hold at least the block's frames plus its two right neighbours (or run to the end of
    the utterance). The clamp uses the running max up to the end of this block's input.
    """
    first = index * block
    count = min(block, n_valid - first)
    stop = min(first + count + 2, logspec.shape[1])
    return front.normalize(logspec[:, first:stop], logspec[:, :stop].max()), count, first // 2


def chunked_mels(front: MelFrontEnd, logspec: torch.Tensor, n_valid: int, block: int, first_index: int = 0) -> list[tuple[torch.Tensor, int, int]]:
    """All blocks from `first_index` to the end of an utterance whose unclamped frames are `logspec`.

    Blocks that would give no audio token (a tail of ≤ 2 frames) are left out.
    """
    out = []
    for index in range(first_index, -(-n_valid // block)):
        item = block_input(front, logspec, n_valid, block, index)
        if num_audio_tokens(item[1]) > 0:
            out.append(item)
    return out


def chunked_utterance(front: MelFrontEnd, waveform, block: int) -> list[tuple[torch.Tensor, int, int]]:
    """The batch twin of `BlockStream`: block encoder inputs of one ≤ 30 s utterance."""
    logspec, n_valid = front.log_spectrogram(waveform)
    return chunked_mels(front, logspec, n_valid, block)


class BlockStream:
    """Block encoder inputs of a streamed utterance, handed out as soon as each block is final.

    Reads the unclamped frames of an `IncrementalMel`; `ready()` returns the blocks that became final
    since the last call, `tail()` the rest once the utterance has ended. Together they equal
    `chunked_utterance` of the same audio, tensor for tensor.
    """

    def __init__(self, mel: IncrementalMel, block: int):
        self.mel = mel
        self.block = block
        self.done = 0  # blocks handed out by ready()

    def ready(self) -> list[tuple[torch.Tensor, int, int]]:
        out = []
        logspec = None
        cap = self.mel.cfg.nb_max_frames
        while (self.done + 1) * self.block + 2 <= min(self.mel.frames_ready, cap):
            if logspec is None:
                logspec = self.mel.ready_logspec()
            end = (self.done + 1) * self.block  # the utterance has more than `end` valid frames already
            out.append(block_input(self.mel.front, logspec, end, self.block, self.done))
            self.done += 1
        return out

    def tail(self) -> list[tuple[torch.Tensor, int, int]]:
        """The blocks not handed out yet, computed from the utterance's end (does not consume the state)."""
        logspec, n_valid = self.mel.finish_unclamped()
        return chunked_mels(self.mel.front, logspec, n_valid, self.block, self.done)
