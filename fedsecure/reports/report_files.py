"""Writing a compliance report to disk, signing it, printing it to PDF, and verifying it.

``report.json`` (the document, JSON), ``report.md`` and ``report.html`` (rendered from the JSON, naming its
SHA-256), ``opendp-registry.yaml`` (the report's entry for the OpenDP deployments registry), ``report.pdf``
where Chromium is installed and asked for, and ``report.dsse.json``: an in-toto Statement whose subjects
are those files, in a DSSE envelope signed with the report key (Ed25519, created 0600 on first use).
Each file is written atomically; an existing report is replaced only once the new one is complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsecure._durable import atomic_write
from fedsecure.errors import ReportError
from fedsecure.reports import compliance_text as text
from fedsecure.reports import report_html, report_md

JSON, MD, HTML, PDF, SIGNATURE = "report.json", "report.md", "report.html", "report.pdf", "report.dsse.json"
REGISTRY = "opendp-registry.yaml"
COORDINATOR_KEY = "coordinator-report.key.pem"
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
#: Flags for a headless Chromium on a machine without network or GPU (no background requests, no sandbox as root).
#: The page itself forbids scripts (its Content-Security-Policy is default-src 'none'); Chromium's own
#: ``--blink-settings=scriptEnabled=false`` would stop --print-to-pdf from writing anything (seen with 156).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--disable-extensions")


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`write_report` wrote."""

    folder: Path
    files: tuple[Path, ...]
    json_sha256: str
    key_id: str | None
    public_key: Path | None


def _clean(x: Any) -> Any:
    """JSON-safe: an infinite or NaN float becomes None (the schema says: null = unbounded / unknown)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def find_chromium() -> str | None:
    """The path of an installed Chromium, or None."""
    return next((p for p in (shutil.which(c) for c in CHROMIUM) if p), None)


def print_pdf(html: Path, pdf: Path, timeout: float = 120.0) -> None:
    """``html`` printed to ``pdf`` by headless Chromium (no network, no script).

    Raises:
        ReportError: No Chromium is installed, or it failed.
    """
    exe = find_chromium()
    if exe is None:
        raise ReportError("no Chromium is installed, so no PDF was made (report.html and report.md are written). "
                          "Fix: apt-get install chromium, or print report.html from a browser.")
    with tempfile.TemporaryDirectory(prefix="fedsecure-chromium-") as profile:
        tmp = pdf.with_name(pdf.stem + ".tmp.pdf")
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--no-pdf-header-footer",
               f"--print-to-pdf={tmp}", html.resolve().as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise ReportError(f"Chromium did not print {html} within {timeout:.0f} s. Fix: print report.html from a "
                              "browser.") from None
        if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            tmp.unlink(missing_ok=True)
            raise ReportError(f"Chromium failed to print {html} (exit {proc.returncode}): "
                              f"{proc.stderr.strip()[-300:]}")
        tmp.replace(pdf)


def write_report(report: dict[str, Any], folder: str | Path, *, signing_key: Path | None, pdf: bool = False
                 ) -> ReportFiles:
    """Write ``report`` into ``folder`` (report.json, .md, .html, optionally .pdf) and sign them with the Ed25519
    key at ``signing_key`` (created 0600 on first use; its public half is written beside it as ``.pub.pem``).
    ``signing_key=None`` writes an unsigned report (and removes a stale signature).
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(_clean(report), indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()
    digest = hashlib.sha256(data).hexdigest()
    key = key_id = public = None
    if signing_key is not None:
        from fedsecure.attestation.keys import load_or_create_ed25519
        from fedsecure.crypto.dsse import key_id as kid
        from fedsecure.crypto.dsse import public_pem

        key = load_or_create_ed25519(Path(signing_key))
        key_id = kid(key.public_key())
        public = Path(signing_key).with_name(Path(signing_key).name.removesuffix(".key.pem") + ".pub.pem")
        atomic_write(public, public_pem(key.public_key()), mode=0o644)
    files = [atomic_write(out / JSON, data, mode=0o644),
             atomic_write(out / MD, report_md.render(report, json_sha256=digest, key_id=key_id).encode(), mode=0o644),
             atomic_write(out / HTML, report_html.render(report, json_sha256=digest, key_id=key_id).encode(),
                          mode=0o644),
             atomic_write(out / REGISTRY, _registry_yaml(report, digest), mode=0o644)]
    if pdf:
        print_pdf(out / HTML, out / PDF)
        files.append(out / PDF)
    if key is not None:
        from fedsecure.crypto.dsse import sign_files

        predicate = {"schema": report["schema"], "kind": report["kind"], "title": report["title"],
                     "generated": report["generated"], "findings": len(report["findings"]),
                     "errors": sum(f["severity"] == "error" for f in report["findings"])}
        envelope = sign_files(key, files, text.PREDICATE_TYPE, predicate)
        files.append(atomic_write(out / SIGNATURE, (json.dumps(envelope, indent=1) + "\n").encode(), mode=0o644))
    else:
        (out / SIGNATURE).unlink(missing_ok=True)
    return ReportFiles(out, tuple(files), digest, key_id, public)


def _registry_yaml(report: dict[str, Any], json_sha256: str) -> bytes:
    """The report's OpenDP deployments-registry fields as YAML (what a submission to the registry asks for)."""
    import yaml

    head = (f"# OpenDP deployments registry (https://registry.opendp.org): the fields this deployment can fill,\n"
            f"# from {JSON} (SHA-256 {json_sha256}) of {report['title']!r}. Informational: review before submitting.\n")
    return (head + yaml.safe_dump(_clean(report["opendp_registry"]), sort_keys=False, allow_unicode=True)).encode()


def coordinator_key_path(run_dir: str | Path, keyring: str | None) -> Path:
    """The coordinator's report key: beside its keyring (``<run-dir>/keys/`` unless the config names another)."""
    folder = Path(keyring).parent if keyring else Path(run_dir) / "keys"
    return folder / COORDINATOR_KEY


def write_run_report(run_dir: str | Path, keyring: str | None) -> ReportFiles | None:
    """The end of a run: its signed compliance report in the run directory. A failure is logged, never raised: the
    run's results are saved before this, and ``fedsecure report RUN_DIR`` makes the report again.
    """
    import logging

    from fedsecure.reports.compliance import build_run_report

    try:
        return write_report(build_run_report(run_dir), run_dir, signing_key=coordinator_key_path(run_dir, keyring))
    except Exception as e:  # noqa: BLE001 - see the docstring: the run itself is complete and saved
        logging.getLogger(__name__).warning("the compliance report could not be written (%s: %s); the run is "
                                            "saved. Fix the cause, then run `fedsecure report %s`.",
                                            type(e).__name__, e, run_dir)
        return None


def verify_report(report_json: str | Path, public_key: str | Path, signature: str | Path | None = None
                  ) -> dict[str, Any]:
    """Check a report's signature and every signed file (report.json must be one). Returns the Statement.

    Raises:
        IntegrityError: A signed file was changed or is missing, or no signature verifies under the key.
        KeyMaterialError: The public key cannot be read.
    """
    from fedsecure.crypto.dsse import load_public_key, verify_files

    path = Path(report_json)
    sig = Path(signature) if signature else path.with_name(SIGNATURE)
    if not path.is_file():
        raise ReportError(f"{path} does not exist. Fix: pass the report.json of a report folder.")
    if not sig.is_file():
        raise ReportError(f"{sig} is missing: the report is not signed, or its signature was removed. Fix: "
                          "regenerate it with `fedsecure report` (it signs with the report key).")
    return verify_files(sig, load_public_key(public_key), path.parent, required=(path.name,))
