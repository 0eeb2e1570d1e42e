"""An in-process Flower Grid: the real ServerApp and ClientApp objects, no network, no Ray.

Flower 1.42 has no thread or in-process simulation backend (Ray is hard-coded), and Ray takes
seconds to start. ``InProcessGrid`` implements Flower's :class:`~flwr.serverapp.Grid` by
copying each instruction message, giving it an id as the SuperLink would, and calling the
ClientApp for the destination node with that node's persistent :class:`~flwr.app.Context`.
A ClientApp that raises produces an error reply, as Flower's runtime does, so the ServerApp
sees exactly what it would see in deployment.
"""

from __future__ import annotations

import copy
import logging
import traceback
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedsecure.federation import keys

log = logging.getLogger(__name__)

_FIRST_NODE_ID = 1001


class InProcessGrid(Grid):
    """Deliver messages to ClientApps in this process, one node per ``node_configs`` entry."""

    def __init__(self, client_app: ClientApp, node_configs: list[Mapping[str, Any]],
                 run_config: Mapping[str, Any], run_id: int = 1) -> None:
        self._client_app = client_app
        self._run = Run.create_empty(run_id)
        self._run.override_config = dict(run_config)
        self._contexts: dict[int, Context] = {}
        for i, node_config in enumerate(node_configs):
            node_id = _FIRST_NODE_ID + i
            self._contexts[node_id] = Context(run_id=run_id, node_id=node_id, node_config=dict(node_config),
                                              state=RecordDict(), run_config=dict(run_config))
        self._replies: dict[str, Message] = {}
        self.offline: set[int] = set()  # node ids that never answer (fault injection in tests)

    # -- Grid API --------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        """Flower's Grid API: the run this grid serves."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run this grid serves."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """A message to ``dst_node_id`` (Flower's deprecated Grid API, kept for completeness)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Every simulated node."""
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node's ClientApp now; returns the message ids."""
        ids = []
        for msg in messages:
            message_id = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = message_id
            ids.append(message_id)
            if msg.metadata.dst_node_id in self.offline:
                continue
            self._replies[message_id] = self._deliver(msg)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` that are ready."""
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push and pull at once (delivery is synchronous here)."""
        return self.pull_messages(self.push_messages(messages))

    # -- delivery --------------------------------------------------------------------------
    def _deliver(self, msg: Message) -> Message:
        node_id = msg.metadata.dst_node_id
        context = self._contexts.get(node_id)
        if context is None:
            return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=f"no node {node_id}"), reply_to=msg)
        delivered = copy.deepcopy(msg)  # the site never shares objects with the coordinator
        try:
            reply = self._client_app(delivered, context)
        except Exception as e:  # noqa: BLE001 - mirrors Flower's runtime: an exception becomes an error reply
            log.debug("ClientApp on node %s raised:\n%s", node_id, traceback.format_exc())
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                  reason=f"{type(e).__name__}: {e}"), reply_to=delivered)
        reply = copy.deepcopy(reply)
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        return reply


def run_inprocess(server_app: ServerApp, client_app: ClientApp, *, num_nodes: int,
                  run_config: Mapping[str, Any], node_configs: list[Mapping[str, Any]] | None = None,
                  run_id: int = 1) -> InProcessGrid:
    """Run ``server_app`` against ``num_nodes`` in-process ClientApps; returns the grid used."""
    if node_configs is None:
        node_configs = [{keys.PARTITION_ID: i, keys.NUM_PARTITIONS: num_nodes} for i in range(num_nodes)]
    grid = InProcessGrid(client_app, node_configs, run_config, run_id=run_id)
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = 1
    context = Context(run_id=run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=dict(run_config))
    server_app(grid, context)
    return grid
