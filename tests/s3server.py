"""A real S3-compatible server for tests: moto's server mode as a subprocess on a free
127.0.0.1 port, with request signing checked (IAM on), plus a fault-injecting proxy.

moto keeps objects in memory, so a test that needs the server to vanish mid-transfer and
come back with its objects cuts the proxy instead of killing the server.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time

POLICY = ('{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*",'
          '"Resource":"*"}]}')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class S3Server:
    """moto_server on 127.0.0.1; an IAM user whose key signs every request."""

    def __init__(self):
        self.port = free_port()
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3", MOTO_PORT=str(self.port))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(self.port)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        import boto3
        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="gpusnap")
        key = iam.create_access_key(UserName="gpusnap")["AccessKey"]
        iam.put_user_policy(UserName="gpusnap", PolicyName="all", PolicyDocument=POLICY)
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]

    def env(self, endpoint: str | None = None) -> dict:
        return {"AWS_ENDPOINT_URL": endpoint or self.endpoint, "AWS_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                "GPUSNAP_S3_RETRIES": "4"}

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.key_id, aws_secret_access_key=self.secret)

    def bucket(self) -> str:
        name = "gpusnap-" + secrets.token_hex(6)
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class RcloneS3Server(S3Server):
    """`rclone serve s3` on 127.0.0.1 over a directory (objects are files; Go, every core):
    a faster server than moto's one Python process, for benchmarks (benchmarks/fleet.py
    --server rclone). Not what the tests use: it does not enforce If-None-Match (moto
    does), and its errors and listings are its gofakes3 layer's. rclone: GPUSNAP_RCLONE,
    else on PATH."""

    def __init__(self, root: str):
        import shutil
        binary = os.environ.get("GPUSNAP_RCLONE") or shutil.which("rclone")
        if not binary:
            raise RuntimeError("rclone not found (set GPUSNAP_RCLONE)")
        self.port = free_port()
        self.key_id, self.secret = "gpusnap" + secrets.token_hex(4), secrets.token_hex(16)
        os.makedirs(root, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "serve", "s3", "--addr", f"127.0.0.1:{self.port}",
             "--auth-key", f"{self.key_id},{self.secret}", "--no-modtime",
             "--config", "/dev/null", root],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        wait_port(self.port)
        self.endpoint = f"http://127.0.0.1:{self.port}"


class FaultProxy:
    """HTTP/1.1 proxy on 127.0.0.1 in front of the server, one request per upstream
    connection. fail_next(n): answer the next n requests 503 SlowDown. cut_after(nbytes):
    once that many bytes went through (requests and answers), drop every connection and refuse new
    ones (the server is gone) until restore()."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.failing = 0
        self.failed = 0
        self.budget: int | None = None
        self.down = False
        self.requests = 0
        self.lines: list[str] = []          # each request's first line ("GET /bucket/key ...")
        self._lock = threading.Lock()
        self._closed = False
        self._conns: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def fail_next(self, n: int) -> None:
        self.failing = n

    def cut_after(self, nbytes: int) -> None:
        self.budget = nbytes

    def restore(self) -> None:
        self.down, self.budget = False, None

    def close(self) -> None:
        """Stop, leaving no thread behind (tests after this one count threads)."""
        self._closed = True
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for t in self._threads:
            t.join(10)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
                t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
                self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while not self.down:
                request = _read_request(conn)
                if request is None:
                    return
                with self._lock:
                    self.requests += 1
                    self.lines.append(request.split(b"\r\n", 1)[0].decode("latin-1"))
                    if self.failing > 0:
                        self.failing -= 1
                        self.failed += 1
                        conn.sendall(_SLOWDOWN)
                        continue
                    if self.budget is not None:
                        self.budget -= len(request)
                        if self.budget < 0:
                            self.down = True
                if self.down:
                    return
                response = _forward(self.upstream, request)
                with self._lock:
                    if self.budget is not None:
                        self.budget -= len(response)
                        if self.budget < 0:             # gone halfway through the answer
                            self.down = True
                            conn.sendall(response[:len(response) // 2])
                            return
                conn.sendall(response)
        except OSError:
            pass
        finally:
            conn.close()


_BODY = b'<?xml version="1.0"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>'
_SLOWDOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: "
             + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)


def _read_request(conn: socket.socket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return None
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    lines = head.split(b"\r\n")
    kept = [lines[0]]
    for line in lines[1:]:
        name = line.split(b":", 1)[0].strip().lower()
        if name == b"content-length":
            length = int(line.split(b":", 1)[1])
        if name == b"expect" and len(body) < length:
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if name not in (b"connection", b"expect"):
            kept.append(line)
    while len(body) < length:
        more = conn.recv(1 << 20)
        if not more:
            return None
        body += more
    return b"\r\n".join(kept + [b"Connection: close"]) + b"\r\n\r\n" + body


def _forward(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as up:
        up.sendall(request)
        out = []
        while True:
            more = up.recv(1 << 20)
            if not more:
                break
            out.append(more)
    response = b"".join(out)
    head, sep, body = response.partition(b"\r\n\r\n")
    lines = [line for line in head.split(b"\r\n")
             if line.split(b":", 1)[0].strip().lower() != b"connection"]
    return b"\r\n".join(lines + [b"Connection: keep-alive"]) + sep + body


# ---- fixtures (import them into a test module to use them) -------------------------------
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The server's endpoint and credentials in this process's environment; a new bucket."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server.bucket()
