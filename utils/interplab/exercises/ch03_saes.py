"""Chapter 3 (sparse autoencoders): build, train, measure and interpret SAEs, then score them
against the features planted in TinyWorld."""

from __future__ import annotations

import functools
import types

import torch

from ..dictionaries import SAE, SAEConfig
from ..dictionaries.config import DEFAULT_HOOK
from ..dictionaries.data import collect_acts, tinyworld_dataset
from ..dictionaries.latents import tinyworld_latents
from ..dictionaries.shipped import load_sae
from ..dictionaries.training import resample_sae_
from ..grading.plain import module_from_plain
from ..paths import chapter_of
from ..probes import fit_probe
from ..solutions import ch03_saes as sol
from . import Case, Mistake, gen, register, shared_model

CHAPTER = chapter_of(__name__)


@functools.cache
def _shipped(name: str) -> SAE:
    return load_sae(name, device="cpu")


@functools.cache
def _model_data(n_docs: int = 12, seed: int = 5):
    """(docs, ids, sae mask, activations at the SAEs' hook) for a few test documents."""
    docs, ids, mask = tinyworld_dataset(n_docs, seed=seed, split="test")
    acts = collect_acts(shared_model(), ids, mask, DEFAULT_HOOK)
    return docs, ids, mask, acts


def _random_sae(d_in: int, d_sae: int, seed: int, architecture: str = "standard", k: int = 2) -> SAE:
    g = gen(seed)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, k=k), generator=g)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
    return sae.eval()


# --- sae_encode --------------------------------------------------------------------------


def _encode_cases():
    g = gen(0)
    cases = [
        Case(
            "d_in 2, d_sae 3: the pre-encoder bias matters",
            (
                torch.tensor([[1.0, 2.0], [0.5, -1.0]]),
                torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]]),
                torch.tensor([0.0, -0.5, 0.1]),
                torch.tensor([1.0, 1.0]),
            ),
        ),
        Case(
            "random: batch 5, d_in 6, d_sae 10",
            (
                torch.randn(5, 6, generator=g),
                torch.randn(6, 10, generator=g),
                torch.randn(10, generator=g),
                torch.randn(6, generator=g),
            ),
        ),
        Case(
            "extra leading dimensions: [2, 3, 4] inputs",
            (
                torch.randn(2, 3, 4, generator=g),
                torch.randn(4, 7, generator=g),
                torch.randn(7, generator=g),
                torch.randn(4, generator=g),
            ),
        ),
    ]
    sae = _shipped("standard")
    x = _model_data()[3][:64]
    cases.append(
        Case(
            "the shipped standard SAE on TinyWorld activations",
            (x, sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach()),
        )
    )
    return cases


register(
    "sae_encode",
    CHAPTER,
    sol.sae_encode,
    _encode_cases,
    mistakes=[
        Mistake.edit(
            "no pre-encoder bias",
            sol.sae_encode,
            "relu((x - b_dec) @",
            "relu(x @",
            "Subtract the decoder bias from the input before encoding: (x - b_dec) @ W_enc + b_enc.",
        ),
        Mistake.edit(
            "adds b_dec",
            sol.sae_encode,
            "relu((x - b_dec) @",
            "relu((x + b_dec) @",
            "The pre-encoder bias is SUBTRACTED: the decoder adds b_dec back, so the encoder removes it.",
        ),
        Mistake.edit(
            "no ReLU",
            sol.sae_encode,
            "return torch.relu(",
            "return (",
            "Feature activations are never negative: apply ReLU to the encoder's output.",
        ),
    ],
    rtol=1e-4,
    atol=1e-5,
)


# --- sae_loss ------------------------------------------------------------------------------


def _loss_cases():
    g = gen(1)
    cases = [
        Case(
            "batch 2, d 2, d_sae 3, decoder rows of norm 2 and 0.5",
            (
                torch.tensor([[1.0, 0.0], [0.0, 2.0]]),
                torch.tensor([[0.5, 0.0], [0.0, 1.0]]),
                torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]]),
                torch.tensor([[2.0, 0.0], [0.0, 0.5], [0.6, 0.8]]),
                0.1,
            ),
        ),
    ]
    x = torch.randn(6, 5, generator=g)
    cases.append(
        Case(
            "random: batch 6, d 5, d_sae 8, non-unit decoder",
            (
                x,
                x + 0.3 * torch.randn(6, 5, generator=g),
                torch.rand(6, 8, generator=g),
                torch.randn(8, 5, generator=g),
                0.7,
            ),
        )
    )
    sae = _shipped("standard")
    xr = _model_data()[3][:128]
    with torch.no_grad():
        acts = sae.encode(xr)
        x_hat = sae.decode(acts)
    cases.append(
        Case(
            "the shipped standard SAE on TinyWorld activations", (xr, x_hat, acts, sae.W_dec.detach(), sae.cfg.l1_coeff)
        )
    )
    return cases


def _loss_mean_mse(x, x_hat, acts, W_dec, l1_coeff):
    mse = torch.nn.functional.mse_loss(x_hat, x)
    l1 = (acts.abs() * W_dec.norm(dim=-1)).sum(-1).mean()
    return mse + l1_coeff * l1, mse, l1


def _loss_unweighted(x, x_hat, acts, W_dec, l1_coeff):
    mse = (x_hat - x).pow(2).sum(-1).mean()
    l1 = acts.abs().sum(-1).mean()
    return mse + l1_coeff * l1, mse, l1


def _loss_summed_l1(x, x_hat, acts, W_dec, l1_coeff):
    mse = (x_hat - x).pow(2).sum(-1).mean()
    l1 = (acts.abs() * W_dec.norm(dim=-1)).sum()
    return mse + l1_coeff * l1, mse, l1


def _loss_squared(x, x_hat, acts, W_dec, l1_coeff):
    mse = (x_hat - x).pow(2).sum(-1).mean()
    l1 = (acts * W_dec.norm(dim=-1)).pow(2).sum(-1).mean()
    return mse + l1_coeff * l1, mse, l1


register(
    "sae_loss",
    CHAPTER,
    sol.sae_loss,
    _loss_cases,
    mistakes=[
        Mistake(
            "MSE averaged over dimensions",
            _loss_mean_mse,
            "Sum the squared error over the activation dimensions and average over the batch only "
            "(F.mse_loss also divides by d). That is the convention of SAELens, and it sets the scale of l1_coeff.",
        ),
        Mistake(
            "L1 not weighted by decoder norms",
            _loss_unweighted,
            "Weight each feature's |activation| by the norm of its decoder row (W_dec.norm(dim=-1)); otherwise "
            "the SAE can shrink its activations and grow its decoder to dodge the penalty.",
        ),
        Mistake(
            "L1 summed over the batch",
            _loss_summed_l1,
            "Average the penalty over the batch (like the MSE): sum over features, mean over tokens.",
        ),
        Mistake(
            "squared penalty",
            _loss_squared,
            "The sparsity penalty is an L1 norm (sum of absolute values), not a sum of squares: L1 pushes small "
            "activations to exactly zero, L2 only shrinks them.",
        ),
    ],
    rtol=1e-4,
    atol=1e-5,
)


