"""Benchmark: personalized vs global accuracy on the clients' own test splits.

``python -m experiments.bench_personalization --seeds 0 1 2`` runs MNIST-5k
(``--dataset``; ``cifar10`` where the Hugging Face hub is reachable) with 20 clients
split by Dirichlet(``--alpha`` 0.1), 10 per round, 30 rounds, agent strategy
with the deterministic policy, once per mode and seed: ``none`` (the global model, the
examples-weighted mean of the updates as in FedAvg), ``fedper`` (the final layer stays
on each client), ``fedrep`` (as fedper, the head trained ``--head-epochs`` with the
body frozen before the body with the head frozen) and ``ditto`` (a personal model with
a proximal term to the global). ``--reuse`` takes the runs of an earlier ``.json``
output (same rounds) instead of running them again, e.g. to add one mode:
``--modes fedper ditto fedrep --reuse experiments/results/personalization.json``.
Every client evaluates on its own local test split the global model it receives and
the model it would use; the table (``--out``, default
``experiments/results/personalization.md`` and ``.json``) gives the mean over clients
after the last round, and the personalized minus global difference in points.
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

from .bench_compression import finished_run
from .isolated import run_isolated

MODES = ("none", "fedper", "fedrep", "ditto")


def reused_runs(
    path: Path, rounds: int, dataset: str = "mnist5k"
) -> dict[tuple[str, int], dict[str, Any]]:
    """Return the runs of an earlier output ``path`` by ``(mode, seed)``.

    Raises
    ------
    ValueError
        If a stored run has another number of rounds than ``rounds``, or another
        dataset than ``dataset`` (runs stored before the dataset was recorded are
        MNIST-5k's).
    """
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for run in json.loads(path.read_text())["runs"]:
        if run.get("dataset", "mnist5k") != dataset:
            raise ValueError(
                f"{path}: run {run['mode']}-s{run['seed']} is on "
                f"{run.get('dataset', 'mnist5k')}, this benchmark on {dataset}"
            )
        if int(run["rounds"]) != rounds:
            raise ValueError(
                f"{path}: run {run['mode']}-s{run['seed']} has {run['rounds']} "
                f"rounds, this benchmark {rounds}"
            )
        run["per_round"] = {int(k): float(v) for k, v in run["per_round"].items()}
        out[(str(run["mode"]), int(run["seed"]))] = run
    return out


def _client_curve(run_dir: Path) -> dict[int, float]:
    """Mean clients' accuracy of the model used, per evaluated round."""
    curve: dict[int, float] = {}
    for line in (run_dir / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "client_global_acc" in row:
            used = row.get("client_personal_acc", row["client_global_acc"])
            curve[int(row["round"])] = float(used)
    return curve


def _curve_table(
    runs: list[dict[str, Any]], modes: list[str], seeds: list[int]
) -> list[str]:
    """Per evaluated round: each mode's mean (over seeds) clients' accuracy."""
    rounds = sorted({int(r) for run in runs for r in run["per_round"]})
    head = (
        "| round | "
        + " | ".join(modes)
        + " | "
        + " | ".join(f"{m} - none (points)" for m in modes[1:])
        + " |"
    )
    lines = [
        "Mean over clients (and seeds) of the accuracy of the model each client uses, "
        "on its own test split, per evaluated round:",
        "",
        head,
        "|" + "---|" * (1 + 2 * len(modes) - 1),
    ]
    for rnd in rounds:
        means = {}
        for m in modes:
            vals = [
                float(run["per_round"][rnd])
                for run in runs
                if run["mode"] == m and run["seed"] in seeds and rnd in run["per_round"]
            ]
            means[m] = statistics.mean(vals) if vals else float("nan")
        cells = [f"{means[m]:.4f}" for m in modes]
        cells += [f"{100 * (means[m] - means['none']):+.2f}" for m in modes[1:]]
        lines.append(f"| {rnd} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its table; return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument(
        "--dataset",
        default="mnist5k",
        help="dataset.name (cifar10 and mnist need the Hugging Face hub, online)",
    )
    ap.add_argument("--ditto-lambda", type=float, default=0.1)
    ap.add_argument("--head-epochs", type=int, default=2, help="fedrep")
    ap.add_argument("--reuse", type=Path, help="earlier .json output to take runs from")
    ap.add_argument("--runs-dir", default="runs/bench_personalization")
    ap.add_argument("--out", default="experiments/results/personalization.md")
    args = ap.parse_args(argv)
    modes = ["none", *[m for m in args.modes if m != "none"]]
    reused = reused_runs(args.reuse, args.rounds, args.dataset) if args.reuse else {}

    # Runs of another dataset get their own names, so none is taken for another's.
    prefix = "" if args.dataset == "mnist5k" else f"{args.dataset}-"
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        for mode in modes:
            if (mode, seed) in reused:
                runs.append(reused[(mode, seed)])
                continue
            cfg = RunConfig.from_flat(
                {
                    "seed": seed,
                    "num_rounds": args.rounds,
                    "dataset.name": args.dataset,
                    "dataset.alpha": args.alpha,
                    "policy.name": "deterministic",
                    "personalization.mode": mode,
                    "personalization.evaluate_clients": True,
                    "personalization.eval_every": 5,
                    "personalization.ditto_lambda": args.ditto_lambda,
                    "personalization.head_epochs": args.head_epochs,
                    "output_dir": args.runs_dir,
                    "run_name": f"{prefix}{mode}-s{seed}",
                }
            )
            summary = finished_run(cfg) or run_isolated(cfg)
            ev = summary["client_eval"]
            summary["mode"] = mode
            summary["dataset"] = args.dataset
            summary["client_global_acc"] = ev["client_global_acc"]
            summary["client_used_acc"] = ev.get(
                "client_personal_acc", ev["client_global_acc"]
            )
            summary["per_round"] = _client_curve(Path(summary["run_dir"]))
            runs.append(summary)

    def one(mode: str, seed: int) -> dict[str, Any]:
        return next(r for r in runs if r["mode"] == mode and r["seed"] == seed)

    lines = [
        "| mode | seed | clients' accuracy, model used | same clients, global model "
        "(mode none) | difference (points) | central accuracy |",
        "|---|---|---|---|---|---|",
    ]
    per_mode: dict[str, dict[str, float]] = {}
    for mode in modes:
        diffs, accs = [], []
        for seed in args.seeds:
            r, base = one(mode, seed), one("none", seed)
            diff = r["client_used_acc"] - base["client_global_acc"]
            diffs.append(diff)
            accs.append(r["client_used_acc"])
            lines.append(
                f"| {mode} | {seed} | {r['client_used_acc']:.4f} | "
                f"{base['client_global_acc']:.4f} | {100 * diff:+.2f} | "
                f"{r['final_accuracy']:.4f} |"
            )
        per_mode[mode] = {
            "client_acc_mean": statistics.mean(accs),
            "diff_mean": statistics.mean(diffs),
            "diff_worst": min(diffs),
        }
    lines += [
        "",
        "| mode | mean clients' accuracy | mean / worst difference to the global "
        "model (points) | target (>= +5) |",
        "|---|---|---|---|",
    ]
    for mode, s in per_mode.items():
        target = (
            "" if mode == "none" else ("met" if s["diff_mean"] >= 0.05 else "NOT met")
        )
        lines.append(
            f"| {mode} | {s['client_acc_mean']:.4f} | {100 * s['diff_mean']:+.2f} / "
            f"{100 * s['diff_worst']:+.2f} | {target} |"
        )
    lines += ["", *_curve_table(runs, modes, args.seeds)]
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python -m experiments.bench_personalization", *given])
    header = [f"Command: `{command}` (runs in `{args.runs_dir}`).", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(out, "\n".join(header + lines) + "\n")
    out.with_suffix(".json").write_text(
        json.dumps({"runs": runs, "per_mode": per_mode}, indent=2)
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
