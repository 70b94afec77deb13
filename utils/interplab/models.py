"""Model access for the whole course: `load_model(name)`.

This is the one module that knows how models are built. Chapters call
``load_model("tinyworld")`` (the default, offline) or, where a model hub is
reachable, ``load_model("gpt2-small")`` or any other TransformerLens model name.
Both return a TransformerLens ``HookedTransformer``, processed the way
``HookedTransformer.from_pretrained`` processes GPT-2 (layer norms folded, writing
weights and the unembedding centred), so code written for one runs on the other.

TransformerLens 3.x marks ``HookedTransformer`` as deprecated in favour of
``TransformerBridge`` (its 4.x API, which SAELens 6 does not support yet). The
course stays on ``HookedTransformer`` until both libraries have moved, and this
module hides that one deprecation warning; when the move comes, it happens here.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import warnings
from pathlib import Path

import torch

from . import threads
from .tinyworld.tokenizer import hf_tokenizer, is_tinyworld_tokenizer
from .weights import WEIGHTS_DIR, CorruptedFileError, verify

BUNDLED = {"tinyworld": WEIGHTS_DIR / "tinyworld"}
HUB_HOST = "huggingface.co"
MODEL_FILES = ["config.json", "model.safetensors", "tokenizer.json"]


class ModelUnavailableError(RuntimeError):
    """A pretrained model was asked for but no model hub can be reached."""


def best_device() -> str:
    """ "cuda" when a GPU is present, else "mps" on Apple silicon, else "cpu"."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def hub_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (False at once when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "0") not in (
        "",
        "0",
    ):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def quiet_transformer_lens():
    """Hide TransformerLens's HookedTransformer deprecation warning and its info logging."""
    logger = logging.getLogger("transformer_lens")
    level = logger.level
    logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")
        warnings.filterwarnings("ignore", message=".*HookedTransformer.from_pretrained is deprecated.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="transformer_lens")
        try:
            yield
        finally:
            logger.setLevel(level)


def known_pretrained_names() -> list[str]:
    """Names TransformerLens can load from a hub (official names and their aliases)."""
    from transformer_lens.supported_models import MODEL_ALIASES, OFFICIAL_MODEL_NAMES

    names = list(OFFICIAL_MODEL_NAMES)
    for aliases in MODEL_ALIASES.values():
        names.extend(aliases)
    return names


def _hooked_config(hf_config: dict, name: str):
    from transformer_lens import HookedTransformerConfig

    d_model, n_heads = hf_config["n_embd"], hf_config["n_head"]
    return HookedTransformerConfig(
        model_name=name,
        d_model=d_model,
        d_head=d_model // n_heads,
        n_heads=n_heads,
        d_mlp=hf_config.get("n_inner") or 4 * d_model,
        n_layers=hf_config["n_layer"],
        n_ctx=hf_config["n_positions"],
        d_vocab=hf_config["vocab_size"],
        act_fn=hf_config.get("activation_function", "gelu_new"),
        normalization_type="LN",
        eps=hf_config.get("layer_norm_epsilon", 1e-5),
        positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel",
        default_prepend_bos=True,
        device="cpu",
    )


def load_folder(folder: str | Path, name: str | None = None, device: str | None = None, *, check: bool = True):
    """Load a GPT-2 saved in Hugging Face format (config.json, model.safetensors, tokenizer.json).

    With ``check`` (the default) the files are first verified against the folder's SHA256SUMS.
    A bundled folder (inside the package) must have one: without it a changed file could not be
    told from the real one, so loading is refused.
    """
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass 'tinyworld' or a folder saved by the trainer")
    bundled = folder.resolve().is_relative_to(WEIGHTS_DIR.resolve())
    if check and (bundled or (folder / "SHA256SUMS").is_file()):
        verify(folder, MODEL_FILES)  # raises CorruptedFileError naming the missing SHA256SUMS
    try:
        hf_config = json.loads((folder / "config.json").read_text())
        state = load_file(str(folder / "model.safetensors"))
    except Exception as e:  # unreadable even though present (no checksum file to catch it)
        raise CorruptedFileError(f"could not read the model in {folder}: {e}") from e
    hf = GPT2LMHeadModel(
        GPT2Config(
            **{
                k: v
                for k, v in hf_config.items()
                if k not in ("architectures", "transformers_version", "dtype", "torch_dtype")
            }
        )
    )
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if [k for k in missing if not k.endswith("lm_head.weight")] or unexpected:
        raise CorruptedFileError(
            f"{folder / 'model.safetensors'} does not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    hf.tie_weights()
    cfg = _hooked_config(hf_config, name or folder.name)
    with quiet_transformer_lens():
        model = HookedTransformer(cfg, tokenizer=hf_tokenizer(folder), move_to_device=False)
        model.load_and_process_state_dict(
            convert_gpt2_weights(hf, cfg), fold_ln=True, center_writing_weights=True, center_unembed=True
        )
    model.eval()
    with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints "Moving model to device"
        return model.to(device or best_device())


def load_model(name: str | Path = "tinyworld", device: str | None = None, **kwargs):
    """Load a model as a TransformerLens ``HookedTransformer``.

    Args:
        name: "tinyworld" (bundled, offline), a folder saved by
            ``python -m interplab.tinyworld.train``, or a TransformerLens pretrained
            name such as "gpt2-small" (needs a reachable Hugging Face hub).
        device: "cpu", "cuda", ...; default: the best available.
        kwargs: passed to ``HookedTransformer.from_pretrained`` for pretrained names.

    Raises:
        CorruptedFileError: a bundled file is missing or does not match its checksum.
        ModelUnavailableError: a pretrained model was asked for and no hub is reachable.
        ValueError: the name is not known.
    """
    threads.announce()  # the thread setting chosen on import, said once per process
    if isinstance(name, Path):
        return load_folder(name, device=device)
    if not isinstance(name, str):
        raise TypeError(f"load_model takes a model name or a folder, got {type(name).__name__}")
    if not name.strip():
        raise ValueError(
            "load_model got an empty model name. Pass 'tinyworld' for the bundled model, a folder "
            "saved by `python -m interplab.tinyworld.train` (e.g. load_model('runs/my_model')), or a "
            "TransformerLens name such as 'gpt2-small'. (An empty name is not read as the current "
            "folder; write './' if that is what you mean.)"
        )
    if name in BUNDLED:
        return load_folder(BUNDLED[name], name=name, device=device)
    if os.path.sep in name or Path(name).is_dir():
        return load_folder(name, device=device)
    known = known_pretrained_names()
    if name not in known:
        close = [k for k in known if name.lower() in k.lower()][:8]
        raise ValueError(
            f"Unknown model name {name!r}. The bundled, offline model is 'tinyworld'; a folder saved by "
            f"`python -m interplab.tinyworld.train` also works; online, any TransformerLens name works, "
            f"e.g. 'gpt2-small', 'gpt2-medium', 'pythia-70m'"
            + (f" (names like yours: {', '.join(close)})" if close else "")
            + "."
        )
    from .standin import load_standin, standin_requested  # here, not at the top: standin imports this module

    if standin_requested():  # tests of the real-model route (see interplab.standin)
        return load_standin(name, device)
    offline_flag = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    if not offline_flag and not hub_reachable():
        raise ModelUnavailableError(
            f"{name!r} must be downloaded from the Hugging Face hub ({HUB_HOST}), which cannot be reached from "
            f"this machine (or HF_HUB_OFFLINE is set). The course runs offline on its bundled model: use "
            f"load_model('tinyworld'), or set MODEL_NAME = 'tinyworld' at the top of the notebook. To use "
            f"{name!r}, connect to the internet (or open the notebook on Colab) and run the cell again; once "
            f"downloaded, it is cached, and HF_HUB_OFFLINE=1 loads it from the cache."
        )
    from transformer_lens import HookedTransformer

    with quiet_transformer_lens():
        try:
            model = HookedTransformer.from_pretrained(name, device=device or best_device(), **kwargs)
        except OSError as e:  # HF_HUB_OFFLINE set and the model is not in the local cache
            raise ModelUnavailableError(
                f"{name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so it cannot be "
                f"downloaded. Unset HF_HUB_OFFLINE while online, or use load_model('tinyworld'). ({e})"
            ) from e
    model.eval()
    return model


def is_tinyworld(model) -> bool:
    """Whether ``model`` is a TinyWorld model (the bundled one or one trained by the course)."""
    return model.tokenizer is not None and is_tinyworld_tokenizer(model.tokenizer)


def tinyworld_only(model, why: str) -> bool:
    """For a section that needs TinyWorld: True on a TinyWorld model; otherwise say so, plainly, and return False.

    if interplab.tinyworld_only(model, "it scores the probe against the generator's room labels"):
        ...
    """
    if is_tinyworld(model):
        return True
    print(f"[skipped] This section needs TinyWorld, not {model.cfg.model_name}: {why}.")
    return False
