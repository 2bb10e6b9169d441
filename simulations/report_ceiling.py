"""How far report generation can go on synthetic hospitals: the BLEU-4 of a perfect
reader, beside the best constant training report.

The generator writes each report with draws no film shows: whether an indication is
given, how much the report says at all (informative, vague, nearly empty), which other
diseases are negated and in what order, which of a style's phrasings is used. A model
that read the case perfectly (its finding, where the finding lies, the hospital's house
style) can still only guess those draws, so its BLEU-4 has a ceiling below 1. This
measures that ceiling on a federation's own cases (the demo's by default), drawn again
from the generator without writing a file:

- `constant`: the best constant report of each site's training references
  (`metrics.best_constant_report`), the baseline the results print;
- `class constant`: the best training report of the case's true class at its site (a
  perfect classifier that looks up a report; it knows the house style);
- `second writer`: another report of the same case, drawn with fresh randomness;
- `perfect reader`: of `samples` such reports, the one the others agree with most
  (minimum-Bayes-risk choice under sentence BLEU-4): what a model that knows the case
  and the writer's habits would best write.

All are scored as the results score a generated report: corpus BLEU-4 per site on the
test split, then the mean over sites.

    python -m simulations.report_ceiling [CASES_PER_SITE] [SAMPLES]
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from shared_model.config import ModelConfig
from shared_model.dataset import hash_split
from shared_model.metrics import best_constant_report, bleu4
from shared_model.tokenizer import Tokenizer
from shared_model.tooling.synth import (
    HARDNESS,
    Case,
    SiteStyle,
    SynthConfig,
    draw_report_mode,
    site_cases,
    site_style,
    write_report,
)

Tokens = list[str]
# Streams of the ceiling's own draws (never a case's own stream: those are the references).
CEILING_TAG = 0xCE11
COLUMNS = ("constant", "class constant", "second writer", "perfect reader")


def reference_tokens(report: str, tokenizer: Tokenizer, max_len: int) -> Tokens:
    """A report as the results score it: its describing part, as the decoder's target
    holds it, decoded back to words."""
    return tokenizer.decode(tokenizer.encode_target(report, max_len).tolist())


def rewritten(case: Case, style: SiteStyle, cfg: SynthConfig, key: Sequence[int]) -> str:
    """Another report of `case` in the site's style: the same finding and anatomy, every
    writing draw (mode, indication, negations, phrasing) new."""
    rng = np.random.default_rng([cfg.seed, CEILING_TAG, *key])
    mode = draw_report_mode(rng, case.finding, HARDNESS[cfg.difficulty])
    return write_report(rng, case.finding, case.anatomy, style.report, mode)


def consensus(samples: Sequence[Tokens]) -> Tokens:
    """The sample with the highest mean sentence BLEU-4 against the others (the
    minimum-Bayes-risk choice); an empty sample scores 0."""
    smooth = SmoothingFunction().method1

    def agreement(i: int) -> float:
        if not samples[i]:
            return 0.0
        return statistics.fmean(sentence_bleu([o], samples[i], smoothing_function=smooth)
                                for j, o in enumerate(samples) if j != i and o)
    return samples[max(range(len(samples)), key=agreement)]


def site_ceiling(cfg: SynthConfig, index: int, samples: int) -> dict[str, float]:
    """The four BLEU-4 figures of `COLUMNS` on site `index`'s test split."""
    model = ModelConfig.small(image_size=cfg.image_size)
    tok, max_len = Tokenizer(model.vocab_size), model.max_gen_tokens
    style = site_style(cfg.seed, index, cfg.style)
    train: list[Tokens] = []  # in manifest order: ties between constants go to the first
    by_label: dict[str, list[Tokens]] = defaultdict(list)
    test: list[tuple[Tokens, str, Tokens, Tokens]] = []
    for case_id, label, split, case in site_cases(cfg, index):
        ref = reference_tokens(case.report, tok, max_len)
        if (split or hash_split(case_id)) == "train":
            train.append(ref)
            by_label[label].append(ref)
        elif (split or hash_split(case_id)) == "test":
            k = int(case_id.rsplit("-", 1)[1])
            drawn = [reference_tokens(rewritten(case, style, cfg, (index, k, j)), tok, max_len)
                     for j in range(samples)]
            test.append((ref, label, drawn[0], consensus(drawn)))
    refs = [t[0] for t in test]
    constant = list(best_constant_report(train)[0])
    by_class = {lab: list(best_constant_report(rs)[0]) for lab, rs in by_label.items()}
    return {"constant": bleu4(refs, [constant] * len(refs)),
            "class constant": bleu4(refs, [by_class.get(t[1], constant) for t in test]),
            "second writer": bleu4(refs, [t[2] for t in test]),
            "perfect reader": bleu4(refs, [t[3] for t in test])}


def ceiling_table(cfg: SynthConfig, samples: int) -> list[tuple[str, dict[str, float]]]:
    """(site, figures) per site of the federation, then ("mean", the mean over sites)."""
    rows = [(f"site-{i:02d}", site_ceiling(cfg, i, samples)) for i in range(cfg.sites)]
    mean = {c: statistics.fmean(r[c] for _, r in rows) for c in COLUMNS}
    return [*rows, ("mean", mean)]


def markdown(rows: list[tuple[str, dict[str, float]]]) -> str:
    head = ["| site | " + " | ".join(COLUMNS) + " | perfect / constant |",
            "| --- |" + " ---: |" * (len(COLUMNS) + 1)]
    return "\n".join(head + [
        f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in COLUMNS)
        + f" | {r['perfect reader'] / max(r['constant'], 1e-9):.2f}x |" for name, r in rows])


def main(argv: list[str]) -> int:
    cases = int(argv[0]) if argv else 200
    samples = int(argv[1]) if len(argv) > 1 else 12
    # the demo's hospitals (simulations/default.toml): 5 sites, label mix Dirichlet 0.5
    cfg = SynthConfig(sites=5, cases_per_site=cases, seed=0, image_size=64, label_skew=0.5)
    print(f"# BLEU-4 ceiling: {cfg.sites} synthetic hospitals x ~{cases} cases, "
          f"perfect reader of {samples} samples")
    print(markdown(ceiling_table(cfg, samples)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
