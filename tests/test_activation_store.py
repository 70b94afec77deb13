"""The on-disk activation store: exact round trip, bounded memory while writing, training from the
memory map, clear errors on damaged stores, and the SAELens hand-off configuration."""

import json

import numpy as np
import pytest
import torch

from interplab import tinyworld
from interplab.activation_store import (
    StoreError,
    main,
    open_store,
    saelens_config,
    tinyworld_chunks,
    write_mlp_pairs,
    write_store,
)
from interplab.activations import collect
from interplab.dictionaries import SAEConfig, TranscoderConfig, train_dictionary, train_transcoder
from interplab.dictionaries.data import mlp_io_pairs

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def batch():
    ids, mask = tinyworld.batch_tokens(tinyworld.generate(40, seed=0))
    return ids, mask


@pytest.fixture(scope="module")
def store(model, batch, tmp_path_factory):
    ids, mask = batch
    return write_store(
        tmp_path_factory.mktemp("store") / "resid",
        model,
        ids,
        [HOOK, "blocks.0.hook_resid_pre"],
        mask=mask,
        batch_size=16,
        progress=False,
    )


def test_round_trip_equals_collect(model, batch, store):
    ids, mask = batch
    ref = collect(model, ids, [HOOK, "blocks.0.hook_resid_pre"], mask=mask, batch_size=16, progress=False)
    for hook in ref:
        got = store[hook]
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
        assert isinstance(store.array(hook), np.memmap) and got.data_ptr() == store.array(hook).ctypes.data
        assert torch.equal(got, ref[hook])
    header = json.loads((store.path / "header.json").read_text())
    assert header["rows"] == int(mask.sum()) == len(store)
    assert header["hooks"][HOOK]["shape"] == [int(mask.sum()), model.cfg.d_model]
    assert header["model"] and header["dtype"] == "float32"
    store.verify()


def test_writer_flushes_each_batch_before_the_next(model, batch, tmp_path):
    """The writer holds one batch at a time: when chunk i is produced, chunk i-1 is already on disk."""
    ids, mask = batch
    path = tmp_path / "s"
    seen, expected = [], [0]

    def chunks():
        for start in range(0, len(ids), 10):
            f = path / f"{HOOK}.f32"
            seen.append(f.stat().st_size if f.exists() else 0)
            m = mask[start : start + 10]
            yield ids[start : start + 10], m
            expected.append(expected[-1] + int(m.sum()) * model.cfg.d_model * 4)

    store = write_store(path, model, chunks(), HOOK, batch_size=4, progress=False)
    assert seen == expected[:-1] and len(seen) == 4
    assert torch.equal(store[HOOK], collect(model, ids, HOOK, mask=mask, progress=False)[HOOK])


def test_refuses_to_overwrite_and_damaged_stores(model, batch, store, tmp_path):
    ids, mask = batch
    with pytest.raises(FileExistsError):
        write_store(store.path, model, ids, HOOK, mask=mask, progress=False)
    # truncated
    path = tmp_path / "t"
    s = write_store(path, model, ids[:8], HOOK, mask=mask[:8], progress=False)
    f = path / s.header["hooks"][HOOK]["file"]
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(StoreError, match="truncated"):
        open_store(path)
    # corrupt (same size, different bytes)
    data = bytearray(f.read_bytes() + b"\0" * 8)
    data[100] ^= 0xFF
    f.write_bytes(bytes(data))
    open_store(path, verify=False)  # the size is right...
    with pytest.raises(StoreError, match="corrupt"):
        open_store(path, verify=True)
    with pytest.raises(StoreError, match="corrupt"):  # ...and the default, cheap check sees the flipped byte
        open_store(path)
    # interrupted (no header)
    (path / "header.json").unlink()
    with pytest.raises(StoreError, match="interrupted"):
        open_store(path)


def test_memory_map_is_copy_on_write(store):
    x = store[HOOK]
    before = (store.path / store.header["hooks"][HOOK]["file"]).read_bytes()[:4]
    x[0, 0] += 1.0
    assert (store.path / store.header["hooks"][HOOK]["file"]).read_bytes()[:4] == before


def test_train_sae_from_a_memory_mapped_store(model, store):
    acts = open_store(store.path)[HOOK]
    cfg = SAEConfig(d_in=model.cfg.d_model, d_sae=64, architecture="topk", k=4)
    sae = train_dictionary(acts, cfg, steps=5, batch_size=64, progress=False)
    assert sae.info["steps"] == 5 and torch.isfinite(sae(acts[:10])).all()


