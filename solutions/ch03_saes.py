"""Chapter 3 (sparse autoencoders): reference solutions, the SAE module and its training loop.

    python -m interplab.solutions.ch03_saes              # retrain the shipped SAEs (each well under 2 min on 2 CPU cores)
    python -m interplab.solutions.ch03_saes --sweep      # the sparsity-fidelity sweep, written to sweep.json
    python -m interplab.solutions.ch03_saes --evaluate   # metrics and ground-truth recovery of the shipped SAEs

The functions named like the chapter's exercises (`sae_encode`, `sae_loss`, ...) are
the single source of truth for what each exercise asks. `SAE` is an ``nn.Module``
built from them: standard (ReLU + L1), TopK and BatchTopK architectures, with a
pre-encoder bias (``b_dec`` subtracted from the input) and unit-norm decoder rows.
Its input and its reconstruction target may differ (``d_out``, ``hook_name_out``), so
the transcoder chapter reuses it unchanged.

Shapes follow SAELens: ``W_enc`` is [d_in, d_sae], ``W_dec`` is [d_sae, d_out], so each
feature's decoder direction (a column of the decoder matrix in the papers' notation)
is a row ``W_dec[i]``. `SAE.to_saelens` converts to the matching SAELens 6 class and
`SAE.save` writes a folder (``cfg.json`` + ``sae_weights.safetensors``) that SAELens's
``SAE.load_from_disk`` also reads.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

DEFAULT_HOOK = "blocks.1.hook_resid_post"
ARCHITECTURES = ("standard", "topk", "batchtopk")
WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"


# =====================================================================================
# Building an SAE (exercises)
# =====================================================================================

def sae_encode(
    x: Float[Tensor, "batch d_in"],
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, " d_sae"],
    b_dec: Float[Tensor, " d_in"],
) -> Float[Tensor, "batch d_sae"]:
    """Feature activations of a standard SAE.

    The decoder bias is subtracted from the input first (the "pre-encoder bias"), so
    that the encoder sees activations centred where the decoder's reconstructions are.

    Args:
        x: input activations (any number of leading dimensions is fine).
        W_enc: encoder weights.
        b_enc: encoder bias.
        b_dec: decoder bias.

    Returns:
        ReLU((x - b_dec) @ W_enc + b_enc).
    """
    return torch.relu((x - b_dec) @ W_enc + b_enc)


def sae_loss(
    x: Float[Tensor, "batch d"],
    x_hat: Float[Tensor, "batch d"],
    acts: Float[Tensor, "batch d_sae"],
    W_dec: Float[Tensor, "d_sae d"],
    l1_coeff: float,
) -> tuple[Float[Tensor, ""], Float[Tensor, ""], Float[Tensor, ""]]:
    """The training loss of a standard SAE: reconstruction error plus an L1 sparsity penalty.

    The L1 penalty weights each feature's activation by the norm of its decoder row,
    so that the SAE cannot shrink its activations and grow its decoder to dodge the
    penalty (the convention of Anthropic's April 2024 update and of SAELens).

    Args:
        x: the activations to reconstruct.
        x_hat: the SAE's reconstruction of them.
        acts: the SAE's feature activations.
        W_dec: decoder weights; row i is feature i's direction.
        l1_coeff: weight of the sparsity penalty.

    Returns:
        (loss, mse, l1), three scalar tensors:
        mse = squared error summed over the last dimension, averaged over the batch;
        l1 = sum_i |acts[:, i]| * ||W_dec[i]||, averaged over the batch;
        loss = mse + l1_coeff * l1.
    """
    mse = (x_hat - x).pow(2).sum(dim=-1).mean()
    l1 = (acts.abs() * W_dec.norm(dim=-1)).sum(dim=-1).mean()
    return mse + l1_coeff * l1, mse, l1


def remove_parallel_grad(W_dec: Float[Tensor, "d_sae d"], grad: Float[Tensor, "d_sae d"]) -> Float[Tensor, "d_sae d"]:
    """The gradient of the decoder with the component along each decoder row removed.

    With unit-norm decoder rows, a gradient step along a row would only change its
    norm, which the renormalisation after the step undoes anyway; removing that
    component first keeps the optimizer's statistics for what actually moves.

    Args:
        W_dec: decoder weights (rows need not be exactly unit norm).
        grad: the gradient of the loss with respect to W_dec.

    Returns:
        grad[i] - (grad[i] . u_i) u_i for every row i, where u_i = W_dec[i] / ||W_dec[i]||.
    """
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True)
    parallel = (grad * unit).sum(dim=-1, keepdim=True) * unit
    return grad - parallel


def topk_activation(pre_acts: Float[Tensor, "batch d_sae"], k: int) -> Float[Tensor, "batch d_sae"]:
    """The TopK activation: in each row keep the k largest pre-activations (ReLU'd), zero the rest.

    Args:
        pre_acts: encoder outputs before the activation function.
        k: how many features may fire per row (per token).

    Returns:
        A tensor like pre_acts: at the k largest entries of each row, max(value, 0);
        everywhere else 0.
    """
    values, indices = pre_acts.topk(k, dim=-1)
    return torch.zeros_like(pre_acts).scatter(-1, indices, values.relu())


def batchtopk_activation(pre_acts: Float[Tensor, "batch d_sae"], k: int) -> Float[Tensor, "batch d_sae"]:
    """The BatchTopK activation: keep the k * batch largest ReLU'd pre-activations of the whole batch.

    Like TopK, but the budget of k active features per token is shared across the
    batch: an easy token may use fewer features and a hard one more.

    Args:
        pre_acts: encoder outputs before the activation function, [batch, d_sae].
        k: the average number of active features per row.

    Returns:
        ReLU(pre_acts) at its k * batch largest entries (over the whole batch), 0 elsewhere.
    """
    acts = pre_acts.relu()
    flat = acts.flatten()
    n_keep = min(k * pre_acts.shape[0], flat.numel())
    values, indices = flat.topk(n_keep)
    return torch.zeros_like(flat).scatter(0, indices, values).reshape(acts.shape)


def resample_dead_features(
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, " d_sae"],
    W_dec: Float[Tensor, "d_sae d_in"],
    dead: Bool[Tensor, " d_sae"],
    x: Float[Tensor, "batch d_in"],
    x_hat: Float[Tensor, "batch d_in"],
    encoder_scale: float = 0.2,
) -> tuple[Float[Tensor, "d_in d_sae"], Float[Tensor, " d_sae"], Float[Tensor, "d_sae d_in"]]:
    """Point dead features at the inputs the SAE reconstructs worst (returns new tensors).

    A simplified, deterministic version of the resampling of Anthropic's "Towards
    Monosemanticity": a feature that never fires gets no gradient and never recovers,
    so give it a new direction where the SAE currently fails.

    Take the rows of x with the largest squared error ||x - x_hat||^2, as many as there
    are dead features (largest first; if there are more dead features than rows, reuse
    the rows cyclically). For the j-th dead feature (in increasing index order) and the
    j-th of those rows, let r = (x - x_hat)[row] / ||(x - x_hat)[row]||. Then:

    - W_dec[feature] = r (a unit-norm decoder direction);
    - W_enc[:, feature] = r * encoder_scale * (the mean norm of the encoder columns of
      the live features; 1.0 if no feature is alive);
    - b_enc[feature] = 0.

    Live features and the inputs are left unchanged.

    Args:
        W_enc, b_enc, W_dec: the SAE's weights.
        dead: which features are dead.
        x: a batch of inputs.
        x_hat: the SAE's reconstructions of x.
        encoder_scale: how large the new encoder columns are, relative to the live
            ones (0.2 in Anthropic's recipe for ReLU SAEs; a TopK SAE needs about 1 for
            a resampled feature to make it into the top k at all).

    Returns:
        (W_enc, b_enc, W_dec), new tensors.
    """
    W_enc, b_enc, W_dec = W_enc.clone(), b_enc.clone(), W_dec.clone()
    n_dead = int(dead.sum())
    if n_dead == 0:
        return W_enc, b_enc, W_dec
    residual = x - x_hat
    errors = residual.pow(2).sum(dim=-1)
    worst = errors.topk(min(n_dead, errors.shape[0])).indices
    rows = worst[torch.arange(n_dead) % worst.shape[0]]
    directions = residual[rows] / residual[rows].norm(dim=-1, keepdim=True).clamp_min(1e-8)
    alive = ~dead
    enc_norm = W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    W_dec[dead] = directions
    W_enc[:, dead] = directions.T * encoder_scale * enc_norm
    b_enc[dead] = 0.0
    return W_enc, b_enc, W_dec


# =====================================================================================
# The SAE module
# =====================================================================================

@dataclass
class SAEConfig:
    """What an SAE is: its sizes, its architecture and where in which model it reads.

    Attributes:
        d_in: input dimension (d_model for the residual stream).
        d_sae: number of features.
        architecture: "standard" (ReLU + L1 penalty), "topk" or "batchtopk".
        k: active features per token (topk; on average for batchtopk).
        l1_coeff: weight of the L1 penalty (standard).
        d_out: dimension of the reconstruction target; None means d_in (an SAE).
            A transcoder reads one activation and predicts another.
        apply_b_dec_to_input: subtract b_dec from the input before encoding (SAEs
            yes; transcoders, whose input and output differ, no).
        hook_name: the hook point the SAE reads (and, for an SAE, replaces).
        hook_name_out: the hook point whose activation is reconstructed (transcoders).
        model_name: the model the SAE was trained on.
    """

    d_in: int
    d_sae: int
    architecture: str = "standard"
    k: int = 16
    l1_coeff: float = 1.0
    d_out: int | None = None
    apply_b_dec_to_input: bool = True
    hook_name: str = DEFAULT_HOOK
    hook_name_out: str | None = None
    model_name: str = "tinyworld"

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, not {self.architecture!r}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.d_out is None:
            self.d_out = self.d_in
        if self.architecture != "standard" and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be between 1 and d_sae={self.d_sae}, got {self.k}")
        if self.apply_b_dec_to_input and self.d_out != self.d_in:
            raise ValueError("apply_b_dec_to_input needs d_out == d_in (input and target in the same space)")

    @property
    def is_transcoder(self) -> bool:
        return self.hook_name_out is not None and self.hook_name_out != self.hook_name


@dataclass
class SAEOutput:
    """One training forward pass: the loss and its parts, the activations and the reconstruction."""

    loss: Tensor
    mse: Tensor
    l1: Tensor
    acts: Tensor
    x_hat: Tensor


class UnitNormDictionary(nn.Module):
    """What SAEs and transcoders share: a decoder ``W_dec`` [d_sae, d_out] whose rows are kept at
    unit norm during training, and a clear error for input of the wrong kind or size.

    Subclasses set ``KIND`` (how errors name them), ``CONFIG`` (their config class, built from the
``interplab`` part of cfg.json on load) and ``cfg`` (with ``d_in`` and ``hook_name``).
    """

    KIND = "a sparse dictionary"

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.KIND} takes a tensor of activations, got {type(x).__name__}")
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"this {self.KIND.split(' ', 1)[1]} reads vectors of size d_in={self.cfg.d_in} "
                             f"({self.cfg.hook_name}); got activations of shape {tuple(x.shape)}")

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit norm (in place)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Remove the component of W_dec's gradient along each decoder row (in place)."""
        if self.W_dec.grad is not None:
            self.W_dec.grad.copy_(remove_parallel_grad(self.W_dec, self.W_dec.grad))

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None, check: bool = True):
        """Load a folder written by ``save`` (verified against its SHA256SUMS first)."""
        from interplab.weights import verify
        from safetensors.torch import load_file

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder with {cls.KIND} ({CONFIG_FILE} and {WEIGHTS_FILE})")
        if check:
            verify(folder, [CONFIG_FILE, WEIGHTS_FILE])
        raw = json.loads((folder / CONFIG_FILE).read_text())
        module = cls(cls.CONFIG(**raw["interplab"]))
        state = load_file(str(folder / WEIGHTS_FILE))
        threshold = state.pop("threshold", None)  # SAELens stores one per feature; ours is one number
        module.load_state_dict({**state, "threshold": module.threshold if threshold is None else threshold[0]})
        module.info = raw.get("interplab_info", {})
        module.eval()
        return module.to(device) if device else module


class SAE(UnitNormDictionary):
    """A sparse autoencoder (or, with d_out / hook_name_out, a transcoder).

        acts  = activation((x - b_dec) @ W_enc + b_enc)     # b_dec subtracted only if apply_b_dec_to_input
        x_hat = acts @ W_dec + b_dec

    Decoder rows are kept at unit norm during training. A BatchTopK SAE uses its
    batch-level selection while training and, in eval mode, a threshold learned
    during training (a JumpReLU), so that a token's features do not depend on the
    other tokens of its batch.
    """

    KIND = "an SAE"
    CONFIG = SAEConfig

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out
        W_dec = torch.randn(d_sae, d_out, generator=generator)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
        if d_in == d_out:
            W_enc = W_dec.T.clone()
        else:
            W_enc = torch.randn(d_in, d_sae, generator=generator) / math.sqrt(d_in)
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        # BatchTopK only: the activation threshold used in eval mode (a running estimate).
        self.register_buffer("threshold", torch.zeros(()))
        self.info: dict = {}

    def extra_repr(self) -> str:
        c = self.cfg
        sparsity = f"l1_coeff={c.l1_coeff:g}" if c.architecture == "standard" else f"k={c.k}"
        return f"{c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}, d_out={c.d_out}, {sparsity}, hook={c.hook_name!r}"

    # --- forward ---------------------------------------------------------------------

    def _input_bias(self) -> Tensor:
        return self.b_dec if self.cfg.apply_b_dec_to_input else torch.zeros_like(self.W_enc[:, 0])

    def pre_acts(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Encoder outputs before the activation function."""
        return (x - self._input_bias()) @ self.W_enc + self.b_enc

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations."""
        self._check_input(x)
        arch = self.cfg.architecture
        if arch == "standard":
            return sae_encode(x, self.W_enc, self.b_enc, self._input_bias())
        pre = self.pre_acts(x)
        if arch == "topk":
            return topk_activation(pre, self.cfg.k)
        if self.training:
            flat = batchtopk_activation(pre.reshape(-1, self.cfg.d_sae), self.cfg.k)
            with torch.no_grad():  # running estimate of the smallest activation kept
                kept = flat[flat > 0]
                if kept.numel():
                    self.threshold.lerp_(kept.min().to(self.threshold.dtype), 0.01)
            return flat.reshape(pre.shape)
        return pre * (pre > self.threshold)

    def decode(self, acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_out"]:
        """The reconstruction from feature activations."""
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        return self.decode(self.encode(x))

    def loss(self, x: Float[Tensor, "batch d_in"], target: Float[Tensor, "batch d_out"] | None = None) -> SAEOutput:
        """The training loss on a batch (target defaults to x: an SAE reconstructs its input)."""
        target = x if target is None else target
        acts = self.encode(x)
        x_hat = self.decode(acts)
        total, mse, l1 = sae_loss(target, x_hat, acts, self.W_dec, self.cfg.l1_coeff)
        if self.cfg.architecture != "standard":
            total = mse  # the sparsity is enforced by the activation function, not by a penalty
        return SAEOutput(total, mse, l1, acts, x_hat)

    # --- saving, loading, SAELens ----------------------------------------------------

    def config_dict(self) -> dict:
        """The config in SAELens's cfg.json layout (plus interplab's own fields)."""
        c = self.cfg
        d = {
            "architecture": c.architecture if c.architecture != "batchtopk" else "jumprelu",
            "d_in": c.d_in, "d_sae": c.d_sae, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": c.apply_b_dec_to_input, "normalize_activations": "none",
            "reshape_activations": "none",
            # sae_lens_version marks the file as SAELens 6 format (older layouts are converted on load)
            "metadata": {"sae_lens_version": "6.0.0", "model_name": c.model_name, "hook_name": c.hook_name,
                         "hook_head_index": None, "prepend_bos": True, "context_size": 128,
                         "dataset_path": "interplab.tinyworld"},
            "interplab": asdict(c),
        }
        if c.architecture == "topk":
            d["k"] = c.k
        return d

    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        """Write cfg.json and sae_weights.safetensors (readable by SAELens's SAE.load_from_disk) and SHA256SUMS."""
        from interplab.weights import write_checksums
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().clone() for k, v in self._saelens_state().items()}
        save_file(state, str(folder / WEIGHTS_FILE))
        cfg = self.config_dict()
        if extra:
            cfg["interplab_info"] = extra
        (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        write_checksums(folder)
        return folder

    def _saelens_state(self) -> dict[str, Tensor]:
        state = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.cfg.architecture == "batchtopk":
            state["threshold"] = self.threshold.expand(self.cfg.d_sae)
        return state

    def to_saelens(self):
        """The same SAE as a SAELens 6 object: StandardSAE, TopKSAE, or (batchtopk) JumpReLUSAE."""
        from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
        from sae_lens.saes.sae import SAEMetadata

        if self.cfg.is_transcoder:
            raise NotImplementedError("use SAELens's Transcoder classes for transcoders")
        c = self.cfg
        meta = SAEMetadata(**self.config_dict()["metadata"])
        common = dict(d_in=c.d_in, d_sae=c.d_sae, dtype="float32", device=str(self.W_enc.device),
                      apply_b_dec_to_input=c.apply_b_dec_to_input, metadata=meta)
        if c.architecture == "standard":
            out = StandardSAE(StandardSAEConfig(**common))
        elif c.architecture == "topk":
            out = TopKSAE(TopKSAEConfig(k=c.k, **common))
        else:
            out = JumpReLUSAE(JumpReLUSAEConfig(**common))
        out.load_state_dict({k: v.detach().clone() for k, v in self._saelens_state().items()})
        return out.eval()


# =====================================================================================
# Training (exercise: train_sae)
# =====================================================================================

def train_sae(
    acts: Float[Tensor, "n d_in"],
    cfg: SAEConfig,
    *,
    target: Float[Tensor, "n d_out"] | None = None,
    steps: int = 1000,
    batch_size: int = 1024,
    lr: float = 1e-3,
    seed: int = 0,
    dead_after: int = 200,
    resample_every: int = 250,
    progress: bool = True,
) -> SAE:
    """Train an SAE on cached activations and return it (in eval mode).

    The recipe:

    1. ``torch.manual_seed(seed)``, then ``sae = SAE(cfg)``; set ``b_dec`` to the mean
       of the target (so the SAE starts by predicting the average activation).
    2. Adam with learning rate ``lr``; the rate decays linearly to 0 over the last 20%
       of the steps.
    3. Each step: a batch of ``batch_size`` rows (shuffled, epoch after epoch);
       ``out = sae.loss(x, y)``; zero the gradients; ``out.loss.backward()``; remove
       the decoder gradient parallel to the decoder rows (``sae.remove_parallel_grad_()``);
       step the optimizer; renormalise the decoder rows (``sae.normalize_decoder_()``).
    4. Track, for every feature, the number of steps since it last fired. Every
       ``resample_every`` steps (during the first 80% of training), the features that
       have not fired for ``dead_after`` steps are dead: give them new weights with
       `resample_dead_features` on the current batch (encoder_scale 0.2 for a standard
       SAE, 1.0 for TopK and BatchTopK) and clear their Adam statistics (the helper
       ``resample_sae_(sae, opt, dead, x, y, out.x_hat)`` does both), reset their
       counters, and count them in ``sae.info["resampled"]``.
    5. Show a tqdm progress bar (unless ``progress=False``).

    Args:
        acts: the SAE's training inputs (e.g. one layer's residual stream, one row per token).
        cfg: the SAE to build.
        target: what to reconstruct (default: acts; a transcoder's is another activation).
        steps: optimizer steps.
        batch_size: rows per step.
        lr: Adam learning rate.
        seed: seed for the initialisation and the batch order.
        dead_after: steps without firing after which a feature counts as dead.
        resample_every: how often to look for dead features.
        progress: show a progress bar.

    Returns:
        The trained SAE, in eval mode, with ``sae.info`` recording the training.
    """
    from tqdm.auto import tqdm

    target = acts if target is None else target
    if acts.ndim != 2 or acts.shape[-1] != cfg.d_in:
        raise ValueError(f"acts must be [n_tokens, d_in={cfg.d_in}], got {tuple(acts.shape)}")
    if target.shape != (acts.shape[0], cfg.d_out):
        raise ValueError(f"target must be [n_tokens={acts.shape[0]}, d_out={cfg.d_out}], got {tuple(target.shape)}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be at least 1, got steps={steps}, batch_size={batch_size}")
    device = acts.device
    torch.manual_seed(seed)
    sae = SAE(cfg).to(device)
    with torch.no_grad():
        sae.b_dec.copy_(target.float().mean(dim=0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    decay_start = int(0.8 * steps)
    order = torch.Generator(device="cpu").manual_seed(seed)
    perm, cursor = torch.randperm(acts.shape[0], generator=order), 0
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=device)
    n_resampled, t0 = 0, time.time()
    sae.train()
    bar = tqdm(range(steps), disable=not progress, desc=f"training {cfg.architecture} SAE", leave=False, mininterval=1.0)
    for step in bar:
        if cursor + batch_size > len(perm):
            perm, cursor = torch.randperm(acts.shape[0], generator=order), 0
        idx = perm[cursor : cursor + batch_size].to(device)
        cursor += batch_size
        x, y = acts[idx], target[idx]
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (steps - step) / max(1, steps - decay_start))
        out = sae.loss(x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()
        with torch.no_grad():
            fired = (out.acts > 0).any(dim=0)
            since_fired = torch.where(fired, 0, since_fired + 1)
            if (step + 1) % resample_every == 0 and step < decay_start:
                dead = since_fired >= dead_after
                if dead.any():
                    resample_sae_(sae, opt, dead, x, y, out.x_hat)
                    since_fired[dead] = 0
                    n_resampled += int(dead.sum())
        if progress and step % 50 == 0:
            bar.set_postfix(loss=f"{out.loss.item():.3g}", L0=f"{(out.acts > 0).float().sum(-1).mean():.1f}",
                            refresh=False)
    bar.close()
    sae.eval()
    sae.info = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "tokens": steps * batch_size,
                "final_loss": round(out.loss.item(), 5), "resampled": n_resampled,
                "seconds": round(time.time() - t0, 1)}
    return sae


@torch.no_grad()
def resample_sae_(sae: SAE, opt: torch.optim.Optimizer, dead: Tensor, x: Tensor, y: Tensor, y_hat: Tensor) -> None:
    """Resample an SAE's dead features in place (with `resample_dead_features`) and clear their Adam statistics.

    x is the batch of inputs, y the targets (x again for an SAE) and y_hat the SAE's
    reconstructions of them. encoder_scale is 0.2 for a standard SAE, 1.0 for TopK and BatchTopK.
    """
    scale = 0.2 if sae.cfg.architecture == "standard" else 1.0
    W_enc, b_enc, W_dec = resample_dead_features(sae.W_enc, sae.b_enc, sae.W_dec, dead, y, y_hat, scale)
    if sae.cfg.d_in != sae.cfg.d_out or sae.cfg.is_transcoder:
        # a transcoder's input lives in another space: encode along the (normalised) inputs instead
        rows = (y - y_hat).pow(2).sum(-1).topk(min(int(dead.sum()), len(y))).indices
        rows = rows[torch.arange(int(dead.sum())) % len(rows)]
        inputs = x[rows] / x[rows].norm(dim=-1, keepdim=True).clamp_min(1e-8)
        alive = ~dead
        norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
        W_enc = sae.W_enc.clone()
        W_enc[:, dead] = inputs.T * scale * norm
    sae.W_enc.copy_(W_enc)
    sae.b_enc.copy_(b_enc)
    sae.W_dec.copy_(W_dec)
    for p, sl in ((sae.W_enc, (slice(None), dead)), (sae.b_enc, (dead,)), (sae.W_dec, (dead,))):
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][sl] = 0.0


# =====================================================================================
# Metrics (exercises)
# =====================================================================================

def explained_variance(x: Float[Tensor, "n d"], x_hat: Float[Tensor, "n d"]) -> float:
    """The fraction of the variance of x that the reconstruction explains (mean-centred).

    Args:
        x: activations, one row per token.
        x_hat: their reconstructions.

    Returns:
        1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, where the sums run over all rows
        and mean(x) is the average row; a Python float.
    """
    x, x_hat = x.double(), x_hat.double()
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(dim=0)).pow(2).sum()
    return (1.0 - residual / total).item()


def reconstruction_metrics(
    x: Float[Tensor, "n d"], x_hat: Float[Tensor, "n d"], acts: Float[Tensor, "n d_sae"]
) -> dict[str, float]:
    """The field's per-token sparsity and fidelity metrics, averaged over tokens.

    Args:
        x: activations, one row per token.
        x_hat: their reconstructions.
        acts: the SAE's feature activations on them.

    Returns:
        A dict of Python floats:
        "l0": the mean number of non-zero features per token;
        "mse": the mean over tokens of ||x - x_hat||^2 (squared error summed over dimensions);
        "cosine_sim": the mean over tokens of the cosine similarity of x and x_hat;
        "l2_ratio": the mean over tokens of ||x_hat|| / ||x|| (below 1 means shrinkage).
    """
    return {
        "l0": (acts != 0).float().sum(dim=-1).mean().item(),
        "mse": (x - x_hat).pow(2).sum(dim=-1).mean().item(),
        "cosine_sim": torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean().item(),
        "l2_ratio": (x_hat.norm(dim=-1) / x.norm(dim=-1)).mean().item(),
    }


def feature_density(acts: Float[Tensor, "n d_sae"]) -> Float[Tensor, " d_sae"]:
    """How often each feature fires: the fraction of tokens on which it is non-zero.

    A feature with density 0 on a large sample is dead.

    Args:
        acts: feature activations, one row per token.

    Returns:
        density[i] = (number of rows with acts[:, i] != 0) / (number of rows), float32.
    """
    return (acts != 0).float().mean(dim=0)


def spliced_loss(model, sae: SAE, tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"]) -> dict[str, float]:
    """How much of the model's performance survives when the SAE replaces its activation.

    Run the model three times: clean; with the activation at ``sae.cfg.hook_name``
    replaced by the SAE's reconstruction at the positions in ``mask`` (other positions
    keep their clean activation); and with that activation zeroed at every position
    (the zero-ablation baseline, as SAELens does it).

    A prediction (logits at position p for the token at p + 1) is scored when both
    mask[b, p] and mask[b, p + 1] are True; all averages run over scored predictions.

    Args:
        model: a HookedTransformer.
        sae: an SAE whose cfg.hook_name is a hook of the model.
        tokens: input ids.
        mask: True at the tokens the SAE reads and replaces (real tokens: not <bos>, not padding).

    Returns:
        A dict of Python floats:
        "ce_clean", "ce_sae", "ce_zero": mean next-token cross-entropy in each run;
        "loss_recovered": (ce_zero - ce_sae) / (ce_zero - ce_clean), 1 when the SAE is perfect;
        "kl_sae": mean KL(clean || with SAE) of the next-token distributions.
    """
    hook = sae.cfg.hook_name
    keep = mask.to(tokens.device)

    def splice(act: Tensor, hook) -> Tensor:
        return torch.where(keep[..., None], sae(act), act)

    def zero(act: Tensor, hook) -> Tensor:
        return torch.zeros_like(act)

    with torch.no_grad():
        clean = model(tokens)
        spliced = model.run_with_hooks(tokens, fwd_hooks=[(hook, splice)])
        zeroed = model.run_with_hooks(tokens, fwd_hooks=[(hook, zero)])
    scored = keep[:, :-1] & keep[:, 1:]
    targets = tokens[:, 1:, None]
    ce = {name: -lg[:, :-1].log_softmax(-1).gather(-1, targets)[..., 0][scored].mean().item()
          for name, lg in (("ce_clean", clean), ("ce_sae", spliced), ("ce_zero", zeroed))}
    log_p = clean[:, :-1].log_softmax(-1)
    log_q = spliced[:, :-1].log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)[scored].mean().item()
    recovered = (ce["ce_zero"] - ce["ce_sae"]) / (ce["ce_zero"] - ce["ce_clean"])
    return {**ce, "loss_recovered": recovered, "kl_sae": kl}


# =====================================================================================
# Interpreting features (exercises)
# =====================================================================================

def top_activating_contexts(
    feature_acts: Float[Tensor, "n_seq pos"], mask: Bool[Tensor, "n_seq pos"], k: int
) -> tuple[Float[Tensor, " k"], Int[Tensor, " k"], Int[Tensor, " k"]]:
    """The k (sequence, position) pairs where one feature fires most strongly.

    Args:
        feature_acts: one feature's activation at every token of a dataset.
        mask: True at tokens to consider (positions outside the mask are ignored).
        k: how many to return (fewer if the mask has fewer than k tokens).

    Returns:
        (values, seq, pos), each of length k, sorted by value, largest first:
        values[j] = feature_acts[seq[j], pos[j]].
    """
    masked = feature_acts.masked_fill(~mask, float("-inf"))
    k = min(k, int(mask.sum()))
    values, flat = masked.flatten().topk(k)
    n_pos = feature_acts.shape[1]
    return values, flat // n_pos, flat % n_pos


def feature_logit_weights(sae: SAE, model, feature: int) -> Float[Tensor, " d_vocab"]:
    """The direct effect of a feature on the logits: its decoder direction times the unembedding.

    This ignores everything between the SAE's layer and the unembedding (later layers
    and the final layer norm's scale), so it is a first guess at what the feature
    makes the model say, not a measurement.

    Args:
        sae: an SAE reading the residual stream.
        model: a HookedTransformer (its unembedding is model.W_U, [d_model, d_vocab]).
        feature: the feature's index.

    Returns:
        sae.W_dec[feature] @ model.W_U, one value per vocabulary token.
    """
    return sae.W_dec[feature] @ model.W_U


def steer_with_feature(
    model, sae: SAE, tokens: Int[Tensor, "batch pos"], feature: int, scale: float
) -> Float[Tensor, "batch pos d_vocab"]:
    """The model's logits when a feature's decoder direction is added to its activations.

    Add ``scale * sae.W_dec[feature]`` to the activation at ``sae.cfg.hook_name``, at
    every position, with a hook (so the model is unchanged afterwards).

    Args:
        model: a HookedTransformer.
        sae: the SAE the feature belongs to.
        tokens: input ids.
        feature: the feature's index.
        scale: how far to move along the feature's (unit-norm) decoder direction.

    Returns:
        The steered logits.
    """
    direction = sae.W_dec[feature].detach()

    def add(act: Tensor, hook) -> Tensor:
        return act + scale * direction

    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=[(sae.cfg.hook_name, add)])


