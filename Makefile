# Small LLMs course. The two commands of the README:
#   make lab    set up (virtual environment, course, model) and open the course in JupyterLab
#   make test   set up and run the whole test suite (unit tests, reference cross-checks, notebooks)
# Everything lives in .venv/ and the model cache (COURSE_CACHE, default ~/.cache/course_lib).

PYTHON ?= python3
VENV ?= .venv
# The torch build to install first. The default is a CPU/CUDA build from the package index; use
# e.g. `make lab TORCH=torch` for the newest release.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_NOTEBOOKS := --nbval-lax --nbval-current-env --nbval-cell-timeout=900 -p no:cacheprovider

.PHONY: lab test setup setup-test model browser unit notebooks exercises clean-notebooks slides benchmarks course-report clean

lab: setup model
	$(VENV)/bin/jupyter lab notebooks/

test: setup-test model $(if $(CI),browser)
	$(PY) -m course_lib.notebook_tools exercises --check
	$(PY) -m course_lib.notebook_tools outputs
	COURSE_PROFILE=ci COURSE_CHECKS_STRICT=1 $(PY) -m pytest tests
	COURSE_PROFILE=ci COURSE_CHECKS_STRICT=1 $(PY) -m pytest $(PYTEST_NOTEBOOKS) notebooks solutions

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed-%: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[$*]"
	touch $@

setup: $(VENV)/.installed-reference
setup-test: $(VENV)/.installed-test

model: | $(VENV)/bin/python
	$(PY) -m course_lib.models fetch

unit: setup-test model
	COURSE_PROFILE=ci $(PY) -m pytest tests

notebooks: setup-test model
	COURSE_PROFILE=ci COURSE_CHECKS_STRICT=1 $(PY) -m pytest $(PYTEST_NOTEBOOKS) notebooks solutions

exercises: | $(VENV)/bin/python
	$(PY) -m course_lib.notebook_tools exercises

clean-notebooks: | $(VENV)/bin/python
	$(PY) -m course_lib.notebook_tools outputs --strip

# nbconvert's reveal.js decks, with reveal.js and MathJax vendored into slides/vendor (via npm,
# cached) so they present offline; without npm they load those from CDNs and say so.
slides: setup
	$(PY) -m course_lib.slides --out slides notebooks/*.ipynb

# Debian's chromium for tests/test_browser.py (Playwright drives it; no browser download). `make test`
# runs this under CI; elsewhere run it once yourself (as root), or the browser test skips.
browser:
	@if command -v chromium >/dev/null 2>&1; then echo "chromium: $$(command -v chromium)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "could not install chromium: tests/test_browser.py will skip"; \
	else echo "chromium is missing (as root: apt-get install chromium): tests/test_browser.py will skip"; fi

benchmarks: setup-test model
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

# The whole course in one profile, one report (a lecture machine's check): make course-report PROFILE=gpu
PROFILE ?= $(if $(shell nvidia-smi -L 2>/dev/null),gpu,laptop)
course-report: setup-test model
	$(PY) benchmarks/course_report.py --profile $(PROFILE) --out course-report

clean:
	rm -rf $(VENV) slides
