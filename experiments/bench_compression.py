"""Benchmark: compressed uploads on the default task, against float32 on the same seeds.

``python -m experiments.bench_compression --seeds 0 1 2`` runs the default task
(agent strategy, deterministic policy, MNIST-5k, 20 clients, Dirichlet 0.5, 10 per
round, 30 rounds) once per codec and seed (``none`` = float32, ``q8``, ``q4``, ``topk``
and ``topk_q8`` with ``--topk-fraction`` 0.01 and error feedback), and writes to
``--out`` (default ``experiments/results/compression.md`` and ``.json``): bytes
uploaded per round (counted from the reply messages' arrays by the metering grid),
the size ratio to float32, final accuracy and its difference to float32 on the same
seed. Runs already complete in ``--runs-dir`` with the same configuration are reused,
so seeds and codecs can be added later. ``python -m experiments.report RUNS_DIR --out
DIR`` then plots accuracy against cumulative bytes uploaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from experiments.report_io import write_report
from orchestration.config import RunConfig
from orchestration.runner import run_experiment

CODECS = ("none", "q8", "q4", "topk", "topk_q8")
TARGETS = {"q8": (3.9, 0.005), "topk": (30.0, 0.015)}


def finished_run(cfg: RunConfig) -> dict[str, Any] | None:
    """Return the summary of an earlier complete run of ``cfg`` (resume), or None."""
    run_dir = Path(cfg.output_dir) / cfg.run_name
    try:
        old = json.loads((run_dir / "config.json").read_text())
        summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    skip = {"output_dir", "run_name"}
    same = {k: v for k, v in old.items() if k not in skip} == {
        k: v for k, v in cfg.model_dump().items() if k not in skip
    }
    return summary if same and summary.get("rounds") == cfg.num_rounds else None


def last_rounds_accuracy(run_dir: Path, rounds: int = 5) -> float:
    """Return the mean central accuracy of the last ``rounds`` rounds."""
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    accs = [float(json.loads(line)["accuracy"]) for line in lines[1:]]
    return statistics.mean(accs[-rounds:])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its table; return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--codecs", nargs="+", default=list(CODECS), choices=CODECS)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--topk-fraction", type=float, default=0.01)
    ap.add_argument("--runs-dir", default="runs/bench_compression")
    ap.add_argument("--out", default="experiments/results/compression.md")
    args = ap.parse_args(argv)
    codecs = ["none", *[c for c in args.codecs if c != "none"]]

    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        for codec in codecs:
            cfg = RunConfig.from_flat(
                {
                    "seed": seed,
                    "num_rounds": args.rounds,
                    "policy.name": "deterministic",
                    "compression.codec": codec,
                    "compression.topk_fraction": args.topk_fraction,
                    "output_dir": args.runs_dir,
                    "run_name": f"{codec}-s{seed}",
                }
            )
            summary = finished_run(cfg) or run_experiment(cfg)
            summary["codec"] = codec
            summary["bytes_up_per_round"] = summary["bytes_up"] / args.rounds
            summary["last5_accuracy"] = last_rounds_accuracy(Path(summary["run_dir"]))
            runs.append(summary)

    def one(codec: str, seed: int) -> dict[str, Any]:
        return next(r for r in runs if r["codec"] == codec and r["seed"] == seed)

    lines = [
        "| codec | seed | bytes up per round | smaller than float32 | final accuracy "
        "| vs float32 (points) | mean of last 5 rounds | vs float32 (points) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    per_codec: dict[str, dict[str, float]] = {}
    for codec in codecs:
        ratios, deltas, accs, deltas5 = [], [], [], []
        for seed in args.seeds:
            r, base = one(codec, seed), one("none", seed)
            ratio = base["bytes_up"] / r["bytes_up"]
            delta = r["final_accuracy"] - base["final_accuracy"]
            delta5 = r["last5_accuracy"] - base["last5_accuracy"]
            deltas5.append(delta5)
            ratios.append(ratio)
            deltas.append(delta)
            accs.append(r["final_accuracy"])
            lines.append(
                f"| {codec} | {seed} | {r['bytes_up_per_round']:,.0f} | {ratio:.2f}x | "
                f"{r['final_accuracy']:.4f} | {100 * delta:+.2f} | "
                f"{r['last5_accuracy']:.4f} | {100 * delta5:+.2f} |"
            )
        per_codec[codec] = {
            "ratio_mean": statistics.mean(ratios),
            "accuracy_mean": statistics.mean(accs),
            "delta_mean": statistics.mean(deltas),
            "delta_worst": min(deltas),
            "delta5_mean": statistics.mean(deltas5),
        }
    lines += [
        "",
        "| codec | mean size ratio | mean final accuracy | mean / worst vs float32 "
        "(points) | last 5 rounds vs float32 (points) | target (final accuracy) |",
        "|---|---|---|---|---|---|",
    ]
    for codec, s in per_codec.items():
        target = ""
        if codec in TARGETS:
            min_ratio, max_drop = TARGETS[codec]
            # Accuracies are multiples of 1/len(test set): compare at 1e-9.
            met = s["ratio_mean"] >= min_ratio and s["delta_mean"] >= -max_drop - 1e-9
            target = (
                f">= {min_ratio}x, within {100 * max_drop:.1f}: "
                f"{'met' if met else 'NOT met'}"
            )
        lines.append(
            f"| {codec} | {s['ratio_mean']:.2f}x | {s['accuracy_mean']:.4f} | "
            f"{100 * s['delta_mean']:+.2f} / {100 * s['delta_worst']:+.2f} | "
            f"{100 * s['delta5_mean']:+.2f} | {target} |"
        )
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python -m experiments.bench_compression", *given])
    header = [f"Command: `{command}` (runs in `{args.runs_dir}`).", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(out, "\n".join(header + lines) + "\n")
    out.with_suffix(".json").write_text(
        json.dumps({"runs": runs, "per_codec": per_codec}, indent=2)
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
