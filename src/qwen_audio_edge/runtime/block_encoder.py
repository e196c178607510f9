"""Block-causal audio encoder for the chunked stream mode: each block attends to every earlier block.

Why: the first chunked rule encoded each block on its own (attention inside the block only, as
Qwen2.5-Omni's encoder, which was trained that way). On trained Whisper weights that wrecked
recognition — 52.4 % WER with 2 s blocks against 11.5 % exact (bench/fidelity.py, docs/fidelity.md) —
because every token lost all context outside its block. Here a block's tokens attend to the keys/values of all earlier
blocks (cached per layer, like a decoder's KV cache, so a block costs O(block × utterance), not a
re-encode), to their own block, and to `lookahead` frames after the block. The look-ahead rows are
computed with the block and thrown away; the block's rows and cached keys/values are final once the
look-ahead has arrived, so earlier blocks never change and can be prefilled into the decoder while the
person speaks. The two convolutions see the real frames on both sides of a block (two before, two
after), so the conv front is exact; the Whisper clamp is the running max up to the block's last input
frame (runtime/chunked.py).

`BlockCausalEncoder` runs over the artifacts' torch encoder weights (encoder.safetensors), one instance
per utterance; `tower_block` is the pure function under it, also used by bench/fidelity.py to read
per-frame encoder states.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F

from .encoder import AudioEncoderWithProjector, _AudioTower, _EncoderLayer, pool_pairs


@dataclass
class LayerCache:
    """Final keys/values [heads, rows, head_dim] of every earlier block, one entry per encoder layer."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return int(self.keys[0].shape[1]) if self.keys else 0


@dataclass(frozen=True)
class BlockInput:
    """One block's encoder input: mel [n_mels, F] = `left` context frames, the block's frames, its
    look-ahead frames, then two frames for the convolutions; `rows` tokens of the block are kept."""

    mel: torch.Tensor
    left: int  # 0 at the utterance start, else 2 (real frames before the block for the convolutions)
    rows: int  # conv2 positions that belong to the block (final after this call)
    extra_rows: int  # conv2 positions of the look-ahead (computed, then discarded)
    pos_offset: int  # the block's first conv2 position in the utterance


def tower_block(tower: _AudioTower, block: BlockInput, cache: LayerCache | None) -> torch.Tensor:
    """Hidden states [rows, d] (before the final LayerNorm) of one block; appends its keys/values to `cache`.

    With `cache=None` the block sees only itself (and its look-ahead).
    """
    dtype = tower.conv1.weight.dtype
    x = F.gelu(tower.conv1(block.mel.to(dtype).unsqueeze(0)))
    x = F.gelu(tower.conv2(x)).transpose(1, 2)[0]  # [P, d]
    first = 1 if block.left else 0  # position 0 of a left-padded input is centred before the block
    n = block.rows + block.extra_rows
    x = x[first : first + n]
    if x.shape[0] != n:
        raise ValueError(f"block input gives {x.shape[0]} positions, {n} expected")
    x = x + tower.embed_positions.weight[block.pos_offset : block.pos_offset + n].to(x.dtype)
    # nn.ModuleList is not generic: its items are typed as plain Modules, but the tower builds only _EncoderLayer
    layers = cast("Sequence[_EncoderLayer]", tower.layers)
    for i, layer in enumerate(layers):
        h = layer.self_attn_layer_norm(x)
        a = layer.self_attn
        heads = layer.n_heads
        q, k, v = (proj(h).view(n, heads, -1).transpose(0, 1) for proj in (a.q_proj, a.k_proj, a.v_proj))
        if cache is not None and i < len(cache.keys):
            keys, values = torch.cat([cache.keys[i], k], 1), torch.cat([cache.values[i], v], 1)
        else:
            keys, values = k, v
        if cache is not None:  # keep everything but the look-ahead rows: they are recomputed with the next block
            kept = keys.shape[1] - block.extra_rows
            if i < len(cache.keys):
                cache.keys[i], cache.values[i] = keys[:, :kept], values[:, :kept]
            else:
                cache.keys.append(keys[:, :kept])
                cache.values.append(values[:, :kept])
        o = F.scaled_dot_product_attention(q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0))[0]
        x = x + a.out_proj(o.transpose(0, 1).reshape(n, -1))
        x = x + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))
        if x.dtype == torch.float16:
            limit = torch.finfo(torch.float16).max - 1000
            x = x.clamp(-limit, limit)
    return x[: block.rows]


class BlockCausalEncoder:
    """Encoder + projector of one utterance, block by block: `encode(block)` → audio embeddings [N, hidden].

    Each call's block must follow the previous one. Blocks have an even number of rows except the
    utterance's last, so pooling pairs stays inside a block, as in the exact encoder.
    """

    def __init__(self, module: AudioEncoderWithProjector, device: torch.device | str = "cpu"):
        self.module = module
        self.device = torch.device(device)
        self.cache = LayerCache()
        self.next_pos = 0

    def fork(self) -> BlockCausalEncoder:
        """A copy whose later blocks do not touch this one's cache (speculative or not-yet-committed work)."""
        twin = BlockCausalEncoder(self.module, self.device)
        twin.cache = LayerCache(list(self.cache.keys), list(self.cache.values))
        twin.next_pos = self.next_pos
        return twin

    @torch.inference_mode()
    def encode(self, block: BlockInput) -> torch.Tensor:
        if block.pos_offset != self.next_pos:
            raise ValueError(f"block at position {block.pos_offset} does not follow the previous one ({self.next_pos})")
        tower = self.module.audio_tower
        h = tower_block(tower, dataclasses.replace(block, mel=block.mel.to(self.device)), self.cache)
        self.next_pos += block.rows
        if h.shape[0] < 2:  # a last block of one position: the pool drops it, as the exact encoder does
            return h.new_zeros(0, self.module.config.output_dim).float()
        pooled = pool_pairs(h.unsqueeze(0))[0]  # an odd last row is dropped
        return self.module.multi_modal_projector.linear(tower.layer_norm(pooled)).float()


@dataclass(frozen=True)
class BlockBatch:
    """Consecutive blocks to encode on `encoder`, in order: what the pipeline's `encode_mels` accepts
    besides plain (mel, valid frames) inputs. Give it a `fork()` for work that may be discarded."""

    encoder: BlockCausalEncoder
    blocks: tuple[BlockInput, ...]

    @property
    def tokens(self) -> int:
        """Audio tokens these blocks give (rows pooled in pairs; every block but the last has even rows)."""
        return sum(b.rows // 2 for b in self.blocks)

    def encode(self) -> torch.Tensor:
        out = [self.encoder.encode(b) for b in self.blocks]
        return torch.cat(out) if out else torch.zeros(0, self.encoder.module.config.output_dim)
