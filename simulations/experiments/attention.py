"""The report branch's attention over a few test reports, kept for report.html.

A model that reads the report (modality "text" or "fused") pools its Bi-LSTM by an
additive attention: one weight per word. For the first test report of each label (over
the hospitals, in their order) the final model's weights are written to
`text-attention.json` in the experiment's seed folder, beside its rows; the report shows
each word shaded by its weight. The file holds report words: it is written into the run's
output folder (the researcher's own, as the sites are), never into the repository.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from shared_model.config import ModelConfig
from shared_model.dataset import SiteData
from shared_model.files import atomic_write_text
from shared_model.model import MedFuseModel
from shared_model.tokenizer import split_words

ATTENTION_FILE = "text-attention.json"


def pick_cases(sites: Sequence[SiteData], per_label: int = 1) -> list[tuple[SiteData, int]]:
    """(site, test index) of the first `per_label` test reports of each label, over the
    hospitals in their order: a few reports that show every finding, chosen without
    looking at the model."""
    chosen: list[tuple[SiteData, int]] = []
    seen: dict[int, int] = {}
    for site in sites:
        for i, label in enumerate(site.test.label_ids.tolist()):
            if seen.get(label, 0) < per_label:
                seen[label] = seen.get(label, 0) + 1
                chosen.append((site, i))
    return sorted(chosen, key=lambda c: int(c[0].test.label_ids[c[1]]))


@torch.no_grad()
def attention_cases(model_cfg: ModelConfig, state: Mapping[str, torch.Tensor],
                    sites: Sequence[SiteData]) -> list[dict]:
    """Each picked report's words with the model's attention weight on each, its true and
    predicted label and the predicted probability; [] for a model that reads no report."""
    if model_cfg.modality == "image":
        return []
    model = MedFuseModel(model_cfg)
    model.load_state_dict(dict(state), strict=True)
    model.eval()
    out = []
    for site, i in pick_cases(sites):
        tokens = site.test.tokens[i : i + 1]  # (1, T)
        image = site.test.images[i : i + 1] if model_cfg.modality != "text" else None
        result = model(image, tokens)
        if result.text_attention is None:
            return []
        words = split_words(site.test.reports[i])[: model_cfg.max_report_tokens]
        weights = result.text_attention[0, : max(len(words), 1)].tolist()
        probs = result.logits.softmax(-1)[0]
        label, predicted = int(site.test.label_ids[i]), int(probs.argmax())
        out.append({"site": site.name, "case_id": site.test.case_ids[i],
                    "label": site.labels[label], "predicted": site.labels[predicted],
                    "probability": round(float(probs[predicted]), 4),
                    "words": words, "weights": [round(w, 5) for w in weights[: len(words)]],
                    "left_out": max(len(split_words(site.test.reports[i])) - len(words), 0)})
    return out


def write_attention(folder: Path, model_cfg: ModelConfig, state: Mapping[str, torch.Tensor],
                    sites: Sequence[SiteData]) -> Path | None:
    """ATTENTION_FILE in `folder` (None, nothing written, for a model without a report
    branch)."""
    cases = attention_cases(model_cfg, state, sites)
    if not cases:
        return None
    path = Path(folder) / ATTENTION_FILE
    atomic_write_text(path, json.dumps(cases, indent=1))
    return path
