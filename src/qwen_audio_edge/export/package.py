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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..runtime.artifacts import FORMAT_NAME, FORMAT_VERSION, MANIFEST, sha256_file
from ..runtime.audio import MelConfig, MelFrontEnd
from ..runtime.encoder import EncoderConfig, load_encoder_module
from ..runtime.errors import ArtifactsError, CheckpointError, ExportError, OptionsError
from .calibrate import CalibrationOptions
from .checkpoint import SourceCheckpoint
from .encoder_onnx import EncoderTolerances, export_encoder_onnx, reference_embeddings, verify_encoder
from .gptq import GPTQConfig

DECODER_DTYPES = {16: torch.float16, 32: torch.float32}
ENCODER_DTYPES = ("fp32", "fp16")


@dataclass(frozen=True)
class ExportOptions:
    """What to write.

    bits: 4 (GPTQ W4, calibrated on audio + text), 16 (fp16) or 32 (fp32) decoder weights;
    encoder_dtype: the runtime's default encoder. The GPTQ fields apply to bits=4 only.
    """

    bits: int = 16
    encoder_dtype: str = "fp32"
    force: bool = False
    max_shard_bytes: int = 2 << 30
    verify_seconds: float = 7.3371  # a length not a multiple of the hop, ending loud
    progress: bool = True
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    lm_head: str = "fp16"  # fp16 | int8 (side file only our runtime reads)
    resume: bool = False
    threads: int | None = None  # fixed for reproducible (resumable) GPTQ
    quant_device: str = "cpu"
    hf_checkpoint: Path | None = None  # also write a full Qwen2-Audio GPTQ checkpoint (vLLM layout) here

    def __post_init__(self) -> None:
        if self.hf_checkpoint is not None and self.bits != 4:
            raise OptionsError("--hf-checkpoint writes a GPTQ checkpoint: it needs --bits 4")
        if self.bits not in (4, *DECODER_DTYPES):
            raise OptionsError(f"--bits {self.bits} is not supported: use 4 (GPTQ), 16 (fp16) or 32 (fp32)")
        if self.encoder_dtype not in ENCODER_DTYPES:
            raise OptionsError(f"--encoder-dtype must be fp32 or fp16, got {self.encoder_dtype!r}")
        if self.lm_head not in ("fp16", "int8"):
            raise OptionsError(f"--lm-head must be fp16 or int8, got {self.lm_head!r}")
        if self.threads is not None and self.threads < 1:
            raise OptionsError(f"--threads must be ≥ 1, got {self.threads}")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False, dynamic_ncols=True)


