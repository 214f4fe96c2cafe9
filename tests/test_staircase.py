import matplotlib
import pytest

matplotlib.use("Agg")

from course_lib.distill import kd_batches, with_teacher_logits
from course_lib.evaluate import human_corpus
from course_lib.evaluate import token_batch
from course_lib.models import make_student
from course_lib.self_improve import addition_questions
from course_lib.staircase import Yardsticks, measure_stair, plot_quality_vs_size, smallest_within
from course_lib.teacher_data import teacher_dataset

ROWS = [{"stair": "big", "weights (MiB)": 500.0, "ppl": 3.0},
        {"stair": "big-int8", "weights (MiB)": 200.0, "ppl": 3.1},
        {"stair": "small", "weights (MiB)": 190.0, "ppl": 9.0}]


@pytest.mark.parametrize("tolerance, expected", [(0.0, "big"), (0.05, "big-int8"), (2.0, "small")])
def test_smallest_within_picks_the_smallest_good_enough(tolerance, expected):
    assert smallest_within(ROWS, "ppl", "big", tolerance)["stair"] == expected


def test_smallest_within_rejects_bad_arguments():
    with pytest.raises(ValueError, match="reference"):
        smallest_within(ROWS, "ppl", "huge", 0.1)
    with pytest.raises(ValueError, match="tolerance"):
        smallest_within(ROWS, "ppl", "big", -0.1)


def test_measure_stair_fills_every_column(teacher):
    model, tokenizer = teacher
    texts = human_corpus()
    heldout = [with_teacher_logits(model, b)
               for b in kd_batches(tokenizer, teacher_dataset("heldout", n=2), 2, 48)]
    sticks = Yardsticks(texts[:2], heldout, addition_questions()[:2], token_batch(tokenizer, texts, 2, 16),
                        decode_steps=2, repeats=1, max_length=48)
    student = make_student(model, 2)
    row = measure_stair("tiny", student, tokenizer, sticks)
    assert row["stair"] == "tiny" and 0 < row["parameters (M)"] < 134.5
    assert row["weights (MiB)"] > 0 and row["prefill tokens/s"] > 0 and row["decode tokens/s"] > 0
    assert row["human-text ppl"] > 1 and row["teacher-text ppl"] > 1
    assert 0 <= row["top-1 = teacher"] <= 1 and 0 <= row["arithmetic accuracy"] <= 1
    ax = plot_quality_vs_size([row, {**row, "stair": "copy"}])
    assert len(ax.collections) == 2
