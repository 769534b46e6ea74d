"""The tokenizer files mlc writes load in transformers 4 as well as 5: the e5 folders said "TokenizersBackend",
a class transformers 4.57 does not have (so optimum's ONNX export, which needs transformers 4, failed too)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mlc.models.io import load_tokenizer

pytestmark = pytest.mark.slow

SENTENCES = ["Habari ya asubuhi, rafiki yangu!", "query: Mvua imenyesha leo.", "passage: Serikali imetangaza."]
READ_IDS = ("import json, sys\nfrom transformers import AutoTokenizer\n"
            "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "print(json.dumps({'ids': tok(json.loads(sys.argv[2]))['input_ids'], 'fast': tok.is_fast, "
            "'mask': tok.mask_token_id, 'pad': tok.pad_token_id}))\n")


@pytest.fixture(scope="module")
def transformers4(tmp_path_factory):
    """A virtual environment with transformers 4 (no torch: tokenizers only), from PyPI."""
    venv = tmp_path_factory.mktemp("transformers4") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "transformers>=4.57,<5"],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-2000:]
    return venv / "bin" / "python"


def _ids_in_v4(python, folder) -> dict:
    proc = subprocess.run([str(python), "-c", READ_IDS, str(folder), json.dumps(SENTENCES)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _same_in_both(python, folder):
    v5 = load_tokenizer(folder)
    v4 = _ids_in_v4(python, folder)
    assert v4["fast"] and v4["ids"] == v5(SENTENCES)["input_ids"]
    assert (v4["mask"], v4["pad"]) == (v5.mask_token_id, v5.pad_token_id)


@pytest.mark.integration
def test_the_imported_and_trimmed_e5_load_in_transformers_4(transformers4, e5_teacher_dir, tmp_path):
    from mlc.recipe import VocabSpec
    from mlc.surgery.vocab import trim_vocabulary

    _same_in_both(transformers4, e5_teacher_dir)
    trimmed = tmp_path / "trimmed"
    trim_vocabulary(e5_teacher_dir, trimmed, {"swa": SENTENCES * 3}, VocabSpec(min_count=1))
    _same_in_both(transformers4, trimmed)


def test_a_student_and_an_export_of_a_transformers_5_folder_load_in_transformers_4(transformers4, tiny_xlmr_dir,
                                                                                     tmp_path):
    import shutil

    from mlc.models.io import copy_tokenizer
    from mlc.surgery.layers import make_student

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_xlmr_dir, teacher)
    cfg = json.loads((teacher / "tokenizer_config.json").read_text())
    (teacher / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "TokenizersBackend"}))
    (teacher / "sentencepiece.bpe.model").unlink(missing_ok=True)  # tokenizer.json alone, as transformers 5 saves
    student = make_student(teacher, [0], tmp_path / "student")
    _same_in_both(transformers4, student)
    export = tmp_path / "export"
    export.mkdir()
    copy_tokenizer(teacher, export)
    _same_in_both(transformers4, export)
