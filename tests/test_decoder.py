"""Decoder: static KV cache vs full recompute, multi-turn cache reuse, limits and numerical guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import GREEDY_KW, PROMPT, signal
from qwen_audio_edge.runtime.decoder import KVCache, ModelArgs
from qwen_audio_edge.runtime.errors import ArtifactsError, LimitError, NumericalError
from qwen_audio_edge.runtime.generate import SamplingOptions
from qwen_audio_edge.runtime.prompt import embed_prompt


def _full_logits(p, ids: list[int], audio_embeds=None) -> torch.Tensor:
    """Recompute every position from scratch in a fresh cache (no reuse)."""
    cache = p.decoder.setup_cache(p.max_context)
    with torch.inference_mode():
        return p.decoder(
            embed_prompt(p.decoder, ids, audio_embeds, p.prompt.audio_token_id), 0, cache, all_logits=True
        )[0]


@pytest.mark.parametrize("shape", ["mha", "gqa"])
def test_cached_decode_equals_full_recompute(request, pipelines, shape):
    p = pipelines(request.getfixturevalue(shape))
    ids = [5, 17, 42, 99, 7, 300, 12, 8, 250, 33, 1, 64]
    cache = p.decoder.setup_cache(64)
    steps = []
    with torch.inference_mode():
        steps.append(p.decoder(p.decoder.embed(torch.tensor([ids[:5]])), 0, cache)[0, -1])
        for i in range(5, len(ids)):
            steps.append(p.decoder(p.decoder.embed(torch.tensor([[ids[i]]])), i, cache)[0, -1])
        full_cache = p.decoder.setup_cache(64)
        full = p.decoder(p.decoder.embed(torch.tensor([ids])), 0, full_cache, all_logits=True)[0]
    for k, logit in enumerate(steps):
        ref = full[4 + k]
        # measured ≤ 2.9e-6 × max (mha and gqa, every step); bound 1e-5 × max (margin 3.5×)
        assert (logit - ref).abs().max().item() <= 1e-5 * ref.abs().max().item(), k


def test_second_turn_reuses_cache_and_equals_fresh_run(mha, pipelines):
    p = pipelines(mha)
    conv = p.chat()
    first = conv.send(signal(2.5), PROMPT, sampling=SamplingOptions(max_new_tokens=6, **GREEDY_KW))
    cached_before = conv.cached
    assert cached_before == len(conv.ids) - 1
    prefill_calls = []
    original = p.decoder.forward

    def spy(embeds, start, cache, **kw):
        prefill_calls.append((start, embeds.shape[1]))
        return original(embeds, start, cache, **kw)

    p.decoder.forward = spy
    try:
        second = conv.send(None, "And then?", sampling=SamplingOptions(max_new_tokens=8, **GREEDY_KW))
    finally:
        del p.decoder.forward
    # The second turn's prefill starts where the cache ended: the history is not recomputed.
    start, length = prefill_calls[0]
    assert start == cached_before
    assert length < cached_before // 3
    # A fresh run over exactly the conversation's ids (not re-tokenized text) gives the same tokens.
    all_ids = conv.ids
    n_prompt = len(all_ids) - len(second.token_ids)
    assert all_ids[n_prompt:] == second.token_ids
    assert all_ids[cached_before + 1 - len(first.token_ids) : cached_before + 1] == first.token_ids
    fresh = p.chat()
    mel, n_valid = p.mel.log_mel(signal(2.5))
    audio = p.encoder(mel, n_valid)
    logits = _full_logits(p, all_ids[:n_prompt], audio)
    fresh_tokens = [int(logits[-1].argmax())]
    # Continue greedily from the fresh full-recompute state for the remaining tokens.
    ids = list(all_ids[:n_prompt]) + fresh_tokens
    while len(fresh_tokens) < len(second.token_ids):
        logits = _full_logits(p, ids, audio)
        fresh_tokens.append(int(logits[-1].argmax()))
        ids.append(fresh_tokens[-1])
    assert fresh_tokens == second.token_ids
    # The rendered conversation text matches the template's own rendering of both turns.
    assert "And then?" in p.prompt.tokenizer.decode(all_ids, skip_special_tokens=False)
    del fresh


def test_second_turn_text_matches_template_rendering(mha, pipelines):
    """The cached ids of a 2-turn chat equal the template rendering with the answer's own ids spliced in."""
    p = pipelines(mha)
    conv = p.chat()
    conv.send(None, "Hello there.", sampling=SamplingOptions(max_new_tokens=5, **GREEDY_KW))
    answer_ids = list(conv.ids[-5:])
    conv.send(None, "Thanks!", sampling=SamplingOptions(max_new_tokens=3, **GREEDY_KW))
    proc = mha.processor
    head = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Hello there."}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    tail = "<|im_end|>\n<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n"
    tok = proc.tokenizer
    expected = tok(head)["input_ids"] + answer_ids + tok(tail)["input_ids"]
    assert conv.ids[: len(expected)] == expected


