# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= runs/demo

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned, so that no resolver ever reaches for another build.
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The whole pipeline on built-in phantoms, CPU-sized: synth > prepare > train two models >
# evaluate both > compare > predict new files (PyTorch, then the ONNX export on ONNX Runtime).
# Each step is the CLI a user would type.
CX := $(BIN)/cxrfusion
QUICK := --weights none --cache-size 128 --workers 2
demo: $(STAMP)
	rm -rf $(DEMO)
	$(CX) synth --out $(DEMO)/phantoms --n 2000 --seed 0 --workers 2
	$(CX) prepare --data $(DEMO)/phantoms --out $(DEMO)/prepared --size 128 --patient-fraction 1.0 --workers 2
	$(CX) train --prepared $(DEMO)/prepared --model simple_cnn --out $(DEMO)/simple_cnn $(QUICK) --input-size 64 --batch-size 8 --epochs 12 --lr 3e-3 --plateau-patience 20 --early-stop-patience 20
	$(CX) train --prepared $(DEMO)/prepared --model fusion --out $(DEMO)/fusion $(QUICK) --input-size 64 --epochs 4 --phase1-epochs 0 --lr 3e-4
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

bench: $(STAMP)
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/mc_dropout.py
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/patient_tests.py
	$(BIN)/python bench/serve_load.py

clean:
	rm -rf $(VENV) runs .pytest_cache
