"""The Flower ServerApp: builds the strategy from the run config and runs it.

The module-level ``app`` reads Flower's run config (``flwr run``);
:func:`make_server_app` binds an explicit :class:`RunConfig` (programmatic simulation,
Hydra). Either way the run writes, under its run directory: ``config.json``,
``environment.json`` (package versions, git revision), ``results.jsonl`` (one line
per round), ``decisions.jsonl`` (agent strategy),
``model.pt`` (the final global model) and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import random
import subprocess
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from agent_strategy import DeterministicPolicy, Limits
from fl_client.attacks import malicious_partitions
from fl_client.task import build_model, split_for
from orchestration.config import RunConfig
from orchestration.session import RunSession, resume_dir

from .attack_report import detection_scores
from .baselines import build_baseline
from .client_features import ClientFeatures
from .device_grid import DeviceSimulator
from .loss_check import LossChecker
from .metering import MeteredGrid
from .policy_setup import (
    PolicySetup,
    deterministic_policy,
    open_policy,
    reputation_params,
)
from .privacy import with_client_dp
from .results import RoundRecorder, StopRun
from .resume import RoundOffset, offset_evaluate
from .secagg_run import run_secagg
from .strategy import AgentStrategy

log = logging.getLogger("agentfl.server")


def run_dir_for(cfg: RunConfig) -> Path:
    """Return (and create) the directory this run writes to (``resume``'s if set)."""
    if cfg.resume:
        return resume_dir(cfg)
    name = cfg.run_name or (
        f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.strategy.name}-s{cfg.seed}"
    )
    path = Path(cfg.output_dir).expanduser() / name
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def environment() -> dict[str, str]:
    """Return the versions of the key packages and the git revision of the code."""
    from importlib.metadata import PackageNotFoundError, version

    info: dict[str, str] = {"python": platform.python_version()}
    for pkg in ("flwr", "flwr-datasets", "torch", "numpy", "litellm", "hydra-core"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = "not installed"
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        info["git_revision"] = rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        info["git_revision"] = "unknown"
    return info


def limits_for(cfg: RunConfig) -> Limits:
    """Return the hard limits the guard enforces on the agent's policy for ``cfg``."""
    p = cfg.policy
    return Limits(
        min_clients=max(
            cfg.min_replies, math.ceil(p.min_selection_share * cfg.clients_per_round)
        ),
        max_clients=cfg.clients_per_round,
        min_epochs=p.min_epochs,
        max_epochs=p.max_epochs,
        lr_min=p.lr_factor_min * cfg.train.lr,
        lr_max=p.lr_factor_max * cfg.train.lr,
        max_weight_share=p.max_weight_share,
        deadline_s=_deadline(cfg),
        weight_trust=p.weight_trust,
        max_staleness=p.max_staleness,
        max_flag_share=p.max_flag_share,
        rules=cfg.defense.allowed_rules(),
        codecs=cfg.compression.allowed_codecs(),
    )


def build_strategy(
    cfg: RunConfig, run_dir: Path, setup: PolicySetup | None = None
) -> Strategy:
    """Return the agent strategy or the Flower baseline named by the config.

    ``setup`` is the agent's policy (see :func:`open_policy`); without one the agent
    uses the deterministic policy.
    """
    if cfg.strategy.name != "agent":
        return build_baseline(cfg)
    if setup is None:
        det = deterministic_policy(cfg)
        setup = PolicySetup(det, det)
    return AgentStrategy(
        setup.policy,
        clients_per_round=cfg.clients_per_round,
        min_replies=cfg.min_replies,
        limits=limits_for(cfg),
        local_epochs=cfg.train.local_epochs,
        lr=cfg.train.lr,
        fallback=setup.fallback,
        decision_log=run_dir / "decisions.jsonl",
        telemetry=setup.telemetry,
        roll_call_timeout_s=cfg.round_timeout_s,
        features=ClientFeatures.from_config(cfg),
        reputation=reputation_params(cfg) if cfg.defense.enabled else None,
        trim_beta=cfg.strategy.trim_beta,
        krum_byzantine=cfg.strategy.krum_byzantine,
        update_geometry=uses_update_geometry(setup.policy),
        loss_check=LossChecker.from_config(cfg),
    )


def uses_update_geometry(policy: object) -> bool:
    """Return whether ``policy`` reads the replies' cosine, Krum and duplicates.

    The deterministic policy does only with its detectors (``defense.enabled``);
    every other policy (an LLM, a router) is shown them, so they are measured.
    """
    if isinstance(policy, DeterministicPolicy):
        return policy.detection is not None
    return True


def _deadline(cfg: RunConfig) -> float:
    """Return the devices' deadline when simulated and set, else the policy's."""
    d = cfg.devices
    return d.deadline_s if d.enabled and d.deadline_s > 0 else cfg.policy.deadline_s


def attack_summary(cfg: RunConfig, strategy: Strategy) -> dict[str, object] | None:
    """Return the run's attack (who attacked) and, for the agent, detection scores."""
    a = cfg.attack
    if a.kind == "none":
        return None
    bad = [f"c{p}" for p in malicious_partitions(cfg.num_clients, a.fraction, cfg.seed)]
    out: dict[str, object] = {
        "kind": a.kind,
        "fraction": a.fraction,
        "start_round": a.start_round,
        "scale": a.scale,
        "noise_std": a.noise_std,
        "malicious": bad,
    }
    if isinstance(strategy, AgentStrategy):
        out["detection"] = detection_scores(strategy.history, bad, a.start_round)
    return out


def run_server(grid: Grid, cfg: RunConfig) -> dict[str, object]:
    """Run one federated training job on ``grid``; return the run summary.

    An LLM policy's local model server (``agent.model=local``) lives exactly as long
    as this call, errors included.
    """
    if cfg.strategy.name != "agent":
        return _run_server(grid, cfg, None)
    with open_policy(cfg) as setup:
        return _run_server(grid, cfg, setup)


def _run_server(
    grid: Grid, cfg: RunConfig, setup: PolicySetup | None
) -> dict[str, object]:
    t0 = time.perf_counter()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    run_dir = run_dir_for(cfg)
    (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2))
    (run_dir / "environment.json").write_text(json.dumps(environment(), indent=2))
    _, central = split_for(cfg)
    model = build_model(
        cfg.model.name, central.input_shape, central.num_classes, cfg.seed
    )
    initial = ArrayRecord(model.state_dict())
    strategy = build_strategy(cfg, run_dir, setup)
    if isinstance(strategy, AgentStrategy):
        strategy.set_num_rounds(cfg.num_rounds)
    devices = (
        DeviceSimulator(cfg.devices, cfg.seed, cfg.train.local_epochs)
        if cfg.devices.enabled
        else None
    )
    metered = MeteredGrid(grid, devices)
    llm = setup.telemetry.llm if setup is not None and setup.telemetry else None
    session = RunSession(cfg, run_dir, strategy, llm=llm)
    recorder = RoundRecorder(
        model_name=cfg.model.name,
        test_set=central,
        grid=metered,
        strategy=strategy,
        hub=session.hub,
        num_rounds=cfg.num_rounds,
        min_replies=cfg.min_replies,
        should_stop=session.should_stop,
        llm_cost=session.llm_cost,
        max_failed_rounds=cfg.max_failed_rounds,
    )
    session.wire(recorder)
    done, initial = session.begin(initial)
    log.info("run %s: writing to %s", cfg.strategy.name, run_dir)
    stopped: str | None = None
    train_config = {"local-epochs": cfg.train.local_epochs, "lr": cfg.train.lr}
    try:
        if cfg.secagg.enabled and isinstance(strategy, AgentStrategy):
            # docs/privacy.md; resume is refused with SecAgg+ (combinations.py).
            final_arrays, rounds = run_secagg(
                metered, cfg, strategy, initial, recorder, train_config
            )
            (run_dir / "secagg.json").write_text(json.dumps(rounds, indent=2))
        else:
            result = RoundOffset(
                with_client_dp(cfg, strategy), done, session.maybe_kill
            ).start(
                grid=metered,
                initial_arrays=initial,
                num_rounds=cfg.num_rounds - done,
                timeout=cfg.round_timeout_s,
                train_config=ConfigRecord(train_config),  # type: ignore[arg-type]
                evaluate_fn=offset_evaluate(recorder, done),
            )
            final_arrays = (
                result.arrays
                if done < cfg.num_rounds and len(result.arrays)
                else initial  # resumed after the last round, or every round failed
            )
    except StopRun as stop:
        stopped, final_arrays = stop.reason, stop.arrays
        log.info("%s", stop)
    finally:
        orchestration = session.close()
        if isinstance(strategy, AgentStrategy):
            strategy.close()
    rounds_done = sum(1 for r in recorder.records if r.round > 0)
    if rounds_done != cfg.num_rounds and stopped is None:
        raise RuntimeError(
            f"run ended after {rounds_done} of {cfg.num_rounds} rounds; see the log"
        )
    torch.save(final_arrays.to_torch_state_dict(), run_dir / "model.pt")
    final = recorder.records[-1]
    walls = [r.wall_s for r in recorder.records if r.round > 0]
    summary: dict[str, object] = {
        "strategy": cfg.strategy.name,
        "seed": cfg.seed,
        "rounds": rounds_done,
        "initial_accuracy": recorder.records[0].accuracy,
        "final_accuracy": final.accuracy,
        "final_loss": final.loss,
        "final_epsilon": final.epsilon_max,
        "median_round_s": float(np.median(walls)),
        "wall_s": round(time.perf_counter() - t0, 3),
        "bytes_up": sum(r.bytes_up for r in recorder.records),
        "bytes_down": sum(r.bytes_down for r in recorder.records),
        "client_failures": sum(r.failures for r in recorder.records),
        "sim_time_s": final.sim_time_s,
        "client_eval": recorder.client_eval,
        "failed_rounds": sum(r.failed for r in recorder.records),
        "attack": attack_summary(cfg, strategy),
        "policy_fallbacks": getattr(strategy, "total_fallbacks", 0),
        "policy": cfg.policy.name if isinstance(strategy, AgentStrategy) else "-",
        "policy_notice": setup.notice if setup is not None else None,
        "policy_stats": strategy.policy_stats()
        if isinstance(strategy, AgentStrategy)
        else {},
        "loss_check": strategy.loss_check.stats()
        if isinstance(strategy, AgentStrategy) and strategy.loss_check is not None
        else None,
        "run_dir": str(run_dir),
        "stopped_early": stopped,
        "resumed_after_round": done if cfg.resume else None,
        "orchestration": orchestration,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def make_server_app(cfg: RunConfig | None = None) -> ServerApp:
    """Return a ServerApp bound to ``cfg`` (or reading Flower's run config if None)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else RunConfig.from_flat(context.run_config)
        summary = run_server(grid, run_cfg)
        log.info(
            "done: %s rounds, final accuracy %.4f, %.1fs; results in %s",
            summary["rounds"],
            summary["final_accuracy"],
            summary["wall_s"],
            summary["run_dir"],
        )

    return app


app = make_server_app()
