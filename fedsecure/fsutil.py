"""Deprecated location of :mod:`fedsecure._durable` (kept while callers move)."""

from fedsecure._durable import atomic_file, atomic_write, fsync_dir

__all__ = ["atomic_file", "atomic_write", "fsync_dir"]
