"""The logit lens and the tuned lens (chapter 02): read-out points, the `TunedLens` module, its data,
training, evaluation, and the translators shipped for the bundled model.

- Where a lens reads: `lens_hook_names`, `lens_labels`, `residual_stack`.
- The tuned lens (Belrose et al., 2023): one affine translator h -> h + A h + b per read-out
  point but the last, read out by the model's own final norm and unembedding
  (`tuned_lens_logits`), trained on the mean KL to the model's output (`tuned_lens_loss`,
  `train_tuned_lens`), with the shipped recipe in `TunedLensConfig`.
- Data and evaluation: `lens_docs`, `lens_batch`, `positions_to_read`, `collect_lens_data`,
  `rows_per_batch`, `evaluate_lenses`, `answer_lens_logits`, `answer_emergence`.
- The training loop of the recipe on collected data: `fit_translators` (its schedule: `lr_factor`).
- Checking a lens reading causally: `fact_prompts`, `template_mean_ablation`, `bootstrap_ci`, and the
  controls for what a translator computes by itself, `shuffled_copy` and `residual_at`.
- The shipped translators (``interplab/weights/tuned_lens``): `load_tuned_lens` verifies
  their checksums and refuses translators trained on other model weights;
  `interplab rebuild --only tuned_lens` retrains them (`build_artifact`, under a minute on
  2 CPU cores), and ``python -m interplab.lenses --evaluate`` prints their per-point table.

`kl_to_final`, `lens_entropy`, `correct_token_rank`, `tuned_lens_logits`, `tuned_lens_loss`
and (as `fit_translators`) `fit_tuned_lens` are also exercises of chapter 02: the versions here
are the library's own, and tests hold them to the exercises' cases.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import artifacts, tinyworld, weights
from .hooks import act_name
from .models import is_tinyworld, load_model
from .progress import progress as progress_bar

TUNED_LENS_FILE = "tuned_lens.safetensors"
TUNED_LENS_INFO = "training.json"
ARTIFACT = "tuned_lens"


# --- where a lens reads ------------------------------------------------------------------------------------


def lens_hook_names(n_layers: int, incl_mid: bool = False) -> list[str]:
    """The residual-stream hook points a lens reads, in order.

    ``blocks.0.hook_resid_pre`` (the embeddings), then for each layer L its
    ``blocks.L.hook_resid_mid`` (after the attention sublayer; only with ``incl_mid``)
    and ``blocks.L.hook_resid_post`` (after the whole block). The last one is the
    residual stream the model itself unembeds.
    """
    names = [act_name("resid_pre", 0)]
    for layer in range(n_layers):
        if incl_mid:
            names.append(act_name("resid_mid", layer))
        names.append(act_name("resid_post", layer))
    return names


def lens_labels(n_layers: int, incl_mid: bool = False) -> list[str]:
    """Short labels of `lens_hook_names` for tables and plots: "resid_pre 0", "resid_mid 0", "resid_post 0", ..."""
    labels = []
    for name in lens_hook_names(n_layers, incl_mid):
        _, layer, hook = name.split(".")
        labels.append(f"{hook.removeprefix('hook_')} {layer}")
    return labels


def residual_stack(
    model, tokens: Int[Tensor, "batch pos"], incl_mid: bool = False
) -> Float[Tensor, "point batch pos d_model"]:
    """The residual stream at every point of `lens_hook_names`, stacked (no gradients)."""
    names = lens_hook_names(model.cfg.n_layers, incl_mid)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    return torch.stack([cache[name] for name in names])


def read_out(model, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """The logit lens on residual vectors: the model's final layer norm, then its unembedding."""
    return model.unembed(model.ln_final(resid))


# --- comparing a read-out with the model's output --------------------------------------------------------------


