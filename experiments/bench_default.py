"""Benchmark: the default task, agent strategy vs Flower's FedAvg, side by side.

``python -m experiments.bench_default --seeds 0 1 2`` runs, for each seed, the default
configuration with ``strategy=agent`` (deterministic policy) and ``strategy=fedavg``
back to back in this process, and writes a Markdown table of final accuracy, wall
time and median round time, with the agent/FedAvg median-round ratio, to
``--out`` (default ``experiments/results/default_run.md``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from experiments.report_io import write_report
from orchestration.config import RunConfig
from orchestration.runner import run_experiment


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its table; return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--runs-dir", default="runs/bench_default")
    ap.add_argument("--out", default="experiments/results/default_run.md")
    args = ap.parse_args(argv)

    rows = []
    for seed in args.seeds:
        for strategy in ("agent", "fedavg"):
            cfg = RunConfig.from_flat(
                {
                    "seed": seed,
                    "num_rounds": args.rounds,
                    "strategy.name": strategy,
                    "policy.name": "deterministic",
                    "output_dir": args.runs_dir,
                    "run_name": f"{strategy}-s{seed}",
                }
            )
            rows.append(run_experiment(cfg))

    def pick(strategy: str, key: str) -> list[float]:
        return [float(r[key]) for r in rows if r["strategy"] == strategy]

    lines = [
        "| strategy | seed | final accuracy | wall s | median round s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['seed']} | {r['final_accuracy']:.4f} | "
            f"{r['wall_s']:.1f} | {r['median_round_s']:.3f} |"
        )
    ratios = [
        a / f
        for a, f in zip(
            pick("agent", "median_round_s"),
            pick("fedavg", "median_round_s"),
            strict=True,
        )
    ]
    summary = {
        "agent_accuracy_mean": statistics.mean(pick("agent", "final_accuracy")),
        "fedavg_accuracy_mean": statistics.mean(pick("fedavg", "final_accuracy")),
        "agent_wall_s_median": statistics.median(pick("agent", "wall_s")),
        "median_round_ratio_per_seed": ratios,
        "median_round_ratio_median": statistics.median(ratios),
    }
    lines += [
        "",
        f"Agent mean final accuracy {summary['agent_accuracy_mean']:.4f}, "
        f"FedAvg {summary['fedavg_accuracy_mean']:.4f}; agent/FedAvg median round "
        f"time ratio {summary['median_round_ratio_median']:.3f} "
        f"(per seed: {', '.join(f'{x:.3f}' for x in ratios)}).",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(out, "\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"runs": rows, **summary}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
