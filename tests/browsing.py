"""What the browser tests share: Debian's Chromium, a quiet local web server, the screenshots' folder."""
import contextlib
import functools
import http.server
import shutil
import threading
from pathlib import Path
from typing import Iterator

import pytest

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"  # screenshots

# Debian's chromium as the machine's probe ran it: no sandbox (root), no GPU, and no background
# connections, which this machine's closed network refuses.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_executable() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Chromium is not installed: `make browser` (or `apt-get install chromium`) "
                    "enables this test")
    return path


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """A web server for `folder` on a free localhost port, for the block; its base URL."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def open_local(context, base: str, path: str, wait_until: str = "load"):
    """A page showing base/path with every request not to base blocked and recorded: (page, blocked)."""
    page, blocked = context.new_page(), []

    def local_only(route):
        if route.request.url.startswith(base):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", local_only)
    page.goto(f"{base}/{path}", wait_until=wait_until)
    return page, blocked
