"""The BLEU-4 ceiling is measured on the same cases, splits and baseline the results use."""

from pathlib import Path

from shared_model.config import DEFAULT_LABELS, ModelConfig
from shared_model.dataset import open_site
from shared_model.metrics import constant_report_scores
from shared_model.tokenizer import Tokenizer
from shared_model.tooling.synth import SynthConfig, site_cases, site_style, write_federation
from shared_model.train import references_of
from simulations import report_ceiling

CFG = SynthConfig(sites=2, cases_per_site=60, seed=4, image_size=32, label_skew=0.5)


def test_consensus_takes_the_report_the_others_agree_with() -> None:
    common = "no focal consolidation heart size normal".split()
    odd = "large left pleural effusion".split()
    assert report_ceiling.consensus([odd, common, common, [], common]) == common


def test_a_rewrite_keeps_the_case_and_draws_new_words() -> None:
    style = site_style(CFG.seed, 0, CFG.style)
    cases = [case for *_, case in site_cases(CFG, 0)]
    again = [report_ceiling.rewritten(c, style, CFG, (0, k, 0)) for k, c in enumerate(cases)]
    assert again == [report_ceiling.rewritten(c, style, CFG, (0, k, 0))
                     for k, c in enumerate(cases)]  # its own seeded stream
    assert sum(a != c.report for a, c in zip(again, cases, strict=True)) > len(cases) // 2
    assert style.report.marker in " ".join(again)  # the site's house style


def test_the_constant_is_the_one_the_results_print(tmp_path: Path) -> None:
    """`site_ceiling` draws the cases without a file; its constant-report figure must be
    what evaluation computes on the written folder, or the ratio compares two worlds."""
    model = ModelConfig.small(image_size=CFG.image_size)
    tok = Tokenizer(model.vocab_size)
    for index, site_dir in enumerate(write_federation(tmp_path, CFG)):
        site = open_site(site_dir, labels=DEFAULT_LABELS, model=model, tokenizer=tok)
        scores = constant_report_scores(references_of(site.train, tok),
                                        references_of(site.test, tok))
        assert scores is not None
        figures = report_ceiling.site_ceiling(CFG, index, samples=3)
        assert figures["constant"] == scores[1]
        assert set(figures) == set(report_ceiling.COLUMNS)
        assert all(0.0 <= v <= 1.0 for v in figures.values())
