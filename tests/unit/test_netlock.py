"""criu/netlock.py: CRIU's network lock on a host without iptables. Real sockets."""

from __future__ import annotations

import os
import socket

import pytest

from gpusnap.criu import netlock
from gpusnap.targets import fds
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


PROC_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:9C41 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000     0        0 1001 1 0 20 4 30 10 -1
   1: 0100007F:A1B2 0100007F:9C41 01 00040000:0001F000 01:00000014 00000000     0        0 1002 1 0 20 4 30 10 -1
   2: 0100007F:A1B3 0100007F:9C42 01 00020000:00000000 04:000000C8 00000000     0        0 1003 1 0 20 4 30 10 -1
   3: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2000 1 0 20 4 30 10 -1
   4: garbage
"""


def test_queues_reads_the_sockets_asked_for():
    q = netlock.queues(PROC_TCP, {1001, 1002, 1003, 9999})
    assert q == {1001: netlock.Queue("01", 0, 0, 0),
                 1002: netlock.Queue("01", 0x40000, 0x1F000, 1),
                 1003: netlock.Queue("01", 0x20000, 0, 4)}


def test_settled_wants_no_unacked_data_and_queues_that_held_still():
    q = netlock.queues(PROC_TCP, {1001, 1003})
    assert netlock.settled(q, dict(q)), "idle, and a full window (probe timer): settled"
    moving = {**q, 1001: netlock.Queue("01", 10, 0, 0)}
    assert not netlock.settled(q, moving)
    waiting = netlock.queues(PROC_TCP, {1001, 1002})
    assert not netlock.settled(waiting, dict(waiting)), "1002's data waits for its ACK"


def test_socket_inodes_of_this_process():
    import os
    import socket
    with socket.socket() as s:
        inode = os.fstat(s.fileno()).st_ino
        assert inode in fds.socket_inodes([os.getpid()])
