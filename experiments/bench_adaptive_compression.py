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
accuracy and how often each codec was allocated. Which clients a round selects
depends on the run's trajectory, so the two runs' round times differ for that reason
too; the table therefore also replays each round of a run without a deadline with the
same clients and epochs but float32 uploads (:func:`dense_replay`: the devices
rebuilt from the seed, the uploads' real sizes measured by encoding the model), which
isolates what the codecs save. Runs already complete in ``--runs-dir`` with the same
configuration are reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fl_client.compression import compress_upload
from fl_client.task import build_model, split_for
from fl_server.device_grid import DeviceSimulator
from orchestration.config import RunConfig

from .bench_compression import finished_run, last_rounds_accuracy
from .isolated import run_isolated
from .report_io import write_report

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


def round_sim_times(run_dir: Path) -> list[float]:
    """Return each round's simulated seconds (from the cumulative ``sim_time_s``)."""
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    clock = [float(json.loads(line)["sim_time_s"] or 0.0) for line in lines]
    return [b - a for a, b in zip(clock, clock[1:], strict=False)]


def upload_bytes(cfg: RunConfig, codecs: set[str]) -> dict[str, int]:
    """Return the bytes of a reply's arrays per codec, by encoding the run's model.

    The sizes are what :func:`~fl_server.metering.message_bytes` counts (array data
    with their ``.npy`` headers, and the keys); they do not depend on the values.
    """
    _, central = split_for(cfg)
    model = build_model(
        cfg.model.name, central.input_shape, central.num_classes, cfg.seed
    )
    arrays = ArrayRecord(model.state_dict())
    out = {}
    for codec in codecs:
        upload = compress_upload(
            arrays,
            arrays,
            codec,
            fraction=cfg.compression.topk_fraction,
            error_feedback=cfg.compression.error_feedback,
            ef_expected=False,
            state=RecordDict(),
            rng=np.random.default_rng(0),
        )
        out[codec] = upload.arrays.count_bytes()
    return out


def dense_replay(cfg: RunConfig, run_dir: Path) -> list[tuple[float, float]] | None:
    """Replay each round's simulated time with the uploads it had and float32 ones.

    Returns ``(as run, float32 uploads)`` seconds per round: the same selected
    clients, epochs and devices (rebuilt from the seed and partition ids), each
    client's round ``compute + (download + upload) / bandwidth``, the round its
    slowest client. ``None`` when the replay does not apply: a deadline, dropouts
    or failed replies. Raises ``ValueError`` if the replay does not reproduce the
    run's bytes up or simulated clock (it must be exact).
    """
    if cfg.devices.deadline_s > 0 or cfg.devices.dropout > 0:
        return None
    rows = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]
    if any(r["failures"] for r in rows):
        return None
    entries = [
        json.loads(x) for x in (run_dir / "decisions.jsonl").read_text().splitlines()
    ]
    train = [e["decision"]["allocations"] for e in entries if e["phase"] == "train"]
    codecs = {a["compression"] for allocs in train for a in allocs.values()}
    size = upload_bytes(cfg, codecs | {"none"})
    clients, _ = split_for(cfg)
    sim = DeviceSimulator(cfg.devices, cfg.seed, cfg.train.local_epochs)
    times = round_sim_times(run_dir)
    out = []
    for r, allocs in enumerate(train, start=1):
        down = rows[r]["bytes_down"] / len(allocs)
        up = sum(size[a["compression"]] for a in allocs.values())
        if up != rows[r]["bytes_up"] or down != size["none"]:
            raise ValueError(
                f"{run_dir} round {r}: replayed {up} bytes up and {size['none']} "
                f"down per client, the run measured {rows[r]['bytes_up']} and {down}"
            )
        run_s, dense_s = 0.0, 0.0
        for cid, a in allocs.items():
            pid = int(cid[1:])
            dev = sim.profile(pid)
            compute = (
                len(clients[pid].train.y)
                * a["local_epochs"]
                * cfg.devices.example_cost_s
                / dev.speed
            )
            run_s = max(
                run_s, compute + (down + size[a["compression"]]) / dev.bandwidth_bps
            )
            dense_s = max(dense_s, compute + 2 * down / dev.bandwidth_bps)
        if abs(run_s - times[r - 1]) > 1e-3 + 1e-4 * run_s:
            raise ValueError(
                f"{run_dir} round {r}: replayed {run_s:.4f} s, the run's clock "
                f"{times[r - 1]:.4f} s"
            )
        out.append((run_s, dense_s))
    return out


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
            summary = finished_run(cfg) or run_isolated(
                cfg, timeout_s=args.run_timeout, retries=2
            )
            run_dir = Path(summary["run_dir"])
            summary["mode"] = mode
            summary["last5_accuracy"] = last_rounds_accuracy(run_dir)
            summary["codecs"] = dict(codec_counts(run_dir))
            summary["round_sim_s"] = round_sim_times(run_dir)
            summary["replay_s"] = dense_replay(cfg, run_dir)
            runs.append(summary)

    def one(mode: str, seed: int) -> dict[str, Any]:
        return next(r for r in runs if r["mode"] == mode and r["seed"] == seed)

    lines = [
        f"| codecs | seed | bytes up ({args.rounds} rounds) | smaller than float32 | "
        "simulated s / round, mean (median) | shorter than the float32 run (mean) | "
        "same rounds with float32 uploads, s / round (mean) | shorter than that | "
        "failed replies | final accuracy | last 5 rounds | "
        "vs float32, points (final / last 5) | codecs allocated |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios, diffs, diffs5, speedups, savings = [], [], [], [], []
    for seed in args.seeds:
        base = one("none", seed)
        for mode in MODES:
            r = one(mode, seed)
            ratio = base["bytes_up"] / r["bytes_up"]
            diff = r["final_accuracy"] - base["final_accuracy"]
            diff5 = r["last5_accuracy"] - base["last5_accuracy"]
            mean_s = statistics.mean(r["round_sim_s"])
            speedup = statistics.mean(base["round_sim_s"]) / mean_s
            replay = "n/a | n/a"
            if r["replay_s"] is not None:
                dense_s = statistics.mean(d for _, d in r["replay_s"])
                saving = dense_s / statistics.mean(a for a, _ in r["replay_s"])
                replay = f"{dense_s:.3f} | {saving:.3f}x"
            if mode == "adaptive":
                ratios.append(ratio)
                diffs.append(diff)
                diffs5.append(diff5)
                speedups.append(speedup)
                if r["replay_s"] is not None:
                    savings.append(saving)
            used = ", ".join(
                f"{c} {n}" for c, n in sorted(r["codecs"].items(), key=lambda x: -x[1])
            )
            lines.append(
                f"| {mode} | {seed} | {r['bytes_up']:,} | {ratio:.2f}x | "
                f"{mean_s:.3f} ({statistics.median(r['round_sim_s']):.3f}) | "
                f"{speedup:.3f}x | {replay} | {r['client_failures']} | "
                f"{r['final_accuracy']:.4f} | {r['last5_accuracy']:.4f} | "
                f"{100 * diff:+.2f} / {100 * diff5:+.2f} | {used} |"
            )
    replayed = (
        f" ({statistics.mean(savings):.3f}x shorter than the same rounds with float32 "
        "uploads)"
        if savings
        else ""
    )
    lines += [
        "",
        f"Adaptive, mean over seeds: {statistics.mean(ratios):.2f}x fewer bytes up, "
        f"simulated rounds {statistics.mean(speedups):.3f}x shorter than the float32 "
        f"run's{replayed}, {100 * statistics.mean(diffs):+.2f} points final accuracy, "
        f"{100 * statistics.mean(diffs5):+.2f} points over the last 5 rounds.",
    ]
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python -m experiments.bench_adaptive_compression", *given])
    header = [f"Command: `{command}` (runs in `{args.runs_dir}`).", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(out, "\n".join(header + lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"runs": runs}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
