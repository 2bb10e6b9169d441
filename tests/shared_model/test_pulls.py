"""shared_model/contract/pulls.py: a message's object that is not there yet is asked for
again after 20 ms, doubling up to 0.25 s, where Flower waits 1 s, doubling up to 10 s.
The waits are recorded, not slept (Flower's `pull_objects` waits on a threading.Event)."""

from __future__ import annotations

import threading
import types

import pytest
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects

from shared_model.contract import pulls


class _NoteWaits(threading.Event):
    """An Event whose waits are noted and return at once."""

    waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        _NoteWaits.waits.append(float(timeout or 0.0))
        return self.is_set()


@pytest.fixture()
def noted_waits(monkeypatch) -> list[float]:
    _NoteWaits.waits = []
    monkeypatch.setattr(inflatable_utils, "threading",
                        types.SimpleNamespace(Event=_NoteWaits, Lock=threading.Lock))
    return _NoteWaits.waits


def _arrives_on_try(n: int):
    tries = []

    def pull(object_id: str) -> bytes:
        tries.append(object_id)
        if len(tries) < n:
            raise ObjectUnavailableError(object_id)
        return b"arrays"
    return pull


def test_a_late_object_is_asked_for_again_within_a_quarter_second(noted_waits):
    # Execute: the object is there from the 7th try on
    out = pulls.prompt(pull_objects)(["obj"], _arrives_on_try(7))
    # Assert: 20 ms, doubling (+-20% jitter, Flower's), capped at 0.25 s
    assert out == {"obj": b"arrays"}
    expected = [0.02, 0.04, 0.08, 0.16, 0.25, 0.25]
    assert len(noted_waits) == len(expected)
    for wait, nominal in zip(noted_waits, expected, strict=True):
        assert nominal * 0.8 <= wait <= nominal * 1.2


def test_flowers_own_first_wait_is_a_second(noted_waits):
    # what `prompt` is for: Flower's defaults on the same late object
    pull_objects(["obj"], _arrives_on_try(2))
    assert len(noted_waits) == 1 and 0.8 <= noted_waits[0] <= 1.2


def test_there_is_no_cap_on_the_tries_only_flowers_on_the_time(noted_waits):
    # Flower gives up on an object after 500 tries; asked every 0.25 s that would be two
    # minutes, less than a slow link may take to bring a large model to the SuperNode
    out = pulls.prompt(pull_objects)(["obj"], _arrives_on_try(600))
    assert out == {"obj": b"arrays"} and len(noted_waits) == 599
