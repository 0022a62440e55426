"""Pure parts of container restores: device maps, node renumbering in CRIU's tmpfs tar,
podman's config rewrite. No engine, no root."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from gpusnap.errors import UsageError
from gpusnap.imagefile.devnodes import NodeChange, remap_gz, remap_tar
from gpusnap.targets import containers
from gpusnap.targets import devices as devmap
from gpusnap.targets.podman_engine import remap_host_sources, remap_spec_devices


def _dev_tar(entries, fmt=tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        d = tarfile.TarInfo("./")
        d.type = tarfile.DIRTYPE
        t.addfile(d)
        for name, kind, major, minor in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.devmajor, info.devminor = major, minor
            t.addfile(info)
        data = b"hello" * 300
        f = tarfile.TarInfo("./shm/file")
        f.size = len(data)
        t.addfile(f, io.BytesIO(data))
    return buf.getvalue()


def _nodes(data: bytes) -> dict:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:     # also checks every checksum
        return {m.name: (m.devmajor, m.devminor) for m in t.getmembers() if m.isdev()}


def test_renumbers_only_the_named_node_with_the_old_number():
    data = _dev_tar([("./nvidia0", tarfile.CHRTYPE, 195, 0), ("./null", tarfile.CHRTYPE, 1, 3),
                     ("./xnull", tarfile.CHRTYPE, 1, 3), ("./nvidiactl", tarfile.CHRTYPE, 195, 255)])
    new, changed = remap_tar(data, [NodeChange("nvidia0", (195, 0), (195, 1)),
                                    NodeChange("xnull", (1, 3), (1, 5))])
    assert sorted(changed) == ["nvidia0", "xnull"]
    assert _nodes(new) == {"./nvidia0": (195, 1), "./null": (1, 3), "./xnull": (1, 5),
                           "./nvidiactl": (195, 255)}
    assert len(new) == len(data)
    with tarfile.open(fileobj=io.BytesIO(new)) as t:
        assert t.extractfile("./shm/file").read() == b"hello" * 300


def test_a_node_whose_number_differs_is_left_alone():
    data = _dev_tar([("./nvidia0", tarfile.CHRTYPE, 195, 7)])
    new, changed = remap_tar(data, [NodeChange("nvidia0", (195, 0), (195, 1))])
    assert changed == [] and new == data


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_and_formats(fmt):
    deep = "./" + "d" * 60 + "/" + "e" * 60 + "/node"
    data = _dev_tar([(deep, tarfile.BLKTYPE, 7, 0)], fmt=fmt)
    new, changed = remap_tar(data, [NodeChange(deep[2:], (7, 0), (7, 1))])
    assert changed == [deep[2:]]
    assert _nodes(new)[deep] == (7, 1)


def test_gzip_image_round_trip_and_untouched_input_is_returned_as_is():
    data = gzip.compress(_dev_tar([("./gsdev", tarfile.BLKTYPE, 7, 0)]))
    same, changed = remap_gz(data, [NodeChange("other", (7, 0), (7, 1))])
    assert same is data and changed == []
    new, changed = remap_gz(data, [NodeChange("gsdev", (7, 0), (7, 1))])
    assert _nodes(gzip.decompress(new)) == {"./gsdev": (7, 1)}


def test_truncated_tar_is_refused():
    data = _dev_tar([("./a", tarfile.CHRTYPE, 1, 3)])
    with pytest.raises(ValueError):
        remap_tar(data[:512 * 3 + 100], [])


def test_gpu_device_map_follows_the_uuid_pairs():
    snap = [{"uuid": "GPU-a", "minor": 0}, {"uuid": "GPU-b", "minor": 1}]
    host = [{"uuid": "GPU-a", "minor": 0}, {"uuid": "GPU-b", "minor": 1},
            {"uuid": "GPU-c", "minor": 2}]
    assert devmap.gpu_device_map(snap, host, None) == {}
    assert devmap.gpu_device_map(snap, host, [("GPU-a", "GPU-b"), ("GPU-b", "GPU-a")]) == {
        "/dev/nvidia0": "/dev/nvidia1", "/dev/nvidia1": "/dev/nvidia0"}
    assert devmap.gpu_device_map(snap[:1], host, [("GPU-a", "GPU-c")]) == {
        "/dev/nvidia0": "/dev/nvidia2"}
    assert devmap.gpu_device_map(snap, host, [("GPU-a", "GPU-a"), ("GPU-b", "GPU-b")]) == {}


def test_remap_devices_keeps_the_container_path():
    devices = [{"host": "/dev/nvidia0", "container": "/dev/nvidia0", "permissions": "rwm",
                "type": "c", "major": 195, "minor": 0},
               {"host": "/dev/nvidiactl", "container": "/dev/nvidiactl", "permissions": "rwm",
                "type": "c", "major": 195, "minor": 255}]
    nodes = {"/dev/nvidia1": ("c", 195, 1), "/dev/sda": ("b", 8, 0)}
    new, changes, missing = devmap.remap_devices(
        devices, {"/dev/nvidia0": "/dev/nvidia1", "/dev/nvidia7": "/dev/nvidia1"}, nodes.get)
    assert new[0] == dict(devices[0], host="/dev/nvidia1", minor=1)
    assert new[1] == devices[1]
    assert changes == [NodeChange("nvidia0", (195, 0), (195, 1))]
    assert missing == ["/dev/nvidia7"]
    with pytest.raises(UsageError):
        devmap.remap_devices(devices, {"/dev/nvidia0": "/dev/sda"}, nodes.get)


def test_parse_device_maps():
    assert devmap.parse_device_maps(["/dev/a:/dev/b"]) == {"/dev/a": "/dev/b"}
    for bad in (["/dev/a"], ["a:/dev/b"], ["/dev/a:/dev/b", "/dev/a:/dev/c"]):
        with pytest.raises(UsageError):
            devmap.parse_device_maps(bad)


def test_device_facts_prefer_the_spec_numbers(tmp_path):
    """podman 4.3 inspect may name /dev/vcs (char 7:0) for --device /dev/loop0 (block
    7:0); the OCI spec's numbers win and the host path is looked up by them."""
    spec = {"linux": {"devices": [{"path": "/dev/gsdev", "type": "c", "major": 1, "minor": 3}]}}
    facts = devmap.device_facts(
        [{"PathOnHost": "/dev/zero", "PathInContainer": "/dev/gsdev", "CgroupPermissions": ""}],
        spec)
    assert facts == [{"host": "/dev/null", "container": "/dev/gsdev", "permissions": "rwm",
                      "type": "c", "major": 1, "minor": 3}]