# --- remove_parallel_grad ----------------------------------------------------------------


def _parallel_cases():
    g = gen(2)
    w = torch.randn(7, 5, generator=g)
    return [
        Case(
            "two rows along the axes (norms 2 and 1)",
            (torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [3.0, -2.0]])),
        ),
        Case("random: d_sae 7, d 5, rows not unit norm", (w, torch.randn(7, 5, generator=g))),
        Case(
            "random: unit-norm rows, d_sae 4, d 9",
            (torch.nn.functional.normalize(torch.randn(4, 9, generator=g), dim=-1), torch.randn(4, 9, generator=g)),
        ),
    ]


def _parallel_not_normalised(W_dec, grad):
    return grad - (grad * W_dec).sum(-1, keepdim=True) * W_dec


def _parallel_returned(W_dec, grad):
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True)
    return (grad * unit).sum(-1, keepdim=True) * unit


def _parallel_columns(W_dec, grad):
    unit = W_dec / W_dec.norm(dim=0, keepdim=True)
    return grad - (grad * unit).sum(-1, keepdim=True) * unit


register(
    "remove_parallel_grad",
    CHAPTER,
    sol.remove_parallel_grad,
    _parallel_cases,
    mistakes=[
        Mistake(
            "direction not normalised",
            _parallel_not_normalised,
            "Project onto the UNIT vector u = W_dec[i] / ||W_dec[i]||; with a non-unit row the projection "
            "(g . w) w is scaled by ||w||^2.",
        ),
        Mistake(
            "returns the parallel part",
            _parallel_returned,
            "Return what is left after removing the parallel part: grad - (grad . u) u.",
        ),
        Mistake(
            "normalised over the wrong axis",
            _parallel_columns,
            "Each feature's direction is a ROW of W_dec ([d_sae, d]): normalise with dim=-1.",
        ),
    ],
)


# --- topk_activation -----------------------------------------------------------------------


def _topk_cases():
    g = gen(3)
    return [
        Case(
            "k=2 with a negative value among the top 2",
            (torch.tensor([[3.0, -1.0, -2.0, -5.0], [0.5, 2.0, 1.0, -0.1]]), 2),
        ),
        Case("random: batch 3 (more rows than k), d_sae 12, k=2", (torch.randn(3, 12, generator=g), 2)),
        Case("random: batch 6, d_sae 10, k=3", (torch.randn(6, 10, generator=g), 3)),
        Case("k=1", (torch.randn(4, 8, generator=g), 1)),
        Case("k = d_sae keeps every positive value", (torch.randn(3, 5, generator=g), 5)),
    ]


def _topk_batch_axis(pre_acts, k):
    values, indices = pre_acts.topk(k, dim=0)
    return torch.zeros_like(pre_acts).scatter(0, indices, values.relu())


def _topk_abs(pre_acts, k):
    indices = pre_acts.abs().topk(k, dim=-1).indices
    return torch.zeros_like(pre_acts).scatter(-1, indices, pre_acts.gather(-1, indices).relu())


register(
    "topk_activation",
    CHAPTER,
    sol.topk_activation,
    _topk_cases,
    mistakes=[
        Mistake.edit(
            "no ReLU",
            sol.topk_activation,
            "values.relu()",
            "values",
            "Apply ReLU to the kept values: when fewer than k pre-activations are positive, the negative ones "
            "among the top k must become 0, not stay negative.",
        ),
        Mistake(
            "top-k over the batch",
            _topk_batch_axis,
            "Select the top k within each row (each token), dim=-1, not across the batch (dim=0).",
        ),
        Mistake(
            "largest magnitude", _topk_abs, "Keep the k LARGEST pre-activations, not the k largest in absolute value."
        ),
    ],
)


# --- batchtopk_activation --------------------------------------------------------------------


def _batchtopk_cases():
    g = gen(4)
    return [
        Case("k=1, one row has both large values", (torch.tensor([[5.0, 4.0, -1.0, 0.0], [1.0, 0.5, 0.2, -2.0]]), 1)),
        Case("random: batch 8, d_sae 16, k=3", (torch.randn(8, 16, generator=g), 3)),
        Case("fewer positive values than k * batch", (torch.randn(4, 3, generator=g) - 1.0, 2)),
    ]


def _batchtopk_total_k(pre_acts, k):
    flat = pre_acts.relu().flatten()
    values, indices = flat.topk(k)
    return torch.zeros_like(flat).scatter(0, indices, values).reshape(pre_acts.shape)


def _batchtopk_no_relu(pre_acts, k):
    flat = pre_acts.flatten()
    values, indices = flat.topk(k * pre_acts.shape[0])
    return torch.zeros_like(flat).scatter(0, indices, values).reshape(pre_acts.shape)


register(
    "batchtopk_activation",
    CHAPTER,
    sol.batchtopk_activation,
    _batchtopk_cases,
    mistakes=[
        Mistake(
            "per-row top-k",
            lambda pre_acts, k: sol.topk_activation(pre_acts, k),
            "That is TopK: each row keeps exactly k. BatchTopK flattens the whole batch and keeps its "
            "k * batch largest values, so rows may use more or fewer than k.",
        ),
        Mistake(
            "k in total",
            _batchtopk_total_k,
            "k is the budget PER ROW on average: keep k * batch values over the whole batch, not k.",
        ),
        Mistake(
            "no ReLU",
            _batchtopk_no_relu,
            "Apply ReLU before selecting: when fewer than k * batch values are positive, negative "
            "pre-activations must not be kept.",
        ),
    ],
)


# --- resample_dead_features --------------------------------------------------------------------


def _resample_cases():
    g = gen(5)

    def random_case(d_in, d_sae, batch, n_dead, scale=0.2):
        W_enc = torch.randn(d_in, d_sae, generator=g)
        b_enc = torch.randn(d_sae, generator=g)
        W_dec = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=g), dim=-1)
        dead = torch.zeros(d_sae, dtype=torch.bool)
        dead[torch.randperm(d_sae, generator=g)[:n_dead]] = True
        x = torch.randn(batch, d_in, generator=g)
        x_hat = x + torch.randn(batch, d_in, generator=g) * torch.rand(batch, 1, generator=g)
        return (W_enc, b_enc, W_dec, dead, x, x_hat, scale)

    return [
        Case("random: d_in 6, d_sae 10, 3 dead, batch 8", random_case(6, 10, 8, 3)),
        Case("no dead features: nothing changes", random_case(4, 6, 5, 0)),
        Case("more dead features than rows (reuse rows cyclically), encoder_scale 1", random_case(5, 9, 3, 5, 1.0)),
        Case("every feature dead (encoder norm 1.0)", random_case(3, 4, 6, 4)),
    ]


