"""An in-process publish/subscribe hub with typed topics and bounded queues.

The strategy's round recorder publishes a :class:`~orchestration.topics.RoundReport`
per round; the monitor, planner, checkpointer and loggers subscribe to the topics
(classes) they need. Each subscriber chooses how it is delivered to:

``inline``
    called in the publisher's thread, before :meth:`Hub.publish` returns. For the
    subscribers whose work must be finished before the next round starts (the
    checkpointer, the monitor and planner, the results file); their cost is on the
    training path and is measured (``experiments/bench_checkpoint.py``).
``block``
    a bounded queue drained by the subscriber's own thread; when the queue is full
    the publisher waits (nothing is lost, a slow subscriber slows training).
``drop_oldest``
    a bounded queue drained by the subscriber's own thread; when the queue is full
    the oldest message is dropped and counted (a slow subscriber never stalls
    training).

A handler that raises is logged and counted; it never reaches the publisher.
:meth:`Hub.stats` returns per-topic and per-subscriber counters for ``summary.json``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal, TypeVar

log = logging.getLogger("agentfl.hub")

Delivery = Literal["inline", "block", "drop_oldest"]
DELIVERIES: tuple[Delivery, ...] = ("inline", "block", "drop_oldest")
T = TypeVar("T")


class _Subscriber:
    """One subscription: its queue, worker thread and counters."""

    def __init__(
        self,
        name: str,
        topic: type,
        handler: Callable[[Any], None],
        delivery: Delivery,
        maxsize: int,
    ) -> None:
        self.name = name
        self.topic = topic
        self.handler = handler
        self.delivery = delivery
        self.maxsize = maxsize
        self.queue: deque[Any] = deque()
        self.cond = threading.Condition()
        self.busy = False
        self.closed = False
        self.offered = 0
        self.delivered = 0
        self.dropped = 0
        self.errors = 0
        self.blocked_s = 0.0
        self.max_depth = 0
        self.thread: threading.Thread | None = None
        if delivery != "inline":
            self.thread = threading.Thread(
                target=self._work, name=f"hub-{name}", daemon=True
            )
            self.thread.start()

    def offer(self, message: Any) -> None:
        self.offered += 1
        if self.delivery == "inline":
            self._call(message)
            return
        with self.cond:
            if self.delivery == "block":
                t0 = time.perf_counter()
                while len(self.queue) >= self.maxsize and not self.closed:
                    self.cond.wait()
                self.blocked_s += time.perf_counter() - t0
            elif len(self.queue) >= self.maxsize:
                self.queue.popleft()
                self.dropped += 1
            self.queue.append(message)
            self.max_depth = max(self.max_depth, len(self.queue))
            self.cond.notify_all()

    def _call(self, message: Any) -> None:
        try:
            self.handler(message)
            self.delivered += 1
        except Exception:  # noqa: BLE001 - a subscriber never fails the publisher
            self.errors += 1
            log.exception("hub subscriber %s failed on %s", self.name, self.topic)

    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if not self.queue:
                    return
                message = self.queue.popleft()
                self.busy = True
                self.cond.notify_all()
            self._call(message)
            with self.cond:
                self.busy = False
                self.cond.notify_all()

    def idle(self) -> bool:
        return not self.queue and not self.busy

    def stats(self) -> dict[str, Any]:
        return {
            "topic": self.topic.__name__,
            "delivery": self.delivery,
            "maxsize": self.maxsize,
            "offered": self.offered,
            "delivered": self.delivered,
            "dropped": self.dropped,
            "errors": self.errors,
            "pending": len(self.queue),
            "max_depth": self.max_depth,
            "publisher_blocked_s": round(self.blocked_s, 6),
        }


class Hub:
    """Typed publish/subscribe with per-subscriber backpressure.

    Parameters
    ----------
    maxsize : int
        Default queue bound of ``block`` and ``drop_oldest`` subscribers.
    """

    def __init__(self, maxsize: int = 64) -> None:
        if maxsize < 1:
            raise ValueError(f"hub maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._subs: list[_Subscriber] = []
        self._published: dict[str, int] = {}
        self._lock = threading.Lock()

    def subscribe(
        self,
        topic: type[T],
        handler: Callable[[T], None],
        *,
        name: str,
        delivery: Delivery = "block",
        maxsize: int | None = None,
    ) -> None:
        """Deliver every published ``topic`` (or subclass) value to ``handler``.

        Inline subscribers are called in subscription order, before queued ones.

        Raises
        ------
        ValueError
            For an unknown ``delivery``, a queue bound below 1 or a duplicate name.
        """
        if delivery not in DELIVERIES:
            raise ValueError(
                f"subscriber {name!r}: delivery={delivery!r}; allowed: {DELIVERIES}"
            )
        size = self.maxsize if maxsize is None else maxsize
        if size < 1:
            raise ValueError(f"subscriber {name!r}: maxsize={size} must be >= 1")
        if any(s.name == name for s in self._subs):
            raise ValueError(f"a subscriber named {name!r} already exists")
        sub = _Subscriber(name, topic, handler, delivery, size)
        with self._lock:
            self._subs.append(sub)
            self._subs.sort(key=lambda s: s.delivery != "inline")

    def publish(self, message: object) -> None:
        """Hand ``message`` to every subscriber of its type."""
        key = type(message).__name__
        with self._lock:
            self._published[key] = self._published.get(key, 0) + 1
            subs = [s for s in self._subs if isinstance(message, s.topic)]
        for sub in subs:
            sub.offer(message)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queue is empty and idle; return False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for sub in self._subs:
            with sub.cond:
                while not sub.idle():
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    sub.cond.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Drain (up to ``timeout`` seconds), then stop the worker threads."""
        if not self.drain(timeout):
            log.warning("hub: subscribers still busy after %.0fs; closing", timeout)
        for sub in self._subs:
            with sub.cond:
                sub.closed = True
                sub.cond.notify_all()
        for sub in self._subs:
            if sub.thread is not None:
                sub.thread.join(timeout=1.0)

    def stats(self) -> dict[str, Any]:
        """Return published counts per topic and counters per subscriber."""
        return {
            "published": dict(self._published),
            "subscribers": {s.name: s.stats() for s in self._subs},
        }
