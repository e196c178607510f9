"""The `qwen-audio-edge` CLI in subprocesses: run --json, streaming, export, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from helpers import GREEDY, signal

CLI = [sys.executable, "-m", "qwen_audio_edge.cli"]


def _cli(*args, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "speech.wav"
    sf.write(str(path), signal(4.3), 16000, subtype="PCM_16")
    return path


def test_run_json_matches_the_api(mha, pipelines, wav):
    r = _cli(
        "run",
        mha.artifacts,
        "--audio",
        wav,
        "--prompt",
        "What is said?",
        "--greedy",
        "--max-new-tokens",
        12,
        "--ignore-eos",
        "--repetition-penalty",
        "1.0",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"text", "token_ids", "timings", "finish_reason"}
    for key in ("load_s", "mel_ms", "encoder_ms", "prefill_ms", "decode_tok_s", "ttft_ms"):
        assert key in out["timings"]
    api = pipelines(mha).run(str(wav), "What is said?", sampling=GREEDY)
    assert out["token_ids"] == api.token_ids
    assert out["text"] == api.text


def test_run_streams_text(mha, wav):
    """The text streamed piece by piece is the answer's text (same seed: the --json run's text), then a newline."""
    args = ("run", mha.artifacts, "--audio", wav, "--max-new-tokens", 8, "--seed", 3, "--ignore-eos")
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    whole = _cli(*args, "--json")
    assert whole.returncode == 0, whole.stderr
    out = json.loads(whole.stdout)
    assert len(out["token_ids"]) == 8 and out["text"]
    assert r.stdout == out["text"] + "\n"


@pytest.mark.parametrize(
    "make_args,match",
    [
        (lambda a, t: ["run", a, "--audio", t / "missing.wav"], "audio file not found"),
        (lambda a, t: ["run", t / "no-artifacts", "--audio", t / "x.wav"], "artifacts directory not found"),
        (lambda a, t: ["run", a, "--audio", t / "short.wav"], "at least 321 samples"),
        (lambda a, t: ["run", a, "--audio", t / "garbage.wav"], "cannot read"),
        (lambda a, t: ["run", a], "give --audio FILE and/or --prompt TEXT"),
        (lambda a, t: ["run", a, "--prompt", "hi", "--temperature", "0"], "temperature must be > 0"),
        (lambda a, t: ["run", a, "--prompt", "hi", "--greedy", "--temperature", "0.5"], "drop --greedy to sample"),
        (lambda a, t: ["compare", a, "--chunked", "2"], "--audio FILE (repeat for several) or --librispeech DIR"),
        (lambda a, t: ["run", a, "--prompt", "hi", "--max-context", "999999999"], "max_position_embeddings"),
        (lambda a, t: ["run", a, "--audio", t / "long.wav", "--max-context", "200"], "context holds 200"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(mha, tmp_path, make_args, match):
    sf.write(str(tmp_path / "short.wav"), np.zeros(200, np.float32), 16000)
    sf.write(str(tmp_path / "long.wav"), signal(20.0), 16000)
    (tmp_path / "garbage.wav").write_bytes(b"\x00garbage" * 100)
    r = _cli(*make_args(mha.artifacts, tmp_path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_export_cli_and_overwrite_refusal(mha, tmp_path):
    out = tmp_path / "art"
    r = _cli("export", mha.checkpoint, out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert (out / "manifest.json").exists()
    assert "encoder vs transformers" in r.stderr
    r = _cli("export", mha.checkpoint, out, "--quiet")
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr


def test_demo_runs(tmp_path):
    r = _cli("demo", "--json", "--seconds", "2", "--max-new-tokens", "4", "--keep", tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["token_ids"]) == 4 and out["timings"]["audio_tokens"] == 50


def test_runtime_never_imports_transformers():
    code = (
        "import sys; import qwen_audio_edge, qwen_audio_edge.runtime, qwen_audio_edge.runtime.pipeline, "
        "qwen_audio_edge.cli, qwen_audio_edge.runtime.encoder, qwen_audio_edge.runtime.generate; "
        "from qwen_audio_edge import Pipeline; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'onnx', 'onnxscript')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_full_run_never_imports_transformers(mha):
    code = (
        "import sys; from qwen_audio_edge.runtime.pipeline import Pipeline; "
        f"p = Pipeline.from_artifacts({str(mha.artifacts)!r}); "
        "import numpy as np; r = p.run(np.sin(np.arange(16000) / 9.0).astype('float32'), 'hi'); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'onnx', 'onnxscript')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compare_cli_hf_vs_artifacts(mha, wav):
    """The verification a user with real weights runs: transformers (HF dir) vs our artifacts."""
    r = _cli("compare", mha.checkpoint, mha.artifacts, "--audio", wav, "--new-tokens", 8, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["top1_agreement"] == 1.0 and report["mean_kl"] < 1e-6
    # fp32 artifacts: the runtime reproduces transformers. Measured 8.5e-7 / 1.6e-6 (layers 0 / 1); margin ×6.
    assert max(report["layer_rel_err"]) < 1e-5, report["layer_rel_err"]


def test_eval_librispeech_format(mha, pipelines, tmp_path):
    root = tmp_path / "LibriSpeech" / "test-clean"
    chapter = root / "1089" / "134686"
    chapter.mkdir(parents=True)
    lines = []
    for i, secs in enumerate((1.2, 2.3)):
        uid = f"1089-134686-{i:04d}"
        sf.write(str(chapter / f"{uid}.flac"), signal(secs, seed=i), 16000)
        lines.append(f"{uid} HE HOPED THERE WOULD BE STEW FOR DINNER")
    (chapter / "1089-134686.trans.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "results.jsonl"
    r = _cli(
        "eval",
        mha.artifacts,
        "--librispeech",
        tmp_path / "LibriSpeech",
        "--limit",
        2,
        "--max-new-tokens",
        6,
        "--out",
        out,
        "--json",
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in rows] == ["1089-134686-0000", "1089-134686-0001"]
    # The hypotheses written are the model's greedy answers to eval's instruction…
    from qwen_audio_edge.evaluation.librispeech import DEFAULT_INSTRUCTION
    from qwen_audio_edge.runtime.generate import SamplingOptions

    greedy6 = SamplingOptions(max_new_tokens=6, greedy=True, repetition_penalty=1.0)
    for i, row in enumerate(rows):
        flac = chapter / f"{row['id']}.flac"
        assert row["hypothesis"] == pipelines(mha).run(str(flac), DEFAULT_INSTRUCTION, sampling=greedy6).text, i
        assert row["reference"] == "HE HOPED THERE WOULD BE STEW FOR DINNER"
    # …and the WER reported is recomputed from them independently: Whisper's English normalizer, then jiwer
    # (corpus WER over both utterances; per row, that row's WER).
    import jiwer
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    norm = EnglishTextNormalizer({})
    refs, hyps = [norm(x["reference"]) for x in rows], [norm(x["hypothesis"]) for x in rows]
    for row, ref, hyp in zip(rows, refs, hyps, strict=True):
        assert row["wer"] == pytest.approx(jiwer.wer(ref, hyp), abs=1e-12)
    words = jiwer.process_words(refs, hyps)
    assert report["utterances"] == 2 and report["words"] == 16  # 8 reference words per utterance
    assert report["errors"] == words.substitutions + words.deletions + words.insertions
    assert report["wer_percent"] == pytest.approx(100 * words.wer, abs=1e-9)
    assert report["wer_percent"] == pytest.approx(100 * report["errors"] / 16, abs=1e-9)
    assert report["per_utterance"] == str(out)
    # The published figures eval reports beside ours are the ones its module documents (from Qwen2-Audio's README).
    from qwen_audio_edge.evaluation import librispeech

    doc = " ".join(librispeech.__doc__.split())
    pub = report["published_wer_percent"]
    quoted = (
        f"test-clean / test-other WER {pub['test-clean']['original']} / {pub['test-other']['original']} in the "
        f"original framework, {pub['test-clean']['hf']} / {pub['test-other']['hf']} for the HF-converted checkpoint"
    )
    assert quoted in doc, quoted
    r = _cli("eval", mha.artifacts, "--librispeech", tmp_path / "nothing")
    assert r.returncode == 2 and "not found" in r.stderr


def test_export_w4_cli_flags(mha, tmp_path):
    r = _cli("export", mha.checkpoint, tmp_path / "o", "--bits", "4", "--group-size", "256", "--quiet")
    assert r.returncode == 2 and "use 32, 64, 128 or -1" in r.stderr and "Traceback" not in r.stderr
    r = _cli("export", mha.checkpoint, tmp_path / "o", "--bits", "4", "--calibration", tmp_path / "none", "--quiet")
    assert r.returncode == 2 and "calibration directory not found" in r.stderr
    r = _cli(
        "export",
        mha.checkpoint,
        tmp_path / "o",
        "--bits",
        "4",
        "--num-samples",
        "4",
        "--asym",
        "--no-act-order",
        "--group-size",
        "64",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    qc = json.loads((tmp_path / "o" / "decoder" / "config.json").read_text())["quantization_config"]
    assert (qc["sym"], qc["desc_act"], qc["group_size"]) == (False, False, 64)
    assert "W4 vs fp" in r.stderr
