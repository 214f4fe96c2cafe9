"""course_lib.teacher_data: the course-written prompts, the shipped teacher-written set, its provenance."""
import json
from collections import Counter

import pytest

from course_lib import teacher_data
from course_lib.models import generate
from course_lib.teacher_data import (SAMPLING, instruction_prompts, interleave_categories, teacher_dataset,
                                     write_jsonl)


def test_prompts_are_diverse_unique_and_split():
    rows = instruction_prompts()
    assert len(rows) == 320 and len({r["id"] for r in rows}) == 320
    assert len({r["prompt"] for r in rows}) == 320
    kinds = Counter(r["category"] for r in rows)
    assert len(kinds) == 10 and set(kinds.values()) == {32}
    heldout = instruction_prompts("heldout")
    assert len(heldout) == 40 and Counter(r["category"] for r in heldout) == Counter({k: 4 for k in kinds})
    assert len(instruction_prompts("train")) == 280
    with pytest.raises(ValueError, match="split"):
        instruction_prompts("test")


def test_shipped_set_answers_every_prompt_with_provenance():
    rows = teacher_dataset(split=None)
    prompts = {r["id"]: r for r in instruction_prompts()}
    assert sorted(r["id"] for r in rows) == sorted(prompts)
    for row in rows:
        assert row["prompt"] == prompts[row["id"]]["prompt"] and row["split"] == prompts[row["id"]]["split"]
        assert row["response"].strip()
        # the shipped rows predate an explicit top_k: 50 was in effect (transformers' default, see below)
        assert {**row["sampling"], "top_k": 50} == {**SAMPLING, "batch_size": teacher_data.BATCH_SIZE}
        assert len(row["teacher_weights_sha256"]) == 64 and row["date"]
    assert len({r["teacher_weights_sha256"] for r in rows}) == 1
    train, heldout = teacher_dataset("train"), teacher_dataset("heldout")
    assert len(train) == 280 and len(heldout) == 40
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}


@pytest.mark.slow
def test_shipped_set_was_written_by_this_teacher(teacher):
    model, _ = teacher
    assert teacher_dataset("train", n=1)[0]["teacher_weights_sha256"] == teacher_data.weights_sha256(model)


@pytest.mark.slow
def test_shipped_set_was_sampled_with_top_k_50(teacher):
    """Batch 0 sampled again (seed 0, its 32 prompts, 12 tokens): with top_k=50 every answer starts as
    the shipped one does; without the cut, some do not. So the file's provenance says top_k 50."""
    model, tok = teacher
    rows = instruction_prompts()[:teacher_data.BATCH_SIZE]
    shipped = {r["id"]: r["response"] for r in teacher_dataset(split=None)}

    def reproduced(top_k):
        replies = generate(model, tok, [r["prompt"] for r in rows], max_new_tokens=12, do_sample=True,
                           temperature=SAMPLING["temperature"], top_k=top_k, top_p=SAMPLING["top_p"],
                           batch_size=len(rows), seed=teacher_data.SEED)
        return sum(shipped[r["id"]].startswith(reply) for r, reply in zip(rows, replies))

    assert reproduced(50) == len(rows) > reproduced(None)


def test_first_rows_cover_every_kind():
    first = teacher_dataset("train", n=10)
    assert len({r["category"] for r in first}) == 10
    rows = [{"category": c, "i": i} for c, i in [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("c", 0), ("c", 1)]]
    assert [(r["category"], r["i"]) for r in interleave_categories(rows)] == \
        [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("c", 1), ("a", 2)]
    with pytest.raises(ValueError, match="n must be"):
        teacher_dataset("train", n=0)


@pytest.mark.slow
def test_generation_is_seeded_and_recorded(teacher, tmp_path):
    model, tok = teacher
    prompts = instruction_prompts("train")[:3]
    make = lambda: list(teacher_data.generate_teacher_responses(model, tok, prompts, max_new_tokens=6,
                                                                 seed=5, batch_size=2))
    first, again = make(), make()
    assert [r["response"] for r in first] == [r["response"] for r in again]
    assert [r["seed"] for r in first] == [5, 5, 6]  # one seed per batch
    assert first[0]["sampling"]["max_new_tokens"] == 6 and first[0]["teacher_weights_sha256"]
    assert first[0]["sampling"]["top_k"] == SAMPLING["top_k"] == 50  # every setting recorded
    path = write_jsonl(first, tmp_path / "out.jsonl")
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [p["id"] for p in prompts]
    assert teacher_dataset("train", path=path)[0]["response"] == first[0]["response"]
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    assert path.stat().st_mode & 0o777 == 0o644
