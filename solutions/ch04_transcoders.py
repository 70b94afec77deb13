"""Chapter 4 (transcoders): the reference solution of every exercise.

The transcoder module, its trainer (shared with chapter 3's SAEs), saving and loading, the
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

    Unlike an SAE, a transcoder does NOT subtract b_dec from its input: b_dec lives in
    the output space (the MLP's output), x in the input space (the MLP's normalised input).
    A skip transcoder adds a linear path straight from input to output; W_skip is
    stored like an nn.Linear weight, [d_out, d_in] (as in SAELens).

    Args:
        x: the MLP's normalised inputs, one row per token.
        W_enc: encoder weights.
        b_enc: encoder bias.
        W_dec: decoder weights; row i is feature i's output direction.
        b_dec: decoder (output) bias.
        W_skip: the skip path's weights, or None for a plain transcoder.

    Returns:
        (y_hat, acts): acts = ReLU(x @ W_enc + b_enc);
        y_hat = acts @ W_dec + b_dec, plus x @ W_skip.T when W_skip is given.
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

    The MLP's input is the residual stream after the layer norm before the MLP
    (``blocks.{layer}.ln2.hook_normalized``); its output is what it adds to the residual
    stream (``blocks.{layer}.hook_mlp_out``). Run the model once with a cache of just
    those two hooks (`run_with_cache(..., names_filter=...)`).

    Args:
        model: a HookedTransformer.
        tokens: input ids.
        layer: which MLP.
        mask: True at the tokens to keep; None keeps every position.

    Returns:
        (x, y), each [n_kept, d_model], rows in row-major (batch, then position) order.
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

    The penalty is chapter 3's: for a standard (ReLU) transcoder, L1 weighted by each
    feature's decoder norm; TopK and BatchTopK transcoders have no penalty (their
    activation function enforces the sparsity), though l1 is still reported.

    Args:
        transcoder: a `Transcoder` (use ``transcoder.encode``, ``transcoder(x)`` or
            ``decode`` + ``skip_out``, ``transcoder.W_dec``, ``transcoder.cfg``).
        x: the MLP's normalised inputs.
        y: the MLP's outputs (the target).

    Returns:
        (loss, mse, l1), scalar tensors:
        mse = squared error of the prediction (with the skip path, if any) against y,
        summed over the last dimension and averaged over the batch;
        l1 = sum_i |acts[:, i]| * ||W_dec[i]||, averaged over the batch;
        loss = mse + cfg.l1_coeff * l1 for "standard", else mse.
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

    Run the model three times:

    - clean;
    - replaced: every transcoder's MLP output (``blocks.{L}.hook_mlp_out``, L =
      ``transcoder.cfg.layer``) is replaced, at the positions in mask, by the
      transcoder's prediction from the MLP input of THIS run
      (``blocks.{L}.ln2.hook_normalized``): a later transcoder reads a residual stream
      already changed by the earlier ones, as in a true replacement model;
    - ablated: the same MLPs' outputs are zeroed at the same positions.

    A prediction (logits at p for the token at p + 1) is scored when both mask[b, p] and
    mask[b, p + 1] are True; the losses average over the scored predictions.

    Args:
        model: a HookedTransformer.
        transcoders: one or more transcoders, each replacing the MLP of its cfg.layer.
        tokens: input ids.
        mask: True at the tokens where the MLPs are replaced (real tokens: not <bos>, not padding).

    Returns:
        A dict of Python floats: "ce_clean", "ce_replaced", "ce_ablated" (mean next-token
        cross-entropy of each run) and "loss_recovered" =
        (ce_ablated - ce_replaced) / (ce_ablated - ce_clean).
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
    out = {name: -logits[:, :-1].log_softmax(-1).gather(-1, targets)[..., 0][scored].mean().item()
           for name, logits in runs.items()}
    out["loss_recovered"] = (out["ce_ablated"] - out["ce_replaced"]) / (out["ce_ablated"] - out["ce_clean"])
    return out


def de_embedding(model, transcoder: Transcoder, feature: int) -> Float[Tensor, " d_vocab"]:
    """Which tokens turn a feature on directly: its encoder vector read through the token embeddings.

    A token's embedding reaches every MLP's input through the residual stream (the
    "direct path"). Ignoring attention, earlier MLPs and the layer norm's scale, token t
    adds W_E[t] @ W_enc[:, feature] to the feature's pre-activation.

    Args:
        model: a HookedTransformer (token embeddings model.W_E, [d_vocab, d_model]).
        transcoder: the transcoder the feature belongs to.
        feature: the feature's index.

    Returns:
        model.W_E @ transcoder.W_enc[:, feature], one value per vocabulary token.
    """
    if not 0 <= feature < transcoder.cfg.d_sae:
        raise ValueError(f"feature must be between 0 and {transcoder.cfg.d_sae - 1}, got {feature}")
    return model.W_E @ transcoder.W_enc[:, feature]


def pullback(earlier: Transcoder, later: Transcoder, feature: int) -> Float[Tensor, " d_sae_earlier"]:
    """How much each earlier feature, through the residual stream, drives one later feature.

    An earlier feature i writes W_dec[i] (of the earlier transcoder) into the residual
    stream; the later feature reads the stream with its encoder vector. Ignoring
    everything in between (attention, other MLPs, the layer norm's scale), one unit of
    feature i adds earlier.W_dec[i] @ later.W_enc[:, feature] to the later feature's
    pre-activation. This is the later feature's encoder "pulled back" through the
    earlier transcoder's decoder.

    Args:
        earlier: the transcoder of an earlier layer.
        later: the transcoder of a later layer.
        feature: the index of a feature of the later transcoder.

    Returns:
        earlier.W_dec @ later.W_enc[:, feature], one value per feature of the earlier transcoder.
    """
    if earlier.cfg.layer >= later.cfg.layer:
        raise ValueError(f"the earlier transcoder (layer {earlier.cfg.layer}) must come before the later one "
                         f"(layer {later.cfg.layer}): a feature only reads what earlier layers wrote")
    if not 0 <= feature < later.cfg.d_sae:
        raise ValueError(f"feature must be between 0 and {later.cfg.d_sae - 1}, got {feature}")
    return earlier.W_dec @ later.W_enc[:, feature]


def answer_attribution(
    model, transcoders: Sequence[Transcoder], tokens: Int[Tensor, " pos"], answer_id: int
) -> tuple[Float[Tensor, "n_transcoders pos d_sae"], Float[Tensor, "n_transcoders pos"]]:
    """Activation times gradient: how much each transcoder feature (and each error term) drives the answer logit.

    Build the replacement model with ERROR TERMS, so that it computes exactly what the
    model computes: at each transcoder's layer, replace the MLP output y (at every
    position) by

        transcoder.decode(acts) + transcoder.skip_out(x) + error,   acts = transcoder.encode(x),

    where x is the MLP input of this run and error = y - transcoder(x), detached
    (a constant: the part of the MLP the transcoder misses). Then take the logit of
    ``answer_id`` at the last position and its gradient (torch.autograd.grad, inside
    torch.enable_grad()) with respect to every acts and every error tensor. Gradients
    flow through later transcoders' features and the attention layers.

    Args:
        model: a HookedTransformer.
        transcoders: transcoders of distinct layers, all with the same d_sae; MLPs
            without one stay as they are.
        tokens: one prompt, [pos].
        answer_id: the token whose logit at the last position is explained.

    Returns:
        (feature_attr, error_attr), in the order of ``transcoders``:
        feature_attr[i, p, f] = acts[p, f] * d logit / d acts[p, f] of transcoder i;
        error_attr[i, p] = error[p] . d logit / d error[p] (summed over d_model).
    """
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be one prompt, [pos]; got shape {tuple(tokens.shape)}")
    by_layer = {tc.cfg.layer: i for i, tc in enumerate(transcoders)}
    inputs: dict[int, Tensor] = {}
    acts: list[Tensor | None] = [None] * len(transcoders)
    errors: list[Tensor | None] = [None] * len(transcoders)

    def save_input(x: Tensor, hook) -> None:
        inputs[hook.layer()] = x

    def replace(y: Tensor, hook) -> Tensor:
        i = by_layer[hook.layer()]
        tc, x = transcoders[i], inputs[hook.layer()]
        acts[i] = tc.encode(x)
        recon = tc.decode(acts[i]) + tc.skip_out(x)
        errors[i] = (y - recon).detach().requires_grad_(True)
        return recon + errors[i]

    hooks = [(mlp_in_hook(L), save_input) for L in by_layer] + [(mlp_out_hook(L), replace) for L in by_layer]
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks)
        logit = logits[0, -1, answer_id]
        grads = torch.autograd.grad(logit, acts + errors)
    n = len(transcoders)
    feature_attr = torch.stack([(a * g)[0] for a, g in zip(acts, grads[:n])]).detach()
    error_attr = torch.stack([(e * g).sum(-1)[0] for e, g in zip(errors, grads[n:])]).detach()
    return feature_attr, error_attr