def test_podman_spec_and_host_sources_follow_the_new_devices():
    old = [{"host": "/dev/nvidia0", "container": "/dev/nvidia0", "type": "c", "major": 195,
            "minor": 0}]
    new = [dict(old[0], host="/dev/nvidia1", minor=1)]
    spec = {"linux": {"devices": [{"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0},
                                  {"path": "/dev/null", "type": "c", "major": 1, "minor": 3}],
                      "resources": {"devices": [{"allow": False, "access": "rwm"},
                                                {"allow": True, "type": "c", "major": 195,
                                                 "minor": 0, "access": "rwm"}]}}}
    remap_spec_devices(spec, old, new)
    assert spec["linux"]["devices"][0]["minor"] == 1
    assert spec["linux"]["devices"][1]["minor"] == 3
    assert spec["linux"]["resources"]["devices"][1]["minor"] == 1
    sources = [{"path": "/dev/nvidia0:/dev/nvidia0:rwm"}, {"path": "/dev/fuse:/dev/fuse"}]
    remap_host_sources(sources, old, new)
    assert sources == [{"path": "/dev/nvidia1:/dev/nvidia0:rwm"}, {"path": "/dev/fuse:/dev/fuse"}]


# ---- engine choice and docker's experimental check (fake engines, no daemons) -------------

class FakeEngine:
    def __init__(self, kind, known=(), why=None):
        self.kind, self.known, self.why = kind, set(known), why

    def unavailable(self):
        return self.why

    def inspect(self, ref):
        return {"Id": ref} if ref in self.known else None


def _engines(monkeypatch, **engines):
    monkeypatch.setattr(containers, "get_engine", lambda kind: engines[kind])


def test_the_engine_that_knows_the_name_is_chosen(monkeypatch):
    from gpusnap.errors import ContainerEngineError, TargetNotFound
    _engines(monkeypatch, docker=FakeEngine("docker", ["web"]), podman=FakeEngine("podman", ["db"]))
    assert containers.find("web")[0].kind == "docker"
    assert containers.find("db")[0].kind == "podman"
    with pytest.raises(TargetNotFound):
        containers.find("web", "podman")
    _engines(monkeypatch, docker=FakeEngine("docker", ["x"]), podman=FakeEngine("podman", ["x"]))
    with pytest.raises(UsageError, match="both docker and podman"):
        containers.find("x")
    assert containers.find("x", "podman")[0].kind == "podman"
    _engines(monkeypatch, docker=FakeEngine("docker", why="no /var/run/docker.sock"),
             podman=FakeEngine("podman", why="podman is not installed"))
    with pytest.raises(ContainerEngineError, match="no container engine usable"):
        containers.find("x")
    _engines(monkeypatch, docker=FakeEngine("docker", why="no /var/run/docker.sock"),
             podman=FakeEngine("podman"))
    with pytest.raises(TargetNotFound) as e:
        containers.find("x")
    assert "docker.sock" in e.value.hint


def test_docker_without_experimental_is_refused_with_the_fix():
    from gpusnap.errors import ContainerEngineError
    from gpusnap.targets.docker_engine import DockerEngine

    class Client:
        def __init__(self, experimental):
            self.experimental = experimental

        def info(self):
            return {"ExperimentalBuild": self.experimental, "ServerVersion": "20.10.24"}

    DockerEngine(client=Client(True)).check_checkpoint_support()
    with pytest.raises(ContainerEngineError, match="experimental") as e:
        DockerEngine(client=Client(False)).check_checkpoint_support()
    assert "daemon.json" in e.value.hint


def test_restore_plan_moves_the_gpu_node_with_the_cuda_state(monkeypatch):
    """--gpu 1 on a container that had /dev/nvidia0: pairs for the driver, host
    /dev/nvidia1 for the container's /dev/nvidia0, and a new container is required."""
    from types import SimpleNamespace

    from gpusnap.cuda import discover
    from gpusnap.engine import strategies
    from gpusnap.engine.restore import RestoreRequest
    from gpusnap.errors import PidInUse
    from gpusnap.model import CudaFacts, Manifest, Target

    gpus = [discover.GpuInfo(i, f"GPU-{i}", "H100", 80 << 30, 70 << 30, f"0000:0{i}:00.0", i)
            for i in range(2)]
    monkeypatch.setattr(discover, "host_gpus",
                        lambda: SimpleNamespace(gpus=gpus, processes=[]))
    monkeypatch.setattr(devmap, "host_node", lambda p: ("c", 195, int(p[-1])))

    class Engine(FakeEngine):
        running = False

        def check_checkpoint_support(self):
            pass

        def state(self, ref):
            return self.running, 1

    engine = Engine("docker", ["cid0"])
    monkeypatch.setattr(containers, "get_engine", lambda kind: engine)
    facts = {"id": "cid0", "name": "llm",
             "devices": [{"host": "/dev/nvidia0", "container": "/dev/nvidia0", "type": "c",
                          "major": 195, "minor": 0, "permissions": "rwm"}],
             "gpu_devices": [{"path": "/dev/nvidia0", "major": 195, "minor": 0},
                             {"path": "/dev/nvidiactl", "major": 195, "minor": 255}]}
    manifest = Manifest(id="s1", target=Target("docker", 1, [1], container=facts), pids=[1],
                        files=[], cuda=CudaFacts(pids=[1], gpus=[g.to_dict() for g in gpus],
                                                 used_memory={"GPU-0": 1 << 30}))

    def plan(req):
        return strategies.for_kind("docker").plan_restore(req, manifest, "criu")

    p = plan(RestoreRequest("s1", gpus=["1"], name="llm2"))
    assert p.gpu_pairs == [("GPU-0", "GPU-1")], "only the GPU the container had"
    where = p.container
    assert where.devices[0]["host"] == "/dev/nvidia1" and where.devices[0]["container"] == "/dev/nvidia0"
    assert where.node_changes == [NodeChange("nvidia0", (195, 0), (195, 1))]
    assert where.into is None and where.name == "llm2"

    same = plan(RestoreRequest("s1"))
    assert same.gpu_pairs is None and same.container.devices is None and same.container.into == "cid0"

    with pytest.raises(UsageError, match="new container"):
        plan(RestoreRequest("s1", gpus=["1"]))
    engine.running = True
    with pytest.raises(PidInUse):
        plan(RestoreRequest("s1"))
