"""Endpointing, the first step of the stream data path: where utterances start and end in a live sample stream.

An endpointer turns samples into boundary events; it never sees the mel, the model or the conversation, so
its decisions depend on the audio alone (the session acts on them: runtime/stream.py).

- `Endpointer`: silero-vad with VADIterator semantics (threshold, `min_silence_ms`, `speech_pad_ms`), plus
  a forced endpoint at `VadOptions.max_speech_s` (one encoder window at most).
- `WindowEndpointer`: no VAD (`vad=None`): every sample belongs to an utterance, which runs until the
  caller's `end()`; audio beyond one window is cut into a turn of its own.

Events are (kind, boundary sample, sample at which it was decided): "start", "end", or "cut" (a forced
end; a "start" at the same sample follows, since the speech goes on). Both expose `pending_end()`, the end
the silence under way would confirm: the utterance is fully known then, which is what speculation uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import OptionsError
from .threads import ort_session_options

Event = tuple[str, int, int]  # (kind, boundary sample, sample at which it was decided)


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


class SileroVad:
    """silero-vad's ONNX model (shipped in the `silero-vad` package) on ONNX Runtime: 512-sample frames at 16 kHz."""

    FRAME = 512
    CONTEXT = 64

    def __init__(self) -> None:
        import importlib.util

        import onnxruntime as ort

        # Locate the package's model file without importing the package: importing silero_vad runs
        # torch.set_num_threads(1) for the whole process (measured: it halved our decode threads).
        spec = importlib.util.find_spec("silero_vad")
        if spec is None or not spec.submodule_search_locations:
            raise OptionsError("VAD needs the silero-vad package (pip install silero-vad), or use --no-vad")
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
        if not path.is_file():
            raise OptionsError(f"silero-vad is installed but its model file {path} is missing; reinstall silero-vad")
        # one thread, no spin-waiting: the VAD runs beside the decoder and must not take its cores
        self.session = ort.InferenceSession(
            str(path), sess_options=ort_session_options(1), providers=["CPUExecutionProvider"]
        )
        self.reset()

    def reset(self) -> None:
        self.state: np.ndarray = np.zeros((2, 1, 128), dtype=np.float32)
        self.context: np.ndarray = np.zeros((1, self.CONTEXT), dtype=np.float32)

    def __call__(self, frame: np.ndarray) -> float:
        x = np.concatenate([self.context, frame.reshape(1, self.FRAME).astype(np.float32)], axis=1)
        prob, self.state = self.session.run(
            None, {"input": x, "state": self.state, "sr": np.array(16000, dtype=np.int64)}
        )
        self.context = x[:, -self.CONTEXT :]
        return float(prob.reshape(-1)[0])


class StreamEndpointer(Protocol):
    """What the session needs from an endpointer (either kind)."""

    uses_vad: bool  # False: the stream has no silence between utterances (the next one starts at the last end)

    def feed(self, pcm: np.ndarray) -> Iterable[Event]: ...
    def safe_horizon(self) -> int: ...
    def pending_end(self) -> int | None: ...
    def close(self, at: int) -> None: ...


class Endpointer:
    """VADIterator semantics over a sample stream: yields ("start", sample) and ("end", sample) events."""

    uses_vad = True

    def __init__(
        self, opts: VadOptions, vad: Callable[[np.ndarray], float] | None = None, sample_rate: int = 16000
    ) -> None:
        # vad: speech probability of one 512-sample frame; silero-vad unless given (tests script one).
        self.o = opts
        self.vad = vad or SileroVad()
        self.pad = opts.speech_pad_ms * sample_rate // 1000
        self.min_silence = opts.min_silence_ms * sample_rate // 1000
        self.max_speech = int(opts.max_speech_s * sample_rate)
        self.buffer: np.ndarray = np.zeros(0, np.float32)
        self.current = 0  # samples consumed by the VAD
        self.triggered = False
        self.temp_end = 0
        self.start = 0

    def feed(self, pcm: np.ndarray) -> list[Event]:
        """Events (kind, sample of the utterance boundary, sample at which it was decided).

        kind: "start", "end", or "cut" (a forced end at max_speech; a "start" at the same sample follows).
        """
        events: list[Event] = []
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

    def pending_end(self) -> int | None:
        """The utterance's end if the silence under way confirms the endpoint; None while speech goes on.

        The end is `speech_pad_ms` after speech stopped, while confirming it takes `min_silence_ms`: in
        between, the utterance is fully known and its encode + prefill can run speculatively.
        """
        if not self.temp_end:
            return None
        return self.temp_end + self.pad - SileroVad.FRAME

    def close(self, at: int) -> None:
        """The caller ended the utterance (push-to-talk `end()`): wait for the next speech start."""
        self.triggered, self.temp_end = False, 0


class WindowEndpointer:
    """No VAD: one utterance runs until the caller's `end()`; beyond one window (`max_samples`) it is cut.

    Every sample belongs to an utterance, so the next one starts where the last ended and no silence is
    trimmed. There is no silence window to speculate in (`pending_end()` is always None).
    """

    uses_vad = False

    def __init__(self, max_samples: int) -> None:
        self.max_samples = max_samples
        self.start = 0  # where the current utterance began
        self.current = 0  # samples received

    def feed(self, pcm: np.ndarray) -> Iterator[Event]:
        """("cut", s, s), ("start", s, s) for each full window the audio received so far exceeds."""
        self.current += len(pcm)
        return self._cuts()

    def _cuts(self) -> Iterator[Event]:
        # Lazy on purpose: a cut is taken only when the session asks for it. If answering one fails (the
        # error propagates out of feed()), the cuts not taken yet are found again at the next feed().
        while self.current - self.start > self.max_samples:
            self.start += self.max_samples
            yield ("cut", self.start, self.start)
            yield ("start", self.start, self.start)

    def safe_horizon(self) -> int:
        """Without VAD every received sample is inside the utterance: all of it may enter the mel."""
        return self.current

    def pending_end(self) -> int | None:
        return None

    def close(self, at: int) -> None:
        """The caller ended the utterance at `at`; the next one starts there."""
        self.start = at


def make_endpointer(vad: VadOptions | None, max_samples: int) -> StreamEndpointer:
    """silero-vad endpointing for `vad`, or (None) utterances cut only by `end()` and the window length."""
    return Endpointer(vad) if vad is not None else WindowEndpointer(max_samples)
