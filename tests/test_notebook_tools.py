import json
from pathlib import Path

import nbformat
import pytest

from course_lib import notebook_tools as nt

ROOT = Path(__file__).resolve().parents[1]


def _notebook(*sources, outputs=None):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    if outputs:
        nb.cells[0].outputs = [nbformat.v4.new_output("stream", text=outputs)]
        nb.cells[0].execution_count = 1
    return nb


def test_solution_region_becomes_a_stub_at_its_indent():
    source = "def f(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION\n\nprint(f(2))"
    assert nt.strip_solutions(source, "cell") == (
        "def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError\n\nprint(f(2))")


def test_cells_without_markers_are_unchanged_and_outputs_cleared():
    nb = _notebook("x = 1", "### BEGIN SOLUTION\ny = 2\n### END SOLUTION", outputs="1\n")
    exercise = nt.exercise_from_solution(nb)
    assert exercise.cells[0].source == "x = 1" and exercise.cells[0].outputs == []
    assert "y = 2" not in exercise.cells[1].source
    assert nb.cells[1].source.count("y = 2") == 1, "the solution notebook itself is untouched"


@pytest.mark.parametrize("source, problem", [
    ("### BEGIN SOLUTION\nx = 1", "never closed"),
    ("x = 1\n### END SOLUTION", "without a"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside an open"),
])
def test_unbalanced_markers_name_the_cell(source, problem):
    nb = _notebook("ok = True", source)
    nb.cells[1].id = "broken-cell"
    with pytest.raises(nt.MarkerError, match=problem) as error:
        nt.exercise_from_solution(nb, "solutions/99_demo.ipynb")
    assert "solutions/99_demo.ipynb, cell 1 (id broken-cell)" in str(error.value)


def test_markers_in_markdown_are_refused():
    nb = _notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("### BEGIN SOLUTION\nanswer\n### END SOLUTION")]
    with pytest.raises(nt.MarkerError, match="cell 0: solution markers belong in code cells"):
        nt.exercise_from_solution(nb)


def test_stale_exercises_are_found_then_written(tmp_path):
    (tmp_path / "solutions").mkdir()
    nbformat.write(_notebook("### BEGIN SOLUTION\nx = 1\n### END SOLUTION"), tmp_path / "solutions" / "00_a.ipynb")
    assert nt.write_exercises(tmp_path, check=True) == [tmp_path / "exercises" / "00_a.ipynb"]
    assert not (tmp_path / "exercises" / "00_a.ipynb").exists(), "--check must not write"
    nt.write_exercises(tmp_path)
    assert nt.write_exercises(tmp_path, check=True) == []
    exercise = nbformat.read(tmp_path / "exercises" / "00_a.ipynb", as_version=4)
    assert "raise NotImplementedError" in exercise.cells[0].source


def test_an_exercise_without_its_solution_is_reported(tmp_path):
    (tmp_path / "solutions").mkdir()
    (tmp_path / "exercises").mkdir()
    nbformat.write(_notebook("x = 1"), tmp_path / "exercises" / "07_orphan.ipynb")
    assert nt.write_exercises(tmp_path, check=True) == [tmp_path / "exercises" / "07_orphan.ipynb"]


def test_stray_outputs_are_found_and_stripped(tmp_path):
    path = tmp_path / "nb.ipynb"
    nb = _notebook("print(1)", "# NBVAL_CHECK_OUTPUT\nprint(2)", outputs="1\n")
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="2\n")]
    nbformat.write(nb, path)
    assert nt.stray_outputs(path) == [0]
    assert nt.strip_outputs(path)
    assert nt.stray_outputs(path) == []
    assert nbformat.read(path, as_version=4).cells[1].outputs, "checked outputs stay"
    assert nt.unrecorded_checks(path) == [1]  # nbval needs the count beside them
    nb = nbformat.read(path, as_version=4)
    nb.cells[1].execution_count = 1
    nbformat.write(nb, path)
    assert nt.unrecorded_checks(path) == [] and not nt.strip_outputs(path)


def test_cli_exit_codes_say_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "solutions").mkdir()
    nbformat.write(_notebook("### BEGIN SOLUTION\nx = 1"), tmp_path / "solutions" / "00_a.ipynb")
    assert nt.main(["exercises"]) == 2
    assert "never closed" in capsys.readouterr().err
    nbformat.write(_notebook("### BEGIN SOLUTION\nx = 1\n### END SOLUTION"), tmp_path / "solutions" / "00_a.ipynb")
    assert nt.main(["exercises", "--check"]) == 1
    assert "make exercises" in capsys.readouterr().err
    assert nt.main(["exercises"]) == 0 and nt.main(["exercises", "--check"]) == 0
    nbformat.write(_notebook("print(1)", outputs="1\n"), tmp_path / "solutions" / "00_a.ipynb")
    assert nt.main(["outputs"]) == 1
    assert "make clean-notebooks" in capsys.readouterr().err


# ---------------------------------------------------------------- the course's own notebooks

def test_the_course_exercises_are_up_to_date():
    assert nt.write_exercises(ROOT, check=True) == [], "run `make exercises` and commit exercises/"


