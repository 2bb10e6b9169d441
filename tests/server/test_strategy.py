"""build_strategy and GuardedStrategy on hand-built reply Messages (no Ray, no network)."""

from __future__ import annotations

import typing

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from server.grid import WireGrid
from server.results import EVALUATE, M_UPDATE_ACCEPTED, TRAIN
from server.strategy import (
    STRATEGIES,
    GuardedStrategy,
    build_strategy,
    shared_packed,
    train_config,
    training_grid,
)
from shared_model.contract import wire
from shared_model.contract.packing import unpacked
from shared_model.contract.run_config import StrategyName
from tests.server.fakes import (
    FakeGrid,
    array_record,
    evaluate_reply,
    numpy_arrays,
    run_config,
    train_reply,
)

NAMES = typing.get_args(StrategyName)  # every strategy a run config may name


def global_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "enc.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "enc.bias": rng.standard_normal(4).astype(np.float32),
    }


def near(ref: dict[str, np.ndarray], seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in ref.items()}


def guarded(inner=None, **kw) -> GuardedStrategy:
    kw.setdefault("max_norm", 10.0)
    kw.setdefault("total_rounds", 3)
    return GuardedStrategy(inner or FedAvg(min_train_nodes=1, min_evaluate_nodes=1,
                                          min_available_nodes=1), **kw)


def configure(strategy: GuardedStrategy, ref, nodes, rnd: int = 1) -> list[Message]:
    grid = FakeGrid({n: None for n in nodes})
    return list(strategy.configure_train(rnd, array_record(ref), ConfigRecord(), grid))


# ------------------------------------------------------------------ build_strategy


@pytest.mark.parametrize("name", NAMES)
def test_build_strategy_gives_flowers_own_class(name):
    # Prepare
    extra = {"proximal_mu": 0.1} if name == "fedprox" else {}
    run = run_config(strategy=name, **extra)
    # Execute
    strategy = build_strategy(run)
    # Assert
    assert type(strategy).__module__.startswith("flwr.serverapp.strategy")
    assert type(strategy).__name__.lower() == name
    assert strategy.weighted_by_key == wire.M_NUM_EXAMPLES
    assert strategy.arrayrecord_key == wire.ARRAYS
    assert strategy.configrecord_key == wire.CONFIG


def test_every_run_config_strategy_name_is_built():
    assert set(STRATEGIES) == set(NAMES)


def test_build_strategy_passes_the_run_configs_settings():
    # Prepare / Execute
    avg = build_strategy(run_config(fraction_train=0.5, min_train_nodes=3,
                                    min_available_nodes=4, fraction_evaluate=0.25))
    prox = build_strategy(run_config(strategy="fedprox", proximal_mu=0.03))
    adam = build_strategy(run_config(strategy="fedadam", server_lr=0.05))
    yogi = build_strategy(run_config(strategy="fedyogi", server_lr=0.02))
    trim = build_strategy(run_config(strategy="fedtrimmedavg", trimmed_beta=0.3))
    krum = build_strategy(run_config(strategy="krum", byzantine_nodes=1))
    bulyan = build_strategy(run_config(strategy="bulyan", byzantine_nodes=2))
    # Assert
    assert (avg.fraction_train, avg.min_train_nodes, avg.min_available_nodes,
            avg.fraction_evaluate) == (0.5, 3, 4, 0.25)
    assert prox.proximal_mu == 0.03
    assert adam.eta == 0.05 and yogi.eta == 0.02
    assert trim.beta == 0.3
    assert krum.num_malicious_nodes == 1 and bulyan.num_malicious_nodes == 2


def test_train_config_carries_the_wire_keys():
    # Execute
    cfg = train_config(run_config(local_epochs=2, lr=0.01, num_server_rounds=7, dp=False))
    private = train_config(run_config(lr=0.01, dp=True, dp_lr=0.5))
    # Assert: the learning rate of the run's recipe (private rounds have their own)
    assert dict(cfg) == {wire.CFG_LOCAL_EPOCHS: 2, wire.CFG_LR: 0.01,
                         wire.CFG_PROXIMAL_MU: 0.0, wire.CFG_TOTAL_ROUNDS: 7,
                         wire.CFG_EVAL_SPLIT: "test"}
    assert private[wire.CFG_LR] == 0.5


