"""Chapter 02 (the logit lens and the tuned lens): reference solutions of the exercises.

- `logit_lens`: the final layer norm and the unembedding applied to the residual stream
  after every layer (and, optionally, after every attention sublayer), at every position.
- `kl_to_final`, `lens_entropy`, `correct_token_rank`: how far each layer's read-out is
  from the model's output, how sure it is, and where the right token ranks.
- `prediction_depth`: the first layer from which the lens's top-1 token equals the
  final top-1 and stays equal.
- `tuned_lens_logits`, `tuned_lens_loss`: the tuned lens (Belrose et al., 2023): one
  affine translator h + A h + b per layer, A and b initialised at zero, read out by the
  model's own final norm and unembedding, trained to minimise KL to the final logits.
- `fit_tuned_lens`: the training loop, the chapter's experiment harness: the chapter trains
  the translators it uses with it.

The `TunedLens` module, its training, evaluation and the shipped translators live in
`interplab.lenses`.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interplab import hooks
from interplab.progress import progress as progress_bar

# --- exercise: the logit lens ---------------------------------------------------------------


def logit_lens(
    model, tokens: Int[Tensor, "batch pos"], incl_mid: bool = False
) -> Float[Tensor, "point batch pos d_vocab"]:
    """The logit lens: read every layer's residual stream as if it were the last one.

    Each read-out point's residual vector is turned into logits exactly as the model turns
    its final residual vector into its output: the final layer norm, with that vector's
    own mean and scale, then the unembedding. The points, in order: the embeddings (token
    plus position, before any block), then for each layer the residual stream after its
    attention sublayer (only when ``incl_mid``) and after the whole block.

    The function must not change the model, must leave no hooks on it, and must work
    when the caller has turned gradients off.

    Args:
        model: a HookedTransformer.
        tokens: input token ids.
        incl_mid: also read the residual stream after each attention sublayer.

    Returns:
        A float tensor of logits for every read-out point: n_layers + 1 points
        (2 * n_layers + 1 with ``incl_mid``). The last point equals the model's own
        output logits.
    """
    names = [hooks.act_name("resid_pre", 0)]
    for layer in range(model.cfg.n_layers):
        if incl_mid:
            names.append(hooks.act_name("resid_mid", layer))
        names.append(hooks.act_name("resid_post", layer))
    _, cache = model.run_with_cache(tokens, names_filter=names)
    resid = torch.stack([cache[name] for name in names])
    return model.unembed(model.ln_final(resid))


# --- exercises: comparing a lens with the model's output ---------------------------------------


def kl_to_final(
    lens_logits: Float[Tensor, "point *batch d_vocab"], final_logits: Float[Tensor, "*batch d_vocab"]
) -> Float[Tensor, " point *batch"]:
    """KL divergence from each lens distribution to the model's final distribution, in nats.

    For every read-out point and position, KL(p || q) = sum_v p_v (log p_v - log q_v),
    where p is the model's output distribution (the softmax of ``final_logits``) and q the
    lens's distribution at that point. The same final distribution serves every point.

    What must hold: the result is finite for any finite logits, including logits so large
    that some probabilities underflow to 0 in float32 (a token with p_v = 0 contributes
    nothing); it is 0 where the two distributions are equal and never negative beyond
    rounding; and it is differentiable in ``lens_logits`` (a tuned lens is trained
    through it).

    Args:
        lens_logits: a lens's logits at every read-out point.
        final_logits: the model's output logits.

    Returns:
        A float tensor: the KL divergence at every point and position.
    """
    log_p = final_logits.log_softmax(dim=-1)
    log_q = lens_logits.log_softmax(dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def lens_entropy(logits: Float[Tensor, "*batch d_vocab"]) -> Float[Tensor, " *batch"]:
    """Entropy of the distribution softmax(logits), in nats.

    H = -sum_v p_v log p_v. A token whose probability underflows to 0 contributes
    nothing, so the result is finite for any finite logits, however large.

    Args:
        logits: logits over the vocabulary (any leading dimensions).

    Returns:
        A float tensor: the entropy of each distribution, 0 for a certain prediction,
        log(d_vocab) for a uniform one, log 2 for two tokens tied at the top with all
        others negligible.
    """
    log_p = logits.log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def correct_token_rank(
    logits: Float[Tensor, "*batch d_vocab"], targets: Int[Tensor, " *batch"]
) -> Int[Tensor, " *batch"]:
    """The rank of the correct token under each set of logits: 0 when it is the top-1.

    The rank is the number of tokens whose logit is strictly larger than the correct
    token's. Tokens tied with the correct one do not count: a correct token tied at the
    top has rank 0, whatever order a sort would put the tied tokens in.

    Args:
        logits: logits over the vocabulary (any leading dimensions).
        targets: the correct token id for each distribution (shape of logits without the
            vocabulary dimension).

    Returns:
        An integer tensor: the rank of each correct token, between 0 and d_vocab - 1.
    """
    correct = logits.gather(-1, targets[..., None])
    return (logits > correct).sum(dim=-1)


def prediction_depth(lens_logits: Float[Tensor, "point *batch d_vocab"]) -> Int[Tensor, " *batch"]:
    """The first read-out point from which the lens's top-1 token equals the final top-1 and stays equal.

    The final top-1 token is the most likely token at the last point (the model's own
    output). A lens's top-1 can agree with it, change, and agree again: only the point
    after which it never changes again counts. A depth of 0 means every point, the
    embeddings included, already predicts the final token; the largest possible depth,
    n_points - 1, means only the final point does.

    Args:
        lens_logits: a lens's logits at every read-out point; the last point is the
            model's output.

    Returns:
        An integer tensor: the prediction depth of each position.
    """
    top = lens_logits.argmax(dim=-1)
    agrees = (top == top[-1]).long()
    stays = agrees.flip(0).cumprod(dim=0).flip(0)  # 1 where this and every later point agree
    return lens_logits.shape[0] - stays.sum(dim=0)


# --- exercises: the tuned lens --------------------------------------------------------------


def tuned_lens_logits(
    model,
    resid: Float[Tensor, "layer *batch d_model"],
    A: Float[Tensor, "layer d_model d_model"],
    b: Float[Tensor, "layer d_model"],
) -> Float[Tensor, "layer *batch d_vocab"]:
    """The tuned lens: translate each layer's residual stream, then read it out like the final one.

    Layer l's translator maps a residual vector h (a column vector, as in the
    formula) to h + A_l h + b_l, where A_l h is the matrix-vector product; the
    translated vector is then read out exactly as the logit lens reads a residual
    vector. Any number of batch axes may sit between the layer axis and d_model.

    What must hold: with A = b = 0 this is the logit lens; the gradient reaches A and b
    (the lens is trained through this function); it works when the caller has turned
    gradients off.

    Args:
        model: a HookedTransformer.
        resid: the residual stream at each translated layer.
        A: one d_model x d_model matrix per layer.
        b: one bias vector per layer.

    Returns:
        A float tensor: the tuned lens's logits at each layer.
    """
    flat = resid.reshape(resid.shape[0], -1, resid.shape[-1])  # [layer, n, d_model]
    translated = flat + torch.bmm(flat, A.transpose(1, 2)) + b[:, None, :]  # row-vector form of h + A h + b
    return model.unembed(model.ln_final(translated.reshape(resid.shape)))


def tuned_lens_loss(
    model,
    resid: Float[Tensor, "layer *batch d_model"],
    A: Float[Tensor, "layer d_model d_model"],
    b: Float[Tensor, "layer d_model"],
    final_logits: Float[Tensor, "*batch d_vocab"],
    mask: Bool[Tensor, " *batch"] | None = None,
) -> Float[Tensor, ""]:
    """The tuned lens's training loss: the mean KL from the tuned lens to the model's output.

    KL(p || q) with p the model's output distribution and q the tuned lens's
    distribution at each layer, averaged over layers and over the positions where
    ``mask`` is True (every position when ``mask`` is None): every counted position
    weighs the same, however the positions are spread over documents.

    What must hold: the loss is 0 for a perfect lens and never negative; padded
    positions (mask False) have no effect on it, whatever their values; and its gradient
    reaches A and b, so it must stay a tensor connected to them.

    Args:
        model: a HookedTransformer.
        resid: the residual stream at each translated layer.
        A: one d_model x d_model matrix per layer.
        b: one bias vector per layer.
        final_logits: the model's output logits at the same positions.
        mask: which positions count (False on padding), or None for all.

    Returns:
        The loss, a 0-dimensional float tensor.
    """
    kl = kl_to_final(tuned_lens_logits(model, resid, A, b), final_logits)  # [layer, *batch]
    if mask is not None:
        kl = kl[:, mask]
    return kl.mean()


# --- exercise: the training loop ------------------------------------------------------------


def fit_tuned_lens(
    model,
    resid: Float[Tensor, "layer n d_model"],
    final_logits: Float[Tensor, "n d_vocab"],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    progress: bool = False,
) -> tuple[
    Float[Tensor, "layer d_model d_model"],
    Float[Tensor, "layer d_model"],
    Float[Tensor, " steps"],
    Float[Tensor, " steps"],
]:
    """Train the translators of a tuned lens on a frozen model's residual streams.

    The data are ``n`` positions: their residual stream at each translated layer and the
    model's output logits there. Training must satisfy:

    - the translators start at zero, so the untrained lens is the logit lens and the
      first step's loss is the logit lens's;
    - the objective is the tuned-lens loss (the mean KL from the tuned lens to the model's
      output), minimised with Adam (default betas and eps, no weight decay);
    - each step uses a fresh random batch of ``batch_size`` positions, drawn from a random
      generator seeded with ``seed`` (so the same seed gives the same translators and
      another seed other batches); when ``batch_size`` is at least ``n``, every step uses
      all positions;
    - the learning rate rises linearly to ``lr`` over the first 5% of the steps (at least
      one step), then falls linearly towards 0 at the last step: a fast start that does
      not overshoot, and an end that settles instead of hopping around the minimum;
    - only the translators learn: the model is left unchanged (its weights and its
      ``requires_grad`` flags), and training works even when the caller has turned
      gradients off;
    - with ``progress``, it shows its progress over the steps (and changes nothing else).

    Args:
        model: the HookedTransformer the residual streams come from (its final norm and
            unembedding read the translated vectors).
        resid: the residual stream at each translated layer, [layer, n, d_model].
        final_logits: the model's output logits at the same positions, [n, d_vocab].
        steps: optimisation steps.
        batch_size: positions per step.
        lr: the peak learning rate.
        seed: seeds the batch draws.
        progress: show a progress bar.

    Returns:
        (A, b, losses, lrs): the trained translators as float tensors, A [layer, d_model,
        d_model] and b [layer, d_model]; the loss of each step's batch, measured before
        that step's update, and the learning rate each step used, both float tensors of
        length ``steps``.
    """
    n_layers, n, d_model = resid.shape
    A = torch.zeros(n_layers, d_model, d_model, device=resid.device, requires_grad=True)
    b = torch.zeros(n_layers, d_model, device=resid.device, requires_grad=True)
    opt = torch.optim.Adam([A, b], lr=lr)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:  # a factor of lr: linear warm-up, then linear decay
        return min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    losses, lrs = [], []
    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # no gradients for the model's own weights
    try:
        with torch.enable_grad():
            for _ in progress_bar(range(steps), desc="tuned lens") if progress else range(steps):
                if batch_size >= n:
                    idx = torch.arange(n, device=resid.device)
                else:
                    idx = torch.randint(0, n, (batch_size,), generator=gen).to(resid.device)
                loss = tuned_lens_loss(model, resid[:, idx], A, b, final_logits[idx])
                lrs.append(opt.param_groups[0]["lr"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.detach())
    finally:
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
    return A.detach(), b.detach(), torch.tensor([float(x) for x in losses]), torch.tensor(lrs)
