"""Tests on tiny random models built in-process (no downloads). diffusers, where installed, is the oracle.

    pytest -q test_sd35.py
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import sample
import sd35_lora as sd

ROOT = Path(__file__).parent
torch.set_num_threads(min(4, os.cpu_count() or 1))


#################################################################################
#                   Tiny diffusers pipelines (the oracle side)                  #
#################################################################################

WORDS = ("a the of and with in on at red green blue yellow white black cat dog fox bird boat lake snow sky tree "
         "house photo painting sunset night big small").split()


def _wordlevel(vocab: dict, unk: str, template: str, specials: list):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(s, vocab[s]) for s in specials])
    return tok


def make_tokenizers():
    """CLIP-L pads with EOS, CLIP-G with id 0 ("!"), T5 has <pad>=0, </s>=1: as the real ones."""
    from transformers import PreTrainedTokenizerFast
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    clip_vocab = {t: i for i, t in enumerate(["!", "<|unk|>"] + WORDS + [bos, eos])}
    clip = lambda pad: PreTrainedTokenizerFast(
        tokenizer_object=_wordlevel(clip_vocab, "<|unk|>", f"{bos} $A {eos}", [bos, eos]),
        bos_token=bos, eos_token=eos, unk_token="<|unk|>", pad_token=pad, model_max_length=77)
    t5_vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>"] + WORDS)}
    t5 = PreTrainedTokenizerFast(tokenizer_object=_wordlevel(t5_vocab, "<unk>", "$A </s>", ["</s>"]),
                                 eos_token="</s>", unk_token="<unk>", pad_token="<pad>", model_max_length=512)
    return clip(eos), clip("!"), t5


VARIANTS = {"sd3.5-medium": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)),
            "sd3.5-large": dict(qk_norm="rms_norm", dual_attention_layers=()),
            "sd3-medium": dict(qk_norm=None, dual_attention_layers=())}


@torch.no_grad()
def randomize(module: torch.nn.Module, gen: torch.Generator, gain: float = 1.0):
    """Redraw all weights so no layer is left zero or identity (diffusers zero-inits some)."""
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) * gain / math.sqrt(p[0].numel()))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (0 if name.endswith("bias") else 1))


def make_components(variant: str = "sd3.5-medium", seed: int = 0) -> dict:
    """Tiny StableDiffusion3Pipeline components. Transformer with official proportions (head_dim 64, heads = depth)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    tok_l, tok_g, tok_t5 = make_tokenizers()
    gen = torch.Generator().manual_seed(seed)
    clip = lambda width, tok, act: CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3, num_attention_heads=4,
        projection_dim=width, hidden_act=act, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    parts = dict(
        text_encoder=clip(32, tok_l, "quick_gelu"), text_encoder_2=clip(48, tok_g, "gelu"),
        text_encoder_3=T5EncoderModel(T5Config(vocab_size=len(tok_t5), d_model=96, d_kv=16, d_ff=128, num_layers=2,
                                               num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=0,
                                               eos_token_id=1, decoder_start_token_id=0)).eval(),
        transformer=SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3,
                                          attention_head_dim=64, num_attention_heads=3, caption_projection_dim=192,
                                          joint_attention_dim=96, pooled_projection_dim=80, pos_embed_max_size=16,
                                          **VARIANTS[variant]).eval(),
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 64, 64),
                          down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                          layers_per_block=1, norm_num_groups=32, scaling_factor=1.5305, shift_factor=0.0609,
                          use_quant_conv=False, use_post_quant_conv=False).eval())
    for name, module in parts.items():
        randomize(module, gen, 0.25 if name == "vae" else 1.0)
    return dict(parts, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), tokenizer=tok_l, tokenizer_2=tok_g,
                tokenizer_3=tok_t5)


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """(saved diffusers-layout folder, the diffusers pipeline) for a tiny SD3.5 Medium."""
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusion3Pipeline(**make_components("sd3.5-medium"))
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("tiny_sd35m")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder, pipe


def run_diffusers(pipe, prompts, negative="", seed=0, steps=4, cfg=4.5, height=64, width=64, t5_length=32, **kw):
    out = pipe(prompt=prompts, negative_prompt=[negative] * len(prompts), num_inference_steps=steps,
               guidance_scale=cfg, height=height, width=width, max_sequence_length=t5_length, output_type="np",
               generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))], **kw).images
    return (out * 255).round().astype(np.uint8)


def images_of(paths) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in paths])


def assert_images_close(ours: np.ndarray, ref: np.ndarray, tol: int = 2):
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert ours.shape == ref.shape and diff.max() <= tol, f"max pixel difference {diff.max()} > {tol}"
    assert ref.std() > 10, "reference images are flat: the comparison would prove nothing"


def official_single_file(folder: Path, path: Path):
    """The folder's MMDiT + VAE as an official-style single file (prefixed SAI names)."""
    t_cfg = json.loads((folder / "transformer/config.json").read_text())
    mmdit = sd.mmdit_from_diffusers(load_file(folder / "transformer/diffusion_pytorch_model.safetensors"), t_cfg["num_layers"])
    vae = sd.vae_from_diffusers(load_file(folder / "vae/diffusion_pytorch_model.safetensors"))
    save_file({**{f"model.diffusion_model.{k}": v for k, v in mmdit.items()},
               **{f"first_stage_model.{k}": v.contiguous() for k, v in vae.items()}}, path)


#################################################################################
#                                 Flow matching                                 #
#################################################################################

