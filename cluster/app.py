"""The Ray Serve application: a stateless router deployment in front of session-affine workers.

`build_app(args)` is the import path for `serve run` / `serve deploy` / a RayService
(`lessserve.cluster.app:build_app`); `args` is a ServeConfig mapping. The router's HTTP app is
built in cluster/router.py over the deps cluster/backend.py makes from Serve handles.
"""

from ray import serve
from ray.serve.config import RequestRouterConfig

from lessserve.cluster.backend import cluster_deps
from lessserve.cluster.config import ServeConfig, load_config
from lessserve.cluster.router import build_router_app
from lessserve.cluster.worker import LessWorker


@serve.deployment(name="Router")
@serve.ingress()
class Router:
    """The ingress: one FastAPI app per replica, built after the constructor (Serve calls
    `__serve_build_asgi_app__`) from the config and the deps over the worker deployment's handle."""

    def __init__(self, worker, config: dict):
        self.cfg = ServeConfig.model_validate(config)
        self.deps = cluster_deps(self.cfg, worker)

    def __serve_build_asgi_app__(self):
        return build_router_app(self.cfg, self.deps)


def worker_deployment(cfg: ServeConfig):
    w = cfg.workers
    gpus = cfg.worker_num_gpus
    if gpus is None:
        import ray

        gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return serve.deployment(LessWorker, name="LessWorker").options(
        autoscaling_config={
            "min_replicas": w.min_workers, "max_replicas": w.max_workers,
            "initial_replicas": w.initial_workers if w.initial_workers is not None else w.min_workers,
            "target_ongoing_requests": w.target_ongoing_requests,
            "upscale_delay_s": w.upscale_delay_s, "downscale_delay_s": w.downscale_delay_s,
        },
        ray_actor_options={"num_cpus": cfg.worker_num_cpus, "num_gpus": gpus,
                           **({"resources": cfg.worker_resources} if cfg.worker_resources else {})},
        max_ongoing_requests=cfg.max_ongoing_per_worker,
        graceful_shutdown_timeout_s=cfg.drain_timeout_s + 10,
        request_router_config=RequestRouterConfig(
            request_router_class="lessserve.cluster.routing:SessionAffinityRouter",
            request_router_kwargs={"store": cfg.store.model_dump(mode="json")},
        ),
    )


def app_from_config(cfg: ServeConfig):
    """The application of an already-resolved config, taken as it is (`lessserve serve` resolved
    defaults < YAML < env < flags once: no source is applied again here)."""
    # Replicas get the config without the scaling block: changing worker counts or autoscaling
    # is then a lightweight update that keeps running workers and their sessions.
    cfg_dict = cfg.model_dump(mode="json", exclude={"workers"})
    worker = worker_deployment(cfg).bind(cfg_dict)
    return Router.options(num_replicas=cfg.router_replicas, max_ongoing_requests=cfg.router_max_ongoing_requests,
                          max_queued_requests=cfg.router_max_queued_requests,
                          ray_actor_options={"num_cpus": cfg.router_num_cpus,
                                             **({"resources": cfg.router_resources} if cfg.router_resources else {})},
                          ).bind(worker, cfg_dict)


def build_app(args: dict | None = None):
    """Serve import path target (`serve run` / `serve deploy` / a RayService): `args` is a
    ServeConfig mapping and LESSSERVE_* env applies on top of it, so a deployment can keep secrets
    such as a Redis URL with a password in a Secret rather than in its Serve config."""
    return app_from_config(load_config(base=args))
