"""Shared fixtures: the real teacher, loaded once per test session from the offline cache; Debian's
Chromium driven by Playwright (tests/test_browser.py, tests/test_book.py)."""
import pytest
import torch

from browsing import CHROMIUM_FLAGS, chromium_executable


@pytest.fixture(scope="session")
def teacher():
    """(model, tokenizer) of SmolLM2-135M-Instruct on the CPU, float32, eval mode."""
    from course_lib.models import load_teacher

    torch.manual_seed(0)
    return load_teacher(device="cpu")


@pytest.fixture
def one_thread():
    """Run a test on one thread (quantization kernels compared bit for bit), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    """A Playwright context in Debian's Chromium with a new, empty profile folder."""
    executable = chromium_executable()
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed: `pip install -e '.[test]'` installs it")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=executable, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1280, "height": 900})
        context.set_default_timeout(60_000)
        yield context
        context.close()
