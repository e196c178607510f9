"""Offline export: a local Hugging Face Qwen2-Audio checkpoint → an artifacts directory.

May import transformers (the `export` extra). Entry point: `package.export_checkpoint`.
"""
