"""One thread budget for torch and ONNX Runtime (runtime/threads.py): the default, and that it is applied."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwen_audio_edge.runtime import threads as th


def test_default_counts_only_free_cores():
    assert th.default_threads(2, 0.1) == 2  # an idle 2-core machine
    assert th.default_threads(2, 1.0) == 1  # one core kept busy by other work
    assert th.default_threads(8, 2.49) == 6
    assert th.default_threads(8, 2.5) == 5  # rounded half up: over-subscribing costs more than an idle core
    assert th.default_threads(2, 6.4) == 1  # never below one


def test_budget_takes_an_explicit_count_as_is(monkeypatch):
    monkeypatch.setattr(th, "usable_cores", lambda: 4)
    monkeypatch.setattr(th, "busy_cores", lambda: 3.0)
    assert th.thread_budget(3) == th.ThreadBudget(3, "option", 4, 3.0)
    auto = th.thread_budget(None)
    assert (auto.threads, auto.source) == (1, "auto")
    assert auto.to_json() == {"threads": 1, "source": "auto", "cores": 4, "busy": 3.0}


def test_cgroup_quota_caps_the_usable_cores(tmp_path: Path, monkeypatch):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert th.cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert th.cgroup_cpu_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert th.cgroup_cpu_quota(v1) == 2.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert th.cgroup_cpu_quota(v1) is None
    assert th.cgroup_cpu_quota(tmp_path / "absent") is None
    monkeypatch.setattr(th, "cgroup_cpu_quota", lambda: 1.5)
    assert th.usable_cores() == 1


def test_busy_cores_reads_the_cpus_of_this_process(tmp_path: Path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal: cpu1 is outside the set and must not count
    stat.write_text("cpu  9 9 9 9 9 0 0 0\ncpu0 10 0 5 80 5 0 0 0\ncpu1 50 0 0 50 0 0 0 0\nintr 1 2\n")
    assert th.cpu_ticks({0}, stat) == (15, 100)
    assert th.cpu_ticks({0, 1}, stat) == (65, 200)
    assert th.cpu_ticks({0}, tmp_path / "absent") is None


def test_busy_cores_sees_a_busy_loop_on_one_core():
    """A process spinning on one of our CPUs is one busy core (sampled; the load average would lag)."""
    import os
    import subprocess
    import sys

    cpus = sorted(os.sched_getaffinity(0))
    code = f"import os\nos.sched_setaffinity(0, {{{cpus[-1]}}})\nwhile True:\n    pass\n"
    hog = subprocess.Popen([sys.executable, "-c", code])
    try:
        import time

        time.sleep(0.5)
        busy = max(th.busy_cores(0.2) for _ in range(2))  # other tests' processes may add to it, never take away
        assert busy >= 0.8, busy
    finally:
        hog.kill()
        hog.wait()


def test_ort_session_options_do_not_spin():
    opts = th.ort_session_options(3)
    assert opts.intra_op_num_threads == 3 and opts.inter_op_num_threads == 1
    import onnxruntime as ort

    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        assert opts.get_session_config_entry(key) == "0"


def test_torch_threads_follow_the_budget():
    before = torch.get_num_threads()
    try:
        th.apply_torch_threads(th.ThreadBudget(1, "option", 2, 0.0))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, None])
def test_pipeline_gives_torch_and_the_onnx_encoder_one_budget(mha, monkeypatch, threads):
    """The pipeline's budget reaches torch and the ORT session (whose options are captured at creation)."""
    import onnxruntime as ort

    from qwen_audio_edge.runtime.pipeline import Pipeline

    seen = []
    real = ort.InferenceSession

    def spy(path, sess_options=None, providers=None):
        seen.append(sess_options)
        return real(path, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    monkeypatch.setattr(th, "busy_cores", lambda: 0.0)
    before = torch.get_num_threads()
    try:
        p = Pipeline.from_artifacts(mha.artifacts, threads=threads)
        want = threads or th.usable_cores()
        assert p.threads.threads == want and p.threads.source == ("option" if threads else "auto")
        assert torch.get_num_threads() == want
        opts = seen[-1]
        assert opts.intra_op_num_threads == want
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert p.active_paths()["threads"]["threads"] == want
    finally:
        torch.set_num_threads(before)
