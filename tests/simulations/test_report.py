"""The report from a hand-built long table: summary values, Markdown, PNGs, HTML."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from simulations import report
from simulations.report import (
    EPSILON,
    TEST,
    TRAIN_LOSS,
    read_results,
    results_frame,
    summarize,
    write_csv_atomic,
    write_report,
)

PNG = b"\x89PNG\r\n\x1a\n"
SITES = ("site-00", "site-01")


def _table() -> pd.DataFrame:
    """pooled (no DP), fedavg (no DP) and fedavg-dp at two budgets; two seeds; two rounds."""
    rows = []
    acc = {"pooled": 0.8, "fedavg": 0.7, "fedavg-dp-eps1": 0.5, "fedavg-dp-eps8": 0.6}
    for exp, a in acc.items():
        for seed in (0, 1):
            for rnd in (1, 2):
                for i, site in enumerate(SITES):
                    rows.append((exp, seed, rnd, site, TRAIN_LOSS, 2.0 / rnd + i))
                    if exp != "pooled":
                        rows.append((exp, seed, rnd, site, report.EVAL + "accuracy", a - 0.1 / rnd))
                        eps = math.inf if exp == "fedavg" else float(exp[-1]) * rnd / 2
                        rows.append((exp, seed, rnd, site, EPSILON, eps))
            for i, site in enumerate(SITES):
                # an earlier round's test value must be ignored: the last round counts
                rows.append((exp, seed, 1, site, TEST + "accuracy", 0.0))
                rows.append(
                    (exp, seed, 2, site, TEST + "accuracy", a + (0.1 if i else -0.1) + 0.02 * seed)
                )
                for m in ("macro-f1", "auroc", "iou", "bleu4", "rouge-l", "loss"):
                    rows.append((exp, seed, 2, site, TEST + m, 0.5))
    return results_frame(rows)


META = pd.DataFrame(
    {
        "experiment": ["pooled", "fedavg", "fedavg-dp-eps1", "fedavg-dp-eps8"],
        "series": ["pooled", "fedavg", "fedavg-dp", "fedavg-dp"],
    }
)


def test_summary_takes_last_round_means_over_sites_and_seeds() -> None:
    # Execute
    summary = summarize(_table(), META)

    # Assert
    assert summary.experiments == list(META["experiment"])
    assert summary.sites == list(SITES)
    mean = summary.mean.set_index("experiment")
    assert mean.at["pooled", "accuracy"] == pytest.approx(0.81)  # (0.7+0.9)/2 + 0.01
    assert mean.at["fedavg-dp-eps8", "accuracy"] == pytest.approx(0.61)
    assert mean.at["pooled", "accuracy std"] == pytest.approx(0.02 / math.sqrt(2))
    assert mean.at["fedavg-dp-eps8", "epsilon"] == pytest.approx(8.0)
    assert mean.at["fedavg-dp-eps1", "epsilon"] == pytest.approx(1.0)
    assert math.isinf(mean.at["fedavg", "epsilon"])
    assert math.isnan(mean.at["pooled", "epsilon"])  # no epsilon rows at all: unknown
    per_site = summary.per_site.set_index(["experiment", "site"])
    assert per_site.at[("fedavg", "site-01"), "accuracy"] == pytest.approx(0.81)


def test_results_csv_round_trip_keeps_inf_and_nan(tmp_path: Path) -> None:
    # Prepare
    table = results_frame(
        [
            ("a", 0, 1, "s", EPSILON, math.inf),
            ("a", 0, 1, "s", TEST + "bleu4", math.nan),
            ("a", 0, 1, "s", TEST + "accuracy", 0.25),
        ]
    )

    # Execute
    write_csv_atomic(table, tmp_path / "results.csv")
    back = read_results(tmp_path / "results.csv")

    # Assert
    assert list(back.columns) == list(report.COLUMNS)
    assert math.isinf(back["value"][0]) and math.isnan(back["value"][1])
    assert back["value"][2] == 0.25


def test_report_writes_summary_pngs_and_html(tmp_path: Path) -> None:
    # Execute
    files = write_report(_table(), tmp_path, meta=META, title="hand-built", notes=["a note"])

    # Assert: Markdown summary with every metric, per site and mean, baselines beside
    md = files.summary_md.read_text(encoding="utf-8")
    for header in ("accuracy", "macro-F1", "AUROC", "IoU", "BLEU-4", "ROUGE-L", "epsilon"):
        assert header in md
    for exp in META["experiment"]:
        assert f"| {exp} |" in md
    assert "| site-01 |" in md and "| mean |" in md and "∞" in md
    assert "0.810 ± 0.014" in md  # pooled mean accuracy over two seeds
    # Assert: non-empty PNGs, one learning-curve plot per experiment
    names = {p.name for p in files.plots}
    assert {"per-site-accuracy.png", "privacy-utility.png", "learning-curves.png"} <= names
    assert {f"curves-{e}.png" for e in META["experiment"]} <= names
    for p in files.plots:
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, p
    # Assert: one HTML file with the tables and the plots embedded
    page = files.report_html.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == len(files.plots)
    assert "<table>" in page and "fedavg-dp-eps8" in page and "a note" in page


def test_report_of_baselines_only_still_has_every_plot(tmp_path: Path) -> None:
    # Prepare: no DP experiment, no per-round evaluation
    table = _table()
    table = table[table["experiment"] == "pooled"]

    # Execute
    files = write_report(table, tmp_path)

    # Assert
    assert all(p.stat().st_size > 5000 for p in files.plots)
    assert "pooled" in files.summary_md.read_text(encoding="utf-8")


def test_terminal_tables_list_each_experiment() -> None:
    # Prepare
    from rich.console import Console

    console = Console(width=160, record=True, color_system=None)

    # Execute
    for t in report.terminal_tables(summarize(_table(), META)):
        console.print(t)

    # Assert
    text = console.export_text()
    for exp in META["experiment"]:
        assert exp in text
    assert "site-00" in text and "8.00" in text


def test_the_mean_table_fits_a_pipe_of_80_columns_without_cutting_a_number() -> None:
    # Prepare: a pipe or a CI log is 80 wide; the framed table once showed "1.0…"
    from rich.console import Console

    console = Console(width=80, record=True, color_system=None)
    summary = summarize(_table(), META)

    # Execute
    console.print(report.terminal_tables(summary)[0])

    # Assert: every cell whole, every line within 80
    text = console.export_text()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "fedavg-dp-eps8" in text and "0.500" in text


def _baselines_table() -> pd.DataFrame:
    """Demo-like baselines: pooled (loss per epoch for the whole), local-only (loss per
    hospital), local DP and the public model alone (final test metrics only)."""
    rows = []
    for exp in ("pooled", "local-only", "local-dp", "public-only"):
        for rnd in (1, 2, 3):
            if exp == "pooled":
                rows.append((exp, 0, rnd, report.ALL_SITES, TRAIN_LOSS, 2.0 / rnd))
            if exp == "local-only":
                rows += [(exp, 0, rnd, s, TRAIN_LOSS, 2.0 / rnd + i) for i, s in enumerate(SITES)]
        rows += [(exp, 0, 3, s, TEST + "accuracy", 0.6 + 0.1 * i) for i, s in enumerate(SITES)]
    return results_frame(rows)


@pytest.fixture
def saved_figures(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Every figure the report saves, drawn, by file name (kept open for inspection,
    closed after the test)."""
    from shared_model.tooling.figures import pyplot

    figures: dict[str, object] = {}

    def keep(fig, path, dpi=100):  # noqa: ANN001, ANN202
        fig.canvas.draw()
        figures[Path(path).name] = fig
        fig.savefig(path, dpi=dpi, format="png")
        return Path(path)

    monkeypatch.setattr(report, "save_png", keep)
    yield figures
    for fig in figures.values():
        pyplot().close(fig)


