"""Render an :class:`Observation` as chat messages for the LLM.

The prompt carries numbers, opaque client ids (``c0..cN``), the fixed task text written
here and the plan name, sanitised to ``[a-z0-9_-]``: no string a client sends can reach
it. Tables are rendered as ``{"columns": [...], "rows": [[...], ...]}`` (compact JSON);
floats keep four significant digits, non-finite numbers become ``null``.

Context budget. When the messages exceed ``max_prompt_chars`` they are shrunk in this
order, re-rendering after each step and never cutting JSON:

1. drop history rows, oldest first (the latest rounds say most about the next one);
2. train phase: drop client rows, keeping the clients the deterministic policy ranks
   highest (never-seen clients first, then by Oort utility, then by id), but never
   fewer than ``max(target_clients, limits.min_clients)`` rows;
   aggregate phase: drop the per-client history columns of the replies table (the
   round's reply features stay: every reply needs a weight, so no reply row is
   dropped);
3. if it still does not fit, raise :class:`PromptTooLarge` (the policy falls back).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from ..codecs import allowed_codecs
from ..deterministic import utilities
from ..types import AggregationRule, Compression, Decision, Observation
from .answer import answer_schema

_PLAN_CHARS = re.compile(r"[^a-z0-9_-]")
PLAN_MAX_CHARS = 32

CLIENT_COLUMNS = (
    "id",
    "num_examples",
    "rounds_selected",
    "rounds_accepted",
    "last_selected_round",
    "last_loss",
    "last_duration_s",
    "epoch_s",
    "comm_s",
    "failures",
    "times_flagged",
    "reputation",
    "excluded_until",
)
REPLY_COLUMNS = (
    "id",
    "num_examples",
    "train_loss",
    "duration_s",
    "update_norm",
    "cosine_to_median",
    "krum_ratio",
    "duplicates",
)
CHECKED_COLUMNS = ("checked_accuracy", "checked_top_share", "loss_gap")
"""Reply columns shown when the server checked each candidate model's loss."""
REPLY_HISTORY_COLUMNS = ("rounds_accepted", "failures", "times_flagged")

_SYSTEM = (
    "You are the decision policy of a federated-learning server. The user message is "
    "the state of one round as JSON: numbers and opaque client ids only. Answer with "
    "exactly one JSON object that matches the schema below: no prose, no code fences."
)
_TRAIN_TASK = (
    "Task (phase train): choose which clients train this round and, for each selected "
    "client, local_epochs and lr. Select between {lo} and {hi} clients; {target} is "
    "the target. Prefer clients with a high last_loss and many examples; avoid "
    "clients with failures, times_flagged > 0 or last_duration_s above deadline_s "
    "({deadline:g}); give clients never selected (last_selected_round 0) a chance. "
    "local_epochs in [{emin}, {emax}] (default {edef}), lr in [{lrmin:g}, {lrmax:g}] "
    "(default {lrdef:g}). flags: clients to exclude this round (usually empty)."
)
_AGG_TASK = (
    "Task (phase aggregate): give every replying client a weight >= 0 (weights are "
    "normalised; no client gets more than {share:g} of the total) and flag replies "
    "that are late (duration_s above deadline_s, {deadline:g}), faulty, or malicious "
    "(cosine_to_median far below the others or negative, update_norm far above or "
    "near zero, krum_ratio far above 1, or duplicates > 0). "
    "A flagged client gets weight 0. Give each flag a short reason."
)
_CHECKED_TASK = (
    "checked_accuracy is the server's accuracy of global + this update on its own "
    "validation data: far below the others' means a model trained on wrong labels "
    "(malicious), unless checked_top_share (the share of predictions in one class) "
    "is near 1: a collapsed model (faulty). loss_gap = server's loss - reported loss."
)
RULE_MEANINGS: dict[AggregationRule, str] = {
    "weighted": "weighted mean (all replies honest)",
    "trimmed": "per-coordinate trimmed weighted mean (a few outliers)",
    "median": "per-coordinate weighted median (more suspects than you may flag)",
    "krum": "multi-Krum, weighted mean of the most central updates (a few far-off "
    "updates)",
}
"""One line per aggregation rule, shown in the aggregate-phase task."""
_RULE_TASK = (
    "aggregation (the rule applied with the weights): {rules}; null = the server's "
    "default."
)
CODEC_MEANINGS: dict[Compression, str] = {
    "none": "float32, full size",
    "q8": "8-bit quantized, 1/4 of the size",
    "q4": "4-bit quantized, 1/8 of the size",
    "topk": "largest entries only (top-k with error feedback), a few percent of the "
    "size",
    "topk_q8": "top-k with 8-bit values, smaller still",
}
"""One line per upload codec, shown in the train-phase task when codecs vary."""
_CODEC_TASK = (
    "compression (each allocation's upload codec): {codecs}; null = the server's "
    "bandwidth-based choice. comm_s is the time to move the full model down and up: "
    "a client with a high comm_s (slow link) finishes sooner with a smaller codec, "
    "and smaller codecs are noisier."
)


