"""Staged methods: registered methods at different sites of one model, applied as one (hook H5, METHODS.md sec. 0.3).

FiCoCo-VL (METHODS.md C6.1) is the first: FiCoCo-V in the vision tower, FiCoCo-L
in the LLM decoder, under one ``apply`` and one handle. A staged method adds no
algorithm of its own: each stage is an existing method with its own config,
bound at the site the model offers for it. The config names the stages (one
field per stage, holding that stage's config); the method class lists the
stage methods under the same names, in the order data flows through the model.

A model is offered a staged method only if it offers a site for every stage
(by capability: ``pick_site`` asks each stage method), so a model that lacks one
is refused with :class:`~tokenreduce.errors.UnsupportedModelError` before
anything is touched. Binding and attaching are generic
(``tokenreduce.api`` / ``tokenreduce.adapters.staged``); no adapter knows about
staging beyond attaching one method at one site at a time.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any, ClassVar

from ..config import ReductionConfig
from ..errors import ConfigError
from .base import Method

SITE_JOINER = "+"


@dataclasses.dataclass(frozen=True, kw_only=True)
class StagedConfig(ReductionConfig):
    """Base of configs whose fields are the configs of a staged method's stages, in pipeline order.

    Each field's declared type is the stage's config class; a value of another
    type is refused naming the field. Stages with a ``positions`` field must agree on
    it: the stages number one prompt, and a vision stage that keeps original
    positions under a decoder stage that re-indexes (or the reverse) would leave a
    numbering neither mode describes.
    """

    def validate(self) -> None:
        super().validate()
        hints = typing.get_type_hints(type(self))
        for name, value in self.stage_configs().items():
            wanted = hints[name]
            if not isinstance(value, wanted):
                raise ConfigError(f"{type(self).__name__}: {name}={value!r} is invalid; expected a {wanted.__name__}")
        positions = {name: value.positions for name, value in self.stage_configs().items() if hasattr(value, "positions")}
        if len(set(positions.values())) > 1:
            given = ", ".join(f"{name}.positions={mode!r}" for name, mode in positions.items())
            raise ConfigError(f"{type(self).__name__}: the stages must share one positions mode; got {given}")

    def stage_configs(self) -> dict[str, ReductionConfig]:
        """The stages' configs by field name, in pipeline order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


BindStage = Callable[[type[Method], ReductionConfig, str, bool], Method]  # (stage, config, site, after another stage)


class Staged(Method):
    """A method made of other registered methods, each at its own site (see the module docstring).

    Subclasses set ``stages``: config field name -> stage method class, in the
    order data flows through the model. ``sites`` (a label such as ``"vit+llm"``)
    and ``requires`` follow from the stages.
    """

    stages: ClassVar[dict[str, type[Method]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.sites = frozenset({SITE_JOINER.join("/".join(sorted(stage.sites)) for stage in cls.stages.values())})
        cls.requires = frozenset().union(*(stage.requires for stage in cls.stages.values()))

    def __init__(self, config: StagedConfig, bound: dict[str, tuple[str, Method]]) -> None:
        super().__init__(config, {})
        self.bound = bound  # stage name -> (site, method bound there), in pipeline order

    @classmethod
    def pick_site(cls, offered: frozenset[str]) -> str | None:
        """The stages' sites joined (``"vit+llm"``), or None if the model lacks a site for any stage."""
        picked = [stage.pick_site(offered) for stage in cls.stages.values()]
        return None if None in picked else SITE_JOINER.join(picked)

    @classmethod
    def bind(cls, config: StagedConfig, offered: frozenset[str], bind_stage: BindStage) -> Staged:
        """Bind every stage at its site with ``bind_stage``; a stage's ConfigError is re-raised naming the stage's field.

        Every stage but the first is bound as downstream: it gets what the stages before it left.
        """
        bound = {}
        for index, (name, stage) in enumerate(cls.stages.items()):
            site = stage.pick_site(offered)
            try:
                bound[name] = (site, bind_stage(stage, getattr(config, name), site, index > 0))
            except ConfigError as error:
                raise ConfigError(f"{type(config).__name__}.{name}: {error}") from error
        return cls(config, bound)

    def stage(self, name: str) -> Method:
        """The bound method of stage ``name``."""
        return self.bound[name][1]