def write_shards(out: Path, items, n_items: int, max_shard_bytes: int, desc: str, progress: bool) -> int:
    """Stream (key, tensor) pairs into standard safetensors shards (+ index when several); returns bytes."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total = 0
    names: list[str] = []
    weight_map: dict[str, str] = {}

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(names) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            names.append(name)
            weight_map.update(dict.fromkeys(shard, name))
            shard, shard_bytes = {}, 0

    with _progress(n_items, desc, progress) as bar:
        for key, t in items:
            t = t.contiguous()
            size = t.numel() * t.element_size()
            if shard and shard_bytes + size > max_shard_bytes:
                flush()
            shard[key] = t
            shard_bytes += size
            total += size
            bar.update(1)
    flush()
    if len(names) == 1:  # standard names: one file is model.safetensors; several get an index
        (out / names[0]).rename(out / "model.safetensors")
    else:
        final = {}
        for i, name in enumerate(names):
            final[name] = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
            (out / name).rename(out / final[name])
        index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def _fp_decoder_items(src: SourceCheckpoint, dtype: torch.dtype):
    for key, tensor in src.iter_tensors("decoder"):
        t = tensor.to(dtype)
        if not torch.isfinite(t).all():
            raise ExportError(
                f"decoder tensor {key} is not finite in {str(dtype).replace('torch.', '')} (values overflow); export with --bits 32"
            )
        yield key, t


def _decoder_config(text_config: dict, dtype: str, quantization: dict | None) -> dict:
    cfg = dict(text_config)
    cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", dtype=dtype)
    if quantization:
        cfg["quantization_config"] = quantization
    return cfg


def _decoder_keys(src: SourceCheckpoint):
    from safetensors import safe_open

    from .checkpoint import map_key

    for f in src.weight_files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for key in sf.keys():  # noqa: SIM118 -- safe_open has keys() but is not iterable
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
        except Exception as e:
            raise CheckpointError(
                f"{src.root}: no tokenizer.json and transformers could not load the tokenizer: {e}"
            ) from e
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
        raise OptionsError(
            f"output {out} is a non-empty directory that is not an artifacts directory; refusing to replace it"
        )
    src = SourceCheckpoint.open(src_dir)
    config = src.resolved_config()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    state_dir = out.parent / f".{out.name}.gptq-state"  # survives an interrupted 4-bit export, for --resume

    def fill(tmp: Path) -> dict:
        manifest = _export_into(src, config, tmp, opts, state_dir)
        manifest["export_seconds"] = round(time.perf_counter() - t_start, 2)
        _write_manifest(tmp, manifest)
        return manifest

    manifest = publish_dir(out, fill)
    shutil.rmtree(state_dir, ignore_errors=True)  # a finished export no longer needs the GPTQ resume state
    if opts.hf_checkpoint is not None:  # after the artifacts are complete: it reads them
        write_hf_checkpoint(src, out, opts.hf_checkpoint, opts.force, opts.progress)
    return manifest


def publish_dir(dest: Path, fill):
    """Build a directory with `fill(tmp)` in a hidden sibling, then swap it in for `dest` atomically.

    An interruption leaves no half-written `dest`: the partial sibling is removed, and a previous `dest`
    moved aside for the swap is put back. Returns what `fill` returned.
    """
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        result = fill(tmp)
        _fsync_tree(tmp)
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not dest.exists():
            old.rename(dest)  # interrupted between the two renames: put the previous output back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return result


def _fsync_tree(root: Path) -> None:
    """Flush every written file (and the directory entries) before the rename makes them visible."""
    for p in [*root.rglob("*"), root]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _export_into(src: SourceCheckpoint, config: dict, tmp: Path, opts: ExportOptions, state_dir: Path) -> dict:
    from safetensors.torch import save_file
    from transformers import WhisperFeatureExtractor

    roles: dict[str, str] = {}
    # Front end: preprocessor values and the mel filter bank (stored, never re-derived at run time).
    pre = src.preprocessor_config()
    fe = WhisperFeatureExtractor(
        **{k: v for k, v in pre.items() if k not in ("feature_extractor_type", "processor_class")}
    )
    if fe.feature_size != config["audio"]["num_mel_bins"]:
        raise CheckpointError(
            f"preprocessor feature_size {fe.feature_size} != encoder num_mel_bins {config['audio']['num_mel_bins']}"
        )
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
    steps = ["encoder fp32 ONNX", "verify vs transformers"] + (
        ["encoder fp16 ONNX"] if opts.encoder_dtype == "fp16" else []
    )
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
        from .synthetic_audio import speech_like_signal

        signal = speech_like_signal(opts.verify_seconds, mel_cfg.sampling_rate, loud_end=True)
        front = MelFrontEnd(mel_cfg, torch.from_numpy(fe.mel_filters).float())
        reference = reference_embeddings(enc_state, config["audio"], config["text"]["hidden_size"], fe, signal)
        feats = fe(
            signal,
            sampling_rate=mel_cfg.sampling_rate,
            return_attention_mask=True,
            padding="max_length",
            return_tensors="pt",
        )
        mel, n_valid = front.log_mel(signal)
        mel_err = float((mel[:, :n_valid] - feats["input_features"][0, :, :n_valid]).abs().max())
        bar.update(1)
        fp16_path = None
        if opts.encoder_dtype == "fp16":
            export_encoder_onnx(module, tmp / "encoder.fp16.onnx", torch.float16)
            onnx_files["fp16"] = "encoder.fp16.onnx"
            fp16_path = tmp / "encoder.fp16.onnx"
            bar.update(1)
        verification = verify_encoder(
            tmp / "encoder.onnx", reference, front, signal, fp16_path, tolerances=EncoderTolerances.for_config(enc_cfg)
        )
    verification["mel_max_abs_err_vs_feature_extractor"] = mel_err
    # The torch backend's master copy: the verified fp32 weights (cast to fp16 at load on a GPU if asked).
    save_file({k: v.float().contiguous() for k, v in enc_state.items()}, str(tmp / "encoder.safetensors"))
    del enc_state, module

    # Decoder → standard Qwen2ForCausalLM safetensors folder (fp, or GPTQ W4 calibrated on audio + text).
    src_quant = src.raw_config.get("quantization_config")
    if src_quant and opts.bits != 4:
        raise OptionsError(
            f"{src.root} is already a GPTQ checkpoint: export it with --bits 4 (its tensors are copied as they are)"
        )
    if src_quant:
        quant_info = _copy_w4_decoder(src, config, tmp, opts, src_quant)
    elif opts.bits == 4:
        quant_info = _write_w4_decoder(src, config, tmp, opts, front, state_dir, roles)
    else:
        dtype = DECODER_DTYPES[opts.bits]
        n = sum(1 for _ in _decoder_keys(src))
        write_shards(
            tmp / "decoder", _fp_decoder_items(src, dtype), n, opts.max_shard_bytes, "decoder tensors", opts.progress
        )
        (tmp / "decoder" / "config.json").write_text(
            json.dumps(
                _decoder_config(config["text"], str(dtype).replace("torch.", ""), None), indent=2, sort_keys=True
            )
        )
        quant_info = None
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
        "source": {
            "path": str(src.root),
            "name_or_path": src.raw_config.get("_name_or_path"),
            "config": src.raw_config,
        },
        "config": config,
        "preprocessor": fe.to_dict() | {"n_mels": mel_cfg.n_mels},
        "generation_config": gen_cfg,
        "decoder": {
            "bits": opts.bits,
            "format": "gptq" if opts.bits == 4 else "safetensors",
            "dtype": "float16" if opts.bits == 4 else str(DECODER_DTYPES[opts.bits]).replace("torch.", ""),
            **({"quantization": quant_info} if quant_info else {}),
            **({"lm_head_int8": "lm_head.int8.safetensors"} if opts.bits == 4 and opts.lm_head == "int8" else {}),
        },
        "encoder": {
            "onnx": onnx_files,
            "default": opts.encoder_dtype,
            "weights": "encoder.safetensors",
            "weights_dtype": "fp32",
            "verification": verification,
        },
        "files_role": roles,
        "export_options": json.loads(json.dumps(asdict(opts), default=str)),
        "tools": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "qwen_audio_edge": _own_version(),
        },
    }


def _source_fingerprint(src: SourceCheckpoint) -> dict:
    return {"config": src.raw_config, "files": {f.name: f.stat().st_size for f in src.weight_files}}


def _write_w4_decoder(
    src: SourceCheckpoint,
    config: dict,
    tmp: Path,
    opts: ExportOptions,
    front: MelFrontEnd,
    state_dir: Path,
    roles: dict,
) -> dict:
    """Calibrate (audio + text, through the exported encoder), GPTQ layer by layer, write decoder/ (+ int8 head)."""
    from tokenizers import Tokenizer

    from ..runtime.decoder import ModelArgs
    from ..runtime.encoder import OnnxEncoder
    from ..runtime.prompt import PromptFormat
    from .calibrate import build_calibration
    from .quantize import _read, _tensor_index, quantize_decoder

    args = ModelArgs.from_config(config["text"])
    q_out, kv_out = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    for name, k, n in (
        ("q_proj", args.hidden_size, q_out),
        ("k_proj", args.hidden_size, kv_out),
        ("o_proj", q_out, args.hidden_size),
        ("gate_proj", args.hidden_size, args.intermediate_size),
        ("down_proj", args.intermediate_size, args.hidden_size),
    ):
        opts.gptq.check_layer(name, k, n)  # before any calibration work or resume state
    template = (tmp / "chat_template.jinja").read_text() if "chat_template" in roles else None
    prompt = PromptFormat(Tokenizer.from_file(str(tmp / "tokenizer.json")), template, config["audio_token_id"])
    settings = {
        "gptq": asdict(opts.gptq),
        "calibration": json.loads(json.dumps(asdict(opts.calibration), default=str)),
        "source": _source_fingerprint(src),
        "threads": torch.get_num_threads(),
        "device": opts.quant_device,
        "torch": torch.__version__,
    }
    settings_path = state_dir / "settings.json"
    if state_dir.exists() and not opts.resume:
        shutil.rmtree(state_dir)
    if state_dir.exists():  # checked before the (slow) calibration pass
        saved = json.loads(settings_path.read_text()) if settings_path.is_file() else None
        if saved != settings:
            raise OptionsError(
                f"--resume: the saved GPTQ state in {state_dir} was made with other settings "
                "(options, calibration, source, threads or device); rerun without --resume"
            )
    encoder = OnnxEncoder(tmp / "encoder.onnx", threads=opts.threads)
    samples, calib_summary = build_calibration(opts.calibration, prompt, front, encoder)
    if not state_dir.exists():
        state_dir.mkdir(parents=True)
        tmp_settings = settings_path.with_name("settings.json.tmp")
        tmp_settings.write_text(json.dumps(settings, indent=2, sort_keys=True))
        os.replace(tmp_settings, settings_path)
    result = quantize_decoder(
        src,
        args,
        samples,
        opts.gptq,
        state_dir,
        config["audio_token_id"],
        device=opts.quant_device,
        progress=opts.progress,
    )
    metrics = result["layers"]
    index = _tensor_index(src)

    def items():
        yield "model.embed_tokens.weight", _read(index, "model.embed_tokens.weight").to(torch.float16)
        for i in range(args.num_hidden_layers):
            from safetensors import safe_open

            with safe_open(str(state_dir / f"layer-{i:05d}.safetensors"), framework="pt", device="cpu") as sf:
                for key in sf.keys():  # noqa: SIM118 -- safe_open has keys() but is not iterable
                    yield key, sf.get_tensor(key)
        yield "model.norm.weight", _read(index, "model.norm.weight").to(torch.float16)
        if "lm_head.weight" in index:
            yield "lm_head.weight", _read(index, "lm_head.weight").to(torch.float16)

    n_items = 2 + int("lm_head.weight" in index) + sum(1 for _ in _layer_keys(state_dir, args.num_hidden_layers))
    write_shards(tmp / "decoder", items(), n_items, opts.max_shard_bytes, "decoder W4 tensors", opts.progress)
    qc = opts.gptq.quantization_config()
    (tmp / "decoder" / "config.json").write_text(
        json.dumps(_decoder_config(config["text"], "float16", qc), indent=2, sort_keys=True)
    )
    if opts.lm_head == "int8":
        _write_int8_head(src, tmp)
    layer_errs = {name: max(v["rel_err"] for v in m.values()) for name, m in metrics.items()}
    return {
        "config": qc,
        "calibration": calib_summary,
        "layer_metrics": metrics,
        "eval_vs_fp": result["eval"],
        "worst_layer_rel_err": max(layer_errs.values()),
        "mean_rel_err": sum(v["rel_err"] for m in metrics.values() for v in m.values())
        / sum(len(m) for m in metrics.values()),
        "threads": torch.get_num_threads(),
    }


def _write_int8_head(src: SourceCheckpoint, tmp: Path) -> None:
    """The weight-only int8 lm_head side file (per output row), from the source's head (or tied embedding)."""
    from safetensors.torch import save_file

    from ..runtime.quant_linear import quantize_int8_rows
    from .quantize import _read, _tensor_index

    index = _tensor_index(src)
    q, scales = quantize_int8_rows(
        _read(index, "lm_head.weight" if "lm_head.weight" in index else "model.embed_tokens.weight")
    )
    save_file({"weight": q, "scales": scales}, str(tmp / "lm_head.int8.safetensors"))


