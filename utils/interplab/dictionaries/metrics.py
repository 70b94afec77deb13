"""How good a sparse dictionary is: fidelity, sparsity, and the model's loss with it spliced in.

- `explained_variance`, `reconstruction_metrics`, `feature_density`: on cached activations.
- `spliced_loss` (an SAE replaces its activation), `replacement_loss` (transcoders replace
  MLPs, all at once), `splice_in_batches` (either, memory-bounded for a large vocabulary).
- `evaluate_sae`, `compare_layer`: every metric the chapters report, for one SAE or one MLP layer.
- `mean_only_sae`: the baseline that reconstructs every activation as the mean; `prediction_losses`:
  the spliced run's loss and KL per prediction (for intervals over documents); `token_errors`:
  per-token squared error and L0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .config import SAEConfig, mlp_in_hook, mlp_out_hook
from .data import collect_acts, mlp_io_pairs
from .modules import SAE

METHOD_NAMES = {"transcoder": "transcoder", "skip": "skip transcoder", "sae": "SAE on mlp_out"}


def explained_variance(x: Float[Tensor, "n d"], x_hat: Float[Tensor, "n d"]) -> float:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all rows (float64), as a Python float."""
    x, x_hat = x.double(), x_hat.double()
    return (1.0 - (x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()).item()


def reconstruction_metrics(
    x: Float[Tensor, "n d"], x_hat: Float[Tensor, "n d"], acts: Float[Tensor, "n d_sae"]
) -> dict[str, float]:
    """Per-token l0, mse (summed over dimensions), cosine_sim and l2_ratio, averaged over tokens."""
    return {
        "l0": (acts != 0).float().sum(dim=-1).mean().item(),
        "mse": (x - x_hat).pow(2).sum(dim=-1).mean().item(),
        "cosine_sim": torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean().item(),
        "l2_ratio": (x_hat.norm(dim=-1) / x.norm(dim=-1)).mean().item(),
    }


def feature_density(acts: Float[Tensor, "n d_sae"]) -> Float[Tensor, " d_sae"]:
    """The fraction of tokens on which each feature is non-zero."""
    return (acts != 0).float().mean(dim=0)


def _mean_ce(logits: Tensor, tokens: Tensor, scored: Tensor) -> float:
    return -logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0][scored].mean().item()


@torch.no_grad()
def spliced_loss(model, sae, tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"]) -> dict[str, float]:
    """The model's loss clean, with the SAE's reconstruction at ``sae.cfg.hook_name`` (at the mask), and zeroed.

    Returns ce_clean, ce_sae, ce_zero, loss_recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean) and
    kl_sae = KL(clean || with SAE), averaged over predictions whose position and next position are in the mask.
    """
    keep = mask.to(tokens.device)

    def splice(act: Tensor, hook) -> Tensor:
        return torch.where(keep[..., None], sae(act), act)

    clean = model(tokens)
    spliced = model.run_with_hooks(tokens, fwd_hooks=[(sae.cfg.hook_name, splice)])
    zeroed = model.run_with_hooks(tokens, fwd_hooks=[(sae.cfg.hook_name, lambda act, hook: torch.zeros_like(act))])
    scored = keep[:, :-1] & keep[:, 1:]
    ce = {
        name: _mean_ce(lg, tokens, scored)
        for name, lg in (("ce_clean", clean), ("ce_sae", spliced), ("ce_zero", zeroed))
    }
    log_p = clean[:, :-1].log_softmax(-1)
    log_q = spliced[:, :-1].log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)[scored].mean().item()
    recovered = (ce["ce_zero"] - ce["ce_sae"]) / (ce["ce_zero"] - ce["ce_clean"])
    return {**ce, "loss_recovered": recovered, "kl_sae": kl}


def mean_only_sae(mean: Float[Tensor, " d"], hook_name: str) -> SAE:
    """An SAE whose features never fire: it reconstructs every activation as ``mean`` (the scale for loss recovered).

    Spliced in, it keeps what is common to all tokens and removes everything that tells
    them apart; any SAE worth reading should do far better.
    """
    sae = SAE(SAEConfig(d_in=mean.shape[-1], d_sae=1, architecture="standard", hook_name=hook_name))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)  # ReLU(-1) = 0: no feature ever fires
        sae.b_dec.copy_(mean.detach().float())
    return sae.eval().to(mean.device)


