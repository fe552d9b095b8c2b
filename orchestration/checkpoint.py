r"""Atomic, checksummed checkpoints of the whole server state, one per round.

A checkpoint is a dict of named *parts*; each part belongs to one component and is
produced and restored by that component (the extension point: any component that
has state across rounds registers itself with :meth:`Checkpointer.register`, e.g.
``checkpointer.register("compression", ef_state)`` with an object that has
``state_dict()`` and ``load_state_dict(state)``; its state must be picklable:
numbers, strings, lists, dicts, numpy arrays). Besides the parts a checkpoint holds
the round number, the global model arrays and the config it was written under.

File format (``ckpt-<round>.bin`` in ``<run dir>/checkpoints``)::

    AGENTFL-CKPT 1 <sha256 of payload, hex> <payload length>\n<payload (pickle)>

Writes go to a temporary file in the same directory, are fsync'ed, then renamed over
the target (``os.replace``, atomic on POSIX). Loading verifies the length and the
SHA-256; a truncated or corrupted file is skipped with a warning and the previous
checkpoint is used. The last ``keep`` checkpoints are kept, plus any round a
component pins (the planner pins its last good round, for rollbacks).

The payload is a pickle (numpy arrays and the RNG states need no conversion): the
checksum detects damage, not tampering, so resume only from run directories you
trust, as with ``torch.load(weights_only=False)``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("agentfl.checkpoint")

MAGIC = b"AGENTFL-CKPT"
FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{6,})\.bin$")


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit the run."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint file failed its header, length or checksum check."""


class Stateful(Protocol):
    """A component whose state a checkpoint saves and restores."""

    def state_dict(self) -> dict[str, Any]:
        """Return the component's state (picklable)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state returned by :meth:`state_dict`."""
        ...


@dataclass
class Checkpoint:
    """The content of one checkpoint file."""

    round: int
    arrays: dict[str, Any]
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


# ---------------------------------------------------------------- file format
def encode(payload: bytes) -> bytes:
    """Prefix ``payload`` with the header (magic, version, SHA-256, length)."""
    digest = hashlib.sha256(payload).hexdigest()
    header = b"%s %d %s %d\n" % (MAGIC, FORMAT_VERSION, digest.encode(), len(payload))
    return header + payload


def decode(blob: bytes, where: str = "checkpoint") -> bytes:
    """Return the payload of ``blob`` after checking its header and checksum.

    Raises
    ------
    CorruptCheckpoint
        Naming what failed: header, version, length (truncation) or checksum.
    """
    head, sep, payload = blob.partition(b"\n")
    parts = head.split(b" ")
    if not sep or len(parts) != 4 or parts[0] != MAGIC:
        raise CorruptCheckpoint(f"{where}: not a checkpoint (bad header)")
    if parts[1] != str(FORMAT_VERSION).encode():
        raise CorruptCheckpoint(
            f"{where}: format version {parts[1]!r}, expected {FORMAT_VERSION}"
        )
    try:
        length = int(parts[3])
    except ValueError as e:
        raise CorruptCheckpoint(f"{where}: bad length in header") from e
    if len(payload) != length:
        raise CorruptCheckpoint(
            f"{where}: truncated or padded ({len(payload)} of {length} bytes)"
        )
    if hashlib.sha256(payload).hexdigest().encode() != parts[2]:
        raise CorruptCheckpoint(f"{where}: SHA-256 mismatch (corrupted)")
    return payload


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsync'ed temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_checkpoint(path: Path) -> Checkpoint:
    """Load and verify one checkpoint file."""
    payload = decode(path.read_bytes(), str(path))
    data = pickle.loads(payload)  # noqa: S301 - our own file, checksum verified
    return Checkpoint(
        round=int(data["round"]),
        arrays=data["arrays"],
        parts=data.get("parts", {}),
        config=data.get("config", {}),
        path=path,
    )


