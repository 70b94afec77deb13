"""One trainer for every sparse dictionary: SAEs and transcoders alike.

    sae = train_dictionary(acts, SAEConfig(d_in=192, d_sae=768, architecture="topk", k=16), steps=1200)
    tc = train_dictionary(x, TranscoderConfig(d_in=192, d_sae=768, layer=1), target=y, steps=800)

The recipe (chapter 4's): seed, then build the module and set ``b_dec`` to the mean of the
target; Adam, its learning rate constant and then decaying linearly to 0 over the last 20%
of the steps; each step a shuffled batch, the decoder gradient made orthogonal to the decoder
rows, the rows renormalised after the step; features that have not fired for ``dead_after``
steps resampled every ``resample_every`` steps during the first 80% of training.

Two ways of dealing with dead features: resampling (the default, ``resample=True``) gives them
new weights; the AuxK loss of Gao et al. (2024) (``aux_k > 0``; off by default, so the shipped
recipes are unchanged) keeps training them: the ``aux_k`` dead features with the largest
pre-activations try to reconstruct what the live ones missed, and that squared error is added to
the loss with weight ``aux_coeff`` (1/32 in the paper).

``sae.info`` records the training: steps, batch_size, lr, seed, tokens_seen, final_loss,
final_mse, resampled, seconds (and aux_k, aux_coeff, final_aux_loss with AuxK).
"""

from __future__ import annotations

import time

import torch
from jaxtyping import Float
from torch import Tensor

from ..progress import progress as progress_bar
from .config import SAEConfig
from .modules import SAE, SparseDictionary, Transcoder


def module_for(cfg: SAEConfig, generator: torch.Generator | None = None) -> SparseDictionary:
    """A fresh SAE or Transcoder, whichever ``cfg`` describes."""
    return (Transcoder if cfg.is_transcoder else SAE)(cfg, generator=generator)


@torch.no_grad()
def resample_sae_(
    sae: SparseDictionary, opt: torch.optim.Optimizer, dead: Tensor, x: Tensor, y: Tensor, y_hat: Tensor
) -> None:
    """Resample dead features in place and clear their Adam statistics.

    ``x`` is the batch of inputs, ``y`` the targets (x again for an SAE) and ``y_hat`` the
    module's outputs on them. Each dead feature takes one of the rows with the largest error
    (largest first, reused cyclically): its decoder row becomes that row's normalised error;
    its encoder column the same direction (an SAE) or the row's normalised input (a
    transcoder, whose input lives in another space), scaled to ``encoder_scale`` (0.2 for a
    standard dictionary, 1.0 for TopK and BatchTopK) times the mean norm of the live encoder
    columns; its encoder bias 0.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return
    residual = y - y_hat
    worst = residual.pow(2).sum(dim=-1).topk(min(n_dead, residual.shape[0])).indices
    rows = worst[torch.arange(n_dead) % worst.shape[0]]
    directions = residual[rows] / residual[rows].norm(dim=-1, keepdim=True).clamp_min(1e-8)
    scale = 0.2 if sae.cfg.architecture == "standard" else 1.0
    alive = ~dead
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    if sae.cfg.is_transcoder:
        reads = x[rows] / x[rows].norm(dim=-1, keepdim=True).clamp_min(1e-8)
    else:
        reads = directions
    sae.W_enc[:, dead] = reads.T * scale * enc_norm
    sae.W_dec[dead] = directions
    sae.b_enc[dead] = 0.0
    for p, sl in ((sae.W_enc, (slice(None), dead)), (sae.b_enc, (dead,)), (sae.W_dec, (dead,))):
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][sl] = 0.0


def train_dictionary(
    acts: Float[Tensor, "n d_in"],
    cfg: SAEConfig,
    *,
    target: Float[Tensor, "n d_out"] | None = None,
    steps: int = 1000,
    batch_size: int = 1024,
    lr: float = 2e-3,
    seed: int = 0,
    dead_after: int = 200,
    resample_every: int = 250,
    progress: bool = True,
    resample: bool = True,
    aux_k: int = 0,
    aux_coeff: float = 1 / 32,
) -> SparseDictionary:
    """Train an SAE (or, with a TranscoderConfig and ``target``, a transcoder) on cached activations.

    Args:
        acts: the training inputs, one row per token (a tensor or a memory-mapped store).
        cfg: the dictionary to build: an SAEConfig or a TranscoderConfig.
        target: what to predict (default: acts; a transcoder's is the MLP's output).
        steps, batch_size, lr, seed: the optimisation.
        dead_after: steps without firing after which a feature counts as dead.
        resample_every: how often to look for dead features.
        progress: show a progress bar.
        resample: resample dead features (False: leave them as they are).
        aux_k: with AuxK, how many dead features may reconstruct the residual (0: no AuxK).
        aux_coeff: the weight of the AuxK loss.

    Returns:
        The trained module, in eval mode, with ``.info`` recording the training.
    """
    target = acts if target is None else target
    if acts.ndim != 2 or acts.shape[-1] != cfg.d_in:
        raise ValueError(f"acts must be [n_tokens, d_in={cfg.d_in}], got {tuple(acts.shape)}")
    if target.shape != (acts.shape[0], cfg.d_out):
        raise ValueError(f"target must be [n_tokens={acts.shape[0]}, d_out={cfg.d_out}], got {tuple(target.shape)}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be at least 1, got steps={steps}, batch_size={batch_size}")
    if not 0 <= aux_k <= cfg.d_sae:
        raise ValueError(f"aux_k must be between 0 (no AuxK loss) and d_sae={cfg.d_sae}, got {aux_k}")
    aux = (aux_k, aux_coeff) if aux_k else None
    with torch.enable_grad():  # works inside a notebook that turned gradients off
        return _train(
            acts, target, cfg, steps, batch_size, lr, seed, dead_after, resample_every, progress, resample, aux
        )


def auxk_loss(module: SparseDictionary, x: Tensor, residual: Tensor, dead: Tensor, aux_k: int) -> Tensor:
    """Gao et al.'s auxiliary loss: how well the ``aux_k`` most active dead features reconstruct ``residual``.

    ``residual`` is the target minus the module's output (held fixed); the dead features'
    ReLU'd pre-activations, cut to the ``aux_k`` largest per row, are decoded without the
    bias. Returns the squared error in the reconstruction loss's units (summed over dimensions,
    averaged over rows; Gao et al. normalise both losses by the same constant), 0 when none is dead.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return residual.new_zeros(())
    if module.cfg.apply_b_dec_to_input:  # only the dead features learn from this loss, not the shared bias
        x = x - module.b_dec.detach()
    pre = x @ module.W_enc[:, dead] + module.b_enc[dead]
    values, idx = pre.topk(min(aux_k, n_dead), dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, idx, values.relu())
    e_hat = acts @ module.W_dec[dead]
    e = residual.detach()
    return (e_hat - e).pow(2).sum(-1).mean()