def test_schedule_values_match_reference():
    torch.testing.assert_close(sd.get_schedule(4, 3.0), torch.tensor([1.0, 0.857692, 0.602151, 0.008929, 0.0]),
                               atol=1e-6, rtol=0)


def test_schedule_matches_diffusers_scheduler():
    diffusers = pytest.importorskip("diffusers")
    for steps, shift in ((4, 3.0), (28, 3.0), (50, 1.0)):
        ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
        ref.set_timesteps(steps)
        torch.testing.assert_close(sd.get_schedule(steps, shift), ref.sigmas.float(), atol=1e-6, rtol=0)


def test_cosine_schedule_is_denser_at_both_ends():
    linear, cosine = sd.get_schedule(20, 1.0, "linear"), sd.get_schedule(20, 1.0, "cosine")
    assert cosine[0] == linear[0] == 1.0 and cosine[-2] == pytest.approx(linear[-2]) and cosine[-1] == 0
    gaps = -(cosine[:-1].diff())
    assert gaps[0] < gaps[9] / 5 and gaps[-1] < gaps[9] / 5 and (gaps > 0).all()
    shifted = sd.get_schedule(20, 3.0, "cosine")[:-1].double()
    unshifted = shifted / (3.0 - 2.0 * shifted)                               # inverse of shift_sigma(., 3)
    fractions = lambda s: (1 - s) / (1 - s[-1])                              # the spacing, whatever the end point
    torch.testing.assert_close(fractions(unshifted), fractions(cosine[:-1].double()), atol=1e-6, rtol=0)


def test_training_sigmas_and_weights_match_diffusers():
    training_utils = pytest.importorskip("diffusers.training_utils")
    from diffusers import FlowMatchEulerDiscreteScheduler
    table = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas
    for scheme in ("logit_normal", "mode", "uniform"):
        cfg = sd.TrainConfig(timestep_sampling=scheme, logit_mean=0.2, logit_std=1.1)
        ours = sd.sample_training_sigmas(64, cfg, 3.0, torch.Generator().manual_seed(5))
        u = training_utils.compute_density_for_timestep_sampling(scheme, 64, 0.2, 1.1, 1.29,
                                                                 generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(ours, table[(u * 1000).long()], atol=1e-6, rtol=0)
    for scheme in ("none", "sigma_sqrt", "cosmap"):
        sigmas = torch.rand(16) * 0.98 + 0.01
        ref = training_utils.compute_loss_weighting_for_sd3(scheme, sigmas)
        torch.testing.assert_close(sd.loss_weight(sigmas, scheme), ref)


def test_dpmpp_2m_converges_at_second_order():
    """For data x0 ~ N(0, a^2) the exact velocity is known and the flow maps x1 to a * x1. Doubling the steps
    must cut DPM++ 2M's error about 4x (second order) and Euler's about 2x; the first steps agree."""
    a = 0.5

    class ExactVelocity(torch.nn.Module):
        def forward(self, x, t, context, y, skip_layers=()):
            s = t[0] / 1000
            x0 = (1 - s) * a * a / ((1 - s) ** 2 * a * a + s * s) * x
            return (x - x0) / s

    x1 = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    cond = (torch.zeros(1, 1, 1), torch.zeros(1, 1))
    error = lambda sampler, n: (sd.denoise(ExactVelocity(), x1, sd.get_schedule(n, 1.0), cond, sampler=sampler)
                                - a * x1).abs().max().item()
    assert error("dpmpp_2m", 32) / error("dpmpp_2m", 64) > 3.5
    assert 1.7 < error("euler", 32) / error("euler", 64) < 2.5
    two = sd.get_schedule(8, 3.0)[:2]
    torch.testing.assert_close(sd.denoise(ExactVelocity(), x1, two, cond, sampler="dpmpp_2m"),
                               sd.denoise(ExactVelocity(), x1, two, cond, sampler="euler"))


#################################################################################
#                          MMDiT: names, configs, math                          #
#################################################################################

def tiny_mmdit(dual=(0,), qk_norm=True, depth=3, seed=0) -> sd.MMDiT:
    torch.manual_seed(seed)
    model = sd.MMDiT(sd.MMDiTConfig(depth=depth, hidden=64, heads=4, context_dim=32, pooled_dim=24,
                                    pos_embed_max_size=16, qk_norm=qk_norm, dual_attention_layers=dual))
    randomize(model, torch.Generator().manual_seed(seed))
    return model.eval()


def mmdit_inputs(batch=2, h=8, w=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, h, w, generator=g), torch.tensor([900.0, 250.0][:batch]),
            torch.randn(batch, 7, 32, generator=g), torch.randn(batch, 24, generator=g))


def test_key_conversion_roundtrip_loses_nothing():
    model = tiny_mmdit(dual=(0, 1))
    official = model.state_dict()
    there = sd.mmdit_to_diffusers(official, 3)
    back = sd.mmdit_from_diffusers(there, 3)
    assert back.keys() == official.keys() and all(torch.equal(back[k], official[k]) for k in official)
    assert sum(v.numel() for v in there.values()) == sum(v.numel() for v in official.values())
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.SD3Transformer2DModel(sample_size=8, num_layers=3, attention_head_dim=16, num_attention_heads=4,
                                              caption_projection_dim=64, joint_attention_dim=32, pooled_projection_dim=24,
                                              pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0, 1))
    assert {k: tuple(v.shape) for k, v in there.items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_official_names_match_diffusers_single_file_converter(variant):
    """diffusers' own official->diffusers converters are the oracle for our names, fusing and swaps."""
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    parts = make_components(variant)
    want = parts["transformer"].state_dict()
    official = sd.mmdit_from_diffusers(want, 3)
    got = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(
        {f"model.diffusion_model.{k}": v for k, v in official.items()})
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    vae = parts["vae"]
    ours = sd.vae_from_diffusers(vae.state_dict())
    got = single_file_utils.convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in ours.items()},
                                                       dict(vae.config))
    want = vae.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k].reshape(want[k].shape), want[k]) for k in want)


