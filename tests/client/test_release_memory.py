"""release_memory_mod: after every message the ClientApp answers, what it built is
collected and glibc's freed heap memory is handed back (a Ray actor serves hundreds of
messages in turn); the reply, or the exception, passes through unchanged."""

from __future__ import annotations

import pytest

import client.app as client_app


class _Gc:
    """Stands for the `gc` module: records collections and freezes."""

    def __init__(self, calls: list[object]) -> None:
        self.calls, self.frozen = calls, 0

    def collect(self) -> int:
        self.calls.append("gc")
        return 0

    def freeze(self) -> None:
        self.calls.append("freeze")
        self.frozen = 1000

    def get_freeze_count(self) -> int:
        return self.frozen


@pytest.fixture
def frees(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """What the mod called, in order: "gc" for a collection, "freeze" for gc.freeze, 0 for
    malloc_trim(0)."""
    calls: list[object] = []
    monkeypatch.setattr(client_app, "gc", _Gc(calls))
    monkeypatch.setattr(client_app, "_MALLOC_TRIM", lambda pad: calls.append(pad) or 1)
    return calls


def test_the_reply_passes_and_the_memory_is_released_after_it(frees: list[object]) -> None:
    # Prepare
    reply = object()
    seen: list[object] = []

    def handler(msg, ctxt):
        seen.append(list(frees))  # nothing released before the handler has answered
        return reply
    # Execute
    out = client_app.release_memory_mod("msg", "ctxt", handler)
    again = client_app.release_memory_mod("msg", "ctxt", handler)
    # Assert: collected, what outlived the first message frozen (once), trimmed
    assert out is reply and again is reply and seen[0] == []
    assert frees == ["gc", "freeze", 0, "gc", 0]


def test_a_failing_message_is_released_too(frees: list[object]) -> None:
    # Prepare
    def handler(msg, ctxt):
        raise RuntimeError("boom")
    # Execute / Assert: the exception goes on to failure_code_mod, the memory is freed
    with pytest.raises(RuntimeError, match="boom"):
        client_app.release_memory_mod("msg", "ctxt", handler)
    assert frees == ["gc", "freeze", 0]


def test_every_message_kind_goes_through_it_inside_the_failure_code_mod() -> None:
    for mods in (client_app.TRAIN_MODS, client_app.EVALUATE_MODS):
        assert mods[:3] == [client_app.failure_code_mod, client_app.release_memory_mod,
                            client_app.packed_arrays_mod]


def test_malloc_trim_is_found_on_glibc() -> None:
    # the machines medfuse runs its simulations on are glibc Linux
    assert client_app._malloc_trim() is not None
