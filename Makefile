# Quick start (as root on Debian 12):  make demo   |   make test
.PHONY: setup demo test test-unit test-gpu containers clean-containers criu-bundle

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/gpusnap --store $${GPUSNAP_STORE:-/var/lib/gpusnap} demo

test: setup
	.venv/bin/python -m pytest -q tests

test-unit: setup
	.venv/bin/python -m pytest -q tests/unit

# On the GPU machine: python3 -m pytest -m gpu tests/gpu (see tests/gpu/README.md)
test-gpu:
	python3 -m pytest -q -m gpu tests/gpu

# A relocatable CRIU in .deps/criu, to carry to a host without network (the GPU machine).
criu-bundle:
	@bash scripts/install-criu.sh $(CURDIR)/.deps/criu
