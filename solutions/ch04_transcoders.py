"""Chapter 4 (transcoders): reference solutions, the transcoder module, its training and the circuit tools.

    python -m interplab.solutions.ch04_transcoders              # retrain the shipped transcoders (every MLP layer)
    python -m interplab.solutions.ch04_transcoders --evaluate   # the transcoder-vs-SAE table and the replacement model

An SAE explains what an MLP *writes*; a transcoder (Dunefsky, Chlenski and Nanda, 2024)
approximates what the MLP *computes*: it reads the MLP's input (the normalised residual
stream, ``blocks.L.ln2.hook_normalized``) and predicts the MLP's output
(``blocks.L.hook_mlp_out``) through a wide, sparse layer of features:

    acts  = activation(x @ W_enc + b_enc)              # x: the MLP's normalised input
    y_hat = acts @ W_dec + b_dec  (+ x @ W_skip.T)     # y_hat: the MLP's output; W_skip only in a skip transcoder

The sparse architectures and penalties are those of chapter 3 (`interplab.solutions.ch03_saes`):
standard (ReLU + L1 weighted by decoder norms), TopK and BatchTopK (a learned threshold,
i.e. a JumpReLU, at inference). Unlike an SAE, a transcoder never subtracts ``b_dec``
from its input: input and output live in different places.

The functions named like the chapter's exercises (`transcoder_forward`, `mlp_io_pairs`,
`transcoder_loss`, `replacement_loss`, `de_embedding`, `pullback`, `answer_attribution`)
are the single source of truth for what each exercise asks. Weights follow SAELens's
layout (``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_out], ``W_skip`` [d_out, d_in]) and
`Transcoder.to_saelens` returns the matching SAELens 6 class (``Transcoder``,
``SkipTranscoder``, ``JumpReLUTranscoder``, ``JumpReLUSkipTranscoder``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from . import ch03_saes as sae_sol
from .ch03_saes import UnitNormDictionary, batchtopk_activation, explained_variance, topk_activation

ARCHITECTURES = ("standard", "topk", "batchtopk")
WEIGHTS_FILE = "sae_weights.safetensors"  # SAELens's file names, so SAE.load_from_disk reads the folders
CONFIG_FILE = "cfg.json"
SAELENS_LAYOUT = "6.0.0"  # the cfg.json layout written (SAELens reads files without a version as pre-6.0)


def mlp_in_hook(layer: int) -> str:
    """The hook of the MLP's input: the normalised residual stream before the MLP of ``layer``."""
    return f"blocks.{layer}.ln2.hook_normalized"


def mlp_out_hook(layer: int) -> str:
    """The hook of the MLP's output (what the MLP of ``layer`` adds to the residual stream)."""
    return f"blocks.{layer}.hook_mlp_out"


# =====================================================================================
# Exercise: the transcoder's forward pass
# =====================================================================================

def transcoder_forward(
    x: Float[Tensor, "batch d_in"],
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, " d_sae"],
    W_dec: Float[Tensor, "d_sae d_out"],
    b_dec: Float[Tensor, " d_out"],
    W_skip: Float[Tensor, "d_out d_in"] | None = None,
) -> tuple[Float[Tensor, "batch d_out"], Float[Tensor, "batch d_sae"]]:
    """A ReLU transcoder: predict the MLP's output from its input through sparse features.

    Unlike an SAE, a transcoder does NOT subtract b_dec from its input: b_dec lives in
    the output space (the MLP's output), x in the input space (the MLP's normalised input).
    A skip transcoder adds a linear path straight from input to output; W_skip is
    stored like an nn.Linear weight, [d_out, d_in] (as in SAELens).

    Args:
        x: the MLP's normalised inputs, one row per token.
        W_enc: encoder weights.
        b_enc: encoder bias.
        W_dec: decoder weights; row i is feature i's output direction.
        b_dec: decoder (output) bias.
        W_skip: the skip path's weights, or None for a plain transcoder.

    Returns:
        (y_hat, acts): acts = ReLU(x @ W_enc + b_enc);
        y_hat = acts @ W_dec + b_dec, plus x @ W_skip.T when W_skip is given.
    """
    acts = torch.relu(x @ W_enc + b_enc)
    y_hat = acts @ W_dec + b_dec
    if W_skip is not None:
        y_hat = y_hat + x @ W_skip.T
    return y_hat, acts


# =====================================================================================
# The transcoder module
# =====================================================================================

@dataclass
class TranscoderConfig:
    """What a transcoder is: its sizes, its architecture and which MLP it replaces.

    Attributes:
        d_in: input size (d_model: the MLP's normalised input).
        d_sae: number of features.
        d_out: output size (d_model: the MLP's output); None means d_in.
        architecture: "standard" (ReLU + L1 penalty), "topk" or "batchtopk".
        k: active features per token (topk; on average for batchtopk).
        l1_coeff: weight of the L1 penalty (standard only).
        skip: whether there is a linear skip path (a skip transcoder).
        layer: the layer of the MLP it replaces.
        model_name: the model it was trained on.
    """

    d_in: int
    d_sae: int
    d_out: int | None = None
    architecture: str = "batchtopk"
    k: int = 16
    l1_coeff: float = 1.0
    skip: bool = False
    layer: int = 0
    model_name: str = "tinyworld"

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, not {self.architecture!r}")
        if self.d_out is None:
            self.d_out = self.d_in
        if min(self.d_in, self.d_sae, self.d_out) <= 0:
            raise ValueError(f"sizes must be positive, got d_in={self.d_in}, d_sae={self.d_sae}, d_out={self.d_out}")
        if self.architecture != "standard" and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be between 1 and d_sae={self.d_sae}, got {self.k}")
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")

    @property
    def hook_name(self) -> str:
        """Where the transcoder reads: the MLP's normalised input."""
        return mlp_in_hook(self.layer)

    @property
    def hook_name_out(self) -> str:
        """What the transcoder predicts (and replaces): the MLP's output."""
        return mlp_out_hook(self.layer)


