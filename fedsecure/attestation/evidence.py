"""Evidence envelopes and the binding of evidence to a challenge, a node key and a DP configuration.

An :class:`Evidence` is what a site's provider returns: the TEE type, the raw evidence (a TDX
quote, an SEV-SNP report, a signed software statement, NVIDIA GPU evidence) and auxiliary blobs
(certificates). It travels as a small JSON envelope (:meth:`Evidence.to_bytes`); the parser
trusts nothing (size cap, known fields only, base64 checked).

What a site proves is fixed by :func:`report_data`, the 64 bytes it asks its TEE to sign::

    SHA-512("fedsecure-attestation-v1" || len||nonce || len||node public key
            || len||SHA-256(DP configuration) || len||code hash)

so one piece of evidence answers exactly one coordinator challenge, for one node key, with one
set of privacy settings and one build of the code. 64 bytes is the size of both TDX REPORTDATA
and SEV-SNP REPORT_DATA.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.metadata
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from fedsecure._durable import canonical_json as _canonical
from fedsecure.attestation.base import registered_tees, tee_info, tee_names
from fedsecure.errors import AttestationError

MAX_EVIDENCE_BYTES = 1 << 20
ENVELOPE_VERSION = 1
_DOMAIN = b"fedsecure-attestation-v1"
_UPDATE_DOMAIN = b"fedsecure-update-v1"
#: packages whose version is part of the code hash (the DP and training stack)
CODE_PACKAGES = ("fedsecure", "torch", "opacus", "flwr", "peft", "transformers", "cryptography")


def __getattr__(name: str) -> tuple[str, ...]:
    """``TEE_TYPES``: the registered TEE types (:func:`fedsecure.attestation.base.tee_names`), read when asked."""
    if name == "TEE_TYPES":
        return tee_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Evidence:
    """A piece of evidence: its TEE type, the raw evidence, the provider that made it and auxiliary blobs."""

    tee: str
    blob: bytes
    provider: str = ""
    aux: Mapping[str, bytes] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """The JSON envelope that carries this evidence (sorted keys, base64 blobs)."""
        doc = {"fedsecure-evidence": ENVELOPE_VERSION, "tee": self.tee, "provider": self.provider,
               "blob": base64.b64encode(self.blob).decode(),
               "aux": {k: base64.b64encode(v).decode() for k, v in sorted(self.aux.items())}}
        return _canonical(doc)

    @classmethod
    def from_bytes(cls, data: bytes) -> Evidence:
        """Parse an envelope strictly; raises AttestationError naming what is wrong."""
        if len(data) > MAX_EVIDENCE_BYTES:
            raise AttestationError(f"evidence is {len(data)} bytes, over the {MAX_EVIDENCE_BYTES}-byte limit")
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise AttestationError("evidence is not a fedsecure evidence envelope (not JSON)") from None
        if not isinstance(doc, dict) or doc.get("fedsecure-evidence") != ENVELOPE_VERSION:
            raise AttestationError(f"evidence envelope version must be {ENVELOPE_VERSION}")
        unknown = set(doc) - {"fedsecure-evidence", "tee", "provider", "blob", "aux"}
        if unknown:
            raise AttestationError(f"evidence envelope has unknown fields {sorted(unknown)}")
        tee = doc.get("tee")
        if not isinstance(tee, str) or tee_info(tee) is None:
            raise AttestationError(f"evidence TEE type {tee!r} is not one of {', '.join(tee_names())}")
        aux = doc.get("aux", {})
        if not isinstance(aux, dict) or not isinstance(doc.get("provider", ""), str):
            raise AttestationError("evidence envelope fields have the wrong types")
        return cls(tee=tee, blob=_b64(doc.get("blob"), "blob"), provider=doc.get("provider", ""),
                   aux={str(k): _b64(v, f"aux.{k}") for k, v in aux.items()})


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise AttestationError(f"evidence field {what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise AttestationError(f"evidence field {what} is not valid base64") from None


def detect(data: bytes) -> Evidence:
    """An envelope, or raw evidence recognised by its header.

    Each TEE registers its own test (:attr:`~fedsecure.attestation.base.TeeInfo.recognize`): a TDX quote
    is version 4/5 with TEE type 0x81, an SEV-SNP report 1184 bytes of version >= 2.
    """
    head = data.lstrip()[:1]
    if head == b"{":
        return Evidence.from_bytes(data)
    raw = [info for info in registered_tees() if info.recognize is not None]
    for info in raw:
        if info.recognize is not None and info.recognize(data):
            return Evidence(info.name, data, provider="file")
    formats = ["a fedsecure envelope"] + [info.raw_format or f"raw {info.name} evidence" for info in raw]
    listed = ", ".join(formats[:-1]) + (" or " if len(formats) > 1 else "") + formats[-1]
    raise AttestationError(f"cannot tell what this evidence is: not {listed}")


def canonical_json(obj: Mapping[str, Any]) -> str:
    """``obj`` as canonical JSON text (:func:`fedsecure._durable.canonical_json`)."""
    return _canonical(obj).decode()


def dp_config_hash(dp_config: str) -> bytes:
    """SHA-256 of the site's DP configuration document (canonical JSON, as sent)."""
    return hashlib.sha256(dp_config.encode()).digest()


def report_data(nonce: bytes, node_key: bytes, dp_config: str, code_hash: str) -> bytes:
    """The 64 bytes a site's TEE must sign for this challenge (see the module docstring)."""
    h = hashlib.sha512(_DOMAIN)
    for part in (nonce, node_key, dp_config_hash(dp_config), bytes.fromhex(code_hash)):
        h.update(struct.pack(">I", len(part)) + part)
    return h.digest()


def update_message(nonce: bytes, update_digest: bytes) -> bytes:
    """What the node key signs: the update, tied to this round's challenge."""
    return _UPDATE_DOMAIN + struct.pack(">I", len(nonce)) + nonce + update_digest


@lru_cache(maxsize=1)
def code_hash() -> str:
    """SHA-256 over fedsecure's source and assets (path + bytes, sorted) and the versions of the DP and
    training stack.

    A site binds it into its evidence; the policy lists the builds it accepts.
    """
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(b"fedsecure-code-v1\0")
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".json", ".pem")
                    and "__pycache__" not in p.parts):
        rel = f.relative_to(root).as_posix().encode()
        data = f.read_bytes()
        h.update(struct.pack(">I", len(rel)) + rel + struct.pack(">Q", len(data)) + data)
    for pkg in CODE_PACKAGES:
        try:
            version = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            version = "absent"
        h.update(f"\0{pkg}=={version}".encode())
    return h.hexdigest()
