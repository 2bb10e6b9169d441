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
from collections.abc import Sequence
from pathlib import Path

from server.checkpoint import atomic_write, atomic_write_text
from shared_model.config import ModelConfig
from shared_model.dataset import SiteData
from shared_model.model_file import payload
from shared_model.tokenizer import Tokenizer
from simulations.pooled import CentralConfig, CentralResult, EpochCallback, train_central


def corpus_digest(folders: Sequence[Path]) -> str:
    """sha256 over the manifests of the public folders (what the model was trained on)."""
    h = hashlib.sha256()
    for folder in sorted(Path(f).resolve() for f in folders):
        h.update((folder / "manifest.csv").read_bytes())
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
    import torch

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