@torch.no_grad()
def prediction_losses(
    model, sae, tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"]
) -> dict[str, Tensor]:
    """Per scored prediction (as in `spliced_loss`): clean CE, CE with the SAE spliced in, KL, and the document.

    Returns {"ce_clean", "ce_sae", "kl_sae": float tensors [n_scored], "doc": the row of
    ``tokens`` each prediction comes from}; their means are `spliced_loss`'s numbers, and
    resampling whole documents gives their intervals.
    """
    keep = mask.to(tokens.device).bool()

    def splice(act: Tensor, hook) -> Tensor:
        return torch.where(keep[..., None], sae(act), act)

    clean = model(tokens)[:, :-1].log_softmax(-1)
    spliced = model.run_with_hooks(tokens, fwd_hooks=[(sae.cfg.hook_name, splice)])[:, :-1].log_softmax(-1)
    scored = keep[:, :-1] & keep[:, 1:]
    nxt = tokens[:, 1:, None]
    return {
        "ce_clean": -clean.gather(-1, nxt)[..., 0][scored],
        "ce_sae": -spliced.gather(-1, nxt)[..., 0][scored],
        "kl_sae": (clean.exp() * (clean - spliced)).sum(-1)[scored],
        "doc": torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(scored)[scored],
    }


@torch.no_grad()
def token_errors(sae, x: Float[Tensor, "n d"]) -> dict[str, Tensor]:
    """Per token: {"mse": squared error summed over dimensions, "l0": active features, "norm": ||x||}."""
    f = sae.encode(x)
    x_hat = sae.decode(f)
    return {"mse": (x - x_hat).pow(2).sum(-1), "l0": (f != 0).sum(-1), "norm": x.norm(dim=-1)}


@torch.no_grad()
def replacement_loss(
    model, transcoders: Sequence, tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"]
) -> dict[str, float]:
    """The model's loss clean, with every transcoder replacing its MLP at once (at the mask), and with those MLPs zeroed.

    A later transcoder reads the residual stream already changed by the earlier ones. Returns
    ce_clean, ce_replaced, ce_ablated and loss_recovered = (ce_ablated - ce_replaced) / (ce_ablated - ce_clean).
    """
    by_layer = {tc.cfg.layer: tc for tc in transcoders}
    if len(by_layer) != len(transcoders):
        raise ValueError("two transcoders replace the same MLP; pass at most one per layer")
    keep = mask.to(tokens.device).bool()[..., None]
    inputs: dict[int, Tensor] = {}

    def save_input(x: Tensor, hook) -> None:
        inputs[hook.layer()] = x

    def replace(y: Tensor, hook) -> Tensor:
        return torch.where(keep, by_layer[hook.layer()](inputs[hook.layer()]), y)

    def ablate(y: Tensor, hook) -> Tensor:
        return torch.where(keep, torch.zeros_like(y), y)

    hooks = [(mlp_in_hook(L), save_input) for L in by_layer] + [(mlp_out_hook(L), replace) for L in by_layer]
    runs = {
        "ce_clean": model(tokens),
        "ce_replaced": model.run_with_hooks(tokens, fwd_hooks=hooks),
        "ce_ablated": model.run_with_hooks(tokens, fwd_hooks=[(mlp_out_hook(L), ablate) for L in by_layer]),
    }
    scored = mask[:, :-1].bool() & mask[:, 1:].bool()
    out = {name: _mean_ce(logits, tokens, scored) for name, logits in runs.items()}
    out["loss_recovered"] = (out["ce_ablated"] - out["ce_replaced"]) / (out["ce_ablated"] - out["ce_clean"])
    return out


def splice_in_batches(
    fn, model, module, tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"], max_logits_gb: float = 0.25
) -> dict[str, float]:
    """Run ``fn(model, module, tokens, mask)`` (e.g. `spliced_loss`) on batches of sequences, and combine.

    Splicing functions hold several runs' logits, [batch, pos, d_vocab] each: a few MB
    for TinyWorld, about 1 GB for 60 documents of gpt2-small (50,257 tokens). This
    splits the sequences so that one run's logits stay under ``max_logits_gb`` (padding
    columns no sequence of a batch needs are dropped), averages every mean ("ce_*",
    "kl_*") weighted by the batch's number of scored predictions, and recomputes
    "loss_recovered" from the combined losses. When everything fits in one batch it
    is ``fn`` called once, unchanged.
    """
    width = tokens.shape[1]
    per_row_gb = width * model.cfg.d_vocab * 4 / 1e9
    if max_logits_gb / per_row_gb >= tokens.shape[0]:
        return fn(model, module, tokens, mask)
    rows = max(1, int(max_logits_gb / per_row_gb))
    parts = []
    for start in range(0, tokens.shape[0], rows):
        ids, keep = tokens[start : start + rows], mask[start : start + rows].bool()
        used = keep.any(0).nonzero()
        if len(used) == 0:
            continue
        cut = int(used.max()) + 1
        ids, keep = ids[:, :cut], keep[:, :cut]
        n_scored = int((keep[:, :-1] & keep[:, 1:]).sum())
        if n_scored:
            parts.append((fn(model, module, ids, keep), n_scored))
    total = sum(n for _, n in parts)
    out = {k: sum(r[k] * n for r, n in parts) / total for k in parts[0][0] if k != "loss_recovered"}
    losses = [k for k in out if k.startswith("ce_")]
    base = "ce_zero" if "ce_zero" in out else "ce_ablated"
    (other,) = [k for k in losses if k not in ("ce_clean", base)]
    out["loss_recovered"] = (out[base] - out[other]) / (out[base] - out["ce_clean"])
    return out


