"""Run a service app under uvicorn: in the foreground (the CLI) or in a background thread."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Seconds an idle keep-alive connection is held open.
KEEP_ALIVE_S = 5


def serve(app: FastAPI, host: str = LOOPBACK, port: int = 8000) -> None:
    """Serve `app` until interrupted (Ctrl-C)."""
    uvicorn.run(app, host=host, port=port, timeout_keep_alive=KEEP_ALIVE_S, log_level="info")


@contextmanager
def background_server(
    app: FastAPI, host: str = LOOPBACK, port: int = 0, start_timeout_s: float = 30.0
) -> Iterator[str]:
    """Serve `app` from a thread for the duration of the block; yields the base URL.

    Args:
        app: the app to serve.
        host: address to bind (loopback by default).
        port: port to bind; 0 picks a free one (bound here, so no other process can take it
            between choosing and serving).
        start_timeout_s: how long to wait for uvicorn to start before giving up.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(app, timeout_keep_alive=KEEP_ALIVE_S, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="cxrfusion-server", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=start_timeout_s)
        sock.close()
