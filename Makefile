# `make demo`: install what is missing, then run the main job on the built-in default.
# `make test`: install what is missing (with test extras), then run the whole test suite.
PYTHON ?= python3

.PHONY: install install-test system-deps demo test

# Debian packages the tests use: the AArch64 cross linker (orin-cuda) and PoCL (check-kernels).
SYSTEM_DEPS = g++-aarch64-linux-gnu pocl-opencl-icd

install:
	$(PYTHON) -m pip install -q -e .

install-test: system-deps
	$(PYTHON) -m pip install -q -e ".[test]"

system-deps:
	@command -v aarch64-linux-gnu-g++ >/dev/null && test -e /etc/OpenCL/vendors/pocl.icd || \
		{ apt-get update -q && apt-get install -y -q --no-install-recommends $(SYSTEM_DEPS); }

demo: install
	mobilevlm-mlc demo

test: install-test
	$(PYTHON) -m pytest -q tests
