"""Shared fixtures: a loopback HTTP server that serves a temporary folder."""
import functools
import http.server
import threading

import pytest


@pytest.fixture
def serve_dir(tmp_path):
    """Yields (folder, base_url): files put in folder are served on 127.0.0.1."""
    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
