"""Benchmark: the agent vs Flower's robust strategies under simulated attacks.

``python -m experiments.bench_robustness`` runs the grid of ``conf/experiment/
robustness.yaml`` on Flower's simulation engine: MNIST-5k, 20 clients, Dirichlet 0.5,
10 per round, 30 rounds; malicious fractions 0.2 and 0.4; every attack of
``fl_client/attacks.py``; the agent (deterministic policy, ``defense.enabled``) and
Flower's FedAvg, FedTrimmedAvg, MultiKrum and FedMedian; plus clean (no attack)
FedAvg and agent runs as the reference. Each run writes ``<runs-dir>/<name>/``; a run
whose ``summary.json`` exists is skipped, so an interrupted sweep continues where it
stopped. After every run the report is rewritten from whatever runs exist:
``experiments/results/robustness.md`` and ``.json``, and the plots
``robustness_accuracy_f<NN>.png`` (accuracy vs round) and
``robustness_detection.png`` (the agent's detection confusion per attack); another
``--out`` names them after its own stem.

``--report-only`` rewrites the report without running anything.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, get_args

from agent_strategy.detection import DetectionParams
from experiments.report_io import write_report
from orchestration.config import AttackName

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
ATTACKS = tuple(a for a in get_args(AttackName) if a != "none")
STRATEGIES = ("agent", "fedavg", "fedtrimmedavg", "multikrum", "fedmedian")
FLOWER = STRATEGIES[1:]
# Per-attack knobs: the sign flip and collusion send -4x an update, "large scaling"
# sends 10x, noise is N(0, 1) per coordinate (as in the project's NOTES).
ATTACK_KNOBS: dict[str, dict[str, float]] = {
    "sign_flip": {"attack.scale": 4.0},
    "collude": {"attack.scale": 4.0},
    "scaling": {"attack.scale": 10.0},
    "noise": {"attack.noise_std": 1.0},
}
DETECTION_TARGET = ("sign_flip", "scaling", "noise")
RETRIES = 2  # runs whose simulation runtime did not start are run again


def _infrastructure(error: BaseException) -> bool:
    """Return whether a failed run is the machine's fault (Ray did not start)."""
    return "Simulation Runtime crashed" in str(error)


def run_name(attack: str, fraction: float, strategy: str, seed: int) -> str:
    """Return the run directory name of one cell."""
    if attack == "none":
        return f"clean-{strategy}-s{seed}"
    return f"{attack}-f{round(100 * fraction):02d}-{strategy}-s{seed}"


def cell_config(
    attack: str, fraction: float, strategy: str, seed: int, rounds: int, runs_dir: Path
) -> dict[str, Any]:
    """Return the flat run configuration of one cell."""
    flat: dict[str, Any] = {
        "seed": seed,
        "num_rounds": rounds,
        "num_clients": 20,
        "clients_per_round": 10,
        "dataset.name": "mnist5k",
        "dataset.partitioner": "dirichlet",
        "dataset.alpha": 0.5,
        "model.name": "cnn",
        "strategy.name": strategy,
        "policy.name": "deterministic",
        "defense.enabled": True,
        "attack.kind": attack,
        "attack.fraction": fraction if attack != "none" else 0.0,
        "output_dir": str(runs_dir),
        "run_name": run_name(attack, fraction, strategy, seed),
    }
    flat.update(ATTACK_KNOBS.get(attack, {}))
    return flat


def plan(
    seeds: list[int],
    fractions: list[float],
    attacks: list[str],
    strategies: list[str],
    clean_agent: bool = True,
) -> list[tuple[str, float, str, int]]:
    """Return the cells in run order: clean FedAvg, the grid, then the clean agent."""
    cells: list[tuple[str, float, str, int]] = []
    for seed in seeds:
        cells.append(("none", 0.0, "fedavg", seed))
        for fraction in fractions:
            for attack in attacks:
                cells += [(attack, fraction, s, seed) for s in strategies]
        if clean_agent:
            cells.append(("none", 0.0, "agent", seed))
    return cells


