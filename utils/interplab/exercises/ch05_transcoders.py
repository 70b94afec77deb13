"""Chapter 5 (transcoders): build and train transcoders, replace every MLP with one, and read
feature-level circuits (de-embeddings, pullbacks, activation-times-gradient attribution)."""

from __future__ import annotations

import contextlib
import functools

import torch

from .. import tinyworld
from ..dictionaries import Transcoder, TranscoderConfig, mlp_in_hook, mlp_out_hook
from ..dictionaries.circuits import fact_prompt
from ..dictionaries.data import mlp_io_pairs, tinyworld_dataset
from ..dictionaries.shipped import load_transcoder
from ..hooks import act_name
from ..paths import chapter_of
from ..solutions import ch05_transcoders as sol
from . import Case, Mistake, gen, register, shared_model, under_no_grad

CHAPTER = chapter_of(__name__)


@functools.cache
def _shipped(layer: int, skip: bool = False) -> Transcoder:
    return load_transcoder(layer, skip=skip, device="cpu")


def _all_shipped(skip: bool = False) -> list[Transcoder]:
    return [_shipped(L, skip) for L in range(shared_model().cfg.n_layers)]


@functools.cache
def _model_data(n_docs: int = 6, seed: int = 7):
    """(ids, mask) of a few test documents (mask: real tokens but <bos>)."""
    _, ids, mask = tinyworld_dataset(n_docs, seed=seed, split="test")
    return ids, mask


@functools.cache
def _pairs(layer: int, n: int = 48):
    ids, mask = _model_data()
    x, y = mlp_io_pairs(shared_model(), ids, layer, mask)
    return x[:n].clone(), y[:n].clone()


def _random_tc(
    d_in: int,
    d_sae: int,
    seed: int,
    *,
    d_out: int | None = None,
    architecture: str = "standard",
    k: int = 2,
    skip: bool = False,
    layer: int = 0,
    l1_coeff: float = 0.7,
    unit_decoder: bool = False,
) -> Transcoder:
    """A transcoder with random weights (non-unit decoder rows unless asked), in eval mode."""
    g = gen(seed)
    cfg = TranscoderConfig(
        d_in=d_in, d_sae=d_sae, d_out=d_out, architecture=architecture, k=k, skip=skip, layer=layer, l1_coeff=l1_coeff
    )
    tc = Transcoder(cfg, generator=g)
    with torch.no_grad():
        tc.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.3)
        tc.b_dec.copy_(torch.randn(cfg.d_out, generator=g) * 0.5)
        if not unit_decoder:
            tc.W_dec.mul_(torch.rand(d_sae, 1, generator=g) * 1.5 + 0.25)
        if skip:
            tc.W_skip.copy_(torch.randn(cfg.d_out, d_in, generator=g) * 0.3)
        if architecture == "batchtopk":
            tc.threshold.fill_(0.2)
    return tc.eval()


def _tc_weights(tc: Transcoder) -> tuple:
    w = (tc.W_enc.detach(), tc.b_enc.detach(), tc.W_dec.detach(), tc.b_dec.detach())
    return w + ((tc.W_skip.detach(),) if tc.W_skip is not None else ())


def _no_grad_or_error(fn, *args, **kwargs):
    """Call fn under torch.no_grad(), as the chapter does; an error becomes text, so a known mistake can explain it."""
    with torch.no_grad():
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:
            return f"raised RuntimeError under torch.no_grad(): {str(e).splitlines()[0]}"


def _raises(fn, *args, **kwargs):
    """What the call raised, as text: the contract names the inputs that must raise a ValueError."""
    try:
        fn(*args, **kwargs)
    except ValueError:
        return "ValueError"
    except Exception as e:  # noqa: BLE001 - any other error is reported by name
        return type(e).__name__
    return "no error"


def _must_raise(why: str):
    def judge(expected, got):
        return None if got == "ValueError" else f"{why} must raise a ValueError (with a message saying why); got: {got}"

    return judge


# --- transcoder_forward ------------------------------------------------------------------


