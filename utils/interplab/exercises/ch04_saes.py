"""Chapter 4 (sparse autoencoders): build, train, measure and interpret SAEs, then score them
against the features planted in TinyWorld.

Where a contract leaves freedom (which of several tied entries TopK keeps, the order of equally
strong contexts), a case's judge checks the contract's properties instead of one exact output.
Where it names a behaviour (gradients reach the weights through the loss, an input that must
raise, the training loop's schedule, projection and optimizer-state reset), a case's ``call``
runs the function under that behaviour and returns what was observed, in plain values.
"""

from __future__ import annotations

import functools
import math
import types

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ..dictionaries import SAE, SAEConfig
from ..dictionaries.config import DEFAULT_HOOK
from ..dictionaries.data import collect_acts, tinyworld_dataset
from ..dictionaries.latents import tinyworld_latents
from ..dictionaries.shipped import load_sae
from ..dictionaries.training import resample_sae_
from ..grading.compare import compare
from ..grading.plain import module_from_plain
from ..paths import chapter_of
from ..probes import fit_probe
from ..solutions import ch04_saes as sol
from . import Case, Mistake, gen, register, shared_model, under_no_grad

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


# --- behaviours shared by several exercises ----------------------------------------------------


def _raises(fn, *args, **kwargs) -> str:
    """Call fn and say whether it raised: "raised ValueError", or "returned" when it did not."""
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the learner's exception is the observation
        return f"raised {type(e).__name__}"
    return "returned"


def _must_raise(what: str):
    """A judge for a `_raises` case: the contract says this input raises a ValueError."""

    def judge(expected, got) -> str | None:
        if got == expected:
            return None
        if got == "returned":
            return f"{what} must raise a ValueError; your function returned a value instead"
        return f"{what} must raise a ValueError; your function {got} instead"

    return judge


def _grad_message(names: tuple[str, ...], expected: dict, got, through: str, rtol=1e-4, atol=1e-5) -> str | None:
    """Compare gradient dicts {name: tensor or None} in the contract's words."""
    if not isinstance(got, dict) or set(got) != set(expected):
        return f"expected the gradients of {', '.join(names)}, got {type(got).__name__}"
    for name in names:
        e, g = expected[name], got[name]
        if e is None and g is None:
            continue
        if g is None:
            return (
                f"no gradient reaches {name} through {through} (was it computed on detached tensors, under "
                f"torch.no_grad(), or passed through .item()?)"
            )
        if e is None:
            return f"a gradient reaches {name} through {through}, where none should"
        diff = compare(e, g, rtol, atol)
        if diff:
            return f"the gradient of {through} with respect to {name} is wrong: {diff}"
    return None


# --- sae_encode --------------------------------------------------------------------------

_ENCODE_ARGS = ("x", "W_enc", "b_enc", "b_dec")


