"""The README's two set-up commands are exactly what CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("\n", 1)[1].strip() for b in setup.split("```bash")[1:]]
    commands = [b.split("```")[0].strip() for b in blocks][:2]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert len(commands) == 2
    for command in commands:
        assert command in ci, f"README command not run by .ci/run: {command}"


def _pins() -> dict[str, str]:
    pins = {}
    for name in ("compat-versions.txt", "compat-not-on-gpu.txt"):
        for line in (ROOT / ".ci" / name).read_text().splitlines():
            req = line.split("#", 1)[0].strip()
            if req:
                pkg, version = req.split("==")
                pins[pkg.strip().lower()] = version.strip()
    return pins


def _release(v: str) -> tuple[int, ...]:
    parts = tuple(int(p) for p in v.split("."))
    return parts + (0,) * (4 - len(parts))


def test_every_declared_lower_bound_is_pinned_in_the_second_ci_environment():
    """A `>=` in pyproject.toml is a promise: .ci/run tests it by installing exactly that version.
    Not covered: the `dev` extra (test tooling, not a user dependency) and `gpu` (onnxruntime-gpu needs
    a GPU; it follows onnxruntime's bound)."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    opt = project["optional-dependencies"]
    assert opt["gpu"] == [r.replace("onnxruntime", "onnxruntime-gpu") for r in opt["cpu"]]
    declared = project["dependencies"] + opt["cpu"] + opt["export"]
    pins = _pins()
    for req in declared:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", req.strip())
        assert m, f"pyproject requirement {req!r} is not a plain lower bound"
        pkg, bound = m.group(1).lower(), m.group(2)
        assert pkg in pins, f"{pkg}>={bound} is declared but not tested: pin it in .ci/compat-*.txt"
        assert _release(pins[pkg]) == _release(bound), f"{pkg}: pyproject says >={bound}, CI tests {pins[pkg]}"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "compat-versions.txt" in ci and "compat-not-on-gpu.txt" in ci and "gpu_check.sh --dry-run" in ci
    readme = (ROOT / "README.md").read_text()
    for pkg in ("torch", "transformers", "triton", "onnxruntime"):
        assert f"{pkg} {pins[pkg]}" in readme, f"README's tested matrix does not name {pkg} {pins[pkg]}"
