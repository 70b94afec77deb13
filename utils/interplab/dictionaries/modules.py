"""The sparse dictionaries: `SAE` and `Transcoder`, one module family with TransformerLens hook points.

    acts  = activation((x - b_dec) @ W_enc + b_enc)     # b_dec subtracted only if cfg.apply_b_dec_to_input
    out   = acts @ W_dec + b_dec (+ x @ W_skip.T)        # W_skip: a skip transcoder only

An SAE reconstructs its input; a transcoder reads one activation (an MLP's input) and predicts
another (the MLP's output). Shapes follow SAELens: ``W_enc`` [d_in, d_sae], ``W_dec``
[d_sae, d_out] (feature i's direction is the row ``W_dec[i]``), ``W_skip`` [d_out, d_in].
Decoder rows are kept at unit norm during training. A BatchTopK dictionary selects features
over the whole batch while training and, in eval mode, uses a threshold learned during
training (a JumpReLU), so a token's features do not depend on the rest of its batch.

Every activation the module computes passes a `HookPoint`, as in a HookedTransformer:

    hook_sae_input      the input x
    hook_sae_acts_pre   the encoder's output before the activation function
    hook_sae_acts_post  the feature activations
    hook_sae_recons     the features' reconstruction, acts @ W_dec + b_dec
    hook_sae_output     the output (with the skip path, if any)

so ``sae.run_with_cache(x)`` caches them all and ``sae.run_with_hooks(x, fwd_hooks=[("hook_sae_acts_post",
fn)])`` edits features (chapter 00's tools).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from . import io
from .config import SAEConfig, TranscoderConfig

HOOK_NAMES = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_output")


# --- activation functions ------------------------------------------------------------------

def topk_activation(pre_acts: Float[Tensor, "batch d_sae"], k: int) -> Float[Tensor, "batch d_sae"]:
    """Keep the k largest pre-activations of each row, ReLU'd; zero the rest."""
    values, indices = pre_acts.topk(k, dim=-1)
    return torch.zeros_like(pre_acts).scatter(-1, indices, values.relu())


def batchtopk_activation(pre_acts: Float[Tensor, "batch d_sae"], k: int) -> Float[Tensor, "batch d_sae"]:
    """Keep the k * batch largest ReLU'd pre-activations of the whole batch; zero the rest."""
    acts = pre_acts.relu()
    flat = acts.flatten()
    values, indices = flat.topk(min(k * pre_acts.shape[0], flat.numel()))
    return torch.zeros_like(flat).scatter(0, indices, values).reshape(acts.shape)


def remove_parallel_grad(W_dec: Float[Tensor, "d_sae d"], grad: Float[Tensor, "d_sae d"]) -> Float[Tensor, "d_sae d"]:
    """``grad`` without its component along each (normalised) decoder row."""
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True)
    return grad - (grad * unit).sum(dim=-1, keepdim=True) * unit


@dataclass
class SAEOutput:
    """One training forward pass: the loss and its parts, the activations and the output."""

    loss: Tensor
    mse: Tensor
    l1: Tensor
    acts: Tensor
    x_hat: Tensor


