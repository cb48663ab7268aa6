# `make demo` and `make test` each install what they need on first use (see scripts/setup.sh).
VENV := .venv
STAMP := $(VENV)/.fedtune-installed

.PHONY: demo test lint setup clean

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedtune simulate

# The suite in four pytest runs at once (scripts/test.sh): two groups of real-process
# tests, the Flower layer, and the rest.
test: $(STAMP)
	bash scripts/test.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
