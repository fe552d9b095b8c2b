"""Benchmark: federation size, wall time and peak memory of the whole process tree.

``python -m experiments.bench_scale [--clients 100 1000] [--rounds 20] [--policy P]``

The default task (agent strategy, CNN; ``--policy``: ``deterministic`` by default,
``llm`` for the local SmolLM2 agent) on MNIST-5k with an IID split
(``dataset.partitioner=iid``: 4,000 client examples over 1,000 clients leave 4 each,
which a Dirichlet split cannot share out), 10 clients per round, for each federation
size. Each size runs :func:`orchestration.runner.run_experiment` in a fresh child
process (so no size inherits another's memory); a thread samples the child's process
tree (the driver, Ray's GCS, raylet and workers) from ``/proc`` every ``--interval``
seconds and keeps the peak of the summed RSS and PSS (RSS counts shared pages, e.g.
Ray's object store, once per process; PSS splits them). No psutil.

A size runs only if the previous one took under ``--budget-s`` (default 180 s);
otherwise the table says so (with an estimate for the deterministic policy). Writes
``--out`` (default ``experiments/results/scale.md``) and a JSON twin.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from experiments.report_io import write_report

T = TypeVar("T")

PAGE = os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------ /proc sampling
def children_map() -> dict[int, list[int]]:
    """Return ``ppid -> [pid, ...]`` for every process visible in ``/proc``."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(root: int) -> list[int]:
    """Return ``root`` and all its descendants."""
    kids, out, todo = children_map(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def memory_of(pid: int) -> tuple[int, int]:
    """Return ``(rss, pss)`` bytes of one process, ``(0, 0)`` if it has gone."""
    try:
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        pss = 0
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
                break
        return rss, pss
    except (OSError, ValueError, IndexError):
        return 0, 0


@dataclass
class TreePeak:
    """Peaks of the summed memory of a process tree, over the samples taken."""

    rss: int = 0
    pss: int = 0
    driver_rss: int = 0
    processes: int = 0
    samples: int = 0
    names: set[str] = field(default_factory=set)

    def add(self, root: int, pids: Iterable[int]) -> None:
        """Fold one sample of ``pids`` (``root`` is the driver) into the peaks."""
        pids = list(pids)
        mems = {p: memory_of(p) for p in pids}
        self.rss = max(self.rss, sum(m[0] for m in mems.values()))
        self.pss = max(self.pss, sum(m[1] for m in mems.values()))
        self.driver_rss = max(self.driver_rss, mems.get(root, (0, 0))[0])
        self.processes = max(self.processes, len(pids))
        self.samples += 1
        for p in pids:
            try:
                self.names.add(Path(f"/proc/{p}/comm").read_text().strip())
            except OSError:
                pass


def sample_until_done(proc: subprocess.Popen[str], interval: float) -> TreePeak:
    """Sample ``proc``'s tree every ``interval`` s until it exits; return peaks."""
    peak = TreePeak()
    while proc.poll() is None:
        peak.add(proc.pid, process_tree(proc.pid))
        time.sleep(interval)
    return peak


@dataclass
class SampledRun(Generic[T]):
    """A child process run to completion while a sampler watched it."""

    out: str
    wall_s: float
    sample: T | None
    error: str


def run_sampled(
    cmd: list[str], sample: Callable[[subprocess.Popen[str]], T], timeout: float
) -> SampledRun[T]:
    """Run ``cmd`` in its own session while ``sample(proc)`` runs in a thread.

    The child is stopped (SIGTERM to its process group) after ``timeout`` seconds;
    a timeout or a non-zero exit status is reported in ``error``.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    box: dict[str, T] = {}
    sampler = threading.Thread(target=lambda: box.setdefault("s", sample(proc)))
    sampler.start()
    error = ""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate()
        error = f"timed out after {timeout:.0f}s"
    wall = time.perf_counter() - t0
    sampler.join()
    if proc.returncode != 0 and not error:
        error = f"exit status {proc.returncode}: {out[-2000:]}"
    return SampledRun(out, wall, box.get("s"), error)


# ----------------------------------------------------------------------- one size
def overrides(
    num_clients: int, rounds: int, runs_dir: str, policy: str
) -> dict[str, Any]:
    """Return the flat run config of one federation size."""
    return {
        "num_clients": num_clients,
        "clients_per_round": 10,
        "num_rounds": rounds,
        "dataset.name": "mnist5k",
        "dataset.partitioner": "iid",
        "policy.name": policy,
        "output_dir": runs_dir,
        "run_name": run_name(num_clients, policy),
    }


def run_name(num_clients: int, policy: str) -> str:
    """Return the run directory name of one case."""
    return f"{policy}-clients{num_clients}"


def child_main(flat: dict[str, Any]) -> int:
    """Run one experiment in this (child) process; print its summary as JSON."""
    from orchestration.config import RunConfig
    from orchestration.runner import run_experiment

    summary = run_experiment(RunConfig.from_flat(flat))
    print("SUMMARY " + json.dumps(summary), flush=True)
    return 0


def measure(
    num_clients: int,
    rounds: int,
    runs_dir: str,
    policy: str,
    interval: float,
    timeout: float,
) -> dict[str, Any]:
    """Run one size in a child process; return wall time, peaks and the summary."""
    flat = overrides(num_clients, rounds, runs_dir, policy)
    name = run_name(num_clients, policy)
    cmd = [sys.executable, "-m", "experiments.bench_scale", "--child", json.dumps(flat)]
    run = run_sampled(cmd, lambda p: sample_until_done(p, interval), timeout)
    out, wall = run.out, run.wall_s
    peak = run.sample or TreePeak()
    summary: dict[str, Any] = {}
    for line in out.splitlines():
        if line.startswith("SUMMARY "):
            summary = json.loads(line[len("SUMMARY ") :])
    log_file = Path(runs_dir) / f"{name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text(out)
    rows = []
    results_file = Path(runs_dir) / name / "results.jsonl"
    if results_file.exists():
        rows = [json.loads(x) for x in results_file.read_text().splitlines() if x]
    first = next((r["wall_s"] for r in rows if r["round"] == 1), None)
    return {
        "policy": policy,
        "num_clients": num_clients,
        "examples_per_client": 4000 // num_clients,
        "wall_s": wall,
        "server_wall_s": summary.get("wall_s"),
        "round1_s": first,
        "median_round_s": summary.get("median_round_s"),
        "final_accuracy": summary.get("final_accuracy"),
        "policy_fallbacks": summary.get("policy_fallbacks"),
        "selection_overridden_rounds": overridden_rounds(
            Path(runs_dir) / name / "decisions.jsonl"
        ),
        "roll_call_s": seconds_between(
            _first_time(out, " starting "), _first_time(out, "roll call:")
        ),
        "peak_tree_rss": peak.rss,
        "peak_tree_pss": peak.pss,
        "peak_driver_rss": peak.driver_rss,
        "peak_processes": peak.processes,
        "samples": peak.samples,
        "process_names": sorted(peak.names),
        "error": run.error,
        "log": str(log_file),
        "tail": out[-1500:],
    }


def _first_time(log: str, marker: str) -> str | None:
    return next((x.split()[0] for x in log.splitlines() if marker in x), None)


def seconds_between(start: str | None, end: str | None) -> float | None:
    """Return seconds from ``HH:MM:SS`` ``start`` to ``end`` (None if either lacks)."""
    if not start or not end:
        return None
    try:
        h0, m0, s0 = (int(v) for v in start.split(":"))
        h1, m1, s1 = (int(v) for v in end.split(":"))
    except ValueError:
        return None
    return float((h1 - h0) * 3600 + (m1 - m0) * 60 + (s1 - s0)) % 86400


def overridden_rounds(decisions: Path) -> int | None:
    """Count train decisions whose selection the guard's staleness rule changed."""
    if not decisions.exists():
        return None
    count = 0
    for line in decisions.read_text().splitlines():
        entry = json.loads(line)
        changes = entry.get("guard_changes", [])
        if entry.get("phase") == "train" and any(
            c.startswith("added clients unselected") for c in changes
        ):
            count += 1
    return count


def estimate(m: dict[str, Any], num_clients: int) -> dict[str, Any]:
    """Extrapolate a size from a measured one, where that is meaningful.

    With the deterministic policy, round 1 (Ray start, roll call of every node,
    first training) is scaled with the number of clients and later rounds are kept
    (they train 10 clients whatever the size). With the LLM policy the rounds are
    dominated by LLM calls whose prompt grows with the clients: no estimate.
    """
    if m["policy"] != "deterministic":
        return {
            "num_clients": num_clients,
            "estimated_wall_s": None,
            "note": "no estimate: LLM latency, not the federation, sets the time",
        }
    factor = num_clients / m["num_clients"]
    r1 = float(m["round1_s"] or 0.0)
    wall = float(m["wall_s"]) - r1 + r1 * factor
    return {
        "num_clients": num_clients,
        "estimated_wall_s": wall,
        "note": f"estimate ~{wall:.0f} s (from {m['num_clients']} clients: round 1 "
        f"x{factor:g}, the rest kept)",
    }


# ------------------------------------------------------------------------ report
def mib(n: int) -> str:
    """Format bytes as MiB."""
    return f"{n / 2**20:,.0f}"


def render(
    measured: list[dict[str, Any]],
    estimated: list[dict[str, Any]],
    rounds: int,
    budget: float,
    policy: str,
) -> str:
    """Return the Markdown report."""
    lines = [
        f"# Federation size: wall time and peak memory (policy `{policy}`)",
        "",
        f"Agent strategy with `policy.name={policy}`, CNN, MNIST-5k with an IID "
        f"split, 10 clients per round, {rounds} rounds, seed 0, `client_cpus=1` (2 "
        "Ray workers on this 2-core machine, shared with other work). Each size runs "
        "`orchestration.runner.run_experiment` in a fresh child process; memory is "
        "sampled from `/proc` over the child's whole process tree (driver, Ray GCS, "
        "raylet, workers, the local LLM server if any). MNIST-5k keeps 4,000 "
        "examples for clients, so 100 clients get 40 each (32 train, 8 test) and "
        "1,000 clients get 4 each (3 train, 1 test: `dataset.client_test_fraction` "
        "stays 0.2, and a client keeps at least one test example).",
        "",
        "| clients | wall s (process) | server s | start to roll call done s | "
        "round 1 s | median round s | final acc | policy fallbacks | rounds whose "
        "selection the guard replaced | peak tree RSS MiB | peak tree PSS MiB | "
        "peak driver RSS MiB | processes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in measured:
        if m["error"]:
            lines.append(f"| {m['num_clients']:,} | failed: {m['error'][:200]} |")
            continue
        roll = "?" if m["roll_call_s"] is None else f"{m['roll_call_s']:.0f}"
        lines.append(
            f"| {m['num_clients']:,} | {m['wall_s']:.1f} | {m['server_wall_s']:.1f} | "
            f"{roll} | {m['round1_s']:.1f} | {m['median_round_s']:.3f} | "
            f"{m['final_accuracy']:.4f} | {m['policy_fallbacks']} | "
            f"{m['selection_overridden_rounds']} of {rounds} | "
            f"{mib(m['peak_tree_rss'])} | {mib(m['peak_tree_pss'])} | "
            f"{mib(m['peak_driver_rss'])} | {m['peak_processes']} |"
        )
    for e in estimated:
        lines.append(
            f"| {e['num_clients']:,} | not run: the previous size took over "
            f"{budget:.0f} s; {e['note']} |"
        )
    ok = [m for m in measured if not m["error"]]
    if len(ok) >= 2:
        a, b = ok[0], ok[-1]
        per_node = (b["round1_s"] - a["round1_s"]) / (
            b["num_clients"] - a["num_clients"]
        )
        lines += [
            "",
            f"From {a['num_clients']:,} to {b['num_clients']:,} clients: process wall "
            f"x{b['wall_s'] / a['wall_s']:.2f}, peak tree PSS "
            f"x{b['peak_tree_pss'] / a['peak_tree_pss']:.2f}, median round "
            f"x{b['median_round_s'] / a['median_round_s']:.2f}. The growth is in "
            f"round 1, about {1e3 * per_node:.0f} ms per extra node: the roll call "
            "(one QUERY message per node, each a ClientApp call on a Ray worker) "
            "before the first selection; later rounds train 10 clients whatever "
            "the size.",
        ]
    lines += [
        "",
        "Wall s: the child process from start to exit (imports, Ray start and "
        "shutdown included); server s: `summary.json` `wall_s`; start to roll call "
        "done: from the runner's start line to the strategy's 'roll call: N clients "
        "registered' line (1 s resolution); round 1 includes that roll call. RSS "
        "sums count shared pages (Ray's object store) once per process that maps "
        "them; PSS splits them and is the better total. Rounds whose selection the "
        "guard replaced: train decisions where the guard's staleness rule "
        "(`policy.max_staleness`) added overdue clients. Final accuracy is shown "
        "for completeness only: with 10 clients of 3 training examples each, a round "
        "sees 30 examples and the model does not learn; this benchmark measures "
        "cost.",
        "",
        f"Reproduce: `python -m experiments.bench_scale --policy {policy}"
        + (
            "`"
            if policy == "deterministic"
            else " --clients 100 --out experiments/results/scale_llm.md`"
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the sizes in turn and write the report; return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument(
        "--policy",
        default="deterministic",
        choices=["deterministic", "llm"],
        help="the agent's policy.name (llm: the local SmolLM2 agent)",
    )
    ap.add_argument("--budget-s", type=float, default=180.0)
    ap.add_argument("--timeout-s", type=float, default=300.0)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--runs-dir", default="runs/bench_scale")
    ap.add_argument("--out", default="experiments/results/scale.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))

    measured: list[dict[str, Any]] = []
    estimated: list[dict[str, Any]] = []
    for n in args.clients:
        last = measured[-1] if measured else None
        if last is not None and (last["error"] or last["wall_s"] >= args.budget_s):
            if not last["error"]:
                estimated.append(estimate(last, n))
            continue
        print(f"running {n} clients ...", flush=True)
        m = measure(
            n, args.rounds, args.runs_dir, args.policy, args.interval, args.timeout_s
        )
        print(json.dumps({k: v for k, v in m.items() if k != "tail"}), flush=True)
        measured.append(m)
    text = render(measured, estimated, args.rounds, args.budget_s, args.policy)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(out, text)
    out.with_suffix(".json").write_text(
        json.dumps({"measured": measured, "estimated": estimated}, indent=2)
    )
    print(text)
    return 1 if any(m["error"] for m in measured) else 0


if __name__ == "__main__":
    sys.exit(main())
