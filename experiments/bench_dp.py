"""Benchmark: accuracy vs epsilon for differential privacy on the default task.

``python -m experiments.bench_dp`` runs the default task (``+experiment=dp``: agent
strategy, deterministic policy, MNIST-5k, CNN, 20 clients, 10 per round, 30 rounds)
without DP and with sample-level DP-SGD (Opacus) at each ``--noise`` multiplier, and,
with ``--client-noise``, client-level DP (Flower's clipping mod and server noise) at
each of those multipliers. For every run it records the final accuracy and the epsilon
after the last round (``epsilon_max`` of ``results.jsonl``, at ``dp.delta=1e-5``), and
writes a Markdown table, JSON and a plot of accuracy against epsilon per round.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from experiments.report_io import write_report
from orchestration.config import RunConfig
from orchestration.runner import RunFailedError, run_experiment


def _cfg(args: argparse.Namespace, name: str, **dp: object) -> RunConfig:
    flat: dict[str, object] = {
        "seed": args.seed,
        "num_rounds": args.rounds,
        "num_clients": 20,
        "clients_per_round": 10,
        "policy.name": "deterministic",
        "dp.clipping_norm": args.clip,
        "output_dir": args.runs_dir,
        "run_name": name,
    }
    flat.update({f"dp.{k}": v for k, v in dp.items()})
    return RunConfig.from_flat(flat)


def _run(cfg: RunConfig, resume: bool) -> dict[str, Any]:
    """Run ``cfg``, or with ``resume`` reuse a finished run of the same name.

    A run in which no client answered the roll call in time (Ray actors start slowly
    on a loaded machine) is retried once.
    """
    done = Path(cfg.output_dir) / cfg.run_name / "summary.json"
    if resume and done.exists():
        summary: dict[str, Any] = json.loads(done.read_text())
        return summary
    try:
        return run_experiment(cfg)
    except RunFailedError as e:
        if "roll call" not in str(e):
            raise
        print(f"retrying {cfg.run_name} once: {e}", file=sys.stderr)
        return run_experiment(cfg)


def _rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    path = Path(summary["run_dir"]) / "results.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and write the table and plot; return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.6, 1.0, 2.0])
    ap.add_argument("--client-noise", type=float, nargs="*", default=[])
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--runs-dir", default="runs/bench_dp")
    ap.add_argument("--out", default="experiments/results/dp.md")
    ap.add_argument(
        "--resume", action="store_true", help="reuse finished runs in --runs-dir"
    )
    args = ap.parse_args(argv)

    runs: list[tuple[str, float | None, dict[str, Any]]] = []
    runs.append(("none", None, _run(_cfg(args, "none"), args.resume)))
    for sigma in args.noise:
        cfg = _cfg(args, f"sample-{sigma:g}", mode="sample", noise_multiplier=sigma)
        runs.append(("sample", sigma, _run(cfg, args.resume)))
    for sigma in args.client_noise:
        cfg = _cfg(args, f"client-{sigma:g}", mode="client", noise_multiplier=sigma)
        runs.append(("client", sigma, _run(cfg, args.resume)))

    table = [
        "| DP | noise multiplier | final accuracy | epsilon after "
        f"{args.rounds} rounds (delta 1e-5) | median round s |",
        "|---|---|---|---|---|",
    ]
    records = []
    for mode, sigma, summary in runs:
        rows = _rows(summary)
        eps = rows[-1].get("epsilon_max")
        records.append(
            {
                "mode": mode,
                "noise_multiplier": sigma,
                "final_accuracy": summary["final_accuracy"],
                "final_epsilon": eps,
                "epsilon_per_round": [r.get("epsilon_max") for r in rows[1:]],
                "accuracy_per_round": [r["accuracy"] for r in rows],
                "median_round_s": summary["median_round_s"],
                "run_dir": summary["run_dir"],
            }
        )
        table.append(
            f"| {mode} | {'-' if sigma is None else f'{sigma:g}'} | "
            f"{summary['final_accuracy']:.4f} | "
            f"{'-' if eps is None else f'{eps:.2f}'} | "
            f"{summary['median_round_s']:.3f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _plot(records, out.with_suffix(".png"))
    text = (
        "\n".join(table)
        + f"\n\n![accuracy vs epsilon]({out.with_suffix('.png').name})\n"
    )
    write_report(out, text)
    out.with_suffix(".json").write_text(
        json.dumps({"seed": args.seed, "clip": args.clip, "runs": records}, indent=2)
    )
    print(text)
    return 0


def _plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for rec in records:
        eps = rec["epsilon_per_round"]
        if rec["mode"] == "none" or any(e is None for e in eps):
            ax.axhline(
                rec["final_accuracy"], color="grey", ls="--", label="no DP (final)"
            )
            continue
        ax.plot(
            eps,
            rec["accuracy_per_round"][1:],
            marker=".",
            label=f"{rec['mode']}, sigma {rec['noise_multiplier']:g}",
        )
    ax.set_xscale("log")
    ax.set_xlabel("cumulative epsilon (delta 1e-5)")
    ax.set_ylabel("central test accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
