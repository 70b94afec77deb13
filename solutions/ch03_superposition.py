"""Chapter 03 (superposition): the reference solution of every exercise.

The toy models' library side (initialisation, evaluation, geometry measures, the toy SAE, the
bundled model's subspaces and the figures) lives in `interplab.superposition`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor


def sparse_features(
    n_instances: int,
    batch_size: int,
    n_features: int,
    feature_probability: Float[Tensor, " inst"],
    generator: torch.Generator | None = None,
) -> Float[Tensor, "inst batch n"]:
    """A batch of synthetic sparse features for many toy models at once.

    Each toy model (instance) sees its own features. A feature is present in a sample with its
    instance's probability, independently of every other feature and sample; a present feature
    has a value drawn uniformly from [0, 1), an absent one is exactly 0. The sparsity of an
    instance is 1 - feature_probability.

    Args:
        n_instances: how many toy models.
        batch_size: samples per instance.
        n_features: features per sample.
        feature_probability: [n_instances] floats in [0, 1], the probability that a feature is present.
        generator: the only source of randomness, so that one seed gives one batch.

    Returns:
        A float tensor [n_instances, batch_size, n_features] with values in [0, 1): in each
        instance, about that instance's feature probability of the entries are non-zero. Two
        calls with generators seeded alike return the same batch.
    """
    p = feature_probability.reshape(n_instances, 1, 1)
    present = torch.rand(n_instances, batch_size, n_features, generator=generator) < p
    values = torch.rand(n_instances, batch_size, n_features, generator=generator)
    return torch.where(present, values, torch.zeros(()))


def toy_forward(
    W: Float[Tensor, "inst m n"],
    b: Float[Tensor, "inst n"],
    x: Float[Tensor, "inst batch n"],
    hidden_relu: bool = False,
) -> Float[Tensor, "inst batch n"]:
    """The toy model of superposition (Elhage et al. 2022), for every instance at once.

    Instance i compresses each sample's n features into m hidden dimensions with W[i] (column j
    of W[i] is feature j's direction), then reads them back with the transpose of the same matrix,
    adds its bias b[i] and applies a ReLU. With hidden_relu, the hidden vector is also passed
    through a ReLU before it is read back (a privileged basis: the hidden neurons now matter).

    Args:
        W: [n_instances, m, n] weights.
        b: [n_instances, n] output biases.
        x: [n_instances, batch, n] features.
        hidden_relu: apply a ReLU to the hidden layer.

    Returns:
        The reconstructions, a float tensor [n_instances, batch, n], never negative: each
        instance's output depends only on its own weights, bias and features. Gradients reach
        W and b.
    """
    h = torch.einsum("imn,ibn->ibm", W, x)
    if hidden_relu:
        h = torch.relu(h)
    out = torch.einsum("imn,ibm->ibn", W, h) + b[:, None, :]
    return torch.relu(out)


def importance_loss(
    x: Float[Tensor, "inst batch n"], x_hat: Float[Tensor, "inst batch n"], importance: Float[Tensor, "... n"]
) -> Float[Tensor, " inst"]:
    """The importance-weighted reconstruction loss of every instance.

    Feature j's squared error counts importance[j] times as much as an unweighted one; the
    importances are either one profile [n] shared by every instance, or one profile per
    instance [n_instances, n].

    Args:
        x: [n_instances, batch, n] features.
        x_hat: [n_instances, batch, n] reconstructions.
        importance: [n] or [n_instances, n] non-negative weights.

    Returns:
        A float tensor [n_instances]: for each instance, the weighted squared errors SUMMED over
        features and AVERAGED over the batch. Gradients reach x_hat. (Summing over instances
        gives one loss to minimise: each instance's gradient only involves its own loss.)
    """
    if importance.dim() == 1:
        importance = importance[None, :]
    weighted = importance[:, None, :] * (x - x_hat) ** 2
    return weighted.sum(dim=-1).mean(dim=-1)


def train_toy_models(
    n_features: int,
    n_hidden: int,
    feature_probability: Float[Tensor, " inst"],
    importance: Float[Tensor, "... n"],
    steps: int = 1500,
    batch_size: int = 512,
    lr: float = 3e-3,
    seed: int = 0,
    hidden_relu: bool = False,
) -> tuple[Float[Tensor, "inst m n"], Float[Tensor, "inst n"]]:
    """Train one toy model per entry of feature_probability, all in one vectorised loop.

    Every instance starts from Xavier-normal weights (standard deviation sqrt(2 / (n + m))) and a
    zero bias, and is trained with Adam (learning rate lr) for ``steps`` steps, each on a fresh
    batch of ``batch_size`` samples from `sparse_features` with that instance's probability,
    minimising `importance_loss` of `toy_forward`. Instances never interact: together they are
    one batched model, so a whole sweep costs little more than one model.

    Args:
        n_features: n, features per sample.
        n_hidden: m, hidden dimensions.
        feature_probability: [n_instances] probability that a feature is present, per instance.
        importance: [n] or [n_instances, n] feature importances.
        steps, batch_size, lr: the optimisation.
        seed: seeds one torch.Generator that draws the initial weights and every batch.
        hidden_relu: train the variant with a ReLU on the hidden layer.

    Returns:
        (W, b): float tensors [n_instances, m, n] and [n_instances, n], detached from any
        autograd graph. The same seed gives the same weights; it works when the caller has
        turned gradients off.
    """
    n_instances = len(feature_probability)
    g = torch.Generator().manual_seed(seed)
    std = math.sqrt(2.0 / (n_features + n_hidden))
    W = (torch.randn(n_instances, n_hidden, n_features, generator=g) * std).requires_grad_(True)
    b = torch.zeros(n_instances, n_features, requires_grad=True)
    optimizer = torch.optim.Adam([W, b], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            x = sparse_features(n_instances, batch_size, n_features, feature_probability, g)
            loss = importance_loss(x, toy_forward(W, b, x, hidden_relu), importance).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return W.detach(), b.detach()


def feature_dimensionality(W: Float[Tensor, "m n"]) -> Float[Tensor, " n"]:
    """How many hidden dimensions each feature gets: D_i = ||W_i||^2 / sum_j (W_i_hat . W_j)^2.

    W_i is column i of one toy model's W and W_i_hat its unit vector; the sum in the denominator
    runs over every feature j, i itself included. A feature alone in its own direction gets
    D = 1, each of an antipodal pair 1/2, each corner of a pentagon in a plane 2/5.

    Args:
        W: [m, n] weights of one toy model.

    Returns:
        A float tensor [n] with values in [0, 1] (up to rounding): D of every feature, and 0 for a
        feature whose column is all zeros (a feature the model does not represent).
    """
    norms = W.norm(dim=0)
    unit = W / norms.clamp_min(1e-12)
    overlaps = (unit.T @ W) ** 2
    dims = norms**2 / overlaps.sum(dim=-1).clamp_min(1e-30)
    return torch.where(norms > 1e-6, dims, torch.zeros_like(dims))


def recovery_score(
    true_directions: Float[Tensor, "n m"], decoder: Float[Tensor, "d_sae m"], threshold: float = 0.9
) -> tuple[float, int]:
    """How well a dictionary's decoder rows recover known feature directions.

    For every true feature (a row of true_directions), its best match is the largest cosine
    similarity to any decoder row. The sign matters: a decoder row pointing the opposite way
    does not recover a feature, since an SAE's latents never go negative.

    Args:
        true_directions: [n, m] one true feature direction per row (any non-zero length).
        decoder: [d_sae, m] one decoder row per latent (any non-zero length).
        threshold: the best-match cosine above which a feature counts as recovered.

    Returns:
        (score, recovered): score, a Python float, the mean over true features of their
        best-match cosine (1.0 when every feature has a decoder row pointing exactly its way);
        recovered, a Python int, how many true features have a best match strictly above threshold.
        Several features may share one decoder row as their best match.
    """
    t = F.normalize(true_directions, dim=-1)
    d = F.normalize(decoder, dim=-1)
    best = (t @ d.T).max(dim=-1).values
    return float(best.mean()), int((best > threshold).sum())
