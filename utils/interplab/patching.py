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

Chapter 06's exercises ask learners to write some of these functions (the metric, the sweeps,
`path_patch`, `attribution_patch`); the answer key (`interplab.solutions.ch06_patching`) holds
their learner-facing references, and tests/test_ch06_patching.py checks that the two agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from .hooks import act_name, layer_of

Metric = Callable[[Tensor], Tensor]

# the components the sweeps patch, by TransformerLens's short names (`hooks.act_name` spells the hook)
LAYER_POS_COMPONENTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")  # [batch, pos, d_model]
HEAD_COMPONENTS = ("z", "q", "k", "v", "pattern")  # [batch, pos, head, d_head]; the pattern [batch, head, q, k]


# --- the metric -------------------------------------------------------------------------


def logit_diff(
    logits: Float[Tensor, "batch pos vocab"], answer: Int[Tensor, " batch"], wrong: Int[Tensor, " batch"]
) -> Float[Tensor, " batch"]:
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


def mean_logit_diff(
    model, tokens: Int[Tensor, "batch pos"], answer: Int[Tensor, " batch"], wrong: Int[Tensor, " batch"]
) -> float:
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
    return reads_positions(metric, -1)  # it reads the final position only


# --- the batched patching engine ---------------------------------------------------------


def hook_name(component: str, layer: int) -> str:
    """The TransformerLens hook name of `component` ("resid_pre", "z", "pattern", ...) in block `layer`."""
    if component not in LAYER_POS_COMPONENTS + HEAD_COMPONENTS:
        raise ValueError(
            f"unknown component {component!r}; choose one of {sorted(LAYER_POS_COMPONENTS + HEAD_COMPONENTS)}"
        )
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


def reads_positions(metric: Metric, *positions: int) -> Metric:
    """Declare that `metric` reads the logits at `positions` only (e.g. ``-1``, the final position).

    The patching engine then computes the unembedding at those positions only and calls
    the metric with ``logits[:, positions]`` ([batch, len(positions), vocab], in the given
    order), so the metric must give the same value on that narrower tensor (a metric that
    reads ``logits[:, -1]`` and declares ``-1`` does). The engine checks this once per
    sweep on the target run and raises ValueError if the declaration is wrong.
    """
    if not positions or not all(isinstance(p, int) for p in positions):
        raise ValueError(f"give the positions the metric reads as integers (e.g. -1), not {positions!r}")
    metric.read_positions = tuple(positions)
    return metric


def run_patches(
    model,
    target_tokens: Int[Tensor, "batch pos"],
    source: dict[str, Tensor],
    patches: Sequence[tuple[str, tuple]],
    metric: Metric,
    max_patches_per_pass: int | None = None,
    engine: str = "auto",
) -> Float[Tensor, " patch"]:
    """Run many single-activation patches, many per forward pass; one metric value per patch.

    Each patch is (hook name, index): in the target run, ``act[:, *index]`` of that hook
    is replaced by ``source[hook name][:, *index]`` for every prompt. The results are those
    of one full forward pass per patch (as TransformerLens's `patching` module runs), but
    computed with far less work:

    - Batching: the target prompts are repeated once per patch (rows k*batch ..
      (k+1)*batch - 1 belong to patch k), and the metric is applied to each patch's rows.
    - A patch changes nothing before its block, nor at positions before the first one
      where the pasted values differ from the target's (attention is causal). So the
      patches of block l whose change starts at position p recompute only positions
      >= p of blocks >= l, starting from the target run's cached activations (at the
      patched hook itself) and its cached keys and values of the earlier positions.
    - If the metric declares the positions it reads (`reads_positions`; the chapter's
      `logit_diff_metric` reads the final position), the last block and the unembedding
      are computed at those positions only.

    Args:
        engine: "auto" (the fast engine where the model's architecture allows it, the
            hooked one otherwise), "fast", or "hooks" (TransformerLens forward passes with
            hooks, starting at the patched block: the simple, slower way).
    """
    if engine not in ("auto", "fast", "hooks"):
        raise ValueError(f"engine must be 'auto', 'fast' or 'hooks', not {engine!r}")
    if engine != "hooks":
        reason = _SuffixEngine.unsupported(model, patches)
        if reason is None:
            return _SuffixEngine(model, target_tokens, metric).run(source, patches, max_patches_per_pass)
        if engine == "fast":
            raise ValueError(f"the fast patching engine cannot run this: {reason}; use engine='hooks' or 'auto'")
    return _run_patches_hooked(model, target_tokens, source, patches, metric, max_patches_per_pass)


