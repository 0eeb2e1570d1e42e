"""One module per TEE type or evidence provider; each registers itself with :mod:`fedsecure.attestation.base`.

Importing this package imports none of them; :func:`load` imports each and calls its ``register()``,
in the order of :data:`MODULES` (which is the order names appear in messages), and the registry calls
:func:`load` on its first lookup. So a verifier module and a provider module never load each other, and
the NVIDIA SDK (imported by :mod:`~fedsecure.attestation.tee.nvidia_gpu` only when used) stays unloaded.

Adding a TEE: write ``tee/<name>.py`` whose ``register()`` calls
:func:`~fedsecure.attestation.base.register_tee` (its facts) and
:func:`~fedsecure.attestation.base.register_verifier` and/or
:func:`~fedsecure.attestation.base.register_provider`, and add ``<name>`` to :data:`MODULES`.
"""

from __future__ import annotations

import importlib

#: the TEE and provider modules, in registration order (providers: software, tdx, sev-snp, nvidia-gpu, command)
MODULES = ("software", "tdx", "sevsnp", "configfs", "nvidia_gpu", "command")


def load() -> None:
    """Import every module in :data:`MODULES` and call its ``register()``, in that order."""
    for name in MODULES:
        importlib.import_module(f"{__name__}.{name}").register()
