"""Batched, memory-bounded activation collection.

Two ways in:

- `collect(model, tokens, hooks)` returns ``{hook_name: tensor}`` for a dataset that
  fits in memory (it refuses, with a clear message, when the result would not).
- `iter_activations(model, tokens, hooks)` yields one batch at a time, for datasets of
  millions of tokens: train an SAE on the stream, or write it to disk.

Both run the model only as deep as the deepest hook asked for, cache nothing but
those hooks, and can keep only chosen positions (e.g. answer positions, or every
non-padding token), so memory grows with what you keep, not with the model.

    >>> acts = collect(model, ids, "blocks.1.hook_resid_post", mask=mask)   # doctest: +SKIP
    >>> acts["blocks.1.hook_resid_post"].shape                              # doctest: +SKIP
    torch.Size([n_real_tokens, d_model])
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import torch

DEFAULT_MAX_GB = 4.0


def _as_list(hooks: str | Sequence[str]) -> list[str]:
    return [hooks] if isinstance(hooks, str) else list(hooks)


def stop_layer(model, hook_names: Sequence[str]) -> int | None:
    """The `stop_at_layer` that still computes every hook in `hook_names` (None: the whole model)."""
    deepest = -1
    for name in hook_names:
        if name not in model.hook_dict:
            raise KeyError(
                f"{name!r} is not a hook point of this model. Hook names look like 'blocks.0.hook_resid_post' or "
                f"'blocks.1.attn.hook_pattern'; list them with `list(model.hook_dict)`."
            )
        m = re.match(r"blocks\.(\d+)\.", name)
        if m is None:
            if name.startswith(("hook_embed", "hook_pos_embed", "hook_tokens")):
                continue
            return None  # ln_final / unembed: run everything
        deepest = max(deepest, int(m.group(1)))
    return deepest + 1


def _select(act: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Rows of `act` [batch, pos, ...] where `keep` [batch, pos] is True, flattened; or all of it."""
    return act if keep is None else act[keep.to(act.device)]


def iter_activations(
    model,
    tokens: torch.Tensor,
    hooks: str | Sequence[str],
    *,
    mask: torch.Tensor | None = None,
    batch_size: int = 64,
    out_device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    progress: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``{hook: activations}`` batch by batch.

    Args:
        model: a HookedTransformer.
        tokens: [n_seq, pos] token ids.
        hooks: one hook name or several.
        mask: optional [n_seq, pos] bool; keep only these positions (flattened to [n_kept, ...]).
        batch_size: sequences per forward pass.
        out_device: where the yielded tensors live.
        dtype: cast activations to this dtype (None keeps the model's).
        progress: show a tqdm progress bar.
    """
    from tqdm.auto import tqdm

    names = _as_list(hooks)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [n_seq, pos] token ids, got shape {tuple(tokens.shape)}")
    if mask is not None and mask.shape != tokens.shape:
        raise ValueError(f"mask must have the shape of tokens {tuple(tokens.shape)}, got {tuple(mask.shape)}")
    stop = stop_layer(model, names)
    device = next(model.parameters()).device
    store: dict[str, torch.Tensor] = {}

    def save(act: torch.Tensor, hook) -> None:
        store[hook.name] = act.detach()

    starts = range(0, tokens.shape[0], batch_size)
    for start in tqdm(starts, disable=not progress, desc="activations", unit="batch", leave=False):
        batch = tokens[start : start + batch_size].to(device)
        keep = None if mask is None else mask[start : start + batch_size]
        store.clear()
        with torch.inference_mode():
            model.run_with_hooks(batch, fwd_hooks=[(n, save) for n in names], stop_at_layer=stop, return_type=None)
        out = {}
        for n in names:
            act = _select(store[n], keep)
            out[n] = act.to(device=out_device, dtype=dtype or act.dtype)
        yield out


def collect(
    model,
    tokens: torch.Tensor,
    hooks: str | Sequence[str],
    *,
    mask: torch.Tensor | None = None,
    batch_size: int = 64,
    out_device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    progress: bool = True,
    max_gb: float = DEFAULT_MAX_GB,
) -> dict[str, torch.Tensor]:
    """Collect activations for a whole dataset into one tensor per hook.

    Returns ``{hook: tensor}``, each [n_seq, pos, ...] or, with ``mask``, [n_kept, ...]
    (kept positions in order: sequence by sequence, position by position).

    Raises MemoryError before running anything when the result would exceed ``max_gb``;
    use `iter_activations` to stream instead.
    """
    names = _as_list(hooks)
    n_rows = int(mask.sum()) if mask is not None else tokens.numel()
    per_row = 0
    for n in names:
        shape = _hook_shape(model, n)
        per_row += int(torch.tensor(shape).prod()) if shape else 1
    itemsize = torch.empty((), dtype=dtype or torch.float32).element_size()
    gb = n_rows * per_row * itemsize / 1e9
    if gb > max_gb:
        raise MemoryError(
            f"collecting {names} for {n_rows:,} positions would take {gb:.1f} GB (limit max_gb={max_gb}). "
            f"Keep fewer positions with `mask`, fewer hooks, or stream with iter_activations(...)."
        )
    chunks: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for out in iter_activations(
        model, tokens, names, mask=mask, batch_size=batch_size, out_device=out_device, dtype=dtype, progress=progress
    ):
        for n in names:
            chunks[n].append(out[n])
    return {n: torch.cat(chunks[n]) for n in names}


def _hook_shape(model, name: str) -> tuple[int, ...]:
    """Per-position shape of a hook's activation (beyond [batch, pos]), from the model's config."""
    cfg = model.cfg
    leaf = name.split(".")[-1]
    if leaf in ("hook_pattern", "hook_attn_scores"):
        return (cfg.n_heads, cfg.n_ctx)  # an upper bound: [head, key_pos]
    if leaf in ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result"):
        return (cfg.n_heads, cfg.d_head if leaf != "hook_result" else cfg.d_model)
    if leaf in ("hook_pre", "hook_post", "hook_pre_linear"):
        return (cfg.d_mlp,)
    if leaf in ("hook_scale",):
        return (1,)
    return (cfg.d_model,)
