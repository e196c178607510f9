"""`compare … --transcripts / --librispeech`: WER of each side and the relative change (plumbing on the tiny
random fixtures, where the texts are noise: the assertions are about what is measured, not how well)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import soundfile as sf

from helpers import signal
from qwen_audio_edge.evaluation.compare import OurModel, compare, format_table
from qwen_audio_edge.evaluation.librispeech import DEFAULT_INSTRUCTION, normalizer, read_transcripts, wer_stats
from qwen_audio_edge.runtime.errors import OptionsError
from qwen_audio_edge.runtime.generate import SamplingOptions

CLI = [sys.executable, "-m", "qwen_audio_edge.cli"]
WER_KEYS = {
    "utterances",
    "words",
    "normalizer",
    "reference",
    "candidate",
    "relative_change",
    "instruction",
    "max_new_tokens",
}


def _cli(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three utterances in LibriSpeech layout (speaker/chapter/ID.flac + ID-chapter .trans.txt)."""
    root = tmp_path_factory.mktemp("ls") / "LibriSpeech" / "test-clean"
    chapter = root / "1089" / "134686"
    chapter.mkdir(parents=True)
    ids = [f"1089-134686-{i:04d}" for i in range(3)]
    for i, uid in enumerate(ids):
        sf.write(str(chapter / f"{uid}.flac"), signal(1.5 + 0.7 * i, seed=10 + i), 16000)
    (chapter / "1089-134686.trans.txt").write_text(
        "".join(f"{uid} HE HOPED THERE WOULD BE STEW {i}\n" for i, uid in enumerate(ids))
    )
    return root, [chapter / f"{uid}.flac" for uid in ids]


def test_wer_stats_counts():
    s = wer_stats(["a b c", "d e", ""], ["a x c", "d e f", "ignored"])
    assert s == {"wer_percent": pytest.approx(40.0), "errors": 2, "words": 5, "utterances": 2}
    assert math.isnan(wer_stats([""], ["x"])["wer_percent"])


def test_read_transcripts_file_dir_and_missing(corpus, tmp_path):
    root, files = corpus
    trans = next(root.rglob("*.trans.txt"))
    assert read_transcripts(trans, files) == [f"HE HOPED THERE WOULD BE STEW {i}" for i in range(3)]
    assert read_transcripts(root, files)[2] == "HE HOPED THERE WOULD BE STEW 2"  # *.trans.txt found under a dir
    (tmp_path / f"{files[0].stem}.txt").write_text("single  file\ntranscript\n")
    (tmp_path / "more.trans.txt").write_text(f"{files[1].stem} from lines\n")
    assert read_transcripts(tmp_path, files[:2]) == ["single file transcript", "from lines"]
    with pytest.raises(OptionsError, match=f"no transcript for {files[2]}"):
        read_transcripts(tmp_path, files)
    with pytest.raises(OptionsError, match="transcripts not found"):
        read_transcripts(tmp_path / "nope", files)


