"""Circuits of attention heads: how faithful a circuit is on its own, what its heads attend to and
write to the logits, the biggest entries of a patching result, and a diagram of the circuit."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .hooks import act_name
from .patching import cache_activations, logit_diff


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
        full = logit_diff(model(tokens), answer.to(device), wrong.to(device)).mean()
        logits = model.run_with_hooks(tokens, fwd_hooks=[(n, ablate) for n in names])
        kept = logit_diff(logits, answer.to(device), wrong.to(device)).mean()
    return (kept / full).item()


def attention_between(model, tokens: Tensor, query: Tensor, key: Tensor) -> Float[Tensor, "layer head"]:
    """Mean attention of every head from position query[b] to key[b] (over the prompts b)."""
    names = [act_name("pattern", layer) for layer in range(model.cfg.n_layers)]
    cache = cache_activations(model, tokens, names)
    b = torch.arange(tokens.shape[0])
    return torch.stack([cache[n][b, :, query, key].mean(0) for n in names]).cpu()


def head_direct_effect(model, tokens: Tensor, answer: Tensor, wrong: Tensor) -> Float[Tensor, "layer head"]:
    """Each head's direct contribution to the logit difference at the final position (direct logit attribution)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(model.cfg.device))
        heads = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)  # [layer*head, batch, d_model]
        direction = model.W_U[:, answer] - model.W_U[:, wrong]  # [d_model, batch]
        effect = (heads * direction.T[None]).sum(-1).mean(-1)
    return effect.reshape(model.cfg.n_layers, model.cfg.n_heads).cpu()


def top_entries(
    values: Tensor, k: int = 5, labels: Callable[[tuple[int, ...]], str] | None = None
) -> list[tuple[str, float]]:
    """The k entries of `values` with the largest absolute value, as (label, value), largest first."""
    flat = values.flatten()
    order = flat.abs().argsort(descending=True)[:k]
    out = []
    for i in order.tolist():
        index = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), values.shape))
        out.append((labels(index) if labels else str(index), float(flat[i])))
    return out


