"""Benchmark: stragglers -- the agent vs Flower's FedAvg on simulated devices.

``python -m experiments.bench_stragglers [--seeds 0 1 2] [--rounds N]``

Composes the Hydra preset ``conf/experiment/stragglers.yaml`` (50 clients, log-normal
compute speed sigma 1.0, 10% dropout per round, one deadline for every strategy) once
per strategy and seed, and runs it on Flower's simulation engine: the agent
(deterministic policy) and Flower's FedAvg (random selection). A run whose
``summary.json`` already exists under ``--runs-dir`` is reused, not rerun, so a long
benchmark can be continued. Writes ``--out`` (default
``experiments/results/stragglers.md``, plus ``.json``): per seed, the simulated time
to ``--target`` accuracy, final, best and last-5-round mean accuracy, simulated time
of the whole run, mean accepted updates per round and failed rounds (fewer than
``min_replies``); then the speed-up (FedAvg's time to target / the agent's) and the
final-accuracy difference per seed, and their minimum, median and mean over the
seeds. Plots (accuracy vs round and vs simulated time) go to ``--plots`` through
:mod:`experiments.report`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir

from experiments.report import (
    build_report,
    load_run,
    time_to_accuracy,
    write_plots,
)
from experiments.report_io import write_report
from experiments.run import to_run_config
from orchestration.config import RunConfig
from orchestration.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("agent", "fedavg")


def preset_config(
    strategy: str, seed: int, runs_dir: str, rounds: int | None = None
) -> RunConfig:
    """Return the ``stragglers`` preset for one strategy and seed."""
    overrides = [
        "+experiment=stragglers",
        f"strategy={strategy}",
        f"seed={seed}",
        f"output_dir={runs_dir}",
        f"run_name={strategy}-s{seed}",
    ]
    if rounds is not None:
        overrides.append(f"num_rounds={rounds}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return to_run_config(compose(config_name="config", overrides=overrides))


def run_stats(rows: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Return one run's straggler numbers from its ``results.jsonl`` rows."""
    times = [float(r["sim_time_s"]) for r in rows]
    accs = [float(r["accuracy"]) for r in rows]
    trained = rows[1:]
    return {
        "time_to_target_s": time_to_accuracy(times, accs, target),
        "final_accuracy": accs[-1],
        "best_accuracy": max(accs),
        "last5_accuracy": statistics.fmean(accs[-5:]),
        "sim_time_s": times[-1],
        "mean_round_sim_s": times[-1] / max(len(trained), 1),
        "mean_accepted": statistics.fmean(r["accepted"] for r in trained),
        "mean_failures": statistics.fmean(r["failures"] for r in trained),
        "failed_rounds": sum(bool(r.get("failed")) for r in trained),
        "rounds": len(trained),
    }


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "not reached" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    """Run (or reuse) the runs, write the table and plots; return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--rounds", type=int, default=None, help="default: the preset's")
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--runs-dir", default="runs/bench_stragglers")
    ap.add_argument("--out", default="experiments/results/stragglers.md")
    ap.add_argument("--plots", default="experiments/results/stragglers")
    args = ap.parse_args(argv)

    per_run: list[dict[str, Any]] = []
    run_dirs = []
    for seed in args.seeds:
        for strategy in STRATEGIES:
            cfg = preset_config(strategy, seed, args.runs_dir, args.rounds)
            run_dir = Path(cfg.output_dir) / cfg.run_name
            if not (run_dir / "summary.json").is_file():
                run_experiment(cfg)
            else:
                print(f"reusing {run_dir}")
            run = load_run(run_dir)
            run_dirs.append(run)
            stats = run_stats(list(run.rows), args.target)
            per_run.append({"strategy": strategy, "seed": seed, **stats})

    d = preset_config("agent", args.seeds[0], args.runs_dir, args.rounds).devices
    command = "python -m experiments.bench_stragglers --seeds " + " ".join(
        str(x) for x in args.seeds
    )
    if args.rounds is not None:
        command += f" --rounds {args.rounds}"
    if args.target != 0.9:
        command += f" --target {args.target}"
    for flag, value in (("--out", args.out), ("--plots", args.plots)):
        if value != ap.get_default(flag[2:]):
            command += f" {flag} {value}"
    lines = [
        "# Stragglers: the agent vs FedAvg on simulated devices",
        "",
        f"Command: `{command}` (runs under `{args.runs_dir}`; finished runs reused).",
        "",
        f"Preset `stragglers`: 50 clients, 10 per round, speed sigma {d.speed_sigma}, "
        f"bandwidth median {d.bandwidth_median_mbps} Mbit/s (sigma "
        f"{d.bandwidth_sigma}), dropout {d.dropout}, deadline {d.deadline_s} s "
        f"(partial work: {d.partial_work}); target accuracy {args.target}.",
        "",
        "| strategy | seed | sim time to target s | final acc | best acc | "
        "mean acc, last 5 rounds | "
        "sim time s | rounds | mean round sim s | accepted / round | "
        "client failures / round | failed rounds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in per_run:
        lines.append(
            f"| {r['strategy']} | {r['seed']} | {_fmt(r['time_to_target_s'])} | "
            f"{r['final_accuracy']:.4f} | {r['best_accuracy']:.4f} | "
            f"{r['last5_accuracy']:.4f} | "
            f"{r['sim_time_s']:.1f} | {r['rounds']} | {r['mean_round_sim_s']:.2f} | "
            f"{r['mean_accepted']:.2f} | {r['mean_failures']:.2f} | "
            f"{r['failed_rounds']} |"
        )
    summary: dict[str, Any] = {"speedup_per_seed": {}, "accuracy_diff_per_seed": {}}
    for seed in args.seeds:
        a, f = (
            next(r for r in per_run if r["strategy"] == s and r["seed"] == seed)
            for s in STRATEGIES
        )
        ta, tf = a["time_to_target_s"], f["time_to_target_s"]
        speedup = tf / ta if ta and tf else None
        summary["speedup_per_seed"][seed] = speedup
        summary["accuracy_diff_per_seed"][seed] = (
            a["final_accuracy"] - f["final_accuracy"]
        )
        lines.append("")
        lines.append(
            f"Seed {seed}: agent reaches {args.target:.0%} in {_fmt(ta)} simulated s, "
            f"FedAvg in {_fmt(tf)} s: speed-up {_fmt(speedup, '.2f')}x (target >= 2x); "
            f"final accuracy agent - FedAvg = "
            f"{100 * (a['final_accuracy'] - f['final_accuracy']):+.2f} points "
            "(target >= -1)."
        )
    speedups = [x for x in summary["speedup_per_seed"].values() if x is not None]
    diffs = list(summary["accuracy_diff_per_seed"].values())
    summary["speedup_min"] = min(speedups) if speedups else None
    summary["speedup_median"] = statistics.median(speedups) if speedups else None
    summary["accuracy_diff_mean"] = statistics.fmean(diffs)
    summary["targets_met_per_seed"] = {
        seed: (
            summary["speedup_per_seed"][seed] is not None
            and summary["speedup_per_seed"][seed] >= 2.0
            and summary["accuracy_diff_per_seed"][seed] >= -0.01 - 1e-9
        )
        for seed in args.seeds
    }
    lines += [
        "",
        f"Over {len(args.seeds)} seed(s): speed-up min "
        f"{_fmt(summary['speedup_min'], '.2f')}x, median "
        f"{_fmt(summary['speedup_median'], '.2f')}x ({len(speedups)} seed(s) where "
        f"both reached {args.target:.0%}); final accuracy agent - FedAvg mean "
        f"{100 * summary['accuracy_diff_mean']:+.2f} points; both targets met on "
        f"{sum(summary['targets_met_per_seed'].values())} of {len(args.seeds)} "
        "seed(s).",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(out, "\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(
        json.dumps({"runs": per_run, **summary}, indent=2, default=str)
    )
    plots_dir = Path(args.plots)
    plots_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(build_report(run_dirs), plots_dir)
    print("\n".join(lines))
    print("plots: " + ", ".join(str(p) for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
