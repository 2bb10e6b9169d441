"""Central training on public data: the start that makes private fine-tuning learn.

DP-SGD from random initialisation does not learn at a few hundred cases per site: the
noise scales with the number of trained coordinates, the signal does not. The field's
answer (De et al. 2022, Berrada et al. 2023, Tramer & Boneh 2021) is features learnt on
public data, then DP fine-tuning. `pretrain` trains the model centrally, without DP (the
data is public), on one or more folders in format v1, and writes a self-describing model
file (model config, label set, a digest of the corpus, its metrics) and a model card.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch

from shared_model.central import CentralConfig, CentralResult, EpochCallback, train_central
from shared_model.config import MANIFEST, ModelConfig
from shared_model.contract.metric_registry import HEADLINE
from shared_model.dataset import PREPROCESSING, SiteData, open_site
from shared_model.files import atomic_write, atomic_write_text
from shared_model.model import ARCHITECTURE
from shared_model.model_file import ModelFileError, load_model_file, payload
from shared_model.tokenizer import Tokenizer
from shared_model.tooling.synth import (
    PUBLIC_GENERATOR,
    Difficulty,
    Labeller,
    PublicConfig,
    write_public,
)


def corpus_digest(folders: Sequence[Path]) -> str:
    """sha256 over the manifests of the public folders (what the model was trained on)."""
    h = hashlib.sha256()
    for folder in sorted(Path(f).resolve() for f in folders):
        h.update((folder / MANIFEST).read_bytes())
    return h.hexdigest()


def pretrain(
    public: Sequence[SiteData],
    model_cfg: ModelConfig,
    central: CentralConfig,
    out: Path,
    on_epoch: EpochCallback | None = None,
) -> CentralResult:
    """Train on the public folders' train splits, test on their test splits, write `out`
    (the model file) and `out` with `.card.json` / `.card.md` beside it."""
    model, result = train_central(public, model_cfg, central, Tokenizer(model_cfg.vocab_size),
                                  on_epoch=on_epoch)
    digest = corpus_digest([s.path for s in public])
    card = {
        "name": "medfuse public model",
        "trained_on": [str(Path(s.path).resolve()) for s in public],
        "corpus_sha256": digest,
        "train_examples": result.train_examples,
        "epochs": central.epochs,
        "seconds": round(result.seconds, 1),
        "test_metrics": result.overall,
        "labels": list(public[0].labels),
        "privacy": "trained without DP on public data: none of a federation's cases",
    }
    out = Path(out)
    blob = payload(model.state_dict(), model_cfg, public[0].labels, round=0,
                   corpus_sha256=digest, metrics=result.overall, source="pretrain")
    atomic_write(out, lambda fh: torch.save(blob, fh))
    atomic_write_text(out.with_suffix(".card.json"), json.dumps(card, indent=2) + "\n")
    lines = ["# medfuse public model", "", f"- trained on: {', '.join(card['trained_on'])}",
             f"- corpus sha256: `{digest}`", f"- {result.train_examples} training cases, "
             f"{central.epochs} epochs, {result.seconds:.0f} s", "- no DP: public data", "",
             "| metric | test |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.4f} |" for k, v in result.overall.items()]
    atomic_write_text(out.with_suffix(".card.md"), "\n".join(lines) + "\n")
    return result


def _variant(difficulty: Difficulty, labeller: Labeller) -> dict[str, str]:
    """The synthetic corpus settings that are not the default (they name its folder)."""
    return {k: v for k, v in {"difficulty": difficulty, "labeller": labeller}.items()
            if v != PublicConfig.model_fields[k].default}


def public_model_key(
    model_cfg: ModelConfig,
    labels: Sequence[str],
    *,
    folders: Sequence[Path] = (),
    cases: int = 2000,
    seed: int = 0,
    difficulty: Difficulty = "standard",
    labeller: Labeller = "noisy",
    views: Literal["none", "mild", "strong"] = "none",
    epochs: int = 8,
    batch_size: int = 32,
) -> str:
    """The cached public model's key: what decides it (see `cached_public_model`)."""
    spec = {"folders": [str(Path(f).resolve()) for f in folders], "cases": cases,
            "seed": seed, "epochs": epochs, "batch": batch_size, "architecture": ARCHITECTURE,
            "preprocessing": PREPROCESSING}
    if not folders:  # a model of an older synthetic corpus is not reused
        spec["generator"] = PUBLIC_GENERATOR
    if views != "none":  # a model pretrained without views is not reused for views
        spec["views"] = views
    # a variant corpus gets a key and a folder of its own; the standard one keeps its names
    spec.update(_variant(difficulty, labeller))
    return hashlib.sha256(json.dumps([spec, model_cfg.model_dump(), list(labels)],
                                 sort_keys=True).encode()).hexdigest()[:12]