# =====================================================================================
# Ground truth: did the SAE find the planted features? (exercises)
# =====================================================================================

def average_ranks(scores: Float[Tensor, "n d"]) -> Float[Tensor, "d n"]:
    """1-based ranks of each column's values, ties sharing their average rank (float64), as [d, n]."""
    cols = scores.T.contiguous().double()
    sorted_cols = cols.sort(dim=-1).values
    lo = torch.searchsorted(sorted_cols, cols, right=False)
    hi = torch.searchsorted(sorted_cols, cols, right=True)
    return (lo + hi + 1).double() / 2


def feature_aurocs(acts: Float[Tensor, "n d_sae"], labels: Bool[Tensor, " n"]) -> Float[Tensor, " d_sae"]:
    """How well each feature, used as a score, separates tokens with a latent from those without.

    The AUROC of feature i is the probability that a random positive token has a
    higher activation than a random negative one, counting ties as one half. (SAE
    features are zero on most tokens, so ties are everywhere: they must count half.)

    Args:
        acts: feature activations, one row per token.
        labels: True where the latent is present; needs at least one positive and one negative.

    Returns:
        One AUROC per feature, float32; 0.5 is chance, 1 a perfect detector.
    """
    labels = labels.bool()
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("labels need at least one positive and one negative token")
    ranks = average_ranks(acts)
    rank_sum = ranks[:, labels].sum(dim=-1)
    return ((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).float()


def max_f1(scores: Float[Tensor, " n"], labels: Bool[Tensor, " n"]) -> float:
    """The best F1 of "score >= t" as a detector of the labels, over every threshold t.

    Only thresholds equal to a value of ``scores`` count: tokens with the same score
    are always predicted alike.

    Args:
        scores: one feature's activation per token.
        labels: True where the latent is present (at least one).

    Returns:
        max over t in scores of F1(predict scores >= t), a Python float; F1 = 2PR / (P + R).
    """
    labels = labels.bool()
    n_pos = int(labels.sum())
    if n_pos == 0:
        raise ValueError("labels need at least one positive token")
    order = scores.argsort(descending=True)
    s, y = scores[order], labels[order].double()
    tp = y.cumsum(0)
    predicted = torch.arange(1, len(s) + 1, dtype=torch.float64, device=s.device)
    end_of_group = torch.ones(len(s), dtype=torch.bool, device=s.device)
    end_of_group[:-1] = s[:-1] != s[1:]
    f1 = 2 * tp / (predicted + n_pos)
    return f1[end_of_group].max().item()


# =====================================================================================
# Helpers used by the chapter (not exercises)
# =====================================================================================

SHIPPED = {
    "topk": "sae_tinyworld_resid1_topk",
    "standard": "sae_tinyworld_resid1_standard",
    "batchtopk": "sae_tinyworld_resid1_batchtopk",
    "sweep": "sae_tinyworld_resid1_sweep",  # the sparsity-fidelity sweep (sweep.json), not an SAE
}

# The recipes of the shipped SAEs; `python -m interplab.solutions.ch03_saes` retrains them.
RECIPES = {
    "topk": dict(architecture="topk", d_sae=768, k=16),
    "standard": dict(architecture="standard", d_sae=768, l1_coeff=8.0),
    "batchtopk": dict(architecture="batchtopk", d_sae=768, k=16),
}
TRAIN = dict(n_docs=12_000, steps=1200, batch_size=1024, lr=2e-3, seed=0)


def shipped_folder(name: str = "topk") -> Path:
    from interplab.weights import WEIGHTS_DIR

    if name not in SHIPPED:
        raise KeyError(f"no shipped SAE called {name!r}; choose one of {sorted(SHIPPED)}")
    return WEIGHTS_DIR / SHIPPED[name]


def load_sae(name: str = "topk", device: str | None = None) -> SAE:
    """One of the SAEs shipped for the bundled model ("topk", "standard" or "batchtopk"), checksum-verified."""
    return SAE.load(shipped_folder(name), device=device)


def sae_token_mask(ids: Tensor, mask: Tensor) -> Tensor:
    """Positions an SAE reads: real tokens (mask) except <bos>."""
    from interplab.tinyworld import token_id

    return mask & (ids != token_id("<bos>"))


def tinyworld_dataset(n_docs: int, seed: int, split: str = "test"):
    """(docs, ids [n_docs, pos], sae_mask [n_docs, pos]) of fresh TinyWorld documents."""
    from interplab import tinyworld

    docs = tinyworld.generate(n_docs, seed=seed, split=split)
    ids, mask = tinyworld.batch_tokens(docs)
    return docs, ids, sae_token_mask(ids, mask)


def collect_acts(model, ids: Tensor, mask: Tensor, hook: str = DEFAULT_HOOK, progress: bool = False) -> Tensor:
    """[n_kept, d] activations at ``hook`` for the masked positions (row-major order)."""
    from interplab.activations import collect

    return collect(model, ids, hook, mask=mask, batch_size=256, progress=progress)[hook]


@torch.no_grad()
def evaluate_sae(model, sae: SAE, ids: Tensor, mask: Tensor, acts: Tensor | None = None) -> dict[str, float]:
    """Every metric of the chapter for one SAE on one dataset (a flat dict of floats)."""
    x = collect_acts(model, ids, mask, sae.cfg.hook_name) if acts is None else acts
    f = sae.encode(x)
    x_hat = sae.decode(f)
    density = feature_density(f)
    out = {"explained_variance": explained_variance(x, x_hat), **reconstruction_metrics(x, x_hat, f),
           "dead_features": int((density == 0).sum()), "dense_features": int((density > 0.1).sum())}
    out.update(spliced_loss(model, sae, ids, mask))
    return {k: round(float(v), 4) for k, v in out.items()}


# =====================================================================================
# Any model: TinyWorld text through another tokenizer, and memory-bounded splicing
# =====================================================================================

def middle_layer(model) -> int:
    """The layer the chapters study by default: ``(n_layers - 1) // 2``.

    Layer 1 of TinyWorld's 4 (the shipped SAEs' layer), layer 5 of gpt2-small's 12.
    """
    return (model.cfg.n_layers - 1) // 2


def word_end_mask(tokens) -> Bool[Tensor, "batch pos"]:
    """True at the last token of every word except ``<bos>``: where the whole word has been read.

    ``tokens`` is a `interplab.tinyworld.ModelTokens` (from ``tinyworld.tokens_for``). The
    kept positions, in row-major order (document by document, left to right), are one
    per word in the order of `tinyworld_latents`' rows, so ``acts[word_end_mask(t)]``
    lines up with the ground-truth labels on any tokenizer. With TinyWorld's own
    tokenizer (one token per word) it is every real token but ``<bos>``.
    """
    out = torch.zeros_like(tokens.mask, dtype=torch.bool)
    last = tokens.last[:, 1:]
    rows, words = (last >= 0).nonzero(as_tuple=True)
    out[rows, last[rows, words]] = True
    return out


def word_token_id(model, word: str) -> int:
    """The token a model predicts when the next word is ``word`` mid-sentence.

    TinyWorld: the word's own id. A subword tokenizer such as GPT-2's: the first token
    of ``" " + word`` (the space belongs to the word that follows it).
    """
    from interplab.tinyworld import is_tinyworld_tokenizer, token_id

    if is_tinyworld_tokenizer(model.tokenizer):
        return token_id(word)
    return int(model.tokenizer(" " + word, add_special_tokens=False)["input_ids"][0])


def splice_in_batches(fn, model, module, tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"],
                      max_logits_gb: float = 0.25) -> dict[str, float]:
    """Run ``fn(model, module, tokens, mask)`` (e.g. `spliced_loss`) on batches of sequences, and combine.

    Splicing functions hold several runs' logits, [batch, pos, d_vocab] each: a few MB
    for TinyWorld, about 1 GB for 60 documents of gpt2-small (50,257 tokens). This
    splits the sequences so that one run's logits stay under ``max_logits_gb`` (padding
    columns no sequence of a batch needs are dropped), averages every mean ("ce_*",
    "kl_*") weighted by the batch's number of scored predictions, and recomputes
    "loss_recovered" from the combined losses. When everything fits in one batch it
    is ``fn`` called once, unchanged.
    """
    width = tokens.shape[1]
    per_row_gb = width * model.cfg.d_vocab * 4 / 1e9
    if max_logits_gb / per_row_gb >= tokens.shape[0]:
        return fn(model, module, tokens, mask)
    rows = max(1, int(max_logits_gb / per_row_gb))
    parts = []
    for start in range(0, tokens.shape[0], rows):
        ids, keep = tokens[start : start + rows], mask[start : start + rows].bool()
        used = keep.any(0).nonzero()
        if len(used) == 0:
            continue
        cut = int(used.max()) + 1
        ids, keep = ids[:, :cut], keep[:, :cut]
        n_scored = int((keep[:, :-1] & keep[:, 1:]).sum())
        if n_scored:
            parts.append((fn(model, module, ids, keep), n_scored))
    total = sum(n for _, n in parts)
    out = {k: sum(r[k] * n for r, n in parts) / total for k in parts[0][0] if k != "loss_recovered"}
    losses = [k for k in out if k.startswith("ce_")]
    base = "ce_zero" if "ce_zero" in out else "ce_ablated"
    (other,) = [k for k in losses if k not in ("ce_clean", base)]
    out["loss_recovered"] = (out[base] - out[other]) / (out[base] - out["ce_clean"])
    return out


def tinyworld_latents(docs, min_count: int = 5) -> tuple[list[str], Bool[Tensor, "n_tokens n_latents"]]:
    """Ground-truth labels of TinyWorld latents at every SAE position (real tokens but <bos>, doc by doc).

    Latents (name "kind:value"):

    - ``family:<f>``: the token belongs to a document of task family f;
    - ``entity:<name>``: the token names this person;
    - ``room:<room>``: at the name X ending a question "where is X", X is in this room (the
      model must have tracked it to answer);
    - ``sentiment:positive`` / ``negative``: a review token from its first adjective
      on (from there the label is determined), in a review with this overall label;
    - ``truth:true`` / ``false``: a claim token from the claimed value on, in a true / false claim;
    - ``induction:repeat``: a token of the repeated half of an induction sequence.

    Latents with fewer than ``min_count`` positive tokens are left out.
    """
    from interplab.tinyworld import FAMILIES, NAMES, ROOMS
    from interplab.tinyworld.language import NEGATIVE_ADJ, POSITIVE_ADJ

    names = ([f"family:{f}" for f in FAMILIES] + [f"entity:{n}" for n in NAMES] + [f"room:{r}" for r in ROOMS]
             + ["sentiment:positive", "sentiment:negative", "truth:true", "truth:false", "induction:repeat"])
    col = {n: i for i, n in enumerate(names)}
    rows = []
    adjectives = set(POSITIVE_ADJ + NEGATIVE_ADJ)
    for d in docs:
        n = len(d.tokens)
        lab = torch.zeros(n, len(names), dtype=torch.bool)
        lab[1:, col[f"family:{d.family}"]] = True
        for i, e in enumerate(d.entity):
            if e >= 0:
                lab[i, col[f"entity:{NAMES[e]}"]] = True
        if d.family == "rooms":
            for i, a in enumerate(d.answer):
                if a is not None and d.tokens[i - 2 : i] == ["where", "is"]:
                    lab[i, col[f"room:{a}"]] = True
        elif d.family == "reviews":
            first = next(i for i, t in enumerate(d.tokens) if t in adjectives)
            lab[first:, col["sentiment:positive" if d.meta["sentiment"] > 0 else "sentiment:negative"]] = True
        elif d.family == "truth":
            start = d.tokens.index(d.meta["value"], 3)
            lab[start:, col["truth:true" if d.meta["truth"] else "truth:false"]] = True
        elif d.family == "induction":
            lab[d.meta["repeat_start"]:, col["induction:repeat"]] = True
        rows.append(lab[1:])
    labels = torch.cat(rows)
    keep = [i for i in range(len(names)) if labels[:, i].sum() >= min_count]
    return [names[i] for i in keep], labels[:, keep]


@torch.no_grad()
def auroc_matrix(acts: Float[Tensor, "n d_sae"], labels: Bool[Tensor, "n n_latents"]) -> Float[Tensor, "d_sae n_latents"]:
    """The AUROC of every feature for every latent at once (`feature_aurocs`, with the ranks computed once)."""
    ranks = average_ranks(acts)  # [d_sae, n]
    lab = labels.to(ranks.device).double()
    n_pos = lab.sum(0)
    n_neg = lab.shape[0] - n_pos
    if bool(((n_pos == 0) | (n_neg == 0)).any()):
        raise ValueError("every latent needs at least one positive and one negative token")
    return ((ranks @ lab - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).float()


@torch.no_grad()
def recovery_table(acts: Float[Tensor, "n d_sae"], labels: Bool[Tensor, "n n_latents"], names: Sequence[str],
                   threshold: float = 0.9, top_n: int = 20) -> list[dict]:
    """For every latent: the best-matching feature and how well it detects the latent.

    Each row has the feature with the highest AUROC ("feature", "auroc", and "f1", its
    best F1), the most *specific* feature (the best F1 among the ``top_n`` features by
    AUROC: "specific_feature", "specific_auroc", "specific_f1"), whether the latent is
    recovered (best AUROC >= threshold) and how many features reach the threshold
    ("features_above": more than one suggests the SAE split the latent).
    """
    aucs = auroc_matrix(acts, labels)
    rows = []
    for j, name in enumerate(names):
        lab = labels[:, j]
        top = aucs[:, j].topk(min(top_n, aucs.shape[0])).indices.tolist()
        f1s = [max_f1(acts[:, i], lab) for i in top]
        spec = max(range(len(top)), key=lambda t: f1s[t])
        best = top[0]
        rows.append({"latent": name, "kind": name.split(":")[0], "positives": int(lab.sum()), "feature": best,
                     "auroc": round(float(aucs[best, j]), 4), "f1": round(f1s[0], 4),
                     "specific_feature": top[spec], "specific_auroc": round(float(aucs[top[spec], j]), 4),
                     "specific_f1": round(f1s[spec], 4), "recovered": bool(aucs[best, j] >= threshold),
                     "features_above": int((aucs[:, j] >= threshold).sum())})
    return rows


def recovery_summary(rows: list[dict]) -> dict[str, dict]:
    """Per kind of latent (and "all"): latents, how many recovered, mean AUROC, mean F1 (best and specific feature)."""
    kinds = ["all"] + sorted({r["kind"] for r in rows})
    out = {}
    for kind in kinds:
        sel = [r for r in rows if kind == "all" or r["kind"] == kind]
        n = len(sel)
        out[kind] = {"latents": n, "recovered": sum(r["recovered"] for r in sel),
                     "fraction": round(sum(r["recovered"] for r in sel) / n, 3),
                     "mean_auroc": round(sum(r["auroc"] for r in sel) / n, 3),
                     "mean_f1": round(sum(r["f1"] for r in sel) / n, 3),
                     "mean_specific_f1": round(sum(r["specific_f1"] for r in sel) / n, 3)}
    return out


def probe_direction(acts: Float[Tensor, "n d"], labels: Bool[Tensor, " n"]) -> Float[Tensor, " d"]:
    """The simplest linear probe of chapter 1: the unit difference of the class means."""
    d = acts[labels].mean(0) - acts[~labels].mean(0)
    return d / d.norm()


def top_tokens(values: Float[Tensor, " d_vocab"], model, n: int = 8) -> tuple[list[str], list[str]]:
    """(the n tokens with the largest values, the n with the smallest), as strings."""
    top = values.topk(n).indices.tolist()
    bottom = (-values).topk(n).indices.tolist()
    decode = lambda ids: [model.tokenizer.decode([i]) for i in ids]
    return decode(top), decode(bottom)


def context_html(tokens: Sequence[str], values: Sequence[float], center: int, vmax: float, width: int = 12) -> str:
    """One context as HTML: tokens shaded by the feature's activation, the top token underlined."""
    start = max(0, center - width)
    parts = []
    for i in range(start, min(len(tokens), center + 4)):
        a = max(0.0, float(values[i])) / vmax if vmax > 0 else 0.0
        style = f"background: rgba(255, 120, 0, {min(1.0, a):.2f}); padding: 0 2px;"
        if i == center:
            style += " text-decoration: underline; font-weight: bold;"
        tok = str(tokens[i]).replace("<", "&lt;").replace(">", "&gt;")
        parts.append(f'<span style="{style}" title="{float(values[i]):.2f}">{tok}</span>')
    return " ".join(parts)


def context_text(tokens: Sequence[str], center: int, width: int = 12) -> str:
    """One context as plain text with the top token in [[double brackets]]."""
    start = max(0, center - width)
    return " ".join(f"[[{t}]]" if i == center else str(t)
                    for i, t in enumerate(tokens[start : center + 4], start=start))


# =====================================================================================
# Reproducing the shipped SAEs
# =====================================================================================

def training_activations(model, n_docs: int, seed: int = 0, hook: str = DEFAULT_HOOK, chunk: int = 256) -> Tensor:
    """Activations at ``hook`` of fresh training-split documents, every real token but <bos>.

    Documents are sorted by length and run in chunks, so that little compute goes to
    padding; the rows come out in that (length) order, which does not matter for training.
    """
    from interplab import tinyworld

    docs = sorted(tinyworld.generate(n_docs, seed=seed, split="train"), key=len)
    parts = []
    for start in range(0, len(docs), chunk):
        ids, mask = tinyworld.batch_tokens(docs[start : start + chunk])
        parts.append(collect_acts(model, ids, sae_token_mask(ids, mask), hook))
    return torch.cat(parts)


def train_shipped(name: str, model=None, out: Path | None = None, hook: str = DEFAULT_HOOK,
                  progress: bool = True, eval_docs: int = 400, **overrides) -> tuple[SAE, dict]:
    """Train one shipped SAE from its recipe (activation collection included in the timing)."""
    from interplab import load_model

    model = model or load_model("tinyworld", device="cpu")
    settings = {**TRAIN, **{k: v for k, v in overrides.items() if k in TRAIN}}
    t0, cpu0 = time.time(), time.process_time()
    acts = training_activations(model, settings["n_docs"], seed=settings["seed"], hook=hook)
    collected = time.time() - t0
    recipe = {**RECIPES[name], **{k: v for k, v in overrides.items() if k in ("d_sae", "k", "l1_coeff")}}
    cfg = SAEConfig(d_in=acts.shape[-1], hook_name=hook, **recipe)
    sae = train_sae(acts, cfg, steps=settings["steps"], batch_size=settings["batch_size"], lr=settings["lr"],
                    seed=settings["seed"], progress=progress)
    seconds, cpu_seconds = time.time() - t0, time.process_time() - cpu0
    _, ids, mask = tinyworld_dataset(eval_docs, seed=1, split="test")
    metrics = evaluate_sae(model, sae, ids, mask)
    info = {**sae.info, "training_tokens_available": int(acts.shape[0]), "n_docs": settings["n_docs"],
            "collect_seconds": round(collected, 1), "total_seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "threads": torch.get_num_threads(), "eval": {"docs": eval_docs, "seed": 1, "split": "test", **metrics}}
    if out is not None:
        sae.save(out, extra=info)
    return sae, info


def sweep(model=None, steps: int = 600, n_docs: int = 12_000, progress: bool = False) -> list[dict]:
    """The sparsity-fidelity trade-off: TopK SAEs for several k and standard SAEs for several L1 penalties."""
    from interplab import load_model

    model = model or load_model("tinyworld", device="cpu")
    acts = training_activations(model, n_docs, seed=0)
    _, ids, mask = tinyworld_dataset(400, seed=1, split="test")
    x = collect_acts(model, ids, mask)
    rows = []
    settings = [("topk", dict(k=k)) for k in (2, 4, 8, 16, 32, 64)] + \
               [("standard", dict(l1_coeff=c)) for c in (2.0, 4.0, 8.0, 16.0, 32.0, 64.0)]
    for arch, extra in settings:
        cfg = SAEConfig(d_in=acts.shape[-1], d_sae=768, architecture=arch, **extra)
        sae = train_sae(acts, cfg, steps=steps, batch_size=1024, lr=2e-3, seed=0, progress=progress)
        m = evaluate_sae(model, sae, ids, mask, acts=x)
        rows.append({"architecture": arch, **extra, **{k: m[k] for k in
                     ("l0", "explained_variance", "loss_recovered", "kl_sae", "mse", "dead_features")}})
        print(json.dumps(rows[-1]))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m interplab.solutions.ch03_saes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", nargs="*", default=["topk", "standard", "batchtopk"], help="which shipped SAEs to retrain")
    p.add_argument("--out", type=Path, default=None, help="folder for the SAE folders (default: the package's weights)")
    p.add_argument("--sweep", action="store_true", help="run the sparsity-fidelity sweep and write sweep.json")
    p.add_argument("--evaluate", action="store_true", help="print metrics and recovery of the shipped SAEs")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from interplab import load_model
    from interplab.weights import WEIGHTS_DIR, write_checksums

    model = load_model("tinyworld", device="cpu")
    base = a.out or WEIGHTS_DIR
    if a.evaluate:
        docs, ids, mask = tinyworld_dataset(400, seed=1, split="test")
        names, labels = tinyworld_latents(docs)
        for name in ("topk", "standard", "batchtopk"):
            if not shipped_folder(name).is_dir():
                continue
            sae = load_sae(name)
            x = collect_acts(model, ids, mask)
            print(name, json.dumps(evaluate_sae(model, sae, ids, mask, acts=x)))
            print(json.dumps(recovery_summary(recovery_table(sae.encode(x), labels, names))))
        return
    if a.sweep:
        rows = sweep(model)
        folder = base / SHIPPED["sweep"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
        write_checksums(folder)
        return
    for name in a.which:
        sae, info = train_shipped(name, model=model, out=base / SHIPPED[name])
        print(name, json.dumps(info))


if __name__ == "__main__":
    main()