def _encode_grads(fn, x, W_enc, b_enc, b_dec):
    """Backpropagate a fixed weighting of the activations; return each argument's gradient (None if none)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, W_enc, b_enc, b_dec)]
    out = fn(*leaves)
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        return dict.fromkeys(_ENCODE_ARGS)
    weights = torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape)
    grads = torch.autograd.grad((out * weights).sum(), leaves, allow_unused=True)
    return {n: (None if g is None else g.float()) for n, g in zip(_ENCODE_ARGS, grads)}


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
        Case(
            "behaviour: gradients reach x, W_enc, b_enc and b_dec",
            (
                torch.randn(6, 5, generator=g),
                torch.randn(5, 8, generator=g),
                torch.randn(8, generator=g),
                torch.randn(5, generator=g),
            ),
            call=_encode_grads,
            judge=lambda e, g: _grad_message(_ENCODE_ARGS, e, g, "the activations"),
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


def _encode_no_grad(x, W_enc, b_enc, b_dec):
    with torch.no_grad():
        return torch.relu((x - b_dec) @ W_enc + b_enc)


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
            "The encoder reads x relative to the decoder bias: subtract b_dec from the input before encoding.",
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
        Mistake(
            "computed without gradients",
            _encode_no_grad,
            "The activations feed the training loss, so gradients must flow back to every weight: do not "
            "compute them under torch.no_grad() or on detached tensors.",
        ),
    ],
    rtol=1e-4,
    atol=1e-5,
)


# --- sae_loss ------------------------------------------------------------------------------

_LOSS_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _loss_grads(fn, x, W_enc, b_enc, W_dec, b_dec, l1_coeff):
    """Run a standard SAE forward from leaf weights, hand its pieces to fn, and backpropagate each returned term.

    Returns {"loss": {...}, "mse": {...}, "l1": {...}}: the gradient of that term with respect to each weight.
    """
    leaves = [t.detach().clone().requires_grad_(True) for t in (W_enc, b_enc, W_dec, b_dec)]
    W_enc, b_enc, W_dec, b_dec = leaves
    acts = torch.relu((x - b_dec) @ W_enc + b_enc)
    x_hat = acts @ W_dec + b_dec
    out = fn(x, x_hat, acts, W_dec, l1_coeff)
    result = {}
    for i, term in enumerate(("loss", "mse", "l1")):
        value = out[i] if isinstance(out, (tuple, list)) and len(out) == 3 else None
        if isinstance(value, torch.Tensor) and value.requires_grad and value.numel() == 1:
            grads = torch.autograd.grad(value.sum(), leaves, allow_unused=True, retain_graph=True)
            result[term] = {n: (None if g is None else g.float()) for n, g in zip(_LOSS_PARAMS, grads)}
        else:
            result[term] = dict.fromkeys(_LOSS_PARAMS)
    return result


def _loss_grad_judge(expected, got) -> str | None:
    if not isinstance(got, dict) or set(got) != {"loss", "mse", "l1"}:
        return f"expected gradients of loss, mse and l1, got {type(got).__name__}"
    found = []
    for term, through in (("l1", "the sparsity penalty l1"), ("mse", "mse"), ("loss", "the loss")):
        msg = _grad_message(_LOSS_PARAMS, expected[term], got[term], through, rtol=1e-4, atol=1e-5)
        if msg:
            found.append(msg)
    return "; and ".join(found) if found else None


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
            "random: batch 6, d 5, d_sae 8, non-unit decoder, some negative activations",
            (
                x,
                x + 0.3 * torch.randn(6, 5, generator=g),
                torch.randn(6, 8, generator=g),
                torch.randn(8, 5, generator=g),
                0.7,
            ),
        )
    )
    cases.append(
        Case(
            "behaviour: gradients reach W_enc, b_enc, W_dec and b_dec through mse, l1 and the loss",
            (
                torch.randn(7, 4, generator=g),
                torch.randn(4, 9, generator=g),
                torch.randn(9, generator=g) * 0.5,
                torch.randn(9, 4, generator=g),
                torch.randn(4, generator=g) * 0.3,
                0.8,
            ),
            call=_loss_grads,
            judge=_loss_grad_judge,
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


def _loss_no_abs(x, x_hat, acts, W_dec, l1_coeff):
    mse = (x_hat - x).pow(2).sum(-1).mean()
    l1 = (acts * W_dec.norm(dim=-1)).sum(-1).mean()
    return mse + l1_coeff * l1, mse, l1


def _loss_detached_penalty(x, x_hat, acts, W_dec, l1_coeff):
    mse = (x_hat - x).pow(2).sum(-1).mean()
    l1 = (acts.detach().abs() * W_dec.norm(dim=-1)).sum(-1).mean()
    return mse + l1_coeff * l1, mse, l1


def _loss_items(x, x_hat, acts, W_dec, l1_coeff):
    mse = (x_hat - x).pow(2).sum(-1).mean().item()
    l1 = (acts.abs() * W_dec.norm(dim=-1)).sum(-1).mean().item()
    return torch.tensor(mse + l1_coeff * l1), torch.tensor(mse), torch.tensor(l1)


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
            "Weight each feature's |activation| by the norm of its decoder row; otherwise the SAE can shrink its "
            "activations and grow its decoder to dodge the penalty.",
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
        Mistake(
            "no absolute value",
            _loss_no_abs,
            "The penalty is on the ABSOLUTE activations: with negative values in acts, a plain sum lets them "
            "cancel the positive ones.",
        ),
        Mistake(
            "penalty on detached activations",
            _loss_detached_penalty,
            "The penalty's value is right, but it was computed on detached activations, so it never pushes the "
            "encoder towards sparsity: keep acts attached to the graph in the L1 term.",
        ),
        Mistake(
            "values through .item()",
            _loss_items,
            "The optimizer differentiates these values: compute them with tensor operations and return the "
            "tensors themselves; .item() (or torch.tensor(...) of a number) cuts them off from the weights.",
        ),
    ],
    rtol=1e-4,
    atol=1e-5,
)


# --- remove_parallel_grad ----------------------------------------------------------------


def _parallel_cases():
    g = gen(2)
    w = torch.randn(7, 5, generator=g)
    rows = torch.randn(5, 6, generator=g) * torch.tensor([[0.5], [1.0], [2.0], [3.0], [0.8]])
    along = rows * torch.tensor([[2.0], [-1.0], [0.5], [0.0], [3.0]])
    across = torch.randn(5, 6, generator=g)
    across = across - (across * rows).sum(-1, keepdim=True) / rows.pow(2).sum(-1, keepdim=True) * rows
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
        Case("property: a gradient parallel to its (non-unit) row comes back as zeros", (rows, along)),
        Case("property: a gradient orthogonal to its (non-unit) row comes back unchanged", (rows, across)),
    ]


def _parallel_not_normalised(W_dec, grad):
    return grad - (grad * W_dec).sum(-1, keepdim=True) * W_dec


def _parallel_returned(W_dec, grad):
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True)
    return (grad * unit).sum(-1, keepdim=True) * unit


def _parallel_columns(W_dec, grad):
    unit = W_dec / W_dec.norm(dim=0, keepdim=True)
    return grad - (grad * unit).sum(-1, keepdim=True) * unit


def _parallel_whole_matrix(W_dec, grad):
    unit = W_dec / W_dec.norm()
    return grad - (grad * unit).sum() * unit


register(
    "remove_parallel_grad",
    CHAPTER,
    sol.remove_parallel_grad,
    _parallel_cases,
    mistakes=[
        Mistake(
            "direction not normalised",
            _parallel_not_normalised,
            "Project onto the UNIT vector along each decoder row; with a row of norm r the projection is "
            "scaled by r^2.",
        ),
        Mistake(
            "returns the parallel part",
            _parallel_returned,
            "Return what is left after removing the parallel part, not the parallel part itself: a gradient "
            "parallel to its row comes back as zeros.",
        ),
        Mistake(
            "normalised over the wrong axis",
            _parallel_columns,
            "Each feature's direction is a ROW of W_dec ([d_sae, d]): normalise each row, not each column.",
        ),
        Mistake(
            "one projection for the whole matrix",
            _parallel_whole_matrix,
            "Every row gets its own projection: remove from gradient row i its component along decoder row i "
            "(a dot product per row), not one component of the flattened matrix.",
        ),
    ],
    rtol=1e-4,
    atol=1e-5,
)


# --- topk_activation and batchtopk_activation: any choice among ties is right ----------------------


def _kept_judge(pre_acts: torch.Tensor, per_row: bool):
    """A judge for (batch-)top-k: the multiset of kept values and that every kept entry is its own pre-activation.

    Which of several tied entries is kept is free; what is kept, and that it sits where that value was, is not.
    """
    relu = pre_acts.relu()
    unit = "row" if per_row else "batch"

    def problems(out) -> list[str]:
        if not isinstance(out, torch.Tensor) or out.shape != pre_acts.shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            return [f"expected a tensor shaped like pre_acts {tuple(pre_acts.shape)}, got {shape}"]
        out = out.detach().double()
        bad = (out != 0) & ~torch.isclose(out, relu.double(), rtol=1e-5, atol=1e-6)
        if bad.any():
            r, c = (int(i) for i in bad.nonzero()[0])
            return [
                f"entry [{r}, {c}] is {out[r, c].item():.6g}, but every entry must be 0 or its own ReLU'd "
                f"pre-activation ({relu[r, c].item():.6g})"
            ]
        return []

    def judge(expected, got) -> str | None:
        found = problems(got)
        if found != problems(expected):
            return found[0] if found else "your output keeps entries where it should not"
        e = expected.detach().double()
        g = got.detach().double()
        if per_row:
            e_sorted, g_sorted = e.sort(-1, descending=True).values, g.sort(-1, descending=True).values
        else:
            e_sorted, g_sorted = e.flatten().sort(descending=True).values, g.flatten().sort(descending=True).values
        close = torch.isclose(g_sorted, e_sorted, rtol=1e-5, atol=1e-6)
        if bool(close.all()):
            return None
        e_nz, g_nz = (e_sorted != 0).sum(-1), (g_sorted != 0).sum(-1)
        if per_row:
            r = int((~close).any(-1).nonzero()[0])
            return (
                f"row {r} keeps {int(g_nz[r])} non-zero values {[round(v, 4) for v in g_sorted[r][: int(g_nz[r])].tolist()]}; "
                f"its k largest pre-activations, ReLU'd, give {int(e_nz[r])}: "
                f"{[round(v, 4) for v in e_sorted[r][: int(e_nz[r])].tolist()]}"
            )
        return (
            f"the {unit} keeps {int(g_nz)} non-zero values (largest {[round(v, 4) for v in g_sorted[:6].tolist()]}); "
            f"its k * batch largest positive pre-activations are {int(e_nz)} values "
            f"(largest {[round(v, 4) for v in e_sorted[:6].tolist()]})"
        )

    return judge


def _topk_case(label, pre_acts, k):
    return Case(label, (pre_acts, k), judge=_kept_judge(pre_acts, per_row=True))


def _topk_cases():
    g = gen(3)
    return [
        _topk_case(
            "k=2 with a negative value among the top 2",
            torch.tensor([[3.0, -1.0, -2.0, -5.0], [0.5, 2.0, 1.0, -0.1]]),
            2,
        ),
        _topk_case("random: batch 3 (more rows than k), d_sae 12, k=2", torch.randn(3, 12, generator=g), 2),
        _topk_case("random: batch 6, d_sae 10, k=3", torch.randn(6, 10, generator=g), 3),
        _topk_case("k=1", torch.randn(4, 8, generator=g), 1),
        _topk_case("k = d_sae keeps every positive value", torch.randn(3, 5, generator=g), 5),
        _topk_case(
            "ties at the k-th place: exactly k entries survive",
            torch.tensor(
                [[2.0, 1.0, 1.0, 1.0, 0.5, -1.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [3.0, 0.2, 0.2, 5.0, 0.2, 0.1]]
            ),
            3,
        ),
        _topk_case(
            "a row where no pre-activation is positive, and a row with a single positive one",
            torch.tensor([[-0.5, -1.0, -0.2, -3.0, -0.1], [-1.0, 0.7, -0.3, -0.4, -2.0]]),
            2,
        ),
    ]


def _topk_batch_axis(pre_acts, k):
    values, indices = pre_acts.topk(k, dim=0)
    return torch.zeros_like(pre_acts).scatter(0, indices, values.relu())


def _topk_abs(pre_acts, k):
    indices = pre_acts.abs().topk(k, dim=-1).indices
    return torch.zeros_like(pre_acts).scatter(-1, indices, pre_acts.gather(-1, indices).relu())


def _topk_threshold(pre_acts, k):
    kth = pre_acts.topk(k, dim=-1).values[..., -1:]
    return torch.where(pre_acts >= kth, pre_acts.relu(), torch.zeros_like(pre_acts))


def _topk_relu_first_then_threshold(pre_acts, k):
    acts = pre_acts.relu()
    kth = acts.topk(k, dim=-1).values[..., -1:]
    return torch.where((acts >= kth) & (acts > 0), acts, torch.zeros_like(acts))


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
            "Select the top k within each row (each token), not across the batch.",
        ),
        Mistake(
            "largest magnitude", _topk_abs, "Keep the k LARGEST pre-activations, not the k largest in absolute value."
        ),
        Mistake(
            "threshold keeps every tie",
            _topk_threshold,
            "Comparing with the k-th largest value keeps EVERY entry tied with it, so a row can keep more than k. "
            "Select k entries (for example by index), whichever of the tied ones they are.",
        ),
    ],
)


def _batchtopk_case(label, pre_acts, k):
    return Case(label, (pre_acts, k), judge=_kept_judge(pre_acts, per_row=False))


def _batchtopk_cases():
    g = gen(4)
    return [
        _batchtopk_case(
            "k=1, one row has both large values", torch.tensor([[5.0, 4.0, -1.0, 0.0], [1.0, 0.5, 0.2, -2.0]]), 1
        ),
        _batchtopk_case("random: batch 8, d_sae 16, k=3", torch.randn(8, 16, generator=g), 3),
        _batchtopk_case("fewer positive values than k * batch", torch.randn(4, 3, generator=g) - 1.0, 2),
        _batchtopk_case(
            "ties at the cut: exactly k * batch entries survive",
            torch.tensor([[3.0, 1.0, 1.0, -1.0], [1.0, 0.2, 1.0, 2.0], [1.0, -0.5, 0.1, 0.3]]),
            1,
        ),
        _batchtopk_case("no positive pre-activation at all", -torch.rand(3, 5, generator=g) - 0.1, 2),
        _batchtopk_case("k * batch larger than the batch has entries", torch.randn(2, 3, generator=g), 4),
    ]


def _batchtopk_total_k(pre_acts, k):
    flat = pre_acts.relu().flatten()
    values, indices = flat.topk(k)
    return torch.zeros_like(flat).scatter(0, indices, values).reshape(pre_acts.shape)


def _batchtopk_no_relu(pre_acts, k):
    flat = pre_acts.flatten()
    values, indices = flat.topk(min(k * pre_acts.shape[0], flat.numel()))
    return torch.zeros_like(flat).scatter(0, indices, values).reshape(pre_acts.shape)


def _batchtopk_threshold(pre_acts, k):
    acts = pre_acts.relu()
    flat = acts.flatten()
    kth = flat.topk(min(k * pre_acts.shape[0], flat.numel())).values[-1]
    return torch.where(acts >= kth, acts, torch.zeros_like(acts))


register(
    "batchtopk_activation",
    CHAPTER,
    sol.batchtopk_activation,
    _batchtopk_cases,
    mistakes=[
        Mistake(
            "per-row top-k",
            lambda pre_acts, k: sol.topk_activation(pre_acts, k),
            "That is TopK: each row keeps exactly k. BatchTopK pools the whole batch and keeps its "
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
        Mistake(
            "threshold keeps every tie",
            _batchtopk_threshold,
            "Comparing with the (k * batch)-th largest value keeps EVERY entry tied with it, so the batch can keep "
            "more than k * batch. Select that many entries, whichever of the tied ones they are.",
        ),
    ],
)


# --- resample_dead_features --------------------------------------------------------------------


def _resample_cases():
    g = gen(5)

    def random_case(d_in, d_sae, batch, n_dead, scale=0.2, spread=False):
        W_enc = torch.randn(d_in, d_sae, generator=g)
        if spread:
            W_enc = W_enc * torch.logspace(-1, 1, d_sae)
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
        Case("live encoder columns of very different norms, 2 dead", random_case(5, 7, 6, 2, spread=True)),
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
        if kind == "all columns":
            norm = W_enc.norm(dim=0).mean()
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
            "Use the rows the SAE reconstructs WORST (largest squared error), worst first: that is where a new feature "
            "helps.",
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
            "encoder scale from every column",
            _resample_variant("all columns"),
            "Measure the encoder scale on the LIVE features' columns only: the dead ones are about to be replaced, "
            "and their old norms say nothing about what fires.",
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
# How much worse than the reference a correct loop may end. These runs are short, so the final loss depends on the
# seed's draw (initialisation, batch order): correct loops with other draws ended between 0.11x and 1.6x the
# reference's loss on these cases (20 draws each), float64 within 0.1%. A loop that never zeroes its gradients
# ends at 2.2x to 20x, one that never resamples at 4.3x on the one-hot data. The floor (a tenth of what predicting
# the mean row costs) keeps a lucky reference draw on easy data from setting the bar.
_LOSS_FACTOR = 2.0
_LOSS_FLOOR = 0.1


def _quality(sae, x) -> float:
    p = next(sae.parameters())
    with torch.no_grad():
        return float(sae.loss(x.to(p.dtype)).loss)


def _sae_problems(sae, cfg: SAEConfig, must_resample: bool) -> list[tuple[str, str]]:
    """(key, message) for every property of a trained SAE's contract that ``sae`` breaks."""
    if not isinstance(sae, torch.nn.Module) or not all(hasattr(sae, a) for a in ("cfg", "loss", "W_dec", "info")):
        return [("type", f"expected the trained SAE (an interplab SAE module with .info), got {type(sae).__name__}")]
    found = []
    if sae.cfg != cfg:
        found.append(("config", f"the returned SAE has config {sae.cfg}, expected {cfg}; build it from cfg"))
    if sae.training:
        found.append(
            (
                "training",
                "the returned SAE is still in training mode: put it in eval mode before returning it (a BatchTopK "
                "SAE selects features per batch while training and with its learned threshold in eval mode)",
            )
        )
    dev = float((sae.W_dec.detach().double().norm(dim=-1) - 1).abs().max())
    if not dev < 1e-3:
        found.append(
            ("norm", "decoder rows should have unit norm after training (renormalised after every step); some do not")
        )
    info = sae.info if isinstance(sae.info, dict) else {}
    resampled = info.get("resampled")
    if not isinstance(resampled, int) or isinstance(resampled, bool):
        found.append(("info", f"sae.info['resampled'] should count the resampled features, got {resampled!r}"))
    elif must_resample and resampled == 0:
        found.append(
            (
                "resampled",
                "sae.info['resampled'] is 0, but on this data features die (one direction per row, k=1) and must "
                "be resampled every resample_every steps once silent for dead_after steps",
            )
        )
    return found


