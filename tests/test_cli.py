"""The `mlc` command itself: its version, and one flag style with the older spellings still accepted."""
from __future__ import annotations

import pytest

import mlc
from mlc.cli import OLD_FLAG_SPELLINGS, build_parser, main, respell_old_flags


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"mlc {mlc.__version__}"


def test_every_long_flag_is_spelled_with_dashes():
    """No option of any subcommand has an underscore in its name (the old ones are respelled on the way in)."""
    parser = build_parser()
    seen = []

    def walk(p):
        for action in p._actions:
            seen.extend(s for s in action.option_strings if s.startswith("--"))
            if isinstance(action.choices, dict):  # a subcommand table
                for sub in action.choices.values():
                    walk(sub)
    walk(parser)
    assert "--num-gpus" in seen and "--peak-tflops" in seen
    assert [s for s in seen if "_" in s] == []


def test_old_spellings_still_work_with_a_note(capsys):
    assert respell_old_flags(["distill", "r.yaml", "--num_gpus", "2", "--stop_after=3", "--out", "a_b"]) == [
        "distill", "r.yaml", "--num-gpus", "2", "--stop-after=3", "--out", "a_b"]
    err = capsys.readouterr().err
    assert "--num_gpus is now spelled --num-gpus" in err and "--stop_after is now spelled --stop-after" in err
    options = set()

    def walk(p):
        for action in p._actions:
            options.update(action.option_strings)
            if isinstance(action.choices, dict):
                for sub in action.choices.values():
                    walk(sub)
    walk(build_parser())
    for old in OLD_FLAG_SPELLINGS:  # every old spelling maps to an option some command has today
        assert old.replace("_", "-") in options, old