def _forward_cases():
    g = gen(0)
    # Square cases first: a mistake that only fails with an error on a non-square case would get no hint.
    cases = [
        Case(
            "d_in = d_out = 2, d_sae 3, no skip",
            (
                torch.tensor([[1.0, -1.0], [0.5, 2.0]]),
                torch.tensor([[1.0, -1.0, 0.5], [0.0, 1.0, -0.5]]),
                torch.tensor([0.0, -0.5, 0.2]),
                torch.tensor([[1.0, 0.0], [0.5, 0.5], [-1.0, 1.0]]),
                torch.tensor([0.3, -0.2]),
            ),
        ),
        Case(
            "random square: batch 6, d_in = d_out = 5, d_sae 7, skip",
            (
                torch.randn(6, 5, generator=g),
                torch.randn(5, 7, generator=g),
                torch.randn(7, generator=g),
                torch.randn(7, 5, generator=g),
                torch.randn(5, generator=g),
                torch.randn(5, 5, generator=g),
            ),
        ),
        Case(
            "d_in 3, d_sae 4, d_out 2, no skip",
            (
                torch.randn(4, 3, generator=g),
                torch.randn(3, 4, generator=g),
                torch.randn(4, generator=g),
                torch.randn(4, 2, generator=g),
                torch.randn(2, generator=g),
            ),
        ),
        Case(
            "d_in 3, d_out 2 with a skip path (W_skip is [d_out, d_in])",
            (
                torch.randn(4, 3, generator=g),
                torch.randn(3, 5, generator=g),
                torch.randn(5, generator=g),
                torch.randn(5, 2, generator=g),
                torch.randn(2, generator=g),
                torch.randn(2, 3, generator=g),
            ),
        ),
    ]
    x, _ = _pairs(1)
    cases.append(
        Case(
            "TinyWorld layer-1 MLP inputs, the shipped layer-1 skip transcoder's weights (as ReLU)",
            (x,) + _tc_weights(_shipped(1, skip=True)),
        )
    )
    cases.append(
        Case(
            "edge: the first row fires no feature (every read below zero), so it predicts b_dec alone",
            (
                torch.tensor([[0.1, -0.2, 0.05], [3.0, 2.0, 1.0]]),
                torch.randn(3, 4, generator=g),
                -torch.rand(4, generator=g) - 2.5,
                torch.randn(4, 3, generator=g),
                torch.randn(3, generator=g),
            ),
        )
    )
    cases.append(
        Case(
            "behaviour: gradients reach W_enc, b_enc, W_dec, b_dec and W_skip",
            (
                torch.randn(6, 5, generator=g),
                torch.randn(5, 7, generator=g),
                torch.randn(7, generator=g),
                torch.randn(7, 5, generator=g),
                torch.randn(5, generator=g),
                torch.randn(5, 5, generator=g),
            ),
            call=_forward_grads,
        )
    )
    return cases


def _forward_grads(fn, x, *weights):
    """The gradients a backward pass from a fixed mix of both outputs leaves on every weight (zeros where none)."""
    g = gen(99)
    with torch.enable_grad():
        ws = [w.detach().clone().requires_grad_(True) for w in weights]
        y_hat, acts = fn(x, *ws)
        mix = (y_hat * torch.randn(y_hat.shape, generator=g)).sum() + (
            acts * torch.randn(acts.shape, generator=g)
        ).sum()
        mix.backward()
    return tuple(torch.zeros_like(w) if w.grad is None else w.grad for w in ws)


def _fwd_pre_bias(x, W_enc, b_enc, W_dec, b_dec, W_skip=None):
    acts = torch.relu((x - b_dec) @ W_enc + b_enc)
    y = acts @ W_dec + b_dec
    return (y + x @ W_skip.T if W_skip is not None else y), acts


def _fwd_skip_untransposed(x, W_enc, b_enc, W_dec, b_dec, W_skip=None):
    acts = torch.relu(x @ W_enc + b_enc)
    y = acts @ W_dec + b_dec
    return (y + x @ W_skip if W_skip is not None else y), acts


def _fwd_no_skip(x, W_enc, b_enc, W_dec, b_dec, W_skip=None):
    return sol.transcoder_forward(x, W_enc, b_enc, W_dec, b_dec)


def _fwd_detached(x, W_enc, b_enc, W_dec, b_dec, W_skip=None):
    with torch.no_grad():
        acts = torch.relu(x @ W_enc + b_enc)
    y = acts @ W_dec + b_dec
    return (y + x @ W_skip.T if W_skip is not None else y), acts


def _fwd_no_relu(x, W_enc, b_enc, W_dec, b_dec, W_skip=None):
    acts = x @ W_enc + b_enc
    y = acts @ W_dec + b_dec
    return (y + x @ W_skip.T if W_skip is not None else y), acts


register(
    "transcoder_forward",
    CHAPTER,
    sol.transcoder_forward,
    _forward_cases,
    mistakes=[
        Mistake(
            "pre-encoder bias",
            _fwd_pre_bias,
            "Don't subtract b_dec from the input. In an SAE input and output are the same activation, so the "
            "decoder bias can centre the input; a transcoder's b_dec is a bias of the MLP's OUTPUT, in another "
            "space (SAELens refuses apply_b_dec_to_input for transcoders).",
        ),
        Mistake(
            "skip not transposed",
            _fwd_skip_untransposed,
            "W_skip is stored like an nn.Linear weight, [d_out, d_in]: the skip path is x @ W_skip.T.",
        ),
        Mistake(
            "skip path ignored", _fwd_no_skip, "When W_skip is given, add the skip path x @ W_skip.T to the prediction."
        ),
        Mistake(
            "no ReLU",
            _fwd_no_relu,
            "The features are the ReLU of the encoder's read: without it they are neither sparse nor non-negative.",
        ),
        Mistake(
            "activations outside the autograd graph",
            _fwd_detached,
            "Compute the activations inside the autograd graph (no torch.no_grad(), no .detach()): training moves "
            "the encoder through them, so its gradient must reach W_enc and b_enc.",
        ),
    ],
    output_names=("y_hat", "acts"),
)


# --- mlp_io_pairs --------------------------------------------------------------------------


def _pairs_cases():
    model = shared_model()
    ids, mask = _model_data(4, seed=8)
    cases = [
        Case(f"TinyWorld, 4 documents, layer {L}, real tokens only", (model, ids, L, mask))
        for L in range(model.cfg.n_layers)
    ]
    cases.append(Case("TinyWorld, 2 documents, layer 2, no mask (every position)", (model, ids[:2], 2, None)))
    empty_row = mask.clone()
    empty_row[1] = False
    cases.append(Case("padding: the second document's mask keeps nothing", (model, ids, 1, empty_row)))
    cases.append(Case("behaviour: works under torch.no_grad()", (model, ids[:2], 3, mask[:2]), call=under_no_grad))
    cases.append(
        Case(
            f"must raise: layer {model.cfg.n_layers} of a {model.cfg.n_layers}-layer model",
            (model, ids[:2], model.cfg.n_layers, mask[:2]),
            call=_raises,
            judge=_must_raise("a layer the model does not have"),
        )
    )
    return cases


def _pairs_resid_mid(model, tokens, layer, mask=None):
    _, y = sol.mlp_io_pairs(model, tokens, layer, mask)
    _, cache = model.run_with_cache(tokens, names_filter=[act_name("resid_mid", layer)])
    x = cache[act_name("resid_mid", layer)]
    return (x.reshape(-1, x.shape[-1]) if mask is None else x[mask.bool()]), y


def _pairs_neurons(model, tokens, layer, mask=None):
    x, _ = sol.mlp_io_pairs(model, tokens, layer, mask)
    _, cache = model.run_with_cache(tokens, names_filter=[act_name("post", layer)])
    y = cache[act_name("post", layer)]
    return x, (y.reshape(-1, y.shape[-1]) if mask is None else y[mask.bool()])


def _pairs_resid_post(model, tokens, layer, mask=None):
    x, _ = sol.mlp_io_pairs(model, tokens, layer, mask)
    _, cache = model.run_with_cache(tokens, names_filter=[act_name("resid_post", layer)])
    y = cache[act_name("resid_post", layer)]
    return x, (y.reshape(-1, y.shape[-1]) if mask is None else y[mask.bool()])


def _pairs_no_mask(model, tokens, layer, mask=None):
    return sol.mlp_io_pairs(model, tokens, layer, None)


