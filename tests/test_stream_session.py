"""Long conversations and live behaviour: context policy, barge-in, forced cuts, back-pressure, bounded memory."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

from helpers import GREEDY, GREEDY_KW, PROMPT, espeak, signal
from qwen_audio_edge.runtime.errors import LimitError
from qwen_audio_edge.runtime.generate import SamplingOptions, greedy_decode
from qwen_audio_edge.runtime.prompt import embed_prompt
from qwen_audio_edge.runtime.stream import StreamOptions, StreamSession, VadOptions


@pytest.fixture(scope="module")
def words():
    return espeak("Hello there. What is the weather like today in the city?")


def _fresh_greedy(p, ids, audio, n):
    """Greedy decode from scratch (fresh cache, one prefill of `ids` with `audio` in its slots)."""
    return greedy_decode(p.decoder, embed_prompt(p.decoder, ids, audio, p.prompt.audio_token_id), ids, n)


def test_context_policy_drops_oldest_exchanges_and_stays_exact(mha, pipelines):
    p = pipelines(mha, max_context=400)
    conv = p.chat("drop_oldest")
    results = [conv.send(signal(3.0, seed=i), PROMPT, sampling=GREEDY) for i in range(6)]
    assert conv.dropped_exchanges == 4 and len(conv.ids) < 400  # measured: 4 of the 6 exchanges dropped (277 ids kept)
    assert results[-1].timings["dropped_exchanges"] == conv.dropped_exchanges
    # The kept conversation is well formed: the system turn, then whole exchanges (3 <|im_start|> per… 1 + 2 each).
    im_start = p.prompt.token_id("<|im_start|>")
    kept = len(conv.context.exchanges)
    assert conv.ids.count(im_start) == 1 + 2 * kept and kept == 6 - conv.dropped_exchanges
    assert conv.ids[: conv.context.exchanges[0].start] == p.prompt.encode(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    )
    # …and the cache holds exactly it: the last answer equals a from-scratch decode of the kept prompt.
    last = results[-1].token_ids
    prompt_ids = conv.ids[: len(conv.ids) - len(last)]
    audio = torch.cat([a for e in conv.context.exchanges for a in e.audio])
    assert _fresh_greedy(p, prompt_ids, audio, len(last)) == last
    # A further turn still works after compaction.
    assert len(conv.send(None, "And now?", sampling=GREEDY).token_ids) == 12
    # With the "error" policy the same conversation is refused instead.
    strict = p.chat()
    with pytest.raises(LimitError, match="drop_oldest"):
        for i in range(6):
            strict.send(signal(3.0, seed=i), PROMPT, sampling=GREEDY)


def test_no_vad_stream_is_cut_at_one_window(mha, pipelines):
    """Without VAD a long stream is cut every 30 s (forced endpoint); each part is exact w.r.t. `run` on it."""
    p = pipelines(mha)
    x = signal(65.0, seed=11)
    session = p.stream(PROMPT, sampling=GREEDY, vad=None)
    events = []
    for i in range(0, len(x), 8000):
        events += session.feed(x[i : i + 8000])
        assert len(session._samples) <= 16000 * 30 + 8000  # never more than one window buffered
    events.append(session.end())
    assert [e.forced for e in events] == [True, True, False]
    assert [round(e.speech_end_s - e.speech_start_s, 3) for e in events] == [30.0, 30.0, 5.0]
    conv = p.chat()
    for e in events:
        part = x[int(e.speech_start_s * 16000) : int(e.speech_end_s * 16000)]
        assert e.result.token_ids == conv.send(part, PROMPT, sampling=GREEDY).token_ids


@pytest.mark.parametrize("mode", ["exact", "chunked"])
def test_barge_in_cancels_the_answer(mha, pipelines, words, mode):
    p = pipelines(mha)
    slow = threading.Event()
    slow.set()

    def on_text(_piece):
        if slow.is_set():
            time.sleep(0.02)  # a slow consumer (e.g. TTS): the answer takes seconds

    opts = SamplingOptions(max_new_tokens=150, **GREEDY_KW)
    finished = []
    session = p.stream(
        PROMPT,
        sampling=opts,
        on_text=on_text,
        on_event=finished.append,
        options=StreamOptions(barge_in=True, mode=mode, chunk_seconds=1.0, lookahead_seconds=0.5),
    )
    pause = np.zeros(int(0.9 * 16000), np.float32)  # > min silence: the first utterance ends here
    # the second utterance is long enough for its 1 s blocks (+ 0.5 s look-ahead) to become final while it goes on
    audio = np.concatenate([np.zeros(8000, np.float32), words, pause, words, words, np.zeros(16000, np.float32)])
    events = []
    first_end = 8000 + len(words) + int(0.8 * 16000)
    for i in range(0, len(audio), 1600):
        events += session.feed(audio[i : i + 1600])
        if i == (first_end // 1600) * 1600:
            assert session.busy  # the first answer is being generated while audio keeps coming
        if events:
            slow.clear()
    events += session.wait()
    assert len(events) == 2 and len(finished) == 2
    first, second = events
    # The slow consumer (20 ms a token) leaves the feed loop time to hear the second utterance begin: measured 1 token
    # before the cancel (each mode, 3 runs); bound 8 (160 ms of the consumer's sleeps, ≫ the few chunks it takes).
    assert first.cancelled and 1 <= len(first.result.token_ids) <= 8 and session.cancelled == 1
    assert not second.cancelled and len(second.result.token_ids) == 150
    if mode == "chunked":  # blocks of the second utterance waited for the cancelled answer, then were prefilled early
        # measured 125 = 5 × 25: each 1 s block (25 audio tokens) whose 0.5 s look-ahead lies within the 6.02 s
        # utterance (151 audio tokens); the rest waits for the endpoint
        timings = second.result.timings
        assert timings["audio_tokens"] == 151 and timings["audio_tokens_prefilled_early"] == 25 * 5
        return
    # The cancelled answer stays in the conversation as far as it got: replaying the two turns gives the same.
    conv = p.chat()
    span = lambda e: audio[round(e.speech_start_s * 16000) : round(e.speech_end_s * 16000)]
    n1 = len(first.result.token_ids)
    assert (
        conv.send(span(first), PROMPT, sampling=SamplingOptions(max_new_tokens=n1, **GREEDY_KW)).token_ids
        == first.result.token_ids
    )
    assert conv.send(span(second), PROMPT, sampling=opts).token_ids == second.result.token_ids


def test_lag_is_reported_and_stops_speculation(mha, pipelines, words):
    """A fast-forwarded clock: compute 'takes' 1.5× real time, so the session falls behind and says so."""
    p = pipelines(mha)
    audio = np.concatenate([np.zeros(48000, np.float32), words, np.zeros(24000, np.float32)])  # lag > 1 s before speech
    now = [0.0]
    session = StreamSession(p, PROMPT, sampling=GREEDY, vad=VadOptions(), clock=lambda: now[0])
    events = []
    for i in range(0, len(audio), 1600):
        now[0] = 1.5 * i / 16000  # the chunk at audio time t arrives at wall time 1.5 t
        events += session.feed(audio[i : i + 1600])
    assert len(events) == 1
    ev = events[0]
    # The injected delay: the chunk starting at audio time t arrives at wall time 1.5 t, when t + 0.1 s of audio have
    # been received, so the lag at the chunk that decided the endpoint is 0.5 t − 0.1 (measured 3.15 s: the endpoint
    # decided at 6.528 s, in the chunk from 6.5 s), over max_lag_s: no speculation.
    t = (round(ev.decided_at_s * 16000) - 1) // 1600 * 1600 / 16000
    assert ev.lag_s == pytest.approx(0.5 * t - 0.1, abs=1e-9) and ev.lag_s > session.options.max_lag_s
    assert ev.to_json()["stream"]["lag_s"] == round(ev.lag_s, 3)
    assert session.speculations == 0 and ev.result.timings["speculative"] is False
    on_time = StreamSession(p, PROMPT, sampling=GREEDY, vad=VadOptions(), clock=lambda: now[0])
    for i in range(0, len(audio), 1600):
        now[0] = i / 16000
        on_time.feed(audio[i : i + 1600])
    # On time, a chunk arrives when its audio starts: the lag is 0. Measured: 2 speculations, 1 of them dropped
    # because speech resumed.
    assert on_time.speculations == 2 and on_time.discarded == 1 and on_time.lag_s == 0.0


def test_ten_minute_stream_keeps_bounded_memory(mha, pipelines, words):
    """10 minutes of conversation at (simulated) real-time pace: buffers, context and history stay bounded."""
    p = pipelines(mha, max_context=600)
    opts = SamplingOptions(max_new_tokens=4, **GREEDY_KW)
    gap = np.zeros(int(2.2 * 16000), np.float32)
    period = np.concatenate([words, gap])
    total = 600 * 16000
    now = [0.0]
    session = StreamSession(
        p,
        PROMPT,
        sampling=opts,
        vad=VadOptions(),
        clock=lambda: now[0],
        options=StreamOptions(mode="chunked", chunk_seconds=1.0),
    )
    turns = peak_samples = peak_ids = peak_exchanges = 0
    rss0 = _rss_mib()
    fed = 0
    while fed < total:
        for i in range(0, len(period), 3200):
            now[0] = fed / 16000
            turns += len(session.feed(period[i : i + 3200]))
            fed += len(period[i : i + 3200])
            peak_samples = max(peak_samples, len(session._samples), session.mel.n)
            peak_ids = max(peak_ids, len(session.conv.ids))
            peak_exchanges = max(peak_exchanges, len(session.conv.context.exchanges))
    rss_growth_mib = _rss_mib() - rss0
    assert turns == fed // len(period) == 118  # one answer per sentence (measured: 118 of 118)
    assert peak_samples <= 16000 * (len(words) / 16000 + 2.5)  # one utterance + a little silence
    # measured: 5 exchanges at most in the 600 positions (the next turn, begun ahead, among them); every answered
    # exchange is either kept or dropped (measured: 4 kept, 114 dropped)
    assert peak_ids < 600 and peak_exchanges == 5
    answered = [e for e in session.conv.context.exchanges if e.answer is not None]
    assert session.conv.dropped_exchanges == turns - len(answered) == 114
    assert session.lag_s == 0.0
    # measured 4.8 MiB (this test alone); bound 20 MiB (margin 4×), under the 37 MiB that keeping the 10 minutes of
    # float32 audio would take (was < 300 MiB, of the high-water mark, which an earlier test may already have set)
    assert rss_growth_mib < 20, rss_growth_mib


def _rss_mib() -> float:
    """Resident memory now (Linux /proc), not the high-water mark: an earlier test may have set that higher."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_a_turn_too_long_for_the_context_is_refused_and_the_session_goes_on(mha, pipelines):
    p = pipelines(mha, max_context=160)
    session = p.stream(PROMPT, sampling=GREEDY, vad=None)
    session.feed(signal(8.0, seed=1))  # 200 audio tokens: can never fit 160 positions
    with pytest.raises(LimitError, match="context holds 160"):
        session.end()
    session.feed(signal(2.0, seed=2))
    ev = session.end()
    assert len(ev.result.token_ids) == 12
    conv = p.chat()
    assert ev.result.token_ids == conv.send(signal(2.0, seed=2), PROMPT, sampling=GREEDY).token_ids


