"""Run one job in process (no Ray) from a flat JSON config: a child for kill tests.

``python tests/support/inprocess_run.py '<flat config as JSON>'``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inprocess import InProcessGrid  # noqa: E402

from fl_client.client_app import make_client_app  # noqa: E402
from fl_server.server_app import run_server  # noqa: E402
from orchestration.config import RunConfig  # noqa: E402

if __name__ == "__main__":
    cfg = RunConfig.from_flat(json.loads(sys.argv[1]))
    run_server(InProcessGrid(make_client_app(cfg), cfg.num_clients), cfg)
