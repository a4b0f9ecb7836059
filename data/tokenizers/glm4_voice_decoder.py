"""GLM-4-Voice speech decoder: 12.5 Hz speech codes -> mel (flow matching) -> 22,050 Hz audio (HiFT).

Directory layout = the released ``THUDM/glm-4-voice-decoder``: ``config.yaml`` (hyperpyyaml; only
the ``flow`` and ``hift`` sections are read, with plain PyYAML: ``!new:``/``!apply:`` tags are
recorded and checked against the released classes, ``!ref <name>`` resolves top-level keys),
``flow.pt`` and ``hift.pt`` (plain state dicts, read with ``weights_only=True``; ``flow.safetensors``
/ ``hift.safetensors`` are accepted instead). Keys must match exactly (see
:mod:`~omnidiff.data.tokenizers.flow_matching` and :mod:`~omnidiff.data.tokenizers.hift`); any other
file in the directory is ignored.

Length relation (exact): ``n`` codes -> ``floor(n / 12.5 * 22050 / 256) = floor(441 n / 64)`` mel
frames -> 256 samples per frame at 22,050 Hz, i.e. ``256 * floor(441 n / 64)`` samples
(:meth:`Glm4VoiceDecoder.num_samples`). Decoding is offline (``finalize=True`` in the release's
``token2wav``, no prompt, zero speaker embedding); streaming is not implemented.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import yaml

from omnidiff.data.tokenizers.base import check_codes
from omnidiff.data.tokenizers.checkpoint import load_by_key, read_state_dict
from omnidiff.data.tokenizers.flow_encoder import FlowEncoderConfig
from omnidiff.data.tokenizers.flow_matching import EstimatorConfig, FlowConfig, FlowDecoder
from omnidiff.data.tokenizers.hift import HiftConfig, HiFTGenerator, rename_weight_norm_keys

CONFIG_NAME = "config.yaml"
_TAG = "__tag__"


class _Ref(str):
    """``!ref <name>`` placeholder, resolved against the top-level keys after parsing."""


def _construct_tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return {_TAG: suffix, **loader.construct_mapping(node, deep=True)}
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    value = loader.construct_scalar(node)
    return _Ref(value.strip().strip("<>")) if suffix == "ref" else value


class _HyperLoader(yaml.SafeLoader):
    pass


_HyperLoader.add_multi_constructor("!", _construct_tagged)


def read_hyperpyyaml(path: Path) -> dict[str, Any]:
    """The mapping of a hyperpyyaml file without instantiating anything (tags kept under ``__tag__``)."""
    raw = yaml.load(path.read_text(), Loader=_HyperLoader) or {}

    def resolve(value: Any) -> Any:
        if isinstance(value, _Ref):
            if value not in raw:
                raise ValueError(f"{path}: !ref <{value}> names no top-level key")
            return resolve(raw[value])
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    return resolve(raw)


def _section(parent: dict, key: str, cls_suffix: str, path: Path, where: str) -> dict:
    node = parent.get(key)
    if not isinstance(node, dict):
        raise ValueError(f"{path}: missing section {where}{key}")
    tag = node.get(_TAG, "")
    if tag and not tag.endswith(cls_suffix):
        raise ValueError(f"{path}: {where}{key} is {tag!r}; only the released {cls_suffix} is supported")
    return node


def _require(node: dict, key: str, expected: Any, default: Any, path: Path, where: str) -> None:
    if node.get(key, default) != expected:
        raise ValueError(f"{path}: unsupported {where}{key}={node.get(key)!r} (released value: {expected!r})")


def _pick(cls, node: dict, **extra) -> Any:
    names = {f.name for f in fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in node.items() if k in names}
    return cls(**{**values, **extra})


def decoder_configs_from_yaml(path: str | Path) -> tuple[FlowConfig, HiftConfig]:
    """Flow and HiFT hyper-parameters from a released ``config.yaml`` (validated against the release)."""
    path = Path(path)
    raw = read_hyperpyyaml(path)
    flow = _section(raw, "flow", "MaskedDiffWithXvec", path, "")
    enc = _section(flow, "encoder", "BlockConformerEncoder", path, "flow.")
    released_encoder = (
        ("input_layer", "linear", "conv2d"), ("pos_enc_layer_type", "rel_pos_espnet", "rel_pos"),
        ("selfattention_layer_type", "block_rel_selfattn", "rel_selfattn"), ("use_cnn_module", False, True),
        ("macaron_style", False, True), ("normalize_before", True, True), ("activation_type", "swish", "swish"),
        ("static_chunk_size", 0, 0), ("use_dynamic_chunk", False, False),
    )
    for key, expected, default in released_encoder:
        _require(enc, key, expected, default, path, "flow.encoder.")
    regulator = _section(flow, "length_regulator", "InterpolateRegulator", path, "flow.")
    cfm = _section(flow, "decoder", "ConditionalCFM", path, "flow.")
    params = cfm.get("cfm_params", {})
    params = params.get("content", params)
    _require(params, "solver", "euler", "euler", path, "flow.decoder.cfm_params.")
    est = _section(cfm, "estimator", "ConditionalDecoder", path, "flow.decoder.")
    _require(est, "act_fn", "gelu", "snake", path, "flow.decoder.estimator.")
    hift = _section(raw, "hift", "HiFTGenerator", path, "")
    f0 = _section(hift, "f0_predictor", "ConvRNNF0Predictor", path, "hift.")
    istft = hift.get("istft_params", {})
    dilations = {key: tuple(map(tuple, hift.get(key, getattr(HiftConfig, key))))
                 for key in ("resblock_dilation_sizes", "source_resblock_dilation_sizes")}
    hift_cfg = _pick(HiftConfig, {k: v for k, v in hift.items() if k not in ("istft_params", "f0_predictor")},
                     n_fft=istft.get("n_fft", 16), hop_len=istft.get("hop_len", 4), **dilations,
                     f0_num_class=f0.get("num_class", 1), f0_cond_channels=f0.get("cond_channels", 512))
    if f0.get("in_channels", hift_cfg.in_channels) != hift_cfg.in_channels:
        raise ValueError(f"{path}: hift.f0_predictor.in_channels must equal hift.in_channels")
    flow_cfg = _pick(
        FlowConfig, {k: v for k, v in flow.items() if k not in ("encoder", "decoder", "length_regulator")},
        encoder=_pick(FlowEncoderConfig, enc, input_size=enc.get("input_size", flow.get("input_size", 512))),
        regulator_sampling_ratios=tuple(regulator.get("sampling_ratios", ())),
        estimator=_pick(EstimatorConfig, est),
        sigma_min=float(params.get("sigma_min", 1e-6)), t_scheduler=params.get("t_scheduler", "cosine"),
        inference_cfg_rate=float(params.get("inference_cfg_rate", 0.7)),
        mel_rate_num=hift_cfg.sampling_rate, mel_rate_den=hift_cfg.hop_length,
    )
    if flow_cfg.output_size != hift_cfg.in_channels:
        raise ValueError(f"{path}: flow.output_size {flow_cfg.output_size} != hift.in_channels {hift_cfg.in_channels}")
    return flow_cfg, hift_cfg


def decoder_config_yaml(flow: FlowConfig, hift: HiftConfig) -> str:
    """The ``flow``/``hift`` part of the released ``config.yaml`` (same tags, keys and nesting)."""
    e, est = flow.encoder, flow.estimator
    lst = lambda v: "[" + ", ".join(str(list(x)) if isinstance(x, tuple) else str(x) for x in v) + "]"  # noqa: E731
    return f"""# GLM-4-Voice decoder (flow matching + HiFT), hyperpyyaml layout of THUDM/glm-4-voice-decoder
