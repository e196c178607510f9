"""Token generation: prefill, one-token decode, sampling, stop rules and UTF-8-safe text streaming.

Token choice follows transformers' logits-processor order (repetition penalty over every id seen so far,
prompt included; n-gram ban; minimum length; then, when sampling, temperature, top-k, top-p, min-p), so
greedy runs are token-identical to `generate()` and seeded runs comparable. Which options a checkpoint's
generation_config.json gives is decided in generation_config.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .decoder import KVCache, Qwen2Decoder
from .errors import LimitError, NumericalError, OptionsError


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick tokens; every field means what the same-named transformers `GenerationConfig` key means.

    The defaults are transformers' own (`GenerationConfig()` as `generate()` completes it): greedy (do_sample
    False), temperature 1.0, top-k 50, top-p 1.0, no min-p, repetition penalty 1.0 — except
    `max_new_tokens`, 256 here (transformers falls back to 20). `Pipeline.default_sampling()` fills them
    from the checkpoint's generation_config.json instead (runtime/generation_config.py).

    greedy: argmax (transformers' `do_sample=False`); temperature, top-k, top-p and min-p apply only when
    sampling and are then validated. The repetition penalty, the n-gram ban and the minimum length apply
    in both modes. `min_length` / `max_length` count the whole sequence (conversation so far + answer)
    as transformers does; `max_length` only matters where it is smaller than `max_new_tokens` allows.
    """

    max_new_tokens: int = 256
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    min_length: int = 0
    max_length: int | None = None
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise OptionsError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if not self.repetition_penalty > 0:
            raise OptionsError(f"repetition_penalty must be > 0 (1.0 disables it), got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise OptionsError(f"no_repeat_ngram_size must be ≥ 0 (0 disables it), got {self.no_repeat_ngram_size}")
        if self.min_new_tokens < 0 or self.min_length < 0:
            raise OptionsError(
                f"min_new_tokens and min_length must be ≥ 0, got {self.min_new_tokens} and {self.min_length}"
            )
        if self.max_length is not None and self.max_length < 1:
            raise OptionsError(f"max_length must be ≥ 1, got {self.max_length}")
        if self.greedy:
            return  # the sampling parameters are not used (transformers ignores them too)
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise OptionsError(f"temperature must be > 0 (use --greedy for argmax), got {self.temperature}")
        if self.top_k < 0:
            raise OptionsError(f"top_k must be ≥ 0 (0 disables it), got {self.top_k}")
        if not 0 <= self.top_p <= 1:
            raise OptionsError(f"top_p must be in [0, 1] (1 disables it), got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise OptionsError(f"min_p must be in [0, 1], got {self.min_p}")


def process_logits(
    logits: torch.Tensor, seen: torch.Tensor, opts: SamplingOptions, banned: Sequence[int] = ()
) -> torch.Tensor:
    """logits [V] → processed scores [V] fp32, in transformers' order: repetition penalty (over `seen`, every
    id so far, prompt included), the `banned` ids → −inf (n-gram ban, minimum length), then when sampling
    temperature, top-k, top-p, min-p (filtered → −inf)."""
    scores = logits.float().clone()
    if opts.repetition_penalty != 1.0 and seen.numel():
        picked = scores.gather(0, seen)
        picked = torch.where(picked < 0, picked * opts.repetition_penalty, picked / opts.repetition_penalty)
        scores.scatter_(0, seen, picked)
    banned = [i for i in banned if 0 <= i < scores.numel()]
    if banned:
        scores[torch.tensor(banned, device=scores.device)] = -math.inf
    if opts.greedy:
        return scores
    if opts.temperature != 1.0:
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
    if opts.min_p is not None:
        probs = scores.softmax(-1)
        remove = probs < opts.min_p * probs.max()
        remove[probs.argmax()] = False  # always keep the most likely token
        scores = scores.masked_fill(remove, -math.inf)
    return scores


class NgramBan:
    """transformers' no_repeat_ngram_size: ids that would repeat an n-gram already in the sequence (prompt
    included). Kept incrementally: prefix of n−1 ids → ids that followed it."""

    def __init__(self, n: int, ids: Sequence[int]):
        self.n = n
        self.ids: list[int] = []
        self.table: dict[tuple[int, ...], set[int]] = {}
        for i in ids:
            self.push(i)

    def push(self, token: int) -> None:
        self.ids.append(int(token))
        if len(self.ids) >= self.n:
            gram = self.ids[len(self.ids) - self.n :]
            self.table.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def banned(self) -> set[int]:
        if len(self.ids) < self.n:
            return set()
        return self.table.get(tuple(self.ids[len(self.ids) - self.n + 1 :]), set())


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

    `history` holds every id already in the cache plus the prompt's (what transformers' `input_ids` would
    hold: the repetition penalty, n-gram ban and min/max_length see it); new ids are appended to it. Stops
    on a stop id (unless ignore_eos; `min_new_tokens`/`min_length` hold them back), max_new_tokens or
    max_length, or a full cache (`stats.finish_reason` is "stop", "length" or "context_full"), or when
    `should_stop()` (polled before each decode step) returns True ("cancelled", e.g. barge-in). `step(token, pos) -> logits` replaces the
    dynamic decode forward (runtime/decode_graph.py: the static, CUDA-graph-replayed step). `first_logits` (the last-position
    logits of a prefill of `prompt_len` positions already run into the cache, e.g. speculatively) skips
    the prefill; `prompt_embeds` may then be None.
    """
    if first_logits is not None and prompt_len is not None:
        device, n_prompt = first_logits.device, int(prompt_len)
    elif first_logits is None and prompt_embeds is not None:
        device, n_prompt = prompt_embeds.device, int(prompt_embeds.shape[1])
    else:
        raise ValueError("generate() needs prompt_embeds, or first_logits with prompt_len")
    gen = torch.Generator(device="cpu")
    if opts.seed is not None:
        gen.manual_seed(opts.seed)
    else:
        gen.seed()
    seen_set = set(history)
    seen = torch.tensor(sorted(seen_set), dtype=torch.long, device=device)
    stops = set() if opts.ignore_eos else set(stop_ids)
    n_history = len(history)
    limit = opts.max_new_tokens
    if opts.max_length is not None:
        if n_history >= opts.max_length:
            raise LimitError(
                f"the sequence is already {n_history} tokens but the generation config's max_length is "
                f"{opts.max_length}: set max_new_tokens (--max-new-tokens), which takes precedence"
            )
        limit = min(limit, opts.max_length - n_history)
    min_new = max(opts.min_new_tokens, opts.min_length - n_history)
    ngrams = NgramBan(opts.no_repeat_ngram_size, history) if opts.no_repeat_ngram_size else None
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
        banned = set(ngrams.banned()) if ngrams is not None else set()
        if n_new < min_new:
            banned |= stops
        token = pick_token(process_logits(logits, seen, opts, sorted(banned)), opts, gen)
        n_new += 1
        history.append(token)
        if ngrams is not None:
            ngrams.push(token)
        stats.token_ids.append(token)
        if stats.first_token_s is None:
            stats.first_token_s = time.perf_counter()
        if token not in seen_set:
            seen_set.add(token)
            seen = torch.cat([seen, torch.tensor([token], device=device)])
        yield token
        if token in stops:
            stats.finish_reason = "stop"
            break
        if n_new >= limit:
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


@torch.inference_mode()
def greedy_decode(
    model: Qwen2Decoder, embeds: torch.Tensor, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()
) -> list[int]:
    """The model's plain greedy answer, from scratch: a KV cache of its own, one prefill of `embeds`
    ([1, S, hidden]: the embeddings of `ids` with the audio in place, prompt.embed_prompt), then argmax
    with no repetition penalty, n-gram ban or minimum length, until one of `stop_ids` or `max_new_tokens`
    (no stop ids: exactly max_new_tokens).

    The fixed reference that compare, evaluation and the tests hold other paths to: it depends neither
    on the checkpoint's generation config nor on any conversation's cache (which it leaves untouched).
    """
    opts = SamplingOptions(max_new_tokens=max_new_tokens, greedy=True, repetition_penalty=1.0)
    cache = model.setup_cache(len(ids) + max_new_tokens)
    return list(generate(model, cache, embeds, 0, list(ids), opts, stop_ids, GenerationStats()))
