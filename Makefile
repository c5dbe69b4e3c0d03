# pcpc: install | test | bench | run | <target>.vmfb | clean
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test bench run clean list

install: $(STAMP)

# torch first, pinned to the version whose CPU wheel the dev machines carry;
# then the project with its pinned dependencies (editable).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# One pytest-xdist worker per core (at most 4), each test file on one worker so that its module fixtures
# (compiled modules) are built once: 1.5x faster than one process on 2 cores (CPU use 133% -> 191%).
test: install
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 --dist loadfile

# Every side-by-side benchmark in bench/, in a fixed order (the known ones first, then any others
# alphabetically, not _private ones); each prints its own table with ratios. Stops at the first that fails.
BENCH_ORDER := train_step diloco generate grpo
BENCH := $(foreach b,$(BENCH_ORDER),$(wildcard bench/$(b).py)) \
	$(filter-out $(foreach b,$(BENCH_ORDER),bench/$(b).py) bench/_%,$(sort $(wildcard bench/*.py)))

bench: install
	@set -e; for b in $(BENCH); do echo "== $$b"; $(BIN)/python $$b; done

# The main job. The data comes from ../shared/data when that exists (dev machines), else from the web.
run: install
	@test -f data/tiny_shakespeare.txt || { test -f ../shared/data/tiny_shakespeare.txt && mkdir -p data && \
		cp ../shared/data/tiny_shakespeare.txt data/; } || $(BIN)/pcpc data fetch tiny_shakespeare
	$(BIN)/pcpc run experiments/nanogpt_small.json --overwrite

list: install
	$(BIN)/pcpc build --list

# make nanogpt-small.vmfb -> artifacts/nanogpt-small.{mlir,vmfb,meta.json} (cached; with .part1.vmfb when compiled in parts)
%.vmfb: install
	$(BIN)/pcpc build $*

clean:
	rm -rf artifacts/*.mlir artifacts/*.vmfb artifacts/*.meta.json artifacts/.*.export.json artifacts/.*.parts artifacts/.locks
