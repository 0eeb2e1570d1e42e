"""Flower glue: the only package of fedsecure that imports ``flwr``."""

import logging


def quiet_flower_logs(verbose: bool) -> None:
    """Flower configures its "flwr" logger (own handler, DEBUG) at import; tame it for the CLI."""
    import flwr.common.logger  # noqa: F401 - importing it is what installs the handler

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False  # it has its own handler; avoid printing each line twice
    flwr_logger.setLevel(logging.INFO if verbose else logging.WARNING)
