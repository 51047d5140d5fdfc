"""The bumblebee command's quick subcommands and argument errors."""

import pytest

from bumblebee_dist.cli import main


def test_info_reports_paper_parameter_count(capsys):
    assert main(["info", "--preset", "paper"]) == 0
    printed = capsys.readouterr().out
    assert "8 layers, width 768, 16 heads" in printed
    count = int(printed.split("parameters:")[1].replace(",", "").strip())
    assert abs(count - 57_000_000) / 57_000_000 < 0.01


def test_info_rejects_unknown_preset():
    with pytest.raises(ValueError, match="valid presets"):
        main(["info", "--preset", "huge"])


def test_demo_rejects_unknown_option():
    with pytest.raises(SystemExit):
        main(["demo", "--no-such-option", "1"])
