"""Offline stand-ins for pretrained models, so the real-model route is tested without a hub.

Every chapter has one setting, ``MODEL_NAME``, that switches it from the bundled
TinyWorld model to a pretrained TransformerLens model such as "gpt2-small". CI and
many learners' machines cannot download gpt2-small, yet the code paths it takes
(a byte-level BPE tokenizer, names that may split into several tokens, 12 layers
instead of 4, no TinyWorld annotations) must not rot. A *stand-in* is a small,
randomly initialised model of GPT-2's architecture with a GPT-2-style byte-level BPE
tokenizer trained here, from local text, in well under a second. Its outputs are
meaningless; what it checks is that a chapter runs end to end on a model that is not
TinyWorld.

Stand-ins are used only when asked for:

    INTERPLAB_STANDIN=1     ->  load_model("gpt2-small") returns a small stand-in (with a warning)
    INTERPLAB_STANDIN=full  ->  a stand-in with gpt2-small's real sizes (12 layers, d_model 768,
                                50257-token unembedding), for measuring memory and time

The tests set this variable; a learner never needs to.
"""

from __future__ import annotations

import functools
import os
import warnings

STANDIN_ENV = "INTERPLAB_STANDIN"
BOS = "<|endoftext|>"  # GPT-2's only special token: beginning, end and padding


def standin_requested() -> bool:
    """Whether INTERPLAB_STANDIN asks for offline stand-ins instead of hub downloads."""
    return os.environ.get(STANDIN_ENV, "0") not in ("", "0")


def _corpus() -> list[str]:
    """Local training text for the tokenizer: TinyWorld documents plus the words of its vocabulary, capitalised and not."""
    from . import tinyworld  # lazy: only the stand-in route needs the corpus

    docs = [" ".join(t for t in d.tokens if t != "<bos>") for d in tinyworld.generate(600, seed=0)]
    words = [w for w in tinyworld.vocabulary() if w.isalpha()]
    return docs + [" ".join(words), " ".join(w.capitalize() for w in words)]


@functools.lru_cache(maxsize=None)
def _tokenizer_object(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def standin_tokenizer(vocab_size: int = 700):
    """A GPT-2-style byte-level BPE tokenizer (``<|endoftext|>`` as BOS, EOS and padding), trained locally.

    The vocabulary is small on purpose: many TinyWorld words, and some names, split into
    several tokens, as many words do under GPT-2's tokenizer.
    """
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=_tokenizer_object(vocab_size), bos_token=BOS, eos_token=BOS,
                                  pad_token=BOS, unk_token=BOS, add_bos_token=True)
    tok.init_kwargs["name_or_path"] = "interplab-standin"
    return tok


def standin_model(name: str = "gpt2-small", device: str | None = None, *, n_layers: int = 3, d_model: int = 64,
                  n_heads: int = 4, n_ctx: int = 256, d_vocab: int | None = None, seed: int = 0):
    """A randomly initialised HookedTransformer of GPT-2's architecture, processed like ``from_pretrained`` does.

    ``cfg.model_name`` is ``name``, so code that branches on the model name takes the
    same branch it would take with the real model. ``d_vocab`` larger than the
    tokenizer's vocabulary gives unembedding rows no token maps to (for realistic sizes).
    """
    import contextlib
    import io

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from .models import best_device, quiet_transformer_lens  # here, not at the top: models imports this module

    tokenizer = standin_tokenizer()
    cfg = HookedTransformerConfig(
        model_name=name, n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads,
        d_mlp=4 * d_model, n_ctx=n_ctx, d_vocab=max(d_vocab or 0, len(tokenizer)), act_fn="gelu_new", normalization_type="LN",
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel", default_prepend_bos=True,
        seed=seed, device="cpu", init_weights=True,
    )
    with quiet_transformer_lens():
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
        model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    model.eval()
    with contextlib.redirect_stdout(io.StringIO()):
        return model.to(device or best_device())


GPT2_SMALL_SIZES = dict(n_layers=12, d_model=768, n_heads=12, n_ctx=1024, d_vocab=50257)


def load_standin(name: str, device: str | None = None):
    """What ``load_model(name)`` returns for a pretrained name when INTERPLAB_STANDIN is set."""
    full = os.environ.get(STANDIN_ENV, "").lower() == "full"
    warnings.warn(
        f"{STANDIN_ENV} is set: {name!r} is an offline stand-in (a small, randomly initialised model of GPT-2's "
        f"architecture with a locally trained tokenizer), not the real {name!r}. It tests that code runs, not what "
        f"it finds. Unset {STANDIN_ENV} to load the real model from the hub.",
        stacklevel=3,
    )
    return standin_model(name, device, **(GPT2_SMALL_SIZES if full else {}))
