"""The benchmark harness: every method against the unreduced model, in one run.

For each candidate config it measures, on the same inputs and in the same
process: tokens kept, FLOPs per image (FlopCounterMode, CPU SDPA counted), latency
(A/B interleaved with the unreduced model, medians), peak memory, and quality
against the unreduced model (top-1 agreement, KL) and, where labels exist,
accuracy. Candidates are structural copies of the model that share its weights,
so interleaving many methods costs no extra parameter memory.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import api, registry
from .config import ReductionConfig
from .errors import ConfigError
from .measure import count_flops, kl_divergence, peak_memory, speedup, time_interleaved, top1_agreement
from .measure import accuracy as label_accuracy
from .methods.staged import StagedConfig


@dataclass
class Target:
    """A model to benchmark with its evaluation inputs (labels where the task has them).

    ``logits(model, inputs)`` runs the task; ``pixels(inputs)`` gives the images of
    some inputs (what ``tokenreduce viz`` draws).
    """

    name: str
    model: nn.Module
    inputs: Any  # a tensor of images, or anything with len(), slicing and split(n) (e.g. Prompts)
    labels: torch.Tensor | None
    logits: Callable[[nn.Module, Any], torch.Tensor]
    groups: list[str] | None = None  # per-sample group (question kind) for per-group accuracy
    pixels: Callable[[Any], torch.Tensor] = lambda inputs: inputs


@dataclass
class Prompts:
    """Question-answer prompts of a zoo VLM, batched on demand (left padding, generation prompts)."""

    examples: list[Any]
    tokenizer: Any

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: slice) -> Prompts:
        return Prompts(self.examples[index], self.tokenizer)

    def split(self, size: int) -> list[Prompts]:
        return [self[i : i + size] for i in range(0, len(self), size)]

    def batch(self) -> dict[str, torch.Tensor]:
        from .zoo.vlm_data import make_batch

        return make_batch(self.tokenizer, self.examples, for_generation=True)


def _answer_logits(model: nn.Module, prompts: Prompts) -> torch.Tensor:
    """Next-token logits at the end of each prompt: the greedy answer is their argmax."""
    return model(**prompts.batch()).logits[:, -1]


@dataclass
class Row:
    """One line of the results table."""

    method: str
    config: dict[str, Any] | None
    tokens_in: int
    tokens_out: int
    equivalent_tokens: float  # visual (or patch) tokens averaged over the LLM's layers (METHODS.md E4); tokens_out before it
    gflops: float
    ideal_speedup: float
    latency_ms: float
    speedup: float
    efficiency: float  # measured speedup / ideal speedup
    peak_mb: float
    accuracy: float | None
    agreement: float
    kl: float
    accuracy_by_group: dict[str, float] | None = None


def load_target(spec: str, *, samples: int = 256, pretrained: bool = False, dtype: torch.dtype = torch.float32) -> Target:
    """Resolve ``zoo:NAME``, ``timm:NAME`` (or a bare timm model name) or a Hub id / local path."""
    if spec.startswith("zoo:"):
        from . import zoo

        name = spec[4:]
        if name == "digits-vlm":
            return _vlm_target(spec, samples, dtype)
        model = zoo.load_model(name, dtype=dtype)
        inputs, labels = zoo.load_eval_data(name, "test")
        return Target(spec, model, inputs[:samples].to(dtype), labels[:samples], _hf_logits)
    import timm

    name = spec.removeprefix("timm:")
    if spec.startswith("timm:") or (not Path(spec).exists() and timm.is_model(name)):
        model = timm.create_model(name, pretrained=pretrained).eval().to(dtype)
        size = model.default_cfg.get("input_size", (3, 224, 224))
        return Target(spec, model, _random_images(samples, size, dtype), None, _timm_logits)
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    config = AutoConfig.from_pretrained(spec)
    try:
        model = AutoModelForImageClassification.from_pretrained(spec, dtype=dtype)
    except ValueError:
        model = AutoModel.from_pretrained(spec, dtype=dtype)
    vision = getattr(config, "vision_config", config)
    size = (vision.num_channels, vision.image_size, vision.image_size)
    return Target(spec, model.eval(), _random_images(samples, size, dtype), None, _hf_logits)


def _vlm_target(spec: str, samples: int, dtype: torch.dtype) -> Target:
    from . import zoo
    from .zoo.vlm_data import KINDS, eval_set

    model = zoo.load_model("digits-vlm", dtype=dtype)
    tokenizer = zoo.load_tokenizer("digits-vlm")
    examples = eval_set(n_per_kind=max(1, samples // len(KINDS)))
    answers = torch.tensor([tokenizer.convert_tokens_to_ids(ex.turns[0].answer) for ex in examples])
    kinds = [ex.turns[0].kind for ex in examples]
    return Target(spec, model, Prompts(examples, tokenizer), answers, _answer_logits, kinds, lambda p: p.batch()["pixel_values"])


def _random_images(count: int, size: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(count, *size, generator=torch.Generator().manual_seed(0)).to(dtype)


def _hf_logits(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=pixels)
    return out.logits if getattr(out, "logits", None) is not None else out.pooler_output


def _timm_logits(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixels)


def shared_copy(model: nn.Module) -> nn.Module:
    """A structural copy that shares parameters and buffers with ``model`` (no weight memory)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def run(
    target: Target,
    configs: Iterable[ReductionConfig],
    *,
    batch_size: int = 64,
    warmup: int = 2,
    repeats: int = 5,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    skipped: list[str] | None = None,
) -> list[Row]:
    """Benchmark the unreduced model and every config; returns the base row first.

    A config this model cannot satisfy (a budget out of reach for its depth, say)
    is left out with its error message appended to ``skipped``, so one impossible
    point does not stop a sweep; with ``skipped=None`` the error is raised.
    """
    models, handles = [target.model], []
    try:
        for config in configs:
            copy_ = shared_copy(target.model)
            try:
                handles.append(api.apply(copy_, config))
            except ConfigError as error:
                if skipped is None:
                    raise
                skipped.append(str(error))
                continue
            models.append(copy_)
        with torch.inference_mode():
            return _measure(target, models, handles, batch_size, warmup, repeats, progress)
    finally:
        for handle in handles:
            handle.remove()


