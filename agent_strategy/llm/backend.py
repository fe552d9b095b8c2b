"""One LLM request through litellm, with per-backend structured output and retries.

Structured-output modes (:func:`choose_mode` picks one unless the caller names it):

``json_schema``
    ``response_format={"type": "json_schema", ...}``: OpenAI, Azure, Anthropic
    (litellm turns it into a forced tool call), Gemini/Vertex, Ollama, vLLM, and any
    model litellm knows to support response schemas.
``json_object``
    ``response_format={"type": "json_object", "schema": ...}``: OpenAI-compatible local
    servers (``openai/<alias>`` with an ``api_base`` that is not api.openai.com), e.g.
    llama.cpp / llama-cpp-python, whose server answers HTTP 500 to ``json_schema``.
``tool``
    a forced call of one function whose parameters are the schema, for models that
    support function calling but not response schemas.
``none``
    no constraint; the prompt alone asks for JSON.

:class:`Backend` sends exactly one request per :meth:`Backend.complete`
(``num_retries=0``, so neither litellm nor the OpenAI SDK retries silently);
:func:`call_with_retries` owns the retries: bounded attempts, exponential backoff, and
only for transient errors (timeouts, connection errors, 429, 5xx).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import urlparse

import httpx
import litellm
import openai

from .budget import Usage

log = logging.getLogger(__name__)
# litellm prints a "Give Feedback / Get Help" banner on every exception; this module
# reports each failure as one classified line instead.
litellm.suppress_debug_info = True

StructuredMode = Literal["json_schema", "json_object", "tool", "none"]
ErrorKind = Literal[
    "timeout",
    "connection",
    "rate_limit",
    "server_error",
    "auth",
    "not_found",
    "bad_request",
    "context_window",
    "empty",
    "backend",
]
TRANSIENT: frozenset[str] = frozenset(
    {"timeout", "connection", "rate_limit", "server_error"}
)
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0"})
_SCHEMA_PROVIDERS = frozenset(
    {
        "openai",
        "azure",
        "anthropic",
        "gemini",
        "vertex_ai",
        "ollama",
        "ollama_chat",
        "hosted_vllm",
        "lm_studio",
    }
)
T = TypeVar("T")


class BackendError(RuntimeError):
    """A request failed; ``kind`` says how, ``retryable`` whether to try again.

    Parameters
    ----------
    kind : str
        One of :data:`ErrorKind`.
    message : str
        One line describing the failure.
    status_code : int or None
        The HTTP status, when there was one.
    """

    def __init__(self, kind: ErrorKind, message: str, status_code: int | None = None):
        super().__init__(f"{kind}: {message}")
        self.kind: ErrorKind = kind
        self.message = message
        self.status_code = status_code

    @property
    def retryable(self) -> bool:
        """Return whether the failure is transient."""
        return self.kind in TRANSIENT


@dataclass(frozen=True)
class Completion:
    """The text of one answer and what it cost."""

    text: str
    usage: Usage
    cost_usd: float
    latency_s: float


def provider_of(model: str) -> str:
    """Return the litellm provider prefix of ``model`` (``""`` when there is none)."""
    try:
        _, provider, _, _ = litellm.get_llm_provider(model=model)
        return str(provider)
    except Exception:  # noqa: BLE001 - unknown provider: decided by the caller
        return model.split("/", 1)[0] if "/" in model else ""


def is_local_base(api_base: str | None) -> bool:
    """Return whether ``api_base`` points at this machine."""
    if not api_base:
        return False
    return (urlparse(api_base).hostname or "") in LOOPBACK_HOSTS


def choose_mode(model: str, api_base: str | None = None) -> StructuredMode:
    """Pick the structured-output mode for ``model`` served at ``api_base``.

    ``openai/...`` with an ``api_base`` that is not api.openai.com is an
    OpenAI-compatible server (llama.cpp, LM Studio, a proxy) and gets ``json_object``
    with a schema; known providers get ``json_schema``; models litellm knows to call
    functions get ``tool``; anything else ``json_object``.
    """
    provider = provider_of(model)
    host = urlparse(api_base).hostname if api_base else None
    if provider == "openai" and api_base and host != "api.openai.com":
        return "json_object"
    if provider in _SCHEMA_PROVIDERS or litellm.supports_response_schema(model):
        return "json_schema"
    try:
        if litellm.supports_function_calling(model):
            return "tool"
    except Exception:  # noqa: BLE001 - unknown model
        pass
    return "json_object"


def structured_kwargs(
    mode: StructuredMode, schema: dict[str, Any], provider: str = ""
) -> dict[str, Any]:
    """Return the ``litellm.completion`` keyword arguments that request ``schema``."""
    if mode == "json_schema":
        spec: dict[str, Any] = {"name": "decision", "schema": schema}
        if provider in {"openai", "azure"}:
            spec["strict"] = True
        return {"response_format": {"type": "json_schema", "json_schema": spec}}
    if mode == "json_object":
        return {"response_format": {"type": "json_object", "schema": schema}}
    if mode == "tool":
        tool = {
            "type": "function",
            "function": {
                "name": "decide",
                "description": "Return the decision for this round.",
                "parameters": schema,
            },
        }
        return {
            "tools": [tool],
            "tool_choice": {"type": "function", "function": {"name": "decide"}},
        }
    return {}


_CLASS_PREFIX = re.compile(r"^(?:\w*(?:Error|Exception|Timeout)\s*[:-]\s*)+")
PROBE_HINTS: dict[str, str] = {
    "connection": "is a server listening at the api_base?",
    "timeout": "the server did not answer in time; raise the timeout?",
    "auth": "check the API key",
    "not_found": "check the model name",
    "bad_request": "check the model string's provider prefix and parameters",
}


def _one_line(text: object, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    for prefix in ("litellm.", "OpenAIException - ", "Error code: "):
        line = line.replace(prefix, "")
    return _CLASS_PREFIX.sub("", line)[:limit]


_TIMEOUTS = (openai.APITimeoutError, httpx.TimeoutException, TimeoutError)
_CONNECTION_ERRORS = (openai.APIConnectionError, httpx.TransportError, ConnectionError)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """Yield ``exc`` and its causes / contexts, each once."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def classify(exc: BaseException) -> BackendError:
    """Map a litellm / OpenAI SDK exception to a :class:`BackendError`."""
    if isinstance(exc, BackendError):
        return exc
    status = getattr(exc, "status_code", None)
    msg = _one_line(exc)
    causes = list(_chain(exc))
    kind: ErrorKind
    if any(isinstance(c, _TIMEOUTS) for c in causes):
        kind = "timeout"
    elif any(isinstance(c, _CONNECTION_ERRORS) for c in causes):
        # litellm reports a refused connection as InternalServerError("Connection
        # error."); the cause chain holds the openai / httpx connection error.
        kind = "connection"
    elif isinstance(exc, openai.RateLimitError):
        kind = "rate_limit"
    elif isinstance(exc, litellm.ContextWindowExceededError):
        kind = "context_window"
    elif isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        kind = "auth"
    elif isinstance(exc, openai.NotFoundError):
        kind = "not_found"
    elif isinstance(exc, openai.BadRequestError | openai.UnprocessableEntityError):
        kind = "bad_request"
    elif isinstance(status, int) and status >= 500:
        kind = "server_error"
    elif status == 408:
        kind = "timeout"
    elif status == 429:
        kind = "rate_limit"
    elif status in (401, 403):
        kind = "auth"
    elif status == 404:
        kind = "not_found"
    elif isinstance(status, int) and 400 <= status < 500:
        kind = "bad_request"
    else:
        kind = "backend"
    return BackendError(kind, msg, status if isinstance(status, int) else None)


