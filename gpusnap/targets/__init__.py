"""Resolve what the user named (a pid, a container) to a Target."""
