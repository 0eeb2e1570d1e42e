"""TEE attestation: evidence verifiers (and, later, providers and policy).

So far: the AMD SEV-SNP report verifier (:mod:`fedsecure.attestation.sevsnp`) and the Intel TDX
quote verifier, versions 4 and 5 (:mod:`fedsecure.attestation.tdx`); both pin vendor roots and take
the verification time as a parameter.
"""