def _copy_w4_decoder(src: SourceCheckpoint, config: dict, tmp: Path, opts: ExportOptions, qc: dict) -> dict:
    """A GPTQ Qwen2-Audio checkpoint as source (e.g. one written by --hf-checkpoint): copy its W4 tensors."""
    if qc.get("quant_method") != "gptq" or int(qc.get("bits", 0)) != 4 or qc.get("checkpoint_format", "gptq") != "gptq":
        raise CheckpointError(f"{src.root}: quantization_config {qc} is not 4-bit GPTQ (checkpoint_format gptq)")
    n = sum(1 for _ in _decoder_keys(src))
    items = (
        (k, t if t.dtype in (torch.int32, torch.int8) else t.to(torch.float16)) for k, t in src.iter_tensors("decoder")
    )
    write_shards(tmp / "decoder", items, n, opts.max_shard_bytes, "decoder W4 tensors", opts.progress)
    (tmp / "decoder" / "config.json").write_text(
        json.dumps(_decoder_config(config["text"], "float16", qc), indent=2, sort_keys=True)
    )
    try:
        from ..runtime.decoder import load_decoder

        load_decoder(tmp / "decoder", torch.float32, "meta")  # shape/key check against the config, no data
    except (ArtifactsError, RuntimeError) as e:
        raise CheckpointError(f"{src.root}: its GPTQ tensors do not match its config: {e}") from e
    if opts.lm_head == "int8":
        _write_int8_head(src, tmp)
    return {"config": qc, "calibration": {"source": "copied from a GPTQ source checkpoint"}}


