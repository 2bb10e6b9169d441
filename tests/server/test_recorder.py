"""The recorder's audit entry of a train reply: the digest of the arrays as the node sent
them (a compressed update's 16-bit arrays, not the weights the guard decodes from them),
from the guard's one reading of them."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

from server.guard import ReplyGuard
from server.recorder import Recorder
from shared_model import audit_log
from shared_model.contract import wire
from tests.server.fakes import FakeGrid, array_record, train_reply


def _state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"enc.weight": rng.standard_normal((3, 4)).astype(np.float32),
            "enc.bias": rng.standard_normal(4).astype(np.float32),
            "steps": np.array([3], dtype=np.int64)}


def test_the_audit_digest_is_of_the_arrays_as_each_node_sent_them(tmp_path):
    # Prepare: a float32 reply, a float16 update, and one left out (too far from the model)
    state = _state()
    rng = np.random.default_rng(1)
    sent = {
        "site-a": {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype)
                   if v.dtype.kind == "f" else v for k, v in state.items()},
        "site-b": {k: (0.01 * rng.standard_normal(v.shape)).astype(np.float16)
                   if v.dtype.kind == "f" else v for k, v in state.items()},
        "site-c": {k: v + 100 if v.dtype.kind == "f" else v for k, v in state.items()},
    }
    log = tmp_path / audit_log.LOG_FILE
    recorder = Recorder(ReplyGuard(FedAvg(min_train_nodes=1, min_available_nodes=1),
                                   max_norm=10.0), audit_log=log)
    grid = FakeGrid({1: None, 2: None, 3: None})
    messages = list(recorder.configure_train(1, array_record(state), ConfigRecord(), grid))
    replies = []
    for msg, (site, arrays) in zip(messages, sent.items(), strict=True):
        reply = train_reply(msg, site=site, arrays=arrays, num_examples=4)
        if site == "site-b":
            reply.content.config_records[wire.SITE][wire.SITE_UPDATE] = "delta-float16"
        replies.append(reply)
    # Execute
    recorder.aggregate_train(1, replies)
    # Assert: each entry holds the summary of what that node sent; the guard's is the same
    entries = {e["who"].split()[0]: e for e in audit_log.verify(log)}
    verdicts = {j.site: j.verdict for j in recorder.guard.judged}
    assert verdicts["site-a"] == verdicts["site-b"] == "accepted"
    assert verdicts["site-c"].startswith("update norm")
    for site, arrays in sent.items():
        want = audit_log.arrays_summary(arrays)
        assert entries[site]["arrays"] == want, site
        assert [j.received for j in recorder.guard.judged if j.site == site] == [want]
    assert {a["dtype"] for a in entries["site-b"]["arrays"]["arrays"]} == {"float16", "int64"}


def test_a_reply_whose_arrays_cannot_be_read_is_left_out_and_entered_not_fatal(tmp_path):
    # Prepare: a node sends, unpacked, an array whose bytes are not a NumPy array (a
    # crafted reply); the other node's is fine
    from flwr.app import Array, ArrayRecord

    state = _state()
    log = tmp_path / audit_log.LOG_FILE
    recorder = Recorder(ReplyGuard(FedAvg(min_train_nodes=1, min_available_nodes=1),
                                   max_norm=10.0), audit_log=log)
    grid = FakeGrid({1: None, 2: None})
    first, second = recorder.configure_train(1, array_record(state), ConfigRecord(), grid)
    good = train_reply(first, site="site-a", arrays=state, num_examples=4)
    bad = train_reply(second, site="site-b", arrays=state, num_examples=4)
    bad.content.array_records[wire.ARRAYS] = ArrayRecord({
        name: Array(dtype="float32", shape=(3, 4), stype="numpy.ndarray", data=b"not npy")
        for name in state})
    # Execute
    arrays, _ = recorder.aggregate_train(1, [good, bad])
    # Assert: the round went on without it, and the audit log says so
    verdicts = {j.site: j.verdict for j in recorder.guard.judged}
    assert verdicts["site-a"] == "accepted"
    assert verdicts["site-b"].startswith("arrays cannot be read")
    assert arrays is not None
    entries = {e["who"].split()[0]: e for e in audit_log.verify(log)}
    assert "unreadable" in entries["site-b"]["arrays"]
    assert entries["site-b"]["verdict"] == verdicts["site-b"]