def _measure(target, models, handles, batch_size, warmup, repeats, progress) -> list[Row]:
    batch = target.inputs[:batch_size]
    logits = [torch.cat([target.logits(m, chunk) for chunk in target.inputs.split(batch_size)]) for m in progress(models)]
    flops, tokens, equivalent = [], [], []
    for model, handle in zip(models, [None, *handles]):
        flops.append(count_flops(lambda m=model: target.logits(m, batch[:1])).total)
        stats = handle.stats() if handle else None
        tokens.append(_token_counts(stats) if stats else None)
        equivalent.append(stats.get("equivalent_tokens") if stats else None)
    timings = time_interleaved({str(i): (lambda m=m: target.logits(m, batch)) for i, m in enumerate(models)}, warmup, repeats)
    memory = [peak_memory(lambda m=m: target.logits(m, batch)).delta_bytes for m in models]
    base_tokens = tokens[1] if len(tokens) > 1 else None
    rows = []
    for i, handle in enumerate([None, *handles]):
        tokens_in, tokens_out = tokens[i] or ((base_tokens[0],) * 2 if base_tokens else (0, 0))
        ideal = flops[0] / flops[i]
        measured = speedup(timings["0"], timings[str(i)])
        rows.append(Row(
            method=handle.config.method if handle else "base",
            config=handle.config.to_dict() if handle else None,
            tokens_in=tokens_in, tokens_out=tokens_out, gflops=flops[i] / 1e9, ideal_speedup=ideal,
            equivalent_tokens=float(tokens_out if equivalent[i] is None else equivalent[i]),
            latency_ms=timings[str(i)].median * 1e3, speedup=measured, efficiency=measured / ideal,
            peak_mb=memory[i] / 2**20,
            accuracy=label_accuracy(logits[i], target.labels) if target.labels is not None else None,
            agreement=top1_agreement(logits[0], logits[i]), kl=kl_divergence(logits[0], logits[i]),
            accuracy_by_group=_group_accuracy(logits[i], target) if target.groups else None,
        ))
    return rows


def _token_counts(stats: dict[str, Any]) -> tuple[int, int]:
    """(tokens in, tokens out) per image: ViT stats count the sequence, VLM stats the visual tokens."""
    if "visual_tokens_in" in stats:
        return stats["visual_tokens_in"], stats["visual_tokens_out"][0] if stats["visual_tokens_out"] else 0
    return stats["tokens_in"], stats["tokens_out"]


def _group_accuracy(logits: torch.Tensor, target: Target) -> dict[str, float]:
    groups = {}
    for group in dict.fromkeys(target.groups):
        rows = torch.tensor([g == group for g in target.groups])
        groups[group] = label_accuracy(logits[rows], target.labels[rows])
    return groups


def takes_budget(method: str) -> bool:
    """Whether a method's strength is one ``keep`` / ``ratio`` budget; a staged method (FiCoCo-VL) takes per-stage settings."""
    return not issubclass(registry.config_class(method), StagedConfig)


