"""Tests on tiny random models built in-process (no downloads). diffusers, where installed, is the oracle.

    pytest -q test_sd35.py
"""
import collections
import cProfile
import dataclasses
import errno
import gc
import hashlib
import io
import json
import math
import ntpath
import os
import pstats
import re
import shutil
import signal
import socket
import subprocess
import struct
import sys
import time
import tracemalloc
import types
import typing
import warnings
import weakref
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps
from safetensors.torch import load_file, save_file

import sample
import sd35_lora as sd

ROOT = Path(__file__).parent
# a script's `pytest ... &` (a CI step run in the background) starts with Ctrl-C ignored, and train() and the CLIs
# keep it so, by design: the tests that send themselves SIGINT need it delivered (7 of them failed there)
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
torch.set_num_threads(min(4, os.cpu_count() or 1))
try:                                    # safetensors before 0.7 cannot write complex tensors: those refusals
    COMPLEX_FILES = bool(__import__("safetensors.torch").torch.save({"c": torch.zeros(1, dtype=torch.complex64)}))
except KeyError:                        # go untested there (it cannot read such a file either)
    COMPLEX_FILES = False


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


def assert_images_close(ours: np.ndarray, ref: np.ndarray, tol: int = 1):
    """Within `tol` levels of 255: 1 is rounding (fp32 runs differ by ~1e-6); a velocity 1 % off shows as 2."""
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
    for steps, shift in ((1, 3.0), (2, 3.0), (3, 3.0), (4, 3.0), (7, 6.0), (28, 3.0), (50, 1.0)):
        ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
        ref.set_timesteps(steps)
        torch.testing.assert_close(sd.get_schedule(steps, shift), ref.sigmas.float(), atol=1e-6, rtol=0)
        assert torch.equal(sd.get_schedule(steps, shift), ref.sigmas.float())    # both in fp64, rounded once


def test_a_shift_too_small_or_large_for_the_sigmas_is_refused():
    """1 + (shift - 1) * sigma rounds to 0 at sigma 1 at shift 2^-25 or less in fp32 (2^-54 in fp64): the
    first sigma was inf, sampling gave NaN blamed on the cfg/LoRA scale, a training step NaN blamed on
    train.lr."""
    assert not torch.isfinite(sd.shift_sigma(torch.ones(1), 1e-8)).all()           # what the bound prevents
    for shift in (1e-17, 1e-8, 1e4):
        one_line_error(lambda: sd.SampleSettings(shift=shift).resolved("sd3.5-medium"), "shift in 0.001..1000")
    assert sd.SampleSettings(shift=1e-3).resolved("sd3.5-medium").shift == 1e-3


def test_more_steps_than_float32_has_noise_levels_is_a_one_line_error(tmp_path):
    """--steps 100000000000 ended in a bare allocation error ('can't allocate memory: you tried to allocate
    800000000000 bytes') building the schedule. float32 holds 1,065,353,216 values in (0, 1] (1.0's bits): a
    schedule of more steps repeats noise levels, steps that do nothing."""
    assert torch.tensor(1.0).view(torch.int32).item() == sd.MAX_STEPS == 1_065_353_216
    assert sd.SampleSettings(steps=sd.MAX_STEPS).resolved("sd3.5-medium").steps == sd.MAX_STEPS
    for steps in (sd.MAX_STEPS + 1, 10**11):
        one_line_error(lambda: sd.SampleSettings(steps=steps).resolved("sd3.5-medium"),
                       f"steps must be in 1..1065353216, .*got {steps} steps")
    one_line_error(lambda: sample.main(["--model", "tiny", "--prompt", "a", "--steps", "100000000000", "--width", "32",
                                        "--height", "32", "--out", str(tmp_path)]), "steps must be in 1..1065353216")
    one_line_error(lambda: sd.load_config(None, ["sample.sample_steps=1e11"]),     # before the models load
                   "'sample.sample_steps' must be in 0..1065353216, got 100000000000")


def test_cosine_schedule_is_denser_at_both_ends():
    linear, cosine = sd.get_schedule(20, 1.0, "linear"), sd.get_schedule(20, 1.0, "cosine")
    assert cosine[0] == linear[0] == 1.0 and cosine[-2] == pytest.approx(linear[-2]) and cosine[-1] == 0
    gaps = -(cosine[:-1].diff())
    assert gaps[0] < gaps[9] / 5 and gaps[-1] < gaps[9] / 5 and (gaps > 0).all()
    shifted = sd.get_schedule(20, 3.0, "cosine")[:-1].double()
    unshifted = shifted / (3.0 - 2.0 * shifted)                               # inverse of shift_sigma(., 3)
    fractions = lambda s: (1 - s) / (1 - s[-1])                              # the spacing, whatever the end point
    torch.testing.assert_close(fractions(unshifted), fractions(cosine[:-1].double()), atol=1e-6, rtol=0)


def test_generate_samples_on_the_schedule_its_settings_name(monkeypatch):
    """SampleSettings.schedule reaches denoise(): the cosine sigmas at the settings' shift, not the linear ones
    (sample.py's --schedule passes through generate(), so comparing the two never saw it dropped there)."""
    pipe, seen, real = sd.tiny_pipeline(), [], sd.denoise
    monkeypatch.setattr(sd, "denoise", lambda model, x, sigmas, *a: seen.append(sigmas) or real(model, x, sigmas, *a))
    # 4 steps: at 3 the cosine spacing (0, 1/2, 1) is the linear one
    s = sd.SampleSettings(steps=4, cfg=1.0, shift=2.0, schedule="cosine", width=32, height=32)
    sd.generate(pipe, ["red"], settings=s, progress=False)
    assert len(seen) == 1 and torch.equal(seen[0], sd.get_schedule(4, 2.0, "cosine"))


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


def test_mode_sampling_takes_train_mode_scale_as_diffusers_does():
    training_utils = pytest.importorskip("diffusers.training_utils")
    table = pytest.importorskip("diffusers").FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas
    for scale in (-0.5, 0.8):
        cfg = sd.TrainConfig(timestep_sampling="mode", mode_scale=scale)
        ours = sd.sample_training_sigmas(64, cfg, 3.0, torch.Generator().manual_seed(5))
        u = training_utils.compute_density_for_timestep_sampling("mode", 64, mode_scale=scale,
                                                                 generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(ours, table[(u * 1000).long()], atol=1e-6, rtol=0)


def test_flow_matching_loss_is_the_weighted_velocity_mse_at_the_drawn_sigmas():
    """x_t = (1 - s) x0 + s noise at t = 1000 s, target noise - x0, weighted, summed over the slice `keep` and
    divided by the whole batch's n; sigmas, then noise, drawn from g for all n (as resume reproduces them)."""
    seen = []

    def velocity(x, t, context, pooled):       # any mix-up of x_t, t or the conditioning shows in the loss
        seen.append((x, t))
        return 0.5 * x + (t / 1000 + context.mean((1, 2)) + pooled[:, 0]).view(-1, 1, 1, 1)
    gen = torch.Generator().manual_seed(1)
    x0, context, pooled = (torch.randn(shape, generator=gen) for shape in ((4, 16, 4, 6), (4, 5, 8), (4, 6)))
    for weighting in sd.WEIGHTINGS:
        cfg = sd.TrainConfig(timestep_sampling="uniform", weighting=weighting)
        for keep in (slice(None), slice(1, 3)):
            seen.clear()
            loss, per_sample, sigmas = sd.flow_matching_loss(velocity, x0[keep], context[keep], pooled[keep], cfg,
                                                             2.0, torch.Generator().manual_seed(7), None, keep, 4)
            g = torch.Generator().manual_seed(7)
            s = sd.sample_training_sigmas(4, cfg, 2.0, g)[keep]
            noise = torch.randn(x0.shape, generator=g)[keep]
            x_t = (1 - s.view(-1, 1, 1, 1)) * x0[keep] + s.view(-1, 1, 1, 1) * noise
            v = velocity(x_t, 1000 * s, context[keep], pooled[keep])
            mse = ((v - (noise - x0[keep])) ** 2).mean((1, 2, 3))
            weight = {"none": torch.ones_like(s), "sigma_sqrt": 1 / s ** 2,
                      "cosmap": 2 / (math.pi * (1 - 2 * s + 2 * s * s))}[weighting]
            torch.testing.assert_close(seen[0][0], x_t)
            torch.testing.assert_close(seen[0][1], 1000 * s)
            torch.testing.assert_close(sigmas, s)
            torch.testing.assert_close(per_sample, mse)
            torch.testing.assert_close(loss, (weight * mse).sum() / 4)


def test_the_training_draws_are_the_generators_whatever_the_callers_default_device():
    """A fork's own loop under torch.set_default_device("cuda") drew the uniform and mode sigmas, the loss's noise
    and the VAE's posterior sample on that device with its CPU generator: torch refuses that ("meta" stands in
    for it here, as for the initial noise)."""
    velocity = lambda x, t, context, pooled: 0.5 * x
    x0, context, pooled = torch.ones(2, 16, 4, 4), torch.ones(2, 5, 8), torch.ones(2, 6)
    vae, moments = sd.VAE(sd.VAEConfig(ch=8, ch_mult=(1, 2), groups=4)), torch.zeros(1, 32, 2, 2)
    for scheme in sd.TIMESTEP_SAMPLINGS:
        cfg = sd.TrainConfig(timestep_sampling=scheme)
        seeded = lambda: torch.Generator().manual_seed(0)
        draws = lambda: (*sd.flow_matching_loss(velocity, x0, context, pooled, cfg, 3.0, seeded(), None),
                         vae.latents_from_moments(moments, seeded()))
        expected = draws()
        with torch.device("meta"):
            drawn = draws()
        for got, want in zip(drawn, expected):
            assert got.device.type == "cpu" and torch.equal(got, want), scheme


def test_a_draw_of_u_1_trains_at_the_tables_last_sigma_not_at_0():
    """u = 1 (a sigmoid that rounds up, mode's draw of 0) indexes row 1000 of the 1000-row table, past its end
    (diffusers: an IndexError): it takes the last row, sigma shift(1/1000); sigma 0 is a noiseless sample whose
    sigma_sqrt weight is inf."""
    table = pytest.importorskip("diffusers").FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas
    cfg = sd.TrainConfig(logit_mean=50.0, logit_std=1.0)          # sigmoid(50 + N(0, 1)) is 1.0 in fp32
    sigmas = sd.sample_training_sigmas(8, cfg, 3.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(sigmas, table[-1].expand(8), atol=1e-7, rtol=0)
    assert sd.loss_weight(sigmas, "sigma_sqrt").isfinite().all()


def test_a_draw_of_u_below_1_in_1000_trains_at_sigma_1_the_tables_first_row():
    """u in [0, 0.001) (a sigmoid of a very negative draw, 1 in 1000 uniform draws) is row 0 of the 1000-row
    table, sigma 1 (pure noise) as diffusers indexes it, not row 1."""
    table = pytest.importorskip("diffusers").FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas
    cfg = sd.TrainConfig(logit_mean=-50.0, logit_std=1.0)         # sigmoid(-50 + N(0, 1)) is below 1e-20
    sigmas = sd.sample_training_sigmas(8, cfg, 3.0, torch.Generator().manual_seed(0))
    assert table[0] == 1.0 and sigmas.tolist() == [1.0] * 8


def test_lr_warmup_then_constant_or_cosine_as_diffusers():
    optimization = pytest.importorskip("diffusers.optimization")
    cfg = sd.TrainConfig(lr=1e-3, warmup_steps=4, steps=20, lr_schedule="cosine")
    # warmup starts at lr / warmup, not 0 (diffusers' lambda gives the first step lr 0)
    assert [sd.get_lr(step, cfg) for step in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    params = [torch.zeros(1, requires_grad=True)]
    cosine = optimization.get_cosine_schedule_with_warmup(torch.optim.SGD(params, lr=1e-3), 4, 20)
    ours = [sd.get_lr(step, cfg) for step in range(4, 21)]
    assert ours == pytest.approx([1e-3 * cosine.lr_lambdas[0](step) for step in range(4, 21)], abs=1e-12)
    assert ours[0] == 1e-3 and ours[-1] == pytest.approx(0, abs=1e-12)
    constant = dataclasses.replace(cfg, lr_schedule="constant")
    assert [sd.get_lr(step, constant) for step in (3, 4, 19, 500)] == [1e-3] * 4
    with pytest.raises(sd.UserError, match="unknown lr_schedule 'cosin': use one of constant, cosine"):
        sd.get_lr(5, dataclasses.replace(cfg, lr_schedule="cosin"))



def test_a_training_step_is_diffusers_dreambooth_sd3_step_with_precondition_outputs_0(tmp_path):
    """README, Training: train_dreambooth_lora_sd3.py's step (u by compute_density_for_timestep_sampling, its
    scheduler's timesteps and sigmas, PEFT LoRA on to_out.0/to_add_out, compute_loss_weighting_for_sd3, the mean
    over pixels then samples) on the same weights and draws gives flow_matching_loss's loss and LoRA gradients."""
    diffusers = pytest.importorskip("diffusers")
    training_utils, peft = pytest.importorskip("diffusers.training_utils"), pytest.importorskip("peft")
    ref = diffusers.SD3Transformer2DModel(
        sample_size=8, num_layers=3, attention_head_dim=16, num_attention_heads=4, caption_projection_dim=64,
        joint_attention_dim=32, pooled_projection_dim=24, pos_embed_max_size=16, qk_norm="rms_norm",
        dual_attention_layers=(0,))
    randomize(ref, torch.Generator().manual_seed(0))
    ref.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    ours = sd.load_mmdit(tmp_path).train()
    sd.add_lora(ours, rank=4, targets=r"attn\.proj$")
    ref.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["attn.to_out.0", "attn.to_add_out"]))
    pairs = []                                          # (ours, PEFT's) down and up weights, made equal
    with torch.no_grad():
        for name, layer in sd.lora_layers(ours).items():
            stream = "to_out.0" if ".x_block." in name else "to_add_out"
            theirs = ref.get_submodule(f"transformer_blocks.{name.split('.')[1]}.attn.{stream}")
            layer.lora_up.weight.normal_(0, 0.05)   # non-zero: the down weights get gradients too
            for mine, peft_weight in ((layer.lora_down, theirs.lora_A), (layer.lora_up, theirs.lora_B)):
                peft_weight["default"].weight.copy_(mine.weight)
                pairs.append((mine.weight, peft_weight["default"].weight))
    assert len(pairs) == 10 == sum(p.requires_grad for p in ref.parameters())
    scheduler, gen = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), torch.Generator().manual_seed(2)
    x0, context, pooled = (torch.randn(shape, generator=gen) for shape in ((3, 16, 8, 6), (3, 7, 32), (3, 24)))
    for sampling, weighting in (("logit_normal", "none"), ("mode", "cosmap"), ("uniform", "sigma_sqrt")):
        cfg = sd.TrainConfig(timestep_sampling=sampling, weighting=weighting)
        draws = torch.Generator().manual_seed(7)
        loss, _, sigmas = sd.flow_matching_loss(ours, x0, context, pooled, cfg, 3.0, draws, None)
        loss.backward()
        g = torch.Generator().manual_seed(7)                        # u, then the noise, as ours draws them
        u = training_utils.compute_density_for_timestep_sampling(sampling, 3, 0.0, 1.0, 1.29, generator=g)
        timesteps = scheduler.timesteps[(u * 1000).long()]
        s = scheduler.sigmas[[(scheduler.timesteps == t).nonzero().item() for t in timesteps]].view(-1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=g)
        pred = ref(hidden_states=(1 - s) * x0 + s * noise, timestep=timesteps, encoder_hidden_states=context,
                   pooled_projections=pooled, return_dict=False)[0]
        weight = training_utils.compute_loss_weighting_for_sd3(weighting, s)
        expected = (weight * (pred - (noise - x0)) ** 2).reshape(3, -1).mean(1).mean()
        expected.backward()
        assert torch.equal(sigmas, s.flatten()), sampling
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
        for mine, theirs in pairs:
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-7)
            mine.grad, theirs.grad = None, None

def test_a_mistyped_option_never_runs_another_algorithm(tmp_path):
    model = tiny_mmdit()
    sd.add_lora(model, rank=2)
    x, t, context, pooled = mmdit_inputs(batch=1)
    calls = {
        "unknown timestep_sampling 'logit-normal'": lambda: sd.sample_training_sigmas(
            2, sd.TrainConfig(timestep_sampling="logit-normal"), 3.0, torch.Generator()),
        "unknown weighting 'sigma-sqrt'": lambda: sd.loss_weight(torch.ones(2), "sigma-sqrt"),
        "unknown schedule 'cosin'": lambda: sd.get_schedule(4, 3.0, "cosin"),
        "unknown sampler 'heun'": lambda: sd.denoise(model, x, sd.get_schedule(2, 3.0), (context, pooled),
                                                     sampler="heun"),
        "unknown LoRA format 'comfyui'": lambda: sd.save_lora(model, tmp_path / "l.safetensors", "comfyui"),
        "unknown dtype 'float16': use one of fp32, bf16": lambda: sd.load_pipeline("tiny", dtype="float16"),
        "unknown variant 'sd3.5-larg'": lambda: sd.load_pipeline("tiny", variant="sd3.5-larg"),
    }
    for message, call in calls.items():
        one_line_error(call, message)
    assert not list(tmp_path.iterdir())


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
    # fp32 sigmas repeat at very many steps (cosine's ends) or a huge shift: a step of 0, no ZeroDivisionError
    many, stuck = sd.get_schedule(10000, 3.0, "cosine"), sd.get_schedule(4, 1e30)
    assert (many[1:] == many[:-1]).any() and (stuck[1:-1] == 1).all()
    assert (sd.denoise(ExactVelocity(), x1, many, cond, sampler="dpmpp_2m") - a * x1).abs().max() < 1e-3
    torch.testing.assert_close(sd.denoise(ExactVelocity(), x1, stuck, cond, sampler="dpmpp_2m"),
                               sd.denoise(ExactVelocity(), x1, stuck, cond, sampler="euler"))


def test_dpmpp_2m_takes_k_diffusions_steps_with_cfg():
    """denoise(sampler="dpmpp_2m") against k-diffusion's sample_dpmpp_2m written out (t = -log sigma, the
    second-order correction from the step before, the last step to the x0 estimate), on a velocity that is not
    linear in x, with CFG: the convergence test cannot see a wrong correction weight."""
    class Velocity(torch.nn.Module):
        def forward(self, x, t, context, y, skip_layers=()):
            return torch.tanh(x) * (t.view(-1, 1, 1, 1) / 1000) + context.mean() * y.view(-1, 1, 1, 1)
    model, cfg = Velocity(), 3.0
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    cond, uncond = ((torch.ones(1, 1, 1), torch.full((1, 1), y)) for y in (0.5, -0.2))
    sigmas = sd.get_schedule(6, 3.0)
    ours = sd.denoise(model, x, sigmas, cond, uncond, cfg, sampler="dpmpp_2m")
    s, old = sigmas.tolist(), None
    for i in range(len(s) - 1):
        t_in = torch.tensor([s[i] * 1000])
        v_u, v_c = model(x, t_in, *uncond), model(x, t_in, *cond)
        denoised = x - s[i] * (v_u + cfg * (v_c - v_u))
        t, t_next = -math.log(s[i]), -math.log(s[i + 1]) if s[i + 1] else math.inf
        h = t_next - t
        if old is None or s[i + 1] == 0:
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * denoised
        else:
            r = (t - (-math.log(s[i - 1]))) / h
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * ((1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old)
        old = denoised
    torch.testing.assert_close(ours, x)


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


def mmdit_to_diffusers(official: dict, depth: int) -> dict:
    """Official names -> diffusers `transformer/` names; the exact inverse of sd.mmdit_from_diffusers."""
    official, out = dict(official), {}
    if "pos_embed" in official:
        out["pos_embed.pos_embed"] = official.pop("pos_embed")
    for name, parts in sd.diffusers_names(depth).items():
        for p in ("weight", "bias"):
            if f"{name}.{p}" in official:
                t = official.pop(f"{name}.{p}")
                t = sd.swap_modulation(t, name, depth)
                out.update(zip((f"{part}.{p}" for part in parts), t.chunk(len(parts))))
    assert not official, sorted(official)[:5]
    return out


def delta_weight(layer: sd.LoRALinear) -> torch.Tensor:
    """The LoRA update as one weight matrix: scale * up @ down."""
    return (layer.lora_up.weight @ layer.lora_down.weight) * layer.scale


def set_lora_merged(model: torch.nn.Module, merged: bool):
    """Fold every LoRALinear's update into its weight (its own update switched off), or take it out again."""
    with torch.no_grad():
        for layer in sd.lora_layers(model).values():
            if merged:
                layer.weight += delta_weight(layer).to(layer.weight.dtype)
                layer.merged_multiplier, layer.multiplier = layer.multiplier, 0.0
            else:
                layer.multiplier = layer.merged_multiplier
                layer.weight -= delta_weight(layer).to(layer.weight.dtype)


def test_key_conversion_roundtrip_loses_nothing():
    model = tiny_mmdit(dual=(0, 1))
    official = model.state_dict()
    there = mmdit_to_diffusers(official, 3)
    back = sd.mmdit_from_diffusers(there, 3)
    assert back.keys() == official.keys() and all(torch.equal(back[k], official[k]) for k in official)
    with pytest.raises(sd.UserError, match=r"unexpected keys .*\['context_embedder_2.weight'\]"):  # never dropped
        sd.mmdit_from_diffusers({**there, "context_embedder_2.weight": torch.zeros(1)}, 3)
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
    from_shapes = sd.MMDiTConfig.from_state_dict(sd.mmdit_from_diffusers(ref.state_dict(), depth))
    assert from_shapes == expected           # and with config.json's counts, as load_mmdit reads a folder:
    assert dataclasses.replace(from_shapes, depth=diff_config["num_layers"],
                               heads=diff_config["num_attention_heads"]) == expected
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_mmdit_matches_diffusers_transformer(variant, tmp_path):
    pytest.importorskip("diffusers")
    ref = make_components(variant)["transformer"]
    ref.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    ours = sd.load_mmdit(tmp_path)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([999.0, 31.5])
    context, pooled = torch.randn(2, 9, 96, generator=g), torch.randn(2, 80, generator=g)
    # patch grids 5x3 (an off-centre crop of the 16x16 position table), 16x7 and 1x16 (its full height / width)
    for x in (torch.randn(2, 16, h, w, generator=g) for h, w in ((10, 6), (32, 14), (2, 32))):
        with torch.no_grad():
            for skip in ((), (1,)):
                expected = ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                               timestep=t, skip_layers=list(skip) or None, return_dict=False)[0]
                got = ours(x, t, context, pooled, skip_layers=skip)               # fp32: ~2e-6 apart
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
                assert expected.abs().mean() > 0.1


def test_qk_norm_of_near_zero_queries_and_keys_is_diffusers_at_its_eps(tmp_path):
    """The comparison above has q and k of order 1, where RMSNorm's eps (1e-6) is below its tolerance: here the
    q and k projections of both streams are shrunk a thousandfold, so eps decides what comes out."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, caption_projection_dim=32, joint_attention_dim=24, pooled_projection_dim=20,
        pos_embed_max_size=8, qk_norm="rms_norm").eval()
    randomize(ref, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if re.search(r"attn\.(to_[qk]|add_[qk]_proj)\.", name):
                p.mul_(1e-3)
    _, got, expected = saved_and_compared(ref, tmp_path)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_fresh_models_position_table_is_the_references_sine_cosine_table():
    """Checkpoints bring their own pos_embed, so the diffusers comparison never sees a fresh model's (the tiny
    model's): sines before cosines, the first half of each row from the column, frequencies over dim/4 (the
    references' formula; diffusers' at base_size = grid, scale 1)."""
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    for dim, grid in ((64, 16), (96, 5)):
        expected = embeddings.get_2d_sincos_pos_embed(dim, grid, base_size=grid, interpolation_scale=1.0,
                                                      output_type="pt")
        torch.testing.assert_close(sd.sincos_pos_embed(dim, grid), expected[None].float(), atol=0, rtol=0)


def test_latents_of_an_odd_size_are_refused_not_cropped_by_the_patch_conv():
    """A fork's latents of images whose sides are multiples of 8 px but not of 16 (1000x744 px: 125x93 latents)
    lost their last column or row in the MMDiT's 2x2 patches: a velocity smaller than x, silently, and then a bare
    size mismatch in flow_matching_loss or denoise."""
    model, (_, t, context, pooled) = tiny_mmdit(), mmdit_inputs()
    for h, w in ((9, 6), (8, 7)):
        one_line_error(lambda: model(torch.randn(2, 16, h, w), t, context, pooled),
                       rf"^latents of {w}x{h} \(width x height\): .* multiples of the patch size 2 .*16 px")


def test_a_diffusers_folder_without_qk_norm_takes_its_head_count_from_config_json(tmp_path):
    """Without qk-norm the shapes show no head width: the heads come from config.json (here 4 of 32 channels;
    read from the shapes alone they would be 2 of 64, and the images another model's)."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=32,
        num_attention_heads=4, caption_projection_dim=128, joint_attention_dim=96, pooled_projection_dim=80,
        pos_embed_max_size=16, qk_norm=None).eval()
    randomize(ref, torch.Generator().manual_seed(0))
    ours, got, expected = saved_and_compared(ref, tmp_path)
    assert ours.cfg.heads == 4
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def saved_and_compared(ref, tmp_path):
    """diffusers' SD3Transformer2DModel `ref` saved and loaded here -> (ours, its output, ref's) on one input."""
    ref.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    ours, c = sd.load_mmdit(tmp_path), ref.config
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([500.0])
    context = torch.randn(1, 5, c.joint_attention_dim, generator=g)
    pooled = torch.randn(1, c.pooled_projection_dim, generator=g)
    with torch.no_grad():
        expected = ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                       return_dict=False)[0]
        return ours, ours(x, t, context, pooled), expected


def test_vae_matches_diffusers(tmp_path):
    pytest.importorskip("diffusers")
    ref = make_components()["vae"]
    ref.save_pretrained(tmp_path / "vae", safe_serialization=True)
    ours = sd.load_vae(tmp_path)
    images = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(images).latent_dist
        moments = ours.encode_moments(images)
        torch.testing.assert_close(moments, torch.cat([dist.mean, dist.logvar], 1), atol=1e-5, rtol=1e-5)
        ref_latents = (dist.sample(torch.Generator().manual_seed(3)) - 0.0609) * 1.5305
        torch.testing.assert_close(ours.encode(images, torch.Generator().manual_seed(3)), ref_latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.decode(ref_latents), ref.decode(ref_latents / 1.5305 + 0.0609).sample,
                                   atol=1e-5, rtol=1e-5)                     # fp32: 3e-6 apart at most


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_is_as_near_fp32_as_diffusers_in_the_same_dtype(diffusers_folder, dtype):
    """In bf16 or fp16 neither side gives fp32's numbers: the MMDiT's and the VAE's outputs must be on average no
    farther from fp32's than diffusers' are in that dtype (measured 0.9-1.1x of it; timesteps rounded to bf16
    before the embedding, which both compute in fp32, are 5x farther in bf16, 40x in fp16)."""
    diffusers = pytest.importorskip("diffusers")
    folder, pipe = diffusers_folder
    half = sd.DTYPES[dtype]
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 10, 6, generator=g), torch.tensor([999.0, 31.5])
    context, pooled, z = torch.randn(2, 9, 96, generator=g), torch.randn(2, 80, generator=g), x[:1] * 0.5
    ref = diffusers.SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=half)
    ref_vae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=half)
    mmdit = lambda model, dt: model(hidden_states=x.to(dt), encoder_hidden_states=context.to(dt),
                                    pooled_projections=pooled.to(dt), timestep=t, return_dict=False)[0].float()
    decode = lambda vae, dt: vae.decode((z / 1.5305 + 0.0609).to(dt)).sample.float()
    our_mmdit, our_vae = sd.load_mmdit(folder, dtype=half), sd.load_vae(folder, dtype=half)
    with torch.no_grad():
        fp32 = mmdit(pipe.transformer, torch.float32), decode(pipe.vae, torch.float32)
        theirs = mmdit(ref, half), decode(ref_vae, half)
        ours = our_mmdit(x, t, context, pooled).float(), our_vae.decode(z).float()
    for mine, their, exact in zip(ours, theirs, fp32):
        assert (mine - exact).abs().mean() <= 1.25 * (their - exact).abs().mean()


def test_an_fp8_vae_file_is_upcast_on_load_not_left_to_fail_at_decode(tmp_path):
    """e4m3 VAE weights stayed e4m3: load_vae passed, then the first encode or decode was a bare
    NotImplementedError (no fp8 convolution). Now upcast as the text encoders' fp8 files are."""
    torch.manual_seed(0)
    vae = sd.VAE(sd.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, groups=32)).state_dict()
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in vae.items()}, tmp_path / "fp8.safetensors")
    save_file({k: v.to(torch.float8_e4m3fn).float() for k, v in vae.items()}, tmp_path / "ref.safetensors")
    latents = torch.randn(1, 16, 4, 4)
    assert torch.equal(sd.load_vae(tmp_path / "fp8.safetensors").decode(latents),
                       sd.load_vae(tmp_path / "ref.safetensors").decode(latents))
    if COMPLEX_FILES:
        save_file({k: v.to(torch.complex64) for k, v in vae.items()}, tmp_path / "complex.safetensors")
        one_line_error(lambda: sd.load_vae(tmp_path / "complex.safetensors"), "unsupported: use a bf16/fp16/fp8 file")


def test_a_flux_vae_folder_is_refused_by_its_latent_scale_not_decoded_with_it(tmp_path, diffusers_folder, monkeypatch):
    """FLUX.1's VAE has SD3's key names and shapes (a single ae.safetensors cannot be told apart), so its
    diffusers folder loaded silently and decoded with FLUX's scale 0.3611 and shift 0.1159: wrong images.
    load_pipeline refused it only after the MMDiT and the text encoders had loaded (minutes for Large)."""
    flux = make_components()["vae"]
    flux.register_to_config(scaling_factor=0.3611, shift_factor=0.1159)
    flux.save_pretrained(tmp_path / "flux", safe_serialization=True)
    with pytest.raises(sd.UserError, match=r"latent scale and shift \(0.3611, 0.1159\), SD3's VAE \(1.5305, "
                                           r"0.0609\): another model's VAE .*FLUX.1's.* use SD3's"):
        sd.load_vae(tmp_path / "flux")
    with monkeypatch.context() as m:
        m.setattr(sd, "load_mmdit", lambda *a, **k: pytest.fail("the MMDiT loaded before the VAE's config.json"))
        one_line_error(lambda: sd.load_pipeline(str(diffusers_folder[0]), vae=str(tmp_path / "flux"), device="cpu"),
                       r"latent scale and shift \(0.3611, 0.1159\)")
    flux.register_to_config(scaling_factor=1.5305, shift_factor=None)   # SD3's; a missing shift is SD3's too
    flux.save_pretrained(tmp_path / "sd3", safe_serialization=True)
    assert (sd.load_vae(tmp_path / "sd3").cfg.scaling_factor, sd.load_vae(tmp_path / "sd3").cfg.shift_factor) == (
        1.5305, 0.0609)


def test_a_model_file_missing_a_tensor_or_with_a_foreign_one_is_refused_naming_it(tmp_path):
    """Weights that do not fill the detected architecture (a tensor missing, one no layer takes) are a one-line
    error naming the tensor, not a model left holding empty meta tensors that fail at the first step."""
    weights = tiny_mmdit().state_dict()
    missing = {k: v for k, v in weights.items() if k != "final_layer.linear.bias"}
    foreign = {**weights, "joint_blocks.0.x_block.extra": torch.zeros(2)}
    for name, changed in (("final_layer.linear.bias", missing), ("joint_blocks.0.x_block.extra", foreign)):
        save_file(changed, tmp_path / "mmdit.safetensors")
        one_line_error(lambda: sd.load_mmdit(tmp_path / "mmdit.safetensors"),
                       rf"MMDiT weights do not fit the detected architecture: .*\"{re.escape(name)}\"")


def test_another_parts_file_given_as_the_vae_is_named_by_what_it_holds(tmp_path):
    """--vae given the MMDiT's or a text encoder's single file: "holds no SD3 VAE" and what the file is, not the
    "bad SD3 VAE weights (KeyError ...)" of a damaged VAE."""
    files = {"an SD3 MMDiT": tiny_mmdit().state_dict(),
             "a CLIP text encoder": {"text_model.embeddings.token_embedding.weight": torch.zeros(8, 4)},
             "a T5 text encoder": {"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4)}}
    for what, tensors in files.items():
        save_file(tensors, tmp_path / "part.safetensors")
        one_line_error(lambda: sd.load_vae(tmp_path / "part.safetensors"),
                       rf"part.safetensors holds no SD3 VAE \(it looks like {what}\): pass --vae")


def test_another_models_folder_is_refused_by_its_config_class_before_any_weight_is_read(tmp_path):
    """A diffusers folder whose config.json names another class (FLUX's transformer as --model, the MMDiT's
    folder as --vae) is refused by that name, before gigabytes of its weights are read (here there are none)."""
    cases = (("transformer", "FluxTransformer2DModel", sd.load_mmdit, "SD3Transformer2DModel"),
             ("vae", "SD3Transformer2DModel", sd.load_vae, "AutoencoderKL"))
    for part, written, load, needed in cases:
        (tmp_path / part).mkdir()
        (tmp_path / part / "config.json").write_text(json.dumps({"_class_name": written}))
        for given in (tmp_path, tmp_path / part):                       # the root, or the part's folder
            one_line_error(lambda: load(given), f"{re.escape(str(tmp_path / part))}'s config.json names {written}, "
                                                f"not the {needed} needed here: give the right folder")


def test_a_diffusers_part_folder_given_as_the_model_is_sent_to_the_folder_above_it(tmp_path):
    """--model ROOT/transformer (or ROOT/vae) said "ROOT/transformer holds a SD3Transformer2DModel, not the
    AutoencoderKL needed here" ("a AutoencoderKL" the other way), and "give the right folder": ROOT is."""
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    for part, written in (("transformer", "SD3Transformer2DModel"), ("vae", "AutoencoderKL")):
        (tmp_path / part).mkdir()
        (tmp_path / part / "config.json").write_text(json.dumps({"_class_name": written}))
    for part, written, needed in (("transformer", "SD3Transformer2DModel", "AutoencoderKL"),
                                  ("vae", "AutoencoderKL", "SD3Transformer2DModel")):
        one_line_error(lambda: sd.load_pipeline(str(tmp_path / part), device="cpu"),
                       f"^{re.escape(str(tmp_path / part))}'s config.json names {written}, not the {needed} needed "
                       f"here: give the diffusers folder above it, {re.escape(str(tmp_path))}$")


def test_a_diffusers_folder_missing_a_part_names_the_part(tmp_path, monkeypatch):
    """A diffusers folder without vae/ or transformer/ (a download cut short, or one made with --include) was
    searched itself for their weights: "no diffusion_pytorch_model.safetensors in FOLDER (has ['model_index.json',
    'scheduler', 'text_encoder', 'text_encoder_2', 'text_encoder_3']); only safetensors weights are read",
    which names neither the part missing nor a fix."""
    monkeypatch.setattr(sd, "load_text_encoders", lambda *a, **k: pytest.fail("a part's absence found late"))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    unet = ""
    for part in ("vae", "transformer"):                         # the VAE's folder is checked first
        one_line_error(lambda: sd.load_pipeline(str(tmp_path), device="cpu"),
                       rf"^{re.escape(str(tmp_path))} has no {part}/ folder: an incomplete download\? download it "
                       rf"again{unet}$")
        unet = r" \(a UNet model's, e.g. SDXL's, has none: give an SD3 model\)"     # (SDXL's and SD1.x's have vae/)
        (tmp_path / "vae").mkdir(exist_ok=True)


def test_a_vae_config_with_a_non_integer_group_count_is_a_one_line_error(tmp_path):
    """norm_num_groups 32.0 or true in a VAE's config.json loaded, then the first encode or decode was torch's
    bare TypeError (group_norm takes an int): after the MMDiT and text encoders had loaded."""
    pytest.importorskip("diffusers")
    vae = make_components()["vae"]
    for groups in (32.0, True):
        vae.register_to_config(norm_num_groups=groups)
        vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
        one_line_error(lambda: sd.load_vae(tmp_path / "vae"), "sizes of no SD3 VAE")


def test_latent_scale_and_shift_round_trip():
    vae = sd.VAE(sd.VAEConfig(ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, groups=4))
    mean = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    moments = torch.cat([mean, torch.full_like(mean, -40.0)], 1)
    latents = vae.latents_from_moments(moments, noise=torch.zeros_like(mean))   # the sample is the mean
    torch.testing.assert_close(latents, (mean - 0.0609) * 1.5305)
    seen = {}
    vae.decoder.forward = lambda z: seen.setdefault("z", z)
    vae.decode(latents)
    torch.testing.assert_close(seen["z"], mean, atol=1e-6, rtol=0)


def test_latents_from_extreme_log_variances_are_clamped_as_diffusers_samples_them():
    """The posterior's log-variance is clamped to -30..20 before the square root, as in diffusers'
    DiagonalGaussianDistribution: an encoder output of 100 would otherwise give latents of e^50 (inf in bf16)."""
    vae_module = pytest.importorskip("diffusers.models.autoencoders.vae")
    vae = sd.VAE(sd.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1))
    mean = torch.randn(1, 16, 2, 3, generator=torch.Generator().manual_seed(0))
    logvar = torch.tensor([-100.0, -30.5, -3.0, 0.0, 19.0, 100.0]).repeat(16).view(1, 16, 2, 3)
    noise = torch.randn(1, 16, 2, 3, generator=torch.Generator().manual_seed(1))
    dist = vae_module.DiagonalGaussianDistribution(torch.cat([mean, logvar], 1))
    expected = (dist.mean + dist.std * noise - vae.cfg.shift_factor) * vae.cfg.scaling_factor
    torch.testing.assert_close(vae.latents_from_moments(torch.cat([mean, logvar], 1), noise=noise), expected)


#################################################################################
#                  End to end against diffusers' SD3 pipeline                   #
#################################################################################

def test_vae_encode_given_one_image_or_a_pil_image_says_what_to_pass():
    """vae.encode(load_image(...)) (one (3, H, W) image) failed with GroupNorm's bare "Expected weight to be a vector
    of size equal to the number of channels in input", a PIL image with "'Image' object has no attribute 'to'"."""
    vae, image = sd.tiny_pipeline().vae, torch.zeros(3, 32, 32)
    for wrong, shown in [(image, r"a tensor of shape \(3, 32, 32\)"), (Image.new("RGB", (32, 32)), "<PIL.Image.Image image mode=RGB")]:
        one_line_error(lambda: vae.encode(wrong), r"VAE.encode takes images \(B, 3, H, W\) in \[-1, 1\] \(one: "
                                                  rf"images\[None\]; load_image reads a file\), not {shown}")
    latents = vae.encode(image[None])
    assert latents.shape == (1, 16, 4, 4) and vae.decode(latents).shape == (1, 3, 32, 32)
    # uint8 pixels (0..255) were encoded silently; one (16, 4, 4) latent was GroupNorm's bare error in decode
    one_line_error(lambda: vae.encode(torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)),
                   r"VAE.encode takes images in \[-1, 1\], not uint8 pixels: scale them, e.g. pixels / 127.5 - 1")
    one_line_error(lambda: vae.decode(latents[0]),
                   r"VAE.decode takes latents \(B, 16, H/8, W/8\) \(one: latents\[None\]\), not a tensor of shape "
                   r"\(16, 4, 4\)")
    # an RGBA image, a video's (B, 3, T, H, W), SD1's 4-channel latents: refused, not left to the convs' bare errors
    for wrong in (torch.zeros(1, 4, 32, 32), torch.zeros(1, 3, 2, 32, 32)):
        shape = re.escape(str(tuple(wrong.shape)))
        one_line_error(lambda: vae.encode(wrong),
                       rf"VAE.encode takes images \(B, 3, H, W\) .*, not a tensor of shape {shape}")
    one_line_error(lambda: vae.decode(torch.zeros(1, 4, 4, 4)),
                   r"VAE.decode takes latents \(B, 16, H/8, W/8\) .*, not a tensor of shape \(1, 4, 4, 4\)")


def test_sample_cli_matches_diffusers_pipeline(diffusers_folder, tmp_path):
    folder, pipe = diffusers_folder
    prompts = ["a red fox in the snow", " ".join(["a blue boat on the lake at sunset"] * 12)]   # 96 words: cut
    ref = run_diffusers(pipe, prompts, "blurry painting", seed=7, steps=4, cfg=4.5, t5_length=32, height=64, width=48)
    args = ["--prompt", prompts[0], "--prompt", prompts[1], "--negative", "blurry painting", "--seed", "7", "--steps",
            "4", "--cfg", "4.5", "--sampler", "euler", "--t5-length", "32", "--height", "64",
            "--width", "48", "--dtype", "fp32", "--device", "cpu"]
    assert_images_close(images_of(sample.main(["--model", str(folder), *args, "--out", str(tmp_path / "a")])), ref)
    official_single_file(folder, tmp_path / "sd3.5_medium_tiny.safetensors")
    paths = sample.main(["--model", str(tmp_path / "sd3.5_medium_tiny.safetensors"), "--text-encoders", str(folder),
                         *args, "--batch-size", "2", "--out", str(tmp_path / "b")])   # both in one CFG batch
    assert_images_close(images_of(paths), ref)
    params = json.loads(Image.open(paths[1]).text["parameters"])
    assert params["prompt"] == prompts[1] and params["seed"] == 8 and params["steps"] == 4


def test_skip_layer_guidance_acts_strictly_inside_its_window_as_both_references():
    """diffusers' pipeline and Stability AI's sd3_impls skip layers at steps i with 0.01 * steps < i < 0.2 * steps;
    the sampling comparisons never land on a bound: at 100 steps 2..19 (not 1), at 50 steps 1..9 (not 10)."""
    acting = lambda steps: [i for i in range(steps) if sd.slg_acts(i, steps)]
    assert acting(100) == list(range(2, 20)) and acting(50) == list(range(1, 10)) and acting(10) == [1]


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


def test_cfg_of_1_or_less_is_no_guidance_as_in_diffusers(diffusers_folder):
    """diffusers guides only above 1: its Large Turbo card samples with guidance_scale 0, which must not give
    images of the negative prompt (v_u + 0 * (v_c - v_u)) that ignore the prompt."""
    folder, pipe = diffusers_folder
    ours = sd.load_pipeline(str(folder), device="cpu", dtype="fp32", t5_length=32)
    for cfg in (0.0, 0.5, 1.0):
        settings = sd.SampleSettings(steps=4, cfg=cfg, sampler="euler", width=32, height=32, seed=2)
        mine = np.stack([np.asarray(im) for im in sd.generate(ours, ["a red fox"], "snow", settings, progress=False)])
        assert_images_close(mine, run_diffusers(pipe, ["a red fox"], "snow", seed=2, cfg=cfg, height=32, width=32))


def test_denoise_given_an_uncond_runs_no_guidance_at_cfg_1_or_less_as_diffusers():
    """diffusers guides only for guidance_scale > 1 (its Turbo recipe passes 0); denoise() called with the
    uncond embeddings and cfg 0 or 0.5 must sample as without them, not extrapolate away from the prompt."""
    model, (x, _, context, pooled) = tiny_mmdit(), mmdit_inputs(batch=1)
    uncond = (torch.zeros_like(context), torch.zeros_like(pooled))
    sigmas = sd.get_schedule(2, 3.0)
    plain = sd.denoise(model, x, sigmas, (context, pooled))
    for cfg in (0.0, 0.5, 1.0):
        assert torch.equal(sd.denoise(model, x, sigmas, (context, pooled), uncond, cfg), plain), cfg


def test_t5_length_defaults_to_diffusers_pipelines_in_training_and_sampling():
    """T5_LENGTH (training's t5_length, the previews' and sample.py's default) is diffusers' max_sequence_length
    default: LoRAs trained here sample in diffusers' pipeline with the context they were trained on."""
    diffusers = pytest.importorskip("diffusers")
    import inspect
    call = inspect.signature(diffusers.StableDiffusion3Pipeline.__call__)
    default = call.parameters["max_sequence_length"].default
    assert sd.T5_LENGTH == default == sd.Config().t5_length


def test_generated_pixels_are_rounded_as_diffusers_does_not_truncated():
    """generate()'s uint8 pixels are round((decoded / 2 + 0.5).clamp(0, 1) * 255) of the denoised latents, as
    diffusers' numpy_to_pil; truncating makes images up to 1/255 darker."""
    pipe = sd.tiny_pipeline()
    settings = sd.SampleSettings(steps=2, cfg=1.0, shift=3.0, sampler="euler", width=64, height=64, seed=3)
    image = sd.generate(pipe, ["a red fox"], settings=settings, progress=False)[0]
    cond = pipe.text.encode(["a red fox"])
    z = sd.denoise(pipe.mmdit, sd.initial_noise([3], 16, 64, 64), sd.get_schedule(2, 3.0), cond)
    pixels = ((pipe.vae.decode(z)[0] / 2 + 0.5).clamp(0, 1) * 255).permute(1, 2, 0)
    assert not torch.equal(pixels.round(), pixels.floor())          # the image can tell the two apart
    assert np.array_equal(np.asarray(image), pixels.round().to(torch.uint8).numpy())


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


def test_loading_the_tiny_model_and_sampling_leave_the_callers_random_numbers_alone():
    """load_pipeline("tiny") seeded the global RNG with 0: a notebook's or a fork's test's later random numbers
    were the same whatever seed it had set. Its weights stay the same on every load."""
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    pipe = sd.load_pipeline("tiny", device="cpu")
    sd.generate(pipe, ["red"], settings=sd.SampleSettings(steps=2, width=32, height=32), progress=False)
    assert torch.equal(torch.rand(3), expected)
    again = sd.load_pipeline("tiny", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(pipe.mmdit.state_dict().values(), again.mmdit.state_dict().values()))


def test_loading_the_tiny_model_leaves_the_gpus_random_numbers_alone(monkeypatch):
    """tiny_pipeline forks only the CPU's generator, but seeded with torch.manual_seed, which reseeds every GPU's
    too: on a CUDA machine, load_pipeline("tiny") set the caller's CUDA random numbers back to seed 0."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    sd.load_pipeline("tiny", device="cpu")
    assert reseeded == []


def test_a_seed_gives_the_same_noise_whatever_the_callers_default_device():
    """A notebook that set torch.set_default_device("cuda") drew the initial noise on that device with the CPU's
    seeded generator (torch refuses a CPU generator for CUDA tensors); "meta" stands in for it here."""
    expected = sd.initial_noise([3, 4], 16, 64, 64)
    with torch.device("meta"):
        noise = sd.initial_noise([3, 4], 16, 64, 64)
    assert noise.device.type == "cpu" and torch.equal(noise, expected)


def test_a_seed_gives_the_same_image_whatever_the_callers_default_dtype():
    """A notebook that set torch.set_default_dtype(torch.float64) drew the initial noise in float64: other
    numbers from the same seed, so another image than sample.py's and diffusers' for that seed."""
    pipe, s = sd.tiny_pipeline(), sd.SampleSettings(steps=2, width=32, height=32, seed=3)
    plain = np.asarray(sd.generate(pipe, ["red"], settings=s, progress=False)[0])
    torch.set_default_dtype(torch.float64)
    try:
        assert np.array_equal(np.asarray(sd.generate(pipe, ["red"], settings=s, progress=False)[0]), plain)
    finally:
        torch.set_default_dtype(torch.float32)


def test_text_encoders_take_one_prompt_as_text_with_or_without_t5():
    """pipe.text.encode("a cat") (one prompt, not a list) encoded it with T5; without T5 (use_t5 false) the zeros in
    its place were made for len("a cat") = 5 prompts: a bare size mismatch."""
    for use_t5 in (True, False):
        text = sd.tiny_pipeline(use_t5=use_t5).text
        for got, expected in zip(text.encode("a cat"), text.encode(["a cat"])):
            assert torch.equal(got, expected)


def test_generate_without_prompts_or_text_encoders_in_a_notebook():
    """A notebook's generate(pipe, []) (a filtered prompt list came out empty) failed in the tokenizer with a bare
    IndexError; a Pipeline whose text encoders were dropped (pipe.text = None, as train() drops its own, to free
    memory) with an AttributeError on None; embeddings for another number of prompts with a bare size mismatch;
    embeddings without the uncond half sampled without CFG, silently, whatever cfg asked for."""
    pipe, s = sd.tiny_pipeline(), sd.SampleSettings(steps=2, width=32, height=32, cfg=4.0)
    assert sd.generate(pipe, [], settings=s, progress=False) == []
    embeddings = (pipe.text.encode(["red"]), pipe.text.encode([""]))
    pipe.text = None
    one_line_error(lambda: sd.generate(pipe, ["red"], settings=s, progress=False), "no text encoders.*embeddings")
    assert len(sd.generate(pipe, ["red"], settings=s, progress=False, embeddings=embeddings)) == 1
    one_line_error(lambda: sd.generate(pipe, ["red", "blue"], settings=s, progress=False, embeddings=embeddings),
                   "embeddings for 1 prompt, not 2: encode these")
    one_line_error(lambda: sd.generate(pipe, ["red"], settings=s, progress=False, embeddings=(embeddings[0], None)),
                   "no uncond")


def test_generate_refuses_an_uncond_half_that_does_not_match_the_prompts():
    """embeddings=(encode(prompts), encode([negative])), the negative encoded once, made the second image with no
    uncond rows at batch_size 1 (silently another image) and failed with a bare size mismatch at batch_size 2; an
    uncond of another model's width, or none, a bare TypeError or an error from deep inside torch; one of another
    token length (another t5_length) torch.cat's bare size mismatch under CFG."""
    pipe, s = sd.tiny_pipeline(), sd.SampleSettings(steps=2, width=32, height=32, cfg=4.0)
    cond, negative = pipe.text.encode(["red", "blue"]), pipe.text.encode([""])
    for batch_size in (1, 2):
        one_line_error(lambda: sd.generate(pipe, ["red", "blue"], settings=s, progress=False, batch_size=batch_size,
                                           embeddings=(cond, negative)), "uncond half is for 1 prompt, not 2")
    no_cfg = sd.SampleSettings(steps=2, width=32, height=32, cfg=1.0)      # an uncond that is no pair: TypeError
    for uncond, settings in [(5, s), ((cond[0], cond[1][:, :7]), s), ((cond[0], cond[1][:1]), s), (5, no_cfg)]:
        one_line_error(lambda: sd.generate(pipe, ["red", "blue"], settings=settings, progress=False,
                                           embeddings=(cond, uncond)), r"embeddings must be \(cond, uncond\)")
    repeated = tuple(t.expand(2, *t.shape[1:]) for t in negative)
    shorter = (repeated[0][:, :-3], repeated[1])        # e.g. the negative encoded at another t5_length
    one_line_error(lambda: sd.generate(pipe, ["red", "blue"], settings=s, progress=False,
                                       embeddings=(cond, shorter)), "cond and uncond contexts have 93 and 90 tokens")
    assert len(sd.generate(pipe, ["red", "blue"], settings=s, progress=False, embeddings=(cond, repeated))) == 2
    for uncond in (negative, shorter):                  # without CFG the uncond half goes unused
        assert len(sd.generate(pipe, ["red", "blue"], settings=no_cfg, progress=False, embeddings=(cond, uncond))) == 2


def test_generate_refuses_prompts_and_negatives_that_are_not_texts():
    """generate(pipe, prompts, negative=["blurry", "dark"]) (diffusers takes one negative per prompt) encoded the
    list as one text pair, "blurry" + "dark", as every image's negative: other images, without a word. None or
    bytes among the prompts failed in the tokenizer with a bare TypeError/ValueError."""
    pipe, s = sd.tiny_pipeline(), sd.SampleSettings(steps=2, width=32, height=32, cfg=4.0)
    for prompts, negative in [(["red", "blue"], ["blurry", "dark"]), (["red"], None), (["red", None], ""),
                              (b"red", "")]:
        one_line_error(lambda: sd.generate(pipe, prompts, negative, settings=s, progress=False),
                       "prompts and the negative prompt must be text")


def test_generate_is_deterministic_per_seed_and_prompt():
    pipe = sd.tiny_pipeline()
    s = sd.SampleSettings(steps=3, width=32, height=32, seed=5)
    a = [np.asarray(im) for im in sd.generate(pipe, ["red", "blue"], settings=s, progress=False)]
    b = np.asarray(sd.generate(pipe, ["blue"], settings=sd.SampleSettings(steps=3, width=32, height=32, seed=6),
                               progress=False)[0])
    assert np.abs(a[1].astype(int) - b.astype(int)).max() <= 1               # batch position does not matter
    assert np.abs(a[0].astype(int) - a[1].astype(int)).mean() > 1



def test_generate_on_a_model_left_in_train_mode_samples_without_lora_dropout_and_keeps_its_modes():
    """A notebook sampling mid-training (trainer.pipe, its MMDiT in train mode): LoRA dropout was on, so the same
    seed gave another image at each call (and drew on the training's random numbers). Now the images are those
    of the model in eval mode, as the Trainer's previews, and each module's mode is the caller's again."""
    pipe, s = sd.tiny_pipeline(), sd.SampleSettings(steps=2, width=32, height=32, seed=3)
    sd.add_lora(pipe.mmdit, rank=4, dropout=0.5)
    with torch.no_grad():                                       # a LoRA that changes the image
        for layer in sd.lora_layers(pipe.mmdit).values():
            layer.lora_up.weight.normal_(generator=torch.Generator().manual_seed(0))
    in_eval = np.asarray(sd.generate(pipe, ["red"], settings=s, progress=False)[0])
    pipe.mmdit.train()
    pipe.mmdit.final_layer.eval()                               # one the caller keeps in eval
    for _ in range(2):
        assert np.array_equal(np.asarray(sd.generate(pipe, ["red"], settings=s, progress=False)[0]), in_eval)
    assert pipe.mmdit.joint_blocks[0].training and not pipe.mmdit.final_layer.training

    def interrupted(images):                                    # a Ctrl-C as sample.py saves a batch
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        sd.generate(pipe, ["red"], settings=s, progress=False, keep=interrupted)
    assert pipe.mmdit.joint_blocks[0].training and not pipe.mmdit.final_layer.training      # the modes, again


def test_generate_encodes_the_negative_prompt_once_and_only_with_cfg():
    """The negative prompt's rows are encoded once and viewed per prompt (T5-XXL on one text, not on as many as
    there are prompts), and not at all at cfg 1 or less, where no guidance runs."""
    pipe, encoded, real_encode = sd.tiny_pipeline(), [], sd.TextEncoders.encode

    def encode(text, prompts):
        encoded.append(list(prompts))
        return real_encode(text, prompts)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sd.TextEncoders, "encode", encode)
        for cfg in (2.0, 1.0):
            settings = sd.SampleSettings(steps=1, cfg=cfg, width=32, height=32)
            sd.generate(pipe, ["red", "blue", "green"], "blurry", settings, progress=False, batch_size=2)
    assert encoded == [["red", "blue"], ["green"], ["blurry"], ["red", "blue"], ["green"]]


def test_generate_takes_one_prompt_given_as_text():
    """generate(pipe, "a cat"), as diffusers' pipelines take a prompt, failed with "object of type 'int' has no
    len()" (the text was read as a list of one-character prompts)."""
    pipe, s = sd.tiny_pipeline(), sd.SampleSettings(steps=2, width=32, height=32)
    one = sd.generate(pipe, "red disc", settings=s, progress=False)
    assert len(one) == 1
    assert np.array_equal(np.asarray(one[0]), np.asarray(sd.generate(pipe, ["red disc"], settings=s, progress=False)[0]))
    with pytest.raises(sd.UserError, match="batch_size must be 1 or more, not 0"):      # was range()'s ValueError
        sd.generate(pipe, "red disc", settings=s, progress=False, batch_size=0)


def test_prompts_in_a_numpy_array_or_none_and_a_progress_given_as_text_from_python():
    """generate(pipe, np.array(prompts)) was refused as no text while a config's sample.prompts takes the array;
    TextEncoders.encode([]) failed with a bare IndexError, encode(None) with the tokenizer's "You need to specify
    either `text` or `text_target`"; generate(progress="no") drew the bar (the text is true to `if`)."""
    pipe, s = sd.tiny_pipeline(), sd.SampleSettings(steps=2, width=32, height=32, cfg=1.0)
    images = sd.generate(pipe, ["red", "blue"], settings=s, progress=False)
    from_numpy = sd.generate(pipe, np.array(["red", "blue"]), settings=s, progress=False)
    assert [np.asarray(im).tolist() for im in from_numpy] == [np.asarray(im).tolist() for im in images]
    one_line_error(lambda: sd.generate(pipe, {"red", "blue"}, settings=s, progress=False),
                   r"prompts must be a list, not a set \(its order changes between runs\)")
    one_line_error(lambda: sd.generate(pipe, ["red"], settings=s, progress="no"),
                   "progress must be true or false, got 'no'")
    context, pooled = pipe.text.encode([])                        # no prompts, no rows: as generate(pipe, [])
    one = pipe.text.encode(["red"])
    assert (context.shape, pooled.shape) == ((0, *one[0].shape[1:]), (0, *one[1].shape[1:]))
    for wrong in (None, ["red", None]):
        one_line_error(lambda: pipe.text.encode(wrong), r"prompts must be text \(str\) or a list of texts, got")


def test_prompts_in_a_table_are_refused_not_read_as_its_column_names_or_rows():
    """A pandas DataFrame iterates over its column names: generate(pipe, df) drew one image of the prompt "prompt"
    (a stand-in here: pandas is not installed), and a config's 2-D numpy array of prompts made each row's repr,
    "['a fox' 'a cat']", a prompt. Both are refused: a list or a 1-D array (a column, df["prompt"]) is taken."""
    class Frame:                                    # as pandas.DataFrame: 2-D, iterating over its column labels
        ndim = 2

        def __iter__(self):
            return iter(["prompt"])
    s = sd.SampleSettings(steps=2, width=32, height=32, cfg=1.0)
    one_line_error(lambda: sd.generate(sd.tiny_pipeline(), Frame(), settings=s, progress=False),
                   r"prompts must be a list or a 1-D array, not a 2-D Frame")
    one_line_error(lambda: sd.load_config({"sample": {"prompts": np.array([["a fox", "a cat"]])}}),
                   r"config key 'sample.prompts' must be a list or a 1-D array, not a 2-D ndarray")


def test_generate_on_a_pipeline_whose_models_were_freed_says_to_load_it_again():
    """generate() on a Pipeline whose models went to the meta device (a finished train() and a failed sample.main
    free theirs so; a notebook may free its own) failed with torch's "Cannot copy out of meta tensor; no data!" or
    "Tensor on device meta is not on the expected device cpu!"."""
    s = sd.SampleSettings(steps=2, width=32, height=32)
    for free in (sd.free_models, lambda pipe: pipe.vae.to("meta")):
        pipe = sd.tiny_pipeline()
        free(pipe)
        one_line_error(lambda: sd.generate(pipe, ["red"], settings=s, progress=False),
                       r"this Pipeline's models were freed \(moved to the meta device.*load_pipeline")


def test_generate_refuses_settings_and_batch_sizes_of_the_wrong_type():
    """From Python, SampleSettings(steps="20"), width="512", seed=None, settings={"steps": 20} (a dict) or
    batch_size="2" failed deep inside with bare TypeErrors (torch.linspace, check_size's %, range()). Their numbers
    are read as a config file's: numpy's, and a whole float (steps=20.0, batch_size=2.0: a TypeError too) as an int."""
    pipe, s = sd.tiny_pipeline(), sd.SampleSettings(steps=2, width=32, height=32, cfg=4.0)
    for wrong, error in [({"steps": "2"}, "settings.steps must be a whole number, got '2'"),
                         ({"steps": 2.5}, "settings.steps must be a whole number, got 2.5"),
                         ({"steps": True}, "settings.steps must be a whole number, got True"),
                         ({"width": "32"}, "settings.width must be a whole number, got '32'"),
                         ({"seed": None}, "settings.seed must be a whole number, got None"),
                         ({"cfg": "4"}, "settings.cfg must be a finite number, got '4'")]:
        one_line_error(lambda: sd.generate(pipe, ["red"], settings=dataclasses.replace(s, **wrong), progress=False),
                       error)
    one_line_error(lambda: sd.generate(pipe, ["red"], settings={"steps": 2}, progress=False),
                   r"settings must be a SampleSettings.*SampleSettings\(\*\*a_dict\), not a dict")
    one_line_error(lambda: sd.generate(pipe, ["red"], settings=s, batch_size="2", progress=False),
                   "batch_size must be a whole number, got '2'")
    plain = np.asarray(sd.generate(pipe, ["red"], settings=s, progress=False)[0])
    numpy = dataclasses.replace(s, steps=2.0, width=np.int64(32), seed=np.uint64(0), cfg=np.float32(4.0))
    with warnings.catch_warnings():             # a float32 against float's max warned of an overflow in a cast
        warnings.simplefilter("error", RuntimeWarning)
        images = sd.generate(pipe, ["red"], settings=numpy, batch_size=2.0, progress=False)
    assert np.array_equal(np.asarray(images[0]), plain)


def test_the_tiny_model_refuses_text_encoders_and_a_vae_and_no_dtype_that_cannot_run_is_taken(tmp_path):
    """load_pipeline("tiny", text_encoders=..., vae=...) ignored both without a word (sample.py alone refused
    them), and dtype=torch.int8 (bool, float8, complex) was taken, to fail later: nn.Module.to's bare TypeError,
    or at the first add ("add_stub" not implemented for 'Float8_e4m3fn'). --tiny clears a config's paths."""
    for paths in ({"text_encoders": str(tmp_path)}, {"vae": str(tmp_path)}):
        one_line_error(lambda: sd.load_pipeline("tiny", device="cpu", **paths),
                       "the tiny model has its own random text encoders and VAE: leave out text_encoders and vae")
    for dtype in (torch.int8, torch.bool, torch.float8_e4m3fn, torch.complex64):
        one_line_error(lambda: sd.load_pipeline("tiny", device="cpu", dtype=dtype),
                       f"unknown dtype {dtype}: use one of fp32, bf16, fp16")
    assert sd.load_pipeline("tiny", device="cpu", dtype=torch.float64).mmdit.compute_dtype == torch.float64
    tiny = sd.load_config(None, ["text_encoders=clips", "vae=vae.safetensors", *sd.TINY_RUN])
    assert (tiny.text_encoders, tiny.vae) == ("", "")


def test_a_model_for_a_pipeline_or_back_and_a_t5_length_of_text_are_one_line_errors(tmp_path):
    """generate(pipe.mmdit, ...), the model load_lora takes, failed with "'MMDiT' object has no attribute
    'variant'", save_lora(pipe, ...) with "'Pipeline' object has no attribute 'named_modules'" (load_lora(pipe)
    says what to pass), load_pipeline(t5_length="77") or None with a bare TypeError; 16.5 was taken."""
    pipe = sd.tiny_pipeline()
    one_line_error(lambda: sd.generate(pipe.mmdit, ["red"], progress=False),
                   "generate takes the Pipeline from load_pipeline, not a MMDiT")
    sd.add_lora(pipe.mmdit, rank=2)
    one_line_error(lambda: sd.save_lora(pipe, tmp_path / "lora.safetensors"),
                   r"save_lora takes the MMDiT \(pipe.mmdit\), not a Pipeline: save_lora\(pipe.mmdit, path\)")
    for length in ("16", None, 16.5):
        one_line_error(lambda: sd.load_pipeline("tiny", device="cpu", t5_length=length),
                       f"t5_length must be a whole number, got {length!r}")
    assert sd.load_pipeline("tiny", device="cpu", t5_length=np.int64(16)).text.t5_length == 16


def test_settings_numbers_are_read_without_the_annotations_being_text(monkeypatch):
    """read_sample_inputs told whole from real numbers by the annotation's text (`f.type.split(" ")`), text only
    under `from __future__ import annotations`: a fork without it, or Python 3.14 (PEP 649), holds the types
    themselves there, and every generate() failed with a bare AttributeError."""
    hints = typing.get_type_hints(sd.SampleSettings)
    for field in dataclasses.fields(sd.SampleSettings):
        monkeypatch.setattr(field, "type", hints[field.name])          # the annotation evaluated
    settings, batch_size = sd.read_sample_inputs(sd.SampleSettings(steps=20.0, cfg=np.float32(4), width=64), 2.0)
    assert (settings.steps, settings.cfg, settings.width, settings.shift, batch_size) == (20, 4.0, 64, None, 2)
    assert (type(settings.steps), type(settings.cfg)) == (int, float)
    one_line_error(lambda: sd.read_sample_inputs(sd.SampleSettings(seed=None), 1),
                   "settings.seed must be a whole number, got None")
    one_line_error(lambda: sd.read_sample_inputs(sd.SampleSettings(cfg="4"), 1),
                   "settings.cfg must be a finite number, got '4'")
    assert sd.read_sample_inputs(sd.SampleSettings(slg_scale=None), 1)[0].slg_scale is None    # the preset's


def test_pipelines_prompts_and_skip_layers_of_the_wrong_type_are_one_line_errors():
    """load_pipeline(dtype=3) ended in a bare KeyError, load_pipeline(None) and generate(pipe, None) in bare
    TypeErrors (os.stat's, len()'s), and SampleSettings(slg_layers=7) or slg_layers="1" in one from deep inside
    generate(); a block 1.5 skipped nothing, silently."""
    one_line_error(lambda: sd.load_pipeline("tiny", dtype=3), "unknown dtype 3: use one of fp32, bf16, fp16")
    one_line_error(lambda: sd.load_pipeline("tiny", dtype=["fp16"]), r"unknown dtype \['fp16'\]: use one of fp32")
    one_line_error(lambda: sd.load_pipeline("tiny", variant=["sd3-medium"]), r"unknown variant \['sd3-medium'\]")
    one_line_error(lambda: sd.load_pipeline(None),
                   r"model not found: 'None' \(a diffusers folder, .safetensors, hub id or 'tiny'\)")
    pipe, s = sd.tiny_pipeline(), sd.SampleSettings(steps=10, width=32, height=32, cfg=4.0, slg_scale=2.0)
    one_line_error(lambda: sd.generate(pipe, None, settings=s, progress=False),
                   "prompts and the negative prompt must be text")
    for layers, error in [(7, "settings.slg_layers must list joint blocks, e.g. \\(7, 8, 9\\), not 7"),
                          ("1", "settings.slg_layers must list joint blocks.*not '1'"),
                          (("1",), "each of settings.slg_layers must be a whole number, got '1'"),
                          ((1.5,), "each of settings.slg_layers must be a whole number, got 1.5")]:
        one_line_error(lambda: sd.generate(pipe, ["red"], settings=dataclasses.replace(s, slg_layers=layers),
                                           progress=False), error)
    numpy = dataclasses.replace(s, slg_layers=[np.int64(1)])
    image = np.asarray(sd.generate(pipe, ["red"], settings=numpy, progress=False)[0])
    as_range = dataclasses.replace(s, slg_layers=range(1, 2))                   # a range lists blocks too
    assert np.array_equal(np.asarray(sd.generate(pipe, ["red"], settings=as_range, progress=False)[0]), image)
    for huge in (10**400, -10**400):               # math.isfinite's bare OverflowError, past a float's range
        one_line_error(lambda: sd.generate(pipe, ["red"], settings=dataclasses.replace(s, seed=huge), progress=False),
                       "settings.seed must be a whole number, got -?1000")


def test_images_made_in_batches_show_one_progress_bar_over_all_their_steps(monkeypatch, capsys):
    """sample.py drew a bar per batch, each from 0 %: 16 images in batches of 4 made four bars, and no bar said
    how far the whole run was. One bar counts every image's steps; progress=False draws none."""
    pipe, s, bars = sd.tiny_pipeline(), sd.SampleSettings(steps=3, width=32, height=32, cfg=1.0), []

    class Recorded(sd.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)
    monkeypatch.setattr(sd, "tqdm", Recorded)
    assert len(sd.generate(pipe, ["red", "blue", "green"], settings=s, batch_size=2)) == 3
    assert [(bar.n, bar.total) for bar in bars] == [(9, 9)]
    assert "denoising 3 images: 100%|" in capsys.readouterr().err
    sd.generate(pipe, ["red", "blue", "green"], settings=s, batch_size=2, progress=False)
    assert capsys.readouterr().err == ""


def test_prompts_and_captions_longer_than_the_text_encoders_read_are_named(tmp_path, capsys):
    """CLIP reads 77 tokens and T5 t5_length: the rest of a longer prompt was dropped without a word (diffusers
    warns). One line with a count, not a line per prompt or caption."""
    pipe = sd.tiny_pipeline(t5_length=16)                               # one token per character
    s = sd.SampleSettings(steps=1, width=32, height=32, cfg=1.0)
    sd.generate(pipe, ["red", "b" * 20, "c" * 90, "b" * 20], settings=s, progress=False)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["warning: 3 of 4 prompts are cut (1 at CLIP's 77, 3 at T5's 16 tokens): the rest of them "
                     "is ignored, e.g. T5 does not read 'b b b b b'"]           # the 5 of 20 past T5's 15 + <eos>
    sd.generate(pipe, ["red"], settings=s, progress=False)
    assert capsys.readouterr().err == ""
    cfg = dataclasses.replace(s, cfg=4.0)      # the negative prompt was counted among the prompts: "1 of 3"
    sd.generate(pipe, ["red", "blue"], "x" * 30, settings=cfg, progress=False)
    assert capsys.readouterr().err.strip().splitlines() == [
        "warning: 1 of 1 negative prompts is cut (1 at T5's 16 tokens): the rest of it is ignored, e.g. T5 does not "
        f"read {' '.join('x' * 15)!r}"]
    sd.generate(pipe, ["b" * 20], settings=cfg, progress=False)
    assert "1 of 1 prompts is cut" in capsys.readouterr().err
    sd.generate(pipe, ["red"], "x" * 30, settings=s, progress=False)      # cfg 1: the negative is not read
    assert capsys.readouterr().err.strip() == "warning: the negative prompt has no effect without CFG (cfg 1.0 is 1 or less)"
    items = [{"path": tmp_path / f"{i}.png", "caption": c, "size": (64, 64)}
             for i, c in enumerate(["red", "d" * 20, "e" * 80, "f" * 30])]
    for item in items:
        Image.new("RGB", (64, 64)).save(item["path"])
    cfg = tiny_config(tmp_path)
    sd.LatentDataset(items, pipe, cfg, cfg.model)
    assert [line for line in capsys.readouterr().err.splitlines() if "warning" in line] == [   # not tqdm's
        "warning: 3 of 4 captions are cut (1 at CLIP's 77, 3 at T5's 16 tokens): the rest of them is ignored, "
        "e.g. T5 does not read 'd d d d d'"]


def test_the_warning_about_cut_captions_comes_before_the_images_are_encoded(tmp_path, monkeypatch):
    """The caching split into the VAE's pass, then the text encoders': the warning (the tokenizers', no GPU)
    moved into the second, after hours of encoding images on a first run of 20,000, not before as it was."""
    pipe, said = sd.tiny_pipeline(t5_length=16), []
    monkeypatch.setattr(sd, "warn_cut", lambda *args: said.append("warned"))
    real_encode = pipe.vae.encode_moments
    monkeypatch.setattr(pipe.vae, "encode_moments", lambda *args: said.append("encoded") or real_encode(*args))
    make_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path)
    sd.LatentDataset(sd.scan_dataset(cfg.dataset, cfg.output_dir), pipe, cfg, cfg.model)
    assert said[0] == "warned" and "encoded" in said, said


def test_the_warning_about_a_cut_prompt_shows_the_words_that_are_lost(capsys):
    """It showed the start of the prompt, which the text encoders read: a user wants to know which words are
    lost. Those of the window that loses most (the tiny tokenizers: a token per letter, spaces dropped)."""
    s = sd.SampleSettings(steps=1, width=32, height=32, cfg=1.0)
    sd.generate(sd.tiny_pipeline(t5_length=16), ["abcdefghijklmno xyz9"], settings=s, progress=False)
    assert capsys.readouterr().err.strip().endswith("e.g. T5 does not read 'x y z 9'")
    sd.generate(sd.tiny_pipeline(use_t5=False), ["a" * 75 + " zy,9"], settings=s, progress=False)
    assert capsys.readouterr().err.strip().endswith("(1 at CLIP's 77 tokens): the rest of it is ignored, e.g. CLIP "
                                                    "does not read 'z y , 9'")
    sd.generate(sd.tiny_pipeline(t5_length=90), ["a" * 80 + "bc"], settings=s, progress=False)   # CLIP's 77 first
    assert capsys.readouterr().err.strip().endswith("e.g. CLIP does not read 'a a a a a b c'")


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


def test_a_second_add_lora_on_other_layers_keeps_the_first_ones_trainable():
    """A fork giving attention and MLP LoRAs their own ranks calls add_lora twice: the second froze the first's
    adapters, and an optimizer given both lists trained only the second, without a word."""
    model = sd.tiny_pipeline().mmdit
    first = sd.add_lora(model, 8, targets="attn")
    second = sd.add_lora(model, 4, targets=r"mlp\.fc[12]$")
    assert all(p.requires_grad for p in first + second)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in first + second}                   # and the rest of the model frozen


def test_a_second_add_lora_on_the_same_layers_says_a_layer_takes_one():
    """add_lora twice on the same layers (a fork trying another rank) was told to "merge it first
    (load_lora(..., merge=True))": no load_lora merges an adapter that add_lora made."""
    model = tiny_mmdit()
    sd.add_lora(model, 8, targets="attn")
    one_line_error(lambda: sd.add_lora(model, 4, targets="attn_mlp"),
                   r"^joint_blocks.0.context_block.attn.qkv already has a LoRA \(add_lora's or an unmerged "
                   r"load_lora's\): one per layer; target other layers, or load a file merged")


def test_a_lora_added_to_a_model_in_eval_mode_samples_without_dropout():
    """add_lora(..., dropout=0.5) on a loaded (eval) pipeline made LoRA layers in train mode: the model said
    training=False, yet generate() dropped out LoRA inputs, so a seed gave another image on every call."""
    pipe, s = sd.tiny_pipeline(), sd.SampleSettings(steps=2, width=32, height=32)
    params = sd.add_lora(pipe.mmdit, rank=4, targets="all", dropout=0.5)
    with torch.no_grad():
        for up in params[1::2]:                             # a trained LoRA's
            up.normal_(generator=torch.Generator().manual_seed(0))
    images = [np.asarray(sd.generate(pipe, ["red"], settings=s, progress=False)[0]) for _ in range(2)]
    assert np.array_equal(*images)
    assert {m.training for m in sd.lora_layers(pipe.mmdit.train()).values()} == {True}    # and trains with it


def test_a_fresh_lora_down_is_drawn_as_peft_draws_it():
    """PEFT (diffusers' training scripts) draws lora_A uniform in +-1/sqrt(in_features), kaiming_uniform with
    a = sqrt(5), and lora_B zero: a wider draw trains faster at the same lr than the recipes it is set from."""
    torch.manual_seed(0)
    layer = sd.LoRALinear(torch.nn.Linear(256, 64), rank=16, alpha=16)
    bound, drawn = 1 / math.sqrt(256), layer.lora_down.weight.abs().max().item()     # 4,096 draws
    assert 0.99 * bound < drawn <= bound and not layer.lora_up.weight.any()


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
    for blocks in ("1-5", "2,3"):                       # blocks the model lacks: an error, never cut short
        one_line_error(lambda: sd.add_lora(tiny_mmdit(), blocks=blocks), "names block .* joint blocks are 0-2")
    one_line_error(lambda: sd.load_config(None, ["lora.blocks=0-99999999999"]), "names block 99999999999")


def test_the_target_presets_wrap_the_layers_their_names_say():
    """attn: both streams' attention qkv and output projections (diffusers' default layers); attn_mlp: those and
    both MLP layers; dual attention (attn2) only in `all`. The last text block has no
    projection or MLP (pre_only)."""
    model = tiny_mmdit(dual=(0,))
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    attn = {n for n in linears if n.startswith("joint_blocks.") and n.endswith((".attn.qkv", ".attn.proj"))}
    mlp = {n for n in linears if n.startswith("joint_blocks.") and n.endswith((".mlp.fc1", ".mlp.fc2"))}
    assert len(attn) == 3 * 4 - 1 and len(mlp) == 3 * 4 - 2               # 3 blocks, 2 streams
    assert set(sd.lora_targets(model, 4, "attn", "")) == attn
    assert set(sd.lora_targets(model, 4, "attn_mlp", "")) == attn | mlp


def test_lora_blocks_reversed_or_open_range_is_refused():
    """lora.blocks '0-5,12-8' trained only blocks 0-5 (a reversed range added nothing, silently) and '3-' trained
    block 3 alone: both are typos of a range, refused before anything loads."""
    for blocks in ("0-5,12-8", "3-", "2²", "1-²"):                   # superscripts: isdigit, not int()
        one_line_error(lambda: sd.load_config(None, [f"lora.blocks={blocks}"]), "lora.blocks must look like")
    assert sd.parse_blocks("0-5,7,9-9", 24) == {0, 1, 2, 3, 4, 5, 7, 9}
    assert sd.parse_blocks("23", 24) == {23}                               # the last block, and one past it:
    one_line_error(lambda: sd.parse_blocks("20-24", 24), "names block 24: the model's joint blocks are 0-23")


def test_merge_and_unmerge():
    model = lora_model()
    x = mmdit_inputs()
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        unmerged = model(*x)
        set_lora_merged(model, True)
        merged = model(*x)
        set_lora_merged(model, False)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert (merged - base_output(base, x)).abs().max() > 1e-3
    for k, v in base.items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("fp8", [False, True])
def test_lora_gradients_equal_autograd_of_the_plain_formula(fp8, dropout):
    """FrozenLinear's hand-written backward gives autograd's gradients of W x + b + scale * up(down(dropout(x)))
    for x, down and up, on a full or an fp8 W, with and without dropout: fp32 exactly, bf16 autocast as autograd
    computes it (bf16 matmuls, fp32 gradients); and no input gradient is computed when none is wanted."""
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 48)
    base = sd.Fp8Linear(*sd.quantize_fp8(base.weight.detach()), base.bias) if fp8 else base
    layer = sd.LoRALinear(base, rank=4, alpha=2.0, dropout=dropout)
    torch.nn.init.normal_(layer.lora_up.weight)
    down, up = layer.lora_down.weight, layer.lora_up.weight
    x, grad_out = torch.randn(2, 5, 32), torch.randn(2, 5, 48)

    def grads(fn, x, autocast):
        x = x.clone().requires_grad_()
        down.grad = up.grad = None
        torch.manual_seed(1)                                    # the same dropout mask on both sides
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(x)
        out.backward(grad_out.to(out.dtype))
        return out.float(), x.grad, down.grad, up.grad

    def reference(x):
        weight = sd.dequantize_fp8(layer.weight, layer.weight_scale, x.dtype) if fp8 else layer.weight
        kept = layer.dropout(x)
        return torch.nn.functional.linear(x, weight, layer.bias) + layer.scale * (kept @ down.T @ up.T)
    for got, want in zip(grads(layer, x, False), grads(reference, x, False)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for weights in (torch.float32, torch.bfloat16):     # autocast on fp32 weights (the usual AMP recipe) and bf16
        layer.weight.data = layer.weight.data if fp8 else layer.weight.data.to(weights)
        layer.bias.data = layer.bias.data.to(weights)
        for got, want in zip(grads(layer, x.bfloat16(), True), grads(reference, x.bfloat16(), True)):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=2e-2)
    from torch.profiler import profile
    for needs_grad, matmuls in ((True, 5), (False, 3)):        # no input gradient wanted: none computed
        with torch.autocast("cpu", dtype=torch.bfloat16):      # (5: x's gradient through W and the update)
            out = layer(x.bfloat16().requires_grad_(needs_grad)).float().sum()
        with profile() as prof:
            out.backward()
        assert sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm")) == matmuls


def test_a_forward_hook_on_fc1_keeps_its_output_when_sampling_without_gradients():
    """A research fork records activations with forward hooks, under no_grad: the MLP's in-place GELU (which saves
    a buffer when no graph is kept) overwrote the fc1 output a hook had kept, so it held GELU(fc1) instead."""
    model, kept = tiny_mmdit(), []
    model.joint_blocks[0].x_block.mlp.fc1.register_forward_hook(lambda module, args, out: kept.append(out.detach()))
    x, t, ctx, y = mmdit_inputs()
    with torch.no_grad():
        plain = model(x, t, ctx, y)
    graph = model(x, t, ctx, y)
    assert torch.equal(kept[0], kept[1]) and torch.equal(plain, graph.detach())


def test_a_global_forward_hook_keeps_fc1s_output_when_sampling_without_gradients():
    """The same with a global hook (nn.modules.module.register_module_forward_hook, as activation-recording tools
    set one for every module): fc1 itself has none, so the in-place GELU overwrote the output the hook had kept."""
    model, kept = tiny_mmdit(), []
    fc1 = model.joint_blocks[0].x_block.mlp.fc1
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: kept.append(out.detach()) if module is fc1 else None)
    try:
        x, t, ctx, y = mmdit_inputs()
        with torch.no_grad():
            plain = model(x, t, ctx, y)
        graph = model(x, t, ctx, y)
    finally:
        handle.remove()
    assert torch.equal(kept[0], kept[1]) and torch.equal(plain, graph.detach())


def test_frozen_layers_take_an_empty_batch_like_nn_linear():
    """0 images or 0 tokens pass a LoRA layer and an fp8 layer as they pass nn.Linear, forward and backward."""
    base = torch.nn.Linear(8, 12)
    for layer in (sd.LoRALinear(base, rank=2, alpha=2.0), sd.Fp8Linear(*sd.quantize_fp8(base.weight), base.bias)):
        for shape in ((0, 8), (2, 0, 8)):
            x = torch.randn(shape, requires_grad=True)
            out = layer(x)
            assert out.shape == (*shape[:-1], 12)
            out.sum().backward()
            assert x.grad.shape == shape


def test_norms_run_in_their_input_dtype_under_autocast(monkeypatch):
    """LayerNorm and the q/k RMSNorms run with autocast off, in their input's bf16: CUDA's autocast lists them as
    fp32 operators, and the matmul or attention after them would cast their fp32 outputs back (two copies)."""
    calls = []

    def spy(norm):
        def spied(x, *args, **kwargs):
            calls.append((norm.__name__, torch.is_autocast_enabled("cpu"), x.dtype))
            return norm(x, *args, **kwargs)
        return spied
    for name in ("layer_norm", "rms_norm"):
        monkeypatch.setattr(torch.nn.functional, name, spy(getattr(torch.nn.functional, name)))
    model = tiny_mmdit().to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(1, 16, 8, 8), torch.tensor([500.0]), torch.randn(1, 7, 32), torch.randn(1, 24))
    assert {name for name, _, _ in calls} == {"layer_norm", "rms_norm"}
    assert {(autocast, dtype) for _, autocast, dtype in calls} == {(False, torch.bfloat16)}


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
    # the update in fp32, rounded once: the bf16 rounding of the fp32 sum, but for a rare tie (in bf16: 42 % off)
    update = 0.5 * (xb.float() @ layer.lora_down.weight.T @ layer.lora_up.weight.T)
    in_fp32 = (torch.nn.functional.linear(xb, layer.weight, layer.bias).float() + update).bfloat16()
    assert (out != in_fp32).float().mean() < 0.02
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
    assert sample.trained_settings([str(tmp_path / "l.safetensors")]) == {"t5_length": 77, "use_t5": True}
    header = sd.read_safetensors(tmp_path / "l.safetensors", with_metadata=True, prefix=None)[1]
    info = json.loads(header["sd35_lora"])       # diffusers' lora_B holds alpha / rank: a reader must not again
    names = {re.sub(r"\.(lora_\w+\.weight|alpha)$", "", k) for k in load_file(tmp_path / "l.safetensors")}
    kohya = {"lora_unet_" + name.replace(".", "_") for name in sd.lora_layers(trained)}    # ComfyUI's names
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv" in kohya and (names == kohya) == (fmt == "kohya")
    assert (info["format"], info["rank"], info["alpha"], info["alpha_folded"]) == (fmt, 4, 8, fmt == "diffusers")


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_a_lora_loaded_unmerged_at_a_scale_saves_as_the_model_runs(fmt, tmp_path):
    """load_lora(merge=False, scale=0.5) then save_lora wrote the adapters at scale 1: the saved file gave other
    images than the model it was saved from. It now holds the update the model applies (scale in alpha)."""
    sd.save_lora(lora_model(), tmp_path / "trained.safetensors", fmt)
    x = mmdit_inputs()
    for scale in (0.5, -1.5, 0.0):
        model = tiny_mmdit()
        sd.load_lora(model, tmp_path / "trained.safetensors", scale=scale, merge=False)
        sd.save_lora(model, tmp_path / "saved.safetensors", fmt)
        fresh, merged = tiny_mmdit(), tiny_mmdit()
        sd.load_lora(fresh, tmp_path / "saved.safetensors")
        sd.load_lora(merged, tmp_path / "trained.safetensors", scale=scale)     # the scale is applied at all
        with torch.no_grad():
            torch.testing.assert_close(fresh(*x), model(*x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model(*x), merged(*x), atol=1e-5, rtol=1e-5)
        alphas = [t.item() for k, t in load_file(tmp_path / "saved.safetensors").items() if k.endswith("alpha")]
        assert 0 not in alphas                 # kohya's loader reads alpha 0 as alpha = rank: full strength


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


def test_every_key_layout_comfyui_reads_merges_the_same_update(tmp_path):
    """One adapter on block 1's image attention output, in each key layout read here (the prefixes and role
    names of kohya, ComfyUI, diffusers/PEFT, OneTrainer and SimpleTuner's LyCORIS): each merges up @ down."""
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g)
    official, diffusers = "joint_blocks.1.x_block.attn.proj", "transformer_blocks.1.attn.to_out.0"
    flat = lambda name: name.replace(".", "_")
    layouts = {"kohya": (f"lora_unet_{flat(official)}", "lora_down", "lora_up"),
               "official": (f"model.diffusion_model.{official}", "lora_down", "lora_up"),
               "comfyui": (f"diffusion_model.{official}", "lora_down", "lora_up"),
               "diffusers": (f"transformer.{diffusers}", "lora_A", "lora_B"),
               "peft": (f"base_model.model.{diffusers}", "lora_A", "lora_B"),
               "peft model": (f"base_model.model.{diffusers}", "lora_A.default", "lora_B.default"),
               "no prefix": (diffusers, "lora_A", "lora_B"),
               "comfyui diffusers3": (f"transformer.{diffusers}", "lora.down", "lora.up"),
               "onetrainer": (f"lora_transformer_{flat(diffusers)}", "lora_down", "lora_up"),
               "lycoris": (f"lycoris_{flat(diffusers)}", "lora_down", "lora_up")}
    for name, (key, a, b) in layouts.items():
        save_file({f"{key}.{a}.weight": down, f"{key}.{b}.weight": up}, tmp_path / "lora.safetensors")
        model = tiny_mmdit()
        before = model.get_submodule(official).weight.clone()
        assert sd.load_lora(model, tmp_path / "lora.safetensors") == 1, name
        torch.testing.assert_close(model.get_submodule(official).weight - before, up @ down, msg=name)


def test_a_onetrainer_omi_lora_loads_as_the_same_adapters_in_diffusers_and_comfyui_names(tmp_path, capsys):
    """OneTrainer saves SD3 LoRAs in the OMI layout (official names under `transformer.`, q, k and v as
    `qkv.0`-`qkv.2`; the text encoders under `clip_l.`, `clip_g.`, `t5.`). Its q/k/v adapters were 'ignored ... no
    LoRA weights of this model' and the rest merged, its text part left out with them: another LoRA than the one
    OneTrainer trained. Each adapter now merges as the same one in diffusers' and ComfyUI's names does."""
    g = torch.Generator().manual_seed(0)
    layers = {n: m for n, m in sd.loadable_layers(sd.tiny_pipeline().mmdit, sd.tiny_pipeline().text).items()
              if isinstance(m, torch.nn.Linear)}
    omi, twin = {}, {}
    adapters = [("transformer.joint_blocks.1.x_block.attn.qkv.{}", "transformer.transformer_blocks.1.attn.{}",
                 "joint_blocks.1.x_block.attn.qkv", ("to_q", "to_k", "to_v")),
                ("transformer.joint_blocks.0.context_block.attn.qkv.{}", "transformer.transformer_blocks.0.attn.{}",
                 "joint_blocks.0.context_block.attn.qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
                ("transformer.joint_blocks.0.x_block.attn2.qkv.{}", "transformer.transformer_blocks.0.attn2.{}",
                 "joint_blocks.0.x_block.attn2.qkv", ("to_q", "to_k", "to_v")),
                ("transformer.joint_blocks.1.x_block.mlp.fc1{}", "diffusion_model.joint_blocks.1.x_block.mlp.fc1{}",
                 "joint_blocks.1.x_block.mlp.fc1", ("",)),
                ("clip_l.text_model.encoder.layers.0.self_attn.q_proj{}",
                 "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj{}",
                 "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", ("",)),
                ("clip_g.text_model.encoder.layers.1.mlp.fc2{}",
                 "text_encoders.clip_g.transformer.text_model.encoder.layers.1.mlp.fc2{}",
                 "text_encoder_2.text_model.encoder.layers.1.mlp.fc2", ("",)),
                ("t5.encoder.block.0.layer.0.SelfAttention.q{}",
                 "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q{}",
                 "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q", ("",))]
    for omi_key, twin_key, layer, parts in adapters:
        rows = layers[layer].out_features // len(parts)
        for i, part in enumerate(parts):
            down, up = torch.randn(2, layers[layer].in_features, generator=g), torch.randn(rows, 2, generator=g)
            key, other = omi_key.format(i if part else ""), twin_key.format(part)
            omi.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(3.0)})
            twin.update({f"{other}.lora_down.weight": down, f"{other}.lora_up.weight": up,
                         f"{other}.alpha": torch.tensor(3.0)})
    save_file(omi, tmp_path / "omi.safetensors", {"modelspec.architecture": "stable-diffusion-v3.5-medium/lora"})
    save_file(twin, tmp_path / "twin.safetensors")
    loaded = []
    for name in ("omi", "twin"):
        pipe = sd.tiny_pipeline()
        assert sd.load_lora(pipe.mmdit, tmp_path / f"{name}.safetensors", scale=0.7, text=pipe.text) == 7
        assert capsys.readouterr().err == ""
        loaded.append({n: m.weight for n, m in sd.loadable_layers(pipe.mmdit, pipe.text).items()
                       if isinstance(m, torch.nn.Linear)})
    assert all(torch.equal(loaded[0][n], loaded[1][n]) for n in layers)
    assert not any(torch.equal(loaded[0][layer], layers[layer].weight) for *_, layer, _ in adapters)


def test_a_second_unmerged_lora_on_the_same_layer_is_refused_touching_nothing(tmp_path):
    g = torch.Generator().manual_seed(0)
    pair = lambda key: {f"{key}.lora_down.weight": torch.randn(2, 64, generator=g),
                        f"{key}.lora_up.weight": torch.randn(64, 2, generator=g)}
    save_file(pair("lora_unet_joint_blocks_1_x_block_attn_proj"), tmp_path / "a.safetensors")
    save_file({**pair("lora_unet_joint_blocks_0_x_block_attn_proj"),
               **pair("lora_unet_joint_blocks_1_x_block_attn_proj")}, tmp_path / "b.safetensors")
    model = tiny_mmdit()
    sd.load_lora(model, tmp_path / "a.safetensors", merge=False)
    one_line_error(lambda: sd.load_lora(model, tmp_path / "b.safetensors", merge=False),
                   "joint_blocks.1.x_block.attn.proj already has an unmerged LoRA")
    assert list(sd.lora_layers(model)) == ["joint_blocks.1.x_block.attn.proj"]          # block 0 untouched


class FailsWhenUsed(torch.Tensor):
    """A LoRA tensor whose first use in the update raises, as a Ctrl-C or an out-of-memory error part way through
    would. Its norm, which load_lora checks before it touches a layer, it gives: raising there never reached the
    undoing of the layers done."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is not torch.linalg.norm:
            raise KeyboardInterrupt
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("merge, fp8", [(True, False), (True, True), (False, False)])
def test_a_lora_load_failing_part_way_leaves_the_model_as_it_was(tmp_path, monkeypatch, merge, fp8):
    """load_lora changed the layers one by one: a Ctrl-C part way (a notebook's interrupt) left the model half
    merged, and loading the file again merged its first layers twice. Now the layers done are undone: an
    unmerged LoRA's exactly, a merged one's by subtracting it again (within rounding; fp8: within its step)."""
    sd.save_lora(lora_model(), tmp_path / "l.safetensors")
    model = sd.quantize_mmdit(tiny_mmdit()) if fp8 else tiny_mmdit()
    sd.load_lora(model, tmp_path / "l.safetensors", scale=0.3, merge=not merge)     # one already there
    before, modules = {k: v.clone() for k, v in model.state_dict().items()}, dict(model.named_modules())
    read_lora = sd.read_lora

    def late_failure(model, path, text=None):
        adapters = read_lora(model, path, text)
        name = list(adapters)[len(adapters) // 2]                              # half of the layers come first
        adapters[name] = (adapters[name][0], adapters[name][1].as_subclass(FailsWhenUsed))
        return adapters
    monkeypatch.setattr(sd, "read_lora", late_failure)
    with pytest.raises(KeyboardInterrupt):
        sd.load_lora(model, tmp_path / "l.safetensors", merge=merge)
    assert dict(model.named_modules()) == modules
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, was in before.items():             # a merge moves weights by >= 0.05 (fp32), 4.5 e4m3 steps (fp8)
        if was.dtype == torch.float8_e4m3fn:        # dequantized: within one e4m3 step at the row's largest
            scale = key.replace("weight", "weight_scale")
            error = (after[key].float() * after[scale][:, None] - was.float() * before[scale][:, None]).abs()
            assert error.le(before[scale][:, None] * 34).all(), key    # 448 - 416 = 32, and the scale's change
        elif not key.endswith("weight_scale"):
            assert torch.allclose(after[key], was, rtol=0, atol=1e-5), key
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert merge or not changed, changed                            # unmerged: put back exactly


def test_an_unmerged_lora_leaves_the_global_seed_alone_and_loads_frozen(tmp_path):
    """load_lora(merge=False) wraps layers in LoRALinear, whose random init it overwrites at once: torch.randn
    must give what it gave without the call. Its adapters are for inference (sample.py --no-merge): they do not
    require grad, and a LoRA added on other layers for training still does."""
    g = torch.Generator().manual_seed(0)
    save_file({"lora_unet_joint_blocks_1_x_block_attn_proj.lora_down.weight": torch.randn(2, 64, generator=g),
               "lora_unet_joint_blocks_1_x_block_attn_proj.lora_up.weight": torch.randn(64, 2, generator=g)},
              tmp_path / "a.safetensors")
    model = tiny_mmdit().requires_grad_(False)                                   # frozen, as load_mmdit's are
    torch.manual_seed(0)
    expected = torch.randn(8)
    torch.manual_seed(0)
    sd.load_lora(model, tmp_path / "a.safetensors", merge=False)
    assert torch.equal(torch.randn(8), expected)
    assert not [name for name, p in model.named_parameters() if p.requires_grad]
    trained = sd.add_lora(model, rank=2, targets=r"attn\.qkv$")
    assert {id(p) for p in trained} == {id(p) for p in model.parameters() if p.requires_grad}


def test_an_unmerged_lora_in_an_eval_model_is_in_eval_mode_too(tmp_path):
    """load_lora(merge=False) on a loaded pipeline's MMDiT (in eval mode) left its new LoRALinear layers in train
    mode: pipe.mmdit.training False, yet ~40 of its modules training (add_lora keeps the model's mode)."""
    pipe = sd.load_pipeline("tiny", device="cpu")
    trained = sd.tiny_pipeline().mmdit
    sd.add_lora(trained, rank=4, targets="all")
    sd.save_lora(trained, tmp_path / "a.safetensors")
    sd.load_lora(pipe.mmdit, tmp_path / "a.safetensors", merge=False)
    assert sd.lora_layers(pipe.mmdit) and not [name for name, m in pipe.mmdit.named_modules() if m.training]


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")      # PEFT, as a second adapter loads
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
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-2                                  # the LoRA really does something
    sd.save_lora(ours, tmp_path / "kohya.safetensors", "kohya")              # which diffusers cannot load
    with torch.no_grad():                  # --lora-scale is diffusers' joint_attention_kwargs={"scale": ...}
        expected = ref.transformer(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                                   timestep=t, joint_attention_kwargs={"scale": 0.6}, return_dict=False)[0]
        for name, merge in (("lora", True), ("lora", False), ("kohya", True)):
            scaled = sd.load_mmdit(folder)
            sd.load_lora(scaled, tmp_path / f"{name}.safetensors", scale=0.6, merge=merge)
            torch.testing.assert_close(scaled(x, t, context, pooled), expected, atol=1e-5, rtol=1e-5)
    ref_images = run_diffusers(ref, ["a red fox"], "", seed=1, steps=3, t5_length=16)
    paths = sample.main(["--model", str(folder), "--lora", str(tmp_path / "lora.safetensors"), "--prompt", "a red fox",
                         "--seed", "1", "--steps", "3", "--cfg", "4.5", "--sampler", "euler",
                         "--t5-length", "16", "--width", "64", "--height", "64", "--out", str(tmp_path / "o")])
    assert_images_close(images_of(paths), ref_images)
    g = torch.Generator().manual_seed(2)    # a second LoRA on the same layers: two adapters in diffusers
    for layer in sd.lora_layers(ours).values():
        layer.lora_up.weight.data = torch.randn(layer.lora_up.weight.shape, generator=g) * 0.2
    sd.save_lora(ours, tmp_path / "second.safetensors")
    ref.load_lora_weights(tmp_path / "second.safetensors", adapter_name="second")
    ref.set_adapters([*ref.get_list_adapters()["transformer"]], [0.6, -0.4])     # [the first, "second"]
    both = sd.load_mmdit(folder)
    sd.load_lora(both, tmp_path / "lora.safetensors", scale=0.6, merge=False)
    sd.load_lora(both, tmp_path / "second.safetensors", scale=-0.4)
    with torch.no_grad():
        expected = ref.transformer(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                                   timestep=t, return_dict=False)[0]
        torch.testing.assert_close(both(x, t, context, pooled), expected, atol=1e-5, rtol=1e-5)


def peft_lora_output(transformer) -> tuple[tuple, torch.Tensor]:
    """make_components()'s transformer with PEFT adapters: its LoRA weights made random (PEFT starts lora_B at 0)
    -> (x, t, context, pooled), its output for them."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([600.0])
    context, pooled = torch.randn(1, 9, 96, generator=g), torch.randn(1, 80, generator=g)
    with torch.no_grad():
        expected = transformer(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                               return_dict=False)[0]
    return (x, t, context, pooled), expected


@pytest.mark.parametrize("rslora, patterns", [(False, False), (True, False), (False, True), (True, True)])
def test_peft_lora_with_alpha_metadata_matches_diffusers(tmp_path, rslora, patterns):
    """A LoRA trained with PEFT (lora_alpha != r, so the scale lives in the metadata), saved by diffusers; rsLoRA
    (use_rslora in the metadata) scales by alpha / sqrt(r), as diffusers loads it; per-module ranks and alphas
    (rank_pattern, alpha_pattern: keys matched as PEFT matches them) as PEFT computes them."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    parts = make_components()
    transformer = parts["transformer"]
    transformer.save_pretrained(tmp_path / "base" / "transformer")
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_k", "add_v_proj", "to_out.0", "norm_out.linear"],
                        use_rslora=rslora, rank_pattern={"to_q": 2, "transformer_blocks.1.attn.to_k": 3} if patterns else {},
                        alpha_pattern={"add_v_proj": 5, "norm_out.linear": 2.5, "k": 9} if patterns else {})
    with warnings.catch_warnings(record=True) as caught:    # k, a tail of to_k and no module's name: PEFT
        warnings.simplefilter("always")                     # matches nothing with it, and says so
        transformer.add_adapter(config)
    assert any("keys did not match any targeted module" in str(w.message) for w in caught) == patterns
    (x, t, context, pooled), expected = peft_lora_output(transformer)
    lora = get_peft_model_state_dict(transformer)
    StableDiffusion3Pipeline.save_lora_weights(tmp_path, transformer_lora_layers=lora,
                                               transformer_lora_adapter_metadata=config.to_dict())
    written = tmp_path / "pytorch_lora_weights.safetensors"
    unprefixed = tmp_path / "unprefixed.safetensors"
    save_file({k.removeprefix("transformer."): v for k, v in load_file(written).items()}, unprefixed,
              sd.read_safetensors(written, with_metadata=True)[1])
    for path in (written, unprefixed):
        ours = sd.load_mmdit(tmp_path / "base")
        sd.load_lora(ours, path)
        with torch.no_grad():
            torch.testing.assert_close(ours(x, t, context, pooled), expected, atol=1e-5, rtol=1e-5)
    for bad in ({"to_(q": 2}, {"to_q": "2"}, [2]):                  # untrusted metadata: a one-line error
        save_file(load_file(written), tmp_path / "bad.safetensors",
                  {"lora_adapter_metadata": json.dumps({"transformer.alpha_pattern": bad})})
        one_line_error(lambda: sd.load_lora(ours, tmp_path / "bad.safetensors"), "alpha_pattern (is no|key .* regex)")
    save_file({"lora_unet_joint_blocks_0_x_block_attn_proj.dora_scale": torch.ones(1, 192)}, tmp_path / "dora.safetensors")
    with pytest.raises(sd.UserError, match="DoRA"):
        sd.load_lora(ours, tmp_path / "dora.safetensors")
    save_file({"lora_unet_joint_blocks_0_x_block_attn_proj.hada_w1_a": torch.ones(4, 192)}, tmp_path / "loha.safetensors")
    with pytest.raises(sd.UserError, match="LoHa"):                    # LyCORIS, not an 'incomplete pair'
        sd.load_lora(ours, tmp_path / "loha.safetensors")


@pytest.mark.parametrize("rslora_and_patterns", [False, True])
def test_a_peft_adapter_model_takes_its_scale_from_the_adapter_config_json_beside_it(tmp_path, rslora_and_patterns):
    """PeftModel.save_pretrained (Flash Diffusion's SD3 LoRA, scripts that wrap the transformer in PEFT) keeps
    lora_alpha, rank/alpha_pattern and use_rslora in adapter_config.json beside adapter_model.safetensors, where
    PeftModel.from_pretrained reads them: loaded here at alpha = rank, it gave other images than PEFT's."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    transformer = make_components()["transformer"]
    transformer.save_pretrained(tmp_path / "base" / "transformer")
    patterns = {"rank_pattern": {"to_q": 2}, "alpha_pattern": {"add_v_proj": 5}} if rslora_and_patterns else {}
    peft_model = get_peft_model(transformer, LoraConfig(r=4, lora_alpha=16, use_rslora=rslora_and_patterns,
                                                        target_modules=["to_q", "to_k", "add_v_proj", "to_out.0"],
                                                        **patterns))
    (x, t, context, pooled), expected = peft_lora_output(transformer)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter = tmp_path / "adapter" / "adapter_model.safetensors"
    assert next(iter(load_file(adapter))).startswith("base_model.model.transformer_blocks.")
    with torch.no_grad():
        ours = sd.load_mmdit(tmp_path / "base")
        sd.load_lora(ours, adapter)
        torch.testing.assert_close(ours(x, t, context, pooled), expected, atol=1e-5, rtol=1e-5)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": "16"}))
    one_line_error(lambda: sd.load_lora(sd.load_mmdit(tmp_path / "base"), adapter), "lora_alpha = '16' is not in")


def test_an_unreadable_or_broken_adapter_config_json_is_named_not_skipped_or_blamed_on_the_weights(tmp_path,
                                                                                                  monkeypatch):
    """adapter_config.json holds a PEFT adapter's scale (lora_alpha). An unreadable one was a bare PermissionError
    traceback; a folder or dead link of that name was skipped, the LoRA loaded at alpha = r (other images, no
    word); a broken one was blamed on adapter_model.safetensors ("its ... metadata is no JSON object; save it
    again"), whose header holds none. Each is now a one-line error naming adapter_config.json, with its fix."""
    adapter, config = tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"
    sd.save_lora(lora_model(), tmp_path / "lora.safetensors")
    save_file(load_file(tmp_path / "lora.safetensors"), adapter)            # as PEFT saves it: no metadata
    for content, match in (("{", "no JSON object"), ("[]", "no JSON object"), ('"r"', "no JSON object"),
                           ('{"lora_alpha": "8"}', "lora_alpha = '8'"), ('{"alpha_pattern": {"to_q": "2"}}',
                                                                          "alpha_pattern is no")):
        config.write_text(content)
        one_line_error(lambda: sd.load_lora(tiny_mmdit(), adapter),
                       f"adapter_config.json: .*{match}.*fix it, or download the adapter again$")
    config.write_text('{"r": 16, "lora_alpha": 32}')
    with monkeypatch.context() as patch:
        failing_for(patch, "read_text", config.name, PermissionError(13, "Permission denied", str(config)))
        one_line_error(lambda: sd.load_lora(tiny_mmdit(), adapter),
                       r"cannot read .*adapter_config.json \(Permission denied\).*lora_alpha.*: make it readable")
    config.unlink()
    config.mkdir()
    one_line_error(lambda: sd.load_lora(tiny_mmdit(), adapter), r"adapter_config.json \(Is a directory\)")
    config.rmdir()
    config.symlink_to(tmp_path / "blobs" / "missing")
    one_line_error(lambda: sd.load_lora(tiny_mmdit(), adapter), r"adapter_config.json \(No such file")
    monkeypatch.setattr(sd, "load_pipeline", lambda *a, **k: pytest.fail("the models loaded before the error"))
    one_line_error(lambda: sample.main([*TINY_SAMPLE_ARGS, "--lora", str(adapter), "--out", str(tmp_path / "out")]),
                   r"adapter_config.json \(No such file")           # sample.py: before the models load


def test_a_regex_in_a_loras_alpha_pattern_is_refused_at_once_not_run_for_hours(tmp_path):
    """alpha_pattern keys come from the file's header and PEFT matches them as regexes: one of nested repeats,
    (\\w|\\w)*y, backtracks 2^n steps per module name (hours on the real model's).
    Plain module names, as PEFT and diffusers write them: test_peft_lora_with_alpha_metadata_matches_diffusers."""
    sd.save_lora(lora_model(), tmp_path / "lora.safetensors")
    tensors = load_file(tmp_path / "lora.safetensors")
    for key in (r"(\w|\w)*y", "attn.to_(q|k)"):
        save_file(tensors, tmp_path / "bad.safetensors",
                  {"lora_adapter_metadata": json.dumps({"transformer.alpha_pattern": {key: 3}})})
        start = time.perf_counter()
        one_line_error(lambda: sd.load_lora(tiny_mmdit(), tmp_path / "bad.safetensors"), re.escape(repr(key)))
        assert time.perf_counter() - start < 1


def test_a_loras_alpha_pattern_of_more_keys_than_any_model_has_modules_is_refused_at_once(tmp_path):
    """Each key is a regex matched against each module: 20,000 took minutes on the tiny model (a re.compile per
    key and module: the re cache holds 512), a 100 MB header's would take days on the real one."""
    sd.save_lora(lora_model(), tmp_path / "lora.safetensors")
    tensors = load_file(tmp_path / "lora.safetensors")
    many = {f"transformer_blocks.{i}.attn.to_q" for i in range(3, 20003)}     # none of the model's
    save_file(tensors, tmp_path / "many.safetensors",
              {"lora_adapter_metadata": json.dumps({"transformer.alpha_pattern": dict.fromkeys(many, 3)})})
    start = time.perf_counter()
    one_line_error(lambda: sd.load_lora(tiny_mmdit(), tmp_path / "many.safetensors"), "20000 keys.*at most")
    assert time.perf_counter() - start < 1


def test_bad_lora_files_are_clear_errors_and_change_nothing(tmp_path):
    model = tiny_mmdit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_file({"input_blocks.0.0.weight": torch.zeros(2, 2)}, tmp_path / "unet.safetensors")
    with pytest.raises(sd.UserError, match="not a LoRA.*UNet"):
        sd.load_lora(model, tmp_path / "unet.safetensors")
    params = [torch.nn.Parameter(torch.ones(2, 3))]        # given as the LoRA: was only 'not a LoRA', its keys
    sd.save_training_state(tmp_path / sd.STATE_FILE, params, torch.optim.AdamW(params), 1, sd.Config(), [])
    with pytest.raises(sd.UserError, match="not a LoRA.*a training state.*its LoRA is lora.safetensors in the same"):
        sd.load_lora(model, tmp_path / sd.STATE_FILE)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 2432),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(2432, 4)}, tmp_path / "large.safetensors")
    with pytest.raises(sd.UserError, match=r"attn\.qkv' takes \(64 -> 64\).*down \(4, 2432\)"):
        sd.load_lora(model, tmp_path / "large.safetensors")
    q, k = "transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_k"
    save_file({f"{q}.lora_A.weight": torch.zeros(4, 64), f"{q}.lora_B.weight": torch.zeros(72, 4),  # 192 rows with
               f"{k}.lora_A.weight": torch.zeros(4, 64), f"{k}.lora_B.weight": torch.zeros(56, 4)},  # v's: not q's 64
              tmp_path / "rows.safetensors")
    with pytest.raises(sd.UserError, match=r"attn\.qkv' takes \(64 -> 64\) per part.*up \(72, 4\)"):
        sd.load_lora(model, tmp_path / "rows.safetensors")
    save_file({"transformer.transformer_blocks.9.attn.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer.transformer_blocks.9.attn.to_q.lora_B.weight": torch.zeros(64, 4)}, tmp_path / "deep.safetensors")
    with pytest.raises(sd.UserError, match="matches no layer.*transformer_blocks.9"):
        sd.load_lora(model, tmp_path / "deep.safetensors")
    save_file({"lora_unet_joint_blocks_0_x_block_attn_proj.lora_down.weight": torch.zeros(4, 64),
               "lora_unet_joint_blocks_0_x_block_attn_proj.lora_up.weight": torch.zeros(64, 8)}, tmp_path / "rank.safetensors")
    with pytest.raises(sd.UserError, match=r"attn_proj' has down \(4, 64\) and up \(64, 8\): a LoRA pair"):
        sd.load_lora(model, tmp_path / "rank.safetensors")
    good = tmp_path / "good.safetensors"
    sd.save_lora(lora_model(), good)
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-100])
    with pytest.raises(sd.UserError, match="truncated"):
        sd.load_lora(model, tmp_path / "cut.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not sd.lora_layers(model)


def test_a_whole_model_file_given_as_a_lora_is_named_as_the_model_it_is(tmp_path):
    """sample.py --lora sd3.5_large.safetensors (the model file, beside the LoRAs in a UI's folders) said "it
    looks like a VAE", and the all-in-one checkpoint "a CLIP text encoder": the first signature that fit
    was its VAE's or text encoders', not its MMDiT's."""
    mmdit = {f"model.diffusion_model.{k}": v for k, v in tiny_mmdit().state_dict().items()}
    parts = {"vae": {"first_stage_model.decoder.up.0.block.0.conv1.weight": torch.zeros(1)},
             "all_in_one": {"first_stage_model.decoder.up.0.block.0.conv1.weight": torch.zeros(1),
                            "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.zeros(1)}}
    for name, others in parts.items():
        save_file({**mmdit, **others}, tmp_path / f"{name}.safetensors")
        one_line_error(lambda: sd.load_lora(tiny_mmdit(), tmp_path / f"{name}.safetensors"),
                       r"is not a LoRA read here \(.*; it looks like an SD3 MMDiT\)$")


def test_sample_cli_refuses_a_file_that_is_no_lora_before_loading_the_models(tmp_path, monkeypatch):
    """sample.py --model M --lora sd3.5_large.safetensors loaded M (minutes for Large), then read the whole file
    given as the LoRA into RAM (16 GB for Large's), and only then said it held no LoRA. Its header tells."""
    save_file({f"model.diffusion_model.{k}": v for k, v in tiny_mmdit().state_dict().items()},
              tmp_path / "model.safetensors")
    monkeypatch.setattr(sd, "load_pipeline", lambda *a, **k: pytest.fail("the models loaded before the error"))
    monkeypatch.setattr(sd, "read_lora", lambda *a, **k: pytest.fail("the file was read before the error"))
    one_line_error(lambda: sample.main([*TINY_SAMPLE_ARGS, "--lora", str(tmp_path / "model.safetensors"),
                                        "--out", str(tmp_path / "out")]),
                   r"model.safetensors is not a LoRA read here \(.*; it looks like an SD3 MMDiT\)$")


def test_sample_cli_refuses_another_models_lora_before_loading_the_models(tmp_path, monkeypatch):
    """An SDXL or FLUX LoRA holds LoRA keys, so sample.py's check of the names let it through: it was refused
    only once the models had loaded (minutes and 16 GB for Large), though its names alone tell."""
    pair = lambda key: {f"{key}.lora_{part}.weight": torch.ones(2, 64) for part in "AB"}
    save_file({**pair("lora_unet_input_blocks_4_1_proj_in"),
               **pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj")}, tmp_path / "sdxl.safetensors")
    save_file({**pair("transformer.transformer_blocks.0.attn.to_q"),
               **pair("transformer.single_transformer_blocks.0.attn.to_q")}, tmp_path / "flux.safetensors")
    save_file(pair("lora_unet_single_blocks_0_linear1"), tmp_path / "flux_single.safetensors")   # kohya's, those
    save_file(pair("lora_unet_output_blocks_0_1_proj_in"), tmp_path / "sdxl_output.safetensors")  # blocks only
    monkeypatch.setattr(sd, "load_pipeline", lambda *a, **k: pytest.fail("the models loaded before the error"))
    for name, kind in (("sdxl", r"an SD1.x/SDXL UNet"), ("flux", "a FLUX transformer"),
                       ("flux_single", "a FLUX transformer"), ("sdxl_output", r"an SD1.x/SDXL UNet")):
        one_line_error(lambda: sample.main([*TINY_SAMPLE_ARGS, "--lora", str(tmp_path / f"{name}.safetensors"),
                                            "--out", str(tmp_path / "out")]),
                       rf"{name}.safetensors matches no layer .*, a LoRA for another model\? \(it looks like {kind}\)$")


def test_load_lora_refuses_a_model_file_by_its_header_before_reading_its_tensors(tmp_path, monkeypatch):
    """load_lora(pipe.mmdit, "sd3.5_large.safetensors") from Python read the whole file (16 GB for Large's) into
    RAM before saying it held no LoRA: its names tell, as sample.py's check reads them."""
    save_file({f"model.diffusion_model.{k}": v for k, v in tiny_mmdit().state_dict().items()},
              tmp_path / "model.safetensors")
    real = sd.read_safetensors

    def names_only(path, with_metadata=False, prefix="", convert=None):
        if prefix is not None:
            pytest.fail("the tensors were read before the error")
        return real(path, with_metadata, prefix, convert)
    monkeypatch.setattr(sd, "read_safetensors", names_only)
    one_line_error(lambda: sd.load_lora(tiny_mmdit(), tmp_path / "model.safetensors"),
                   r"model.safetensors is not a LoRA read here \(.*; it looks like an SD3 MMDiT\)$")


def test_a_layer_with_two_adapters_in_one_file_is_refused_not_half_loaded(tmp_path):
    """One file holding a layer's adapter twice (two prefixes, official and diffusers names, fused qkv and to_q):
    keeping either silently would give other images than the tool that wrote it; refused, naming the layer."""
    g = torch.Generator().manual_seed(0)
    pair = lambda key, out=64, a="lora_down", b="lora_up": {f"{key}.{a}.weight": torch.randn(2, 64, generator=g),
                                                             f"{key}.{b}.weight": torch.randn(out, 2, generator=g)}
    q = "transformer_blocks.0.attn.to_q"
    files = {"prefixes": {**pair(f"transformer.{q}", 64, "lora_A", "lora_B"), **pair(f"base_model.model.{q}")},
             "layouts": {**pair("lora_unet_joint_blocks_0_x_block_attn_proj"),
                         **pair("diffusion_model.joint_blocks.0.x_block.attn.proj")},
             "spellings": {**pair(f"transformer.{q}", 64, "lora_A", "lora_B"), **pair(f"lora_transformer_{q}")},
             "fused and split": {**pair("lora_unet_joint_blocks_0_x_block_attn_qkv", 192),
                                 **pair(f"transformer.{q}", 64, "lora_A", "lora_B")},
             "fused and split k": {**pair("lora_unet_joint_blocks_0_x_block_attn_qkv", 192),    # to_k: not qkv's slot 0
                                   **pair(f"transformer.{q[:-1]}k", 64, "lora_A", "lora_B")}}
    for name, tensors in files.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
        model = tiny_mmdit()
        one_line_error(lambda: sd.load_lora(model, tmp_path / f"{name}.safetensors"),
                       "two adapters for 'joint_blocks.0.x_block.attn.(qkv|proj)'.*keep one")
        assert not sd.lora_layers(model) and torch.equal(model.state_dict()["joint_blocks.0.x_block.attn.qkv.weight"],
                                                         tiny_mmdit().state_dict()["joint_blocks.0.x_block.attn.qkv.weight"])


def test_a_peft_lora_with_biases_is_refused_not_loaded_without_them(tmp_path):
    """PEFT's lora_bias=True adds `lora_B.bias`, which diffusers applies: loading the rest would be another LoRA."""
    g = torch.Generator().manual_seed(0)
    key = "transformer.transformer_blocks.0.attn.to_out.0"
    save_file({f"{key}.lora_A.weight": torch.randn(2, 64, generator=g), f"{key}.lora_B.weight": torch.randn(64, 2, generator=g),
               f"{key}.lora_B.bias": torch.randn(64, generator=g)}, tmp_path / "bias.safetensors")
    model = tiny_mmdit()
    one_line_error(lambda: sd.load_lora(model, tmp_path / "bias.safetensors"), "lora_B.bias.*lora_bias.*not supported")
    assert torch.equal(model.state_dict()["joint_blocks.0.x_block.attn.proj.weight"],
                       tiny_mmdit().state_dict()["joint_blocks.0.x_block.attn.proj.weight"])


def test_each_kind_of_lora_file_beyond_plain_pairs_is_refused_by_its_key_not_loaded_in_part(tmp_path):
    """DoRA (kohya's dora_scale, PEFT's lora_magnitude_vector), LyCORIS' LoHa (hada_w*) and LoKr (lokr_w*), and LoRA
    biases (PEFT's lora_B.bias, kohya's lora_up.bias) each change what a layer computes: loading the plain pairs
    beside them, with the rest warned of as ignored, would give other images than the tool that wrote the file."""
    g = torch.Generator().manual_seed(0)
    layouts = {"transformer.transformer_blocks.0.attn.to_out.0": ("lora_A", "lora_B"),
               "lora_unet_joint_blocks_0_x_block_attn_proj": ("lora_down", "lora_up")}
    extras = [("transformer.transformer_blocks.0.attn.to_out.0", ".lora_magnitude_vector", (64,)),
              ("transformer.transformer_blocks.0.attn.to_out.0", ".lora_B.bias", (64,)),
              ("lora_unet_joint_blocks_0_x_block_attn_proj", ".dora_scale", (1, 64)),
              ("lora_unet_joint_blocks_0_x_block_attn_proj", ".lora_up.bias", (64,)),
              ("lora_unet_joint_blocks_0_x_block_attn_proj", ".hada_w1_a", (64, 2)),
              ("lora_unet_joint_blocks_0_x_block_attn_proj", ".lokr_w1", (2, 2))]
    untouched = tiny_mmdit().state_dict()["joint_blocks.0.x_block.attn.proj.weight"]
    for module, extra, shape in extras:
        down, up = layouts[module]
        save_file({f"{module}.{down}.weight": torch.randn(2, 64, generator=g),
                   f"{module}.{up}.weight": torch.randn(64, 2, generator=g),
                   f"{module}{extra}": torch.randn(*shape, generator=g)}, tmp_path / "other.safetensors")
        model = tiny_mmdit()
        one_line_error(lambda: sd.load_lora(model, tmp_path / "other.safetensors"),
                       rf"'{re.escape(module + extra)}' \(DoRA, LoHa, LoKr, .*PEFT lora_bias=True\) is not supported")
        assert torch.equal(model.state_dict()["joint_blocks.0.x_block.attn.proj.weight"], untouched)


def test_oft_files_and_lycoris_norm_weights_are_refused_as_such_not_as_an_incomplete_pair(tmp_path):
    """An OFT or BOFT file (kohya's oft_blocks + alpha; LyCORIS' with rescale, SimpleTuner's lycoris_ prefix) was
    refused as 'LoRA tensor pair ... is incomplete (has ['alpha'])'; LyCORIS' trained norms (w_norm, b_norm beside
    plain pairs) were warned of as 'no LoRA weights of this model' and the rest merged: other images than the tool
    that wrote the file. Each is now refused by its key, touching nothing."""
    g = torch.Generator().manual_seed(0)
    kohya, lycoris = "lora_unet_joint_blocks_0_x_block_attn_proj", "lycoris_transformer_blocks_0_attn_to_out_0"
    files = {f"{kohya}.oft_blocks": {f"{kohya}.oft_blocks": torch.randn(4, 16, 16, generator=g),
                                     f"{kohya}.alpha": torch.tensor(1e-3)},
             f"{lycoris}.oft_blocks": {f"{lycoris}.oft_blocks": torch.randn(2, 4, 8, 8, generator=g),
                                       f"{lycoris}.rescale": torch.ones(64, 1), f"{lycoris}.alpha": torch.tensor(0.0)},
             "lora_unet_joint_blocks_0_x_block_attn_ln_k.b_norm": {
                 f"{kohya}.lora_down.weight": torch.randn(2, 64, generator=g),
                 f"{kohya}.lora_up.weight": torch.randn(64, 2, generator=g),
                 "lora_unet_joint_blocks_0_x_block_attn_ln_k.w_norm": torch.randn(16, generator=g),
                 "lora_unet_joint_blocks_0_x_block_attn_ln_k.b_norm": torch.randn(16, generator=g)}}
    untouched = tiny_mmdit().state_dict()
    for key, tensors in files.items():
        save_file(tensors, tmp_path / "other.safetensors")
        model = tiny_mmdit()
        one_line_error(lambda: sd.load_lora(model, tmp_path / "other.safetensors"),
                       rf"'{re.escape(key)}' \(DoRA, LoHa, LoKr, OFT, LyCORIS norms or PEFT lora_bias=True\) is not "
                       rf"supported")
        assert all(torch.equal(v, untouched[k]) for k, v in model.state_dict().items()) and not sd.lora_layers(model)


def test_an_alpha_that_overflows_the_update_is_refused_before_it_makes_inf_weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    key = "lora_unet_joint_blocks_0_x_block_attn_proj"
    save_file({f"{key}.lora_down.weight": torch.randn(2, 64, generator=g), f"{key}.lora_up.weight": torch.randn(64, 2, generator=g),
               f"{key}.alpha": torch.tensor(3e38)}, tmp_path / "huge.safetensors")
    model = tiny_mmdit()
    one_line_error(lambda: sd.load_lora(model, tmp_path / "huge.safetensors"), "alpha 3.*e\\+38.*overflow.*another file")
    assert torch.isfinite(model.joint_blocks[0].x_block.attn.proj.weight).all()


def test_a_lora_scale_that_is_no_number_or_overflows_the_dtype_is_refused_before_any_weight_changes(tmp_path):
    """load_lora(model, path, scale=nan / inf / 1e38) from Python merged NaN or inf into the weights without a word
    (sample.py checks only its own flag), scale="0.5" or None failed with a bare TypeError, and the overflow bound
    ignored the scale and stood at float32's max: fp16 weights took an update of 1e5 as inf."""
    g = torch.Generator().manual_seed(0)
    key = "lora_unet_joint_blocks_0_x_block_attn_proj"
    down, up = torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g)
    for alpha, name in [(2.0, "lora"), (3e38, "huge"), (1e6, "large")]:
        save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                   f"{key}.alpha": torch.tensor(alpha)}, tmp_path / f"{name}.safetensors")
    for dtype, name, scale, error in [
            (torch.float32, "lora", math.nan, "scale must be a finite number, got nan"),
            (torch.float32, "lora", math.inf, "scale must be a finite number, got inf"),
            (torch.float32, "lora", "0.5", "scale must be a finite number, got '0.5'"),
            (torch.float32, "lora", None, "scale must be a finite number, got None"),
            (torch.float32, "lora", 1e38, "at scale 1e\\+38 would make inf weights in float32 at .*: lower the scale"),
            (torch.float16, "lora", 1e5, "at scale 100000 would make inf weights in float16 at .*: lower the scale"),
            (torch.float32, "huge", 1e-30, "alpha 3e\\+38.*would overflow")]:    # made in fp32, then scaled
        for merge in (True, False):
            model = tiny_mmdit().to(dtype)
            unmerged = error.replace("inf weights", "inf outputs")             # unmerged, no weight changes
            one_line_error(lambda: sd.load_lora(model, tmp_path / f"{name}.safetensors", scale, merge=merge),
                           error if merge else unmerged)
            for param, weights in tiny_mmdit().to(dtype).state_dict().items():
                assert torch.equal(model.state_dict()[param], weights), param
    model = tiny_mmdit().half()
    sd.load_lora(model, tmp_path / "lora.safetensors", np.float32(-100.0))     # numpy's numbers, negative ones too
    sd.load_lora(model, tmp_path / "large.safetensors", 1e-6)     # over fp16's range at scale 1, not at 1e-6
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_peft_keys_with_the_adapter_name_load_and_unknown_lora_layouts_are_named(tmp_path):
    """A PEFT model's own state dict names the adapter (`lora_A.default.weight`); a layout read nowhere here gets an
    error that shows its keys, not 'is not a LoRA ... it looks like a LoRA (load it with --lora)'."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g)
    key = "base_model.model.transformer_blocks.1.attn.to_out.0"
    save_file({f"{key}.lora_A.default.weight": a, f"{key}.lora_B.default.weight": b}, tmp_path / "peft.safetensors")
    model, by_hand = tiny_mmdit(), tiny_mmdit()
    sd.load_lora(model, tmp_path / "peft.safetensors")
    by_hand.joint_blocks[1].x_block.attn.proj.weight.data += b @ a
    x = mmdit_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(*x), by_hand(*x))
    save_file({f"{key}.lora_A.style.weight": a, f"{key}.lora_B.style.weight": b}, tmp_path / "named.safetensors")
    with pytest.raises(sd.UserError, match=r"lora_A\.style\.weight") as e:
        sd.load_lora(model, tmp_path / "named.safetensors")
    assert "load it with --lora" not in str(e.value)


def test_a_lora_with_text_encoder_parts_says_they_are_not_applied(tmp_path, capsys):
    """diffusers and ComfyUI apply a LoRA's text-encoder part (text_encoder., lora_te1_...); here only the MMDiT's
    loads: the warning says so (it called them 'no LoRA weights of this model'), a text-encoder-only file is refused."""
    g = torch.Generator().manual_seed(0)
    pair = lambda key: {f"{key}.lora_down.weight": torch.randn(2, 64, generator=g),
                        f"{key}.lora_up.weight": torch.randn(64, 2, generator=g)}
    text = {**pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
            **pair("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj")}
    save_file({**pair("lora_unet_joint_blocks_0_x_block_attn_proj"), **text}, tmp_path / "both.safetensors")
    assert sd.load_lora(tiny_mmdit(), tmp_path / "both.safetensors") == 1
    assert "text-encoder LoRA (4 tensors" in capsys.readouterr().err
    save_file(text, tmp_path / "text.safetensors")
    one_line_error(lambda: sd.load_lora(tiny_mmdit(), tmp_path / "text.safetensors"), "text-encoder LoRA only")
    save_file({**pair("lora_unet_input_blocks_4_1_proj_in"), **text}, tmp_path / "sdxl.safetensors")   # another model's
    capsys.readouterr()
    one_line_error(lambda: sd.load_lora(tiny_mmdit(), tmp_path / "sdxl.safetensors"), "matches no layer")
    assert "text-encoder" not in capsys.readouterr().err


def test_a_text_encoder_part_that_fits_no_layer_is_named_for_what_it_is(tmp_path, capsys):
    """Text-encoder keys that fit no layer all got 'is T5 off (--no-t5)?': for CLIP keys of a layer CLIP-L lacks,
    for SD1.x's digitless lora_te_ (ComfyUI maps it to CLIP-L as SD1.x's one CLIP; SD3's trainers write lora_te1_,
    lora_te2_, lora_te3_), and for CLIP keys loaded without `text`. Now each says what is the case."""
    pipe, g = sd.tiny_pipeline(use_t5=False), torch.Generator().manual_seed(0)
    pair = lambda key, width: {f"{key}.lora_down.weight": torch.randn(2, width, generator=g),
                               f"{key}.lora_up.weight": torch.randn(width, 2, generator=g)}
    mmdit_part = pair("lora_unet_joint_blocks_0_x_block_attn_proj", 64)
    for key in ("lora_te1_text_model_encoder_layers_7_self_attn_q_proj",       # CLIP-L has 2 layers
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj"):
        save_file(pair(key, 32), tmp_path / "text.safetensors")
        one_line_error(lambda: sd.load_lora(pipe.mmdit, tmp_path / "text.safetensors", text=pipe.text),
                       f"only \\(e.g. {key}.*no layer of SD3's text encoders.*another model\\?$")
        save_file({**mmdit_part, **pair(key, 32)}, tmp_path / "both.safetensors")
        assert sd.load_lora(pipe.mmdit, tmp_path / "both.safetensors", text=pipe.text) == 1
        err = capsys.readouterr().err
        assert f"e.g. {key}" in err and "another model?" in err and "T5" not in err
    clip = pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 32)
    save_file({**mmdit_part, **clip}, tmp_path / "clip.safetensors")
    assert sd.load_lora(pipe.mmdit, tmp_path / "clip.safetensors") == 1
    err = capsys.readouterr().err
    assert "load_lora(..., text=pipe.text)" in err and "T5" not in err
    sd1 = pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 32)      # after CLIP-L's in the file
    save_file({**mmdit_part, **clip, **sd1}, tmp_path / "mixed.safetensors")
    assert sd.load_lora(pipe.mmdit, tmp_path / "mixed.safetensors") == 1
    err = capsys.readouterr().err
    assert "e.g. lora_te_text_model_encoder_layers_0_self_attn_q_proj" in err and "another model?" in err
    save_file({**clip, **sd1}, tmp_path / "mixed_text.safetensors")
    one_line_error(lambda: sd.load_lora(pipe.mmdit, tmp_path / "mixed_text.safetensors"),
                   r"only \(e\.g\. lora_te_text_model_encoder_layers_0_self_attn_q_proj.*another model\?$")


def test_an_sdxl_lora_whose_clip_part_fits_is_refused_as_a_lora_for_another_model(tmp_path):
    """An SDXL LoRA's CLIP keys fit SD3's CLIP-L: sample.py said 'matches no layer' showing those very keys
    (the first ones); now what model its other keys are of, as describe_checkpoint tells of checkpoints."""
    g = torch.Generator().manual_seed(0)
    pair = lambda key, width: {f"{key}.lora_down.weight": torch.randn(2, width, generator=g),
                               f"{key}.lora_up.weight": torch.randn(width, 2, generator=g)}
    clip = pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 32)
    save_file({**pair("lora_unet_input_blocks_4_1_proj_in", 64), **clip}, tmp_path / "sdxl.safetensors")
    args = ["--model", "tiny", "--lora", str(tmp_path / "sdxl.safetensors"), "--prompt", "a", "--width", "32",
            "--height", "32", "--out", str(tmp_path)]
    one_line_error(lambda: sample.main(args),
                   r"matches no layer .*, a LoRA for another model\? \(it looks like an SD1.x/SDXL UNet\)")
    pipe = sd.tiny_pipeline()                   # diffusers' layout: SDXL's UNet has no down_blocks.0.attentions
    save_file({"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.ones(2, 64),
               "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight": torch.ones(64, 2),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 32),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(32, 2)},
              tmp_path / "diffusers.safetensors")
    one_line_error(lambda: sd.load_lora(pipe.mmdit, tmp_path / "diffusers.safetensors", text=pipe.text),
                   r"another model\? \(it looks like a diffusers UNet \(SD1.x/SDXL\)\)")


def test_a_flux_lora_is_named_as_such_and_a_lora_of_an_unknown_layout_by_its_first_keys(tmp_path):
    """A kohya FLUX LoRA names FLUX's double_blocks; a layout read nowhere here, even one naming a CLIP's
    text_model, is no CLIP text encoder: its first keys are shown."""
    lora = lambda *keys: {f"{key}.lora_{part}.weight": torch.ones(2, 2) for key in keys for part in "AB"}
    save_file(lora("lora_unet_double_blocks_0_img_attn_qkv"), tmp_path / "flux.safetensors")
    one_line_error(lambda: sd.load_lora(tiny_mmdit(), tmp_path / "flux.safetensors"),
                   r"a LoRA for another model\? \(it looks like a FLUX transformer\)")
    save_file(lora("te.text_model.encoder.layers.0.mlp.fc1", "te.text_model.encoder.layers.0.mlp.fc2"),
              tmp_path / "unknown.safetensors")
    one_line_error(lambda: sd.load_lora(tiny_mmdit(), tmp_path / "unknown.safetensors"),
                   re.escape("(its first keys are ['te.text_model.encoder.layers.0.mlp.fc1.lora_A.weight', "
                             "'te.text_model.encoder.layers.0.mlp.fc1.lora_B.weight', "
                             "'te.text_model.encoder.layers.0.mlp.fc2.lora_A.weight'])"))


def test_a_flux_lora_in_diffusers_layout_is_named_as_one_not_as_another_sd3_variants(tmp_path):
    """diffusers' FLUX LoRAs (the hub's usual layout) share SD3's transformer_blocks.N.attn.to_q names: one was
    refused as "... takes (1536 -> 1536) per part, not down (16, 3072) ...: another variant's LoRA?", as if it
    were an SD3.5 Large one; its single_transformer_blocks now name it a LoRA for another model, FLUX."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for key in ("transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.attn.to_q"):
        tensors.update({f"{key}.lora_A.weight": torch.randn(2, 96, generator=g),
                        f"{key}.lora_B.weight": torch.randn(96, 2, generator=g)})
    save_file(tensors, tmp_path / "flux.safetensors")
    model = tiny_mmdit()
    one_line_error(lambda: sd.load_lora(model, tmp_path / "flux.safetensors"),
                   r"a LoRA for another model\? \(it looks like a FLUX transformer\)")
    assert not sd.lora_layers(model)


def peft_text_lora(folder: Path, path: Path):
    """A CLIP-L + CLIP-G LoRA trained with PEFT (r 4, lora_alpha 8: the scale is in the metadata), as diffusers'
    SD3 scripts save one with --train_text_encoder."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    g, parts = torch.Generator().manual_seed(5), {}
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name)
        encoder.add_adapter(config)
        with torch.no_grad():
            for key, p in encoder.named_parameters():
                if "lora_" in key:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        parts.update({f"{name}_lora_layers": get_peft_model_state_dict(encoder),
                      f"{name}_lora_adapter_metadata": config.to_dict()})
    StableDiffusion3Pipeline.save_lora_weights(path.parent, weight_name=path.name, **parts)


def test_a_loras_text_encoder_part_is_applied_as_diffusers_applies_it(diffusers_folder, tmp_path, monkeypatch):
    """A LoRA trained with the text encoders (diffusers' --train_text_encoder; sd-scripts' lora_te1_/lora_te2_,
    the civitai ones) changed only the MMDiT here, its CLIP-L/CLIP-G part left out with a warning (a
    text-encoder-only file, this one, was refused): the images were not diffusers' or ComfyUI's. Now the part
    is merged into them, scaled by --lora-scale as diffusers' joint_attention_kwargs scale does, --no-merge too;
    kohya's and ComfyUI's layouts of the same LoRA give the same embeddings."""
    peft = pytest.importorskip("peft")
    from diffusers import StableDiffusion3Pipeline
    from transformers.integrations import peft as transformers_peft
    # transformers 5 asks for peft 0.22 (unreleased; 0.21.2 is the newest) for a text encoder's adapters: its
    # add_adapter and load_adapter (diffusers' load_lora_weights) work with 0.21, as this test shows
    monkeypatch.setattr(transformers_peft, "MIN_PEFT_VERSION", peft.__version__)
    folder, _ = diffusers_folder
    lora = tmp_path / "text.safetensors"
    peft_text_lora(folder, lora)
    ref = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    plain = run_diffusers(ref, ["a red fox"], seed=1, steps=3, t5_length=16)
    ref.load_lora_weights(lora)
    expected = run_diffusers(ref, ["a red fox"], seed=1, steps=3, t5_length=16, joint_attention_kwargs={"scale": 0.6})
    assert np.abs(expected.astype(int) - plain).max() > 20                     # the LoRA does change the images
    args = ["--model", str(folder), "--lora", str(lora), "--lora-scale", "0.6", "--prompt", "a red fox", "--seed", "1",
            "--steps", "3", "--cfg", "4.5", "--sampler", "euler", "--t5-length", "16", "--width", "64", "--height", "64"]
    for flags in ([], ["--no-merge"]):
        assert_images_close(images_of(sample.main([*args, *flags, "--out", str(tmp_path / f"o{len(flags)}")])), expected)
    with torch.no_grad():
        context, _, pooled, _ = ref.encode_prompt("a red fox", None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=16, lora_scale=0.6)
    layouts = {"kohya": lambda part, module, role: f"lora_te{part[-1] if part[-1] == '2' else 1}_"
                                                   f"{module.replace('.', '_')}.lora_{'down' if role == 'A' else 'up'}",
               "comfyui": lambda part, module, role: f"text_encoders.{'clip_g' if part[-1] == '2' else 'clip_l'}"
                                                     f".transformer.{module}.lora_{role}"}
    for layout, spell in layouts.items():                   # alpha 8 as a tensor, with no PEFT metadata
        renamed = {}
        for key, tensor in load_file(lora).items():
            name = spell(*re.fullmatch(r"(text_encoder(?:_2)?)\.(.+)\.lora_([AB])\.weight", key).groups())
            renamed.update({f"{name}.weight": tensor, f"{name.rsplit('.', 1)[0]}.alpha": torch.tensor(8.0)})
        save_file(renamed, tmp_path / f"{layout}.safetensors")
    for path in (lora, tmp_path / "kohya.safetensors", tmp_path / "comfyui.safetensors"):
        pipe = sd.load_pipeline(str(folder), device="cpu", t5_length=16)
        assert sd.load_lora(pipe.mmdit, path, scale=0.6, text=pipe.text) == 2 * 3 * 6        # 2 CLIPs x 3 layers
        ours = pipe.text.encode(["a red fox"])
        torch.testing.assert_close(ours[0][:, :, :context.shape[-1]], context, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours[1], pooled, atol=1e-5, rtol=1e-5)


def test_a_t5_lora_in_peft_naming_is_merged_like_kohyas_not_called_another_models(tmp_path, capsys):
    """T5's part named as diffusers' pipeline names T5 (text_encoder_3., PEFT's lora_A/B), as kohya's lora_te3_
    and ComfyUI's t5xxl are read: it was left out with "no layer of SD3's text encoders has such a name: a LoRA
    for another model?", though it names SD3's own T5. Merged now; with T5 off, the warning says T5 is off."""
    pipe, g = sd.tiny_pipeline(), torch.Generator().manual_seed(0)
    q, key = pipe.text.t5.encoder.block[1].layer[0].SelfAttention.q, "encoder.block.1.layer.0.SelfAttention.q"
    down, up = torch.randn(2, q.in_features, generator=g), torch.randn(q.out_features, 2, generator=g)
    save_file({"lora_unet_joint_blocks_0_x_block_attn_proj.lora_down.weight": torch.randn(2, 64, generator=g),
               "lora_unet_joint_blocks_0_x_block_attn_proj.lora_up.weight": torch.randn(64, 2, generator=g),
               f"text_encoder_3.{key}.lora_A.weight": down, f"text_encoder_3.{key}.lora_B.weight": up},
              tmp_path / "lora.safetensors", {"lora_adapter_metadata": json.dumps({"text_encoder_3.lora_alpha": 1})})
    expected = q.weight + 0.5 * (1 / 2) * up @ down
    assert sd.load_lora(pipe.mmdit, tmp_path / "lora.safetensors", scale=0.5, text=pipe.text) == 2
    torch.testing.assert_close(q.weight, expected)
    assert capsys.readouterr().err == ""
    no_t5 = sd.tiny_pipeline(use_t5=False)
    assert sd.load_lora(no_t5.mmdit, tmp_path / "lora.safetensors", text=no_t5.text) == 1
    err = capsys.readouterr().err
    assert f"e.g. text_encoder_3.{key}" in err and "is T5 off" in err and "another model" not in err


def test_a_loras_t5_part_is_merged_or_said_to_be_left_out_and_bad_parts_refused(tmp_path, capsys, monkeypatch):
    """sd-scripts' train_t5xxl=True writes T5-XXL's part as lora_te3_ (ComfyUI loads it; diffusers loads no T5
    LoRA): merged as scale * alpha / rank * up @ down; with T5 off (--no-t5) a warning says it is not applied.
    A text part of wrong shapes, NaN or half a pair is a one-line error naming it, and nothing is changed, as
    when a load stops part way (Ctrl-C)."""
    pipe, g = sd.tiny_pipeline(), torch.Generator().manual_seed(0)
    pair = lambda key, layer, alpha: {f"{key}.lora_down.weight": torch.randn(2, layer.in_features, generator=g),
                                      f"{key}.lora_up.weight": torch.randn(layer.out_features, 2, generator=g),
                                      f"{key}.alpha": torch.tensor(alpha)}
    q, fc1 = pipe.text.t5.encoder.block[1].layer[0].SelfAttention.q, pipe.text.clip_l.text_model.encoder.layers[1].mlp.fc1
    tensors = {**pair("lora_unet_joint_blocks_0_x_block_attn_proj", pipe.mmdit.joint_blocks[0].x_block.attn.proj, 2.0),
               **pair("lora_te3_encoder_block_1_layer_0_SelfAttention_q", q, 1.0),
               **pair("lora_te1_text_model_encoder_layers_1_mlp_fc1", fc1, 4.0)}
    save_file(tensors, tmp_path / "lora.safetensors")
    key = "lora_te3_encoder_block_1_layer_0_SelfAttention_q"
    expected = q.weight + 0.5 * (1.0 / 2) * tensors[f"{key}.lora_up.weight"] @ tensors[f"{key}.lora_down.weight"]
    assert sd.load_lora(pipe.mmdit, tmp_path / "lora.safetensors", scale=0.5, text=pipe.text) == 3
    torch.testing.assert_close(q.weight, expected)
    capsys.readouterr()
    sample.main(["--model", "tiny", "--no-t5", "--lora", str(tmp_path / "lora.safetensors"), "--prompt", "a", "--steps",
                 "1", "--width", "32", "--height", "32", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert f"text-encoder LoRA (3 tensors, e.g. {key}.alpha) is not applied" in err and "--no-t5" in err
    one_line_error(lambda: sd.load_lora(pipe.mmdit, tmp_path / "lora.safetensors", text=pipe),
                   r"text takes the text encoders \(pipe.text\), not a Pipeline")
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in pipe.modules()]
    for bad, match in (({f"{key}.lora_down.weight": torch.ones(2, 5)},
                        r"'text_encoder_3\.encoder\.block\.1\.layer\.0\.SelfAttention\.q' takes .* not down \(2, 5\)"),
                       ({f"{key}.lora_up.weight": torch.full((64, 2), math.nan)}, f"{key}.lora_up.weight' holds NaN"),
                       ({f"{key}.lora_up.weight": None}, f"pair for '{key}' is incomplete")):
        broken = {k: v for k, v in {**tensors, **bad}.items() if v is not None}
        save_file(broken, tmp_path / "bad.safetensors")
        one_line_error(lambda: sd.load_lora(pipe.mmdit, tmp_path / "bad.safetensors", text=pipe.text), match)
    read_lora = sd.read_lora

    def late_failure(model, path, text=None):       # at the MMDiT's layer, after the text encoders' two
        adapters = read_lora(model, path, text)
        name = list(adapters)[-1]
        assert name == "joint_blocks.0.x_block.attn.proj" and len(adapters) == 3
        adapters[name] = (adapters[name][0], adapters[name][1].as_subclass(FailsWhenUsed))
        return adapters
    monkeypatch.setattr(sd, "read_lora", late_failure)
    with pytest.raises(KeyboardInterrupt):
        sd.load_lora(pipe.mmdit, tmp_path / "lora.safetensors", text=pipe.text)
    for module, was in zip(pipe.modules(), before):
        for name, tensor in module.state_dict().items():
            torch.testing.assert_close(tensor, was[name], atol=1e-6, rtol=0)


def test_a_lora_stored_in_fp8_loads_and_a_complex_one_is_refused(tmp_path):
    """e4m3 has no isfinite: the NaN check was a bare NotImplementedError; complex lost its imaginary part;
    int or bool down/up loaded as plain numbers."""
    sd.save_lora(lora_model(), tmp_path / "lora.safetensors", format="kohya")
    tensors = load_file(tmp_path / "lora.safetensors")
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in tensors.items()}, tmp_path / "fp8.safetensors")
    save_file({k: v.to(torch.float8_e4m3fn).float() for k, v in tensors.items()}, tmp_path / "ref.safetensors")
    ours, ref = tiny_mmdit(), tiny_mmdit()
    assert sd.load_lora(ours, tmp_path / "fp8.safetensors") == sd.load_lora(ref, tmp_path / "ref.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    if COMPLEX_FILES:
        save_file({k: v.to(torch.complex64) for k, v in tensors.items()}, tmp_path / "complex.safetensors")
        one_line_error(lambda: sd.load_lora(tiny_mmdit(), tmp_path / "complex.safetensors"), "is complex")
    for dtype in (torch.int32, torch.bool):       # (an int alpha is fine: a number)
        save_file({k: v if k.endswith("alpha") else v.to(dtype) for k, v in tensors.items()}, tmp_path / "i.safetensors")
        one_line_error(lambda: sd.load_lora(tiny_mmdit(), tmp_path / "i.safetensors"), f"is {str(dtype)[6:]}, no LoRA")


def test_a_conv_lora_on_the_patch_embedding_is_refused_as_such_not_as_a_rank_mismatch(tmp_path):
    """sd-scripts' emb_dims train the x_embedder's 2x2 conv: down (r, 16, 2, 2), up (hidden, r, 1, 1)."""
    g = torch.Generator().manual_seed(0)
    save_file({"lora_unet_x_embedder_proj.lora_down.weight": torch.randn(2, 16, 2, 2, generator=g),
               "lora_unet_x_embedder_proj.lora_up.weight": torch.randn(64, 2, 1, 1, generator=g)}, tmp_path / "c.safetensors")
    one_line_error(lambda: sd.load_lora(tiny_mmdit(), tmp_path / "c.safetensors"), "x_embedder.*convolution.*not supported")


def test_simpletuner_lycoris_plain_lora_loads_as_comfyui_reads_it(tmp_path):
    """SimpleTuner's LyCORIS files (algo lora) name modules `lycoris_` + the diffusers name flattened, with alphas;
    ComfyUI reads them."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g)
    key = "lycoris_transformer_blocks_1_attn_add_k_proj"
    save_file({f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(2.0)},
              tmp_path / "l.safetensors")
    model, by_hand = tiny_mmdit(), tiny_mmdit()
    assert sd.load_lora(model, tmp_path / "l.safetensors") == 1
    by_hand.joint_blocks[1].context_block.attn.qkv.weight.data[64:128] += b @ a * (2.0 / 4)
    x = mmdit_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(*x), by_hand(*x))


def test_a_comfyui_extracted_text_encoder_part_with_bias_diffs_loads_exactly_or_is_refused(tmp_path, capsys):
    """LoraSave with a text_encoder_diff writes its CLIP/T5 part as text_encoders.*, bias_diff's `.diff_b`/`.diff`
    too. Applied since the text-encoder part is, CLIP-L's LoRA weights were merged and its bias differences left
    out (a warning asked 'is T5 off?'): other images than ComfyUI's, where the MMDiT's are refused. Now as there:
    zero ones change nothing and load without a word, others are refused."""
    pipe, g = sd.tiny_pipeline(), torch.Generator().manual_seed(0)
    q = pipe.text.clip_l.text_model.encoder.layers[0].self_attn.q_proj
    key = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    norm = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.layer_norm1.diff"
    tensors = {f"{key}.lora_down.weight": torch.randn(2, q.in_features, generator=g),
               f"{key}.lora_up.weight": torch.randn(q.out_features, 2, generator=g),
               f"{key}.diff_b": torch.zeros(q.out_features), norm: torch.zeros(q.in_features)}
    save_file(tensors, tmp_path / "zero.safetensors")
    expected = q.weight + tensors[f"{key}.lora_up.weight"] @ tensors[f"{key}.lora_down.weight"]
    assert sd.load_lora(pipe.mmdit, tmp_path / "zero.safetensors", text=pipe.text) == 1
    torch.testing.assert_close(q.weight, expected)
    assert "warning" not in capsys.readouterr().err
    for bad in (f"{key}.diff_b", norm):
        save_file({**tensors, bad: torch.ones_like(tensors[bad])}, tmp_path / "bias.safetensors")
        one_line_error(lambda: sd.load_lora(pipe.mmdit, tmp_path / "bias.safetensors", text=pipe.text),
                       f"'{re.escape(bad)}' is a whole weight/bias difference .*bias_diff off")
    torch.testing.assert_close(q.weight, expected)


def test_comfyui_extracted_lora_with_bias_diffs_loads_exactly_or_is_refused(tmp_path, capsys):
    """ComfyUI's LoraSave (bias_diff on by default) adds `.diff_b` for every bias and `.diff` for 1-D weights: zero
    ones change nothing, others would be dropped (the LoRA loaded without them): refused."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g)
    key = "diffusion_model.joint_blocks.0.x_block.attn.proj"
    tensors = {f"{key}.lora_down.weight": a.half(), f"{key}.lora_up.weight": b.half(), f"{key}.diff_b": torch.zeros(64).half(),
               "diffusion_model.joint_blocks.0.x_block.attn.ln_q.diff": torch.zeros(16).half()}
    save_file(tensors, tmp_path / "zero.safetensors")
    model, by_hand = tiny_mmdit(), tiny_mmdit()
    sd.load_lora(model, tmp_path / "zero.safetensors")
    assert "ignored" not in capsys.readouterr().err
    by_hand.joint_blocks[0].x_block.attn.proj.weight.data += b.half().float() @ a.half().float()
    x = mmdit_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(*x), by_hand(*x))
    save_file({**tensors, f"{key}.diff_b": torch.ones(64).half()}, tmp_path / "bias.safetensors")
    one_line_error(lambda: sd.load_lora(tiny_mmdit(), tmp_path / "bias.safetensors"), "attn.proj.diff_b.*bias_diff")
    # lora_type full_diff writes `.diff` for the matrices too: turning bias_diff off alone would not help
    save_file({f"{key}.diff": torch.randn(64, 64, generator=g).half()}, tmp_path / "full.safetensors")
    one_line_error(lambda: sd.load_lora(tiny_mmdit(), tmp_path / "full.safetensors"), "attn.proj.diff'.*save it as standard")


def test_comfyui_lora_save_files_with_the_unchanged_patch_embedding_load(tmp_path):
    """ComfyUI's LoraSave extracts a LoRA from every weight of 2+ dims, the x_embedder's 2x2 conv too: a merged
    LoRA leaves it unchanged, so its pair is (hidden, r, 1, 1) zeros up, (r, 16, 2, 2) SVD rows down. Such files
    were refused whole as 'a LoRA on a convolution'; a zero one changes nothing (a non-zero one is refused)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g)
    key = "diffusion_model.joint_blocks.0.x_block.attn.proj"
    conv = {"diffusion_model.x_embedder.proj.lora_down.weight": torch.randn(4, 16, 2, 2, generator=g).half(),
            "diffusion_model.x_embedder.proj.lora_up.weight": torch.zeros(64, 4, 1, 1).half()}
    save_file({f"{key}.lora_down.weight": a.half(), f"{key}.lora_up.weight": b.half(), **conv}, tmp_path / "l.safetensors")
    model, by_hand = tiny_mmdit(), tiny_mmdit()
    sd.load_lora(model, tmp_path / "l.safetensors")
    by_hand.joint_blocks[0].x_block.attn.proj.weight.data += b.half().float() @ a.half().float()
    x = mmdit_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(*x), by_hand(*x))
    conv["diffusion_model.x_embedder.proj.lora_up.weight"][0] = 1
    save_file(conv, tmp_path / "c.safetensors")
    one_line_error(lambda: sd.load_lora(tiny_mmdit(), tmp_path / "c.safetensors"), "x_embedder.*convolution.*not supported")


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
        ("--model", str(tmp_path / "partial.safetensors")): "bad SD3 MMDiT weights",
        ("--model", str(no_tok)): "no tokenizer.*go online",
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
    with pytest.raises(sd.UserError, match="needs a scale and layers.*--slg-layers"):
        sd.SampleSettings(slg_scale=2.5).resolved("sd3.5-large")
    with pytest.raises(sd.UserError, match="shift in 0.001..1000"):
        sd.SampleSettings(shift=0.0).resolved("sd3.5-large")


def test_an_image_too_large_for_the_model_names_the_flag_or_key_to_lower(tmp_path):
    """sample.py --model tiny (at most 512 px) without --width/--height said only that 1024x1024 px was too large;
    training said the same for sample.width/height or dataset.resolution, without naming which to lower."""
    one_line_error(lambda: sample.main(["--model", "tiny", "--prompt", "x", "--out", str(tmp_path / "out")]),
                   r"^1024x1024 px is too large for this model \(at most 512 px a side\): lower --width and --height$")
    make_dataset(tmp_path / "data")
    fixes = {"sample.width": "lower sample.width and sample.height", "dataset.resolution": "lower dataset.resolution"}
    for key, fix in fixes.items():
        one_line_error(lambda: sd.train(tiny_config(tmp_path, **{key: 1024})), f"^1024x.* a side\\): {fix}")
    no_previews = {"sample.width": 1024, "sample.prompts": [], "train.steps": 1, "output_dir": str(tmp_path / "quiet")}
    sd.train(tiny_config(tmp_path, **no_previews))                      # a size no preview uses is not refused
    assert (tmp_path / "quiet" / "lora.safetensors").exists()


def test_a_wide_or_tall_image_too_large_is_named_width_by_height_before_any_text_is_encoded(tmp_path, monkeypatch):
    """The size too large is said as width x height wherever it is met: sample.py, training's widest bucket,
    generate() and the model itself; generate() says it before its text encoders run (T5 on a CPU: minutes), and
    the model's largest side (tiny: 512 px) is taken."""
    too_large = r"^{} px is too large for this model \(at most 512 px a side\): {}$"
    one_line_error(lambda: sample.main(["--model", "tiny", "--prompt", "x", "--width", "512", "--height", "1024",
                                        "--out", str(tmp_path / "out")]),
                   too_large.format("512x1024", "lower --width and --height"))
    sd.write_demo_dataset(tmp_path / "data")
    Image.new("RGB", (256, 64), "red").save(tmp_path / "data" / "wide.png")     # 4:1 at resolution 512: 1024x256
    one_line_error(lambda: sd.train(tiny_config(tmp_path, **{"dataset.resolution": 512, "sample.width": 64})),
                   too_large.format("1024x256", re.escape("lower dataset.resolution (a 4:1 bucket's long side is "
                                                          "twice it)")))
    pipe = sd.tiny_pipeline(t5_length=16)
    monkeypatch.setattr(sd, "encode_in_batches", lambda *a, **k: pytest.fail("encoded the prompts first"))
    for width, height in ((1024, 512), (512, 1024)):
        settings = sd.SampleSettings(steps=1, width=width, height=height)
        one_line_error(lambda: sd.generate(pipe, ["x"], settings=settings, progress=False),
                       too_large.format(f"{width}x{height}", "lower the width and height"))
        latents = torch.zeros(1, 16, height // 8, width // 8)
        one_line_error(lambda: pipe.mmdit(latents, torch.ones(1), torch.zeros(1, 1, 64), torch.zeros(1, 64)),
                       too_large.format(f"{width}x{height}", "lower the width and height"))
    monkeypatch.undo()
    largest = sd.SampleSettings(steps=1, width=512, height=512)
    assert len(sd.generate(pipe, ["x"], settings=largest, progress=False)) == 1


def standard_components() -> dict:
    """make_components with what single files imply: CLIP heads of 64 channels (files carry no config), a
    CLIP-L projection that is the identity (they carry none), T5 weights that fp16 holds exactly."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    parts, gen = make_components(), torch.Generator().manual_seed(1)
    clip = lambda width, tok, act: CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
        num_attention_heads=width // 64, projection_dim=width, hidden_act=act, max_position_embeddings=77,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    t5 = T5Config(vocab_size=len(parts["tokenizer_3"]), d_model=192, d_kv=16, d_ff=128, num_layers=2,
                  num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                  decoder_start_token_id=0)
    parts.update(
        text_encoder=clip(64, parts["tokenizer"], "quick_gelu"), text_encoder_3=T5EncoderModel(t5).eval(),
        text_encoder_2=clip(128, parts["tokenizer_2"], "gelu"),
        transformer=SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=64,
            num_attention_heads=3, caption_projection_dim=192, joint_attention_dim=192,
            pooled_projection_dim=192, pos_embed_max_size=16, **VARIANTS["sd3.5-medium"]).eval())
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer"):
        randomize(parts[name], gen)
    with torch.no_grad():
        parts["text_encoder"].text_projection.weight.copy_(torch.eye(64))
        for p in parts["text_encoder_3"].parameters():
            p.copy_(p.half().float())
    return parts


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    """A diffusers folder; the same text encoders as distributed single files, tokenizer*/ beside them; and an
    all-in-one checkpoint (MMDiT, VAE, the three under `text_encoders.*.transformer.`), tokenizers by it."""
    diffusers = pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("single_files")
    pipe = diffusers.StableDiffusion3Pipeline(**standard_components())
    pipe.save_pretrained(root / "diffusers", safe_serialization=True)
    sds = {role: {k: v.contiguous() for k, v in getattr(pipe, name).state_dict().items()} for role, name in
           (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5xxl", "text_encoder_3"))}
    del sds["clip_l"]["text_projection.weight"]                          # as in the distributed clip_l
    sds["clip_l"]["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # older files have it
    for folder in ("clip", "aio"):
        (root / folder).mkdir()
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            (root / folder / name).symlink_to(root / "diffusers" / name)
    save_file(sds["clip_l"], root / "clip/clip_l.safetensors")
    save_file(sds["clip_g"], root / "clip/clip_g.safetensors")
    t5 = {k: v.half() for k, v in sds["t5xxl"].items() if k != "encoder.embed_tokens.weight"}  # as ComfyUI's
    save_file(t5, root / "clip/t5xxl_fp16.safetensors")
    official_single_file(root / "diffusers", root / "aio/model.safetensors")
    sds["t5xxl"]["encoder.embed_tokens.weight"] = sds["t5xxl"].pop("shared.weight")         # as SAI's
    bundled = {f"text_encoders.{r}.transformer.{k}": v for r, part in sds.items() for k, v in part.items()}
    save_file({**load_file(root / "aio/model.safetensors"), **bundled}, root / f"aio/{ALL_IN_ONE}")
    (root / "aio/model.safetensors").unlink()
    return root, pipe


ALL_IN_ONE = "sd3.5_medium_incl_clips_t5xxlfp16.safetensors"


@pytest.mark.parametrize("use_t5", [True, False])
def test_single_file_text_encoders_match_the_diffusers_folder(single_files, use_t5):
    root, pipe = single_files
    prompts = ["a red fox in the snow", "", " ".join(WORDS * 3)]          # 99 words: past CLIP's 77 and T5's 24
    encode = lambda src: sd.load_text_encoders(src, use_t5=use_t5, context_dim=192, t5_length=24).encode(
        prompts)
    ref = encode(root / "diffusers")
    with torch.no_grad():
        oracle = pipe.encode_prompt(prompts, None, None, max_sequence_length=24,
                                    do_classifier_free_guidance=False)
    if use_t5:
        torch.testing.assert_close(ref, (oracle[0], oracle[2]))
    for source in (root / "clip", root / "aio" / ALL_IN_ONE):
        torch.testing.assert_close(encode(source), ref)
    settings = sd.SampleSettings(steps=4, cfg=4.5, sampler="euler", width=32, height=32, seed=3, slg_scale=0)
    images = []
    for model, text_encoders in ((root / "diffusers", None), (root / "aio" / ALL_IN_ONE, None),
                                 (root / "aio" / ALL_IN_ONE, root / "clip")):
        pipe = sd.load_pipeline(model, text_encoders, device="cpu", dtype="fp32", t5_length=24, use_t5=use_t5)
        images.append(np.stack([np.asarray(im) for im in sd.generate(pipe, ["a fox"], "blurry", settings,
                                                                     progress=False)]))
    for mine in images[1:]:
        assert_images_close(mine, images[0])


def test_fp16_t5_keeps_its_feed_forward_output_in_fp32_as_transformers_does(single_files, tmp_path):
    """T5 v1.1's feed-forward outputs overflow fp16; transformers' from_pretrained, so diffusers, keeps T5's
    `wo` layers in fp32 when asked for fp16. Here a T5 whose weights fit fp16 but whose feed-forward outputs
    do not (pure fp16 clamps them: off by 4.6 on values of 3.8) shows it."""
    root, _ = single_files
    (tmp_path / "enc").mkdir()
    for name in ("clip_l.safetensors", "clip_g.safetensors", "tokenizer", "tokenizer_2", "tokenizer_3"):
        (tmp_path / "enc" / name).symlink_to(root / "clip" / name)
    gain = lambda k: 3000 if k.endswith(".wo.weight") else 30 if ".wi_" in k else 1
    t5 = {k: v * gain(k) for k, v in load_file(root / "clip/t5xxl_fp16.safetensors").items()}
    assert max(v.abs().max() for v in t5.values()) < 2000                     # the weights fit fp16
    save_file(t5, tmp_path / "enc/t5xxl_fp16.safetensors")
    encode = lambda dtype: sd.load_text_encoders(tmp_path / "enc", dtype=dtype, context_dim=192, t5_length=16
                                                 ).encode(["a red fox in the snow"])[0]
    torch.testing.assert_close(encode(torch.float16), encode(torch.float32), atol=0.05, rtol=0.01)


def test_fp8_t5_files_load_upcast_and_fp16_is_preferred(single_files, tmp_path):
    root, _ = single_files
    t5 = load_file(root / "clip/t5xxl_fp16.safetensors")
    scales = {k: v.abs().max().float() / 448 for k, v in t5.items() if k.endswith("q.weight")}  # as _scaled
    fp8 = {k: (v.float() / scales[k] if k in scales else v).to(torch.float8_e4m3fn) for k, v in t5.items()}
    fp8.update({k.replace(".weight", ".scale_weight"): s for k, s in scales.items()})
    fp8["scaled_fp8"] = torch.zeros(0)
    (tmp_path / "comfy").mkdir()
    for name in ("clip_l.safetensors", "clip_g.safetensors", "tokenizer", "tokenizer_2", "tokenizer_3"):
        (tmp_path / "comfy" / name).symlink_to(root / "clip" / name)
    save_file(fp8, tmp_path / "comfy/t5xxl_fp8_e4m3fn_scaled.safetensors")
    loaded = sd.load_text_encoders(tmp_path / "comfy", dtype=torch.bfloat16, context_dim=192).t5.state_dict()
    for k, v in fp8.items():
        if k.endswith(".weight"):
            expect = (v.float() * scales[k]).to(torch.bfloat16) if k in scales else v.to(torch.bfloat16)
            assert loaded[k].dtype == torch.bfloat16 and torch.equal(loaded[k], expect), k
    (tmp_path / "comfy/t5xxl_fp16.safetensors").symlink_to(root / "clip/t5xxl_fp16.safetensors")
    loaded = sd.load_text_encoders(tmp_path / "comfy", context_dim=192).t5.state_dict()
    assert all(torch.equal(loaded[k], v.float()) for k, v in t5.items())


def test_a_clip_l_file_with_a_text_projection_is_read_as_the_references_read_it(single_files, tmp_path):
    """SAI's reference, ComfyUI and diffusers' single-file converter take CLIP-L's pooled output without any
    projection (the README): one a clip_l file carries (e.g. openai's, saved by transformers) is not applied."""
    root, _ = single_files
    (tmp_path / "enc").mkdir()
    for name in ("clip_g.safetensors", "t5xxl_fp16.safetensors", "tokenizer", "tokenizer_2", "tokenizer_3"):
        (tmp_path / "enc" / name).symlink_to(root / "clip" / name)
    clip_l = load_file(root / "clip/clip_l.safetensors")
    projection = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    save_file(clip_l, tmp_path / "enc/clip_l.safetensors")
    expected = sd.load_text_encoders(tmp_path / "enc", context_dim=192).encode(["a red fox"])
    save_file({**clip_l, "text_projection.weight": projection}, tmp_path / "enc/clip_l.safetensors")
    torch.testing.assert_close(sd.load_text_encoders(tmp_path / "enc", context_dim=192).encode(["a red fox"]),
                               expected)


def encoder_folder(root: Path, folder: Path, **files: dict) -> Path:
    """`folder` with the fixture's clip_l, clip_g and t5xxl_fp16 files and tokenizers, `files` (a file name's
    stem: its tensors) written in their place or beside them."""
    folder.mkdir()
    for name in ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors", "tokenizer",
                 "tokenizer_2", "tokenizer_3"):
        if Path(name).stem not in files:
            (folder / name).symlink_to(root / "clip" / name)
    for stem, tensors in files.items():
        save_file(tensors, folder / f"{stem}.safetensors")
    return folder


def test_a_clip_g_without_its_projection_is_refused_and_comfyuis_old_saves_load(single_files, tmp_path):
    """A CLIP-G file without `text_projection.weight` loaded with the identity in its place (right for CLIP-L
    only): every pooled vector silently wrong. ComfyUI's older CLIPSave node wrote the projection as
    `text_projection` (transposed), which ComfyUI reads: here it was 'weights do not fit'."""
    root, _ = single_files
    clip_g = load_file(root / "clip/clip_g.safetensors")
    projection = clip_g.pop("text_projection.weight")
    folder = encoder_folder(root, tmp_path / "cut", clip_g=clip_g)
    one_line_error(lambda: sd.load_text_encoders(folder, context_dim=192),
                   r"cut/clip_g.safetensors has no text_projection.weight.*CLIP-G's pooled output")
    folder = encoder_folder(root, tmp_path / "comfy", clip_g={**clip_g, "text_projection": projection.T.contiguous()})
    torch.testing.assert_close(sd.load_text_encoders(folder, context_dim=192).encode(["a red fox"]),
                               sd.load_text_encoders(root / "clip", context_dim=192).encode(["a red fox"]))


def test_text_encoder_files_under_a_prefix_load_and_partial_or_openclip_ones_are_named(single_files, tmp_path):
    """Files whose names carry a prefix (`model.`, an SD1 checkpoint's `cond_stage_model.transformer.`) were
    refused as 'not a clip_l text encoder: it looks like a CLIP text encoder'; a T5 without its final norm
    as 'not a t5xxl text encoder: it looks like a T5 text encoder'; an OpenCLIP-format CLIP-G by its keys."""
    root, _ = single_files
    l, g, t5 = (load_file(root / "clip" / f"{n}.safetensors") for n in ("clip_l", "clip_g", "t5xxl_fp16"))
    folder = encoder_folder(root, tmp_path / "prefixed", clip_l={f"model.{k}": v for k, v in l.items()},
                            clip_g={f"cond_stage_model.transformer.{k}": v for k, v in g.items()},
                            t5xxl_fp16={f"model.{k}": v for k, v in t5.items()})
    torch.testing.assert_close(sd.load_text_encoders(folder, context_dim=192).encode(["a red fox"]),
                               sd.load_text_encoders(root / "clip", context_dim=192).encode(["a red fox"]))
    no_norm = {k: v for k, v in t5.items() if "final_layer_norm" not in k}
    folder = encoder_folder(root, tmp_path / "no_norm", t5xxl_fp16=no_norm)
    one_line_error(lambda: sd.load_text_encoders(folder, context_dim=192),
                   r"t5xxl_fp16.safetensors has t5xxl's layers but no encoder.final_layer_norm.weight: "
                   r"cut short\? download it again")
    openclip = {"transformer.resblocks.0.ln_1.weight": torch.ones(128), "token_embedding.weight": g[
        "text_model.embeddings.token_embedding.weight"], "text_projection": torch.ones(128, 128)}
    folder = encoder_folder(root, tmp_path / "openclip", clip_g=openclip)
    one_line_error(lambda: sd.load_text_encoders(folder, context_dim=192),
                   r"clip_g.safetensors is not a clip_g text encoder: it looks like an OpenCLIP text encoder "
                   r"\(open_clip's names: use one with transformers' names, as Stability AI's clip_g")


def test_a_flan_t5_beside_sd3s_t5_is_never_picked(single_files, tmp_path):
    """FLAN-T5-XXL (its files: flan_t5_xxl_*, t5xxl_flan_*) has T5-XXL's names and shapes; in a shared ComfyUI
    folder `flan_t5_xxl_fp16.safetensors` sorted before `t5xxl_fp16.safetensors` and was read as SD3's T5."""
    root, _ = single_files
    flan = {k: v * 2 for k, v in load_file(root / "clip/t5xxl_fp16.safetensors").items()}
    folder = encoder_folder(root, tmp_path / "shared", flan_t5_xxl_fp16=flan, t5xxl_flan_fp16=flan)
    expected = sd.load_text_encoders(root / "clip", context_dim=192).t5.state_dict()
    loaded = sd.load_text_encoders(folder, context_dim=192).t5.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_whole_clip_and_t5_model_files_load_their_text_encoder_as_comfyui_does(single_files, tmp_path):
    """A clip_l file holding the whole CLIP (vision tower too, as openai/clip-vit-large-patch14's model.safetensors)
    or a t5xxl holding the whole T5 (decoder, lm_head): ComfyUI reads their text encoder; here they were refused
    as weights that 'do not fit the detected architecture'."""
    root, _ = single_files
    (tmp_path / "enc").mkdir()
    for name in ("clip_g.safetensors", "tokenizer", "tokenizer_2", "tokenizer_3"):
        (tmp_path / "enc" / name).symlink_to(root / "clip" / name)
    clip_l, t5 = load_file(root / "clip/clip_l.safetensors"), load_file(root / "clip/t5xxl_fp16.safetensors")
    save_file({**clip_l, "vision_model.embeddings.patch_embedding.weight": torch.ones(8, 3, 14, 14),
               "visual_projection.weight": torch.ones(64, 8), "logit_scale": torch.tensor(4.6)},
              tmp_path / "enc/clip_l.safetensors")
    save_file({**t5, "decoder.block.0.layer.0.SelfAttention.q.weight": torch.ones(64, 192).half(),
               "lm_head.weight": torch.ones(40, 192).half()}, tmp_path / "enc/t5xxl_fp16.safetensors")
    expected = sd.load_text_encoders(root / "clip", context_dim=192).encode(["a red fox"])
    torch.testing.assert_close(sd.load_text_encoders(tmp_path / "enc", context_dim=192).encode(["a red fox"]),
                               expected)


def test_single_file_text_encoder_names_and_errors(single_files, tmp_path):
    root, _ = single_files
    model = root / "aio" / ALL_IN_ONE
    l, g, t5 = "clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"
    layouts = {  # folder -> {file name: the file it is}
        "renamed": {l: l, g: g, "google_t5-v1_1-xxl_encoderonly-fp16.safetensors": t5,
                    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": l},   # Wan's T5, not SD3's: never picked
        "umt5_first": {l: l, g: g, "t5xxl_fp8_e4m3fn.safetensors": t5, "umt5_xxl_fp16.safetensors": l},  # nor as fp16
        "empty": {"notes.safetensors": "vae"}, "no_t5": {l: l, g: g},
        "vae_as_g": {l: l, g: "vae", t5: t5}, "l_as_g": {l: l, g: l, t5: t5}, "swapped": {l: g, g: l, t5: t5}}
    for folder, files in layouts.items():
        (tmp_path / folder).mkdir()
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            (tmp_path / folder / name).symlink_to(root / "clip" / name)
        for name, what in files.items():
            vae = root / "diffusers/vae/diffusion_pytorch_model.safetensors"
            (tmp_path / folder / name).symlink_to(vae if what == "vae" else root / "clip" / what)
    assert sd.load_text_encoders(tmp_path / "renamed", context_dim=192).t5.config.d_model == 192
    assert sd.load_text_encoders(tmp_path / "umt5_first", context_dim=192).t5.config.d_model == 192
    cases = {
        "empty": "empty has no clip_l \\(looked for clip_l\\*.safetensors or a diffusers-layout text_encoder",
        "no_t5": "no_t5 has no t5xxl.*; T5 may be skipped with --no-t5",
        "vae_as_g": "clip_g.safetensors is not a clip_g text encoder: it looks like a VAE",
        "l_as_g": "clip_g.safetensors has no text_projection.weight.*\\(a CLIP-L file\\?\\)",
        "swapped": "clip_l.safetensors is 128 wide, clip_g.safetensors 64: CLIP-L is the narrower",  # same sum
    }
    for folder, message in cases.items():
        with pytest.raises(sd.UserError, match=message):
            sd.load_pipeline(str(model), str(tmp_path / folder), device="cpu", dtype="fp32")
    (tmp_path / "cut_t5").mkdir()                           # a T5 file without its token embedding
    for name in (l, g, "tokenizer", "tokenizer_2", "tokenizer_3"):
        (tmp_path / "cut_t5" / name).symlink_to(root / "clip" / name)
    save_file({k: v for k, v in load_file(root / "clip" / t5).items() if "embed_tokens" not in k and "shared" not in k},
              tmp_path / "cut_t5" / t5)
    one_line_error(lambda: sd.load_text_encoders(tmp_path / "cut_t5", context_dim=192), "bad text encoder weights")
    # untrusted layer counts, refused before that many layers are built: a far index, a config.json claiming 2M
    far = {**load_file(root / "clip" / t5), "encoder.block.2000000.layer.0.layer_norm.weight": torch.ones(1)}
    save_file(far, tmp_path / "cut_t5" / t5)
    one_line_error(lambda: sd.load_text_encoders(tmp_path / "cut_t5", context_dim=192), r"not 0\.\.\d+: .*2000000")
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
        (tmp_path / "huge" / name).mkdir(parents=True)
        for f in (root / "diffusers" / name).iterdir():
            (tmp_path / "huge" / name / f.name).symlink_to(f)
    config = json.loads((root / "diffusers/text_encoder/config.json").read_text())
    (tmp_path / "huge/text_encoder/config.json").unlink()
    (tmp_path / "huge/text_encoder/config.json").write_text(json.dumps({**config, "num_hidden_layers": 2_000_000}))
    one_line_error(lambda: sd.load_text_encoders(tmp_path / "huge"), r"weights of \d+ layers, config of 2000000")
    weights = {k: v for k, v in load_file(model).items() if not k.startswith("text_encoders.")}
    save_file(weights, tmp_path / "no_text.safetensors")  # said from the header, before the MMDiT loads:
    passing = re.escape("pass --text-encoders DIR (config: text_encoders): clip_l, clip_g, t5xxl "
                        ".safetensors files or a diffusers-layout SD3.5 folder")
    one_line_error(lambda: sd.load_text_encoders(tmp_path / "no_text.safetensors"),
                   f"no_text.safetensors has no clip_l \\({passing}\\)$")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sd, "load_mmdit", lambda *a, **k: pytest.fail("the MMDiT loaded before the error"))
        one_line_error(lambda: sd.load_pipeline(str(tmp_path / "no_text.safetensors"), device="cpu"),
                       "no_text.safetensors holds no text encoders: " + passing)
        save_file({k: v for k, v in load_file(model).items() if not k.startswith("first_stage_model.")},
                  tmp_path / "no_vae.safetensors")          # else read whole a second time, only to fail
        one_line_error(lambda: sd.load_pipeline(str(tmp_path / "no_vae.safetensors"), device="cpu"),
                       "no_vae.safetensors holds no VAE: pass --vae")
    (tmp_path / "bare").mkdir()                 # no tokenizers beside it, offline, no cache: the CLI's one line
    (tmp_path / "bare/model.safetensors").symlink_to(model)
    r = run_cli("sample.py", "--model", str(tmp_path / "bare/model.safetensors"), "--prompt", "x",
                "--out", str(tmp_path / "x"), HF_HOME=str(tmp_path / "hf"))
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "no tokenizer*/ in" in last and "go online once" in last, r.stderr


def test_text_encoder_files_with_hostile_shapes_are_one_line_errors_before_any_prompt(single_files, tmp_path):
    """A 0-dim token embedding was a bare IndexError, a T5 of 0 heads a bare ZeroDivisionError; a CLIP with
    fewer positions than its tokenizer's 77 loaded, then the first prompt was transformers' bare ValueError."""
    root, _ = single_files
    l, g, t5 = (load_file(root / "clip" / f"{n}.safetensors") for n in ("clip_l", "clip_g", "t5xxl_fp16"))
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    for name, edit in [("clip_l", {"text_model.embeddings.token_embedding.weight": torch.tensor(1.0)}),
                       ("t5xxl_fp16", {bias: torch.zeros(32, 0)}),
                       ("clip_g", {"text_model.embeddings.position_embedding.weight": torch.zeros(5, 128)})]:
        folder = tmp_path / name
        folder.mkdir()
        for part in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            (folder / part).symlink_to(root / "clip" / part)
        for file, weights in (("clip_l", l), ("clip_g", g), ("t5xxl_fp16", t5)):
            save_file({**weights, **edit} if file == name else weights, folder / f"{file}.safetensors")
        one_line_error(lambda: sd.load_text_encoders(folder, context_dim=192), "bad text encoder weights")


#################################################################################
#                                   Training                                    #
#################################################################################

def make_dataset(folder: Path):
    """The demo dataset (red stripes, blue disc) plus a broken file that must be skipped."""
    sd.write_demo_dataset(folder)
    (folder / "broken.jpg").write_bytes(b"not an image")


def tiny_config(tmp_path, **sets) -> sd.Config:
    return sd.load_config(None, tiny_overrides(tmp_path, **sets))


def tiny_overrides(tmp_path, **sets) -> list[str]:
    base = {"model": "tiny", "dtype": "fp32", "device": "cpu", "t5_length": 16, "output_dir": str(tmp_path / "run"),
            "dataset.path": str(tmp_path / "data"), "dataset.resolution": 64, "dataset.cache_dir": str(tmp_path / "cache"),
            "dataset.caption_dropout": 0.0, "lora.rank": 8, "lora.targets": "all", "train.lr": 3e-3,
            "train.warmup_steps": 0, "train.steps": 40, "train.save_every": 20, "train.timestep_sampling": "uniform",
            "train.gradient_checkpointing": True, "sample.sample_every": 20, "sample.sample_steps": 3,
            "sample.width": 32, "sample.height": 32, "sample.prompts": ["red stripes", "blue disc"]}
    base.update(sets)
    return [f"{k}={json.dumps(v)}" for k, v in base.items()]


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


def test_a_trainer_made_by_hand_saves_and_samples_without_train(tmp_path):
    """save_previews read train()'s progress bar, which only train() makes: a notebook calling save_and_sample()
    on a Trainer it built got a bare AttributeError ('Trainer' object has no attribute 'bar')."""
    make_dataset(tmp_path / "data")
    trainer = sd.Trainer(tiny_config(tmp_path, **{"sample.prompts": ["red stripes"]}))
    try:
        trainer.save_and_sample(torch.zeros(2, trainer.cfg.train.loss_bins))
    finally:
        sd.end_training(trainer, {})
    assert (tmp_path / "run" / "samples_step_000000" / "step_000000_sample_00.png").is_file()
    assert (tmp_path / "run" / "lora.safetensors").is_file()


def test_previews_are_made_every_sample_every_steps_and_at_the_last(tmp_path):
    """sample.sample_every 2 of 3 steps: previews (and the loss report) at steps 0, 2 and 3, not at each step."""
    make_dataset(tmp_path / "data")
    sd.train(tiny_config(tmp_path, **{"train.steps": 3, "sample.sample_every": 2, "sample.sample_steps": 1,
                                      "sample.prompts": ["red stripes"]}))
    made = sorted(path.name for path in (tmp_path / "run").glob("samples_step_*"))
    assert made == [f"samples_step_{step:06d}" for step in (0, 2, 3)]


def test_a_trainers_previews_leave_its_models_on_its_device(tmp_path, monkeypatch):
    """The Trainer loads with offload (the encoders visit the GPU for the caching), then trains on the device:
    previews that still offloaded would send its MMDiT back to the CPU after each."""
    make_dataset(tmp_path / "data")
    trainer = sd.Trainer(tiny_config(tmp_path, **{"sample.prompts": ["red stripes"]}))
    moves, real = [], torch.nn.Module.to

    def to(module, *args, **kwargs):
        moves.append(type(module).__name__)
        return real(module, *args, **kwargs)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    try:
        trainer.save_and_sample(torch.zeros(2, trainer.cfg.train.loss_bins))
        moved = list(moves)             # (save_previews brings the VAE over, end_training frees all)
    finally:
        sd.end_training(trainer, {})
    assert trainer.pipe.offload is False and "MMDiT" not in moved, moved


def test_a_trainer_frees_its_text_encoders_though_its_dataset_holds_the_pipeline(tmp_path, monkeypatch):
    """The Trainer drops pipe.text once the captions and preview prompts are encoded (T5-XXL is ~10 GB); its
    LatentDataset keeps the Pipeline (self.pipe), and a dataset's or Trainer's reference to the encoders would
    keep them for the whole run. gc.collect(): the first import of transformers' model classes leaves a cycle
    of frames holding the loader's locals until the collector runs."""
    real_load, encoders = sd.load_pipeline, []

    def load_pipeline(*args, **kwargs):
        pipe = real_load(*args, **kwargs)
        encoders.extend(weakref.ref(m) for m in [pipe.text, *pipe.text.modules()])
        return pipe
    monkeypatch.setattr(sd, "load_pipeline", load_pipeline)
    make_dataset(tmp_path / "data")
    trainer = sd.Trainer(tiny_config(tmp_path, **{"sample.prompts": ["red stripes"]}))
    try:
        gc.collect()
        assert len(encoders) == 4 and [ref() for ref in encoders] == [None] * 4
    finally:
        sd.end_training(trainer, {})


def test_caching_has_the_vae_or_the_text_encoders_on_the_gpu_never_both(tmp_path, monkeypatch):
    """The Trainer brought the VAE and the text encoders to the GPU together for the caching: T5 (~9 GiB bf16)
    beside the VAE's encoding of a 1024 px image (~1.25 GiB) overflowed a 12 GB card before training began."""
    real_load, seen = sd.load_pipeline, []

    def load_pipeline(*args, **kwargs):
        pipe = real_load(*args, **kwargs)
        vae, text = pipe.vae, pipe.text         # on the CPU too, offload tracks what visits the device
        real_vae, real_text = vae.encode_moments, text.encode
        on_device = lambda: {"vae": vae in pipe.visiting, "text": all(m in pipe.visiting for m in text.modules())}
        monkeypatch.setattr(vae, "encode_moments", lambda *a: seen.append(("vae", on_device())) or real_vae(*a))
        monkeypatch.setattr(text, "encode", lambda *a: seen.append(("text", on_device())) or real_text(*a))
        return pipe
    monkeypatch.setattr(sd, "load_pipeline", load_pipeline)
    make_dataset(tmp_path / "data")
    sd.end_training(sd.Trainer(tiny_config(tmp_path, **{"sample.prompts": ["red stripes"]})), {})
    assert {"vae", "text"} == {what for what, _ in seen}
    assert all(visiting == {"vae": what == "vae", "text": what == "text"} for what, visiting in seen), seen


def test_a_trainer_frees_its_text_encoders_before_the_garbage_collector_runs(tmp_path):
    """The first import of transformers (or of its model classes) leaves reference cycles of import frames, and
    through them the frames of the loaders that called it: load_pipeline's held the text encoders (T5-XXL:
    ~9.5 GB of RAM) after the Trainer dropped them, until the garbage collector ran. A fresh process makes that
    first import; the collector is off there."""
    make_dataset(tmp_path / "data")
    overrides = tiny_overrides(tmp_path, **{"sample.prompts": ["red stripes"]})
    script = ("import gc, weakref, sd35_lora as sd\ngc.disable()\nreal_load, encoders = sd.load_pipeline, []\n"
              "def load_pipeline(*args, **kwargs):\n    pipe = real_load(*args, **kwargs)\n"
              "    encoders.extend(weakref.ref(m) for m in [pipe.text, *pipe.text.modules()])\n    return pipe\n"
              f"sd.load_pipeline = load_pipeline\ntrainer = sd.Trainer(sd.load_config(None, {overrides!r}))\n"
              "print([ref() is None for ref in encoders])\nsd.end_training(trainer, {})\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert run.stdout.splitlines()[-1:] == [str([True] * 4)], run.stderr[-500:]


def test_previews_sample_with_lora_dropout_off_and_training_goes_on_with_it(tmp_path, monkeypatch):
    """save_previews samples the MMDiT in eval mode (LoRA dropout would make the previews noisy and differ from
    the LoRA file's images; generate's in_eval_mode), then puts it back in train mode for the next steps."""
    make_dataset(tmp_path / "data")
    trainer = sd.Trainer(tiny_config(tmp_path, **{"lora.dropout": 0.5, "sample.prompts": ["red stripes"]}))
    dropouts = [m for m in trainer.mmdit.modules() if isinstance(m, torch.nn.Dropout)]
    seen, real_denoise = [], sd.denoise

    def denoise(model, *args, **kwargs):                    # the modes the previews are sampled in
        seen.append([m.training for m in dropouts])
        return real_denoise(model, *args, **kwargs)
    monkeypatch.setattr(sd, "denoise", denoise)
    try:
        assert dropouts and all(m.training for m in dropouts)
        sd.save_previews(trainer)
    finally:
        sd.end_training(trainer, {})
    assert seen == [[False] * len(dropouts)] and all(m.training for m in dropouts)


def test_training_keeps_its_preview_prompts_embeddings_on_the_cpu_until_their_batch(tmp_path, monkeypatch):
    """The Trainer kept its preview prompts' embeddings (up to 100, T5-XXL's rows in each) where the text encoders
    made them, on the GPU, for the whole run; generate() keeps its own on the CPU until their batch. The encoders'
    outputs are marked here as on the GPU: a tensor subclass whose .cpu() gives a plain tensor."""
    class OnTheGPU(torch.Tensor):
        def cpu(self):
            return self.as_subclass(torch.Tensor)
    real_encode, encoded = sd.TextEncoders.encode, []
    monkeypatch.setattr(sd.TextEncoders, "encode", lambda text, prompts: encoded.append(len(prompts)) or
                        tuple(t.as_subclass(OnTheGPU) for t in real_encode(text, prompts)))
    make_dataset(tmp_path / "data")
    trainer = sd.Trainer(tiny_config(tmp_path))
    try:
        assert trainer.sample_settings.cfg > 1                  # the negative prompt's rows kept too
        stored = [t for pair in trainer.embeddings for t in pair]
        sd.save_previews(trainer)
    finally:
        sd.end_training(trainer, {})
    assert len(stored) == 4 and all(type(t) is torch.Tensor for t in stored)
    assert max(encoded) == 1                        # T5-XXL on one text at a time: 100 previews at once fill a GPU
    assert len(list((tmp_path / "run" / "samples_step_000000").glob("*.png"))) == 2


def test_a_trainer_conditions_without_t5_and_previews_with_the_variant_it_is_told(tmp_path):
    """use_t5 false: the captions' and the previews' T5 tokens are zeros (what sample.py gives a LoRA trained so);
    variant: the previews take that variant's presets (Large Turbo's 4 steps, cfg 1, Euler), not the detected one's."""
    make_dataset(tmp_path / "data")
    sets = {"use_t5": False, "variant": "sd3.5-large-turbo", "sample.sample_steps": 0, "sample.prompts": ["a"]}
    trainer = sd.Trainer(tiny_config(tmp_path, **sets))
    try:
        turbo, detected = sd.PRESETS["sd3.5-large-turbo"], sd.PRESETS[trainer.mmdit.cfg.variant()]
        s = trainer.sample_settings
        assert (turbo.steps, turbo.cfg, turbo.sampler) != (detected.steps, detected.cfg, detected.sampler)
        assert trainer.pipe.variant == "sd3.5-large-turbo" and (s.steps, s.cfg, s.sampler) == (4, 1.0, "euler")
        contexts = [trainer.embeddings[0][0][0]] + [load_file(f)["context"] for f in trainer.data.text_files]
        assert all(c.shape[0] == 77 + 16 and c[:77].any() and not c[77:].any() for c in contexts)
        sd.save_checkpoint(trainer)                     # the LoRA says so: sample.py then samples without T5
        trained = sample.trained_settings([str(tmp_path / "run" / "lora.safetensors")])
        assert (trained["use_t5"], trained["t5_length"], trained["model"]) == (False, 16, "tiny")
    finally:
        sd.end_training(trainer, {})


def test_resume_reproduces_uninterrupted_losses(tmp_path, capsys):
    """Also: resuming a finished run without raising train.steps says there is nothing to train (it returned
    the LoRA without a word, as if it had trained on)."""
    make_dataset(tmp_path / "data")
    shared = {"train.save_every": 6, "sample.sample_every": 0, "lora.dropout": 0.1, "dataset.flip": True,
              "dataset.caption_dropout": 0.3, "train.batch_size": 2, "train.grad_accum": 2}
    sd.train(tiny_config(tmp_path, **shared, **{"train.steps": 12, "output_dir": str(tmp_path / "full")}))
    sd.train(tiny_config(tmp_path, **shared, **{"train.steps": 6, "output_dir": str(tmp_path / "half")}))
    out = capsys.readouterr().out                           # 2 images: a global batch of 2, not 2 x 2
    assert "loss by sigma bin (24 samples since the last report or resume): [0.0,0.2)" in out   # 12 steps
    assert "loss by sigma bin (12 samples" in out                                                 # 6 steps
    sd.train(tiny_config(tmp_path, **shared, **{"train.steps": 12, "output_dir": str(tmp_path / "half")}), resume=True)
    assert "loss by sigma bin (12 samples" in capsys.readouterr().out      # since the resume: said so
    assert losses(tmp_path / "half") == losses(tmp_path / "full")
    capsys.readouterr()
    sd.train(tiny_config(tmp_path, **shared, **{"train.steps": 12, "output_dir": str(tmp_path / "half")}), resume=True)
    assert "nothing to train: the checkpoint is at step 12 and train.steps is 12" in capsys.readouterr().err
    assert losses(tmp_path / "half") == losses(tmp_path / "full")


def stub_trainer(step: int = 0, seed: int = 0, sizes=((64, 64),) * 4) -> sd.Trainer:
    """The state Trainer.forward_backward steps through, without models: data.get records each batch's first
    image and the first number its generator draws (flow_matching_loss is the caller's)."""
    data = sd.LatentDataset.__new__(sd.LatentDataset)
    data.sizes, data.drawn = list(sizes), []

    def get(ids, vae, cfg, g, keep):
        data.drawn.append((ids[0], torch.rand(1, generator=g).item()))
        return [torch.zeros(1)] * 3                 # latents, context, pooled
    data.get = get
    tr = sd.Trainer.__new__(sd.Trainer)
    tr.cfg, tr.data, tr.step, tr.world, tr.rank, tr.global_batch = sd.Config(), data, step, 1, 0, 1
    tr.cfg.train.seed, tr.pipe = seed, types.SimpleNamespace(device="cpu", vae=None)
    tr.mmdit, tr.autocast, tr.sample_settings = None, None, types.SimpleNamespace(shift=3.0)
    tr.epoch, tr.order = 0, data.batches(1, seed)                   # as Trainer.__init__ starts
    return tr


def test_each_step_draws_its_own_noise_and_each_epoch_its_own_order_as_a_resume_redraws_them(monkeypatch):
    """Trainer.forward_backward: every image once per epoch, a new order each epoch, new noise (the generator
    handed to the batch and the loss) each step; a run resumed at step 6 trains what the whole run trained.
    Under torchrun each of 2 processes trains its half of the same global batches, with the same draws."""
    monkeypatch.setattr(sd, "flow_matching_loss", lambda *args: (torch.zeros((), requires_grad=True),
                                                                 torch.zeros(1), torch.full((1,), 0.5)))
    monkeypatch.setattr(sd, "all_reduce_step", lambda params, sums: sums)

    def run(tr: sd.Trainer, steps: int) -> list:
        while tr.step < steps:
            tr.forward_backward(False)
            tr.step += 1
        return tr.data.drawn
    whole = run(stub_trainer(0), 12)
    images, draws = [image for image, _ in whole], [draw for _, draw in whole]
    assert all(sorted(images[e:e + 4]) == [0, 1, 2, 3] for e in (0, 4, 8))
    assert len({tuple(images[e:e + 4]) for e in (0, 4, 8)}) > 1 and len(set(draws)) == 12
    assert run(stub_trainer(6), 12) == whole[6:]
    assert [draw for _, draw in run(stub_trainer(0, seed=1), 12)] != draws

    def process(rank: int) -> tuple[list, list]:        # process `rank` of 2, a global batch of 2: 3 epochs
        tr, taken = stub_trainer(0), []
        tr.world, tr.rank, tr.global_batch, tr.order, tr.params = 2, rank, 2, tr.data.batches(2, 0), []
        get = tr.data.get
        tr.data.get = lambda ids, vae, cfg, g, keep: taken.extend(ids[keep]) or get(ids, vae, cfg, g, keep)
        return run(tr, 6), taken
    (drawn_0, taken_0), (drawn_1, taken_1) = process(0), process(1)
    assert drawn_0 == drawn_1                           # the same global batch and draws in every step
    assert all(sorted(taken_0[e:e + 2] + taken_1[e:e + 2]) == [0, 1, 2, 3] for e in (0, 2, 4))   # halves


def test_under_torchrun_each_process_draws_its_own_lora_dropout_masks_each_step_as_a_resume_redraws_them(monkeypatch):
    """Two processes: forward_backward seeds the LoRA dropout (the global generator) from (train.seed, step,
    process), so no two processes or steps share masks, and a resumed run redraws a step's masks as they were."""
    drawn = []
    monkeypatch.setattr(sd, "all_reduce_step", lambda params, sums: sums)
    monkeypatch.setattr(sd, "flow_matching_loss", lambda *args: drawn.append(tuple(torch.rand(4).tolist())) or
                        (torch.zeros((), requires_grad=True), torch.zeros(1), torch.full((1,), 0.5)))
    def masks(rank: int, step: int) -> tuple:               # the first draws of the step's dropout masks
        tr = stub_trainer(step)
        tr.world, tr.rank, tr.global_batch, tr.order, tr.params = 2, rank, 2, tr.data.batches(2, 0), []
        torch.rand(7)                                       # whatever ran before in this process: no matter
        tr.forward_backward(False)
        return drawn[-1]
    seen = [masks(rank, step) for rank, step in [(0, 0), (0, 1), (1, 0), (1, 1)]]
    assert len(set(seen)) == 4 and masks(1, 1) == seen[-1], seen



def test_resume_mid_epoch_with_buckets_and_uneven_micro_batches_reproduces_the_losses(tmp_path):
    """3 square and 2 wide images, global batch 2 x grad_accum 2: a bucket's step is 2 + 1 or 2 + 0 samples.
    Stopped at step 3 (mid-epoch: 2 steps each) and resumed, the run gives the uninterrupted run's losses."""
    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    for name, shape in (("square", (128, 128, 3)), ("wide", (64, 192, 3))):
        for i in range(3 if name == "square" else 2):
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(tmp_path / "data" / f"{name}{i}.png")
            (tmp_path / "data" / f"{name}{i}.txt").write_text(f"{name} {i}")
    shared = {"dataset.resolution": 128, "train.batch_size": 2, "train.grad_accum": 2, "train.save_every": 3,
              "sample.sample_every": 0, "sample.prompts": [], "lora.targets": "attn", "lora.dropout": 0.1,
              "dataset.flip": True, "dataset.caption_dropout": 0.3, "train.warmup_steps": 2,
              "train.lr_schedule": "cosine", "train.timestep_sampling": "logit_normal"}
    buckets = [item["size"] for item in sd.scan_dataset(tiny_config(tmp_path, **shared).dataset)]
    assert sorted(collections.Counter(buckets).values()) == [2, 3]
    sd.train(tiny_config(tmp_path, **shared, **{"train.steps": 5, "output_dir": str(tmp_path / "full")}))
    sd.train(tiny_config(tmp_path, **shared, **{"train.steps": 3, "output_dir": str(tmp_path / "half")}))
    sd.train(tiny_config(tmp_path, **shared, **{"train.steps": 5, "output_dir": str(tmp_path / "half")}), resume=True)
    assert len(losses(tmp_path / "full")) == 5 and losses(tmp_path / "half") == losses(tmp_path / "full")

def test_the_logged_sigma_is_the_mean_of_the_steps_samples_with_grad_accum(tmp_path, monkeypatch):
    """log.jsonl's sigma is the step's mean training sigma over the samples it trained on (grad_accum micro-
    batches, a bucket's short last batch), not the sum over train.batch_size (mutation audit of Part 1)."""
    make_dataset(tmp_path / "data")
    monkeypatch.setattr(sd, "sample_training_sigmas", lambda n, cfg, shift, g: torch.full((n,), 0.25))
    sd.train(tiny_config(tmp_path, **{"train.steps": 2, "train.grad_accum": 2, "sample.sample_every": 0}))
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [round(entry["sigma"], 6) for entry in logged] == [0.25, 0.25]


def test_the_loss_by_sigma_bin_counts_each_sample_in_the_bin_of_its_sigma(monkeypatch):
    """forward_backward's sums: loss_bins equal bins of 0..1, [i/k, (i+1)/k), sigma 1 in the last: per bin the
    summed unweighted MSE and the count of samples, as the report 'loss by sigma bin' prints them."""
    sigmas, mse = torch.tensor([0.0, 0.19, 0.2, 0.55, 0.61, 0.999, 1.0]), torch.arange(1.0, 8.0)
    monkeypatch.setattr(sd, "flow_matching_loss", lambda *args: (torch.zeros((), requires_grad=True), mse, sigmas))
    tr = stub_trainer()
    tr.cfg.train.loss_bins = 5
    sums = tr.forward_backward(False)
    lower = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8])
    inside = (sigmas[:, None] >= lower) & ((sigmas[:, None] < lower + 0.2) | (lower == 0.8))   # (sample, bin)
    assert inside.sum(1).tolist() == [1] * 7
    torch.testing.assert_close(sums[3:8], (inside * mse[:, None]).sum(0))
    torch.testing.assert_close(sums[8:], inside.sum(0).float())
    assert sums[1] == pytest.approx(sigmas.sum().item())     # the log's sigma: this sum over the count of samples


def test_each_loss_report_covers_the_samples_since_the_last_one(monkeypatch, capsys):
    """save_and_sample prints the loss by sigma bin of the samples since the last report, then starts anew."""
    monkeypatch.setattr(sd, "save_previews", lambda tr: None)
    tr = stub_trainer(step=2)
    tr.cfg.sample.sample_every, tr.cfg.train.save_every = 2, 0
    bins = torch.tensor([[1.5, 0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0]])   # loss sums, counts
    tr.save_and_sample(bins)
    assert "(3 samples since the last report or resume): [0.0,0.2) 0.5000  [0.2,0.4) -" in capsys.readouterr().out
    assert not bins.any()


def test_fresh_runs_with_the_same_seed_are_identical(tmp_path, monkeypatch):
    make_dataset(tmp_path / "data")
    real_load, disturbance = sd.load_pipeline, iter([1, 2, 3])

    def load_then_disturb(*args, **kwargs):           # real weights leave the global RNG in any state
        pipe = real_load(*args, **kwargs)
        torch.manual_seed(next(disturbance))
        return pipe
    monkeypatch.setattr(sd, "load_pipeline", load_then_disturb)
    for run, dropout in (("first", 0.1), ("second", 0.1), ("no_dropout", 0.0)):
        sd.train(tiny_config(tmp_path, **{"train.steps": 4, "sample.sample_every": 0, "lora.dropout": dropout,
                                          "output_dir": str(tmp_path / run)}))
    assert losses(tmp_path / "first") == losses(tmp_path / "second")
    assert losses(tmp_path / "first") != losses(tmp_path / "no_dropout")          # lora.dropout is applied


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


def test_ctrl_c_during_the_first_previews_stops_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    """One process trained a step after a Ctrl-C (or SIGTERM) during the step-0 previews, then saved step 1.
    It stops before training, with a checkpoint at step 0 (an output_dir with previews but no checkpoint is
    refused by a new run and cannot be resumed), from which --resume trains as a run not interrupted."""
    make_dataset(tmp_path / "data")
    real_generate = sd.generate

    def interrupted(*args, **kwargs):            # Ctrl-C while the step-0 previews render
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:   # else a traceback, no state
            os.kill(os.getpid(), signal.SIGINT)
        return real_generate(*args, **kwargs)
    monkeypatch.setattr(sd, "generate", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        sd.train(tiny_config(tmp_path, **{"train.steps": 4, "sample.sample_every": 0}))
    assert exit_info.value.code == 130 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert sd.read_safetensors(tmp_path / "run/training_state.safetensors", with_metadata=True)[1]["step"] == "0"
    assert capsys.readouterr().out.strip().splitlines()[-1] == ("interrupted at step 0; checkpoint saved. "
                                                                "Continue with --resume")
    assert not (tmp_path / "run/log.jsonl").exists()
    monkeypatch.setattr(sd, "generate", real_generate)
    sd.train(tiny_config(tmp_path, **{"train.steps": 2, "sample.sample_every": 0}), resume=True)
    sd.train(tiny_config(tmp_path, **{"train.steps": 2, "sample.sample_every": 0, "output_dir": str(tmp_path / "b")}))
    assert_same_run(tmp_path / "run", tmp_path / "b")
    shutil.rmtree(tmp_path / "b/samples_step_000002")       # previews a resume makes up, of a finished run
    monkeypatch.setattr(sd, "generate", interrupted)
    b = {"train.steps": 2, "sample.sample_every": 2, "output_dir": str(tmp_path / "b")}
    assert sd.train(tiny_config(tmp_path, **b), resume=True) == tmp_path / "b/lora.safetensors"   # not "stopped"


def signalling_at_the_second_call(function, signum: int):
    """`function`, which sends this process `signum` as its second call begins (e.g. the second preview set)."""
    calls = []

    def signalling(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signum)
        return function(*args, **kwargs)
    return signalling


def test_ctrl_c_during_the_previews_of_a_sample_step_stops_after_the_image_at_work(tmp_path, monkeypatch):
    """A Ctrl-C or SIGTERM while a sample step's previews rendered went on through all of them (up to 100 prompts:
    minutes on Large, past a scheduler's grace period before SIGKILL), then trained one more step before it saved.
    One process stops after the image at work, with a checkpoint of that step; --resume makes the rest of its
    previews and trains on as a run not interrupted."""
    make_dataset(tmp_path / "data")
    real_generate = sd.generate
    monkeypatch.setattr(sd, "generate", signalling_at_the_second_call(real_generate, signal.SIGINT))  # step 2's
    run, sets = tmp_path / "run", {"train.steps": 4, "train.save_every": 4, "sample.sample_every": 2}
    with pytest.raises(SystemExit) as exit_info:
        sd.train(tiny_config(tmp_path, **sets))
    assert exit_info.value.code == 130 and len(losses(run)) == 2
    assert sd.read_safetensors(run / "training_state.safetensors", with_metadata=True)[1]["step"] == "2"
    assert [p.name for p in (run / "samples_step_000002").iterdir()] == ["step_000002_sample_00.png"]
    monkeypatch.setattr(sd, "generate", real_generate)
    sd.train(tiny_config(tmp_path, **sets), resume=True)
    assert (run / "samples_step_000002/step_000002_sample_01.png").is_file()
    sd.train(tiny_config(tmp_path, **{**sets, "output_dir": str(tmp_path / "b")}))
    assert_same_run(run, tmp_path / "b")


def test_ctrl_c_during_the_next_to_last_step_ends_the_run_with_its_final_previews(tmp_path, monkeypatch):
    """Ctrl-C between steps stops after the next one: when that is the last step, the run has ended. It said
    "interrupted ... Continue with --resume" and skipped the final previews and loss.png, which --resume
    ("nothing to train") never made either."""
    make_dataset(tmp_path / "data")
    real_log = sd.Trainer.log

    def interrupt_after_step_2(self, *args, **kwargs):
        real_log(self, *args, **kwargs)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(sd.Trainer, "log", interrupt_after_step_2)
    lora = sd.train(tiny_config(tmp_path, **{"train.steps": 3, "sample.sample_every": 0}))
    assert lora.is_file() and (tmp_path / "run/loss.png").is_file()
    assert (tmp_path / "run/samples_step_000003/step_000003_sample_01.png").is_file()


def test_ctrl_c_in_a_step_stops_after_that_step(tmp_path, monkeypatch):
    """README: Ctrl-C or SIGTERM ends the run after the current step. One process trained one more step first
    (seconds to minutes on a large model, while a scheduler's grace period before SIGKILL runs out). A stop at
    a sample_every step skipped its previews (and loss.png), and --resume never made them."""
    make_dataset(tmp_path / "data")
    real_loss = sd.flow_matching_loss

    def interrupt_in_step_2(*args):
        if (tmp_path / "run/log.jsonl").is_file() and len(losses(tmp_path / "run")) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(*args)
    monkeypatch.setattr(sd, "flow_matching_loss", interrupt_in_step_2)
    run = {"train.steps": 10, "sample.sample_every": 2, "sample.prompts": ["red stripes"]}
    with pytest.raises(SystemExit) as exit_info:
        sd.train(tiny_config(tmp_path, **run))
    assert exit_info.value.code == 130 and len(losses(tmp_path / "run")) == 2
    assert sd.read_safetensors(tmp_path / "run/training_state.safetensors", with_metadata=True)[1]["step"] == "2"
    monkeypatch.setattr(sd, "flow_matching_loss", real_loss)
    sd.train(tiny_config(tmp_path, **{**run, "train.steps": 3}), resume=True)
    assert (tmp_path / "run/samples_step_000002/step_000002_sample_00.png").is_file()


def test_a_resume_makes_the_previews_of_its_first_step_only_where_a_sample_step_lacks_some(tmp_path, monkeypatch):
    """A run resumed at a sample step makes that step's previews only where a killed run left some unmade, and at
    any other step none: one that ended after its last step's previews (step 2, sample_every 2) and goes on to
    step 3 makes step 3's alone; resumed at step 3 (of 4: no sample step), it makes none there though its folder
    is gone."""
    make_dataset(tmp_path / "data")
    run = {"train.steps": 2, "train.save_every": 1, "sample.sample_every": 2}
    sd.train(tiny_config(tmp_path, **run))
    assert len(list((tmp_path / "run/samples_step_000002").glob("*.png"))) == len(tiny_config(tmp_path).sample.prompts)
    real_previews, made = sd.save_previews, []
    monkeypatch.setattr(sd, "save_previews", lambda trainer: made.append(trainer.step) or real_previews(trainer))
    sd.train(tiny_config(tmp_path, **{**run, "train.steps": 3}), resume=True)
    assert made == [3]
    shutil.rmtree(tmp_path / "run/samples_step_000003")
    sd.train(tiny_config(tmp_path, **{**run, "train.steps": 4}), resume=True)
    assert made == [3, 4]


@pytest.mark.parametrize("sample_every, killed_at", [(2, 2), (0, 3)])      # a sample_every step, the last step
def test_a_run_killed_during_its_previews_gets_them_all_on_resume(tmp_path, monkeypatch, sample_every, killed_at):
    """SIGKILL (the OOM killer, a scheduler) while a sample step's previews were written left that step's folder
    with some (or none: _atomic_save makes it first) of them; --resume took the folder as made and never wrote
    the rest, nor that step's loss.png; a last step's previews it never made under any sample_every. Killed
    in-process: an exception nothing catches, raised in place of the second image's write."""
    class Killed(BaseException):
        pass
    make_dataset(tmp_path / "data")
    real_save = sd._atomic_save
    second = tmp_path / f"run/samples_step_{killed_at:06d}/step_{killed_at:06d}_sample_01.png"

    def killed_at_the_second_preview(data, path, *args, **kwargs):
        if Path(path) == second:
            raise Killed
        return real_save(data, path, *args, **kwargs)
    monkeypatch.setattr(sd, "_atomic_save", killed_at_the_second_preview)
    run = {"train.steps": 3, "train.save_every": 1, "sample.sample_every": sample_every}
    with pytest.raises(Killed):
        sd.train(tiny_config(tmp_path, **run))
    assert not second.exists() and second.with_name(f"step_{killed_at:06d}_sample_00.png").is_file()
    monkeypatch.setattr(sd, "_atomic_save", real_save)
    sd.train(tiny_config(tmp_path, **run), resume=True)
    assert second.is_file() and len(losses(tmp_path / "run")) == 3


def test_a_run_killed_before_its_last_loss_plot_gets_it_on_resume(tmp_path, monkeypatch):
    """SIGKILL after the last step's previews, before loss.png was redrawn: --resume saw the previews and the
    run finished, and loss.png stayed one sample set stale (drawn at step 2 of 3) for good."""
    class Killed(BaseException):
        pass
    make_dataset(tmp_path / "data")
    real_plot, run = sd.plot_losses, tmp_path / "run"

    def killed_at_the_last_plot(log_path, png_path):
        if len(losses(run)) == 3:
            raise Killed
        return real_plot(log_path, png_path)
    monkeypatch.setattr(sd, "plot_losses", killed_at_the_last_plot)
    sets = {"train.steps": 3, "train.save_every": 1, "sample.sample_every": 2}
    with pytest.raises(Killed):
        sd.train(tiny_config(tmp_path, **sets))
    monkeypatch.setattr(sd, "plot_losses", real_plot)
    sd.train(tiny_config(tmp_path, **sets), resume=True)
    real_plot(run / "log.jsonl", tmp_path / "expected.png")                  # the curve of all 3 steps
    assert Image.open(run / "loss.png").tobytes() == Image.open(tmp_path / "expected.png").tobytes()
    assert len(list(run.glob("samples_step_000003/*.png"))) == 2 and len(losses(run)) == 3


def test_a_loss_plot_that_cannot_be_written_costs_no_previews(tmp_path, monkeypatch, capsys):
    """loss.png drawn first in the previews' try: a plot that failed (a viewer holding it open on Windows)
    cost every sample step its previews, with a warning blaming the sampling."""
    def held_open(log_path, png_path):
        raise PermissionError(13, "Permission denied", str(png_path))
    make_dataset(tmp_path / "data")
    monkeypatch.setattr(sd, "plot_losses", held_open)
    sd.train(tiny_config(tmp_path, **{"train.steps": 2, "sample.sample_every": 1}))
    assert [len(list((tmp_path / "run").glob(f"samples_step_00000{i}/*.png"))) for i in range(3)] == [2, 2, 2]
    err = capsys.readouterr().err
    assert "warning: loss.png not redrawn (PermissionError" in err and "sampling at step" not in err


def test_training_called_from_a_worker_thread_runs_and_leaves_the_signal_handlers_alone(tmp_path):
    """A web UI or a notebook widget runs train() (or main()) in a worker thread, where Python refuses to set
    signal handlers: it failed with "signal only works in main thread", after the models loaded and the cache
    was built. There it now trains without taking Ctrl-C or SIGTERM, which stay the main thread's."""
    import threading
    make_dataset(tmp_path / "data")
    handlers = [signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)]
    results = []
    runs = [lambda: sd.train(tiny_config(tmp_path, **{"train.steps": 2, "sample.sample_every": 0})),
            lambda: sd.main(tiny_sets(tmp_path, **{"train.steps": 2, "sample.sample_every": 0,
                                                   "output_dir": str(tmp_path / "cli")}))]
    for run in runs:
        def work(run=run):
            try:
                results.append(run())
            except BaseException as e:              # (a thread's exception is otherwise only printed)
                results.append(e)
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    assert results == [tmp_path / "run/lora.safetensors", None], results
    assert (tmp_path / "cli/lora.safetensors").is_file()
    assert [signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)] == handlers


def test_training_runs_where_the_caller_turned_gradients_off_and_leaves_them_off(tmp_path):
    """A notebook that sampled after torch.set_grad_enabled(False) got "element 0 of tensors does not require
    grad" from train(), after the models loaded and the cache was built."""
    make_dataset(tmp_path / "data")
    torch.set_grad_enabled(False)
    try:
        lora = sd.train(tiny_config(tmp_path, **{"train.steps": 2, "sample.sample_every": 0}))
        assert not torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(True)
    assert len(losses(tmp_path / "run")) == 2 and lora.is_file()


def test_training_inside_inference_mode_trains(tmp_path):
    """train() called inside `with torch.inference_mode():` (a notebook cell that sampled that way first) failed
    after the models loaded and the cache was built, with torch's bare "Inference tensors cannot be saved for
    backward": enable_grad() turns gradients on, not inference mode off."""
    make_dataset(tmp_path / "data")
    with torch.inference_mode():
        lora = sd.train(tiny_config(tmp_path, **{"train.steps": 2, "sample.sample_every": 0}))
        assert torch.is_inference_mode_enabled()
    assert len(losses(tmp_path / "run")) == 2 and lora.is_file()


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT and SIGTERM")
def test_training_where_the_caller_ignores_ctrl_c_and_sigterm_keeps_ignoring_them(tmp_path, monkeypatch):
    """A shell script's `python research.py &` starts with Ctrl-C ignored (a Ctrl-C for the script in front
    must not stop it), as may a caller that set SIG_IGN: train() took both signals over for its run, so that
    Ctrl-C stopped the background training after step 1 (SystemExit 130). Ignored, they stay ignored."""
    make_dataset(tmp_path / "data")
    step = sd.Trainer.forward_backward
    def signalled_step(trainer, stopping):
        if trainer.step == 0:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
        return step(trainer, stopping)
    monkeypatch.setattr(sd.Trainer, "forward_backward", signalled_step)
    found = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        lora = sd.train(tiny_config(tmp_path, **{"train.steps": 2, "sample.sample_every": 0}))
        assert [signal.getsignal(sig) for sig in found] == [signal.SIG_IGN] * 2
    finally:
        for sig, handler in found.items():
            signal.signal(sig, handler)
    assert len(losses(tmp_path / "run")) == 2 and lora.is_file()


def test_training_under_a_callers_autocast_caches_what_a_plain_run_caches(tmp_path):
    """A notebook cell that sampled under `torch.autocast("cpu", torch.bfloat16)` (or "cuda") and then called
    train() there encoded the latents and captions in bf16 and cached them under an fp32 run's keys: every
    later run on that cache, in any process, trained on them (another LoRA than a fresh cache gives)."""
    make_dataset(tmp_path / "data")
    sets = {"train.steps": 1, "sample.sample_every": 0, "sample.prompts": []}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sd.train(tiny_config(tmp_path, **sets))
    sd.train(tiny_config(tmp_path, **sets, **{"output_dir": str(tmp_path / "plain"),
                                              "dataset.cache_dir": str(tmp_path / "plain_cache")}))
    files = sorted(p.relative_to(tmp_path / "cache") for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert files == sorted(p.relative_to(tmp_path / "plain_cache")
                           for p in (tmp_path / "plain_cache").rglob("*.safetensors")) and files
    for name in files:
        cached, plain = (load_file(str(tmp_path / folder / name)) for folder in ("cache", "plain_cache"))
        assert all(torch.equal(cached[k], plain[k]) for k in plain), name


def test_the_tiny_model_is_the_same_under_a_callers_default_dtype_and_device():
    """The tiny model drew its random weights in the caller's default dtype (float64: another model, whose
    captions were cached under the float32 one's keys) and on the caller's default device (a GPU's draws, from
    the GPU generator fork_rng does not keep; "meta" stands in for one here: no weights at all)."""
    reference = sd.tiny_pipeline()
    for set_default, put_back in [(lambda: torch.set_default_dtype(torch.float64),
                                   lambda: torch.set_default_dtype(torch.float32)),
                                  (lambda: torch.set_default_device("meta"),
                                   lambda: torch.set_default_device(None))]:
        set_default()
        try:
            pipe = sd.tiny_pipeline()
        finally:
            put_back()
        for ours, theirs in zip([pipe.mmdit, pipe.vae, *pipe.text.modules()],
                                [reference.mmdit, reference.vae, *reference.text.modules()]):
            for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
                assert a.device == b.device and torch.equal(a, b)


def test_ctrl_c_while_the_cache_builds_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    """README: Ctrl-C ends the run with a one-line message and exit code 130; before the first step (models
    loading, the cache building: minutes on a real dataset) there is nothing to save, and it was a traceback.
    SIGTERM there ended the run without a word: now the same line, saying terminated, and exit code 143."""
    make_dataset(tmp_path / "data")
    fail = lambda *a: pytest.fail("SIGTERM before training ended the run silently")
    default = signal.signal(signal.SIGTERM, fail)
    for sig, code, name in ((signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")):
        monkeypatch.setattr(sd, "LatentDataset", lambda *args, **kwargs: os.kill(os.getpid(), sig))
        with pytest.raises(SystemExit) as exit_info:
            sd.main(tiny_sets(tmp_path))
        assert exit_info.value.code == code
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"{name} before training began")
    assert signal.signal(signal.SIGTERM, default) is fail       # main() put back the handler it found
    assert not (tmp_path / "run/training_state.safetensors").exists()
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)                 # torchrun: the other processes exit quietly
    monkeypatch.setattr(sd, "init_distributed", lambda cfg, buckets, header: (1, 1))
    stdout = sys.stdout
    with pytest.raises(SystemExit) as exit_info:
        sd.main(tiny_sets(tmp_path))
    assert exit_info.value.code == 143 and "before training began" not in capsys.readouterr().err   # (SIGTERM)
    assert sys.stdout is stdout                         # main() as a library call: was left on os.devnull


def test_main_leaves_a_process_group_it_did_not_create(tmp_path):
    """main() called by a script that had joined a process group itself destroyed that group on return."""
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(SystemExit, match="train.steps"):
            sd.main(["--set", "model=tiny", "--set", "train.steps=0"])
        assert torch.distributed.is_initialized()
    finally:
        torch.distributed.destroy_process_group()


def test_processes_a_caller_joined_without_master_addr_keep_their_ranks(tmp_path, monkeypatch):
    """A script that joined its processes itself (a tcp:// or file:// rendezvous: no MASTER_ADDR) and exported
    RANK and WORLD_SIZE: each is its RANK, not one more process 0 (as a plain run with a stray RANK is)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert sd.rank_and_world() == (0, 2) and not sd.under_torchrun()
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert sd.rank_and_world() == (1, 2) and sd.under_torchrun()
    finally:
        torch.distributed.destroy_process_group()


def test_torchrun_stopping_process_0_for_anothers_error_before_training_does_not_blame_the_user(tmp_path, monkeypatch,
                                                                                                 capsys):
    """Process 1 failed on its share of the cache (its one-line error printed) while process 0 still cached:
    torchrun SIGTERMs the others, and process 0 then said only 'terminated before training began', as if the
    user or a scheduler had stopped the job. Then it named torchrun, also under srun (a job script), where a
    scheduler's time limit or scancel sends it."""
    make_dataset(tmp_path / "data")
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)                         # as torchrun sets them
    monkeypatch.setattr(sd, "init_distributed", lambda cfg, buckets, header: (0, 2))
    monkeypatch.setattr(sd, "LatentDataset", lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as exit_info:
        sd.main(tiny_sets(tmp_path))
    assert exit_info.value.code == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "terminated before training began (if another process failed: see its error): "
        "nothing new to save (finished cache files are kept)")


def test_torchrun_sigterm_while_an_error_ends_the_run_keeps_the_error(tmp_path, monkeypatch, capsys):
    """A peer killed mid-run: process 0's all-reduce failed at once ("lost contact"), and torchrun's SIGTERM
    came while that error left train(), once main()'s handler was back: process 0 said "terminated before
    training began" (seen in CI), and the error was lost."""
    def train(cfg, resume):
        try:
            raise sd.UserError("lost contact with the others (a test)", own=True)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)                # torchrun's, as the error leaves train()
    monkeypatch.setattr(sd, "train", train)
    with pytest.raises(SystemExit) as exit_info:
        sd.main(["--set", "model=tiny", "--set", f"output_dir={tmp_path / 'run'}"])
    assert exit_info.value.code == "error: lost contact with the others (a test)"
    assert "terminated" not in capsys.readouterr().err


def test_torchrun_sigterm_while_waiting_at_the_final_barrier_ends_a_finished_run_as_done(tmp_path, monkeypatch,
                                                                                         capsys):
    """The processes wait at a last barrier for process 0's final files. A SIGTERM there (a scheduler's time
    limit) came after the run's handlers were put back: with the LoRA saved, a process said "terminated
    before training began ... nothing new to save" and exited 143 (process 0: or "lost contact" when the
    others left the barrier). The run has ended: it says done."""
    make_dataset(tmp_path / "data")
    monkeypatch.setattr(sd, "init_distributed", lambda cfg, buckets, header: (0, 2))     # process 0 of 2, as torchrun starts it
    monkeypatch.setattr(sd, "all_reduce_step", lambda params, numbers: numbers)

    def collective(call, *args, **kwargs):
        if call is sd.dist.barrier and (tmp_path / "run/lora.safetensors").is_file():
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(sd, "collective", collective)
    sets = {"train.steps": 2, "sample.prompts": []}
    sd.main(tiny_sets(tmp_path, **sets))
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"done: {tmp_path / 'run/lora.safetensors'}"


def test_torchrun_a_signal_to_one_process_stops_every_process_after_the_next_step(tmp_path, monkeypatch, capsys):
    """Under torchrun a process that alone got SIGTERM (in a step, or in process 0's step-0 previews) must not stop
    on its own: the others would wait for it in the next all-reduce. Its flag goes into the next step's sums,
    after which all stop together. Process 0 of 2 here; the others' sums carry no flag (all_reduce_step: its own)."""
    make_dataset(tmp_path / "data")
    monkeypatch.setattr(sd, "init_distributed", lambda cfg, buckets, header: (0, 2))
    monkeypatch.setattr(sd, "all_reduce_step", lambda params, numbers: numbers)
    monkeypatch.setattr(sd, "collective", lambda call, *args, **kwargs: None)
    forward_backward, when = sd.Trainer.forward_backward, {}

    def signal_at(place: str, trainer: sd.Trainer):
        if when.get(place) == trainer.step:
            del when[place]
            os.kill(os.getpid(), signal.SIGTERM)

    def step(trainer, stopping):
        signal_at("step", trainer)                  # train() has read the stop flag this step sends
        return forward_backward(trainer, stopping)
    monkeypatch.setattr(sd.Trainer, "forward_backward", step)
    monkeypatch.setattr(sd, "save_previews", lambda trainer: signal_at("previews", trainer))
    for place, at, stops_at in (("previews", 0, 1), ("step", 1, 3)):    # step 1: the second
        when[place] = at
        with pytest.raises(SystemExit) as exit_info:
            sd.main(tiny_sets(tmp_path, **{**LONG_RUN, "train.steps": 6, "output_dir": str(tmp_path / place)}))
        assert exit_info.value.code == 143 and capsys.readouterr().out.strip().splitlines()[-1] == (
            f"terminated at step {stops_at}; checkpoint saved. Continue with --resume"), place


def test_torchrun_a_signal_during_process_0s_previews_stops_them_after_the_image_at_work(tmp_path, monkeypatch,
                                                                                          capsys):
    """Under torchrun a SIGTERM (a scheduler's, passed on to every process) during process 0's previews let them
    all render (minutes for many prompts) while the others waited: torchrun SIGKILLs workers 30 s after its
    SIGTERM, so process 0 died mid-previews without a checkpoint or a word (seen: 2 CPU processes, 20 prompts).
    Process 0 now stops them after the image at work, as one process does, and the next step, which carries its
    stop flag, ends every process with process 0's checkpoint. Process 0 of 2 here; the all-reduce its own."""
    make_dataset(tmp_path / "data")
    monkeypatch.setattr(sd, "init_distributed", lambda cfg, buckets, header: (0, 2))
    monkeypatch.setattr(sd, "all_reduce_step", lambda params, numbers: numbers)
    monkeypatch.setattr(sd, "collective", lambda call, *args, **kwargs: None)
    monkeypatch.setattr(sd, "generate", signalling_at_the_second_call(sd.generate, signal.SIGTERM))  # step 2's
    run, sets = tmp_path / "run", {"train.steps": 6, "train.save_every": 6, "sample.sample_every": 2}
    with pytest.raises(SystemExit) as exit_info:
        sd.main(tiny_sets(tmp_path, **sets))
    assert exit_info.value.code == 143 and capsys.readouterr().out.strip().splitlines()[-1] == (
        "terminated at step 3; checkpoint saved. Continue with --resume")
    assert [p.name for p in (run / "samples_step_000002").iterdir()] == ["step_000002_sample_00.png"]
    assert sd.read_safetensors(run / "training_state.safetensors", with_metadata=True)[1]["step"] == "3"


def test_torchrun_process_1_trains_but_writes_nothing_to_the_output_dir(tmp_path, monkeypatch, capsys):
    """One writer: process 0 saves the checkpoints, previews and log; process 1 of 2 (here in one process, its
    all-reduce its own, the cache built before as process 0 would have) trains along and writes none of them.
    Nor does it print what process 0 prints for all: here a caption and a preview prompt past CLIP's window."""
    make_dataset(tmp_path / "data")
    (tmp_path / "data/red_stripes.txt").write_text("red stripes " * 10)
    cfg = tiny_config(tmp_path, **{"train.steps": 2, "train.save_every": 1, "sample.sample_every": 1,
                                   "sample.prompts": ["blue disc " * 10]})
    sd.LatentDataset(sd.scan_dataset(cfg.dataset), sd.tiny_pipeline(t5_length=16), cfg, cfg.model)
    assert "warning: 1 of 2 captions is cut" in capsys.readouterr().err         # process 0's
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)                 # as torchrun sets them
    monkeypatch.setattr(sd, "init_distributed", lambda cfg, buckets, header: (1, 2))
    monkeypatch.setattr(sd, "all_reduce_step", lambda params, numbers: numbers)
    monkeypatch.setattr(sd, "collective", lambda call, *args, **kwargs: None)
    (tmp_path / "run").mkdir()                          # process 0 made it
    assert sd.train(cfg) == tmp_path / "run/lora.safetensors"
    assert not list((tmp_path / "run").iterdir()) and capsys.readouterr().err == ""


def test_a_failed_run_frees_its_models_while_a_notebook_keeps_the_error(tmp_path, monkeypatch):
    """A notebook keeps the last error's traceback, and with it the failed run's models: after running out of GPU
    memory (or a diverged run), the run started again with a smaller batch ran out of it on the last run's
    models. They are train()'s own: their memory is freed when it fails."""
    make_dataset(tmp_path / "data")
    real_load, real_loss, adamw, pipes, optimizers = sd.load_pipeline, sd.flow_matching_loss, torch.optim.AdamW, [], []
    monkeypatch.setattr(sd, "load_pipeline", lambda *a, **k: pipes.append(real_load(*a, **k)) or pipes[-1])
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: optimizers.append(adamw(*a, **k)) or optimizers[-1])

    def out_of_memory_in_step_2(*args):
        if (tmp_path / "run/log.jsonl").is_file():
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_loss(*args)
    monkeypatch.setattr(sd, "flow_matching_loss", out_of_memory_in_step_2)
    with pytest.raises(torch.OutOfMemoryError) as kept:
        sd.train(tiny_config(tmp_path, **{"train.steps": 3, "sample.sample_every": 0}))
    assert kept.value.__traceback__ is not None and len(losses(tmp_path / "run")) == 1
    devices = {t.device.type for m in (pipes[0].mmdit, pipes[0].vae) for t in [*m.parameters(), *m.buffers()]}
    assert devices == {"meta"} and not optimizers[0].state, devices
    monkeypatch.setattr(sd, "LatentDataset", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):                  # Ctrl-C while the cache builds
        sd.train(tiny_config(tmp_path, **{"output_dir": str(tmp_path / "again")}))
    models = (pipes[1].mmdit, pipes[1].vae, *pipes[1].text.modules())
    assert {t.device.type for m in models for t in [*m.parameters(), *m.buffers()]} == {"meta"}


CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 15.69 GiB of which "
            "1.06 GiB is free. If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF")


def out_of_memory_on_calls(real, fails):
    """`real`, raising CUDA's out-of-memory error on the calls `fails(n)` picks (n counts from 1); .calls: n."""
    def wrapped(*args, **kwargs):
        wrapped.calls += 1
        if fails(wrapped.calls):
            raise torch.OutOfMemoryError(CUDA_OOM)
        return real(*args, **kwargs)
    wrapped.calls = 0
    return wrapped


def test_out_of_memory_in_a_step_saves_the_last_step_says_what_to_lower_and_resumes_exactly(tmp_path, monkeypatch):
    """Running out of GPU memory in step 4 (a larger aspect bucket's first batch) ended the run with torch's long
    traceback, and lost every step since the last save_every checkpoint. The forward and backward change no
    parameter: the run stops as after a Ctrl-C, with a checkpoint of step 3 and one line naming the step and
    the levers of this config, and --resume continues as the run not stopped (LoRA dropout's draws too)."""
    make_dataset(tmp_path / "data")
    shared = {"train.steps": 6, "train.save_every": 100, "sample.prompts": [], "lora.dropout": 0.1,
              "train.batch_size": 2, "train.gradient_checkpointing": False}
    sd.train(tiny_config(tmp_path, **shared, output_dir=str(tmp_path / "full")))
    real_loss = sd.flow_matching_loss

    def out_of_memory_in_step_4(*args):
        result = real_loss(*args)                   # the forward has drawn its dropout masks
        if (tmp_path / "run/log.jsonl").is_file() and len(losses(tmp_path / "run")) == 3:
            raise torch.OutOfMemoryError(CUDA_OOM)
        return result
    monkeypatch.setattr(sd, "flow_matching_loss", out_of_memory_in_step_4)
    with pytest.raises(SystemExit) as exit_info:
        sd.main(tiny_sets(tmp_path, **shared))
    assert exit_info.value.code == (
        "error: out of GPU memory in training step 4 (64x64 images); checkpoint of step 3 saved (continue with "
        "--resume after a change below). To fit 2.00 GiB more: lower train.batch_size (raise train.grad_accum to keep "
        "the batch), lower dataset.resolution, set train.gradient_checkpointing: true, set fp8: true (a new run: "
        "--resume refuses it), or free the GPU of other programs")
    assert sd.read_safetensors(tmp_path / "run/training_state.safetensors", with_metadata=True)[1]["step"] == "3"
    assert (tmp_path / "run/lora_step_000003.safetensors").is_file()
    monkeypatch.setattr(sd, "flow_matching_loss", real_loss)
    sd.train(tiny_config(tmp_path, **shared), resume=True)
    assert losses(tmp_path / "run") == losses(tmp_path / "full")
    assert_same_run(tmp_path / "run", tmp_path / "full", rtol=0)


def test_out_of_memory_inside_the_optimizer_update_saves_nothing(tmp_path, monkeypatch):
    """An update stopped part way may have changed some parameters (AdamW's weight decay comes first): no
    checkpoint of a half-updated LoRA; the one of step 2 stays the latest."""
    make_dataset(tmp_path / "data")
    real_update, calls, run, step_2 = torch._fused_adamw_, [], tmp_path / "run", {}
    saved = ("lora.safetensors", "lora_step_000002.safetensors", "training_state.safetensors")

    def out_of_memory_in_update_3(*args, **kwargs):
        real_update(*args, **kwargs)                # the parameters are changed, the update not finished
        calls.append(1)
        if len(calls) == 3:
            step_2.update({name: (run / name).read_bytes() for name in saved})
            raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(torch, "_fused_adamw_", out_of_memory_in_update_3)
    with pytest.raises(torch.OutOfMemoryError, match=r"in training step 3 \(64x64 images\); it stopped inside "
                                                     r"the optimizer's update: nothing saved, the last checkpoint "
                                                     r"stays. To fit: lower dataset.resolution, set fp8"):
        sd.train(tiny_config(tmp_path, **{"train.steps": 6, "train.save_every": 2, "sample.prompts": []}))
    assert {name: (run / name).read_bytes() for name in saved} == step_2       # not rewritten by the failed update
    assert sd.read_safetensors(run / "training_state.safetensors", with_metadata=True)[1]["step"] == "2"
    assert not (run / "lora_step_000003.safetensors").exists()
    assert load_file(run / "lora.safetensors").keys() == load_file(run / "lora_step_000002.safetensors").keys()
    assert all(torch.equal(v, load_file(run / "lora_step_000002.safetensors")[k])
               for k, v in load_file(run / "lora.safetensors").items())


def test_out_of_memory_lets_a_notebook_retry_and_names_the_caching(tmp_path, monkeypatch):
    """A notebook keeps the last error and its traceback: the tensors of the frames that ran out of memory (the
    activations of a forward) stayed alive with it, so the retry, with a smaller batch, ran out again. They are
    let go; the error stays torch's OutOfMemoryError. Out of memory while caching says so, with its levers."""
    make_dataset(tmp_path / "data")
    real_loss, activations = sd.flow_matching_loss, []

    def out_of_memory_in_step_2(*args):
        activation = torch.zeros(1000)
        activations.append(weakref.ref(activation))
        if (tmp_path / "run/log.jsonl").is_file():
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_loss(*args)
    monkeypatch.setattr(sd, "flow_matching_loss", out_of_memory_in_step_2)
    config = tiny_config(tmp_path, **{"train.steps": 3, "sample.prompts": []})
    with pytest.raises(torch.OutOfMemoryError) as kept:
        sd.train(config)
    assert kept.value.__traceback__ is not None and activations[-1]() is None
    monkeypatch.setattr(sd, "flow_matching_loss", real_loss)
    assert sd.train(config, resume=True).is_file() and len(losses(tmp_path / "run")) == 3     # the retry
    monkeypatch.setattr(sd.LatentDataset, "__init__", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(torch.OutOfMemoryError, match="^out of GPU memory while caching text embeddings; nothing "
                                                     "new saved. To fit: set use_t5: false "
                                                     r"\(a new run: --resume refuses it\), "
                                                     "or free the GPU of other programs$"):
        sd.train(tiny_config(tmp_path, **{"output_dir": str(tmp_path / "other")}))


@pytest.mark.parametrize("encoder", ["vae", "text"])
def test_out_of_memory_while_caching_offers_the_levers_of_what_was_on_the_gpu(tmp_path, monkeypatch, encoder):
    """The caching brings the VAE, then the text encoders to the GPU, no longer both: running out while encoding
    images offered use_t5 (T5 was on the CPU), while encoding captions (T5's 9 GiB, what a 12 GB card meets)
    a lower dataset.resolution; neither changes what ran out. (On the CPU, T5 is beside the VAE: both.)"""
    pipe = sd.tiny_pipeline(t5_length=16)
    method = {"vae": "encode_moments", "text": "encode"}[encoder]
    monkeypatch.setattr(getattr(pipe, encoder), method, lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    make_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path)
    with pytest.raises(torch.OutOfMemoryError) as caught:
        sd.LatentDataset(sd.scan_dataset(cfg.dataset, cfg.output_dir), pipe, cfg, cfg.model)
    on_cpu = str(sd.stopped_by_memory(types.SimpleNamespace(cfg=cfg, pipe=pipe), caught.value))
    assert ("set use_t5: false" in on_cpu, "lower dataset.resolution" in on_cpu) == (True, encoder == "vae")
    monkeypatch.setattr(sd, "pick_device", lambda *args: torch.device("cuda"))
    said = {"vae": "latents; nothing new saved. To fit: lower dataset.resolution",
            "text": "text embeddings; nothing new saved. To fit: set use_t5: false (a new run: --resume refuses it)"}
    assert str(sd.stopped_by_memory(types.SimpleNamespace(cfg=cfg, pipe=pipe), caught.value)) == (
        f"out of GPU memory while caching {said[encoder]}, or free the GPU of other programs")


def test_out_of_memory_with_no_setting_left_to_lower_names_only_the_other_programs(tmp_path, monkeypatch):
    """Moving the MMDiT to the GPU with fp8 already on (or on MPS, which has no fp8) leaves no setting of the
    config to lower: the message read 'To fit 2.00 GiB more: or free the GPU of other programs'."""
    make_dataset(tmp_path / "data")
    monkeypatch.setattr(sd, "add_lora", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError(CUDA_OOM)))
    with pytest.raises(torch.OutOfMemoryError) as e:
        sd.train(tiny_config(tmp_path, fp8=True))
    assert str(e.value) == ("out of GPU memory while moving the MMDiT to the GPU; nothing new saved. To fit 2.00 GiB "
                            "more: free the GPU of other programs")


def test_out_of_memory_in_the_previews_lets_training_go_on(tmp_path, monkeypatch, capsys):
    """The previews catch their errors: out of GPU memory there, the run trains on with its models where they were
    (the MMDiT in training mode) and the failed sampling's tensors let go."""
    make_dataset(tmp_path / "data")
    real_generate, real_loss, activations, seen = sd.generate, sd.flow_matching_loss, [], []

    def out_of_memory_at_step_2(*args, **kwargs):
        activation = torch.zeros(1000)
        activations.append(weakref.ref(activation))
        if len(activations) == 2:
            raise torch.OutOfMemoryError(CUDA_OOM)
        return real_generate(*args, **kwargs)

    def loss(model, *args):
        seen.append((model.training, activations[-1]() is None))
        return real_loss(model, *args)
    monkeypatch.setattr(sd, "generate", out_of_memory_at_step_2)
    monkeypatch.setattr(sd, "flow_matching_loss", loss)
    sd.train(tiny_config(tmp_path, **{"train.steps": 4, "sample.sample_every": 2, "sample.prompts": ["red"]}))
    assert ("warning: sampling at step 2 failed (OutOfMemoryError: out of GPU memory in the previews. To fit 2.00 GiB "
            "more: lower sample.width and sample.height, or free the GPU of other programs); training goes on"
            in capsys.readouterr().err)
    assert seen == [(True, True)] * 4 and len(losses(tmp_path / "run")) == 4
    assert (tmp_path / "run/samples_step_000004/step_000004_sample_00.png").is_file()


def test_out_of_memory_while_saving_a_checkpoint_names_it_and_saves_it_at_a_second_try(tmp_path, monkeypatch):
    """Out of GPU memory while saving the checkpoint of step 2 read "in training step 3 (64x64 images)": step 3
    never began. It names the saving; the failed frames let go, the checkpoint saves at a second try, whole (the
    LoRA, AdamW and RNG after step 2: --resume continues as the run not stopped)."""
    make_dataset(tmp_path / "data")
    shared = {"train.steps": 4, "train.save_every": 2, "sample.prompts": [], "lora.dropout": 0.1}
    sd.train(tiny_config(tmp_path, **shared, output_dir=str(tmp_path / "full")))
    real_save = sd.save_training_state
    monkeypatch.setattr(sd, "save_training_state", out_of_memory_on_calls(real_save, lambda n: n == 1))
    with pytest.raises(SystemExit) as exit_info:
        sd.main(tiny_sets(tmp_path, **shared))
    assert exit_info.value.code == (
        "error: out of GPU memory while saving the checkpoint of step 2; checkpoint of step 2 saved at a second try "
        "(continue with --resume after a change below). To fit 2.00 GiB more: set fp8: true (a new run: --resume "
        "refuses it), or free the GPU of other programs")
    monkeypatch.setattr(sd, "save_training_state", real_save)
    sd.train(tiny_config(tmp_path, **shared), resume=True)
    assert losses(tmp_path / "run") == losses(tmp_path / "full")
    assert_same_run(tmp_path / "run", tmp_path / "full", rtol=0)


# the one line of a run whose checkpoint of step 4 met out of memory twice; step 2's was saved
STEP_4_NOT_SAVED_AGAIN = (
    "error: out of GPU memory while saving the checkpoint of step 4; the checkpoint of step 4 could not be "
    "saved (out of memory again): the latest is step 2's (continue with --resume after a change below). To "
    "fit 2.00 GiB more: set fp8: true (a new run: --resume refuses it), or free the GPU of other programs")


def test_out_of_memory_again_while_saving_is_one_line_naming_the_latest_checkpoint(tmp_path, monkeypatch):
    """Out of GPU memory a second time, while saving the checkpoint after the first, ended in torch's own error
    and two tracebacks. It stays one line: that checkpoint is not saved, and which one --resume has instead."""
    make_dataset(tmp_path / "data")
    real_loss = sd.flow_matching_loss

    def out_of_memory_in_step_2_of_again(*args):
        if (tmp_path / "again/log.jsonl").is_file():
            raise torch.OutOfMemoryError(CUDA_OOM)
        return real_loss(*args)
    save = out_of_memory_on_calls(sd.save_training_state, lambda n: n > 1)
    monkeypatch.setattr(sd, "save_training_state", save)
    monkeypatch.setattr(sd, "flow_matching_loss", out_of_memory_in_step_2_of_again)
    shared = {"train.steps": 4, "train.save_every": 2, "sample.prompts": []}
    with pytest.raises(SystemExit) as exit_info:
        sd.main(tiny_sets(tmp_path, **shared))
    assert exit_info.value.code == STEP_4_NOT_SAVED_AGAIN
    assert sd.read_safetensors(tmp_path / "run/training_state.safetensors", with_metadata=True)[1]["step"] == "2"
    with pytest.raises(torch.OutOfMemoryError) as e:
        sd.train(tiny_config(tmp_path, **shared, output_dir=str(tmp_path / "again")))
    assert str(e.value) == (
        "out of GPU memory in training step 2 (64x64 images); the checkpoint of step 1 could not be saved (out of "
        "memory again): none was saved before (start again in a new or empty output_dir). To fit 2.00 GiB more: "
        "lower dataset.resolution, set fp8: true (a new run: --resume refuses it), or free the GPU of other programs")


def test_out_of_memory_saving_the_checkpoint_of_a_ctrl_c_is_one_line_naming_the_latest(tmp_path, monkeypatch):
    """Out of GPU memory while saving the checkpoint that Ctrl-C (or SIGTERM) asks for ended in torch's own
    error under the KeyboardInterrupt's traceback. It is one line, as in a step's checkpoint: a second try, then
    which checkpoint --resume has."""
    make_dataset(tmp_path / "data")
    real_log, save = sd.Trainer.log, out_of_memory_on_calls(sd.save_training_state, lambda n: n > 1)

    def interrupt_after_step_3(self, *args, **kwargs):
        real_log(self, *args, **kwargs)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(sd, "save_training_state", save)
    monkeypatch.setattr(sd.Trainer, "log", interrupt_after_step_3)
    shared = {"train.steps": 6, "train.save_every": 2, "sample.prompts": []}
    with pytest.raises(SystemExit) as exit_info:
        sd.main(tiny_sets(tmp_path, **shared))
    assert exit_info.value.code == STEP_4_NOT_SAVED_AGAIN
    assert save.calls == 3


def test_out_of_ram_after_the_previews_names_the_previews(tmp_path, monkeypatch):
    """The previews go on after their own errors, but out of RAM moving the VAE back off the GPU after them
    (in their finally) ended in Python's MemoryError; train() caught only RuntimeError. It stops as after a step,
    naming the previews and their levers, not a step 3 that never began."""
    make_dataset(tmp_path / "data")
    real_to = sd.VAE.to

    def out_of_ram_after_the_step_2_previews(vae, *args, **kwargs):
        if args == ("cpu",) and (tmp_path / "run/log.jsonl").is_file() and len(losses(tmp_path / "run")) == 2:
            raise MemoryError
        return real_to(vae, *args, **kwargs)
    monkeypatch.setattr(sd.VAE, "to", out_of_ram_after_the_step_2_previews)
    with pytest.raises(torch.OutOfMemoryError) as e:
        sd.train(tiny_config(tmp_path, **{"train.steps": 4, "train.save_every": 2, "sample.sample_every": 2,
                                          "sample.prompts": ["red"]}))
    assert str(e.value) == ("out of memory (RAM) in the previews at step 2; checkpoint of step 2 saved (continue with "
                            "--resume after a change below). To fit: lower sample.width and sample.height, or close "
                            "other programs")
    assert (tmp_path / "run/samples_step_000002/step_000002_sample_00.png").is_file()


CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 17179869184 bytes. Error code 12 (Cannot allocate memory)")


def test_out_of_ram_is_one_line_with_the_levers_of_what_filled_it(tmp_path, monkeypatch):
    """Out of the CPU's memory (torch's DefaultCPUAllocator, or Python's MemoryError), e.g. SD3.5 Large and T5
    loading into 16 GB of RAM, ended in a traceback. It names the RAM and what lowers its need: on a GPU the
    models' size and T5 (not the batch or resolution, which the GPU holds); on the CPU all the run's levers."""
    make_dataset(tmp_path / "data")
    real_loss = sd.flow_matching_loss

    def out_of_ram_in_step_2(*args):
        if (tmp_path / "run/log.jsonl").is_file():
            raise MemoryError
        return real_loss(*args)
    monkeypatch.setattr(sd, "flow_matching_loss", out_of_ram_in_step_2)
    with pytest.raises(torch.OutOfMemoryError) as e:
        sd.train(tiny_config(tmp_path, **{"train.steps": 3, "sample.prompts": []}))
    assert str(e.value) == ("out of memory (RAM) in training step 2 (64x64 images); checkpoint of step 1 saved "
                            "(continue with --resume after a change below). To fit: lower dataset.resolution, set "
                            "fp8: true (a new run: --resume refuses it), or close other programs")
    monkeypatch.setattr(sd, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(CPU_OOM)))
    monkeypatch.setattr(sd, "pick_device", lambda *args: torch.device("cuda"))             # a GPU's run
    with pytest.raises(torch.OutOfMemoryError) as e:
        sd.train(tiny_config(tmp_path, output_dir=str(tmp_path / "gpu")))
    assert str(e.value) == ("out of memory (RAM) while loading the models; nothing new saved. To fit 16.00 GiB more: "
                            "set fp8: true (a new run: --resume refuses it), set dtype: bf16 (a new run: --resume "
                            "refuses it), set use_t5: false (a new run: --resume refuses it), or close other programs")
    with pytest.raises(torch.OutOfMemoryError) as e:
        sample.main(["--model", "tiny", "--prompt", "a", "--dtype", "fp32", "--out", str(tmp_path / "out")])
    assert str(e.value) == ("out of memory (RAM) while loading the models. To fit 16.00 GiB more: add --fp8, add "
                            "--no-t5, use --dtype bf16, or close other programs")


def test_out_of_ram_says_how_much_more_the_failed_allocation_asked_for():
    """Out of the CPU's memory said "To fit:" without the amount, though torch's CPU allocator names it, in bytes
    (CUDA's and MPS's messages in GiB or GB were read). Python's MemoryError names none, and an allocation of a
    few bytes (memory simply full) rounds to 0.00 GiB: neither gives a number."""
    def to_fit(message):
        return re.search(r"To fit([^:]*):", str(sd.memory_error(RuntimeError(message), "here", [])))[1]
    assert to_fit(CPU_OOM) == " 16.00 GiB more"
    assert to_fit(CPU_OOM.replace("17179869184", "1600000000")) == " 1.49 GiB more"
    assert to_fit(CPU_OOM.replace("17179869184", "64")) == to_fit("out of memory") == ""
    assert str(sd.memory_error(MemoryError(), "here", [])) == "out of memory (RAM) here. To fit: close other programs"


def test_out_of_ram_with_steps_by_the_ten_million_names_the_steps(tmp_path, monkeypatch, capsys):
    """The sigma schedule takes ~45 bytes of RAM a step while built (float64) and read (a list): --steps
    200000000 (a typo; under MAX_STEPS) ran out of RAM, and the levers named the size, fp8, T5 and the dtype, not
    the steps. Where the schedule takes a GiB or more, the steps are a lever too (sample.py's, the previews')."""
    def schedule_out_of_ram(steps, *args):
        raise RuntimeError(CPU_OOM.replace("17179869184", str(8 * steps)))
    monkeypatch.setattr(sd, "get_schedule", schedule_out_of_ram)
    with pytest.raises(torch.OutOfMemoryError) as e:
        sample.main(["--model", "tiny", "--prompt", "a", "--steps", "200000000", "--width", "32", "--height", "32",
                     "--no-t5", "--fp8", "--dtype", "bf16", "--out", str(tmp_path / "out")])
    assert str(e.value) == ("out of memory (RAM) while sampling; the images finished are saved. To fit 1.49 GiB more: "
                            "lower --width and --height, lower --steps, or close other programs")
    previews = types.SimpleNamespace(pipe=sd.tiny_pipeline(), out=tmp_path / "run", rank=0, embeddings=None,
                                     log_path=tmp_path / "none", step=0, sample_settings=None)
    previews.mmdit, previews.cfg = previews.pipe.mmdit, tiny_config(tmp_path, **{"sample.sample_steps": 200000000})
    monkeypatch.setattr(sd, "generate", lambda *a, **k: schedule_out_of_ram(200000000))
    sd.save_previews(previews)
    assert ("warning: sampling at step 0 failed (OutOfMemoryError: out of memory (RAM) in the previews. To fit 1.49 "
            "GiB more: lower sample.width and sample.height, lower sample.sample_steps, or close other programs); "
            "training goes on") in capsys.readouterr().err


def test_out_of_memory_on_mps_before_macos_14_offers_no_bf16(tmp_path, monkeypatch):
    """On MPS under macOS 13, out of memory offered "set dtype: bf16", which pick_dtype then refuses there (bf16
    on MPS needs macOS 14); sample.py's "use --dtype bf16" too. They are offered only where bf16 runs."""
    make_dataset(tmp_path / "data")
    monkeypatch.setattr(sd, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(CPU_OOM)))
    monkeypatch.setattr(sd, "pick_device", lambda *args: torch.device("mps"))
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: (major, minor) <= (13, 6))
    with pytest.raises(torch.OutOfMemoryError) as e:
        sd.train(tiny_config(tmp_path, dtype="fp32"))
    assert str(e.value) == ("out of memory (RAM) while loading the models; nothing new saved. To fit 16.00 GiB more: "
                            "set use_t5: false (a new run: --resume refuses it), or close other programs")
    with pytest.raises(torch.OutOfMemoryError) as e:                    # sample.py's levers alike
        sample.main(["--model", "tiny", "--prompt", "a", "--dtype", "fp32", "--out", str(tmp_path / "out")])
    assert str(e.value) == ("out of memory (RAM) while loading the models. To fit 16.00 GiB more: add --no-t5, or "
                            "close other programs")


def test_out_of_memory_on_mps_offers_no_offload(tmp_path, monkeypatch):
    """sample.py out of memory on Apple's MPS offered "add --offload", which keeps the models in the CPU's half of
    the one memory that MPS shares with it: the total stays the same. It is offered on CUDA only. MPS was told to
    "free the GPU of other programs", whose memory is the RAM any program takes: "close other programs"."""
    mps_oom = ("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.00 GB, max allowed: 18.13 "
               "GB). Tried to allocate 2.00 GB on private pool.")
    errors = {"mps": mps_oom, "cuda": "CUDA out of memory. Tried to allocate 2.00 GB."}
    monkeypatch.setattr(sd, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(errors[device])))
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: True)
    for device, fixes in (("mps", "close other programs"), ("cuda", "add --offload, or free the GPU of other programs")):
        monkeypatch.setattr(sd, "pick_device", lambda *args: torch.device(device))
        with pytest.raises(torch.OutOfMemoryError) as e:
            sample.main(["--model", "tiny", "--prompt", "a", "--no-t5", "--fp8", "--out", str(tmp_path / "out")])
        assert str(e.value) == f"out of GPU memory while loading the models. To fit 2.00 GB more: {fixes}"


def test_mps_running_out_of_memory_is_told_as_the_gpus_not_left_a_traceback():
    """MPS runs out of memory with a plain RuntimeError (torch's OutOfMemoryError is CUDA's): it is still worded
    as running out of GPU memory, with the size asked for (in a step: after a checkpoint), not a traceback."""
    mps = RuntimeError("MPS backend out of memory (MPS allocated: 17.10 GB, other allocations: 1.20 GB, max allowed: "
                       "18.13 GB). Tried to allocate 256.00 MB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO")
    assert sd.out_of_memory(mps) and not sd.out_of_ram(mps) and not sd.out_of_memory(RuntimeError("size mismatch"))
    assert str(sd.memory_error(mps, "in training step 3 (1024x1024 images)", ["lower dataset.resolution"])) == (
        "out of GPU memory in training step 3 (1024x1024 images). To fit 256.00 MB more: lower dataset.resolution, or "
        "close other programs")                                 # its memory is the RAM


def test_out_of_ram_on_a_gpu_offers_what_shrinks_the_models_not_what_the_gpu_holds(monkeypatch):
    """On a GPU, the batch and the resolution fill the GPU's memory, not RAM: out of RAM while caching offers the
    models' size and T5, in a step only closing other programs (the GPU's own error keeps its levers)."""
    monkeypatch.setattr(sd, "pick_device", lambda *args: torch.device("cuda"))
    new = " (a new run: --resume refuses it)"
    caching = types.SimpleNamespace(cfg=sd.load_config(None, ["dtype=fp32", "fp8=true"]), pipe=None)
    assert str(sd.stopped_by_memory(caching, MemoryError())) == (
        f"out of memory (RAM) while caching text embeddings; nothing new saved. To fit: set dtype: "
        f"bf16{new}, set use_t5: false{new}, or close other programs")
    assert str(sd.stopped_by_memory(caching, torch.OutOfMemoryError(CUDA_OOM))) == (
        f"out of GPU memory while caching text embeddings; nothing new saved. To fit 2.00 GiB more: "
        f"set use_t5: false{new}, or free the GPU of other programs")
    step = types.SimpleNamespace(cfg=caching.cfg, embeddings=None, bar=None, step=3, order=[(0,)],
                                 data=types.SimpleNamespace(sizes=[(64, 64)]), rng_after_update=None)
    assert str(sd.stopped_by_memory(step, MemoryError())) == (
        "out of memory (RAM) in training step 4 (64x64 images); it stopped inside the optimizer's update: nothing "
        "saved, the last checkpoint stays. To fit: close other programs")


def test_a_run_refused_after_making_its_output_dir_removes_it_if_left_empty(tmp_path, monkeypatch):
    """A run that failed a check after it made output_dir (here: no images, found by the dataset scan) left the
    folder behind, and those made above it, holding only its hidden lock file; and the empty dataset.cache_dir
    it made. They are removed, only the ones the run made and only while empty: an output_dir or cache_dir
    there before, or one another file went into, stays."""
    (tmp_path / "data").mkdir()
    (tmp_path / "there").mkdir()
    for out, cache in (("runs/new/run", "c/new"), ("there", "c/new"), ("runs/new/run", "runs/new/run/cache")):
        sets = {"output_dir": str(tmp_path / out), "dataset.cache_dir": str(tmp_path / cache)}
        with pytest.raises(sd.UserError, match="no usable images"):
            sd.train(tiny_config(tmp_path, **sets))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "there"]     # a cache_dir made in out too
    (tmp_path / "cache").mkdir()                                        # tiny_config's cache_dir, there before
    with pytest.raises(sd.UserError, match="no usable images"):
        sd.train(tiny_config(tmp_path, output_dir=str(tmp_path / "there")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data", "there"]
    real_scan = sd.scan_dataset

    def scan_as_a_file_arrives(cfg, output_dir):
        (Path(output_dir) / "notes.txt").write_text("mine")
        return real_scan(cfg, output_dir)
    monkeypatch.setattr(sd, "scan_dataset", scan_as_a_file_arrives)
    with pytest.raises(sd.UserError, match="no usable images"):
        sd.train(tiny_config(tmp_path, output_dir=str(tmp_path / "runs/run")))
    assert (tmp_path / "runs/run/notes.txt").read_text() == "mine"

    def scan_as_a_file_arrives_above(cfg, output_dir):          # in a folder the run made above output_dir
        (Path(output_dir).parent / "notes.txt").write_text("mine")
        return real_scan(cfg, output_dir)
    monkeypatch.setattr(sd, "scan_dataset", scan_as_a_file_arrives_above)
    with pytest.raises(sd.UserError, match="no usable images"):        # not rmdir's OSError for that folder
        sd.train(tiny_config(tmp_path, output_dir=str(tmp_path / "other/run")))
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]


def test_a_run_refused_for_its_cache_dir_removes_the_output_dir_it_made(tmp_path):
    """dataset.cache_dir was checked after output_dir was made but before its lock: a cache_dir that is a file left
    an empty output_dir (and the folders made above it) behind, as a failed run did before they were removed."""
    (tmp_path / "data").mkdir()
    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(sd.UserError, match="dataset.cache_dir .* is not a writable folder"):
        sd.train(tiny_config(tmp_path, output_dir=str(tmp_path / "runs/new")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data"]


def test_a_folder_under_one_that_cannot_be_entered_is_refused_in_one_line(tmp_path, monkeypatch):
    """writable_dir listed the folders it would make with Path.exists, which raises PermissionError (Python
    before 3.14) for a path under a folder the user may not enter (another user's 0700 home): a bare traceback
    for --out and dataset.cache_dir, where mkdir's refusal had been one line; for output_dir (its lock file and
    contents looked for first) a bare traceback too, earlier."""
    make_dataset(tmp_path / "data")
    locked = tmp_path / "locked"                    # chmod cannot stop root: the kernel's answers simulated
    locked.mkdir()
    real_stat, real_mkdir = os.stat, os.mkdir

    def refused(real):
        def call(path, *args, **kwargs):
            if locked in Path(path).parents:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path, *args, **kwargs)
        return call
    monkeypatch.setattr(os, "stat", refused(real_stat))
    monkeypatch.setattr(os, "mkdir", refused(real_mkdir))
    for key in ("output_dir", "dataset.cache_dir"):
        one_line_error(lambda: sd.train(tiny_config(tmp_path, **{key: str(locked / "x/folder")})),
                       rf"{key} .*folder is not a writable folder \(Permission denied\)")
    one_line_error(lambda: sample.main(["--model", "tiny", "--prompt", "x", "--out", str(locked / "x/s")]),
                   r"--out .*s is not a writable folder \(Permission denied\)")
    assert os.listdir(locked) == [] and not (tmp_path / "run").exists()


def test_a_complete_read_only_cache_dir_is_read_not_refused(tmp_path, monkeypatch, capsys):
    """A team's precomputed cache on a read-only mount was refused at the start ("not a writable folder: give
    another"), though a run only reads a complete one. Now it is read, with a warning; a file missing there fails
    the run in one line, and the cache stays as it was. Read-only simulated: chmod cannot stop root."""
    make_dataset(tmp_path / "data")
    sets, cache = {"train.steps": 2, "train.save_every": 2, "sample.sample_every": 0}, tmp_path / "cache"
    sd.train(tiny_config(tmp_path, **sets))                 # fills the cache
    files = lambda: {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    before, real_probe, real_save = files(), sd.tempfile.TemporaryFile, sd.save_file

    def refused_in_cache(real):                         # TemporaryFile(dir=folder), save_file(tensors, file)
        def write(*args, **kwargs):
            if cache in (Path(kwargs["dir"], "probe") if "dir" in kwargs else Path(args[1])).parents:
                raise OSError(errno.EROFS, "Read-only file system")
            return real(*args, **kwargs)
        return write
    monkeypatch.setattr(sd.tempfile, "TemporaryFile", refused_in_cache(real_probe))
    monkeypatch.setattr(sd, "save_file", refused_in_cache(real_save))
    sd.train(tiny_config(tmp_path, output_dir=str(tmp_path / "run2"), **sets))
    assert "dataset.cache_dir" in capsys.readouterr().err and files() == before
    trained, again = (load_file(tmp_path / run / "lora.safetensors") for run in ("run", "run2"))
    assert trained.keys() == again.keys() and all(torch.equal(trained[k], again[k]) for k in trained)
    missing = next((cache / "text").iterdir())
    missing.unlink()
    one_line_error(lambda: sd.train(tiny_config(tmp_path, output_dir=str(tmp_path / "run3"), **sets)),
                   rf"cannot write .*{missing.name} \(Read-only file system\): choose another folder")
    assert files() == {p: b for p, b in before.items() if p != missing} and not (tmp_path / "run3").exists()


def test_a_read_only_folder_holding_no_cache_is_refused_and_a_caches_warned_of_once_under_torchrun(
        tmp_path, monkeypatch, capsys):
    """A read-only dataset.cache_dir holding no cache (a wrong path, e.g. a dataset's read-only mount) was read
    with a warning: the run loaded its models (minutes for Large) to fail at its first cache file. Refused at
    the start again; one holding a cache's folders (latents/, text/) is read, warned of by process 0 alone
    (under torchrun every process printed it)."""
    make_dataset(tmp_path / "data")
    ro, real_probe = tmp_path / "ro", sd.tempfile.TemporaryFile
    ro.mkdir()

    def probe(dir):
        if Path(dir) == ro:                             # chmod cannot stop root: the refusal simulated
            raise OSError(errno.EROFS, "Read-only file system")
        return real_probe(dir=dir)
    monkeypatch.setattr(sd.tempfile, "TemporaryFile", probe)
    monkeypatch.setattr(sd, "load_pipeline", lambda *a, **k: pytest.fail("models loaded for no cache"))
    one_line_error(lambda: sd.train(tiny_config(tmp_path, **{"dataset.cache_dir": str(ro)})),
                   r"dataset.cache_dir .*ro is not a writable folder \(Read-only file system\)")
    assert os.listdir(ro) == [] and not (tmp_path / "run").exists()
    for name in ("latents", "text"):
        (ro / name).mkdir()
    for name, value in (("WORLD_SIZE", "2"), ("MASTER_ADDR", "localhost")):   # as torchrun sets them
        monkeypatch.setenv(name, value)
    for rank, warned in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert sd.writable_dir(ro, "dataset.cache_dir", read_only_if=("latents", "text")) == []
        assert ("warning: dataset.cache_dir" in capsys.readouterr().err) == warned


def test_an_error_other_than_memory_keeps_its_own_traceback(tmp_path, monkeypatch):
    """train() re-raised any other error from its out-of-memory handler, which added a line to the traceback under
    the one that failed: `raise stopped_by_memory(tr, e)`."""
    make_dataset(tmp_path / "data")
    monkeypatch.setattr(sd, "flow_matching_loss", lambda *a: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="^a bug$") as in_step:
        sd.train(tiny_config(tmp_path, **{"sample.prompts": []}))
    monkeypatch.setattr(sd, "add_lora", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="^a bug$") as in_start:
        sd.train(tiny_config(tmp_path, output_dir=str(tmp_path / "other")))
    for kept, where in ((in_step, "train"), (in_start, "start_trainer")):
        assert [entry.name for entry in kept.traceback].count(where) == 1


def test_an_error_other_than_memory_saving_a_ctrl_c_checkpoint_keeps_its_own_traceback(tmp_path, monkeypatch):
    """The checkpoint that Ctrl-C asks for re-raised any other error with `raise ... if out_of_memory(e) else e`,
    which put train() twice in the traceback, the first time at that line of the out-of-memory handler."""
    make_dataset(tmp_path / "data")
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(sd, "save_training_state", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="^a bug$") as error:
        sd.train(tiny_config(tmp_path, **{"sample.prompts": []}))
    assert [entry.name for entry in error.traceback].count("train") == 1
    names = [entry.name for entry in error.traceback]           # `raise e` in any handler lists its function twice
    assert len(names) == len(set(names)), names


def test_nan_before_the_first_checkpoint_names_no_checkpoint(tmp_path, monkeypatch):
    make_dataset(tmp_path / "data")
    real_loss = sd.flow_matching_loss
    monkeypatch.setattr(sd, "flow_matching_loss", lambda *a: (lambda l, p, s: (l * float("nan"), p, s))(*real_loss(*a)))
    with pytest.raises(sd.UserError, match="at step 1; stopped without saving") as error:
        sd.train(tiny_config(tmp_path, **{"train.steps": 2, "sample.prompts": []}))
    assert not (tmp_path / "run/lora.safetensors").exists()
    assert "last good checkpoint" not in str(error.value) and "no checkpoint was saved yet" in str(error.value)


def test_compiled_blocks_train_and_sample_like_eager(tmp_path):
    from torch._dynamo.utils import counters
    make_dataset(tmp_path / "data")
    runs, graphs = {}, {}
    for label, compiled in (("eager", False), ("compiled", True)):
        torch._dynamo.reset()                       # an earlier test's compiled blocks are not reused unseen
        runs[label], before = tmp_path / label, counters["stats"]["unique_graphs"]
        sd.train(tiny_config(tmp_path, **{"train.steps": 2, "sample.sample_every": 0, "train.compile": compiled,
                                          "output_dir": str(runs[label])}))
        graphs[label] = counters["stats"]["unique_graphs"] - before
    assert graphs["eager"] == 0 < graphs["compiled"], graphs        # else eager compared with eager
    np.testing.assert_allclose(losses(runs["compiled"]), losses(runs["eager"]), rtol=1e-4)
    image = lambda run: np.asarray(Image.open(run / "samples_step_000002/step_000002_sample_00.png"), dtype=int)
    assert np.abs(image(runs["compiled"]) - image(runs["eager"])).max() <= 1


def checkpoint_calls(profile: cProfile.Profile) -> int:
    """How many calls into torch.utils.checkpoint's Python a profiled run made."""
    return sum(calls for (file, _, _), (_, calls, *_) in pstats.Stats(profile).stats.items()
               if Path(file).parts[-2:] == ("utils", "checkpoint.py"))


def test_eager_checkpointing_runs_its_python_once_a_block_with_the_same_gradients():
    """Eager gradient checkpointing ran torch's non-reentrant checkpoint: Python hooks for each tensor a block
    saves (~900 calls into torch.utils.checkpoint a block here; a Medium LoRA step made 143k Python calls, now
    55k), host time a GPU step waits on. The reentrant checkpoint runs once a block. The gradients stay those of
    a step without checkpointing bit for bit, LoRA dropout included (the recompute draws the forward's masks),
    and blocks before the first LoRA block (lora.blocks) run without a checkpoint and without a warning."""
    for blocks in ("", "2"):
        model = tiny_mmdit(depth=3)
        sd.add_lora(model, rank=4, targets="attn", blocks=blocks, dropout=0.5)
        for layer in sd.lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_up.weight, std=0.1)
        grads, calls = {}, {}
        for checkpointing in (False, True):
            model.enable_gradient_checkpointing(checkpointing).train().zero_grad(set_to_none=True)
            torch.manual_seed(0)
            profile = cProfile.Profile()
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                profile.runcall(lambda: model(*mmdit_inputs()).square().mean().backward())
            grads[checkpointing] = [p.grad for p in model.parameters() if p.requires_grad]
            calls[checkpointing] = checkpoint_calls(profile)
        assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True], strict=True)), blocks
        assert 0 < calls[True] <= 30 * 3, (blocks, calls)                  # non-reentrant: ~900 a block


def test_eager_checkpointing_trains_under_distributed_data_parallel(tmp_path):
    """Eager checkpointing passed each block's first trainable weight into the reentrant checkpoint (so that its
    output required grad): under DistributedDataParallel (accelerate.prepare's) that weight's gradient hook ran
    twice and the first backward raised "Expected to mark a variable ready only once". Now the gradients are those
    of the model alone without checkpointing, bit for bit."""
    grads = {}
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        for ddp in (False, True):
            model = tiny_mmdit(depth=3)
            sd.add_lora(model, rank=4, targets="attn")
            for layer in sd.lora_layers(model).values():
                torch.nn.init.normal_(layer.lora_up.weight, std=0.1)
            model.enable_gradient_checkpointing(ddp).train()
            wrapped = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
            for seed in (1, 2):
                wrapped(*mmdit_inputs(seed=seed)).square().mean().backward()
            grads[ddp] = [p.grad for p in model.parameters() if p.requires_grad]
    finally:
        torch.distributed.destroy_process_group()
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True], strict=True))


def test_compiled_blocks_keep_their_checkpoint_inside_the_graph():
    """compile_blocks compiled each block and checkpoint wrapped it: a training step ran each block's compiled
    forward twice and Python hooks for every saved tensor (host time 1.24x: .ci/bench_cpu.py --checkpoint-step).
    The checkpoint is now part of the compiled graph: once compiled, a step runs no Python of
    torch.utils.checkpoint, and the backward keeps about what eager checkpointing keeps, not the activations."""
    kept, calls = {}, {}
    for label, compiled, checkpointed in (("eager", False, True), ("compiled", True, True), ("all", False, False)):
        model = tiny_mmdit(depth=2)
        sd.add_lora(model, rank=4, targets="attn")
        model.enable_gradient_checkpointing(checkpointed).train()
        if compiled:
            model.compile_blocks()
        weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        storages = {}

        def keep(t):
            if t.untyped_storage().data_ptr() not in weights:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        def step():
            storages.clear()
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                loss = model(*mmdit_inputs(h=16, w=16)).square().mean()     # (the few kept vectors: noise)
            loss.backward()
        step()                                                          # compiles
        profile = cProfile.Profile()
        profile.runcall(step)
        kept[label], calls[label] = sum(storages.values()), checkpoint_calls(profile)
    assert calls["eager"] > 0 == calls["compiled"], calls
    assert kept["compiled"] <= 1.2 * kept["eager"] < 0.3 * kept["all"], kept


def test_a_config_key_in_the_wrong_section_names_the_section_it_belongs_to(tmp_path):
    """`--set lr=1e-5` was answered 'did you mean lora?', `rank: 32` 'did you mean train?', `steps: 100` with the
    top-level keys: a flat config from another trainer, or a key under the wrong section, never named its key."""
    for sets, match in [("lr=1e-5", "'lr' (did you mean 'train.lr'?)"), ("rank=32", "'rank' (did you mean 'lora.rank'?)"),
                        ("steps=100", "'steps' (did you mean 'train.steps'?)"),
                        ("train.resolution=512", "'train.resolution' (did you mean 'dataset.resolution'?)"),
                        ("dataset.device=cpu", "'dataset.device' (did you mean 'device'?)"),
                        ("seed=1", "'seed' (did you mean 'train.seed' or 'sample.seed'?)")]:
        one_line_error(lambda: sd.load_config(None, [sets]), f"^unknown config key {re.escape(match)}$")


def test_a_key_that_is_part_of_its_sections_key_names_that_key_first():
    """`sample: {steps: 28}` (the sampling steps, as other tools name them) was answered "did you mean 'train.steps'?",
    which sets the training's length; `dataset.dropout` only 'lora.dropout'. The section's own key comes first."""
    for sets, match in [("sample.steps=28", "'sample.steps' (did you mean 'sample.sample_steps' or 'train.steps'?)"),
                        ("dataset.dropout=0.1", "(did you mean 'dataset.caption_dropout' or 'lora.dropout'?)"),
                        ("sample.every=100", "'sample.every' (did you mean 'sample.sample_every'?)")]:
        one_line_error(lambda: sd.load_config(None, [sets]), f"{re.escape(match)}$")


def test_an_unknown_config_key_shows_the_invisible_characters_in_it(tmp_path):
    """An indent copied from a web page (a no-break space) or a second file's BOM pasted in made a key that
    was named as "unknown config key '  lr'" or "'train' (did you mean 'train'?)": they are shown escaped;
    letters one can see (résolution) stay as typed."""
    for text, shown in (("train:\n\u00a0 lr: 1\n", r"'\\xa0 lr'"), ("\ufefftrain:\n  lr: 1\n", r"'\\ufefftrain'"),
                        ("dataset:\n  résolution: 64\n", "'dataset.résolution' \\(did you mean")):
        (tmp_path / "c.yaml").write_text(f"model: tiny\n{text}", encoding="utf-8")
        one_line_error(lambda: sd.load_config(str(tmp_path / "c.yaml")), f"unknown config key {shown}")


def test_config_errors_name_the_key(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lrr: 1e-4\n")
    with pytest.raises(sd.UserError, match=r"unknown config key 'train.lrr' \(did you mean 'train.lr'\?\)"):
        sd.load_config(str(tmp_path / "c.yaml"))
    with pytest.raises(sd.UserError, match=r"config key 'train.steps' must be a whole number, got 1\.5$"):
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


def test_a_missing_text_encoders_or_vae_path_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    """README: bad values are refused before any model loads. A mistyped text_encoders or vae path was found
    only after the MMDiT (16 GB for Large) and the text encoders had loaded."""
    monkeypatch.setattr(sd, "load_mmdit", lambda *a, **k: pytest.fail("the MMDiT loaded before the error"))
    (tmp_path / "model").mkdir()
    for paths in ({"text_encoders": str(tmp_path / "missing")}, {"vae": str(tmp_path / "missing.safetensors")}):
        key = next(iter(paths))                 # named as given, without the 'tiny' only --model/model takes
        one_line_error(lambda: sd.load_pipeline(str(tmp_path / "model"), device="cpu", **paths),
                       rf"^{key} not found: .*missing[^']*' \(a diffusers folder, .safetensors or hub id\)$")


@pytest.mark.parametrize("setting, error", [
    ({"lora.blocks": "1-5"}, "lora.blocks '1-5' names block 5: the model's joint blocks are 0-2"),
    ({"lora.rank": 65}, "lora.rank must be in 1..64"),
    ({"lora.targets": "attn3"}, "lora.targets 'attn3' .* matches no Linear layer")])
def test_lora_settings_the_model_cannot_take_are_refused_before_the_cache_builds(tmp_path, monkeypatch, setting,
                                                                                 error):
    """Blocks past the loaded model's depth (a Large recipe's '20-37' on Medium), a rank above its width and
    targets matching none of its layers can only be checked once it has loaded; that was after every image and
    caption had been encoded into the cache."""
    make_dataset(tmp_path / "data")
    monkeypatch.setattr(sd, "LatentDataset", lambda *a, **k: pytest.fail("the cache was built before the error"))
    with pytest.raises(sd.UserError, match=error):
        sd.train(tiny_config(tmp_path, **setting))


def test_the_tiny_model_encodes_at_t5_length_1_as_t5_does():
    """t5_length 1 (allowed: 1..512) was a bare ValueError with --tiny: its T5 tokenizer added <bos> and <eos>,
    two tokens that cannot be truncated to one; T5's adds </s> only, which a length of 1 keeps."""
    text = sd.load_pipeline("tiny", device="cpu", t5_length=1).text
    context, pooled = text.encode(["a red fox", "a"])
    assert context.shape == (2, 77 + 1, 64) and pooled.shape == (2, 80)
    assert text.tok_t5(["ab"]).input_ids == [[4, 5, 3]]                      # the text, then <eos>


def test_a_bad_device_path_or_t5_length_is_refused_before_the_dataset_scan(tmp_path, monkeypatch):
    """The scan decodes every image (~70 ms per megapixel PNG: minutes for a large dataset); a device typo, a
    missing model, text_encoders or vae path, an unwritable output_dir or cache_dir or a t5_length above 512
    was refused only after it."""
    monkeypatch.setattr(sd, "scan_dataset", lambda *a, **k: pytest.fail("the dataset was scanned before the error"))
    one_line_error(lambda: sd.train(tiny_config(tmp_path, device="gpu")), "unknown device 'gpu'")
    for key in ("model", "text_encoders", "vae"):           # a mistyped path (downloads of hub ids come later)
        missing = str(tmp_path / "sd3.5_large.safetensor")
        sets = {"model": str(tmp_path), key: missing}             # (model tiny reads neither text_encoders nor vae)
        one_line_error(lambda: sd.train(tiny_config(tmp_path, **sets)), f"^{key} not found: .*safetensor'")
    (tmp_path / "file").write_text("")
    for key in ("output_dir", "dataset.cache_dir"):                  # a folder under a file: never writable
        bad = str(tmp_path / "file" / "run")
        one_line_error(lambda: sd.train(tiny_config(tmp_path, **{key: bad})), f"{key} .*run is not a writable")
    one_line_error(lambda: sd.load_config(None, ["t5_length=1000"]), "'t5_length' must be in 1..512, got 1000")


def test_a_blank_path_in_the_config_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch):
    """`path:` left blank (or --set dataset.path=) is "", which Path reads as the current folder: the run
    trained on every image below wherever it was started, and cached into it, without a word."""
    monkeypatch.setattr(sd, "scan_dataset", lambda *a, **k: pytest.fail("the dataset was scanned"))
    monkeypatch.chdir(tmp_path)
    for key in ("model", "output_dir", "dataset.path", "dataset.cache_dir"):
        config = tiny_config(tmp_path, **{key: None})
        one_line_error(lambda: sd.train(config), rf"config key '{key}' is empty \(.*\): set it to ")


def test_lora_and_sample_settings_are_refused_before_any_model_loads():
    """README: bad values are refused before any model loads (these failed after loading and caching, or, for
    alpha 0, trained nothing: the LoRA's scale alpha / rank was 0; a sample.seed too large for its prompts failed
    every preview)."""
    for item, match in [("lora.alpha=0", "lora.alpha 0 .* trains nothing"), ("lora.blocks=0-x", "lora.blocks must look like"),
                        ("lora.targets=attn\\.(qkv", "lora.targets: invalid regex"),
                        ("lora.blocks=5-3", "must look like"), ("lora.targets=' , '", "select nothing"),
                        ("sample.width=1000", "sample.width and sample.height must be positive multiples of 16"),
                        (f"sample.seed={2**64 - 1}", r"sample.seed .* is outside 0..2\^64-2")]:  # 2 prompts: seed+1
        one_line_error(lambda: sd.load_config(None, ["model=tiny", "sample.prompts=[a, b]", item]), match)
    assert sd.load_config(None, ["lora.targets=attn\\.qkv$", "lora.blocks=0-3", "sample.height=768",
                                 f"sample.seed={2**64 - 1}"])              # one (built-in) prompt: fits


def test_a_config_built_or_changed_in_python_is_checked_by_train_as_a_config_file_is(tmp_path, monkeypatch):
    """A notebook or script that builds sd.Config(...) or sets cfg.lora.alpha = 0 passes no config file, so
    load_config's checks never ran: alpha 0 trained nothing without a word, fp16 trained without loss scaling,
    a sample size the VAE cannot take failed every preview. train() checks the config it is given."""
    make_dataset(tmp_path / "data")
    monkeypatch.setattr(sd, "load_pipeline", lambda *a, **k: pytest.fail("loaded models for a bad config"))
    for key, value, match in [("lora", ("alpha", 0.0), "lora.alpha 0"), ("", ("dtype", "fp16"), "'dtype' is 'fp16'"),
                              ("sample", ("width", 100), "positive multiples of 16"),
                              ("train", ("timestep_sampling", "logit-normal"), "train.timestep_sampling")]:
        cfg = tiny_config(tmp_path)
        setattr(getattr(cfg, key) if key else cfg, *value)
        one_line_error(lambda: sd.train(cfg), match)


def test_a_config_holding_path_objects_trains_saves_and_resumes(tmp_path):
    """cfg.dataset.path = Path(...) in a notebook (or a fork) trained up to the first checkpoint, then failed with
    "Object of type PosixPath is not JSON serializable": no training state, so no --resume. A Config made in
    Python is read as a config file's values are."""
    make_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, **{"train.steps": 2, "train.save_every": 1, "sample.sample_every": 0})
    cfg.dataset.path, cfg.output_dir, cfg.dataset.cache_dir = tmp_path / "data", tmp_path / "run", tmp_path / "cache"
    assert sd.train(cfg) == tmp_path / "run/lora.safetensors"
    cfg.train.steps = 3
    sd.train(cfg, resume=True)
    assert len(losses(tmp_path / "run")) == 3
    assert isinstance(cfg.output_dir, Path)                     # the caller's config is left as it was


def test_numpy_numbers_in_a_config_built_in_python_are_numbers():
    """A notebook sweeping cfg.train.lr over np.logspace (np.float64) or setting cfg.train.steps from numpy
    (np.int64) was refused by train(): "'train.lr' must be a finite number, got np.float64(0.0001)"."""
    cfg = sd.Config()
    cfg.train.lr, cfg.train.steps, cfg.sample.seed = np.float64(1e-4), np.int64(10), np.uint64(2**64 - 2)
    checked = sd.validate(cfg)
    assert (checked.train.lr, checked.train.steps, checked.sample.seed) == (1e-4, 10, 2**64 - 2)
    assert type(checked.train.steps) is int and json.dumps(dataclasses.asdict(checked))     # (checkpoints)
    for value in (np.float64("nan"), np.float64(1.5), np.bool_(True), True):
        cfg.train.steps = value
        one_line_error(lambda: sd.validate(cfg), "'train.steps' must be a whole number")


def test_numpy_bools_in_a_config_built_in_python_are_true_or_false():
    """cfg.dataset.flip = np.bool_(True) in a notebook (a comparison of numpy numbers, e.g. np.mean(...) > 0.5) was
    refused by train(): "config key 'dataset.flip' must be true or false, got np.True_", numpy's numbers taken."""
    cfg = sd.Config()
    cfg.dataset.flip, cfg.use_t5 = np.float64(0.7) > 0.5, np.bool_(False)
    checked = sd.validate(cfg)
    assert checked.dataset.flip is True and checked.use_t5 is False         # Python's: the checkpoint's JSON
    cfg.use_t5 = np.int64(1)                                    # a number is still no true or false
    one_line_error(lambda: sd.validate(cfg), "config key 'use_t5' must be true or false, got np.int64\\(1\\)")


def test_a_tuple_of_prompts_in_a_config_built_in_python_is_a_list_of_prompts():
    """cfg.sample.prompts = ("red stripes", "blue disc") in a notebook trained with one preview prompt, the tuple's
    repr "('red stripes', 'blue disc')" (warned as cut at T5's length): a tuple is a list, as in generate(). A set
    was taken in hash order, which changes between runs (sample_00 another prompt on --resume): refused."""
    cfg = sd.Config()
    cfg.sample.prompts = ("red stripes", "blue disc")
    assert sd.validate(cfg).sample.prompts == ["red stripes", "blue disc"]
    assert cfg.sample.prompts == ("red stripes", "blue disc")             # the caller's config as it was
    cfg.sample.prompts = {"red stripes", "blue disc"}              # hash order: sample_00 changed between runs
    one_line_error(lambda: sd.validate(cfg), r"config key 'sample.prompts' must be a list, not a set \(its order")
    cfg.model = ("tiny",)                                          # a text key: refused, not its repr as a path
    one_line_error(lambda: sd.validate(cfg), r"config key 'model' must be text, got \('tiny',\)")


def test_library_calls_given_the_wrong_object_say_what_to_pass(tmp_path):
    """train("config.yaml") (a path, not a Config) failed in dataclasses.asdict with a bare TypeError;
    load_lora(pipe, path) (the Pipeline, as diffusers' pipe.load_lora_weights) with "'Pipeline' object has no
    attribute 'cfg'"; load_pipeline(Path("mistyped.safetensors")) with "'PosixPath' object has no attribute
    'endswith'" where a str said "model not found"."""
    one_line_error(lambda: sd.train("config.yaml"),
                   r"train\(\) takes a Config.*load_config\('config.yaml'\), not 'config")
    pipe, trained, lora = sd.tiny_pipeline(), sd.tiny_pipeline().mmdit, tmp_path / "lora.safetensors"
    sd.add_lora(trained, rank=4)
    sd.save_lora(trained, lora)
    one_line_error(lambda: sd.load_lora(pipe, lora), r"the MMDiT \(pipe.mmdit\), not a Pipeline")
    assert sd.load_lora(pipe.mmdit, lora) > 0
    one_line_error(lambda: sd.load_pipeline(tmp_path / "missing.safetensors", device="cpu"),
                   "model not found: .*missing")


def test_options_given_as_text_or_numbers_where_true_or_false_is_meant_are_refused(tmp_path):
    """load_lora(merge="no") merged, load_pipeline(use_t5="False") loaded T5, offload="0" and fp8="no" offloaded
    and quantized, train(resume="no") resumed: any text is true to `if`. numpy's bools are Python's."""
    trained, lora = lora_model(), tmp_path / "lora.safetensors"
    sd.save_lora(trained, lora)
    for value in ("no", "False", "0", 0, None):
        one_line_error(lambda: sd.load_lora(tiny_mmdit(), lora, merge=value),
                       f"merge must be true or false, got {value!r}")
    for option in ("use_t5", "offload", "fp8"):
        one_line_error(lambda: sd.load_pipeline("tiny", device="cpu", **{option: "no"}),
                       f"{option} must be true or false, got 'no'")
    one_line_error(lambda: sd.train(tiny_config(tmp_path), resume="no"), "resume must be true or false, got 'no'")
    model = tiny_mmdit()
    sd.load_lora(model, lora, merge=np.False_)
    assert len(sd.lora_layers(model)) > 0                                   # unmerged, as False
    pipe = sd.load_pipeline("tiny", device="cpu", use_t5=np.False_, offload=np.True_)
    assert pipe.text.t5 is None and pipe.offload is True


def test_add_lora_given_the_pipeline_says_to_pass_its_mmdit():
    """add_lora(pipe) (the Pipeline, as load_lora(pipe) and save_lora(pipe) are refused by name) failed with
    "'Pipeline' object has no attribute 'named_parameters'"."""
    pipe = sd.tiny_pipeline()
    one_line_error(lambda: sd.add_lora(pipe, rank=2),
                   r"add_lora takes the MMDiT \(pipe.mmdit\), not a Pipeline: add_lora\(pipe.mmdit, rank=")
    assert not sd.lora_layers(pipe.mmdit) and len(sd.add_lora(pipe.mmdit, rank=2)) > 0


def test_lora_files_save_and_load_through_a_data_parallel_or_ddp_wrapped_mmdit(tmp_path):
    """accelerate.prepare(model) returns DistributedDataParallel (or DataParallel) holding the MMDiT as .module:
    save_lora, load_lora and add_lora on it failed with "'DistributedDataParallel' object has no attribute 'cfg'".
    They take the MMDiT inside, but DDP's is not given new layers (add_lora, an unmerged load_lora): it would not
    sync their gradients. DataParallel copies its module at each forward: new layers in it are used."""
    model, path = tiny_mmdit(), tmp_path / "lora.safetensors"
    assert len(sd.add_lora(torch.nn.DataParallel(model), rank=2)) > 0 and sd.lora_layers(model)
    for layer in sd.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_up.weight, std=0.1)
    sd.save_lora(model, path)
    sd.save_lora(torch.nn.DataParallel(model), tmp_path / "dp.safetensors")
    sd.save_lora(torch.nn.DataParallel(torch.compile(model)), tmp_path / "dp_compiled.safetensors")
    expected, from_dp = tiny_mmdit(), tiny_mmdit()
    sd.load_lora(expected, path)
    assert sd.load_lora(torch.nn.DataParallel(from_dp), path) > 0
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel
        sd.save_lora(ddp(model), tmp_path / "ddp.safetensors")
        sd.save_lora(torch.compile(ddp(model)), tmp_path / "compiled_ddp.safetensors")    # as accelerate compiles
        from_ddp = tiny_mmdit()
        assert sd.load_lora(ddp(from_ddp), path) > 0
        for call in (lambda: sd.add_lora(ddp(tiny_mmdit()), rank=2),
                     lambda: sd.load_lora(ddp(tiny_mmdit()), path, merge=False)):
            one_line_error(call, "would add LoRA layers whose gradients DistributedDataParallel does not sync: call "
                                 r"(add|load)_lora on the MMDiT before wrapping it \(DDP, accelerate.prepare\)")
    finally:
        torch.distributed.destroy_process_group()
    files = ("lora", "dp", "dp_compiled", "ddp", "compiled_ddp")
    saved = {name: load_file(tmp_path / f"{name}.safetensors") for name in files}
    assert all(saved[name].keys() == saved["lora"].keys() for name in saved)
    assert all(torch.equal(saved[name][k], saved["lora"][k]) for name in saved for k in saved["lora"])
    state = expected.state_dict()
    assert all(torch.equal(m.state_dict()[k], state[k]) for m in (from_dp, from_ddp) for k in state)


def test_lora_files_save_and_load_through_a_torch_compiled_mmdit(tmp_path):
    """model = torch.compile(model), as a fork compiles one: save_lora(model) failed with a bare KeyError
    '_orig_mod.joint_blocks.0...', and load_lora(model) said the file had a layer this model lacks ("a LoRA for
    another variant?"): the compiled wrapper names the layers with an _orig_mod. prefix."""
    model = tiny_mmdit()
    sd.add_lora(model, rank=2)
    for layer in sd.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_up.weight, std=0.1)
    sd.save_lora(torch.compile(model), tmp_path / "compiled.safetensors")      # nothing runs: no compile
    sd.save_lora(model, tmp_path / "eager.safetensors")
    saved, expected = (load_file(tmp_path / f"{name}.safetensors") for name in ("compiled", "eager"))
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    for merge in (True, False):
        loaded, eager = tiny_mmdit(), tiny_mmdit()
        assert sd.load_lora(torch.compile(loaded), tmp_path / "eager.safetensors", merge=merge) > 0
        sd.load_lora(eager, tmp_path / "eager.safetensors", merge=merge)
        state, expected = loaded.state_dict(), eager.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


def test_lora_metadata_that_is_no_json_and_a_lora_path_that_is_no_path_say_what_to_pass(tmp_path):
    """save_lora(metadata={"steps": np.int64(500)}) failed with json's bare "Object of type int64 is not JSON
    serializable", metadata=[...] with "'list' object is not a mapping"; load_lora(model, None) and save_lora(model,
    None) with pathlib's "expected str, bytes or os.PathLike object, not NoneType". No file is left behind."""
    model, lora = lora_model(), tmp_path / "lora.safetensors"
    for metadata, why in [({"steps": np.int64(500)}, "int64 is not JSON serializable"), ([("steps", 500)], "not a")]:
        one_line_error(lambda: sd.save_lora(model, lora, metadata=metadata),
                       rf"metadata must be a dict of JSON values.*\.item\(\).*{why}")
    assert not list(tmp_path.iterdir())
    one_line_error(lambda: sd.save_lora(model, None), "give the path of the file to write .str or Path., not None")
    one_line_error(lambda: sd.load_lora(tiny_mmdit(), None),
                   "give the path of a .safetensors file .str or Path., not None")
    sd.save_lora(model, str(lora), metadata={"steps": 500})
    assert sd.load_lora(tiny_mmdit(), str(lora)) == len(sd.lora_layers(model))


def test_save_lora_metadata_cannot_overwrite_what_the_file_holds(tmp_path):
    """save_lora(metadata={"format": "kohya", "rank": 0, ...}) wrote those over the file's own entries: a diffusers
    file whose header said kohya, rank 0 and alpha not folded, which load_lora then refused ("metadata rank = 0 is
    not in 1..1048576; save it again"). The file's own values are written; the caller's other keys are kept."""
    model, lora = lora_model(), tmp_path / "lora.safetensors"
    sd.save_lora(model, lora, metadata={"format": "kohya", "rank": 0, "alpha": "8", "alpha_folded": False,
                                        "modules": [], "steps": 5})
    header = json.loads(sd.read_safetensors(lora, with_metadata=True, prefix=None)[1]["sd35_lora"])
    assert [header[key] for key in ("format", "rank", "alpha", "alpha_folded", "steps")] == ["diffusers", 4, 8, True, 5]
    assert header["modules"] == sorted(sd.lora_layers(model))
    assert sd.load_lora(tiny_mmdit(), lora) == len(sd.lora_layers(model))


def test_save_lora_refuses_metadata_that_loaders_would_refuse(tmp_path):
    """save_lora(metadata={"t5_length": "77"}) wrote a file that load_lora and sample.py then refused ("metadata
    t5_length = '77' is not in 1..512; save it again"), the trained model perhaps gone by then. Refused as saved,
    nothing written, with the advice to give another value (not the loaders' "save it again"); values the loaders
    take are written as given."""
    model, lora = lora_model(), tmp_path / "lora.safetensors"
    for key, value in (("t5_length", "77"), ("use_t5", "no"), ("t5_length", 10**9)):
        one_line_error(lambda: sd.save_lora(model, lora, metadata={key: value}),
                       f"^save_lora: metadata {key} = .* is not in .*; give a value in that range$")
    assert not list(tmp_path.iterdir())
    sd.save_lora(model, lora, metadata={"t5_length": 77, "use_t5": False})
    assert sample.trained_settings([str(lora)])["t5_length"] == 77


def test_generate_given_its_settings_in_the_negative_prompts_place_says_settings_by_name():
    """generate(pipe, prompts, SampleSettings(...)) put the settings in `negative`, and the error said only that the
    negative prompt must be text."""
    pipe, s = sd.tiny_pipeline(), sd.SampleSettings(steps=2, width=32, height=32)
    one_line_error(lambda: sd.generate(pipe, ["red"], s, progress=False),
                   r"third argument is the negative prompt: pass the settings by name, settings=SampleSettings")


def test_add_lora_reads_its_numbers_as_a_config_file_does():
    """From Python, add_lora(rank="4") failed with a bare TypeError ('<=' between int and str), rank=4.0 in
    torch.empty, targets=["attn"] with "unhashable type: 'list'", dropout=1.5 with torch's ValueError; alpha="8" was
    taken and failed at the first forward. numpy's numbers and a whole float are numbers. alpha 0 or 1e300, which
    the config refuses (a LoRA that trains nothing, or saved files load_lora refuses), were taken."""
    for wrong, error in [({"rank": "4"}, "rank must be a whole number, got '4'"),
                         ({"alpha": "8"}, "alpha must be a finite number, got '8'"),
                         ({"alpha": 0}, r"alpha 0 is outside what works: .* use e.g. alpha = rank \(2\)"),
                         ({"alpha": 1e300}, "alpha 1e\\+300 is outside what works"),
                         ({"dropout": 1.5}, "dropout must be in 0..1.*got 1.5"),
                         ({"dropout": -0.1}, "dropout must be in 0..1.*got -0.1"),
                         ({"targets": ["attn"]}, r"and targets text .*got 0.0 and \['attn'\]")]:
        model = tiny_mmdit()
        one_line_error(lambda: sd.add_lora(model, **{"rank": 2, **wrong}), error)
        assert not sd.lora_layers(model)
    model = tiny_mmdit()
    sd.add_lora(model, rank=4.0, alpha=np.float32(8), dropout=np.float64(0.1))
    layer = next(iter(sd.lora_layers(model).values()))
    assert (layer.rank, layer.alpha, layer.dropout.p) == (4, 8.0, 0.1) and type(layer.alpha) is float


def test_load_config_takes_a_dict_of_the_files_keys_and_says_what_else_to_pass():
    """load_config({"model": "tiny", ...}) (a config kept as a dict in a notebook) failed with pathlib's bare
    "expected str, bytes or os.PathLike object, not dict", load_config(None, [("train.lr", 1e-4)]) with "'tuple' object
    has no attribute 'partition'". A dict is read as the YAML file's mapping, checked the same way."""
    cfg = sd.load_config({"model": "tiny", "train": {"lr": "5e-5", "steps": 20}}, ["train.steps=30"])
    assert (cfg.model, cfg.train.lr, cfg.train.steps) == ("tiny", 5e-5, 30)
    one_line_error(lambda: sd.load_config({"train": {"lr": 1e-4, "step": 20}}), "unknown config key 'train.step'")
    one_line_error(lambda: sd.load_config(5),
                   "give the path of a YAML config file or a dict of its keys, not 5")
    for wrong in (0, False, "", []):                    # were read as no file: the default config, silently
        one_line_error(lambda: sd.load_config(wrong), rf"or a dict of its keys, not {re.escape(repr(wrong))}$")
    assert sd.load_config({}) == sd.load_config(None)
    one_line_error(lambda: sd.load_config(None, [("train.lr", 1e-4)]),
                   r"--set expects key=value .*got \('train.lr', 0.0001\)")
    # a list in the list (overrides=[TINY_RUN]): its text holds '=', and the regex check failed on the list
    one_line_error(lambda: sd.load_config(None, [["train.lr=1e-4"]]),
                   r"--set expects key=value .*got \['train.lr=1e-4'\]")


def test_main_given_its_command_line_as_one_text_says_to_pass_a_list(capsys):
    """sd.main("config.yaml --resume") and sample.main("--model tiny --prompt red") from a notebook: argparse read
    the text letter by letter, "unrecognized arguments: o n f i g . y a m l ...", and exited (SystemExit 2)."""
    one_line_error(lambda: sd.main("config.yaml --resume"),
                   r"main takes a list of arguments, e.g. main\(\['config.yaml', '--resume'\]\), not 'config.yaml")
    one_line_error(lambda: sample.main("--model tiny --prompt red"),
                   r"main takes a list of arguments, e.g. main\(\['--model', 'tiny', '--prompt', 'a fox'\]\)")


def test_save_lora_given_a_folder_says_to_name_a_file_in_it(tmp_path):
    """save_lora(model, "runs") (the folder to save into) said "cannot write runs (Is a directory): free disk space
    or choose another folder"."""
    one_line_error(lambda: sd.save_lora(lora_model(), tmp_path),
                   f"{re.escape(str(tmp_path))} is a folder: give the path of a file in it, e.g. .*lora.safetensors")
    assert not list(tmp_path.iterdir())


def test_save_lora_given_a_name_other_than_safetensors_says_so_instead_of_writing_a_file_no_one_loads(tmp_path):
    """save_lora(model, "style.pt") wrote safetensors bytes under a pickle's name: load_lora refused it as a pickle
    ("pickle files can run code ... use that release"), and ComfyUI and diffusers, going by the name, unpickle it."""
    for name in ("style.pt", "style.bin", "style.ckpt", "style"):
        one_line_error(lambda: sd.save_lora(lora_model(), tmp_path / name), rf"{name}: name the LoRA file .*\.safetensors")
    assert not list(tmp_path.iterdir())
    sd.save_lora(lora_model(), tmp_path / "style.SafeTensors")
    assert sd.load_lora(tiny_mmdit(), tmp_path / "style.SafeTensors")


def test_a_folder_where_a_run_writes_a_file_is_named_as_such_not_a_full_disk(tmp_path):
    """A folder in place of a cache, state or preview file (a run writes them at paths it makes): the write failed
    with "cannot write ... (Is a directory): free disk space or choose another folder"; in place of the run's
    lora.safetensors with save_lora's advice to a caller, to give the path of a file in that folder."""
    (tmp_path / "state.safetensors").mkdir()
    one_line_error(lambda: sd._atomic_save("a fox", tmp_path / "state.safetensors"),
                   r"^cannot write .*state.safetensors \(.*\): remove the folder of that name or choose another")
    (tmp_path / "lora.safetensors").mkdir()        # (a run's LoRA: not save_lora's "give a file in it, e.g. ...")
    run = types.SimpleNamespace(cfg=sd.Config(), rank=0, step=1, pipe=types.SimpleNamespace(variant="sd3.5-medium"),
                                changes=[], world=1, global_batch=1, mmdit=lora_model(), out=tmp_path,
                                state_path=tmp_path / sd.STATE_FILE)
    one_line_error(lambda: sd.save_checkpoint(run),
                   r"^cannot write .*lora.safetensors \(.*\): remove the folder of that name or choose another")
    run.step = 2                                    # a step's LoRA alike
    (tmp_path / "lora_step_000002.safetensors").mkdir()
    one_line_error(lambda: sd.save_checkpoint(run),
                   r"^cannot write .*lora_step_000002.safetensors \(.*\): remove the folder of that name or choose")
    assert not list(tmp_path.glob(".*.tmp"))        # the temporary files written, not renamed: removed


def test_the_temporary_files_of_a_killed_runs_writes_are_removed_by_the_next_run(tmp_path, monkeypatch):
    """kill -9 (the OOM killer, a scheduler's SIGKILL after its grace time) or a power cut while a file was written
    left its hidden temporary file, as large as a LoRA, the training state or a cache file, in output_dir or
    dataset.cache_dir for good. Those over an hour old go; a younger one may be another run's write at work."""
    (tmp_path / "data").mkdir()
    killed = [tmp_path / "run" / ".lora.safetensors.123-0a1b2c3d.tmp",
              tmp_path / "cache" / "latents" / ".0f8d.safetensors.123-0a1b2c3d.tmp"]
    at_work = tmp_path / "cache" / "text" / ".4316.safetensors.456-0a1b2c3d.tmp"
    not_ours = [tmp_path / "cache" / ".notes.backup-20240101.tmp",                 # files of the user's
                tmp_path / "cache" / "report.v2-20240101.tmp",                     # (not hidden)
                tmp_path / "cache" / ".report.v2-20240101.txt",                    # (not .tmp)
                tmp_path / "cache" / ".notes.2-2024010112.tmp",                    # (10 digits, not 8)
                tmp_path / "cache" / "a" / "b" / ".c.1-20240101.tmp"]     # two folders down: no run writes there
    for path in [*killed, at_work, *not_ours]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    for path in [*killed[1:], *not_ours]:
        os.utime(path, (time.time() - 7200,) * 2)
    now = time.time()                                   # ages by the last write (mtime), not the last read
    os.utime(killed[0], (now, now - 61 * 60))
    os.utime(at_work, (now - 7200, now - 59 * 60))
    one_line_error(lambda: sd.train(tiny_config(tmp_path)), "no usable images")
    assert not any(path.exists() for path in killed) and at_work.exists() and all(p.exists() for p in not_ours)
    killed[0].write_bytes(b"half")                      # two runs starting at once: the other removes it first
    os.utime(killed[0], (now - 7200,) * 2)
    real_unlink = Path.unlink

    def removed_first_by_another_run(path: Path, missing_ok: bool = False):
        real_unlink(path)
        real_unlink(path, missing_ok)
    monkeypatch.setattr(Path, "unlink", removed_first_by_another_run)
    sd.remove_killed_writes(tmp_path / "run")
    assert not killed[0].exists()


def test_a_worker_killed_in_save_file_leaves_no_safetensors_temporary_file_to_pile_up(tmp_path):
    """safetensors' save_file writes its own .tmpXXXXXX first, then renames it to _atomic_save's file: a torchrun
    worker killed there (kill -9, the OOM killer) while caching or saving left one each time, never removed."""
    killed = [tmp_path / "run" / ".tmp3K1PSx", tmp_path / "cache" / "latents" / ".tmpzljcq5"]
    at_work = tmp_path / "cache" / "text" / ".tmpAb12Cd"                # another run's, under an hour old
    for path in [*killed, at_work]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    for path in killed:
        os.utime(path, (time.time() - 7200,) * 2)
    sd.remove_killed_writes(tmp_path / "run")
    sd.remove_killed_writes(tmp_path / "cache")
    assert not any(path.exists() for path in killed) and at_work.exists()


def test_a_file_where_a_written_files_folder_belongs_is_named_as_such_not_the_temporary_files_error(tmp_path):
    """A file in place of a folder on the path (save_lora(model, "runs/fox/lora.safetensors") with runs/fox a file):
    the clean-up of the temporary file, never written, raised a bare NotADirectoryError naming that temporary file
    in place of the one line (and a path too long for Linux, File name too long, alike)."""
    (tmp_path / "fox").write_text("a file")
    for path in (tmp_path / "fox" / "lora.safetensors", tmp_path / "fox" / "deeper" / "lora.safetensors"):
        one_line_error(lambda: sd.save_lora(lora_model(), path), r"^cannot write .*fox/.*lora.safetensors \(.*\): "
                       r"rename the file on its path where a folder belongs or choose another folder")
    assert os.listdir(tmp_path) == ["fox"]


def test_generate_refuses_embeddings_of_another_shape_and_a_keep_that_is_no_function():
    """generate(..., embeddings=pipe.text.encode(prompts)) (the cond pair alone, not (cond, uncond)) failed with a
    bare "not enough values to unpack", embeddings of another model's widths with torch's "mat1 and mat2 shapes
    cannot be multiplied", keep=True with "'bool' object is not callable" after the first batch was sampled."""
    pipe, s = sd.tiny_pipeline(), sd.SampleSettings(steps=2, width=32, height=32, cfg=1.0)
    cond = pipe.text.encode(["red"])
    for embeddings in (cond, (cond[0], None), ((cond[0][..., :10], cond[1]), None), ((cond[0], cond[1][:, :8]), None)):
        one_line_error(lambda: sd.generate(pipe, ["red"], settings=s, progress=False, embeddings=embeddings),
                       r"embeddings must be \(cond, uncond\), each \(context, pooled\)")
    one_line_error(lambda: sd.generate(pipe, ["red"], settings=s, progress=False, keep=True),
                   "keep takes a function .*, not True")
    kept = []
    assert sd.generate(pipe, ["red"], settings=s, progress=False, embeddings=(cond, None), keep=kept.extend) == []
    assert len(kept) == 1                                       # kept there, not here too


def test_the_model_loaders_given_no_path_say_what_to_pass():
    """load_mmdit(None), load_vae(None) and load_text_encoders(None) (a config's path left unset) failed with
    pathlib's bare "expected str, bytes or os.PathLike object, not NoneType"."""
    for load, what in [(sd.load_mmdit, "an MMDiT"), (sd.load_vae, "a VAE"), (sd.load_text_encoders, "text encoders")]:
        one_line_error(lambda: load(None), f"give the path of {what} .str or Path., not None")


def test_the_models_own_switches_take_true_or_false_only():
    """pipe.place(offload="no") kept the models on the CPU, mmdit.enable_gradient_checkpointing("no") turned
    checkpointing on: any text is true."""
    pipe = sd.tiny_pipeline()
    one_line_error(lambda: pipe.place(offload="no"), "offload must be true or false, got 'no'")
    one_line_error(lambda: pipe.mmdit.enable_gradient_checkpointing("no"), "enabled must be true or false, got 'no'")
    assert pipe.place(np.False_).offload is False
    assert pipe.mmdit.enable_gradient_checkpointing(np.True_).gradient_checkpointing is True


def test_place_offloads_and_says_so_only_where_the_models_do_not_fit(monkeypatch, capsys):
    """place(None) keeps the models on the device, silently, where they fit (the CPU: always); where they do
    not, it offloads and says how large they are. A Pipeline made by hand does not offload."""
    pipe = sd.tiny_pipeline()
    assert sd.Pipeline(pipe.mmdit, pipe.vae, pipe.text, pipe.variant, pipe.device).offload is False
    assert pipe.place(None).offload is False and capsys.readouterr().out == ""
    monkeypatch.setattr(sd, "too_large_for", lambda device, *modules: 3 * 2**30)
    assert pipe.place(None).offload is True
    assert capsys.readouterr().out == "models of 3.0 GB exceed free GPU memory: they visit it one at a time\n"


def test_main_takes_paths_and_numbers_among_its_arguments(tmp_path):
    """sd.main([Path("config.yaml")]) or sample.main([..., "--seed", 5]) from a notebook failed in argparse with a
    bare "'PosixPath' object is not subscriptable" ('int' for the number): they are read as typed on a command line."""
    args = sd.parse_args([tmp_path / "config.yaml", "--set", "train.lr=1e-4"])
    assert (args.config, args.set) == (str(tmp_path / "config.yaml"), ["train.lr=1e-4"])
    args = sample.parse_args(["--model", "tiny", "--prompt", "red", "--seed", 5, "--out", tmp_path])
    assert (args.seed, args.out) == (5, str(tmp_path))


def test_a_numpy_array_of_prompts_in_a_config_built_in_python_is_a_list_of_prompts():
    """cfg.sample.prompts = df.caption.values[:2] (a numpy array) in a notebook trained with one preview prompt, the
    array's text "['red stripes' 'blue disc']", without a word: an array is a list, as a tuple is."""
    cfg = sd.Config()
    cfg.sample.prompts = np.array(["red stripes", "blue disc"])
    assert sd.validate(cfg).sample.prompts == ["red stripes", "blue disc"]
    cfg.sample.prompts = np.array("red stripes")                  # 0-d: one prompt, not "iteration over a 0-d array"
    assert sd.validate(cfg).sample.prompts == ["red stripes"]
    cfg.sample.prompts = {"red": 1}                               # a mapping: refused, not its keys taken
    one_line_error(lambda: sd.validate(cfg), r"config key 'sample.prompts' must be text, got \{'red': 1\}")


def test_scan_dataset_takes_the_folder_as_a_path(tmp_path):
    """scan_dataset("data") (the folder, as a notebook has it) failed with "'str' object has no attribute 'path'": it
    took a DatasetConfig alone. A folder is read as DatasetConfig(path=folder)."""
    sd.write_demo_dataset(tmp_path / "data")
    expected = sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path / "data")))
    for folder in (str(tmp_path / "data"), tmp_path / "data"):
        assert sd.scan_dataset(folder) == expected


def test_settings_resolved_for_a_mistyped_variant_name_the_variants():
    """SampleSettings().resolved("sd3.5") (or generate on a pipe whose variant was set by hand, e.g. pipe.variant =
    "sd3.5-turbo") failed with a bare KeyError: 'sd3.5'."""
    one_line_error(lambda: sd.SampleSettings().resolved("sd3.5"), "unknown variant 'sd3.5': use one of sd3-medium, ")
    pipe = sd.tiny_pipeline()
    pipe.variant = "sd3.5-turbo"
    one_line_error(lambda: sd.generate(pipe, ["red"], progress=False), "unknown variant 'sd3.5-turbo'")


def test_fractions_above_1_are_refused_before_any_model_loads():
    """lora.dropout 1.5 ended in torch's bare ValueError after loading and caching (1.0 zeroes every LoRA input:
    it trains nothing); caption_dropout 10 (meant as 10 %) trained every step on the empty caption, silently."""
    for item, match in [("lora.dropout=1.5", "'lora.dropout' must be below 1.*got 1.5"),
                        ("lora.dropout=1", "'lora.dropout' must be below 1.*got 1.0"),
                        ("dataset.caption_dropout=10", "'dataset.caption_dropout' must be in 0..1, got 10.0")]:
        one_line_error(lambda: sd.load_config(None, ["model=tiny", item]), match)
    cfg = sd.load_config(None, ["lora.dropout=0.99", "dataset.caption_dropout=1"])   # all captions empty: allowed
    assert (cfg.lora.dropout, cfg.dataset.caption_dropout) == (0.99, 1.0)


def test_a_caption_dropout_of_1_is_warned_at_the_scan_as_training_on_no_caption(tmp_path, capsys):
    """dataset.caption_dropout 1 trains every sample on the empty caption, so the LoRA learns none of the captions
    (1 % meant?): it was taken without a word. The scan warns, saying what to use; 0.99 is not warned."""
    sd.write_demo_dataset(tmp_path / "data")
    for dropout, warned in ((1, True), (0.99, False)):
        cfg = sd.load_config(None, [f"dataset.path={tmp_path / 'data'}", f"dataset.cache_dir={tmp_path / 'cache'}",
                                    f"dataset.caption_dropout={dropout}"])
        sd.scan_dataset(cfg.dataset)
        err = capsys.readouterr().err
        assert ("warning: dataset.caption_dropout is 1: every sample trains on the empty caption" in err) == warned, err


def test_a_dataset_resolution_off_the_64_px_grid_or_above_sd3s_largest_side_is_refused_before_any_model_loads():
    """resolution 10240 (a 0 too many) was refused as too large for the model only after the dataset scan and
    the models had loaded; 6400000000 hung in the scan, which lists every bucket width up to 4x it."""
    for value in (96, 0, 10240, 6400000000):
        one_line_error(lambda: sd.load_config(None, [f"dataset.resolution={value}"]),
                       rf"dataset.resolution must be a multiple of 64 in 64..6144 .*got {value}$")
    assert sd.load_config(None, ["dataset.resolution=6144"]).dataset.resolution == 6144


def test_a_negative_logit_std_is_refused_before_any_model_loads():
    """train.logit_std -1 ended in torch's bare RuntimeError (normal expects std >= 0) at the first step, after
    loading and caching; 0 is a valid (fixed-sigma) choice."""
    one_line_error(lambda: sd.load_config(None, ["train.logit_std=-1"]), "'train.logit_std' must be at least 0, got -1")
    assert sd.load_config(None, ["train.logit_std=0"]).train.logit_std == 0


def test_each_config_number_takes_its_bounds_and_refuses_what_is_past_them_by_name():
    """Each number the config bounds, at its bounds (taken) and just past them (refused before any model loads,
    naming the key): a rank, batch or step count of 0 failed only after loading and caching, or trained nothing;
    the bounds are those of the README. sample.width/height: check_size's multiples of 16 (1..15 refused alike)."""
    bounds = {  # key: (refused, lowest, highest or None, refused)
        "lora.rank": (0, 1, None, None), "train.steps": (0, 1, None, None), "train.batch_size": (0, 1, None, None),
        "train.grad_accum": (0, 1, None, None), "train.save_every": (0, 1, None, None),
        "train.warmup_steps": (-1, 0, None, None), "sample.sample_every": (-1, 0, None, None),
        "train.keep_last": (-1, 0, None, None), "train.weight_decay": (-0.5, 0, None, None),
        "train.max_grad_norm": (-0.5, 0, None, None), "lora.dropout": (-0.5, 0, None, None),
        "sample.guidance_scale": (-0.5, 0, None, None), "sample.shift": (-0.5, 0, None, None),
        "train.logit_std": (-0.5, 0, None, None), "t5_length": (0, 1, 512, 513),
        "dataset.caption_dropout": (-0.5, 0, 1, 1.5), "train.seed": (-1, 0, 2**64 - 1, 2**64),
        "sample.seed": (-1, 0, 2**64 - 1, 2**64), "sample.sample_steps": (-1, 0, 1065353216, 1065353217),
        "train.loss_bins": (0, 1, 1000, 1001), "train.dist_timeout": (0.5, 1, 10**9, 1e9 + 0.5)}
    for key, (below, lowest, highest, above) in bounds.items():
        bound = f"at least {lowest}" if highest is None else f"in {lowest}..{highest}"
        for value in (below, above)[:1 + (highest is not None)]:
            one_line_error(lambda: sd.load_config(None, ["sample.prompts=[]", f"{key}={value}"]),
                           rf"^config key '{key}' must be {bound}, got {value}$")
        for value in (lowest, highest)[:1 + (highest is not None)]:
            cfg = sd.load_config(None, ["sample.prompts=[]", f"{key}={value}"])    # (no preview: any sample.seed)
            assert sd.flat_config(cfg)[key] == value, (key, value)


def test_each_config_option_refuses_a_typo_by_name_and_takes_each_of_its_options():
    """A typo in any of the config's options is refused before any model loads, with the options to choose from:
    else train.lr_schedule 'cosin' or lora.format 'comfyui' was refused only after the scan and loading, or at
    the first save. "" (the variant's preset) is an option of variant and sample.sampler; fp16 of no dtype (it
    would need loss scaling)."""
    options = {"variant": ["", "sd3-medium", "sd3.5-medium", "sd3.5-large", "sd3.5-large-turbo"],
               "dtype": ["fp32", "bf16"], "lora.format": ["diffusers", "kohya"],
               "sample.sampler": ["", "euler", "dpmpp_2m"], "train.lr_schedule": ["constant", "cosine"],
               "train.timestep_sampling": ["logit_normal", "mode", "uniform"],
               "train.weighting": ["none", "sigma_sqrt", "cosmap"]}
    for key, valid in options.items():
        for typo in ("x", "fp16", "Euler"):
            one_line_error(lambda: sd.load_config(None, [f"{key}={typo}"]),
                           rf"^config key '{key}' is '{typo}' \(valid: {', '.join(map(repr, valid))}\)$")
        for value in valid:
            assert sd.flat_config(sd.load_config(None, [f"{key}='{value}'"]))[key] == value


def test_a_sample_shift_outside_samplings_range_is_refused_before_any_model_loads():
    """README: bad values are refused before any model loads. sample.shift 5000 or 0.0001 (0 is the preset's)
    passed validate and was refused only by the previews' settings, after the model had loaded."""
    for shift in ("5000", "0.0001"):
        one_line_error(lambda: sd.load_config(None, [f"sample.shift={shift}"]),
                       r"'sample.shift' must be 0 \(the variant's preset\) or in 0.001..1000, got")
    for shift in (0.0, 0.001, 1000.0):
        assert sd.load_config(None, [f"sample.shift={shift}"]).sample.shift == shift


def test_a_mode_scale_outside_the_sd3_papers_range_is_refused_before_any_model_loads():
    """train.mode_scale 12.9 (meant 1.29) or -3 trained silently with ~26-29 % of the samples clamped onto sigma
    1.0 or the table's smallest sigma: outside -1..2/(pi-2) the mode curve leaves 0..1 (diffusers: IndexError
    or a wrapped negative index)."""
    for scale in ("12.9", "-3", "1.8"):
        one_line_error(lambda: sd.load_config(None, ["train.timestep_sampling=mode", f"train.mode_scale={scale}"]),
                       "'train.mode_scale' must be in -1..1.75")
    for scale in (-1.0, 0.0, 1.29, 1.75):
        cfg = sd.load_config(None, ["train.timestep_sampling=mode", f"train.mode_scale={scale}"]).train
        u = sd.sample_training_sigmas(100_000, cfg, 1.0, torch.Generator().manual_seed(0))     # no shift
        assert (u == 1.0).float().mean() < 0.05 and (u == u.min()).float().mean() < 0.05     # 12.9: 26 %
    assert sd.load_config(None, ["train.mode_scale=12.9"]).train.mode_scale == 12.9     # unused: not refused


def test_huge_loss_bins_or_dist_timeout_are_refused_before_any_model_loads():
    """train.loss_bins 1e14 was a bare RuntimeError (allocating 800 TB) after loading and caching; a
    train.dist_timeout past timedelta's range a bare OverflowError when torchrun's processes joined."""
    one_line_error(lambda: sd.load_config(None, ["train.loss_bins=100000000000000"]),
                   "'train.loss_bins' must be in 1..1000,")
    one_line_error(lambda: sd.load_config(None, ["train.dist_timeout=1e300"]),
                   "'train.dist_timeout' must be in 1..1000000000,")
    assert sd.load_config(None, ["train.loss_bins=20", "train.dist_timeout=86400"]).train.loss_bins == 20


def test_a_key_given_twice_in_the_config_file_is_refused(tmp_path):
    """YAML keeps the last of two equal keys: a second `train:` section added at the end of config.yaml silently
    dropped every setting of the first (train.steps 3000 became the default 1000)."""
    (tmp_path / "c.yaml").write_text("train:\n  steps: 3000\nlora:\n  rank: 4\ntrain:\n  lr: 5e-5\n")
    one_line_error(lambda: sd.load_config(str(tmp_path / "c.yaml")), r"c.yaml line 5: 'train' is given twice")
    (tmp_path / "c.yaml").write_text("train:\n  lr: 1e-4\n  steps: 10\n  lr: 5e-5\n")
    one_line_error(lambda: sd.load_config(str(tmp_path / "c.yaml")), r"line 4: 'lr' is given twice")
    (tmp_path / "c.yaml").write_text("train:\n  lr: 5e-5\nlora:\n  rank: 4\nsample:\n  prompts: [a, a]\n")
    assert sd.load_config(str(tmp_path / "c.yaml")).sample.prompts == ["a", "a"]    # lists may repeat


def test_yaml_1_1_number_forms_never_rewrite_a_path_or_a_prompt(tmp_path):
    """PyYAML reads YAML 1.1: `output_dir: 010` was the octal 8, `dataset.path: 2024_01` 202401, a prompt `1:30` the
    sexagesimal 90 and `2024-1-5` the date 2024-01-05, so the run silently used another folder. Text keys keep the
    text as written (from the file and from --set); number keys read decimal text as before."""
    (tmp_path / "c.yaml").write_text("output_dir: 010\ndataset:\n  path: 2024_01\n  cache_dir: 2024-1-5\n"
                                     "sample:\n  prompts: [1:30, 0x10, 1_0.5]\n  seed: 010\n")
    cfg = sd.load_config(str(tmp_path / "c.yaml"), ["sample.neg=0o17", "model=1_000"])
    assert (cfg.output_dir, cfg.dataset.path, cfg.dataset.cache_dir, cfg.sample.neg, cfg.model) == (
        "010", "2024_01", "2024-1-5", "0o17", "1_000")
    assert cfg.sample.prompts == ["1:30", "0x10", "1_0.5"] and cfg.sample.seed == 10     # was 8
    import yaml
    shipped = yaml.safe_load((ROOT / "config.yaml").read_text())        # every number of config.yaml as before
    flat = sd.flat_config(sd.load_config(str(ROOT / "config.yaml")))
    numbers = {f"{section}.{key}" if isinstance(values, dict) else section: value
               for section, values in shipped.items()
               for key, value in (values.items() if isinstance(values, dict) else [(None, values)])
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    assert len(numbers) > 25 and all(flat[k] == v for k, v in numbers.items())
    big = 2**64 - 1                                                     # exact, never through a float
    assert sd.load_config(None, [f"train.seed={big}", "train.steps=1_000", "train.lr=1e-4"]).train.seed == big
    assert sd.load_config(None, ["train.steps=1_000", "train.lr=1e-4", "sample.shift=3"]).sample.shift == 3.0
    one_line_error(lambda: sd.load_config(None, ["train.seed=0x10"]), "'train.seed' must be a whole number")
    (tmp_path / "b.yaml").write_text("use_t5: off\nfp8: Yes\nsample:\n  neg: no\n  prompts: [on, 'yes']\n")
    cfg = sd.load_config(str(tmp_path / "b.yaml"), ["dataset.flip=true"])              # `neg: no` was "False"
    assert (cfg.use_t5, cfg.fp8, cfg.dataset.flip, cfg.sample.neg, cfg.sample.prompts) == (
        False, True, True, "no", ["on", "yes"])
    assert sd.load_config(None, ["use_t5=no"]).use_t5 is False                 # (true by default)
    one_line_error(lambda: sd.load_config(None, ["dataset.flip=maybe"]), "'dataset.flip' must be true or false")


def test_a_yaml_tag_its_value_does_not_fit_is_a_one_line_error(tmp_path):
    """`steps: !!int x` (from the file or --set) was a bare ValueError, `!!bool maybe` a KeyError: tagged values
    stay text as untagged ones do, and _coerce names the key; tags that fit read as before."""
    (tmp_path / "c.yaml").write_text("train:\n  steps: !!int x\n")
    one_line_error(lambda: sd.load_config(str(tmp_path / "c.yaml")), "'train.steps' must be a whole number")
    one_line_error(lambda: sd.load_config(None, ["fp8=!!bool maybe"]), "'fp8' must be true or false")
    one_line_error(lambda: sd.load_config(None, ["train.lr=!!float 1e999"]), "'train.lr' must be a finite")
    cfg = sd.load_config(None, ["train.lr=!!float 1e-4", "train.steps=!!int 20", "fp8=!!bool yes",
                                "sample.neg=!!timestamp 2024-01-05"])
    assert (cfg.train.lr, cfg.train.steps, cfg.fp8, cfg.sample.neg) == (1e-4, 20, True, "2024-01-05")


def test_a_tilde_in_a_config_path_is_the_home_folder(tmp_path, monkeypatch):
    """`output_dir: ~/runs` (and --set output_dir=~/runs, which the shell leaves alone) made a folder named '~' in
    the current one; every path key now expands '~' as a shell would, and text keys keep it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text("output_dir: ~/runs\ndataset:\n  path: ~/data\nsample:\n  neg: ~/x\n")
    cfg = sd.load_config(str(tmp_path / "c.yaml"), ["dataset.cache_dir=~/cache", "model=~/sd3.5.safetensors"])
    assert (cfg.output_dir, cfg.dataset.path, cfg.dataset.cache_dir, cfg.model) == (
        str(tmp_path / "runs"), str(tmp_path / "data"), str(tmp_path / "cache"), str(tmp_path / "sd3.5.safetensors"))
    assert cfg.sample.neg == "~/x"


def test_a_tilde_after_a_sample_option_s_equals_sign_is_the_home_folder(tmp_path, monkeypatch):
    """`sample.py --out=~/x`: the shell expands no ~ after an `=`, and the images went into a folder named '~'
    in the current one; sample.py's path options now expand it."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    sample.main(["--model", "tiny", "--no-t5", "--prompt", "a", "--steps", "1", "--width", "32", "--height", "32",
                 "--out=~/x"])
    assert [p.name for p in (tmp_path / "home/x").iterdir()] == ["sample_00.png"] and not (tmp_path / "~").exists()
    one_line_error(lambda: sample.main(["--model=~/absent.safetensors", "--prompt", "a"]),
                   f"model not found: '{tmp_path}/home/absent.safetensors'")


def test_a_dollar_in_a_sample_path_is_kept_as_the_shell_left_it(tmp_path, monkeypatch, capsys):
    """The shell expands $X in sample.py's options, after an `=` too; a `$` it leaves was quoted to stay, as in
    a file named 'style$V2.safetensors': it was refused ('names $V2, an environment variable that is not set'),
    or, with V2 set, swapped for another path. A ~ after `=` (which no shell expands), also before a scale's
    `:`, is the home folder."""
    lora = tmp_path / "style$V2.safetensors"
    save_file({"a.lora_A.weight": torch.zeros(1)}, lora)
    base = ["--model", "tiny", "--prompt", "a cat"]
    monkeypatch.delenv("V2", raising=False)
    for _ in range(2):                                                                  # V2 unset, then set
        args = sample.parse_args([*base, "--lora", str(lora), f"--out={tmp_path}/out$V2"])
        assert (args.lora, args.out) == ([str(lora)], f"{tmp_path}/out$V2")
        monkeypatch.setenv("V2", "other")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SystemExit):
        sample.parse_args([*base, "--lora=~/style$V2.safetensors:0.7"])
    assert f"--lora {lora} --lora-scale 0.7" in capsys.readouterr().err


def test_a_bare_tilde_for_a_config_path_is_refused_saying_yaml_reads_it_as_null(tmp_path):
    """`output_dir: ~` is YAML's null, so the home folder was refused as "config key 'output_dir' is empty",
    which the config did not look like: the error now says why and what to write."""
    (tmp_path / "c.yaml").write_text("model: tiny\noutput_dir: ~\n")
    one_line_error(lambda: sd.train(sd.load_config(str(tmp_path / "c.yaml"))),
                   r"config key 'output_dir' is empty \(YAML reads a bare ~ as null: write '~/\.\.\.' or a full "
                   r"path\): set it to a new folder")


def test_an_environment_variable_in_a_config_path_is_its_value_or_named_when_unset(tmp_path, monkeypatch):
    """`output_dir: $HOME/runs` (or ${HOME}) made a folder named "$HOME" in the current folder, and
    `dataset.path: $DATA/cats` was "no such folder" with the variable set; prompts keep their $ as text."""
    monkeypatch.setenv("SD35_TEST_ROOT", str(tmp_path))
    monkeypatch.delenv("SD35_TEST_UNSET", raising=False)
    cfg = sd.load_config(None, ["output_dir=$SD35_TEST_ROOT/runs", "dataset.path=${SD35_TEST_ROOT}/data",
                                "sample.neg=$5 bill", "dataset.cache_dir=my$cache"])      # lower case: a name
    assert (cfg.output_dir, cfg.dataset.path, cfg.sample.neg, cfg.dataset.cache_dir) == (
        f"{tmp_path}/runs", f"{tmp_path}/data", "$5 bill", "my$cache")
    for path in ("$SD35_TEST_UNSET/runs", "${SD35_TEST_UNSET}/runs"):
        one_line_error(lambda: sd.load_config(None, [f"output_dir={path}"]),
                       r"'output_dir' names \$\{?SD35_TEST_UNSET\}?, an environment variable that is not set")
    # Windows' os.path.expandvars copies text after a ' as it is: a set variable in C:/Users/O'Brien/$X/runs
    # was refused as "not set". Simulated; Windows' %X% still expands there.
    monkeypatch.setattr(os.path, "expandvars", ntpath.expandvars)
    cfg = sd.load_config(None, ["output_dir=O'Brien/$SD35_TEST_ROOT/runs", "dataset.path=d/%SD35_TEST_ROOT%"])
    assert (cfg.output_dir, cfg.dataset.path) == (f"O'Brien/{tmp_path}/runs", f"d/{tmp_path}")


def test_a_path_that_is_not_utf8_is_named_so_not_called_a_truncated_download(tmp_path):
    """safetensors opens no path of bytes that are not UTF-8 (a Latin-1 'café', decoded to lone surrogates): a
    --lora or model so named was "not a readable .safetensors file ...; a truncated download? download it
    again"; an output_dir or cache_dir so named (a Config from Python) wrote its files, then failed to read them
    back: every cache file "unreadable, rebuilding", each start, and the state "lacks a readable step"."""
    save_file({"a": torch.zeros(2)}, tmp_path / "good.safetensors")
    latin1 = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9"))
    try:
        shutil.copy(tmp_path / "good.safetensors", latin1.with_suffix(".safetensors"))
    except (OSError, UnicodeError):
        pytest.skip("this filesystem refuses names that are not UTF-8")
    one_line_error(lambda: sd.read_safetensors(latin1.with_suffix(".safetensors")),
                   r"caf\\udce9.safetensors' is not UTF-8 \(bytes of another encoding\), which safetensors cannot "
                   r"open: rename it, or the folder holding it, in UTF-8")
    for key in ("output_dir", "dataset.cache_dir"):
        config = sd.validate(tiny_config(tmp_path))
        setattr(config.dataset if "." in key else config, key.split(".")[-1], str(latin1))
        one_line_error(lambda: sd.train(config), rf"config key '{key}' .*caf\\udce9' is not UTF-8")
    assert not latin1.exists()


def test_a_nul_character_in_a_config_path_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """YAML's "\\0" (or a Config built in Python) put a NUL into a path: the dataset scan or the output_dir
    check ended in a bare ValueError ('embedded null byte') traceback."""
    monkeypatch.chdir(tmp_path)
    for key in ("output_dir", "dataset.path", "dataset.cache_dir", "vae"):
        section, _, name = key.rpartition(".")
        line = f'{name}: "runs/a\\0b"'
        (tmp_path / "c.yaml").write_text(f"model: tiny\n{section}:\n  {line}\n" if section else f"model: tiny\n{line}\n")
        with pytest.raises(SystemExit) as e:
            sd.main([str(tmp_path / "c.yaml")])
        assert str(e.value) == (f"error: config key '{key}' holds a control character, 'runs/a\\x00b': "
                                f"{sd.WINDOWS_PATHS}")
    config = sd.Config(model="tiny", output_dir="runs/a\0b")
    one_line_error(lambda: sd.train(config), "config key 'output_dir' holds a control character")


def test_an_empty_set_value_reads_as_the_empty_yaml_value(tmp_path):
    """`--set sample.prompts=` is YAML's `prompts:` (null): no previews. It was read as one empty prompt, which
    sampled an unconditional preview set every sample_every steps."""
    (tmp_path / "c.yaml").write_text("sample:\n  prompts:\n  neg:\n")
    from_file = sd.load_config(str(tmp_path / "c.yaml")).sample
    from_set = sd.load_config(None, ["sample.prompts=", "sample.neg="]).sample
    assert from_set.prompts == from_file.prompts == [] and from_set.neg == from_file.neg == ""


def test_a_set_value_with_a_yaml_comment_in_it_is_refused_not_cut_short():
    """--set "sample.neg=blurry #lowres" read as YAML drops " #lowres" as a comment: the run trained with
    "blurry" as its negative prompt (and "#lowres" alone as none), without a word. Quoted, # is text. The
    example quotes YAML's quotes for a shell, which removes a bare pair; a kept '#' hides no dropped one."""
    for item in ("sample.neg=blurry #lowres", "sample.neg=#lowres", "sample.prompts=a cat #cute",
                 "sample.neg=rgb#fff #lowres"):
        one_line_error(lambda: sd.load_config(None, [item]),
                       "YAML drops ' #' and all after it as a comment: .*e.g. --set \"sample.(neg|prompts)='a #b'\"$")
    assert sd.load_config(None, ["sample.neg='blurry #lowres'"]).sample.neg == "blurry #lowres"
    assert sd.load_config(None, ["sample.neg=no#1"]).sample.neg == "no#1"              # no space: text


def test_a_set_key_under_a_setting_that_is_no_section_is_named_as_such():
    """--set model.x=1 was told "config key 'model' must be text, got {'x': '1'}: quote it", and
    train.lr.x=1 "must be a finite number, got {'x': '1'}": the dotted key became a mapping."""
    for item, setting in (("model.x=1", "model"), ("train.lr.x=1", "train.lr")):
        one_line_error(lambda: sd.load_config(None, [item]), f"'{setting}' is a setting, not a section: --set ")


def test_load_config_takes_one_override_as_text_and_none(tmp_path):
    """load_config("config.yaml", "train.steps=500"), one override without its list, read each character as
    an override: "--set expects key=value (e.g. train.lr=5e-5), got 't'"; overrides=None was a bare TypeError."""
    assert sd.load_config(None, "train.steps=500").train.steps == 500
    assert sd.load_config(None, None) == sd.load_config(None)


def test_a_config_section_with_every_line_commented_out_keeps_its_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("lora:\n  # rank: 8\ntrain:\n  steps: 3\n")
    cfg = sd.load_config(str(tmp_path / "c.yaml"))
    assert cfg.lora == sd.LoRAConfig() and cfg.train.steps == 3


def test_an_output_dir_without_a_checkpoint_is_not_sent_to_resume(tmp_path):
    """A run that stopped before its first checkpoint: --resume cannot continue it, so the error does not say so."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").write_text("")
    with pytest.raises(sd.UserError, match="it saved no checkpoint: empty it or choose another") as error:
        sd.train(tiny_config(tmp_path))
    assert "--resume" not in str(error.value)
    (tmp_path / "run" / "lora.safetensors").write_bytes(b"")      # its training state deleted to save space:
    with pytest.raises(sd.UserError, match="holds LoRA files but no training state: move them away or choose"):
        sd.train(tiny_config(tmp_path))                            # "empty it" deleted the trained LoRA


def test_an_output_dir_of_the_users_own_files_is_not_to_be_emptied(tmp_path):
    """output_dir pointed at a folder of other files (~/Pictures): the error said "files of an earlier run; it
    saved no checkpoint: empty it", advice that deletes them."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "holiday.jpg").write_bytes(b"mine")
    (tmp_path / "run" / ".DS_Store").write_bytes(b"")
    with pytest.raises(sd.UserError, match="holds files that no run wrote \\(e.g. 'holiday.jpg'\\): choose a new or"
                       " empty output_dir") as error:
        sd.train(tiny_config(tmp_path))
    assert "empty it" not in str(error.value) and (tmp_path / "run" / "holiday.jpg").read_bytes() == b"mine"


def test_a_refused_fresh_run_leaves_no_lock_file_that_makes_the_users_folder_a_runs(tmp_path):
    """output_dir pointed at a folder of the user's LoRAs, one named lora_*: "it holds LoRA files but no training
    state: move them away". Refused once output_dir was locked, the run left its hidden lock file there, and with
    that LoRA moved away as told, the lock made the user's other files an earlier run's: "empty it"."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("lora_style.safetensors", "portrait.safetensors"):
        (out / name).write_bytes(b"mine")
    one_line_error(lambda: sd.train(tiny_config(tmp_path)), "holds LoRA files but no training state: move them away")
    assert sorted(p.name for p in out.iterdir()) == ["lora_style.safetensors", "portrait.safetensors"]
    (out / "lora_style.safetensors").rename(tmp_path / "lora_style.safetensors")
    one_line_error(lambda: sd.train(tiny_config(tmp_path)),
                   r"holds files that no run wrote \(e.g. 'portrait.safetensors'\): choose a new or empty output_dir")


def test_an_output_dir_holding_a_stopped_runs_cache_is_called_an_earlier_runs(tmp_path, monkeypatch):
    """dataset.cache_dir inside output_dir, a run stopped after caching (Ctrl-C before its first previews): the
    next run was told that output_dir "holds files that no run wrote (e.g. 'cache')"; its lock file is a run's."""
    make_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, **{"dataset.cache_dir": str(tmp_path / "run" / "cache")})
    with monkeypatch.context() as m:
        m.setattr(sd, "add_lora", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            sd.train(cfg)
    one_line_error(lambda: sd.train(cfg), r"already holds files of an earlier run; it saved no checkpoint: empty it")


def test_any_file_a_run_writes_makes_output_dir_an_earlier_runs(tmp_path):
    """Each file a run writes, alone in output_dir, makes it an earlier run's, told what to do with it (not "files
    that no run wrote"): a run that ended after its loss plot or its step-0 previews, a checkpoint, LoRA files."""
    for written, fix in [("loss.png", "it saved no checkpoint: empty it"),
                         ("samples_step_000000", "it saved no checkpoint: empty it"),
                         (sd.STATE_FILE, "continue it with --resume"),
                         ("lora_step_000002.safetensors", "it holds LoRA files but no training state: move them away")]:
        out = tmp_path / written.replace(".", "_")
        out.mkdir()
        (out / written).mkdir() if "." not in written else (out / written).write_bytes(b"")
        one_line_error(lambda: sd.train(tiny_config(tmp_path, output_dir=str(out))),
                       f"already holds files of an earlier run; {fix} or choose another output_dir")


def test_resume_before_the_first_checkpoint_says_what_to_do(tmp_path):
    """A run killed before its first checkpoint (during the caching or the step-0 previews): --resume answered
    only "no .../training_state.safetensors to resume from", and left the user to guess the next command."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").write_text("")
    with pytest.raises(sd.UserError, match="to resume from .*: start the run anew without --resume, in an empty"):
        sd.train(tiny_config(tmp_path), resume=True)


def test_an_output_dir_holding_the_dataset_is_not_to_be_emptied(tmp_path):
    """output_dir set to the image folder (or a folder above it, '.'): the error said 'empty it', which deletes the
    user's images; it names the dataset and asks for another output_dir."""
    make_dataset(tmp_path / "data")
    for out in (tmp_path / "data", tmp_path):
        with pytest.raises(sd.UserError, match="holds dataset.path .*choose another output_dir") as error:
            sd.train(tiny_config(tmp_path, output_dir=str(out)))
        assert "empty it" not in str(error.value)
    assert len(list((tmp_path / "data").iterdir())) == 5


def test_an_output_dir_holding_only_hidden_files_is_no_earlier_run(tmp_path):
    """macOS's Finder puts .DS_Store into a folder the user made for the run: that is no earlier run's file."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    one_line_error(lambda: sd.train(tiny_config(tmp_path)), "no usable images in dataset.path")   # the next check


def test_a_run_in_an_output_dir_in_use_is_refused_and_a_killed_run_leaves_no_lock(tmp_path, monkeypatch):
    """Two fresh runs started at once in one output_dir both found it empty, then wrote over each other's checkpoints
    and LoRA files (so did a --resume of a run still going). A run's process 0 now locks output_dir for the run's
    life; the OS drops a killed run's lock, and the hidden lock file is no earlier run's file."""
    make_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path)
    monkeypatch.setattr(sd, "scan_dataset", lambda *a: (_ for _ in ()).throw(sd.UserError("past the checks")))

    def first_run(resume: bool) -> subprocess.Popen:            # another process, just past its output_dir checks
        script = ("import time, sd35_lora as sd\n"
                  "sd.scan_dataset = lambda *a: print('scanning', flush=True) or time.sleep(600)\n"
                  f"sd.train(sd.load_config(None, {tiny_overrides(tmp_path)!r}), {resume})\n")
        job = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert job.stdout.readline() == "scanning\n"
        return job
    for resume in (False, True):
        job = first_run(resume)
        try:
            log, line = tmp_path / "run" / "log.jsonl", '{"step": 2, "loss": 1.0}\n'   # past the checkpoint
            if resume:                                          # the live run's log: a refused resume keeps it
                log.write_text(line)
            one_line_error(lambda: sd.train(cfg, resume), r"another run is using output_dir .*run: wait for it")
            assert not resume or log.read_text() == line
            if not resume:                                      # torchrun: process 0 alone takes the lock
                with monkeypatch.context() as patch:
                    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "localhost"),
                                        ("MASTER_PORT", "29500")):
                        patch.setenv(name, value)
                    one_line_error(lambda: sd.train(cfg), "past the checks")
        finally:
            job.kill()
            job.wait()
        job = first_run(resume)                                 # killed: no stale lock, the next run starts
        job.kill()
        job.wait()
        held = sd.lock_output_dir(tmp_path / "run")             # a notebook's failed run, kept by its traceback,
        assert sd.lock_output_dir(tmp_path / "run") and held    # does not block the next in the same process
        held.close()
        params = [torch.nn.Parameter(torch.ones(2))]                 # a checkpoint to resume from, next
        sd.save_training_state(tmp_path / "run" / sd.STATE_FILE, params, torch.optim.AdamW(params), 1, cfg, [])


def test_a_fresh_run_in_the_output_dir_of_a_live_run_is_told_it_is_in_use_not_to_resume(tmp_path):
    """A fresh run pointed at the output_dir of a run still going (one past its first checkpoint) was told it
    "already holds files of an earlier run; continue it with --resume", and --resume then said it was in use."""
    make_dataset(tmp_path / "data")
    cfg, out = tiny_config(tmp_path), tmp_path / "run"
    out.mkdir()
    for name in ("log.jsonl", "lora.safetensors"):                        # the live run's checkpoint
        (out / name).write_bytes(b"")
    params = [torch.nn.Parameter(torch.ones(2))]
    sd.save_training_state(out / sd.STATE_FILE, params, torch.optim.AdamW(params), 1, cfg, [])
    script = (f"import time, sd35_lora as sd\nfrom pathlib import Path\nheld = sd.lock_output_dir(Path({str(out)!r}))\n"
              "print('locked' if held else 'no lock', flush=True)\ntime.sleep(600)\n")
    job = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert job.stdout.readline() == "locked\n"
        for resume in (False, True):
            one_line_error(lambda: sd.train(cfg, resume), r"another run is using output_dir .*run: wait for it")
    finally:
        job.kill()
        job.wait()
    one_line_error(lambda: sd.train(cfg), "already holds files of an earlier run; continue it with --resume")


def test_a_resume_in_the_output_dir_of_a_live_run_before_its_first_checkpoint_is_told_it_is_in_use(tmp_path):
    """--resume pointed at a run still caching or in its step-0 previews (no checkpoint yet) was told: no
    training_state.safetensors, "start the run anew without --resume, in an empty output_dir": emptying it
    deletes the live run's files and lock, and a run started there then shares the folder. Found by the kill hunt."""
    make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    out.mkdir()
    script = (f"import time, sd35_lora as sd\nfrom pathlib import Path\nheld = sd.lock_output_dir(Path({str(out)!r}))\n"
              "print('locked' if held else 'no lock', flush=True)\ntime.sleep(600)\n")
    job = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert job.stdout.readline() == "locked\n"
        one_line_error(lambda: sd.train(tiny_config(tmp_path), resume=True),
                       r"another run is using output_dir .*run: wait")
    finally:
        job.kill()
        job.wait()


def test_a_run_that_failed_before_training_leaves_output_dir_unlocked_while_its_error_is_kept(tmp_path):
    """A notebook keeps the last error's traceback: a run that failed after taking the output_dir lock (no usable
    images, a bad model path, Ctrl-C while caching) held it through the half-made Trainer, and a run started
    in a terminal was refused: "another run is using output_dir"."""
    (tmp_path / "data").mkdir()
    (tmp_path / "run").mkdir()                  # there before the run: kept (one the run made goes with it)
    with pytest.raises(sd.UserError, match="no usable images") as kept:       # `kept` holds the traceback
        sd.train(tiny_config(tmp_path))
    script = f"import sd35_lora as sd; from pathlib import Path; print(bool(sd.lock_output_dir(Path({str(tmp_path / 'run')!r}))))"
    other = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert other.stdout == "True\n", other.stderr[-300:]
    assert kept.value.__traceback__ is not None


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX locks (fcntl); Windows unlinks no open file")
@pytest.mark.parametrize("b_locks", ["between A's close and unlink", "the file A opened and unlinked",
                                     "after A removed the folder"])
def test_a_failed_run_removing_the_output_dir_it_made_keeps_the_lock_of_a_run_starting_there(tmp_path, monkeypatch,
                                                                                             b_locks):
    """A failed run A removes the output_dir it made when only its lock file is left. A run B starting there at
    that moment locked the file after A closed it, before A unlinked it: A then unlinked B's lock and removed the
    folder, and a third run could lock a new file there beside B. Forced here in one process (where a POSIX lock
    never refuses another): B locks the file A's path names, in a folder that is there."""
    import fcntl
    out, held, real_lockf = tmp_path / "run", [], fcntl.lockf
    out.mkdir()

    def run_b_starts():                             # refuse_early's steps
        sd.writable_dir(out, "output_dir")
        held.append(sd.lock_output_dir(out))

    class LockThatStartsB:                          # A's lock: B opens and locks the moment A closes it
        def __init__(self, file):
            self.file = file

        def close(self):
            self.file.close()
            run_b_starts()

    def lockf_after_a_ended(file, flags):           # B's file opened, then A ends before B locks it
        if a.lock:
            sd.end_training(a, {})
            a.lock = None
        real_lockf(file, flags)
    a = types.SimpleNamespace(lock=sd.lock_output_dir(out), out=out, made=[out])
    if b_locks == "between A's close and unlink":
        a.lock = LockThatStartsB(a.lock)
        sd.end_training(a, {})
    elif b_locks == "after A removed the folder":       # between B's writable_dir and its open: was a bare
        sd.writable_dir(out, "output_dir")              # FileNotFoundError
        sd.end_training(a, {})
        held.append(sd.lock_output_dir(out))
    else:
        monkeypatch.setattr(fcntl, "lockf", lockf_after_a_ended)
        run_b_starts()
    assert held and (out / sd.LOCK_FILE).exists()
    assert os.path.samestat(os.fstat(held[0].fileno()), os.stat(out / sd.LOCK_FILE))
    held[0].close()


def test_a_second_run_in_another_thread_on_the_same_output_dir_is_refused(tmp_path, monkeypatch):
    """A POSIX lock belongs to the process: train() in a second thread (a notebook's, a web UI's) took the same
    output_dir's lock too, and both runs trained into it (log.jsonl held both runs' steps)."""
    import threading
    make_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, **{"train.steps": 2, "sample.sample_every": 0})
    scanning, go_on, real_scan, done = threading.Event(), threading.Event(), sd.scan_dataset, []

    def held_scan(*args):                               # the first run holds output_dir while it scans
        if not scanning.is_set():
            scanning.set()
            go_on.wait(60)
        return real_scan(*args)
    monkeypatch.setattr(sd, "scan_dataset", held_scan)
    first = threading.Thread(target=lambda: done.append(sd.train(cfg)))
    first.start()
    try:
        assert scanning.wait(60)
        for _ in range(2):                              # a refused run does not free the first one's claim
            one_line_error(lambda: sd.train(cfg), "another run in this process .* is using output_dir .*run: wait")
    finally:
        go_on.set()
        first.join(60)
    assert done and len(losses(tmp_path / "run")) == 2
    sd.train(tiny_config(tmp_path, **{"train.steps": 3, "sample.sample_every": 0}), resume=True)   # let go
    assert len(losses(tmp_path / "run")) == 3


def test_a_trainer_made_by_hand_that_failed_does_not_hold_output_dir_for_train(tmp_path):
    """The thread guard's claim was made inside Trainer.__init__ and let go only by train(): a notebook's
    sd.Trainer(cfg) failing (no dataset yet) refused every later train() there as 'another run in this process'."""
    cfg = tiny_config(tmp_path, **{"train.steps": 1, "sample.sample_every": 0})
    with pytest.raises(sd.UserError, match="no usable images"):
        sd.Trainer(cfg)
    make_dataset(tmp_path / "data")
    sd.train(cfg)
    assert len(losses(tmp_path / "run")) == 1 and not sd.RUNS_HERE


def test_a_finished_run_lets_go_of_its_models_without_waiting_for_the_garbage_collector(tmp_path, monkeypatch):
    """A finished train() kept its models (and their GPU memory) until the garbage collector ran: its Trainer
    sits in a reference cycle (the optimizer's hooks), and a notebook's next run could run out of memory."""
    make_dataset(tmp_path / "data")
    trainers, real = [], sd.start_trainer
    monkeypatch.setattr(sd, "start_trainer", lambda *args: trainers.append(real(*args)) or trainers[-1])
    sd.train(tiny_config(tmp_path, **{"train.steps": 1, "sample.sample_every": 0}))
    (trainer,) = trainers
    assert {p.device.type for m in trainer.pipe.modules() for p in m.parameters()} == {"meta"}
    assert not trainer.opt.state


def test_a_lora_of_another_variant_with_the_same_shapes_warns(tmp_path, capsys):
    """An SD3.5 Medium attention LoRA fits SD3 Medium's shapes: loading it there warns (the metadata says so)."""
    model = sd.tiny_pipeline().mmdit                                    # sd3.5-medium structure
    sd.add_lora(model, rank=4)
    for variant, warned in (("sd3-medium", True), ("sd3.5-medium", False)):
        sd.save_lora(model, tmp_path / "lora.safetensors", metadata={"variant": variant})
        sd.load_lora(sd.tiny_pipeline().mmdit, tmp_path / "lora.safetensors")
        assert ("was trained on sd3-medium, this model is sd3.5-medium" in capsys.readouterr().err) == warned


def test_a_kohya_or_onetrainer_lora_of_another_variant_with_the_same_shapes_warns_by_its_modelspec(tmp_path, capsys):
    """An SD3 Medium attention LoRA by sd-scripts or OneTrainer fits SD3.5 Medium's shapes and loaded there without
    a word: their files name the model in SAI's ModelSpec header (modelspec.architecture), which was not read.
    An id that does not tell Medium from Large (OneTrainer's older stable-diffusion-v3.5) says nothing."""
    g = torch.Generator().manual_seed(0)
    key = "lora_unet_joint_blocks_0_x_block_attn_proj"
    tensors = {f"{key}.lora_down.weight": torch.randn(2, 64, generator=g),
               f"{key}.lora_up.weight": torch.randn(64, 2, generator=g), f"{key}.alpha": torch.tensor(1.0)}
    for architecture, trained_on in (("stable-diffusion-3-medium/lora", "sd3-medium"),        # sd-scripts'
                                     ("stable-diffusion-3-3-medium/lora", "sd3-medium"),      # (Oct 2024-Aug 2025)
                                     ("stable-diffusion-v3-medium/lora", "sd3-medium"),       # OneTrainer's
                                     ("stable-diffusion-3-5-large/lora", "sd3.5-large"),
                                     ("stable-diffusion-3-3-5-large/lora", "sd3.5-large"),
                                     ("stable-diffusion-v3.5-large/lora", "sd3.5-large"),
                                     ("stable-diffusion-3-5-medium/lora", None), ("stable-diffusion-v3.5/lora", None),
                                     ("stable-diffusion-v3-medium", None)):     # ComfyUI's for any SD3 checkpoint
        save_file(tensors, tmp_path / "lora.safetensors", {"modelspec.architecture": architecture})
        assert sd.load_lora(tiny_mmdit(dual=(0,)), tmp_path / "lora.safetensors") == 1
        warning = capsys.readouterr().err
        assert (f"was trained on {trained_on}, this model is sd3.5-medium" in warning) == bool(trained_on), architecture
        assert bool(warning) == bool(trained_on), warning
    for architecture in ("stable-diffusion-v3.5-medium/lora", "stable-diffusion-3-3-5-medium/lora"):  # OMI's, sd-scripts'
        save_file(tensors, tmp_path / "lora.safetensors", {"modelspec.architecture": architecture})
        sd.load_lora(tiny_mmdit(dual=(), qk_norm=False), tmp_path / "lora.safetensors")   # on SD3 Medium
        assert "was trained on sd3.5-medium, this model is sd3-medium" in capsys.readouterr().err, architecture


def test_saved_loras_name_their_model_in_sai_modelspec_as_model_browsers_read_it(tmp_path, capsys):
    """Our files carried no SAI ModelSpec header, so LoRA browsers that sort by it (SwarmUI) could not tell which
    model one is for. The spec's own ids are written (it lists SD3 as stable-diffusion-v3-medium; SwarmUI and the
    OMI standard spell SD3.5 stable-diffusion-v3.5-*), ones read_lora maps back to the variant: an SD3 Medium
    LoRA saved without metadata now warns on SD3.5 Medium. Large Turbo, a finetune of Large, has Large's id."""
    day = time.strftime("%Y-%m-%d")
    for dual, qk_norm, variant, architecture in (((), False, "sd3-medium", "stable-diffusion-v3-medium/lora"),
                                                 ((0,), True, "sd3.5-medium", "stable-diffusion-v3.5-medium/lora"),
                                                 ((), True, "sd3.5-large", "stable-diffusion-v3.5-large/lora")):
        model = tiny_mmdit(dual=dual, qk_norm=qk_norm)
        sd.add_lora(model, rank=2)
        for format, implementation in (("diffusers", "diffusers"), ("kohya", "https://github.com/Stability-AI/sd3.5")):
            sd.save_lora(model, tmp_path / "my style.safetensors", format)
            meta = sd.read_safetensors(tmp_path / "my style.safetensors", with_metadata=True)[1]
            assert {k: v for k, v in meta.items() if k.startswith("modelspec.")} == {
                "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": architecture,
                "modelspec.implementation": implementation, "modelspec.title": "my style",
                "modelspec.date": meta["modelspec.date"]} and meta["modelspec.date"] in (day, time.strftime("%Y-%m-%d"))
            assert "variant" not in json.loads(meta["sd35_lora"])
            sd.load_lora(tiny_mmdit(dual=(0,)), tmp_path / "my style.safetensors")   # all the layers of each
            warning = capsys.readouterr().err
            assert (f"was trained on {variant}, this model is sd3.5-medium" in warning) == (variant != "sd3.5-medium")
    sd.save_lora(model, tmp_path / "turbo.safetensors", metadata={"variant": "sd3.5-large-turbo"})
    meta = sd.read_safetensors(tmp_path / "turbo.safetensors", with_metadata=True)[1]
    assert meta["modelspec.architecture"] == "stable-diffusion-v3.5-large/lora"
    assert json.loads(meta["sd35_lora"])["variant"] == "sd3.5-large-turbo"         # ours tells Turbo apart


def test_a_runs_loras_take_the_runs_name_as_their_modelspec_title(tmp_path):
    """A run's lora.safetensors and lora_step_*.safetensors are titled by the run (the output folder's name), as
    sd-scripts titles its files by their output_name, with the variant the run trained."""
    make_dataset(tmp_path / "data")
    trainer = sd.Trainer(tiny_config(tmp_path))
    try:
        sd.save_checkpoint(trainer)
    finally:
        sd.end_training(trainer, {})
    for name in ("lora.safetensors", "lora_step_000000.safetensors"):
        meta = sd.read_safetensors(tmp_path / "run" / name, with_metadata=True)[1]
        assert meta["modelspec.title"] == "run", name
        assert meta["modelspec.architecture"] == "stable-diffusion-v3.5-medium/lora", name


def test_a_lora_on_a_layer_this_variant_lacks_is_refused_naming_it(tmp_path):
    """A LoRA on dual attention (attn2, SD3.5 Medium's) loaded into a model without it: a one-line error that
    names the layer and the model's dual-attention blocks, not an AttributeError on the missing layer."""
    donor = tiny_mmdit(dual=(0,))
    sd.add_lora(donor, rank=2, targets="all")
    sd.save_lora(donor, tmp_path / "lora.safetensors")
    one_line_error(lambda: sd.load_lora(tiny_mmdit(dual=()), tmp_path / "lora.safetensors"),
                   r"no 'joint_blocks\.0\.x_block\.attn2\.qkv' in this model \(depth 3, dual attention \[\]\)")


def test_a_lora_of_a_deeper_wider_variant_is_refused_in_one_line_not_after_warnings(tmp_path, capsys):
    """A Large LoRA (38 blocks, width 2432) on Medium (24, 1536): before its one-line error, the load printed
    'was trained on sd3.5-large ...' and 'ignored N tensors ... no LoRA weights of this model' (blocks 24-37),
    as if it went on. The warnings about a file are now given only once it fits; the refusal is one line."""
    large = sd.MMDiT(sd.MMDiTConfig(depth=5, hidden=96, heads=6, context_dim=32, pooled_dim=24,
                                    pos_embed_max_size=16, qk_norm=True, dual_attention_layers=()))
    sd.add_lora(large, rank=2)
    for fmt in ("diffusers", "kohya"):
        sd.save_lora(large, tmp_path / "large.safetensors", fmt, metadata={"variant": "sd3.5-large"})
        model = tiny_mmdit()
        one_line_error(lambda: sd.load_lora(model, tmp_path / "large.safetensors"),
                       r"'joint_blocks\.0\.\w+_block\.attn\.(qkv|proj)' takes \(64 -> 64\).*another variant's LoRA")
        assert capsys.readouterr().err == ""


def test_text_keys_refuse_yaml_mappings_and_lists(tmp_path):
    """An unquoted `- a dog, style: watercolor` is a mapping in YAML: refused, never used as its Python repr."""
    (tmp_path / "c.yaml").write_text("sample:\n  prompts:\n    - a dog, style: watercolor\n    - plain\n")
    one_line_error(lambda: sd.load_config(str(tmp_path / "c.yaml")),
                   r"'sample.prompts' must be text.*quote it \(YAML reads an unquoted 'a: b' as a mapping\)$")
    one_line_error(lambda: sd.load_config(None, ["sample.neg=[blurry, lowres]"]), "'sample.neg' must be text")
    (tmp_path / "c.yaml").write_text("sample:\n  prompts:\n    - 'a dog, style: watercolor'\n    - 7\n")
    assert sd.load_config(str(tmp_path / "c.yaml")).sample.prompts == ["a dog, style: watercolor", "7"]


def test_config_prompts_that_are_not_utf8_are_refused_before_any_model_loads(tmp_path):
    """A lone surrogate in a prompt (YAML's "\\ud800" escape, or --set from a Latin-1 terminal: 'caf\\udce9')
    reached the tokenizers after loading and caching: a bare TypeError traceback. The --set case said "not
    valid YAML (quote a list ...)"; paths keep any name the file system gives."""
    for key in ("sample.prompts", "sample.neg", "dataset.default_caption"):
        said = (f"config key '{key}' is not UTF-8 text: " + r"'a \ud800 cat'"
                " (write the character itself, in UTF-8)")
        one_line_error(lambda: sd.load_config(None, [f'{key}="a \\ud800 cat"']), re.escape(said) + "$")
        one_line_error(lambda: sd.load_config(None, [f"{key}=caf\udce9"]), "not UTF-8 text.*terminal to UTF-8")
    assert sd.load_config(None, ["sample.prompts=[café 🦊]", 'sample.neg="\\u00fc"']).sample.neg == "ü"


def test_tiny_resume_continues_the_newest_tiny_run_that_saved(tmp_path, monkeypatch):
    """`--tiny --resume` continues the tiny run whose checkpoint is newest (by its time, not its folder's name),
    not another (nor one that saved none)."""
    monkeypatch.chdir(tmp_path)
    for stamp, mtime in (("20261129-090000", 100), ("20261128-120000", 300), ("20261127-080000", 200)):
        state = tmp_path / "runs" / f"tiny_{stamp}" / sd.STATE_FILE
        state.parent.mkdir(parents=True)
        state.write_bytes(b"")
        os.utime(state, (mtime, mtime))
    (tmp_path / "runs" / "tiny_20261130-000000").mkdir()                  # the newest folder, but saved nothing
    resumed = []
    monkeypatch.setattr(sd, "train", lambda cfg, resume: resumed.append((cfg.output_dir, resume)) or "lora")
    sd.main(["--tiny", "--resume"])
    assert resumed == [("runs/tiny_20261128-120000", True)]


@pytest.mark.parametrize("stderr_too", [False, True])
def test_training_whose_output_pipe_closed_stops_with_a_checkpoint_as_ctrl_c_does(tmp_path, stderr_too):
    """`python sd35_lora.py config.yaml | head` (or a pager quit early): the next line to stdout raised
    BrokenPipeError, reported as "error: [Errno 32] Broken pipe: free disk space ..." (wrong advice), and the
    steps since the last checkpoint were lost. It stops as Ctrl-C does, with a checkpoint of the last step, and
    ends quietly with exit code 1, as sample.py does. stderr_too (`2>&1 | head`, `|& less`): the progress bar's
    close failed first, before the checkpoint, and the run ended with none."""
    make_dataset(tmp_path / "data")
    p = subprocess.Popen([sys.executable, *train_cli(tmp_path, **{"sample.sample_every": 2, "train.save_every": 40})],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if stderr_too else subprocess.PIPE,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    while "step_000000_sample_01" not in p.stdout.readline():          # step 0's last preview: training begins
        pass
    p.stdout.close()                                                    # the reader gone: step 2's report fails
    stderr = "" if stderr_too else p.stderr.read()
    assert p.wait(timeout=600) == 1 and "Traceback" not in stderr and "Broken pipe" not in stderr, stderr[-2000:]
    state = sd.read_safetensors(tmp_path / "run" / sd.STATE_FILE, with_metadata=True, prefix=None)[1]
    trained = int(state["step"])                                        # stderr_too: may stop at step 0
    assert (0 if stderr_too else 1) <= trained < 40
    assert (tmp_path / f"run/lora_step_{trained:06d}.safetensors").is_file()


def test_torchrun_a_lost_stdout_keeps_keep_last_and_process_0_says_why_it_stopped(tmp_path):
    """`... | head` under torchrun, stopping at a checkpoint's "saved" line: process 0 exited 1 without a word,
    and the others' "lost contact ... one died" (a remote worker "crashing") was all the user saw of why;
    keep_last's pruning came after that line (one process: see test_a_run_stopped_by_a_lost_stdout_...)."""
    make_dataset(tmp_path / "data")
    p = torchrun(*train_cli(tmp_path, **{**LONG_RUN, "train.save_every": 1, "train.keep_last": 1}), wait=False)
    while "lora_step_000002" not in p.stdout.readline():
        pass
    p.stdout.close()                                                    # the reader gone: step 3's "saved" fails
    stderr = p.stderr.read()
    assert p.wait(timeout=300) != 0 and "Broken pipe" not in stderr, stderr[-2000:]
    left = sorted(path.name for path in (tmp_path / "run").glob("lora_step_*"))
    step = int(sd.read_safetensors(tmp_path / "run" / sd.STATE_FILE, with_metadata=True, prefix=None)[1]["step"])
    assert left == [f"lora_step_{step:06d}.safetensors"], left
    assert ("error: process 0: stdout lost its reader (`| head`, a pager quit): stopped, checkpoint saved "
            "(continue with --resume); torchrun stops the others") in stderr, stderr[-2000:]


def test_tiny_command_from_readme_runs_and_resumes(tmp_path):
    """Also `--tiny --resume`, as the interrupt message suggests: --tiny names its folder by the time, and the
    resume looked for a checkpoint in a new folder ("no ... to resume from"); it continues the newest tiny run."""
    r = run_cli(str(ROOT / "sd35_lora.py"), str(ROOT / "config.yaml"), "--tiny", "--set", "train.steps=2",
                "--set", "sample.sample_every=0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    run = next((tmp_path / "runs").glob("tiny_2*"))
    assert (run / "lora.safetensors").is_file() and (run / "samples_step_000002/step_000002_sample_01.png").is_file()
    r = run_cli(str(ROOT / "sd35_lora.py"), str(ROOT / "config.yaml"), "--tiny", "--resume", "--set", "train.steps=3",
                "--set", "sample.sample_every=0", cwd=tmp_path)
    assert r.returncode == 0 and [p.name for p in (tmp_path / "runs").glob("tiny_2*")] == [run.name], r.stderr
    assert json.loads((run / "log.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_a_log_file_of_the_clis_holds_their_lines_in_the_order_they_were_printed(tmp_path):
    """`python sd35_lora.py config.yaml > log 2>&1`: stdout into a file is block-buffered, so "saved ..." and
    the loss by sigma bin reached the log only at exit, after the last progress bar (or never, when the job
    was killed); sample.py's "model: ..." came after its denoising bars."""
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, "HF_HUB_OFFLINE": "1"}

    def log(*args) -> str:
        return subprocess.run([sys.executable, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=600, env=env).stdout
    text = log(str(ROOT / "sd35_lora.py"), str(ROOT / "config.yaml"), "--tiny", "--set", "train.steps=4",
               "--set", "train.save_every=2", "--set", "sample.sample_every=0")
    assert text.index("lora_step_000002.safetensors") < text.index("4/4"), text[-2000:]
    lora = next((tmp_path / "runs").glob("tiny_*/lora.safetensors"))
    text = log(str(ROOT / "sample.py"), "--lora", str(lora), "--prompt", "a", "--width", "32", "--height", "32")
    assert text.index("model: tiny") < text.index("denoising"), text[-2000:]


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")
def test_ctrl_c_while_the_clis_import_torch_ends_them_without_a_traceback(tmp_path):
    """Ctrl-C in the seconds `import torch` takes printed a KeyboardInterrupt traceback through importlib. A
    stand-in for einops (imported after torch) says when the imports are under way, then waits."""
    (tmp_path / "einops.py").write_text("import sys, time\nprint('importing', file=sys.stderr, flush=True)\n"
                                        "time.sleep(60)\n")
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    for script in ("sd35_lora.py", "sample.py"):
        p = subprocess.Popen([sys.executable, str(ROOT / script), "--help"], stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": path})
        assert p.stderr.readline() == "importing\n"
        p.send_signal(signal.SIGINT)
        err = p.communicate(timeout=60)[1]
        assert p.returncode == -signal.SIGINT and "Traceback" not in err, err    # as a shell shows it: 130


def test_once_imported_the_clis_take_ctrl_c_as_python_does(tmp_path):
    """The CLIs let Ctrl-C end them at once while torch imports; left so, Ctrl-C in training would kill the run
    without its checkpoint and the line saying so. main() (here argparse's --help) runs with Python's handler."""
    code = ("import argparse, runpy, signal, sys; sys.argv = sys.argv[1:]; argparse.ArgumentParser.print_help = "
            "lambda self, file=None: print(signal.getsignal(signal.SIGINT)); "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    for script in ("sd35_lora.py", "sample.py"):
        r = run_cli("-c", code, str(ROOT / script), "--help")
        assert r.returncode == 0 and "default_int_handler" in r.stdout, r


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT and SIGTERM")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("ignored", [False, True])
@pytest.mark.parametrize("cli", [["sd35_lora.py", "--set", "train.lr=-1"],
                                 ["sample.py", "--model", "tiny", "--prompt", "a", "--width", "33"]])
def test_ctrl_c_or_sigterm_as_the_clis_exit_prints_no_traceback(cli, ignored, sig, tmp_path):
    """Ctrl-C just as a run ended ("done: ..." or "saved to ..." printed, every file written) met Python's
    handler while Python shut down: torch's atexit callback printed "Exception ignored ... Traceback ...
    KeyboardInterrupt". Ended as while torch imports: at once, no traceback; where it was ignored (a shell
    script's `job &`), it still is. SIGTERM alike: sample.py was ended by one its parent had set to be ignored
    (143, not its own code). Here the signal comes in an atexit callback, after an error's line."""
    code = ("import atexit, os, runpy, signal, sys; sys.argv = sys.argv[1:]; "
            f"signal.signal({int(sig)}, signal.SIG_IGN) if {ignored} else None; "
            f"atexit.register(lambda: os.kill(os.getpid(), {int(sig)}) or sum(range(10 ** 6))); "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    out = ["--out", str(tmp_path)] if cli[0] == "sample.py" else []      # else it makes samples/ in the repo
    r = run_cli("-c", code, str(ROOT / cli[0]), *cli[1:], *out)
    assert r.returncode == (1 if ignored else -sig) and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr


def test_a_path_too_long_for_windows_is_an_error_that_says_so(tmp_path, monkeypatch):
    """Windows (long paths off) refuses a path of 260 characters or more, as not found (WinError 3 or 206): a
    deep sample or cache file failed with "free disk space or choose another folder"."""
    refusal = FileNotFoundError(2, "No such file or directory")         # as Windows does, whatever the disk holds
    def refuse(self, *args, **kwargs):
        raise refusal
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(Path, "write_text", refuse)
    deep = tmp_path / ("d" * 120) / ("e" * 120) / "caption.txt"
    one_line_error(lambda: sd._atomic_save("a fox", deep), r"\(No such file or directory\): its path, \d+ characters as "
                   r"the temporary file written first, is too long for Windows \(259 at most\): enable long paths "
                   r"\(LongPathsEnabled\) or choose another folder")
    one_line_error(lambda: sd._atomic_save("a fox", tmp_path / "caption.txt"), r"\): choose another folder")
    refusal = OSError(28, "No space left on device")                    # a full disk there: as before
    one_line_error(lambda: sd._atomic_save("a fox", deep), r"\(No space left on device\): free disk space or choose")
    for code, why in [(30, "Read-only file system"), (36, "File name too long")]:      # no space to free there
        refusal = OSError(code, why)
        one_line_error(lambda: sd._atomic_save("a fox", tmp_path / "caption.txt"), rf"\({why}\): choose another")


def test_a_path_too_long_for_windows_names_the_length_of_the_temporary_file_it_is_written_as(tmp_path, monkeypatch):
    """A file is written first as a temporary file beside it, whose name is 15 characters and the process id longer:
    Windows refused a 245-character path (its temporary file: over 259), and the error said that the path, 245
    characters, was too long for Windows (260 characters). It names the length Windows refused."""
    real_write = Path.write_text

    def as_windows(self, *args, **kwargs):                  # long paths off: 260 characters or more are refused
        if len(os.path.abspath(self)) >= 260:
            raise FileNotFoundError(2, "No such file or directory")
        return real_write(self, *args, **kwargs)
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(Path, "write_text", as_windows)
    folder, extra = tmp_path / ("d" * 100), 15 + len(str(os.getpid()))         # ".NAME.PID-8hex.tmp"
    fits = folder / ("f" * (259 - extra - len(str(folder)) - 1))                 # its temporary file: 259
    sd._atomic_save("a fox", fits)
    assert fits.read_text() == "a fox"
    refused = folder / ("r" * (245 - len(str(folder)) - 1))
    one_line_error(lambda: sd._atomic_save("a fox", refused), rf"\(No such file or directory\): its path, {245 + extra} "
                   r"characters as the temporary file written first, is too long for Windows \(259 at most\): enable "
                   r"long paths \(LongPathsEnabled\) or choose another folder")


def test_the_clis_run_without_a_console_as_pythonw_starts_them(tmp_path):
    """pythonw (Windows, a shortcut or a scheduled task) gives a script no stdout or stderr: both are None.
    Both CLIs died at once on sys.stdout.reconfigure (AttributeError), and a progress bar on its first write."""
    def pythonw(script: str, *args) -> subprocess.CompletedProcess:
        code = ("import os, runpy, sys; sys.stdout = sys.stderr = None; sys.argv = sys.argv[1:]; "
                "sys.path.insert(0, os.path.dirname(sys.argv[0])); runpy.run_path(sys.argv[0], run_name='__main__')")
        return run_cli("-c", code, str(ROOT / script), *args, cwd=tmp_path)
    r = pythonw("sd35_lora.py", "--tiny", "--set", "train.steps=1", "--set", "sample.sample_every=0")
    assert r.returncode == 0 and list((tmp_path / "runs").glob("tiny_*/lora.safetensors")), r
    r = pythonw("sample.py", "--model", "tiny", "--prompt", "a", "--width", "32", "--height", "32", "--steps", "2")
    assert r.returncode == 0 and (tmp_path / "samples/sample_00.png").is_file(), r


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
    # flips and caption dropout are drawn per sample: 32 draws of the stripes hold both kinds (alike: 2^-31)
    item = sd.scan_dataset(cfg.dataset)[1]
    pixels = sd.load_image(item["path"], item["size"])[None]
    cached, empty = load_file(repaired.latent_files[1]), load_file(repaired.empty)["context"]
    assert item["path"].name == "red_stripes.png" and not torch.equal(pixels, pixels.flip(-1))
    for name, image in (("moments", pixels), ("flipped", pixels.flip(-1))):
        torch.testing.assert_close(cached[name], pipe.vae.encode_moments(image)[0])
    pipe.vae.latents_from_moments = lambda moments, noise: moments               # the cached moments drawn
    for flip, dropout in ((True, 0.5), (False, 0.0)):
        dataset = dataclasses.replace(cfg.dataset, flip=flip, caption_dropout=dropout)
        drawn = dataclasses.replace(cfg, dataset=dataset)
        moments, context, _ = repaired.get([1] * 32, pipe.vae, drawn, torch.Generator().manual_seed(0))
        flipped = [torch.equal(m, cached["flipped"]) for m in moments]
        assert all(f or torch.equal(m, cached["moments"]) for f, m in zip(flipped, moments))
        dropped = [torch.equal(c, empty) for c in context]
        assert set(flipped) == {False, flip} and set(dropped) == {False, dropout > 0}, (flipped, dropped)


def test_the_empty_caption_is_encoded_once_on_a_fresh_cache(tmp_path, monkeypatch):
    """The empty caption (caption dropout's) was encoded twice into a new cache: once for the layout each
    caption's file is checked against, once more to be cached."""
    sd.write_demo_dataset(tmp_path / "data")
    cfg, pipe = tiny_config(tmp_path), sd.tiny_pipeline(t5_length=16)
    encoded, real_encode = [], pipe.text.encode
    monkeypatch.setattr(pipe.text, "encode", lambda prompts: encoded.extend(prompts) or real_encode(prompts))
    data = sd.LatentDataset(sd.scan_dataset(cfg.dataset), pipe, cfg, cfg.model)
    assert sorted(encoded) == ["", "blue disc", "red stripes"]
    context, pooled = real_encode([""])
    assert torch.equal(load_file(data.empty)["context"], context[0]) and torch.equal(load_file(data.empty)["pooled"],
                                                                                       pooled[0])


def test_a_caption_many_images_share_is_read_from_the_cache_once(tmp_path, monkeypatch):
    """Each image re-read its caption's cache file: a trigger-word dataset of 20,000 images captioned alike read
    one file (2.7 MB at SD3.5's T5 length) 20,000 times, to check it, at every start."""
    (tmp_path / "data").mkdir()
    for i in range(5):
        Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(tmp_path / "data" / f"{i}.png")
    cfg, pipe = tiny_config(tmp_path, **{"dataset.default_caption": "sks dog"}), sd.tiny_pipeline(t5_length=16)
    sd.LatentDataset(sd.scan_dataset(cfg.dataset), pipe, cfg, cfg.model)
    read, real_open = [], sd.safe_open              # the check reads a file's header (this version's files)
    monkeypatch.setattr(sd, "safe_open", lambda path, **kw: read.append(Path(path).parent.name) or real_open(path, **kw))
    again = sd.LatentDataset(sd.scan_dataset(cfg.dataset), pipe, cfg, cfg.model)
    assert read.count("latents") == 5 and read.count("text") == 2          # "sks dog" and the empty caption
    assert len(set(again.text_files)) == 1 and len(again.text_files) == 5


def test_a_second_start_reads_this_versions_cache_files_by_their_header_only(tmp_path, monkeypatch, capsys):
    """Every start read each cache file in full to check it for NaN (~100 GB for 20,000 images: minutes, 10+ on a
    NAS). Files this version wrote refused NaN before writing and say so: their header is checked (names, shapes,
    dtypes); an older version's file is read in full, as before, and kept. A flip's batch reads one of two latents."""
    sd.write_demo_dataset(tmp_path / "data")
    cfg, pipe = tiny_config(tmp_path, **{"dataset.flip": True}), sd.tiny_pipeline(t5_length=16)
    build = lambda: sd.LatentDataset(sd.scan_dataset(cfg.dataset), pipe, cfg, cfg.model)
    data = build()
    read, real_load = [], sd.load_file
    monkeypatch.setattr(sd, "load_file", lambda path: read.append(Path(path).parent.name) or real_load(path))
    build()
    assert read == []
    older = {k: v.clone() for k, v in real_load(data.latent_files[0]).items()}
    save_file(older, data.latent_files[0])                                        # unmarked: an older version's
    save_file({"moments": older["moments"][:, :4].clone(), "flipped": older["flipped"][:, :4].clone()},
              data.latent_files[1], sd.CHECKED_FINITE)                            # marked, but of other shapes
    capsys.readouterr()
    build()
    assert read == ["latents"] and capsys.readouterr().err.count("its tensors are not those this run writes") == 1
    for path in data.latent_files[1:]:
        with sd.safe_open(str(path), framework="pt") as f:
            assert f.metadata() == sd.CHECKED_FINITE and f.get_slice("moments").get_shape() == [32, 8, 8]
    torch.testing.assert_close(real_load(data.latent_files[0]), older)
    read.clear()
    build()
    assert read == ["latents"]                          # the older file still: read in full, not rewritten
    read.clear()
    pipe.vae.latents_from_moments = lambda moments, noise: moments
    moments, _, _ = data.get([0, 1, 0, 1], pipe.vae, cfg, torch.Generator().manual_seed(0))
    assert "latents" not in read
    for i, m in zip([0, 1, 0, 1], moments):
        cached = real_load(data.latent_files[i])
        assert torch.equal(m, cached["moments"]) or torch.equal(m, cached["flipped"])


def test_a_cache_file_is_read_by_its_header_only_where_it_has_this_versions_mark(tmp_path, monkeypatch):
    """A cache file is checked by its header alone (names, shapes, dtypes: not computed again) where it carries
    this version's mark, for each dtype a cache holds (bf16 or fp16 text embeddings; float64 from Python).
    Another tool's metadata (its "format", or this key with another value) is no mark: a file holding NaN under
    it is read in full and rebuilt; a file of other shapes is rebuilt without being read."""
    read, real_load = [], sd.load_file
    monkeypatch.setattr(sd, "load_file", lambda path: read.append(path) or real_load(path))
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        path, layout = tmp_path / f"{dtype}.safetensors", {"t": ((2, 3), dtype)}
        sd.cached(path, lambda: {"t": torch.ones(2, 3, dtype=dtype)}, layout=layout)
        assert sd.cached(path, pytest.fail, layout=layout) == path and read == []
    path, layout = tmp_path / "other.safetensors", {"t": ((2, 3), torch.float32)}
    for metadata in ({"format": "pt"}, {"sd35_lora": "checked"}):
        save_file({"t": torch.full((2, 3), math.nan)}, path, metadata)
        sd.cached(path, lambda: {"t": torch.ones(2, 3)}, layout=layout)
        assert torch.equal(real_load(path)["t"], torch.ones(2, 3)) and read.pop() == str(path)
    save_file({"t": torch.ones(3, 2)}, path)                                # unmarked, of other shapes
    sd.cached(path, lambda: {"t": torch.ones(2, 3)}, layout=layout)
    assert read == [] and real_load(path)["t"].shape == (2, 3)


def test_a_cache_file_damaged_after_it_was_written_is_named_when_a_batch_reads_it(tmp_path):
    """A cache file this version wrote is checked by its header alone at start: one damaged on disk since (NaN
    bytes under an intact header) trained into 'loss became nan ...: lower train.lr or check the data', at the
    same step again on every --resume. The batch that reads it names the file to delete."""
    sd.write_demo_dataset(tmp_path / "data")
    cfg, pipe = tiny_config(tmp_path), sd.tiny_pipeline(t5_length=16)
    data = sd.LatentDataset(sd.scan_dataset(cfg.dataset), pipe, cfg, cfg.model)
    for damaged in (data.latent_files[1], data.text_files[0]):
        good = damaged.read_bytes()
        start = 8 + struct.unpack("<Q", good[:8])[0]                         # the header, then the tensors
        damaged.write_bytes(good[:start] + b"\xff" * (len(good) - start))     # NaN in every float dtype
        with pytest.raises(sd.UserError, match=f"cache file {re.escape(str(damaged))} holds NaN/inf") as error:
            data.get([0, 1], pipe.vae, cfg, torch.Generator().manual_seed(0))
        assert error.value.own                                      # torchrun: printed by the process that met it
        damaged.write_bytes(good)


def test_a_cache_file_deleted_or_cut_short_after_it_was_written_is_named_when_a_batch_reads_it(tmp_path):
    """A cache file deleted while the run trained (a clean-up of a shared cache) ended it with 'No such file or
    directory: ...: free disk space (or fix the path)'; one cut short since it was written, with a bare
    SafetensorError traceback. The batch that reads it names the file; the next start rebuilds it."""
    sd.write_demo_dataset(tmp_path / "data")
    cfg, pipe = tiny_config(tmp_path), sd.tiny_pipeline(t5_length=16)
    data = sd.LatentDataset(sd.scan_dataset(cfg.dataset), pipe, cfg, cfg.model)
    for damaged in (data.latent_files[1], data.text_files[0]):
        good = damaged.read_bytes()
        for damage in (lambda: damaged.write_bytes(good[:100]), lambda: damaged.write_bytes(good[:-10]),
                       damaged.unlink):
            damage()
            with pytest.raises(sd.UserError, match=rf"^cache file {re.escape(str(damaged))} cannot be read "
                                                   rf"\(.*\): run again .*rebuilds it$") as error:
                data.get([0, 1], pipe.vae, cfg, torch.Generator().manual_seed(0))
            assert error.value.own and "\n" not in str(error.value)
            damaged.write_bytes(good)


def test_each_image_is_hashed_once_per_start_into_the_same_keys(tmp_path, monkeypatch):
    """Every start hashed each image's bytes twice, for its cache key and for the dataset's digest (which a resume
    compares): 73 s more per start for 20,000 12-megapixel photos. The keys and the digest stay as they were."""
    (tmp_path / "data").mkdir()
    for i, caption in enumerate(["a", "b"]):
        noise = np.random.default_rng(i).integers(0, 256, (128, 128, 3), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / "data" / f"{i}.png")
        (tmp_path / "data" / f"{i}.txt").write_text(caption)
    cfg, pipe = tiny_config(tmp_path, **{"dataset.resolution": 128}), sd.tiny_pipeline(t5_length=16)
    items = sd.scan_dataset(cfg.dataset)
    data = sd.LatentDataset(items, pipe, cfg, cfg.model)
    images = [item["path"].read_bytes() for item in items]
    assert data.contents == sd._digest(*[sd._digest(image, item["caption"]) for image, item in zip(images, items)])
    vae_id = sd._digest(sd._weights_digest(pipe.vae), cfg.dtype, json.dumps(dataclasses.asdict(pipe.vae.cfg)),
                        "crop-then-resize", "alpha-on-white")
    assert [f.stem for f in data.latent_files] == [sd._digest(image, (128, 128), False, vae_id) for image in images]
    hashed, real_sha256 = [], hashlib.sha256

    class Sha256:                                       # hashlib's, counting the bytes it is given
        def __init__(self, data=b""):
            self.real = real_sha256(data)
            hashed.append(len(data))

        def update(self, data):
            hashed.append(len(data))
            self.real.update(data)

        def __getattr__(self, name):
            return getattr(self.real, name)
    monkeypatch.setattr(sd, "_weights_digest", lambda module: "the VAE")        # its weights' bytes not counted
    monkeypatch.setattr(hashlib, "sha256", Sha256)
    sd.LatentDataset(items, pipe, cfg, cfg.model)
    assert sum(hashed) < 1.2 * sum(map(len, images)), (sum(hashed), sum(map(len, images)))


def test_text_cache_is_not_reused_after_a_text_encoder_file_is_swapped(single_files, tmp_path):
    """The cache is keyed by the text_encoders folder; a file swapped in it (a fine-tuned clip_l under the
    same name, a t5xxl_fp16 added beside the fp8 one, which it then replaces) must give new embeddings."""
    root, _ = single_files
    sd.write_demo_dataset(tmp_path / "data")
    (tmp_path / "enc").mkdir()
    for name in ("clip_g.safetensors", "tokenizer", "tokenizer_2", "tokenizer_3"):
        (tmp_path / "enc" / name).symlink_to(root / "clip" / name)
    t5 = load_file(root / "clip/t5xxl_fp16.safetensors")
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in t5.items()}, tmp_path / "enc/t5xxl_fp8_e4m3fn.safetensors")
    clip_l = load_file(root / "clip/clip_l.safetensors")
    save_file(clip_l, tmp_path / "enc/clip_l.safetensors")
    cfg = tiny_config(tmp_path, model=str(root / "aio" / ALL_IN_ONE), text_encoders=str(tmp_path / "enc"))

    first = cached_captions(cfg)
    clip_l["text_model.embeddings.token_embedding.weight"].mul_(2)         # a fine-tune, same name and size
    save_file(clip_l, tmp_path / "enc/clip_l.safetensors")
    second = cached_captions(cfg)
    (tmp_path / "enc/t5xxl_fp16.safetensors").symlink_to(root / "clip/t5xxl_fp16.safetensors")
    third = cached_captions(cfg)
    assert not set(first) & set(second) and not set(second) & set(third)
    os.utime(tmp_path / "enc/clip_l.safetensors", (1, 1))     # a copy on another machine (torchrun): the same
    assert cached_captions(cfg) == third


def test_a_lora_trained_on_a_single_file_samples_with_its_text_encoders_and_vae(single_files, tmp_path, capsys):
    """A LoRA trained on a single-file MMDiT with text_encoders: and vae: recorded only the model: `sample.py --lora
    x` stopped with 'holds no text encoders: pass --text-encoders'. They are recorded now, and used (and printed)
    when neither --model nor their flag is given; a hostile file's (not text, or control characters that would
    hide them when printed) are not."""
    root, _ = single_files
    sd.write_demo_dataset(tmp_path / "data")
    official_single_file(root / "diffusers", tmp_path / "both.safetensors")
    save_file({k: v for k, v in load_file(tmp_path / "both.safetensors").items() if k.startswith("model.")},
              tmp_path / "mmdit.safetensors")                                       # no VAE, no text encoders
    text, vae = str(root / "clip"), str(root / "diffusers")
    lora = sd.train(tiny_config(tmp_path, model=str(tmp_path / "mmdit.safetensors"), text_encoders=text, vae=vae,
                                **{"train.steps": 1, "sample.sample_every": 0, "sample.prompts": []}))
    capsys.readouterr()
    args = ["--prompt", "a cat", "--steps", "1", "--width", "32", "--height", "32", "--out", str(tmp_path / "out")]
    paths = sample.main(["--lora", str(lora), *args])
    out = capsys.readouterr().out
    assert f"--text-encoders {text} (the --lora's, as trained" in out and f"--vae {vae} (the --lora's" in out
    parameters = json.loads(Image.open(paths[0]).text["parameters"])
    assert (parameters["model"], parameters["text_encoders"], parameters["vae"]) == (str(tmp_path / "mmdit.safetensors"),
                                                                                     text, vae)
    sample.main(["--lora", str(lora), "--text-encoders", vae, *args])                # the user's flag wins
    assert "--text-encoders" not in capsys.readouterr().out
    one_line_error(lambda: sample.main(["--lora", str(lora), "--model", str(tmp_path / "mmdit.safetensors"), *args]),
                   "holds no text encoders: pass --text-encoders")                 # the user's model: theirs alone
    tensors, header = sd.read_safetensors(lora, with_metadata=True)
    for hostile in ({"text_encoders": text + "\x1b[2K", "vae": vae}, {"text_encoders": [text], "vae": vae}):
        info = {**json.loads(header["sd35_lora"]), **hostile}
        save_file(tensors, tmp_path / "hostile.safetensors", {**header, "sd35_lora": json.dumps(info)})
        one_line_error(lambda: sample.main(["--lora", str(tmp_path / "hostile.safetensors"), *args]),
                       "holds no text encoders: pass --text-encoders")


def cached_captions(cfg: sd.Config) -> list:
    """The text cache files of cfg's dataset, after checking that the cached empty caption is what the text
    encoders give now."""
    pipe = sd.load_pipeline(cfg.model, cfg.text_encoders, device="cpu", dtype="fp32", t5_length=16)
    data = sd.LatentDataset(sd.scan_dataset(cfg.dataset), pipe, cfg, cfg.model)
    cached = load_file(data.empty)
    torch.testing.assert_close((cached["context"], cached["pooled"]), [e[0] for e in pipe.text.encode([""])])
    return data.text_files


def copied_text_encoders(root: Path, tmp_path: Path) -> sd.Config:
    """A tiny run's config whose text encoders are a copy of the diffusers folder's (tmp_path/enc), to edit."""
    sd.write_demo_dataset(tmp_path / "data")
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
        (tmp_path / "enc" / name).mkdir(parents=True)
        for f in (root / "diffusers" / name).iterdir():
            (tmp_path / "enc" / name / f.name).write_bytes(f.read_bytes())
    cfg = tiny_config(tmp_path, model=str(root / "aio" / ALL_IN_ONE), text_encoders=str(tmp_path / "enc"))
    return cfg


def test_text_cache_is_not_reused_after_a_diffusers_text_encoder_is_replaced(single_files, tmp_path):
    """text_encoders (or model) as a diffusers folder or hub snapshot: the cache was keyed by its path alone, so a
    fine-tuned text encoder copied over it trained on the old one's cached embeddings. Its weight files key it now."""
    root, pipe = single_files
    cfg = copied_text_encoders(root, tmp_path)

    first = cached_captions(cfg)
    assert cached_captions(cfg) == first                                                  # reused while nothing changed
    clip_l = load_file(tmp_path / "enc/text_encoder/model.safetensors")
    clip_l["text_model.embeddings.token_embedding.weight"].mul_(2)         # a fine-tune, same path and size
    save_file(clip_l, tmp_path / "enc/text_encoder/model.safetensors")
    second = cached_captions(cfg)
    (tmp_path / "enc/text_encoder_3/model.safetensors").unlink()              # T5 as shards, one of them tuned
    with torch.no_grad():
        t5 = pipe.text_encoder_3.__class__(pipe.text_encoder_3.config)
        t5.load_state_dict(pipe.text_encoder_3.state_dict())
        t5.encoder.final_layer_norm.weight.mul_(2)
    t5.save_pretrained(tmp_path / "enc/text_encoder_3", max_shard_size="100KB")
    assert len(list((tmp_path / "enc/text_encoder_3").glob("model-*.safetensors"))) > 1
    third = cached_captions(cfg)
    assert not set(first) & set(second) and not set(second) & set(third)


def test_a_diffusers_folder_saved_as_the_fp16_variant_alone_loads(single_files, tmp_path):
    """A folder saved with variant="fp16" (or downloaded with only its fp16 files) holds model.fp16.safetensors
    and diffusion_pytorch_model.safetensors.index.fp16.json with fp16 shards: it was 'no model.safetensors in'."""
    root, pipe = single_files
    for part in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        component = getattr(pipe, part)
        shards = "200KB" if part in ("transformer", "text_encoder_3") else "10GB"        # both layouts
        component.to(torch.float16).save_pretrained(tmp_path / part, variant="fp16", max_shard_size=shards)
        component.float()
    for name in ("vae", "tokenizer", "tokenizer_2", "tokenizer_3"):
        (tmp_path / name).symlink_to(root / "diffusers" / name)
    (tmp_path / "model_index.json").write_bytes((root / "diffusers/model_index.json").read_bytes())
    assert list(tmp_path.glob("text_encoder/model.fp16.safetensors"))
    assert list(tmp_path.glob("transformer/diffusion_pytorch_model.safetensors.index.fp16.json"))
    got, want = sd.load_pipeline(str(tmp_path), device="cpu"), sd.load_pipeline(str(root / "diffusers"), device="cpu")
    for a, b in ((got.mmdit, want.mmdit), (got.text.t5, want.text.t5), (got.text.clip_l, want.text.clip_l)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y.half().float()), name


def test_the_variant_of_a_large_model_folder_is_turbo_where_its_path_says_so(diffusers_folder, tmp_path):
    """Large Turbo has Large's shapes: "turbo" in the model's path tells them apart, and picks Turbo's preset (4
    steps, no CFG; with Large's 40 steps at cfg 4.5 a Turbo's images come out over-guided)."""
    folder, _ = diffusers_folder
    turbo = tmp_path / "stable-diffusion-3.5-large-turbo"
    turbo.mkdir()
    for part in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
        (turbo / part).symlink_to(folder / part)
    make_components("sd3.5-large")["transformer"].save_pretrained(turbo / "transformer", safe_serialization=True)
    assert sd.load_pipeline(str(turbo), device="cpu").variant == "sd3.5-large-turbo"
    (tmp_path / "large").symlink_to(turbo)
    assert sd.load_pipeline(str(tmp_path / "large"), device="cpu").variant == "sd3.5-large"


def test_a_turbo_file_named_in_capitals_takes_turbos_presets():
    """Files are renamed (SD3.5-Large-Turbo.safetensors in a ComfyUI folder): "turbo" is found in any case."""
    large = sd.MMDiTConfig(depth=38, hidden=2432, heads=38, pos_embed_max_size=192)
    assert large.variant("models/SD3.5-Large-TURBO.safetensors") == "sd3.5-large-turbo"
    assert large.variant("models/SD3.5-Large.safetensors") == "sd3.5-large"


def test_text_cache_is_not_reused_after_a_tokenizer_is_replaced(single_files, tmp_path):
    """A tokenizer*/ folder changed in place (another T5 tokenizer copied over) reused the cached embeddings of
    the old one's token ids: the cache was keyed by the text encoders' weight and config files alone."""
    root, _ = single_files
    cfg = copied_text_encoders(root, tmp_path)
    first = cached_captions(cfg)
    file = tmp_path / "enc/tokenizer_3/tokenizer.json"
    tokenizer = json.loads(file.read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["red"], vocab["fox"] = vocab["fox"], vocab["red"]                  # same size, other ids
    file.write_text(json.dumps(tokenizer))
    assert not set(first) & set(cached_captions(cfg))


def test_nan_encodings_are_refused_and_never_cached(tmp_path):
    """A damaged (or overflowing) VAE or text encoder: the image or caption is named, nothing is cached (a
    cached NaN would come back in every later run with the same settings, as a NaN loss blamed on the lr)."""
    sd.write_demo_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path)
    for part, match, folder in (("vae", r"encoding .*blue_disc.png gave NaN/inf", "latents"),
                                ("t5", "encoding the caption '", "text")):
        pipe = sd.tiny_pipeline(t5_length=16)
        next(p for p in getattr(pipe.text if part == "t5" else pipe, part).parameters() if p.ndim > 1).fill_(math.nan)
        one_line_error(lambda: sd.LatentDataset(sd.scan_dataset(cfg.dataset), pipe, cfg, cfg.model), match)
        assert not list((tmp_path / "cache" / folder).glob("*.safetensors"))


def test_an_image_deleted_or_replaced_after_the_scan_is_named_in_one_line(tmp_path, monkeypatch):
    """Models load (minutes) between the dataset scan and caching. An image deleted meanwhile got main()'s
    advice 'free disk space', one replaced by an image over sd.MAX_PIXELS a traceback."""
    sd.write_demo_dataset(tmp_path / "data")
    cfg, pipe = tiny_config(tmp_path), sd.tiny_pipeline(t5_length=16)
    items = sd.scan_dataset(cfg.dataset)
    (tmp_path / "data/blue_disc.png").unlink()
    one_line_error(lambda: sd.LatentDataset(items, pipe, cfg, cfg.model),
                   r"image .*blue_disc.png cannot be read \(No such file or directory\).*run again")
    (tmp_path / "data/blue_disc.png").write_bytes(b"not an image: a copy cut short")
    one_line_error(lambda: sd.LatentDataset(items, pipe, cfg, cfg.model),
                   r"image .*blue_disc.png cannot be read \(cannot identify image file '.*blue_disc.png'\)")
    Image.new("RGB", (80, 80)).save(tmp_path / "data/red_stripes.png")
    monkeypatch.setattr(sd, "MAX_PIXELS", 5000)                # 6400 px: over the limit, not decoded
    one_line_error(lambda: sd.LatentDataset(items[1:], pipe, cfg, cfg.model),
                   r"image .*red_stripes.png cannot be read \(over 0.005 megapixels\)")


def test_an_image_this_process_read_but_cannot_cache_is_its_own_error(tmp_path, monkeypatch):
    """Under torchrun each process caches its share of the images: one whose bytes it read but cannot decode (cut
    short, or over the pixel limit) is this process's own error, which main() has it print: said as an error all
    processes meet (printed by each machine's first alone), one met by another process was never printed."""
    sd.write_demo_dataset(tmp_path / "data")
    cfg, pipe = tiny_config(tmp_path), sd.tiny_pipeline(t5_length=16)
    items = sd.scan_dataset(cfg.dataset)
    (tmp_path / "data/blue_disc.png").write_bytes(b"not an image: a copy cut short")
    with pytest.raises(sd.UserError, match="blue_disc.png cannot be read") as e:
        sd.LatentDataset(items, pipe, cfg, cfg.model)
    assert e.value.own
    Image.new("RGB", (80, 80)).save(tmp_path / "data/red_stripes.png")
    monkeypatch.setattr(sd, "MAX_PIXELS", 5000)                # 6400 px: over the limit, not decoded
    with pytest.raises(sd.UserError, match="red_stripes.png cannot be read") as e:
        sd.LatentDataset(items[1:], pipe, cfg, cfg.model)
    assert e.value.own


def test_an_image_the_scan_memo_vouched_for_that_caching_cannot_read_is_scanned_anew_next_run(tmp_path, monkeypatch,
                                                                                            capsys):
    """The scan does not decode an image its memo remembers. One that cannot be read when cached (a file another
    user cannot read in a shared cache_dir, a WebP where this Pillow lacks WebP) failed with 'run again to scan
    anew', and every run again trusted the memo and failed the same way."""
    sd.write_demo_dataset(tmp_path / "data")
    (tmp_path / "cache").mkdir()
    cfg, pipe = tiny_config(tmp_path), sd.tiny_pipeline(t5_length=16)
    assert len(sd.scan_dataset(cfg.dataset)) == 2 and (tmp_path / "cache" / sd.SCAN_MEMO).exists()
    real_open = sd.open_image

    def unreadable(path, *a):                       # from now on, as for this user (or this Pillow)
        if path.name == "blue_disc.png":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a)
    monkeypatch.setattr(sd, "open_image", unreadable)
    items = sd.scan_dataset(cfg.dataset)
    assert len(items) == 2                                                  # the memo vouched for it
    one_line_error(lambda: sd.LatentDataset(items, pipe, cfg, cfg.model),
                   r"image .*blue_disc.png cannot be read \(Permission denied\).*run again to scan anew")
    items = sd.scan_dataset(cfg.dataset)                                    # run again
    assert [item["path"].name for item in items] == ["red_stripes.png"]
    assert "skipped 1 unreadable image: blue_disc.png (PermissionError)" in capsys.readouterr().err
    assert len(sd.LatentDataset(items, pipe, cfg, cfg.model).latent_files) == 1


def test_exif_rotated_photo_gets_a_portrait_bucket(tmp_path):
    image = Image.new("RGB", (128, 64), (200, 30, 30))
    image.paste((30, 30, 200), (64, 0, 128, 64))                # stored: red left half, blue right half
    exif = image.getexif()
    exif[274] = 6                                                            # stored landscape, shown portrait
    image.save(tmp_path / "phone.jpg", exif=exif)
    (item,) = sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path), resolution=256))
    width, height = item["size"]
    pixels = sd.load_image(item["path"], item["size"])
    assert height > width and pixels.shape == (3, height, width)
    # shown turned 90 degrees clockwise: red on top, blue below (unturned, the crop is red left, blue right)
    top, bottom = pixels[:, : height // 4].mean((1, 2)), pixels[:, -height // 4:].mean((1, 2))
    assert top[0] > 0.3 > top[2] and bottom[2] > 0.3 > bottom[0], (top, bottom)


def test_an_image_gets_the_bucket_that_crops_least_of_it(tmp_path):
    """Buckets are compared by log aspect ratio, whose distance is the share a centre crop cuts: 110:160 at
    resolution 512 keeps 88.4 % in 448x576 (nearer in log), 87.3 % in 384x640 (nearer in plain ratio)."""
    Image.new("RGB", (220, 320), "red").save(tmp_path / "portrait.png")
    (item,) = sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path), resolution=512))
    assert item["size"] == (448, 576)


def test_images_are_downscaled_filtered_not_point_sampled():
    """load_image resizes with a bicubic filter: a fine pattern averages out (nearest-neighbour sampling
    keeps one of its colours: aliasing, moire on fabrics and fences)."""
    checkerboard = Image.fromarray(((np.indices((256, 256)).sum(0) % 2) * 255).astype(np.uint8)).convert("RGB")
    data = io.BytesIO()
    checkerboard.save(data, "PNG")
    pixels = sd.load_image(Path("checkerboard.png"), (64, 64), data.getvalue())
    assert pixels.abs().max() < 0.1                 # mid grey everywhere: 0 in [-1, 1]


def test_an_epoch_batches_every_image_once_within_its_bucket():
    """LatentDataset.batches: each image exactly once per epoch, a batch never mixes buckets, batches of
    batch_size except each bucket's last, and another epoch seed another order."""
    data = sd.LatentDataset.__new__(sd.LatentDataset)
    data.sizes = [(64, 64)] * 5 + [(128, 64)] * 3 + [(64, 128)]
    for batch_size in (1, 2, 3):
        epoch = data.batches(batch_size, epoch_seed=4)
        assert sorted(i for batch in epoch for i in batch) == list(range(len(data.sizes)))
        assert all(len({data.sizes[i] for i in batch}) == 1 and len(batch) <= batch_size for batch in epoch)
        per_bucket = collections.Counter(data.sizes[batch[0]] for batch in epoch)
        assert per_bucket == {(64, 64): -(-5 // batch_size), (128, 64): -(-3 // batch_size), (64, 128): 1}
    assert data.batches(1, 4) == data.batches(1, 4) != data.batches(1, 5)
    data.sizes = [(64, 64)] * 6                   # one bucket: which images share a batch changes per epoch too
    assert len({frozenset(map(frozenset, data.batches(2, seed))) for seed in range(8)}) > 1
    data.sizes = [(64, 64)] * 8 + [(128, 64)] * 8      # the buckets' batches mixed, not one bucket after the other
    for seed in range(4):
        order = [data.sizes[batch[0]] for batch in data.batches(1, seed)]
        assert sum(a != b for a, b in zip(order, order[1:])) > 1, order


def test_an_epoch_seed_past_2_to_the_64_wraps_and_every_seed_draws_its_own_order():
    """train.seed may be 2**64 - 1, so seed + epoch passes the generator's range: it wraps modulo 2**64 (epoch
    2**64 + 4 orders as 4) instead of failing in the second epoch; seeds of one parity still differ."""
    data = sd.LatentDataset.__new__(sd.LatentDataset)
    data.sizes = [(64, 64)] * 12
    assert data.batches(1, 2**64 + 4) == data.batches(1, 4) != data.batches(1, 6)


def test_a_batch_trains_on_sampled_latents_and_drops_captions_at_the_configured_rate(tmp_path):
    """LatentDataset.get: latents drawn from the cached posterior (mean 0, log-variance 0 here: N(0, 1), then
    (z - 0.0609) * 1.5305), not its mean; the empty caption's embeddings in place of a caption at caption_dropout."""
    data = sd.LatentDataset.__new__(sd.LatentDataset)
    save_file({"moments": torch.zeros(32, 2, 2)}, tmp_path / "image.safetensors")
    for name, value in (("caption", 1.0), ("empty", 0.0)):
        save_file({"context": torch.full((3, 4), value), "pooled": torch.full((5,), value)},
                  tmp_path / f"{name}.safetensors")
    data.latent_files, data.text_files = [tmp_path / "image.safetensors"], [tmp_path / "caption.safetensors"]
    data.empty, cfg, ids = tmp_path / "empty.safetensors", sd.Config(), [0] * 200
    scales = types.SimpleNamespace(cfg=sd.VAEConfig())                    # the VAE's latent scale and shift
    vae = types.SimpleNamespace(latents_from_moments=lambda *a, **k: sd.VAE.latents_from_moments(scales, *a, **k))
    for dropout, kept in ((0.0, 1.0), (1.0, 0.0), (0.5, None)):
        cfg.dataset.caption_dropout = dropout
        latents, context, pooled = data.get(ids, vae, cfg, torch.Generator().manual_seed(0))
        assert latents.shape == (200, 16, 2, 2) and abs(latents.std() - 1.5305) < 0.05
        assert abs(latents.mean() + 0.0609 * 1.5305) < 0.05 and context.amax((1, 2)).equal(pooled.amax(1))
        share_kept = pooled.amax(1).mean().item()
        assert share_kept == kept if kept is not None else 0.4 < share_kept < 0.6


def test_16_bit_grey_png_trains_as_its_picture_not_white(tmp_path):
    grey = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)      # a dark-to-light ramp
    Image.fromarray(grey).save(tmp_path / "ramp16.png")                          # opens in mode I;16
    Image.fromarray((grey / 257).round().astype(np.uint8)).save(tmp_path / "ramp8.png")
    ramp16, ramp8 = (sd.load_image(tmp_path / f"ramp{bits}.png", (64, 64)) for bits in (16, 8))
    assert (ramp16 - ramp8).abs().max() <= 1.5 / 127.5, (ramp16.mean(), ramp8.mean())


def test_32_bit_integer_or_float_images_are_refused_not_trained_as_white_or_black(tmp_path):
    """A TIFF of 32-bit integers (mode I) or floats (mode F) under an image name (Pillow reads the content)
    trained as white (read as 16-bit, clipped) or black (floats 0..1, clipped): no one range maps them to 8 bits.
    Mode I within 0..65535 is 16-bit grey (as Pillow < 10.3 opens a 16-bit PNG) and trains as before."""
    grey = np.linspace(0, 65535, 64 * 64).reshape(64, 64)
    for array, what in [((grey * 1000).astype(np.int32), "integers"), ((grey / 65535).astype(np.float32), "floats")]:
        Image.fromarray(array).save(tmp_path / "wide.png", format="TIFF")
        assert Image.open(tmp_path / "wide.png").mode in ("I", "F")
        one_line_error(lambda: sd.load_image(tmp_path / "wide.png", (64, 64)),
                       f"image .*wide.png holds 32-bit {what} .*: save it with 8 or 16 bits per channel")
    Image.fromarray(grey.astype(np.int32)).save(tmp_path / "ramp32.png", format="TIFF")
    Image.fromarray((grey / 257).round().astype(np.uint8)).save(tmp_path / "ramp8.png")
    ramp32, ramp8 = (sd.load_image(tmp_path / f"ramp{bits}.png", (64, 64)) for bits in (32, 8))
    assert (ramp32 - ramp8).abs().max() <= 1.5 / 127.5


def test_16_bit_grey_png_with_a_transparent_colour_key_trains_on_white(tmp_path):
    """PNG's tRNS key of a 16-bit grey image is a 16-bit value: the 8-bit image made from it lost it (pixels of
    the key trained grey), or matched it against the 8-bit values (opaque 25700 / 257 = 100 trained white)."""
    for key in (30000, 100):
        grey = np.full((64, 64), 25700, np.uint16)
        grey[:, :32] = key                                                      # left half: transparent
        Image.fromarray(grey).save(tmp_path / "keyed16.png")      # tRNS spliced in after IHDR: Pillow < 10.3
        raw, trns = (tmp_path / "keyed16.png").read_bytes(), b"tRNS" + key.to_bytes(2, "big")  # cannot save it
        (tmp_path / "keyed16.png").write_bytes(raw[:33] + b"\0\0\0\2" + trns + struct.pack(">I", zlib.crc32(trns)) + raw[33:])
        pixels = sd.load_image(tmp_path / "keyed16.png", (64, 64))
        assert (pixels[:, :, :32] == 1).all(), (key, pixels[0, 0, 0])         # on white
        assert (pixels[:, :, 32:] - (100 / 127.5 - 1)).abs().max() < 1e-6, (key, pixels[0, 0, 40])


def test_transparent_pixels_train_as_shown_on_white_not_as_the_colour_stored_under_them(tmp_path):
    """convert('RGB') drops alpha: transparent pixels trained as whatever colour the file stores under them
    (black from most background removers, the erased background from editors that only clear alpha), which
    no viewer shows. They are composited on white; opaque pixels are kept. A 32-bit BMP whose alpha is 0 all
    over has an unused alpha (browsers show its colours): it keeps its colours, not a blank white."""
    cutout = np.zeros((64, 64, 4), np.uint8)
    cutout[..., :3] = (20, 160, 30)                                      # a green background, erased: alpha 0
    cutout[16:48, 16:48] = (30, 60, 250, 255)                            # an opaque blue square
    cutout[:, :8, 3] = 128                                               # half-transparent green edge
    Image.fromarray(cutout).save(tmp_path / "cutout.png")
    Image.fromarray(cutout).convert("LA").save(tmp_path / "grey.png")
    sticker = Image.new("P", (64, 64), 1)                                # palette: 0 blue, 1 red but transparent
    sticker.putpalette([30, 60, 250, 255, 0, 0])
    sticker.paste(0, (16, 16, 48, 48))
    sticker.save(tmp_path / "sticker.png", transparency=1)
    for name in ("cutout.png", "grey.png", "sticker.png"):
        pixels = (sd.load_image(tmp_path / name, (64, 64)) + 1) * 127.5
        assert pixels[:, 32, 8:12].min() >= 254.5, (name, pixels[:, 32, 8:12])          # transparent: white
    pixels = (sd.load_image(tmp_path / "cutout.png", (64, 64)) + 1) * 127.5
    torch.testing.assert_close(pixels[:, 32, 32], torch.tensor([30.0, 60, 250]), atol=0.5, rtol=0)
    torch.testing.assert_close(pixels[:, 32, 2], torch.tensor([20.0, 160, 30]) / 2 + 127.5, atol=1, rtol=0)
    header = struct.pack("<IiiHHIIiiII4I", 124, 64, 64, 1, 32, 3, 64 * 64 * 4, 2835, 2835, 0, 0,
                         0xFF0000, 0xFF00, 0xFF, 0xFF000000).ljust(124, b"\0")     # BITMAPV5HEADER, bitfields
    (tmp_path / "unused_alpha.bmp").write_bytes(b"BM" + struct.pack("<IHHI", 14 + 124 + 64 * 64 * 4, 0, 0, 138)
                                                + header + bytes([30, 60, 250, 0]) * (64 * 64))    # BGRA
    pixels = (sd.load_image(tmp_path / "unused_alpha.bmp", (64, 64)) + 1) * 127.5
    torch.testing.assert_close(pixels[:, 32, 32], torch.tensor([250.0, 60, 30]), atol=0.5, rtol=0)


def test_a_caption_file_of_only_whitespace_trains_unconditioned_and_is_counted(tmp_path, capsys):
    """An empty .txt (a tagger that found nothing, a caption never written) trains as the empty caption, as
    caption dropout does: it may be meant (not the default_caption, which is for images without a .txt), but
    it was silent; it is counted as missing captions are."""
    sd.write_demo_dataset(tmp_path)
    (tmp_path / "blue_disc.txt").write_text(" \r\n\t\n")
    items = sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path), resolution=64, default_caption="a shape"))
    assert [item["caption"] for item in items] == ["", "red stripes"]
    err = capsys.readouterr().err
    assert "1 .txt caption is empty, e.g. blue_disc.txt" in err and "default_caption" in err, err


def test_photos_over_pillows_pixel_limit_train_and_decompression_bombs_are_skipped(tmp_path, monkeypatch, capsys):
    """Pillow's bomb guard (a warning past 89 MP) skipped 200 MP phone photos as 'unreadable'. Up to sd.MAX_PIXELS an
    image trains as it is (the same pixels as before); over it a JPEG is decoded at 1/2..1/8 scale (its cheap
    DCT scaling), any other file is skipped with a warning naming the limit, and a tiny file claiming 50,000 x
    50,000 pixels is never decoded. Both limits are scaled down here (no 200 MP test image)."""
    yy, xx = np.mgrid[0:256, 0:512]
    smooth = np.stack([xx / 2, yy, (xx + yy) / 3], -1).astype(np.uint8)
    Image.fromarray(smooth[:64, :192]).save(tmp_path / "photo.png")
    Image.fromarray(smooth).save(tmp_path / "panorama.jpg", quality=95)
    depth = Image.new("L", (512, 256))                # phones' portrait photos: a JPEG with a depth map (MPO)
    Image.fromarray(smooth).save(tmp_path / "portrait.jpg", "MPO", save_all=True, append_images=[depth])
    Image.fromarray(smooth).save(tmp_path / "huge.png")
    png = bytearray((tmp_path / "photo.png").read_bytes())                  # IHDR: width, height at 16..24
    png[16:24] = (50_000).to_bytes(4, "big") * 2
    png[29:33] = zlib.crc32(png[12:29]).to_bytes(4, "big")
    (tmp_path / "bomb.png").write_bytes(png[:200])
    size = (192, 64)
    with Image.open(tmp_path / "photo.png") as im:                         # what load_image gave before
        before = torch.tensor(np.array(ImageOps.fit(im.convert("RGB"), size, Image.BICUBIC))).permute(2, 0, 1)
    with Image.open(tmp_path / "panorama.jpg") as im:
        full = torch.tensor(np.array(ImageOps.fit(im.convert("RGB"), size, Image.BICUBIC))).permute(2, 0, 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)          # as a 200 MP photo is to Pillow's limit
    monkeypatch.setattr(sd, "MAX_PIXELS", 160 * 160, raising=False)
    items = sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path), resolution=128))
    assert [(item["path"].name, item["size"]) for item in items] == [(name, size) for name in
                                                                      ("panorama.jpg", "photo.png", "portrait.jpg")]
    err = capsys.readouterr().err
    assert "unreadable" not in err and "bomb.png (50000 x 50000)" in err and "huge.png (512 x 256)" in err, err
    assert "skipped 2 images over the limit of 0.0256 megapixels" in err and err.count("over the limit") == 1, err
    torch.testing.assert_close(sd.load_image(tmp_path / "photo.png", size), before.float() / 127.5 - 1)
    drafted = sd.load_image(tmp_path / "panorama.jpg", size)
    assert (drafted - (full.float() / 127.5 - 1)).abs().mean() < 4 / 127.5
    assert Image.MAX_IMAGE_PIXELS == 64 * 64                                 # Pillow's own setting kept


def test_a_second_scan_decodes_only_images_it_has_not_decoded_as_they_are(tmp_path, monkeypatch, capsys):
    """The scan decodes each image to skip broken ones: 128 ms for a 12 MP photo, 43 minutes per start (--resume
    too) for 20,000. Decoded once, an image is remembered in dataset.cache_dir by path, byte size and mtime; one
    whose file changed is decoded again, and a broken file put in its place is still skipped before training."""
    make_dataset(tmp_path / "data")                                             # with a broken image
    noise = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "data" / "noise.png")
    cfg = tiny_config(tmp_path).dataset
    (tmp_path / "cache").mkdir()
    opened, real_open = [], sd.open_image
    monkeypatch.setattr(sd, "open_image", lambda path, *a: opened.append(path.name) or real_open(path, *a))
    scan = lambda: [(item["path"].name, item["size"]) for item in sd.scan_dataset(cfg)]
    with monkeypatch.context() as torchrun:                     # process 1 of 2 leaves the memo to process 0
        for name, value in (("WORLD_SIZE", "2"), ("MASTER_ADDR", "localhost"), ("RANK", "1")):
            torchrun.setenv(name, value)
        scan()
    assert not (tmp_path / "cache" / sd.SCAN_MEMO).exists()
    opened.clear()
    first = scan()
    assert sorted(opened) == ["blue_disc.png", "broken.jpg", "noise.png", "red_stripes.png"] and len(first) == 3
    opened.clear()
    assert scan() == first and opened == ["broken.jpg"]                 # only the one that failed: as broken
    stat = (tmp_path / "data" / "noise.png").stat()
    os.utime(tmp_path / "data" / "noise.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))    # touched
    opened.clear()
    assert scan() == first and sorted(opened) == ["broken.jpg", "noise.png"]
    data = (tmp_path / "data" / "noise.png").read_bytes()
    (tmp_path / "data" / "noise.png").write_bytes(data[:len(data) // 2])      # truncated: its header reads
    capsys.readouterr()
    assert scan() == [first[0], first[2]] and "skipped 2 unreadable images" in capsys.readouterr().err
    (tmp_path / "cache" / sd.SCAN_MEMO).write_text('{"x": [1, 2, 3')             # damaged: decoded anew
    opened.clear()
    assert scan() == [first[0], first[2]] and len(opened) == 4


def test_a_scan_decodes_again_an_image_replaced_with_its_size_and_mtime_kept(tmp_path):
    """cp -p, rsync -a and tar keep a file's mtime: a 64x256 BMP copied over a 256x64 one (the same byte size)
    with the old one's mtime was taken for the image the scan's memo held, and trained in its bucket (cropped
    to a quarter). The change time (ctime), which no copy keeps, is remembered too."""
    (tmp_path / "data").mkdir()
    (tmp_path / "cache").mkdir()
    image, cfg = tmp_path / "data" / "a.bmp", sd.DatasetConfig(str(tmp_path / "data"), 128,
                                                     cache_dir=str(tmp_path / "cache"))
    Image.new("RGB", (256, 64), "red").save(image)
    assert sd.scan_dataset(cfg)[0]["size"] == (256, 64)
    stat = image.stat()
    Image.new("RGB", (64, 256), "red").save(tmp_path / "rotated.bmp")
    image.write_bytes((tmp_path / "rotated.bmp").read_bytes())                        # edited in place
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))                           # its mtime kept
    assert image.stat().st_size == stat.st_size and sd.scan_dataset(cfg)[0]["size"] == (64, 256)


def test_a_hand_edited_or_shared_scan_memo_only_costs_decoding_again(tmp_path, monkeypatch):
    """The scan's memo is a file anyone may edit or damage, or another run (another dataset) rewrite meanwhile:
    an entry it cannot trust is decoded again (never skipped as broken, never a traceback); an image is known by
    its real path (the dataset through a link too); what another run added meanwhile stays; a memo with no news
    is not written again, and none is written (nor cache_dir made) where no cache_dir exists."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    Image.new("RGB", (64, 64), "red").save(data / "a.png")
    cfg = sd.DatasetConfig(str(data), 128, cache_dir=str(cache))
    assert [item["size"] for item in sd.scan_dataset(cfg)] == [(128, 128)] and not cache.exists()
    cache.mkdir()
    opened, real_open = [], sd.open_image

    def open_image(path, *a):                                       # another run's scan adds its images
        opened.append(path.name)
        memo = json.loads((cache / sd.SCAN_MEMO).read_text()) if (cache / sd.SCAN_MEMO).exists() else {}
        (cache / sd.SCAN_MEMO).write_text(json.dumps({**memo, "/elsewhere/b.png": [1, 2, 3, 64, 64]}))
        return real_open(path, *a)
    monkeypatch.setattr(sd, "open_image", open_image)
    sd.scan_dataset(cfg)
    memo = json.loads((cache / sd.SCAN_MEMO).read_text())
    assert opened == ["a.png"] and memo["/elsewhere/b.png"] == [1, 2, 3, 64, 64]
    real = os.path.realpath(data / "a.png")
    remembered, written = memo[real], (cache / sd.SCAN_MEMO).stat().st_mtime_ns
    (tmp_path / "link").symlink_to(data)
    opened.clear()
    linked = sd.DatasetConfig(str(tmp_path / "link"), 128, cache_dir=str(cache))
    assert [item["size"] for item in sd.scan_dataset(linked)] == [(128, 128)] and opened == []
    assert (cache / sd.SCAN_MEMO).stat().st_mtime_ns == written                 # no news: not written again
    monkeypatch.setattr(sd, "open_image", lambda path, *a: opened.append(path.name) or real_open(path, *a))
    known = remembered[:-2]
    for entry in ([*known, 0, 64], [*known, "64", 64], known[:-1] + [64, 64], [*known, 64],
                  [*known, 10 ** 400, 64], [*known, 64, sd.MAX_PIXELS + 1],   # no OverflowError, not over limit
                  7, None, [known[0] + 1, *known[1:], 256, 64], [known[0], known[1] + 1, *known[2:], 256, 64],
                  [*known[:2], known[2] + 1, 256, 64] if len(known) > 2 else 7):
        for text in (json.dumps({real: entry}), json.dumps([entry]), "null", "[" * 100_000):   # too deep
            (cache / sd.SCAN_MEMO).write_text(text)
            opened.clear()
            assert [item["size"] for item in sd.scan_dataset(cfg)] == [(128, 128)] and opened == ["a.png"], text
    real_transpose = ImageOps.exif_transpose

    def replaced_while_decoded(im, **kw):           # the file's state before decoding is what is remembered
        im.load()
        Image.new("RGB", (256, 64), "red").save(data / "a.png")
        return real_transpose(im, **kw)
    (cache / sd.SCAN_MEMO).write_text("{}")
    with monkeypatch.context() as replacing:
        replacing.setattr(ImageOps, "exif_transpose", replaced_while_decoded)
        assert [item["size"] for item in sd.scan_dataset(cfg)] == [(128, 128)]
    assert [item["size"] for item in sd.scan_dataset(cfg)] == [(256, 64)]
    (cache / sd.SCAN_MEMO).unlink()
    (cache / sd.SCAN_MEMO).mkdir()                                  # unwritable: costs only the decoding
    assert [item["size"] for item in sd.scan_dataset(cfg)] == [(256, 64)]


def test_thumbnail_recycle_and_hidden_folders_in_the_dataset_are_left_out(tmp_path, capsys):
    """A Synology NAS keeps a thumbnail folder @eaDir (one subfolder per image) in every folder, file managers
    .thumbnails, zips made on a Mac __MACOSX, NAS recycle bins #recycle: no images of the dataset (or deleted
    ones). They were trained on; they are left out and named."""
    data = tmp_path / "data"
    sd.write_demo_dataset(data)
    for folder in ("@eaDir/red_stripes.png", ".thumbnails/normal", ".git", "__MACOSX", "sub/@eaDir", "#recycle",
                   "$Recycle.Bin/S-1-5-21"):                  # as on Windows' system drive ($RECYCLE.BIN elsewhere)
        (data / folder).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(data / folder / "SYNOPHOTO_THUMB_M.jpg")
    Image.new("RGB", (64, 64)).save(data / "sub" / "kept.png")
    items = sd.scan_dataset(sd.DatasetConfig(path=str(data), resolution=64))
    assert [item["path"].name for item in items] == ["blue_disc.png", "red_stripes.png", "kept.png"]
    out = capsys.readouterr()
    assert "SYNOPHOTO" not in out.err, out.err
    assert "7 hidden, thumbnail or recycle folders: #recycle, $Recycle.Bin, .git, .thumbnails, @eaDir, ...)" in out.out
    assert "recursively (left out: 7 hidden" in out.out, out.out        # no "0 in output_dir ..." before it


def test_hidden_images_in_the_dataset_are_left_out_and_named(tmp_path, capsys):
    """.name.png, hidden in file managers, was trained on, though kohya's sd-scripts (glob) and Hugging Face
    datasets leave such files out. Its caption, .cover.txt, is no orphan to warn of ("has no image")."""
    data = tmp_path / "data"
    sd.write_demo_dataset(data)
    Image.new("RGB", (64, 64)).save(data / ".cover.jpg")
    (data / ".cover.txt").write_text("a cover")
    items = sd.scan_dataset(sd.DatasetConfig(path=str(data), resolution=64))
    assert [item["path"].name for item in items] == ["blue_disc.png", "red_stripes.png"]
    out = capsys.readouterr()
    assert out.out.strip().endswith("(left out: 1 hidden image: .cover.jpg)") and out.err == "", out.err


def test_the_dataset_line_names_what_was_left_out_only_when_something_was(tmp_path, capsys):
    """Every run's dataset line said "(0 in output_dir and dataset.cache_dir left out)": a note about nothing."""
    data = tmp_path / "data"
    sd.write_demo_dataset(data)
    sd.scan_dataset(sd.DatasetConfig(path=str(data), resolution=64, cache_dir=str(tmp_path / "cache")))
    assert capsys.readouterr().out.strip().endswith(f"2 images in 1 folder under {data}, searched recursively")
    (data / "run" / "samples").mkdir(parents=True)                        # output_dir inside the dataset
    Image.new("RGB", (64, 64)).save(data / "run" / "samples" / "preview.png")
    sd.scan_dataset(sd.DatasetConfig(path=str(data), resolution=64), str(data / "run"))
    assert capsys.readouterr().out.strip().endswith("(left out: 1 in runs' output_dir and cache_dir)")


def test_an_earlier_runs_output_dir_inside_the_dataset_is_no_training_data(tmp_path, capsys):
    """A run with output_dir inside dataset.path left out its own folder only: the next run, in a new
    output_dir, trained on the first one's previews and loss.png. Its lock or state file marks it now."""
    data = tmp_path / "data"
    sd.write_demo_dataset(data)
    for run, mark in (("run1", sd.LOCK_FILE), ("run2", sd.STATE_FILE)):
        (data / run / "samples_step_000000").mkdir(parents=True)
        (data / run / mark).touch()
        Image.new("RGB", (64, 64)).save(data / run / "samples_step_000000" / "step_000000_sample_00.png")
        Image.new("RGB", (64, 64)).save(data / run / "loss.png")
    (data / sd.LOCK_FILE).touch()                   # dataset.path itself a run's folder: its images stay data
    items = sd.scan_dataset(sd.DatasetConfig(path=str(data), resolution=64), str(data / "run3"))
    assert sorted(i["path"].name for i in items) == sorted(p.name for p in data.glob("*.png"))
    assert capsys.readouterr().out.strip().endswith("(left out: 4 in runs' output_dir and cache_dir)")


def test_latent_cache_follows_the_vae_weights_not_the_path_they_came_from(tmp_path):
    """A fine-tuned VAE (or all-in-one checkpoint) downloaded over the old file loads other weights under the
    same path strings: its latents must not come from the old VAE's cache. The same weights (the seeded tiny
    model built again, or a model folder moved) keep the cache."""
    sd.write_demo_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path)
    build = lambda pipe: sd.LatentDataset(sd.scan_dataset(cfg.dataset), pipe, cfg, cfg.model).latent_files
    first = build(sd.tiny_pipeline(t5_length=16))
    assert build(sd.tiny_pipeline(t5_length=16)) == first
    pipe = sd.tiny_pipeline(t5_length=16)
    with torch.no_grad():
        pipe.vae.encoder.conv_in.weight.mul_(1.5)
    second = build(pipe)
    assert not set(first) & set(second)
    pixels = sd.load_image(tmp_path / "data" / "blue_disc.png", (64, 64))[None]
    torch.testing.assert_close(load_file(second[0])["moments"], pipe.vae.encode_moments(pixels)[0])


def test_the_cached_latents_are_of_the_image_bytes_their_key_was_hashed_from(tmp_path, monkeypatch):
    """Caching read an image's bytes for its key, then opened the file again to decode it: an image edited in
    between was cached with its new pixels under the old key, and trained on as the old image in every run."""
    sd.write_demo_dataset(tmp_path / "data")
    cfg, pipe = tiny_config(tmp_path), sd.tiny_pipeline(t5_length=16)
    items = sd.scan_dataset(cfg.dataset)
    path, real_read = tmp_path / "data" / "blue_disc.png", Path.read_bytes
    hashed = path.read_bytes()
    (tmp_path / "copy.png").write_bytes(hashed)

    def edited_right_after_reading(self):
        data = real_read(self)
        if self == path:                                            # an editor saves over it meanwhile
            Image.new("RGB", (64, 64), (0, 200, 0)).save(path)
        return data
    monkeypatch.setattr(Path, "read_bytes", edited_right_after_reading)
    latents = sd.LatentDataset(items, pipe, cfg, cfg.model).latent_files[[i["path"] for i in items].index(path)]
    pixels = sd.load_image(tmp_path / "copy.png", (64, 64))[None]
    torch.testing.assert_close(load_file(latents)["moments"], pipe.vae.encode_moments(pixels)[0])


def test_a_cache_file_of_an_older_version_holding_nan_is_rebuilt_not_trained_on(tmp_path, capsys):
    """New cache writes refuse NaN/inf; a file written before that check (or damaged on disk into NaN bytes)
    read as valid and came back as a NaN loss in every run. Reading checks it: it is rebuilt."""
    sd.write_demo_dataset(tmp_path / "data")
    cfg, pipe = tiny_config(tmp_path), sd.tiny_pipeline(t5_length=16)
    build = lambda: sd.LatentDataset(sd.scan_dataset(cfg.dataset), pipe, cfg, cfg.model)
    data = build()
    good = {name: {k: v.clone() for k, v in load_file(path).items()}     # safetensors < 0.8 maps the file:
            for name, path in (("latent", data.latent_files[0]), ("text", data.text_files[1]))}  # NaN below
    for name, path in (("latent", data.latent_files[0]), ("text", data.text_files[1])):
        save_file({k: torch.full_like(v, math.nan) for k, v in good[name].items()}, path)
    capsys.readouterr()
    data = build()
    assert capsys.readouterr().err.count("rebuilding") == 2
    for name, path in (("latent", data.latent_files[0]), ("text", data.text_files[1])):
        torch.testing.assert_close(load_file(path), good[name])


def test_a_cache_file_of_other_tensors_than_a_run_writes_is_rebuilt_not_a_key_error_in_training(tmp_path, capsys):
    """The cache is ours: a file under a cache name holding renamed tensors, other shapes or another dtype
    (edited, or written by another tool) is stale, rebuilt while caching; it was a bare KeyError mid-run."""
    sd.write_demo_dataset(tmp_path / "data")
    cfg, pipe = tiny_config(tmp_path, **{"dataset.flip": True}), sd.tiny_pipeline(t5_length=16)
    build = lambda: sd.LatentDataset(sd.scan_dataset(cfg.dataset), pipe, cfg, cfg.model)
    data = build()
    paths = [data.latent_files[0], data.latent_files[1], data.text_files[1]]
    good = [{k: v.clone() for k, v in load_file(path).items()} for path in paths]
    save_file({"mean": good[0]["moments"], "flipped": good[0]["flipped"]}, paths[0])          # renamed
    save_file({"moments": good[1]["moments"][:, :4].clone(), "flipped": good[1]["flipped"]}, paths[1])  # cut
    save_file({**good[2], "context": good[2]["context"].half()}, paths[2])                    # another dtype
    capsys.readouterr()
    data = build()
    assert capsys.readouterr().err.count("its tensors are not those this run writes") == 3
    for path, tensors in zip(paths, good):
        torch.testing.assert_close(load_file(path), tensors)
    latents, context, pooled = data.get([0, 1], pipe.vae, cfg, torch.Generator().manual_seed(0))
    assert latents.shape == (2, 16, 8, 8) and context.shape == (2, 77 + 16, 64) and pooled.shape == (2, 80)


def test_a_utf16_caption_without_a_bom_is_refused_not_trained_with_nul_characters(tmp_path):
    """UTF-16 without a BOM decodes as UTF-8 without an error: 'b\\x00l\\x00u\\x00e...' reached the tokenizers
    and was trained on; with a BOM it was already refused (its 0xff byte)."""
    sd.write_demo_dataset(tmp_path / "data")
    for codec in ("utf-16-le", "utf-16-be"):
        (tmp_path / "data" / "blue_disc.txt").write_bytes("blue disc".encode(codec))
        one_line_error(lambda: sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path / "data"))),
                       "caption .*blue_disc.txt: .*NUL characters .*UTF-16.*save it as UTF-8")
    (tmp_path / "data" / "blue_disc.txt").write_bytes("\ufeffblue disc \n".encode())      # UTF-8 with a BOM: read
    captions = [item["caption"] for item in sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path / "data")))]
    assert captions == ["blue disc", "red stripes"]


def test_a_caption_that_cannot_be_read_is_not_called_a_wrong_encoding(tmp_path, monkeypatch):
    """A caption without read permission (chmod 000; simulated: the tests may run as root) or a folder named
    like one was refused with "save it as UTF-8 text", advice for an encoding error."""
    sd.write_demo_dataset(tmp_path / "data")
    failing_for(monkeypatch, "read_text", "blue_disc.txt", PermissionError(13, "Permission denied", "blue_disc.txt"))
    one_line_error(lambda: sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path / "data"))),
                   r"^caption .*blue_disc.txt: Permission denied; make it a readable file$")
    monkeypatch.undo()
    (tmp_path / "data" / "red_stripes.txt").unlink()
    (tmp_path / "data" / "red_stripes.txt").mkdir()
    one_line_error(lambda: sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path / "data"))),
                   r"^caption .*red_stripes.txt: Is a directory; make it a readable file$")


def test_uppercase_txt_captions_are_read_on_linux_as_on_windows_and_macos(tmp_path, capsys):
    """IMG_0001.JPG + IMG_0001.TXT (a camera's and an old tool's names) captioned on Windows, trained on a Linux
    GPU box: the caption was replaced by default_caption (a case-sensitive file system finds no .txt)."""
    Image.new("RGB", (64, 64)).save(tmp_path / "IMG_0001.JPG")
    (tmp_path / "IMG_0001.TXT").write_text("a dog")
    (tmp_path / "IMG_0002.TXT").write_text("its image is a .heic")
    (item,) = sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path), resolution=64))
    err = capsys.readouterr().err
    assert item["caption"] == "a dog" and "no .txt caption" not in err, err
    assert "1 .txt caption has no image, e.g. IMG_0002.TXT" in err, err


def test_a_caption_of_any_case_is_read_on_linux_as_on_windows_and_macos(tmp_path, capsys):
    """a.png + a.Txt (any spelling but .txt and .TXT) trained on default_caption on Linux, with a warning
    that the image had no .txt caption and none that the .Txt was unread."""
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "a.Txt").write_text("a cat")
    (item,) = sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path), resolution=64))
    assert item["caption"] == "a cat" and "caption" not in capsys.readouterr().err


def test_looking_for_captions_of_other_case_costs_no_stats_per_uncaptioned_image(tmp_path, monkeypatch):
    """Trying the eight spellings of .txt asked the file system nine times per image without a caption (the
    old code twice): a large uncaptioned dataset on a network drive scanned minutes longer. A folder is
    listed once instead; captions spelt a.Txt or a.TXT are read as before, and one added later is seen."""
    for name in ("a.png", "b.png", *(f"u{i}.png" for i in range(20))):
        (tmp_path / name).touch()
    (tmp_path / "a.Txt").write_text("a cat")
    (tmp_path / "b.TXT").write_text("a dog")
    real_stat, stats = os.stat, []
    monkeypatch.setattr(os, "stat", lambda *a, **k: stats.append(a[0]) or real_stat(*a, **k))
    listed = sd.caption_files(sd.files_under(tmp_path)[0])
    stats.clear()
    captions = [sd.read_caption(tmp_path / f"u{i}.png", listed)[0] for i in range(20)]
    assert captions == [None] * 20 and len(stats) <= 2 * 20, len(stats)
    assert [sd.read_caption(tmp_path / f"{n}.png", listed)[0] for n in "ab"] == ["a cat", "a dog"]
    (tmp_path / "u0.tXt").write_text("late")
    listed = sd.caption_files(sd.files_under(tmp_path)[0])              # a new scan lists the folder anew
    assert sd.read_caption(tmp_path / "u0.png", listed)[0] == "late"


def test_a_caption_a_case_insensitive_file_system_opens_is_not_called_orphaned(tmp_path, monkeypatch, capsys):
    """macOS and Windows open A.txt for a.png's a.txt, and the caption is used; yet the scan warned '1 .txt
    caption has no image, e.g. A.txt' (names compared by case). Simulated on Linux: a.txt a link to A.txt that
    the folder's listing leaves out, as such a file system lists only the name a file was saved with."""
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "A.txt").write_text("a dog")
    (tmp_path / "a.txt").symlink_to("A.txt")
    real_files_under = sd.files_under

    def listed_as_saved(root):
        files, left_out = real_files_under(root)
        return [p for p in files if p.name != "a.txt"], left_out
    monkeypatch.setattr(sd, "files_under", listed_as_saved)
    (item,) = sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path), resolution=64))
    err = capsys.readouterr().err
    assert item["caption"] == "a dog" and "caption" not in err, err
    monkeypatch.undo()                          # a case-sensitive file system: a.txt and A.txt are two captions
    (tmp_path / "a.txt").unlink()
    (tmp_path / "a.txt").write_text("a cat")
    (item,) = sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path), resolution=64))
    assert item["caption"] == "a cat" and "1 .txt caption has no image, e.g. A.txt" in capsys.readouterr().err
    (tmp_path / "A.txt").unlink()
    (tmp_path / "A.txt").symlink_to(tmp_path / "unmounted" / "A.txt")    # a link to a drive not mounted
    (item,) = sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path), resolution=64))
    assert item["caption"] == "a cat" and "1 .txt caption has no image, e.g. A.txt" in capsys.readouterr().err


def test_a_single_image_given_as_dataset_path_is_not_called_missing(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "me.png")
    one_line_error(lambda: sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path / "me.png"))),
                   r"me.png \(a file, not a folder\): give a folder of images")


def test_images_far_smaller_than_their_bucket_are_named_they_train_blurred(tmp_path, capsys):
    """A 256 px image in a 1024 px run is upscaled 4x without a word (web thumbnails, an SD 1.5 era dataset):
    the LoRA learns the blur. Up to 2x passes quietly."""
    for name, size in (("thumb.png", (32, 24)), ("half.png", (64, 64)), ("ok.png", (128, 128))):
        Image.new("RGB", size).save(tmp_path / name)
    assert len(sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path), resolution=128))) == 3
    err = capsys.readouterr().err
    assert "1 image is upscaled over 2x to a bucket around dataset.resolution 128 px" in err, err
    assert "e.g. thumb.png (32x24);" in err, err


def test_images_upscaled_just_over_2x_or_cropped_to_just_under_half_are_named_and_those_at_the_limit_not(tmp_path,
                                                                                                       capsys):
    """The scan names images upscaled over 2x (by their more upscaled side) and those cropped to under half the
    picture. At resolution 128: 64x64 is upscaled exactly 2x to 128x128, 100x30 2.13x in height (1.92x in width)
    to 192x64; 8:1 and 1:8 strips keep exactly half in the widest buckets (256x64, 64x256), 9:1 and 1:9 ones less."""
    sizes = {"at_2x.png": (64, 64), "over_2x.png": (100, 30), "half_wide.png": (512, 64), "half_tall.png": (64, 512),
             "under_half_wide.png": (576, 64), "under_half_tall.png": (64, 576)}
    for name, size in sizes.items():
        Image.new("RGB", size, "red").save(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text("red", encoding="utf-8")
    sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path), resolution=128))
    err = capsys.readouterr().err
    assert "warning: 1 image is upscaled over 2x" in err and "e.g. over_2x.png (100x30);" in err, err
    assert "warning: 2 images are cropped to under half" in err, err
    assert "e.g. under_half_tall.png, under_half_wide.png;" in err, err


def test_images_cropped_to_under_half_by_the_widest_bucket_are_named(tmp_path, capsys):
    """Buckets go up to 4:1, and each image is centre-cropped to its bucket: a 1:10 webtoon strip or a 360
    degree panorama lost over half its picture without a word. Up to 8:1 (at most half cut) passes quietly."""
    for name, size in (("strip.png", (100, 1000)), ("pano.png", (1600, 160)), ("wide.png", (640, 100))):
        Image.new("RGB", size).save(tmp_path / name)
    assert len(sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path), resolution=128))) == 3
    err = capsys.readouterr().err
    assert "2 images are cropped to under half the picture to fit the widest aspect bucket, e.g. pano.png, " \
           "strip.png;" in err, err


def test_a_global_batch_no_aspect_bucket_fills_is_warned(tmp_path, capsys, monkeypatch):
    """A step's images share one aspect bucket: batch 3 on the demo's 2 square images trained on 2 per step
    while the run printed "global batch 3" (and the LoRA recorded it) without a word."""
    make_dataset(tmp_path / "data")
    sd.train(tiny_config(tmp_path, **{"train.steps": 1, "train.batch_size": 3, "sample.sample_every": 0}))
    out, err = capsys.readouterr()
    assert "global batch 3 = 1 process x batch_size 3 x grad_accum 1" in out
    assert "warning: no aspect bucket holds a global batch of 3 images (the largest holds 2); a step's images " \
           "share one bucket, so steps train on 2 or fewer: lower the global batch (batch_size x grad_accum x " \
           "processes) or add images" in err, err
    cfg = tiny_config(tmp_path, **{"train.batch_size": 2, "train.grad_accum": 2})       # counted: 2 x 2 > 3
    assert sd.init_distributed(cfg, [(64, 64), (64, 128), (64, 64), (64, 64)]) == (0, 1)
    assert "(the largest holds 3)" in capsys.readouterr().err
    sd.init_distributed(tiny_config(tmp_path, **{"train.batch_size": 3}), [(64, 64)] * 3 + [(128, 64)])
    assert "warning" not in capsys.readouterr().err                 # one bucket fills it: the others' are short
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)                 # torchrun's process 1: process 0 warns for all
    monkeypatch.setattr(sd.dist, "init_process_group", lambda *args, **kwargs: None)
    assert sd.init_distributed(cfg, [(64, 64)] * 3) == (1, 2)
    out, err = capsys.readouterr()
    assert "global batch 8 = 2 processes" in out and not err


def test_a_warmup_longer_than_the_run_is_warned(tmp_path, capsys, monkeypatch):
    """--set train.steps=20 with the default warmup_steps 50 ended inside the warmup without a word: lr never came
    above 20/50 of train.lr. Warned (by process 0), not refused: a short trial run is a fair thing to ask for."""
    cfg = tiny_config(tmp_path, **{"train.steps": 20, "train.warmup_steps": 50, "train.lr": 1e-4})
    sd.init_distributed(cfg)
    assert capsys.readouterr().err == ("warning: train.warmup_steps 50 is more than train.steps 20: the lr peaks "
                                       "at 4e-05, not train.lr 0.0001; lower train.warmup_steps (e.g. --set "
                                       "train.warmup_steps=2)\n")
    for steps, warmup in ((20, 20), (20, 0)):           # at 20 of 20 the last step has train.lr
        sd.init_distributed(tiny_config(tmp_path, **{"train.steps": steps, "train.warmup_steps": warmup}))
        assert capsys.readouterr().err == ""
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)                 # torchrun's process 1: process 0 warns for all
    monkeypatch.setattr(sd.dist, "init_process_group", lambda *args, **kwargs: None)
    sd.init_distributed(cfg)
    assert capsys.readouterr().err == ""


def test_lines_printed_during_training_start_their_own_line_in_a_terminal(tmp_path, monkeypatch):
    """In a terminal (stdout and stderr on one screen), "saved ...", the loss by sigma bin, "sample: ..." and the
    warnings met while a progress bar is up were written after the bar's text: "training:  50%|...]saved ..."."""
    make_dataset(tmp_path / "data")
    screen = io.StringIO()
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)

    def shown(what: str) -> list[str]:              # the lines on the screen that say `what`: \r overwrites
        lines = []
        for line in screen.getvalue().split("\n"):
            text = ""
            for part in line.split("\r"):
                text = part + text[len(part):]
            lines += [text.rstrip()] * bool(re.search(what, text))
        screen.seek(0)
        screen.truncate()
        return lines
    sets = {"train.steps": 4, "train.save_every": 2, "sample.sample_every": 2, "sample.width": 32, "sample.height": 32}
    sd.train(tiny_config(tmp_path, **sets))
    said = shown("saved |loss by sigma bin|sample: ")  # previews at step 0; at 2 and 4 a save, the bins, 2 previews
    assert len(said) == 2 + 2 * 4 and all(re.match("(saved|loss by|sample:) ", line) for line in said), said
    damaged = next((tmp_path / "cache/latents").iterdir())
    damaged.write_bytes(b"damaged")                                              # warned while caching
    monkeypatch.setattr(sd, "generate", lambda *args, **kwargs: 1 / 0)           # warned while training
    sd.train(tiny_config(tmp_path, **sets, output_dir=str(tmp_path / "again")))
    warned = shown("warning: (rebuilding|sampling)")
    assert [line.split(" (")[0] for line in warned] == [f"warning: rebuilding unreadable cache file {damaged}",
                                                        *(f"warning: sampling at step {n} failed" for n in (0, 2, 4))]


def test_the_training_bar_says_that_previews_are_made_while_they_are(tmp_path, monkeypatch):
    """At a sample step the bar stood still, without a word, for the minutes a large model takes to make the
    previews: the run looked hung. The step 0 previews (before any bar) too."""
    make_dataset(tmp_path / "data")
    screen, seen = io.StringIO(), []
    monkeypatch.setattr(sys, "stderr", screen)
    generate = sd.generate

    def watched(*args, **kwargs):                       # the bar as drawn when the previews start
        seen.append(screen.getvalue().rsplit("\r", 1)[-1])
        return generate(*args, **kwargs)
    monkeypatch.setattr(sd, "generate", watched)
    sd.train(tiny_config(tmp_path, **{"train.steps": 2, "sample.sample_every": 1}))
    assert [line.split("|")[0] for line in seen] == ["sampling 2 previews:   0%", "sampling 2 previews:  50%",
                                                      "sampling 2 previews: 100%"], seen
    assert screen.getvalue().rsplit("\r", 1)[-1].startswith("training: 100%|"), screen.getvalue()[-300:]


def test_a_failed_runs_progress_bar_is_not_redrawn_by_the_next_run(tmp_path, monkeypatch):
    """A notebook keeps a failed train()'s traceback, and with it its progress bar: tqdm redrew that dead bar
    ("training:  20%|... lr=1.00e+08") with every line of the next run, whose own bar came a line below it."""
    make_dataset(tmp_path / "data")
    screen = io.StringIO()
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    sets = {"train.steps": 4, "sample.sample_every": 0}
    with pytest.raises(sd.UserError, match="loss became") as failed:           # kept, as a notebook keeps it
        sd.train(tiny_config(tmp_path, **sets, **{"train.lr": 1e8, "train.max_grad_norm": 0}))
    screen.seek(0)
    screen.truncate()
    sd.train(tiny_config(tmp_path, **sets, output_dir=str(tmp_path / "again")))
    assert failed.value and "e+08" not in screen.getvalue() and "\x1b[A" not in screen.getvalue(), screen.getvalue()


def test_lora_and_training_settings_each_act_on_a_one_step_run(tmp_path, capsys, monkeypatch):
    """No test saw lora.alpha, lora.blocks, train.weighting, train.max_grad_norm, train.weight_decay,
    train.seed, sample.shift or train.warmup_steps act on training: a run ignoring any of them passed. One step
    shows each: the (kohya) file holds the layers lora.targets and lora.blocks select, with their alpha; the
    logged loss is the loss-by-sigma-bin report's unweighted MSE times sigma^-2 (sigma 0.26 here: 15 times);
    sample.shift 1 keeps sigma on the 1000-step table (the preset's 3 takes it off); and Adam's first step
    moves a weight by lr * g / (|g| + eps), lr whatever the gradient's size unless it is clipped far below eps:
    clipped to 1e-12, lora_up stays 0 (unclipped: lr) and lora_down is its initial value as train.seed draws it
    times 1 - lr * weight_decay, lr the warmup's (0.95; no decay: 1, no warmup: 0.9). The report has
    train.loss_bins bins, and train.gradient_checkpointing checkpoints each joint block. lora_step_N.safetensors
    is in lora.format too (it was diffusers' whatever lora.format said: passed)."""
    make_dataset(tmp_path / "data")
    sets = {"train.steps": 1, "lora.alpha": 2, "lora.format": "kohya", "train.weighting": "sigma_sqrt",
            "train.max_grad_norm": 1e-12, "train.weight_decay": 10.0, "train.lr": 1e-2, "sample.prompts": [],
            "sample.shift": 1.0, "train.seed": 1, "train.warmup_steps": 2, "lora.blocks": "1", "train.loss_bins": 4,
            "train.gradient_checkpointing": True}
    checkpointed, real_checkpoint = [], sd.checkpoint

    def checkpoint(block, *args, **kwargs):
        checkpointed.append(block)
        return real_checkpoint(block, *args, **kwargs)
    monkeypatch.setattr(sd, "checkpoint", checkpoint)
    lora = load_file(sd.train(tiny_config(tmp_path, **sets)))
    step_file = load_file(tmp_path / "run/lora_step_000001.safetensors")     # in lora.format too, the same
    assert step_file.keys() == lora.keys() and all(torch.equal(step_file[k], t) for k, t in lora.items())
    assert len(checkpointed) == 3                                   # the tiny model's joint blocks, one step
    (step,) = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    report = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("loss by sigma bin"))
    assert len(re.findall(r"\[\d\.\d,\d\.\d\) ", report)) == 4, report
    (unweighted,) = [float(mean) for mean in re.findall(r"\) (\d+\.\d+)", report)]     # the one sample's bin
    assert step["loss"] == pytest.approx(unweighted / step["sigma"] ** 2, rel=1e-3) and step["sigma"] < 0.95
    assert step["sigma"] * 1000 == pytest.approx(round(step["sigma"] * 1000), abs=1e-3)      # unshifted
    assert step["lr"] == 5e-3                                       # step 1 of a 2-step warmup to 1e-2
    with torch.random.fork_rng(devices=[]):             # the LoRA's initial weights, as train.seed 1 draws them
        torch.manual_seed(1)
        initial = sd.tiny_pipeline().mmdit
        sd.add_lora(initial, rank=8, alpha=2, targets="all", blocks="1")
    layers = sd.lora_layers(initial)                    # "all": the embedders', final layer's, block 1's
    assert {key.split(".")[0] for key in lora} == {"lora_unet_" + name.replace(".", "_") for name in layers}
    for name, layer in layers.items():
        key = "lora_unet_" + name.replace(".", "_")
        assert lora[f"{key}.alpha"].item() == 2.0 and lora[f"{key}.lora_up.weight"].abs().max() < 1e-6
        torch.testing.assert_close(lora[f"{key}.lora_down.weight"], 0.95 * layer.lora_down.weight.detach())


def test_bf16_autocast_training_step_runs(tmp_path, monkeypatch):
    """dtype bf16 trains under bf16 autocast: finite losses alone passed a run whose autocast was off or whose
    weights were loaded in fp32 (then no autocast). The attention inputs of the training steps show it."""
    make_dataset(tmp_path / "data")
    seen, real_attention = set(), sd.attention

    def attention(q, k, v):
        if torch.is_grad_enabled():                     # training (previews run without gradients)
            seen.add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), q.dtype))
        return real_attention(q, k, v)
    monkeypatch.setattr(sd, "attention", attention)
    sd.train(tiny_config(tmp_path, **{"dtype": "bf16", "train.steps": 2, "sample.sample_every": 0}))
    assert all(math.isfinite(v) for v in losses(tmp_path / "run"))
    assert seen == {(True, torch.bfloat16, torch.bfloat16)}, seen
    with pytest.raises(sd.UserError, match=r"config key 'dtype' is 'fp16' \(valid: 'fp32', 'bf16'\)"):
        tiny_config(tmp_path, dtype="fp16")


def test_gpu_benchmark_script_runs_at_smoke_size(tmp_path):
    """.ci/bench_gpu.py is run by a session that holds a GPU for minutes: keep it working between such sessions."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    r = run_cli(".ci/bench_gpu.py", "--smoke", "pipeline", "train", "fp8", OUT=str(tmp_path))
    results = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert r.returncode == 0 and "error" not in json.dumps(results), (r.stderr[-2000:], results)
    assert set(results["pipeline"]) == {"budget_gib", "large_t5_offload", "large_no_t5_resident"}
    assert all(results["train"][size]["ratio_sd35_lora_vs_diffusers_peft"] > 0 for size in ("medium", "large"))
    assert results["train"]["medium"]["sd35_lora_compiled_step_s"] > 0
    assert all(results["train"][size]["ratio_sd35_lora_vs_before"] > 0 for size in ("medium", "large"))
    medium = results["train"]["medium"]             # CUDA graphs: on a CPU torch compiles as without them
    assert medium["ratio_sd35_lora_cudagraphs_vs_compiled"] > 0 and medium["sd35_lora_cudagraphs_device_time"]
    grad_rel_errs = [medium[f"sd35_lora_{label}_grad_rel_err"] for label in ("compiled_repeat", "cudagraphs")]
    assert max(grad_rel_errs) < 1e-5, grad_rel_errs
    assert medium["sd35_lora_cudagraphs_skips"] > 0 and medium["sd35_lora_cudagraphs_graphs"] is None, medium
    assert isinstance(medium["sd35_lora_cudagraphs_notes"], str)
    assert set(results["fp8"]) == {"scaled_mm", "train_large", "train_medium", "sample_medium", "pipeline_large_t5_offload"}
    assert results["fp8"]["scaled_mm"]["rel_err_vs_dequantized"] < 1e-6 and results["fp8"]["train_large"]["fp8_step_s"] > 0


def test_torchrun_benchmark_script_runs(tmp_path):
    """.ci/bench_dist.py (README, Several GPUs: "Cost, measured") exited 1: its tiny runs kept the default 1024 px
    previews, which the 512 px model refused though sample.prompts was empty (no more); and the all-reduce part's
    stdout, read as one JSON object, now starts with init_distributed's "global batch" lines."""
    r = run_cli(".ci/bench_dist.py", "--steps", "7", "--reps", "1", TMPDIR=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert result["lora_params"] == 34816 and result["two_process_batch1_step_s"] > 0, result


def test_gpu_benchmark_without_a_gpu_says_so_in_one_line(tmp_path):
    """Without --smoke on a machine with no GPU, bench_gpu.py ended in a bare 'Torch not compiled with CUDA' traceback."""
    r = run_cli(".ci/bench_gpu.py", "compile", OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "bench_gpu.py: no CUDA GPU here: run it on a GPU machine, or add --smoke for the tiny CPU check"], r.stderr


#################################################################################
#                     Hardening: odd datasets, resumes, numbers                  #
#################################################################################

def test_dataset_scan_follows_linked_image_folders_once(tmp_path, capsys):
    """Image folders linked into the dataset were left out without a word (Path.rglob does not follow links);
    a link back to a parent folder is no endless loop and no image is read twice. macOS's ._name metadata
    files (one per image and caption copied from a Mac) are no images, not 'unreadable images', and no
    captions, not '.txt captions that have no image'."""
    sd.write_demo_dataset(tmp_path / "elsewhere")
    (tmp_path / "data").mkdir()
    for name in ("._red_stripes.png", "._red_stripes.txt"):
        (tmp_path / "data" / name).write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    (tmp_path / "data" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere" / "back").symlink_to(tmp_path / "data", target_is_directory=True)
    items = sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path / "data"), resolution=64, cache_dir=str(tmp_path)))
    assert sorted(item["path"].name for item in items) == ["blue_disc.png", "red_stripes.png"]
    err = capsys.readouterr().err
    assert "unreadable" not in err and "no image" not in err, err


def test_images_sharing_a_caption_file_are_named_by_group(tmp_path, capsys):
    """a.png + a.jpg and b.png + b.webp were named 'a.jpg + a.png + b.png + b.webp', as if all four shared one."""
    for name in ("a.png", "a.jpg", "b.png", "b.webp", "c.png"):
        Image.new("RGB", (64, 64)).save(tmp_path / name)
    sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path), resolution=64))
    assert "images sharing one caption file: a.jpg + a.png, b.png + b.webp\n" in capsys.readouterr().err


def test_kohya_repeat_folders_of_different_counts_are_named_as_not_weighting(tmp_path, capsys):
    """A dataset made for kohya sd-scripts weights its folders by their names (10_sks dog: 10 repeats per
    epoch, 1_dog: 1); here every image trains equally often, which changed the balance without a word."""
    for folder in ("10_sks dog", "1_dog", "10_sks dog/close-ups"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (64, 64)).save(tmp_path / folder / "a.png")
    sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path), resolution=64))
    err = capsys.readouterr().err
    assert "kohya's repeat folders (10_sks dog, 1_dog): each image trains equally often here" in err, err
    (tmp_path / "1_dog" / "a.png").rename(tmp_path / "10_sks dog" / "b.png")       # one count: no difference
    for folder in ("2023_summer", "2024_winter", "01_faces", "02_full body"):      # dated or numbered folders
        (tmp_path / folder).mkdir()
        Image.new("RGB", (64, 64)).save(tmp_path / folder / "a.png")
    sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path), resolution=64))
    assert "repeat" not in capsys.readouterr().err


def test_a_dataset_folder_that_cannot_be_read_is_named_not_left_out_without_a_word(tmp_path, capsys, monkeypatch):
    """os.walk passes by a folder it may not list (copied with sudo, a root-owned docker volume): its images
    were left out without a word, while an unreadable image file is named. A disk's lost+found (root only)
    is no data, as System Volume Information is not."""
    for folder in ("open", "locked", "lost+found"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (64, 64)).save(tmp_path / folder / "a.png")
    scandir = os.scandir

    def refuse(path):                                                    # as for a user not allowed in
        if Path(path).name in ("locked", "lost+found"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", refuse)
    items = sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path), resolution=64))
    assert [item["path"].parent.name for item in items] == ["open"]
    err = capsys.readouterr().err
    assert f"skipped 1 folder that cannot be read: {tmp_path / 'locked'} (Permission denied)" in err, err


def test_a_linked_image_folder_whose_target_is_missing_is_named(tmp_path, capsys):
    """A folder linked into the dataset from a drive that is not mounted: os.walk lists the dangling link as
    a file, which has no image extension, so the folder's images were left out without a word."""
    sd.write_demo_dataset(tmp_path / "data")
    (tmp_path / "data" / "usb photos").symlink_to(tmp_path / "unmounted" / "photos", target_is_directory=True)
    (tmp_path / "data" / "gone.png").symlink_to(tmp_path / "unmounted" / "gone.png")  # named as unreadable
    assert len(sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path / "data"), resolution=64))) == 2
    err = capsys.readouterr().err
    assert f"skipped 1 folder that cannot be read: {tmp_path / 'data' / 'usb photos'} (a link to the missing " \
           f"{tmp_path / 'unmounted' / 'photos'})" in err, err
    assert "skipped 1 unreadable image: gone.png (FileNotFoundError)" in err, err


def test_a_caption_link_whose_target_is_missing_is_not_named_as_a_folder(tmp_path, capsys):
    """A dataset copied as links (cp -rs) from a drive not mounted: each dangling .txt was named among the
    'folders that cannot be read'; as the .txt captions without an image they are named already."""
    sd.write_demo_dataset(tmp_path / "data")
    (tmp_path / "data" / "lonely.txt").symlink_to(tmp_path / "unmounted" / "lonely.txt")
    assert len(sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path / "data"), resolution=64))) == 2
    err = capsys.readouterr().err
    assert "cannot be read" not in err and "1 .txt caption has no image, e.g. lonely.txt" in err, err


def test_images_in_formats_not_read_are_named_with_or_without_a_caption(tmp_path, capsys):
    """A .heic, .gif or .jfif (Windows saves web images as .jfif) was named only through its .txt caption:
    without one (a folder trained on dataset.default_caption) it was left out without a word."""
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    for name in ("IMG_0001.heic", "saved.jfif", "._a.gif"):
        (tmp_path / name).write_bytes(b"\0" * 16)
    sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path), resolution=64))
    err = capsys.readouterr().err
    assert "skipped 2 images in formats not read, e.g. IMG_0001.heic, saved.jfif; images are read from " \
           ".bmp, .jpeg, .jpg, .png, .webp files only" in err, err


def test_kohya_caption_files_are_named_as_not_read(tmp_path, capsys):
    """kohya sd-scripts' captioners (make_captions.py) and its --caption_extension default write .caption
    files: the warning said only 'no .txt caption', as if the dataset had none."""
    for name in ("a", "b"):
        Image.new("RGB", (64, 64)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.caption").write_text("a photo of sks dog")
    sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path), resolution=64))
    assert "using dataset.default_caption ''; kohya's .caption files are not read (2 here): rename them to .txt" \
           in capsys.readouterr().err


def test_an_image_link_that_loops_is_skipped_as_unreadable_not_a_traceback(tmp_path, capsys):
    """Path.resolve raises RuntimeError on a symlink loop (Python < 3.13): the scan ended in a bare traceback."""
    sd.write_demo_dataset(tmp_path / "data")
    (tmp_path / "data" / "loop.png").symlink_to(tmp_path / "data" / "loop.png")
    items = sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path / "data"), resolution=64))
    assert sorted(item["path"].name for item in items) == ["blue_disc.png", "red_stripes.png"]
    assert "skipped 1 unreadable image: loop.png" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_named_pipes_named_like_images_or_captions_are_left_out_not_waited_on(tmp_path, capsys):
    """A named pipe (FIFO) called x.png or x.txt in dataset.path: the scan opened it and waited forever for a
    writer. Files that are not regular files are left out and named in the dataset line."""
    data = tmp_path / "data"
    sd.write_demo_dataset(data)
    os.mkfifo(data / "pipe.png")
    (data / "blue_disc.txt").unlink()
    os.mkfifo(data / "blue_disc.txt")
    (data / "pipe_link.jpg").symlink_to(data / "pipe.png")

    def waited(signum, frame):
        raise TimeoutError("the dataset scan waited on a named pipe")
    previous = signal.signal(signal.SIGALRM, waited)
    signal.alarm(60)                                   # an open() waiting on a pipe ends with the exception
    try:
        items = sd.scan_dataset(sd.DatasetConfig(path=str(data), resolution=64, default_caption="fallback"))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert [(i["path"].name, i["caption"]) for i in items] == [("blue_disc.png", "fallback"),
                                                               ("red_stripes.png", "red stripes")]
    out = capsys.readouterr()
    assert out.out.strip().endswith("(left out: 3 named pipes and other special files: blue_disc.txt, pipe.png, "
                                    "pipe_link.jpg)"), out.out
    assert "1 image has no .txt caption, e.g. blue_disc.png" in out.err and "unreadable" not in out.err, out.err
    (data / ".thumbs").mkdir()                                          # two kinds left out: both named
    Image.new("RGB", (64, 64)).save(data / ".thumbs" / "red_stripes.png")
    sd.scan_dataset(sd.DatasetConfig(path=str(data), resolution=64, default_caption="fallback"))
    line = capsys.readouterr().out.strip()
    assert line.endswith("(left out: 1 hidden, thumbnail or recycle folder: .thumbs; 3 named pipes and other "
                         "special files: blue_disc.txt, pipe.png, pipe_link.jpg)"), line


def test_dataset_scan_leaves_out_own_outputs_and_reports_what_it_found(tmp_path, capsys):
    data = tmp_path / "data"
    make_dataset(data)
    (data / "sub").mkdir()
    Image.new("RGB", (64, 64), "green").save(data / "sub" / "lonely.png")          # no caption
    Image.new("RGB", (64, 64), "red").save(data / "red_stripes.jpg")               # shares red_stripes.txt
    (data / "sub" / "IMG_0001.heic").write_bytes(b"ftypheic")                     # a format not read
    (data / "sub" / "IMG_0001.txt").write_text("a phone photo")
    overrides = {"output_dir": str(data / "run"), "dataset.cache_dir": str(data / "cache"), "train.steps": 1,
                 "sample.sample_every": 0}
    sd.train(tiny_config(tmp_path, **overrides))                                   # writes PNGs into data/run
    assert list((data / "run").rglob("*.png")) and list((data / "cache").rglob("*"))
    capsys.readouterr()
    sd.train(tiny_config(tmp_path, **{**overrides, "train.steps": 2}), resume=True)
    out = capsys.readouterr()
    assert "4 images in 2 folders" in out.out and "run" in out.out and "cache" in out.out, out.out
    assert "lonely.png" in out.err and "red_stripes.jpg + red_stripes.png" in out.err, out.err
    assert "1 .txt caption has no image, e.g. IMG_0001.txt; images are read from .bmp" in out.err, out.err
    cfg = tiny_config(tmp_path, **{"dataset.cache_dir": str(tmp_path)})     # a cache_dir holding the dataset
    assert len(sd.scan_dataset(cfg.dataset, str(data / "run"))) == 4


def test_a_log_whose_end_holds_bytes_that_are_not_utf8_is_trimmed_not_a_traceback(tmp_path):
    """A machine that crashes can leave stray bytes (not UTF-8) past a file's last write: --resume's trimming
    of log.jsonl was a bare UnicodeDecodeError; the steps' lines are kept, the garbage goes as a cut line does."""
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"step": step, "loss": 1.0}) + "\n" for step in (1, 2, 3)]
    log.write_bytes("".join(lines).encode() + b"\xff\xfe\x00\x93garbage")
    sd.drop_log_lines_after(log, 2)
    assert log.read_text() == "".join(lines[:2])


def test_a_resume_trims_the_log_line_by_line_not_read_whole(tmp_path):
    """--resume read log.jsonl whole and held it three times over (text, lines, kept lines): a million steps'
    log (144 MB) took 0.6 GB of RAM. Measured by Python's allocations: under a quarter of the file now."""
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"step": step, "loss": 1.0 / step, "lr": 1e-4, "time": 1.7e9}) + "\n"
             for step in range(1, 20_001)]
    log.write_text("".join(lines))
    size = log.stat().st_size
    tracemalloc.start()
    try:
        sd.drop_log_lines_after(log, 15_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert log.read_text() == "".join(lines[:15_000]) and peak < size / 4, (peak, size)


def test_a_windows_log_keeps_its_line_ends_when_a_resume_trims_it(tmp_path, monkeypatch):
    """On Windows a run writes log.jsonl in text mode: CRLF line ends. The trimming read them as they were and
    wrote them in text mode again, so every --resume added a "\\r" to each line ("\\r\\r\\n": a blank line between
    steps to Python's and others' readers). Windows' text mode stood in for by Python's own io with its linesep."""
    import _pyio
    monkeypatch.setattr(os, "linesep", "\r\n")
    monkeypatch.setattr(sd, "open", _pyio.open, raising=False)
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"step": step, "loss": 1.0}).encode() + b"\r\n" for step in (1, 2, 3)]
    log.write_bytes(b"".join(lines))
    sd.drop_log_lines_after(log, 2)
    assert log.read_bytes() == b"".join(lines[:2])


def test_a_log_that_fails_reading_on_resume_is_reported_unreadable_and_kept(tmp_path, monkeypatch):
    """A read error part way through log.jsonl (a failing disk: EIO; another user's 0600 file) came out of the
    rewrite as "cannot write log.jsonl (...): choose another folder", which a resume cannot. The log stays."""
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"".join(json.dumps({"step": step}).encode() + b"\n" for step in (1, 2, 3)))
    before = log.read_bytes()

    class FailingReader(io.BufferedReader):
        def __iter__(self):
            yield self.readline()
            raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(sd, "open", lambda path, mode: FailingReader(io.FileIO(path)) if path == log
                        else open(path, mode), raising=False)
    one_line_error(lambda: sd.drop_log_lines_after(log, 2), r"cannot read .*log.jsonl \(Input/output error\): "
                   "make it readable, or move it away")
    assert log.read_bytes() == before and os.listdir(tmp_path) == ["log.jsonl"]


def test_a_log_rewritten_by_jq_or_by_hand_keeps_its_lines_when_a_resume_trims_it(tmp_path):
    """--resume dropped every log.jsonl line not written exactly as a run writes it ('{"step": N, ...'): a log
    compacted or key-sorted by jq (-c, -S), or saved by another JSON writer, lost its whole loss history. A line
    past the step with an inner "step" of an earlier one was kept."""
    log = tmp_path / "log.jsonl"
    entries = [{"step": step, "loss": 1.0 / step, "lr": 1e-4} for step in (1, 2, 3, 4)]
    lines = [json.dumps(e, separators=(",", ":"), sort_keys=True) + "\n" for e in entries]   # "step" last
    lines[1] = json.dumps(entries[1], indent=None).replace(": ", " : ") + "\r\n"           # an editor's
    nested = '{"step": 6, "eval": {"step": 1}}\n'          # (a greedy search for "step" found 1, kept it)
    log.write_bytes(("".join(lines) + nested + '{"loss":0.1,"step":5').encode())             # and a cut line
    sd.drop_log_lines_after(log, 3)
    assert log.read_text().splitlines() == "".join(lines[:3]).splitlines()


def test_resume_refuses_changes_of_meaning_warns_on_trajectory_and_trims_the_log(tmp_path, capsys):
    make_dataset(tmp_path / "data")
    base = {"train.steps": 4, "train.save_every": 2, "sample.sample_every": 0}
    sd.train(tiny_config(tmp_path, **base))
    run, state = tmp_path / "run", (tmp_path / "run" / "training_state.safetensors").read_bytes()
    for key, value in {"lora.blocks": "1", "lora.rank": 4, "lora.targets": "attn", "t5_length": 8, "use_t5": False,
                       "dtype": "bf16", "variant": "sd3.5-large", "model": str(tmp_path / "other")}.items():
        with pytest.raises(sd.UserError, match=rf"--resume with changed {key} .*Resume with the run's values"):
            sd.train(tiny_config(tmp_path, **{**base, key: value}), resume=True)
    assert (run / "training_state.safetensors").read_bytes() == state           # nothing touched
    save_file({"param.0": torch.zeros(1)}, tmp_path / "bare.safetensors")
    with pytest.raises(sd.UserError, match="lacks a readable step and config"):
        sd.prepare_resume(tmp_path / "bare.safetensors", tiny_config(tmp_path))
    with (run / "log.jsonl").open("a") as f:                                     # a crash after step 4's checkpoint
        f.write(json.dumps({"step": 5, "loss": 9.0}) + "\n" + '{"step": 6, "lo')
    capsys.readouterr()
    changed = {"train.steps": 6, "train.lr": 1e-3, "sample.guidance_scale": 2}
    lora = sd.train(tiny_config(tmp_path, **{**base, **changed}), resume=True)
    err = capsys.readouterr().err
    assert "changed train.lr 0.003 -> 0.001" in err and "guidance" not in err, err
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == list(range(1, 7))
    meta = json.loads(sd.read_safetensors(lora, with_metadata=True)[1]["sd35_lora"])
    assert meta["resumed_with_changes"] == ["step 4: train.lr 0.003 -> 0.001"] and meta["training"]["lr"] == 1e-3


def test_a_resume_takes_the_model_moved_and_refuses_other_weights_at_its_path(diffusers_folder, tmp_path, capsys):
    """--resume refused any changed `model`, also the same files moved (a cluster job's copy in $SLURM_TMPDIR, a new
    path each job): the run could not go on. The state records its MMDiT files' model_id: the same files at another
    path resume exactly (fp8 too: the id is of the files), noted and recorded in the LoRA; other weights of the same
    shapes there, or a state saved before the id was recorded, are refused as before."""
    make_dataset(tmp_path / "data")
    shutil.copytree(diffusers_folder[0], tmp_path / "old")
    shared = {"model": str(tmp_path / "old"), "fp8": True, "train.save_every": 2, "sample.sample_every": 0,
              "sample.prompts": [], "lora.targets": "attn"}
    sd.train(tiny_config(tmp_path, **shared, **{"train.steps": 4, "output_dir": str(tmp_path / "full")}))
    sd.train(tiny_config(tmp_path, **shared, **{"train.steps": 2}))
    shutil.move(tmp_path / "old", tmp_path / "new")
    shutil.copytree(tmp_path / "new", tmp_path / "other")
    weights = tmp_path / "other/transformer/diffusion_pytorch_model.safetensors"
    save_file({k: torch.randn_like(v) for k, v in load_file(weights).items()}, weights)     # same shapes and size
    state = tmp_path / "run" / sd.STATE_FILE
    tensors, header = sd.read_safetensors(state, with_metadata=True)
    moved = {**shared, "model": str(tmp_path / "new"), "train.steps": 4}
    with pytest.raises(sd.UserError, match=r"--resume with changed model .*other'.*Resume with the run's values"):
        sd.train(tiny_config(tmp_path, **{**moved, "model": str(tmp_path / "other")}), resume=True)
    save_file(tensors, state, {k: v for k, v in header.items() if k != "model"})             # an older version's
    with pytest.raises(sd.UserError, match=r"--resume with changed model .*new'.*Resume with the run's values"):
        sd.train(tiny_config(tmp_path, **moved), resume=True)
    save_file(tensors, state, header)
    capsys.readouterr()
    lora = sd.train(tiny_config(tmp_path, **moved), resume=True)
    note = f"model {str(tmp_path / 'old')!r} -> {str(tmp_path / 'new')!r} (the same weights, moved)"
    assert f"warning: resumed with changed {note} (recorded in the LoRA)" in capsys.readouterr().err
    assert losses(tmp_path / "run") == losses(tmp_path / "full")
    meta = json.loads(sd.read_safetensors(lora, with_metadata=True)[1]["sd35_lora"])
    assert meta["resumed_with_changes"] == [f"step 2: {note}"] and meta["base_model"] == str(tmp_path / "new")


def test_a_resume_takes_a_single_file_moved_and_a_hub_id_swapped_for_its_download_without_downloading(
        diffusers_folder, tmp_path, monkeypatch):
    """An official single file's model_id is the file's own; a hub id's is the one of its cached download, so
    the id swapped for a copy of that folder (or back) resumes. A hub id not in the cache has none (nothing is
    downloaded for the check), nor has the tiny model: a change to or from them is refused as before."""
    import huggingface_hub
    folder, path = diffusers_folder[0], tmp_path / "state.safetensors"
    for place in ("a", "b"):
        (tmp_path / place).mkdir()
        official_single_file(folder, tmp_path / place / "sd3.5_tiny.safetensors")
    snapshot = tmp_path / "hub/models--org--tiny/snapshots/0123abcd"
    shutil.copytree(folder, snapshot)
    weights, blob = snapshot / "transformer/diffusion_pytorch_model.safetensors", snapshot.parents[1] / "blobs/9f"
    blob.parent.mkdir()
    weights.rename(blob)
    weights.symlink_to(blob)                                                    # as the hub's cache holds files
    (tmp_path / "hub/models--org--tiny/refs").mkdir()
    (tmp_path / "hub/models--org--tiny/refs/main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    asked, real = [], huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: asked.append(k) or real(*a, **k))
    params = [torch.zeros(2, requires_grad=True)]

    def resumes(saved: str, model: str) -> bool:
        sd.save_training_state(path, params, torch.optim.AdamW(params), 3, sd.load_config(None, [f"model={saved}"]),
                               [], model=sd.model_id(sd.resolve_model(saved, (), download=False) if saved != "tiny" else None))
        try:
            return bool(sd.prepare_resume(path, sd.load_config(None, [f"model={model}"])))
        except sd.UserError as e:
            assert "--resume with changed model" in str(e)
            return False
    a, b = (str(tmp_path / place / "sd3.5_tiny.safetensors") for place in ("a", "b"))
    assert resumes(a, b) and resumes("org/tiny", str(folder)) and resumes(str(folder), "org/tiny")
    assert not resumes(a, str(folder)) and not resumes("tiny", str(folder)) and not resumes(str(folder), "tiny")
    assert not resumes(str(folder), "org/absent") and not resumes("org/absent", str(folder))
    assert not resumes("tiny", "org/absent")                                    # no ids: nothing alike
    assert asked and all(k.get("local_files_only") for k in asked)


def test_a_run_from_a_hub_id_looks_it_up_once_and_records_its_downloads_id(diffusers_folder, tmp_path, monkeypatch):
    """A hub id was looked up three times a run: in the hub cache by check_sources (the result dropped), downloaded
    by load_pipeline, and looked up again for the state's model_id; now load_pipeline's resolution is the only one."""
    import huggingface_hub
    make_dataset(tmp_path / "data")
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda name, **k: asked.append(name) or str(diffusers_folder[0]))
    sd.train(tiny_config(tmp_path, **{"model": "org/tiny", "train.steps": 1, "sample.sample_every": 0, "sample.prompts": []}))
    assert asked == ["org/tiny"]
    state = sd.read_safetensors(tmp_path / "run" / sd.STATE_FILE, with_metadata=True, prefix=None)[1]
    assert state["model"] == sd.model_id(diffusers_folder[0]) != ""


def test_a_single_file_renamed_is_no_model_a_resume_takes_as_moved(tmp_path):
    """model_id reads a file's name, size and samples of its bytes, not all of it: a renamed file (e.g. a merge
    saved under its own name) is refused on resume, not taken as the same weights moved (only the same name, at
    another path, is)."""
    base, tail = os.urandom(2**20), os.urandom(2**20)
    for place, name, head in (("a", "sd3.5_medium", base), ("b", "sd3.5_medium", base), ("c", "merged", os.urandom(2**20))):
        (tmp_path / place).mkdir()
        (tmp_path / place / f"{name}.safetensors").write_bytes(head + tail)
    a, b, c = (sd.model_id(next((tmp_path / place).iterdir())) for place in "abc")
    assert a == b != c


@pytest.mark.parametrize("weights", ["sd3.5_medium.safetensors",
                                     "transformer/diffusion_pytorch_model.safetensors"])
def test_a_resume_refuses_a_model_of_the_same_name_and_size_that_differs_inside(tmp_path, weights, capsys):
    """model_id read a file's name, size and last MB, where an official file has its y_embedder: a LoRA merged
    into the joint blocks, saved under the official name at another path, resumed as "the same weights, moved"
    and trained on other weights. It reads KiBs spread over the file too: a copy resumes, warned; a file whose
    middle alone differs (as a single file, or a diffusers folder's MMDiT) is refused."""
    head, base, tail = os.urandom(2**20), os.urandom(2**20), os.urandom(2**20)
    for place, middle in (("a", base), ("copy", base), ("merged", os.urandom(2**20))):
        (tmp_path / place / weights).parent.mkdir(parents=True)
        (tmp_path / place / weights).write_bytes(head + middle + tail)
    model = {place: tmp_path / place / weights if "/" not in weights else tmp_path / place
             for place in ("a", "copy", "merged")}
    params, state = [torch.zeros(2, requires_grad=True)], tmp_path / "state.safetensors"
    config = {place: sd.load_config(None, [f"model={path}"]) for place, path in model.items()}
    sd.save_training_state(state, params, torch.optim.AdamW(params), 3, config["a"], [],
                           model=sd.model_id(model["a"]))
    capsys.readouterr()
    assert sd.prepare_resume(state, config["copy"])
    assert "(the same weights, moved)" in capsys.readouterr().err
    with pytest.raises(sd.UserError, match=r"--resume with changed model .*merged.*Resume with the run's"):
        sd.prepare_resume(state, config["merged"])


def test_each_key_a_resume_may_change_is_warned_or_taken_as_its_kind_says(tmp_path, capsys):
    """--resume with a key changed: one that changes only the trajectory from here on (noise levels, the seed,
    the loss weighting, the data) is warned and recorded; one that changes no saved number (where files go, the
    LoRA file's layout, gradient checkpointing, previews) is taken silently; one that changes what the saved
    LoRA and AdamW state mean (rank, alpha, model, text conditioning) is refused."""
    params = [torch.zeros(2, requires_grad=True)]
    path = tmp_path / "state.safetensors"
    sd.save_training_state(path, params, torch.optim.AdamW(params), 3, sd.Config(), [])
    warned = {"text_encoders": "te", "vae": "v", "dataset.path": "d", "dataset.resolution": 512,
              "dataset.default_caption": "x", "dataset.flip": True, "dataset.caption_dropout": 0.2,
              "lora.dropout": 0.1, "sample.shift": 2.0, "train.lr": 1e-3, "train.lr_schedule": "cosine",
              "train.warmup_steps": 5, "train.weight_decay": 0.1, "train.max_grad_norm": 2.0, "train.seed": 1,
              "train.batch_size": 2, "train.grad_accum": 2, "train.timestep_sampling": "mode",
              "train.logit_mean": 0.5, "train.logit_std": 2.0, "train.mode_scale": 1.0, "train.weighting": "cosmap",
              "train.compile": True}
    free = {"output_dir": "o", "device": "cpu", "dataset.cache_dir": "c", "lora.format": "kohya", "train.keep_last": 5,
            "train.steps": 2000, "train.save_every": 10, "train.gradient_checkpointing": False, "train.loss_bins": 3,
            "train.dist_timeout": 60.0, "sample.sampler": "euler", "sample.sample_every": 10,
            "sample.sample_steps": 4, "sample.guidance_scale": 2.0, "sample.prompts": ["x"], "sample.neg": "y",
            "sample.width": 512, "sample.height": 512, "sample.seed": 1}
    refused = {"model": "m", "variant": "sd3.5-large", "dtype": "fp32", "t5_length": 77, "use_t5": False,
               "fp8": True, "lora.rank": 8, "lora.alpha": 8.0, "lora.targets": "all", "lora.blocks": "0-1"}
    listed, keys = set(warned) | set(free) | set(refused), set(sd.flat_config(sd.Config()))
    assert listed == keys, (f"keys not listed here: {sorted(keys - listed)}, gone: {sorted(listed - keys)}. "
                            "Decide what changing a new key on --resume means: RESUME_WARN (trajectory "
                            "only), RESUME_FREE (no saved number) or neither (refused); then add it to "
                            "warned, free or refused above, with a value unlike its default")
    for key, value in {**warned, **free}.items():
        capsys.readouterr()
        changes, _ = sd.prepare_resume(path, sd.load_config(None, [f"{key}={json.dumps(value)}"]))
        err = capsys.readouterr().err
        assert (f"changed {key} " in err, len(changes)) == ((True, 1) if key in warned else (False, 0)), key
    for key, value in refused.items():
        with pytest.raises(sd.UserError, match=f"--resume with changed {key} "):
            sd.prepare_resume(path, sd.load_config(None, [f"{key}={json.dumps(value)}"]))


def spy_reads(monkeypatch):
    """sd.safe_open, counted: (opens per file name, tensor reads per (file name, tensor name))."""
    opens, reads, real = __import__("collections").Counter(), __import__("collections").Counter(), sd.safe_open

    class Spy:
        def __init__(self, path, **kwargs):
            self.file, self.name = real(path, **kwargs), Path(path).name
            opens[self.name] += 1

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def get_tensor(self, key):
            reads[self.name, key] += 1
            return self.file.get_tensor(key)

        def __getattr__(self, name):                                    # keys(), metadata()
            return getattr(self.file, name)
    monkeypatch.setattr(sd, "safe_open", Spy)
    return opens, reads


def test_resume_with_edited_dataset_files_warns_and_records_it(tmp_path, capsys, monkeypatch):
    """The README: a resume with changed data is warned about and recorded, also when dataset.path stays the same
    but its images or captions were edited, added or removed (the losses are no longer the uninterrupted run's).
    The state file (GBs of AdamW moments for Large) is opened twice, not three times: its header before any model
    loads, its tensors (each read once) after."""
    make_dataset(tmp_path / "data")
    base = {"train.steps": 2, "train.save_every": 2, "sample.sample_every": 0}
    sd.train(tiny_config(tmp_path, **base))
    caption = next((tmp_path / "data").glob("*.txt"))
    caption.write_text(caption.read_text() + ", edited")
    capsys.readouterr()
    opens, reads = spy_reads(monkeypatch)
    lora = sd.train(tiny_config(tmp_path, **{**base, "train.steps": 3}), resume=True)
    assert "images or captions in dataset.path changed" in capsys.readouterr().err
    state = [n for (name, _), n in reads.items() if name == sd.STATE_FILE]
    assert opens[sd.STATE_FILE] == 2 and set(state) == {1}, (opens, state)
    meta = json.loads(sd.read_safetensors(lora, with_metadata=True)[1]["sd35_lora"])
    assert meta["resumed_with_changes"] == ["step 2: the images or captions in dataset.path"]
    state = sd.read_safetensors(lora.parent / sd.STATE_FILE, with_metadata=True, prefix=None)[1]
    assert json.loads(state["changes"]) == meta["resumed_with_changes"]         # the next resume keeps them


def test_resume_with_more_steps_warns_only_under_a_cosine_schedule(tmp_path, capsys):
    """More steps extend a constant-lr run freely; under cosine they move the decay: a trajectory change, warned."""
    for schedule, warned in (("constant", False), ("cosine", True)):
        saved = tiny_config(tmp_path, **{"train.lr_schedule": schedule})
        save_file({"param.0": torch.zeros(1)}, tmp_path / "state.safetensors",
                  {"step": "4", "config": json.dumps(dataclasses.asdict(saved))})
        changes = sd.prepare_resume(tmp_path / "state.safetensors",
                                    tiny_config(tmp_path, **{"train.lr_schedule": schedule, "train.steps": 80}))[0]
        assert ("changed train.steps 40 -> 80" in capsys.readouterr().err) == warned
        assert changes == (["step 4: train.steps 40 -> 80"] if warned else [])


def test_resume_that_switches_train_compile_warns_and_records_it(tmp_path, capsys):
    """Compiled blocks round differently (fused kernels; with fp8 on recent GPUs, fp8 matmuls): switching
    train.compile on a resume changes the trajectory as a changed lr does. It was free: silent, unrecorded."""
    save_file({"param.0": torch.zeros(1)}, tmp_path / "state.safetensors",
              {"step": "4", "config": json.dumps(dataclasses.asdict(tiny_config(tmp_path)))})
    changes = sd.prepare_resume(tmp_path / "state.safetensors", tiny_config(tmp_path, **{"train.compile": True}))[0]
    assert changes == ["step 4: train.compile False -> True"]
    assert "changed train.compile False -> True (recorded in the LoRA)" in capsys.readouterr().err


def test_resume_on_a_process_count_that_cannot_keep_the_global_batch_says_which_counts_can(tmp_path, monkeypatch):
    """A global batch of 8 saved on 2 processes: on 3 or 16 no batch_size x grad_accum keeps it (not '2.66667')."""
    saved = tiny_config(tmp_path, **{"train.batch_size": 4})
    save_file({"param.0": torch.zeros(1)}, tmp_path / "state.safetensors",
              {"step": "4", "config": json.dumps(dataclasses.asdict(saved)), "world_size": "2"})
    for world in (3, 16):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        with pytest.raises(sd.UserError) as e:
            sd.prepare_resume(tmp_path / "state.safetensors", tiny_config(tmp_path, **{"train.batch_size": 1}))
        assert str(e.value).endswith(f"had a global batch of 8 on 2 processes: {world} processes cannot share it; "
                                     "resume on a process count that divides 8 (1, 2, 4, 8)"), str(e.value)
    monkeypatch.setenv("WORLD_SIZE", "4")                              # still the hint that keeps it
    with pytest.raises(sd.UserError, match="on 4, keep it with train.batch_size x train.grad_accum = 2, or resume"):
        sd.prepare_resume(tmp_path / "state.safetensors", tiny_config(tmp_path, **{"train.batch_size": 1}))


def test_under_torchrun_dataset_and_resume_warnings_come_once_from_process_0(tmp_path, monkeypatch, capsys):
    """README: process 0 prints for all; 8 GPUs must not print every dataset line or resume warning 8 times."""
    make_dataset(tmp_path / "data")                                             # with a broken image
    Image.new("RGB", (64, 64)).save(tmp_path / "data" / "red_stripes.jpg")      # no caption of its own, shared
    Image.new("RGB", (64, 64)).save(tmp_path / "data" / "lonely.png")           # no caption
    os.symlink(tmp_path / "gone", tmp_path / "data" / "album")                  # a link to a missing folder
    saved = tiny_config(tmp_path)
    save_file({"param.0": torch.zeros(1)}, tmp_path / "state.safetensors",
              {"step": "4", "config": json.dumps(dataclasses.asdict(saved)), "world_size": "2"})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "localhost")                              # as torchrun sets them
    for rank, warnings in (("1", 0), ("0", 7)):
        monkeypatch.setenv("RANK", rank)
        capsys.readouterr()
        assert len(sd.scan_dataset(saved.dataset)) == 4
        sd.prepare_resume(tmp_path / "state.safetensors", tiny_config(tmp_path, **{"train.lr": 1e-3}))
        trainer = stub_trainer(step=4)              # resumed at its last step, its images edited since
        trainer.rank, trainer.changes, trainer.data.contents = int(rank), [], "edited"
        trainer.cfg.train.steps = 4
        sd.note_resume(trainer, {"data": "as saved"})
        out = capsys.readouterr()
        assert out.err.count("warning: ") == warnings and out.out.count("dataset: ") == (rank == "0"), out


def test_resume_keeping_the_global_batch_on_another_split_records_no_change(tmp_path, monkeypatch, capsys):
    """2 processes x batch 1 resumed as 1 x 2 (or 1 x 1 x grad_accum 2) is the same run: no warning, no
    'resumed_with_changes' in the LoRA; a different global batch on as many processes is still a change."""
    saved = tiny_config(tmp_path, **{"train.batch_size": 1})
    save_file({"param.0": torch.zeros(1)}, tmp_path / "state.safetensors",
              {"step": "4", "config": json.dumps(dataclasses.asdict(saved)), "world_size": "2"})
    monkeypatch.setenv("WORLD_SIZE", "1")
    for sets in ({"train.batch_size": 2}, {"train.grad_accum": 2}):
        capsys.readouterr()
        assert sd.prepare_resume(tmp_path / "state.safetensors", tiny_config(tmp_path, **sets))[0] == []
        assert "warning" not in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    changes = sd.prepare_resume(tmp_path / "state.safetensors", tiny_config(tmp_path, **{"train.batch_size": 2}))[0]
    assert changes == ["step 4: train.batch_size 1 -> 2"] and "changed train.batch_size" in capsys.readouterr().err


def test_resume_on_another_split_with_lora_dropout_is_a_recorded_change(tmp_path, monkeypatch, capsys):
    """LoRA dropout's masks follow the split (per process, per micro-batch): batch 2 resumed as 1 x grad_accum 2
    with lora.dropout 0.2 gave other losses (1e-3 off at the 4th step of the tiny run) and was passed off as the
    same run: no warning, nothing recorded."""
    saved = tiny_config(tmp_path, **{"train.batch_size": 2, "lora.dropout": 0.2})
    save_file({"param.0": torch.zeros(1)}, tmp_path / "state.safetensors",
              {"step": "2", "config": json.dumps(dataclasses.asdict(saved)), "world_size": "1"})
    monkeypatch.setenv("WORLD_SIZE", "1")
    changes = sd.prepare_resume(tmp_path / "state.safetensors",
                                tiny_config(tmp_path, **{"train.grad_accum": 2, "lora.dropout": 0.2}))[0]
    assert changes == ["step 2: train.batch_size 2 -> 1; train.grad_accum 1 -> 2"]
    assert "changed train.batch_size 2 -> 1" in capsys.readouterr().err


def test_non_finite_numbers_are_refused_and_never_saved_as_black_images(tmp_path, capsys):
    for flag in ("--cfg=nan", "--shift=inf", "--slg-scale=-inf", "--lora-scale=nan"):
        with pytest.raises(SystemExit):
            sample.parse_args(["--model", "tiny", "--prompt", "x", flag])
        assert "expected a finite number" in capsys.readouterr().err.splitlines()[-1]
    for key, value in (("sample.guidance_scale", math.nan), ("sample.shift", math.inf), ("train.lr", ".inf")):
        with pytest.raises(sd.UserError, match=f"'{key}' must be a finite number"):
            sd.load_config(None, [f"{key}={value}"])
    with pytest.raises(sd.UserError, match="finite"):
        sd.SampleSettings(cfg=math.nan).resolved("sd3.5-large")
    model = lora_model()
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    sd.save_lora(model, good, "kohya")
    tensors = load_file(good)
    tensors["lora_unet_joint_blocks_1_x_block_mlp_fc2.alpha"] = torch.tensor(math.inf)
    save_file(tensors, bad)
    with pytest.raises(sd.UserError, match=r"'lora_unet_joint_blocks_1_x_block_mlp_fc2.alpha' holds NaN/inf"):
        sd.load_lora(tiny_mmdit(), bad)
    pipe = sd.tiny_pipeline()                      # finite but overflowing once merged: refused at load
    sd.add_lora(pipe.mmdit, rank=2, targets="final_layer")
    for layer in sd.lora_layers(pipe.mmdit).values():
        layer.lora_up.weight.data.fill_(1e30)
        layer.lora_down.weight.data.fill_(1e30)
    sd.save_lora(pipe.mmdit, tmp_path / "huge.safetensors")
    args = ["--model", "tiny", "--prompt", "a", "--prompt", "b", "--steps", "2", "--width", "32", "--height", "32"]
    with pytest.raises(sd.UserError, match="would overflow to inf"):              # refused before it merges
        sample.main([*args, "--lora", str(tmp_path / "huge.safetensors"), "--out", str(tmp_path / "out")])
    with pytest.raises(sd.UserError, match=r"NaN/inf values \(black images\)"):
        sample.main([*args, "--cfg", "1e30", "--out", str(tmp_path / "out")])
    assert not list(tmp_path.glob("out/*.png"))
    make_dataset(tmp_path / "data")                # training previews: a warning, no black PNG, training goes on
    sd.train(tiny_config(tmp_path, **{"train.steps": 1, "sample.guidance_scale": 1e30}))
    assert "NaN/inf values (black images)" in capsys.readouterr().err
    assert not list((tmp_path / "run").rglob("*.png"))
    assert len(losses(tmp_path / "run")) == 1


def test_black_images_advise_fp32_only_to_a_run_that_is_not_fp32_already():
    """NaN/inf images advised "lower the cfg/LoRA scale or use fp32" to a run already in fp32 (the CPU's
    default)."""
    for dtype, advice in ((torch.float32, "lower the cfg/LoRA scale$"), (torch.bfloat16, "scale or use fp32$")):
        error = sd.nan_images_error(sd.tiny_pipeline(dtype=dtype), text_encoded=True)
        assert re.search(advice, str(error)), (dtype, str(error))


def test_a_run_without_previews_says_nothing_about_their_negative_prompt(tmp_path, capsys):
    """sample.neg at cfg 1 is worth a warning only where previews are made: none without sample.prompts."""
    make_dataset(tmp_path / "data")
    sd.train(tiny_config(tmp_path, **{"train.steps": 1, "sample.prompts": [], "sample.guidance_scale": 1,
                                      "sample.neg": "blurry"}))
    assert "sample.neg" not in capsys.readouterr().err


def test_training_previews_without_cfg_say_once_that_sample_neg_is_unused(tmp_path, capsys):
    """sample.py warns that a negative prompt does nothing at cfg 1 or less (Large Turbo's preset); training
    previews ignored sample.neg there without a word. With CFG they use it: a run whose previews took the empty
    negative prompt passed. The step-0 previews (LoRA still zero) are generate()'s with sample.neg (without it:
    5/255 off), or without it at cfg 1, and with the sample settings (sample.sampler ignored: 142/255 off)."""
    make_dataset(tmp_path / "data")
    previews = {}
    for cfg, said in ((1, 1), (2, 0)):                                     # previews at steps 0 and 1: said once
        sd.train(tiny_config(tmp_path, **{"train.steps": 1, "sample.guidance_scale": cfg, "sample.neg": "blurry",
                                          "sample.sampler": "euler", "output_dir": str(tmp_path / f"cfg{cfg}")}))
        assert capsys.readouterr().err.count("warning: sample.neg has no effect without CFG (the previews' cfg") == said
        previews[cfg] = images_of(sorted((tmp_path / f"cfg{cfg}/samples_step_000000").glob("*.png"))).astype(int)
    pipe = sd.tiny_pipeline()

    def made(cfg: float, negative: str) -> np.ndarray:
        settings = sd.SampleSettings(steps=3, cfg=cfg, sampler="euler", width=32, height=32, seed=42)
        images = sd.generate(pipe, ["red stripes", "blue disc"], negative, settings, progress=False)
        return np.stack([np.asarray(image) for image in images]).astype(int)
    assert np.abs(previews[2] - made(2.0, "blurry")).max() <= 1 < np.abs(previews[2] - made(2.0, "")).max()
    assert np.abs(previews[1] - made(1.0, "")).max() <= 1


def test_nan_in_the_model_weights_is_named_not_blamed_on_the_settings(tmp_path, monkeypatch):
    """A damaged checkpoint holding NaN loads (a check of every weight while loading would cost seconds per
    gigabyte); the NaN images or loss it gives name the weight, not the cfg scale or train.lr."""
    name = "joint_blocks.1.x_block.mlp.fc1.weight"
    fast = sd.SampleSettings(steps=1, cfg=1.0, width=32, height=32)
    for fp8 in (False, True):                                   # fp8 weights: their row scales show it
        pipe = sd.tiny_pipeline()
        pipe.mmdit.get_parameter(name).data[3, 5] = math.nan
        pipe.mmdit = sd.quantize_mmdit(pipe.mmdit) if fp8 else pipe.mmdit
        one_line_error(lambda: sd.generate(pipe, ["x"], settings=fast),
                       rf"black images\): the weight {name.removesuffix('weight')}weight(_scale)? holds NaN/inf .*"
                       "download the model again")
    make_dataset(tmp_path / "data")                             # a LoRA diverged by its lr: the lr is blamed
    one_line_error(lambda: sd.train(tiny_config(tmp_path, **{"sample.sample_every": 0, "train.lr": 1e38})),
                   "at step 2; stopped without saving: lower train.lr")
    real_tiny = sd.tiny_pipeline

    def damaged(*args, **kwargs):
        pipe = real_tiny(*args, **kwargs)
        pipe.mmdit.get_parameter(name).data[3, 5] = math.inf
        return pipe
    monkeypatch.setattr(sd, "tiny_pipeline", damaged)
    one_line_error(lambda: sd.train(tiny_config(tmp_path, **{"sample.sample_every": 0, "output_dir": str(tmp_path / "b")})),
                   rf"loss became nan .* at step 1; stopped without saving: the weight {name} holds NaN/inf")


def test_sample_cli_never_overwrites_and_slg_is_off_unless_asked(tmp_path, capsys):
    args = ["--model", "tiny", "--prompt", "a cat", "--steps", "2", "--width", "32", "--height", "32",
            "--out", str(tmp_path)]
    first = sample.main(args)[0].read_bytes()
    second = sample.main([*args, "--slg", "--seed", "1"])
    assert second == [tmp_path / "sample_01.png"] and (tmp_path / "sample_00.png").read_bytes() == first
    printed = capsys.readouterr()
    assert f"saved to {tmp_path}: sample_01.png" in printed.out
    assert ("warning: skip-layer guidance layers [7, 8, 9] (sd3.5-medium's) are not in this 3-block model: left "
            "out") in printed.err                                   # --slg asked for: not silently off
    params = [json.loads(Image.open(tmp_path / f"sample_0{i}.png").text["parameters"]) for i in (0, 1)]
    assert params[0]["slg_scale"] == 0.0 and params[1]["slg_scale"] == 0.0   # the tiny model has no block 7,8,9
    on = sd.SampleSettings(slg_scale=None).resolved("sd3.5-medium", depth=24)    # --slg on Medium's 24 blocks
    assert (on.slg_scale, on.slg_layers) == (2.5, (7, 8, 9))
    assert sd.SampleSettings().resolved("sd3.5-medium").slg_scale == 0.0           # both references' default
    with pytest.raises(sd.UserError, match="sd3.5-large has no recommended ones.*--slg-scale and --slg-layers"):
        sd.SampleSettings(slg_scale=None).resolved("sd3.5-large")
    readme = (ROOT / "README.md").read_text()
    assert "--skip_layer_cfg" in readme and readme.count("sd3_infer.py") >= 2
    (tmp_path / "sample_01.png").rename(tmp_path / "sample_05.png")     # numbered on after the last, not in a gap
    assert sample.main(args) == [tmp_path / "sample_06.png"]


def test_sample_cli_samples_a_lora_on_the_model_it_was_trained_on_without_model(tmp_path, capsys):
    """`python sample.py --lora x.safetensors` was refused for want of --model, though the LoRA records the
    model it was trained on; LoRAs of other models, or of none recorded, still need --model."""
    mmdit = sd.tiny_pipeline().mmdit
    sd.add_lora(mmdit, rank=2)
    for name, base in (("tiny", "tiny"), ("other", "stabilityai/stable-diffusion-3.5-large"), ("none", None),
                       ("hostile", [1])):
        sd.save_lora(mmdit, tmp_path / f"{name}.safetensors", metadata={"base_model": base} if base else {})
    args = ["--prompt", "a cat", "--steps", "1", "--width", "32", "--height", "32", "--out", str(tmp_path / "out")]
    paths = sample.main(["--lora", str(tmp_path / "tiny.safetensors"), *args])
    assert json.loads(Image.open(paths[0]).text["parameters"])["model"] == "tiny"
    assert "model: tiny (the --lora's, as trained" in capsys.readouterr().out
    for loras in (["tiny", "other"], ["none"], ["hostile"]):
        lora_args = [arg for name in loras for arg in ("--lora", str(tmp_path / f"{name}.safetensors"))]
        one_line_error(lambda: sample.main([*lora_args, *args]), "no one model recorded as trained on .*give --model")
    with pytest.raises(SystemExit) as exit_info:
        sample.parse_args(args)
    assert exit_info.value.code == 2 and "give --model (or a --lora" in capsys.readouterr().err
    one_line_error(lambda: sample.main(["--lora", str(tmp_path / "tiny.safetensors"), "--vae", str(tmp_path), *args]),
                   "the tiny model has its own random text encoders")       # the LoRA's tiny: --vae was unused


def test_a_loras_metadata_text_of_megabytes_or_escape_codes_is_never_printed(tmp_path, capsys):
    """A downloaded LoRA's metadata is untrusted: a base_model of megabytes was printed whole (twice) and tried
    as a path, and a variant holding escape codes was printed raw in the 'was trained on' warning."""
    mmdit = sd.tiny_pipeline().mmdit
    sd.add_lora(mmdit, rank=2)
    sd.save_lora(mmdit, tmp_path / "big.safetensors", metadata={"base_model": "m" * 200_000})
    sd.save_lora(mmdit, tmp_path / "red.safetensors", metadata={"base_model": "tiny", "variant": "\x1b[31mred"})
    args = ["--prompt", "a cat", "--steps", "1", "--width", "32", "--height", "32", "--out", str(tmp_path / "out")]
    one_line_error(lambda: sample.main(["--lora", str(tmp_path / "big.safetensors"), *args]),
                   "^no one model recorded as trained on .*give --model$")
    capsys.readouterr()
    sample.main(["--lora", str(tmp_path / "red.safetensors"), *args])
    out = capsys.readouterr()
    assert "\x1b" not in out.out + out.err and "was trained on" not in out.err, out.err
    sd.save_lora(mmdit, tmp_path / "title.safetensors", metadata={"base_model": "\x1b]0;a title\x07tiny"})
    one_line_error(lambda: sample.main(["--lora", str(tmp_path / "title.safetensors"), *args]),
                   "^no one model recorded as trained on .*give --model$")      # never printed, nor tried


def test_skip_layers_outside_the_model_are_an_error_not_ignored():
    pipe = sd.tiny_pipeline()                                            # 3 joint blocks
    for layers in ((1, 5), (-1,)):                                       # a typo would silently skip nothing
        settings = sd.SampleSettings(steps=1, slg_scale=2.5, slg_layers=layers, width=32, height=32)
        with pytest.raises(sd.UserError, match=r"skip-layer guidance layers \[-?\d\] are not in this 3-block"):
            sd.generate(pipe, ["a cat"], settings=settings, progress=False)
    preset = sd.SampleSettings(steps=1, slg_scale=None, width=32, height=32)   # --slg: 7,8,9 of Medium's 24
    assert len(sd.generate(pipe, ["a cat"], settings=preset, progress=False)) == 1


def test_skip_layer_guidance_with_too_few_steps_for_its_window_is_refused():
    """SLG acts on the steps past 1 % and before 20 % of the run (as in both references): with 5 steps or fewer
    no step is, so --slg-scale was silently ignored (the same image as without it) and recorded as having run."""
    for steps in (1, 5):
        with pytest.raises(sd.UserError, match=f"skip-layer guidance.*no step of a {steps}-step one: use more"):
            sd.SampleSettings(steps=steps, slg_scale=2.5, slg_layers=(1,)).resolved("sd3.5-medium", depth=3)
    with pytest.raises(sd.UserError, match="no step of a 4-step one"):                 # --slg on Medium's 24 blocks
        sd.SampleSettings(steps=4, slg_scale=None).resolved("sd3.5-medium", depth=24)
    for steps in (6, 100, 10**9):
        assert sd.SampleSettings(steps=steps, slg_scale=2.5, slg_layers=(1,)).resolved("sd3.5-medium").slg_scale
    assert sd.SampleSettings(steps=1, slg_scale=None).resolved("sd3.5-medium", depth=3).slg_scale == 0.0


def test_png_parameters_record_the_skip_layer_guidance_that_ran(tmp_path):
    """--slg on the 3-block tiny model recorded layers 7,8,9 at scale 2.5 though none of them ran, and with
    --cfg 1 skip-layer guidance never runs (it guides the CFG step) while the PNG recorded it too."""
    base = ["--model", "tiny", "--prompt", "a cat", "--steps", "8", "--width", "32", "--height", "32"]
    runs = {"off": [], "preset": ["--slg"], "given": ["--slg-scale", "2.5", "--slg-layers", "1,2"]}
    params, images = {}, {}
    for name, extra in runs.items():
        path = sample.main([*base, *extra, "--out", str(tmp_path / name)])[0]
        params[name], images[name] = json.loads(Image.open(path).text["parameters"]), images_of([path])
    assert (params["preset"]["slg_scale"], params["preset"]["slg_layers"]) == (0.0, [])
    assert images["preset"].tolist() == images["off"].tolist()
    assert (params["given"]["slg_scale"], params["given"]["slg_layers"]) == (2.5, [1, 2])
    assert images["given"].tolist() != images["off"].tolist()
    for name in ("given", "preset"):      # --slg --cfg 1 too, though none of Medium's 7,8,9 is in the tiny model
        with pytest.raises(sd.UserError, match="skip-layer guidance works only with CFG.*raise --cfg"):
            sample.main([*base, *runs[name], "--cfg", "1", "--out", str(tmp_path / "nocfg")])
    with pytest.raises(sd.UserError, match=r"layers \[7, 8, 9\] are not in this 3-block"):   # typed: no preset
        sample.main([*base, "--slg-scale", "2.5", "--slg-layers", "7,8,9", "--out", str(tmp_path / "typed")])
    partial = sd.SampleSettings(slg_scale=None).resolved("sd3.5-medium", depth=8)   # what runs is recorded
    assert (partial.slg_scale, partial.slg_layers) == (2.5, (7,))


def test_the_sample_commands_the_docs_show_are_complete():
    """README and sample.py's docstring showed `python sample.py --model ... --lora my.safetensors` without a
    --prompt: copied as shown, it only said "give at least one --prompt"."""
    import re
    import shlex
    docs = [(ROOT / doc).read_text().replace("\\\n", " ") for doc in ("README.md", "sample.py", "sd35_lora.py")]
    commands = [line for doc in docs for line in re.findall(r"^\s*python sample\.py (.+)$", doc, re.M)]
    assert len(commands) >= 6
    for command in commands:
        sample.parse_args(shlex.split(command, comments=True))


def test_the_python_example_in_the_readme_runs(tmp_path, monkeypatch):
    """README's "From Python" block, run as shown on the tiny model (its hub id, LoRA file, sizes and config
    replaced): a renamed function or argument there fails here."""
    code = re.search(r"## From Python.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    tiny_config = [*sd.TINY_RUN, "output_dir=run", "train.steps=2", "sample.sample_every=0"]
    for shown, tried in [('"stabilityai/stable-diffusion-3.5-medium"', '"tiny"'),
                         ("seed=7)", "seed=7, steps=2, width=64, height=64)"),
                         ('sd.load_config("config.yaml", ["train.steps=500"])',
                          f"sd.load_config(None, {tiny_config})")]:
        assert shown in code
        code = code.replace(shown, tried)
    monkeypatch.chdir(tmp_path)
    sd.write_demo_dataset(Path(sd.TINY_DATA))
    lora_model = sd.load_pipeline("tiny").mmdit
    sd.add_lora(lora_model, 4)
    sd.save_lora(lora_model, tmp_path / "runs/lora/lora.safetensors")
    scope = {}
    exec(code, scope)
    assert Image.open(tmp_path / "fox.png").size == (64, 64)
    assert scope["lora_file"] == Path("run/lora.safetensors") and scope["lora_file"].is_file()


def test_the_run_commands_in_the_module_docstrings_print_as_written():
    """sample.py --help (its docstring) joined a command continued with a backslash into one line broken by a
    run of spaces: a non-raw docstring reads a backslash at a line's end as a line continuation."""
    for module in (sd, sample):
        assert module.__doc__ in Path(module.__file__).read_text(encoding="utf-8")


def test_sample_cli_help_lists_the_variants_without_an_empty_one(capsys):
    """sample.py --help listed --variant {,sd3-medium,...}: the config's "" (detect it) as a choice to type."""
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    assert "--variant {sd3-medium,sd3.5-medium," in capsys.readouterr().out
    assert sample.parse_args(["--model", "tiny", "--prompt", "a cat"]).variant == ""        # detected


def test_sample_cli_refuses_a_shift_out_of_range_before_loading_the_model(capsys):
    """README: a --shift outside 0.001..1000 is refused up front. It was refused by generate(), after the models
    had loaded (minutes for Large)."""
    for shift in ("2000", "0.0001", "-3"):
        with pytest.raises(SystemExit) as exit_info:
            sample.parse_args(["--model", "tiny", "--prompt", "a cat", "--shift", shift])
        assert exit_info.value.code == 2 and "--shift" in capsys.readouterr().err
    assert sample.parse_args(["--model", "tiny", "--prompt", "a cat", "--shift", "1000"]).shift == 1000


def test_sample_cli_refuses_a_lora_scale_without_a_lora(capsys):
    base = ["--model", "tiny", "--prompt", "a cat"]
    with pytest.raises(SystemExit) as exit_info:                         # would sample without any LoRA
        sample.parse_args([*base, "--lora-scale", "0.8"])
    assert exit_info.value.code == 2 and "--lora-scale" in capsys.readouterr().err
    assert sample.parse_args([*base, "--lora", "a", "--lora", "b", "--lora-scale", "0.8"]).lora_scale == [0.8]


def test_a_lora_that_changes_nothing_says_so(tmp_path, capsys):
    """A LoRA whose up weights are all zero (saved before a training step: up starts at zero) or whose alpha is 0
    loaded as 'loaded ... on N layers' and gave the base model's images, not a word why."""
    g, key = torch.Generator().manual_seed(0), "lora_unet_joint_blocks_{}_x_block_attn_proj"
    pair = lambda i, up, alpha: {f"{key.format(i)}.lora_down.weight": torch.randn(2, 64, generator=g),
                                 f"{key.format(i)}.lora_up.weight": up, f"{key.format(i)}.alpha": torch.tensor(alpha)}
    for tensors in ({**pair(0, torch.zeros(64, 2), 1.0), **pair(1, torch.zeros(64, 2), 1.0)},
                    pair(0, torch.randn(64, 2, generator=g), 0.0)):
        save_file(tensors, tmp_path / "nothing.safetensors")
        assert sd.load_lora(tiny_mmdit(), tmp_path / "nothing.safetensors") == len(tensors) // 3
        assert "nothing.safetensors changes no weight (all its LoRA products are zero" in capsys.readouterr().err
    save_file({**pair(0, torch.zeros(64, 2), 1.0), **pair(1, torch.randn(64, 2, generator=g), 1.0)},
              tmp_path / "some.safetensors")                    # a zero layer beside others: as ComfyUI saves
    assert sd.load_lora(tiny_mmdit(), tmp_path / "some.safetensors") == 2
    assert capsys.readouterr().err == ""


def test_sample_cli_says_a_loras_scale_goes_in_lora_scale_not_after_a_colon(tmp_path, capsys):
    """--lora style.safetensors:0.7 (ComfyUI's and A1111's file:strength habit) said 'file not found:
    style.safetensors:0.7', not what to type instead. A file whose name does end in :0.7 is still read."""
    lora = tmp_path / "style.safetensors"
    save_file({"a.lora_A.weight": torch.zeros(1)}, lora)
    base = ["--model", "tiny", "--prompt", "a cat"]
    with pytest.raises(SystemExit) as exit_info:
        sample.parse_args([*base, "--lora", f"{lora}:0.7"])
    assert exit_info.value.code == 2 and f"--lora {lora} --lora-scale 0.7" in capsys.readouterr().err
    (tmp_path / "style.safetensors:0.7").write_bytes(b"")
    assert sample.parse_args([*base, "--lora", f"{lora}:0.7"]).lora == [f"{lora}:0.7"]
    assert sample.parse_args([*base, "--lora", f"{tmp_path}/none:0.7"]).lora == [f"{tmp_path}/none:0.7"]


def test_sample_cli_refuses_a_bad_size_before_loading_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(sd, "load_pipeline", lambda *a, **k: pytest.fail("the models loaded before the error"))
    for size in (["--width", "1000"], ["--height", "0"]):               # generate() refuses it after loading
        with pytest.raises(sd.UserError, match="positive multiples of 16"):
            sample.main(["--model", "tiny", "--prompt", "a cat", "--out", str(tmp_path), *size])


def test_sample_cli_refuses_more_steps_than_max_steps_before_loading_the_model(tmp_path, monkeypatch):
    """--steps 100000000000 (a typo) was refused only by generate(), after the models had loaded: minutes
    for SD3.5 Large, as sample.sample_steps was before validate took it."""
    monkeypatch.setattr(sd, "load_pipeline", lambda *a, **k: pytest.fail("the models loaded before the error"))
    with pytest.raises(sd.UserError, match=f"--steps must be in 1..{sd.MAX_STEPS}, got 100000000000"):
        sample.main(["--model", "tiny", "--prompt", "a cat", "--out", str(tmp_path), "--steps", "100000000000"])


def test_sample_cli_refuses_skip_layers_without_a_scale(capsys):
    base = ["--model", "tiny", "--prompt", "a cat"]
    with pytest.raises(SystemExit) as exit_info:                         # the scale's default 0 = no SLG
        sample.parse_args([*base, "--slg-layers", "7,8,9"])
    assert exit_info.value.code == 2 and "--slg-layers needs --slg-scale" in capsys.readouterr().err
    for scale in (["--slg"], ["--slg-scale", "2.5"]):
        assert sample.parse_args([*base, *scale, "--slg-layers", "7,8,9"]).slg_layers == (7, 8, 9)
    with pytest.raises(SystemExit):                                      # not argparse's "invalid <lambda>"
        sample.parse_args([*base, "--slg", "--slg-layers", "7,x"])
    assert "expected joint block numbers such as 7,8,9, got '7,x'" in capsys.readouterr().err


def test_sample_cli_refuses_a_prompt_that_is_not_utf8_before_loading(capsys):
    """--prompt "$(cat prompt.txt)" of a Latin-1 file (or a Latin-1 terminal) gives Python lone surrogates
    ('caf\\udce9'): the tokenizers raised a bare TypeError traceback after the models had loaded."""
    for flag in ("--prompt", "--negative"):
        args = ["--model", "tiny", "--prompt", "a cat", flag, "caf\udce9"]
        with pytest.raises(SystemExit) as exit_info:
            sample.parse_args(args)
        assert exit_info.value.code == 2 and "not UTF-8 text" in capsys.readouterr().err
    ok = sample.parse_args(["--model", "tiny", "--prompt", "café 🦊", "--prompt", "", "--negative", "ü"])
    assert (ok.prompt, ok.negative) == (["café 🦊", ""], "ü")


def test_sample_cli_under_torchrun_is_refused_once_not_run_in_every_process(tmp_path, monkeypatch, capsys):
    """torchrun --nproc_per_node=2 sample.py: each process made every image (sample_00..03 for 2 prompts), their
    bars drew over each other and each printed its own "saved to" line."""
    monkeypatch.setattr(sd, "load_pipeline", lambda *a, **k: pytest.fail("the models loaded"))
    for name, value in (("WORLD_SIZE", "2"), ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    args = ["--model", "tiny", "--prompt", "a cat", "--out", str(tmp_path)]
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(sd.UserError, match="run it with python, not torchrun"):      # process 0 says why
        sample.main(args)
    # the same variables from a job script (srun), with `python sample.py`: it said "not torchrun" only
    one_line_error(lambda: sample.main(args), r"not torchrun or srun, with WORLD_SIZE unset \(it is 2; a job script")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_info:                                     # the others: only a code
        sample.main(args)
    assert exit_info.value.code == 1 and capsys.readouterr() == ("", "") and not list(tmp_path.iterdir())
    monkeypatch.undo()                                          # the models load again
    monkeypatch.setenv("WORLD_SIZE", "2")                       # a WORLD_SIZE a cluster exports, no torchrun:
    monkeypatch.delenv("MASTER_ADDR", raising=False)            # sample.py runs as ever
    assert len(sample.main([*args, "--width", "32", "--height", "32", "--steps", "1"])) == 1


def test_sample_cli_compile_compiles_the_mmdit_that_samples(tmp_path, monkeypatch):
    """No test gave sample.py --compile (a CPU compile takes minutes): sample.py ignoring it passed. Its blocks
    are compiled (compile_blocks, spied on here; what it does is test_compiled_blocks_train_and_sample_like_eager's)
    on the MMDiT that then samples, and only with the flag."""
    compiled, sampled, real_generate = [], [], sd.generate
    monkeypatch.setattr(sd.MMDiT, "compile_blocks", lambda mmdit: compiled.append(mmdit) or mmdit)

    def generate(pipe, *args, **kwargs):
        sampled.append(pipe.mmdit)
        return real_generate(pipe, *args, **kwargs)
    monkeypatch.setattr(sd, "generate", generate)
    for flags in (["--compile"], []):
        sample.main(["--model", "tiny", "--prompt", "a", "--steps", "1", "--width", "32", "--height", "32", *flags,
                     "--out", str(tmp_path)])
    assert len(compiled) == 1 and compiled[0] is sampled[0]


def test_torchrun_is_a_world_size_over_1_with_its_master_addr_for_sample_py_and_error_tags(monkeypatch):
    """One answer for sample.py's refusal and main()'s "process N: " tag: a WORLD_SIZE alone (a cluster's) is none."""
    for world, master, under in (("", None, False), ("1", "localhost", False), ("2", None, False), ("2", "h", True)):
        monkeypatch.setenv("WORLD_SIZE", world)
        if master:
            monkeypatch.setenv("MASTER_ADDR", master)
        else:
            monkeypatch.delenv("MASTER_ADDR", raising=False)
        assert sd.under_torchrun() is under, (world, master)


def test_a_process_count_in_the_environment_that_is_no_number_is_a_one_line_error(tmp_path, monkeypatch):
    """WORLD_SIZE=abc (or RANK=abc under torchrun's variables) exported by a job script: sample.py and training
    ended in a bare ValueError traceback ("invalid literal for int()") naming neither the variable nor a fix."""
    for name, env in (("WORLD_SIZE", {"WORLD_SIZE": "abc"}),
                      ("RANK", {"WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "RANK": "abc"}),
                      ("LOCAL_RANK", {"WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "RANK": "1", "LOCAL_RANK": "x"})):
        for variable, value in env.items():
            monkeypatch.setenv(variable, value)
        monkeypatch.setattr(sd, "load_pipeline", lambda *a, **k: pytest.fail("the models loaded"))
        error = rf"the environment's {name}='[a-z]+' is not a whole number: unset it"
        if name != "LOCAL_RANK":                        # (sample.py refuses torchrun before it needs a GPU)
            one_line_error(lambda: sample.main([*TINY_SAMPLE_ARGS, "--out", str(tmp_path / "out")]), error)
        r = run_cli("sd35_lora.py", "--set", "model=tiny", "--set", f"output_dir={tmp_path / 'run'}", **env)
        assert r.returncode == 1 and re.fullmatch(f"error: {error}.*\n", r.stderr), r.stderr[-2000:]
        monkeypatch.undo()
    assert not list(tmp_path.iterdir())


def test_a_failed_sample_cli_removes_the_empty_out_folders_it_made_and_no_other(tmp_path, monkeypatch):
    """sample.py failing after it made --out (here the model fails to load) left that folder, and those it made
    above it, empty behind: one per failed try. Only those it made go, and only while empty."""
    def cannot_load(*args, **kwargs):
        raise sd.UserError("cannot load")
    monkeypatch.setattr(sd, "load_pipeline", cannot_load)
    (tmp_path / "there").mkdir()
    for out in ("new/out", "there"):
        one_line_error(lambda: sample.main([*TINY_SAMPLE_ARGS, "--out", str(tmp_path / out)]), "cannot load")
    assert [p.name for p in tmp_path.iterdir()] == ["there"]


def test_sample_cli_refuses_text_encoders_or_a_vae_for_the_tiny_model(tmp_path):
    for flag in ("--text-encoders", "--vae"):                           # it has its own: the path went unused
        one_line_error(lambda: sample.main(["--model", "tiny", "--prompt", "a cat", flag, "/no/such/path",
                                            "--out", str(tmp_path / "out")]), "the tiny model has its own")
    assert not (tmp_path / "out").exists()                              # refused before anything is made


def test_sampling_denoises_batch_size_images_at_a_time_with_the_same_images(tmp_path, monkeypatch):
    """sample.py denoised every --prompt in one batch (twice that with CFG): ten prompts on a small GPU ran out
    of memory. Image i has its own seed, so one image at a time (the default, also for the training's previews)
    gives the same images (batched matmuls round differently: within 1/255) under the same names. They are
    generate()'s with the flags' settings: a --shift or --schedule left unused changes them by 8/255."""
    sizes, real = [], sd.denoise
    monkeypatch.setattr(sd, "denoise", lambda model, x, *a, **k: sizes.append(len(x)) or real(model, x, *a, **k))
    base = ["--model", "tiny", "--prompt", "red", "--prompt", "a fox", "--prompt", "blue", "--negative", "ugly",
            "--cfg", "4", "--steps", "4", "--shift", "2", "--schedule", "cosine", "--width", "48", "--height",
            "32", "--seed", "5"]
    runs = {size: sample.main([*base, *extra, "--out", str(tmp_path / size)])
            for size, extra in (("1", []), ("2", ["--batch-size", "2"]), ("3", ["--batch-size", "3"]))}
    assert sizes == [1, 1, 1, 2, 1, 3]
    names = {size: [p.name for p in paths] for size, paths in runs.items()}
    assert names["1"] == names["2"] == names["3"] == ["sample_00.png", "sample_01.png", "sample_02.png"]
    params = {size: [Image.open(p).text["parameters"] for p in paths] for size, paths in runs.items()}
    assert params["1"] == params["2"] == params["3"]
    images = {size: images_of(paths).astype(int) for size, paths in runs.items()}
    assert np.abs(images["1"] - images["3"]).max() <= 1 and np.abs(images["2"] - images["3"]).max() <= 1
    assert (json.loads(params["1"][0])["shift"], json.loads(params["1"][0])["schedule"]) == (2.0, "cosine")
    pipe = sd.tiny_pipeline(t5_length=sd.T5_LENGTH)
    s = sd.SampleSettings(steps=4, cfg=4.0, shift=2.0, schedule="cosine", width=48, height=32)
    alone = [np.asarray(sd.generate(pipe, [p], "ugly", dataclasses.replace(s, seed=5 + i), progress=False)[0])
             for i, p in enumerate(["red", "a fox", "blue"])]
    assert np.abs(images["1"] - np.stack(alone)).max() <= 1


def test_the_text_encoders_take_batch_size_prompts_at_a_time_with_the_same_images(monkeypatch):
    """generate() denoised batch_size images at a time but encoded all the prompts, and as many negatives, in one
    batch each: T5-XXL on 20 prompts needs ~0.8 GB more than on one, on top of its 9.5 GB of weights (a 12 GB GPU
    ran out of memory where one prompt at a time fits). The text encoders take batch_size prompts at a time too;
    image i keeps its seed, so one at a time gives exactly the images of each prompt alone. The negative prompt,
    the same for all, is encoded once (it was encoded once per prompt: [1, 1, 2, 2] here, six times one by one)."""
    pipe = sd.tiny_pipeline()
    encoded, real = [], pipe.text.encode
    monkeypatch.setattr(pipe.text, "encode", lambda prompts: encoded.append(list(prompts)) or real(prompts))
    s = sd.SampleSettings(steps=2, cfg=4.0, width=32, height=32, seed=3)
    prompts = ["red", "a fox", "blue"]
    together = np.stack(sd.generate(pipe, prompts, "ugly", s, progress=False, batch_size=2)).astype(int)
    assert sorted(encoded) == [["blue"], ["red", "a fox"], ["ugly"]]
    one_by_one = np.stack(sd.generate(pipe, prompts, "ugly", s, progress=False))
    assert encoded[3:] == [["red"], ["a fox"], ["blue"], ["ugly"]]
    alone = [sd.generate(pipe, [p], "ugly", dataclasses.replace(s, seed=3 + i), progress=False)[0]
             for i, p in enumerate(prompts)]
    assert np.array_equal(one_by_one, np.stack(alone)) and np.abs(together - one_by_one).max() <= 1
    encoded.clear()                                             # no CFG: no negative prompt encoded
    sd.generate(pipe, prompts, "ugly", dataclasses.replace(s, cfg=1.0), progress=False, batch_size=2)
    assert encoded == [["red", "a fox"], ["blue"]]


def test_offloaded_sampling_gives_the_images_of_sampling_in_place():
    """With offload, generate() asks too_large_for whether the MMDiT and the VAE fit together (the test above
    stubs it): on the CPU they do, and the images are those made without offload."""
    pipe, settings = sd.tiny_pipeline(), sd.SampleSettings(steps=2, width=32, height=32)
    in_place = sd.generate(pipe, ["a", "b"], settings=settings, progress=False)
    offloaded = sd.generate(pipe.place(offload=True), ["a", "b"], settings=settings, progress=False)
    assert [np.array(image).tolist() for image in offloaded] == [np.array(im).tolist() for im in in_place]


def test_offloaded_sampling_moves_the_mmdit_and_vae_once_per_run_where_they_fit_together(monkeypatch, tmp_path):
    """Since sample.py saves each batch as it is decoded, with offload (auto on small GPUs, or --offload) the
    MMDiT and the VAE went to the GPU and back once per batch: for Large 16 GB each way per prompt. Where the two
    fit there together (the rule that decides offload for all models), they visit once per run; else they take
    turns for each batch, as before, so that only one of them is on the GPU at a time."""
    moves, real = [], torch.nn.Module.to

    def to(module, *args, **kwargs):
        moves.append(type(module).__name__)
        return real(module, *args, **kwargs)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    pipe, s, saved = sd.tiny_pipeline(), sd.SampleSettings(steps=1, width=32, height=32), []
    pipe.offload = True
    for too_large, expected in ((0, 2), (10**12, 6)):      # there and back: once, or for each of 3 batches
        monkeypatch.setattr(sd, "too_large_for", lambda device, *modules: too_large, raising=False)
        moves.clear()
        sd.generate(pipe, ["a", "b", "c"], settings=s, progress=False, keep=saved.append)
        assert moves.count("MMDiT") == moves.count("VAE") == expected, moves
    assert [len(images) for images in saved] == [1] * 6 and pipe.visiting == ()
    offloaded, real_generate = [], sd.generate              # sample.py --offload (no test gave it) offloads

    def generate(pipe, *args, **kwargs):
        offloaded.append(pipe.offload)
        return real_generate(pipe, *args, **kwargs)
    monkeypatch.setattr(sd, "generate", generate)
    monkeypatch.setattr(sd, "too_large_for", lambda device, *modules: 0)      # all fit: not offloaded unless asked
    for flags in (["--offload"], []):
        sample.main(["--model", "tiny", "--prompt", "a", "--steps", "1", "--width", "32", "--height", "32", *flags,
                     "--out", str(tmp_path)])
    assert offloaded == [True, False]


def test_generate_holds_the_embeddings_noise_and_images_of_one_chunk_of_prompts_not_of_all(monkeypatch):
    """generate() encoded all its prompts before the first image (SD3.5's context is 5.5 MB a prompt in float32:
    9 GB of RAM for PartiPrompts' 1,600, 55 GB for 10,000), drew the noise of all images on the device at once
    (1 MB each at 1024 px) and kept every image (3 MB at 1024 px) to return them, also when keep (sample.py's)
    had saved them. The prompts are encoded PROMPTS_AHEAD at a time and the noise drawn per batch: the tensors
    held at each batch are those of 4 prompts, for 4 prompts as for 12; with keep no image outlives its batch
    and none is returned. Without keep, all are returned: the images of one chunk of 12 prompts."""
    pipe, s = sd.tiny_pipeline(), sd.SampleSettings(steps=1, width=32, height=32, cfg=4.0, seed=3)
    prompts = [f"prompt {i}" for i in range(12)]
    made, given, held, earlier = [], [], [], []     # weak references to tensors and images; what each batch saw
    real_encode, real_noise, real_denoise = sd.encode_in_batches, sd.initial_noise, sd.denoise

    def encode(*args):
        cond, uncond = real_encode(*args)
        made.extend(weakref.ref(t) for t in [*cond, *uncond])
        return cond, uncond

    def noise(*args):
        x = real_noise(*args)
        made.append(weakref.ref(x))
        return x

    def denoise(*args, **kwargs):
        alive = [t.untyped_storage() for t in (ref() for ref in made) if t is not None]
        held.append(sum({storage.data_ptr(): storage.nbytes() for storage in alive}.values()))
        return real_denoise(*args, **kwargs)

    def keep(images):                       # as sample.py's: saves them, holds none
        earlier.append(sum(ref() is not None for ref in given))
        given.extend(weakref.ref(image) for image in images)
    monkeypatch.setattr(sd, "PROMPTS_AHEAD", 4, raising=False)
    for name, function in (("encode_in_batches", encode), ("initial_noise", noise), ("denoise", denoise)):
        monkeypatch.setattr(sd, name, function)
    peaks = {}
    for n in (4, 12):
        held.clear()
        assert sd.generate(pipe, prompts[:n], "ugly", s, progress=False, batch_size=2, keep=keep) == []
        peaks[n] = max(held)
    context = len(pipe.text.encode(["a"])[0][0].flatten()) * 4        # bytes: the 4 prompts' and the negative's,
    assert peaks[12] == peaks[4] and 5 * context < peaks[4] < 6 * context   # pooled, a batch's noise
    assert earlier == [0] * 8
    chunked = sd.generate(pipe, prompts, "ugly", s, progress=False, batch_size=2)
    monkeypatch.setattr(sd, "PROMPTS_AHEAD", 12, raising=False)
    assert np.array_equal(np.stack(chunked), np.stack(sd.generate(pipe, prompts, "ugly", s, progress=False,
                                                                     batch_size=2)))


def test_prompts_in_chunks_move_the_encoders_once_a_chunk_with_one_warning_and_one_bar(monkeypatch, capsys):
    """generate() encodes PROMPTS_AHEAD prompts (whole batches) at a time. With offload the text encoders visit
    the GPU once per chunk, not per batch, and the MMDiT and the VAE (where they fit together) then once for the
    chunk's batches; the prompts cut short are named in one line for the run, and one bar counts all steps."""
    moves, real, bars = [], torch.nn.Module.to, []

    def to(module, *args, **kwargs):
        moves.append(type(module).__name__)
        return real(module, *args, **kwargs)

    class Recorded(sd.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)
    pipe, s = sd.tiny_pipeline(t5_length=16), sd.SampleSettings(steps=2, width=32, height=32, cfg=1.0)
    for name, value in (("too_large_for", lambda device, *modules: 0), ("PROMPTS_AHEAD", 3), ("tqdm", Recorded)):
        monkeypatch.setattr(sd, name, value)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    pipe.offload = True                                 # 2 chunks (4 prompts: whole batches, then 1), 3 batches
    assert len(sd.generate(pipe, ["red", "b" * 20, "c", "d", "e" * 20], settings=s, batch_size=2)) == 5
    counts = collections.Counter(moves)
    assert (counts["T5EncoderModel"], counts["MMDiT"], counts["VAE"], pipe.visiting) == (4, 4, 4, ())
    assert [(bar.n, bar.total) for bar in bars] == [(10, 10)]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "2 of 5 prompts are cut" in warnings[0]


@pytest.mark.parametrize("refusal", [None,                                                    # hard links
                                     PermissionError(1, "Operation not permitted"),          # Linux on FAT
                                     OSError(95, "Operation not supported")])           # some network shares
def test_sample_cli_takes_the_next_number_when_another_run_wrote_after_its_scan(tmp_path, monkeypatch, refusal):
    """An image is saved under the first free number, never over an image another sample.py wrote there after
    this run looked, and no hidden file stays; also where the file system makes no hard links (FAT, some network
    shares)."""
    def no_links(*args):
        raise refusal
    if refusal:
        monkeypatch.setattr(os, "link", no_links)
    (tmp_path / "sample_00.png").write_bytes(b"another run's image")   # written after this run looked
    monkeypatch.setattr(Path, "glob", lambda self, pattern: iter(()))
    saved = sample.main(["--model", "tiny", "--prompt", "a cat", "--prompt", "a dog", "--steps", "1",
                         "--width", "32", "--height", "32", "--out", str(tmp_path)])
    assert saved == [tmp_path / "sample_01.png", tmp_path / "sample_02.png"]
    assert (tmp_path / "sample_00.png").read_bytes() == b"another run's image"
    assert all(Image.open(path).size == (32, 32) for path in saved)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample_00.png", "sample_01.png", "sample_02.png"]


def test_sample_cli_terminated_while_writing_leaves_no_empty_png(tmp_path):
    """SIGTERM (what `timeout` and schedulers send) killed sample.py outright: the sample_NN.png it had reserved
    (created empty, O_EXCL) stayed behind as a 0-byte image that later runs number after. It is handled as
    Ctrl-C: the unfinished image is removed, one line says so, exit code 143."""
    script = tmp_path / "run.py"                    # SIGTERM arrives while the first image is being written
    script.write_text(f"import os, runpy, signal, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport sd35_lora\n"
                      "os.fsync = lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM)\n"
                      f"sys.argv = ['sample.py', *sys.argv[1:]]\nrunpy.run_path({str(ROOT / 'sample.py')!r}, "
                      "run_name='__main__')\n")
    (tmp_path / "out").mkdir()                      # there before: kept (one the run made goes, if left empty)
    r = run_cli(str(script), "--model", "tiny", "--prompt", "a cat", "--steps", "1", "--width", "32",
                "--height", "32", "--out", str(tmp_path / "out"))
    assert r.returncode == 143 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("terminated: ")
    assert list((tmp_path / "out").iterdir()) == []


def test_sample_cli_whose_output_pipe_closed_ends_without_a_traceback(tmp_path):
    """`python sample.py ... | head -n 1` (or a pager quit early): its next line to stdout raised BrokenPipeError,
    a traceback of 20 lines on the terminal. It ends as other command-line tools do, saying nothing; the images
    already written stay."""
    p = subprocess.Popen([sys.executable, "sample.py", *TINY_SAMPLE_ARGS, "--out", str(tmp_path / "out")], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()                                                    # the reader gone before the first line
    stderr = p.stderr.read()
    assert p.wait(timeout=600) == 1 and "Traceback" not in stderr and "Error" not in stderr, stderr[-2000:]
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["sample_00.png"]


def test_sample_cli_terminated_just_after_its_saved_to_line_is_one_line(tmp_path):
    """SIGTERM just after the "saved to" line (main() returned, its handler not yet put back: 2 of 18 tries
    at 0-2 ms) raised out of restore_signals, past the except clauses: a Terminated traceback, exit code 1."""
    script = tmp_path / "run.py"                    # SIGTERM arrives as the handlers are put back
    script.write_text(f"import os, runpy, signal, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport sd35_lora\n"
                      "real = sd35_lora.restore_signals\ndef late(old):\n    os.kill(os.getpid(), signal.SIGTERM)\n"
                      "    real(old)\nsd35_lora.restore_signals = late\n"
                      f"sys.argv = ['sample.py', *sys.argv[1:]]\nrunpy.run_path({str(ROOT / 'sample.py')!r}, "
                      "run_name='__main__')\n")
    r = run_cli(str(script), *TINY_SAMPLE_ARGS, "--out", str(tmp_path / "out"))
    assert r.returncode == 143 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == "terminated: images already written stay in --out"
    assert "saved to" in r.stdout and [p.name for p in (tmp_path / "out").iterdir()] == ["sample_00.png"]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX's")
@pytest.mark.parametrize("killed_in", ["os.fsync", "os.link"])
def test_sample_cli_killed_while_writing_leaves_no_empty_png(tmp_path, killed_in):
    """kill -9 (the OOM killer) while sample.py wrote an image left the sample_NN.png it had reserved (created
    empty, O_EXCL, before the write) for good: a 0-byte image that viewers call broken and later runs number
    after. An image now gets its sample_NN.png only once it is complete; killed just before, a hidden file."""
    kill_sample_cli(tmp_path, killed_in)
    assert [p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")] == []


TINY_SAMPLE_ARGS = ["--model", "tiny", "--prompt", "a cat", "--steps", "1", "--width", "32", "--height", "32"]


def kill_sample_cli(tmp_path, killed_in: str):
    """sample.py (tiny) writing into tmp_path/out, killed by SIGKILL when it calls `killed_in`."""
    script = tmp_path / "run.py"
    script.write_text(f"import os, runpy, signal, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport sd35_lora\n"
                      f"{killed_in} = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
                      f"sys.argv = ['sample.py', *sys.argv[1:]]\nrunpy.run_path({str(ROOT / 'sample.py')!r}, "
                      "run_name='__main__')\n")
    r = run_cli(str(script), *TINY_SAMPLE_ARGS, "--out", str(tmp_path / "out"))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX's")
@pytest.mark.parametrize("killed_in", ["os.fsync", "os.link"])    # the image written, then in publish
def test_the_temporary_file_of_a_killed_sample_cli_is_removed_by_the_next(tmp_path, killed_in):
    """sample.py killed (kill -9, the OOM killer) while it saved an image left a hidden temporary file, the size
    of the image, in --out for good: one more per kill. The next sample.py removes those over an hour old (a
    younger one may be another sample.py's at work there), as a training run removes its own."""
    kill_sample_cli(tmp_path, killed_in)
    out = tmp_path / "out"
    killed = list(out.iterdir())
    assert len(killed) == 1 and killed[0].name.startswith(".")
    sample.main([*TINY_SAMPLE_ARGS, "--out", str(out)])
    assert killed[0].exists()
    os.utime(killed[0], (time.time() - 7200,) * 2)
    sample.main([*TINY_SAMPLE_ARGS, "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["sample_00.png", "sample_01.png"]


def test_sample_publish_without_hard_links_waits_for_a_windows_scanner_on_the_reserved_name(tmp_path, monkeypatch):
    """Without hard links (Windows on FAT or exFAT: CreateHardLink fails), an image replaces the sample_NN.png
    reserved empty, which a virus scanner or an indexer opens for a moment: the replace is refused once
    (PermissionError). sample.py wrote it through _atomic_save, which tries again there; publish's fallback
    then raised, ending the run."""
    def no_links(*args):
        raise OSError(22, "Incorrect function")                      # Windows' answer on FAT
    real_replace, refused = os.replace, []

    def scanned_once(source, target):
        if not refused:
            refused.append(target)
            raise PermissionError(13, "Access is denied")
        return real_replace(source, target)
    written = tmp_path / ".sample.png"
    written.write_bytes(b"the image")
    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(os, "replace", scanned_once)
    monkeypatch.setattr(sys, "platform", "win32")
    assert sample.publish(written, tmp_path, 0) == (tmp_path / "sample_00.png", 0)
    assert refused == [tmp_path / "sample_00.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["sample_00.png"]
    assert (tmp_path / "sample_00.png").read_bytes() == b"the image"


def test_sample_cli_without_hard_links_interrupted_while_numbering_leaves_no_empty_png(tmp_path, monkeypatch):
    """Where no hard links can be made, an image's number is taken by an empty sample_NN.png (O_EXCL) that the
    complete image is renamed onto: Ctrl-C or an error at that rename leaves neither that empty file, which
    later runs would number after, nor the hidden image."""
    real_replace = os.replace

    def no_links(*args):
        raise PermissionError(1, "Operation not permitted")        # Linux's answer on FAT

    def interrupted(source, target):
        if Path(target).name.startswith("sample_"):
            raise KeyboardInterrupt
        return real_replace(source, target)
    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(os, "replace", interrupted)
    (tmp_path / "out").mkdir()                      # there before: kept (one the run made goes, if left empty)
    with pytest.raises(KeyboardInterrupt):
        sample.main(["--model", "tiny", "--prompt", "a cat", "--steps", "1", "--width", "32",
                     "--height", "32", "--out", str(tmp_path / "out")])
    assert list((tmp_path / "out").iterdir()) == []


def test_sample_cli_out_of_disk_space_while_writing_an_image_names_the_image_and_out(tmp_path, monkeypatch):
    """A full disk while an image was written (not only while it was named) said "cannot write
    OUT/.sample.png.1234-89abcdef.tmp (No space left on device): ... choose another folder": a hidden name the
    user never gave, not the image or --out (the image went through _atomic_save, a temporary file of a
    temporary file, whose own error it was). One hidden file now, and sample.py's error."""
    real_save, saves = Image.Image.save, []

    def full_at_the_second(image, *args, **kwargs):
        saves.append(args)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(image, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", full_at_the_second)
    out = tmp_path / "out"
    one_line_error(lambda: sample.main([*TINY_SAMPLE_ARGS, "--prompt", "a dog", "--out", str(out)]),
                   r"^cannot save image 2 in .*out \(No space left on device\): free disk space or choose another --out$")
    assert [p.name for p in out.iterdir()] == ["sample_00.png"]


@pytest.mark.parametrize("refused", ["os.open", "os.replace"])
def test_sample_cli_without_hard_links_whose_fallback_fails_is_one_line(tmp_path, monkeypatch, refused):
    """Where no hard links can be made, a failure of the fallback (a full disk at its empty sample_NN.png, its
    rename refused) came out of sample.py as a bare OSError traceback. One line now; earlier images stay."""
    real = getattr(os, refused.split(".")[1])

    def no_links(*args):
        raise PermissionError(1, "Operation not permitted")        # Linux's answer on FAT

    def full_at_the_second(*args, **kwargs):
        if Path(args[-1] if refused == "os.replace" else args[0]).name == "sample_01.png":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)
    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(os, refused.split(".")[1], full_at_the_second)
    out = tmp_path / "out"
    one_line_error(lambda: sample.main([*TINY_SAMPLE_ARGS, "--prompt", "a dog", "--out", str(out)]),
                   r"cannot save image 2 in .*out \(No space left on device\): free disk space or choose another --out")
    assert [p.name for p in out.iterdir()] == ["sample_00.png"]


def test_sample_cli_sigterm_while_an_error_ends_the_run_keeps_the_error(tmp_path):
    """sample.py's SIGTERM handler raised whatever the process was doing: a SIGTERM (a scheduler's, `timeout`'s)
    while an error left main() (here as its models were let go) said "terminated: images already written stay
    in --out", exit 143, and the error was lost; as in sd35_lora.py's main(), the error stands."""
    script = tmp_path / "run.py"
    script.write_text(f"import os, runpy, signal, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport sd35_lora\n"
                      "def refuse(*args, **kwargs):\n    raise sd35_lora.UserError('a bad LoRA (a test)')\n"
                      "sd35_lora.generate = refuse\n"
                      "sd35_lora.free_models = lambda pipe: os.kill(os.getpid(), signal.SIGTERM)\n"
                      f"sys.argv = ['sample.py', *sys.argv[1:]]\nrunpy.run_path({str(ROOT / 'sample.py')!r}, "
                      "run_name='__main__')\n")
    r = run_cli(str(script), "--model", "tiny", "--prompt", "a cat", "--width", "64", "--height", "64", "--out",
                str(tmp_path / "out"))                  # a size the tiny model takes: sample.py checks it first
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == "error: a bad LoRA (a test)", r.stderr[-2000:]
    assert "terminated" not in r.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM from the process itself is POSIX's")
def test_sample_cli_sigterm_as_it_exits_after_saving_is_no_traceback(tmp_path):
    """A SIGTERM (`timeout`'s, a scheduler's) that came just after "saved to", while Python exited (threads'
    shutdown, atexit callbacks: tens of milliseconds), printed a traceback of Terminated (exit code 0 or 1). It
    ends the process as at the start, as Ctrl-C there does: no traceback, the image kept."""
    script = tmp_path / "run.py"                    # the SIGTERM arrives in an atexit callback
    script.write_text(f"import atexit, os, runpy, signal, sys, time\nsys.path.insert(0, {str(ROOT)!r})\n"
                      "def terminated():\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(5)\n"
                      "atexit.register(terminated)\n"
                      f"sys.argv = ['sample.py', *sys.argv[1:]]\nrunpy.run_path({str(ROOT / 'sample.py')!r}, "
                      "run_name='__main__')\n")
    r = run_cli(str(script), *TINY_SAMPLE_ARGS, "--out", str(tmp_path / "out"))
    assert r.returncode == -signal.SIGTERM and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["sample_00.png"]


def test_the_sigterm_handler_raises_as_ctrl_c_but_not_over_an_error_ending_the_run():
    """sd35_lora.py's main() and sample.py share it: terminated, or the error that was already ending the run."""
    with pytest.raises(sd.Terminated):
        sd.terminate(signal.SIGTERM, None)
    assert issubclass(sd.Terminated, KeyboardInterrupt)            # ended as Ctrl-C is, with exit code 143
    for error in (sd.UserError("a test"), SystemExit(1)):
        try:
            raise error
        except BaseException:
            sd.terminate(signal.SIGTERM, None)                      # no exception: the error stands


def test_sample_cli_interrupted_keeps_the_images_already_denoised(tmp_path, monkeypatch, capsys):
    """Every image was written only after the last one was denoised: a Ctrl-C (or SIGTERM) at the tenth of ten
    prompts lost the nine finished ones, though the message said "images already written stay in --out".
    Each batch is now saved as soon as it is decoded."""
    calls, real = [], sd.denoise
    def denoise(*a, **k):
        calls.append(1)
        if len(calls) == 3:                                             # Ctrl-C in the third batch
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(sd, "denoise", denoise)
    (tmp_path / "sample_00.png").write_bytes(b"an earlier run's image")
    with pytest.raises(KeyboardInterrupt):
        sample.main(["--model", "tiny", "--prompt", "a", "--prompt", "b", "--prompt", "c", "--steps", "1",
                     "--width", "32", "--height", "32", "--seed", "7", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample_00.png", "sample_01.png", "sample_02.png"]
    params = [json.loads(Image.open(tmp_path / f"sample_0{i}.png").text["parameters"]) for i in (1, 2)]
    assert [(p["prompt"], p["seed"]) for p in params] == [("a", 7), ("b", 8)]
    assert f"saved to {tmp_path}: sample_01.png, sample_02.png (the earlier samples" in capsys.readouterr().out


def test_sample_cli_called_in_a_notebook_frees_its_models_when_it_fails(tmp_path, monkeypatch):
    """sample.main() in a notebook: a notebook keeps the last error's traceback, and with it the models sample.main
    loaded; after running out of GPU memory (or a Ctrl-C, or a LoRA that does not fit), the call made again ran
    out of GPU memory on the models of the last. They are freed when it fails."""
    real_load, pipes = sd.load_pipeline, []
    monkeypatch.setattr(sd, "load_pipeline", lambda *a, **k: pipes.append(real_load(*a, **k)) or pipes[-1])
    monkeypatch.setattr(sd, "generate", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA")))
    args = ["--model", "tiny", "--prompt", "red", "--width", "32", "--height", "32", "--steps", "2"]
    with pytest.raises(torch.OutOfMemoryError) as kept:
        sample.main([*args, "--out", str(tmp_path / "out")])
    assert kept.value.__traceback__ is not None
    models = (pipes[0].mmdit, pipes[0].vae, *pipes[0].text.modules())
    assert {t.device.type for m in models for t in [*m.parameters(), *m.buffers()]} == {"meta"}


def test_sample_cli_out_of_memory_is_one_line_with_its_levers_and_keeps_the_images_made(tmp_path):
    """sample.py ended with torch's long traceback when the GPU ran out of memory; the images made are kept."""
    script = tmp_path / "run.py"
    script.write_text(f"import runpy, sys, torch\nsys.path.insert(0, {str(ROOT)!r})\nimport sd35_lora\n"
                      "real, calls = sd35_lora.denoise, []\n"
                      "def denoise(*args, **kwargs):\n    calls.append(1)\n    if len(calls) == 2:\n"
                      f"        raise torch.OutOfMemoryError({CUDA_OOM!r})\n    return real(*args, **kwargs)\n"
                      "sd35_lora.denoise = denoise\n"
                      f"sys.argv = ['sample.py', *sys.argv[1:]]\nrunpy.run_path({str(ROOT / 'sample.py')!r}, "
                      "run_name='__main__')\n")
    r = run_cli(str(script), "--model", "tiny", "--prompt", "a", "--prompt", "b", "--prompt", "c", "--steps", "1",
                "--width", "32", "--height", "32", "--batch-size", "2", "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "error: out of GPU memory while sampling; the images finished are saved. To fit 2.00 GiB more: lower "
        "--batch-size, lower --width and --height, add --fp8, add --no-t5, use --dtype bf16, or free the GPU "
        "of other programs")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sample_00.png", "sample_01.png"]


def test_sample_cli_out_of_memory_while_loading_names_the_loading_and_its_levers(tmp_path, monkeypatch):
    """Out of GPU memory while the models moved to the GPU (--no-offload, or an estimate that just fit) said
    "while sampling; the images finished are saved", none made, and offered --batch-size and the size, which
    lower only the sampling's need."""
    monkeypatch.setattr(sd, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError(CUDA_OOM)))
    with pytest.raises(torch.OutOfMemoryError) as e:
        sample.main(["--model", "tiny", "--prompt", "a", "--batch-size", "2", "--dtype", "fp32", "--out",
                     str(tmp_path / "out")])
    assert str(e.value) == ("out of GPU memory while loading the models. To fit 2.00 GiB more: add --fp8, add "
                            "--no-t5, use --dtype bf16, or free the GPU of other programs")


def test_png_parameters_record_the_t5_length_and_lora_scales_used(tmp_path, monkeypatch):
    """README: the PNG's `parameters` are those of the image. Without T5 the context still holds t5_length zero
    tokens, so the length changes the image (it was recorded as 0); the LoRA scales were the flags as typed
    ([] for the default 1.0, one value for several LoRAs). --no-merge keeps the LoRA as adapters on the layers
    (it was run by no test) and gives the merged LoRA's image to within 2/255 (1 measured on the CPU)."""
    model = sd.tiny_pipeline().mmdit
    sd.add_lora(model, rank=2)
    sd.save_lora(model, tmp_path / "lora.safetensors")
    lora = str(tmp_path / "lora.safetensors")
    base = ["--model", "tiny", "--prompt", "a cat", "--steps", "2", "--width", "32", "--height", "32", "--no-t5"]
    runs = {"8": [], "24": ["--lora", lora, "--lora", lora, "--lora-scale", "0.5"]}
    params = {}
    for length, extra in runs.items():
        path = sample.main([*base, "--t5-length", length, *extra, "--out", str(tmp_path / length)])[0]
        params[length] = json.loads(Image.open(path).text["parameters"])
    assert images_of([tmp_path / "8/sample_00.png"]).tolist() != images_of([tmp_path / "24/sample_00.png"]).tolist()
    assert (params["8"]["t5_length"], params["8"]["use_t5"], params["24"]["t5_length"]) == (8, False, 24)
    with_t5 = sample.main([*base[:-1], "--t5-length", "8", "--out", str(tmp_path / "t5")])     # --no-t5 is used
    assert images_of(with_t5).tolist() != images_of([tmp_path / "8/sample_00.png"]).tolist()
    assert params["8"]["lora_scale"] == [] and params["24"]["lora_scale"] == [0.5, 0.5]
    one = sample.main([*base, "--lora", lora, "--out", str(tmp_path / "one")])[0]
    assert json.loads(Image.open(one).text["parameters"])["lora_scale"] == [1.0]
    sd.save_lora(model, tmp_path / "t5_8.safetensors", metadata={"t5_length": 8, "use_t5": False})
    as_trained = sample.main([*base[:-1], "--lora", str(tmp_path / "t5_8.safetensors"), "--out", str(tmp_path / "s")])
    as_trained = json.loads(Image.open(as_trained[0]).text["parameters"])       # no flags: the LoRA's T5 settings
    assert (as_trained["t5_length"], as_trained["use_t5"]) == (8, False)
    with torch.no_grad():                      # a LoRA that changes the image: the scale recorded is used
        for layer in sd.lora_layers(model).values():
            layer.lora_up.weight.normal_(generator=torch.Generator().manual_seed(0))
    sd.save_lora(model, tmp_path / "strong.safetensors")
    strong, adapters, real_load = {}, [], sd.load_lora

    def load_lora(mmdit, *args, **kwargs):              # the adapters left on the model's layers
        loaded = real_load(mmdit, *args, **kwargs)
        adapters.append(len(sd.lora_layers(mmdit)))
        return loaded
    monkeypatch.setattr(sd, "load_lora", load_lora)
    for scale, extra in (("0", []), ("1", []), ("1 unmerged", ["--no-merge"])):
        flags = ["--lora", str(tmp_path / "strong.safetensors"), "--lora-scale", scale.split()[0], *extra]
        paths = sample.main([*base, *flags, "--out", str(tmp_path / f"strong{scale}")])
        strong[scale], params[scale] = images_of(paths), json.loads(Image.open(paths[0]).text["parameters"])
    assert strong["0"].tolist() == images_of([one]).tolist() != strong["1"].tolist()
    assert adapters == [0, 0, len(sd.lora_layers(model))] and params["1 unmerged"]["no_merge"] is True
    assert np.abs(strong["1 unmerged"].astype(int) - strong["1"]).max() <= 2

def test_stacked_loras_trained_with_different_t5_settings_are_not_silently_given_the_first_ones(tmp_path, capsys,
                                                                                                monkeypatch):
    """Several --lora of different recorded T5 lengths sampled at the first one's length without a word (the
    second LoRA's own prompts got another context length than in its training); one LoRA trained without T5
    turned T5 off, or not, by its place among the --lora flags. The T5 settings come from the header alone: each
    LoRA's tensors are read once, by load_lora."""
    model = sd.tiny_pipeline().mmdit
    sd.add_lora(model, rank=2)
    loras = {}
    for name, length, use_t5 in (("a77", 77, True), ("b24", 24, True), ("c24", 24, False)):
        loras[name] = str(tmp_path / f"{name}.safetensors")
        sd.save_lora(model, loras[name], metadata={"t5_length": length, "use_t5": use_t5})
    base = ["--model", "tiny", "--prompt", "a cat", "--steps", "1", "--width", "32", "--height", "32"]
    with pytest.raises(sd.UserError, match=rf"different T5 lengths \({loras['a77']}: 77, {loras['b24']}: 24\): "
                                           "choose one with --t5-length"):
        sample.main([*base, "--lora", loras["a77"], "--lora", loras["b24"], "--out", str(tmp_path / "x")])
    chosen = sample.main([*base, "--lora", loras["a77"], "--lora", loras["b24"], "--t5-length", "24",
                          "--out", str(tmp_path / "chosen")])[0]
    assert json.loads(Image.open(chosen).text["parameters"])["t5_length"] == 24
    opens, reads = spy_reads(monkeypatch)
    sample.main([*base, "--lora", loras["b24"], "--out", str(tmp_path / "b24")])
    # the header twice (sample.py's settings, load_lora's is-it-a-LoRA check), the tensors once
    assert opens["b24.safetensors"] == 3 and set(reads.values()) == {1}, (opens, reads)
    capsys.readouterr()
    for order in ((loras["b24"], loras["c24"]), (loras["c24"], loras["b24"])):
        assert sample.trained_settings(list(order)) == {"t5_length": 24, "use_t5": True}
        assert f"warning: {loras['c24']} trained without T5, the other LoRAs with it: T5 stays on" in \
            capsys.readouterr().err
    assert sample.trained_settings([loras["c24"], loras["c24"]]) == {"t5_length": 24, "use_t5": False}


def test_png_parameters_record_the_precision_and_the_files_that_made_the_image(tmp_path):
    """bf16 and fp32 give different images (up to 9/255 on the tiny model), and so do another VAE or text
    encoders: without them in the PNG's parameters the image cannot be made again. The default dtype depends
    on the device, so the one used is recorded, not the flag. --variant (no test gave it) picks the presets
    that run, and is recorded with them."""
    base = ["--model", "tiny", "--prompt", "a cat", "--steps", "2", "--width", "32", "--height", "32"]
    params = {}
    for dtype in ("", "bf16"):
        path = sample.main([*base, *(["--dtype", dtype] if dtype else []), "--out", str(tmp_path / dtype)])[0]
        params[dtype] = json.loads(Image.open(path).text["parameters"])
    assert images_of([tmp_path / "sample_00.png"]).tolist() != images_of([tmp_path / "bf16/sample_00.png"]).tolist()
    assert (params[""]["dtype"], params["bf16"]["dtype"]) == ("fp32", "bf16")
    assert all(params[""][key] is None for key in ("text_encoders", "vae")) and params[""]["no_merge"] is False
    turbo = sample.main([*base, "--variant", "sd3.5-large-turbo", "--out", str(tmp_path / "turbo")])[0]
    turbo = json.loads(Image.open(turbo).text["parameters"])
    assert (turbo["variant"], turbo["cfg"], turbo["sampler"]) == ("sd3.5-large-turbo", 1.0, "euler")
    assert (params[""]["variant"], params[""]["cfg"], params[""]["sampler"]) == ("sd3.5-medium", 5.0, "dpmpp_2m")

#################################################################################
#                                  fp8 weights                                  #
#################################################################################

def test_a_device_this_machine_lacks_is_a_one_line_error(monkeypatch, tmp_path):
    args = ["--model", "tiny", "--prompt", "a", "--steps", "1", "--width", "32", "--height", "32", "--device", "xla",
            "--out", str(tmp_path)]
    one_line_error(lambda: sample.main(args), "unknown device 'xla'")                   # sample.py's --device is used
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert sd.pick_device("cuda:0") == torch.device("cuda", 0)
    for name, match in [("mps", "sees 0 mps"), ("cuda:1", "sees 1 cuda"), ("xla", "unknown device 'xla'"),
                        ("gpu", "unknown device 'gpu'")]:
        one_line_error(lambda: sd.pick_device(name), match)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")       # left in a plain run's environment: not torchrun's, no cuda:1 error
    assert sd.pick_device("auto") == torch.device("cuda")
    monkeypatch.setenv("WORLD_SIZE", "2")                   # torchrun with more processes than GPUs
    monkeypatch.setenv("MASTER_ADDR", "localhost")          # (torchrun sets it)
    one_line_error(lambda: sd.pick_device("auto"), "cuda:1 asked for, but this torch sees 1 cuda")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert sd.pick_device("auto") == torch.device("cuda", 0)
    monkeypatch.delenv("LOCAL_RANK")            # srun's process 5 of 8 (4 GPUs a machine) from a job script: cuda:5
    monkeypatch.setenv("RANK", "5")
    one_line_error(lambda: sd.pick_device("auto"), r"cuda:5 .* sees 1 cuda device: .*export LOCAL_RANK, its GPU")
    with pytest.raises(sd.UserError) as e:      # torchrun's processes train: the config's device, no --device flag
        sd.pick_device("auto")
    assert "--device" not in str(e.value) and str(e.value).endswith(", or set device: cpu")


def test_a_plain_run_asking_for_a_gpu_it_lacks_is_not_told_about_processes(monkeypatch):
    """`sample.py --device cuda:1` on a one-GPU machine, one process: the advice was 'at most one process per GPU
    (started without torchrun: export LOCAL_RANK, its GPU)', the fix for srun's processes, not for a typo."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one_line_error(lambda: sd.pick_device("cuda:1"), r"^device cuda:1 asked for, but this torch sees 1 cuda device: "
                   r"use --device cpu or one it sees$")


def test_training_on_a_gpu_it_lacks_is_told_the_config_key_not_a_flag(monkeypatch, tmp_path):
    """`device: cuda` in config.yaml on a CPU machine: training was told 'use --device cpu', a flag that
    sd35_lora.py does not have (its device is the config key)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(sd.UserError) as e:
        sd.train(tiny_config(tmp_path, device="cuda"))
    assert "--device" not in str(e.value) and str(e.value).endswith("set device: cpu (--set device=cpu) "
                                                                    "or one it sees")

def test_a_local_rank_a_cluster_exports_without_torchrun_picks_no_gpu(monkeypatch):
    """A Slurm job exporting WORLD_SIZE=4 LOCAL_RANK=2, then `python sample.py` on a 1-GPU machine: "device
    cuda:2 asked for, but this torch sees 1": LOCAL_RANK chose a GPU with no torchrun (no MASTER_ADDR)."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, value in (("WORLD_SIZE", "4"), ("RANK", "3"), ("LOCAL_RANK", "2")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert sd.pick_device("auto") == sd.pick_device("cuda") == torch.device("cuda")


def test_fp8_rows_round_within_e4m3_precision():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * torch.logspace(-6, 3, 64)[:, None]          # rows of very different size
    w[5] = 0.0
    q, scale = sd.quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64,) and scale.dtype == torch.float32
    back = sd.dequantize_fp8(q, scale, torch.float32)
    absmax = w.abs().amax(dim=1, keepdim=True)
    # e4m3 keeps 3 mantissa bits: a relative error of at most 2^-4, below 2^-6 * 448 (subnormals) 2^-10 * scale
    assert ((back - w).abs() <= w.abs() / 16 + scale[:, None] / 1024 + 1e-30).all()
    assert ((back - w).abs() <= absmax / 16).all() and torch.equal(back[5], w[5])
    torch.testing.assert_close(back.abs().amax(dim=1), w.abs().amax(dim=1), rtol=1e-6, atol=0)  # absmax: exact
    # each row's largest lands on e4m3's largest, 448: a smaller target leaves more of a row's small weights subnormal
    assert (q.float().abs().amax(dim=1) == torch.where(w.abs().amax(dim=1) > 0, 448.0, 0.0)).all()
    for dtype in (torch.bfloat16, torch.float16):              # one rounding, not a rounded scale per row
        assert torch.equal(sd.dequantize_fp8(q, scale, dtype), back.to(dtype))


def test_fp8_layer_equals_linear_with_dequantized_weight():
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(48, 32)
    layer = sd.Fp8Linear(*sd.quantize_fp8(base.weight.detach()), base.bias)
    weight = layer.weight.float() * layer.weight_scale[:, None]
    x = torch.randn(3, 5, 48, generator=g, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, base.bias), rtol=1e-6, atol=1e-6)
    out.square().sum().backward()
    x_ref = x.detach().requires_grad_()
    torch.nn.functional.linear(x_ref, weight, base.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None and not layer.weight.requires_grad
    lora = sd.LoRALinear(layer, rank=4, alpha=4)                     # a LoRA on an fp8 base keeps its scales
    torch.nn.init.normal_(lora.lora_up.weight)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, weight + delta_weight(lora), base.bias)
        torch.testing.assert_close(lora(x), expected, rtol=1e-5, atol=1e-5)
    # under bf16 autocast an fp32 input (a norm's output) dequantizes to bf16: the weight a checkpointed block's
    # recompute keeps for its backward is bf16, not an fp32 copy of twice the size
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
            torch.autocast("cpu", torch.bfloat16), sd.checkpointed():
        assert layer(x).dtype == torch.bfloat16
    assert [t.dtype for t in saved if t.shape == (32, 48)] == [torch.bfloat16]


def test_fp8_weights_are_dequantized_twice_a_checkpointed_step_with_the_same_gradients(monkeypatch):
    """With gradient checkpointing, a block's recompute hands its dequantized fp8 weights to the backward, which
    comes next: forward and recompute dequantize, the backward does not. The gradients are those of a step
    without checkpointing, bit for bit, and no dequantized weight outlives the forward (fp8 keeps its memory)."""
    model = sd.quantize_mmdit(tiny_mmdit())
    sd.add_lora(model, rank=4, targets="attn")
    made = []
    def dequantize(*args):
        made.append(weakref.ref(out := dequantize_fp8(*args)))
        return out
    dequantize_fp8 = sd.dequantize_fp8
    monkeypatch.setattr(sd, "dequantize_fp8", dequantize)
    grads, counts = {}, {}
    for checkpointing in (False, True):
        model.enable_gradient_checkpointing(checkpointing).zero_grad(set_to_none=True)
        made.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(*mmdit_inputs())
        assert all(ref() is None for ref in made)                     # none kept past the forward
        forward = len(made)
        out.float().square().mean().backward()
        counts[checkpointing] = forward, len(made) - forward
        grads[checkpointing] = [p.grad for p in model.parameters() if p.requires_grad]
    fp8_layers = sum(isinstance(m, (sd.Fp8Linear, sd.LoRALinear)) for m in model.modules())
    assert counts[False][0] == counts[True][0] == fp8_layers and counts[False][1] > 0   # backward: 0 < B < all
    assert counts[True][1] == fp8_layers - 1            # the recompute's alone: all but the context embedder
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True], strict=True))


def test_the_whole_mmdit_compiled_trains_with_gradient_checkpointing():
    """torch.compile(model), as a fork or notebook compiles a model, with gradient checkpointing (the default):
    the checkpoint's fp8 contexts (context_fn) made it an AssertionError at the first step ('context_fn ...
    must generate a tuple of two TorchDispatchModes'); it trained before they came."""
    model = sd.quantize_mmdit(tiny_mmdit())
    sd.add_lora(model, rank=4, targets="attn")
    for layer in sd.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_up.weight, std=0.1)
    model.enable_gradient_checkpointing(True).train()
    grads = []
    for run in (model, torch.compile(model)):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            run(*mmdit_inputs()).float().square().mean().backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for eager, compiled in zip(*grads, strict=True):
        torch.testing.assert_close(compiled, eager, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("size", ["medium", "large"])
def test_fp8_halves_the_mmdit_weight_bytes(size):
    cfg = {"medium": sd.MMDiTConfig(depth=24, hidden=1536, heads=24, dual_attention_layers=tuple(range(13))),
           "large": sd.MMDiTConfig(depth=38, hidden=2432, heads=38, pos_embed_max_size=192)}[size]
    with torch.device("meta"):                                       # real sizes, no memory
        model = sd.MMDiT(cfg).to(torch.bfloat16)
    nbytes = lambda m: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
    bf16 = nbytes(model)
    sd.quantize_mmdit(model)
    assert nbytes(model) <= 0.55 * bf16, nbytes(model) / bf16      # medium 0.550 (pos_embed stays bf16), large 0.508
    assert model.final_layer.linear.weight.dtype == model.joint_blocks[0].x_block.attn.qkv.bias.dtype == torch.bfloat16
    assert model.context_embedder.weight.dtype == model.joint_blocks[0].x_block.mlp.fc1.weight.dtype == sd.FP8


def comfyui_fp8_file(model: sd.MMDiT, path: Path):
    """An official single file as ComfyUI's fp8 releases store it: float8 matrices, one fp32 `scale_weight` per
    tensor (here all but one), a `scaled_fp8` marker and an activation scale."""
    tensors = {}
    for name, t in model.state_dict().items():
        if t.ndim == 2 and name.startswith(("joint_blocks.", "context_embedder", "y_embedder.mlp.0")):
            scale = t.abs().max() / 448
            tensors[name] = (t / scale).to(torch.float8_e4m3fn)
            if "mlp.fc2" not in name:                                # unscaled fp8: the weight itself
                tensors[name.replace(".weight", ".scale_weight")] = scale.reshape(())
            else:
                tensors[name] = t.to(torch.float8_e4m3fn)
        else:
            tensors[name] = t.to(torch.bfloat16)
    tensors["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    tensors["joint_blocks.0.x_block.attn.qkv.scale_input"] = torch.tensor(1.0)
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in tensors.items()}, path)
    return tensors


def test_comfyui_fp8_file_loads_as_fp8_without_upcast(tmp_path):
    tensors = comfyui_fp8_file(tiny_mmdit(), tmp_path / "fp8.safetensors")
    fp8 = sd.load_mmdit(tmp_path / "fp8.safetensors", fp8=True)
    plain = sd.load_mmdit(tmp_path / "fp8.safetensors")            # fp8 off: dequantized one tensor at a time
    qkv = fp8.joint_blocks[1].context_block.attn.qkv
    assert isinstance(qkv, sd.Fp8Linear) and plain.joint_blocks[1].context_block.attn.qkv.weight.dtype == torch.float32
    stored = tensors["joint_blocks.1.context_block.attn.qkv.weight"]
    assert torch.equal(qkv.weight.view(torch.uint8), stored.view(torch.uint8))   # the file's bytes: not requantized
    assert torch.equal(qkv.weight_scale, tensors["joint_blocks.1.context_block.attn.qkv.scale_weight"].expand(192))
    assert torch.equal(fp8.joint_blocks[0].x_block.mlp.fc2.weight_scale, torch.ones(64))
    assert fp8.y_embedder.mlp[0].weight.dtype == torch.float32                   # fp8 in the file, not fp8 here
    x = mmdit_inputs()
    with torch.no_grad():
        torch.testing.assert_close(fp8(*x), plain(*x), rtol=1e-5, atol=1e-5)
    bf16 = sd.load_mmdit(tmp_path / "fp8.safetensors", dtype=torch.bfloat16, fp8=True)
    assert bf16.final_layer.linear.weight.dtype == torch.bfloat16 and torch.equal(
        bf16.joint_blocks[1].context_block.attn.qkv.weight.view(torch.uint8), stored.view(torch.uint8))
    save_file({**load_file(tmp_path / "fp8.safetensors"),
               "model.diffusion_model.context_embedder.weight": torch.zeros(64, 32, dtype=torch.int8)},
              tmp_path / "int8.safetensors")
    with pytest.raises(sd.UserError, match="integer-quantized"):
        sd.load_mmdit(tmp_path / "int8.safetensors", fp8=True)
    block_scaled = {**load_file(tmp_path / "fp8.safetensors"),   # a scale per 16 weights of a row, as mxfp8
                    "model.diffusion_model.context_embedder.scale_weight": torch.ones(64, 2)}
    save_file(block_scaled, tmp_path / "mx.safetensors")
    for fp8 in (True, False):
        one_line_error(lambda: sd.load_mmdit(tmp_path / "mx.safetensors", fp8=fp8), r"block-wise fp8 scales \(64, 2\)")


def test_a_single_fp8_number_in_a_model_file_is_a_one_line_error(tmp_path):
    """A 0-dim float8 tensor (a damaged or hostile file), in the MMDiT's part or the VAE's, as a known or an
    unknown name, was a bare IndexError from the fp8 scaling. Found by fuzzing model files."""
    comfyui_fp8_file(tiny_mmdit(), tmp_path / "fp8.safetensors")
    one = torch.tensor(1.0).to(torch.float8_e4m3fn)
    for name in ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.bias", "model.diffusion_model.extra"):
        save_file({**load_file(tmp_path / "fp8.safetensors"), name: one}, tmp_path / "scalar.safetensors")
        for fp8 in (True, False):
            one_line_error(lambda: sd.load_mmdit(tmp_path / "scalar.safetensors", fp8=fp8),
                           "MMDiT weights do not fit the detected architecture")
    vae = sd.VAE(sd.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, groups=32)).state_dict()
    for name in ("decoder.conv_in.bias", "extra"):
        save_file({**vae, name: one}, tmp_path / "vae.safetensors")
        one_line_error(lambda: sd.load_vae(tmp_path / "vae.safetensors"), "VAE weights do not fit the detected")


def test_a_comfy_kitchen_fp8_file_loads_as_its_scale_weight_twin(tmp_path):
    """ComfyUI's newer fp8 layout (comfy-kitchen): per fp8 matrix `X.weight_scale`, an activation `X.input_scale`
    and a `X.comfy_quant` marker (JSON bytes as uint8), no `scaled_fp8`: the same model as the `scale_weight`
    layout, with fp8 and without; its uint8 markers are no integer-quantized weights to refuse."""
    tensors = comfyui_fp8_file(tiny_mmdit(), tmp_path / "scale_weight.safetensors")
    marker = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    kitchen = {}
    for name, t in tensors.items():
        if name != "scaled_fp8" and not name.endswith(".scale_input"):
            kitchen[name.replace(".scale_weight", ".weight_scale")] = t
        if t.dtype == torch.float8_e4m3fn and t.ndim == 2:
            kitchen[name.replace(".weight", ".input_scale")] = torch.tensor(1.0)
            kitchen[name.replace(".weight", ".comfy_quant")] = marker.clone()
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in kitchen.items()}, tmp_path / "k.safetensors")
    x = mmdit_inputs()
    for fp8 in (True, False):
        old, new = (sd.load_mmdit(tmp_path / file, fp8=fp8) for file in ("scale_weight.safetensors", "k.safetensors"))
        assert old.state_dict().keys() == new.state_dict().keys()
        assert all(torch.equal(t.float(), new.state_dict()[name].float()) for name, t in old.state_dict().items())
        with torch.no_grad():
            assert torch.equal(old(*x), new(*x))


def test_fp8_file_with_fp8_biases_and_norms_loads_with_fp8(tmp_path):
    """A whole-model fp8 cast (biases and qk-norm weights in float8 too): only matrices stay fp8 with `fp8`."""
    fp8_part = ("joint_blocks.", "context_")
    tensors = {f"model.diffusion_model.{k}": v.to(torch.float8_e4m3fn) if k.startswith(fp8_part) else v
               for k, v in tiny_mmdit().state_dict().items()}
    save_file(tensors, tmp_path / "all_fp8.safetensors")
    fp8, plain = (sd.load_mmdit(tmp_path / "all_fp8.safetensors", fp8=on) for on in (True, False))
    attn = fp8.joint_blocks[0].x_block.attn
    assert attn.qkv.weight.dtype == sd.FP8 and attn.qkv.bias.dtype == attn.ln_q.weight.dtype == torch.float32
    x = mmdit_inputs()
    with torch.no_grad():
        torch.testing.assert_close(fp8(*x), plain(*x), rtol=1e-5, atol=1e-5)


def test_e5m2_file_is_requantized_while_reading_never_upcast_whole(tmp_path, monkeypatch):
    """float8_e5m2 matrices (with a per-tensor scale) reach _build already as e4m3 with `fp8`: they were upcast to
    `dtype` together, the whole MMDiT in bf16 on the host, before quantize_mmdit turned them back one at a time."""
    model, path = tiny_mmdit(), tmp_path / "e5m2.safetensors"
    tensors = {}
    for name, t in model.state_dict().items():
        if t.ndim == 2 and name.startswith(("joint_blocks.", "context_embedder")):
            tensors[name] = (t / (t.abs().max() / 57344)).to(torch.float8_e5m2)
            tensors[name.replace(".weight", ".scale_weight")] = (t.abs().max() / 57344).reshape(())
        else:
            tensors[name] = t
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in tensors.items()}, path)
    real_build = sd._build

    def build(cls, cfg, weights, *args):
        late = [k for k, v in weights.items() if k.startswith("joint_blocks.") and v.ndim == 2 and v.dtype != sd.FP8]
        assert not late, f"{late[0]} reached _build as {weights[late[0]].dtype}"
        return real_build(cls, cfg, weights, *args)
    monkeypatch.setattr(sd, "_build", build)
    fp8 = sd.load_mmdit(path, fp8=True)
    monkeypatch.setattr(sd, "_build", real_build)
    after = sd.quantize_mmdit(sd.load_mmdit(path))                    # fp32: the same per-row quantization
    bits = lambda t: t.view(torch.uint8) if t.dtype == sd.FP8 else t     # torch 2.5 has no torch.equal for fp8
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(fp8.state_dict().values(), after.state_dict().values()))


def test_quantize_mmdit_takes_a_compiled_model_as_add_lora_does():
    """quantize_mmdit(torch.compile(model)) said "no plain joint-block Linear left to quantize: quantize once,
    before any LoRA" (the wrapper names the layers "_orig_mod.*"): the model in it is quantized now."""
    model = tiny_mmdit()
    assert sd.quantize_mmdit(torch.compile(model)) is model
    assert type(model.joint_blocks[0].x_block.attn.qkv) is sd.Fp8Linear
    one_line_error(lambda: sd.quantize_mmdit(sd.tiny_pipeline()), r"takes the MMDiT \(pipe.mmdit\), not a Pipeline")


def test_fp8_user_errors(monkeypatch):
    model = sd.quantize_mmdit(tiny_mmdit())
    with pytest.raises(sd.UserError, match="no plain joint-block Linear left to quantize"):
        sd.quantize_mmdit(model)
    unmerged = lora_model(targets="attn")                 # its lora_down/up were quantized too, without scales
    one_line_error(lambda: sd.quantize_mmdit(unmerged), r"joint_blocks.0.context_block.attn.qkv already has a LoRA")
    assert unmerged.joint_blocks[0].x_block.attn.qkv.lora_down.weight.dtype == torch.float32     # nothing touched
    assert type(unmerged.joint_blocks[0].x_block.mlp.fc1) is torch.nn.Linear
    sd.add_lora(model, rank=2)                                                  # quantized, then a LoRA: no twice
    one_line_error(lambda: sd.quantize_mmdit(model), "already has a LoRA: quantize once")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)       # as on a Mac
    with pytest.raises(sd.UserError, match="fp8 needs float8, which MPS lacks"):
        sd.load_pipeline("tiny", device="mps", fp8=True)
    monkeypatch.setattr(sd, "FP8", None)
    with pytest.raises(sd.UserError, match="fp8 needs float8, which this torch lacks"):
        sd.load_pipeline("tiny", device="cpu", fp8=True)


def test_sampling_on_a_mac_defaults_to_bf16_where_mps_has_it(monkeypatch, tmp_path):
    """On MPS the default was fp32, as on the CPU: SD3.5 Large + T5 then need ~54 GB, more than a 16-32 GB Mac
    has. bf16 (macOS 14+) halves it; before macOS 14 fp32 stays the default, and asking for bf16 (the training
    config's default) is a one-line error, not a TypeError at the first weight moved there."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)           # as on a Mac
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: (major, minor) <= (15, 0))
    pipe = sd.load_pipeline("tiny", device="auto", offload=True)        # offload: the models stay on this CPU
    assert pipe.device == torch.device("mps") and pipe.mmdit.compute_dtype == torch.bfloat16
    args = ["--model", "tiny", "--prompt", "a", "--out", str(tmp_path)]
    monkeypatch.setattr(sample, "sample_with", lambda pipe, args, t5_length: [pipe.mmdit.compute_dtype])
    assert sample.main(args + ["--offload"]) == [torch.bfloat16]           # sample.py: no --dtype, the same
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: (major, minor) <= (13, 6))
    assert sd.load_pipeline("tiny", device="mps", offload=True).mmdit.compute_dtype == torch.float32
    one_line_error(lambda: sd.load_pipeline("tiny", device="mps", dtype="bf16", offload=True),
                   r"^bf16 on MPS needs macOS 14 or newer: update macOS or set dtype fp32 \(--dtype fp32\)$")
    cuda_and_cpu = [sd.pick_dtype(None, torch.device(name)) for name in ("cuda", "cpu")]
    assert cuda_and_cpu == [torch.bfloat16, torch.float32]                  # their defaults, as before


def test_integer_weights_are_refused_with_fp8_too(tmp_path):
    """With fp8 on, an int16/int32 (or complex) matrix was quantized as it was read, as if it were float: the
    refusal of integer-quantized files never saw it, and the model loaded with wrong weights."""
    weights = tiny_mmdit().state_dict()
    for dtype, what in ((torch.int32, "int32 .integer-quantized.*"), (torch.complex64, "complex64"),
                        (torch.bool, "bool"))[::1 if COMPLEX_FILES else 2]:  # complex and bool: called integer-quantized
        qkv = "joint_blocks.0.x_block.attn.qkv.weight"
        save_file({**weights, qkv: weights[qkv].to(dtype)}, tmp_path / "int.safetensors")
        for fp8 in (False, True):
            one_line_error(lambda: sd.load_mmdit(tmp_path / "int.safetensors", fp8=fp8), f"weights stored as {what} are unsupported")


def test_fp8_merged_lora_and_sampling_stay_close_to_full_precision(tmp_path, monkeypatch):
    """Measured on the tiny pipeline (fp32 compute): the MMDiT output's relative error is 0.03 % for fp8 weights,
    0.2 % with a strong LoRA merged into them (dequantize, add, requantize), 0.1 % with it unmerged."""
    base = sd.tiny_pipeline().mmdit
    lora_model_ = sd.tiny_pipeline().mmdit
    sd.add_lora(lora_model_, rank=4, targets="all")
    g = torch.Generator().manual_seed(0)
    for layer in sd.lora_layers(lora_model_).values():
        layer.lora_up.weight.data = torch.randn(layer.lora_up.weight.shape, generator=g) * 0.3
    sd.save_lora(lora_model_, tmp_path / "lora.safetensors")
    x = (torch.randn(2, 16, 16, 16, generator=g), torch.tensor([900.0, 300.0]), torch.randn(2, 16, 64, generator=g),
         torch.randn(2, 80, generator=g))
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    with torch.no_grad():
        fp8 = sd.quantize_mmdit(sd.tiny_pipeline().mmdit)
        assert rel(fp8(*x), base(*x)) < 0.002
        plain = base(*x)
        sd.load_lora(base, tmp_path / "lora.safetensors")
        reference = base(*x)
        sd.load_lora(fp8, tmp_path / "lora.safetensors")
        assert rel(reference, plain) > 0.3 and rel(fp8(*x), reference) < 0.01
    real_load, pipes = sd.load_pipeline, []
    monkeypatch.setattr(sd, "load_pipeline", lambda *a, **k: pipes.append(real_load(*a, **k)) or pipes[-1])
    common = ["--model", "tiny", "--prompt", "red stripes", "--width", "32", "--height", "32", "--steps", "3"]
    full = images_of(sample.main([*common, "--out", str(tmp_path / "full")]))
    fp8_images = images_of(sample.main([*common, "--fp8", "--out", str(tmp_path / "fp8")]))
    assert np.abs(full.astype(int) - fp8_images.astype(int)).mean() <= 1.0      # measured 0.07 of 255
    quantized = [any(isinstance(m, sd.Fp8Linear) for m in pipe.mmdit.modules()) for pipe in pipes]
    assert quantized == [False, True]                       # --fp8 ran: the images alone pass without it


def test_fp8_training_tracks_full_precision_and_its_lora_samples(tmp_path):
    make_dataset(tmp_path / "data")
    runs = {}
    for fp8 in (False, True):
        runs[fp8] = tmp_path / f"run_fp8_{fp8}"
        sd.train(tiny_config(tmp_path, **{"fp8": fp8, "train.steps": 20, "sample.sample_every": 0, "sample.prompts": [],
                                          "output_dir": str(runs[fp8])}))
    full, fp8 = np.mean(losses(runs[False])[-10:]), np.mean(losses(runs[True])[-10:])
    assert abs(fp8 - full) <= 0.05 * full and losses(runs[True]) != losses(runs[False]), (full, fp8)
    lora = runs[True] / "lora.safetensors"
    assert json.loads(sd.read_safetensors(lora, with_metadata=True)[1]["sd35_lora"])["fp8"] is True
    common = ["--model", "tiny", "--prompt", "red stripes", "--width", "32", "--height", "32", "--steps", "3"]
    plain = images_of(sample.main([*common, "--out", str(tmp_path / "plain")]))
    for flags in ([], ["--fp8"]):
        tuned = images_of(sample.main([*common, "--lora", str(lora), *flags, "--out", str(tmp_path / f"t{flags}")]))
        assert np.abs(plain.astype(int) - tuned.astype(int)).mean() > 1
    with pytest.raises(sd.UserError, match="changed fp8 True -> False"):
        sd.train(tiny_config(tmp_path, **{"train.steps": 30, "output_dir": str(runs[True])}), resume=True)


#################################################################################
#                     Hostile files, bad paths, full disks                      #
#################################################################################

def one_line_error(call, match: str):
    """`call` fails with a UserError (printed as one line by the CLIs) whose text matches."""
    with pytest.raises(sd.UserError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


def failing_for(monkeypatch, method: str, name: str, error: OSError):
    """Path.`method` raises `error` for files called `name` (held open, unreadable, busy); others as usual."""
    real = getattr(Path, method)

    def fake(path: Path, *args, **kwargs):
        if path.name == name:
            raise error
        return real(path, *args, **kwargs)
    monkeypatch.setattr(Path, method, fake)


def test_untrusted_numbers_are_bounded_before_anything_is_allocated(tmp_path, monkeypatch, capsys):
    lora = tmp_path / "lora.safetensors"
    sd.save_lora(lora_model(), lora)                                # a hostile header (save_lora refuses it)
    tensors, meta = sd.read_safetensors(lora, with_metadata=True)
    header = json.dumps({**json.loads(meta["sd35_lora"]), "t5_length": 10**9})
    save_file(tensors, lora, metadata={**meta, "sd35_lora": header})
    one_line_error(lambda: sample.trained_settings([str(lora)]), "t5_length = 1000000000 is not in 1..512")
    one_line_error(lambda: sd.load_pipeline("tiny", device="cpu", t5_length=10**9), "T5 length .* 1..512")
    # checkpoint headers: a block index far out, zero and 1-D shapes, a config.json claiming 2M blocks
    weights = tiny_mmdit().state_dict()
    hostile = {"gap": ({"joint_blocks.2000000.x_block.attn.qkv.bias": torch.zeros(1)}, "not 0..3"),
               "zero": ({"joint_blocks.0.x_block.attn.ln_q.weight": torch.zeros(0)}, "ZeroDivision"),
               "flat": ({"x_embedder.proj.weight": torch.zeros(64)}, "IndexError")}
    for name, (tensors, match) in hostile.items():
        save_file({**weights, **tensors}, tmp_path / f"{name}.safetensors")
        one_line_error(lambda: sd.load_mmdit(tmp_path / f"{name}.safetensors"), f"bad SD3 MMDiT .*{match}")
    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file(mmdit_to_diffusers(weights, 3), folder / "diffusion_pytorch_model.safetensors")
    config = dict(num_layers=2_000_000, num_attention_heads=4, attention_head_dim=16, joint_attention_dim=32,
                  pooled_projection_dim=24, pos_embed_max_size=16, qk_norm="rms_norm",
                  dual_attention_layers=[0])
    (folder / "config.json").write_text(json.dumps(config))
    one_line_error(lambda: sd.load_mmdit(folder), "sizes of no SD3 MMDiT")
    for heads in (4.0, "4", None):                          # 4.0 built no model: a bare TypeError in LayerNorm
        (folder / "config.json").write_text(json.dumps({**config, "num_layers": 3, "num_attention_heads": heads}))
        one_line_error(lambda: sd.load_mmdit(folder), "sizes of no SD3 MMDiT")
    (folder / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    assert sd.load_mmdit(folder).cfg.depth == 3
    vae = sd.VAE(sd.VAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, groups=4)).state_dict()
    save_file({**vae, "encoder.conv_in.weight": torch.zeros(0, 3, 3, 3)}, tmp_path / "vae.safetensors")
    one_line_error(lambda: sd.load_vae(tmp_path / "vae.safetensors"), "bad SD3 VAE weights .*ZeroDivision")
    # images: crop to the bucket's aspect before resizing; decompression bombs are skipped with a warning
    Image.new("RGB", (1_000_000, 4), (200, 0, 0)).save(tmp_path / "strip.png")
    real_resize = Image.Image.resize

    def bounded_resize(im, size, *args, **kwargs):
        assert size[0] * size[1] <= 256 * 64, f"resized to {size} before cropping"
        return real_resize(im, size, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "resize", bounded_resize)
    pixels = sd.load_image(tmp_path / "strip.png", (256, 64))
    assert pixels.shape == (3, 64, 256) and pixels[0].mean() > 0.5
    data = tmp_path / "data"
    sd.write_demo_dataset(data)
    Image.new("RGB", (80, 80)).save(data / "bomb.png")
    monkeypatch.setattr(sd, "MAX_PIXELS", 5000)                # 6400 px: over the limit, not decoded
    assert len(sd.scan_dataset(sd.DatasetConfig(path=str(data), resolution=64))) == 2
    assert "skipped 1 image over the limit of 0.005 megapixels" in capsys.readouterr().err
    monkeypatch.undo()
    # sampling: sizes against the model before the noise exists; seeds within torch's range, never wrapped
    pipe = sd.tiny_pipeline()
    monkeypatch.setattr(sd, "initial_noise", lambda *a: pytest.fail("noise allocated before the checks"))
    fast = dict(steps=1, cfg=1.0)
    huge = sd.SampleSettings(**fast, width=10**6)
    one_line_error(lambda: sd.generate(pipe, ["x"], settings=huge), "1000000x1024 px is too large")   # as given
    monkeypatch.setattr(sd, "load_pipeline", lambda *a, **k: pytest.fail("sample.py loaded a model first"))
    for seed, n in ((-1, 1), (2**64, 1), (2**64 - 1, 2)):
        one_line_error(lambda: sd.generate(pipe, ["x"] * n, settings=sd.SampleSettings(**fast, seed=seed)),
                       f"seed {seed} is outside 0..2\\^64-{n} ")
        args = ["--model", "tiny", "--seed", str(seed), "--out", str(tmp_path), *["--prompt", "x"] * n]
        one_line_error(lambda: sample.main(args), f"--seed {seed} is outside")
    # training settings
    one_line_error(lambda: sd.add_lora(tiny_mmdit(), rank=65), r"lora.rank must be in 1..64")
    assert sd.add_lora(tiny_mmdit(), rank=64)[0].shape == (64, 64)             # the width itself is taken
    for key, value in (("train.lr", 0), ("train.seed", -1), ("sample.seed", 2**64)):
        one_line_error(lambda: sd.load_config(None, [f"{key}={value}"]), f"'{key}' must be .*got {value}")


def test_malformed_files_are_one_line_errors(tmp_path, monkeypatch, capsys):
    model, lora, bad = tiny_mmdit(), tmp_path / "lora.safetensors", tmp_path / "bad.safetensors"
    sd.save_lora(lora_model(), lora)
    tensors, meta = sd.read_safetensors(lora, with_metadata=True)
    ours = json.loads(meta["sd35_lora"])
    for header, text, match in [("sd35_lora", "{not json", "sd35_lora or PEFT metadata is no JSON"),
                                ("sd35_lora", json.dumps({**ours, "rank": 0}), "rank = 0"),
                                ("sd35_lora", json.dumps({**ours, "alpha": [8, 8]}), r"alpha = \[8, 8\]"),
                                ("sd35_lora", json.dumps({**ours, "t5_length": "256"}), "t5_length = '256'"),
                                ("sd35_lora", json.dumps({**ours, "use_t5": "no"}), "use_t5 = 'no'"),
                                ("lora_adapter_metadata", "[4, 8]", "no JSON object"),
                                ("lora_adapter_metadata", '{"transformer.lora_alpha": [8]}', "lora_alpha")]:
        save_file(tensors, bad, metadata={**meta, header: text})
        one_line_error(lambda: sd.load_lora(model, bad), match)
        if header == "sd35_lora":
            one_line_error(lambda: sample.trained_settings([str(bad)]), match)
    key = "lora_unet_joint_blocks_0_x_block_attn_proj"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 64), f"{key}.lora_up.weight": torch.zeros(64, 4),
               f"{key}.alpha": torch.ones(2)}, bad)
    one_line_error(lambda: sd.load_lora(model, bad), "2 alphas, not one")
    # config files: a list at the top level, Latin-1 bytes
    (tmp_path / "list.yaml").write_text("- model: tiny\n")
    one_line_error(lambda: sd.load_config(str(tmp_path / "list.yaml")),
                   r"config file needs `key: value` lines, got \[\{'model': 'tiny'\}\]")
    (tmp_path / "latin.yaml").write_bytes("model: café\n".encode("latin-1"))
    one_line_error(lambda: sd.load_config(str(tmp_path / "latin.yaml")), "cannot read .*latin.yaml as UTF-8")
    # a caption in another encoding is named, never decoded with replacement characters
    sd.write_demo_dataset(tmp_path / "data")
    (tmp_path / "data" / "blue_disc.txt").write_bytes("disque bleu, café".encode("latin-1"))
    one_line_error(lambda: sd.scan_dataset(sd.DatasetConfig(path=str(tmp_path / "data"))),
                   "caption .*blue_disc.txt: 'utf-8' codec can't decode.*save it as UTF-8")
    # text encoders stored only as pickles; a diffusers config that is not an object; a state without metadata
    encoders = tmp_path / "encoders"
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                 "tokenizer_3"):
        (encoders / part).mkdir(parents=True)
        (encoders / part / "pytorch_model.bin").write_bytes(b"pickle")
    one_line_error(lambda: sd.load_text_encoders(encoders),
                   r"no model\.safetensors in .*text_encoder .*only safetensors weights are read")
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3"):      # weights, but no or a cut config
        save_file({"x": torch.zeros(1)}, encoders / part / "model.safetensors")
    one_line_error(lambda: sd._tokenizers(encoders, True),                                          # empty
                   re.escape(f"{encoders}: tokenizer*/ folders are incomplete (") + ".+"
                   + re.escape("): copy them again from a diffusers SD3.5 download") + "$")
    for damaged in (False, True):                                           # missing, then cut short
        if damaged:
            (encoders / "text_encoder" / "config.json").write_text('{"model_type": "clip_text')
        one_line_error(lambda: sd.load_text_encoders(encoders),
                       re.escape(f"{encoders}: a text_encoder*/config.json is missing or damaged (") + ".+"
                       + re.escape("): download it again") + "$")
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("[1, 2]")
    one_line_error(lambda: sd.load_mmdit(tmp_path / "transformer"), "cannot read .*config.json as a JSON")
    (tmp_path / "transformer" / "config.json").unlink()
    index = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    for text in ('{"weight_map": {"a": "x.safetensors"', '{"metadata": {}}', '{"weight_map": [1]}',
                 '{"weight_map": {"a": 1}}', '{"weight_map": {"a": null}}',      # (were bare TypeErrors)
                 '{"weight_map": {"a": "../x.safetensors"}}', '{"weight_map": {"a": "x.bin"}}'):  # (were read)
        index.write_text(text)
        one_line_error(lambda: sd.load_mmdit(tmp_path / "transformer"), "cannot read .*index.json as a shard")
    config = json.dumps(dataclasses.asdict(tiny_config(tmp_path)))           # a hand-edited resume header
    for header in ({"changes": "[oops"}, {"changes": "{}"}, {"step": "-5"}, {"world_size": "0"}):
        save_file({"x": torch.zeros(1)}, tmp_path / "state.safetensors", {"step": "4", "config": config, **header})
        one_line_error(lambda: sd.prepare_resume(tmp_path / "state.safetensors", tiny_config(tmp_path)),
                       "lacks a readable step and config")
    newer = json.dumps({**dataclasses.asdict(tiny_config(tmp_path)), "ema": 0.999})   # a key of a later version
    save_file({"x": torch.zeros(1)}, tmp_path / "state.safetensors", {"step": "4", "config": newer})
    one_line_error(lambda: sd.prepare_resume(tmp_path / "state.safetensors", tiny_config(tmp_path)),
                   r"state.safetensors: this sd35_lora.py refuses its config \(unknown config key 'ema'.*\); resume "
                   "with the version that saved it")      # was "lacks a readable step and config: start over"
    save_file({"param.0": torch.zeros(2)}, tmp_path / "state.safetensors")
    params = [torch.nn.Parameter(torch.zeros(2))]
    state = lambda: sd.load_training_state(tmp_path / "state.safetensors", params, torch.optim.AdamW(params), {})
    one_line_error(state, "lacks step, config or RNG state")
    # Ctrl-C in sample.py: exit 130 with one line

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(sd, "load_pipeline", interrupt)
    monkeypatch.setattr(sys, "argv", ["sample.py", "--model=tiny", "--prompt=x", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        __import__("runpy").run_path(str(ROOT / "sample.py"), run_name="__main__")
    assert e.value.code == 130 and capsys.readouterr().err.strip().count("\n") == 0


def test_a_training_state_whose_config_is_no_json_object_is_called_damaged(tmp_path):
    """A training-state header whose config is JSON but no object (a list, a number, null) was answered "this
    sd35_lora.py refuses its config (config file needs `key: value` lines ...); resume with the version that
    saved it": no version writes one. It is damaged, as a header without a config is: start over."""
    for config in ("[1, 2]", "3", "null", '"tiny"'):
        save_file({"x": torch.zeros(1)}, tmp_path / "state.safetensors", {"step": "4", "config": config})
        one_line_error(lambda: sd.prepare_resume(tmp_path / "state.safetensors", tiny_config(tmp_path)),
                       "state.safetensors lacks a readable step and config: start over in a new output_dir")


def test_a_text_encoder_config_with_a_field_of_the_wrong_type_is_a_one_line_error(tmp_path):
    """transformers 5 checks config fields' types with huggingface_hub's strict dataclasses, whose error is no
    ValueError: '"num_layers": "24"' (hand-edited) was a bare StrictDataclassFieldValidationError traceback."""
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        (tmp_path / part).mkdir()
        save_file({"x": torch.zeros(1)}, tmp_path / part / "model.safetensors")
        (tmp_path / part / "config.json").write_text(json.dumps({"model_type": "t5", "num_layers": "24"}))
    strict = int(__import__("transformers").__version__.split(".")[0]) >= 5    # 4.x reads "24" as given: the
    one_line_error(lambda: sd.load_text_encoders(tmp_path),                   # weights' check refuses then
                   "text_encoder.*config.json is missing or damaged" if strict else "not a clip_l text encoder")


def test_a_tokenizer_json_this_tokenizers_cannot_read_is_a_one_line_error(tmp_path):
    """A tokenizer.json of a newer tokenizers ('data did not match any variant of untagged enum', a plain
    Exception) or of no tokenizer (valid JSON: a KeyError) was a bare traceback, not 'incomplete' in one line."""
    for name, tok in zip(("tokenizer", "tokenizer_2", "tokenizer_3"), make_tokenizers()):
        tok.save_pretrained(tmp_path / name)
    file = tmp_path / "tokenizer_3/tokenizer.json"
    newer = {**json.loads(file.read_text()), "model": {"type": "FutureModel", "vocab": {}}}
    for text in (json.dumps(newer), "{}"):
        file.write_text(text)
        one_line_error(lambda: sd._tokenizers(tmp_path, True), "tokenizer.* folders are incomplete")


def test_a_tokenizer_folder_without_its_padding_token_is_a_one_line_error_before_any_text(tmp_path):
    """tokenizer_3/ copied without tokenizer_config.json: its tokenizer.json alone loads without a padding
    token, and the first caption or prompt was a bare ValueError ('Asking to pad ...'), after the models."""
    for name, tok in zip(("tokenizer", "tokenizer_2", "tokenizer_3"), make_tokenizers()):
        tok.save_pretrained(tmp_path / name)
    (tmp_path / "tokenizer_3/tokenizer_config.json").unlink()
    one_line_error(lambda: sd._tokenizers(tmp_path, True), "incomplete .*tokenizer_3/ has no padding token")
    assert sd._tokenizers(tmp_path, False)[2] is None                   # without T5: not read


def test_a_diffusers_folder_missing_one_tokenizer_folder_names_it_when_offline(tmp_path, monkeypatch):
    """A download cut short before tokenizer_3/: offline, the error said 'no tokenizer*/ in' the folder that
    holds tokenizer/ and tokenizer_2/."""
    import huggingface_hub
    for name, tok in zip(("tokenizer", "tokenizer_2"), make_tokenizers()):
        tok.save_pretrained(tmp_path / name)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: 1 / 0)     # offline, no cache
    one_line_error(lambda: sd._tokenizers(tmp_path, True), r"^no tokenizer_3/ in .*go online once")
    (tmp_path / "tokenizer_2").rename(tmp_path / "kept")
    one_line_error(lambda: sd._tokenizers(tmp_path, True), r"^no tokenizer_2/, tokenizer_3/ in ")
    (tmp_path / "tokenizer").rename(tmp_path / "kept_too")
    one_line_error(lambda: sd._tokenizers(tmp_path, True), r"^no tokenizer\*/ in ")


def test_a_hand_edited_pad_token_or_model_max_length_is_a_one_line_error_naming_the_file(tmp_path, diffusers_folder):
    """A pad_token outside the vocabulary is added as a new id, past the text encoder's embedding: a bare
    IndexError at the first text; CLIP's model_max_length as a list (or 0, -1) a bare TypeError (ValueError,
    OverflowError) there. Both are refused as the folders load. A pad token added with the embedding grown to
    match (its id past tokenizer.vocab_size, which leaves added tokens out) was refused as 'incomplete'."""
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
        shutil.copytree(diffusers_folder[0] / part, tmp_path / part)
    load = lambda: sd.load_text_encoders(tmp_path, context_dim=96)
    past = "padding token '<nothing>' is past the text encoder's vocabulary: copy the tokenizer folders again"
    for part, edit, match in [("tokenizer_3", {"pad_token": "<nothing>"}, f"tokenizer_3: {past}"),
                              ("tokenizer_2", {"pad_token": "<nothing>"}, f"tokenizer_2: {past}"),
                              ("tokenizer", {"model_max_length": [77]},
                               r"incomplete .*tokenizer/tokenizer_config.json: .*\[77\].*copy them again"),
                              ("tokenizer_2", {"model_max_length": 0},
                               "incomplete .*tokenizer_2/tokenizer_config.json: model_max.*copy them again"),
                              ("tokenizer", {"model_max_length": 10**30},      # transformers' value when unset
                               r"incomplete .*tokenizer/tokenizer_config.json: model_max_length 10{30}, no length"
                               ".*copy them again")]:      # was "bad text encoder weights: download them again"
        config = tmp_path / part / "tokenizer_config.json"
        saved = config.read_text()
        config.write_text(json.dumps({**json.loads(saved), **edit}))
        one_line_error(load, match)
        config.write_text(saved)
    assert [tok.pad_token for tok in sd._tokenizers(tmp_path, True)] == ["<|endoftext|>", "!", "<pad>"]
    from transformers import AutoTokenizer, CLIPTextModelWithProjection
    tok = AutoTokenizer.from_pretrained(tmp_path / "tokenizer_2")
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    tok.save_pretrained(tmp_path / "tokenizer_2")
    model = CLIPTextModelWithProjection.from_pretrained(tmp_path / "text_encoder_2")
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(tmp_path / "text_encoder_2")
    text = load()
    assert tok.pad_token_id >= tok.vocab_size and text.tok_g.pad_token == "<|pad|>"
    assert text.encode(["a red fox"])[0].isfinite().all()


def test_deeply_nested_json_or_yaml_in_a_file_is_a_one_line_error(tmp_path):
    """Python's json and PyYAML recurse per level: 100,000 nested brackets raised a bare RecursionError."""
    deep = "[" * 100_000 + "]" * 100_000
    sd.save_lora(lora_model(), tmp_path / "lora.safetensors")
    tensors, meta = sd.read_safetensors(tmp_path / "lora.safetensors", with_metadata=True)
    save_file(tensors, tmp_path / "deep.safetensors", {**meta, "sd35_lora": deep})
    one_line_error(lambda: sd.load_lora(tiny_mmdit(), tmp_path / "deep.safetensors"), "metadata is no JSON")
    config = json.dumps(dataclasses.asdict(tiny_config(tmp_path)))
    save_file({"x": torch.zeros(1)}, tmp_path / "state.safetensors", {"step": "4", "config": config, "changes": deep})
    one_line_error(lambda: sd.prepare_resume(tmp_path / "state.safetensors", tiny_config(tmp_path)), "lacks a readable")
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(deep)
    one_line_error(lambda: sd.load_mmdit(folder), "cannot read .*config.json as a JSON")
    (folder / "config.json").unlink()
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(deep)
    one_line_error(lambda: sd.load_mmdit(folder), "cannot read .*index.json as a shard")
    encoders = tmp_path / "encoders"
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        (encoders / part).mkdir(parents=True)
        save_file({"x": torch.zeros(1)}, encoders / part / "model.safetensors")
        (encoders / part / "config.json").write_text('{"model_type": "t5", "x": %s}' % deep)
    one_line_error(lambda: sd.load_text_encoders(encoders), "config.json is missing or damaged")
    (tmp_path / "deep.yaml").write_text("model: " + "[" * 5000 + "]" * 5000 + "\n")
    one_line_error(lambda: sd.load_config(str(tmp_path / "deep.yaml")), "cannot read .*deep.yaml as UTF-8 YAML")


def test_deeply_nested_yaml_in_a_set_value_is_a_one_line_error():
    """--set train.lr=[[[[... (2,000 brackets, closed or not) was a bare RecursionError from PyYAML, as in a
    file before (test above). Found by fuzzing --set."""
    for value in ("[" * 2000, "[" * 2000 + "]" * 2000):
        one_line_error(lambda: sd.load_config(None, [f"train.lr={value}"]), "--set train.lr=.*not valid YAML")


def test_a_set_value_that_is_not_valid_yaml_says_to_quote_the_list_as_a_whole():
    """--set sample.prompts=[a cat, a dog] unquoted reaches Python as the words "sample.prompts=[a", "cat,",
    ...: an unclosed list (or quote) is no YAML. Said in one line with the fix, not PyYAML's traceback."""
    for value in ("[a", "'a cat"):
        one_line_error(lambda: sd.load_config(None, [f"sample.prompts={value}"]),
                       re.escape(f"--set sample.prompts={value}: not valid YAML (quote a list like '[a, b]' "
                                 "as a whole)") + "$")


def test_a_downloaded_folder_with_custom_code_is_refused_never_offered_to_run(tmp_path, monkeypatch):
    """An auto_map in a text_encoder*/config.json or tokenizer_config.json (a hub repo's text_encoder/* files are
    downloaded, .py too) made transformers ask 'Do you wish to run the custom code? [y/N]' mid-load; y ran it.
    Then refused as 'missing or damaged ... download it again', which downloads the same code again."""
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("asked whether to run a download's code"))
    folder = tmp_path / "model"
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
        (folder / part).mkdir(parents=True)
        (folder / part / "evil.py").write_text("raise SystemExit('custom code ran')\n")
        save_file({"x": torch.zeros(1)}, folder / part / "model.safetensors")
        (folder / part / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil.C"}}))
        (folder / part / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.T", None]}}))
    one_line_error(lambda: sd.load_text_encoders(folder), "holds custom code .*never run: use a folder of the standard")
    one_line_error(lambda: sd._tokenizers(folder, True), "holds custom code .*never run: use a folder of the standard")


def saved_adamw_state(tmp_path):
    """A training state of two parameters after one AdamW step -> (params, path, its tensors, its header)."""
    params = [torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(3))]
    opt = torch.optim.AdamW(params)
    sum(p.sum() for p in params).backward()
    opt.step()
    path = tmp_path / "state.safetensors"
    sd.save_training_state(path, params, opt, 1, sd.Config(), [])
    tensors, meta = sd.read_safetensors(path, with_metadata=True)
    tensors = {k: v.clone() for k, v in tensors.items()}     # safetensors < 0.8 maps the file written over later
    return params, path, tensors, meta


def test_a_state_file_with_damaged_adamw_moments_is_a_one_line_error(tmp_path):
    """A training state with an AdamW moment cut out (or of another shape) resumed, then the first step failed
    with a bare KeyError: 'exp_avg_sq'; without any moments after step 0 it would restart AdamW unnoticed."""
    params, path, tensors, meta = saved_adamw_state(tmp_path)
    moments = {k: None for k in tensors if k.startswith("opt.")}
    for edit in ({"opt.1.exp_avg_sq": None}, {"opt.0.exp_avg": torch.zeros(3)}, moments,
                 {"opt.0.step": torch.ones(5)}, {"opt.0.step": torch.tensor(-3.0)},   # AdamW failed at its step
                 {"opt.0.step": torch.tensor(0.0)}):                     # (step 0: its bias correction divides by 0)
        save_file({k: v for k, v in (tensors | edit).items() if v is not None}, path, meta)
        fresh = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
        one_line_error(lambda: sd.load_training_state(path, fresh, torch.optim.AdamW(fresh), meta),
                       "damaged AdamW moments .*start anew in another output_dir")
    for edit in ({"rng.cpu": tensors["rng.cpu"].float()}, {"rng.cpu": tensors["rng.cpu"][:10]},
                 {"param.0": None, "param.5": tensors["param.0"]},      # were a bare TypeError, RuntimeError, KeyError
                 {"rng.cuda": torch.zeros(16)}):                        # rng.cuda: would fail on a GPU only
        save_file({k: v for k, v in (tensors | edit).items() if v is not None}, path, meta)
        fresh = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
        one_line_error(lambda: sd.load_training_state(path, fresh, torch.optim.AdamW(fresh), meta),
                       "lacks step, config or RNG state.*start anew in another output_dir")
    save_file(tensors | {"param.0": tensors["param.0"][:1]}, path, meta)     # (1, 3): copy_ would broadcast it
    fresh = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
    one_line_error(lambda: sd.load_training_state(path, fresh, torch.optim.AdamW(fresh), meta), "LoRA of another shape")
    save_file(tensors, path, meta)                                      # intact: resumes and steps
    fresh = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
    opt = torch.optim.AdamW(fresh)
    assert sd.load_training_state(path, fresh, opt, meta) == 1
    sum(p.sum() for p in fresh).backward()
    opt.step()


def test_a_state_file_with_adamw_moments_or_lora_of_a_dtype_no_run_saves_is_a_one_line_error(tmp_path):
    """An AdamW step stored as uint32 (or bool, complex, fp8) was a bare NotImplementedError or RuntimeError;
    moments and LoRA weights of such dtypes loaded silently cast (bools as 0/1, complex without .imag)."""
    params, path, tensors, meta = saved_adamw_state(tmp_path)
    for dtype in (torch.uint32, torch.bool, torch.complex64, torch.float8_e4m3fn, torch.int64):
        for key, match in (("opt.0.step", "damaged AdamW moments"), ("opt.1.exp_avg", "damaged AdamW moments"),
                           ("param.0", "lacks step, config or RNG state")):
            save_file(tensors | {key: tensors[key].to(dtype)}, path, meta)
            fresh = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
            one_line_error(lambda: sd.load_training_state(path, fresh, torch.optim.AdamW(fresh), meta),
                           f"{match}.*start anew in another output_dir")
    save_file(tensors | {"opt.0.step": tensors["opt.0.step"].double()}, path, meta)  # a float64 default dtype's
    fresh = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
    assert sd.load_training_state(path, fresh, torch.optim.AdamW(fresh), meta) == 1


def test_a_state_file_holding_nan_or_inf_is_a_one_line_error(tmp_path):
    """A training state with inf in an AdamW exp_avg_sq (a damaged file) resumed silently, that weight never
    to move again (its update is 0); NaN in a LoRA weight or moment resumed into 'loss became nan ... lower
    train.lr', on each --resume. Found by fuzzing the state file."""
    params, path, tensors, meta = saved_adamw_state(tmp_path)
    for key, match in (("param.0", "lacks step, config or RNG state"), ("opt.0.exp_avg", "damaged AdamW moments"),
                       ("opt.1.exp_avg_sq", "damaged AdamW moments"), ("opt.1.step", "damaged AdamW moments")):
        for value in (float("nan"), float("inf")):
            damaged = tensors[key].clone()
            damaged.view(-1)[-1] = value
            save_file(tensors | {key: damaged}, path, meta)
            fresh = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
            one_line_error(lambda: sd.load_training_state(path, fresh, torch.optim.AdamW(fresh), meta),
                           f"{match}.*start anew in another output_dir")


def test_output_paths_are_checked_first_and_a_full_disk_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    make_dataset(tmp_path / "data")
    (tmp_path / "file").write_text("not a folder")
    real_load = sd.load_pipeline
    monkeypatch.setattr(sd, "load_pipeline", lambda *a, **k: pytest.fail("a model loaded before the paths"))
    for key, where in [("output_dir", "file"), ("output_dir", "file/run"), ("dataset.cache_dir", "file/c")]:
        one_line_error(lambda: sd.train(tiny_config(tmp_path, **{key: str(tmp_path / where)})),
                       f"{key} .*{where} is not a writable folder")
        args = ["--model", "tiny", "--prompt", "x", "--out", str(tmp_path / where)]
        one_line_error(lambda: sample.main(args), f"--out .*{where} is not a writable folder")

    def read_only(*args, **kwargs):                          # chmod cannot stop root: simulate the refusal
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(sd.tempfile, "TemporaryFile", read_only)
    one_line_error(lambda: sd.train(tiny_config(tmp_path, output_dir=str(tmp_path / "ro"))),
                   r"output_dir .*ro is not a writable folder \(Permission denied\)")
    monkeypatch.undo()
    sd.train(tiny_config(tmp_path, **{"train.steps": 2, "train.save_every": 2, "sample.sample_every": 0}))
    run = tmp_path / "run"
    checkpoints = lambda: {p.name: p.read_bytes() for p in run.iterdir() if p.suffix == ".safetensors"}
    before, real_save = checkpoints(), sd.save_file

    def full_disk(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)      # a partial file is on disk when space runs out
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(sd, "save_file", full_disk)
    one_line_error(lambda: sd.train(tiny_config(tmp_path, **{"train.steps": 4, "train.save_every": 2,
                                                              "sample.sample_every": 0}), resume=True),
                   r"cannot write .*lora_step_000004.safetensors \(No space left on device\): free disk")
    assert checkpoints() == before and not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))
    real_open = open                                          # the disk is full when the log is appended to

    def full_log(file, mode="r", *args, **kwargs):
        if str(file).endswith("log.jsonl") and "a" in mode:
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr(sd, "save_file", real_save)
    monkeypatch.setattr(sd, "open", full_log, raising=False)
    cfg = tiny_config(tmp_path, **{"sample.sample_every": 0})
    monkeypatch.setattr(sd, "load_config", lambda *a: cfg)
    with pytest.raises(SystemExit) as e:
        sd.main(["--resume"])
    assert e.value.code.startswith("error: [Errno 28] No space left on device") and "\n" not in e.value.code
    assert checkpoints() == before


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_disk_at_the_start_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    """On a real full disk (tmpfs, ext4) a file can be made but no byte written: writable_dir made its test
    file without writing, so train() loaded the models, cached the dataset, ran a step and failed appending
    to log.jsonl, leaving an output_dir that now had to be emptied; sample.py loaded its models too. The refused
    folder (and those made above it) stayed behind, empty: a tmpfs or a quota lets mkdir make it."""
    make_dataset(tmp_path / "data")
    monkeypatch.setattr(sd, "load_pipeline", lambda *a, **k: pytest.fail("a model loaded on a full disk"))
    real = sd.tempfile.TemporaryFile                                                    # writes: ENOSPC
    monkeypatch.setattr(sd.tempfile, "TemporaryFile", lambda dir: open("/dev/full", "wb") if "on_full" in str(dir)
                        else real(dir=dir))
    for key in ("output_dir", "dataset.cache_dir"):     # cache_dir's: after output_dir's lock (which goes too)
        one_line_error(lambda: sd.train(tiny_config(tmp_path, **{key: str(tmp_path / "on_full/new/run")})),
                       rf"{key} .*run is not a writable folder \(No space left on device\): free disk space")
    one_line_error(lambda: sample.main(["--model", "tiny", "--prompt", "x", "--out", str(tmp_path / "on_full/s")]),
                   r"--out .*s is not a writable folder \(No space left on device\): free disk space")
    assert os.listdir(tmp_path) == ["data"]


def test_a_full_disk_before_the_first_checkpoint_is_not_sent_to_resume(tmp_path, monkeypatch):
    """main's error for an OSError (a full disk while the log is appended to) said 'then continue with --resume'
    also before the first checkpoint, where --resume only answers that there is nothing to resume from."""
    make_dataset(tmp_path / "data")
    real_open = open

    def full_log(file, mode="r", *args, **kwargs):
        if str(file).endswith("log.jsonl") and "a" in mode:
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr(sd, "open", full_log, raising=False)
    cfg = tiny_config(tmp_path, **{"sample.sample_every": 0, "sample.prompts": [], "train.save_every": 100})
    monkeypatch.setattr(sd, "load_config", lambda *a: cfg)
    with pytest.raises(SystemExit) as e:
        sd.main([])
    assert not (tmp_path / "run" / "training_state.safetensors").exists()
    assert e.value.code.startswith("error: [Errno 28]") and "--resume" not in e.value.code, e.value.code
    assert "no checkpoint" in e.value.code


def test_an_output_dir_name_too_long_gets_one_line(tmp_path, monkeypatch):
    """An output_dir with a folder name over 255 bytes: main's OSError advice looked for a checkpoint in it with
    Path.is_file, which raises that same OSError (ENAMETOOLONG) again: a bare traceback instead of the line."""
    make_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, output_dir=str(tmp_path / ("x" * 300) / "run"))
    monkeypatch.setattr(sd, "load_config", lambda *a: cfg)
    with pytest.raises(SystemExit) as e:
        sd.main([])
    assert e.value.code.startswith("error: output_dir ") and "is not a writable folder (File name too long)" \
        in e.value.code                                 # (checked before any other look into it)
    assert "\n" not in e.value.code


def test_saved_files_get_the_usual_permissions(tmp_path):
    """safetensors creates its files owner-only (0600): a LoRA gets the umask's 0644 like the PNGs next to it."""
    umask = os.umask(0o022)
    try:
        sd._atomic_save({"a": torch.zeros(2)}, tmp_path / "lora.safetensors")
        sd._atomic_save("text", tmp_path / "log.txt")
    finally:
        os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"lora.safetensors": 0o644,
                                                                           "log.txt": 0o644}


def test_the_loss_curves_moving_average_takes_one_pass_over_the_log(tmp_path, monkeypatch):
    """loss.png's moving average (over a 20th of the steps) summed each window anew: 5e8 additions (3 s) at
    step 100,000, at every sample_every, growing with the square of the steps."""
    additions = []

    class Loss(float):                                 # a logged loss that counts the additions made with it
        def __add__(self, other):
            additions.append(other)
            return float(self) + other
        __radd__ = __add__
    log, real_loads = tmp_path / "log.jsonl", json.loads
    log.write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in range(1, 2001)))
    monkeypatch.setattr(sd, "json", types.SimpleNamespace(loads=lambda line: real_loads(line, parse_float=Loss)))
    sd.plot_losses(log, tmp_path / "loss.png")
    assert Image.open(tmp_path / "loss.png").size == (800, 400) and len(additions) < 10 * 2000   # was 200,000


def test_loss_png_reads_the_log_line_by_line_and_draws_at_most_16_points_a_pixel_column(tmp_path, monkeypatch):
    """loss.png, redrawn at every sample_every, read log.jsonl whole as dicts (~1 KB a step: 1 GB at a million
    steps) and drew every step as a point of both curves (a Python tuple each) into 690 pixel columns."""
    drawn, real_line = [], ImageDraw.ImageDraw.line

    def line(self, points, fill=None, width=0):
        drawn.append(len(points))
        return real_line(self, points, fill=fill, width=width)
    monkeypatch.setattr(ImageDraw.ImageDraw, "line", line)
    steps = 3 * 8 * 690 - 1                 # a stride of 2 (by len // (8 * columns)) gave 24 points a column
    (tmp_path / "log.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 1 / s, "lr": 1e-4, "grad_norm": 0.5, "sigma": 0.5, "time": 1.7e9}) + "\n"
        for s in range(1, steps + 1)))
    tracemalloc.start()
    try:
        sd.plot_losses(tmp_path / "log.jsonl", tmp_path / "loss.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert Image.open(tmp_path / "loss.png").size == (800, 400)
    assert max(drawn) <= 16 * 690 and peak < 300 * steps, (drawn, peak)    # were every step, 1 KB a step


def test_the_loss_curves_moving_average_is_the_mean_of_the_last_window_of_losses(tmp_path, monkeypatch):
    """loss.png's dark curve and its 'last' number: the mean of the last max(2, steps // 20) losses, fewer at
    the start. No test looked at them: a window one step off or a wrong divisor drew a wrong curve unseen."""
    drawn, real_line, real_text = {}, ImageDraw.ImageDraw.line, ImageDraw.ImageDraw.text

    def line(self, points, fill=None, width=0):
        drawn[fill] = points
        return real_line(self, points, fill=fill, width=width)

    def text(self, xy, words, fill=None):
        drawn.setdefault("text", []).append(words)
        return real_text(self, xy, words, fill=fill)
    monkeypatch.setattr(ImageDraw.ImageDraw, "line", line)
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", text)
    losses = [float(s % 7) for s in range(1, 61)]                  # window 3
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": v}) + "\n"
                                                for s, v in enumerate(losses, 1)))
    sd.plot_losses(tmp_path / "log.jsonl", tmp_path / "loss.png")
    lo, hi, height, pad = min(losses), max(losses), 400, 40                  # plot_losses' y axis, inverted
    smooth = [lo + (height - pad - y) * (hi - lo) / (height - 2 * pad) for _, y in drawn[(20, 60, 180)]]
    expected = [sum(losses[max(0, i - 2):i + 1]) / min(i + 1, 3) for i in range(60)]
    assert smooth == pytest.approx(expected, abs=1e-9)
    assert f"dark: mean of 3, last {expected[-1]:.4f})" in drawn["text"][-1]


def test_atomic_writes_use_unique_flushed_temporaries(tmp_path, monkeypatch):
    target, real_save, calls = tmp_path / "cache" / "x.safetensors", sd.save_file, []

    def second_run_writes_meanwhile(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        if not calls:                                          # another run sharing the cache writes it too
            calls.append(filename)
            sd._atomic_save({"v": torch.ones(2)}, target)
    monkeypatch.setattr(sd, "save_file", second_run_writes_meanwhile)
    sd._atomic_save({"v": torch.zeros(2)}, target)
    assert torch.equal(load_file(target)["v"], torch.zeros(2)) and os.listdir(target.parent) == [target.name]
    order = []
    monkeypatch.setattr(os, "fsync", lambda fd: order.append("fsync"))
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append("replace"), real_replace(a, b)))
    (tmp_path / "log.jsonl").write_text('{"loss": 1.0}\n{"loss": 0.5}\n')
    sd.plot_losses(tmp_path / "log.jsonl", tmp_path / "loss.png")
    assert order == ["fsync", "replace"] and Image.open(tmp_path / "loss.png").size == (800, 400)
    # a killed run's temporary file is never read as a cache file
    (tmp_path / "cache" / "x.safetensors.tmp").write_bytes(b"half")
    (tmp_path / "cache" / ".x.safetensors.123-0a1b2c3d.tmp").write_bytes(b"half")
    assert torch.equal(load_file(sd.cached(target, pytest.fail))["v"], torch.zeros(2))


#################################################################################
#                     Several processes (torchrun, gloo, CPU)                   #
#################################################################################

def torchrun(*args, nproc: int = 2, wait: bool = True, **env):
    """`torchrun --standalone` of CPU processes (gloo), one thread each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def tiny_sets(tmp_path, **sets) -> list[str]:
    """tiny_overrides as main()'s command line: --set key=value for each."""
    return [arg for item in tiny_overrides(tmp_path, **sets) for arg in ("--set", item)]


def train_cli(tmp_path, **sets) -> list[str]:
    return [str(ROOT / "sd35_lora.py"), *tiny_sets(tmp_path, **sets)]


def wait_for_steps(run: Path, n: int, job: subprocess.Popen, limit: float = 120):
    start = time.time()
    while not ((run / "log.jsonl").is_file() and len(losses(run)) >= n):
        assert job.poll() is None and time.time() - start < limit, job.communicate()
        time.sleep(0.2)


def assert_same_run(a: Path, b: Path, rtol: float = 1e-5):
    np.testing.assert_allclose(losses(a), losses(b), rtol=rtol)
    la, lb = load_file(a / "lora.safetensors"), load_file(b / "lora.safetensors")
    assert la.keys() == lb.keys()
    for k in la:                                     # relative to the tensor: Adam magnifies rounding near zero
        assert (la[k] - lb[k]).norm() <= rtol * lb[k].norm(), (k, ((la[k] - lb[k]).norm() / lb[k].norm()).item())


def test_torchrun_equals_one_process_and_resumes_on_any_world_size(tmp_path):
    make_dataset(tmp_path / "data")
    for i, color in enumerate([(0, 200, 0), (250, 250, 0), (120, 0, 160)]):  # 5 images: short last batches
        Image.new("RGB", (64, 64), color).save(tmp_path / "data" / f"plain_{i}.png")
        (tmp_path / "data" / f"plain_{i}.txt").write_text(f"plain {i}")
    shared = {"train.steps": 2, "sample.sample_every": 0, "sample.prompts": [], "dataset.flip": True,
              "dataset.caption_dropout": 0.3, "lora.targets": "attn", "train.gradient_checkpointing": False}
    checked = {"sample.prompts": ["red stripes"], "train.gradient_checkpointing": True}     # images, checkpointing
    runs = {  # name: (settings, resume)
        "two_bs1": ({**shared, **checked}, False),
        "two_bs1_accum2": ({**shared, "train.grad_accum": 2}, False),
        "two_half": ({**shared, "train.steps": 1}, False),
        "dropout_full": ({**shared, "lora.dropout": 0.2}, False),
        "dropout_half": ({**shared, "lora.dropout": 0.2, "train.steps": 1}, False),
        "dropout_resumed": ({**shared, "lora.dropout": 0.2, "output_dir": str(tmp_path / "dropout_half")}, True)}
    plan = [(tiny_overrides(tmp_path, **{"output_dir": str(tmp_path / name), **sets}), resume)
            for name, (sets, resume) in runs.items()]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    r = torchrun(str(ROOT / "test_sd35.py"), str(tmp_path / "plan.json"))
    assert r.returncode == 0, [line for line in r.stderr.splitlines() if line.startswith("[rank")][-20:]
    for name, sets in (("one_bs2", {**shared, **checked, "train.batch_size": 2}),
                       ("one_bs4", {**shared, "train.batch_size": 4})):
        sd.train(tiny_config(tmp_path, **sets, output_dir=str(tmp_path / name)))
    assert_same_run(tmp_path / "two_bs1", tmp_path / "one_bs2")              # 2 x 1 == 1 x 2
    assert_same_run(tmp_path / "two_bs1_accum2", tmp_path / "one_bs4")       # 2 x 1 x accum 2 == 1 x 4
    assert_same_run(tmp_path / "dropout_half", tmp_path / "dropout_full", rtol=0)    # resumed under torchrun
    image = lambda run: np.asarray(Image.open(run / "samples_step_000002/step_000002_sample_00.png"), dtype=int)
    assert np.abs(image(tmp_path / "two_bs1") - image(tmp_path / "one_bs2")).max() <= 1
    meta = json.loads(sd.read_safetensors(tmp_path / "two_bs1/lora.safetensors", with_metadata=True)[1]["sd35_lora"])
    assert meta["world_size"] == 2 and meta["global_batch"] == 2
    half = {**shared, "output_dir": str(tmp_path / "two_half")}              # resumed on 1 process
    with pytest.raises(sd.UserError, match=r"global batch of 2 on 2 processes: on 1, keep it with "
                                           r"train.batch_size x train.grad_accum = 2, or resume on 2"):
        sd.train(tiny_config(tmp_path, **half), resume=True)
    sd.train(tiny_config(tmp_path, **half, **{"train.batch_size": 2}), resume=True)
    assert_same_run(tmp_path / "two_half", tmp_path / "two_bs1")


def test_torchrun_resume_refuses_processes_that_found_different_checkpoints(tmp_path):
    """Two machines each with its own output_dir (a local disk, not a shared one): each process loaded the
    checkpoint its machine had, here steps 2 and 1, and the run trained on silently, the processes' LoRAs apart.
    Then refused, but after caching the dataset (minutes to hours): now before; and two files of one step were
    said to be '(steps 2)'. Two processes here, each in its own folder holding its own `run`."""
    make_dataset(tmp_path / "data")
    sets = {**LONG_RUN, "train.steps": 2, "train.batch_size": 2, "output_dir": "run"}
    for machine, steps in (("machine0", 2), ("machine1", 1)):
        (tmp_path / machine).mkdir()
        r = run_cli(*train_cli(tmp_path, **{**sets, "train.steps": steps}), cwd=tmp_path / machine)
        assert r.returncode == 0, r.stderr[-2000:]
    script = tmp_path / "machine.py"
    script.write_text(f"import os, sys\nos.chdir({str(tmp_path)!r} + '/machine' + os.environ['RANK'])\n"
                      f"sys.path.insert(0, {str(ROOT)!r})\nimport sd35_lora\nsd35_lora.main()\n")
    resume = lambda: torchrun(str(script), *train_cli(tmp_path, **{**sets, "train.steps": 3, "train.batch_size": 1})[1:],
                              "--resume")
    shutil.rmtree(tmp_path / "cache")
    r = resume()
    assert r.returncode != 0, r.stderr[-2000:]
    assert ("error: --resume: the processes found different checkpoints in output_dir run (steps 1, 2): put "
            "output_dir on a file system every machine sees") in r.stderr, r.stderr[-2000:]
    assert not list((tmp_path / "cache").rglob("*.safetensors"))      # refused before the caching
    shutil.rmtree(tmp_path / "machine1" / "run")    # step 2 too, saved with another (resume-free) save_every
    r = run_cli(*train_cli(tmp_path, **{**sets, "train.save_every": 5}), cwd=tmp_path / "machine1")
    assert r.returncode == 0, r.stderr[-2000:]
    r = resume()
    assert r.returncode != 0 and "output_dir run (all at step 2, saved with another config): put" in r.stderr, \
        r.stderr[-2000:]


def test_torchrun_a_cache_dir_each_machine_has_its_own_is_named_as_such(tmp_path):
    """dataset.cache_dir on each machine's own disk: each process found the others' share of the cache missing in
    the first step, as "cache file ... cannot be read (deleted): run again ...; the next start rebuilds it",
    which no new start does. Two processes here, each in its own folder holding its own `cache`."""
    make_dataset(tmp_path / "data")
    for rank in "01":
        (tmp_path / f"machine{rank}").mkdir()
    script = tmp_path / "machine.py"
    script.write_text(f"import os, sys\nos.chdir({str(tmp_path)!r} + '/machine' + os.environ['RANK'])\n"
                      f"sys.path.insert(0, {str(ROOT)!r})\nimport sd35_lora\nsd35_lora.main()\n")
    sets = {**LONG_RUN, "train.steps": 2, "output_dir": "run", "dataset.cache_dir": "cache"}
    r = torchrun(str(script), *train_cli(tmp_path, **sets)[1:])
    assert r.returncode != 0 and "cannot be read" not in r.stderr, r.stderr[-2000:]
    assert re.search(r"error: cache file cache/\w+/\w+\.safetensors, another process's share, is not in "
                     r"dataset.cache_dir here: put it \(and output_dir\) on a file system every machine sees",
                     r.stderr), r.stderr[-2000:]


def test_torchrun_a_cache_dir_of_each_machine_is_named_whichever_process_shares_its_disk(tmp_path):
    """Two processes per machine (the usual torchrun across machines), each machine's own dataset.cache_dir:
    process 0 looked for one file of another process's share, often process 1's, on its own disk, found it and
    went on; process 2's share then failed in training as "cannot be read (deleted) ... the next start rebuilds
    it". Process 0 of 4 here, its machine's disk holding processes 0 and 1's shares."""
    names = [f"{i:064x}" for i in range(1, 9)]                          # shares: int(name, 16) % 4
    files = [tmp_path / f"{name}.safetensors" for name in names]
    for file in files:
        if int(file.stem, 16) % 4 in (0, 1):
            file.write_bytes(b"")
    with pytest.raises(sd.UserError, match=r"cache file .*0{63}2\.safetensors, another process's share, is not"):
        sd.check_cache_shared(files, 0, 4)
    sd.check_cache_shared([f for f in files if int(f.stem, 16) % 4 < 2], 0, 4)      # no share of 2 or 3 listed


LONG_RUN = {"train.steps": 10_000, "train.save_every": 10_000, "sample.prompts": [], "lora.targets": "attn",
            "train.gradient_checkpointing": False}


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    make_dataset(tmp_path / "data")
    job = subprocess.Popen([sys.executable, *train_cli(tmp_path, **LONG_RUN)], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wait_for_steps(tmp_path / "run", 2, job)
    job.send_signal(signal.SIGTERM)                 # what schedulers and `timeout` send
    out, err = job.communicate(timeout=120)
    step = len(losses(tmp_path / "run"))
    assert job.returncode == 143, err[-2000:]
    assert out.strip().splitlines()[-1] == f"terminated at step {step}; checkpoint saved. Continue with --resume"
    assert sd.read_safetensors(tmp_path / "run/training_state.safetensors", with_metadata=True)[1]["step"] == str(step)
    for lora in ("lora.safetensors", f"lora_step_{step:06d}.safetensors"):     # the LoRA of the step it stopped at
        header = sd.read_safetensors(tmp_path / "run" / lora, with_metadata=True)[1]
        assert json.loads(header["sd35_lora"])["step"] == step


def test_torchrun_sigterm_stops_every_process_after_the_same_step(tmp_path):
    make_dataset(tmp_path / "data")
    job = torchrun(*train_cli(tmp_path, **LONG_RUN), wait=False)
    wait_for_steps(tmp_path / "run", 2, job)
    job.send_signal(signal.SIGTERM)                 # torchrun passes it to every process
    out, err = job.communicate(timeout=120)
    step = len(losses(tmp_path / "run"))
    assert out.strip().splitlines()[-1] == f"terminated at step {step}; checkpoint saved. Continue with --resume", err
    assert sd.read_safetensors(tmp_path / "run/training_state.safetensors", with_metadata=True)[1]["step"] == str(step)
    assert "]: Traceback" not in err and out.count("checkpoint saved") == 1


def test_tiny_under_torchrun_shares_one_output_dir_and_writes_whole_demo_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, value in (("TORCHELASTIC_RUN_ID", "job-42"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "localhost")):
        monkeypatch.setenv(name, value)                         # what torchrun gives every process of a job
    (tmp_path / "runs/tiny_data").mkdir(parents=True)          # another process has just created it
    seen = []
    monkeypatch.setattr(sd, "train", lambda cfg, resume: seen.append(cfg) or Path("lora.safetensors"))
    sd.main(["--tiny"])
    assert seen[0].output_dir == "runs/tiny_job-42"          # not a timestamp that may differ by a second
    names = sorted(p.name for p in (tmp_path / "runs/tiny_data").iterdir())
    assert names == ["blue_disc.png", "blue_disc.txt", "red_stripes.png", "red_stripes.txt"]


def test_tiny_under_srun_or_torchrun_without_a_run_id_shares_process_0s_output_dir(tmp_path):
    """srun (a job script's MASTER_ADDR etc.) and torchrun without --rdzv-id give no run id: each process named
    its --tiny folder by its own clock, and two started across a second's turn wrote to two folders. Two real
    gloo processes here, their clocks a second apart."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import os, sys, time; sys.path.insert(0, sys.argv[1]); import sd35_lora as sd; "
            "time.strftime = lambda *args: '20260101-00000' + os.environ['RANK']; "
            "sd.train = lambda cfg, resume: open('rank' + os.environ['RANK'], 'w').write(cfg.output_dir); "
            "sd.main(['--tiny'])")
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    ranks = [subprocess.Popen([sys.executable, "-c", code, str(ROOT)], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                              env={**env, "WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank, "OMP_NUM_THREADS": "1",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for rank in "01"]
    errors = [p.communicate(timeout=120)[1] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], errors
    assert [(tmp_path / f"rank{rank}").read_text() for rank in "01"] == ["runs/tiny_20260101-000000"] * 2


def test_tiny_with_a_torchrun_job_id_left_in_a_plain_runs_environment_makes_a_new_run(tmp_path, monkeypatch):
    """A TORCHELASTIC_RUN_ID copied from a torchrun shell named every plain `--tiny` run's output_dir after it:
    the second was refused ("output_dir runs/tiny_job-42 already holds files of an earlier run")."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-42")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    seen = []
    monkeypatch.setattr(sd, "train", lambda cfg, resume: seen.append(cfg) or Path("lora.safetensors"))
    sd.main(["--tiny"])
    assert re.fullmatch(r"runs/tiny_\d{8}-\d{6}", seen[0].output_dir), seen[0].output_dir     # a timestamp


def test_torchrun_nan_on_one_process_stops_all_without_saving(tmp_path):
    make_dataset(tmp_path / "data")
    sets = {**LONG_RUN, "train.steps": 3}
    cfg = tiny_config(tmp_path, **sets)
    data = sd.LatentDataset(sd.scan_dataset(cfg.dataset), sd.tiny_pipeline(t5_length=16), cfg, cfg.model)
    poisoned = data.latent_files[0]                 # one image's cached latents: only the process given it sees NaN
    # finite on disk (a NaN file would be rebuilt), inf once scaled into the MMDiT's latent space
    save_file({k: torch.full_like(v, 3e38) for k, v in load_file(poisoned).items()}, poisoned)
    r = torchrun(*train_cli(tmp_path, **sets))
    assert r.returncode != 0 and r.stderr.count("error: loss became nan (gradient norm nan) at step 1") == 1, r.stderr
    assert "]: Traceback" not in r.stderr and not list((tmp_path / "run").glob("*.safetensors"))


def test_torchrun_out_of_memory_in_every_process_saves_once_and_each_says_so(tmp_path):
    """A step's images share one bucket: every process runs out of memory in the same step. Each printed torch's
    traceback and nothing was saved; now each says it in one line, and process 0 saves the last step. Process 0
    writes its share of the cache slowly here: process 1 must find every cache file there as training starts."""
    make_dataset(tmp_path / "data")
    script = tmp_path / "run.py"
    script.write_text(f"import os, sys, time, torch\nsys.path.insert(0, {str(ROOT)!r})\nimport sd35_lora\n"
                      "real, calls = sd35_lora.flow_matching_loss, []\n"
                      "def loss(*args):\n    calls.append(1)\n    if len(calls) == 3:\n"
                      "        raise torch.OutOfMemoryError('CUDA out of memory')\n    return real(*args)\n"
                      "def slow(*args):\n    time.sleep(1)\n    return cache(*args)\n"
                      "def step(trainer, *args):\n    files = trainer.data.latent_files + trainer.data.text_files\n"
                      "    assert all(map(os.path.isfile, files)), 'training began before the cache was complete'\n"
                      "    return forward_backward(trainer, *args)\n"
                      "cache, forward_backward = sd35_lora.cached, sd35_lora.Trainer.forward_backward\n"
                      "sd35_lora.cached = slow if os.environ['RANK'] == '0' else cache\n"
                      "sd35_lora.Trainer.forward_backward = step\n"
                      "sd35_lora.flow_matching_loss = loss\nsd35_lora.main()\n")
    r = torchrun(str(script), *train_cli(tmp_path, **{**LONG_RUN, "train.steps": 5})[1:])
    assert r.returncode == 1 and "]: Traceback" not in r.stderr, r.stderr[-3000:]
    assert "error: process 0: out of GPU memory in training step 3 (64x64 images); checkpoint of step 2 saved" in r.stderr
    assert "error: process 1: out of GPU memory in training step 3 (64x64 images); process 0 saves step 2 if" in r.stderr
    assert sd.read_safetensors(tmp_path / "run/training_state.safetensors", with_metadata=True)[1]["step"] == "2"


def test_torchrun_an_error_of_one_process_alone_is_printed_by_it(tmp_path):
    """A cache file of process 1's share that cannot be written: only process 1 meets the error, and torchrun
    stops process 0 before it says anything; process 1 exited 1 without a word."""
    make_dataset(tmp_path / "data")
    sets = {**LONG_RUN, "train.steps": 2}
    cfg = tiny_config(tmp_path, **sets)
    for n in range(64):                     # the files' names are digests: all 4 can be process 0's (on torch 2.5
        data = sd.LatentDataset(sd.scan_dataset(cfg.dataset), sd.tiny_pipeline(t5_length=16), cfg, cfg.model)
        odd = [f for f in data.latent_files + data.text_files if int(f.stem, 16) % 2 == 1]   # process 1's
        if odd:                             # + transformers 4.56 they are): another caption then
            break
        (tmp_path / "data/red_stripes.txt").write_text(f"red stripes {n}", encoding="utf-8")
    blocked = odd[0]
    blocked.unlink()
    blocked.mkdir()                                 # its rewrite fails
    r = torchrun(*train_cli(tmp_path, **sets))
    assert r.returncode != 0 and r.stderr.count(f"error: process 1: cannot write {blocked}") == 1, r.stderr[-3000:]
    assert f"process 0: cannot write {blocked}" not in r.stderr         # each file has one writer: its share's


def test_errors_every_process_meets_are_printed_once_per_machine(monkeypatch):
    """Once, not once per process; but by each machine's first process: with two machines (seen with two
    `torchrun --nnodes 2`), a dataset.path missing on the second one stopped its processes without a word."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "localhost")              # as torchrun sets them
    for (rank, local), code in (((1, 1), 1), ((0, 0), "error: 'train.lr'"), ((2, 0), "error: 'train.lr'")):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(local))
        with pytest.raises(SystemExit) as exit_info:
            sd.main(["--set", "model=tiny", "--set", "train.lr=-1"])
        assert str(exit_info.value.code).startswith(str(code))


def test_a_plain_run_prints_its_errors_whatever_local_rank_says(monkeypatch):
    """One process (no WORLD_SIZE) is every machine's first, even with a LOCAL_RANK left in its environment
    (exported, or started from a torchrun worker): it exited 1 without a word."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit) as exit_info:
        sd.main(["--set", "model=tiny", "--set", "train.lr=-1"])
    assert str(exit_info.value.code).startswith("error: 'train.lr'")


def test_a_world_size_exported_empty_is_a_plain_run_not_a_traceback(monkeypatch):
    """`export WORLD_SIZE=$SLURM_NTASKS` in a script run outside Slurm leaves it empty: every start of
    sd35_lora.py (and sample.py with a LOCAL_RANK) ended in a ValueError traceback from int('')."""
    monkeypatch.setenv("WORLD_SIZE", "")
    monkeypatch.setenv("RANK", "")
    assert sd.rank_and_world() == (0, 1)
    with pytest.raises(SystemExit) as exit_info:
        sd.main(["--set", "model=tiny", "--set", "train.lr=-1"])
    assert str(exit_info.value.code).startswith("error: 'train.lr'")


def test_a_plain_run_with_a_rank_left_in_its_environment_trains_and_saves(tmp_path, monkeypatch, capsys):
    """RANK without WORLD_SIZE (exported, or a shell started from a torchrun worker): the one process took itself
    for torchrun's process 1 of 1, trained no sample, and after the models and the cache loaded ended in a
    ZeroDivisionError traceback; its prints went to /dev/null and nothing would have been saved."""
    make_dataset(tmp_path / "data")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "1")
    assert sd.rank_and_world() == (0, 1)
    sets = {"train.steps": 1, "train.save_every": 1, "sample.prompts": [], "lora.targets": "attn"}
    sd.main(tiny_sets(tmp_path, **sets))
    assert "done: " in capsys.readouterr().out and (tmp_path / "run/lora.safetensors").is_file()


def test_nccl_setup_errors_at_the_first_barrier_are_not_called_lost_contact(monkeypatch):
    """NCCL connects lazily, at the cache barrier: its own errors there (a container's small /dev/shm, as
    reported against other trainers' first barrier) are no dead peer; 'lost contact ... run again' dropped
    the 'Last error' line that says what to fix. They are all NCCL said on one line (but a C++ stack, if
    shown); a peer NCCL lost is still 'lost contact'."""
    shm = ("NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.hpp:268, unhandled system error (run "
           "with NCCL_DEBUG=INFO for details), NCCL version 2.21.5\nLast error:\nError while creating shared "
           "memory segment /dev/shm/nccl-LeXlEJ (size 9637888)")
    remote = ("NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.hpp:268, remote process exited "
              "or there was a network error, NCCL version 2.21.5")
    trace = "\nException raised from checkForNCCLErrors at NCCLUtils.cpp:1 (most recent call first):\nframe #0: c10"
    said = (r"^NCCL error in: .* NCCL version 2.21.5 Last error: Error while creating shared memory segment "
            r"/dev/shm/nccl-LeXlEJ \(size 9637888\) \(NCCL's own error: fix what it names, then run again, with --resume "
            r"once a checkpoint was saved\)$")
    for message, expected in ((shm + trace, said), (remote, r"^lost contact with the others \(NCCL error in: ")):
        def fail():
            raise sd.dist.DistBackendError(message)
        with pytest.raises(sd.UserError, match=expected) as e:   # NCCL's own: it was each process's traceback
            sd.collective(fail)
        assert e.value.own and "\n" not in str(e.value)


def test_lost_contact_names_process_0s_previews_as_a_cause(monkeypatch):
    """Seen under torchrun (gloo, train.dist_timeout 3, 400-step previews): process 1 waited out process 0's
    previews at its next all-reduce, timed out, and blamed a dead or hung process; the fix (raise dist_timeout)
    went unsaid."""
    def timed_out(tensor):
        raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv")
    monkeypatch.setattr(sd.dist, "all_reduce", timed_out)
    with pytest.raises(sd.UserError, match=r"Timed out waiting 3000ms.*process 0's previews and checkpoints: "
                                           r"raise it if those take longer\); run again, with --resume") as e:
        sd.all_reduce_step([torch.nn.Parameter(torch.zeros(2))], torch.zeros(3))
    assert e.value.own


def test_torchrun_variables_left_in_a_plain_runs_environment_are_one_line(tmp_path, monkeypatch):
    """WORLD_SIZE (and RANK) exported, e.g. by a cluster script, then `python sd35_lora.py`: after the dataset
    scan, a ValueError traceback from torch's env:// rendezvous ("MASTER_ADDR expected, but not set"); then
    a one-line error, still after the scan, which decodes every image: now before it."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(sd.UserError, match=r"^WORLD_SIZE is 2 but MASTER_ADDR, MASTER_PORT are not set: start "
                                           r"the processes with torchrun .* or unset WORLD_SIZE") as e:
        sd.check_sources(tiny_config(tmp_path))
    assert e.value.own                          # printed whatever RANK and LOCAL_RANK say


def test_a_plain_run_with_world_size_exported_is_not_called_process_0(tmp_path, monkeypatch):
    """A user who never used torchrun, with WORLD_SIZE exported by a cluster script, read "error: process 0:
    WORLD_SIZE is 2 but ...": there is no process 0 of anything. Processes a launcher started say which they are."""
    make_dataset(tmp_path / "data")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sd, "scan_dataset", lambda *a: pytest.fail("the dataset was scanned first"))
    with pytest.raises(SystemExit) as exit_info:
        sd.main(tiny_sets(tmp_path))
    assert str(exit_info.value.code).startswith("error: WORLD_SIZE is 2 but RANK, MASTER_ADDR, MASTER_PORT are not "
                                                "set: start the processes with torchrun"), exit_info.value.code
    monkeypatch.setenv("MASTER_ADDR", "localhost")          # as torchrun sets it: its process 0 says so
    with pytest.raises(SystemExit) as exit_info:
        sd.main(tiny_sets(tmp_path))
    assert str(exit_info.value.code).startswith("error: process 0: WORLD_SIZE is 2 but RANK, MASTER_PORT")


def test_a_plain_run_with_torchrun_variables_exported_prints_its_errors(tmp_path, monkeypatch):
    """`python sd35_lora.py` with WORLD_SIZE=2 RANK=1 exported (a cluster job, a shell copied from torchrun's)
    took itself for torchrun's process 1: a config error exited 1 without a word, and so did the refusal of
    device cuda:0 ("under torchrun puts every process on one GPU": no torchrun here); auto picked LOCAL_RANK's
    GPU, which a 1-GPU machine lacks. One process says why it stopped: the WORLD_SIZE it must not train with."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sd, "scan_dataset", lambda *a: pytest.fail("the dataset was scanned first"))
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for world, rank, local in (("2", "1", None), ("4", "3", "2")):
        monkeypatch.setenv("WORLD_SIZE", world)
        monkeypatch.setenv("RANK", rank)
        if local:
            monkeypatch.setenv("LOCAL_RANK", local)
        for sets, said in (({"train.lr": -1}, "error: 'train.lr'"), ({"device": "auto"}, "error: WORLD_SIZE is"),
                           ({"device": "cuda:0"}, "error: WORLD_SIZE is")):
            with pytest.raises(SystemExit) as exit_info:
                sd.main(tiny_sets(tmp_path, **sets))
            assert str(exit_info.value.code).startswith(said), (world, rank, local, sets, exit_info.value.code)


def test_lost_contact_keeps_what_gloo_said_past_its_source_file_tag():
    """gloo's messages start with an 80-character '[/__w/pytorch/.../unbound_buffer.cc:78] ' tag: cut at 99
    characters, a 600 s timeout read 'Timed out waiting 6' (the time to raise was lost). Messages as gloo
    2.13's all_reduce gave them, one process killed or stopped."""
    tag = "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/{}] "
    for said, shown in ((tag.format("unbound_buffer.cc:78") + "Timed out waiting 600000ms for recv operation to "
                         "complete", "Timed out waiting 600000ms for recv operation to complete"),
                        (tag.format("pair.cc:553") + "Connection closed by peer [127.0.0.1]:41897. This is "
                         "typically caused by a remote worker crashing. Check the logs of the remote worker before "
                         "reporting an error. GLHF! \N{BEACH WITH UMBRELLA}",
                         "Connection closed by peer [127.0.0.1]:41897. This is typically caused by a remote worker "
                         "crashing"),
                        ("Timed out after 11 seconds waiting for clients. 1/2 clients joined.",     # TCPStore's
                         "Timed out after 11 seconds waiting for clients. 1/2 clients joined."),
                        ("", "")):                          # an error without a word: not an IndexError
        def fail():
            raise RuntimeError(said)
        with pytest.raises(sd.UserError) as e:
            sd.collective(fail)
        assert str(e.value).startswith(f"lost contact with the others ({shown}): one died"), str(e.value)


def test_a_process_that_never_joins_or_reaches_the_cache_barrier_is_lost_contact_not_a_traceback(tmp_path, monkeypatch):
    """Seen with two `torchrun --nnodes 2`, one machine failing before it joined: the other waited out
    train.dist_timeout and ended in a DistStoreError traceback (a hang while the cache builds: a RuntimeError)."""
    make_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path)
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)                                  # what torchrun sets
    def fail(*args, **kwargs):
        raise sd.dist.DistStoreError("wait timeout after 600000ms, keys: /default_pg/0//cpu//0/1")
    for name, call in (("init_process_group", lambda: sd.init_distributed(cfg)),
                       ("barrier", lambda: sd.LatentDataset(sd.scan_dataset(cfg.dataset), sd.tiny_pipeline(t5_length=16),
                                                            cfg, cfg.model))):
        monkeypatch.setattr(sd.dist, name, fail)
        with pytest.raises(sd.UserError, match=r"lost contact with the others \(wait timeout after 600000ms") as e:
            call()
        assert e.value.own


def test_processes_that_never_join_are_named_as_such_not_as_lost_during_training(tmp_path, monkeypatch):
    """`python sd35_lora.py` alone in a job script's shell (WORLD_SIZE=2, MASTER_ADDR, MASTER_PORT, RANK
    exported) waited train.dist_timeout to join, then blamed a process that died or hung, and previews and
    checkpoints: no other process was ever started. Real gloo joins, as process 0 (the store's server) and as
    process 1 (whose server never came)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tiny_config(tmp_path, **{"train.dist_timeout": 1})
    for rank in ("0", "1"):
        job_script = {"WORLD_SIZE": "2", "RANK": rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        for name, value in job_script.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(sd.UserError, match=r"^lost contact with the others \(.*[Tt]imed out.*\): the other processes "
                                               r"never joined within train.dist_timeout: start them all \(torchrun, "
                                               r"srun; one that failed says why\), or unset WORLD_SIZE to train in "
                                               r"one process$") as e:
            sd.init_distributed(cfg)
        assert e.value.own and "\n" not in str(e.value) and not sd.dist.is_initialized()


def test_a_master_port_in_use_is_named_as_such_not_as_lost_contact(tmp_path, monkeypatch):
    """MASTER_PORT taken by another job: process 0's store cannot listen, and the error read 'lost contact with
    the others (The server socket has failed to listen...): one died, or hung ...', which it did not."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        job_script = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        for name, value in job_script.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(sd.UserError, match=rf"failed to listen.*: MASTER_PORT {port} is in use: pick another "
                                               r"\(torchrun: --master-port\)$") as e:
            sd.init_distributed(tiny_config(tmp_path, **{"train.dist_timeout": 1}))
    assert e.value.own and not str(e.value).startswith("lost contact") and not sd.dist.is_initialized()


def test_torchrun_dead_process_ends_the_job_in_bounded_time(tmp_path):
    make_dataset(tmp_path / "data")
    # 15 s: process 0's collective must time out before torchrun SIGKILLs it, 30 s after its SIGTERM (at 30 s
    # both fired at once and the message was sometimes lost)
    job = torchrun(*train_cli(tmp_path, **LONG_RUN, **{"train.dist_timeout": 15}), wait=False)
    wait_for_steps(tmp_path / "run", 2, job)
    workers = Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split()
    rank1 = next(pid for pid in workers if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    start = time.time()
    os.kill(int(rank1), signal.SIGKILL)
    out, err = job.communicate(timeout=120)
    assert job.returncode != 0 and time.time() - start < 60
    assert "error: process 0: lost contact with the others" in err, err[-3000:]


if __name__ == "__main__":      # torchrun test_sd35.py PLAN.json: a test's training runs, in every process
    for overrides, resume in json.loads(Path(sys.argv[1]).read_text()):
        cfg = sd.load_config(None, overrides)
        lora = sd.train(cfg, resume)            # in every process: once process 0 has written the last files
        previews = list(lora.parent.glob(f"samples_step_{cfg.train.steps:06d}/*.png"))
        assert lora.is_file() and len(previews) == len(cfg.sample.prompts), "train() returned before they were"


def test_file_layout_rules_of_the_reference():
    """Issue 13's shape rules (.ci/check_layout.py): the method first, plumbing after the banner, short functions."""
    sys.path.insert(0, str(ROOT / ".ci"))
    import check_layout
    m = check_layout.measure((ROOT / "sd35_lora.py").read_text(), (ROOT / "sample.py").read_text())
    assert m["banner_line"] is not None and m["banner_line"] <= 1500, m["banner_line"]
    assert not m["functions_over_limit"] and not m["one_liners"] and not m["unused_here"], m
    assert m["long_lines"] <= 0.01 * m["lines"], m["long_lines"]
    import re
    lines = (ROOT / "sd35_lora.py").read_text().splitlines()      # the docstring's map points at the banners
    rows = re.findall(r"^ +(\d+)  (\S.*?) {2,}", sd.__doc__, re.M)
    assert len(rows) >= 15 and all(lines[int(n) - 1].startswith("#####") and title in lines[int(n)]
                                   for n, title in rows), rows


def fp8_build_spy(monkeypatch) -> list[str]:
    """sd._build, checking that every joint-block matrix reaches it in fp8 -> the list of those seen."""
    real_build, seen = sd._build, []

    def build(cls, cfg, weights, *args):
        seen.extend(k for k, v in weights.items() if k.startswith("joint_blocks.") and v.ndim == 2)
        assert all(weights[k].dtype == sd.FP8 for k in seen), "a joint-block matrix reached _build unquantized"
        return real_build(cls, cfg, weights, *args)
    monkeypatch.setattr(sd, "_build", build)
    return seen


def test_fp8_quantizes_a_bf16_or_fp16_file_while_reading(tmp_path, monkeypatch):
    """Releases are bf16/fp16 (2 bytes a weight): their joint-block matrices too reach _build already in fp8,
    never the whole model in 16 bits first."""
    seen = fp8_build_spy(monkeypatch)
    for dtype in (torch.bfloat16, torch.float16):
        seen.clear()
        save_file({k: v.to(dtype) for k, v in tiny_mmdit().state_dict().items()}, tmp_path / "m.safetensors")
        fp8 = sd.load_mmdit(tmp_path / "m.safetensors", dtype=dtype, fp8=True)
        assert seen and isinstance(fp8.joint_blocks[0].x_block.attn.qkv, sd.Fp8Linear)


@pytest.mark.parametrize("layout", ["single file", "diffusers folder"])
def test_fp8_weights_are_quantized_while_reading(tmp_path, monkeypatch, layout):
    """The host never holds the full-precision joint-block matrices: they arrive at _build already in fp8."""
    model, path = tiny_mmdit(), tmp_path / "m.safetensors"
    if layout == "single file":
        save_file({f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}, path)
    else:                                          # per-row scales of to_q/k/v and swapped halves follow their rows
        path = tmp_path / "transformer"
        path.mkdir()
        save_file(mmdit_to_diffusers(model.state_dict(), 3), path / "diffusion_pytorch_model.safetensors")
        (path / "config.json").write_text(json.dumps({"num_layers": 3, "num_attention_heads": 4}))
    seen = fp8_build_spy(monkeypatch)
    fp8 = sd.load_mmdit(path, fp8=True)
    monkeypatch.undo()                                                          # the real _build
    after = sd.quantize_mmdit(sd.load_mmdit(path))                              # quantized after loading
    bits = lambda t: t.view(torch.uint8) if t.dtype == sd.FP8 else t     # torch 2.5 has no torch.equal for fp8
    assert seen and all(torch.equal(bits(a), bits(b)) for a, b in zip(fp8.state_dict().values(), after.state_dict().values()))
    x = mmdit_inputs()
    with torch.no_grad():
        torch.testing.assert_close(fp8(*x), after(*x), rtol=0, atol=0)


def test_a_new_file_a_virus_scanner_holds_a_moment_on_windows_is_saved_on_a_second_try(tmp_path, monkeypatch):
    """Windows: a virus scanner or indexer opens a freshly written file for a moment, and renaming it over the
    target fails once (PermissionError): a preview or checkpoint ended the run with 'close what holds it open'.
    Simulated: os.replace fails once, sys.platform says win32. A file held for good still fails, after ~1 s."""
    real_replace, tries, waits = os.replace, [], []

    def scanned_once(src, dst):
        tries.append(dst)
        if len(tries) == 1 or Path(dst).name == "held.txt":
            raise PermissionError(13, "Access is denied", str(dst))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", scanned_once)
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(time, "sleep", waits.append)
    sd._atomic_save({"a": torch.zeros(2)}, tmp_path / "lora.safetensors")
    assert len(tries) == 2 and sd.load_file(tmp_path / "lora.safetensors")["a"].shape == (2,)
    one_line_error(lambda: sd._atomic_save("text", tmp_path / "held.txt"),
                   r"cannot write .*held.txt \(Access is denied\): close what holds it open")
    assert 0.5 <= sum(waits) <= 1.5 and sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


def test_a_full_disk_reported_by_safetensors_is_a_one_line_error(tmp_path, monkeypatch):
    from safetensors import SafetensorError                  # not an OSError: save_file's own error type

    def full_disk(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(sd, "save_file", full_disk)
    one_line_error(lambda: sd._atomic_save({"x": torch.zeros(1)}, tmp_path / "a.safetensors"),
                   r"cannot write .*a\.safetensors .*No space left on device")
    assert not list(tmp_path.iterdir())


def test_a_tensor_file_refused_by_the_os_for_another_reason_than_space_is_no_full_disk(tmp_path, monkeypatch):
    """safetensors wraps every OS error in its SafetensorError: a LoRA, cache or training-state file with a name
    too long, on a read-only disk or in a folder not writable was answered 'free disk space'."""
    from safetensors import SafetensorError
    long_name = tmp_path / ("a" * 250 + ".safetensors")                # the OS refuses it: no mock
    one_line_error(lambda: sd._atomic_save({"x": torch.zeros(1)}, long_name), r"\(os error 36\)\): choose another")
    for code, why, fix in [(13, "Permission denied", "make its folder writable or choose"),
                           (30, "Read-only file system", "choose another"), (28, "No space left", "free disk space")]:
        def refuse(tensors, filename, metadata=None):
            raise SafetensorError(f"Error while serializing: I/O error: {why} (os error {code}) at path \"x\"")
        monkeypatch.setattr(sd, "save_file", refuse)
        one_line_error(lambda: sd._atomic_save({"x": torch.zeros(1)}, tmp_path / "a.safetensors"),
                       rf"{why} \(os error {code}\) at path \"x\"\): {fix}")
    assert not list(tmp_path.iterdir())


def test_a_full_disk_while_downloading_is_named_not_called_offline(monkeypatch):
    """A disk quota used up (a shared cluster's home) was called offline or gated, as a full disk once was."""
    import huggingface_hub
    for error in (OSError(28, "No space left on device"),                                  # plain http download
                  OSError(errno.EDQUOT, "Disk quota exceeded"),
                  RuntimeError("Data processing error: I/O error: No space left on device (os error 28)")):  # hf_xet

        def full_disk(*args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(huggingface_hub, "snapshot_download", full_disk)
        one_line_error(lambda: sd.resolve_model("stabilityai/stable-diffusion-3.5-medium", ("vae",)),
                       "downloading stabilityai/stable-diffusion-3.5-medium ran out of disk space: .*HF_HOME")


def test_a_failed_download_of_text_encoders_or_a_vae_names_their_own_option(monkeypatch, tmp_path):
    """A hub id given as --text-encoders or --vae that could not be downloaded (offline) advised "then --model
    DIR (config: model: DIR)", the option the user had not given."""
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("offline")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    for key, flag in (("text_encoders", "--text-encoders"), ("vae", "--vae")):
        one_line_error(lambda: sd.load_pipeline(str(tmp_path), device="cpu", **{key: "org/repo"}),
                       rf"could not download org/repo .*--local-dir DIR` .*, then {flag} DIR \(config: {key}: DIR\);")


def test_hub_downloads_skip_the_fp16_copies_of_the_text_encoders(monkeypatch, tmp_path):
    """SD3.5's diffusers repos hold each text encoder twice, as model*.safetensors and as the fp16 variant
    model.fp16*.safetensors (about 11 GB more), and only the first is read: the second is not downloaded."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects
    repo = ["model_index.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
            "text_encoder_3/model-00001-of-00002.safetensors", "text_encoder_3/model.safetensors.index.json",
            "text_encoder_3/model.fp16-00001-of-00002.safetensors", "text_encoder_3/model.safetensors.index.fp16.json",
            "vae/diffusion_pytorch_model.safetensors", "transformer/diffusion_pytorch_model.bin"]
    got = []

    def snapshot_download(name, allow_patterns=None, ignore_patterns=None, local_files_only=False):
        got.extend(filter_repo_objects(repo, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    sd.resolve_model("stabilityai/stable-diffusion-3.5-medium", ("text_encoder", "text_encoder_3", "vae"))
    assert got == ["model_index.json", "text_encoder/model.safetensors", "text_encoder_3/model-00001-of-00002.safetensors",
                   "text_encoder_3/model.safetensors.index.json", "vae/diffusion_pytorch_model.safetensors"]


def test_pickle_files_are_never_downloaded_and_a_missing_one_is_not_found(monkeypatch, tmp_path):
    """The pickle suffixes were listed three times, and not alike: a repo's .pth and .pkl files were downloaded
    (never read), and a missing `runs/model.pth` was taken for a hub id ("could not download ... offline?"). The
    hub's patterns are case-sensitive (fnmatchcase): a model.PTH or x.Bin was downloaded too."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects
    repo = ["model_index.json", "vae/diffusion_pytorch_model.safetensors", "vae/model.pth", "vae/x.pkl", "vae/model.PTH",
            "vae/x.Bin", "vae/y.CKPT"]
    got = []

    def snapshot_download(name, allow_patterns=None, ignore_patterns=None, local_files_only=False):
        got.append(name)
        got.extend(filter_repo_objects(repo, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    sd.resolve_model("stabilityai/stable-diffusion-3.5-medium", ("vae",))
    assert got == ["stabilityai/stable-diffusion-3.5-medium", "model_index.json", "vae/diffusion_pytorch_model.safetensors"]
    for missing in ("runs/model.pth", "runs/model.pkl", "runs/MODEL.CKPT"):
        one_line_error(lambda: sd.resolve_model(missing, ("vae",)), rf"model not found: '{missing}'")
    assert len(got) == 3


def test_text_encoder_files_without_tokenizer_folders_get_sd3s_standard_tokenizers(monkeypatch, tmp_path):
    """Single files carry no vocabularies: CLIP-L's and T5's standard tokenizers are downloaded (their text
    files only), and CLIP-G's is CLIP-L's padding with "!" (id 0), as SD3's tokenizer_2 pads: with CLIP-L's EOS
    padding its padded positions, and so every prompt's CLIP-G features, would differ from the references'."""
    import huggingface_hub
    tok_l, _, tok_t5 = make_tokenizers()
    tok_l.save_pretrained(tmp_path / "clip")
    tok_t5.save_pretrained(tmp_path / "t5")
    asked = []

    def snapshot_download(repo, allow_patterns=None):
        asked.append(repo)
        assert not any(p.endswith((".safetensors", ".bin")) for p in allow_patterns)       # no weights
        return str(tmp_path / {"openai/clip-vit-large-patch14": "clip", "google-t5/t5-base": "t5"}[repo])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    clip_l, clip_g, t5 = sd._tokenizers(tmp_path / "single_files", use_t5=True)
    assert asked == ["openai/clip-vit-large-patch14", "google-t5/t5-base"]
    assert (clip_l.pad_token, clip_g.pad_token, clip_g.pad_token_id, t5.pad_token) == (tok_l.eos_token, "!", 0, "<pad>")
    assert sd._tokenizers(tmp_path / "single_files", use_t5=False)[2] is None


def test_a_folder_given_as_a_file_names_the_file_to_give(tmp_path):
    """`--lora runs/my_run` (the training run's folder) said 'file not found', though the folder exists."""
    save_file({"x": torch.zeros(1)}, tmp_path / "training_state.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "lora.safetensors")
    one_line_error(lambda: sd.read_safetensors(tmp_path), "is a folder: give a .safetensors file in it, e.g. lora.")
    one_line_error(lambda: sd.read_safetensors(tmp_path / "missing.safetensors"), "file not found")


def test_weights_that_are_broken_links_are_named_as_such_not_as_missing(tmp_path):
    """A Hugging Face cache snapshot copied without its blobs/ holds links to nothing: load_mmdit said 'no
    diffusion_pytorch_model.safetensors in transformer (has ['diffusion_pytorch_model.safetensors'])', and the
    text encoders 'clip_l.safetensors has no clip_l'."""
    for folder in ("transformer", "encoders"):
        (tmp_path / folder).mkdir()
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").symlink_to("../../blobs/0a1b")
    one_line_error(lambda: sd.load_mmdit(tmp_path / "transformer"), "diffusion_pytorch_model.safetensors is a "
                   "link to a missing file .*blobs/0a1b.*cp -L")
    (tmp_path / "encoders" / "clip_l.safetensors").symlink_to("../../blobs/2c3d")
    one_line_error(lambda: sd.load_text_encoders(tmp_path / "encoders"), "clip_l.safetensors is a link to a missing")


def test_a_renamed_pickle_or_a_saved_web_page_is_not_called_a_truncated_download(tmp_path):
    """Renaming model.ckpt to .safetensors converts nothing; a failed download may save a login page: neither
    is fixed by downloading the same thing again. Pickles are refused by their name in any case, never read."""
    torch.save({"w": torch.zeros(2)}, tmp_path / "renamed.safetensors")
    (tmp_path / "page.safetensors").write_text("<!DOCTYPE html><html>Access to model is restricted</html>")
    torch.save({"w": torch.zeros(2)}, tmp_path / "MODEL.CKPT")
    for name, match in (("renamed.safetensors", "is no .safetensors file: a renamed .ckpt/.pt .* web page"),
                        ("page.safetensors", "is no .safetensors file"), ("MODEL.CKPT", "pickle files can run code")):
        one_line_error(lambda: sd.load_lora(tiny_mmdit(), tmp_path / name), match)
        one_line_error(lambda: sd.load_mmdit(tmp_path / name), match)


def test_a_git_lfs_pointer_cloned_without_git_lfs_is_named_as_such(tmp_path):
    """`git clone` of a hub repo without git-lfs leaves ~130-byte pointer files under the weights' names: they
    were called 'a renamed .ckpt/.pt or a web page saved by a failed download'."""
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer/diffusion_pytorch_model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "ab" * 32 + "\nsize 4939212345\n")
    one_line_error(lambda: sd.load_mmdit(tmp_path), "is a git-lfs pointer.*git lfs pull")


#################################################################################
#                   Windows and macOS, simulated on Linux                       #
#################################################################################

def test_a_path_or_prompt_the_console_cannot_encode_is_printed_escaped_not_a_crash(tmp_path):
    """Windows writes stdout in its code page (cp1252) when it goes to a file or a pipe: a folder named in
    Cyrillic (a user name) ended sample.py with a UnicodeEncodeError after its images were made, and training at
    its 'dataset:' line. Simulated with PYTHONIOENCODING=cp1252."""
    home = tmp_path / "Тимур"
    make_dataset(home / "data")
    out = run_cli("sample.py", "--model", "tiny", "--prompt", "a 🦊", "--width", "32", "--height", "32", "--steps",
                  "2", "--out", str(home / "samples"), PYTHONIOENCODING="cp1252")
    assert out.returncode == 0 and (home / "samples" / "sample_00.png").is_file(), out.stderr
    assert "\\u0422\\u0438\\u043c\\u0443\\u0440" in out.stdout
    run = run_cli(*train_cli(home, **{"train.steps": 1}), PYTHONIOENCODING="cp1252")
    assert run.returncode == 0 and "done: " in run.stdout and (home / "run" / "lora.safetensors").is_file(), run.stderr


def windows_locks(monkeypatch) -> list:
    """Windows simulated: no fcntl, and a stand-in msvcrt whose byte lock refuses a second holder with EACCES, as
    Windows' _locking does. -> the file descriptors holding a lock (a lock closed still held stays, as Windows
    may keep it for a while)."""
    held = []

    def locking(fd: int, mode: int, nbytes: int):
        assert mode in (fake.LK_NBLCK, fake.LK_UNLCK) and nbytes == 1
        if mode == fake.LK_UNLCK:
            held.remove(fd)
        elif held:
            raise PermissionError(13, "Permission denied")
        else:
            held.append(fd)
    fake = types.SimpleNamespace(LK_NBLCK=2, LK_UNLCK=0, locking=locking)
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setitem(sys.modules, "fcntl", None)
    monkeypatch.setitem(sys.modules, "msvcrt", fake)
    return held


def test_output_dir_is_locked_on_windows_too(tmp_path, monkeypatch):
    """Windows has no fcntl: lock_output_dir returned None there, so two runs (or a --resume of a live run) in one
    output_dir wrote over each other's files. There msvcrt's byte lock is taken (simulated: a stand-in msvcrt that
    refuses a second holder with EACCES, as Windows' _locking does). end_training closed it still locked, which
    Windows frees only "after a delay": a notebook's run after a failed one could be refused; now it unlocks it.
    A failed run's own output_dir, left with its lock file alone, is removed: the file closed first (Windows
    unlinks no open file; the stand-in unlink refuses it too)."""
    held = windows_locks(monkeypatch)
    first = sd.lock_output_dir(tmp_path)
    assert first is not None and held == [first.fileno()]
    one_line_error(lambda: sd.lock_output_dir(tmp_path), r"another run is using output_dir .*: wait for it")
    sd.end_training(types.SimpleNamespace(lock=first, out=tmp_path, made=[]), {})
    assert first.closed and held == []          # (a lock closed still held: the stand-in keeps it, as Windows may)
    sd.lock_output_dir(tmp_path).close()
    made = tmp_path / "made"                    # a failed run's own output_dir: removed, its lock file closed first
    made.mkdir()
    held.clear()                                # (the lock just closed locked: the stand-in keeps it)
    lock, real_unlink = sd.lock_output_dir(made), Path.unlink

    def unlink(path: Path, missing_ok: bool = False):
        if path.name == sd.LOCK_FILE and not lock.closed:           # Windows unlinks no open file
            raise PermissionError(13, "The process cannot access the file")
        real_unlink(path, missing_ok)
    monkeypatch.setattr(Path, "unlink", unlink)
    sd.end_training(types.SimpleNamespace(lock=lock, out=made, made=[made]), {})
    assert lock.closed and not made.exists()


@pytest.mark.parametrize("windows", [False, True])
def test_a_lock_file_that_cannot_be_opened_is_not_called_another_run(tmp_path, monkeypatch, windows):
    """A group-shared output_dir whose lock file another user owns (or a read-only lock file): open() refuses it
    with EACCES, and the run was told "another run is using output_dir: wait for it to end", which no waiting
    ends. Only the lock call's refusal means another run. (Simulated: this machine's root opens any file.)"""
    held = windows_locks(monkeypatch) if windows else []
    (tmp_path / sd.LOCK_FILE).touch()

    def refused(file, *a, **k):
        if Path(file).name == sd.LOCK_FILE:
            raise PermissionError(13, "Permission denied", str(file))
        return open(file, *a, **k)
    monkeypatch.setattr(sd, "open", refused, raising=False)
    one_line_error(lambda: sd.lock_output_dir(tmp_path),
                   r"^the lock file .*\.sd35_lora\.lock cannot be opened \(Permission denied\): .*owner.*choose "
                   r"another output_dir")
    assert held == []


def test_a_fresh_run_refused_on_windows_unlocks_the_lock_it_tried(tmp_path, monkeypatch):
    """A fresh run refused in an earlier run's output_dir tries that run's lock first (a live run's: "in use",
    not "--resume"); it closed it still locked, which Windows frees only "after a delay": the run started
    again at once, the folder emptied as told, could be refused as "another run is using output_dir"."""
    held = windows_locks(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (out / sd.LOCK_FILE).touch()                                # a killed run's: no process holds it
    one_line_error(lambda: sd.train(tiny_config(tmp_path)), "earlier run; it saved no checkpoint: empty it")
    assert held == []       # (a lock closed still held: the stand-in keeps it, as Windows may for a while)
    sd.lock_output_dir(out).close()


def test_a_lora_file_held_open_by_another_program_does_not_end_the_run(tmp_path, monkeypatch, capsys):
    """Windows refuses to replace a file another program holds open (ComfyUI maps a LoRA it loaded, a viewer a
    PNG): PermissionError. lora.safetensors, the latest's copy, held so ended the run at its next checkpoint, with
    the advice to free disk space. Now a warning names lora_step_*, and any other file's error says what to do."""
    make_dataset(tmp_path / "data")
    real_replace = os.replace

    def held_open(src, dst):
        if Path(dst).name in ("lora.safetensors", "held.png"):
            raise PermissionError(13, "Permission denied", str(dst))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", held_open)
    sd.train(tiny_config(tmp_path, **{"train.steps": 2, "train.save_every": 1, "sample.sample_every": 0}))
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("*.safetensors")) == [
        "lora_step_000001.safetensors", "lora_step_000002.safetensors", sd.STATE_FILE]
    assert "(Permission denied): close what holds it open (a viewer, ComfyUI) or choose another folder; older " \
           "files are intact; lora_step_000002.safetensors is the latest" in capsys.readouterr().err
    one_line_error(lambda: sd._atomic_save(Image.new("RGB", (8, 8)), tmp_path / "held.png"),
                   r"cannot write .*held.png \(Permission denied\): close what holds it open")


def test_train_keep_last_deletes_all_but_the_newest_checkpoints_and_no_other_file(tmp_path, monkeypatch, capsys):
    """A lora_step_XXXXXX.safetensors was kept for every save_every step: a Large run of 100k steps at 250 kept 400
    (~38 GB). train.keep_last N deletes all but the newest N after each save (0, the default, keeps all): only names
    the run writes (a user's look-alikes stay), none past the saved step (a killed run's, from a later step, is not
    one of the newest N), one held open (Windows) warned about while the run goes on; --resume may change it."""
    make_dataset(tmp_path / "data")
    sets = {"train.steps": 3, "train.save_every": 1, "sample.sample_every": 0, "sample.prompts": []}
    sd.train(tiny_config(tmp_path, **sets))
    run = tmp_path / "run"
    checkpoints = lambda: sorted(p.name for p in run.iterdir() if "lora_step" in p.name.lower())
    assert checkpoints() == [f"lora_step_00000{step}.safetensors" for step in (1, 2, 3)]           # 0: all kept
    mine = ["lora_step_best.safetensors", "lora_step_1.safetensors", "lora_step_0000001.safetensors",
            "lora_step_000001.safetensors.bak", "lora_step_000001 (copy).safetensors",
            "lora_step_000001.SAFETENSORS", "my_lora_step_000001.safetensors",
            "lora_step_\u0660\u0660\u0660\u0660\u0660\u0661.safetensors"]      # Arabic-Indic digits: int() reads them
    for name in mine + ["lora_step_000009.safetensors"]:
        (run / name).write_bytes(b"not this run's")
    held_open = PermissionError(13, "Permission denied", str(run / "lora_step_000002.safetensors"))
    failing_for(monkeypatch, "unlink", "lora_step_000002.safetensors", held_open)
    capsys.readouterr()
    sd.train(tiny_config(tmp_path, **{**sets, "train.steps": 5, "train.keep_last": 2}), resume=True)
    assert checkpoints() == sorted(mine + [f"lora_step_00000{step}.safetensors" for step in (2, 4, 5, 9)])
    assert all((run / name).read_bytes() == b"not this run's" for name in mine)
    assert capsys.readouterr().err.count("warning: old checkpoint kept ([Errno 13] Permission denied: '"
                                         f"{run / 'lora_step_000002.safetensors'}'); a later save deletes it") == 2
    sd.train(tiny_config(tmp_path, **{**sets, "train.steps": 6, "train.keep_last": 1}), resume=True)   # after deletes
    assert checkpoints() == sorted(mine + [f"lora_step_00000{step}.safetensors" for step in (2, 6, 9)])
    one_line_error(lambda: sd.load_config(None, ["train.keep_last=-1"]), "'train.keep_last' must be at least 0, got -1")


def test_train_keep_last_counts_and_deletes_only_files_not_folders_of_a_checkpoints_name(tmp_path, capsys):
    """A folder named lora_step_000003.safetensors took one of keep_last's places (keep_last 2 kept one checkpoint),
    and one named for an older step was 'kept' with a warning at every save that a later save deletes it."""
    for step in (1, 2, 4):
        (tmp_path / f"lora_step_00000{step}.safetensors").write_bytes(b"lora")
    for step in (0, 3):
        (tmp_path / f"lora_step_00000{step}.safetensors").mkdir()
    sd.remove_old_checkpoints(tmp_path, 4, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"lora_step_00000{step}.safetensors" for step in (0, 2, 3, 4)]
    assert capsys.readouterr().err == ""


def test_keep_last_orders_checkpoints_by_step_past_a_million_and_goes_on_past_any_file_it_cannot_delete(
        tmp_path, monkeypatch, capsys):
    """train.keep_last's deletions by step number, whatever the listing's order: from step 1,000,000 the names have 7
    digits (f"{step:06d}"); 5 digits, 7 with a leading zero, or more around the name are no name a run writes (a
    user's: kept, and no step of the run's own). A file it cannot delete (any OSError, here EBUSY, not only a
    file held open on Windows) is warned about, and the rest still deleted."""
    mine = ["lora_step_01000.safetensors", "lora_step_0999998.safetensors", "lora_step_999997.safetensors.bak",
            "old_lora_step_999996.safetensors"]        # (no step 999,997 or 999,996 to take their places)
    for reverse in (False, True):
        out = tmp_path / str(reverse)
        out.mkdir()
        for step in (999_999, 1_000_000, 1_000_001, 2_000_000):       # 2,000,000: a killed run's, past this step
            (out / f"lora_step_{step:06d}.safetensors").write_bytes(b"")
        (out / "lora_step_000005.safetensors").write_bytes(b"")
        for name in mine:
            (out / name).write_bytes(b"")
        listed = sorted(os.listdir(out), reverse=reverse)
        with monkeypatch.context() as patched:
            patched.setattr(sd.os, "listdir", lambda path: listed)
            failing_for(patched, "unlink", "lora_step_000005.safetensors", OSError(errno.EBUSY, "Busy"))
            sd.remove_old_checkpoints(out, 1_000_001, 2)
        assert sorted(os.listdir(out)) == sorted(mine + [f"lora_step_{step:06d}.safetensors"
                                                         for step in (5, 1_000_000, 1_000_001, 2_000_000)])
        assert capsys.readouterr().err.count("warning: old checkpoint kept") == 1


def test_a_run_stopped_by_a_lost_stdout_deletes_old_checkpoints_as_one_stopped_by_ctrl_c_does(tmp_path, monkeypatch):
    """`... | head`: the "saved" line after a checkpoint raised BrokenPipeError before keep_last's deletions, so a
    run stopped so kept every checkpoint since the last report; its stop's own checkpoint failed the same way."""
    make_dataset(tmp_path / "data")
    real, saved = sd.tqdm.write, []

    def lost_stdout(text, file=None, **kwargs):
        if file is None and text.startswith("saved") and len(saved.append(text) or saved) >= 3:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        return real(text, file=file, **kwargs)
    monkeypatch.setattr(sd.tqdm, "write", lost_stdout)
    sets = {"train.steps": 5, "train.save_every": 1, "train.keep_last": 2, "sample.sample_every": 0,
            "sample.prompts": []}
    with pytest.raises(BrokenPipeError):
        sd.train(tiny_config(tmp_path, **sets))
    assert sorted(p.name for p in (tmp_path / "run").glob("lora_step_*")) == [
        "lora_step_000002.safetensors", "lora_step_000003.safetensors"]


def test_a_folder_refusing_a_write_is_not_blamed_on_a_program_holding_the_file(tmp_path, monkeypatch):
    """A PermissionError met writing the temporary file (a shared cache_dir's latents/ made by another user, a
    folder made read-only mid-run: Linux, no program holds anything) was answered 'close what holds it open (a
    viewer, ComfyUI)'. Only replacing the file itself can meet a program holding it (Windows)."""
    def refused(*args, **kwargs):                            # chmod cannot stop root: simulate the refusal
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(sd, "save_file", refused)
    one_line_error(lambda: sd._atomic_save({"x": torch.zeros(1)}, tmp_path / "a.safetensors"),
                   r"cannot write .*a.safetensors \(Permission denied\): make its folder writable or choose another "
                   r"folder; older files are intact$")

def test_a_lora_alpha_whose_files_would_not_load_is_refused_before_any_model_loads():
    """lora.alpha 1e300 ended the first step in a bare RuntimeError (alpha / rank overflows float32), 1e39 in a
    diverged run blamed on train.lr, and from 1e9 on the run saved LoRA files whose alpha load_lora (and with it
    sample.py) refuses: 'metadata alpha = 2000000000.0 is not in -1000000000.0..1000000000.0'."""
    for alpha in ("-2e9", "2e9", "1e39", "1e300"):
        one_line_error(lambda: sd.load_config(None, [f"lora.alpha={alpha}"]),
                       re.escape(f"lora.alpha {float(alpha):g} is outside") + r".* more than 1e\+09 either way")
    assert sd.load_config(None, ["lora.alpha=-1e9"]).lora.alpha == -1e9


def test_more_preview_prompts_than_a_sample_step_can_make_is_a_one_line_error():
    """100,000 sample.prompts were encoded as one batch when training began (gigabytes per thousand prompts with
    T5-XXL, kept all run) and would each have been sampled at every sample step, as sample_100000.png."""
    prompts = lambda n: "sample.prompts=[" + ", ".join(["a cat"] * n) + "]"
    assert len(sd.load_config(None, [prompts(100)]).sample.prompts) == 100            # sample_00 .. sample_99
    for n in (101, 100_000):
        one_line_error(lambda: sd.load_config(None, [prompts(n)]), f"sample.prompts lists {n} prompts: .*at most 100")


def test_windows_paths_in_yaml_double_quotes_are_named_as_such(tmp_path):
    """"C:\\Users\\me\\..." in YAML's double quotes (Explorer's "Copy as path" adds them) was refused as 'while
    scanning a double-quoted scalar', without a word of why; "D:\\runs\\new" read silently as D:, a carriage return,
    'uns', a line break and 'ew': a folder of that name was made."""
    config = tmp_path / "config.yaml"
    config.write_text('model: tiny\noutput_dir: "C:\\Users\\me\\runs"\n')
    one_line_error(lambda: sd.load_config(str(config)), r"config.yaml as UTF-8 YAML: line 2: expected escape "
                   r"sequence .*; in YAML's double quotes a backslash starts an escape .* use 'single quotes' or /")
    config.write_text('model: tiny\noutput_dir: "D:\\runs\\new"\n')
    one_line_error(lambda: sd.load_config(str(config)), r"config key 'output_dir' holds a control character, "
                   r"'D:\\runs\\new': in YAML's double quotes")
    config.write_text("model: tiny\noutput_dir: 'D:\\runs\\new'\ndataset:\n  path: C:\\data\\train\n")
    cfg = sd.load_config(str(config), ["vae=C:/models/vae.safetensors"])
    assert (cfg.output_dir, cfg.dataset.path, cfg.vae) == ("D:\\runs\\new", "C:\\data\\train", "C:/models/vae.safetensors")


def test_a_windows_path_in_double_quotes_given_with_set_gets_the_same_advice():
    """`--set dataset.path="C:\\Users\\me"` (PowerShell passes the quotes on) was refused as 'not valid YAML (quote
    a list like '[a, b]' as a whole)': advice for another mistake."""
    one_line_error(lambda: sd.load_config(None, ['dataset.path="C:\\Users\\me"']),
                   r"^--set dataset.path=.*: not valid YAML: in YAML's double quotes a backslash starts an escape "
                   r".* use 'single quotes' or /$")
    one_line_error(lambda: sd.load_config(None, ["sample.prompts=[a, b"]),
                   r"not valid YAML \(quote a list like '\[a, b\]' as a whole\)$")


def test_a_yaml_syntax_error_names_its_line_and_problem(tmp_path):
    """A key indented one space too few, a tab, an unclosed quote: the error was only YAML's first line, e.g.
    'while parsing a block mapping', with neither the line nor what was wrong there."""
    config = tmp_path / "config.yaml"
    for text, match in [("model: tiny\ntrain:\n  steps: 3\n lr: 1\n", r"line 4: expected <block end>, but found"),
                        ("model: tiny\n\tdataset: x\n", r"line 2: found character '\\t' that cannot start any token"),
                        ('model: "tiny\n', r"line 2: found unexpected end of stream")]:
        config.write_text(text)
        one_line_error(lambda: sd.load_config(str(config)), rf"config.yaml as UTF-8 YAML: {match}")


def test_windows_paths_whose_escapes_make_line_separators_are_refused_too(tmp_path):
    """YAML's double quotes read \\N, \\L and \\P as NEL (U+0085) and the line and paragraph separators (U+2028,
    U+2029): "D:\\Projects\\Lora" (or a German "D:\\Neuer Ordner") read silently as D:, U+2029, 'rojects', U+2028,
    'ora', and a folder of that name was made; only the ASCII control characters (\\r, \\n) were refused. \\_ is a
    no-break space (U+00A0): "D:\\_data", a folder sorted first, read as D:, U+00A0, 'data'."""
    config = tmp_path / "config.yaml"
    for path, read in [("D:\\Projects\\Lora", "'D:\\\\u2029rojects\\\\u2028ora'"),
                       ("D:\\Neuer Ordner", "'D:\\\\x85euer Ordner'"), ("D:\\_data", "'D:\\\\xa0data'")]:
        config.write_text(f'model: tiny\noutput_dir: "{path}"\n')
        one_line_error(lambda: sd.load_config(str(config)), f"config key 'output_dir' holds a control character, "
                       f"{read}: in YAML's double quotes a backslash starts an escape")


def test_compiling_fp8_weights_on_an_nvidia_card_before_ada_is_one_line_before_any_model_loads(tmp_path,
                                                                                              monkeypatch):
    """Triton has no float8_e4m3fn below compute capability 8.9 (pytorch/pytorch#167082: "type fp8e4nv not
    supported in this architecture"), so fp8 with train.compile or sample.py --compile on an A100, RTX 3090 or T4
    would fail in the first step's inductor, after loading and caching. Simulated: a CUDA device of each
    capability, Triton present; AMD (ROCm) and fp8 without compile are let through."""
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else real_find_spec(name, *a))
    capability = [(8, 6)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability[0])
    cuda = torch.device("cuda")
    message = r"^compiled fp8 weights need an NVIDIA GPU of compute capability 8.9 or newer .*, or set fp8 false \(sample.py: leave out --fp8\)$"
    with pytest.raises(sd.UserError, match=message):
        sd.check_compile(cuda, fp8=True)
    sd.check_compile(cuda, fp8=False)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    sd.check_compile(cuda, fp8=True)
    monkeypatch.setattr(torch.version, "hip", None)
    capability[0] = (8, 9)
    sd.check_compile(cuda, fp8=True)
    capability[0] = (7, 5)
    monkeypatch.setattr(sd, "pick_device", lambda *args: cuda)
    monkeypatch.setattr(sd, "load_pipeline", lambda *a, **k: pytest.fail("a model loaded before the check"))
    make_dataset(tmp_path / "data")
    one_line_error(lambda: sd.train(tiny_config(tmp_path, **{"train.compile": True, "fp8": True})), message)
    one_line_error(lambda: sample.main(["--model", "tiny", "--prompt", "x", "--compile", "--fp8", "--out",
                                        str(tmp_path / "s")]), message)


def test_compile_without_triton_is_one_line_before_any_model_loads(tmp_path, monkeypatch):
    """torch.compile on a GPU needs Triton, which PyTorch's Windows wheels do not bring: train.compile (and
    sample.py --compile) failed at the first step, after the loading and caching, with the inductor's long
    traceback. Simulated: a CUDA device and no triton module."""
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    monkeypatch.setattr(sd, "pick_device", lambda *args: torch.device("cuda"))
    monkeypatch.setattr(sd, "load_pipeline", lambda *a, **k: pytest.fail("a model loaded before the check"))
    make_dataset(tmp_path / "data")
    one_line_error(lambda: sd.train(tiny_config(tmp_path, **{"train.compile": True})),
                   r"compile needs Triton, which this torch lacks \(Windows: pip install triton-windows\)")
    one_line_error(lambda: sample.main(["--model", "tiny", "--prompt", "x", "--compile", "--out", str(tmp_path / "s")]),
                   "compile needs Triton")


def test_an_empty_safetensors_file_is_said_to_hold_no_tensors(tmp_path):
    """A .safetensors file with a valid header and no tensors, given as a LoRA or as the model, was refused
    with 'its first keys are []'."""
    empty = tmp_path / "empty.safetensors"
    save_file({}, empty)
    one_line_error(lambda: sd.load_lora(tiny_mmdit(), empty), r"\(no lora_A/B .*; it holds no tensors\)$")
    one_line_error(lambda: sd.load_mmdit(empty), r"is not an SD3/SD3.5 checkpoint: it holds no tensors$")


def test_a_file_of_lora_names_without_lora_weights_is_described_as_other_files_are(tmp_path):
    """Names holding "lora" but no lora_A/B .weight were shown as 'keys [...]', and a FLUX LoRA's so named
    was not named FLUX's: now 'its first keys are [...]', as elsewhere, or the other model's name."""
    for key, said in [("x.lora_A", "its first keys are ['x.lora_A']"),
                      ("lora_unet_double_blocks_0_img_attn_qkv.lora_A", "it looks like a FLUX transformer")]:
        save_file({key: torch.ones(2, 2)}, tmp_path / "odd.safetensors")
        one_line_error(lambda: sd.load_lora(tiny_mmdit(), tmp_path / "odd.safetensors"),
                       rf"is not a LoRA read here \(no lora_A/B .*; {re.escape(said)}\)$")


def test_a_rank_0_lora_pair_is_not_called_a_rank_mismatch(tmp_path):
    """down (0, 64) and up (64, 0) agree on their rank, 0: they were refused as a 'rank mismatch'."""
    key, path = "lora_unet_joint_blocks_0_x_block_attn_proj", tmp_path / "rank0.safetensors"
    save_file({f"{key}.lora_down.weight": torch.zeros(0, 64), f"{key}.lora_up.weight": torch.zeros(64, 0)}, path)
    one_line_error(lambda: sd.load_lora(tiny_mmdit(), path), r"'joint_blocks_0_x_block_attn_proj' has down "
                   r"\(0, 64\) and up \(64, 0\): a LoRA pair is down \(r, in\) and up \(out, r\), r >= 1")


@pytest.mark.parametrize("name, steps", [("lora.safetensors", 1), ("lora_step_000002.safetensors", 2)])
def test_a_full_disk_at_a_checkpoint_ends_the_run_saying_how_to_go_on(tmp_path, monkeypatch, name, steps):
    """Any error writing lora.safetensors was the warning meant for a file held open: a full disk there was a
    warning too, and the run went on. A full disk at a checkpoint ended the run with 'free disk space or choose
    another folder; older files are intact', not saying that the run goes on with --resume from its last
    checkpoint (with none saved yet, it is started again)."""
    make_dataset(tmp_path / "data")
    real_save_file = sd.save_file

    def full_disk(tensors, path, metadata=None):
        if Path(path).name.startswith(f".{name}."):                     # its temporary file
            raise OSError(28, "No space left on device")
        return real_save_file(tensors, path, metadata=metadata)
    monkeypatch.setattr(sd, "save_file", full_disk)
    config = tiny_config(tmp_path, **{"train.steps": steps, "train.save_every": 1, "sample.sample_every": 0})
    then = "; then continue with --resume" * (steps > 1)           # step 1's state saved before step 2's write
    one_line_error(lambda: sd.train(config), rf"{name} \(No space left on device\): "
                   rf"free disk space or choose another folder; older files are intact{then}$")
    assert (tmp_path / "run" / sd.STATE_FILE).exists() == (steps > 1)


def test_set_values_yaml_refuses_get_advice_for_what_went_wrong():
    """`--set dataset.path=%USERPROFILE%\\imgs` (PowerShell leaves %VAR% to the program; YAML starts no plain value
    with %) was refused as 'not valid YAML (quote a list like '[a, b]' as a whole)': advice for another mistake."""
    one_line_error(lambda: sd.load_config(None, ["dataset.path=%USERPROFILE%\\imgs"]),
                   r"^--set dataset.path=%USERPROFILE%\\imgs: not valid YAML \(.*'%'\): quote the value in YAML, e.g. --set \"dataset.path='%USERPROFILE%\\imgs'\"$")
    assert sd.load_config(None, ["dataset.path='%USERPROFILE%\\imgs'"]).dataset.path.endswith("imgs")  # as advised
    one_line_error(lambda: sd.load_config(None, ["sample.prompts=a: b: c"]),
                   re.escape("(mapping values are not allowed here): quote the value in YAML, e.g. --set "
                             "\"sample.prompts='a: b: c'\"") + "$")


def test_text_encoder_files_of_the_inner_model_load(single_files, tmp_path):
    """A CLIP-L saved from CLIPTextModel's inner text_model (names without `text_model.`: embeddings.*, encoder.layers.*,
    final_layer_norm.*), or a T5 from T5EncoderModel's encoder stack (block.*, embed_tokens.*), was refused as 'not
    a clip_l (t5xxl) text encoder: its first keys are [...]', without advice."""
    root, _ = single_files
    clip_l, t5 = load_file(root / "clip/clip_l.safetensors"), load_file(root / "clip/t5xxl_fp16.safetensors")
    stack = {"embed_tokens.weight": t5.pop("shared.weight")} | {k.removeprefix("encoder."): v for k, v in t5.items()}
    folder = encoder_folder(root, tmp_path / "inner", clip_l={k.removeprefix("text_model."): v for k, v in clip_l.items()},
                            t5xxl_fp16=stack)
    torch.testing.assert_close(sd.load_text_encoders(folder, context_dim=192).encode(["a red fox"]),
                               sd.load_text_encoders(root / "clip", context_dim=192).encode(["a red fox"]))
