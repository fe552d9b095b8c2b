"""Benchmark: peak memory of the default run's process tree, and per simulated client.

``python -m experiments.bench_memory [--presets default memory_100]``

Each preset (``conf/experiment/NAME.yaml``; by default ``default``: the README's
default run with the deterministic policy, 20 clients, and ``memory_100``: the same
run with 100 clients) runs as ``python -m experiments.run +experiment=NAME`` in a
fresh child process (its own session, so nothing outlives it), while this process
samples the child's whole process tree (the driver with the ServerApp, Ray's GCS,
raylet, dashboard agents and the ClientApp worker actors) from ``/proc`` every
``--interval`` seconds with the sampler of :mod:`experiments.bench_scale`. Kept: the
peak of the summed RSS and PSS, the driver's peak RSS, and the peak PSS of each
process name. The memory a simulated client costs is the PSS difference between
the two sizes divided by the difference in clients; as that is near the noise of
single runs, the objects the driver keeps per node are also measured directly with
``tracemalloc`` (``--per-node N`` nodes, in this process): Flower's in-memory
LinkState node record and its per-node Context store (the simulation engine's own
functions, Flower 1.42) and the agent's ``ClientState``.

Writes ``--out`` (default ``experiments/results/memory.md``) and a JSON twin.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from experiments.bench_scale import (
    TreePeak,
    memory_of,
    mib,
    process_tree,
    run_sampled,
)
from experiments.report_io import write_report

MIB = 2**20


def comm(pid: int) -> str:
    """Return a process's command name (``?`` once it has gone)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def sample(
    proc: subprocess.Popen[str], interval: float
) -> tuple[TreePeak, dict[str, int]]:
    """Sample ``proc``'s tree until it exits: overall peaks, and PSS peak by name.

    The per-name peak sums the PSS of every process with that name in one sample
    (e.g. all ``ray::ClientAppActor`` workers) and keeps the largest sum.
    """
    peak = TreePeak()
    by_name: dict[str, int] = defaultdict(int)
    while proc.poll() is None:
        pids = process_tree(proc.pid)
        peak.add(proc.pid, pids)
        now: dict[str, int] = defaultdict(int)
        for pid in pids:
            now["driver (python, ServerApp)" if pid == proc.pid else comm(pid)] += (
                memory_of(pid)[1]
            )
        for name, pss in now.items():
            by_name[name] = max(by_name[name], pss)
        time.sleep(interval)
    return peak, dict(by_name)


def measure(
    preset: str, runs_dir: Path, interval: float, timeout: float
) -> dict[str, Any]:
    """Run one preset in a sampled child process; return its peaks and summary."""
    run_dir = runs_dir / preset
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        f"+experiment={preset}",
        f"hydra.run.dir={run_dir}",
    ]
    run = run_sampled(cmd, lambda p: sample(p, interval), timeout)
    out, wall, error = run.out, run.wall_s, run.error
    peak, by_name = run.sample or (TreePeak(), {})
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / f"{preset}.log").write_text(out)
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    config_file = run_dir / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    return {
        "preset": preset,
        "num_clients": config.get("num_clients"),
        "num_rounds": config.get("num_rounds"),
        "partitioner": config.get("dataset", {}).get("partitioner"),
        "wall_s": wall,
        "final_accuracy": summary.get("final_accuracy"),
        "median_round_s": summary.get("median_round_s"),
        "peak_tree_rss": peak.rss,
        "peak_tree_pss": peak.pss,
        "peak_driver_rss": peak.driver_rss,
        "peak_processes": peak.processes,
        "samples": peak.samples,
        "peak_pss_by_name": by_name,
        "error": error,
    }


