"""What every command shares: one-line errors with exit code 2, the consoles, logging."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from fedsecure.errors import FedSecureError

F = TypeVar("F", bound=Callable[..., Any])

console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True)


def friendly(fn: F) -> F:
    """Turn a FedSecureError into one clear line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FedSecureError as e:
            # escaped: a message may hold brackets (a config key list, a JSON value) that rich would eat as markup
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def setup_logging(verbose: bool) -> None:
    """Log through rich on stderr; tame Flower's own logger."""
    from rich.logging import RichHandler

    from fedsecure.federation import quiet_flower_logs

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False)], force=True)
    quiet_flower_logs(verbose)
