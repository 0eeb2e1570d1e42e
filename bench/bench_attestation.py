"""Attestation cost: simulated rounds with attestation on vs off (same seeds, same run), and the cost of
one statement (site) and one verification (coordinator) per TEE type.

    .venv/bin/python bench/bench_attestation.py [--rounds 3] [--repeats 2]

Round figures: median wall seconds of rounds 2..N (round 1 carries the one-time accountant
calibration in both arms), arms interleaved. Per-evidence figures: median of 20 calls; TDX and
SEV-SNP use the genuine evidence in shared/testdata (at its documented verification time).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from fedsecure.attestation.evidence import Evidence, code_hash
from fedsecure.attestation.policy import MinDP, Policy
from fedsecure.attestation.protocol import AttestationGate, dp_config_document, site_statement
from fedsecure.attestation.providers import SoftwareProvider, load_or_create_ed25519
from fedsecure.attestation.verify import SoftwareAttestationWarning, verify
from fedsecure.audit import AuditLog
from fedsecure.config import SimulationConfig
from fedsecure.simulation import simulate

DATA = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "attestation"


def _median_ms(fn, n: int = 20) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def rounds(args) -> None:
    arms: dict[bool, list[float]] = {True: [], False: []}
    for rep in range(args.repeats):
        for enabled in (False, True):
            cfg = SimulationConfig.from_mapping({
                "seed": 1, "federation": {"sites": 3, "rounds": args.rounds},
                "data": {"records_per_site": 160}, "train": {"local_steps": 8, "batch_size": 16},
                "attestation": {"enabled": enabled}})
            with tempfile.TemporaryDirectory() as tmp:
                summary = simulate(cfg, run_dir=Path(tmp) / "run")
            later = [r["seconds"] for r in summary["rounds"] if r["round"] >= 2]
            arms[enabled] += later
            print(f"  repeat {rep + 1}, attestation {'on ' if enabled else 'off'}: rounds 2..{args.rounds} "
                  f"{', '.join(f'{s:.2f}' for s in later)} s")
    off, on = statistics.median(arms[False]), statistics.median(arms[True])
    print(f"round wall time, 3 sites (median of rounds 2..{args.rounds}): off {off:.3f} s, on {on:.3f} s, "
          f"ratio {on / off:.3f}x")


def per_evidence() -> None:
    warnings.simplefilter("ignore", SoftwareAttestationWarning)
    with tempfile.TemporaryDirectory() as tmp:
        provider = SoftwareProvider(Path(tmp) / "signer.pem")
        key = load_or_create_ed25519(Path(tmp) / "node.pem")
        policy = Policy(measurements={"software": (code_hash(),)}, code=(code_hash(),), min_dp=MinDP(epsilon_budget=3))
        gate = AttestationGate(policy, AuditLog(Path(tmp) / "audit.log"))
        dp = dp_config_document(enabled=True, epsilon_budget=3.0, delta=1e-5, sigma=1.0, noise="os-csprng")
        digest = bytes(32)

        def site_side():
            nonce = gate.challenge(1, "s", 1)
            return nonce, site_statement(provider, key, nonce, dp, digest)

        print(f"software statement at the site (incl. nonce issue + audit line): {_median_ms(site_side):.2f} ms")

        def full():
            _, st = site_side()
            gate.check(1, "s", 1, st, digest)

        both = _median_ms(full)
        print(f"software statement + coordinator check (nonce, evidence, DP, signature, 3 fsynced audit lines): "
              f"{both:.2f} ms")
    if DATA.is_dir():
        quote = Evidence("tdx", (DATA / "tdx_prod_quote_SPR_E4.dat").read_bytes())
        at = dt.datetime(2023, 7, 1, 1, tzinfo=dt.UTC)
        print(f"TDX v4 quote verification (genuine): {_median_ms(lambda: verify(quote, None, None, at)):.2f} ms")
        warnings.filterwarnings("ignore", "Parsed a serial number")
        snp = Evidence("sev-snp", (DATA / "snp_attestation.bin").read_bytes(), aux={
            "vcek": (DATA / "snp_vcek.testcer").read_bytes(), "cert_chain": (DATA / "snp_milan.testcer").read_bytes()})
        at = dt.datetime(2023, 1, 1, tzinfo=dt.UTC)
        print(f"SEV-SNP report verification (genuine): {_median_ms(lambda: verify(snp, None, None, at)):.2f} ms")


def main() -> None:
    from fedsecure.federation.server import quiet_flower_logs

    quiet_flower_logs(False)
    logging.disable(logging.WARNING)  # the software provider logs every use; the figures are what matter here
    warnings.simplefilter("ignore", SoftwareAttestationWarning)
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    per_evidence()
    rounds(args)


if __name__ == "__main__":
    main()
