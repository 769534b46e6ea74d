"""Vocabulary trimming: keep the tokens a language (or several) uses; rewrite tokenizer and embeddings.

What is kept
    * every special / added token, and the tokenizer's lowest-scoring piece (Unigram: the score of an
      unknown character is ``min score - 10``, so keeping it keeps that penalty, hence segmentation);
    * per language, the tokens its corpus uses, by ``min_count`` and then ``top_n`` or ``coverage``;
      the kept set is the union over languages;
    * every single-character piece of every character seen (WordPiece ``c`` and ``##c``; Unigram ``c``,
      ``▁c`` and ``▁``), so unseen words still split into kept pieces instead of ``<unk>``.

What is rewritten
    ``tokenizer.json`` (WordPiece vocabulary or Unigram pieces with their scores, added tokens, the
    post-processor's special ids, the padding's pad id; its padding and truncation settings are otherwise
    kept as the user set them, though counting always runs with both off), ``sentencepiece.bpe.model``
    when present (same pieces, same order, so the slow and the fast tokenizers agree), ``vocab.txt`` when
    present, ``tokenizer_config.json``'s ``added_tokens_decoder``, the config's ``vocab_size`` and
    special-token ids, and the weights: rows of the word embeddings and of the MLM decoder weight and bias
    (re-indexed, not truncated; tied weights stay tied because the folder's tie setting is unchanged).

Guarantee: a text whose original tokens are all kept is segmented the same way (WordPiece is greedy
longest-match and Unigram takes the best-scoring segmentation; removing pieces that were not used cannot
change either), so the trimmed model's hidden states on it are bit-identical.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from mlc.errors import MlcError
from mlc.models.arch import VOCAB_ROWS, WORD_EMBEDDINGS
from mlc.models.io import load_state, portable_tokenizer_config, read_config
from mlc.paths import atomic_dir, atomic_write_json, atomic_write_text, read_json

SUPPORTED = ("WordPiece", "Unigram")
SP_FILE = "sentencepiece.bpe.model"
_REWRITTEN = {"config.json", "tokenizer.json", "tokenizer_config.json", SP_FILE, "vocab.txt",
              "model.safetensors", "model.safetensors.index.json", "mlc_vocab.json", "mlc_vocab_ids.npy"}
_SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
                "mask_token_id", "unk_token_id", "decoder_start_token_id")


class _Vocab:
    """The tokenizer.json model, read: pieces in id order, their scores (Unigram), the added tokens."""

    def __init__(self, folder: Path):
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise MlcError("no tokenizer.json: vocabulary trimming needs a fast (tokenizers) tokenizer", str(folder))
        self.path = path
        self.data = read_json(path)
        if not isinstance(self.data, dict):
            raise MlcError("a tokenizer.json is a JSON object", str(path))
        model = self.data.get("model") or {}
        self.kind = model.get("type")
        if self.kind not in SUPPORTED:
            raise MlcError(f"tokenizer type {self.kind!r} is not supported for vocabulary trimming "
                           f"(supported: {', '.join(SUPPORTED)})", str(path))
        if self.kind == "WordPiece":
            vocab = model["vocab"]
            self.pieces = [None] * len(vocab)
            for piece, i in vocab.items():
                self.pieces[i] = piece
            if any(p is None for p in self.pieces):
                raise MlcError("WordPiece ids are not contiguous", str(path))
            self.scores = None
            self.prefix = model.get("continuing_subword_prefix") or "##"
        else:
            if model.get("byte_fallback"):
                raise MlcError("Unigram with byte_fallback is not supported for vocabulary trimming", str(path))
            self.pieces = [p for p, _ in model["vocab"]]
            self.scores = [s for _, s in model["vocab"]]
        self.index = {p: i for i, p in enumerate(self.pieces)}
        self.added = [(t["id"], t["content"]) for t in self.data.get("added_tokens", [])]

    def __len__(self):
        return len(self.pieces)


def plain(tokenizer):
    """``tokenizer`` (a ``tokenizers.Tokenizer``) with padding and truncation off, whatever its tokenizer.json
    says: counting must see every token of a sentence and no pad token (a fixed padding to 128 would count
    [PAD] as text, a truncation at 128 would drop the rest of a long sentence, and trimming would not be
    lossless). Only the in-memory tokenizer changes; the trimmed tokenizer.json keeps the user's settings."""
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def _tokenizer(folder: Path):
    from tokenizers import Tokenizer

    return plain(Tokenizer.from_file(str(folder / "tokenizer.json")))