class Transcoder(UnitNormDictionary):
    """A transcoder (optionally with a skip path) replacing one MLP.

        acts  = activation(x @ W_enc + b_enc)
        y_hat = acts @ W_dec + b_dec (+ x @ W_skip.T)

    Decoder rows are kept at unit norm during training. A BatchTopK transcoder uses its
    batch-level selection while training and, in eval mode, a threshold learned during
    training (a JumpReLU), so a token's features do not depend on the rest of its batch.
    """

    KIND = "a transcoder"
    CONFIG = TranscoderConfig

    def __init__(self, cfg: TranscoderConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out
        W_dec = torch.randn(d_sae, d_out, generator=generator)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
        W_enc = torch.randn(d_in, d_sae, generator=generator) / math.sqrt(d_in)
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.W_skip = nn.Parameter(torch.zeros(d_out, d_in)) if cfg.skip else None
        self.register_buffer("threshold", torch.zeros(()))  # BatchTopK only: the eval-mode threshold
        self.info: dict = {}

    def extra_repr(self) -> str:
        c = self.cfg
        sparsity = f"l1_coeff={c.l1_coeff:g}" if c.architecture == "standard" else f"k={c.k}"
        return (f"{c.architecture}{' skip' if c.skip else ''}, layer {c.layer}, d_in={c.d_in}, d_sae={c.d_sae}, "
                f"d_out={c.d_out}, {sparsity}")

    # --- forward ---------------------------------------------------------------------

    def pre_acts(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Encoder outputs before the activation function."""
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations."""
        self._check_input(x)
        pre = self.pre_acts(x)
        arch = self.cfg.architecture
        if arch == "standard":
            return torch.relu(pre)
        if arch == "topk":
            return topk_activation(pre, self.cfg.k)
        if self.training:
            flat = batchtopk_activation(pre.reshape(-1, self.cfg.d_sae), self.cfg.k)
            with torch.no_grad():  # running estimate of the smallest activation kept
                kept = flat[flat > 0]
                if kept.numel():
                    self.threshold.lerp_(kept.min().to(self.threshold.dtype), 0.01)
            return flat.reshape(pre.shape)
        return torch.relu(pre) * (pre > self.threshold)

    def decode(self, acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_out"]:
        """The features' contribution to the output (without the skip path)."""
        return acts @ self.W_dec + self.b_dec

    def skip_out(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"] | float:
        """The skip path's contribution (0.0 for a plain transcoder)."""
        return x @ self.W_skip.T if self.W_skip is not None else 0.0

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        """The predicted MLP output."""
        return self.decode(self.encode(x)) + self.skip_out(x)

    # --- saving, loading, SAELens ----------------------------------------------------

    def saelens_architecture(self) -> str:
        """The SAELens 6 architecture name of this transcoder."""
        c = self.cfg
        if c.architecture == "topk":
            raise NotImplementedError("SAELens 6 has no TopK transcoder class; use 'batchtopk' (a JumpReLU at "
                                      "inference) or 'standard' to share a transcoder with SAELens")
        base = "jumprelu_" if c.architecture == "batchtopk" else ""
        return base + ("skip_transcoder" if c.skip else "transcoder")

    def config_dict(self) -> dict:
        """The config in SAELens's cfg.json layout (plus interplab's own fields)."""
        c = self.cfg
        d = {
            "architecture": None, "d_in": c.d_in, "d_sae": c.d_sae, "d_out": c.d_out, "dtype": "float32",
            "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {"sae_lens_version": SAELENS_LAYOUT, "model_name": c.model_name, "hook_name": c.hook_name,
                         "hook_name_out": c.hook_name_out,
                         "hook_head_index": None, "prepend_bos": True, "context_size": 128,
                         "dataset_path": "interplab.tinyworld"},
            "interplab": asdict(c),
        }
        try:
            d["architecture"] = self.saelens_architecture()
        except NotImplementedError:
            d["architecture"] = "interplab_topk_transcoder"
        return d

    def _saelens_state(self) -> dict[str, Tensor]:
        state = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.W_skip is not None:
            state["W_skip"] = self.W_skip
        if self.cfg.architecture == "batchtopk":
            state["threshold"] = self.threshold.expand(self.cfg.d_sae)
        return state

    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        """Write cfg.json, sae_weights.safetensors (SAELens's layout) and SHA256SUMS into ``folder``."""
        from safetensors.torch import save_file

        from interplab.weights import write_checksums

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self._saelens_state().items()}
        save_file(state, str(folder / WEIGHTS_FILE))
        cfg = self.config_dict()
        if extra:
            cfg["interplab_info"] = extra
        (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        write_checksums(folder)
        return folder

    def to_saelens(self):
        """The same transcoder as a SAELens 6 object (Transcoder, SkipTranscoder, JumpReLU(Skip)Transcoder)."""
        import sae_lens

        classes = {
            "transcoder": (sae_lens.Transcoder, sae_lens.TranscoderConfig),
            "skip_transcoder": (sae_lens.SkipTranscoder, sae_lens.SkipTranscoderConfig),
            "jumprelu_transcoder": (sae_lens.JumpReLUTranscoder, sae_lens.JumpReLUTranscoderConfig),
            "jumprelu_skip_transcoder": (sae_lens.JumpReLUSkipTranscoder, sae_lens.JumpReLUSkipTranscoderConfig),
        }
        from sae_lens.saes.sae import SAEMetadata

        sae_cls, cfg_cls = classes[self.saelens_architecture()]
        c = self.cfg
        cfg = cfg_cls(d_in=c.d_in, d_sae=c.d_sae, d_out=c.d_out, dtype="float32", device=str(self.W_enc.device),
                      apply_b_dec_to_input=False, metadata=SAEMetadata(**self.config_dict()["metadata"]))
        out = sae_cls(cfg)
        out.load_state_dict({k: v.detach().clone() for k, v in self._saelens_state().items()})
        return out.eval()


# =====================================================================================
# Exercise: the training data (cached input/output pairs of one MLP)
# =====================================================================================

def mlp_io_pairs(
    model, tokens: Int[Tensor, "batch pos"], layer: int, mask: Bool[Tensor, "batch pos"] | None = None
) -> tuple[Float[Tensor, "n d_model"], Float[Tensor, "n d_model"]]:
    """The input and output of one MLP at every kept token: a transcoder's training pairs.

    The MLP's input is the residual stream after the layer norm before the MLP
    (``blocks.{layer}.ln2.hook_normalized``); its output is what it adds to the residual
    stream (``blocks.{layer}.hook_mlp_out``). Run the model once with a cache of just
    those two hooks (`run_with_cache(..., names_filter=...)`).

    Args:
        model: a HookedTransformer.
        tokens: input ids.
        layer: which MLP.
        mask: True at the tokens to keep; None keeps every position.

    Returns:
        (x, y), each [n_kept, d_model], rows in row-major (batch, then position) order.
    """
    hooks = [mlp_in_hook(layer), mlp_out_hook(layer)]
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer must be between 0 and {model.cfg.n_layers - 1}, got {layer}")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hooks)
    x, y = cache[hooks[0]], cache[hooks[1]]
    if mask is None:
        return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    keep = mask.to(x.device).bool()
    return x[keep], y[keep]


# =====================================================================================
# Exercise: the training loss
# =====================================================================================

def transcoder_loss(
    transcoder: Transcoder, x: Float[Tensor, "batch d_in"], y: Float[Tensor, "batch d_out"]
) -> tuple[Float[Tensor, ""], Float[Tensor, ""], Float[Tensor, ""]]:
    """The training loss of a transcoder: error in predicting the MLP's OUTPUT, plus the sparsity penalty.

    The penalty is chapter 3's: for a standard (ReLU) transcoder, L1 weighted by each
    feature's decoder norm; TopK and BatchTopK transcoders have no penalty (their
    activation function enforces the sparsity), though l1 is still reported.

    Args:
        transcoder: a `Transcoder` (use ``transcoder.encode``, ``transcoder(x)`` or
            ``decode`` + ``skip_out``, ``transcoder.W_dec``, ``transcoder.cfg``).
        x: the MLP's normalised inputs.
        y: the MLP's outputs (the target).

    Returns:
        (loss, mse, l1), scalar tensors:
        mse = squared error of the prediction (with the skip path, if any) against y,
        summed over the last dimension and averaged over the batch;
        l1 = sum_i |acts[:, i]| * ||W_dec[i]||, averaged over the batch;
        loss = mse + cfg.l1_coeff * l1 for "standard", else mse.
    """
    acts = transcoder.encode(x)
    y_hat = transcoder.decode(acts) + transcoder.skip_out(x)
    mse = (y_hat - y).pow(2).sum(dim=-1).mean()
    l1 = (acts.abs() * transcoder.W_dec.norm(dim=-1)).sum(dim=-1).mean()
    loss = mse + transcoder.cfg.l1_coeff * l1 if transcoder.cfg.architecture == "standard" else mse
    return loss, mse, l1


# =====================================================================================
# Training (a helper used by the chapter, not an exercise)
# =====================================================================================

@torch.no_grad()
def _resample_dead_(tc: Transcoder, opt: torch.optim.Optimizer, dead: Tensor, x: Tensor, y: Tensor,
                    y_hat: Tensor) -> None:
    """Give dead features the inputs (encoder) and errors (decoder) of the worst-predicted rows."""
    n_dead = int(dead.sum())
    residual = y - y_hat
    worst = residual.pow(2).sum(-1).topk(min(n_dead, len(y))).indices
    rows = worst[torch.arange(n_dead) % len(worst)]
    scale = 0.2 if tc.cfg.architecture == "standard" else 1.0
    alive = ~dead
    enc_norm = tc.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    inputs = x[rows] / x[rows].norm(dim=-1, keepdim=True).clamp_min(1e-8)
    tc.W_enc[:, dead] = inputs.T * scale * enc_norm
    tc.W_dec[dead] = residual[rows] / residual[rows].norm(dim=-1, keepdim=True).clamp_min(1e-8)
    tc.b_enc[dead] = 0.0
    for p, sl in ((tc.W_enc, (slice(None), dead)), (tc.b_enc, (dead,)), (tc.W_dec, (dead,))):
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][sl] = 0.0


def _fired(tc: Transcoder, x: Tensor) -> Tensor:
    """[d_sae] which features fire on the batch x under the training-mode activation (no side effects)."""
    pre = tc.pre_acts(x)
    if tc.cfg.architecture == "standard":
        return (pre > 0).any(0)
    if tc.cfg.architecture == "topk":
        return (topk_activation(pre, tc.cfg.k) > 0).any(0)
    return (batchtopk_activation(pre, tc.cfg.k) > 0).any(0)


def train_transcoder(
    x: Float[Tensor, "n d_in"],
    y: Float[Tensor, "n d_out"],
    cfg: TranscoderConfig,
    *,
    steps: int = 1000,
    batch_size: int = 1024,
    lr: float = 2e-3,
    seed: int = 0,
    dead_after: int = 200,
    resample_every: int = 250,
    progress: bool = True,
) -> Transcoder:
    """Train a transcoder on cached (MLP input, MLP output) pairs; return it in eval mode.

    Chapter 3's recipe with the target swapped: seed, ``b_dec`` = mean of y, Adam with
    the learning rate decaying linearly to 0 over the last 20% of steps, decoder
    gradients made orthogonal to the decoder rows and rows renormalised after each
    step, and dead features (no activation for ``dead_after`` steps) resampled every
    ``resample_every`` steps during the first 80% of training.
    """
    if x.ndim != 2 or x.shape[-1] != cfg.d_in:
        raise ValueError(f"x must be [n_tokens, d_in={cfg.d_in}], got {tuple(x.shape)}")
    if y.shape != (x.shape[0], cfg.d_out):
        raise ValueError(f"y must be [n_tokens={x.shape[0]}, d_out={cfg.d_out}], got {tuple(y.shape)}")
    with torch.enable_grad():  # works inside a notebook that turned gradients off
        return _train(x, y, cfg, steps, batch_size, lr, seed, dead_after, resample_every, progress)


def _train(x, y, cfg, steps, batch_size, lr, seed, dead_after, resample_every, progress) -> Transcoder:
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    tc = Transcoder(cfg).to(x.device)
    with torch.no_grad():
        tc.b_dec.copy_(y.float().mean(dim=0))
    opt = torch.optim.Adam(tc.parameters(), lr=lr)
    decay_start = int(0.8 * steps)
    order = torch.Generator().manual_seed(seed)
    perm, cursor = torch.randperm(x.shape[0], generator=order), 0
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=x.device)
    n_resampled, t0 = 0, time.time()
    tc.train()
    bar = tqdm(range(steps), disable=not progress, desc=f"training layer-{cfg.layer} transcoder", leave=False)
    for step in bar:
        if cursor + batch_size > len(perm):
            perm, cursor = torch.randperm(x.shape[0], generator=order), 0
        idx = perm[cursor : cursor + batch_size].to(x.device)
        cursor += batch_size
        xb, yb = x[idx], y[idx]
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (steps - step) / max(1, steps - decay_start))
        loss, mse, _ = transcoder_loss(tc, xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        tc.remove_parallel_grad_()
        opt.step()
        tc.normalize_decoder_()
        with torch.no_grad():
            since_fired = torch.where(_fired(tc, xb), 0, since_fired + 1)
            if (step + 1) % resample_every == 0 and step < decay_start:
                dead = since_fired >= dead_after
                if dead.any():
                    _resample_dead_(tc, opt, dead, xb, yb, tc(xb))
                    since_fired[dead] = 0
                    n_resampled += int(dead.sum())
        if progress and step % 50 == 0:
            bar.set_postfix(mse=f"{mse.item():.3g}")
    bar.close()
    tc.eval()
    tc.info = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "tokens_seen": steps * batch_size,
               "final_mse": round(mse.item(), 5), "resampled": n_resampled, "seconds": round(time.time() - t0, 1)}
    return tc


