"""Secure aggregation (Bonawitz et al. 2017; Bell et al. 2020): the round, its messages and their cryptography.

One round has five phases; the coordinator only relays and sums, and learns nothing of one site's
vector but what the sum of at least ``threshold`` sites reveals:

1. **advertise**: each site makes two X25519 key pairs (``c``: to encrypt shares, ``s``: to agree
   pairwise masks) and a 32-byte self-mask seed ``b``, and signs ``c_pk``, ``s_pk`` and a commitment
   to ``b`` with its node key (Ed25519, the key its TEE evidence binds), for this run and round.
2. **share**: each site checks every advert against the consortium's roster of node keys (so the
   coordinator cannot swap a key unnoticed), Shamir-shares ``s_sk`` and ``b`` among the sites, and
   encrypts each peer's pair of shares with AES-256-GCM under HKDF(X25519(c_sk, peer c_pk)),
   bound to the run, the round, the sender and the receiver (a share replayed from another round
   or sent to another site does not decrypt).
3. **masked input**: ``y = x + PRG(b) + sum over peers j of +-PRG(s_ij)`` modulo ``2^bits``, the
   pairwise seeds ``s_ij`` from HKDF(X25519(s_sk_i, s_pk_j)); ``+`` when ``i < j``. Packed in
   ``bits`` bits a value.
4. **consistency**: the coordinator names the sites whose masked input it accepted (``U3``); each
   signs that list, and each checks ``threshold`` signatures over the same list before unmasking.
5. **unmask**: for each peer in ``U3`` a site reveals its share of the peer's ``b``; for each peer
   that shared keys but is not in ``U3`` (dropped), its share of the peer's ``s_sk``; never both.
   The coordinator reconstructs, checks each secret against its advert (the commitment, the public
   key), removes the masks and has the sum.

Every phase needs ``threshold`` sites; fewer, and the round is refused (:class:`SecAggError`).
The PRG is AES-256-CTR on a full 32-byte seed (:mod:`fedsecure.secagg.masking`), and every
primitive comes from ``cryptography``; Shamir's scheme is :mod:`fedsecure.secagg.shamir`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedsecure.errors import SecAggError
from fedsecure.secagg.masking import MAX_BITS
from fedsecure.secagg.shamir import SHARE_BYTES

ADVERT, CONSISTENCY = b"fedsecure-secagg-advert-v1\0", b"fedsecure-secagg-u3-v1\0"


@dataclass(frozen=True)
class RoundSpec:
    """What every party of one round agrees on. Sites are Shamir points (1..65535), sorted."""

    run: str
    round: int
    sites: tuple[int, ...]
    threshold: int
    length: int
    bits: int

    def __post_init__(self) -> None:
        n = len(self.sites)
        if list(self.sites) != sorted(set(self.sites)) or not all(0 < s < 1 << 16 for s in self.sites):
            raise SecAggError(f"round sites {self.sites} must be distinct, sorted and in [1, 65535]")
        if not (n // 2 + 1 <= self.threshold <= n and self.threshold >= 2):
            raise SecAggError(f"threshold {self.threshold} for {n} sites must be in [{max(2, n // 2 + 1)}, {n}]: "
                              "a majority, so that a coordinator cannot unmask one site by claiming the others "
                              "dropped. Fix: federation.secure_aggregation.dropouts below half the sites")
        if not (1 <= self.length and 2 <= self.bits <= MAX_BITS):
            raise SecAggError(f"vector length {self.length} and modulus bits {self.bits} out of range")

    def digest(self) -> bytes:
        """SHA-256 of the canonical spec: what every signature, key and share of the round is bound to."""
        doc = json.dumps({**asdict(self), "sites": list(self.sites)}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(b"fedsecure-secagg-round-v1\0" + doc.encode()).digest()


def dumps(doc: dict[str, Any]) -> bytes:
    """A control message: canonical JSON (bytes as hex)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def loads(data: bytes, what: str, keys: set[str]) -> dict[str, Any]:
    """A control message with exactly ``keys``; raises SecAggError naming ``what`` otherwise."""
    try:
        doc = json.loads(bytes(data))
    except (ValueError, TypeError, UnicodeDecodeError):
        raise SecAggError(f"{what}: not a secure-aggregation message") from None
    if not isinstance(doc, dict) or set(doc) != keys:
        raise SecAggError(f"{what}: message fields {sorted(doc) if isinstance(doc, dict) else '?'} are not "
                          f"{sorted(keys)}")
    return doc


def unhex(value: object, size: int | None, what: str) -> bytes:
    """Bytes from a hex field of the expected size; raises SecAggError naming ``what``."""
    try:
        out = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        out = None
    if out is None or (size is not None and len(out) != size):
        raise SecAggError(f"{what}: malformed field (expected {size} bytes as hex)")
    return out


