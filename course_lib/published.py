"""Published figures the course compares itself with (chapter 00): read from shipped CSVs, each
row with its source. Nothing here was measured by the course."""
from __future__ import annotations

import csv
import io
from importlib import resources


def mmlu_vs_size() -> list[dict]:
    """Published MMLU scores and sizes (course_lib/data/mmlu_vs_size.csv), one dict per model."""
    text = resources.files("course_lib").joinpath("data/mmlu_vs_size.csv").read_text("utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    for row in rows:
        row["params_billion"], row["mmlu"] = float(row["params_billion"]), float(row["mmlu"])
    return rows


def plot_mmlu_vs_size(rows: list[dict], highlight: str | None = None, ax=None):
    """MMLU against parameters (log scale), one colour per family; `highlight` circles one model."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.5))
    for family in dict.fromkeys(r["family"] for r in rows):
        group = [r for r in rows if r["family"] == family]
        ax.plot([r["params_billion"] for r in group], [r["mmlu"] for r in group], "o-", label=family)
    for r in rows:
        ax.annotate(r["model"], (r["params_billion"], r["mmlu"]), fontsize=7,
                    xytext=(4, -3), textcoords="offset points")
        if r["model"] == highlight:
            ax.plot(r["params_billion"], r["mmlu"], "o", ms=16, mfc="none", mec="red", mew=2)
    ax.axhline(25, ls=":", c="grey")
    ax.text(0.11, 25.8, "chance (4 choices)", fontsize=8, c="grey")
    ax.set(xscale="log", xlabel="parameters (billions, log scale)", ylabel="MMLU (%)",
           title="Published MMLU scores against model size")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    return ax