def _resample_variant(kind):
    def fn(W_enc, b_enc, W_dec, dead, x, x_hat, encoder_scale=0.2):
        W_enc, b_enc, W_dec = W_enc.clone(), b_enc.clone(), W_dec.clone()
        n_dead = int(dead.sum())
        if n_dead == 0:
            return W_enc, b_enc, W_dec
        residual = x - x_hat
        errors = residual.pow(2).sum(-1)
        worst = errors.topk(min(n_dead, len(errors)), largest=(kind != "best")).indices
        rows = worst[torch.arange(n_dead) % len(worst)]
        src = x if kind == "input" else residual
        directions = torch.nn.functional.normalize(src[rows], dim=-1)
        alive = ~dead
        norm = W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
        W_dec[dead] = directions
        W_enc[:, dead] = directions.T * (1.0 if kind == "unscaled" else encoder_scale * norm)
        if kind != "bias":
            b_enc[dead] = 0.0
        return W_enc, b_enc, W_dec

    return fn


register(
    "resample_dead_features",
    CHAPTER,
    sol.resample_dead_features,
    _resample_cases,
    mistakes=[
        Mistake(
            "best-reconstructed rows",
            _resample_variant("best"),
            "Use the rows the SAE reconstructs WORST (largest ||x - x_hat||^2): that is where a new feature helps.",
        ),
        Mistake(
            "input instead of residual",
            _resample_variant("input"),
            "Point the new feature along the residual x - x_hat (what the SAE misses), not along x itself.",
        ),
        Mistake(
            "unscaled encoder",
            _resample_variant("unscaled"),
            "Scale the new encoder columns to encoder_scale times the mean norm of the live features' encoder "
            "columns, so that a resampled feature does not dominate at once.",
        ),
        Mistake(
            "encoder bias kept",
            _resample_variant("bias"),
            "Reset b_enc of the resampled features to 0: their old bias was what kept them from firing.",
        ),
    ],
)


# --- train_sae ---------------------------------------------------------------------------------


def _toy_sparse(d_in: int, n_feats: int, n: int = 4096, p: float = 0.08, seed: int = 0) -> torch.Tensor:
    """Sparse combinations of random unit directions plus an offset (what an SAE should take apart)."""
    g = gen(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n_feats, d_in, generator=g), dim=-1)
    on = torch.rand(n, n_feats, generator=g) < p
    mags = torch.rand(n, n_feats, generator=g) + 0.5
    return (on * mags) @ dirs + 2.0 * torch.randn(d_in, generator=g)


def _toy_one_hot(d_in: int, n_feats: int, n: int = 4096, seed: int = 0) -> torch.Tensor:
    """Exactly one direction active per row: many SAE features start dead and need resampling."""
    g = gen(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n_feats, d_in, generator=g), dim=-1)
    which = torch.randint(0, n_feats, (n,), generator=g)
    return dirs[which] * (torch.rand(n, generator=g) + 1)[:, None] + 0.02 * torch.randn(n, d_in, generator=g)


@functools.cache
def _train_data() -> dict[int, torch.Tensor]:
    """The training data of each case, keyed by d_in (the comparison evaluates the SAEs on it)."""
    return {8: _toy_sparse(8, 24), 16: _toy_one_hot(16, 32), 12: _toy_sparse(12, 30, seed=1)}


_TRAIN_KW = dict(steps=300, batch_size=128, lr=3e-3, seed=1, dead_after=40, resample_every=50, progress=False)


def _train_cases():
    data = _train_data()
    return [
        Case(
            "standard SAE (L1 0.3), d_in 8, d_sae 32, 300 steps",
            (data[8], SAEConfig(d_in=8, d_sae=32, architecture="standard", l1_coeff=0.3)),
            dict(_TRAIN_KW),
        ),
        Case(
            "TopK SAE (k=1) on one-hot data, d_in 16, d_sae 48: dead features need resampling",
            (data[16], SAEConfig(d_in=16, d_sae=48, architecture="topk", k=1)),
            dict(_TRAIN_KW),
        ),
        Case(
            "BatchTopK SAE (k=2), d_in 12, d_sae 40",
            (data[12], SAEConfig(d_in=12, d_sae=40, architecture="batchtopk", k=2)),
            dict(_TRAIN_KW),
        ),
    ]


def _quality(sae, x) -> tuple[float, int]:
    with torch.no_grad():
        out = sae.loss(x)
    return out.loss.item(), int(((out.acts != 0).sum(0) == 0).sum())


def _compare_trained(expected, got) -> str | None:
    expected, got = module_from_plain(expected), module_from_plain(got)  # the grader compares plain copies
    if not isinstance(got, torch.nn.Module) or not all(hasattr(got, a) for a in ("cfg", "loss", "W_dec", "info")):
        return f"expected the trained SAE (an interplab SAE module with .info), got {type(got).__name__}"
    if got.cfg != expected.cfg:
        return f"the returned SAE has config {got.cfg}, expected {expected.cfg}; build it with SAE(cfg)"
    if got.training != expected.training:
        return (
            "the returned SAE is still in training mode: call sae.eval() before returning it (a BatchTopK SAE "
            "selects features per batch while training and with its learned threshold in eval mode)"
        )
    e_norm = float((expected.W_dec.detach().norm(dim=-1) - 1).abs().max())
    g_norm = float((got.W_dec.detach().norm(dim=-1) - 1).abs().max())
    if (e_norm < 1e-3) != (g_norm < 1e-3):
        return (
            f"decoder rows should have unit norm after training; the largest deviation from 1 is {g_norm:.3g} "
            f"(expected {e_norm:.3g}). Renormalise them after every optimizer step"
        )
    e_res, g_res = expected.info.get("resampled", 0), got.info.get("resampled", 0) if isinstance(got.info, dict) else 0
    if (e_res > 0) != (g_res > 0):
        return (
            f"sae.info['resampled'] is {g_res}; the reference resampled {e_res} dead features on this data "
            f"(check every resample_every steps for features that have not fired for dead_after steps)"
        )
    data = _train_data()[expected.cfg.d_in]
    e_loss, _ = _quality(expected, data)
    g_loss, _ = _quality(got, data)
    if not (e_loss / 1.5 <= g_loss <= e_loss * 1.5):
        return (
            f"after training, the loss on the training data is {g_loss:.4g}; following the recipe gives about "
            f"{e_loss:.4g} (within a factor 1.5)"
        )
    return None


