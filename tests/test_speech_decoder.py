"""GLM-4-Voice speech decoder: flow matching (codes -> mel) + HiFT (mel -> 22.05 kHz audio), in the
released glm-4-voice-decoder layout, on random weights the tests save themselves.

Length relation checked below: ``n`` codes at 12.5 Hz -> ``floor(n / 12.5 * 22050 / 256)
= floor(441 n / 64)`` mel frames -> 256 samples per mel frame at 22,050 Hz.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import WhisperFeatureExtractor

from omnidiff.data.tokenizers import load_media_tokenizer
from omnidiff.data.tokenizers.checkpoint import CheckpointMismatchError
from omnidiff.data.tokenizers.flow_encoder import FlowEncoderConfig
from omnidiff.data.tokenizers.flow_matching import FLOW_SEED, EstimatorConfig, FlowConfig, FlowDecoder
from omnidiff.data.tokenizers.glm4_voice import Glm4VoiceTokenizer, WhisperVQConfig, WhisperVQEncoder
from omnidiff.data.tokenizers.glm4_voice_decoder import Glm4VoiceDecoder, decoder_configs_from_yaml
from omnidiff.data.tokenizers.hift import HiftConfig, HiFTGenerator

SMALL_FLOW = FlowConfig(
    input_size=64,
    encoder=FlowEncoderConfig(input_size=64, output_size=64, attention_heads=2, linear_units=128, num_blocks=2),
    estimator=EstimatorConfig(channels=(32, 32), attention_head_dim=16, n_blocks=1, num_mid_blocks=1, num_heads=2),
)
SMALL_HIFT = HiftConfig(base_channels=32, f0_cond_channels=32)
SMALL_GLM = WhisperVQConfig(num_mel_bins=80, d_model=64, encoder_attention_heads=4, encoder_ffn_dim=128,
                            encoder_layers=4, pooling_position=2, quantize_position=2)

# The released THUDM/glm-4-voice-decoder config.yaml (hyperpyyaml), verbatim minus comments.
RELEASED_CONFIG = """\
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]
sample_rate: 22050
text_encoder_input_size: 512
llm_input_size: 1024
llm_output_size: 1024
spk_embed_dim: 192
llm: !new:cosyvoice.llm.llm.TransformerLM
    text_encoder_input_size: !ref <text_encoder_input_size>
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    text_token_size: 51866
    speech_token_size: 4096
    length_normalized_loss: True
    lsm_weight: 0
    spk_embed_dim: !ref <spk_embed_dim>
    text_encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder
        input_size: !ref <text_encoder_input_size>
        output_size: 1024
        attention_heads: 8
        linear_units: 2048
        num_blocks: 3
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        use_cnn_module: False
        macaron_style: False
        use_dynamic_chunk: False
        use_dynamic_left_chunk: False
        static_chunk_size: 1
    llm: !new:cosyvoice.transformer.encoder.TransformerEncoder
        input_size: !ref <llm_input_size>
        output_size: !ref <llm_output_size>
        attention_heads: 8
        linear_units: 2048
        num_blocks: 7
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0
        input_layer: 'linear_legacy'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        static_chunk_size: 1
flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: 512
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 16384
    input_frame_rate: 12.5
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.BlockConformerEncoder
        output_size: 512
        attention_heads: 8
        linear_units: 2048
        num_blocks: 6
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'block_rel_selfattn'
        block_size: 10
        input_size: 512
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: 80
        sampling_ratios: [1, 1, 1, 1]
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [256, 256]
            dropout: 0
            attention_head_dim: 64
            n_blocks: 4
            num_mid_blocks: 12
            num_heads: 8
            act_fn: 'gelu'
hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: 512
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 8]
    upsample_kernel_sizes: [16, 16]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: 512
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights that exercise every path (the release's zero/one inits would hide some)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight_g"):
                continue  # weight-norm gains keep |w| = |v| from construction
            fan_in = math.prod(p.shape[1:]) if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (0.7 / math.sqrt(fan_in) if p.ndim > 1 else 0.1))
    return module


def small_decoder(seed: int = 0, steps: int | None = None) -> Glm4VoiceDecoder:
    return Glm4VoiceDecoder(randomise(FlowDecoder(SMALL_FLOW), seed), randomise(HiFTGenerator(SMALL_HIFT), seed + 1),
                            steps)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A GLM-4-Voice tokenizer directory with the released decoder files in ``decoder/``."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("glm4voice")
    Glm4VoiceTokenizer(WhisperVQEncoder(SMALL_GLM), WhisperFeatureExtractor(feature_size=80)).save_pretrained(directory)
    small_decoder(steps=2).save_pretrained(directory / "decoder")
    (directory / "decoder" / "README.md").write_text("GLM-4-Voice-Decoder\n")
    return directory


# --- released layout --------------------------------------------------------------------------

