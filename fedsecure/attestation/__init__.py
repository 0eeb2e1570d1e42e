"""TEE attestation: what a site proves about where and how it trained, and how the coordinator checks it.

- :mod:`~fedsecure.attestation.base`: the Provider and Verifier protocols, Claims, and the one registry
  of TEE facts, verifiers and providers; the only module (with ``evidence``) both sides share.
- :mod:`~fedsecure.attestation.evidence`: the evidence envelope, the report-data binding, the code hash.
- :mod:`~fedsecure.attestation.tee`: one module per TEE or provider (software, tdx, sevsnp, configfs,
  nvidia_gpu, command), each registering itself.
- Site side: :mod:`~fedsecure.attestation.providers` (make_provider), :mod:`~fedsecure.attestation.keys`.
- Coordinator side: :mod:`~fedsecure.attestation.policy`, :mod:`~fedsecure.attestation.verify`,
  :mod:`~fedsecure.attestation.inspect`.
- Both, per round: :mod:`~fedsecure.attestation.protocol` (site_statement, AttestationGate).
"""
