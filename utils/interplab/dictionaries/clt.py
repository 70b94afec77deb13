"""The cross-layer transcoder (CLT): one dictionary for every MLP of the model at once.

    pre_l  = x_l @ W_enc[l] + b_enc[l]                   # x_l: the MLP input of layer l (ln2.hook_normalized)
    a_l    = activation(pre_l)                           # BatchTopK while training, a JumpReLU at inference
    y_hat_L = sum_{l <= L} a_l @ W_dec[l][:, L - l] + b_dec[L]   # predicts the MLP output of layer L

Each layer's features read that layer's (normalised) residual stream and write into the MLP
output of their own layer and of every later one (Ameisen et al. 2025; Lindsey et al. 2024).
``W_enc`` is [n_layers, d_model, d_sae]; ``W_dec[l]`` is [d_sae, n_layers - l, d_model]
(feature i of layer l writes ``W_dec[l][i, L - l]`` into layer L's MLP output).

How this differs from Ameisen et al.: they use a JumpReLU with a tanh-L1 penalty weighted by
the decoder norms (and a pre-activation penalty); here sparsity is a BatchTopK per layer (``k``
features per token per layer on average; a learned threshold, i.e. a JumpReLU, at inference), the
recipe of chapter 05's transcoders, so that the CLT and the per-layer transcoders can be
compared at the same L0 without tuning a penalty. The loss is the sum over layers of the squared
error of each MLP output (summed over dimensions, averaged over tokens).

Every activation passes a HookPoint (``hook_clt_input``, ``hook_clt_acts_pre``,
``hook_clt_acts_post``, ``hook_clt_output``), each holding all layers stacked on a ``layer`` axis.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from .. import artifacts
from ..models import load_model
from ..progress import progress as progress_bar
from ..weights import WEIGHTS_DIR, verify, write_checksums
from .config import SAEConfig, mlp_in_hook, mlp_out_hook
from .data import collect_pairs, tinyworld_dataset
from .metrics import _mean_ce
from .modules import batchtopk_activation

WEIGHTS_FILE = "clt_weights.safetensors"
CONFIG_FILE = "cfg.json"


@dataclass
class CLTConfig(SAEConfig):
    """What a cross-layer transcoder is: an SAE config with one dictionary per layer and decoders to later layers.

    Attributes (besides SAEConfig's):
        n_layers: how many MLP layers it replaces (every layer of the model, from 0).
        d_out: the output size (d_model); None means d_in.
        d_sae: features PER LAYER (the CLT has n_layers * d_sae).
        k: with BatchTopK, active features per token per layer, on average.
    """

    architecture: str = "batchtopk"
    apply_b_dec_to_input: bool = False
    hook_name: str | None = None  # type: ignore[assignment]
    n_layers: int = 4
    d_out: int | None = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.d_out is None:
            self.d_out = self.d_in
        super().__post_init__()
        if self.architecture != "batchtopk":
            raise ValueError("the course's CLT uses BatchTopK sparsity (architecture='batchtopk')")
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {self.n_layers}")
        if self.apply_b_dec_to_input:
            raise ValueError("a CLT's b_dec lives in the MLP outputs' space: apply_b_dec_to_input must be False")
        if self.hook_name is None:
            self.hook_name = mlp_in_hook(0)

    @property
    def is_transcoder(self) -> bool:
        return True

    def hooks_in(self) -> list[str]:
        return [mlp_in_hook(L) for L in range(self.n_layers)]

    def hooks_out(self) -> list[str]:
        return [mlp_out_hook(L) for L in range(self.n_layers)]

    @classmethod
    def from_dict(cls, raw: dict) -> CLTConfig:
        return cls(**raw)


class CrossLayerTranscoder(HookedRootModule):
    """A cross-layer transcoder: inputs [..., n_layers, d_in] (each MLP's input), outputs [..., n_layers, d_out]."""

    KIND = "a cross-layer transcoder"

    def __init__(self, cfg: CLTConfig, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(cfg, CLTConfig):
            raise TypeError(f"CrossLayerTranscoder takes a CLTConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        n, d_in, d_sae, d_out = cfg.n_layers, cfg.d_in, cfg.d_sae, cfg.d_out
        self.W_enc = nn.Parameter(torch.randn(n, d_in, d_sae, generator=generator) / math.sqrt(d_in))
        self.b_enc = nn.Parameter(torch.zeros(n, d_sae))
        # Decoder init scaled so that a token's summed writes start small (1 / sqrt(number of layers written)).
        self.W_dec = nn.ParameterList(
            [
                nn.Parameter(torch.randn(d_sae, n - l, d_out, generator=generator) / math.sqrt(d_out * (n - l)))
                for l in range(n)  # noqa: E741
            ]
        )
        self.b_dec = nn.Parameter(torch.zeros(n, d_out))
        self.register_buffer("threshold", torch.zeros(n))
        self.info: dict = {}
        for name in ("hook_clt_input", "hook_clt_acts_pre", "hook_clt_acts_post", "hook_clt_output"):
            setattr(self, name, HookPoint())
        self.setup()

    # --- forward ---------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"a CLT takes a tensor of MLP inputs, got {type(x).__name__}")
        if x.ndim < 2 or x.shape[-2:] != (self.cfg.n_layers, self.cfg.d_in):
            raise ValueError(
                f"a CLT reads [..., n_layers={self.cfg.n_layers}, d_in={self.cfg.d_in}] (every MLP's input); "
                f"got shape {tuple(x.shape)}"
            )

    def pre_acts(self, x: Float[Tensor, "... n_layers d_in"]) -> Float[Tensor, "... n_layers d_sae"]:
        """Each layer's encoder output before the activation function."""
        return torch.einsum("...ld,lds->...ls", x, self.W_enc) + self.b_enc

    def activation(self, pre: Float[Tensor, "... n_layers d_sae"]) -> Float[Tensor, "... n_layers d_sae"]:
        """BatchTopK per layer in training mode (updating the thresholds); a JumpReLU per layer in eval mode."""
        if not self.training:
            return torch.relu(pre) * (pre > self.threshold[:, None])
        flat = pre.reshape(-1, self.cfg.n_layers, self.cfg.d_sae)
        out = torch.stack([batchtopk_activation(flat[:, L], self.cfg.k) for L in range(self.cfg.n_layers)], dim=1)
        with torch.no_grad():
            for L in range(self.cfg.n_layers):
                kept = out[:, L][out[:, L] > 0]
                if kept.numel():
                    self.threshold[L].lerp_(kept.min(), 0.01)
        return out.reshape(pre.shape)

    def encode(self, x: Float[Tensor, "... n_layers d_in"]) -> Float[Tensor, "... n_layers d_sae"]:
        """Feature activations of every layer."""
        self._check_input(x)
        pre = self.hook_clt_acts_pre(self.pre_acts(self.hook_clt_input(x)))
        return self.hook_clt_acts_post(self.activation(pre))

    def decoder_to(self, layer: int) -> Float[Tensor, "n_src d_sae d_out"]:
        """The decoders writing into ``layer``'s MLP output, one per source layer 0..layer."""
        return torch.stack([self.W_dec[l][:, layer - l] for l in range(layer + 1)])  # noqa: E741

    def decode(self, acts: Float[Tensor, "... n_layers d_sae"]) -> Float[Tensor, "... n_layers d_out"]:
        """Every MLP output's reconstruction: the sum of the decoders of the features of that layer and earlier."""
        outs = []
        for L in range(self.cfg.n_layers):
            outs.append(torch.einsum("...ls,lsd->...d", acts[..., : L + 1, :], self.decoder_to(L)) + self.b_dec[L])
        return torch.stack(outs, dim=-2)

    def forward(self, x: Float[Tensor, "... n_layers d_in"]) -> Float[Tensor, "... n_layers d_out"]:
        return self.hook_clt_output(self.decode(self.encode(x)))

    def loss(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(loss, acts): the sum over layers of the squared error (summed over dimensions, averaged over tokens)."""
        acts = self.encode(x)
        loss = (self.decode(acts) - target).pow(2).sum(-1).mean(0).sum()
        return loss, acts

    def decoder_norms(self) -> Float[Tensor, "n_layers d_sae"]:
        """Each feature's decoder norm, over every layer it writes to."""
        return torch.stack([w.norm(dim=(-2, -1)) for w in self.W_dec])

    # --- saving and loading ---------------------------------------------------------

    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        """Write cfg.json, clt_weights.safetensors and SHA256SUMS into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {"W_enc": self.W_enc, "b_enc": self.b_enc, "b_dec": self.b_dec, "threshold": self.threshold}
        state.update({f"W_dec_{l}": w for l, w in enumerate(self.W_dec)})  # noqa: E741
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(folder / WEIGHTS_FILE))
        record = {"architecture": "interplab_cross_layer_transcoder", "interplab": asdict(self.cfg)}
        if extra:
            record["interplab_info"] = extra
        (folder / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
        write_checksums(folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None, check: bool = True) -> CrossLayerTranscoder:
        """Load a folder written by ``save`` (verified against its SHA256SUMS first)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder with a CLT ({CONFIG_FILE} and {WEIGHTS_FILE})")
        if check:
            verify(folder, [CONFIG_FILE, WEIGHTS_FILE])
        raw = json.loads((folder / CONFIG_FILE).read_text())
        clt = cls(CLTConfig.from_dict(raw["interplab"]))
        state = load_file(str(folder / WEIGHTS_FILE))
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "b_dec", "threshold"):
                getattr(clt, name).copy_(state[name])
            for l, w in enumerate(clt.W_dec):  # noqa: E741
                w.copy_(state[f"W_dec_{l}"])
        clt.info = raw.get("interplab_info", {})
        clt.eval()
        return clt.to(device) if device else clt

    def extra_repr(self) -> str:
        c = self.cfg
        return f"{c.n_layers} layers, d_in={c.d_in}, d_sae={c.d_sae} per layer, k={c.k} per layer"


# --- training ------------------------------------------------------------------------------------


@torch.no_grad()
def _resample(clt: CrossLayerTranscoder, opt, dead: Tensor, x: Tensor, y: Tensor, y_hat: Tensor) -> int:
    """Give dead features (``dead`` [n_layers, d_sae]) new weights from the tokens with the largest error."""
    n = 0
    for L in range(clt.cfg.n_layers):
        idx = dead[L].nonzero()[:, 0]
        if not len(idx):
            continue
        err = y[:, L:] - y_hat[:, L:]  # what this layer's features could still write
        worst = err.pow(2).sum((-2, -1)).topk(min(len(idx), err.shape[0])).indices
        rows = worst[torch.arange(len(idx)) % len(worst)]
        reads = x[rows, L] / x[rows, L].norm(dim=-1, keepdim=True).clamp_min(1e-8)
        live = ~dead[L]
        enc_norm = clt.W_enc[L][:, live].norm(dim=0).mean() if live.any() else torch.tensor(1.0)
        clt.W_enc[L][:, idx] = reads.T * enc_norm
        clt.b_enc[L, idx] = 0.0
        writes = err[rows]
        clt.W_dec[L][idx] = 0.2 * writes / writes.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-8)
        for p, sl in ((clt.W_enc, (L, slice(None), idx)), (clt.b_enc, (L, idx)), (clt.W_dec[L], (idx,))):
            state = opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][sl] = 0.0
        n += len(idx)
    return n


def train_clt(
    x: Float[Tensor, "n n_layers d_in"],
    y: Float[Tensor, "n n_layers d_out"],
    cfg: CLTConfig,
    *,
    steps: int = 1500,
    batch_size: int = 1024,
    lr: float = 2e-3,
    seed: int = 0,
    dead_after: int = 200,
    resample_every: int = 250,
    progress: bool = True,
) -> CrossLayerTranscoder:
    """Train a CLT on every MLP's (input, output) pairs with the course's recipe (`train_dictionary`'s).

    Seeded; ``b_dec`` starts at the mean output of each layer; Adam at a constant learning rate
    that decays linearly to 0 over the last 20% of the steps; dead features resampled during the
    first 80%. Returns the module in eval mode with ``.info`` recording the training.
    """
    if x.ndim != 3 or x.shape[1:] != (cfg.n_layers, cfg.d_in):
        raise ValueError(f"x must be [n, n_layers={cfg.n_layers}, d_in={cfg.d_in}], got {tuple(x.shape)}")
    if y.shape != (x.shape[0], cfg.n_layers, cfg.d_out):
        raise ValueError(f"y must be [n, n_layers, d_out={cfg.d_out}], got {tuple(y.shape)}")
    torch.manual_seed(seed)
    with torch.enable_grad():
        clt = CrossLayerTranscoder(cfg)
        with torch.no_grad():
            clt.b_dec.copy_(y.float().mean(0))
        opt = torch.optim.Adam(clt.parameters(), lr=lr)
        decay_start = int(0.8 * steps)
        order = torch.Generator().manual_seed(seed)
        perm, cursor = torch.randperm(x.shape[0], generator=order), 0
        since = torch.zeros(cfg.n_layers, cfg.d_sae, dtype=torch.long)
        n_resampled, t0 = 0, time.time()
        clt.train()
        bar = progress_bar(range(steps), disable=not progress, desc="training the CLT", mininterval=2.0)
        for step in bar:
            if cursor + batch_size > len(perm):
                perm, cursor = torch.randperm(x.shape[0], generator=order), 0
            idx = perm[cursor : cursor + batch_size]
            cursor += batch_size
            xb, yb = x[idx], y[idx]
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (steps - step) / max(1, steps - decay_start))
            loss, acts = clt.loss(xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                since = torch.where((acts > 0).any(0), 0, since + 1)
                if (step + 1) % resample_every == 0 and step < decay_start:
                    dead = since >= dead_after
                    if dead.any():
                        n_resampled += _resample(clt, opt, dead, xb, yb, clt.decode(acts))
                        since[dead] = 0
            if progress and step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3g}", refresh=False)
        bar.close()
    clt.eval()
    clt.info = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "tokens_seen": steps * batch_size,
        "final_loss": round(loss.item(), 5),
        "resampled": n_resampled,
        "seconds": round(time.time() - t0, 1),
    }
    return clt


