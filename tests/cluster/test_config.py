"""One config for `lessserve serve --config`, `serve run` and `serve deploy` (no cluster needed)."""

import pytest
import yaml
from pydantic import ValidationError

from lessserve.cli.main import main
from lessserve.cluster.config import IMPORT_PATH, ServeConfig, load_config, serve_config_document


def test_serve_config_document_round_trips_and_validates(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    cfg = load_config(overrides={"engine.policy": "lambda", "engine.budget": 64, "workers.max_workers": 3,
                                 "store.redis_url": "redis://127.0.0.1:6390/0"})
    doc = serve_config_document(cfg)
    ServeDeploySchema.model_validate(doc)  # what `serve deploy` / a RayService accepts
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(doc))
    back = load_config(path, env={})
    assert back.engine.policy == "lambda" and back.engine.budget == 64 and back.workers.max_workers == 3
    assert back.store.redis_url == "redis://127.0.0.1:6390/0"
    module, attr = IMPORT_PATH.split(":")
    assert callable(getattr(__import__(module, fromlist=[attr]), attr))


def test_precedence_file_then_env_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"engine": {"policy": "h2o", "budget": 96}, "port": 9001}))
    cfg = load_config(path, overrides={"port": 9002}, env={"LESSSERVE_BUDGET": "80", "LESSSERVE_POLICY": "lambda"})
    assert (cfg.engine.policy, cfg.engine.budget, cfg.port) == ("lambda", 80, 9002)


@pytest.mark.parametrize("bad", [{"workers": {"min_workers": 3, "max_workers": 1}}, {"port": 0},
                                 {"engine": {"policy": "nope"}}, {"unknown_field": 1}])
def test_invalid_config_is_refused(bad):
    with pytest.raises(ValidationError):
        ServeConfig.model_validate(bad)


@pytest.mark.parametrize("argv,flag", [(["serve", "--config", "/no/such.yaml"], "--config"),
                                       (["serve", "--workers", "0", "--max-workers", "0"], "--max-workers"),
                                       (["serve", "--policy", "zzz"], "--policy"),
                                       (["serve", "--port", "70000"], "--port")])
def test_serve_flag_errors_exit_2(argv, flag, capsys):
    with pytest.raises(SystemExit) as ex:
        main(argv)
    assert ex.value.code == 2 and flag in capsys.readouterr().err


def _bound_config(app) -> dict:
    """The ServeConfig mapping a built application hands its router (what the workers get too)."""
    return app._bound_deployment.init_args[1]


def test_cli_precedence_defaults_yaml_env_flags_resolved_once(tmp_path, monkeypatch):
    """`lessserve serve`: defaults < YAML (--config) < LESSSERVE_* env < flags, and the application
    is built from that one result (the env is not applied again over the flags)."""
    from lessserve.cli.main import build_parser
    from lessserve.cli.serve import config_from_args
    from lessserve.cluster.app import app_from_config, build_app

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"engine": {"budget": 32, "policy": "lambda", "max_slots": 3}, "port": 9001}))
    monkeypatch.setenv("LESSSERVE_BUDGET", "64")
    monkeypatch.setenv("LESSSERVE_ENGINE__RECENT", "16")

    def resolved(*flags):
        return config_from_args(build_parser().parse_args(["serve", "--config", str(path), *flags]))

    cfg = resolved("--budget", "128", "--port", "9002")
    e = cfg.engine
    assert (e.budget, e.recent, e.policy, e.max_slots, cfg.port) == (128, 16, "lambda", 3, 9002)  # flag, env, YAML
    assert e.sink == 4 and cfg.host == "127.0.0.1"  # defaults
    assert resolved().engine.budget == 64  # env over YAML
    monkeypatch.delenv("LESSSERVE_BUDGET")
    assert resolved().engine.budget == 32  # YAML over the default
    monkeypatch.setenv("LESSSERVE_BUDGET", "64")
    bound = _bound_config(app_from_config(cfg))
    assert bound["engine"]["budget"] == 128 and bound["engine"]["recent"] == 16
    # the Serve import path keeps its env layer over its args (secrets live in the environment)
    assert _bound_config(build_app(cfg.model_dump(mode="json")))["engine"]["budget"] == 64
