"""Start Flower's own round loop at round ``k + 1`` (resume, without a new loop).

``Strategy.start`` runs rounds ``1..num_rounds`` and calls ``evaluate_fn(0, ...)``
first. :class:`RoundOffset` wraps any strategy and adds ``offset`` to every round
number it passes on, so ``RoundOffset(s, k).start(num_rounds=n - k, ...)`` runs the
original rounds ``k + 1..n`` through Flower's unchanged loop; :func:`offset_evaluate`
does the same for the evaluate function and skips the initial evaluation (round
``k`` was evaluated before the checkpoint). ``before_aggregate`` is called with the
round number once the train replies are in (a test hook kills the process there).
Client-side training is seeded by the
server round it receives, so the numbers must be the original ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class RoundOffset(Strategy):
    """Delegate to ``inner`` with round numbers shifted by ``offset``."""

    def __init__(
        self,
        inner: Strategy,
        offset: int,
        before_aggregate: Callable[[int], None] | None = None,
    ) -> None:
        if offset < 0:
            raise ValueError(f"round offset must be >= 0, got {offset}")
        self.inner = inner
        self.offset = offset
        self.before_aggregate = before_aggregate

    def summary(self) -> None:
        """Delegate."""
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate with the original round number."""
        return self.inner.configure_train(
            server_round + self.offset, arrays, config, grid
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegate with the original round number (after the optional hook)."""
        replies = list(replies)
        if self.before_aggregate is not None:
            self.before_aggregate(server_round + self.offset)
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate with the original round number."""
        return self.inner.configure_evaluate(
            server_round + self.offset, arrays, config, grid
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate with the original round number."""
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)


def offset_evaluate(fn: EvaluateFn, offset: int) -> EvaluateFn:
    """Return ``fn`` with rounds shifted by ``offset``; no initial call if resumed."""
    if offset == 0:
        return fn

    def shifted(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        return fn(server_round + offset, arrays)

    return shifted