def test_report_draws_no_figure_with_an_empty_axis(tmp_path: Path, saved_figures) -> None:  # noqa: ANN001
    # Prepare: baselines that measure little or nothing per round
    figures = saved_figures

    # Execute
    files = write_report(_baselines_table(), tmp_path)

    # Assert: no per-round values, no curves figure; where some, only the panels measured
    names = [p.name for p in files.plots]
    assert "curves-local-dp.png" not in names and "curves-public-only.png" not in names
    assert {"curves-pooled.png", "curves-local-only.png", "learning-curves.png"} <= set(names)
    assert set(figures) == set(names)
    for name, fig in figures.items():
        assert fig.axes and all(ax.has_data() for ax in fig.axes), name
    assert len(figures["curves-pooled.png"].axes) == 1  # loss only: no federated eval.
    page = files.report_html.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == len(files.plots)


@pytest.mark.parametrize("table", [_table, _baselines_table])
def test_no_legend_covers_the_data_area(tmp_path: Path, saved_figures, table) -> None:  # noqa: ANN001
    # Prepare
    figures = saved_figures

    # Execute
    write_report(table(), tmp_path, meta=META if table is _table else None)

    # Assert: the per-site accuracy bars, and every other legend, beside the axes
    assert figures["per-site-accuracy.png"].axes[0].get_legend() is not None
    for name, fig in figures.items():
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is not None:
                assert not legend.get_window_extent().overlaps(ax.get_window_extent()), name


