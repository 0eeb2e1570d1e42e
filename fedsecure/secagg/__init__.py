"""Secure aggregation: the coordinator learns only the sum of the sites' updates (see :mod:`.protocol`)."""
