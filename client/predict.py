"""`medfuse predict`: the trained model on a hospital's own cases, with where it looked.

Any folder in dataset format v1 can be predicted on, whatever its splits and whether or
not its cases are labelled (`open_for_inference`): a label, where given, is the truth shown
beside the prediction and counted in the accuracy line, never an input.

For each case: the predicted class and every class probability, the lesion score and,
only where it reaches the model file's `lesion_threshold` and a finding is predicted, the
lesion box; the description the decoder writes from the image alone (the report hidden,
as in evaluation), and where the model looked: the image attention map as a heat
overlay, and the report's words shaded by their attention weights. Written under the
output folder:
`predictions.csv`; `cases/<id>.png`, the film read again from the site at its own
resolution with the true box (where the manifest gives one) and the predicted box drawn;
`thumbs/<id>.jpg`, the same film at most `THUMB_PX` wide; `attention/<id>.png`, the
attention picture; and `index.html`, a gallery that links those files by relative path
(so the page stays small) and filters and sorts with a few lines of inline JavaScript
(no internet, no external file). A case that cannot be read (an unreadable image, a bad
manifest row) is a row of the CSV with its reason in `error` and is listed in the page,
never silently left out.

It runs where the data is and sends nothing anywhere. The model file is checked first: a
file that is not a medfuse model, or whose label set is not the one asked for, is refused
with the reason before any case is read.

Label names come from the model file and case ids from the site, so neither is trusted
as markup: every text cell of the CSV that a spreadsheet would read as a formula is
prefixed with `'` (OWASP's advice for CSV injection), the gallery escapes every string
(jinja2 autoescape; the script reads them only as data attributes, never as markup),
file names are made of letters, digits and `-_.` only, the pictures draw them as plain
text (no mathtext), and what is printed on the terminal has its control characters
escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont

from shared_model.config import DEFAULT_LESION_THRESHOLD
from shared_model.dataset import (
    PIXEL_MEAN,
    PIXEL_STD,
    BadRow,
    InferenceSite,
    decode_pixels,
    load_image,
)
from shared_model.files import atomic_write, atomic_write_text
from shared_model.metrics import boxes_drawn
from shared_model.model import MedFuseModel
from shared_model.model_file import ModelFile
from shared_model.tokenizer import EMPTY, PAD, Tokenizer, split_words
from shared_model.tooling.figures import pyplot, save_png

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of width, height

THUMB_PX = 256  # the longer side of a gallery thumbnail, at most
TRUE_COLOUR = "#56b4e9"  # sky blue: the manifest's box (Okabe-Ito, told apart by most eyes)
PRED_COLOUR = "#e69f00"  # orange: the predicted box


@dataclass(frozen=True)
class Case:
    """One case to predict: its id, the model input and what is known about it.

    `image_path` is the original file, read again for the pictures at its own resolution;
    `true_label` and `true_box` are the manifest's truth ("" and None where it has none).
    """

    case_id: str
    image: torch.Tensor  # (C, S, S) normalised as in training
    report: str
    true_label: str = ""
    split: str = ""
    image_path: Path | None = None
    true_box: Box | None = None


@dataclass(frozen=True)
class Prediction:
    """One case's prediction. `box` is None where `lesion_score` is below
    `lesion_threshold` or the predicted class is the lesion-free one (no finding, so
    nothing to point at); the score is always kept."""

    case_id: str
    label: str
    probs: dict[str, float]
    box: Box | None
    lesion_score: float | None
    description: str
    image_attention: np.ndarray | None  # (h, w)
    words: list[str]  # the report's words the model read
    word_attention: list[float]  # one weight per word
    true_label: str = ""
    split: str = ""
    true_box: Box | None = None
    lesion_threshold: float = DEFAULT_LESION_THRESHOLD


def case_from_file(image: Path, report: str, model: ModelFile) -> Case:
    """A case from one image file (PNG 8/16-bit, JPEG, DICOM, read as in the site format)."""
    pixels, _fmt, _size = load_image(Path(image), model.model_config)  # (C, S, S) in [0, 1]
    tensor = (torch.from_numpy(pixels) - PIXEL_MEAN) / PIXEL_STD
    return Case(case_id=Path(image).stem, image=tensor, report=report,
                image_path=Path(image))


def skipped_of_site(site: InferenceSite) -> list[BadRow]:
    """The manifest rows of an opened site that are not cases (an unreadable image, an
    unknown label...), each with its reason: listed beside the predictions."""
    return list(site.bad_rows)


def cases_of_site(site: InferenceSite) -> list[Case]:
    """Every readable case of a site opened for inference, in manifest order."""
    return [Case(case_id=c.case_id, image=c.image, report=c.report, true_label=c.label,
                 split=c.split, image_path=c.image_path, true_box=c.box)
            for c in site.cases]


@torch.no_grad()
def predict(model_file: ModelFile, cases: Sequence[Case], device: torch.device,
            batch_size: int = 32) -> list[Prediction]:
    """Every case through the model in batches; see `Prediction` for what each holds."""
    cfg = model_file.model_config
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
        generated = None
        if cfg.generation and cfg.modality != "text":
            hidden = torch.full_like(tokens, PAD)
            hidden[:, 0] = EMPTY  # describe the image, not the report
            # conditioned on the class shown (as evaluation scores it), the candidate
            # that states it preferred
            generated = model.generate(image, hidden, label_names=model_file.labels,
                                       classes=res.logits.argmax(-1)).cpu()  # (B, L)
        descriptions = ([" ".join(tok.decode(g.tolist())) for g in generated]
                        if generated is not None else [""] * len(chunk))
        out += [_prediction(case, i, res, descriptions[i], model_file)
                for i, case in enumerate(chunk)]
    return out


def _prediction(case: Case, i: int, res, description: str, model_file: ModelFile
                ) -> Prediction:
    """Row `i` of a batch's model output as one case's prediction; the box only where the
    lesion score reaches the threshold and a finding is predicted (`metrics.boxes_drawn`,
    the rule the box rate on normal films counts), since a box where no finding is
    predicted would point a reader at nothing."""
    cfg, labels = model_file.model_config, model_file.labels
    probs = res.logits[i].softmax(-1).cpu().numpy()  # (K,)
    label = labels[int(probs.argmax())]
    words = split_words(case.report)[: cfg.max_report_tokens]
    score = (float(torch.sigmoid(res.lesion_logit[i]))
             if res.lesion_logit is not None else None)
    threshold = model_file.lesion_threshold
    box: Box | None = None
    if res.box is not None and score is not None \
            and bool(boxes_drawn(np.array([score]), threshold, [label])[0]):
        x0, y0, x1, y1 = (float(v) for v in res.box[i].cpu())  # (4,)
        box = (x0, y0, x1, y1)
    return Prediction(
        case_id=case.case_id, label=label,
        probs={lab: float(p) for lab, p in zip(labels, probs, strict=True)},
        box=box, lesion_score=score, description=description,
        image_attention=(res.image_attention[i].cpu().numpy()
                         if res.image_attention is not None else None),
        words=words, word_attention=(res.text_attention[i, : len(words)].cpu().tolist()
                                     if res.text_attention is not None and words else []),
        true_label=case.true_label, split=case.split, true_box=case.true_box,
        lesion_threshold=threshold)


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
    the lesion score (always) and the box (where the score reaches the threshold and a
    finding is predicted), the generated description."""
    probs = ", ".join(f"{lab} {p:.3f}" for lab, p in
                      sorted(pred.probs.items(), key=lambda kv: -kv[1]))
    lines = [f"{pred.case_id}: {pred.label} (probability {pred.probs[pred.label]:.3f})"
             + (f"; true: {pred.true_label}" if pred.true_label else ""),
             f"  classes: {probs}", f"  {_lesion_text(pred)}"]
    lines.append(f"  generated description: {pred.description or '(none)'}")
    return "\n".join(for_terminal(line) for line in lines)