register(
    "mlp_io_pairs",
    CHAPTER,
    sol.mlp_io_pairs,
    _pairs_cases,
    mistakes=[
        Mistake(
            "residual stream before the layer norm",
            _pairs_resid_mid,
            "The MLP reads the residual stream AFTER the layer norm: use blocks.{layer}.ln2.hook_normalized, "
            "not hook_resid_mid (the transcoder would otherwise have to learn the normalisation too).",
        ),
        Mistake(
            "neuron activations as the target",
            _pairs_neurons,
            "The target is the MLP's output in the residual stream (blocks.{layer}.hook_mlp_out, d_model wide), "
            "not its hidden neurons (mlp.hook_post).",
        ),
        Mistake(
            "residual stream as the target",
            _pairs_resid_post,
            "The target is what the MLP adds (hook_mlp_out), not the whole residual stream after the layer.",
        ),
        Mistake(
            "mask ignored",
            _pairs_no_mask,
            "Keep only the positions where mask is True: x[mask] gives the rows in the right order.",
        ),
    ],
    output_names=("x", "y"),
)


# --- transcoder_loss -----------------------------------------------------------------------


def _loss_cases():
    g = gen(2)
    cases = []
    tc = _random_tc(5, 8, seed=2, skip=True)
    cases.append(
        Case(
            "standard skip transcoder, d_in = d_out = 5, non-unit decoder rows",
            (tc, torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)),
        )
    )
    tc = _random_tc(4, 6, seed=1, d_out=3)
    cases.append(
        Case("standard, d_in 4, d_out 3", (tc, torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)))
    )
    tc = _random_tc(4, 7, seed=3, architecture="topk", k=2)
    cases.append(
        Case(
            "TopK (k = 2), d_in = d_out = 4: no penalty",
            (tc, torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)),
        )
    )
    for L, skip in ((2, False), (0, True)):
        x, y = _pairs(L)
        cases.append(
            Case(
                f"the shipped layer-{L} {'skip ' if skip else ''}transcoder on TinyWorld MLP pairs",
                (_shipped(L, skip), x, y),
            )
        )
    tc = _random_tc(5, 8, seed=7, skip=True)
    cases.append(
        Case(
            "behaviour: the gradient of loss reaches W_enc, b_enc, W_dec, b_dec and W_skip (standard, skip)",
            (tc, torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)),
            call=_loss_grads,
        )
    )
    tc = _random_tc(4, 7, seed=8, architecture="topk", k=2)
    cases.append(
        Case(
            "behaviour: the gradient of loss for a TopK transcoder (the MSE's alone)",
            (tc, torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)),
            call=_loss_grads,
        )
    )
    return cases


def _loss_grads(fn, tc, x, y):
    """The gradient of the returned loss with respect to every parameter (zeros where it does not reach)."""
    params = [p for p in (tc.W_enc, tc.b_enc, tc.W_dec, tc.b_dec, tc.W_skip) if p is not None]
    with torch.enable_grad():
        loss = fn(tc, x, y)[0]
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            return "the returned loss is not in the autograd graph"
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))


def _loss_parts(tc, x, target, weighted=True, penalty=None, skip=True, mean_all=False, detach=False, item=False):
    acts = tc.encode(x)
    y_hat = tc.decode(acts) + (tc.skip_out(x) if skip else 0.0)
    err = (y_hat - target).pow(2)
    mse = err.mean() if mean_all else err.sum(-1).mean()
    norms = tc.W_dec.norm(dim=-1) if weighted else 1.0
    l1 = ((acts.detach() if detach else acts).abs() * norms).sum(-1).mean()
    if item:
        mse = mse.item()
    penalty = tc.cfg.architecture == "standard" if penalty is None else penalty
    return (mse + tc.cfg.l1_coeff * l1 if penalty else mse), mse, l1


