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

Large M (prefill of tens to hundreds of audio tokens): the op dequantizes inside its inner loop, so it
turns compute-bound and falls behind a dense matmul as M grows. From the plan's `min_rows` on
(kernels/w4_cpu_prefill.py: measured once per process, at most DENSE_MIN_ROWS), `matmul` instead decodes
the packed weight once per call, in column chunks, into a transient dense matrix in the plan's dtype
(bf16 where the CPU multiplies bf16 natively, else fp32: on AVX2-only CPUs torch's bf16 matmul has no fast
kernel) and runs dense matmuls. Its exactness twin is kernels/w4_ref.py (tests/test_w4_prefill.py).
Figures: bench/results/cpu/kernels.json (7B layer shapes) and bench/results/cpu/ttft_profile_mid.json.

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

from .w4_cpu_prefill import prefill_plan
from .w4_ref import check_shapes, group_sort, int4pack_scales_zeros, unpack_rows

_GROUPS = (256, 128, 64, 32)
# The rows from which a matmul dequantizes + runs dense is chosen per machine (kernels/w4_cpu_prefill.py);
# it is never above DENSE_MIN_ROWS (where the dense bf16 path beat the op on the 7B shapes: kernels.json)
DENSE_MIN_ROWS = 320
DENSE_CHUNK_ELEMS = 1 << 22  # weight elements decoded per dense chunk (8 MiB in bf16)


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

    def dequantize_t(
        self,
        layout: PackedLayout | None = None,
        dtype: torch.dtype = torch.bfloat16,
        cols: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The weight as [K, N] in `dtype` (K in the activation-permuted order), decoded from the packed layout.

        `cols` (start, stop), multiples of the layout's block: only those output columns. The affine is
        folded (w = q·s + (z − 8·s), in fp32, then rounded to `dtype`), so each half of a block is one
        addcmul straight from the packed nibbles — 3–4× faster than unpack, subtract, multiply-add.
        """
        layout = layout or packed_layout()
        if layout is None or self.n % layout.block:
            raise RuntimeError("torch's packed int4 layout is not readable here; use the int4 op")
        b, half, g = layout.block, layout.block // 2, self.group
        c0, c1 = cols or (0, self.n)
        if c0 % b or c1 % b or not 0 <= c0 < c1 <= self.n:
            raise ValueError(f"columns {c0}:{c1} are not whole {b}-row blocks of N = {self.n}")
        nb = (c1 - c0) // b
        p = self.packed.view(self.n // b, self.k, half)[c0 // b : c1 // b].permute(1, 0, 2)
        p = p.reshape(self.k // g, g, nb, half)  # [groups, g, blocks, half] bytes
        sz = self.scales_zeros[:, c0:c1].float()
        s, z = sz[..., 0], sz[..., 1] - 8.0 * sz[..., 0]
        s, z = s.to(dtype).view(-1, 1, nb, b), z.to(dtype).view(-1, 1, nb, b)
        out = torch.empty(self.k // g, g, nb, b, dtype=dtype)
        if layout.lo == tuple(range(half)) and layout.hi == tuple(range(half, b)):  # AVX-512 / AVX2: no gather
            if dtype == torch.bfloat16:  # the nibbles cast inside the addcmul (one pass per half)
                torch.addcmul(z[..., :half], p & 15, s[..., :half], out=out[..., :half])
                torch.addcmul(z[..., half:], p >> 4, s[..., half:], out=out[..., half:])
            else:  # fp32: a mixed-dtype addcmul is slower here than a cast, then one in-place pass
                out[..., :half].copy_(p & 15)
                out[..., half:].copy_(p >> 4)
                torch.addcmul(z, out, s, out=out)
        else:
            order = torch.tensor(layout.lo + layout.hi)
            out[..., order[:half]] = (p & 15).to(dtype)
            out[..., order[half:]] = (p >> 4).to(dtype)
            torch.addcmul(z, out, s, out=out)  # one rounding (a mul, then an add, would round twice in bf16)
        return out.view(self.k, c1 - c0)

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

    def dense_matmul(self, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x2 [M, K] (activation-permuted) @ the weight dequantized to `dtype` → [M, N] in `dtype`.

        The weight is decoded in column chunks of at most DENSE_CHUNK_ELEMS elements, each multiplied
        as soon as it is made: the transient stays small (a 4096 × 22016 gate/up would be 180 MB in
        bf16 at once) and hot in cache for its matmul.
        """
        layout = packed_layout()
        assert layout is not None, "dense_matmul runs only where _dense_ok() holds"
        xd = x2.to(dtype).contiguous()
        step = max(layout.block, DENSE_CHUNK_ELEMS // self.k // layout.block * layout.block)
        if step >= self.n:
            return xd @ self.dequantize_t(layout, dtype)
        y = torch.empty(x2.shape[0], self.n, dtype=dtype)
        for c0 in range(0, self.n, step):
            c1 = min(self.n, c0 + step)
            torch.mm(xd, self.dequantize_t(layout, dtype, (c0, c1)), out=y[:, c0:c1])
        return y

    def int4_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [M, K] (activation-permuted) through torch's int4 op (bf16) → [M, N] bf16."""
        xb = x2.to(torch.bfloat16).contiguous()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, self.group, self.scales_zeros)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] != self.k:
            raise ValueError(f"x has {x.shape[-1]} features, the W4 weight expects {self.k}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.k)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        plan = prefill_plan()
        if plan.min_rows is not None and x2.shape[0] >= plan.min_rows and self._dense_ok():
            y = self.dense_matmul(x2, plan.dtype).to(x.dtype)
        else:
            y = self.int4_matmul(x2).to(x.dtype)
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
    # a wrong layout is off by O(1); the folded decode rounds z − 8·s to bf16 (≤ 2⁻⁹ of 8·max s + max z, here
    # ≤ 0.5 % of max |W|) where the op rounds z alone
    err = (probe.dequantize_t(layout).float() - via_op.float()).abs().max()
    return bool(err <= 1e-2 * via_op.float().abs().max())
