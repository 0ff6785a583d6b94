# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv on first use and
# installs from the lock (requirements.lock) with uv; `make lock` upgrades the lock on purpose.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
UV     := $(BIN)/uv
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock
DEMO   ?= runs/demo
UV_VERSION := 0.13.9

# uv does not read pip's configuration: carry this machine's indexes (here the local torch wheels)
# over from it, whatever they are, so that pip and uv see the same packages.
pip_config = $(shell $(PYTHON) -m pip config get global.$(1) 2>/dev/null)
ifneq ($(call pip_config,index-url),)
export UV_INDEX_URL ?= $(call pip_config,index-url)
endif
ifneq ($(call pip_config,extra-index-url),)
export UV_EXTRA_INDEX_URL ?= $(call pip_config,extra-index-url)
endif
ifneq ($(call pip_config,find-links),)
export UV_FIND_LINKS ?= $(call pip_config,find-links)
endif
# Take each package's best version across the indexes, not only the first index that has it.
export UV_INDEX_STRATEGY ?= unsafe-best-match

.PHONY: install lock demo test test-matrix lint bench clean

install: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(UV): $(VENV)/bin/python
	$(BIN)/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# Exactly the lock (hashes checked; torch pinned in it), then this package without its dependencies.
# --compile-bytecode: where PYTHONDONTWRITEBYTECODE is set (CI machines, containers) Python would
# compile torch, Lightning and timm from source at every start (10 s of each command's 17 here).
$(STAMP): $(LOCK) pyproject.toml | $(UV)
	$(UV) pip sync --quiet --compile-bytecode --python $(BIN)/python $(LOCK)
	$(UV) pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

# Upgrade every dependency to the newest the pyproject's ranges allow, on purpose.
lock: | $(UV)
	$(UV) pip compile pyproject.toml --extra dev --generate-hashes --upgrade --python-version 3.11 \
		--no-header --output-file $(LOCK)

# The whole pipeline on built-in phantoms, CPU-sized: synth > prepare > train two models >
# evaluate both > compare > predict new files (PyTorch, then the ONNX export on ONNX Runtime).
# Each step is the CLI a user would type.
CX := $(BIN)/cxrfusion
QUICK := --weights none --cache-size 128 --workers 2
demo: $(STAMP)
	rm -rf $(DEMO)
	$(CX) synth --out $(DEMO)/phantoms --n 2000 --seed 0 --workers 2
	$(CX) prepare --data $(DEMO)/phantoms --out $(DEMO)/prepared --size 128 --patient-fraction 1.0 --workers 2
	$(CX) train --prepared $(DEMO)/prepared --model simple_cnn --out $(DEMO)/simple_cnn $(QUICK) --input-size 64 --batch-size 8 --epochs 8 --lr 3e-3 --plateau-patience 20 --early-stop-patience 20
	$(CX) train --prepared $(DEMO)/prepared --model fusion --out $(DEMO)/fusion $(QUICK) --input-size 64 --epochs 2 --phase1-epochs 0 --lr 3e-4
	$(CX) evaluate --run $(DEMO)/simple_cnn
	$(CX) evaluate --run $(DEMO)/fusion --temperature-scale
	$(CX) compare $(DEMO)/simple_cnn $(DEMO)/fusion --out $(DEMO)/comparison
	mkdir -p $(DEMO)/new_images && cp $(DEMO)/phantoms/images/0000000[1-5]_*.png $(DEMO)/new_images/
	$(CX) predict --run $(DEMO)/fusion $(DEMO)/new_images --out $(DEMO)/predictions
	$(CX) export --run $(DEMO)/fusion
	$(CX) predict --run $(DEMO)/fusion $(DEMO)/new_images --out $(DEMO)/predictions_onnx --engine onnx
	@echo
	@echo "demo outputs in $(DEMO)/:"
	@echo "  data:     $(DEMO)/phantoms, split + cache + figures in $(DEMO)/prepared"
	@echo "  runs:     $(DEMO)/simple_cnn, $(DEMO)/fusion (metrics.csv, loss_curves.png, best.ckpt)"
	@echo "  reports:  $(DEMO)/simple_cnn/eval_test/report.html, $(DEMO)/fusion/eval_test/report.html"
	@echo "  table 2:  $(DEMO)/comparison/comparison.md"
	@echo "  predict:  $(DEMO)/predictions/predictions.csv, predictions.json (images: $(DEMO)/new_images)"
	@echo "  ONNX:     $(DEMO)/fusion/export, its predictions in $(DEMO)/predictions_onnx"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

test: lint
	$(BIN)/pytest -q

# The suite again on what `pip install cxrfusion` may give a library user: the newest versions the
# pyproject's ranges allow, and the lowest (each in its own venv, .venv-highest / .venv-lowest-direct).
MATRIX := highest lowest-direct
test-matrix: test
	set -e; for res in $(MATRIX); do \
	  rm -rf .venv-$$res; $(PYTHON) -m venv .venv-$$res; \
	  $(UV) pip install --quiet --compile-bytecode --python .venv-$$res/bin/python --resolution $$res -e '.[dev]'; \
	  echo "== $$res: $$(.venv-$$res/bin/python -c 'import numpy, pandas, sklearn, lightning, timm, onnxruntime as o; print(numpy.__version__, pandas.__version__, sklearn.__version__, lightning.__version__, timm.__version__, o.__version__)')"; \
	  .venv-$$res/bin/pytest -q -p no:cacheprovider; \
	done

bench: $(STAMP)
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/mc_dropout.py
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/patient_tests.py
	$(BIN)/python bench/conformal.py
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/serve_load.py
	$(BIN)/python bench/serve_abuse.py

clean:
	rm -rf $(VENV) .venv-* runs .pytest_cache
