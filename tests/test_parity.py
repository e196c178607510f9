"""Golden parity with transformers' Qwen2AudioForConditionalGeneration + Qwen2AudioProcessor.

Tolerances (measured on CPU, torch 2.13 / onnxruntime 1.32; the margins leave room for the CI's second environment,
another torch/onnxruntime build that may sum in another order): mel ≤ 1e-6 abs; encoder+projector (fp32 ONNX)
≤ 1e-5 abs on every valid token; first-step logits ≤ 1e-5 × max |logit|; greedy generation token-identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import GREEDY_KW, PROMPT, reference_greedy, reference_inputs, signal
from qwen_audio_edge.runtime.generate import SamplingOptions

# (seconds, loud_end): not a multiple of the hop; ending loud; longer than 10 s.
LENGTHS = [(3.30037, False), (2.0, True), (12.3457, False)]


def _front(pipeline):
    return pipeline.mel


@pytest.mark.parametrize("seconds,loud", LENGTHS + [(29.9999, True), (0.0201, False)])
def test_mel_matches_feature_extractor(mha, pipelines, seconds, loud):
    p = pipelines(mha)
    wave = signal(seconds, loud_end=loud)
    ref = mha.processor.feature_extractor(
        wave, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt"
    )
    mel, n_valid = p.mel.log_mel(wave)
    assert n_valid == int(ref["attention_mask"].sum())
    # Valid frames, plus the two boundary frames the encoder also reads.
    width = mel.shape[1]
    assert width == min(n_valid + 2, 3000)
    # measured 0–1.2e-7 (one float32 ulp at 1); bound 1e-6 (margin 8×)
    assert (mel - ref["input_features"][0, :, :width]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("shape", ["mha", "gqa"])
@pytest.mark.parametrize("seconds,loud", LENGTHS + [(30.0, True)])
def test_encoder_onnx_matches_reference_on_valid_tokens(request, pipelines, shape, seconds, loud):
    model = request.getfixturevalue(shape)
    p = pipelines(model)
    wave = signal(seconds, loud_end=loud)
    ref_model = model.reference.model
    feats = model.processor.feature_extractor(
        wave, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt"
    )
    from transformers.masking_utils import create_bidirectional_mask

    tower = ref_model.audio_tower
    lengths, n_tokens = tower._get_feat_extract_output_lengths(feats["attention_mask"].sum(-1))
    mask = create_bidirectional_mask(
        config=tower.config,
        inputs_embeds=torch.zeros(1, 1500, 1),
        attention_mask=(torch.arange(1500)[None] < lengths[:, None]).long(),
    )
    with torch.no_grad():
        ref = ref_model.multi_modal_projector(tower(feats["input_features"], attention_mask=mask).last_hidden_state)
    ref = ref[0, : int(n_tokens)]
    mel, n_valid = p.mel.log_mel(wave)
    ours = p.encoder(mel, n_valid)
    assert p.encoder.name == "onnx"
    assert ours.shape == ref.shape
    # measured 1.7e-6–2.0e-6 (the outputs reach |4|); bound 1e-5 (margin 5×)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_export_recorded_encoder_verification(mha, mha_fp16):
    from qwen_audio_edge.runtime.artifacts import load_manifest

    v = load_manifest(mha.artifacts).manifest["encoder"]["verification"]
    assert v["fp32_max_abs_err_vs_transformers"] <= 1e-5  # measured 1.9e-6; bound 1e-5 (margin 5×)
    assert v["mel_max_abs_err_vs_feature_extractor"] <= 1e-6  # measured 0; bound 1e-6 (8 float32 ulp at 1)
    v16 = load_manifest(mha_fp16.artifacts).manifest["encoder"]["verification"]
    assert 1 - v16["fp16_min_cosine_vs_fp32"] <= 5e-6  # measured 4.8e-7; bound 5e-6 (margin 10×)


@pytest.mark.parametrize("shape", ["mha", "gqa"])
def test_first_step_logits(request, pipelines, shape):
    model = request.getfixturevalue(shape)
    p = pipelines(model)
    wave = signal(3.30037)
    inputs = reference_inputs(model, wave, PROMPT)
    with torch.no_grad():
        ref_logits = model.reference(**inputs).logits[0, -1]
    conv = p.chat()
    captured = {}
    original = p.decoder.forward

    n_prompt = inputs["input_ids"].shape[1]

    def spy(embeds, start, cache, **kw):
        out = original(embeds, start, cache, **kw)
        if start + embeds.shape[1] == n_prompt:  # the call that ends the prompt (its prefix was prefilled first)
            captured["logits"] = out[0, -1].clone()
        return out

    p.decoder.forward = spy
    try:
        conv.send(wave, PROMPT, sampling=SamplingOptions(max_new_tokens=1, greedy=True, repetition_penalty=1.0))
    finally:
        del p.decoder.forward
    assert conv.ids[: inputs["input_ids"].shape[1]] == inputs["input_ids"][0].tolist()
    ours = captured["logits"]
    tol = 1e-5 * ref_logits.abs().max().item()  # measured 1.3e-6 (mha), 1.9e-6 (gqa) × max; bound 1e-5 (margin 5×)
    assert (ours - ref_logits).abs().max().item() <= tol


@pytest.mark.parametrize("shape", ["mha", "gqa"])
@pytest.mark.parametrize("seconds,loud", LENGTHS)
def test_greedy_generation_token_identical(request, pipelines, shape, seconds, loud):
    model = request.getfixturevalue(shape)
    p = pipelines(model)
    wave = signal(seconds, loud_end=loud, seed=1)
    inputs = reference_inputs(model, wave, PROMPT)
    expected = reference_greedy(model, inputs, 32)
    result = p.run(wave, PROMPT, sampling=SamplingOptions(max_new_tokens=32, **GREEDY_KW))
    assert result.token_ids == expected
    assert len(set(expected)) > 8, "fixture decodes degenerately: the parity check would prove little"
    assert result.timings["audio_tokens"] == int((inputs["input_ids"] == model.reference.config.audio_token_id).sum())


def test_greedy_with_repetition_penalty_matches(mha, pipelines):
    p = pipelines(mha)
    wave = signal(4.2)
    inputs = reference_inputs(mha, wave, PROMPT)
    expected = reference_greedy(mha, inputs, 24, repetition_penalty=1.3)
    got = p.run(
        wave, PROMPT, sampling=SamplingOptions(max_new_tokens=24, greedy=True, repetition_penalty=1.3, ignore_eos=True)
    )
    assert got.token_ids == expected


def test_base_model_raw_prompt_matches(base_model, pipelines):
    p = pipelines(base_model)
    assert p.prompt.chat_template is None
    wave = signal(5.5)
    prompt = "Transcribe the speech:"
    inputs = reference_inputs(base_model, wave, prompt)
    expected = reference_greedy(base_model, inputs, 32)
    got = p.run(wave, prompt, sampling=SamplingOptions(max_new_tokens=32, **GREEDY_KW))
    assert got.token_ids == expected


def test_fp16_weights_match_reference_with_the_same_rounding(mha_fp16, pipelines):
    """The default --bits 16 export: identical to transformers run on the fp16-rounded weights in fp32."""
    p = pipelines(mha_fp16, encoder_precision="fp32")
    ref = mha_fp16.reference
    with torch.no_grad():
        for prm in ref.model.language_model.parameters():
            prm.copy_(prm.half().float())
        ref.lm_head.weight.copy_(ref.lm_head.weight.half().float())
    wave = signal(3.7)
    inputs = reference_inputs(mha_fp16, wave, PROMPT)
    expected = reference_greedy(mha_fp16, inputs, 32)
    got = p.run(wave, PROMPT, sampling=SamplingOptions(max_new_tokens=32, **GREEDY_KW))
    assert got.token_ids == expected


def test_text_only_turn_matches(mha, pipelines):
    p = pipelines(mha)
    inputs = reference_inputs(mha, None, "Tell me about the weather.")
    expected = reference_greedy(mha, inputs, 16)
    got = p.run(
        None,
        "Tell me about the weather.",
        sampling=SamplingOptions(max_new_tokens=16, greedy=True, repetition_penalty=1.0, ignore_eos=True),
    )
    assert got.token_ids == expected


def test_long_audio_is_split_into_numbered_segments(mha, pipelines):
    """> 30 s: several `Audio N:` entries, every sample used (nothing truncated), same as transformers given the segments."""
    p = pipelines(mha)
    wave = signal(61.3)
    result = p.run(
        wave, PROMPT, sampling=SamplingOptions(max_new_tokens=4, greedy=True, repetition_penalty=1.0, ignore_eos=True)
    )
    from qwen_audio_edge.runtime.audio import num_audio_tokens, split_segments

    segs = split_segments(wave, p.mel.config)
    assert len(segs) == 3 and sum(len(s) for s in segs) == len(wave)
    assert result.timings["audio_tokens"] == sum(num_audio_tokens(p.mel.valid_frames(len(s))) for s in segs)
    proc = mha.processor
    content = [{"type": "audio", "audio_url": f"{i}.wav"} for i in range(3)] + [{"type": "text", "text": PROMPT}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    assert "Audio 3:" in text
    inputs = proc(text=text, audio=segs, sampling_rate=16000, return_tensors="pt")
    expected = reference_greedy(mha, inputs, 4)
    assert result.token_ids == expected
    assert np.isfinite(result.timings["encoder_ms"])
