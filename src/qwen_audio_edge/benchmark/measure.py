"""The measurement loop: for each audio length, check that the engines agree, then time every stage.

Results are one flat list of `Sample` rows (engine, stage, audio length, answer length, unit, median, p90,
all samples): the JSON, the table and the plot are views of that list.
"""

from __future__ import annotations

import statistics
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .agreement import TIE_TOLERANCE, Agreement, check_agreement
from .hf_baseline import HfBaseline
from .llama_cpp_parse import common_prefix
from .ours import OurEngine
from .system import MemoryPeak


def p90(xs: list[float]) -> float:
    """The 90th percentile by linear interpolation (the median of one sample is that sample)."""
    s = sorted(xs)
    k = 0.9 * (len(s) - 1)
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass(frozen=True)
class Sample:
    engine: str
    stage: str
    unit: str  # ms | tok/s | x (real-time factor: wall time / audio duration)
    samples: tuple[float, ...]
    audio_s: float | None = None
    new_tokens: int | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def to_json(self) -> dict:
        return {
            "engine": self.engine,
            "stage": self.stage,
            "audio_s": self.audio_s,
            "new_tokens": self.new_tokens,
            "unit": self.unit,
            "median": round(self.median, 4),
            "p90": round(p90(list(self.samples)), 4),
            "samples": [round(x, 4) for x in self.samples],
        }


@dataclass
class Results:
    samples: list[Sample] = field(default_factory=list)
    agreements: list[dict] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)
    prompt_tokens: dict[float, int] = field(default_factory=dict)  # prompt length (ids) per audio length

    def add(self, engine: str, stage: str, unit: str, xs: list[float | None], audio_s=None, new_tokens=None) -> None:
        """Record the samples of one measurement; None samples (e.g. no decode step happened) are left out."""
        kept = [x for x in xs if x is not None]
        if kept:
            self.samples.append(Sample(engine, stage, unit, tuple(kept), audio_s, new_tokens))

    def median(self, engine: str, stage: str, audio_s=None, new_tokens=None) -> float | None:
        for s in self.samples:
            if (s.engine, s.stage, s.audio_s, s.new_tokens) == (engine, stage, audio_s, new_tokens):
                return s.median
        return None


