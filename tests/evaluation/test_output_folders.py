"""Evaluation commands run outside a checkout write where the user says, or into one folder of their own under the
current directory (named in --help): never a ``benchmarks/results`` the user did not ask for."""

from __future__ import annotations

from pathlib import Path

from moebalance.cli import build_parser, main

TINY_STUDY = [
    "--quick",
    "--experts",
    "4",
    "--top-k",
    "2",
    "--balancers",
    "none",
    "--steps",
    "2",
    "--batch-size",
    "2",
    "--seq-len",
    "8",
    "--val-tokens",
    "64",
    "--no-progress",
]


def _all_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_defaults_are_named_in_help(capsys):
    for command, default in (("report", "moebalance_results/report.md"), ("study", "moebalance_results")):
        try:
            main([command, "--help"])
        except SystemExit as exc:
            assert exc.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert f"(default {default} under the current directory)" in text, text
        args = build_parser().parse_args([command])
        assert args.out == default


def test_study_and_report_outside_a_checkout_write_one_folder_of_their_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["study", *TINY_STUDY]) == 0
    assert (
        main(["report", "--routing-data", "nowhere", "--devices", "2", "--tokens-per-device", "64", "--no-progress"])
        == 0
    )
    assert not (tmp_path / "benchmarks").exists()
    assert {p.split("/")[0] for p in _all_files(tmp_path)} == {"moebalance_results"}
    folder = tmp_path / "moebalance_results"
    assert (folder / "balancer_study_quick.json").is_file() and (folder / "report.md").is_file()
    # the report found the study written beside it (no "not yet run" for it)
    md = (folder / "report.md").read_text()
    assert "balancer_study_quick.json" in md and "study: not yet run" not in md


def test_out_is_where_the_user_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    assert main(["study", *TINY_STUDY, "--out", "mine/study"]) == 0
    assert (
        main(
            [
                "report",
                "--out",
                "mine/r.md",
                "--routing-data",
                "nowhere",
                "--devices",
                "2",
                "--tokens-per-device",
                "64",
                "--no-progress",
            ]
        )
        == 0
    )
    assert {p.split("/")[0] for p in _all_files(tmp_path)} == {"mine"}
    assert (tmp_path / "mine" / "study" / "balancer_study_quick.json").is_file()
    assert (tmp_path / "mine" / "r.md").is_file() and (tmp_path / "mine" / "r_files").is_dir()
