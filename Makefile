# Small LLMs course. The two commands of the README:
#   make lab    set up (virtual environment, course, model) and open the course in JupyterLab
#   make test   set up and run the whole test suite (unit tests, reference cross-checks, notebooks)
# Everything lives in .venv/ and the model cache (COURSE_CACHE, default ~/.cache/course_lib); the
# executed notebooks of `make book` and `make slides` in book/_build/<profile>/.

PYTHON ?= python3
VENV ?= .venv
# The torch build to install first. The default is a CPU/CUDA build from the package index; use
# e.g. `make lab TORCH=torch` for the newest release.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
# The unit tests and nbval run on TEST_WORKERS processes (pytest-xdist; nbval one notebook per worker
# at a time), each torch with its share of the cores: on 2 cores, two 1-thread workers get through
# the suite in about 70% of the time one 2-thread process takes (small matrices use 2 threads badly).
TEST_WORKERS ?= 2
WORKER_THREADS := $(shell n=$$(( $$(nproc) / $(TEST_WORKERS) )); echo $$(( n > 0 ? n : 1 )))
PARALLEL := -n $(TEST_WORKERS)
PYTEST_NOTEBOOKS := --nbval-lax --nbval-current-env --nbval-cell-timeout=900 -p no:cacheprovider --durations=15 \
	$(PARALLEL) --dist loadfile
CI_PROFILE := COURSE_PROFILE=ci COURSE_CHECKS_STRICT=1
CI_ENV := $(CI_PROFILE) OMP_NUM_THREADS=$(WORKER_THREADS)

.PHONY: lab test setup setup-test setup-book model browser unit notebooks exercises clean-notebooks timings book slides benchmarks engines course-report clean

# As root it adds --allow-root, without a display --no-browser; it prints the address to open.
lab: setup model
	$(PY) -m course_lib.lab notebooks

# nbval's green runs of the lecture notebooks fill the ci execution cache (conftest.py), so the
# site and the decks tested last are built from them without running the notebooks again.
test: setup-test model $(if $(CI),browser)
	$(PY) -m course_lib.notebook_tools exercises --check
	$(PY) -m course_lib.notebook_tools outputs
	$(PY) -m course_lib.notebook_tools timings --check
	$(CI_ENV) $(PY) -m pytest tests -m "not executed" --durations=15 $(PARALLEL)
	$(CI_ENV) $(PY) -m pytest $(PYTEST_NOTEBOOKS) notebooks solutions
	$(CI_PROFILE) $(PY) -m pytest tests -m executed

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# An extra's stamp; installing one also stamps the extras it includes (pyproject.toml).
INCLUDED_test := book reference
INCLUDED_book := reference
# --no-compile: Python byte-compiles each module when it is first imported; compiling all of
# JupyterLab's, Sphinx's, ... at install time took half of this step (1 min on 2 cores).
$(VENV)/.installed-%: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet --no-compile -e ".[$*]"
	touch $@ $(foreach extra,$(INCLUDED_$*),$(VENV)/.installed-$(extra))

setup: $(VENV)/.installed-reference
setup-test: $(VENV)/.installed-test
setup-book: $(VENV)/.installed-book

model: | $(VENV)/bin/python
	$(PY) -m course_lib.models fetch

# the tests that need no executed notebooks (the site's and the decks' need nbval's runs first)
unit: setup-test model
	$(CI_ENV) $(PY) -m pytest tests -m "not executed" $(PARALLEL)

notebooks: setup-test model
	$(CI_ENV) $(PY) -m pytest $(PYTEST_NOTEBOOKS) notebooks solutions

exercises: | $(VENV)/bin/python
	$(PY) -m course_lib.notebook_tools exercises

clean-notebooks: | $(VENV)/bin/python
	$(PY) -m course_lib.notebook_tools outputs --strip

# the README's minutes and each notebook's **Time.** line, from benchmarks/timings.json
timings: | $(VENV)/bin/python
	$(PY) -m course_lib.notebook_tools timings

# The executed course site in book/_build/<profile>/html, in the profile COURSE_PROFILE names (else
# laptop; gpu with CUDA); a notebook runs only when the profile's execution cache has no run of its code.
book: setup-book model
	$(PY) -m course_lib.book

# nbconvert's reveal.js decks of the lecture notebooks with their outputs (the runs `make book`
# uses, same profile), with reveal.js and MathJax vendored into slides/vendor (via npm, cached) so
# they present offline; without npm they load those from CDNs and say so.
slides: setup-book model
	$(PY) -m course_lib.slides --out slides notebooks/*.ipynb

# Debian's chromium for tests/test_browser.py (Playwright drives it; no browser download). `make test`
# runs this under CI; elsewhere run it once yourself (as root), or the browser test skips.
browser:
	@if command -v chromium >/dev/null 2>&1; then echo "chromium: $$(command -v chromium)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "could not install chromium: tests/test_browser.py will skip"; \
	else echo "chromium is missing (as root: apt-get install chromium): tests/test_browser.py will skip"; fi

# llama.cpp beside the course (chapter 02, bench_end_to_end.py): llama-cpp-python built from source,
# 5-10 minutes on 2 cores. On a CPU with AMX (Xeon Sapphire Rapids and later), llama.cpp's AMX path
# crashes on quantized files (llama.cpp issue 20824; Q8_0 and Q4_1 segfaulted here, F32 ran): there
# it is built without AMX, with the instruction sets every such CPU has — always built afresh
# (--no-cache-dir, --force-reinstall): pip would otherwise reuse a wheel built earlier with AMX.
NO_AMX := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
HAS_AMX := $(shell grep -qw amx_int8 /proc/cpuinfo 2>/dev/null && echo yes)
engines: setup
	$(if $(HAS_AMX),CMAKE_ARGS="$(NO_AMX)" $(PY) -m pip install --quiet --no-cache-dir --force-reinstall \
		--no-deps "llama-cpp-python>=0.3")
	$(PY) -m pip install --quiet -e ".[engines]"

benchmarks: setup-test model
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

# The whole course in one profile, one report (a lecture machine's check): make course-report PROFILE=gpu
PROFILE ?= $(if $(shell nvidia-smi -L 2>/dev/null),gpu,laptop)
course-report: setup-test model
	$(PY) benchmarks/course_report.py --profile $(PROFILE) --out course-report

clean:
	rm -rf $(VENV) slides book/_build
