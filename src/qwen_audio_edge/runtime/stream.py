"""Streaming input: live PCM chunks in, answers out, with the work done while the person is speaking.

`StreamSession` (from `pipeline.stream(...)`) keeps a conversation open. At the start of every turn it
prefills the prompt prefix (system turn, `<|im_start|>user\\nAudio 1: <|audio_bos|>`) — the same prefix
path the offline `run` uses, so both do identical arithmetic. While audio arrives the log-mel advances
incrementally (unclamped; the Whisper clamp is applied at the end, bit-identical to the batch front end).
The utterance ends either by `end()` (push-to-talk) or by VAD endpointing (silero-vad, VADIterator
semantics): then only the encoder, the prefill of the audio + suffix and the decode remain.

The data path, one module per step:
  runtime/endpointing.py   where utterances start and end (silero-vad, or `vad=None`: `end()` and the window)
  runtime/stream_buffer.py the audio kept until placed, the incremental mel, chunked blocks prefilled early
  runtime/speculation.py   encode + prefill in the endpointer's silence window, kept or dropped
  runtime/answer_worker.py answers inline or on the barge-in worker thread; finished turns queued
  runtime/stream.py        this file: the options and the session that passes each step what it needs

Modes (`StreamOptions.mode`):
- **exact** (default): output equals the offline pipeline on the same utterance audio (with VAD: the
  speech span plus its padding). With VAD the utterance is fully known `speech_pad_ms` after speech
  stops while the endpointer still waits `min_silence_ms`: in that window the encoder and the audio +
  suffix prefill run speculatively, kept if the endpoint is confirmed, dropped if speech resumes.
- **chunked** (opt-in): the block-wise encoder of runtime/chunked.py; every finished block is encoded
  and prefilled into the KV cache while the person is still speaking, so at the end only the last
  partial block and the prompt suffix remain. This changes the model's computation (measure it with
  `qwen-audio-edge compare ARTIFACTS --chunked 2`).

Barge-in (`barge_in=True`): answers are generated on a worker thread while `feed()` keeps taking audio;
speech detected during an answer cancels it (finish_reason "cancelled"; the partial answer stays in the
conversation) and the speech becomes the next turn.

Long streams: an utterance is cut at `VadOptions.max_speech_s` (without VAD: at one 30 s encoder
window) and continues as the next turn; the conversation follows its context policy (default
"drop_oldest": the oldest exchanges make room, see `Conversation`). Back-pressure: the session measures
how far it lags behind real time (`lag_s`: wall time since the first chunk minus audio time received,
meaningful for a live source). Above `max_lag_s` it stops speculating (work that might be thrown away)
and coalesces pending work (mel frames, chunked blocks) into single calls; audio is never dropped.
Memory stays bounded: silence is trimmed, an utterance is at most one window, the context is capped.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .answer_worker import AnswerWorker
from .chunked import DEFAULT_CHUNK_S, DEFAULT_LOOKAHEAD_S, block_frames, fidelity_note, lookahead_frames
from .endpointing import Endpointer, SileroVad, StreamEndpointer, VadOptions, WindowEndpointer, make_endpointer
from .errors import OptionsError, QwenAudioEdgeError
from .generate import SamplingOptions
from .speculation import Speculation
from .stream_buffer import AudioBuffer, UtteranceFeatures

if TYPE_CHECKING:
    from .audio import IncrementalMel, MelFrontEnd
    from .pipeline import Conversation, MelInput, PendingTurn, Pipeline, PrefilledTurn, TurnResult

__all__ = ["Endpointer", "SileroVad", "StreamEvent", "StreamOptions", "StreamSession", "VadOptions", "WindowEndpointer"]

DEFAULT_VAD = VadOptions()  # a session's endpointing unless told otherwise (frozen: safe to share as a default)


@dataclass(frozen=True)
class StreamOptions:
    """How a stream session works; see the module docstring.

    mode: "exact" (output equals the offline run) or "chunked" (block-wise encoder, opt-in).
    chunk_seconds: chunked-mode block length, a multiple of 0.04 s (default 3 s).
    lookahead_seconds: chunked mode: audio after a block that its tokens also attend to (default 2 s); a
      block is final, and prefilled, that long after it ends, so at most block + look-ahead of audio is
      left at the end of an utterance. Measured trade-offs: runtime/chunked.py, docs/fidelity.md.
    speculate: with VAD, encode + prefill in the endpointer's silence window (exact and chunked).
    barge_in: generate answers on a worker thread; speech during an answer cancels it.
    context_policy: "drop_oldest" (default) or "error" when a turn does not fit in max_context.
    max_lag_s: behind real time by more than this, stop speculating and coalesce work.
    """

    mode: str = "exact"
    chunk_seconds: float = DEFAULT_CHUNK_S
    lookahead_seconds: float = DEFAULT_LOOKAHEAD_S
    speculate: bool = True
    barge_in: bool = False
    context_policy: str = "drop_oldest"
    max_lag_s: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in ("exact", "chunked"):
            raise OptionsError(f"stream mode must be exact or chunked, got {self.mode!r}")
        if not self.chunk_seconds > 0:
            raise OptionsError(f"--chunk-seconds must be > 0, got {self.chunk_seconds}")
        if not (self.lookahead_seconds >= 0 and math.isfinite(self.lookahead_seconds)):
            raise OptionsError(f"--lookahead-seconds must be ≥ 0, got {self.lookahead_seconds}")
        if self.context_policy not in ("drop_oldest", "error"):
            raise OptionsError(f"context policy must be drop_oldest or error, got {self.context_policy!r}")
        if not self.max_lag_s > 0:
            raise OptionsError(f"max_lag_s must be > 0, got {self.max_lag_s}")


@dataclass
class StreamEvent:
    """A finished turn, with when its endpoint was decided (audio time) and the wall-clock latencies."""

    result: TurnResult
    speech_start_s: float
    speech_end_s: float
    decided_at_s: float  # audio time at which the endpoint was decided (VAD) or end() was called
    endpoint_wall: float
    first_token_wall: float | None
    mode: str = "exact"
    lag_s: float = 0.0  # how far the session lagged behind real time at the endpoint (live sources)
    forced: bool = False  # cut at the maximum utterance length; the speech continues as the next turn

    @property
    def cancelled(self) -> bool:
        return self.result.finish_reason == "cancelled"

    def to_json(self) -> dict:
        d = self.result.to_json()
        d["stream"] = {
            "mode": self.mode,
            "speech_start_s": round(self.speech_start_s, 3),
            "speech_end_s": round(self.speech_end_s, 3),
            "endpoint_decided_at_s": round(self.decided_at_s, 3),
            "ttft_after_endpoint_ms": None
            if self.first_token_wall is None
            else round(1000 * (self.first_token_wall - self.endpoint_wall), 3),
            "lag_s": round(self.lag_s, 3),
            "forced_endpoint": self.forced,
            "cancelled": self.cancelled,
        }
        return d


@dataclass
class _Job:
    """An ended utterance waiting for its answer: the turn, and either its prefill or its encoder inputs."""

    turn: PendingTurn
    mels: list[MelInput] | None
    prefilled: PrefilledTurn | None  # from speculation
    start: int
    end: int
    decided: int
    t_end: float
    lag: float
    forced: bool

    def answer(
        self,
        conv: Conversation,
        sampling: SamplingOptions,
        on_text: Callable[[str], None] | None,
        should_stop: Callable[[], bool],
        sr: int,
        mode: str,
    ) -> StreamEvent:
        """Decode the answer (streamed through `on_text`) and return the turn event. The first token's wall
        time comes from the turn's own TTFT, else from when the first text arrived."""
        first: list[float] = []

        def text(piece: str) -> None:
            if not first:
                first.append(time.perf_counter())
            if on_text:
                on_text(piece)

        result = conv.finish_turn(
            self.turn,
            self.mels,
            sampling=sampling,
            on_text=text,
            t0=self.t_end,
            prefilled=self.prefilled,
            should_stop=should_stop,
        )
        ttft = result.timings.get("ttft_ms")
        return StreamEvent(
            result=result,
            speech_start_s=self.start / sr,
            speech_end_s=self.end / sr,
            decided_at_s=max(self.decided, self.end) / sr,
            endpoint_wall=self.t_end,
            first_token_wall=self.t_end + ttft / 1000 if ttft is not None else (first[0] if first else None),
            mode=mode,
            lag_s=self.lag,
            forced=self.forced,
        )


