# Two commands do all the set-up on a fresh machine (Python 3.10+, CPU is enough):
#   make demo   # the main job: the offloading runner on the embedded default model and data
#   make test   # the test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip --disable-pip-version-check
STAMP := .setup-done

.PHONY: setup demo test lint clean

# torch is installed first on its own: 2.13.0 is the CPU build this project is tested with; a
# machine that already has a torch in the supported range keeps it.
$(STAMP): pyproject.toml
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev,wandb]"
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m infer

test: $(STAMP)
	$(PYTHON) -m pytest -q

lint: $(STAMP)
	$(PYTHON) -m ruff check .

clean:
	rm -rf $(STAMP) outputs multirun .pytest_cache
