"""A curious coordinator's attacks on what a node's replies hold besides its DP releases.

Each test calls the ClientApp as a deployed node is called (a hand-built Context whose
node config names the site's folder, and a Message) on two neighbouring sites, one case
apart, and checks that the replies cannot tell them apart except through noise: the same
keys, finite values, no clock reading under DP, and error codes instead of the node's own
words.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message

import client.evaluation as client_evaluation
import client.local as client_local
from client.local import NonFiniteUpdate, local_cases
from client.release import EVAL_SENSITIVITY, case_vectors
from shared_model.config import DEFAULT_LABELS, MANIFEST
from shared_model.contract import wire
from shared_model.contract.metric_registry import noised_macro_f1 as _macro_f1
from shared_model.contract.run_config import RunConfig, pyproject_defaults
from shared_model.dataset import open_site
from shared_model.model import MedFuseModel
from shared_model.tokenizer import Tokenizer
from shared_model.train import CaseResults
from tests.client.crafted import (
    manifest_rows,
    nan_trigger_state,
    unique_word,
    write_manifest_rows,
)
from tests.client.test_app import _call, _context, _message, _run_config, _scalars


@pytest.fixture(scope="module")
def global_state() -> dict[str, torch.Tensor]:
    run = RunConfig.parse({**pyproject_defaults(), "image-size": 32})
    torch.manual_seed(0)
    return MedFuseModel(run.model()).state_dict()


# ----------------------------------------------------------------- neighbouring sites


def _val_neighbours(source: Path, tmp: Path, word: str) -> tuple[Path, Path]:
    """Two copies of a site, named alike: `in` holds a lesion case of the val split (the
    split evaluated) whose report starts with `word`, `out` is the same site without it.
    (`tests.client.crafted.neighbouring_sites` puts its target in the train split.)"""
    fields, rows = manifest_rows(source)
    target = next(i for i, r in enumerate(rows)
                  if r.get("split") == "val" and r.get("bbox_x0"))
    rows[target] = {**rows[target], "report": f"{word} {rows[target]['report']}"}
    sites = []
    for kind, kept in (("in", rows), ("out", rows[:target] + rows[target + 1:])):
        site = tmp / kind / source.name
        shutil.copytree(source, site)
        write_manifest_rows(site, fields, kept)
        sites.append(site)
    return sites[0], sites[1]


def _deployed(run_config: dict, site: Path, state_dir: Path) -> Context:
    """A deployed node's context: its node config names its folder and its ledger store."""
    return _context(run_config, {"data-path": str(site), "state-dir": str(state_dir)})


def _unusable_site(parent: Path, bad_rows: int) -> Path:
    """A site whose every row names an image that is not there."""
    site = parent / "hospital"
    site.mkdir(parents=True)
    lines = [f"c{i},missing-{i}.png,,normal" for i in range(bad_rows)]
    (site / MANIFEST).write_text("case_id,image,report,label\n" + "\n".join(lines) + "\n")
    return site


def _site(reply: Message) -> dict:
    return dict(reply.content.config_records[wire.SITE])


# ----------------------------------------------------------------- the attacks


