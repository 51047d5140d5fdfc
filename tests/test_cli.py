"""The bumblebee command's quick subcommands and argument errors."""

import json
from dataclasses import asdict

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


def test_command_line_error_is_one_line(capsys):
    status = main(["info", "--preset", "huge"], exit_on_error=True)
    assert status == 2
    error = capsys.readouterr().err
    assert error.startswith("bumblebee: error: model preset 'huge' is unknown")
    assert "Traceback" not in error


def test_training_config_checked_before_launch(capsys):
    status = main(["pretrain", "--config", "configs/pretrain.yaml", "train.lr=inf"],
                  exit_on_error=True)
    assert status == 2
    assert "train.lr=inf is invalid" in capsys.readouterr().err


def test_models_list_without_store_names_it(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}"
    status = main(["models", "list", "--tracking-uri", uri], exit_on_error=True)
    assert status == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


def test_demo_settings_change_rejected(tmp_path):
    from bumblebee_dist.pipeline import DemoSettings, SettingsMismatchError, check_settings

    first = DemoSettings(out=str(tmp_path / "demo"))
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "demo_settings.json").write_text(json.dumps(asdict(first)))
    check_settings(DemoSettings(out=str(tmp_path / "demo")))
    with pytest.raises(SettingsMismatchError, match="ttbar_events: 36000 -> 9000"):
        check_settings(DemoSettings(out=str(tmp_path / "demo"), ttbar_events=9000))


def test_generate_rejects_zero_workers(tmp_path):
    from data_prep.ray_job import build_dataset

    with pytest.raises(ValueError, match="num_workers=0 is invalid"):
        build_dataset(tmp_path, ttbar_events=10, eta_t_events=10, seed=1, events_per_shard=10,
                      num_workers=0)


@pytest.mark.parametrize("override, message", [
    ("train.lr=inf", "finite number"),
    ("train.lr=nan", "finite number"),
    ("train.seed=-1", "train.seed=-1 is invalid"),
])
def test_config_rejects_bad_numbers(override, message):
    from bumblebee_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


@pytest.mark.parametrize("tracking, expected", [
    ([], "--tracking-uri is missing"),
    (["--tracking-uri", "sqlite:///missing/mlflow.db"], "no MLflow store"),
])
def test_evaluate_registry_uri_without_store(tmp_path, monkeypatch, capsys, tracking, expected):
    monkeypatch.chdir(tmp_path)
    status = main(["evaluate", "--data", "data", "--finetuned", "models:/encoder/1", "--out",
                   "out", *tracking], exit_on_error=True)
    assert status == 2
    assert expected in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no empty store or output folder created
