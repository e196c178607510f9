"""Tiny random Qwen2-Audio checkpoints in the exact Hugging Face layout.

Why this exists: no real weights can be downloaded where we build and test, yet the loading code must
be exercised on the real on-disk format. These checkpoints are written by transformers itself
(`save_pretrained`, sharded safetensors + index), with a byte-level BPE tokenizer carrying the real
special tokens, the processor's preprocessor config and chat template. The tests use them and so
does `qwen-audio-edge demo`.

Random init at std 0.02 gives nearly flat logits, so greedy decoding would be a tie-break lottery and a
parity test would prove little. We re-initialise with wider weights (documented below) so that the
model's next-token distribution is peaked and varied.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")

# The Qwen2-Audio-7B-Instruct chat template (ChatML with a default system turn and numbered audio slots).
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

_CORPUS = (
    "What does the person say in this audio? Transcribe the speech. Describe the sound. "
    "The quick brown fox jumps over the lazy dog. A glass breaks on the floor. "
    "The speaker sounds happy and talks about the weather in the morning. "
    "Please answer in English. Is there music, speech or noise? Thank you very much! "
    "0123456789 hello world, this is a test of the audio language model runtime."
)


@dataclass(frozen=True)
class TinyShape:
    """Dimensions of a tiny checkpoint. Linear dims are multiples of 128 for group-size-128 quantization."""

    name: str
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    vocab_size: int = 512
    audio_d_model: int = 64
    audio_layers: int = 2
    audio_heads: int = 4
    audio_ffn_dim: int = 128
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096


# MHA as the real 7B (num_key_value_heads == num_attention_heads), and a GQA variant.
MHA = TinyShape(name="mha")
GQA = TinyShape(name="gqa", num_attention_heads=4, num_key_value_heads=2, rope_theta=1_000_000.0)
SHAPES = {s.name: s for s in (MHA, GQA)}


def build_tokenizer(out_dir: Path):
    """Train a tiny byte-level BPE, wrap it as transformers' Qwen2Tokenizer with the real special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    state = json.loads(bpe.to_str())
    vocab = state["model"]["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["model"]["merges"]]
    for special in SPECIAL_TOKENS:  # the real order: <|endoftext|> first, then ChatML, then audio tokens
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # tokenizers' BPE takes (a, b) pairs; transformers hints str
        unk_token=None,  # type: ignore[arg-type]  # byte-level BPE needs no unknown token; the hint says str
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS),
    )
    tok.audio_token = "<|AUDIO|>"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _widen_weights(model, seed: int) -> None:
    """Re-initialise with weights wide enough that greedy decoding is decisive (not a tie-break).

    Linear weights ~ N(0, 1/fan_in) (unit gain), embeddings ~ N(0, 1), biases ~ N(0, 0.1), norm gains
    around 1, so activations stay O(1). Decoder q/k get gain 3 (sharper, position-dependent attention:
    with unit gain greedy decoding falls into a one-token loop) and lm_head gain 4 (peaked logits: on the
    MHA fixture the top-1/top-2 gap over 32 greedy steps stays above 0.1, measured).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embed_positions.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif p.ndim >= 2 and "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                gain = 1.0
                if "lm_head" in name:
                    gain = 4.0
                elif "language_model" in name and ("q_proj" in name or "k_proj" in name):
                    gain = 3.0
                p.copy_(torch.randn(p.shape, generator=gen) * gain / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def build_tiny_checkpoint(
    out_dir: str | Path,
    shape: TinyShape | str = MHA,
    *,
    chat_template: bool = True,
    seed: int = 0,
    max_shard_size: str = "200KB",
    audio_embed_scale: float = 1.0,
) -> Path:
    """Write a tiny random Qwen2-Audio checkpoint to `out_dir` in the Hugging Face layout; return the dir.

    `audio_embed_scale` multiplies the projector (weights and bias): > 1 makes audio embeddings
    statistically unlike token embeddings, as they are in the real model (GPTQ calibration tests).
    `chat_template=False` makes a base-model checkpoint (like Qwen2-Audio-7B), which uses the raw
    `<|audio_bos|><|AUDIO|><|audio_eos|>{text}` prompt. Small `max_shard_size` forces several shards
    plus `model.safetensors.index.json`, as the real 7B has.
    """
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars would clutter demo and test output
    if isinstance(shape, str):
        shape = SHAPES[shape]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    if not chat_template:
        tok.chat_template = None
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if max(ids.values()) >= shape.vocab_size:
        raise ValueError(f"tokenizer needs {max(ids.values()) + 1} ids but vocab_size is {shape.vocab_size}")

    text_config = {
        "model_type": "qwen2",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "max_position_embeddings": shape.max_position_embeddings,
        "rope_theta": shape.rope_theta,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|endoftext|>"],
    }
    audio_config = {
        "model_type": "qwen2_audio_encoder",
        "num_mel_bins": 128,
        "encoder_layers": shape.audio_layers,
        "encoder_attention_heads": shape.audio_heads,
        "encoder_ffn_dim": shape.audio_ffn_dim,
        "d_model": shape.audio_d_model,
        "max_source_positions": 1500,
    }
    config = Qwen2AudioConfig(audio_config=audio_config, text_config=text_config, audio_token_index=ids["<|AUDIO|>"])
    config.tie_word_embeddings = shape.tie_word_embeddings
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    _widen_weights(model, seed)
    if audio_embed_scale != 1.0:
        with torch.no_grad():
            for p in model.model.multi_modal_projector.parameters():
                p.mul_(audio_embed_scale)
    if shape.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|endoftext|>"], ids["<|im_end|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=True,
        top_k=20,
        top_p=0.5,
        temperature=0.7,
        repetition_penalty=1.1,
    )
    model.save_pretrained(out, max_shard_size=max_shard_size)

    fe = WhisperFeatureExtractor(feature_size=128)
    processor = Qwen2AudioProcessor(
        feature_extractor=fe, tokenizer=tok, chat_template=CHAT_TEMPLATE if chat_template else None
    )
    processor.save_pretrained(out)
    # Mirror the published Qwen2-Audio repos: preprocessor_config.json beside the tokenizer files and the
    # template in chat_template.json (transformers 5 itself writes processor_config.json + .jinja).
    fe.save_pretrained(out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    if chat_template:
        (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    return out
