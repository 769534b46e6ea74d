"""`mlc trim`, `mlc prune`, `mlc size`; the exported model loads in plain transformers (no mlc)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from mlc.cli import main
from mlc.models.tiny import SAMPLE_SENTENCES


def _recipe(tmp_path, teacher, corpus_lines):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(corpus_lines) + "\n", encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: t
language: swa
output_dir: {tmp_path / 'run'}
teacher: {{source: {teacher}}}
corpus:
  sources: [{{kind: text, path: {text}}}]
vocab: {{top_n: 40}}
distill:
  step1:
    steps: 1
    batch_size: 1
    lr: 1.0e-4
    losses: {{hidden_mse: {{weight: 1.0}}}}
""", encoding="utf-8")
    return recipe


def test_trim_command(tiny_xlmr_dir, tmp_path, capsys):
    recipe = _recipe(tmp_path, tiny_xlmr_dir, SAMPLE_SENTENCES)
    assert main(["trim", str(recipe)]) == 0
    out = tmp_path / "run" / "teacher-trimmed"
    report = json.loads((out / "mlc_vocab.json").read_text())
    assert report["languages"]["swa"]["kept_by_rule"] == 40
    assert "kept" in capsys.readouterr().out
    from huggingface_hub import ModelCard  # a card the Hub reads, with no local path in it

    card = ModelCard.load(out / "README.md")
    assert card.data.language == ["swa"] and str(tmp_path) not in card.text
    # a corpus with no usable text: exit 2, nothing written
    bad = tmp_path / "bad"
    bad.mkdir()
    recipe = _recipe(bad, tiny_xlmr_dir, ["short", "", "tiny"])
    assert main(["trim", str(recipe)]) == 2
    assert "no text" in capsys.readouterr().err
    assert not (bad / "run" / "teacher-trimmed").exists()


@pytest.mark.slow
def test_prune_command_and_plain_transformers_load(tiny_bert_dir, tmp_path, capsys):
    from safetensors.torch import save_file
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from mlc.surgery import prune as P

    text = tmp_path / "calib.txt"
    text.write_text("\n".join(SAMPLE_SENTENCES * 2) + "\n", encoding="utf-8")
    out, masks = tmp_path / "pruned", tmp_path / "masks.safetensors"
    assert main(["prune", str(tiny_bert_dir), "--out", str(out), "--ffn-dim", "24", "--heads", "2",
                 "--hidden-size", "16", "--text", str(text), "--batches", "2", "--masks-out", str(masks)]) == 0
    assert "hidden 16" in capsys.readouterr().out
    assert "pruned to FFN 24, 2 heads, hidden 16" in (out / "README.md").read_text()  # its card
    m = P.load_masks(masks)
    assert m.kept()["ffn"] == [24] * 4 and m.kept()["hidden"] == 16
    # expected outputs from the masked model, checked in a fresh interpreter that never imports mlc
    model = AutoModelForMaskedLM.from_pretrained(tiny_bert_dir).eval()
    P.apply_masks(model, m)
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(SAMPLE_SENTENCES[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    save_file({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "logits": logits},
              str(tmp_path / "expected.safetensors"))
    code = (
        "import sys, torch\n"
        "from safetensors.torch import load_file\n"
        "from transformers import AutoModelForMaskedLM\n"
        f"e = load_file({str(tmp_path / 'expected.safetensors')!r})\n"
        f"m = AutoModelForMaskedLM.from_pretrained({str(out)!r}).eval()\n"
        "with torch.no_grad():\n"
        "    got = m(input_ids=e['input_ids'], attention_mask=e['attention_mask']).logits\n"
        "assert 'mlc' not in sys.modules\n"
        "print(float((got - e['logits']).abs().max()))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) < 1e-5


def test_prune_command_errors(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(tiny_bert_dir), "--out", str(out), "--ffn-dim", "65", "--importance", "first"]) == 2
    assert "--ffn-dim: 65 is larger than the layer's FFN width 64" in capsys.readouterr().err
    assert main(["prune", str(tiny_bert_dir), "--out", str(out), "--ffn-dim", "8"]) == 2
    assert "--text" in capsys.readouterr().err
    enc = tmp_path / "enc"
    shutil.copytree(tiny_bert_dir, enc)
    cfg = json.loads((enc / "config.json").read_text())
    cfg["architectures"] = ["BertModel"]
    (enc / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "t.txt").write_text("Habari yako\n")
    assert main(["prune", str(enc), "--out", str(out), "--ffn-dim", "8", "--text", str(tmp_path / "t.txt")]) == 2
    assert "MLM head" in capsys.readouterr().err
    assert not out.exists()


def test_size_command(tiny_xlmr_dir, capsys):
    from transformers import AutoModelForMaskedLM

    assert main(["size", str(tiny_xlmr_dir), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)[str(tiny_xlmr_dir)]
    model = AutoModelForMaskedLM.from_pretrained(tiny_xlmr_dir)
    assert r["total"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert r["total"]["bytes"] == 4 * r["total"]["parameters"]
    assert r["components"]["word_embeddings"]["parameters"] == model.config.vocab_size * model.config.hidden_size
    assert r["weights_bytes"] > r["total"]["bytes"] and r["tokenizer_bytes"] > 0