def test_html_means_state_their_spread_and_what_they_are_over(tmp_path: Path) -> None:
    # Prepare: one seed of the baselines (hospitals at 0.6 and 0.7), two seeds of _table
    one_seed, two_seeds = _baselines_table(), _table()

    # Execute
    page_one = write_report(one_seed, tmp_path / "one").report_html.read_text(encoding="utf-8")
    page_two = write_report(two_seeds, tmp_path / "two", meta=META).report_html.read_text(
        encoding="utf-8")

    # Assert: one seed: the range over hospitals; several: ± std over seeds; n beside it
    assert "<td>pooled</td><td>2 × 1</td><td>0.650 (0.600–0.700)</td>" in page_one
    assert "<td>pooled</td><td>2 × 2</td><td>0.810 ± 0.014</td>" in page_two
    for page in (page_one, page_two):
        assert "hospitals × seeds" in page and "not a confidence interval" in page
    assert "<td>mean</td><td>0.650 (0.600–0.700)</td>" in page_one


def test_html_audit_table_gives_client_audits_verdict(tmp_path: Path) -> None:
    # Prepare: three audited experiments, the strongest hospital's lower bound on each
    # side of client.audit's thresholds
    from client.audit import CLEAR_LEAK, SOME_LEAK

    rows = []
    for exp, lo in (("leaky", CLEAR_LEAK), ("some", SOME_LEAK), ("tight", SOME_LEAK - 0.01)):
        for i, site in enumerate(SITES):
            worst = lo if i else 0.40  # the other hospital leaks less
            rows += [(exp, 0, 1, site, TEST + "accuracy", 0.5),
                     (exp, 0, 1, site, report.AUDIT + "loss-auc", worst + 0.05),
                     (exp, 0, 1, site, report.AUDIT + "loss-auc-lo", worst),
                     (exp, 0, 1, site, report.AUDIT + "loss-auc-hi", worst + 0.1),
                     (exp, 0, 1, site, report.AUDIT + "loss-tpr@1%fpr", 0.02)]

    # Execute
    files = write_report(results_frame(rows), tmp_path)

    # Assert
    headers, table = report.audit_rows(results_frame(rows))
    assert headers[-1] == "verdict"
    assert {r[0]: r[-1] for r in table} == {
        "leaky": "LEAKS", "some": "SOME LEAK", "tight": "NO MEASURABLE LEAK"}
    page = files.report_html.read_text(encoding="utf-8")
    assert "<th>verdict</th>" in page
    assert "<td>SOME LEAK</td>" in page and "<td>NO MEASURABLE LEAK</td>" in page
    assert f"LEAKS from {CLEAR_LEAK}" in page


