"""Export runtime/encoder.py's module to ONNX (dynamic time axis) and verify it against transformers.

The verification is the contract's proof: transformers' `Qwen2AudioEncoder` + projector on the
extractor's padded-to-3000-frames input with the padding mask, versus our front end + ONNX Runtime on
only the valid frames, compared on every valid audio token. The figures go into the manifest.

Tolerances are relative, because absolute ones do not transfer between weights: the same export that
differs from transformers by 2e-6 on random fixtures differs by 2e-5 (espeak speech) on Whisper tiny.en's
trained encoder, whose outputs are larger and whose activations carry outliers. See
`EncoderTolerances` for how each bound follows from floating-point arithmetic.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..runtime.audio import MelFrontEnd
from ..runtime.encoder import AudioEncoderWithProjector, EncoderConfig, OnnxEncoder
from ..runtime.errors import ExportError

FP32_UNIT_ROUNDOFF = 2.0**-24  # u = eps/2 (eps = 1.19e-7): one rounding's relative error in float32
FP32_EXTREME_FACTOR = 4.0  # max of N·H ~Gaussian differences ≈ √(2 ln(N·H)) ≈ 4–5.5 × their rms


@dataclass(frozen=True)
class EncoderTolerances:
    """Bounds of the export self-check, relative to the reference's magnitude.

    fp32 ONNX vs transformers (`fp32_max_rel_err`: max |ours − ref| ÷ max |ref| over every valid token
    and channel). Both sides compute the same float32 products in a different order (ORT's MLAS vs
    torch's GEMM blocking, fused vs unfused attention). A dot product of K terms summed in another order
    differs by about u·√K relative (independent roundings, u = 2⁻²⁴ ≈ 6e-8), and such differences add
    up like a random walk over the chain of D sequential products the signal passes (conv1, conv2,
    6 per layer: q/k/v, scores, attention·V, out, fc1, fc2 — q/k/v in parallel count once — and the
    projector): rms difference ≈ u·√(K_max·D) of a token's scale, K_max = the widest reduction
    (3·n_mels, 3·d_model, ffn, positions for attention·V). The largest of the N·H differences is about
    √(2 ln(N·H)) ≈ 4–5.5 times their rms (FP32_EXTREME_FACTOR = 4), and max |ref| is at least any
    token's scale, so max error ÷ max |ref| ≲ 4·u·√(K_max·D). Values: tiny random fixture (d 64,
    2 layers) 3.6e-5, measured 5e-7; Whisper tiny.en (d 384, 4 layers, K 1536) 4.9e-5, measured
    1.0e-6 … 4.7e-6 (export signal, espeak speech); the real 7B (d 1280, 32 layers, K 5120) 2.4e-4.
    A real export bug (wrong boundary frames, positions, mask) shows up as 1e-2 … 1 relative, far above
    any of these.

    `fp32_min_cosine` (per audio token): 1 − cos ≈ ½·(token's relative error)², so 0.99999 allows 0.45 %
    on any one token — a check that a single (e.g. boundary) token with a small norm, invisible in the
    global max, is right; float32 agreement gives 1 − cos ≈ 1e-7 (the resolution of the cosine itself).

    `fp16_min_cosine` (fp16 export vs fp32 export): fp16 rounds every weight and activation with
    u = 2⁻¹¹ ≈ 4.9e-4, so per-token relative errors of a few u (measured on tiny.en: 1 − cos ≤ 7e-5,
    max error ≤ 5.7e-3 of max |ref| on export signal and espeak speech); 0.999 allows 4.5 % on a token
    and catches fp16 overflow/saturation.
    """

    fp32_max_rel_err: float
    fp32_min_cosine: float = 0.99999
    fp16_min_cosine: float = 0.999

    @classmethod
    def for_config(cls, cfg: EncoderConfig) -> EncoderTolerances:
        """The fp32 bound 4·u·√(K_max·D) of this encoder's widths and depth (see the class docstring)."""
        k_max = max(3 * cfg.num_mel_bins, 3 * cfg.d_model, cfg.encoder_ffn_dim, cfg.max_source_positions)
        depth = 2 + 6 * cfg.encoder_layers + 1
        return cls(fp32_max_rel_err=FP32_EXTREME_FACTOR * FP32_UNIT_ROUNDOFF * math.sqrt(k_max * depth))


def embedding_errors(ours: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Max abs error, max abs error ÷ max |reference|, and per-token cosine (min, mean) of [N, H] embeddings."""
    ours, reference = ours.float(), reference.float()
    err = float((ours - reference).abs().max())
    ref_max = float(reference.abs().max())
    cos = torch.nn.functional.cosine_similarity(ours, reference, dim=-1)
    return {
        "max_abs_err": err,
        "reference_max_abs": ref_max,
        "max_rel_err": err / ref_max if ref_max > 0 else math.inf,
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
    }


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress lines and warnings for every export; keep the export log readable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def export_encoder_onnx(module: AudioEncoderWithProjector, path: Path, dtype: torch.dtype) -> list[Path]:
    """Write `path` (+ external data) for `module` cast to `dtype`; returns the files written."""
    cfg = module.config
    m = module.to(dtype).eval()
    frames = torch.export.Dim("frames", min=3, max=cfg.max_frames)
    example_len = min(cfg.max_frames, 400)
    mel = torch.zeros(1, cfg.num_mel_bins, example_len, dtype=dtype)
    n_valid = torch.tensor([example_len - 2], dtype=torch.int64)
    pos_offset = torch.tensor([0], dtype=torch.int64)
    try:
        with _quiet():
            torch.onnx.export(
                m,
                (mel, n_valid, pos_offset),
                str(path),
                dynamo=True,
                external_data=True,
                input_names=["mel", "n_valid", "pos_offset"],
                output_names=["audio_embeds"],
                dynamic_shapes=({2: frames}, None, None),
            )
    except Exception as e:
        raise ExportError(f"ONNX export of the encoder failed: {type(e).__name__}: {e}") from e
    return [p for p in (path, path.with_name(path.name + ".data")) if p.exists()]


def reference_embeddings(
    state: dict[str, torch.Tensor], audio_config: dict, text_hidden: int, feature_extractor, waveform: np.ndarray
) -> torch.Tensor:
    """transformers' audio tower + projector on the padded, masked input: valid-token embeddings [N, H]."""
    from torch import nn
    from transformers import Qwen2AudioEncoder, Qwen2AudioEncoderConfig
    from transformers.masking_utils import create_bidirectional_mask

    cfg = Qwen2AudioEncoderConfig(
        **{k: v for k, v in audio_config.items() if k not in ("model_type", "transformers_version")}
    )
    tower = Qwen2AudioEncoder(cfg).eval()
    tower.load_state_dict(
        {k[len("audio_tower.") :]: v.float() for k, v in state.items() if k.startswith("audio_tower.")}
    )
    proj = nn.Linear(cfg.d_model, text_hidden)
    proj.load_state_dict(
        {k.rsplit(".", 1)[1]: v.float() for k, v in state.items() if k.startswith("multi_modal_projector.linear.")}
    )
    feats = feature_extractor(
        waveform,
        sampling_rate=feature_extractor.sampling_rate,
        return_attention_mask=True,
        padding="max_length",
        return_tensors="pt",
    )
    lengths, out_lengths = tower._get_feat_extract_output_lengths(feats["attention_mask"].sum(-1))
    n_pos = cfg.max_source_positions
    mask2d = (torch.arange(n_pos)[None] < lengths[:, None]).long()
    mask = create_bidirectional_mask(config=cfg, inputs_embeds=torch.zeros(1, n_pos, 1), attention_mask=mask2d)
    with torch.inference_mode():
        hidden = tower(feats["input_features"], attention_mask=mask).last_hidden_state
        return proj(hidden)[0, : int(out_lengths[0])]


def verify_encoder(
    onnx_fp32: Path,
    reference: torch.Tensor,
    front: MelFrontEnd,
    waveform: np.ndarray,
    onnx_fp16: Path | None = None,
    threads: int | None = None,
    *,
    tolerances: EncoderTolerances,
) -> dict:
    """Compare the exported encoder(s) with the reference; raise ExportError past the tolerances.

    Returns the manifest's verification record: absolute and relative errors, cosines, the bounds used.
    """
    mel, n_valid = front.log_mel(waveform)
    ours = OnnxEncoder(onnx_fp32, threads=threads)(mel, n_valid)
    if ours.shape != reference.shape:
        raise ExportError(
            f"encoder verification: ONNX gave {tuple(ours.shape)} tokens, transformers {tuple(reference.shape)}"
        )
    e = embedding_errors(ours, reference)
    report = {
        "signal_seconds": round(len(waveform) / front.config.sampling_rate, 4),
        "audio_tokens": int(reference.shape[0]),
        "reference_max_abs": e["reference_max_abs"],
        "fp32_max_abs_err_vs_transformers": e["max_abs_err"],
        "fp32_max_rel_err_vs_transformers": e["max_rel_err"],
        "fp32_min_cosine_vs_transformers": e["min_cosine"],
        "fp32_mean_cosine_vs_transformers": e["mean_cosine"],
        "tolerances": asdict(tolerances),
    }
    if not e["max_rel_err"] <= tolerances.fp32_max_rel_err:
        raise ExportError(
            f"encoder verification failed: fp32 ONNX differs from transformers by {e['max_abs_err']:.3g} = "
            f"{e['max_rel_err']:.3g} of max |reference| ({e['reference_max_abs']:.3g}) > {tolerances.fp32_max_rel_err:.3g}"
        )
    if not e["min_cosine"] >= tolerances.fp32_min_cosine:
        raise ExportError(
            f"encoder verification failed: fp32 ONNX vs transformers min per-token cosine "
            f"{e['min_cosine']:.7f} < {tolerances.fp32_min_cosine}"
        )
    if onnx_fp16 is not None:
        half = OnnxEncoder(onnx_fp16, threads=threads)(mel, n_valid)
        h = embedding_errors(half, ours)
        report.update(
            fp16_max_abs_err_vs_fp32=h["max_abs_err"],
            fp16_max_rel_err_vs_fp32=h["max_rel_err"],
            fp16_min_cosine_vs_fp32=h["min_cosine"],
            fp16_mean_cosine_vs_fp32=h["mean_cosine"],
        )
        if not h["min_cosine"] >= tolerances.fp16_min_cosine:
            raise ExportError(
                f"fp16 encoder verification failed: min cosine {h['min_cosine']:.5f} < {tolerances.fp16_min_cosine}"
            )
    return report
