"""Ray Serve deployment of the same FastAPI app (``pip install 'mmfs_fast[ray]'``).

Each replica is one Ray actor holding one GPU (``num_gpus=1``) and runs the app of
:func:`mmfs_fast.serve.create_app`; the app is built on the replica (``serve.ingress``
with a builder), so the engine loads there, on that replica's GPU, in the app's
startup. Micro-batching happens inside each replica's engine.

Autoscaling: Ray Serve adds replicas when the requests queued or running per replica
stay above ``target_ongoing_requests`` and removes them when below, between
``min_replicas`` and ``max_replicas`` (at most one per GPU of the cluster). Defaults
here: 1 to 4 replicas, target 16 ongoing requests per replica (about half of the
engine's largest batch bucket, so replicas batch well without long queues), and
``max_ongoing_requests`` 64 per replica, above which Ray queues at the proxy. Scale-up
waits 10 s of sustained load, scale-down 60 s (a new replica pays model loading and
CUDA-graph capture). Override any of them with ``autoscaling_config``.

    from ray import serve
    from mmfs_fast.serve.ray import build_app

    serve.run(build_app("mmfs_phase3.pt", clip_weights="ViT-B-32.pt"), route_prefix="/")
"""
from __future__ import annotations

from mmfs_fast.serve.app import ServeSettings, create_app
from mmfs_fast.serve.server import load_engine

DEFAULT_AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 4,
    "target_ongoing_requests": 16,
    "upscale_delay_s": 10,
    "downscale_delay_s": 60,
}
MAX_ONGOING_REQUESTS = 64


def build_app(ckpt=None, clip_weights=None, *, settings: ServeSettings = ServeSettings(), num_gpus: float = 1,
              autoscaling_config: dict | None = None, name: str = "mmfs_fast", **load_options):
    """A bound Ray Serve application; ``load_options`` go to
    :func:`mmfs_fast.serve.load_engine` (random_init, precision, max_batch, max_wait_ms, …)."""
    from ray import serve

    def build_asgi_app():
        return create_app(lambda: load_engine(ckpt, clip_weights, **load_options), settings)

    @serve.deployment(name=name, ray_actor_options={"num_gpus": num_gpus},
                      autoscaling_config={**DEFAULT_AUTOSCALING, **(autoscaling_config or {})},
                      max_ongoing_requests=MAX_ONGOING_REQUESTS)
    @serve.ingress(build_asgi_app)
    class StylizationService:
        """The replica: everything is in the ingress app."""

    return StylizationService.bind()
