"""`make lab`: JupyterLab on the course's notebooks, wherever the user is.

JupyterLab refuses to start as root ("Running as root is not recommended. Use --allow-root"), which
is what a container or a cloud VM gives; on a machine without a display it tries to open a browser
that is not there and buries the address in its log. `main` adds `--allow-root` as root and
`--no-browser` without a display, each with a one-line note, starts JupyterLab with the terminal as
its own, and prints the address to open (with its token) on one line of its own once the server
answers: JupyterLab writes it to its runtime file `jpserver-<pid>.json`.

    python -m course_lib.lab [NOTEBOOK_DIR] [-- JUPYTERLAB ARGS ...]     # what `make lab` runs
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from .runtime import log

BANNER = "JupyterLab is running. Open this address in a browser:"


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def has_display() -> bool:
    """False on Linux without X11 or Wayland (a server, a container, an SSH session): no browser to open."""
    if not sys.platform.startswith("linux"):
        return True  # macOS and Windows always have a desktop to open a browser on
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def lab_command(notebook_dir: str, extra: Sequence[str] = ()) -> list[str]:
    """The jupyter lab command line for this user and machine (notes on stderr for what it adds)."""
    command = [sys.executable, "-m", "jupyterlab", notebook_dir, *extra]
    if is_root() and "--allow-root" not in extra:
        log("running as root (a container or a cloud VM?): starting JupyterLab with --allow-root")
        command.append("--allow-root")
    if not has_display() and "--no-browser" not in extra:
        log("no display here: JupyterLab opens no browser; the address to open follows")
        command.append("--no-browser")
    return command


def server_url(info_file: Path) -> str | None:
    """The lab's address with its token, from JupyterLab's runtime file, once it is written."""
    try:
        info = json.loads(info_file.read_text())
    except (OSError, ValueError):
        return None
    url = info.get("url", "").rstrip("/")
    token = info.get("token", "")
    return f"{url}/lab" + (f"?token={token}" if token else "") if url else None


def wait_for_url(process: subprocess.Popen, timeout_s: float = 120) -> str | None:
    from jupyter_core.paths import jupyter_runtime_dir

    info_file = Path(jupyter_runtime_dir()) / f"jpserver-{process.pid}.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        url = server_url(info_file)
        if url:
            return url
        time.sleep(0.2)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    extra = args[args.index("--") + 1:] if "--" in args else []
    positional = args[:args.index("--")] if "--" in args else args
    notebook_dir = positional[0] if positional else "notebooks"
    if not Path(notebook_dir).is_dir():
        log(f"notebook_dir must be a folder, got {notebook_dir!r} (run `make lab` in the course's folder)")
        return 2
    # Ctrl+C reaches JupyterLab too (same process group); it asks before it stops, and this
    # launcher waits for its answer. SIGTERM (a service manager, a test) is passed on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    process = subprocess.Popen(lab_command(notebook_dir, extra))
    signal.signal(signal.SIGTERM, lambda *_: process.terminate())
    url = wait_for_url(process)
    if url:
        print(f"\n{BANNER}\n\n    {url}\n\n(Ctrl+C twice stops it.)\n", flush=True)
    return process.wait()


if __name__ == "__main__":
    sys.exit(main())
