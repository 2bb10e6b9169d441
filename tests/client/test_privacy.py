"""The privacy ledger, its store and its accounting (Opacus' accountant test ideas), and the
ways a ledger could be reset or lowered: each is tried here and must fail."""

import json
import logging
import math
import os
import shutil
from pathlib import Path

import dp_accounting
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from PIL import Image

from client.privacy import (
    INDEX_FILE,
    LEDGER_FILE,
    BudgetError,
    Ledger,
    LedgerError,
    LedgerStore,
    at_most,
    data_identity,
    find_stores,
    history_epsilon,
    ledger_text,
    noise_for_budget,
    render_ledger,
)

DELTA = 1e-5


def _site(folder: Path, cases: int = 3, start: int = 0) -> Path:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = ["case_id,image,report,label"]
    for i in range(start, start + cases):
        Image.new("L", (8, 8), color=i * 7 % 256).save(folder / "img" / f"c{i}.png")
        rows.append(f"c{i},img/c{i}.png,report {i},normal")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    return _site(tmp_path / "site-00")


def _open(store: LedgerStore, data: Path, budget: float = 8.0, name: str = "site-00",
          delta: float = DELTA) -> Ledger:
    with store.lock():
        return store.open(data_identity(data), site_name=name, data_path=data,
                          epsilon_budget=budget, eval_epsilon_budget=2.0, delta=delta)


def _append(store: LedgerStore, ledger: Ledger, run_id: int, rnd: int, sigma: float, q: float,
            steps: int) -> None:
    ledger.append("dp-sgd", run_id=run_id, server_round=rnd, noise_multiplier=sigma,
                  sample_rate=q, steps=steps)
    store.save(ledger)


@pytest.fixture()
def store(tmp_path: Path) -> LedgerStore:
    return LedgerStore(tmp_path / "store")


# ----------------------------------------------------------------- accounting


def test_round_trip_split_run_equals_one_accountant(store: LedgerStore, data_dir: Path) -> None:
    # Prepare: one accountant takes all 30 steps
    sigma, q = 1.1, 0.05
    whole = RDPAccountant()
    for _ in range(30):
        whole.step(noise_multiplier=sigma, sample_rate=q)
    # Execute: three rounds of 10 steps, each with a freshly loaded ledger (restarted node),
    # two of them in a second run
    for run_id, rnd in [(1, 1), (1, 2), (2, 1)]:
        ledger = _open(store, data_dir)
        _append(store, ledger, run_id, rnd, sigma, q, 10)
    reloaded = store.load(ledger.key)
    # Assert
    assert len(reloaded.entries) == 3
    assert reloaded.epsilon() == pytest.approx(whole.get_epsilon(DELTA), rel=1e-12)
    assert reloaded.entries[-1].epsilon_after == pytest.approx(reloaded.epsilon())


def test_epsilon_equals_two_independent_accountants(store: LedgerStore, data_dir: Path) -> None:
    # Prepare: DP-SGD rounds, the one count release and an evaluation, as a node writes them
    ledger = _open(store, data_dir)
    ledger.append("count", run_id=5, server_round=1, noise_multiplier=10.0)
    for rnd, (sigma, q, steps) in enumerate([(1.3, 0.02, 50), (0.9, 0.04, 25), (2.0, 0.02, 7)]):
        _append(store, ledger, 5, rnd + 1, sigma, q, steps)
    ledger.append("evaluation", run_id=5, server_round=3, noise_multiplier=2.5)
    store.save(ledger)
    train = [(e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries
             if e.kind in ("count", "dp-sgd")]
    # Execute: Opacus' RDP analysis called directly, and Google's dp-accounting
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders)
              for s, q, n in train)
    opacus_eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)
    google = dp_accounting.rdp.RdpAccountant(orders=[float(a) for a in orders])
    for s, q, n in train:
        event = dp_accounting.GaussianDpEvent(s)
        if q < 1.0:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        google.compose(event, n)
    google_eval = dp_accounting.rdp.RdpAccountant(orders=[float(a) for a in orders])
    google_eval.compose(dp_accounting.GaussianDpEvent(2.5), 1)
    # Assert: the ledger's epsilon is Opacus' exactly and within 3% of dp-accounting's
    # (whose RDP-to-epsilon conversion is a slightly tighter bound)
    reloaded = store.load(ledger.key)
    assert reloaded.epsilon("train") == pytest.approx(float(opacus_eps), rel=1e-12)
    assert reloaded.epsilon("train") == pytest.approx(google.get_epsilon(DELTA), rel=0.03)
    assert reloaded.epsilon("evaluation") == pytest.approx(google_eval.get_epsilon(DELTA),
                                                          rel=0.03)


