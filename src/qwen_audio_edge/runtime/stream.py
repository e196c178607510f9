"""Streaming input: live PCM chunks in, answers out, with the work done while the person is speaking.

`StreamSession` (from `pipeline.stream(...)`) keeps a conversation open. At the start of every turn it
prefills the prompt prefix (system turn, `<|im_start|>user\\nAudio 1: <|audio_bos|>`) — the same prefix
path the offline `run` uses, so both do identical arithmetic. While audio arrives the log-mel advances
incrementally (unclamped; the Whisper clamp is applied at the end, bit-identical to the batch front end).
The utterance ends either by `end()` (push-to-talk) or by VAD endpointing (silero-vad, VADIterator
semantics): then only the encoder, the prefill of the audio + suffix and the decode remain.

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
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import IncrementalMel, prepare_waveform
from .block_encoder import BlockBatch
from .chunked import DEFAULT_CHUNK_S, DEFAULT_LOOKAHEAD_S, BlockStream, block_frames, fidelity_note, lookahead_frames
from .errors import OptionsError, QwenAudioEdgeError
from .generate import SamplingOptions


@dataclass(frozen=True)
class VadOptions:
    """silero-vad endpointing, with defaults suited to conversation.

    threshold: speech probability that starts speech; speech ends after `min_silence_ms` below
    threshold − 0.15. The utterance is the speech span plus `speech_pad_ms` on each side, so it is
    fully known `speech_pad_ms` after speech stops while the endpointer still waits `min_silence_ms`.
    `max_speech_s` forces an endpoint (one encoder window is 30 s).
    """

    threshold: float = 0.5
    min_silence_ms: int = 500
    speech_pad_ms: int = 100
    max_speech_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise OptionsError(f"VAD threshold must be in (0, 1), got {self.threshold}")
        if self.min_silence_ms < 0 or self.speech_pad_ms < 0:
            raise OptionsError("VAD min_silence_ms and speech_pad_ms must be ≥ 0")
        if not 0 < self.max_speech_s <= 30:
            raise OptionsError(f"max_speech_s must be in (0, 30] (one encoder window), got {self.max_speech_s}")


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


class SileroVad:
    """silero-vad's ONNX model (shipped in the `silero-vad` package) on ONNX Runtime: 512-sample frames at 16 kHz."""

    FRAME = 512
    CONTEXT = 64

    def __init__(self):
        import importlib.util

        import onnxruntime as ort

        # Locate the package's model file without importing the package: importing silero_vad runs
        # torch.set_num_threads(1) for the whole process (measured: it halved our decode threads).
        spec = importlib.util.find_spec("silero_vad")
        if spec is None or not spec.submodule_search_locations:
            raise OptionsError("VAD needs the silero-vad package (pip install silero-vad), or use --no-vad")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "silero_vad.onnx"
        if not path.is_file():
            raise OptionsError(f"silero-vad is installed but its model file {path} is missing; reinstall silero-vad")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.reset()

    def reset(self) -> None:
        self.state = np.zeros((2, 1, 128), dtype=np.float32)
        self.context = np.zeros((1, self.CONTEXT), dtype=np.float32)

    def __call__(self, frame: np.ndarray) -> float:
        x = np.concatenate([self.context, frame.reshape(1, self.FRAME).astype(np.float32)], axis=1)
        prob, self.state = self.session.run(None, {"input": x, "state": self.state, "sr": np.array(16000, dtype=np.int64)})
        self.context = x[:, -self.CONTEXT :]
        return float(prob.reshape(-1)[0])


