"""Token generation: prefill, one-token decode, sampling, stop rules and UTF-8-safe text streaming.

Sampling follows transformers' logits-processor order (repetition penalty over every id seen so far,
prompt included; then temperature, top-k, top-p), so seeded runs are comparable with `generate()`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .decoder import KVCache, Qwen2Decoder
from .errors import NumericalError, OptionsError


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick tokens. `greedy=True` ignores temperature/top-k/top-p (repetition penalty still applies)."""

    max_new_tokens: int = 256
    greedy: bool = False
    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 0.5
    repetition_penalty: float = 1.1
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise OptionsError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if not self.greedy and not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise OptionsError(f"temperature must be > 0 (use --greedy for argmax), got {self.temperature}")
        if self.top_k < 0:
            raise OptionsError(f"top_k must be ≥ 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise OptionsError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise OptionsError(f"repetition_penalty must be > 0 (1.0 disables it), got {self.repetition_penalty}")

    @classmethod
    def from_generation_config(cls, gen: dict, **overrides) -> "SamplingOptions":
        """Defaults from the checkpoint's generation_config.json, then explicit overrides."""
        base = {}
        if "do_sample" in gen:
            base["greedy"] = not gen["do_sample"]
        for key in ("temperature", "top_k", "top_p", "repetition_penalty"):
            if gen.get(key) is not None:
                base[key] = gen[key]
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


def process_logits(logits: torch.Tensor, seen: torch.Tensor, opts: SamplingOptions) -> torch.Tensor:
    """logits [V] fp32 → processed scores [V] (repetition penalty, temperature, top-k, top-p → −inf)."""
    scores = logits.float().clone()
    if opts.repetition_penalty != 1.0 and seen.numel():
        picked = scores.gather(0, seen)
        picked = torch.where(picked < 0, picked * opts.repetition_penalty, picked / opts.repetition_penalty)
        scores.scatter_(0, seen, picked)
    if opts.greedy:
        return scores
    scores = scores / opts.temperature
    if 0 < opts.top_k < scores.numel():
        kth = torch.topk(scores, opts.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if opts.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        remove = cum <= (1 - opts.top_p)
        remove[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(remove.scatter(0, order, remove), -math.inf)
    return scores


def pick_token(scores: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None) -> int:
    if opts.greedy:
        return int(scores.argmax())
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class IncrementalDetokenizer:
    """Turns a growing list of ids into text deltas that never split a UTF-8 character.

    Decodes a small window of recent ids and emits only text that is complete (no trailing U+FFFD).
    Ids the tokenizer does not have (the model's vocab can be larger, e.g. 156032 vs ~151.6k) and
    special tokens decode to nothing.
    """

    def __init__(self, tokenizer, skip_ids: Sequence[int] = ()):
        self.tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.skip = set(skip_ids)
        self.ids: list[int] = []
        self.prefix = 0  # start of the window being decoded
        self.read = 0  # ids whose text was already emitted

    def _decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if 0 <= i < self.vocab_size and i not in self.skip]
        return self.tok.decode(ids, skip_special_tokens=True) if ids else ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Text still held back at the end (an incomplete character is emitted as U+FFFD, not lost)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""


@dataclass
class GenerationStats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0  # tokens produced by decode steps (excludes the one from the prefill)
    decode_s: float = 0.0
    first_token_s: float | None = None
    finish_reason: str = ""
    token_ids: list[int] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_finite(logits: torch.Tensor, where: str) -> None:
    if not torch.isfinite(logits).all():
        raise NumericalError(
            f"the decoder produced NaN/Inf logits during {where} (likely fp16 overflow); rerun with --dtype fp32 or bf16"
        )


@torch.inference_mode()
def generate(
    model: Qwen2Decoder,
    cache: KVCache,
    prompt_embeds: torch.Tensor | None,
    start: int,
    history: list[int],
    opts: SamplingOptions,
    stop_ids: Sequence[int],
    stats: GenerationStats,
    on_prefill_done: Callable[[], None] | None = None,
    first_logits: torch.Tensor | None = None,
    prompt_len: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    step: Callable[[int, int], torch.Tensor] | None = None,
) -> Iterator[int]:
    """Prefill `prompt_embeds` [1, S, H] at position `start`, then decode; yields each new token id.

    `history` holds every id already in the cache plus the prompt's (for the repetition penalty); new
    ids are appended to it. Stops on a stop id (unless ignore_eos), max_new_tokens, or a full cache
    (`stats.finish_reason` is "stop", "length" or "context_full"), or when `should_stop()` (polled before
    each decode step) returns True ("cancelled", e.g. barge-in). `step(token, pos) -> logits` replaces the
    dynamic decode forward (runtime/decode_graph.py: the static, CUDA-graph-replayed step). `first_logits` (the last-position
    logits of a prefill of `prompt_len` positions already run into the cache, e.g. speculatively) skips
    the prefill; `prompt_embeds` may then be None.
    """
    if first_logits is None and prompt_embeds is None:
        raise ValueError("generate() needs prompt_embeds, or first_logits with prompt_len")
    device = first_logits.device if first_logits is not None else prompt_embeds.device
    n_prompt = prompt_embeds.shape[1] if first_logits is None else int(prompt_len)
    gen = torch.Generator(device="cpu")
    if opts.seed is not None:
        gen.manual_seed(opts.seed)
    else:
        gen.seed()
    seen_set = set(history)
    seen = torch.tensor(sorted(seen_set), dtype=torch.long, device=device)
    stops = set(stop_ids)
    t0 = time.perf_counter()
    if first_logits is None:
        logits = model(prompt_embeds, start, cache)[0, -1]
        _check_finite(logits, "prefill")
        _sync(device)
        stats.prefill_tokens += n_prompt
        stats.prefill_s += time.perf_counter() - t0
    else:
        logits = first_logits
    if on_prefill_done:
        on_prefill_done()
    pos = start + n_prompt
    t_decode = time.perf_counter()
    n_new = 0
    while True:
        token = pick_token(process_logits(logits, seen, opts), opts, gen)
        n_new += 1
        history.append(token)
        stats.token_ids.append(token)
        if stats.first_token_s is None:
            stats.first_token_s = time.perf_counter()
        if token not in seen_set:
            seen_set.add(token)
            seen = torch.cat([seen, torch.tensor([token], device=device)])
        yield token
        if token in stops and not opts.ignore_eos:
            stats.finish_reason = "stop"
            break
        if n_new >= opts.max_new_tokens:
            stats.finish_reason = "length"
            break
        if pos >= cache.max_context:
            stats.finish_reason = "context_full"
            break
        if should_stop is not None and should_stop():
            stats.finish_reason = "cancelled"
            break
        # The sampled token is fed back so the cache holds it (needed for the next chat turn too).
        if step is not None:
            logits = step(token, pos)
        else:
            logits = model(model.embed(torch.tensor([[token]], device=device)), pos, cache)[0, -1]
        _check_finite(logits, f"decode step {n_new}")
        pos += 1
    _sync(device)
    stats.decode_tokens += n_new - 1  # decode forward passes; the first token came from the prefill
    stats.decode_s += time.perf_counter() - t_decode
