"""The command lines in-process: help, usage errors (exit 2) and runtime errors (exit 1, one clear line)."""

from __future__ import annotations

import socket

import pytest

from sap_client import cli as client_cli
from sap_server import cli as server_cli
from tiny_models import learnable_rows, write_csv


def _usage_error(main, argv: list[str], capsys, *words: str) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    return err


def _runtime_error(main, argv: list[str], capsys, *words: str) -> str:
    assert main(argv) == 1
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err_lines) == 1, err_lines
    line = err_lines[0]
    assert "error" in line
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    return line


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def good_csv(tmp_path):
    return write_csv(tmp_path / "data.csv", learnable_rows(40))


# --- help -------------------------------------------------------------------------------------


def test_server_help(capsys):
    with pytest.raises(SystemExit) as info:
        server_cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--split", "--peft", "--port", "--host", "--max-sessions"):
        assert flag in out


def test_client_help(capsys):
    with pytest.raises(SystemExit) as info:
        client_cli.main(["--help"])
    assert info.value.code == 0
    assert "train" in capsys.readouterr().out


def test_client_train_help(capsys):
    with pytest.raises(SystemExit) as info:
        client_cli.main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--server", "--epochs", "--lr", "--eval-fraction", "--text-column", "--label-column", "--out"):
        assert flag in out


# --- usage errors: exit 2 ------------------------------------------------------------------------


def test_client_without_command_is_usage_error(capsys):
    _usage_error(client_cli.main, [], capsys, "COMMAND")


def test_client_unknown_flag(good_csv, capsys):
    _usage_error(client_cli.main, ["train", str(good_csv), "--no-such-flag"], capsys, "--no-such-flag")


def test_client_zero_epochs(good_csv, capsys):
    _usage_error(client_cli.main, ["train", str(good_csv), "--epochs", "0"], capsys, "epochs", "0")


def test_client_eval_fraction_out_of_range(good_csv, capsys):
    _usage_error(client_cli.main, ["train", str(good_csv), "--eval-fraction", "1.5"], capsys, "--eval-fraction", "1.5")


def test_client_eval_and_eval_fraction_exclusive(good_csv, capsys):
    _usage_error(
        client_cli.main,
        ["train", str(good_csv), "--eval", str(good_csv), "--eval-fraction", "0.2"],
        capsys,
        "not allowed with",
    )


def test_client_non_numeric_lr(good_csv, capsys):
    _usage_error(client_cli.main, ["train", str(good_csv), "--lr", "fast"], capsys, "--lr", "fast")


def test_server_port_out_of_range(capsys):
    _usage_error(server_cli.main, ["--port", "70000"], capsys, "--port", "70000")


def test_server_unknown_peft(capsys):
    _usage_error(server_cli.main, ["--peft", "foo"], capsys, "--peft", "foo", "lora")


def test_server_unknown_flag(capsys):
    _usage_error(server_cli.main, ["--bogus"], capsys, "--bogus")


def test_server_negative_split(capsys):
    _usage_error(server_cli.main, ["--split", "-1"], capsys, "--split", "-1")


def test_server_bad_lora_rank(capsys):
    _usage_error(server_cli.main, ["--lora-r", "0"], capsys, "lora_r")


@pytest.mark.parametrize("flag", ["--max-sessions", "--workers"])
def test_server_needs_at_least_one_session_and_worker(flag, capsys):
    _usage_error(server_cli.main, [flag, "0"], capsys, flag, "0")


@pytest.mark.parametrize("value", ["0", "-3"])
def test_client_max_examples_must_be_positive(good_csv, value, capsys):
    _usage_error(client_cli.main, ["train", str(good_csv), "--max-examples", value], capsys, "--max-examples", value)


@pytest.mark.parametrize("value", ["0", "-1", "inf", "lots"])
def test_client_bad_eta(good_csv, value, capsys):
    _usage_error(client_cli.main, ["train", str(good_csv), "--eta", value], capsys, "--eta", value)


