"""TEE attestation: evidence verifiers (and, later, providers and policy).

So far: the AMD SEV-SNP report verifier (:mod:`fedsecure.attestation.sevsnp`).
"""