def splice_ce(
    model,
    tokens: Tensor,
    mask: Tensor,
    replace: Mapping[int, Callable[[Tensor, Tensor], Tensor]],
    max_logits_gb: float = 0.25,
) -> float:
    """Mean CE with MLP outputs of some layers replaced by fn(mlp_input, mlp_output) at the mask positions.

    Runs in batches of sequences whose logits stay under ``max_logits_gb`` (one batch on
    TinyWorld; several for a model with gpt2-small's 50,257-token vocabulary).
    """
    fits = max_logits_gb * 1e9 / (tokens.shape[1] * model.cfg.d_vocab * 4)  # sequences per batch
    if fits < tokens.shape[0]:
        rows = max(1, int(fits))
        parts = []
        for start in range(0, tokens.shape[0], rows):
            ids, keep_ = tokens[start : start + rows], mask[start : start + rows].bool()
            n = int((keep_[:, :-1] & keep_[:, 1:]).sum())
            if n:
                parts.append((splice_ce(model, ids, keep_, replace, max_logits_gb=float("inf")), n))
        return sum(ce * n for ce, n in parts) / sum(n for _, n in parts)
    keep = mask.bool()[..., None]
    inputs: dict[int, Tensor] = {}

    def save(x, hook):
        inputs[hook.layer()] = x

    def swap(y, hook):
        return torch.where(keep, replace[hook.layer()](inputs[hook.layer()], y), y)

    hooks = [(mlp_in_hook(L), save) for L in replace] + [(mlp_out_hook(L), swap) for L in replace]
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    scored = mask[:, :-1].bool() & mask[:, 1:].bool()
    return _mean_ce(logits, tokens, scored)


@torch.no_grad()
def evaluate_sae(model, sae, ids: Tensor, mask: Tensor, acts: Tensor | None = None) -> dict[str, float]:
    """Every metric of chapter 4 for one SAE on one dataset (a flat dict of floats, rounded to 4 places)."""
    x = collect_acts(model, ids, mask, sae.cfg.hook_name) if acts is None else acts
    f = sae.encode(x)
    x_hat = sae.decode(f)
    density = feature_density(f)
    out = {
        "explained_variance": explained_variance(x, x_hat),
        **reconstruction_metrics(x, x_hat, f),
        "dead_features": int((density == 0).sum()),
        "dense_features": int((density > 0.1).sum()),
    }
    out.update(spliced_loss(model, sae, ids, mask))
    return {k: round(float(v), 4) for k, v in out.items()}


@torch.no_grad()
def compare_layer(
    model,
    layer: int,
    transcoder,
    ids: Tensor,
    mask: Tensor,
    pairs: tuple[Tensor, Tensor] | None = None,
    skip=None,
    sae=None,
) -> list[dict]:
    """One row per method (transcoder, skip transcoder, SAE on mlp_out) for one MLP layer.

    Columns: L0, explained variance of the MLP output, CE with that MLP replaced, the
    loss increase over clean, and the fraction of the zero-ablation gap recovered.
    """
    x, y = pairs if pairs is not None else mlp_io_pairs(model, ids, layer, mask)
    ce_clean = splice_ce(model, ids, mask, {})
    ce_zero = splice_ce(model, ids, mask, {layer: lambda x_, y_: torch.zeros_like(y_)})
    methods = []
    if transcoder is not None:
        methods.append((METHOD_NAMES["transcoder"], transcoder, lambda x_, y_: transcoder(x_)))
    if skip is not None:
        methods.append((METHOD_NAMES["skip"], skip, lambda x_, y_: skip(x_)))
    if sae is not None:
        methods.append((METHOD_NAMES["sae"], sae, lambda x_, y_: sae(y_)))
    rows = []
    for name, module, fn in methods:
        acts = module.encode(y if module is sae else x)
        y_hat = fn(x, y)
        ce = splice_ce(model, ids, mask, {layer: fn})
        rows.append(
            {
                "layer": layer,
                "method": name,
                "l0": round((acts != 0).float().sum(-1).mean().item(), 2),
                "explained_variance": round(explained_variance(y, y_hat), 4),
                "ce": round(ce, 4),
                "delta_ce": round(ce - ce_clean, 4),
                "loss_recovered": round((ce_zero - ce) / (ce_zero - ce_clean), 4),
                "ce_clean": round(ce_clean, 4),
                "ce_zero": round(ce_zero, 4),
            }
        )
    return rows
