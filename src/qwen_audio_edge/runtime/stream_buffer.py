"""Buffering, the second step of the stream data path: audio kept until it is placed, and the mel built as it arrives.

- `AudioBuffer` keeps the 16 kHz audio since the current utterance began (or recent silence: a VAD start
  reaches back `speech_pad_ms` before the speech was detected, so audio must outlive that decision), and
  meters how far the session lags behind a live source (back-pressure).
- `UtteranceFeatures` is one utterance's encoder side: its incremental log-mel, fed only up to the
  endpointer's safe horizon (no utterance end can come before it), and in chunked mode the block schedule:
  every block that became final is encoded and prefilled into the KV cache while the person still speaks.

Neither holds the conversation or the turn: the session passes them in and keeps what comes back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .audio import IncrementalMel, prepare_waveform
from .block_encoder import BlockBatch
from .chunked import BlockStream
from .errors import QwenAudioEdgeError

if TYPE_CHECKING:
    from .pipeline import Conversation, MelInput, PendingTurn, Pipeline


class AudioBuffer:
    """The session's audio at 16 kHz from absolute sample `origin` on, where the utterance under way
    began, and the real-time lag meter.

    Memory stays bounded: the owner consumes each utterance once it is answered, and silence is trimmed
    to what a speech pad could reach back to.
    """

    def __init__(self, sample_rate: int, clock: Callable[[], float], continuous: bool) -> None:
        self.sr = sample_rate
        self.clock = clock
        self.continuous = continuous  # no VAD: every sample belongs to an utterance, one starts where the last ended
        self.samples: np.ndarray = np.zeros(
            0, np.float32
        )  # audio since origin (the current utterance, or recent silence)
        self.origin = 0  # absolute sample index of samples[0]
        self.start: int | None = (
            0 if continuous else None
        )  # where the utterance under way began (None: between utterances)
        self.arrived = 0  # samples received since the session started (16 kHz)
        self.t_first: float | None = None  # wall time of the first chunk
        self._resampler: Any = None
        self._in_rate: int | None = None

    def append(self, pcm: Any, sampling_rate: int) -> np.ndarray:
        """Add a chunk at any rate (resampled as a stream, so chunk edges leave no trace); returns it at 16 kHz."""
        if self.t_first is None:
            self.t_first = self.clock()
        chunk = self._to_16k(pcm, sampling_rate)
        self.arrived += len(chunk)
        self.samples = np.concatenate([self.samples, chunk])
        return chunk

    def _to_16k(self, pcm: Any, sampling_rate: int) -> np.ndarray:
        data = np.asarray(pcm)
        if sampling_rate == self.sr:
            return (
                prepare_waveform(data, self.sr, self.sr, source="stream chunk")
                if data.size
                else np.zeros(0, np.float32)
            )
        import soxr

        if self._resampler is None or self._in_rate != sampling_rate:
            self._resampler = soxr.ResampleStream(sampling_rate, self.sr, 1, dtype="float32", quality="HQ")
            self._in_rate = sampling_rate
        mono = (
            prepare_waveform(data, sampling_rate, sampling_rate, source="stream chunk")
            if data.size
            else np.zeros(0, np.float32)
        )
        return self._resampler.resample_chunk(mono).astype(np.float32)

    @property
    def end(self) -> int:
        """Absolute index one past the last sample received."""
        return self.origin + len(self.samples)

    def between(self, a: int, b: int) -> np.ndarray:
        """Samples [a, b) in absolute indices (both ≥ origin)."""
        return self.samples[a - self.origin : b - self.origin]

    def begin(self, at: int) -> int:
        """The endpointer found an utterance starting at `at`; returns where it starts in the audio kept
        (never reaching back into audio an earlier utterance, or `end()`, consumed)."""
        self.start = max(at, self.origin)
        return self.start

    def consume(self, end: int, forced: bool) -> None:
        """The utterance ending at `end` is answered: drop its audio. The next one starts right there
        without VAD or after a forced cut (the same speech goes on), else at the next VAD start."""
        self.samples = self.samples[end - self.origin :]
        self.origin = end
        self.start = end if (self.continuous or forced) else None

    def trim_silence(self) -> None:
        """Between utterances: keep the last second once over two (more than any speech pad reaches back)."""
        if len(self.samples) > 2 * self.sr:
            drop = len(self.samples) - self.sr
            self.samples = self.samples[drop:]
            self.origin += drop

    @property
    def lag_s(self) -> float:
        """Wall time since the first chunk minus audio time received (≥ 0): how far behind a live source we are."""
        if self.t_first is None:
            return 0.0
        return max(0.0, self.clock() - self.t_first - self.arrived / self.sr)


class UtteranceFeatures:
    """One utterance's encoder inputs, built while it is spoken; a new one per utterance.

    Exact mode: the incremental log-mel (the Whisper clamp waits for the end). Chunked mode
    (`block` frames per block): also the block schedule and the block encoder holding the final
    blocks' keys/values; `work_ahead` prefills every block that became final.
    """

    def __init__(self, pipeline: Pipeline, block: int | None, lookahead: int) -> None:
        self.mel = IncrementalMel(pipeline.mel)
        self.blocks = BlockStream(self.mel, block, lookahead) if block else None
        self.block_encoder = pipeline.block_encoder() if block else None  # holds the final blocks' keys/values
        self.fed = 0  # absolute sample index up to which the mel has been fed
        self.blocks_deferred = False  # chunked blocks could not be prefilled: leave them for the end

    def feed_until(self, audio: AudioBuffer, until: int) -> None:
        """Feed the mel the audio of the utterance under way (if any) up to absolute sample `until`."""
        if audio.start is None or until <= self.fed:
            return
        begin = max(self.fed, audio.start)
        if until > begin:
            self.mel.feed(audio.between(begin, until))
        self.fed = until

    def restart_at(self, start: int) -> None:
        """The endpointer placed this utterance's start at `start`: nothing before it is fed."""
        self.fed = start

    def work_ahead(
        self, pipeline: Pipeline, conv: Conversation, turn: Callable[[], PendingTurn], reserve: int
    ) -> PendingTurn | None:
        """Chunked mode: encode the blocks that became final and prefill them in one call.

        `turn` gives the pending turn (begun on demand). Returns the extended turn, or None when nothing
        was prefilled. Pending blocks are coalesced: whatever became final since the last call goes at once.
        """
        if self.blocks is None or self.block_encoder is None or self.blocks_deferred:
            return None
        ready = self.blocks.ready()  # every block that became final: encoded, then prefilled in one call
        if not ready:
            return None
        encoder = self.block_encoder.fork()  # committed only once the blocks are in the KV cache
        try:
            extended = conv.extend_audio(
                turn(), torch.cat(pipeline.encode_mels([BlockBatch(encoder, tuple(ready))])), reserve=reserve
            )
        except QwenAudioEdgeError:
            # E.g. the utterance outgrew the context: the blocks stay pending for the end of the
            # utterance, where the turn is refused once with this error (not at every chunk).
            self.blocks.done -= len(ready)
            self.blocks_deferred = True
            return None
        self.block_encoder = encoder
        return extended

    def tail_inputs(self) -> list[MelInput]:
        """Encoder inputs still to encode at the end of the utterance (does not consume the mel state, so
        a speculative end can be withdrawn and more audio fed)."""
        if self.blocks is None or self.block_encoder is None:
            return [self.mel.finish()]
        return [BlockBatch(self.block_encoder.fork(), tuple(self.blocks.tail()))]
