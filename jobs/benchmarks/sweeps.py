"""Benchmark sweeps for ``omnidiff bench``: which training set-ups to time, as data.

A :class:`BenchPoint` is one training set-up (model preset, precision, TP x PP x DP layout, micro
-batch, recomputation, masked head or full logits, the platform's engine or the released
recipe's). It turns into run-config overrides, so a point trains exactly as ``omnidiff train``
would with the same keys. A :class:`Sweep` is a base point and axes; its points are the axes'
cartesian product. The runner lives in ``platform/bench.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from itertools import product
from typing import Any

from omnidiff import ConfigError
from omnidiff.parallel.gpu_stack import missing_gpu_stack

DREAM_TEXT_VOCAB = 151_667  # with the byte tokenizer padded to it: the 176,264-entry vocabulary

# precision -> parallel-section keys. FP8 runs bf16 master weights with TE's FP8 GEMMs.
PRECISIONS: dict[str, dict[str, Any]] = {
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "fp8-delayed": {"precision": "bf16", "fp8": "hybrid", "fp8_recipe": "delayed"},
    "fp8-tensorwise": {"precision": "bf16", "fp8": "hybrid", "fp8_recipe": "tensorwise"},
    "fp8-blockwise": {"precision": "bf16", "fp8": "e4m3", "fp8_recipe": "blockwise"},
    "mxfp8": {"precision": "bf16", "fp8": "e4m3", "fp8_recipe": "mxfp8"},
}
FP8_PRECISIONS = tuple(p for p in PRECISIONS if "fp8" in p)
ENGINES = ("platform", "released")  # released: HF class + full logits + DeepSpeed ZeRO-2


@dataclass(frozen=True)
class BenchPoint:
    """One timed training set-up. ``layout`` is (TP, PP, DP); ``zero_stage`` None picks 0 for
    one process and 1 otherwise; ``transformer_engine`` None picks TE where FP8 is asked or the
    machine can run it (so bf16 and FP8 rows compare the same layer implementation)."""

    preset: str = "small"
    precision: str = "fp32"
    layout: tuple[int, int, int] = (1, 1, 1)
    micro_batch: int = 1
    accumulation: int = 1
    seq_length: int = 2048
    recompute: str = "none"
    masked_head: bool = True
    engine: str = "platform"
    zero_stage: int | None = None
    transformer_engine: bool | None = None
    text_vocab_size: int | None = DREAM_TEXT_VOCAB
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"bench precision {self.precision!r}: one of {', '.join(PRECISIONS)}")
        if self.engine not in ENGINES:
            raise ConfigError(f"bench engine {self.engine!r}: one of {', '.join(ENGINES)}")
        if self.engine == "released" and (self.layout[:2] != (1, 1) or not self.masked_head
                                          or self.recompute != "none"):
            raise ConfigError("the released recipe is data-parallel only (layout 1x1xDP), "
                              "without recomputation or a masked head to switch off")

    @property
    def nprocs(self) -> int:
        tp, pp, dp = self.layout
        return tp * pp * dp

    @property
    def fp8_recipe(self) -> str | None:
        return PRECISIONS[self.precision].get("fp8_recipe")

    @property
    def label(self) -> str:
        tp, pp, dp = self.layout
        parts = [self.engine, self.preset, self.precision, f"tp{tp}pp{pp}dp{dp}",
                 f"mb{self.micro_batch}", f"s{self.seq_length}"]
        if self.recompute != "none":
            parts.append(f"rc-{self.recompute}")
        if not self.masked_head:
            parts.append("full-logits")
        return "/".join(parts)

    def resolved_zero_stage(self) -> int:
        if self.engine == "released":
            return 2  # as released: DeepSpeed ZeRO-2
        if self.zero_stage is not None:
            return self.zero_stage
        return 0 if self.nprocs == 1 else 1

    def config_overrides(self) -> list[str]:
        """``section.key=value`` strings that make this point's run config."""
        tp, pp, dp = self.layout
        parallel = {"tensor_parallel": tp, "pipeline_parallel": pp, "nproc_per_node": self.nprocs,
                    "zero_stage": self.resolved_zero_stage(), "recompute": self.recompute,
                    **PRECISIONS[self.precision]}
        te = self.transformer_engine
        if te is None:
            te = self.fp8_recipe is not None or not missing_gpu_stack()
        parallel["transformer_engine"] = te
        keys = {f"parallel.{k}": v for k, v in parallel.items()}
        keys |= {"model.preset": self.preset, "data.seq_length": self.seq_length,
                 "data.micro_batch_size": self.micro_batch,
                 "data.global_batch_size": self.micro_batch * dp * self.accumulation,
                 "schedule.train_steps": 1000, "logging.progress_bar": False}
        if self.text_vocab_size is not None:
            keys["data.text_vocab_size"] = self.text_vocab_size
        return [f"{k}={_yaml(v)}" for k, v in keys.items()] + list(self.overrides)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BenchPoint:
        values = dict(values)
        values["layout"] = tuple(values["layout"])
        values["overrides"] = tuple(values.get("overrides", ()))
        return cls(**values)


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Sweep:
    """A base point and axes (point field -> values); the points are every combination."""

    description: str
    base: BenchPoint = field(default_factory=BenchPoint)
    axes: dict[str, tuple] = field(default_factory=dict)

    def points(self, **changes: Any) -> list[BenchPoint]:
        """Every combination of the axes on the base point, with ``changes`` applied to all."""
        unknown = set(changes) - {f.name for f in fields(BenchPoint)}
        if unknown:
            raise ConfigError(f"bench: unknown point field(s) {sorted(unknown)}")
        base = replace(self.base, **changes)
        names = list(self.axes)
        return [replace(base, **dict(zip(names, combo)))
                for combo in product(*(self.axes[n] for n in names))]


SWEEPS: dict[str, Sweep] = {
    "precision": Sweep("every precision at TP=1 and TP=2 (FP8 rows need a GPU with TE)",
                       axes={"precision": tuple(PRECISIONS), "layout": ((1, 1, 1), (2, 1, 1))}),
    "fp8": Sweep("bf16 and the four FP8 recipes at TP=1 (GPU with Transformer Engine)",
                 axes={"precision": ("bf16", *FP8_PRECISIONS)}),
    "layout": Sweep("TP / PP / DP layouts of two processes against one",
                    axes={"layout": ((1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2))}),
    "micro-batch": Sweep("micro-batch sizes", BenchPoint(seq_length=1024),
                         axes={"micro_batch": (1, 2, 4)}),
    "recompute": Sweep("activation recomputation", axes={"recompute": ("none", "selective",
                                                                      "full")}),
    "head": Sweep("masked head against the full-logits reference loss",
                  axes={"masked_head": (True, False)}),
    "released-recipe": Sweep("the released recipe (HF class, full logits, DeepSpeed ZeRO-2) "
                             "against the platform, interleaved",
                             axes={"engine": ("released", "platform")}),
}


def sweep_points(name: str, **changes: Any) -> list[BenchPoint]:
    """The points of sweep ``name`` with ``changes`` applied to every point."""
    if name not in SWEEPS:
        raise ConfigError(f"bench: no sweep {name!r} (known: {', '.join(SWEEPS)})")
    return SWEEPS[name].points(**changes)
