"""Secure aggregation: Flower's SecAgg+ workflow and mod, medfuse's bridge on both sides.

The transport is in-process (a Grid that hands each message to the real ClientApp, one
Context per node kept across messages as a SuperNode keeps it); everything else is the
product: Flower's protocol, the ClientApp's handler with its ledger, the server's round.
Training is non-private here so that the plain run and the secure run train the same
updates and the aggregates can be compared exactly, up to the quantisation step."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

import client.secure
from client.app import app
from client.privacy import LedgerStore
from server.secure import MODULUS_BITS, SecAggSettings, secure_round
from shared_model.contract import wire
from shared_model.contract.packing import unpacked
from shared_model.contract.run_config import RunConfig, RunConfigError, pyproject_defaults
from shared_model.model import MedFuseModel

NODES = (101, 202, 303)
SETTINGS = SecAggSettings(shares=1.0, threshold=0.66, clip=2.0, bits=24, max_weight=100)


class _Run:
    run_id = 4242


class LoopbackGrid(Grid):
    """Delivers every message to the ClientApp in this process and keeps what came back.
    `drop(node, msg)` true: that node never answers that message (it died)."""

    def __init__(self, contexts: dict[int, Context],
                 drop: Callable[[int, Message], bool] = lambda n, m: False) -> None:
        self.contexts, self.drop = contexts, drop
        self.replies: list[tuple[int, Message, Message]] = []  # (node, sent, reply)
        self._waiting: dict[str, Message] = {}  # message id -> reply, until pulled

    def set_run(self, run):  # pragma: no cover - not used
        raise NotImplementedError

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return _Run()

    def create_message(self, *a, **k):  # pragma: no cover - not used
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = f"loop-{len(self.replies)}-{len(ids)}"
            ids.append(msg.metadata.message_id)
            if self.drop(node, msg):
                continue
            was_packed = wire.PACKED in msg.content.array_records
            reply = app(copy.deepcopy(msg), self.contexts[node])  # as if it crossed a wire
            # the ClientApp packs its arrays; a caller that sent them plain (no WireGrid
            # on this side) gets them back plain
            self.replies.append((node, msg, unpacked(copy.deepcopy(reply))))
            self._waiting[msg.metadata.message_id] = reply if was_packed else unpacked(reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._waiting.pop(i) for i in list(message_ids) if i in self._waiting]

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def _run_config(sites: list[Path], store: Path, node: str = "") -> dict:
    flat = pyproject_defaults()
    flat.update({
        "sites-dir": str(sites[0].parent), "image-size": 32, "batch-size": 8, "dp": False,
        "num-server-rounds": 1, "secure-aggregation": True,
        "sim-node-config": f"allow-non-private=true, state-dir={str(store)!r}" + node,
    })
    return flat


def _contexts(run_config: dict) -> dict[int, Context]:
    return {nid: Context(run_id=4242, node_id=nid, state=RecordDict(), run_config=run_config,
                         node_config={"partition-id": i, "num-partitions": len(NODES)})
            for i, nid in enumerate(NODES)}


def _global() -> dict[str, torch.Tensor]:
    run = RunConfig.parse({**pyproject_defaults(), "image-size": 32})
    torch.manual_seed(0)
    return MedFuseModel(run.model()).state_dict()


def _train_messages(state: dict[str, torch.Tensor], **extra) -> list[Message]:
    content = RecordDict({
        wire.ARRAYS: ArrayRecord(state),
        wire.CONFIG: ConfigRecord({wire.CFG_SERVER_ROUND: 1, wire.CFG_LOCAL_EPOCHS: 1,
                                   wire.CFG_LR: 2e-3, wire.CFG_PROXIMAL_MU: 0.0,
                                   wire.CFG_TOTAL_ROUNDS: 1, **extra}),
    })
    return [Message(content, dst_node_id=nid, message_type="train", group_id="1")
            for nid in NODES]


def _plain_updates(run_config: dict, state) -> dict[int, tuple[int, dict[str, np.ndarray]]]:
    """Each node's (examples, update) on the plain path, as the server would see them."""
    grid = LoopbackGrid(_contexts(run_config))
    grid.send_and_receive(_train_messages(state))
    out = {}
    for node, _, reply in grid.replies:
        trained = reply.content.array_records[wire.ARRAYS].to_numpy_ndarrays()
        n = int(reply.content.metric_records[wire.METRICS][wire.M_NUM_EXAMPLES])
        out[node] = (n, {k: t - state[k].numpy() for k, t in zip(state, trained, strict=True)})
    return out


