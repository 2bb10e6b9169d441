"""Result tables, plots and the HTML report of a simulation (no Flower, no torch).

Everything here reads one long table, one row per measurement (FLamby's benchmarks):

    experiment, seed, round, site, metric, value

Metric names carry where they were measured: `test/<m>` is the final model on a
hospital's test split (the numbers of the summary), `eval/<m>` the federated evaluation
of the global model after each round (on the split the run config's `eval-split` names),
`train/<m>` what a hospital reported after
training (`train/loss`, and `train/epsilon`: its cumulative privacy spend, inf without
DP). `site` is a hospital's name, or `all` for a value of the whole experiment (pooled
training loss per epoch, `seconds`). An optional experiments table (experiment, series,
kind, strategy, modality, dp, epsilon_budget) groups experiments into privacy-utility
curves; without it the report still works from the long table alone.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from rich import box
from rich.table import Table

from shared_model.contract.metric_registry import HEADLINE, PER_LABEL, View, per_label_of, shown_in
from shared_model.files import atomic_write_text
from shared_model.tooling.figures import pyplot, save_png

COLUMNS = ("experiment", "seed", "round", "site", "metric", "value")
META_COLUMNS = ("experiment", "series", "kind", "strategy", "modality", "dp", "epsilon_budget")
ALL_SITES = "all"
MEAN = "mean"
TEST = "test/"
AUDIT = "audit/"  # membership-inference audit of the final model, per site
PERSONALISED = "personalised/"  # the final model fine-tuned at each site (DP), its test
EVAL = "eval/"
TRAIN_LOSS = "train/loss"
EPSILON = "train/epsilon"
SECONDS = "seconds"
TEST_CASES = "test-cases"  # each hospital's number of test cases (what its metrics are over)
# (label, metric) of the final-metric tables, from the metric registry
SUMMARY_METRICS: tuple[tuple[str, str], ...] = tuple(
    (m.label, m.name) for m in shown_in(View.TABLES))
EPS_COLUMN = "epsilon"
TERMINAL_MAX_SITES = 20
RESULTS_FILE = "results.csv"
EXPERIMENTS_FILE = "experiments.csv"
SUMMARY_FILE = "summary.md"
REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
# the audit's ROC points per hospital (false and true positive rates at each threshold,
# no case's score or identity), next to audit-roc.png in each experiment's seed folder
ROC_FILE = "audit-roc.csv"
ROC_COLUMNS = ("site", "attack", "fpr", "tpr")
RUN_EXPERIMENTS_DIR = "experiments"  # context.EXPERIMENTS_DIR (context imports this module)
# the report branch's attention over a few test reports (experiments.attention, which
# loads torch: the name is repeated here)
ATTENTION_FILE = "text-attention.json"


# ---------------------------------------------------------------------- the long table


def empty_results() -> pd.DataFrame:
    return pd.DataFrame(
        {
            c: pd.Series(dtype=t)
            for c, t in zip(
                COLUMNS, ("object", "int64", "int64", "object", "object", "float64"), strict=True
            )
        }
    )


def results_frame(rows: Sequence[Sequence[object]] | pd.DataFrame) -> pd.DataFrame:
    """Rows (tuples in COLUMNS order, or a frame) as a typed long table."""
    frame = (
        rows.copy()
        if isinstance(rows, pd.DataFrame)
        else pd.DataFrame(list(rows), columns=list(COLUMNS))
    )
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"results table lacks column(s) {', '.join(missing)}")
    frame = frame[list(COLUMNS)]
    if frame.empty:
        return empty_results()
    return frame.astype(
        {
            "experiment": str,
            "seed": "int64",
            "round": "int64",
            "site": str,
            "metric": str,
            "value": "float64",
        }
    ).reset_index(drop=True)


def read_results(path: Path) -> pd.DataFrame:
    """A results CSV (inf and nan are read back as numbers)."""
    frame = pd.read_csv(
        path, dtype={"experiment": str, "site": str, "metric": str}, keep_default_na=False
    )
    frame["value"] = pd.to_numeric(frame["value"].replace({"": "nan"}), errors="coerce")
    return results_frame(frame)


def write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, frame.to_csv(index=False))


def experiment_order(results: pd.DataFrame, meta: pd.DataFrame | None = None) -> list[str]:
    """Experiments in the experiments table's order, then any others by first appearance."""
    seen = list(dict.fromkeys(results["experiment"].tolist()))
    if meta is None or meta.empty:
        return seen
    first = [e for e in meta["experiment"].tolist() if e in set(seen)]
    return first + [e for e in seen if e not in set(first)]


def site_order(sites: Sequence[str]) -> list[str]:
    def key(s: str) -> tuple:
        return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s))

    return sorted({s for s in sites if s != ALL_SITES}, key=key)


# ---------------------------------------------------------------------- final metrics


