"""Reusable test fixtures' building blocks: real processes on loopback, always torn down."""

from .procs import ManagedProcess, free_port, replace_text, short_tmpdir, wait_until

__all__ = ["ManagedProcess", "free_port", "replace_text", "short_tmpdir", "wait_until"]
