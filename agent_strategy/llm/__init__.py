"""The LLM policy: an :class:`Observation` answered by an LLM through litellm.

Modules, one concern each: :mod:`.prompt` (observation -> chat messages within a
context budget), :mod:`.answer` (schema, parsing, semantic validation, conversion to a
``Decision``), :mod:`.backend` (structured output per backend, one request, retries),
:mod:`.budget` (caps on calls, tokens, cost), :mod:`.policy` (:class:`LLMPolicy`, which
never raises and falls back to a deterministic policy), :mod:`.router`
(:class:`PolicyRouter`, one policy per decision type) and :mod:`.local_server`
(SmolLM2 served by llama-cpp-python, for runs without internet).

Importing this package imports litellm. So that the import makes no network attempt,
``LITELLM_LOCAL_MODEL_COST_MAP=True`` (use the price map bundled with litellm rather
than fetching one) and ``LITELLM_OFFLINE_MODE=true`` are set unless the environment
already says otherwise.
"""

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")

from .answer import AggregateAnswer, InvalidAnswer, TrainAnswer, answer_schema
from .backend import Backend, BackendError, Completion, choose_mode
from .budget import Budget, BudgetExhausted, Usage
from .local_server import LocalModelServer, LocalServerError, local_model_available
from .policy import CallRecord, LLMPolicy
from .prompt import PromptTooLarge, RenderedPrompt, RoundSummary, render_prompt
from .router import PolicyRouter

__all__ = [
    "AggregateAnswer",
    "Backend",
    "BackendError",
    "Budget",
    "BudgetExhausted",
    "CallRecord",
    "Completion",
    "InvalidAnswer",
    "LLMPolicy",
    "LocalModelServer",
    "LocalServerError",
    "PolicyRouter",
    "PromptTooLarge",
    "RenderedPrompt",
    "RoundSummary",
    "TrainAnswer",
    "Usage",
    "answer_schema",
    "choose_mode",
    "local_model_available",
    "render_prompt",
]
