"""Adapters for diffusers diffusion transformers: DiT, PixArt-alpha/Sigma, Flux, SD3 (and their pipelines).

Everything model-specific is in two declarative tables:

* :data:`BLOCKS`, per block class: its cacheable units (module path, kind,
  token stream), where q / k of its attentions are read (:class:`QKSpec`), how
  its streams go in and out, its timestep-modulated input (TeaCache), and, for
  Flux single-stream blocks only, an adapter-owned forward;
* :data:`TRANSFORMERS`, per transformer class: family, block lists in call
  order, how the image token grid is read from the call.

How methods attach, least invasive first (DESIGN.md sec. 4.1):

* a forward pre-hook with kwargs on the transformer reads ``timestep`` and
  drives the run state (:mod:`tokenreduce.diffusion.state`);
* unit-level methods replace the *instance* ``forward`` of each unit module
  (``attn1``, ``attn2``, ``ff``, ``attn``, ``ff_context``): the block's own code
  still computes norms and modulation and applies the current gate to whatever
  the unit returns, which is how cached outputs get the current step's adaLN
  gate (METHODS.md D0). Attention processors are never replaced, so SDPA (or
  any backend the user set) stays on;
* q / k for token scores are read by forward hooks on the projection or qk-norm
  modules, only while a method arms the probe;
* the Flux single-stream block computes its MLP and output projection on the
  concatenation of attention and MLP activations, so recomputing a subset of
  rows needs a seam inside the block: the adapter owns that block forward
  (:func:`_flux_single_forward`), proven equal to the real one bit for bit by
  the zero-strength contract test;
* block-level methods replace each block's instance ``forward``.

``remove()`` deletes every instance attribute and removes every hook.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import nn

from .. import registry
from ..diffusion.method import BlockCall, BlockInfo, DiffusionMethod, UnitCall, UnitSpec
from ..diffusion.state import DiffusionRun
from ..errors import UnsupportedModelError
from ..merge_slot import replace_forward
from ..ops.merge import gather_tokens
from ..registry import lookup_by_class, register_adapter
from .base import Adapter, Undo


@dataclass(frozen=True)
class QKSpec:
    """Where the per-head q and k of one attention are read.

    segments: in the order the attention processor concatenates them, (stream,
    (q norm, q projection), (k norm, k projection)); the qk-norm output is used
    when the module exists (it follows the projection), else the projection's.
    norm_layout: the layout of qk-norm outputs, ``"bhnd"`` (diffusers
    ``Attention`` / SD3 joint processors transpose before the norm) or ``"bnhd"``
    (Flux). rope: apply the call's ``image_rotary_emb`` (Flux) to the joint q / k.
    """

    segments: tuple[tuple[str, tuple[str, str], tuple[str, str]], ...]
    norm_layout: str
    rope: bool = False


ATTENTION_QK = QKSpec(segments=(("img", ("norm_q", "to_q"), ("norm_k", "to_k")),), norm_layout="bhnd")
SD3_JOINT_QK = QKSpec(
    segments=(("img", ("norm_q", "to_q"), ("norm_k", "to_k")), ("txt", ("norm_added_q", "add_q_proj"), ("norm_added_k", "add_k_proj"))),
    norm_layout="bhnd",
)
FLUX_JOINT_QK = QKSpec(
    segments=(("txt", ("norm_added_q", "add_q_proj"), ("norm_added_k", "add_k_proj")), ("img", ("norm_q", "to_q"), ("norm_k", "to_k"))),
    norm_layout="bnhd", rope=True,
)
FLUX_SINGLE_QK = QKSpec(segments=(("joint", ("norm_q", "to_q"), ("norm_k", "to_k")),), norm_layout="bnhd", rope=True)


class AttentionProbe:
    """Captures q and k of one attention module while armed; :meth:`qk` returns them per head, [B, H, N, d].

    The attention itself runs unchanged; this only keeps references to tensors
    it computes anyway, so a probe costs nothing when not armed.
    """

    def __init__(self, attention: nn.Module, spec: QKSpec) -> None:
        self.heads = attention.heads
        self.spec = spec
        self.modules: dict[tuple[str, str], tuple[nn.Module, bool]] = {}
        for stream, q_names, k_names in spec.segments:
            for role, (norm_name, proj_name) in (("q", q_names), ("k", k_names)):
                norm = getattr(attention, norm_name, None)
                self.modules[(stream, role)] = (norm, True) if isinstance(norm, nn.Module) else (attention.get_submodule(proj_name), False)
        self.captured: dict[tuple[str, str], torch.Tensor] = {}
        self.armed = False

    def install(self) -> list[Undo]:
        undo = []
        for key, (module, _) in self.modules.items():
            undo.append(module.register_forward_hook(self._keep(key)).remove)
        return undo

    def _keep(self, key: tuple[str, str]) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            if self.armed:
                self.captured[key] = output

        return hook

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Arm the hooks for the duration of one attention call."""
        self.captured.clear()
        self.armed = True
        try:
            yield
        finally:
            self.armed = False

    def qk(self, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, slice]]:
        """(q, k, key_segments): per-head q / k in the processor's order and where each stream's keys are."""
        q_parts, k_parts, segments, start = [], [], {}, 0
        for stream, _, _ in self.spec.segments:
            if (stream, "q") not in self.captured:
                continue  # e.g. SD3's last block attends without text queries
            q_parts.append(self._bnhd(stream, "q"))
            k = self._bnhd(stream, "k")
            k_parts.append(k)
            segments[stream] = slice(start, start + k.shape[1])
            start += k.shape[1]
        q, k = torch.cat(q_parts, dim=1), torch.cat(k_parts, dim=1)
        if self.spec.rope and kwargs.get("image_rotary_emb") is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            q = apply_rotary_emb(q, kwargs["image_rotary_emb"], sequence_dim=1)
            k = apply_rotary_emb(k, kwargs["image_rotary_emb"], sequence_dim=1)
        return q.transpose(1, 2), k.transpose(1, 2), segments

    def _bnhd(self, stream: str, role: str) -> torch.Tensor:
        value = self.captured[(stream, role)]
        _, is_norm = self.modules[(stream, role)]
        if not is_norm:
            return value.unflatten(-1, (self.heads, -1))
        return value.transpose(1, 2) if self.spec.norm_layout == "bhnd" else value


