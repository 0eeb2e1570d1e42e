"""A site's side of one secure-aggregation round (phases in :mod:`fedsecure.secagg.protocol`).

The site trusts the coordinator with nothing: every advert is checked against the site's own roster
of node keys, every share must decrypt for this round, sender and receiver, it unmasks only after
``threshold`` signatures over one list of surviving sites, and it never reveals both secrets of one
peer. Each call refuses (:class:`SecAggError`, with the reason) anything else, and the session then
refuses every later phase: a refused round releases nothing more.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from fedsecure.errors import SecAggError
from fedsecure.secagg import masking, shamir
from fedsecure.secagg.protocol import (
    Advert,
    RoundSpec,
    b_commitment,
    dumps,
    loads,
    open_shares,
    pair_seed,
    raw,
    seal_shares,
    self_seed,
    sign_advert,
    u3_body,
    unhex,
    verify_advert,
)


class SiteSecAgg:
    """One site's session for one round. Call the phases in order: :meth:`advertise`, :meth:`share`,
    :meth:`masked_input`, :meth:`consistency`, :meth:`unmask`.

    Args:
        site: this site's Shamir point (its index in the round).
        spec: the round, as the coordinator announced it (its digest binds every message).
        node_key: the site's attested node key (signs its adverts and the consistency list).
        roster: site -> node public key of every site of the consortium (from the site's own configuration).
    """

    def __init__(self, site: int, spec: RoundSpec, node_key: Ed25519PrivateKey,
                 roster: dict[int, Ed25519PublicKey]) -> None:
        if site not in spec.sites:
            raise SecAggError(f"site {site} is not among the round's sites {list(spec.sites)}")
        if roster.get(site) is None or raw(roster[site]) != raw(node_key.public_key()):
            raise SecAggError(f"site {site}: the roster's node key is not this site's own")
        self.site, self.spec, self.node_key, self.roster = site, spec, node_key, roster
        self.c_sk, self.s_sk, self.b = X25519PrivateKey.generate(), X25519PrivateKey.generate(), os.urandom(32)
        self.phase = 0
        self.adverts: dict[int, Advert] = {}
        self.received: dict[int, bytes] = {}  # sender -> sealed shares (U2 as this site saw it)
        self.own: tuple[bytes, bytes] | None = None  # this site's shares of its own s_sk and b
        self.u3: list[int] | None = None

    # ------------------------------------------------------------------ between messages
    def to_bytes(self) -> bytes:
        """The session's state (secret: private keys, ``b``, received shares), for the site's own memory between
        the round's messages (Flower's node state, which never leaves the node).
        """
        def sk(k: X25519PrivateKey) -> str:
            return k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()).hex()

        return dumps({"site": self.site, "spec": {**self.spec.__dict__, "sites": list(self.spec.sites)},
                      "c_sk": sk(self.c_sk), "s_sk": sk(self.s_sk), "b": self.b.hex(), "phase": self.phase,
                      "adverts": {str(k): [a.c_pk.hex(), a.s_pk.hex(), a.b_commit.hex()]
                                  for k, a in self.adverts.items()},
                      "received": {str(k): v.hex() for k, v in self.received.items()},
                      "own": [x.hex() for x in self.own] if self.own else None, "u3": self.u3})

    @classmethod
    def from_bytes(cls, data: bytes, node_key: Ed25519PrivateKey, roster: dict[int, Ed25519PublicKey]) -> SiteSecAgg:
        """A session saved by :meth:`to_bytes` (the node key and roster are the site's own, given again)."""
        doc = loads(data, "saved secure-aggregation session", {"site", "spec", "c_sk", "s_sk", "b", "phase",
                                                                  "adverts", "received", "own", "u3"})
        spec = RoundSpec(**{**doc["spec"], "sites": tuple(doc["spec"]["sites"])})
        self = cls(doc["site"], spec, node_key, roster)
        self.c_sk = X25519PrivateKey.from_private_bytes(bytes.fromhex(doc["c_sk"]))
        self.s_sk = X25519PrivateKey.from_private_bytes(bytes.fromhex(doc["s_sk"]))
        self.b, self.phase = bytes.fromhex(doc["b"]), int(doc["phase"])
        self.adverts = {int(k): Advert(int(k), *(bytes.fromhex(x) for x in v)) for k, v in doc["adverts"].items()}
        self.received = {int(k): bytes.fromhex(v) for k, v in doc["received"].items()}
        self.own = tuple(bytes.fromhex(x) for x in doc["own"]) if doc["own"] else None  # type: ignore[assignment]
        self.u3 = doc["u3"]
        return self

    def _step(self, expected: int, name: str) -> None:
        if self.phase != expected:
            raise SecAggError(f"site {self.site}: {name} out of order (phase {self.phase}); the round is refused")
        self.phase = -1  # refused unless the phase completes

    def advertise(self) -> bytes:
        """Phase 1: the signed public keys and the commitment to ``b``."""
        self._step(0, "advertise")
        out = sign_advert(self.node_key, self.spec, self.site, raw(self.c_sk.public_key()),
                          raw(self.s_sk.public_key()), b_commitment(self.spec, self.site, self.b))
        self.phase = 1
        return out

    def share(self, adverts: dict[int, bytes]) -> dict[int, bytes]:
        """Phase 2: check every advert; returns receiver -> sealed shares of ``s_sk`` and ``b``."""
        self._step(1, "share")
        if len(adverts) < self.spec.threshold:
            raise SecAggError(f"site {self.site}: {len(adverts)} sites advertised keys, {self.spec.threshold} needed")
        for sender, data in sorted(adverts.items()):
            if sender not in self.spec.sites:
                raise SecAggError(f"site {self.site}: an advert from site {sender}, not in the round")
            self.adverts[sender] = verify_advert(data, self.spec, sender, self.roster)
        mine = self.adverts.get(self.site)
        if mine is None or mine.c_pk != raw(self.c_sk.public_key()) or mine.s_pk != raw(self.s_sk.public_key()):
            raise SecAggError(f"site {self.site}: the coordinator relayed another advert in place of this site's own")
        s_raw = self.s_sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        points = sorted(self.adverts)
        s_shares = shamir.split(s_raw, points, self.spec.threshold)
        b_shares = shamir.split(self.b, points, self.spec.threshold)
        self.own = (s_shares[self.site], b_shares[self.site])
        out = {j: seal_shares(self.c_sk, self.adverts[j].c_pk, self.spec, self.site, j, s_shares[j], b_shares[j])
               for j in points if j != self.site}
        self.phase = 2
        return out

    def masked_input(self, sealed: dict[int, bytes], x: np.ndarray) -> bytes:
        """Phase 3: keep the shares sent to this site; returns ``x`` masked, packed in ``bits`` bits a value.

        ``x``: signed integers with ``|x| < 2^(bits - 1)`` (the caller sized the modulus for the sum).
        """
        self._step(2, "masked input")
        peers = sorted(j for j in sealed if j != self.site)
        if len(peers) + 1 < self.spec.threshold:
            raise SecAggError(f"site {self.site}: shares from {len(peers)} peers, {self.spec.threshold - 1} needed")
        for j in peers:
            if j not in self.adverts:
                raise SecAggError(f"site {self.site}: shares from site {j}, which did not advertise keys")
            open_shares(self.c_sk, self.adverts[j].c_pk, self.spec, j, self.site, sealed[j])  # checked now
        self.received = {j: sealed[j] for j in peers}
        x = np.asarray(x)
        if x.shape != (self.spec.length,):
            raise SecAggError(f"site {self.site}: input of shape {x.shape}, the round sums {self.spec.length} values")
        bits = self.spec.bits
        y = masking.add(masking.to_ring(x, bits), masking.prg(self_seed(self.b, self.spec, self.site),
                                                              x.size, bits), bits)
        for j in peers:
            mask = masking.prg(pair_seed(self.s_sk, self.adverts[j].s_pk, self.spec, self.site, j), x.size, bits)
            y = masking.add(y, mask, bits) if self.site < j else masking.sub(y, mask, bits)
        self.phase = 3
        return masking.pack(y, bits)

    def consistency(self, u3: list[int]) -> bytes:
        """Phase 4: sign the coordinator's list of sites whose masked input it accepted."""
        self._step(3, "consistency")
        u3 = sorted(set(u3))
        if self.site not in u3 or not set(u3) <= set(self.received) | {self.site}:
            raise SecAggError(f"site {self.site}: the surviving sites {u3} are not a subset of those that shared "
                              "keys with this site (or omit it)")
        if len(u3) < self.spec.threshold:
            raise SecAggError(f"site {self.site}: {len(u3)} sites survive, {self.spec.threshold} needed; the round "
                              "is refused")
        self.u3 = u3
        self.phase = 4
        return dumps({"site": self.site, "sig": self.node_key.sign(u3_body(self.spec, u3)).hex()})

    def unmask(self, signatures: dict[int, bytes]) -> bytes:
        """Phase 5: after ``threshold`` valid signatures over the same list, reveal for each peer that survived
        its share of ``b`` and for each that dropped its share of ``s_sk``; never both.
        """
        self._step(4, "unmask")
        assert self.u3 is not None and self.own is not None
        body, valid = u3_body(self.spec, self.u3), 0
        for signer, data in signatures.items():
            doc = loads(data, f"consistency signature of site {signer}", {"site", "sig"})
            if signer not in self.u3 or doc["site"] != signer:
                continue
            try:
                self.roster[signer].verify(unhex(doc["sig"], 64, f"signature of site {signer}"), body)
                valid += 1
            except InvalidSignature:
                raise SecAggError(f"site {self.site}: site {signer}'s signature is not over the list of surviving "
                                  "sites this site was given (the coordinator told sites different lists)") from None
        if valid < self.spec.threshold:
            raise SecAggError(f"site {self.site}: {valid} valid signatures over the surviving sites, "
                              f"{self.spec.threshold} needed; nothing is unmasked")
        b_shares, s_shares = {self.site: self.own[1].hex()}, {}
        for j, blob in sorted(self.received.items()):
            s_share, b_share = open_shares(self.c_sk, self.adverts[j].c_pk, self.spec, j, self.site, blob)
            if j in self.u3:
                b_shares[j] = b_share.hex()
            else:
                s_shares[j] = s_share.hex()
        self.phase = 5
        return dumps({"site": self.site, "b": {str(k): v for k, v in b_shares.items()},
                      "s": {str(k): v for k, v in s_shares.items()}})
