"""The bidirectional diffusion transformer, assembled from megatron-core parts.

embedding (``VocabParallelEmbedding``) -> ``TransformerBlock`` built from a layer spec
(portable or Transformer Engine, see :mod:`omnidiff.parallel.specs`) -> final RMSNorm ->
column-parallel output layer. The forward returns the final hidden states; the loss only ever
evaluates the output layer at masked positions (:mod:`omnidiff.kernels.masked_head`), and
:meth:`OmniDiffusionTransformer.logits` gives full logits for sampling and checks.

Packed rows run as THD: the ``b`` rows of ``s`` tokens are laid end to end as one sequence of
``t = b s`` tokens (``[t, 1, h]``; ``[t / tp, 1, h]`` per rank under sequence parallelism), and
``cu_seqlens`` marks the packed samples, so attention is block-diagonal without a mask (Transformer
Engine fuses it; the portable spec loops SDPA over the samples) and RoPE restarts per sample.
``attention="dense"`` keeps the former form (``[s, b, h]`` with a dense block-diagonal mask and
per-token angles) as the reference the THD path is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from omnidiff.data.tokenizers.sensevoice import SpeechProjector
from omnidiff.data.tokens.noising import packed_cu_seqlens
from omnidiff.kernels.attention import PackedSequences, block_diagonal_mask, packed_sequences
from omnidiff.kernels.rope import rotary_angles
from omnidiff.parallel.config import ModelConfig, ParallelConfig
from omnidiff.parallel.gpu_stack import require_gpu_stack, transformer_engine_problem
from omnidiff.parallel.recompute import OmniTransformerConfig, recompute_settings
from omnidiff.parallel.specs import StackSpec, layer_spec_for

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_config(model: ModelConfig, parallel: ParallelConfig,
                       perform_initialization: bool = True) -> TransformerConfig:
    """Translate the run config into megatron-core's ``TransformerConfig`` (one place only).

    Raises :class:`~omnidiff.parallel.gpu_stack.MissingGPUStackError` when the config asks for
    Transformer Engine or FP8 and this machine cannot run them.
    """
    require_gpu_stack(parallel)
    dtype = DTYPES[parallel.precision]
    te = {}
    if parallel.transformer_engine:
        # TE caches FP8 weight casts while ``is_first_microbatch`` is False; only megatron's
        # schedules reset that flag per step, so our engines recast weights on every call.
        te = {"disable_parameter_transpose_cache": True}
    if parallel.fp8:
        te |= {"fp8": parallel.fp8, "fp8_recipe": parallel.fp8_recipe,
               "fp8_amax_history_len": parallel.fp8_amax_history_len,
               "fp8_amax_compute_algo": "max"}
    return OmniTransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=parallel.precision == "bf16",
        fp16=parallel.precision == "fp16",
        # Initialise the full weight and slice it, so TP shards are slices of the TP=1 model.
        use_cpu_initialization=True,
        perform_initialization=perform_initialization,
        # CUDA fast paths megatron-core supports here: fused SwiGLU (torch.compile'd), fused
        # RoPE for packed THD (Transformer Engine). Gradient-accumulation fusion writes
        # megatron DDP's main_grad, which DeepSpeed never creates: off.
        bias_activation_fusion=torch.cuda.is_available(),
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=parallel.transformer_engine and transformer_engine_problem() is None,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        # megatron's recompute needs CUDA RNG state: only the (GPU-only) TE spec uses it.
        **recompute_settings(parallel.recompute, megatron_native=parallel.transformer_engine),
        **te,
    )


class OmniDiffusionTransformer(MegatronModule):
    """Token ids of packed rows -> final hidden states ``[s, b, h]`` (full sequence).

    One class for every pipeline stage, as megatron-core's ``GPTModel``: ``pre_process`` adds
    the embedding (the stage then reads token ids, else the previous stage's hidden states),
    ``post_process`` the final norm and the output layer; ``num_layers`` is this stage's share.
    Construction order (embedding, layers, final norm, output layer) is the same for the whole
    model and for its stages built one after another, so both draw the same initial weights.
    """

    def __init__(self, config: TransformerConfig, vocab_size: int, rope_theta: float,
                 spec: StackSpec, pre_process: bool = True, post_process: bool = True,
                 num_layers: int | None = None, attention: str = "thd",
                 speech_feature_size: int | None = None) -> None:
        super().__init__(config=config)
        if attention not in ("thd", "dense"):
            raise ValueError(f"attention must be 'thd' or 'dense', got {attention!r}")
        self.vocab_size = vocab_size
        self.rope_theta = rope_theta
        self.pre_process, self.post_process = pre_process, post_process
        self.attention = attention
        self.rope_in_core_attention = spec.rope_in_core_attention
        self.speech_projector = None
        if pre_process:
            # With continuous speech the features are spliced in before the sequence is split
            # over TP ranks, so the embedding all-reduces and the split comes after the splice.
            self.embedding = tensor_parallel.VocabParallelEmbedding(
                num_embeddings=vocab_size, embedding_dim=config.hidden_size,
                init_method=config.init_method, config=config,
                reduce_scatter_embeddings=config.sequence_parallel and not speech_feature_size,
            )
            if speech_feature_size:  # replicated over TP; trained; on the first stage only
                self.speech_projector = SpeechProjector(speech_feature_size, config.hidden_size
                                                        ).to(config.params_dtype)
        # pre_process=True: the block takes hidden states as an argument (never megatron's
        # set_input_tensor); post_process places the final norm.
        self.decoder = TransformerBlock(
            config=config, spec=spec.block(num_layers or config.num_layers),
            pre_process=True, post_process=post_process, post_layer_norm=post_process,
        )
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, vocab_size, config=config, init_method=config.init_method,
                bias=False, gather_output=False,
            )

    def embed(self, input_ids: torch.Tensor, speech_features: torch.Tensor | None = None,
              speech_positions: torch.Tensor | None = None) -> torch.Tensor:
        """``[b, s]`` ids -> ``[s, b, h]`` (this rank's sequence slice under SP); continuous
        speech features (``[n, f]``) take the places ``speech_positions`` (flat over ``b s``)."""
        hidden = self.embedding(input_ids)
        if self.speech_projector is None:
            if not self.config.sequence_parallel:  # SP's reduce-scatter already transposed
                hidden = hidden.transpose(0, 1).contiguous()
            return hidden
        projected = self.speech_projector(speech_features.to(hidden.dtype).reshape(
            -1, self.speech_projector.pre_proj_layernorm.normalized_shape[0]))
        flat = hidden.reshape(-1, hidden.shape[-1]).index_put((speech_positions,), projected)
        # + 0 x the projection: the projector takes part (zero gradients) in a batch without
        # speech, so every data-parallel rank reduces the same gradients
        hidden = (flat + 0 * projected.sum()).view_as(hidden).transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)
        return hidden

    def forward(self, inputs: torch.Tensor, position_ids: torch.Tensor,
                segment_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                speech_features: torch.Tensor | None = None,
                speech_positions: torch.Tensor | None = None) -> torch.Tensor:
        """``inputs``: token ids ``[b, s]`` on the first stage, else the previous stage's hidden
        states (as this method returns them on a stage without ``post_process``).

        ``cu_seqlens`` (int32, :func:`omnidiff.data.tokens.noising.packed_cu_seqlens` of the
        segment ids, precomputed on the host) is derived here when not given. Returns hidden
        states; the last stage's are the final ones, ``[s, b, h]``, whole-sequence under SP.
        """
        b, s = segment_ids.shape
        if self.attention == "dense":
            hidden = (self.embed(inputs, speech_features, speech_positions)
                      if self.pre_process else inputs)
            hidden = self.decoder(
                hidden, attention_mask=block_diagonal_mask(segment_ids),
                rotary_pos_emb=rotary_angles(position_ids, self.config.kv_channels,
                                             self.rope_theta))
        else:
            hidden = (self.embed(inputs.reshape(1, b * s), speech_features, speech_positions)
                      if self.pre_process else inputs)
            table, packed = self._packed(position_ids, segment_ids, cu_seqlens)
            hidden = self.decoder(hidden, attention_mask=None, rotary_pos_emb=table,
                                  packed_seq_params=packed)
        if not self.post_process:
            return hidden
        if self.config.sequence_parallel:
            # Backward only splits: the LM head all-reduces its input gradient over TP.
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False)
        if self.attention == "thd":
            hidden = hidden.reshape(b, s, -1).transpose(0, 1)
        return hidden

    def _packed(self, position_ids: torch.Tensor, segment_ids: torch.Tensor,
                cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor | None, PackedSequences]:
        """RoPE table (or None: angles ride with the packing) and the THD packing parameters.

        ``cu_seqlens`` on the host gives the lengths for free; on the device (or absent, as on
        a middle pipeline stage) they are read back once per forward.
        """
        b, s = segment_ids.shape
        device = segment_ids.device
        if cu_seqlens is None:
            cu_seqlens = packed_cu_seqlens(segment_ids)
        lengths = tuple(cu_seqlens.diff().tolist()) if self.rope_in_core_attention else ()
        cu_seqlens = cu_seqlens.to(device, non_blocking=True)
        if self.rope_in_core_attention:
            angles = rotary_angles(position_ids.reshape(1, b * s), self.config.kv_channels,
                                   self.rope_theta)[:, 0]  # [t, 1, d]
            return None, packed_sequences(cu_seqlens, s, lengths, angles)
        # Positions 0..s: one more than any sample can use, so megatron never mistakes the
        # table for per-token angles (its rule when the sizes match, e.g. b = 1).
        table = rotary_angles(torch.arange(s + 1, device=device)[None], self.config.kv_channels,
                              self.rope_theta)
        return table, packed_sequences(cu_seqlens, s)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits of this rank's vocabulary shard, ``[s, b, V / tp]``, from the final hidden
        states :meth:`forward` returns (whole-sequence already: no second sequence gather)."""
        weight = self.output_layer.weight
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
        return torch.matmul(hidden, weight.t())


def build_model(model: ModelConfig, parallel: ParallelConfig, vocab_size: int,
                perform_initialization: bool = True,
                speech_feature_size: int | None = None) -> OmniDiffusionTransformer:
    """The whole model on the current default device (``torch.device('meta')`` to only count),
    with the layer spec ``parallel`` asks for (and a speech projector for continuous speech)."""
    config = transformer_config(model, parallel, perform_initialization)
    return OmniDiffusionTransformer(config, vocab_size, model.rope_theta,
                                    layer_spec_for(parallel),
                                    speech_feature_size=speech_feature_size)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
