"""Locating a causal variable in a subspace: interchange interventions, distributed alignment search
(DAS, Geiger et al. 2023), interchange-intervention accuracy (IIA), and two interpretability illusions.

The variable is TinyWorld's room of the person asked about ("A kitchen . B garden . where is A"
-> kitchen), read at the question's name, the prompt's last position. A pair is a base prompt and
a source prompt that differ only in that person's room; an interchange intervention on a subspace
replaces the base run's component in the subspace (at one hook, last position) by the source run's.
If the subspace carries the variable, the model then answers with the source's room.

Illusions:
- `dormant_patch_demo` (Makelov et al. 2023): a 1-d patch along v = (a direction the downstream
  weights ignore, which varies with the room) + (a direction the downstream weights read, along
  which the runs do not differ) moves the output, although neither part alone does.
- the held-out check of a found circuit (Friedman et al. 2023) uses `discovery`: a circuit found on
  pairs that vary the room is evaluated on pairs that vary who is asked about
  (`rooms_pairs(..., corruption="person")`) and on longer room histories (`moves=2`).

The SAE row of chapter 07's table needs an SAE where DAS works: `load_resid3_sae` loads the TopK SAE
trained with chapter 04's recipe on `DAS_HOOK` (artifact sae_resid3_topk; `interplab rebuild --only
sae_resid3_topk` retrains it from `Resid3SAERecipe`).

Chapter 07's exercises ask learners to write the interchange on a subspace and IIA; the library
holds its own copies (`interchange`, `iia_of`) and the chapter's tests check that they agree.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import weights
from .dictionaries.io import load_shipped
from .dictionaries.modules import SAE
from .dictionaries.shipped import SAERecipe, build_sae
from .discovery import room_prompts
from .probes import fit_probe, orthonormal_basis
from .tinyworld import language as TW

DAS_HOOK = "blocks.3.hook_resid_pre"  # after layer 2 has moved the room to the name (the last block reads it)
RESID3_SAE = "sae_resid3_topk"  # the artifact: a TopK SAE where DAS works, so the SAE row of the table is fair
RESID3_SAE_FOLDER = "sae_tinyworld_resid3_topk"


@dataclass(frozen=True)
class Resid3SAERecipe(SAERecipe):
    """The TopK SAE shipped for chapter 07 (artifact sae_resid3_topk): chapter 04's TopK recipe (k = 16 of
    768 features, the same data, optimiser and steps), read at DAS's site, block 3's input."""

    architecture: str = "topk"
    hook_name: str = DAS_HOOK


def build_artifact(name: str = RESID3_SAE, *, progress: bool = True, out_dir: Path | None = None) -> None:
    """Train the block-3 TopK SAE with its shipped recipe and write its folder (with provenance and checksums)."""
    if name != RESID3_SAE:
        raise KeyError(f"{name!r} is not built here; this module builds {RESID3_SAE}")
    out_dir = Path(out_dir) if out_dir is not None else weights.WEIGHTS_DIR
    build_sae(Resid3SAERecipe(), out_dir / RESID3_SAE_FOLDER, progress=progress, artifact=name)


def load_resid3_sae(device: str | None = None):
    """The TopK SAE on blocks.3.hook_resid_pre shipped for chapter 07, verified against the bundled model."""
    return load_shipped(SAE, weights.WEIGHTS_DIR / RESID3_SAE_FOLDER, device=device)


def room_token_ids(model) -> Tensor:
    return torch.tensor([model.to_single_token(r) for r in TW.ROOMS])


def room_interchange_pairs(model, n: int, seed: int = 0, moves: int = 0, rooms: list[str] | None = None) -> dict:
    """Base and source prompts that differ only in the asked-about person's room (at its last statement).

    Returns a dict: "base", "source" [n, pos] token ids; "base_answer", "source_answer" [n] token ids
    of the two rooms; "base_label", "source_label" [n] indices into ROOMS; "candidates" the room ids.
    `rooms` restricts both rooms of the asked-about person to that list (e.g. two rooms).
    """
    rng = random.Random(f"interchange-{seed}-{moves}")
    allowed = rooms or TW.ROOMS
    base, source, bl, sl = [], [], [], []
    k = 0
    while len(base) < n:
        for p in room_prompts(4 * n, seed=1000 * seed + k, moves=moves):
            if p["room"] not in allowed:
                continue
            choices = [r for r in allowed if r not in p["words"]]
            if not choices:
                continue
            new = rng.choice(choices)
            words = list(p["words"])
            words[p["slot"]] = new
            base.append(model.to_tokens(" ".join(p["words"]))[0])
            source.append(model.to_tokens(" ".join(words))[0])
            bl.append(TW.ROOMS.index(p["room"]))
            sl.append(TW.ROOMS.index(new))
            if len(base) == n:
                break
        k += 1
    ids = room_token_ids(model)
    bl, sl = torch.tensor(bl), torch.tensor(sl)
    return dict(
        base=torch.stack(base),
        source=torch.stack(source),
        base_label=bl,
        source_label=sl,
        base_answer=ids[bl],
        source_answer=ids[sl],
        candidates=ids,
    )


def interchange(base: Tensor, source: Tensor, basis: Tensor) -> Tensor:
    """The library's interchange on a subspace (exercise `interchange_subspace`): rows of `basis` orthonormal."""
    return base + (source @ basis.T - base @ basis.T) @ basis


