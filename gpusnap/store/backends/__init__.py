"""Where a store's objects live: a local directory, or an S3-compatible bucket.

One small interface (base.Backend); Repository does all store logic over it and no
backend knows what a chunk or a manifest means. `for_location` picks one from --store.
"""

from __future__ import annotations

from .base import Backend, Missing  # noqa: F401


def is_remote(location: str) -> bool:
    return location.startswith("s3://")


def for_location(location: str) -> Backend:
    """The backend for a --store value: s3://BUCKET/PREFIX, else a local directory."""
    if is_remote(location):
        from .s3 import S3Backend
        return S3Backend(location)
    from .local import LocalBackend
    return LocalBackend(location)
