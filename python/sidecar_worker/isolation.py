"""Finding the items that raise, inside the worker, when ``predict(batch)`` raises for a batch.

The supervisor used to bisect a raising batch through round trips: every half a new batch, a new
message, a new handler call. Here the items are already decoded, so a half costs one handler call
and nothing else. The plan for a batch is a generator of sub-batches to call (``plan``); the sync and
async drivers in ``batch`` run it, so both handler kinds share one policy:

- **bisection** while failures are sparse: a batch of 64 with one raising item costs 12 calls;
- **item by item** when most items fail (bisecting would cost 2n - 1 calls, one by one costs n),
  decided from the recent batches' failure density, and inside a batch for a range whose both
  halves raised;
- **fail fast** once several batches in a row failed for every item: the batch's error goes to
  every item at once, and one probe call (the first item alone) per batch checks whether items
  succeed again; the first that does ends it.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Generator, List, Tuple, Union

logger = logging.getLogger("sidecar.worker")

# Batches in a row whose every item failed before isolation stops (fail fast).
FAIL_FAST_AFTER = 3
# Mean failing fraction of recent isolated batches above which items go one by one from the start:
# bisecting k raising items of n costs about 2k·log2(n/k) calls, one by one n; they meet near k = n/4.
DENSE_FRACTION = 0.25


@dataclass
class Raised:
    """An item whose handler call raised on its own."""

    error: BaseException


Outcome = Union[Tuple[bool, Any], Tuple[bool, BaseException]]
# What a plan yields: a sub-batch's bounds; what it is sent back: (True, one result per item of the
# sub-batch, already checked by the driver) or (False, the exception its call raised).
Plan = Generator[Tuple[int, int], Outcome, List[Any]]


@dataclass
class Isolator:
    """One handler's isolation state: how dense recent failures were, and whether it fails fast."""

    recent: Deque[float] = field(default_factory=lambda: deque(maxlen=8))
    all_failed_in_a_row: int = 0
    fail_fast: bool = False

    @property
    def dense(self) -> bool:
        return bool(self.recent) and sum(self.recent) / len(self.recent) > DENSE_FRACTION

    def plan(self, count: int) -> Plan:
        """The sub-batches to call for a batch of `count` items whose whole call raised; returns
        one entry per item: its result, or ``Raised``."""
        out: List[Any] = [None] * count
        if count == 1:
            raise AssertionError("a lone item needs no isolation")
        dense = self.dense
        # Ranges still to call, the next on top.
        stack: List[Tuple[int, int]] = []
        if dense:
            stack = [(i, i + 1) for i in reversed(range(count))]
        else:
            mid = count // 2
            stack = [(mid, count), (0, mid)]
        failed = 0
        while stack:
            lo, hi = stack.pop()
            ok, value = yield lo, hi
            if ok:
                assert not isinstance(value, BaseException)
                out[lo:hi] = list(value)
                continue
            if hi - lo == 1:
                out[lo] = Raised(value)
                failed += 1
                continue
            if hi - lo <= 4:
                # Bisecting 4 items costs up to 6 calls; one by one, 4.
                stack.extend((i, i + 1) for i in reversed(range(lo, hi)))
            else:
                mid = (lo + hi) // 2
                stack.extend([(mid, hi), (lo, mid)])
        self._record(failed, count)
        return out

    def _record(self, failed: int, count: int) -> None:
        self.recent.append(failed / count)
        if failed == count:
            self.all_failed_in_a_row += 1
            if self.all_failed_in_a_row >= FAIL_FAST_AFTER and not self.fail_fast:
                self.fail_fast = True
                logger.warning(
                    "the last %d batches failed for every item: items now get the batch's error without isolation "
                    "(one probe call per batch checks whether they succeed again)",
                    self.all_failed_in_a_row,
                )
        else:
            self.succeeded()

    def succeeded(self) -> None:
        """A batch (or the probe) succeeded: back to normal."""
        self.all_failed_in_a_row = 0
        if self.fail_fast:
            self.fail_fast = False
            logger.warning("items succeed again: raising batches are isolated item by item again")