def draw_circuit(
    roles: dict[tuple[int, int], str],
    n_layers: int,
    n_heads: int,
    edges: Sequence[tuple[tuple[int, int] | str, tuple[int, int] | str, float]] = (),
    notes: dict[tuple[int, int] | str, str] | None = None,
    title: str = "",
):
    """A circuit diagram: every head as a node (layer upwards, head across), the circuit's heads
    coloured by role, and arrows (sender, receiver, strength) between heads or to "MLP0".. "logits".

    Nodes other than heads are named by strings: "embed" (below layer 0), "MLP{l}" (right of
    layer l) and "logits" (above the last layer). Each arrow is labelled with its strength; notes
    are wrapped onto short lines under their node so that neighbouring labels do not overlap.
    """
    import textwrap

    import matplotlib.pyplot as plt

    def wrapped(text: str) -> str:
        return "\n".join(textwrap.wrap(text, 16))

    notes = notes or {}
    role_names = sorted(set(roles.values()))
    palette = plt.get_cmap("tab10")
    colour = {r: palette(i % 10) for i, r in enumerate(role_names)}

    def where(node):
        if isinstance(node, tuple):
            return node[1], node[0]
        if node == "embed":
            return (n_heads - 1) / 2, -1.1
        if node == "logits":
            return (n_heads - 1) / 2, n_layers + 0.1
        if node.startswith("MLP"):
            return n_heads + 0.3, int(node[3:]) + 0.35
        raise ValueError(f"unknown node {node!r}")

    fig, ax = plt.subplots(figsize=(2.2 * n_heads + 3.5, 1.9 * n_layers + 2.2))
    for layer in range(n_layers):
        for head in range(n_heads):
            role = roles.get((layer, head))
            ax.scatter(
                [head],
                [layer],
                s=900,
                color=colour[role] if role else "#eeeeee",
                edgecolors="black" if role else "#bbbbbb",
                zorder=3,
            )
            ax.text(head, layer, f"L{layer}H{head}", ha="center", va="center", fontsize=7, zorder=4)
            if (layer, head) in notes:
                ax.text(
                    head, layer - 0.27, wrapped(notes[(layer, head)]), ha="center", va="top", fontsize=5.5, zorder=4
                )
        ax.text(
            n_heads + 0.3,
            layer + 0.35,
            f"MLP{layer}",
            ha="center",
            va="center",
            fontsize=7,
            bbox=dict(boxstyle="round", fc="#fff7dd" if f"MLP{layer}" in notes else "#f6f6f6", ec="#999999"),
        )
        if f"MLP{layer}" in notes:
            ax.text(n_heads + 0.3, layer + 0.2, wrapped(notes[f"MLP{layer}"]), ha="center", va="top", fontsize=5.5)
    for node in ("embed", "logits"):
        x, y = where(node)
        ax.text(
            x, y, node, ha="center", va="center", fontsize=8, bbox=dict(boxstyle="round", fc="#e8f0ff", ec="#6688cc")
        )
    biggest = max([abs(w) for _, _, w in edges] + [1e-9])
    for sender, receiver, weight in edges:
        (x0, y0), (x1, y1) = where(sender), where(receiver)
        ax.annotate(
            "",
            xy=(x1, y1 - 0.18),
            xytext=(x0, y0 + 0.18),
            arrowprops=dict(
                arrowstyle="-|>",
                lw=0.8 + 3.5 * abs(weight) / biggest,
                color="#cc3311" if weight < 0 else "#225588",
                alpha=0.8,
                connectionstyle="arc3,rad=0.12",
            ),
            zorder=2,
        )
        ax.text(
            x0 + 0.55 * (x1 - x0),
            y0 + 0.55 * (y1 - y0),
            f"{weight:.2f}",
            fontsize=6,
            color="#cc3311" if weight < 0 else "#225588",
            ha="center",
            va="center",
            bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8),
            zorder=5,
        )
    for role in role_names:
        ax.scatter([], [], s=120, color=colour[role], edgecolors="black", label=role)
    if role_names:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.set_xlim(-0.7, n_heads + 0.9)
    ax.set_ylim(-1.5, n_layers + 0.5)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def direct_path_drops(
    path_patch_fn: Callable,
    model,
    pairs: dict[str, Tensor],
    metric: Callable[[Tensor], Tensor],
    senders: Sequence[tuple[int, int]],
    readers: Sequence[tuple[int, int]] = (),
    receiver_input: str = "v",
) -> dict[tuple, float]:
    """How much noising moves the metric along each direct path of a circuit, by path patching.

    `path_patch_fn` has the signature of `interplab.patching.path_patch` (the chapter passes the
    learner's). Noising: the senders' outputs come from the corrupted prompts, the model runs on
    the clean ones, so each value is a drop below 1 (the clean metric). The keys:

    - (sender, "logits"): the sender with every later head frozen (its path through the
      residual stream and the MLPs only);
    - (sender, reader): the sender into the `receiver_input` of one reader (a head in a later layer);
    - (sender, tuple(readers)): into all of its later readers at once (effects need not add up);
    - (reader, "logits"): each reader's own direct path.
    """
    clean, corrupted = pairs["clean"], pairs["corrupted"]

    def drop(sender, receivers, inp="q"):
        return 1.0 - float(path_patch_fn(model, corrupted, clean, metric, sender, receivers, inp))

    out: dict[tuple, float] = {}
    for sender in senders:
        out[sender, "logits"] = drop(sender, None)
        later = [r for r in readers if r[0] > sender[0]]
        for reader in later:
            out[sender, reader] = drop(sender, [reader], receiver_input)
        if len(later) > 1:
            out[sender, tuple(later)] = drop(sender, later, receiver_input)
    for reader in readers:
        if reader not in senders:
            out[reader, "logits"] = drop(reader, None)
    return out