class PromptTooLarge(ValueError):
    """The observation does not fit ``max_prompt_chars`` even after trimming."""


@dataclass(frozen=True)
class RoundSummary:
    """One past round, in numbers, as shown in the prompt's history table."""

    round: int
    accuracy: float | None
    replies: int
    flagged: int
    mean_train_loss: float | None
    mean_update_norm: float | None
    min_cosine: float | None
    llm_used: int

    @classmethod
    def from_aggregate(cls, obs: Observation, decision: Decision) -> RoundSummary:
        """Summarise an aggregate-phase observation and the decision taken on it."""
        losses = [r.train_loss for r in obs.replies if math.isfinite(r.train_loss)]
        norms = [r.update_norm for r in obs.replies]
        return cls(
            round=obs.round,
            accuracy=obs.last_accuracy,
            replies=len(obs.replies),
            flagged=len({f.id for f in decision.flags}),
            mean_train_loss=float(np.mean(losses)) if losses else None,
            mean_update_norm=float(np.mean(norms)) if norms else None,
            min_cosine=min(
                (
                    r.cosine_to_median
                    for r in obs.replies
                    if r.cosine_to_median is not None
                ),
                default=None,
            ),
            llm_used=int(decision.source == "llm"),
        )


@dataclass(frozen=True)
class RenderedPrompt:
    """Chat messages plus what the renderer kept and dropped."""

    messages: list[dict[str, str]]
    schema: dict[str, Any]
    shown_ids: tuple[str, ...]
    dropped_history: int
    dropped_rows: int
    chars: int


def sanitize_plan(plan: str) -> str:
    """Return ``plan`` lower-cased, with only ``[a-z0-9_-]`` kept, cut to 32 chars."""
    cleaned = _PLAN_CHARS.sub("", plan.lower())[:PLAN_MAX_CHARS]
    return cleaned or "default"


def num(x: float | int | None) -> float | int | None:
    """Return ``x`` rounded to four significant digits; non-finite -> ``None``."""
    if x is None or isinstance(x, bool):
        return None if x is None else int(x)
    if isinstance(x, int):
        return x
    if not math.isfinite(x):
        return None
    return float(f"{x:.4g}")


def _table(columns: Sequence[str], rows: list[list[Any]]) -> dict[str, Any]:
    return {"columns": list(columns), "rows": rows}


def _client_rows(obs: Observation) -> list[list[Any]]:
    return [
        [c.id] + [num(getattr(c, k)) for k in CLIENT_COLUMNS[1:]] for c in obs.clients
    ]


def train_row_order(obs: Observation) -> list[int]:
    """Return client indices, most worth showing first (see the module docstring)."""
    util = utilities(obs)
    return sorted(
        range(len(obs.clients)),
        key=lambda i: (
            0 if not np.isfinite(util[i]) else 1,
            -float(util[i]) if np.isfinite(util[i]) else 0.0,
            int(obs.clients[i].id[1:]),
        ),
    )


def _checked(obs: Observation) -> bool:
    return any(r.checked_loss is not None for r in obs.replies)


def _reply_columns(obs: Observation) -> tuple[str, ...]:
    """Return the reply features shown: the checked ones only if the server checked."""
    return REPLY_COLUMNS + (CHECKED_COLUMNS if _checked(obs) else ())


def _reply_rows(
    obs: Observation, columns: Sequence[str], with_history: bool
) -> list[list[Any]]:
    state = {c.id: c for c in obs.clients}
    rows = []
    for r in obs.replies:
        row: list[Any] = [r.id] + [num(getattr(r, k)) for k in columns[1:]]
        if with_history:
            c = state.get(r.id)
            row += [num(getattr(c, k)) if c else None for k in REPLY_HISTORY_COLUMNS]
        rows.append(row)
    return rows


def _system_text(obs: Observation) -> str:
    lim = obs.limits
    if obs.phase == "train":
        task = _TRAIN_TASK.format(
            lo=lim.min_clients,
            hi=lim.max_clients,
            target=obs.target_clients,
            deadline=lim.deadline_s,
            emin=lim.min_epochs,
            emax=lim.max_epochs,
            edef=obs.default_epochs,
            lrmin=lim.lr_min,
            lrmax=lim.lr_max,
            lrdef=obs.default_lr,
        )
        codecs = allowed_codecs(obs)
        if len(codecs) > 1:
            task += " " + _CODEC_TASK.format(
                codecs="; ".join(f"{c} = {CODEC_MEANINGS[c]}" for c in codecs)
            )
    else:
        task = _AGG_TASK.format(share=lim.max_weight_share, deadline=lim.deadline_s)
        if _checked(obs):
            task += " " + _CHECKED_TASK
        if len(lim.rules) > 1:
            task += " " + _RULE_TASK.format(
                rules="; ".join(f"{r} = {RULE_MEANINGS[r]}" for r in lim.rules)
            )
    schema = json.dumps(answer_schema(obs), separators=(",", ":"))
    return f"{_SYSTEM}\n{task}\nSchema: {schema}"


