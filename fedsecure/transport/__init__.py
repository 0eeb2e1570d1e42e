"""Compressed, quantized update transport: a versioned, self-describing codec with a strict decoder."""

from fedsecure.transport.codec import CodecPolicy, TensorRule, decode, encode, expected_manifest

__all__ = ["CodecPolicy", "TensorRule", "decode", "encode", "expected_manifest"]
