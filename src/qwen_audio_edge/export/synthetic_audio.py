"""Synthetic speech-like audio for the places that need a signal without a dataset.

Why it is production code: export verifies the ONNX encoder against transformers on a test signal, and
calibration's built-in set (used when no `--calibration DIR` is given) is made of such signals. The tests
and `demo` use the same generator, so every figure they report is on a signal a reader can regenerate.
"""

from __future__ import annotations

import numpy as np


def speech_like_signal(
    seconds: float, sample_rate: int = 16000, *, seed: int = 0, loud_end: bool = False
) -> np.ndarray:
    """A speech-like test signal: gliding harmonics with a syllable envelope plus a little noise.

    `loud_end=True` ends the signal at its loudest (a click + burst in the last 20 ms), the case where
    the Whisper clamp's global max sits in the boundary frames.
    """
    rng = np.random.default_rng(seed)
    n = round(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 3.1 * t)) ** 2 / 4
    x = 0.3 * voice * envelope + 0.01 * rng.standard_normal(n)
    if loud_end:
        tail = min(n, int(0.02 * sample_rate))
        x[n - tail :] += 0.9 * np.sign(rng.standard_normal(tail))
    return np.clip(x, -1.0, 1.0).astype(np.float32)
