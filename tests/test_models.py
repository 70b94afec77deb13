"""load_model: the bundled model, its checksums, and the errors a learner can meet."""

import shutil

import pytest
import torch

import interplab
from interplab.models import ModelUnavailableError, load_folder
from interplab.weights import WEIGHTS_DIR, CorruptedFileError, verify

BUNDLED = WEIGHTS_DIR / "tinyworld"


def test_bundled_files_verify():
    assert verify(BUNDLED) and all(v == "ok" for v in verify(BUNDLED).values())


def test_bundled_weights_are_small():
    assert sum(p.stat().st_size for p in BUNDLED.glob("*.safetensors")) <= 20e6


def test_load_model_returns_a_hooked_transformer(model):
    from transformer_lens import HookedTransformer

    assert isinstance(model, HookedTransformer)
    assert 2 <= model.cfg.n_layers <= 4
    assert model.cfg.d_vocab == len(interplab.tinyworld.vocabulary())
    assert model.to_str_tokens("Alice is in the kitchen")[0] == "<bos>"


def test_hooked_model_matches_the_hugging_face_model(model):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(BUNDLED, local_files_only=True)
    ids = model.to_tokens("when Alice and Bob went to the park , Bob gave a ball to")
    ours = model(ids).log_softmax(-1)
    theirs = hf(ids).logits.log_softmax(-1)
    assert torch.allclose(ours, theirs, atol=1e-4)


def _copy(tmp_path):
    folder = tmp_path / "tinyworld"
    shutil.copytree(BUNDLED, folder)
    return folder


def test_truncated_weights_give_a_clear_error(tmp_path):
    folder = _copy(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CorruptedFileError) as e:
        load_folder(folder)
    msg = str(e.value)
    assert "model.safetensors" in msg and "corrupted or truncated" in msg and "Restore" in msg


def test_flipped_byte_is_caught(tmp_path):
    folder = _copy(tmp_path)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptedFileError, match="model.safetensors"):
        load_folder(folder)


def test_missing_file_gives_a_clear_error(tmp_path):
    folder = _copy(tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CorruptedFileError, match=r"tokenizer.json is missing"):
        load_folder(folder)


def test_unknown_model_name_lists_known_ones():
    with pytest.raises(ValueError) as e:
        interplab.load_model("tinyworlds-xl")
    assert "'tinyworld'" in str(e.value) and "gpt2-small" in str(e.value)


def test_pretrained_model_without_a_hub_explains_the_offline_default(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(ModelUnavailableError) as e:
        interplab.load_model("gpt2-small")
    assert "cannot be reached" in str(e.value) and "load_model('tinyworld')" in str(e.value)


def test_pretrained_model_with_offline_flag_and_empty_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelUnavailableError, match="not in the local Hugging Face cache"):
        interplab.load_model("gpt2-small")
