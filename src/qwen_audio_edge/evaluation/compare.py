"""Quality comparison of two models on the same teacher-forced sequences (`qwen-audio-edge compare A B`).

A is the reference, B the candidate; each is an artifacts directory (our runtime) or a Hugging Face
Qwen2-Audio checkpoint (run through transformers). For every audio file: the one-turn prompt, then a
continuation greedily decoded by A; both models score the same ids. Reported: per-decoder-layer
relative output error ‖h_B − h_A‖ / ‖h_A‖ (all positions), top-1 agreement and mean KL(A ‖ B) of the
next-token distributions over the continuation positions. This is also how a user with the real
weights verifies that our runtime matches transformers on them (compare HF_DIR ARTIFACTS).

Given reference transcripts (`--transcripts`, or `--librispeech DIR`), each side also transcribes every file
(greedy, no repetition penalty, stopping at the generation config's eos ids, with eval's instruction) and
the report adds each side's WER (Whisper English normalizer + jiwer, as `eval`) and the relative change
(WER_B − WER_A) / WER_A: e.g. `compare ARTIFACTS --chunked 2 --librispeech test-clean` is the chunked vs
exact study in one command.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..runtime.errors import OptionsError


@dataclass
class Scored:
    logits: torch.Tensor  # [T, V] fp32, positions 0…T-1
    layers: list[torch.Tensor]  # per decoder layer output [T, H] fp32


def _hook_layers(layers) -> tuple[list, list]:
    outs: list[torch.Tensor] = []

    def hook(_m, _inp, out):
        outs.append((out[0] if isinstance(out, tuple) else out)[0].detach().float().cpu())

    return outs, [layer.register_forward_hook(hook) for layer in layers]


def layer_error_and_kl(ref: Scored, cand: Scored, start: int) -> dict:
    """Per-layer relative error over all positions; top-1 agreement and mean KL(ref‖cand) from `start`."""
    errs = [float((b - a).norm() / a.norm().clamp(min=1e-12)) for a, b in zip(ref.layers, cand.layers, strict=True)]
    la = ref.logits[start:].float().log_softmax(-1)
    lb = cand.logits[start:].float().log_softmax(-1)
    n = min(la.shape[-1], lb.shape[-1])
    la, lb = la[:, :n], lb[:, :n]
    kl = F.kl_div(lb, la, log_target=True, reduction="none").sum(-1)
    agree = (la.argmax(-1) == lb.argmax(-1)).float()
    return {"layer_rel_err": errs, "kl": kl.tolist(), "agree": agree.tolist()}


class OurModel:
    """An artifacts directory run through our runtime (fp32 activations on CPU by default).

    chunk_seconds: encode the audio with the chunked stream mode's block-causal rule (what
    `stream --stream-mode chunked` computes; `lookahead_seconds` as its look-ahead, default 2) instead of exactly.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        pipeline=None,
        chunk_seconds: float | None = None,
        lookahead_seconds: float | None = None,
        **options,
    ):
        from ..runtime.chunked import DEFAULT_LOOKAHEAD_S
        from ..runtime.pipeline import Pipeline, RuntimeOptions

        if pipeline is None:
            if path is None:
                raise TypeError("OurModel needs an artifacts `path` or a loaded `pipeline`")
            pipeline = Pipeline.from_artifacts(path, RuntimeOptions(**options))
        self.p = pipeline
        self.chunk_seconds = chunk_seconds
        self.lookahead_seconds = DEFAULT_LOOKAHEAD_S if lookahead_seconds is None else lookahead_seconds
        self.name = str(path if path is not None else self.p.artifacts.root) + (
            f" (chunked stream mode, {chunk_seconds:g} s blocks, {self.lookahead_seconds:g} s look-ahead)"
            if chunk_seconds
            else ""
        )

    def prompt(self, audio, text: str) -> tuple[list[int], torch.Tensor | None]:
        return self.p.single_turn(
            audio if not isinstance(audio, Path) else str(audio),
            text,
            chunk_seconds=self.chunk_seconds,
            lookahead_seconds=self.lookahead_seconds,
        )

    def _embeds(self, ids: list[int], audio: torch.Tensor | None, n_prompt: int | None = None) -> torch.Tensor:
        """`ids` embedded, the audio in the prompt's slots (ids past `n_prompt` are generated text: an audio id there is a token)."""
        from ..runtime.prompt import embed_prompt

        spans = [(n_prompt, len(ids))] if n_prompt is not None else []
        return embed_prompt(self.p.decoder, ids, audio, self.p.prompt.audio_token_id, text_spans=spans)

    @torch.inference_mode()
    def score(self, ids: list[int], audio: torch.Tensor | None, n_prompt: int) -> Scored:
        d = self.p.decoder
        emb = self._embeds(ids, audio, n_prompt)
        outs, handles = _hook_layers(d.model.layers)
        try:
            logits = d(emb, 0, d.setup_cache(len(ids)), all_logits=True)[0].float().cpu()
        finally:
            for h in handles:
                h.remove()
        return Scored(logits, outs)

    @torch.inference_mode()
    def greedy(self, ids: list[int], audio: torch.Tensor | None, n: int) -> list[int]:
        """Exactly `n` greedy tokens (stop ids ignored: the continuation both models are scored on)."""
        from ..runtime.generate import greedy_decode

        return greedy_decode(self.p.decoder, self._embeds(ids, audio), ids, n)

    @torch.inference_mode()
    def transcribe(self, audio, instruction: str, max_new_tokens: int) -> str:
        """Greedy answer to `instruction` about `audio` (exactly or chunked encoded), stopping at the stop ids."""
        from ..runtime.generate import IncrementalDetokenizer, greedy_decode

        ids, embeds = self.prompt(audio, instruction)
        tokens = greedy_decode(self.p.decoder, self._embeds(ids, embeds), ids, max_new_tokens, self.p.stop_ids)
        detok = IncrementalDetokenizer(self.p.prompt.tokenizer)
        return "".join(detok.push(tok) for tok in tokens) + detok.flush()


