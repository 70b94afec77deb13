"""The real-model route, offline: every chapter runs with MODEL_NAME = "gpt2-small".

No hub is reachable here, so ``INTERPLAB_STANDIN=1`` makes ``load_model("gpt2-small")``
return a stand-in: a small, randomly initialised model of GPT-2's architecture with a
locally trained byte-level BPE tokenizer (see ``interplab.standin``). It has a different
layer count from TinyWorld, a tokenizer that splits words, and no TinyWorld annotations,
so a chapter that hard-codes anything about TinyWorld outside its TinyWorld-only
sections fails here.
"""

import re
import warnings

import pytest
from test_notebooks import CHAPTERS, IDS, _execute

MODEL_LINE = re.compile(r'^MODEL_NAME = "tinyworld"', re.M)


@pytest.fixture
def standin_env(monkeypatch):
    monkeypatch.setenv("INTERPLAB_STANDIN", "1")


def test_standin_is_gpt2_shaped_and_offline(standin_env):
    import interplab

    with pytest.warns(UserWarning, match="offline stand-in"):
        model = interplab.load_model("gpt2-small")
    assert model.cfg.model_name == "gpt2-small"
    assert model.cfg.original_architecture == "GPT2LMHeadModel"
    assert model.cfg.n_layers != interplab.load_model("tinyworld").cfg.n_layers
    assert model.tokenizer.bos_token == "<|endoftext|>"
    # a byte-level BPE: leading-space tokens, and some words split into pieces
    assert model.to_str_tokens(" where is Pia ?", prepend_bos=False)[0].startswith(" ")
    assert len(model.to_str_tokens(" Quentin bought an umbrella", prepend_bos=False)) > 4
    logits = model(model.to_tokens(["a b c", "d"]))
    assert logits.shape[-1] == model.cfg.d_vocab and logits.isfinite().all()


def test_without_the_flag_a_pretrained_name_still_needs_the_hub(monkeypatch):
    import interplab
    from interplab.models import ModelUnavailableError

    monkeypatch.delenv("INTERPLAB_STANDIN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError):
        interplab.load_model("gpt2-small")


def test_unknown_names_are_refused_even_with_the_flag(standin_env):
    import interplab

    with pytest.raises(ValueError, match="Unknown model name"):
        interplab.load_model("gpt9-enormous")


@pytest.mark.parametrize("path", CHAPTERS, ids=IDS)
def test_every_chapter_has_one_model_setting(path):
    source = "\n".join(
        "".join(c["source"]) for c in __import__("nbformat").read(path, as_version=4).cells if c.cell_type == "code"
    )
    assert len(MODEL_LINE.findall(source)) == 1, f'{path.name} needs exactly one line MODEL_NAME = "tinyworld"'


@pytest.mark.notebooks
@pytest.mark.parametrize("path", CHAPTERS, ids=IDS)
def test_chapter_runs_on_a_gpt2_shaped_model(path, tmp_path, standin_env):
    """As shipped, with MODEL_NAME = "gpt2-small": runs to the end, and says which parts need TinyWorld."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.source = MODEL_LINE.sub('MODEL_NAME = "gpt2-small"', cell.source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = _execute(nb, tmp_path, strict=False)
    assert "gpt2-small" in out
    assert "needs TinyWorld" in out, "the TinyWorld-only sections should say they were skipped"
