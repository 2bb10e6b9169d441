"""Trust at the edges: a wrong input gives one clear line that names what is wrong and
what to do, with the exit status, never a traceback; nothing claims what did not happen."""

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from client.privacy import INDEX_FILE, LedgerStore, ledger_text, render_ledger
from medfuse import app as medfuse_app
from shared_model.config import DEFAULT_LABELS, ModelConfig
from shared_model.model import MedFuseModel
from shared_model.model_file import payload
from shared_model.tooling.synth import SynthConfig, write_federation
from tests.client.test_ledger_tamper import _site, _spend
from tests.shared_model.test_dataset import _latin1_report_site


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# ----------------------------------------------------------------- privacy show


@pytest.mark.parametrize("content", [b'{"version": 1, garbage', b"", b"[]", b'{"version": 1}',
                                     b"\xff\xfe{}"])
def test_privacy_show_with_a_corrupt_store_index_prints_one_line_naming_it(
    tmp_path: Path, content: bytes
) -> None:
    # Prepare: a store with one ledger, then its index overwritten
    store = LedgerStore(tmp_path / "store")
    _spend(store, _site(tmp_path / "site-00"))
    index = store.root / INDEX_FILE
    index.write_bytes(content)

    # Execute
    result = CliRunner().invoke(medfuse_app, ["privacy", "show", "--state-dir",
                                              str(store.root)])

    # Assert: exit 1, one line on stderr naming the file and what to restore, no traceback
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert str(index) in lines[0] and "restore it from a backup" in lines[0]
    assert "Traceback" not in result.output


def _two_budgets(tmp_path: Path) -> LedgerStore:
    """A store whose ledger spent two DP rounds and one exact (noiseless, inf) evaluation
    under a run id as long as Flower's."""
    store = LedgerStore(tmp_path / "store")
    ledger = _spend(store, _site(tmp_path / "site-00"))
    ledger.append("exact-evaluation", run_id=18446744073709551615, server_round=2,
                  noise_multiplier=0.0)
    store.save(ledger)
    return store


def _assert_readable(text: str) -> None:
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, text
    assert "\u2026" not in text and "..." not in text  # no cell cut short
    train = lines.index("Training budget (training split)")
    evaluation = lines.index("Evaluation budget (val/test splits)")
    assert train < evaluation
    assert "epsilon 3.3681 spent of 8, left 4.6319" in lines[train + 1]
    assert "epsilon inf spent of 2, left 0.0000" in lines[evaluation + 1]
    assert "dp-sgd" in "\n".join(lines[train:evaluation])
    assert "dp-sgd" not in "\n".join(lines[evaluation:])
    flat = " ".join(text.split())
    assert "It caps what every release from the training split" in flat
    assert "It caps what the metrics released from the val and test splits" in flat
    assert '"inf" is a release made without DP noise' in flat
    assert "184467440" in text and "615" in text  # the long run id folds, whole


def test_render_ledger_fits_80_columns_with_the_budgets_in_separate_sections(
    tmp_path: Path,
) -> None:
    # Prepare
    store = _two_budgets(tmp_path)
    (key,) = store.keys()
    console = Console(width=80, record=True, file=io.StringIO())

    # Execute
    console.print(render_ledger(store.load(key)))

    # Assert: the rich and the plain text forms alike
    _assert_readable(console.export_text())
    _assert_readable(ledger_text(store.load(key)))


def test_privacy_show_in_a_pipe_is_plain_and_fits_80_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: stdout as a pipe gives it, 80 columns whatever terminal runs the test
    store = _two_budgets(tmp_path)
    monkeypatch.setattr("client.cli.console", Console(width=80))

    # Execute
    result = CliRunner().invoke(medfuse_app, ["privacy", "show", "--state-dir",
                                              str(store.root)])

    # Assert
    assert result.exit_code == 0, result.output
    assert "\x1b[" not in result.stdout  # no colour codes in a pipe
    _assert_readable(result.stdout)


# ----------------------------------------------------------------- data check


@pytest.mark.parametrize(("strict", "status"), [(False, 0), (True, 1)])
def test_data_check_names_the_row_of_a_report_that_is_not_utf8(
    tmp_path: Path, strict: bool, status: int
) -> None:
    # Prepare: three cases, one report saved as Latin-1
    site = _latin1_report_site(tmp_path / "site")

    # Execute
    result = CliRunner().invoke(medfuse_app, ["data", "check", str(site),
                                              *(["--strict"] if strict else [])])

    # Assert: that row is named and skipped (refused under --strict), no codec traceback
    assert result.exit_code == status
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "report is not UTF-8 text (byte 0xE9 at character 4)" in result.stdout
    assert "ok-1" in result.stdout and "codec" not in result.output


# ----------------------------------------------------------------- audit


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A model file in a federation's final/ folder, and two small synthetic sites."""
    out = tmp_path_factory.mktemp("edges-audit")
    cfg = ModelConfig.small(image_size=32)
    sites = write_federation(out / "sites", SynthConfig(sites=2, cases_per_site=30, seed=3,
                                                        image_size=32))
    torch.manual_seed(0)
    model = out / "final" / "model.pt"
    model.parent.mkdir()
    torch.save(payload(MedFuseModel(cfg).state_dict(), cfg, DEFAULT_LABELS, round=1), model)
    return model, sites


def _audit(model: Path, site: Path, out: Path):
    return CliRunner().invoke(medfuse_app, ["audit", str(model), str(site), "--references",
                                            "0", "--out", str(out), "--device", "cpu"])


def test_audit_refuses_a_site_the_model_card_does_not_name(
    federation: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    # Prepare: the card beside the model names only the first site
    model, sites = federation
    card = model.parent / "model_card.json"
    card.write_text(json.dumps({"sites": [sites[0].name]}))
    try:
        # Execute
        result = _audit(model, sites[1], tmp_path / "audit")
    finally:
        card.unlink()

    # Assert: exit 2, one line naming the site, the card and why; no verdict, no files
    assert result.exit_code == 2
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: site(s) {sites[1].name} are not among the sites")
    assert str(card) in lines[0] and "never members" in lines[0]
    assert "NO MEASURABLE LEAK" not in result.output and not (tmp_path / "audit").exists()


def test_audit_of_a_site_the_card_names_says_so_in_the_verdict(
    federation: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    # Prepare
    model, sites = federation
    card = model.parent / "model_card.json"
    card.write_text(json.dumps({"sites": [s.name for s in sites]}))
    try:
        # Execute
        result = _audit(model, sites[0], tmp_path / "audit")
    finally:
        card.unlink()

    # Assert: the verdict line says whose membership it measured
    assert result.exit_code == 0, result.output
    (line,) = [x for x in result.stdout.splitlines() if "LEAK" in x]
    assert f"; members: each site's train split; {card} lists these sites" in line
    saved = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert saved["verdict"] == line


def test_audit_without_a_record_of_sites_says_membership_is_assumed(
    federation: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    # Prepare: no model card, no sites in the model file
    model, sites = federation

    # Execute
    result = _audit(model, sites[1], tmp_path / "audit")

    # Assert: one verdict line, with the assumption stated plainly
    assert result.exit_code == 0, result.output
    (line,) = [x for x in result.stdout.splitlines() if "LEAK" in x]
    assert "; membership assumed, not checked: the members are each site's train split" in line
    assert "cannot be checked" in line and "no model_card.json beside it" in line
