"""TinyWorld's word-level tokenizer, in Hugging Face tokenizers format.

One word is one token; words are separated by spaces. The tokenizer is built from
the closed vocabulary in `language.py` and saved as ``tokenizer.json`` beside the
bundled model, so that transformers, TransformerLens and other tools load it as they
would any Hugging Face tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

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
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": L.BOS, "eos_token": L.BOS,
              "pad_token": L.PAD, "unk_token": L.UNK, "add_bos_token": True, "model_max_length": 128}
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
