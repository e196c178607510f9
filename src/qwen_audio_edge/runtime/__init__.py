"""Lean inference runtime: audio → log-mel → encoder (ONNX Runtime/torch) → Qwen2 decoder → text.

Imports torch, numpy, onnxruntime, tokenizers, jinja2, safetensors — never transformers, so that an
appliance starts fast. `Pipeline.from_artifacts(dir)` (runtime/pipeline.py) is the entry point.
"""