def per_node_objects(n: int) -> dict[str, Any]:
    """Bytes per node of the driver-side per-node objects, by ``tracemalloc``.

    Uses the functions Flower's simulation engine calls at start-up to register
    ``n`` nodes in an in-memory LinkState and to create one Context store per node;
    then ``n`` agent ``ClientState`` values. Returns ``{"error": ...}`` if Flower's
    private functions moved.
    """
    import tracemalloc

    try:
        from flwr.server.superlink.fleet.vce.vce_api import (
            _register_node_info_stores,
            _register_nodes,
        )
        from flwr.server.superlink.linkstate import LinkStateFactory
        from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
        from flwr.supercore.object_store import ObjectStoreFactory
        from flwr.supercore.run import Run
        from flwr.superlink.federation import NoOpFederationManager
    except ImportError as e:
        return {"nodes": n, "error": f"Flower internals not found: {e}"}
    from agent_strategy import ClientState

    tracemalloc.start()
    try:
        factory = LinkStateFactory(
            FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
        )
        base = tracemalloc.get_traced_memory()[0]
        mapping = _register_nodes(n, factory)
        after_nodes = tracemalloc.get_traced_memory()[0]
        stores = _register_node_info_stores(mapping, Run.create_empty(run_id=1))
        after_stores = tracemalloc.get_traced_memory()[0]
        states = [ClientState(id=f"c{i}", num_examples=40) for i in range(n)]
        after_states = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del mapping, stores, states
    return {
        "nodes": n,
        "flower_linkstate_node_bytes": (after_nodes - base) / n,
        "flower_context_store_bytes": (after_stores - after_nodes) / n,
        "agent_client_state_bytes": (after_states - after_stores) / n,
        "total_bytes": (after_states - base) / n,
        "error": "",
    }


def per_client(small: dict[str, Any], large: dict[str, Any]) -> dict[str, float]:
    """Return the MiB per extra simulated client between two measured sizes."""
    extra = large["num_clients"] - small["num_clients"]
    return {
        key: (large[key] - small[key]) / extra / MIB
        for key in ("peak_tree_pss", "peak_tree_rss", "peak_driver_rss")
    }


def scale_per_client(
    path: Path = Path("experiments/results/scale.json"),
) -> dict[str, Any] | None:
    """Per-client MiB between the smallest and largest size of ``bench_scale``."""
    if not path.exists():
        return None
    ok = [m for m in json.loads(path.read_text())["measured"] if not m["error"]]
    if len(ok) < 2:
        return None
    small, large = ok[0], ok[-1]
    return {
        "from": small["num_clients"],
        "to": large["num_clients"],
        **per_client(small, large),
    }


