"""The ``fedsecure`` command line (Typer): :mod:`fedsecure.cli.app` wires one module per command group."""

from fedsecure.cli.app import app, main

__all__ = ["app", "main"]