class HFModel:
    """A Hugging Face Qwen2-Audio checkpoint run through transformers (the reference implementation)."""

    def __init__(self, path: Path):
        from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

        self.name = str(path)
        self.model = Qwen2AudioForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
        self.proc = AutoProcessor.from_pretrained(str(path))
        self.has_template = any((path / n).is_file() for n in ("chat_template.json", "chat_template.jinja")) or bool(
            getattr(self.proc.tokenizer, "chat_template", None)
        )
        self._features: Mapping[str, torch.Tensor] | None = None

    def _inputs(self) -> Mapping[str, torch.Tensor]:
        """The processor's outputs for the last `prompt` (score, greedy and transcribe run on that prompt)."""
        if self._features is None:
            raise RuntimeError("HFModel: call prompt() before score(), greedy() or transcribe()")
        return self._features

    def prompt(self, audio: Path, text: str):
        from ..runtime.audio import load_audio

        wave = load_audio(audio, self.proc.feature_extractor.sampling_rate)
        if self.has_template:
            content = [{"type": "audio", "audio_url": str(audio)}, {"type": "text", "text": text}]
            rendered = self.proc.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        else:
            rendered = "<|audio_bos|><|AUDIO|><|audio_eos|>" + text
        inputs = self.proc(
            text=rendered, audio=[wave], sampling_rate=self.proc.feature_extractor.sampling_rate, return_tensors="pt"
        )
        self._features = inputs
        return inputs["input_ids"][0].tolist(), None

    @torch.inference_mode()
    def score(self, ids: list[int], audio, n_prompt: int) -> Scored:
        f = self._inputs()
        input_ids = torch.tensor([ids])
        outs, handles = _hook_layers(self.model.model.language_model.layers)
        try:
            logits = (
                self.model(
                    input_ids=input_ids,
                    input_features=f["input_features"],
                    feature_attention_mask=f["feature_attention_mask"],
                    attention_mask=torch.ones_like(input_ids),
                )
                .logits[0]
                .float()
            )
        finally:
            for h in handles:
                h.remove()
        return Scored(logits, outs)

    def greedy(self, ids, audio, n: int) -> list[int]:
        from transformers import GenerationConfig

        f = self._inputs()
        cfg = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            out = self.model.generate(**f, generation_config=cfg)
        return out[0, len(ids) :].tolist()

    def transcribe(self, audio, instruction: str, max_new_tokens: int) -> str:
        """Greedy answer, no repetition penalty; eos ids from the checkpoint's generation config (as ours)."""
        from transformers import GenerationConfig

        ids, _ = self.prompt(audio, instruction)
        cfg = GenerationConfig(
            do_sample=False,
            max_new_tokens=max_new_tokens,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_new_tokens=0,
        )
        with torch.no_grad():
            out = self.model.generate(**self._inputs(), generation_config=cfg)
        vocab = len(self.proc.tokenizer)
        return self.proc.tokenizer.decode(
            [i for i in out[0, len(ids) :].tolist() if i < vocab], skip_special_tokens=True
        )


