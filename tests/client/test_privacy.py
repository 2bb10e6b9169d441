"""The privacy ledger and its accounting (Opacus' accountant test ideas)."""

import json
import logging
import math
import os
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from client.privacy import (
    LEDGER_FILE,
    BudgetError,
    Ledger,
    LedgerError,
    effective_budget,
    effective_delta,
    epsilon_spent,
    find_ledgers,
    ledger_text,
    load_ledger,
    new_entry,
    noise_for_budget,
    open_ledger,
    render_ledger,
    round_cost,
)

DELTA = 1e-5


def _open(state: Path, data: Path, budget: float = 8.0) -> Ledger:
    return open_ledger(state, site_name="site-00", data_path=data, epsilon_budget=budget,
                       delta=DELTA)


def _append(ledger: Ledger, run_id: int, rnd: int, sigma: float, q: float, steps: int) -> None:
    eps = round_cost(ledger, sigma, q, steps)
    ledger.entries.append(new_entry(run_id=run_id, server_round=rnd, noise_multiplier=sigma,
                                    sample_rate=q, steps=steps, epsilon_after=eps,
                                    accountant="rdp"))
    ledger.save()


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    site = tmp_path / "site-00"
    site.mkdir()
    (site / "manifest.csv").write_text("case_id,image,report,label\n")
    return site


def test_round_trip_split_run_equals_one_accountant(tmp_path: Path, data_dir: Path) -> None:
    # Prepare: one accountant takes all 30 steps
    sigma, q = 1.1, 0.05
    whole = RDPAccountant()
    for _ in range(30):
        whole.step(noise_multiplier=sigma, sample_rate=q)
    # Execute: three rounds of 10 steps, each with a freshly loaded ledger (restarted node),
    # two of them in a second run
    for run_id, rnd in [(1, 1), (1, 2), (2, 1)]:
        ledger = _open(tmp_path / "state", data_dir)
        _append(ledger, run_id, rnd, sigma, q, 10)
    reloaded = load_ledger(tmp_path / "state")
    # Assert
    assert len(reloaded.entries) == 3
    assert epsilon_spent(reloaded) == pytest.approx(whole.get_epsilon(DELTA), rel=1e-12)
    assert reloaded.entries[-1].epsilon_after == pytest.approx(epsilon_spent(reloaded))


def test_epsilon_equals_independent_rdp_analysis(tmp_path: Path, data_dir: Path) -> None:
    ledger = _open(tmp_path, data_dir)
    for rnd, (sigma, q, steps) in enumerate([(1.3, 0.02, 50), (0.9, 0.04, 25), (2.0, 0.02, 7)]):
        _append(ledger, 5, rnd + 1, sigma, q, steps)
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(
        rdp_analysis.compute_rdp(q=e.sample_rate, noise_multiplier=e.noise_multiplier,
                                 steps=e.steps, orders=orders)
        for e in ledger.entries
    )
    expected, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)
    assert epsilon_spent(load_ledger(tmp_path)) == pytest.approx(float(expected), rel=1e-12)


def test_prv_accountant_on_the_same_history(tmp_path: Path, data_dir: Path) -> None:
    ledger = _open(tmp_path, data_dir)
    _append(ledger, 1, 1, 1.0, 0.05, 20)
    prv = epsilon_spent(ledger, "prv")
    assert 0.0 < prv <= epsilon_spent(ledger, "rdp")  # PRV is the tighter bound


def test_atomic_write_leaves_no_temp_file(tmp_path: Path, data_dir: Path) -> None:
    ledger = _open(tmp_path, data_dir)
    _append(ledger, 1, 1, 1.0, 0.05, 10)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [LEDGER_FILE]


