"""criu/netlock.py: CRIU's network lock on a host without iptables. Real sockets."""

from __future__ import annotations

import os
import socket

import pytest

from gpusnap.criu import netlock
from gpusnap.criu.argv import CriuOptions, dump_argv, restore_argv
from gpusnap.errors import CriuFailed

A, B, C = ("127.0.0.1", 40001), ("127.0.0.1", 40002), ("10.0.0.9", 5000)


def test_the_host_tool_comes_first():
    assert netlock.choose("iptables", [(A, C)], [1]) is None
    assert netlock.choose("nftables", [(A, C)], [1]) == "nftables"


def test_without_a_tool_connections_inside_the_tree_skip_the_lock():
    assert netlock.choose(None, [], [1]) is None
    assert netlock.choose(None, [(A, B), (B, A)], [1, 2]) == "skip"


def test_without_a_tool_a_connection_to_the_outside_is_refused():
    with pytest.raises(CriuFailed, match="127.0.0.1:40001 -> 10.0.0.9:5000") as e:
        netlock.choose(None, [(A, B), (B, A), (A, C)], [1, 2])
    assert "iptables" in e.value.hint


def test_lock_tool_and_restore_follow_the_host():
    assert netlock.lock_tool(lambda n: "/x" if n == "nft" else None) == "nftables"
    assert netlock.lock_tool(lambda n: None) is None
    assert netlock.lock_tool(lambda n: "/x") == "iptables"


def test_the_method_reaches_criu_argv():
    opts = CriuOptions(network_lock="skip")
    for argv in (dump_argv("criu", 1, "d", opts), restore_argv("criu", "d", "p", opts)):
        assert argv[argv.index("--network-lock") + 1] == "skip"
    assert "--network-lock" not in dump_argv("criu", 1, "d", CriuOptions())


def test_established_sees_both_ends_of_a_loopback_connection_in_this_process():
    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname())
    peer, _ = srv.accept()
    try:
        conns = netlock.established([os.getpid()])
        mine = [c for c in conns if srv.getsockname() in c]
        assert len(mine) == 2 and netlock.outside(mine) == []
        assert netlock.outside([c for c in mine if c[0] == cli.getsockname()]) != []
    finally:
        for s in (cli, peer, srv):
            s.close()