REAL_SIZES = {  # the published architectures, as diffusers configures them
    "sd3-medium": dict(num_layers=24, pos_embed_max_size=192, qk_norm=None, dual_attention_layers=()),
    "sd3.5-medium": dict(num_layers=24, pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
    "sd3.5-large": dict(num_layers=38, pos_embed_max_size=192, qk_norm="rms_norm", dual_attention_layers=()),
    "sd3.5-large-turbo": dict(num_layers=38, pos_embed_max_size=192, qk_norm="rms_norm", dual_attention_layers=()),
}


@pytest.mark.parametrize("variant", REAL_SIZES)
def test_config_detection_from_real_size_meta_weights(variant):
    c = REAL_SIZES[variant]
    depth = c["num_layers"]
    expected = sd.MMDiTConfig(depth=depth, hidden=64 * depth, heads=depth, pos_embed_max_size=c["pos_embed_max_size"],
                              qk_norm=c["qk_norm"] is not None, dual_attention_layers=c["dual_attention_layers"])
    with torch.device("meta"):
        ours = sd.MMDiT(expected)
    detected = sd.MMDiTConfig.from_state_dict(ours.state_dict())
    assert detected == expected
    assert detected.variant(f"stabilityai/stable-diffusion-3.5-{variant.split('-', 1)[1]}") == variant
    diffusers = pytest.importorskip("diffusers")
    diff_config = dict(sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64, num_attention_heads=depth,
                       caption_projection_dim=64 * depth, joint_attention_dim=4096, pooled_projection_dim=2048,
                       out_channels=16, **c)
    with torch.device("meta"):
        ref = diffusers.SD3Transformer2DModel(**diff_config)
    assert sd.MMDiTConfig.from_state_dict(sd.mmdit_from_diffusers(ref.state_dict(), depth)) == expected
    assert sd.MMDiTConfig.from_diffusers(diff_config) == expected
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_mmdit_matches_diffusers_transformer(variant, tmp_path):
    pytest.importorskip("diffusers")
    ref = make_components(variant)["transformer"]
    ref.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    ours = sd.load_mmdit(tmp_path)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 10, 6, generator=g), torch.tensor([999.0, 31.5])
    context, pooled = torch.randn(2, 9, 96, generator=g), torch.randn(2, 80, generator=g)
    with torch.no_grad():
        for skip in ((), (1,)):
            expected = ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                           skip_layers=list(skip) or None, return_dict=False)[0]
            torch.testing.assert_close(ours(x, t, context, pooled, skip_layers=skip), expected, atol=1e-4, rtol=1e-4)
            assert expected.abs().mean() > 0.1


def test_vae_matches_diffusers(tmp_path):
    pytest.importorskip("diffusers")
    ref = make_components()["vae"]
    ref.save_pretrained(tmp_path / "vae", safe_serialization=True)
    ours = sd.load_vae(tmp_path)
    images = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(images).latent_dist
        moments = ours.encode_moments(images)
        torch.testing.assert_close(moments, torch.cat([dist.mean, dist.logvar], 1), atol=1e-4, rtol=1e-4)
        ref_latents = (dist.sample(torch.Generator().manual_seed(3)) - 0.0609) * 1.5305
        torch.testing.assert_close(ours.encode(images, torch.Generator().manual_seed(3)), ref_latents, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.decode(ref_latents), ref.decode(ref_latents / 1.5305 + 0.0609).sample,
                                   atol=1e-4, rtol=1e-4)


def test_latent_scale_and_shift_round_trip():
    vae = sd.VAE(sd.VAEConfig(ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, groups=4))
    mean = torch.randn(2, 16, 4, 4)
    moments = torch.cat([mean, torch.full_like(mean, -40.0)], 1)           # variance ~0: the sample is the mean
    latents = vae.latents_from_moments(moments)
    torch.testing.assert_close(latents, (mean - 0.0609) * 1.5305)
    seen = {}
    vae.decoder.forward = lambda z: seen.setdefault("z", z)
    vae.decode(latents)
    torch.testing.assert_close(seen["z"], mean, atol=1e-6, rtol=0)


#################################################################################
#                  End to end against diffusers' SD3 pipeline                   #
#################################################################################

def test_sample_cli_matches_diffusers_pipeline(diffusers_folder, tmp_path):
    folder, pipe = diffusers_folder
    prompts = ["a red fox in the snow", "a blue boat on the lake at sunset"]
    ref = run_diffusers(pipe, prompts, "blurry painting", seed=7, steps=4, cfg=4.5, t5_length=32, height=64, width=48)
    args = ["--prompt", prompts[0], "--prompt", prompts[1], "--negative", "blurry painting", "--seed", "7", "--steps",
            "4", "--cfg", "4.5", "--sampler", "euler", "--slg-scale", "0", "--t5-length", "32", "--height", "64",
            "--width", "48", "--dtype", "fp32", "--device", "cpu"]
    assert_images_close(images_of(sample.main(["--model", str(folder), *args, "--out", str(tmp_path / "a")])), ref)
    official_single_file(folder, tmp_path / "sd3.5_medium_tiny.safetensors")
    paths = sample.main(["--model", str(tmp_path / "sd3.5_medium_tiny.safetensors"), "--text-encoders", str(folder),
                         *args, "--out", str(tmp_path / "b")])
    assert_images_close(images_of(paths), ref)
    params = json.loads(Image.open(paths[1]).text["parameters"])
    assert params["prompt"] == prompts[1] and params["seed"] == 8 and params["steps"] == 4


