"""The OpenAI-compatible HTTP API, served by the daemon (Starlette on uvicorn, one listener
per host for all its models, routed by the request's `model`).

    GET  /health                 200 while the daemon is up and no model is only loading
                                 (the body names the models ready and loading)
    GET  /v1/models              the stored models
    POST /v1/chat/completions    chat; `stream: true` gives server-sent events ending in [DONE]
    POST /v1/completions         raw prompt completion; streams the same way
    GET  /metrics                Prometheus text: requests by status, tokens, TTFT, model loads

With an API key, every /v1 route wants `Authorization: Bearer <key>`; /health and /metrics
stay open for probes and scrapers. Modules: app.py (routes, errors), params.py (request
validation), stream.py (answers and event streams), metrics.py, host.py (which models are
loaded, and for how long), listener.py (socket and server thread).
"""

from sllmctl.daemon.http.app import make_app
from sllmctl.daemon.http.host import DEFAULT_KEEP_ALIVE, ModelHost
from sllmctl.daemon.http.listener import bind, serve_in_thread

__all__ = ["DEFAULT_KEEP_ALIVE", "ModelHost", "bind", "make_app", "serve_in_thread"]