def _train_variant(zero_grad: bool = True, normalize: bool = True, resample: bool = True, eval_mode: bool = True):
    """The reference training loop with one step of the recipe left out."""

    def fn(
        acts,
        cfg,
        *,
        target=None,
        steps=1000,
        batch_size=1024,
        lr=1e-3,
        seed=0,
        dead_after=200,
        resample_every=250,
        progress=True,
    ):
        target = acts if target is None else target
        torch.manual_seed(seed)
        sae = SAE(cfg)
        with torch.no_grad():
            sae.b_dec.copy_(target.mean(0))
        opt = torch.optim.Adam(sae.parameters(), lr=lr)
        decay_start = int(0.8 * steps)
        order = torch.Generator().manual_seed(seed)
        perm, cursor = torch.randperm(len(acts), generator=order), 0
        since = torch.zeros(cfg.d_sae, dtype=torch.long)
        n_resampled = 0
        sae.train()
        for step in range(steps):
            if cursor + batch_size > len(perm):
                perm, cursor = torch.randperm(len(acts), generator=order), 0
            idx = perm[cursor : cursor + batch_size]
            cursor += batch_size
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (steps - step) / max(1, steps - decay_start))
            out = sae.loss(acts[idx], target[idx])
            if zero_grad:
                opt.zero_grad()
            out.loss.backward()
            if normalize:
                sae.remove_parallel_grad_()
            opt.step()
            if normalize:
                sae.normalize_decoder_()
            with torch.no_grad():
                since = torch.where((out.acts > 0).any(0), 0, since + 1)
                if resample and (step + 1) % resample_every == 0 and step < decay_start:
                    dead = since >= dead_after
                    if dead.any():
                        resample_sae_(sae, opt, dead, acts[idx], target[idx], out.x_hat)
                        since[dead] = 0
                        n_resampled += int(dead.sum())
        if eval_mode:
            sae.eval()
        sae.info = {"steps": steps, "resampled": n_resampled}
        return sae

    return fn


register(
    "train_sae",
    CHAPTER,
    sol.train_sae,
    _train_cases,
    mistakes=[
        Mistake(
            "gradients never zeroed",
            _train_variant(zero_grad=False),
            "Zero the gradients every step (opt.zero_grad()); otherwise they accumulate over all past batches.",
        ),
        Mistake(
            "decoder not renormalised",
            _train_variant(normalize=False),
            "After each optimizer step, rescale the decoder rows to unit norm (sae.normalize_decoder_()); "
            "before it, remove the gradient parallel to them (sae.remove_parallel_grad_()).",
        ),
        Mistake(
            "no resampling",
            _train_variant(resample=False),
            "Track how many steps each feature has gone without firing, and every resample_every steps "
            "resample those silent for dead_after steps (and count them in sae.info['resampled']).",
        ),
        Mistake("left in training mode", _train_variant(eval_mode=False), "Call sae.eval() before returning the SAE."),
    ],
    compare=_compare_trained,
    time_limit=60.0,
)


# --- explained_variance ----------------------------------------------------------------------


def _ev_cases():
    g = gen(6)
    x = torch.randn(50, 6, generator=g) + 5.0
    cases = [
        Case(
            "three points in 2-D",
            (torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([[0.9, 0.1], [0.0, 0.8], [1.0, 1.2]])),
        ),
        Case("random: 40 tokens, d 5", (torch.randn(40, 5, generator=g), torch.randn(40, 5, generator=g) * 0.5)),
        Case("a large mean offset (as in real residual streams)", (x, x + 0.5 * torch.randn(50, 6, generator=g))),
    ]
    sae = _shipped("topk")
    xr = _model_data()[3]
    with torch.no_grad():
        cases.append(Case("the shipped TopK SAE on TinyWorld activations", (xr, sae(xr))))
    return cases


def _ev_uncentred(x, x_hat):
    return (1 - (x - x_hat).pow(2).sum() / x.pow(2).sum()).item()


def _ev_per_token(x, x_hat):
    err = (x - x_hat).pow(2).sum(-1)
    var = (x - x.mean(0)).pow(2).sum(-1)
    return (1 - err / var).mean().item()


def _ev_per_dim(x, x_hat):
    err = (x - x_hat).pow(2).sum(0)
    var = (x - x.mean(0)).pow(2).sum(0)
    return (1 - err / var).mean().item()


register(
    "explained_variance",
    CHAPTER,
    sol.explained_variance,
    _ev_cases,
    mistakes=[
        Mistake(
            "not mean-centred",
            _ev_uncentred,
            "Divide by the variance of x around its MEAN, sum ||x - mean(x)||^2, not by sum ||x||^2: the mean "
            "of the residual stream is large and easy to reconstruct, and would flatter the SAE.",
        ),
        Mistake(
            "average of per-token ratios",
            _ev_per_token,
            "Divide the TOTAL squared error by the TOTAL variance; averaging per-token ratios (SAELens's "
            "'explained_variance_legacy') lets a few small-variance tokens dominate.",
        ),
        Mistake(
            "average of per-dimension R^2",
            _ev_per_dim,
            "Sum the errors and the variances over all dimensions before dividing (sklearn's "
            "r2_score(multioutput='variance_weighted')); averaging per-dimension R^2 weights quiet dimensions too much.",
        ),
    ],
    rtol=1e-4,
    atol=1e-6,
)


# --- reconstruction_metrics --------------------------------------------------------------------


def _recon_cases():
    g = gen(7)
    cases = [
        Case(
            "two tokens, d 2, d_sae 3",
            (
                torch.tensor([[3.0, 4.0], [1.0, 0.0]]),
                torch.tensor([[3.0, 0.0], [2.0, 0.0]]),
                torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.5]]),
            ),
        ),
    ]
    acts = torch.relu(torch.randn(30, 12, generator=g) - 0.5)
    cases.append(
        Case(
            "random: 30 tokens, d 5, d_sae 12", (torch.randn(30, 5, generator=g), torch.randn(30, 5, generator=g), acts)
        )
    )
    sae = _shipped("standard")
    xr = _model_data()[3]
    with torch.no_grad():
        f = sae.encode(xr)
        cases.append(Case("the shipped standard SAE on TinyWorld activations", (xr, sae.decode(f), f)))
    return cases


def _recon_variant(kind):
    def fn(x, x_hat, acts):
        out = sol.reconstruction_metrics(x, x_hat, acts)
        if kind == "mse":
            out["mse"] = torch.nn.functional.mse_loss(x_hat, x).item()
        elif kind == "l0":
            out["l0"] = float((acts != 0).sum().item())
        elif kind == "l2":
            out["l2_ratio"] = (x_hat.norm(dim=-1).mean() / x.norm(dim=-1).mean()).item()
        elif kind == "cos":
            out["cosine_sim"] = torch.nn.functional.cosine_similarity(x, x_hat, dim=0).mean().item()
        return out

    return fn


register(
    "reconstruction_metrics",
    CHAPTER,
    sol.reconstruction_metrics,
    _recon_cases,
    mistakes=[
        Mistake(
            "MSE per element",
            _recon_variant("mse"),
            "'mse' is the squared error summed over dimensions, averaged over tokens (F.mse_loss also divides by d).",
        ),
        Mistake(
            "L0 summed over tokens",
            _recon_variant("l0"),
            "L0 is the number of active features PER TOKEN: count non-zeros in each row, then average over rows.",
        ),
        Mistake(
            "ratio of mean norms",
            _recon_variant("l2"),
            "'l2_ratio' is the mean of the per-token ratios ||x_hat|| / ||x||, not the ratio of the mean norms.",
        ),
        Mistake(
            "cosine over the batch",
            _recon_variant("cos"),
            "Cosine similarity compares each token's x with its own x_hat: use dim=-1 (over the activation "
            "dimensions), then average over tokens.",
        ),
    ],
    rtol=1e-4,
    atol=1e-5,
)


# --- feature_density ---------------------------------------------------------------------------


