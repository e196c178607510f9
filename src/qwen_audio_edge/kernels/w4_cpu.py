"""Fast CPU W4A16 path: GPTQ weights repacked once into torch's CPU int4 layout (tinygemm for CPU).

torch ≥ 2.6 ships `aten._weight_int4pack_mm_for_cpu`: y = x @ Wᵀ with W[n, k] = (q − 8)·scale + zero per
(group of k, n), q in 0…15 packed by `_convert_weight_to_int4pack_for_cpu`. GPTQ's W[k, n] =
s·(q − z) = s·(q − 8) + s·(8 − z), so scale = s and zero = s·(8 − z): sym and asym zeros map exactly.
Act-order (a non-monotonic g_idx) is handled without any per-call weight gather: the K rows are sorted
by group once at repack time and each call permutes the activations' K columns instead.
Constraints of the op: N % 16 == 0 and groups of 32/64/128/256 rows (larger groups, e.g. per-channel,
are split into 128-row groups with repeated parameters). `CpuW4Weight.build` returns None when a layer
does not fit; the caller then keeps the reference kernel (kernels/w4_ref.py).

Shapes/dtypes: x [..., K] fp32/bf16/fp16 → y [..., N] in x's dtype. The op runs in bf16 whatever the
input dtype, because torch's CPU int4 op is fast only with bf16 activations (its fp16 and fp32 timings
beside bf16: `dtype_rows` of bench/results/cpu/kernels.json, written by bench/kernel_bench.py). So
fp32/fp16 activations are rounded to bf16 for the W4 matmul, and so are the per-group scale and zero
(relative error ~2⁻⁹ per weight, far below the 4-bit error); the result is returned in the input dtype.
Tests compare with the reference at a bf16 tolerance; use `--w4-kernel ref` where bit-exact agreement
with the export matters.

Large M (prefill of hundreds of audio tokens): the op dequantizes inside its inner loop, so it turns
compute-bound and falls behind a dense bf16 matmul as M grows. From `DENSE_MIN_ROWS` rows on, `matmul`
instead dequantizes the packed weight once per call into a transient bf16 [K, N] matrix (the same
(q − 8)·scale + zero, in bf16) and runs one dense matmul. The figures are in bench/results/cpu/kernels.json
(bench/kernel_bench.py, 7B layer shapes): at M ≥ DENSE_MIN_ROWS its `ours_ms` is this path and
`tinygemm_ms` the op alone, and the rows at M = 256, 320 and 800 show both sides of the crossover.

torch's packed layout depends on the CPU build path that runs (AVX-512: blocks of 64 output rows, byte
[k, j] holding rows j and j + 32; AVX2 and plain builds: blocks of 32, rows j and j + 16; other builds
may differ). Rather than assume one, `packed_layout()` infers it once per process from the packing op
itself — four probe packings whose nibbles spell out each value's row and column — and checks the
inferred decoder against the op on a probe matrix. If no block layout explains the probe, or the check
fails, a warning says so once and the op is used for every M (correct, but slower prefill).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .w4_ref import check_shapes, group_sort, int4pack_scales_zeros, unpack_rows

_GROUPS = (256, 128, 64, 32)
DENSE_MIN_ROWS = 320  # from this many rows on, dequantize once + dense bf16 matmul beats the int4 op (kernels.json)


def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


@dataclass
class CpuW4Weight:
    packed: torch.Tensor  # uint8, torch's CPU int4 layout of [N, K]
    scales_zeros: torch.Tensor  # bf16 [K / group, N, 2]
    group: int
    perm: torch.Tensor | None  # K permutation applied to activations (act-order), or None
    k: int
    n: int

    @classmethod
    def build(
        cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor
    ) -> CpuW4Weight | None:
        """Repack GPTQ tensors; None when this layer cannot use the CPU int4 op."""
        if not available():
            return None
        k, n, g = check_shapes(qweight, qzeros, scales, g_idx)
        if n % 16 or k % g:
            return None
        gs = k // g
        ok, perm = group_sort(g_idx, gs)
        if not ok:
            return None  # groups are not contiguous equal blocks even after sorting
        sub = next((t for t in _GROUPS if gs % t == 0), None)
        if sub is None:
            return None
        q = unpack_rows(qweight)  # [K, N]
        if perm is not None:
            q = q[perm]
        sz = int4pack_scales_zeros(qzeros, scales, gs, sub)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.T.contiguous().to(torch.int32), 1)
        return cls(packed=packed, scales_zeros=sz, group=sub, perm=perm, k=k, n=n)

    def dequantize_t(self, layout: PackedLayout | None = None) -> torch.Tensor:
        """The weight as bf16 [K, N] (K in the activation-permuted order), decoded from the packed layout."""
        layout = layout or packed_layout()
        if layout is None or self.n % layout.block:
            raise RuntimeError("torch's packed int4 layout is not readable here; use the int4 op")
        w = layout.unpack(self.packed, self.n, self.k)  # [K, N] bf16, nibbles 0…15
        g = self.group
        wv = w.view(self.k // g, g, self.n)
        torch.addcmul(
            self.scales_zeros[..., 1].unsqueeze(1), wv.sub_(8), self.scales_zeros[..., 0].unsqueeze(1), out=wv
        )
        return w

    def _dense_ok(self) -> bool:
        layout = packed_layout()
        if layout is None:
            return False
        if self.n % layout.block:
            _warn_once(
                f"n{layout.block}",
                f"CPU W4: a layer with N = {self.n} output rows is not a whole number of torch's "
                f"{layout.block}-row int4 blocks; its large-M prefill uses the int4 op (slower) instead of "
                "dequantize + dense matmul",
            )
            return False
        return True

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] != self.k:
            raise ValueError(f"x has {x.shape[-1]} features, the W4 weight expects {self.k}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.k)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        xb = x2.to(torch.bfloat16).contiguous()
        if x2.shape[0] >= DENSE_MIN_ROWS and self._dense_ok():
            y = (xb @ self.dequantize_t()).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, self.group, self.scales_zeros).to(x.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*lead, self.n)


@dataclass(frozen=True)
class PackedLayout:
    """torch's CPU int4 layout for N a multiple of `block`: bytes [N / block, K, block / 2]; byte j of a
    block row holds output row `lo[j]` of the block in its low nibble and row `hi[j]` in its high one."""

    block: int
    lo: tuple[int, ...]
    hi: tuple[int, ...]

    def unpack(self, packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """Nibbles of a packed [N, K] weight as bf16 [K, N] (values 0…15)."""
        b, half = self.block, self.block // 2
        p = packed.reshape(n // b, k, half).permute(1, 0, 2)  # [K, N/block, block/2]
        w = torch.empty(k, n // b, b, dtype=torch.bfloat16)
        if self.lo == tuple(range(half)) and self.hi == tuple(range(half, b)):  # AVX-512 / AVX2: no gather
            w[..., :half].copy_(p & 15)
            w[..., half:].copy_(p >> 4)
        else:
            order = torch.tensor(self.lo + self.hi)
            w[..., order[:half]] = (p & 15).to(torch.bfloat16)
            w[..., order[half:]] = (p >> 4).to(torch.bfloat16)
        return w.view(k, n)


_LAYOUT: PackedLayout | None = None
_LAYOUT_DONE = False
_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def infer_packed_layout(pack=None, n: int = 128, k: int = 32) -> PackedLayout | None:
    """Infer the block layout of `pack` (default: torch's `_convert_weight_to_int4pack_for_cpu`).

    Packs four probe matrices whose values are the low and high nibbles of each element's row and column,
    reads back where every (row, column) landed, and returns the block layout that explains every byte,
    or None if none does. `pack` maps int32 [n, k] values 0…15 to uint8 bytes; tests pass their own.
    """
    pack = pack or (lambda q: torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
    rows = torch.arange(n, dtype=torch.int32).unsqueeze(1).expand(n, k)
    cols = torch.arange(k, dtype=torch.int32).unsqueeze(0).expand(n, k)
    probes = [rows & 15, rows >> 4, cols & 15, cols >> 4]
    try:
        planes = [pack(p.contiguous()).reshape(-1).to(torch.int32) for p in probes]
    except RuntimeError:
        return None
    if planes[0].numel() * 2 != n * k:
        return None
    lo_row = (planes[0] & 15) | ((planes[1] & 15) << 4)
    hi_row = (planes[0] >> 4) | ((planes[1] >> 4) << 4)
    lo_col = (planes[2] & 15) | ((planes[3] & 15) << 4)
    hi_col = (planes[2] >> 4) | ((planes[3] >> 4) << 4)
    for block in (64, 32, 16, 8, 4, 2):
        if n % block:
            continue
        half = block // 2
        byte = torch.arange(planes[0].numel())
        nb, kk, j = byte // (k * half), (byte // half) % k, byte % half
        lo, hi = lo_row[:half] % block, hi_row[:half] % block
        if not (
            torch.equal(lo_col, kk)
            and torch.equal(hi_col, kk)
            and torch.equal(lo_row, nb * block + lo[j])
            and torch.equal(hi_row, nb * block + hi[j])
        ):
            continue
        if sorted(lo.tolist() + hi.tolist()) != list(range(block)):
            continue
        return PackedLayout(block, tuple(lo.tolist()), tuple(hi.tolist()))
    return None


def packed_layout() -> PackedLayout | None:
    """torch's CPU int4 layout on this machine, inferred and checked against the op once per process.

    None (after one warning) when it cannot be read: the caller then uses the int4 op for every M.
    """
    global _LAYOUT, _LAYOUT_DONE
    if not _LAYOUT_DONE:
        _LAYOUT_DONE = True
        cap = torch.backends.cpu.get_cpu_capability()
        layout = infer_packed_layout() if available() else None
        if layout is None:
            _warn_once(
                "layout",
                f"CPU W4: torch {torch.__version__}'s packed int4 layout on this CPU ({cap}) matches no "
                "known block layout; large-M prefill uses the int4 op (slower) instead of dequantize + dense matmul",
            )
        elif not _check_against_op(layout):
            _warn_once(
                "layout",
                f"CPU W4: the inferred int4 layout (blocks of {layout.block} rows, {cap}) disagrees with "
                "torch's int4 op on a probe; large-M prefill uses the int4 op (slower) instead of dequantize + dense",
            )
            layout = None
        _LAYOUT = layout
    return _LAYOUT


def _check_against_op(layout: PackedLayout) -> bool:
    """Does `layout` decode what the op computes? The op times an identity gives Wᵀ scaled and shifted."""
    gen = torch.Generator().manual_seed(0)
    n, k, g = 128, 64, 32
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
    sz = (torch.rand(k // g, n, 2, generator=gen) + 0.5).to(torch.bfloat16)
    probe = CpuW4Weight(
        packed=torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros=sz, group=g, perm=None, k=k, n=n
    )
    if not torch.equal(layout.unpack(probe.packed, n, k).T.to(torch.int32), q):
        return False
    eye = torch.eye(k, dtype=torch.bfloat16)
    via_op = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, probe.packed, g, sz)  # = dequantized Wᵀ
    return bool(torch.allclose(probe.dequantize_t(layout).float(), via_op.float(), rtol=1e-2, atol=1e-2))
