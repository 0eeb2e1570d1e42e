"""Encryption at rest: recipes first (the only imports callers need), primitives below.

Everything uses ``cryptography`` (AES-256-GCM, scrypt); nothing is hand-rolled.
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