def test_the_course_notebooks_are_committed_clean():
    assert {str(p): nt.stray_outputs(p) for p in nt.all_notebooks(ROOT) if nt.stray_outputs(p)} == {}
    assert {str(p): nt.unrecorded_checks(p) for p in nt.all_notebooks(ROOT) if nt.unrecorded_checks(p)} == {}


def test_every_chapter_has_lecture_solution_and_exercise():
    lectures = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert lectures, "no lecture notebooks"
    for name in lectures:
        assert (ROOT / "solutions" / name).exists() or any(
            p.name[:2] == name[:2] for p in (ROOT / "solutions").glob("*.ipynb")), f"no solutions for {name}"


def test_every_cell_has_slide_metadata():
    for path in nt.all_notebooks(ROOT):
        nb = nbformat.read(path, as_version=4)
        missing = [i for i, c in enumerate(nb.cells) if "slide_type" not in c.metadata.get("slideshow", {})]
        assert not missing, f"{path.name}: cells {missing} have no slideshow.slide_type"


# ---- one source for the chapters' run times: benchmarks/timings.json

from course_lib import timings  # noqa: E402

TIMINGS = {"notebooks": {
    "00_intro": {"note": "the first run also converts the model",
                 "ci": {"minutes": 0.2, "device": "2-core CPU", "date": "2026-11-26"},
                 "gpu": {"minutes": 0.4, "device": "NVIDIA H200", "date": "2026-11-26"}},
    "01_math": {"ci": {"minutes": 1.25, "device": "2-core CPU", "date": "2026-11-26"},
                "laptop": {"minutes": 3.0, "device": "2-core CPU", "date": "2026-11-26"}},
}}
README = """# Course

| # | notebook | minutes: ci / laptop / gpu |
|---|---|---|
| 00 | `00_intro` | 9 / 9 / 9 |
| 01 | `01_math` | 1.0 / – / – |

| chapter | ci | laptop | gpu | run ahead |
|---|---|---|---|---|
| 01 Math | 1 | 2 | 3 | nothing |

| other | table |
|---|---|
| 00 | 7 |
"""


def test_time_line_names_every_profile_and_device():
    assert timings.time_line(TIMINGS["notebooks"]["00_intro"]) == (
        "**Time.** ci 0.2 min, laptop not yet measured, gpu 0.4 min (measured runs; ci: 2-core CPU; "
        "gpu: NVIDIA H200). The first run also converts the model.")
    assert timings.time_line(TIMINGS["notebooks"]["01_math"]).startswith(
        "**Time.** ci 1.2 min, laptop 3.0 min, gpu not yet measured (measured runs; ci and laptop: 2-core CPU).")


def test_readme_minutes_are_written_in_both_kinds_of_table_only():
    text = timings.readme_with_timings(README, TIMINGS)
    assert "| 00 | `00_intro` | 0.2 / – / 0.4 |" in text and "| 01 | `01_math` | 1.2 / 3.0 / – |" in text
    assert "| 01 Math | 1.2 | 3.0 | – | nothing |" in text
    assert "| 00 | 7 |" in text, "a table without timing columns is left alone"
    assert timings.readme_with_timings(text, TIMINGS) == text


def test_a_chapter_row_without_timings_is_an_error():
    with pytest.raises(timings.TimingsError, match="'02'"):
        timings.readme_with_timings(README.replace("| 01 | `01_math`", "| 02 | `02_new`"), TIMINGS)


def test_the_time_paragraph_becomes_one_line():
    nb = _notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 01\n\n**Time.** about 3 minutes,\nmore on a laptop.\n\nNext.")]
    timings.notebook_with_time_line(nb, "**Time.** ci 1.2 min.")
    assert nb.cells[0].source == "# 01\n\n**Time.** ci 1.2 min.\n\nNext."
    nb.cells[0].source = "# 01 without a time line"
    with pytest.raises(timings.TimingsError, match=r"\*\*Time\.\*\*"):
        timings.notebook_with_time_line(nb, "**Time.** ci 1.2 min.", "notebooks/01_math.ipynb")


def test_timings_are_checked_then_written(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "benchmarks").mkdir()
    timings.save(TIMINGS, tmp_path)
    (tmp_path / "README.md").write_text(README)
    for stem in TIMINGS["notebooks"]:
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"# {stem}\n\n**Time.** soon.")])
        nbformat.write(nb, tmp_path / "notebooks" / f"{stem}.ipynb")
    stale = timings.write_timings(tmp_path, check=True)
    assert [p.name for p in stale] == ["00_intro.ipynb", "01_math.ipynb", "README.md"]
    assert (tmp_path / "README.md").read_text() == README, "--check must not write"
    timings.write_timings(tmp_path)
    assert timings.write_timings(tmp_path, check=True) == []
    assert "ci 1.2 min" in nbformat.read(tmp_path / "notebooks" / "01_math.ipynb", as_version=4).cells[0].source


def test_record_checks_its_arguments():
    data = {"notebooks": {}}
    timings.record(data, "00_intro", "laptop", 0.44, "2-core CPU", "2026-12-01")
    assert data["notebooks"]["00_intro"]["laptop"] == {"minutes": 0.4, "device": "2-core CPU", "date": "2026-12-01"}
    with pytest.raises(ValueError, match="profile"):
        timings.record(data, "00_intro", "phone", 1.0, "?", "?")


def test_the_course_agrees_with_its_timings_file():
    assert timings.write_timings(ROOT, check=True) == []
