"""Superposition (chapter 03): toy models of superposition, their geometry, toy SAEs, and the bundled model's variables.

- Toy models (Elhage et al. 2022): ``n`` sparse features squeezed into ``m < n`` hidden dimensions and
  read back through a ReLU, ``x' = ReLU(W^T W x + b)``, optionally with a ReLU on the hidden layer
  too. Many instances (one per sparsity, or per importance profile) are trained at once:
  `sparse_features`, `toy_forward`, `importance_loss`, `train_toy_models`, `geometric_importance`.
- Geometry: `feature_norms`, `n_represented`, `superposition_score` (how much of a feature's
  direction other features share), `feature_dimensionality` (D_i), `antipodal_pairs`,
  `near_plateau` (the fractional values D takes), `polysemantic_neurons`.
- Why dictionaries: `train_toy_sae` (L1 or TopK on a toy model's hidden layer) and
  `recovery_score` (mean max cosine of the true feature directions to the decoder rows).
- The bundled model: `class_mean_subspace`, `effective_dim`, `subspace_overlap` (principal
  angles) with two baselines, `random_subspace_overlap` (isotropic) and `shuffled_subspace_overlap`
  (the data's own anisotropy), `mlp_probe`.
- Figures: `plot_wtw`, `plot_feature_bars`, `plot_phase`, `plot_dimensionality`, `plot_directions`,
  `plot_recovery`, `plot_overlap`.

`sparse_features`, `toy_forward`, `importance_loss`, `train_toy_models`, `feature_dimensionality`
and `recovery_score` are also the chapter's exercises: these are the library's own copies, and
the chapter's tests hold them to the exercises' cases.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from .tinyworld import CITIES, NAMES

# The fractional dimensionalities of Elhage et al.'s uniform superposition (1, 3/4, 2/3, 1/2, 2/5, 3/8, 1/3):
# a feature alone in its dimension, tetrahedra, triangles, antipodal pairs, pentagons, square antiprisms, ...
PLATEAUS: tuple[float, ...] = (1.0, 3 / 4, 2 / 3, 1 / 2, 2 / 5, 3 / 8, 1 / 3)

# --- toy models -------------------------------------------------------------------------------------------


def geometric_importance(n_features: int, decay: float = 0.9) -> Float[Tensor, " n"]:
    """Feature importances decay**i (feature 0 matters most), as in Elhage et al.'s sparsity sweep."""
    return decay ** torch.arange(n_features, dtype=torch.float32)


def sparse_features(
    n_instances: int,
    batch_size: int,
    n_features: int,
    feature_probability: Float[Tensor, " inst"],
    generator: torch.Generator | None = None,
) -> Float[Tensor, "inst batch n"]:
    """A batch of sparse features: each value is present with its instance's probability, uniform in [0, 1)."""
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
    """The toy model of every instance: h = W x (ReLU'd when hidden_relu), x' = ReLU(W^T h + b)."""
    h = torch.einsum("imn,ibn->ibm", W, x)
    if hidden_relu:
        h = torch.relu(h)
    return torch.relu(torch.einsum("imn,ibm->ibn", W, h) + b[:, None, :])


def importance_loss(
    x: Float[Tensor, "inst batch n"], x_hat: Float[Tensor, "inst batch n"], importance: Float[Tensor, "... n"]
) -> Float[Tensor, " inst"]:
    """Per instance: the importance-weighted squared error, summed over features and averaged over the batch."""
    imp = importance if importance.dim() == 2 else importance[None, :]
    return (imp[:, None, :] * (x - x_hat) ** 2).sum(-1).mean(-1)


