"""The data sparse dictionaries train and are measured on: TinyWorld documents, masks and cached activations.

- `sae_token_mask`, `tinyworld_dataset`: fresh documents and the positions a dictionary reads
  (real tokens except ``<bos>``).
- `collect_acts`, `training_activations`: activations at one hook, for the masked positions.
- `mlp_io_pairs`, `collect_pairs`: an MLP's (input, output) pairs, a transcoder's training data.
- `middle_layer`, `word_end_mask`, `word_token_id`: the same chapters on another model and tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .. import tinyworld
from ..activations import collect
from .config import DEFAULT_HOOK, mlp_in_hook, mlp_out_hook


def sae_token_mask(ids: Tensor, mask: Tensor) -> Tensor:
    """Positions a dictionary reads: real tokens (mask) except <bos>."""
    return mask & (ids != tinyworld.token_id("<bos>"))


def tinyworld_dataset(n_docs: int, seed: int, split: str = "test"):
    """(docs, ids [n_docs, pos], mask [n_docs, pos]) of fresh TinyWorld documents; mask: real tokens but <bos>."""
    docs = tinyworld.generate(n_docs, seed=seed, split=split)
    ids, mask = tinyworld.batch_tokens(docs)
    return docs, ids, sae_token_mask(ids, mask)


def collect_acts(model, ids: Tensor, mask: Tensor, hook: str = DEFAULT_HOOK, progress: bool = False) -> Tensor:
    """[n_kept, d] activations at ``hook`` for the masked positions (row-major order)."""
    return collect(model, ids, hook, mask=mask, batch_size=256, progress=progress)[hook]


def training_activations(model, n_docs: int, seed: int = 0, hook: str = DEFAULT_HOOK, chunk: int = 256) -> Tensor:
    """Activations at ``hook`` of fresh training-split documents, every real token but <bos>.

    Documents are sorted by length and run in chunks, so that little compute goes to
    padding; the rows come out in that (length) order, which does not matter for training.
    """
    docs = sorted(tinyworld.generate(n_docs, seed=seed, split="train"), key=len)
    parts = []
    for start in range(0, len(docs), chunk):
        ids, mask = tinyworld.batch_tokens(docs[start : start + chunk])
        parts.append(collect_acts(model, ids, sae_token_mask(ids, mask), hook))
    return torch.cat(parts)


@torch.no_grad()
def mlp_io_pairs(model, tokens: Int[Tensor, "batch pos"], layer: int, mask: Bool[Tensor, "batch pos"] | None = None
                 ) -> tuple[Float[Tensor, "n d_model"], Float[Tensor, "n d_model"]]:
    """(x, y): the input and output of the MLP of ``layer`` at every kept token, in row-major order."""
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer must be between 0 and {model.cfg.n_layers - 1}, got {layer}")
    hooks = [mlp_in_hook(layer), mlp_out_hook(layer)]
    _, cache = model.run_with_cache(tokens, names_filter=hooks)
    x, y = cache[hooks[0]], cache[hooks[1]]
    if mask is None:
        return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    keep = mask.to(x.device).bool()
    return x[keep], y[keep]


def collect_pairs(model, ids: Tensor, mask: Tensor, layers: Sequence[int] | None = None,
                  progress: bool = False) -> dict[int, tuple[Tensor, Tensor]]:
    """{layer: (x, y)}: the MLP input/output pairs of several layers from one batched pass."""
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    hooks = [h for L in layers for h in (mlp_in_hook(L), mlp_out_hook(L))]
    device = next(model.parameters()).device
    acts = collect(model, ids, hooks, mask=mask, batch_size=256, out_device=device, progress=progress)
    return {L: (acts[mlp_in_hook(L)], acts[mlp_out_hook(L)]) for L in layers}


def middle_layer(model) -> int:
    """The layer the chapters study by default: ``(n_layers - 1) // 2``.

    Layer 1 of TinyWorld's 4 (the shipped SAEs' layer), layer 5 of gpt2-small's 12.
    """
    return (model.cfg.n_layers - 1) // 2


def word_end_mask(tokens) -> Bool[Tensor, "batch pos"]:
    """True at the last token of every word except ``<bos>``: where the whole word has been read.

    ``tokens`` is a `interplab.tinyworld.ModelTokens` (from ``tinyworld.tokens_for``). The
    kept positions, in row-major order (document by document, left to right), are one
    per word in the order of `tinyworld_latents`' rows, so ``acts[word_end_mask(t)]``
    lines up with the ground-truth labels on any tokenizer. With TinyWorld's own
    tokenizer (one token per word) it is every real token but ``<bos>``.
    """
    out = torch.zeros_like(tokens.mask, dtype=torch.bool)
    last = tokens.last[:, 1:]
    rows, words = (last >= 0).nonzero(as_tuple=True)
    out[rows, last[rows, words]] = True
    return out


def word_token_id(model, word: str) -> int:
    """The token a model predicts when the next word is ``word`` mid-sentence.

    TinyWorld: the word's own id. A subword tokenizer such as GPT-2's: the first token
    of ``" " + word`` (the space belongs to the word that follows it).
    """
    if tinyworld.is_tinyworld_tokenizer(model.tokenizer):
        return tinyworld.token_id(word)
    return int(model.tokenizer(" " + word, add_special_tokens=False)["input_ids"][0])
