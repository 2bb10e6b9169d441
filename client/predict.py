"""`medfuse predict`: the trained model on a hospital's own cases, with where it looked.

For each case: the predicted class and every class probability, the lesion box and its
score, the description the decoder writes from the image alone (the report hidden, as
in evaluation), and two pictures of the model's attention: the image attention map as a
heat overlay with the predicted box, and the report's words shaded by their attention
weights. Written as `predictions.csv`, one PNG per case and an `index.html` gallery that
needs nothing but a browser (images inline, no internet). A case that cannot be read (an
unreadable image, a bad manifest row) is a row of the CSV with its reason in `error`,
never silently left out.

It runs where the data is and sends nothing anywhere. The model file is checked first: a
file that is not a medfuse model, or whose label set is not the one asked for, is refused
with the reason before any case is read.

Label names come from the model file and case ids from the site, so neither is trusted
as markup: every text cell of the CSV that a spreadsheet would read as a formula is
prefixed with `'` (OWASP's advice for CSV injection), the gallery escapes every string
(jinja2 autoescape), the pictures draw them as plain text (no mathtext), and what is
printed on the terminal has its control characters escaped.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
import torch

from shared_model.dataset import PIXEL_MEAN, PIXEL_STD, BadRow, load_image
from shared_model.files import atomic_write_text
from shared_model.model import MedFuseModel
from shared_model.model_file import ModelFile
from shared_model.tokenizer import EMPTY, PAD, Tokenizer, split_words
from shared_model.tooling.figures import pyplot, save_png


@dataclass(frozen=True)
class Case:
    """One case to predict: its id, the model input and what is known about it."""

    case_id: str
    image: torch.Tensor  # (C, S, S) normalised as in training
    report: str
    true_label: str = ""
    split: str = ""


@dataclass(frozen=True)
class Prediction:
    case_id: str
    label: str
    probs: dict[str, float]
    box: tuple[float, float, float, float] | None  # x0, y0, x1, y1 as fractions
    lesion_score: float | None
    description: str
    image_attention: np.ndarray | None  # (h, w)
    words: list[str]  # the report's words the model read
    word_attention: list[float]  # one weight per word
    true_label: str = ""
    split: str = ""


def case_from_file(image: Path, report: str, model: ModelFile) -> Case:
    """A case from one image file (PNG 8/16-bit, JPEG, DICOM, read as in the site format)."""
    pixels, _fmt, _size = load_image(Path(image), model.model_config)  # (C, S, S) in [0, 1]
    tensor = (torch.from_numpy(pixels) - PIXEL_MEAN) / PIXEL_STD
    return Case(case_id=Path(image).stem, image=tensor, report=report)


def skipped_of_site(site) -> list[BadRow]:
    """The manifest rows of an opened site that are not cases (an unreadable image, an
    unknown label...), each with its reason: listed beside the predictions."""
    return list(site.summary.bad_rows)


def cases_of_site(site) -> list[Case]:
    """Every usable case of an opened site, split by split."""
    out = []
    for split in site.splits():
        for i in range(len(split)):
            out.append(Case(case_id=split.case_ids[i], image=split.images[i],
                            report=split.reports[i], true_label=site.labels[
                                int(split.label_ids[i])], split=split.split))
    return out


@torch.no_grad()
def predict(model_file: ModelFile, cases: Sequence[Case], device: torch.device,
            batch_size: int = 32) -> list[Prediction]:
    cfg = model_file.model_config
    labels = model_file.labels
    tok = Tokenizer(cfg.vocab_size)
    model = MedFuseModel(cfg)
    model.load_state_dict(model_file.state, strict=True)
    model.to(device).eval()
    out: list[Prediction] = []
    for start in range(0, len(cases), batch_size):
        chunk = cases[start:start + batch_size]
        image = torch.stack([c.image for c in chunk]).to(device)  # (B, C, S, S)
        tokens = torch.stack([tok.encode_padded(c.report, cfg.max_report_tokens)
                              for c in chunk]).to(device)  # (B, T)
        res = model(image if cfg.modality != "text" else None,
                    tokens if cfg.modality != "image" else None)
        probs = res.logits.softmax(-1).cpu().numpy()  # (B, K)
        generated = None
        if cfg.generation and cfg.modality != "text":
            hidden = torch.full_like(tokens, PAD)
            hidden[:, 0] = EMPTY  # describe the image, not the report
            generated = model.generate(image, hidden).cpu()  # (B, L)
        for i, case in enumerate(chunk):
            words = split_words(case.report)[: cfg.max_report_tokens]
            att = (res.text_attention[i, : len(words)].cpu().tolist()
                   if res.text_attention is not None and words else [])
            out.append(Prediction(
                case_id=case.case_id, label=labels[int(probs[i].argmax())],
                probs={lab: float(p) for lab, p in zip(labels, probs[i], strict=True)},
                box=tuple(float(v) for v in res.box[i].cpu()) if res.box is not None else None,
                lesion_score=(float(torch.sigmoid(res.lesion_logit[i]))
                              if res.lesion_logit is not None else None),
                description=" ".join(tok.decode(generated[i].tolist()))
                if generated is not None else "",
                image_attention=(res.image_attention[i].cpu().numpy()
                                 if res.image_attention is not None else None),
                words=words, word_attention=att, true_label=case.true_label,
                split=case.split))
    return out


# ----------------------------------------------------------------- outputs

# What makes a spreadsheet read a cell as a formula (OWASP, "CSV Injection"): such a text
# cell is written with a leading `'`, which shows the text as it is.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


def csv_text(value: object) -> object:
    """`value` as a CSV cell: text that would start a formula gets a leading `'`;
    numbers and empty cells are left as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def for_terminal(text: str) -> str:
    """`text` with every non-printable character escaped (a case id or label must not
    move the cursor, colour or retitle the terminal)."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def prediction_text(pred: Prediction) -> str:
    """One case's prediction as text: label and probability, every class's probability,
    the box and its score, the generated description."""
    probs = ", ".join(f"{lab} {p:.3f}" for lab, p in
                      sorted(pred.probs.items(), key=lambda kv: -kv[1]))
    lines = [f"{pred.case_id}: {pred.label} (probability {pred.probs[pred.label]:.3f})",
             f"  classes: {probs}"]
    if pred.box is not None:
        box = ", ".join(f"{v:.3f}" for v in pred.box)
        score = f"{pred.lesion_score:.3f}" if pred.lesion_score is not None else "-"
        lines.append(f"  lesion box (x0, y0, x1, y1 as fractions): {box}; score {score}")
    lines.append(f"  generated description: {pred.description or '(none)'}")
    return "\n".join(for_terminal(line) for line in lines)


def _safe(case_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in case_id)[:80] or "case"


def _png_names(preds: Sequence[Prediction]) -> list[str]:
    """A file name per case; case ids that map to the same name get a number."""
    names, used = [], set()
    for i, pred in enumerate(preds):
        name = _safe(pred.case_id)
        if name.lower() in used:
            name = f"{name}-{i}"
        used.add(name.lower())
        names.append(name)
    return names


def case_png(pred: Prediction, image: torch.Tensor, path: Path) -> Path:
    """The image with the attention heat map and the predicted box; the report's words
    shaded by attention; the predicted class and the generated description as titles."""
    # lazy: matplotlib is slow (0.2 s); loads where a picture is drawn, as pyplot() does
    from matplotlib.patches import Rectangle

    grey = (image[0].cpu().numpy() * PIXEL_STD + PIXEL_MEAN).clip(0, 1)  # (S, S)
    side = grey.shape[-1]
    fig, (ax, tx) = pyplot().subplots(1, 2, figsize=(9, 4.2),
                                      gridspec_kw={"width_ratios": [1, 1.2]})
    ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
    if pred.image_attention is not None:
        ax.imshow(pred.image_attention, cmap="inferno", alpha=0.45,
                  extent=(0, side, side, 0), interpolation="bilinear")
    if pred.box is not None and (pred.lesion_score or 0) >= 0.5:
        x0, y0, x1, y1 = (v * side for v in pred.box)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="cyan", lw=1.5))
    ax.set_axis_off()
    ax.set_title(f"{pred.label} ({pred.probs[pred.label]:.2f})"
                 + (f"; true: {pred.true_label}" if pred.true_label else ""), fontsize=9,
                 parse_math=False)
    tx.set_axis_off()
    tx.set_xlim(0, 1)
    tx.set_ylim(0, 1)
    top = max(pred.word_attention, default=0.0) or 1.0
    x, y = 0.0, 0.95
    for word, w in zip(pred.words, pred.word_attention or [0.0] * len(pred.words),
                       strict=False):
        width = 0.018 * (len(word) + 1)
        if x + width > 1.0:
            x, y = 0.0, y - 0.07
        tx.text(x, y, word, fontsize=8, va="top", parse_math=False, bbox={
            "facecolor": (1.0, 0.55, 0.0, float(w) / top), "edgecolor": "none", "pad": 1})
        x += width
    tx.set_title("report, shaded by attention", fontsize=9)
    fig.text(0.02, 0.02, f"generated: {pred.description or '(none)'}"[:160], fontsize=8,
             parse_math=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save_png(fig, path, dpi=80)


def write_outputs(preds: Sequence[Prediction], cases: Sequence[Case], out: Path,
                  labels: Sequence[str], skipped: Sequence[BadRow] = ()) -> dict[str, Path]:
    """predictions.csv, cases/<id>.png and index.html under `out`. Each skipped row is a
    row of the CSV too, with its reason in `error` (empty for a predicted case)."""
    out = Path(out)
    rows, pngs = [], []
    for pred, case, name in zip(preds, cases, _png_names(preds), strict=True):
        pngs.append(case_png(pred, case.image, out / "cases" / f"{name}.png"))
        rows.append({"case_id": pred.case_id, "split": pred.split, "true_label": pred.true_label,
                     "predicted": pred.label,
                     **{f"p_{lab}": pred.probs[lab] for lab in labels},
                     "box_x0": pred.box[0] if pred.box else None,
                     "box_y0": pred.box[1] if pred.box else None,
                     "box_x1": pred.box[2] if pred.box else None,
                     "box_y1": pred.box[3] if pred.box else None,
                     "lesion_score": pred.lesion_score, "description": pred.description,
                     "error": ""})
    for bad in skipped:
        rows.append({"case_id": bad.case_id, "error": f"not predicted (manifest row "
                                                      f"{bad.row}): {bad.reason}"})
    columns = ["case_id", "split", "true_label", "predicted", *(f"p_{lab}" for lab in labels),
               "box_x0", "box_y0", "box_x1", "box_y1", "lesion_score", "description", "error"]
    frame = pd.DataFrame([{k: csv_text(v) for k, v in row.items()} for row in rows],
                         columns=columns)
    csv = atomic_write_text(out / "predictions.csv", frame.to_csv(index=False))
    index = atomic_write_text(out / "index.html", _gallery(preds, pngs))
    return {"csv": csv, "index": index}


def _gallery(preds: Sequence[Prediction], pngs: Sequence[Path]) -> str:
    """One self-contained page from its template: every case's picture inline."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("client", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    cases = [{"case_id": p.case_id, "label": p.label, "prob": p.probs[p.label],
              "true_label": p.true_label, "description": p.description,
              "verdict": "" if not p.true_label else "ok" if p.true_label == p.label
              else "wrong", "png": base64.b64encode(png.read_bytes()).decode("ascii")}
             for p, png in zip(preds, pngs, strict=True)]
    known = [c for c in cases if c["true_label"]]
    return env.get_template("predict.html.j2").render(
        cases=cases, known=len(known), correct=sum(c["verdict"] == "ok" for c in known))
