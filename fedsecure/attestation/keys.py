"""A site's Ed25519 keys (the node key, the software provider's signer), kept as 0600 PEM files.

Site side only: the coordinator receives public keys as raw bytes and needs none of this.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsecure._durable import atomic_write
from fedsecure.errors import AttestationError


def load_or_create_ed25519(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 key kept as a 0600 PKCS#8 PEM file; created on first use."""
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise AttestationError(f"{path} is readable by group or others. Fix: chmod 600 {path}")
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError:
            raise AttestationError(f"{path} is not a PEM private key (damaged?). Fix: restore it from backup; "
                                   "deleting it makes a new node identity the coordinator has not seen") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise AttestationError(f"{path} is not an Ed25519 key")
        return key
    key = Ed25519PrivateKey.generate()
    atomic_write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    return key


def raw_public(key: Ed25519PrivateKey) -> bytes:
    """The key's 32-byte raw public key, as bound into the report data and sent to the coordinator."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
