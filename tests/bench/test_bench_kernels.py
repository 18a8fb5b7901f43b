"""`lessserve bench kernels` runs anywhere; without a GPU it times the torch path and says so."""

from __future__ import annotations

import json

import pytest
import torch


def test_bench_kernels_cli(tmp_path, capsys):
    from lessserve.cli.main import main

    out = tmp_path / "k.json"
    rc = main(["bench", "kernels", "--models", "smollm2-135m", "--batches", "2", "--budgets", "32",
               "--iters", "2", "--warmup", "1", "--json", str(out)])
    assert rc in (0, None)
    rows = json.loads(out.read_text())
    assert {r["kernel"] for r in rows} == {"decode", "chunk", "evict", "step", "pack"}
    text = capsys.readouterr().out
    assert "| kernel |" in text
    if not torch.cuda.is_available():
        assert "NO CUDA GPU" in text and all(r["triton_us"] == "not measured (no GPU)" for r in rows)
    else:
        assert all(isinstance(r["triton_us"], float) for r in rows)


def test_bench_kernels_rejects_unknown_kernel(capsys):
    from lessserve.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "kernels", "--kernels", "decode,warp"])
    assert e.value.code == 2
    assert "--kernels" in capsys.readouterr().err
