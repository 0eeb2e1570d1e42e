"""Observation for operators: the coordinator's Prometheus endpoint (:mod:`fedsecure.observe.metrics`)."""