def _trained_judge(cfg: SAEConfig, must_resample: bool):
    data = _train_data()[cfg.d_in]

    def judge(expected, got) -> str | None:
        expected, got = module_from_plain(expected), module_from_plain(got)  # the grader compares plain copies
        e_found, g_found = _sae_problems(expected, cfg, must_resample), _sae_problems(got, cfg, must_resample)
        if [k for k, _ in g_found] != [k for k, _ in e_found]:
            if not g_found:
                return "your SAE meets properties the expected one does not"
            return "; and ".join(message for _, message in g_found)
        if any(k == "type" for k, _ in g_found):
            return None
        e_loss, g_loss = _quality(expected, data), _quality(got, data)
        bar = max(_LOSS_FACTOR * e_loss, _LOSS_FLOOR * float((data - data.mean(0)).pow(2).sum(-1).mean()))
        if not g_loss <= bar:
            return (
                f"after training, the SAE's loss on its training data is {g_loss:.4g}; a loop that meets the "
                f"contract reaches about {e_loss:.4g} (at most {bar:.4g} is accepted)"
            )
        return None

    return judge


def _watch_training(fn, acts, cfg, **kwargs):
    """Train with fn while watching every optimizer step; return what was seen, in plain values.

    Seen at each step, before the optimizer moves: the learning rate, how parallel the decoder's gradient is to the
    decoder rows, and, for decoder rows that changed direction since the previous step (resampled features), whether
    their Adam moments are zero. Also the decoder bias before the first step.
    """
    d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out
    seen = {
        "lrs": [],
        "max_parallel_cos": 0.0,
        "max_norm_deviation": 0.0,
        "resampled_seen": 0,
        "stale_features": 0,
        "b_dec_start": None,
    }
    previous = {}

    def roles(opt):
        found = {}
        for group in opt.param_groups:
            for p in group["params"]:
                shape = tuple(p.shape)
                name = {(d_sae, d_out): "W_dec", (d_in, d_sae): "W_enc", (d_sae,): "b_enc", (d_out,): "b_dec"}.get(
                    shape
                )
                if name:
                    found[name] = (p, group)
        return found

    def before_step(opt, args, kw):
        found = roles(opt)
        if "W_dec" not in found:
            return
        W, group = found["W_dec"]
        lr = group["lr"]
        seen["lrs"].append(float(lr))
        with torch.no_grad():
            if seen["b_dec_start"] is None and "b_dec" in found:
                seen["b_dec_start"] = found["b_dec"][0].detach().double().clone()
            w = W.detach().double()
            deviation = float((w.norm(dim=-1) - 1).abs().max())
            seen["max_norm_deviation"] = max(seen["max_norm_deviation"], deviation)
            if W.grad is not None:
                g = W.grad.detach().double()
                gn, wn = g.norm(dim=-1), w.norm(dim=-1)
                live = gn > 1e-9 * float(gn.max().clamp_min(1e-300))
                if live.any():
                    cos = ((g * w).sum(-1).abs() / (gn * wn).clamp_min(1e-300))[live]
                    seen["max_parallel_cos"] = max(seen["max_parallel_cos"], float(cos.max()))
            last = previous.get(id(W))
            if last is not None:
                moved = torch.nn.functional.cosine_similarity(w, last, dim=-1) < 0.999
                if moved.any():
                    stale = torch.zeros(d_sae, dtype=torch.bool)
                    for name, axis in (("W_dec", 0), ("W_enc", 1), ("b_enc", 0)):
                        if name not in found:
                            continue
                        p = found[name][0]
                        state = opt.state.get(p, {})
                        for key in ("exp_avg", "exp_avg_sq"):
                            v = state.get(key)
                            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                                per_feature = (v != 0).reshape(v.shape[0], -1).any(-1) if axis == 0 else (v != 0).any(0)
                                stale |= per_feature.cpu()
                    seen["resampled_seen"] += int(moved.sum())
                    seen["stale_features"] += int((stale & moved.cpu()).sum())

    def after_step(opt, args, kw):
        found = roles(opt)
        if "W_dec" in found:
            W = found["W_dec"][0]
            previous[id(W)] = W.detach().double().clone()

    pre = register_optimizer_step_pre_hook(before_step)
    post = register_optimizer_step_post_hook(after_step)
    try:
        sae = fn(acts, cfg, **kwargs)
    finally:
        pre.remove()
        post.remove()
    info = getattr(sae, "info", None)
    start = seen.pop("b_dec_start")
    mean = acts.double().mean(0)
    seen["b_dec_start_error"] = None if start is None else float((start - mean).abs().max())
    seen["info_resampled"] = info.get("resampled") if isinstance(info, dict) else None
    return seen


