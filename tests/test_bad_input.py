"""Bad input outside the grader gets an error that says what was wrong and how to fix it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import interplab
from interplab import models, tinyworld
from interplab.activation_store import StoreError, open_store, write_store
from interplab.grading import run
from interplab.weights import WEIGHTS_DIR, CorruptedFileError

HOOK = "blocks.1.hook_resid_post"


def test_bundled_model_without_its_checksum_list_is_refused(tmp_path, monkeypatch):
    bundled = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR / "tinyworld", bundled / "tinyworld")
    (bundled / "tinyworld" / "SHA256SUMS").unlink()
    weights = bundled / "tinyworld" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # a flipped byte that would otherwise load silently
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(models, "WEIGHTS_DIR", bundled)
    with pytest.raises(CorruptedFileError, match="SHA256SUMS is missing"):
        models.load_folder(bundled / "tinyworld")


def test_empty_model_name_is_not_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("", "  "):
        with pytest.raises(ValueError, match="empty model name.*'tinyworld'"):
            interplab.load_model(name)


@pytest.fixture(scope="module")
def small_store(model, tmp_path_factory):
    ids, mask = tinyworld.batch_tokens(tinyworld.generate(6, seed=0))
    return write_store(tmp_path_factory.mktemp("s") / "st", model, ids, HOOK, mask=mask, progress=False).path


def _with_header(src, tmp_path, edit):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    header = json.loads((dst / "header.json").read_text())
    edit(header)
    (dst / "header.json").write_text(json.dumps(header))
    return dst


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda h: h["hooks"][HOOK].pop("file"), "not a file name inside the store"),
        (lambda h: h["hooks"][HOOK].update(file="../x"), "never reads outside its own folder"),
        (lambda h: h["hooks"][HOOK].update(shape="wide"), "not \\[rows, width\\]"),
        (lambda h: h["hooks"].update({HOOK: 3}), "is not an object"),
        (lambda h: h.update(hooks=[]), "lists no hooks"),
        (lambda h: h.update(rows="many"), "not a number"),
    ],
)
def test_malformed_store_header_gets_the_stores_own_error(small_store, tmp_path, edit, words):
    bad = _with_header(small_store, tmp_path, edit)
    with pytest.raises(StoreError, match=words) as e:
        open_store(bad)
    assert "write it again" in str(e.value)


def test_header_file_outside_the_store_is_never_opened(small_store, tmp_path):
    secret = tmp_path / "x"
    secret.write_bytes(b"\0" * 10_000)
    bad = _with_header(small_store, tmp_path, lambda h: h["hooks"][HOOK].update(file="../x"))
    with pytest.raises(StoreError, match="outside"):
        open_store(bad, verify=False)


def test_check_says_what_it_was_given():
    with pytest.raises(TypeError, match="needs the function you wrote, got int 5"):
        interplab.check(5)
    with pytest.raises(TypeError, match=r"not its name: write check\(per_token_loss\)"):
        interplab.check("per_token_loss")
    with pytest.raises(TypeError, match="no name of its own"):
        interplab.check(lambda z, h: z)
    with pytest.raises(TypeError, match=r"first argument .*got None.*run\('per_token_loss', my_function\)"):
        run(None, lambda x: x)


def test_check_applies_the_plain_value_rule(capsys):
    class Always(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            return torch.tensor(True)

    def ablate_head(z, head):
        return z.as_subclass(Always)

    used = interplab.check(ablate_head)
    out = capsys.readouterr().out
    assert used is not ablate_head and "subclass of torch.Tensor" in out
    r = run("ablate_head", ablate_head)
    assert r.kind == "wrong_type" and r.n_passed == 0