def open_model(path: str | Path, chunk_seconds: float | None = None, lookahead_seconds: float | None = None, **options):
    p = Path(path)
    if (p / "manifest.json").is_file():
        return OurModel(p, chunk_seconds=chunk_seconds, lookahead_seconds=lookahead_seconds, **options)
    if chunk_seconds is not None:
        raise OptionsError(
            f"{p}: --chunked applies to an artifacts directory (our runtime), not a Hugging Face checkpoint"
        )
    if (p / "config.json").is_file():
        return HFModel(p)
    raise OptionsError(
        f"{p} is neither an artifacts directory (manifest.json) nor a Hugging Face checkpoint (config.json)"
    )


def audio_cosine(a: torch.Tensor | None, b: torch.Tensor | None) -> list[float] | None:
    """Per-token cosine similarity of two models' audio embeddings (None when either has none to show)."""
    if a is None or b is None or a.shape != b.shape:
        return None
    return F.cosine_similarity(a.float(), b.float(), dim=-1).tolist()


def compare(
    a,
    b,
    audio_files: list,
    prompt: str,
    new_tokens: int = 32,
    *,
    transcripts: list[str] | None = None,
    instruction: str | None = None,
    max_new_tokens: int = 256,
    progress: bool = False,
) -> dict:
    """Run the comparison over `audio_files` (paths, or arrays of 16 kHz samples); returns the aggregated
    report (and per-file rows). With two runtime models the audio embeddings' cosine similarity is reported too.

    transcripts (one per file): each side also transcribes each file greedily with `instruction` (default:
    eval's) up to `max_new_tokens`, and the report gets `wer` (see `wer_report`), each row its transcript,
    both hypotheses and both per-utterance WERs."""
    from tqdm import tqdm

    from .librispeech import DEFAULT_INSTRUCTION

    if not audio_files:
        raise OptionsError("compare needs at least one --audio file")
    if new_tokens < 1:
        raise OptionsError(f"--new-tokens must be ≥ 1, got {new_tokens}")
    if transcripts is not None and len(transcripts) != len(audio_files):
        raise OptionsError(f"{len(transcripts)} transcripts for {len(audio_files)} audio files")
    if max_new_tokens < 1:
        raise OptionsError(f"--max-new-tokens must be ≥ 1, got {max_new_tokens}")
    instruction = instruction or DEFAULT_INSTRUCTION
    hyps: list[tuple[str, str]] = []
    rows = []
    all_kl: list[float] = []
    all_agree: list[float] = []
    layer_sums: list[float] = []
    all_cos: list[float] = []
    for i, f in enumerate(tqdm(audio_files, desc="compare", disable=not progress, file=sys.stderr, dynamic_ncols=True)):
        ids_a, audio_a = a.prompt(f, prompt)
        ids_b, audio_b = b.prompt(f, prompt)
        if ids_a != ids_b:
            raise OptionsError(
                f"{f}: the two models build different prompt ids ({len(ids_a)} vs {len(ids_b)} tokens): "
                "different tokenizers/templates cannot be compared token by token"
            )
        cont = a.greedy(ids_a, audio_a, new_tokens)
        seq = ids_a + cont
        ref, cand = a.score(seq, audio_a, len(ids_a)), b.score(seq, audio_b, len(ids_a))
        if len(ref.layers) != len(cand.layers):
            raise OptionsError(f"the models have {len(ref.layers)} and {len(cand.layers)} decoder layers")
        r = layer_error_and_kl(ref, cand, len(ids_a) - 1)
        r["kl"], r["agree"] = r["kl"][:-1], r["agree"][:-1]  # the last position predicts past the sequence
        row = {
            "audio": str(f) if isinstance(f, (str, Path)) else f"<{len(f)} samples>",
            "prompt_tokens": len(ids_a),
            "continuation": len(cont),
            "mean_kl": sum(r["kl"]) / len(r["kl"]),
            "top1_agreement": sum(r["agree"]) / len(r["agree"]),
            "layer_rel_err": r["layer_rel_err"],
        }
        cos = audio_cosine(audio_a, audio_b)
        if cos is not None:
            row.update(audio_cosine_mean=sum(cos) / len(cos), audio_cosine_min=min(cos))
            all_cos += cos
        if transcripts is not None:
            hyps.append((a.transcribe(f, instruction, max_new_tokens), b.transcribe(f, instruction, max_new_tokens)))
            row.update(transcript=transcripts[i], hypotheses={"reference": hyps[-1][0], "candidate": hyps[-1][1]})
        rows.append(row)
        all_kl += r["kl"]
        all_agree += r["agree"]
        layer_sums = (
            [x + y for x, y in zip(layer_sums, r["layer_rel_err"], strict=True)]
            if layer_sums
            else list(r["layer_rel_err"])
        )
    n = len(audio_files)
    report = {
        "reference": a.name,
        "candidate": b.name,
        "files": n,
        "new_tokens": new_tokens,
        "mean_kl": sum(all_kl) / len(all_kl),
        "top1_agreement": sum(all_agree) / len(all_agree),
        "layer_rel_err": [x / n for x in layer_sums],
        "rows": rows,
    }
    if all_cos:
        report.update(audio_cosine_mean=sum(all_cos) / len(all_cos), audio_cosine_min=min(all_cos))
    if transcripts is not None:
        report["wer"] = wer_report(transcripts, hyps, rows)
        report["wer"].update(instruction=instruction, max_new_tokens=max_new_tokens)
    return report