def iia_of(logits: Tensor, source_answer: Tensor, base_answer: Tensor, candidates: Tensor) -> float:
    """The library's IIA (exercise `interchange_accuracy`)."""
    differ = source_answer != base_answer
    prediction = candidates[logits[:, candidates].argmax(-1)]
    return (prediction == source_answer)[differ].float().mean().item()


def last_position_acts(model, tokens: Tensor, hook: str = DAS_HOOK) -> Tensor:
    """[batch, d] activations at `hook`, last position."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=[hook])
    return cache[hook][:, -1]


def intervened_logits(
    model, base: Tensor, source_acts: Tensor, basis: Tensor, hook: str = DAS_HOOK, swap: Callable | None = None
) -> Tensor:
    """Final-position logits of the base run with the subspace `basis` at `hook` (last position) taken from
    `source_acts` ([batch, d]); `swap(base_act, source_act, basis)` defaults to `interchange`.

    For a block's resid_pre hook, the run starts there from the base run's cached residual stream
    (the earlier blocks do not depend on the intervention), which makes training much cheaper."""
    swap = swap or interchange

    def edit(act, hook=None):
        new = swap(act[:, -1], source_acts, basis)
        return torch.cat([act[:, :-1], new[:, None]], dim=1)

    start = _resid_pre_layer(hook)
    if start is not None:
        if isinstance(base, Tensor) and base.dtype.is_floating_point:
            resid = base  # already the cached residual stream at the hook
        else:
            with torch.no_grad():
                _, cache = model.run_with_cache(base.to(model.cfg.device), names_filter=[hook])
            resid = cache[hook]
        return model(edit(resid), start_at_layer=start)[:, -1]
    return model.run_with_hooks(base.to(model.cfg.device), fwd_hooks=[(hook, edit)])[:, -1]


def _resid_pre_layer(hook: str) -> int | None:
    parts = hook.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] == "hook_resid_pre":
        return int(parts[1])
    return None


def subspace_iia(model, pairs: dict, basis: Tensor, hook: str = DAS_HOOK) -> float:
    """IIA of the interchange intervention on `basis` ([k, d], orthonormal rows) over `pairs`."""
    src = last_position_acts(model, pairs["source"], hook)
    with torch.no_grad():
        logits = intervened_logits(model, pairs["base"], src, basis.to(src.dtype), hook)
    return iia_of(logits, pairs["source_answer"], pairs["base_answer"], pairs["candidates"])


class Rotation(nn.Module):
    """k orthonormal rows in d dimensions (the first k rows of DAS's rotation), via torch's orthogonal parametrization."""

    def __init__(self, d: int, k: int, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            with torch.enable_grad():
                self.proj = nn.utils.parametrizations.orthogonal(nn.Linear(d, k, bias=False))

    @property
    def basis(self) -> Tensor:
        return self.proj.weight  # [k, d], orthonormal rows


def train_das(
    model,
    pairs: dict,
    k: int,
    hook: str = DAS_HOOK,
    steps: int = 150,
    lr: float = 0.01,
    seed: int = 0,
    progress: Callable | None = None,
) -> Tensor:
    """Distributed alignment search: learn a k-dim subspace at `hook` (last position) such that the
    interchange intervention makes the model predict the source's room (cross-entropy over the rooms,
    full batch, Adam). Only the rotation is trained; the model is frozen. Returns the basis [k, d]."""
    rot = Rotation(model.cfg.d_model, k, seed)
    opt = torch.optim.Adam(rot.parameters(), lr=lr)
    src = last_position_acts(model, pairs["source"], hook)
    cand = pairs["candidates"]
    target = pairs["source_label"]
    base = pairs["base"]
    if _resid_pre_layer(hook) is not None:  # cache the base run up to the hook once
        with torch.no_grad():
            _, cache = model.run_with_cache(base.to(model.cfg.device), names_filter=[hook])
        base = cache[hook]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    it = range(steps)
    try:
        with torch.enable_grad():
            for _ in progress(it, desc=f"DAS k={k}") if progress else it:
                logits = intervened_logits(model, base, src, rot.basis, hook)
                loss = nn.functional.cross_entropy(logits[:, cand], target)
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    with torch.no_grad():
        return rot.basis.detach().clone()


def top_features(acts: Tensor, labels: Tensor, k: int) -> Tensor:
    """Indices of the k features whose activations separate the classes best (between-class share of variance)."""
    total = acts.var(0) + 1e-8
    means = torch.stack([acts[labels == c].mean(0) for c in labels.unique()])
    return (means.var(0) / total).argsort(descending=True)[:k]


def probe_bases(model, pairs: dict, k: int, hook: str = DAS_HOOK) -> dict[str, Tensor]:
    """Subspaces from the chapter-01 probes, fitted on the base prompts' activations (label = room):
    the span of the class means minus their average (mass-mean) and of the logistic probe's class
    weights minus their average (softmax ignores a shared shift). Both have rank <= n_rooms - 1;
    the first k directions of each (QR order) are kept."""
    x = last_position_acts(model, pairs["base"], hook)
    y = pairs["base_label"]
    n_cls = len(TW.ROOMS)
    present = [c for c in range(n_cls) if (y == c).any()]
    means = torch.stack([x[y == c].mean(0) for c in present])
    mass = orthonormal_basis((means - means.mean(0)).T)[:, :k].T
    w, _ = fit_probe(x, y, n_cls)
    w = w[:, present]
    logistic = orthonormal_basis(w - w.mean(1, keepdim=True))[:, :k].T
    return {"mass-mean probe": mass.contiguous(), "logistic probe": logistic.contiguous()}


def dictionary_basis(model, pairs: dict, directions: Tensor, encode: Callable, hook: str, k: int) -> Tensor:
    """The span of the k dictionary features (rows of `directions` [n_features, d]) whose activations
    (`encode` of the activations at `hook`, last position) best separate the rooms."""
    with torch.no_grad():
        acts = encode(last_position_acts(model, pairs["base"], hook))
    top = top_features(acts, pairs["base_label"], k)
    return orthonormal_basis(directions[top].T.double()).T.float().contiguous()


def random_basis(d: int, k: int, seed: int = 0) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed)))
    return q.T.contiguous()


# --- the dormant-pathway illusion (Makelov et al. 2023) -------------------------------------------------------


def mlp_patch_flip_rate(model, pairs: dict, layer: int, v: Tensor) -> tuple[float, float]:
    """(IIA, mean shift of logit(source room) - logit(base room)) when the MLP's hidden activation
    (hook_post, last position) is patched along the unit vector v (1-d interchange)."""
    hook = f"blocks.{layer}.mlp.hook_post"
    v = (v / v.norm()).to(torch.float32)[None]
    src = last_position_acts(model, pairs["source"], hook)
    with torch.no_grad():
        logits = intervened_logits(model, pairs["base"], src, v, hook)
        clean = model(pairs["base"].to(model.cfg.device))[:, -1]
    rows = torch.arange(len(logits))

    def gap(lg):
        return lg[rows, pairs["source_answer"]] - lg[rows, pairs["base_answer"]]

    return iia_of(logits, pairs["source_answer"], pairs["base_answer"], pairs["candidates"]), float(
        (gap(logits) - gap(clean)).mean()
    )


def dormant_patch_demo(model, pairs: dict, layer: int = 3, room_a: str = "kitchen", room_b: str = "garden") -> dict:
    """Build Makelov et al.'s illusory 1-d subspace in MLP `layer`'s hidden activations (last position)
    for a two-room variable, and decompose it.

    - u_null: the difference of the mean hidden activation between the two rooms, projected onto the
      null space of W_out (what the MLP writes ignores it): it varies with the room but is disconnected.
    - u_dormant: a row-space direction (downstream reads it) that moves the MLP's direct logit
      difference room_a - room_b most per unit of its variation across the pairs: the base and source
      activations barely differ along it, so patching it alone changes little.
    - v = u_null / |u_null| + u_dormant / |u_dormant|, normalised.

    Returns the flip rates (IIA) of the 1-d patch along v, along its null-space part alone, along
    its row-space part alone, and along the variable's own row-space direction (the row-space part
    of the mean difference), plus the norms of each part of v.
    """
    w_out = model.blocks[layer].mlp.W_out.detach().double()  # [d_mlp, d_model]
    hook = f"blocks.{layer}.mlp.hook_post"
    acts = last_position_acts(model, pairs["base"], hook).double()
    a, b = TW.ROOMS.index(room_a), TW.ROOMS.index(room_b)
    lab = pairs["base_label"]
    diff = acts[lab == a].mean(0) - acts[lab == b].mean(0)
    # projector onto the row space of W_out (the hidden directions whose output is non-zero)
    u, s, _ = torch.linalg.svd(w_out, full_matrices=False)
    row = u[:, s > 1e-6 * s.max()]
    p_row = row @ row.T
    u_null = diff - p_row @ diff
    w_u = model.W_U.detach().double()
    target = w_u[:, model.to_single_token(room_a)] - w_u[:, model.to_single_token(room_b)]
    reader = w_out @ target  # the hidden direction whose dot product is the MLP's direct logit difference
    # the direction that moves that readout most per unit of variation across the pairs: (C + lam I)^-1 reader,
    # with C the covariance of (source - base) activations inside the row space
    src = last_position_acts(model, pairs["source"], hook).double()
    delta = (src - acts) @ p_row
    cov = delta.T @ delta / len(delta)
    lam = 1e-3 * cov.trace() / cov.shape[0]
    u_dormant = p_row @ torch.linalg.solve(cov + lam * torch.eye(cov.shape[0], dtype=cov.dtype), reader)
    v = u_null / u_null.norm() + u_dormant / u_dormant.norm()
    v = v / v.norm()
    v_row, v_null = p_row @ v, v - p_row @ v
    variable_row = p_row @ diff
    spread = lambda direction: float((acts @ (direction / direction.norm())).std())  # noqa: E731
    return {
        "v": v.float(),
        "u_null": (u_null / u_null.norm()).float(),
        "u_dormant": (u_dormant / u_dormant.norm()).float(),
        "flip v": mlp_patch_flip_rate(model, pairs, layer, v),
        "flip null-space part": mlp_patch_flip_rate(model, pairs, layer, v_null),
        "flip row-space part": mlp_patch_flip_rate(model, pairs, layer, v_row),
        "flip variable's row-space direction": mlp_patch_flip_rate(model, pairs, layer, variable_row),
        "norm row part": float(v_row.norm()),
        "norm null part": float(v_null.norm()),
        "spread null part": spread(v_null),
        "spread row part": spread(v_row),
    }