def test_round_lr_is_the_recipes_rate_constant_or_decaying_by_a_cosine():
    # Prepare
    constant = run_config(dp=True, dp_lr=0.5, num_server_rounds=4)
    cosine = run_config(dp=True, dp_lr=0.5, lr_schedule="cosine", num_server_rounds=4)
    # Execute
    flat = [constant.round_lr(r) for r in range(1, 5)]
    decaying = [cosine.round_lr(r) for r in range(1, 5)]
    # Assert: 0.5 * (1 + cos(pi * (r - 1) / 4)) of the recipe's rate; the last still trains
    assert flat == [0.5] * 4
    assert decaying == pytest.approx([0.5, 0.4268, 0.25, 0.0732], abs=1e-4)


# ------------------------------------------------------------------ configure


def test_configure_train_numbers_rounds_after_the_resume_offset():
    # Prepare
    strategy = guarded(FedProx(min_train_nodes=2, min_available_nodes=2, proximal_mu=0.2),
                       round_offset=4, total_rounds=9)
    # Execute
    msgs = configure(strategy, global_state(), [11, 12], rnd=1)
    # Assert
    assert sorted(m.metadata.dst_node_id for m in msgs) == [11, 12]
    cfg = msgs[0].content.config_records[wire.CONFIG]
    assert cfg[wire.CFG_SERVER_ROUND] == 5
    assert cfg[wire.CFG_TOTAL_ROUNDS] == 9
    assert cfg[wire.CFG_PROXIMAL_MU] == 0.2
    assert msgs[0].metadata.message_type == MessageType.TRAIN


def test_configure_train_asks_for_the_schedules_rate_of_the_global_round():
    # Prepare: a resumed run (3 rounds done) of 8 with a cosine schedule from 1.0
    run = run_config(dp=True, dp_lr=1.0, lr_schedule="cosine", num_server_rounds=8)
    strategy = guarded(round_offset=3, total_rounds=8, round_lr=run.round_lr)
    # Execute: Flower's rounds 1 and 5 of the resumed run are global rounds 4 and 8
    asked = [configure(strategy, global_state(), [1], rnd=r)[0]
             .content.config_records[wire.CONFIG][wire.CFG_LR] for r in (1, 5)]
    # Assert
    assert asked == pytest.approx([run.round_lr(4), run.round_lr(8)])
    assert 0.0 < asked[1] < asked[0] < 1.0


def test_configure_does_not_change_the_callers_config():
    # Prepare
    strategy = guarded(round_offset=2)
    config = ConfigRecord({wire.CFG_LR: 0.1})
    # Execute
    strategy.configure_train(1, array_record(global_state()), config, FakeGrid({1: None}))
    evals = list(strategy.configure_evaluate(1, array_record(global_state()), ConfigRecord(),
                                             FakeGrid({1: None})))
    # Assert
    assert dict(config) == {wire.CFG_LR: 0.1}
    assert evals[0].content.config_records[wire.CONFIG][wire.CFG_SERVER_ROUND] == 3


# ------------------------------------------------------------------ aggregation


def test_fedavg_aggregate_matches_numpy_weighted_average():
    # Prepare
    ref = global_state()
    strategy = guarded()
    msgs = configure(strategy, ref, [1, 2, 3])
    sizes = {1: 10, 2: 30, 3: 60}
    states = {n: near(ref, n) for n in sizes}
    replies = [train_reply(m, site=f"s{m.metadata.dst_node_id}",
                           arrays=states[m.metadata.dst_node_id],
                           num_examples=sizes[m.metadata.dst_node_id]) for m in msgs]
    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)
    # Assert
    got = numpy_arrays(arrays)
    for name in ref:
        expected = np.average([states[n][name] for n in sizes], axis=0,
                              weights=[sizes[n] for n in sizes])
        np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-7)
        assert got[name].dtype == ref[name].dtype
    assert metrics[wire.M_TRAIN_LOSS] == pytest.approx(0.5)


