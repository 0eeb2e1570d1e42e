"""Encryption at rest: recipes first (the only imports callers need), primitives below.

Everything uses ``cryptography`` (AES-256-GCM, scrypt); nothing is hand-rolled. Modules:
:mod:`~fedsecure.crypto.keys` (keyrings and providers), :mod:`~fedsecure.crypto.sealed` (sealed files,
the public entry point), :mod:`~fedsecure.crypto.layout` (the format's bytes, deterministic),
:mod:`~fedsecure.crypto.reader` (opening), :mod:`~fedsecure.crypto.tensors` (safetensors inside sealed
files) and :mod:`~fedsecure.crypto.rotation` (KEK rotation).
"""

from fedsecure.crypto.keys import KeyRing, generate_keyring, read_keyring_file, write_keyring_file
from fedsecure.crypto.sealed import (
    SUFFIX,
    SealedWriter,
    inspect,
    open_bytes,
    open_to_file,
    rewrap,
    seal_bytes,
    seal_file,
)
from fedsecure.crypto.tensors import open_tensors, seal_tensors

__all__ = ["SUFFIX", "KeyRing", "SealedWriter", "generate_keyring", "inspect", "open_bytes", "open_tensors",
           "open_to_file", "read_keyring_file", "rewrap", "seal_bytes", "seal_file", "seal_tensors",
           "write_keyring_file"]
