"""Real deployment on 127.0.0.1: SuperLink with TLS + SuperNode auth, real SuperNodes.

Every process is started in its own process group by ``deploy/local_federation.py``
and stopped in ``finally`` (SIGTERM, then SIGKILL of the group).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "local_federation", ROOT / "deploy" / "local_federation.py"
)
assert _spec is not None and _spec.loader is not None
lf = importlib.util.module_from_spec(_spec)
sys.modules["local_federation"] = lf
_spec.loader.exec_module(lf)

pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(
        shutil.which("openssl") is None or shutil.which("ssh-keygen") is None,
        reason="deploy/gen_certs.sh needs openssl and ssh-keygen",
    ),
    pytest.mark.skipif(
        not (Path(sys.executable).parent / "flower-superlink").exists(),
        reason="flower-superlink is not installed next to this interpreter",
    ),
]


def _leftovers(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True)
    return [
        line
        for line in out.stdout.splitlines()
        if marker in line and " Z" not in line and "ps -eo" not in line
    ]


def _certs(tmp_path: Path, n: int) -> Path:
    certs = tmp_path / "certs"
    # 2048-bit RSA keeps generation under a second; the guide's default is 4096.
    lf.gen_certs(certs, n, key_bits=2048)
    return certs


def test_tls_and_node_auth_federation_trains(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_config = (
        "num_rounds=2 num_clients=3 clients_per_round=3 min_replies=2 "
        "policy.name='deterministic' strategy.name='agent' dataset.name='digits' "
        f"model.name='mlp' output_dir='{out}' run_name='r'"
    )
    try:
        with lf.local_federation(
            tmp_path, 3, certs=_certs(tmp_path, 3), wait_s=60
        ) as fed:
            t0 = time.monotonic()
            proc = fed.run_app(run_config, timeout=240)
            elapsed = time.monotonic() - t0
            assert proc.returncode == 0, (
                proc.stdout[-3000:] + proc.stderr[-3000:] + fed.log_of("superlink")
            )
    finally:
        # local_federation stopped its processes; check that nothing survived.
        deadline = time.time() + 15
        while _leftovers(str(tmp_path)) and time.time() < deadline:
            time.sleep(0.5)
    assert _leftovers(str(tmp_path)) == []
    rows = [
        json.loads(x) for x in (out / "r" / "results.jsonl").read_text().splitlines()
    ]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.1
    assert all(r["selected"] == 3 and r["accepted"] >= 2 for r in rows[1:])
    assert elapsed < 240


def test_unregistered_or_plaintext_supernode_is_refused(tmp_path: Path) -> None:
    certs = _certs(tmp_path, 2)
    fed = lf.Federation(workdir=tmp_path, certs=certs, flwr_home=tmp_path / "flwr_home")
    retry = ["--max-retries", "2", "--max-wait-time", "15"]
    try:
        fed.start_superlink()
        fed.register(certs / "supernode_0.pub")
        # (b) a valid key pair whose public key was never registered.
        unregistered = fed.start_supernode(1, 2, name="unregistered", extra=retry)
        # (c) no TLS: plaintext HTTP to the HTTPS SuperLink (no auth key, since
        # Flower already refuses an auth key without TLS at start-up, exit code 303).
        plaintext = fed.start_supernode(
            0, 2, tls=False, auth=False, name="plaintext", extra=retry
        )
        codes = {}
        for name, proc in (("unregistered", unregistered), ("plaintext", plaintext)):
            try:
                codes[name] = proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                codes[name] = None
        assert fed.online_nodes() == 0
        assert codes["unregistered"] not in (0, None), fed.log_of("unregistered")
        log = fed.log_of("unregistered")
        assert "Failed to activate SuperNode" in log or "305" in log, log[-2000:]
        assert codes["plaintext"] not in (0, None), fed.log_of("plaintext")
    finally:
        fed.stop_all()
    assert _leftovers(str(tmp_path)) == []


def _rows(out: Path) -> list[dict[str, object]]:
    return [
        json.loads(x) for x in (out / "r" / "results.jsonl").read_text().splitlines()
    ]


def _run_config(out: Path, rounds: int, extra: str = "") -> str:
    return (
        f"num_rounds={rounds} num_clients=3 clients_per_round=3 min_replies=2 "
        "policy.name='deterministic' strategy.name='agent' dataset.name='digits' "
        f"model.name='mlp' output_dir='{out}' run_name='r' {extra}"
    ).strip()


def test_supernode_killed_in_round_2_does_not_stop_the_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    killed: list[float] = []

    def kill_in_round_2(fed: object, stop: threading.Event) -> None:
        # SuperNode 2 logs "Receiving: train message" once per round it trains.
        while not stop.wait(0.3):
            if fed.log_of("supernode_2").count("Receiving: train message") >= 2:  # type: ignore[attr-defined]
                fed.kill("supernode_2")  # type: ignore[attr-defined]
                killed.append(time.monotonic())
                return

    stop = threading.Event()
    try:
        with lf.local_federation(
            tmp_path, 3, certs=_certs(tmp_path, 3), wait_s=60
        ) as fed:
            watcher = threading.Thread(target=kill_in_round_2, args=(fed, stop))
            watcher.start()
            try:
                # Flower's SuperLink answers "Node Unavailable" for the dead node once
                # 2 heartbeats (30 s) lapse, well before round_timeout_s; the roll
                # call waits min(120 s, round_timeout_s) on a loaded machine.
                proc = fed.run_app(
                    _run_config(out, 3, "round_timeout_s=150.0"), timeout=600
                )
            finally:
                stop.set()
                watcher.join()
            assert proc.returncode == 0, proc.stdout[-3000:] + fed.log_of("superlink")
            log = proc.stdout + fed.log_of("superlink")
    finally:
        deadline = time.time() + 15
        while _leftovers(str(tmp_path)) and time.time() < deadline:
            time.sleep(0.5)
    assert _leftovers(str(tmp_path)) == []
    rows = _rows(out)
    assert killed, f"SuperNode 2 never got a round-2 train message: {rows}\n{log}"
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["failures"] == 0 and rows[1]["accepted"] == 3
    assert rows[2]["failures"] == 1 and rows[2]["accepted"] == 2
    assert rows[3]["failures"] == 0 and rows[3]["selected"] == 2  # offline: left out
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.1
    assert "client c2: " in log, log[-3000:]


CLIENT_VENV = os.environ.get("AGENTFL_CLIENT_VENV", "")


@pytest.mark.skipif(
    not (CLIENT_VENV and (Path(CLIENT_VENV) / "bin" / "flower-supernode").exists()),
    reason='set AGENTFL_CLIENT_VENV to a venv made with `pip install ".[client]"` '
    "(see docs/deployment.md) to run the SuperNodes from the client-only install",
)
def test_client_only_env_runs_the_supernodes_on_local_csvs(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    from fl_client.task.partition import central_split

    client_bin = Path(CLIENT_VENV).resolve() / "bin"
    # The venv really is client-only: none of these can be imported there.
    probe = subprocess.run(
        [
            str(client_bin / "python"),
            "-c",
            "import importlib.util as u; print([m for m in ('litellm', 'hydra', "
            "'omegaconf', 'matplotlib', 'ray', 'sklearn', 'flwr_datasets') "
            "if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr
    # Each device holds its own CSV: a third of the digits not in the central test set.
    digits = load_digits()
    pool, _ = central_split(digits.target, 0.2, seed=0)
    configs = []
    for i, rows in enumerate(np.array_split(pool, 3)):
        path = tmp_path / f"device{i}.csv"
        header = "label," + ",".join(f"p{j}" for j in range(64))
        lines = [
            ",".join([str(digits.target[r]), *(f"{v:g}" for v in digits.data[r])])
            for r in rows
        ]
        path.write_text("\n".join([header, *lines]) + "\n")
        configs.append(f'data-path="{path}" threads=1')
    out = tmp_path / "out"
    seen: set[str] = set()
    stop = threading.Event()

    def watch_clientapps() -> None:
        # flwr-clientapp renames itself; its memory map shows where torch came from.
        venv = str(client_bin.parent)
        while not stop.wait(0.5):
            for proc_dir in Path("/proc").glob("[0-9]*"):
                try:
                    if b"flwr-clientapp" not in (proc_dir / "cmdline").read_bytes():
                        continue
                    maps = (proc_dir / "maps").read_text()
                except OSError:
                    continue
                torch_libs = {
                    line.split()[-1] for line in maps.splitlines() if "libtorch" in line
                }
                seen.update(p for p in torch_libs if p.startswith(venv))
                seen.update(f"other:{p}" for p in torch_libs if not p.startswith(venv))

    try:
        with lf.local_federation(
            tmp_path,
            3,
            certs=_certs(tmp_path, 3),
            wait_s=90,
            client_bin=client_bin,
            node_configs=configs,
        ) as fed:
            watcher = threading.Thread(target=watch_clientapps)
            watcher.start()
            try:
                proc = fed.run_app(_run_config(out, 2), timeout=300)
            finally:
                stop.set()
                watcher.join()
            assert proc.returncode == 0, (
                proc.stdout[-3000:] + fed.log_of("supernode_0")[-3000:]
            )
    finally:
        deadline = time.time() + 15
        while _leftovers(str(tmp_path)) and time.time() < deadline:
            time.sleep(0.5)
    assert _leftovers(str(tmp_path)) == []
    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["accepted"] == 3 and r["failures"] == 0 for r in rows[1:])
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.1
    # The ClientApps ran on the client venv: torch was mapped from its site-packages
    # (other helpers' ClientApps may show up as "other:").
    ours = [p for p in seen if not p.startswith("other:")]
    assert ours, f"no flwr-clientapp with torch from {client_bin.parent}: {seen}"