def _fedavg(updates: dict[int, tuple[int, dict[str, np.ndarray]]], nodes) -> dict:
    total = sum(updates[n][0] for n in nodes)
    return {k: sum(updates[n][0] * updates[n][1][k].astype(np.float64) for n in nodes) / total
            for k in next(iter(updates.values()))[1]}


def _bound(updates, nodes) -> float:
    """The quantisation error the protocol allows on the mean: one step per node on its
    weighted coordinate (stochastic rounding), divided by the total weight."""
    step = 2 * SETTINGS.clip / (2**SETTINGS.bits - 1)
    weights = [updates[n][0] / SETTINGS.max_weight for n in nodes]
    return len(nodes) * step / sum(weights) + 1e-6


def _secure(run_config: dict, state, drop=lambda n, m: False, grid=None, **config):
    grid = grid or LoopbackGrid(_contexts(run_config), drop=drop)
    t0 = time.perf_counter()
    replies = secure_round(grid, _train_messages(state, **config), SETTINGS,
                           wire.M_NUM_EXAMPLES, timeout=60)
    print(f"secure round, {len(NODES)} nodes in process: {time.perf_counter() - t0:.1f} s")
    return grid, replies


def test_the_server_sees_masked_vectors_and_their_sum_is_fedavg(three_sites, tmp_path):
    # Prepare: what each node's update is, trained on the plain path
    state = _global()
    updates = _plain_updates(_run_config(three_sites, tmp_path / "plain"), state)
    # Execute
    grid, replies = _secure(_run_config(three_sites, tmp_path / "secure"), state)
    # Assert: the strategy gets one reply per node, each with the same aggregate
    assert {r.metadata.src_node_id for r in replies} == set(NODES)
    assert all(wire.ARRAYS in r.content.array_records for r in replies)
    new = replies[0].content.array_records[wire.ARRAYS].to_numpy_ndarrays()
    mean = _fedavg(updates, NODES)
    bound = _bound(updates, NODES)
    for (k, g), n in zip(state.items(), new, strict=True):
        assert np.abs((n - g.numpy()) - mean[k]).max() <= bound, k
    biggest = max(np.abs(m).max() for m in mean.values())
    assert bound < biggest / 100  # the comparison is sharp enough to mean something
    # the attack: a curious server decodes each node's masked vector as if it were its
    # update; what it gets is uncorrelated with that update
    masked = [(node, reply) for node, sent, reply in grid.replies
              if Key.MASKED_PARAMETERS in reply.content.config_records[RECORD_KEY_CONFIGS]]
    assert {node for node, _ in masked} == set(NODES)
    for node, reply in masked:
        raw = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        vectors = [bytes_to_ndarray(b) for b in raw][1:]  # [0] is the weight factor
        decoded = np.concatenate([v.ravel() for v in vectors]).astype(np.float64)
        truth = np.concatenate([updates[node][1][k].ravel() for k in state])
        assert decoded.size == truth.size
        assert abs(np.corrcoef(decoded, truth)[0, 1]) < 0.05, node
        # nor does any reply carry the update in the clear
        assert not reply.content.array_records or not any(
            len(r) for r in reply.content.array_records.values())


def test_a_node_lost_mid_round_does_not_stop_it(three_sites, tmp_path):
    # Prepare: node 303 takes part in the key exchange, then dies before sending its vector
    state = _global()
    updates = _plain_updates(_run_config(three_sites, tmp_path / "plain"), state)
    lost = 303

    def dies_before_masking(node: int, msg: Message) -> bool:
        stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
        return node == lost and stage in (Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK)

    # Execute
    _, replies = _secure(_run_config(three_sites, tmp_path / "secure"), state,
                         drop=dies_before_masking)
    # Assert: the two others' masks cancel (the lost node's are rebuilt from its shares)
    survivors = [n for n in NODES if n != lost]
    assert {r.metadata.src_node_id for r in replies} == set(survivors)
    new = replies[0].content.array_records[wire.ARRAYS].to_numpy_ndarrays()
    mean = _fedavg(updates, survivors)
    bound = _bound(updates, survivors)
    for (k, g), n in zip(state.items(), new, strict=True):
        assert np.abs((n - g.numpy()) - mean[k]).max() <= bound, k


