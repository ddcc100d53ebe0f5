"""Running the app with uvicorn: in the foreground (the CLI) or in a background thread (tests, benchmarks)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from .service import InferenceService, ServeSettings


def _server(settings: ServeSettings, service: InferenceService, port: int, log_level: str):
    import uvicorn

    from .app import create_app

    # timeout_graceful_shutdown=None: on SIGTERM uvicorn stops accepting and waits for in-flight requests; then the
    # app's shutdown drains the service queue.
    config = uvicorn.Config(create_app(settings, service), host=settings.host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=None)
    return uvicorn.Server(config)


def check_port_free(host: str, port: int) -> None:
    """Raise a ``ValueError`` naming the address if ``host:port`` cannot be bound now (in use, not an address of
    this machine, privileged): checked before the model loads, so a bad address costs no load."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # the family uvicorn binds with
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            sock.bind((host, port))
    except OSError as exc:
        raise ValueError(f"Cannot listen on {host}:{port} ({exc.strerror or exc}): choose another --port or "
                         "--host") from None


def run_server(settings: ServeSettings, service: InferenceService, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's signal handling: in-flight requests finish)."""
    _server(settings, service, settings.port, log_level).run()


@contextlib.contextmanager
def background_server(settings: ServeSettings, service: InferenceService, port: int = 0,
                      log_level: str = "warning", start_timeout: float = 60.0) -> Iterator[str]:
    """Serve in a daemon thread on ``settings.host`` (port 0: a free port); yields the base URL, stops on exit."""
    server = _server(settings, service, port, log_level)
    thread = threading.Thread(target=server.run, name="bayeslora-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("The HTTP server did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{settings.host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(start_timeout)