def test_text_turn_between_spoken_turns_keeps_the_cache(mha, pipelines):
    p = pipelines(mha)
    a, b = signal(3.1, seed=21), signal(2.4, seed=22)
    session = p.stream(PROMPT, sampling=GREEDY, vad=None)
    session.feed(a)
    first = session.end()
    typed = session.send_text("Say it again, slower.")
    session.feed(b)
    third = session.end()
    conv = p.chat()
    assert conv.send(a, PROMPT, sampling=GREEDY).token_ids == first.result.token_ids
    assert conv.send(None, "Say it again, slower.", sampling=GREEDY).token_ids == typed.token_ids
    assert conv.send(b, PROMPT, sampling=GREEDY).token_ids == third.result.token_ids
    session.feed(a[:8000])
    with pytest.raises(Exception, match="utterance is in progress"):
        session.send_text("hello")


def test_dropping_every_old_exchange_renders_the_turn_from_scratch(mha, pipelines):
    """When the policy drops all earlier exchanges, the new turn starts with the system turn again."""
    p = pipelines(mha, max_context=300)
    conv = p.chat("drop_oldest")
    conv.send(signal(8.0, seed=1), PROMPT, sampling=GREEDY)
    r = conv.send(signal(3.0, seed=2), PROMPT, sampling=GREEDY)
    assert conv.dropped_exchanges == 1
    fresh = p.chat()
    assert r.token_ids == fresh.send(signal(3.0, seed=2), PROMPT, sampling=GREEDY).token_ids
    assert conv.ids == fresh.ids  # the same rendering ("Audio 1:", system turn, no stray <|im_end|>)


