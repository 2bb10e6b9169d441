"""Compressed updates (run config update-dtype): the real ClientApp sends its update in 16
bits, the server's guard adds it back onto the global model; the weights it aggregates are
the float32 ones within the rounding of the update, for half the bytes. And the model sent
down in 16 bits (model-dtype): the node receives float16 and trains in float32, the server
keeps its float32 model and adds each node's own change onto it."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from server.download import narrowed, rebased
from server.guard import ReplyGuard, received_arrays
from server.replies import array_bytes
from server.strategy import GuardedStrategy, build_strategy, train_config, training_grid
from shared_model.audit_log import LOG_FILE as AUDIT_LOG
from shared_model.contract import packing, wire
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
        decoded, weights, why = guard._decoded(b, *received_arrays(b))
        # Assert: the weights within the rounding of each update
        assert why == ""
        got = decoded.content.array_records[wire.ARRAYS]
        for k, g in state.items():
            want, have = full[k].numpy(), got[k].numpy()
            assert have.dtype == want.dtype
            assert np.array_equal(weights[k], have)  # what the guard checks is what it sends on
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


# ------------------------------------------------------------- the model down in 16 bits


def _server_round(sites, store, state, *, model_dtype: str, update_dtype: str):
    """One train round of the real ServerApp strategy (GuardedStrategy, WireGrid packing)
    with the real ClientApp behind a loopback grid: (messages as sent, the grid, the new
    global model)."""
    run_config = {**_run_config(sites, store), "secure-aggregation": False,
                  "update-dtype": update_dtype, "model-dtype": model_dtype}
    run = RunConfig.parse(run_config)
    loop = LoopbackGrid(_contexts(run_config))
    guarded = GuardedStrategy(build_strategy(run), max_norm=1e3, total_rounds=1,
                              model_dtype=run.model_dtype, update_dtype=run.update_dtype)
    sent = list(guarded.configure_train(1, ArrayRecord(state), train_config(run), loop))
    sent_arrays = [{k: v.numpy().copy() for k, v in m.content.array_records[wire.ARRAYS].items()}
                   for m in sent]  # before the WireGrid packs them
    replies = training_grid(loop, run).send_and_receive(sent)
    new_global, _ = guarded.aggregate_train(1, replies)
    return sent_arrays, loop, new_global


def _received_dtypes(store) -> set[str]:
    """The dtypes of the arrays each node's audit log says arrived."""
    dtypes = set()
    for path in store.rglob(AUDIT_LOG):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            received = (entry.get("received") or {}).get("arrays") or {}
            dtypes |= {a["dtype"] for a in received.get("arrays", [])}
    return dtypes


def _expected_global(state, sent, loop) -> dict[str, np.ndarray]:
    """float32 global + the weighted mean of each node's own change (trained - what it
    received): what the server must aggregate, the download's rounding left out."""
    total = 0
    change = {k: np.zeros(v.shape, dtype=np.float64) for k, v in state.items()}
    for _, _, reply in loop.replies:
        n = int(reply.content.metric_records[wire.METRICS][wire.M_NUM_EXAMPLES])
        trained = reply.content.array_records[wire.ARRAYS]
        for k in change:
            change[k] += n * (trained[k].numpy().astype(np.float64)
                              - sent[k].astype(np.float64))
        total += n
    return {k: state[k].numpy() + change[k] / total for k in state}


def test_the_model_goes_down_in_16_bits_and_the_server_keeps_float32(three_sites, tmp_path):
    # Prepare: the same round with the model sent down in float32 and in float16
    state = _global()
    full, _, _ = _server_round(three_sites, tmp_path / "f32", state, model_dtype="float32",
                               update_dtype="float32")
    # Execute
    half, loop, new_global = _server_round(three_sites, tmp_path / "f16", state,
                                           model_dtype="float16", update_dtype="float32")
    # Assert: half the bytes down, float16 on the wire and at the node, float32 at the server
    for a, b in zip(full, half, strict=True):
        assert {v.dtype for v in b.values()} == {np.dtype(np.float16)}
        assert 2 * sum(v.nbytes for v in b.values()) == sum(v.nbytes for v in a.values())
    assert _received_dtypes(tmp_path / "f16") == {"float16"}
    assert _received_dtypes(tmp_path / "f32") == {"float32"}
    assert new_global is not None
    want = _expected_global(state, half[0], loop)
    for k, v in new_global.items():
        assert v.numpy().dtype == np.float32
        np.testing.assert_allclose(v.numpy(), want[k], rtol=0, atol=2e-6, err_msg=k)


def test_16_bits_both_ways_halves_a_round(three_sites, tmp_path):
    # Prepare
    state = _global()
    full, loop32, _ = _server_round(three_sites, tmp_path / "f32", state,
                                    model_dtype="float32", update_dtype="float32")
    # Execute
    half, loop16, new_global = _server_round(three_sites, tmp_path / "f16", state,
                                             model_dtype="float16", update_dtype="float16")

    def round_bytes(sent, loop) -> int:
        return sum(sum(v.nbytes for v in m.values()) for m in sent) + sum(
            array_bytes(packing.packed(copy.deepcopy(r))) for _, _, r in loop.replies)

    # Assert: every byte of the round halved; the update added onto the float32 model
    assert 2 * round_bytes(half, loop16) == round_bytes(full, loop32)
    assert new_global is not None
    n = {node: int(r.content.metric_records[wire.METRICS][wire.M_NUM_EXAMPLES])
         for node, _, r in loop16.replies}
    for k, v in new_global.items():
        mean = sum(n[node] * r.content.array_records[wire.ARRAYS][k].numpy().astype(np.float64)
                   for node, _, r in loop16.replies) / sum(n.values())
        np.testing.assert_allclose(v.numpy(), state[k].numpy() + mean, rtol=0, atol=1e-6,
                                   err_msg=k)


def test_the_download_stays_float32_where_a_value_does_not_fit_and_secagg_is_refused():
    arrays = {"w": np.array([1.0, 7e4], dtype=np.float32), "n": np.array([3])}
    out = narrowed(arrays)
    assert out["w"].dtype == np.float32 and out["n"].dtype == arrays["n"].dtype
    ref = {"w": np.array([0.1001], dtype=np.float32)}
    sent = narrowed(ref)
    back = rebased({"w": sent["w"].astype(np.float32) + 0.5}, sent, ref)
    assert back["w"].dtype == np.float32 and abs(back["w"][0] - 0.6001) < 1e-7
    with pytest.raises(RunConfigError, match="model-dtype='float16' needs"):
        RunConfig.parse({**pyproject_defaults(), "model-dtype": "float16",
                         "secure-aggregation": True})