def final_per_site(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (experiment, seed, site): the final test metrics and the epsilon spent
    (largest cumulative epsilon the site reported; inf without DP, nan if unknown)."""
    cols = ["experiment", "seed", "site"] + [m for _, m in SUMMARY_METRICS] + [EPS_COLUMN]
    test = results[results["metric"].str.startswith(TEST) & (results["site"] != ALL_SITES)]
    if test.empty:
        return pd.DataFrame(columns=cols)
    last = test.loc[test.groupby(["experiment", "seed", "site", "metric"])["round"].idxmax()]
    wide = last.assign(metric=last["metric"].str.slice(len(TEST))).pivot_table(
        index=["experiment", "seed", "site"],
        columns="metric",
        values="value",
        aggfunc="first",
        dropna=False,
    )
    eps = results[(results["metric"] == EPSILON) & (results["site"] != ALL_SITES)]
    if not eps.empty:
        spent = eps.groupby(["experiment", "seed", "site"])["value"].max()
        wide[EPS_COLUMN] = spent.reindex(wide.index)
    for c in cols[3:]:
        if c not in wide.columns:
            wide[c] = np.nan
    return wide.reset_index()[cols]


@dataclass
class Summary:
    """Final metrics per (experiment, site) and the mean over sites, averaged over seeds."""

    per_site: pd.DataFrame  # experiment, site, metrics..., epsilon (mean over seeds)
    mean: pd.DataFrame  # experiment, metrics..., epsilon, seeds, +"<m> std" when seeds > 1
    experiments: list[str]
    sites: list[str]
    labels: dict[str, str] = field(default_factory=dict)
    test_cases: dict[str, int] = field(default_factory=dict)  # site -> its test cases


def summarize(results: pd.DataFrame, meta: pd.DataFrame | None = None) -> Summary:
    metrics = [m for _, m in SUMMARY_METRICS]
    per = final_per_site(results)
    order = [e for e in experiment_order(results, meta) if e in set(per["experiment"])]
    sites = site_order(per["site"].tolist())
    # mean over sites per seed (epsilon: the largest any site spent), then over seeds
    by_seed = per.groupby(["experiment", "seed"])
    seed_mean = by_seed[metrics].mean()
    if not per.empty:
        seed_mean[EPS_COLUMN] = by_seed[EPS_COLUMN].max()
    else:
        seed_mean[EPS_COLUMN] = []
    seed_mean = seed_mean.reset_index()
    mean = seed_mean.groupby("experiment")[metrics + [EPS_COLUMN]].mean()
    mean["seeds"] = seed_mean.groupby("experiment")["seed"].nunique()
    if (mean["seeds"] > 1).any():
        std = seed_mean.groupby("experiment")[metrics].std(ddof=1)
        for m in metrics:
            mean[f"{m} std"] = std[m]
    secs = results[(results["metric"] == SECONDS) & (results["site"] == ALL_SITES)]
    mean[SECONDS] = secs.groupby("experiment")["value"].mean().reindex(mean.index)
    mean = mean.reindex(order).reset_index()
    site_mean = per.groupby(["experiment", "site"])[metrics + [EPS_COLUMN]].mean().reset_index()
    labels = {}
    if meta is not None and not meta.empty and "label" in meta.columns:
        labels = dict(zip(meta["experiment"], meta["label"], strict=False))
    return Summary(per_site=site_mean, mean=mean, experiments=order, sites=sites, labels=labels,
                   test_cases=test_cases(results))


def test_cases(results: pd.DataFrame) -> dict[str, int]:
    """Each hospital's number of test cases ({} where the results do not hold them)."""
    rows = results[results["metric"] == TEST_CASES]
    return {str(s): int(v) for s, v in zip(rows["site"], rows["value"], strict=True)}


def accuracy_interval(per_site: pd.Series, cases: Mapping[str, int]) -> tuple[float, float]:
    """A 95% interval of the mean test accuracy over hospitals (`per_site`: site ->
    accuracy), from the binomial sampling of each hospital's test cases: the variance
    of the mean is the sum of p(1-p)/n over hospitals over their number squared (normal
    approximation). (nan, nan) where a hospital's count is unknown."""
    known = [(p, cases.get(str(site), 0)) for site, p in per_site.items() if np.isfinite(p)]
    if not known or any(n <= 0 for _, n in known):
        return math.nan, math.nan
    k = len(known)
    mean = sum(p for p, _ in known) / k
    half = 1.96 * math.sqrt(sum(p * (1 - p) / n for p, n in known)) / k
    return max(mean - half, 0.0), min(mean + half, 1.0)


def fmt(value: float, metric: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if metric == EPS_COLUMN:
        return "∞" if math.isinf(value) else f"{value:.2f}"
    return f"{value:.3f}"


def _cell(row: pd.Series, metric: str) -> str:
    text = fmt(row.get(metric, math.nan), metric)
    std = row.get(f"{metric} std")
    if std is not None and isinstance(std, float) and not math.isnan(std):
        text += f" ± {std:.3f}"
    return text


SPREAD_NOTE = (
    "Beside each mean: with several seeds, ± the standard deviation over seeds of the mean "
    "over hospitals; with one seed, (lowest–highest hospital), the spread over hospitals, "
    "not a confidence interval. "
    f"Beside mean {HEADLINE.label}: [a 95% interval] from the sampling of each hospital's "
    "test cases (binomial, normal approximation), where the results hold their number. "
    "hospitals × seeds: what the mean is over, and how many test cases each hospital has."
)


def _spread_cell(summary: Summary, experiment: str, metric: str) -> str:
    """The mean, ± its standard deviation over seeds where there are several, else the
    range over hospitals (what SPREAD_NOTE says)."""
    row = summary.mean.set_index("experiment").loc[experiment]
    if row.get("seeds", 1) > 1:
        return _cell(row, metric)
    text = fmt(row.get(metric, math.nan), metric)
    mine = summary.per_site[summary.per_site["experiment"] == experiment]
    sites = mine[metric][np.isfinite(mine[metric].to_numpy(dtype=float))]
    if metric == HEADLINE.name:
        low, high = accuracy_interval(mine.set_index("site")[metric], summary.test_cases)
        if np.isfinite(low):
            text += f" [{fmt(low, metric)}, {fmt(high, metric)}]"
    if len(sites) > 1:
        text += f" ({fmt(sites.min(), metric)}–{fmt(sites.max(), metric)})"
    return text


def _n_cell(summary: Summary, experiment: str) -> str:
    sites = summary.per_site.loc[summary.per_site["experiment"] == experiment, "site"].nunique()
    seeds = summary.mean.set_index("experiment").at[experiment, "seeds"]
    names = summary.per_site.loc[summary.per_site["experiment"] == experiment, "site"]
    counts = [summary.test_cases[s] for s in names if s in summary.test_cases]
    if not counts:
        return f"{sites} × {seeds}"
    span = str(min(counts)) if min(counts) == max(counts) else f"{min(counts)}–{max(counts)}"
    return f"{sites} × {seeds}; {span} test cases each"


def mean_rows(summary: Summary, with_std: bool = True, spread: bool = False,
              view: View = View.TABLES) -> tuple[list[str], list[list[str]]]:
    """The mean over hospitals per experiment, of the metrics `view` lists; `spread` (the
    HTML report): each mean with its spread (SPREAD_NOTE) and what it is over."""
    metrics = [(m.label, m.name) for m in shown_in(view)]
    headers = (["experiment"] + (["hospitals × seeds"] if spread else [])
               + [h for h, _ in metrics] + ["epsilon", "time (s)"])
    rows = []
    for _, row in summary.mean.iterrows():
        cells = [_spread_cell(summary, row["experiment"], m) if spread
                 else _cell(row, m) if with_std else fmt(row[m], m)
                 for _, m in metrics]
        secs = row.get(SECONDS, math.nan)
        rows.append(
            [str(row["experiment"])]
            + ([_n_cell(summary, row["experiment"])] if spread else [])
            + cells
            + [
                fmt(row[EPS_COLUMN], EPS_COLUMN),
                "-" if secs is None or math.isnan(secs) else f"{secs:.0f}",
            ]
        )
    return headers, rows


def site_accuracy_rows(
    summary: Summary, metric: str = HEADLINE.name, spread: bool = False
) -> tuple[list[str], list[list[str]]]:
    """Each hospital's final value per experiment, and the mean (with its spread, see
    SPREAD_NOTE, when `spread`; then also each hospital's number of test cases, what its
    values are over, where the results hold them)."""
    cases = spread and bool(summary.test_cases)
    headers = ["hospital"] + (["test cases"] if cases else []) + summary.experiments
    table = summary.per_site.pivot_table(
        index="site", columns="experiment", values=metric, aggfunc="first", dropna=False
    )
    rows = []
    for site in summary.sites:
        rows.append(
            [site]
            + ([str(summary.test_cases.get(site, "-"))] if cases else [])
            + [
                fmt(table.at[site, e], metric)
                if site in table.index and e in table.columns
                else "-"
                for e in summary.experiments
            ]
        )
    means = summary.mean.set_index("experiment")
    total = sum(summary.test_cases.get(site, 0) for site in summary.sites)
    rows.append([MEAN] + ([f"{total} in all"] if cases else [])
                + [_spread_cell(summary, e, metric)
                   if spread else fmt(means.at[e, metric], metric)
                   for e in summary.experiments])
    return headers, rows


def detail_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    headers = ["experiment", "hospital"] + [h for h, _ in SUMMARY_METRICS] + ["epsilon"]
    rows = []
    for exp in summary.experiments:
        part = summary.per_site[summary.per_site["experiment"] == exp].set_index("site")
        for site in summary.sites:
            if site not in part.index:
                continue
            r = part.loc[site]
            rows.append(
                [exp, site]
                + [fmt(r[m], m) for _, m in SUMMARY_METRICS]
                + [fmt(r[EPS_COLUMN], EPS_COLUMN)]
            )
        m = summary.mean[summary.mean["experiment"] == exp]
        if not m.empty:
            r = m.iloc[0]
            rows.append(
                [exp, f"**{MEAN}**"]
                + [_cell(r, mm) for _, mm in SUMMARY_METRICS]
                + [fmt(r[EPS_COLUMN], EPS_COLUMN)]
            )
    return headers, rows


PER_LABEL_NOTE = (
    "One-vs-rest AUROC of each label, final model on each hospital's test split, mean over "
    "the hospitals whose test split holds both positives and negatives of the label "
    "(k/n: only k of the n hospitals could score it; with label skew a rare label is "
    "absent from some hospitals' test splits), then over seeds."
)


def per_label_rows(results: pd.DataFrame, order: Sequence[str] = (),
                   metric_label: str = PER_LABEL[0].label
                   ) -> tuple[list[str], list[list[str]]]:
    """Per experiment, each label's value of the per-label metric (`PER_LABEL`, one-vs-rest
    AUROC) at the final round, as PER_LABEL_NOTE says; no rows when no experiment
    measured one. Labels in the order the results first name them (the label set's)."""
    test = results[results["metric"].str.startswith(TEST) & (results["site"] != ALL_SITES)]
    named = test["metric"].str.slice(len(TEST)).map(per_label_of)
    test = test.assign(label=named.map(lambda m: m[1] if m and m[0].label == metric_label
                                       else None)).dropna(subset=["label"])
    if test.empty:
        return ["experiment"], []
    labels = list(dict.fromkeys(test["label"]))
    last = test[test["round"] == test.groupby(["experiment", "seed", "site"])["round"]
                .transform("max")]
    finite = last[np.isfinite(last["value"])]
    by_seed = finite.groupby(["experiment", "label", "seed"])["value"].mean()
    mean = by_seed.groupby(["experiment", "label"]).mean()
    scored = finite.groupby(["experiment", "label"])["site"].nunique()
    sites = last.groupby("experiment")["site"].nunique()
    rows = []
    for exp in list(dict.fromkeys([*[o for o in order if o in set(last["experiment"])],
                                   *last["experiment"]])):
        cells = []
        for lab in labels:
            value = mean.get((exp, lab), math.nan)
            k, n = int(scored.get((exp, lab), 0)), int(sites.get(exp, 0))
            cells.append(fmt(value) + (f" ({k}/{n})" if k < n else ""))
        rows.append([exp, *cells])
    return ["experiment", *labels], rows


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|")

    align = ["---"] + ["---:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


NOTES = (
    "Final model on each hospital's test split. `mean`: unweighted mean over hospitals "
    "(± standard deviation over seeds where there are several). epsilon: the largest "
    "cumulative privacy spend of any hospital (delta as configured); ∞ = trained without "
    "differential privacy (pooled and local-only baselines train centrally, without DP). "
    "time: wall seconds of the experiment (mean over seeds)."
)


def audit_rows(results: pd.DataFrame, order: Sequence[str] = ()
               ) -> tuple[list[str], list[list[str]]]:
    """The membership-inference audit per audited experiment (loss attack): mean AUC over
    hospitals, the widest 95% interval, the strongest hospital's lower bound, the mean TPR
    at 1% FPR, and the verdict of `client.audit.verdict` on the strongest hospital's lower
    bound. No rows when nothing was audited."""
    headers = ["experiment", "hospitals", "AUC (mean)", "95% interval (widest)",
               "strongest lower bound", "TPR at 1% FPR (mean)", "verdict"]
    audit = results[results["metric"].str.startswith(AUDIT + "loss-")]
    rows = []
    if audit.empty:
        return headers, rows
    names = list(dict.fromkeys([*order, *audit["experiment"].tolist()]))
    for exp in names:
        mine = audit[audit["experiment"] == exp]
        if mine.empty:
            continue

        def values(key: str, frame: pd.DataFrame = mine) -> pd.Series:
            return frame[frame["metric"] == f"{AUDIT}loss-{key}"]["value"]

        rows.append([exp, str(values("auc").size), f"{values('auc').mean():.3f}",
                     f"[{values('auc-lo').min():.2f}, {values('auc-hi').max():.2f}]",
                     f"{values('auc-lo').max():.3f}", f"{values('tpr@1%fpr').mean():.1%}",
                     audit_verdict(values("auc-lo").max())])
    return headers, rows


def leak_thresholds() -> tuple[float, float]:
    """(LEAKS from, SOME LEAK from) on the AUC's lower bound, `client.audit`'s own
    (imported only when there is an audit to judge: the module loads torch)."""
    # lazy: client.audit loads torch, opacus and sklearn (seconds); this module stays light
    from client.audit import CLEAR_LEAK, SOME_LEAK

    return CLEAR_LEAK, SOME_LEAK


def audit_verdict(strongest_lower_bound: float) -> str:
    """The word of `client.audit.verdict` for the strongest hospital's AUC lower bound,
    with its thresholds."""
    clear, some = leak_thresholds()
    if strongest_lower_bound >= clear:
        return "LEAKS"
    if strongest_lower_bound >= some:
        return "SOME LEAK"
    return "NO MEASURABLE LEAK"


def _final_site_values(results: pd.DataFrame, metric: str) -> pd.Series:
    """metric's value per (experiment, site) at its last round, mean over seeds."""
    rows = results[results["metric"] == metric]
    if rows.empty:
        return pd.Series(dtype=float)
    last = rows[rows["round"] == rows.groupby(["experiment", "seed"])["round"].transform("max")]
    return last.groupby(["experiment", "site"])["value"].mean()


def _first(meta: pd.DataFrame, kind: str, dp: bool) -> str | None:
    rows = meta[(meta["kind"] == kind) & (meta["dp"].astype(str) == str(dp))]
    return str(rows["experiment"].iloc[0]) if len(rows) else None


def joining_sentence(summary: Summary, meta: pd.DataFrame | None,
                     results: pd.DataFrame) -> str:
    """One sentence: what joining the federation gives a hospital, without and with DP,
    against what it gets alone (the first such experiments of the run); '' where the run
    has no such pair."""
    if meta is None or meta.empty or not {"kind", "dp"} <= set(meta.columns):
        return ""
    acc = summary.mean.set_index("experiment")[HEADLINE.name].to_dict()
    mine = _final_site_values(results, PERSONALISED + HEADLINE.name)
    per_site = summary.per_site.set_index(["experiment", "site"])[HEADLINE.name]
    parts = []
    for dp, alone_label in ((False, "training alone"), (True, "fine-tuning alone with DP")):
        fed, alone = _first(meta, "federated", dp), _first(meta, "local", dp)
        if fed not in acc or alone not in acc:
            continue
        text = (f"{'with' if dp else 'without'} DP, {fed} {acc[fed]:.3f}"
                f"{_interval(per_site[fed], summary.test_cases)} against {alone_label} "
                f"{acc[alone]:.3f}{_interval(per_site[alone], summary.test_cases)} "
                f"({100 * (acc[fed] - acc[alone]):+.1f} points)")
        if dp and fed in mine.index.get_level_values(0):
            text += (f"; {fed} personalised {mine[fed].mean():.3f}"
                     f"{_interval(mine[fed], summary.test_cases)}")
        parts.append(text)
    if not parts:
        return ""
    counts = sorted(summary.test_cases.values())
    over = (f"; [95% intervals from each hospital's test cases: {counts[0]}-{counts[-1]} "
            f"a hospital, {sum(counts)} in all]") if counts else ""
    return (f"What joining gives a hospital (mean test {HEADLINE.label} over hospitals): "
            + "; ".join(parts) + over + ".")


def _interval(per_site: pd.Series, cases: Mapping[str, int]) -> str:
    """' [low, high]' (`accuracy_interval`), or '' where a hospital's count is unknown."""
    low, high = accuracy_interval(per_site, cases)
    return f" [{low:.3f}, {high:.3f}]" if np.isfinite(low) else ""


def personalised_rows(results: pd.DataFrame, order: Sequence[str] = ()
                      ) -> tuple[list[str], list[list[str]]]:
    """Per personalised experiment and hospital: the federation's final model and the
    hospital's DP fine-tuned copy on its test split, and the epsilon the personalised
    model has cost that hospital in all (federation and its own release)."""
    headers = ["experiment", "hospital", f"global {HEADLINE.label}",
               f"personalised {HEADLINE.label}",
               "change", "epsilon in all"]
    mine = _final_site_values(results, PERSONALISED + HEADLINE.name)
    if mine.empty:
        return headers, []
    glob = _final_site_values(results, TEST + HEADLINE.name)
    eps = _final_site_values(results, PERSONALISED + "epsilon")
    rows = []
    names = list(dict.fromkeys([*order, *mine.index.get_level_values(0)]))
    for exp in names:
        if exp not in mine.index.get_level_values(0):
            continue
        changes = []
        for site, after in mine[exp].items():
            before = glob.get((exp, site), math.nan)
            changes.append(after - before)
            rows.append([exp, str(site), f"{before:.3f}", f"{after:.3f}",
                         f"{after - before:+.3f}", f"{eps.get((exp, site), math.nan):.2f}"])
        rows.append([exp, "mean", f"{glob[exp].mean():.3f}", f"{mine[exp].mean():.3f}",
                     f"{np.nanmean(changes):+.3f}", f"{eps[exp].mean():.2f}"])
    return headers, rows


def plot_personalised(results: pd.DataFrame, path: Path) -> Path | None:
    """Global vs personalised test accuracy per hospital, one panel per experiment."""
    mine = _final_site_values(results, PERSONALISED + HEADLINE.name)
    if mine.empty:
        return None
    glob = _final_site_values(results, TEST + HEADLINE.name)
    plt = pyplot()
    exps = list(dict.fromkeys(mine.index.get_level_values(0)))
    fig, axes = plt.subplots(1, len(exps), figsize=(5.5 * len(exps) + 1.5, 3.8),
                             squeeze=False)
    for ax, exp in zip(axes[0], exps, strict=True):
        sites = list(mine[exp].index)
        x = np.arange(len(sites))
        ax.bar(x - 0.2, [glob.get((exp, s), np.nan) for s in sites], 0.4, label="global")
        ax.bar(x + 0.2, mine[exp].to_numpy(dtype=float), 0.4, label="personalised")
        ax.set_xticks(x, sites, fontsize=8)
        ax.set_ylim(0, 1.0)
        ax.set_ylabel(f"test {HEADLINE.label}")
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(exp, fontsize=10)
        _legend_outside(ax)
    fig.suptitle("the federation's model and each hospital's DP fine-tuned copy")
    fig.tight_layout()
    return save_png(fig, path)


def plot_round_times(results: pd.DataFrame, path: Path) -> Path | None:
    """Each federated experiment's round wall time at the server against the slowest
    hospital's own compute that round (its train and evaluate seconds): the gap is what
    the federation costs. None when no experiment was federated."""
    walls = results[(results["metric"] == EVAL + "round-seconds")
                    & (results["site"] == "federation")]
    if walls.empty:
        return None
    own = results[results["metric"].isin(["train/seconds", EVAL + "seconds"])
                  & (results["site"] != "federation")]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10.0, 4.0))
    for i, (exp, rows) in enumerate(walls.groupby("experiment", sort=False)):
        wall = rows.groupby("round")["value"].mean()
        line = ax.plot(wall.index, wall.to_numpy(), marker="o", ms=3, label=f"{exp}: round")
        mine = own[own["experiment"] == exp]
        if not mine.empty:
            slowest = (mine.groupby(["seed", "round", "site"])["value"].sum()
                       .groupby("round").max())
            ax.plot(slowest.index, slowest.to_numpy(), ls="--", color=line[0].get_color(),
                    label=f"{exp}: slowest hospital's compute" if i < 6 else None)
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    ax.set_title("round time at the server and the hospitals' own compute")
    fig.tight_layout()
    return save_png(fig, path)


def summary_markdown(summary: Summary, title: str = "medfuse simulation",
                     audit: tuple[list[str], list[list[str]]] | None = None,
                     personalised: tuple[list[str], list[list[str]]] | None = None,
                     per_label: tuple[list[str], list[list[str]]] | None = None) -> str:
    parts = [f"# {title}", "", NOTES, "", "## Mean over hospitals", ""]
    parts += [markdown_table(*mean_rows(summary)), ""]
    if per_label and per_label[1]:
        parts += ["## AUROC per label (one-vs-rest)", "", PER_LABEL_NOTE, "",
                  markdown_table(*per_label), ""]
    parts += [f"## {HEADLINE.label.capitalize()} per hospital", "",
              markdown_table(*site_accuracy_rows(summary)), ""]
    if audit and audit[1]:
        parts += ["## Membership inference (loss attack; chance: AUC 0.5)", "",
                  markdown_table(*audit), ""]
    if personalised and personalised[1]:
        parts += ["## Personalised at each hospital (DP fine-tuning of the final model)", "",
                  markdown_table(*personalised), ""]
    parts += ["## Every metric per hospital", "", markdown_table(*detail_rows(summary)), ""]
    return "\n".join(parts)


def terminal_tables(summary: Summary) -> list[Table]:
    """The summary for the terminal: the mean table, and accuracy per hospital when there
    are not too many hospitals to read."""
    out = []
    _, rows = mean_rows(summary, with_std=False, view=View.TERMINAL)
    headers = ["experiment", *(m.narrow for m in shown_in(View.TERMINAL)), "eps", "time s"]
    # one space between columns and no frame: ten columns fit 80 characters (a pipe or a
    # CI log is 80 wide), where a framed table cut every number to "1.0…"
    t = Table(
        title="final test metrics, mean over hospitals (eps: privacy spent, ∞ = no DP)",
        title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 0), show_edge=False,
    )
    for i, h in enumerate(headers):
        t.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        t.add_row(*r)
    out.append(t)
    if 0 < len(summary.sites) <= TERMINAL_MAX_SITES:
        headers, rows = site_accuracy_rows(summary)
        t = Table(title=f"test {HEADLINE.label} per hospital", title_justify="left")
        for i, h in enumerate(headers):
            t.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
        for r in rows[:-1]:
            t.add_row(*r)
        t.add_section()
        t.add_row(*rows[-1])
        out.append(t)
    return out


