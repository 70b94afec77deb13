"""Chapter 03 (superposition): the toy models' findings on fixed seeds, the toy-SAE recovery figure, the
bundled model's variables, and the library's own copies of the exercises."""

from __future__ import annotations

import math

import pytest
import torch

from interplab import superposition as sp
from interplab import tinyworld
from interplab.exercises import get, shared_model
from interplab.grading import run
from interplab.probes import bootstrap_ci, document_split, fit_probe, latent_examples, probe_logits, residual_dataset
from interplab.solutions import ch03_superposition as sol


@pytest.fixture(scope="module")
def toy():
    return sp.toy_findings()


@pytest.fixture(scope="module")
def replicas():
    return sp.replicate_findings(2, seed=1)


# --- the toy models reproduce the paper's qualitative results ------------------------------------------------


def test_phase_change_from_about_m_to_all_features(toy):
    represented = toy["represented"]  # n = 20, m = 5, sparsity from 0 to 0.999
    assert represented[0] <= 7, "dense features: about m = 5 features are kept"
    assert represented[-1] == 20 and represented[-2] == 20, "very sparse features: all 20 in 5 dimensions"
    assert all(b >= a - 1 for a, b in zip(represented, represented[1:])), "more features as sparsity grows"


def test_antipodal_pairs_at_high_sparsity(toy):
    pairs = toy["antipodal_pairs"]  # n = 6, m = 3, equal importance, probabilities 1, 0.3, 0.1, 0.03
    assert pairs[0] == 0, "dense: no pairs"
    assert pairs[1:] == [3, 3, 3], "sparse: the six features form three antipodal pairs"


def test_pentagon_and_dimensionality_plateaus(toy):
    assert all(abs(d - 0.4) < 0.05 for d in toy["pentagon_dims"]), "five features in a plane: D = 2/5 each"
    assert toy["plateau_fraction"] >= 0.9, "features of the sparse models sit on the fractional plateaus"


def test_relu_hidden_layer_makes_polysemantic_neurons(toy):
    poly = toy["polysemantic_neurons"]  # S = 0, 0.7, 0.9, 0.99; 5 neurons
    assert poly[-1] == 5 and poly[-2] == 5
    assert poly[0] < poly[-1]


def test_toy_sae_recovers_the_true_features_and_fails_where_expected(toy):
    score, recovered = toy["sae"]  # 40 latents, k = 2, features present 5 % of the time
    assert score > 0.99 and recovered == 20
    assert toy["sae_10_latents"][0] < 0.75, "too few latents: features must share latents"
    assert toy["sae_dense"][0] < 0.95 and toy["sae_dense"][1] < 16, "dense features: recovery drops"


def test_l1_sae_fails_at_both_ends_of_the_penalty(toy):
    """ReLU + L1 SAEs (40 latents) on the p = 0.05 toy model, L1 coefficient 0.01 -> 3."""
    rows = toy["sae_l1"]
    coeffs, scores, recovered, l0, dead = zip(*rows)
    assert list(coeffs) == sorted(coeffs)
    best = max(range(len(rows)), key=lambda i: scores[i])
    assert 0 < best < len(rows) - 1, "recovery peaks at an intermediate penalty"
    assert scores[best] > 0.95 and recovered[best] >= 19
    assert l0[0] > 8 and scores[0] < 0.85 and recovered[0] <= 3, "too little penalty: dense, entangled latents"
    assert l0[-1] < 0.1 and dead[-1] > 30 and scores[-1] < 0.85, "too much penalty: the latents die"
    assert all(b <= a for a, b in zip(l0, l0[1:])), "L0 falls as the penalty grows"


def test_toy_findings_hold_on_two_more_runs(replicas):
    """The qualitative results, on independent runs other than the chapter's seed 0."""
    for one in replicas:
        dense, sparse = one["represented (S = 0, S = 0.999)"]
        assert dense <= 7 and sparse == 20
        assert one["antipodal pairs (dense, S = 0.97)"] == [0, 3]
        assert one["plateau fraction"] >= 0.9
        poly_dense, poly_sparse = one["polysemantic neurons (S = 0, S = 0.99)"]
        assert poly_sparse == 5 and poly_dense < poly_sparse
        score, recovered = one["SAE recovery (score, recovered)"]
        assert score > 0.99 and recovered == 20


# --- the library's copies agree with the exercises -----------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["sparse_features", "toy_forward", "importance_loss", "feature_dimensionality", "recovery_score"]
)
def test_library_copy_passes_the_exercise(name):
    assert run(name, getattr(sp, name)).passed


def test_library_trainer_is_the_exercise_s_trainer():
    p, imp = torch.tensor([0.5, 0.05]), sp.geometric_importance(5, 0.7)
    a = sp.train_toy_models(5, 2, p, imp, steps=50, batch_size=64, seed=3)
    b = sol.train_toy_models(5, 2, p, imp, steps=50, batch_size=64, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert run("train_toy_models", sp.train_toy_models).passed
    assert get("train_toy_models").reference is sol.train_toy_models


# --- library unit tests --------------------------------------------------------------------------------------


def test_geometry_measures_on_known_shapes():
    angles = torch.arange(5) * 2 * math.pi / 5
    pentagon = torch.stack([torch.cos(angles), torch.sin(angles)])
    assert torch.allclose(sp.feature_dimensionality(pentagon), torch.full((5,), 0.4), atol=1e-5)
    assert sp.antipodal_pairs(torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]])) == [(0, 1)]
    assert sp.near_plateau(torch.tensor([0.5, 0.41, 0.9, 0.0])).tolist() == [True, True, False, False]
    assert sp.n_represented(torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.1, 0.9]])) == 2
    assert sp.polysemantic_neurons(torch.tensor([[0.9, 0.8, -1.0], [0.0, 0.2, 1.0]])).tolist() == [2, 1]


