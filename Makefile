# Two commands set everything up on a fresh Linux machine with Python 3.11 and no GPU:
#   make demo   # venv + CPU torch + project, then the whole demo recipe end to end
#   make test   # venv + CPU torch + project + test tools, then the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.patho-r1-installed
# torch goes in first and pinned, so nothing later pulls a CUDA build. Where the CPU wheel is not the default
# for your platform, add your CPU wheel index here, e.g. make demo TORCH_PIP_ARGS="--index-url <cpu index>".
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EXTRAS ?= test,faiss,deepspeed
RECIPE ?= recipes/demo.yaml
PYTEST_ARGS ?=
# Extra arguments for every pip install. CI passes --no-compile: pip then skips byte-compiling every installed module
# (80 of the install's 150 s on 2 cores) and Python compiles only what the tests import, once, on first import.
# Leave it empty where PYTHONDONTWRITEBYTECODE is set: nothing would be cached and every import would recompile.
PIP_INSTALL_ARGS ?=
# Test processes (pytest-xdist), handed one test at a time, the slow ones first; they build each session fixture once
# between them (tests/conftest.py). Three on this project's 2-core CI machine: with two, the cores sat idle 16-20% of
# the run while Ray started and processes waited on each other (measured: 11 min 19 s of tests with two, 9 min 10 s
# with three, same commit). PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 3
# VLMEvalKit's scorers for the agreement tests, without its dependencies (torchvision cannot sit beside CPU torch);
# the tests load its scorer modules without running vlmeval/__init__.py.
VLMEVAL_LIGHT ?= ms-vlmeval==0.0.20 validators sty

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(PIP_INSTALL_ARGS) --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_INSTALL_ARGS) "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install --quiet $(PIP_INSTALL_ARGS) -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install --quiet $(PIP_INSTALL_ARGS) --no-deps $(VLMEVAL_LIGHT)
	touch $(STAMP)

demo: install
	$(BIN)/patho-r1 run $(RECIPE)

# pytest exits 5 when it collects no tests; that must fail loudly, never pass as "nothing broke".
test: install
	@$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist load --maxschedchunk 1 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

# ruff (pinned in the [test] extra; rules in pyproject.toml) over the whole tree; .ci/run calls it before the tests.
lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