def test_compare_reports_wer_per_side(mha, pipelines, corpus):
    """Exact (A) vs chunked (B): a transcript equal to a side's own output gives that side WER 0; the exact
    side transcribes exactly as `eval` (Pipeline.run, greedy, no repetition penalty) does."""
    _, files = corpus
    p = pipelines(mha, verify_hashes=False)  # a pipeline of its own: compare replaces its KV cache
    a, b = OurModel(pipeline=p), OurModel(pipeline=p, chunk_seconds=1.28)
    run = lambda transcripts: compare(
        a, b, files, "What does the person say?", 4, transcripts=transcripts, max_new_tokens=10
    )
    first = run(["placeholder words"] * 3)
    hyp_a = [row["hypotheses"]["reference"] for row in first["rows"]]
    hyp_b = [row["hypotheses"]["candidate"] for row in first["rows"]]
    eval_texts = [
        p.run(str(f), DEFAULT_INSTRUCTION, sampling=SamplingOptions(max_new_tokens=10, greedy=True)).text for f in files
    ]
    assert hyp_a == eval_texts
    norm = normalizer()
    assert all(norm(h) for h in hyp_a + hyp_b), "a hypothesis normalizes to nothing: the WER checks would prove little"
    assert set(first["wer"]) == WER_KEYS and first["wer"]["utterances"] == 3 and first["wer"]["words"] == 6
    assert first["wer"]["instruction"] == DEFAULT_INSTRUCTION and first["wer"]["max_new_tokens"] == 10

    own_a = run(hyp_a)
    text = format_table(own_a)
    assert "WER on 3 utterance(s)" in text and "reference     0.00 %" in text and "n/a (reference WER is 0)" in text
    w = own_a["wer"]
    assert w["reference"] == {"wer_percent": 0.0, "errors": 0} and w["relative_change"] is None
    assert w["words"] == sum(len(norm(h).split()) for h in hyp_a) and w["utterances"] == 3
    expected_b = wer_stats([norm(h) for h in hyp_a], [norm(h) for h in hyp_b])
    assert w["candidate"]["wer_percent"] == pytest.approx(expected_b["wer_percent"])
    assert w["candidate"]["errors"] == expected_b["errors"]
    assert [row["wer"]["reference"] for row in own_a["rows"]] == [0.0] * 3
    assert [row["transcript"] for row in own_a["rows"]] == hyp_a

    own_b = run(hyp_b)["wer"]
    assert own_b["candidate"] == {"wer_percent": 0.0, "errors": 0}
    if own_b["reference"]["wer_percent"] > 0:
        assert own_b["relative_change"] == pytest.approx(-1.0)  # B is 100 % better than A on B's own output
    with pytest.raises(OptionsError, match="2 transcripts for 3 audio files"):
        compare(a, b, files, "x", 2, transcripts=["a", "b"])


def test_compare_cli_transcripts_hf_vs_artifacts(mha, corpus):
    """transformers (HF dir) vs our fp32 artifacts: the same transcriptions, so the same WER (relative change 0)."""
    root, files = corpus
    trans = next(root.rglob("*.trans.txt"))
    r = _cli(
        "compare",
        mha.checkpoint,
        mha.artifacts,
        "--audio",
        files[0],
        "--audio",
        files[1],
        "--new-tokens",
        4,
        "--transcripts",
        trans,
        "--max-new-tokens",
        8,
        "--json",
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(report["wer"]) == WER_KEYS and report["wer"]["utterances"] == 2 and report["wer"]["words"] == 14
    rows = report["rows"]
    assert [row["transcript"] for row in rows] == ["HE HOPED THERE WOULD BE STEW 0", "HE HOPED THERE WOULD BE STEW 1"]
    assert all(row["hypotheses"]["reference"] == row["hypotheses"]["candidate"] for row in rows)
    assert report["wer"]["reference"] == report["wer"]["candidate"] and report["wer"]["relative_change"] == 0.0


def test_compare_cli_librispeech_chunked(mha, corpus):
    root, _ = corpus
    r = _cli(
        "compare",
        mha.artifacts,
        "--chunked",
        "1.28",
        "--librispeech",
        root.parent,
        "--limit",
        2,
        "--new-tokens",
        4,
        "--max-new-tokens",
        6,
    )
    assert r.returncode == 0, r.stderr
    assert "WER on 2 utterance(s), 14 words" in r.stdout and "relative change" in r.stdout
    assert "candidate:" in r.stdout and "chunked stream mode" in r.stdout


@pytest.mark.parametrize(
    "args,match",
    [
        (["--librispeech", "{ls}", "--audio", "{wav}"], "without --audio/--transcripts"),
        (["--transcripts", "{ls}"], "--audio FILE"),
        (["--audio", "{wav}", "--limit", "2"], "--limit applies to --librispeech"),
        (["--audio", "{wav}", "--transcripts", "{ls}/nothing"], "transcripts not found"),
        (["--audio", "{wav}", "--transcripts", "{ls}"], "no transcript for"),
        (["--librispeech", "{ls}/nothing"], "LibriSpeech directory not found"),
    ],
)
def test_compare_cli_wer_errors(mha, corpus, tmp_path, args, match):
    root, _ = corpus
    wav = tmp_path / "other.wav"
    sf.write(str(wav), signal(1.0), 16000)
    r = _cli("compare", mha.artifacts, "--chunked", "2", *[x.format(ls=root, wav=wav) for x in args])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.stderr
