"""Tiny random encoders of both families, built in memory, for tests and quick benchmarks.

- :func:`tiny_bert`: BERT with an MLM head and a WordPiece tokenizer (the mBERT family);
- :func:`tiny_xlmr`: XLM-R with an MLM head, a SentencePiece Unigram model file and the matching
  fast tokenizer (the XLM-R / multilingual-e5 family).

Tokenizers are trained on the given sentences (default: a few built-in Swahili ones), so no hub is needed.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

SAMPLE_SENTENCES = [
    "Wizara ya afya ya Tanzania imeripoti Jumatatu kuwa watu zaidi wamepata maambukizi.",
    "Walioambukizwa wote ni raia wa Tanzania, wakiwa Dar es Salaam na mmoja mjini Arusha.",
    "Rais amesema serikali itaendelea kuchukua hatua za kulinda afya ya wananchi.",
    "Mvua kubwa imenyesha katika mikoa ya pwani na kusababisha mafuriko makubwa.",
    "Timu ya taifa ya mpira wa miguu imeshinda mechi yake ya kwanza jana jioni.",
    "Wanafunzi wengi wamefaulu mtihani wa taifa mwaka huu kuliko mwaka uliopita.",
    "Bei ya mafuta imepanda tena na wananchi wanalalamika kuhusu gharama za maisha.",
    "Mkutano wa viongozi wa Afrika Mashariki utafanyika mjini Nairobi wiki ijayo.",
    "Wakulima wa kahawa wameomba serikali kuwasaidia kupata masoko mapya.",
    "Hospitali mpya ya wilaya itafunguliwa mwezi ujao na waziri wa afya.",
    "Mulungu adalenga kumwamba ndi dziko lapansi, ndipo anthu anayamba kukhala.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
]


def _corpus(sentences):
    return list(sentences) if sentences else SAMPLE_SENTENCES


def tiny_bert(folder: Path | str, sentences=None, *, hidden: int = 32, layers: int = 4, heads: int = 4,
              ffn: int = 64, vocab_size: int = 300, seed: int = 0, max_positions: int = 128):
    """Write a random BertForMaskedLM + WordPiece tokenizer to ``folder``; return (model, tokenizer)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(_corpus(sentences), trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=specials, min_frequency=1))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=max_positions)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=max_positions,
                        pad_token_id=tok.token_to_id("[PAD]"), tie_word_embeddings=True)
    model = BertForMaskedLM(config).eval()
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def tiny_xlmr(folder: Path | str, sentences=None, *, hidden: int = 32, layers: int = 4, heads: int = 4,
              ffn: int = 64, vocab_size: int = 300, seed: int = 0, max_positions: int = 130):
    """Write a random XLMRobertaForMaskedLM + SentencePiece Unigram tokenizer (``sentencepiece.bpe.model``
    and ``tokenizer.json``) to ``folder``; return (model, tokenizer)."""
    import sentencepiece as spm
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM, XLMRobertaTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "corpus.txt"
        text.write_text("\n".join(_corpus(sentences)) + "\n", encoding="utf-8")
        # XLM-R's id layout: <s>=0 <pad>=1 </s>=2 <unk>=3, pieces, then <mask> last
        spm.SentencePieceTrainer.train(
            input=str(text), model_prefix=str(Path(tmp) / "sp"), vocab_size=vocab_size, model_type="unigram",
            bos_id=0, pad_id=1, eos_id=2, unk_id=3, character_coverage=1.0, hard_vocab_limit=False,
            minloglevel=2, num_threads=1)
        model_file = folder / "sentencepiece.bpe.model"
        model_file.write_bytes((Path(tmp) / "sp.model").read_bytes())
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())] + [("<mask>", 0.0)]
    tokenizer = XLMRobertaTokenizer(vocab=vocab, model_max_length=max_positions - 2)
    torch.manual_seed(seed)
    config = XLMRobertaConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, intermediate_size=ffn,
                              max_position_embeddings=max_positions, pad_token_id=1, bos_token_id=0,
                              eos_token_id=2, type_vocab_size=1, tie_word_embeddings=True)
    model = XLMRobertaForMaskedLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer
