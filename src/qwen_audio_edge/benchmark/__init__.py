"""`qwen-audio-edge bench`: our runtime stage by stage, side by side with transformers and llama.cpp.

The application layer over runtime/ (like evaluation/): it may import transformers (the baseline) and
export/ (to build random-weight checkpoints for `--shape`). Modules: options (flags), shapes (random
models), ours (our stages), hf_baseline (transformers on the same weights), agreement (greedy outputs
checked before timing), llama_cpp (the peer), roofline, memory, report (table, JSON schema, plot), main.
"""