def _trace_problems(trace, steps: int, lr: float) -> list[tuple[str, str]]:
    if not isinstance(trace, dict) or not trace.get("lrs"):
        return [("steps", "no optimizer step touched the SAE's decoder: train the SAE's own parameters with Adam")]
    lrs = trace["lrs"]
    found = []
    if len(lrs) != steps:
        found.append(("steps", f"the optimizer should step exactly steps={steps} times; it stepped {len(lrs)} times"))
        return found
    decay_start = int(0.8 * steps)
    early = next((t for t in range(decay_start - 1) if not math.isclose(lrs[t], lr, rel_tol=1e-6)), None)
    mid = int(0.9 * steps)
    if early is not None:
        found.append(
            (
                "lr",
                f"the learning rate should stay at lr={lr:g} for the first 80% of the steps; it did not",
            )
        )
    elif lrs[-1] > 1.5 * lr / (steps - decay_start) or not 0.35 * lr <= lrs[mid] <= 0.65 * lr:
        found.append(
            (
                "lr",
                f"the learning rate should fall linearly from lr={lr:g} to 0 over the last 20% of the steps "
                f"(about {lr / 2:.3g} at step {mid} of {steps}, about 0 at the last step); it did not",
            )
        )
    elif any(b > a * (1 + 1e-6) for a, b in zip(lrs, lrs[1:])):
        found.append(("lr", "the learning rate should never rise; it fell and rose again"))
    if trace["max_parallel_cos"] > 1e-3:
        found.append(
            (
                "parallel",
                "when the optimizer steps, the decoder's gradient should have no component along the decoder "
                "rows; it had one",
            )
        )
    if trace["max_norm_deviation"] > 1e-3:
        found.append(
            (
                "norm",
                "decoder rows should have unit norm whenever the optimizer steps (renormalised after every "
                "step); some did not",
            )
        )
    if trace["stale_features"]:
        found.append(
            (
                "stale",
                "resampled features should start with cleared Adam statistics (exp_avg and exp_avg_sq zero) at "
                "the next step; some still had their old ones",
            )
        )
    if trace["resampled_seen"] == 0:
        found.append(("resample", "no feature was resampled, though on this data features die and must come back"))
    err = trace["b_dec_start_error"]
    if err is None or err > 1e-4:
        found.append(("b_dec", "the decoder bias should start at the mean row of the target, before the first step"))
    return found


