"""Saving and loading sparse dictionaries, checksum-verified, in SAELens's folder layout; conversion to SAELens.

A saved SAE or transcoder is a folder with ``cfg.json`` (SAELens 6's layout, plus
interplab's own config under ``"interplab"`` and what its training recorded under
``"interplab_info"``), ``sae_weights.safetensors`` and ``SHA256SUMS``, so SAELens's
``SAE.load_from_disk`` reads it as well. The functions here take the module (anything with
``cfg`` and the weights); `interplab.dictionaries.modules` calls them from ``save``,
``load`` and ``to_saelens``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from .. import artifacts
from ..weights import verify, write_checksums

WEIGHTS_FILE = "sae_weights.safetensors"  # SAELens's file names, so SAE.load_from_disk reads the folders
CONFIG_FILE = "cfg.json"
SAELENS_LAYOUT = "6.0.0"  # the cfg.json layout written (SAELens reads files without a version as pre-6.0)


def saelens_architecture(cfg) -> str:
    """The SAELens 6 architecture name of a dictionary with config ``cfg``."""
    if not cfg.is_transcoder:
        return {"standard": "standard", "topk": "topk", "batchtopk": "jumprelu"}[cfg.architecture]
    if cfg.architecture == "topk":
        raise NotImplementedError("SAELens 6 has no TopK transcoder class; use 'batchtopk' (a JumpReLU at "
                                  "inference) or 'standard' to share a transcoder with SAELens")
    base = "jumprelu_" if cfg.architecture == "batchtopk" else ""
    return base + ("skip_transcoder" if cfg.skip else "transcoder")


def _metadata(cfg) -> dict:
    meta = {"sae_lens_version": SAELENS_LAYOUT, "model_name": cfg.model_name, "hook_name": cfg.hook_name}
    if cfg.is_transcoder:
        meta["hook_name_out"] = cfg.hook_name_out
    return {**meta, "hook_head_index": None, "prepend_bos": True, "context_size": 128,
            "dataset_path": "interplab.tinyworld"}


def config_dict(cfg) -> dict:
    """The config in SAELens's cfg.json layout (plus interplab's own fields under "interplab")."""
    d = {"architecture": None, "d_in": cfg.d_in, "d_sae": cfg.d_sae}
    if cfg.is_transcoder:
        d["d_out"] = cfg.d_out
    d.update({"dtype": "float32", "device": "cpu", "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
              "normalize_activations": "none", "reshape_activations": "none", "metadata": _metadata(cfg),
              "interplab": asdict(cfg)})
    try:
        d["architecture"] = saelens_architecture(cfg)
    except NotImplementedError:
        d["architecture"] = "interplab_topk_transcoder"
    if cfg.architecture == "topk" and not cfg.is_transcoder:
        d["k"] = cfg.k
    return d


def saelens_state(module) -> dict[str, Tensor]:
    """The weights under SAELens's names (BatchTopK's one threshold repeated per feature, as SAELens stores it)."""
    state = {"W_enc": module.W_enc, "b_enc": module.b_enc, "W_dec": module.W_dec, "b_dec": module.b_dec}
    if getattr(module, "W_skip", None) is not None:
        state["W_skip"] = module.W_skip
    if module.cfg.architecture == "batchtopk":
        state["threshold"] = module.threshold.expand(module.cfg.d_sae)
    return state


def save(module, folder: str | Path, extra: dict | None = None) -> Path:
    """Write cfg.json, sae_weights.safetensors (SAELens's layout) and SHA256SUMS into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in saelens_state(module).items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    cfg = config_dict(module.cfg)
    if extra:
        cfg["interplab_info"] = extra
    (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    write_checksums(folder)
    return folder


def read(folder: str | Path, kind: str = "a sparse dictionary", check: bool = True) -> tuple[dict, dict[str, Tensor]]:
    """(the parsed cfg.json, the weights) of a folder written by `save`, verified against its SHA256SUMS first."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder with {kind} ({CONFIG_FILE} and {WEIGHTS_FILE})")
    if check:
        verify(folder, [CONFIG_FILE, WEIGHTS_FILE])
    raw = json.loads((folder / CONFIG_FILE).read_text())
    if "interplab" not in raw:
        raise ValueError(f"{folder / CONFIG_FILE} has no 'interplab' entry: it was not written by interplab. Load "
                         f"it with SAELens's SAE.load_from_disk instead")
    return raw, load_file(str(folder / WEIGHTS_FILE))


def load_shipped(cls, folder: str | Path, device: str | None = None):
    """``cls.load(folder)`` for a folder shipped with the course, refused if it was trained on other model weights."""
    module = cls.load(folder, device=device)
    artifacts.require_model_match(folder)
    return module


def to_saelens(module):
    """The same dictionary as a SAELens 6 object.

    SAEs: StandardSAE, TopKSAE or (BatchTopK) JumpReLUSAE; transcoders: Transcoder,
    SkipTranscoder, JumpReLUTranscoder or JumpReLUSkipTranscoder.
    """
    import sae_lens  # optional at import time: only this conversion needs it
    from sae_lens.saes.sae import SAEMetadata

    cfg = module.cfg
    arch = saelens_architecture(cfg)
    classes = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
        "transcoder": (sae_lens.Transcoder, sae_lens.TranscoderConfig),
        "skip_transcoder": (sae_lens.SkipTranscoder, sae_lens.SkipTranscoderConfig),
        "jumprelu_transcoder": (sae_lens.JumpReLUTranscoder, sae_lens.JumpReLUTranscoderConfig),
        "jumprelu_skip_transcoder": (sae_lens.JumpReLUSkipTranscoder, sae_lens.JumpReLUSkipTranscoderConfig),
    }
    sae_cls, cfg_cls = classes[arch]
    kwargs = {"d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": "float32", "device": str(module.W_enc.device),
                  "apply_b_dec_to_input": cfg.apply_b_dec_to_input, "metadata": SAEMetadata(**_metadata(cfg))}
    if cfg.is_transcoder:
        kwargs["d_out"] = cfg.d_out
    if arch == "topk":
        kwargs["k"] = cfg.k
    out = sae_cls(cfg_cls(**kwargs))
    out.load_state_dict({k: v.detach().clone() for k, v in saelens_state(module).items()})
    return out.eval()


def threshold_from_state(state: dict[str, Tensor], default: Tensor) -> Tensor:
    """Interplab keeps one BatchTopK threshold; SAELens stores it once per feature."""
    threshold = state.pop("threshold", None)
    return default if threshold is None else threshold[0]

