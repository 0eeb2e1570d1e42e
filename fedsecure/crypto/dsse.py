"""Signed statements about files: an in-toto Statement (v1) in a DSSE envelope, signed with Ed25519.

Used for the compliance report (``fedsecure report``): the Statement names each file of the report by its
SHA-256 (its *subjects*) and carries a short predicate; the envelope's signature covers the Statement through
DSSE's pre-authentication encoding (PAE), so a changed byte in any subject file, in the Statement or in the
envelope's payload type fails :func:`verify_files`. Every primitive is ``cryptography``'s; nothing here is a
hand-rolled construction (DSSE: https://github.com/secure-systems-lab/dsse/blob/master/protocol.md; in-toto
Statement v1: https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md).

The key id is the SHA-256 of the raw 32-byte public key, in hex. A verifier must get the public key (or at
least its key id) from somewhere other than the report folder: a key shipped beside a report proves only that
someone with *a* key signed it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedsecure.errors import IntegrityError, KeyMaterialError

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
MAX_ENVELOPE_BYTES = 16 << 20

__all__ = ["PAYLOAD_TYPE", "STATEMENT_TYPE", "key_id", "load_public_key", "pae", "public_pem", "sign_files",
           "verify_files"]


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what the signature covers."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def key_id(public: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, hex."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_pem(public: Ed25519PublicKey) -> bytes:
    """The public key as PEM (SubjectPublicKeyInfo)."""
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (a private key PEM is accepted too: its public half is used).

    Raises:
        KeyMaterialError: The file is missing or holds no Ed25519 key.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise KeyMaterialError(f"cannot read the public key {p}: {e.strerror}. Fix: pass the report key's "
                               ".pub.pem file.") from None
    try:
        key: Any = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError):
            raise KeyMaterialError(f"{p} holds no PEM key. Fix: pass the report key's .pub.pem file.") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyMaterialError(f"{p} is not an Ed25519 key. Fix: pass the report key's .pub.pem file.")
    return key


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sign_files(key: Ed25519PrivateKey, files: Sequence[Path], predicate_type: str,
               predicate: Mapping[str, Any]) -> dict[str, Any]:
    """A DSSE envelope over an in-toto Statement whose subjects are ``files`` (by file name and SHA-256)."""
    statement = {"_type": STATEMENT_TYPE,
                 "subject": [{"name": f.name, "digest": {"sha256": _sha256(f)}} for f in files],
                 "predicateType": predicate_type, "predicate": dict(predicate)}
    body = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    sig = key.sign(pae(PAYLOAD_TYPE, body))
    return {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(body).decode(),
            "signatures": [{"keyid": key_id(key.public_key()), "sig": base64.b64encode(sig).decode()}]}


def verify_files(envelope_path: str | Path, public: Ed25519PublicKey, folder: str | Path | None = None,
                 *, required: Sequence[str] = ()) -> dict[str, Any]:
    """Check the envelope's signature with ``public``, then every subject file (in ``folder``, by default the
    envelope's) against its recorded SHA-256. Returns the Statement.

    Raises:
        IntegrityError: The envelope is malformed, no signature verifies under ``public``, a subject file is
            missing or changed, or a file named in ``required`` is not a subject.
    """
    ep = Path(envelope_path)
    where = Path(folder) if folder is not None else ep.parent
    try:
        if ep.stat().st_size > MAX_ENVELOPE_BYTES:
            raise IntegrityError(f"{ep} is larger than {MAX_ENVELOPE_BYTES} bytes; not a report signature")
        env = json.loads(ep.read_bytes())
        body = base64.b64decode(env["payload"], validate=True)
        sigs = [(s.get("keyid"), base64.b64decode(s["sig"], validate=True)) for s in env["signatures"]]
        payload_type = env["payloadType"]
    except OSError as e:
        raise IntegrityError(f"cannot read the signature {ep}: {e.strerror}. Fix: pass the report's folder "
                             "with its report.dsse.json.") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise IntegrityError(f"{ep} is not a DSSE envelope ({type(e).__name__}: {e}). The signature file was "
                             "damaged or replaced: regenerate the report.") from None
    if payload_type != PAYLOAD_TYPE:
        raise IntegrityError(f"{ep}: payload type {payload_type!r:.60}, expected {PAYLOAD_TYPE}")
    message = pae(payload_type, body)
    for _, sig in sigs:
        try:
            public.verify(sig, message)
            break
        except InvalidSignature:
            continue
    else:
        kids = ", ".join(str(k)[:16] for k, _ in sigs) or "none"
        raise IntegrityError(f"{ep}: no signature verifies under key {key_id(public)[:16]} (signed by {kids}). "
                             "The report or its signature was changed, or it was signed by another key: check "
                             "that --key is the signer's public key.")
    try:
        statement = json.loads(body)
        subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    except (ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"{ep}: the signed statement is malformed ({e})") from None
    if statement.get("_type") != STATEMENT_TYPE:
        raise IntegrityError(f"{ep}: not an in-toto Statement v1")
    for name in required:
        if name not in subjects:
            raise IntegrityError(f"{ep}: {name} is not among the signed files ({', '.join(subjects)})")
    for name, digest in subjects.items():
        if Path(name).name != name:
            raise IntegrityError(f"{ep}: subject {name!r:.80} is not a plain file name")
        f = where / name
        if not f.is_file():
            raise IntegrityError(f"{f} is signed but missing. Fix: keep the report's files together.")
        actual = _sha256(f)
        if actual != digest:
            raise IntegrityError(f"{f} was changed after it was signed (sha256 {actual[:16]}, signed "
                                 f"{digest[:16]}). Do not trust it: regenerate the report from the run.")
    return statement
