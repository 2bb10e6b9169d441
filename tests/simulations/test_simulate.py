"""`medfuse simulate` end to end: baselines without Flower (fast), and a 2-site, 2-round
federated run in Flower's simulation engine (slow)."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from server.ops.processes import pids_with_env
from simulations import report
from simulations.config import load_config
from simulations.simulate import simulate

PNG = b"\x89PNG\r\n\x1a\n"


def _app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command("simulate")(simulate)
    app.command("noop")(lambda: None)  # two commands: `simulate` stays a sub-command
    return app


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(_app(), ["simulate", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, " ".join(result.output.split())


def _config(path: Path, experiments: str, rounds: int = 2) -> Path:
    path.write_text(
        'name = "test"\nseeds = [0]\n'
        "[model]\nimage-size = 32\n"
        f"[training]\nrounds = {rounds}\nlocal-epochs = 1\n"
        "[resources]\ncentral-threads = 1\n" + experiments,
        encoding="utf-8",
    )
    return path


BASELINES = """
[[experiment]]
name = "pooled"
kind = "pooled"

[[experiment]]
name = "local-only"
kind = "local"
"""


def _copy_sites(sites: list[Path], dest: Path) -> list[Path]:
    out = []
    for s in sites:
        shutil.copytree(s, dest / s.name)
        out.append(dest / s.name)
    return out


def test_bad_config_stops_before_anything_runs(tmp_path: Path) -> None:
    # Prepare
    cfg = _config(
        tmp_path / "bad.toml",
        '[[experiment]]\nname = "f"\nkind = "federated"\ndp = true\nepsilon = -2.0\n',
    )

    # Execute
    code, output = _run(str(cfg), "--out", str(tmp_path / "out"))

    # Assert
    assert code == 2
    assert "experiment[0] (f).epsilon" in output and "-2.0" in output
    assert not (tmp_path / "out").exists()


def test_site_folder_without_manifest_is_refused(
    tmp_path: Path, tiny_federation: list[Path]
) -> None:
    # Prepare
    (tmp_path / "empty").mkdir()
    cfg = _config(tmp_path / "c.toml", BASELINES, rounds=1)

    # Execute
    code, output = _run(
        str(cfg),
        "--sites",
        str(tiny_federation[0]),
        str(tmp_path / "empty"),
        "--out",
        str(tmp_path / "out"),
    )

    # Assert
    assert code == 1 and "no manifest.csv" in output


def test_baselines_on_site_folders_report_bad_rows_and_skip_finished(
    tmp_path: Path, tiny_federation: list[Path]
) -> None:
    # Prepare: two site folders, one with a row whose image is missing
    sites = _copy_sites(tiny_federation, tmp_path / "data")
    with (sites[1] / "manifest.csv").open(encoding="utf-8") as fh:
        width = len(next(csv.reader(fh)))
    with (sites[1] / "manifest.csv").open("a", encoding="utf-8", newline="") as fh:
        row = ["lost-1", "images/lost.png", "", "normal", "", "", "", "", ""][:width]
        csv.writer(fh, lineterminator="\n").writerow(row)
    cfg = _config(tmp_path / "c.toml", BASELINES, rounds=1)
    out = tmp_path / "out"

    # Execute
    code, output = _run(str(cfg), "--sites", *map(str, sites), "--out", str(out))

    # Assert: the bad row is reported and skipped, every output is written
    assert code == 0, output
    assert "1 bad row(s) skipped" in output and "lost-1" in output
    results = report.read_results(out / "results.csv")
    assert set(results["experiment"]) == {"pooled", "local-only"}
    tested = results[results["metric"] == "test/accuracy"]
    assert set(tested["site"]) == {s.name for s in sites}
    assert (out / "summary.md").is_file() and (out / "report.html").is_file()
    assert "report:" in output and str(out / "report.html") in output
    assert load_config(out / "config.toml").sites.folders == tuple(s.resolve() for s in sites)

    # Execute: the same folder again
    marker = out / "experiments" / "pooled" / "seed-0" / "done.json"
    before = marker.stat().st_mtime_ns
    code, output = _run(str(cfg), "--sites", *map(str, sites), "--out", str(out))

    # Assert: nothing ran again
    assert code == 0, output
    assert "already finished" in output and "0 run, 2 already finished" in output
    assert marker.stat().st_mtime_ns == before

    # Execute: one more epoch changes the baselines' fingerprint: they run again
    cfg2 = _config(tmp_path / "c2.toml", BASELINES, rounds=2)
    code, output = _run(
        str(cfg2), "--sites", *map(str, sites), "--out", str(out), "--only", "pooled"
    )
    assert code == 0, output
    assert "1 run, 0 already finished" in output
    assert json.loads(marker.read_text())["fingerprint"] == load_config(
        cfg2, sites=sites
    ).fingerprint(load_config(cfg2).experiments[0], 0)


def _flower_processes(flwr_home: Path) -> list[int]:
    """Processes whose environment names this run's FLWR_HOME (none may outlive it)."""
    return pids_with_env("FLWR_HOME", str(flwr_home.resolve()))


