"""Task-level quality: LibriSpeech WER (`qwen-audio-edge eval ARTIFACTS --librispeech DIR`).

Reads a LibriSpeech-format directory (`SPEAKER/CHAPTER/*.flac` + `SPEAKER-CHAPTER.trans.txt`), asks the
model for a transcription with greedy decoding, normalizes hypothesis and reference with Whisper's
English normalizer (from transformers; eval lives outside runtime/, so it may import it) and reports
WER with jiwer. Per-utterance results go to a JSONL file.

Published figures to compare with (Qwen2-Audio README, Qwen2-Audio-7B-Instruct): LibriSpeech
test-clean / test-other WER 1.6 / 3.6 in the original framework, 1.7 / 4.0 for the HF-converted
checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..runtime.errors import OptionsError

DEFAULT_INSTRUCTION = "Recognize the speech and give me the transcription."
PUBLISHED = {"test-clean": {"original": 1.6, "hf": 1.7}, "test-other": {"original": 3.6, "hf": 4.0}}


@dataclass(frozen=True)
class Utterance:
    id: str
    audio: Path
    reference: str


def read_librispeech(root: str | Path, limit: int | None = None) -> list[Utterance]:
    """All utterances with both a flac file and a transcript line, sorted by id."""
    root = Path(root)
    if not root.is_dir():
        raise OptionsError(f"LibriSpeech directory not found: {root}")
    refs: dict[str, str] = {}
    for trans in sorted(root.rglob("*.trans.txt")):
        for line in trans.read_text().splitlines():
            if line.strip():
                uid, _, text = line.strip().partition(" ")
                refs[uid] = text
    utts = [Utterance(f.stem, f, refs[f.stem]) for f in sorted(root.rglob("*.flac")) if f.stem in refs]
    if not utts:
        raise OptionsError(f"{root} holds no LibriSpeech utterances (*/*/*.flac with matching *.trans.txt lines)")
    return utts[:limit] if limit else utts


def read_transcripts(source: str | Path, audio_files: list) -> list[str]:
    """Reference transcripts of `audio_files`, matched by file name without extension (NAME for NAME.flac).

    source: a text file of `NAME TEXT` lines (the LibriSpeech *.trans.txt format), or a directory holding
    NAME.txt (the whole file is the transcript) or *.trans.txt files, searched recursively. Every audio file
    needs one."""
    source = Path(source)
    refs: dict[str, str] = {}
    if source.is_file():
        files = [source]
    elif source.is_dir():
        files = sorted(source.rglob("*.trans.txt"))
        for name in {Path(f).stem for f in audio_files}:
            single = source / f"{name}.txt"
            if single.is_file():
                refs[name] = " ".join(single.read_text().split())
    else:
        raise OptionsError(
            f"transcripts not found: {source} (a file of `NAME TEXT` lines, or a directory of NAME.txt files)"
        )
    for f in files:
        for line in f.read_text().splitlines():
            uid, _, text = line.strip().partition(" ")
            if uid:
                refs.setdefault(uid, text.strip())
    missing = [str(f) for f in audio_files if Path(f).stem not in refs]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise OptionsError(
            f"{source} has no transcript for {shown}: give a `NAME TEXT` line (or NAME.txt) per audio file NAME.*"
        )
    return [refs[Path(f).stem] for f in audio_files]


def normalizer():
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer({})  # the spelling map ships with Whisper checkpoints; none is needed offline


def wer_stats(references: list[str], hypotheses: list[str]) -> dict:
    """Corpus WER (jiwer) of normalized texts; pairs whose reference is empty are left out, as in `evaluate`.

    Returns wer_percent (NaN with nothing to score), errors (substitutions + deletions + insertions), words
    (reference words) and utterances (pairs scored)."""
    import jiwer

    pairs = [(r, h) for r, h in zip(references, hypotheses, strict=True) if r]
    if not pairs:
        return {"wer_percent": float("nan"), "errors": 0, "words": 0, "utterances": 0}
    out = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
    return {
        "wer_percent": 100 * out.wer,
        "errors": out.substitutions + out.deletions + out.insertions,
        "words": out.hits + out.substitutions + out.deletions,
        "utterances": len(pairs),
    }


def evaluate(
    pipeline,
    utterances: list[Utterance],
    instruction: str,
    out_jsonl: Path | None,
    max_new_tokens: int = 256,
    progress: bool = True,
) -> dict:
    import jiwer
    from tqdm import tqdm

    from ..runtime.generate import SamplingOptions

    norm = normalizer()
    hyps, refs = [], []
    with open(out_jsonl, "w") if out_jsonl else contextlib.nullcontext() as sink:
        for u in tqdm(utterances, desc="eval", disable=not progress, file=sys.stderr, dynamic_ncols=True):
            r = pipeline.run(
                str(u.audio),
                instruction,
                sampling=SamplingOptions(max_new_tokens=max_new_tokens, greedy=True, repetition_penalty=1.0),
            )
            hyp, ref = norm(r.text), norm(u.reference)
            hyps.append(hyp)
            refs.append(ref)
            if sink:
                sink.write(
                    json.dumps(
                        {
                            "id": u.id,
                            "reference": u.reference,
                            "hypothesis": r.text,
                            "wer": jiwer.wer(ref, hyp) if ref else None,
                        }
                    )
                    + "\n"
                )
    stats = wer_stats(refs, hyps)
    return {
        "utterances": len(utterances),
        "wer_percent": stats["wer_percent"],
        "errors": stats["errors"],
        "words": stats["words"],
        "instruction": instruction,
        "published_wer_percent": PUBLISHED,
    }
