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


def normalizer():
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer({})  # the spelling map ships with Whisper checkpoints; none is needed offline


def evaluate(pipeline, utterances: list[Utterance], instruction: str, out_jsonl: Path | None,
             max_new_tokens: int = 256, progress: bool = True) -> dict:
    import jiwer
    from tqdm import tqdm

    from ..runtime.generate import SamplingOptions

    norm = normalizer()
    hyps, refs = [], []
    sink = open(out_jsonl, "w") if out_jsonl else None
    try:
        for u in tqdm(utterances, desc="eval", disable=not progress, file=sys.stderr, dynamic_ncols=True):
            r = pipeline.run(str(u.audio), instruction, sampling=SamplingOptions(max_new_tokens=max_new_tokens, greedy=True,
                                                                                  repetition_penalty=1.0))
            hyp, ref = norm(r.text), norm(u.reference)
            hyps.append(hyp)
            refs.append(ref)
            if sink:
                sink.write(json.dumps({"id": u.id, "reference": u.reference, "hypothesis": r.text,
                                       "wer": jiwer.wer(ref, hyp) if ref else None}) + "\n")
    finally:
        if sink:
            sink.close()
    pairs = [(r, h) for r, h in zip(refs, hyps) if r]
    wer = jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]) if pairs else float("nan")
    return {"utterances": len(utterances), "wer_percent": 100 * wer, "instruction": instruction,
            "published_wer_percent": PUBLISHED}
