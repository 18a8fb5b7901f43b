"""No folder of ours shadows a third-party module, in any process started from the checkout root.

The source folders (`kernels/`, `errors/`, `cli/`, ...) install as `lessserve.<name>` and are not
regular packages under their bare names: a folder without `__init__.py` is at most a namespace
portion, which Python uses only when no module of that name exists anywhere on `sys.path`. So
`import kernels` finds Hugging Face's `kernels` even with the checkout root first on `sys.path`
(pytest's `pythonpath`, `python -m` from the root, the working directory Ray adds to every worker's
path). transformers >= 5.25 imports that `kernels` from `transformers.integrations.hub_kernels`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.test_layering import ROOT, source_folders

LOAD_TOKENIZER = """
import transformers.integrations.hub_kernels  # imports `kernels` when its distribution is installed
from lessserve.workers.model_loader import load_tokenizer, resolve_model_folder
tok = load_tokenizer(resolve_model_folder("smollm2-135m-instruct")[1])
"""


def run_from_root(code: str, timeout: int = 300) -> str:
    """Run `code` in a new interpreter whose working directory and first `sys.path` entry are the root."""
    prelude = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
    out = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_no_source_folder_is_a_regular_package():
    regular = sorted(f for f in source_folders() if (ROOT / f / "__init__.py").exists())
    assert not regular, f"{regular} would shadow a third-party module of the same name from the checkout root"
    assert (ROOT / "tests" / "__init__.py").is_file(), "tests/ must win over a third-party `tests` package"


def test_a_third_party_module_wins_over_every_folder_of_ours(tmp_path):
    """A regular package named like each folder of ours, on sys.path after the root, is the one imported."""
    site = tmp_path / "site"
    names = sorted(source_folders())
    for name in names:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("THIRD_PARTY = True\n")
    got = run_from_root(f"""
        import importlib, json
        sys.path.insert(1, {str(site)!r})
        print(json.dumps({{n: getattr(importlib.import_module(n), "THIRD_PARTY", False) for n in {names!r}}}))
    """)
    assert json.loads(got) == {n: True for n in names}


def test_hub_kernels_and_a_tokenizer_load_from_the_checkout_root():
    got = run_from_root(LOAD_TOKENIZER + """
import importlib.util, json
spec = importlib.util.find_spec("kernels")
print(json.dumps({"kernels": spec.origin if spec else None, "ids": tok("hello world")["input_ids"]}))
""")
    out = json.loads(got)
    assert out["ids"], out
    assert out["kernels"] is None or not out["kernels"].startswith(str(ROOT / "kernels")), out


def test_hub_kernels_and_a_tokenizer_load_in_a_ray_worker_started_from_the_root():
    """A real Ray worker: the driver runs in the checkout root, which Ray puts on the worker's sys.path."""
    pytest.importorskip("ray")
    got = run_from_root("""
        import json, os, ray
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")

        @ray.remote(num_cpus=0.5)
        def probe():
            import importlib.util, os, sys
    """ + textwrap.indent(LOAD_TOKENIZER, " " * 12) + """
            spec = importlib.util.find_spec("kernels")
            return {"path": sys.path, "kernels": spec.origin if spec else None,
                    "ids": tok("hello world")["input_ids"]}

        try:
            print(json.dumps(ray.get(probe.remote(), timeout=240)))
        finally:
            ray.shutdown()
    """, timeout=400)
    out = json.loads(got)
    assert str(ROOT) in out["path"], "the worker no longer has the root on sys.path: this test proves nothing"
    assert out["ids"], out
    assert out["kernels"] is None or not out["kernels"].startswith(str(ROOT / "kernels")), out


@pytest.fixture
def tiny_hf_folder(tmp_path):
    """A tiny random Llama saved by transformers itself."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    return tmp_path


def test_transformers_models_load_without_hub_kernels(tiny_hf_folder):
    """Hub kernels (on by default in transformers >= 5.25) would replace the reference's layers with code
    fetched from the hub at run time: every transformers model we load has them off."""
    from lessserve.workers.model_loader import transformers_model

    model = transformers_model(tiny_hf_folder)
    assert model.use_kernels is False
