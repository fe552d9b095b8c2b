"""A Flower ``Grid`` that runs the real ClientApp in this process, without Ray.

For fast strategy tests: every message is handed to ``ClientApp.__call__`` with a
``Context`` carrying the node's partition id, exactly as Flower would.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid


class InProcessGrid(Grid):
    def __init__(self, app: ClientApp, num_nodes: int, first_id: int = 1000) -> None:
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.task_id = 1
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.app = app
        self.nodes = {first_id + 7 * p: p for p in range(num_nodes)}
        self.contexts = {
            nid: Context(
                run_id=1,
                node_id=nid,
                node_config={"partition-id": p, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for nid, p in self.nodes.items()
        }
        self.sent: list[Message] = []

    def set_run(self, run):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, *a, **k):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for m in messages:
            self.sent.append(m)
            try:
                replies.append(self.app(m, self.contexts[m.metadata.dst_node_id]))
            except (
                Exception
            ) as e:  # as Flower's runtime: an exception is an error reply
                err = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=repr(e))
                replies.append(Message(err, reply_to=m))
        return replies