def _trace_judge(steps: int, lr: float):
    def judge(expected, got) -> str | None:
        e_found, g_found = _trace_problems(expected, steps, lr), _trace_problems(got, steps, lr)
        if [k for k, _ in g_found] != [k for k, _ in e_found]:
            if not g_found:
                return "your training loop meets properties the expected one does not"
            return "; and ".join(message for _, message in g_found)
        return None

    return judge


def _seeded_runs(fn, acts, cfg, **kwargs):
    """Train three times (seed, the same seed again, another seed); say which runs gave identical SAEs."""

    def weights(seed):
        sae = fn(acts, cfg, **{**kwargs, "seed": seed})
        return [t.detach().double().clone() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]

    first, again, other = weights(kwargs["seed"]), weights(kwargs["seed"]), weights(kwargs["seed"] + 1)
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731
    return {"same seed, same SAE": same(first, again), "another seed, another SAE": not same(first, other)}


def _seeded_judge(expected, got) -> str | None:
    if not isinstance(got, dict) or set(got) != set(expected):
        return f"expected the observations {sorted(expected)}, got {got!r}"
    if not got["same seed, same SAE"]:
        return (
            "two runs with the same seed gave different SAEs: seed the initialisation and the batch order from "
            "seed, inside the function"
        )
    if not got["another seed, another SAE"]:
        return "runs with different seeds gave the same SAE: the initialisation and batch order must follow seed"
    return None


_WATCH_KW = dict(steps=150, batch_size=128, lr=3e-3, seed=2, dead_after=20, resample_every=25, progress=False)


def _train_cases():
    data = _train_data()
    cases = [
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
        Case(
            "behaviour (TopK k=1, one-hot data, 150 steps): the learning-rate schedule, a decoder gradient "
            "orthogonal to the rows at every step, Adam statistics cleared on resampling, b_dec starting at the mean",
            (data[16], SAEConfig(d_in=16, d_sae=48, architecture="topk", k=1)),
            dict(_WATCH_KW),
            call=_watch_training,
            judge=_trace_judge(_WATCH_KW["steps"], _WATCH_KW["lr"]),
        ),
        Case(
            "behaviour (standard SAE, L1 1.0, 100 steps): the same properties while the penalty pulls on the "
            "decoder's length",
            (data[8], SAEConfig(d_in=8, d_sae=32, architecture="standard", l1_coeff=1.0)),
            dict(steps=100, batch_size=128, lr=3e-3, seed=3, dead_after=15, resample_every=20, progress=False),
            call=_watch_training,
            judge=_trace_judge(100, 3e-3),
        ),
    ]
    cases.append(
        Case(
            "behaviour: the same seed gives the same SAE, another seed another one (BatchTopK, 30 steps)",
            (data[12], SAEConfig(d_in=12, d_sae=40, architecture="batchtopk", k=2)),
            dict(steps=30, batch_size=128, lr=3e-3, seed=4, dead_after=10, resample_every=10, progress=False),
            call=_seeded_runs,
            judge=_seeded_judge,
        )
    )
    for case in cases[:3]:
        case.judge = _trained_judge(case.args[1], must_resample=case.args[0] is data[16])
    return cases


