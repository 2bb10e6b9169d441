"""`medfuse predict` on a site and on one image: the CSV, a PNG per case, the gallery;
a file that is not a medfuse model, or of another label set, is refused with the reason."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from typer.testing import CliRunner

from medfuse import app
from shared_model.config import DEFAULT_LABELS, ModelConfig
from shared_model.model import MedFuseModel
from shared_model.model_file import payload

PNG = b"\x89PNG\r\n\x1a\n"


def _model_file(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig.small(image_size=32)
    torch.save(payload(MedFuseModel(cfg).state_dict(), cfg, DEFAULT_LABELS, round=1), path)
    return path


def test_predict_writes_a_row_a_picture_and_a_gallery_entry_per_case(
    tiny_federation: list[Path], tmp_path: Path
):
    model = _model_file(tmp_path / "model.pt")
    site = tiny_federation[0]
    out = tmp_path / "pred"
    result = CliRunner().invoke(app, ["predict", str(model), str(site), "--out", str(out),
                                      "--limit", "6"])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "predictions.csv")
    assert len(frame) == 6 and set(frame["predicted"]) <= set(DEFAULT_LABELS)
    probs = frame[[f"p_{lab}" for lab in DEFAULT_LABELS]].sum(axis=1)
    assert ((probs - 1.0).abs() < 1e-4).all()
    pngs = sorted((out / "cases").glob("*.png"))
    assert len(pngs) == 6 and all(p.read_bytes().startswith(PNG) for p in pngs)
    page = (out / "index.html").read_text(encoding="utf-8")
    assert page.count("<figure") == 6 and all(c in page for c in frame["case_id"])
    assert "accuracy on the labelled cases" in result.output


def test_predict_one_image_with_its_report(tiny_federation: list[Path], tmp_path: Path):
    model = _model_file(tmp_path / "model.pt")
    image = next(p for p in sorted(tiny_federation[0].rglob("*")) if p.suffix == ".png")
    out = tmp_path / "one"
    result = CliRunner().invoke(app, ["predict", str(model), "--image", str(image),
                                      "--report", "heart enlarged, no effusion",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(out / "predictions.csv")) == 1
    assert len(list((out / "cases").glob("*.png"))) == 1


def test_predict_refuses_what_is_not_a_medfuse_model_or_has_other_labels(
    tiny_federation: list[Path], tmp_path: Path
):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    model = _model_file(tmp_path / "model.pt")
    site = str(tiny_federation[0])
    not_model = CliRunner().invoke(app, ["predict", str(junk), site, "--out", str(tmp_path)])
    other = CliRunner().invoke(app, ["predict", str(model), site, "--labels", "a,b",
                                     "--out", str(tmp_path)])
    assert not_model.exit_code == 2 and "not a medfuse model file" in not_model.output
    assert other.exit_code == 2 and "labels" in other.output
    assert not (tmp_path / "predictions.csv").exists()


def test_personalise_fine_tunes_with_dp_charged_to_the_ledger_and_refuses_past_the_budget(
    tiny_federation: list[Path], tmp_path: Path
):
    from client.privacy import LedgerStore
    from shared_model.model_file import load_model_file

    model = _model_file(tmp_path / "model.pt")
    site = str(tiny_federation[1])
    store = tmp_path / "store"
    out = tmp_path / "personal.pt"
    ok = CliRunner().invoke(app, ["personalise", str(model), site, "--out", str(out),
                                  "--epochs", "1", "--epsilon-budget", "20",
                                  "--state-dir", str(store)])
    assert ok.exit_code == 0, ok.output
    assert "global" in ok.output and "personalised" in ok.output
    personal = load_model_file(out)
    assert personal.meta["source"] == "personalise" and 0 < personal.meta["epsilon"] <= 20
    (ledger,) = LedgerStore(store).ledgers()
    assert [e.kind for e in ledger.entries].count("dp-sgd") == 1
    # the same data with a budget below what is already spent: refused, nothing written
    again = CliRunner().invoke(app, ["personalise", str(model), site, "--out",
                                     str(tmp_path / "again.pt"), "--epochs", "1",
                                     "--epsilon-budget", "1", "--state-dir", str(store)])
    assert again.exit_code in (1, 2) and "budget" in again.output
    assert not (tmp_path / "again.pt").exists()
