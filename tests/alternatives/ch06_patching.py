"""Correct implementations of chapter 06's exercises written differently from the answer key.

Each must pass `interplab.grading.run(name, fn)`: the checks must accept any right answer, not only
the reference's way of computing it (other algorithms, loops instead of batching, float64 inside,
TransformerLens's hook machinery used another way).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from interplab.hooks import act_name

# --- ioi_pairs -------------------------------------------------------------------------------

_CORRUPTIONS = ("swap_names", "swap_template", "third_name")


def _name_id(model, name: str) -> int:
    return model.to_single_token(" " + name)


def ioi_pairs_by_token_edits(model, prompts, corruption="third_name"):
    """Tokenize the clean text only; build the corrupted ids by editing the clean ids."""
    if corruption not in _CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}")
    clean, corrupted, answer, wrong = [], [], [], []
    for p in prompts:
        text = p["template"].format(A=p["A"], B=p["B"], S=p["S"], place=p["place"], obj=p["obj"])
        ids = model.to_tokens(text)[0].cpu()
        a, b, io, s, c = (_name_id(model, p[k]) for k in ("A", "B", "IO", "S", "C"))
        bad = ids.clone()
        if corruption == "swap_names":
            bad[ids == a], bad[ids == b] = b, a
        elif corruption == "swap_template":
            last = int((ids == s).nonzero().max())
            bad[last] = io
        else:
            bad[int((ids == io).nonzero().min())] = c
        clean.append(ids)
        corrupted.append(bad)
        answer.append(io)
        wrong.append(s)
    if len({len(t) for t in clean}) > 1:
        raise ValueError("the prompts have different numbers of tokens")
    return {
        "clean": torch.stack(clean),
        "corrupted": torch.stack(corrupted),
        "answer": torch.tensor(answer, dtype=torch.int32),
        "wrong": torch.tensor(wrong, dtype=torch.int32),
    }


def ioi_pairs_by_texts(model, prompts, corruption="third_name"):
    """Write both texts, tokenize each with to_str_tokens/to_tokens, and pad nothing: check lengths first."""
    texts = {"clean": [], "corrupted": []}
    for p in prompts:
        fill = {k: p[k] for k in ("A", "B", "S", "place", "obj")}
        if corruption == "swap_names":
            bad = dict(fill, A=p["B"], B=p["A"], S=p["IO"])
        elif corruption == "swap_template":
            bad = dict(fill, S=p["IO"])
        elif corruption == "third_name":
            bad = dict(fill, A=p["C"]) if p["IO"] == p["A"] else dict(fill, B=p["C"])
        else:
            raise ValueError(f"corruption must be one of {_CORRUPTIONS}")
        texts["clean"].append(p["template"].format(**fill))
        texts["corrupted"].append(p["template"].format(**bad))
    lengths = {len(model.to_str_tokens(t)) for t in texts["clean"] + texts["corrupted"]}
    if len(lengths) != 1:
        raise ValueError(f"texts of {sorted(lengths)} tokens: positions would not align")
    out = {k: torch.cat([model.to_tokens(t).cpu() for t in v]) for k, v in texts.items()}
    out["answer"] = torch.tensor([_name_id(model, p["IO"]) for p in prompts])
    out["wrong"] = torch.tensor([_name_id(model, p["S"]) for p in prompts])
    return out


# --- induction_pairs ----------------------------------------------------------------------------


def induction_pairs_by_tensor_ops(model, sequences, cut, replacements, corruption="answer"):
    """One id matrix for all sequences, concatenated and edited with tensor indexing."""
    if corruption not in ("answer", "match"):
        raise ValueError("corruption must be 'answer' or 'match'")
    n = len(sequences[0])
    if any(len(s) != n for s in sequences) or not 0 < cut < n:
        raise ValueError("sequences must share a length n, and 0 < cut < n")
    ids = torch.tensor([[_name_id(model, w) for w in seq] for seq in sequences], dtype=torch.long)
    reps = torch.tensor([_name_id(model, r) for r in replacements], dtype=torch.long)
    bos = torch.full((len(sequences), 1), model.tokenizer.bos_token_id, dtype=torch.long)
    clean = torch.cat([bos, ids, ids[:, :cut]], dim=1)
    corrupted = clean.clone()
    corrupted[:, 1 + (cut if corruption == "answer" else cut - 1)] = reps
    return {"clean": clean, "corrupted": corrupted, "answer": ids[:, cut].clone(), "wrong": reps}


def induction_pairs_by_lists(model, sequences, cut, replacements, corruption="answer"):
    """Word lists first (the corruption applied to words), then ids word by word, then one tensor."""
    if corruption not in ("answer", "match") or not 1 <= cut < min(map(len, sequences)):
        raise ValueError("bad corruption or cut")
    if len({len(s) for s in sequences}) != 1:
        raise ValueError("sequences of different lengths")
    bos = model.tokenizer.bos_token_id
    rows = {"clean": [], "corrupted": []}
    for seq, r in zip(sequences, replacements):
        first = list(seq)
        first[cut if corruption == "answer" else cut - 1] = r
        for key, words in (("clean", list(seq)), ("corrupted", first)):
            rows[key].append([bos] + [_name_id(model, w) for w in words + list(seq[:cut])])
    out = {k: torch.tensor(v) for k, v in rows.items()}
    out["answer"] = torch.tensor([_name_id(model, s[cut]) for s in sequences])
    out["wrong"] = torch.tensor([_name_id(model, r) for r in replacements])
    return out


# --- normalised_logit_diff -----------------------------------------------------------------------


def normalised_logit_diff_float64(logits, answer, wrong, clean_ld, corrupted_ld):
    """Advanced indexing, in float64."""
    final = logits[:, -1].double()
    rows = torch.arange(final.shape[0])
    ld = (final[rows, answer.long()] - final[rows, wrong.long()]).mean()
    return (ld - corrupted_ld) / (clean_ld - corrupted_ld)


def normalised_logit_diff_one_hot(logits, answer, wrong, clean_ld, corrupted_ld):
    """Log-softmax differences equal logit differences; pick them with one-hot masks."""
    logp = F.log_softmax(logits[:, -1], dim=-1)
    vocab = logits.shape[-1]
    direction = F.one_hot(answer.long(), vocab).to(logp.dtype) - F.one_hot(wrong.long(), vocab).to(logp.dtype)
    ld = (logp * direction).sum(-1).mean()
    scale = clean_ld - corrupted_ld
    return ld / scale - corrupted_ld / scale


# --- sweeps -------------------------------------------------------------------------------------


def _one_patch_at_a_time(model, source_tokens, target_tokens, metric, component, indices, shape):
    """One forward pass per patch, with run_with_hooks; indices(act_name) lists (layer, index) per patch."""
    names = [act_name(component, layer) for layer in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(source_tokens, names_filter=lambda n: n in names)
    values = []
    with torch.no_grad():
        for layer, index in indices:
            name = names[layer]

            def patch(act, hook, index=index, name=name):
                act = act.clone()
                act[(slice(None),) + index] = cache[name][(slice(None),) + index]
                return act

            values.append(float(metric(model.run_with_hooks(target_tokens, fwd_hooks=[(name, patch)]))))
    return torch.tensor(values, dtype=torch.float64).reshape(shape)


def _masked_batch(model, source_tokens, target_tokens, metric, component, masks_of_layer):
    """Every patch of one layer in one batched pass: torch.where with a boolean mask per patch."""
    n_layers = model.cfg.n_layers
    batch = target_tokens.shape[0]
    out = []
    with torch.no_grad():
        for layer in range(n_layers):
            name = act_name(component, layer)
            _, cache = model.run_with_cache(source_tokens, names_filter=name)
            masks = masks_of_layer(cache[name].shape[1:])  # [n_patch, *act shape without batch]
            k = masks.shape[0]

            def patch(act, hook, masks=masks, k=k, src=cache[name]):
                rows = act.reshape(k, batch, *act.shape[1:])
                mixed = torch.where(masks[:, None], src[None], rows)
                return mixed.reshape(act.shape)

            with model.hooks(fwd_hooks=[(name, patch)]):
                logits = model(target_tokens.repeat(k, 1))
            out.append(torch.stack([metric(logits[i * batch : (i + 1) * batch]) for i in range(k)]))
    return torch.stack(out)


def patch_layer_pos_sweep_loop(model, source_tokens, target_tokens, metric, component="resid_pre"):
    n_pos = target_tokens.shape[1]
    patches = [(layer, (pos,)) for layer in range(model.cfg.n_layers) for pos in range(n_pos)]
    return _one_patch_at_a_time(
        model, source_tokens, target_tokens, metric, component, patches, (model.cfg.n_layers, n_pos)
    )


def patch_layer_pos_sweep_masked(model, source_tokens, target_tokens, metric, component="resid_pre"):
    def masks(shape):  # shape [pos, d_model]
        eye = torch.eye(shape[0], dtype=torch.bool)
        return eye[:, :, None].expand(-1, -1, shape[1])

    return _masked_batch(model, source_tokens, target_tokens, metric, component, masks).cpu()


def _head_masks(component, shape, by_pos):
    """Masks for each (pos, head) or head, over an activation of shape [pos, head, d] or [head, q, k]."""
    if component == "pattern":
        n_heads, n_q, n_k = shape
        if not by_pos:
            return torch.eye(n_heads, dtype=torch.bool)[:, :, None, None].expand(-1, -1, n_q, n_k)
        m = torch.zeros(n_q, n_heads, n_heads, n_q, n_k, dtype=torch.bool)
        for p in range(n_q):
            for h in range(n_heads):
                m[p, h, h, p, :] = True
        return m.reshape(n_q * n_heads, n_heads, n_q, n_k)
    n_pos, n_heads, d = shape
    if not by_pos:
        return torch.eye(n_heads, dtype=torch.bool)[:, None, :, None].expand(-1, n_pos, -1, d)
    m = torch.zeros(n_pos, n_heads, n_pos, n_heads, d, dtype=torch.bool)
    for p in range(n_pos):
        m[p, :, p, :, :] = torch.eye(n_heads, dtype=torch.bool)[:, :, None]
    return m.reshape(n_pos * n_heads, n_pos, n_heads, d)


def patch_head_sweep_loop(model, source_tokens, target_tokens, metric, component="z"):
    heads = range(model.cfg.n_heads)
    index = (lambda h: (h,)) if component == "pattern" else (lambda h: (slice(None), h))
    patches = [(layer, index(h)) for layer in range(model.cfg.n_layers) for h in heads]
    return _one_patch_at_a_time(
        model, source_tokens, target_tokens, metric, component, patches, (model.cfg.n_layers, model.cfg.n_heads)
    )


def patch_head_sweep_masked(model, source_tokens, target_tokens, metric, component="z"):
    masks = functools.partial(_head_masks, component, by_pos=False)
    return _masked_batch(model, source_tokens, target_tokens, metric, component, masks).cpu()


def patch_head_pos_sweep_loop(model, source_tokens, target_tokens, metric, component="z"):
    n_layers, n_heads, n_pos = model.cfg.n_layers, model.cfg.n_heads, target_tokens.shape[1]
    index = (lambda p, h: (h, p)) if component == "pattern" else (lambda p, h: (p, h))
    patches = [(layer, index(p, h)) for layer in range(n_layers) for p in range(n_pos) for h in range(n_heads)]
    return _one_patch_at_a_time(
        model, source_tokens, target_tokens, metric, component, patches, (n_layers, n_pos, n_heads)
    )


def patch_head_pos_sweep_masked(model, source_tokens, target_tokens, metric, component="z"):
    masks = functools.partial(_head_masks, component, by_pos=True)
    out = _masked_batch(model, source_tokens, target_tokens, metric, component, masks)
    return out.reshape(model.cfg.n_layers, target_tokens.shape[1], model.cfg.n_heads).cpu()


# --- path_patch -----------------------------------------------------------------------------------


def _check_path(model, sender, receivers, receiver_input):
    if not (0 <= sender[0] < model.cfg.n_layers and 0 <= sender[1] < model.cfg.n_heads):
        raise ValueError("the sender is not a head of the model")
    if receivers is not None:
        if receiver_input not in ("q", "k", "v"):
            raise ValueError("receiver_input must be q, k or v")
        if any(layer <= sender[0] for layer, _ in receivers):
            raise ValueError("receivers must be in later layers than the sender")


def _frozen_run(model, source_tokens, target_tokens, sender, extra_hooks=()):
    """Logits of the run with the sender from the source and every other head held at its target value."""
    z_names = [act_name("z", layer) for layer in range(model.cfg.n_layers)]
    _, target = model.run_with_cache(target_tokens, names_filter=lambda n: n in z_names)
    _, source = model.run_with_cache(source_tokens, names_filter=z_names[sender[0]])

    def hold(z, hook):
        z = target[hook.name].clone()
        if hook.name == z_names[sender[0]]:
            z[:, :, sender[1]] = source[hook.name][:, :, sender[1]]
        return z

    with model.hooks(fwd_hooks=[(n, hold) for n in z_names] + list(extra_hooks)):
        return model(target_tokens)


def path_patch_context_managers(model, source_tokens, target_tokens, metric, sender, receivers, receiver_input="q"):
    """The same runs written with `model.hooks` context managers and a dict of captured receiver inputs."""
    _check_path(model, sender, receivers, receiver_input)
    with torch.no_grad():
        if receivers is None:
            return float(metric(_frozen_run(model, source_tokens, target_tokens, sender)))
        captured = {}
        by_layer = {}
        for layer, head in receivers:
            by_layer.setdefault(layer, []).append(head)
        names = {layer: act_name(receiver_input, layer) for layer in by_layer}

        def capture(act, hook):
            captured[hook.name] = act.detach().clone()

        _frozen_run(model, source_tokens, target_tokens, sender, [(n, capture) for n in names.values()])

        def paste(act, hook):
            heads = by_layer[hook.layer()]
            act[:, :, heads] = captured[hook.name][:, :, heads]
            return act

        with model.hooks(fwd_hooks=[(n, paste) for n in names.values()]):
            return float(metric(model(target_tokens)))


def path_patch_from_normalised_input(
    model, source_tokens, target_tokens, metric, sender, receivers, receiver_input="q"
):
    """Capture the receivers' LayerNorm-ed input in the frozen run and compute their q/k/v from the weights."""
    _check_path(model, sender, receivers, receiver_input)
    with torch.no_grad():
        if receivers is None:
            return float(metric(_frozen_run(model, source_tokens, target_tokens, sender)))
        layers = sorted({layer for layer, _ in receivers})
        ln_names = {layer: f"blocks.{layer}.ln1.hook_normalized" for layer in layers}
        normalised = {}

        def capture(x, hook):
            normalised[hook.name] = x.clone()

        _frozen_run(model, source_tokens, target_tokens, sender, [(n, capture) for n in ln_names.values()])
        weight = {"q": "W_Q", "k": "W_K", "v": "W_V"}[receiver_input]
        new_input = {}
        for layer, head in receivers:
            attn = model.blocks[layer].attn
            w, b = getattr(attn, weight)[head], getattr(attn, "b_" + receiver_input.upper())[head]
            new_input[(layer, head)] = normalised[ln_names[layer]].double() @ w.double() + b.double()

        def paste(act, hook):
            act = act.clone()
            for (layer, head), value in new_input.items():
                if layer == hook.layer():
                    act[:, :, head] = value.to(act.dtype)
            return act

        hooks = [(act_name(receiver_input, layer), paste) for layer in layers]
        return float(metric(model.run_with_hooks(target_tokens, fwd_hooks=hooks)))


