"""Correct implementations of chapter 5's exercises, written differently from the answer key.

Each must pass its exercise's check (tests/test_alternatives.py): float64 inside, loops instead of
vectorised code, another way of hooking the model, another way of taking the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from interplab.hooks import act_name

# --- transcoder_forward --------------------------------------------------------------------


def forward_float64(x, W_enc, b_enc, W_dec, b_dec, W_skip=None):
    d = torch.float64
    acts = torch.einsum("bi,is->bs", x.to(d), W_enc.to(d)).add(b_enc.to(d)).clamp(min=0)
    y_hat = torch.einsum("bs,so->bo", acts, W_dec.to(d)) + b_dec.to(d)
    if W_skip is not None:
        y_hat = y_hat + torch.einsum("bi,oi->bo", x.to(d), W_skip.to(d))
    return y_hat, acts


def forward_rows(x, W_enc, b_enc, W_dec, b_dec, W_skip=None):
    ys, acts = [], []
    for row in x:
        a = F.relu(F.linear(row, W_enc.T, b_enc))
        y = F.linear(a, W_dec.T, b_dec)
        if W_skip is not None:
            y = y + F.linear(row, W_skip)
        ys.append(y)
        acts.append(a)
    return torch.stack(ys), torch.stack(acts)


# --- mlp_io_pairs --------------------------------------------------------------------------


def _check_layer(model, layer):
    if layer < 0 or layer >= model.cfg.n_layers:
        raise ValueError(f"no MLP {layer}: the model has layers 0 to {model.cfg.n_layers - 1}")


def pairs_with_hooks(model, tokens, layer, mask=None):
    _check_layer(model, layer)
    seen = {}

    def grab(value, hook):
        seen[hook.name] = value.detach()

    names = [act_name("normalized", layer, "ln2"), act_name("mlp_out", layer)]
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(n, grab) for n in names])
    x, y = (seen[n] for n in names)
    keep = torch.ones(tokens.shape, dtype=torch.bool) if mask is None else mask.bool()
    idx = keep.reshape(-1).nonzero()[:, 0]
    return x.reshape(-1, x.shape[-1])[idx], y.reshape(-1, y.shape[-1])[idx]


def pairs_loop(model, tokens, layer, mask=None):
    _check_layer(model, layer)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    x, y = cache["normalized", layer, "ln2"], cache["mlp_out", layer]
    xs, ys = [], []
    for b in range(tokens.shape[0]):
        for p in range(tokens.shape[1]):
            if mask is None or bool(mask[b, p]):
                xs.append(x[b, p])
                ys.append(y[b, p])
    empty = x.new_zeros(0, x.shape[-1])
    return (torch.stack(xs) if xs else empty), (torch.stack(ys) if ys else empty)


# --- transcoder_loss -----------------------------------------------------------------------


def loss_float64(transcoder, x, y):
    acts = transcoder.encode(x)
    y_hat = transcoder(x).double()
    n = x.shape[0]
    mse = ((y_hat - y.double()) ** 2).sum() / n
    l1 = (acts.abs().double() @ transcoder.W_dec.double().pow(2).sum(-1).sqrt()).sum() / n
    if transcoder.cfg.architecture == "standard":
        return mse + transcoder.cfg.l1_coeff * l1, mse, l1
    return mse, mse, l1


def loss_rows(transcoder, x, y):
    norms = torch.linalg.vector_norm(transcoder.W_dec, dim=1)
    mses, l1s = [], []
    for xi, yi in zip(x, y):
        a = transcoder.encode(xi[None])
        pred = transcoder.decode(a) + transcoder.skip_out(xi[None])
        mses.append(F.mse_loss(pred[0], yi, reduction="sum"))
        l1s.append((a[0].abs() * norms).sum())
    mse, l1 = torch.stack(mses).mean(), torch.stack(l1s).mean()
    penalty = transcoder.cfg.l1_coeff * l1 if transcoder.cfg.architecture == "standard" else 0.0 * l1
    return mse + penalty, mse, l1


# --- replacement_loss ----------------------------------------------------------------------


def _ce64(logits, tokens, mask):
    scored = mask[:, :-1].bool() & mask[:, 1:].bool()
    ce = F.cross_entropy(logits[:, :-1].double().transpose(1, 2), tokens[:, 1:], reduction="none")
    return float(ce[scored].mean())


def replacement_float64(model, transcoders, tokens, mask):
    layers = [tc.cfg.layer for tc in transcoders]
    if len(set(layers)) != len(layers):
        raise ValueError("two transcoders replace the same MLP")
    keep = mask.bool().unsqueeze(-1)
    seen = {}
    with torch.no_grad():
        clean = model(tokens)
        with model.hooks(
            fwd_hooks=[
                (act_name("normalized", L, "ln2"), lambda x, hook: seen.__setitem__(hook.layer(), x)) for L in layers
            ]
            + [
                (act_name("mlp_out", tc.cfg.layer), lambda y, hook, tc=tc: torch.where(keep, tc(seen[hook.layer()]), y))
                for tc in transcoders
            ]
        ):
            replaced = model(tokens)
        with model.hooks(fwd_hooks=[(act_name("mlp_out", L), lambda y, hook: y * ~keep) for L in layers]):
            ablated = model(tokens)
    out = {"ce_clean": _ce64(clean, tokens, mask), "ce_replaced": _ce64(replaced, tokens, mask)}
    out["ce_ablated"] = _ce64(ablated, tokens, mask)
    out["loss_recovered"] = 1 - (out["ce_replaced"] - out["ce_clean"]) / (out["ce_ablated"] - out["ce_clean"])
    return out


def replacement_sorted(model, transcoders, tokens, mask):
    by_layer = {}
    for tc in transcoders:
        if tc.cfg.layer in by_layer:
            raise ValueError("two transcoders replace the same MLP")
        by_layer[tc.cfg.layer] = tc
    m = mask.bool()
    losses = {}
    for name in ("clean", "replaced", "ablated"):
        hooks = []
        for L in sorted(by_layer):
            store = {}
            hooks.append((act_name("normalized", L, "ln2"), lambda x, hook, store=store: store.__setitem__("x", x)))
            if name == "replaced":
                new = lambda y, hook, tc=by_layer[L], store=store: tc(store["x"])  # noqa: E731
            else:
                new = lambda y, hook: torch.zeros_like(y)  # noqa: E731
            if name != "clean":
                hooks.append(
                    (act_name("mlp_out", L), lambda y, hook, new=new: torch.where(m[..., None], new(y, hook), y))
                )
        with torch.no_grad():
            logp = model.run_with_hooks(tokens, fwd_hooks=hooks).log_softmax(-1)
        total, count = 0.0, 0
        for b in range(tokens.shape[0]):
            for p in range(tokens.shape[1] - 1):
                if m[b, p] and m[b, p + 1]:
                    total -= float(logp[b, p, tokens[b, p + 1]])
                    count += 1
        losses[name] = total / count
    gap = losses["ablated"] - losses["clean"]
    return {
        "ce_clean": losses["clean"],
        "ce_replaced": losses["replaced"],
        "ce_ablated": losses["ablated"],
        "loss_recovered": (losses["ablated"] - losses["replaced"]) / gap,
    }


# --- de_embedding ----------------------------------------------------------------------------


def _check_feature(dictionary, feature):
    if not 0 <= feature < dictionary.W_enc.shape[1]:
        raise ValueError(f"feature {feature} does not exist: the dictionary has {dictionary.W_enc.shape[1]} features")


def de_embedding_float64(model, transcoder, feature):
    _check_feature(transcoder, feature)
    return torch.einsum("vd,d->v", model.W_E.double(), transcoder.W_enc[:, feature].double())


def de_embedding_broadcast(model, transcoder, feature):
    _check_feature(transcoder, feature)
    return (model.W_E * transcoder.W_enc.T[feature]).sum(dim=1)


# --- pullback --------------------------------------------------------------------------------


def _check_pair(earlier, later, feature):
    if not earlier.cfg.layer < later.cfg.layer:
        raise ValueError("the earlier transcoder must come before the later one")
    _check_feature(later, feature)


def pullback_broadcast(earlier, later, feature):
    _check_pair(earlier, later, feature)
    return (earlier.W_dec * later.W_enc[:, feature]).sum(-1)


def pullback_float64(earlier, later, feature):
    _check_pair(earlier, later, feature)
    return torch.einsum("sd,d->s", earlier.W_dec.double(), later.W_enc[:, feature].double())


# --- answer_attribution ----------------------------------------------------------------------


def _frozen_hooks(model, transcoders, cache, leaves):
    """Hooks that replay the cached patterns and scales and put each transcoder's sources in ``leaves``."""
    by_layer = {tc.cfg.layer: tc for tc in transcoders}
    inputs = {}

    def replay(value, hook):
        return cache[hook.name]

    def save(x, hook):
        inputs[hook.layer()] = x

    def mlp(y, hook):
        L = hook.layer()
        if L not in by_layer:
            return cache[hook.name]
        tc = by_layer[L]
        acts = tc.encode(inputs[L]).detach().requires_grad_(True)
        pred = tc.decode(acts) + tc.skip_out(inputs[L])
        err = (cache[hook.name] - pred).detach().requires_grad_(True)
        leaves[L] = (acts, err)
        return pred + err

    hooks = [(name, replay) for name in cache if name.endswith(("hook_pattern", "hook_scale"))]
    hooks += [(act_name("normalized", L, "ln2"), save) for L in range(model.cfg.n_layers)]
    hooks += [(act_name("mlp_out", L), mlp) for L in range(model.cfg.n_layers)]
    return hooks