def sweep_configs(
    methods: list[str], keeps: list[int], ratios: list[float], extra: dict[str, Any], equivalent: list[int] = (),
) -> list[ReductionConfig]:
    """Every method x every budget, with the extra fields.

    ``equivalent`` budgets are equivalent tokens (METHODS.md E4), so that pre-LLM and
    in-LLM methods compare at one budget: an in-LLM config gets
    ``equivalent_tokens=T``, any other ``keep=T`` (every LLM layer sees its T tokens);
    a staged method (FiCoCo-VL) gives it to its last stage. An ``extra`` key
    ``"method.field"`` applies to that method only (``fastv.layer=1``), and
    ``"method.stage.field"`` to one stage (``ficoco_vl.vision.keep=160``).
    """
    staged = [m for m in methods if not takes_budget(m)]
    if (keeps or ratios) and staged:
        raise ConfigError(
            f"{', '.join(staged)} take(s) no single keep / ratio budget: each stage has its own settings "
            "(--set METHOD.STAGE.FIELD=VALUE, e.g. ficoco_vl.vision.keep=160), and --equivalent-tokens goes to the last stage"
        )
    strangers = sorted({key.split(".", 1)[0] for key in extra if "." in key} - set(methods))
    if strangers:
        raise ConfigError(f"--set names {', '.join(strangers)}, which this run does not measure (methods: {', '.join(methods)})")
    configs = []
    for method in methods:
        own = {key: value for key, value in extra.items() if "." not in key}
        own.update({key.split(".", 1)[1]: value for key, value in extra.items() if key.split(".", 1)[0] == method and "." in key})
        budgets = [{"keep": k} for k in keeps] + [{"ratio": r} for r in ratios] + [{"equivalent_tokens": t} for t in equivalent]
        configs += [_config(registry.config_class(method), budget, own) for budget in budgets or [{}]]
    return configs


def _config(config_class: type[ReductionConfig], budget: dict[str, Any], settings: dict[str, Any]) -> ReductionConfig:
    """``config_class`` with ``settings``; an equivalent-token budget becomes ``keep`` where the config has no such field.

    A staged config builds each stage from the ``"stage.field"`` settings and hands the budget to its last stage.
    """
    if issubclass(config_class, StagedConfig):
        hints = typing.get_type_hints(config_class)
        names = [f.name for f in fields(config_class)]
        unknown = sorted(key for key in settings if key.split(".", 1)[0] not in names or "." not in key)
        if unknown:
            raise ConfigError(
                f"{config_class.__name__} takes its settings per stage ({', '.join(names)}): --set METHOD.STAGE.FIELD=VALUE; "
                f"got {', '.join(unknown)}"
            )
        stages = {}
        for name in names:
            mine = {key.split(".", 1)[1]: value for key, value in settings.items() if key.startswith(name + ".")}
            if mine or (budget and name == names[-1]):
                stages[name] = _config(hints[name], budget if name == names[-1] else {}, mine)
        return config_class(**stages)
    if "equivalent_tokens" in budget and "equivalent_tokens" not in {f.name for f in fields(config_class)}:
        budget = {"keep": budget["equivalent_tokens"]}
    return config_class(**budget, **settings)


def rows_to_json(target: Target, rows: list[Row], skipped: list[str] | None = None) -> dict[str, Any]:
    return {"model": target.name, "samples": len(target.inputs), "rows": [asdict(r) for r in rows], "skipped": skipped or []}


def format_table(rows: list[Row], markdown: bool = False) -> str:
    """The results as a fixed-width text table, or as Markdown."""
    in_llm = any(r.equivalent_tokens != r.tokens_out for r in rows)  # a T_eq column only where it differs from "tokens"
    head = ["method", "budget", "tokens", *(["T_eq"] if in_llm else []), "GFLOPs", "ideal x", "measured x", "meas/ideal", "latency ms", "peak MB", "acc %", "agree %", "KL"]
    groups = list(rows[0].accuracy_by_group or {})
    head += [f"{g} %" for g in groups]
    lines = [head]
    for r in rows:
        budget = _budget_label(r.config)
        acc = f"{100 * r.accuracy:.1f}" if r.accuracy is not None else "-"
        lines.append([
            r.method, budget, f"{r.tokens_in}->{r.tokens_out}", *([f"{r.equivalent_tokens:.1f}"] if in_llm else []), f"{r.gflops:.4f}", f"{r.ideal_speedup:.2f}",
            f"{r.speedup:.2f}", f"{r.efficiency:.2f}", f"{r.latency_ms:.2f}", f"{r.peak_mb:.1f}", acc,
            f"{100 * r.agreement:.1f}", f"{r.kl:.4f}", *(f"{100 * r.accuracy_by_group[g]:.1f}" for g in groups),
        ])
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|---" * len(head) + "|"] + ["| " + " | ".join(line) + " |" for line in lines[1:]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))) for line in lines)