def count_tokens(tokenizer, sentences: Iterable[str], n_ids: int, chunk: int = 2000, progress: bool | None = None):
    """Token-id counts of ``sentences`` (no special tokens), the characters seen, and the sentence count.

    Streams: the batch encoding of one chunk (every core, the GIL released) runs in a thread while this one
    reads the next chunk and counts the last; memory holds two chunks, whatever the corpus size."""
    import itertools
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    counts = np.zeros(n_ids, dtype=np.int64)
    chars: set[str] = set()
    normalizer = tokenizer.normalizer
    n = 0

    def chunks():
        nonlocal n
        buf: list[str] = []
        for s in sentences:
            if not isinstance(s, str):
                raise MlcError(f"corpus items must be strings, got {type(s).__name__}")
            if not s.strip():
                continue
            buf.append(s)
            n += 1
            if len(buf) >= chunk:
                yield buf
                buf = []
        if buf:
            yield buf

    def encode(buf):
        encs = tokenizer.encode_batch(buf, add_special_tokens=False)
        return buf, np.fromiter(itertools.chain.from_iterable(e.ids for e in encs), dtype=np.int64)

    def tally(buf, ids):
        if ids.size:
            counts[:] += np.bincount(ids, minlength=n_ids)[:n_ids]
        # one normalizer call per chunk: its normalizers (NFKC-like maps, lower-casing, accents, spacing) act
        # per character, so the characters of the joined text are those of the sentences (and line breaks)
        text = "\n".join(buf)
        chars.update(normalizer.normalize_str(text) if normalizer is not None else text)
        bar.update(len(buf))

    bar = tqdm(unit=" sentences", unit_scale=True, mininterval=2.0, desc="vocabulary counts", dynamic_ncols=True,
               disable=(not sys.stderr.isatty()) if progress is None else not progress)
    with ThreadPoolExecutor(1) as ex, bar:
        pending = None
        for buf in chunks():
            future = ex.submit(encode, buf)
            if pending is not None:
                tally(*pending.result())
            pending = future
        if pending is not None:
            tally(*pending.result())
    chars = {c for c in chars if not c.isspace()}
    return counts, chars, n


def _select(counts: np.ndarray, spec) -> np.ndarray:
    """Ids a language keeps by the spec's rule (among the ids it uses at least min_count times)."""
    ids = np.nonzero(counts >= spec.min_count)[0]
    order = ids[np.lexsort((ids, -counts[ids]))]  # most frequent first, ties to the lower id
    if spec.top_n is not None:
        order = order[:spec.top_n]
    elif spec.coverage is not None:
        total = counts.sum()
        cum = np.cumsum(counts[order])
        n = int(np.searchsorted(cum, spec.coverage * total - 1e-9 * total) + 1)
        order = order[:min(n, len(order))]
    return np.sort(order)


def _char_pieces(vocab: _Vocab, chars: set[str]) -> set[int]:
    keep = set()
    for c in chars:
        if vocab.kind == "WordPiece":
            cands = (c, vocab.prefix + c)
        else:
            cands = (c, "▁" + c, "▁")
        keep.update(vocab.index[p] for p in cands if p in vocab.index)
    return keep


def _remap_post_processor(pp: Optional[dict], new_id: dict[int, int], where: str) -> None:
    if pp is None:
        return
    kind = pp.get("type")
    if kind == "TemplateProcessing":
        for tok in pp.get("special_tokens", {}).values():
            tok["ids"] = [new_id[i] for i in tok["ids"]]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            pp[key] = [pp[key][0], new_id[pp[key][1]]]
    elif kind == "Sequence":
        for sub in pp.get("processors", []):
            _remap_post_processor(sub, new_id, where)
    elif kind != "ByteLevel":
        raise MlcError(f"post-processor {kind!r} is not supported for vocabulary trimming", where)