# --- attribution_patch ----------------------------------------------------------------------------


def _attribution_component_ok(component):
    if component not in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v"):
        raise ValueError(f"unsupported component {component!r}")


def attribution_patch_retain_grad(model, clean_tokens, corrupted_tokens, metric, component="z"):
    """`.backward()` with retain_grad on the hooked activations; the product summed in float64 by einsum."""
    _attribution_component_ok(component)
    names = [act_name(component, layer) for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, clean = model.run_with_cache(clean_tokens, names_filter=lambda n: n in names)
    kept = {}

    def keep(act, hook):
        act.retain_grad()
        kept[hook.name] = act
        return act

    with torch.enable_grad():
        metric(model.run_with_hooks(corrupted_tokens, fwd_hooks=[(n, keep) for n in names])).backward()
    out = []
    for n in names:
        delta = (clean[n] - kept[n].detach()).double()
        grad = kept[n].grad.double()
        out.append(torch.einsum("bp...d,bp...d->p...", delta, grad))
    model.zero_grad(set_to_none=True)
    return torch.stack(out).cpu()


def attribution_patch_backward_hooks(model, clean_tokens, corrupted_tokens, metric, component="z"):
    """Gradients caught by TransformerLens backward hooks, one layer at a time in a loop."""
    _attribution_component_ok(component)
    names = [act_name(component, layer) for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, clean = model.run_with_cache(clean_tokens, names_filter=lambda n: n in names)
        _, corrupted = model.run_with_cache(corrupted_tokens, names_filter=lambda n: n in names)
    grads = {}

    def catch(grad, hook):
        grads[hook.name] = grad.detach().clone()

    with torch.enable_grad():
        logits = model.run_with_hooks(corrupted_tokens, bwd_hooks=[(n, catch) for n in names])
        metric(logits).backward()
    model.zero_grad(set_to_none=True)
    per_layer = []
    for n in names:
        product = (clean[n] - corrupted[n]) * grads[n]
        while product.dim() > (3 if component in ("z", "q", "k", "v") else 2):
            product = product.sum(-1)
        per_layer.append(product.sum(0))
    return torch.stack(per_layer).float().cpu()


# --- circuit_faithfulness -------------------------------------------------------------------------


def _check_circuit(model, tokens, circuit, mean_tokens):
    if tokens.shape[1] != mean_tokens.shape[1]:
        raise ValueError("tokens and mean_tokens have different numbers of positions")
    for layer, head in circuit:
        if not (0 <= layer < model.cfg.n_layers and 0 <= head < model.cfg.n_heads):
            raise ValueError(f"L{layer}H{head} is not a head of the model")


def _ld(logits, answer, wrong):
    final = logits[:, -1].double()
    return (final[torch.arange(len(answer)), answer] - final[torch.arange(len(wrong)), wrong]).mean()


def circuit_faithfulness_per_head_hooks(model, tokens, answer, wrong, circuit, mean_tokens):
    """One hook per ablated head (functools.partial), means in float64."""
    _check_circuit(model, tokens, circuit, mean_tokens)
    keep = {tuple(h) for h in circuit}
    names = [act_name("z", layer) for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(mean_tokens, names_filter=lambda n: n in names)

        def ablate_one(z, hook, head, mean):
            z[:, :, head] = mean.to(z.dtype)
            return z

        hooks = []
        for layer in range(model.cfg.n_layers):
            mean = cache[names[layer]].double().mean(0)  # [pos, head, d_head]
            for head in range(model.cfg.n_heads):
                if (layer, head) not in keep:
                    hooks.append((names[layer], functools.partial(ablate_one, head=head, mean=mean[:, head])))
        full = _ld(model(tokens), answer, wrong)
        kept = _ld(model.run_with_hooks(tokens, fwd_hooks=hooks), answer, wrong)
    return float(kept / full)


def circuit_faithfulness_one_batch(model, tokens, answer, wrong, circuit, mean_tokens):
    """The intact and the ablated run as the two halves of one batch; a mask over heads does the ablation."""
    _check_circuit(model, tokens, circuit, mean_tokens)
    n = tokens.shape[0]
    names = [act_name("z", layer) for layer in range(model.cfg.n_layers)]
    ablated = torch.ones(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool)
    for layer, head in circuit:
        ablated[layer, head] = False
    with torch.no_grad():
        means = {}
        for name in names:
            _, cache = model.run_with_cache(mean_tokens, names_filter=name)
            means[name] = cache[name].sum(0) / mean_tokens.shape[0]

        def ablate(z, hook):
            mask = ablated[hook.layer()][None, None, :, None]
            second = torch.where(mask, means[hook.name][None], z[n:])
            return torch.cat([z[:n], second])

        logits = model.run_with_hooks(torch.cat([tokens, tokens]), fwd_hooks=[(nm, ablate) for nm in names])
        return (_ld(logits[n:], answer, wrong) / _ld(logits[:n], answer, wrong)).item()


ALTERNATIVES = {
    "ioi_pairs": [ioi_pairs_by_token_edits, ioi_pairs_by_texts],
    "induction_pairs": [induction_pairs_by_tensor_ops, induction_pairs_by_lists],
    "normalised_logit_diff": [normalised_logit_diff_float64, normalised_logit_diff_one_hot],
    "patch_layer_pos_sweep": [patch_layer_pos_sweep_loop, patch_layer_pos_sweep_masked],
    "patch_head_sweep": [patch_head_sweep_loop, patch_head_sweep_masked],
    "patch_head_pos_sweep": [patch_head_pos_sweep_loop, patch_head_pos_sweep_masked],
    "path_patch": [path_patch_context_managers, path_patch_from_normalised_input],
    "attribution_patch": [attribution_patch_retain_grad, attribution_patch_backward_hooks],
    "circuit_faithfulness": [circuit_faithfulness_per_head_hooks, circuit_faithfulness_one_batch],
}