def test_bad_updates_are_each_left_out_and_the_round_completes(flwr_log):
    # Prepare: two good sites and a NaN, a wrongly shaped and an oversized update
    ref = global_state()
    strategy = guarded(max_norm=5.0)
    msgs = {m.metadata.dst_node_id: m for m in configure(strategy, ref, [1, 2, 3, 4, 5])}
    nan = near(ref, 3)
    nan["enc.bias"][1] = np.nan
    shaped = near(ref, 4)
    shaped["enc.weight"] = np.zeros((4, 3), dtype=np.float32)
    huge = {k: v + 100.0 for k, v in ref.items()}
    good = {1: near(ref, 1), 2: near(ref, 2)}
    replies = [
        train_reply(msgs[1], site="good-a", arrays=good[1], num_examples=20),
        train_reply(msgs[2], site="good-b", arrays=good[2], num_examples=60),
        train_reply(msgs[3], site="nan-site", arrays=nan, num_examples=1000),
        train_reply(msgs[4], site="shape-site", arrays=shaped, num_examples=1000),
        train_reply(msgs[5], site="huge-site", arrays=huge, num_examples=1000),
    ]
    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert: exactly the two good ones, weighted
    got = numpy_arrays(arrays)
    for name in ref:
        expected = np.average([good[1][name], good[2][name]], axis=0, weights=[20, 60])
        np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-7)
    left_out = [line for line in flwr_log if "left out" in line]
    assert len(left_out) == 3
    assert any("node 3 (nan-site)" in s and "non-finite" in s for s in left_out)
    assert any("node 4 (shape-site)" in s and "shape (4, 3)" in s for s in left_out)
    assert any("node 5 (huge-site)" in s and "norm" in s for s in left_out)
    verdict = {r.site: r.value for r in strategy.pending_rows if r.metric == M_UPDATE_ACCEPTED}
    assert verdict == {"good-a": 1.0, "good-b": 1.0, "nan-site": 0.0, "shape-site": 0.0,
                       "huge-site": 0.0}


def test_refusals_errors_and_missing_arrays_are_left_out(flwr_log):
    # Prepare
    ref = global_state()
    strategy = guarded()
    msgs = {m.metadata.dst_node_id: m for m in configure(strategy, ref, [1, 2, 3, 4, 5])}
    replies = [
        train_reply(msgs[1], site="ok", arrays=near(ref, 1), num_examples=10),
        train_reply(msgs[2], site="spent", arrays=None, num_examples=0, budget_exhausted=True,
                    error=wire.ERR_BUDGET_SPENT),
        train_reply(msgs[3], site="broken", arrays=None, num_examples=0, data_error=True,
                    error=wire.ERR_DATA_UNREADABLE),
        train_reply(msgs[4], site="silent", arrays=None, num_examples=10),
        Message(Error(code=0, reason="ClientApp crashed"), reply_to=msgs[5]),
    ]
    # a budget refusal's words (the ledger's figures) are shown; a data error's never are
    replies[1].content.config_records[wire.SITE][wire.SITE_DETAIL] = "epsilon 8.0 of 8.0 spent"
    replies[2].content.config_records[wire.SITE][wire.SITE_DETAIL] = "47 row(s) in /data/x"
    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert
    np.testing.assert_array_equal(numpy_arrays(arrays)["enc.bias"], replies[0].content[
        wire.ARRAYS]["enc.bias"].numpy())
    text = "\n".join(flwr_log)
    spent = wire.site_error_text(wire.ERR_BUDGET_SPENT, "epsilon 8.0 of 8.0 spent")
    assert spent.endswith("(budget-spent): epsilon 8.0 of 8.0 spent")
    assert f"node 2 (spent) left out: privacy budget spent: {spent}" in text
    broken = wire.SITE_ERRORS[wire.ERR_DATA_UNREADABLE]
    assert f"node 3 (broken) left out: data error: {broken} (data-unreadable)" in text
    assert "47 row(s)" not in text and "/data/x" not in text
    assert "node 4 (silent) left out: no arrays" in text
    assert "node 5 (node-5) left out: error reply: ClientApp crashed" in text