def _train_variant(
    zero_grad: bool = True,
    normalize: bool = True,
    project: bool = True,
    resample: bool = True,
    eval_mode: bool = True,
    decay: bool = True,
    clear_state: bool = True,
    mean_init: bool = True,
    seeded: bool = True,
):
    """The reference training loop with one part of the contract left out."""

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
        if seeded:
            torch.manual_seed(seed)
        sae = SAE(cfg)
        if mean_init:
            with torch.no_grad():
                sae.b_dec.copy_(target.mean(0))
        opt = torch.optim.Adam(sae.parameters(), lr=lr)
        decay_start = int(0.8 * steps)
        order = torch.Generator().manual_seed(seed) if seeded else None
        perm, cursor = torch.randperm(len(acts), generator=order), 0
        since = torch.zeros(cfg.d_sae, dtype=torch.long)
        n_resampled = 0
        sae.train()
        for step in range(steps):
            if cursor + batch_size > len(perm):
                perm, cursor = torch.randperm(len(acts), generator=order), 0
            idx = perm[cursor : cursor + batch_size]
            cursor += batch_size
            if decay:
                for group in opt.param_groups:
                    group["lr"] = lr * min(1.0, (steps - step) / max(1, steps - decay_start))
            out = sae.loss(acts[idx], target[idx])
            if zero_grad:
                opt.zero_grad()
            out.loss.backward()
            if normalize and project:
                sae.remove_parallel_grad_()
            opt.step()
            if normalize:
                sae.normalize_decoder_()
            with torch.no_grad():
                since = torch.where((out.acts > 0).any(0), 0, since + 1)
                if resample and (step + 1) % resample_every == 0 and step < decay_start:
                    dead = since >= dead_after
                    if dead.any():
                        # without clear_state: the same new weights, but the optimizer's statistics are kept
                        resample_sae_(
                            sae,
                            opt if clear_state else torch.optim.Adam([torch.zeros(1)]),
                            dead,
                            acts[idx],
                            target[idx],
                            out.x_hat,
                        )
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
            "Zero the gradients every step; otherwise they accumulate over all past batches.",
        ),
        Mistake(
            "decoder not renormalised",
            _train_variant(normalize=False),
            "Rescale the decoder rows to unit norm after every optimizer step (and keep the gradient along them "
            "out of the step).",
        ),
        Mistake(
            "no resampling",
            _train_variant(resample=False),
            "Track how many steps each feature has gone without firing, and every resample_every steps "
            "resample those silent for dead_after steps (and count them in sae.info['resampled']).",
        ),
        Mistake(
            "left in training mode", _train_variant(eval_mode=False), "Put the SAE in eval mode before returning it."
        ),
        Mistake(
            "no learning-rate decay",
            _train_variant(decay=False),
            "Keep the learning rate at lr for the first 80% of the steps, then lower it linearly to 0 by the last "
            "step (set it in the optimizer's param_groups before each step, or use a scheduler).",
        ),
        Mistake(
            "decoder gradient not projected",
            _train_variant(project=False),
            "Before each optimizer step, remove from the decoder's gradient its component along each decoder row "
            "(your remove_parallel_grad does it); renormalising afterwards is not enough for Adam.",
        ),
        Mistake(
            "optimizer statistics kept on resampling",
            _train_variant(clear_state=False),
            "When you resample features, zero their entries of Adam's exp_avg and exp_avg_sq (in opt.state of "
            "W_enc, b_enc and W_dec): the old moments belong to the old, dead weights.",
        ),
        Mistake(
            "not seeded",
            _train_variant(seeded=False),
            "Seed inside the function, from the seed argument: torch.manual_seed(seed) before building the SAE, "
            "and a generator seeded from it for the batch order, so that a run can be repeated.",
        ),
        Mistake(
            "decoder bias not started at the mean",
            _train_variant(mean_init=False),
            "Set the decoder bias to the mean row of the target before training, so that the SAE starts by "
            "predicting the average activation.",
        ),
    ],
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
        Case("property: predicting the mean row for every token explains 0", (x, x.mean(0).expand_as(x).clone())),
        Case("property: a perfect reconstruction explains 1", (x, x.clone())),
        Case(
            "dimensions with different means and scales",
            (
                torch.randn(30, 4, generator=g) * torch.tensor([0.1, 1.0, 3.0, 0.5])
                + torch.tensor([4.0, -2.0, 0.0, 9.0]),
                torch.randn(30, 4, generator=g),
            ),
        ),
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


