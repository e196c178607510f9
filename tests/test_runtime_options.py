"""RuntimeOptions: what the pipeline does to the process (torch's thread pool) and the one dtype default."""

from __future__ import annotations

import threading

import torch

from qwen_audio_edge.runtime.pipeline import Pipeline, RuntimeOptions


def test_threads_set_the_process_torch_pool_and_none_takes_the_free_cores(mha, monkeypatch):
    """threads=N is process-wide and stays after the pipeline's work, as RuntimeOptions documents;
    threads=None takes the free cores (here: no other work, so every usable core)."""
    from qwen_audio_edge.runtime import threads

    monkeypatch.setattr(threads, "busy_cores", lambda *a, **k: 0.0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        p = Pipeline.from_artifacts(mha.artifacts, RuntimeOptions())
        assert torch.get_num_threads() == p.threads.threads == threads.usable_cores()
        p = Pipeline.from_artifacts(mha.artifacts, RuntimeOptions(threads=2))
        assert torch.get_num_threads() == 2
        p.run(None, "Hi", sampling=p.default_sampling(max_new_tokens=2))
        seen = []
        worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        worker.start()
        worker.join()
        assert torch.get_num_threads() == 2 and seen == [2]  # after the run, and in every thread
    finally:
        torch.set_num_threads(before)


def test_cli_and_api_resolve_the_same_default_dtype(monkeypatch, tmp_path):
    """No --dtype / dtype=None: fp16 on CUDA, fp32 on CPU, from one rule (pipeline.default_dtype) for both
    the CLI and RuntimeOptions. CUDA is faked (the device check only asks torch.cuda), so no GPU is needed."""
    from qwen_audio_edge.cli import _runtime_options, build_parser
    from qwen_audio_edge.runtime.pipeline import default_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    parser = build_parser()
    for device, expected in (("cpu", "fp32"), ("cuda", "fp16"), ("cuda:1", "fp16")):
        cli = _runtime_options(parser.parse_args(["run", str(tmp_path), "--prompt", "hi", "--device", device]))
        assert default_dtype(device) == RuntimeOptions(device=device).dtype == cli.dtype == expected, device
        explicit = _runtime_options(
            parser.parse_args(["run", str(tmp_path), "--prompt", "hi", "--device", device, "--dtype", "bf16"])
        )
        assert explicit.dtype == RuntimeOptions(device=device, dtype="bf16").dtype == "bf16"
