# Every target sets up .venv first (once), so each works on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export RAY_AUTH_MODE ?= disabled

.PHONY: install protos serve demo test test-unit test-integration test-gpu lint typecheck format bench check client-check

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Regenerate the gRPC stubs in segmentation_client/proto/ (tests/unit/test_proto.py checks them).
protos: install
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
		segmentation_client/proto/segmentor.proto

## The ingress that measured best (docs/benchmarks.md): HAProxy in front of the Router replicas
## and gRPC between deployments, set where Ray starts (docs/operations.md, Ingress); the gRPC
## proxy refuses messages over router.max_body_bytes + 64 KiB; larger GPU asks placed first.
INGRESS_ENV := RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1 \
	RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH=2147483647 \
	RAY_SERVE_GRPC_MAX_MESSAGE_SIZE=27328512 RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY=1

## Run the service with the real models (serve_config.yaml), after checking in seconds that
## the GPUs, weights and API key it needs are here (exit 2 with the cause and the fix when not).
serve: install
	$(BIN)/python -m segmentation_service.preflight serve_config.yaml
	$(INGRESS_ENV) $(BIN)/serve run serve_config.yaml

## Run the whole application on a CPU with stand-in models: no GPU, no weights, no network.
demo: install
	$(BIN)/python -m segmentation_service.preflight configs/demo.yaml
	$(BIN)/serve run configs/demo.yaml

## Unit and integration tests (CPU). GPU tests are skipped without CUDA.
test: install
	$(BIN)/python -m pytest tests/unit tests/integration tests/gpu

test-unit: install
	$(BIN)/python -m pytest tests/unit

test-integration: install
	$(BIN)/python -m pytest tests/integration

## On a CUDA machine (see docs/gpu.md): GPU tests only.
test-gpu:
	python3 -m pytest -m gpu tests/gpu

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

check: lint typecheck test

## The client layer alone: a fresh virtualenv with only `pip install '.[video]'` (no torch, no
## Ray) runs segment-video against the demo app.
client-check: install
	rm -rf .venv-client
	$(PYTHON) -m venv .venv-client
	.venv-client/bin/pip install --quiet --upgrade pip
	.venv-client/bin/pip install --quiet '.[video]'
	@if .venv-client/bin/pip list 2>/dev/null | grep -iE '^(torch|ray|ultralytics|transformers) '; then \
		echo "the client install pulled in server packages"; exit 1; fi
	CLIENT_PYTHON=$(CURDIR)/.venv-client/bin/python $(BIN)/python -m pytest tests/integration/test_client_layer.py