def _ev_scalar_mean(x, x_hat):
    return (1 - (x - x_hat).pow(2).sum() / (x - x.mean()).pow(2).sum()).item()


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
        Mistake(
            "centred on one number",
            _ev_scalar_mean,
            "The mean to subtract is the mean ROW (one mean per dimension), not the mean of all entries: each "
            "dimension of the residual stream has its own offset.",
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
    cases.append(
        Case(
            "a token where no feature fires and the reconstruction is all zero",
            (
                torch.tensor([[3.0, 4.0], [1.0, -1.0], [0.5, 2.0]]),
                torch.tensor([[0.0, 0.0], [1.0, -0.5], [0.0, 1.0]]),
                torch.tensor([[0.0, 0.0, 0.0], [1.5, 0.0, 0.2], [0.0, 0.9, 0.0]]),
            ),
        )
    )
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
        elif kind == "cos nan":
            out["cosine_sim"] = ((x * x_hat).sum(-1) / (x.norm(dim=-1) * x_hat.norm(dim=-1))).mean().item()
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
        Mistake(
            "NaN on a zero reconstruction",
            _recon_variant("cos nan"),
            "A token whose reconstruction is all zero has no direction: its cosine similarity counts as 0 (guard "
            "the division, as torch's cosine_similarity does with its eps), or one such token makes the mean NaN.",
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
        Case(
            "tokens where no feature fires",
            (torch.tensor([[0.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.2, 0.0, 0.0]]),),
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
            "Density counts how OFTEN a feature fires (the share of tokens where it is non-zero), not how strongly.",
        ),
        Mistake(
            "counts, not fractions",
            lambda acts: (acts != 0).float().sum(0),
            "Divide by the number of tokens: density is a fraction in [0, 1].",
        ),
        Mistake(
            "over features",
            lambda acts: (acts != 0).float().mean(-1),
            "Average over tokens (the rows) to get one value per feature; averaging over features gives one value "
            "per token (that is L0 / d_sae).",
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
        Case(
            "behaviour: works when the caller has turned gradients off (standard SAE, 4 documents)",
            (model, _shipped("standard"), ids[4:8], mask[4:8]),
            call=under_no_grad,
        ),
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
        elif kind == "from bos":
            scored = keep[:, 1:]
        elif kind == "into padding":
            scored = keep[:, :-1]
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
            "Replace the activation only where mask is True and keep the clean one elsewhere: the SAE never saw "
            "<bos> or padding in training, and reconstructing them badly is not its fault.",
        ),
        Mistake(
            "scored everywhere",
            _splice_variant("all positions"),
            "Score only predictions whose position and next position are both in the mask: predictions from <bos> "
            "or of padding tokens are not part of the text.",
        ),
        Mistake(
            "predictions from <bos> scored",
            _splice_variant("from bos"),
            "Score a prediction only when BOTH its position and the next are in the mask: the prediction made at "
            "<bos> is outside the text the SAE reads.",
        ),
        Mistake(
            "predictions of padding scored",
            _splice_variant("into padding"),
            "Score a prediction only when BOTH its position and the next are in the mask: the last real token's "
            "prediction of a padding token is not part of the text.",
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


def _contexts_judge(feature_acts: torch.Tensor, mask: torch.Tensor, k: int):
    """Any order among equal activations (and any choice at the last place) is right; the values are not free."""
    n = min(k, int(mask.sum()))
    n_pos = feature_acts.shape[1]

    def problems(out) -> list[tuple[str, str]]:
        if not isinstance(out, (tuple, list)) or len(out) != 3 or not all(isinstance(t, torch.Tensor) for t in out):
            return [("type", f"expected (values, seq, pos), three tensors, got {type(out).__name__}")]
        values, seq, pos = (t.detach().flatten() for t in out)
        if not (len(values) == len(seq) == len(pos) == n):
            message = f"expected {n} entries (min(k, tokens in the mask)), got {len(values)}, {len(seq)}, {len(pos)}"
            try:
                if bool((~mask[seq.long(), pos.long()]).any()):
                    message += ", some naming tokens outside the mask"
            except (IndexError, RuntimeError):
                pass
            if values.is_floating_point() and bool(torch.isinf(values).any()):
                message += ", some with activation -inf"
            return [("length", message)]
        if seq.is_floating_point() or pos.is_floating_point():
            return [("dtype", "seq and pos should be integer tensors (indices)")]
        if n == 0:
            return []
        if seq.min() < 0 or pos.min() < 0 or seq.max() >= feature_acts.shape[0] or pos.max() >= n_pos:
            return [("range", "a returned (seq, pos) pair lies outside feature_acts")]
        found = []
        seq, pos = seq.long(), pos.long()
        if not bool(mask[seq, pos].all()):
            j = int((~mask[seq, pos]).nonzero()[0])
            found.append(("mask", f"entry {j} names (seq {int(seq[j])}, pos {int(pos[j])}), a token outside the mask"))
        if len(set(zip(seq.tolist(), pos.tolist()))) != n:
            found.append(("distinct", "the same token appears twice among the returned contexts"))
        at = feature_acts[seq, pos].double()
        if not torch.allclose(values.double(), at, rtol=1e-5, atol=1e-6):
            j = int((~torch.isclose(values.double(), at, rtol=1e-5, atol=1e-6)).nonzero()[0])
            found.append(
                (
                    "value",
                    f"values[{j}] is {values[j].item():.6g}, but the activation at (seq {int(seq[j])}, pos "
                    f"{int(pos[j])}) is {at[j].item():.6g}",
                )
            )
        if bool((values[1:] > values[:-1]).any()):
            found.append(("order", "the values should come largest first"))
        return found

    def judge(expected, got) -> str | None:
        e_found, g_found = problems(expected), problems(got)
        if [k for k, _ in g_found] != [k for k, _ in e_found]:
            return g_found[0][1] if g_found else "your contexts meet properties the expected ones do not"
        if g_found and g_found[0][0] in ("type", "length", "dtype", "range"):
            return None
        e_vals = expected[0].detach().double().flatten().sort(descending=True).values
        g_vals = got[0].detach().double().flatten().sort(descending=True).values
        if not torch.allclose(g_vals, e_vals, rtol=1e-5, atol=1e-6):
            return (
                f"the returned activations {[round(v, 4) for v in g_vals[:6].tolist()]} are not the {n} largest in "
                f"the mask, {[round(v, 4) for v in e_vals[:6].tolist()]}"
            )
        return None

    return judge


def _contexts_case(label, feature_acts, mask, k):
    return Case(label, (feature_acts, mask, k), judge=_contexts_judge(feature_acts, mask, k))


def _contexts_cases():
    g = gen(10)
    cases = [
        _contexts_case(
            "2 sequences, 4 positions, masked maximum",
            torch.tensor([[0.1, 9.0, 0.5, 0.2], [0.7, 0.3, 2.0, 0.0]]),
            torch.tensor([[True, False, True, True], [True, True, True, False]]),
            3,
        ),
        _contexts_case(
            "random: 5 sequences, 7 positions, k=4",
            torch.rand(5, 7, generator=g),
            torch.rand(5, 7, generator=g) > 0.3,
            4,
        ),
        _contexts_case(
            "k larger than the number of unmasked tokens",
            torch.rand(2, 3, generator=g),
            torch.tensor([[True, False, False], [False, True, False]]),
            5,
        ),
        _contexts_case(
            "ties: a sparse feature, zero on most tokens, with k beyond its non-zero count",
            torch.tensor([[0.0, 2.0, 0.0, 0.0, 1.0], [0.0, 0.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0]]),
            torch.tensor(
                [[False, True, True, True, True], [False, True, True, True, False], [False, True, True, True, True]]
            ),
            6,
        ),
    ]
    _, ids, mask, acts = _model_data()
    sae = _shipped("topk")
    with torch.no_grad():
        f = torch.zeros(*ids.shape, sae.cfg.d_sae)
        f[mask] = sae.encode(acts)
    busiest = int((f != 0).sum((0, 1)).argmax())
    cases.append(
        _contexts_case(f"the shipped TopK SAE's feature {busiest} on 12 TinyWorld documents", f[..., busiest], mask, 5)
    )
    return cases


def _contexts_variant(kind):
    def fn(feature_acts, mask, k):
        masked = feature_acts if kind == "nomask" else feature_acts.masked_fill(~mask, float("-inf"))
        if kind == "nomask":
            k = min(k, feature_acts.numel())
        elif kind != "uncapped":
            k = min(k, int(mask.sum()))
        values, flat = masked.flatten().topk(min(k, masked.numel()), largest=(kind != "ascending"))
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
            "Ignore positions outside the mask (e.g. give them -inf before choosing the top k): <bos> and "
            "padding are not contexts.",
        ),
        Mistake(
            "smallest first",
            _contexts_variant("ascending"),
            "Return the LARGEST activations, largest first.",
        ),
        Mistake(
            "wrong unravel",
            _contexts_variant("unravel"),
            "A flat index i into [n_seq, pos] is sequence i // pos and position i % pos (or use torch.unravel_index).",
        ),
        Mistake(
            "masked tokens fill up k",
            _contexts_variant("uncapped"),
            "When the mask holds fewer than k tokens, return only those: positions outside the mask must not fill "
            "the remaining places.",
        ),
    ],
)