def render(
    measured: list[dict[str, Any]], interval: float, objects: dict[str, Any]
) -> str:
    """Return the Markdown report."""
    lines = [
        "# Memory: the default run's process tree, and per simulated client",
        "",
        "Each preset runs as `python -m experiments.run +experiment=NAME` in a fresh "
        "child process on this 2-core, 24 GiB machine (Flower simulation on Ray, "
        "`client_cpus=1`: 2 ClientApp workers at a time); its whole process tree is "
        f"sampled from `/proc` every {interval:g} s (the sampler of "
        "`experiments/bench_scale.py`). RSS sums count shared pages (Ray's object "
        "store, shared libraries) once per process that maps them; PSS splits "
        "them between the processes and is the honest total.",
        "",
        "| preset | clients | rounds | split | wall s | peak tree PSS MiB | "
        "peak tree RSS MiB | peak driver RSS MiB | processes | samples | "
        "final acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in measured:
        if m["error"]:
            lines.append(f"| {m['preset']} | failed: {m['error'][:300]} |")
            continue
        lines.append(
            f"| `{m['preset']}` | {m['num_clients']} | {m['num_rounds']} | "
            f"{m['partitioner']} | {m['wall_s']:.1f} | {mib(m['peak_tree_pss'])} | "
            f"{mib(m['peak_tree_rss'])} | {mib(m['peak_driver_rss'])} | "
            f"{m['peak_processes']} | {m['samples']} | {m['final_accuracy']:.4f} |"
        )
    ok = [m for m in measured if not m["error"]]
    if ok:
        names = sorted(
            {n for m in ok for n in m["peak_pss_by_name"]},
            key=lambda n: -max(m["peak_pss_by_name"].get(n, 0) for m in ok),
        )
        lines += [
            "",
            "## Peak PSS by process (MiB; all processes of one name summed)",
            "",
            "| process | " + " | ".join(f"`{m['preset']}`" for m in ok) + " |",
            "|---|" + "---|" * len(ok),
        ]
        for n in names:
            if n == "?":
                continue
            lines.append(
                f"| `{n}` | "
                + " | ".join(mib(m["peak_pss_by_name"].get(n, 0)) for m in ok)
                + " |"
            )
    if len(ok) >= 2:
        small, large = ok[0], ok[-1]
        pc = per_client(small, large)
        lines += [
            "",
            f"**Per simulated client** (from {small['num_clients']} to "
            f"{large['num_clients']} clients): peak tree PSS "
            f"{pc['peak_tree_pss']:+.2f} MiB, peak tree RSS "
            f"{pc['peak_tree_rss']:+.2f} MiB, peak driver RSS "
            f"{pc['peak_driver_rss']:+.2f} MiB per client"
            + (
                " (negative: the difference between two single runs is run-to-run "
                "variation of the peaks, not a saving; the per-client cost is below "
                "this measurement's resolution)."
                if pc["peak_tree_pss"] < 0
                else "."
            ),
        ]
    scale = scale_per_client()
    if scale is not None:
        lines += [
            "",
            f"Over a wider span, `experiments/results/scale.json` (agent, "
            f"deterministic policy, IID, 10 per round, 20 rounds) went from "
            f"{scale['from']:,} to {scale['to']:,} clients: peak tree PSS "
            f"{scale['peak_tree_pss']:+.2f} MiB, RSS {scale['peak_tree_rss']:+.2f} "
            f"MiB, driver RSS {scale['peak_driver_rss']:+.2f} MiB per client.",
        ]
    if objects and not objects["error"]:
        total = objects["total_bytes"]
        lines += [
            "",
            f"**Per-node objects in the driver** (`tracemalloc`, {objects['nodes']:,} "
            f"nodes): Flower's LinkState node record "
            f"{objects['flower_linkstate_node_bytes']:,.0f} B, Flower's per-node "
            f"Context store {objects['flower_context_store_bytes']:,.0f} B, the "
            f"agent's `ClientState` {objects['agent_client_state_bytes']:,.0f} B: "
            f"{total / 1024:.1f} KiB per node, {total * 1e5 / MIB:,.0f} MiB for "
            "100,000 nodes.",
        ]
    elif objects:
        lines += ["", f"Per-node objects not measured: {objects['error']}"]
    lines += [
        "",
        "Reading it: a simulated client is not a process. Flower's simulation keeps "
        "one node state and context per client in the driver and runs every "
        "client's ClientApp, one call at a time, in the few Ray worker actors "
        "(`client_cpus=1` on 2 cores: 2); each worker holds the dataset and its "
        "partitions once (MNIST-5k, 5,000 images), however many clients share it. "
        "The fixed cost is Python + PyTorch + Flower + Ray per process; what grows "
        "with the clients is small and within the sampling noise of one run at "
        "these sizes.",
        "",
        "Reproduce: `python -m experiments.bench_memory --presets "
        + " ".join(m["preset"] for m in measured)
        + "`",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Measure the presets in turn and write the report; return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["default", "memory_100"])
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--timeout-s", type=float, default=400.0)
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/bench_memory"))
    ap.add_argument("--out", default="experiments/results/memory.md")
    ap.add_argument("--per-node", type=int, default=10_000)
    ap.add_argument(
        "--from-json", type=Path, help="re-render from a previous JSON (no runs)"
    )
    args = ap.parse_args(argv)

    measured = []
    if args.from_json is not None:
        measured = json.loads(args.from_json.read_text())["measured"]
    for preset in [] if args.from_json is not None else args.presets:
        print(f"running +experiment={preset} ...", flush=True)
        m = measure(preset, args.runs_dir, args.interval, args.timeout_s)
        print(json.dumps(m), flush=True)
        measured.append(m)
    objects = per_node_objects(args.per_node)
    text = render(measured, args.interval, objects)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(out, text)
    ok = [m for m in measured if not m["error"]]
    extra = per_client(ok[0], ok[-1]) if len(ok) >= 2 else {}
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "measured": measured,
                "per_client_mib": extra,
                "scale_per_client_mib": scale_per_client(),
                "per_node_objects": objects,
            },
            indent=2,
        )
    )
    print(text)
    return 1 if any(m["error"] for m in measured) else 0


if __name__ == "__main__":
    sys.exit(main())