def attribution_replayed(model, transcoders, tokens, answer_id):
    """Two passes: cache the clean run, then replay its patterns and scales; gradients by .backward()."""
    if tokens.dim() != 1:
        raise ValueError("tokens must be a single prompt of shape [pos]")
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens[None], names_filter=lambda n: n.endswith(("hook_pattern", "hook_scale", "hook_mlp_out"))
        )
    leaves = {}
    with torch.enable_grad():
        with model.hooks(fwd_hooks=_frozen_hooks(model, transcoders, cache, leaves)):
            logits = model(tokens[None])
        logits[0, -1, answer_id].backward()
    feats, errs = [], []
    for tc in transcoders:
        acts, err = leaves[tc.cfg.layer]
        feats.append((acts * (acts.grad if acts.grad is not None else 0.0))[0].detach())
        errs.append((err * (err.grad if err.grad is not None else 0.0)).sum(-1)[0].detach())
    model.zero_grad(set_to_none=True)
    return torch.stack(feats), torch.stack(errs)


def attribution_jvp_free_float64(model, transcoders, tokens, answer_id):
    """One pass with the patterns and scales detached in place; attributions accumulated in float64."""
    if tokens.dim() != 1:
        raise ValueError("tokens must be a single prompt of shape [pos]")
    layers = {tc.cfg.layer: i for i, tc in enumerate(transcoders)}
    xs, acts, errs = {}, [None] * len(transcoders), [None] * len(transcoders)

    def mlp(y, hook):
        L = hook.layer()
        if L not in layers:
            return y.detach()
        i = layers[L]
        tc = transcoders[i]
        acts[i] = tc.encode(xs[L]).detach().requires_grad_(True)
        pred = tc.decode(acts[i]) + tc.skip_out(xs[L])
        errs[i] = (y - pred).detach().requires_grad_(True)
        return pred + errs[i]

    hooks = [(lambda n: n.split(".")[-1] in ("hook_pattern", "hook_scale"), lambda v, hook: v.detach())]
    hooks += [(lambda n: n.endswith("ln2.hook_normalized"), lambda x, hook: xs.__setitem__(hook.layer(), x))]
    hooks += [(lambda n: n.endswith("hook_mlp_out"), mlp)]
    with torch.enable_grad():
        logit = model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0, -1, answer_id]
        grads = torch.autograd.grad(logit, acts + errs, allow_unused=True)
    n = len(transcoders)
    g = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(acts + errs, grads)]
    feat = torch.stack([(a.double() * ga.double())[0] for a, ga in zip(acts, g[:n])])
    err = torch.stack([(e.double() * ge.double()).sum(-1)[0] for e, ge in zip(errs, g[n:])])
    return feat, err


ALTERNATIVES = {
    "transcoder_forward": [forward_float64, forward_rows],
    "mlp_io_pairs": [pairs_with_hooks, pairs_loop],
    "transcoder_loss": [loss_float64, loss_rows],
    "replacement_loss": [replacement_float64, replacement_sorted],
    "de_embedding": [de_embedding_float64, de_embedding_broadcast],
    "pullback": [pullback_broadcast, pullback_float64],
    "answer_attribution": [attribution_replayed, attribution_jvp_free_float64],
}
