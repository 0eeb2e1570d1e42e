"""The site worker's wire protocol: messages and context state make the round trip intact; handler errors
and exceptions come back as error replies; the socket is private to the site's user."""

from __future__ import annotations

import socket
import stat
import threading

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsecure.federation.worker import _serve, forward


def _incoming() -> tuple[Message, Context]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 9, 5, 1
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))}),
                          "config": ConfigRecord({"server-round": 2, "nonce": b"\x01" * 32})})
    msg = Message(content, 5, "train", group_id="2")
    msg.metadata.__dict__["_message_id"] = "m1"
    context = Context(run_id=9, node_id=5, node_config={"site-name": "a", "worker-socket": "x"},
                      state=RecordDict({"plan": ConfigRecord({"sigma": 1.25})}), run_config={"seed": 3})
    return msg, context


def test_worker_round_trip_and_errors(tmp_path):
    """Also: a connection that never sends its request does not hold up the others."""
    seen = {}

    def train(msg, context):
        seen["round"] = msg.content["config"]["server-round"]
        seen["w"] = msg.content["arrays"]["w"].numpy()
        seen["node_config"] = dict(context.node_config)
        context.state["plan"] = ConfigRecord({"sigma": 2.5})
        return Message(RecordDict({"metrics": MetricRecord({"loss": 0.5})}), reply_to=msg)

    def evaluate(msg, context):
        if msg.content["config"]["server-round"] == 2:
            return Message(Error(code=4001, reason="site-a: no data"), reply_to=msg)
        raise RuntimeError("boom")

    path = tmp_path / "w" / "worker.sock"
    ready = threading.Event()
    t = threading.Thread(target=_serve, args=(path, {"train": train, "evaluate": evaluate}, 4, ready), daemon=True)
    t.start()
    assert ready.wait(10)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a ClientApp that connects and says nothing
    stalled.connect(str(path))

    msg, context = _incoming()
    reply = forward("train", msg, context, str(path))
    assert not reply.has_error() and reply.content["metrics"]["loss"] == 0.5
    assert seen["round"] == 2 and np.array_equal(seen["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert seen["node_config"]["site-name"] == "a"
    assert context.state["plan"]["sigma"] == 2.5  # the worker's change to the state came back

    msg, context = _incoming()
    reply = forward("evaluate", msg, context, str(path))
    assert reply.has_error() and reply.error.reason == "site-a: no data" and reply.error.code == 4001
    msg, context = _incoming()
    msg.content["config"]["server-round"] = 3
    reply = forward("evaluate", msg, context, str(path))
    assert reply.has_error() and "RuntimeError: boom" in reply.error.reason
    stalled.close()
    t.join(10)


def test_client_app_falls_back_to_local_handling_when_the_worker_is_gone(tmp_path, monkeypatch):
    import client.app as client_app

    calls = []

    def local(msg, context):
        calls.append(msg.metadata.message_type)
        return Message(RecordDict({"metrics": MetricRecord({"loss": 1.0})}), reply_to=msg)

    monkeypatch.setattr(client_app, "handle_train", local)
    msg, context = _incoming()
    context.node_config["worker-socket"] = str(tmp_path / "no-worker.sock")
    reply = client_app.train(msg, context)
    assert calls == ["train"] and reply.content["metrics"]["loss"] == 1.0


def test_a_stale_ready_line_does_not_pass_for_a_new_worker():
    """A killed worker leaves its socket file and its "ready" line in the appended worker.log; the next
    start must wait for the new worker's own line (else the site would forward to a dead socket)."""
    import shutil
    import tempfile
    from pathlib import Path
    from types import SimpleNamespace

    from fedsecure.launch.deploy import start_worker
    from fedsecure.launch.engines import _stop

    state = Path(tempfile.mkdtemp(prefix="fs-w-"))  # short: AF_UNIX paths are limited
    stale = state / "worker" / "worker.sock"
    stale.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))  # a socket file nobody listens on
    (state / "worker.log").write_text(f"fedsecure worker ready on {stale}\n")
    proc, path = start_worker(SimpleNamespace(name="a", state_dir=state), emit=lambda line: None)
    try:
        assert path == stale
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(path))  # the new worker listens by the time start_worker returns
    finally:
        _stop(proc)
        shutil.rmtree(state, ignore_errors=True)