def _density_cases():
    g = gen(8)
    cases = [
        Case(
            "3 tokens, 4 features (one dead)",
            (torch.tensor([[0.0, 2.0, 0.0, 0.1], [1.0, 3.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0]]),),
        ),
        Case("random sparse: 50 tokens, 20 features", (torch.relu(torch.randn(50, 20, generator=g) * 2 - 1.5),)),
    ]
    sae = _shipped("topk")
    with torch.no_grad():
        cases.append(Case("the shipped TopK SAE on TinyWorld activations", (sae.encode(_model_data()[3]),)))
    return cases


register(
    "feature_density",
    CHAPTER,
    sol.feature_density,
    _density_cases,
    mistakes=[
        Mistake(
            "mean activation",
            lambda acts: acts.mean(0),
            "Density counts how OFTEN a feature fires ((acts != 0).float().mean(0)), not how strongly.",
        ),
        Mistake(
            "counts, not fractions",
            lambda acts: (acts != 0).float().sum(0),
            "Divide by the number of tokens: density is a fraction in [0, 1].",
        ),
        Mistake(
            "over features",
            lambda acts: (acts != 0).float().mean(-1),
            "Average over tokens (dim=0) to get one value per feature; dim=-1 gives one value per token (that is L0 / d_sae).",
        ),
    ],
)


# --- spliced_loss --------------------------------------------------------------------------------


def _spliced_cases():
    model = shared_model()
    _, ids, mask, _ = _model_data()
    return [
        Case("the shipped TopK SAE, 12 TinyWorld documents", (model, _shipped("topk"), ids, mask)),
        Case("the shipped standard SAE, 12 TinyWorld documents", (model, _shipped("standard"), ids, mask)),
        Case("a random (bad) SAE", (model, _random_sae(model.cfg.d_model, 64, seed=9), ids[:6], mask[:6])),
    ]


def _splice_variant(kind):
    def fn(model, sae, tokens, mask):
        hook = sae.cfg.hook_name
        keep = mask

        def splice(act, hook):
            return sae(act) if kind == "everywhere" else torch.where(keep[..., None], sae(act), act)

        with torch.no_grad():
            clean = model(tokens)
            spliced = model.run_with_hooks(tokens, fwd_hooks=[(hook, splice)])
            zeroed = model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda a, hook: torch.zeros_like(a))])
        scored = keep[:, :-1] & keep[:, 1:]
        if kind == "all positions":
            scored = torch.ones_like(scored)
        ce = {
            n: -lg[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0][scored].mean().item()
            for n, lg in (("ce_clean", clean), ("ce_sae", spliced), ("ce_zero", zeroed))
        }
        log_p, log_q = clean[:, :-1].log_softmax(-1), spliced[:, :-1].log_softmax(-1)
        if kind == "kl reversed":
            log_p, log_q = log_q, log_p
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)[scored].mean().item()
        rec = (ce["ce_zero"] - ce["ce_sae"]) / (ce["ce_zero"] - ce["ce_clean"])
        if kind == "inverted":
            rec = (ce["ce_sae"] - ce["ce_clean"]) / (ce["ce_zero"] - ce["ce_clean"])
        return {**ce, "loss_recovered": rec, "kl_sae": kl}

    return fn


register(
    "spliced_loss",
    CHAPTER,
    sol.spliced_loss,
    _spliced_cases,
    mistakes=[
        Mistake(
            "spliced everywhere",
            _splice_variant("everywhere"),
            "Replace the activation only where mask is True (torch.where(mask[..., None], sae(act), act)): the SAE "
            "never saw <bos> or padding in training, and reconstructing them badly is not its fault.",
        ),
        Mistake(
            "scored everywhere",
            _splice_variant("all positions"),
            "Score only predictions with mask[:, :-1] & mask[:, 1:]: predictions from <bos> or of padding tokens "
            "are not part of the text.",
        ),
        Mistake(
            "KL reversed",
            _splice_variant("kl reversed"),
            "KL(clean || spliced) = sum p_clean * (log p_clean - log p_spliced): the clean distribution is the "
            "reference and weights the sum.",
        ),
        Mistake(
            "fraction lost, not recovered",
            _splice_variant("inverted"),
            "Loss recovered is (ce_zero - ce_sae) / (ce_zero - ce_clean): 1 for a perfect SAE, 0 for one no "
            "better than zeroing the activation.",
        ),
    ],
    rtol=1e-4,
    atol=1e-5,
)


# --- top_activating_contexts -----------------------------------------------------------------------


def _contexts_cases():
    g = gen(10)
    cases = [
        Case(
            "2 sequences, 4 positions, masked maximum",
            (
                torch.tensor([[0.1, 9.0, 0.5, 0.2], [0.7, 0.3, 2.0, 0.0]]),
                torch.tensor([[True, False, True, True], [True, True, True, False]]),
                3,
            ),
        ),
        Case(
            "random: 5 sequences, 7 positions, k=4",
            (torch.rand(5, 7, generator=g), torch.rand(5, 7, generator=g) > 0.3, 4),
        ),
        Case(
            "k larger than the number of unmasked tokens",
            (torch.rand(2, 3, generator=g), torch.tensor([[True, False, False], [False, True, False]]), 5),
        ),
    ]
    _, ids, mask, acts = _model_data()
    sae = _shipped("topk")
    with torch.no_grad():
        f = torch.zeros(*ids.shape, sae.cfg.d_sae)
        f[mask] = sae.encode(acts)
    busiest = int((f != 0).sum((0, 1)).argmax())
    cases.append(
        Case(f"the shipped TopK SAE's feature {busiest} on 12 TinyWorld documents", (f[..., busiest], mask, 5))
    )
    return cases


def _contexts_variant(kind):
    def fn(feature_acts, mask, k):
        masked = feature_acts if kind == "nomask" else feature_acts.masked_fill(~mask, float("-inf"))
        k = min(k, int(mask.sum())) if kind != "nomask" else min(k, feature_acts.numel())
        values, flat = masked.flatten().topk(k, largest=(kind != "ascending"))
        if kind == "unravel":
            n_seq = feature_acts.shape[0]
            return values, flat % n_seq, flat // n_seq
        n_pos = feature_acts.shape[1]
        return values, flat // n_pos, flat % n_pos

    return fn


register(
    "top_activating_contexts",
    CHAPTER,
    sol.top_activating_contexts,
    _contexts_cases,
    mistakes=[
        Mistake(
            "mask ignored",
            _contexts_variant("nomask"),
            "Ignore positions outside the mask (e.g. fill them with -inf before taking the top k): <bos> and "
            "padding are not contexts.",
        ),
        Mistake(
            "smallest first",
            _contexts_variant("ascending"),
            "Return the LARGEST activations, largest first (topk, or sort with descending=True).",
        ),
        Mistake(
            "wrong unravel",
            _contexts_variant("unravel"),
            "A flat index i into [n_seq, pos] is sequence i // pos and position i % pos (or use torch.unravel_index).",
        ),
    ],
)


# --- feature_logit_weights ---------------------------------------------------------------------------


