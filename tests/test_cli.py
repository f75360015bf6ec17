"""The command line: list and show."""

from typer.testing import CliRunner

import posenc
from posenc.cli import app

runner = CliRunner()


def test_list_shows_every_registered_encoding():
    result = runner.invoke(app, ["list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in posenc.available():
        assert name in result.output


def test_show_prints_formula_reference_and_parameters():
    result = runner.invoke(app, ["show", "sinusoidal"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Vaswani et al. 2017" in result.output
    assert "sin(pos / base^(2i/dim))" in result.output
    assert "10000.0" in result.output and "(required)" in result.output


def test_show_unknown_name_is_a_one_line_error_with_a_suggestion():
    result = runner.invoke(app, ["show", "sinusodial"], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "Did you mean 'sinusoidal'" in result.output
    assert "Traceback" not in result.output
