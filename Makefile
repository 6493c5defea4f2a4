# `make demo`: install what is missing, then run the main job on the built-in default.
# `make test`: install what is missing (with test extras), then lint and run the whole test suite.
# `make test-fast`: the tests that compile nothing (under a minute), for development.
PYTHON ?= python3

.PHONY: install install-test system-deps demo lint test test-fast

# Debian packages the tests use: the AArch64 cross linker (orin-cuda, arm64-linux), PoCL (check-kernels
# of OpenCL builds) and qemu-user (Arm code run here); apt's arm64 architecture lets the emulation
# download its AArch64 Python (mobilevlm_mlc/emulation/sysroot.py). Root, once.
SYSTEM_DEPS = g++-aarch64-linux-gnu pocl-opencl-icd qemu-user

install:
	$(PYTHON) -m pip install -q -e .

install-test: system-deps
	$(PYTHON) -m pip install -q -e ".[test]"

system-deps:
	@command -v aarch64-linux-gnu-g++ >/dev/null && test -e /etc/OpenCL/vendors/pocl.icd && \
		command -v qemu-aarch64 >/dev/null && dpkg --print-foreign-architectures | grep -qx arm64 || \
		{ dpkg --add-architecture arm64 && apt-get update -q && \
		apt-get install -y -q --no-install-recommends $(SYSTEM_DEPS); }

demo: install
	mobilevlm-mlc demo

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# two workers (pytest-xdist), a test file each at a time: most tests wait on one core (a compile, a
# subprocess, the emulator), so two halve the suite's time on a 2-core machine
test: install-test lint
	$(PYTHON) -m pytest -q -n 2 --dist loadfile tests

test-fast: install-test lint
	$(PYTHON) -m pytest -q -m "not slow" tests
