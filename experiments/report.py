"""Report: tables and plots over finished runs, grouped by configuration.

``python -m experiments.report RUN_DIRS... [--out DIR] [--strict]``

Each run directory holds ``config.json``, ``results.jsonl`` and ``summary.json`` as
written by :mod:`fl_server.server_app`; any other directory given (a Hydra multirun
directory, ``runs/``) is searched recursively for them. Runs whose configurations are
equal once ``seed``, ``output_dir`` and ``run_name`` are removed form one group. The
report, written to ``--out`` (default ``experiments/results/report/``), is:

* ``report.md``: one row per group (strategy, dataset, the settings that differ
  between groups, seeds, final accuracy mean +- sample std, rounds, median round time,
  bytes uploaded per run) and ``report.json`` with the same numbers;
* ``accuracy_vs_round.png``: central accuracy per round, mean over seeds;
* ``accuracy_vs_bytes.png``: the same accuracy against cumulative bytes uploaded;
* ``accuracy_vs_sim_time.png``: the same accuracy against simulated time, for the
  groups run on simulated devices (rows with ``sim_time_s``, see ``devices.*``).

Refused with exit status 2 and a message naming the cause: no input, a directory with
no run in it, an incomplete run (a missing or malformed file, named), and, with
``--strict``, groups with different ``num_rounds`` in one table.

Loading, grouping and aggregating are pure functions; :func:`main` coordinates.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestration.config import flatten

RUN_FILES = ("config.json", "results.jsonl", "summary.json")
IGNORED_KEYS = frozenset({"seed", "output_dir", "run_name"})
ROW_KEYS = ("round", "accuracy", "wall_s", "bytes_up")
DEFAULT_OUT = "experiments/results/report"


class ReportError(ValueError):
    """The input cannot be reported on; the message names the run or file at fault."""


@dataclass(frozen=True)
class Run:
    """One finished run: its flat config, per-round rows (round 0 first), summary."""

    path: Path
    config: dict[str, Any]
    rows: tuple[dict[str, Any], ...]
    summary: dict[str, Any]
    llm_latencies: tuple[float, ...] = ()

    @property
    def seed(self) -> int:
        """The run's seed."""
        return int(self.config.get("seed", 0))


@dataclass(frozen=True)
class GroupStats:
    """Aggregates of the runs of one group (equal configs up to the seed)."""

    key: str
    strategy: str
    dataset: str
    settings: dict[str, Any]
    seeds: tuple[int, ...]
    final_accuracy_mean: float
    final_accuracy_std: float
    num_rounds: int
    median_round_s: float
    bytes_up_mean: float
    rounds: tuple[int, ...]
    accuracy_curve: tuple[float, ...]
    cumulative_bytes_up: tuple[float, ...]
    llm_latencies: tuple[float, ...] = ()

    def llm_latency_percentile(self, q: float) -> float:
        """Return the ``q``-th percentile of the LLM call latencies (NaN if none)."""
        if not self.llm_latencies:
            return math.nan
        return float(np.percentile(self.llm_latencies, q))

    sim_time_curve: tuple[float, ...] = ()

    @property
    def label(self) -> str:
        """A short name for tables and legends."""
        extra = " ".join(f"{k}={v}" for k, v in self.settings.items())
        return f"{self.strategy} {self.dataset} {extra}".strip()


# ----------------------------------------------------------------------- loading
def find_run_dirs(paths: Iterable[Path]) -> list[Path]:
    """Return the run directories at or under ``paths``, sorted, without repeats.

    A directory holding any of :data:`RUN_FILES` is a run directory (complete or
    not: :func:`load_run` decides); any other directory is searched recursively.

    Raises
    ------
    ReportError
        If no path is given, a path does not exist, or one holds no run at all.
    """
    found: set[Path] = set()
    given = list(paths)
    if not given:
        raise ReportError("no run directories given")
    for path in given:
        if not path.is_dir():
            raise ReportError(f"{path}: not a directory")
        here = {
            f.parent.resolve()
            for name in RUN_FILES
            for f in [path / name, *path.rglob(name)]
            if f.is_file()
        }
        if not here:
            raise ReportError(
                f"{path}: no run found (no {', '.join(RUN_FILES)} at or below it)"
            )
        found |= here
    return sorted(found)