def test_a_node_that_never_replied_is_named(flwr_log):
    # Prepare: work sent to nodes 1 and 2; only 1 answers (2 timed out, no error reply)
    ref = global_state()
    strategy = guarded()
    msgs = {m.metadata.dst_node_id: m for m in configure(strategy, ref, [1, 2])}
    replies = [train_reply(msgs[1], site="ok", arrays=near(ref, 1), num_examples=10)]
    # Execute
    strategy.aggregate_train(1, replies)
    # Assert
    text = "\n".join(flwr_log)
    assert "round 1: no reply from node 2 (node-2) by the round timeout" in text
    assert "no reply from node 1" not in text
    assert "round 1: aggregating 1 update(s) from ok" in text


def test_no_usable_update_keeps_the_global_model(flwr_log):
    # Prepare
    ref = global_state()
    strategy = guarded()
    msgs = configure(strategy, ref, [1, 2])
    replies = [train_reply(m, site="s", arrays=None, num_examples=0, budget_exhausted=True)
               for m in msgs]
    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)
    # Assert
    for name, v in numpy_arrays(arrays).items():
        np.testing.assert_array_equal(v, ref[name])
    assert metrics is None
    assert any("no usable update" in line for line in flwr_log)


def test_fedadam_aggregate_keeps_the_global_dtypes():
    # Prepare: FedAdam computes in float64; the clients need float32 back
    ref = global_state()
    strategy = guarded(FedAdam(min_train_nodes=1, min_available_nodes=1, eta=0.1))
    msgs = configure(strategy, ref, [1, 2])
    replies = [train_reply(m, site=f"s{i}", arrays=near(ref, i), num_examples=5)
               for i, m in enumerate(msgs)]
    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert
    assert {k: v.numpy().dtype for k, v in arrays.items()} == {k: np.dtype(np.float32)
                                                               for k in ref}
    assert list(arrays) == list(ref)


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "bulyan"])
def test_robust_strategies_aggregate_through_the_guard(name):
    # Prepare: 5 good updates (enough for Bulyan with f=0: 4f+3)
    ref = global_state()
    strategy = guarded(build_strategy(run_config(strategy=name)))
    msgs = configure(strategy, ref, [1, 2, 3, 4, 5])
    replies = [train_reply(m, site=f"s{i}", arrays=near(ref, i), num_examples=5)
               for i, m in enumerate(msgs)]
    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert
    assert set(arrays) == set(ref)
    assert all(np.isfinite(v.numpy()).all() for v in arrays.values())


def test_evaluate_is_weighted_recorded_and_ends_the_round_with_the_hook():
    # Prepare
    seen = []
    strategy = guarded(round_offset=1, on_round_end=lambda r, a, rows: seen.append((r, a, rows)))
    ref = array_record(global_state())
    grid = FakeGrid({1: None, 2: None, 3: None})
    strategy.configure_train(1, ref, ConfigRecord(), grid)
    msgs = {m.metadata.dst_node_id: m
            for m in strategy.configure_evaluate(1, ref, ConfigRecord(), grid)}
    replies = [
        evaluate_reply(msgs[1], site="a", num_examples=10, accuracy=0.2),
        evaluate_reply(msgs[2], site="b", num_examples=30, accuracy=0.6),
        evaluate_reply(msgs[3], site="c", num_examples=0, accuracy=0.0, data_error=True),
    ]
    # Execute
    metrics = strategy.aggregate_evaluate(1, replies)
    # Assert
    assert metrics[wire.M_ACCURACY] == pytest.approx(np.average([0.2, 0.6], weights=[10, 30]))
    assert len(seen) == 1
    rnd, arrays, rows = seen[0]
    assert rnd == 2 and arrays is ref
    acc = {r.site: r.value for r in rows if r.metric == wire.M_ACCURACY and r.phase == EVALUATE}
    assert acc == {"a": 0.2, "b": 0.6, "c": 0.0}
    assert all(r.round == 2 for r in rows)
    assert strategy.last_round == 2