def test_the_accuracy_interval_comes_from_each_hospitals_test_cases():
    # two hospitals at 0.8 and 0.6 on 100 and 25 cases: var of the mean =
    # (0.8*0.2/100 + 0.6*0.4/25) / 4 = 0.0028, half-width 1.96 * 0.0529 = 0.1037
    per_site = pd.Series({"site-00": 0.8, "site-01": 0.6})
    low, high = report.accuracy_interval(per_site, {"site-00": 100, "site-01": 25})
    assert (low, high) == pytest.approx((0.7 - 0.1037, 0.7 + 0.1037), abs=1e-4)
    # a hospital whose count is unknown: no interval rather than a wrong one
    assert all(math.isnan(v) for v in report.accuracy_interval(per_site, {"site-00": 100}))


def test_report_says_in_one_sentence_what_joining_gives_with_and_without_dp():
    rows = []
    for exp, accs in {"alone": (0.6, 0.8), "alone-dp": (0.7, 0.9), "fed": (0.9, 1.0),
                      "fed-dp": (0.75, 0.85)}.items():
        rows += [(exp, 0, 8, f"site-0{i}", "test/accuracy", a) for i, a in enumerate(accs)]
    rows += [("fed-dp", 0, 8, f"site-0{i}", "personalised/accuracy", a)
             for i, a in enumerate((0.8, 0.9))]
    results = report.results_frame(rows)
    meta = pd.DataFrame({"experiment": ["alone", "alone-dp", "fed", "fed-dp"],
                         "kind": ["local", "local", "federated", "federated"],
                         "dp": [False, True, False, True]})
    text = report.joining_sentence(report.summarize(results, meta), meta, results)
    assert "without DP, fed 0.950 against training alone 0.700 (+25.0 points)" in text
    assert "with DP, fed-dp 0.800 against fine-tuning alone with DP 0.800 (+0.0 points)" in text
    assert "fed-dp personalised 0.850" in text
    assert "95% intervals" not in text  # the test counts unknown: no interval
    assert report.joining_sentence(report.summarize(results, meta), None, results) == ""
    # with each hospital's test count, an interval beside every mean, and the counts
    counted = report.results_frame(rows + [("fed", 0, 8, "site-00", "test-cases", 100),
                                           ("fed", 0, 8, "site-01", "test-cases", 25)])
    text = report.joining_sentence(report.summarize(counted, meta), meta, counted)
    low, high = report.accuracy_interval(pd.Series({"site-00": 0.9, "site-01": 1.0}),
                                         {"site-00": 100, "site-01": 25})
    assert f"without DP, fed 0.950 [{low:.3f}, {high:.3f}] against training alone 0.700 [" in text
    assert "fed-dp personalised 0.850 [" in text
    assert "test cases: 25-100 a hospital, 125 in all]" in text


def _audited(tmp_path: Path, keep_roc: bool) -> tuple[pd.DataFrame, Path]:
    """Two hospitals' test accuracy and loss-attack audit of `fedavg`; its seed folder
    keeps the attack's ROC points when `keep_roc`."""
    from types import SimpleNamespace

    rows = []
    for i, site in enumerate(SITES):
        rows += [("fedavg", 0, 2, site, TEST + "accuracy", 0.7),
                 ("fedavg", 0, 2, site, report.AUDIT + "loss-auc", 0.55 + 0.1 * i),
                 ("fedavg", 0, 2, site, report.AUDIT + "loss-auc-lo", 0.45),
                 ("fedavg", 0, 2, site, report.AUDIT + "loss-auc-hi", 0.7),
                 ("fedavg", 0, 2, site, report.AUDIT + "loss-tpr@1%fpr", 0.02)]
    out = tmp_path / "run"
    if keep_roc:
        folder = out / report.RUN_EXPERIMENTS_DIR / "fedavg" / "seed-0"
        folder.mkdir(parents=True)
        attack = [SimpleNamespace(site=s, attack="loss", fpr=(0.0, 0.3, 1.0),
                                  tpr=(0.0, 0.4 + 0.1 * i, 1.0)) for i, s in enumerate(SITES)]
        report.write_roc_points(attack, folder)
    return results_frame(rows), out


