"""Find the `helm` and `kubectl` binaries the chart tooling uses; never downloads anything.

Lookup order: env `HELM` / `KUBECTL`, then PATH, then the tools cache `$XDG_CACHE_HOME/lessserve/tools`
(default `~/.cache/lessserve/tools`), where the test suite's fetcher (`python -m tests.deploy.k8s_tools`)
unpacks them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from lessserve.errors.tree import DependencyUnavailableError


class ToolUnavailableError(DependencyUnavailableError):
    """No working binary was found; the message says where it looked."""


ToolUnavailable = ToolUnavailableError  # the old name


def tools_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "lessserve" / "tools"


def runs(path: str | Path, *args: str) -> bool:
    try:
        return subprocess.run([str(path), *args], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def probe_args(name: str) -> list[str]:
    return ["version"] if name == "helm" else ["version", "--client"]


def find_tool(name: str) -> str:
    """Path of a working `helm` or `kubectl`; ToolUnavailableError (saying where it looked) if none."""
    tried = []
    for cand in (os.environ.get(name.upper()), shutil.which(name), str(tools_dir() / name)):
        if cand and Path(cand).is_file():
            if runs(cand, *probe_args(name)):
                return cand
            tried.append(cand)
    raise ToolUnavailableError(f"no working {name} (env {name.upper()}, PATH, {tools_dir()}); tried {tried}. "
                               f"Fetch one with `python -m tests.deploy.k8s_tools`")


def find_helm() -> str:
    return find_tool("helm")


def find_kubectl() -> str:
    return find_tool("kubectl")