def test_end_while_speaking_then_more_speech_keeps_all_audio(mha, pipelines, words):
    p = pipelines(mha)
    session = p.stream(PROMPT, sampling=GREEDY, vad=VadOptions())
    audio = np.concatenate([np.zeros(8000, np.float32), words])
    half = 8000 + len(words) // 2
    for i in range(0, half, 1600):
        session.feed(audio[i : min(i + 1600, half)])
    first = session.end()  # push-to-talk release while the person is still speaking
    assert first is not None
    rest = np.concatenate([audio[half:], np.zeros(16000, np.float32)])
    events = []
    for i in range(0, len(rest), 1600):
        events += session.feed(rest[i : i + 1600])
    assert len(events) == 1
    ev = events[0]
    # No audio counted twice, none lost: the second utterance starts exactly where end() cut the first
    assert ev.speech_start_s == first.speech_end_s == half / 16000
    # …and each answer is the one a conversation gives to the same samples (measured: 38 and 41 audio tokens)
    whole = np.concatenate([audio, np.zeros(16000, np.float32)])
    conv = p.chat()
    for e, n_audio in ((first, 38), (ev, 41)):
        again = conv.send(
            whole[round(e.speech_start_s * 16000) : round(e.speech_end_s * 16000)], PROMPT, sampling=GREEDY
        )
        assert e.result.token_ids == again.token_ids
        assert e.result.timings["audio_tokens"] == again.timings["audio_tokens"] == n_audio


