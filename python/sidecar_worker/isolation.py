"""Finding the items that raise, inside the worker, when ``predict(batch)`` raises for a batch.

The supervisor used to bisect a raising batch through round trips: every half a new batch, a new
message, a new handler call. Here the items are already decoded, so a half costs one handler call
and nothing else. The plan for a batch is a generator of sub-batches to call (``plan``); the sync and
async drivers in ``batch`` run it, so both handler kinds share one policy:

- **bisection** while failures are sparse: a batch of 64 with one raising item costs 7 to 12 calls
  (a half that did not raise tells that its sibling does, so the sibling is split without a call);
- **item by item** when many items fail (bisecting would cost up to 2n - 1 calls, one by one
  costs n), decided from the recent batches' failure density;
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
        # Ranges still to call, the next on top: (lo, hi, raises) where `raises` means the range is
        # known to raise (its parent raised and its left sibling did not), so it is split at once
        # instead of called: a lone raising item costs about log2(n) calls, not 2·log2(n). Only lone
        # items are always called (their own exception is their answer), so a handler that raised
        # for the whole batch but not for its parts still gets every item answered.
        stack: List[Tuple[int, int, bool]] = []
        if dense:
            stack = [(i, i + 1, False) for i in reversed(range(count))]
        else:
            stack = _halves(0, count)
        failed = 0
        while stack:
            lo, hi, raises = stack.pop()
            if raises and hi - lo > 1:
                stack.extend(_halves(lo, hi))
                continue
            ok, value = yield lo, hi
            if ok:
                assert not isinstance(value, BaseException)
                out[lo:hi] = list(value)
                if stack and stack[-1][0] == hi and _is_right_sibling(stack[-1], lo, hi):
                    # Our parent raised and we did not: our sibling does.
                    right = stack.pop()
                    stack.append((right[0], right[1], True))
                continue
            if hi - lo == 1:
                out[lo] = Raised(value)
                failed += 1
                continue
            stack.extend(_halves(lo, hi))
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


def _halves(lo: int, hi: int) -> List[Tuple[int, int, bool]]:
    """A raising range's halves, pushed right first so the left is called first; the left is not
    known to raise (either may hold the culprit), the right is decided by the left's outcome."""
    mid = (lo + hi) // 2
    return [(mid, hi, False), (lo, mid, False)]


def _is_right_sibling(entry: Tuple[int, int, bool], lo: int, hi: int) -> bool:
    """`entry` is the right half of the range [lo, 2·hi - lo) split by ``_halves`` (same parent)."""
    right_lo, right_hi, _ = entry
    parent = (lo, right_hi)
    return right_lo == hi and (parent[0] + parent[1]) // 2 == hi