@pytest.mark.slow
def test_two_sites_two_rounds_end_to_end(tmp_path: Path, tiny_federation: list[Path]) -> None:
    # Prepare: pooled, local-only and FedAvg with DP (epsilon 8) on two site folders,
    # the membership-inference audit on the federated model, and each hospital keeping 2
    # of its 8 for fine-tuning the final model on its own
    cfg = _config(
        tmp_path / "e2e.toml",
        BASELINES
        + """
[[experiment]]
name = "fedavg-dp"
kind = "federated"
dp = true
epsilon = 8.0
audit = true
personalise-epsilon = 2.0

[[experiment]]
name = "fedavg-central"
kind = "federated"
dp = false
run-config = { central-dp = "server", central-noise = 0.5, central-clip = 0.01 }
""",
    )
    out = tmp_path / "out"

    # Execute
    code, output = _run(str(cfg), "--sites", *map(str, tiny_federation), "--out", str(out))

    # Assert: the long table holds every experiment, per round and per site
    assert code == 0, output
    results = report.read_results(out / "results.csv")
    assert list(results.columns) == list(report.COLUMNS)
    assert set(results["experiment"]) == {"pooled", "local-only", "fedavg-dp", "fedavg-central"}
    central = results[(results["experiment"] == "fedavg-central")
                      & (results["metric"] == "train/central-epsilon")]
    assert list(central["round"]) == [1, 2] and central["value"].is_monotonic_increasing
    card = json.loads((out / "experiments" / "fedavg-central" / "seed-0" / "final"
                       / "model_card.json").read_text())
    assert card["privacy"]["central_dp"]["epsilon"] == central["value"].max()
    fed = results[results["experiment"] == "fedavg-dp"]
    sites = {p.name for p in tiny_federation}
    assert set(fed[fed["metric"] == "eval/accuracy"]["round"]) == {1, 2}
    assert set(fed[fed["metric"] == "test/accuracy"]["site"]) == sites
    eps = fed[fed["metric"] == "train/epsilon"]["value"]
    assert len(eps) == 4 and (eps > 0).all() and (eps <= 6.0 + 1e-6).all()  # 2 kept
    # each simulated hospital kept its privacy ledger in a store of its own, under the
    # experiment's folder (one store for all made them train one at a time)
    from client.privacy import LedgerStore

    stores = out / "experiments" / "fedavg-dp" / "seed-0" / "ledgers"
    assert {p.name for p in stores.iterdir()} == {p.name for p in tiny_federation}
    ledgers = [led for site in tiny_federation
               for led in LedgerStore(stores / site.name).ledgers()]
    assert sorted(n for led in ledgers for n in led.site_names) == sorted(sites)
    # two federated rounds and the hospital's own fine-tuning, all on the same ledger
    assert all([e.kind for e in led.entries].count("dp-sgd") == 3 for led in ledgers)
    personal = fed[fed["metric"] == "personalised/epsilon"]
    assert set(personal["site"]) == sites
    assert (personal["value"] > eps.max()).all() and (personal["value"] <= 8.0 + 1e-6).all()
    assert set(fed[fed["metric"] == "personalised/accuracy"]["site"]) == sites
    # summary, non-empty plots, report
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert "| fedavg-dp |" in md and "| pooled |" in md and "| local-only |" in md
    for png in (out / "plots").glob("*.png"):
        assert png.read_bytes().startswith(PNG) and png.stat().st_size > 5000
    # 3 overviews, global-vs-personalised, round times and the audit's ROC, a curve each
    assert len(list((out / "plots").glob("*.png"))) == 10
    assert (out / "plots" / "round-times.png").is_file()
    assert (out / "plots" / "audit-roc.png").is_file()
    assert "data:image/png;base64," in (out / "report.html").read_text(encoding="utf-8")
    assert _flower_processes(out / "flower" / "flwr-home") == []
    # the audit: one AUC per hospital, in the report, with its ROC plot
    auc = fed[fed["metric"] == "audit/loss-auc"]
    assert set(auc["site"]) == sites and auc["value"].between(0, 1).all()
    assert "Membership inference" in (out / "report.html").read_text(encoding="utf-8")
    assert "## Membership inference" in md
    assert "## Personalised at each hospital" in md and "| fedavg-dp | mean |" in md
    assert (out / "experiments" / "fedavg-dp" / "seed-0" / "audit-roc.png").is_file()

    # Execute: the same output folder again
    t0 = time.monotonic()
    code, output = _run(str(cfg), "--sites", *map(str, tiny_federation), "--out", str(out))

    # Assert: every experiment was finished, none ran again (no Flower started)
    assert code == 0, output
    assert "0 run, 4 already finished" in output
    assert "starting a simulation SuperLink" not in output
    assert time.monotonic() - t0 < 60


