"""The 7B shape's memory report in `bench --shape 7b`: runtime/memory_plan.py for Qwen2-Audio-7B's real config,
by default and in the 8 GB card's configuration, for 30 s of audio + 1k generated tokens.

Computed, not measured: the plan sums the tensors of the real modules built on the meta device (so the
accounting follows the code) and adds each stage's activation peak. bench/memory_7b.py writes the same
plans, every configuration, to bench/results/cpu/memory_7b.json.
"""

from __future__ import annotations

from typing import Any

from ..runtime.memory_plan import GIB, memory_plan
from ..runtime.options import RuntimeOptions

TARGET_GIB = 6.0
AUDIO_SECONDS, NEW_TOKENS, PROMPT_TOKENS = 30.0, 1024, 64

# Qwen2-Audio-7B's config.json values (the decoder's, with the quantization_config our GPTQ export writes;
# the Whisper-large-v3-style audio tower's).
QWEN2_AUDIO_7B = {
    "text": {
        "vocab_size": 156032,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "quantization_config": {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": 128,
            "desc_act": True,
            "sym": True,
            "checkpoint_format": "gptq",
        },
    },
    "audio": {
        "num_mel_bins": 128,
        "d_model": 1280,
        "encoder_layers": 32,
        "encoder_attention_heads": 20,
        "encoder_ffn_dim": 5120,
        "max_source_positions": 1500,
        "activation_function": "gelu",
    },
}

# (name, RuntimeOptions fields, whether the export wrote the int8 lm_head side file)
CONFIGS: list[tuple[str, dict[str, Any], bool]] = [
    ("default (fp16 export head)", {}, False),
    ("default (export --lm-head int8)", {}, True),
    ("8 GB: host emb, int8 head, fp16 KV", {"embeddings": "host", "lm_head": "int8"}, False),
    ("8 GB: host emb, int8 head, int8 KV", {"embeddings": "host", "lm_head": "int8", "kv_cache": "int8"}, False),
    # the turn needs 750 + 64 + 1024 = 1838 positions: --max-context 1856 instead of the plan's 256-rounded 2048
    (
        "8 GB: host emb, int8 head, fp16 KV, ctx 1856",
        {"embeddings": "host", "lm_head": "int8", "max_context": 1856},
        False,
    ),
    ("8 GB: int8 emb, int8 head, int8 KV", {"embeddings": "int8", "lm_head": "int8", "kv_cache": "int8"}, False),
    ("everything on the device, fp16", {"embeddings": "dtype", "lm_head": "dtype"}, False),
]


def plans() -> list[dict]:
    """Every configuration's plan, for a CUDA device (fp16 activations, the torch fp16 encoder)."""
    rows = []
    for name, fields, head_file in CONFIGS:
        options = RuntimeOptions(dtype="fp16", encoder_backend="torch", encoder_precision="fp16", **fields)
        plan = memory_plan(
            QWEN2_AUDIO_7B, options, AUDIO_SECONDS, NEW_TOKENS, PROMPT_TOKENS, has_int8_head=head_file, device="cuda"
        )
        rows.append({"name": name, "options": fields, "export_int8_head": head_file, "plan": plan.to_json()})
    return rows


def memory_report_7b() -> dict:
    """The bench JSON's `memory_plan`: each configuration's peak (GiB) and whether it meets the 6 GiB target."""
    configs = plans()
    return {
        "title": f"Qwen2-Audio-7B W4 on CUDA, {AUDIO_SECONDS:g} s audio + {NEW_TOKENS} new tokens; peak device GiB "
        f"(target ≤ {TARGET_GIB:g})",
        "method": "runtime/memory_plan.py: tensor sizes of the real modules on the meta device + activation peaks",
        "target_gib": TARGET_GIB,
        "rows": [{"name": c["name"], "gib": round(c["plan"]["peak_bytes"] / GIB, 3)} for c in configs],
        "configs": configs,
    }
