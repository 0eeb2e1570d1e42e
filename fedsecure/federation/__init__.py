"""Flower glue: the only package of fedsecure that imports ``flwr``."""