def test_released_config_parses_to_the_release_defaults(tmp_path):
    (tmp_path / "config.yaml").write_text(RELEASED_CONFIG)
    assert decoder_configs_from_yaml(tmp_path / "config.yaml") == (FlowConfig(), HiftConfig())
    (tmp_path / "config.yaml").write_text(RELEASED_CONFIG.replace("use_cnn_module: False", "use_cnn_module: True"))
    with pytest.raises(ValueError, match=r"unsupported flow\.encoder\.use_cnn_module=True") as err:
        decoder_configs_from_yaml(tmp_path / "config.yaml")
    assert "\n" not in str(err.value)


def test_full_size_modules_have_the_released_keys_and_shapes():
    with torch.device("meta"):
        flow, hift = FlowDecoder(FlowConfig()), HiFTGenerator(HiftConfig())
    flow_shapes = {k: tuple(v.shape) for k, v in flow.state_dict().items()}
    hift_shapes = {k: tuple(v.shape) for k, v in hift.state_dict().items()}
    est = "decoder.estimator."
    expected_flow = {
        "input_embedding.weight": (16384, 512), "spk_embed_affine_layer.weight": (80, 192),
        "encoder.embed.out.0.weight": (512, 512), "encoder.embed.out.1.weight": (512,),
        "encoder.encoders.5.self_attn.linear_k.bias": (512,),
        "encoder.encoders.5.self_attn.linear_pos.weight": (512, 512),
        "encoder.encoders.0.self_attn.pos_bias_u": (8, 64), "encoder.encoders.0.feed_forward.w_1.weight": (2048, 512),
        "encoder.encoders.0.norm_mha.weight": (512,), "encoder.after_norm.weight": (512,),
        "encoder_proj.weight": (80, 512), "length_regulator.model.1.weight": (80,),
        "length_regulator.model.12.weight": (80, 80, 1),
        est + "time_mlp.linear_1.weight": (1024, 320), est + "time_mlp.linear_2.weight": (1024, 1024),
        est + "down_blocks.0.0.block1.block.0.weight": (256, 320, 3),
        est + "down_blocks.0.0.block1.block.1.weight": (256,),
        est + "down_blocks.0.0.mlp.1.weight": (256, 1024), est + "down_blocks.0.0.res_conv.weight": (256, 320, 1),
        est + "down_blocks.0.1.3.attn1.to_q.weight": (512, 256),
        est + "down_blocks.0.1.3.attn1.to_out.0.weight": (256, 512),
        est + "down_blocks.0.1.3.ff.net.0.proj.weight": (1024, 256),
        est + "down_blocks.0.1.3.ff.net.2.weight": (256, 1024),
        est + "down_blocks.0.2.conv.weight": (256, 256, 3), est + "down_blocks.1.2.weight": (256, 256, 3),
        est + "mid_blocks.11.1.3.norm3.weight": (256,), est + "up_blocks.0.0.block1.block.0.weight": (256, 512, 3),
        est + "up_blocks.0.2.conv.weight": (256, 256, 4), est + "up_blocks.1.2.weight": (256, 256, 3),
        est + "final_block.block.0.weight": (256, 256, 3), est + "final_proj.weight": (80, 256, 1),
    }
    expected_hift = {
        "m_source.l_linear.weight": (1, 9), "conv_pre.weight_g": (512, 1, 1), "conv_pre.weight_v": (512, 80, 7),
        "ups.0.weight_g": (512, 1, 1), "ups.0.weight_v": (512, 256, 16), "ups.1.weight_v": (256, 128, 16),
        "source_downs.0.weight": (256, 18, 16), "source_downs.1.weight": (128, 18, 1),
        "source_resblocks.0.convs1.0.weight_v": (256, 256, 7), "source_resblocks.1.convs1.2.weight_v": (128, 128, 11),
        "source_resblocks.0.activations1.0.alpha": (256,), "resblocks.5.convs2.2.weight_v": (128, 128, 11),
        "conv_post.weight_v": (18, 128, 7), "f0_predictor.condnet.8.weight_v": (512, 512, 3),
        "f0_predictor.classifier.weight": (1, 512),
    }
    assert {k: flow_shapes.get(k) for k in expected_flow} == expected_flow
    assert {k: hift_shapes.get(k) for k in expected_hift} == expected_hift
    assert "decoder.estimator.mid_blocks.12.0.res_conv.weight" not in flow_shapes
    assert (len(flow_shapes), len(hift_shapes)) == (1185, 227)
    assert sum(math.prod(s) for s in flow_shapes.values()) == 111_166_208
    assert sum(math.prod(s) for s in hift_shapes.values()) == 20_460_591


# --- decoding ---------------------------------------------------------------------------------