def test_each_node_clips_its_update_before_masking_it(three_sites, tmp_path):
    # Prepare: the clipping norm Flower's client-side DP wrapper sends with each round
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    state = _global()
    clip = 1e-3
    # Execute
    _, replies = _secure(_run_config(three_sites, tmp_path), state,
                         **{KEY_CLIPPING_NORM: clip})
    # Assert: the mean of updates clipped to `clip` has a norm of at most `clip`, plus the
    # quantisation error (at most one step per node and coordinate; unclipped, the mean
    # update's norm is in the units)
    new = replies[0].content.array_records[wire.ARRAYS].to_numpy_ndarrays()
    norm = np.sqrt(sum(float(np.sum((n.astype(np.float64) - g.numpy()) ** 2))
                       for n, g in zip(new, state.values(), strict=True)))
    coords = sum(g.numel() for g in state.values())
    weight = sum(int(r.content.metric_records[wire.METRICS][wire.M_NUM_EXAMPLES])
                 for r in replies) / SETTINGS.max_weight
    step = 2 * SETTINGS.clip / (2**SETTINGS.bits - 1)
    assert 0 < norm <= clip + np.sqrt(coords) * len(NODES) * step / weight, norm


@pytest.mark.parametrize("override, named", [
    ({"strategy": "krum"}, "strategy='krum'"),
    ({"strategy": "fedmedian"}, "strategy='fedmedian'"),
    ({"central-dp": "server"}, "central-dp='server'"),
    ({"min-train-nodes": 1, "min-available-nodes": 1}, "min-train-nodes >= 2"),
])
def test_impossible_combinations_are_refused_at_start(override, named):
    with pytest.raises(RunConfigError, match="secure-aggregation=true") as exc:
        RunConfig.parse({**pyproject_defaults(), "secure-aggregation": True, **override})
    assert named in str(exc.value)


def test_client_side_central_dp_and_fedprox_combine_with_it():
    for override in ({"central-dp": "client"}, {"strategy": "fedprox", "proximal-mu": 0.01}):
        run = RunConfig.parse({**pyproject_defaults(), "secure-aggregation": True, **override})
        assert run.secure_aggregation


# ----------------------------------------------------------------- a lying coordinator


def _stage(msg: Message) -> str | None:
    records = msg.content.config_records
    return records[RECORD_KEY_CONFIGS].get(Key.STAGE) if RECORD_KEY_CONFIGS in records else None


class ListsBothGrid(LoopbackGrid):
    """A coordinator that runs the protocol honestly until the unmask stage, then lists
    `target` to every node as active (asking for its share of the target's mask seed) and
    as dropped (its share of the target's mask key). It keeps the answers for itself and
    tells Flower's workflow that nobody answered (the round halts; the theft is done)."""

    def __init__(self, contexts: dict[int, Context], target: int) -> None:
        super().__init__(contexts)
        self.target = target

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        msgs = list(messages)
        for msg in msgs:
            if _stage(msg) == Stage.UNMASK:
                cfg = msg.content.config_records[RECORD_KEY_CONFIGS]
                cfg[Key.DEAD_NODE_ID_LIST] = [*cfg[Key.DEAD_NODE_ID_LIST], self.target]
        ids = super().push_messages(msgs)
        for msg, i in zip(msgs, ids, strict=True):
            if _stage(msg) == Stage.UNMASK:
                self._waiting.pop(i, None)
        return ids


