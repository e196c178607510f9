"""transformers' `Qwen2AudioForConditionalGeneration` on exactly our weights: the like-for-like baseline.

Why rebuild it from the artifacts instead of loading the original checkpoint: our decoder is W4, so the
original weights are not the weights we run. Here every GPTQ linear is dequantized (kernels/w4_ref.py:
the reference twin of our kernels), the int8 lm_head side file too when the runtime would read it, and the
fp16-stored embeddings and norms are taken as stored; the encoder is encoder.safetensors. transformers
then computes in the dtype asked for (fp32, bf16, fp16) on the same effective weights, and works from
the same inputs: our prompt ids (the parity tests hold them equal to the processor's) and its own
WhisperFeatureExtractor on the same waveform, timed as part of its pipeline. It needs only the artifacts
dir, so `bench --model` of a real export gets the same baseline as `--shape`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..kernels.w4_ref import dequantize
from ..runtime.errors import ArtifactsError

HF_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def decoder_state(decoder_dir: Path, lm_head_int8: Path | None) -> dict[str, torch.Tensor]:
    """Our decoder folder → a dense fp32 state dict in Qwen2's key names (`model.*`, `lm_head.weight`)."""
    from safetensors import safe_open

    raw: dict[str, torch.Tensor] = {}
    for f in sorted(decoder_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for key in sf.keys():  # noqa: SIM118 (safe_open has keys() but is not iterable)
                raw[key] = sf.get_tensor(key)
    state: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        if key.endswith(".qweight"):
            base = key[: -len(".qweight")]
            w = dequantize(t, raw[f"{base}.qzeros"], raw[f"{base}.scales"], raw[f"{base}.g_idx"], torch.float32)
            state[f"{base}.weight"] = w.t().contiguous()  # GPTQ stores [K, N]; nn.Linear holds [N, K]
        elif not key.endswith((".qzeros", ".scales", ".g_idx")):
            state[key] = t.float()
    if lm_head_int8 is not None:
        from safetensors.torch import load_file

        side = load_file(str(lm_head_int8))
        state["lm_head.weight"] = side["weight"].float() * side["scales"].float().reshape(-1, 1)
    return state


def _submodule(model: torch.nn.Module, *names: str) -> torch.nn.Module:
    """The first of `names` that exists: transformers 5.17 and later nest Qwen2-Audio's parts differently."""
    for name in names:
        try:
            return model.get_submodule(name)
        except AttributeError:
            continue
    raise ArtifactsError(f"transformers' Qwen2-Audio has none of {names}: unsupported transformers version")


@dataclass
class HfBaseline:
    """The baseline model, its feature extractor, and how to time it. Build with `HfBaseline.load`."""

    model: torch.nn.Module
    features: object  # transformers.WhisperFeatureExtractor
    dtype: str
    device: torch.device

    @classmethod
    def load(cls, artifacts_dir: Path, dtype: str, device: str = "cpu") -> HfBaseline:
        from safetensors.torch import load_file
        from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, WhisperFeatureExtractor

        m = json.loads((artifacts_dir / "manifest.json").read_text())
        source = m.get("source", {}).get("config")
        if not source:
            raise ArtifactsError(f"{artifacts_dir}: the manifest has no source config; re-export to get a baseline")
        cfg = Qwen2AudioConfig.from_dict(source)
        with torch.device("meta"):
            model = Qwen2AudioForConditionalGeneration(cfg)
        tower = _submodule(model, "model.audio_tower", "audio_tower")
        projector = _submodule(model, "model.multi_modal_projector", "multi_modal_projector")
        text = _submodule(model, "model.language_model", "language_model.model")
        head = _submodule(model, "lm_head", "language_model.lm_head")
        enc = load_file(str(artifacts_dir / m["encoder"]["weights"]))
        head_rel = m.get("decoder", {}).get("lm_head_int8")
        dec = decoder_state(
            artifacts_dir / m["files_role"]["decoder_dir"], artifacts_dir / head_rel if head_rel else None
        )
        if "lm_head.weight" not in dec:  # tied embeddings
            dec["lm_head.weight"] = dec["model.embed_tokens.weight"]
        parts = [
            (tower, {k[len("audio_tower.") :]: v for k, v in enc.items() if k.startswith("audio_tower.")}),
            (projector, {k[len("multi_modal_projector.") :]: v for k, v in enc.items() if k.startswith("multi_modal")}),
            (text, {k[len("model.") :]: v for k, v in dec.items() if k.startswith("model.")}),
            (head, {"weight": dec["lm_head.weight"]}),
        ]
        for module, state in parts:
            try:
                module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
            except RuntimeError as e:
                raise ArtifactsError(f"the artifacts' tensors do not fit transformers' Qwen2-Audio: {e}") from e
        # non-persistent buffers (the rotary tables) were created on meta: rebuild those modules on the CPU
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if any(b.is_meta for b in child.buffers(recurse=False)) and hasattr(child, "config"):
                    parent.add_module(child_name, type(child)(config=child.config))
        if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
            missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta][:3]
            raise ArtifactsError(f"baseline model left tensors unset (e.g. {missing}): unsupported transformers")
        dev = torch.device(device)
        model.to(device=dev, dtype=HF_DTYPES[dtype])  # type: ignore[call-arg]  # transformers wraps .to; mypy misreads it
        model.eval()
        fe = WhisperFeatureExtractor.from_pretrained(str(artifacts_dir))
        return cls(model=model, features=fe, dtype=dtype, device=dev)

    def inputs(self, ids: list[int], segments: list[np.ndarray]) -> dict:
        """The processor's work on the waveform (features + mask) and our ids: the model's inputs."""
        batch: dict = {"input_ids": torch.tensor([ids], device=self.device)}
        if segments:
            f = self.features(  # type: ignore[operator]
                segments, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt"
            )
            batch["input_features"] = f["input_features"].to(self.device, self.model.dtype)
            batch["feature_attention_mask"] = f["attention_mask"].to(self.device)
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return batch

    def generate(self, ids: list[int], segments: list[np.ndarray], new_tokens: int) -> GenerateTiming:
        """Greedy generation of exactly `new_tokens` tokens (EOS ignored), timed: features, TTFT, total.

        TTFT is measured with a streamer-like hook: the time the first generated token is handed out."""
        from transformers import GenerationConfig

        class _FirstToken:
            def __init__(self) -> None:
                self.t: float | None = None
                self.calls = 0

            def put(self, value) -> None:  # the first put() is the prompt, the second the first new token
                self.calls += 1
                if self.calls == 2 and self.t is None:
                    self.t = time.perf_counter()

            def end(self) -> None:
                pass

        t0 = time.perf_counter()
        batch = self.inputs(ids, segments)
        t_features = time.perf_counter()
        cfg = GenerationConfig(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            repetition_penalty=1.0,
            pad_token_id=0,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
        mark = _FirstToken()
        with torch.inference_mode():
            out = self.model.generate(**batch, generation_config=cfg, streamer=mark)  # type: ignore[operator]
        _sync(self.device)
        t_end = time.perf_counter()
        tokens = [int(t) for t in out.sequences[0, len(ids) :]]
        logits = torch.stack([step[0].float().cpu() for step in out.logits])
        first = mark.t if mark.t is not None else t_end
        return GenerateTiming(
            tokens=tokens,
            logits=logits,
            features_ms=1000 * (t_features - t0),
            ttft_ms=1000 * (first - t0),
            total_ms=1000 * (t_end - t0),
        )

    def encode_ms(self, segments: list[np.ndarray]) -> float:
        """The audio tower + projector alone on the features of `segments` (what our encoder stage does)."""
        batch = self.inputs([0], segments)
        tower = _submodule(self.model, "model.audio_tower", "audio_tower")
        projector = _submodule(self.model, "model.multi_modal_projector", "multi_modal_projector")
        t0 = time.perf_counter()
        with torch.inference_mode():
            projector(tower(batch["input_features"]).last_hidden_state)
        _sync(self.device)
        return 1000 * (time.perf_counter() - t0)

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


@dataclass(frozen=True)
class GenerateTiming:
    tokens: list[int]
    logits: torch.Tensor  # [new_tokens, vocab] fp32: the top-2 margins the agreement check needs
    features_ms: float
    ttft_ms: float
    total_ms: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