BUDGET_KEYS = ("keep", "ratio", "equivalent_tokens", "tflops", "r", "keep_rate", "schedule")
"""A config's strength fields, in the order a table names them (the first one set is the budget)."""


def _budget(config: dict[str, Any]) -> tuple[str, Any] | None:
    """(field, value) of a single-stage config's budget, or None when it runs on its defaults."""
    return next(((key, config[key]) for key in BUDGET_KEYS if config.get(key) is not None), None)


def _stages(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A staged method's stage configs by name (empty for a single-stage config)."""
    return {name: value for name, value in config.items() if isinstance(value, dict)}


def _budget_label(config: dict[str, Any] | None) -> str:
    if not config:
        return "-"
    stages = _stages(config)
    if stages:
        return " ".join(f"{name}:{_budget_label(stage)}" for name, stage in stages.items())
    budget = _budget(config)
    return "default" if budget is None else f"{budget[0]}={budget[1]}"


def compare_table(results: list[tuple[str, dict[str, Any]]]) -> str:
    """One Markdown table from several ``bench --out`` results of one model: accuracy % (GFLOPs) by method and budget.

    ``results``: (name, JSON) pairs. A column is a requested budget; ``keep=T`` of a
    pre-LLM method and ``equivalent_tokens=T`` of an in-LLM one (a staged method's
    last stage) share the column "T_eq T", since every LLM layer of the former sees
    its T tokens (METHODS.md E4). A method measured at one budget in two results is
    told apart by the result's name. Without labels, agreement with the unreduced
    model stands in for accuracy.
    """
    models = {data["model"] for _, data in results}
    if len(models) != 1:
        raise ValueError(f"tokenreduce compare: the results come from different models {sorted(models)}; compare runs of one model")
    base, cells, labels, columns = None, {}, [], []
    for name, data in results:
        for row in data["rows"]:
            if row["method"] == "base":
                base = base or row
                continue
            column, label = _budget_column(row["config"]), row["method"]
            if (label, column) in cells:
                label = f"{label} ({name})"
            labels += [label] if label not in labels else []
            columns += [column] if column not in columns else []
            cells[label, column] = _score(row)
    columns.sort(key=_column_order)
    names = [title if value is None else f"{title} {value}" for title, value in columns]
    head = f"| method | {' | '.join(names)} |\n|---{'|---' * len(columns)}|\n"
    first = f"| base ({base['tokens_out']} tokens) | {' | '.join([_score(base)] * len(columns))} |\n" if base else ""
    return head + first + "".join(f"| {label} | {' | '.join(cells.get((label, c), '-') for c in columns)} |\n" for label in labels)


def _budget_column(config: dict[str, Any]) -> tuple[str, Any]:
    """The column of a row: ("T_eq", T) for keep=T and equivalent_tokens=T, else (field, value), ("default", None)."""
    stages = list(_stages(config).values())
    budget = _budget(stages[-1] if stages else config)
    if budget is None:
        return "default", None
    key, value = budget
    value = tuple(value) if isinstance(value, list) else value  # a schedule, read back from JSON
    return ("T_eq", value) if key in ("keep", "equivalent_tokens") else (key, value)


def _column_order(column: tuple[str, Any]) -> tuple:
    """T_eq columns first, largest first; then other budgets by field and value; defaults last."""
    title, value = column
    number = -float(value) if isinstance(value, (int, float)) else 0.0
    return (title != "T_eq", title == "default", title, number, str(value))


def _score(row: dict[str, Any]) -> str:
    value = row["accuracy"] if row["accuracy"] is not None else row["agreement"]
    return f"{100 * value:.1f} ({row['gflops']:.3f})"


def plot_pareto(rows: list[Row], path: str | Path, title: str) -> None:
    """Accuracy (or agreement without labels) against GFLOPs, one series per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_accuracy = rows[0].accuracy is not None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r.method for r in rows):
        points = sorted((r.gflops, 100 * (r.accuracy if use_accuracy else r.agreement)) for r in rows if r.method == method)
        style = dict(marker="*", markersize=14, linestyle="none", color="black") if method == "base" else dict(marker="o")
        ax.plot(*zip(*points), label=method, **style)
    ax.set_xlabel("GFLOPs per image (2 x MACs)")
    ax.set_ylabel("accuracy (%)" if use_accuracy else "top-1 agreement with the unreduced model (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
