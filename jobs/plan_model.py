"""Memory and step-time model of one training layout, per rank (one GPU, or one CPU process).

Memory is counted from what the platform's engines really keep (``parallel/engines``):

* weights, gradients and AdamW state of this rank's parameters (the largest pipeline stage):
  the local engine keeps the optimizer in the parameters' dtype; DeepSpeed keeps an fp32 master
  partition and fp32 Adam moments per ZeRO shard (ZeRO-1: optimizer state / DP; ZeRO-2:
  + gradients / DP; ZeRO-3: + weights / DP), and ZeRO-1 an fp32 flat gradient partition;
* ZeRO-2 stages gradients through DeepSpeed's reduce bucket (``reduce_bucket_size`` elements);
  on CPU DeepSpeed's shared-memory all-reduce keeps a 128 MiB buffer (``Device.runtime_bytes``);
* optimizer temporaries: torch's single-tensor AdamW (CPU) makes two temporaries the size of its
  largest tensor (the flat ZeRO partition, or the largest parameter); fused GPU optimizers none;
* activations per layer and token (the tensors autograd saves in this layer implementation, by
  size: norm inputs / outputs, fused QKV, RoPE'd q and k, attention output, SwiGLU's 2f + f + f +
  f), divided by TP where sharded and by TP for the hidden-size ones under sequence parallelism;
  attention's s x s term: the float mask SDPA keeps on CPU, the softmax probabilities of TE's
  unfused backend on GPU, nothing for flash kernels; selective recompute drops it, full keeps
  only each layer's input (plus one layer's activations while it is recomputed);
* pipeline: the first stage holds ``min(pp, micro-batches)`` micro-batches of activations (1F1B);
* the masked head's workspace: fp32 weight and hidden gradients made in its forward.

Step time: compute (the FLOPs the kernels run: model FLOPs + recomputation + dense attention)
at an assumed achievable fraction of peak, the memory-bound softmax of TE's unfused attention,
plus exposed communication (TP all-gather /
reduce-scatter, PP bubble and p2p, DP gradient reduce (+ ZeRO all-gathers), none of it overlapped:
the engines run DeepSpeed with ``overlap_comm`` off) and the memory-bound optimizer update.
"""

from __future__ import annotations

from dataclasses import dataclass

from omnidiff.monitoring.flops import attention_flops, dense_flops_per_token, training_flops
from omnidiff.parallel.config import ModelConfig

ADAM_STATES = 2
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)


@dataclass(frozen=True)
class Layout:
    """One parallel layout of a run."""

    tp: int
    pp: int
    dp: int
    zero_stage: int
    recompute: str = "none"  # none | selective | full
    fp8: str | None = None  # FP8 recipe, None for bf16 / fp32 GEMMs
    micro_batch: int = 1

    @property
    def sequence_parallel(self) -> bool:
        return self.tp > 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def label(self) -> str:
        fp8 = f" fp8-{self.fp8}" if self.fp8 else ""
        return (f"TP{self.tp} PP{self.pp} DP{self.dp} ZeRO-{self.zero_stage} mb{self.micro_batch}"
                f" rc-{self.recompute}{fp8}")


@dataclass(frozen=True)
class Workload:
    """What is trained: shape, vocabulary rows, tokens per step, numerics."""

    model: ModelConfig
    vocab_size: int
    seq_length: int
    global_batch: int
    precision: str = "bf16"  # fp32 | bf16: weights, gradients, activations
    scored_fraction: float = 0.25  # masked targets per token (targets ~1/2, masked ~1/2)
    sample_length: int | None = None  # mean packed sample length (model FLOPs); None = row


@dataclass(frozen=True)
class Device:
    """One rank's hardware and the kernels it runs."""

    name: str
    memory_bytes: float
    peak_flops: float  # dense, at the GEMM precision used
    efficiency: float  # achievable fraction of peak for the step's GEMMs
    memory_bandwidth: float  # bytes/s (optimizer update)
    intra_node_bw: float  # bytes/s per GPU, achievable collective bandwidth (NVLink)
    inter_node_bw: float  # bytes/s per GPU (InfiniBand)
    gpus_per_node: int
    attention: str = "te-unfused"  # te-unfused | flash | sdpa-cpu
    fused_optimizer: bool = True  # False: torch single-tensor AdamW temporaries (CPU)
    deepspeed_engine: bool = True  # False only for the one-process local engine
    runtime_bytes: float = 0.0  # the engine's own buffers (DeepSpeed's CPU shm all-reduce)


def _bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


# --- parameters ------------------------------------------------------------------------------
def layer_parameters(model: ModelConfig) -> tuple[int, int]:
    """(TP-sharded, replicated) parameters of one transformer layer."""
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    q, kv = model.num_attention_heads * d, model.num_query_groups * d
    sharded = h * (q + 2 * kv) + q * h + 3 * h * f + (q + 2 * kv if model.qkv_bias else 0)
    return sharded, 2 * h


