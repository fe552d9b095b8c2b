"""The client-only install: the ClientApp's import path stays clear of the server side.

A fresh interpreter imports ``fl_client.client_app`` and answers a real roll call and a
real train message, with a meta-path finder recording every import of a server-only
module together with the chain of frames that led to it. With device-local data
(``data-path``, the client-only install) not even the dataset libraries of the
``partitions`` extra may load; on a simulated partition, matplotlib may come in only
through flwr-datasets' own ``__init__``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parents[1]
SERVER_ONLY = (
    "litellm",
    "openai",
    "hydra",
    "omegaconf",
    "matplotlib",
    "ray",
    "agent_strategy",
    "fl_server",
    "experiments",
)
PARTITIONS = ("sklearn", "flwr_datasets", "datasets", "mlxtend", "pandas", "pyarrow")

_PROBE = r"""
import json, sys, traceback
watched = set(json.loads(sys.argv[1]))
seen = {}

class Recorder:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in watched and name not in seen:
            seen[name] = [
                f"{f.filename}:{f.name}" for f in traceback.extract_stack()[:-1]
                if not f.filename.startswith("<")
            ]
        return None

sys.meta_path.insert(0, Recorder())
sys.path.insert(0, sys.argv[3])
from inprocess import InProcessGrid
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from fl_client.client_app import make_client_app
from fl_client.task.models import build_model
from orchestration.config import RunConfig

cfg = RunConfig.from_flat({"num_clients": 2, "clients_per_round": 2,
                           "dataset.name": "digits", "model.name": "mlp"})
grid = InProcessGrid(make_client_app(cfg), 2)
if sys.argv[2]:
    for ctx in grid.contexts.values():
        ctx.node_config["data-path"] = sys.argv[2]
arrays = ArrayRecord(build_model("mlp", (1, 8, 8), 10).state_dict())
msgs = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n)
        for n in grid.nodes]
msgs += [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.05})}),
                 message_type=MessageType.TRAIN, dst_node_id=n) for n in grid.nodes]
errors = [r.error.reason for r in grid.send_and_receive(msgs) if r.has_error()]
loaded = {m: seen.get(m, []) for m in sys.modules if m.split(".")[0] in watched}
print(json.dumps({"errors": errors, "loaded": loaded}))
"""


def _probe(watched: tuple[str, ...], data_path: str = "") -> dict[str, object]:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _PROBE,
            json.dumps(watched),
            data_path,
            str(ROOT / "tests"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _chains(loaded: dict[str, list[str]]) -> str:
    """One line per top-level module: the importing frames, innermost first."""
    tops = {m: c for m, c in loaded.items() if "." not in m} or loaded
    return "\n".join(
        f"{m} <- "
        + " <- ".join(f"{Path(f).parent.name}/{Path(f).name}" for f in c[::-1])
        for m, c in sorted(tops.items())
    )


def test_client_app_on_partitions_imports_no_server_module() -> None:
    result = _probe((*SERVER_ONLY, "sklearn"))
    assert result["errors"] == []
    loaded = result["loaded"]
    assert isinstance(loaded, dict)
    # flwr-datasets (the `partitions` extra, which installs matplotlib) imports
    # matplotlib in its own __init__; that is the only way it may come in.
    server = {
        m: c
        for m, c in loaded.items()
        if m.split(".")[0] != "sklearn"
        and not (m.startswith("matplotlib") and any("flwr_datasets" in f for f in c))
    }
    assert not server, "server-only modules imported by the ClientApp:\n" + _chains(
        server
    )
    # The recorder does see real imports: the simulated partition loads scikit-learn
    # lazily, when the split is made.
    assert "partition.py:split_for" in _chains({"sklearn": loaded["sklearn"]})


def test_client_app_on_local_data_imports_no_dataset_library(tmp_path: Path) -> None:
    digits = load_digits()
    csv = tmp_path / "local.csv"
    header = "label," + ",".join(f"p{i}" for i in range(64))
    rows = [
        ",".join([str(y), *(f"{v:g}" for v in x)])
        for x, y in zip(digits.data[:60], digits.target[:60], strict=True)
    ]
    csv.write_text("\n".join([header, *rows]) + "\n")

    result = _probe(SERVER_ONLY + PARTITIONS, str(csv))

    assert result["errors"] == []
    loaded = result["loaded"]
    assert isinstance(loaded, dict)
    assert not loaded, "modules beyond the client install imported:\n" + _chains(loaded)


def test_base_dependencies_are_client_only() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    for name in ("litellm", "hydra", "omegaconf", "matplotlib", "[simulation]"):
        assert name not in base, f"{name} is a base dependency"
    for name in ("flwr-datasets", "scikit-learn", "mlxtend"):
        assert name not in base, f"{name} belongs to the partitions extra"
    extras = project["optional-dependencies"]
    assert extras["client"] == []
    server = " ".join(extras["server"]).lower()
    for name in ("litellm", "hydra-core", "omegaconf", "flwr[simulation]"):
        assert name in server
    assert set(extras["partitions"]) <= set(extras["server"])
