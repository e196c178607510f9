"""Chunked stream mode: block rule (batch == streaming, finished blocks final), streamed == offline chunked,
fidelity vs exact mode, and the compare --chunked CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import GREEDY, PROMPT, espeak, signal
from qwen_audio_edge.runtime.audio import IncrementalMel, num_audio_tokens
from qwen_audio_edge.runtime.block_encoder import BlockInput
from qwen_audio_edge.runtime.chunked import CLAMP_FLOOR, BlockStream, block_frames, causal_utterance
from qwen_audio_edge.runtime.errors import OptionsError
from qwen_audio_edge.runtime.stream import StreamOptions, VadOptions


def _stream_blocks(front, x, block, lookahead=50, seed=0):
    """Feed x in random chunks; returns (blocks handed out while streaming, with the sample count at which
    each became final), and the tail at the end."""
    mel = IncrementalMel(front)
    bs = BlockStream(mel, block, lookahead)
    rng = np.random.default_rng(seed)
    early, i = [], 0
    while i < len(x):
        k = int(rng.integers(1, 4000))
        mel.feed(x[i : i + k])
        i += k
        early += [(b, i) for b in bs.ready()]
    return early, bs.tail()


def _same(a: BlockInput, b: BlockInput) -> bool:
    return (a.left, a.rows, a.extra_rows, a.pos_offset) == (b.left, b.rows, b.extra_rows, b.pos_offset) and torch.equal(
        a.mel, b.mel
    )


@pytest.mark.parametrize(
    "seconds,chunk,ahead",
    [(0.9, 0.32, 50), (4.37, 2.0, 50), (7.123, 1.28, 0), (7.123, 1.28, 37), (29.99, 2.0, 50), (30.0, 2.0, 100)],
)
def test_block_stream_equals_batch_rule(mha, pipelines, seconds, chunk, ahead):
    front = pipelines(mha).mel
    block = block_frames(chunk, front)
    x = signal(seconds, loud_end=True, seed=int(seconds))
    ref = causal_utterance(front, x, block, ahead)
    early, tail = _stream_blocks(front, x, block, ahead)
    got = [b for b, _ in early] + tail
    assert len(got) == len(ref)
    for k, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert _same(g, r) and r.pos_offset == k * block // 2 and r.left == (0 if k == 0 else 2)
    # Blocks are handed out while the audio arrives: block k once its frames, its look-ahead and 2 more frames
    # are final (mel frames become final in aligned groups of 16), at most one feed (< 4000 samples) later.
    for k, (b, at) in enumerate(early):
        frames = -(-((k + 1) * block + ahead + 2) // 16) * 16
        assert at < 160 * (frames - 1) + 200 + 4000 and b.extra_rows == (ahead + 1) // 2
    if seconds > 2 * chunk + ahead / 100 + 0.5:
        assert len(early) >= int(seconds / chunk) - 2
    # Same audio tokens as exact mode, so the prompt ids are the same.
    rows = [r.rows for r in ref]
    assert all(n % 2 == 0 for n in rows[:-1])
    assert sum(n // 2 for n in rows) == num_audio_tokens(front.valid_frames(len(x)))


def test_finished_blocks_are_final_under_louder_later_audio(mha, pipelines):
    """The running-max clamp: appending much louder audio never changes a block already handed out."""
    front = pipelines(mha).mel
    block = block_frames(2.0, front)
    quiet = 0.05 * signal(6.0, seed=1)
    loud = np.clip(20 * signal(4.0, seed=2), -1, 1).astype(np.float32)
    early_quiet, _ = _stream_blocks(front, quiet, block)
    both = np.concatenate([quiet, loud])
    ref_both = causal_utterance(front, both, block, 50)
    assert len(early_quiet) >= 2
    for (b, _), r in zip(early_quiet, ref_both, strict=False):  # the blocks final before the loud part
        assert _same(b, r)
    # …whereas the exact clamp (global max) moves: the quiet part's frames are clamped differently.
    exact_quiet, _ = front.log_mel(quiet)
    exact_both, _ = front.log_mel(both)
    assert not torch.equal(exact_quiet[:, :400], exact_both[:, :400])


def test_clamp_floor_keeps_leading_silence_flat(mha, pipelines):
    """A block of digital silence is clamped against CLAMP_FLOOR, not against its own max of −10 (which
    turned silence into loud noise); once speech is louder than the floor the running max takes over."""
    front = pipelines(mha).mel
    x = np.concatenate([np.zeros(48000, np.float32), signal(3.0, seed=2)])  # block 0 + look-ahead: silence
    first = causal_utterance(front, x, 200, 50)[0]
    assert float(first.mel.max()) == float(first.mel.min()) == (CLAMP_FLOOR - 8 + 4) / 4
    later = causal_utterance(front, x, 200, 50)[2]  # speech: its own running max, above the floor
    assert float(later.mel.min()) > (CLAMP_FLOOR - 8 + 4) / 4


def _reference_block_causal(module, blocks):
    """The rule written from its definition, without a cache: one masked pass over every block's rows and
    its private look-ahead rows. Block rows attend to all earlier blocks' rows, their own block's rows and
    their look-ahead; look-ahead rows likewise; nobody attends to another block's look-ahead."""
    import torch.nn.functional as F

    tower = module.audio_tower
    xs, owner, is_block = [], [], []
    for k, b in enumerate(blocks):
        h = F.gelu(tower.conv2(F.gelu(tower.conv1(b.mel[None])))).transpose(1, 2)[0]
        n = b.rows + b.extra_rows
        h = h[(1 if b.left else 0) :][:n] + tower.embed_positions.weight[b.pos_offset : b.pos_offset + n]
        xs.append(h)
        owner += [k] * n
        is_block += [True] * b.rows + [False] * b.extra_rows
    x = torch.cat(xs)
    owner, is_block = torch.tensor(owner), torch.tensor(is_block)
    allowed = (owner[None, :] < owner[:, None]) & is_block[None, :] | (owner[None, :] == owner[:, None])
    for layer in tower.layers:
        h = layer.self_attn_layer_norm(x)
        a, heads = layer.self_attn, layer.n_heads
        q, k, v = (p(h).view(len(x), heads, -1).transpose(0, 1) for p in (a.q_proj, a.k_proj, a.v_proj))
        o = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=allowed)[0]
        x = x + a.out_proj(o.transpose(0, 1).reshape(len(x), -1))
        x = x + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))
    out = []
    for kk in range(len(blocks)):
        rows = x[(owner == kk) & is_block]
        rows = rows[: rows.shape[0] // 2 * 2].view(-1, 2, rows.shape[1]).mean(1)
        out.append(module.multi_modal_projector.linear(tower.layer_norm(rows)))
    return torch.cat(out)


@pytest.mark.parametrize("ahead", [0, 50])
def test_block_causal_encoder_equals_its_masked_reference(mha, pipelines, ahead):
    from qwen_audio_edge.runtime.block_encoder import BlockBatch

    p = pipelines(mha)
    blocks = causal_utterance(p.mel, signal(7.3, seed=4), 128, ahead)
    got = BlockBatch(p.block_encoder(), tuple(blocks)).encode()
    with torch.inference_mode():
        ref = _reference_block_causal(p.block_encoder().module, blocks)
    assert (
        got.shape == ref.shape == (num_audio_tokens(p.mel.valid_frames(int(7.3 * 16000))), p.decoder.args.hidden_size)
    )
    err = float((got - ref).abs().max() / ref.abs().max())
    assert err < 2e-6, err  # fp32 with cached vs masked attention; measured 3.6e-7 / 3.7e-7 (look-ahead 0 / 0.5 s)
    # and the cache really carries context: without it (each block alone) the result differs
    from qwen_audio_edge.runtime.block_encoder import tower_block

    alone = tower_block(p.block_encoder().module.audio_tower, blocks[2], None)
    with_ctx = tower_block(p.block_encoder().module.audio_tower, blocks[2], _cache_after(p, blocks[:2]))
    # measured 1.49 / 1.28 (look-ahead 0 / 0.5 s; outputs up to 4.5 in magnitude); margin ÷2
    assert float((alone - with_ctx).abs().max()) > 0.6


def _cache_after(p, blocks):
    enc = p.block_encoder()
    for b in blocks:
        enc.encode(b)
    return enc.cache


def test_block_length_is_checked(mha, pipelines):
    front = pipelines(mha).mel
    assert block_frames(2.0, front) == 200 and block_frames(0.08, front) == 8
    for bad in (0.05, 2.01, 0.0, 31.0, float("nan")):
        with pytest.raises(OptionsError, match="chunk-seconds"):
            block_frames(bad, front)
    with pytest.raises(OptionsError, match="chunk-seconds"):
        pipelines(mha).stream(PROMPT, options=StreamOptions(mode="chunked", chunk_seconds=1.0001))
    with pytest.raises(OptionsError, match="stream mode"):
        StreamOptions(mode="fast")
    for bad in (-0.5, float("inf")):
        with pytest.raises(OptionsError, match="lookahead"):
            StreamOptions(mode="chunked", lookahead_seconds=bad)
    with pytest.raises(OptionsError, match="lookahead"):
        pipelines(mha).stream(PROMPT, options=StreamOptions(mode="chunked", lookahead_seconds=0.0055))


def _offline_chunked_greedy(p, x, chunk, n, lookahead=None):
    from qwen_audio_edge.evaluation.compare import OurModel

    m = OurModel(pipeline=p, chunk_seconds=chunk, lookahead_seconds=lookahead)
    ids, audio = m.prompt(x, PROMPT)
    return m.greedy(ids, audio, n)


@pytest.mark.parametrize("seconds,chunk_samples", [(5.3, 1600), (9.77, 333), (2.5, 16000)])
def test_push_to_talk_chunked_stream_equals_offline_chunked(mha, pipelines, seconds, chunk_samples):
    p = pipelines(mha)
    x = signal(seconds, seed=7)
    session = p.stream(
        PROMPT,
        sampling=GREEDY,
        vad=None,
        options=StreamOptions(mode="chunked", chunk_seconds=2.0, lookahead_seconds=0.5),
    )
    for i in range(0, len(x), chunk_samples):
        session.feed(x[i : i + chunk_samples])
        if min(i + chunk_samples, len(x)) / 16000 > 2.75:  # block 0 (2 s) + its 0.5 s look-ahead + conv frames
            assert session.turn.audio_done > 0  # blocks were prefilled while the audio arrived
    ev = session.end()
    assert ev.mode == "chunked"
    t = ev.result.timings
    assert t["audio_tokens"] == num_audio_tokens(p.mel.valid_frames(len(x)))  # the same count as exact mode
    assert ev.result.token_ids == _offline_chunked_greedy(p, x, 2.0, GREEDY.max_new_tokens, lookahead=0.5)
    # Every full block whose look-ahead (0.5 s) + 2 frames arrived before end() was prefilled early; only the
    # rest remains: at most one block plus the look-ahead (12 tokens) plus a frame group's worth.
    full_blocks = (p.mel.valid_frames(len(x)) - 50 - 2 - 16) // 200
    assert t["audio_tokens_prefilled_early"] >= 50 * full_blocks and t["audio_tokens_prefilled_early"] % 50 == 0
    assert t["audio_tokens"] - t["audio_tokens_prefilled_early"] <= 50 + 13 + 4


def test_chunked_with_vad_and_speculation_equals_offline_chunked(mha, pipelines):
    p = pipelines(mha)
    y = espeak("Hello there. What is the weather like today in the big city?")  # real speech for silero-vad
    audio = np.concatenate([np.zeros(8000, np.float32), y, np.zeros(24000, np.float32)])
    session = p.stream(
        PROMPT, sampling=GREEDY, vad=VadOptions(), options=StreamOptions(mode="chunked", chunk_seconds=1.28)
    )
    events = []
    for i in range(0, len(audio), 1600):
        events += session.feed(audio[i : i + 1600])
    assert len(events) == 1 and session.speculations >= 1
    ev = events[0]
    assert ev.result.timings["speculative"] is True
    span = audio[round(ev.speech_start_s * 16000) : round(ev.speech_end_s * 16000)]
    assert ev.result.token_ids == _offline_chunked_greedy(p, span, 1.28, GREEDY.max_new_tokens)


def test_chunked_fidelity_vs_exact_is_measured(mha, pipelines):
    """The report the README quotes: how far chunked mode moves from exact mode on fixture audio."""
    from qwen_audio_edge.evaluation.compare import OurModel, compare

    p = pipelines(mha)
    files = [signal(s, seed=s) for s in (3, 7, 12)]
    exact = OurModel(pipeline=p)
    same = compare(exact, exact, files, PROMPT, 32)
    assert same["top1_agreement"] == 1.0 and same["mean_kl"] < 1e-6 and same["audio_cosine_min"] > 0.9999
    rep = compare(exact, OurModel(pipeline=p, chunk_seconds=2.0), files, PROMPT, 32)
    # It does change, by this much (measured on the fixture, 3 files × 32 teacher-forced positions):
    # top-1 66/96 = 0.6875 (margin ±10 positions), mean KL 0.190 (±40%), audio cosine mean 0.99737 / min 0.9820,
    # i.e. 1 − cosine 2.6e-3 / 1.8e-2 (±40%).
    assert rep["files"] == 3 and 56 / 96 <= rep["top1_agreement"] <= 76 / 96, rep["top1_agreement"]
    assert 0.114 < rep["mean_kl"] < 0.266, rep["mean_kl"]
    assert 1.58e-3 < 1 - rep["audio_cosine_mean"] < 3.68e-3, rep["audio_cosine_mean"]
    assert 1.08e-2 < 1 - rep["audio_cosine_min"] < 2.52e-2, rep["audio_cosine_min"]


def test_compare_cli_chunked(mha, tmp_path):
    wav = tmp_path / "a.wav"
    sf.write(str(wav), signal(4.2, seed=3), 16000)
    cmd = [sys.executable, "-m", "qwen_audio_edge.cli", "compare", str(mha.artifacts)]
    r = subprocess.run(
        cmd + ["--chunked", "2", "--audio", str(wav), "--json", "--new-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert "chunked" in rep["candidate"] and rep["new_tokens"] == 8 and rep["files"] == 1
    # measured: audio cosine mean 0.99970 (1 − cosine 3.0e-4, margin ±50%), top-1 6/8 (margin ±2 positions)
    assert 1.5e-4 < 1 - rep["audio_cosine_mean"] < 4.5e-4, rep["audio_cosine_mean"]
    assert 4 / 8 <= rep["top1_agreement"] <= 1.0, rep["top1_agreement"]
    r = subprocess.run(cmd + ["--audio", str(wav)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--chunked" in r.stderr
    r = subprocess.run(cmd + ["--chunked", "0.3", "--audio", str(wav)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "multiple of 0.04" in r.stderr and "Traceback" not in r.stderr


def test_stream_cli_chunked_json(mha, pipelines, tmp_path):
    wav = tmp_path / "a.wav"
    x = signal(6.1, seed=4)
    sf.write(str(wav), x, 16000)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_audio_edge.cli",
            "stream",
            str(mha.artifacts),
            "--audio",
            str(wav),
            "--no-vad",
            "--stream-mode",
            "chunked",
            "--chunk-seconds",
            "2",
            "--json",
            "--greedy",
            "--max-new-tokens",
            "5",
            "--ignore-eos",
            "--repetition-penalty",
            "1.0",
            "--prompt",
            PROMPT,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip())
    assert row["stream"]["mode"] == "chunked"
    # The CLI's answer is the offline chunked greedy answer (default 2 s look-ahead) on the same audio.
    from qwen_audio_edge.runtime.audio import load_audio

    assert row["token_ids"] == _offline_chunked_greedy(pipelines(mha), load_audio(wav, 16000), 2.0, 5)


def test_encoder_position_offset_onnx_equals_torch(mha, pipelines):
    """Both backends shift the learned positions the same way; a block past the window is a clear error."""
    from qwen_audio_edge.runtime.errors import AudioError

    p, pt = pipelines(mha), pipelines(mha, encoder_backend="torch")
    assert p.encoder.supports_pos_offset
    mel, n = p.mel.log_mel(signal(2.0, seed=5))
    for off in (0, 100, 500):
        a, b = p.encoder(mel, n, off), pt.encoder(mel, n, off)
        # fp32 ONNX Runtime vs torch: measured 1.6e-6 / 1.7e-6 / 1.7e-6 (offset 0 / 100 / 500; outputs up to 4.0);
        # margin ×3
        assert a.shape == (num_audio_tokens(n), p.decoder.args.hidden_size) and float((a - b).abs().max()) < 5e-6
    assert not torch.allclose(p.encoder(mel, n, 0), p.encoder(mel, n, 100))  # the offset is really applied
    max_pos = p.artifacts.audio_config["max_source_positions"]
    for enc in (p.encoder, pt.encoder):
        with pytest.raises(AudioError, match="learned positions"):
            enc(mel, n, max_pos - 50)


def test_measured_loss_table_matches_the_committed_results():
    """The figures the chunked-mode warning prints come from bench/results/cpu/fidelity_tiny_en.json."""
    from pathlib import Path

    from qwen_audio_edge.runtime import chunked

    res = json.loads((Path(__file__).resolve().parents[1] / "bench/results/cpu/fidelity_tiny_en.json").read_text())
    rows = res["rows"]
    assert (rows["exact"]["wer_clean"], rows["exact"]["wer_noisy"]) == chunked.EXACT_WER
    assert chunked.MEASURED_WER, "no measured setting"
    for (block, ahead), wer in chunked.MEASURED_WER.items():
        row = rows[f"causal-{block:g}+{ahead:g}"]
        assert wer == (row["wer_clean"], row["wer_noisy"])


def test_chunked_stream_warns_with_the_measured_loss(mha, pipelines):
    from qwen_audio_edge.runtime import chunked

    p = pipelines(mha)
    for block, ahead in chunked.MEASURED_WER:
        note = chunked.fidelity_note(block, ahead)
        if note:
            with pytest.warns(UserWarning, match="measured WER"):
                p.stream(
                    PROMPT,
                    vad=None,
                    options=StreamOptions(mode="chunked", chunk_seconds=block, lookahead_seconds=ahead),
                )
    with pytest.warns(UserWarning, match="not measured"):
        p.stream(PROMPT, vad=None, options=StreamOptions(mode="chunked", chunk_seconds=1.28, lookahead_seconds=0.33))
