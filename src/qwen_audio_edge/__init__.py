"""qwen-audio-edge: an edge-optimized inference runtime for Qwen2-Audio.

Subpackages: `runtime` (lean inference, no transformers import), `export` (checkpoint → artifacts),
`kernels` (matmul kernels). The public entry point is `Pipeline.from_artifacts(dir)`, imported lazily
so that `import qwen_audio_edge` stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Pipeline", "RuntimeOptions", "SamplingOptions", "__version__"]


def __getattr__(name: str):
    if name in ("Pipeline", "RuntimeOptions"):
        from .runtime import pipeline

        return getattr(pipeline, name)
    if name == "SamplingOptions":
        from .runtime.generate import SamplingOptions

        return SamplingOptions
    raise AttributeError(name)