def _stolen_update(grid: LoopbackGrid, target: int, threshold: int) -> np.ndarray | None:
    """What the coordinator reads of `target`'s own update from the shares the nodes sent
    in the unmask stage: its quantised update, or None when it holds fewer than
    `threshold` shares of its mask seed or of its mask key."""
    seeds, keys, pk1, masked = [], [], {}, None
    for node, sent, reply in grid.replies:
        if reply.has_error():
            continue
        got = reply.content.config_records[RECORD_KEY_CONFIGS]
        if _stage(sent) == Stage.SETUP:
            pk1[node] = got[Key.PUBLIC_KEY_1]
        elif _stage(sent) == Stage.COLLECT_MASKED_VECTORS and node == target:
            masked = [bytes_to_ndarray(b) for b in got[Key.MASKED_PARAMETERS]]
        elif _stage(sent) == Stage.UNMASK:
            n_active = len(sent.content.config_records[RECORD_KEY_CONFIGS][
                Key.ACTIVE_NODE_ID_LIST])
            for i, (owner, share) in enumerate(zip(got[Key.NODE_ID_LIST], got[Key.SHARE_LIST],
                                                   strict=True)):
                if owner == target:
                    (seeds if i < n_active else keys).append(share)
    if masked is None or len(seeds) < threshold or len(keys) < threshold:
        return None
    mod, dims = 2**MODULUS_BITS, [a.shape for a in masked]
    vector = parameters_subtraction(masked, pseudo_rand_gen(combine_shares(seeds), mod, dims))
    sk1 = bytes_to_private_key(combine_shares(keys))
    for other in (n for n in pk1 if n != target):
        mask = pseudo_rand_gen(generate_shared_key(sk1, bytes_to_public_key(pk1[other])),
                               mod, dims)
        vector = (parameters_subtraction(vector, mask) if target > other
                  else parameters_addition(vector, mask))
    vector = parameters_mod(vector, mod)  # [0] is the weight factor
    return np.concatenate([a.ravel() for a in vector[1:]]).astype(np.float64)


@pytest.mark.parametrize("guarded", [True, False], ids=["medfuse-node", "flower-mod-alone"])
def test_a_coordinator_listing_a_node_active_and_dropped_cannot_read_its_update(
    three_sites, tmp_path, monkeypatch, guarded
):
    # Prepare: each node's real update (plain path); a coordinator that will list node 202
    # as both active and dropped in the unmask stage. Unguarded is Flower's mod on its own
    # (the node's check switched off): there the attack reads the node's update, which
    # shows that the attack and its decoding are real.
    state = _global()
    updates = _plain_updates(_run_config(three_sites, tmp_path / "plain"), state)
    target = 202
    if not guarded:
        monkeypatch.setattr(client.secure, "secagg_refusal", lambda *a: "")
    grid = ListsBothGrid(_contexts(_run_config(three_sites, tmp_path / "secure")), target)
    # Execute
    _, replies = _secure({}, state, grid=grid)
    # Assert
    assert replies == []  # the coordinator gave up the round to steal one update
    stolen = _stolen_update(grid, target, threshold=2)
    unmask = [reply for _, sent, reply in grid.replies if _stage(sent) == Stage.UNMASK]
    assert len(unmask) == len(NODES)
    truth = np.concatenate([updates[target][1][k].ravel() for k in state])
    if not guarded:
        assert stolen is not None and np.corrcoef(stolen, truth)[0, 1] > 0.99
        return
    # every honest node refused with the reason, and sent no share at all
    assert all(r.has_error() and "both as active and as dropped" in r.error.reason
               for r in unmask), [r.error.reason if r.has_error() else r for r in unmask]
    assert stolen is None
    # and each forgot the round's keys: a second, honest-looking unmask request gets nothing
    for node, ctx in grid.contexts.items():
        again = Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({
            Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: list(NODES),
            Key.DEAD_NODE_ID_LIST: []})}), dst_node_id=node, message_type="train",
            group_id="1")
        reply = app(again, ctx)  # Flower's mod raises "expect setup stage": a code only
        assert reply.has_error() and reply.error.reason == wire.ERR_INTERNAL


def test_a_round_below_the_nodes_threshold_floor_halts_before_any_training(
    three_sites, tmp_path
):
    # Prepare: the round splits keys into 3 parts, 2 rebuild one (threshold 0.66); these
    # hospitals accept only a threshold above 0.7 of the parts
    state = _global()
    store = tmp_path / "secure"
    run_config = _run_config(three_sites, store, node=", secagg-min-threshold=0.7")
    # Execute
    grid, replies = _secure(run_config, state)
    # Assert: every node refused the setup, naming its node config key; the round halted
    # with no update, nothing was trained and no privacy spent
    assert replies == []
    setup = [reply for _, sent, reply in grid.replies if _stage(sent) == Stage.SETUP]
    assert len(setup) == len(NODES)
    assert all(r.has_error() and "secagg-min-threshold=0.7" in r.error.reason for r in setup)
    assert all(_stage(sent) == Stage.SETUP for _, sent, _ in grid.replies)
    assert not store.exists() or not LedgerStore(store).keys()