# ---------------------------------------------------------------------- plots


def _ticker():
    import matplotlib.ticker  # lazy: matplotlib is slow (0.2 s); as pyplot(), on first plot

    return matplotlib.ticker


def _say_empty(ax: Any, text: str) -> None:
    """A grey note in the middle of an axis that has nothing to draw, so an empty panel
    reads as "nothing to show" rather than as a broken plot."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def _legend_outside(ax: Any, **kwargs: Any) -> None:
    """The legend beside the axes, right of the data area, so that it never covers a
    bar or a line (tight_layout makes room for it)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              fontsize=8, **kwargs)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def _curve(results: pd.DataFrame, exp: str, metric: str) -> tuple[pd.Series, pd.DataFrame]:
    """(mean over sites and seeds by round, per-site by round averaged over seeds)."""
    part = results[(results["experiment"] == exp) & (results["metric"] == metric)]
    part = part[np.isfinite(part["value"])]
    if part.empty:
        return pd.Series(dtype=float), pd.DataFrame()
    per_site = part.groupby(["site", "round"])["value"].mean().unstack("site")
    mean = part.groupby(["seed", "round"])["value"].mean().groupby("round").mean()
    return mean, per_site


CURVE_PANELS: tuple[tuple[str, str], ...] = (
    (TRAIN_LOSS, "training loss"),
    (EVAL + HEADLINE.name, f"{HEADLINE.label} (federated evaluation)"),
)


