"""PID|CONTAINER, the argument of suspend and resume."""

from __future__ import annotations


def split_target(target: str) -> tuple[int | None, str | None]:
    """(pid, None) for a number, else (None, container name or id)."""
    return (int(target), None) if target.isdigit() else (None, target)