register(
    "transcoder_loss",
    CHAPTER,
    sol.transcoder_loss,
    _loss_cases,
    mistakes=[
        Mistake(
            "reconstructs the input",
            lambda tc, x, y: _loss_parts(tc, x, x),
            "A transcoder predicts the MLP's OUTPUT y from its input x: compare the prediction with y. "
            "Reconstructing x is what an SAE does.",
        ),
        Mistake(
            "L1 without decoder norms",
            lambda tc, x, y: _loss_parts(tc, x, y, weighted=False),
            "Weight each feature's |activation| by the norm of its decoder row (W_dec.norm(dim=-1)), as in "
            "chapter 4; otherwise the penalty can be dodged by shrinking activations and growing the decoder.",
        ),
        Mistake(
            "penalty for every architecture",
            lambda tc, x, y: _loss_parts(tc, x, y, penalty=True),
            "TopK and BatchTopK transcoders have no L1 penalty: the loss is the MSE alone (l1 is only reported).",
        ),
        Mistake(
            "skip path forgotten",
            lambda tc, x, y: _loss_parts(tc, x, y, skip=False),
            "A skip transcoder's prediction includes the skip path: use transcoder(x), or decode(acts) + skip_out(x).",
        ),
        Mistake(
            "mean over every element",
            lambda tc, x, y: _loss_parts(tc, x, y, mean_all=True),
            "Sum the squared error over d_out, then average over the batch (not a mean over every element).",
        ),
        Mistake(
            "penalty on detached activations",
            lambda tc, x, y: _loss_parts(tc, x, y, detach=True),
            "The penalty must stay in the autograd graph: computed from detached activations it has the right "
            "value but no gradient, so training never pushes the activations towards zero.",
        ),
        Mistake(
            "mse through .item()",
            lambda tc, x, y: _loss_parts(tc, x, y, item=True),
            "Keep mse a tensor: .item() turns it into a Python float, which has the right value but no gradient, so "
            "the loss no longer trains the transcoder to predict y.",
        ),
    ],
    output_names=("loss", "mse", "l1"),
)


# --- replacement_loss ------------------------------------------------------------------------


def _replacement_cases():
    model = shared_model()
    ids, mask = _model_data()
    return [
        Case("TinyWorld: the layer-0 transcoder alone", (model, [_shipped(0)], ids, mask)),
        Case("TinyWorld: transcoders of layers 1 and 3", (model, [_shipped(1), _shipped(3)], ids, mask)),
        Case("TinyWorld: every MLP replaced at once", (model, _all_shipped(), ids, mask)),
        Case("TinyWorld: every MLP replaced by a skip transcoder", (model, _all_shipped(skip=True), ids, mask)),
        Case("TinyWorld: layers 2 and 0 (given out of order)", (model, [_shipped(2), _shipped(0)], ids, mask)),
        Case(
            "must raise: two transcoders for the same MLP",
            (model, [_shipped(1), _shipped(1, skip=True)], ids[:2], mask[:2]),
            call=_raises,
            judge=_must_raise("two transcoders replacing the same MLP"),
        ),
    ]


def _ce(model, tokens, mask, hooks):
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    scored = mask[:, :-1].bool() & mask[:, 1:].bool()
    return -logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0][scored].mean().item()


def _summary(ce_clean, ce_replaced, ce_ablated):
    return {
        "ce_clean": ce_clean,
        "ce_replaced": ce_replaced,
        "ce_ablated": ce_ablated,
        "loss_recovered": (ce_ablated - ce_replaced) / (ce_ablated - ce_clean),
    }


def _repl_clean_inputs(model, transcoders, tokens, mask):
    keep = mask.bool()[..., None]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("ln2.hook_normalized"))
    hooks = [
        (mlp_out_hook(tc.cfg.layer), lambda y, hook, tc=tc: torch.where(keep, tc(cache[mlp_in_hook(tc.cfg.layer)]), y))
        for tc in transcoders
    ]
    zero = [(mlp_out_hook(tc.cfg.layer), lambda y, hook: torch.where(keep, 0.0 * y, y)) for tc in transcoders]
    return _summary(_ce(model, tokens, mask, []), _ce(model, tokens, mask, hooks), _ce(model, tokens, mask, zero))


def _repl_one_at_a_time(model, transcoders, tokens, mask):
    singles = [sol.replacement_loss(model, [tc], tokens, mask) for tc in transcoders]
    mean = lambda key: sum(s[key] for s in singles) / len(singles)  # noqa: E731
    return _summary(mean("ce_clean"), mean("ce_replaced"), mean("ce_ablated"))


