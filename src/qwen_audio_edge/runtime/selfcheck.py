"""Self-check of the fast kernel paths on first use, with a fallback chain and one warning per problem.

No GPU has run our Triton kernels before a user's does, and a kernel that compiles can still be wrong on
a GPU, driver or Triton version we never saw. So the first time a fast path runs a given shape class
(e.g. "W4 4096x12288, 1 row, fp16"), its output is compared with the reference twin's on the same input;
on a launch failure or a mismatch beyond the dtype's tolerance, a warning names the kernel, the shape and
the reason, and the next path of the chain (e.g. Triton → torch's int4 op → reference dequantize-matmul)
is checked the same way. The verdict is kept per shape class and shared by all layers of that shape
through one `SelfCheck` object, which the decoder owns and passes explicitly to its layers; it also
answers "which path runs what" for `run --json`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

# max |fast − reference| ÷ max |reference| for a path to pass: a few units in the last place of the output
# dtype over the reduction (a layout or indexing bug is off by O(1)). Tests measure their own margins.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}

_warned: set[str] = set()  # process-wide: a warning is about the machine, not one model instance


def warn_once(key: str, message: str, category: type[Warning] = RuntimeWarning) -> None:
    """One warning per key and process (a fallback that happens on every call is reported once)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, category, stacklevel=3)


@dataclass(frozen=True)
class Candidate:
    """A fast path: `build()` makes its callable (None: not applicable here), built on first need."""

    name: str
    build: Callable[[], Callable | None]


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y − ref| ÷ max |ref| in fp32 (inf where y has non-finite values ref has not)."""
    y32, r32 = y.detach().float(), ref.detach().float()
    if not bool(torch.isfinite(y32).all()) and bool(torch.isfinite(r32).all()):
        return float("inf")
    scale = float(r32.abs().max()) if r32.numel() else 0.0
    return float((y32 - r32).abs().max()) / max(scale, 1e-30) if r32.numel() else 0.0


class CheckedChain:
    """Fast paths (best first) over one reference twin, each checked on its first call per shape class."""

    def __init__(self, label: str, candidates: list[Candidate], reference: Callable, verdicts: SelfCheck):
        self.label, self.candidates, self.reference, self.verdicts = label, candidates, reference, verdicts
        self._built: dict[str, Callable | None] = {}

    def _fn(self, name: str) -> Callable | None:
        if name not in self._built:
            cand = next(c for c in self.candidates if c.name == name)
            try:
                self._built[name] = cand.build()
            except Exception as e:
                warn_once(
                    f"{self.label}/{name}/build",
                    f"{self.label}: the {name} kernel cannot be built "
                    f"({type(e).__name__}: {_first_line(e)}); trying the next path",
                )
                self._built[name] = None
        return self._built[name]

    def __call__(self, shape: str, *args) -> torch.Tensor:
        """Run the path chosen for this shape class; choose (and check) it on the first call."""
        key = f"{self.label} {shape}"
        chosen = self.verdicts.get(key)
        if chosen is not None:
            if chosen == "reference":
                return self.reference(*args)
            fn = self._fn(chosen)
            # a verdict names a path that built and passed for this shape class, and it builds the same for
            # every layer of that shape (the build depends on the shape, not on the weights)
            assert fn is not None, f"{key}: the {chosen} path was chosen but cannot be built for this layer"
            return fn(*args)
        if _capturing():  # no checks inside a CUDA-graph capture (warm-up runs before every capture)
            return self._first_available()(*args)
        ref = None
        names = [c.name for c in self.candidates]
        for i, name in enumerate(names):
            fn = self._fn(name)
            if fn is None:
                continue
            try:
                y = fn(*args)
                _sync(y)
            except Exception as e:
                problem = f"{type(e).__name__}: {_first_line(e)}"
            else:
                ref = self.reference(*args) if ref is None else ref
                err, tol = relative_error(y, ref), TOLERANCE.get(ref.dtype, 1e-3)
                if err <= tol:
                    self.verdicts.set(key, name)
                    return y
                problem = f"max error {err:.3g} of max |reference|, over the {tol:g} allowed"
            following = next((n for n in names[i + 1 :] if self._fn(n) is not None), "reference")
            warn_once(
                f"{key}/{name}",
                f"{self.label}: the {name} kernel failed its self-check for {shape} "
                f"({problem}); using the {following} path for this shape instead",
            )
        self.verdicts.set(key, "reference")
        return self.reference(*args) if ref is None else ref

    def _first_available(self) -> Callable:
        for c in self.candidates:
            fn = self._fn(c.name)
            if fn is not None:
                return fn
        return self.reference


class SelfCheck:
    """Verdicts per shape class ("W4 4096x12288 gemv m≤1 float16" → "triton"), shared by the layers that
    the owner (the decoder) hands it to; `report()` is what `run --json` prints under paths."""

    def __init__(self) -> None:
        self._verdicts: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        return self._verdicts.get(key)

    def set(self, key: str, path: str) -> None:
        self._verdicts[key] = path

    def report(self) -> dict[str, str]:
        return dict(sorted(self._verdicts.items()))


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _sync(y: torch.Tensor) -> None:
    """Surface an asynchronous launch failure here, where it can still fall back."""
    if y.is_cuda:
        torch.cuda.synchronize(y.device)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""
