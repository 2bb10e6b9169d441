"""Compressed updates (run config update-dtype): the real ClientApp sends its update in 16
bits, the server's guard adds it back onto the global model; the weights it aggregates are
the float32 ones within the rounding of the update, for half the bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from server.guard import ReplyGuard
from server.strategy import build_strategy
from shared_model.contract import wire
from shared_model.contract.compression import decode, encode, encoding_of
from shared_model.contract.run_config import RunConfig, RunConfigError, pyproject_defaults
from tests.server.test_secure import (
    LoopbackGrid,
    _contexts,
    _global,
    _run_config,
    _train_messages,
)


def _replies(sites, store, state, dtype: str):
    run_config = {**_run_config(sites, store), "secure-aggregation": False,
                  "update-dtype": dtype}
    grid = LoopbackGrid(_contexts(run_config))
    return grid.send_and_receive(_train_messages(state))


@pytest.mark.parametrize("dtype, rel", [("float16", 2**-10), ("bfloat16", 2**-7)])
def test_the_server_gets_the_trained_weights_back_for_half_the_bytes(
    three_sites, tmp_path, dtype, rel
):
    # Prepare: the same non-private round, sent as weights and as a 16-bit update
    state = _global()
    plain = _replies(three_sites, tmp_path / "plain", state, "float32")
    small = _replies(three_sites, tmp_path / dtype, state, dtype)
    guard = ReplyGuard(build_strategy(RunConfig.parse(pyproject_defaults())), max_norm=1e3)
    guard._set_global(ArrayRecord(state))
    for a, b in zip(plain, small, strict=True):
        assert b.content.config_records[wire.SITE][wire.SITE_UPDATE] == f"delta-{dtype}"
        sent = b.content.array_records[wire.ARRAYS]
        full = a.content.array_records[wire.ARRAYS]
        assert sum(v.numpy().nbytes for v in sent.values()) * 2 == sum(
            v.numpy().nbytes for v in full.values())
        # Execute
        decoded, why = guard._decoded(b)
        # Assert: the weights within the rounding of each update
        assert why == ""
        got = decoded.content.array_records[wire.ARRAYS]
        for k, g in state.items():
            want, have = full[k].numpy(), got[k].numpy()
            assert have.dtype == want.dtype
            update = np.abs(want - g.numpy()).max()
            assert np.abs(have - want).max() <= rel * update + 1e-7, k


def test_round_trip_and_refusals():
    torch.manual_seed(0)
    start = {"w": torch.randn(64), "n": torch.tensor([7])}
    trained = {"w": start["w"] + 1e-3 * torch.randn(64), "n": torch.tensor([7])}
    ref = {k: v.numpy() for k, v in start.items()}
    assert encode(trained, start, "float32") == trained
    back = decode({k: v.numpy() for k, v in encode(trained, start, "float16").items()}, ref,
                  encoding_of("float16"))
    assert back["n"] == 7 and np.allclose(back["w"], trained["w"].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="unknown update encoding"):
        decode(ref, ref, "delta-int4")
    for other in ({"secure-aggregation": True}, {"central-dp": "client"}):
        with pytest.raises(RunConfigError, match="update-dtype='float16' needs"):
            RunConfig.parse({**pyproject_defaults(), "update-dtype": "float16", **other})