def _sp_rewrite(sp_path: Path, vocab: _Vocab, kept: list[int]) -> tuple[bytes, set[int]]:
    """The SentencePiece model with the same normal pieces kept (in order); also the ids of the
    tokenizer.json pieces that must be kept so both stay aligned (the model's non-normal pieces)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(sp_path.read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise MlcError(f"cannot read the SentencePiece model: {e}", str(sp_path)) from None
    if proto.trainer_spec.model_type != pb.TrainerSpec.UNIGRAM:
        raise MlcError("only Unigram SentencePiece models are supported for vocabulary trimming", str(sp_path))
    normal = pb.ModelProto.SentencePiece.NORMAL
    # the offset between SentencePiece ids and tokenizer.json ids of normal pieces (XLM-R: +1)
    missing = [p.piece for p in proto.pieces if p.type == normal and p.piece not in vocab.index]
    offsets = {vocab.index[p.piece] - i for i, p in enumerate(proto.pieces) if p.type == normal and not missing}
    if missing or len(offsets) != 1:
        raise MlcError("the SentencePiece model and tokenizer.json do not list the same pieces in the same "
                       "order", str(sp_path))
    extra = {vocab.index[p.piece] for p in proto.pieces if p.type != normal and p.piece in vocab.index}
    kept_pieces = {vocab.pieces[i] for i in kept} | {vocab.pieces[i] for i in extra}
    keep = [p for p in proto.pieces if p.type != normal or p.piece in kept_pieces]
    del proto.pieces[:]
    proto.pieces.extend(keep)
    return proto.SerializeToString(), extra


def trim_vocabulary(model_dir: Path | str, out_dir: Path | str, sentences_by_language: dict[str, Iterable[str]],
                    spec, heldout: Iterable[str] = (), *, overwrite: bool = False) -> dict:
    """Trim the folder ``model_dir`` to the tokens of the given corpora; write ``out_dir`` atomically.

    ``spec`` is a :class:`mlc.recipe.VocabSpec` (``min_count``, ``top_n`` or ``coverage``). Returns the
    report (also written to ``out_dir/mlc_vocab.json``): tokens kept, share of corpus tokens covered,
    ``<unk>`` rate on ``heldout`` before and after, parameters before and after. ``out_dir/mlc_vocab_ids.npy``
    holds, for each new id, the old id."""
    import torch
    from safetensors.torch import save_file

    from mlc.models.sentence import copy_sentence_modules

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise MlcError("not a Hugging Face model folder (no config.json)", str(model_dir))
    config = read_config(model_dir)
    vocab = _Vocab(model_dir)
    tok = _tokenizer(model_dir)
    if not sentences_by_language:
        raise MlcError("no corpus given: vocabulary trimming needs text of at least one language", "corpus")

    # 1. count, per language
    languages, union, all_counts, chars = {}, set(), np.zeros(len(vocab), np.int64), set()
    for lang, sentences in sentences_by_language.items():
        counts, seen, n = count_tokens(tok, sentences, len(vocab))
        if n == 0 or counts.sum() == 0:
            raise MlcError(f"the corpus of language {lang!r} has no text", "corpus")
        chosen = _select(counts, spec)
        union.update(int(i) for i in chosen)
        all_counts += counts
        chars |= seen
        languages[lang] = {"sentences": n, "tokens": int(counts.sum()), "distinct": int((counts > 0).sum()),
                           "kept_by_rule": int(len(chosen)),
                           "coverage": float(counts[chosen].sum() / counts.sum())}

    # 2. the kept set
    keep = set(union)
    keep.update(i for i, _ in vocab.added)
    specials_cfg = [config.get(k) for k in _SPECIAL_IDS if isinstance(config.get(k), int)]
    keep.update(i for i in specials_cfg if 0 <= i < len(vocab))
    if vocab.kind == "WordPiece":
        unk = (vocab.data["model"].get("unk_token"))
        if unk in vocab.index:
            keep.add(vocab.index[unk])
    else:
        unk_id = vocab.data["model"].get("unk_id")
        if unk_id is not None:
            keep.add(unk_id)
        added_ids = {i for i, _ in vocab.added}
        normal = [i for i in range(len(vocab)) if i not in added_ids]
        keep.add(min(normal, key=lambda i: (vocab.scores[i], i)))  # keeps the unknown-character penalty
    keep |= _char_pieces(vocab, chars)
    padding = vocab.data.get("padding")
    if isinstance(padding, dict) and isinstance(padding.get("pad_id"), int):
        if not 0 <= padding["pad_id"] < len(vocab):
            raise MlcError(f"padding.pad_id {padding['pad_id']} is not a token id", str(vocab.path))
        keep.add(padding["pad_id"])  # the user's padding setting stays and pads with the same token
    sp_bytes = None
    sp_path = model_dir / SP_FILE
    if sp_path.is_file():
        _, extra = _sp_rewrite(sp_path, vocab, sorted(keep))
        keep |= extra
        sp_bytes, _ = _sp_rewrite(sp_path, vocab, sorted(keep))
    kept = sorted(keep)
    new_id = {old: new for new, old in enumerate(kept)}

    # 3. the weights (checked before anything is written)
    state = load_state(model_dir)
    rows = int(config["vocab_size"])
    if len(vocab) > rows:
        raise MlcError(f"the tokenizer has {len(vocab)} tokens but the model only {rows} embedding rows",
                       str(model_dir / "config.json"))
    index = torch.tensor(kept, dtype=torch.long)
    params_before = sum(t.numel() for t in state.values())
    new_state, reindexed = {}, []
    for name, t in state.items():
        if name.endswith(VOCAB_ROWS) and t.shape[0] == rows:
            new_state[name] = t.index_select(0, index).contiguous()
            reindexed.append(name)
        else:
            new_state[name] = t
    if not any(n.endswith(WORD_EMBEDDINGS) for n in reindexed):
        raise MlcError("no word embeddings found in the weights", str(model_dir))
    params_after = sum(t.numel() for t in new_state.values())

    # 4. the tokenizer files
    data = json.loads(json.dumps(vocab.data))
    if vocab.kind == "WordPiece":
        data["model"]["vocab"] = {vocab.pieces[i]: new_id[i] for i in kept}
    else:
        data["model"]["vocab"] = [[vocab.pieces[i], vocab.scores[i]] for i in kept]
        if data["model"].get("unk_id") is not None:
            data["model"]["unk_id"] = new_id[data["model"]["unk_id"]]
    for t in data.get("added_tokens", []):
        t["id"] = new_id[t["id"]]
    _remap_post_processor(data.get("post_processor"), new_id, str(vocab.path))
    if isinstance(data.get("padding"), dict) and isinstance(data["padding"].get("pad_id"), int):
        data["padding"]["pad_id"] = new_id[data["padding"]["pad_id"]]  # padding/truncation kept as they were
    tok_cfg = None
    if (model_dir / "tokenizer_config.json").is_file():
        tok_cfg = portable_tokenizer_config(json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8")))
        if "added_tokens_decoder" in tok_cfg:
            tok_cfg["added_tokens_decoder"] = {str(new_id[int(k)]): v
                                               for k, v in tok_cfg["added_tokens_decoder"].items()}
    new_config = dict(config)
    new_config["vocab_size"] = len(kept)
    for k in _SPECIAL_IDS:
        if isinstance(config.get(k), int) and config[k] in new_id:
            new_config[k] = new_id[config[k]]

    # 5. measure on the held-out text, with the new tokenizer built in memory
    from tokenizers import Tokenizer

    new_tok = plain(Tokenizer.from_str(json.dumps(data)))
    heldout = [s for s in heldout if s and s.strip()]
    held = {"sentences": len(heldout)}
    if heldout:
        unk_old = vocab.data["model"].get("unk_id") if vocab.kind == "Unigram" else \
            vocab.index.get(vocab.data["model"].get("unk_token"))
        unk_new = new_id.get(unk_old)
        before = [e.ids for e in tok.encode_batch(heldout, add_special_tokens=False)]
        after = [e.ids for e in new_tok.encode_batch(heldout, add_special_tokens=False)]
        n_before, n_after = sum(map(len, before)), sum(map(len, after))
        held.update(tokens=n_after,
                    unk_rate=sum(i == unk_new for ids in after for i in ids) / max(n_after, 1),
                    unk_rate_before=sum(i == unk_old for ids in before for i in ids) / max(n_before, 1),
                    tokens_per_sentence_before=n_before / len(heldout),
                    tokens_per_sentence_after=n_after / len(heldout))
    total = int(all_counts.sum())
    report = {"source": str(model_dir), "tokenizer": vocab.kind, "vocab_before": len(vocab), "rows_before": rows,
              "tokens_kept": len(kept), "rule": {"min_count": spec.min_count, "top_n": spec.top_n,
                                                 "coverage": spec.coverage},
              "coverage": float(all_counts[kept].sum() / total), "corpus_tokens": total,
              "languages": languages, "characters_seen": len(chars), "heldout": held,
              "parameters_before": int(params_before), "parameters_after": int(params_after),
              "reindexed": reindexed, "sentencepiece_model": sp_bytes is not None}

    # 6. write, atomically
    with atomic_dir(out_dir, overwrite=overwrite, what="mlc trim (vocabulary)") as tmp:
        for f in model_dir.iterdir():
            if f.is_file() and f.name not in _REWRITTEN and not f.name.startswith("model-"):
                shutil.copy2(f, tmp / f.name)
        atomic_write_json(tmp / "config.json", new_config)
        atomic_write_text(tmp / "tokenizer.json", json.dumps(data, ensure_ascii=False, indent=2) + "\n")
        if tok_cfg is not None:
            atomic_write_json(tmp / "tokenizer_config.json", tok_cfg)
        if sp_bytes is not None:
            (tmp / SP_FILE).write_bytes(sp_bytes)
        if (model_dir / "vocab.txt").is_file() and vocab.kind == "WordPiece":
            atomic_write_text(tmp / "vocab.txt", "".join(vocab.pieces[i] + "\n" for i in kept))
        save_file(new_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        copy_sentence_modules(model_dir, tmp)  # the loop above copies files only, not 1_Pooling/ and the like
        np.save(tmp / "mlc_vocab_ids.npy", np.asarray(kept, dtype=np.int64))
        atomic_write_json(tmp / "mlc_vocab.json", report)
    return report


def recipe_texts(recipe, sentences_by_language: Optional[dict] = None) -> tuple[dict[str, Iterable[str]], list[str]]:
    """The texts a recipe trims to: its corpus by language (``sentences_by_language`` if the caller already
    has them, e.g. from the corpus stage), plus the text of the evaluation tasks' ``vocab.task_splits`` in the
    recipe's language; and the held-out text for the ``<unk>`` rate: the tasks' dev text unless 'dev' is one
    of those splits (then none). The texts are iterables, read once while counting: the corpus is never held
    in memory."""
    from mlc.data.corpus import iter_corpus
    from mlc.data.tasks import task_files, task_sentences

    import itertools

    if sentences_by_language is None:  # one pass over the corpus per language, never a list of it
        languages = list(dict.fromkeys([s.language or recipe.language for s in recipe.corpus.sources]))
        def of(lang):
            return (s for lg, s in iter_corpus(recipe, with_language=True) if lg == lang)

        texts = {lang: of(lang) for lang in languages}
    else:
        texts = dict(sentences_by_language)
    heldout: list[str] = []
    if recipe.evaluate is not None:
        data_dir = Path(recipe.evaluate.data_dir)
        for task in recipe.evaluate.tasks:
            files = task_files(data_dir, task)
            for split in recipe.vocab.task_splits:
                if files[split].is_file():
                    texts[recipe.language] = itertools.chain(texts.get(recipe.language, ()),
                                                             task_sentences(data_dir, task, split))
            if "dev" not in recipe.vocab.task_splits and files["dev"].is_file():
                heldout.extend(task_sentences(data_dir, task, "dev"))
    return texts, heldout


def trim_from_recipe(recipe, teacher_dir: Path | str, out_dir: Path | str,
                     sentences_by_language: Optional[dict] = None, *, overwrite: bool = False) -> dict:
    """:func:`trim_vocabulary` with the recipe's vocabulary settings and texts (:func:`recipe_texts`)."""
    texts, heldout = recipe_texts(recipe, sentences_by_language)
    if not texts:
        raise MlcError("the corpus has no text", "corpus.sources")
    return trim_vocabulary(teacher_dir, out_dir, texts, recipe.vocab, heldout=heldout, overwrite=overwrite)