def _repl_everywhere_scored(model, transcoders, tokens, mask):
    inputs = {}
    hooks = [(mlp_in_hook(tc.cfg.layer), lambda x, hook: inputs.__setitem__(hook.layer(), x)) for tc in transcoders]
    hooks += [(mlp_out_hook(tc.cfg.layer), lambda y, hook, tc=tc: tc(inputs[hook.layer()])) for tc in transcoders]
    zero = [(mlp_out_hook(tc.cfg.layer), lambda y, hook: torch.zeros_like(y)) for tc in transcoders]
    return _summary(_ce(model, tokens, mask, []), _ce(model, tokens, mask, hooks), _ce(model, tokens, mask, zero))


def _repl_zero_everywhere(model, transcoders, tokens, mask):
    good = sol.replacement_loss(model, transcoders, tokens, mask)
    zero = [(mlp_out_hook(tc.cfg.layer), lambda y, hook: torch.zeros_like(y)) for tc in transcoders]
    return _summary(good["ce_clean"], good["ce_replaced"], _ce(model, tokens, mask, zero))


def _repl_fraction_lost(model, transcoders, tokens, mask):
    good = sol.replacement_loss(model, transcoders, tokens, mask)
    good["loss_recovered"] = (good["ce_replaced"] - good["ce_clean"]) / (good["ce_ablated"] - good["ce_clean"])
    return good


register(
    "replacement_loss",
    CHAPTER,
    sol.replacement_loss,
    _replacement_cases,
    mistakes=[
        Mistake(
            "clean inputs",
            _repl_clean_inputs,
            "In a replacement model each transcoder reads the MLP input of the SAME (replaced) run: hook "
            "ln2.hook_normalized in the run you are changing, not a cache of the clean run. Later transcoders "
            "must see what earlier transcoders wrote, errors included.",
        ),
        Mistake(
            "one at a time",
            _repl_one_at_a_time,
            "Replace every MLP in ONE forward pass, not each layer separately and then average: errors of "
            "different layers compound, which is what this measurement is about.",
        ),
        Mistake(
            "mask ignored",
            _repl_everywhere_scored,
            "Replace only at the positions where mask is True (torch.where(mask[..., None], new, old)): the "
            "transcoders were not trained on <bos> or padding.",
        ),
        Mistake(
            "ablated everywhere",
            _repl_zero_everywhere,
            "Zero the MLPs at the same positions you replace (the mask), so that the ablated run differs from "
            "the replaced one in one thing only: what the MLPs output there.",
        ),
        Mistake(
            "fraction lost",
            _repl_fraction_lost,
            "loss_recovered is (ce_ablated - ce_replaced) / (ce_ablated - ce_clean): 1 when the replacement is "
            "perfect, 0 when it is no better than zeroing the MLPs.",
        ),
    ],
    rtol=1e-3,
    atol=1e-4,
)


# --- de_embedding ----------------------------------------------------------------------------


def _de_embedding_cases():
    model = shared_model()
    tc0, tc2 = _shipped(0), _shipped(2)
    rand = _random_tc(model.cfg.d_model, 16, seed=4)
    return [
        Case("the shipped layer-0 transcoder, feature 0", (model, tc0, 0)),
        Case("the shipped layer-0 transcoder, feature 123", (model, tc0, 123)),
        Case("the shipped layer-2 transcoder, its last feature", (model, tc2, tc2.cfg.d_sae - 1)),
        Case("a random transcoder with 16 features, feature 5", (model, rand, 5)),
        Case(
            "must raise: feature 16 of a transcoder with 16 features",
            (model, rand, 16),
            call=_raises,
            judge=_must_raise("a feature the transcoder does not have"),
        ),
    ]


register(
    "de_embedding",
    CHAPTER,
    sol.de_embedding,
    _de_embedding_cases,
    mistakes=[
        Mistake(
            "unembedding",
            lambda model, tc, f: tc.W_enc[:, f] @ model.W_U,
            "The de-embedding reads the feature's encoder through the token EMBEDDINGS (model.W_E, which tokens "
            "put what into the residual stream), not the unembedding W_U (which tokens the stream predicts).",
        ),
        Mistake(
            "decoder",
            lambda model, tc, f: model.W_E @ tc.W_dec[f],
            "Use the feature's ENCODER vector W_enc[:, feature] (what turns it on), not its decoder row (what it writes).",
        ),
        Mistake(
            "positional embeddings",
            lambda model, tc, f: model.W_pos @ tc.W_enc[:, f],
            "Use the token embeddings model.W_E ([d_vocab, d_model]); W_pos are the positional embeddings.",
        ),
    ],
)


