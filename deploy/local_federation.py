"""Run the app on a real SuperLink + SuperNodes on this machine, with TLS and node auth.

    python deploy/local_federation.py --workdir /tmp/fed --num-supernodes 3 \
        --run-config "num_rounds=2 num_clients=3 clients_per_round=3 ..."

Steps: generate credentials (``deploy/gen_certs.sh``) unless ``--certs`` holds them;
start ``flower-superlink`` with TLS and ``--enable-supernode-auth`` on 127.0.0.1 with
its database in the work dir; write the ``[superlink.NAME]`` entry of
``$FLWR_HOME/config.toml``; register every SuperNode public key (``flwr supernode
register``); start the SuperNodes, each with its own ``--node-config
"partition-id=I num-partitions=N"``, the CA certificate and its private key; wait until
all are online; ``flwr run . NAME --stream``; stop everything (also on Ctrl-C and on
errors). Logs go to ``WORKDIR/logs/``. The functions are reused by
``tests/test_deployment.py``. Python standard library + subprocess only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GEN_CERTS = ROOT / "deploy" / "gen_certs.sh"
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_OFFLINE_MODE": "true",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def tool(name: str) -> str:
    """Return the path of a Flower executable next to this interpreter (or on PATH)."""
    path = BIN / name
    return str(path) if path.exists() else name


def make_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """Return the environment for every Flower process of the federation."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env.update(
        FLWR_HOME=str(flwr_home),
        PYTHONPATH=os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.update(extra)
    return env


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait until something listens on 127.0.0.1:port; fail if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}: {proc.args!r}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.5),
        ):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def gen_certs(certs: Path, num_supernodes: int, key_bits: int = 4096) -> None:
    """Create CA, SuperLink certificate and SuperNode key pairs in ``certs``."""
    subprocess.run(
        ["bash", str(GEN_CERTS), str(certs), str(num_supernodes)],
        check=True,
        capture_output=True,
        env={**os.environ, "KEY_BITS": str(key_bits)},
    )