class SparseDictionary(HookedRootModule):
    """What SAEs and transcoders share: weights, encode/decode with hook points, the loss, the
    decoder kept at unit norm, save/load and the SAELens conversion.

    Subclasses set ``KIND`` (how errors name them), ``CONFIG`` (their config class) and
    ``TIED_INIT`` (whether the encoder starts as the decoder's transpose).
    """

    KIND = "a sparse dictionary"
    CONFIG: type[SAEConfig] = SAEConfig
    TIED_INIT = False
    IS_TRANSCODER = False

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(cfg, self.CONFIG) or cfg.is_transcoder is not self.IS_TRANSCODER:
            raise TypeError(f"{type(self).__name__} takes a {self.CONFIG.__name__}, got {type(cfg).__name__} "
                            f"(build an SAE from an SAEConfig, a Transcoder from a TranscoderConfig)")
        self.cfg = cfg
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out
        W_dec = torch.randn(d_sae, d_out, generator=generator)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
        if self.TIED_INIT and d_in == d_out:
            W_enc = W_dec.T.clone()
        else:
            W_enc = torch.randn(d_in, d_sae, generator=generator) / math.sqrt(d_in)
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.W_skip = nn.Parameter(torch.zeros(d_out, d_in)) if getattr(cfg, "skip", False) else None
        # BatchTopK only: the activation threshold used in eval mode (a running estimate).
        self.register_buffer("threshold", torch.zeros(()))
        self.info: dict = {}
        for name in HOOK_NAMES:
            setattr(self, name, HookPoint())
        self.setup()

    # --- forward ---------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.KIND} takes a tensor of activations, got {type(x).__name__}")
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"this {self.KIND.split(' ', 1)[1]} reads vectors of size d_in={self.cfg.d_in} "
                             f"({self.cfg.hook_name}); got activations of shape {tuple(x.shape)}")

    def pre_acts(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Encoder outputs before the activation function (not hooked: `encode` hooks them)."""
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def _activation(self, pre: Tensor) -> Tensor:
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
        return torch.relu(pre) * (pre > self.threshold)  # a JumpReLU

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations."""
        self._check_input(x)
        pre = self.hook_sae_acts_pre(self.pre_acts(self.hook_sae_input(x)))
        return self.hook_sae_acts_post(self._activation(pre))

    def decode(self, acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_out"]:
        """The features' reconstruction (without a skip path): acts @ W_dec + b_dec."""
        return self.hook_sae_recons(acts @ self.W_dec + self.b_dec)

    def skip_out(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"] | float:
        """The skip path's contribution (0.0 without one)."""
        return x @ self.W_skip.T if self.W_skip is not None else 0.0

    def _output(self, x: Tensor, acts: Tensor) -> Tensor:
        out = self.decode(acts)
        if self.W_skip is not None:
            out = out + x @ self.W_skip.T
        return self.hook_sae_output(out)

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        """The reconstruction (SAE) or prediction (transcoder)."""
        return self._output(x, self.encode(x))

    def loss(self, x: Float[Tensor, "batch d_in"], target: Float[Tensor, "batch d_out"] | None = None) -> SAEOutput:
        """The training loss on a batch (target defaults to x: an SAE reconstructs its input).

        mse is the squared error summed over the last dimension and averaged over the batch;
        l1 = sum_i |acts_i| * ||W_dec[i]||, averaged over the batch; the loss is mse + l1_coeff * l1
        for "standard", else mse (TopK and BatchTopK enforce sparsity in the activation function).
        """
        target = x if target is None else target
        acts = self.encode(x)
        x_hat = self._output(x, acts)
        mse = (x_hat - target).pow(2).sum(dim=-1).mean()
        l1 = (acts.abs() * self.W_dec.norm(dim=-1)).sum(dim=-1).mean()
        total = mse + self.cfg.l1_coeff * l1 if self.cfg.architecture == "standard" else mse
        return SAEOutput(total, mse, l1, acts, x_hat)

    @torch.no_grad()
    def fired(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, " d_sae"]:
        """Which features fire on the batch x under the training-mode activation (no side effects, no hooks)."""
        pre = self.pre_acts(x)
        arch = self.cfg.architecture
        if arch == "standard":
            return (pre > 0).any(0)
        if arch == "topk":
            return (topk_activation(pre, self.cfg.k) > 0).any(0)
        return (batchtopk_activation(pre, self.cfg.k) > 0).any(0)

    # --- training helpers ------------------------------------------------------------

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit norm (in place)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Remove the component of W_dec's gradient along each decoder row (in place)."""
        if self.W_dec.grad is not None:
            self.W_dec.grad.copy_(remove_parallel_grad(self.W_dec, self.W_dec.grad))

    # --- saving, loading, SAELens ----------------------------------------------------

    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        """Write cfg.json, sae_weights.safetensors (readable by SAELens's SAE.load_from_disk) and SHA256SUMS."""
        return io.save(self, folder, extra)

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None, check: bool = True):
        """Load a folder written by ``save`` (verified against its SHA256SUMS first)."""
        raw, state = io.read(folder, cls.KIND, check=check)
        module = cls(cls.CONFIG.from_dict(raw["interplab"]))
        threshold = io.threshold_from_state(state, module.threshold)
        module.load_state_dict({**state, "threshold": threshold})
        module.info = raw.get("interplab_info", {})
        module.eval()
        return module.to(device) if device else module

    def saelens_architecture(self) -> str:
        """The SAELens 6 architecture name of this dictionary."""
        return io.saelens_architecture(self.cfg)

    def config_dict(self) -> dict:
        """The config in SAELens's cfg.json layout (plus interplab's own fields)."""
        return io.config_dict(self.cfg)

    def to_saelens(self):
        """The same dictionary as a SAELens 6 object (see `interplab.dictionaries.io.to_saelens`)."""
        return io.to_saelens(self)


class SAE(SparseDictionary):
    """A sparse autoencoder: reconstructs the activation at ``cfg.hook_name`` through sparse features.

    The encoder starts as the transpose of the (random, unit-norm) decoder.
    """

    KIND = "an SAE"
    CONFIG = SAEConfig
    TIED_INIT = True

    def extra_repr(self) -> str:
        c = self.cfg
        sparsity = f"l1_coeff={c.l1_coeff:g}" if c.architecture == "standard" else f"k={c.k}"
        return f"{c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}, d_out={c.d_out}, {sparsity}, hook={c.hook_name!r}"


class Transcoder(SparseDictionary):
    """A transcoder (optionally with a skip path) replacing the MLP of ``cfg.layer``.

    It reads the MLP's normalised input and predicts the MLP's output. Unlike an SAE, it never
    subtracts ``b_dec`` from its input, and its encoder starts random (input and output differ).
    """

    KIND = "a transcoder"
    CONFIG = TranscoderConfig
    IS_TRANSCODER = True

    def extra_repr(self) -> str:
        c = self.cfg
        sparsity = f"l1_coeff={c.l1_coeff:g}" if c.architecture == "standard" else f"k={c.k}"
        return (f"{c.architecture}{' skip' if c.skip else ''}, layer {c.layer}, d_in={c.d_in}, d_sae={c.d_sae}, "
                f"d_out={c.d_out}, {sparsity}")
