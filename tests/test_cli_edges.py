"""Trust at the edges of `medfuse` itself: the version a site runs, and a bad option as the
command's own one line (the option, the value, what is allowed), never a library's text."""

from importlib import metadata
from pathlib import Path

from typer.testing import CliRunner

from medfuse import app


def test_version_prints_the_installed_package_version():
    # Execute
    result = CliRunner().invoke(app, ["--version"])
    # Assert: the version every site compares, from the installed package's metadata
    assert result.exit_code == 0
    assert result.stdout.strip() == f"medfuse {metadata.version('medfuse')}"


def test_data_synth_with_a_negative_label_skew_names_the_option_in_one_line(tmp_path: Path):
    # Execute
    result = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "sites"),
                                      "--label-skew", "-1"])
    # Assert: exit 2, one line naming --label-skew, -1 and what is allowed; nothing written
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2
    assert lines == ["error: --label-skew -1.0: should be greater than 0"]
    assert "pydantic" not in result.stderr and "SynthConfig" not in result.stderr
    assert not (tmp_path / "sites").exists()
