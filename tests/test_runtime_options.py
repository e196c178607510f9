"""RuntimeOptions: what the pipeline does to the process (torch's thread pool) and the one dtype default."""

from __future__ import annotations

import threading

import torch

from qwen_audio_edge.runtime.pipeline import Pipeline, RuntimeOptions


def test_threads_set_the_process_torch_pool_and_none_leaves_it(mha):
    """threads=N is process-wide and stays after the pipeline's work, as RuntimeOptions documents;
    threads=None does not touch it."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        Pipeline.from_artifacts(mha.artifacts, RuntimeOptions())
        assert torch.get_num_threads() == 1
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