@dataclass
class Federation:
    """The processes and files of one local deployment."""

    workdir: Path
    certs: Path
    flwr_home: Path
    name: str = "local-tls"
    port: int = 0
    client_bin: Path | None = None
    procs: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)
    # SuperNode commands, to restart one whose free port was taken meanwhile.
    commands: dict[str, list[str]] = field(default_factory=dict)
    port_retries: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """The SuperLink address (Fleet and Control API share one HTTPS port)."""
        return f"127.0.0.1:{self.port}"

    @property
    def logs(self) -> Path:
        """Directory of the per-process log files."""
        return self.workdir / "logs"

    @property
    def env(self) -> dict[str, str]:
        """Environment of the Flower processes (FLWR_HOME, offline flags)."""
        return make_env(self.flwr_home)

    @property
    def client_env(self) -> dict[str, str]:
        """Environment of the SuperNodes: with ``client_bin``, that venv and no repo.

        The SuperNode starts ``flower-superexec`` and that ``flwr-clientapp`` from
        ``PATH``; without ``PYTHONPATH`` the ClientApp runs from the FAB that
        ``flwr run`` shipped, on the client venv's packages only.
        """
        if self.client_bin is None:
            return self.env
        env = {k: v for k, v in self.env.items() if k != "PYTHONPATH"}
        env["PATH"] = f"{self.client_bin}{os.pathsep}{os.environ.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.client_bin.parent)
        return env

    def log_of(self, name: str) -> str:
        """Return the log file of process ``name`` (empty if none)."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def spawn(
        self, name: str, cmd: Sequence[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in its own process group, logging to ``logs/NAME.log``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                list(cmd),
                cwd=ROOT,
                env=env if env is not None else self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    # ------------------------------------------------------------------ SuperLink
    def start_superlink(self, timeout: float = 30.0) -> None:
        """Start the SuperLink with TLS and SuperNode auth; write config.toml."""
        self.port = self.port or free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        proc = self.spawn(
            "superlink",
            [
                tool("flower-superlink"),
                "--ssl-ca-certfile",
                str(self.certs / "ca.crt"),
                "--ssl-certfile",
                str(self.certs / "server.pem"),
                "--ssl-keyfile",
                str(self.certs / "server.key"),
                "--enable-supernode-auth",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--database",
                str(self.workdir / "superlink.db"),
                "--disable-runtime-dependency-installation",
            ],
        )
        wait_for_port(self.port, proc, timeout)
        self.write_flwr_config()

    def write_flwr_config(self) -> Path:
        """Add (or replace) ``[superlink.NAME]`` in ``$FLWR_HOME/config.toml``."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        path = self.flwr_home / "config.toml"
        text = path.read_text() if path.exists() else ""
        header = f"[superlink.{self.name}]"
        kept, skip = [], False
        for line in text.splitlines():
            if line.strip().startswith("["):
                skip = line.strip() == header
            if not skip:
                kept.append(line)
        kept += [
            header,
            f'address = "{self.address}"',
            f'root-certificates = "{self.certs / "ca.crt"}"',
            "",
        ]
        path.write_text("\n".join(kept))
        return path

    def flwr(
        self, *args: str, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this federation's FLWR_HOME."""
        return subprocess.run(
            [tool("flwr"), *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def register(self, public_key: Path) -> None:
        """Register one SuperNode public key with the SuperLink."""
        proc = self.flwr("supernode", "register", str(public_key), self.name)
        if proc.returncode != 0:
            raise RuntimeError(
                f"flwr supernode register {public_key} failed "
                f"({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )

    def online_nodes(self) -> int:
        """Return how many SuperNodes the SuperLink lists as online."""
        proc = self.flwr("supernode", "list", self.name, "--format", "json")
        try:
            data = json.loads(proc.stdout)
        except json.JSONDecodeError:
            return 0
        nodes = data.get("nodes", []) if isinstance(data, dict) else []
        return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")

    # ------------------------------------------------------------------ SuperNodes
    def start_supernode(
        self,
        index: int,
        num_partitions: int,
        *,
        tls: bool = True,
        auth: bool = True,
        key: Path | None = None,
        name: str | None = None,
        extra: Sequence[str] = (),
        node_config: str = "",
    ) -> subprocess.Popen[bytes]:
        """Start SuperNode ``index`` (partition ``index`` of ``num_partitions``).

        ``tls=False`` passes ``--insecure``; ``auth=False`` omits the private key;
        ``key`` overrides ``CERTS/supernode_INDEX``; ``node_config`` is appended to
        ``--node-config`` (e.g. ``"data-path=/data threads=2"``). With
        ``client_bin`` set, the SuperNode runs from that (client-only) venv.
        """
        key = key if key is not None else self.certs / f"supernode_{index}"
        exe = (
            str(self.client_bin / "flower-supernode")
            if self.client_bin is not None
            else tool("flower-supernode")
        )
        cmd = [exe, "--superlink", self.address]
        cmd += (
            ["--root-certificates", str(self.certs / "ca.crt")]
            if tls
            else ["--insecure"]
        )
        if auth:
            cmd += ["--auth-supernode-private-key", str(key)]
        cmd += [
            "--node-config",
            f"partition-id={index} num-partitions={num_partitions} "
            f"{node_config}".strip(),
            "--port",
            str(free_port()),
            *extra,
        ]
        name = name or f"supernode_{index}"
        self.commands[name] = cmd
        return self.spawn(name, cmd, env=self.client_env)

    def _port_clash(self, name: str) -> bool:
        """Tell whether ``name``'s latest start failed because its port was taken."""
        clashes = sum(
            "address already in use" in line or "errno 98" in line
            for line in self.log_of(name).lower().splitlines()
        )
        return (
            clashes > 0
            and self.port_retries.get(name, 0) < 3
            and (clashes > self.port_retries.get(name, 0))
        )

    def wait_online(self, count: int, timeout: float = 60.0) -> None:
        """Wait until ``count`` SuperNodes are online."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.online_nodes() >= count:
                return
            for name, proc in list(self.procs.items()):
                if not name.startswith("supernode") or proc.poll() is None:
                    continue
                if name in self.commands and self._port_clash(name):
                    # Another process took the free port before the SuperNode bound
                    # it (machines shared with other jobs): start it on a new one.
                    self.port_retries[name] = self.port_retries.get(name, 0) + 1
                    cmd = self.commands[name]
                    cmd[cmd.index("--port") + 1] = str(free_port())
                    self.spawn(name, cmd, env=self.client_env)
                    continue
                raise RuntimeError(
                    f"{name} exited with {proc.returncode}; see "
                    f"{self.logs / (name + '.log')}:\n{self.log_of(name)[-1500:]}"
                )
            time.sleep(1.0)
        raise TimeoutError(f"fewer than {count} SuperNodes online after {timeout} s")

    # ------------------------------------------------------------------ run, stop
    def run_app(
        self, run_config: str, timeout: float = 600.0, echo: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """``flwr run . NAME --run-config ... --stream``, logged to logs/flwr_run.log.

        With ``echo`` the output is also printed as it arrives.
        """
        cmd = [tool("flwr"), "run", ".", self.name]
        if run_config:
            cmd += ["--run-config", run_config]
        cmd.append("--stream")
        self.logs.mkdir(parents=True, exist_ok=True)
        lines: list[str] = []
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.procs["flwr_run"] = proc
        deadline = time.monotonic() + timeout
        try:
            with open(self.logs / "flwr_run.log", "w") as log:
                assert proc.stdout is not None
                for line in proc.stdout:
                    lines.append(line)
                    log.write(line)
                    log.flush()
                    if echo:
                        sys.stdout.write(line)
                        sys.stdout.flush()
                    if time.monotonic() > deadline:
                        raise subprocess.TimeoutExpired(cmd, timeout)
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                self.stop("flwr_run")
            self.procs.pop("flwr_run", None)
        return subprocess.CompletedProcess(cmd, proc.returncode, "".join(lines), "")

    def stop(self, name: str, grace: float = 10.0) -> None:
        """SIGTERM the process group of ``name``, SIGKILL it after ``grace`` s."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        # Children (flwr-serverapp, flwr-clientapp) share the group: kill leftovers.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def kill(self, name: str) -> None:
        """SIGKILL the process group of ``name`` at once (a crash or power loss)."""
        proc = self.procs.get(name)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop_all(self) -> None:
        """Stop the SuperNodes first, then the SuperLink."""
        for name in sorted(self.procs, key=lambda n: n == "superlink"):
            self.stop(name)


@contextlib.contextmanager
def local_federation(
    workdir: Path,
    num_supernodes: int,
    *,
    certs: Path | None = None,
    flwr_home: Path | None = None,
    name: str = "local-tls",
    port: int = 0,
    key_bits: int = 4096,
    supernode_args: Sequence[str] = (),
    wait_s: float = 60.0,
    client_bin: Path | None = None,
    node_configs: Sequence[str] = (),
) -> Iterator[Federation]:
    """Start SuperLink + registered SuperNodes; stop all of them on exit.

    ``client_bin`` runs the SuperNodes from another (client-only) venv's ``bin``;
    ``node_configs[i]`` is added to SuperNode i's ``--node-config``.
    """
    workdir = workdir.resolve()
    certs = (certs or workdir / "certs").resolve()
    if not (certs / "ca.crt").exists() or not all(
        (certs / f"supernode_{i}").exists() for i in range(num_supernodes)
    ):
        gen_certs(certs, num_supernodes, key_bits)
    fed = Federation(
        workdir=workdir,
        certs=certs,
        flwr_home=(flwr_home or workdir / "flwr_home").resolve(),
        name=name,
        port=port,
        client_bin=client_bin.resolve() if client_bin is not None else None,
    )
    try:
        fed.start_superlink()
        for i in range(num_supernodes):
            fed.register(certs / f"supernode_{i}.pub")
        for i in range(num_supernodes):
            fed.start_supernode(
                i,
                num_supernodes,
                extra=supernode_args,
                node_config=node_configs[i] if i < len(node_configs) else "",
            )
        fed.wait_online(num_supernodes, timeout=wait_s)
        yield fed
    finally:
        fed.stop_all()


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status of ``flwr run``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=None, help="db, logs, certs")
    p.add_argument("--certs", type=Path, default=None, help="default WORKDIR/certs")
    p.add_argument("--num-supernodes", type=int, default=3)
    p.add_argument("--name", default="local-tls", help="superlink entry name")
    p.add_argument("--port", type=int, default=0, help="SuperLink port; 0 = free")
    p.add_argument("--run-config", default="", help="passed to flwr run")
    p.add_argument("--flwr-home", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=3600.0, help="for flwr run")
    p.add_argument(
        "--client-venv",
        type=Path,
        default=None,
        help="run the SuperNodes from this (client-only) venv",
    )
    p.add_argument(
        "--node-config",
        action="append",
        default=[],
        help="extra node config of SuperNode I (repeat, in order), e.g. data-path=..",
    )
    a = p.parse_args(argv)

    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="agentfl-fed-"))
    print(f"logs: {workdir.resolve() / 'logs'}", flush=True)
    # Ctrl-C raises KeyboardInterrupt; turn SIGTERM into the same clean exit.
    # (SIGINT too: a shell starts background jobs with SIGINT ignored.)
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with local_federation(
            workdir,
            a.num_supernodes,
            certs=a.certs,
            flwr_home=a.flwr_home,
            name=a.name,
            port=a.port,
            client_bin=a.client_venv / "bin" if a.client_venv else None,
            node_configs=a.node_config,
        ) as fed:
            print(
                f"SuperLink https://{fed.address} (TLS, node auth), "
                f"{a.num_supernodes} SuperNodes online; FLWR_HOME={fed.flwr_home}",
                flush=True,
            )
            t0 = time.monotonic()
            proc = fed.run_app(a.run_config, timeout=a.timeout, echo=True)
            print(
                f"flwr run exited {proc.returncode} after "
                f"{time.monotonic() - t0:.1f} s",
                flush=True,
            )
            return proc.returncode
    except KeyboardInterrupt:
        print("interrupted; everything stopped", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, subprocess.SubprocessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        print(f"logs: {workdir.resolve() / 'logs'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
