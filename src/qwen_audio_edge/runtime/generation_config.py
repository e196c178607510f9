"""A checkpoint's generation_config.json → `SamplingOptions` and stop ids, every key meaning what it means
in transformers (`GenerationConfig` + `generate()`, 5.x).

One function decides the options: `resolve_sampling(gen, **overrides)`. `Pipeline.default_sampling()` calls
it, and everything that runs without explicit `SamplingOptions` goes through that: the CLI (`run`,
`stream`), `Pipeline.run` / `Conversation.send` / `finish_turn` without `sampling=`, `StreamSession`.

- An absent (or null) key means transformers' default (`GenerationConfig._get_default_generation_params()`,
  which `generate()` fills in): do_sample False (greedy), temperature 1.0, top_k 50, top_p 1.0,
  repetition_penalty 1.0, no min_p / n-gram ban / minimum length — not Qwen2-Audio-Instruct's values.
  One deliberate difference: with neither max_new_tokens nor max_length anywhere, an answer is capped at
  256 new tokens (DEFAULT_MAX_NEW_TOKENS); transformers falls back to 20 and warns that this is a placeholder.
- No generation_config.json at all (the export then records {}): transformers builds the config from
  config.json (`GenerationConfig.from_model_config`: its top-level keys, then the text config's for what is
  still unset, e.g. eos_token_id). `effective_generation_config` does the same from the config.json the
  manifest records.
- Overrides (`default_sampling(...)` arguments, the CLI's flags) win over the file, max_new_tokens included
  (the file's is a default). As in transformers, max_new_tokens (from anywhere) makes max_length moot and
  min_new_tokens makes min_length moot.
- Keys that change the tokens and that we implement: do_sample, temperature, top_k, top_p, min_p,
  repetition_penalty, no_repeat_ngram_size, min_new_tokens, min_length, max_new_tokens, max_length and
  eos_token_id (an int or a list: every id is a stop id; absent: no stop id, as in transformers).
- Keys with no effect on one answer (IGNORED_KEYS: metadata, other special tokens, cache/compile settings,
  output format, beam-search-only keys with num_beams 1, assistant-model knobs, NaN handling): accepted.
- Keys that change the tokens in transformers and that we do not implement (UNSUPPORTED): an OptionsError
  naming the key, its value and what to do — only when the value is active (e.g. num_beams > 1, typical_p < 1
  while sampling), judged after the overrides (`--greedy` makes typical_p moot, as in transformers).
- Keys transformers does not know: transformers keeps them as attributes and never reads them, so we
  accept them too, with one warning per key and process (a key from a newer transformers might change
  decoding there) — except Qwen's own informational `chat_format`, accepted silently.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from .errors import OptionsError
from .generate import SamplingOptions

DEFAULT_MAX_NEW_TOKENS = 256

# Keys we implement (each maps onto a SamplingOptions field, or the stop ids).
IMPLEMENTED_KEYS = frozenset(
    {
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repetition_penalty",
        "no_repeat_ngram_size",
        "min_new_tokens",
        "min_length",
        "max_new_tokens",
        "max_length",
        "eos_token_id",
    }
)

# Keys that cannot change the tokens of one answer here, whatever their value.
IGNORED_KEYS = frozenset(
    {
        # metadata
        "transformers_version",
        "_from_model_config",
        "_commit_hash",
        "_original_object_hash",
        # special tokens other than eos: padding (one sequence, none), encoder-decoder start
        "pad_token_id",
        "bos_token_id",
        "decoder_start_token_id",
        # cache / compilation / memory: same tokens
        "use_cache",
        "cache_implementation",
        "cache_config",
        "max_cache_len",
        "compile_config",
        "disable_compile",
        "prefill_chunk_size",
        "continuous_batching_config",
        "low_memory",
        # what generate() returns besides the ids
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "output_logits",
        "return_dict_in_generate",
        # beam search only (num_beams > 1 is refused)
        "early_stopping",
        "length_penalty",
        "num_beam_groups",
        "diversity_penalty",
        # assisted / speculative decoding: used only with an assistant model passed to generate(), or lossless
        # (prompt lookup, early-exit self-speculation, MTP: the same greedy tokens, the same distribution)
        "num_assistant_tokens",
        "num_assistant_tokens_schedule",
        "assistant_confidence_threshold",
        "assistant_lookbehind",
        "target_lookbehind",
        "max_matching_ngram_size",
        "assistant_ensemble_weight",
        "speculation_type",
        "prompt_lookup_num_tokens",
        "assistant_early_exit",
        "use_mtp",
        # NaN/Inf replacement (we stop with a NumericalError instead) and a final log-softmax: same choice
        "remove_invalid_values",
        "renormalize_logits",
    }
)

# Keys from outside transformers that are known to be informational.
SILENT_UNKNOWN_KEYS = frozenset({"chat_format"})  # Qwen's remote code: the prompt format (we use the chat template)


@dataclasses.dataclass(frozen=True)
class Unsupported:
    key: str
    # (value, resolved options) → the key would change the tokens; the value is as generation_config.json
    # holds it (any JSON value: the predicates compare it with the neutral value its key expects)
    active: Callable[[Any, dict], bool]
    what: str
    fix: str


def _set(v, _o) -> bool:
    return v is not None


def _truthy(v, _o) -> bool:
    return bool(v)


def _sampling(pred: Callable[[Any], bool]) -> Callable[[Any, dict], bool]:
    return lambda v, o: v is not None and not o["greedy"] and pred(v)


def _not(neutral) -> Callable[[Any, dict], bool]:
    return lambda v, _o: v is not None and v != neutral


UNSUPPORTED = (
    Unsupported("num_beams", _not(1), "beam search", "set it to 1"),
    Unsupported("num_return_sequences", _not(1), "several answers per prompt", "set it to 1"),
    Unsupported(
        "penalty_alpha",
        lambda v, o: v is not None and v > 0 and o["greedy"] and o["top_k"] > 1,
        "contrastive search",
        "remove it",
    ),
    Unsupported("dola_layers", _set, "DoLa decoding", "remove it"),
    Unsupported("constraints", _set, "constrained beam search", "remove it"),
    Unsupported("force_words_ids", _set, "constrained beam search", "remove it"),
    Unsupported("typical_p", _sampling(lambda v: v < 1.0), "typical sampling", "set it to 1.0"),
    Unsupported("epsilon_cutoff", _sampling(lambda v: 0 < v < 1), "epsilon sampling", "set it to 0.0"),
    Unsupported("eta_cutoff", _sampling(lambda v: 0 < v < 1), "eta sampling", "set it to 0.0"),
    Unsupported("top_h", _sampling(lambda v: True), "top-H sampling", "remove it"),
    Unsupported("encoder_repetition_penalty", _not(1.0), "a penalty on prompt tokens", "set it to 1.0"),
    Unsupported("encoder_no_repeat_ngram_size", _not(0), "an n-gram ban on prompt n-grams", "set it to 0"),
    Unsupported("bad_words_ids", _truthy, "banned token sequences", "remove it"),
    Unsupported("sequence_bias", _truthy, "biased token sequences", "remove it"),
    Unsupported("suppress_tokens", _truthy, "suppressed tokens", "remove it"),
    Unsupported("begin_suppress_tokens", _truthy, "tokens suppressed at the first step", "remove it"),
    Unsupported("forced_bos_token_id", _set, "a forced first token", "remove it"),
    Unsupported("forced_eos_token_id", _set, "a forced last token", "remove it"),
    Unsupported("exponential_decay_length_penalty", _set, "a length-dependent EOS boost", "remove it"),
    Unsupported("guidance_scale", _not(1), "classifier-free guidance", "remove it"),
    Unsupported("watermarking_config", _set, "watermarking", "remove it"),
    Unsupported("stop_strings", _truthy, "stop strings", "remove it (stop ids are eos_token_id)"),
    Unsupported("token_healing", _truthy, "token healing", "remove it"),
    Unsupported("max_time", _set, "a wall-clock limit", "remove it (limit the length with max_new_tokens)"),
    Unsupported("is_assistant", _truthy, "assistant-model confidence stopping", "remove it"),
)

# Every GenerationConfig attribute of transformers 5.x (tests check this against the installed transformers).
TRANSFORMERS_KEYS = IMPLEMENTED_KEYS | IGNORED_KEYS | {u.key for u in UNSUPPORTED}

_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingOptions))
_warned: set[str] = set()


def from_model_config(config: Mapping) -> dict:
    """transformers' `GenerationConfig.from_model_config(config.json)` as a dict: the top-level generation keys,
    then the text (decoder) config's for those still unset."""
    gen = {k: v for k, v in config.items() if k in TRANSFORMERS_KEYS and v is not None}
    sub = next((config[n] for n in ("decoder", "generator", "text_config") if config.get(n)), config)
    for k in TRANSFORMERS_KEYS:
        if gen.get(k) is None and sub.get(k) is not None:
            gen[k] = sub[k]
    gen["_from_model_config"] = True
    return gen