def _fits(path: Path, echo: Callable[[str], object]) -> bool:
    """Whether a cached public model still loads into today's model: a cache written by
    a commit whose layers changed without a new `ARCHITECTURE` (a development build) is
    rebuilt, said once, instead of stopping every run that starts from it."""
    try:
        load_model_file(path)  # refused where its weights do not fit its model_config
    except ModelFileError as exc:
        echo(f"the cached public model {path} does not fit this medfuse's model "
             f"({' '.join(str(exc).split())[:160]}); building it again")
        return False
    return True


def cached_public_model(
    root: Path,
    model_cfg: ModelConfig,
    labels: Sequence[str],
    *,
    folders: Sequence[Path] = (),
    cases: int = 2000,
    seed: int = 0,
    difficulty: Difficulty = "standard",
    labeller: Labeller = "noisy",
    views: Literal["none", "mild", "strong"] = "none",
    epochs: int = 8,
    batch_size: int = 32,
    device: str = "auto",
    echo: Callable[[str], object] = print,
) -> Path:
    """The public model for `model_cfg`, built once under `root` and reused after.

    `folders`: public datasets in format v1; none: the project's synthetic public corpus
    (`cases`, `seed`, `difficulty`, `labeller`), written under `root` on first use.
    `views`: random views of each batch while pretraining (CentralConfig.views). One file
    per (public data, corpus generator, model config, labels, views), so a changed setting
    builds a new one."""
    key = public_model_key(model_cfg, labels, folders=folders, cases=cases, seed=seed,
                           difficulty=difficulty, labeller=labeller, views=views,
                           epochs=epochs, batch_size=batch_size)
    variant = _variant(difficulty, labeller)
    root = Path(root)
    target = root / f"model-{key}.pt"
    if target.is_file() and _fits(target, echo):
        return target
    if not folders:
        corpus = root / "-".join([f"corpus-seed{seed}-cases{cases}-px{model_cfg.image_size}",
                                  f"g{PUBLIC_GENERATOR}", *variant.values()])
        if not (corpus / MANIFEST).is_file():
            echo(f"writing the synthetic public corpus ({cases} cases) to {corpus}")
            shutil.rmtree(corpus, ignore_errors=True)
            write_public(corpus, PublicConfig(cases=cases, seed=seed,
                                              image_size=model_cfg.image_size,
                                              difficulty=difficulty, labeller=labeller))
        folders = [corpus]
    opened = [open_site(f, labels=labels, model=model_cfg,
                        tokenizer=Tokenizer(model_cfg.vocab_size)) for f in folders]
    echo(f"pretraining the public model on {sum(len(s.train) for s in opened)} public "
         f"cases ({epochs} epochs)")
    res = pretrain(opened, model_cfg, CentralConfig(epochs=epochs, batch_size=batch_size,
                                                    device=device, views=views), target)
    echo(f"public model {target}: public test {HEADLINE.label} "
         f"{res.overall.get(HEADLINE.name, math.nan):.3f} ({res.seconds:.0f} s)")
    return target
