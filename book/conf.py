"""Sphinx configuration of the executed course site (`make book`; see course_lib/book.py).

Sphinx with MyST-NB (what Jupyter Book 1 wraps) and the Jupyter Book theme. The notebooks are not
executed here: course_lib.book takes each lecture notebook's run from the profile's jupyter-cache
(course_lib.executed), stages it with its outputs in book/_build/<profile>/src, and builds from there.
Everything the pages load is served from the site itself: MathJax is vendored into _static/ (the
builder sets mathjax_path and html_static_path), the theme's fonts and icons ship with it, and the
ipywidgets CDN scripts are switched off (the static pages have no kernel for the widgets anyway).
"""
project = "Small LLMs"
author = "the Small LLMs course"
copyright = "the Small LLMs course, Apache-2.0"

extensions = ["myst_nb"]
root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

# MyST-NB: render the staged runs as they are; never execute (course_lib.executed does, with a cache)
nb_execution_mode = "off"
nb_output_stderr = "remove"  # warnings and progress bars: they differ from machine to machine
nb_render_markdown_format = "gfm"  # "What we measured" tables are Markdown displays with pipe tables
nb_ipywidgets_js = {}  # no require.js / widget manager from CDNs
myst_enable_extensions = ["dollarmath", "amsmath", "substitution"]
myst_heading_anchors = 3
suppress_warnings = ["mystnb.unknown_mime_type", "myst.header"]

html_theme = "sphinx_book_theme"
html_title = "Small LLMs"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "navigation_with_keys": False,
}
html_last_updated_fmt = ""
html_show_sourcelink = False
html_copy_source = False
