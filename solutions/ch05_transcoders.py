"""Chapter 5 (transcoders): the reference solution of every exercise.

The transcoder module, its trainer (shared with chapter 4's SAEs), saving and loading, the
shipped transcoders and the circuit tools (attribution graphs, the fact-recall check) live in
the course's library, `interplab.dictionaries`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interplab.dictionaries import Transcoder, mlp_in_hook, mlp_out_hook


def transcoder_forward(
    x: Float[Tensor, "batch d_in"],
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, " d_sae"],
    W_dec: Float[Tensor, "d_sae d_out"],
    b_dec: Float[Tensor, " d_out"],
    W_skip: Float[Tensor, "d_out d_in"] | None = None,
) -> tuple[Float[Tensor, "batch d_out"], Float[Tensor, "batch d_sae"]]:
    """A ReLU transcoder: predict the MLP's output from its input through sparse features.

    Unlike an SAE, a transcoder does not centre its input with b_dec: b_dec is a bias of the
    output space (what the MLP writes), while x lives in the input space (what the MLP reads).
    A skip transcoder adds a linear path straight from input to output; W_skip is stored like
    an nn.Linear weight, [d_out, d_in] (as in SAELens).

    Args:
        x: the MLP's normalised inputs, one row per token.
        W_enc: encoder weights; column i is feature i's input direction.
        b_enc: encoder bias.
        W_dec: decoder weights; row i is feature i's output direction.
        b_dec: decoder (output) bias.
        W_skip: the skip path's weights, or None for a plain transcoder.

    Returns:
        (y_hat, acts), float tensors. acts [batch, d_sae]: the features' activations, the
        rectified (ReLU) affine read of each row by the encoder, so never negative and zero for
        a feature whose read is negative; a row where no feature fires predicts b_dec alone
        (plus its skip path). y_hat [batch, d_out]: the decoder's affine map of acts, plus the
        skip path's linear map of the row when W_skip is given. Gradients reach every weight.
    """
    acts = torch.relu(x @ W_enc + b_enc)
    y_hat = acts @ W_dec + b_dec
    if W_skip is not None:
        y_hat = y_hat + x @ W_skip.T
    return y_hat, acts


def mlp_io_pairs(
    model, tokens: Int[Tensor, "batch pos"], layer: int, mask: Bool[Tensor, "batch pos"] | None = None
) -> tuple[Float[Tensor, "n d_model"], Float[Tensor, "n d_model"]]:
    """The input and output of one MLP at every kept token: a transcoder's training pairs.

    The MLP of ``layer`` reads the residual stream after that layer's second LayerNorm
    (normalised, ``blocks.{layer}.ln2.hook_normalized``) and adds its output to the residual
    stream (``blocks.{layer}.hook_mlp_out``). One forward pass of the model is enough.

    Args:
        model: a HookedTransformer.
        tokens: input ids.
        layer: which MLP.
        mask: True at the tokens to keep; None keeps every position.

    Returns:
        (x, y), float tensors [n_kept, d_model]: row k of x is what the MLP read and row k of y
        what it wrote at the k-th kept position, in row-major order (batch, then position).
        Works when the caller has turned gradients off, and leaves no hooks on the model.

    Raises:
        ValueError: when the model has no MLP ``layer``.
    """
    hooks = [mlp_in_hook(layer), mlp_out_hook(layer)]
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer must be between 0 and {model.cfg.n_layers - 1}, got {layer}")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hooks)
    x, y = cache[hooks[0]], cache[hooks[1]]
    if mask is None:
        return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    keep = mask.to(x.device).bool()
    return x[keep], y[keep]


def transcoder_loss(
    transcoder: Transcoder, x: Float[Tensor, "batch d_in"], y: Float[Tensor, "batch d_out"]
) -> tuple[Float[Tensor, ""], Float[Tensor, ""], Float[Tensor, ""]]:
    """The training loss of a transcoder: error in predicting the MLP's OUTPUT, plus the sparsity penalty.

    The penalty is chapter 4's: for a standard (ReLU) transcoder, each feature's |activation|
    weighted by the norm of its decoder row (so that shrinking activations while growing the
    decoder cannot dodge it); TopK and BatchTopK transcoders have no penalty (their activation
    function enforces the sparsity), though the penalty term is still reported.

    Args:
        transcoder: a `Transcoder` (it has ``encode``, ``decode``, ``skip_out``, ``W_dec`` and ``cfg``).
        x: the MLP's normalised inputs.
        y: the MLP's outputs (the target).

    Returns:
        (loss, mse, l1), scalar float tensors that stay in the autograd graph: the gradient of
        loss reaches every parameter that affects it (encoder, decoder, biases, skip path), and
        so does the gradient of l1. mse: the squared error of the full prediction (skip path
        included) against y, summed over the output dimensions and averaged over rows. l1: the
        decoder-norm-weighted absolute activations, summed over features and averaged over rows.
        loss: mse plus cfg.l1_coeff times l1 for a "standard" transcoder, mse alone otherwise.
    """
    acts = transcoder.encode(x)
    y_hat = transcoder.decode(acts) + transcoder.skip_out(x)
    mse = (y_hat - y).pow(2).sum(dim=-1).mean()
    l1 = (acts.abs() * transcoder.W_dec.norm(dim=-1)).sum(dim=-1).mean()
    loss = mse + transcoder.cfg.l1_coeff * l1 if transcoder.cfg.architecture == "standard" else mse
    return loss, mse, l1


def replacement_loss(
    model, transcoders: Sequence[Transcoder], tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"]
) -> dict[str, float]:
    """How much of the model's performance survives when transcoders replace MLPs, ALL AT ONCE.

    Three runs are compared: the clean model; the replacement model, where at the positions in
    mask every given transcoder's prediction takes the place of its MLP's output (``cfg.layer``
    says which), each prediction made from the MLP input of that same run, so that a later
    transcoder reads a residual stream already changed by the earlier ones; and the ablated
    model, where the same MLPs' outputs are zeroed at the same positions.

    A prediction (the logits at p for the token at p + 1) is scored when both mask[b, p] and
    mask[b, p + 1] are True; each loss averages over the scored predictions.

    Args:
        model: a HookedTransformer.
        transcoders: one or more transcoders of distinct layers, in any order.
        tokens: input ids.
        mask: True at the tokens where the MLPs are replaced (real tokens: not <bos>, not padding).

    Returns:
        A dict of Python floats: "ce_clean", "ce_replaced" and "ce_ablated", the mean next-token
        cross-entropy of each run, and "loss_recovered", the fraction of the gap between the
        ablated and the clean loss that the replacement closes (1: as good as the MLPs; 0: no
        better than zeroing them). Works with gradients off and leaves no hooks on the model.

    Raises:
        ValueError: when two transcoders replace the same MLP.
    """
    keep = mask.to(tokens.device).bool()[..., None]
    inputs: dict[int, Tensor] = {}

    def save_input(x: Tensor, hook) -> None:
        inputs[hook.layer()] = x

    def replace(y: Tensor, hook) -> Tensor:
        tc = by_layer[hook.layer()]
        return torch.where(keep, tc(inputs[hook.layer()]), y)

    def ablate(y: Tensor, hook) -> Tensor:
        return torch.where(keep, torch.zeros_like(y), y)

    by_layer = {tc.cfg.layer: tc for tc in transcoders}
    if len(by_layer) != len(transcoders):
        raise ValueError("two transcoders replace the same MLP; pass at most one per layer")
    replace_hooks = [(mlp_in_hook(L), save_input) for L in by_layer] + [(mlp_out_hook(L), replace) for L in by_layer]
    with torch.no_grad():
        runs = {
            "ce_clean": model(tokens),
            "ce_replaced": model.run_with_hooks(tokens, fwd_hooks=replace_hooks),
            "ce_ablated": model.run_with_hooks(tokens, fwd_hooks=[(mlp_out_hook(L), ablate) for L in by_layer]),
        }
    scored = mask[:, :-1].bool() & mask[:, 1:].bool()
    targets = tokens[:, 1:, None]
    out = {
        name: -logits[:, :-1].log_softmax(-1).gather(-1, targets)[..., 0][scored].mean().item()
        for name, logits in runs.items()
    }
    out["loss_recovered"] = (out["ce_ablated"] - out["ce_replaced"]) / (out["ce_ablated"] - out["ce_clean"])
    return out


def de_embedding(model, transcoder: Transcoder, feature: int) -> Float[Tensor, " d_vocab"]:
    """Which tokens turn a feature on directly: its encoder vector read through the token embeddings.

    A token's embedding reaches every MLP's input through the residual stream (the "direct
    path"). Ignoring attention, earlier MLPs and the LayerNorm, each token adds a fixed amount
    to the feature's pre-activation.

    Args:
        model: a HookedTransformer (token embeddings model.W_E, [d_vocab, d_model]).
        transcoder: the transcoder the feature belongs to.
        feature: the feature's index.

    Returns:
        A float tensor [d_vocab]: entry t is what token t's embedding alone adds to the
        feature's pre-activation along the direct path.

    Raises:
        ValueError: when the transcoder has no feature ``feature``.
    """
    if not 0 <= feature < transcoder.cfg.d_sae:
        raise ValueError(f"feature must be between 0 and {transcoder.cfg.d_sae - 1}, got {feature}")
    return model.W_E @ transcoder.W_enc[:, feature]


def pullback(earlier: Transcoder, later: Transcoder, feature: int) -> Float[Tensor, " d_sae_earlier"]:
    """How much each earlier feature, through the residual stream, drives one later feature.

    An earlier feature writes its decoder row into the residual stream; the later feature reads
    the stream with its encoder vector. Ignoring everything in between (attention, other MLPs,
    the LayerNorm), one unit of an earlier feature adds a fixed amount to the later feature's
    pre-activation: the later feature's encoder "pulled back" through the earlier decoder.

    Args:
        earlier: the transcoder of an earlier layer.
        later: the transcoder of a later layer.
        feature: the index of a feature of the later transcoder.

    Returns:
        A float tensor [earlier d_sae]: entry i is what one unit of the earlier transcoder's
        feature i adds to the later feature's pre-activation along the direct residual path.

    Raises:
        ValueError: when ``earlier`` does not come before ``later`` or ``later`` has no such feature.
    """
    if earlier.cfg.layer >= later.cfg.layer:
        raise ValueError(
            f"the earlier transcoder (layer {earlier.cfg.layer}) must come before the later one "
            f"(layer {later.cfg.layer}): a feature only reads what earlier layers wrote"
        )
    if not 0 <= feature < later.cfg.d_sae:
        raise ValueError(f"feature must be between 0 and {later.cfg.d_sae - 1}, got {feature}")
    return earlier.W_dec @ later.W_enc[:, feature]


def answer_attribution(
    model, transcoders: Sequence[Transcoder], tokens: Int[Tensor, " pos"], answer_id: int
) -> tuple[Float[Tensor, "n_transcoders pos d_sae"], Float[Tensor, "n_transcoders pos"]]:
    """How much each transcoder feature and each error term writes into the answer's logit, in a frozen model.

    The frozen replacement model computes exactly what the model computes on this prompt, but
    linearly from its sources. Attention patterns and LayerNorm scales keep their values from
    this run (constants); the output of every MLP with a transcoder becomes the transcoder's
    prediction from the MLP input of this run plus an error term, the constant part of the
    MLP's output the transcoder misses; an MLP without a transcoder keeps its output from this
    run. The sources are each transcoder's feature activations and error terms (and the
    embeddings and biases, not returned here). A source's attribution is its value times the
    derivative of the answer's logit at the last position with respect to it, along paths that
    pass through no other transcoder feature (each feature is a node of its own; its effect
    through later features is an edge of the graph, not part of its attribution).

    Because everything between the sources and the logit is then linear, the attributions of
    all sources, plus the logit with every source set to zero, add up to the logit exactly.

    Args:
        model: a HookedTransformer.
        transcoders: transcoders of distinct layers; MLPs without one keep their real output.
        tokens: one prompt, [pos].
        answer_id: the token whose logit at the last position is explained.

    Returns:
        (feature_attr, error_attr), float tensors in the order of ``transcoders``:
        feature_attr [n_transcoders, pos, d_sae] (zero where a feature is off) and error_attr
        [n_transcoders, pos] (an error term's attribution summed over its d_model entries).
        Works when the caller has turned gradients off, and leaves no hooks on the model.

    Raises:
        ValueError: when tokens is not one prompt.
    """
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be one prompt, [pos]; got shape {tuple(tokens.shape)}")
    by_layer = {tc.cfg.layer: tc for tc in transcoders}
    inputs: dict[int, Tensor] = {}
    sources: dict[int, tuple[Tensor, Tensor]] = {}

    def freeze(value: Tensor, hook) -> Tensor:
        return value.detach()

    def save_input(x: Tensor, hook) -> None:
        inputs[hook.layer()] = x

    def replace(y: Tensor, hook) -> Tensor:
        if hook.layer() not in by_layer:
            return y.detach()
        tc, x = by_layer[hook.layer()], inputs[hook.layer()]
        acts = tc.encode(x).detach().requires_grad_(True)
        recon = tc.decode(acts) + tc.skip_out(x)
        error = (y - recon).detach().requires_grad_(True)
        sources[hook.layer()] = (acts, error)
        return recon + error

    hooks = [
        (lambda name: name.endswith("hook_pattern") or name.endswith("hook_scale"), freeze),
        (lambda name: name.endswith("ln2.hook_normalized"), save_input),
        (lambda name: name.endswith("hook_mlp_out"), replace),
    ]
    with torch.enable_grad():
        logit = model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0, -1, answer_id]
        leaves = [t for tc in transcoders for t in sources[tc.cfg.layer]]
        grads = torch.autograd.grad(logit, leaves, allow_unused=True)
    attrs = [torch.zeros_like(t) if g is None else (t * g).detach() for t, g in zip(leaves, grads)]
    feature_attr = torch.stack([a[0] for a in attrs[0::2]])
    error_attr = torch.stack([a[0].sum(-1) for a in attrs[1::2]])
    return feature_attr, error_attr