def kl_to_final(
    lens_logits: Float[Tensor, "point *batch d_vocab"], final_logits: Float[Tensor, "*batch d_vocab"]
) -> Float[Tensor, " point *batch"]:
    """KL(p || q) in nats, p = softmax(final_logits) the model's output and q = softmax(lens_logits[point])."""
    log_p = final_logits.log_softmax(dim=-1)
    log_q = lens_logits.log_softmax(dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def lens_entropy(logits: Float[Tensor, "*batch d_vocab"]) -> Float[Tensor, " *batch"]:
    """Entropy of softmax(logits), in nats."""
    log_p = logits.log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def correct_token_rank(
    logits: Float[Tensor, "*batch d_vocab"], targets: Int[Tensor, " *batch"]
) -> Int[Tensor, " *batch"]:
    """How many tokens have a strictly larger logit than the target (0 when the target is the top-1)."""
    return (logits > logits.gather(-1, targets[..., None])).sum(dim=-1)


# --- the tuned lens ---------------------------------------------------------------------------------------------


def tuned_lens_logits(
    model,
    resid: Float[Tensor, "layer *batch d_model"],
    A: Float[Tensor, "layer d_model d_model"],
    b: Float[Tensor, "layer d_model"],
) -> Float[Tensor, "layer *batch d_vocab"]:
    """Translate layer l's residual vectors h to h + A[l] h + b[l], then read them out like the final one."""
    flat = resid.reshape(resid.shape[0], -1, resid.shape[-1])  # [layer, n, d_model]
    translated = flat + torch.bmm(flat, A.transpose(1, 2)) + b[:, None, :]  # row-vector form of h + A h + b
    return read_out(model, translated.reshape(resid.shape))


def tuned_lens_loss(
    model,
    resid: Float[Tensor, "layer *batch d_model"],
    A: Float[Tensor, "layer d_model d_model"],
    b: Float[Tensor, "layer d_model"],
    final_logits: Float[Tensor, "*batch d_vocab"],
    mask: Bool[Tensor, " *batch"] | None = None,
) -> Float[Tensor, ""]:
    """The mean over layers and (masked) positions of KL(model || tuned lens): the tuned lens's training loss."""
    kl = kl_to_final(tuned_lens_logits(model, resid, A, b), final_logits)  # [layer, *batch]
    if mask is not None:
        kl = kl[:, mask]
    return kl.mean()


# --- the tuned lens as a module ---------------------------------------------------------------------------


class TunedLens(nn.Module):
    """One affine translator h -> h + A h + b per read-out point but the last, initialised at zero.

    The read-out points are `lens_hook_names(n_layers)`: the embeddings and the residual
    stream after each block. The last point is the model's own final residual stream,
    which needs no translation (its lens *is* the model), so there are n_layers
    translators, stored as ``A`` [n_layers, d_model, d_model] and ``b`` [n_layers, d_model].
    """

    def __init__(self, d_model: int, n_layers: int):
        super().__init__()
        self.d_model, self.n_layers = d_model, n_layers
        self.A = nn.Parameter(torch.zeros(n_layers, d_model, d_model))
        self.b = nn.Parameter(torch.zeros(n_layers, d_model))

    @classmethod
    def for_model(cls, model) -> TunedLens:
        """A zero-initialised tuned lens (equal to the logit lens) for ``model``, on its device."""
        device = next(model.parameters()).device
        return cls(model.cfg.d_model, model.cfg.n_layers).to(device)

    def forward(self, model, resid: Float[Tensor, "point *batch d_model"]) -> Float[Tensor, "point *batch d_vocab"]:
        """Tuned-lens logits at every read-out point (the last one untranslated).

        Args:
            model: the HookedTransformer the lens was trained for.
            resid: the residual stream at all n_layers + 1 points of `lens_hook_names`.
        """
        if resid.shape[0] != self.n_layers + 1:
            raise ValueError(
                f"resid has {resid.shape[0]} read-out points; this lens needs n_layers + 1 = "
                f"{self.n_layers + 1} (residual_stack(model, tokens) without incl_mid)"
            )
        translated = tuned_lens_logits(model, resid[:-1], self.A, self.b)
        final = read_out(model, resid[-1:])
        return torch.cat([translated, final])

    def logits(self, model, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "point batch pos d_vocab"]:
        """Tuned-lens logits for token ids (no gradients)."""
        with torch.no_grad():
            return self(model, residual_stack(model, tokens))


# --- data ------------------------------------------------------------------------------------------------


def lens_batch(model, docs) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """Token ids and a mask of real tokens for TinyWorld documents, through the model's own tokenizer.

    For the TinyWorld model this is `tinyworld.batch_tokens`; for another model (e.g.
    gpt2-small) each document's text is tokenised by its tokenizer after a BOS token and
    right-padded (`tinyworld.tokens_for`).
    """
    encoded = tinyworld.tokens_for(model, docs)
    return encoded.ids, encoded.mask


def rows_per_batch(model, n_points: int, n_pos: int, max_elements: float = 2.5e7, at_most: int = 50) -> int:
    """How many sequences to read through a lens at once: the logits of every read-out point,
    [n_points, rows, n_pos, d_vocab], stay under ``max_elements`` numbers (100 MB in float32).

    With TinyWorld's small vocabulary this is ``at_most``; with gpt2-small's 50,257 tokens, one
    or two sequences of TinyWorld text at a time.
    """
    return max(1, min(at_most, int(max_elements // (n_points * n_pos * model.cfg.d_vocab))))


def collect_lens_data(
    model,
    tokens: Int[Tensor, "batch pos"],
    mask: Bool[Tensor, "batch pos"],
    batch_size: int = 128,
    progress: bool = False,
) -> tuple[Float[Tensor, "point n d_model"], Float[Tensor, "n d_vocab"], Int[Tensor, " n"], Bool[Tensor, " n"]]:
    """Residual streams, final logits and next tokens at the kept positions of ``mask``, flattened.

    Sequences are processed shortest first (so that a batch carries little padding); the
    positions come out in that order.

    Returns (resid [n_layers + 1, n, d_model], final_logits [n, d_vocab], next_token [n],
    has_next [n]): ``next_token`` is the token that follows each kept position and
    ``has_next`` says whether there is one (False at a document's last token). ``progress`` shows a bar over
    the batches.
    """
    device = next(model.parameters()).device
    names = lens_hook_names(model.cfg.n_layers)
    # bound the output logits of one batch, [batch, pos, d_vocab], to about 5e7 numbers (gpt2-small: a few sequences)
    batch_size = max(1, min(batch_size, int(5e7 // (tokens.shape[1] * model.cfg.d_vocab))))
    nxt = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
    has = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1) & mask
    order = _row_order(mask)  # similar lengths together: little padding per batch
    resids, finals, nexts, hases = [], [], [], []
    with torch.no_grad():
        starts = range(0, tokens.shape[0], batch_size)
        for start in progress_bar(starts, total=len(starts), desc="residual streams") if progress else starts:
            rows = order[start : start + batch_size]
            keep = mask[rows]
            if not keep.any():
                continue
            width = int(keep.any(0).nonzero().max()) + 1  # drop all-padding columns
            keep = keep[:, :width].to(device)
            logits, cache = model.run_with_cache(tokens[rows, :width].to(device), names_filter=names)
            resids.append(torch.stack([cache[n][keep] for n in names]))
            finals.append(logits[keep])
            nexts.append(nxt[rows, :width].to(device)[keep])
            hases.append(has[rows, :width].to(device)[keep])
    return torch.cat(resids, 1), torch.cat(finals), torch.cat(nexts), torch.cat(hases)


def _row_order(mask: Bool[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
    """The order in which `collect_lens_data` (and `residual_at`) visit the sequences: shortest first."""
    return mask.sum(1).argsort()


def lens_docs(n: int, seed: int = 0, split: str = "train", families: Sequence[str] | None = None):
    """TinyWorld documents for training (split "train") or evaluating (split "test") a lens."""
    return tinyworld.generate(n, seed=seed, split=split, families=families)


def positions_to_read(mask: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """The positions a lens is trained and evaluated on: every real token but the first (<bos>).

    The residual stream at <bos> is an outlier in most models (it is where attention
    heads park when they have nothing to do) and carries no information about the text.
    """
    keep = mask.clone()
    keep[:, 0] = False
    return keep


# --- training --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TunedLensConfig:
    """The recipe of a tuned lens; the defaults are the translators shipped for the bundled model.

    Training data: ``n_docs`` TinyWorld documents of the "train" split drawn with ``seed``
    (every real token but <bos>). Optimisation: ``steps`` steps of Adam on random batches of
    ``batch_size`` positions (drawn with ``seed``) at learning rate ``lr``, warming up over
    the first 5% of the steps and decaying linearly to zero. ``eval_docs`` test-split
    documents evaluate the result when the artifact is built.
    """

    n_docs: int = 2000
    seed: int = 0
    steps: int = 1000
    batch_size: int = 512
    lr: float = 1e-2
    weight_decay: float = 0.0
    eval_docs: int = 1000

    def with_overrides(self, **overrides) -> TunedLensConfig:
        """A copy with some fields changed; a clear error names the fields when one is unknown."""
        fields = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise TypeError(f"unknown tuned-lens settings {unknown}; the settings are {fields}")
        return dataclasses.replace(self, **overrides)


def lr_factor(step: int, steps: int) -> float:
    """The learning-rate schedule of the recipe, as a factor of the peak: a linear warm-up over the first 5% of
    the steps (at least one), then a linear decay that reaches lr / (steps - warm-up) at the last step."""
    warmup = max(1, steps // 20)
    return min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup)))


def fit_translators(
    model,
    lens: TunedLens,
    resid: Float[Tensor, "layer n d_model"],
    final_logits: Float[Tensor, "n d_vocab"],
    config: TunedLensConfig | None = None,
    *,
    loss_fn: Callable = tuned_lens_loss,
    progress: bool = True,
    desc: str = "translators",
) -> tuple[Float[Tensor, " steps"], Float[Tensor, " steps"]]:
    """The training loop of the recipe, on data already collected: Adam on ``loss_fn`` over random batches.

    Fits ``lens.A`` and ``lens.b`` in place (``resid`` has one row per translator). Each step draws
    ``config.batch_size`` positions with a generator seeded with ``config.seed`` (all positions when the batch
    is at least ``n``); the learning rate follows `lr_factor`. The model is frozen while it runs and its
    ``requires_grad`` flags are restored after. Returns the loss of each step's batch (before the step's update)
    and the learning rate each step used.
    """
    cfg = config or TunedLensConfig()
    n, steps = resid.shape[1], cfg.steps
    opt = torch.optim.Adam(lens.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    losses, lrs = [], []
    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with torch.enable_grad():
            for _ in progress_bar(range(steps), total=steps, desc=desc) if progress else range(steps):
                if cfg.batch_size >= n:
                    idx = torch.arange(n, device=resid.device)
                else:
                    idx = torch.randint(0, n, (cfg.batch_size,), generator=gen).to(resid.device)
                loss = loss_fn(model, resid[:, idx], lens.A, lens.b, final_logits[idx])
                lrs.append(opt.param_groups[0]["lr"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.detach().item())
    finally:
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
    return torch.tensor(losses), torch.tensor(lrs)


def train_tuned_lens(
    model,
    docs=None,
    config: TunedLensConfig | None = None,
    *,
    loss_fn: Callable = tuned_lens_loss,
    lens: TunedLens | None = None,
    progress: bool = True,
    **overrides,
) -> tuple[TunedLens, dict]:
    """Train a tuned lens on TinyWorld text: Adam on the mean KL to the model's output.

    The model is frozen: its residual streams and output logits are computed once
    (`collect_lens_data`) and the translators are then fitted on random batches of
    positions, with a learning rate that warms up over the first 5% of the steps and
    decays linearly to zero.

    Args:
        model: a HookedTransformer.
        docs: training documents (default: ``config.n_docs`` TinyWorld documents of the
            "train" split drawn with ``config.seed``).
        config: the recipe (default: `TunedLensConfig()`, the shipped one).
        loss_fn: the loss, called as loss_fn(model, resid, A, b, final_logits); the
            chapter passes the learner's `tuned_lens_loss` here.
        lens: a lens to continue training (default: a fresh, zero-initialised one).
        progress: show a progress bar.
        **overrides: fields of the config to change, e.g. ``steps=50``.

    Returns:
        (the trained lens, a dict of training information: data, settings, losses, seconds).
    """
    cfg = (config or TunedLensConfig()).with_overrides(**overrides)
    t0, c0 = time.perf_counter(), time.process_time()
    docs = lens_docs(cfg.n_docs, seed=cfg.seed, split="train") if docs is None else docs
    tokens, mask = lens_batch(model, docs)
    resid, final, _, _ = collect_lens_data(model, tokens, positions_to_read(mask))
    t_data = time.perf_counter() - t0
    lens = TunedLens.for_model(model) if lens is None else lens
    n = resid.shape[1]
    steps = cfg.steps
    losses, _ = fit_translators(
        model, lens, resid[:-1], final, cfg, loss_fn=loss_fn, progress=progress, desc="tuned lens"
    )
    info = {
        "model": model.cfg.model_name,
        "n_layers": model.cfg.n_layers,
        "d_model": model.cfg.d_model,
        "n_docs": len(docs),
        "split": "train",
        "seed": cfg.seed,
        "n_positions": n,
        "steps": steps,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "optimizer": "Adam",
        "schedule": "linear warm-up (5% of steps), then linear decay to 0",
        "first_loss": round(float(losses[0]), 5) if len(losses) else None,
        "last_loss": round(float(losses[-20:].mean()), 5) if len(losses) else None,
        "seconds_data": round(t_data, 2),
        "seconds_total": round(time.perf_counter() - t0, 2),
        "cpu_seconds_total": round(time.process_time() - c0, 2),
        "torch_threads": torch.get_num_threads(),
    }
    return lens.eval(), info


# --- evaluation ---------------------------------------------------------------------------------------------


def evaluate_lenses(model, lens: TunedLens | None, docs, batch_size: int = 128) -> dict[str, list[float]]:
    """Per-point metrics of the logit lens (and the tuned lens, if given) on documents.

    Every real position but <bos> counts. Returns lists with one value per read-out point
    (`lens_labels(n_layers)`): ``kl_logit``/``kl_tuned`` (mean KL to the model's output, nats),
    ``ce_logit``/``ce_tuned`` (mean cross-entropy against the actual next token, nats),
    ``entropy_logit``/``entropy_tuned``, ``top1_logit``/``top1_tuned`` (how often the lens's
    top-1 equals the model's), and ``labels``.
    """
    tokens, mask = lens_batch(model, docs)
    resid, final, nxt, has = collect_lens_data(model, tokens, positions_to_read(mask), batch_size)
    out: dict[str, list] = {"labels": lens_labels(model.cfg.n_layers), "n_positions": [int(resid.shape[1])]}
    lenses = {"logit": None}
    if lens is not None:
        lenses["tuned"] = lens
    with torch.no_grad():
        for name, tl in lenses.items():
            sums = {k: torch.zeros(resid.shape[0]) for k in ("kl", "ce", "entropy", "top1")}
            for start in range(0, resid.shape[1], 4096):
                r = resid[:, start : start + 4096]
                f = final[start : start + 4096]
                logits = read_out(model, r) if tl is None else tl(model, r)
                h = has[start : start + 4096]
                sums["kl"] += kl_to_final(logits, f).sum(-1).cpu()
                sums["entropy"] += lens_entropy(logits).sum(-1).cpu()
                sums["top1"] += (logits.argmax(-1) == f.argmax(-1)).float().sum(-1).cpu()
                lp = logits[:, h].log_softmax(-1)
                sums["ce"] += (
                    -lp.gather(-1, nxt[start : start + 4096][h][None, :, None].expand(lp.shape[0], -1, 1))[..., 0]
                    .sum(-1)
                    .cpu()
                )
            n, n_next = resid.shape[1], int(has.sum())
            for k, v in sums.items():
                out[f"{k}_{name}"] = [round(float(x) / (n_next if k == "ce" else n), 5) for x in v]
    return out


def answer_lens_logits(
    model, docs, lens: TunedLens | None = None
) -> tuple[Float[Tensor, "point n d_vocab"], Int[Tensor, " n"], list[tuple[int, int]]]:
    """Lens logits at every answer position of TinyWorld documents (logit lens, or ``lens`` if given).

    Returns (logits [n_layers + 1, n_answers, d_vocab], the answer token ids [n_answers],
    the (document, position) of each answer).
    """
    if not is_tinyworld(model):
        raise ValueError("answer positions are TinyWorld annotations; use the TinyWorld model")
    tokens, _ = lens_batch(model, docs)
    where = [(i, p) for i, d in enumerate(docs) for p in d.answer_positions]
    resid = residual_stack(model, tokens)
    rows = torch.tensor([i for i, _ in where]), torch.tensor([p for _, p in where])
    r = resid[:, rows[0], rows[1]]
    with torch.no_grad():
        logits = read_out(model, r) if lens is None else lens(model, r)
    answers = torch.tensor([tinyworld.token_id(docs[i].answer[p]) for i, p in where])
    return logits, answers, where


def answer_emergence(
    lens_logits: Float[Tensor, "point *batch d_vocab"], answers: Int[Tensor, " *batch"]
) -> Int[Tensor, " *batch"]:
    """The first read-out point from which the right answer is the lens's top-1 and stays top-1.

    n_points where the right answer is not even the model's own top-1.
    """
    top1 = (correct_token_rank(lens_logits, answers.expand(lens_logits.shape[:-1])) == 0).long()
    stays = top1.flip(0).cumprod(dim=0).flip(0)
    return lens_logits.shape[0] - stays.sum(dim=0)


# --- checking a lens reading causally -----------------------------------------------------------------------------


def fact_prompts() -> list:
    """One single-fact prompt per (person, relation) of the cast: every statement ("Iris works as a") and every
    question asked in training ("where does Eve live ?"), each ending where the answer comes next."""
    docs = []
    for question in (False, True):
        for person in tinyworld.CAST:
            for relation, (statement, query, _) in tinyworld.RELATIONS.items():
                if question and (person, relation) in tinyworld.WORLD.heldout_queries:
                    continue
                doc = tinyworld.Doc("facts", meta={"person": person, "relation": relation, "question": question})
                doc.add((query if question else statement).split("{V}")[0].format(P=person))
                doc.answer[-1] = tinyworld.WORLD.value(person, relation)
                docs.append(doc)
    return docs


def bootstrap_ci(values: Tensor, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """A percentile bootstrap interval of the mean of ``values`` (resampling the prompts with replacement)."""
    values = values.float().flatten().cpu()
    gen = torch.Generator().manual_seed(seed)
    means = values[torch.randint(0, len(values), (n_boot, len(values)), generator=gen)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2]))
    return float(lo), float(hi)


def template_mean_ablation(model, docs, component: str, layer: int) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"]]:
    """Ablate one sublayer's output at each prompt's answer position and read the answer.

    ``component`` is "mlp_out" or "attn_out". The sublayer's output at the answer position is replaced by its
    mean over the prompts of the same template (same relation, same form, same length: the other people's
    versions of the same question), so what every version shares is kept and only what depends on the person
    is removed. Returns (the model's top-1 is the answer, log-probability of the answer), one per prompt.
    """
    tokens, rows, pos, _ = _prompt_answers(model, docs)
    name = act_name(component, layer)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=name)
        acts = cache[name][rows, pos]
        groups: dict[tuple, list[int]] = {}
        for i, d in enumerate(docs):
            groups.setdefault((d.meta.get("relation"), d.meta.get("question"), len(d.tokens)), []).append(i)
        means = torch.zeros_like(acts)
        for idx in groups.values():
            means[idx] = acts[idx].mean(0)

        def patch(act, hook):
            act = act.clone()
            act[rows, pos] = means
            return act

        return answer_scores(model, docs, fwd_hooks=[(name, patch)])


def _prompt_answers(model, docs):
    """Token ids of single-answer prompts, the (row, position) of each answer position, and the answer ids."""
    if not is_tinyworld(model):
        raise ValueError("answer positions are TinyWorld annotations; use the TinyWorld model")
    device = next(model.parameters()).device
    tokens, _ = lens_batch(model, docs)
    pos = torch.tensor([d.answer_positions[0] for d in docs], device=device)
    answers = torch.tensor([tinyworld.token_id(d.answer[d.answer_positions[0]]) for d in docs], device=device)
    return tokens.to(device), torch.arange(len(docs), device=device), pos, answers


def answer_scores(model, docs, fwd_hooks=()) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"]]:
    """For prompts with one answer position each: whether the model's top-1 there is the answer (1.0 or 0.0) and
    the answer's log-probability, with ``fwd_hooks`` applied (none: the model as it is)."""
    tokens, rows, pos, answers = _prompt_answers(model, docs)
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))[rows, pos]
    logp = logits.log_softmax(-1)[rows, answers]
    return (logits.argmax(-1) == answers).float().cpu(), logp.cpu()


def shuffled_copy(model, prefix: str, seed: int = 0):
    """A copy of ``model`` whose parameters under ``prefix`` (e.g. "blocks.0.mlp") have their entries randomly
    permuted: the same values, the same scale, none of the learned structure. The rest is shared unchanged."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    found = False
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name.startswith(prefix):
                perm = torch.randperm(p.numel(), generator=gen).to(p.device)
                p.copy_(p.flatten()[perm].view_as(p))
                found = True
    if not found:
        raise ValueError(f"no parameter of the model starts with {prefix!r}")
    return other


def residual_at(
    model, tokens: Int[Tensor, "batch pos"], keep: Bool[Tensor, "batch pos"], point: str, batch_size: int = 256
) -> Float[Tensor, "n d_model"]:
    """The residual stream at hook ``point`` (a `lens_hook_names` entry) at the kept positions, running the model
    only as far as that point. The positions come out in the order of `collect_lens_data` on the same ``keep``,
    so the two line up (e.g. with its final logits)."""
    layer = int(point.split(".")[1])
    stop = layer + 1 if point.endswith(("resid_post", "resid_mid")) else layer
    device = next(model.parameters()).device
    order = _row_order(keep)
    out = []
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            rows = order[start : start + batch_size]
            _, cache = model.run_with_cache(tokens[rows].to(device), names_filter=point, stop_at_layer=max(1, stop))
            out.append(cache[point][keep[rows].to(device)])
    return torch.cat(out)


# --- the shipped translators -----------------------------------------------------------------------------------


def default_folder() -> Path:
    """Where the shipped translators live: ``interplab/weights/tuned_lens``."""
    return weights.WEIGHTS_DIR / "tuned_lens"


def save_tuned_lens(lens: TunedLens, folder: str | Path, info: dict, config: TunedLensConfig) -> Path:
    """Write a tuned lens of the bundled TinyWorld model: its translators (safetensors), its training information
    (json), its provenance (the model's hash and ``config``) and SHA256SUMS."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {"A": lens.A.detach().cpu().contiguous(), "b": lens.b.detach().cpu().contiguous()},
        str(folder / TUNED_LENS_FILE),
    )
    (folder / TUNED_LENS_INFO).write_text(json.dumps(info, indent=2) + "\n")
    artifacts.write_provenance(folder, ARTIFACT, config)
    weights.write_checksums(folder)
    return folder


def load_tuned_lens(model=None, folder: str | Path | None = None) -> TunedLens:
    """The shipped tuned lens of the bundled TinyWorld model, verified before it is loaded.

    Args:
        model: the model to use it with (checked for a matching shape; moves the lens to
            its device).
        folder: a folder written by `save_tuned_lens` (default: the shipped one).

    Raises:
        CorruptedFileError: a file is missing or does not match its checksum.
        ArtifactModelMismatch: the translators were trained on other TinyWorld weights than the
            bundled ones (the message names both hashes and ``interplab rebuild --only tuned_lens``).
        ValueError: the lens does not fit ``model`` (e.g. gpt2-small: train one with
            `train_tuned_lens(model)` instead).
    """
    folder = default_folder() if folder is None else Path(folder)
    weights.verify(folder, [TUNED_LENS_FILE, TUNED_LENS_INFO])
    artifacts.require_model_match(folder)
    info = json.loads((folder / TUNED_LENS_INFO).read_text())
    try:
        state = load_file(str(folder / TUNED_LENS_FILE))
    except Exception as e:
        raise weights.CorruptedFileError(f"could not read {folder / TUNED_LENS_FILE}: {e}") from e
    n_layers, d_model = state["b"].shape
    lens = TunedLens(d_model, n_layers)
    lens.load_state_dict(state)
    if model is not None:
        if (model.cfg.n_layers, model.cfg.d_model) != (n_layers, d_model):
            raise ValueError(
                f"the tuned lens in {folder} was trained for {info.get('model', 'another model')} "
                f"({n_layers} layers, d_model {d_model}); this model has {model.cfg.n_layers} layers and d_model "
                f"{model.cfg.d_model}. Train one for it with train_tuned_lens(model)."
            )
        lens = lens.to(next(model.parameters()).device)
    lens.info = info
    return lens.eval()


def build_into(
    folder: str | Path, config: TunedLensConfig | None = None, *, progress: bool = True, threads: int = 1
) -> dict:
    """Train a tuned lens of the bundled model with ``config`` (default: the shipped recipe), evaluate it on
    held-out text and write it to ``folder``; return its training information.

    Training runs on ``threads`` torch CPU threads (1 by default: the matrices are small, and one thread's
    CPU time is an honest measure of the cost even on a busy machine).
    """
    cfg = config or TunedLensConfig()
    model = load_model("tinyworld", device="cpu")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lens, info = train_tuned_lens(model, config=cfg, progress=progress)
    finally:
        torch.set_num_threads(old)
    info["model_sha256"] = artifacts.model_sha256()
    info["command"] = f"interplab rebuild --only {ARTIFACT}"
    metrics = evaluate_lenses(model, lens, lens_docs(cfg.eval_docs, seed=0, split="test"))
    info["heldout_eval"] = {"docs": cfg.eval_docs, "split": "test", "seed": 0, **metrics}
    save_tuned_lens(lens, folder, info, cfg)
    return info


def build_artifact(name: str = ARTIFACT, *, progress: bool = True, config: TunedLensConfig | None = None) -> None:
    """Rebuild the shipped translators (`interplab rebuild --only tuned_lens`) in ``WEIGHTS_DIR/tuned_lens``.

    The new folder is written next to the old one and replaces it only once complete.
    """
    if name != ARTIFACT:
        raise ValueError(f"interplab.lenses builds the artifact {ARTIFACT!r}, not {name!r}")
    target = default_folder()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{ARTIFACT}-", dir=target.parent) as tmp:
        staged = Path(tmp) / target.name
        build_into(staged, config, progress=progress)
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)


def print_table(metrics: dict) -> None:
    """The per-point table of `evaluate_lenses`: KL to the output and cross-entropy, logit lens vs tuned lens."""
    print(f"{'point':<14} {'KL logit':>9} {'KL tuned':>9} {'CE logit':>9} {'CE tuned':>9}")
    for i, label in enumerate(metrics["labels"]):
        print(
            f"{label:<14} {metrics['kl_logit'][i]:9.4f} {metrics['kl_tuned'][i]:9.4f} "
            f"{metrics['ce_logit'][i]:9.4f} {metrics['ce_tuned'][i]:9.4f}"
        )


def main(argv: list[str] | None = None) -> None:
    import argparse  # only the command needs it

    p = argparse.ArgumentParser(
        prog="python -m interplab.lenses",
        description="Evaluate the shipped tuned lens against the logit lens on held-out TinyWorld text. "
        "(Retrain it with `interplab rebuild --only tuned_lens`.)",
    )
    p.add_argument("--evaluate", action="store_true", help="evaluate the shipped translators (the default action)")
    p.add_argument("--docs", type=int, default=TunedLensConfig().eval_docs, help="test-split documents to evaluate on")
    p.add_argument("--folder", default=None, help="a tuned-lens folder (default: the shipped one)")
    a = p.parse_args(argv)
    model = load_model("tinyworld", device="cpu")
    lens = load_tuned_lens(model, a.folder)
    print(
        f"tuned lens in {a.folder or default_folder()}: {lens.info['steps']} steps on {lens.info['n_positions']} "
        f"positions; evaluated on {a.docs} held-out documents"
    )
    print_table(evaluate_lenses(model, lens, lens_docs(a.docs, seed=0, split="test")))


if __name__ == "__main__":
    main()