def test_old_conversation_cannot_use_a_taken_cache(mha, pipelines):
    p = pipelines(mha)
    a = p.chat()
    a.send(None, "Hi", sampling=SamplingOptions(max_new_tokens=2, **GREEDY_KW))
    p.chat()
    with pytest.raises(Exception, match="newer conversation"):
        a.send(None, "again", sampling=SamplingOptions(max_new_tokens=2, **GREEDY_KW))


def test_prompt_overflow_is_rejected_before_any_work(mha):
    from qwen_audio_edge.runtime.pipeline import Pipeline, RuntimeOptions

    p = Pipeline.from_artifacts(mha.artifacts, RuntimeOptions(max_context=64))
    calls = []
    p.encoder = lambda *a: calls.append(a)  # must not be reached
    with pytest.raises(LimitError, match="context holds 64") as e:
        p.run(signal(3.0), "What?", sampling=SamplingOptions(max_new_tokens=4, **GREEDY_KW))
    assert calls == []
    # `run` has no context policy and no conversation to restart: the message offers what a run can change.
    limit = p.decoder.args.max_position_embeddings
    assert str(e.value).endswith(
        f"; use shorter audio or a shorter prompt, or raise --max-context (up to the model's {limit} positions)"
    )


def test_context_refusal_says_what_the_caller_can_do():
    """The LimitError's advice by caller: a one-shot run, a chat with either policy, and a context already
    at the model's limit (then raising --max-context is not offered)."""
    from qwen_audio_edge.runtime.context_policy import ContextPolicy

    def advice(policy, max_context=100, one_shot=False):
        with pytest.raises(LimitError) as e:
            ContextPolicy(policy, max_context, 400, one_shot=one_shot).check_fits(30, max_context - 30, 20)
        return str(e.value).split("; ", 1)[1]

    assert advice("error", one_shot=True) == (
        "use shorter audio or a shorter prompt, or raise --max-context (up to the model's 400 positions)"
    )
    assert advice("error") == (
        "start a new conversation, use the drop_oldest context policy, use shorter audio "
        "or text, or raise --max-context (up to the model's 400 positions)"
    )
    assert advice("drop_oldest", 400) == (
        "with every earlier exchange dropped this turn is still too long: use shorter "
        "audio or text (--max-context is already the model's limit, 400 positions)"
    )
    ContextPolicy("error", 100, 400).check_fits(30, 69, 0)  # 99 positions fit in 100


def test_generation_stops_when_the_cache_is_full(mha):
    from qwen_audio_edge.runtime.pipeline import Pipeline, RuntimeOptions

    p = Pipeline.from_artifacts(mha.artifacts, RuntimeOptions(max_context=60))
    r = p.run(None, "Hi", sampling=SamplingOptions(max_new_tokens=100, **GREEDY_KW))
    assert r.finish_reason == "context_full"
    assert len(r.token_ids) < 100


def test_max_context_beyond_the_model_is_rejected(mha):
    from qwen_audio_edge.runtime.pipeline import Pipeline, RuntimeOptions

    with pytest.raises(LimitError, match="max_position_embeddings"):
        Pipeline.from_artifacts(mha.artifacts, RuntimeOptions(max_context=10**7))