def _hidden(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _basic_modulated(block: nn.Module, bound: dict[str, Any]) -> torch.Tensor:
    """Input of attn1 in ``BasicTransformerBlock.forward`` (adaLN-Zero or adaLN-single modulation)."""
    x = bound["hidden_states"]
    if block.norm_type == "ada_norm_zero":
        return block.norm1(x, bound["timestep"], bound["class_labels"], hidden_dtype=x.dtype)[0]
    shift, scale = (block.scale_shift_table[None] + bound["timestep"].reshape(x.shape[0], 6, -1)).chunk(6, dim=1)[:2]
    return block.norm1(x) * (1 + scale) + shift


def _zero_modulated(block: nn.Module, bound: dict[str, Any]) -> torch.Tensor:
    """Input of the joint attention in Flux double-stream and SD3 blocks (``norm1(x, emb=temb)``)."""
    return block.norm1(bound["hidden_states"], emb=bound["temb"])[0]


@dataclass(frozen=True)
class BlockSpec:
    """What the adapter knows about one block class.

    units: cacheable unit calls in execution order (missing modules, e.g. DiT's
    ``attn2`` or SD3's last ``ff_context``, are skipped); probes: the QKSpec of
    each attention unit; two_streams: the block takes and returns
    ``(encoder_hidden_states, hidden_states)``; modulated: the first attention's
    modulated input (TeaCache indicator); owned: builds an adapter-owned forward
    (owned_modules: the submodules it runs, for its FLOPs).
    """

    units: tuple[UnitSpec, ...]
    probes: dict[str, QKSpec]
    two_streams: bool
    modulated: Callable[[nn.Module, dict[str, Any]], torch.Tensor] | None = None
    owned: Callable[..., Callable[..., Any]] | None = None
    owned_modules: tuple[str, ...] = ()  # the linears of the owned computation (its FLOPs)
    check: Callable[[nn.Module], str | None] = lambda block: None


def _flux_single_forward(block: nn.Module, mlp_unit: Callable[[torch.Tensor, Callable[[torch.Tensor | None], torch.Tensor]], torch.Tensor]) -> Callable[..., Any]:
    """``FluxSingleTransformerBlock.forward`` with the MLP + output projection as a row-wise unit.

    The real block computes ``proj_out(cat(attn(n), act(proj_mlp(n))))`` for all
    rows; here ``mlp_unit(n, compute)`` decides, and ``compute(rows)`` evaluates
    that expression for the chosen rows only (ToCa recomputes the MLP of fresh
    rows against cached attention rows, METHODS.md D1.8). Same operations in the
    same order as diffusers 0.42, so it is bit-exact at zero strength.
    """

    def forward(
        hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None, joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text_seq_len = encoder_hidden_states.shape[1]
        residual = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        norm_hidden_states, gate = block.norm(residual, emb=temb)
        attn_output = block.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))

        def compute(rows: torch.Tensor | None) -> torch.Tensor:
            attn_rows = attn_output if rows is None else gather_tokens(attn_output, rows)
            norm_rows = norm_hidden_states if rows is None else gather_tokens(norm_hidden_states, rows)
            return block.proj_out(torch.cat([attn_rows, block.act_mlp(block.proj_mlp(norm_rows))], dim=2))

        hidden = residual + gate.unsqueeze(1) * mlp_unit(norm_hidden_states, compute)
        if hidden.dtype == torch.float16:
            hidden = hidden.clip(-65504, 65504)
        return hidden[:, :text_seq_len], hidden[:, text_seq_len:]

    return forward


