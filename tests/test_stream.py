"""Streaming: incremental mel == batch, streamed turns == offline turns (exact mode), VAD endpointing."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import pairwise

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import GREEDY, PROMPT, espeak, signal
from qwen_audio_edge.runtime.audio import IncrementalMel
from qwen_audio_edge.runtime.stream import VadOptions


@pytest.mark.parametrize(
    "seconds,loud", [(0.0201, False), (1.0, True), (3.30037, False), (12.3457, True), (30.0, False)]
)
def test_incremental_mel_is_bit_identical_to_batch(mha, pipelines, seconds, loud):
    front = pipelines(mha).mel
    x = signal(seconds, loud_end=loud)
    ref, n_valid = front.log_mel(x)
    rng = np.random.default_rng(int(seconds * 1000))
    inc = IncrementalMel(front)
    i = 0
    while i < len(x):
        k = int(rng.integers(1, 5000))
        inc.feed(x[i : i + k])
        i += k
    # Frames were computed as audio arrived, before finish(): frame f's window is samples [160 f − 200, 160 f + 200)
    # (n_fft 400, centred), and frames are made final in whole blocks of 16 once every window of the block arrived.
    windows_arrived = (len(x) - 200) // 160 + 1 if len(x) >= 200 else 0
    assert inc.frames_ready == 16 * (windows_arrived // 16), (inc.frames_ready, windows_arrived)
    mel, n2 = inc.finish()
    assert n2 == n_valid and torch.equal(mel, ref)


def test_push_to_talk_stream_equals_offline_run(mha, pipelines):
    p = pipelines(mha)
    x = signal(4.37, seed=3)
    offline = p.run(x, PROMPT, sampling=GREEDY)
    session = p.stream(PROMPT, sampling=GREEDY, vad=None)
    rng = np.random.default_rng(0)
    i = 0
    while i < len(x):
        k = int(rng.integers(100, 3000))
        assert session.feed(x[i : i + k]) == []
        i += k
    event = session.end()
    assert event.result.token_ids == offline.token_ids and event.result.text == offline.text
    # The conversation goes on: a second utterance in the same session is a second turn.
    y = signal(2.2, seed=4)
    session.feed(y)
    second = session.end()
    conv = p.chat()
    conv.send(x, PROMPT, sampling=GREEDY)
    assert second.result.token_ids == conv.send(y, PROMPT, sampling=GREEDY).token_ids


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
    """Three files as a user would have them: 16 kHz wav, 44.1 kHz stereo flac, 8 kHz int16 wav."""
    import soxr

    d = tmp_path_factory.mktemp("files")
    a = signal(4.37, seed=3)
    b = signal(12.3457, loud_end=True, seed=8)
    c = signal(7.01, seed=12)
    sf.write(str(d / "a.wav"), a, 16000)
    b44 = soxr.resample(b, 16000, 44100).astype(np.float32)
    sf.write(str(d / "b.flac"), np.stack([b44, 0.5 * b44], axis=1), 44100)
    sf.write(str(d / "c.wav"), (soxr.resample(c, 16000, 8000) * 32767).astype(np.int16), 8000)
    return [d / "a.wav", d / "b.flac", d / "c.wav"]


@pytest.mark.parametrize("chunk", [160, 1600, 16000, 777])  # 10 ms, 100 ms, 1 s, odd
def test_exact_stream_without_vad_equals_run_on_the_file(mha, pipelines, audio_files, chunk):
    """Acceptance: for ≥ 3 files and several chunk sizes, streamed greedy tokens == `run` on the whole file."""
    from qwen_audio_edge.runtime.audio import load_audio

    p = pipelines(mha)
    for path in audio_files:
        offline = p.run(str(path), PROMPT, sampling=GREEDY)
        x = load_audio(path, 16000)  # what `stream --audio` feeds
        session = p.stream(PROMPT, sampling=GREEDY, vad=None)
        for i in range(0, len(x), chunk):
            assert session.feed(x[i : i + chunk]) == []
        ev = session.end()
        assert ev.result.token_ids == offline.token_ids, (path.name, chunk)


def test_stream_resamples_other_rates(mha, pipelines):
    import soxr

    p = pipelines(mha)
    x = signal(3.0, seed=5)
    x44 = soxr.resample(x, 16000, 44100).astype(np.float32)
    session = p.stream(PROMPT, sampling=GREEDY, vad=None)
    for i in range(0, len(x44), 4410):
        session.feed((x44[i : i + 4410] * 32767).astype(np.int16), sampling_rate=44100)
    event = session.end()
    assert abs(event.result.timings["audio_tokens"] - p.mel.valid_frames(len(x)) // 4) <= 1


def test_silence_only_gives_no_speech(mha, pipelines):
    p = pipelines(mha)
    session = p.stream(PROMPT, sampling=GREEDY)
    rng = np.random.default_rng(1)
    for _ in range(30):
        assert session.feed((0.0005 * rng.standard_normal(1600)).astype(np.float32)) == []
    assert session.end() is None


@pytest.fixture(scope="module")
def speech():
    """Real speech for silero-vad (espeak-ng: skipped locally without it, a failure in CI), 1 s of silence
    before and 2 s after: (audio, first speech sample, end of speech)."""
    x = espeak("Hello there. What is the weather like today in the city?")
    return np.concatenate([np.zeros(16000, np.float32), x, np.zeros(32000, np.float32)]), 16000, 16000 + len(x)


def test_vad_endpoint_is_timely_and_exact(mha, pipelines, speech):
    audio, speech_start, speech_end = speech
    p = pipelines(mha)
    opts = VadOptions()
    session = p.stream(PROMPT, sampling=GREEDY, vad=opts)
    events = []
    for i in range(0, len(audio), 1600):  # 100 ms chunks
        events += session.feed(audio[i : i + 1600])
    assert len(events) == 1, [e.to_json()["stream"] for e in events]
    ev = events[0]
    limit = (opts.min_silence_ms + 100) / 1000
    assert ev.decided_at_s - speech_end / 16000 <= limit + 0.064, ev.to_json()["stream"]  # measured 0.613 s
    # Utterance bounds vs the voiced span: the start is speech_pad (100 ms) before the VAD frame that fired, the
    # end speech_pad after the last speech frame. Measured: start −0.044 s, end +0.169 s; margin ±0.05 s each
    # (about 1.5 VAD frames of 32 ms).
    assert -0.094 < ev.speech_start_s - speech_start / 16000 < 0.006, ev.to_json()["stream"]
    assert 0.119 < ev.speech_end_s - speech_end / 16000 < 0.219, ev.to_json()["stream"]
    # Exact mode: the same answer as the offline pipeline on the utterance span (speech + padding).
    span = audio[round(ev.speech_start_s * 16000) : round(ev.speech_end_s * 16000)]
    assert ev.result.token_ids == p.run(span, PROMPT, sampling=GREEDY).token_ids
    assert session.end() is None  # nothing after the endpoint but silence


def test_stream_cli_json(mha, speech, tmp_path):
    audio, _, _ = speech
    wav = tmp_path / "speech.wav"
    sf.write(str(wav), audio, 16000)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_audio_edge.cli",
            "stream",
            str(mha.artifacts),
            "--audio",
            str(wav),
            "--json",
            "--greedy",
            "--max-new-tokens",
            "6",
            "--ignore-eos",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert len(rows) == 1 and len(rows[0]["token_ids"]) == 6
    s = rows[0]["stream"]
    assert s["ttft_after_endpoint_ms"] > 0 and s["endpoint_decided_at_s"] >= s["speech_end_s"]
    # VAD options from the command line: a bad value is a one-line error, not a traceback.
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_audio_edge.cli",
            "stream",
            str(mha.artifacts),
            "--audio",
            str(wav),
            "--vad-threshold",
            "1.5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "threshold" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_audio_edge.cli",
            "stream",
            str(mha.artifacts),
            "--audio",
            str(wav),
            "--json",
            "--greedy",
            "--max-new-tokens",
            "2",
            "--max-speech-s",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    rows = [json.loads(x) for x in r.stdout.strip().splitlines()]
    # As test_forced_endpoint_at_max_speech_duration: "Hello there." ends by itself, the rest is cut twice.
    assert r.returncode == 0 and [row["stream"]["forced_endpoint"] for row in rows] == [False, True, True, False], rows
    silent = tmp_path / "silence.wav"
    sf.write(str(silent), np.zeros(32000, np.float32), 16000)
    r = subprocess.run(
        [sys.executable, "-m", "qwen_audio_edge.cli", "stream", str(mha.artifacts), "--audio", str(silent), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and json.loads(r.stdout.strip())["no_speech"] is True


@pytest.mark.parametrize("speculate", [True, False])
def test_speculative_prefill_is_exact_and_used(mha, pipelines, speech, speculate):
    from qwen_audio_edge.runtime.stream import StreamOptions, StreamSession

    audio, _, _ = speech
    p = pipelines(mha)
    session = StreamSession(p, PROMPT, sampling=GREEDY, vad=VadOptions(), options=StreamOptions(speculate=speculate))
    events = []
    for i in range(0, len(audio), 512):
        events += session.feed(audio[i : i + 512])
    assert len(events) == 1
    ev = events[0]
    assert ev.result.timings["speculative"] is speculate
    span = audio[round(ev.speech_start_s * 16000) : round(ev.speech_end_s * 16000)]
    assert ev.result.token_ids == p.run(span, PROMPT, sampling=GREEDY).token_ids


def test_speech_resuming_discards_the_speculation(mha, pipelines, speech):
    """A pause shorter than min_silence: speculation starts, speech resumes, one turn covers both parts."""
    audio, s0, s1 = speech
    words = audio[s0:s1]
    gap = np.zeros(int(0.3 * 16000), np.float32)  # 300 ms < 500 ms of min silence
    stream_audio = np.concatenate([np.zeros(8000, np.float32), words, gap, words, np.zeros(24000, np.float32)])
    p = pipelines(mha)
    session = p.stream(PROMPT, sampling=GREEDY)
    events = []
    for i in range(0, len(stream_audio), 1600):
        events += session.feed(stream_audio[i : i + 1600])
    assert len(events) == 1
    # A speculation starts in every pause of the VAD's silence wait and is dropped when speech resumes: after
    # "Hello there." (twice) and in the 300 ms gap — 3 dropped; the one in the final silence is kept.
    # Measured: 3 discarded of 4 (the feed is faster than real time, so back-pressure never skips one).
    assert (session.discarded, session.speculations) == (3, 4)
    ev = events[0]
    assert ev.speech_end_s - ev.speech_start_s > 2 * len(words) / 16000
    span = stream_audio[round(ev.speech_start_s * 16000) : round(ev.speech_end_s * 16000)]
    assert ev.result.token_ids == p.run(span, PROMPT, sampling=GREEDY).token_ids


def test_forced_endpoint_at_max_speech_duration(mha, pipelines, speech):
    audio, _, _ = speech
    p = pipelines(mha)
    session = p.stream(PROMPT, sampling=GREEDY, vad=VadOptions(max_speech_s=1.0))
    events = []
    for i in range(0, len(audio), 1600):
        events += session.feed(audio[i : i + 1600])
    # The ~3.1 s utterance span: "Hello there." (0.87 s with its pad) ends by itself; the rest (2.2 s) is cut at
    # 1 s twice, and each cut utterance starts exactly where the previous one was cut. Measured: 4 utterances.
    assert [e.forced for e in events] == [False, True, True, False], [
        (e.speech_start_s, e.speech_end_s) for e in events
    ]
    assert all(e.speech_end_s - e.speech_start_s <= 1.0 + 1e-3 for e in events)
    assert all(b.speech_start_s == a.speech_end_s for a, b in pairwise(events) if a.forced)


def test_stream_cli_barge_in(mha, speech, tmp_path):
    """--barge-in runs answers on a worker; speech over an answer cancels it, and every turn is still reported.

    The whole file is one feed (--chunk-ms longer than the file), so the VAD reports the first utterance's end
    and the second one's start in the same call: the first answer (64 tokens, many milliseconds) has just
    started on the worker when the second start arrives — the second utterance always speaks over it."""
    audio, s0, s1 = speech
    words = audio[s0:s1]
    two = np.concatenate(
        [np.zeros(8000, np.float32), words, np.zeros(16000, np.float32), words, np.zeros(16000, np.float32)]
    )
    wav = tmp_path / "two.wav"
    sf.write(str(wav), two, 16000)
    n = 64
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_audio_edge.cli",
            "stream",
            str(mha.artifacts),
            "--audio",
            str(wav),
            "--barge-in",
            "--json",
            "--greedy",
            "--max-new-tokens",
            str(n),
            "--ignore-eos",
            "--chunk-ms",
            str(1000 * len(two) // 16000 + 1000),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert len(rows) == 2, rows
    assert rows[0]["stream"]["cancelled"] is True and len(rows[0]["token_ids"]) < n  # cut short by the second utterance
    assert rows[1]["stream"]["cancelled"] is False and len(rows[1]["token_ids"]) == n  # nobody spoke over the last one


def test_mic_without_sounddevice_is_a_clear_error(mha):
    import importlib.util

    r = subprocess.run(
        [sys.executable, "-m", "qwen_audio_edge.cli", "stream", str(mha.artifacts), "--mic"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if importlib.util.find_spec("sounddevice") is None:
        assert r.returncode == 2 and "sounddevice" in r.stderr and "Traceback" not in r.stderr
    else:
        assert r.returncode in (0, 2)  # with the package: runs, or reports that no input device exists


def test_vad_does_not_change_torch_threads(mha, pipelines):
    before = torch.get_num_threads()
    pipelines(mha).stream(PROMPT).feed(np.zeros(1600, np.float32))
    assert torch.get_num_threads() == before
