"""`qwen-audio-edge bench`: the whole command on the tiny shape, its JSON schema and plot, the agreement gate
that aborts on a real mismatch, the transformers baseline on our exact weights, and the option checks."""

from __future__ import annotations

import json

import pytest
import torch

from qwen_audio_edge import cli
from qwen_audio_edge.benchmark.agreement import TIE_TOLERANCE, DisagreementError, check_agreement, relative_margin
from qwen_audio_edge.benchmark.report import SCHEMA_ID, tables, validate

QUICK = ["--seconds", "2,5", "--new-tokens", "6", "--repeats", "2", "--check-tokens", "12"]


def _png_ok(path) -> tuple[int, int]:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(str(path))
    return img.shape[0], img.shape[1]


def test_bench_shape_tiny_end_to_end(tmp_path, capsys):
    """The command a user runs: builds the random tiny model, checks agreement with transformers fp32 and
    bf16, times every stage, writes JSON that follows the schema and a readable PNG, prints the tables."""
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = cli.main(
        ["bench", "--shape", "tiny", "--work", str(tmp_path / "work"), *QUICK, "--json", str(out), "--plot", str(png)]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    validate(result)
    assert result["schema"] == SCHEMA_ID and result["complete"] is True
    h, w = _png_ok(png)
    assert h > 300 and w > 600
    engines = {s["engine"] for s in result["stages"]}
    assert engines == {"ours", "transformers-fp32", "transformers-bf16"}
    stages = {(s["engine"], s["stage"], s["audio_s"], s["new_tokens"]) for s in result["stages"]}
    for secs in (2.0, 5.0):
        for stage in ("audio_decode", "mel", "encoder", "prefill", "ttft", "encoder[onnx-fp32]", "encoder[torch-fp32]"):
            assert ("ours", stage, secs, None) in stages, (stage, secs)
        for engine in engines:
            assert (engine, "ttft", secs, None) in stages
            assert (engine, "decode", secs, 6) in stages and (engine, "rtf", secs, 6) in stages
    for s in result["stages"]:
        assert len(s["samples"]) == 2 and min(s["samples"]) <= s["median"] <= s["p90"] <= max(s["samples"])
    # the gate at both lengths: transformers fp32 vs our fp32 reference kernels, all 12 tokens or up to an fp32
    # near-tie; bf16 is recorded (how many leading tokens our timed path shares with it), not gated
    assert len(result["agreement"]) == 4
    for a in result["agreement"]:
        lead = a["leading_tokens_equal"]["timed path"]
        assert 0 <= lead <= 12
        if a["baseline"] == "transformers-fp32":
            assert a["gated_path"] == "ours, fp32 reference kernels"
            if a["identical"]:
                assert a["tokens_compared"] == 12 and a["near_tie_at"] is None
            else:
                assert (
                    a["tokens_compared"] == a["near_tie_at"] + 1 and a["relative_margin_at_tie"] < TIE_TOLERANCE["fp32"]
                )
        else:
            assert a["gated_path"] is None and a["identical"] == (lead == 12)
    assert {c["engine"] for c in result["cold_start"]} == {"ours", "transformers"}
    assert all(c["first_token_ms"] > c["ready_ms"] > 0 and c["peak_rss_mib"] > 100 for c in result["cold_start"])
    roof = result["roofline"]
    assert roof["measured"]["gbps"] > 0 and {r["engine"] for r in roof["rows"]} == engines
    printed = capsys.readouterr().out
    assert "Time to first token by stage" in printed and "transformers-bf16" in printed and "[" in printed


def test_bench_aborts_when_outputs_differ(w4, monkeypatch, capsys):
    """A baseline that computes something else (here: its lm_head negated) stops the run before any timing,
    with a one-line error naming the token position."""
    from qwen_audio_edge.benchmark import hf_baseline

    real_load = hf_baseline.HfBaseline.load

    def tampered(artifacts, dtype, device="cpu"):
        b = real_load(artifacts, dtype, device)
        with torch.no_grad():
            b.model.get_submodule("lm_head").weight.neg_()
        return b

    monkeypatch.setattr(hf_baseline.HfBaseline, "load", staticmethod(tampered))
    root, _ = w4
    rc = cli.main(["bench", "--model", str(root / "artifacts"), "--baselines", "transformers-fp32", *QUICK])
    err = capsys.readouterr().err
    assert rc == 2
    assert "error: our greedy output differs from transformers-fp32's at token 0" in err
    assert "nothing was timed" in err and "2 s: stages" not in err


def test_baseline_runs_our_exact_weights(w4):
    """transformers on the dequantized W4 weights (and the int8 head) gives the same greedy tokens as our
    reference W4 path, and first-token logits within 3e-6 of their scale (fp32 both; measured 2.0e-6)."""
    from qwen_audio_edge.benchmark.hf_baseline import HfBaseline
    from qwen_audio_edge.benchmark.ours import OurEngine, greedy
    from qwen_audio_edge.export.synthetic_audio import speech_like_signal
    from qwen_audio_edge.runtime.pipeline import Pipeline, RuntimeOptions

    root, _ = w4
    art = root / "artifacts"
    p = Pipeline.from_artifacts(art, RuntimeOptions(w4_kernel="ref"))
    p.decoder.lm_head.use_reference = True  # the int8 head's fp32 reference twin (its CPU op computes in bf16)
    eng = OurEngine(p, "What does the person say?")
    wave = speech_like_signal(3.0)
    ours = p.run(wave, eng.prompt, sampling=greedy(10)).token_ids
    hf = HfBaseline.load(art, "fp32")
    got = hf.generate(eng.ids(wave), eng.segments(wave), 10)
    assert got.tokens == list(ours)
    # the first answer token's logits, ours (prefill) vs theirs (generate)
    from qwen_audio_edge.runtime.audio import num_audio_tokens

    segments = eng.segments(wave)
    conv = p.chat()
    counts = [num_audio_tokens(p.mel.valid_frames(len(x))) for x in segments]
    turn = conv.begin_turn(eng.prompt, len(segments), dry_run_counts=counts)
    first = conv.prefill_turn(turn, [p.mel.log_mel(x) for x in segments]).logits.float()
    theirs = got.logits[0]
    rel = float((first - theirs).abs().max() / theirs.abs().max())
    assert rel < 3e-6


def test_agreement_rules():
    logits = torch.zeros(4, 10)
    logits[:, 1] = 10.0
    logits[2, 2] = 9.9  # step 2: a near-tie (margin 0.01 of the scale)
    ok = check_agreement([1, 1, 1, 1], [1, 1, 1, 1], logits, "b", 0.03)
    assert ok.identical and ok.compared == 4
    tie = check_agreement([1, 1, 2, 5], [1, 1, 1, 1], logits, "b", 0.03)
    assert (tie.identical, tie.near_tie_at, tie.compared) == (False, 2, 3)
    assert relative_margin(logits[2]) == pytest.approx(0.01, rel=1e-5)
    with pytest.raises(DisagreementError, match=r"at token 1 .*ours 3, theirs 1"):
        check_agreement([1, 3, 1, 1], [1, 1, 1, 1], logits, "b", 0.03)


def test_schema_rejects_a_broken_result():
    import jsonschema

    with pytest.raises(jsonschema.ValidationError):
        validate({"schema": SCHEMA_ID})
    bad_stage = {
        "engine": "ours",
        "stage": "ttft",
        "audio_s": 2,
        "new_tokens": None,
        "unit": "s",
        "median": 1,
        "p90": 1,
        "samples": [1],
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad_stage, {"$ref": "#/properties/stages/items", **_schema()})


def _schema():
    from qwen_audio_edge.benchmark.report import SCHEMA

    return SCHEMA


def test_tables_ratio_is_ours_over_fastest_baseline():
    stage = lambda e, v: {
        "engine": e,
        "stage": "ttft",
        "audio_s": 5.0,
        "new_tokens": None,
        "unit": "ms",
        "median": v,
        "p90": v,
        "samples": [v],
    }
    (_title, headers, rows), *_ = tables({"stages": [stage("ours", 80.0), stage("a", 100.0), stage("b", 200.0)]})
    assert headers == ["audio", "stage", "ours", "a", "b", "ratio"]
    assert rows == [["5 s", "ttft", "80.0 [80.0]", "100.0 [100.0]", "200.0 [200.0]", "0.80×"]]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shape", "tiny", "--seconds", "0,5"], "audio lengths must be in (0, 600]"),
        (["--shape", "tiny", "--new-tokens", "x"], "comma list of integers"),
        (["--shape", "tiny", "--baselines", "vllm"], "--baselines: unknown ['vllm']"),
        (["--shape", "tiny", "--plot", "out.jpg"], "the plot is a PNG"),
        (["--shape", "tiny", "--repeats", "0"], "--repeats must be ≥ 1"),
        (["--shape", "tiny", "--json", "/nonexistent/dir/x.json"], "the folder /nonexistent/dir does not exist"),
        (["--model", "/tmp"], "no manifest.json there"),
    ],
)
def test_bad_options_fail_fast(argv, message, capsys):
    with pytest.raises(SystemExit) if "--new-tokens" in argv or "0,5" in argv else _no_raise():
        rc = cli.main(["bench", *argv])
        assert rc == 2
    assert message in capsys.readouterr().err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
