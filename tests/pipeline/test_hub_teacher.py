"""A teacher named by its Hugging Face Hub id: validation defers, the teacher stage downloads into R/teacher (here
a fake snapshot_download copying a tiny folder), converts .bin weights, and says how to fetch it by hand offline."""
from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import pytest
import yaml

from mlc.cli import main
from mlc.errors import MlcError, RecipeError
from mlc.layout import RunLayout
from mlc.pipeline.run import run_pipeline
from mlc.recipe import load_recipe

REPO = "someone/tiny-encoder"


def _recipe(tmp_path: Path, **changes) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Habari ya leo, wanafunzi wengi wamefika shuleni mapema asubuhi.\n" * 3, encoding="utf-8")
    step = {"steps": 2, "batch_size": 2, "lr": 1e-3, "losses": {"hidden_mse": {"weight": 1.0}}}
    recipe = {"name": "hub", "language": "swa", "output_dir": str(tmp_path / "run"), "teacher": {"source": REPO},
              "corpus": {"sources": [{"kind": "text", "path": str(corpus)}]}, "distill": {"step1": step},
              "shards": {"seq_len": 32}}
    recipe.update(changes)
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _fake_hub(monkeypatch, folder: Path, calls: list):
    """snapshot_download as the Hub would answer for a repository holding ``folder``'s files."""
    import huggingface_hub

    def snapshot_download(repo_id, local_dir, allow_patterns, **kwargs):
        assert repo_id == REPO and not kwargs
        calls.append(list(allow_patterns))
        for f in folder.rglob("*"):
            rel = f.relative_to(folder).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, Path(local_dir) / rel)
        meta = Path(local_dir) / ".cache" / "huggingface" / "download" / "config.json.metadata"
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text("0123abcd\netag\n1.0\n")
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


def test_offline_hub_teacher_defers_validation_and_names_key_and_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = _recipe(tmp_path)
    r = load_recipe(path)  # no network, no error: the shape checks wait for the download
    assert RunLayout.of(r).imported_teacher == tmp_path / "run" / "teacher"
    assert any("Hugging Face Hub" in n and "teacher stage" in n for n in r.notes)
    assert main(["validate", str(path)]) == 0
    assert "note: teacher.source" in capsys.readouterr().out
    with pytest.raises(MlcError) as err:
        run_pipeline(r, path, stop="teacher", log=lambda *a: None)
    text = str(err.value)
    assert text.startswith("teacher.source:") and "HF_HUB_OFFLINE" in text
    assert f"hf download {REPO}" in text and "--local-dir teachers/tiny-encoder" in text
    assert "teacher.source: teachers/tiny-encoder" in text
    assert not (tmp_path / "run" / "teacher").exists()


def test_teacher_stage_downloads_into_the_run_folder(tmp_path, monkeypatch, tiny_xlmr_dir):
    calls = []
    _fake_hub(monkeypatch, tiny_xlmr_dir, calls)
    path = _recipe(tmp_path)
    r = load_recipe(path)
    assert run_pipeline(r, path, stop="teacher", log=lambda *a: None) == ["teacher"]
    folder = tmp_path / "run" / "teacher"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not (folder / ".cache").exists()
    assert len(calls) == 1 and "config.json" in calls[0] and not any(".bin" in p for p in calls[0])
    assert json.loads((folder / "mlc_source.json").read_text()) == {"hub": REPO, "revision": "0123abcd",
                                                                    "converted_from": None}
    # once downloaded, validation reads its shape, and the stage is up to date without the Hub
    r2 = load_recipe(path)
    assert not r2.notes
    assert run_pipeline(r2, path, stop="teacher", log=lambda *a: None) == []
    assert len(calls) == 1


def test_deferred_checks_run_after_the_download(tmp_path, monkeypatch, tiny_xlmr_dir):
    _fake_hub(monkeypatch, tiny_xlmr_dir, [])
    path = _recipe(tmp_path, prune={"enabled": False, "heads": 99})
    r = load_recipe(path)
    with pytest.raises(RecipeError, match="prune.heads: 99 is more than the teacher's"):
        run_pipeline(r, path, stop="teacher", log=lambda *a: None)
    with pytest.raises(RecipeError, match="prune.heads"):  # now that it is there, validation itself says so
        load_recipe(path)


def test_hub_teacher_with_bin_weights_is_converted(tmp_path, monkeypatch, tiny_bert_dir):
    import torch
    from transformers import BertForMaskedLM

    from mlc.models.io import load_model

    repo = tmp_path / "repo"
    model = BertForMaskedLM.from_pretrained(str(tiny_bert_dir))
    model.save_pretrained(str(repo))
    torch.save(model.state_dict(), repo / "pytorch_model.bin")  # the weights as older repositories publish them
    for f in tiny_bert_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "vocab.txt":
            shutil.copy2(f, repo / f.name)
    for f in repo.glob("*.safetensors"):
        f.unlink()
    calls = []
    _fake_hub(monkeypatch, repo, calls)
    path = _recipe(tmp_path)
    run_pipeline(load_recipe(path), path, stop="teacher", log=lambda *a: None)
    folder = tmp_path / "run" / "teacher"
    assert len(calls) == 2 and any("pytorch_model.bin" in p for p in calls[1])
    assert (folder / "model.safetensors").is_file() and not list(folder.rglob("*.bin"))
    assert json.loads((folder / "mlc_source.json").read_text())["converted_from"] == ["pytorch_model.bin"]
    ids = torch.tensor([[2, 9, 10, 3]])
    a = load_model(folder)(input_ids=ids).logits
    b = load_model(tiny_bert_dir)(input_ids=ids).logits
    assert torch.equal(a, b)


def test_failed_download_says_how_to_fetch_by_hand(tmp_path, monkeypatch):
    import huggingface_hub

    def snapshot_download(**kwargs):
        raise OSError("connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    path = _recipe(tmp_path)
    with pytest.raises(MlcError, match="connection refused.*hf download someone/tiny-encoder") as err:
        run_pipeline(load_recipe(path), path, stop="teacher", log=lambda *a: None)
    assert err.value.where == "teacher.source"
    assert not (tmp_path / "run" / "teacher").exists()


def test_a_folder_of_that_name_is_a_folder(tmp_path, monkeypatch, tiny_xlmr_dir):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_xlmr_dir, tmp_path / "someone" / "tiny-encoder")
    r = load_recipe(_recipe(tmp_path))
    assert not r.notes and RunLayout.of(r).imported_teacher == Path(REPO)
