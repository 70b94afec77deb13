"""TinyWorld: a synthetic language whose hidden state is known.

    >>> from interplab import tinyworld
    >>> docs = tinyworld.generate(100, seed=0)            # annotated documents
    >>> ids, mask = tinyworld.batch_tokens(docs)          # [batch, pos] token ids
    >>> tinyworld.WORLD.value("Alice", "city")            # the ground truth    # doctest: +SKIP

See `generator` for the families and the per-token annotations, `language` for the
vocabulary and the fixed world, `train` and `evaluate` for the bundled model.
"""

from .generator import FAMILIES, SPLITS, Doc, generate
from .language import (
    CAST, CITIES, HELDOUT_IOI_NAMES, IOI_TEMPLATES, IOI_TRAIN_NAMES, JOBS, NAMES, PETS, RELATIONS,
    ROOMS, WORLD, World, vocabulary,
)
from .tokenizer import ModelTokens, batch_tokens, encode, hf_tokenizer, is_tinyworld_tokenizer, token_id, tokens_for

__all__ = [
    "FAMILIES", "SPLITS", "Doc", "generate", "CAST", "CITIES", "HELDOUT_IOI_NAMES", "IOI_TEMPLATES",
    "IOI_TRAIN_NAMES", "JOBS", "NAMES", "PETS", "RELATIONS", "ROOMS", "WORLD", "World", "vocabulary",
    "batch_tokens", "encode", "hf_tokenizer", "token_id", "evaluate", "ModelTokens", "tokens_for",
    "is_tinyworld_tokenizer",
]


def evaluate(model, n: int = 1000, seed: int = 0) -> dict[str, float]:
    """Capability figures of a model on fresh documents; see `interplab.tinyworld.evaluate`."""
    from .evaluate import evaluate as _evaluate  # lazy: the language imports without torch or the model loader

    return _evaluate(model, n=n, seed=seed)
