"""Run one experiment on Flower's simulation engine and report it.

This is what ``make run`` and ``python -m experiments.run`` call. The ServerApp and
ClientApp are the same objects ``flwr run`` loads, bound to an explicit
:class:`RunConfig` because Flower's in-process simulation does not read pyproject.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from .config import RunConfig

log = logging.getLogger("agentfl")

# litellm's offline variables are set by agent_strategy.llm, which imports litellm.
OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DEDUP_LOGS": "0",
}


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


class RunFailedError(RuntimeError):
    """The simulation ended without completing every round."""


def setup_logging(verbose: bool = False) -> None:
    """Show this project's progress lines; Flower's and litellm's if ``verbose``."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("agentfl")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
    quiet = logging.INFO if verbose else logging.WARNING
    for name in ("flwr", "LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx"):
        logging.getLogger(name).setLevel(quiet)


def run_experiment(
    cfg: RunConfig, *, verbose: bool = False, client_mods: list[Any] | None = None
) -> dict[str, Any]:
    """Run ``cfg`` on Flower's Ray simulation engine and return its summary.

    ``client_mods`` are extra Flower mods around every client handler (benchmarks
    inject faults with them).

    Raises
    ------
    RunFailedError
        If the run did not complete (a round with too few usable replies, a crash in
        the ServerApp); the message names the cause and the run directory.
    """
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if threading.current_thread() is threading.main_thread():
        # Turn SIGTERM into SystemExit so context managers (the local LLM server,
        # Ray) are cleaned up as on Ctrl-C.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from flwr.simulation import run_simulation

    setup_logging(verbose)

    from fl_client.client_app import make_client_app
    from fl_server.server_app import make_server_app, run_dir_for

    run_dir = run_dir_for(cfg)
    cfg = cfg.model_copy(
        update={"output_dir": str(run_dir.parent), "run_name": run_dir.name}
    )
    log.info(
        "starting %s: %s, %d clients (%d per round), %d rounds, seed %d -> %s",
        cfg.strategy.name,
        cfg.dataset.name,
        cfg.num_clients,
        cfg.clients_per_round,
        cfg.num_rounds,
        cfg.seed,
        run_dir,
    )
    backend = {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
    }
    error: BaseException | None = None
    try:
        run_simulation(
            server_app=make_server_app(cfg),
            client_app=make_client_app(cfg, mods=client_mods),
            num_supernodes=cfg.num_clients,
            backend_config=backend,  # type: ignore[arg-type]
            verbose_logging=verbose,
        )
    except (Exception, SystemExit) as e:  # noqa: BLE001 - reported below with context
        error = e
    summary_path = Path(run_dir) / "summary.json"
    if error is not None or not summary_path.exists():
        cause = f"{type(error).__name__}: {error}" if error else "no summary written"
        if error is not None and error.__cause__ is not None:
            cause += f" (caused by {type(error.__cause__).__name__}: {error.__cause__})"
        raise RunFailedError(
            f"run failed: {cause}. Partial results in {run_dir}"
        ) from error
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    stats = summary.get("policy_stats") or {}
    if stats.get("llm_calls"):
        log.info(
            "agent LLM: %d calls, fallback rate %.1f%% (%s), latency p50 %.2fs p95 "
            "%.2fs",
            stats["llm_calls"],
            100 * stats["fallback_rate"],
            ", ".join(f"{k} {v}" for k, v in stats["fallback_reasons"].items())
            or "none",
            stats["llm_latency_p50_s"],
            stats["llm_latency_p95_s"],
        )
    if summary.get("policy_notice"):
        log.info("agent notice: %s", summary["policy_notice"])
    log.info(
        "finished: %s, %d rounds, final accuracy %.4f (from %.4f), wall %.1fs, "
        "median round %.2fs, failures %d, fallbacks %d; results in %s",
        summary["strategy"],
        summary["rounds"],
        summary["final_accuracy"],
        summary["initial_accuracy"],
        summary["wall_s"],
        summary["median_round_s"],
        summary["client_failures"],
        summary["policy_fallbacks"],
        summary["run_dir"],
    )
    return summary
