"""generation_config.json means what it means in transformers: absent keys, every key we read, keys we refuse.

Token parity is checked against transformers' `Qwen2AudioForConditionalGeneration.generate()` on copies of
the tiny MHA checkpoint whose generation_config.json sets none, some or all of the keys (and the artifacts
whose manifest records the same config). Sampled runs are not compared token by token (transformers draws
from the global RNG on the logits it computes, we from a CPU generator on ours, which differ in the last
bits); for sampling, the resolved options are compared with transformers' own resolution instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import soundfile as sf
import torch

from helpers import PROMPT, reference_inputs, signal
from qwen_audio_edge.runtime.errors import LimitError, OptionsError
from qwen_audio_edge.runtime.generate import SamplingOptions
from qwen_audio_edge.runtime.generation_config import (
    DEFAULT_MAX_NEW_TOKENS,
    TRANSFORMERS_KEYS,
    UNSUPPORTED,
    effective_generation_config,
    from_model_config,
    resolve_sampling,
    stop_token_ids,
)

ENDOFTEXT, IM_END = 360, 362  # the tiny tokenizer's <|endoftext|> and <|im_end|>
# Qwen2-Audio-7B-Instruct's generation_config.json (the values its model card documents).
INSTRUCT = {
    "chat_format": "chatml",
    "do_sample": True,
    "eos_token_id": [151643, 151645],
    "pad_token_id": 151643,
    "repetition_penalty": 1.1,
    "temperature": 0.7,
    "top_k": 20,
    "top_p": 0.5,
    "max_new_tokens": 2048,
    "transformers_version": "4.45.0.dev0",
}


@pytest.fixture(scope="module")
def variants(mha, tmp_path_factory):
    """variants(gen) → (checkpoint dir, artifacts dir): copies (symlinks) of the MHA fixture whose
    generation_config.json is `gen` (None: no file; the export then records {} in the manifest)."""
    root = tmp_path_factory.mktemp("genconf")
    made: dict = {}

    def make(gen: dict | None):
        key = json.dumps(gen, sort_keys=True)
        if key in made:
            return made[key]
        d = root / f"v{len(made)}"
        ckpt, art = d / "checkpoint", d / "artifacts"
        ckpt.mkdir(parents=True)
        art.mkdir()
        for f in mha.checkpoint.iterdir():
            if f.name != "generation_config.json":
                (ckpt / f.name).symlink_to(f)
        if gen is not None:
            (ckpt / "generation_config.json").write_text(json.dumps(gen))
        for f in mha.artifacts.iterdir():
            if f.name != "manifest.json":
                (art / f.name).symlink_to(f)
        manifest = json.loads((mha.artifacts / "manifest.json").read_text())
        manifest["generation_config"] = gen or {}
        (art / "manifest.json").write_text(json.dumps(manifest))
        made[key] = (ckpt, art)
        return made[key]

    return make


def _hf(ckpt: Path):
    from transformers import Qwen2AudioForConditionalGeneration

    return Qwen2AudioForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32).eval()


def _theirs(model, inputs, **kwargs) -> list[int]:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(**inputs, **kwargs)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def _first_new_token(seq: list[int], start: int = 3) -> tuple[int, int]:
    """(k, seq[k]) for the first k ≥ start whose token did not occur before it: an eos candidate at step k."""
    return next((k, t) for k, t in enumerate(seq) if k >= start and t not in seq[:k])


def _hf_resolved(gen: dict | None, ckpt: Path | None = None):
    """transformers' effective GenerationConfig for a checkpoint's generation config, defaults filled as generate() does."""
    from transformers import GenerationConfig

    if gen is None:
        cfg = GenerationConfig.from_pretrained(str(ckpt), config_file_name="config.json", _from_model_config=True)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = GenerationConfig.from_dict(gen)
    cfg.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    return cfg


# --- every transformers key is classified ---------------------------------------------------------


def test_every_transformers_generation_key_is_classified():
    """A key added to transformers' GenerationConfig must be implemented, ignored or refused on purpose."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import METADATA_FIELDS

    assert set(GenerationConfig().to_dict()) | set(METADATA_FIELDS) == TRANSFORMERS_KEYS


# --- resolution: absent keys mean transformers' defaults --------------------------------------------


