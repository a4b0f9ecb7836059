"""The train loop: config -> topology -> data -> model -> engine -> monitoring -> checkpoint.

Readable on purpose (torchtitan style): :meth:`Trainer.run` is the whole loop. Everything that
varies between a laptop and a cluster (process groups, ZeRO, pipeline stages) lives behind the
engine; the loop itself is identical everywhere.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from omnidiff.data.streams.batches import batch_stream, noised_micro_batches
from omnidiff.data.streams.sources import build_sample_source
from omnidiff.data.tokens.noising import NoisedBatch
from omnidiff.data.tokens.tasks import TASKS
from omnidiff.data.tokens.text import build_vocab
from omnidiff.monitoring.flops import micro_batch_flops
from omnidiff.monitoring.metrics import MetricsLogger
from omnidiff.monitoring.peaks import peak_flops
from omnidiff.monitoring.sinks import build_sinks, flatten
from omnidiff.monitoring.system import system_metrics
from omnidiff.monitoring.throughput import ThroughputMeter
from omnidiff.parallel import topology
from omnidiff.parallel.collectives import all_reduce
from omnidiff.parallel.engines import build_engine
from omnidiff.parallel.engines.base import TrainEngine
from omnidiff.platform import checkpoint
from omnidiff.platform.config import RunConfig, dump_config
from omnidiff.platform.objective import DiffusionObjective
from omnidiff.platform.stop import StopRequest

log = logging.getLogger("omnidiff.train")


@dataclass
class TrainSummary:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    seconds: float = 0.0
    checkpoint: str | None = None
    last_step: int = 0
    stopped_by: str | None = None  # the signal that stopped the run early


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.dims = topology.initialize(cfg.parallel.tensor_parallel,
                                        cfg.parallel.pipeline_parallel)
        self.accumulation = self.dims.micro_batches(cfg.data)
        self.output_dir = Path(cfg.output_dir)
        self.vocab, tokenizer = build_vocab(cfg.data)
        self.vocab_size = self.vocab.padded_size(cfg.parallel.tensor_parallel)
        # Resume wins over init_from: a restarted stage continues its own checkpoints.
        self.resume_path = checkpoint.resolve_resume(cfg.checkpoint.resume, self.output_dir)
        self.objective = DiffusionObjective(cfg.diffusion)
        self.engine: TrainEngine = build_engine(cfg, self.dims, self.vocab_size, self.objective,
                                                None if self.resume_path else self._init_weights())
        source = build_sample_source(cfg.data, cfg.seed, self.vocab, tokenizer,
                                     self.dims.dp_rank, self.dims.dp)
        self.batches = batch_stream(source, cfg.data, cfg.diffusion, self.vocab, cfg.seed,
                                    self.dims.dp_rank)
        self.meter = ThroughputMeter(self._peak_flops() * self.dims.world_size)
        self.stop = StopRequest()
        self.held_out = None
        if cfg.evaluation.mixture:  # imported here: sampling and media decoding cost seconds
            from omnidiff.platform.held_out import HeldOutEvaluation

            self.held_out = HeldOutEvaluation(cfg, self.vocab, tokenizer)

    def _micro_batches(self, step: int) -> list[NoisedBatch]:
        """This step's micro-batches, made and measured on the host."""
        batches = noised_micro_batches(self.batches, self.cfg.diffusion, self.vocab,
                                       self.cfg.seed, step, self.accumulation, self.dims.dp_rank)
        self._measure(batches)
        return batches

    def _on_device(self, batches: list[NoisedBatch]) -> list[NoisedBatch]:
        """Copies on this rank's device (asynchronous, from pinned memory, on CUDA)."""
        if self.dims.device.type == "cpu":
            return batches
        return [b.pin_memory().to(self.dims.device, non_blocking=True) for b in batches]

    def _peak_flops(self) -> float:
        """One device's dense peak: configured, looked up (GPU) or measured by rank 0 alone
        while the others wait (CPU, where ranks share the cores), then shared."""
        configured = self.cfg.logging.mfu_peak
        if configured or self.dims.device.type == "cuda":
            return configured or peak_flops(self.cfg.parallel.precision, self.dims.device)[0]
        measured = peak_flops(self.cfg.parallel.precision)[0] if self.dims.is_main else 0.0
        value = torch.tensor([measured], dtype=torch.float64)
        return all_reduce(value, None, self.dims.device, torch.distributed.ReduceOp.MAX,
                          "CPU peak FLOP/s").item()

    def _task_metrics(self) -> dict[str, float]:
        """Masked-token loss and top-1 accuracy, overall and per task, summed over DP (the
        objective collected them during the step). Not under PP: rank 0 holds no loss."""
        stats = self.objective.take_stats()
        if self.dims.pp > 1:
            return {}
        if stats is None:
            stats = torch.zeros(3, len(TASKS) + 1, dtype=torch.float64)
        stats = all_reduce(stats.to(self.dims.device), self.dims.group("dp"), self.dims.device,
                           what="task metrics").cpu()
        count, ce, hits = stats
        out = {"masked_accuracy": float(hits.sum() / count.sum().clamp(min=1))}
        for index, task in enumerate(TASKS, start=1):
            if count[index] > 0:
                out[f"loss/{task}"] = float(ce[index] / count[index])
                out[f"accuracy/{task}"] = float(hits[index] / count[index])
        return out

    def _measure(self, micro_batches: list[NoisedBatch]) -> None:
        """Tokens and model FLOPs of this rank's micro-batches, scaled to the whole DP group."""
        tokens, flops = micro_batch_flops(self.cfg.model, self.vocab_size, micro_batches)
        self.meter.add(tokens * self.dims.dp, flops * self.dims.dp)

    def _evaluate(self, step: int, metrics: MetricsLogger) -> dict[str, float]:
        """Held-out metrics of the model as it is after ``step``; its sample artefacts go to
        the sinks that keep files. Its time stays out of the throughput figures."""
        values, folder = self.held_out.run(self.engine.model, step, self.output_dir,
                                           write=self.dims.is_main)
        if folder is not None:
            metrics.log_folder(folder, f"eval/step_{step:08d}")
        self.meter.restart()
        return values

    # --- checkpoints -------------------------------------------------------------------------
    def _save(self, step: int) -> Path:
        state = {"engine": self.engine.state_dict(), "data": self.batches.state_dict(),
                 "step": step}
        return checkpoint.save(self.output_dir, step, state, self.cfg.checkpoint.keep_last,
                               meta={"config": self.cfg.model_dump(mode="json")})

    def _init_weights(self) -> dict | None:
        """Full (TP=1) weights from ``checkpoint.init_from``, resized to this vocabulary."""
        folder = self.cfg.checkpoint.init_from
        if folder is None:
            return None
        from omnidiff.platform.hf_import import megatron_weights_from_hf

        log.info("initialising from %s", folder)
        return megatron_weights_from_hf(folder, self.cfg.model, self.vocab_size,
                                        self.vocab.text_size, self.cfg.checkpoint.init_new_rows,
                                        self.cfg.seed)

    def _resume(self) -> int:
        path = self.resume_path
        if path is None:
            return 0
        state = checkpoint.load(path)
        self.engine.load_state_dict(state["engine"])
        if "data" in state:  # absent in checkpoints written by omnidiff import
            self.batches.load_state_dict(state["data"])
        log.info("resumed from %s (step %d)", path, state["step"])
        return state["step"]

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> TrainSummary:
        """Train to ``schedule.train_steps``, or until a stop signal (then save and return)."""
        cfg = self.cfg
        self.stop.install()
        if self.dims.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(dump_config(cfg))
        start = self._resume()
        sinks = (build_sinks(cfg.logging, self.output_dir, start, cfg.name,
                             flatten(cfg.model_dump(mode="json")))
                 if self.dims.is_main else [])
        metrics = MetricsLogger(sinks)
        summary = TrainSummary(last_step=start)
        began = time.perf_counter()
        bar = tqdm(range(start, cfg.schedule.train_steps), initial=start,
                   total=cfg.schedule.train_steps, desc=cfg.logging.progress_label, unit="step",
                   disable=not (cfg.logging.progress_bar and self.dims.is_main))
        for step in bar:
            done = step + 1
            logging_step = (done % cfg.logging.log_interval == 0
                            or done == cfg.schedule.train_steps)
            self.objective.collect = logging_step
            result = self.engine.train_step(self._on_device(self._micro_batches(step)))
            summary.losses.append(result.loss)
            summary.skipped_steps += int(result.skipped)
            summary.last_step = done
            bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{result.lr:.2e}")
            stopping = self.dims.any_rank(self.stop.requested)
            row = {}
            if logging_step or stopping:
                row = {"loss": result.loss, "grad_norm": result.grad_norm, "lr": result.lr,
                       "masked_tokens": result.num_masked, "skipped_steps": summary.skipped_steps,
                       **self._task_metrics(), **system_metrics(), **self.meter.report(),
                       **self.batches.metrics()}
            if self.held_out and self.held_out.due(done) and not stopping:
                row |= self._evaluate(done, metrics)
            if row:
                metrics.log(done, row)
            interval = cfg.checkpoint.save_interval
            due = (interval and done % interval == 0) or done == cfg.schedule.train_steps
            if (due or stopping) and not result.skipped:  # the newest checkpoint is a good one
                summary.checkpoint = str(self._save(done))
            if stopping:
                summary.stopped_by = self.stop.signal_name or "a stop request on another rank"
                break
        summary.steps = len(summary.losses)
        summary.seconds = time.perf_counter() - began
        metrics.close()
        self.stop.restore()
        return summary
