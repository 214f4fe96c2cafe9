"""pytest configuration shared by the unit tests and nbval's notebook runs."""


def pytest_collectstart(collector):
    # nbval: compare only stdout of # NBVAL_CHECK_OUTPUT cells; warnings and progress bars go to
    # stderr and differ from machine to machine (see ANCHORS.md).
    if getattr(collector, "path", None) is not None and collector.path.suffix == ".ipynb":
        collector.skip_compare += ("stderr", "text/html", "application/javascript",
                                   "application/vnd.jupyter.widget-view+json")