def test_subspace_measures():
    e = torch.eye(6)
    assert sp.subspace_overlap(e[:, :2], e[:, 2:4]) < 1e-6
    assert abs(sp.subspace_overlap(e[:, :2], e[:, 1:3]) - 1.0) < 1e-6
    pr, n90 = sp.effective_dim(torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0])))
    assert abs(pr - 3.0) < 1e-6 and n90 == 3
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    means = sp.class_mean_subspace(x, torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(means, torch.tensor([[1.0, -1.5], [-1.0, 1.5]]))
    base = sp.random_subspace_overlap(100, 1, 1, n=50)
    assert 0 < float(base.mean()) < 0.3


def test_toy_sae_and_recovery_on_planted_directions():
    g = torch.Generator().manual_seed(0)
    W = torch.nn.functional.normalize(torch.randn(3, 6, generator=g), dim=0)
    h, x = sp.hidden_activations(W, 0.1, n=4096, seed=0)
    assert torch.allclose(h, x @ W.T)
    sae = sp.train_toy_sae(h, 12, k=1, steps=600, seed=0)
    score, recovered = sp.recovery_score(W.T, sae["W_dec"])
    assert score > 0.95 and recovered >= 5


# --- the bundled model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def variables():
    model = shared_model()
    docs = tinyworld.generate(2400, seed=3, split="train")
    out = {}
    for latent, where in (("room", "question"), ("sentiment", "review end")):
        ex = latent_examples(docs, latent, where)
        if latent == "room":
            keep = ex["doc"] < 1200
            ex = {k: v[keep] for k, v in ex.items()}
        acts = residual_dataset(model, docs, ex["doc"], ex["position"])[3]
        out[latent] = (acts, ex["label"], ex["doc"])
        if latent == "room":
            out["person"] = (acts, ex["group"], ex["doc"])
    ex = sp.city_examples(docs)
    out["city"] = (residual_dataset(model, docs, ex["doc"], ex["position"])[3], ex["label"], ex["doc"])
    return out


def test_city_examples_sit_before_the_city():
    docs = tinyworld.generate(200, seed=0, split="train")
    ex = sp.city_examples(docs)
    assert len(ex["doc"]) > 20
    for d, pos, label, person in zip(*(ex[k].tolist() for k in ("doc", "position", "label", "group"))):
        tokens = docs[d].tokens
        assert tokens[pos] in ("in", "?") and tokens[pos + 1] == tinyworld.CITIES[label]
        assert tinyworld.WORLD.value(tinyworld.NAMES[person], "city") == tinyworld.CITIES[label]


def test_the_recalled_city_is_read_linearly(variables):
    lin, mlp = _accuracies(*variables["city"])
    assert lin[1] > 0.9 and lin[1] <= mlp[2] and mlp[1] <= lin[2]


def _accuracies(x, y, doc):
    test = document_split(doc, 0.25, seed=0)
    k = int(y.max()) + 1
    W, b = fit_probe(x[~test], y[~test], k)
    lin = bootstrap_ci((probe_logits(W, b, x[test]).argmax(-1) == y[test]).float(), doc[test])
    mlp = sp.mlp_probe(x[~test], y[~test], k, seed=0)
    return lin, bootstrap_ci((mlp(x[test]).argmax(-1) == y[test]).float(), doc[test])


def test_room_is_linear_and_the_person_needs_a_nonlinear_read(variables):
    lin, mlp = _accuracies(*variables["room"])
    assert lin[0] > 0.8 and lin[1] <= mlp[2] and mlp[1] <= lin[2], "room: linear and MLP probes agree"
    lin, mlp = _accuracies(*variables["person"])
    assert mlp[1] > lin[2], "person at depth 3: the MLP probe is clearly better than the linear one"


def test_room_and_person_overlap_is_the_residual_stream_s_anisotropy(variables):
    """Above random isotropic subspaces of the same sizes, but not above subspaces built from shuffled labels."""
    subs, dims = {}, {}
    for name in ("room", "person", "sentiment"):
        x, y, _ = variables[name]
        means = sp.class_mean_subspace(x, y)
        dims[name] = sp.effective_dim(means)[1]
        subs[name] = sp.top_basis(means, dims[name])
    assert dims["room"] <= 7 and dims["sentiment"] == 1
    measured = sp.subspace_overlap(subs["room"], subs["person"])
    isotropic = sp.random_subspace_overlap(192, dims["room"], dims["person"], n=200, seed=1)
    x, y, _ = variables["person"]
    shuffled = sp.shuffled_subspace_overlap(subs["room"], x, y, dims["person"], n=20, seed=1)
    assert measured > float(isotropic.quantile(0.95))
    assert measured < float(shuffled.quantile(0.95))
