"""User-facing error classes: one per kind of problem, each message says what was wrong and what to do.

The CLI prints `error: <message>` on one line and exits non-zero for any `QwenAudioEdgeError`; library
users catch the specific subclass. Nothing here imports torch, so the CLI can report errors cheaply.
"""

from __future__ import annotations


class QwenAudioEdgeError(Exception):
    """Base class of every error we raise on purpose (bad input, bad artifacts, limits)."""

    exit_code = 2


class AudioError(QwenAudioEdgeError):
    """The audio input is missing, unreadable, empty, non-finite, or too short to give an audio token."""


class ArtifactsError(QwenAudioEdgeError):
    """An artifacts directory is missing a file, fails its sha256 check or has an unknown format version."""


class CheckpointError(QwenAudioEdgeError):
    """A source Hugging Face checkpoint is missing files or has a layout/config we cannot export."""


class LimitError(QwenAudioEdgeError):
    """A request exceeds a configured limit (context length, memory) — raised before any work is done."""


class NumericalError(QwenAudioEdgeError):
    """The model produced NaN/Inf (typically fp16 overflow): retry with --dtype fp32 or bf16."""


class OptionsError(QwenAudioEdgeError):
    """An option value is invalid or options conflict (e.g. a sampling parameter out of range)."""


class ExportError(QwenAudioEdgeError):
    """Export failed or its self-verification against transformers did not meet the tolerance."""
