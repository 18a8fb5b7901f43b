"""deploy/manifests/ is what `python -m lessserve.deploy.render_manifests` writes from the chart."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from lessserve.deploy import render_manifests
from lessserve.deploy.tools import ToolUnavailable
from tests.deploy.k8s_tools import ensure_tool


def test_manifests_in_sync_with_chart(helm):
    stale = render_manifests.stale(helm=helm)
    assert not stale, f"re-run `python -m lessserve.deploy.render_manifests`; stale: {stale}"


def test_values_schema_in_sync_with_serve_config():
    assert render_manifests.SCHEMA_FILE.read_text() == render_manifests.schema_text(), \
        "re-run `python -m lessserve.deploy.render_manifests`"


def test_schema_accepts_every_values_file():
    import jsonschema

    from lessserve.deploy import render

    schema = yaml.safe_load(render_manifests.SCHEMA_FILE.read_text())
    for f in render.VALUES_FILES:
        jsonschema.Draft202012Validator(schema).validate(render.load_values(f))


@pytest.mark.parametrize("sub", list(render_manifests.VARIANTS))
def test_kustomization_lists_every_file(sub):
    folder = render_manifests.MANIFESTS_DIR / sub
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    files = sorted(p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kust["resources"]) == files and files


@pytest.mark.parametrize("sub", list(render_manifests.VARIANTS))
def test_kustomize_builds(sub):
    try:
        kubectl = ensure_tool("kubectl")
    except ToolUnavailable as e:
        pytest.skip(f"kubectl unavailable, `kubectl kustomize` not checked: {e}")
    r = subprocess.run([kubectl, "kustomize", str(render_manifests.MANIFESTS_DIR / sub)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert {d["kind"] for d in yaml.safe_load_all(r.stdout) if d} >= {"RayService", "StatefulSet", "Service"}


def test_split_by_template_groups_documents():
    text = ("---\n# Source: lessserve/templates/a.yaml\nkind: A\n---\n# Source: lessserve/templates/b.yaml\n"
            "kind: B\n---\n# Source: lessserve/templates/a.yaml\nkind: A2\n")
    assert render_manifests.split_by_template(text) == {"a.yaml": "---\nkind: A\n---\nkind: A2\n",
                                                        "b.yaml": "---\nkind: B\n"}


def test_command_line_entry_points(helm, monkeypatch, capsys):
    from lessserve.deploy import render

    monkeypatch.setenv("HELM", helm)
    assert render_manifests.main(["--check"]) == 0
    assert "in sync" in capsys.readouterr().out
    assert render.main(["-f", "values-cpu.yaml"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["applications"][0]["args"]["engine"]["device"] == "cpu"