# ---------------------------------------------------------------- checkpointer
class Checkpointer:
    """Saves and restores named state parts and the global model, per round.

    Parameters
    ----------
    directory : Path
        Where ``ckpt-<round>.bin`` files go (created).
    keep : int
        How many of the latest checkpoints to keep (>= 2, so that a corrupted latest
        one still leaves one to fall back to).
    config : dict
        The run's flat config, stored with each checkpoint to refuse a resume under
        a different config.
    """

    def __init__(
        self, directory: Path, keep: int = 2, config: dict[str, Any] | None = None
    ) -> None:
        if keep < 2:
            raise ValueError(f"checkpoint keep={keep} must be >= 2")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(".ckpt-*"):  # a write killed midway
            log.warning("removing the unfinished checkpoint write %s", stale.name)
            stale.unlink(missing_ok=True)
        self.keep = keep
        self.config = dict(config or {})
        self.parts: dict[str, Stateful] = {}
        self.pins: list[Callable[[], Iterable[int]]] = []
        self.saved = 0
        self.save_seconds: list[float] = []
        self.last_bytes = 0
        self.corrupt_skipped = 0

    def register(self, name: str, part: Stateful) -> None:
        """Save ``part``'s state under ``name`` in every checkpoint."""
        if name in self.parts:
            raise ValueError(f"checkpoint part {name!r} registered twice")
        self.parts[name] = part

    def pin(self, rounds: Callable[[], Iterable[int]]) -> None:
        """Keep the checkpoints of the rounds ``rounds()`` returns when pruning."""
        self.pins.append(rounds)

    def path_for(self, server_round: int) -> Path:
        """Return the file of round ``server_round``'s checkpoint."""
        return self.directory / f"ckpt-{server_round:06d}.bin"

    def save(self, server_round: int, arrays: dict[str, Any]) -> Path:
        """Write the checkpoint of ``server_round`` atomically; prune old ones."""
        t0 = time.perf_counter()
        data = {
            "round": server_round,
            "arrays": arrays,
            "parts": {n: p.state_dict() for n, p in self.parts.items()},
            "config": self.config,
        }
        blob = encode(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
        path = self.path_for(server_round)
        write_atomic(path, blob)
        self._prune()
        self.saved += 1
        self.last_bytes = len(blob)
        self.save_seconds.append(time.perf_counter() - t0)
        return path

    def rounds(self) -> list[int]:
        """Return the rounds with a checkpoint file, oldest first."""
        found = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def load(self, server_round: int) -> Checkpoint:
        """Load round ``server_round``'s checkpoint (verified)."""
        return read_checkpoint(self.path_for(server_round))

    def latest(self) -> Checkpoint | None:
        """Return the newest valid checkpoint; skip corrupted ones with a warning."""
        for r in reversed(self.rounds()):
            try:
                return self.load(r)
            except (CorruptCheckpoint, pickle.UnpicklingError, EOFError) as e:
                self.corrupt_skipped += 1
                log.warning("checkpoint of round %d unusable (%s); trying older", r, e)
        return None

    def restore(self, ckpt: Checkpoint) -> None:
        """Hand each registered part its saved state.

        Raises
        ------
        CheckpointError
            If a registered part has no state in the checkpoint.
        """
        missing = sorted(set(self.parts) - set(ckpt.parts))
        if missing:
            raise CheckpointError(
                f"checkpoint {ckpt.path} lacks the state of {missing}; it was "
                "written by a run with other components"
            )
        for name, part in self.parts.items():
            part.load_state_dict(ckpt.parts[name])

    def stats(self) -> dict[str, Any]:
        """Return counts, size and timing (for ``summary.json``)."""
        secs = sorted(self.save_seconds)
        return {
            "saved": self.saved,
            "last_bytes": self.last_bytes,
            "corrupt_skipped": self.corrupt_skipped,
            "save_s_median": secs[len(secs) // 2] if secs else 0.0,
            "save_s_total": round(sum(secs), 6),
        }

    def _prune(self) -> None:
        rounds = self.rounds()
        keep = set(rounds[-self.keep :])
        for pinned in self.pins:
            keep.update(pinned())
        for r in rounds:
            if r not in keep:
                self.path_for(r).unlink(missing_ok=True)


# ---------------------------------------------------------------- config check
#: Keys that may differ between the original run and its resume.
RESUMABLE_DIFFERENCES = frozenset(
    {"output_dir", "run_name", "resume", "round_timeout_s", "client_cpus"}
)


def config_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Return ``key: saved != current`` for every key that must match and does not."""
    keys = (set(saved) | set(current)) - RESUMABLE_DIFFERENCES
    return [
        f"{k}: {saved.get(k, '<absent>')!r} != {current.get(k, '<absent>')!r}"
        for k in sorted(keys)
        if saved.get(k, "<absent>") != current.get(k, "<absent>")
    ]
