"""``bayeslora bench ...`` on the command line: user errors are one line and exit code 2."""

from __future__ import annotations

from bayeslora.cli import main


def test_bad_method_is_one_line_exit_2(tmp_path, capsys):
    assert main(["bench", "calibration", "--out", str(tmp_path / "g"), "--methods", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Unknown method(s) ['nope']" in err


def test_bad_seeds_and_missing_grid(tmp_path, capsys):
    assert main(["bench", "calibration", "--out", str(tmp_path / "g"), "--methods", "mle", "--seeds", "1,x"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["bench", "report", str(tmp_path / "none")]) == 2
    assert "has no results.jsonl" in capsys.readouterr().err


def test_results_command_writes_results_md(tmp_path, capsys):
    assert main(["bench", "results", "--docs", str(tmp_path)]) == 0
    assert (tmp_path / "RESULTS.md").read_text().startswith("# Results")


def test_calibration_refuses_an_empty_list_and_a_file_as_out(tmp_path, capsys):
    from bayeslora.cli import main

    assert main(["bench", "calibration", "--out", str(tmp_path / "g"), "--methods", ","]) == 2
    assert "comma-separated --methods" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert main(["bench", "calibration", "--out", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err
