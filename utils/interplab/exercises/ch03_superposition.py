"""Chapter 03 (superposition): sparse feature batches, the toy model and its loss, the vectorised
training harness, feature dimensionality and the SAE recovery score."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..paths import chapter_of
from ..solutions import ch03_superposition as sol
from ..superposition import eval_loss
from . import Case, Mistake, gen, register

CHAPTER = chapter_of(__name__)


# --- sparse_features -----------------------------------------------------------------------------------------


def _batch_stats(fn, n_instances, batch_size, n_features, feature_probability, seed):
    """The batch drawn with a generator seeded ``seed``, and a second one drawn with the same seed."""
    a = fn(n_instances, batch_size, n_features, feature_probability, torch.Generator().manual_seed(seed))
    b = fn(n_instances, batch_size, n_features, feature_probability, torch.Generator().manual_seed(seed))
    same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool((a == b).all())
    return {"batch": a, "same_seed_same_batch": same, "p": feature_probability}


def _judge_batch(expected, got):
    x, p = got["batch"], expected["p"]
    if not isinstance(x, torch.Tensor):
        return "sparse_features must return a tensor"
    if tuple(x.shape) != tuple(expected["batch"].shape):
        return f"wrong shape: expected {tuple(expected['batch'].shape)} (instances, batch, features)"
    if not x.is_floating_point():
        return "the batch must be a float tensor"
    if (x < 0).any() or (x >= 1).any():
        return "values must lie in [0, 1): a present feature is uniform in [0, 1), an absent one is 0"
    n_per = x.shape[1] * x.shape[2]
    frac = (x != 0).double().reshape(x.shape[0], -1).mean(-1)
    tol = 4 * torch.sqrt(p.double() * (1 - p.double()) / n_per) + 0.005
    off = [i for i in range(len(p)) if abs(float(frac[i]) - float(p[i])) > float(tol[i])]
    if off:
        return (
            f"in instance(s) {off} the fraction of non-zero entries is far from that instance's "
            "feature_probability (the probability that a feature is PRESENT)"
        )
    nz = x[x != 0]
    if len(nz) > 1000 and abs(float(nz.double().mean()) - 0.5) > 0.03:
        return "present features must be uniform in [0, 1) (their mean should be about 0.5)"
    for i in range(len(p)):
        for j in range(i + 1, len(p)):
            if float(p[i]) == float(p[j]) and 0 < float(p[i]) < 1 and torch.equal(x[i] != 0, x[j] != 0):
                return f"instances {i} and {j} have the same probability and exactly the same features present: each instance must draw its own"
    if not got["same_seed_same_batch"]:
        return "two calls with generators seeded alike returned different batches: draw every random number from `generator`"
    return None


def _batch_cases():
    cases = []
    for label, args in [
        ("3 instances, probabilities 0.1, 0.5, 0.9", (3, 400, 10, torch.tensor([0.1, 0.5, 0.9]), 0)),
        ("2 instances, probabilities 0.02, 0.3 (sparse)", (2, 1000, 20, torch.tensor([0.02, 0.3]), 1)),
        ("edge: probabilities 0 and 1 (nothing present, everything present)", (2, 50, 8, torch.tensor([0.0, 1.0]), 2)),
        ("3 instances with the same probability 0.4", (3, 300, 10, torch.tensor([0.4, 0.4, 0.4]), 3)),
        ("1 instance, 1 feature, probability 0.25", (1, 4000, 1, torch.tensor([0.25]), 4)),
    ]:
        cases.append(Case(label, args, call=_batch_stats, judge=_judge_batch))
    return cases


def _batch_as_sparsity(n_instances, batch_size, n_features, feature_probability, generator=None):
    return sol.sparse_features(n_instances, batch_size, n_features, 1 - feature_probability, generator)


def _batch_first_probability(n_instances, batch_size, n_features, feature_probability, generator=None):
    p = feature_probability[:1].expand(n_instances)
    return sol.sparse_features(n_instances, batch_size, n_features, p, generator)


def _batch_global_rng(n_instances, batch_size, n_features, feature_probability, generator=None):
    return sol.sparse_features(n_instances, batch_size, n_features, feature_probability, None)


def _batch_shared_mask(n_instances, batch_size, n_features, feature_probability, generator=None):
    present = torch.rand(1, batch_size, n_features, generator=generator) < feature_probability.reshape(-1, 1, 1)
    values = torch.rand(n_instances, batch_size, n_features, generator=generator)
    return torch.where(present, values, torch.zeros(()))


register(
    "sparse_features",
    CHAPTER,
    sol.sparse_features,
    _batch_cases,
    mistakes=[
        Mistake(
            "probability read as sparsity",
            _batch_as_sparsity,
            "feature_probability is the probability that a feature is PRESENT (non-zero); the sparsity is "
            "1 - feature_probability.",
        ),
        Mistake(
            "present features all equal to 1",
            lambda *a, **k: (sol.sparse_features(*a, **k) != 0).float() * 0.999,
            "A present feature has a random value, uniform in [0, 1), not a fixed one: the model must "
            "reconstruct how much of each feature there is, not only whether it is there.",
        ),
        Mistake.edit(
            "Gaussian values",
            sol.sparse_features,
            "values = torch.rand(",
            "values = torch.randn(",
            "Values are uniform in [0, 1) (torch.rand), not Gaussian: features are never negative.",
        ),
        Mistake(
            "one probability for every instance",
            _batch_first_probability,
            "Each instance has its own probability: feature_probability[i] belongs to instance i (reshape it "
            "so that it broadcasts over the batch and feature dimensions).",
        ),
        Mistake(
            "one mask shared by the instances",
            _batch_shared_mask,
            "Draw an independent presence mask for every instance: instances are separate toy models, and "
            "sharing one mask makes their data identical wherever their probabilities are.",
        ),
        Mistake(
            "generator ignored",
            _batch_global_rng,
            "Pass `generator=generator` to every random draw (torch.rand(..., generator=generator)), so one "
            "seed gives one batch and training runs can be repeated.",
        ),
    ],
)


# --- toy_forward ---------------------------------------------------------------------------------------------


def _forward_cases():
    g = gen(10)
    cases = [
        Case(
            "1 instance, m = 1, n = 2: two features in one dimension",
            (torch.tensor([[[1.0, -1.0]]]), torch.tensor([[0.1, -0.2]]), torch.tensor([[[1.0, 0.0], [0.5, 0.25]]])),
        ),
        Case(
            "edge: a negative bias that the ReLU must clip",
            (torch.tensor([[[1.0, 0.5]]]), torch.tensor([[-2.0, 0.3]]), torch.tensor([[[0.5, 0.5], [1.0, 0.0]]])),
        ),
        Case(
            "3 instances, m = 2, n = 5, random",
            (torch.randn(3, 2, 5, generator=g), torch.randn(3, 5, generator=g), torch.rand(3, 6, 5, generator=g)),
        ),
        Case(
            "hidden_relu: 2 instances, m = 3, n = 6 (negative hidden values are clipped)",
            (torch.randn(2, 3, 6, generator=g), torch.randn(2, 6, generator=g) * 0.1, torch.rand(2, 5, 6, generator=g)),
            {"hidden_relu": True},
        ),
        Case(
            "hidden_relu=False given explicitly, 2 instances, m = 3, n = 6",
            (torch.randn(2, 3, 6, generator=g), torch.randn(2, 6, generator=g) * 0.1, torch.rand(2, 5, 6, generator=g)),
            {"hidden_relu": False},
        ),
        Case(
            "behaviour: gradients reach W and b",
            (
                torch.randn(2, 2, 4, generator=g),
                torch.randn(2, 4, generator=g) * 0.1 + 0.5,
                torch.rand(2, 7, 4, generator=g),
            ),
            call=lambda fn, W, b, x: _grads(fn, W, b, x),
        ),
    ]
    return cases


def _grads(fn, W, b, x):
    with torch.enable_grad():
        W, b = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
        out = fn(W, b, x)
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            return "the output is not in the autograd graph"
        gW, gb = torch.autograd.grad((out * torch.linspace(0.5, 1.5, out.shape[-1])).sum(), [W, b], allow_unused=True)
    return tuple(torch.zeros_like(p) if q is None else q for p, q in zip((W, b), (gW, gb)))


def _fwd_first_instance(W, b, x, hidden_relu=False):
    n_inst = W.shape[0]
    return sol.toy_forward(W[:1].expand_as(W), b[:1].expand(n_inst, -1), x, hidden_relu)


register(
    "toy_forward",
    CHAPTER,
    sol.toy_forward,
    _forward_cases,
    mistakes=[
        Mistake.edit(
            "no output ReLU",
            sol.toy_forward,
            "return torch.relu(out)",
            "return out",
            "The read-back ends with a ReLU: it is what lets the model filter out small interference "
            "between features (negative values become 0).",
        ),
        Mistake.edit(
            "bias added after the ReLU",
            sol.toy_forward,
            "return torch.relu(out)",
            "return torch.relu(out - b[:, None, :]) + b[:, None, :]",
            "Add the bias BEFORE the ReLU: a negative bias then acts as a threshold that removes interference.",
        ),
        Mistake.edit(
            "hidden_relu ignored",
            sol.toy_forward,
            "if hidden_relu:",
            "if False:",
            "With hidden_relu=True the hidden vector W x goes through a ReLU before it is read back.",
        ),
        Mistake.edit(
            "ReLU on the hidden layer always",
            sol.toy_forward,
            "if hidden_relu:",
            "if True:",
            "The plain toy model (hidden_relu=False) has a linear hidden layer: only the output has a ReLU.",
        ),
        Mistake(
            "every instance uses the first instance's weights",
            _fwd_first_instance,
            "Instance i uses its own W[i] and b[i]: keep the instance dimension in every product (einsum "
            "with the instance index on both sides, or batched matmul).",
        ),
    ],
)


# --- importance_loss -----------------------------------------------------------------------------------------


def _loss_cases():
    g = gen(20)
    x = torch.rand(2, 4, 3, generator=g)
    return [
        Case(
            "1 instance, batch 2, n = 2, importance (1, 0.5)",
            (
                torch.tensor([[[1.0, 0.5], [0.0, 1.0]]]),
                torch.tensor([[[0.5, 0.5], [0.5, 0.0]]]),
                torch.tensor([1.0, 0.5]),
            ),
        ),
        Case(
            "2 instances, shared importance [n]", (x, torch.rand(2, 4, 3, generator=g), torch.tensor([1.0, 0.9, 0.81]))
        ),
        Case(
            "3 instances, one importance profile per instance [inst, n]",
            (torch.rand(3, 5, 4, generator=g), torch.rand(3, 5, 4, generator=g), torch.rand(3, 4, generator=g) + 0.1),
        ),
        Case(
            "edge: a feature of importance 0 does not count",
            (torch.rand(2, 6, 3, generator=g), torch.rand(2, 6, 3, generator=g), torch.tensor([0.0, 1.0, 2.0])),
        ),
        Case(
            "behaviour: the gradient reaches x_hat",
            (torch.rand(2, 3, 4, generator=g), torch.rand(2, 3, 4, generator=g), torch.tensor([1.0, 0.5, 0.25, 0.1])),
            call=_loss_grad,
        ),
    ]


def _loss_grad(fn, x, x_hat, importance):
    with torch.enable_grad():
        x_hat = x_hat.clone().requires_grad_(True)
        loss = fn(x, x_hat, importance)
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            return "the loss is not in the autograd graph"
        return torch.autograd.grad(loss.sum(), x_hat)[0]


register(
    "importance_loss",
    CHAPTER,
    sol.importance_loss,
    _loss_cases,
    mistakes=[
        Mistake.edit(
            "mean over features",
            sol.importance_loss,
            "weighted.sum(dim=-1).mean(dim=-1)",
            "weighted.mean(dim=-1).mean(dim=-1)",
            "SUM the weighted errors over features (then average over the batch): the contract fixes the "
            "scale, so losses of models with different numbers of features compare.",
        ),
        Mistake.edit(
            "sum over the batch",
            sol.importance_loss,
            "weighted.sum(dim=-1).mean(dim=-1)",
            "weighted.sum(dim=-1).sum(dim=-1)",
            "AVERAGE over the batch (sum only over features), so the loss does not grow with the batch size.",
        ),
        Mistake.edit(
            "importance ignored",
            sol.importance_loss,
            "weighted = importance[:, None, :] * (x - x_hat) ** 2",
            "weighted = (x - x_hat) ** 2",
            "Weight each feature's squared error by its importance: importance is what makes the model "
            "prefer some features over others.",
        ),
        Mistake.edit(
            "importance inside the square",
            sol.importance_loss,
            "importance[:, None, :] * (x - x_hat) ** 2",
            "(importance[:, None, :] * (x - x_hat)) ** 2",
            "Multiply the SQUARED error by the importance, I_j (x_j - x_hat_j)^2, not the error before squaring.",
        ),
        Mistake.edit(
            "one number for all instances",
            sol.importance_loss,
            "weighted.sum(dim=-1).mean(dim=-1)",
            "weighted.sum(dim=-1).mean()",
            "Return one loss per instance, shape [n_instances]: average over the batch only, not over instances.",
        ),
    ],
)


# --- train_toy_models ----------------------------------------------------------------------------------------

_TRAIN = {"steps": 400, "batch_size": 256, "lr": 1e-2}


def _trained(fn, n_features, n_hidden, p, importance, **kwargs):
    """What the harness returned, judged as the chapter uses it: shapes, detached, and each instance's loss on one
    fresh batch (the same batch for every answer)."""
    out = fn(n_features, n_hidden, p, importance, **kwargs)
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        return "train_toy_models must return a tuple (W, b) of two tensors"
    W, b = out
    shapes = (tuple(W.shape), tuple(b.shape))
    result = {"shapes": shapes, "detached": not (W.requires_grad or b.requires_grad), "b_moved": bool((b != 0).any())}
    if shapes == ((len(p), n_hidden, n_features), (len(p), n_features)):
        hidden_relu = kwargs.get("hidden_relu", False)
        result["loss"] = eval_loss(W.detach().float(), b.detach().float(), p, importance, hidden_relu=hidden_relu)
    return result


def _trained_no_grad(fn, *args, **kwargs):
    with torch.no_grad():
        try:
            return _trained(fn, *args, **kwargs)
        except RuntimeError as e:
            return f"raised RuntimeError under torch.no_grad(): {str(e).splitlines()[0]}"


def _seeds(fn, *args, **kwargs):
    a = fn(*args, **kwargs, seed=5)
    b = fn(*args, **kwargs, seed=5)
    c = fn(*args, **kwargs, seed=6)
    return {"same": bool(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])), "different": not torch.equal(a[0], c[0])}


def _judge_trained(expected, got):
    if isinstance(got, str):
        if "no_grad" in got:
            return (
                "training raised under torch.no_grad(): the harness must turn gradients on itself "
                "(with torch.enable_grad():), because the chapter runs with gradients off"
            )
        return got
    if got["shapes"] != expected["shapes"]:
        return f"wrong shapes: expected W {expected['shapes'][0]} and b {expected['shapes'][1]}"
    if not got["detached"]:
        return "return W and b detached from the autograd graph (.detach()), as plain weights"
    if not got["b_moved"]:
        return "the bias b is still all zeros after training: it must be trained too"
    worse = [i for i, (e, g) in enumerate(zip(expected["loss"], got["loss"])) if float(g) > 1.3 * float(e) + 0.01]
    if worse:
        return (
            f"instance(s) {worse} end with a loss on a fresh batch well above a reference run's (by more than 30 % + 0.01) "
            "(trained with the same settings)"
        )
    return None


def _judge_seeds(expected, got):
    if not got["same"]:
        return "two runs with the same seed returned different weights: draw everything from one generator seeded with seed"
    if not got["different"]:
        return "runs with different seeds returned the same weights: the seed must set the initial weights"
    return None


def _train_cases():
    n, m = 5, 2
    uniform = torch.ones(n)
    mixed = torch.stack([torch.ones(n), 0.5 ** torch.arange(n, dtype=torch.float32)])
    return [
        Case(
            "n = 5, m = 2, uniform importance, probability 0.5 in both instances",
            (n, m, torch.tensor([0.5, 0.5]), uniform),
            dict(_TRAIN),
            call=_trained,
            judge=_judge_trained,
        ),
        Case(
            "n = 5, m = 2, probability 0.5; instance 0 uniform importance, instance 1 decaying (0.5^i)",
            (n, m, torch.tensor([0.5, 0.5]), mixed),
            dict(_TRAIN),
            call=_trained,
            judge=_judge_trained,
        ),
        Case(
            "n = 5, m = 2, uniform importance, probabilities 0.5, 0.05 and 0.95",
            (n, m, torch.tensor([0.5, 0.05, 0.95]), uniform),
            dict(_TRAIN, seed=1),
            call=_trained,
            judge=_judge_trained,
        ),
        Case(
            "behaviour: works when the caller has turned gradients off",
            (n, m, torch.tensor([0.5, 0.2]), uniform),
            dict(_TRAIN),
            call=_trained_no_grad,
            judge=_judge_trained,
        ),
        Case(
            "behaviour: one seed gives one result, another seed another",
            (n, m, torch.tensor([0.5]), uniform),
            {"steps": 20, "batch_size": 64},
            call=_seeds,
            judge=_judge_seeds,
        ),
    ]


_REF_TRAIN = sol.train_toy_models


def _train_frozen_bias(
    n_features,
    n_hidden,
    feature_probability,
    importance,
    steps=1500,
    batch_size=512,
    lr=3e-3,
    seed=0,
    hidden_relu=False,
):
    n_instances = len(feature_probability)
    g = torch.Generator().manual_seed(seed)
    std = math.sqrt(2.0 / (n_features + n_hidden))
    W = (torch.randn(n_instances, n_hidden, n_features, generator=g) * std).requires_grad_(True)
    b = torch.zeros(n_instances, n_features)
    optimizer = torch.optim.Adam([W], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            x = sol.sparse_features(n_instances, batch_size, n_features, feature_probability, g)
            loss = sol.importance_loss(x, sol.toy_forward(W, b, x, hidden_relu), importance).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return W.detach(), b


register(
    "train_toy_models",
    CHAPTER,
    sol.train_toy_models,
    _train_cases,
    mistakes=[
        Mistake.edit(
            "no torch.enable_grad()",
            sol.train_toy_models,
            "with torch.enable_grad():",
            "if True:",
            "The chapter runs with gradients off (torch.set_grad_enabled(False)): wrap the training loop in "
            "`with torch.enable_grad():` so that loss.backward() has a graph to go through.",
        ),
        Mistake.edit(
            "seed ignored",
            sol.train_toy_models,
            "g = torch.Generator().manual_seed(seed)",
            "g = torch.Generator().manual_seed(0)",
            "Seed the generator with the `seed` argument (not a fixed number), and draw the initial weights and "
            "every batch from it: one seed gives one result, and another seed another run.",
        ),
        Mistake(
            "bias not trained",
            _train_frozen_bias,
            "Train the bias b too (give it requires_grad and pass it to the optimizer): a negative bias is how "
            "the model filters out the interference between features in superposition.",
        ),
        Mistake.edit(
            "importance ignored",
            sol.train_toy_models,
            "loss = importance_loss(x, toy_forward(W, b, x, hidden_relu), importance).sum()",
            "loss = importance_loss(x, toy_forward(W, b, x, hidden_relu), torch.ones(n_features)).sum()",
            "Train on the importance-weighted loss with the given importances: they decide which features "
            "the model keeps when it cannot keep them all.",
        ),
        Mistake.edit(
            "probability used as sparsity",
            sol.train_toy_models,
            "x = sparse_features(n_instances, batch_size, n_features, feature_probability, g)",
            "x = sparse_features(n_instances, batch_size, n_features, 1 - feature_probability, g)",
            "Draw the batches with feature_probability itself (the probability a feature is PRESENT); "
            "training on 1 - p trains each model for another sparsity.",
        ),
        Mistake.edit(
            "weights returned attached to the graph",
            sol.train_toy_models,
            "return W.detach(), b.detach()",
            "return W, b",
            "Return W.detach() and b.detach(): plain weights, not leaves of the optimisation graph.",
        ),
    ],
    time_limit=60.0,
)


# --- feature_dimensionality ----------------------------------------------------------------------------------


def _pentagon(r: float = 1.0):
    angles = torch.arange(5) * 2 * math.pi / 5
    return r * torch.stack([torch.cos(angles), torch.sin(angles)])


def _dim_cases():
    g = gen(30)
    return [
        Case("the identity, m = n = 3: every feature alone (D = 1)", (torch.eye(3),)),
        Case("an antipodal pair in one dimension (D = 1/2 each)", (torch.tensor([[1.0, -1.0]]),)),
        Case("a pentagon in two dimensions (D = 2/5 each)", (_pentagon(),)),
        Case("edge: a zero column (a feature that is not represented) gets D = 0", (torch.tensor([[1.0, 0.0, -1.0]]),)),
        Case("orthogonal features of lengths 2 and 0.5 (D = 1 each)", (torch.tensor([[2.0, 0.0], [0.0, 0.5]]),)),
        Case("antipodal features of unequal lengths 1 and 2 (D = 0.2 and 0.8)", (torch.tensor([[1.0, -2.0]]),)),
        Case("random W, m = 4, n = 9", (torch.randn(4, 9, generator=g),)),
        Case("random W, m = 3, n = 3, float64", (torch.randn(3, 3, generator=g, dtype=torch.float64),)),
    ]


register(
    "feature_dimensionality",
    CHAPTER,
    sol.feature_dimensionality,
    _dim_cases,
    mistakes=[
        Mistake.edit(
            "self term left out",
            sol.feature_dimensionality,
            "overlaps.sum(dim=-1)",
            "(overlaps.sum(dim=-1) - overlaps.diagonal())",
            "The sum in the denominator runs over EVERY feature j, i itself included: a feature alone in its "
            "dimension then gets exactly 1.",
        ),
        Mistake.edit(
            "denominator not normalised",
            sol.feature_dimensionality,
            "overlaps = (unit.T @ W) ** 2",
            "overlaps = (W.T @ W) ** 2",
            "Project every W_j on the UNIT vector of feature i (W_i_hat), not on W_i itself: with W_i, a longer "
            "feature gets a smaller D just for its length.",
        ),
        Mistake.edit(
            "absolute values instead of squares",
            sol.feature_dimensionality,
            "overlaps = (unit.T @ W) ** 2",
            "overlaps = (unit.T @ W).abs()",
            "Square the projections (W_i_hat . W_j)^2: D compares squared lengths (the numerator is ||W_i||^2).",
        ),
        Mistake.edit(
            "numerator not squared",
            sol.feature_dimensionality,
            "dims = norms**2 /",
            "dims = norms /",
            "The numerator is the SQUARED norm ||W_i||^2, like the squared projections below it.",
        ),
    ],
    atol=1e-5,
    rtol=1e-4,
)


# --- recovery_score ------------------------------------------------------------------------------------------


def _rec_cases():
    g = gen(40)
    true = F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    perm = torch.randperm(6, generator=g)
    return [
        Case("the decoder is the true directions: score 1, all recovered", (true, true.clone())),
        Case(
            "permuted and rescaled decoder rows (lengths do not matter)",
            (true * 3.0, true[perm] * (torch.rand(6, 1, generator=g) + 0.2)),
        ),
        Case("edge: every decoder row points the opposite way (score -1, none recovered)", (true, -true)),
        Case(
            "more latents than features: the true directions among random rows",
            (true, torch.cat([torch.randn(5, 4, generator=g), true[:4] * 2])),
        ),
        Case(
            "fewer latents than features: ties (several features share their best row)",
            (torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])),
        ),
        Case(
            "threshold 0.5, random",
            (torch.randn(7, 5, generator=g), torch.randn(12, 5, generator=g)),
            {"threshold": 0.5},
        ),
    ]


def _rec_abs(true_directions, decoder, threshold=0.9):
    return sol.recovery_score(true_directions, torch.cat([decoder, -decoder]), threshold)


def _rec_per_latent(true_directions, decoder, threshold=0.9):
    return sol.recovery_score(decoder, true_directions, threshold)


register(
    "recovery_score",
    CHAPTER,
    sol.recovery_score,
    _rec_cases,
    mistakes=[
        Mistake(
            "absolute cosine",
            _rec_abs,
            "Keep the sign of the cosine: a decoder row pointing the opposite way does not recover the feature "
            "(an SAE's latents are never negative, so it could not write the feature).",
        ),
        Mistake(
            "best match per latent",
            _rec_per_latent,
            "Take, for every TRUE feature, the best decoder row, and average over the true features (not over "
            "the latents): the question is whether each known feature has a latent.",
        ),
        Mistake.edit(
            "dot products, not cosines",
            sol.recovery_score,
            "best = (t @ d.T)",
            "best = (true_directions @ decoder.T)",
            "Normalise both sets of rows to unit length first: the score compares directions, not lengths.",
        ),
        Mistake.edit(
            "mean instead of max",
            sol.recovery_score,
            "best = (t @ d.T).max(dim=-1).values",
            "best = (t @ d.T).mean(dim=-1)",
            "A feature's score is its BEST match (the largest cosine over decoder rows), not the average.",
        ),
    ],
    output_names=("score", "recovered"),
)
