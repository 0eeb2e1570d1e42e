"""The coordinator's side of one secure-aggregation round: relay, collect, and unmask only the sum.

The coordinator trusts no site: a message that does not parse, an advert not signed by the site's
node key, a masked vector of the wrong length, a share that does not reconstruct the secret its
owner committed to: each excludes that site (or that share) with a named reason in
:attr:`Aggregation.refused`, and the round goes on while ``threshold`` sites remain. Below that, the
round is refused (:class:`SecAggError`) and nothing is released. Each phase takes what arrived; the
caller's transport decides how long to wait (Flower's timeout), so a site that never answers is a
dropout, not a stall.
"""

from __future__ import annotations

import itertools

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedsecure.errors import SecAggError
from fedsecure.secagg import masking, shamir
from fedsecure.secagg.protocol import (
    Advert,
    RoundSpec,
    b_commitment,
    loads,
    pair_seed,
    raw,
    self_seed,
    u3_body,
    unhex,
    verify_advert,
)

MAX_SUBSETS = 64  # share subsets tried per secret when a share is wrong


class Aggregation:
    """One round at the coordinator. Phases: :meth:`adverts`, :meth:`route`, :meth:`masked`, :meth:`survivors`,
    :meth:`signatures`, :meth:`unmask`.

    Args:
        spec: the round.
        roster: site -> node public key (the coordinator checks adverts too, so it never relays a forged one).
    """

    def __init__(self, spec: RoundSpec, roster: dict[int, Ed25519PublicKey]) -> None:
        self.spec, self.roster = spec, roster
        self.refused: dict[int, str] = {}
        self.u1: dict[int, Advert] = {}
        self.raw_adverts: dict[int, bytes] = {}
        self.u2: list[int] = []
        self.y: dict[int, np.ndarray] = {}
        self.u3: list[int] = []
        self.sigs: dict[int, bytes] = {}

    def _need(self, n: int, phase: str) -> None:
        if n < self.spec.threshold:
            reasons = "; ".join(f"site {k}: {v}" for k, v in sorted(self.refused.items())) or "no reply"
            raise SecAggError(f"secure aggregation refused in the {phase} phase: {n} sites left, "
                              f"{self.spec.threshold} needed ({reasons}); nothing of this round is released")

    def _refuse(self, site: int, reason: str) -> None:
        self.refused.setdefault(site, reason)

    def adverts(self, replies: dict[int, bytes]) -> dict[int, bytes]:
        """Phase 1: the verified adverts, to send to every site."""
        for site, data in sorted(replies.items()):
            try:
                self.u1[site] = verify_advert(data, self.spec, site, self.roster)
                self.raw_adverts[site] = bytes(data)
            except SecAggError as e:
                self._refuse(site, str(e))
        self._need(len(self.u1), "advertise")
        return dict(self.raw_adverts)

    def route(self, replies: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Phase 2: receiver -> {sender: sealed shares}, from the sites that sent a share to every other site."""
        ok = {}
        for site, shares in sorted(replies.items()):
            want = set(self.u1) - {site}
            if site not in self.u1 or not isinstance(shares, dict) or set(shares) != want:
                self._refuse(site, f"shares for {sorted(shares) if isinstance(shares, dict) else '?'}, expected "
                                   f"one for each of {sorted(want)}")
                continue
            ok[site] = shares
        self.u2 = sorted(ok)
        self._need(len(self.u2), "share")
        return {j: {i: ok[i][j] for i in self.u2 if i != j} for j in self.u2}

    def masked(self, replies: dict[int, bytes]) -> list[int]:
        """Phase 3: keep the masked vectors of the right length; returns U3, to send for signing."""
        for site, data in sorted(replies.items()):
            if site not in self.u2:
                self._refuse(site, "masked input from a site that did not share its keys")
                continue
            try:
                self.y[site] = masking.unpack(bytes(data), self.spec.length, self.spec.bits, f"site {site}")
            except SecAggError as e:
                self._refuse(site, str(e))
        self.u3 = sorted(self.y)
        self._need(len(self.u3), "masked input")
        return list(self.u3)

    def signatures(self, replies: dict[int, bytes]) -> dict[int, bytes]:
        """Phase 4: the sites' signatures over U3, to send to every site of U3 (checked here as well)."""
        body = u3_body(self.spec, self.u3)
        for site, data in sorted(replies.items()):
            try:
                doc = loads(data, f"consistency signature of site {site}", {"site", "sig"})
                if site not in self.u3 or doc["site"] != site:
                    raise SecAggError(f"consistency signature of site {site}: not a surviving site")
                self.roster[site].verify(unhex(doc["sig"], 64, f"signature of site {site}"), body)
                self.sigs[site] = bytes(data)
            except SecAggError as e:
                self._refuse(site, str(e))
            except InvalidSignature:
                self._refuse(site, f"consistency signature of site {site} does not verify over the surviving sites")
        self._need(len(self.sigs), "consistency")
        return dict(self.sigs)

    def unmask(self, replies: dict[int, bytes]) -> np.ndarray:
        """Phase 5: reconstruct each survivor's ``b`` and each dropout's ``s_sk`` from the revealed shares, check
        them against the adverts, and return the sum of the survivors' inputs (signed integers).
        """
        b_shares: dict[int, dict[int, bytes]] = {}
        s_shares: dict[int, dict[int, bytes]] = {}
        answered = 0
        dropped = [j for j in self.u2 if j not in self.u3]
        for site, data in sorted(replies.items()):
            try:
                if site not in self.sigs:
                    raise SecAggError("unmasking reply from a site that did not sign the surviving sites")
                doc = loads(data, f"unmasking reply of site {site}", {"site", "b", "s"})
                if doc["site"] != site or not isinstance(doc["b"], dict) or not isinstance(doc["s"], dict):
                    raise SecAggError(f"unmasking reply of site {site}: malformed")
                if {int(k) for k in doc["b"]} & {int(k) for k in doc["s"]} or set(map(int, doc["s"])) - set(dropped):
                    raise SecAggError(f"unmasking reply of site {site}: reveals a secret it must not")
                for k, v in doc["b"].items():
                    if int(k) in self.u3:
                        b_shares.setdefault(int(k), {})[site] = unhex(v, shamir.SHARE_BYTES, f"share from {site}")
                for k, v in doc["s"].items():
                    s_shares.setdefault(int(k), {})[site] = unhex(v, shamir.SHARE_BYTES, f"share from {site}")
                answered += 1
            except (SecAggError, ValueError) as e:
                self._refuse(site, str(e))
        self._need(answered, "unmask")
        bits, n = self.spec.bits, self.spec.length
        total = np.zeros(n, np.uint64)
        for j in self.u3:
            total = masking.add(total, self.y[j], bits)
        for j in self.u3:
            b = self._secret(b_shares.get(j, {}), f"site {j}'s self-mask seed",
                             lambda s, j=j: b_commitment(self.spec, j, s) == self.u1[j].b_commit)
            total = masking.sub(total, masking.prg(self_seed(b, self.spec, j), n, bits), bits)
        for j in dropped:
            s_raw = self._secret(s_shares.get(j, {}), f"dropped site {j}'s mask key",
                                 lambda s, j=j: raw(X25519PrivateKey.from_private_bytes(s).public_key())
                                 == self.u1[j].s_pk)
            s_sk = X25519PrivateKey.from_private_bytes(s_raw)
            for k in self.u3:  # k added +mask when k < j, -mask when k > j: take it back out
                mask = masking.prg(pair_seed(s_sk, self.u1[k].s_pk, self.spec, j, k), n, bits)
                total = masking.sub(total, mask, bits) if k < j else masking.add(total, mask, bits)
        return masking.from_ring(total, bits)

    def _secret(self, shares: dict[int, bytes], what: str, check) -> bytes:  # noqa: ANN001
        """The secret from ``threshold`` of ``shares`` that passes ``check``, trying subsets where a share is bad."""
        t = self.spec.threshold
        if len(shares) < t:
            raise SecAggError(f"secure aggregation refused: {len(shares)} shares of {what}, {t} needed")
        for subset in itertools.islice(itertools.combinations(sorted(shares), t), MAX_SUBSETS):
            try:
                secret = shamir.combine({k: shares[k] for k in subset}, t, what)
            except SecAggError:
                continue
            if check(secret):
                bad = sorted(set(shares) - set(subset))
                for k in bad:  # a share outside the subset that works may be the wrong one: name it if so
                    alt = [*subset[:-1], k]
                    try:
                        if not check(shamir.combine({x: shares[x] for x in alt}, t, what)):
                            self._refuse(k, f"its share of {what} is wrong")
                    except SecAggError:
                        self._refuse(k, f"its share of {what} is wrong (it does not combine with the others)")
                return secret
        raise SecAggError(f"secure aggregation refused: no {t} shares of {what} reconstruct the secret it committed "
                          "to (malformed or altered shares); nothing of this round is released")
