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
from lessserve.errors.tree import ConfigError

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


def redis_auth(values: dict) -> bool:
    """Whether the app reads a Redis password from the chart's Secret: the in-chart Redis with auth on
    (the chart's Secret or an existing one), or an external Redis with an existing Secret."""
    redis = values["redis"]
    auth = redis.get("auth") or {}
    if redis["external"].get("url"):
        return bool(auth.get("existingSecret"))
    return bool(redis.get("enabled") and auth.get("enabled"))


def serve_config(values: dict, release: str = RELEASE) -> ServeConfig:
    """The app's ServeConfig for these chart values (raises pydantic.ValidationError on bad values)."""
    args = copy.deepcopy(values.get("serve") or {})
    args["host"], args["port"] = "0.0.0.0", SERVE_PORT
    model = values.get("model") or {}
    if model.get("path") and (model.get("existingClaim") or model.get("hostPath")):
        args.setdefault("engine", {})["model"] = f"{model['mountPath'].rstrip('/')}/{model['path'].lstrip('/')}"
    url = redis_url(values, release)
    if url:
        args.setdefault("store", {})["redis_url"] = url
    if redis_auth(values):
        auth = values["redis"]["auth"]
        args.setdefault("store", {})["redis_password_file"] = f"{auth['mountPath']}/{auth['secretKey']}"
    keys = values["apiKeys"]
    if keys.get("existingSecret") or keys.get("keys"):
        args["api_keys_file"] = f"{keys['mountPath']}/{keys['secretKey']}"
    return ServeConfig.model_validate(args)


def serve_config_v2(values: dict, release: str = RELEASE) -> dict:
    return serve_config_document(serve_config(values, release), name=values.get("applicationName", "lessserve"))


CHART_OWNED = ("host", "port", "api_keys", "api_keys_file")  # and store.redis_url: set from `redis` / `apiKeys`
STORE_CHART_OWNED = ("redis_url", "redis_password", "redis_password_file")  # a password lives in a Secret


def values_schema() -> dict:
    """The chart's values.schema.json: `serve` is ServeConfig's JSON schema without the fields the chart owns
    (so Helm rejects typos and those fields at install time); a few chart values get types and ranges."""
    serve = ServeConfig.model_json_schema()
    defs = serve.pop("$defs")
    for name in CHART_OWNED:
        serve["properties"].pop(name)
    for name in STORE_CHART_OWNED:
        defs["StoreConfig"]["properties"].pop(name)
    serve["description"] = "lessserve.cluster.config.ServeConfig (host, port, store.redis_url, api_keys, " \
        "api_keys_file are set by the chart)"
    count = {"type": "integer", "minimum": 0}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "lessserve chart values (generated by python -m lessserve.deploy.render_manifests)",
        "type": "object",
        "properties": {
            "serve": serve,
            "applicationName": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$"},
            "rayVersion": {"type": "string"},
            "rayService": {"type": "object", "properties": {
                "upgradeStrategy": {"enum": ["NewCluster", "None"]},
                "autoscaler": {"type": "object", "properties": {
                    "enabled": {"type": "boolean"},
                    "upscalingMode": {"enum": ["Default", "Conservative", "Aggressive"]},
                    "idleTimeoutSeconds": count}}}},
            "workers": {"type": "object", "properties": {
                "groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "replicas": count, "minReplicas": count, "maxReplicas": {"type": "integer", "minimum": 1},
                "gpusPerPod": count, "preStopMarginSeconds": count,
                "terminationGracePeriodSeconds": {"type": ["integer", "null"], "minimum": 1}}},
            "apiKeys": {"type": "object", "properties": {
                "existingSecret": {"type": "string"}, "secretKey": {"type": "string", "minLength": 1},
                "keys": {"type": "array", "items": {"type": "string", "minLength": 8}},
                "mountPath": {"type": "string", "pattern": "^/"}}},
            "redis": {"type": "object", "properties": {
                "enabled": {"type": "boolean"}, "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "maxmemoryPolicy": {"enum": ["noeviction"]},  # never evicts a response record or transcript
                "auth": {"type": "object", "properties": {
                    "enabled": {"type": "boolean"}, "existingSecret": {"type": "string"},
                    "secretKey": {"type": "string", "minLength": 1}, "mountPath": {"type": "string", "pattern": "^/"}}},
                "external": {"type": "object", "properties": {"url": {"type": "string",
                                                                       "pattern": "^$|^(redis|rediss|unix)://"}}}}},
            "service": {"type": "object", "properties": {"type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}}},
            "model": {"type": "object", "properties": {
                "existingClaim": {"type": "string"}, "hostPath": {"type": "string", "pattern": "^$|^/"},
                "mountPath": {"type": "string", "pattern": "^/"}, "path": {"type": "string"}}},
            "networkPolicy": {"type": "object", "properties": {
                "enabled": {"type": "boolean"}, "serveFrom": {"type": "array"}, "metricsFrom": {"type": "array"},
                "operator": {"type": "object"}}},
            "head": {"type": "object", "properties": {
                "dashboardHost": {"type": "string", "pattern": "^[0-9.]+$"}}},
        },
        "$defs": defs,
    }


class ChartRenderError(ConfigError, RuntimeError):
    """`helm template` refused the chart with these values (the message is helm's)."""


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
        raise ChartRenderError(f"{' '.join(cmd)} failed:\n{r.stderr}")
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