def test_prv_accountant_on_the_same_history(store: LedgerStore, data_dir: Path) -> None:
    ledger = _open(store, data_dir)
    _append(store, ledger, 1, 1, 1.0, 0.05, 20)
    prv = ledger.epsilon("train", "prv")
    assert 0.0 < prv <= ledger.epsilon("train", "rdp")  # PRV is the tighter bound


def test_budget_exhausted_refuses(store: LedgerStore, data_dir: Path) -> None:
    ledger = _open(store, data_dir, budget=1.0)
    _append(store, ledger, 1, 1, 0.8, 0.1, 30)
    assert ledger.epsilon() > 1.0
    with pytest.raises(BudgetError, match="already spent"):
        noise_for_budget(ledger, 0.1, 10, 1)


def test_noise_for_budget_is_the_smallest_that_fits(store: LedgerStore, data_dir: Path) -> None:
    ledger = _open(store, data_dir, budget=4.0)
    _append(store, ledger, 1, 1, 1.5, 0.1, 10)
    sigma = noise_for_budget(ledger, 0.1, 10, 3)
    acc = RDPAccountant()
    acc.history = [*ledger.history(), (sigma, 0.1, 30)]
    assert acc.get_epsilon(DELTA) <= 4.0
    acc.history = [*ledger.history(), (sigma * 0.99, 0.1, 30)]
    assert acc.get_epsilon(DELTA) > 4.0
    # the first of the three planned rounds fits with room for the other two
    assert ledger.cost_with((sigma, 0.1, 10)) < 4.0


def test_node_value_may_only_be_lower(caplog: pytest.LogCaptureFixture) -> None:
    assert at_most("epsilon-budget", "epsilon", 8.0, None) == 8.0
    assert at_most("epsilon-budget", "epsilon", 8.0, 3.0) == 3.0
    with caplog.at_level(logging.WARNING):
        assert at_most("epsilon-budget", "epsilon", 8.0, 20.0) == 8.0
    assert "may only lower" in caplog.text
    assert at_most("delta", "delta", 1e-5, 1e-6) == 1e-6
    assert at_most("delta", "delta", 1e-5, 1e-3) == 1e-5


def test_empty_and_noiseless_histories() -> None:
    assert history_epsilon([], DELTA) == 0.0
    assert math.isinf(history_epsilon([(0.0, 0.1, 5)], DELTA))


def test_a_sliver_of_budget_is_spent(store: LedgerStore, data_dir: Path) -> None:
    # what is left would only fit with a noise multiplier beyond any use: refuse
    ledger = _open(store, data_dir, budget=1.0)
    sigma = noise_for_budget(ledger, 0.25, 4, 1, rel_tol=1e-6)
    _append(store, ledger, 1, 1, sigma, 0.25, 4)
    assert 0.999 < ledger.epsilon() <= 1.0
    with pytest.raises(BudgetError, match="all noise"):
        noise_for_budget(ledger, 0.25, 4, 2)
    assert noise_for_budget(ledger, 0.25, 4, 2, max_noise=1e4) > 50


def test_a_non_private_release_spends_the_budget_for_good(store: LedgerStore,
                                                          data_dir: Path) -> None:
    ledger = _open(store, data_dir)
    ledger.append("non-private", run_id=1, server_round=1, noise_multiplier=0.0)
    store.save(ledger)
    again = _open(store, data_dir)
    assert math.isinf(again.epsilon())
    with pytest.raises(BudgetError, match="already spent"):
        noise_for_budget(again, 0.1, 10, 1)


# ----------------------------------------------------------------- files


def test_atomic_write_leaves_no_temp_file(store: LedgerStore, data_dir: Path) -> None:
    ledger = _open(store, data_dir)
    _append(store, ledger, 1, 1, 1.0, 0.05, 10)
    folder = store.root / ledger.key
    assert sorted(p.name for p in folder.iterdir()) == [LEDGER_FILE]
    assert not [p for p in store.root.iterdir() if p.name.endswith(".tmp")]


