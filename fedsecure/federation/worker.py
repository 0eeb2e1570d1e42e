"""A site's warm worker: one long-lived process that keeps torch, the model, the data and the accountant
loaded, so that Flower's per-message ClientApp process (1.42 starts a fresh ``flwr-clientapp`` for every
message) only forwards the message instead of importing and building everything again.

``fedsecure client`` starts it before the SuperNode and passes its socket in the node config
(``worker-socket``); ``client/app.py`` forwards when that key is present and runs the handlers itself
otherwise. The socket is a Unix domain socket in a 0700 directory, mode 0600: only the site's own user
can reach it. One message at a time, as Flower delivers them.

Wire format (both directions): three length-prefixed frames (8-byte big-endian length, each at most
1 GiB): a JSON header, the message content and the node's context state, both as Flower's own
``RecordDict`` protobuf.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import struct
import sys
import traceback
import uuid
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # type: ignore[attr-defined]

log = logging.getLogger(__name__)

VERSION = 1
MAX_FRAME = 1 << 30
ERR_WORKER = 4002
#: how long the worker waits for a request's bytes, or for the ClientApp to take the reply
IO_TIMEOUT_S = 60.0


def _send(sock: socket.socket, *frames: bytes) -> None:
    sock.sendall(b"".join(struct.pack(">Q", len(f)) + f for f in frames))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("the peer closed the connection mid-frame")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        (n,) = struct.unpack(">Q", _recv_exact(sock, 8))
        if n > MAX_FRAME:
            raise ConnectionError(f"frame of {n} bytes is over the {MAX_FRAME}-byte limit")
        out.append(_recv_exact(sock, n))
    return out


def _rd_bytes(rd: RecordDict) -> bytes:
    return recorddict_to_proto(rd).SerializeToString()


def _rd(data: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


# ---------------------------------------------------------------------------- ClientApp side
def forward(kind: str, msg: Message, context: Context, path: str) -> Message:
    """Run handler ``kind`` ("train", "evaluate" or "query") in the worker; returns the reply and updates
    ``context``.
    """
    header = {"v": VERSION, "kind": kind, "run_id": context.run_id, "node_id": context.node_id,
              "node_config": dict(context.node_config), "run_config": dict(context.run_config),
              "message_type": msg.metadata.message_type, "group_id": msg.metadata.group_id}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        _send(sock, json.dumps(header).encode(), _rd_bytes(msg.content), _rd_bytes(context.state))
        head, content, state = _recv(sock, 3)
    reply = json.loads(head)
    context.state = _rd(state)
    if "error" in reply:
        return Message(Error(code=int(reply["error"]["code"]), reason=str(reply["error"]["reason"])), reply_to=msg)
    return Message(_rd(content), reply_to=msg)


# ---------------------------------------------------------------------------- worker side
def _handle(conn: socket.socket, handlers: dict[str, Any], lock: Any) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    head, content, state = _recv(conn, 3)
    h = json.loads(head)
    if h.get("v") != VERSION or h.get("kind") not in handlers:
        _send(conn, json.dumps({"error": {"code": ERR_WORKER, "reason": "worker protocol mismatch"}}).encode(),
              b"", state)
        return
    context = Context(run_id=int(h["run_id"]), node_id=int(h["node_id"]), node_config=dict(h["node_config"]),
                      state=_rd(state), run_config=dict(h["run_config"]))
    with lock:  # one message at a time: the model and the site's state are shared
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = context.run_id, context.node_id, 1
        msg = Message(_rd(content), context.node_id, str(h["message_type"]), group_id=str(h["group_id"]))
        msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        try:
            reply = handlers[h["kind"]](msg, context)
        except Exception as e:  # noqa: BLE001 - like Flower's runtime: an exception becomes an error reply
            log.error("worker: %s handler raised:\n%s", h["kind"], traceback.format_exc())
            reply = Message(Error(code=ERR_WORKER, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
    if reply.has_error():
        out = {"error": {"code": reply.error.code, "reason": reply.error.reason}}
        _send(conn, json.dumps(out).encode(), b"", _rd_bytes(context.state))
    else:
        _send(conn, json.dumps({"ok": True}).encode(), _rd_bytes(reply.content), _rd_bytes(context.state))


def serve(path: Path) -> None:
    """Serve the site's train and evaluate handlers on the Unix socket ``path`` until killed."""
    from fedsecure.federation.secagg_site import handle_query
    from fedsecure.federation.site import handle_evaluate, handle_train  # the heavy imports, once

    _serve(path, {"train": handle_train, "evaluate": handle_evaluate, "query": handle_query})


def _serve(path: Path, handlers: dict[str, Any], max_requests: int | None = None,
           ready: Any = None) -> None:
    """Accept connections; each is read on its own thread (with a timeout, so a stalled or dead ClientApp
    process cannot block the others), and the handlers run one at a time under a lock.
    """
    import threading

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.unlink(missing_ok=True)
    old = os.umask(0o177)
    try:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
    finally:
        os.umask(old)
    server.listen(16)
    print(f"fedsecure worker ready on {path}", flush=True)
    if ready is not None:
        ready.set()
    lock = threading.Lock()
    threads = []

    def serve_one(conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(IO_TIMEOUT_S)
                _handle(conn, handlers, lock)
            except (ConnectionError, OSError, ValueError) as e:  # socket.timeout is an OSError
                log.warning("worker: dropped a request: %s", e)

    served = 0
    with server:
        while max_requests is None or served < max_requests:
            conn, _ = server.accept()
            served += 1
            t = threading.Thread(target=serve_one, args=(conn,), daemon=True)
            t.start()
            threads.append(t)
            threads = [x for x in threads if x.is_alive()]
    for t in threads:
        t.join()


def main() -> None:
    """``python -m fedsecure.federation.worker --socket PATH`` (started by ``fedsecure client``)."""
    ap = argparse.ArgumentParser(description="fedsecure site worker (started by `fedsecure client`).")
    ap.add_argument("--socket", required=True, type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    serve(args.socket)


if __name__ == "__main__":
    main()