def write_hf_checkpoint(src: SourceCheckpoint, artifacts: Path, dest: Path, force: bool, progress: bool) -> None:
    """The full Qwen2-Audio GPTQ checkpoint in the original key layout (what vLLM's Qwen2-Audio loader reads).

    Audio tower + projector fp16, `language_model.model.*` W4 + fp16, `language_model.lm_head.weight` fp16,
    `quantization_config` at the top of config.json, and the processor/tokenizer files. Written atomically.
    """
    from safetensors import safe_open

    dest = dest.resolve()
    if dest.exists() and not force:
        raise OptionsError(f"--hf-checkpoint {dest} already exists; pass --force to replace it")
    if dest.exists() and any(dest.iterdir()) and not (dest / "config.json").is_file():
        raise OptionsError(
            f"--hf-checkpoint {dest} is a non-empty directory that is not a checkpoint; refusing to replace it"
        )
    dec = artifacts / "decoder"
    qc = json.loads((dec / "config.json").read_text())["quantization_config"]
    files = sorted(dec.glob("*.safetensors"))

    def items():
        for key, t in src.iter_tensors("encoder"):
            yield key, t.to(torch.float16)
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for key in sf.keys():  # noqa: SIM118 -- safe_open has keys() but is not iterable
                    new = "language_model.lm_head.weight" if key == "lm_head.weight" else "language_model." + key
                    yield new, sf.get_tensor(key)

    n = sum(1 for _ in src.iter_tensors("encoder"))
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            n += len(sf.keys())

    def fill(tmp: Path) -> None:
        write_shards(tmp, items(), n, 2 << 30, "hf checkpoint tensors", progress)
        cfg = dict(src.raw_config)
        cfg["quantization_config"] = qc
        cfg["torch_dtype"] = cfg["dtype"] = "float16"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        for name in (
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.json",
            "merges.txt",
            "special_tokens_map.json",
            "added_tokens.json",
            "preprocessor_config.json",
            "processor_config.json",
            "chat_template.json",
            "chat_template.jinja",
        ):
            if (src.root / name).is_file():
                shutil.copyfile(src.root / name, tmp / name)

    dest.parent.mkdir(parents=True, exist_ok=True)
    publish_dir(dest, fill)


def _layer_keys(state_dir: Path, n_layers: int):
    from safetensors import safe_open

    for i in range(n_layers):
        with safe_open(str(state_dir / f"layer-{i:05d}.safetensors"), framework="pt", device="cpu") as sf:
            yield from sf.keys()


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
