"""The README's demo table is copied from the demo's summary, never typed by hand."""

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
