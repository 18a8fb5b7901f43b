"""`lessserve serve` start-up: one config resolution (defaults < YAML < env < flags) down to the
worker's engine, pre-flight checks that fail in seconds with one line naming the flag (exit 2, no
Ray), a replica's own error in one line instead of Ray's deploy traceback, and open mode said out
loud. Real CLI subprocesses where it matters; traffic only to 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from lessserve.cli import preflight
from lessserve.cli.main import main
from lessserve.cluster.config import ServeConfig
from lessserve.cluster.launch import replica_error
from lessserve.testing.local_redis import free_port
from tests.cli.servers import MODEL, Server

LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128}
CORRUPT = b"\xff" * 64  # a safetensors header length no file has


def model_folder(path, config: dict, weights: bytes = CORRUPT):
    """A folder resolve_model_folder takes as is: config.json plus a (here: not loadable) safetensors."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(weights)
    return str(path)


def cli(*argv: str, timeout: float = 120, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "", **(env or {})}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "lessserve.cli.main", "serve", *argv], capture_output=True,
                       text=True, timeout=timeout, env=env)
    return r, time.monotonic() - t0


@pytest.fixture
def no_ray(monkeypatch):
    """In-process `serve` runs: starting Ray would mean a pre-flight check let a bad value through."""
    from lessserve.cluster import launch

    def started(*_a, **_k):
        raise AssertionError("pre-flight passed: Ray was about to start")

    monkeypatch.setattr(launch, "start", started)
    monkeypatch.setenv("RAY_ADDRESS", "")
    for var in [v for v in os.environ if v.startswith("LESSSERVE_") and v != "LESSSERVE_CACHE"]:
        monkeypatch.delenv(var)