def init_toy(
    n_instances: int, n_features: int, n_hidden: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Xavier-normal W [inst, m, n] and a zero bias [inst, n]."""
    std = math.sqrt(2.0 / (n_features + n_hidden))
    return torch.randn(n_instances, n_hidden, n_features, generator=generator) * std, torch.zeros(
        n_instances, n_features
    )


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
    progress: Callable | None = None,
) -> tuple[Float[Tensor, "inst m n"], Float[Tensor, "inst n"]]:
    """Train one toy model per entry of feature_probability, all at once (Adam); returns detached (W, b).

    One generator seeded with ``seed`` draws the initial weights and then every batch, so a run is
    reproducible. ``progress`` wraps the step range (e.g. ``interplab.progress.progress``).
    """
    n_inst = len(feature_probability)
    g = torch.Generator().manual_seed(seed)
    W, b = init_toy(n_inst, n_features, n_hidden, g)
    W.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.Adam([W, b], lr=lr)
    steps_iter = range(steps) if progress is None else progress(range(steps))
    with torch.enable_grad():
        for _ in steps_iter:
            x = sparse_features(n_inst, batch_size, n_features, feature_probability, g)
            loss = importance_loss(x, toy_forward(W, b, x, hidden_relu), importance).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return W.detach(), b.detach()


@torch.no_grad()
def eval_loss(
    W: Tensor,
    b: Tensor,
    feature_probability: Tensor,
    importance: Tensor,
    batch_size: int = 4096,
    seed: int = 1234,
    hidden_relu: bool = False,
) -> Float[Tensor, " inst"]:
    """Each instance's loss on one fresh batch drawn with ``seed`` (the same batch for any (W, b))."""
    g = torch.Generator().manual_seed(seed)
    x = sparse_features(W.shape[0], batch_size, W.shape[2], feature_probability, g)
    return importance_loss(x, toy_forward(W, b, x, hidden_relu), importance)


# --- geometry ----------------------------------------------------------------------------------------------


def feature_norms(W: Float[Tensor, "... m n"]) -> Float[Tensor, "... n"]:
    """||W_i||: how strongly each feature is represented (about 1: fully, about 0: dropped)."""
    return W.norm(dim=-2)


def n_represented(W: Float[Tensor, "... m n"], threshold: float = 0.5) -> Tensor:
    """How many features have ||W_i|| > threshold."""
    return (feature_norms(W) > threshold).sum(-1)


def superposition_score(W: Float[Tensor, "... m n"]) -> Float[Tensor, "... n"]:
    """sum_{j != i} (W_i_hat . W_j)^2: how much of feature i's direction the others also use (0: a dimension of its own)."""
    unit = W / W.norm(dim=-2, keepdim=True).clamp_min(1e-8)
    overlap = (unit.transpose(-1, -2) @ W) ** 2
    return overlap.sum(-1) - torch.diagonal(overlap, dim1=-2, dim2=-1)


def feature_dimensionality(W: Float[Tensor, "m n"]) -> Float[Tensor, " n"]:
    """D_i = ||W_i||^2 / sum_j (W_i_hat . W_j)^2: the fraction of a dimension feature i gets (0 for a dropped feature)."""
    W = W.double()
    norms = W.norm(dim=0)
    unit = W / norms.clamp_min(1e-12)
    denom = ((unit.T @ W) ** 2).sum(-1)
    dim = torch.where(norms > 1e-6, norms**2 / denom.clamp_min(1e-300), torch.zeros_like(norms))
    return dim.float()


def near_plateau(dims: Float[Tensor, " n"], tol: float = 0.05, plateaus: Sequence[float] = PLATEAUS) -> Tensor:
    """For each value, whether it lies within ``tol`` of one of the fractional plateaus."""
    p = torch.tensor(plateaus, dtype=dims.dtype)
    return ((dims[:, None] - p[None, :]).abs() < tol).any(-1)


def antipodal_pairs(W: Float[Tensor, "m n"], cos_below: float = -0.95, min_norm: float = 0.5) -> list[tuple[int, int]]:
    """Pairs (i, j) of represented features whose directions point opposite ways (cosine < cos_below)."""
    keep = feature_norms(W) > min_norm
    unit = W / W.norm(dim=0, keepdim=True).clamp_min(1e-8)
    cos = unit.T @ unit
    n = W.shape[1]
    return [(i, j) for i in range(n) for j in range(i + 1, n) if keep[i] and keep[j] and cos[i, j] < cos_below]


def polysemantic_neurons(W: Float[Tensor, "m n"], threshold: float = 0.5) -> Int[Tensor, " m"]:
    """For each hidden neuron, how many features it reads strongly (a positive weight above ``threshold``)."""
    return (W > threshold).sum(-1)


def neuron_alignment(W: Float[Tensor, "m n"], min_norm: float = 0.5) -> Float[Tensor, ""]:
    """Mean over represented features of max_j |W_ji| / ||W_i||: 1 when every feature sits on one neuron."""
    norms = feature_norms(W)
    keep = norms > min_norm
    if not keep.any():
        return torch.tensor(float("nan"))
    return (W.abs().max(0).values / norms.clamp_min(1e-8))[keep].mean()


# --- why dictionaries: a sparse autoencoder on a toy model's hidden layer ----------------------------------


def recovery_score(
    true_directions: Float[Tensor, "n m"], decoder: Float[Tensor, "d_sae m"], threshold: float = 0.9
) -> tuple[float, int]:
    """(mean over true features of the best decoder-row cosine, how many have it above ``threshold``)."""
    t = F.normalize(true_directions.double(), dim=-1)
    d = F.normalize(decoder.double(), dim=-1)
    best = (t @ d.T).max(-1).values
    return float(best.mean()), int((best > threshold).sum())


def train_toy_sae(
    h: Float[Tensor, "N m"],
    d_sae: int,
    *,
    l1_coeff: float = 0.0,
    k: int | None = None,
    steps: int = 2000,
    batch_size: int = 1024,
    lr: float = 3e-3,
    seed: int = 0,
) -> dict[str, Tensor]:
    """A small SAE on hidden vectors h: ReLU (L1 penalty, weighted by decoder norms) or TopK (``k`` given).

    Decoder rows are kept at unit norm. Returns {"W_enc" [m, d_sae], "b_enc", "W_dec" [d_sae, m], "b_dec"}
    and, on all of h, the final "mse", "l0" (latents active per vector), "fvu" (mse / total variance of h)
    and "dead" (latents active on fewer than 1 in 1000 vectors: dead or as good as).
    """
    g = torch.Generator().manual_seed(seed)
    m = h.shape[1]
    W_dec = F.normalize(torch.randn(d_sae, m, generator=g), dim=-1)
    W_enc = W_dec.T.clone()
    b_enc = torch.zeros(d_sae)
    b_dec = torch.zeros(m)
    params = [p.requires_grad_(True) for p in (W_enc, b_enc, W_dec, b_dec)]
    opt = torch.optim.Adam(params, lr=lr)

    def encode(x):
        pre = (x - b_dec) @ W_enc + b_enc
        if k is None:
            return torch.relu(pre)
        top = pre.topk(min(k, d_sae), dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    with torch.enable_grad():
        for _ in range(steps):
            x = h[torch.randint(len(h), (batch_size,), generator=g)]
            acts = encode(x)
            x_hat = acts @ W_dec + b_dec
            mse = (x_hat - x).pow(2).sum(-1).mean()
            loss = mse + l1_coeff * acts.sum(-1).mean() if k is None else mse
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                W_dec.div_(W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))
    with torch.no_grad():
        acts = encode(h)
        mse = (acts @ W_dec + b_dec - h).pow(2).sum(-1).mean()
        l0 = (acts > 0).float().sum(-1).mean()
        fvu = mse / (h - h.mean(0)).pow(2).sum(-1).mean()
        dead = ((acts > 0).float().mean(0) < 1e-3).sum()
    return {
        "W_enc": W_enc.detach(),
        "b_enc": b_enc.detach(),
        "W_dec": W_dec.detach(),
        "b_dec": b_dec.detach(),
        "mse": mse,
        "l0": l0,
        "fvu": fvu,
        "dead": dead,
    }


def hidden_activations(
    W: Float[Tensor, "m n"], feature_probability: float, n: int = 20000, seed: int = 0
) -> tuple[Float[Tensor, "N m"], Float[Tensor, "N n"]]:
    """(h, x): n sparse feature vectors x of one toy model and its hidden vectors h = W x."""
    g = torch.Generator().manual_seed(seed)
    x = sparse_features(1, n, W.shape[1], torch.tensor([feature_probability]), g)[0]
    return x @ W.T, x


# --- the bundled model: variables as subspaces ---------------------------------------------------------------


def city_examples(docs) -> dict[str, Tensor]:
    """The home city of the person a fact sentence is about, where the model must recall it.

    In TinyWorld's ``facts`` documents, the word just before a city value ("in" of "Alice lives in
    Paris", "?" of "where does Alice live ? Paris") is an answer position: the text so far names the
    person, never the city. Returns {"doc", "position", "label" (index into CITIES), "group" (index into
    NAMES of the person)} as int64 tensors, like `interplab.probes.latent_examples`.
    """
    rows = []
    for i, d in enumerate(docs):
        if d.family != "facts":
            continue
        for pos, answer in enumerate(d.answer):
            if answer in CITIES:
                rows.append((i, pos, CITIES.index(answer), NAMES.index(d.tokens[pos - 2])))
    keys = ("doc", "position", "label", "group")
    cols = list(zip(*rows)) if rows else [[]] * len(keys)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in zip(keys, cols)}