def _first_pass(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return ``results`` up to the first round that does not follow the one before.

    A run restarted in the same directory appends a second pass (rounds 1, 2, ...)
    to ``results.jsonl``; the summary and the table are the first pass's.
    """
    for i in range(1, len(results)):
        if results[i].get("round", i) <= results[i - 1].get("round", i - 1):
            return results[:i]
    return results


def _load(runs_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for results_path in sorted(runs_dir.glob("*/results.jsonl")):
        summary_path = results_path.parent / "summary.json"
        cfg = json.loads((results_path.parent / "config.json").read_text())
        results = _first_pass(
            [json.loads(x) for x in results_path.read_text().splitlines()]
        )
        failed_path = results_path.parent / "failed.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
        elif failed_path.exists() and results:
            # The run raised (e.g. the model's weights overflowed to inf/NaN and a
            # feature could not be computed): scored at its last evaluated accuracy.
            summary = {
                "final_accuracy": results[-1]["accuracy"],
                "wall_s": None,
                "failed_rounds": sum(bool(r.get("failed")) for r in results),
                "stopped_at_round": results[-1]["round"],
                "error": json.loads(failed_path.read_text())["error"],
            }
        elif len(results) > 1 and results[-1].get("failed"):
            # Stopped after max_failed_rounds failed rounds (e.g. the model became
            # NaN and every client failed): scored at its last evaluated accuracy.
            summary = {
                "final_accuracy": results[-1]["accuracy"],
                "wall_s": None,
                "failed_rounds": sum(bool(r.get("failed")) for r in results),
                "stopped_at_round": results[-1]["round"],
            }
        else:
            continue  # unfinished
        rows.append(
            {
                "name": summary_path.parent.name,
                "attack": cfg["attack"]["kind"],
                "fraction": cfg["attack"]["fraction"],
                "strategy": cfg["strategy"]["name"],
                "seed": cfg["seed"],
                "final_accuracy": summary["final_accuracy"],
                "wall_s": summary["wall_s"],
                "failed_rounds": summary.get("failed_rounds", 0),
                "stopped_at_round": summary.get("stopped_at_round"),
                "error": summary.get("error"),
                "accuracy": [r["accuracy"] for r in results],
                "detection": (summary.get("attack") or {}).get("detection"),
                "malicious_flags": _malicious_flags(results_path.parent),
                # fl_server.loss_check: None for runs made before it existed
                "loss_check": summary.get("loss_check"),
            }
        )
    return rows


def _malicious_flags(run_dir: Path) -> dict[str, int] | None:
    """Return the replies, ``malicious`` and ``faulty`` flags in a decision log."""
    path = run_dir / "decisions.jsonl"
    if not path.exists():
        return None
    replies = flagged = faulty = 0
    for line in path.read_text().splitlines():
        d = json.loads(line)
        if d["phase"] != "aggregate":
            continue
        flags = d["decision"]["flags"]
        bad = {f["id"] for f in flags if f["kind"] in ("malicious", "faulty")}
        flagged += sum(f["kind"] == "malicious" for f in flags)
        faulty += sum(f["kind"] == "faulty" for f in flags)
        replies += len(set(d["decision"]["weights"]) | bad)
    return {"replies": replies, "flagged": flagged, "faulty": faulty}


def _finished(run_dir: Path) -> bool:
    """Return whether a run completed, stopped for good (diverged) or raised."""
    if (run_dir / "summary.json").exists() or (run_dir / "failed.json").exists():
        return True
    results = run_dir / "results.jsonl"
    if not results.exists():
        return False
    lines = results.read_text().splitlines()
    return bool(lines) and bool(json.loads(lines[-1]).get("failed"))


def _rel(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "-"
    # three decimals for precision / recall: at two, 0.898 would read as the 0.90 target
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def report(runs_dir: Path, out: Path, command: str) -> dict[str, Any]:
    """Write the table, the JSON and the plots from the runs in ``runs_dir``.

    A ``## Notes`` section of the report it replaces (the hand-written account of
    the misses) is kept (:func:`experiments.report_io.write_report`).
    """
    rows = _load(runs_dir)
    by: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["attack"], r["fraction"], r["strategy"]), []).append(r)

    def mean_acc(key: tuple[str, float, str]) -> float | None:
        runs = by.get(key)
        return statistics.mean(r["final_accuracy"] for r in runs) if runs else None

    clean = mean_acc(("none", 0.0, "fedavg"))
    counts = [
        r["malicious_flags"]
        for r in by.get(("none", 0.0, "agent"), [])
        if r["malicious_flags"]
    ]
    clean_flags = (
        f" ({sum(c['flagged'] for c in counts)} of {sum(c['replies'] for c in counts)}"
        " honest replies flagged malicious, "
        f"{sum(c.get('faulty', 0) for c in counts)} dropped as faulty)"
        if counts
        else ""
    )
    cells = sorted(
        {(a, f) for a, f, _ in by if a != "none"},
        key=lambda c: (c[1], ATTACKS.index(c[0]) if c[0] in ATTACKS else 99),
    )
    lines = [
        "# Robustness: agent vs Flower's strategies under attack",
        "",
        "MNIST-5k, 20 clients, Dirichlet 0.5, 10 per round, 30 rounds, CNN; final "
        "centralized accuracy in % (mean over the seeds run, `n` = seeds). The agent "
        "is the deterministic policy with `defense.enabled=true`. Detection: the "
        "agent's reply-level precision / recall, summed over the seeds "
        "(`fl_server/attack_report.py`): every reply (client, round) from the "
        "attack's first round is a positive when its client is malicious and is "
        "detected when the server rejected it or the policy flagged it malicious "
        "(a straggler or faulty flag is not a detection); an excluded client sends "
        "no reply, so its excluded rounds count neither way. A *faulty* flag "
        "(`agent_strategy/detection.py`) is a reply only the server loss check "
        "flagged whose candidate model is collapsed (at least "
        f"{DetectionParams().collapse_share:.0%} of the server's validation examples "
        "in one class): a broken update, dropped from the "
        "aggregate like a malicious one but neither called an attack nor held "
        "against the client's reputation. Faulty flags are counted apart: honest "
        "replies dropped as faulty (`faulty (honest)`) and attackers' replies "
        "flagged only faulty (`faulty (attack)`, counted as missed in the recall); "
        "`-` for runs made before the faulty flag existed.",
        "",
        f"Clean reference: FedAvg {_fmt(clean)}, agent "
        f"{_fmt(mean_acc(('none', 0.0, 'agent')))}{clean_flags}.",
        "",
        "| attack | malicious | agent | fedavg | fedtrimmedavg | multikrum | "
        "fedmedian | agent - best Flower (>= -0.5) | agent - clean FedAvg (>= -2 at "
        "20%) | precision | recall | faulty (honest) | faulty (attack) | n |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary_cells = []
    for attack, frac in cells:
        accs = {s: mean_acc((attack, frac, s)) for s in STRATEGIES}
        flower = [a for s, a in accs.items() if s in FLOWER and a is not None]
        agent = accs["agent"]
        gap_best = agent - max(flower) if agent is not None and flower else None
        gap_clean = agent - clean if agent is not None and clean is not None else None
        dets = [r["detection"] for r in by.get((attack, frac, "agent"), [])]
        tp = sum(d["replies"]["tp"] for d in dets if d)
        fp = sum(d["replies"]["fp"] for d in dets if d)
        fn = sum(d["replies"]["fn"] for d in dets if d)
        prec = tp / (tp + fp) if tp + fp else None
        rec = tp / (tp + fn) if tp + fn else None
        new = [d["replies"] for d in dets if d and "faulty_honest" in d["replies"]]
        faulty_h = sum(d["faulty_honest"] for d in new) if new else None
        faulty_m = sum(d["faulty_malicious"] for d in new) if new else None
        n = len(by.get((attack, frac, "agent"), []))
        all_done = len(flower) == len(FLOWER) and agent is not None
        lines.append(
            f"| {attack} | {round(100 * frac)}% | "
            + " | ".join(_fmt(accs[s]) for s in STRATEGIES)
            + f" | {_fmt(gap_best) if all_done else '(incomplete)'} | "
            f"{_fmt(gap_clean) if frac <= 0.2 else '-'} | {_fmt(prec, False)} | "
            f"{_fmt(rec, False)} | {'-' if faulty_h is None else faulty_h} | "
            f"{'-' if faulty_m is None else faulty_m} | {n} |"
        )
        summary_cells.append(
            {
                "attack": attack,
                "fraction": frac,
                "accuracy": accs,
                "agent_minus_best_flower": gap_best if all_done else None,
                "agent_minus_clean_fedavg": gap_clean,
                "detection": {
                    "tp": tp,
                    "fp": fp,
                    "fn": fn,
                    "precision": prec,
                    "recall": rec,
                    "faulty_honest": faulty_h,
                    "faulty_malicious": faulty_m,
                },
                "seeds": n,
            }
        )
    agent_rows = [r for r in rows if r["strategy"] == "agent"]
    checked = [r for r in agent_rows if r["loss_check"]]
    unchecked = sorted(r["name"] for r in agent_rows if not r["loss_check"])
    if checked:
        per_round = statistics.median(
            r["loss_check"]["seconds_per_round"] for r in checked
        )
        share = statistics.median(
            r["loss_check"]["seconds"] / r["wall_s"] for r in checked if r["wall_s"]
        )
        lines += [
            "",
            f"Server loss check (`fl_server/loss_check.py`, "
            f"{checked[0]['loss_check']['examples']} validation examples, "
            f"{len(checked)} agent runs): median {per_round:.2f} s per round, "
            f"{100 * share:.0f}% of the run's wall time.",
        ]
    if unchecked:
        lines += [
            "",
            "Agent runs made before the server loss check existed (their detection "
            "has no loss check): " + ", ".join(f"`{n}`" for n in unchecked) + ".",
        ]
    stopped = [r for r in rows if r["stopped_at_round"] and not r["error"]]
    crashed = [r for r in rows if r["error"]]
    lines += [
        "",
        *(
            f"`{r['name']}` stopped at round {r['stopped_at_round']} after "
            f"{r['failed_rounds']} failed rounds (every client failed: the global "
            "model had diverged); scored at its last accuracy."
            for r in stopped
        ),
        *(
            f"`{r['name']}` raised after round {r['stopped_at_round']} "
            f"({r['error'][:160]}); scored at its last accuracy."
            for r in crashed
        ),
        "",
        f"{len(rows)} runs in `{_rel(runs_dir)}`. "
        f"To run or continue the sweep (finished runs are skipped): `{command}`",
    ]
    write_report(out, "\n".join(lines) + "\n")
    data = {"clean_fedavg": clean, "cells": summary_cells, "runs": rows}
    out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    _plots(by, cells, out.parent, out.stem)
    return data


def _plots(
    by: dict[tuple[str, float, str], list[dict[str, Any]]],
    cells: list[tuple[str, float]],
    folder: Path,
    stem: str = "robustness",
) -> None:
    """Write ``<stem>_accuracy_f<NN>.png`` and ``<stem>_detection.png`` to ``folder``.

    The names follow the report's (``--out``), so that a second report (the
    held-out seeds) does not overwrite the first one's plots. Each strategy has one
    colour; its runs (one per seed) are drawn in it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for frac in sorted({f for _, f in cells}):
        attacks = [a for a, f in cells if f == frac]
        cols = min(4, len(attacks))
        rows_n = (len(attacks) + cols - 1) // cols
        fig, axes = plt.subplots(
            rows_n, cols, figsize=(4 * cols, 3 * rows_n), squeeze=False
        )
        for ax, attack in zip(axes.flat, attacks, strict=False):
            for k, s in enumerate(STRATEGIES):
                for i, r in enumerate(by.get((attack, frac, s), [])):
                    ax.plot(
                        r["accuracy"],
                        color=f"C{k}",
                        label=s if i == 0 else None,
                        lw=1.2 if s == "agent" else 0.9,
                        alpha=1.0 if s == "agent" else 0.8,
                    )
            for r in by.get(("none", 0.0, "fedavg"), [])[:1]:
                ax.plot(r["accuracy"], "k:", lw=1, label="clean fedavg")
            ax.set_title(f"{attack}, {round(100 * frac)}% malicious", fontsize=9)
            ax.set_xlabel("round")
            ax.set_ylabel("accuracy")
            ax.set_ylim(0, 1)
        for ax in list(axes.flat)[len(attacks) :]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / f"{stem}_accuracy_f{round(100 * frac):02d}.png", dpi=90)
        plt.close(fig)

    labels, tps, fps, fns, fhs = [], [], [], [], []
    for attack, frac in cells:
        dets = [
            r["detection"]
            for r in by.get((attack, frac, "agent"), [])
            if r["detection"]
        ]
        if not dets:
            continue
        labels.append(f"{attack}\n{round(100 * frac)}%")
        tps.append(sum(d["replies"]["tp"] for d in dets))
        fps.append(sum(d["replies"]["fp"] for d in dets))
        fns.append(sum(d["replies"]["fn"] for d in dets))
        fhs.append(sum(d["replies"].get("faulty_honest", 0) for d in dets))
    if labels:
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 3.5))
        x = range(len(labels))
        ax.bar(x, tps, label="malicious, caught (TP)", color="tab:green")
        ax.bar(x, fns, bottom=tps, label="malicious, missed (FN)", color="tab:red")
        ax.bar(
            x,
            fps,
            bottom=[a + b for a, b in zip(tps, fns, strict=True)],
            label="honest, flagged (FP)",
            color="tab:orange",
        )
        ax.bar(
            x,
            fhs,
            bottom=[a + b + c for a, b, c in zip(tps, fns, fps, strict=True)],
            label="honest, dropped as faulty",
            color="tab:gray",
        )
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_ylabel("replies")
        ax.set_title("agent detection per attack (reply level)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / f"{stem}_detection.png", dpi=90)
        plt.close(fig)


def _next_utc(hh_mm: str, now: float | None = None) -> float:
    """Return the epoch time of the next ``HH:MM`` UTC after ``now``."""
    import datetime as dt

    t = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC)
    hour, minute = (int(x) for x in hh_mm.split(":"))
    at = t.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if at <= t:
        at += dt.timedelta(days=1)
    return at.timestamp()