@pytest.mark.parametrize("modality", ["text", "fused"])
def test_a_nan_trigger_model_cannot_tell_neighbouring_sites_apart_by_keys_or_values(
    modality: str, tiny_federation: list[Path], tmp_path: Path
) -> None:
    # Prepare: neighbouring sites (the target case in, then out) and a model whose outputs
    # are NaN for the target alone: its class probabilities (the box reads the image
    # alone, and a text model draws none). Check that the trigger fires where it should.
    run_config = _run_config(tiny_federation, tmp_path, modality=modality)
    run = RunConfig.parse(run_config)
    tokenizer = Tokenizer(run.model().vocab_size)
    word = unique_word(tiny_federation[0], tokenizer)
    site_in, site_out = _val_neighbours(tiny_federation[0], tmp_path, word)
    torch.manual_seed(0)
    crafted = nan_trigger_state(MedFuseModel(run.model()).state_dict(), word)
    for site, fires in ((site_in, True), (site_out, False)):
        data = open_site(site, labels=DEFAULT_LABELS, model=run.model(), tokenizer=tokenizer)
        cases = local_cases(run.model(), data, crafted, torch.device("cpu"))
        assert int(np.isnan(cases.probs).any(axis=1).sum()) == int(fires)
        assert cases.boxes is None or not np.isnan(cases.boxes).any()
    # Execute: an evaluate message, and a train message that evaluates first, each node
    # with its own ledger store
    replies = {}
    for name, site in (("in", site_in), ("out", site_out)):
        ctx = _deployed(run_config, site, tmp_path / f"store-{name}")
        evaluated = _call(_message("evaluate", crafted, 1, 2), ctx)
        first = _message("train", crafted, 2, 2)
        first.content.config_records[wire.CONFIG][wire.CFG_EVALUATE_FIRST] = 1
        replies[name] = (evaluated, _call(first, ctx))
    # Assert: the same records and keys whether the target is in or out, every released
    # value a finite number, and the site records word for word the same
    (ev_in, tr_in), (ev_out, tr_out) = replies["in"], replies["out"]
    assert set(_scalars(ev_in)) == set(_scalars(ev_out))
    assert (wire.M_IOU in _scalars(ev_in)) is (modality == "fused")  # a text model: no box
    inside_in = dict(tr_in.content.metric_records[wire.EVALUATION])
    inside_out = dict(tr_out.content.metric_records[wire.EVALUATION])
    assert set(inside_in) == set(inside_out)
    assert set(_scalars(tr_in)) == set(_scalars(tr_out))
    for values in (_scalars(ev_in), _scalars(ev_out), inside_in, inside_out):
        assert values[wire.M_PRIVATE_METRICS] == 1
        assert all(math.isfinite(v) for v in values.values()), values
    assert _site(ev_in) == _site(ev_out)
    assert _site(tr_in) == _site(tr_out)


def test_a_data_error_says_the_same_for_47_bad_rows_as_for_46(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict
) -> None:
    # Prepare: two sites one bad row apart, at two different folders
    run_config = _run_config(tiny_federation, tmp_path)
    sites = {n: _unusable_site(tmp_path / f"at-{n}", n) for n in (47, 46)}
    for kind in ("train", "evaluate"):
        # Execute
        replies = {n: _call(_message(kind, global_state),
                            _deployed(run_config, site, tmp_path / f"state-{n}"))
                   for n, site in sites.items()}
        # Assert: the same reply, a code without counts or folders
        site47, site46 = _site(replies[47]), _site(replies[46])
        assert site47 == site46, kind
        assert _scalars(replies[47]) == _scalars(replies[46])
        assert site47 == {wire.SITE_NAME: "hospital", wire.SITE_ERROR: wire.ERR_DATA_UNREADABLE,
                          wire.SITE_DETAIL: ""}
        assert _scalars(replies[47])[wire.M_DATA_ERROR] == 1


def test_no_compute_time_in_a_reply_that_holds_a_dp_release(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict
) -> None:
    # Prepare: the default policy (DP training, DP evaluation), and a node that allows a
    # dp=false round but evaluates under DP, asked to evaluate first
    private = _context(_run_config(tiny_federation, tmp_path), {"partition-id": 0,
                                                               "num-partitions": 2})
    lax = f"state-dir={str(tmp_path / 'lax')!r}, allow-non-private=true"
    plain = _context(_run_config(tiny_federation, tmp_path, dp=False,
                                 **{"sim-node-config": lax}),
                     {"partition-id": 1, "num-partitions": 2})
    first = _message("train", global_state, 2, 2)
    first.content.config_records[wire.CONFIG][wire.CFG_EVALUATE_FIRST] = 1
    # Execute
    trained = _call(_message("train", global_state), private)
    evaluated = _call(_message("evaluate", global_state), private)
    mixed = _call(first, plain)
    # Assert: each holds what it released, and no clock reading
    assert wire.ARRAYS in trained.content.array_records
    assert _scalars(evaluated)[wire.M_PRIVATE_METRICS] == 1
    assert wire.M_TRAIN_LOSS in _scalars(mixed)  # a non-private round ...
    assert mixed.content.metric_records[wire.EVALUATION][wire.M_PRIVATE_METRICS] == 1
    for reply in (trained, evaluated, mixed):
        assert wire.M_SECONDS not in _scalars(reply)  # ... whose clock covered a DP release
    assert wire.M_SECONDS not in dict(mixed.content.metric_records[wire.EVALUATION])