@pytest.mark.parametrize(
    "gen",
    [
        {},
        {"transformers_version": "4.45.0"},
        {"do_sample": True},
        {"do_sample": True, "top_k": 0, "top_p": 0.9},
        {"do_sample": False, "temperature": 0.7, "top_k": 20, "top_p": 0.5},
        {"repetition_penalty": 1.3, "temperature": 0.2},
        {"do_sample": True, "temperature": 0.7, "min_p": 0.1, "no_repeat_ngram_size": 3},
        {"max_new_tokens": 40, "max_length": 10, "min_new_tokens": 2, "min_length": 30},
        {"max_length": 77, "min_length": 12},
        INSTRUCT,
    ],
)
def test_resolution_matches_transformers(gen):
    opts = resolve_sampling(gen)
    hf = _hf_resolved(gen)
    assert opts.greedy == (hf.do_sample is not True)
    assert opts.repetition_penalty == hf.repetition_penalty
    assert opts.no_repeat_ngram_size == hf.no_repeat_ngram_size
    if not opts.greedy:  # transformers applies these only when sampling
        assert (opts.temperature, opts.top_k, opts.top_p, opts.min_p) == (hf.temperature, hf.top_k, hf.top_p, hf.min_p)
    if hf.max_new_tokens is not None:
        assert (opts.max_new_tokens, opts.max_length) == (hf.max_new_tokens, None)
    elif gen.get("max_length") is not None:
        assert opts.max_length == hf.max_length
    else:  # transformers' placeholder is max_length 20; ours is DEFAULT_MAX_NEW_TOKENS new tokens
        assert (opts.max_new_tokens, opts.max_length) == (DEFAULT_MAX_NEW_TOKENS, None)
    if hf.min_new_tokens is not None:
        assert (opts.min_new_tokens, opts.min_length) == (hf.min_new_tokens, 0)
    else:
        assert (opts.min_new_tokens, opts.min_length) == (0, hf.min_length)