def _lesion_text(pred: Prediction) -> str:
    """The lesion score against its threshold, and the box where one is predicted."""
    if pred.lesion_score is None:
        return "lesion box: none (this model has no lesion head)"
    score = f"lesion score {pred.lesion_score:.3f} (threshold {pred.lesion_threshold:.3f})"
    if pred.box is None and pred.lesion_score >= pred.lesion_threshold:
        return f"{score}: no lesion box (predicted {pred.label}: no finding)"
    if pred.box is None:
        return f"{score}: no lesion box (no finding predicted)"
    box = ", ".join(f"{v:.3f}" for v in pred.box)
    return f"{score}: lesion box (x0, y0, x1, y1 as fractions) {box}"


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


# ----------------------------------------------------------------- pictures


def _title(pred: Prediction) -> str:
    """Predicted class and probability, the truth where known, the lesion score."""
    score = "-" if pred.lesion_score is None else f"{pred.lesion_score:.2f}"
    return (f"{pred.label} ({pred.probs[pred.label]:.2f})"
            + (f"; true: {pred.true_label}" if pred.true_label else "")
            + f"; lesion score {score}")


def case_png(pred: Prediction, image: torch.Tensor, path: Path) -> Path:
    """The model's input with the attention heat map, the true and the predicted box; the
    report's words shaded by attention; the prediction (with its lesion score) and the
    generated description as titles."""
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
    for box, colour in ((pred.true_box, TRUE_COLOUR), (pred.box, PRED_COLOUR)):
        if box is not None:
            x0, y0, x1, y1 = (v * side for v in box)
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colour,
                                   lw=1.5))
    ax.set_axis_off()
    ax.set_title(_title(pred), fontsize=9, parse_math=False)
    _shaded_words(tx, pred)
    fig.text(0.02, 0.02, f"generated: {pred.description or '(none)'}"[:160], fontsize=8,
             parse_math=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save_png(fig, path, dpi=80, palette=True)


def _shaded_words(tx, pred: Prediction) -> None:
    """The report's words on axes `tx`, each shaded by its attention weight."""
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


def original_film(case: Case) -> Image.Image:
    """The case's image as a reader sees it: the original file read again at its own
    resolution (8 bits a channel for the screen), not the model's small input. Where the
    file cannot be read again (changed since), the model input stands in for it."""
    try:
        if case.image_path is None:
            raise ValueError("no original file")
        pixels, _fmt = decode_pixels(case.image_path)  # (H, W) or (H, W, 3) in [0, 1]
    except Exception:  # noqa: BLE001 - any decoder failure: show what the model saw
        pixels = (case.image[0].cpu().numpy() * PIXEL_STD + PIXEL_MEAN).clip(0, 1)
    return Image.fromarray(np.round(pixels * 255.0).astype(np.uint8))  # L or RGB


def film_with_boxes(film: Image.Image, pred: Prediction) -> Image.Image:
    """`film` (at its own size) with the true box and the predicted box and its score
    drawn on it; the lines are thick enough to see at that size. Text is drawn as
    plain glyphs, so a label cannot be read as markup."""
    film = film.convert("RGB")  # a copy, in colour for the boxes
    draw = ImageDraw.Draw(film)
    w, h = film.size
    line = max(1, round(min(w, h) / 256))
    font = ImageFont.load_default(size=max(10, min(w, h) // 40))
    for box, colour in ((pred.true_box, TRUE_COLOUR), (pred.box, PRED_COLOUR)):
        if box is not None:
            x0, y0, x1, y1 = box[0] * w, box[1] * h, box[2] * w, box[3] * h
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
    if pred.box is not None and min(w, h) >= 2 * THUMB_PX:  # room for the text
        draw.text((pred.box[0] * w + line, pred.box[3] * h + line),
                  f"lesion {pred.lesion_score:.2f}", fill=PRED_COLOUR, font=font)
    return film


def thumbnail(film: Image.Image) -> Image.Image:
    """`film` at most `THUMB_PX` on its longer side (never enlarged): the page shows many."""
    small = film.copy()
    small.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
    return small


def _save_image(image: Image.Image, path: Path, fmt: str) -> Path:
    """Write a PIL image atomically (a reader never sees half a file)."""
    options = {"quality": 88} if fmt == "JPEG" else {"optimize": image.mode == "P"}
    return atomic_write(path, lambda fh: image.save(fh, format=fmt, **options))


def case_pictures(pred: Prediction, case: Case, out: Path, name: str) -> dict[str, str]:
    """The three pictures of one case under `out`; their paths relative to `out`, as the
    gallery links them."""
    film = original_film(case)
    rel = {"film": f"cases/{name}.png", "thumb": f"thumbs/{name}.jpg",
           "attention": f"attention/{name}.png"}
    _save_image(film_with_boxes(film, pred), out / rel["film"], "PNG")
    _save_image(thumbnail(film), out / rel["thumb"], "JPEG")
    case_png(pred, case.image, out / rel["attention"])
    return rel


# ----------------------------------------------------------------- files


def write_outputs(preds: Sequence[Prediction], cases: Sequence[Case], out: Path,
                  labels: Sequence[str], skipped: Sequence[BadRow] = ()) -> dict[str, Path]:
    """predictions.csv, the pictures of every case and index.html under `out`. Each
    skipped row is a row of the CSV too, with its reason in `error` (empty for a
    predicted case), and is listed in the page."""
    out = Path(out)
    pictures = [case_pictures(pred, case, out, name) for pred, case, name
                in zip(preds, cases, _png_names(preds), strict=True)]
    rows = [_csv_row(pred, labels) for pred in preds]
    rows += [{"case_id": bad.case_id, "error": f"not predicted (manifest row {bad.row}): "
              f"{bad.reason}"} for bad in skipped]
    columns = ["case_id", "split", "true_label", "predicted", *(f"p_{lab}" for lab in labels),
               "box_x0", "box_y0", "box_x1", "box_y1", "lesion_score", "description", "error"]
    frame = pd.DataFrame([{k: csv_text(v) for k, v in row.items()} for row in rows],
                         columns=columns)
    csv = atomic_write_text(out / "predictions.csv", frame.to_csv(index=False))
    index = atomic_write_text(out / "index.html",
                              gallery(preds, pictures, labels, skipped))
    return {"csv": csv, "index": index}


def _csv_row(pred: Prediction, labels: Sequence[str]) -> dict[str, object]:
    """One predicted case as a CSV row; the box cells are empty where no box is predicted,
    the lesion score never is (where the model has a lesion head)."""
    box = pred.box or (None, None, None, None)
    return {"case_id": pred.case_id, "split": pred.split, "true_label": pred.true_label,
            "predicted": pred.label, **{f"p_{lab}": pred.probs[lab] for lab in labels},
            "box_x0": box[0], "box_y0": box[1], "box_x1": box[2], "box_y1": box[3],
            "lesion_score": pred.lesion_score, "description": pred.description, "error": ""}


# ----------------------------------------------------------------- gallery


def _box_style(box: Box | None) -> str:
    """A box as CSS placing it over its thumbnail (percent of the picture); "" for none."""
    if box is None:
        return ""
    x0, y0, x1, y1 = (100.0 * v for v in box)
    return f"left:{x0:.2f}%;top:{y0:.2f}%;width:{x1 - x0:.2f}%;height:{y1 - y0:.2f}%"


def _verdict(pred: Prediction) -> str:
    """right, wrong, or unlabelled (no truth to judge by): what the page filters on."""
    if not pred.true_label:
        return "unlabelled"
    return "right" if pred.true_label == pred.label else "wrong"


def _gallery_case(order: int, pred: Prediction, pictures: dict[str, str]) -> dict:
    """What the template shows of one case; every string is escaped by the template."""
    return {"order": order, "case_id": pred.case_id, "label": pred.label,
            "prob": pred.probs[pred.label], "true_label": pred.true_label,
            "verdict": _verdict(pred), "description": pred.description,
            "lesion": pred.lesion_score, "threshold": pred.lesion_threshold,
            "probs": ", ".join(f"{lab} {p:.2f}" for lab, p in pred.probs.items()),
            "box": _box_style(pred.box), "true_box": _box_style(pred.true_box), **pictures}


def gallery(preds: Sequence[Prediction], pictures: Sequence[dict[str, str]],
            labels: Sequence[str], skipped: Sequence[BadRow] = ()) -> str:
    """The page from its template: thumbnails linked by relative path (never inline, so
    the page stays small however many cases), filters, sorts and the skipped rows."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("client", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    cases = [_gallery_case(k, p, pic) for k, (p, pic)
             in enumerate(zip(preds, pictures, strict=True))]
    known = [c for c in cases if c["true_label"]]
    return env.get_template("predict.html.j2").render(
        cases=cases, labels=list(labels), known=len(known),
        correct=sum(c["verdict"] == "right" for c in known), skipped=list(skipped),
        true_colour=TRUE_COLOUR, pred_colour=PRED_COLOUR)