def _basic_check(block: nn.Module) -> str | None:
    if block.norm_type not in ("ada_norm_zero", "ada_norm_single"):
        return f"BasicTransformerBlock with norm_type={block.norm_type!r} (supported: 'ada_norm_zero' as in DiT, 'ada_norm_single' as in PixArt)"
    return None


BLOCKS: dict[str, BlockSpec] = {
    "BasicTransformerBlock": BlockSpec(
        units=(UnitSpec("attn", "attn1", "self", "img"), UnitSpec("cross", "attn2", "cross", "img"), UnitSpec("mlp", "ff", "mlp", "img")),
        probes={"attn": ATTENTION_QK, "cross": ATTENTION_QK}, two_streams=False, modulated=_basic_modulated, check=_basic_check,
    ),
    "FluxTransformerBlock": BlockSpec(
        units=(UnitSpec("attn", "attn", "joint", "joint"), UnitSpec("mlp", "ff", "mlp", "img"), UnitSpec("mlp_txt", "ff_context", "mlp", "txt")),
        probes={"attn": FLUX_JOINT_QK}, two_streams=True, modulated=_zero_modulated,
    ),
    "FluxSingleTransformerBlock": BlockSpec(
        units=(UnitSpec("attn", "attn", "joint", "joint"), UnitSpec("mlp", "", "mlp", "joint")),
        probes={"attn": FLUX_SINGLE_QK}, two_streams=True, owned=_flux_single_forward, owned_modules=("proj_mlp", "proj_out"),
    ),
    "JointTransformerBlock": BlockSpec(
        units=(
            UnitSpec("attn", "attn", "joint", "joint"), UnitSpec("attn2", "attn2", "self", "img"),
            UnitSpec("mlp", "ff", "mlp", "img"), UnitSpec("mlp_txt", "ff_context", "mlp", "txt"),
        ),
        probes={"attn": SD3_JOINT_QK, "attn2": ATTENTION_QK}, two_streams=True, modulated=_zero_modulated,
    ),
}


@dataclass(frozen=True)
class UnitCost:
    """Analytic FLOPs (2 x MACs, METHODS.md E2) of one unit, from the unit's own linear layers.

    ``query`` / ``key`` / ``text``: the summed ``in x out`` weights of the linears
    applied to the query rows (``to_q``, ``to_out``, every MLP linear), to the key
    rows (``to_k``, ``to_v``: the image rows of a self-attention, the text of a
    cross-attention) and to the separate text rows of a joint attention
    (``add_*_proj``, ``to_add_out``); ``width``: q / v width of the attention products.
    Like :func:`tokenreduce.measure.count_flops`, norms, softmax, activations and the
    per-sample adaLN modulation are not counted, so given the rows a call really
    computed the sum equals what ``FlopCounterMode`` counts in the unit.
    """

    query: int
    key: int
    text: int
    width: int

    @classmethod
    def of(cls, modules: list[nn.Module], kind: str) -> UnitCost:
        weights = {"query": 0, "key": 0, "text": 0}
        width = 0
        for module in modules:
            for name, linear in module.named_modules():
                if not isinstance(linear, nn.Linear):
                    continue
                head = name.split(".")[0]
                role = "key" if head in ("to_k", "to_v") else "text" if head.startswith("add_") or head == "to_add_out" else "query"
                weights[role] += linear.in_features * linear.out_features
                if kind != "mlp" and head == "to_q":
                    width = linear.out_features
        return cls(width=width, **weights)

    def flops(self, unit: UnitSpec, batch: int, rows: int, text: int) -> int:
        """FLOPs of one call on ``rows`` image (or joint) rows with ``text`` text tokens in its keys.

        self: keys are the rows themselves; cross: keys are the ``text`` tokens;
        joint: the text rows join the sequence (their own projections when the
        attention has them, Flux double / SD3, else they are already in ``rows``).
        ``Q K^T`` and ``A V`` cost ``2 Lq Lk width`` each (:func:`tokenreduce.measure.flops`'s SDPA formula).
        """
        if unit.kind == "mlp":
            return 2 * batch * self.query * rows
        if unit.kind == "cross":
            queries, keys, key_rows, extra = rows, text, text, 0
        else:
            extra = text if unit.kind == "joint" and self.text else 0
            queries = keys = rows + extra
            key_rows = rows
        linear = self.query * rows + self.key * key_rows + self.text * extra
        return 2 * batch * linear + 4 * batch * queries * keys * self.width


