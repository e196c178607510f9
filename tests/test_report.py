"""bench/report.py: the committed docs match the committed result files, a changed result makes `--check` fail
until the blocks are rewritten, and bad blocks or missing results are refused with a message naming them.
Also holds measurements.md and fidelity.md (generated pages, outside tests/test_readme.py's list) to the
docs' rules: no measured figures outside generated blocks, whole table rows, links that resolve."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED_PAGES = [ROOT / "README.md", ROOT / "docs" / "measurements.md", ROOT / "docs" / "fidelity.md"]


def _report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_report"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


report = _report()


@pytest.fixture
def tree(tmp_path):
    """A copy of README.md, docs/ and bench/results/ to break: (root, results dir)."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copytree(ROOT / "bench" / "results", tmp_path / "results", ignore=shutil.ignore_patterns("*.png"))
    return tmp_path, tmp_path / "results"


def _main(capsys, root: Path, results: Path, *args: str) -> tuple[int, str]:
    rc = report.main(["--root", str(root), "--results", str(results), *args])
    return rc, capsys.readouterr().err


def test_committed_docs_match_the_committed_results():
    """What CI runs: every generated block in README.md and docs/ is what bench/report.py makes now."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, f"stale or broken generated blocks (run python bench/report.py):\n{r.stderr}"


def test_a_changed_result_fails_check_until_rewritten(tree, capsys):
    root, results = tree
    assert _main(capsys, root, results, "--check") == (0, "")
    path = results / "cpu" / "kernels.json"
    data = json.loads(path.read_text())
    data["rows"][0]["ours_ms"] = 987.654  # no real row is near 988 ms
    path.write_text(json.dumps(data))
    rc, err = _main(capsys, root, results, "--check")
    assert rc == 1 and "docs/measurements.md: block 'kernels-cpu' is stale" in err
    assert "readme-summary" not in err  # the README row uses M = 1 speed-ups, not this time: only the changed block
    before = (root / "docs" / "measurements.md").read_text()
    assert _main(capsys, root, results)[0] == 0
    after = (root / "docs" / "measurements.md").read_text()
    assert "| 988 |" in after and "| 988 |" not in before
    assert _main(capsys, root, results, "--check") == (0, "")


def test_a_changed_headline_makes_the_readme_stale(tree, capsys):
    root, results = tree
    path = results / "cpu" / "bench_mid.json"  # the first-token row's figure: ours at the shortest audio
    data = json.loads(path.read_text())
    row = next(s for s in data["stages"] if (s["engine"], s["stage"], s["audio_s"]) == ("ours", "ttft", 2.0))
    row["median"] = 999.0
    path.write_text(json.dumps(data))
    rc, err = _main(capsys, root, results, "--check")
    assert rc == 1 and "README.md: block 'readme-summary' is stale" in err


def test_unknown_block_name_fails(tree, capsys):
    root, results = tree
    page = root / "docs" / "measurements.md"
    page.write_text(
        page.read_text() + "\n<!-- BEGIN GENERATED no-such-table: x -->\n<!-- END GENERATED no-such-table -->\n"
    )
    rc, err = _main(capsys, root, results, "--check")
    assert rc == 1 and "docs/measurements.md: unknown generated block 'no-such-table'" in err
    text = page.read_text()
    assert _main(capsys, root, results)[0] == 1 and page.read_text() == text  # nothing rewritten on error


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace("<!-- END GENERATED gptq-quality -->\n", ""), "block 'gptq-quality' has no"),
        (
            lambda t: re.sub(
                r"<!-- BEGIN GENERATED gptq-quality.*?<!-- END GENERATED gptq-quality -->\n", "", t, flags=re.S
            ),
            "docs/measurements.md: block 'gptq-quality' is missing",
        ),
        (
            lambda t: t + "\n<!-- BEGIN GENERATED readme-summary: x -->\n<!-- END GENERATED readme-summary -->\n",
            "docs/measurements.md: block 'readme-summary' belongs in README.md",
        ),
    ],
)
def test_broken_markers_fail(tree, capsys, edit, message):
    root, results = tree
    page = root / "docs" / "measurements.md"
    page.write_text(edit(page.read_text()))
    rc, err = _main(capsys, root, results, "--check")
    assert rc == 1 and message in err


def test_missing_result_file_or_key_is_named(tree, capsys):
    root, results = tree
    (results / "cpu" / "gptq_quality.json").unlink()
    rc, err = _main(capsys, root, results, "--check")
    assert rc == 1 and "bench/results/cpu/gptq_quality.json is missing" in err
    path = results / "cpu" / "quantize_memory.json"
    data = json.loads(path.read_text())
    del data["models"]["mid"]["peak_rss_mib"]
    path.write_text(json.dumps(data))
    rc, err = _main(capsys, root, results, "--print", "quantize-memory")
    assert rc == 1 and "bench/results/cpu/quantize_memory.json: key 'peak_rss_mib' missing" in err
    rc, err = _main(capsys, root, results, "--print", "no-such-block")
    assert rc == 1 and "unknown block 'no-such-block'" in err


def test_stream_block_reads_the_current_keys(tree, capsys):
    """bench/stream.py's current keys (endpoint_decision_to_first_token_ms_*, lag_s_max, its chunked rule) render:
    a changed figure lands in the table, and the chunked rows carry the file's own block and look-ahead."""
    _root, results = tree
    path = results / "cpu" / "stream_mid.json"
    data = json.loads(path.read_text())
    data["rows"][0]["endpoint_decision_to_first_token_ms_exact_spec"] = 0.777
    data["chunk_seconds"], data["lookahead_seconds"] = 2.0, 0.5
    for row in data["realtime_rows"]:
        assert {"lag_s_max", "end_of_speech_to_first_token_ms"} <= set(row["exact"])
    path.write_text(json.dumps(data))
    rc = report.main(["--results", str(results), "--print", "stream-latency"])
    out = capsys.readouterr().out
    assert rc == 0 and "| 2 s | 0.777 |" in out and "| chunked (2 s blocks + 0.5 s look-ahead) |" in out
    assert "not shown" not in out


