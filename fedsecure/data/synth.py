"""Synthetic clinical notes, one JSONL record per patient document.

Each hospital has its own specialty mix (drawn from a Dirichlet with a small concentration, so
sites are non-IID), its own house style (section headers, abbreviations, sign-off), and its own
note-length distribution. Everything derives from one ``random.Random(seed)``, so output is
byte-for-byte reproducible. No real patient data is involved or imitated.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

from fedsecure.errors import DataError

SPECIALTIES: dict[str, dict[str, list[str]]] = {
    "cardiology": {
        "complaint": ["chest pain radiating to the left arm", "palpitations at rest", "exertional dyspnea",
                      "syncope while standing", "bilateral ankle edema"],
        "finding": ["troponin elevated at {n} ng/L", "ECG shows ST elevation in leads II, III and aVF",
                    "echocardiogram with ejection fraction of {p} percent", "BNP of {n} pg/mL",
                    "irregularly irregular rhythm on telemetry"],
        "dx": ["acute inferior myocardial infarction", "atrial fibrillation with rapid ventricular response",
               "heart failure with reduced ejection fraction", "unstable angina", "hypertensive urgency"],
        "plan": ["start aspirin, ticagrelor and high-intensity statin", "rate control with metoprolol",
                 "furosemide 40 mg IV twice daily", "cardiology follow-up for catheterization",
                 "anticoagulation with apixaban after CHA2DS2-VASc review"],
    },
    "oncology": {
        "complaint": ["unintentional weight loss of {d} kg", "progressive fatigue", "new palpable breast mass",
                      "persistent cough with hemoptysis", "night sweats"],
        "finding": ["CT shows a {n} mm spiculated lesion", "biopsy confirms adenocarcinoma",
                    "neutrophil count of {d} x10^9/L", "PET-CT with avid mediastinal nodes",
                    "tumor markers trending upward"],
        "dx": ["stage III non-small cell lung cancer", "HER2-positive breast cancer",
               "febrile neutropenia after cycle {c}", "metastatic colorectal cancer", "diffuse large B-cell lymphoma"],
        "plan": ["proceed with cycle {c} of carboplatin and pemetrexed", "tumor board review next week",
                 "start broad-spectrum antibiotics and G-CSF", "palliative radiotherapy to the spine",
                 "refer for genetic counselling"],
    },
    "pediatrics": {
        "complaint": ["fever for {d} days", "barking cough and stridor", "poor feeding and irritability",
                      "rash on the trunk", "vomiting and diarrhea"],
        "finding": ["temperature of 39.{d} C", "weight on the {p}th percentile", "tympanic membrane bulging",
                    "capillary refill under two seconds", "mild dehydration, moist mucosa"],
        "dx": ["acute otitis media", "croup", "viral gastroenteritis", "bronchiolitis", "hand, foot and mouth disease"],
        "plan": ["oral rehydration and review in 24 hours", "single dose of dexamethasone",
                 "amoxicillin for {d} days", "parents counselled on warning signs", "vaccination schedule updated"],
    },
    "orthopedics": {
        "complaint": ["fall on an outstretched hand", "knee pain after twisting injury", "low back pain for {d} weeks",
                      "hip pain with inability to bear weight", "shoulder pain on abduction"],
        "finding": ["X-ray shows a displaced distal radius fracture", "positive Lachman test",
                    "MRI with L4-L5 disc protrusion", "shortened and externally rotated leg",
                    "tenderness over the supraspinatus tendon"],
        "dx": ["distal radius fracture", "anterior cruciate ligament tear", "lumbar radiculopathy",
               "neck of femur fracture", "rotator cuff tendinopathy"],
        "plan": ["closed reduction and cast for {d} weeks", "physiotherapy referral",
                 "hemiarthroplasty scheduled", "analgesia and early mobilisation", "orthopedic clinic in {d} weeks"],
    },
    "neurology": {
        "complaint": ["sudden right-sided weakness", "worst headache of life", "first generalized seizure",
                      "numbness in both feet", "episodes of double vision"],
        "finding": ["NIHSS score of {d}", "CT head without hemorrhage", "EEG with focal slowing",
                    "reduced vibration sense to the knees", "MRI with periventricular lesions"],
        "dx": ["acute ischemic stroke", "subarachnoid hemorrhage", "new-onset epilepsy",
               "peripheral neuropathy", "relapsing-remitting multiple sclerosis"],
        "plan": ["thrombolysis within the window", "neurosurgical review", "start levetiracetam 500 mg twice daily",
                 "check B12 and HbA1c", "neurology clinic for disease-modifying therapy"],
    },
    "obstetrics": {
        "complaint": ["reduced fetal movements at {n} weeks", "headache and visual disturbance",
                      "painful regular contractions", "vaginal bleeding in the first trimester", "itching of palms"],
        "finding": ["blood pressure {n}/{d}0 mmHg", "cervix {d} cm dilated", "CTG reassuring",
                    "ultrasound with viable intrauterine pregnancy", "bile acids raised"],
        "dx": ["pre-eclampsia", "active labour", "threatened miscarriage", "intrahepatic cholestasis of pregnancy",
               "gestational diabetes"],
        "plan": ["magnesium sulfate and labetalol", "admit to labour ward", "repeat scan in {d} days",
                 "start ursodeoxycholic acid", "dietary advice and glucose monitoring"],
    },
    "endocrinology": {
        "complaint": ["polyuria and polydipsia", "weight gain and cold intolerance", "tremor and heat intolerance",
                      "recurrent hypoglycemia", "fatigue and salt craving"],
        "finding": ["HbA1c of {d}.{d} percent", "TSH of {n} mU/L", "free T4 suppressed",
                    "glucose of {d}.{d} mmol/L", "morning cortisol low"],
        "dx": ["type 2 diabetes mellitus", "primary hypothyroidism", "Graves disease", "adrenal insufficiency",
               "diabetic ketoacidosis"],
        "plan": ["start metformin and lifestyle advice", "levothyroxine 50 mcg daily", "carbimazole and beta-blocker",
                 "hydrocortisone replacement", "insulin infusion per protocol"],
    },
    "emergency": {
        "complaint": ["motor vehicle collision", "abdominal pain in the right lower quadrant", "shortness of breath",
                      "overdose of unknown tablets", "laceration to the forearm"],
        "finding": ["lactate of {d}.{d} mmol/L", "FAST scan negative", "oxygen saturation {p} percent on room air",
                    "white cell count {n}", "wound {d} cm, no tendon involvement"],
        "dx": ["acute appendicitis", "sepsis of urinary source", "community-acquired pneumonia",
               "paracetamol overdose", "simple laceration"],
        "plan": ["surgical referral for appendicectomy", "sepsis six bundle completed",
                 "start N-acetylcysteine", "sutured under local anesthetic", "admit to medical ward"],
    },
}

_HOSPITALS = ["St Agnes", "Northfield General", "Riverside University", "Lakeview Children's",
              "Hillcrest Medical Centre", "Harbour City", "Westgate Royal", "Pinecrest Regional"]

_STYLES = [
    {"head": ["HPI:", "Exam:", "Assessment:", "Plan:"], "pt": "Pt", "sign": "Dr {i}, attending"},
    {"head": ["History:", "Findings:", "Impression:", "Management:"], "pt": "The patient",
     "sign": "Reviewed by registrar {i}"},
    {"head": ["S:", "O:", "A:", "P:"], "pt": "pt", "sign": "-- signed {i}"},
    {"head": ["Presenting complaint:", "Investigations:", "Diagnosis:", "Disposition:"], "pt": "Patient",
     "sign": "Consultant {i}"},
]


#: The public corpus (:func:`public_corpus`): teaching material from institutions that are never a site, every
#: specialty equally often, signed as teaching cases. It is written in the common clinical note formats (SOAP, HPI)
#: that a hospital's notes share with any textbook, but no site's hospital, sign-off, specialty mix or record is in
#: it, so each site's own character is left to learn (tests check the two never meet). It is what the shipped
#: pretrained base learned from.
PUBLIC_INSTITUTIONS = ["Open Case Library", "Commons Teaching Hospital", "Public Grand Rounds",
                       "Textbook Case Series"]
_PUBLIC_SIGN = ["Teaching case {i}", "Open file {i}", "Case series entry {i}", "Grand rounds {i}"]
_PUBLIC_STYLES = [{**style, "sign": sign} for style, sign in zip(_STYLES, _PUBLIC_SIGN, strict=True)]
PUBLIC_SEED = 0x5EED_C0DE


@dataclass(frozen=True)
class SiteProfile:
    """The house character of one synthetic hospital."""

    name: str
    specialty_mix: dict[str, float]
    style: int
    mean_findings: float  # mean number of finding sentences, drives note length
    age_range: tuple[int, int]


def make_profiles(sites: int, rng: random.Random) -> list[SiteProfile]:
    """One profile per hospital: specialty mix, writing style, patient ages (non-IID)."""
    names = list(SPECIALTIES)
    profiles = []
    for i in range(sites):
        # Dirichlet(0.3) via gammas: most mass on one or two specialties.
        weights = [rng.gammavariate(0.3, 1.0) + 1e-6 for _ in names]
        # Give each site one clearly dominant specialty, different for different sites.
        weights[i % len(names)] += 2.0 * sum(weights)
        total = sum(weights)
        mix = {n: w / total for n, w in zip(names, weights, strict=True)}
        lo = rng.choice([0, 18, 40, 65])
        profiles.append(SiteProfile(
            name=_HOSPITALS[i % len(_HOSPITALS)] + (f" {i // len(_HOSPITALS) + 1}" if i >= len(_HOSPITALS) else ""),
            specialty_mix=mix, style=i % len(_STYLES), mean_findings=1.0 + 3.0 * rng.random(),
            age_range=(lo, lo + (17 if lo == 0 else 30))))
    return profiles


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _fill(template: str, rng: random.Random) -> str:
    return template.format(n=rng.randint(10, 180), d=rng.randint(1, 9), p=rng.randint(20, 99), c=rng.randint(1, 6))


def make_note(profile: SiteProfile, rng: random.Random, styles: list[dict] | None = None) -> tuple[str, str]:
    """One note for ``profile``; returns (text, specialty)."""
    specialty = rng.choices(list(profile.specialty_mix), weights=list(profile.specialty_mix.values()))[0]
    s = SPECIALTIES[specialty]
    style = (styles or _STYLES)[profile.style]
    age = rng.randint(*profile.age_range)
    sex = rng.choice(["female", "male"])
    n_find = max(1, min(5, round(rng.gauss(profile.mean_findings, 0.7))))
    findings = rng.sample(s["finding"], k=min(n_find, len(s["finding"])))
    h = style["head"]
    parts = [
        f"{profile.name} - {specialty} note.",
        f"{h[0]} {style['pt']} is a {age} year old {sex} presenting with {_fill(rng.choice(s['complaint']), rng)}.",
        f"{h[1]} " + " ".join(_cap(_fill(f, rng)) + "." for f in findings),
        f"{h[2]} {_cap(_fill(rng.choice(s['dx']), rng))}.",
        f"{h[3]} " + _cap(_fill(rng.choice(s["plan"]), rng)) + ".",
        style["sign"].format(i=rng.randint(100, 999)),
    ]
    return " ".join(parts), specialty


def synthesize(out_dir: str | Path, *, sites: int, records_per_site: int, eval_fraction: float = 0.2,
               seed: int = 0) -> list[Path]:
    """Write ``site-<i>/train.jsonl`` and ``site-<i>/eval.jsonl`` for ``sites`` hospitals.

    Returns the site directories. Each record is ``{"text": ..., "specialty": ...}``.
    """
    if sites < 1 or records_per_site < 2:
        raise DataError(f"need sites >= 1 and records per site >= 2; got {sites}, {records_per_site}")
    if not 0 < eval_fraction < 1:
        raise DataError(f"the eval fraction must be in (0, 1); got {eval_fraction}")
    n_eval = max(1, round(records_per_site * eval_fraction))
    if records_per_site - n_eval < 1:
        raise DataError(f"{records_per_site} records per site with eval fraction {eval_fraction} leave no training "
                        f"record ({n_eval} held out). Fix: more records per site or a smaller eval fraction.")
    rng = random.Random(seed)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file, not a folder. Fix: pass a folder (it is created if missing).")
    profiles = make_profiles(sites, rng)
    dirs = []
    for i, profile in enumerate(profiles):
        site_rng = random.Random(rng.getrandbits(64))
        records = []
        for _ in range(records_per_site):
            text, specialty = make_note(profile, site_rng)
            records.append({"text": text, "specialty": specialty})
        site_dir = out / f"site-{i}"
        try:
            site_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create {site_dir} ({e.strerror or e}). Fix: pass a folder you can write to.") \
                from None
        _write_jsonl(site_dir / "train.jsonl", records[n_eval:])
        _write_jsonl(site_dir / "eval.jsonl", records[:n_eval])
        (site_dir / "profile.json").write_text(json.dumps({
            "name": profile.name, "specialty_mix": profile.specialty_mix, "style": profile.style,
            "mean_findings": profile.mean_findings, "age_range": list(profile.age_range)}, indent=2) + "\n")
        dirs.append(site_dir)
    return dirs


def corpus(*, sites: int = 8, records_per_site: int = 400, seed: int = 12345) -> list[str]:
    """Texts for training the bundled tokenizer (``scripts/train_tokenizer.py``)."""
    rng = random.Random(seed)
    texts = []
    for profile in make_profiles(sites, rng):
        for _ in range(records_per_site):
            texts.append(make_note(profile, rng)[0])
    return texts


def public_profiles() -> list[SiteProfile]:
    """The public corpus's institutions: uniform specialty mix, all ages."""
    uniform = {n: 1 / len(SPECIALTIES) for n in SPECIALTIES}
    return [SiteProfile(name=name, specialty_mix=uniform, style=i % len(_PUBLIC_STYLES), mean_findings=2.5,
                        age_range=(0, 90)) for i, name in enumerate(PUBLIC_INSTITUTIONS)]


def public_corpus(records: int = 9600, seed: int = PUBLIC_SEED) -> list[str]:
    """Public teaching notes (never a site's hospital, style or record): the pretraining corpus of the shipped
    base (``fedsecure model pretrain``). Reproducible from ``seed``.
    """
    rng = random.Random(seed)
    profiles = public_profiles()
    notes = []
    for i in range(records):  # teaching material comes in every format: each note's drawn afresh
        profile = dataclasses.replace(profiles[i % len(profiles)], style=rng.randrange(len(_PUBLIC_STYLES)))
        notes.append(make_note(profile, rng, _PUBLIC_STYLES)[0])
    return notes


def site_styles() -> list[dict]:
    """The house styles synthetic sites write in (tests hold the public corpus apart from them)."""
    return [dict(s) for s in _STYLES]


def public_styles() -> list[dict]:
    """The house styles of the public corpus."""
    return [dict(s) for s in _PUBLIC_STYLES]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