def class_mean_subspace(acts: Float[Tensor, "N d"], labels: Int[Tensor, " N"]) -> Float[Tensor, "k d"]:
    """The class means minus their average, one row per class present (they span the variable's subspace)."""
    classes = torch.unique(labels)
    means = torch.stack([acts[labels == c].mean(0) for c in classes])
    return means - means.mean(0)


def effective_dim(vectors: Float[Tensor, "k d"], var: float = 0.9) -> tuple[float, int]:
    """(participation ratio (sum s^2)^2 / sum s^4, how many principal components hold ``var`` of the variance)."""
    s2 = torch.linalg.svdvals(vectors.double()) ** 2
    pr = float(s2.sum() ** 2 / (s2**2).sum())
    frac = s2.cumsum(0) / s2.sum()
    return pr, int((frac < var).sum()) + 1


def top_basis(vectors: Float[Tensor, "k d"], rank: int) -> Float[Tensor, "d r"]:
    """An orthonormal basis (columns) of the ``rank`` leading principal directions of the rows."""
    _, _, Vh = torch.linalg.svd(vectors.double(), full_matrices=False)
    return Vh[:rank].T.float()


def subspace_overlap(A: Float[Tensor, "d a"], B: Float[Tensor, "d b"]) -> float:
    """The largest cosine of the principal angles between span(A) and span(B) (columns orthonormalised)."""
    qa, _ = torch.linalg.qr(A.double())
    qb, _ = torch.linalg.qr(B.double())
    return float(torch.linalg.svdvals(qa.T @ qb).max())


