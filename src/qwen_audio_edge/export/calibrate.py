"""Audio-aware calibration data for GPTQ: full prompts with real audio embeddings, not text alone.

Qwen2-Audio's decoder sees projector outputs at hundreds of positions per prompt, and those activations
are statistically unlike token embeddings; calibrating on text alone leaves them unseen. Each sample
is therefore a complete chat prompt — template + audio embeddings from the *exported* encoder +
instruction (+ the reference answer when one is known), tokenized exactly as the runtime does.

Sources:
- `--calibration DIR`: every audio file under DIR (wav/flac/ogg/mp3/m4a/opus, sorted, shuffled with
  `--seed`); instructions from `DIR/prompts.txt` (one per line) if present, else the built-in set; a
  transcript `NAME.txt` beside `NAME.wav` is used as the assistant's answer. Audio > 30 s is split as
  the runtime splits it.
- no directory: the built-in fallback, offline — speech-like synthetic signals (harmonic glides with
  syllable envelopes, 1.5–25 s, seeded) with the built-in instructions and answers.
Every fourth sample is text-only (instruction + answer without audio) so text activations stay covered.
`mode="text"` drops the audio from every sample: the text-only calibration that audio-aware
calibration is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..runtime.audio import MelFrontEnd, load_audio, num_audio_tokens, split_segments
from ..runtime.errors import OptionsError
from ..runtime.prompt import PromptFormat, user_message

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".opus")

INSTRUCTIONS = (
    "What does the person say?",
    "Transcribe the speech into text.",
    "Describe the sound in detail.",
    "What emotion does the speaker convey?",
    "Is the speaker male or female, and roughly how old?",
    "Summarize the audio in one sentence.",
    "Translate the speech into French.",
    "What can you hear in the background?",
)
ANSWERS = (
    "The speaker says that the meeting has been moved to Thursday afternoon.",
    "It sounds like a calm voice describing the weather, with some traffic noise behind it.",
    "The speaker seems happy and slightly excited.",
    "A glass falls and breaks on a hard floor, followed by silence.",
)


@dataclass(frozen=True)
class CalibrationOptions:
    directory: Path | None = None
    num_samples: int = 128
    seed: int = 0
    mode: str = "audio"  # audio | text
    max_tokens: int = 2048  # per sample, after audio expansion

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise OptionsError(f"--num-samples must be ≥ 1, got {self.num_samples}")
        if self.mode not in ("audio", "text"):
            raise OptionsError(f"calibration mode must be audio or text, got {self.mode!r}")
        if self.directory is not None and not Path(self.directory).is_dir():
            raise OptionsError(f"calibration directory not found: {self.directory}")


# One calibration prompt before encoding: (name, audio file or waveform, instruction, reference answer or None)
CalibrationItem = tuple[str, Path | np.ndarray, str, str | None]


@dataclass
class CalibrationSample:
    ids: list[int]
    audio: torch.Tensor | None  # [n_audio_tokens, hidden] in prompt order, or None
    source: str


def _directory_items(
    root: Path, opts: CalibrationOptions, rng: np.random.Generator
) -> tuple[list[CalibrationItem], dict]:
    """Items from the audio files under `root` (`opts.directory`), with their transcripts when present."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not files:
        raise OptionsError(f"calibration directory {root} holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
    prompts_file = root / "prompts.txt"
    instructions: tuple[str, ...] = INSTRUCTIONS
    if prompts_file.is_file():
        lines = [ln.strip() for ln in prompts_file.read_text().splitlines() if ln.strip()]
        if not lines:
            raise OptionsError(f"{prompts_file} is empty: give one instruction per line or remove it")
        instructions = tuple(lines)
    order = rng.permutation(len(files))
    items: list[CalibrationItem] = []
    for i in range(opts.num_samples):
        f = files[order[i % len(files)]]
        transcript = f.with_suffix(".txt")
        answer = transcript.read_text().strip() if transcript.is_file() else None
        items.append((str(f.relative_to(root)), f, instructions[int(rng.integers(len(instructions)))], answer))
    summary = {
        "source": "directory",
        "directory": str(root),
        "audio_files": len(files),
        "prompts_file": prompts_file.is_file(),
        "transcripts": sum(f.with_suffix(".txt").is_file() for f in files),
    }
    return items, summary


def _builtin_items(opts: CalibrationOptions, rng: np.random.Generator, sr: int) -> tuple[list[CalibrationItem], dict]:
    from .synthetic_audio import speech_like_signal

    items: list[CalibrationItem] = []
    for i in range(opts.num_samples):
        seconds = float(rng.uniform(1.5, 25.0))
        wave = speech_like_signal(seconds, sr, seed=int(rng.integers(1 << 30)), loud_end=bool(rng.integers(2)))
        answer = ANSWERS[int(rng.integers(len(ANSWERS)))] if rng.random() < 0.5 else None
        items.append((f"synthetic-{i}", wave, INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))], answer))
    return items, {"source": "builtin", "description": "speech-like synthetic signals 1.5-25 s + built-in instructions"}


def build_calibration(
    opts: CalibrationOptions, prompt: PromptFormat, front: MelFrontEnd, encoder
) -> tuple[list[CalibrationSample], dict]:
    """Calibration samples (ids + audio embeddings from `encoder`) and a summary for the manifest."""
    rng = np.random.default_rng(opts.seed)
    sr = front.config.sampling_rate
    if opts.directory is not None:
        items, summary = _directory_items(Path(opts.directory), opts, rng)
    else:
        items, summary = _builtin_items(opts, rng, sr)
    samples: list[CalibrationSample] = []
    n_tokens = n_audio = 0
    for i, (name, audio, instruction, answer) in enumerate(items):
        with_audio = opts.mode == "audio" and i % 4 != 3
        embeds = None
        counts: list[int] = []
        if with_audio:
            wave = load_audio(audio, sr) if isinstance(audio, Path) else audio
            segments = split_segments(wave, front.config, source=name)
            counts = [num_audio_tokens(front.valid_frames(len(s))) for s in segments]
            embeds = torch.cat([encoder(*front.log_mel(s)) for s in segments])
        messages = [user_message(len(counts), instruction)]
        if answer:
            messages.append({"role": "assistant", "content": answer})
        text = prompt.render(messages, add_generation_prompt=not answer)
        ids = prompt.expand_audio(prompt.encode(text), counts)
        if len(ids) > opts.max_tokens:
            raise OptionsError(
                f"calibration sample {name} has {len(ids)} tokens > {opts.max_tokens}; use shorter audio"
            )
        samples.append(CalibrationSample(ids=ids, audio=embeds, source=name))
        n_tokens += len(ids)
        n_audio += sum(counts)
    summary.update(
        mode=opts.mode,
        num_samples=len(samples),
        seed=opts.seed,
        tokens=n_tokens,
        audio_tokens=n_audio,
        text_only_samples=sum(s.audio is None for s in samples),
    )
    return samples, summary
