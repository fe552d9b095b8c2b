"""Benchmark the LLM agent: latency, overhead, and safety against an adversarial LLM.

``python -m experiments.bench_llm --part latency``
    Median and p95 decision latency of the local model (SmolLM2-135M through
    llama-cpp-python, over loopback HTTP via litellm) at 10 and 50 clients, both
    phases, on synthetic observations.
``python -m experiments.bench_llm --part overhead``
    The default run (30 rounds) with the local LLM and with the deterministic policy,
    same seed, back to back: median round time ratio, fallback rate, accuracy.
``python -m experiments.bench_llm --part adversarial``
    The default run against a loopback LLM that always gives the most damaging answer
    that still parses (``tests/support/scripted_llm.py``), vs the deterministic policy
    on the same seed: final accuracy gap (target: within 2 points).

Each part writes ``experiments/results/llm_<part>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments.report_io import write_report
from orchestration.config import RunConfig
from orchestration.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def _write(part: str, lines: list[str], data: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_report(RESULTS / f"llm_{part}.md", "\n".join(lines) + "\n")
    (RESULTS / f"llm_{part}.json").write_text(json.dumps(data, indent=2))
    print("\n".join(lines))


def _observation(n: int, phase: str, seed: int = 0) -> Any:
    from agent_strategy import ClientState, Limits, Observation, ReplyFeatures

    rng = np.random.default_rng(seed)
    clients = tuple(
        ClientState(
            id=f"c{i}",
            num_examples=int(rng.integers(50, 300)),
            rounds_selected=int(rng.integers(0, 5)),
            rounds_accepted=int(rng.integers(0, 5)),
            last_selected_round=int(rng.integers(0, 9)),
            last_loss=float(rng.uniform(0.1, 2.0)),
            last_duration_s=float(rng.uniform(0.1, 2.0)),
        )
        for i in range(n)
    )
    target = max(2, n // 2)
    replies = tuple(
        ReplyFeatures(
            id=c.id,
            num_examples=c.num_examples,
            train_loss=float(rng.uniform(0.1, 2.0)),
            duration_s=float(rng.uniform(0.1, 2.0)),
            update_norm=float(rng.uniform(0.5, 3.0)),
            cosine_to_median=float(rng.uniform(0.2, 1.0)),
        )
        for c in clients[: min(target, 10)]
    )
    return Observation(
        phase=phase,
        round=10,
        num_rounds=30,
        target_clients=min(target, 10),
        default_epochs=1,
        default_lr=0.05,
        limits=Limits(
            min_clients=min(target, 10) // 2,
            max_clients=min(target, 10),
            min_epochs=1,
            max_epochs=5,
            lr_min=0.025,
            lr_max=0.1,
            max_weight_share=0.5,
            deadline_s=60.0,
        ),
        clients=clients,
        replies=replies if phase == "aggregate" else (),
        last_accuracy=0.9,
    )


def latency(repeats: int) -> None:
    """Time local-model decisions at 10 and 50 clients."""
    from agent_strategy import DeterministicPolicy
    from agent_strategy.llm import LLMPolicy, LocalModelServer, local_model_available

    ok, why = local_model_available()
    if not ok:
        sys.exit(f"local model not installed: {why}")
    rows: dict[str, Any] = {}
    with LocalModelServer() as server:
        for n in (10, 50):
            for phase in ("train", "aggregate"):
                policy = LLMPolicy(
                    server.model,
                    api_base=server.api_base,
                    fallback=DeterministicPolicy(),
                    timeout_s=120.0,
                    max_attempts=1,
                    max_prompt_chars=server.max_prompt_chars,
                    max_consecutive_failures=None,
                )
                policy.decide(_observation(n, phase, seed=99))  # warm-up
                lat, sources = [], []
                for r in range(repeats):
                    t0 = time.perf_counter()
                    d = policy.decide(_observation(n, phase, seed=r))
                    lat.append(time.perf_counter() - t0)
                    sources.append(d.source)
                rows[f"{n}-{phase}"] = {
                    "clients": n,
                    "phase": phase,
                    "median_s": statistics.median(lat),
                    "p95_s": float(np.percentile(lat, 95)),
                    "llm_answers": sources.count("llm"),
                    "fallbacks": dict(policy.fallbacks),
                    "repeats": repeats,
                }
    lines = [
        "| clients | phase | median s | p95 s | valid LLM answers | fallbacks |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        lines.append(
            f"| {r['clients']} | {r['phase']} | {r['median_s']:.2f} | {r['p95_s']:.2f} "
            f"| {r['llm_answers']}/{r['repeats']} | {r['fallbacks'] or '-'} |"
        )
    _write("latency", lines, rows)


def _cfg(seed: int, rounds: int, name: str, **flat: Any) -> RunConfig:
    base = {
        "seed": seed,
        "num_rounds": rounds,
        "output_dir": str(ROOT / "runs" / "bench_llm"),
        "run_name": name,
    }
    base.update(flat)
    return RunConfig.from_flat(base)


def _row(label: str, s: dict[str, Any]) -> str:
    st = s.get("policy_stats") or {}
    return (
        f"| {label} | {s['final_accuracy']:.4f} | {s['median_round_s']:.2f} | "
        f"{s['wall_s']:.0f} | {100 * st.get('fallback_rate', 0):.0f}% "
        f"{st.get('fallback_reasons') or ''} | "
        f"{st.get('llm_latency_p50_s', float('nan')):.2f} / "
        f"{st.get('llm_latency_p95_s', float('nan')):.2f} |"
    )


HEADER = [
    "| run | final accuracy | median round s | wall s | fallback rate (reasons) | "
    "LLM p50 / p95 s |",
    "|---|---|---|---|---|---|",
]


def overhead(seed: int, rounds: int) -> None:
    """Default run with the local LLM and with the deterministic policy."""
    llm = run_experiment(_cfg(seed, rounds, f"local-s{seed}", **{"policy.name": "llm"}))
    det = run_experiment(
        _cfg(seed, rounds, f"det-s{seed}", **{"policy.name": "deterministic"})
    )
    ratio = llm["median_round_s"] / det["median_round_s"]
    lines = [
        *HEADER,
        _row("LLM (local SmolLM2)", llm),
        _row("deterministic", det),
        "",
        f"Median round time ratio LLM/deterministic: {ratio:.2f} (seed {seed}, "
        f"{rounds} rounds).",
    ]
    _write("overhead", lines, {"llm": llm, "deterministic": det, "ratio": ratio})


def adversarial(seeds: list[int], rounds: int) -> None:
    """Run the default job against an adversarial loopback LLM and deterministic."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support.openai_stub import OpenAIStub
    from support.scripted_llm import adversarial as adversary

    os.environ["AGENTFL_BENCH_KEY"] = "sk-bench"
    lines, data, gaps = list(HEADER), {}, []
    for seed in seeds:
        with OpenAIStub() as stub:
            stub.script(adversary)
            adv = run_experiment(
                _cfg(
                    seed,
                    rounds,
                    f"adversarial-s{seed}",
                    **{
                        "policy.name": "llm",
                        "agent.model": "openai/adversary",
                        "agent.api_base": stub.api_base,
                        "agent.api_key_env": "AGENTFL_BENCH_KEY",
                    },
                )
            )
        det = run_experiment(
            _cfg(seed, rounds, f"det-adv-s{seed}", **{"policy.name": "deterministic"})
        )
        gap = det["final_accuracy"] - adv["final_accuracy"]
        gaps.append(gap)
        lines += [
            _row(f"adversarial LLM, seed {seed}", adv),
            _row(f"deterministic, seed {seed}", det),
        ]
        data[str(seed)] = {"adversarial": adv, "deterministic": det, "gap": gap}
    lines += [
        "",
        "Accuracy gap deterministic - adversarial, same seed: "
        + ", ".join(f"{100 * g:.2f}" for g in gaps)
        + f" points (mean {100 * statistics.mean(gaps):.2f}, max "
        f"{100 * max(gaps):.2f}; target <= 2; {rounds} rounds).",
    ]
    _write("adversarial", lines, data)


def main(argv: list[str] | None = None) -> int:
    """Run one part of the benchmark."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--part", choices=["latency", "overhead", "adversarial"], required=True
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="adversarial")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if args.part == "latency":
        latency(args.repeats)
    elif args.part == "overhead":
        overhead(args.seed, args.rounds)
    else:
        adversarial(args.seeds or [args.seed], args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
