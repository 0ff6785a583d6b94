"""Specifications of the model thread's dynamic batching (`serving.batcher`), without a model.

Each test lines its items up behind a gate before the batcher may take them, so what is batched
with what never depends on timing.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import CancelledError, Future

import pytest

from cxrfusion.serving.batcher import Batcher

PATIENT_S = 60.0  # a batch closes by filling up long before this


class Model:
    """Doubles numbers, recording each call's batch. A call says it has begun (`entered`) and
    waits for `gate`, so that the test can queue items behind it; a batch holding `poison`
    fails."""

    def __init__(self, poison: int | None = None) -> None:
        self.calls: list[list[int]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.poison = poison

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.entered.set()
        if not self.gate.wait(timeout=PATIENT_S):
            raise RuntimeError("the test never opened the gate")
        self.calls.append(list(items))
        if self.poison in items:
            raise ValueError(f"cannot take {self.poison}")
        return [2 * item for item in items]


def holding(model: Model, batcher: Batcher, item: int) -> Future:
    """Submit `item` and return once the model holds it (alone) at the closed gate."""
    model.gate.clear()
    model.entered.clear()
    future = batcher.submit(item)
    assert model.entered.wait(timeout=PATIENT_S)
    return future


def lined_up(model: Model, batcher: Batcher, items: list[int]) -> list[Future]:
    """Queue `items` behind a first item that holds the model; then open the gate."""
    first = holding(model, batcher, -1)
    futures = [batcher.submit(item) for item in items]
    model.gate.set()
    first.result(timeout=PATIENT_S)
    return futures


def test_waiting_items_are_gathered_into_batches_of_at_most_max_batch() -> None:
    model = Model()
    batcher = Batcher(model, max_batch=4, max_wait_s=0.0)
    futures = lined_up(model, batcher, list(range(10)))
    assert [f.result(timeout=PATIENT_S) for f in futures] == [2 * i for i in range(10)]
    assert model.calls == [[-1], [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    batcher.close()


def test_the_first_item_waits_up_to_max_wait_for_others_to_join() -> None:
    model = Model()
    model.gate.set()
    batcher = Batcher(model, max_batch=3, max_wait_s=PATIENT_S)
    futures = [batcher.submit(item) for item in (1, 2, 3)]  # the third fills the batch: no wait
    assert [f.result(timeout=PATIENT_S) for f in futures] == [2, 4, 6]
    assert model.calls == [[1, 2, 3]]
    batcher.close()


def test_max_batch_1_runs_every_item_alone_in_arrival_order() -> None:
    model = Model()
    batcher = Batcher(model, max_batch=1, max_wait_s=PATIENT_S)
    futures = lined_up(model, batcher, [1, 2, 3])
    assert [f.result(timeout=PATIENT_S) for f in futures] == [2, 4, 6]
    assert model.calls == [[-1], [1], [2], [3]]
    batcher.close()


def test_a_failing_item_fails_only_its_own_future() -> None:
    model = Model(poison=2)
    batcher = Batcher(model, max_batch=4, max_wait_s=0.0)
    futures = lined_up(model, batcher, [1, 2, 3])
    assert futures[0].result(timeout=PATIENT_S) == 2
    with pytest.raises(ValueError, match="cannot take 2"):
        futures[1].result(timeout=PATIENT_S)
    assert futures[2].result(timeout=PATIENT_S) == 6
    assert model.calls == [[-1], [1, 2, 3], [1], [2], [3]]  # the batch, then each alone
    batcher.close()


def test_a_cancelled_item_is_left_out_and_close_cancels_the_waiting_ones() -> None:
    model = Model()
    batcher = Batcher(model, max_batch=4, max_wait_s=0.0)
    first = holding(model, batcher, -1)
    cancelled, kept = batcher.submit(1), batcher.submit(2)
    assert cancelled.cancel()
    model.gate.set()
    assert kept.result(timeout=PATIENT_S) == 4 and first.result() == -2
    assert model.calls == [[-1], [2]]

    held = holding(model, batcher, 3)
    waiting = batcher.submit(4)
    batcher.close()
    model.gate.set()
    assert held.result(timeout=PATIENT_S) == 6  # the running batch finishes
    with pytest.raises(CancelledError):
        waiting.result(timeout=PATIENT_S)
    assert batcher.submit(5).cancelled()
    assert model.calls == [[-1], [2], [3]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch": 0, "max_wait_s": 0.0}, "max_batch"),
        ({"max_batch": 1, "max_wait_s": -1}, "max_wait_s"),
    ],
)
def test_invalid_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Batcher(Model(), **kwargs)