def test_output_folder_inside_the_app_must_be_ignored(tmp_path: Path) -> None:
    # Prepare: an app folder whose .gitignore ignores runs/ only
    from simulations.experiments.context import SimulationError
    from simulations.experiments.flower import check_outside_app

    app = tmp_path / "app"
    app.mkdir()
    (app / ".gitignore").write_text("/runs/\n")

    # Execute / Assert
    check_outside_app(app / "runs" / "study", app)
    check_outside_app(tmp_path / "elsewhere", app)
    with pytest.raises(SimulationError, match="bundle"):
        check_outside_app(app / "results", app)


@pytest.mark.slow
def test_the_public_start_public_only_and_local_dp_baselines(
    tmp_path: Path, tiny_federation: list[Path]
) -> None:
    # Prepare: a tiny public corpus, the public model alone, each site fine-tuning it
    # alone with DP, and a one-round DP federation starting from it
    cfg = _config(
        tmp_path / "public.toml",
        "[public]\nsource = \"synthetic\"\ncases = 80\nepochs = 1\n"
        + """
[[experiment]]
name = "public"
kind = "public"

[[experiment]]
name = "local-dp"
kind = "local"
dp = true
epsilon = 8.0

[[experiment]]
name = "fedavg-dp"
kind = "federated"
dp = true
epsilon = 8.0
""",
        rounds=1,
    )
    out = tmp_path / "out"
    # Execute
    code, output = _run(str(cfg), "--sites", *map(str, tiny_federation), "--out", str(out))
    # Assert: one public model, used by every experiment that starts from it
    assert code == 0, output
    (model,) = (out / "public").glob("model-*.pt")
    run_config = (out / "experiments" / "fedavg-dp" / "seed-0" / "run-config.toml").read_text()
    assert f'initial-model = "{model}"' in run_config
    results = report.read_results(out / "results.csv")
    public = results[results["experiment"] == "public"]
    assert set(public[public["metric"] == "test/accuracy"]["site"]) == {
        p.name for p in tiny_federation}
    local = results[(results["experiment"] == "local-dp") & (results["metric"] == "train/epsilon")]
    assert len(local) == 2 and ((local["value"] > 0) & (local["value"] <= 8.0)).all()
