"""apply / remove / Handle: the whole user-facing lifecycle.

``apply`` validates the config, resolves the adapter, checks compatibility and
solves the schedule for the model's default input *before* touching the model,
so a bad call leaves the model exactly as it was (DESIGN.md sec. 4.9). Every
change is recorded as an undo action; ``remove`` runs them in reverse order and
restores the original model bit for bit. A staged method (``methods/staged.py``,
FiCoCo-VL) is bound stage by stage, each at its own site, and attached by
``adapters/staged.py``, under one handle.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from . import registry
from .adapters.staged import attach_stages
from .config import ReductionConfig
from .errors import AlreadyAppliedError, ConfigError, UnsupportedModelError
from .methods.base import Method
from .methods.staged import Staged

_ATTACHED: weakref.WeakKeyDictionary[nn.Module, Handle] = weakref.WeakKeyDictionary()


class Handle:
    """A method attached to a model: ``stats()``, ``reset()``, ``remove()``; also a context manager."""

    def __init__(self, model: nn.Module, config: ReductionConfig, method: Any, adapter: Any, undo: list, run: Any) -> None:
        self.model = model
        self.config = config
        self.method = method
        self.adapter = adapter
        self._undo = undo
        self._run = run
        self._modules = adapter.modules_touched()
        self.active = True

    def remove(self) -> None:
        """Detach the method; the model computes exactly what it computed before ``apply``."""
        if not self.active:
            return
        for action in reversed(self._undo):
            action()
        for module in self._modules:
            _ATTACHED.pop(module, None)
        self.active = False

    def reset(self) -> None:
        """Forget per-run state and counters (the next forward starts fresh)."""
        self._run.reset()

    def stats(self) -> dict[str, Any]:
        """What the last forward did (tokens per layer, schedule, ...), as reported by the adapter's run state."""
        return {
            "method": self.config.method,
            "config": self.config.to_dict(),
            "model": type(self.model).__name__,
            "active": self.active,
            **self._run.stats(),
        }

    def surviving_patches(self) -> torch.Tensor | None:
        """[B, P] bool over the original patch grid: which patches' tokens survived the last forward (None if unknown)."""
        report = getattr(self._run, "surviving_patches", None)
        return report() if report is not None else None

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Handle({self.config!r} on {type(self.model).__name__}, active={self.active})"


def apply(model: nn.Module | Any, config: ReductionConfig) -> Handle:
    """Attach the method described by ``config`` to ``model`` (or a diffusers pipeline) in place and return its :class:`Handle`."""
    if not isinstance(model, nn.Module) and not _has_adapter(model):
        raise UnsupportedModelError(
            f"tokenreduce.apply expects a torch.nn.Module (a timm or Hugging Face model) or a diffusers pipeline, got {type(model).__name__}"
        )
    method_cls = registry.method_for(config)
    adapter = registry.adapter_for(model)(model)
    site = method_cls.pick_site(adapter.sites)
    missing = method_cls.requires - adapter.provides
    if missing:
        raise UnsupportedModelError(
            f"{config.method} needs {sorted(missing)} from the model's adapter, which {type(model).__name__}'s adapter does not "
            f"provide; methods for this model: {', '.join(supported(model))}"
        )
    if site is None:
        raise UnsupportedModelError(
            f"{config.method} acts on {sorted(method_cls.sites)} sites but {type(model).__name__} offers {sorted(adapter.sites)}; "
            f"methods for this model: {', '.join(supported(model))}"
        )
    adapter.site = site  # what the adapter touches may depend on the site (Qwen-VL: the merger or the language model)
    busy = [m for m in adapter.modules_touched() if m in _ATTACHED]
    if busy:
        raise AlreadyAppliedError(
            f"{type(model).__name__} already has {_ATTACHED[busy[0]].config.method!r} attached; "
            "call handle.remove() (or tokenreduce.remove(model)) before applying another method"
        )
    method = _bind(method_cls, config, adapter, site)
    undo, run = attach_stages(adapter, method) if isinstance(method, Staged) else adapter.attach(method)
    adapter.site = site  # binding a staged method moved it from stage to stage
    handle = Handle(model, config, method, adapter, undo, run)
    for module in handle._modules:
        _ATTACHED[module] = handle
    return handle


def _bind(method_cls: type[Method], config: ReductionConfig, adapter: Any, site: str, downstream: bool = False) -> Method:
    """The method built from the adapter's facts at ``site``; a staged method binds each stage at its own site.

    Nothing is attached yet: every config error surfaces before the model is touched.
    A ``downstream`` stage receives what an earlier stage left, so its reducible count
    is not the adapter's: it is left to each input (``reducible_tokens=None``), where
    the stage's budget is solved against the tokens that actually arrive.
    """
    if issubclass(method_cls, Staged):
        return method_cls.bind(config, adapter.sites, lambda stage, stage_config, at, later: _bind(stage, stage_config, adapter, at, later))
    adapter.site = site
    positions = getattr(config, "positions", "original")
    if positions not in adapter.position_modes:
        raise ConfigError(
            f"{type(config).__name__}: positions={positions!r} does not apply to {type(adapter.model).__name__}; "
            f"accepted here: {', '.join(sorted(adapter.position_modes))}"
        )
    facts = adapter.describe()
    if downstream:
        facts["reducible_tokens"] = None
    return method_cls(config, facts)


def remove(model: nn.Module | Any) -> int:
    """Remove every tokenreduce method attached to ``model`` (or a pipeline's components) or its submodules; returns how many."""
    handles = {id(h): h for m in _modules(model) if (h := _ATTACHED.get(m)) is not None}
    for handle in handles.values():
        handle.remove()
    return len(handles)


def _has_adapter(obj: Any) -> bool:
    try:
        registry.adapter_for(obj)
    except UnsupportedModelError:
        return False
    return True


def _modules(model: Any) -> list[nn.Module]:
    """Every module of a model, or of every module component of a pipeline (``pipe.components``)."""
    if isinstance(model, nn.Module):
        return list(model.modules())
    components = getattr(model, "components", {})
    return [m for c in components.values() if isinstance(c, nn.Module) for m in c.modules()]


def list_methods() -> list[str]:
    """Names of every registered method."""
    return registry.method_names()


def supported(model: nn.Module) -> list[str]:
    """Names of the methods that can be applied to ``model`` (empty if no adapter knows it)."""
    try:
        adapter_cls = registry.adapter_for(model)
    except UnsupportedModelError:
        return []
    return [cfg.method for cfg in registry.method_configs() if _fits(registry.method_for_class(cfg), adapter_cls)]


def _fits(method_cls: type, adapter_cls: type) -> bool:
    """The adapter offers a site for the method (for every stage of a staged one) and provides what the method requires."""
    return method_cls.pick_site(adapter_cls.sites) is not None and method_cls.requires <= adapter_cls.provides


__all__ = ["ConfigError", "Handle", "apply", "list_methods", "remove", "supported"]
