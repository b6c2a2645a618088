"""The ingress deployment: Kiln's own Starlette app, served by Serve's HTTP proxy, over a RayModelRegistry.

    app = build({"launch": [{"model_name": "sd-turbo"}], "cpus_per_replica": 0.5})   # a Serve application
    serve.run(app, name="kiln", route_prefix="/")

`build` is also the `import_path` of the config that `kiln ray-config` writes for `serve deploy` and KubeRay.
One ingress replica holds the progress table and the `url` image store (a local directory is enough); the
replicas report to it through `report`.
"""

from __future__ import annotations

from typing import Any, Mapping

from ray import serve

from kiln.server.app import Settings, create_app

from .front import ClusterSettings, RayModelRegistry
from .placement import ingress_options
from .replica import INGRESS_APP, INGRESS_DEPLOYMENT
from .serve_metrics import serve_metrics

assert INGRESS_DEPLOYMENT == ingress_options()["name"]


@serve.ingress()
class KilnIngress:
    """One Kiln front: the app, its registry, and the door replicas report through."""

    def __init__(self, settings: Settings, cluster: ClusterSettings):
        self.registry = RayModelRegistry(cluster, retry_after=settings.retry_after_seconds, limits=settings.limits)
        self.kiln_app = create_app(self.registry, settings=settings)
        self.kiln_app.state.extra_metrics.append(serve_metrics)

    def __serve_build_asgi_app__(self) -> Any:
        return self.kiln_app

    def report(self, report: dict) -> None:
        self.registry.receive(report)


def application(settings: Settings, cluster: ClusterSettings) -> Any:
    return serve.deployment(KilnIngress).options(**ingress_options()).bind(settings, cluster)


def build(args: Mapping[str, Any]) -> Any:
    """The Serve application from a config's `args`: `launch` (launch bodies started with the front),
    `cpus_per_replica`, `threads`."""
    settings = Settings(launch=tuple(args.get("launch", ())))
    cluster = ClusterSettings(float(args.get("cpus_per_replica", 1.0)), args.get("threads"))
    return application(settings, cluster)


__all__ = ["INGRESS_APP", "KilnIngress", "application", "build"]