def kdf(secret: bytes, label: bytes, spec: RoundSpec, a: int, b: int) -> bytes:
    """32 bytes from a shared secret, bound to the round and the ordered pair (a, b)."""
    info = label + spec.digest() + a.to_bytes(2, "big") + b.to_bytes(2, "big")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def raw(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def b_commitment(spec: RoundSpec, site: int, b: bytes) -> bytes:
    """What a site's advert commits its self-mask seed to (checked after reconstruction)."""
    return hashlib.sha256(b"fedsecure-secagg-b\0" + spec.digest() + site.to_bytes(2, "big") + b).digest()


def sign_advert(node_key: Ed25519PrivateKey, spec: RoundSpec, site: int, c_pk: bytes, s_pk: bytes,
                commit: bytes) -> bytes:
    """The signed advert of ``site``."""
    body = spec.digest() + site.to_bytes(2, "big") + c_pk + s_pk + commit
    return dumps({"site": site, "c_pk": c_pk.hex(), "s_pk": s_pk.hex(), "b_commit": commit.hex(),
                  "sig": node_key.sign(ADVERT + body).hex()})


@dataclass(frozen=True)
class Advert:
    """A verified advert: the site's two public keys and its commitment to ``b``."""

    site: int
    c_pk: bytes
    s_pk: bytes
    b_commit: bytes


def verify_advert(data: bytes, spec: RoundSpec, sender: int, roster: dict[int, Ed25519PublicKey]) -> Advert:
    """The advert ``sender`` sent, checked against its node key in ``roster``; raises SecAggError with the reason
    (a key the coordinator swapped, an advert of another round or site).
    """
    what = f"advert of site {sender}"
    doc = loads(data, what, {"site", "c_pk", "s_pk", "b_commit", "sig"})
    if doc["site"] != sender:
        raise SecAggError(f"{what}: it names site {doc['site']}")
    if sender not in roster:
        raise SecAggError(f"{what}: site {sender} is not in this site's roster of node keys")
    c_pk, s_pk = unhex(doc["c_pk"], 32, what), unhex(doc["s_pk"], 32, what)
    commit, sig = unhex(doc["b_commit"], 32, what), unhex(doc["sig"], 64, what)
    try:
        roster[sender].verify(sig, ADVERT + spec.digest() + sender.to_bytes(2, "big") + c_pk + s_pk + commit)
    except InvalidSignature:
        raise SecAggError(f"{what}: its keys are not signed by site {sender}'s node key for this round (a swapped "
                          "public key, or an advert replayed from another round)") from None
    return Advert(sender, c_pk, s_pk, commit)


def seal_shares(c_sk: X25519PrivateKey, peer_c_pk: bytes, spec: RoundSpec, sender: int, receiver: int,
                s_share: bytes, b_share: bytes) -> bytes:
    """The two shares for ``receiver``, AES-256-GCM under a key only the two sites can derive."""
    key = kdf(c_sk.exchange(X25519PublicKey.from_public_bytes(peer_c_pk)), b"share", spec,
              min(sender, receiver), max(sender, receiver))
    nonce = os.urandom(12)
    ad = spec.digest() + sender.to_bytes(2, "big") + receiver.to_bytes(2, "big")
    return nonce + AESGCM(key).encrypt(nonce, s_share + b_share, ad)


def open_shares(c_sk: X25519PrivateKey, peer_c_pk: bytes, spec: RoundSpec, sender: int, receiver: int,
                blob: bytes) -> tuple[bytes, bytes]:
    """(share of the sender's s_sk, share of its b) from ``blob``; raises SecAggError where it does not decrypt
    for this round, sender and receiver (replayed, redirected or altered).
    """
    key = kdf(c_sk.exchange(X25519PublicKey.from_public_bytes(peer_c_pk)), b"share", spec,
              min(sender, receiver), max(sender, receiver))
    ad = spec.digest() + sender.to_bytes(2, "big") + receiver.to_bytes(2, "big")
    try:
        plain = AESGCM(key).decrypt(blob[:12], blob[12:], ad) if len(blob) > 28 else None
    except InvalidTag:
        plain = None
    if plain is None or len(plain) != 2 * SHARE_BYTES:
        raise SecAggError(f"shares from site {sender} to site {receiver} do not decrypt for this round (replayed "
                          "from another round or site, or altered)")
    return plain[:SHARE_BYTES], plain[SHARE_BYTES:]


def pair_seed(s_sk: X25519PrivateKey, peer_s_pk: bytes, spec: RoundSpec, a: int, b: int) -> bytes:
    """The pairwise mask seed of sites ``a`` and ``b`` (the same from either end)."""
    return kdf(s_sk.exchange(X25519PublicKey.from_public_bytes(peer_s_pk)), b"mask", spec, min(a, b), max(a, b))


def self_seed(b: bytes, spec: RoundSpec, site: int) -> bytes:
    """The self-mask seed of ``site`` (HKDF of its ``b``, bound to the round)."""
    return kdf(b, b"self", spec, site, site)


def u3_body(spec: RoundSpec, u3: list[int]) -> bytes:
    """What each site signs in the consistency phase."""
    return CONSISTENCY + spec.digest() + b"".join(s.to_bytes(2, "big") for s in sorted(u3))


def vector_message(spec: RoundSpec, vector: bytes) -> bytes:
    """What a site's node key signs with its masked vector (binds it to the round and the attested key)."""
    return b"fedsecure-secagg-vector-v1\0" + spec.digest() + hashlib.sha256(vector).digest()