class Endpointer:
    """VADIterator semantics over a sample stream: yields ("start", sample) and ("end", sample) events."""

    def __init__(self, opts: VadOptions, vad: SileroVad | None = None, sample_rate: int = 16000):
        self.o = opts
        self.vad = vad or SileroVad()
        self.pad = opts.speech_pad_ms * sample_rate // 1000
        self.min_silence = opts.min_silence_ms * sample_rate // 1000
        self.max_speech = int(opts.max_speech_s * sample_rate)
        self.buffer = np.zeros(0, np.float32)
        self.current = 0  # samples consumed by the VAD
        self.triggered = False
        self.temp_end = 0
        self.start = 0

    def feed(self, pcm: np.ndarray) -> list[tuple[str, int, int]]:
        """Events (kind, sample of the utterance boundary, sample at which it was decided).

        kind: "start", "end", or "cut" (a forced end at max_speech; a "start" at the same sample follows).
        """
        events = []
        self.buffer = np.concatenate([self.buffer, pcm])
        frame = SileroVad.FRAME
        while len(self.buffer) >= frame:
            if self.triggered and self.current + frame - self.start > self.max_speech:
                if self.temp_end:
                    # Speech already stopped: the window cap only cuts the silence wait short.
                    events.append(("end", min(self.current, self.temp_end + self.pad - frame), self.current))
                    self.triggered, self.temp_end = False, 0
                else:
                    # Forced endpoint before the utterance would exceed max_speech (one encoder window); the
                    # speech goes on as a new utterance starting exactly there (no audio counted twice).
                    events += [("cut", self.current, self.current), ("start", self.current, self.current)]
                    self.start = self.current
            chunk, self.buffer = self.buffer[:frame], self.buffer[frame:]
            self.current += frame
            prob = self.vad(chunk)
            if prob >= self.o.threshold and self.temp_end:
                self.temp_end = 0
            if prob >= self.o.threshold and not self.triggered:
                self.triggered = True
                self.start = max(0, self.current - self.pad - frame)
                events.append(("start", self.start, self.current))
                continue
            if prob < self.o.threshold - 0.15 and self.triggered:
                if not self.temp_end:
                    self.temp_end = self.current
                if self.current - self.temp_end >= self.min_silence:
                    events.append(("end", min(self.current, self.temp_end + self.pad - frame), self.current))
                    self.triggered, self.temp_end = False, 0
        return events

    def safe_horizon(self) -> int:
        """No utterance end can come before this sample: audio up to it may enter the mel already."""
        base = self.temp_end if self.temp_end else self.current
        return min(self.current, base + self.pad - SileroVad.FRAME)


@dataclass
class StreamEvent:
    """A finished turn, with when its endpoint was decided (audio time) and the wall-clock latencies."""

    result: object  # TurnResult
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
            "ttft_after_endpoint_ms": None if self.first_token_wall is None
            else round(1000 * (self.first_token_wall - self.endpoint_wall), 3),
            "lag_s": round(self.lag_s, 3),
            "forced_endpoint": self.forced,
            "cancelled": self.cancelled,
        }
        return d


@dataclass
class _Job:
    """An ended utterance waiting for its answer: the turn, and either its prefill or its encoder inputs."""

    turn: object  # PendingTurn
    mels: list | None
    prefilled: object | None  # PrefilledTurn from speculation
    start: int
    end: int
    decided: int
    t_end: float
    lag: float
    forced: bool


