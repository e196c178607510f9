"""Read a local Hugging Face Qwen2-Audio checkpoint: config, processor files, and weights shard by shard.

Weights are streamed one tensor at a time from each safetensors shard (mmap), so exporting a 16 GB
checkpoint never holds it twice in RAM. Keys are mapped to runtime names:
`audio_tower.*`/`multi_modal_projector.*` → encoder, `language_model.model.*` → decoder `model.*`,
`language_model.lm_head.weight` → `lm_head.weight`. transformers 5.0–5.17 write the decoder as
`language_model.model.model.*` and 5.x's internal names are `model.language_model.*`: all are accepted,
and a key that maps to no runtime tensor name is refused here, before anything is written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..runtime.errors import CheckpointError

_PREFIXES = (
    ("audio_tower.", "encoder", "audio_tower."),
    ("model.audio_tower.", "encoder", "audio_tower."),
    ("multi_modal_projector.", "encoder", "multi_modal_projector."),
    ("model.multi_modal_projector.", "encoder", "multi_modal_projector."),
    ("language_model.model.model.", "decoder", "model."),  # transformers ≤ 5.17's save_pretrained
    ("language_model.model.", "decoder", "model."),
    ("model.language_model.", "decoder", "model."),
    ("language_model.lm_head.", "decoder", "lm_head."),
    ("lm_head.", "decoder", "lm_head."),
)


# The runtime names each part can hold (the loaders check shapes; this catches a foreign key at export).
_RUNTIME_KEY = {
    "encoder": re.compile(
        r"audio_tower\.(conv[12]|embed_positions|layer_norm|layers\.\d+)\.|multi_modal_projector\.linear\."
    ),
    "decoder": re.compile(r"model\.(embed_tokens|norm|layers\.\d+)\.|lm_head\."),
}


def map_key(key: str) -> tuple[str, str]:
    """Checkpoint key → (part, runtime key); part is "encoder" or "decoder"."""
    for prefix, part, new in _PREFIXES:
        if key.startswith(prefix):
            mapped = new + key[len(prefix) :]
            if _RUNTIME_KEY[part].match(mapped):
                return part, mapped
            break
    raise CheckpointError(
        f"unexpected tensor {key!r}: not a Qwen2-Audio weight (expected audio_tower.*, multi_modal_projector.*, "
        "language_model.model[.model].* or language_model.lm_head.*); is this a Qwen2-Audio checkpoint?"
    )


@dataclass(frozen=True)
class SourceCheckpoint:
    root: Path
    raw_config: dict
    weight_files: tuple[Path, ...]

    @classmethod
    def open(cls, path: str | Path) -> SourceCheckpoint:
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {root}")
        cfg_path = root / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{root} has no config.json: not a Hugging Face checkpoint directory")
        raw = json.loads(cfg_path.read_text())
        if raw.get("model_type") != "qwen2_audio":
            raise CheckpointError(f"{cfg_path}: model_type is {raw.get('model_type')!r}, expected 'qwen2_audio'")
        index = root / "model.safetensors.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = tuple(root / n for n in names)
        else:
            files = tuple(sorted(root.glob("*.safetensors")))
        if not files:
            raise CheckpointError(
                f"{root} has no *.safetensors weights (.bin checkpoints are not supported: convert them)"
            )
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"shard {f.name} listed in the index is missing from {root}")
        return cls(root=root, raw_config=raw, weight_files=files)

    def resolved_config(self) -> dict:
        """config.json with every default filled in by transformers (the real 7B config omits most values)."""
        from transformers import PreTrainedConfig, Qwen2AudioConfig

        cfg = Qwen2AudioConfig.from_pretrained(str(self.root))
        # The sub-configs are typed "dict | config | None" as constructor arguments; the constructor turns
        # both a dict and a missing one into a config object.
        assert isinstance(cfg.text_config, PreTrainedConfig) and isinstance(cfg.audio_config, PreTrainedConfig)
        text = cfg.text_config.to_dict()
        audio = cfg.audio_config.to_dict()
        text.setdefault("tie_word_embeddings", bool(self.raw_config.get("tie_word_embeddings", False)))
        rope = text.get("rope_parameters") or {}
        if "rope_theta" not in text and "rope_theta" in rope:
            text["rope_theta"] = rope["rope_theta"]
        return {"text": text, "audio": audio, "audio_token_id": int(cfg.audio_token_id)}

    def iter_tensors(self, part: str) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (runtime key, tensor) of one part, shard by shard (one tensor resident at a time)."""
        from safetensors import safe_open

        for f in self.weight_files:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for key in sf.keys():  # noqa: SIM118 -- safe_open has keys() but is not iterable
                    p, new = map_key(key)
                    if p == part:
                        yield new, sf.get_tensor(key)

    def read_json(self, name: str) -> dict | None:
        p = self.root / name
        return json.loads(p.read_text()) if p.is_file() else None

    def preprocessor_config(self) -> dict:
        pre = self.read_json("preprocessor_config.json")
        if pre is None:
            proc = self.read_json("processor_config.json") or {}
            pre = proc.get("feature_extractor")
        if not pre:
            raise CheckpointError(
                f"{self.root}: no preprocessor_config.json (or processor_config.json feature_extractor)"
            )
        return pre

    def chat_template(self) -> str | None:
        """The template from chat_template.jinja, chat_template.json, processor or tokenizer config; None for base."""
        jinja = self.root / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
            d = self.read_json(name) or {}
            t = d.get("chat_template")
            if isinstance(t, str) and t:
                return t
        return None
