# The quick start is `make demo` and `make test`; each sets up .venv first when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint bench bench-tools clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# bytecode up front: where PYTHONDONTWRITEBYTECODE is set, every process (each
	@# worker too) would compile the project's modules again at every start
	$(BIN)/python -m compileall -q engine donor recipient clone_agent bench
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/clone-agent demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check engine donor recipient clone_agent bench tests
	$(BIN)/mypy engine donor recipient clone_agent bench

# The baselines (socat, rsync) come from Debian; installed here when missing and root.
bench-tools:
	@command -v socat >/dev/null && command -v rsync >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq socat rsync >/dev/null; } || \
	  echo "bench: socat/rsync missing and not root: those baselines are skipped"

bench: $(STAMP) bench-tools
	$(BIN)/clone-agent bench --out bench-out
	$(BIN)/clone-agent bench --link --out bench-out
	$(BIN)/python -m pytest -q bench/micro --benchmark-only --benchmark-columns=median,ops

clean:
	rm -rf $(VENV) bench-out .pytest_cache .mypy_cache .ruff_cache
