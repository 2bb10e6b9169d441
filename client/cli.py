"""The hospital's commands: check a site folder, read the site's privacy ledger.

    medfuse data check SITE...     every unusable row, counts per label and split
    medfuse privacy show           epsilon spent and left, every release from the data
    medfuse audit MODEL SITE...    can someone with the model tell who was in the data?
    medfuse predict MODEL SITE     predictions with attention maps, a gallery
    medfuse personalise MODEL SITE DP fine-tuning on this site, charged to its ledger
    medfuse calibrate MODEL SITE   the lesion threshold, set on this site's val split
    medfuse audit-log show|verify  what crossed the network, and that the log is intact
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from shared_model.audit_log import LOG_FILE, AuditLogError, rows_for_display, verify
from shared_model.chain_key import ChainKeyError, key_from_node_key
from shared_model.config import ModelConfig
from shared_model.contract.metric_registry import HEADLINE
from shared_model.files import atomic_write, atomic_write_text
from shared_model.tooling.cli_opts import (
    DEFAULT_LABELS_TEXT,
    LabelsOpt,
    console,
    err,
    fail,
    parse_labels,
)

# What loads torch (the dataset, model, training and audit code, pandas) is imported inside
# the command that uses it, marked `# lazy:`: `medfuse --help` imports this module and
# should not wait for torch. "(--help)" in those comments means that.


def data_check(
    site_dirs: Annotated[list[Path], typer.Argument(help="one or more site folders")],
    strict: Annotated[bool, typer.Option(help="any bad row makes the site unusable")] = False,
    labels: LabelsOpt = DEFAULT_LABELS_TEXT,
    image_size: Annotated[int, typer.Option(help="model input size")] = 64,
    modality: Annotated[str, typer.Option(
        help="the model the site is checked for: fused, image, or text (rows without an "
        "image are usable by a text-only model only)")] = "fused",
) -> None:
    """Check site folders: counts per label and split, formats, and every unusable row.

    Exit code 0 when every site is usable, 1 otherwise (under --strict, any bad row).
    """
    from client.data_check import exit_code, render_summary  # lazy: loads torch (--help)
    from shared_model.dataset import check_site  # lazy: loads torch (--help)
    from shared_model.tokenizer import Tokenizer  # lazy: loads torch (--help)

    label_set = parse_labels(labels)
    if modality not in ("fused", "image", "text"):
        fail(f"--modality {modality!r}: allowed are fused, image, text")
    model = ModelConfig(image_size=image_size, num_classes=len(label_set), modality=modality,
                        generation=modality != "text")
    tokenizer = Tokenizer(model.vocab_size)
    summaries = []
    for site in site_dirs:
        summary = check_site(site, labels=label_set, model=model, tokenizer=tokenizer,
                             strict=strict)
        render_summary(summary, console)
        summaries.append(summary)
    raise typer.Exit(exit_code(summaries, strict))


def privacy_show(
    state_dir: Annotated[
        Path | None,
        typer.Option(
            help="a node's ledger store (its state-dir), or a folder of stores (default "
            "$MEDFUSE_PRIVACY_STORE or ~/.medfuse/privacy; a simulation keeps one per "
            "hospital and experiment in OUTPUT/experiments/NAME/seed-N/ledgers/SITE)"
        ),
    ] = None,
    node_key: Annotated[
        Path | None,
        typer.Option(help="the SuperNode's private key, when the node config names it as "
                     "node-key (the ledgers' chain key is derived from it)"),
    ] = None,
) -> None:
    """Print each ledger: its training budget (the training split) and its evaluation
    budget (the val/test splits), each with epsilon spent and left and a table of its
    releases (training rounds, the count, non-private rounds; evaluations), and what
    epsilon and "inf" mean. Fits 80 columns and a pipe: cells wrap, none is cut.
    Exit 1 where a store or ledger cannot be read (one line each on stderr)."""
    # lazy: client.privacy loads torch and opacus; `medfuse --help` imports this module
    from client.privacy import LedgerError, default_store_root, find_stores, render_ledger

    def _error_line(message: object) -> None:
        # one plain line (a path or a JSON error may hold brackets; logs are grepped),
        # and on to the next store: the command exits 1 at its end
        err.print(Text.assemble(("error:", "red"), f" {message}"), soft_wrap=True)

    root = state_dir or default_store_root()
    stores = find_stores(root, key=key_from_node_key(node_key) if node_key else None)
    if not stores:
        err.print(f"no privacy ledger store under {Path(root).expanduser()}")
        raise typer.Exit(1)
    failed = False
    for store in stores:
        try:  # the index is read (and its MAC checked) before any ledger is listed
            keys = store.keys()
        except LedgerError as exc:
            _error_line(exc)
            failed = True
            continue
        for key in keys:
            try:
                console.print(render_ledger(store.load(key)))
            except LedgerError as exc:
                _error_line(exc)
                failed = True
    raise typer.Exit(1 if failed else 0)


def audit(
    model: Annotated[Path, typer.Argument(help="a medfuse model file (final/model.pt)")],
    site_dirs: Annotated[list[Path], typer.Argument(help="the sites it was trained on")],
    reference: Annotated[
        list[Path] | None,
        typer.Option("--reference", help="population folders for LiRA's reference models: "
                     "data holding none of the sites' cases (public folders, fresh "
                     "synthetic sites); repeat"),
    ] = None,
    references: Annotated[int, typer.Option(min=0, help="reference models (0: loss attack "
                                                         "only)")] = 4,
    reference_epochs: Annotated[int, typer.Option(min=1)] = 4,
    start: Annotated[
        Path | None, typer.Option(help="the model the audited one started from (its "
                                       "initial-model), for the reference models")
    ] = None,
    out: Annotated[Path, typer.Option(help="audit.csv, audit.json, roc.png")] = Path("audit"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
) -> None:
    """Membership-inference audit: members (each site's train split) against non-members
    (its val and test splits), a loss-threshold attack and offline LiRA; AUC and TPR at
    1% and 0.1% FPR with 95% intervals, a ROC plot and a verdict. Nothing leaves the site.

    Members are only members if the model trained on the site. The sites it trained on
    are read from the model's metadata or the model_card.json beside it (a federation's
    final/): a site not listed there is refused (exit 2), as its "no leak" would be about
    cases the model never saw. Where neither names the sites, the verdict line says that
    membership is assumed from each site's train split and cannot be checked.
    """
    # lazy: the audit code loads torch, opacus and sklearn; `medfuse --help` imports this
    from client.audit import (
        audit_site,
        membership,
        reference_models,
        results_table,
        roc_plot,
        verdict,
    )
    from shared_model.dataset import SiteError, open_site  # lazy: loads torch (--help)
    from shared_model.model_file import ModelFileError, load_model_file  # lazy: loads torch
    from shared_model.tokenizer import Tokenizer  # lazy: loads torch (--help)
    from shared_model.train import pick_device  # lazy: loads torch and opacus (--help)

    try:
        mf = load_model_file(model)
        tok = Tokenizer(mf.model_config.vocab_size)
        sites = [open_site(d, labels=mf.labels, model=mf.model_config, tokenizer=tok)
                 for d in site_dirs]
        population = [open_site(d, labels=mf.labels, model=mf.model_config, tokenizer=tok)
                      for d in reference or []]
        initial = load_model_file(start).state if start else None
        dev = pick_device(device)
        members = membership(model, mf.meta, [s.name for s in sites])
    except (ModelFileError, SiteError, OSError, ValueError) as exc:
        fail(exc)
    refs = []
    if population and references:
        console.print(f"training {references} reference models on {len(population)} "
                      f"population folder(s) ({reference_epochs} epochs each)")
        refs = reference_models(mf.model_config, population, references,
                                initial_state=initial, epochs=reference_epochs, device=device)
    results = []
    for site in sites:
        results += audit_site(mf.model_config, mf.state, site, references=refs, device=dev)
    rows = results_table(results)
    atomic_write_text(out / "audit.json", json.dumps(
        {"model": str(model), "verdict": verdict(results, members), "results": rows},
        indent=2) + "\n")
    import pandas as pd  # lazy: pandas is slow to import; `medfuse --help` imports this

    atomic_write_text(out / "audit.csv", pd.DataFrame(rows).to_csv(index=False))
    roc_plot(results, out / "roc.png")
    console.print(audit_table(rows))
    console.print(verdict(results, members), highlight=False, soft_wrap=True)
    console.print(f"written: {out / 'audit.csv'}, {out / 'audit.json'}, {out / 'roc.png'}")


def audit_table(rows: list[dict]):
    table = Table(title="membership inference (higher = more leak; chance: AUC 0.5)")
    for col in ("site", "attack", "members", "non-members", "AUC [95%]", "TPR@1%FPR",
                "TPR@0.1%FPR"):
        table.add_column(col, justify="left" if col in ("site", "attack") else "right")
    for r in rows:
        table.add_row(str(r["site"]), str(r["attack"]), str(r["members"]), str(r["nonmembers"]),
                      f"{r['auc']:.3f} [{r['auc_ci_lo']:.2f}, {r['auc_ci_hi']:.2f}]",
                      f"{r['tpr_at_1']:.1%}", f"{r['tpr_at_01']:.1%}")
    return table


def predict(
    model: Annotated[Path, typer.Argument(help="a medfuse model file (final/model.pt)")],
    site_dir: Annotated[Path | None, typer.Argument(
        help="a folder in format v1: any split, labels optional")] = None,
    image: Annotated[Path | None, typer.Option(help="one image instead of a site")] = None,
    report: Annotated[Path | None, typer.Option(
        help="with --image: a text file holding its report")] = None,
    report_text: Annotated[str, typer.Option(
        help="with --image: its report's words themselves")] = "",
    out: Annotated[Path, typer.Option(
        help="predictions.csv, cases/, thumbs/, attention/, index.html")] = Path("predictions"),
    labels: LabelsOpt = "",
    limit: Annotated[int | None, typer.Option(min=1, help="at most this many cases")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
) -> None:
    """The model on your own cases: class probabilities, the lesion score (and box where
    it reaches the model's threshold), a generated description, the image attention map
    and the report's words shaded by attention; predictions.csv, per case the film at its
    own resolution and an attention picture, and an index.html gallery to filter and sort.
    Every row is predicted whatever its split; labels, where given, are the truth shown
    and scored. Cases that cannot be read are listed, and are rows of the CSV with the
    reason. Nothing leaves here."""
    # lazy: the prediction code loads torch and opacus; `medfuse --help` imports this
    from client.predict import (
        cases_of_site,
        for_terminal,
        predict,
        prediction_text,
        skipped_of_site,
        write_outputs,
    )
    from shared_model.dataset import (  # lazy: loads torch (--help)
        BadRow,
        SiteError,
        open_for_inference,
    )
    from shared_model.model_file import (  # lazy: loads torch (--help)
        ModelFileError,
        check_matches,
        load_model_file,
    )
    from shared_model.train import pick_device  # lazy: loads torch and opacus (--help)

    if (site_dir is None) == (image is None):
        fail("give a site folder or --image FILE (one of them)")
    if image is None and (report is not None or report_text):
        fail("--report and --report-text go with --image; a site's reports are in its "
             "manifest")
    if report is not None and report_text:
        fail("give --report FILE or --report-text TEXT, not both")
    skipped: list[BadRow] = []
    try:
        mf = load_model_file(model)
        if labels:
            check_matches(mf, mf.model_config, parse_labels(labels))
        if image is not None:
            cases = [_predict_image_case(image, _predict_report(report, report_text), mf)]
        else:
            site = open_for_inference(site_dir, labels=mf.labels, model=mf.model_config)
            cases, skipped = cases_of_site(site), skipped_of_site(site)
        dev = pick_device(device)
    except (ModelFileError, SiteError, OSError, ValueError) as exc:
        fail(_one_line(exc))
    cases = cases[:limit] if limit else cases
    _say(f"predicting {len(cases)} case(s) with {model} on {dev}")
    try:
        preds = predict(mf, cases, dev)
        files = write_outputs(preds, cases, out, mf.labels, skipped)
    except (OSError, RuntimeError, ValueError) as exc:
        fail(_one_line(exc), 1)
    if image is not None:
        _say(prediction_text(preds[0]))
    if skipped:
        _say(f"{len(skipped)} case(s) not predicted (rows of {files['csv']} with the reason "
             "in 'error'):")
        for bad in skipped[:_LISTED_SKIPPED]:
            _say(for_terminal(f"  manifest row {bad.row}, {bad.case_id}: {bad.reason}"))
        if len(skipped) > _LISTED_SKIPPED:
            _say(f"  ... and {len(skipped) - _LISTED_SKIPPED} more")
    known = [p for p in preds if p.true_label]
    if known:
        right = sum(p.label == p.true_label for p in known)
        _say(f"accuracy on the labelled cases: {right}/{len(known)} "
             f"({right / len(known):.3f})")
    _say(f"written: {files['csv']}, {out / 'cases'}/ (films), {out / 'attention'}/, "
         f"{files['index']} (gallery)")


_LISTED_SKIPPED = 20  # skipped cases listed on the terminal; the CSV has every one


def _say(text: str) -> None:
    """Plain text on stdout: no rich markup or highlighting (names come from files)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _predict_report(report: Path | None, text: str) -> str:
    """The report of `--image`: the words of --report-text, or the file --report names."""
    if report is None:
        return text
    if not report.is_file():
        fail(f"--report {report}: no such file (to give the report's words themselves, use "
             "--report-text)")
    try:
        return report.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"--report {report}: cannot read it as UTF-8 text ({_one_line(exc)[:200]})")


