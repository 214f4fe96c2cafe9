import matplotlib

matplotlib.use("Agg")

from course_lib.published import mmlu_vs_size, plot_mmlu_vs_size


def test_every_published_figure_carries_its_source_and_harness():
    rows = mmlu_vs_size()
    assert len(rows) >= 10
    for row in rows:
        assert row["source"].strip() and row["harness"].strip(), row["model"]
        assert 0 < row["params_billion"] <= 1000 and 0 < row["mmlu"] <= 100
    assert len({r["model"] for r in rows}) == len(rows)


def test_the_course_teacher_is_on_the_chart():
    smol = next(r for r in mmlu_vs_size() if r["model"] == "SmolLM2-135M")
    assert smol["params_billion"] == 0.135 and smol["mmlu"] == 31.5


def test_plot_draws_one_line_per_family():
    rows = mmlu_vs_size()
    ax = plot_mmlu_vs_size(rows, highlight="GPT-3")
    families = {r["family"] for r in rows}
    assert len(ax.get_legend().get_texts()) == len(families)