def test_short_min_silence_never_runs_ahead_of_the_audio(mha, pipelines, words):
    p = pipelines(mha)
    session = p.stream(PROMPT, sampling=GREEDY, vad=VadOptions(min_silence_ms=0, speech_pad_ms=100))
    audio = np.concatenate([np.zeros(8000, np.float32), words, np.zeros(8000, np.float32)] * 2)
    fed = 0
    for i in range(0, len(audio), 1600):
        session.feed(audio[i : i + 1600])
        fed += len(audio[i : i + 1600])
        assert session._origin <= fed


def test_a_refused_turn_in_a_vad_stream_surfaces_and_the_next_one_is_answered(mha, pipelines, words):
    p = pipelines(mha, max_context=120)
    session = p.stream(PROMPT, sampling=GREEDY, vad=VadOptions(), options=StreamOptions(context_policy="error"))
    long_speech = np.concatenate([words, words, words])  # ~9 s: more audio tokens than the context holds
    short = words[: int(1.2 * 16000)]
    audio = np.concatenate(
        [np.zeros(8000, np.float32), long_speech, np.zeros(16000, np.float32), short, np.zeros(16000, np.float32)]
    )
    events, errors = [], []
    for i in range(0, len(audio), 1600):
        try:
            events += session.feed(audio[i : i + 1600])
        except LimitError as e:
            errors.append(e)
    # Measured: 2 refusals. The long speech, as one utterance (222 audio tokens); then, once the short one is
    # answered, the next turn's prompt prefix (begun right away, no audio yet) no longer fits the 120 positions.
    assert len(errors) == 2 and len(events) == 1
    assert "of which 222 audio tokens" in str(errors[0]) and "of which 0 audio tokens" in str(errors[1])
    ev = events[0]
    # the short utterance: its 1.2 s of speech + the VAD's pads, measured 1.384 s; bound ±10 ms
    assert ev.speech_end_s - ev.speech_start_s == pytest.approx(1.384, abs=0.01)
    span = audio[round(ev.speech_start_s * 16000) : round(ev.speech_end_s * 16000)]
    assert ev.result.token_ids == p.chat().send(span, PROMPT, sampling=GREEDY).token_ids


def test_an_answer_holding_the_audio_token_id_survives_the_context_policy(mha, pipelines, monkeypatch):
    """A (random) model may generate the <|AUDIO|> id as text. Re-prefilling the kept conversation must
    not take that answer token for an audio slot (it once raised "kept audio embeddings do not match")."""
    import qwen_audio_edge.runtime.generate as gen

    p = pipelines(mha, max_context=300)
    real_pick, calls = gen.pick_token, []

    def pick(scores, opts, generator):
        calls.append(1)
        return p.prompt.audio_token_id if len(calls) == 2 else real_pick(scores, opts, generator)

    conv = p.chat("drop_oldest")
    conv.send(signal(2.0, seed=1), PROMPT, sampling=GREEDY)
    monkeypatch.setattr(gen, "pick_token", pick)
    second = conv.send(signal(2.0, seed=2), PROMPT, sampling=GREEDY)
    assert second.token_ids[1] == p.prompt.audio_token_id
    monkeypatch.setattr(gen, "pick_token", real_pick)
    r = conv.send(signal(3.0, seed=3), PROMPT, sampling=GREEDY)  # forces the oldest exchange out, keeps the second
    assert (
        conv.dropped_exchanges == 1 and len(conv.context.exchanges) == 2 and len(r.token_ids) == GREEDY.max_new_tokens
    )