# --- using it inside the model -------------------------------------------------------------------


@torch.no_grad()
def clt_io(model, tokens: Tensor, n_layers: int | None = None) -> tuple[Tensor, Tensor]:
    """(x, y): every MLP's input and output, stacked [batch, pos, n_layers, d_model], from one clean run."""
    n = n_layers or model.cfg.n_layers
    names = [mlp_in_hook(L) for L in range(n)] + [mlp_out_hook(L) for L in range(n)]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    x = torch.stack([cache[mlp_in_hook(L)] for L in range(n)], dim=-2)
    y = torch.stack([cache[mlp_out_hook(L)] for L in range(n)], dim=-2)
    return x, y


def replacement_hooks(clt: CrossLayerTranscoder, keep: Tensor | None = None) -> list:
    """Hooks that replace every MLP's output by the CLT's reconstruction, each layer reading its own (new) input.

    The reconstruction of layer L needs the features of layers 0..L, each read from the
    residual stream of ITS layer in this run, so earlier replacements change later inputs.
    ``keep`` [batch, pos] limits the replacement to some positions.
    """
    acts: dict[int, Tensor] = {}

    def read(x: Tensor, hook) -> None:
        L = hook.layer()
        pre = x @ clt.W_enc[L] + clt.b_enc[L]
        acts[L] = torch.relu(pre) * (pre > clt.threshold[L])

    def write(y: Tensor, hook) -> Tensor:
        L = hook.layer()
        out = clt.b_dec[L] + sum(acts[l] @ clt.W_dec[l][:, L - l] for l in range(L + 1))  # noqa: E741
        return out if keep is None else torch.where(keep[..., None].to(y.device), out, y)

    n = clt.cfg.n_layers
    return [(mlp_in_hook(L), read) for L in range(n)] + [(mlp_out_hook(L), write) for L in range(n)]


