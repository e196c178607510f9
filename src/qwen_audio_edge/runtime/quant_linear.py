"""Quantized linear layers swapped in at load: W4 (GPTQ format) and the optional int8 lm_head.

Weights stay 4-bit: either as read from the safetensors files (int32 nibbles + fp16 scales, run by the
reference kernel kernels/w4_ref.py, which dequantizes per call) or repacked once at load for a fast
path (kernels/w4_cpu.py: torch's CPU int4 op; kernels/w4_triton.py on CUDA). No resident fp copy of the
weights ever exists.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..kernels.w4_ref import PACK, w4_matmul_ref
from .errors import ArtifactsError
from .selfcheck import Candidate, CheckedChain, SelfCheck, warn_once

if TYPE_CHECKING:
    from ..kernels.w4_cpu import CpuW4Weight
    from ..kernels.w4_triton import TritonW4Weight
    from .decoder import Qwen2Decoder


class QuantLinear(nn.Module):
    """GPTQ W4 linear: y = x @ dequant(qweight, qzeros, scales, g_idx) + bias."""

    # buffers (register_buffer), declared for the type checker
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool):
        super().__init__()
        if in_features % PACK or out_features % PACK:
            raise ArtifactsError(f"W4 layer {in_features}x{out_features}: dims must be multiples of {PACK}")
        groups = 1 if group_size == -1 else in_features // group_size
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(in_features // PACK, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.empty(groups, out_features // PACK, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=torch.float16))
        else:
            self.bias = None
        # a repacked fast-path weight (kernels/w4_cpu.py or w4_triton.py), or None = reference
        self.kernel: CpuW4Weight | TritonW4Weight | None = None
        self.chain: CheckedChain | None = None  # Triton → tinygemm → reference, self-checked (runtime/selfcheck.py)

    def prepare(self, kernel: str = "auto", *, tune: bool = True, checks: SelfCheck | None = None) -> str:
        """Pick and build the matmul path once, after the weights are loaded; returns its name.

        auto: torch's CPU int4 op on CPU, Triton on CUDA, else the reference. The GPTQ buffers are
        released once a fast path holds its own packed copy (weights are never held twice). `tune`: the
        Triton path times its launch configs per shape on first use (kernels/w4_triton.py Tuner). `checks`:
        the verdicts the Triton path's self-check shares with the other layers (a private one if None).
        """
        if kernel not in ("auto", "ref", "cpu", "triton"):
            raise ValueError(f"unknown W4 kernel {kernel!r}: use auto, ref, cpu or triton")
        on_cuda = self.qweight.device.type == "cuda"
        want = ("triton" if on_cuda else "cpu") if kernel == "auto" else kernel
        built: CpuW4Weight | TritonW4Weight | None = None
        triton_built: TritonW4Weight | None = None  # the Triton path gets a self-checked fallback chain
        triton_missing = False
        if want == "cpu" and not on_cuda:
            from ..kernels.w4_cpu import CpuW4Weight

            built = CpuW4Weight.build(self.qweight, self.qzeros, self.scales, self.g_idx)
            if built is not None and checks is not None:
                # the large-M path is chosen once per process (probed here, at load, not in the first
                # prefill); `run --json` reports it under paths.self_check
                from ..kernels.w4_cpu_prefill import prefill_plan

                checks.set("cpu W4 prefill path", prefill_plan().describe())
        elif want == "triton" and (on_cuda or os.environ.get("TRITON_INTERPRET") == "1"):  # the interpreter: tests
            try:
                from ..kernels.w4_triton import TUNER, TritonW4Weight
            except ImportError:
                triton_missing = True
                if kernel == "auto":
                    warn_once(
                        "w4/no-triton",
                        "W4 on CUDA: triton is not installed, so the Triton W4 kernels are off; "
                        "the reference dequantize-matmul runs instead (correct, much slower decode): pip install triton",
                    )
            else:
                built = triton_built = TritonW4Weight.build(
                    self.qweight, self.qzeros, self.scales, self.g_idx, tuner=TUNER if tune else None
                )
        if built is None and kernel not in ("auto", "ref"):
            raise ArtifactsError(
                f"W4 kernel {kernel!r} cannot run this {self.in_features}x{self.out_features} layer "
                f"on {self.qweight.device}; use --w4-kernel auto or ref"
            )
        if built is None and kernel == "auto" and (want == "cpu" or on_cuda) and not triton_missing:
            shape = f"{self.in_features}x{self.out_features}"
            warn_once(
                f"w4/{want}/{shape}",
                f"W4 {shape}: the {want} fast path cannot run this layer on {self.qweight.device} "
                "(its groups are not equal contiguous blocks, or its sizes or this torch build are not supported); "
                "the reference dequantize-matmul runs for it (correct, slower)",
            )
        self.kernel = built
        if triton_built is not None:
            self.chain = _triton_chain(
                triton_built, f"W4 {self.in_features}x{self.out_features}", checks or SelfCheck()
            )
        if built is not None:
            empty = torch.empty(0, dtype=torch.int32, device=self.qweight.device)
            self.qweight, self.qzeros, self.g_idx = empty, empty, empty
            self.scales = torch.empty(0, dtype=torch.float16, device=empty.device)
            return want
        return "ref"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chain is not None:
            return self.chain(_shape_class(x.numel() // x.shape[-1], x.dtype, self.bias is not None), x, self.bias)
        if self.kernel is not None:
            return self.kernel.matmul(x, self.bias)
        return w4_matmul_ref(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bias)


@functools.lru_cache(maxsize=1024)  # on every W4 call (eager decode: 224 per token): formatted once per class
def _shape_class(m: int, dtype: torch.dtype, has_bias: bool) -> str:
    """What selects a Triton launch config: decode GEMV rows (power of two) or prefill GEMM bucket, dtype, bias."""
    from ..kernels.w4_triton import DECODE_MAX_M

    bucket = 1 << max(m - 1, 0).bit_length()
    kind = f"gemv m≤{bucket}" if m <= DECODE_MAX_M else f"gemm m≤{min(bucket, 1024)}" + ("+" if bucket > 1024 else "")
    return f"{kind} {str(dtype).removeprefix('torch.')}{' +bias' if has_bias else ''}"


def _triton_chain(w: TritonW4Weight, label: str, checks: SelfCheck) -> CheckedChain:
    """Triton first, then torch's CUDA int4 op built from the same repacked tensors, over the reference
    dequantize-matmul of those tensors (rows in group order, activations permuted as the kernel does)."""
    from ..kernels.w4_tinygemm import TinygemmW4Weight

    g_idx = (torch.arange(w.k, device=w.qweight.device) // w.group).to(torch.int32)

    def reference(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        xp = x if w.perm is None else x.index_select(-1, w.perm.long())
        return w4_matmul_ref(xp.float(), w.qweight, w.qzeros, w.scales, g_idx, bias).to(x.dtype)

    def tinygemm():
        t = TinygemmW4Weight.build(w.qweight, w.qzeros, w.scales, g_idx)
        if t is None:
            return None
        perm = w.perm.long() if w.perm is not None else None
        return lambda x, bias: t.matmul(x if perm is None else x.index_select(-1, perm), bias)

    return CheckedChain(
        label, [Candidate("triton", lambda: w.matmul), Candidate("tinygemm", tinygemm)], reference, checks
    )


class Int8Linear(nn.Module):
    """Weight-only int8 per output channel: y = (x @ W_int8ᵀ) · scale. Used for the lm_head side file.

    On CPU: torch's `_weight_int8pack_mm` in bf16, its fast dtype (the same op with fp32 inputs and the
    dense fp32 matmul of a 32000×1024 head are timed beside it in `dtype_rows` of
    bench/results/cpu/kernels.json, written by bench/kernel_bench.py). On CUDA, one row
    (decode, and prefill's last position): the Triton int8 GEMV (kernels/int8_triton.py), which reads the
    int8 bytes once. Otherwise (the reference twin): row chunks dequantized per call, so that a 156k-row
    head never materializes a full fp copy.
    """

    # buffers (register_buffer), declared for the type checker
    weight: torch.Tensor
    scales: torch.Tensor

    def __init__(
        self,
        weight: torch.Tensor,
        scales: torch.Tensor,
        chunk: int = 16384,
        *,
        tune: bool = True,
        checks: SelfCheck | None = None,
    ):
        super().__init__()
        if weight.dtype != torch.int8 or weight.ndim != 2 or scales.shape != (weight.shape[0],):
            raise ArtifactsError("int8 lm_head: expected weight int8 [vocab, hidden] and scales [vocab]")
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.chunk = chunk
        self.tune = tune  # CUDA: time the Triton GEMV's launch configs on first use (else its default)
        self._cpu_op = weight.device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm")
        self._scales_bf16 = scales.to(torch.bfloat16) if self._cpu_op else None
        self.use_reference = False  # True: always the fp32 reference twin (benchmarks' agreement check)
        # one row on CUDA (decode; prefill's last position): the Triton GEMV, self-checked on first use
        self.chain = CheckedChain(
            f"int8 lm_head {weight.shape[0]}x{weight.shape[1]}",
            [Candidate("triton", self._cuda_gemv)],
            self.reference,
            checks or SelfCheck(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_reference:
            return self.reference(x)
        if self._cpu_op and x.device.type == "cpu":
            lead = x.shape[:-1]
            y = torch.ops.aten._weight_int8pack_mm(
                x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous(), self.weight, self._scales_bf16
            )
            return y.to(x.dtype).reshape(*lead, -1)
        if (x.device.type == "cuda" or _interpreted()) and x.numel() == x.shape[-1]:
            return self.chain(f"gemv {str(x.dtype).removeprefix('torch.')}", x)
        return self.reference(x)

    def _cuda_gemv(self):
        """The Triton GEMV bound to this head's tuning choice (None without triton: a warning, the chunked path)."""
        try:
            from functools import partial

            from ..kernels.int8_triton import int8_gemv
            from ..kernels.w4_triton import TUNER
        except ImportError:
            warn_once(
                "int8/no-triton",
                "int8 lm_head on CUDA: triton is not installed, so the int8 GEMV kernel is off; "
                "the chunked dequantize-matmul runs instead (slower decode): pip install triton",
            )
            return None
        gemv = partial(int8_gemv, tuner=TUNER if self.tune else None)
        return lambda x: gemv(x.reshape(1, -1), self.weight, self.scales).reshape(*x.shape[:-1], -1)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The chunked dequantize-and-matmul twin of the fast paths."""
        outs = []
        for i in range(0, self.weight.shape[0], self.chunk):
            w = self.weight[i : i + self.chunk].to(x.dtype)
            outs.append((x @ w.T) * self.scales[i : i + self.chunk].to(x.dtype))
        return torch.cat(outs, dim=-1)


def _interpreted() -> bool:
    """Triton's CPU interpreter (tests): the CUDA-only Triton paths then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def quantize_int8_rows(weight: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of weight [rows, cols] → (int8 weight, fp32 scales), in row chunks
    (a 156k × 4096 head in fp32 would be 2.5 GB per temporary)."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for i in range(0, weight.shape[0], chunk):
        w = weight[i : i + chunk].float()
        s = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q[i : i + chunk] = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
        scales[i : i + chunk] = s
    return q, scales


W4_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def swap_in_quant_linears(model: Qwen2Decoder, quant_config: dict) -> None:
    """Replace every decoder-layer linear by a QuantLinear (on the meta device, before weights load)."""
    if quant_config.get("quant_method") != "gptq" or int(quant_config.get("bits", 0)) != 4:
        raise ArtifactsError(f"unsupported quantization_config {quant_config}: this runtime reads 4-bit GPTQ")
    fmt = quant_config.get("checkpoint_format", "gptq")
    if fmt != "gptq":
        raise ArtifactsError(f"GPTQ checkpoint_format {fmt!r} is not supported (use 'gptq', the v1 zero-point layout)")
    group_size = int(quant_config.get("group_size", 128))
    for layer in model.model.decoder_layers():
        for path in W4_LINEARS:
            parent_name, child = path.split(".")
            parent = getattr(layer, parent_name)
            lin: nn.Linear = getattr(parent, child)
            if group_size != -1 and lin.in_features % group_size:
                raise ArtifactsError(f"group_size {group_size} does not divide in_features {lin.in_features}")
            setattr(parent, child, QuantLinear(lin.in_features, lin.out_features, group_size, lin.bias is not None))


def fuse_linears(parts: Sequence[nn.Module]) -> nn.Module | None:
    """One linear computing the concatenated outputs of `parts` (same input), or None when they differ.

    W4: the GPTQ tensors are concatenated along N — possible only when every part has the same g_idx
    (GPTQ with act-order derives it from the shared input's Hessian, so q/k/v and gate/up agree; if
    they do not, the parts stay separate). Dense: the weights are concatenated. One matmul then reads
    the same bytes in one launch (and, for W4 act-order, permutes the activations once instead of per part).
    """
    first = parts[0]
    if isinstance(first, QuantLinear):
        quant = [p for p in parts if isinstance(p, QuantLinear)]
        if len(quant) < len(parts) or not all(
            p.kernel is None
            and p.in_features == first.in_features
            and p.scales.shape[0] == first.scales.shape[0]
            and torch.equal(p.g_idx, first.g_idx)
            and (p.bias is None) == (first.bias is None)
            for p in quant
        ):
            return None
        groups = first.scales.shape[0]
        with torch.device("meta"):  # shapes only; the concatenated tensors are assigned below
            fused = QuantLinear(
                first.in_features,
                sum(p.out_features for p in quant),
                first.in_features // groups if groups > 1 else -1,
                first.bias is not None,
            )
        fused.qweight = torch.cat([p.qweight for p in quant], dim=1)
        fused.qzeros = torch.cat([p.qzeros for p in quant], dim=1)
        fused.scales = torch.cat([p.scales for p in quant], dim=1)
        fused.g_idx = first.g_idx
        if first.bias is not None:  # then every part has one (checked above)
            fused.bias = torch.cat([p.bias for p in quant if p.bias is not None])
        return fused
    dense = [p for p in parts if type(p) is nn.Linear]
    if (
        type(first) is nn.Linear
        and len(dense) == len(parts)
        and all(p.in_features == first.in_features and (p.bias is None) == (first.bias is None) for p in dense)
    ):
        w = first.weight
        linear = nn.Linear(
            first.in_features,
            sum(p.out_features for p in dense),
            bias=first.bias is not None,
            device="meta",
            dtype=w.dtype,
        )
        linear.weight = nn.Parameter(torch.cat([p.weight for p in dense]), requires_grad=False)
        if first.bias is not None:  # then every part has one (checked above)
            linear.bias = nn.Parameter(torch.cat([p.bias for p in dense if p.bias is not None]), requires_grad=False)
        return linear
    return None
