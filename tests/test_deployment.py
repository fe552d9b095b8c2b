"""Real deployment on 127.0.0.1: SuperLink with TLS + SuperNode auth, real SuperNodes.

Every process is started in its own process group by ``deploy/local_federation.py``
and stopped in ``finally`` (SIGTERM, then SIGKILL of the group).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

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