# --- pullback --------------------------------------------------------------------------------


def _pullback_cases():
    early = _random_tc(4, 6, seed=5, layer=0)
    late = _random_tc(4, 5, seed=6, layer=2)
    cases = [
        Case("random: earlier has 6 features, later has 5; feature 3", (early, late, 3)),
        Case("random: feature 0", (early, late, 0)),
        Case("the shipped transcoders of layers 0 and 2, feature 17", (_shipped(0), _shipped(2), 17)),
        Case("the shipped transcoders of layers 1 and 3, feature 400", (_shipped(1), _shipped(3), 400)),
        Case(
            "must raise: the 'earlier' transcoder comes after the later one",
            (late, early, 0),
            call=_raises,
            judge=_must_raise("an earlier transcoder that does not come before the later one"),
        ),
        Case(
            "must raise: feature 5 of a later transcoder with 5 features",
            (early, late, 5),
            call=_raises,
            judge=_must_raise("a feature the later transcoder does not have"),
        ),
    ]
    return cases


register(
    "pullback",
    CHAPTER,
    sol.pullback,
    _pullback_cases,
    mistakes=[
        Mistake(
            "earlier encoder",
            lambda e, l, f: e.W_enc.T @ l.W_enc[:, f],
            "The earlier feature acts on the later one through what it WRITES: use the earlier transcoder's "
            "decoder (earlier.W_dec), not its encoder.",
        ),
        Mistake(
            "later decoder",
            lambda e, l, f: e.W_dec @ l.W_dec[f],
            "The later feature READS the residual stream with its encoder vector later.W_enc[:, feature]; its "
            "decoder row is what it writes.",
        ),
        Mistake(
            "pushed forward",
            lambda e, l, f: l.W_dec[f] @ e.W_enc,
            "That runs the wrong way (the later feature's output read by the earlier encoders). Pull the later "
            "encoder back through the earlier decoder: earlier.W_dec @ later.W_enc[:, feature].",
        ),
    ],
)


# --- answer_attribution ----------------------------------------------------------------------


def _attribution_cases():
    model = shared_model()
    fact = torch.tensor(tinyworld.encode(fact_prompt("Alice")))
    city = tinyworld.token_id(tinyworld.WORLD.value("Alice", "city"))
    job = torch.tensor(tinyworld.encode(fact_prompt("Karl", "job")))
    job_answer = tinyworld.token_id(tinyworld.WORLD.value("Karl", "job"))
    ioi = "<bos> when Mia and Leo went to the park , Leo gave a ball to".split()
    ioi_ids = torch.tensor(tinyworld.encode(ioi))
    return [
        Case("'where does Alice live ?' -> her city, every MLP replaced", (model, _all_shipped(), fact, city)),
        Case(
            "'what is the job of Karl ?' -> his job, skip transcoders",
            (model, _all_shipped(skip=True), job, job_answer),
        ),
        Case(
            "an indirect-object prompt -> Mia, transcoders of layers 1 and 3 only",
            (model, [_shipped(1), _shipped(3)], ioi_ids, tinyworld.token_id("Mia")),
        ),
        Case(
            "behaviour: works under torch.no_grad(), as in the chapter (Karl's job, layers 0 and 2)",
            (model, [_shipped(0), _shipped(2)], job, job_answer),
            call=_no_grad_or_error,
        ),
        Case(
            "must raise: a batch of prompts instead of one",
            (model, [_shipped(1)], fact[None], city),
            call=_raises,
            judge=_must_raise("tokens that are not one prompt"),
        ),
    ]