# =====================================================================================
# Exercise: the replacement model
# =====================================================================================

def replacement_loss(
    model, transcoders: Sequence[Transcoder], tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"]
) -> dict[str, float]:
    """How much of the model's performance survives when transcoders replace MLPs, ALL AT ONCE.

    Run the model three times:

    - clean;
    - replaced: every transcoder's MLP output (``blocks.{L}.hook_mlp_out``, L =
      ``transcoder.cfg.layer``) is replaced, at the positions in mask, by the
      transcoder's prediction from the MLP input of THIS run
      (``blocks.{L}.ln2.hook_normalized``): a later transcoder reads a residual stream
      already changed by the earlier ones, as in a true replacement model;
    - ablated: the same MLPs' outputs are zeroed at the same positions.

    A prediction (logits at p for the token at p + 1) is scored when both mask[b, p] and
    mask[b, p + 1] are True; the losses average over the scored predictions.

    Args:
        model: a HookedTransformer.
        transcoders: one or more transcoders, each replacing the MLP of its cfg.layer.
        tokens: input ids.
        mask: True at the tokens where the MLPs are replaced (real tokens: not <bos>, not padding).

    Returns:
        A dict of Python floats: "ce_clean", "ce_replaced", "ce_ablated" (mean next-token
        cross-entropy of each run) and "loss_recovered" =
        (ce_ablated - ce_replaced) / (ce_ablated - ce_clean).
    """
    keep = mask.to(tokens.device).bool()[..., None]
    inputs: dict[int, Tensor] = {}

    def save_input(x: Tensor, hook) -> None:
        inputs[hook.layer()] = x

    def replace(y: Tensor, hook) -> Tensor:
        tc = by_layer[hook.layer()]
        return torch.where(keep, tc(inputs[hook.layer()]), y)

    def ablate(y: Tensor, hook) -> Tensor:
        return torch.where(keep, torch.zeros_like(y), y)

    by_layer = {tc.cfg.layer: tc for tc in transcoders}
    if len(by_layer) != len(transcoders):
        raise ValueError("two transcoders replace the same MLP; pass at most one per layer")
    replace_hooks = [(mlp_in_hook(L), save_input) for L in by_layer] + [(mlp_out_hook(L), replace) for L in by_layer]
    with torch.no_grad():
        runs = {
            "ce_clean": model(tokens),
            "ce_replaced": model.run_with_hooks(tokens, fwd_hooks=replace_hooks),
            "ce_ablated": model.run_with_hooks(tokens, fwd_hooks=[(mlp_out_hook(L), ablate) for L in by_layer]),
        }
    scored = mask[:, :-1].bool() & mask[:, 1:].bool()
    targets = tokens[:, 1:, None]
    out = {name: -logits[:, :-1].log_softmax(-1).gather(-1, targets)[..., 0][scored].mean().item()
           for name, logits in runs.items()}
    out["loss_recovered"] = (out["ce_ablated"] - out["ce_replaced"]) / (out["ce_ablated"] - out["ce_clean"])
    return out


