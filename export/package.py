"""`export_checkpoint`: HF checkpoint dir → artifacts dir (encoder ONNX, decoder safetensors, tokenizer,
preprocessor values, manifest), written into a temporary sibling directory and renamed at the end.

An interrupted export leaves only a `.NAME.partial-*` directory (no manifest, so it never looks valid);
an existing output is replaced only with `force=True`, and only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..runtime.artifacts import FORMAT_NAME, FORMAT_VERSION, MANIFEST, sha256_file
from ..runtime.audio import MelConfig, MelFrontEnd
from ..runtime.encoder import EncoderConfig, load_encoder_module
from ..runtime.errors import ArtifactsError, CheckpointError, ExportError, OptionsError
from .checkpoint import SourceCheckpoint
from .encoder_onnx import export_encoder_onnx, reference_embeddings, verify_encoder

DECODER_DTYPES = {16: torch.float16, 32: torch.float32}
ENCODER_DTYPES = ("fp32", "fp16")


@dataclass(frozen=True)
class ExportOptions:
    """What to write. bits: decoder weight precision (16 = fp16, 32 = fp32); encoder_dtype: runtime default."""

    bits: int = 16
    encoder_dtype: str = "fp32"
    force: bool = False
    max_shard_bytes: int = 2 << 30
    verify_seconds: float = 7.3371  # a length not a multiple of the hop, ending loud
    progress: bool = True

    def __post_init__(self) -> None:
        if self.bits not in DECODER_DTYPES:
            raise OptionsError(f"--bits {self.bits} is not supported here: use 16 (fp16) or 32 (fp32) weights")
        if self.encoder_dtype not in ENCODER_DTYPES:
            raise OptionsError(f"--encoder-dtype must be fp32 or fp16, got {self.encoder_dtype!r}")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False, dynamic_ncols=True)


def _write_decoder(src: SourceCheckpoint, out: Path, text_config: dict, dtype: torch.dtype, opts: ExportOptions) -> None:
    """Stream decoder tensors into `out` as a standard sharded Qwen2ForCausalLM safetensors checkpoint."""
    from safetensors.torch import save_file

    out.mkdir()
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    names: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if not shard:
            return
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        names.append(name)
        for k in shard:
            weight_map[k] = name
        shard, shard_bytes = {}, 0

    n_tensors = sum(1 for _ in _decoder_keys(src))
    with _progress(n_tensors, "decoder tensors", opts.progress) as bar:
        for key, tensor in src.iter_tensors("decoder"):
            t = tensor.to(dtype).contiguous()
            if not torch.isfinite(t).all():
                raise ExportError(
                    f"decoder tensor {key} is not finite in {str(dtype).replace('torch.', '')} (values overflow); "
                    "export with --bits 32"
                )
            size = t.numel() * t.element_size()
            if shard and shard_bytes + size > opts.max_shard_bytes:
                flush()
            shard[key] = t
            shard_bytes += size
            total += size
            bar.update(1)
    flush()
    # Standard names: a single file is model.safetensors; several get an index.
    if len(names) == 1:
        (out / names[0]).rename(out / "model.safetensors")
    else:
        final = {}
        for i, name in enumerate(names):
            new = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
            (out / name).rename(out / new)
            final[name] = new
        index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = dict(text_config)
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    cfg["model_type"] = "qwen2"
    cfg["dtype"] = str(dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _decoder_keys(src: SourceCheckpoint):
    from safetensors import safe_open

    from .checkpoint import map_key

    for f in src.weight_files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for key in sf.keys():
                if map_key(key)[0] == "decoder":
                    yield key


def _write_tokenizer(src: SourceCheckpoint, tmp: Path) -> None:
    tok_json = src.root / "tokenizer.json"
    if tok_json.is_file():
        shutil.copyfile(tok_json, tmp / "tokenizer.json")
    else:  # vocab.json + merges.txt only: let transformers build the fast tokenizer once, here
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(src.root))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{src.root}: no tokenizer.json and transformers could not load the tokenizer: {e}") from e
        tok.backend_tokenizer.save(str(tmp / "tokenizer.json"))
    if (src.root / "tokenizer_config.json").is_file():
        shutil.copyfile(src.root / "tokenizer_config.json", tmp / "tokenizer_config.json")


def export_checkpoint(src_dir: str | Path, out_dir: str | Path, opts: ExportOptions = ExportOptions()) -> dict:
    """Export `src_dir` to `out_dir`; returns the manifest. See the module docstring for atomicity."""
    t_start = time.perf_counter()
    out = Path(out_dir).resolve()
    if out.exists() and not opts.force:
        raise OptionsError(f"output {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OptionsError(f"output {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise OptionsError(f"output {out} is a non-empty directory that is not an artifacts directory; refusing to replace it")
    src = SourceCheckpoint.open(src_dir)
    config = src.resolved_config()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        manifest = _export_into(src, config, tmp, opts)
        manifest["export_seconds"] = round(time.perf_counter() - t_start, 2)
        _write_manifest(tmp, manifest)
        _fsync_tree(tmp)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)  # interrupted between the two renames: put the previous output back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return manifest


def _fsync_tree(root: Path) -> None:
    """Flush every written file (and the directory entries) before the rename makes them visible."""
    for p in [*root.rglob("*"), root]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _export_into(src: SourceCheckpoint, config: dict, tmp: Path, opts: ExportOptions) -> dict:
    from safetensors.torch import save_file
    from transformers import WhisperFeatureExtractor

    roles: dict[str, str] = {}
    # Front end: preprocessor values and the mel filter bank (stored, never re-derived at run time).
    pre = src.preprocessor_config()
    fe = WhisperFeatureExtractor(**{k: v for k, v in pre.items() if k not in ("feature_extractor_type", "processor_class")})
    if fe.feature_size != config["audio"]["num_mel_bins"]:
        raise CheckpointError(f"preprocessor feature_size {fe.feature_size} != encoder num_mel_bins {config['audio']['num_mel_bins']}")
    mel_cfg = MelConfig.from_dict(fe.to_dict())
    save_file({"mel_filters": torch.from_numpy(fe.mel_filters).contiguous()}, str(tmp / "mel_filters.safetensors"))
    (tmp / "preprocessor_config.json").write_text(json.dumps(fe.to_dict(), indent=2, sort_keys=True))
    roles["mel_filters"] = "mel_filters.safetensors"
    roles["preprocessor"] = "preprocessor_config.json"
    _write_tokenizer(src, tmp)
    roles["tokenizer"] = "tokenizer.json"
    template = src.chat_template()
    if template:
        (tmp / "chat_template.jinja").write_text(template)
        roles["chat_template"] = "chat_template.jinja"
    gen_cfg = src.read_json("generation_config.json") or {}

    # Encoder + projector → ONNX (fp32 always: it is what fp16 is checked against), verified.
    steps = ["encoder fp32 ONNX", "verify vs transformers"] + (["encoder fp16 ONNX"] if opts.encoder_dtype == "fp16" else [])
    enc_state = dict(src.iter_tensors("encoder"))
    enc_cfg = EncoderConfig.from_dict(config["audio"], config["text"]["hidden_size"])
    try:
        module = load_encoder_module(enc_cfg, enc_state, torch.float32)
    except ArtifactsError as e:
        raise CheckpointError(f"{src.root}: {e}") from e
    onnx_files = {}
    with _progress(len(steps), "encoder", opts.progress) as bar:
        export_encoder_onnx(module, tmp / "encoder.onnx", torch.float32)
        onnx_files["fp32"] = "encoder.onnx"
        bar.update(1)
        from .fixtures import speech_like_signal

        signal = speech_like_signal(opts.verify_seconds, mel_cfg.sampling_rate, loud_end=True)
        front = MelFrontEnd(mel_cfg, torch.from_numpy(fe.mel_filters).float())
        reference = reference_embeddings(enc_state, config["audio"], config["text"]["hidden_size"], fe, signal)
        feats = fe(signal, sampling_rate=mel_cfg.sampling_rate, return_attention_mask=True, padding="max_length", return_tensors="pt")
        mel, n_valid = front.log_mel(signal)
        mel_err = float((mel[:, :n_valid] - feats["input_features"][0, :, :n_valid]).abs().max())
        bar.update(1)
        fp16_path = None
        if opts.encoder_dtype == "fp16":
            export_encoder_onnx(module, tmp / "encoder.fp16.onnx", torch.float16)
            onnx_files["fp16"] = "encoder.fp16.onnx"
            fp16_path = tmp / "encoder.fp16.onnx"
            bar.update(1)
        verification = verify_encoder(tmp / "encoder.onnx", reference, front, signal, fp16_path)
    verification["mel_max_abs_err_vs_feature_extractor"] = mel_err
    # The torch backend's master copy: the verified fp32 weights (cast to fp16 at load on a GPU if asked).
    save_file({k: v.float().contiguous() for k, v in enc_state.items()}, str(tmp / "encoder.safetensors"))
    del enc_state, module

    # Decoder → standard Qwen2ForCausalLM safetensors folder.
    _write_decoder(src, tmp / "decoder", config["text"], DECODER_DTYPES[opts.bits], opts)
    if gen_cfg:
        (tmp / "decoder" / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    roles["decoder_dir"] = "decoder"

    import onnx
    import onnxruntime
    import transformers

    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"path": str(src.root), "name_or_path": src.raw_config.get("_name_or_path"), "config": src.raw_config},
        "config": config,
        "preprocessor": fe.to_dict() | {"n_mels": mel_cfg.n_mels},
        "generation_config": gen_cfg,
        "decoder": {"bits": opts.bits, "dtype": str(DECODER_DTYPES[opts.bits]).replace("torch.", ""), "format": "safetensors"},
        "encoder": {"onnx": onnx_files, "default": opts.encoder_dtype, "weights": "encoder.safetensors",
                    "weights_dtype": "fp32", "verification": verification},
        "files_role": roles,
        "export_options": asdict(opts),
        "tools": {
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "qwen_audio_edge": _own_version(),
        },
    }


def _own_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qwen-audio-edge")
    except PackageNotFoundError:
        return "unknown"


def _write_manifest(tmp: Path, manifest: dict) -> None:
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            rel = p.relative_to(tmp).as_posix()
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest["files"] = files
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    if not (tmp / MANIFEST).is_file():  # pragma: no cover
        raise ExportError("manifest was not written")