def test_instruct_generation_config_is_unchanged():
    """Qwen2-Audio-7B-Instruct's generation_config: the same sampling as before (and its max_new_tokens)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # chat_format is known: no warning
        opts = resolve_sampling(INSTRUCT)
    assert opts == SamplingOptions(
        max_new_tokens=2048, greedy=False, temperature=0.7, top_k=20, top_p=0.5, repetition_penalty=1.1
    )
    assert stop_token_ids(INSTRUCT) == [151643, 151645]
    # Flags: --greedy keeps the repetition penalty; --max-new-tokens replaces the config's.
    assert resolve_sampling(INSTRUCT, greedy=True, max_new_tokens=64) == SamplingOptions(
        max_new_tokens=64, greedy=True, temperature=0.7, top_k=20, top_p=0.5, repetition_penalty=1.1
    )


def test_fixture_config_resolves_to_the_instruct_values(mha, pipelines):
    p = pipelines(mha)
    assert p.default_sampling() == SamplingOptions(
        max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
        greedy=False,
        temperature=0.7,
        top_k=20,
        top_p=0.5,
        repetition_penalty=1.1,
    )
    assert p.stop_ids == [ENDOFTEXT, IM_END]


def test_eos_token_id_int_or_list():
    assert stop_token_ids({"eos_token_id": 7}) == [7]
    assert stop_token_ids({"eos_token_id": [9, 7, 9]}) == [7, 9]
    assert stop_token_ids({}) == []
    with pytest.raises(OptionsError, match="eos_token_id='x'"):
        stop_token_ids({"eos_token_id": "x"})


@pytest.mark.parametrize(
    "config",
    [
        None,  # the tiny checkpoint's own config.json
        {"eos_token_id": 5, "text_config": {"eos_token_id": 7, "bos_token_id": 1, "pad_token_id": None}},
        {
            "model_type": "x",
            "use_cache": False,
            "text_config": {"eos_token_id": [7, 8], "max_length": 50, "do_sample": True},
        },
        {"eos_token_id": 3, "pad_token_id": 0},
    ],
)
def test_from_model_config_matches_transformers(mha, config):
    from transformers import GenerationConfig

    config = config or json.loads((mha.checkpoint / "config.json").read_text())
    ours = from_model_config(config)
    theirs = GenerationConfig.from_model_config(json.loads(json.dumps(config))).to_diff_dict()
    drop = ("transformers_version", "_from_model_config")
    assert {k: v for k, v in ours.items() if k not in drop} == {k: v for k, v in theirs.items() if k not in drop}
    assert effective_generation_config({}, config) == ours
    assert effective_generation_config({"top_k": 3}, config) == {"top_k": 3}


# --- greedy tokens equal transformers' generate() on checkpoints that set none, some, all keys ---------


def test_no_generation_config_matches_transformers(mha, variants, pipelines):
    """No generation_config.json: transformers derives one from config.json (eos = <|endoftext|> only), greedy."""
    ckpt, art = variants(None)
    p, ref = pipelines(type(mha)("none", ckpt, art)), _hf(ckpt)
    assert p.generation_config["eos_token_id"] == ref.generation_config.eos_token_id == ENDOFTEXT
    assert p.stop_ids == [ENDOFTEXT]
    opts = p.default_sampling()
    assert opts.greedy and opts.repetition_penalty == 1.0
    wave = signal(3.1, seed=4)
    inputs = reference_inputs(mha, wave, PROMPT)
    expected = _theirs(ref, inputs, max_new_tokens=24)
    assert p.run(wave, PROMPT, sampling=p.default_sampling(max_new_tokens=24)).token_ids == expected
    assert len(set(expected)) > 5


def test_some_keys_greedy_with_penalty_matches_transformers(mha, variants, pipelines):
    """The issue: do_sample absent means greedy (temperature/top-k ignored) — with the file's repetition penalty
    and its eos_token_id (an int; chosen to be a token the model emits, so the stop is exercised)."""
    gen = {"repetition_penalty": 1.3, "temperature": 0.7, "top_k": 20, "transformers_version": "4.45.0"}
    wave = signal(4.2, seed=2)
    inputs = reference_inputs(mha, wave, PROMPT)
    ckpt, _ = variants(gen)
    free = _theirs(_hf(ckpt), inputs, max_new_tokens=24, eos_token_id=None)
    k, eos = _first_new_token(free)
    gen = {**gen, "eos_token_id": eos}
    ckpt, art = variants(gen)
    p = pipelines(type(mha)("some", ckpt, art))
    expected = _theirs(_hf(ckpt), inputs, max_new_tokens=24)
    assert expected == free[: k + 1]  # transformers stopped at the eos
    result = p.run(wave, PROMPT, sampling=p.default_sampling(max_new_tokens=24))
    assert result.token_ids == expected and result.finish_reason == "stop"


def test_all_keys_match_transformers(mha, variants, pipelines):
    """Every key we implement (sampling ones moot: do_sample false), plus informational and moot keys; both
    sides run with the checkpoint's config alone (no arguments): max_new_tokens, min_new_tokens, n-gram ban,
    repetition penalty and a list eos_token_id all come from the file."""
    base = {
        "do_sample": False,
        "temperature": 0.3,
        "top_k": 3,
        "top_p": 0.4,
        "min_p": 0.2,
        "repetition_penalty": 1.2,
        "no_repeat_ngram_size": 2,
        "max_new_tokens": 20,
        "pad_token_id": ENDOFTEXT,
        "bos_token_id": ENDOFTEXT,
        "max_length": 5,
        "min_length": 1000,  # moot: max_new_tokens / min_new_tokens take precedence
        "typical_p": 0.5,
        "epsilon_cutoff": 0.1,  # moot: sampling only
        "num_beams": 1,
        "num_return_sequences": 1,
        "length_penalty": 1.0,
        "early_stopping": False,
        "use_cache": True,
        "output_scores": False,
        "remove_invalid_values": False,
        "chat_format": "chatml",
        "transformers_version": "4.45.0",
    }
    wave = signal(3.7, seed=5)
    inputs = reference_inputs(mha, wave, PROMPT)
    ckpt, _ = variants({**base, "eos_token_id": None})
    free = _theirs(_hf(ckpt), inputs)
    assert len(free) == 20
    k, eos = _first_new_token(free, 2)
    gen = {**base, "eos_token_id": [eos, IM_END], "min_new_tokens": k + 2}  # the eos is held back at step k
    ckpt, art = variants(gen)
    p = pipelines(type(mha)("all", ckpt, art))
    expected = _theirs(_hf(ckpt), inputs)
    assert expected[:k] == free[:k] and expected[k] != eos
    result = p.run(wave, PROMPT)
    assert result.token_ids == expected
    opts = p.default_sampling()
    assert (opts.greedy, opts.max_new_tokens, opts.max_length, opts.min_new_tokens, opts.min_length) == (
        True,
        20,
        None,
        k + 2,
        0,
    )


def test_max_and_min_length_count_the_prompt(mha, variants, pipelines):
    """max_length / min_length (without max_new_tokens / min_new_tokens) bound the whole sequence, as in transformers."""
    wave = signal(2.9, seed=6)
    inputs = reference_inputs(mha, wave, PROMPT)
    n_prompt = inputs["input_ids"].shape[1]
    ckpt, _ = variants({"eos_token_id": None, "max_length": n_prompt + 16})
    free = _theirs(_hf(ckpt), inputs)
    assert len(free) == 16
    k, eos = _first_new_token(free, 2)
    gen = {"eos_token_id": eos, "max_length": n_prompt + 16, "min_length": n_prompt + k + 3}
    ckpt, art = variants(gen)
    p = pipelines(type(mha)("len", ckpt, art))
    expected = _theirs(_hf(ckpt), inputs)
    assert expected[:k] == free[:k] and expected[k] != eos
    assert p.run(wave, PROMPT).token_ids == expected
    # A flag's max_new_tokens beats max_length, as generate(max_new_tokens=…) does.
    assert len(p.run(wave, PROMPT, sampling=p.default_sampling(max_new_tokens=40, ignore_eos=True)).token_ids) == 40
    # A prompt already as long as max_length is refused, as transformers refuses it.
    ckpt, art = variants({"max_length": 10})
    with pytest.raises(LimitError, match="max_length is 10"):
        pipelines(type(mha)("short", ckpt, art)).run(wave, PROMPT)


# --- overrides and the entry points that use them ----------------------------------------------------


def test_overrides_and_entry_points_use_one_resolution(mha, variants, pipelines):
    ckpt, art = variants({"do_sample": True, "temperature": 0.5, "top_k": 7, "max_new_tokens": 5, "eos_token_id": []})
    p = pipelines(type(mha)("over", ckpt, art))
    assert p.default_sampling() == SamplingOptions(max_new_tokens=5, greedy=False, temperature=0.5, top_k=7)
    assert p.default_sampling(greedy=True, max_new_tokens=9, seed=3) == SamplingOptions(
        max_new_tokens=9, greedy=True, temperature=0.5, top_k=7, seed=3
    )
    with pytest.raises(TypeError, match="temprature"):
        p.default_sampling(temprature=0.1)
    # Python API without sampling=: the config's max_new_tokens, sampling on.
    assert len(p.run(None, "Hello").token_ids) == 5
    # The streaming session resolves through the same method.
    session = p.stream(PROMPT, vad=None)
    assert session.sampling == p.default_sampling()


def test_greedy_override_makes_sampling_only_keys_moot():
    gen = {"do_sample": True, "typical_p": 0.9}
    assert resolve_sampling(gen, greedy=True).greedy
    with pytest.raises(OptionsError, match=r"typical_p=0\.9"):
        resolve_sampling(gen)
    with pytest.raises(OptionsError, match=r"typical_p=0\.9"):  # a greedy config that a flag turns into sampling
        resolve_sampling({"typical_p": 0.9}, greedy=False)


# --- keys we do not implement: a clear error ---------------------------------------------------------

ACTIVE = {
    "num_beams": 4,
    "num_return_sequences": 2,
    "penalty_alpha": 0.6,
    "dola_layers": "high",
    "constraints": [],
    "force_words_ids": [[1]],
    "typical_p": 0.9,
    "epsilon_cutoff": 3e-4,
    "eta_cutoff": 1e-3,
    "top_h": 0.4,
    "encoder_repetition_penalty": 1.2,
    "encoder_no_repeat_ngram_size": 3,
    "bad_words_ids": [[5]],
    "sequence_bias": [[[5], 1.0]],
    "suppress_tokens": [5],
    "begin_suppress_tokens": [5],
    "forced_bos_token_id": 1,
    "forced_eos_token_id": 2,
    "exponential_decay_length_penalty": [5, 1.5],
    "guidance_scale": 1.5,
    "watermarking_config": {"greenlist_ratio": 0.25},
    "stop_strings": ["stop"],
    "token_healing": True,
    "max_time": 3.0,
    "is_assistant": True,
}
NEUTRAL = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "penalty_alpha": 0.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "guidance_scale": 1.0,
    "stop_strings": None,
    "token_healing": False,
    "is_assistant": False,
}


@pytest.mark.parametrize("rule", UNSUPPORTED, ids=lambda r: r.key)
def test_unimplemented_keys_are_refused_clearly(rule):
    gen = {"do_sample": rule.key in ("typical_p", "epsilon_cutoff", "eta_cutoff", "top_h"), rule.key: ACTIVE[rule.key]}
    with pytest.raises(OptionsError) as e:
        resolve_sampling(gen, "ART")
    msg = str(e.value)
    assert msg.startswith("ART: ") and f"{rule.key}={ACTIVE[rule.key]!r}" in msg and rule.what in msg
    assert "generation_config.json" in msg and "SamplingOptions" in msg and "\n" not in msg
    if rule.key in NEUTRAL:
        resolve_sampling({**gen, rule.key: NEUTRAL[rule.key]})


def test_unimplemented_key_through_the_api_and_the_cli(mha, variants, pipelines, tmp_path):
    ckpt, art = variants({"do_sample": False, "num_beams": 4, "eos_token_id": IM_END})
    p = pipelines(type(mha)("beams", ckpt, art))
    for call in (p.default_sampling, lambda: p.run(None, "Hi"), lambda: p.stream(PROMPT, vad=None)):
        with pytest.raises(OptionsError, match=r"num_beams=4 asks for beam search.*set it to 1"):
            call()
    # Explicit options do not read the generation config.
    assert len(p.run(None, "Hi", sampling=SamplingOptions(max_new_tokens=3, ignore_eos=True)).token_ids) == 3
    wav = tmp_path / "a.wav"
    sf.write(str(wav), signal(2.0), 16000)
    for args in (["run", art, "--audio", wav, "--greedy"], ["stream", art, "--audio", wav, "--no-vad"]):
        r = _cli(*args)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "num_beams=4" in lines[0], r.stderr
        assert "Traceback" not in r.stderr


def test_unknown_keys_warn_once():
    import qwen_audio_edge.runtime.generation_config as gc

    gc._warned.discard("my_custom_key")
    with pytest.warns(UserWarning, match="'my_custom_key' is not a transformers GenerationConfig key"):
        resolve_sampling({"my_custom_key": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_sampling({"my_custom_key": 1, "chat_format": "chatml", "_commit_hash": "abc"})


@pytest.mark.parametrize(
    "gen,match",
    [
        ({"do_sample": "yes"}, "do_sample='yes'"),
        ({"top_k": 2.5}, "top_k=2.5"),
        ({"temperature": "hot"}, "temperature='hot'"),
    ],
)
def test_malformed_values_are_clear_errors(gen, match):
    with pytest.raises(OptionsError, match=match):
        resolve_sampling(gen)


# --- CLI flags -------------------------------------------------------------------------------------

CLI = [sys.executable, "-m", "qwen_audio_edge.cli"]


def _cli(*args, env_warnings="ignore"):
    env = dict(os.environ, PYTHONWARNINGS=env_warnings)
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


def test_cli_flags_over_the_generation_config(mha, variants):
    _, art = variants(
        {"do_sample": False, "repetition_penalty": 1.0, "max_new_tokens": 4, "eos_token_id": [], "my_custom_key": 1}
    )
    r = _cli("run", art, "--prompt", "Hi", "--json", env_warnings="default")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["token_ids"]) == 4  # the config's max_new_tokens is the default
    assert "warning: " in r.stderr and "my_custom_key" in r.stderr and "Traceback" not in r.stderr
    greedy = json.loads(_cli("run", art, "--prompt", "Hi", "--json", "--max-new-tokens", 7).stdout)["token_ids"]
    assert len(greedy) == 7
    # --temperature turns sampling on (the config says greedy); seeded runs repeat.
    sampled = [
        json.loads(
            _cli(
                "run", art, "--prompt", "Hi", "--json", "--max-new-tokens", 7, "--temperature", "5", "--seed", 1
            ).stdout
        )["token_ids"]
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1] and sampled[0] != greedy
    r = _cli("run", art, "--prompt", "Hi", "--greedy", "--top-k", "5")
    assert r.returncode == 2 and "--greedy" in r.stderr and "--top-k" in r.stderr and "Traceback" not in r.stderr
