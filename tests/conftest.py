"""Shared fixtures: the real teacher, loaded once per test session from the offline cache."""
import pytest
import torch


@pytest.fixture(scope="session")
def teacher():
    """(model, tokenizer) of SmolLM2-135M-Instruct on the CPU, float32, eval mode."""
    from course_lib.models import load_teacher

    torch.manual_seed(0)
    return load_teacher(device="cpu")
