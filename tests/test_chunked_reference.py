"""Chunked stream mode against an independent reference written from the rule's definition.

tests/test_stream_chunked.py checks the chunked mode against itself (streamed blocks == batch blocks, the
cached encoder == a masked pass over the same block inputs). This file checks it against the definition
(runtime/chunked.py and runtime/block_encoder.py docstrings; docs/streaming.md, "Chunked mode"), computed
the plain way, without any of the runtime's chunked code:

- log-mel: Whisper's recipe (the waveform zero-padded to 30 s, centred 400-sample STFT, hop 160,
  log10 of the mel power floored at 1e-10), 3000 frames; V valid frames as transformers' feature
  extractor counts them.
- blocks: the V valid frames are cut into blocks of B frames; block k's encoder rows are the conv2
  positions r with k·B ≤ 2r < min((k+1)·B, V), at their learned positions r in the utterance; its
  look-ahead rows those with (k+1)·B ≤ 2r < min((k+1)·B + lookahead, V) (fewer at the utterance's end).
- convolutions: over the real frames on both sides (computed here over the whole spectrogram: a conv2
  row only reads frames 2r − 2 … 2r + 2).
- clamp: block k's input frames run up to two frames past its look-ahead (the last block: past V); the
  block is clamped at max(running max of the log-mel up to that frame, CLAMP_FLOOR) − 8, then (x + 4) / 4.
- attention: rows of block k (block and look-ahead rows alike) see every earlier block's rows, their own
  block's rows and their own look-ahead rows; nobody sees another block's look-ahead. One pass of
  transformers' Qwen2AudioEncoder layers over all blocks' rows with that mask.
- output: the blocks' rows in order, pooled in pairs, final LayerNorm, projector (as the exact encoder).

The harness itself is checked first: with one block spanning the whole utterance it must reproduce exact
mode (transformers' encoder on its own features).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import GREEDY_KW, PROMPT, signal
from qwen_audio_edge.runtime.chunked import CLAMP_FLOOR
from qwen_audio_edge.runtime.generate import SamplingOptions
from qwen_audio_edge.runtime.stream import StreamOptions

ONE_TOKEN = SamplingOptions(max_new_tokens=1, **GREEDY_KW)  # the embeddings are what is compared, not the answer
FRAMES_PER_S = 100  # hop 160 at 16 kHz


def _log_mel_unclamped(fe, wave: np.ndarray) -> torch.Tensor:
    """log10 mel power [n_mels, 3000] of the waveform zero-padded to 30 s (Whisper's recipe, before its clamp)."""
    padded = np.zeros(fe.n_samples, np.float32)
    padded[: len(wave)] = wave
    stft = torch.stft(
        torch.from_numpy(padded), fe.n_fft, fe.hop_length, window=torch.hann_window(fe.n_fft), return_complex=True
    )
    power = stft[..., :-1].abs() ** 2
    return (torch.from_numpy(fe.mel_filters).float().T @ power).clamp(min=1e-10).log10()


def _valid_frames(fe, wave: np.ndarray) -> int:
    return int(
        fe(wave, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")[
            "attention_mask"
        ].sum()
    )


@torch.no_grad()
def reference_chunked(model, wave: np.ndarray, block: int, lookahead: int) -> torch.Tensor:
    """Audio embeddings [tokens, hidden] of the block-causal rule, from its definition (module docstring)."""
    fe = model.processor.feature_extractor
    tower = model.reference.model.audio_tower
    projector = model.reference.model.multi_modal_projector
    logmel = _log_mel_unclamped(fe, wave)
    total = logmel.shape[1]
    running_max = torch.cummax(logmel.max(dim=0).values, dim=0).values  # causal: max over frames 0…f
    v = _valid_frames(fe, wave)
    n_blocks = -(-v // block)
    rows_all = torch.arange(tower.config.max_source_positions)
    pieces, owner, kept = [], [], []
    for k in range(n_blocks):
        block_end = min((k + 1) * block, v)
        ahead_end = min((k + 1) * block + lookahead, v)
        last_input = min(ahead_end + 1, total - 1)  # two frames for the convolutions after the look-ahead
        floor = max(float(running_max[last_input]), CLAMP_FLOOR) - 8.0
        mel = (torch.maximum(logmel, torch.tensor(floor)) + 4.0) / 4.0
        h = F.gelu(tower.conv2(F.gelu(tower.conv1(mel[None]))))[0].T  # [positions, d]; row r reads frames 2r−2…2r+2
        mine = rows_all[(2 * rows_all >= k * block) & (2 * rows_all < block_end)]
        ahead = rows_all[(2 * rows_all >= block_end) & (2 * rows_all < ahead_end)]
        idx = torch.cat([mine, ahead])
        pieces.append(h[idx] + tower.embed_positions.weight[idx])
        owner += [k] * len(idx)
        kept += [True] * len(mine) + [False] * len(ahead)
    x = torch.cat(pieces)[None]
    owner_t, kept_t = torch.tensor(owner), torch.tensor(kept)
    same_block = owner_t[:, None] == owner_t[None, :]
    earlier_block_row = (owner_t[None, :] < owner_t[:, None]) & kept_t[None, :]
    allowed = same_block | earlier_block_row
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    for layer in tower.layers:
        x = layer(x, mask)
        x = x[0] if isinstance(x, tuple) else x
    rows = x[0, kept_t]
    assert rows.shape[0] == (v - 1) // 2 + 1  # the exact encoder's valid conv2 positions
    pooled = tower.avg_pooler(rows.T[None])[0].T
    return projector(tower.layer_norm(pooled))


@torch.no_grad()
def exact_transformers(model, wave: np.ndarray) -> torch.Tensor:
    """Exact mode's audio embeddings from transformers (its processor features, its encoder, its mask)."""
    from transformers.masking_utils import create_bidirectional_mask

    fe = model.processor.feature_extractor
    tower = model.reference.model.audio_tower
    feats = fe(wave, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
    lengths, n_tokens = tower._get_feat_extract_output_lengths(feats["attention_mask"].sum(-1))
    positions = tower.config.max_source_positions
    mask = create_bidirectional_mask(
        config=tower.config,
        inputs_embeds=torch.zeros(1, positions, 1),
        attention_mask=(torch.arange(positions)[None] < lengths[:, None]).long(),
    )
    states = tower(feats["input_features"], attention_mask=mask).last_hidden_state
    return model.reference.model.multi_modal_projector(states)[0, : int(n_tokens)]


def stream_embeddings(p, monkeypatch, wave: np.ndarray, chunk_s: float, lookahead_s: float, step: int):
    """What a push-to-talk chunked stream encodes (every encoder output, in order), fed `step` samples at a
    time; and how many tokens of it were encoded before end()."""
    seen: list[torch.Tensor] = []
    original = p.encode_mels

    def recording(mels):
        out = original(mels)
        seen.extend(e.detach().clone() for e in out)
        return out

    monkeypatch.setattr(p, "encode_mels", recording)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the fidelity note of unmeasured settings
        session = p.stream(
            PROMPT,
            sampling=ONE_TOKEN,
            vad=None,
            options=StreamOptions(mode="chunked", chunk_seconds=chunk_s, lookahead_seconds=lookahead_s),
        )
    for i in range(0, len(wave), step):
        session.feed(wave[i : i + step])
    early = sum(e.shape[0] for e in seen)
    ev = session.end()
    monkeypatch.undo()
    assert ev.mode == "chunked"
    return torch.cat([e for e in seen if e.shape[0]]), early


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _wave(seconds: float, seed: int, silence_s: float = 0.0, loud_end: bool = False) -> np.ndarray:
    x = signal(seconds - silence_s, loud_end=loud_end, seed=seed)
    return np.concatenate([np.zeros(int(silence_s * 16000), np.float32), x]).astype(np.float32)


@pytest.mark.parametrize("seconds,loud", [(1.37, False), (7.3, True), (29.9, False)])
def test_reference_with_one_block_is_exact_mode(mha, seconds, loud):
    """The harness (mel, positions, convolutions, mask, pooling) reproduces transformers' exact encoder when
    one block spans the utterance: then the running max is the global max and every row sees every row."""
    wave = _wave(seconds, seed=11, loud_end=loud)
    ref = reference_chunked(mha, wave, block=3000, lookahead=0)
    exact = exact_transformers(mha, wave)
    assert ref.shape == exact.shape
    err = _rel(ref, exact)
    assert err < 2e-6, err  # fp32; measured 3.7e-7 / 3.6e-7 / 0 (1.37 / 7.3 / 29.9 s); margin ×5


# (seconds, seed, leading digital silence s, louder end, block s, look-ahead s, feed step in samples)
CASES = [
    (1.37, 1, 0.0, False, 2.0, 0.5, 1234),  # shorter than one block: one partial block
    (4.37, 2, 0.0, True, 2.0, 0.5, 1600),
    (7.123, 3, 0.0, False, 1.28, 0.0, 777),  # no look-ahead
    (7.123, 4, 0.0, True, 0.48, 0.37, 4000),  # odd look-ahead frames, many small blocks
    (5.0, 5, 0.0, False, 1.0, 1.5, 2500),  # look-ahead longer than a block
    (12.5, 6, 5.5, False, 3.0, 2.0, 3200),  # the defaults; block 0 and its look-ahead are digital silence (the floor)
    (29.9, 7, 0.0, True, 2.0, 1.0, 16000),  # nearly a full window; the running max rises at the end
]


@pytest.mark.parametrize("seconds,seed,silence,loud,chunk_s,lookahead_s,step", CASES)
def test_chunked_stream_equals_the_reference(
    mha, pipelines, monkeypatch, seconds, seed, silence, loud, chunk_s, lookahead_s, step
):
    p = pipelines(mha)
    wave = _wave(seconds, seed, silence, loud)
    block, lookahead = round(chunk_s * FRAMES_PER_S), round(lookahead_s * FRAMES_PER_S)
    ref = reference_chunked(mha, wave, block, lookahead)
    got, early = stream_embeddings(p, monkeypatch, wave, chunk_s, lookahead_s, step)
    offline = p.single_turn(wave, PROMPT, chunk_seconds=chunk_s, lookahead_seconds=lookahead_s)[1]
    assert got.shape == ref.shape == offline.shape, (got.shape, ref.shape, offline.shape)
    # Blocks were really encoded while the audio arrived: all whose look-ahead (+2 frames, +16 for the mel's
    # frame groups, +1 feed step) arrived before the end.
    v = _valid_frames(mha.processor.feature_extractor, wave)
    final_early = max(0, (v - lookahead - 2 - 16 - step // 160 - 1) // block)
    assert early >= final_early * block // 4, (early, final_early)
    err, err_offline = _rel(got, ref), _rel(offline, ref)
    print(
        f"{seconds} s, {chunk_s} s blocks + {lookahead_s} s look-ahead: stream vs reference {err:.2e}, "
        f"offline chunked vs reference {err_offline:.2e}, {early} of {got.shape[0]} tokens encoded before end()"
    )
    # fp32 rounding only: measured 3.1e-7 … 4.2e-7 over CASES (stream and offline alike); margin ×5. Plausible
    # wrong rules are far above it (measured on CASES): no clamp floor 1.0e-1 (the silent-start case), clamp at
    # the block's end instead of after its look-ahead ≥ 9.0e-6, the exact global clamp ≥ 1.2e-5, each block's
    # convolutions without the real frames around it ≥ 5.2e-3, later blocks seeing an earlier block's
    # look-ahead ≥ 5.9e-2, block rows not seeing their own look-ahead ≥ 1.7e-1.
    assert err < 2e-6 and err_offline < 2e-6, (err, err_offline)


def test_the_rule_is_not_exact_mode(mha):
    """The reference's rule really differs from exact mode (else the comparisons above would prove little)."""
    wave = _wave(7.123, 4, loud_end=True)
    diff = _rel(reference_chunked(mha, wave, 48, 37), exact_transformers(mha, wave))
    assert diff > 0.16, diff  # measured 0.327 (max relative difference); margin ÷2
