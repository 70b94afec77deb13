"""Chapter 4's findings on the bundled model, and the library pieces they rest on.

- k-sparse probes over the shipped TopK SAE's features against the dense probe on the same
  features and splits, per kind of latent (section 5 of the chapter);
- the planted spurious cue: a probe trained where a name gives the label away fails on a fair
  test split, and the sparse probe's features are the two names' features;
- the pieces: the library's `sparse_probe` passes the exercise, features chosen on training tokens,
  the mean-only baseline, per-prediction losses, the AuxK loss, the positives an AUROC needs.
"""

from __future__ import annotations

import pytest
import torch

from interplab import tinyworld
from interplab.dictionaries import SAEConfig, data, latents, metrics, probing, training
from interplab.dictionaries.shipped import load_sae
from interplab.grading import run as grade

KS = (1, 2, 4, 8, 16)


def _dataset(model, n_docs: int, seed: int, split: str):
    """(docs sorted by length, activations at the SAEs' hook of every SAE position, in document order)."""
    docs = sorted(tinyworld.generate(n_docs, seed=seed, split=split), key=len)
    ids, mask = tinyworld.batch_tokens(docs)
    return docs, data.collect_acts(model, ids, data.sae_token_mask(ids, mask))


@pytest.fixture(scope="module")
def splits(model):
    train_docs, train_acts = _dataset(model, 1200, 0, "train")
    test_docs, test_acts = _dataset(model, 300, 1, "test")
    sae = load_sae("topk")
    with torch.no_grad():
        return {
            "train_docs": train_docs,
            "test_docs": test_docs,
            "train_acts": train_acts,
            "test_acts": test_acts,
            "f_train": sae.encode(train_acts),
            "f_test": sae.encode(test_acts),
        }


PROBED = [
    "family:ioi",
    "family:rooms",
    "entity:Alice",
    "room:kitchen",
    "room:garden",
    "room:library",
    "sentiment:positive",
    "truth:true",
    "induction:repeat",
]


@pytest.fixture(scope="module")
def probe_table(splits):
    """{latent: {probe: held-out AUROC}} for the k-sparse probes, the dense probe on features, and on the residual."""
    train_tasks, test_tasks = probing.probe_tasks(splits["train_docs"]), probing.probe_tasks(splits["test_docs"])
    train_doc = probing.document_index(splits["train_docs"])
    out = {}
    for latent in PROBED:
        rows, y = train_tasks[latent]
        if latent.split(":")[0] in ("family", "entity"):
            rows = rows & (train_doc % 3 == 0)  # as the chapter: a third of the training documents
        test_rows, test_y = test_tasks[latent]
        aucs = probing.compare_probes(
            splits["f_train"][rows], y[rows], splits["f_test"][test_rows], test_y[test_rows], KS
        )
        w, b = probing.dense_probe(splits["train_acts"][rows], y[rows])
        aucs["residual"] = probing.auroc(splits["test_acts"][test_rows] @ w + b, test_y[test_rows])
        out[latent] = aucs
    return out


@pytest.mark.slow
def test_family_is_kept_but_spread_over_many_features(probe_table):
    """Which family a document belongs to: the dense probe on the features reads it almost perfectly, few features do not."""
    for latent in ("family:ioi", "family:rooms"):
        aucs = probe_table[latent]
        assert aucs["dense"] > 0.98, aucs
        assert aucs["k=1"] < 0.75, aucs
        assert aucs["dense"] - aucs["k=16"] > 0.02, aucs


@pytest.mark.slow
def test_sentiment_is_kept_but_spread(probe_table):
    """A review's sentiment: all features together read it as well as the residual stream, 16 features far less."""
    aucs = probe_table["sentiment:positive"]
    assert abs(aucs["dense"] - aucs["residual"]) < 0.05, aucs
    assert aucs["dense"] - aucs["k=16"] > 0.08, aucs