# =====================================================================================
# Exercises: input-invariant circuit analysis
# =====================================================================================

def de_embedding(model, transcoder: Transcoder, feature: int) -> Float[Tensor, " d_vocab"]:
    """Which tokens turn a feature on directly: its encoder vector read through the token embeddings.

    A token's embedding reaches every MLP's input through the residual stream (the
    "direct path"). Ignoring attention, earlier MLPs and the layer norm's scale, token t
    adds W_E[t] @ W_enc[:, feature] to the feature's pre-activation.

    Args:
        model: a HookedTransformer (token embeddings model.W_E, [d_vocab, d_model]).
        transcoder: the transcoder the feature belongs to.
        feature: the feature's index.

    Returns:
        model.W_E @ transcoder.W_enc[:, feature], one value per vocabulary token.
    """
    if not 0 <= feature < transcoder.cfg.d_sae:
        raise ValueError(f"feature must be between 0 and {transcoder.cfg.d_sae - 1}, got {feature}")
    return model.W_E @ transcoder.W_enc[:, feature]


def pullback(earlier: Transcoder, later: Transcoder, feature: int) -> Float[Tensor, " d_sae_earlier"]:
    """How much each earlier feature, through the residual stream, drives one later feature.

    An earlier feature i writes W_dec[i] (of the earlier transcoder) into the residual
    stream; the later feature reads the stream with its encoder vector. Ignoring
    everything in between (attention, other MLPs, the layer norm's scale), one unit of
    feature i adds earlier.W_dec[i] @ later.W_enc[:, feature] to the later feature's
    pre-activation. This is the later feature's encoder "pulled back" through the
    earlier transcoder's decoder.

    Args:
        earlier: the transcoder of an earlier layer.
        later: the transcoder of a later layer.
        feature: the index of a feature of the later transcoder.

    Returns:
        earlier.W_dec @ later.W_enc[:, feature], one value per feature of the earlier transcoder.
    """
    if earlier.cfg.layer >= later.cfg.layer:
        raise ValueError(f"the earlier transcoder (layer {earlier.cfg.layer}) must come before the later one "
                         f"(layer {later.cfg.layer}): a feature only reads what earlier layers wrote")
    if not 0 <= feature < later.cfg.d_sae:
        raise ValueError(f"feature must be between 0 and {later.cfg.d_sae - 1}, got {feature}")
    return earlier.W_dec @ later.W_enc[:, feature]


# =====================================================================================
# Exercise: input-dependent attribution
# =====================================================================================

def answer_attribution(
    model, transcoders: Sequence[Transcoder], tokens: Int[Tensor, " pos"], answer_id: int
) -> tuple[Float[Tensor, "n_transcoders pos d_sae"], Float[Tensor, "n_transcoders pos"]]:
    """Activation times gradient: how much each transcoder feature (and each error term) drives the answer logit.

    Build the replacement model with ERROR TERMS, so that it computes exactly what the
    model computes: at each transcoder's layer, replace the MLP output y (at every
    position) by

        transcoder.decode(acts) + transcoder.skip_out(x) + error,   acts = transcoder.encode(x),

    where x is the MLP input of this run and error = y - transcoder(x), detached
    (a constant: the part of the MLP the transcoder misses). Then take the logit of
    ``answer_id`` at the last position and its gradient (torch.autograd.grad, inside
    torch.enable_grad()) with respect to every acts and every error tensor. Gradients
    flow through later transcoders' features and the attention layers.

    Args:
        model: a HookedTransformer.
        transcoders: transcoders of distinct layers, all with the same d_sae; MLPs
            without one stay as they are.
        tokens: one prompt, [pos].
        answer_id: the token whose logit at the last position is explained.

    Returns:
        (feature_attr, error_attr), in the order of ``transcoders``:
        feature_attr[i, p, f] = acts[p, f] * d logit / d acts[p, f] of transcoder i;
        error_attr[i, p] = error[p] . d logit / d error[p] (summed over d_model).
    """
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be one prompt, [pos]; got shape {tuple(tokens.shape)}")
    by_layer = {tc.cfg.layer: i for i, tc in enumerate(transcoders)}
    inputs: dict[int, Tensor] = {}
    acts: list[Tensor | None] = [None] * len(transcoders)
    errors: list[Tensor | None] = [None] * len(transcoders)

    def save_input(x: Tensor, hook) -> None:
        inputs[hook.layer()] = x

    def replace(y: Tensor, hook) -> Tensor:
        i = by_layer[hook.layer()]
        tc, x = transcoders[i], inputs[hook.layer()]
        acts[i] = tc.encode(x)
        recon = tc.decode(acts[i]) + tc.skip_out(x)
        errors[i] = (y - recon).detach().requires_grad_(True)
        return recon + errors[i]

    hooks = [(mlp_in_hook(L), save_input) for L in by_layer] + [(mlp_out_hook(L), replace) for L in by_layer]
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks)
        logit = logits[0, -1, answer_id]
        grads = torch.autograd.grad(logit, acts + errors)
    n = len(transcoders)
    feature_attr = torch.stack([(a * g)[0] for a, g in zip(acts, grads[:n])]).detach()
    error_attr = torch.stack([(e * g).sum(-1)[0] for e, g in zip(errors, grads[n:])]).detach()
    return feature_attr, error_attr


