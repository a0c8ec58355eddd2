"""Frozen, validated method configs.

A config is plain data: numbers, strings, tuples. No callables, no tensors, so it
can be printed, compared, hashed, serialised with :meth:`ReductionConfig.to_dict`
and rebuilt with :func:`config_from_dict` (the bench CLI and JSON reports rely on
this). Every value is checked in ``__post_init__`` so that a bad config fails
before any model is touched (DESIGN.md section 4.9).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from .errors import ConfigError

SCHEMA_VERSION = 1

POSITION_MODES = ("original", "compact")
"""Values of :attr:`BudgetConfig.positions`."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReductionConfig:
    """Base of every method config. Subclasses set ``method`` and extend :meth:`validate`."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field, its value and what is accepted."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the method name and schema version."""
        fields = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"method": self.method, "version": SCHEMA_VERSION, **fields}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReductionConfig:
        """Rebuild a config from :meth:`to_dict` output (only known fields are accepted)."""
        return config_from_dict(data)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PositionsConfig(ReductionConfig):
    """A config whose reduced tokens may feed a language model with position ids.

    ``positions`` matters where the reduced tokens feed a language model with position
    ids (VLMs): ``"original"`` (default, DESIGN.md sec. 4.3) keeps every surviving
    token at its original position and continues decoding after the original length;
    ``"compact"`` re-indexes the shortened sequence contiguously, as reference
    implementations that build shorter ``inputs_embeds`` do (in-LLM methods: from each
    cut on, with decode positions shifted per stage). It exists to reproduce them: a
    model trained on full-length prompts loses its layout under it. Models without
    contiguous position ids (ViT classifiers, Qwen's M-RoPE) accept only
    ``"original"`` (``Adapter.position_modes``).
    """

    positions: Literal["original", "compact"] = "original"

    def validate(self) -> None:
        super().validate()
        check_choice(self, "positions", POSITION_MODES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BudgetConfig(PositionsConfig):
    """A config whose strength is a token budget.

    ``keep`` is the number of reducible tokens (patches; never [CLS] or registers)
    left after the method's last reduction; ``ratio`` is the fraction of reducible
    tokens removed (0 = the unmodified model). Give one of them, or the method's
    own knob where it has one (ToMe's ``r``). ``positions``: :class:`PositionsConfig`.
    """

    keep: int | None = None
    ratio: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 0:
                raise ConfigError(f"{type(self).__name__}: keep={self.keep!r} is invalid; keep is a number of tokens, an int >= 0")
        if self.ratio is not None:
            if not isinstance(self.ratio, (int, float)) or not 0.0 <= float(self.ratio) < 1.0:
                raise ConfigError(
                    f"{type(self).__name__}: ratio={self.ratio!r} is invalid; ratio is the fraction of tokens removed, "
                    "a number in [0, 1) (0 = no reduction)"
                )
        if self.keep is not None and self.ratio is not None:
            raise ConfigError(f"{type(self).__name__}: give keep or ratio, not both (got keep={self.keep}, ratio={self.ratio})")


def require_one(config: ReductionConfig, names: tuple[str, ...]) -> None:
    """Check that exactly one of the fields ``names`` is set (not None)."""
    given = [n for n in names if getattr(config, n) is not None]
    if len(given) != 1:
        options = " or ".join(f"{n}=..." for n in names)
        raise ConfigError(f"{type(config).__name__}: give exactly one of {options} (got {given or 'none'})")


def check_range(config: ReductionConfig, name: str, low: float, high: float, *, low_open: bool = False) -> None:
    """Check ``low <= value <= high`` (``low < value`` when ``low_open``) for a numeric field."""
    value = getattr(config, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{type(config).__name__}: {name}={value!r} is invalid; expected a number in {bracket}{low}, {high}]")


def check_choice(config: ReductionConfig, name: str, choices: tuple[str, ...]) -> None:
    """Check that a string field is one of ``choices``."""
    value = getattr(config, name)
    if value not in choices:
        raise ConfigError(f"{type(config).__name__}: {name}={value!r} is invalid; accepted: {', '.join(choices)}")


def check_layers(config: ReductionConfig, name: str) -> None:
    """Check an optional tuple of distinct, non-negative, increasing layer indices."""
    layers = getattr(config, name)
    if layers is None:
        return
    if not isinstance(layers, tuple) or not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
        raise ConfigError(f"{type(config).__name__}: {name}={layers!r} is invalid; expected a non-empty tuple of layer indices >= 0")
    if list(layers) != sorted(set(layers)):
        raise ConfigError(f"{type(config).__name__}: {name}={layers!r} must be strictly increasing")


def config_from_dict(data: dict[str, Any]) -> ReductionConfig:
    """Build the config named by ``data['method']``; unknown methods and fields are errors."""
    from .registry import config_class

    data = dict(data)
    version = data.pop("version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise ConfigError(f"config schema version {version!r} is not supported; this tokenreduce reads version {SCHEMA_VERSION}")
    cls = config_class(data.pop("method", None))
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {unknown}; fields: {sorted(known)}")
    return cls(**{k: _from_json(v) for k, v in data.items()})


def _jsonable(value: Any) -> Any:
    if isinstance(value, ReductionConfig):  # a stage of a staged method (methods/staged.py)
        return value.to_dict()
    return list(value) if isinstance(value, tuple) else value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and "method" in value:
        return config_from_dict(value)
    return tuple(value) if isinstance(value, list) else value
