"""Shared test helpers: test signals and the transformers reference (processor + generate)."""

from __future__ import annotations

import numpy as np
import torch

from qwen_audio_edge.runtime.generate import SamplingOptions

# Greedy decoding with EOS ignored, so every run yields exactly max_new_tokens tokens and two paths can be
# compared token for token. GREEDY_KW is for tests that choose their own length:
# SamplingOptions(max_new_tokens=n, **GREEDY_KW).
GREEDY_KW = dict(greedy=True, repetition_penalty=1.0, ignore_eos=True)
GREEDY = SamplingOptions(max_new_tokens=12, **GREEDY_KW)
# The user prompt of the streaming / parity tests (the chat-template turn that follows the audio).
PROMPT = "What does the person say?"


def signal(seconds: float, *, loud_end: bool = False, seed: int = 0) -> np.ndarray:
    from qwen_audio_edge.export.synthetic_audio import speech_like_signal

    return speech_like_signal(seconds, loud_end=loud_end, seed=seed)


def espeak(text: str) -> np.ndarray:
    """Speech made by espeak-ng (Debian package; .ci/run installs it) at 16 kHz, trimmed to its voiced span
    (above −60 dBFS). Where espeak-ng is absent the calling test skips, with the reason — except in CI
    (CI=true, as .ci/run sets), where it fails: the VAD tests need real speech and must not vanish silently."""
    import io
    import shutil
    import subprocess

    import soundfile as sf
    import soxr

    require(
        shutil.which("espeak-ng") is not None,
        "espeak-ng (Debian package) is not installed: apt-get install espeak-ng (.ci/run installs it)",
    )
    wav = subprocess.run(["espeak-ng", "--stdout", text], capture_output=True, check=True).stdout
    x, sr = sf.read(io.BytesIO(wav), dtype="float32")
    x = soxr.resample(x, sr, 16000).astype(np.float32)
    voiced = np.flatnonzero(np.abs(x) > 1e-3)
    return x[voiced[0] : voiced[-1] + 1]


def reference_inputs(model, wave: np.ndarray | None, prompt: str | None):
    """What transformers' processor gives for one user turn (chat template, or the raw base form)."""
    proc = model.processor
    # Qwen2AudioProcessor invents a default template when the checkpoint has none; a base model
    # (Qwen2-Audio-7B) is prompted raw, so decide by the checkpoint, not by the processor.
    if model.has_template:
        content = [{"type": "audio", "audio_url": "a.wav"}] if wave is not None else []
        if prompt:
            content.append({"type": "text", "text": prompt})
        text = proc.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = ("<|audio_bos|><|AUDIO|><|audio_eos|>" if wave is not None else "") + (prompt or "")
    if wave is None:
        return proc.tokenizer(text, return_tensors="pt")
    return proc(text=text, audio=[wave], sampling_rate=16000, return_tensors="pt")


def reference_greedy(model, inputs, n: int, repetition_penalty: float = 1.0) -> list[int]:
    """transformers generate(): greedy, EOS ignored (no eos id), exactly n new tokens."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=0,
        eos_token_id=None,
        pad_token_id=0,
        repetition_penalty=repetition_penalty,
    )
    with torch.no_grad():
        out = model.reference.generate(**inputs, generation_config=cfg)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def require(ok: bool, reason: str) -> None:
    """Skip outside CI; in CI (CI=true, exported by .ci/run) a missing requirement is a failure, not a silent
    skip: a CI run that skips the tests it exists to run would still look green."""
    import os

    import pytest

    if ok:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(
            f"{reason} — CI={os.environ['CI']}: CI must run this test, not skip it "
            "(.ci/run installs the [dev] extra and espeak-ng)",
            pytrace=False,
        )
    pytest.skip(reason)
