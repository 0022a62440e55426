"""examples/kubernetes and examples/systemd: manifests valid against the Kubernetes schema
(offline, kubernetes-validate's bundled schemas), the node install script run for real
against a scratch root."""

from __future__ import annotations

import os
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from conftest import REPO

K8S = os.path.join(REPO, "examples", "kubernetes")
# 1.30: the kubelet checkpoint API beta and on by default; and the newest schema bundled.
VERSIONS = ["1.30", kubernetes_validate.latest_version()]


def _docs():
    with open(os.path.join(K8S, "daemonset.yaml")) as f:
        return [d for d in yaml.safe_load_all(f) if d]


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_against_the_kubernetes_schema(version):
    docs = _docs()
    assert {d["kind"] for d in docs} == {"Namespace", "ConfigMap", "DaemonSet"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_daemonset_runs_privileged_in_the_host_pid_namespace_with_store_and_socket_dir():
    ds = next(d for d in _docs() if d["kind"] == "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostPID"] is True
    container = spec["containers"][0]
    assert container["securityContext"]["privileged"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/host", "/var/lib/gpusnap", "/run/gpusnap"} <= mounts


def test_a_broken_manifest_is_caught():
    ds = next(d for d in _docs() if d["kind"] == "DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["imagee"] = "typo"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, VERSIONS[-1], strict=True)


def _install(root, criu_src, *existing):
    env = {**os.environ, "ROOT": str(root), "CRIU_SRC": str(criu_src), "PYTHON": sys.executable}
    return subprocess.run(["bash", os.path.join(K8S, "install-node.sh")], env=env,
                          capture_output=True, text=True, timeout=120, check=True).stdout


def test_install_node_script_prepares_a_scratch_root_idempotently(tmp_path):
    root, criu = tmp_path / "node", tmp_path / "criu"
    (criu / "bin").mkdir(parents=True)
    (criu / "bin" / "criu").write_text("#!/bin/sh\necho 'Version: 4.2'\n")
    (criu / "bin" / "criu").chmod(0o755)
    (root / "etc" / "criu").mkdir(parents=True)
    (root / "etc" / "criu" / "runc.conf").write_text("tcp-established\n")
    (root / "etc" / "criu" / "crun.conf").write_text("")
    first = _install(root, criu)
    assert "hook added to /etc/criu/runc.conf" in first and "hook added to /etc/criu/crun.conf" in first
    hook = root / "usr/local/lib/gpusnap/gpusnap-criu-hook"
    text = hook.read_text()
    assert text.startswith("#!/usr/bin/python3 -I\n") and "sys.path.insert(0, '/opt/gpusnap/src')" in text
    assert os.access(hook, os.X_OK)
    runc = (root / "etc/criu/runc.conf").read_text()
    assert runc.startswith("tcp-established\n") and "action-script /usr/local/lib/gpusnap/gpusnap-criu-hook" in runc
    assert (root / "etc/criu/runc.conf.bak").read_text() == "tcp-established\n"
    assert os.readlink(root / "usr/local/sbin/criu") == "/opt/gpusnap/criu/bin/criu"
    assert (root / "opt/gpusnap/src/gpusnap/engine/dump.py").is_file()
    assert oct((root / "var/lib/gpusnap").stat().st_mode & 0o777) == "0o700"
    assert (root / "run/gpusnap").is_dir()
    second = _install(root, criu)
    assert "names the hook already" in second
    assert (root / "etc/criu/runc.conf").read_text() == runc


def test_systemd_unit_runs_the_daemon_as_a_notify_service():
    with open(os.path.join(REPO, "examples", "systemd", "gpusnapd.service")) as f:
        unit = f.read()
    assert "Type=notify" in unit and "gpusnap daemon --socket /run/gpusnap/gpusnapd.sock" in unit