def _text_tokens(kwargs: dict[str, Any]) -> int:
    text = kwargs.get("encoder_hidden_states")
    return 0 if text is None else text.shape[1]


def _patch_grid(model: nn.Module, bound: dict[str, Any]) -> tuple[int, int]:
    """DiT / PixArt / SD3: latents [B, C, H, W] cut into p x p patches."""
    height, width = bound["hidden_states"].shape[-2:]
    patch = model.config.patch_size
    return height // patch, width // patch


def _flux_grid(_model: nn.Module, bound: dict[str, Any]) -> tuple[int, int]:
    """Flux: packed latents [B, N, C]; the grid is in ``img_ids`` (row, column in channels 1, 2)."""
    ids = bound["img_ids"]
    ids = ids[0] if ids.dim() == 3 else ids
    rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    return (rows, cols) if rows * cols == ids.shape[0] else (ids.shape[0], 1)


@dataclass(frozen=True)
class TransformerSpec:
    family: str
    groups: tuple[tuple[str, str], ...]  # (group name, block list attribute), in call order
    grid: Callable[[nn.Module, dict[str, Any]], tuple[int, int]]


_D = "diffusers.models.transformers"
TRANSFORMERS: dict[str, TransformerSpec] = {
    f"{_D}.dit_transformer_2d.DiTTransformer2DModel": TransformerSpec("dit", (("blocks", "transformer_blocks"),), _patch_grid),
    f"{_D}.pixart_transformer_2d.PixArtTransformer2DModel": TransformerSpec("pixart", (("blocks", "transformer_blocks"),), _patch_grid),
    f"{_D}.transformer_flux.FluxTransformer2DModel": TransformerSpec(
        "flux", (("double", "transformer_blocks"), ("single", "single_transformer_blocks")), _flux_grid
    ),
    f"{_D}.transformer_sd3.SD3Transformer2DModel": TransformerSpec("sd3", (("blocks", "transformer_blocks"),), _patch_grid),
}