def _user_text(
    obs: Observation,
    history: Sequence[RoundSummary],
    client_idx: list[int] | None,
    reply_history: bool,
) -> str:
    body: dict[str, Any] = {
        "phase": obs.phase,
        "round": obs.round,
        "num_rounds": obs.num_rounds,
        "plan": sanitize_plan(obs.plan),
        "last_accuracy": num(obs.last_accuracy),
        "target_clients": obs.target_clients,
        "default_epochs": obs.default_epochs,
        "default_lr": num(obs.default_lr),
        "limits": {
            k: num(v)
            for k, v in obs.limits.model_dump().items()
            # not numbers; the task text lists the allowed rules and codecs
            if k not in ("rules", "codecs")
        },
    }
    if obs.phase == "train":
        rows = _client_rows(obs)
        idx = client_idx if client_idx is not None else list(range(len(rows)))
        body["clients_total"] = len(rows)
        body["clients"] = _table(CLIENT_COLUMNS, [rows[i] for i in idx])
    else:
        cols = _reply_columns(obs)
        history_cols = REPLY_HISTORY_COLUMNS if reply_history else ()
        body["replies"] = _table(
            cols + history_cols, _reply_rows(obs, cols, reply_history)
        )
    if history:
        names = [f.name for f in fields(RoundSummary)]
        body["history"] = _table(
            names, [[num(v) for v in asdict(h).values()] for h in history]
        )
    return json.dumps(body, separators=(",", ":"), allow_nan=False)


def _render(
    obs: Observation,
    history: Sequence[RoundSummary],
    client_idx: list[int] | None,
    reply_history: bool,
) -> tuple[list[dict[str, str]], int]:
    messages = [
        {"role": "system", "content": _system_text(obs)},
        {
            "role": "user",
            "content": _user_text(obs, history, client_idx, reply_history),
        },
    ]
    return messages, sum(len(m["content"]) for m in messages)


def render_prompt(
    obs: Observation,
    history: Sequence[RoundSummary] = (),
    max_prompt_chars: int = 12000,
) -> RenderedPrompt:
    """Render ``obs`` (and past rounds) as system + user messages within a budget.

    Parameters
    ----------
    obs : Observation
        The round's observation.
    history : sequence of RoundSummary
        Past rounds, oldest first.
    max_prompt_chars : int
        Upper bound on the characters of all message contents together.

    Returns
    -------
    RenderedPrompt
        The messages, the answer schema with the shown ids as ``enum``, and how many
        history and client rows were dropped.

    Raises
    ------
    PromptTooLarge
        If the observation does not fit even after the trimming steps.
    """
    hist = list(history)
    order = train_row_order(obs) if obs.phase == "train" else None
    n_rows = len(obs.clients)
    keep = n_rows
    reply_history = True

    def render() -> tuple[list[dict[str, str]], int]:
        idx = sorted(order[:keep]) if order is not None else None
        return _render(obs, hist, idx, reply_history)

    messages, chars = render()
    dropped_history = 0
    while chars > max_prompt_chars and hist:
        hist.pop(0)
        dropped_history += 1
        messages, chars = render()
    if chars > max_prompt_chars and order is not None:
        # Bisect for the most rows that fit, between the floor and all rows.
        lo, hi = min(n_rows, max(obs.target_clients, obs.limits.min_clients)), n_rows
        while lo < hi:
            keep = (lo + hi + 1) // 2
            if render()[1] <= max_prompt_chars:
                lo = keep
            else:
                hi = keep - 1
        keep = lo
        messages, chars = render()
    if chars > max_prompt_chars and obs.phase == "aggregate":
        reply_history = False
        messages, chars = render()
    if chars > max_prompt_chars:
        raise PromptTooLarge(
            f"{chars} chars > max_prompt_chars={max_prompt_chars} after trimming "
            f"({obs.phase} phase, {len(obs.clients)} clients, {len(obs.replies)} "
            "replies); raise max_prompt_chars or use the deterministic policy"
        )
    if order is not None:
        shown = tuple(obs.clients[i].id for i in sorted(order[:keep]))
    else:
        shown = tuple(r.id for r in obs.replies)
    return RenderedPrompt(
        messages=messages,
        schema=answer_schema(obs, list(shown)),
        shown_ids=shown,
        dropped_history=dropped_history,
        dropped_rows=n_rows - keep if order is not None else 0,
        chars=chars,
    )