def write_wav(path: Path, x: np.ndarray, rate: int = 16000) -> None:
    """16-bit PCM WAV with the standard library: the audio file a user would pass (decode is timed)."""
    pcm = (np.clip(x, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


class Measurement:
    """One length at a time: agreement first (the warm-up runs), then `repeats` timed runs per stage."""

    def __init__(
        self,
        ours: OurEngine,
        baselines: dict[str, HfBaseline],
        repeats: int,
        check_tokens: int,
        tick: Callable[[str], None],
        reference: OurEngine | None = None,
        gate: HfBaseline | None = None,
    ):
        self.ours, self.baselines, self.repeats, self.check_tokens = ours, baselines, repeats, check_tokens
        # the agreement gate (see _agree): our pipeline on its fp32 reference kernels vs transformers fp32
        self.reference, self.gate = reference, gate
        self.tick = tick
        self.results = Results()

    def length(self, wav: Path, audio_s: float, new_tokens: tuple[int, ...]) -> None:
        wave_ = self.ours.p.load_waveform(wav)
        ids, segments = self.ours.ids(wave_), self.ours.segments(wave_)
        self.results.prompt_tokens[audio_s] = len(ids)
        self._agree(wav, ids, segments, audio_s)
        self._stages(wav, wave_, ids, segments, audio_s)
        for n in new_tokens:
            self._answers(wav, ids, segments, audio_s, n)

    def _agree(self, wav: Path, ids: list[int], segments: list, audio_s: float) -> None:
        """Greedy outputs compared before timing (agreement.py). The gate: transformers fp32 against our
        pipeline on its fp32 reference kernels (the same code path with the kernels' reference twins: the
        same weights, inputs and arithmetic), identical up to an fp32 near-tie, else DisagreementError and
        nothing is timed. Every baseline is the same transformers model in another dtype, so this proves
        the weights and inputs of all of them. The timed fast path differs from the reference only by its
        kernels' tested tolerances (bf16 matmuls on CPU); how many leading tokens it shares with each
        baseline is recorded, not gated: on random weights reduced precision parts early."""
        self.tick(f"{audio_s:g} s: greedy outputs compared ({self.check_tokens} tokens)")
        fast = self.ours.turn(wav, self.check_tokens).tokens
        answers = {name: hf.generate(ids, segments, self.check_tokens) for name, hf in self.baselines.items()}
        if self.gate is not None and self.reference is not None:
            ref = self.reference.turn(wav, self.check_tokens).tokens
            got = answers.get("transformers-fp32") or self.gate.generate(ids, segments, self.check_tokens)
            verdict: Agreement = check_agreement(
                ref, got.tokens, got.logits, "transformers-fp32", TIE_TOLERANCE["fp32"]
            )
            self.results.agreements.append(
                {
                    "audio_s": audio_s,
                    **verdict.to_json(),
                    "gated_path": "ours, fp32 reference kernels",
                    "leading_tokens_equal": {"timed path": common_prefix(fast, got.tokens)},
                }
            )
        for name, got in answers.items():
            if name == "transformers-fp32" and self.gate is not None:
                continue
            lead = common_prefix(fast, got.tokens)
            self.results.agreements.append(
                {
                    "audio_s": audio_s,
                    "baseline": name,
                    "tokens_compared": self.check_tokens,
                    "identical": lead == self.check_tokens,
                    "near_tie_at": None,
                    "gated_path": None,
                    "leading_tokens_equal": {"timed path": lead},
                }
            )

    def _stages(self, wav: Path, wave_: np.ndarray, ids: list[int], segments: list, audio_s: float) -> None:
        self.tick(f"{audio_s:g} s: stages to the first token")
        r = self.results
        with MemoryPeak(self.ours.p.device) as mem:
            runs = [self.ours.turn(wav, 1) for _ in range(self.repeats)]
        self.results.memory.append(
            {"engine": "ours", "stage": "turn to first token", "audio_s": audio_s, **mem.to_json()}
        )
        for stage in ("audio_decode_ms", "mel_ms", "encoder_ms", "prefill_ms", "ttft_ms"):
            r.add("ours", stage[:-3], "ms", [getattr(t, stage) for t in runs], audio_s)
        for name in self.ours.encoders:
            r.add(
                "ours",
                f"encoder[{name}]",
                "ms",
                [self.ours.encoder_ms(name, wave_) for _ in range(self.repeats)],
                audio_s,
            )
        for name, hf in self.baselines.items():
            with MemoryPeak(hf.device) as mem:
                got = [hf.generate(ids, segments, 1) for _ in range(self.repeats)]
            r.memory.append({"engine": name, "stage": "turn to first token", "audio_s": audio_s, **mem.to_json()})
            r.add(name, "mel", "ms", [g.features_ms for g in got], audio_s)
            r.add(name, "encoder", "ms", [hf.encode_ms(segments) for _ in range(self.repeats)], audio_s)
            r.add(name, "ttft", "ms", [g.ttft_ms for g in got], audio_s)

    def _answers(self, wav: Path, ids: list[int], segments: list, audio_s: float, n: int) -> None:
        self.tick(f"{audio_s:g} s: answers of {n} tokens")
        r = self.results
        runs = [self.ours.turn(wav, n) for _ in range(self.repeats)]
        r.add("ours", "decode", "tok/s", [t.decode_tok_s for t in runs], audio_s, n)
        r.add("ours", "end_to_end", "ms", [t.total_ms for t in runs], audio_s, n)
        r.add("ours", "rtf", "x", [t.total_ms / 1000 / audio_s for t in runs], audio_s, n)
        for name, hf in self.baselines.items():
            got = [hf.generate(ids, segments, n) for _ in range(self.repeats)]
            tok_s = [
                (n - 1) / ((g.total_ms - g.ttft_ms) / 1000) if n > 1 and g.total_ms > g.ttft_ms else None for g in got
            ]
            r.add(name, "decode", "tok/s", tok_s, audio_s, n)
            r.add(name, "end_to_end", "ms", [g.total_ms for g in got], audio_s, n)
            r.add(name, "rtf", "x", [g.total_ms / 1000 / audio_s for g in got], audio_s, n)