# --- feature_logit_weights ---------------------------------------------------------------------------


def _logit_cases():
    g = gen(11)
    small = _random_sae(4, 6, seed=12)
    fake = types.SimpleNamespace(
        W_U=torch.randn(4, 9, generator=g), W_E=torch.randn(9, 4, generator=g), b_U=torch.randn(9, generator=g)
    )
    model = shared_model()
    return [
        Case("a random SAE (d_in 4, d_sae 6) and a random unembedding with a bias", (small, fake, 2)),
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
            "Use the feature's DECODER direction: it is what the feature writes into the residual stream; the "
            "encoder column is what it reads.",
        ),
        Mistake(
            "embedding instead of unembedding",
            lambda sae, model, feature: model.W_E @ sae.W_dec[feature],
            "Logits come from the unembedding model.W_U [d_model, d_vocab]; W_E maps tokens INTO the residual stream.",
        ),
        Mistake(
            "unembedding bias added",
            lambda sae, model, feature: sae.W_dec[feature] @ model.W_U + model.b_U,
            "Leave out the unembedding bias: it is the same whatever the feature does, so it is no part of the "
            "feature's effect.",
        ),
    ],
    rtol=1e-4,
    atol=1e-4,
)


# --- steer_with_feature -----------------------------------------------------------------------------


def _steer_cases():
    model = shared_model()
    _, ids, _, _ = _model_data()
    long_rows = _random_sae(model.cfg.d_model, 32, seed=16)
    with torch.no_grad():
        long_rows.W_dec.mul_(torch.linspace(0.5, 3.0, 32)[:, None])
        long_rows.W_enc.add_(0.2 * torch.randn(long_rows.W_enc.shape, generator=gen(17)))
    return [
        Case("the shipped TopK SAE, feature 3, scale 10", (model, _shipped("topk"), ids[:4], 3, 10.0)),
        Case("the shipped standard SAE, feature 40, scale -5", (model, _shipped("standard"), ids[4:8], 40, -5.0)),
        Case(
            "a random SAE, feature 5, scale 2.5",
            (model, _random_sae(model.cfg.d_model, 32, seed=15), ids[8:10], 5, 2.5),
        ),
        Case("decoder rows as stored: a row of norm 2.7, scale 4", (model, long_rows, ids[:3], 30, 4.0)),
        Case(
            "behaviour: works when the caller has turned gradients off; scale 0 is the clean model",
            (model, _shipped("topk"), ids[2:5], 7, 0.0),
            call=under_no_grad,
        ),
    ]


def _steer_variant(kind):
    def fn(model, sae, tokens, feature, scale):
        direction = sae.W_enc[:, feature] if kind == "encoder" else sae.W_dec[feature]
        if kind == "unit":
            direction = direction / direction.norm()
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
            "Add the direction at EVERY position of every sequence (it broadcasts over batch and position).",
        ),
        Mistake(
            "encoder direction",
            _steer_variant("encoder"),
            "Steer along the feature's DECODER row: that is what the feature adds to the residual stream.",
        ),
        Mistake(
            "wrong hook", _steer_variant("hook"), "Add the direction at the SAE's own hook point, sae.cfg.hook_name."
        ),
        Mistake(
            "direction renormalised",
            _steer_variant("unit"),
            "Use the decoder row as stored: scale multiplies the row itself (unit norm in a trained SAE), not a "
            "renormalised copy.",
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
        Case(
            "a feature that never fires scores 0.5; a single positive token",
            (
                torch.cat([torch.zeros(9, 1), torch.relu(torch.randn(9, 3, generator=g))], dim=1),
                torch.tensor([False, False, True, False, False, False, False, False, False]),
            ),
        ),
        Case(
            "input that must raise: labels with no positive token",
            (torch.rand(5, 3, generator=g), torch.zeros(5, dtype=torch.bool)),
            call=_raises,
            judge=_must_raise("labels with no positive token"),
        ),
        Case(
            "input that must raise: labels with no negative token",
            (torch.rand(4, 2, generator=g), torch.ones(4, dtype=torch.bool)),
            call=_raises,
            judge=_must_raise("labels with no negative token"),
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


def _both_classes(labels):
    if labels.all() or not labels.any():
        raise ValueError("labels need at least one positive and one negative token")


def _auroc_strict(acts, labels):
    _both_classes(labels)
    pos, neg = acts[labels], acts[~labels]
    return (pos[:, None, :] > neg[None, :, :]).float().mean((0, 1))


def _auroc_ordinal(acts, labels):
    _both_classes(labels)
    ranks = acts.argsort(0).argsort(0).double() + 1
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    return ((ranks[labels].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).float()


def _auroc_no_check(acts, labels):
    pos, neg = acts[labels].double(), acts[~labels].double()
    wins = (pos[:, None, :] > neg[None, :, :]).double() + 0.5 * (pos[:, None, :] == neg[None, :, :]).double()
    return wins.mean((0, 1)).float()


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
            "Tied values must share their AVERAGE rank; ranking by argsort breaks ties arbitrarily.",
        ),
        Mistake(
            "labels flipped",
            lambda acts, labels: sol.feature_aurocs(acts, ~labels),
            "The positives are the tokens where labels is True: AUROC = P(score of a positive > score of a negative).",
        ),
        Mistake(
            "no error for a single class",
            _auroc_no_check,
            "When labels has no positive or no negative token, AUROC is undefined: raise a ValueError saying so "
            "instead of returning NaN.",
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
        Case(
            "a feature that never fires: every token tied at 0",
            (torch.zeros(6), torch.tensor([False, True, False, False, True, False])),
        ),
        Case(
            "input that must raise: labels with no positive token",
            (torch.rand(6, generator=g), torch.zeros(6, dtype=torch.bool)),
            call=_raises,
            judge=_must_raise("labels with no positive token"),
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