# =====================================================================================
# Helpers used by the chapter (not exercises)
# =====================================================================================

SHIPPED_PREFIX = "transcoder_tinyworld_mlp"
KINDS = ("transcoder", "skip", "sae")  # the plain transcoders, the skip transcoders, the SAE baselines on mlp_out
METHOD_NAMES = {"transcoder": "transcoder", "skip": "skip transcoder", "sae": "SAE on mlp_out"}
RECIPE = dict(architecture="batchtopk", d_sae=768, k=16)
TRAIN = dict(n_docs=4000, steps=800, batch_size=1024, lr=2e-3, seed=0)


def shipped_folder(layer: int, kind: str = "transcoder") -> Path:
    """The folder of a shipped transcoder ("transcoder" or "skip") or SAE baseline ("sae") of one MLP layer."""
    from interplab.weights import WEIGHTS_DIR

    if kind not in KINDS:
        raise KeyError(f"kind must be one of {KINDS}, not {kind!r}")
    return WEIGHTS_DIR / (f"{SHIPPED_PREFIX}{layer}" + ("" if kind == "transcoder" else f"_{kind}"))


def load_transcoder(layer: int, skip: bool = False, device: str | None = None) -> Transcoder:
    """The transcoder shipped for the MLP of ``layer`` of the bundled model (checksum-verified)."""
    return Transcoder.load(shipped_folder(layer, "skip" if skip else "transcoder"), device=device)


def load_transcoders(skip: bool = False, n_layers: int = 4, device: str | None = None) -> list[Transcoder]:
    """The shipped transcoders of every MLP layer, in layer order."""
    return [load_transcoder(L, skip=skip, device=device) for L in range(n_layers)]


def load_sae_baseline(layer: int, device: str | None = None):
    """The SAE shipped as a baseline: trained on ``blocks.{layer}.hook_mlp_out`` with the transcoders' recipe."""
    return sae_sol.SAE.load(shipped_folder(layer, "sae"), device=device)


def dataset(n_docs: int, seed: int, split: str = "test"):
    """(docs, ids, mask) of fresh TinyWorld documents; mask: real tokens but <bos> (chapter 3's convention)."""
    return sae_sol.tinyworld_dataset(n_docs, seed=seed, split=split)


def collect_pairs(model, ids: Tensor, mask: Tensor, layers: Sequence[int] | None = None,
                  progress: bool = False) -> dict[int, tuple[Tensor, Tensor]]:
    """{layer: (x, y)}: the MLP input/output pairs of several layers from one batched pass."""
    from interplab.activations import collect

    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    hooks = [h for L in layers for h in (mlp_in_hook(L), mlp_out_hook(L))]
    device = next(model.parameters()).device
    acts = collect(model, ids, hooks, mask=mask, batch_size=256, out_device=device, progress=progress)
    return {L: (acts[mlp_in_hook(L)], acts[mlp_out_hook(L)]) for L in layers}


def _splice_ce(model, tokens: Tensor, mask: Tensor, replace: Mapping[int, Callable[[Tensor, Tensor], Tensor]],
               max_logits_gb: float = 0.25) -> float:
    """Mean CE with MLP outputs of some layers replaced by fn(mlp_input, mlp_output) at the mask positions.

    Runs in batches of sequences whose logits stay under ``max_logits_gb`` (one batch on
    TinyWorld; several for a model with gpt2-small's 50,257-token vocabulary).
    """
    fits = max_logits_gb * 1e9 / (tokens.shape[1] * model.cfg.d_vocab * 4)  # sequences per batch
    if fits < tokens.shape[0]:
        rows = max(1, int(fits))
        parts = []
        for start in range(0, tokens.shape[0], rows):
            ids, keep_ = tokens[start : start + rows], mask[start : start + rows].bool()
            n = int((keep_[:, :-1] & keep_[:, 1:]).sum())
            if n:
                parts.append((_splice_ce(model, ids, keep_, replace, max_logits_gb=float("inf")), n))
        return sum(ce * n for ce, n in parts) / sum(n for _, n in parts)
    keep = mask.bool()[..., None]
    inputs: dict[int, Tensor] = {}

    def save(x, hook):
        inputs[hook.layer()] = x

    def swap(y, hook):
        return torch.where(keep, replace[hook.layer()](inputs[hook.layer()], y), y)

    hooks = [(mlp_in_hook(L), save) for L in replace] + [(mlp_out_hook(L), swap) for L in replace]
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    scored = mask[:, :-1].bool() & mask[:, 1:].bool()
    return -logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0][scored].mean().item()


@torch.no_grad()
def compare_layer(model, layer: int, transcoder: Transcoder | None, ids: Tensor, mask: Tensor,
                  pairs: tuple[Tensor, Tensor] | None = None, skip: Transcoder | None = None, sae=None) -> list[dict]:
    """One row per method (transcoder, skip transcoder, SAE on mlp_out) for one MLP layer.

    Columns: L0, explained variance of the MLP output, CE with that MLP replaced, the
    loss increase over clean, and the fraction of the zero-ablation gap recovered.
    """
    x, y = pairs if pairs is not None else mlp_io_pairs(model, ids, layer, mask)
    ce_clean = _splice_ce(model, ids, mask, {})
    ce_zero = _splice_ce(model, ids, mask, {layer: lambda x_, y_: torch.zeros_like(y_)})
    rows = []
    methods = []
    if transcoder is not None:
        methods.append((METHOD_NAMES["transcoder"], transcoder, lambda x_, y_: transcoder(x_)))
    if skip is not None:
        methods.append((METHOD_NAMES["skip"], skip, lambda x_, y_: skip(x_)))
    if sae is not None:
        methods.append((METHOD_NAMES["sae"], sae, lambda x_, y_: sae(y_)))
    for name, module, fn in methods:
        acts = module.encode(y if module is sae else x)
        y_hat = fn(x, y)
        ce = _splice_ce(model, ids, mask, {layer: fn})
        rows.append({"layer": layer, "method": name, "l0": round((acts != 0).float().sum(-1).mean().item(), 2),
                     "explained_variance": round(explained_variance(y, y_hat), 4),
                     "ce": round(ce, 4), "delta_ce": round(ce - ce_clean, 4),
                     "loss_recovered": round((ce_zero - ce) / (ce_zero - ce_clean), 4),
                     "ce_clean": round(ce_clean, 4), "ce_zero": round(ce_zero, 4)})
    return rows