def _logit_cases():
    g = gen(11)
    small = _random_sae(4, 6, seed=12)
    fake = types.SimpleNamespace(W_U=torch.randn(4, 9, generator=g), W_E=torch.randn(9, 4, generator=g))
    model = shared_model()
    return [
        Case("a random SAE (d_in 4, d_sae 6) and a random unembedding", (small, fake, 2)),
        Case("the shipped TopK SAE, feature 0", (_shipped("topk"), model, 0)),
        Case("the shipped standard SAE, feature 17", (_shipped("standard"), model, 17)),
    ]


register(
    "feature_logit_weights",
    CHAPTER,
    sol.feature_logit_weights,
    _logit_cases,
    mistakes=[
        Mistake(
            "encoder direction",
            lambda sae, model, feature: sae.W_enc[:, feature] @ model.W_U,
            "Use the DECODER direction sae.W_dec[feature]: it is what the feature writes into the residual "
            "stream; the encoder column is what it reads.",
        ),
        Mistake(
            "embedding instead of unembedding",
            lambda sae, model, feature: model.W_E @ sae.W_dec[feature],
            "Logits come from the unembedding model.W_U [d_model, d_vocab]; W_E maps tokens INTO the residual stream.",
        ),
    ],
    rtol=1e-4,
    atol=1e-4,
)


# --- steer_with_feature -----------------------------------------------------------------------------


def _steer_cases():
    model = shared_model()
    _, ids, _, _ = _model_data()
    return [
        Case("the shipped TopK SAE, feature 3, scale 10", (model, _shipped("topk"), ids[:4], 3, 10.0)),
        Case("the shipped standard SAE, feature 40, scale -5", (model, _shipped("standard"), ids[4:8], 40, -5.0)),
        Case(
            "a random SAE, feature 5, scale 2.5",
            (model, _random_sae(model.cfg.d_model, 32, seed=15), ids[8:10], 5, 2.5),
        ),
    ]


def _steer_variant(kind):
    def fn(model, sae, tokens, feature, scale):
        direction = sae.W_enc[:, feature] if kind == "encoder" else sae.W_dec[feature]
        hook_name = (
            sae.cfg.hook_name.replace("hook_resid_post", "hook_resid_pre") if kind == "hook" else sae.cfg.hook_name
        )

        def add(act, hook):
            if kind == "last":
                act = act.clone()
                act[:, -1] = act[:, -1] + scale * direction
                return act
            return act + scale * direction.detach()

        with torch.no_grad():
            return model.run_with_hooks(tokens, fwd_hooks=[(hook_name, add)])

    return fn


register(
    "steer_with_feature",
    CHAPTER,
    sol.steer_with_feature,
    _steer_cases,
    mistakes=[
        Mistake(
            "last position only",
            _steer_variant("last"),
            "Add the direction at EVERY position (act + scale * direction broadcasts over batch and position).",
        ),
        Mistake(
            "encoder direction",
            _steer_variant("encoder"),
            "Steer along the DECODER direction sae.W_dec[feature]: that is what the feature adds to the residual stream.",
        ),
        Mistake(
            "wrong hook", _steer_variant("hook"), "Add the direction at the SAE's own hook point, sae.cfg.hook_name."
        ),
    ],
    rtol=1e-4,
    atol=1e-4,
)


# --- feature_aurocs ------------------------------------------------------------------------------------


def _auroc_cases():
    g = gen(13)
    cases = [
        Case(
            "4 tokens, 2 features, with ties",
            (torch.tensor([[0.0, 1.0], [0.0, 2.0], [3.0, 0.0], [0.0, 0.0]]), torch.tensor([False, True, True, False])),
        ),
        Case(
            "random continuous: 40 tokens, 6 features",
            (torch.randn(40, 6, generator=g), torch.rand(40, generator=g) > 0.6),
        ),
        Case(
            "sparse, mostly zero (ties everywhere)",
            (torch.relu(torch.randn(60, 8, generator=g) - 1.2), torch.rand(60, generator=g) > 0.7),
        ),
    ]
    docs, _, _, acts = _model_data()
    names, labels = tinyworld_latents(docs, min_count=1)
    sae = _shipped("topk")
    with torch.no_grad():
        f = sae.encode(acts)
    j = names.index("family:rooms") if "family:rooms" in names else 0
    cases.append(Case(f"the shipped TopK SAE against the latent {names[j]}", (f, labels[:, j])))
    return cases


def _auroc_strict(acts, labels):
    pos, neg = acts[labels], acts[~labels]
    return (pos[:, None, :] > neg[None, :, :]).float().mean((0, 1))