def _attr_general(
    model,
    transcoders,
    tokens,
    answer_id,
    *,
    times_act=True,
    errors=True,
    freeze_pattern=True,
    freeze_scale=True,
    cut_features=True,
    freeze_other_mlps=True,
    log_prob=False,
    grad_mode=True,
):
    """The reference with one thing changed (each keyword names a known mistake)."""
    if tokens.ndim != 1:
        raise ValueError("tokens must be one prompt")
    by_layer = {tc.cfg.layer: tc for tc in transcoders}
    inputs, sources = {}, {}

    def frozen(name):
        return (freeze_pattern and name.endswith("hook_pattern")) or (freeze_scale and name.endswith("hook_scale"))

    def save(x, hook):
        inputs[hook.layer()] = x

    def replace(y, hook):
        if hook.layer() not in by_layer:
            return y.detach() if freeze_other_mlps else y
        tc, x = by_layer[hook.layer()], inputs[hook.layer()]
        acts = tc.encode(x)
        acts = acts.detach().requires_grad_(True) if cut_features else acts
        recon = tc.decode(acts) + tc.skip_out(x)
        err = (y - recon).detach().requires_grad_(True)
        sources[hook.layer()] = (acts, err)
        return recon + err if errors else recon + 0.0 * err

    hooks = [(frozen, lambda v, hook: v.detach()), (lambda n: n.endswith("ln2.hook_normalized"), save)]
    hooks.append((lambda n: n.endswith("hook_mlp_out"), replace))
    with torch.set_grad_enabled(True) if grad_mode else contextlib.nullcontext():
        logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks)
        out = logits[0, -1].log_softmax(-1)[answer_id] if log_prob else logits[0, -1, answer_id]
        leaves = [t for tc in transcoders for t in sources[tc.cfg.layer]]
        grads = torch.autograd.grad(out, leaves, allow_unused=True)
    attrs = [
        torch.zeros_like(t) if g is None else ((t if times_act or k % 2 else 1.0) * g).detach()
        for k, (t, g) in enumerate(zip(leaves, grads))
    ]
    feat = torch.stack([a[0] for a in attrs[0::2]])
    err = torch.stack([a[0].sum(-1) for a in attrs[1::2]])
    return feat, (err if errors else torch.zeros_like(err))


register(
    "answer_attribution",
    CHAPTER,
    sol.answer_attribution,
    _attribution_cases,
    mistakes=[
        Mistake(
            "gradient only",
            lambda *a: _attr_general(*a, times_act=False),
            "Attribution is the source's value TIMES the gradient: a feature that is off (activation 0) "
            "contributes nothing, however steep the gradient.",
        ),
        Mistake(
            "no error terms",
            lambda *a: _attr_general(*a, errors=False),
            "Keep each MLP's error term (what the transcoder misses, a constant) in the replaced output, so the "
            "frozen model computes exactly what the model computes, and report its attribution: what the "
            "transcoders miss stays visible instead of silently changing the prompt's computation.",
        ),
        Mistake(
            "live attention patterns",
            lambda *a: _attr_general(*a, freeze_pattern=False),
            "Freeze the attention patterns at their values in this run (hook_pattern): with live patterns the "
            "logit is not linear in the sources and the attributions no longer add up to it.",
        ),
        Mistake(
            "live LayerNorm scales",
            lambda *a: _attr_general(*a, freeze_scale=False),
            "Freeze every LayerNorm's scale at its value in this run (hook_scale), the final one included: a "
            "live scale makes the logit nonlinear in the sources.",
        ),
        Mistake(
            "paths through later features",
            lambda *a: _attr_general(*a, cut_features=False),
            "A feature's attribution counts only the paths that pass through no other transcoder feature: make "
            "each transcoder's activations a source of their own (detached from its input), so that what an "
            "earlier feature does through a later one is an edge of the graph, not part of its attribution.",
        ),
        Mistake(
            "MLPs without a transcoder left live",
            lambda *a: _attr_general(*a, freeze_other_mlps=False),
            "An MLP without a transcoder keeps its output from this run as a constant: a live MLP is nonlinear, "
            "and sources would be credited with what it computes from them.",
        ),
        Mistake(
            "log-probability",
            lambda *a: _attr_general(*a, log_prob=True),
            "Explain the answer's LOGIT at the last position, not its log-probability.",
        ),
        Mistake(
            "gradients left to the caller",
            lambda *a: _attr_general(*a, grad_mode=False),
            "The function must work when the caller has turned gradients off (the chapter runs under "
            "torch.set_grad_enabled(False)): compute the gradients inside torch.enable_grad().",
        ),
    ],
    rtol=1e-3,
    atol=1e-4,
    output_names=("feature_attr", "error_attr"),
)