def test_train_transcoder_from_mlp_pairs(model, tmp_path):
    chunks = list(tinyworld_chunks(24, seed=3, split="train", docs_per_chunk=8))
    store = write_mlp_pairs(tmp_path / "mlp0", model, iter(chunks), layer=0, progress=False)
    x, y = store.pair(0)
    ids, mask = chunks[0]
    ref_x, ref_y = mlp_io_pairs(model, ids, 0, mask)
    assert torch.allclose(x[: len(ref_x)], ref_x, atol=1e-5) and torch.allclose(y[: len(ref_y)], ref_y, atol=1e-5)
    tc = train_transcoder(
        x, y, TranscoderConfig(d_in=model.cfg.d_model, d_sae=64, k=4), steps=5, batch_size=64, progress=False
    )
    assert tc.info["steps"] == 5


@pytest.mark.parametrize("arch", ["standard", "topk", "batchtopk"])
def test_saelens_config_matches_train_sae_settings(arch):
    from sae_lens import LanguageModelSAERunnerConfig

    cfg = SAEConfig(d_in=128, d_sae=768, architecture=arch, k=16, l1_coeff=8.0)
    out = saelens_config(cfg, steps=1200, batch_size=1024, lr=2e-3, seed=0)
    assert isinstance(out, LanguageModelSAERunnerConfig)
    assert out.sae.architecture() == arch
    assert (out.sae.d_in, out.sae.d_sae) == (128, 768)
    assert out.sae.apply_b_dec_to_input is True
    if arch == "standard":
        assert out.sae.l1_coefficient == 8.0
    else:
        assert out.sae.k == 16
    assert out.training_tokens == 1200 * 1024 and out.train_batch_size_tokens == 1024
    assert out.total_training_steps == 1200
    assert out.lr == 2e-3 and out.lr_scheduler_name == "constant" and out.lr_warm_up_steps == 0
    assert out.lr_decay_steps == 240  # the last 20% of the steps, as in train_sae
    assert out.hook_name == HOOK and out.model_name == "tinyworld"
    assert out.logger.log_to_wandb is False
    # the learning rate schedule SAELens builds from it is train_sae's
    from sae_lens.training.optim import get_lr_scheduler

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=out.lr)
    sched = get_lr_scheduler(
        out.lr_scheduler_name,
        opt,
        out.total_training_steps,
        out.lr,
        out.lr_warm_up_steps,
        out.lr_decay_steps,
        out.lr_end,
        out.n_restart_cycles,
    )
    lrs = []
    for _ in range(out.total_training_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [2e-3 * min(1.0, (1200 - s) / 240) for s in range(1200)]
    assert np.allclose(lrs, ours, rtol=1e-5, atol=1e-9)
    # and it round-trips through SAELens's own dict form
    again = LanguageModelSAERunnerConfig.from_dict(json.loads(json.dumps(out.to_dict(), default=str)))
    assert again.sae.d_sae == 768 and again.lr_decay_steps == 240


def test_saelens_config_refuses_transcoders():
    cfg = TranscoderConfig(d_in=128, d_sae=64, architecture="topk", k=4, layer=0)
    with pytest.raises(NotImplementedError, match="transcoders"):
        saelens_config(cfg, steps=10, batch_size=8, lr=1e-3)


def test_saelens_config_command(tmp_path, capsys):
    out = tmp_path / "cfg.json"
    assert (
        main(
            [
                "saelens-config",
                "--architecture",
                "batchtopk",
                "--d-in",
                "128",
                "--d-sae",
                "512",
                "-k",
                "8",
                "--steps",
                "100",
                "--batch-size",
                "256",
                "--lr",
                "1e-3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    d = json.loads(out.read_text())
    assert d["sae"]["architecture"] == "batchtopk" and d["sae"]["k"] == 8 and d["sae"]["d_sae"] == 512
    assert d["training_tokens"] == 25_600 and d["train_batch_size_tokens"] == 256 and d["lr_decay_steps"] == 20


def test_tinyworld_token_dataset_for_saelens():
    from interplab.activation_store import tinyworld_token_dataset

    ds = tinyworld_token_dataset(30, context_size=32, seed=0)
    rows = ds["input_ids"]
    assert len(rows) > 0 and all(len(r) == 32 for r in rows)
    assert rows[0][0] == tinyworld.token_id("<bos>")
