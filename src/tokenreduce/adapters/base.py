"""The adapter contract: all model-specific knowledge lives in adapters.

An adapter is built from a model *before* anything is changed; its constructor
finds every seam a method needs and raises :class:`UnsupportedModelError` if one is
missing. ``attach`` then installs the method and returns the undo actions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

if TYPE_CHECKING:
    from ..methods.base import Method

Undo = Callable[[], None]


class Adapter:
    """Base adapter. ``sites`` names the kinds of reduction sites the model offers (e.g. ``"vit"``)."""

    sites: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()  # inputs beyond the site's tokens, e.g. "prompt_text" (Method.requires)
    position_modes: ClassVar[frozenset[str]] = frozenset({"original"})
    """Values of a config's ``positions`` this model honours; only a model whose reduced tokens feed
    position ids can re-index them, everywhere else "compact" would be silently meaningless."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.site: str | None = None  # chosen by apply() among ``sites`` before describe() / attach()

    def modules_touched(self) -> list[nn.Module]:
        """Modules this adapter changes; used to refuse a second method on the same modules."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Static facts a method validates its config against (layers, tokens, dims) at ``self.site``."""
        raise NotImplementedError

    def attach(self, method: Method) -> tuple[list[Undo], Any]:
        """Install ``method`` at ``self.site``; return the undo actions (run in reverse order) and a run state.

        The run state reports ``stats()`` and supports ``reset()``.
        """
        raise NotImplementedError