def _auroc_ordinal(acts, labels):
    ranks = acts.argsort(0).argsort(0).double() + 1
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    return ((ranks[labels].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).float()


register(
    "feature_aurocs",
    CHAPTER,
    sol.feature_aurocs,
    _auroc_cases,
    mistakes=[
        Mistake(
            "ties count as losses",
            _auroc_strict,
            "Count a tie (equal activations on a positive and a negative token) as one half: SAE features are "
            "zero on most tokens, so ties are everywhere.",
        ),
        Mistake(
            "ordinal ranks",
            _auroc_ordinal,
            "Tied values must share their AVERAGE rank; argsort().argsort() breaks ties arbitrarily.",
        ),
        Mistake(
            "labels flipped",
            lambda acts, labels: sol.feature_aurocs(acts, ~labels),
            "The positives are the tokens where labels is True: AUROC = P(score of a positive > score of a negative).",
        ),
    ],
    rtol=1e-4,
    atol=1e-4,
)


# --- max_f1 --------------------------------------------------------------------------------------------


def _f1_cases():
    g = gen(14)
    cases = [
        Case(
            "5 tokens with a tie at the best threshold",
            (torch.tensor([3.0, 2.0, 2.0, 0.0, 0.0]), torch.tensor([True, True, False, False, True])),
        ),
        Case("random continuous: 50 tokens", (torch.randn(50, generator=g), torch.rand(50, generator=g) > 0.5)),
        Case(
            "sparse activations, rare latent",
            (torch.relu(torch.randn(80, generator=g) - 1.0), torch.rand(80, generator=g) > 0.8),
        ),
    ]
    docs, _, _, acts = _model_data()
    names, labels = tinyworld_latents(docs, min_count=1)
    sae = _shipped("topk")
    with torch.no_grad():
        f = sae.encode(acts)
    j = names.index("family:rooms") if "family:rooms" in names else 0
    best = int(sol.feature_aurocs(f, labels[:, j]).argmax())
    cases.append(Case(f"the best shipped TopK feature for {names[j]}", (f[:, best], labels[:, j])))
    return cases


def _f1_variant(kind):
    def fn(scores, labels):
        n_pos = int(labels.sum())
        if kind == "zero":
            pred = scores > 0
            tp = float((pred & labels).sum())
            return 2 * tp / (float(pred.sum()) + n_pos)
        order = scores.argsort(descending=True)
        y = labels[order].double()
        tp = y.cumsum(0)
        k = torch.arange(1, len(y) + 1, dtype=torch.float64)
        if kind == "mean":
            p, r = tp / k, tp / n_pos
            return ((p + r) / 2).max().item()
        return (2 * tp / (k + n_pos)).max().item()

    return fn


register(
    "max_f1",
    CHAPTER,
    sol.max_f1,
    _f1_cases,
    mistakes=[
        Mistake(
            "ties split",
            _f1_variant("ties"),
            "Tokens with equal scores must be predicted alike: only cut the sorted list at the end of a run of "
            "equal scores.",
        ),
        Mistake(
            "threshold fixed at zero",
            _f1_variant("zero"),
            "Try every threshold (every distinct score), not only 'fires or not' (> 0); a feature may detect a "
            "latent best when it fires strongly.",
        ),
        Mistake(
            "arithmetic mean",
            _f1_variant("mean"),
            "F1 is the HARMONIC mean of precision and recall, 2PR / (P + R), not (P + R) / 2.",
        ),
    ],
)


# --- sparse_probe ----------------------------------------------------------------------------------------------
#
# A probe leaves freedom (any fit that reaches the optimum closely enough, any order of the chosen latents, any
# choice among tied gaps), so every case runs the function through `_probe_call`, which reports what the contract
# names: the chosen latents and whether they are the k largest gaps, whether everything is finite, and the probe's
# AUROC and accuracy on held-out rows the function never sees. `_probe_judge` then checks those properties and
# holds the held-out scores to the reference's within a margin.

PROBE_AUROC_MARGIN = 0.02
PROBE_ACCURACY_MARGIN = 0.03


def _probe_call(fn, acts, labels, k, *, held_out=None, no_grad=False):
    """Run a sparse probe and describe its result in the contract's terms (a plain dict)."""
    try:
        if no_grad:
            with torch.no_grad():
                out = fn(acts, labels, k)
        else:
            out = fn(acts, labels, k)
    except ValueError:
        return {"raised": "ValueError"}
    except RuntimeError as e:
        if not no_grad:
            raise
        return {"failed_under_no_grad": f"{type(e).__name__}: {e}"}
    if not isinstance(out, tuple) or len(out) != 3:
        return {"malformed": f"a {type(out).__name__} instead of the tuple (features, w, b)"}
    features, w, b = (torch.as_tensor(v).detach() for v in out)
    report = {"k": int(k), "shape_features": list(features.shape), "shape_w": list(w.shape), "shape_b": list(b.shape)}
    if features.ndim != 1 or w.shape != features.shape or b.numel() != 1:
        return report
    if features.dtype.is_floating_point or features.dtype == torch.bool:
        report["features_dtype"] = str(features.dtype)
        return report
    d = acts.shape[1]
    chosen = features.long().tolist()
    report["in_range"] = all(0 <= i < d for i in chosen)
    report["distinct"] = len(set(chosen)) == len(chosen)
    report["finite"] = bool(torch.isfinite(w).all()) and bool(torch.isfinite(b).all())
    if not (report["in_range"] and report["distinct"]):
        return report
    y = labels.bool()
    gap = (acts[y].double().mean(0) - acts[~y].double().mean(0)).abs()
    kth = float(gap.topk(int(k)).values[-1])
    worst = min(chosen, key=lambda i: float(gap[i]))
    report["kth_gap"] = kth
    report["smallest_chosen"] = [worst, float(gap[worst])]
    if report["finite"] and held_out is not None:
        x_test, y_test = held_out
        scores = x_test[:, features.long()].double() @ w.double() + b.double().reshape(())
        report["held_out_auroc"] = float(sol.feature_aurocs(scores[:, None].float(), y_test)[0])
        report["held_out_accuracy"] = float(((scores > 0) == y_test).double().mean())
    return report


def _probe_judge(expected, got):
    """None when the sparse probe meets its contract on this case, else what failed, in the contract's words."""
    if "raised" in expected:
        return None if got == expected else "this input must raise a ValueError (k out of range, or a single class)"
    if "raised" in got:
        return "raised a ValueError on a valid input"
    if "failed_under_no_grad" in got:
        return (
            f"the function must work when the caller has turned gradients off; it raised {got['failed_under_no_grad']}"
        )
    if "malformed" in got:
        return f"returned {got['malformed']}"
    k = expected["k"]
    if got.get("shape_features") != [k] or got.get("shape_w") != [k] or got.get("shape_b") not in ([], [1]):
        return (
            f"features and w must hold k = {k} entries and b must be a scalar; got shapes "
            f"{got.get('shape_features')}, {got.get('shape_w')} and {got.get('shape_b')}"
        )
    if "features_dtype" in got:
        return f"features must be an integer tensor of latent indices, got {got['features_dtype']}"
    if not got["in_range"]:
        return "a chosen latent index is out of range"
    if not got["distinct"]:
        return f"the k = {k} chosen latents must be distinct; some latent was chosen twice"
    latent, gap = got["smallest_chosen"]
    if gap < got["kth_gap"] - 1e-6 * (1 + abs(got["kth_gap"])):
        return (
            f"the chosen latents must be the k = {k} with the largest gap between the class means; latent {latent} "
            f"was chosen with a gap of {gap:.4g}, below the k-th largest gap, {got['kth_gap']:.4g}"
        )
    if not got["finite"]:
        return "the weights or the bias are not finite (NaN or inf): a dead or constant latent broke the fit?"
    if "held_out_auroc" in expected:
        if got["held_out_auroc"] < expected["held_out_auroc"] - PROBE_AUROC_MARGIN:
            return (
                f"on held-out rows the probe ranks worse than a fit to the optimum: AUROC {got['held_out_auroc']:.3f}, "
                f"the reference reaches {expected['held_out_auroc']:.3f} (allowed: {PROBE_AUROC_MARGIN} less)"
            )
        if got["held_out_accuracy"] < expected["held_out_accuracy"] - PROBE_ACCURACY_MARGIN:
            return (
                f"on held-out rows the probe classifies worse than a fit to the optimum (log-odds above 0 = positive): "
                f"accuracy {got['held_out_accuracy']:.3f}, the reference reaches {expected['held_out_accuracy']:.3f} "
                f"(allowed: {PROBE_ACCURACY_MARGIN} less)"
            )
    return None


def _probe_rows(g, n, signal, noise_latents, *, flip=False, dead=0, big=0, positive_rate=0.5):
    """Synthetic latent activations: ``signal`` informative latents (firing on positives, or on negatives when
    ``flip``), ``noise_latents`` uninformative ones, ``dead`` that never fire and ``big`` huge uninformative ones."""
    y = torch.rand(n, generator=g) < positive_rate
    fire = y if not flip else ~y
    cols = []
    for j in range(signal):
        strength = 1.5 - 0.3 * j
        on = fire & (torch.rand(n, generator=g) < 0.8)
        cols.append(torch.relu(torch.randn(n, generator=g) * 0.5 + strength * on))
    for _ in range(noise_latents):
        cols.append(torch.relu(torch.randn(n, generator=g) * 0.7 + 0.3))
    for _ in range(big):
        cols.append(200.0 + torch.randn(n, generator=g) * 0.05)
    for _ in range(dead):
        cols.append(torch.zeros(n))
    x = torch.stack(cols, 1)
    perm = torch.randperm(x.shape[1], generator=g)
    return x[:, perm], y


def _probe_case(label, g, k, n_train=400, n_test=2000, **shape):
    x, y = _probe_rows(g, n_train + n_test, **shape)  # one draw, then split: the same latents on both sides
    return Case(
        label,
        (x[:n_train], y[:n_train], k),
        call=functools.partial(_probe_call, held_out=(x[n_train:], y[n_train:])),
        judge=_probe_judge,
    )


@functools.cache
def _review_latents():
    """The shipped TopK SAE's latents on review tokens (sentiment within reviews), split by document."""
    docs, _, _, acts = _model_data(n_docs=160, seed=11)
    names, labels = tinyworld_latents(docs, min_count=1)
    doc_of = torch.cat([torch.full((len(d.tokens) - 1,), i) for i, d in enumerate(docs)])
    pos, neg = labels[:, names.index("sentiment:positive")], labels[:, names.index("sentiment:negative")]
    rows = pos | neg
    with torch.no_grad():
        f = _shipped("topk").encode(acts)
    train = rows & (doc_of % 3 != 0)
    test = rows & (doc_of % 3 == 0)
    return f[train], pos[train], f[test], pos[test]


def _sparse_probe_cases():
    cases = [
        _probe_case(
            "the telling latent fires on the NEGATIVES (k = 1 of 8)", gen(40), 1, signal=1, noise_latents=7, flip=True
        ),
        _probe_case("two telling latents among 10 (k = 2)", gen(41), 2, signal=2, noise_latents=8),
        _probe_case(
            "dead latents (never fire) and two huge uninformative ones (k = 4 of 14)",
            gen(42),
            4,
            signal=2,
            noise_latents=6,
            dead=4,
            big=2,
        ),
        _probe_case(
            "imbalanced classes: 15% positives (k = 3 of 9)", gen(43), 3, signal=3, noise_latents=6, positive_rate=0.15
        ),
    ]
    cases.append(
        _probe_case(
            "k = 5 but only 3 latents ever fire: dead latents must be taken, and must not break the fit",
            gen(45),
            5,
            signal=2,
            noise_latents=1,
            dead=3,
        )
    )
    x_train, y_train, x_test, y_test = _review_latents()
    cases.append(
        Case(
            "the shipped TopK SAE: positive against negative reviews, k = 4 of 768 (held-out documents)",
            (x_train, y_train, 4),
            call=functools.partial(_probe_call, held_out=(x_test, y_test)),
            judge=_probe_judge,
        )
    )
    x_all, y_all = _probe_rows(gen(44), 1300, signal=2, noise_latents=6)
    x, y, x_test, y_test = x_all[:300], y_all[:300], x_all[300:], y_all[300:]
    cases.append(
        Case(
            "behaviour: works when the caller has turned gradients off (torch.no_grad)",
            (x, y, 2),
            call=functools.partial(_probe_call, held_out=(x_test, y_test), no_grad=True),
            judge=_probe_judge,
        )
    )
    cases.append(
        Case(
            "input that must raise: every label is True",
            (x, torch.ones(len(x), dtype=torch.bool), 2),
            call=_probe_call,
            judge=_probe_judge,
        )
    )
    cases.append(Case("input that must raise: k = 9 of 8 latents", (x, y, 9), call=_probe_call, judge=_probe_judge))
    return cases


def _probe_validate(acts, labels, k):
    n_pos = int(labels.bool().sum())
    if not 1 <= k <= acts.shape[1] or n_pos in (0, len(labels)):
        raise ValueError("k out of range or a single class")


def _probe_by_mean(acts, labels, k):
    _probe_validate(acts, labels, k)
    features = acts.double().mean(0).topk(k).indices
    _, w, b = sol.sparse_probe(acts[:, features], labels, k)
    return features, w, b


def _probe_signed_gap(acts, labels, k):
    _probe_validate(acts, labels, k)
    labels = labels.bool()
    gap = acts[labels].double().mean(0) - acts[~labels].double().mean(0)
    features = gap.topk(k).indices
    _, w, b = sol.sparse_probe(acts[:, features], labels, k)
    return features, w, b


def _probe_no_intercept(acts, labels, k):
    _probe_validate(acts, labels, k)
    features, _, _ = sol.sparse_probe(acts, labels, k)
    x = acts[:, features].double()
    w = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")
    y = labels.double()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y) + 1e-4 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return features, w.detach().float(), torch.tensor(0.0)