def stage_parameters(model: ModelConfig, vocab_size: int, tp: int, pp: int) -> list[int]:
    """Parameters each pipeline stage holds on one TP rank (embedding first, head last)."""
    sharded, replicated = layer_parameters(model)
    per_layer = sharded // tp + replicated
    stages = [model.num_layers // pp * per_layer for _ in range(pp)]
    stages[0] += vocab_size * model.hidden_size // tp
    stages[-1] += vocab_size * model.hidden_size // tp + model.hidden_size
    return stages


def total_parameters(model: ModelConfig, vocab_size: int) -> int:
    return sum(stage_parameters(model, vocab_size, 1, 1))


# --- activations -----------------------------------------------------------------------------
def layer_activation_elements(model: ModelConfig, layout: Layout, seq: int, attention: str,
                              recompute: str | None = None) -> float:
    """Elements autograd keeps per token for one layer (this TP rank)."""
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    heads, tp = model.num_attention_heads, layout.tp
    q, kv = heads * d, model.num_query_groups * d
    recompute = layout.recompute if recompute is None else recompute
    hidden_split = tp if layout.sequence_parallel else 1
    if recompute == "full":
        return h / hidden_split  # the layer's input only
    sharded = (3 * q + 3 * kv + 5 * f) / tp
    replicated = (6 * h + 2) / hidden_split + 4 * d
    scores = {"sdpa-cpu": seq, "te-unfused": heads / tp * seq, "flash": 0.0}[attention]
    if recompute == "selective":
        return sharded + replicated
    return sharded + replicated + scores + heads / tp


def activation_bytes(work: Workload, layout: Layout, device: Device) -> float:
    """Peak activation bytes of the busiest stage (the first, under 1F1B)."""
    model, seq = work.model, work.seq_length
    tokens = seq * layout.micro_batch
    width = _bytes(work.precision)
    layers = model.num_layers // layout.pp
    per_layer = layer_activation_elements(model, layout, seq, device.attention)
    stack = layers * per_layer
    if layout.recompute == "full":  # one layer's activations live again while recomputed
        stack += layer_activation_elements(model, layout, seq, device.attention, "none")
    outside = 4 * model.hidden_size  # embedding output, final norm
    micro_batches = work.global_batch // (layout.micro_batch * layout.dp)
    in_flight = min(layout.pp, micro_batches)
    return tokens * width * (stack * in_flight + outside)


def head_workspace_bytes(work: Workload, layout: Layout) -> float:
    """The masked head's fp32 gradients, made in its forward (weight shard and hidden rows)."""
    h = work.model.hidden_size
    scored = work.scored_fraction * work.seq_length * layout.micro_batch
    return 4 * (work.vocab_size // layout.tp * h + scored * h)


# --- parameter state -------------------------------------------------------------------------
def state_bytes(work: Workload, layout: Layout, device: Device, params: int) -> dict[str, float]:
    """Weights, gradients, optimizer state and optimizer temporaries of ``params``."""
    width = _bytes(work.precision)
    dp, zero = layout.dp, layout.zero_stage
    if not device.deepspeed_engine:  # torch AdamW on the parameters, states in their dtype
        largest = work.vocab_size * work.model.hidden_size // layout.tp
        temps = 0 if device.fused_optimizer else 2 * width * largest
        return {"weights": width * params, "gradients": width * params,
                "optimizer": ADAM_STATES * width * params, "optimizer_temps": temps}
    shard = params / dp if zero >= 1 else params
    if zero < 2:  # full gradients, and under ZeRO-1 the flat fp32 partition the update reads
        gradients = width * params + (4 * shard if zero == 1 else 0)
    else:  # gradients staged through the reduce bucket into this rank's fp32 partition
        gradients = width * min(params, REDUCE_BUCKET) + 4 * params / dp
    weights = width * params / (dp if zero == 3 else 1)
    optimizer = (4 + 4 * ADAM_STATES) * shard  # fp32 master partition + moments
    temps = 0 if device.fused_optimizer else 2 * 4 * shard
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer,
            "optimizer_temps": temps}


def memory_per_rank(work: Workload, layout: Layout, device: Device) -> dict[str, float]:
    """Peak bytes of the busiest rank, by part, and ``total``.

    The step's peak is the larger of forward/backward (state + activations + head workspace at
    its start, state + gradients + one layer's activations at its end) and the optimizer update
    (state + gradients + temporaries; activations are gone by then).
    """
    stages = stage_parameters(work.model, work.vocab_size, layout.tp, layout.pp)
    params = max(stages)
    parts = state_bytes(work, layout, device, params)
    parts["activations"] = activation_bytes(work, layout, device)
    parts["head_workspace"] = head_workspace_bytes(work, layout)
    static = parts["weights"] + parts["optimizer"]
    # backward starts with every activation and ends with every gradient, plus the activations
    # of the layer whose backward runs last (recomputed, under full recompute)
    last_layer = (work.seq_length * layout.micro_batch * _bytes(work.precision)
                  * layer_activation_elements(work.model, layout, work.seq_length,
                                              device.attention, "none"))
    backward = static + max(parts["activations"] + parts["head_workspace"],
                            parts["gradients"] + last_layer)
    update = static + parts["gradients"] + parts["optimizer_temps"]
    parts["runtime"] = device.runtime_bytes if device.deepspeed_engine else 0.0
    parts["total"] = max(backward, update) + parts["runtime"]
    return parts


# --- step time -------------------------------------------------------------------------------
def executed_flops(work: Workload, layout: Layout) -> float:
    """FLOPs the kernels run per optimizer step over all ranks: model FLOPs with attention over
    whole rows (the masked kernels compute s x s), the masked head's recomputed logits and the
    recomputation."""
    model, seq = work.model, work.seq_length
    rows = work.global_batch
    scored = round(work.scored_fraction * seq * rows)
    base = training_flops(model, work.vocab_size, [seq] * rows, scored)
    forward_layers = (dense_flops_per_token(model) * seq * rows
                      + attention_flops(model, [seq] * rows))
    head_recompute = 2 * model.hidden_size * work.vocab_size * scored
    recompute = {"none": 0.0, "selective": attention_flops(model, [seq] * rows),
                 "full": forward_layers}[layout.recompute]
    return base + head_recompute + recompute


def model_flops(work: Workload) -> float:
    """The model FLOPs of one step (monitoring.flops definition)."""
    length = work.sample_length or work.seq_length
    per_row = max(1, work.seq_length // length)
    lengths = [length] * per_row * work.global_batch
    scored = round(work.scored_fraction * work.seq_length * work.global_batch)
    return training_flops(work.model, work.vocab_size, lengths, scored)


def _link(group_span: int, device: Device) -> float:
    """Bandwidth of a collective over ranks ``group_span`` apart or within that many ranks."""
    return device.intra_node_bw if group_span <= device.gpus_per_node else device.inter_node_bw


def _softmax_time(work: Workload, layout: Layout, device: Device) -> float:
    """TE's unfused attention (the arbitrary block-diagonal mask) streams the s x s scores
    through memory: ~6 passes forward + backward (3 more when recomputed), per head and row."""
    if device.attention != "te-unfused":
        return 0.0
    passes = 6 + (3 if layout.recompute != "none" else 0)
    per_layer_row = (passes * work.model.num_attention_heads / layout.tp * work.seq_length ** 2
                     * _bytes(work.precision))
    rows = work.global_batch / layout.dp
    return per_layer_row * work.model.num_layers / layout.pp * rows / device.memory_bandwidth


def step_time(work: Workload, layout: Layout, device: Device) -> dict[str, float]:
    """Seconds per optimizer step, by part, and ``total``."""
    model, width = work.model, _bytes(work.precision)
    micro_batches = work.global_batch // (layout.micro_batch * layout.dp)
    compute = executed_flops(work, layout) / layout.world / (device.peak_flops * device.efficiency)
    # TP: per layer 2 all-gathers + 2 reduce-scatters forward (SP; or 2 all-reduces), as many
    # backward, and once more forward under full recompute; each moves (tp-1)/tp of s*b*h.
    tp_comm = 0.0
    if layout.tp > 1:
        volume = work.seq_length * layout.micro_batch * model.hidden_size * width
        per_layer = (8 + (4 if layout.recompute == "full" else 0)) * volume * (layout.tp - 1) \
            / layout.tp
        tp_comm = (per_layer * model.num_layers / layout.pp * micro_batches
                   / _link(layout.tp, device))
    # PP: the 1F1B bubble idles (pp - 1) of (m + pp - 1) slots; p2p sends forward and back.
    bubble = compute * (layout.pp - 1) / micro_batches
    p2p = 0.0
    if layout.pp > 1:
        message = (work.seq_length * layout.micro_batch * model.hidden_size * width
                   / (layout.tp if layout.sequence_parallel else 1))
        p2p = 2 * message * micro_batches / _link(layout.tp * layout.dp * 2, device)
    # DP: gradient all-reduce (ZeRO 0/1: 2x) or reduce-scatter + parameter all-gather (ZeRO-2/3,
    # ZeRO-3 gathers twice), each (dp-1)/dp of this rank's parameters.
    params = max(stage_parameters(model, work.vocab_size, layout.tp, layout.pp))
    factor = {0: 2, 1: 2, 2: 2, 3: 3}[layout.zero_stage]
    dp_comm = (factor * params * width * (layout.dp - 1) / layout.dp
               / _link(layout.tp * layout.dp, device)) if layout.dp > 1 else 0.0
    shard = params / (layout.dp if layout.zero_stage >= 1 else 1)
    update = shard * (4 * 3 * 2 + width * 2) / device.memory_bandwidth  # r/w master+m+v, g, w
    parts = {"compute": compute, "attention_softmax": _softmax_time(work, layout, device),
             "tp_comm": tp_comm, "pp_bubble": bubble, "pp_p2p": p2p, "dp_comm": dp_comm,
             "optimizer": update}
    parts["total"] = sum(parts.values())
    return parts
