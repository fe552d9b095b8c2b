"""Replay the deterministic detectors, with other settings, on finished runs.

Every aggregate-phase entry of a run's ``decisions.jsonl`` holds the server-measured
features of the replies the decision was made on. This replays
:func:`agent_strategy.detect` and the reputation that feeds its ``record`` round by
round over those features, with other :class:`~agent_strategy.DetectionParams`, keeps
as many flagged clients as the guard does (:func:`~agent_strategy.guard.cap_flags`),
and scores the flags against the run's simulated attackers with
:func:`fl_server.attack_report.detection_scores` (reply level; a ``faulty`` or
``straggler`` flag is not a detection). A what-if, not a rerun: who replied in each
round (exclusions included) is the logged run's, so a setting that would have
excluded other clients is scored on the replies the run actually got; replies the
server rejected are not in the log and count neither way; straggler flags are not
replayed (they only take a place under the guard's cap in deadline runs). Use it to
choose settings, then rerun the benchmark.

The run's own settings are its ``config.json``'s ``defense.*``. Runs made before
``defense.norm_examples_exponent`` existed compared raw norms: replay them with
``--set norm_examples_exponent=0`` to reproduce their flags.

Usage::

    python -m experiments.replay_detection RUN_DIR... [--set big_norm_ratio=5 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from agent_strategy import ClientState, DetectionParams, ReplyFeatures, detect
from agent_strategy.detection import clients_with_record
from agent_strategy.guard import cap_flags
from agent_strategy.reputation import next_state
from fl_client.attacks import malicious_partitions
from fl_server.attack_report import detection_scores
from fl_server.policy_setup import detection_params, reputation_params
from fl_server.server_app import limits_for
from orchestration.config import RunConfig


class NoFeaturesError(ValueError):
    """The run's decision log has no reply features (made before they were logged)."""


def replay_run(
    run_dir: Path,
    overrides: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Return the reply-level detection counts of the run's detectors, replayed.

    Parameters
    ----------
    run_dir : Path
        A finished (or partial) agent run.
    overrides : dict, optional
        :class:`~agent_strategy.DetectionParams` fields to change from the run's
        own (``defense.*``); none: the run's settings, which reproduces its flags.

    Raises
    ------
    NoFeaturesError
        If no aggregate entry of the run's ``decisions.jsonl`` has its replies.
    """
    cfg = RunConfig.model_validate(json.loads((run_dir / "config.json").read_text()))
    params = dataclasses.replace(
        detection_params(cfg) or DetectionParams(),
        **(overrides or {}),  # type: ignore[arg-type]
    )
    bad = (
        [
            f"c{p}"
            for p in malicious_partitions(
                cfg.num_clients, cfg.attack.fraction, cfg.seed
            )
        ]
        if cfg.attack.kind != "none"
        else []
    )
    rep = reputation_params(cfg)
    limits = limits_for(cfg)
    states: dict[str, ClientState] = {}
    history: list[dict[str, Any]] = []
    for line in (run_dir / "decisions.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry["phase"] != "aggregate" or "replies" not in entry:
            continue
        rnd = int(entry["round"])
        replies = [ReplyFeatures(**r) for r in entry["replies"]]
        record = clients_with_record(states.values(), params)
        # the guard keeps at most its cap of flagged clients, most suspicious first
        flags = cap_flags(detect(replies, params, record), len(replies), limits)
        flagged = {f.id for f in flags if f.kind == "malicious"}
        faulty = {f.id for f in flags if f.kind == "faulty"} - flagged
        for r in replies:
            if r.id in faulty:  # neither a bad nor a good round, as the strategy
                continue
            state = states.get(r.id) or ClientState(id=r.id)
            states[r.id] = next_state(
                state, round_=rnd, bad=r.id in flagged, params=rep
            )
        history.append(
            {
                "round": rnd,
                "replied": [r.id for r in replies],
                "flagged": sorted(flagged),
                "faulty": sorted(faulty),
            }
        )
    if not history:
        raise NoFeaturesError(
            f"{run_dir / 'decisions.jsonl'} has no aggregate entry with its replies' "
            "features (runs made before the decision log carried them cannot be "
            "replayed)"
        )
    scores = detection_scores(history, bad, cfg.attack.start_round)
    return {
        **scores["replies"],
        "precision": scores["precision"],
        "recall": scores["recall"],
    }


def _overrides(settings: list[str]) -> dict[str, float]:
    fields = {f.name: f for f in dataclasses.fields(DetectionParams)}
    values: dict[str, float] = {}
    for item in settings:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise SystemExit(
                f"--set {item!r}: expected NAME=VALUE with NAME one of "
                f"{', '.join(fields)}"
            )
        values[name] = int(value) if fields[name].type == "int" else float(value)
    DetectionParams(**values)  # type: ignore[arg-type]  # refuses invalid values
    return values


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    """Print the logged settings' detection on each run, and the variant's if any."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories")
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE")
    args = ap.parse_args(argv)
    try:
        variant = _overrides(args.set)
    except ValueError as e:  # a value DetectionParams refuses
        print(f"--set {' '.join(args.set)}: {e}", file=sys.stderr)
        return 2
    lines = [
        "| run | settings | tp | fp | fn | precision | recall |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in args.runs:
        try:
            rows = [("the run's own", replay_run(run))]
            if variant:  # without --set the variant is the run's own: one row
                rows.append((" ".join(args.set), replay_run(run, variant)))
        except (OSError, NoFeaturesError) as e:
            print(f"{run}: {e}", file=sys.stderr)
            return 2
        lines += [
            f"| {run.name} | {name} | {s['tp']} | {s['fp']} | {s['fn']} | "
            f"{_fmt(s['precision'])} | {_fmt(s['recall'])} |"
            for name, s in rows
        ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