class StreamSession:
    """Chunks in (`feed`), turns out; `end()` closes the current utterance (push-to-talk, or `vad=None`).

    Without barge-in everything runs on the caller's thread and `feed()` returns the turns its audio
    finished. With barge-in, answers run on one worker thread: `feed()` returns the turns finished since
    the last call, `wait()` blocks for the answer in progress, `cancel()` stops it; `on_event` is called
    (from the worker) as each turn finishes. The session is not itself thread-safe: feed it from one thread.
    """

    def __init__(self, pipeline, prompt: str | None = None, *, sampling: SamplingOptions | None = None,
                 vad: VadOptions | None = VadOptions(), on_text: Callable[[str], None] | None = None,
                 options: StreamOptions = StreamOptions(), on_event: Callable[[StreamEvent], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.p = pipeline
        self.options = options
        self.prompt = prompt
        self.sampling = sampling or pipeline.default_sampling()
        self.on_text = on_text
        self.on_event = on_event
        self.vad_options = vad
        self.clock = clock
        self.sr = pipeline.mel.config.sampling_rate
        self.block = block_frames(options.chunk_seconds, pipeline.mel) if options.mode == "chunked" else None
        self.lookahead = lookahead_frames(options.lookahead_seconds, pipeline.mel) if self.block else 0
        note = fidelity_note(options.chunk_seconds, options.lookahead_seconds) if self.block else None
        if note:
            warnings.warn(note, UserWarning, stacklevel=2)
        self.max_utterance = int(vad.max_speech_s * self.sr) if vad else pipeline.mel.config.n_samples
        self._worker: threading.Thread | None = None
        self._worker_error: BaseException | None = None
        self._cancel = threading.Event()
        self._done: list[StreamEvent] = []
        self._lock = threading.Lock()
        self.conv = None
        self.reset()

    # --- lifecycle --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation and start a new one (a fresh KV cache owner)."""
        if self._worker is not None:  # stop the answer in progress; a failure it had is moot now
            self._cancel.set()
            self._worker.join()
        self._worker, self._worker_error = None, None
        self.conv = self.p.chat(self.options.context_policy)
        self.endpointer = Endpointer(self.vad_options) if self.vad_options else None
        self.speculations = 0  # speculative encode+prefill runs, and how many were discarded (speech resumed)
        self.discarded = 0
        self.cancelled = 0  # answers cut short by barge-in or cancel()
        self._resampler = None
        self._in_rate: int | None = None
        self._samples = np.zeros(0, np.float32)  # audio since _origin (the current utterance, or recent silence)
        self._origin = 0  # absolute sample index of _samples[0]
        self._arrived = 0  # samples received since the session started (16 kHz)
        self._t_first: float | None = None
        self._utt_start: int | None = None if self.endpointer else 0
        self._done = []
        self._new_utterance()
        self.turn = self._begin_turn()

    def _new_utterance(self) -> None:
        self.mel = IncrementalMel(self.p.mel)
        self.blocks = BlockStream(self.mel, self.block, self.lookahead) if self.block else None
        self.block_encoder = self.p.block_encoder() if self.block else None  # holds the final blocks' keys/values
        self._fed = 0  # absolute sample index up to which the mel has been fed
        self._spec = None  # (utterance end sample, audio_done, PrefilledTurn | None): speculative work for a possible endpoint
        self._blocks_deferred = False  # chunked blocks could not be prefilled: leave them for the end

    def _begin_turn(self):
        # The next turn's prompt prefix is prefilled right away, before any of its audio (work ahead).
        return self.conv.begin_turn(self.prompt, 1, reserve=self.sampling.max_new_tokens, blockwise=self.block is not None)

    @property
    def lag_s(self) -> float:
        """Wall time since the first chunk minus audio time received (≥ 0): how far behind a live source we are."""
        if self._t_first is None:
            return 0.0
        return max(0.0, self.clock() - self._t_first - self._arrived / self.sr)

    @property
    def busy(self) -> bool:
        """An answer is being generated on the worker thread."""
        return self._worker is not None and self._worker.is_alive()

    def cancel(self) -> None:
        """Stop the answer in progress (if any) after its current token."""
        if self.busy:
            self._cancel.set()

    def wait(self) -> list[StreamEvent]:
        """Block until the answer in progress (if any) is done; returns the turns not returned yet."""
        self._join()
        return self._drain()

    def _join(self, raise_error: bool = True) -> None:
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        if raise_error:
            self._raise_pending()

    def _raise_pending(self) -> None:
        """Raise the error an answer ended with (kept until the feeding thread is between events)."""
        if self._worker_error is not None:
            err, self._worker_error = self._worker_error, None
            raise err

    def _drain(self) -> list[StreamEvent]:
        with self._lock:
            out, self._done = self._done, []
        return out

    # --- audio in ---------------------------------------------------------------------------------
    def _to_16k(self, pcm, sampling_rate: int) -> np.ndarray:
        data = np.asarray(pcm)
        if sampling_rate == self.sr:
            return prepare_waveform(data, self.sr, self.sr, source="stream chunk") if data.size else np.zeros(0, np.float32)
        import soxr

        if self._resampler is None or self._in_rate != sampling_rate:
            self._resampler = soxr.ResampleStream(sampling_rate, self.sr, 1, dtype="float32", quality="HQ")
            self._in_rate = sampling_rate
        mono = prepare_waveform(data, sampling_rate, sampling_rate, source="stream chunk") if data.size else np.zeros(0, np.float32)
        return self._resampler.resample_chunk(mono).astype(np.float32)

    def _feed_mel_until(self, until: int) -> None:
        if self._utt_start is None or until <= self._fed:
            return
        begin = max(self._fed, self._utt_start)
        a, b = begin - self._origin, until - self._origin
        if b > a:
            self.mel.feed(self._samples[a:b])
        self._fed = until

    def feed(self, pcm, sampling_rate: int | None = None) -> list[StreamEvent]:
        """Add audio (any chunk size; any rate, resampled as a stream). Returns the turns finished since the
        last call (with barge-in, the answers are produced in the background and returned by a later call)."""
        if self._t_first is None:
            self._t_first = self.clock()
        chunk = self._to_16k(pcm, sampling_rate or self.sr)
        self._arrived += len(chunk)
        self._samples = np.concatenate([self._samples, chunk])
        if self.endpointer is None:
            # No endpointing: the utterance runs until end(); once audio beyond one full window arrives, the
            # window is closed as a turn of its own and the audio goes on as the next one.
            while self._origin + len(self._samples) - self._utt_start > self.max_utterance:
                cut = self._utt_start + self.max_utterance
                self._feed_mel_until(cut)
                self._finish(cut, cut, forced=True)
            self._feed_mel_until(self._origin + len(self._samples))
            self._work_ahead()
            self._raise_pending()
            return self._drain()
        continuation = False
        for kind, at, decided in self.endpointer.feed(chunk):
            if kind == "start":
                # Barge-in: the person speaks over the answer. Not after a forced cut: that is the same speech going on.
                if self.options.barge_in and not continuation:
                    self.cancel()
                at = max(at, self._origin)  # never reach back into audio an earlier utterance (or end()) consumed
                self._utt_start = at
                self._fed = at
                continuation = False
            else:
                self._feed_mel_until(at)
                self._finish(at, decided, forced=kind == "cut")
                continuation = kind == "cut"
        if self._utt_start is not None:
            self._feed_mel_until(self.endpointer.safe_horizon())
            self._work_ahead()
        elif len(self._samples) > 2 * self.sr:  # silence: keep only what a speech pad could reach back to
            drop = len(self._samples) - self.sr
            self._samples = self._samples[drop:]
            self._origin += drop
        self._raise_pending()
        return self._drain()

    # --- work while the person speaks ---------------------------------------------------------------
    def _work_ahead(self) -> None:
        """Chunked blocks and speculation. Skipped while the worker answers (they need the decoder; the
        blocks wait and are coalesced later), and speculation is skipped while lagging behind real time."""
        if self.busy:
            return
        self._join()  # collect a finished worker (and its error, if any)
        if self.blocks is not None and not self._blocks_deferred:
            ready = self.blocks.ready()  # every block that became final: encoded, then prefilled in one call
            if ready:
                import torch

                encoder = self.block_encoder.fork()  # committed only once the blocks are in the KV cache
                try:
                    self.turn = self.conv.extend_audio(self._ensure_turn(), torch.cat(self.p.encode_mels([BlockBatch(encoder, tuple(ready))])),
                                                       reserve=self.sampling.max_new_tokens)
                    self.block_encoder = encoder
                except QwenAudioEdgeError:
                    # E.g. the utterance outgrew the context: the blocks stay pending for the end of the
                    # utterance, where the turn is refused once with this error (not at every chunk).
                    self.blocks.done -= len(ready)
                    self._blocks_deferred = True
        if self.endpointer is not None and self.lag_s <= self.options.max_lag_s:
            self._maybe_speculate()

    def _maybe_speculate(self) -> None:
        """In the silence the endpointer must wait out, the utterance is already fully known: encode it and
        prefill it now. Kept if the endpoint is confirmed at that sample; dropped if speech resumes."""
        ep = self.endpointer
        if not ep.temp_end:
            if self._spec is not None:
                self.discarded += 1  # speech resumed: the speculation is stale
            self._spec = None
            return
        h = ep.temp_end + ep.pad - SileroVad.FRAME
        done = self._ensure_turn().audio_done
        if (not self.options.speculate or self._fed < h or (self._spec and self._spec[:2] == (h, done))
                or h <= (self._utt_start or 0)):
            return
        try:
            prefilled = self.conv.prefill_turn(self.turn, self._tail_inputs(), reserve=self.sampling.max_new_tokens)
        except QwenAudioEdgeError:
            prefilled = None  # speculation is optional: the endpoint does the work and reports the error then
        self._spec = (h, done, prefilled)
        self.speculations += prefilled is not None

    def _ensure_turn(self):
        """The pending turn, begun now if beginning it after the last answer failed (e.g. context full)."""
        if self.turn is None:
            self.turn = self._begin_turn()
        return self.turn

    def _tail_inputs(self) -> list:
        """Encoder inputs still to encode at the end of the utterance (does not consume the mel state)."""
        if self.blocks is None:
            return [self.mel.finish()]
        return [BlockBatch(self.block_encoder.fork(), tuple(self.blocks.tail()))]

    def send_text(self, text: str):
        """A typed (text-only) turn in the same conversation, between spoken ones; returns its TurnResult.

        Refused while an utterance is in progress (end it first). The answer streams through `on_text`.
        """
        if self._utt_start is not None and self.mel.n > 0:
            raise OptionsError("an utterance is in progress: end() it before a text turn")
        self._join()
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
        if self._utt_start is None:
            self._join()
            return None  # VAD saw no speech: no audio prompt, no answer
        end = self._origin + len(self._samples)
        self._feed_mel_until(end)
        if self.mel.n == 0:
            self._join()
            return None
        if self.endpointer:
            self.endpointer.triggered, self.endpointer.temp_end = False, 0
        self._finish(end, end)
        self._join()
        events = self._drain()
        mine = events.pop()  # the last turn finished is this utterance's (earlier ones were joined first)
        with self._lock:
            self._done = events + self._done  # returned by the next feed()/wait()
        return mine

    def _finish(self, end: int, decided: int, forced: bool = False) -> None:
        """The utterance [start, end) is over: answer it (inline, or on the worker with barge-in)."""
        t_end = time.perf_counter()
        self._join(raise_error=False)  # an earlier answer's error is raised once this utterance is committed
        start = self._utt_start or 0
        turn = self.turn
        if turn is None:  # beginning it after the last answer failed; if that fails again the user sees why
            try:
                turn = self._ensure_turn()
            except QwenAudioEdgeError:
                self._start_next_utterance(end, forced)
                raise
        spec = self._spec[2] if self._spec and self._spec[:2] == (end, turn.audio_done) else None
        job = _Job(turn=turn, mels=None if spec else self._tail_inputs(), prefilled=spec, start=start, end=end,
                   decided=decided, t_end=t_end, lag=self.lag_s, forced=forced)
        self._start_next_utterance(end, forced)
        self.turn = None  # the answer begins the next turn (prefix prefilled right after it)
        if not self.options.barge_in:
            self._answer_safely(job)
            return
        self._cancel.clear()
        self._worker = threading.Thread(target=self._answer_safely, args=(job,), name="qae-answer", daemon=True)
        self._worker.start()

    def _start_next_utterance(self, end: int, forced: bool) -> None:
        """The utterance ending at `end` is consumed: drop its audio; the next one starts there (without VAD,
        or after a forced cut) or at the next VAD start."""
        self._samples = self._samples[end - self._origin :]
        self._origin = end
        self._utt_start = end if (self.endpointer is None or forced) else None
        self._new_utterance()

    def _answer_safely(self, job: _Job) -> None:
        try:
            self._answer(job)
        except BaseException as e:  # noqa: BLE001 — raised on the feeding thread between events (_raise_pending)
            if self._worker_error is None:
                self._worker_error = e

    def _answer(self, job: _Job) -> None:
        first: list[float] = []

        def on_text(piece: str) -> None:
            if not first:
                first.append(time.perf_counter())
            if self.on_text:
                self.on_text(piece)

        try:
            result = self.conv.finish_turn(job.turn, job.mels, sampling=self.sampling, on_text=on_text, t0=job.t_end,
                                           prefilled=job.prefilled, should_stop=self._cancel.is_set)
        except QwenAudioEdgeError:
            if not self.conv.failed:  # e.g. a turn too long for the context: refused, the session goes on
                self.turn = self._begin_turn()
            raise
        if result.finish_reason == "cancelled":
            self.cancelled += 1
        ttft = result.timings.get("ttft_ms")
        event = StreamEvent(result=result, speech_start_s=job.start / self.sr, speech_end_s=job.end / self.sr,
                            decided_at_s=max(job.decided, job.end) / self.sr, endpoint_wall=job.t_end,
                            first_token_wall=job.t_end + ttft / 1000 if ttft is not None else (first[0] if first else None),
                            mode=self.options.mode, lag_s=job.lag, forced=job.forced)
        with self._lock:
            self._done.append(event)
        try:
            if self.on_event:
                self.on_event(event)
        finally:
            self.turn = self._begin_turn()  # work ahead: the next prefix, before any of its audio