def test_crash_before_rename_keeps_old_ledger(
    store: LedgerStore, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a ledger with one round on disk
    ledger = _open(store, data_dir)
    _append(store, ledger, 1, 1, 1.0, 0.05, 10)
    path = store.ledger_path(ledger.key)
    before = path.read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("power cut")

    # Execute: the second round's write dies between writing the temp file and the rename
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        _append(store, ledger, 1, 2, 1.0, 0.05, 10)
    monkeypatch.undo()
    # Assert: the old ledger, intact, and no temp file left behind
    assert path.read_bytes() == before
    assert len(store.load(ledger.key).entries) == 1
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_corrupt_ledger_is_a_clear_error_not_a_reset(store: LedgerStore, data_dir: Path) -> None:
    ledger = _open(store, data_dir)
    _append(store, ledger, 1, 1, 1.0, 0.05, 10)
    path = store.ledger_path(ledger.key)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(LedgerError, match="cannot be trusted.*never reset"):
        _open(store, data_dir)
    # the damaged file is left as it was for a human to repair
    assert path.read_text() == text[: len(text) // 2]


# ----------------------------------------------------------------- attacks on the ledger


def test_a_renamed_site_and_a_copied_folder_find_the_same_ledger(
    store: LedgerStore, data_dir: Path, tmp_path: Path
) -> None:
    # Prepare: privacy spent under one name and folder
    ledger = _open(store, data_dir)
    _append(store, ledger, 1, 1, 1.0, 0.05, 10)
    spent = ledger.epsilon()
    copy = tmp_path / "elsewhere" / "st-marys"
    shutil.copytree(data_dir, copy)
    # Execute: another site name, then the copied folder under a third name
    renamed = _open(store, data_dir, name="st-marys")
    copied = _open(store, copy, name="hospital-b")
    # Assert: one ledger, the spent privacy still counts
    assert renamed.key == copied.key == ledger.key
    assert renamed.epsilon() == copied.epsilon() == spent
    assert store.keys() == [ledger.key]
    assert copied.site_names == ["site-00", "st-marys", "hospital-b"]


def test_new_cases_added_to_a_site_inherit_its_history(
    store: LedgerStore, data_dir: Path, tmp_path: Path
) -> None:
    ledger = _open(store, data_dir)
    _append(store, ledger, 1, 1, 1.0, 0.05, 10)
    grown = _site(tmp_path / "grown", cases=3)  # the same three images ...
    _site(grown, cases=2, start=3)  # ... and two new cases (manifest rewritten)
    (grown / "manifest.csv").write_text(
        "case_id,image,report,label\n"
        + "".join(f"c{i},img/c{i}.png,r,normal\n" for i in range(5))
    )
    bigger = _open(store, grown)
    assert bigger.key != ledger.key
    assert bigger.inherited_from == [ledger.key]
    assert bigger.epsilon() == pytest.approx(ledger.epsilon())


def test_a_deleted_ledger_is_refused_not_recreated(store: LedgerStore, data_dir: Path) -> None:
    ledger = _open(store, data_dir)
    _append(store, ledger, 1, 1, 1.0, 0.05, 10)
    store.ledger_path(ledger.key).unlink()
    with pytest.raises(LedgerError, match="missing.*Restore"):
        _open(store, data_dir)
    assert not store.ledger_path(ledger.key).exists()  # nothing was silently recreated


@pytest.mark.parametrize(
    "field, value",
    [("noise_multiplier", 40.0), ("steps", 1), ("sample_rate", 0.001)],
)
def test_an_edited_entry_is_refused(store: LedgerStore, data_dir: Path, field: str,
                                    value: float) -> None:
    # Prepare: two rounds on disk
    ledger = _open(store, data_dir)
    _append(store, ledger, 1, 1, 1.0, 0.05, 10)
    _append(store, ledger, 1, 2, 1.0, 0.05, 10)
    spent = ledger.epsilon()
    path = store.ledger_path(ledger.key)
    data = json.loads(path.read_text())
    # Execute: an edit that would lower the spent epsilon
    data["entries"][0][field] = value
    path.write_text(json.dumps(data))
    # Assert: refused, whether or not the editor also fixed epsilon_after
    with pytest.raises(LedgerError, match="edited|altered"):
        _open(store, data_dir)
    data["entries"][0]["epsilon_after"] = 0.01
    path.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="edited|altered"):
        _open(store, data_dir)
    assert spent > 0.01


@pytest.mark.parametrize("value", ["Infinity", "NaN", "1000", "-1"])
def test_implausible_noise_is_refused_without_hanging(store: LedgerStore, data_dir: Path,
                                                      value: str) -> None:
    ledger = _open(store, data_dir)
    _append(store, ledger, 1, 1, 1.0, 0.05, 10)
    path = store.ledger_path(ledger.key)
    text = path.read_text().replace('"noise_multiplier": 1.0', f'"noise_multiplier": {value}')
    path.write_text(text)
    with pytest.raises(LedgerError, match="cannot be trusted"):
        _open(store, data_dir)


def test_a_removed_last_entry_is_refused(store: LedgerStore, data_dir: Path) -> None:
    ledger = _open(store, data_dir)
    _append(store, ledger, 1, 1, 1.0, 0.05, 10)
    _append(store, ledger, 1, 2, 1.0, 0.05, 10)
    path = store.ledger_path(ledger.key)
    data = json.loads(path.read_text())
    data["entries"] = data["entries"][:1]  # the chain of what is left is still whole
    path.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="does not match the store index"):
        _open(store, data_dir)