def plot_learning_curves(results: pd.DataFrame, exp: str, path: Path) -> Path | None:
    """Training loss and per-round accuracy against round (or epoch) for one experiment:
    the mean over hospitals in bold, each hospital thin. Only the panels the experiment
    measured (a pooled run has no federated evaluation, a DP-local or public-only
    baseline no per-round values at all); None when it measured none."""
    curves = [(_curve(results, exp, metric), ylabel) for metric, ylabel in CURVE_PANELS]
    curves = [(c, ylabel) for c, ylabel in curves if not c[0].empty]
    if not curves:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves) + 1.5, 3.8),
                             squeeze=False)
    for ax, ((mean, per_site), ylabel) in zip(axes[0], curves, strict=True):
        if per_site.shape[1] > 1:
            named = per_site.shape[1] <= 8
            for col in per_site.columns:
                ax.plot(per_site.index, per_site[col], lw=0.8, alpha=0.45,
                        label=str(col) if named else None)
        ax.plot(mean.index, mean.values, lw=2.2, color="black", marker="o", ms=3,
                label="mean over hospitals" if per_site.shape[1] > 1 else None)
        if per_site.shape[1] > 1:
            _legend_outside(ax)
        ax.set_xlabel("round (federated) / epoch (central)")
        ax.xaxis.set_major_locator(_ticker().MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{exp}: learning curves")
    fig.tight_layout()
    return save_png(fig, path)


def plot_overview_curves(results: pd.DataFrame, experiments: Sequence[str], path: Path
                         ) -> Path | None:
    """Every experiment's mean training loss and per-round accuracy, one line each; only
    the panels some experiment measured, None when none did."""
    panels = [(TRAIN_LOSS, "training loss (mean)"),
              (EVAL + HEADLINE.name, f"{HEADLINE.label}, federated eval. (mean)")]
    drawn = [(ylabel, [(exp, c) for exp in experiments
                       if not (c := _curve(results, exp, metric)[0]).empty])
             for metric, ylabel in panels]
    drawn = [(ylabel, lines) for ylabel, lines in drawn if lines]
    if not drawn:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(drawn), figsize=(5 * len(drawn) + 1.5, 3.8),
                             squeeze=False)
    for ax, (ylabel, lines) in zip(axes[0], drawn, strict=True):
        for exp, mean in lines:
            ax.plot(mean.index, mean.values, marker="o", ms=3, label=exp)
        _legend_outside(ax)
        ax.set_xlabel("round / epoch")
        ax.xaxis.set_major_locator(_ticker().MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle("learning curves, all experiments")
    fig.tight_layout()
    return save_png(fig, path)


def plot_per_site_accuracy(summary: Summary, path: Path, metric: str = HEADLINE.name
                           ) -> Path | None:
    """Final test accuracy of each hospital under each experiment (bars; dots when there
    are many hospitals); None when there is no final test metric (a blank figure would
    read as a broken plot)."""
    sites, exps = summary.sites, summary.experiments
    if not sites or not exps:
        return None
    plt = pyplot()
    table = summary.per_site.pivot_table(
        index="site", columns="experiment", values=metric, aggfunc="first", dropna=False
    )
    table = table.reindex(index=sites, columns=exps)
    # + 2 inches for the legend beside the axes
    width = min(18.0, max(8.0, 0.45 * len(sites) * max(1, min(len(exps), 4)) / 2 + 5))
    fig, ax = plt.subplots(figsize=(width, 4.2))
    x = np.arange(len(sites))
    if len(sites) <= 12:
        w = 0.8 / len(exps)
        for i, exp in enumerate(exps):
            ax.bar(x - 0.4 + w * (i + 0.5), table[exp].to_numpy(dtype=float), w, label=exp)
    else:
        for exp in exps:
            ax.plot(x, table[exp].to_numpy(dtype=float), marker="o", ms=3, lw=0.6, label=exp)
    ax.set_xticks(
        x, sites, rotation=90 if len(sites) > 12 else 0, fontsize=7 if len(sites) > 12 else 9
    )
    ax.set_ylabel(f"test {metric}")
    ax.set_ylim(0, 1.0)
    ax.grid(axis="y", alpha=0.3)
    _legend_outside(ax)
    ax.set_title(f"final test {metric} per hospital")
    fig.tight_layout()
    return save_png(fig, path)


def plot_privacy_utility(summary: Summary, path: Path, meta: pd.DataFrame | None = None
                         ) -> Path | None:
    """Mean test accuracy against the privacy spent (epsilon, log scale); one line per
    series of DP experiments, dashed lines for the experiments without DP. None when no
    experiment has a mean accuracy (nothing to draw)."""
    mean = summary.mean.set_index("experiment") if not summary.mean.empty else None
    series = {}
    if meta is not None and not meta.empty and "series" in meta.columns:
        series = dict(zip(meta["experiment"], meta["series"], strict=False))
    points: dict[str, list[tuple[float, float, str]]] = {}
    refs: list[tuple[str, float, str]] = []
    if mean is not None:
        for exp in summary.experiments:
            eps, acc = float(mean.at[exp, EPS_COLUMN]), float(mean.at[exp, HEADLINE.name])
            if math.isnan(acc):
                continue
            if math.isfinite(eps) and eps > 0:
                points.setdefault(series.get(exp, exp), []).append((eps, acc, exp))
            else:  # no DP (infinite), or nothing spent (the public model alone): a line
                refs.append((exp, acc, "no DP" if math.isinf(eps) else "no site data"))
    if not points and not refs:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    for name, pts in points.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{name} (DP)")
        for _e, a, exp in pts:
            ax.annotate(exp, (_e, a), textcoords="offset points", xytext=(4, 4), fontsize=7)
    styles = ["--", ":", "-.", (0, (5, 2, 1, 2))]
    for i, (exp, acc, what) in enumerate(refs):
        ax.axhline(
            acc,
            ls=styles[i % len(styles)],
            color=f"C{(i + len(points)) % 10}",
            lw=1.2,
            label=f"{exp} ({what})",
        )
    if points:
        ax.set_xscale("log")
        ticks = sorted({round(p[0], 2) for pts in points.values() for p in pts})
        ax.set_xlim(min(ticks) / 2, max(ticks) * 2)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(_ticker().NullFormatter())
        ax.set_xlabel("epsilon spent (largest over hospitals, log scale)")
    else:
        _say_empty(ax, "no experiment with differential privacy")
        ax.set_xlabel("epsilon")
    ax.set_ylabel(f"mean test {HEADLINE.label}")
    ax.set_ylim(0, 1.0)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    ax.set_title("privacy-utility")
    fig.tight_layout()
    return save_png(fig, path)


# ---------------------------------------------------------------------- the audit's ROC


def roc_points(results: Sequence[Any]) -> pd.DataFrame:
    """The ROC points of membership-attack results (anything with site, attack, fpr and
    tpr, as client.audit.AttackResult) as ROC_COLUMNS: the rates at each threshold only,
    no case's loss or identity, so the curve can be redrawn without the cases."""
    rows = [(r.site, r.attack, float(f), float(t))
            for r in results for f, t in zip(r.fpr, r.tpr, strict=True)]
    return pd.DataFrame(rows, columns=list(ROC_COLUMNS))


def write_roc_points(results: Sequence[Any], folder: Path) -> Path:
    """ROC_FILE in an experiment's seed folder, beside audit-roc.png: the report reads
    only files, and the attack's curve is otherwise gone once the audit returns."""
    path = Path(folder) / ROC_FILE
    write_csv_atomic(roc_points(results), path)
    return path


def read_roc_points(out_dir: Path, experiments: Sequence[str]) -> pd.DataFrame:
    """The ROC points each experiment's seed folders under `out_dir` kept (experiment,
    seed, then ROC_COLUMNS); empty where none did (not audited, or an older run)."""
    cols = ["experiment", "seed", *ROC_COLUMNS]
    frames = []
    for exp in experiments:
        for path in sorted((Path(out_dir) / RUN_EXPERIMENTS_DIR / exp).glob(f"seed-*/{ROC_FILE}")):
            seed = path.parent.name.removeprefix("seed-")
            if not seed.isdigit():
                continue
            frame = pd.read_csv(path, dtype={"site": str, "attack": str})
            frames.append(frame.assign(experiment=exp, seed=int(seed)))
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def plot_audit_roc(roc: pd.DataFrame, results: pd.DataFrame, path: Path,
                   attack: str = "loss") -> Path | None:
    """The attack's ROC per hospital, one panel per audited experiment, with the chance
    diagonal: where the table's AUC and its TPR at low FPR come from. A hospital has one
    colour in every panel (the legend beside the last panel); with several seeds each
    seed's curve is drawn. None when the run kept no ROC points for `attack`."""
    mine = roc[roc["attack"] == attack]
    if mine.empty:
        return None
    exps = list(dict.fromkeys(mine["experiment"]))
    sites = site_order(mine["site"].tolist())
    named = len(sites) <= 10
    auc = results[results["metric"] == f"{AUDIT}{attack}-auc"].groupby("experiment")["value"]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(exps), figsize=(3.8 * len(exps) + 2.0, 4.0),
                             squeeze=False)
    for ax, exp in zip(axes[0], exps, strict=True):
        part = mine[mine["experiment"] == exp]
        first = part["seed"].min()
        for (seed, site), curve in part.groupby(["seed", "site"], sort=True):
            ax.plot(curve["fpr"], curve["tpr"], lw=1.1, color=f"C{sites.index(site) % 10}",
                    label=site if named and seed == first else None)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        mean_auc = auc.mean().get(exp, math.nan)
        ax.set_title(exp if math.isnan(mean_auc) else f"{exp} (mean AUC {mean_auc:.2f})",
                     fontsize=10)
        ax.grid(alpha=0.3)
    _legend_outside(axes[0][-1])
    fig.suptitle(f"membership inference: ROC of the {attack} attack per hospital")
    fig.tight_layout()
    return save_png(fig, path)


