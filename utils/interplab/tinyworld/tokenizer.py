"""TinyWorld's word-level tokenizer, in Hugging Face tokenizers format.

One word is one token; words are separated by spaces. The tokenizer is built from
the closed vocabulary in `language.py` and saved as ``tokenizer.json`` beside the
bundled model, so that transformers, TransformerLens and other tools load it as they
would any Hugging Face tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from . import language as L


def build_tokenizer():
    """A `tokenizers.Tokenizer` over TinyWorld's vocabulary (ids in `vocabulary()` order)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {w: i for i, w in enumerate(L.vocabulary())}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=L.UNK))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens([L.PAD, L.BOS, L.UNK])
    return tok


def save_tokenizer(folder: str | Path) -> Path:
    """Write tokenizer.json and tokenizer_config.json into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": L.BOS,
        "eos_token": L.BOS,
        "pad_token": L.PAD,
        "unk_token": L.UNK,
        "add_bos_token": True,
        "model_max_length": 128,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder / "tokenizer.json"


def hf_tokenizer(path: str | Path | None = None):
    """A transformers `PreTrainedTokenizerFast` for TinyWorld (from ``path`` or built fresh).

    It prepends ``<bos>`` to every text it encodes, as TransformerLens expects.
    """
    from transformers import PreTrainedTokenizerFast

    kwargs = dict(bos_token=L.BOS, eos_token=L.BOS, pad_token=L.PAD, unk_token=L.UNK, add_bos_token=True)
    if path is not None:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        tok = PreTrainedTokenizerFast(tokenizer_file=str(file), **kwargs)
        tok.init_kwargs["name_or_path"] = str(file.parent)
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(), **kwargs)
        tok.init_kwargs["name_or_path"] = "tinyworld"
    return tok


_VOCAB: dict[str, int] | None = None


def token_id(word: str) -> int:
    """The id of one TinyWorld word; raises KeyError naming the word if it is not in the vocabulary."""
    global _VOCAB
    if _VOCAB is None:
        _VOCAB = {w: i for i, w in enumerate(L.vocabulary())}
    try:
        return _VOCAB[word]
    except KeyError:
        raise KeyError(f"{word!r} is not a TinyWorld word (see interplab.tinyworld.vocabulary())") from None


def encode(tokens: Sequence[str]) -> list[int]:
    """Ids of a list of words."""
    return [token_id(w) for w in tokens]


def batch_tokens(docs, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [batch, pos] and a mask [batch, pos] (True on real tokens) for documents."""
    seqs = [encode(d.tokens if hasattr(d, "tokens") else d) for d in docs]
    width = max(max(len(s) for s in seqs), pad_to or 0)
    ids = torch.full((len(seqs), width), token_id(L.PAD), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    return ids, mask


def is_tinyworld_tokenizer(tokenizer) -> bool:
    """Whether a tokenizer is TinyWorld's word-level one (so one word is one token)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return len(vocab) == len(L.vocabulary()) and all(vocab.get(w) == i for i, w in enumerate(L.vocabulary()[:50]))


class ModelTokens(NamedTuple):
    """TinyWorld documents as one model's tokens, with where each word went.

    ids, mask: [batch, pos] token ids (right-padded) and True on real tokens.
    first, last: [batch, words] the position of each word's first and last token
        (-1 past the end of a document). Word 0 is ``<bos>``, at position 0.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    first: torch.Tensor
    last: torch.Tensor


def tokens_for(tokenizer, docs, pad_to: int | None = None) -> ModelTokens:
    """Tokenize TinyWorld documents with any model's tokenizer, keeping track of the words.

    With TinyWorld's own tokenizer one word is one token and ``first == last == word
    index``. With a subword tokenizer such as GPT-2's, the words are joined by spaces
    into plain text, a BOS token is put in front, and each word's annotation (room,
    sentiment, answer...) can be looked up at ``first`` (the token that starts the
    word: the target when predicting it) or ``last`` (where the whole word has been read).

    ``tokenizer`` may be a model with a ``.tokenizer``.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    words = [list(d.tokens if hasattr(d, "tokens") else d) for d in docs]
    n_words = max(len(w) for w in words)
    if is_tinyworld_tokenizer(tokenizer):
        ids, mask = batch_tokens(words, pad_to)
        pos = torch.arange(n_words).expand(len(words), n_words).clone()
        lengths = torch.tensor([len(w) for w in words])
        pos[pos >= lengths[:, None]] = -1
        return ModelTokens(ids, mask, pos, pos.clone())
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos
    seqs, firsts, lasts = [], [], []
    for ws in words:
        if ws and ws[0] == L.BOS:
            ws = ws[1:]
        text, spans = "", []
        for w in ws:
            start = len(text) + (1 if text else 0)
            text = f"{text} {w}" if text else w
            spans.append((start, len(text)))
        enc = tokenizer(text, add_special_tokens=False)
        seqs.append([bos] + list(enc["input_ids"]))
        firsts.append([0] + [1 + enc.char_to_token(s) for s, _ in spans])
        lasts.append([0] + [1 + enc.char_to_token(e - 1) for _, e in spans])
    width = max(max(len(s) for s in seqs), pad_to or 0)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    first = torch.full((len(seqs), n_words), -1, dtype=torch.long)
    last = first.clone()
    for i, (s, f, l_) in enumerate(zip(seqs, firsts, lasts)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
        first[i, : len(f)] = torch.tensor(f)
        last[i, : len(l_)] = torch.tensor(l_)
    return ModelTokens(ids, mask, first, last)