def _predict_image_case(image: Path, report: str, mf):
    """The case of `--image`, or one line naming the file it cannot read."""
    from client.predict import case_from_file  # lazy: loads torch (--help)

    if not image.is_file():
        fail(f"--image {image}: no such file")
    try:
        return case_from_file(image, report, mf)
    except Exception as exc:  # noqa: BLE001 - whatever a decoder raises: one line
        fail(f"--image {image}: cannot read it as an image ({_one_line(exc)[:200]})")


def _verified_log(path: Path, node_key: Path | None) -> tuple[Path, list[dict]]:
    """The log at `path` (or in the folder `path`) and its verified entries; exits with
    one line on stderr where there is no log (2) or it does not verify (1)."""
    if not path.exists():
        fail(f"{path} does not exist: there is no audit log there to check", 2)
    log_file = path / LOG_FILE if path.is_dir() else path
    if not log_file.is_file():
        fail(f"{path} holds no audit log ({LOG_FILE}): nothing was verified", 2)
    try:
        key = key_from_node_key(node_key) if node_key is not None else None
        return log_file, verify(log_file, key=key)
    except (AuditLogError, ChainKeyError, OSError) as exc:
        fail(exc, 1)


NodeKeyOpt = Annotated[Path | None, typer.Option(
    help="the SuperNode private key the log's chain key is derived from (where the node "
         "runs with node-key); default: the chain.key file beside the log")]


def audit_log_show(
    path: Annotated[Path, typer.Argument(help="an audit log, or the folder holding one (a "
                                              "node's state-dir, a run's output-dir)")],
    last: Annotated[int, typer.Option(min=1, help="the last N entries")] = 50,
    node_key: NodeKeyOpt = None,
) -> None:
    """Print what crossed the network, a short block per message, after verifying the log
    (exit 2 where there is no log, 1 where it does not verify)."""
    log_file, entries = _verified_log(path, node_key)
    shown = entries[-last:]
    width = max(min(console.width, 100), 60)
    title = f"{log_file}: {len(entries)} entries (verified); the last {len(shown)}:"
    console.print("\n".join(textwrap.wrap(title, width, break_long_words=True)),
                  soft_wrap=True, highlight=False, markup=False)
    for r in rows_for_display(shown):
        console.print(entry_block(r, width), soft_wrap=True, highlight=False, markup=False)


def entry_block(r, width: int) -> str:
    """One message of the audit log as a few lines of at most `width` characters: who,
    when and what on the first, then the arrays and the metrics, wrapped under their
    label (a table folded 45 entries into 1,399 lines at 80 columns)."""
    head = f"#{r.seq} {r.time.replace('T', ' ')}  {r.who}  {r.what}"
    lines = textwrap.wrap(head, width, subsequent_indent="    ")
    for label, text in (("arrays", r.arrays), ("metrics", r.metrics)):
        lines += textwrap.wrap(text, width, initial_indent=f"    {label}: ",
                               subsequent_indent=" " * (6 + len(label)),
                               break_on_hyphens=False)
    return "\n".join(lines)


