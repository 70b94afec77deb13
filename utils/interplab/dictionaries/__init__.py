"""Sparse dictionaries of activations: SAEs and transcoders, one module family with one trainer.

- `config`: `SAEConfig` and `TranscoderConfig(SAEConfig)`, and the hook names they read.
- `modules`: `SAE` and `Transcoder` (a shared `SparseDictionary` base), with HookPoints on every activation.
- `training`: `train_dictionary`, the one trainer (and `train_transcoder`, its transcoder form).
- `io`: save/load in SAELens's folder layout, checksum-verified; `to_saelens`.
- `data`: documents, masks, cached activations and MLP input/output pairs.
- `metrics`: fidelity, sparsity and the model's loss with dictionaries spliced in.
- `latents`: ground truth: which planted TinyWorld latents a dictionary recovers.
- `display`: a feature's top tokens and contexts.
- `clt`: the cross-layer transcoder (`CrossLayerTranscoder`, `CLTConfig(SAEConfig)`, `train_clt`, the shipped CLT).
- `circuits`: feature circuits on transcoders (de-embeddings, attribution, graphs, fact recall).
- `shipped`: the shipped SAEs and transcoders: recipes, loaders, builders (`interplab rebuild`).
"""

from .config import DEFAULT_HOOK, SAEConfig, TranscoderConfig, mlp_in_hook, mlp_out_hook
from .modules import SAE, SAEOutput, SparseDictionary, Transcoder
from .training import train_dictionary, train_transcoder

__all__ = [
    "DEFAULT_HOOK",
    "SAE",
    "SAEConfig",
    "SAEOutput",
    "SparseDictionary",
    "Transcoder",
    "TranscoderConfig",
    "mlp_in_hook",
    "mlp_out_hook",
    "train_dictionary",
    "train_transcoder",
]
