"""Run the app under uvicorn until Ctrl-C (or SIGTERM); the scheduler stops with the app."""

from __future__ import annotations

import sys
from typing import Optional

from .app import create_app


def serve(model, *, host: str = "127.0.0.1", port: int = 8000, model_id: Optional[str] = None,
          api_key: Optional[str] = None, max_sessions: int = 4, kv_budget_mb: Optional[float] = None,
          log_level: str = "warning") -> None:
    import uvicorn

    app = create_app(model, model_id=model_id, api_key=api_key, max_sessions=max_sessions,
                     kv_budget_mb=kv_budget_mb)
    # open streams get 5 s to finish on Ctrl-C; then they are cut and the scheduler stops
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    print(f"edgekv: serving {app.state.edgekv.model_id!r} at http://{shown}:{port}/v1 "
          f"(OpenAI API; Ctrl-C stops)", file=sys.stderr, flush=True)
    server.run()  # uvicorn handles SIGINT/SIGTERM: finishes open responses, runs the lifespan's shutdown
