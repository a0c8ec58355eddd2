"""What every method is: a config, the sites it acts on, a schedule and a plan per site."""

from __future__ import annotations

from typing import Any, ClassVar

from ..budget import tokens_to_remove
from ..config import ReductionConfig
from ..errors import ConfigError
from ..merge_slot import Site
from ..ops.merge import TokenPlan


class Method:
    """A method bound to one model: its config, the adapter's static facts and the sites it acts on.

    The constructor must raise :class:`ConfigError` for anything the config asks
    that this model cannot do; it runs before the model is touched.
    """

    sites: ClassVar[frozenset[str]] = frozenset()
    site_order: ClassVar[tuple[str, ...]] = ()  # preference when a model offers several of ``sites``
    requires: ClassVar[frozenset[str]] = frozenset()  # what the adapter must provide besides the site (Adapter.provides)
    description: ClassVar[str] = ""

    def __init__(self, config: ReductionConfig, facts: dict[str, Any]) -> None:
        self.config = config
        self.facts = facts

    @classmethod
    def pick_site(cls, offered: frozenset[str]) -> str | None:
        """The site this method uses on a model offering ``offered`` (None: no common site)."""
        return next((site for site in cls.site_order or sorted(cls.sites) if site in offered), None)

    @property
    def num_layers(self) -> int:
        return self.facts["num_layers"]

    def check_layers(self, layers: tuple[int, ...] | list[int], field: str) -> list[int]:
        """Layers must exist in this model."""
        bad = [i for i in layers if i >= self.num_layers]
        if bad:
            raise ConfigError(f"{type(self.config).__name__}: {field} {bad} out of range; this model has layers 0..{self.num_layers - 1}")
        return list(layers)


class VitMethod(Method):
    """A method acting at the merge slots of ViT blocks (between attention and MLP).

    Subclasses implement :meth:`solve` (budget -> net tokens removed at each layer,
    for an input with a given number of reducible tokens) and :meth:`plan`
    (filter + correlate at one site). ``track_sizes`` carries token sizes from
    layer to layer; ``prop_attn`` adds log(size) to attention logits.
    """

    sites: ClassVar[frozenset[str]] = frozenset({"vit"})
    track_sizes: bool = False
    prop_attn: bool = False

    def __init__(self, config: ReductionConfig, facts: dict[str, Any]) -> None:
        super().__init__(config, facts)
        self._schedules: dict[int, list[int]] = {}
        if facts["reducible_tokens"] is not None:  # None: the count depends on each input (dynamic-resolution images)
            self.schedule(facts["reducible_tokens"])

    def schedule(self, reducible: int) -> list[int]:
        """Net tokens removed at each layer for an input with ``reducible`` tokens (cached per count)."""
        if reducible not in self._schedules:
            self._schedules[reducible] = self.solve(reducible)
        return self._schedules[reducible]

    def solve(self, reducible: int) -> list[int]:
        raise NotImplementedError

    def plan(self, site: Site) -> TokenPlan:
        raise NotImplementedError

    def at_layers(self, layers: list[int], removals: list[int]) -> list[int]:
        """Spread per-reduction removals onto a full-depth schedule."""
        schedule = [0] * self.num_layers
        for layer, r in zip(layers, removals):
            schedule[layer] = r
        return schedule


class SingleStep(VitMethod):
    """A method that reduces once, to its budget, at one layer.

    The layer is the config's ``layer`` where it has one, else the adapter's
    default: block 0 of a ViT classifier, the feature layer (or the projector) of
    a VLM. ``default_ratio`` applies when the config gives no budget.
    """

    default_ratio: ClassVar[float | None] = None

    @property
    def layer(self) -> int:
        layer = getattr(self.config, "layer", None)
        return self.facts["default_layer"] if layer is None else layer

    def solve(self, reducible: int) -> list[int]:
        config = self.config
        no_budget = config.keep is None and config.ratio is None
        ratio = self.default_ratio if no_budget else config.ratio
        self.check_layers((self.layer,), "layer")
        only = self.facts.get("reducing_layers")  # a site that reduces one block's output accepts that block only
        if only is not None and self.layer not in only:
            raise ConfigError(
                f"{type(config).__name__}: layer={self.layer} is not where this site reduces; it reduces the output of "
                f"block {', '.join(map(str, only))} (leave layer unset, or pick a site inside the tower)"
            )
        return self.at_layers([self.layer], [tokens_to_remove(reducible, config.keep, ratio, type(config).__name__)])
