"""`gemmalab serve`: an OpenAI-compatible HTTP server with continuous batching.

    from gemmalab.serve import serve
    serve(gemmalab.load(), host="127.0.0.1", port=8000)

Needs the `serve` extra: pip install "gemmalab[serve]" (FastAPI + uvicorn).
"""
from __future__ import annotations

import logging
import sys


def _require_deps() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"gemmalab serve needs FastAPI and uvicorn ({e.name} is missing): "
                          "pip install 'gemmalab[serve]'") from None


def build(lm, *, model_name: str | None = None, api_key: str | None = None, max_batch: int = 16,
          max_queue: int = 256, max_context: int | None = None, max_body_bytes: int = 1 << 20,
          request_timeout: float = 600.0, default_max_tokens: int = 1024):
    """(ASGI app, engine) for a loaded LM; the caller runs the app and closes the engine."""
    _require_deps()
    from .app import Guard, Settings, create_app
    from .engine import Engine
    engine = Engine(lm, max_batch=max_batch, max_queue=max_queue, max_context=max_context)
    name = model_name or (lm.path.stem if lm.path else "gemma")
    settings = Settings(model_name=name, api_key=api_key, max_body_bytes=max_body_bytes,
                        request_timeout=request_timeout, default_max_tokens=default_max_tokens)
    return Guard(create_app(engine, settings), settings), engine


def serve(lm, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **options) -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests finish or are cancelled cleanly."""
    import uvicorn
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app, engine = build(lm, **options)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10,
                    access_log=False)
    finally:
        engine.close()