def shaded_words(words: Sequence[str], weights: Sequence[float]) -> list[tuple[str, float]]:
    """(word, shade in [0, 1]) per word: its attention weight over the report's largest,
    so the word the model leans on most is the darkest whatever the report's length."""
    top = max((float(w) for w in weights), default=0.0)
    return [(str(w), round(float(a) / top, 3) if top > 0 else 0.0)
            for w, a in zip(words, weights, strict=False)]


def read_attention(out_dir: Path, experiments: Sequence[str]) -> list[dict[str, Any]]:
    """Per experiment that kept one, its first seed's attention file as the report shows
    it: {"experiment", "seed", "cases": [{..., "shaded": [(word, shade), ...]}]}."""
    out = []
    for exp in experiments:
        paths = sorted((Path(out_dir) / RUN_EXPERIMENTS_DIR / exp).glob(
            f"seed-*/{ATTENTION_FILE}"))
        if not paths:
            continue
        try:
            cases = json.loads(paths[0].read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for case in cases:
            case["shaded"] = shaded_words(case.get("words", []), case.get("weights", []))
        out.append({"experiment": exp, "seed": paths[0].parent.name.removeprefix("seed-"),
                    "cases": cases})
    return out


def left_out_note(what: str, names: Sequence[str]) -> str:
    """One line naming what was not drawn and why, so that a missing figure is read as
    'nothing to show' rather than as a broken report ('' when nothing was left out)."""
    return f"{what}: {', '.join(names)}." if names else ""


# ---------------------------------------------------------------------- the report


@dataclass
class ReportFiles:
    summary_md: Path
    report_html: Path
    plots: list[Path]
    summary: Summary


def write_report(
    results: pd.DataFrame,
    out_dir: Path,
    *,
    meta: pd.DataFrame | None = None,
    title: str = "medfuse simulation",
    notes: Sequence[str] = (),
) -> ReportFiles:
    """summary.md, plots/*.png and report.html (plots embedded) under `out_dir`."""
    out_dir = Path(out_dir)
    plots_dir = out_dir / PLOTS_DIR
    plots_dir.mkdir(parents=True, exist_ok=True)
    for old in plots_dir.glob("*.png"):
        old.unlink()
    summary = summarize(results, meta)
    audit = audit_rows(results, summary.experiments)
    personalised = personalised_rows(results, summary.experiments)
    per_label = per_label_rows(results, summary.experiments)
    md = summary_markdown(summary, title, audit, personalised, per_label)
    summary_md = out_dir / SUMMARY_FILE
    atomic_write_text(summary_md, md + ("\n" + "\n".join(notes) + "\n" if notes else ""))
    experiments = experiment_order(results, meta)
    drawn_or_not = [
        (f"final test {HEADLINE.label} per hospital",
         plot_per_site_accuracy(summary, plots_dir / "per-site-accuracy.png")),
        ("privacy-utility", plot_privacy_utility(summary, plots_dir / "privacy-utility.png", meta)),
    ]
    main_plots = [
        *[(title, fig) for title, fig in drawn_or_not if fig is not None],
        *([("global vs personalised", fig)] if (fig := plot_personalised(
            results, plots_dir / "personalised.png")) is not None else []),
        *([("round time", fig)] if (fig := plot_round_times(
            results, plots_dir / "round-times.png")) is not None else []),
        *([("learning curves, all experiments", fig)] if (fig := plot_overview_curves(
            results, experiments, plots_dir / "learning-curves.png")) is not None else []),
    ]
    # an experiment that measured nothing per round (a DP-local or public-only baseline)
    # has no curves figure: its final numbers are in the tables
    curve_plots = [
        (f"learning curves: {exp}", fig)
        for exp in experiments
        if (fig := plot_learning_curves(results, exp, plots_dir / f"curves-{_safe(exp)}.png"))
        is not None
    ]
    roc = plot_audit_roc(read_roc_points(out_dir, experiments), results,
                         plots_dir / "audit-roc.png")
    audit_plots = [("membership inference: ROC of the loss attack per hospital", roc)
                   ] if roc is not None else []
    curved = {title.removeprefix("learning curves: ") for title, _ in curve_plots}
    left_out = {
        "main": left_out_note("not drawn, no data", [t for t, f in drawn_or_not if f is None]),
        "curves": left_out_note(
            "no per-round values, so no learning curves (final numbers in the tables)",
            [e for e in experiments if e not in curved]),
        "audit": left_out_note("no ROC curve: the run kept no ROC points "
                               f"({ROC_FILE}) for", [r[0] for r in audit[1]])
        if audit[1] and roc is None else "",
    }
    report_html = out_dir / REPORT_FILE
    atomic_write_text(report_html, _html(title, summary, main_plots, curve_plots, notes, audit,
                                         personalised, joining_sentence(summary, meta, results),
                                         audit_plots, left_out, per_label,
                                         read_attention(out_dir, experiments)))
    return ReportFiles(
        summary_md=summary_md,
        report_html=report_html,
        plots=[p for _, p in main_plots + curve_plots + audit_plots],
        summary=summary,
    )


def _plot(title: str, path: Path) -> dict[str, str]:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return {"title": title, "data": data, "file": f"{PLOTS_DIR}/{Path(path).name}"}


def _html(
    title: str,
    summary: Summary,
    main_plots: list[tuple[str, Path]],
    curve_plots: list[tuple[str, Path]],
    notes: Sequence[str],
    audit: tuple[list[str], list[list[str]]] | None = None,
    personalised: tuple[list[str], list[list[str]]] | None = None,
    joining: str = "",
    audit_plots: Sequence[tuple[str, Path]] = (),
    left_out: Mapping[str, str] | None = None,
    per_label: tuple[list[str], list[list[str]]] | None = None,
    attention: Sequence[Mapping[str, Any]] = (),
) -> str:
    """report.html from its template (autoescaped: names and notes are text, not HTML)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("simulations", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
    )
    return env.get_template("report.html.j2").render(
        title=title, notes=[NOTES, *notes], written=time.strftime("%Y-%m-%d %H:%M:%S"),
        joining=joining,
        mean=mean_rows(summary, spread=True), per_site=site_accuracy_rows(summary, spread=True),
        spread_note=SPREAD_NOTE,
        detail=detail_rows(summary),
        audit=audit if audit and audit[1] else None,
        audit_thresholds=leak_thresholds() if audit and audit[1] else None,
        personalised=personalised if personalised and personalised[1] else None,
        per_label=per_label if per_label and per_label[1] else None,
        per_label_note=PER_LABEL_NOTE,
        attention=list(attention),
        main_plots=[_plot(t, p) for t, p in main_plots],
        curve_plots=[_plot(t, p) for t, p in curve_plots],
        audit_plots=[_plot(t, p) for t, p in audit_plots],
        left_out={"main": "", "curves": "", "audit": "", **(left_out or {})},
    )
