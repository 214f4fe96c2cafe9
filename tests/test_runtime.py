import pytest
import torch

from course_lib import runtime


def test_profile_defaults_to_laptop_without_cuda(monkeypatch):
    monkeypatch.delenv("COURSE_PROFILE", raising=False)
    expected = "gpu" if torch.cuda.is_available() else "laptop"
    assert runtime.profile().name == expected


@pytest.mark.parametrize("name", runtime.PROFILES)
def test_profile_by_environment(monkeypatch, name):
    monkeypatch.setenv("COURSE_PROFILE", name.upper())
    assert runtime.profile().name == name


def test_unknown_profile_lists_the_valid_ones(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "fast")
    with pytest.raises(ValueError) as error:
        runtime.profile()
    for name in runtime.PROFILES:
        assert name in str(error.value)
    assert "'fast'" in str(error.value)


def test_every_profile_has_the_same_sections_and_settings():
    shapes = {name: {s: set(v) for s, v in runtime._BUDGETS[name].items()} for name in runtime.PROFILES}
    assert shapes["ci"] == shapes["laptop"] == shapes["gpu"], "a budget is missing from some profile"


def test_budget_access_and_helpful_errors():
    p = runtime.profile("ci")
    assert p.evaluate.eval_texts == p.evaluate["eval_texts"] > 0
    with pytest.raises(AttributeError, match="has no setting 'nope'"):
        p.evaluate.nope
    with pytest.raises(AttributeError, match="has no section 'nope'"):
        p.nope


def test_ci_budgets_are_no_larger_than_laptop():
    ci, laptop = runtime._BUDGETS["ci"], runtime._BUDGETS["laptop"]
    for section, settings in ci.items():
        for key, value in settings.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert value <= laptop[section][key], f"ci {section}.{key}={value} > laptop's"


def test_seed_everything_is_reproducible():
    runtime.seed_everything(3)
    a = torch.randn(5)
    runtime.seed_everything(3)
    assert torch.equal(a, torch.randn(5))
    with pytest.raises(ValueError, match="seed"):
        runtime.seed_everything(-1)


def test_pick_device_falls_back_to_cpu():
    device = runtime.pick_device()
    if not torch.cuda.is_available():
        assert device.type in {"cpu", "mps"}


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "c"))
    assert runtime.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
