# `make demo`: install what is missing, then run the main job on the built-in default.
# `make test`: install what is missing (with test extras), then run the whole test suite.
PYTHON ?= python3

.PHONY: install install-test demo test

install:
	$(PYTHON) -m pip install -q -e .

install-test:
	$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	mobilevlm-mlc demo

test: install-test
	$(PYTHON) -m pytest -q tests
