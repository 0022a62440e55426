# Quick start (as root on Debian 12):  make demo   |   make test
.PHONY: setup demo test test-unit test-gpu containers clean-containers criu-bundle gpu-wheels

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/gpusnap --store $${GPUSNAP_STORE:-/var/lib/gpusnap} demo

# CI entry (fresh Debian 12, root): CRIU and .venv first (setup), then docker/podman
# (containers: it finds the CRIU that setup installed), then every test.
# GPU tests (marker gpu) are collected too and skip with the reason where there is no GPU.
# Time on the 2-core test host, everything already installed: 3 min 10 s (setup and
# containers ~1 s each; tests/integration/test_containers.py ~1 min of it). A fresh
# Debian 12 adds setup's CRIU + .venv and the container packages (apt; not measured here).
test: setup containers
	.venv/bin/python -m pytest -q tests

# docker.io, containerd, runc, podman, local images; daemons started (idempotent, ~1 s
# once done). Needs setup's CRIU (>= 4.1) on PATH first, hence the prerequisite.
containers: setup
	@bash scripts/setup-containers.sh --no-python-image

clean-containers:
	@bash scripts/stop-containers.sh --remove-containers

test-unit: setup
	.venv/bin/python -m pytest -q tests/unit

# On the GPU machine: python3 -m pytest -m gpu tests/gpu (see tests/gpu/README.md)
test-gpu:
	python3 -m pytest -q -m gpu tests/gpu

# A relocatable CRIU in .deps/criu, to carry to a host without network (the GPU machine).
criu-bundle:
	@bash scripts/install-criu.sh $(CURDIR)/.deps/criu

# Wheels for the GPU machine's Python 3.12 in .whl/ (what its image lacks: zstandard, boto3,
# moto's S3 server), checked in a scratch python3.12 environment; carry .whl there.
gpu-wheels:
	@bash scripts/gpu-wheels.sh --check
