"""Session fixtures: tiny real-layout checkpoints, their exported artifacts, and transformers references.

Everything is built here from `qwen_audio_edge.random_checkpoint` (the same helper `demo` uses), so the
suite needs no downloads. Exports are session-scoped: each is a few seconds on 2 cores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through the interpreter; read when kernels/w4_triton.py is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@dataclass
class Model:
    """A fixture checkpoint, its artifacts dir, and lazily built transformers reference objects."""

    name: str
    checkpoint: Path
    artifacts: Path
    has_template: bool = True
    _ref: object = None
    _proc: object = None

    @property
    def reference(self):
        if self._ref is None:
            from transformers import Qwen2AudioForConditionalGeneration

            self._ref = Qwen2AudioForConditionalGeneration.from_pretrained(
                str(self.checkpoint), dtype=torch.float32
            ).eval()
        return self._ref

    @property
    def processor(self):
        if self._proc is None:
            from transformers import AutoProcessor

            self._proc = AutoProcessor.from_pretrained(str(self.checkpoint))
        return self._proc


def _build(
    tmp_path_factory, name: str, shape: str, *, chat_template: bool = True, bits: int = 32, encoder_dtype: str = "fp32"
) -> Model:
    from qwen_audio_edge.export.package import ExportOptions, export_checkpoint
    from qwen_audio_edge.random_checkpoint import build_tiny_checkpoint

    root = tmp_path_factory.mktemp(name)
    ckpt = build_tiny_checkpoint(root / "checkpoint", shape, chat_template=chat_template)
    export_checkpoint(ckpt, root / "artifacts", ExportOptions(bits=bits, encoder_dtype=encoder_dtype, progress=False))
    return Model(name=name, checkpoint=ckpt, artifacts=root / "artifacts", has_template=chat_template)


@pytest.fixture(scope="session")
def mha(tmp_path_factory) -> Model:
    """MHA like the real 7B (kv heads == heads), fp32 decoder weights for exact parity."""
    return _build(tmp_path_factory, "mha", "mha")


@pytest.fixture(scope="session")
def w4(mha, tmp_path_factory):
    """The mha fixture exported as GPTQ W4 with the int8 lm_head (and the transformers-loadable GPTQ copy):
    (root, manifest); artifacts in root / "artifacts"."""
    from qwen_audio_edge.export.calibrate import CalibrationOptions
    from qwen_audio_edge.export.package import ExportOptions, export_checkpoint

    root = tmp_path_factory.mktemp("w4")
    opts = ExportOptions(
        bits=4,
        progress=False,
        calibration=CalibrationOptions(num_samples=10),
        lm_head="int8",
        hf_checkpoint=root / "hf-gptq",
        threads=2,
    )
    manifest = export_checkpoint(mha.checkpoint, root / "artifacts", opts)
    return root, manifest


@pytest.fixture(scope="session")
def gqa(tmp_path_factory) -> Model:
    return _build(tmp_path_factory, "gqa", "gqa")


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> Model:
    """A base checkpoint (no chat template): raw `<|audio_bos|><|AUDIO|><|audio_eos|>{text}` prompts."""
    return _build(tmp_path_factory, "base", "mha", chat_template=False)


@pytest.fixture(scope="session")
def mha_fp16(tmp_path_factory) -> Model:
    """The default export: fp16 decoder weights, plus the fp16 encoder."""
    return _build(tmp_path_factory, "mha16", "mha", bits=16, encoder_dtype="fp16")


@pytest.fixture(scope="session")
def pipelines():
    """Pipelines cached by (artifacts, options) so tests do not reload the same model."""
    from qwen_audio_edge.runtime.pipeline import Pipeline, RuntimeOptions

    cache: dict = {}

    def get(model: Model, **kw):
        key = (str(model.artifacts), tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = Pipeline.from_artifacts(model.artifacts, RuntimeOptions(**kw))
        return cache[key]

    return get
