"""The snapshot store: content-addressed zstd chunks, manifests written last.

Layout and write ordering are documented in docs/design.md.
"""

from .repository import Repository, SnapshotSummary  # noqa: F401
