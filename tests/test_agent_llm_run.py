"""The agent strategy with an LLM policy, end to end, over real loopback HTTP."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from inprocess import InProcessGrid
from support.openai_stub import OpenAIStub
from support.scripted_llm import adversarial, cooperative

from fl_client.client_app import make_client_app
from fl_server.server_app import run_server
from orchestration.config import RunConfig


def _cfg(tmp_path: Path, name: str, **kw: object) -> RunConfig:
    flat: dict[str, object] = {
        "dataset.name": "digits",
        "model.name": "mlp",
        "num_clients": 6,
        "clients_per_round": 4,
        "num_rounds": 3,
        "output_dir": str(tmp_path),
        "run_name": name,
        "policy.name": "llm",
        "agent.model": "openai/stub-model",
        "agent.api_key_env": "AGENTFL_TEST_KEY",
        "agent.timeout_s": 5.0,
    }
    flat.update(kw)
    return RunConfig.from_flat(flat)


def _run(cfg: RunConfig) -> tuple[dict[str, object], list[dict[str, object]]]:
    summary = run_server(InProcessGrid(make_client_app(cfg), cfg.num_clients), cfg)
    log = Path(cfg.output_dir) / cfg.run_name / "decisions.jsonl"
    return summary, [json.loads(x) for x in log.read_text().splitlines()]


def test_llm_decisions_take_effect_and_are_logged(
    tmp_path: Path, openai_stub: OpenAIStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTFL_TEST_KEY", "sk-test")
    openai_stub.script(cooperative)
    cfg = _cfg(tmp_path, "coop", **{"agent.api_base": openai_stub.api_base})

    summary, log = _run(cfg)

    assert [d["source"] for d in log] == ["llm"] * 6
    assert all(d["llm"]["prompt_tokens"] > 0 and d["llm"]["prompt_sha256"] for d in log)
    stats = summary["policy_stats"]
    assert isinstance(stats, dict)
    assert stats["llm_calls"] == 6 and stats["fallback_rate"] == 0.0
    assert "llm_latency_p95_s" in stats
    last_train = [
        json.loads(r["messages"][-1]["content"])
        for r in openai_stub.requests
        if '"phase":"train"' in r["messages"][-1]["content"]
    ][-1]
    assert [row[0] for row in last_train["history"]["rows"]] == [1, 2]  # no repeats
    assert openai_stub.count >= 7  # the start-up probe plus one request per decision


def test_an_adversarial_llm_cannot_wreck_the_run(
    tmp_path: Path, openai_stub: OpenAIStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTFL_TEST_KEY", "sk-test")
    openai_stub.script(adversarial)
    cfg = _cfg(
        tmp_path, "adv", **{"agent.api_base": openai_stub.api_base, "num_rounds": 4}
    )
    det = cfg.model_copy(
        update={
            "run_name": "det",
            "policy": cfg.policy.model_copy(update={"name": "deterministic"}),
        }
    )

    adv_summary, log = _run(cfg)
    det_summary = run_server(InProcessGrid(make_client_app(det), 6), det)

    train = [d for d in log if d["phase"] == "train"]
    agg = [d for d in log if d["phase"] == "aggregate"]
    assert all(len(d["decision"]["selected"]) >= 2 for d in train)
    assert all(
        0.025 <= a["lr"] <= 0.1
        for d in train
        for a in d["decision"]["allocations"].values()
    )
    assert all(len(d["decision"]["weights"]) >= 2 for d in agg)
    assert all(max(d["decision"]["weights"].values()) <= 0.5 + 1e-9 for d in agg)
    assert all(d["source"] == "llm" for d in log)  # it parses: no fallback saves us
    assert all(
        any("must stay accepted" in c for c in d["llm"]["guard_changes"]) for d in agg
    )
    assert (
        float(adv_summary["final_accuracy"])
        > float(det_summary["initial_accuracy"]) + 0.3
    )
    assert (
        float(adv_summary["final_accuracy"])
        >= float(det_summary["final_accuracy"]) - 0.15
    )


def test_an_unreachable_llm_is_one_notice_then_fallbacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTFL_TEST_KEY", "sk-test")
    cfg = _cfg(
        tmp_path,
        "down",
        **{"agent.api_base": "http://127.0.0.1:9/v1", "agent.max_attempts": 1},
    )

    summary, log = _run(cfg)

    assert "127.0.0.1:9" in str(summary["policy_notice"])
    assert {d["source"] for d in log} == {"fallback"}
    assert all(d["fallback_reason"].startswith("unavailable") for d in log)
    assert summary["rounds"] == 3


def test_a_missing_api_key_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTFL_TEST_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = _cfg(tmp_path, "nokey", **{"num_rounds": 1})

    summary, log = _run(cfg)

    assert "AGENTFL_TEST_KEY is not set" in str(summary["policy_notice"])
    assert {d["source"] for d in log} == {"fallback"}


def _llama_pids() -> set[str]:
    out = subprocess.run(
        ["ps", "-eo", "pid,stat,args"], capture_output=True, text=True
    ).stdout
    return {
        ln.split()[0]
        for ln in out.splitlines()
        if "llama_cpp.server" in ln and ln.split()[1][0] != "Z"
    }


def test_the_local_model_runs_a_round_and_is_stopped(tmp_path: Path) -> None:
    from agent_strategy.llm import local_model_available

    ok, why = local_model_available()
    if not ok:
        pytest.skip(f"local model not installed: {why}")
    cfg = _cfg(
        tmp_path,
        "local",
        **{
            "agent.model": "local",
            "agent.api_key_env": "",
            "num_rounds": 1,
            "agent.timeout_s": 60.0,
        },
    )

    before = _llama_pids()

    summary, log = _run(cfg)

    assert summary["policy_notice"] is None
    train, agg = log
    assert train["source"] in ("llm", "fallback") and "llm" in train  # asked over HTTP
    assert agg["source"] == "deterministic" and "llm" not in agg  # route auto, local
    assert _llama_pids() <= before  # the server this run started is gone


@pytest.mark.parametrize(
    ("model", "weighting", "detection", "expected"),
    [
        ("local", "auto", "auto", ("deterministic", ("deterministic",))),
        ("openai/x", "auto", "auto", ("llm", ("deterministic", "llm"))),
        ("local", "llm", "union", ("llm", ("deterministic", "llm"))),
        ("openai/x", "deterministic", "llm", ("deterministic", ("llm",))),
    ],
)
def test_route_auto_resolution(
    tmp_path: Path, model: str, weighting: str, detection: str, expected: object
) -> None:
    from fl_server.policy_setup import resolve_route

    cfg = _cfg(
        tmp_path,
        "r",
        **{
            "agent.model": model,
            "agent.route.weighting": weighting,
            "agent.route.detection": detection,
        },
    )

    assert resolve_route(cfg) == expected
