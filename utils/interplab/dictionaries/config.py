"""What a sparse dictionary is: `SAEConfig`, and `TranscoderConfig`, an SAE config whose output space differs.

As in SAELens, a transcoder is an SAE that reads one activation and predicts another:
``TranscoderConfig(SAEConfig)`` adds the output size, the skip path and the MLP layer it
replaces. The configs hold what the module is; how it was trained lives in the recipes of
`interplab.dictionaries.shipped`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..hooks import act_name

ARCHITECTURES = ("standard", "topk", "batchtopk")
DEFAULT_HOOK = act_name("resid_post", 1)  # the shipped SAEs' layer: the residual stream after block 1 of 4


def mlp_in_hook(layer: int) -> str:
    """The hook of the MLP's input: the normalised residual stream before the MLP of ``layer``."""
    return act_name("normalized", layer, "ln2")


def mlp_out_hook(layer: int) -> str:
    """The hook of the MLP's output (what the MLP of ``layer`` adds to the residual stream)."""
    return act_name("mlp_out", layer)


@dataclass
class SAEConfig:
    """What an SAE is: its sizes, its architecture and where in which model it reads.

    Attributes:
        d_in: input dimension (d_model for the residual stream); an SAE reconstructs its input,
            so this is also its output dimension (``d_out``).
        d_sae: number of features.
        architecture: "standard" (ReLU + L1 penalty), "topk" or "batchtopk".
        k: active features per token (topk; on average for batchtopk).
        l1_coeff: weight of the L1 penalty (standard).
        apply_b_dec_to_input: subtract b_dec from the input before encoding.
        hook_name: the hook point the SAE reads (and, spliced in, replaces).
        model_name: the model the SAE was trained on.
    """

    d_in: int
    d_sae: int
    architecture: str = "standard"
    k: int = 16
    l1_coeff: float = 1.0
    apply_b_dec_to_input: bool = True
    hook_name: str = DEFAULT_HOOK
    model_name: str = "tinyworld"

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, not {self.architecture!r}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.architecture != "standard" and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be between 1 and d_sae={self.d_sae}, got {self.k}")

    @property
    def d_out(self) -> int:
        """The size of what is reconstructed: the input's, for an SAE."""
        return self.d_in

    @property
    def is_transcoder(self) -> bool:
        return False

    @classmethod
    def from_dict(cls, raw: dict) -> SAEConfig:
        """The config saved in a cfg.json's ``interplab`` entry (older SAE folders also list d_out and hook_name_out)."""
        raw = dict(raw)
        d_out, hook_out = raw.pop("d_out", None), raw.pop("hook_name_out", None)
        if (d_out is not None and d_out != raw.get("d_in")) or hook_out is not None:
            raise ValueError(f"this folder holds a transcoder (output {hook_out or d_out}), not an SAE: load it "
                             f"with Transcoder.load")
        return cls(**raw)


@dataclass
class TranscoderConfig(SAEConfig):
    """What a transcoder is: an SAE config whose output is another activation, the output of one MLP.

    It reads the MLP's normalised input (``hook_name``, ``blocks.L.ln2.hook_normalized``) and
    predicts the MLP's output (``hook_name_out``, ``blocks.L.hook_mlp_out``); both follow from
    ``layer``. It never subtracts ``b_dec`` (which lives in the output space) from its input.

    Attributes (besides SAEConfig's):
        d_out: output size (d_model: the MLP's output); None means d_in.
        skip: whether there is a linear skip path (a skip transcoder).
        layer: the layer of the MLP it replaces.
        hook_name_out: what it predicts; derived from ``layer``.
    """

    architecture: str = "batchtopk"
    apply_b_dec_to_input: bool = False
    hook_name: str | None = None  # type: ignore[assignment]
    d_out: int | None = None  # type: ignore[assignment]
    skip: bool = False
    layer: int = 0
    hook_name_out: str | None = None

    def __post_init__(self) -> None:
        if self.d_out is None:
            self.d_out = self.d_in
        super().__post_init__()
        if self.d_out <= 0:
            raise ValueError(f"sizes must be positive, got d_in={self.d_in}, d_sae={self.d_sae}, d_out={self.d_out}")
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")
        if self.apply_b_dec_to_input:
            raise ValueError("a transcoder's b_dec lives in its output space: apply_b_dec_to_input must be False")
        for attr, hook in (("hook_name", mlp_in_hook(self.layer)), ("hook_name_out", mlp_out_hook(self.layer))):
            if getattr(self, attr) is None:
                setattr(self, attr, hook)
            elif getattr(self, attr) != hook:
                raise ValueError(f"a transcoder of layer {self.layer} has {attr}={hook!r} (it follows from layer), "
                                 f"got {getattr(self, attr)!r}")

    @property
    def is_transcoder(self) -> bool:
        return True

    @classmethod
    def from_dict(cls, raw: dict) -> TranscoderConfig:
        return cls(**raw)
