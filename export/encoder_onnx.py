"""Export runtime/encoder.py's module to ONNX (dynamic time axis) and verify it against transformers.

The verification is the contract's proof: transformers' `Qwen2AudioEncoder` + projector on the
extractor's padded-to-3000-frames input with the padding mask, versus our front end + ONNX Runtime on
only the valid frames, compared on every valid audio token. The figures go into the manifest.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from ..runtime.audio import MelFrontEnd
from ..runtime.encoder import AudioEncoderWithProjector, OnnxEncoder
from ..runtime.errors import ExportError

FP32_TOLERANCE = 1e-4  # max abs diff vs transformers on valid tokens (fp32)
FP16_MIN_COSINE = 0.999  # per-token cosine of the fp16 export vs the fp32 export


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
        for lg, lvl in zip(loggers, levels):
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
                m, (mel, n_valid, pos_offset), str(path), dynamo=True, external_data=True,
                input_names=["mel", "n_valid", "pos_offset"], output_names=["audio_embeds"],
                dynamic_shapes=({2: frames}, None, None),
            )
    except Exception as e:  # noqa: BLE001 — exporter failures come in many types
        raise ExportError(f"ONNX export of the encoder failed: {type(e).__name__}: {e}") from e
    return [p for p in (path, path.with_name(path.name + ".data")) if p.exists()]


def reference_embeddings(
    state: dict[str, torch.Tensor], audio_config: dict, text_hidden: int, feature_extractor, waveform: np.ndarray
) -> torch.Tensor:
    """transformers' audio tower + projector on the padded, masked input: valid-token embeddings [N, H]."""
    from torch import nn
    from transformers import Qwen2AudioEncoder, Qwen2AudioEncoderConfig
    from transformers.masking_utils import create_bidirectional_mask

    cfg = Qwen2AudioEncoderConfig(**{k: v for k, v in audio_config.items() if k not in ("model_type", "transformers_version")})
    tower = Qwen2AudioEncoder(cfg).eval()
    tower.load_state_dict({k[len("audio_tower."):]: v.float() for k, v in state.items() if k.startswith("audio_tower.")})
    proj = nn.Linear(cfg.d_model, text_hidden)
    proj.load_state_dict({k.rsplit(".", 1)[1]: v.float() for k, v in state.items() if k.startswith("multi_modal_projector.linear.")})
    feats = feature_extractor(waveform, sampling_rate=feature_extractor.sampling_rate, return_attention_mask=True,
                              padding="max_length", return_tensors="pt")
    lengths, out_lengths = tower._get_feat_extract_output_lengths(feats["attention_mask"].sum(-1))
    n_pos = cfg.max_source_positions
    mask2d = (torch.arange(n_pos)[None] < lengths[:, None]).long()
    mask = create_bidirectional_mask(config=cfg, inputs_embeds=torch.zeros(1, n_pos, 1), attention_mask=mask2d)
    with torch.inference_mode():
        hidden = tower(feats["input_features"], attention_mask=mask).last_hidden_state
        return proj(hidden)[0, : int(out_lengths[0])]


def verify_encoder(
    onnx_fp32: Path, reference: torch.Tensor, front: MelFrontEnd, waveform: np.ndarray,
    onnx_fp16: Path | None = None, threads: int | None = None,
) -> dict:
    """Compare the exported encoder(s) with the reference; raise ExportError past the tolerances."""
    mel, n_valid = front.log_mel(waveform)
    ours = OnnxEncoder(onnx_fp32, threads=threads)(mel, n_valid)
    if ours.shape != reference.shape:
        raise ExportError(f"encoder verification: ONNX gave {tuple(ours.shape)} tokens, transformers {tuple(reference.shape)}")
    err = float((ours - reference).abs().max())
    report = {
        "signal_seconds": round(len(waveform) / front.config.sampling_rate, 4),
        "audio_tokens": int(reference.shape[0]),
        "fp32_max_abs_err_vs_transformers": err,
        "fp32_tolerance": FP32_TOLERANCE,
        "reference_max_abs": float(reference.abs().max()),
    }
    if not err <= FP32_TOLERANCE:
        raise ExportError(f"encoder verification failed: fp32 ONNX differs from transformers by {err:.3g} > {FP32_TOLERANCE}")
    if onnx_fp16 is not None:
        half = OnnxEncoder(onnx_fp16, threads=threads)(mel, n_valid)
        cos = torch.nn.functional.cosine_similarity(half, ours, dim=-1)
        report.update(
            fp16_max_abs_err_vs_fp32=float((half - ours).abs().max()),
            fp16_min_cosine_vs_fp32=float(cos.min()),
            fp16_mean_cosine_vs_fp32=float(cos.mean()),
            fp16_min_cosine_required=FP16_MIN_COSINE,
        )
        if not float(cos.min()) >= FP16_MIN_COSINE:
            raise ExportError(f"fp16 encoder verification failed: min cosine {float(cos.min()):.5f} < {FP16_MIN_COSINE}")
    return report