def random_subspace_overlap(d: int, a: int, b: int, n: int = 200, seed: int = 0) -> Float[Tensor, " n"]:
    """The same overlap between ``n`` pairs of random subspaces of sizes a and b in d dimensions: the baseline."""
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(
        [subspace_overlap(torch.randn(d, a, generator=g), torch.randn(d, b, generator=g)) for _ in range(n)]
    )


def shuffled_subspace_overlap(
    basis: Float[Tensor, "d a"],
    x: Float[Tensor, "N d"],
    labels: Int[Tensor, " N"],
    rank: int,
    n: int = 20,
    seed: int = 0,
) -> Float[Tensor, " n"]:
    """The overlap of ``basis`` with ``n`` subspaces of the same rank built from ``x`` with shuffled labels.

    A baseline matched to the data: shuffled class means point along the directions in which the
    activations vary most, so it says how much two subspaces overlap because the residual stream is
    anisotropic, with no shared variable behind it (random isotropic subspaces ignore that).
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        shuffled = labels[torch.randperm(len(labels), generator=g)]
        out.append(subspace_overlap(basis, top_basis(class_mean_subspace(x, shuffled), rank)))
    return torch.tensor(out)


def mlp_probe(
    x_train: Float[Tensor, "N d"],
    y_train: Int[Tensor, " N"],
    n_classes: int,
    hidden: int = 64,
    steps: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> Callable[[Tensor], Tensor]:
    """A one-hidden-layer ReLU probe (full-batch Adam on standardized inputs); returns x -> logits."""
    g = torch.Generator().manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    d = x_train.shape[1]
    W1 = (torch.randn(d, hidden, generator=g) / math.sqrt(d)).requires_grad_(True)
    b1 = torch.zeros(hidden, requires_grad=True)
    W2 = (torch.randn(hidden, n_classes, generator=g) / math.sqrt(hidden)).requires_grad_(True)
    b2 = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([W1, b1, W2, b2], lr=lr, weight_decay=weight_decay)

    def logits(x):
        return torch.relu(((x - mean) / std) @ W1 + b1) @ W2 + b2

    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(logits(x_train), y_train)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p in (W1, b1, W2, b2):
        p.requires_grad_(False)
    return logits


# --- figures -------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib.pyplot as plt  # lazy: importing the library must not need a plotting backend

    return plt


def plot_wtw(Ws: Sequence[Tensor], titles: Sequence[str], suptitle: str | None = None):
    """W^T W of several toy models side by side (blue negative, red positive): interference off the diagonal."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(Ws), figsize=(2.2 * len(Ws), 2.5), squeeze=False)
    for ax, W, t in zip(axes[0], Ws, titles):
        ax.imshow((W.T @ W).numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(t, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def plot_feature_bars(Ws: Sequence[Tensor], titles: Sequence[str]):
    """||W_i|| per feature for several models; a bar's colour says how much it shares its direction (dark: alone)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(Ws), figsize=(2.2 * len(Ws), 2.6), squeeze=False, sharey=True)
    for ax, W, t in zip(axes[0], Ws, titles):
        norms, sup = feature_norms(W), superposition_score(W)
        colours = plt.cm.viridis((sup / (1 + sup)).clamp(0, 1).numpy() * 0.9)
        ax.barh(range(W.shape[1]), norms.numpy(), color=colours)
        ax.invert_yaxis()
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("||W_i||")
    axes[0, 0].set_ylabel("feature (most important at the top)")
    fig.tight_layout()
    return fig


def plot_phase(sparsities: Sequence[float], counts: Sequence[int], m: int, n: int):
    """Features represented against sparsity, with the hidden width m and the feature count n marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([1 / (1 - s) for s in sparsities], counts, "o-")
    ax.axhline(m, ls="--", c="grey", label=f"m = {m} hidden dimensions")
    ax.axhline(n, ls=":", c="grey", label=f"n = {n} features")
    ax.set_xscale("log")
    ax.set_xlabel("1 / (1 - S): 1 for dense features, 1000 for S = 0.999")
    ax.set_ylabel("features with ||W_i|| > 0.5")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_dimensionality(sparsities: Sequence[float], dims: Sequence[Tensor], m: int, n: int):
    """D_i of the given features of every model against 1 / (1 - S), with the plateau values marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    xs = [1 / (1 - s) for s in sparsities]
    for x, d in zip(xs, dims):
        ax.scatter([x] * len(d), d.numpy(), s=8, alpha=0.5, c="C0")
    for p, lab in zip(PLATEAUS, ("1", "3/4", "2/3", "1/2", "2/5", "3/8", "1/3")):
        ax.axhline(p, ls=":", c="grey", lw=0.8)
        ax.text(xs[-1] * 1.15, p, lab, fontsize=7, va="center")
    ax.set_xscale("log")
    ax.set_xlabel("1 / (1 - S)  (sparser to the right)")
    ax.set_ylabel("dimensions per feature D_i")
    fig.tight_layout()
    return fig


def plot_directions(Ws: Sequence[Tensor], titles: Sequence[str]):
    """The columns W_i of 2-dimensional toy models drawn as arrows (pentagons, antipodal pairs, ...)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(Ws), figsize=(2.3 * len(Ws), 2.4), squeeze=False)
    for ax, W, t in zip(axes[0], Ws, titles):
        for i in range(W.shape[1]):
            ax.plot([0, W[0, i]], [0, W[1, i]], "-o", ms=3, c=f"C{i % 10}")
        ax.set_xlim(-1.4, 1.4)
        ax.set_ylim(-1.4, 1.4)
        ax.set_aspect("equal")
        ax.set_title(t, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def plot_recovery(
    xs: Sequence[float], scores: Sequence[float], xlabel: str, n: int, counts: Sequence[int], log_x: bool = False
):
    """Mean max cosine (left axis) and features recovered (right axis) of SAEs along one knob."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    if log_x:
        ax.set_xscale("log")
    ax.plot(xs, scores, "o-", c="C0")
    ax.set_ylabel("mean max cosine", color="C0")
    ax.set_ylim(0, 1.05)
    ax2 = ax.twinx()
    ax2.plot(xs, counts, "s--", c="C1")
    ax2.set_ylabel(f"recovered (> 0.9) of {n}", color="C1")
    ax2.set_ylim(0, n + 1)
    ax.set_xlabel(xlabel)
    fig.tight_layout()
    return fig


def plot_overlap(names: Sequence[str], panels: dict[str, Tensor]):
    """Largest principal-angle cosine between every pair of variables' subspaces, one heatmap per panel
    (e.g. measured, and the mean of each baseline)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3), squeeze=False)
    for k, (ax, (title, values)) in enumerate(zip(axes[0], panels.items())):
        im = ax.imshow(values.numpy(), vmin=0, vmax=1, cmap="magma")
        ax.set_xticks(range(len(names)), names, rotation=45, fontsize=8)
        ax.set_yticks(range(len(names)), names if k == 0 else [""] * len(names), fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=list(axes[0]))
    return fig


