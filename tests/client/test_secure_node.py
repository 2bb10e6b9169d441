"""The node's side of SecAgg+ (`client.secure`): what it refuses of a coordinator's setup and
unmask requests, played as hand-built messages to the ClientApp of a deployed node. The
whole protocol against a lying coordinator runs in tests/server/test_secure.py."""

import logging
import time
from pathlib import Path

import pytest
from flwr.app import DEFAULT_TTL, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)

from client.app import app
from client.secure import secagg_refusal
from client.site import NodeConfig
from shared_model.contract import wire
from shared_model.contract.run_config import pyproject_defaults

NODE_ID = 11


def _context(site: Path, tmp_path: Path, **node_keys: object) -> Context:
    run_config = {**pyproject_defaults(), "image-size": 32, "secure-aggregation": True}
    node = {"data-path": str(site), "state-dir": str(tmp_path / "state"), **node_keys}
    return Context(run_id=7, node_id=NODE_ID, node_config=node, state=RecordDict(),
                   run_config=run_config)


def _secagg(**configs: object) -> Message:
    """One SecAgg+ message as Flower's workflow sends it: only its config record."""
    meta = Metadata(run_id=7, message_id=f"m{time.monotonic_ns()}", src_node_id=1,
                    dst_node_id=NODE_ID, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=DEFAULT_TTL, message_type="train")
    return Message(content=RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs)}),
                   metadata=meta)


def _setup(shares: int, threshold: int) -> Message:
    return _secagg(**{Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: max(shares, 3),
                      Key.SHARE_NUMBER: shares, Key.THRESHOLD: threshold,
                      Key.CLIPPING_RANGE: 2.0, Key.TARGET_RANGE: 2**24,
                      Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: 100.0})


def _keys_sent(reply: Message) -> bool:
    return (not reply.has_error()
            and Key.PUBLIC_KEY_1 in reply.content.config_records[RECORD_KEY_CONFIGS])


@pytest.mark.parametrize(("shares", "threshold", "named"), [
    (3, 1, "secagg-min-threshold=0.5"),  # one part of three rebuilds a key
    (4, 2, "secagg-min-threshold=0.5"),  # exactly half: the split-view attack still works
    (1, 1, "secagg-min-shares=2"),  # one part: the node's own part is its mask seed
])
def test_a_setup_a_lying_coordinator_could_undo_is_refused(
    tiny_federation: list[Path], tmp_path: Path, shares: int, threshold: int, named: str
) -> None:
    # Prepare
    ctx = _context(tiny_federation[0], tmp_path)
    # Execute
    reply = app(_setup(shares, threshold), ctx)
    # Assert: an error naming the value and the node config key; no public key sent
    assert reply.has_error() and not _keys_sent(reply)
    assert reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert named in reply.error.reason and f"={threshold}" in reply.error.reason
    assert RECORD_KEY_STATE not in ctx.state.config_records


@pytest.mark.parametrize(("shares", "threshold"), [(3, 2), (4, 3), (2, 2), (10, 7)])
def test_a_majority_setup_is_answered(tiny_federation: list[Path], tmp_path: Path,
                                      shares: int, threshold: int) -> None:
    reply = app(_setup(shares, threshold), _context(tiny_federation[0], tmp_path))
    assert _keys_sent(reply)


def test_the_hospital_raises_its_own_floor(tiny_federation: list[Path], tmp_path: Path) -> None:
    # Prepare: a hospital that wants at least 5 parts and a two-thirds threshold
    ctx = _context(tiny_federation[0], tmp_path, **{"secagg-min-shares": 5,
                                                    "secagg-min-threshold": 0.66})
    # Execute
    few = app(_setup(3, 2), ctx)
    low = app(_setup(6, 3), ctx)
    ok = app(_setup(6, 4), ctx)
    # Assert
    assert few.has_error() and "secagg-min-shares=5" in few.error.reason
    assert low.has_error() and "secagg-min-threshold=0.66" in low.error.reason
    assert _keys_sent(ok)


def test_a_refused_setup_forgets_the_previous_one(tiny_federation: list[Path],
                                                  tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: an honest setup, then a weak one in its place
    ctx = _context(tiny_federation[0], tmp_path)
    assert _keys_sent(app(_setup(3, 2), ctx))
    assert app(_setup(3, 1), ctx).has_error()
    # Execute: the coordinator goes on as if the first setup stood
    share_keys = _secagg(**{Key.STAGE: Stage.SHARE_KEYS})
    # Assert: the node holds no round to go on with (Flower's mod wants a new setup and
    # raises; the server gets the code only, the reason stays in the node's log)
    with caplog.at_level(logging.ERROR):
        reply = app(share_keys, ctx)
    assert reply.has_error() and reply.error.reason == wire.ERR_INTERNAL
    assert "expect setup stage" in caplog.text


@pytest.mark.parametrize(("active", "dropped", "named"), [
    ([NODE_ID, 22, 33], [33], "node(s) 33 listed both as active and as dropped"),
    ([NODE_ID, 22, 33], [22, 33], "node(s) 22, 33 listed both"),
    ([22, 33], [NODE_ID], f"this node ({NODE_ID}) is listed as dropped"),
])
def test_an_unmask_request_for_both_secrets_of_a_node_is_refused(
    tiny_federation: list[Path], tmp_path: Path, active: list[int], dropped: list[int],
    named: str
) -> None:
    # Prepare
    ctx = _context(tiny_federation[0], tmp_path)
    msg = _secagg(**{Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active,
                     Key.DEAD_NODE_ID_LIST: dropped})
    # Execute
    reply = app(msg, ctx)
    # Assert: an error with the reason, no share list
    assert reply.has_error() and named in reply.error.reason, reply


def test_what_the_node_answers_unchanged() -> None:
    # an honest unmask (a neighbour dropped, the others alive) and the middle stages pass
    node = NodeConfig()
    honest = {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [NODE_ID, 22],
              Key.DEAD_NODE_ID_LIST: [33]}
    assert secagg_refusal(honest, NODE_ID, node) == ""
    assert secagg_refusal({Key.STAGE: Stage.SHARE_KEYS}, NODE_ID, node) == ""
    assert secagg_refusal({Key.STAGE: Stage.COLLECT_MASKED_VECTORS}, NODE_ID, node) == ""
    # a malformed list or count is refused rather than guessed at
    assert "node ids" in secagg_refusal({**honest, Key.DEAD_NODE_ID_LIST: "33"}, NODE_ID, node)
    assert "integers" in secagg_refusal({Key.STAGE: Stage.SETUP, Key.SHARE_NUMBER: 3,
                                         Key.THRESHOLD: 2.0}, NODE_ID, node)
