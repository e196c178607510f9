"""Batch-1 decode with static shapes, replayed as CUDA graphs: one graph launch per token instead of ~10
kernel launches per layer, and no host→device copy of the token or its position.

A decode step at 7B W4 on a fast GPU reads ~3.4 GB in a few milliseconds, while eager PyTorch spends
tens of microseconds of CPU time launching each of its ~350 kernels — the launches, not the bandwidth,
would bound the tokens per second. `Qwen2Decoder.step` takes the token and position as device tensors
and attends over a fixed-size prefix ("bucket") of the static KV cache with a mask, so its shapes depend
only on the bucket. `DecodeStep` captures it once per bucket (powers of two from `min_bucket`, capped at
the cache size; a graph is captured the first time the context reaches its bucket) and replays it.
Attending over the bucket instead of the exact context reads at most twice the needed KV, a small
share of the weights' bytes at conversational lengths.

The same static step runs eagerly where CUDA graphs are unavailable (CPU, or `graphs=False`): that is
the reference twin that tests compare with the dynamic `Qwen2Decoder.forward`.

With the embedding table in host memory (RuntimeOptions.embeddings = "host", runtime/embedding.py) the
gather cannot be recorded: the graph then starts from a static embedding buffer, which each call fills
with the token's row (gathered on the host, copied asynchronously on the same stream) before the replay.
"""

from __future__ import annotations

import torch

from .decoder import KVCache, Qwen2Decoder
from .embedding import HostEmbedding


class DecodeStep:
    """`step(token, pos) -> logits [vocab]` for one batch-1 decode step at position `pos`.

    The logits tensor returned on the graph path is a static buffer overwritten by the next call: read
    it (sample) before calling again. The captured graphs read the cache's K/V and RoPE tables, which
    belong to `cache` alone, so making other caches from the same model never invalidates them.
    """

    def __init__(self, model: Qwen2Decoder, cache: KVCache, *, graphs: bool | None = None, min_bucket: int = 256):
        device = cache.k.device
        self.model, self.cache = model, cache
        self.graphs = (device.type == "cuda") if graphs is None else graphs
        if self.graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need the model and cache on a CUDA device")
        self.min_bucket = min_bucket
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        # host table: the step reads the embedding from this buffer (filled outside the graph); else None
        self.embeds: torch.Tensor | None = None
        if not model.graph_safe_embedding:
            self.embeds = torch.zeros(1, 1, model.args.hidden_size, dtype=cache.dtype, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self._captured: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: torch.cuda._POOL_HANDLE | None = None  # the graphs' shared memory pool, after the first capture

    def bucket(self, pos: int) -> int:
        """The smallest power-of-two prefix (≥ min_bucket, ≤ the cache) that holds positions 0…pos."""
        size = self.min_bucket
        while size <= pos:
            size *= 2
        return min(size, self.cache.max_context)

    def _eager(self, bucket: int) -> torch.Tensor:
        if self.embeds is not None:
            return self.model.step_embeds(self.embeds, self.pos, self.cache, bucket)
        return self.model.step(self.token, self.pos, self.cache, bucket)

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # The model's GPU is made current (also when it is not cuda:0): streams, the capture and Triton's
        # launches all follow the current device.
        with torch.cuda.device(self.cache.k.device):
            # Warm up on a side stream (Triton compiles/autotunes, cuBLAS picks kernels), then capture. Both
            # write the current position's K/V, which the replay writes again with the same values.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._eager(bucket)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the capture may run on a stream session's answer thread while the feeding thread
            # computes mel frames; only this thread's CUDA calls are restricted during capture.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = self._eager(bucket)
        self._pool = graph.pool()
        return graph, out

    def captured(self, pos: int) -> torch.cuda.CUDAGraph | None:
        """The graph already captured for `pos`'s bucket, if any (benchmarks replay it to time one step)."""
        entry = self._captured.get(self.bucket(pos))
        return entry[0] if entry is not None else None

    @torch.inference_mode()
    def __call__(self, token: int, pos: int) -> torch.Tensor:
        if pos >= self.cache.max_context:
            raise ValueError(f"position {pos} is past the KV cache ({self.cache.max_context})")
        if self.embeds is not None:
            ids = torch.tensor([[token]])  # on the host: the row is gathered there
            embed = self.model.model.embed_tokens
            if isinstance(embed, HostEmbedding):
                embed(ids, out=self.embeds)  # straight from the pinned rows into the graph's input
            else:
                self.embeds.copy_(embed(ids))
        else:
            self.token.fill_(token)
        self.pos.fill_(pos)
        bucket = self.bucket(pos)
        if not self.graphs:
            return self._eager(bucket)
        if bucket not in self._captured:
            self._captured[bucket] = self._capture(bucket)
        graph, out = self._captured[bucket]
        with torch.cuda.device(self.cache.k.device):
            graph.replay()
        return out
