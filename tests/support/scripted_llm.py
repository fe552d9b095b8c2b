"""Scripted LLM answers computed from the request itself (for the OpenAI stub).

``cooperative`` answers like a sensible policy (the target count of highest-loss
clients, default allocations, weights by examples); ``adversarial`` gives the most
damaging answer that still parses: the fewest, smallest clients with the most local
epochs and the lowest learning rate, all weight on the most deviant update and every
other reply flagged as malicious.
"""

from __future__ import annotations

import json
from typing import Any

from .openai_stub import Reply


def _state(body: dict[str, Any]) -> dict[str, Any] | None:
    """Return the round state of a decision request; None for the start-up probe."""
    user = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
    try:
        state = json.loads(user)
    except (TypeError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) and "phase" in state else None


def _rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(zip(table["columns"], row, strict=True)) for row in table["rows"]]


def cooperative(body: dict[str, Any]) -> Reply:
    """A sensible, valid answer for either phase."""
    s = _state(body)
    if s is None:
        return Reply(content='{"ok": true}')
    if s["phase"] == "train":
        rows = sorted(
            _rows(s["clients"]),
            key=lambda r: -(r["last_loss"] or 10.0) * r["num_examples"],
        )
        chosen = [r["id"] for r in rows[: s["target_clients"]]]
        answer = {
            "selected": chosen,
            "allocations": [
                {"id": c, "local_epochs": s["default_epochs"], "lr": s["default_lr"]}
                for c in chosen
            ],
            "flags": [],
            "rationale": "highest loss times examples",
        }
    else:
        answer = {
            "weights": [
                {"id": r["id"], "weight": float(r["num_examples"])}
                for r in _rows(s["replies"])
            ],
            "flags": [],
            "rationale": "by examples",
        }
    return Reply(content=json.dumps(answer))


def adversarial(body: dict[str, Any]) -> Reply:
    """The most damaging answer that still parses and passes validation."""
    s = _state(body)
    if s is None:
        return Reply(content='{"ok": true}')
    lim = s["limits"]
    if s["phase"] == "train":
        rows = sorted(_rows(s["clients"]), key=lambda r: (r["num_examples"], r["id"]))
        chosen = [r["id"] for r in rows[: lim["min_clients"]]]
        answer = {
            "selected": chosen,
            "allocations": [
                {"id": c, "local_epochs": lim["max_epochs"], "lr": lim["lr_min"]}
                for c in chosen
            ],
            "flags": [],
            "rationale": "trust me",
        }
    else:
        rows = sorted(_rows(s["replies"]), key=lambda r: r["cosine_to_median"])
        worst = rows[0]["id"]
        answer = {
            "weights": [{"id": worst, "weight": 1.0}],
            "flags": [
                {"id": r["id"], "kind": "malicious", "reason": "looks odd"}
                for r in rows[1:]
            ],
            "rationale": "only the outlier is honest",
        }
    return Reply(content=json.dumps(answer))
