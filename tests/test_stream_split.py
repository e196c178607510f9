"""The stream session's parts on their own, without a model: endpointing, the audio buffer, speculation's
keep/drop bookkeeping and the answer worker. The session's end-to-end behaviour is covered by
test_stream.py, test_stream_session.py and test_stream_chunked.py."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from qwen_audio_edge.runtime import stream
from qwen_audio_edge.runtime.answer_worker import AnswerWorker
from qwen_audio_edge.runtime.endpointing import Endpointer, SileroVad, VadOptions, WindowEndpointer
from qwen_audio_edge.runtime.errors import LimitError
from qwen_audio_edge.runtime.speculation import Speculation
from qwen_audio_edge.runtime.stream_buffer import AudioBuffer

FRAME = SileroVad.FRAME


class ScriptedVad:
    """Stands in for silero-vad: one speech probability per 512-sample frame, in order."""

    def __init__(self, probs: list[float]):
        self.probs = list(probs)

    def __call__(self, frame: np.ndarray) -> float:
        assert frame.shape == (FRAME,)
        return self.probs.pop(0)


def frames(n: int) -> np.ndarray:
    return np.zeros(n * FRAME, np.float32)


def test_options_stay_importable_from_stream_and_frozen():
    assert stream.VadOptions is VadOptions and stream.Endpointer is Endpointer
    with pytest.raises(Exception, match="cannot assign"):
        stream.StreamOptions().mode = "chunked"  # type: ignore[misc]
    with pytest.raises(Exception, match="cannot assign"):
        VadOptions().threshold = 0.1  # type: ignore[misc]


def test_endpointer_start_end_and_the_pending_end_speculation_uses():
    # pad 32 ms = one frame, min silence 64 ms = two frames. Speech in frames 2-5, then silence.
    opts = VadOptions(min_silence_ms=64, speech_pad_ms=32)
    ep = Endpointer(opts, vad=ScriptedVad([0.0, 0.0, 0.9, 0.9, 0.9, 0.9, 0.0, 0.9, 0.0, 0.0, 0.0]))
    assert ep.pending_end() is None
    # Start: the frame that triggered, reaching back one pad: (2 frames + 1) * 512 − pad − 512.
    assert list(ep.feed(frames(7))) == [("start", FRAME, 3 * FRAME)]
    # Frame 6 is silent: if the silence holds, the utterance ends at the silence's start + pad − frame.
    assert ep.pending_end() == 7 * FRAME == ep.safe_horizon()
    assert list(ep.feed(frames(1))) == [] and ep.pending_end() is None  # speech resumed: nothing pending
    assert ep.safe_horizon() == 8 * FRAME
    # Silence from frame 8: pending at once, confirmed two frames later at the same sample.
    assert list(ep.feed(frames(1))) == [] and ep.pending_end() == 9 * FRAME
    assert list(ep.feed(frames(2))) == [("end", 9 * FRAME, 11 * FRAME)]
    assert ep.pending_end() is None and not ep.triggered


def test_endpointer_forces_a_cut_at_max_speech_and_close_ends_the_utterance():
    ep = Endpointer(VadOptions(max_speech_s=4 * FRAME / 16000), vad=ScriptedVad([0.9] * 6 + [0.0]))
    cut = 4 * FRAME  # the utterance may not grow past max_speech: cut before the frame that would exceed it
    assert list(ep.feed(frames(7))) == [("start", 0, FRAME), ("cut", cut, cut), ("start", cut, cut)]
    assert ep.pending_end() == 7 * FRAME + 1600 - FRAME  # silence began (default pad: 100 ms)
    ep.close(7 * FRAME)  # push-to-talk end(): the next utterance waits for a new speech start
    assert not ep.triggered and ep.pending_end() is None


def test_window_endpointer_cuts_each_full_window_and_restarts_at_close():
    ep = WindowEndpointer(max_samples=1000)
    assert list(ep.feed(np.zeros(1000, np.float32))) == []  # exactly one window: not cut yet
    assert list(ep.feed(np.zeros(1500, np.float32))) == [
        ("cut", 1000, 1000),
        ("start", 1000, 1000),
        ("cut", 2000, 2000),
        ("start", 2000, 2000),
    ]
    assert ep.safe_horizon() == 2500 and ep.pending_end() is None
    ep.close(2500)
    assert list(ep.feed(np.zeros(1000, np.float32))) == [] and ep.start == 2500


def test_window_endpointer_cuts_not_taken_are_found_at_the_next_feed():
    """If answering a cut fails, feed() raises mid-way: the cuts after it must not be lost."""
    ep = WindowEndpointer(max_samples=1000)
    events = iter(ep.feed(np.zeros(3500, np.float32)))
    assert next(events) == ("cut", 1000, 1000)  # the session fails here and abandons the rest
    assert list(ep.feed(np.zeros(0, np.float32))) == [
        ("cut", 2000, 2000),
        ("start", 2000, 2000),
        ("cut", 3000, 3000),
        ("start", 3000, 3000),
    ]


def test_audio_buffer_places_utterances_and_stays_bounded():
    now = [100.0]
    buf = AudioBuffer(16000, lambda: now[0], continuous=False)
    assert buf.start is None and buf.lag_s == 0.0
    buf.append(np.ones(40000, np.float32), 16000)
    assert buf.end == 40000 and buf.lag_s == 0.0  # 2.5 s of audio at wall time 0: ahead of real time
    buf.trim_silence()  # between utterances: only the last second is kept
    assert buf.origin == 24000 and len(buf.samples) == 16000
    assert buf.begin(10000) == 24000  # a speech pad never reaches into audio already dropped
    buf.consume(30000, forced=False)
    assert (buf.origin, buf.start, len(buf.samples)) == (30000, None, 10000)
    buf.consume(32000, forced=True)  # a forced cut: the speech goes on as the next utterance
    assert buf.start == 32000 and np.array_equal(buf.between(32000, 33000), np.ones(1000, np.float32))
    now[0] = 104.0  # 4 s of wall time for 2.5 s of audio
    assert buf.lag_s == pytest.approx(1.5)
    continuous = AudioBuffer(16000, lambda: 0.0, continuous=True)
    assert continuous.start == 0
    continuous.append(np.ones(100, np.float32), 16000)
    continuous.consume(100, forced=False)
    assert continuous.start == 100  # without VAD the next utterance starts where the last ended


class _Turn:
    def __init__(self, audio_done: int = 0):
        self.audio_done = audio_done


def test_speculation_is_kept_for_its_endpoint_and_dropped_when_speech_resumes():
    spec = Speculation(enabled=True)
    turn, calls = _Turn(), []
    prefill = lambda t: calls.append(t) or "prefilled"
    spec.update(None, lambda: turn, fed=0, start=0, prefill=prefill)  # speech goes on: nothing to do
    spec.update(5000, lambda: turn, fed=4999, start=0, prefill=prefill)  # mel not fed up to the end yet
    assert calls == [] and spec.runs == 0
    spec.update(5000, lambda: turn, fed=5000, start=0, prefill=prefill)
    spec.update(5000, lambda: turn, fed=6000, start=0, prefill=prefill)  # same end, same audio: not redone
    assert calls == [turn] and spec.runs == 1
    assert spec.take(5000, 0) == "prefilled" and spec.take(5000, 8) is None and spec.take(4000, 0) is None
    spec.update(None, lambda: turn, fed=6000, start=0, prefill=prefill)  # speech resumed
    assert spec.discarded == 1 and spec.take(5000, 0) is None
    spec.update(None, lambda: turn, fed=6000, start=0, prefill=prefill)
    assert spec.discarded == 1  # nothing was pending the second time


def test_a_refused_speculation_is_recorded_as_none_and_disabled_speculation_still_begins_the_turn():
    def refuse(t):
        raise LimitError("does not fit")

    spec = Speculation(enabled=True)
    spec.update(5000, _Turn, fed=5000, start=0, prefill=refuse)
    assert spec.runs == 0 and spec.take(5000, 0) is None
    begun: list = []
    off = Speculation(enabled=False)
    off.update(5000, lambda: begun.append(1) or _Turn(), fed=5000, start=0, prefill=refuse)
    assert begun == [1] and off.runs == 0  # the turn's prefix is prefilled ahead either way
    spec.update(100, _Turn, fed=5000, start=100, prefill=lambda t: "x")  # an empty utterance: nothing
    assert spec.runs == 0


def _fail(message: str) -> None:
    raise LimitError(message)


def test_answer_worker_inline_keeps_an_error_until_the_feeding_thread_asks():
    w: AnswerWorker[str] = AnswerWorker(background=False)
    w.run(lambda: w.publish("a"))
    w.run(lambda: _fail("first"))
    w.run(lambda: _fail("second"))
    w.join(raise_error=False)
    assert w.drain() == ["a"] and not w.busy
    with pytest.raises(LimitError, match="first"):  # the first error, once
        w.raise_pending()
    w.raise_pending()


def test_answer_worker_background_cancel_put_back_and_stop():
    w: AnswerWorker[str] = AnswerWorker(background=True)
    started, seen_stop = threading.Event(), []

    def answer():
        started.set()
        while not w.stop_requested():
            threading.Event().wait(0.001)
        seen_stop.append(True)
        w.publish("cancelled")

    w.run(answer)
    started.wait(5)
    assert w.busy
    w.cancel()
    w.join()
    assert seen_stop == [True] and not w.busy
    w.publish("later")
    got = w.drain()
    assert got == ["cancelled", "later"]
    w.put_back(got[:1])
    w.publish("newest")
    assert w.drain() == ["cancelled", "newest"]
    w.run(lambda: w.publish("x"))
    w.stop()  # a session reset: the answer's turn is forgotten
    assert w.drain() == [] and not w.busy