# --- the chapter's headline figures, recomputed (`python -m interplab.superposition`) -------------------------

PHASE_SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
GEOMETRY_PROBABILITIES = (1.0, 0.3, 0.1, 0.03)
SAE_PROBABILITIES = (0.02, 0.05, 0.1, 0.3)
L1_COEFFS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def toy_findings(seed: int = 0) -> dict:
    """The toy-model figures of chapter 03, trained with the chapter's settings and seeds.

    Phase change (n = 20, m = 5, importance 0.9^i), antipodal pairs (n = 6, m = 3), dimensionality
    plateaus (n = 20, m = 8, equal importance, 10 sparsities), polysemantic neurons (ReLU hidden layer) and
    toy-SAE recovery (n = 20, m = 8; TopK SAEs, and ReLU + L1 SAEs along ``L1_COEFFS``: "sae_l1" holds one
    (coefficient, score, recovered, L0, dead latents) per coefficient). ``seed`` seeds every training run
    (the chapter uses 0).
    """
    out: dict[str, float | int | list] = {}
    S = torch.tensor(PHASE_SPARSITIES)
    W, _ = train_toy_models(20, 5, 1 - S, geometric_importance(20, 0.9), seed=seed)
    out["represented"] = n_represented(W).tolist()
    P = torch.tensor(GEOMETRY_PROBABILITIES)
    W_pent, _ = train_toy_models(5, 2, P, torch.ones(5), seed=seed)
    W_anti, _ = train_toy_models(6, 3, P, torch.ones(6), seed=seed)
    out["antipodal_pairs"] = [len(antipodal_pairs(w)) for w in W_anti]
    out["pentagon_dims"] = feature_dimensionality(W_pent[-1]).tolist()
    S_dim = 1 - torch.logspace(0, -2, 10)
    W_dim, _ = train_toy_models(20, 8, 1 - S_dim, torch.ones(20), seed=seed)
    on = [near_plateau(feature_dimensionality(w)[feature_norms(w) > 0.5]) for w, s in zip(W_dim, S_dim) if s > 0.3]
    out["plateau_fraction"] = float(torch.cat(on).float().mean())
    out["plateau_count"] = int(torch.cat(on).sum()), int(len(torch.cat(on)))
    S_relu = torch.tensor([0.0, 0.7, 0.9, 0.99])
    W_relu, _ = train_toy_models(20, 5, 1 - S_relu, geometric_importance(20, 0.9), seed=seed, hidden_relu=True)
    out["polysemantic_neurons"] = [int((polysemantic_neurons(w) > 1).sum()) for w in W_relu]
    W_sae, _ = train_toy_models(20, 8, torch.tensor(SAE_PROBABILITIES), torch.ones(20), seed=seed)
    toys = dict(zip(SAE_PROBABILITIES, W_sae))
    for key, p, d_sae in (("sae", 0.05, 40), ("sae_10_latents", 0.05, 10), ("sae_dense", 0.3, 40)):
        h = hidden_activations(toys[p], p, n=8192, seed=1)[0]
        sae = train_toy_sae(h, d_sae, k=2, steps=1000, batch_size=512, seed=seed)
        out[key] = recovery_score(toys[p].T, sae["W_dec"])
    h = hidden_activations(toys[0.05], 0.05, n=8192, seed=1)[0]
    out["sae_l1"] = []
    for l1 in L1_COEFFS:
        sae = train_toy_sae(h, 40, l1_coeff=l1, steps=1000, batch_size=512, seed=seed)
        out["sae_l1"].append((l1, *recovery_score(toys[0.05].T, sae["W_dec"]), float(sae["l0"]), int(sae["dead"])))
    return out


