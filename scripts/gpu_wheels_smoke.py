"""What the GPU machine runs from .whl/, run once with those wheels alone (gpu-wheels.sh
--check): moto's server with IAM, an s3:// store round trip through an empty cache, and the
daemon's imports. Run with the checkout and tests/ on PYTHONPATH."""

from __future__ import annotations

import os
import tempfile

from s3server import S3Server

from gpusnap.model import Manifest, Target
from gpusnap.store import Repository


def main() -> None:
    import gpusnap.daemon.server  # noqa: F401  (aiohttp, prometheus_client)
    server = S3Server()
    try:
        os.environ.update(server.env())
        url = f"s3://{server.bucket()}/smoke"
        with tempfile.TemporaryDirectory() as work:
            src = os.path.join(work, "src")
            os.makedirs(src)
            data = os.urandom(3 << 20) + bytes(1 << 20)
            with open(os.path.join(src, "pages-1.img"), "wb") as f:
                f.write(data)
            repo = Repository.open(url, cache=os.path.join(work, "c1"))
            with repo.shared_lock():
                files, counts = repo.ingest_dir(src)
                sid = repo.commit(Manifest(target=Target("process", 1, [1]), pids=[1],
                                           files=files, **counts))
            node = Repository.open(url, cache=os.path.join(work, "c2"), create=False)
            with node.shared_lock():
                node.materialise(node.load(sid), os.path.join(work, "out"))
            with open(os.path.join(work, "out", "pages-1.img"), "rb") as f:
                assert f.read() == data, "restored bytes differ"
    finally:
        server.stop()
    print("gpu wheels: moto server, s3:// round trip, daemon imports: ok")


if __name__ == "__main__":
    main()
