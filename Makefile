# pixelray: set-up and everyday commands. `make install && make test` on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the pinned versions (pip takes them from the local wheel store where there is one)
	$(BIN)/pip install -q -c constraints.txt torch torchvision
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check pixelray tests benchmarks jobs

demo: $(STAMP)
	$(BIN)/pixelray demo

bench: $(STAMP)  # each prints one JSON line; see the docstrings for GPU flags
	$(BIN)/python benchmarks/perturb.py
	$(BIN)/python benchmarks/shards.py
	$(BIN)/python benchmarks/fgsm.py
	$(BIN)/python benchmarks/sweep.py
	$(BIN)/python benchmarks/train.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