def load_run(path: Path) -> Run:
    """Read one run directory.

    Raises
    ------
    ReportError
        If a file is missing or malformed (an incomplete or interrupted run).
    """
    missing = [name for name in RUN_FILES if not (path / name).is_file()]
    if missing:
        raise ReportError(
            f"incomplete run {path}: missing {', '.join(missing)} "
            "(interrupted or still running?)"
        )
    config = _read_json(path / "config.json")
    summary = _read_json(path / "summary.json")
    rows = []
    lines = (path / "results.jsonl").read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path / 'results.jsonl'}:{lineno}: {e}") from e
        absent = [k for k in ROW_KEYS if k not in row]
        if absent:
            raise ReportError(f"{path / 'results.jsonl'}:{lineno}: lacks {absent}")
        rows.append(row)
    rows.sort(key=lambda r: int(r["round"]))
    if not rows or int(rows[0]["round"]) != 0:
        raise ReportError(f"incomplete run {path}: results.jsonl has no round 0")
    if "final_accuracy" not in summary:
        raise ReportError(f"incomplete run {path}: summary.json lacks final_accuracy")
    flat = flatten(config)
    wanted = flat.get("num_rounds")
    if wanted is not None and int(rows[-1]["round"]) != int(wanted):
        raise ReportError(
            f"incomplete run {path}: results.jsonl ends at round "
            f"{rows[-1]['round']}, config.json has num_rounds={wanted}"
        )
    return Run(path, flat, tuple(rows), summary, _llm_latencies(path))