def _without_stop_after(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--stop-after":
            skip = True
        elif not a.startswith("--stop-after="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run (or continue) the sweep and write the report; return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    ap.add_argument(
        "--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES
    )
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench_robustness"))
    ap.add_argument("--out", default=str(RESULTS / "robustness.md"))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument(
        "--no-clean-agent", action="store_true", help="skip the clean agent run"
    )
    ap.add_argument(
        "--stop-after",
        metavar="HH:MM",
        help="start no run after the next HH:MM UTC (the report is still written)",
    )
    args = ap.parse_args(argv)
    deadline = _next_utc(args.stop_after) if args.stop_after else None
    runs_dir = Path(args.runs_dir).absolute()  # a symlinked runs dir stays relative
    out = Path(args.out)
    command = "python -m experiments.bench_robustness " + " ".join(
        a
        for a in _without_stop_after(argv if argv is not None else sys.argv[1:])
        if a != "--report-only"
    )
    if not args.report_only:
        from orchestration.config import RunConfig
        from orchestration.runner import RunFailedError, run_experiment

        cells = plan(
            args.seeds,
            args.fractions,
            args.attacks,
            args.strategies,
            clean_agent=not args.no_clean_agent,
        )
        for i, (attack, frac, strategy, seed) in enumerate(cells, 1):
            name = run_name(attack, frac, strategy, seed)
            if _finished(runs_dir / name):
                continue
            if deadline is not None and time.time() >= deadline:
                print(f"{args.stop_after} UTC passed: no new runs", flush=True)
                break
            print(f"[{i}/{len(cells)}] {name}", flush=True)
            t0 = time.perf_counter()
            flat = cell_config(attack, frac, strategy, seed, args.rounds, runs_dir)
            for attempt in range(1, RETRIES + 2):
                try:
                    run_experiment(RunConfig.from_flat(flat))
                except RunFailedError as e:
                    if isinstance(e.__cause__, (SystemExit, KeyboardInterrupt)):
                        raise  # stopped from outside (SIGTERM, Ctrl-C): not a result
                    print(f"{name} failed: {e}", flush=True)
                    if _infrastructure(e):
                        # Ray did not start (overloaded machine): the partial
                        # rounds are no result; start it again.
                        shutil.rmtree(runs_dir / name, ignore_errors=True)
                        if attempt <= RETRIES:
                            time.sleep(30)
                            continue
                        break
                    # Recorded so that the sweep does not rerun it and the report
                    # can say why it stopped (a deterministic run fails the same
                    # way again).
                    (runs_dir / name).mkdir(parents=True, exist_ok=True)
                    (runs_dir / name / "failed.json").write_text(
                        json.dumps({"error": str(e)})
                    )
                break
            print(f"{name}: {time.perf_counter() - t0:.0f}s", flush=True)
            report(runs_dir, out, command.strip())
    data = report(runs_dir, out, command.strip())
    print(out.read_text())
    return 0 if data["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