@torch.no_grad()
def clt_replacement_loss(model, clt: CrossLayerTranscoder, tokens: Tensor, mask: Tensor) -> dict[str, float]:
    """The model's loss clean, with the CLT replacing every MLP (at the mask), and with every MLP zeroed.

    Same measurement as `interplab.dictionaries.metrics.replacement_loss` for per-layer
    transcoders: ce_clean, ce_replaced, ce_ablated, loss_recovered, and the mean L0 per layer.
    """
    keep = mask.to(tokens.device).bool()
    n = clt.cfg.n_layers
    zero = [(mlp_out_hook(L), lambda y, hook: torch.where(keep[..., None], torch.zeros_like(y), y)) for L in range(n)]
    runs = {
        "ce_clean": model(tokens),
        "ce_replaced": model.run_with_hooks(tokens, fwd_hooks=replacement_hooks(clt, keep)),
        "ce_ablated": model.run_with_hooks(tokens, fwd_hooks=zero),
    }
    scored = keep[:, :-1] & keep[:, 1:]
    out = {name: _mean_ce(logits, tokens, scored) for name, logits in runs.items()}
    out["loss_recovered"] = (out["ce_ablated"] - out["ce_replaced"]) / (out["ce_ablated"] - out["ce_clean"])
    x, _ = clt_io(model, tokens, n)
    out["l0_per_layer"] = float((clt.encode(x[keep]) > 0).float().sum(-1).mean())
    return out


