"""Chapter 2 (the logit lens and the tuned lens): reference solutions, the tuned-lens trainer and its loader.

The exercises (each function below with the exercise's name is its single source of truth):

- `logit_lens`: the final layer norm and the unembedding applied to the residual stream
  after every layer (and, optionally, after every attention sublayer), at every position.
- `kl_to_final`, `lens_entropy`, `correct_token_rank`: how far each layer's read-out is
  from the model's output, how sure it is, and where the right token ranks.
- `prediction_depth`: the first layer from which the lens's top-1 token equals the
  final top-1 and stays equal.
- `tuned_lens_logits`, `tuned_lens_loss`: the tuned lens (Belrose et al., 2023): one
  affine translator h + A h + b per layer, A and b initialised at zero, read out by the
  model's own final norm and unembedding, trained to minimise KL to the final logits.

The rest are helpers the chapter uses: `TunedLens` (the translators as a module),
`train_tuned_lens`, `evaluate_lenses`, and `load_tuned_lens` for the translators shipped
in ``interplab/weights/tuned_lens`` (verified against their SHA256SUMS before loading).
Retrain the shipped translators (takes well under a minute on 2 CPU cores) with::

    python -m interplab.solutions.ch02_lenses            # writes utils/interplab/weights/tuned_lens
    python -m interplab.solutions.ch02_lenses --out DIR  # somewhere else
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

TUNED_LENS_FILE = "tuned_lens.safetensors"
TUNED_LENS_INFO = "training.json"


# --- where the lens reads -------------------------------------------------------------------

def lens_hook_names(n_layers: int, incl_mid: bool = False) -> list[str]:
    """The residual-stream hook points a lens reads, in order.

    ``blocks.0.hook_resid_pre`` (the embeddings), then for each layer L its
    ``blocks.L.hook_resid_mid`` (after the attention sublayer; only with ``incl_mid``)
    and ``blocks.L.hook_resid_post`` (after the whole block). The last one is the
    residual stream the model itself unembeds.
    """
    names = ["blocks.0.hook_resid_pre"]
    for layer in range(n_layers):
        if incl_mid:
            names.append(f"blocks.{layer}.hook_resid_mid")
        names.append(f"blocks.{layer}.hook_resid_post")
    return names


def lens_labels(n_layers: int, incl_mid: bool = False) -> list[str]:
    """Short labels of `lens_hook_names` for tables and plots: "resid_pre 0", "resid_mid 0", "resid_post 0", ..."""
    labels = []
    for name in lens_hook_names(n_layers, incl_mid):
        _, layer, hook = name.split(".")
        labels.append(f"{hook.removeprefix('hook_')} {layer}")
    return labels


def residual_stack(model, tokens: Int[Tensor, "batch pos"], incl_mid: bool = False) -> Float[Tensor, "point batch pos d_model"]:
    """The residual stream at every point of `lens_hook_names`, stacked (no gradients)."""
    names = lens_hook_names(model.cfg.n_layers, incl_mid)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    return torch.stack([cache[name] for name in names])


# --- exercise: the logit lens ---------------------------------------------------------------

def logit_lens(model, tokens: Int[Tensor, "batch pos"], incl_mid: bool = False) -> Float[Tensor, "point batch pos d_vocab"]:
    """The logit lens: read every layer's residual stream as if it were the last one.

    Run the model with a cache, take the residual stream at the embeddings
    (``blocks.0.hook_resid_pre``), after each attention sublayer
    (``blocks.L.hook_resid_mid``, only when ``incl_mid``) and after each block
    (``blocks.L.hook_resid_post``), in that order, and apply the model's final layer
    norm (``model.ln_final``, which normalises each vector by its own statistics) and
    then its unembedding (``model.unembed``).

    Args:
        model: a HookedTransformer.
        tokens: input token ids.
        incl_mid: also read the residual stream after each attention sublayer.

    Returns:
        Logits for every read-out point: n_layers + 1 points (2 * n_layers + 1 with
        ``incl_mid``). The last point is the model's own output logits.
    """
    names = lens_hook_names(model.cfg.n_layers, incl_mid)
    _, cache = model.run_with_cache(tokens, names_filter=names)
    resid = torch.stack([cache[name] for name in names])
    return model.unembed(model.ln_final(resid))


# --- exercises: comparing a lens with the model's output ---------------------------------------

def kl_to_final(lens_logits: Float[Tensor, "point *batch d_vocab"], final_logits: Float[Tensor, "*batch d_vocab"]) -> Float[Tensor, " point *batch"]:
    """KL divergence from each lens distribution to the model's final distribution, in nats.

    For every read-out point and position, KL(p || q) = sum_v p_v (log p_v - log q_v),
    where p = softmax(final_logits) is the model's output distribution and
    q = softmax(lens_logits[point]) is the lens's. Use log_softmax for the logs: large
    logits make softmax underflow to 0 and log(0) = -inf.

    Args:
        lens_logits: a lens's logits at every read-out point.
        final_logits: the model's output logits.

    Returns:
        The KL divergence at every point and position (0 where the lens agrees exactly).
    """
    log_p = final_logits.log_softmax(dim=-1)
    log_q = lens_logits.log_softmax(dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def lens_entropy(logits: Float[Tensor, "*batch d_vocab"]) -> Float[Tensor, " *batch"]:
    """Entropy of the distribution softmax(logits), in nats.

    H = -sum_v p_v log p_v with p = softmax(logits). Use log_softmax for log p (a
    probability that underflows to 0 would otherwise give 0 * -inf = nan).

    Args:
        logits: logits over the vocabulary (any leading dimensions).

    Returns:
        The entropy of each distribution: 0 for a certain prediction, log(d_vocab) for
        a uniform one.
    """
    log_p = logits.log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def correct_token_rank(logits: Float[Tensor, "*batch d_vocab"], targets: Int[Tensor, " *batch"]) -> Int[Tensor, " *batch"]:
    """The rank of the correct token under each set of logits: 0 when it is the top-1.

    The rank is the number of tokens whose logit is strictly larger than the correct
    token's.

    Args:
        logits: logits over the vocabulary (any leading dimensions).
        targets: the correct token id for each distribution (shape of logits without the
            vocabulary dimension).

    Returns:
        The rank (torch.long) of each correct token.
    """
    correct = logits.gather(-1, targets[..., None])
    return (logits > correct).sum(dim=-1)


def prediction_depth(lens_logits: Float[Tensor, "point *batch d_vocab"]) -> Int[Tensor, " *batch"]:
    """The first read-out point from which the lens's top-1 token equals the final top-1 and stays equal.

    The final top-1 token is the argmax of the last point (the model's own output).
    A depth of 0 means even the embeddings already predict it; the largest possible
    depth, n_points - 1, means only the final point does.

    Args:
        lens_logits: a lens's logits at every read-out point; the last point is the
            model's output.

    Returns:
        The prediction depth (torch.long) of each position.
    """
    top = lens_logits.argmax(dim=-1)
    agrees = (top == top[-1]).long()
    stays = agrees.flip(0).cumprod(dim=0).flip(0)  # 1 where this and every later point agree
    return lens_logits.shape[0] - stays.sum(dim=0)


# --- exercises: the tuned lens --------------------------------------------------------------

def tuned_lens_logits(
    model,
    resid: Float[Tensor, "layer *batch d_model"],
    A: Float[Tensor, "layer d_model d_model"],
    b: Float[Tensor, "layer d_model"],
) -> Float[Tensor, "layer *batch d_vocab"]:
    """The tuned lens: translate each layer's residual stream, then read it out like the final one.

    Layer l's translator maps a residual vector h to h + A[l] h + b[l] (A[l] h is the
    matrix-vector product, so h + A h + b is the identity when A and b are zero).
    The translated vector then goes through the model's final layer norm
    (``model.ln_final``) and its unembedding (``model.unembed``).

    Args:
        model: a HookedTransformer.
        resid: the residual stream at each translated layer.
        A: one d_model x d_model matrix per layer.
        b: one bias vector per layer.

    Returns:
        The tuned lens's logits at each layer. With A = b = 0 this is the logit lens.
    """
    flat = resid.reshape(resid.shape[0], -1, resid.shape[-1])  # [layer, n, d_model]
    translated = flat + torch.bmm(flat, A.transpose(1, 2)) + b[:, None, :]  # row-vector form of h + A h + b
    return model.unembed(model.ln_final(translated.reshape(resid.shape)))


def tuned_lens_loss(
    model,
    resid: Float[Tensor, "layer *batch d_model"],
    A: Float[Tensor, "layer d_model d_model"],
    b: Float[Tensor, "layer d_model"],
    final_logits: Float[Tensor, "*batch d_vocab"],
    mask: Bool[Tensor, " *batch"] | None = None,
) -> Float[Tensor, ""]:
    """The tuned lens's training loss: the mean KL from the tuned lens to the model's output.

    KL(p || q) with p = softmax(final_logits) the model's output and q the tuned lens's
    distribution at each layer (`tuned_lens_logits`), averaged over layers and over the
    positions where ``mask`` is True (every position when ``mask`` is None). The loss is
    0 for a perfect lens; its gradient must reach A and b.

    Args:
        model: a HookedTransformer.
        resid: the residual stream at each translated layer.
        A: one d_model x d_model matrix per layer.
        b: one bias vector per layer.
        final_logits: the model's output logits at the same positions.
        mask: which positions count (False on padding), or None for all.

    Returns:
        The loss, a 0-dimensional tensor.
    """
    kl = kl_to_final(tuned_lens_logits(model, resid, A, b), final_logits)  # [layer, *batch]
    if mask is not None:
        kl = kl[:, mask]
    return kl.mean()


# --- the tuned lens as a module ------------------------------------------------------------------

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
            raise ValueError(f"resid has {resid.shape[0]} read-out points; this lens needs n_layers + 1 = "
                             f"{self.n_layers + 1} (residual_stack(model, tokens) without incl_mid)")
        translated = tuned_lens_logits(model, resid[:-1], self.A, self.b)
        final = model.unembed(model.ln_final(resid[-1:]))
        return torch.cat([translated, final])

    def logits(self, model, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "point batch pos d_vocab"]:
        """Tuned-lens logits for token ids (no gradients)."""
        with torch.no_grad():
            return self(model, residual_stack(model, tokens))


# --- data ----------------------------------------------------------------------------------------

def is_tinyworld(model) -> bool:
    """Whether ``model`` reads TinyWorld's own word-level vocabulary (`interplab.is_tinyworld`)."""
    from ..models import is_tinyworld as _is_tinyworld

    return _is_tinyworld(model)