def test_the_audit_roc_is_drawn_from_the_points_the_run_kept(tmp_path: Path, saved_figures) -> None:  # noqa: ANN001, E501
    # Prepare
    results, out = _audited(tmp_path, keep_roc=True)

    # Execute
    files = write_report(results, out)

    # Assert: the kept file holds rates only; one ROC line per hospital and the chance line
    kept = pd.read_csv(out / "experiments" / "fedavg" / "seed-0" / report.ROC_FILE)
    assert list(kept.columns) == list(report.ROC_COLUMNS) and len(kept) == 6
    fig = saved_figures["audit-roc.png"]
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == [*SITES, "chance"]
    assert list(ax.get_lines()[-1].get_xdata()) == [0, 1]  # the diagonal
    assert "fedavg (mean AUC 0.60)" == ax.get_title()
    page = files.report_html.read_text(encoding="utf-8")
    audit_section = page.split("<h2>Membership inference</h2>")[1].split("<h2>")[0]
    assert 'alt="membership inference: ROC of the loss attack per hospital"' in audit_section
    assert "no ROC curve" not in page


def test_an_audit_without_roc_points_says_so_in_one_line(tmp_path: Path) -> None:
    # Prepare: an audit whose run kept no ROC points (an older run)
    results, out = _audited(tmp_path, keep_roc=False)

    # Execute
    files = write_report(results, out)

    # Assert
    page = files.report_html.read_text(encoding="utf-8")
    assert "audit-roc.png" not in {p.name for p in files.plots}
    assert "no ROC curve: the run kept no ROC points (audit-roc.csv) for: fedavg." in page


def test_a_figure_without_data_is_left_out_with_a_note(tmp_path: Path) -> None:
    # Prepare: no final test metric at all, and baselines with no per-round values
    empty = summarize(report.empty_results())

    # Execute
    per_site = report.plot_per_site_accuracy(empty, tmp_path / "a.png")
    privacy = report.plot_privacy_utility(empty, tmp_path / "b.png")
    page = write_report(_baselines_table(), tmp_path / "run").report_html.read_text(
        encoding="utf-8")

    # Assert
    assert per_site is None and privacy is None and not list(tmp_path.glob("*.png"))
    assert ("no per-round values, so no learning curves (final numbers in the tables): "
            "local-dp, public-only.") in page


def test_html_per_hospital_table_gives_each_hospitals_test_cases(tmp_path: Path) -> None:
    # Prepare
    rows = [("fedavg", 0, 2, s, TEST + "accuracy", 0.7) for s in SITES]
    rows += [("fedavg", 0, 0, s, report.TEST_CASES, n) for s, n in zip(SITES, (30, 45),
                                                                      strict=True)]

    # Execute
    page = write_report(results_frame(rows), tmp_path).report_html.read_text(encoding="utf-8")

    # Assert
    assert "<th>hospital</th><th>test cases</th><th>fedavg</th>" in page
    assert "<td>site-00</td><td>30</td><td>0.700</td>" in page
    assert "<td>mean</td><td>75 in all</td>" in page


def test_per_label_auroc_table_means_the_hospitals_that_can_score_a_label(tmp_path: Path):
    # Prepare: two hospitals; "nodule" cannot be ranked at h2 (NaN), round 1 is not final
    rows = [
        ("bow", 0, 1, "h1", "test/auroc-normal", 0.1),
        ("bow", 0, 2, "h1", "test/auroc-normal", 0.9),
        ("bow", 0, 2, "h2", "test/auroc-normal", 0.7),
        ("bow", 0, 2, "h1", "test/auroc-nodule", 0.6),
        ("bow", 0, 2, "h2", "test/auroc-nodule", math.nan),
        ("bow", 0, 2, "h1", "test/auroc", 0.75),
        ("pooled", 0, 2, "h1", "test/accuracy", 0.5),
    ]
    results = report.results_frame(rows)

    # Execute
    headers, table = report.per_label_rows(results, ["pooled", "bow"])
    files = report.write_report(results, tmp_path)

    # Assert: labels as columns in the results' order; the count where not every
    # hospital could score the label; an experiment without per-label values has no row
    assert headers == ["experiment", "normal", "nodule"]
    assert table == [["bow", "0.800", "0.600 (1/2)"]]
    assert "AUROC per label" in files.summary_md.read_text()
    assert "AUROC per label" in files.report_html.read_text()
