"""Hydra entry point: ``python -m experiments.run [overrides]``.

Examples
--------
``python -m experiments.run``                                   the default run
``python -m experiments.run strategy=fedavg dataset.alpha=0.1``  overrides
``python -m experiments.run -m strategy=agent,fedavg seed=0,1``  a sequential sweep

Hydra only composes the configuration: it is converted to a plain dict and validated
by :class:`orchestration.config.RunConfig`, the same schema ``flwr run`` uses, and no
Hydra object reaches the Flower apps. Set ``AGENTFL_VERBOSE=1`` for Flower's own logs.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from orchestration.config import ConfigError, RunConfig
from orchestration.runner import RunFailedError, run_experiment


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Resolve a composed Hydra config into the typed :class:`RunConfig`."""
    data = {
        str(key): OmegaConf.to_container(value, resolve=True)
        if OmegaConf.is_config(value)
        else value
        for key, value in cfg.items()
        if key != "hydra"
    }
    return RunConfig.from_nested(data)


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float:
    """Run one job; return its final accuracy (what a Hydra sweeper optimises)."""
    try:
        run_cfg = to_run_config(cfg)
        summary: dict[str, Any] = run_experiment(
            run_cfg, verbose=os.environ.get("AGENTFL_VERBOSE", "0") == "1"
        )
    except (ConfigError, RunFailedError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return float(summary["final_accuracy"])


if __name__ == "__main__":
    main()
