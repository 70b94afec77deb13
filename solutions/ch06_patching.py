"""Chapter 06 (activation patching): the reference solution of every exercise.

The course's library for the chapter lives in the package: prompt pairs and samplers in
`interplab.pairs`, the metric, the batched patching engine, path and attribution patching in
`interplab.patching`, circuit measurements and diagrams in `interplab.circuits`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.hooks import act_name, layer_of
from interplab.pairs import INDUCTION_CORRUPTIONS, IOI_CORRUPTIONS, name_token_id
from interplab.patching import HEAD_COMPONENTS, LAYER_POS_COMPONENTS, Metric, cache_activations, validate_path

# --- prompt pairs ---------------------------------------------------------------------------


def ioi_pairs(model, prompts: list[dict], corruption: str = "third_name") -> dict[str, Tensor]:
    """Clean and corrupted indirect-object prompts, tokenized by the model's tokenizer.

    Each prompt is a dict with the template "template" (a format string in the model's
    own text format, with the fields {A}, {B}, {S}, {place} and {obj}), the names "A" and
    "B" of the first clause, the subject "S" (A or B), the indirect object "IO" (the
    other one), a third name "C" (neither A nor B), and the words "place" and "obj". The
    clean text is the template filled in with these words.

    Corruptions (each changes as little as possible):
        "swap_names": A and B exchanged everywhere (the template stays; the answer flips
            to the clean S).
        "swap_template": the subject of the final clause becomes the IO, so the other name
            is repeated (ABBA <-> BABA; only the final clause's subject changes; the
            answer flips to the clean S).
        "third_name": the IO, in the first clause, is replaced by C (only that word
            changes; the answer becomes C, a name the clean prompt never mentions).

    Args:
        model: a HookedTransformer; its tokenizer turns the texts into ids.
        prompts: the prompts, all of the same template length.
        corruption: one of "swap_names", "swap_template", "third_name".

    Returns:
        A dict of integer tensors: "clean" and "corrupted" [batch, pos], the token ids of
        the two texts, each starting with the model's <bos> token (the model was trained
        with it); "answer" [batch], the token of the IO, and "wrong" [batch], the token of
        S, each name spelled as the next word of a sentence (for a BPE tokenizer such as
        GPT-2's, the token with a leading space, which differs from the bare name's). The
        answer and wrong tokens are the clean prompt's: the metric compares the same two
        names on both runs.

    Raises:
        ValueError: for an unknown corruption, or when the texts do not all tokenize to
            the same number of tokens (patching compares positions, so they must align).
    """
    if corruption not in IOI_CORRUPTIONS:
        raise ValueError(f"corruption must be one of {IOI_CORRUPTIONS}, not {corruption!r}")
    clean, corrupted, answer, wrong = [], [], [], []
    for p in prompts:
        template = p["template"]
        words = dict(A=p["A"], B=p["B"], S=p["S"], place=p["place"], obj=p["obj"])
        if corruption == "swap_names":
            other = {p["A"]: p["B"], p["B"]: p["A"]}
            bad = dict(words, A=p["B"], B=p["A"], S=other[p["S"]])
        elif corruption == "swap_template":
            bad = dict(words, S=p["IO"])
        else:
            io_slot = "A" if p["IO"] == p["A"] else "B"
            bad = dict(words, **{io_slot: p["C"]})
        clean.append(model.to_tokens(template.format(**words))[0].cpu())
        corrupted.append(model.to_tokens(template.format(**bad))[0].cpu())
        answer.append(name_token_id(model, p["IO"]))
        wrong.append(name_token_id(model, p["S"]))
    lengths = {len(t) for t in clean + corrupted}
    if len(lengths) != 1:
        raise ValueError(
            f"the prompts tokenize to different lengths {sorted(lengths)}; patching needs aligned "
            f"positions: use one template and single-token names"
        )
    return {
        "clean": torch.stack(clean),
        "corrupted": torch.stack(corrupted),
        "answer": torch.tensor(answer),
        "wrong": torch.tensor(wrong),
    }


def induction_pairs(
    model, sequences: list[list[str]], cut: int, replacements: list[str], corruption: str = "answer"
) -> dict[str, Tensor]:
    """Repeated sequences for induction, clean and corrupted.

    The clean prompt is <bos>, the sequence x_0 .. x_{n-1}, then its first `cut` words
    again, x_0 .. x_{cut-1}: an induction head predicts x_cut next (it was what followed
    x_{cut-1} the first time). The corrupted prompt changes one word of the FIRST copy
    to the replacement word r:
        "answer": x_cut becomes r, so induction now predicts r.
        "match": x_{cut-1} becomes r, so the current word x_{cut-1} never appeared
            before and there is nothing to copy.

    Each word is one token: the token the model's tokenizer gives it as the next word of
    a sentence (for a BPE tokenizer, the one with a leading space). Every prompt starts
    with the model's <bos> token.

    Args:
        model: a HookedTransformer (for its tokenizer).
        sequences: the word sequences, all of the same length n > cut.
        cut: how many words of the sequence are repeated (1 <= cut < n).
        replacements: one replacement word per sequence (not in the sequence).
        corruption: "answer" or "match".

    Returns:
        A dict of integer tensors: "clean", "corrupted" [batch, 1 + n + cut] token ids,
        "answer" [batch] (the token of x_cut) and "wrong" [batch] (the token of r).

    Raises:
        ValueError: for an unknown corruption, sequences of different lengths, or a cut
            outside 1 <= cut < n.
    """
    if corruption not in INDUCTION_CORRUPTIONS:
        raise ValueError(f"corruption must be one of {INDUCTION_CORRUPTIONS}, not {corruption!r}")
    if len({len(s) for s in sequences}) != 1 or not 1 <= cut < len(sequences[0]):
        raise ValueError("all sequences must have the same length n, and 1 <= cut < n")
    bos = model.tokenizer.bos_token_id
    clean, corrupted, answer, wrong = [], [], [], []
    for seq, r in zip(sequences, replacements, strict=True):
        ids = [name_token_id(model, w) for w in seq]
        r_id = name_token_id(model, r)
        first = list(ids)
        first[cut if corruption == "answer" else cut - 1] = r_id
        clean.append([bos] + ids + ids[:cut])
        corrupted.append([bos] + first + ids[:cut])
        answer.append(ids[cut])
        wrong.append(r_id)
    return {
        "clean": torch.tensor(clean),
        "corrupted": torch.tensor(corrupted),
        "answer": torch.tensor(answer),
        "wrong": torch.tensor(wrong),
    }


# --- the metric ------------------------------------------------------------------------------


def _logit_diff(logits: Tensor, answer: Tensor, wrong: Tensor) -> Tensor:
    """logits[b, -1, answer[b]] - logits[b, -1, wrong[b]] for each prompt b."""
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

    A prompt's logit difference is the logit of its right token minus the logit of its
    wrong token, both at the final position. Their mean over the batch, ld, is rescaled
    linearly so that ld equal to clean_ld scores 1 and ld equal to corrupted_ld scores 0.

    Args:
        logits: the model's output logits.
        answer: the right next token of each prompt.
        wrong: the competing wrong token of each prompt.
        clean_ld: the mean logit difference of the clean run.
        corrupted_ld: the mean logit difference of the corrupted run.

    Returns:
        A 0-dimensional float tensor that stays differentiable with respect to the logits:
        attribution patching takes its gradient, so a value detached from the logits (a
        Python number turned back into a tensor) is wrong even when the number is right.
        With gradients turned off by the caller it simply carries no graph.
    """
    ld = _logit_diff(logits, answer, wrong).mean()
    return (ld - corrupted_ld) / (clean_ld - corrupted_ld)


# --- patching sweeps --------------------------------------------------------------------------


def _rows_per_pass(model, batch: int, n_pos: int, max_elements: float = 6e7) -> int:
    """How many patches fit in one forward pass (bounding the largest activation, usually the logits)."""
    widest = max(model.cfg.d_vocab, model.cfg.d_mlp or 0, model.cfg.d_model, model.cfg.n_heads * n_pos)
    return max(1, int(max_elements // (batch * n_pos * widest)))


def _run_patches(
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
                chunk = members[start : start + per_pass]
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
                    results[i] = metric(logits[k * batch : (k + 1) * batch]).detach().float().cpu()
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
            (TransformerLens's hook of that name in each block).

    Returns:
        A float tensor on the CPU, [n_layers, pos]: the metric with that single patch
        made. It must work when the caller has turned gradients off, and leave the model
        as it found it (no hooks left attached).
    """
    if component not in LAYER_POS_COMPONENTS:
        raise ValueError(f"component must be one of {sorted(LAYER_POS_COMPONENTS)}, not {component!r}")
    names = [act_name(component, layer) for layer in range(model.cfg.n_layers)]
    source = cache_activations(model, source_tokens, names)
    n_pos = target_tokens.shape[1]
    patches = [(name, (pos,)) for name in names for pos in range(n_pos)]
    return _run_patches(model, target_tokens, source, patches, metric).reshape(model.cfg.n_layers, n_pos)


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
        A float tensor on the CPU, [n_layers, n_heads]: the metric with that one head
        patched. It must work when the caller has turned gradients off, and leave the
        model as it found it (no hooks left attached).
    """
    if component not in HEAD_COMPONENTS:
        raise ValueError(f"component must be one of {sorted(HEAD_COMPONENTS)}, not {component!r}")
    names = [act_name(component, layer) for layer in range(model.cfg.n_layers)]
    source = cache_activations(model, source_tokens, names)
    if component == "pattern":
        patches = [(name, (head,)) for name in names for head in range(model.cfg.n_heads)]
    else:
        patches = [(name, (slice(None), head)) for name in names for head in range(model.cfg.n_heads)]
    return _run_patches(model, target_tokens, source, patches, metric).reshape(model.cfg.n_layers, model.cfg.n_heads)


def patch_head_pos_sweep(
    model,
    source_tokens: Int[Tensor, "batch pos"],
    target_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    component: str = "z",
) -> Float[Tensor, "layer pos head"]:
    """Patch one attention head's activation at one position, for every (layer, position, head).

    As `patch_head_sweep`, but at a single position: for "z", "q", "k" and "v" the head's
    vector at that position, for every prompt; for "pattern" the head's attention from
    query position pos (where the head looks from there, over every key position).

    Args:
        model: a HookedTransformer.
        source_tokens: the prompts whose activations are pasted in.
        target_tokens: the prompts the model runs on (same shape).
        metric: logits [batch, pos, vocab] -> a 0-dimensional tensor.
        component: "z", "q", "k", "v" or "pattern".

    Returns:
        A float tensor on the CPU, [n_layers, pos, n_heads] (the same layout for every
        component): the metric with that one patch made. It must work when the caller has
        turned gradients off, and leave the model as it found it (no hooks left attached).
    """
    if component not in HEAD_COMPONENTS:
        raise ValueError(f"component must be one of {sorted(HEAD_COMPONENTS)}, not {component!r}")
    names = [act_name(component, layer) for layer in range(model.cfg.n_layers)]
    source = cache_activations(model, source_tokens, names)
    n_pos, n_heads = target_tokens.shape[1], model.cfg.n_heads
    patches = []
    for name in names:
        for pos in range(n_pos):
            for head in range(n_heads):
                patches.append((name, (head, pos) if component == "pattern" else (pos, head)))
    return _run_patches(model, target_tokens, source, patches, metric).reshape(model.cfg.n_layers, n_pos, n_heads)


# --- path patching ---------------------------------------------------------------------------


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

    The path is defined by a run on `target_tokens` in which the sender head's output
    (hook_z) takes its value from the `source_tokens` run while every OTHER head's output
    is held at its value on the target run (MLPs and LayerNorms are recomputed): in that
    run the sender's change reaches later layers only directly, through the residual
    stream and the MLPs. The receivers' chosen input (their queries, keys or values) in
    that run is what the direct path makes of it.

    The result is the metric of a run on `target_tokens` in which only those receiver
    heads' chosen input takes those values (no other head, no other input of theirs),
    everything else computed normally. With ``receivers=None`` the receiver is the
    unembedding: the result is the metric of the frozen run itself (the sender's effect
    on the logits without any later head).

    Args:
        model: a HookedTransformer.
        source_tokens: the prompts the sender's output comes from.
        target_tokens: the prompts the model runs on.
        metric: logits [batch, pos, vocab] -> a 0-dimensional tensor.
        sender: (layer, head) of the sender.
        receivers: (layer, head) of each receiver (all in later layers), or None.
        receiver_input: which input of the receivers to patch: "q", "k" or "v".

    Returns:
        The metric, a Python float. It must work when the caller has turned gradients off,
        and leave the model as it found it (no hooks left attached).

    Raises:
        ValueError: if the sender is not a head of the model, a receiver is not in a later
            layer than the sender, or receiver_input is not "q", "k" or "v".
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
        logits = model.run_with_hooks(
            target_tokens, fwd_hooks=[(n, freeze) for n in z_names] + [(n, store) for n in receiver_names]
        )
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


# --- attribution patching --------------------------------------------------------------------


def attribution_patch(
    model,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    component: str = "z",
) -> Tensor:
    """Estimate every denoising patch of one component at once, from one backward pass.

    To first order, patching activation a from its corrupted value to its clean value
    changes the metric by the dot product of (a_clean - a_corrupted) with the metric's
    gradient with respect to a, the gradient taken on the CORRUPTED run (a Taylor
    expansion around the run patched into). Each estimate is for one patch of
    `patch_layer_pos_sweep` / `patch_head_pos_sweep`: one position (and head), every
    prompt at once.

    Args:
        model: a HookedTransformer.
        clean_tokens: the clean prompts.
        corrupted_tokens: the corrupted prompts (same shape).
        metric: logits [batch, pos, vocab] -> a 0-dimensional tensor (differentiable).
        component: "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out" (giving
            [layer, pos]) or "z", "q", "k", "v" (giving [layer, pos, head]).

    Returns:
        A float tensor on the CPU, [n_layers, pos] or [n_layers, pos, n_heads]: the
        estimated CHANGE of the metric (patched minus corrupted) for each patch. It must
        work when the caller has turned gradients off (it needs them inside), and leave
        the model as it found it (no hooks left attached).
    """
    if component not in LAYER_POS_COMPONENTS and component not in ("z", "q", "k", "v"):
        raise ValueError(f"component must be a residual-stream component or 'z', 'q', 'k', 'v', not {component!r}")
    names = [act_name(component, layer) for layer in range(model.cfg.n_layers)]
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


# --- circuits ---------------------------------------------------------------------------------


def circuit_faithfulness(
    model,
    tokens: Int[Tensor, "batch pos"],
    answer: Int[Tensor, " batch"],
    wrong: Int[Tensor, " batch"],
    circuit: list[tuple[int, int]],
    mean_tokens: Int[Tensor, "ref_batch pos"],
) -> float:
    """How much of the model's logit difference a circuit of heads keeps on its own.

    Every head NOT in `circuit` is mean-ablated: its output (hook_z) at each position is
    replaced by its mean output at that position over the prompts `mean_tokens` (a
    reference distribution, e.g. the third-name corruption, with the same positions).
    MLPs and embeddings are kept. Faithfulness is the mean logit difference (answer
    minus wrong, final position) of this run divided by that of the intact model.

    Args:
        model: a HookedTransformer.
        tokens: the prompts to evaluate.
        answer: the right next token of each prompt.
        wrong: the competing wrong token of each prompt.
        circuit: the heads to keep, as (layer, head).
        mean_tokens: the prompts the means are taken over (same number of positions).

    Returns:
        ld(circuit only) / ld(full model), a Python float (1.0: the circuit does it all).
        The model is left as it was found (no hooks left attached).

    Raises:
        ValueError: if a head of `circuit` is not a head of the model, or mean_tokens has
            a different number of positions from tokens.
    """
    if mean_tokens.shape[1] != tokens.shape[1]:
        raise ValueError(
            f"mean_tokens has {mean_tokens.shape[1]} positions but tokens has {tokens.shape[1]}: "
            f"mean ablation needs aligned positions"
        )
    for layer, head in circuit:
        if not (0 <= layer < model.cfg.n_layers and 0 <= head < model.cfg.n_heads):
            raise ValueError(f"({layer}, {head}) is not a head of this model")
    device = model.cfg.device
    tokens = tokens.to(device)
    names = [act_name("z", layer) for layer in range(model.cfg.n_layers)]
    means = {n: z.mean(dim=0) for n, z in cache_activations(model, mean_tokens, names).items()}
    keep = set(map(tuple, circuit))

    def ablate(z, hook):
        layer = hook.layer()
        z = z.clone()
        for head in range(model.cfg.n_heads):
            if (layer, head) not in keep:
                z[:, :, head] = means[hook.name][:, head]
        return z

    with torch.no_grad():
        full = _logit_diff(model(tokens), answer.to(device), wrong.to(device)).mean()
        logits = model.run_with_hooks(tokens, fwd_hooks=[(n, ablate) for n in names])
        kept = _logit_diff(logits, answer.to(device), wrong.to(device)).mean()
    return (kept / full).item()