@cache
def _signature(forward: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(forward)


def _bind(function: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = _signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


class DitAdapter(Adapter):
    """Caching methods on a diffusers diffusion transformer, bare or inside its pipeline.

    To support another transformer whose blocks are in :data:`BLOCKS`, add a
    :data:`TRANSFORMERS` entry and register it:
    ``TRANSFORMERS[path] = TransformerSpec(...)``; ``register_adapter(path)(DitAdapter)``.
    """

    sites = frozenset({"dit"})

    def __init__(self, model: nn.Module, scheduler: Callable[[], Any] | None = None) -> None:
        super().__init__(model)
        self.scheduler = scheduler  # reads the pipeline's current scheduler (users swap schedulers after loading)
        self.spec = lookup_by_class(TRANSFORMERS, model)
        if self.spec is None:
            raise UnsupportedModelError(f"no diffusion-transformer layout for {type(model).__name__}; supported: {_supported()}")
        self.layout: list[tuple[BlockInfo, nn.Module, BlockSpec]] = []
        groups = [(name, list(model.get_submodule(attr))) for name, attr in self.spec.groups]
        total = sum(len(blocks) for _, blocks in groups)
        for group, blocks in groups:
            for index, block in enumerate(blocks):
                spec = BLOCKS.get(type(block).__name__)
                problem = f"a {type(block).__name__}" if spec is None else spec.check(block)
                if problem:
                    raise UnsupportedModelError(
                        f"{type(model).__name__}: {group} block {index} is {problem}; supported blocks: {', '.join(BLOCKS)}"
                    )
                info = BlockInfo(layer=len(self.layout), group=group, index=index, group_size=len(blocks), num_layers=total)
                self.layout.append((info, block, spec))
        if total < 2:
            raise UnsupportedModelError(f"{type(model).__name__} has {total} transformer blocks; caching needs at least 2")

    def units(self, block: nn.Module, spec: BlockSpec) -> list[tuple[UnitSpec, nn.Module | None]]:
        """The unit specs present in this block instance, with their modules (None for owned computations)."""
        present = []
        for unit in spec.units:
            module = getattr(block, unit.path, None) if unit.path else None
            if module is not None or (not unit.path and spec.owned is not None):
                present.append((unit, module))
        return present

    def modules_touched(self) -> list[nn.Module]:
        return [self.model] + [block for _, block, _ in self.layout]

    def scheduler_steps(self) -> int | None:
        """The step count the pipeline's scheduler is set to (None before ``set_timesteps`` or without a pipeline)."""
        scheduler = self.scheduler() if self.scheduler is not None else None
        steps = getattr(scheduler, "num_inference_steps", None)
        timesteps = getattr(scheduler, "timesteps", None)
        return steps if steps is not None else (len(timesteps) if timesteps is not None else None)

    def describe(self) -> dict[str, Any]:
        units = {info.layer: tuple(u for u, _ in self.units(block, spec)) for info, block, spec in self.layout}
        return {
            "family": self.spec.family,
            "model_class": type(self.model).__name__,
            "blocks": [info for info, _, _ in self.layout],
            "units": units,
            "num_layers": len(self.layout),
        }

    def attach(self, method: DiffusionMethod) -> tuple[list[Undo], DiffusionRun]:
        config_steps = getattr(method.config, "num_steps", None)
        steps = self.scheduler_steps() or config_steps
        if steps is not None or self.scheduler is None:  # else: read from the scheduler at each generation
            method.check_steps(steps)
        run = DiffusionRun(num_steps=lambda: self.scheduler_steps() or config_steps, check_steps=method.check_steps)
        undo: list[Undo] = [self.model.register_forward_pre_hook(self._begin(run, method), with_kwargs=True).remove]
        for info, block, spec in self.layout:
            units = [(unit, module, self.unit_cost(block, spec, unit, module)) for unit, module in self.units(block, spec)]
            if method.level == "block":
                costs = [(unit, cost) for unit, _, cost in units]
                undo.append(replace_forward(block, self._block_forward(run, method, info, block, spec, costs)))
                continue
            for unit, module, cost in units:
                if module is None:
                    owned = spec.owned(block, self._owned_unit(run, method, info, unit, cost))
                    undo.append(replace_forward(block, owned))
                    continue
                probe = None
                if unit.name in spec.probes and method.wants_probe(unit):
                    probe = AttentionProbe(module, spec.probes[unit.name])
                    undo.extend(probe.install())
                undo.append(replace_forward(module, self._unit_forward(run, method, info, unit, module, probe, cost)))
        return undo, run

    @staticmethod
    def unit_cost(block: nn.Module, spec: BlockSpec, unit: UnitSpec, module: nn.Module | None) -> UnitCost:
        """The analytic cost of one unit of this block instance (an owned computation: its ``owned_modules``)."""
        modules = [module] if module is not None else [block.get_submodule(name) for name in spec.owned_modules]
        return UnitCost.of(modules, unit.kind)

    def _begin(self, run: DiffusionRun, method: DiffusionMethod) -> Callable[..., None]:
        forward = type(self.model).forward

        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            bound = _bind(forward, (module, *args), kwargs)
            timestep = bound["timestep"]
            value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
            run.begin(value, bound["hidden_states"], self.spec.grid(module, bound), method.shares_cfg_pairs)
            method.begin(run)

        return hook

    @staticmethod
    def _unit_forward(
        run: DiffusionRun, method: DiffusionMethod, info: BlockInfo, unit: UnitSpec, module: nn.Module, probe: AttentionProbe | None, cost: UnitCost
    ) -> Callable[..., Any]:
        original = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            x = _hidden(args, kwargs)
            text = _text_tokens(kwargs)
            run.count("flops_full", cost.flops(unit, x.shape[0], x.shape[1], text))

            def compute_on(rows_input: torch.Tensor) -> Any:
                run.count("flops_computed", cost.flops(unit, x.shape[0], rows_input.shape[1], text))
                if args:
                    return original(rows_input, *args[1:], **kwargs)
                return original(**{**kwargs, "hidden_states": rows_input})

            def compute(rows: torch.Tensor | None) -> Any:
                if rows is not None:
                    return compute_on(gather_tokens(x, rows))
                run.count("flops_computed", cost.flops(unit, x.shape[0], x.shape[1], text))
                return original(*args, **kwargs)

            call = UnitCall(block=info, unit=unit, x=x, compute=compute, compute_on=compute_on, probe=probe, kwargs=kwargs)
            return method.unit(run, call)

        return forward

    @staticmethod
    def _owned_unit(run: DiffusionRun, method: DiffusionMethod, info: BlockInfo, unit: UnitSpec, cost: UnitCost) -> Callable[..., torch.Tensor]:
        def call(x: torch.Tensor, compute: Callable[[torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
            run.count("flops_full", cost.flops(unit, x.shape[0], x.shape[1], 0))

            def counted(rows: torch.Tensor | None) -> torch.Tensor:
                run.count("flops_computed", cost.flops(unit, x.shape[0], x.shape[1] if rows is None else rows.shape[1], 0))
                return compute(rows)

            return method.unit(run, UnitCall(block=info, unit=unit, x=x, compute=counted, compute_on=None, probe=None, kwargs={}))

        return call

    @staticmethod
    def _block_forward(
        run: DiffusionRun, method: DiffusionMethod, info: BlockInfo, block: nn.Module, spec: BlockSpec, costs: list[tuple[UnitSpec, UnitCost]]
    ) -> Callable[..., Any]:
        original = block.forward
        signature_of = type(block).forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            bound = _bind(signature_of, (block, *args), kwargs)
            streams = (bound["hidden_states"], bound["encoder_hidden_states"] if spec.two_streams else None)
            flops = _block_flops(costs, bound["hidden_states"], _text_tokens(bound))
            run.count("flops_full", flops)

            def run_block() -> Any:
                run.count("flops_computed", flops)
                return original(*args, **kwargs)

            call = BlockCall(
                block=info, streams=streams, run=run_block,
                pack=(lambda h, e: (e, h)) if spec.two_streams else (lambda h, e: h),
                unpack=(lambda out: (out[1], out[0])) if spec.two_streams else (lambda out: (out, None)),
                modulated=(lambda: spec.modulated(block, bound)) if spec.modulated is not None else None,
            )
            return method.block(run, call)

        return forward


def _block_flops(costs: list[tuple[UnitSpec, UnitCost]], hidden: torch.Tensor, text: int) -> int:
    """Analytic FLOPs of one whole block call: every unit on all of its stream's rows."""
    batch, n = hidden.shape[:2]
    total = 0
    for unit, cost in costs:
        rows = {"img": n, "txt": text, "joint": n if cost.text else n + text}[unit.stream]
        total += cost.flops(unit, batch, rows, text)
    return total


def _supported() -> str:
    return ", ".join(sorted(p.rsplit(".", 1)[-1] for p in TRANSFORMERS))


register_adapter(*TRANSFORMERS)(DitAdapter)


@register_adapter("diffusers.pipelines.pipeline_utils.DiffusionPipeline")
class PipelineAdapter(Adapter):
    """A diffusers pipeline: the method goes on ``pipe.transformer``; ``pipe.scheduler`` gives the step count per generation."""

    sites = frozenset({"dit"})

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        transformer = getattr(pipe, "transformer", None)
        if not isinstance(transformer, nn.Module):
            raise UnsupportedModelError(
                f"{type(pipe).__name__} has no `transformer` component (UNet pipelines are not supported); "
                f"supported transformers: {_supported()}"
            )
        adapter_cls = registry.adapter_for(transformer)
        if not issubclass(adapter_cls, DitAdapter):
            raise UnsupportedModelError(f"{type(pipe).__name__}.transformer is a {type(transformer).__name__}; supported: {_supported()}")
        self.inner = adapter_cls(transformer, scheduler=lambda: getattr(pipe, "scheduler", None))

    def modules_touched(self) -> list[nn.Module]:
        return self.inner.modules_touched()

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    def attach(self, method: DiffusionMethod) -> tuple[list[Undo], DiffusionRun]:
        return self.inner.attach(method)