def _run_patches_hooked(model, target_tokens, source, patches, metric, max_patches_per_pass=None) -> Tensor:
    """`run_patches` with TransformerLens's forward pass and hooks, each block's patches from its cached input."""
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


# Where each patchable component sits in a block, in the order the block computes them.
_STAGE = {
    "resid_pre": 0,
    "q": 1,
    "k": 1,
    "v": 1,
    "pattern": 2,
    "z": 3,
    "attn_out": 4,
    "resid_mid": 5,
    "mlp_out": 6,
    "resid_post": 7,
}


def _component_of(hook: str) -> str | None:
    """The component ("z", "resid_pre", ...) of a block hook name, or None if it is not one the engine patches."""
    layer = layer_of(hook)
    if layer is None:
        return None
    for component in _STAGE:
        if hook == act_name(component, layer):
            return component
    return None


# activation functions computed by one fused kernel (equal to TransformerLens's to float precision)
_FUSED_ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


class _SuffixEngine:
    """The fast engine of `run_patches`: a forward pass over HookedTransformer's weights that starts at a hook of
    block l, at position p, reusing the target run's activations (and keys and values) of everything earlier.

    It reproduces TransformerBlock's arithmetic for the standard pre-norm GPT-2-style block (LayerNorm or
    RMSNorm, or their weightless "Pre" forms, causal attention with absolute position embeddings, any MLP
    TransformerLens builds) and reports the rest as unsupported, which `run_patches` hands to the hooked engine.
    """

    @staticmethod
    def unsupported(model, patches) -> str | None:
        """Why the engine cannot run these patches on this model, or None if it can."""
        from transformer_lens.components import Attention, TransformerBlock  # the exact classes it reimplements

        cfg = model.cfg
        checks = [
            (cfg.positional_embedding_type == "standard", f"position embeddings {cfg.positional_embedding_type!r}"),
            (not cfg.attn_only and not cfg.parallel_attn_mlp, "attention-only or parallel attention/MLP blocks"),
            (cfg.n_key_value_heads in (None, cfg.n_heads), "grouped-query attention"),
            (not (cfg.use_attn_in or cfg.use_split_qkv_input or cfg.use_attn_result), "split attention inputs"),
            (not cfg.use_local_attn and cfg.attention_dir == "causal", "local or bidirectional attention"),
            (not getattr(cfg, "use_normalization_before_and_after", False), "normalisation after each sublayer"),
            (
                not (
                    getattr(cfg, "use_qk_norm", False)
                    or getattr(cfg, "use_logn_attn", False)
                    or getattr(cfg, "use_attention_sinks", False)
                    or getattr(cfg, "clip_qkv", None)
                    or getattr(cfg, "load_in_4bit", False)
                ),
                "a non-standard attention variant",
            ),
            (
                getattr(cfg, "attn_scores_soft_cap", -1.0) in (None, -1.0)
                and getattr(cfg, "output_logits_soft_cap", -1.0) in (None, -1.0),
                "soft-capped scores or logits",
            ),
            (
                all(type(b) is TransformerBlock and type(b.attn) is Attention for b in model.blocks),
                "blocks other than TransformerLens's standard TransformerBlock",
            ),
            (
                not any(h._forward_hooks or h._forward_pre_hooks for h in model.hook_dict.values()),
                "hooks are attached to the model",
            ),
            (all(_component_of(name) is not None for name, _ in patches), "a patch outside the blocks' components"),
        ]
        for ok, what in checks:
            if not ok:
                return what
        return None

    def __init__(self, model, target_tokens: Tensor, metric: Metric):
        self.model, self.metric, self.cfg = model, metric, model.cfg
        self.tokens = target_tokens.to(model.cfg.device)
        self.batch, self.n_pos = self.tokens.shape
        reads = getattr(metric, "read_positions", None)
        self.reads = None if reads is None else [p % self.n_pos for p in reads]
        if self.reads is not None and any(not -self.n_pos <= p < self.n_pos for p in reads):
            raise ValueError(f"the metric reads positions {reads}, outside prompts of {self.n_pos} positions")
        self.target: dict[str, Tensor] = {}
        self._weights = []
        for block in model.blocks:
            a = block.attn
            w_qkv = torch.cat([w.permute(0, 2, 1).reshape(-1, self.cfg.d_model) for w in (a.W_Q, a.W_K, a.W_V)])
            b_qkv = torch.cat([a.b_Q.reshape(-1), a.b_K.reshape(-1), a.b_V.reshape(-1)])
            w_o = a.W_O.permute(2, 0, 1).reshape(self.cfg.d_model, -1).contiguous()
            self._weights.append((w_qkv.detach(), b_qkv.detach(), w_o.detach(), a.b_O.detach()))
        self._w_u = model.unembed.W_U.detach().T.contiguous()
        self.flops = 0  # multiply-adds x 2 of the matrix products the patched passes compute (the caches excluded)
        self._b_u = model.unembed.b_U.detach()

    # -- the target run ---------------------------------------------------------------------------

    def cache_runs(self, source_tokens: Tensor | None = None, source_names=()) -> dict[str, Tensor]:
        """Cache the target run's activations the engine needs (and, in the same forward pass, the source
        run's activations `source_names` on `source_tokens`, which it returns)."""
        components = {_component_of(name) for name in source_names}
        needed = components | {"resid_pre", "q", "k", "v", "resid_post"}  # block inputs, unchanged q, k, v
        needed |= {"resid_mid"} if "mlp_out" in components else set()
        names = {act_name(c, layer) for c in needed for layer in range(self.cfg.n_layers)} | set(source_names)
        tokens = (
            self.tokens if source_tokens is None else torch.cat([self.tokens, source_tokens.to(self.tokens.device)])
        )
        with torch.no_grad():
            logits, cache = self.model.run_with_cache(tokens, names_filter=lambda n: n in names)
        b = self.batch
        self.target = {n: cache[n][:b] for n in names}
        logits = logits[:b]
        if self.reads is not None:  # the metric's declaration is checked once, on the target run
            full = self.metric(logits)
            try:
                narrow = self.metric(logits[:, self.reads])
            except (IndexError, RuntimeError) as e:
                raise ValueError(
                    f"the metric declares that it reads positions {self.metric.read_positions}, but it "
                    f"fails on logits[:, {list(self.metric.read_positions)}] ({e}); fix its "
                    f"read_positions or remove the attribute"
                ) from e
            if not torch.allclose(torch.as_tensor(full).float(), torch.as_tensor(narrow).float(), atol=1e-6, rtol=1e-5):
                raise ValueError(
                    f"the metric declares that it reads positions {self.metric.read_positions}, but its value on "
                    f"logits[:, {list(self.metric.read_positions)}] ({float(narrow):.6g}) differs from its value on "
                    f"the full logits ({float(full):.6g}); fix its read_positions or remove the attribute"
                )
        return {n: cache[n][b:] for n in source_names}

    def _changed(self, name: str, source: Tensor) -> tuple[Tensor, Tensor]:
        """Per element of hook `name`'s activation: its position if the source differs from the target there,
        else n_pos (resp. -1): the minimum (maximum) over a patch's index is the first (last) position it changes."""
        target = self.target[name]
        axis = 2 if _component_of(name) == "pattern" else 1  # the pattern's query axis
        shape = [1] * target.dim()
        shape[axis] = self.n_pos
        pos = torch.arange(self.n_pos, device=target.device).view(shape).expand(target.shape)
        differs = source != target
        return torch.where(differs, pos, self.n_pos), torch.where(differs, pos, -1)

    # -- the suffix forward pass ---------------------------------------------------------------------

    def _rep(self, x: Tensor, n: int) -> Tensor:
        return x.repeat(n, *([1] * (x.dim() - 1)))

    def _block(
        self, layer: int, p: int, n: int, x: Tensor, component: str, keep, suffix: bool, single: bool
    ) -> tuple[Tensor, bool]:
        """Block `layer` from its hook `component` to its resid_post, at positions >= p (only at the suffix indices
        `keep` in the last block), for n patched copies of the target batch: ([rows, positions, d_model], single).

        `x` is the value at hook `component`: every position (the patched block), or positions >= p (`suffix`,
        a resid_pre from the block before). `single` says that it differs from the target run's at position p
        only; from the pattern on (or a query) that stays so through the block, which is then computed at
        position p only, and the result says so in turn.
        """
        if single and (_STAGE[component] >= 2 or component == "q"):
            only_p = torch.zeros(1, dtype=torch.long, device=x.device)
            at_p = self._positions(layer, p, n, x, component, only_p, suffix, single)
            out = torch.cat([at_p, self._rep(self.target[act_name("resid_post", layer)][:, p + 1 :], n)], 1)
            return (out if keep is None else out.index_select(1, keep)), True
        return self._positions(layer, p, n, x, component, keep, suffix, single), False

    def _positions(self, layer, p, n, entry, component, keep, suffix, single) -> Tensor:
        """`_block`'s arithmetic (TransformerBlock's, in the same order) at positions >= p, or at the suffix
        indices `keep` from the queries on; a single changed resid_pre input has its keys and values
        recomputed at position p only."""
        cfg, block, t = self.cfg, self.model.blocks[layer], self.target
        w_qkv, b_qkv, w_o, b_o = self._weights[layer]
        stage, rows = _STAGE[component], n * self.batch
        n_heads, d_head = cfg.n_heads, cfg.d_head

        def cached(c, start=p, stop=None):  # the target run's activation, one copy per patch
            return self._rep(t[act_name(c, layer)][:, start:stop], n)

        def kept(x, axis=1):  # the positions the rest of the block needs
            return x if keep is None else x.index_select(axis, keep)

        if stage == 0:
            x = entry if suffix else entry[:, p:]
        if stage <= 1:
            if stage == 0:
                h = block.ln1(x[:, :1] if single else x)
                self.flops += 2 * h.shape[0] * h.shape[1] * w_qkv.numel()
                q, k_new, v_new = F.linear(h, w_qkv, b_qkv).view(rows, -1, 3, n_heads, d_head).unbind(2)
                if single:  # later positions keep the target run's queries, keys and values
                    q = torch.cat([q, cached("q", p + 1)], 1)
                    k_new = torch.cat([k_new, cached("k", p + 1)], 1)
                    v_new = torch.cat([v_new, cached("v", p + 1)], 1)
                k = torch.cat([cached("k", 0, p), k_new], 1) if p else k_new
                v = torch.cat([cached("v", 0, p), v_new], 1) if p else v_new
            else:
                q = entry[:, p:] if component == "q" else cached("q")
                k = entry if component == "k" else cached("k", 0)
                v = entry if component == "v" else cached("v", 0)
            q = kept(q)
            q_pos = kept(torch.arange(p, self.n_pos, device=q.device), 0)
            scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) / block.attn.attn_scale  # [rows, head, query, key]
            self.flops += 4 * rows * q.shape[1] * self.n_pos * n_heads * d_head  # scores and z
            allowed = torch.arange(self.n_pos, device=q.device)[None, :] <= q_pos[:, None]
            scores = torch.where(allowed, scores, block.attn.IGNORE)
            pattern = F.softmax(scores, dim=-1)
            pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
        if stage == 2:
            pattern = kept(entry[:, :, p:], 2)
            v = cached("v", 0)
        if stage <= 2:
            z = (pattern @ v.transpose(1, 2)).transpose(1, 2)
        if stage == 3:
            z = kept(entry[:, p:])
        if stage == 2:
            self.flops += 2 * rows * pattern.shape[2] * self.n_pos * n_heads * d_head
        if stage <= 3:
            self.flops += 2 * rows * z.shape[1] * w_o.numel()
            attn_out = F.linear(z.reshape(rows, z.shape[1], n_heads * d_head), w_o, b_o)
        if stage == 4:
            attn_out = kept(entry[:, p:])
        if stage <= 4:
            resid_mid = (kept(x) if stage == 0 else kept(cached("resid_pre"))) + attn_out
        if stage == 5:
            resid_mid = kept(entry[:, p:])
        if stage <= 5:
            self.flops += 4 * rows * resid_mid.shape[1] * cfg.d_model * (cfg.d_mlp or 0)
            mlp_out = self._mlp(layer, block.ln2(resid_mid))
        if stage == 6:
            mlp_out = kept(entry[:, p:])
            resid_mid = kept(cached("resid_mid"))
        if stage <= 6:
            return resid_mid + mlp_out
        return kept(entry[:, p:])

    def _mlp(self, layer: int, x: Tensor) -> Tensor:
        """The block's MLP: TransformerLens's own, or the plain two-layer one with a fused activation function."""
        mlp = self.model.blocks[layer].mlp
        act = _FUSED_ACTIVATIONS.get(self.cfg.act_fn)
        if type(mlp).__name__ != "MLP" or act is None or self.cfg.is_layer_norm_activation():
            return self.model.blocks[layer].apply_mlp(x)
        pre = torch.addmm(mlp.b_in, x.reshape(-1, x.shape[-1]), mlp.W_in)
        return torch.addmm(mlp.b_out, act(pre), mlp.W_out).view(*x.shape[:-1], -1)

    def _logits(self, layer: int, component: str, p: int, entry: Tensor, n: int, single: bool) -> Tensor:
        """The logits of `n` patched copies of the target batch, from block `layer` on: at the metric's read
        positions if it declares them, else at every position (the earlier ones are the target run's)."""
        last = self.cfg.n_layers - 1
        keep = None if self.reads is None else torch.tensor([r - p for r in self.reads], device=entry.device)
        x, single = self._block(layer, p, n, entry, component, keep if layer == last else None, False, single)
        for later in range(layer + 1, self.cfg.n_layers):
            x, single = self._block(later, p, n, x, "resid_pre", keep if later == last else None, True, single)
        if keep is None and p:  # every position: the earlier ones are unchanged
            x = torch.cat([self._rep(self.target[act_name("resid_post", last)][:, :p], n), x], 1)
        self.flops += 2 * x.shape[0] * x.shape[1] * self._w_u.numel()
        return F.linear(self.model.ln_final(x), self._w_u, self._b_u)

    def _per_pass(self, suffix: int) -> int:
        cfg = self.cfg
        n_out = len(self.reads) if self.reads is not None else self.n_pos
        per_row = max(suffix * max(cfg.d_mlp or 0, 3 * cfg.d_model, cfg.n_heads * self.n_pos), n_out * cfg.d_vocab)
        return max(1, int(6e7 // (self.batch * per_row)))

    def run(self, source: dict[str, Tensor], patches, max_patches_per_pass: int | None = None) -> Tensor:
        with torch.no_grad():
            if not self.target:
                self.cache_runs(None, sorted({name for name, _ in patches}))
            changed = {name: self._changed(name, source[name]) for name in {name for name, _ in patches}}
            latest = min(self.reads) if self.reads is not None else self.n_pos - 1
            groups: dict[tuple, list[int]] = {}
            for i, (name, index) in enumerate(patches):
                first, last = (c[(slice(None),) + index] for c in changed[name])
                # a patch that changes nothing (or only after the first read position) still gets its own value
                p = min(int(first.min()), latest)
                single = int(last.max()) <= p  # it changes position p at most
                groups.setdefault((layer_of(name), name, p, single), []).append(i)
            results = torch.zeros(len(patches))
            for (layer, name, p, single), members in sorted(groups.items(), key=lambda g: g[0][:1] + g[0][2:]):
                per_pass = max_patches_per_pass or self._per_pass(self.n_pos - p)
                target, src = self.target[name], source[name]
                for start in range(0, len(members), per_pass):
                    chunk = members[start : start + per_pass]
                    entry = self._rep(target, len(chunk))
                    view = entry.view(len(chunk), *target.shape)
                    for k, i in enumerate(chunk):
                        index = (slice(None),) + patches[i][1]
                        view[(k,) + index] = src[index]
                    logits = self._logits(layer, _component_of(name), p, entry, len(chunk), single)
                    for k, i in enumerate(chunk):
                        results[i] = self.metric(logits[k * self.batch : (k + 1) * self.batch]).detach().float().cpu()
            return results


def forward_flops(cfg, batch: int, n_pos: int) -> int:
    """FLOPs (2 x multiply-adds) of the matrix products of one full forward pass on [batch, n_pos] tokens: what
    TransformerLens's sweeps compute per patch (counted as the fast engine counts its own, `last_sweep_flops`)."""
    d, attn = cfg.d_model, cfg.n_heads * cfg.d_head
    per_pos_layer = 2 * (3 * d * attn + attn * d + 2 * d * (cfg.d_mlp or 0)) + 4 * n_pos * attn
    return batch * n_pos * (cfg.n_layers * per_pos_layer + 2 * d * cfg.d_vocab)


last_sweep_flops: dict = {}  # the last sweep's count: {"flops": ..., "patches": ...} (the fast engine only)


def _sweep(model, source_tokens: Tensor, target_tokens: Tensor, metric: Metric, patches) -> Tensor:
    """`run_patches` with the source activations taken from a run on `source_tokens`; the fast engine caches the
    source and the target run in one forward pass."""
    if source_tokens.shape != target_tokens.shape:
        raise ValueError(
            f"source and target tokens must have the same shape, not {tuple(source_tokens.shape)} "
            f"and {tuple(target_tokens.shape)}"
        )
    names = sorted({name for name, _ in patches})
    if _SuffixEngine.unsupported(model, patches) is None:
        engine = _SuffixEngine(model, target_tokens, metric)
        out = engine.run(engine.cache_runs(source_tokens, names), patches)
        last_sweep_flops.update(flops=engine.flops, patches=len(patches))
        return out
    last_sweep_flops.clear()
    return run_patches(model, target_tokens, cache_activations(model, source_tokens, names), patches, metric)


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
    n_pos = target_tokens.shape[1]
    patches = [(name, (pos,)) for name in names for pos in range(n_pos)]
    return _sweep(model, source_tokens, target_tokens, metric, patches).reshape(model.cfg.n_layers, n_pos)


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
    if component == "pattern":
        patches = [(name, (head,)) for name in names for head in range(model.cfg.n_heads)]
    else:
        patches = [(name, (slice(None), head)) for name in names for head in range(model.cfg.n_heads)]
    return _sweep(model, source_tokens, target_tokens, metric, patches).reshape(model.cfg.n_layers, model.cfg.n_heads)


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
    n_pos, n_heads = target_tokens.shape[1], model.cfg.n_heads
    patches = []
    for name in names:
        for pos in range(n_pos):
            for head in range(n_heads):
                patches.append((name, (head, pos) if component == "pattern" else (pos, head)))
    return _sweep(model, source_tokens, target_tokens, metric, patches).reshape(model.cfg.n_layers, n_pos, n_heads)


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
                raise ValueError(
                    f"receiver L{r_layer}H{r_head} is not after the sender L{layer}H{head}: "
                    f"a head can only send to heads of later layers"
                )


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
            chunk = senders[start : start + per_pass]
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

            logits = model.run_with_hooks(
                tokens, fwd_hooks=[(nm, freeze) for nm in z_names] + [(nm, store) for nm in receiver_names]
            )
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
                out[s_layer, s_head] = metric(logits[k * batch : (k + 1) * batch]).item()
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
        raise ValueError(
            f"clean and corrupted tokens must have the same shape, not {tuple(clean_tokens.shape)} "
            f"and {tuple(corrupted_tokens.shape)}"
        )
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
            logits = model.run_with_hooks(
                corrupted_tokens.to(model.cfg.device), fwd_hooks=[(n, mix) for n in inputs] + [(n, keep) for n in names]
            )
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
