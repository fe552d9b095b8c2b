"""Observation factories shared by the tests (plain: new clients, no history)."""

from __future__ import annotations

from agent_strategy import ClientState, Limits, Observation, ReplyFeatures


def limits(**kw: object) -> Limits:
    base: dict[str, object] = dict(
        min_clients=2,
        max_clients=5,
        min_epochs=1,
        max_epochs=5,
        lr_min=1e-4,
        lr_max=0.5,
        max_weight_share=0.5,
        deadline_s=10.0,
    )
    base.update(kw)
    return Limits.model_validate(base)


def plain_train_obs(
    n: int = 10, target: int = 5, round_: int = 1, **kw: object
) -> Observation:
    clients = kw.pop("clients", None) or tuple(
        ClientState(id=f"c{i}", num_examples=100 + i) for i in range(n)
    )
    return Observation(
        phase="train",
        round=round_,
        num_rounds=30,
        target_clients=target,
        default_epochs=1,
        default_lr=0.05,
        limits=kw.pop("limits", None) or limits(max_clients=target),
        clients=clients,  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def plain_aggregate_obs(replies: list[ReplyFeatures], **kw: object) -> Observation:
    return Observation(
        phase="aggregate",
        round=1,
        num_rounds=30,
        target_clients=len(replies),
        default_epochs=1,
        default_lr=0.05,
        limits=kw.pop("limits", None) or limits(),
        clients=tuple(
            ClientState(id=r.id, num_examples=r.num_examples) for r in replies
        ),
        replies=tuple(replies),
    )


def reply(cid: str, n: int = 100, duration: float = 1.0) -> ReplyFeatures:
    return ReplyFeatures(
        id=cid,
        num_examples=n,
        train_loss=0.5,
        duration_s=duration,
        update_norm=1.0,
        cosine_to_median=0.9,
    )