def test_decode_length_follows_the_code_count(tokenizer_dir):
    tokenizer = load_media_tokenizer("glm4voice", tokenizer_dir)  # finds decoder/, ignores its README.md
    assert tokenizer.decoder is not None and tokenizer.decoded_sample_rate == 22_050
    g = torch.Generator().manual_seed(1)
    counts = [1, 13, 25, 64]
    waves = tokenizer.decode([torch.randint(0, 16384, (n,), generator=g) for n in counts])
    # n codes -> floor(441 n / 64) mel frames (6, 89, 172, 441) -> x 256 samples at 22,050 Hz
    assert [w.numel() for w in waves] == [256 * (441 * n // 64) for n in counts] == [1536, 22784, 44032, 112896]
    assert [tokenizer.decoder.num_samples(n) for n in counts] == [w.numel() for w in waves]
    for w in waves:
        assert w.dtype == torch.float32 and torch.isfinite(w).all() and w.abs().max() <= 0.99
        assert w.std() > 0
    # codes from the encoder decode too ([b, n] tensors are split into rows)
    codes = tokenizer.encode([torch.randn(16_000) * 0.1])[0]
    assert tokenizer.decode(codes[None])[0].numel() == 256 * (441 * codes.numel() // 64)
    assert tokenizer.decode([torch.zeros(0, dtype=torch.long)])[0].numel() == 0


def test_flow_steps_are_configurable_and_decoding_is_deterministic():
    decoder = small_decoder(steps=2)
    codes = torch.randint(0, 16384, (20,), generator=torch.Generator().manual_seed(2))
    assert decoder.steps == 2 and small_decoder().steps == 10  # the release's default
    one, three = decoder.mel(codes, steps=1), decoder.mel(codes, steps=3)
    assert one.shape == three.shape == (80, 137) and not torch.allclose(one, three)
    assert torch.equal(decoder.mel(codes), decoder.mel(codes, steps=2))
    assert torch.equal(decoder(codes), decoder(codes))


def test_euler_ode_with_guidance_matches_the_closed_form():
    """With a velocity that is the speaker condition (zero in the unconditional pass), Euler over the
    cosine schedule (steps summing to 1) with CFG rate 0.7 lands at noise + 1.7 x speaker."""
    decoder = small_decoder()

    class SpeakerVelocity(torch.nn.Module):
        def forward(self, x, mu, t, spks, cond):
            return spks[:, :, None].expand_as(x)

    flow = decoder.flow
    flow.decoder.estimator = SpeakerVelocity()
    codes = torch.arange(10)
    speaker = flow.spk_embed_affine_layer.bias.detach()  # the released zero x-vector, after the affine layer
    frames = flow.config.mel_frames(10)
    noise = torch.randn((1, 80, frames), generator=torch.Generator().manual_seed(FLOW_SEED))[0]
    for steps in (1, 4, 10):
        assert torch.allclose(decoder.mel(codes, steps), noise + 1.7 * speaker[:, None], atol=1e-5)


# --- loading errors ---------------------------------------------------------------------------

def test_loading_errors_are_one_line_naming_the_keys(tmp_path):
    decoder = small_decoder()
    directory = decoder.save_pretrained(tmp_path / "dec")
    flow_state = torch.load(directory / "flow.pt", weights_only=True)
    hift_state = torch.load(directory / "hift.pt", weights_only=True)

    del flow_state["decoder.estimator.final_proj.bias"]
    torch.save(flow_state, directory / "flow.pt")
    with pytest.raises(CheckpointMismatchError, match=r"flow decoder .* missing keys \(1\): "
                                                      r"decoder\.estimator\.final_proj\.bias") as err:
        Glm4VoiceDecoder.from_pretrained(directory)
    assert "\n" not in str(err.value)
    torch.save(decoder.flow.state_dict(), directory / "flow.pt")

    hift_state["conv_post.weight_v"] = torch.zeros(18, 16, 7)
    torch.save(hift_state, directory / "hift.pt")
    with pytest.raises(CheckpointMismatchError, match=r"HiFT vocoder .* shape mismatches \(1\): "
                                                      r"conv_post\.weight_v \(18, 16, 7\) != \(18, 8, 7\)") as err:
        Glm4VoiceDecoder.from_pretrained(directory)
    assert "\n" not in str(err.value)

    # weight norm saved by torch >= 2.1 (parametrizations) is the same tensors under other names
    renamed = {k.replace(".weight_g", ".parametrizations.weight.original0").replace(
        ".weight_v", ".parametrizations.weight.original1"): v for k, v in decoder.hift.state_dict().items()}
    torch.save(renamed, directory / "hift.pt")
    codes = torch.arange(5)
    assert torch.equal(Glm4VoiceDecoder.from_pretrained(directory)(codes), decoder(codes))

    (directory / "hift.pt").unlink()
    with pytest.raises(FileNotFoundError, match="hift.pt or hift.safetensors"):
        Glm4VoiceDecoder.from_pretrained(directory)
