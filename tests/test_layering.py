"""The layering of the package, read from every module's imports (function-level ones too).

Dependencies point one way: cluster -> workers -> (kernels, cache_store) -> errors; the lab
(lab, evals, training, bench) and the tooling (testing, cli) sit beside and above the serving code,
which never imports them.
"""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVING = {"errors", "kernels", "cache_store", "workers", "cluster", "deploy"}
LAB = {"lab", "evals", "training", "bench", "testing", "cli"}
# package -> the lessserve packages it may import (itself always allowed)
ALLOWED = {
    "errors": set(),
    "kernels": {"errors"},
    "cache_store": {"errors"},
    "workers": {"errors", "kernels", "cache_store"},
    "cluster": {"errors", "kernels", "cache_store", "workers"},
    "deploy": {"errors", "cluster"},
    "lab": SERVING,
    "evals": SERVING | {"lab"},
    "training": SERVING | {"lab"},
    "testing": SERVING,
    "bench": SERVING | {"lab", "testing"},
    "cli": SERVING | LAB,
}
THIRD_PARTY_BANS = {"cache_store": {"ray"}, "kernels": {"ray", "redis"}, "errors": {"torch", "ray"}}


def imports_of(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def source_folders() -> set[str]:
    """The checkout's top-level folders that install as `lessserve.<name>` (pyproject's package-dir)."""
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    return {d.split("/")[0] for d in dirs}


def test_every_package_is_in_the_table():
    pkgs = source_folders() | {p.parent.name for p in ROOT.glob("*/*.py")} - {"tests", ".ci"}
    assert pkgs == set(ALLOWED), pkgs ^ set(ALLOWED)


def test_imports_point_one_way():
    bad = []
    for pkg, allowed in ALLOWED.items():
        for f in sorted((ROOT / pkg).rglob("*.py")):
            for mod in imports_of(f):
                top = mod.split(".")
                if top[0] == "lessserve" and len(top) > 1 and top[1] != pkg and top[1] not in allowed:
                    bad.append(f"{f.relative_to(ROOT)} imports {mod}")
                if top[0] in THIRD_PARTY_BANS.get(pkg, ()):
                    bad.append(f"{f.relative_to(ROOT)} imports {mod}")
                if top[0] == "tests":
                    bad.append(f"{f.relative_to(ROOT)} imports test code {mod}")
    assert not bad, "\n".join(bad)


def test_cache_store_imports_no_ray_and_no_workers():
    code = ("import sys, lessserve.cache_store, lessserve.cache_store.store, lessserve.cache_store.redis_kv\n"
            "bad = [m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'lessserve.workers', "
            "'lessserve.cluster'))]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


BLOCK_LAB_LIBS = """
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):  # the serving install has neither (the `lab` extra)
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('matplotlib', 'tqdm'):
            raise ImportError(f'{name} is not installed (serving install)')
sys.meta_path.insert(0, _Absent())
"""


def test_serving_path_needs_no_lab_libraries():
    """The engine, the SessionStore and the Serve app import without matplotlib and tqdm installed,
    and load no lab package."""
    code = (BLOCK_LAB_LIBS + "import lessserve.workers.engine, lessserve.workers.session_store, lessserve.cluster.app\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'tqdm') or "
            "m.startswith(('lessserve.lab', 'lessserve.evals', 'lessserve.training', 'lessserve.bench', "
            "'lessserve.testing', 'lessserve.cli'))]\n"
            "assert not bad, sorted(bad)[:10]\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