def replicate_findings(n_runs: int = 2, seed: int = 1, progress: Callable | None = None) -> list[dict]:
    """The chapter's toy-model counts at the ends of its sweeps, on ``n_runs`` more independent runs.

    Each run is one more set of instances in the same vectorised training call (its own initial
    weights and its own batches, drawn from one generator seeded with ``seed``), with the chapter's
    settings: represented features of n = 20, m = 5 models at S = 0 and S = 0.999; antipodal pairs of
    n = 6, m = 3 models when dense and at S = 0.97; the share of represented features on a plateau
    in n = 20, m = 8 models at 5 sparsities above 0.3; polysemantic neurons with a ReLU hidden layer at
    S = 0 and S = 0.99; and the recovery (score, recovered) of a TopK SAE (40 latents, k = 2) on an
    n = 20, m = 8 model with p = 0.05. Returns one dict per run. ``progress`` wraps the training stages.
    """

    def runs(values: Sequence[float]) -> Tensor:
        return torch.tensor(list(values) * n_runs)

    p_dim = torch.logspace(0, -2, 10)[1::2]
    stages = {
        "phase": lambda: train_toy_models(20, 5, runs([1.0, 0.001]), geometric_importance(20, 0.9), seed=seed),
        "antipodal": lambda: train_toy_models(6, 3, runs([1.0, 0.03]), torch.ones(6), seed=seed),
        "plateaus": lambda: train_toy_models(20, 8, runs(p_dim.tolist()), torch.ones(20), seed=seed),
        "relu": lambda: train_toy_models(
            20, 5, runs([1.0, 0.01]), geometric_importance(20, 0.9), seed=seed, hidden_relu=True
        ),
        "sae": lambda: train_toy_models(20, 8, runs([0.05]), torch.ones(20), seed=seed),
    }
    names = list(stages) if progress is None else progress(list(stages))
    W = {name: stages[name]()[0] for name in names}
    W_phase, W_anti, W_dim, W_relu, W_sae = (W[k] for k in stages)
    out = []
    for r in range(n_runs):
        dims = [
            near_plateau(feature_dimensionality(w)[feature_norms(w) > 0.5])
            for w in W_dim[r * len(p_dim) :][: len(p_dim)]
        ]
        h = hidden_activations(W_sae[r], 0.05, n=8192, seed=1)[0]
        sae = train_toy_sae(h, 40, k=2, steps=1000, batch_size=512, seed=seed + r)
        out.append(
            {
                "represented (S = 0, S = 0.999)": n_represented(W_phase[2 * r : 2 * r + 2]).tolist(),
                "antipodal pairs (dense, S = 0.97)": [len(antipodal_pairs(w)) for w in W_anti[2 * r : 2 * r + 2]],
                "plateau fraction": float(torch.cat(dims).float().mean()),
                "polysemantic neurons (S = 0, S = 0.99)": [
                    int((polysemantic_neurons(w) > 1).sum()) for w in W_relu[2 * r : 2 * r + 2]
                ],
                "SAE recovery (score, recovered)": recovery_score(W_sae[r].T, sae["W_dec"]),
            }
        )
    return out


if __name__ == "__main__":
    import sys

    for seed in [int(a) for a in sys.argv[1:]] or [0]:
        print(f"--- seed {seed}")
        for name, value in toy_findings(seed).items():
            print(f"{name}: {value}")
