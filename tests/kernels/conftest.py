"""Kernel tests: Triton kernels against their torch references.

Without CUDA the kernels run under Triton's CPU interpreter, which must be switched on before
triton (and any @triton.jit module) is imported, hence the environment is set here, first.
"""

from __future__ import annotations

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (atol, rtol) per dtype: attention outputs (cast to the input dtype), and fp32 attention mass.
OUT_TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
MASS_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-4, 1e-4), torch.bfloat16: (1e-4, 1e-4)}
STATE_TOL = (1e-5, 1e-5)  # LESS H / z after absorb (fp32 sums in a different order)


def close(got: torch.Tensor, want: torch.Tensor, tol: tuple[float, float], what: str) -> float:
    """Assert allclose (NaN anywhere fails) and return the max abs error for reporting."""
    atol, rtol = tol
    g, w = got.float().cpu(), want.float().cpu()
    assert torch.isfinite(g).all(), f"{what}: non-finite values (unwritten / poisoned elements?)"
    err = (g - w).abs()
    bad = err > atol + rtol * w.abs()
    assert not bad.any(), f"{what}: max abs err {float(err.max()):.3g} at {bad.nonzero()[0].tolist()}"
    return float(err.max()) if err.numel() else 0.0


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def seed_of(nodeid: str) -> int:
    """The seed a kernel test draws its random inputs with: crc32 of its test id."""
    return zlib.crc32(nodeid.encode())


@pytest.fixture(autouse=True)
def _seeded(request):
    """Every random case is seeded from its own test id (so a failure reproduces exactly, alone or in
    any run order); the seed is printed in the failure report."""
    seed = seed_of(request.node.nodeid)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        report.sections.append(("seed", f"random inputs seeded with torch.manual_seed({seed_of(item.nodeid)}) "
                                        f"(crc32 of {item.nodeid!r})"))
