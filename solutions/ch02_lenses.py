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

The `TunedLens` module, its training, evaluation and the shipped translators live in
`interplab.lenses`.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interplab import hooks

# --- exercise: the logit lens ---------------------------------------------------------------

def logit_lens(model, tokens: Int[Tensor, "batch pos"], incl_mid: bool = False) -> Float[Tensor, "point batch pos d_vocab"]:
    """The logit lens: read every layer's residual stream as if it were the last one.

    Run the model with a cache, take the residual stream at the embeddings
    (``blocks.0.hook_resid_pre``), after each attention sublayer
    (``blocks.L.hook_resid_mid``, only when ``incl_mid``) and after each block
    (``blocks.L.hook_resid_post``), in that order, and apply the model's final layer
    norm (``model.ln_final``, which normalises each vector by its own statistics) and
    then its unembedding (``model.unembed``).

    Args:
        model: a HookedTransformer.
        tokens: input token ids.
        incl_mid: also read the residual stream after each attention sublayer.

    Returns:
        Logits for every read-out point: n_layers + 1 points (2 * n_layers + 1 with
        ``incl_mid``). The last point is the model's own output logits.
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

def kl_to_final(lens_logits: Float[Tensor, "point *batch d_vocab"], final_logits: Float[Tensor, "*batch d_vocab"]) -> Float[Tensor, " point *batch"]:
    """KL divergence from each lens distribution to the model's final distribution, in nats.

    For every read-out point and position, KL(p || q) = sum_v p_v (log p_v - log q_v),
    where p = softmax(final_logits) is the model's output distribution and
    q = softmax(lens_logits[point]) is the lens's. Use log_softmax for the logs: large
    logits make softmax underflow to 0 and log(0) = -inf.

    Args:
        lens_logits: a lens's logits at every read-out point.
        final_logits: the model's output logits.

    Returns:
        The KL divergence at every point and position (0 where the lens agrees exactly).
    """
    log_p = final_logits.log_softmax(dim=-1)
    log_q = lens_logits.log_softmax(dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def lens_entropy(logits: Float[Tensor, "*batch d_vocab"]) -> Float[Tensor, " *batch"]:
    """Entropy of the distribution softmax(logits), in nats.

    H = -sum_v p_v log p_v with p = softmax(logits). Use log_softmax for log p (a
    probability that underflows to 0 would otherwise give 0 * -inf = nan).

    Args:
        logits: logits over the vocabulary (any leading dimensions).

    Returns:
        The entropy of each distribution: 0 for a certain prediction, log(d_vocab) for
        a uniform one.
    """
    log_p = logits.log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def correct_token_rank(logits: Float[Tensor, "*batch d_vocab"], targets: Int[Tensor, " *batch"]) -> Int[Tensor, " *batch"]:
    """The rank of the correct token under each set of logits: 0 when it is the top-1.

    The rank is the number of tokens whose logit is strictly larger than the correct
    token's.

    Args:
        logits: logits over the vocabulary (any leading dimensions).
        targets: the correct token id for each distribution (shape of logits without the
            vocabulary dimension).

    Returns:
        The rank (torch.long) of each correct token.
    """
    correct = logits.gather(-1, targets[..., None])
    return (logits > correct).sum(dim=-1)


def prediction_depth(lens_logits: Float[Tensor, "point *batch d_vocab"]) -> Int[Tensor, " *batch"]:
    """The first read-out point from which the lens's top-1 token equals the final top-1 and stays equal.

    The final top-1 token is the argmax of the last point (the model's own output).
    A depth of 0 means even the embeddings already predict it; the largest possible
    depth, n_points - 1, means only the final point does.

    Args:
        lens_logits: a lens's logits at every read-out point; the last point is the
            model's output.

    Returns:
        The prediction depth (torch.long) of each position.
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

    Layer l's translator maps a residual vector h to h + A[l] h + b[l] (A[l] h is the
    matrix-vector product, so h + A h + b is the identity when A and b are zero).
    The translated vector then goes through the model's final layer norm
    (``model.ln_final``) and its unembedding (``model.unembed``).

    Args:
        model: a HookedTransformer.
        resid: the residual stream at each translated layer.
        A: one d_model x d_model matrix per layer.
        b: one bias vector per layer.

    Returns:
        The tuned lens's logits at each layer. With A = b = 0 this is the logit lens.
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

    KL(p || q) with p = softmax(final_logits) the model's output and q the tuned lens's
    distribution at each layer (`tuned_lens_logits`), averaged over layers and over the
    positions where ``mask`` is True (every position when ``mask`` is None). The loss is
    0 for a perfect lens; its gradient must reach A and b.

    Args:
        model: a HookedTransformer.
        resid: the residual stream at each translated layer.
        A: one d_model x d_model matrix per layer.
        b: one bias vector per layer.
        final_logits: the model's output logits at the same positions.
        mask: which positions count (False on padding), or None for all.

    Returns:
        The loss, a 0-dimensional tensor.
    """
    kl = kl_to_final(tuned_lens_logits(model, resid, A, b), final_logits)  # [layer, *batch]
    if mask is not None:
        kl = kl[:, mask]
    return kl.mean()
