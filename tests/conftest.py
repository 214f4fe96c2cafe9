"""Shared fixtures: the real teacher, loaded once per test session from the offline cache."""
import pytest
import torch


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
