"""Sampling matches transformers' logits processors; text streaming never breaks UTF-8."""

from __future__ import annotations

import pytest
import torch

from qwen_audio_edge.runtime.errors import OptionsError
from qwen_audio_edge.runtime.generate import IncrementalDetokenizer, SamplingOptions, process_logits


@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [(0.7, 20, 0.5, 1.1), (1.3, 0, 0.9, 1.0), (0.5, 5, 1.0, 1.5)])
def test_processed_scores_match_transformers(temperature, top_k, top_p, penalty):
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(1, 300) * 3
    history = torch.tensor([[1, 5, 5, 17, 299, 42]])
    ref = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone()) if penalty != 1.0 else logits.clone()
    ref = TemperatureLogitsWarper(temperature)(history, ref)
    if top_k:
        ref = TopKLogitsWarper(top_k)(history, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(history, ref)
    opts = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    ours = process_logits(logits[0], torch.tensor(sorted(set(history[0].tolist()))), opts)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref[0]))
    finite = torch.isfinite(ours)
    assert torch.allclose(ours[finite], ref[0][finite], atol=1e-6)


def test_seeded_sampling_is_reproducible(mha, pipelines):
    p = pipelines(mha)
    opts = SamplingOptions(max_new_tokens=10, seed=123, temperature=1.0, top_k=0, top_p=1.0, ignore_eos=True)
    a = p.run(None, "Hello", sampling=opts).token_ids
    b = p.run(None, "Hello", sampling=opts).token_ids
    c = p.run(None, "Hello", sampling=SamplingOptions(**{**opts.__dict__, "seed": 124})).token_ids
    assert a == b and a != c


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                dict(repetition_penalty=0), dict(max_new_tokens=0)])
def test_bad_sampling_options(kw):
    with pytest.raises(OptionsError):
        SamplingOptions(**kw)


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