def _probe_unguarded(acts, labels, k):
    _probe_validate(acts, labels, k)
    labels = labels.bool()
    gap = (acts[labels].double().mean(0) - acts[~labels].double().mean(0)).abs()
    features = gap.topk(k).indices
    x = acts[:, features].double()
    mean, std = x.mean(0), x.std(0)
    W, bias = fit_probe((x - mean) / std, labels.long(), 2, weight_decay=1e-3)
    w = (W[:, 1] - W[:, 0]) / std
    return features, w.float(), ((bias[1] - bias[0]) - (mean * w).sum()).float()


def _probe_adam_no_enable_grad(acts, labels, k):
    _probe_validate(acts, labels, k)
    labels = labels.bool()
    gap = (acts[labels].double().mean(0) - acts[~labels].double().mean(0)).abs()
    features = gap.topk(k).indices
    x = acts[:, features].double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, labels.double())
        loss.backward()
        opt.step()
    w_raw = w.detach() / std
    return features, w_raw.float(), (b.detach() - (mean * w_raw).sum()).float()


register(
    "sparse_probe",
    CHAPTER,
    sol.sparse_probe,
    _sparse_probe_cases,
    mistakes=[
        Mistake(
            "latents chosen by mean activation",
            _probe_by_mean,
            "Choose the latents by how much their mean activation DIFFERS between the classes, not by how active they "
            "are: a latent that fires everywhere says nothing about the label.",
        ),
        Mistake(
            "only latents that fire more on positives",
            _probe_signed_gap,
            "Take the ABSOLUTE gap between the class means: a latent that fires on the negatives tells the classes "
            "apart as well as one that fires on the positives (the probe gives it a negative weight).",
        ),
        Mistake(
            "no intercept",
            _probe_no_intercept,
            "Fit a bias b too: without it the log-odds are 0 where the activations are 0, and with unequal classes "
            "the threshold lands in the wrong place.",
        ),
        Mistake(
            "dead latents divide by zero",
            _probe_unguarded,
            "A latent that never fires on the training rows has no spread: dividing by its standard deviation gives "
            "NaN. Leave such a column unscaled (its weight will be 0).",
        ),
        Mistake(
            "needs gradients on",
            _probe_adam_no_enable_grad,
            "Your fit needs autograd: wrap it in `with torch.enable_grad():` so that it also works when the caller "
            "has turned gradients off (or fit in closed form).",
        ),
    ],
    output_names=("features", "w", "b"),
)
