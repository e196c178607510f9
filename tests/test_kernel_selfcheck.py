"""Self-check at first use of the fast kernel paths (runtime/selfcheck.py): a kernel that fails to launch or
computes wrong values is caught on its first call for a shape class, named in one warning, and the next
path of its chain gives the tokens; `run --json` reports which path runs what.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (conftest), so the W4 chain here is Triton →
(tinygemm: CUDA only, skipped) → reference. On a GPU the same tests run on CUDA through the real kernels.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from helpers import GREEDY, PROMPT, signal
from qwen_audio_edge.runtime import selfcheck

pytest.importorskip("triton", reason="triton is in the dev extra")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """warn_once is per process; each test sees its own first warnings."""
    monkeypatch.setattr(selfcheck, "_warned", set())


def _pipeline(w4, **kw):
    from qwen_audio_edge.runtime.pipeline import Pipeline, RuntimeOptions

    root, _ = w4
    # fp32 activations on either device (the CUDA default would be fp16): the fast paths are held to the
    # reference paths' tokens at the precision these tests were written for
    kw.setdefault("dtype", "fp32")
    return Pipeline.from_artifacts(
        root / "artifacts", RuntimeOptions(device=DEV, encoder_backend="torch", w4_tune=False, **kw)
    )


@pytest.fixture(scope="module")
def reference_tokens(w4):
    """Tokens of the all-reference paths (W4 dequantize-matmul, chunked int8 head)."""
    p = _pipeline(w4, w4_kernel="ref")
    p.decoder.lm_head._cpu_op = False
    return p.run(signal(2.5), PROMPT, sampling=GREEDY).token_ids


def test_triton_w4_passes_its_self_check_and_gives_the_reference_tokens(w4, reference_tokens):
    p = _pipeline(w4, w4_kernel="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a passing kernel warns about nothing
        got = p.run(signal(2.5), PROMPT, sampling=GREEDY)
    assert got.token_ids == reference_tokens
    verdicts = p.active_paths()["self_check"]
    w4_verdicts = {k: v for k, v in verdicts.items() if k.startswith("W4 ")}
    assert any("gemv m≤1" in k for k in w4_verdicts) and any("gemm" in k for k in w4_verdicts)  # decode and prefill
    assert set(w4_verdicts.values()) == {"triton"}


@pytest.mark.parametrize("fault", ["wrong values", "launch failure"])
def test_a_broken_triton_w4_kernel_warns_once_and_the_fallback_gives_the_reference_tokens(
    w4, reference_tokens, monkeypatch, fault
):
    from qwen_audio_edge.kernels.w4_triton import TritonW4Weight

    real = TritonW4Weight.matmul

    def broken(self, x, bias=None, **kw):
        if fault == "launch failure":
            raise RuntimeError("triton.runtime.errors.OutOfResources: out of resource: shared memory")
        return real(self, x, bias, **kw) * 0.5  # e.g. a scale read from the wrong group

    monkeypatch.setattr(TritonW4Weight, "matmul", broken)
    p = _pipeline(w4, w4_kernel="triton")
    with pytest.warns(RuntimeWarning) as record:
        got = p.run(signal(2.5), PROMPT, sampling=GREEDY)
    assert got.token_ids == reference_tokens  # the fallback's tokens, not the broken kernel's
    messages = [str(w.message) for w in record if "self-check" in str(w.message)]
    shapes = {k for k, v in p.active_paths()["self_check"].items() if k.startswith("W4 ")}
    assert shapes and all(p.active_paths()["self_check"][k] == "reference" for k in shapes)
    assert len(messages) == len(shapes)  # one warning per shape class, not per layer or call
    why = (
        "max error 0.5 of max |reference|"
        if fault == "wrong values"
        else "RuntimeError: triton.runtime.errors.OutOfResources"
    )
    for m in messages:
        assert m.startswith("W4 ") and "the triton kernel failed its self-check for " in m and why in m
        # on CUDA torch's int4 op is next (it passes); on CPU there is none, so the reference runs
        assert m.endswith(
            "using the tinygemm path for this shape instead"
            if DEV == "cuda"
            else "using the reference path for this shape instead"
        )


def test_a_broken_int8_head_kernel_falls_back_to_the_chunked_reference(w4, reference_tokens, monkeypatch):
    from qwen_audio_edge.kernels import int8_triton

    monkeypatch.setattr(
        int8_triton,
        "int8_gemv",
        lambda x, w, s, **kw: torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device),
    )
    p = _pipeline(w4, w4_kernel="ref")
    p.decoder.lm_head._cpu_op = False  # on CPU: take the path CUDA takes (the Triton GEMV, interpreted)
    with pytest.warns(
        RuntimeWarning,
        match=r"int8 lm_head \d+x\d+: the triton kernel failed its self-check for gemv "
        r"float32 \(max error 1 of max \|reference\|.*using the reference path",
    ):
        got = p.run(signal(2.5), PROMPT, sampling=GREEDY)
    assert got.token_ids == reference_tokens
    assert p.active_paths()["self_check"] == {
        f"int8 lm_head {p.decoder.lm_head.weight.shape[0]}x"
        f"{p.decoder.lm_head.weight.shape[1]} gemv float32": "reference"
    }


def test_self_check_tolerance_is_what_a_correct_kernel_needs(w4):
    """The fp32 bound (1e-3 of max |y|) is far above what the real Triton kernels measure here, and far below a
    wrong kernel's O(1): measured error of each W4 shape's first call is printed and bounded."""
    from qwen_audio_edge.runtime.quant_linear import QuantLinear

    p = _pipeline(w4, w4_kernel="triton")
    layer = next(m for m in p.decoder.modules() if isinstance(m, QuantLinear))
    for rows in (1, 40):
        x = torch.randn(rows, layer.in_features, device=DEV)
        fast, ref = layer.kernel.matmul(x, layer.bias), layer.chain.reference(x, layer.bias)
        err = selfcheck.relative_error(fast, ref)
        print(f"rows {rows}: triton vs reference relative error {err:.2e}")
        assert err < selfcheck.TOLERANCE[torch.float32] / 50


def test_run_json_reports_the_active_paths(w4, capsys):
    import wave

    import numpy as np

    from qwen_audio_edge.cli import main

    root, _ = w4
    wav = root / "a.wav"
    with wave.open(str(wav), "wb") as w:  # the stdlib: this test also runs on the GPU machine (no soundfile there)
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.clip(signal(2.0), -1, 1) * 32767).astype("<i2").tobytes())
    assert main(
        [
            "run",
            str(root / "artifacts"),
            "--audio",
            str(wav),
            "--max-new-tokens",
            "4",
            "--greedy",
            "--json",
            "--w4-kernel",
            "triton",
            "--no-w4-tune",
        ]
    ) in (0, None)
    paths = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["paths"]
    assert paths["decoder_w4"] == ["triton"] and paths["encoder"] == "onnxruntime CPUExecutionProvider"
    assert paths["lm_head"].startswith("int8") and paths["device"] == "cpu"
    assert paths["self_check"] and set(paths["self_check"].values()) == {"triton"}


def test_onnx_encoder_asked_for_cuda_without_a_cuda_provider_warns_once(w4):
    import onnxruntime as ort

    from qwen_audio_edge.runtime.encoder import OnnxEncoder

    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA execution provider: nothing falls back")
    root, manifest = w4
    onnx = root / "artifacts" / manifest["encoder"]["onnx"]["fp32"]
    with pytest.warns(
        RuntimeWarning, match="--device cuda: the ONNX encoder runs on the CPU because .*--encoder-backend torch"
    ):
        OnnxEncoder(onnx, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OnnxEncoder(onnx, device="cuda")  # once per process
