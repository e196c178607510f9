"""`RuntimeOptions`: how a pipeline runs (device, dtype, context, encoder backend, threads, kernels, and
where the big tensors live: embeddings, KV cache, lm_head — docs/memory.md).

A frozen dataclass validated on construction, so that a typo fails before any weight is read; the CLI
builds one from its flags and the API takes one (or its fields as keyword arguments).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decoder import LM_HEAD_MODES
from .embedding import EMBEDDING_MODES
from .errors import OptionsError
from .kv_cache import KV_STORAGES

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_dtype(device: str) -> str:
    """The decoder's activation dtype when none is asked for — one rule for the API and the CLI: fp16 on
    CUDA (half fp32's KV cache and activation traffic; the GPTQ scales' own dtype), fp32 on CPU (most CPUs
    have no fast half-precision matmul, and fp32 is what the parity tests hold to transformers)."""
    return "fp16" if torch.device(device).type == "cuda" else "fp32"


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run: device, activation dtype, context size, encoder backend and threads.

    threads: intra-op CPU threads for torch and the ONNX Runtime encoder (one budget; ONNX Runtime does
    not spin-wait). None: the free cores — usable cores (affinity, cgroup quota) minus those other work
    keeps busy, sampled at load (runtime/threads.py, docs/threads.md). The pipeline owns
    the process's torch thread pool: torch has one intra-op thread count per process, shared by every
    thread (a `torch.set_num_threads` in one thread changes what all others get), so a pipeline built
    with threads=N calls `torch.set_num_threads(N)` once, at load, and it stays N — after the pipeline
    is done and for any other torch work in the process; of several pipelines, the last built wins.
    It is not set and restored around each call, because that cannot isolate anything: a stream session
    works on two threads at once (feeding and answering), and one thread's restore would change the
    other's pool mid-turn.
    """

    device: str = "cpu"
    dtype: str | None = None  # fp32 | fp16 | bf16; None: default_dtype(device) (fp16 on CUDA, fp32 on CPU), filled in
    max_context: int | None = None  # None: the config's max_position_embeddings, capped to fit memory
    encoder_backend: str = "onnx"  # onnx | torch
    encoder_precision: str | None = None  # fp32 | fp16 (which exported encoder); None: the export's default
    threads: int | None = None
    verify_hashes: bool = True
    w4_kernel: str = "auto"  # auto | ref | cpu | triton (GPTQ decoders only)
    w4_tune: bool = True  # Triton: time launch configs per layer shape on first use (kernels/w4_triton.py Tuner)
    # q/k/v and gate/up as one matmul each, and on CUDA one Triton launch per norm / RoPE / SwiGLU
    # (False keeps the checkpoint's modules and plain torch ops, e.g. for hooks or debugging)
    fuse: bool = True
    cuda_graphs: bool = True  # on CUDA: decode steps replayed as CUDA graphs (runtime/decode_graph.py)
    # Where the memory goes (docs/memory.md; runtime/memory_plan.py adds it up before anything is loaded):
    # the token-embedding table: auto | dtype | host | int8 | fp32 | fp16 | bf16 (runtime/embedding.py).
    # auto: host on CUDA (the table is read one row per token: 1.28 GB of device memory at 7B for an 8 KB
    # copy per decoded token), the device table ("dtype") on CPU, or when a dense tied head is the table.
    embeddings: str = "auto"
    # the KV cache's storage: auto (= dtype) | dtype | fp32 | fp16 | bf16 | int8 (runtime/kv_cache.py).
    # auto stays the activation dtype: int8 halves the cache but changes outputs slightly, so it is asked for.
    kv_cache: str = "auto"
    # the output head: auto (int8 when the export wrote the side file, else dense) | dtype (dense, in the
    # activation dtype) | int8 (the side file, or the dense head quantized at load by the same rule)
    lm_head: str = "auto"

    def __post_init__(self) -> None:
        if self.encoder_backend not in ("onnx", "torch"):
            raise OptionsError(f"encoder backend must be onnx or torch, got {self.encoder_backend!r}")
        if self.max_context is not None and self.max_context < 2:
            raise OptionsError(f"max_context must be ≥ 2, got {self.max_context}")
        if self.w4_kernel not in ("auto", "ref", "cpu", "triton"):
            raise OptionsError(f"w4 kernel must be auto, ref, cpu or triton, got {self.w4_kernel!r}")
        if self.embeddings not in EMBEDDING_MODES:
            raise OptionsError(f"embeddings must be one of {', '.join(EMBEDDING_MODES)}, got {self.embeddings!r}")
        if self.kv_cache not in ("auto", *KV_STORAGES):
            raise OptionsError(f"kv cache must be auto or one of {', '.join(KV_STORAGES)}, got {self.kv_cache!r}")
        if self.lm_head not in LM_HEAD_MODES:
            raise OptionsError(f"lm head must be one of {', '.join(LM_HEAD_MODES)}, got {self.lm_head!r}")
        if self.threads is not None and self.threads < 1:
            raise OptionsError(f"threads must be ≥ 1, got {self.threads}")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, ValueError) as e:
            raise OptionsError(f"device {self.device!r} is not a device name: use cpu, cuda or cuda:N") from e
        if dev.type not in ("cpu", "cuda"):
            raise OptionsError(f"device {self.device!r} is not supported: use cpu, cuda or cuda:N")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise OptionsError(f"device {self.device!r} requested but torch sees no CUDA GPU; use --device cpu")
            if (dev.index or 0) >= torch.cuda.device_count():
                raise OptionsError(f"device {self.device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        if self.dtype is None:
            object.__setattr__(self, "dtype", default_dtype(self.device))  # resolved once: options.dtype is always set
        if self.dtype not in DTYPES:
            raise OptionsError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


def decoder_load_kwargs(options: RuntimeOptions) -> dict:
    """The keyword arguments of `decoder.load_decoder` that come from the options (one place to extend)."""
    return {
        "w4_kernel": options.w4_kernel,
        "fuse": options.fuse,
        "w4_tune": options.w4_tune,
        "embeddings": options.embeddings,
        "kv_cache": options.kv_cache,
        "lm_head": options.lm_head,
    }
