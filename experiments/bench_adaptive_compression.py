"""Benchmark: bandwidth-aware upload codecs against float32 under simulated devices.

``python -m experiments.bench_adaptive_compression --seeds 0 1`` runs the default task
(agent strategy, deterministic policy, MNIST-5k, 20 clients, Dirichlet 0.5, 10 per
round, 30 rounds) with simulated devices (``devices.enabled``: log-normal bandwidth,
median ``--bandwidth-mbps`` 10 Mbit/s, sigma ``--bandwidth-sigma``; log-normal compute
speed, sigma ``--speed-sigma`` 1) twice per seed: every client uploading
float32 (``none``), and ``compression.adaptive=true`` (each client's codec picked from
its measured bandwidth among ``none,q8,q4,topk``). ``--deadline`` sets
``devices.deadline_s`` (0: none). The table (``--out``, default
``experiments/results/compression_adaptive.md`` and ``.json``) gives the bytes
uploaded, the simulated time per round (mean and median; a client's upload time is
its reply's real bytes over its bandwidth, so a compressed upload shortens it), the
failed client replies (late ones included), the final and last-5-rounds central
accuracy and how often each codec was allocated. Runs already complete in
``--runs-dir`` with the same configuration are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from orchestration.config import RunConfig

from .bench_compression import finished_run, last_rounds_accuracy
from .bench_personalization import _CHILD

MODES = ("none", "adaptive")


def codec_counts(run_dir: Path) -> Counter[str]:
    """Count the codecs allocated in the train decisions of a run."""
    counts: Counter[str] = Counter()
    for line in (run_dir / "decisions.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry["phase"] == "train":
            for alloc in entry["decision"]["allocations"].values():
                counts[alloc["compression"]] += 1
    return counts


def run_retried(cfg: RunConfig, timeout_s: float, retries: int = 2) -> dict[str, Any]:
    """Run ``cfg`` in a fresh process (own session) and return its summary.

    On the loaded machine Ray sometimes does not start ("node timed out during
    startup") and the failed child then hangs: a run that fails or exceeds
    ``timeout_s`` has its whole process group stopped, its partial run directory
    removed, and is started again (at most ``retries`` times, 30 s apart).

    Raises
    ------
    RuntimeError
        If every attempt failed.
    """
    run_dir = Path(cfg.output_dir) / cfg.run_name
    for attempt in range(1, retries + 2):
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, json.dumps(cfg.to_flat())],
            start_new_session=True,
        )
        try:
            code = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        if code != 0:
            try:
                os.killpg(child.pid, signal.SIGTERM)
                child.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(child.pid, signal.SIGKILL)
        summary = finished_run(cfg)
        if code == 0 and summary is not None:
            return summary
        why = "timed out" if code is None else f"exit code {code}"
        print(f"run {cfg.run_name} attempt {attempt} failed ({why})", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        if attempt <= retries:
            time.sleep(30)
    raise RuntimeError(f"run {cfg.run_name} failed {retries + 1} times")


def round_sim_times(run_dir: Path) -> list[float]:
    """Return each round's simulated seconds (from the cumulative ``sim_time_s``)."""
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    clock = [float(json.loads(line)["sim_time_s"] or 0.0) for line in lines]
    return [b - a for a, b in zip(clock, clock[1:], strict=False)]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its table; return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--bandwidth-sigma", type=float, default=0.5)
    ap.add_argument("--bandwidth-mbps", type=float, default=10.0)
    ap.add_argument("--speed-sigma", type=float, default=1.0)
    ap.add_argument("--deadline", type=float, default=0.0)
    ap.add_argument("--runs-dir", default="runs/adaptive_upload")
    ap.add_argument(
        "--run-timeout", type=float, default=1800.0, help="seconds per run attempt"
    )
    ap.add_argument("--out", default="experiments/results/compression_adaptive.md")
    args = ap.parse_args(argv)

    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        for mode in MODES:
            cfg = RunConfig.from_flat(
                {
                    "seed": seed,
                    "num_rounds": args.rounds,
                    "policy.name": "deterministic",
                    "devices.enabled": True,
                    "devices.bandwidth_sigma": args.bandwidth_sigma,
                    "devices.bandwidth_median_mbps": args.bandwidth_mbps,
                    "devices.speed_sigma": args.speed_sigma,
                    "devices.deadline_s": args.deadline,
                    "compression.adaptive": mode == "adaptive",
                    "output_dir": args.runs_dir,
                    "run_name": f"{mode}-s{seed}",
                }
            )
            summary = finished_run(cfg) or run_retried(cfg, args.run_timeout)
            run_dir = Path(summary["run_dir"])
            summary["mode"] = mode
            summary["last5_accuracy"] = last_rounds_accuracy(run_dir)
            summary["codecs"] = dict(codec_counts(run_dir))
            summary["round_sim_s"] = round_sim_times(run_dir)
            runs.append(summary)

    def one(mode: str, seed: int) -> dict[str, Any]:
        return next(r for r in runs if r["mode"] == mode and r["seed"] == seed)

    lines = [
        f"| codecs | seed | bytes up ({args.rounds} rounds) | smaller than float32 | "
        "simulated s / round, mean (median) | shorter than float32 (mean) | "
        "failed replies | final accuracy | last 5 rounds | "
        "vs float32, points (final / last 5) | codecs allocated |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios, diffs, diffs5, speedups = [], [], [], []
    for seed in args.seeds:
        base = one("none", seed)
        for mode in MODES:
            r = one(mode, seed)
            ratio = base["bytes_up"] / r["bytes_up"]
            diff = r["final_accuracy"] - base["final_accuracy"]
            diff5 = r["last5_accuracy"] - base["last5_accuracy"]
            mean_s = statistics.mean(r["round_sim_s"])
            speedup = statistics.mean(base["round_sim_s"]) / mean_s
            if mode == "adaptive":
                ratios.append(ratio)
                diffs.append(diff)
                diffs5.append(diff5)
                speedups.append(speedup)
            used = ", ".join(
                f"{c} {n}" for c, n in sorted(r["codecs"].items(), key=lambda x: -x[1])
            )
            lines.append(
                f"| {mode} | {seed} | {r['bytes_up']:,} | {ratio:.2f}x | "
                f"{mean_s:.3f} ({statistics.median(r['round_sim_s']):.3f}) | "
                f"{speedup:.3f}x | {r['client_failures']} | "
                f"{r['final_accuracy']:.4f} | {r['last5_accuracy']:.4f} | "
                f"{100 * diff:+.2f} / {100 * diff5:+.2f} | {used} |"
            )
    lines += [
        "",
        f"Adaptive, mean over seeds: {statistics.mean(ratios):.2f}x fewer bytes up, "
        f"simulated rounds {statistics.mean(speedups):.3f}x shorter, "
        f"{100 * statistics.mean(diffs):+.2f} points final accuracy, "
        f"{100 * statistics.mean(diffs5):+.2f} points over the last 5 rounds.",
    ]
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python -m experiments.bench_adaptive_compression", *given])
    header = [f"Command: `{command}` (runs in `{args.runs_dir}`).", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header + lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"runs": runs}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