@pytest.mark.slow
def test_room_identity_is_partly_lost_by_the_features(probe_table):
    """Which room the asked person is in: even the dense probe on features falls well short of the residual stream."""
    for latent in ("room:kitchen", "room:garden", "room:library"):
        aucs = probe_table[latent]
        assert aucs["residual"] - aucs["dense"] > 0.08, (latent, aucs)


@pytest.mark.slow
def test_truth_k_sparse_matches_dense_but_both_trail_the_residual(probe_table):
    aucs = probe_table["truth:true"]
    assert aucs["k=8"] > aucs["dense"] - 0.03, aucs
    assert aucs["residual"] - aucs["dense"] > 0.04, aucs


@pytest.mark.slow
def test_names_and_induction_live_in_few_features(probe_table):
    assert probe_table["induction:repeat"]["k=2"] > 0.98, probe_table["induction:repeat"]
    assert probe_table["entity:Alice"]["k=1"] > 0.8, probe_table["entity:Alice"]
    assert probe_table["entity:Alice"]["dense"] - probe_table["entity:Alice"]["k=1"] < 0.15


def _signed_acts(model, docs):
    ids, mask = tinyworld.batch_tokens(docs)
    last = torch.zeros_like(mask)
    last[torch.arange(len(docs)), mask.sum(1) - 1] = True
    return data.collect_acts(model, ids, last)


@pytest.mark.slow
def test_the_sparse_probe_reveals_the_planted_cue(model, splits):
    cue = ("Alice", "Bob")
    train_docs, y, signers = probing.cued_reviews(2000, seed=0, cue=cue)
    assert all((s == "Alice") == bool(label) for s, label in zip(signers, y))
    fair_docs, fair_y, _ = probing.cued_reviews(2000, seed=2, cue=None, names=cue)
    test_docs, test_y, test_signers = probing.cued_reviews(1000, seed=1, cue=None, names=cue)
    assert 0.4 < sum(s == "Alice" for s in test_signers) / len(test_signers) < 0.6
    x, x_fair, x_test = (_signed_acts(model, d) for d in (train_docs, fair_docs, test_docs))

    def accuracy(w, b):
        return float(((x_test @ w + b > 0) == test_y).float().mean())

    cued, fair = accuracy(*probing.dense_probe(x, y)), accuracy(*probing.dense_probe(x_fair, fair_y))
    assert cued < 0.65, "the dense probe trained on the cued split should have learned the name, not the sentiment"
    assert fair > 0.9, "the same probe trained on a fair split reads the sentiment"
    sae = load_sae("topk")
    with torch.no_grad():
        f = sae.encode(x)
    features, _, _ = probing.sparse_probe(f, y, 2)
    # the two names' own features, as the chapter's recovery table finds them (chosen on training tokens)
    names, labels = latents.tinyworld_latents(splits["train_docs"], min_count=1)
    name_features = {
        int(latents.feature_aurocs(splits["f_train"], labels[:, names.index(f"entity:{n}")]).argmax()) for n in cue
    }
    assert set(features.tolist()) == name_features


# --- the pieces ------------------------------------------------------------------------------------------


def test_library_sparse_probe_passes_the_exercise():
    report = grade("sparse_probe", probing.sparse_probe)
    assert report.passed, report.summary()