def feature_logit_effect(model, transcoder: Transcoder, feature: int) -> Float[Tensor, " d_vocab"]:
    """A feature's direct effect on the logits: its decoder row times the unembedding (ignoring later layers)."""
    return transcoder.W_dec[feature] @ model.W_U


def fact_prompt(person: str, relation: str = "city") -> list[str]:
    """The question prompt of TinyWorld's facts family, e.g. ['<bos>', 'where', 'does', 'Alice', 'live', '?']."""
    from interplab.tinyworld.language import BOS, RELATIONS

    _, query, _ = RELATIONS[relation]
    return [BOS] + query.split("{V}")[0].format(P=person).split()


def feature_attribution_to(
    model, transcoders: Sequence[Transcoder], tokens: Tensor, target: tuple[int, int, int] | None = None,
    answer_id: int | None = None, logit_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`answer_attribution` for other targets: an answer logit, a weighted sum of logits, or one feature.

    Exactly one target: ``answer_id`` (the logit of that token at the last position, as
    in `answer_attribution`); ``logit_weights`` ([d_vocab]; the target is
    ``logits[0, -1] @ logit_weights``, e.g. the right answer's logit minus the mean of
    its competitors'); or ``target=(i, p, f)``: the pre-activation of feature f of
    transcoders[i] at position p, where only the transcoders of earlier layers get
    attributions (the others stay zero): the incoming edges of one node of the graph.
    """
    if sum(t is not None for t in (target, answer_id, logit_weights)) != 1:
        raise ValueError("give exactly one of target, answer_id and logit_weights")
    by_layer = {tc.cfg.layer: i for i, tc in enumerate(transcoders)}
    inputs: dict[int, Tensor] = {}
    n = len(transcoders)
    acts: list[Tensor | None] = [None] * n
    errors: list[Tensor | None] = [None] * n
    pres: list[Tensor | None] = [None] * n

    def save_input(x, hook):
        inputs[hook.layer()] = x

    def replace(y, hook):
        i = by_layer[hook.layer()]
        tc, x = transcoders[i], inputs[hook.layer()]
        pres[i] = tc.pre_acts(x)
        acts[i] = tc.encode(x)
        recon = tc.decode(acts[i]) + tc.skip_out(x)
        errors[i] = (y - recon).detach().requires_grad_(True)
        return recon + errors[i]

    hooks = [(mlp_in_hook(L), save_input) for L in by_layer] + [(mlp_out_hook(L), replace) for L in by_layer]
    feat = torch.zeros(n, tokens.shape[0], transcoders[0].cfg.d_sae, device=tokens.device)
    err = torch.zeros(n, tokens.shape[0], device=tokens.device)
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks)
        upstream = list(range(n))
        if answer_id is not None:
            value = logits[0, -1, answer_id]
        elif logit_weights is not None:
            value = logits[0, -1] @ logit_weights.to(logits)
        else:
            ti, tp, tf = target
            value = pres[ti][0, tp, tf]
            upstream = [i for i in range(n) if transcoders[i].cfg.layer < transcoders[ti].cfg.layer]
        if not upstream:
            return feat, err
        grads = torch.autograd.grad(value, [acts[i] for i in upstream] + [errors[i] for i in upstream],
                                    allow_unused=True)
    for j, i in enumerate(upstream):
        ga, ge = grads[j], grads[len(upstream) + j]
        if ga is not None:
            feat[i] = (acts[i] * ga)[0].detach()
        if ge is not None:
            err[i] = (errors[i] * ge).sum(-1)[0].detach()
    return feat, err


def contrast_weights(answer: str, competitors: Sequence[str], d_vocab: int) -> Tensor:
    """[d_vocab] weights: +1 on the answer, -1/len(competitors) on each competitor (the answer's logit lead)."""
    from interplab.tinyworld import token_id

    w = torch.zeros(d_vocab)
    others = [c for c in competitors if c != answer]
    w[[token_id(c) for c in others]] = -1.0 / len(others)
    w[token_id(answer)] = 1.0
    return w


def attribution_graph(model, transcoders: Sequence[Transcoder], tokens: Tensor, answer_id: int | None = None,
                      logit_weights: Tensor | None = None, n_nodes: int = 8, max_error_nodes: int = 3,
                      edge_threshold: float = 0.05, answer_label: str | None = None) -> dict:
    """A small attribution graph: the features that drive the answer most, and the edges between them.

    Nodes: the ``n_nodes`` (transcoder, position, feature) triples with the largest
    |attribution| to the target (the answer's logit, or ``logits @ logit_weights``), and
    the ``max_error_nodes`` largest error terms among those at least as large as the
    smallest kept feature (position 0, ``<bos>``, is left out: it is the same in every
    prompt). Edges: activation x gradient of each later feature node's pre-activation
    with respect to each earlier node; kept when |edge| >= edge_threshold * the largest.
    Every node's own attribution is its edge to the answer.
    """
    feat, err = feature_attribution_to(model, transcoders, tokens, answer_id=answer_id, logit_weights=logit_weights)
    feat[:, 0], err[:, 0] = 0.0, 0.0
    flat = feat.flatten()
    top = flat.abs().topk(n_nodes).indices
    n_pos, d_sae = feat.shape[1], feat.shape[2]
    nodes = []
    for idx in top.tolist():
        i, rem = divmod(idx, n_pos * d_sae)
        p, f = divmod(rem, d_sae)
        nodes.append({"kind": "feature", "index": i, "layer": transcoders[i].cfg.layer, "pos": p, "feature": f,
                      "attr": float(feat[i, p, f])})
    smallest = min(abs(nd["attr"]) for nd in nodes)
    big = [(abs(float(err[i, p])), i, p) for i in range(err.shape[0]) for p in range(err.shape[1])
           if abs(float(err[i, p])) >= smallest]
    for _, i, p in sorted(big, reverse=True)[:max_error_nodes]:
        nodes.append({"kind": "error", "index": i, "layer": transcoders[i].cfg.layer, "pos": p, "feature": None,
                      "attr": float(err[i, p])})
    edges = []
    for t in nodes:
        if t["kind"] != "feature":
            continue
        f_in, e_in = feature_attribution_to(model, transcoders, tokens, target=(t["index"], t["pos"], t["feature"]))
        for s in nodes:
            if s["layer"] >= t["layer"]:
                continue
            w = float(f_in[s["index"], s["pos"], s["feature"]]) if s["kind"] == "feature" else float(e_in[s["index"], s["pos"]])
            edges.append({"source": nodes.index(s), "target": nodes.index(t), "weight": w})
    if edges:
        biggest = max(abs(e["weight"]) for e in edges)
        edges = [e for e in edges if abs(e["weight"]) >= edge_threshold * biggest]
    if answer_label is None:
        answer_label = f"logit({model.tokenizer.decode([answer_id])})" if answer_id is not None else "target"
    return {"tokens": [model.tokenizer.decode([int(t)]) for t in tokens], "answer": answer_label,
            "nodes": nodes, "edges": edges, "feature_total": float(feat.sum()), "error_total": float(err.sum())}


def node_label(model, transcoders: Sequence[Transcoder], node: dict) -> str:
    """A short label for a graph node: L<layer>/<feature>, the token its de-embedding likes most and its top logit."""
    if node["kind"] == "error":
        return f"L{node['layer']} error"
    tc = transcoders[node["index"]]
    de = de_embedding(model, tc, node["feature"])
    out = feature_logit_effect(model, tc, node["feature"])
    dec = lambda i: model.tokenizer.decode([int(i)])  # noqa: E731
    return f"L{node['layer']}/{node['feature']}\nin: {dec(de.argmax())}\nout: {dec(out.argmax())}"


def draw_attribution_graph(graph: dict, labels: Sequence[str] | None = None, title: str = ""):
    """Draw a graph from `attribution_graph` with matplotlib: x = token position, y = layer; returns the figure."""
    import matplotlib.pyplot as plt

    nodes, edges, tokens = graph["nodes"], graph["edges"], graph["tokens"]
    n_layers = max(nd["layer"] for nd in nodes) + 1
    # one column block per token that has nodes, as wide as its busiest layer
    count: dict[tuple[int, int], int] = {}
    for nd in nodes:
        count[(nd["pos"], nd["layer"])] = count.get((nd["pos"], nd["layer"]), 0) + 1
    columns = sorted({nd["pos"] for nd in nodes})
    width = {p: max(c for (q, _), c in count.items() if q == p) for p in columns}
    start, total = {}, 0.0
    for p in columns:
        start[p], total = total, total + width[p] + 0.5
    pos, used = {}, {}
    for k, nd in enumerate(nodes):
        key = (nd["pos"], nd["layer"])
        j = used.get(key, 0)
        used[key] = j + 1
        pos[k] = (start[nd["pos"]] + j + (width[nd["pos"]] - count[key]) / 2, nd["layer"])
    answer_xy = ((total - 0.5) / 2 - 0.5, n_layers + 0.2)
    fig, ax = plt.subplots(figsize=(min(13, 2.5 + 1.5 * total), 6))
    biggest = max([abs(e["weight"]) for e in edges] + [abs(nd["attr"]) for nd in nodes] + [1e-9])
    for e in edges:
        (x0, y0), (x1, y1) = pos[e["source"]], pos[e["target"]]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(
            arrowstyle="->", lw=0.5 + 4 * abs(e["weight"]) / biggest, alpha=0.6,
            color="tab:blue" if e["weight"] > 0 else "tab:red"))
    for k, nd in enumerate(nodes):
        x, y = pos[k]
        ax.annotate("", xy=answer_xy, xytext=(x, y), arrowprops=dict(
            arrowstyle="->", lw=0.5 + 4 * abs(nd["attr"]) / biggest, alpha=0.25, linestyle="--",
            color="tab:blue" if nd["attr"] > 0 else "tab:red"))
        face = "lightgrey" if nd["kind"] == "error" else "moccasin"
        text = labels[k] if labels is not None else (f"L{nd['layer']} err" if nd["kind"] == "error"
                                                     else f"L{nd['layer']}/{nd['feature']}")
        ax.text(x, y, f"{text}\n{nd['attr']:+.2f}", ha="center", va="center", fontsize=7,
                bbox=dict(boxstyle="round", fc=face, ec="grey"))
    ax.text(*answer_xy, graph["answer"], ha="center", va="center", fontsize=9,
            bbox=dict(boxstyle="round", fc="lightgreen", ec="grey"))
    ax.set_xticks([start[p] + (width[p] - 1) / 2 for p in columns])
    ax.set_xticklabels([f"'{tokens[p]}' (position {p})" for p in columns])
    ax.set_yticks(range(n_layers))
    ax.set_yticklabels([f"MLP {L}" for L in range(n_layers)])
    ax.set_xlim(-0.8, total - 0.7)
    ax.set_ylim(-0.7, n_layers + 0.6)
    ax.set_title(title or "attribution graph (blue: excites, red: inhibits; dashed: to the answer)")
    fig.tight_layout()
    return fig


@torch.no_grad()
def fact_recall_check(model, transcoders: Sequence[Transcoder], relation: str = "city", people: Sequence[str] | None = None,
                      top: int = 3) -> dict:
    """Score the fact-recall circuit against TinyWorld's known facts, person by person.

    For every person, prompt "where does P live ?" (or the relation's question) and
    attribute the true value's LEAD (its logit minus the mean logit of the other values
    of the relation, e.g. the other nine cities) to every transcoder feature, with
    `feature_attribution_to`. The lead isolates what picks THIS city over the others;
    the plain logit also credits features that only say "a city comes next". Then check:

    - "person_feature": the most active layer-0 feature on the person's token has the
      person's name as its top de-embedding token (a feature that fires on the name);
    - "value_feature": among the ``top`` features with the largest attribution, one has
      the true value as the value its decoder row promotes most (through the unembedding);
    - "selectivity": for that value-writing feature, the AUROC of its activation at the
      last position, over the prompts of every person asked about, for "this person's
      value is the same" (1.0: it fires exactly for the people who live in that city);
    - "model_correct": the model's top prediction is the true value.

    Position 0 (``<bos>``) is left out: it is the same in every prompt. Returns the
    per-person rows, the fractions, the mean selectivity, the mean share of |attribution|
    on error terms, and where (layer, token) the value-writing features sit.
    """
    from collections import Counter

    from interplab.tinyworld import CAST, RELATIONS, WORLD, encode, token_id

    values = RELATIONS[relation][2]
    value_ids = torch.tensor([token_id(v) for v in values])
    device = next(model.parameters()).device
    people = list(people or CAST)
    truths = [WORLD.value(p, relation) for p in people]
    batch = torch.tensor([encode(fact_prompt(p, relation)) for p in people], device=device)
    _, cache = model.run_with_cache(batch, names_filter=[mlp_in_hook(tc.cfg.layer) for tc in transcoders])
    last = [tc.encode(cache[mlp_in_hook(tc.cfg.layer)][:, -1]) for tc in transcoders]  # [people, d_sae] each
    rows, where = [], Counter()
    for k, person in enumerate(people):
        words = fact_prompt(person, relation)
        ids = torch.tensor(encode(words), device=device)
        truth = WORLD.value(person, relation)
        weights = contrast_weights(truth, values, model.cfg.d_vocab)
        feat, err = feature_attribution_to(model, transcoders, ids, logit_weights=weights)
        feat[:, 0], err[:, 0] = 0.0, 0.0
        person_pos = words.index(person)
        first = min(range(len(transcoders)), key=lambda j: transcoders[j].cfg.layer)
        i, f = first, int(transcoders[first].encode(cache[mlp_in_hook(transcoders[first].cfg.layer)][k, person_pos]).argmax())
        de = de_embedding(model, transcoders[i], f)
        person_feature = model.tokenizer.decode([int(de.argmax())]) == person
        flat = feat.flatten()
        writes = []
        for idx in flat.topk(top).indices.tolist():
            li, rem = divmod(idx, feat.shape[1] * feat.shape[2])
            p, ff = divmod(rem, feat.shape[2])
            effect = feature_logit_effect(model, transcoders[li], ff)[value_ids.to(device)]
            writes.append({"layer": transcoders[li].cfg.layer, "pos": p, "token": words[p], "feature": ff,
                           "attr": round(float(flat[idx]), 3), "writes": values[int(effect.argmax())]})
            if writes[-1]["writes"] == truth:
                where[(writes[-1]["layer"], "name" if p == person_pos else words[p])] += 1
        logits = model(ids[None])[0, -1]
        selectivity = None
        hit = next((w for w in writes if w["writes"] == truth), None)
        same = torch.tensor([t == truth for t in truths])
        if hit is not None and hit["pos"] == len(words) - 1 and 0 < int(same.sum()) < len(people):
            j = next(j for j, tc in enumerate(transcoders) if tc.cfg.layer == hit["layer"])
            scores = last[j][:, hit["feature"]].cpu()
            selectivity = round(float(sae_sol.feature_aurocs(scores[:, None], same)[0]), 3)
        rows.append({"person": person, "truth": truth, "person_layer": transcoders[i].cfg.layer, "person_feature_id": f,
                     "person_feature": person_feature, "top_features": writes, "selectivity": selectivity,
                     "value_feature": hit is not None,
                     "model_correct": model.tokenizer.decode([int(logits.argmax())]) == truth,
                     "lead": round(float(logits @ weights.to(logits)), 3),
                     "error_share": round(float(err.abs().sum() / (feat.abs().sum() + err.abs().sum())), 3)})
    n = len(rows)
    return {"rows": rows, "person_feature": sum(r["person_feature"] for r in rows) / n,
            "value_feature": sum(r["value_feature"] for r in rows) / n,
            "model_correct": sum(r["model_correct"] for r in rows) / n,
            "mean_error_share": round(sum(r["error_share"] for r in rows) / n, 4),
            "mean_selectivity": round(sum(sel) / len(sel), 4) if (sel := [r["selectivity"] for r in rows
                                                                          if r["selectivity"] is not None]) else None,
            "selective": sum(x >= 0.9 for x in sel) / n if sel else 0.0,
            "value_features_at": {f"MLP {L} at {tok}": c for (L, tok), c in where.most_common()}}


# =====================================================================================
# Reproducing the shipped transcoders
# =====================================================================================

def train_shipped(model=None, out: Path | None = None, layers: Sequence[int] | None = None,
                  kinds: Sequence[str] = KINDS, progress: bool = True, **overrides) -> dict:
    """Train the shipped transcoders, skip transcoders and SAE baselines (``kinds``) of every MLP layer.

    Every module is trained from its own seed on the same cached pairs, so training a
    subset of kinds or layers gives the same weights as training them all.
    """
    from interplab import load_model

    model = model or load_model("tinyworld", device="cpu")
    settings = {**TRAIN, **{k: v for k, v in overrides.items() if k in TRAIN}}
    recipe = {**RECIPE, **{k: v for k, v in overrides.items() if k in RECIPE}}
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    t0 = time.time()
    _, ids, mask = dataset(settings["n_docs"], seed=settings["seed"], split="train")
    pairs = collect_pairs(model, ids, mask, layers, progress=progress)
    collected = round(time.time() - t0, 1)
    del ids, mask
    _, eval_ids, eval_mask = dataset(300, seed=1, split="test")
    train_kw = dict(steps=settings["steps"], batch_size=settings["batch_size"], lr=settings["lr"],
                    seed=settings["seed"], progress=progress)
    report = {"collect_seconds": collected, "tokens": int(pairs[layers[0]][0].shape[0]), "layers": {}}
    for L in layers:
        x, y = pairs[L]
        made = {}
        for kind, skip in (("transcoder", False), ("skip", True)):
            if kind in kinds:
                cfg = TranscoderConfig(d_in=x.shape[-1], d_out=y.shape[-1], skip=skip, layer=L, **recipe)
                made[kind] = train_transcoder(x, y, cfg, **train_kw)
        if "sae" in kinds:
            sae_cfg = sae_sol.SAEConfig(d_in=y.shape[-1], hook_name=mlp_out_hook(L), **recipe)
            made["sae"] = sae_sol.train_sae(y, sae_cfg, **train_kw)
        ev = compare_layer(model, L, made.get("transcoder"), eval_ids, eval_mask, skip=made.get("skip"),
                           sae=made.get("sae"))
        report["layers"][L] = ev
        for kind, module in made.items():
            row = next(r for r in ev if r["method"] == METHOD_NAMES[kind])
            info = {**module.info, "n_docs": settings["n_docs"], "training_tokens": int(x.shape[0]),
                    "eval": {"docs": 300, "seed": 1, "split": "test", **row}}
            folder = shipped_folder(L, kind) if out is None else Path(out) / shipped_folder(L, kind).name
            module.save(folder, extra=info)
        print(json.dumps(ev))
    report["total_seconds"] = round(time.time() - t0, 1)
    return report


@torch.no_grad()
def evaluate_shipped(model=None, n_docs: int = 100, seed: int = 1) -> dict:
    """The chapter's headline numbers for the shipped transcoders: the per-layer table and the replacement model."""
    from interplab import load_model

    model = model or load_model("tinyworld", device="cpu")
    _, ids, mask = dataset(n_docs, seed=seed, split="test")
    n = model.cfg.n_layers
    table = []
    for L in range(n):
        table += compare_layer(model, L, load_transcoder(L), ids, mask, skip=load_transcoder(L, skip=True),
                               sae=load_sae_baseline(L))
    out = {"table": table,
           "replacement": replacement_loss(model, load_transcoders(n_layers=n), ids, mask),
           "replacement_skip": replacement_loss(model, load_transcoders(skip=True, n_layers=n), ids, mask)}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m interplab.solutions.ch04_transcoders", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", nargs="*", type=int, default=None, help="which MLP layers (default: all)")
    p.add_argument("--out", type=Path, default=None, help="folder for the output folders (default: the package's weights)")
    p.add_argument("--evaluate", action="store_true", help="print the table and the replacement model's loss")
    p.add_argument("--steps", type=int, default=TRAIN["steps"], help="optimizer steps per module")
    p.add_argument("--n-docs", type=int, default=TRAIN["n_docs"], help="training documents")
    p.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS, help="which modules to train")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from interplab import load_model

    model = load_model("tinyworld", device="cpu")
    if a.evaluate:
        print(json.dumps(evaluate_shipped(model), indent=1))
        return
    report = train_shipped(model, out=a.out, layers=a.layers, kinds=a.kinds, steps=a.steps, n_docs=a.n_docs)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
