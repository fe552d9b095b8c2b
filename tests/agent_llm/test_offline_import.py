"""Importing the LLM package must not reach for the network (no internet here)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_import_makes_no_network_attempt() -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LITELLM_LOCAL_MODEL_COST_MAP", "LITELLM_OFFLINE_MODE")
    }
    code = (
        "import socket\n"
        "def refuse(*a, **k):\n"
        "    raise SystemExit('network attempt: %r' % (a,))\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "socket.getaddrinfo = refuse\n"
        "import agent_strategy.llm\n"
        "print('imported')\n"
    )

    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "imported" in proc.stdout
    assert "Failed to fetch remote model cost map" not in proc.stderr
