"""Render the Helm chart and the Serve config it embeds.

`serve_config(values)` is the Python twin of the chart's `serveConfigV2`: it validates the chart's
`serve:` values through ServeConfig and builds the document with `serve_config_document`, filling in
what the chart owns (bind address, port 8000, Redis URL, API-key file). The tests check that the
chart's output and this agree for every shipped values file.

    python -m lessserve.deploy.render [-f values-gpu.yaml ...]   # print the Serve config (YAML)
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from pathlib import Path

import yaml

from lessserve.cluster.config import ServeConfig, serve_config_document
from lessserve.deploy.tools import find_helm

CHART_DIR = Path(__file__).resolve().parent / "chart" / "lessserve"
VALUES_FILES = ("values.yaml", "values-gpu.yaml", "values-cpu.yaml", "values-external-redis.yaml")
RELEASE = "lessserve"
SERVE_PORT = 8000  # KubeRay's serve service targets this port


def merge(base: dict, over: dict) -> dict:
    """Helm's values merge: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_values(*files: str | Path) -> dict:
    """The chart defaults, then each file in turn (a bare name means a file in the chart folder)."""
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    for f in files:
        path = Path(f) if Path(f).exists() else CHART_DIR / f
        values = merge(values, yaml.safe_load(path.read_text()) or {})
    return values


def fullname(values: dict, release: str = RELEASE) -> str:
    name = values.get("nameOverride") or "lessserve"
    if values.get("fullnameOverride"):
        return values["fullnameOverride"][:40].rstrip("-")
    return (release if name in release else f"{release}-{name}")[:40].rstrip("-")


def redis_url(values: dict, release: str = RELEASE) -> str | None:
    redis = values["redis"]
    if redis["external"].get("url"):
        return redis["external"]["url"]
    if redis.get("enabled"):
        return f"redis://{fullname(values, release)}-redis:{int(redis['port'])}/0"
    return None


def serve_config(values: dict, release: str = RELEASE) -> ServeConfig:
    """The app's ServeConfig for these chart values (raises pydantic.ValidationError on bad values)."""
    args = copy.deepcopy(values.get("serve") or {})
    args["host"], args["port"] = "0.0.0.0", SERVE_PORT
    url = redis_url(values, release)
    if url:
        args.setdefault("store", {})["redis_url"] = url
    keys = values["apiKeys"]
    if keys.get("existingSecret") or keys.get("keys"):
        args["api_keys_file"] = f"{keys['mountPath']}/{keys['secretKey']}"
    return ServeConfig.model_validate(args)


def serve_config_v2(values: dict, release: str = RELEASE) -> dict:
    return serve_config_document(serve_config(values, release), name=values.get("applicationName", "lessserve"))


def helm_template(*values_files: str | Path, release: str = RELEASE, helm: str | None = None,
                  extra_args: tuple[str, ...] = ()) -> str:
    """`helm template` of the chart with these values files (bare names: files in the chart folder)."""
    helm = helm or find_helm()
    cmd = [helm, "template", release, str(CHART_DIR)]
    for f in values_files:
        path = Path(f) if Path(f).exists() else CHART_DIR / f
        cmd += ["-f", str(path)]
    r = subprocess.run([*cmd, *extra_args], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return r.stdout


def documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lessserve.deploy.render", description=__doc__.split("\n\n")[0])
    ap.add_argument("-f", "--values", action="append", default=[], help="values file(s) over the chart defaults")
    ap.add_argument("--release", default=RELEASE)
    a = ap.parse_args(argv)
    yaml.safe_dump(serve_config_v2(load_values(*a.values), a.release), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