def register_zero_cost(model: str) -> None:
    """Register ``model`` (e.g. ``openai/smollm2``) with zero token prices.

    ``litellm.completion_cost`` then answers 0 for it instead of raising
    ``ModelNotMappedError``.
    """
    provider = model.split("/", 1)[0] if "/" in model else "openai"
    entry = {
        "input_cost_per_token": 0.0,
        "output_cost_per_token": 0.0,
        "cache_creation_input_token_cost": 0.0,
        "cache_read_input_token_cost": 0.0,
        "litellm_provider": provider,
        "mode": "chat",
    }
    litellm.register_model({model: entry})


def _cost(response: Any) -> float:
    try:
        cost = litellm.completion_cost(completion_response=response)
    except Exception:  # noqa: BLE001 - unknown price: 0, as documented
        return 0.0
    return float(cost) if cost and cost > 0 else 0.0


def _text(response: Any) -> str:
    message = response.choices[0].message
    calls = getattr(message, "tool_calls", None)
    if calls:
        return str(calls[0].function.arguments or "")
    return str(message.content or "")


class Backend:
    """Send chat requests to one model through litellm, one HTTP request per call.

    Parameters
    ----------
    model : str
        A litellm model string, e.g. ``"openai/gpt-4o-mini"``,
        ``"anthropic/claude-3-5-haiku-latest"``, ``"openai/smollm2"``.
    api_base : str or None
        The server's base URL (``http://127.0.0.1:8080/v1`` for a local server).
    api_key : str or None
        ``None`` uses the provider's environment variable; for a loopback
        ``api_base`` a placeholder key is sent.
    timeout_s : float
        Per-request timeout.
    mode : StructuredMode or None
        Structured-output mode; ``None`` picks one with :func:`choose_mode`.
    temperature : float
        Sampling temperature (0 for repeatable answers).
    max_tokens : int
        Upper bound on the answer's tokens.
    """

    def __init__(
        self,
        model: str,
        *,
        api_base: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 10.0,
        mode: StructuredMode | None = None,
        temperature: float = 0.0,
        max_tokens: int = 800,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.model = model
        self.api_base = api_base
        self.api_key = api_key
        if api_key is None and is_local_base(api_base):
            self.api_key = "sk-local"
        self.timeout_s = timeout_s
        self.provider = provider_of(model)
        self.mode: StructuredMode = mode or choose_mode(model, api_base)
        self.temperature = temperature
        self.max_tokens = max_tokens

    def complete(
        self, messages: list[dict[str, str]], schema: dict[str, Any] | None = None
    ) -> Completion:
        """Send one request and return the answer's text, usage and cost.

        Raises
        ------
        BackendError
            On any failure, classified by :func:`classify`; ``kind="empty"`` when the
            server answered with no text.
        """
        extra = structured_kwargs(self.mode, schema, self.provider) if schema else {}
        return self._request(messages, self.max_tokens, extra)

    def _request(
        self,
        messages: list[dict[str, str]],
        max_tokens: int,
        extra: dict[str, Any],
        allow_empty: bool = False,
    ) -> Completion:
        start = time.perf_counter()
        try:
            response = litellm.completion(
                model=self.model,
                messages=messages,
                api_base=self.api_base,
                api_key=self.api_key,
                timeout=self.timeout_s,
                num_retries=0,
                max_retries=0,
                temperature=self.temperature,
                max_tokens=max_tokens,
                drop_params=True,
                **extra,
            )
        except Exception as e:  # noqa: BLE001 - every failure is classified
            raise classify(e) from e
        latency = time.perf_counter() - start
        usage = getattr(response, "usage", None)
        text = _text(response)
        if not text.strip() and not allow_empty:
            raise BackendError("empty", "the server answered with no text")
        return Completion(
            text=text,
            usage=Usage(
                prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            ),
            cost_usd=_cost(response),
            latency_s=latency,
        )

    def missing_keys(self) -> list[str]:
        """Return the environment variables the provider needs but lacks."""
        if self.api_key is not None:
            return []
        try:
            env = litellm.validate_environment(model=self.model, api_base=self.api_base)
        except Exception:  # noqa: BLE001 - cannot tell: let the request say
            return []
        return list(env.get("missing_keys") or [])

    def probe(self) -> Completion:
        """Send one tiny request (8 tokens, no schema) and return its completion.

        Check :meth:`missing_keys` first: a provider without its key fails here
        with a less specific message.

        Raises
        ------
        BackendError
            As :meth:`complete`; :meth:`describe` turns it into one line.
        """
        messages = [{"role": "user", "content": 'Answer with the JSON {"ok": true}.'}]
        return self._request(messages, 8, {}, allow_empty=True)

    def describe(self, error: BackendError) -> str:
        """Return ``error`` as one line naming the model, the server and a hint."""
        where = f" at {self.api_base}" if self.api_base else ""
        hint = PROBE_HINTS.get(error.kind)
        detail = f"{error.message} ({hint})" if hint else error.message
        return f"{self.model}{where}: {error.kind}: {detail}"

    def __repr__(self) -> str:
        return (
            f"Backend(model={self.model!r}, api_base={self.api_base!r}, "
            f"mode={self.mode!r}, timeout_s={self.timeout_s})"
        )


def call_with_retries(
    call: Callable[[], T],
    *,
    max_attempts: int,
    backoff_s: float = 0.5,
    max_backoff_s: float = 8.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Return ``call()``, retrying transient :class:`BackendError` s.

    Attempt ``k`` (1-based) that fails transiently is followed by a pause of
    ``min(backoff_s * 2 ** (k - 1), max_backoff_s)`` seconds, up to ``max_attempts``
    attempts in all. Non-transient errors and other exceptions propagate at once.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    for attempt in range(1, max_attempts + 1):
        try:
            return call()
        except BackendError as e:
            if not e.retryable or attempt == max_attempts:
                raise
            pause = min(backoff_s * 2 ** (attempt - 1), max_backoff_s)
            log.info(
                "LLM attempt %d/%d failed (%s); retrying in %.2fs",
                attempt,
                max_attempts,
                e,
                pause,
            )
            sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover
