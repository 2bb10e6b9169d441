"""The ClientApp called directly with a hand-built Context and Message (no simulation)."""

import json
import math
import time
from pathlib import Path

import pytest
import torch
from flwr.app import (
    DEFAULT_TTL,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    Metadata,
    RecordDict,
)
from opacus.accountants.analysis import rdp as rdp_analysis

from client.app import app
from client.privacy import INDEX_FILE, LedgerError, LedgerStore, default_store_root, history_epsilon
from client.release import COUNT_NOISE
from client.site import SiteConfigError, resolve_site, synthetic_name, synthetic_sites
from shared_model.config import DEFAULT_LABELS
from shared_model.contract import wire
from shared_model.contract.packing import unpacked
from shared_model.contract.run_config import RunConfig, pyproject_defaults
from shared_model.dataset import open_site
from shared_model.model import MedFuseModel
from shared_model.tokenizer import Tokenizer

# under DP: no training loss (a crafted model turns it into a label count) and no compute
# time (a crafted model makes it tell one case apart)
TRAIN_KEYS = {
    wire.M_NUM_EXAMPLES, wire.M_UNIT_WEIGHT, wire.M_EPSILON, wire.M_DELTA, wire.M_BUDGET_LEFT,
    wire.M_BUDGET_SPENT, wire.M_DATA_ERROR, wire.M_REFUSED,
}


def _run_config(tiny_federation: list[Path], tmp_path: Path, **overrides: object) -> dict:
    flat = pyproject_defaults()
    flat.update({
        "sites-dir": str(tiny_federation[0].parent), "image-size": 32, "batch-size": 8,
        "output-dir": str(tmp_path / "out"), "num-server-rounds": 2, "noise-multiplier": 1.0,
        "epsilon": 50.0, "sim-node-config": f"state-dir={str(tmp_path / 'store')!r}",
    })
    flat.update(overrides)
    return flat


SIM_SITE = "site-00"  # the folder of partition 0 (SIM_NODE) in tiny_federation


def _store(tmp_path: Path, site: str = SIM_SITE) -> LedgerStore:
    """The ledger store of a simulated hospital: its own, under the run's state-dir."""
    return LedgerStore(tmp_path / "store" / site)


def _only_ledger(tmp_path: Path):
    (key,) = _store(tmp_path).keys()
    return _store(tmp_path).load(key)


def _context(run_config: dict, node_config: dict, node_id: int = 11) -> Context:
    return Context(run_id=4242, node_id=node_id, node_config=node_config, state=RecordDict(),
                   run_config=run_config)


def _message(kind: str, state: dict, server_round: int = 1, total: int = 2) -> Message:
    content = RecordDict({
        wire.ARRAYS: ArrayRecord(state),
        wire.CONFIG: ConfigRecord({
            wire.CFG_SERVER_ROUND: server_round, wire.CFG_LOCAL_EPOCHS: 1, wire.CFG_LR: 1e-3,
            wire.CFG_PROXIMAL_MU: 0.0, wire.CFG_TOTAL_ROUNDS: total,
        }),
    })
    meta = Metadata(run_id=4242, message_id=f"m{server_round}{kind}", src_node_id=1,
                    dst_node_id=11, reply_to_message_id="", group_id=str(server_round),
                    created_at=time.time(), ttl=DEFAULT_TTL, message_type=kind)
    return Message(content=content, metadata=meta)


@pytest.fixture(scope="module")
def global_state() -> dict[str, torch.Tensor]:
    run = RunConfig.parse({**pyproject_defaults(), "image-size": 32})
    torch.manual_seed(0)
    return MedFuseModel(run.model()).state_dict()


SIM_NODE = {"partition-id": 0, "num-partitions": 2}


def _call(msg: Message, ctx: Context) -> Message:
    """The ClientApp as the server sees it: the reply's arrays unpacked (server/grid.py)."""
    return unpacked(app(msg, ctx))


def _scalars(reply: Message) -> dict:
    return dict(reply.content.metric_records[wire.METRICS])


def test_train_reply_holds_only_arrays_and_scalars(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict
) -> None:
    # Prepare
    ctx = _context(_run_config(tiny_federation, tmp_path), SIM_NODE)
    # Execute
    start = time.perf_counter()
    reply = _call(_message("train", global_state), ctx)
    seconds = time.perf_counter() - start
    print(f"one DP round on a tiny site: {seconds:.2f} s")
    # Assert
    assert not reply.has_error()
    content = reply.content
    assert set(content.keys()) == {wire.ARRAYS, wire.METRICS, wire.SITE}
    arrays = content.array_records[wire.ARRAYS]
    assert list(arrays.keys()) == list(global_state.keys())
    for name, t in arrays.to_torch_state_dict().items():
        assert t.shape == global_state[name].shape and t.dtype == global_state[name].dtype
    scalars = _scalars(reply)
    assert set(scalars) == TRAIN_KEYS
    assert all(isinstance(v, int | float) for v in scalars.values())
    assert scalars[wire.M_BUDGET_SPENT] == 0 and scalars[wire.M_DATA_ERROR] == 0
    assert scalars[wire.M_NUM_EXAMPLES] > 0
    site = dict(content.config_records[wire.SITE])
    # the arrays are the trained weights (update-dtype float32: no compressed update)
    assert site == {wire.SITE_NAME: tiny_federation[0].name, wire.SITE_ERROR: "",
                    wire.SITE_DETAIL: "", wire.SITE_UPDATE: ""}


def test_ledger_carries_over_rounds_and_restarts(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict
) -> None:
    run_config = _run_config(tiny_federation, tmp_path)
    # Execute: round 1, then round 2 on a fresh Context (a restarted node: state wiped)
    r1 = _call(_message("train", global_state, 1), _context(run_config, SIM_NODE))
    new_state = r1.content.array_records[wire.ARRAYS].to_torch_state_dict()
    r2 = _call(_message("train", new_state, 2), _context(run_config, SIM_NODE))
    # Assert: the reply's epsilon is the cumulative total over the ledger's history,
    # as an independent RDP analysis computes it
    ledger = _only_ledger(tmp_path)
    assert [(e.kind, e.server_round) for e in ledger.entries] == [
        ("count", 1), ("dp-sgd", 1), ("dp-sgd", 2)]
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = sum(rdp_analysis.compute_rdp(q=e.sample_rate, noise_multiplier=e.noise_multiplier,
                                       steps=e.steps, orders=orders) for e in ledger.entries)
    expected, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    eps1, eps2 = _scalars(r1)[wire.M_EPSILON], _scalars(r2)[wire.M_EPSILON]
    assert 0 < eps1 < eps2
    assert eps2 == pytest.approx(float(expected), rel=1e-9)
    assert _scalars(r2)[wire.M_BUDGET_LEFT] == pytest.approx(50.0 - eps2)


def test_site_stops_at_its_budget_and_says_so(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict
) -> None:
    # Prepare: round 1 at noise 1.0; then the node lowers its budget to between what one
    # and what two such rounds cost
    run_config = _run_config(tiny_federation, tmp_path)
    ok = _call(_message("train", global_state, 1), _context(run_config, SIM_NODE))
    ledger = _only_ledger(tmp_path)
    count, entry = ledger.entries
    one = _scalars(ok)[wire.M_EPSILON]
    two = history_epsilon([(COUNT_NOISE, 1.0, 1),
                           (entry.noise_multiplier, entry.sample_rate, 2 * entry.steps)], 1e-5)
    node = {**SIM_NODE, "epsilon-budget": (one + two) / 2}
    # Execute
    reply = _call(_message("train", global_state, 2), _context(run_config, node))
    # Assert: no update, the budget flag, the epsilon spent so far and a reason
    scalars = _scalars(reply)
    assert wire.ARRAYS not in reply.content.array_records
    assert scalars[wire.M_BUDGET_SPENT] == 1 and scalars[wire.M_NUM_EXAMPLES] == 0
    assert scalars[wire.M_EPSILON] == pytest.approx(one)
    assert scalars[wire.M_BUDGET_LEFT] == pytest.approx((two - one) / 2)
    site = reply.content.config_records[wire.SITE]
    assert site[wire.SITE_ERROR] == wire.ERR_BUDGET_SPENT
    # the ledger's figures, which a budget refusal may quote
    assert "budget" in site[wire.SITE_DETAIL]
    assert tiny_federation[0].name in site[wire.SITE_DETAIL]
    assert len(_only_ledger(tmp_path).entries) == 2  # nothing spent, nothing sent


def test_missing_data_path_is_a_data_error_reply(tmp_path: Path, global_state: dict,
                                                 tiny_federation: list[Path]) -> None:
    node = {"data-path": str(tmp_path / "nowhere"), "state-dir": str(tmp_path / "state")}
    reply = _call(_message("train", global_state),
                _context(_run_config(tiny_federation, tmp_path), node))
    scalars = _scalars(reply)
    assert scalars[wire.M_DATA_ERROR] == 1 and scalars[wire.M_NUM_EXAMPLES] == 0
    assert wire.ARRAYS not in reply.content.array_records
    site = dict(reply.content.config_records[wire.SITE])
    # the code alone: the node's text names the folder
    assert site == {wire.SITE_NAME: "nowhere", wire.SITE_ERROR: wire.ERR_NODE_CONFIG,
                    wire.SITE_DETAIL: ""}


def test_unusable_site_is_a_data_error_reply(tmp_path: Path, global_state: dict,
                                             tiny_federation: list[Path]) -> None:
    bad = tmp_path / "bad-site"
    bad.mkdir()
    (bad / "manifest.csv").write_text("case_id,image,report,label\nc1,missing.png,,normal\n")
    node = {"data-path": str(bad), "state-dir": str(tmp_path / "state")}
    run_config = _run_config(tiny_federation, tmp_path)
    for kind in ("train", "evaluate"):
        reply = _call(_message(kind, global_state), _context(run_config, node))
        assert _scalars(reply)[wire.M_DATA_ERROR] == 1
        site = reply.content.config_records[wire.SITE]
        assert site[wire.SITE_ERROR] == wire.ERR_DATA_UNREADABLE and site[wire.SITE_DETAIL] == ""
    assert not (tmp_path / "state" / INDEX_FILE).exists()


def test_evaluate_reply(tiny_federation: list[Path], tmp_path: Path, global_state: dict) -> None:
    reply = _call(_message("evaluate", global_state),
                _context(_run_config(tiny_federation, tmp_path), SIM_NODE))
    content = reply.content
    assert set(content.keys()) == {wire.METRICS, wire.SITE}
    scalars = _scalars(reply)
    assert {wire.M_NUM_EXAMPLES, wire.M_ACCURACY, wire.M_MACRO_F1, wire.M_EPSILON,
            wire.M_EVAL_EPSILON, wire.M_DELTA} <= set(scalars)
    assert wire.M_LOSS not in scalars and wire.M_AUROC not in scalars  # not private sums
    assert wire.M_SECONDS not in scalars  # no clock reading beside a DP release
    assert scalars[wire.M_PRIVATE_METRICS] == 1
    assert all(math.isfinite(v) for v in scalars.values())
    assert scalars[wire.M_EPSILON] == 0.0  # nothing trained on this data yet
    assert 0 < scalars[wire.M_EVAL_EPSILON] <= 2.0  # charged to the evaluation budget
    assert _only_ledger(tmp_path).entries[-1].kind == "evaluation"


def test_deployment_site_choice(tmp_path: Path, tiny_federation: list[Path]) -> None:
    run = RunConfig.parse(_run_config(tiny_federation, tmp_path))
    choice = resolve_site({"data-path": str(tiny_federation[1]), "device": "cpu",
                           "threads": 2, "epsilon-budget": 3.0}, run)
    assert choice.site_name == tiny_federation[1].name and choice.threads == 2
    assert choice.state_dir == default_store_root()  # one store per node install
    assert choice.epsilon_budget == 3.0 and not choice.simulation
    assert not choice.node.allow_non_private and choice.node.evaluation == "dp"
    sim = resolve_site({"partition-id": 1, "num-partitions": 2}, run)
    assert sim.data_path == tiny_federation[1]
    # a store of its own under the run's sim-node-config state-dir
    assert sim.state_dir == (tmp_path / "store").resolve() / tiny_federation[1].name
    assert sim.threads == 1 and sim.device == "auto"
    # a deployed node never reads sim-node-config
    lax = RunConfig.parse(_run_config(tiny_federation, tmp_path,
                                      **{"sim-node-config": "allow-non-private=true"}))
    assert not resolve_site({"data-path": str(tiny_federation[1])}, lax).node.allow_non_private


@pytest.mark.parametrize(
    "node, match",
    [
        ({}, "no data"),
        ({"partition-id": 5, "num-partitions": 6}, "holds only 2"),
        ({"data-path": "/nonexistent/site"}, "no such folder"),
        ({"data-path": "/tmp", "device": "tpu"}, "device"),
        ({"data_path": "/tmp"}, "data_path"),
    ],
)
def test_bad_node_config(node: dict, match: str, tmp_path: Path,
                         tiny_federation: list[Path]) -> None:
    run = RunConfig.parse(_run_config(tiny_federation, tmp_path))
    with pytest.raises(SiteConfigError, match=match):
        resolve_site(node, run)


def test_synthetic_federation_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunConfig.parse({**pyproject_defaults(), "image-size": 32, "synth-sites": 2,
                           "synth-cases-per-site": 10})
    first = synthetic_sites(run, cache=tmp_path)
    assert first == tmp_path / synthetic_name(run)
    assert len([p for p in first.iterdir() if (p / "manifest.csv").exists()]) == 2

    def no_write(*args: object, **kwargs: object) -> None:
        raise AssertionError("written twice")

    monkeypatch.setattr("shared_model.tooling.synth.write_federation", no_write)
    assert synthetic_sites(run, cache=tmp_path) == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp folder left


def test_synthetic_federation_race_keeps_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: another ClientApp finishes writing the same federation while this one writes
    import shared_model.tooling.synth as synth

    run = RunConfig.parse({**pyproject_defaults(), "image-size": 32, "synth-sites": 2,
                           "synth-cases-per-site": 10})
    target = tmp_path / synthetic_name(run)
    real = synth.write_federation

    def racing(out: Path, cfg: object, **kwargs: object) -> list[Path]:
        real(target, cfg)  # the other node wins the rename
        (target / "winner").write_text("")
        return real(out, cfg, **kwargs)

    monkeypatch.setattr(synth, "write_federation", racing)
    # Execute
    got = synthetic_sites(run, cache=tmp_path)
    # Assert: the winner's folder is kept, ours discarded, no temp folder left
    assert got == target and (target / "winner").exists()
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


# ----------------------------------------------------------------- a curious server's attacks


def test_dp_false_from_the_federation_is_refused_by_default(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict
) -> None:
    run_config = _run_config(tiny_federation, tmp_path, dp=False)
    reply = _call(_message("train", global_state), _context(run_config, SIM_NODE))
    scalars = _scalars(reply)
    assert scalars[wire.M_REFUSED] == 1 and wire.ARRAYS not in reply.content.array_records
    site = reply.content.config_records[wire.SITE]
    assert site[wire.SITE_ERROR] == wire.ERR_POLICY
    assert "allow-non-private" in site[wire.SITE_DETAIL]  # the policy's words: no data
    assert _store(tmp_path).keys() == []  # nothing released, nothing recorded


def test_an_allowed_non_private_round_spends_the_budget_for_good(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict
) -> None:
    store = f"state-dir={str(tmp_path / 'store')!r}, allow-non-private=true"
    plain = _run_config(tiny_federation, tmp_path, dp=False, **{"sim-node-config": store})
    reply = _call(_message("train", global_state), _context(plain, SIM_NODE))
    assert _scalars(reply)[wire.M_REFUSED] == 0 and wire.M_TRAIN_LOSS in _scalars(reply)
    assert wire.M_SECONDS in _scalars(reply)  # a non-private round may say how long it took
    assert [e.kind for e in _only_ledger(tmp_path).entries] == ["non-private"]
    # a later private run on the same data finds nothing left to spend
    private = _run_config(tiny_federation, tmp_path, **{"sim-node-config": store})
    later = _call(_message("train", global_state, 1), _context(private, SIM_NODE))
    assert _scalars(later)[wire.M_BUDGET_SPENT] == 1
    assert math.isinf(_scalars(later)[wire.M_EPSILON])


def test_a_crafted_train_round_recovers_no_label_count(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict
) -> None:
    # Prepare: the attack. An all-zero model with a large class-0 bias and lr=0: the
    # weights come back unchanged and the training loss counts the non-class-0 cases.
    crafted = {k: torch.zeros_like(v) for k, v in global_state.items()}
    crafted["classifier.bias"][0] = 50.0
    run_config = _run_config(tiny_federation, tmp_path)
    msg = _message("train", crafted)
    msg.content.config_records[wire.CONFIG][wire.CFG_LR] = 0.0
    # Execute
    refused = _call(msg, _context(run_config, SIM_NODE))
    honest = _call(_message("train", crafted), _context(run_config, SIM_NODE))
    # Assert: lr=0 is outside what the node accepts; a round it accepts releases no loss,
    # and its count is the one noised count the ledger charged
    assert _scalars(refused)[wire.M_REFUSED] == 1
    assert refused.content.config_records[wire.SITE][wire.SITE_ERROR] == wire.ERR_POLICY
    assert "lr=0" in refused.content.config_records[wire.SITE][wire.SITE_DETAIL]
    scalars = _scalars(honest)
    assert wire.M_TRAIN_LOSS not in scalars and set(scalars) == TRAIN_KEYS
    ledger = _only_ledger(tmp_path)
    assert scalars[wire.M_NUM_EXAMPLES] == ledger.released_count
    assert [e.kind for e in ledger.entries] == ["count", "dp-sgd"]


def test_crafted_evaluations_recover_no_label_counts(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict
) -> None:
    # Prepare: the attack. Six evaluate calls, each with a model that predicts one class
    # for every case: accuracy x num-examples would be that class's count in the split.
    run = RunConfig.parse(_run_config(tiny_federation, tmp_path))
    site = open_site(tiny_federation[0], labels=DEFAULT_LABELS, model=run.model(),
                     tokenizer=Tokenizer(run.model().vocab_size))
    truth = torch.bincount(site.val.label_ids, minlength=5).tolist()
    run_config = _run_config(tiny_federation, tmp_path)
    recovered, replies = [], []
    for c in range(6):
        crafted = {k: v.clone() for k, v in global_state.items()}
        crafted["classifier.weight"].zero_()
        crafted["classifier.bias"].fill_(-50.0)
        crafted["classifier.bias"][c % 5] = 50.0
        # rounds 1-6 of a claimed 5-round run
        reply = _call(_message("evaluate", crafted, c + 1, 5), _context(run_config, SIM_NODE))
        replies.append(_scalars(reply))
        if _scalars(reply)[wire.M_REFUSED] == 0:
            s = _scalars(reply)
            recovered.append(round(s[wire.M_ACCURACY] * s[wire.M_NUM_EXAMPLES]))
    # Assert: the node answers at most max-evaluations-per-run (4) of them, each noised and
    # charged to the evaluation budget (round 4's refused: the last is kept for the final
    # model), and the counts it gives are not the true ones
    assert len(recovered) == 4 and [r[wire.M_REFUSED] for r in replies] == [0, 0, 0, 1, 0, 1]
    assert recovered != [truth[c] for c in (0, 1, 2, 4)]
    ledger = _only_ledger(tmp_path)
    assert [e.kind for e in ledger.entries] == ["evaluation"] * 4
    assert 0 < replies[4][wire.M_EVAL_EPSILON] == pytest.approx(ledger.epsilon("evaluation"))
    assert ledger.epsilon("evaluation") <= 2.0


def test_exact_evaluation_is_the_nodes_choice_and_recorded(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict
) -> None:
    node = f"state-dir={str(tmp_path / 'store')!r}, evaluation='exact'"
    run_config = _run_config(tiny_federation, tmp_path, **{"sim-node-config": node})
    scalars = _scalars(_call(_message("evaluate", global_state), _context(run_config, SIM_NODE)))
    assert scalars[wire.M_PRIVATE_METRICS] == 0 and wire.M_LOSS in scalars
    assert math.isinf(scalars[wire.M_EVAL_EPSILON])
    assert wire.M_SECONDS in scalars  # an exact release may say how long it took
    assert [e.kind for e in _only_ledger(tmp_path).entries] == ["exact-evaluation"]


def test_delta_not_well_below_one_over_n_is_refused(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict
) -> None:
    run_config = _run_config(tiny_federation, tmp_path, delta=0.2)
    reply = _call(_message("train", global_state), _context(run_config, SIM_NODE))
    assert _scalars(reply)[wire.M_BUDGET_SPENT] == 1
    site = reply.content.config_records[wire.SITE]
    assert site[wire.SITE_ERROR] == wire.ERR_BUDGET_SPENT and "1/n" in site[wire.SITE_DETAIL]


def test_exact_evaluation_is_not_limited_per_run(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict
) -> None:
    node = f"state-dir={str(tmp_path / 'store')!r}, evaluation='exact', max-evaluations-per-run=1"
    run_config = _run_config(tiny_federation, tmp_path, **{"sim-node-config": node})
    for rnd in (1, 2):
        reply = _call(_message("evaluate", global_state, rnd), _context(run_config, SIM_NODE))
        assert _scalars(reply)[wire.M_REFUSED] == 0


def test_a_site_is_decoded_once_per_process_until_its_folder_changes(
    tiny_federation: list[Path], tmp_path: Path
):
    # Prepare: a private copy of one site, so that changing it touches no other test
    import os
    import shutil

    from client.site import OpenedSites

    site_dir = tmp_path / "site"
    shutil.copytree(tiny_federation[0], site_dir)
    run = RunConfig.parse(_run_config(tiny_federation, tmp_path))
    sites = OpenedSites()
    # Execute
    first = sites.open(site_dir, run)
    again = sites.open(site_dir, run)
    image = next(p for p in sorted(site_dir.rglob("*")) if p.suffix in (".png", ".dcm"))
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file changed
    changed = sites.open(site_dir, run)
    # Assert
    assert again is first
    assert changed is not first and len(changed.train) == len(first.train)


def test_a_pickled_opened_sites_is_the_receiving_processs_own_and_carries_no_data(
    tiny_federation: list[Path], tmp_path: Path
):
    # Flower's Ray backend ships the ClientApp by value with every message: the copy an
    # actor unpickles must be the same cache each time, never the sender's decoded data
    import pickle

    import cloudpickle  # what Ray pickles with

    from client.site import OpenedSites

    run = RunConfig.parse(_run_config(tiny_federation, tmp_path))
    sites = OpenedSites()
    empty = len(pickle.dumps(sites))
    sites.open(tiny_federation[0], run)
    # Execute
    first, again = pickle.loads(pickle.dumps(sites)), pickle.loads(pickle.dumps(sites))
    other = pickle.loads(pickle.dumps(OpenedSites()))
    opened = first.open(tiny_federation[0], run)

    def handler() -> OpenedSites:  # a closure, pickled by value as build_app's handlers are
        return sites

    shipped = [cloudpickle.loads(cloudpickle.dumps(handler))() for _ in range(2)]
    # Assert
    assert len(pickle.dumps(sites)) == empty  # the token only, whatever was opened
    assert again is first and first is not sites and other is not first
    assert again.open(tiny_federation[0], run) is opened  # decoded once in this process
    assert shipped[0] is shipped[1] is first


def test_every_message_is_in_the_nodes_audit_log_and_tampering_is_detected(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict
):
    # Prepare / Execute: a train and an evaluate message through the ClientApp
    from shared_model import audit_log

    run_config = _run_config(tiny_federation, tmp_path)
    trained = _call(_message("train", global_state, 1), _context(run_config, SIM_NODE))
    _call(_message("evaluate", global_state, 1), _context(run_config, SIM_NODE))
    log_file = _store(tmp_path).root / audit_log.LOG_FILE
    entries = audit_log.verify(log_file)
    # Assert: what left the node is what the log says left (digest of the very arrays)
    train, evaluate = entries
    sent = {k: v.numpy() for k, v in trained.content.array_records[wire.ARRAYS].items()}
    assert train["arrays"]["sha256"] == audit_log.arrays_summary(sent)["sha256"]
    assert train["received"]["arrays"]["count"] == len(global_state)
    assert train["metrics"][wire.M_EPSILON] == train["epsilon_after"] > 0
    assert train["epsilon_before"] is None  # the data's first release
    assert evaluate["arrays"] is None and "accuracy" in evaluate["metrics"]
    assert evaluate["epsilon_before"] == pytest.approx(train["epsilon_after"])
    # an edited value, then a cut log: both are refused by verify
    lines = log_file.read_text().splitlines()
    log_file.write_text(lines[0].replace('"who": "', '"who": "x') + "\n" + lines[1] + "\n")
    with pytest.raises(audit_log.AuditLogError, match="changed"):
        audit_log.verify(log_file)
    log_file.write_text(lines[0] + "\n")
    with pytest.raises(audit_log.AuditLogError, match="truncated"):
        audit_log.verify(log_file)


def test_the_audit_logs_epsilon_before_reads_only_the_ledger_of_this_data(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict
):
    # Prepare: one node install trains two data folders into its one store (its
    # data-path changed between runs); the other folder's ledger is then damaged (it
    # would fail to load)
    from shared_model import audit_log

    run_config = _run_config(tiny_federation, tmp_path)
    store = LedgerStore(tmp_path / "node")

    def node(site: Path) -> dict:
        return {"data-path": str(site), "state-dir": str(store.root), "evaluation": "exact"}

    trained = _call(_message("train", global_state, 1),
                    _context(run_config, node(tiny_federation[0])))
    _call(_message("train", global_state, 1), _context(run_config, node(tiny_federation[1])))
    mine = _scalars(trained)[wire.M_EPSILON]
    folder = str(tiny_federation[1].resolve())
    damaged = 0
    for key in store.keys():
        path = store.ledger_path(key)
        data = json.loads(path.read_text())
        if folder in data["data_paths"]:
            path.write_text(json.dumps({**data, "mac": "0" * len(data["mac"])}))
            damaged += 1
    assert damaged == 1
    with pytest.raises(LedgerError):
        store.ledgers()
    # Execute
    _call(_message("evaluate", global_state, 1), _context(run_config, node(tiny_federation[0])))
    # Assert: this data's epsilon, from its own ledger alone
    last = audit_log.verify(store.root / audit_log.LOG_FILE)[-1]
    assert last["what"].startswith("evaluate")
    assert last["epsilon_before"] == pytest.approx(mine)


def _train_and_evaluate(state: dict, server_round: int, total: int) -> Message:
    """A train message that asks the node to evaluate the model it carries first."""
    msg = _message("train", state, server_round, total)
    cfg = msg.content.config_records[wire.CONFIG]
    cfg[wire.CFG_EVALUATE_FIRST] = 1
    cfg[wire.CFG_EVAL_SPLIT] = "test"
    return msg


def test_a_train_message_evaluates_the_model_it_carries_as_an_evaluate_message_would(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict
) -> None:
    # Prepare: exact evaluation, so that the two paths can be compared number for number
    node = f"state-dir={str(tmp_path / 'store')!r}, evaluation='exact'"
    ctx = _context(_run_config(tiny_federation, tmp_path, **{"sim-node-config": node}), SIM_NODE)
    alone = _message("evaluate", global_state, 2, 3)
    alone.content.config_records[wire.CONFIG][wire.CFG_EVAL_SPLIT] = "test"
    # Execute
    reply = _call(_train_and_evaluate(global_state, 2, 3), ctx)
    separate = _scalars(_call(alone, ctx))
    # Assert: the update and, in a record of its own, the evaluation of the incoming model
    assert set(reply.content.keys()) == {wire.ARRAYS, wire.METRICS, wire.EVALUATION, wire.SITE}
    assert set(_scalars(reply)) == TRAIN_KEYS  # the train part is unchanged
    inside = dict(reply.content.metric_records[wire.EVALUATION])
    for key in (wire.M_ACCURACY, wire.M_MACRO_F1, wire.M_IOU, wire.M_NUM_EXAMPLES):
        assert inside[key] == pytest.approx(separate[key]), key
    kinds = [e.kind for e in _only_ledger(tmp_path).entries]
    assert kinds.count("exact-evaluation") == 2 and "dp-sgd" in kinds


def test_evaluations_inside_train_messages_count_towards_the_nodes_cap_and_keep_the_last(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict
) -> None:
    # Prepare: DP evaluation (the default), at most 3 evaluations per run
    node = f"state-dir={str(tmp_path / 'store')!r}, max-evaluations-per-run=3"
    ctx = _context(_run_config(tiny_federation, tmp_path, **{"sim-node-config": node}), SIM_NODE)
    # Execute: rounds 2-4 of 5 each ask for an evaluation of the previous round's model,
    # then the final model's evaluate message, then one more
    replies = [_call(_train_and_evaluate(global_state, rnd, 5), ctx) for rnd in (2, 3, 4)]
    final = _call(_message("evaluate", global_state, 5, 5), ctx)
    extra = _call(_message("evaluate", global_state, 5, 5), ctx)
    # Assert: two evaluations inside train messages (noised), the third refused with the
    # reason (the last is kept for the final model), every round still trained; the final
    # model evaluated; nothing past the cap
    assert [wire.EVALUATION in r.content.metric_records for r in replies] == [True, True, False]
    assert all(r.content.metric_records[wire.EVALUATION][wire.M_PRIVATE_METRICS] == 1
               for r in replies[:2])
    site = replies[2].content.config_records[wire.SITE]
    assert site[wire.SITE_EVALUATION_ERROR] == wire.ERR_POLICY
    why = site[wire.SITE_EVALUATION_DETAIL]
    assert "max-evaluations-per-run" in why and "final model" in why
    assert all(wire.ARRAYS in r.content.array_records for r in replies)
    assert _scalars(final)[wire.M_REFUSED] == 0 and _scalars(extra)[wire.M_REFUSED] == 1
    assert [e.kind for e in _only_ledger(tmp_path).entries].count("evaluation") == 3


def test_the_final_model_is_still_evaluated_after_an_evaluation_inside_the_last_round(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict
) -> None:
    # Prepare: DP evaluation, a 2-round run: round 2's train message evaluates round 1's
    # model, then the final model gets its evaluate message
    ctx = _context(_run_config(tiny_federation, tmp_path), SIM_NODE)
    # Execute
    inside = _call(_train_and_evaluate(global_state, 2, 2), ctx)
    final = _call(_message("evaluate", global_state, 2, 2), ctx)
    # Assert: both released, within the evaluation budget (the noise was planned for two)
    assert wire.EVALUATION in inside.content.metric_records
    assert _scalars(final)[wire.M_REFUSED] == 0
    assert _only_ledger(tmp_path).epsilon("evaluation") <= 2.0