def _chunked_layout(options: StreamOptions, front: MelFrontEnd) -> tuple[int | None, int]:
    """Chunked mode's (block, look-ahead) in mel frames ((None, 0) in exact mode); warns where the setting
    is measured to miss the fidelity targets, or was not measured (runtime/chunked.py)."""
    if options.mode != "chunked":
        return None, 0
    block = block_frames(options.chunk_seconds, front)
    lookahead = lookahead_frames(options.lookahead_seconds, front)
    note = fidelity_note(options.chunk_seconds, options.lookahead_seconds)
    if note:
        warnings.warn(note, UserWarning, stacklevel=3)  # at the caller of StreamSession(...), as before
    return block, lookahead


class StreamSession:
    """Chunks in (`feed`), turns out; `end()` closes the current utterance (push-to-talk, or `vad=None`).

    Without barge-in everything runs on the caller's thread and `feed()` returns the turns its audio
    finished. With barge-in, answers run on one worker thread: `feed()` returns the turns finished since
    the last call, `wait()` blocks for the answer in progress, `cancel()` stops it; `on_event` is called
    (from the worker) as each turn finishes. The session is not itself thread-safe: feed it from one thread.

    The session owns the conversation and the pending turn; each step of the data path (endpointer,
    audio buffer, utterance features, speculation, answer worker) owns its state and is handed the rest.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        prompt: str | None = None,
        *,
        sampling: SamplingOptions | None = None,
        vad: VadOptions | None = DEFAULT_VAD,
        on_text: Callable[[str], None] | None = None,
        options: StreamOptions = StreamOptions(),
        on_event: Callable[[StreamEvent], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.p = pipeline
        self.options = options
        self.prompt = prompt
        self.sampling = sampling or pipeline.default_sampling()
        self.on_text = on_text
        self.on_event = on_event
        self.vad_options = vad
        self.clock = clock
        self.sr: int = pipeline.mel.config.sampling_rate
        self.block, self.lookahead = _chunked_layout(options, pipeline.mel)  # frames per block, look-ahead frames
        self.max_utterance = int(vad.max_speech_s * self.sr) if vad else pipeline.mel.config.n_samples
        self._answers: AnswerWorker[StreamEvent] = AnswerWorker(background=options.barge_in)
        self.reset()

    # --- lifecycle --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation and start a new one (a fresh KV cache owner)."""
        self._answers.stop()  # the answer in progress is cancelled; a failure it had is moot now
        self.conv: Conversation = self.p.chat(self.options.context_policy)
        self.endpointer: StreamEndpointer = make_endpointer(self.vad_options, self.max_utterance)
        self._speculation = Speculation(self.options.speculate)
        self.cancelled = 0  # answers cut short by barge-in or cancel()
        self.audio = AudioBuffer(self.sr, self.clock, continuous=not self.endpointer.uses_vad)
        self._new_utterance()
        self.turn: PendingTurn | None = self._begin_turn()

    def _new_utterance(self) -> None:
        self.features = UtteranceFeatures(self.p, self.block, self.lookahead)
        self._speculation.clear()

    def _begin_turn(self) -> PendingTurn:
        # The next turn's prompt prefix is prefilled right away, before any of its audio (work ahead).
        return self.conv.begin_turn(
            self.prompt, 1, reserve=self.sampling.max_new_tokens, blockwise=self.block is not None
        )

    @property
    def speculations(self) -> int:
        """Speculative encode + prefill runs (see runtime/speculation.py)."""
        return self._speculation.runs

    @property
    def discarded(self) -> int:
        """Speculations dropped because speech resumed."""
        return self._speculation.discarded

    @property
    def lag_s(self) -> float:
        """Wall time since the first chunk minus audio time received (≥ 0): how far behind a live source we are."""
        return self.audio.lag_s

    @property
    def busy(self) -> bool:
        """An answer is being generated on the worker thread."""
        return self._answers.busy

    @property
    def mel(self) -> IncrementalMel:
        """The current utterance's incremental log-mel."""
        return self.features.mel

    # The buffered audio under its names from before the split (read by tests/test_stream_session.py).
    _samples = property(lambda self: self.audio.samples)
    _origin = property(lambda self: self.audio.origin)

    def cancel(self) -> None:
        """Stop the answer in progress (if any) after its current token."""
        self._answers.cancel()

    def wait(self) -> list[StreamEvent]:
        """Block until the answer in progress (if any) is done; returns the turns not returned yet."""
        self._answers.join()
        return self._answers.drain()

    # --- audio in ---------------------------------------------------------------------------------
    def feed(self, pcm: Any, sampling_rate: int | None = None) -> list[StreamEvent]:
        """Add audio (any chunk size; any rate, resampled as a stream). Returns the turns finished since the
        last call (with barge-in, the answers are produced in the background and returned by a later call)."""
        chunk = self.audio.append(pcm, sampling_rate or self.sr)
        continuation = False
        for kind, at, decided in self.endpointer.feed(chunk):
            if kind == "start":
                # Barge-in: the person speaks over the answer. Not after a forced cut: that is the same speech going on.
                if self.options.barge_in and not continuation:
                    self.cancel()
                self.features.restart_at(self.audio.begin(at))
                continuation = False
            else:
                self.features.feed_until(self.audio, at)
                self._finish(at, decided, forced=kind == "cut")
                continuation = kind == "cut"
        if self.audio.start is not None:
            self.features.feed_until(self.audio, self.endpointer.safe_horizon())
            self._work_ahead()
        else:
            self.audio.trim_silence()  # silence: keep only what a speech pad could reach back to
        self._answers.raise_pending()
        return self._answers.drain()

    # --- work while the person speaks ---------------------------------------------------------------
    def _work_ahead(self) -> None:
        """Chunked blocks and speculation. Skipped while the worker answers (they need the decoder; the
        blocks wait and are coalesced later), and speculation is skipped while lagging behind real time."""
        if self.busy:
            return
        self._answers.join()  # collect a finished worker (and its error, if any)
        extended = self.features.work_ahead(self.p, self.conv, self._ensure_turn, self.sampling.max_new_tokens)
        if extended is not None:
            self.turn = extended
        if self.endpointer.uses_vad and self.lag_s <= self.options.max_lag_s:
            # In the silence the endpointer must wait out, the utterance is already fully known: encode and
            # prefill it now; kept if the endpoint is confirmed at that sample, dropped if speech resumes.
            self._speculation.update(
                self.endpointer.pending_end(),
                self._ensure_turn,
                self.features.fed,
                self.audio.start or 0,
                lambda turn: self.conv.prefill_turn(
                    turn, self.features.tail_inputs(), reserve=self.sampling.max_new_tokens
                ),
            )

    def _ensure_turn(self) -> PendingTurn:
        """The pending turn, begun now if beginning it after the last answer failed (e.g. context full)."""
        if self.turn is None:
            self.turn = self._begin_turn()
        return self.turn

    def send_text(self, text: str) -> TurnResult:
        """A typed (text-only) turn in the same conversation, between spoken ones; returns its TurnResult.

        Refused while an utterance is in progress (end it first). The answer streams through `on_text`.
        """
        if self.audio.start is not None and self.mel.n > 0:
            raise OptionsError("an utterance is in progress: end() it before a text turn")
        self._answers.join()
        try:
            return self.conv.send(None, text, sampling=self.sampling, on_text=self.on_text)
        finally:
            if not self.conv.failed:
                self._new_utterance()
                self.turn = self._begin_turn()  # the next spoken turn's prefix, prefilled again

    # --- end of an utterance ----------------------------------------------------------------------
    def end(self) -> StreamEvent | None:
        """Close the current utterance now (push-to-talk) and answer it (waits for the answer).

        Returns None when no speech was captured. Turns finished earlier by VAD and not yet returned are
        kept for the next `feed()`/`wait()`."""
        if self.audio.start is None:
            self._answers.join()
            return None  # VAD saw no speech: no audio prompt, no answer
        end = self.audio.end
        self.features.feed_until(self.audio, end)
        if self.mel.n == 0:
            self._answers.join()
            return None
        self.endpointer.close(end)
        self._finish(end, end)
        self._answers.join()
        events = self._answers.drain()
        mine = events.pop()  # the last turn finished is this utterance's (earlier ones were joined first)
        self._answers.put_back(events)  # returned by the next feed()/wait()
        return mine

    def _finish(self, end: int, decided: int, forced: bool = False) -> None:
        """The utterance [start, end) is over: answer it (inline, or on the worker with barge-in)."""
        t_end = time.perf_counter()
        self._answers.join(raise_error=False)  # an earlier answer's error is raised once this utterance is committed
        start = self.audio.start or 0
        turn = self.turn
        if turn is None:  # beginning it after the last answer failed; if that fails again the user sees why
            try:
                turn = self._ensure_turn()
            except QwenAudioEdgeError:
                self._start_next_utterance(end, forced)
                raise
        prefilled = self._speculation.take(end, turn.audio_done)
        job = _Job(
            turn=turn,
            mels=None if prefilled else self.features.tail_inputs(),
            prefilled=prefilled,
            start=start,
            end=end,
            decided=decided,
            t_end=t_end,
            lag=self.lag_s,
            forced=forced,
        )
        self._start_next_utterance(end, forced)
        self.turn = None  # the answer begins the next turn (prefix prefilled right after it)
        self._answers.run(lambda: self._answer(job))

    def _start_next_utterance(self, end: int, forced: bool) -> None:
        self.audio.consume(end, forced)  # the next utterance starts at `end`, or at the next VAD start
        self._new_utterance()

    def _answer(self, job: _Job) -> None:
        """Answer an ended utterance, publish its event, and prefill the next turn's prefix."""
        try:
            event = job.answer(
                self.conv, self.sampling, self.on_text, self._answers.stop_requested, self.sr, self.options.mode
            )
        except QwenAudioEdgeError:
            if not self.conv.failed:  # e.g. a turn too long for the context: refused, the session goes on
                self.turn = self._begin_turn()
            raise
        self.cancelled += event.cancelled
        self._answers.publish(event)
        try:
            if self.on_event:
                self.on_event(event)
        finally:
            self.turn = self._begin_turn()  # work ahead: the next prefix, before any of its audio