def _train(acts, target, cfg, steps, batch_size, lr, seed, dead_after, resample_every, progress, resample, aux):
    device = acts.device
    torch.manual_seed(seed)
    module = module_for(cfg).to(device)
    # How the shipped transcoders were trained: firing tracked, and errors for resampling measured, with the
    # weights after each step. SAEs use the step's own forward pass. Kept apart so the shipped artifacts rebuild
    # exactly as they were made.
    after_step = cfg.is_transcoder
    with torch.no_grad():
        module.b_dec.copy_(target.float().mean(dim=0))
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    decay_start = int(0.8 * steps)
    order = torch.Generator(device="cpu").manual_seed(seed)
    perm, cursor = torch.randperm(acts.shape[0], generator=order), 0
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=device)
    n_resampled, t0 = 0, time.time()
    module.train()
    what = f"layer-{cfg.layer} transcoder" if cfg.is_transcoder else "SAE"
    bar = progress_bar(
        range(steps), disable=not progress, desc=f"training {cfg.architecture} {what}", leave=False, mininterval=1.0
    )
    for step in bar:
        if cursor + batch_size > len(perm):
            perm, cursor = torch.randperm(acts.shape[0], generator=order), 0
        idx = perm[cursor : cursor + batch_size].to(device)
        cursor += batch_size
        x, y = acts[idx], target[idx]
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (steps - step) / max(1, steps - decay_start))
        out = module.loss(x, y)
        loss = out.loss
        if aux is not None:
            aux_loss = auxk_loss(module, x, y - out.x_hat, since_fired >= dead_after, aux[0])
            loss = loss + aux[1] * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        module.remove_parallel_grad_()
        opt.step()
        module.normalize_decoder_()
        with torch.no_grad():
            fired = module.fired(x) if after_step else (out.acts > 0).any(dim=0)
            since_fired = torch.where(fired, 0, since_fired + 1)
            if resample and (step + 1) % resample_every == 0 and step < decay_start:
                dead = since_fired >= dead_after
                if dead.any():
                    resample_sae_(module, opt, dead, x, y, module(x) if after_step else out.x_hat)
                    since_fired[dead] = 0
                    n_resampled += int(dead.sum())
        if progress and step % 50 == 0:
            bar.set_postfix(
                loss=f"{out.loss.item():.3g}", L0=f"{(out.acts > 0).float().sum(-1).mean():.1f}", refresh=False
            )
    bar.close()
    module.eval()
    module.info = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "tokens_seen": steps * batch_size,
        "final_loss": round(out.loss.item(), 5),
        "final_mse": round(out.mse.item(), 5),
        "resampled": n_resampled,
        "seconds": round(time.time() - t0, 1),
    }
    if aux is not None:
        module.info.update(aux_k=aux[0], aux_coeff=aux[1], final_aux_loss=round(aux_loss.item(), 5))
    if not resample:
        module.info["resample"] = False
    return module


def train_transcoder(x: Float[Tensor, "n d_in"], y: Float[Tensor, "n d_out"], cfg, **kwargs) -> Transcoder:
    """`train_dictionary` for a transcoder: inputs x (the MLP's input), targets y (its output)."""
    if not cfg.is_transcoder:
        raise TypeError(
            f"train_transcoder needs a TranscoderConfig, got {type(cfg).__name__}; train an SAE with "
            f"train_dictionary(acts, cfg)"
        )
    return train_dictionary(x, cfg, target=y, **kwargs)