# --- the shipped CLT ------------------------------------------------------------------------------

SHIPPED_FOLDER = "clt_tinyworld"


@dataclass(frozen=True)
class CLTRecipe:
    """How the shipped CLT (artifact clt_tinyworld) is trained.

    Attributes:
        d_sae: features per layer (4 layers: 1536 features in all; 384 keeps the file near 4 MB).
        k: BatchTopK features per token per layer (16: the L0 of chapter 05's per-layer transcoders).
        n_docs, seed: the training-split documents (chapter 05's transcoders' data: 4000 documents, seed 0).
        steps, batch_size, lr, dead_after, resample_every: the optimisation (`train_clt`).
        eval_docs, eval_seed: the test documents its recorded replacement loss is measured on.
    """

    d_sae: int = 384
    k: int = 16
    n_docs: int = 4000
    seed: int = 0
    steps: int = 2500
    batch_size: int = 1024
    lr: float = 2e-3
    dead_after: int = 200
    resample_every: int = 250
    eval_docs: int = 300
    eval_seed: int = 1


def shipped_clt_folder() -> Path:
    return WEIGHTS_DIR / SHIPPED_FOLDER


def load_clt(device: str | None = None) -> CrossLayerTranscoder:
    """The CLT shipped for the bundled TinyWorld model, verified (refused if trained on other model weights)."""
    folder = shipped_clt_folder()
    clt = CrossLayerTranscoder.load(folder, device=device)
    artifacts.require_model_match(folder)
    return clt


