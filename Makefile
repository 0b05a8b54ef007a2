# Two commands do the whole set-up on a fresh machine (see README):
#   make example   install into .venv, then compile the bundled example checkpoint to every target
#   make test      install into .venv, then run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/mexc: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0          # the CPU wheel first, so nothing pulls a multi-GB CUDA build
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps tensorrt-stubs   # types for the TensorRT build code (its deps are GPU-only)
	touch $(BIN)/mexc

install: $(BIN)/mexc

TOK := examples/llama-tiny-tokenizer

example: install
	$(BIN)/mexc compile examples/llama-tiny --target trtllm --tp 2 --tokenizer $(TOK) -o out/llama-tiny-trtllm --force
	$(BIN)/mexc compile examples/llama-tiny --target hf --tokenizer $(TOK) -o out/llama-tiny-hf --force
	$(BIN)/mexc verify out/llama-tiny-hf --against examples/llama-tiny
	$(BIN)/mexc compile examples/llama-tiny --target onnx --tokenizer $(TOK) -o out/llama-tiny-onnx --force
	$(BIN)/mexc run out/llama-tiny-hf --prompt 'the quick brown' --max-new-tokens 12
	$(BIN)/mexc run out/llama-tiny-onnx --prompt 'the quick brown' --max-new-tokens 12

test: install
	$(BIN)/python -m pytest -q --durations=15 tests

.PHONY: install example test