def test_a_removed_middle_entry_is_refused(store: LedgerStore, data_dir: Path) -> None:
    ledger = _open(store, data_dir)
    for rnd in (1, 2, 3):
        _append(store, ledger, 1, rnd, 1.0, 0.05, 10)
    path = store.ledger_path(ledger.key)
    data = json.loads(path.read_text())
    del data["entries"][1]
    path.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="altered|edited"):
        _open(store, data_dir)


def test_budget_and_delta_only_go_down(store: LedgerStore, data_dir: Path) -> None:
    _open(store, data_dir, budget=3.0, delta=1e-6)
    raised = _open(store, data_dir, budget=8.0, delta=1e-5)  # a run config asking for more
    assert (raised.epsilon_budget, raised.delta) == (3.0, 1e-6)
    lowered = _open(store, data_dir, budget=2.0)
    assert lowered.epsilon_budget == 2.0
    assert store.load(lowered.key).epsilon_budget == 2.0


def test_identity_is_the_images_not_the_manifest_text(data_dir: Path, tmp_path: Path) -> None:
    before = data_identity(data_dir)
    text = (data_dir / "manifest.csv").read_text().replace("report 1", "edited report")
    (data_dir / "manifest.csv").write_text(text)
    assert data_identity(data_dir) == before
    Image.new("L", (8, 8), color=200).save(data_dir / "img" / "c1.png")
    assert data_identity(data_dir).digest != before.digest


# ----------------------------------------------------------------- display


def test_render_shows_releases_and_both_budgets(store: LedgerStore, data_dir: Path,
                                                tmp_path: Path) -> None:
    from rich.console import Console

    ledger = _open(store, data_dir)
    _append(store, ledger, 42, 1, 1.0, 0.05, 10)
    ledger.append("evaluation", run_id=42, server_round=1, noise_multiplier=3.0)
    store.save(ledger)
    console = Console(record=True, width=160)
    console.print(render_ledger(ledger))
    out = console.export_text()
    spent = ledger.epsilon()
    assert "42" in out and f"{spent:.4f}" in out and f"{8.0 - spent:.4f}" in out
    assert "evaluation" in out and f"{ledger.epsilon('evaluation'):.4f}" in out
    assert f"left {8.0 - spent:.4f}" in ledger_text(ledger)
    assert [s.root for s in find_stores(store.root)] == [store.root]
    assert [s.root for s in find_stores(store.root.parent)] == [store.root]
    assert (store.root / INDEX_FILE).exists()


def test_a_text_only_site_is_identified_by_its_reports(tmp_path: Path):
    # Prepare: rows without an image (a text-only site): the report is the record
    def site(folder: Path, reports: list[str]) -> Path:
        folder.mkdir()
        lines = ["case_id,image,report,label"] + [f"c{i},,{r},normal"
                                                  for i, r in enumerate(reports)]
        (folder / "manifest.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return folder

    # Execute
    a = data_identity(site(tmp_path / "a", ["No effusion.", "Small nodule."]))
    respaced = data_identity(site(tmp_path / "b", ["no   EFFUSION", "small nodule"]))
    other = data_identity(site(tmp_path / "c", ["No effusion.", "Large nodule."]))
    same_words = data_identity(site(tmp_path / "d", ["No effusion.", "No effusion."]))

    # Assert: one record per case; its words decide it, not spacing or case; two
    # patients with the same words are two records (their case ids differ)
    assert len(a.records) == 2
    assert respaced == a
    assert other.digest != a.digest and len(set(other.records) & set(a.records)) == 1
    assert len(same_words.records) == 2