def effective_generation_config(gen: Mapping | None, model_config: Mapping | None) -> dict:
    """The generation config transformers would use: the checkpoint's generation_config.json (recorded in the
    manifest; {} when the checkpoint had none), else the one it derives from config.json."""
    if gen:
        return dict(gen)
    return from_model_config(model_config) if model_config else {}


def stop_token_ids(gen: Mapping, where: str = "generation config") -> list[int]:
    """eos_token_id (an int or a list) → sorted stop ids; none when absent (transformers then never stops early)."""
    eos = gen.get("eos_token_id")
    if eos is None:
        return []
    ids = [eos] if not isinstance(eos, list) else eos
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise OptionsError(
            f"{where}: eos_token_id={eos!r} must be a token id or a list of token ids; fix the "
            "checkpoint's generation_config.json and re-export"
        )
    return sorted(set(ids))


def _number(gen: Mapping, key: str, where: str, integer: bool = False):
    v = gen.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise OptionsError(
            f"{where}: generation config {key}={v!r} is not {'an integer' if integer else 'a number'}; "
            "fix the checkpoint's generation_config.json and re-export"
        )
    return v


def _first(*values):
    return next((v for v in values if v is not None), None)


def resolve_sampling(gen: Mapping, where: str = "generation config", **overrides) -> SamplingOptions:
    """SamplingOptions from a generation config (transformers' meaning for every key, see the module doc),
    then `overrides` (SamplingOptions fields; None means not given). Refuses keys we do not implement when
    they would change the tokens; warns once per key transformers does not know."""
    unknown = set(overrides) - _SAMPLING_FIELDS
    if unknown:
        raise TypeError(f"unknown sampling option(s) {sorted(unknown)}; known: {sorted(_SAMPLING_FIELDS)}")
    over = {k: v for k, v in overrides.items() if v is not None}
    do_sample = gen.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise OptionsError(
            f"{where}: generation config do_sample={do_sample!r} is not true/false; fix the checkpoint's "
            "generation_config.json and re-export"
        )
    num = {
        k: _number(
            gen,
            k,
            where,
            integer=k
            in ("top_k", "no_repeat_ngram_size", "min_new_tokens", "min_length", "max_new_tokens", "max_length"),
        )
        for k in (
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "repetition_penalty",
            "no_repeat_ngram_size",
            "min_new_tokens",
            "min_length",
            "max_new_tokens",
            "max_length",
        )
    }
    o = {
        "greedy": over.pop("greedy", do_sample is not True),
        "temperature": float(_first(over.pop("temperature", None), num["temperature"], 1.0)),
        "top_k": int(_first(over.pop("top_k", None), num["top_k"], 50)),
        "top_p": float(_first(over.pop("top_p", None), num["top_p"], 1.0)),
        "min_p": _first(over.pop("min_p", None), num["min_p"]),
        "repetition_penalty": float(_first(over.pop("repetition_penalty", None), num["repetition_penalty"], 1.0)),
        "no_repeat_ngram_size": int(_first(over.pop("no_repeat_ngram_size", None), num["no_repeat_ngram_size"], 0)),
    }
    # Lengths: max_new_tokens (from anywhere) beats max_length; min_new_tokens beats min_length (transformers).
    max_new = _first(over.pop("max_new_tokens", None), num["max_new_tokens"])
    max_length = _first(over.pop("max_length", None), num["max_length"])
    if max_new is not None:
        o.update(max_new_tokens=max_new, max_length=None)
    elif max_length is not None:
        o.update(
            max_new_tokens=max_length, max_length=max_length
        )  # the answer is shorter: max_length − sequence so far
    else:
        o.update(max_new_tokens=DEFAULT_MAX_NEW_TOKENS, max_length=None)
    min_new = _first(over.pop("min_new_tokens", None), num["min_new_tokens"])
    min_length = _first(over.pop("min_length", None), num["min_length"], 0)
    o.update(min_new_tokens=min_new or 0, min_length=0 if min_new is not None else min_length)
    for rule in UNSUPPORTED:
        value = gen.get(rule.key)
        try:
            active = rule.active(value, o)
        except TypeError:  # not even the right type: it cannot be what we would ignore
            active = True
        if active:
            raise OptionsError(
                f"{where}: generation config {rule.key}={value!r} asks for {rule.what}, which qwen-audio-edge does not "
                f"implement; {rule.fix} in the checkpoint's generation_config.json and re-export (or in the "
                '"generation_config" entry of the artifacts\' manifest.json), or in Python pass explicit '
                "sampling=SamplingOptions(...)"
            )
    for key in gen:
        if (
            key not in TRANSFORMERS_KEYS
            and key not in SILENT_UNKNOWN_KEYS
            and not key.startswith("_")
            and key not in _warned
        ):
            _warned.add(key)
            warnings.warn(
                f"{where}: generation config key {key!r} is not a transformers GenerationConfig key; "
                "ignored (as transformers' generate() ignores it)",
                stacklevel=3,
            )
    try:
        return SamplingOptions(**o, **over)
    except OptionsError as e:
        raise OptionsError(f"{where}: {e} (the generation config, then the options given)") from e