def audit_log_verify(
    path: Annotated[Path, typer.Argument(help="an audit log or the folder holding one")],
    node_key: NodeKeyOpt = None,
) -> None:
    """Check every entry's MAC and link and the head file under the node's chain key:
    exit 1 on an edited, reordered or truncated log, 2 where there is no log at all."""
    log_file, entries = _verified_log(path, node_key)
    console.print(f"{log_file}: {len(entries)} entries, every MAC and link checks under "
                  "this node's key")


def personalise(
    model: Annotated[Path, typer.Argument(help="the federation's model file (final/model.pt)")],
    site_dir: Annotated[Path, typer.Argument(help="this hospital's site folder")],
    out: Annotated[Path, typer.Option(help="the personalised model file to write")] = Path(
        "personalised.pt"),
    epochs: Annotated[int | None, typer.Option(
        min=1, help="local epochs of DP fine-tuning [default: 5]")] = None,
    lr: Annotated[float | None, typer.Option(help="SGD learning rate [default: 0.3]")] = None,
    layers: Annotated[str | None, typer.Option(
        help="what trains: classifier (the classification heads), prior (the head's "
             "bias alone: the label mix, least noise per coordinate), heads, "
             "no-embeddings or all [default: classifier]")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    epsilon_budget: Annotated[float, typer.Option(help="this data's total budget (it can "
                                                       "only go down)")] = 8.0,
    delta: Annotated[float, typer.Option()] = 1e-5,
    state_dir: Annotated[Path | None, typer.Option(help="the node's ledger store (default: "
                                                        "the node install's)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
) -> None:
    """Fine-tune the federation's model on this hospital's own train split with DP-SGD,
    charged to the data's privacy ledger like any other release (refused when the budget
    is spent); print the test accuracy here of the global and the personalised model."""
    import torch  # lazy: keeps `medfuse --help` fast (torch)

    # lazy: the training code loads torch and opacus; `medfuse --help` imports this
    from client.local import Budget, local_evaluate, personal_steps, private_round
    from client.privacy import LedgerError, LedgerStore, default_store_root  # lazy: loads torch
    from shared_model.dataset import SiteError, open_site  # lazy: loads torch (--help)
    from shared_model.model_file import (  # lazy: loads torch (--help)
        ModelFileError,
        load_model_file,
        payload,
    )
    from shared_model.tokenizer import Tokenizer  # lazy: loads torch (--help)
    from shared_model.train import pick_device  # lazy: loads torch and opacus (--help)

    try:
        mf = load_model_file(model)
        site = open_site(site_dir, labels=mf.labels, model=mf.model_config,
                         tokenizer=Tokenizer(mf.model_config.vocab_size))
        dev = pick_device(device)
        outcome = private_round(
            LedgerStore(state_dir or default_store_root()), mf.model_config, site, mf.state,
            personal_steps(epochs, lr, layers, batch_size),
            Budget(epsilon=epsilon_budget, delta=delta), device=dev)
    except (ModelFileError, SiteError, LedgerError, OSError, ValueError) as exc:
        fail(exc)
    if outcome.refused:
        fail(outcome.reason, 1)
    assert outcome.state is not None
    blob = payload(outcome.state, mf.model_config, mf.labels, source="personalise",
                   base_model=str(model), site=site.name, epsilon=outcome.epsilon,
                   delta=outcome.delta)
    atomic_write(out, lambda fh: torch.save(blob, fh))
    before, n = local_evaluate(mf.model_config, site, mf.state, dev, split="test")
    after, _ = local_evaluate(mf.model_config, site, outcome.state, dev, split="test")
    console.print(f"{site.name}: test accuracy here (exact, {n} cases, not released) "
                  f"global {before.get(HEADLINE.name, float('nan')):.3f} -> personalised "
                  f"{after.get(HEADLINE.name, float('nan')):.3f}; epsilon spent on this data "
                  f"{outcome.epsilon:.2f} of {outcome.epsilon_budget:g}")
    console.print(f"written: {out}")


def calibrate(
    model: Annotated[Path, typer.Argument(help="a medfuse model file (final/model.pt)")],
    site_dir: Annotated[Path, typer.Argument(help="this hospital's site folder")],
    out: Annotated[Path, typer.Option(help="the calibrated model file to write")] = Path(
        "calibrated.pt"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
) -> None:
    """Set the model's lesion threshold on this hospital's validation split (the score
    that best separates its lesion from its lesion-free cases, Youden's J) and write a copy
    of the model file holding it: `predict` then draws a box only above it, and only where
    a finding is predicted. The threshold is computed from this site's cases: keep the
    file here."""
    import torch  # lazy: keeps `medfuse --help` fast (torch)

    from shared_model.contract.metric_registry import predicted_names  # lazy: numpy (--help)
    from shared_model.dataset import SiteError, open_site  # lazy: loads torch (--help)
    from shared_model.metrics import boxes_drawn  # lazy: loads torch (--help)
    from shared_model.model import MedFuseModel  # lazy: loads torch (--help)
    from shared_model.model_file import (  # lazy: loads torch (--help)
        LESION_THRESHOLD,
        ModelFileError,
        load_model_file,
        payload,
    )
    from shared_model.tokenizer import Tokenizer  # lazy: loads torch (--help)
    from shared_model.train import (  # lazy: loads torch and opacus (--help)
        calibrated_threshold,
        evaluate_cases,
        pick_device,
    )

    try:
        mf = load_model_file(model)
        cfg = mf.model_config
        site = open_site(site_dir, labels=mf.labels, model=cfg,
                         tokenizer=Tokenizer(cfg.vocab_size))
        dev = pick_device(device)
    except (ModelFileError, SiteError, OSError, ValueError) as exc:
        fail(exc)
    if not cfg.localisation or cfg.modality == "text":
        fail(f"{model}: this model draws no lesion box, so it has no threshold to set")
    net = MedFuseModel(cfg)
    net.load_state_dict(mf.state, strict=True)
    val = evaluate_cases(net.to(dev), site.val, cfg, Tokenizer(cfg.vocab_size), dev,
                         label_names=mf.labels, generate=False)
    threshold = calibrated_threshold(val)
    if threshold is None or val.lesion_scores is None or val.has_box is None:
        fail(f"{site.name}: the val split needs lesion and lesion-free cases to set a "
             f"threshold on ({len(site.val)} val cases)")
    lesion = val.has_box > 0.5
    kept = {k: v for k, v in mf.meta.items() if k not in ("format", LESION_THRESHOLD)}
    blob = payload(mf.state, cfg, mf.labels, **kept, **{LESION_THRESHOLD: threshold},
                   calibrated_on=site.name)
    atomic_write(out, lambda fh: torch.save(blob, fh))
    # counted as predict draws: the score at the threshold and a finding predicted
    drawn = boxes_drawn(val.lesion_scores, threshold, predicted_names(val))
    console.print(
        f"{site.name}: lesion threshold {threshold:.3f} (was {mf.lesion_threshold:.3f}) on "
        f"{len(site.val)} val cases: a box on {drawn[lesion].mean():.0%} of "
        f"the {int(lesion.sum())} lesion cases and {drawn[~lesion].mean():.0%}"
        f" of the {int((~lesion).sum())} lesion-free ones", markup=False, highlight=False)
    console.print(f"written: {out}", markup=False, highlight=False)
