"""Activation patching: the metric, one batched patching engine, its sweeps, path patching and attribution patching.

Vocabulary used throughout:

- The **source** run provides activations; the **target** run receives them. Denoising
  patches clean activations into the corrupted run (source = clean, target = corrupted)
  and asks "is this enough to bring the behaviour back?". Noising patches corrupted
  activations into the clean run (source = corrupted, target = clean) and asks "is this
  needed for the behaviour?".
- A **metric** maps the logits of a batch of prompts, [batch, pos, vocab], to one
  number (a 0-dimensional tensor), exactly as TransformerLens's ``patching`` module
  expects. `logit_diff_metric` builds the normalised logit difference (clean = 1,
  corrupted = 0).
- Sweeps return one metric value per patch: [layer, pos] for residual-stream-shaped
  activations, [layer, head] for heads over all positions, [layer, pos, head] for heads
  at one position (for the attention pattern, "pos" is the query position).

The sweeps batch many patches into one forward pass: the target prompts are repeated
once per patch, and each hook edits only its own copy. This gives the same numbers as
one forward pass per patch (as TransformerLens does) in a fraction of the time.

Chapter 05's exercises ask learners to write some of these functions (the metric, the sweeps,
`path_patch`, `attribution_patch`); the answer key (`interplab.solutions.ch05_patching`) holds
their learner-facing references, and tests/test_ch05_patching.py checks that the two agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .hooks import act_name, layer_of

Metric = Callable[[Tensor], Tensor]

# the components the sweeps patch, by TransformerLens's short names (`hooks.act_name` spells the hook)
LAYER_POS_COMPONENTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")  # [batch, pos, d_model]
HEAD_COMPONENTS = ("z", "q", "k", "v", "pattern")  # [batch, pos, head, d_head]; the pattern [batch, head, q, k]


# --- the metric -------------------------------------------------------------------------


def logit_diff(logits: Float[Tensor, "batch pos vocab"], answer: Int[Tensor, " batch"],
               wrong: Int[Tensor, " batch"]) -> Float[Tensor, " batch"]:
    """Logit of the right answer minus logit of the wrong one, at the final position, for each prompt."""
    final = logits[:, -1]
    return final.gather(-1, answer[:, None])[:, 0] - final.gather(-1, wrong[:, None])[:, 0]


def normalised_logit_diff(
    logits: Float[Tensor, "batch pos vocab"],
    answer: Int[Tensor, " batch"],
    wrong: Int[Tensor, " batch"],
    clean_ld: float,
    corrupted_ld: float,
) -> Float[Tensor, ""]:
    """The mean logit difference, rescaled so that the clean run gives 1 and the corrupted run 0.

    The logit difference of prompt b is logits[b, -1, answer[b]] - logits[b, -1, wrong[b]]
    (at the final position). Its mean over the batch, ld, becomes
    (ld - corrupted_ld) / (clean_ld - corrupted_ld).

    Args:
        logits: the model's output logits.
        answer: the right next token of each prompt.
        wrong: the competing wrong token of each prompt.
        clean_ld: the mean logit difference of the clean run.
        corrupted_ld: the mean logit difference of the corrupted run.

    Returns:
        A 0-dimensional tensor (keep it a tensor: attribution patching differentiates it).
    """
    ld = logit_diff(logits, answer, wrong).mean()
    return (ld - corrupted_ld) / (clean_ld - corrupted_ld)


def mean_logit_diff(model, tokens: Int[Tensor, "batch pos"], answer: Int[Tensor, " batch"],
                    wrong: Int[Tensor, " batch"]) -> float:
    """The mean logit difference (answer minus wrong, at the final position) of the model on `tokens`."""
    with torch.no_grad():
        return logit_diff(model(tokens), answer, wrong).mean().item()


def logit_diff_metric(model, pairs: dict[str, Tensor]) -> Metric:
    """The normalised logit difference of a dataset from `ioi_pairs` / `induction_pairs`, as a metric."""
    answer, wrong = pairs["answer"], pairs["wrong"]
    clean_ld = mean_logit_diff(model, pairs["clean"], answer, wrong)
    corrupted_ld = mean_logit_diff(model, pairs["corrupted"], answer, wrong)

    def metric(logits: Tensor) -> Tensor:
        return normalised_logit_diff(logits, answer.to(logits.device), wrong.to(logits.device), clean_ld, corrupted_ld)

    metric.clean_ld, metric.corrupted_ld = clean_ld, corrupted_ld
    return metric


# --- the batched patching engine ---------------------------------------------------------


def hook_name(component: str, layer: int) -> str:
    """The TransformerLens hook name of `component` ("resid_pre", "z", "pattern", ...) in block `layer`."""
    if component not in LAYER_POS_COMPONENTS + HEAD_COMPONENTS:
        raise ValueError(f"unknown component {component!r}; choose one of {sorted(LAYER_POS_COMPONENTS + HEAD_COMPONENTS)}")
    return act_name(component, layer)


def cache_activations(model, tokens: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """{hook name: activation} of one forward pass on `tokens`, keeping only the hooks `names`."""
    names = set(names)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=lambda n: n in names)
    return {n: cache[n] for n in names}


def _rows_per_pass(model, batch: int, n_pos: int, max_elements: float = 6e7) -> int:
    """How many patches fit in one forward pass (bounding the largest activation, usually the logits)."""
    widest = max(model.cfg.d_vocab, model.cfg.d_mlp or 0, model.cfg.d_model, model.cfg.n_heads * n_pos)
    return max(1, int(max_elements // (batch * n_pos * widest)))


def run_patches(
    model,
    target_tokens: Int[Tensor, "batch pos"],
    source: dict[str, Tensor],
    patches: Sequence[tuple[str, tuple]],
    metric: Metric,
    max_patches_per_pass: int | None = None,
) -> Float[Tensor, " patch"]:
    """Run many single-activation patches, many per forward pass; one metric value per patch.

    Each patch is (hook name, index): in the target run, ``act[:, *index]`` of that hook
    is replaced by ``source[hook name][:, *index]`` for every prompt. Two tricks make a
    sweep fast:

    - Batching: the target prompts are repeated once per patch (rows k*batch ..
      (k+1)*batch - 1 belong to patch k), each hook edits only its own patches' rows,
      and the metric is applied to each patch's rows of the logits.
    - A patch in block l cannot change anything before block l, so patches of block l
      start from the target run's cached residual stream at block l
      (``start_at_layer=l``) instead of recomputing the earlier blocks.
    """
    device = model.cfg.device
    target_tokens = target_tokens.to(device)
    batch, n_pos = target_tokens.shape
    per_pass = max_patches_per_pass or _rows_per_pass(model, batch, n_pos)
    layers = sorted({layer_of(name) for name, _ in patches if layer_of(name) is not None})
    starts = cache_activations(model, target_tokens, [act_name("resid_pre", layer) for layer in layers])
    groups: dict[int | None, list[int]] = {}
    for i, (name, _) in enumerate(patches):
        groups.setdefault(layer_of(name), []).append(i)
    results = torch.zeros(len(patches))
    with torch.no_grad():
        for layer, members in groups.items():
            for start in range(0, len(members), per_pass):
                chunk = members[start:start + per_pass]
                by_hook: dict[str, list[tuple[int, tuple]]] = {}
                for k, i in enumerate(chunk):
                    name, index = patches[i]
                    by_hook.setdefault(name, []).append((k, index))

                def hook(act, hook, chunk=chunk, by_hook=by_hook):
                    rows = act.view(len(chunk), batch, *act.shape[1:])
                    src = source[hook.name]
                    for k, index in by_hook[hook.name]:
                        rows[(k, slice(None)) + index] = src[(slice(None),) + index]
                    return act

                hooks = [(name, hook) for name in by_hook]
                if layer is None:
                    logits = model.run_with_hooks(target_tokens.repeat(len(chunk), 1), fwd_hooks=hooks)
                else:
                    resid = starts[act_name("resid_pre", layer)].repeat(len(chunk), 1, 1)
                    logits = model.run_with_hooks(resid, start_at_layer=layer, fwd_hooks=hooks)
                for k, i in enumerate(chunk):
                    results[i] = metric(logits[k * batch:(k + 1) * batch]).detach().float().cpu()
    return results


def patch_layer_pos_sweep(
    model,
    source_tokens: Int[Tensor, "batch pos"],
    target_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    component: str = "resid_pre",
) -> Float[Tensor, "layer pos"]:
    """Patch a residual-stream-shaped activation at one (layer, position) at a time.

    For every layer l and position p: run the model on `target_tokens`, with the
    activation `component` of layer l at position p (for every prompt) replaced by its
    value on `source_tokens`, and record metric(logits). Denoising: source = clean,
    target = corrupted. Noising: source = corrupted, target = clean.

    Args:
        model: a HookedTransformer.
        source_tokens: the prompts whose activations are pasted in.
        target_tokens: the prompts the model runs on (same shape).
        metric: logits [batch, pos, vocab] -> a 0-dimensional tensor.
        component: "resid_pre", "resid_mid", "resid_post", "attn_out" or "mlp_out"
            (hook `blocks.{l}.hook_{component}`).

    Returns:
        [n_layers, pos] metric values, as a float32 tensor on the CPU.
    """
    if component not in LAYER_POS_COMPONENTS:
        raise ValueError(f"component must be one of {sorted(LAYER_POS_COMPONENTS)}, not {component!r}")
    names = [hook_name(component, layer) for layer in range(model.cfg.n_layers)]
    source = cache_activations(model, source_tokens, names)
    n_pos = target_tokens.shape[1]
    patches = [(name, (pos,)) for name in names for pos in range(n_pos)]
    return run_patches(model, target_tokens, source, patches, metric).reshape(model.cfg.n_layers, n_pos)


def patch_head_sweep(
    model,
    source_tokens: Int[Tensor, "batch pos"],
    target_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    component: str = "z",
) -> Float[Tensor, "layer head"]:
    """Patch one attention head's activation, at every position at once, one head at a time.

    Components: "z" (the head's output before W_O; patching it patches the head's output),
    "q", "k", "v" (its queries, keys, values) and "pattern" (its attention pattern).
    hook_z/q/k/v are [batch, pos, head, d_head]; hook_pattern is [batch, head, query, key].

    Args:
        model: a HookedTransformer.
        source_tokens: the prompts whose activations are pasted in.
        target_tokens: the prompts the model runs on (same shape).
        metric: logits [batch, pos, vocab] -> a 0-dimensional tensor.
        component: "z", "q", "k", "v" or "pattern".

    Returns:
        [n_layers, n_heads] metric values, as a float32 tensor on the CPU.
    """
    if component not in HEAD_COMPONENTS:
        raise ValueError(f"component must be one of {sorted(HEAD_COMPONENTS)}, not {component!r}")
    names = [hook_name(component, layer) for layer in range(model.cfg.n_layers)]
    source = cache_activations(model, source_tokens, names)
    if component == "pattern":
        patches = [(name, (head,)) for name in names for head in range(model.cfg.n_heads)]
    else:
        patches = [(name, (slice(None), head)) for name in names for head in range(model.cfg.n_heads)]
    return run_patches(model, target_tokens, source, patches, metric).reshape(model.cfg.n_layers, model.cfg.n_heads)


def patch_head_pos_sweep(
    model,
    source_tokens: Int[Tensor, "batch pos"],
    target_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    component: str = "z",
) -> Float[Tensor, "layer pos head"]:
    """Patch one attention head's activation at one position, for every (layer, position, head).

    As `patch_head_sweep`, but at a single position: for "z", "q", "k" and "v" the entry
    [:, pos, head]; for "pattern" the row of query position pos, [:, head, pos, :] (where
    the head looks from that position).

    Args:
        model: a HookedTransformer.
        source_tokens: the prompts whose activations are pasted in.
        target_tokens: the prompts the model runs on (same shape).
        metric: logits [batch, pos, vocab] -> a 0-dimensional tensor.
        component: "z", "q", "k", "v" or "pattern".

    Returns:
        [n_layers, pos, n_heads] metric values (the same layout for every component), as a
        float32 tensor on the CPU.
    """
    if component not in HEAD_COMPONENTS:
        raise ValueError(f"component must be one of {sorted(HEAD_COMPONENTS)}, not {component!r}")
    names = [hook_name(component, layer) for layer in range(model.cfg.n_layers)]
    source = cache_activations(model, source_tokens, names)
    n_pos, n_heads = target_tokens.shape[1], model.cfg.n_heads
    patches = []
    for name in names:
        for pos in range(n_pos):
            for head in range(n_heads):
                patches.append((name, (head, pos) if component == "pattern" else (pos, head)))
    return run_patches(model, target_tokens, source, patches, metric).reshape(model.cfg.n_layers, n_pos, n_heads)


# --- path patching ----------------------------------------------------------------------------


def validate_path(model, sender: tuple[int, int], receivers, receiver_input: str) -> None:
    """Raise ValueError unless the sender is a head, and every receiver a head of a later layer."""
    layer, head = sender
    if not (0 <= layer < model.cfg.n_layers and 0 <= head < model.cfg.n_heads):
        raise ValueError(f"sender {sender} is not a head of this model")
    if receivers is not None:
        if receiver_input not in ("q", "k", "v"):
            raise ValueError(f"receiver_input must be 'q', 'k' or 'v', not {receiver_input!r}")
        for r_layer, r_head in receivers:
            if r_layer <= layer:
                raise ValueError(f"receiver L{r_layer}H{r_head} is not after the sender L{layer}H{head}: "
                                 f"a head can only send to heads of later layers")


def path_patch(
    model,
    source_tokens: Int[Tensor, "batch pos"],
    target_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    sender: tuple[int, int],
    receivers: list[tuple[int, int]] | None,
    receiver_input: str = "q",
) -> float:
    """The effect of one head on others along the direct path only (path patching).

    1. Run the model on `target_tokens` with the sender head's output (hook_z) taken from
       the `source_tokens` run, and every OTHER head's output held at its value on the
       target run (MLPs are recomputed). Only the direct path from the sender (through
       the residual stream and MLPs) changes anything.
    2. Record the receivers' inputs (hook_q, hook_k or hook_v of each receiver head) in
       that run.
    3. Run the model on `target_tokens` again, with only those receiver inputs patched in
       (everything else recomputed), and return metric(logits).

    With ``receivers=None`` the receiver is the unembedding: return the metric of the
    first run (the sender's direct effect on the logits).

    Args:
        model: a HookedTransformer.
        source_tokens: the prompts the sender's output comes from.
        target_tokens: the prompts the model runs on.
        metric: logits [batch, pos, vocab] -> a 0-dimensional tensor.
        sender: (layer, head) of the sender.
        receivers: (layer, head) of each receiver (all in later layers), or None.
        receiver_input: which input of the receivers to patch: "q", "k" or "v".

    Returns:
        The metric as a Python float.
    """
    validate_path(model, sender, receivers, receiver_input)
    s_layer, s_head = sender
    device = model.cfg.device
    source_tokens, target_tokens = source_tokens.to(device), target_tokens.to(device)
    z_names = [act_name("z", layer) for layer in range(model.cfg.n_layers)]
    target_z = cache_activations(model, target_tokens, z_names)
    source_z = cache_activations(model, source_tokens, [z_names[s_layer]])[z_names[s_layer]]

    def freeze(z, hook):
        new = target_z[hook.name].clone()
        if hook.name == z_names[s_layer]:
            new[:, :, s_head] = source_z[:, :, s_head]
        return new

    receiver_names = sorted({act_name(receiver_input, layer) for layer, _ in receivers or []})
    stored: dict[str, Tensor] = {}

    def store(act, hook):
        stored[hook.name] = act.clone()

    with torch.no_grad():
        logits = model.run_with_hooks(target_tokens, fwd_hooks=[(n, freeze) for n in z_names]
                                      + [(n, store) for n in receiver_names])
        if receivers is None:
            return metric(logits).item()

        def patch_receivers(act, hook):
            layer = hook.layer()
            act = act.clone()
            for r_layer, r_head in receivers:
                if r_layer == layer:
                    act[:, :, r_head] = stored[hook.name][:, :, r_head]
            return act

        logits = model.run_with_hooks(target_tokens, fwd_hooks=[(n, patch_receivers) for n in receiver_names])
        return metric(logits).item()


def path_patch_sweep(
    model,
    source_tokens: Int[Tensor, "batch pos"],
    target_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    receivers: list[tuple[int, int]] | None,
    receiver_input: str = "q",
    max_patches_per_pass: int | None = None,
) -> Float[Tensor, "layer head"]:
    """`path_patch` for every possible sender head at once (batched); NaN where a head cannot send.

    Entry [l, h] is path_patch(..., sender=(l, h), receivers, receiver_input). Senders
    must be in layers before every receiver; other entries are NaN.
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    last = n_layers if receivers is None else min(layer for layer, _ in receivers)
    senders = [(layer, head) for layer in range(last) for head in range(n_heads)]
    for s in senders:
        validate_path(model, s, receivers, receiver_input)
    device = model.cfg.device
    source_tokens, target_tokens = source_tokens.to(device), target_tokens.to(device)
    batch, n_pos = target_tokens.shape
    z_names = [act_name("z", layer) for layer in range(n_layers)]
    target_z = cache_activations(model, target_tokens, z_names)
    source_z = cache_activations(model, source_tokens, z_names)
    receiver_names = sorted({act_name(receiver_input, layer) for layer, _ in receivers or []})
    per_pass = max_patches_per_pass or _rows_per_pass(model, batch, n_pos)
    out = torch.full((n_layers, n_heads), float("nan"))
    with torch.no_grad():
        for start in range(0, len(senders), per_pass):
            chunk = senders[start:start + per_pass]
            n = len(chunk)
            tokens = target_tokens.repeat(n, 1)

            def freeze(z, hook, n=n, chunk=chunk):
                layer = hook.layer()
                new = target_z[hook.name].repeat(n, 1, 1, 1).view(n, batch, *z.shape[1:])
                for k, (s_layer, s_head) in enumerate(chunk):
                    if s_layer == layer:
                        new[k, :, :, s_head] = source_z[hook.name][:, :, s_head]
                return new.view(z.shape)

            stored: dict[str, Tensor] = {}

            def store(act, hook, stored=stored):
                stored[hook.name] = act.clone()

            logits = model.run_with_hooks(tokens, fwd_hooks=[(nm, freeze) for nm in z_names]
                                          + [(nm, store) for nm in receiver_names])
            if receivers is not None:
                def patch_receivers(act, hook, stored=stored):
                    layer = hook.layer()
                    act = act.clone()
                    for r_layer, r_head in receivers:
                        if r_layer == layer:
                            act[:, :, r_head] = stored[hook.name][:, :, r_head]
                    return act

                logits = model.run_with_hooks(tokens, fwd_hooks=[(nm, patch_receivers) for nm in receiver_names])
            for k, (s_layer, s_head) in enumerate(chunk):
                out[s_layer, s_head] = metric(logits[k * batch:(k + 1) * batch]).item()
    return out


# --- attribution patching ----------------------------------------------------------------------


def attribution_patch(
    model,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    component: str = "z",
) -> Tensor:
    """Estimate every denoising patch of one component at once, from one backward pass.

    To first order, patching activation a from its corrupted value to its clean value
    changes the metric by (a_clean - a_corrupted) . d metric / d a, the gradient taken
    on the CORRUPTED run. Summing that product over the batch and the activation's
    last axis gives the estimate of patching every prompt's a at one position (and
    head) at once, as `patch_layer_pos_sweep` / `patch_head_pos_sweep` do.

    Args:
        model: a HookedTransformer.
        clean_tokens: the clean prompts.
        corrupted_tokens: the corrupted prompts (same shape).
        metric: logits [batch, pos, vocab] -> a 0-dimensional tensor (differentiable).
        component: "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out" (giving
            [layer, pos]) or "z", "q", "k", "v" (giving [layer, pos, head]).

    Returns:
        The estimated CHANGE of the metric (patched minus corrupted) for each patch, as a
        float32 tensor on the CPU: [n_layers, pos] or [n_layers, pos, n_heads].
    """
    if component not in LAYER_POS_COMPONENTS and component not in ("z", "q", "k", "v"):
        raise ValueError(f"component must be a residual-stream component or 'z', 'q', 'k', 'v', not {component!r}")
    names = [hook_name(component, layer) for layer in range(model.cfg.n_layers)]
    device = model.cfg.device
    clean = cache_activations(model, clean_tokens, names)
    acts: dict[str, Tensor] = {}

    def keep(act, hook):
        acts[hook.name] = act

    with torch.enable_grad():
        logits = model.run_with_hooks(corrupted_tokens.to(device), fwd_hooks=[(n, keep) for n in names])
        value = metric(logits)
        grads = torch.autograd.grad(value, [acts[n] for n in names])
    estimates = []
    for name, grad in zip(names, grads):
        delta = clean[name] - acts[name].detach()
        estimates.append((delta * grad).sum(dim=(0, -1)))
    return torch.stack(estimates).detach().float().cpu()


def integrated_attribution_patch(
    model,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    component: str = "z",
    steps: int = 5,
) -> Tensor:
    """`attribution_patch` with the gradient averaged along the way from corrupted to clean.

    The first-order estimate uses the slope of the metric at the corrupted run only. When
    the metric is a switch (flat on the corrupted side, steep half-way, flat again at the
    clean side), that slope is about zero and the estimate misses a patch that restores
    everything. Here the token embeddings (and position embeddings) are mixed,
    e + alpha (e_clean - e_corrupted), at `steps` midpoints alpha = (k + 0.5) / steps; the
    gradient with respect to every activation is averaged over those runs and multiplied
    by (a_clean - a_corrupted), as integrated gradients do for the inputs (the
    "EAP-IG" variant of attribution patching). It costs `steps` forward and backward
    passes instead of one, still far fewer than a patching sweep.

    Args:
        model: a HookedTransformer.
        clean_tokens, corrupted_tokens: the two prompt sets (same shape).
        metric: logits [batch, pos, vocab] -> a 0-dimensional tensor (differentiable).
        component: as for `attribution_patch`.
        steps: points on the path (1 takes the single midpoint; 5 is plenty for TinyWorld).

    Returns:
        The estimated change of the metric for each patch, shaped as `attribution_patch`'s.
    """
    if component not in LAYER_POS_COMPONENTS and component not in ("z", "q", "k", "v"):
        raise ValueError(f"component must be a residual-stream component or 'z', 'q', 'k', 'v', not {component!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, not {steps!r}")
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(f"clean and corrupted tokens must have the same shape, not {tuple(clean_tokens.shape)} "
                         f"and {tuple(corrupted_tokens.shape)}")
    names = [hook_name(component, layer) for layer in range(model.cfg.n_layers)]
    inputs = [act_name("embed"), act_name("pos_embed")]
    clean = cache_activations(model, clean_tokens, names + inputs)
    corrupted = cache_activations(model, corrupted_tokens, names + inputs)
    mean_grad = {n: torch.zeros_like(clean[n]) for n in names}
    for k in range(steps):
        alpha = (k + 0.5) / steps
        acts: dict[str, Tensor] = {}

        def mix(act, hook, alpha=alpha):
            # a leaf that requires grad, so that even the embeddings' own sum (resid_pre 0) has a gradient
            return (corrupted[hook.name] + alpha * (clean[hook.name] - corrupted[hook.name])).requires_grad_(True)

        def keep(act, hook, acts=acts):
            acts[hook.name] = act

        with torch.enable_grad():
            logits = model.run_with_hooks(corrupted_tokens.to(model.cfg.device),
                                          fwd_hooks=[(n, mix) for n in inputs] + [(n, keep) for n in names])
            grads = torch.autograd.grad(metric(logits), [acts[n] for n in names])
        for name, grad in zip(names, grads):
            mean_grad[name] += grad / steps
    estimates = [((clean[n] - corrupted[n]) * mean_grad[n]).sum(dim=(0, -1)) for n in names]
    return torch.stack(estimates).detach().float().cpu()


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two tensors, flattened."""
    x, y = x.flatten().double(), y.flatten().double()
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / (x.norm() * y.norm()))