def test_nan_logits_raise_a_clear_error(mha):
    from qwen_audio_edge.runtime.pipeline import Pipeline

    p = Pipeline.from_artifacts(mha.artifacts)
    with torch.no_grad():
        p.decoder.model.norm.weight.fill_(float("nan"))
    with pytest.raises(NumericalError, match="--dtype fp32"):
        p.run(None, "Hi", sampling=SamplingOptions(max_new_tokens=3, **GREEDY_KW))
    # The failed prefill committed nothing: the conversation is intact and fails the same clear way again.
    conv = p._owner
    assert conv.ids == [] and conv.cached == 0
    with pytest.raises(NumericalError):
        conv.send(None, "again")


def test_stop_on_eos_unless_ignored(mha, pipelines):
    p = pipelines(mha)
    eos = p.stop_ids[0]
    original = p.decoder.forward

    def eos_wins(embeds, start, cache, **kw):
        out = original(embeds, start, cache, **kw).clone()
        out[..., eos] += 1e4
        return out

    p.decoder.forward = eos_wins
    try:
        r = p.run(None, "Hi", sampling=SamplingOptions(max_new_tokens=10, greedy=True, repetition_penalty=1.0))
        assert r.token_ids == [eos] and r.finish_reason == "stop"
        r = p.run(None, "Hi", sampling=SamplingOptions(max_new_tokens=10, **GREEDY_KW))
        assert r.token_ids == [eos] * 10 and r.finish_reason == "length"
    finally:
        del p.decoder.forward


def test_model_args_read_both_config_forms():
    base = dict(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=32,
    )
    a = ModelArgs.from_config(base | {"rope_theta": 5.0, "num_key_value_heads": 1})
    b = ModelArgs.from_config(base | {"rope_parameters": {"rope_theta": 5.0, "rope_type": "default"}})
    assert a.rope_theta == b.rope_theta == 5.0 and a.num_key_value_heads == 1 and b.num_key_value_heads == 2
    with pytest.raises(ArtifactsError, match="RoPE type"):
        ModelArgs.from_config(base | {"rope_parameters": {"rope_theta": 5.0, "rope_type": "yarn"}})
    with pytest.raises(ArtifactsError, match="missing 'vocab_size'"):
        ModelArgs.from_config({k: v for k, v in base.items() if k != "vocab_size"} | {"rope_theta": 1.0})