def lens_batch(model, docs) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """Token ids and a mask of real tokens for TinyWorld documents, through the model's own tokenizer.

    For the TinyWorld model this is `tinyworld.batch_tokens`; for another model (e.g.
    gpt2-small) each document's text is tokenised by its tokenizer after a BOS token and
    right-padded (`tinyworld.tokens_for`).
    """
    from ..tinyworld import tokens_for

    encoded = tokens_for(model, docs)
    return encoded.ids, encoded.mask


def rows_per_batch(model, n_points: int, n_pos: int, max_elements: float = 2.5e7, at_most: int = 50) -> int:
    """How many sequences to read through a lens at once: the logits of every read-out point,
    [n_points, rows, n_pos, d_vocab], stay under ``max_elements`` numbers (100 MB in float32).

    With TinyWorld's small vocabulary this is ``at_most``; with gpt2-small's 50,257 tokens, one
    or two sequences of TinyWorld text at a time.
    """
    return max(1, min(at_most, int(max_elements // (n_points * n_pos * model.cfg.d_vocab))))


def collect_lens_data(model, tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"], batch_size: int = 128,
                      ) -> tuple[Float[Tensor, "point n d_model"], Float[Tensor, "n d_vocab"], Int[Tensor, " n"], Bool[Tensor, " n"]]:
    """Residual streams, final logits and next tokens at the kept positions of ``mask``, flattened.

    Sequences are processed shortest first (so that a batch carries little padding); the
    positions come out in that order.

    Returns (resid [n_layers + 1, n, d_model], final_logits [n, d_vocab], next_token [n],
    has_next [n]): ``next_token`` is the token that follows each kept position and
    ``has_next`` says whether there is one (False at a document's last token).
    """
    device = next(model.parameters()).device
    names = lens_hook_names(model.cfg.n_layers)
    # bound the output logits of one batch, [batch, pos, d_vocab], to about 5e7 numbers (gpt2-small: a few sequences)
    batch_size = max(1, min(batch_size, int(5e7 // (tokens.shape[1] * model.cfg.d_vocab))))
    nxt = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
    has = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1) & mask
    order = mask.sum(1).argsort()  # similar lengths together: little padding per batch
    resids, finals, nexts, hases = [], [], [], []
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
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


def lens_docs(n: int, seed: int = 0, split: str = "train", families: Sequence[str] | None = None):
    """TinyWorld documents for training (split "train") or evaluating (split "test") a lens."""
    from .. import tinyworld

    return tinyworld.generate(n, seed=seed, split=split, families=families)


def positions_to_read(mask: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """The positions a lens is trained and evaluated on: every real token but the first (<bos>).

    The residual stream at <bos> is an outlier in most models (it is where attention
    heads park when they have nothing to do) and carries no information about the text.
    """
    keep = mask.clone()
    keep[:, 0] = False
    return keep


# --- training ------------------------------------------------------------------------------------

TRAIN_DEFAULTS = {"n_docs": 2000, "seed": 0, "steps": 1000, "batch_size": 512, "lr": 1e-2, "weight_decay": 0.0}


def train_tuned_lens(
    model,
    docs=None,
    *,
    n_docs: int = TRAIN_DEFAULTS["n_docs"],
    seed: int = TRAIN_DEFAULTS["seed"],
    steps: int = TRAIN_DEFAULTS["steps"],
    batch_size: int = TRAIN_DEFAULTS["batch_size"],
    lr: float = TRAIN_DEFAULTS["lr"],
    weight_decay: float = TRAIN_DEFAULTS["weight_decay"],
    loss_fn: Callable = tuned_lens_loss,
    lens: TunedLens | None = None,
    progress: bool = True,
) -> tuple[TunedLens, dict]:
    """Train a tuned lens on TinyWorld text: Adam on the mean KL to the model's output.

    The model is frozen: its residual streams and output logits are computed once
    (`collect_lens_data`) and the translators are then fitted on random batches of
    positions, with a learning rate that warms up over the first 5% of the steps and
    decays linearly to zero.

    Args:
        model: a HookedTransformer.
        docs: training documents (default: ``n_docs`` TinyWorld documents of the "train"
            split drawn with ``seed``).
        steps, batch_size, lr, weight_decay: the optimisation (batch_size counts positions).
        loss_fn: the loss, called as loss_fn(model, resid, A, b, final_logits); the
            chapter passes the learner's `tuned_lens_loss` here.
        lens: a lens to continue training (default: a fresh, zero-initialised one).
        progress: show a progress bar.

    Returns:
        (the trained lens, a dict of training information: data, settings, losses, seconds).
    """
    from tqdm.auto import tqdm

    t0, c0 = time.perf_counter(), time.process_time()
    docs = lens_docs(n_docs, seed=seed, split="train") if docs is None else docs
    tokens, mask = lens_batch(model, docs)
    resid, final, _, _ = collect_lens_data(model, tokens, positions_to_read(mask))
    t_data = time.perf_counter() - t0
    lens = TunedLens.for_model(model) if lens is None else lens
    opt = torch.optim.Adam(lens.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    gen = torch.Generator().manual_seed(seed)
    n = resid.shape[1]
    losses = []
    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with torch.enable_grad():
            for step in tqdm(range(steps), disable=not progress, desc="tuned lens", leave=False):
                idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(resid.device)
                loss = loss_fn(model, resid[:-1, idx], lens.A, lens.b, final[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.detach().item())
    finally:
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
    info = {
        "model": model.cfg.model_name, "n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model,
        "n_docs": len(docs), "split": "train", "seed": seed, "n_positions": n, "steps": steps,
        "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "optimizer": "Adam",
        "schedule": "linear warm-up (5% of steps), then linear decay to 0",
        "first_loss": round(losses[0], 5) if losses else None, "last_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 5) if losses else None,
        "seconds_data": round(t_data, 2), "seconds_total": round(time.perf_counter() - t0, 2),
        "cpu_seconds_total": round(time.process_time() - c0, 2), "torch_threads": torch.get_num_threads(),
    }
    return lens.eval(), info


# --- evaluation ----------------------------------------------------------------------------------

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
                logits = model.unembed(model.ln_final(r)) if tl is None else tl(model, r)
                h = has[start : start + 4096]
                sums["kl"] += kl_to_final(logits, f).sum(-1).cpu()
                sums["entropy"] += lens_entropy(logits).sum(-1).cpu()
                sums["top1"] += (logits.argmax(-1) == f.argmax(-1)).float().sum(-1).cpu()
                lp = logits[:, h].log_softmax(-1)
                sums["ce"] += -lp.gather(-1, nxt[start : start + 4096][h][None, :, None].expand(lp.shape[0], -1, 1))[..., 0].sum(-1).cpu()
            n, n_next = resid.shape[1], int(has.sum())
            for k, v in sums.items():
                out[f"{k}_{name}"] = [round(float(x) / (n_next if k == "ce" else n), 5) for x in v]
    return out


def answer_lens_logits(model, docs, lens: TunedLens | None = None) -> tuple[Float[Tensor, "point n d_vocab"], Int[Tensor, " n"], list[tuple[int, int]]]:
    """Lens logits at every answer position of TinyWorld documents (logit lens, or ``lens`` if given).

    Returns (logits [n_layers + 1, n_answers, d_vocab], the answer token ids [n_answers],
    the (document, position) of each answer).
    """
    from ..tinyworld import token_id

    if not is_tinyworld(model):
        raise ValueError("answer positions are TinyWorld annotations; use the TinyWorld model")
    tokens, _ = lens_batch(model, docs)
    where = [(i, p) for i, d in enumerate(docs) for p in d.answer_positions]
    resid = residual_stack(model, tokens)
    rows = torch.tensor([i for i, _ in where]), torch.tensor([p for _, p in where])
    r = resid[:, rows[0], rows[1]]
    with torch.no_grad():
        logits = model.unembed(model.ln_final(r)) if lens is None else lens(model, r)
    answers = torch.tensor([token_id(docs[i].answer[p]) for i, p in where])
    return logits, answers, where


def answer_emergence(lens_logits: Float[Tensor, "point *batch d_vocab"], answers: Int[Tensor, " *batch"]) -> Int[Tensor, " *batch"]:
    """The first read-out point from which the right answer is the lens's top-1 and stays top-1.

    n_points where the right answer is not even the model's own top-1.
    """
    top1 = (correct_token_rank(lens_logits, answers.expand(lens_logits.shape[:-1])) == 0).long()
    stays = top1.flip(0).cumprod(dim=0).flip(0)
    return lens_logits.shape[0] - stays.sum(dim=0)


# --- the shipped translators -----------------------------------------------------------------------

def default_folder() -> Path:
    from ..weights import WEIGHTS_DIR

    return WEIGHTS_DIR / "tuned_lens"


def bundled_model_sha256() -> str:
    """The SHA-256 of the bundled TinyWorld weights, as listed in their SHA256SUMS."""
    from ..weights import WEIGHTS_DIR, read_checksums

    return read_checksums(WEIGHTS_DIR / "tinyworld")["model.safetensors"]


def save_tuned_lens(lens: TunedLens, folder: str | Path, info: dict) -> Path:
    """Write the translators (safetensors), their training information (json) and SHA256SUMS."""
    from safetensors.torch import save_file

    from ..weights import write_checksums

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"A": lens.A.detach().cpu().contiguous(), "b": lens.b.detach().cpu().contiguous()},
              str(folder / TUNED_LENS_FILE))
    (folder / TUNED_LENS_INFO).write_text(json.dumps(info, indent=2) + "\n")
    write_checksums(folder)
    return folder


def load_tuned_lens(model=None, folder: str | Path | None = None) -> TunedLens:
    """The shipped tuned lens for the bundled TinyWorld model (files verified against SHA256SUMS first).

    Args:
        model: the model to use it with (checked for a matching shape; moves the lens to
            its device). A TinyWorld model whose weights differ from the ones the lens
            was trained for gets a warning.
        folder: a folder written by `save_tuned_lens` (default: the shipped one).

    Raises:
        CorruptedFileError: a file is missing or does not match its checksum.
        ValueError: the lens does not fit ``model`` (e.g. gpt2-small: train one with
            `train_tuned_lens(model)` instead).
    """
    from safetensors.torch import load_file

    from ..weights import CorruptedFileError, verify

    folder = default_folder() if folder is None else Path(folder)
    verify(folder, [TUNED_LENS_FILE, TUNED_LENS_INFO])
    info = json.loads((folder / TUNED_LENS_INFO).read_text())
    try:
        state = load_file(str(folder / TUNED_LENS_FILE))
    except Exception as e:
        raise CorruptedFileError(f"could not read {folder / TUNED_LENS_FILE}: {e}") from e
    n_layers, d_model = state["b"].shape
    lens = TunedLens(d_model, n_layers)
    lens.load_state_dict(state)
    if model is not None:
        if (model.cfg.n_layers, model.cfg.d_model) != (n_layers, d_model):
            raise ValueError(
                f"the tuned lens in {folder} was trained for {info.get('model', 'another model')} "
                f"({n_layers} layers, d_model {d_model}); this model has {model.cfg.n_layers} layers and d_model "
                f"{model.cfg.d_model}. Train one for it with train_tuned_lens(model).")
        if info.get("model_sha256") and is_tinyworld(model) and model.cfg.model_name == "tinyworld":
            try:
                current = bundled_model_sha256()
            except CorruptedFileError:
                current = None
            if current and current != info["model_sha256"]:
                warnings.warn(f"the tuned lens in {folder} was trained for another version of the TinyWorld weights; "
                              f"retrain it with `python -m interplab.solutions.ch02_lenses`.", stacklevel=2)
        lens = lens.to(next(model.parameters()).device)
    lens.info = info
    return lens.eval()


# --- the command ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    import argparse

    from ..models import load_model

    p = argparse.ArgumentParser(prog="python -m interplab.solutions.ch02_lenses",
                                description="Train the tuned lens of the bundled TinyWorld model and save it.")
    p.add_argument("--out", default=None, help="output folder (default: the shipped interplab/weights/tuned_lens)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the matrices are small, and one thread's CPU time is an honest "
                        "measure of the cost even on a busy machine)")
    for k, v in TRAIN_DEFAULTS.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    p.add_argument("--eval-docs", type=int, default=1000, help="test-split documents to evaluate on")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = load_model("tinyworld", device="cpu")
    settings = {k: getattr(a, k) for k in TRAIN_DEFAULTS}
    lens, info = train_tuned_lens(model, **settings)
    info["model_sha256"] = bundled_model_sha256()
    info["command"] = "python -m interplab.solutions.ch02_lenses"
    metrics = evaluate_lenses(model, lens, lens_docs(a.eval_docs, seed=0, split="test"))
    info["heldout_eval"] = {"docs": a.eval_docs, "split": "test", "seed": 0, **metrics}
    folder = save_tuned_lens(lens, a.out or default_folder(), info)
    print(f"trained in {info['seconds_total']:.1f} s ({info['seconds_data']:.1f} s collecting residuals, "
          f"{torch.get_num_threads()} threads); saved to {folder}")
    print(f"{'point':<14} {'KL logit':>9} {'KL tuned':>9} {'CE logit':>9} {'CE tuned':>9}")
    for i, label in enumerate(metrics["labels"]):
        print(f"{label:<14} {metrics['kl_logit'][i]:9.4f} {metrics['kl_tuned'][i]:9.4f} "
              f"{metrics['ce_logit'][i]:9.4f} {metrics['ce_tuned'][i]:9.4f}")


if __name__ == "__main__":
    main()
