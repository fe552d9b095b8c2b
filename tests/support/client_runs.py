"""A tiny in-process run's config, and a mod that keeps the clients' train replies."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from orchestration.config import RunConfig


def tiny_config(tmp_path: Path, name: str, **kw: object) -> RunConfig:
    """Return digits + mlp, 4 clients (all per round), 3 rounds, deterministic."""
    flat: dict[str, object] = {
        "dataset.name": "digits",
        "model.name": "mlp",
        "num_clients": 4,
        "clients_per_round": 4,
        "num_rounds": 3,
        "output_dir": str(tmp_path),
        "run_name": name,
        "policy.name": "deterministic",
    }
    flat.update(kw)
    return RunConfig.from_flat(flat)


def capture_train_replies(replies: list[Message]) -> Mod:
    """Return a client mod appending every successful train reply to ``replies``."""

    def mod(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, ctx)
        if msg.metadata.message_type == "train" and not reply.has_error():
            replies.append(reply)
        return reply

    return mod