def test_client_cti_needs_noise(good_csv, capsys):
    _usage_error(client_cli.main, ["train", str(good_csv), "--cti"], capsys, "CTI")


def test_client_rescale_needs_noise(good_csv, capsys):
    _usage_error(client_cli.main, ["train", str(good_csv), "--rescale-noised"], capsys, "needs noise")


def test_client_cti_rows_choices(good_csv, capsys):
    _usage_error(
        client_cli.main,
        ["train", str(good_csv), "--noise-ratio", "1", "--cti", "--cti-rows", "mean"],
        capsys,
        "--cti-rows",
    )


def test_client_eta_and_noise_ratio_exclusive(good_csv, capsys):
    _usage_error(
        client_cli.main, ["train", str(good_csv), "--eta", "10", "--noise-ratio", "3"], capsys, "not allowed with"
    )


# --- runtime errors: exit 1 with one line ------------------------------------------------------


def test_client_missing_file(tmp_path, capsys):
    missing = tmp_path / "nope.csv"
    _runtime_error(client_cli.main, ["train", str(missing), "--out", str(tmp_path / "run")], capsys, str(missing))
    assert not (tmp_path / "run").exists()


def test_client_missing_column(tmp_path, capsys):
    data = write_csv(tmp_path / "data.csv", learnable_rows(20), header=("sentence", "label"))
    _runtime_error(
        client_cli.main, ["train", str(data), "--out", str(tmp_path / "run")], capsys, "'text'", "missing", "'sentence'"
    )


def test_client_custom_column_missing(good_csv, tmp_path, capsys):
    _runtime_error(
        client_cli.main,
        ["train", str(good_csv), "--label-column", "sentiment", "--out", str(tmp_path / "run")],
        capsys,
        "'sentiment'",
        "missing",
    )


def test_client_header_only_csv(tmp_path, capsys):
    data = write_csv(tmp_path / "data.csv", [])
    _runtime_error(
        client_cli.main, ["train", str(data), "--out", str(tmp_path / "run")], capsys, str(data), "no data rows"
    )


def test_client_single_class(tmp_path, capsys):
    rows = [(text, "pos") for text, _ in learnable_rows(20)]
    data = write_csv(tmp_path / "data.csv", rows)
    _runtime_error(
        client_cli.main, ["train", str(data), "--out", str(tmp_path / "run")], capsys, "single class", "'pos'"
    )


def test_client_empty_text_names_the_line(tmp_path, capsys):
    rows = learnable_rows(10)
    rows[4] = ("", rows[4][1])
    data = write_csv(tmp_path / "data.csv", rows)
    _runtime_error(
        client_cli.main, ["train", str(data), "--out", str(tmp_path / "run")], capsys, f"{data}:6", "'text'", "empty"
    )


def test_client_eval_label_unseen_in_training(good_csv, tmp_path, capsys):
    held = write_csv(tmp_path / "eval.csv", [("w1 w2 good", "pos"), ("w3 w4", "neutral")])
    _runtime_error(
        client_cli.main,
        ["train", str(good_csv), "--eval", str(held), "--out", str(tmp_path / "run")],
        capsys,
        "'neutral'",
        "not in the training data",
    )


def test_client_server_unreachable(good_csv, tmp_path, capsys):
    """No server: the client gives up after its connect timeout (not after every retry) and says what to check."""
    port = _free_port()
    _runtime_error(
        client_cli.main,
        ["train", str(good_csv), "--server", f"127.0.0.1:{port}", "--out", str(tmp_path / "run")],
        capsys,
        f"cannot reach sap-server at 127.0.0.1:{port} within 10 s",
        "--server HOST:PORT",
    )


def test_server_missing_model_folder(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    _runtime_error(server_cli.main, ["--model", str(missing), "--split", "1", "--port", "0"], capsys, "no-such-model")


def test_server_split_out_of_range(tiny_bert, capsys):
    _runtime_error(
        server_cli.main, ["--model", str(tiny_bert), "--split", "10", "--port", "0"], capsys, "k=10", "3 blocks", "0..2"
    )
