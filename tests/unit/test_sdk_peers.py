"""The agent's socket between gpusnap (root) and a server: peers are checked before a
byte is sent or read, symlinks are not followed, and idle strangers stall nobody."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from types import SimpleNamespace

import pytest

from gpusnap.engine import agent_steps
from gpusnap.engine.timing import Stages
from gpusnap.sdk import protocol, registry
from gpusnap.sdk.agent import Agent

# A stand-in agent: listens on DIR/agent-<its pid>.sock, answers {"ok": true}, and appends
# every byte it was sent to DIR/got-<its pid>.
_SERVER = textwrap.dedent("""
    import os, socket, sys
    d = sys.argv[1]
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.path.join(d, f"agent-{os.getpid()}.sock"))
    s.listen(4)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        data = c.recv(65536)
        with open(os.path.join(d, f"got-{os.getpid()}"), "ab") as f:
            f.write(data)
        try:
            c.sendall(b'{"ok": true, "state": "prepared"}\\n')
        except OSError:
            pass
        c.close()
""")


@pytest.fixture
def servers(tmp_path):
    procs = []

    def start():
        p = subprocess.Popen([sys.executable, "-c", _SERVER, str(tmp_path)], stdout=subprocess.PIPE,
                             text=True)
        assert p.stdout.readline().strip() == "ready"
        procs.append(p)
        return p.pid
    yield start
    for p in procs:
        p.kill()
        p.wait()


def _got(tmp_path, pid) -> bytes:
    path = tmp_path / f"got-{pid}"
    return path.read_bytes() if path.exists() else b""


def test_a_target_whose_socket_links_to_another_agent_gets_nothing_sent(tmp_path, servers):
    victim, target = servers(), servers()
    own = tmp_path / f"agent-{target}.sock"
    os.unlink(own)                          # the target still listens, on a socket with no name
    os.symlink(tmp_path / f"agent-{victim}.sock", own)
    assert agent_steps.find_agents([target]) == {target: str(own)}
    agents = agent_steps.DumpAgents(SimpleNamespace(kind="process", pids=[target]))
    agents.prepare(Stages())
    assert agents.prepared == {} and any("did not prepare" in n for n in agents.notes)
    assert _got(tmp_path, victim) == b"", "the other server was told to prepare"


def test_the_peer_must_be_a_pid_of_the_tree_and_its_uid(tmp_path, servers):
    other = servers()
    path = str(tmp_path / f"agent-{other}.sock")
    with pytest.raises(protocol.AgentError, match=f"listened to by pid {other}"):
        protocol.request(path, "prepare", pids=[os.getpid()])
    with pytest.raises(protocol.AgentError, match="runs as uid"):
        protocol.request(path, "prepare", pids=[other], uid=os.geteuid() + 1)
    assert _got(tmp_path, other) == b""
    assert protocol.request(path, "prepare", pids=[other], uid=os.geteuid())["ok"]
    assert b'"prepare"' in _got(tmp_path, other)


def test_a_symlink_is_not_followed_even_without_expectations(tmp_path, servers):
    other = servers()
    link = tmp_path / "link.sock"
    os.symlink(tmp_path / f"agent-{other}.sock", link)
    with pytest.raises(protocol.AgentError, match="symbolic link"):
        protocol.request(str(link), "status")


def _idle_clients(path: str, n: int, as_uid: int | None) -> list[subprocess.Popen]:
    code = ("import os,sys,socket,time\n"
            "if sys.argv[2] != '-': os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[2]))\n"
            "cs = []\n"
            "for _ in range(int(sys.argv[3])):\n"
            "    c = socket.socket(socket.AF_UNIX); c.connect(sys.argv[1]); cs.append(c)\n"
            "print('connected', flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code, path, str(as_uid) if as_uid is not None else "-",
                          str(n)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "connected"
    return [p]


@pytest.mark.parametrize("stranger", [True, False])
def test_idle_connections_do_not_stall_a_request(stranger):
    if stranger and os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    base = tempfile.mkdtemp(prefix="gpusnap-peer-test-")   # under /tmp: reachable by uid 65534
    os.chmod(base, 0o711)
    agent = Agent(registry.Registry(), socket_dir=os.path.join(base, "run")).start()
    clients = []
    try:
        if stranger:
            os.chmod(agent.socket_dir, 0o711)
            os.chmod(agent.path, 0o666)
        clients = _idle_clients(agent.path, 5, 65534 if stranger else None)
        t0 = time.monotonic()
        reply = protocol.request(agent.path, "status", timeout=10, pids=[os.getpid()])
        assert reply["state"] == "resident"
        assert time.monotonic() - t0 < 2.0
    finally:
        for p in clients:
            p.kill()
            p.wait()
        agent.close()
        subprocess.run(["rm", "-rf", base], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_a_stranger_is_answered_without_being_read():
    base = tempfile.mkdtemp(prefix="gpusnap-peer-test-")
    os.chmod(base, 0o711)
    agent = Agent(registry.Registry(), socket_dir=os.path.join(base, "run")).start()
    try:
        os.chmod(agent.socket_dir, 0o711)
        os.chmod(agent.path, 0o666)
        code = ("import os,sys,socket; os.setgid(65534); os.setuid(65534); "
                "c=socket.socket(socket.AF_UNIX); c.settimeout(5); c.connect(sys.argv[1]); "
                "print(c.recv(4096).decode())")          # sends nothing, is answered anyway
        out = subprocess.run([sys.executable, "-c", code, agent.path], capture_output=True,
                             text=True, timeout=20)
        assert "uid 65534 may not talk to this agent" in out.stdout, out.stderr
    finally:
        agent.close()
        subprocess.run(["rm", "-rf", base], check=False)
