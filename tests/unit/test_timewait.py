"""The ports a restore binds (CRIU's files image) and the TIME_WAIT entries on them
(/proc/net/tcp), parsed; the SOCK_DESTROY message; make_room's three outcomes; and, on
this kernel, a real TIME_WAIT entry dropped so that the bind CRIU makes succeeds."""

import io
import socket
import struct
import time

import pytest

from gpusnap.criu import timewait
from gpusnap.imagefile import image, inetsk
from gpusnap.imagefile.protobuf import encode_varint

TCP4 = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:8AC9 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:8AC9 0100007F:A3DA 06 00000000:00000000 03:00001770 00000000     0        0 0 3
   2: 0100007F:1F90 0100007F:A3DB 06 00000000:00000000 03:00001770 00000000     0        0 0 3
"""
TCP6 = """  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:8AC9 00000000000000000000000001000000:D431 06 0
"""


def _field(number: int, value) -> bytes:
    if isinstance(value, bytes):
        return encode_varint(number << 3 | 2) + encode_varint(len(value)) + value
    return encode_varint(number << 3) + encode_varint(value)


def _inet(proto=6, state=10, sport=8080, dport=0, family=2) -> bytes:
    sk = b"".join(_field(n, v) for n, v in ((1, 7), (3, family), (5, proto), (6, state),
                                            (7, sport), (8, dport)))
    return _field(1, inetsk.INETSK) + _field(2, 7) + _field(4, sk)


def _files(*entries: bytes) -> io.BytesIO:
    out = io.BytesIO()
    out.write(struct.pack("<II", image.IMG_COMMON_MAGIC, inetsk.FILES_MAGIC))
    for e in entries:
        image.write_entry(out, e)
    out.seek(0)
    return out


def test_the_files_image_names_the_listeners_and_bound_sockets_not_connections_or_udp():
    regular = _field(1, 1) + _field(2, 3)
    f = _files(regular, _inet(state=10, sport=8080), _inet(state=7, sport=9000),
               _inet(state=1, sport=8080, dport=40000), _inet(proto=17, sport=5353),
               _inet(state=7, sport=0))
    found = inetsk.bound_tcp(f)
    assert [(s.port, s.listening) for s in found] == [(8080, True), (9000, False)]


@pytest.mark.parametrize("bad", [_inet(sport=70000), _field(1, inetsk.INETSK) + _field(4, _field(7, b"x"))])
def test_a_files_image_with_a_wrong_field_is_refused(bad):
    with pytest.raises(ValueError):
        inetsk.bound_tcp(_files(bad))


def test_another_image_is_not_read_as_a_files_image():
    with pytest.raises(ValueError, match="not a files image"):
        inetsk.bound_tcp(io.BytesIO(struct.pack("<II", image.IMG_COMMON_MAGIC, 0x55053847)))


def test_proc_net_tcp_lines_parse_into_kernel_addresses():
    rows = timewait.parse(TCP4, socket.AF_INET)
    assert [(st, e.lport, e.rport) for st, e in rows] == [(10, 35529, 0), (6, 35529, 41946), (6, 8080, 41947)]
    assert rows[1][1].local == socket.inet_aton("127.0.0.1") + bytes(12)
    (st, e6), = timewait.parse(TCP6, socket.AF_INET6)
    assert e6.local == socket.inet_pton(socket.AF_INET6, "::1") and e6.rport == 54321


def test_the_destroy_request_is_a_sock_diag_message_for_that_connection():
    e = timewait.parse(TCP4, socket.AF_INET)[1][1]
    msg = timewait.destroy_request(e, seq=9)
    length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", msg)
    assert (length, kind, flags, seq) == (len(msg), timewait.SOCK_DESTROY, 5, 9)
    family, proto = msg[16], msg[17]
    sport, dport = struct.unpack_from(">HH", msg, 24)
    assert (family, proto, sport, dport) == (socket.AF_INET, 6, 35529, 41946)
    assert msg[28:32] == socket.inet_aton("127.0.0.1") and len(msg) == 16 + 56


class FakeNet:
    """A /proc/self/net whose TIME_WAIT entries go when dropped, or after `expires` s."""

    def __init__(self, tmp_path, expires: float | None = None):
        self.dir, self.expires, self.now, self.dropped = tmp_path, expires, 0.0, []
        self.write(TCP4)
        (tmp_path / "tcp6").write_text(TCP6.splitlines()[0] + "\n")

    def write(self, text):
        (self.dir / "tcp").write_text(text)

    def drop(self, entry) -> bool:
        if self.expires is not None:
            return False
        self.dropped.append(entry.rport)
        self.write("\n".join(l for l in TCP4.splitlines() if f":{entry.rport:04X} " not in l.upper()))
        return True

    def sleep(self, s):
        self.now += s
        if self.expires is not None and self.now >= self.expires:
            self.write(TCP4.splitlines()[0] + "\n")


def test_make_room_drops_the_entries_on_the_ports_asked_for(tmp_path):
    net = FakeNet(tmp_path)
    note = timewait.make_room({35529}, net=str(tmp_path), drop=net.drop, clock=lambda: net.now, sleep=net.sleep)
    assert net.dropped == [41946] and "dropped 1" in note and "35529" in note
    assert timewait.make_room({35529}, net=str(tmp_path), drop=net.drop) is None
    assert timewait.make_room(set(), net=str(tmp_path)) is None


def test_make_room_waits_for_them_where_the_kernel_cannot_drop_them(tmp_path):
    net = FakeNet(tmp_path, expires=30.0)
    note = timewait.make_room({35529, 8080}, net=str(tmp_path), drop=net.drop, clock=lambda: net.now, sleep=net.sleep)
    assert note.startswith("waited 30.0 s") and "8080, 35529" in note


def test_make_room_gives_up_after_wait_max_and_says_so(tmp_path):
    net = FakeNet(tmp_path, expires=1000.0)
    note = timewait.make_room({8080}, wait_max=5, net=str(tmp_path), drop=net.drop,
                              clock=lambda: net.now, sleep=net.sleep)
    assert "still there after 5 s" in note


def _time_wait_on_a_listener() -> int:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    peer = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.close()
    time.sleep(0.05)
    peer.close()
    srv.close()
    return port


def _bind_as_criu(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    return s


def test_a_real_time_wait_entry_blocks_criu_s_bind_until_dropped():
    port = _time_wait_on_a_listener()
    assert timewait.time_wait({port})
    with pytest.raises(OSError) as exc:
        _bind_as_criu(port).close()
    assert exc.value.errno == 98                    # EADDRINUSE: what CRIU met
    if not all(timewait.destroy(e) for e in timewait.time_wait({port})):
        pytest.skip("this kernel or user cannot drop TIME_WAIT entries (make_room waits instead)")
    assert not timewait.time_wait({port})
    _bind_as_criu(port).close()