@pytest.fixture
def listening():
    """A port another process (here: this one) listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def preflight_cases(tmp_path, busy_port: int) -> dict[str, tuple[list[str], str]]:
    """case -> (argv after `serve`, the flag the one line must name)."""
    port = ["--port", str(free_port())]
    gpt2 = model_folder(tmp_path / "gpt2", {"architectures": ["GPT2LMHeadModel"]})
    return {
        "unsupported architecture": (["--model", gpt2, *port], "--model"),
        "missing model": (["--model", str(tmp_path / "no-such-model"), *port], "--model"),
        "no LESS weights": (["--model", model_folder(tmp_path / "unshipped-llama", LLAMA), "--policy", "h2o+less",
                             "--budget", "96", *port], "--policy"),
        "bad Redis URL": (["--redis-url", "notaurl", *port], "--redis-url"),
        "occupied port": (["--port", str(busy_port)], "--port"),
    }


CASES = ["unsupported architecture", "missing model", "no LESS weights", "bad Redis URL", "occupied port"]


@pytest.mark.parametrize("case", CASES)
def test_preflight_failure_is_one_line_naming_the_flag_exit_2_before_ray(case, tmp_path, listening, no_ray, capsys):
    argv, flag = preflight_cases(tmp_path, listening)[case]
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as ex:
        main(["serve", *argv])
    took = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert ex.value.code == 2, err
    assert len(err) == 1 and err[0].startswith(f"lessserve serve: error: {flag}: "), err
    assert "Traceback" not in err[0] and took < 30, (err, took)


@pytest.mark.parametrize("case", ["unsupported architecture", "occupied port"])
def test_preflight_failure_through_the_console_script(case, tmp_path, listening):
    argv, flag = preflight_cases(tmp_path, listening)[case]
    r, took = cli(*argv)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"lessserve serve: error: {flag}: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout and "Ray" not in r.stderr and took < 30, (r.stderr, took)


def test_cuda_device_without_cuda_names_the_field(no_ray, capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("engine: {device: cuda}\n")
    with pytest.raises(SystemExit) as ex:
        main(["serve", "--config", str(cfg), "--port", str(free_port())])
    err = capsys.readouterr().err.strip().splitlines()
    assert ex.value.code == 2 and len(err) == 1 and "engine.device: 'cuda': no CUDA device" in err[0], err


def test_replica_error_line_is_the_last_exception_of_rays_message():
    ray_message = (  # what Serve 2.60 puts in a failed deployment's status (shortened)
        "The deployment failed to start 3 times in a row. This may be due to a problem with its constructor or "
        "initial health check failing. See controller logs for details. Error:\n"
        "\x1b[36mray::ServeReplica:lessserve:LessWorker.initialize_and_get_metadata()\x1b[39m (pid=1, ip=10.0.0.1)\n"
        '  File "ray/serve/_private/replica.py", line 1928, in initialize\n'
        "    raise RuntimeError(traceback.format_exc()) from None\n"
        "RuntimeError: Traceback (most recent call last):\n"
        '  File "workers/model_loader.py", line 172, in load_checkpoint\n'
        "    state.update(load_file(str(f)))\n"
        "safetensors._safetensors_rust.SafetensorError: Error while deserializing header: header too large\n")
    assert replica_error(["", ray_message]) == "SafetensorError: Error while deserializing header: header too large"
    assert replica_error(["Failed to update the deployments"]) is None


def test_replica_failure_is_one_line_with_the_replicas_error(tmp_path):
    """Weights that pass pre-flight (it reads config.json, not the tensors) but that the worker's
    engine cannot load: the failure exists only inside the replica."""
    folder = model_folder(tmp_path / "corrupt-llama", LLAMA)
    server = Server(free_port(), None, tmp_path / "replica.log", engine={"model": folder, "max_slots": 2})
    r, took = cli("--config", str(server.config), timeout=300)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("lessserve serve: error:")]
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    assert len(errors) == 1 and "LessWorker" in errors[0], r.stderr
    assert "ModelNotFoundError: model.safetensors is not a safetensors file" in errors[0], errors
    assert "Traceback" not in r.stderr + r.stdout and "Deploying application" not in r.stderr, r.stderr
    print(f"\nreplica failure reported in {took:.0f} s: {errors[0]}")


def test_env_does_not_override_the_flag_down_to_the_workers_engine(tmp_path):
    """YAML budget 32 < LESSSERVE_BUDGET=64 < --budget 128: the session's cache holds 128 tokens."""
    server = Server(free_port(), None, tmp_path / "budget.log", engine={"budget": 32, "max_slots": 2})
    server.start(flags=("--budget", "128"), env={"LESSSERVE_BUDGET": "64"})
    try:
        prompt = " ".join(f"item {i} is a {['red', 'green', 'blue'][i % 3]} stone;" for i in range(60))
        r = httpx.post(server.url + "/v1/chat/completions", headers={"X-Session-Id": "budget-1"}, timeout=180,
                       json={"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 2})
        assert r.status_code == 200, r.text
        info = httpx.get(server.url + "/v1/sessions/budget-1", timeout=30).json()
    finally:
        server.stop()
    assert info["tokens_seen"] > 200, info
    assert info["cached_tokens"] == 128, info  # 64 if the env had been applied over the flag, 32 the YAML
    log = server.log.read_text()
    assert "budget 128" in log and "no API keys: open mode" in log, log[-2000:]


# --- open mode (C) ---------------------------------------------------------------------------
def test_open_mode_warning_on_loopback_is_one_line(monkeypatch):
    monkeypatch.delenv("LESSSERVE_API_KEYS", raising=False)
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        w = preflight.open_mode_warning(ServeConfig(host=host))
        assert w and len(w.splitlines()) == 1 and "no API keys: open mode" in w and "anyone who can reach" in w, w


def test_open_mode_warning_on_a_network_address_is_a_banner(monkeypatch):
    monkeypatch.delenv("LESSSERVE_API_KEYS", raising=False)
    for host in ("0.0.0.0", "::", "192.0.2.7", "myhost.example"):
        w = preflight.open_mode_warning(ServeConfig(host=host))
        assert "WARNING: OPEN MODE ON A NETWORK ADDRESS" in w and len(w.splitlines()) >= 4, w
        assert "every endpoint" in w and "--api-keys-file" in w


def test_no_open_mode_warning_with_keys(monkeypatch, tmp_path):
    monkeypatch.delenv("LESSSERVE_API_KEYS", raising=False)
    keys = tmp_path / "keys"
    keys.write_text("k1\n")
    assert preflight.open_mode_warning(ServeConfig(host="0.0.0.0", api_keys_file=str(keys))) is None
    assert preflight.open_mode_warning(ServeConfig(api_keys=["k"])) is None
    monkeypatch.setenv("LESSSERVE_API_KEYS", "k2")
    assert preflight.open_mode_warning(ServeConfig(host="0.0.0.0")) is None


def test_unreachable_redis_is_only_a_warning():
    url = f"redis://127.0.0.1:{free_port()}/0"
    preflight.check_redis_url(url)  # parses: no error
    w = preflight.redis_warning(url, timeout_s=1)
    assert w and "--redis-url" in w and "degraded" in w and len(w.splitlines()) == 1, w


START_FAILS_HALF_WAY = """
import ray
from ray import serve
from lessserve.cluster import launch
from lessserve.cluster.config import load_config

def killed(*args, **kwargs):
    raise ray.exceptions.RayError("the proxy actor was killed while starting")

serve.start = killed
try:
    launch.start(load_config(overrides={"port": %d}), num_cpus=1)
except ray.exceptions.RayError as e:
    print("raised:", e)
print("ray still up:", ray.is_initialized())
"""


def test_a_start_that_fails_half_way_takes_ray_down_with_it():
    """Serve failing after ray.init (on a loaded machine a proxy actor was killed while starting) must
    not leave Ray running in the caller: a later start in the same process (the test suite's next
    cluster, a soak's retry) would otherwise fail with "ray.init twice"."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    r = subprocess.run([sys.executable, "-c", START_FAILS_HALF_WAY % free_port()], capture_output=True, text=True,
                       timeout=300, env=env)
    assert "raised: the proxy actor was killed while starting" in r.stdout, (r.stdout[-2000:], r.stderr[-2000:])
    assert "ray still up: False" in r.stdout, r.stdout[-2000:]