def test_design_constants_match_the_runtime():
    """The targets and default setting the blocks judge figures against are the runtime's own."""
    from qwen_audio_edge.runtime import chunked

    assert report.WER_TARGETS == chunked.TARGET_RATIO
    assert report.DEFAULT_CHUNKED == (chunked.DEFAULT_CHUNK_S, chunked.DEFAULT_LOOKAHEAD_S)


# What measurements look like (as tests/test_readme.py's rule, plus memory sizes): a fractional latency, a
# speed, a rate or size, a speed-up (a product of dimensions such as "4096 × 11008" is not one). Whole-number
# design constants ("100 ms chunks", "10 dB SNR", "30 s window") are fine in prose.
FIGURE = re.compile(r"\b\d+\.\d+\s*ms\b|\b\d+(?:\.\d+)?\s*(?:tok/s|GB/s|MiB|GiB|%)|\b\d+(?:\.\d+)?\s*×(?!\s*\d)")


def _outside_blocks(text: str) -> str:
    text = re.sub(r"^<!-- BEGIN GENERATED (\S+?)[:\s].*?^<!-- END GENERATED \1 -->", "", text, flags=re.S | re.M)
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


@pytest.mark.parametrize("page", GENERATED_PAGES, ids=lambda p: p.name)
def test_no_measured_figures_outside_generated_blocks(page):
    found = FIGURE.findall(_outside_blocks(page.read_text()))
    assert not found, f"{page.name} states figures outside generated blocks: {found}"


def test_figure_rule_catches_figures():
    """The rule above is not vacuous: it flags what a hand-copied result looks like, and not design constants."""
    assert FIGURE.findall("decode 69.9 tok/s, 2.80× faster, 13.5 % WER, 0.29 ms, 1,413 MiB") == [
        "69.9 tok/s",
        "2.80×",
        "13.5 %",
        "0.29 ms",
        "413 MiB",
    ]
    assert not FIGURE.findall("100 ms chunks, 4096 × 11008, 10 dB SNR, a 30 s window, group 128")


@pytest.mark.parametrize("page", GENERATED_PAGES[1:], ids=lambda p: p.name)
def test_tables_have_whole_rows(page):
    """An unescaped `|` inside a cell splits it on GitHub: every row has the header's cell count."""
    width = None
    for line in page.read_text().splitlines():
        if not line.startswith("|"):
            width = None
            continue
        cells = len(re.split(r"(?<!\\)\|", line.strip())) - 2
        width = cells if width is None else width
        assert cells == width, f"{page.name}: table row with {cells} cells, header has {width}: {line}"


@pytest.mark.parametrize("page", GENERATED_PAGES, ids=lambda p: p.name)
def test_links_resolve(page):
    """Links (the README's results table links into measurements.md) reach a file and heading that exist."""
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        assert dest.is_relative_to(ROOT) and dest.exists(), f"{page.name} links to a missing file: {target}"
        if anchor:
            heads = re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.M)
            anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}
            assert anchor in anchors, f"{page.name}: no heading #{anchor} in {dest.name}"
