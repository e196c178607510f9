"""Our runtime's stages, timed through the public API (`Pipeline.run`, its `timings`) and, per encoder
backend and precision the artifacts offer, the encoder alone on the same mel.

Every measurement is one warm call; `main` repeats them and keeps median and p90. TTFT is what a user of
`run` waits for: the audio file read and decoded, mel, encoder, prefill, first token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..runtime.audio import num_audio_tokens, split_segments
from ..runtime.encoder import EncoderConfig, OnnxEncoder, TorchEncoder, load_encoder_module
from ..runtime.generate import SamplingOptions
from ..runtime.pipeline import Pipeline
from ..runtime.prompt import user_message


def greedy(n: int) -> SamplingOptions:
    """Exactly n greedy tokens (EOS ignored, no repetition penalty): every engine does the same work."""
    return SamplingOptions(max_new_tokens=n, greedy=True, repetition_penalty=1.0, ignore_eos=True)


@dataclass(frozen=True)
class TurnTiming:
    tokens: list[int]
    audio_decode_ms: float
    mel_ms: float
    encoder_ms: float
    prefill_ms: float
    ttft_ms: float
    total_ms: float
    decode_tok_s: float | None


class OurEngine:
    """A loaded pipeline plus the extra encoders to compare; all timings on one process's warm state."""

    def __init__(self, pipeline: Pipeline, prompt: str, encoders: bool = True):
        self.p = pipeline
        self.prompt = prompt
        self.encoders = self._encoders() if encoders else {}

    def _encoders(self) -> dict[str, object]:
        """Every encoder the artifacts can run here: each exported ONNX precision, and the torch module."""
        art, opts = self.p.artifacts, self.p.options
        enc = art.manifest["encoder"]
        out: dict[str, object] = {}
        for precision, rel in sorted(enc["onnx"].items()):
            onnx = OnnxEncoder(art.path(rel), threads=opts.threads, device=opts.device)
            onnx.max_positions = int(art.audio_config["max_source_positions"])
            out[f"onnx-{precision}"] = onnx
        from safetensors.torch import load_file

        cfg = EncoderConfig.from_dict(art.audio_config, art.text_config["hidden_size"])
        state = load_file(str(art.path(enc["weights"])))
        dtypes = [torch.float32] + ([torch.float16] if self.p.device.type == "cuda" else [])
        for dtype in dtypes:
            name = "torch-" + ("fp32" if dtype == torch.float32 else "fp16")
            out[name] = TorchEncoder(load_encoder_module(cfg, state, dtype), self.p.device)
        return out

    def ids(self, wave: np.ndarray) -> list[int]:
        """The prompt ids of a one-turn conversation about `wave` (what the baselines are fed too)."""
        segments = split_segments(wave, self.p.mel.config)
        counts = [num_audio_tokens(self.p.mel.valid_frames(len(s))) for s in segments]
        pr = self.p.prompt
        return pr.expand_audio(pr.encode(pr.render([user_message(len(segments), self.prompt)])), counts)

    def segments(self, wave: np.ndarray) -> list[np.ndarray]:
        return split_segments(wave, self.p.mel.config)

    def turn(self, wav: Path, new_tokens: int) -> TurnTiming:
        t = time.perf_counter()
        self.p.load_waveform(wav)
        decode_ms = 1000 * (time.perf_counter() - t)
        r = self.p.run(wav, self.prompt, sampling=greedy(new_tokens))
        tm = r.timings
        return TurnTiming(
            tokens=list(r.token_ids),
            audio_decode_ms=decode_ms,
            mel_ms=float(tm["mel_ms"]),
            encoder_ms=float(tm["encoder_ms"]),
            prefill_ms=float(tm["prefill_ms"]),
            ttft_ms=float(tm["ttft_ms"]),
            total_ms=float(tm["total_ms"]),
            decode_tok_s=tm.get("decode_tok_s"),
        )

    def encoder_ms(self, name: str, wave: np.ndarray) -> float:
        """One encoder on the mel of every ≤ 30 s segment of `wave` (the encoder stage of a turn)."""
        enc = self.encoders[name]
        mels = [self.p.mel.log_mel(s) for s in split_segments(wave, self.p.mel.config)]
        t = time.perf_counter()
        for mel, frames in mels:
            enc(mel, frames)  # type: ignore[operator]
        if self.p.device.type == "cuda":
            torch.cuda.synchronize(self.p.device)
        return 1000 * (time.perf_counter() - t)

    def weight_bytes(self) -> int:
        """Bytes of the decoder's tensors as loaded (shared storages once): what the roofline reads."""
        return _unique_bytes(self.p.decoder)

    def embedding_bytes(self) -> int:
        return _unique_bytes(self.p.decoder.get_submodule("model.embed_tokens"))


def _unique_bytes(module: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_meta or t.device.type == "meta":
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total