def wer_report(transcripts: list[str], hyps: list[tuple[str, str]], rows: list[dict]) -> dict:
    """WER of each side (normalized as `eval`), the relative change (WER_B − WER_A) / WER_A (None when WER_A
    is 0 or nothing was scored), and per-row WERs (None for an empty normalized transcript)."""
    import jiwer

    from .librispeech import normalizer, wer_stats

    norm = normalizer()
    refs = [norm(t) for t in transcripts]
    report: dict = {"normalizer": "whisper-english"}
    for k, side in enumerate(("reference", "candidate")):
        out = [norm(h[k]) for h in hyps]
        stats = wer_stats(refs, out)
        report.update(utterances=stats["utterances"], words=stats["words"])  # the same for both sides
        report[side] = {"wer_percent": stats["wer_percent"], "errors": stats["errors"]}
        for row, ref, hyp in zip(rows, refs, out, strict=True):
            row.setdefault("wer", {})[side] = jiwer.wer(ref, hyp) if ref else None
    a, b = report["reference"]["wer_percent"], report["candidate"]["wer_percent"]
    report["relative_change"] = (b - a) / a if a > 0 and math.isfinite(b) else None
    return report


def format_table(report: dict) -> str:
    lines = [
        f"reference: {report['reference']}",
        f"candidate: {report['candidate']}",
        f"{report['files']} file(s), {report['new_tokens']} teacher-forced tokens each",
        f"top-1 agreement {report['top1_agreement']:.4f}   mean KL {report['mean_kl']:.3e}",
    ]
    if "audio_cosine_mean" in report:
        lines.append(
            f"audio embeddings: cosine mean {report['audio_cosine_mean']:.4f}, min {report['audio_cosine_min']:.4f}"
        )
    lines += ["", "layer  rel. output error"]
    lines += [f"{i:5d}  {e:.3e}" for i, e in enumerate(report["layer_rel_err"])]
    if not all(math.isfinite(e) for e in report["layer_rel_err"]):
        lines.append("warning: non-finite layer errors")
    w = report.get("wer")
    if w:
        rel = w["relative_change"]
        lines += [
            "",
            (
                f"WER on {w['utterances']} utterance(s), {w['words']} words (instruction {w['instruction']!r}, "
                f"greedy, ≤ {w['max_new_tokens']} tokens; Whisper English normalizer):"
            ),
            f"  reference  {w['reference']['wer_percent']:7.2f} %  ({w['reference']['errors']} errors)",
            f"  candidate  {w['candidate']['wer_percent']:7.2f} %  ({w['candidate']['errors']} errors)",
            "  relative change  " + (f"{100 * rel:+.1f} %" if rel is not None else "n/a (reference WER is 0)"),
        ]
    return "\n".join(lines)
