"""The model zoo: small models trained here and shipped with the package.

Token-reduction methods are judged on quality as well as speed, and that needs
trained models that load offline and evaluate in seconds. Each zoo model is a
stock Hugging Face class saved with `save_pretrained`, so it is loaded through
the same `from_pretrained` path as a Hub checkpoint and methods patch the real
transformers code, not a stand-in.

Adding a model is one entry in `_REGISTRY`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import importlib

import torch
from torch import nn

from tokenreduce.zoo.digits import digits_split

ZOO_DIR: Path = Path(__file__).parent


@dataclass(frozen=True)
class _Entry:
    """What the zoo needs to know about one model: how to load it, what data it
    is evaluated on, and which folder under ZOO_DIR holds its files."""

    model_class: str  # "library.ClassName", imported on first use so `import tokenreduce.zoo` stays light
    eval_data: Callable[[str], tuple[torch.Tensor, torch.Tensor]]
    folder: str

    def load_class(self) -> type[nn.Module]:
        module, name = self.model_class.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)


def _digits16(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from tokenreduce.zoo.dit_sampling import digits16

    return digits16(split)


def _grids(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from tokenreduce.zoo.vlm_data import EVAL_SEED, GridSampler

    return GridSampler(split, EVAL_SEED).grids(300)


_REGISTRY: dict[str, _Entry] = {
    "digits-vit": _Entry("transformers.ViTForImageClassification", digits_split, "digits_vit"),
    "digits-dit": _Entry("diffusers.DiTTransformer2DModel", _digits16, "digits_dit"),
    "digits-vlm": _Entry("transformers.LlavaForConditionalGeneration", _grids, "digits_vlm"),
}


def names() -> list[str]:
    """Names of the shipped models, in registry order."""
    return list(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown zoo model {name!r}; available: {', '.join(names())}") from None


def model_path(name: str) -> Path:
    """Folder holding the model's config.json, model.safetensors and README.md (model card)."""
    return ZOO_DIR / _entry(name).folder


def load_model(name: str, **from_pretrained_kwargs) -> nn.Module:
    """Load a zoo model with its class's `from_pretrained`, in eval mode.

    Keyword arguments go to `from_pretrained` unchanged (for example
    `attn_implementation` or `dtype`), exactly as they would for a Hub model.
    """
    model = _entry(name).load_class().from_pretrained(model_path(name), **from_pretrained_kwargs)
    return model.eval()


def load_eval_data(name: str, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(pixel_values float32 [N, C, H, W], labels int64 [N])` for a model's
    "train" or "test" split, preprocessed exactly as in training."""
    return _entry(name).eval_data(split)


def load_tokenizer(name: str):
    """The tokenizer saved next to a zoo model (``PreTrainedTokenizerFast.from_pretrained``)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(model_path(name))