def test_crash_before_rename_keeps_old_ledger(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a ledger with one round on disk
    ledger = _open(tmp_path, data_dir)
    _append(ledger, 1, 1, 1.0, 0.05, 10)
    before = (tmp_path / LEDGER_FILE).read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("power cut")

    # Execute: the second round's write dies between writing the temp file and the rename
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        _append(ledger, 1, 2, 1.0, 0.05, 10)
    monkeypatch.undo()
    # Assert: the old ledger, intact, and no temp file left behind
    assert (tmp_path / LEDGER_FILE).read_bytes() == before
    assert len(load_ledger(tmp_path).entries) == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_corrupt_ledger_is_a_clear_error_not_a_reset(tmp_path: Path, data_dir: Path) -> None:
    ledger = _open(tmp_path, data_dir)
    _append(ledger, 1, 1, 1.0, 0.05, 10)
    text = (tmp_path / LEDGER_FILE).read_text()
    (tmp_path / LEDGER_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(LedgerError, match="corrupt.*never reset"):
        _open(tmp_path, data_dir)
    # the damaged file is left as it was for a human to repair
    assert (tmp_path / LEDGER_FILE).read_text() == text[: len(text) // 2]


def test_wrong_field_in_ledger_is_corrupt(tmp_path: Path, data_dir: Path) -> None:
    _open(tmp_path, data_dir)
    data = json.loads((tmp_path / LEDGER_FILE).read_text())
    data["entries"] = [{"run_id": 1, "steps": -3}]
    (tmp_path / LEDGER_FILE).write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="corrupt"):
        load_ledger(tmp_path)


def test_budget_exhausted_refuses(tmp_path: Path, data_dir: Path) -> None:
    ledger = _open(tmp_path, data_dir, budget=1.0)
    _append(ledger, 1, 1, 0.8, 0.1, 30)
    assert epsilon_spent(ledger) > 1.0
    with pytest.raises(BudgetError, match="already spent"):
        noise_for_budget(ledger, 0.1, 10, 1)


def test_noise_for_budget_is_the_smallest_that_fits(tmp_path: Path, data_dir: Path) -> None:
    ledger = _open(tmp_path, data_dir, budget=4.0)
    _append(ledger, 1, 1, 1.5, 0.1, 10)
    sigma = noise_for_budget(ledger, 0.1, 10, 3)
    planned = [*ledger.history(), (sigma, 0.1, 30)]
    acc = RDPAccountant()
    acc.history = planned
    assert acc.get_epsilon(DELTA) <= 4.0
    acc.history = [*ledger.history(), (sigma * 0.99, 0.1, 30)]
    assert acc.get_epsilon(DELTA) > 4.0
    # the first of the three planned rounds fits with room for the other two
    assert round_cost(ledger, sigma, 0.1, 10) < 4.0


def test_node_budget_may_only_be_lower(caplog: pytest.LogCaptureFixture) -> None:
    assert effective_budget(8.0, None) == 8.0
    assert effective_budget(8.0, 3.0) == 3.0
    with caplog.at_level(logging.WARNING):
        assert effective_budget(8.0, 20.0) == 8.0
    assert "may only lower" in caplog.text
    assert effective_delta(1e-5, 1e-6) == 1e-6
    assert effective_delta(1e-5, 1e-3) == 1e-5


def test_new_run_and_changed_data_keep_the_spent_privacy(tmp_path: Path, data_dir: Path) -> None:
    ledger = _open(tmp_path, data_dir)
    _append(ledger, 1, 1, 1.0, 0.05, 10)
    spent = epsilon_spent(ledger)
    (data_dir / "manifest.csv").write_text("case_id,image,report,label\nx,a.png,,normal\n")
    again = _open(tmp_path, data_dir, budget=6.0)
    assert epsilon_spent(again) == spent
    assert again.epsilon_budget == 6.0
    assert load_ledger(tmp_path).manifest_sha256 == again.manifest_sha256


def test_render_shows_rounds_and_totals(tmp_path: Path, data_dir: Path) -> None:
    from rich.console import Console

    state = tmp_path / "root" / "site-00-abcd1234"
    ledger = _open(state, data_dir)
    _append(ledger, 42, 1, 1.0, 0.05, 10)
    console = Console(record=True, width=140)
    console.print(render_ledger(ledger))
    out = console.export_text()
    spent = epsilon_spent(ledger)
    assert "42" in out and f"{spent:.4f}" in out and f"{8.0 - spent:.4f}" in out
    assert f"left {8.0 - spent:.4f}" in ledger_text(ledger)
    assert find_ledgers(state) == [state]
    assert find_ledgers(tmp_path / "root") == [state]


def test_empty_and_noiseless_histories() -> None:
    from client.privacy import history_epsilon

    assert history_epsilon([], DELTA) == 0.0
    assert math.isinf(history_epsilon([(0.0, 0.1, 5)], DELTA))


def test_a_sliver_of_budget_is_spent(tmp_path: Path, data_dir: Path) -> None:
    # what is left would only fit with a noise multiplier beyond any use: refuse
    ledger = _open(tmp_path, data_dir, budget=1.0)
    sigma = noise_for_budget(ledger, 0.25, 4, 1, rel_tol=1e-6)
    _append(ledger, 1, 1, sigma, 0.25, 4)
    assert 0.999 < epsilon_spent(ledger) <= 1.0
    with pytest.raises(BudgetError, match="all noise"):
        noise_for_budget(ledger, 0.25, 4, 2)
    assert noise_for_budget(ledger, 0.25, 4, 2, max_noise=1e4) > 50
