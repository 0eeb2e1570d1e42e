"""fedsecure ClientApp (``clientapp = "client.app:app"``): thin; the logic is in fedsecure.

In deployment, ``fedsecure client`` runs a warm worker and names its socket in the node config; the
(fresh, per-message) ClientApp process then only forwards the message to it. Otherwise the handlers run
here. Heavy modules (torch, transformers, Opacus) are imported only on that second path.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedsecure.federation.keys import NODE_WORKER_SOCKET  # constants only: no heavy imports

app = ClientApp()


def handle_train(msg: Message, context: Context) -> Message:
    """The site's train handler (imported only when this process does the work itself)."""
    from fedsecure.federation.site import handle_train as handler

    return handler(msg, context)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """The site's evaluate handler (imported only when this process does the work itself)."""
    from fedsecure.federation.site import handle_evaluate as handler

    return handler(msg, context)


def handle_query(msg: Message, context: Context) -> Message:
    """The site's secure-aggregation handler (imported only when this process does the work itself)."""
    from fedsecure.federation.secagg_site import handle_query as handler

    return handler(msg, context)


def _warn_fallback(e: Exception) -> None:
    import logging

    logging.getLogger(__name__).warning("site worker unreachable (%s); running the handler in this process", e)


def _worker(context: Context) -> str | None:
    path = context.node_config.get(NODE_WORKER_SOCKET)
    return str(path) if path else None


def _run(kind: str, msg: Message, context: Context) -> Message:
    """Forward to the site's warm worker when it has one; otherwise (or if it is gone) run the handler here."""
    path = _worker(context)
    if path:
        from fedsecure.federation.worker import forward

        try:
            return forward(kind, msg, context, path)
        except (ConnectionError, FileNotFoundError) as e:  # worker gone: do the work here (slower, same result)
            _warn_fallback(e)
    return {"train": handle_train, "evaluate": handle_evaluate, "query": handle_query}[kind](msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Flower's train entry point: forward to the site's worker, or train here."""
    return _run("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Flower's evaluate entry point: forward to the site's worker, or evaluate here."""
    return _run("evaluate", msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Flower's query entry point: one phase of secure aggregation, forwarded to the site's worker or done here."""
    return _run("query", msg, context)