def test_no_t5_and_skip_layer_guidance_match_diffusers(diffusers_folder):
    from diffusers import StableDiffusion3Pipeline
    folder, pipe = diffusers_folder
    ours = sd.load_pipeline(str(folder), device="cpu", dtype="fp32", t5_length=24, use_t5=False)
    settings = sd.SampleSettings(steps=10, cfg=3.0, sampler="euler", slg_scale=2.8, slg_layers=(1,), width=32, height=32, seed=3)
    no_t5 = StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    no_t5.set_progress_bar_config(disable=True)
    ref = run_diffusers(no_t5, ["a cat"], "dog", seed=3, steps=10, cfg=3.0, t5_length=24, height=32, width=32,
                        skip_guidance_layers=[1], skip_layer_guidance_scale=2.8)
    mine = np.stack([np.asarray(im) for im in sd.generate(ours, ["a cat"], "dog", settings, progress=False)])
    assert_images_close(mine, ref)


def test_loaded_models_are_frozen_and_sampling_keeps_no_graph(diffusers_folder):
    pipe = sd.load_pipeline(str(diffusers_folder[0]), device="cpu", dtype="fp32", t5_length=8)
    modules = [pipe.mmdit, pipe.vae, *pipe.text.modules()]
    assert not any(p.requires_grad for m in modules for p in m.parameters())
    for m in modules:                                  # a fork training them must still sample without a graph
        m.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        sd.generate(pipe, ["a cat"], "ugly", sd.SampleSettings(steps=2, width=32, height=32), progress=False)
    assert not saved, f"{len(saved)} tensors kept for backward while sampling"
    half = sd.load_mmdit(diffusers_folder[0], dtype=torch.bfloat16)            # cast while loading
    pairs = zip(half.state_dict().values(), pipe.mmdit.state_dict().values())
    assert all(a.dtype == torch.bfloat16 and torch.equal(a, b.to(torch.bfloat16)) for a, b in pairs)


def test_generate_is_deterministic_per_seed_and_prompt():
    pipe = sd.tiny_pipeline()
    s = sd.SampleSettings(steps=3, width=32, height=32, seed=5)
    a = [np.asarray(im) for im in sd.generate(pipe, ["red", "blue"], settings=s, progress=False)]
    b = np.asarray(sd.generate(pipe, ["blue"], settings=sd.SampleSettings(steps=3, width=32, height=32, seed=6),
                               progress=False)[0])
    assert np.abs(a[1].astype(int) - b.astype(int)).max() <= 1               # batch position does not matter
    assert np.abs(a[0].astype(int) - a[1].astype(int)).mean() > 1


#################################################################################
#                                      LoRA                                     #
#################################################################################

def lora_model(targets="all", seed=0, dual=(0,)):
    model = tiny_mmdit(dual=dual)
    sd.add_lora(model, rank=4, alpha=8, targets=targets)
    g = torch.Generator().manual_seed(seed)
    for layer in sd.lora_layers(model).values():
        layer.lora_up.weight.data = torch.randn(layer.lora_up.weight.shape, generator=g) * 0.1
    return model


def test_fresh_lora_changes_nothing_and_targets_presets():
    model = tiny_mmdit()
    x = mmdit_inputs()
    with torch.no_grad():
        before = model(*x)
        params = sd.add_lora(model, rank=4, targets="attn")
        after = model(*x)
    assert torch.equal(before, after)
    names = set(sd.lora_layers(model))
    assert "joint_blocks.0.x_block.attn.qkv" in names and "joint_blocks.1.context_block.attn.proj" in names
    assert "joint_blocks.2.context_block.attn.proj" not in names           # the last text block is pre-only
    assert not any("attn2" in n or "mlp" in n for n in names)
    assert all(p.requires_grad for p in params) and sum(p.requires_grad for p in model.parameters()) == len(params)
    everything = tiny_mmdit()
    sd.add_lora(everything, rank=2, targets="all", blocks="0-1")
    names = set(sd.lora_layers(everything))
    assert {"joint_blocks.0.x_block.attn2.qkv", "context_embedder", "final_layer.adaLN_modulation.1"} <= names
    assert not any(n.startswith("joint_blocks.2.") for n in names)


def test_merge_and_unmerge():
    model = lora_model()
    x = mmdit_inputs()
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        unmerged = model(*x)
        sd.set_lora_merged(model, True)
        merged = model(*x)
        sd.set_lora_merged(model, False)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert (merged - base_output(base, x)).abs().max() > 1e-3
    for k, v in base.items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)


