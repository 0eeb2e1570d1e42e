"""The ``command`` provider: an external attestation tool (a cloud attestation agent), at the site.

The tool runs with ``{report_data}`` in its arguments replaced by the hex report data and prints a
fedsecure evidence envelope or raw evidence of a registered TEE (a TDX quote, an SEV-SNP report).
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence

from fedsecure.attestation.base import ProviderSettings, check_report_data, register_provider
from fedsecure.attestation.evidence import MAX_EVIDENCE_BYTES, Evidence, detect
from fedsecure.errors import AttestationError


class CommandProvider:
    """Runs an external attestation tool; ``{report_data}`` in its arguments becomes the hex report data."""

    name = "command"

    def __init__(self, argv: Sequence[str], timeout_s: float = 60.0) -> None:
        if not argv:
            raise AttestationError("the command provider needs attestation.command (the tool and its arguments). "
                                   "Fix: e.g. attestation.command: [\"/usr/bin/attest-agent\", \"--nonce\", "
                                   "\"{report_data}\"]")
        self.argv, self.timeout_s = list(argv), timeout_s

    def evidence(self, report_data: bytes) -> Evidence:
        """Run the tool and parse what it prints (an envelope or raw evidence)."""
        check_report_data(report_data)
        argv = [a.replace("{report_data}", report_data.hex()) for a in self.argv]
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=self.timeout_s, check=False)
        except FileNotFoundError:
            raise AttestationError(f"attestation command not found: {argv[0]}") from None
        except subprocess.TimeoutExpired:
            raise AttestationError(f"attestation command {shlex.join(argv[:1])} ran over {self.timeout_s:g} s") \
                from None
        if proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace").strip()[-300:]
            raise AttestationError(f"attestation command {argv[0]} exited {proc.returncode}: {tail}")
        if len(proc.stdout) > MAX_EVIDENCE_BYTES:
            raise AttestationError(f"attestation command printed over {MAX_EVIDENCE_BYTES} bytes")
        ev = detect(proc.stdout)
        return Evidence(ev.tee, ev.blob, ev.provider if ev.provider not in ("", "file") else "command", ev.aux)


def _provider(settings: ProviderSettings) -> CommandProvider:
    return CommandProvider(settings.command)


def register() -> None:
    """Register the ``command`` provider."""
    register_provider("command", _provider)
