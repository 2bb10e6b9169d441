"""The README's demo table is copied from the demo's summary, never typed by hand."""

import json
from pathlib import Path

import pytest

from simulations import readme

SUMMARY = """# medfuse demo

intro

## Mean over hospitals

| experiment | accuracy |
| --- | ---: |
| pooled | 1.000 |
| fedavg-dp | 0.938 |

## Accuracy per hospital

| hospital | pooled |
| --- | ---: |
| site-00 | 1.000 |
"""

README = f"before\n\n{readme.START}\nold table\n{readme.END}\n\nafter\n"


def test_the_mean_table_is_taken_and_nothing_after_it() -> None:
    table = readme.mean_table(SUMMARY)
    assert table.splitlines()[0] == "| experiment | accuracy |"
    assert "| fedavg-dp | 0.938 |" in table and "site-00" not in table


def test_rewrite_replaces_only_the_block_between_the_markers() -> None:
    block = readme.demo_block(readme.mean_table(SUMMARY), "2026-12-05", "abc1234")
    out = readme.rewrite(README, block)
    assert out.startswith("before\n\n") and out.endswith("\n\nafter\n")
    assert "old table" not in out and "| fedavg-dp | 0.938 |" in out
    assert "abc1234" in out and "2026-12-05" in out
    assert readme.rewrite(out, block) == out  # again: the same text


@pytest.mark.parametrize("text", ["no markers", f"{readme.START}\n{readme.START}\n{readme.END}"])
def test_a_readme_without_exactly_one_block_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="marker"):
        readme.rewrite(text, "x")


def test_main_rewrites_the_file_and_refuses_a_summary_without_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.md").write_text(SUMMARY, encoding="utf-8")
    target = tmp_path / "README.md"
    target.write_text(README, encoding="utf-8")
    assert readme.main([str(run), str(target)]) == 0
    assert "| pooled | 1.000 |" in target.read_text(encoding="utf-8")
    (run / "summary.md").write_text("# nothing ran\n", encoding="utf-8")
    assert readme.main([str(run), str(target)]) == 1
    assert "no '## Mean over hospitals' section" in capsys.readouterr().err


BENCH = {
    "machine": {"platform": "Linux", "python": "3.13", "torch": "2.13.0", "cpus": 1},
    "measured": "2026-12-06T09:00:00+0000",
    "dp_step_ratio": {"value": 1.4, "goal": "<= 1.6 (met)",
                      "settings": {"image_size": 64, "plain_step_s": 0.181, "layers": "all"}},
    "hospitals_all_train": {"value": 100.0, "goal": ">= 200 (not met)", "settings": {
        "points": [{"hospitals": 10, "trained": 10, "peak_gb": 4.09, "peak_pss_gb": 3.5,
                    "round_s": 54.2, "failed": False}],
        "plot": "runs/bench/x.png", "limit_gb": 8.0}},
}


def test_the_bench_table_holds_every_figure_beside_its_goal() -> None:
    table = readme.bench_table(BENCH)
    lines = table.splitlines()
    assert len(lines) == 2 + 2  # header, rule, one line per figure (not machine / measured)
    assert "| `dp_step_ratio` | 1.400 | <= 1.6 (met) | image_size 64; plain_step_s 0.181" in table
    assert "10 hospitals: 10 trained, peak 4.09 GB (PSS 3.50), round 54 s" in table
    assert "x.png" not in table  # bench.json keeps what a reader of the table does not need


def test_the_bench_table_goes_between_its_own_markers(tmp_path: Path) -> None:
    run = tmp_path / "bench"
    run.mkdir()
    (run / "bench.json").write_text(json.dumps(BENCH), encoding="utf-8")
    target = tmp_path / "README.md"
    target.write_text(README + f"\n{readme.BENCH_START}\nold figures\n{readme.BENCH_END}\ntail\n",
                      encoding="utf-8")
    assert readme.main(["--bench", str(run), str(target)]) == 0
    text = target.read_text(encoding="utf-8")
    assert "old figures" not in text and "old table" in text  # the demo table stays
    assert "`make bench` of 2026-12-06" in text and "| `hospitals_all_train` | 100.000" in text
    assert text.endswith("tail\n")


def test_a_bench_file_that_is_not_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bench.json").write_text("{", encoding="utf-8")
    target = tmp_path / "README.md"
    target.write_text(f"{readme.BENCH_START}\n{readme.BENCH_END}\n", encoding="utf-8")
    assert readme.main(["--bench", str(tmp_path), str(target)]) == 1
    assert target.read_text(encoding="utf-8") == f"{readme.BENCH_START}\n{readme.BENCH_END}\n"