sample_rate: {hift.sampling_rate}
spk_embed_dim: {flow.spk_embed_dim}

flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: {flow.input_size}
    output_size: {flow.output_size}
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {flow.vocab_size}
    input_frame_rate: {flow.input_frame_rate}
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.BlockConformerEncoder
        output_size: {e.output_size}
        attention_heads: {e.attention_heads}
        linear_units: {e.linear_units}
        num_blocks: {e.num_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'block_rel_selfattn'
        block_size: {e.block_size}
        input_size: {e.input_size}
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: {flow.output_size}
        sampling_ratios: {lst(flow.regulator_sampling_ratios)}
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: {flow.output_size}
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: {flow.sigma_min}
                solver: 'euler'
                t_scheduler: '{flow.t_scheduler}'
                training_cfg_rate: 0.2
                inference_cfg_rate: {flow.inference_cfg_rate}
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: {est.in_channels}
            out_channels: {est.out_channels}
            channels: {lst(est.channels)}
            dropout: 0
            attention_head_dim: {est.attention_head_dim}
            n_blocks: {est.n_blocks}
            num_mid_blocks: {est.num_mid_blocks}
            num_heads: {est.num_heads}
            act_fn: 'gelu'

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: {hift.in_channels}
    base_channels: {hift.base_channels}
    nb_harmonics: {hift.nb_harmonics}
    sampling_rate: !ref <sample_rate>
    nsf_alpha: {hift.nsf_alpha}
    nsf_sigma: {hift.nsf_sigma}
    nsf_voiced_threshold: {hift.nsf_voiced_threshold}
    upsample_rates: {lst(hift.upsample_rates)}
    upsample_kernel_sizes: {lst(hift.upsample_kernel_sizes)}
    istft_params:
        n_fft: {hift.n_fft}
        hop_len: {hift.hop_len}
    resblock_kernel_sizes: {lst(hift.resblock_kernel_sizes)}
    resblock_dilation_sizes: {lst(hift.resblock_dilation_sizes)}
    source_resblock_kernel_sizes: {lst(hift.source_resblock_kernel_sizes)}
    source_resblock_dilation_sizes: {lst(hift.source_resblock_dilation_sizes)}
    lrelu_slope: {hift.lrelu_slope}
    audio_limit: {hift.audio_limit}
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: {hift.f0_num_class}
        in_channels: {hift.in_channels}
        cond_channels: {hift.f0_cond_channels}
"""


def _weights(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.safetensors", f"{stem}.pt"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"GLM-4-Voice decoder directory has no {stem}.pt or {stem}.safetensors: {directory}")


class Glm4VoiceDecoder:
    """Codes (1-D, 12.5 Hz, ``[0, 16384)``) -> mono float32 waveform at :attr:`sample_rate` (22,050 Hz)."""

    def __init__(self, flow: FlowDecoder, hift: HiFTGenerator, steps: int | None = None) -> None:
        if flow.config.output_size != hift.config.in_channels:
            raise ValueError("GLM-4-Voice decoder: flow mel bins != HiFT input channels")
        if (flow.config.mel_rate_num, flow.config.mel_rate_den) != (hift.config.sampling_rate, hift.config.hop_length):
            raise ValueError("GLM-4-Voice decoder: flow mel frame rate != HiFT sample rate / hop length")
        self.flow = flow.eval().requires_grad_(False)
        self.hift = hift.eval().requires_grad_(False)
        self.steps = flow.config.n_timesteps if steps is None else steps

    @property
    def sample_rate(self) -> int:
        return self.hift.config.sampling_rate

    @property
    def codebook_size(self) -> int:
        return self.flow.config.vocab_size

    def num_samples(self, num_codes: int) -> int:
        """Exact output length: ``hop * floor(codes / 12.5 * 22050 / hop)`` with hop = 256."""
        return self.flow.config.mel_frames(num_codes) * self.hift.config.hop_length

    def mel(self, codes: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """``[n]`` codes -> ``[80, floor(441 n / 64)]`` mel (natural-log magnitudes, as HiFT expects)."""
        codes = check_codes(codes, self.codebook_size, 1)
        return self.flow(codes, self.steps if steps is None else steps)

    @torch.inference_mode()
    def __call__(self, codes: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        mel = self.mel(codes, steps)
        if mel.shape[-1] == 0:
            return torch.zeros(0)
        return self.hift(mel[None])[0].float()

    @classmethod
    def from_pretrained(cls, directory: str | Path, steps: int | None = None) -> Glm4VoiceDecoder:
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"GLM-4-Voice decoder directory has no {CONFIG_NAME}: {directory}")
        flow_cfg, hift_cfg = decoder_configs_from_yaml(directory / CONFIG_NAME)
        flow, hift = FlowDecoder(flow_cfg), HiFTGenerator(hift_cfg)
        flow_file, hift_file = _weights(directory, "flow"), _weights(directory, "hift")
        load_by_key(flow, read_state_dict(flow_file), what=f"GLM-4-Voice flow decoder ({flow_file})")
        load_by_key(hift, rename_weight_norm_keys(read_state_dict(hift_file)),
                    what=f"GLM-4-Voice HiFT vocoder ({hift_file})")
        return cls(flow, hift, steps)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.yaml``, ``flow.pt`` and ``hift.pt`` in the released layout."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(decoder_config_yaml(self.flow.config, self.hift.config))
        for name, module in (("flow.pt", self.flow), ("hift.pt", self.hift)):
            torch.save({k: v.contiguous() for k, v in module.state_dict().items()}, directory / name)
        return directory
