# `make demo` and `make test` each install what they need on first use (see scripts/setup.sh).
VENV := .venv
STAMP := $(VENV)/.fedtune-installed

.PHONY: demo test lint setup clean

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedtune simulate

# pytest exits 5 when it collects no test; that is not a failure of the set-up.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
