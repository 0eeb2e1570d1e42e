"""The words of the compliance report that do not come from a ledger: the unit of privacy and the neighbouring
relation, the trust model, the regulatory mapping and the OpenDP deployments-registry export.

Kept apart from the numbers (``compliance.py``, ``site_report.py``) so a reviewer can read every claim the
report makes in one place. The regulatory mapping is informational: it says which part of the report supports
which record-keeping duty, not that a duty is met.
"""

from __future__ import annotations

from typing import Any

SCHEMA = "fedsecure.report/v1"
PREDICATE_TYPE = "https://fedsecure.dev/privacy-report/v1"

RECORD_UNIT = ("one record (one patient document) of one site's training dataset. A guarantee about a dataset "
               "covers everything released from that dataset, over every round of every run that used it.")
NEIGHBOURING = ("add/remove one record: two datasets are neighbours when one is the other plus one patient "
                "document. Batches are drawn by Poisson sampling (each record independently with probability q), "
                "which is what the accountant assumes.")
CLIENT_UNIT = "one whole site (all of its records) per round, at the coordinator's aggregation"
NOT_COVERED = ("A patient with several documents in one dataset is protected per document, not per patient: the "
               "ε for a patient with k documents can be up to k times larger (group privacy). The same patient in "
               "two hospitals' datasets is covered by each hospital's guarantee separately.")

SECURE_NOISE = ("Noise and sampling come from a cryptographically secure generator (AES-256-CTR keyed afresh "
                "from os.urandom for each draw, Gaussian by Box-Muller in float64: Opacus' secure-mode "
                "construction).")
SEEDED_NOISE = ("NOT PROTECTED: this run's simulated sites used a known noise seed (site.noise_seed). Anyone who "
                "knows the seed can reproduce and subtract the noise; the ε above then means nothing. Simulation "
                "only: a deployed site refuses a seed.")
FLOATING_POINT = ("Floating-point caveat (NIST SP 800-226): the Gaussian noise is sampled in float64 and added in "
                  "float32; no defence against floating-point side channels on the noise is claimed.")


def trust_model(*, secure_aggregation: bool, seeded: bool | None, client_dp: bool, attested: bool) -> dict[str, Any]:
    """Who sees what, what is protected and what is not, in sentences."""
    sees = [
        "Each site sees only its own records; no record leaves its hospital.",
        ("The coordinator sees only the weighted sum of the sites' quantized updates in each round (secure "
         "aggregation: each site's vector travels under pairwise masks, and unmasking needs the threshold, a "
         "majority, of the round's sites). This holds unless the coordinator colludes with that many sites; "
         "the record-level guarantee does not depend on it, because the noise is added at each site."
         if secure_aggregation else
         "The coordinator sees each site's clipped and noised update (no secure aggregation in this run); "
         "the record-level guarantee holds against it because the noise is added at the site."),
        "Every site receives the aggregated adapter after each round; it is covered by the same guarantee "
        "(post-processing).",
        "Anyone who obtains the final adapter learns no more than the guarantee allows (post-processing).",
    ]
    protected = [
        "Each site enforces its own policy: whether DP is on, its budget, its minimum noise and its noise source "
        "are the site's settings; a coordinator can only ask for less privacy loss.",
        "Adapters, ledgers and residuals at rest are sealed (AES-256-GCM) when storage.seal is on.",
        "The privacy ledger and the audit log are hash chains: an edit, a removed entry or a replaced file is "
        "detected by verification (a truncated tail only against a recorded head).",
    ]
    if attested:
        protected.append("Each accepted update carries attestation evidence binding the site's code hash and DP "
                         "settings to a fresh coordinator nonce.")
    else:
        protected.append("NOT PROTECTED: attestation was off, so nothing proves which code or DP settings a site ran.")
    if client_dp and secure_aggregation:
        protected.append("Client-level DP adds a second, separate guarantee for whole sites; its noise is added at "
                         "the sites (distributed discrete Gaussian), so the coordinator never sees a less noised "
                         "sum. It assumes every site in a sum added its share: sites colluding with the coordinator "
                         "can remove their own shares, and the ε is computed for the sites actually in each sum.")
    elif client_dp:
        protected.append("Client-level DP at the coordinator adds a second, separate guarantee for whole sites.")
    noise = SEEDED_NOISE if seeded else SECURE_NOISE
    if seeded is None:
        noise = ("Noise source: each site's own setting; deployed sites refuse a known seed, and an attestation "
                 "policy with min_dp.secure_noise makes every accepted update claim a secure generator.")
    return {"who_sees_what": sees, "protected": protected, "noise_generator": noise,
            "not_covered": [NOT_COVERED, FLOATING_POINT]}


#: (regulation, article, what it asks, which sections of this report support it)
REGULATORY: tuple[tuple[str, str, str, str], ...] = (
    ("GDPR", "Art. 25", "data protection by design and by default",
     "site policy (DP required, budget, minimum σ) enforced at the site; trust model"),
    ("GDPR", "Art. 30", "records of processing activities",
     "per-site releases with time, run and round; ledgers; generated-by and when"),
    ("GDPR", "Art. 32", "security of processing",
     "storage (sealing algorithm, key ids, rotation); attestation; integrity of logs"),
    ("GDPR", "Art. 35", "data protection impact assessment",
     "unit of privacy, ε/δ per dataset, trust model and what is not protected, utility bought"),
    ("HIPAA", "§164.312(b)", "audit controls",
     "audit-log chain verification and head; ledger heads; attestation per round"),
    ("HIPAA", "§164.514(b)", "de-identification (expert determination)",
     "formal ε/δ per dataset with mechanisms to recompute them; not a Safe Harbor claim"),
    ("EU AI Act", "Art. 10", "data and data governance",
     "which datasets trained, record counts, δ < 1/N check, refusals"),
    ("EU AI Act", "Art. 11", "technical documentation",
     "mechanisms (DpEvents), accountant and library versions, code and config hashes"),
    ("EU AI Act", "Art. 12", "record-keeping (logging)",
     "hash-chained audit log and ledgers, their verification result; this signed report"),
)
DISCLAIMER = ("Informational mapping: it points to the parts of this report that support each record-keeping duty. "
              "It is not legal advice and does not by itself show compliance.")


def regulatory() -> list[dict[str, str]]:
    """The mapping as rows."""
    return [{"regulation": r, "article": a, "duty": d, "supported_by": s} for r, a, d, s in REGULATORY]


def opendp_registry(*, title: str, units: int | None, epsilon: float | None, delta: float | None,
                    mechanisms: list[str], trust: str, accountant: str) -> dict[str, Any]:
    """The fields of the OpenDP deployments registry (https://registry.opendp.org) this report can fill."""
    return {
        "name": title,
        "privacy_unit": {"description": RECORD_UNIT, "unit": "record (one patient document)",
                         "number_of_units": units},
        "privacy_loss": {"epsilon": epsilon, "delta": delta, "rho": None,
                         "note": "largest ε over the sites' datasets, lifetime (every run that used the dataset)"},
        "model": "central (per site: the site is the trusted curator of its own records)",
        "mechanisms": mechanisms,
        "composition": f"adaptive composition over rounds and runs, accounted per dataset ({accountant})",
        "trust_assumptions": trust,
        "post_processing": "federated averaging of noised updates; the aggregated adapter is post-processing",
        "neighbouring_relation": NEIGHBOURING,
    }
