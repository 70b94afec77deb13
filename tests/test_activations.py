"""Activation collection matches run_with_cache and keeps memory bounded."""

import pytest
import torch

from interplab import tinyworld
from interplab.activations import collect, iter_activations


@pytest.fixture(scope="module")
def batch():
    return tinyworld.batch_tokens(tinyworld.generate(40, seed=0))


def test_collect_equals_run_with_cache(model, batch):
    ids, _ = batch
    hooks = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern"]
    acts = collect(model, ids, hooks, batch_size=16, progress=False)
    _, cache = model.run_with_cache(ids)
    for h in hooks:
        assert torch.allclose(acts[h], cache[h], atol=1e-5)


def test_mask_keeps_only_chosen_positions(model, batch):
    ids, mask = batch
    acts = collect(model, ids, "blocks.1.hook_resid_post", mask=mask, batch_size=7, progress=False)
    _, cache = model.run_with_cache(ids)
    assert torch.allclose(acts["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_post"][mask], atol=1e-5)


def test_streaming_yields_batches(model, batch):
    ids, mask = batch
    sizes = [
        out["hook_embed"].shape[0] for out in iter_activations(model, ids, "hook_embed", batch_size=16, progress=False)
    ]
    assert sizes == [16, 16, 8]


def test_memory_limit_refuses_before_running(model, batch):
    ids, _ = batch
    with pytest.raises(MemoryError, match="iter_activations"):
        collect(model, ids, "blocks.0.hook_resid_post", max_gb=1e-6, progress=False)


def test_bad_input_is_explained(model, batch):
    ids, _ = batch
    with pytest.raises(KeyError, match="not a hook point"):
        collect(model, ids, "blocks.0.resid_post", progress=False)
    with pytest.raises(ValueError, match=r"\[n_seq, pos\]"):
        collect(model, ids[0], "hook_embed", progress=False)
