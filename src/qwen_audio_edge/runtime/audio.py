"""Audio in: load/resample/validate, split into ≤ 30 s segments, and the Whisper log-mel front end.

The log-mel reproduces transformers' `WhisperFeatureExtractor` (torch path; feature_size = the
checkpoint's mel bins: 128 for Qwen2-Audio, 80 for a Whisper tiny.en encoder) on the valid frames
while computing only ~the valid frames instead of a 30 s window (docs/architecture.md, the exactness recipe):
the reference zero-pads every utterance to 30 s, takes a centred STFT, drops the last frame, applies
log10, clamps to (global max − 8) and maps (x + 4) / 4. Frames past L + 1 (L = valid frames) are
pure padding and sit below the max, so the max over frames 0…L+1 is the same; frames L and L+1 still
hold the end of the signal and feed the encoder's boundary convolutions, so we return them too.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import ArtifactsError, AudioError

# Fewest samples that give one audio token: L = ceil(n / hop) valid frames must be ≥ 3.
MIN_TOKEN_FRAMES = 3
# Mel frames are computed in blocks of this many, aligned at multiples of it (batch and streaming alike).
MEL_BLOCK = 16


@dataclass(frozen=True)
class MelConfig:
    """The front end's constants, read from the artifacts (preprocessor values), never hard-coded.

    The defaults are Qwen2-Audio's; `from_dict` takes every value, n_mels included, from the
    preprocessor config (`feature_size`), so other mel counts (Whisper's 80) work unchanged.
    """

    sampling_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 128
    n_samples: int = 480000  # samples in one window (30 s)
    nb_max_frames: int = 3000  # mel frames in one window

    @property
    def min_samples(self) -> int:
        """Shortest input (samples) that yields at least one audio token."""
        return self.hop_length * (MIN_TOKEN_FRAMES - 1) + 1

    @classmethod
    def from_dict(cls, d: dict) -> MelConfig:
        return cls(
            sampling_rate=int(d["sampling_rate"]),
            n_fft=int(d["n_fft"]),
            hop_length=int(d["hop_length"]),
            # transformers' preprocessor_config.json calls it feature_size; a hand-written config may say n_mels
            n_mels=int(d["feature_size"] if "feature_size" in d else d["n_mels"]),
            n_samples=int(d["n_samples"]),
            nb_max_frames=int(d["nb_max_frames"]),
        )


@dataclass(frozen=True)
class MelFrontEnd:
    """Log-mel front end: config + the mel filter bank [n_fft//2+1, n_mels] stored in the artifacts."""

    config: MelConfig
    filters: torch.Tensor = field(repr=False)  # float32 [n_freq, n_mels]

    def __post_init__(self) -> None:
        expected = (self.config.n_fft // 2 + 1, self.config.n_mels)
        if tuple(self.filters.shape) != expected:
            raise ArtifactsError(
                f"mel filter bank has shape {tuple(self.filters.shape)}, but the preprocessor config needs {expected} "
                f"(n_fft {self.config.n_fft}, {self.config.n_mels} mel bins): re-export the artifacts"
            )

    def valid_frames(self, n_samples: int) -> int:
        """Valid mel frames of an utterance of `n_samples` (the extractor's attention-mask sum)."""
        return min(math.ceil(n_samples / self.config.hop_length), self.config.nb_max_frames)

    def log_spectrogram(self, waveform: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, int]:
        """Unclamped log10 mel frames 0…min(L+1, nb_max_frames−1) of one ≤ 30 s utterance, and L.

        Returns (logspec [n_mels, T] float32, L). Exposed separately from the clamp because the clamp
        depends on the global max (a streaming front end applies it at encode time).
        """
        wave = torch.as_tensor(waveform, dtype=torch.float32).reshape(-1)
        n = int(wave.numel())
        if n == 0:
            raise AudioError("audio segment is empty: give at least one sample")
        if n > self.config.n_samples:
            raise AudioError(
                f"audio segment has {n} samples, more than one {self.config.n_samples}-sample window; "
                "split it with split_segments() first"
            )
        n_valid = self.valid_frames(n)
        frames = min(n_valid + 2, self.config.nb_max_frames)
        padded = self.padded_signal(wave)
        blocks = [self.mel_block(padded, b, min(MEL_BLOCK, frames - b)) for b in range(0, frames, MEL_BLOCK)]
        return torch.cat(blocks, dim=1), n_valid

    def padded_signal(self, wave: torch.Tensor) -> torch.Tensor:
        """The extractor's signal as the STFT sees it: reflect-padded start, zero-padded end.

        Near the 30 s cap the reference's own centred reflect padding at the window end reaches the
        last frames, so the signal is zero-padded to exactly one window and reflected there.
        """
        cfg = self.config
        n = int(wave.numel())
        half = cfg.n_fft // 2
        n_valid = self.valid_frames(n)
        needed = cfg.hop_length * (n_valid + 2) + half
        if needed >= cfg.n_samples:
            full = torch.nn.functional.pad(wave, (0, cfg.n_samples - n))
            return torch.nn.functional.pad(full[None, None], (half, half), mode="reflect")[0, 0]
        head = torch.nn.functional.pad(wave[None, None, : half + 1], (half, 0), mode="reflect")[0, 0, :half]
        return torch.cat([head, wave, wave.new_zeros(needed + half - n)])

    def mel_block(self, padded: torch.Tensor, first: int, count: int) -> torch.Tensor:
        """Mel power → log10 of frames first…first+count−1 of a padded signal (frame i starts at hop·i).

        Every caller (batch and streaming) computes frames in the same 16-frame blocks aligned at
        multiples of 16, so both do bit-identical arithmetic.
        """
        cfg = self.config
        seg = padded[cfg.hop_length * first : cfg.hop_length * (first + count - 1) + cfg.n_fft]
        stft = torch.stft(
            seg, cfg.n_fft, cfg.hop_length, window=torch.hann_window(cfg.n_fft), center=False, return_complex=True
        )
        magnitudes = (stft.abs() ** 2).contiguous()
        return torch.clamp(self.filters.T @ magnitudes, min=1e-10).log10()

    @staticmethod
    def normalize(logspec: torch.Tensor, max_value: torch.Tensor | float | None = None) -> torch.Tensor:
        """Whisper's clamp to (max − 8) and (x + 4) / 4; `max_value` defaults to the max of `logspec`."""
        top = logspec.max() if max_value is None else torch.as_tensor(max_value, dtype=logspec.dtype)
        return (torch.maximum(logspec, top - 8.0) + 4.0) / 4.0

    def log_mel(self, waveform: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, int]:
        """Encoder input for one utterance: (mel [n_mels, min(L+2, 3000)] float32, L valid frames)."""
        logspec, n_valid = self.log_spectrogram(waveform)
        return self.normalize(logspec), n_valid


def num_audio_tokens(n_valid_frames: int) -> int:
    """Audio tokens the encoder yields for L valid mel frames (conv stride 2, then pool 2)."""
    return max(0, (((n_valid_frames - 1) // 2 + 1) - 2) // 2 + 1)


def load_audio(path: str | Path, sampling_rate: int = 16000) -> np.ndarray:
    """Read an audio file (wav/flac/ogg/mp3/… via soundfile, PyAV as fallback) as mono float32 at `sampling_rate`.

    Raises AudioError (missing, unreadable, empty, non-finite) with the file name in the message.
    """
    p = Path(path)
    if not p.exists():
        raise AudioError(f"audio file not found: {p}")
    if p.is_dir():
        raise AudioError(f"audio path is a directory, not a file: {p}")
    data, sr = _read_soundfile(p)
    if data is None:
        data, sr = _read_pyav(p)
    return prepare_waveform(data, sr, sampling_rate, source=str(p))


def _read_soundfile(p: Path) -> tuple[np.ndarray | None, int]:
    try:
        import soundfile as sf
    except ImportError:  # a machine without libsndfile's binding (e.g. a bare GPU image): PCM WAV via the stdlib
        return _read_wav_stdlib(p)
    try:
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception:
        return None, 0
    return data, int(sr)


def _read_wav_stdlib(p: Path) -> tuple[np.ndarray | None, int]:
    """PCM WAV (8/16/32-bit integer) with Python's wave module; None for anything else (then PyAV)."""
    import wave

    try:
        with wave.open(str(p), "rb") as w:
            width, channels, sr, frames = (
                w.getsampwidth(),
                w.getnchannels(),
                w.getframerate(),
                w.readframes(w.getnframes()),
            )
    except (wave.Error, EOFError, OSError):
        return None, 0
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}.get(width)
    if dtype is None:
        return None, 0
    return _pcm_to_float(np.frombuffer(frames, dtype=np.dtype(dtype).newbyteorder("<")).reshape(-1, channels)), int(sr)


def _read_pyav(p: Path) -> tuple[np.ndarray, int]:
    try:
        import av
    except ImportError as e:  # av is a dependency, but a bare machine may lack it (and soundfile)
        raise AudioError(
            f"cannot read {p}: neither soundfile nor PyAV can decode it here (without them only PCM WAV "
            "is read); pip install soundfile av"
        ) from e
    try:
        with av.open(str(p)) as container:
            streams = container.streams.audio
            if not streams:
                raise AudioError(f"cannot read {p}: the file has no audio stream")
            stream = streams[0]
            chunks = []
            sr = stream.codec_context.sample_rate or stream.rate
            for frame in container.decode(stream):
                arr = frame.to_ndarray()
                fmt = frame.format
                if fmt.is_planar:
                    arr = arr.T  # [samples, channels]
                else:
                    arr = arr.reshape(-1, len(frame.layout.channels))
                chunks.append(_pcm_to_float(arr))
                sr = frame.sample_rate or sr
    except AudioError:
        raise
    except Exception as e:
        raise AudioError(f"cannot read {p}: not a supported audio file ({type(e).__name__}: {e})") from e
    if not chunks:
        raise AudioError(f"audio file {p} contains no samples")
    return np.concatenate(chunks, axis=0), int(sr)


def _pcm_to_float(arr: np.ndarray) -> np.ndarray:
    """Integer PCM → float32 in [-1, 1); float input passes through as float32."""
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32, copy=False)
    if arr.dtype == np.uint8:
        return (arr.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(arr.dtype, np.signedinteger):
        return (arr.astype(np.float64) / float(-np.iinfo(arr.dtype).min)).astype(np.float32)
    raise AudioError(f"unsupported PCM sample type {arr.dtype}: give int8/16/32, uint8 or float samples")


def prepare_waveform(data: np.ndarray, sr: int, target_sr: int = 16000, *, source: str = "audio input") -> np.ndarray:
    """Validate PCM (any int/float dtype, [n] or [n, channels]) → mono float32 at `target_sr` (soxr)."""
    arr = np.asarray(data)
    if arr.dtype == object or arr.dtype.kind not in "iuf":
        raise AudioError(f"{source}: samples must be numbers (int or float PCM), got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise AudioError(f"{source}: expected samples shaped [n] or [n, channels], got shape {arr.shape}")
    if arr.shape[1] > arr.shape[0] and arr.shape[1] > 16:
        arr = arr.T  # [channels, n] given: a 2-channel array is never longer in channels than in time
    if arr.size == 0 or arr.shape[0] == 0:
        raise AudioError(f"{source}: audio is empty (0 samples)")
    if not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise AudioError(f"{source}: sample rate must be a positive integer, got {sr!r}")
    mono = _pcm_to_float(arr).mean(axis=1, dtype=np.float64).astype(np.float32)
    if not np.isfinite(mono).all():
        bad = int((~np.isfinite(mono)).sum())
        raise AudioError(f"{source}: {bad} samples are NaN or infinite; clean the audio and retry")
    if int(sr) != target_sr:
        import soxr

        mono = soxr.resample(mono, int(sr), target_sr, quality="HQ").astype(np.float32)
    if mono.size == 0:
        raise AudioError(f"{source}: audio is empty after resampling to {target_sr} Hz")
    return mono


def split_segments(waveform: np.ndarray, config: MelConfig, *, source: str = "audio input") -> list[np.ndarray]:
    """Split audio longer than one window into ceil(n / window) equal segments (never truncated).

    Equal lengths (rather than 30 s + remainder) mean no segment is ever too short to give an audio
    token when the whole input is long enough. Input too short for one token raises AudioError.
    """
    n = int(waveform.shape[0])
    if n < config.min_samples:
        raise AudioError(
            f"{source}: audio is {n} samples ({1000 * n / config.sampling_rate:.1f} ms); at least "
            f"{config.min_samples} samples ({1000 * config.min_samples / config.sampling_rate:.1f} ms) are "
            "needed for one audio token — give longer audio"
        )
    count = -(-n // config.n_samples)
    bounds = np.linspace(0, n, count + 1).round().astype(int)
    return [waveform[a:b] for a, b in itertools.pairwise(bounds)]


class IncrementalMel:
    """Log-mel computed as samples arrive, bit-identical to `MelFrontEnd.log_mel` of the same audio.

    Whisper's clamp to (global max − 8) is non-causal (a later, louder frame raises the floor of earlier
    ones), so this keeps the *unclamped* log-mel and applies the clamp in `finish()`. Blocks of 16 frames
    are computed as soon as every sample of their windows has arrived; the last frames, whose windows
    reach past the end of the utterance, are computed in `finish()` with the same zero padding and block
    partition as the batch path — so both do the same arithmetic.
    """

    def __init__(self, front: MelFrontEnd):
        self.front = front
        self.cfg = front.config
        self._buf = np.empty(self.cfg.n_samples, dtype=np.float32)  # one window, preallocated: no re-copying
        self.n = 0
        self._blocks: list[torch.Tensor] = []  # finished 16-frame blocks of unclamped log-mel

    @property
    def frames_ready(self) -> int:
        return MEL_BLOCK * len(self._blocks)

    def samples(self) -> np.ndarray:
        return self._buf[: self.n]

    def feed(self, pcm: np.ndarray) -> int:
        """Append 16 kHz mono float32 samples; returns how many mel frames are final so far."""
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if pcm.size == 0:
            return self.frames_ready
        if self.n + pcm.size > self.cfg.n_samples:
            raise AudioError(f"streamed utterance exceeds one {self.cfg.n_samples}-sample window; end() it first")
        self._buf[self.n : self.n + pcm.size] = pcm
        self.n += pcm.size
        half, hop = self.cfg.n_fft // 2, self.cfg.hop_length
        # Block b is final when the window of its last frame lies inside the received samples.
        last_ok = (self.n + half - self.cfg.n_fft) // hop  # last frame whose window ends within the signal
        want = (last_ok + 1) // MEL_BLOCK
        if want > len(self._blocks) and self.n > half:
            wave = torch.from_numpy(self.samples())
            for b in range(len(self._blocks), want):
                first = MEL_BLOCK * b
                if first * hop >= half:  # the block's windows lie inside the signal: slice just them
                    seg = wave[first * hop - half : (first + MEL_BLOCK - 1) * hop + half]
                    self._blocks.append(self.front.mel_block(seg, 0, MEL_BLOCK))
                else:  # the first block reaches into the reflect-padded start
                    head = torch.nn.functional.pad(wave[None, None, : half + 1], (half, 0), mode="reflect")[0, 0, :half]
                    self._blocks.append(self.front.mel_block(torch.cat([head, wave]), first, MEL_BLOCK))
        return self.frames_ready

    def ready_logspec(self) -> torch.Tensor:
        """The final unclamped frames so far [n_mels, frames_ready] (they never change as audio arrives)."""
        if not self._blocks:
            return torch.zeros(self.cfg.n_mels, 0)
        return torch.cat(self._blocks, dim=1)

    def finish_unclamped(self) -> tuple[torch.Tensor, int]:
        """The utterance's unclamped log-mel frames 0…min(L+1, 2999) and L, as `log_spectrogram` gives them.

        Does not consume the state: more audio may still be fed (a speculative endpoint can be withdrawn).
        """
        if self.n == 0:
            raise AudioError("no audio was streamed")
        wave = torch.from_numpy(self.samples())
        n_valid = self.front.valid_frames(self.n)
        frames = min(n_valid + 2, self.cfg.nb_max_frames)
        padded = self.front.padded_signal(wave)
        blocks = list(self._blocks[: frames // MEL_BLOCK])
        for b in range(MEL_BLOCK * len(blocks), frames, MEL_BLOCK):
            blocks.append(self.front.mel_block(padded, b, min(MEL_BLOCK, frames - b)))
        return torch.cat(blocks, dim=1)[:, :frames], n_valid

    def finish(self) -> tuple[torch.Tensor, int]:
        """The utterance's encoder input: (mel [n_mels, min(L+2, 3000)] clamped and scaled, L)."""
        logspec, n_valid = self.finish_unclamped()
        return self.front.normalize(logspec), n_valid
