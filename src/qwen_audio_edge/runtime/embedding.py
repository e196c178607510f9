"""Where the token-embedding table lives: on the device (as loaded, or another float dtype), in host memory,
or as int8 on the device. Each class maps ids → embeddings [.., hidden] on the decoder's device, in the
activation dtype; `load_decoder` swaps one in for `model.embed_tokens` (RuntimeOptions.embeddings).

Why: the table is Qwen2-Audio-7B's largest single tensor (156,032 × 4096, 1.28 GB in fp16) yet each token
reads one row of it: it costs memory, not bandwidth. On an 8 GB card that is a fifth of the memory.
- "host": the table stays in host memory (pinned when the device is CUDA, so the copy is a DMA); each call
  gathers the rows on the host and copies them to the device (`non_blocking`). A decode step copies one
  row (8 KB at 7B fp16). A gather on the host cannot be recorded in a CUDA graph, so a graph-replayed decode
  step (runtime/decode_graph.py) takes the embedding as a static input buffer, filled before each replay.
- "int8": symmetric per-row int8 + one fp32 scale per row on the device (half the bytes); rows are
  dequantized on gather, within scale / 2 of the table's values.
- a float dtype ("fp32" | "fp16" | "bf16"): the table on the device in that dtype, rows cast to the
  activation dtype on gather ("dtype", the default, keeps the checkpoint's nn.Embedding as loaded).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import OptionsError

EMBEDDING_MODES = ("auto", "dtype", "host", "int8", "fp32", "fp16", "bf16")
_FLOAT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_embeddings(mode: str, device: torch.device | str, *, tied_dense_head: bool) -> str:
    """What "auto" means here: "host" on CUDA, unless the dense lm_head is the embedding table itself (tied
    weights: the table is on the device anyway, so a host copy would save nothing); "dtype" elsewhere (on a
    CPU the host is the device). Other modes are returned as given."""
    if mode not in EMBEDDING_MODES:
        raise OptionsError(f"embeddings must be one of {', '.join(EMBEDDING_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    return "host" if torch.device(device).type == "cuda" and not tied_dense_head else "dtype"


class DeviceEmbedding(nn.Module):
    """The table on the device in its own float dtype; rows cast to the activation dtype."""

    weight: torch.Tensor
    graph_safe = True  # the gather is a device op: a CUDA graph may record it

    def __init__(self, table: torch.Tensor, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.register_buffer("weight", table.to(device))
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids.to(self.weight.device)].to(self.dtype)


class Int8Embedding(nn.Module):
    """Per-row symmetric int8 table + fp32 row scales on the device; rows dequantized on gather."""

    weight: torch.Tensor
    scales: torch.Tensor
    graph_safe = True

    def __init__(self, table: torch.Tensor, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        from .quant_linear import quantize_int8_rows  # the lm_head's int8 rule, in row chunks

        q, scales = quantize_int8_rows(table)
        self.register_buffer("weight", q.to(device))
        self.register_buffer("scales", scales.to(device))
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.weight.device)
        return self.weight[ids].to(self.dtype) * self.scales[ids].unsqueeze(-1).to(self.dtype)


class HostEmbedding(nn.Module):
    """The table in host memory (pinned for a CUDA device); rows gathered on the host, copied to the device.

    The table is a plain attribute, not a buffer: `module.to(device)` and `state_dict()` leave it alone.
    """

    graph_safe = False  # a host gather cannot be recorded in a CUDA graph

    def __init__(self, table: torch.Tensor, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.device, self.dtype = torch.device(device), dtype
        host = table.to("cpu", dtype)
        self.pinned = self.device.type == "cuda"
        if self.pinned:  # DMA-able: the copy to the device runs asynchronously, without a staging copy
            host = host.pin_memory()
        self.table = host

    @property
    def weight(self) -> torch.Tensor:
        """The host table (prompt.embed_prompt puts its ids where `weight` lives: here, on the host)."""
        return self.table

    def forward(self, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of `ids` (any device; host ids avoid a sync) on the device; into `out` if given (a static
        buffer of a CUDA graph, shape [*ids.shape, hidden])."""
        flat = ids.reshape(-1).to("cpu")
        if not self.pinned:
            rows = self.table.index_select(0, flat).view(*ids.shape, -1)
            return rows if out is None else out.copy_(rows)
        # A fresh pinned block per call: torch's caching host allocator does not reuse it until the
        # asynchronous copy that reads it has finished, so the next call cannot overwrite rows in flight.
        rows = torch.empty((flat.numel(), self.table.shape[1]), dtype=self.dtype, pin_memory=True)
        torch.index_select(self.table, 0, flat, out=rows)
        rows = rows.view(*ids.shape, -1)
        if out is not None:
            return out.copy_(rows, non_blocking=True)
        return rows.to(self.device, non_blocking=True)


def build_embedding(
    table: torch.Tensor, mode: str, dtype: torch.dtype, device: torch.device | str
) -> DeviceEmbedding | HostEmbedding | Int8Embedding:
    """The embedding module for a resolved `mode` (not "auto" or "dtype": those keep nn.Embedding) from the
    table as read from the checkpoint (on the host)."""
    if mode == "host":
        return HostEmbedding(table, dtype, device)
    if mode == "int8":
        return Int8Embedding(table, dtype, device)
    if mode in _FLOAT:
        return DeviceEmbedding(table.to(_FLOAT[mode]), dtype, device)
    raise ValueError(f"build_embedding: mode {mode!r} has no module of its own")


# What `Qwen2Decoder.model.embed_tokens` may be: the checkpoint's nn.Embedding ("dtype") or one of the above.
TokenEmbedding = nn.Embedding | DeviceEmbedding | HostEmbedding | Int8Embedding