def test_tied_head_gqa_decoder_matches_transformers_qwen2(tmp_path):
    """Other Qwen2 checkpoints tie lm_head to the embeddings (no lm_head tensor) and use GQA."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_audio_edge.runtime.decoder import load_decoder

    cfg = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    ref = Qwen2ForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())  # safe_open has no __contains__
    assert "lm_head.weight" not in saved
    ours = load_decoder(tmp_path, torch.float32, "cpu")
    ids = torch.tensor([[1, 2, 50, 299, 7, 8, 100]])
    with torch.no_grad():
        expected = ref(ids).logits[0]
        got = ours(ours.embed(ids), 0, ours.setup_cache(32), all_logits=True)[0]
    # measured 0 (the same fp32 ops in the same order); bound 1e-5 × max (room for another torch build's order)
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


@pytest.mark.parametrize("dtype,rel_tol", [("fp16", 1.5e-2), ("bf16", 8e-2)])
def test_half_precision_activations_track_fp32(mha, pipelines, dtype, rel_tol):
    """--dtype fp16/bf16: first-step logits within rel_tol × max|logit| of fp32, same first greedy tokens."""
    ids = [5, 17, 42, 99, 7, 300, 12, 8, 250, 33]
    out = {}
    for name in ("fp32", dtype):
        p = pipelines(mha, dtype=name)
        with torch.inference_mode():
            cache = p.decoder.setup_cache(32)
            out[name] = p.decoder(p.decoder.embed(torch.tensor([ids])), 0, cache, all_logits=True)[0].float()
    ref = out["fp32"]
    assert (out[dtype] - ref).abs().max().item() <= rel_tol * ref.abs().max().item()
    a = pipelines(mha).run(signal(2.0), "Hi", sampling=SamplingOptions(max_new_tokens=4, **GREEDY_KW)).token_ids
    b = (
        pipelines(mha, dtype=dtype)
        .run(signal(2.0), "Hi", sampling=SamplingOptions(max_new_tokens=4, **GREEDY_KW))
        .token_ids
    )
    assert a[:2] == b[:2]


def test_audio_embeddings_fill_the_audio_slots_in_order():
    """place_audio: the k-th audio row lands on the k-th <|AUDIO|> slot outside the text spans; a list is
    concatenated; a count mismatch is a one-line OptionsError naming both counts."""
    from qwen_audio_edge.runtime.errors import OptionsError
    from qwen_audio_edge.runtime.prompt import place_audio

    A = 9
    ids = [1, A, A, 2, A, 3, A]  # the last one is generated text (text span [6, 7))
    embeds = torch.zeros(1, len(ids), 2)
    audio = [torch.tensor([[1.0, 1.0], [2.0, 2.0]]), torch.tensor([[3.0, 3.0]])]
    out = place_audio(embeds, ids, audio, A, text_spans=[(6, 7)])
    assert out is embeds and embeds[0, :, 0].tolist() == [0, 1, 2, 0, 3, 0, 0]
    flat = torch.zeros(len(ids), 2, dtype=torch.float16)  # [S, hidden] and a cast to the embeddings' dtype
    assert place_audio(flat, ids, torch.cat(audio), A, text_spans=[(6, 7)]).dtype == torch.float16
    assert flat[:, 1].tolist() == [0, 1, 2, 0, 3, 0, 0]
    for wrong in (torch.cat(audio), None):
        with pytest.raises(OptionsError, match=rf"hold 4 audio slots but {0 if wrong is None else 3} audio embeddings"):
            place_audio(torch.zeros(1, len(ids), 2), ids, wrong, A)


def test_special_tokens_in_user_text_are_rejected(mha, pipelines):
    from qwen_audio_edge.runtime.errors import OptionsError

    with pytest.raises(OptionsError, match=r"<\|AUDIO\|>"):
        pipelines(mha).run(signal(1.0), "what is <|AUDIO|> here?")


def test_endoftext_stop_is_not_carried_into_the_next_turn(mha, pipelines):
    """An answer ending on <|endoftext|> continues as the template renders it: …answer<|im_end|>\\n<|im_start|>user…"""
    p = pipelines(mha)
    eot = p.prompt.token_id("<|endoftext|>")
    original = p.decoder.forward
    calls = []

    def eot_on_third(embeds, start, cache, **kw):
        out = original(embeds, start, cache, **kw)
        calls.append(1)
        if len(calls) == 3:
            out = out.clone()
            out[..., eot] += 1e4
        return out

    conv = p.chat()
    p.decoder.forward = eot_on_third
    try:
        first = conv.send(
            None, "Hello there.", sampling=SamplingOptions(max_new_tokens=10, greedy=True, repetition_penalty=1.0)
        )
    finally:
        del p.decoder.forward
    assert first.token_ids[-1] == eot and first.finish_reason == "stop"
    assert conv.ids[-1] != eot and conv.cached == len(conv.ids)
    conv.send(None, "Thanks!", sampling=SamplingOptions(max_new_tokens=2, **GREEDY_KW))
    tok = mha.processor.tokenizer
    head = mha.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Hello there."}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    expected = (
        tok(head)["input_ids"]
        + first.token_ids[:-1]
        + tok("<|im_end|>\n<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    )
    assert conv.ids[: len(expected)] == expected


@pytest.mark.parametrize(
    "device,match", [("gpu", "not a device name|not supported"), ("cuda:7", "CUDA"), ("mps", "not supported")]
)
def test_bad_devices_are_rejected(device, match):
    from qwen_audio_edge.runtime.errors import OptionsError
    from qwen_audio_edge.runtime.pipeline import RuntimeOptions

    with pytest.raises(OptionsError, match=match):
        RuntimeOptions(device=device)


def test_array_inputs(mha, pipelines):
    from qwen_audio_edge.runtime.errors import AudioError

    p = pipelines(mha)
    x = signal(1.0)
    a = p.load_waveform(torch.from_numpy(x).to(torch.bfloat16).requires_grad_(False))
    assert a.dtype == np.float32 and len(a) == len(x)
    assert len(p.load_waveform(x, sampling_rate=8000)) == 2 * len(x)
    with pytest.raises(AudioError):
        p.load_waveform([[0.1, 0.2], [0.3]])
    with pytest.raises(AudioError, match="sample rate"):
        p.load_waveform(x, sampling_rate=0)
    with pytest.raises(AudioError, match="file path or an array"):
        p.load_waveform(12345)


@pytest.mark.parametrize("w4", [False, True])
def test_fused_projections_equal_separate_ones(mha, w4, tmp_path):
    """q/k/v and gate/up fused into one matmul each give the same logits as the checkpoint's separate linears."""
    import copy

    from qwen_audio_edge.runtime.decoder import fuse_projections, load_decoder
    from qwen_audio_edge.runtime.quant_linear import QuantLinear, fuse_linears

    sep = load_decoder(mha.artifacts / "decoder", torch.float32, "cpu", fuse=False)
    if w4:  # random GPTQ tensors in the real layout (act-order g_idx shared by q/k/v and by gate/up, as GPTQ gives)
        from qwen_audio_edge.runtime.quant_linear import swap_in_quant_linears

        torch.manual_seed(0)
        swap_in_quant_linears(sep, {"quant_method": "gptq", "bits": 4, "group_size": 32})
        for layer in sep.model.layers:
            perms = {}
            for name, m in layer.named_modules():
                if isinstance(m, QuantLinear):
                    k, n = m.in_features, m.out_features
                    key = (name.split(".")[0], k, name.endswith(("o_proj", "down_proj")))
                    perm = perms.setdefault(key, torch.randperm(k))
                    m.qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32)
                    m.qzeros = torch.randint(-(2**31), 2**31 - 1, (k // 32, n // 8), dtype=torch.int32)
                    m.scales = (torch.rand(k // 32, n) * 0.02).half()
                    m.g_idx = (torch.arange(k) // 32).int()[perm]
                    if m.bias is not None:
                        m.bias = torch.randn(n).half() * 0.1
    fused = copy.deepcopy(sep)
    assert fuse_projections(fused) == 2 * len(sep.model.layers)
    assert not hasattr(fused.model.layers[0].self_attn, "q_proj") and fused.model.layers[0].mlp.gate_up_proj is not None
    ids = torch.tensor([[3, 50, 100, 7, 250, 11, 42]])
    with torch.inference_mode():
        a = sep(sep.embed(ids), 0, sep.setup_cache(8), all_logits=True)[0]
        b = fused(fused.embed(ids), 0, fused.setup_cache(8), all_logits=True)[0]
    # measured 0 (fp32 and W4: each output column is the same dot product, fused or not): fusing must not change the
    # arithmetic; bound 1e-6 × max (a few float32 ulps of room)
    assert (a - b).abs().max().item() <= 1e-6 * a.abs().max().item()
    if w4:  # parts with different g_idx (no shared Hessian) are left separate
        layer = sep.model.layers[0].mlp
        layer.up_proj.g_idx = layer.up_proj.g_idx.flip(0)
        assert fuse_linears([layer.gate_proj, layer.up_proj]) is None


@pytest.mark.parametrize("model_name", ["mha", "gqa"])
def test_static_decode_step_equals_dynamic_forward(model_name, request):
    """The CUDA-graph-capturable step (token/position as device tensors, attention over a bucket of the
    cache with a mask) is the same computation as the dynamic forward, across bucket boundaries."""
    from qwen_audio_edge.runtime.decode_graph import DecodeStep
    from qwen_audio_edge.runtime.decoder import load_decoder

    model = request.getfixturevalue(model_name)
    d = load_decoder(model.artifacts / "decoder", torch.float32, "cpu")
    prompt = torch.tensor([[3, 50, 100, 7, 250, 11, 42, 9, 17, 77]])
    with torch.inference_mode():
        ca, cb = d.setup_cache(64), KVCache(d.args, 64, torch.float32, "cpu")
        ref_logits = d(d.embed(prompt), 0, ca)[0, -1]
        d(d.embed(prompt), 0, cb)
        step = DecodeStep(d, cb, graphs=False, min_bucket=16)
        assert [step.bucket(p) for p in (0, 15, 16, 31, 32, 63)] == [16, 16, 32, 32, 64, 64]
        token = int(ref_logits.argmax())
        for pos in range(prompt.shape[1], 60):  # crosses the 16 → 32 → 64 buckets
            a = d(d.embed(torch.tensor([[token]])), pos, ca)[0, -1]
            b = step(token, pos)
            assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item(), pos
            token = int(a.argmax())
        keys = ca.k[:, :, :, :60]  # measured ≤ 3.7e-7 × max |k|; bound 2e-6 × max (margin 5×)
        assert (keys - cb.k[:, :, :, :60]).abs().max().item() <= 2e-6 * keys.abs().max().item()
        with pytest.raises(ValueError, match="past the KV cache"):
            step(token, 64)
    with pytest.raises(ValueError, match="CUDA"):
        DecodeStep(d, cb, graphs=True)


def test_caches_from_one_decoder_do_not_interfere(mha):
    """Several caches of different lengths made from one decoder, used in turn (dynamic forward and the
    static decode step's eager twin), each give bit-for-bit the logits of a fresh decoder with only that
    cache: making a cache changes nothing another cache, pipeline or captured step computes."""
    from qwen_audio_edge.runtime.decode_graph import DecodeStep
    from qwen_audio_edge.runtime.decoder import load_decoder

    def load():
        return load_decoder(mha.artifacts / "decoder", torch.float32, "cpu")

    prompts = {64: [3, 50, 100, 7, 250, 11, 42, 9], 24: [5, 17, 42], 40: [8, 250, 33, 1, 64, 12]}
    positions = 20  # each sequence grows to 20 positions: past the 16-token bucket, and past where an
    # 8-position table made in between would end
    shared = load()

    def run(model, length, cache, *, static: bool):
        """Prefill, then decode greedily one step per yield; yields the logits of each step."""
        ids = prompts[length]
        logits = model(model.embed(torch.tensor([ids])), 0, cache)[0, -1]
        step = DecodeStep(model, cache, graphs=False, min_bucket=16) if static else None
        for pos in range(len(ids), positions):
            yield logits
            token = int(logits.argmax())
            logits = step(token, pos) if static else model(model.embed(torch.tensor([[token]])), pos, cache)[0, -1]
        yield logits

    def reference(length, static):
        fresh = load()
        return list(run(fresh, length, fresh.setup_cache(length), static=static))

    cases = [(64, False), (24, False), (40, True)]
    with torch.inference_mode():  # around every next(): the generators suspend mid-decode
        runs, got = [], {}
        for case in cases:  # each cache made after the previous one was prefilled
            runs.append(run(shared, case[0], shared.setup_cache(case[0]), static=case[1]))
            got[case] = [next(runs[-1])]
        for _ in range(positions):  # interleaved: one step of each, and another cache made between steps
            for case, r in zip(cases, runs, strict=True):
                out = next(r, None)
                if out is not None:
                    got[case].append(out)
            shared.setup_cache(8)
        for case in cases:
            want = reference(*case)
            assert len(got[case]) == len(want) == positions - len(prompts[case[0]]) + 1
            for a, b in zip(got[case], want, strict=True):
                assert torch.equal(a, b), case


@pytest.mark.parametrize("model_name", ["mha", "gqa"])
def test_fused_elementwise_kernels_give_the_torch_logits(model_name, request):
    """The CUDA decoder's fused norm / RoPE / SwiGLU launches (run here by the Triton interpreter) give
    the torch ops' logits, in prefill and in the static decode step."""
    pytest.importorskip("triton", reason="triton is in the dev extra")
    import copy

    from qwen_audio_edge.kernels import fused_triton
    from qwen_audio_edge.runtime.decode_graph import DecodeStep
    from qwen_audio_edge.runtime.decoder import enable_fused_kernels, load_decoder

    model = request.getfixturevalue(model_name)
    ref = load_decoder(model.artifacts / "decoder", torch.float32, "cpu")
    assert ref.fused_kernels is False and ref.model.layers[0].fused_kernels is None  # CPU keeps the torch ops
    fused = copy.deepcopy(ref)
    assert enable_fused_kernels(fused, module=fused_triton)
    layer = fused.model.layers[0]
    hd = fused.args.head_dim
    assert layer.fused_kernels is fused_triton and layer.mlp.fused_kernels is fused_triton
    assert (layer.self_attn.fused_kernels is fused_triton) == (hd & (hd - 1) == 0)
    prompt = torch.tensor([[3, 50, 100, 7, 250, 11, 42, 9]])
    with torch.inference_mode():
        ca, cb = ref.setup_cache(32), fused.setup_cache(32)
        a = ref(ref.embed(prompt), 0, ca, all_logits=True)
        b = fused(fused.embed(prompt), 0, cb, all_logits=True)
        assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()
        step = DecodeStep(fused, cb, graphs=False, min_bucket=16)
        token = int(a[0, -1].argmax())
        for pos in range(prompt.shape[1], 20):
            la = ref(ref.embed(torch.tensor([[token]])), pos, ca)[0, -1]
            lb = step(token, pos)
            assert (la - lb).abs().max().item() <= 1e-5 * la.abs().max().item(), pos
            token = int(la.argmax())
        for a_, b_ in ((ca.k, cb.k), (ca.v, cb.v)):  # K/V written into the cache by the RoPE kernel
            assert (a_[:, :, :, :20] - b_[:, :, :, :20]).abs().max() <= 1e-5 * a_[:, :, :, :20].abs().max()
        more = torch.tensor([[5, 60, 7, 8, 99]])  # a second turn: several positions prefilled at start > 0
        a = ref(ref.embed(more), 20, ca, all_logits=True)
        b = fused(fused.embed(more), 20, cb, all_logits=True)
        assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()


def test_fused_kernels_fall_back_to_torch_ops_with_a_warning(mha, monkeypatch):
    """If Triton cannot compile or run the fused kernels on the device, loading warns and keeps the torch ops."""
    pytest.importorskip("triton", reason="triton is in the dev extra")
    from qwen_audio_edge.cli import _runtime_options, build_parser
    from qwen_audio_edge.kernels import fused_triton
    from qwen_audio_edge.runtime.decoder import enable_fused_kernels, load_decoder

    d = load_decoder(mha.artifacts / "decoder", torch.float32, "cpu")

    def broken(*args, **kwargs):
        raise RuntimeError("failed to compile the launcher: no C compiler")

    monkeypatch.setattr(fused_triton, "rms_norm", broken)
    with pytest.warns(
        RuntimeWarning, match="fused Triton kernels failed their self-check .*no C compiler.*plain torch ops"
    ):
        assert enable_fused_kernels(d) is False
    assert d.model.layers[0].fused_kernels is None
    monkeypatch.undo()
    # a kernel that runs but computes something else (5 % off) is caught by the comparison
    real_silu_mul = fused_triton.silu_mul
    monkeypatch.setattr(fused_triton, "silu_mul", lambda gu: real_silu_mul(gu) * 1.05)
    with pytest.warns(RuntimeWarning, match=r"silu_mul: max error 0\.0[45]\d* of max \|reference\|, over the 0\.001"):
        assert enable_fused_kernels(d) is False
    assert d.model.layers[0].mlp.fused_kernels is None
    monkeypatch.undo()
    assert enable_fused_kernels(d) is True  # the interpreter runs them here (TRITON_INTERPRET=1)
    assert _runtime_options(build_parser().parse_args(["run", "A", "--no-fuse"])).fuse is False