def _llm_latencies(path: Path) -> tuple[float, ...]:
    """Latencies of the LLM calls logged in ``decisions.jsonl`` (none: empty).

    Raises
    ------
    ReportError
        If a line of the file is not JSON or its ``llm.latency_s`` is not a number.
    """
    log = path / "decisions.jsonl"
    if not log.is_file():
        return ()
    out = []
    for lineno, line in enumerate(log.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            call = json.loads(line).get("llm")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ReportError(f"{log}:{lineno}: not a JSON object ({e})") from e
        if call is None:
            continue
        latency = call.get("latency_s") if isinstance(call, dict) else None
        if not isinstance(latency, int | float) or isinstance(latency, bool):
            raise ReportError(f"{log}:{lineno}: llm.latency_s is {latency!r}")
        out.append(float(latency))
    return tuple(out)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return data


# ---------------------------------------------------------------------- grouping
def group_key(config: Mapping[str, Any]) -> str:
    """Return a canonical string of ``config`` without seed, output dir, run name."""
    kept = {k: v for k, v in config.items() if k not in IGNORED_KEYS}
    return json.dumps(kept, sort_keys=True)


def group_runs(runs: Iterable[Run]) -> dict[str, list[Run]]:
    """Group runs by :func:`group_key`; runs within a group are sorted by seed."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(group_key(run.config), []).append(run)
    return {
        k: sorted(v, key=lambda r: (r.seed, str(r.path))) for k, v in groups.items()
    }


def differing_settings(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Return the flat keys whose values differ between ``configs``.

    ``strategy.name`` and ``dataset.name`` (columns of their own) and the ignored keys
    are left out.
    """
    shown = IGNORED_KEYS | {"strategy.name", "dataset.name"}
    keys = sorted({k for c in configs for k in c} - shown)
    return [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]


def summarise_group(
    key: str, runs: Sequence[Run], settings: Sequence[str]
) -> GroupStats:
    """Aggregate one group's runs: final accuracy, times, bytes, mean curves.

    The std is the sample standard deviation (``ddof=1``), NaN for a single seed.
    The median round time pools every round (``round >= 1``) of every seed. Curves
    are averaged over seeds, up to the shortest run of the group.
    """
    first = runs[0].config
    finals = [float(r.summary["final_accuracy"]) for r in runs]
    walls = [float(row["wall_s"]) for r in runs for row in r.rows if row["round"] > 0]
    length = min(len(r.rows) for r in runs)
    acc = np.array([[float(x["accuracy"]) for x in r.rows[:length]] for r in runs])
    up = np.array([[float(x["bytes_up"]) for x in r.rows[:length]] for r in runs])
    bytes_total = [
        float(r.summary.get("bytes_up", up[i].sum())) for i, r in enumerate(runs)
    ]
    simulated = all("sim_time_s" in x for r in runs for x in r.rows[:length])
    sim = (
        np.array([[float(x["sim_time_s"]) for x in r.rows[:length]] for r in runs])
        if simulated
        else np.zeros((0, length))
    )
    return GroupStats(
        key=key,
        strategy=str(first.get("strategy.name", "?")),
        dataset=str(first.get("dataset.name", "?")),
        settings={k: first.get(k) for k in settings},
        seeds=tuple(r.seed for r in runs),
        final_accuracy_mean=statistics.fmean(finals),
        final_accuracy_std=statistics.stdev(finals) if len(finals) > 1 else math.nan,
        num_rounds=int(first.get("num_rounds", length - 1)),
        median_round_s=statistics.median(walls) if walls else math.nan,
        bytes_up_mean=statistics.fmean(bytes_total),
        rounds=tuple(int(x["round"]) for x in runs[0].rows[:length]),
        accuracy_curve=tuple(float(v) for v in acc.mean(axis=0)),
        cumulative_bytes_up=tuple(float(v) for v in up.cumsum(axis=1).mean(axis=0)),
        llm_latencies=tuple(x for r in runs for x in r.llm_latencies),
        sim_time_curve=tuple(float(v) for v in sim.mean(axis=0)) if simulated else (),
    )


def time_to_accuracy(
    times: Sequence[float], accuracies: Sequence[float], target: float
) -> float | None:
    """Return the first time at which accuracy reaches ``target``; None if never.

    ``times`` and ``accuracies`` are per round, in order (e.g. ``sim_time_s`` and
    ``accuracy`` of ``results.jsonl``).
    """
    if len(times) != len(accuracies):
        raise ValueError(f"{len(times)} times but {len(accuracies)} accuracies")
    for t, a in zip(times, accuracies, strict=True):
        if a >= target:
            return float(t)
    return None


def build_report(runs: Sequence[Run], *, strict: bool = False) -> list[GroupStats]:
    """Group ``runs`` and aggregate each group, in a stable order.

    Raises
    ------
    ReportError
        If there are no runs, or ``strict`` and the groups differ in ``num_rounds``.
    """
    if not runs:
        raise ReportError("no runs to report on")
    groups = group_runs(runs)
    settings = differing_settings([json.loads(k) for k in groups])
    stats = [summarise_group(k, v, settings) for k, v in groups.items()]
    rounds = sorted({s.num_rounds for s in stats})
    if strict and len(rounds) > 1:
        detail = "; ".join(f"{s.label}: {s.num_rounds}" for s in stats)
        raise ReportError(
            f"--strict: groups have different num_rounds {rounds} ({detail}); "
            "report them separately"
        )
    return sorted(stats, key=lambda s: (s.dataset, s.strategy, s.label))


# ---------------------------------------------------------------------- rendering
def render_markdown(stats: Sequence[GroupStats]) -> str:
    """Return the Markdown report: one table row per group."""
    lines = [
        "| strategy | dataset | settings | seeds | final accuracy | rounds | "
        "median round s | bytes up / run | LLM calls | LLM p50 / p95 s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in stats:
        settings = ", ".join(f"{k}={v}" for k, v in s.settings.items()) or "-"
        std = "-" if math.isnan(s.final_accuracy_std) else f"{s.final_accuracy_std:.4f}"
        lines.append(
            f"| {s.strategy} | {s.dataset} | {settings} | {len(s.seeds)} | "
            f"{s.final_accuracy_mean:.4f} ± {std} | {s.num_rounds} | "
            f"{s.median_round_s:.3f} | {_human_bytes(s.bytes_up_mean)} | "
            f"{len(s.llm_latencies)} | {_latency_cell(s)} |"
        )
    rounds = sorted({s.num_rounds for s in stats})
    if len(rounds) > 1:
        lines += ["", f"Note: the groups differ in num_rounds {rounds}."]
    lines += [
        "",
        "Final accuracy: mean ± sample std (ddof=1) over seeds, central test set. "
        "Median round s pools every round of every seed (round 1 includes the "
        "simulation's start-up). Bytes up: array bytes sent by clients, whole run, "
        "mean over seeds. LLM: calls logged in decisions.jsonl over all seeds, "
        "latency percentiles pooled over them.",
    ]
    return "\n".join(lines) + "\n"


def _latency_cell(s: GroupStats) -> str:
    if not s.llm_latencies:
        return "-"
    return f"{s.llm_latency_percentile(50):.2f} / {s.llm_latency_percentile(95):.2f}"


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover - the loop always returns


def write_plots(stats: Sequence[GroupStats], out: Path) -> list[Path]:
    """Write accuracy-vs-round and accuracy-vs-bytes PNGs; return their paths.

    With LLM calls in any group, also ``llm_latency.png``: the empirical CDF of
    each group's call latencies.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    plots: list[tuple[str, str, Any]] = [
        ("accuracy_vs_round.png", "round", lambda s: s.rounds),
        ("accuracy_vs_bytes.png", "cumulative MB uploaded", _mb),
    ]
    if any(s.sim_time_curve for s in stats):
        plots.append(
            (
                "accuracy_vs_sim_time.png",
                "simulated time, s (mean over seeds)",
                lambda s: s.sim_time_curve,
            )
        )
    for name, xlabel, xs in plots:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for s in stats:
            if not xs(s):
                continue
            ax.plot(xs(s), s.accuracy_curve, label=f"{s.label} (n={len(s.seeds)})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("central accuracy (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)
    with_llm = [s for s in stats if s.llm_latencies]
    if with_llm:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for s in with_llm:
            lat = np.sort(np.asarray(s.llm_latencies))
            share = np.arange(1, lat.size + 1) / lat.size
            ax.step(lat, share, where="post", label=f"{s.label} ({lat.size} calls)")
        ax.set_xlabel("LLM call latency, s")
        ax.set_ylabel("share of calls")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / "llm_latency.png", dpi=120)
        plt.close(fig)
        paths.append(out / "llm_latency.png")
    return paths


def _mb(s: GroupStats) -> list[float]:
    return [b / 1e6 for b in s.cumulative_bytes_up]


def to_json(stats: Sequence[GroupStats]) -> list[dict[str, Any]]:
    """Return the table's numbers as JSON-ready dicts (curves included)."""
    return [
        {
            "label": s.label,
            "strategy": s.strategy,
            "dataset": s.dataset,
            "settings": s.settings,
            "seeds": list(s.seeds),
            "final_accuracy_mean": s.final_accuracy_mean,
            "final_accuracy_std": None
            if math.isnan(s.final_accuracy_std)
            else s.final_accuracy_std,
            "num_rounds": s.num_rounds,
            "median_round_s": s.median_round_s,
            "bytes_up_mean": s.bytes_up_mean,
            "accuracy_curve": list(s.accuracy_curve),
            "cumulative_bytes_up": list(s.cumulative_bytes_up),
            "llm_calls": len(s.llm_latencies),
            "llm_latency_p50_s": None
            if not s.llm_latencies
            else s.llm_latency_percentile(50),
            "llm_latency_p95_s": None
            if not s.llm_latencies
            else s.llm_latency_percentile(95),
            **({"sim_time_curve": list(s.sim_time_curve)} if s.sim_time_curve else {}),
        }
        for s in stats
    ]


# ---------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """Build the report for the run directories on the command line."""
    ap = argparse.ArgumentParser(
        prog="python -m experiments.report", description=__doc__.splitlines()[0]
    )
    ap.add_argument("run_dirs", nargs="*", type=Path, help="run or sweep directories")
    ap.add_argument("--out", type=Path, default=Path(DEFAULT_OUT))
    ap.add_argument(
        "--strict", action="store_true", help="refuse groups with different num_rounds"
    )
    args = ap.parse_args(argv)
    try:
        runs = [load_run(p) for p in find_run_dirs(args.run_dirs)]
        stats = build_report(runs, strict=args.strict)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    table = render_markdown(stats)
    (args.out / "report.md").write_text(table, encoding="utf-8")
    (args.out / "report.json").write_text(json.dumps(to_json(stats), indent=2))
    plots = write_plots(stats, args.out)
    print(table, end="")
    print(
        f"{len(runs)} runs in {len(stats)} groups; wrote {args.out / 'report.md'}, "
        + ", ".join(str(p) for p in plots)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
