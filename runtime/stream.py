"""Streaming input: live PCM chunks in, answers out, with the work done while the person is speaking.

`StreamSession` (from `pipeline.stream(...)`) keeps a conversation open. At the start of every turn it
prefills the prompt prefix (system turn, `<|im_start|>user\\nAudio 1: <|audio_bos|>`) — the same prefix
path the offline `run` uses, so both do identical arithmetic. While audio arrives the log-mel advances
incrementally (unclamped; the Whisper clamp is applied at the end, bit-identical to the batch front end).
The utterance ends either by `end()` (push-to-talk) or by VAD endpointing (silero-vad, VADIterator
semantics): then only the encoder, the prefill of the audio + suffix and the decode remain.

Exact mode only in this version: output equals the offline pipeline on the same utterance audio (with
VAD: the speech span plus its padding). With VAD the utterance is fully known `speech_pad_ms` after
speech stops while the endpointer still waits `min_silence_ms`: in that window the encoder and the
audio + suffix prefill run speculatively, kept if the endpoint is confirmed, dropped if speech resumes.
The block-wise "chunked" mode, barge-in and the context policy are not implemented yet (see the README).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import IncrementalMel, prepare_waveform
from .errors import OptionsError
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
        """Events (kind, sample of the utterance boundary, sample at which it was decided)."""
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
                    events += [("end", self.current, self.current), ("start", self.current, self.current)]
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
                    events.append(("end", self.temp_end + self.pad - frame, self.current))
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

    def to_json(self) -> dict:
        d = self.result.to_json()
        d["stream"] = {
            "speech_start_s": round(self.speech_start_s, 3),
            "speech_end_s": round(self.speech_end_s, 3),
            "endpoint_decided_at_s": round(self.decided_at_s, 3),
            "ttft_after_endpoint_ms": None if self.first_token_wall is None
            else round(1000 * (self.first_token_wall - self.endpoint_wall), 3),
        }
        return d


class StreamSession:
    """Chunks in (`feed`), turns out; `end()` closes the current utterance (push-to-talk, or `vad=None`)."""

    def __init__(self, pipeline, prompt: str | None = None, *, sampling: SamplingOptions | None = None,
                 vad: VadOptions | None = VadOptions(), on_text: Callable[[str], None] | None = None,
                 speculate: bool = True):
        self.p = pipeline
        self.speculate = speculate
        self.prompt = prompt
        self.sampling = sampling
        self.on_text = on_text
        self.vad_options = vad
        self.sr = pipeline.mel.config.sampling_rate
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and start a new one (a fresh KV cache owner)."""
        self.conv = self.p.chat()
        self.endpointer = Endpointer(self.vad_options) if self.vad_options else None
        self.speculations = 0  # speculative encode+prefill runs, and how many were discarded (speech resumed)
        self.discarded = 0
        self._resampler = None
        self._in_rate: int | None = None
        self._samples = np.zeros(0, np.float32)  # this turn's audio since the session/turn origin
        self._origin = 0  # absolute sample index of _samples[0]
        self._utt_start: int | None = None if self.endpointer else 0
        self._begin_turn()

    def _begin_turn(self) -> None:
        self.turn = self.conv.begin_turn(self.prompt, 1)  # prefix prefilled now, before any audio
        self.mel = IncrementalMel(self.p.mel)
        self._fed = 0  # absolute sample index up to which the mel has been fed
        self._spec = None  # (utterance end sample, PrefilledTurn): speculative work for a possible endpoint

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
        """Add audio (any chunk size; any rate, resampled as a stream). Returns turns finished by VAD."""
        chunk = self._to_16k(pcm, sampling_rate or self.sr)
        self._samples = np.concatenate([self._samples, chunk])
        if self.endpointer is None:
            self._feed_mel_until(self._origin + len(self._samples))
            return []
        out = []
        for kind, at, decided in self.endpointer.feed(chunk):
            if kind == "start":
                self._utt_start = at
                self._fed = at
            else:
                self._feed_mel_until(at)
                out.append(self._finish(at, decided))
        if self._utt_start is not None:
            self._feed_mel_until(self.endpointer.safe_horizon())
            self._maybe_speculate()
        elif len(self._samples) > 2 * self.sr:  # silence: keep only what a speech pad could reach back to
            drop = len(self._samples) - self.sr
            self._samples = self._samples[drop:]
            self._origin += drop
        return out

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
        if not self.speculate or self._fed < h or (self._spec and self._spec[0] == h) or h <= (self._utt_start or 0):
            return
        mel = self.mel.finish()  # does not consume the incremental state
        self._spec = (h, self.conv.prefill_turn(self.turn, [mel]))
        self.speculations += 1

    def end(self) -> StreamEvent | None:
        """Close the current utterance now (push-to-talk). Returns None when no speech was captured."""
        if self._utt_start is None:
            return None  # VAD saw no speech: no audio prompt, no answer
        end = self._origin + len(self._samples)
        self._feed_mel_until(end)
        if self.mel.n == 0:
            return None
        if self.endpointer:
            self.endpointer.triggered, self.endpointer.temp_end = False, 0
        return self._finish(end, end)

    def _finish(self, end: int, decided: int) -> StreamEvent:
        t_end = time.perf_counter()
        start = self._utt_start or 0
        mel, n_valid = (None, 0) if self._spec and self._spec[0] == end else self.mel.finish()
        first: list[float] = []

        def on_text(piece: str) -> None:
            if not first:
                first.append(time.perf_counter())
            if self.on_text:
                self.on_text(piece)

        spec = self._spec[1] if self._spec and self._spec[0] == end else None
        result = self.conv.finish_turn(self.turn, None if spec else [(mel, n_valid)], sampling=self.sampling,
                                       on_text=on_text, t0=t_end, prefilled=spec)
        ttft = result.timings.get("ttft_ms")
        event = StreamEvent(result=result, speech_start_s=start / self.sr, speech_end_s=end / self.sr,
                            decided_at_s=max(decided, end) / self.sr, endpoint_wall=t_end,
                            first_token_wall=t_end + ttft / 1000 if ttft is not None else (first[0] if first else None))
        # The next turn: drop consumed audio, prefill the next prefix right away (work ahead).
        keep = end - self._origin
        self._samples = self._samples[keep:]
        self._origin = end
        self._utt_start = None if self.endpointer else end
        self._begin_turn()
        return event
