"""Random-weight models for `bench --shape`: a user without the weights can still measure a machine.

tiny and mid are full Qwen2-Audio checkpoints written by transformers (random_checkpoint.py) and exported
by our own `export` as a user would (GPTQ W4, g128, act-order; calibrated on 4 synthetic prompts only,
because the weights are random: quality is not what is measured, and 128 prompts would cost minutes).
The 7b shape is Qwen2-Audio-7B's real config; see main.py for what is measured of it where.
Builds are cached under the work dir (keyed by the shape's dimensions) so repeated runs start at once.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..random_checkpoint import TinyShape

SHAPES = {
    "tiny": TinyShape(name="tiny"),
    # the mid-size model of bench/results (decoder hidden 1024 × 8 layers; the tiny audio encoder)
    "mid": TinyShape(
        name="mid",
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=8192,
    ),
    # Qwen2-Audio-7B: decoder 32 × 4096 (MHA, 32 heads), intermediate 11008, vocab 156,032; Whisper-large-v3's
    # encoder (32 layers, d_model 1280, 20 heads, ffn 5120)
    "7b": TinyShape(
        name="7b",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=156032,
        audio_d_model=1280,
        audio_layers=32,
        audio_heads=20,
        audio_ffn_dim=5120,
        max_position_embeddings=8192,
    ),
}
CALIBRATION_PROMPTS = 4
MARKER = "bench-shape.json"


def shape_dict(name: str) -> dict:
    return dataclasses.asdict(SHAPES[name])


def build_shape(name: str, work: Path, progress: bool = False) -> tuple[Path, Path]:
    """(checkpoint dir, W4 artifacts dir) of the random `name` model, built under `work` unless cached."""
    from ..export.calibrate import CalibrationOptions
    from ..export.package import ExportOptions, export_checkpoint
    from ..random_checkpoint import build_tiny_checkpoint

    root = work / name
    ckpt, art = root / "checkpoint", root / "artifacts"
    want = {"shape": shape_dict(name), "bits": 4, "calibration_prompts": CALIBRATION_PROMPTS}
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == want and (art / "manifest.json").is_file():
        return ckpt, art
    root.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    build_tiny_checkpoint(ckpt, SHAPES[name], max_shard_size="200MB")
    export_checkpoint(
        ckpt,
        art,
        ExportOptions(
            bits=4, force=True, progress=progress, calibration=CalibrationOptions(num_samples=CALIBRATION_PROMPTS)
        ),
    )
    marker.write_text(json.dumps(want))  # last: a cut-off build is rebuilt next time
    return ckpt, art