def test_lora_forward_is_base_plus_scaled_update_in_each_precision():
    """The fused addmm form equals W x + b + scale * up(down(x)): fp32, bf16 weights without autocast (update in
    fp32, result in bf16) and under bf16 autocast."""
    torch.manual_seed(0)
    layer = sd.LoRALinear(torch.nn.Linear(32, 48), rank=4, alpha=2.0)
    torch.nn.init.normal_(layer.lora_up.weight)
    x = torch.randn(2, 5, 32)
    reference = lambda x: torch.nn.functional.linear(x, layer.weight.float(), layer.bias.float()) + 0.5 * (
        x @ layer.lora_down.weight.T @ layer.lora_up.weight.T)
    torch.testing.assert_close(layer(x), reference(x), atol=1e-5, rtol=1e-5)
    layer.weight.data, layer.bias.data = layer.weight.data.bfloat16(), layer.bias.data.bfloat16()
    xb = x.bfloat16()
    out = layer(xb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(xb.float()), atol=3e-2, rtol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(xb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(xb.float()), atol=6e-2, rtol=2e-2)


def base_output(state, x):
    model = tiny_mmdit()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(*x)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_lora_save_load_roundtrip(fmt, tmp_path):
    trained = lora_model()
    x = mmdit_inputs()
    with torch.no_grad():
        expected = trained(*x)
    sd.save_lora(trained, tmp_path / "l.safetensors", fmt, {"t5_length": 77})
    for merge in (True, False):
        fresh = tiny_mmdit()
        assert sd.load_lora(fresh, tmp_path / "l.safetensors", merge=merge) == len(sd.lora_layers(trained))
        with torch.no_grad():
            torch.testing.assert_close(fresh(*x), expected, atol=1e-5, rtol=1e-5)
    assert sample.lora_text_settings([str(tmp_path / "l.safetensors")]) == {"t5_length": 77, "use_t5": True}


def test_kohya_lora_equals_manual_merge(tmp_path):
    model = tiny_mmdit()
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 64, generator=g), torch.randn(192, 4, generator=g)
    save_file({"lora_unet_joint_blocks_1_x_block_attn_qkv.lora_down.weight": down,
               "lora_unet_joint_blocks_1_x_block_attn_qkv.lora_up.weight": up,
               "lora_unet_joint_blocks_1_x_block_attn_qkv.alpha": torch.tensor(2.0)}, tmp_path / "k.safetensors")
    by_hand = tiny_mmdit()
    by_hand.joint_blocks[1].x_block.attn.qkv.weight.data += up @ down * (2.0 / 4) * 0.7
    sd.load_lora(model, tmp_path / "k.safetensors", scale=0.7)
    x = mmdit_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(*x), by_hand(*x))


def test_separate_qkv_adapters_and_comfyui_prefixes(tmp_path):
    """PEFT-style files train q, k and v with their own A: they must fold into the fused qkv exactly."""
    g = torch.Generator().manual_seed(0)
    tensors, by_hand = {}, tiny_mmdit()
    qkv = by_hand.joint_blocks[0].context_block.attn.qkv.weight.data
    for i, name in enumerate(("add_q_proj", "add_v_proj")):                   # k has no adapter
        a, b = torch.randn(3, 64, generator=g), torch.randn(64, 3, generator=g)
        tensors[f"transformer.transformer_blocks.0.attn.{name}.lora_A.weight"] = a
        tensors[f"transformer.transformer_blocks.0.attn.{name}.lora_B.weight"] = b
        qkv[(0, 128)[i]:(0, 128)[i] + 64] += b @ a
    a, b = torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g)
    tensors["diffusion_model.joint_blocks.1.x_block.attn.proj.lora_down.weight"] = a
    tensors["diffusion_model.joint_blocks.1.x_block.attn.proj.lora_up.weight"] = b
    by_hand.joint_blocks[1].x_block.attn.proj.weight.data += b @ a
    save_file(tensors, tmp_path / "p.safetensors")
    x = mmdit_inputs()
    for merge in (True, False):
        model = tiny_mmdit()
        sd.load_lora(model, tmp_path / "p.safetensors", merge=merge)
        with torch.no_grad():
            torch.testing.assert_close(model(*x), by_hand(*x), atol=1e-5, rtol=1e-5)


def test_lora_loads_in_diffusers_with_same_output(diffusers_folder, tmp_path):
    pytest.importorskip("peft")
    from diffusers import StableDiffusion3Pipeline
    folder, _ = diffusers_folder
    ours = sd.load_mmdit(folder)
    sd.add_lora(ours, rank=4, alpha=2, targets="all")
    g = torch.Generator().manual_seed(1)
    for layer in sd.lora_layers(ours).values():
        layer.lora_up.weight.data = torch.randn(layer.lora_up.weight.shape, generator=g) * 0.2
    sd.save_lora(ours, tmp_path / "lora.safetensors")
    ref = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(tmp_path / "lora.safetensors")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([700.0, 100.0])
    context, pooled = torch.randn(2, 9, 96, generator=g), torch.randn(2, 80, generator=g)
    with torch.no_grad():
        expected = ref.transformer(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                                   timestep=t, return_dict=False)[0]
        got = ours(x, t, context, pooled)
        plain = sd.load_mmdit(folder)(x, t, context, pooled)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-2                                  # the LoRA really does something
    ref_images = run_diffusers(ref, ["a red fox"], "", seed=1, steps=3, t5_length=16)
    paths = sample.main(["--model", str(folder), "--lora", str(tmp_path / "lora.safetensors"), "--prompt", "a red fox",
                         "--seed", "1", "--steps", "3", "--cfg", "4.5", "--sampler", "euler", "--slg-scale", "0",
                         "--t5-length", "16", "--width", "64", "--height", "64", "--out", str(tmp_path / "o")])
    assert_images_close(images_of(paths), ref_images)