def test_train_rows_hold_every_reported_metric():
    # Prepare
    ref = global_state()
    strategy = guarded()
    msg = configure(strategy, ref, [7])[0]
    # Execute
    strategy.aggregate_train(1, [train_reply(msg, site="x", arrays=near(ref, 1),
                                             num_examples=9, epsilon=2.5)])
    # Assert
    rows = {r.metric: r for r in strategy.pending_rows}
    assert rows[wire.M_EPSILON].value == 2.5 and rows[wire.M_NUM_EXAMPLES].value == 9
    assert rows[wire.M_EPSILON].phase == TRAIN and rows[wire.M_EPSILON].node_id == 7
    assert rows[M_UPDATE_ACCEPTED].value == 1.0
    assert rows["update-norm"].value > 0


# ------------------------------------------------------------------ packing once per model


class _RecordingGrid(FakeGrid):
    """A FakeGrid that keeps the packed ArrayRecord of every message as it was pushed
    (FakeGrid unpacks what it delivers)."""

    def __init__(self, nodes) -> None:
        super().__init__(nodes)
        self.packed_records: list = []

    def push_messages(self, messages):
        self.packed_records += [m.content.array_records.get(wire.PACKED) for m in messages]
        return super().push_messages(messages)


def _one_round(make_grid) -> tuple[_RecordingGrid, dict[str, np.ndarray]]:
    """One train round of GuardedStrategy(FedAvg) over three fake sites, the messages
    sent through `make_grid(fake)`: (the fake grid, the new global model)."""
    def site(n: int):
        def answer(m: Message) -> Message:
            got = numpy_arrays(m.content.array_records[wire.ARRAYS])
            return train_reply(m, site=f"site-{n}", num_examples=10 + n, arrays=near(got, n))
        return answer
    run = run_config()
    fake = _RecordingGrid({n: site(n) for n in (1, 2, 3)})
    strategy = GuardedStrategy(build_strategy(run), max_norm=1e3, total_rounds=1)
    sent = list(strategy.configure_train(1, array_record(global_state()), train_config(run), fake))
    arrays, _ = strategy.aggregate_train(1, make_grid(fake).send_and_receive(sent))
    return fake, numpy_arrays(arrays)


def test_every_node_gets_one_shared_packed_model_and_the_round_is_the_same():
    # Prepare: the same round packed per message (WireGrid alone) and once (training_grid)
    apart, expected = _one_round(WireGrid)
    # Execute
    shared, got = _one_round(lambda g: training_grid(g, run_config()))
    # Assert: one packed buffer for the three nodes, the same bytes as each own copy, the
    # same aggregate bit for bit
    assert len(shared.packed_records) == 3 and len({id(r) for r in shared.packed_records}) == 1
    assert len({id(r) for r in apart.packed_records}) == 3
    assert all(r[wire.PACKED].data == shared.packed_records[0][wire.PACKED].data
               for r in apart.packed_records)
    assert list(got) == list(expected)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_shared_packing_leaves_other_messages_alone_and_packs_each_model_once():
    # Prepare: two models, three messages, one without arrays
    a, b = array_record(global_state()), array_record(near(global_state(), 1))
    msgs = [Message(RecordDict({wire.ARRAYS: rec, wire.CONFIG: ConfigRecord({"k": i})}),
                    dst_node_id=i, message_type=MessageType.TRAIN)
            for i, rec in enumerate((a, b, a))]
    bare = Message(RecordDict({wire.CONFIG: ConfigRecord({"k": 9})}), dst_node_id=9,
                   message_type=MessageType.TRAIN)
    # Execute
    out = shared_packed([*msgs, bare])
    # Assert: same messages in order; the two of model a share one buffer, b its own; each
    # unpacks to its own model and keeps its own config
    assert out == [*msgs, bare] and bare.content.array_records == {}
    recs = [m.content.array_records[wire.PACKED] for m in msgs]
    assert recs[0] is recs[2] and recs[1] is not recs[0]
    for msg, model, i in zip(msgs, (a, b, a), range(3), strict=True):
        back = unpacked(msg).content
        assert back.config_records[wire.CONFIG]["k"] == i
        assert all(np.array_equal(back.array_records[wire.ARRAYS][k].numpy(), v.numpy())
                   for k, v in model.items())