def test_sparse_probe_refuses_bad_input():
    x = torch.rand(10, 4)
    with pytest.raises(ValueError, match="both classes"):
        probing.sparse_probe(x, torch.ones(10, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="k must be"):
        probing.sparse_probe(x, torch.arange(10) % 2 == 0, 5)


def test_recovery_table_chooses_on_the_selection_tokens():
    """Feature 0 detects the latent on the training tokens, feature 1 only on the scored ones: the table keeps 0."""
    g = torch.Generator().manual_seed(0)
    y_train, y_test = torch.rand(200, generator=g) < 0.3, torch.rand(200, generator=g) < 0.3
    noise = torch.rand(200, 2, generator=g) * 0.1
    train = torch.stack([y_train.float(), torch.zeros(200)], 1) + noise
    test = torch.stack([torch.rand(200, generator=g), y_test.float()], 1) + noise
    rows = latents.recovery_table(test, y_test[:, None], ["x:y"], select_acts=train, select_labels=y_train[:, None])
    assert rows[0]["feature"] == 0
    assert rows[0]["auroc"] < 0.7  # and its score is the held-out one
    same = latents.recovery_table(test, y_test[:, None], ["x:y"])
    assert same[0]["feature"] == 1


def test_best_threshold_and_f1_at():
    scores = torch.tensor([3.0, 2.0, 2.0, 1.0, 0.0])
    labels = torch.tensor([True, True, False, True, False])
    t, f1 = latents.best_threshold(scores, labels)
    assert f1 == pytest.approx(latents.max_f1(scores, labels))
    assert latents.f1_at(scores, labels, t) == pytest.approx(f1)


def test_min_positives_meets_its_standard_error():
    n = probing.min_positives(0.9, 0.03, 20_000)
    assert probing.auroc_se(0.9, n, 20_000) <= 0.03 < probing.auroc_se(0.9, n - 1, 20_000)
    assert probing.auroc_se(0.9, 5, 20_000) > 0.08  # why 5 positives were too few


def test_wilson_interval_contains_the_rate():
    lo, hi = probing.wilson_interval(18, 71)
    assert lo < 18 / 71 < hi and 0 < lo and hi < 1


def test_mean_only_sae_reconstructs_the_mean():
    mean = torch.randn(6)
    sae = metrics.mean_only_sae(mean, "blocks.1.hook_resid_post")
    x = torch.randn(5, 6)
    assert torch.allclose(sae(x), mean.expand(5, 6))
    assert int((sae.encode(x) != 0).sum()) == 0


def test_prediction_losses_average_to_spliced_loss(model):
    docs, ids, mask = data.tinyworld_dataset(30, seed=3, split="test")
    sae = load_sae("topk")
    per = metrics.prediction_losses(model, sae, ids, mask)
    whole = metrics.spliced_loss(model, sae, ids, mask)
    assert per["ce_sae"].mean().item() == pytest.approx(whole["ce_sae"], rel=1e-5)
    assert per["kl_sae"].mean().item() == pytest.approx(whole["kl_sae"], rel=1e-4)
    assert set(per["doc"].tolist()) <= set(range(len(docs)))


def test_auxk_loss_trains_only_the_dead_features():
    cfg = SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2)
    sae = training.module_for(cfg, generator=torch.Generator().manual_seed(0))
    x = torch.randn(32, 8)
    dead = torch.zeros(16, dtype=torch.bool)
    assert training.auxk_loss(sae, x, x - sae(x), dead, 4).item() == 0.0
    dead[:5] = True
    loss = training.auxk_loss(sae, x, x - sae(x), dead, 4)
    loss.backward()
    assert loss.item() > 0
    assert sae.W_dec.grad[5:].abs().sum() == 0 and sae.W_dec.grad[:5].abs().sum() > 0
    assert sae.W_enc.grad[:, 5:].abs().sum() == 0


def test_train_dictionary_resample_and_auxk_options():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 8, generator=g)
    cfg = SAEConfig(d_in=8, d_sae=32, architecture="topk", k=2)
    plain = training.train_dictionary(x, cfg, steps=40, batch_size=64, dead_after=5, resample_every=10, progress=False)
    off = training.train_dictionary(
        x, cfg, steps=40, batch_size=64, dead_after=5, resample_every=10, progress=False, resample=False
    )
    aux = training.train_dictionary(
        x, cfg, steps=40, batch_size=64, dead_after=5, resample_every=10, progress=False, resample=False, aux_k=4
    )
    assert off.info["resampled"] == 0 and off.info["resample"] is False
    assert aux.info["aux_k"] == 4 and "final_aux_loss" in aux.info
    assert plain.info["resampled"] >= 0
    with pytest.raises(ValueError, match="aux_k"):
        training.train_dictionary(x, cfg, steps=1, progress=False, aux_k=99)