def build_clt(recipe: CLTRecipe, folder: Path, model=None, progress: bool = True, artifact: str | None = None):
    """Train the CLT of ``recipe`` on the bundled model and write it (with provenance) to ``folder``."""
    model = model or load_model("tinyworld", device="cpu")
    n = model.cfg.n_layers
    t0 = time.time()
    _, ids, mask = tinyworld_dataset(recipe.n_docs, seed=recipe.seed, split="train")
    pairs = collect_pairs(model, ids, mask, list(range(n)), progress=progress)
    x = torch.stack([pairs[L][0] for L in range(n)], dim=1)
    y = torch.stack([pairs[L][1] for L in range(n)], dim=1)
    del pairs
    cfg = CLTConfig(d_in=x.shape[-1], d_sae=recipe.d_sae, k=recipe.k, n_layers=n)
    clt = train_clt(
        x,
        y,
        cfg,
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        seed=recipe.seed,
        dead_after=recipe.dead_after,
        resample_every=recipe.resample_every,
        progress=progress,
    )
    _, eids, emask = tinyworld_dataset(recipe.eval_docs, seed=recipe.eval_seed, split="test")
    ev = clt_replacement_loss(model, clt, eids, emask)
    info = {**clt.info, "n_docs": recipe.n_docs, "training_tokens": int(x.shape[0]), "total_seconds": 0.0}
    info["total_seconds"] = round(time.time() - t0, 1)
    info["eval"] = {"docs": recipe.eval_docs, "seed": recipe.eval_seed, "split": "test", **ev}
    if progress:
        print(json.dumps(info, indent=1))
    clt.save(folder, extra=info)
    if artifact:
        artifacts.write_provenance(folder, artifact, recipe)
        write_checksums(folder)
    return clt


def build_artifact(name: str, *, progress: bool = True, out_dir: Path | None = None) -> None:
    """Build the registry artifact ``clt_tinyworld`` with its shipped recipe."""
    if name != "clt_tinyworld":
        raise KeyError(f"{name!r} is not built here; this module builds clt_tinyworld")
    build_clt(CLTRecipe(), Path(out_dir or WEIGHTS_DIR) / SHIPPED_FOLDER, progress=progress, artifact=name)
