"""Client-level central DP with Flower's wrappers: impossible combinations refused at
start-up, each hospital's update clipped before the noise, the federation's epsilon
accounted per released round, and a round with fewer hospitals than the noise was
scaled to not released."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import central_clipping_mod
from server.strategy import FEDERATION, GuardedStrategy, build_strategy
from shared_model.contract import wire
from shared_model.contract.run_config import RunConfigError
from tests.server.fakes import FakeGrid, array_record, numpy_arrays, run_config, train_reply

CLIP = 0.5


def ref_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((3, 4)).astype(np.float32),
            "b": rng.standard_normal(4).astype(np.float32)}


def _guarded(mode: str, noise: float = 1e-3) -> GuardedStrategy:
    run = run_config(central_dp=mode, central_noise=noise, central_clip=CLIP,
                     min_train_nodes=2, min_available_nodes=2, min_evaluate_nodes=1)
    return GuardedStrategy(build_strategy(run), max_norm=1e6, total_rounds=3)


def _round(strategy: GuardedStrategy, ref, updates: dict[int, dict | None], rnd: int = 1):
    grid = FakeGrid({n: None for n in updates})
    sent = list(strategy.configure_train(rnd, array_record(ref), ConfigRecord(), grid))
    replies = [train_reply(m, site=f"h{m.metadata.dst_node_id}", num_examples=10 * (k + 1),
                           arrays=updates[m.metadata.dst_node_id])
               for k, m in enumerate(sent)]
    arrays, _ = strategy.aggregate_train(rnd, replies)
    return arrays, sent


def _norm(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))


@pytest.mark.parametrize("bad, why", [
    ({"strategy": "krum"}, "fedavg"),
    ({"strategy": "fedadam"}, "fedavg"),
    ({"fraction_train": 0.5}, "fraction-train=1.0"),
])
def test_impossible_combinations_are_refused_at_start_up(bad, why):
    with pytest.raises(RunConfigError, match=why):
        run_config(central_dp="server", **bad)


def test_the_server_clips_each_update_before_the_mean_and_the_noise():
    # Prepare: one hospital sends an enormous update, the other a small one
    ref = ref_state()
    huge = {k: v + 100.0 for k, v in ref.items()}
    small = {k: v + 0.01 for k, v in ref.items()}
    strategy = _guarded("server")
    # Execute
    arrays, _ = _round(strategy, ref, {1: huge, 2: small})
    # Assert: the mean moved by at most the clipping bound (plus the tiny noise), where
    # the unclipped mean would have moved by ~200
    assert arrays is not None
    assert _norm(numpy_arrays(arrays), ref) <= CLIP + 0.01
    spent = [r for r in strategy.pending_rows if r.metric == wire.M_CENTRAL_EPSILON]
    assert len(spent) == 1 and spent[0].site == FEDERATION and spent[0].value > 0


def _near(ref: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in ref.items()}


def test_the_central_noise_cannot_be_replayed_from_the_run_seed():
    # Prepare: the attack of a model user who knows the run config: seed numpy as the
    # ServerApp does for the initial model, then aggregate the same updates
    from shared_model.train import seed_everything

    ref = ref_state()
    updates = {1: _near(ref, 1), 2: _near(ref, 2)}
    outs = []
    for _ in range(2):
        seed_everything(0)
        arrays, _ = _round(_guarded("server", noise=1.0), ref, updates)
        outs.append(numpy_arrays(arrays))
    # Assert: the two releases differ by fresh noise, so the noise cannot be regenerated
    assert _norm(outs[0], outs[1]) > 0.1


def test_epsilon_grows_with_each_released_round_and_a_short_round_is_not_released():
    ref = ref_state()
    strategy = _guarded("server", noise=1.0)
    eps = []
    for rnd in (1, 2):
        _round(strategy, ref, {1: _near(ref, 1), 2: _near(ref, 2)}, rnd=rnd)
        eps.append(strategy.strategy.privacy_spent().epsilon)
    # one of the two hospitals sends nothing usable: fewer than the noise was scaled to
    arrays, _ = _round(strategy, ref, {1: _near(ref, 1), 2: None}, rnd=3)
    assert 0 < eps[0] < eps[1]
    assert strategy.strategy.privacy_spent().epsilon == eps[1]  # nothing released
    assert arrays is not None and _norm(numpy_arrays(arrays), ref) == 0.0  # global kept


def test_resuming_composes_the_rounds_already_released():
    run = run_config(central_dp="server", central_noise=1.0, min_train_nodes=2,
                     min_available_nodes=2)
    fresh, resumed = build_strategy(run), build_strategy(run, rounds_done=2)
    assert fresh.privacy_spent().epsilon == 0.0
    assert resumed.privacy_spent().num_releases == 2 and resumed.privacy_spent().epsilon > 0


def test_client_side_clipping_runs_on_the_node_only_when_the_server_asks():
    # Prepare: what the client-side wrapper sends (the clipping norm in the config)
    ref = ref_state()
    strategy = _guarded("client")
    _, sent = _round(strategy, ref, {1: _near(ref, 1), 2: _near(ref, 2)})
    asked = sent[0]
    far = {k: v + 5.0 for k, v in ref.items()}

    def node(msg: Message, _ctx: Context) -> Message:
        return train_reply(msg, site="h1", arrays=far, num_examples=10)

    def refusing(msg: Message, _ctx: Context) -> Message:
        return train_reply(msg, site="h1", arrays=None, num_examples=0)

    plain = Message(RecordDict({wire.ARRAYS: array_record(ref),
                                wire.CONFIG: ConfigRecord({wire.CFG_SERVER_ROUND: 1})}),
                    dst_node_id=1, message_type="train")
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    # Execute
    clipped = central_clipping_mod(asked, ctx, node)
    untouched = central_clipping_mod(plain, ctx, node)
    refusal = central_clipping_mod(asked, ctx, refusing)
    # Assert
    assert _norm(numpy_arrays(clipped.content.array_records[wire.ARRAYS]), ref) <= CLIP + 1e-5
    assert _norm(numpy_arrays(untouched.content.array_records[wire.ARRAYS]), ref) > 5
    assert not refusal.has_error() and not refusal.content.array_records
