"""Sampling matches transformers' logits processors; text streaming never breaks UTF-8."""

from __future__ import annotations

import pytest
import torch

from qwen_audio_edge.runtime.errors import OptionsError
from qwen_audio_edge.runtime.generate import IncrementalDetokenizer, NgramBan, SamplingOptions, process_logits


@pytest.mark.parametrize(
    "temperature,top_k,top_p,penalty,min_p",
    [
        (0.7, 20, 0.5, 1.1, None),
        (1.3, 0, 0.9, 1.0, None),
        (0.5, 5, 1.0, 1.5, None),
        (1.0, 50, 1.0, 1.0, 0.05),
        (0.8, 0, 0.95, 1.2, 0.3),
    ],
)
def test_processed_scores_match_transformers(temperature, top_k, top_p, penalty, min_p):
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(1, 300) * 3
    history = torch.tensor([[1, 5, 5, 17, 299, 42]])
    # transformers' _get_logits_processor: each processor only when it is not neutral, in this order.
    ref = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone()) if penalty != 1.0 else logits.clone()
    if temperature != 1.0:
        ref = TemperatureLogitsWarper(temperature)(history, ref)
    if top_k:
        ref = TopKLogitsWarper(top_k)(history, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(history, ref)
    if min_p is not None:
        ref = MinPLogitsWarper(min_p)(history, ref)
    opts = SamplingOptions(
        greedy=False, temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty, min_p=min_p
    )
    ours = process_logits(logits[0], torch.tensor(sorted(set(history[0].tolist()))), opts)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref[0]))
    finite = torch.isfinite(ours)
    assert torch.allclose(ours[finite], ref[0][finite], atol=1e-6)


def test_defaults_are_transformers_defaults():
    """SamplingOptions() means what GenerationConfig() means once generate() fills in its defaults."""
    from transformers import GenerationConfig

    d = GenerationConfig._get_default_generation_params()
    opts = SamplingOptions()
    assert opts.greedy == (not d["do_sample"])
    assert (opts.temperature, opts.top_k, opts.top_p, opts.repetition_penalty) == (
        d["temperature"],
        d["top_k"],
        d["top_p"],
        d["repetition_penalty"],
    )
    assert (opts.no_repeat_ngram_size, opts.min_length, opts.min_p) == (
        d["no_repeat_ngram_size"],
        d["min_length"],
        None,
    )
    # Greedy ignores the sampling parameters, as transformers does (no validation either).
    assert SamplingOptions(greedy=True, temperature=0.0, top_p=5.0).greedy


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ngram_ban_matches_transformers(n):
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    gen = torch.Generator().manual_seed(n)
    ids = torch.randint(0, 12, (40,), generator=gen).tolist()
    ban = NgramBan(n, ids[:5])
    for cut in range(5, len(ids)):
        scores = torch.zeros(1, 12)
        ref = NoRepeatNGramLogitsProcessor(n)(torch.tensor([ids[:cut]]), scores)
        assert ban.banned() == set(torch.nonzero(torch.isinf(ref[0])).flatten().tolist()), cut
        ban.push(ids[cut])


def test_seeded_sampling_is_reproducible(mha, pipelines):
    p = pipelines(mha)
    opts = SamplingOptions(
        max_new_tokens=10, greedy=False, seed=123, temperature=1.0, top_k=0, top_p=1.0, ignore_eos=True
    )
    a = p.run(None, "Hello", sampling=opts).token_ids
    b = p.run(None, "Hello", sampling=opts).token_ids
    c = p.run(None, "Hello", sampling=SamplingOptions(**{**opts.__dict__, "seed": 124})).token_ids
    assert a == b and a != c


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0),
        dict(top_p=-0.1),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(min_p=2.0),
        dict(repetition_penalty=0),
        dict(max_new_tokens=0),
        dict(no_repeat_ngram_size=-1),
        dict(min_new_tokens=-1),
        dict(max_length=0),
    ],
)
def test_bad_sampling_options(kw):
    with pytest.raises(OptionsError):
        SamplingOptions(greedy=False, **kw)


def test_detokenizer_holds_back_partial_utf8_and_skips_unknown_ids(mha, pipelines):
    tok = pipelines(mha).prompt.tokenizer
    text = "héllo wörld — 日本語 ok"
    ids = tok.encode(text, add_special_tokens=False).ids
    vocab = tok.get_vocab_size(with_added_tokens=True)
    unknown = vocab + 17  # the model vocab is larger than the tokenizer's
    im_end = tok.token_to_id("<|im_end|>")
    stream = ids[:3] + [unknown] + ids[3:] + [im_end]
    det = IncrementalDetokenizer(tok)
    pieces = [det.push(i) for i in stream]
    pieces.append(det.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    # Multi-byte characters span several byte-level tokens: some pushes must have been held back.
    assert any(piece == "" for piece in pieces[:-1])