def test_peft_lora_with_alpha_metadata_matches_diffusers(tmp_path):
    """A LoRA trained with PEFT (lora_alpha != r, so the scale lives in the metadata), saved by diffusers."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    parts = make_components()
    transformer = parts["transformer"]
    transformer.save_pretrained(tmp_path / "base" / "transformer")
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_k", "add_v_proj", "to_out.0", "norm_out.linear"])
    transformer.add_adapter(config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lora = get_peft_model_state_dict(transformer)
    StableDiffusion3Pipeline.save_lora_weights(tmp_path, transformer_lora_layers=lora,
                                               transformer_lora_adapter_metadata=config.to_dict())
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([600.0])
    context, pooled = torch.randn(1, 9, 96, generator=g), torch.randn(1, 80, generator=g)
    with torch.no_grad():
        expected = transformer(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                               return_dict=False)[0]
    written = tmp_path / "pytorch_lora_weights.safetensors"
    unprefixed = tmp_path / "unprefixed.safetensors"
    save_file({k.removeprefix("transformer."): v for k, v in load_file(written).items()}, unprefixed,
              sd.read_safetensors(written, with_metadata=True)[1])
    for path in (written, unprefixed):
        ours = sd.load_mmdit(tmp_path / "base")
        sd.load_lora(ours, path)
        with torch.no_grad():
            torch.testing.assert_close(ours(x, t, context, pooled), expected, atol=1e-4, rtol=1e-4)
    save_file({"lora_unet_joint_blocks_0_x_block_attn_proj.dora_scale": torch.ones(1, 192)}, tmp_path / "dora.safetensors")
    with pytest.raises(sd.UserError, match="DoRA"):
        sd.load_lora(ours, tmp_path / "dora.safetensors")


def test_bad_lora_files_are_clear_errors_and_change_nothing(tmp_path):
    model = tiny_mmdit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_file({"input_blocks.0.0.weight": torch.zeros(2, 2)}, tmp_path / "unet.safetensors")
    with pytest.raises(sd.UserError, match="not a LoRA.*UNet"):
        sd.load_lora(model, tmp_path / "unet.safetensors")
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 2432),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(2432, 4)}, tmp_path / "large.safetensors")
    with pytest.raises(sd.UserError, match=r"attn\.qkv' takes \(64 -> 64\).*down \(4, 2432\)"):
        sd.load_lora(model, tmp_path / "large.safetensors")
    save_file({"transformer.transformer_blocks.9.attn.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer.transformer_blocks.9.attn.to_q.lora_B.weight": torch.zeros(64, 4)}, tmp_path / "deep.safetensors")
    with pytest.raises(sd.UserError, match="matches no layer.*transformer_blocks.9"):
        sd.load_lora(model, tmp_path / "deep.safetensors")
    save_file({"lora_unet_joint_blocks_0_x_block_attn_proj.lora_down.weight": torch.zeros(4, 64),
               "lora_unet_joint_blocks_0_x_block_attn_proj.lora_up.weight": torch.zeros(64, 8)}, tmp_path / "rank.safetensors")
    with pytest.raises(sd.UserError, match="rank mismatch.*attn_proj"):
        sd.load_lora(model, tmp_path / "rank.safetensors")
    good = tmp_path / "good.safetensors"
    sd.save_lora(lora_model(), good)
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-100])
    with pytest.raises(sd.UserError, match="truncated"):
        sd.load_lora(model, tmp_path / "cut.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not sd.lora_layers(model)


#################################################################################
#                            Loading and user errors                            #
#################################################################################

def run_cli(*args, cwd=None, **env):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd or ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=600)


def test_sample_cli_tiny_and_user_errors(tmp_path, diffusers_folder):
    folder, _ = diffusers_folder
    ok = run_cli("sample.py", "--model", "tiny", "--prompt", "a cat", "--width", "32", "--height", "48", "--out", str(tmp_path))
    assert ok.returncode == 0 and Image.open(tmp_path / "sample_00.png").size == (32, 48), ok.stderr
    save_file({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(2)}, tmp_path / "flux.safetensors")
    save_file({"model.diffusion_model.x_embedder.proj.weight": torch.zeros(64, 16, 2, 2)}, tmp_path / "partial.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((folder / "vae/diffusion_pytorch_model.safetensors").read_bytes()[:1000])
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer_3"):
        (no_tok / name).symlink_to(folder / name)
    cases = {
        ("--model", str(tmp_path / "missing")): "model not found",
        ("--model", str(tmp_path / "flux.safetensors")): "not an SD3.*FLUX",
        ("--model", str(tmp_path / "cut.safetensors")): "truncated",
        ("--model", str(tmp_path / "partial.safetensors")): "incomplete SD3 MMDiT weights",
        ("--model", str(no_tok)): "lacks tokenizer, tokenizer_2",
        ("--model", "tiny", "--width", "100"): "multiples of 16",
        ("--model", "tiny", "--width", "4096"): "too large",
        ("--model", "stabilityai/stable-diffusion-3.5-medium"): "could not download.*(network|licence)",
        ("--model", str(folder / "transformer" / "diffusion_pytorch_model.safetensors")): "--text-encoders",
    }
    for args, message in cases.items():
        r = run_cli("sample.py", *args, "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "x"))
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and __import__("re").search(message, last), last
    r = run_cli("sample.py", "--model", "tiny", "--prompt", "x", "--sampler", "heun")
    assert r.returncode == 2 and "invalid choice: 'heun'" in r.stderr
    with pytest.raises(sd.UserError, match="unknown sampler 'heun'"):
        sd.SampleSettings(sampler="heun", steps=1).resolved("sd3.5-large")
    with pytest.raises(sd.UserError, match="without layers.*--slg-layers"):
        sd.SampleSettings(slg_scale=2.5).resolved("sd3.5-large")
    with pytest.raises(sd.UserError, match="shift above 0"):
        sd.SampleSettings(shift=0.0).resolved("sd3.5-large")


#################################################################################
#                                   Training                                    #
#################################################################################

def make_dataset(folder: Path):
    """The demo dataset (red stripes, blue disc) plus a broken file that must be skipped."""
    sd.write_demo_dataset(folder)
    (folder / "broken.jpg").write_bytes(b"not an image")


def tiny_config(tmp_path, **sets) -> sd.Config:
    base = {"model": "tiny", "dtype": "fp32", "device": "cpu", "t5_length": 16, "output_dir": str(tmp_path / "run"),
            "dataset.path": str(tmp_path / "data"), "dataset.resolution": 64, "dataset.cache_dir": str(tmp_path / "cache"),
            "dataset.caption_dropout": 0.0, "lora.rank": 8, "lora.targets": "all", "train.lr": 3e-3,
            "train.warmup_steps": 0, "train.steps": 40, "train.save_every": 20, "train.timestep_sampling": "uniform",
            "train.gradient_checkpointing": True, "sample.sample_every": 20, "sample.sample_steps": 3,
            "sample.width": 32, "sample.height": 32, "sample.prompts": ["red stripes", "blue disc"]}
    base.update(sets)
    return sd.load_config(None, [f"{k}={json.dumps(v)}" for k, v in base.items()])


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_training_end_to_end_overfits_and_writes_outputs(tmp_path):
    make_dataset(tmp_path / "data")
    lora = sd.train(tiny_config(tmp_path, **{"train.steps": 60, "train.lr": 1e-2, "lora.rank": 16, "sample.sample_every": 30}))
    run = tmp_path / "run"
    loss = losses(run)     # the 3-block random model learns slowly even fully fine-tuned: ~20% in 60 steps
    assert len(loss) == 60 and np.mean(loss[-10:]) < 0.88 * np.mean(loss[:10]), loss
    for step in (0, 30, 60):
        for i in (0, 1):
            assert (run / f"samples_step_{step:06d}" / f"step_{step:06d}_sample_{i:02d}.png").is_file()
    for name in ("lora_step_000020.safetensors", "lora_step_000060.safetensors", "lora.safetensors",
                 "training_state.safetensors", "loss.png", "log.jsonl"):
        assert (run / name).is_file(), name
    meta = json.loads(sd.read_safetensors(lora, with_metadata=True)[1]["sd35_lora"])
    assert meta["t5_length"] == 16 and meta["variant"] == "sd3.5-medium" and meta["rank"] == 16
    common = ["--model", "tiny", "--prompt", "red stripes", "--width", "32", "--height", "32", "--steps", "3"]
    plain = images_of(sample.main([*common, "--out", str(tmp_path / "plain")]))
    tuned = images_of(sample.main([*common, "--lora", str(lora), "--out", str(tmp_path / "tuned")]))
    assert np.abs(plain.astype(int) - tuned.astype(int)).mean() > 2
    with pytest.raises(sd.UserError, match="already holds files.*--resume"):
        sd.train(tiny_config(tmp_path))


def test_resume_reproduces_uninterrupted_losses(tmp_path):
    make_dataset(tmp_path / "data")
    shared = {"train.save_every": 6, "sample.sample_every": 0, "lora.dropout": 0.1, "dataset.flip": True,
              "dataset.caption_dropout": 0.3, "train.batch_size": 2, "train.grad_accum": 2}
    sd.train(tiny_config(tmp_path, **shared, **{"train.steps": 12, "output_dir": str(tmp_path / "full")}))
    sd.train(tiny_config(tmp_path, **shared, **{"train.steps": 6, "output_dir": str(tmp_path / "half")}))
    sd.train(tiny_config(tmp_path, **shared, **{"train.steps": 12, "output_dir": str(tmp_path / "half")}), resume=True)
    assert losses(tmp_path / "half") == losses(tmp_path / "full")


def test_fresh_runs_with_the_same_seed_are_identical(tmp_path, monkeypatch):
    make_dataset(tmp_path / "data")
    real_load, disturbance = sd.load_pipeline, iter([1, 2])

    def load_then_disturb(*args, **kwargs):           # real weights leave the global RNG in any state
        pipe = real_load(*args, **kwargs)
        torch.manual_seed(next(disturbance))
        return pipe
    monkeypatch.setattr(sd, "load_pipeline", load_then_disturb)
    for run in ("first", "second"):
        sd.train(tiny_config(tmp_path, **{"train.steps": 4, "sample.sample_every": 0, "lora.dropout": 0.1,
                                          "output_dir": str(tmp_path / run)}))
    assert losses(tmp_path / "first") == losses(tmp_path / "second")


def test_interrupt_saves_and_nan_stops_without_overwriting(tmp_path, monkeypatch):
    make_dataset(tmp_path / "data")
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def interrupt_on_fourth(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", interrupt_on_fourth)
    with pytest.raises(SystemExit):
        sd.train(tiny_config(tmp_path, **{"sample.sample_every": 0}))
    run = tmp_path / "run"
    assert (run / "lora_step_000003.safetensors").is_file()
    assert sd.read_safetensors(run / "training_state.safetensors", with_metadata=True)[1]["step"] == "3"
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    real_loss = sd.flow_matching_loss

    def diverge_at_step_6(*args):
        loss, per_sample, sigmas = real_loss(*args)
        return (loss * float("nan") if len(losses(run)) == 5 else loss), per_sample, sigmas
    monkeypatch.setattr(sd, "flow_matching_loss", diverge_at_step_6)
    with pytest.raises(sd.UserError, match=r"loss became nan \(gradient norm nan\) at step 6"):
        sd.train(tiny_config(tmp_path, **{"sample.sample_every": 0, "train.save_every": 4}), resume=True)
    assert (run / "lora_step_000004.safetensors").is_file() and not (run / "lora_step_000006.safetensors").exists()
    latest, last_good = (sd.read_safetensors(run / f, with_metadata=True) for f in ("lora.safetensors", "lora_step_000004.safetensors"))
    assert latest[1] == last_good[1] and all(torch.equal(v, last_good[0][k]) for k, v in latest[0].items())
    assert sd.read_safetensors(run / "training_state.safetensors", with_metadata=True)[1]["step"] == "4"


def test_compiled_blocks_train_and_sample_like_eager(tmp_path):
    make_dataset(tmp_path / "data")
    runs = {}
    for label, compiled in (("eager", False), ("compiled", True)):
        runs[label] = tmp_path / label
        sd.train(tiny_config(tmp_path, **{"train.steps": 2, "sample.sample_every": 0, "train.compile": compiled,
                                          "output_dir": str(runs[label])}))
    np.testing.assert_allclose(losses(runs["compiled"]), losses(runs["eager"]), rtol=1e-4)
    image = lambda run: np.asarray(Image.open(run / "samples_step_000002/step_000002_sample_00.png"), dtype=int)
    assert np.abs(image(runs["compiled"]) - image(runs["eager"])).max() <= 1


def test_config_errors_name_the_key(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lrr: 1e-4\n")
    with pytest.raises(sd.UserError, match=r"unknown config key 'train.lrr' \(did you mean 'train.lr'\?\)"):
        sd.load_config(str(tmp_path / "c.yaml"))
    with pytest.raises(sd.UserError, match="must be a whole number"):
        sd.load_config(None, ["train.steps=1.5"])
    assert sd.load_config(None, ["train.lr=5e-5", "sample.prompts=[a, b]"]).train.lr == 5e-5
    shipped = sd.load_config(str(ROOT / "config.yaml"))
    assert shipped.sample.prompts and shipped.t5_length == sd.T5_LENGTH
    r = run_cli("sd35_lora.py", str(tmp_path / "c.yaml"))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: unknown config key")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(sd.UserError, match="no usable images"):
        sd.scan_dataset(sd.DatasetConfig(path=str(empty)))


def test_tiny_command_from_readme_runs(tmp_path):
    r = run_cli(str(ROOT / "sd35_lora.py"), str(ROOT / "config.yaml"), "--tiny", "--set", "train.steps=2",
                "--set", "sample.sample_every=0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    run = next((tmp_path / "runs").glob("tiny_2*"))
    assert (run / "lora.safetensors").is_file() and (run / "samples_step_000002/step_000002_sample_01.png").is_file()


def test_latent_cache_is_reused_invalidated_by_edits_and_repaired(tmp_path, capsys):
    sd.write_demo_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, **{"dataset.flip": True})
    pipe = sd.tiny_pipeline(t5_length=16)
    build = lambda: sd.LatentDataset(sd.scan_dataset(cfg.dataset), pipe, cfg, cfg.model)
    first = build()
    files = lambda: sorted((tmp_path / "cache").rglob("*.safetensors"))
    stamps = {f: f.stat().st_mtime_ns for f in files()}
    assert len(stamps) == 2 + 3                                 # two images; two captions + the empty one
    assert {f: f.stat().st_mtime_ns for f in files()} == stamps and build().latent_files == first.latent_files
    Image.new("RGB", (64, 64), (0, 200, 0)).save(tmp_path / "data" / "blue_disc.png")     # edited image
    edited = build()
    assert edited.latent_files[0] not in first.latent_files and len(files()) == 6
    edited.latent_files[1].write_bytes(b"truncated")           # a damaged cache file is rebuilt, not fatal
    repaired = build()
    assert "rebuilding unreadable cache file" in capsys.readouterr().err
    latents, context, pooled = repaired.get([0, 1], pipe.vae, cfg, torch.Generator().manual_seed(0))
    assert latents.shape == (2, 16, 8, 8) and context.shape == (2, 77 + 16, 64) and pooled.shape == (2, 80)


def test_exif_rotated_photo_gets_a_portrait_bucket(tmp_path):
    image = Image.new("RGB", (128, 64), (200, 30, 30))
    exif = image.getexif()
    exif[274] = 6                                                            # stored landscape, shown portrait
    image.save(tmp_path / "phone.jpg", exif=exif)
    (item,) = sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path), resolution=256))
    width, height = item["size"]
    assert height > width and sd.load_image(item["path"], item["size"]).shape == (3, height, width)


def test_bf16_autocast_training_step_runs(tmp_path):
    make_dataset(tmp_path / "data")
    sd.train(tiny_config(tmp_path, **{"dtype": "bf16", "train.steps": 2, "sample.sample_every": 0}))
    assert all(math.isfinite(v) for v in losses(tmp_path / "run"))
    with pytest.raises(sd.UserError, match="fp16 is not supported for training"):
        tiny_config(tmp_path, dtype="fp16")


def test_gpu_benchmark_script_runs_at_smoke_size(tmp_path):
    """.ci/bench_gpu.py is run by a session that holds a GPU for minutes: keep it working between such sessions."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    r = run_cli(".ci/bench_gpu.py", "--smoke", "pipeline", "train", OUT=str(tmp_path))
    results = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert r.returncode == 0 and "error" not in json.dumps(results), (r.stderr[-2000:], results)
    assert set(results["pipeline"]) == {"budget_gib", "large_t5_offload", "large_no_t5_resident"}
    assert all(results["train"][size]["ratio_sd35_lora_vs_diffusers_peft"] > 0 for size in ("medium", "large"))
    assert results["train"]["medium"]["sd35_lora_compiled_step_s"] > 0