def test_an_unexpected_exception_reaches_the_server_as_a_code_only(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: evaluation fails with a message that quotes the data
    def failing(*args: object, **kwargs: object) -> None:
        raise ValueError("case s00-00031 in /hospital/data: 47 row(s)")

    monkeypatch.setattr(client_evaluation, "local_cases", failing)
    ctx = _context(_run_config(tiny_federation, tmp_path), {"partition-id": 0,
                                                           "num-partitions": 2})
    # Execute
    reply = _call(_message("evaluate", global_state), ctx)
    # Assert: an ordinary reply (no Flower error with the text), the code and nothing else
    assert not reply.has_error()
    assert _site(reply) == {wire.SITE_NAME: tiny_federation[0].name,
                            wire.SITE_ERROR: wire.ERR_INTERNAL, wire.SITE_DETAIL: ""}
    assert _scalars(reply)[wire.M_DATA_ERROR] == 1


def test_a_non_finite_update_is_answered_with_its_code(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: local_train finds the noised update non-finite (after charging the round)
    def non_finite(*args: object, **kwargs: object) -> None:
        raise NonFiniteUpdate("the noised update of case s00-00031 is NaN")

    monkeypatch.setattr(client_local, "local_train", non_finite)
    ctx = _context(_run_config(tiny_federation, tmp_path), {"partition-id": 0,
                                                           "num-partitions": 2})
    # Execute
    reply = _call(_message("train", global_state), ctx)
    # Assert: no update; the code; the keys of every reply that takes no part
    assert wire.ARRAYS not in reply.content.array_records
    assert _site(reply)[wire.SITE_ERROR] == wire.ERR_NON_FINITE_UPDATE
    assert _site(reply)[wire.SITE_DETAIL] == ""
    assert set(_scalars(reply)) == {wire.M_NUM_EXAMPLES, wire.M_BUDGET_SPENT, wire.M_REFUSED,
                                    wire.M_DATA_ERROR}


def test_a_model_with_weights_that_are_not_finite_is_refused_before_anything_is_charged(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict
) -> None:
    # Prepare: a coordinator burning budget: inf weights make every update non-finite,
    # which would be charged and never released
    crafted = {k: v.clone() for k, v in global_state.items()}
    name = next(k for k, v in crafted.items() if v.is_floating_point())
    crafted[name].view(-1)[0] = math.inf
    ctx = _context(_run_config(tiny_federation, tmp_path), {"partition-id": 0,
                                                           "num-partitions": 2})
    # Execute
    reply = _call(_message("train", crafted), ctx)
    # Assert: refused by policy, nothing released, nothing in any ledger
    assert wire.ARRAYS not in reply.content.array_records
    assert _site(reply)[wire.SITE_ERROR] == wire.ERR_POLICY
    assert name in _site(reply)[wire.SITE_DETAIL]
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob(
        "privacy-ledger.json"))


# ----------------------------------------------------------------- the pure parts


def test_case_vectors_are_finite_and_within_the_sensitivity_for_any_model_output() -> None:
    # Prepare: three lesion cases whose predicted boxes are NaN, +inf and -inf
    k = 2
    cases = CaseResults(
        labels=np.array([0, 1, 1]), probs=np.full((3, k), np.nan), loss_sum=math.nan,
        boxes=np.array([[np.nan] * 4, [np.inf] * 4, [-np.inf] * 4]),
        true_boxes=np.tile([0.1, 0.1, 0.5, 0.5], (3, 1)), has_box=np.ones(3),
        refs=None, hyps=None,
    )
    # Execute
    v = case_vectors(cases, k)
    # Assert
    assert np.isfinite(v).all()
    assert (np.linalg.norm(v, axis=1) <= EVAL_SENSITIVITY + 1e-12).all()


def test_macro_f1_of_an_empty_noised_confusion_is_a_number() -> None:
    assert _macro_f1(np.zeros((3, 3))) == 0.0


def test_every_site_error_code_has_its_sentence_and_unknown_words_are_not_shown() -> None:
    codes = [v for k, v in vars(wire).items() if k.startswith("ERR_")]
    assert sorted(codes) == sorted(wire.SITE_ERRORS)
    assert wire.DETAILED_ERRORS <= set(wire.SITE_ERRORS)
    # a detail is shown only for a code that may carry one
    assert "47" not in wire.site_error_text(wire.ERR_DATA_UNREADABLE, "47 row(s)")
    assert wire.site_error_text(wire.ERR_POLICY, "lr=0 outside [1e-05, 1]").endswith(
        "(policy): lr=0 outside [1e-05, 1]")
    assert wire.site_error_text("") == ""
    assert wire.site_error_text("x" * 1000).startswith("unknown site error code")
    assert len(wire.site_error_text("x" * 1000)) < 120
