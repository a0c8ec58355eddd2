"""Two registries: methods keyed by config type, adapters keyed by model class.

Adapters may be registered by class object or by dotted class path
(``"timm.models.vision_transformer.VisionTransformer"``): the string form lets
tokenreduce know about timm / transformers / diffusers classes without importing
those libraries at ``import tokenreduce`` time. Lookup walks the model's MRO, so a
subclass of a supported model is supported too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from .config import ReductionConfig
from .errors import ConfigError, UnsupportedModelError

if TYPE_CHECKING:
    from .adapters.base import Adapter
    from .methods.base import Method

T = TypeVar("T")
V = TypeVar("V")

_METHODS: dict[type[ReductionConfig], type[Method]] = {}
_ADAPTERS: dict[str, type[Adapter]] = {}


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def lookup_by_class(table: Mapping[str, V], obj: Any) -> V | None:
    """The entry of ``table`` (keyed by dotted class path) for ``obj``'s class or its nearest base class.

    Keys are strings so tables never import timm / transformers / diffusers.
    """
    return next((table[path] for cls in type(obj).__mro__ if (path := _class_path(cls)) in table), None)


def register_method(config_cls: type[ReductionConfig]) -> Callable[[type[T]], type[T]]:
    """Class decorator: ``@register_method(ToMeConfig) class ToMe(Method): ...``."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, ReductionConfig)) or not config_cls.method:
        raise TypeError(f"register_method expects a ReductionConfig subclass with a `method` name, got {config_cls!r}")

    def decorate(method_cls: type[T]) -> type[T]:
        taken = {c.method: c for c in _METHODS}
        if config_cls.method in taken and taken[config_cls.method] is not config_cls:
            raise ValueError(f"method name {config_cls.method!r} is already registered by {taken[config_cls.method].__name__}")
        _METHODS[config_cls] = method_cls  # type: ignore[assignment]
        return method_cls

    return decorate


def register_adapter(*model_classes: type | str) -> Callable[[type[T]], type[T]]:
    """Class decorator registering an adapter for model classes (class objects or dotted paths)."""

    def decorate(adapter_cls: type[T]) -> type[T]:
        for model_cls in model_classes:
            _ADAPTERS[model_cls if isinstance(model_cls, str) else _class_path(model_cls)] = adapter_cls  # type: ignore[assignment]
        return adapter_cls

    return decorate


def method_for(config: Any) -> type[Method]:
    """The method class for a config instance; a clear error for anything else."""
    for cls in type(config).__mro__:
        if cls in _METHODS:
            return _METHODS[cls]
    raise ConfigError(
        f"expected a tokenreduce config instance such as ToMeConfig(r=8), got {type(config).__name__}; "
        f"available configs: {', '.join(c.__name__ for c in _METHODS)}"
    )


def config_class(name: str | None) -> type[ReductionConfig]:
    """The config class registered under a method name (``"tome"`` -> ``ToMeConfig``)."""
    for cls in _METHODS:
        if cls.method == name:
            return cls
    raise ConfigError(f"unknown method {name!r}; available methods: {', '.join(method_names())}")


def method_names() -> list[str]:
    """Registered method names, in registration order."""
    return [cls.method for cls in _METHODS]


def method_configs() -> list[type[ReductionConfig]]:
    """Registered config classes, in registration order."""
    return list(_METHODS)


def adapter_for(model: Any) -> type[Adapter]:
    """The adapter registered for the model's class or its nearest base class."""
    adapter = lookup_by_class(_ADAPTERS, model)
    if adapter is not None:
        return adapter
    raise UnsupportedModelError(
        f"tokenreduce has no adapter for {type(model).__name__} ({_class_path(type(model))}). "
        f"Supported model classes: {', '.join(sorted(p.rsplit('.', 1)[-1] for p in _ADAPTERS))}. "
        "Register one with tokenreduce.register_adapter(YourModelClass) on an Adapter subclass."
    )


def adapter_classes() -> dict[str, type[Adapter]]:
    """Registered model class paths and their adapters."""
    return dict(_ADAPTERS)


def method_for_class(config_cls: type[ReductionConfig]) -> type[Method]:
    """The method class registered for a config class."""
    return _METHODS[config_cls]
