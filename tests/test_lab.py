"""`make lab`, the README's main command, run exactly as a user runs it: from the repository's root,
here without a display (and, on this machine, as root). It must start JupyterLab, print the address
to open, and serve the lab page at it; the test then stops the whole process group (make, the
launcher, JupyterLab) and checks that nothing of it is left.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from course_lib import lab

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 600  # `make lab` first sets up whatever is missing (a fresh clone: the virtual environment)
URL = re.compile(r"\s+(http://\S+/lab\?token=\w+)\s")


def printed_url(output: str) -> str | None:
    """The address the launcher prints on its own line after its banner (JupyterLab's log has others)."""
    if lab.BANNER not in output:
        return None
    match = URL.match(output.split(lab.BANNER, 1)[1])
    return match.group(1) if match else None


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group (SIGKILL after 30 s), then check that no process of it is left."""
    group = os.getpgid(process.pid)
    os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        process.poll()  # reap make, our child (a zombie still counts as a member of the group)
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(group, signal.SIGKILL)
        pytest.fail("`make lab` did not stop within 30 s of SIGTERM")


def test_make_lab_starts_and_serves_the_lab_page(tmp_path):
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("no .venv in the repository: `make test` (or `make lab`) creates it")
    env = {k: v for k, v in os.environ.items() if k not in {"DISPLAY", "WAYLAND_DISPLAY"}}
    # the test's own Jupyter settings and runtime files, not the user's
    env.update(JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"))
    process = subprocess.Popen(["make", "lab"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline, url = time.monotonic() + START_TIMEOUT_S, None
        while url is None and time.monotonic() < deadline and process.poll() is None:
            url = printed_url("".join(lines))
            time.sleep(0.2)
        log = "".join(lines)[-4000:]
        assert url, f"`make lab` printed no address to open within {START_TIMEOUT_S} s:\n{log}"
        with urllib.request.urlopen(url, timeout=30) as response:
            page = response.read().decode()
            assert response.status == 200
        with urllib.request.urlopen(url.replace("/lab?", "/api/status?"), timeout=30) as response:
            assert response.status == 200
    finally:
        stop_group(process)
        reader.join(timeout=10)
    assert "<title>JupyterLab</title>" in page and "jupyter-config-data" in page, page[:500]
    out = "".join(lines)
    assert "no display here" in out, "headless: the launcher says it opens no browser"
    if lab.is_root():
        assert "--allow-root" in out, "as root the launcher says it adds --allow-root"
    assert "Running as root is not recommended" not in out


def test_lab_command_adds_what_the_machine_needs(monkeypatch):
    monkeypatch.setattr(lab, "is_root", lambda: True)
    monkeypatch.setattr(lab, "has_display", lambda: False)
    command = lab.lab_command("notebooks")
    assert command[-2:] == ["--allow-root", "--no-browser"] and "notebooks" in command
    monkeypatch.setattr(lab, "is_root", lambda: False)
    monkeypatch.setattr(lab, "has_display", lambda: True)
    assert lab.lab_command("notebooks", ["--port=9999"])[-2:] == ["notebooks", "--port=9999"]


def test_server_url_reads_jupyterlabs_runtime_file(tmp_path):
    info = tmp_path / "jpserver-1.json"
    assert lab.server_url(info) is None
    info.write_text('{"url": "http://localhost:8890/", "token": "abc"}')
    assert lab.server_url(info) == "http://localhost:8890/lab?token=abc"


def test_has_display_follows_the_environment(monkeypatch):
    monkeypatch.setattr(lab.sys, "platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert not lab.has_display()
    monkeypatch.setenv("DISPLAY", ":0")
    assert lab.has_display()
