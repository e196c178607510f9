"""Evaluation tools on top of the runtime: `compare` (two models teacher-forced on the same tokens) and
LibriSpeech WER (`librispeech`). Application layer: may import transformers (to run the reference)."""
