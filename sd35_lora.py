"""Stable Diffusion 3 / 3.5 LoRA training and sampling in one readable file.

    python sd35_lora.py config.yaml                        # train a LoRA, sampling every N steps
    python sd35_lora.py config.yaml --set train.lr=5e-5    # override any config key
    python sd35_lora.py config.yaml --resume               # continue the run in output_dir
    python sd35_lora.py config.yaml --tiny                 # CPU smoke run (seconds to minutes), tiny model
    torchrun --nproc_per_node=8 sd35_lora.py config.yaml   # 8 GPUs: 8x the batch
    python sample.py --model stabilityai/stable-diffusion-3.5-medium --prompt "a fox" --lora lora.safetensors

Data flow:
    sampling:  prompts -> TextEncoders -> (context, pooled) -> denoise(MMDiT [+LoRA]) -> latents -> VAE
    training:  images -> VAE.encode_moments -----+  (cached on disk; latents drawn per batch)
               captions -> TextEncoders -> cond -+-> flow-matching loss on MMDiT+LoRA -> AdamW -> LoRA file

Part 1 is the reference, in data-flow order; Part 2 is the plumbing that reads and writes the files people
have, and checks what they give (a mistake raises UserError: one line, no traceback). Sections (line numbers):
       80  Presets and Configuration        per-variant sampling presets, the training config
      207  Flow Matching                    sigma shift, schedules, training sigmas, loss weights, the loss
      270  MMDiT                            joint blocks, official parameter names, dual attention, qk-norm
      562  LoRA                             LoRALinear, FrozenLinear (its backward), add_lora
      722  VAE                              16-channel autoencoder, the latent scale and shift
      872  Text Encoders                    CLIP-L + CLIP-G + T5 -> (context, pooled)
      912  Sampling                         Euler / DPM++ 2M with CFG and skip-layer guidance, generate()
     1101  Data                             dataset scan, aspect buckets, the latent and text cache
     1238  Training                         Trainer and the training loop
     1394  Part 2: plumbing                 a reader can stop here
     1401  Checkpoint Formats and Loading   diffusers <-> official names, single files, text encoder files
     2007  Hub Downloads                    snapshot downloads, tokenizers
     2081  LoRA Files                       diffusers / kohya / ComfyUI layouts, save and load
     2478  fp8 Weights                      float8_e4m3fn with per-row scales, fp8 tensor-core matmuls
     2606  Config Files and Resume Rules    YAML + --set, validation, training state, resume rules
     3308  Dataset Files                    folders listed, the pixel limit, what a scan found odd
     3575  Output Files                     cache files, atomic writes, the output_dir lock, loss.png
     4193  Several Processes (torchrun)     one all-reduce per step
     4292  Command Line and the Tiny Model  main(), --tiny

Parameter names are those of Stability AI's official checkpoints (minus `model.diffusion_model.`), so an
official file loads by stripping that prefix; the diffusers layout is converted on load through one key table.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import difflib
import errno
import functools
import gc
import hashlib
import io
import itertools
import json
import math
import numbers
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)    # Ctrl-C while torch imports (seconds): no traceback
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm


#################################################################################
#                           Presets and Configuration                           #
#################################################################################

@dataclass(frozen=True)
class Preset:
    """Recommended sampling settings of one model variant, each labelled with its source in PRESETS."""
    steps: int
    cfg: float
    shift: float
    sampler: str
    slg_scale: float | None = None         # skip-layer guidance if asked for (--slg); None = no reference
    slg_layers: tuple[int, ...] = ()


PRESETS = {  # sources: README "Variants and recommended settings"
    "sd3-medium": Preset(steps=28, cfg=7.0, shift=3.0, sampler="euler"),               # diffusers' model card
    # Stability AI's sd3_infer.py CONFIGS; its SLG applies only with --skip_layer_cfg, diffusers has it off
    "sd3.5-medium": Preset(steps=50, cfg=5.0, shift=3.0, sampler="dpmpp_2m",
                           slg_scale=2.5, slg_layers=(7, 8, 9)),
    "sd3.5-large": Preset(steps=40, cfg=4.5, shift=3.0, sampler="dpmpp_2m"),          # sd3_infer.py CONFIGS
    "sd3.5-large-turbo": Preset(steps=4, cfg=1.0, shift=3.0, sampler="euler"),        # sd3_infer.py CONFIGS
}
SLG_WINDOW = (0.01, 0.20)                  # skip-layer guidance acts on steps inside this fraction of the run
T5_LENGTH = 256                            # diffusers' default; shared by training, previews and sample.py
# every option list, once: validate(), sample.py's flags and check_choice (in the functions) read these
SAMPLERS = ("euler", "dpmpp_2m")
SCHEDULES = ("linear", "cosine")
TIMESTEP_SAMPLINGS = ("logit_normal", "mode", "uniform")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
LR_SCHEDULES = ("constant", "cosine")
LORA_FORMATS = ("diffusers", "kohya")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UserError(ValueError):
    """Bad input from the user: printed as one line by the command-line entry points, no traceback. Under
    torchrun each machine's first process prints those all its processes meet (config, paths, data); `own`:
    one of this process alone (its GPU, its share of the cache, its link to the others), which it prints."""

    def __init__(self, message: str, own: bool = False):
        super().__init__(message)
        self.own = own


def check_choice(name: str, value, options):
    """A value outside its option list is a one-line error: a typo must never run another algorithm."""
    if value not in tuple(options):             # a tuple: a dict's `in` hashes, and a list is unhashable
        raise UserError(f"unknown {name} {value!r}: use one of {', '.join(options)}")


@dataclass
class DatasetConfig:
    path: str = "data"                     # folder of images with same-name .txt captions
    resolution: int = 1024                 # bucket area ~ resolution^2 px, sides multiples of 64
    default_caption: str = ""              # used (and counted) where a .txt is missing
    caption_dropout: float = 0.1           # share of samples on the empty caption (keeps CFG working)
    flip: bool = False                     # random horizontal flips
    cache_dir: str = "cache"               # latents + text embeddings, keyed by content and settings


@dataclass
class LoRAConfig:
    rank: int = 16
    alpha: float = 16.0                    # scale = alpha / rank
    targets: str = "attn"                  # attn | attn_mlp | all | comma list of regexes on module names
    blocks: str = ""                       # "" = all joint blocks, or a range such as "0-11"
    dropout: float = 0.0
    format: str = "diffusers"              # diffusers | kohya


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    lr_schedule: str = "constant"          # constant | cosine (both after warmup)
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 250
    keep_last: int = 0                     # lora_step_*.safetensors kept: the newest N (0 = all)
    timestep_sampling: str = "logit_normal"  # density of the training sigmas: logit_normal | mode | uniform
    logit_mean: float = 0.0                # u = sigmoid(N(mean, std)): (0, 1) ranked best in the SD3 paper
    logit_std: float = 1.0
    mode_scale: float = 1.29               # the s of the SD3 paper's f_mode (diffusers' default)
    weighting: str = "none"                # loss weight by sigma: none | sigma_sqrt | cosmap
    gradient_checkpointing: bool = True
    compile: bool = False                  # torch.compile the joint blocks (compiled at the first steps)
    loss_bins: int = 5                     # the unweighted MSE is reported by sigma bin with each sample set
    dist_timeout: float = 600.0            # torchrun: seconds a process waits for the others, then fails


@dataclass
class SampleConfig:
    sampler: str = ""                      # "" = the variant's preset
    sample_every: int = 250                # 0 = only at the start and the end
    sample_steps: int = 0                  # 0 = the variant's preset
    guidance_scale: float = 0.0            # 0 = the variant's preset
    shift: float = 0.0                     # 0 = the variant's preset; the training sigmas use this shift too
    prompts: list[str] = field(default_factory=lambda: ["a photo of a cat"])
    neg: str = ""
    width: int = 1024
    height: int = 1024
    seed: int = 42


@dataclass
class Config:
    model: str = ""                        # diffusers folder, official .safetensors, hub id, or "tiny"
    text_encoders: str = ""                # folder of clip_l/clip_g/t5xxl files or diffusers ("" = model)
    vae: str = ""                          # "" = the VAE inside `model`
    variant: str = ""                      # "" = detected; one of PRESETS to override
    output_dir: str = "runs/lora"
    device: str = "auto"                   # auto | cpu | cuda | cuda:1 | mps
    dtype: str = "bf16"                    # frozen weights; LoRA and optimizer stay fp32
    t5_length: int = T5_LENGTH
    use_t5: bool = True                    # False: zeros instead of T5 (saves ~10 GB)
    fp8: bool = False                      # joint-block weights in float8, a scale per row: MMDiT memory ~1/2
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


#################################################################################
#                                 Flow Matching                                 #
#################################################################################

def shift_sigma(sigma, shift: float):
    """SD3's time shift: moves sigmas toward 1 (more noise), which more pixels need (the paper scales the
    shift with resolution; SD3.5 uses a constant 3.0)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def get_schedule(steps: int, shift: float, spacing: str = "linear") -> torch.Tensor:
    """Sigmas from 1 to 0 (steps + 1 values) as both references build them: `steps` values spaced from 1 to
    shift(1/1000), all shifted (so that end twice), then 0. `cosine` spaces them densely at both ends."""
    check_choice("schedule", spacing, SCHEDULES)
    end = shift_sigma(1 / 1000, shift)
    frac = torch.linspace(0, 1, steps, dtype=torch.float64)
    if spacing == "cosine":
        frac = (1 - torch.cos(math.pi * frac)) / 2
    sigmas = shift_sigma(1 - (1 - end) * frac, shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def sample_training_sigmas(n: int, cfg: TrainConfig, shift: float, g: torch.Generator) -> torch.Tensor:
    """Training sigmas: u in [0, 1] by density, then the shifted 1000-step table (diffusers' recipe)."""
    check_choice("timestep_sampling", cfg.timestep_sampling, TIMESTEP_SAMPLINGS)
    if cfg.timestep_sampling == "logit_normal":
        u = torch.sigmoid(torch.normal(cfg.logit_mean, cfg.logit_std, size=(n,), generator=g))
    else:                   # on the CPU, as g, under a caller's set_default_device too (normal ignores it)
        u = torch.rand(n, generator=g, device="cpu")
    if cfg.timestep_sampling == "mode":                         # uniform u through the SD3 paper's f_mode
        u = 1 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    index = (u * 1000).long().clamp(0, 999)  # u = 1 (mode's draw of 0, a sigmoid rounding up): no row 1000
    return shift_sigma((1000 - index).float() / 1000, shift)


def loss_weight(sigmas: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-sample loss weights (diffusers' SD3 schemes): none, sigma_sqrt (it is sigma^-2) or cosmap."""
    check_choice("weighting", scheme, WEIGHTINGS)
    if scheme == "none":
        return torch.ones_like(sigmas)
    if scheme == "sigma_sqrt":
        return sigmas ** -2.0
    return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))   # cosmap


def flow_matching_loss(model: MMDiT, latents, context, pooled, cfg: TrainConfig, shift: float,
                       g: torch.Generator, autocast_dtype: torch.dtype | None, keep: slice = slice(None),
                       n: int = 0):
    """Rectified flow, s = sigma: x_s = (1-s) x0 + s noise, v = noise - x0. -> (loss, unweighted MSEs, sigmas)
    (diffusers' SD3 scripts default to precondition_outputs: an MSE on x0 = x_s - s v, s^2 times this one.)
    latents (b, 16, h, w), context (b, L, 4096), pooled (b, 2048) may be slice `keep` of a batch of n (sigmas
    and noise are drawn for all n, so any slice sees what the whole batch would); loss = weighted sum / n."""
    device, n = latents.device, n or latents.shape[0]
    sigmas = sample_training_sigmas(n, cfg, shift, g)[keep].to(device)
    noise = torch.randn((n, *latents.shape[1:]), generator=g, device="cpu")[keep].to(device)
    s = sigmas.view(-1, 1, 1, 1)                                                # (b, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise                                       # x_s, (b, 16, h, w)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        pred = model(noisy, sigmas * 1000, context, pooled)                     # v, (b, 16, h, w)
    per_sample = ((pred.float() - (noise - latents)) ** 2).mean(dim=(1, 2, 3))  # (b,)
    return (per_sample * loss_weight(sigmas, cfg.weighting)).sum() / n, per_sample.detach(), sigmas


#################################################################################
#                                     MMDiT                                     #
#################################################################################

def _block_count(sd: dict, prefix: str) -> int:
    """N for weights named `prefix`0. to `prefix`N-1.; a gap (a hostile `joint_blocks.2000000.`) errs."""
    found = {k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)}
    if found != {str(i) for i in range(len(found))}:
        raise ValueError(f"{prefix}* indices are not 0..{len(found) - 1}: {sorted(found)[:5]}")
    return len(found)


@dataclass
class MMDiTConfig:
    depth: int = 24                        # joint blocks; official models have heads = depth, head_dim = 64
    hidden: int = 1536
    heads: int = 24
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    context_dim: int = 4096                # T5 width
    pooled_dim: int = 2048                 # CLIP-L + CLIP-G pooled
    pos_embed_max_size: int = 384
    qk_norm: bool = True
    dual_attention_layers: tuple[int, ...] = ()    # none; SD3.5 Medium (the other defaults) has 0-12
    mlp_ratio: int = 4

    @classmethod
    def from_state_dict(cls, sd: dict) -> "MMDiTConfig":
        """Architecture from official-name weight shapes (works on meta tensors)."""
        proj = sd["x_embedder.proj.weight"]                       # (hidden, in_ch, p, p)
        ln_q = sd.get("joint_blocks.0.x_block.attn.ln_q.weight")  # (head_dim,)
        hidden, patch = proj.shape[0], proj.shape[-1]
        return cls(
            depth=_block_count(sd, "joint_blocks."), hidden=hidden, patch_size=patch,
            heads=hidden // (ln_q.shape[0] if ln_q is not None else 64), qk_norm=ln_q is not None,
            in_channels=proj.shape[1], out_channels=sd["final_layer.linear.weight"].shape[0] // patch ** 2,
            context_dim=sd["context_embedder.weight"].shape[1],
            pooled_dim=sd["y_embedder.mlp.0.weight"].shape[1],
            pos_embed_max_size=math.isqrt(sd["pos_embed"].shape[1]),
            dual_attention_layers=tuple(sorted({int(k.split(".")[1]) for k in sd if ".x_block.attn2." in k})),
            mlp_ratio=sd["joint_blocks.0.x_block.mlp.fc1.weight"].shape[0] // hidden)

    def variant(self, hint: str = "") -> str:
        """The PRESETS entry; Large Turbo has Large's shapes, so its name (or `variant`) tells it apart."""
        if self.dual_attention_layers:
            return "sd3.5-medium"
        if not self.qk_norm:
            return "sd3-medium"
        return "sd3.5-large-turbo" if "turbo" in hint.lower() else "sd3.5-large"


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t = sigma * 1000, cosines first. (B,) -> (B, dim)"""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                                            # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """2D sine-cosine table for a fresh model; real checkpoints store their own. -> (1, grid*grid, dim)"""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)[:, None] * omega[None]         # (grid, dim/4)
    emb = torch.cat([torch.sin(pos), torch.cos(pos)], dim=1)                       # (grid, dim/2)
    table = torch.cat([emb[None, :, :].expand(grid, -1, -1), emb[:, None, :].expand(-1, grid, -1)], dim=-1)
    return table.reshape(1, grid * grid, dim).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, x, 1 + scale)                  # x * (1 + scale) + shift, in one kernel


def without_autocast(norm, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """norm(x) in x's dtype. CUDA autocast runs layer_norm and rms_norm in fp32 (both normalize in fp32
    inside anyway), so the matmul or attention after them would cast back: two copies of x per call."""
    if not torch.is_autocast_enabled(x.device.type):
        return norm(x, *args, **kwargs)
    with torch.autocast(x.device.type, enabled=False):     # entered only under autocast: ~10 us a call
        return norm(x, *args, **kwargs)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without weights: adaLN brings the scale and shift."""
    return without_autocast(F.layer_norm, x, x.shape[-1:], eps=1e-6)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        hidden = self.fc1(x)        # (B, L, 4D), the block's largest; a hook (fc1's, or global) may keep it
        if torch.is_grad_enabled() or self.fc1._forward_hooks or nn.modules.module._global_forward_hooks:
            return self.fc2(F.gelu(hidden, approximate="tanh"))
        return self.fc2(torch.ops.aten.gelu_(hidden, approximate="tanh"))    # no graph kept: reuse the buffer


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multi-head attention on (B, L, heads, head_dim) tensors -> (B, L, D)."""
    out = F.scaled_dot_product_attention(*(rearrange(t, "b l h d -> b h l d") for t in (q, k, v)))
    return rearrange(out, "b h l d -> b l (h d)")


class Attention(nn.Module):
    """Fused qkv projection with optional per-head RMSNorm on q and k (SD3.5)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.ln_q = nn.RMSNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.ln_k = nn.RMSNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = None if pre_only else nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor):
        """(B, L, D) -> q, k, v each (B, L, heads, head_dim)"""
        # token-major (the projection's layout): RMSNorm and the joint cat read q/k in long runs, not by head
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b l h d", three=3, h=self.heads)
        return without_autocast(self.ln_q, q), without_autocast(self.ln_k, k), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain self-attention: the image-only `attn2` of SD3.5 Medium's dual blocks (MMDiT-X)."""
        return self.proj(attention(*self.qkv_heads(x)))


def adaLN(dim: int, chunks: int) -> nn.ModuleDict:
    """adaLN_modulation: SiLU(c) -> Linear -> `chunks` shifts, scales and gates of width dim. The checkpoints
    name it a Sequential (SiLU, Linear), so the Linear is "1"; MMDiT.forward applies the SiLU once for all."""
    return nn.ModuleDict({"1": nn.Linear(dim, chunks * dim)})


class StreamBlock(nn.Module):
    """One stream (image `x_block` or text `context_block`) of a joint block. adaLN gives 6 shift/scale/gate
    chunks (9 with SD3.5 Medium's dual attention, 2 in the last text block: `pre_only`, its output unused)."""

    def __init__(self, cfg: MMDiTConfig, pre_only: bool = False, dual: bool = False):
        super().__init__()
        dim = cfg.hidden
        self.pre_only, self.dual = pre_only, dual
        self.n_mod = 2 if pre_only else 9 if dual else 6
        self.attn = Attention(dim, cfg.heads, cfg.qk_norm, pre_only)
        self.attn2 = Attention(dim, cfg.heads, cfg.qk_norm) if dual else None
        self.mlp = None if pre_only else MLP(dim, dim * cfg.mlp_ratio)
        self.adaLN_modulation = adaLN(dim, self.n_mod)

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """-> (q, k, v) of this stream and the state post_attention needs."""
        mods = self.adaLN_modulation["1"](c).unsqueeze(1).chunk(self.n_mod, dim=-1)   # n_mod x (B, 1, D)
        shift_msa, scale_msa = mods[:2]
        normed = layer_norm(x)                                                        # (B, L, D)
        return self.attn.qkv_heads(modulate(normed, shift_msa, scale_msa)), (normed, mods)

    def post_attention(self, attn_out: torch.Tensor, x: torch.Tensor, state) -> torch.Tensor:
        """This stream's share of the joint attention, (B, L, D) -> x + gated attention(s) + gated MLP"""
        normed, mods = state                        # mods[:2] went into pre_attention
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[2:6]
        x = torch.addcmul(x, gate_msa, self.attn.proj(attn_out))
        if self.dual:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            x = torch.addcmul(x, gate_msa2, self.attn2(modulate(normed, shift_msa2, scale_msa2)))
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp)))


class JointBlock(nn.Module):
    """Text and image streams with their own weights, attending jointly over the concatenated sequence."""

    def __init__(self, cfg: MMDiTConfig, index: int):
        super().__init__()
        self.context_block = StreamBlock(cfg, pre_only=index == cfg.depth - 1)
        self.x_block = StreamBlock(cfg, dual=index in cfg.dual_attention_layers)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor):
        """context (B, Lc, D), x (B, Lx, D), c (B, D) = SiLU(timestep + pooled embedding) -> context, x"""
        ctx_qkv, ctx_state = self.context_block.pre_attention(context, c)
        x_qkv, x_state = self.x_block.pre_attention(x, c)
        q, k, v = (torch.cat(pair, dim=1) for pair in zip(ctx_qkv, x_qkv))  # (B, Lc + Lx, heads, head_dim)
        del ctx_qkv, x_qkv                          # peak memory: the streams' q, k, v die before attention
        out = attention(q, k, v)                    # (B, Lc + Lx, D)
        del q, k, v                                 # and the joined ones before the MLPs
        ctx_out, x_out = out.split([context.shape[1], x.shape[1]], dim=1)     # (B, Lc, D), (B, Lx, D)
        if not self.context_block.pre_only:
            context = self.context_block.post_attention(ctx_out, context, ctx_state)
        return context, self.x_block.post_attention(x_out, x, x_state)


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(hidden, out_dim)
        self.adaLN_modulation = adaLN(hidden, 2)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation["1"](c).unsqueeze(1).chunk(2, dim=-1)   # diffusers: scale, shift
        return self.linear(modulate(layer_norm(x), shift, scale))


# The reentrant checkpoint's output requires grad only if one of its inputs does, and a block's trainable
# weights are not its inputs: this leaf, passed in and unused, stands in for them. (A weight itself would run
# its gradient hooks twice: DistributedDataParallel raises "Expected to mark a variable ready only once".)
WEIGHTS_STAND_IN = torch.empty(0, device="cpu", requires_grad=True)


def run_joint_block(block: JointBlock, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor,
                    recompute: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """block(context, x, c); recompute: gradient checkpointing, its activations recomputed in the backward."""
    if not recompute:
        return block(context, x, c)
    if torch.compiler.is_compiling():          # compile_blocks: the recompute joins the compiled backward
        return checkpoint(block, context, x, c, use_reentrant=False)
    if not (context.requires_grad or x.requires_grad or c.requires_grad
            or any(p.requires_grad for p in block.parameters())):
        return block(context, x, c)                 # nothing to train through: no graph is kept
    # Eager, the reentrant checkpoint: no graph in the forward, no hook per saved tensor (host time, which a
    # GPU step waits on), but loss.backward() only, not torch.autograd.grad.
    return checkpoint(run_checkpointed, block, context, x, c, WEIGHTS_STAND_IN, use_reentrant=True)


def run_checkpointed(block: JointBlock, context, x, c, _stand_in) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward and the recompute of run_joint_block's checkpoint (see `checkpointed`: fp8 weights)."""
    with checkpointed():
        return block(context, x, c)


class MMDiT(nn.Module):
    """The SD3 / SD3.5 diffusion transformer (MMDiT, and MMDiT-X with dual attention for SD3.5 Medium)."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.hidden, cfg.patch_size
        self.x_embedder = nn.ModuleDict({"proj": nn.Conv2d(cfg.in_channels, D, p, stride=p)})
        self.patch_px = p * 8                           # image pixels per patch side: the VAE's 8 x p
        self.register_buffer("pos_embed", sincos_pos_embed(D, cfg.pos_embed_max_size))
        self.t_embedder = nn.ModuleDict({"mlp": nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))})
        self.y_embedder = nn.ModuleDict({"mlp": nn.Sequential(nn.Linear(cfg.pooled_dim, D), nn.SiLU(),
                                                              nn.Linear(D, D))})
        self.context_embedder = nn.Linear(cfg.context_dim, D)
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(D, p * p * cfg.out_channels)
        self.gradient_checkpointing = False
        self.run_block = run_joint_block                # compile_blocks swaps in a compiled one

    def enable_gradient_checkpointing(self, enabled: bool = True):
        """Recompute each joint block in the backward pass: activation memory ~1 block instead of all."""
        self.gradient_checkpointing = read_flag(enabled, "enabled")
        return self

    def compile_blocks(self):
        """torch.compile each joint block with its checkpoint ("regional" compilation): blocks of the same
        structure share one compiled graph, so the one-off compile covers a few blocks, not the model."""
        # each (block structure, grad mode) compiles once, then again as each dim starts to vary; past the
        # limit (8 by default) dynamo warns, runs the rest eagerly, and training with buckets passes it
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.run_block = torch.compile(run_joint_block)
        return self

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Centre crop of the stored (max x max) table for an h x w patch grid. -> (1, h*w, D)"""
        m = self.cfg.pos_embed_max_size
        check_image_fits(self, h * self.patch_px, w * self.patch_px)
        top, left = (m - h) // 2, (m - w) // 2
        grid = self.pos_embed.view(1, m, m, -1)[:, top:top + h, left:left + w]
        return grid.reshape(1, h * w, -1)

    @property
    def compute_dtype(self) -> torch.dtype:         # the weights' as loaded; fp8 Linears compute in it too
        return self.x_embedder.proj.weight.dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor,
                skip_layers=()) -> torch.Tensor:
        """x (B, 16, H/8, W/8) latents, t (B,) = sigma*1000, context (B, L, 4096), y (B, 2048) -> velocity,
        x's shape (noise - x0, as flow_matching_loss trains it)."""
        p, dtype = self.cfg.patch_size, self.compute_dtype
        check_latent_size(x, p, self.patch_px)          # the patch conv would drop a last row or column
        h, w = x.shape[-2] // p, x.shape[-1] // p
        # (B, h*w, D), contiguous: in the conv's channel-first layout every LayerNorm and Linear would copy it
        x = rearrange(self.x_embedder.proj(x.to(dtype)), "b d h w -> b (h w) d").contiguous()
        x = x + self.cropped_pos_embed(h, w).to(x.dtype)
        c = self.t_embedder.mlp(timestep_embedding(t).to(dtype)) + self.y_embedder.mlp(y.to(dtype))  # (B, D)
        c = F.silu(c)                                   # the SiLU that starts every adaLN_modulation, once
        context = self.context_embedder(context.to(dtype))                      # (B, L, D)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(self.joint_blocks):
            if i in skip_layers:
                continue
            context, x = self.run_block(block, context, x, c, recompute)
        x = self.final_layer(x, c)                                               # (B, h*w, p*p*C)
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p)


#################################################################################
#                                      LoRA                                     #
#################################################################################

LORA_TARGETS = {
    "attn": r"joint_blocks\.\d+\.\w+_block\.attn\.(qkv|proj)$",          # diffusers' default layers
    "attn_mlp": r"joint_blocks\.\d+\.\w+_block\.(attn\.(qkv|proj)|mlp\.fc[12])$",
    "all": r"(attn2?\.(qkv|proj)|mlp\.fc[12]|adaLN_modulation\.1|_embedder(\.mlp\.[02])?"
           r"|final_layer\.linear)$",
}


def target_regexes(targets: str) -> list[re.Pattern]:
    """A LORA_TARGETS preset or comma-separated regexes on module names, compiled; a bad one: a UserError."""
    patterns = [LORA_TARGETS[targets]] if targets in LORA_TARGETS else targets.split(",")
    try:
        return [re.compile(p.strip()) for p in patterns if p.strip()]
    except re.error as e:
        raise UserError(f"lora.targets: invalid regex ({e}); use attn, attn_mlp, all or regexes") from None


def parse_blocks(spec: str, depth: int) -> set[int]:
    """"" -> all blocks; "0-11" or "3,5,9-12" -> those joint blocks, all below `depth`; else a UserError."""
    if not spec:
        return set(range(depth))
    blocks = set()
    for part in str(spec).split(","):
        lo, dash, hi = part.strip().partition("-")     # a reversed or open range is a typo, never skipped
        if not lo.isdecimal() or dash and not (hi.isdecimal() and int(hi) >= int(lo)):
            raise UserError(f"lora.blocks must look like '0-11' or '3,5,9-12', got {spec!r}")
        if int(hi or lo) >= depth:                  # e.g. a Large recipe on Medium: never silently cut short
            raise UserError(f"lora.blocks {spec!r} names block {int(hi or lo)}: the model's joint blocks "
                            f"are 0-{depth - 1}")
        blocks.update(range(int(lo), int(hi or lo) + 1))
    return blocks


class FrozenLinear(torch.autograd.Function):
    """x W^T + b for a frozen W, plus (given LoRA adapters) scale * x' down^T up^T, x' being x after LoRA
    dropout or a cast to fp32 (None: x itself). The backward is written out because a Large LoRA step is bound
    by kernel launches: ~25 operators per layer in a checkpointed step, ~50 as autograd's graph of the same
    formula. An fp8 W comes with row scales; the backward dequantizes it again rather than keep a copy (but
    see `checkpointed`). The fp32 adapters compute in the dtype of x'; their gradients come back in fp32."""

    checkpointed = False                                        # see `checkpointed` (fp8 Weights)

    @staticmethod
    def forward(ctx, x, weight, w_scale, bias, x_lora=None, down=None, up=None, scale=0.0):
        x_rows = x.reshape(-1, x.shape[-1])                                             # (N = B * L, in)
        if w_scale is not None and fp8_tensor_cores(x_rows, weight):
            out = fp8_matmul(x_rows, weight, w_scale, bias)
        else:
            w = weight if w_scale is None else dequantize_fp8(weight, w_scale, x.dtype)
            out = F.linear(x_rows, w, bias)
            if not torch.compiler.is_compiling() and FrozenLinear.checkpointed and ctx.needs_input_grad[0]:
                weight, w_scale = w, None       # see `checkpointed`
        hidden = None
        if down is not None:
            x_lora = x_rows if x_lora is None else x_lora.reshape(-1, x_lora.shape[-1])
            down, up = down.to(x_lora.dtype), up.to(x_lora.dtype)
            hidden = x_lora @ down.t()                                                  # (N, rank)
            out = torch.addmm(out.to(x_lora.dtype), hidden, up.t(), alpha=scale)        # (N, out)
        ctx.save_for_backward(weight, w_scale, x_lora, hidden, down, up)
        ctx.scale, ctx.x_shape, ctx.x_dtype = scale, x.shape, x.dtype
        return out.view(*x.shape[:-1], out.shape[-1])                           # not -1: ambiguous for 0 rows

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, w_scale, x_lora, hidden, down, up = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])                                            # (N, out)
        grad_x = grad_x_lora = grad_down = grad_up = grad_hidden = None
        if down is not None:
            grad_hidden = g @ up                                                        # (N, rank), unscaled
            scale = g.new_full((1,), ctx.scale, dtype=torch.float32)    # bf16 * (1,) fp32: fp32, in one op
            grad_down, grad_up = (grad_hidden.t() @ x_lora) * scale, (g.t() @ hidden) * scale
            if ctx.needs_input_grad[4]:
                grad_x_lora = ((grad_hidden @ down) * ctx.scale).view(ctx.x_shape)    # x_lora: x's shape
        if ctx.needs_input_grad[0]:
            # the base matmul ran in x's dtype (autocast casts fp32 weights to it); an fp32 update made g fp32
            w = weight.to(ctx.x_dtype) if w_scale is None else dequantize_fp8(weight, w_scale, ctx.x_dtype)
            grad_x = g.to(ctx.x_dtype) @ w
            if grad_hidden is not None and grad_x_lora is None:        # x fed the update too
                grad_x = torch.addmm(grad_x, grad_hidden, down, alpha=ctx.scale)
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, None, None, None, grad_x_lora, grad_down, grad_up, None


class LoRALinear(nn.Linear):
    """A frozen nn.Linear (same weight/bias names) plus a trainable fp32 low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.register_buffer("weight_scale", getattr(base, "weight_scale", None))    # an fp8 base's scales
        self.rank, self.alpha, self.multiplier = rank, alpha, 1.0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = dict(bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_down = nn.Linear(self.in_features, rank, **kw)
        self.lora_up = nn.Linear(rank, self.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank * self.multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast = torch.is_autocast_enabled(x.device.type)
        # under autocast x is cast as F.linear would, an fp32 one too: matmul, update, backward in one dtype
        x = x.to(torch.get_autocast_dtype(x.device.type)) if autocast else x
        # without autocast the update runs in the adapters' fp32 (a bf16 model sampled unmerged)
        x_lora = self.dropout(x if autocast else x.to(self.lora_down.weight.dtype))
        x_lora = None if x_lora is x else x_lora                        # None: one input, one gradient
        out = FrozenLinear.apply(x, self.weight, self.weight_scale, self.bias, x_lora, self.lora_down.weight,
                                 self.lora_up.weight, self.scale)
        return out.to(x.dtype)


def lora_targets(model: MMDiT, rank: int, targets: str, blocks: str) -> list[str]:
    """The names of the Linears a LoRA of this rank, `targets` and `blocks` wraps; a UserError if none."""
    if not 1 <= rank <= model.cfg.hidden:                  # a higher rank adds nothing, only memory
        raise UserError(f"lora.rank must be in 1..{model.cfg.hidden} (the model's width), got {rank}")
    regexes, keep = target_regexes(targets), parse_blocks(blocks, model.cfg.depth)
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and not name.endswith(("lora_down", "lora_up"))
             and any(r.search(name) for r in regexes)
             and (not name.startswith("joint_blocks.") or int(name.split(".")[1]) in keep)]
    check_targets_found(names, targets, blocks)
    return names


def add_lora(model: MMDiT, rank: int = 16, alpha: float | None = None, targets: str = "attn",
             blocks: str = "", dropout: float = 0.0) -> list[nn.Parameter]:
    """Freeze the model, wrap in LoRALinear the Linears that `targets` (a LORA_TARGETS preset or regexes
    on module names, comma-separated) selects (in joint blocks: only `blocks`) -> the new LoRA weights."""
    model = unwrap_mmdit(model, "add_lora", "rank=16", adds_layers=True)
    rank, alpha, dropout = read_lora_inputs(rank, alpha, dropout, targets)
    for name, p in model.named_parameters():        # an earlier add_lora's adapters (other layers) train on
        p.requires_grad_(p.requires_grad and name.endswith((".lora_down.weight", ".lora_up.weight")))
    params = []
    for name in lora_targets(model, rank, targets, blocks):
        base = model.get_submodule(name)
        check_no_lora_yet(base, name)
        layer = LoRALinear(base, rank, rank if alpha is None else alpha, dropout).train(base.training)
        _replace(model, name, layer)                # in the model's mode: no dropout in an eval() model
        params += [layer.lora_down.weight, layer.lora_up.weight]
    return params


def _replace(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


#################################################################################
#                                      VAE                                      #
#################################################################################

@dataclass
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2                # per level in the encoder; the decoder has one more
    latent_channels: int = 16
    groups: int = 32
    scaling_factor: float = 1.5305         # (z - shift) * scale: SD3's latents about zero-mean, unit-variance
    shift_factor: float = 0.0609

    @classmethod
    def from_state_dict(cls, sd: dict, **overrides) -> "VAEConfig":
        ch, levels = sd["encoder.conv_in.weight"].shape[0], _block_count(sd, "encoder.down.")
        mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
        return cls(ch=ch, ch_mult=mult, num_res_blocks=_block_count(sd, "encoder.down.0.block."),
                   latent_channels=sd["decoder.conv_in.weight"].shape[1], **overrides)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over every position of the 1/8-scale feature map (the VAE's mid block)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "b 1 (h w) c -> b c h w", h=x.shape[2])
        return x + self.proj_out(out)


def mid_block(ch: int, groups: int) -> nn.Sequential:
    """ResNet, attention, ResNet at the lowest resolution, under their official names."""
    return nn.Sequential(collections.OrderedDict(block_1=ResnetBlock(ch, ch, groups),
                                                 attn_1=AttnBlock(ch, groups),
                                                 block_2=ResnetBlock(ch, ch, groups)))


class Resample(nn.Module):
    """x2 down (asymmetric pad, stride-2 conv) or x2 up (nearest, conv)."""

    def __init__(self, ch: int, down: bool):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(ch, ch, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x):
        x = F.pad(x, (0, 1, 0, 1)) if self.down else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


def _level(cin: int, cout: int, n_blocks: int, groups: int) -> nn.Module:
    """One resolution level's ResNet blocks, as `.block`; the caller adds its down- or upsample."""
    level = nn.Module()
    widths = [cin] + [cout] * (n_blocks - 1)                         # the first block changes the width
    level.block = nn.Sequential(*(ResnetBlock(w, cout, groups) for w in widths))
    return level


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        widths = [c.ch * m for m in c.ch_mult]
        self.conv_in = nn.Conv2d(3, c.ch, 3, padding=1)
        self.down = nn.ModuleList(_level(cin, w, c.num_res_blocks, c.groups)
                                  for cin, w in zip([c.ch] + widths, widths))
        for i, level in enumerate(self.down):                           # the deepest level keeps its size
            level.downsample = Resample(widths[i], down=True) if i < len(widths) - 1 else nn.Identity()
        self.mid = mid_block(widths[-1], c.groups)
        self.norm_out = nn.GroupNorm(c.groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level.downsample(level.block(h))
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        widths = [c.ch * m for m in c.ch_mult]
        self.conv_in = nn.Conv2d(c.latent_channels, widths[-1], 3, padding=1)
        self.mid = mid_block(widths[-1], c.groups)
        # up[i] works at width widths[i]; it runs from the deepest level up, as in the official layout
        self.up = nn.ModuleList(_level(cin, w, c.num_res_blocks + 1, c.groups)
                                for cin, w in zip(widths[1:] + widths[-1:], widths))
        for i, level in enumerate(self.up):
            level.upsample = Resample(widths[i], down=False) if i > 0 else nn.Identity()
        self.norm_out = nn.GroupNorm(c.groups, widths[0], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.upsample(level.block(h))
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    """SD3's 16-channel autoencoder: pixels in [-1, 1], latents 1/8 the side, already scaled for the MMDiT."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 2*C, H/8, W/8): mean and log-variance (what the cache stores)."""
        check_image_batch(images)
        return self.encoder(images.to(self.encoder.conv_in.weight.dtype)).float()

    def latents_from_moments(self, moments: torch.Tensor, generator: torch.Generator | None = None,
                             noise: torch.Tensor | None = None) -> torch.Tensor:
        """z ~ N(mean, var), scaled into the MMDiT's latent space (decode() alone undoes it)."""
        mean, logvar = moments.float().chunk(2, dim=1)
        if noise is None:           # on the CPU, as the generator, under a caller's set_default_device too
            noise = torch.randn(mean.shape, generator=generator, device="cpu")
        z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise.to(mean.device)
        return (z - self.cfg.shift_factor) * self.cfg.scaling_factor

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents_from_moments(self.encode_moments(images), generator)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        check_image_batch(latents, "VAE.decode", self.cfg.latent_channels)
        z = latents / self.cfg.scaling_factor + self.cfg.shift_factor
        return self.decoder(z.to(self.decoder.conv_in.weight.dtype)).float()


#################################################################################
#                                 Text Encoders                                 #
#################################################################################

class TextEncoders:
    """CLIP-L and CLIP-G (penultimate hidden states, pooled projections) and T5-XXL, combined as SD3 expects:
    context = [CLIP-L | CLIP-G | zero pad to T5 width] ++ (T5 or zeros), pooled = [CLIP-L | CLIP-G] pooled."""

    def __init__(self, clip_l, clip_g, t5, tokenizers, t5_length: int = T5_LENGTH, context_dim: int = 4096):
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.tok_l, self.tok_g, self.tok_t5 = tokenizers
        self.t5_length, self.context_dim = t5_length, context_dim
        self.files: list[str] = []   # _file_id of the files read (weights, tokenizers): a swapped one is new
        check_pad_tokens(tokenizers, self.modules())

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.clip_l, self.clip_g, self.t5) if m is not None]

    def _tokens(self, tokenizer, prompts: list[str], length: int) -> torch.Tensor:
        return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids.to(self.clip_l.device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> context (B, 77 + t5_length, D_t5 = 4096), pooled (B, D_l + D_g = 768 + 1280 = 2048), float32."""
        prompts = read_prompts(prompts)
        if not prompts:                 # the tokenizers fail on an empty batch: a prompt's shapes, no rows
            return tuple(t[:0] for t in self.encode([""]))
        outs = [model(self._tokens(tok, prompts, tok.model_max_length), output_hidden_states=True)
                for model, tok in ((self.clip_l, self.tok_l), (self.clip_g, self.tok_g))]
        clip = torch.cat([out.hidden_states[-2].float() for out in outs], dim=-1)   # (B, 77, D_l + D_g)
        pooled = torch.cat([out.text_embeds.float() for out in outs], dim=-1)       # (B, D_l + D_g)
        if self.t5 is not None:
            t5 = self.t5(self._tokens(self.tok_t5, prompts, self.t5_length)).last_hidden_state.float()
        else:
            t5 = clip.new_zeros(len(clip), self.t5_length, self.context_dim)
        context = torch.cat([F.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5], dim=1)
        return context, pooled


#################################################################################
#                                    Sampling                                   #
#################################################################################

@dataclass
class Pipeline:
    """Everything sampling needs. With `offload`, the models visit `device` only while they run."""
    mmdit: MMDiT
    vae: VAE
    text: TextEncoders | None
    variant: str
    device: torch.device
    offload: bool = False
    visiting: tuple = ()                    # the modules that on_device() brought to `device`
    root: Path | None = None                # the model as load_pipeline resolved it (a hub id's download)

    def modules(self) -> list[nn.Module]:
        return [self.mmdit, self.vae, *(self.text.modules() if self.text else [])]

    def place(self, offload: bool | None = None) -> "Pipeline":
        """Move all models to `device`, or keep them on the CPU (offload). None: offload only when they do not
        fit into the GPU's free memory together (SD3.5 Large + T5-XXL in bf16 is ~27 GB)."""
        if offload is None:
            need = too_large_for(self.device, *self.modules())
            offload = need > 0
            if offload:
                print(f"models of {need / 2**30:.1f} GB exceed free GPU memory: they visit it one at a time")
        self.offload = read_flag(offload, "offload")
        for m in self.modules():
            m.to("cpu" if self.offload else self.device)
        return self

    @contextlib.contextmanager
    def on_device(self, *modules: nn.Module):
        """With `offload`, the modules not there yet visit `device` for the `with` block, then go back."""
        arriving = [m for m in modules if self.offload and m not in self.visiting]
        self.visiting += tuple(arriving)
        try:
            for m in arriving:
                m.to(self.device)
            yield
        finally:
            self.visiting = tuple(m for m in self.visiting if m not in arriving)
            for m in arriving:
                m.to("cpu")
            if arriving and self.device.type == "cuda":
                torch.cuda.empty_cache()


def dpmpp_2m_step(x, denoised, old_denoised, sigmas: list[float], i: int):
    """DPM-Solver++(2M) as in k-diffusion / the SD3.5 reference: second order in -log(sigma), h its step.
    `sigmas` are Python floats: branching on device tensors would stall the GPU at every step."""
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    if sigma_next == 0:
        return denoised
    if sigma_next == sigma:                 # fp32 sigmas equal (very many steps, a huge shift): a step of 0
        return x
    h = math.log(sigma / sigma_next)
    if old_denoised is not None and sigmas[i - 1] != sigma:    # after a step of 0: first order, as at i = 0
        r = math.log(sigmas[i - 1] / sigma) / h
        denoised = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return (sigma_next / sigma) * x - math.expm1(-h) * denoised


def slg_acts(i: int, steps: int) -> bool:
    """Whether skip-layer guidance acts at step i of `steps`: inside SLG_WINDOW, as in both references."""
    return SLG_WINDOW[0] * steps < i < SLG_WINDOW[1] * steps


@torch.no_grad()
def denoise(model: MMDiT, x: torch.Tensor, sigmas: torch.Tensor, cond, uncond=None, cfg: float = 1.0,
            sampler: str = "euler", slg_scale: float = 0.0, slg_layers=(),
            bar: tqdm | None = None) -> torch.Tensor:
    """Integrate the flow from sigmas[0] to 0. cond/uncond = (context, pooled); CFG runs both in one batch,
    skip-layer guidance adds a cond pass without `slg_layers` in the steps of SLG_WINDOW (1 %-20 %). `bar`
    counts each image's steps (generate's: one bar over all its batches). Under no_grad: no gradients."""
    check_choice("sampler", sampler, SAMPLERS)
    use_cfg = uncond is not None and cfg > 1.0        # as diffusers: cfg 0 (its Turbo recipe) is no CFG
    context, pooled = (torch.cat([u, c]) for u, c in zip(uncond, cond)) if use_cfg else cond
    steps, old_denoised, sigma_values = len(sigmas) - 1, None, sigmas.tolist()
    x = x.float()
    for i in range(steps):
        sigma = sigmas[i]
        batch = torch.cat([x, x]) if use_cfg else x         # (2B, 16, h, w) under CFG: uncond, then cond
        v = model(batch, (sigma * 1000).expand(batch.shape[0]), context, pooled).float()
        if use_cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + cfg * (v_cond - v_uncond)
            if slg_scale and slg_layers and slg_acts(i, steps):
                v_skip = model(x, (sigma * 1000).expand(x.shape[0]), *cond, skip_layers=tuple(slg_layers))
                v = v + slg_scale * (v_cond - v_skip.float())
        if sampler == "euler":
            x = x + (sigmas[i + 1] - sigma) * v
        else:
            denoised = x - sigma * v                        # the x0 estimate
            x, old_denoised = dpmpp_2m_step(x, denoised, old_denoised, sigma_values, i), denoised
        if bar is not None:
            bar.update(len(x))
    return x


def initial_noise(seeds: list[int], channels: int, height: int, width: int) -> torch.Tensor:
    """sd3_infer.py's noise for height x width px: float32, a CPU generator per seed: same on any device."""
    shape = (1, channels, height // 8, width // 8)
    # dtype and device named: under a caller's set_default_dtype/set_default_device the draws would differ
    return torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32,
                                  device="cpu") for s in seeds])


@dataclass
class SampleSettings:
    """Sampling parameters; None means the variant's preset."""
    steps: int | None = None
    cfg: float | None = None
    shift: float | None = None
    sampler: str | None = None
    schedule: str = "linear"
    slg_scale: float | None = 0.0          # off, as in both references; None = the variant's recommended one
    slg_layers: tuple[int, ...] | None = None
    width: int = 1024
    height: int = 1024
    seed: int = 0

    def resolved(self, variant: str, depth: int | None = None) -> "SampleSettings":
        """The settings that run on `variant` with `depth` joint blocks: the preset's skip layers past a
        smaller model's (7,8,9 of a tiny one) are left out, so that they are not recorded as having run."""
        check_choice("variant", variant, PRESETS)                  # e.g. pipe.variant set by hand
        preset = dataclasses.asdict(PRESETS[variant])
        out = dataclasses.replace(self, **{k: v for k, v in preset.items() if getattr(self, k) is None})
        check_skip_layer_guidance(out, variant, depth, layers_given=self.slg_layers is not None)
        out.slg_layers = tuple(i for i in out.slg_layers if depth is None or 0 <= i < depth)
        out.slg_scale = out.slg_scale if out.slg_layers else 0.0
        check_sample_settings(out)                  # sizes, step count, shift, finite scales, option names
        return out


def encode_in_batches(text: TextEncoders, prompts: list[str], negative: str, cfg: float, batch_size: int):
    """-> (cond, uncond), each (context, pooled), of batch_size prompts at a time, kept on the CPU until their
    batch denoises: T5-XXL on a whole chunk at once (generate's PROMPTS_AHEAD prompts, training's up to 100
    previews, kept for the run), and their embeddings, could fill a small GPU. uncond: None without CFG."""
    parts = [[t.cpu() for t in text.encode(prompts[i:i + batch_size])]
             for i in range(0, len(prompts), batch_size)]
    cond = tuple(torch.cat(tensors) for tensors in zip(*parts))
    if cfg <= 1.0:
        return cond, None
    negative_rows = text.encode([negative])         # encoded once (not per prompt), a view of it per prompt
    return cond, tuple(t.cpu().expand(len(prompts), *t.shape[1:]) for t in negative_rows)


@torch.no_grad()
def generate(pipe: Pipeline, prompts: list[str], negative: str = "", settings: SampleSettings | None = None,
             embeddings=None, progress: bool = True, batch_size: int = 1, keep=None) -> list:
    """Prompts -> PIL images (image i: seed + i), encoded and denoised batch_size at a time; keep(images)
    gets each batch's as it is done, instead of the list returned (sample.py saves them: a Ctrl-C keeps them,
    and 10,000 prompts take no more memory than 100). `embeddings` = (cond, uncond) skips the text encoders.
    The MMDiT in eval mode (the caller's after), under no_grad."""
    from PIL import Image
    # every argument checked (a notebook's too), one prompt made a list, settings resolved with the preset
    prompts, s, batch_size = read_generate_inputs(pipe, prompts, negative, settings, embeddings, batch_size,
                                                  keep, progress)
    if not prompts:                                     # (the tokenizers fail on an empty batch)
        return []
    check_image_fits(pipe.mmdit, s.height, s.width)                   # too large: fail before allocating
    if embeddings is None:
        warn_prompts(pipe.text, prompts, negative, s.cfg)
    sigmas = get_schedule(s.steps, s.shift, s.schedule).to(pipe.device)
    bar = tqdm(total=len(prompts) * s.steps, desc=f"denoising {counted(len(prompts), 'image')}",
               disable=not progress)
    done = []
    # batch by batch: the seeds and the embeddings (encoded a chunk ahead), the models placed for them
    batches = embedded_batches(pipe, prompts, negative, s, embeddings, batch_size)
    with bar, contextlib.closing(batches), in_eval_mode(pipe.mmdit):    # closing: an error puts models back
        for seeds, c, u in batches:
            x = initial_noise(seeds, pipe.mmdit.cfg.in_channels, s.height, s.width).to(pipe.device)
            with pipe.on_device(pipe.mmdit):
                z = denoise(pipe.mmdit, x, sigmas, c, u, s.cfg, s.sampler, s.slg_scale, s.slg_layers, bar)
            with pipe.on_device(pipe.vae):                 # one image at a time: VAE activations are large
                images = torch.cat([pipe.vae.decode(latent[None]) for latent in z])   # (B, 3, H, W), [-1, 1]
            if not images.isfinite().all():                # one check per batch, not per sampling step
                raise nan_images_error(pipe, text_encoded=embeddings is None)
            arrays = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
            images = [Image.fromarray(a) for a in arrays.cpu().numpy()]         # rounded as diffusers does
            if keep:                                       # saved by the caller: none held here
                keep(images)
            else:
                done += images
    return done


#################################################################################
#                                      Data                                     #
#################################################################################

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def load_image(path: Path, size: tuple[int, int], data: bytes | None = None) -> torch.Tensor:
    """Centre-crop to the aspect of `size` (width, height), then resize -> (3, H, W) in [-1, 1]. From `data`,
    the file's bytes, if given."""
    from PIL import Image, ImageOps
    with open_image(path, data) as im:
        im = ImageOps.fit(as_rgb(im, path), size, Image.BICUBIC)    # crop and resize: one resampling step
        pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size[1], size[0], 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1


def scan_dataset(cfg: DatasetConfig, output_dir: str = "") -> list[dict]:
    """Images, searched recursively but outside the run's own folders, with captions and aspect bucket."""
    cfg = DatasetConfig(path=os.fspath(cfg)) if isinstance(cfg, (str, os.PathLike)) else cfg    # a folder
    root, res = Path(cfg.path), cfg.resolution
    files, left_out = files_under(root)
    captions = caption_files(files)
    own = runs_folders(root, files, output_dir, cfg.cache_dir)         # their previews are no training data
    found = sorted(p for p in files if p.suffix.lower() in IMAGE_EXTS)
    # realpath, not Path.resolve: that raises on a link that loops (a broken image)
    paths = [p for p in found if not any(map(Path(os.path.realpath(p)).is_relative_to, own))]
    # aspect buckets (width, height): multiples of 64, area close to resolution^2, aspect up to 4:1
    sides = [(w, res * res // w // 64 * 64) for w in range(64, 4 * res + 1, 64)]
    buckets = [(w, h) for w, h in sides if h >= 64 and max(w / h, h / w) <= 4]
    items, odd = [], {kind: [] for kind in ("broken", "uncaptioned", "empty", "large", "small", "cropped")}
    decoded = read_scan_memo(cfg.cache_dir)             # images earlier scans decoded, by path, size, times
    for path in paths:
        try:
            width, height = image_size(path, decoded)   # decodes (broken files fail) if not remembered
        except TooLarge as e:
            odd["large"].append(str(e))
            continue
        except Exception as e:
            odd["broken"].append(f"{path.name} ({type(e).__name__})")
            continue
        caption, caption_file = read_caption(path, captions)       # None: no caption file
        bucket = min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(width / height)))
        note_odd_image(odd, path, caption, caption_file, (width, height), bucket)
        caption = cfg.default_caption if caption is None else caption
        items.append({"path": path, "caption": caption, "size": bucket})
    write_scan_memo(cfg.cache_dir, decoded)
    dataset_warnings(cfg, files, paths, **odd)
    dataset_summary(root, items, len(found) - len(paths), left_out)     # or an error if nothing is usable
    return items


class LatentDataset:
    """VAE moments and text embeddings per image, cached on disk (~5 MB per 1024 px image; keyed by content
    and every setting that changes them) and read back per batch: RAM does not grow with the dataset."""

    def __init__(self, items: list[dict], pipe: Pipeline, cfg: Config, model: str):
        rank, world = rank_and_world()
        self.pipe, self.flip, self.cache_dir = pipe, cfg.dataset.flip, Path(cfg.dataset.cache_dir)
        self.store = functools.partial(cache_share, rank=rank, world=world)    # torchrun: one writer per file
        vae_id = _digest(_weights_digest(pipe.vae), cfg.dtype, json.dumps(dataclasses.asdict(pipe.vae.cfg)),
                         "crop-then-resize", "alpha-on-white")  # load_image's recipe: another's cache unused
        text_id = _digest(model, cfg.text_encoders, cfg.dtype, cfg.t5_length, cfg.use_t5, pipe.text.files)
        self.vae_id, self.text_id = vae_id, text_id         # in the cache keys: what changes the tensors
        self.latent_files, self.sizes, contents = [], [item["size"] for item in items], []
        if rank == 0:           # tokenizers alone: said before the images encode (hours on a first run)
            warn_cut(pipe.text, [item["caption"] for item in items], "captions")
        # one model at a time on the GPU: T5 (9 GiB) beside the VAE's encoding would overflow a 12 GB card
        with pipe.on_device(pipe.vae):
            for item in tqdm(items, desc="caching latents", leave=False, disable=rank > 0):
                latent_file, image_hash = self.latent_file(item["path"], item["size"])
                self.latent_files.append(latent_file)
                contents.append(_digest(item["caption"], after=image_hash))
        self.contents = _digest(*contents)          # the images and captions: a resume notes their edits
        with pipe.on_device(*pipe.text.modules()):
            self.no_caption = self.encode_caption("")       # what caption dropout trains on: encoded once
            caption_file = functools.cache(self.caption_file)   # a trigger word's file: read once
            self.text_files = [caption_file(item["caption"])
                               for item in tqdm(items, desc="caching text", leave=False, disable=rank > 0)]
            self.empty = caption_file("")
        if world > 1:
            collective(dist.barrier)                           # the cache is complete
            check_cache_shared(self.latent_files + self.text_files, rank, world)

    def latent_file(self, path: Path, size: tuple[int, int]):    # -> its cache file, the hash of its bytes
        data = None                         # models load (minutes) after the scan: files may change
        try:
            data = path.read_bytes()        # the key's bytes are decoded: no edit slips in between
            image_hash = hashlib.sha256(data)       # hashed once: for the key and the contents
            key = _digest(size, self.flip, self.vae_id, after=image_hash)
            shape = (2 * self.pipe.vae.cfg.latent_channels, size[1] // 8, size[0] // 8)
            layout = {name: (shape, torch.float32) for name in ("moments", "flipped")[:1 + self.flip]}
            file = self.store(self.cache_dir / "latents" / f"{key}.safetensors",
                              lambda: self.encode_image(path, size, data), str(path), layout)
        except (OSError, TooLarge) as e:            # own: met decoding this process's share of the cache
            raise image_gone(path, e, own=data is not None, cache=self.cache_dir) from None
        return file, image_hash

    @torch.no_grad()
    def encode_image(self, path: Path, size: tuple[int, int], data: bytes) -> dict:
        pixels = load_image(path, size, data)[None].to(self.pipe.device)
        versions = {"moments": pixels, **({"flipped": pixels.flip(-1)} if self.flip else {})}
        return {name: self.pipe.vae.encode_moments(p)[0].cpu() for name, p in versions.items()}

    def caption_file(self, caption: str) -> Path:
        path = self.cache_dir / "text" / f"{_digest(caption, self.text_id)}.safetensors"
        layout = {name: (t.shape, t.dtype) for name, t in self.no_caption.items()}     # every caption's
        return self.store(path, lambda: (self.encode_caption(caption) if caption else self.no_caption),
                          f"the caption {caption!r:.60}", layout)

    def encode_caption(self, caption: str) -> dict:       # in the MMDiT's compute dtype (bf16 halves them)
        embeddings = zip(("context", "pooled"), self.pipe.text.encode([caption]))
        return {name: t[0].to(self.pipe.mmdit.compute_dtype).cpu() for name, t in embeddings}

    def batches(self, batch_size: int, epoch_seed: int) -> list[list[int]]:
        """One epoch: indices shuffled within each bucket, cut into batches, batches shuffled."""
        g = torch.Generator().manual_seed(epoch_seed % 2**64)
        buckets = {}
        for i in torch.randperm(len(self.sizes), generator=g).tolist():
            buckets.setdefault(self.sizes[i], []).append(i)
        batches = [ids[j:j + batch_size] for ids in buckets.values() for j in range(0, len(ids), batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def get(self, ids: list[int], vae: VAE, cfg: Config, g: torch.Generator, keep: slice = slice(None)):
        """-> latents (b, 16, h, w), context (b, L, 4096), pooled (b, 2048) of ids[keep], with flips, caption
        dropout and posterior noise drawn from g for all of ids: any slice sees what the whole batch would."""
        flip = ((torch.rand(len(ids), generator=g) < 0.5) & cfg.dataset.flip)[keep].tolist()
        drop = (torch.rand(len(ids), generator=g) < cfg.dataset.caption_dropout)[keep].tolist()
        moments = torch.stack([load_tensors(self.latent_files[i], "flipped" if f else "moments")[0]
                               for i, f in zip(ids[keep], flip)])
        noise = torch.randn((len(ids), moments.shape[1] // 2, *moments.shape[2:]), generator=g)[keep]
        embeds = [load_tensors(self.empty if d else self.text_files[i], "context", "pooled")
                  for i, d in zip(ids[keep], drop)]
        context, pooled = (torch.stack(tensors) for tensors in zip(*embeds))
        return vae.latents_from_moments(moments, noise=noise), context, pooled


#################################################################################
#                                    Training                                   #
#################################################################################

def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup (step 0 at lr / warmup_steps; diffusers' at 0), then constant or cosine decay to zero."""
    check_choice("lr_schedule", cfg.lr_schedule, LR_SCHEDULES)
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr


class Trainer:
    """The loop's state: pipeline, LoRA parameters, optimizer, output folder (Part 2 checks and saves it)."""

    def __init__(self, cfg: Config, resume: bool = False):
        self.cfg = cfg = validate(cfg)          # a Config made in Python too: checked and read as a file's
        self.out = Path(cfg.output_dir)
        tc, s, lc = cfg.train, cfg.sample, cfg.lora
        self.state_path, self.log_path = self.out / STATE_FILE, self.out / "log.jsonl"
        self.changes, header = refuse_early(self, resume)         # header: the state file's, read once
        self.stop: list[int] = []       # signals train() caught (Ctrl-C, SIGTERM): it stops after the step
        items = scan_dataset(cfg.dataset, cfg.output_dir)   # after the quick refusals: it decodes images
        self.rank, self.world = init_distributed(cfg, [item["size"] for item in items], header)
        pipe = load_pipeline(cfg.model, cfg.text_encoders or None, cfg.vae or None, cfg.device, cfg.dtype,
                             cfg.t5_length, cfg.use_t5, cfg.variant, offload=True, fp8=cfg.fp8)
        self.pipe, self.model_id = pipe, model_id(pipe.root)
        settings = SampleSettings(s.sample_steps or None, s.guidance_scale or None, s.shift or None,
                                  s.sampler or None, width=s.width, height=s.height, seed=s.seed)
        self.sample_settings = settings.resolved(pipe.variant, pipe.mmdit.cfg.depth)
        refuse_what_the_model_cannot_take(pipe.mmdit, cfg, items)       # before the caching (minutes)
        # a caller's autocast (a notebook cell's) would change what is cached
        with torch.autocast(pipe.device.type, enabled=False):
            self.data = LatentDataset(items, pipe, cfg, cfg.model)      # one model at a time on the GPU
            guidance, prompts = self.sample_settings.cfg, s.prompts
            with pipe.on_device(*pipe.text.modules() if prompts else ()):   # a second visit: seconds
                if self.rank == 0 and prompts:
                    warn_prompts(pipe.text, prompts, s.neg, guidance, previews=True)
                self.embeddings = (encode_in_batches(pipe.text, prompts, s.neg, guidance, 1)
                                   if prompts else (None, None))          # sample prompts, encoded once
        pipe.text, pipe.offload = None, False             # text encoders no longer needed; the rest stays put
        gc.collect()    # freed now: a cycle that transformers' first import left holds load_pipeline's frame
        self.mmdit = pipe.mmdit.to(pipe.device)
        torch.manual_seed(tc.seed)                                 # LoRA init (and dropout) follow train.seed
        self.params = add_lora(self.mmdit, lc.rank, lc.alpha, lc.targets, lc.blocks, lc.dropout)
        self.mmdit.enable_gradient_checkpointing(tc.gradient_checkpointing).train()     # LoRA dropout on
        if tc.compile:
            self.mmdit.compile_blocks()
        # fused: 2 ops a step; unfused, the CPU runs ~10 ops per parameter, CUDA ~10 per step (foreach)
        fused = pipe.device.type in ("cpu", "cuda")
        self.opt = torch.optim.AdamW(self.params, tc.lr, weight_decay=tc.weight_decay, fused=fused)
        self.step = load_training_state(self.state_path, self.params, self.opt, header) if resume else 0
        note_resume(self, header)
        self.autocast = None if self.mmdit.compute_dtype == torch.float32 else self.mmdit.compute_dtype
        self.global_batch = tc.batch_size * tc.grad_accum * self.world
        self.epoch, self.order = 0, self.data.batches(self.global_batch, tc.seed)   # epoch 0's batches

    def forward_backward(self, stopping: bool) -> torch.Tensor:
        """Gradients of this process's slices of the step's global batch, then (summed over the processes) of
        the whole batch. -> [loss, sigma sum, stop flag, unweighted MSE sums by sigma bin, counts by bin]"""
        tc, n_bins, size = self.cfg.train, self.cfg.train.loss_bins, self.cfg.train.batch_size
        # an epoch's batch order is drawn once (not per step); its length depends only on the buckets
        epoch, nth = divmod(self.step, len(self.order))
        if epoch != self.epoch:
            self.epoch, self.order = epoch, self.data.batches(self.global_batch, tc.seed + epoch)
        ids = self.order[nth]
        sums = torch.tensor([0.0, 0.0, float(stopping)] + [0.0] * 2 * n_bins)    # one tensor: one all-reduce
        if self.world > 1:                          # LoRA dropout: own masks per process, resumable
            torch.manual_seed(hash((tc.seed, self.step, self.rank)) % 2**63)
        for start in range(self.rank * size, len(ids), self.world * size):  # up to grad_accum micro-batches
            keep = slice(start, start + size)       # this process's; a bucket's last batch can be short
            # the global batch's draws (sigmas, noise, flips, caption dropout) from (seed, step): resumable
            g = torch.Generator().manual_seed((tc.seed * 1_000_003 + self.step) % 2**64)
            batch = [t.to(self.pipe.device) for t in self.data.get(ids, self.pipe.vae, self.cfg, g, keep)]
            loss, per_sample, sigmas = flow_matching_loss(self.mmdit, *batch, tc, self.sample_settings.shift,
                                                          g, self.autocast, keep, len(ids))
            loss.backward()
            sigma_bin = (sigmas.cpu() * n_bins).long().clamp(max=n_bins - 1)       # sigma 1: the last bin
            sums[:2] += torch.tensor([loss.item(), sigmas.sum().item()])
            loss_sums = sigma_bin.bincount(weights=per_sample.cpu(), minlength=n_bins)
            sums[3:] += torch.cat([loss_sums, sigma_bin.bincount(minlength=n_bins)])
        return all_reduce_step(self.params, sums) if self.world > 1 else sums

    def log(self, loss: float, lr: float, grad_norm: float, sigma: float):
        """One line of log.jsonl per step (process 0)."""
        if self.rank == 0:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                    "sigma": sigma, "time": time.time()}) + "\n")

    def every_or_last(self, n: int) -> bool:            # checkpoints and samples (n = 0: at the last only)
        return n > 0 and self.step % n == 0 or self.step == self.cfg.train.steps

    def save_and_sample(self, bins: torch.Tensor):
        """A checkpoint every save_every steps; samples and the MSE by sigma bin every sample_every."""
        k = self.cfg.train.loss_bins
        if self.every_or_last(self.cfg.train.save_every):
            save_checkpoint(self)
        if self.every_or_last(self.cfg.sample.sample_every):
            means = [f"{s / n:.4f}" if n else "-" for s, n in bins.T.tolist()]
            samples = counted(int(bins[1].sum()), "sample")
            tqdm.write(f"loss by sigma bin ({samples} since the last report or resume): "
                       + "  ".join(f"[{i / k:.1f},{(i + 1) / k:.1f}) {m}" for i, m in enumerate(means)))
            bins.zero_()                                    # the next report covers the steps after this one
            save_previews(self)


@torch.inference_mode(False)            # gradients on, where a notebook turned them off or ran inference_mode
def train(cfg: Config, resume: bool = False) -> Path:
    """The training loop. Returns the path of the final LoRA."""
    tr = start_trainer(cfg, resume)
    tc = tr.cfg.train
    bins = torch.zeros(2, tc.loss_bins)                 # per sigma bin: unweighted MSE sums, sample counts
    old_handlers = handle_signals(lambda signum, _: tr.stop.append(signum))   # before the step-0 previews too
    try:
        tr.bar = bar = tqdm(total=tc.steps, initial=tr.step, desc="training", dynamic_ncols=True,
                            disable=tr.rank > 0)        # end_training closes it, after an error too
        if tr.step == 0 or previews_unfinished(tr):
            save_previews(tr)       # a baseline before any update, or those a stop at a sample step skipped
        if tr.stop and tr.world == 1 and tr.step < tc.steps:    # during those previews: stop before training
            raise KeyboardInterrupt                     # (torchrun: after the next step, which all agree on)
        while tr.step < tc.steps:
            tr.opt.param_groups[0]["lr"] = lr = get_lr(tr.step, tc)     # one parameter group: the LoRA
            sums = tr.forward_backward(bool(tr.stop))
            # one process: a signal in this step stops after it; torchrun: after the next, which all agree on
            total, stopping = sums[0].item(), sums[2].item() > 0 or (tr.world == 1 and bool(tr.stop))
            # clip (max_grad_norm 0 = off); a diverged run stops here, the last checkpoint on disk intact
            grad_norm = torch.nn.utils.clip_grad_norm_(tr.params, tc.max_grad_norm or math.inf).item()
            if not (math.isfinite(total) and math.isfinite(grad_norm)):
                raise diverged(tr, total, grad_norm)
            tr.opt.step()
            tr.opt.zero_grad(set_to_none=True)
            tr.step += 1
            bins += sums[3:].view(2, -1)
            tr.log(total, lr, grad_norm, sigma=sums[1].item() / sums[3 + tc.loss_bins:].sum().item())
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}")
            if stopping and tr.step < tc.steps:         # Ctrl-C or SIGTERM in any process: all stop here
                raise KeyboardInterrupt                 # (after the last step: the run ends as usual)
            tr.save_and_sample(bins)                    # checkpoint, then samples and the MSE by sigma bin
        if tr.world > 1:                            # the others wait for process 0's last files (a signal
            collective(dist.barrier)                # now: the run has ended, as after the last step)
    except (KeyboardInterrupt, BrokenPipeError):    # Ctrl-C, SIGTERM, or stdout's reader gone (`| head`):
        stop_with_checkpoint(tr, terminated=signal.SIGTERM in tr.stop)  # a checkpoint, then main's exit code
    except (RuntimeError, MemoryError) as e:        # out of memory: a checkpoint of the last step, advice
        if not out_of_memory(e):
            raise                                   # any other error: its own traceback
        raise stopped_by_memory(tr, e)
    finally:
        end_training(tr, old_handlers)
    return tr.out / "lora.safetensors"


#################################################################################
#                                Part 2: plumbing                               #
#      The method ends above: a reader can stop here. Below: checkpoint and     #
#     LoRA file formats, downloads, fp8, config files, torchrun glue, the CLI.  #
#################################################################################


#################################################################################
#                         Checkpoint Formats and Loading                        #
#################################################################################

# Official module name (inside `joint_blocks.{i}.`) -> diffusers name (inside `transformer_blocks.{i}.`).
# One table serves weight conversion both ways and LoRA files of both layouts; a fused qkv maps to three.
BLOCK_NAMES = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block.attn.proj": "attn.to_out.0",
    "x_block.attn.ln_q": "attn.norm_q",
    "x_block.attn.ln_k": "attn.norm_k",
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block.attn2.proj": "attn2.to_out.0",
    "x_block.attn2.ln_q": "attn2.norm_q",
    "x_block.attn2.ln_k": "attn2.norm_k",
    "x_block.adaLN_modulation.1": "norm1.linear",
    "x_block.mlp.fc1": "ff.net.0.proj",
    "x_block.mlp.fc2": "ff.net.2",
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block.attn.proj": "attn.to_add_out",
    "context_block.attn.ln_q": "attn.norm_added_q",
    "context_block.attn.ln_k": "attn.norm_added_k",
    "context_block.adaLN_modulation.1": "norm1_context.linear",
    "context_block.mlp.fc1": "ff_context.net.0.proj",
    "context_block.mlp.fc2": "ff_context.net.2",
}
TOP_NAMES = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}


def diffusers_names(depth: int) -> dict[str, tuple[str, ...]]:
    """Official module name -> its diffusers module name(s), for a model of `depth` joint blocks."""
    names = {k: (v,) for k, v in TOP_NAMES.items()}
    for i in range(depth):
        for official, ours in BLOCK_NAMES.items():
            parts = ours if isinstance(ours, tuple) else (ours,)
            names[f"joint_blocks.{i}.{official}"] = tuple(f"transformer_blocks.{i}.{p}" for p in parts)
    return names


def swap_modulation(t: torch.Tensor, official_name: str, depth: int) -> torch.Tensor:
    """diffusers stores two modulations as (scale, shift), the official files as (shift, scale): their halves
    swapped (the same swap converts either way); the tensors of any other module as they are."""
    if official_name not in ("final_layer.adaLN_modulation.1",
                             f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1"):
        return t
    return torch.cat(t.chunk(2)[::-1])


def mmdit_from_diffusers(sd: dict, depth: int) -> dict:
    """diffusers `transformer/` state dict -> official names (qkv fused, the two swaps undone)."""
    sd = dict(sd)
    out = {"pos_embed": sd.pop("pos_embed.pos_embed")} if "pos_embed.pos_embed" in sd else {}
    for official, parts in diffusers_names(depth).items():
        for p in ("weight", "bias"):
            tensors = [sd.pop(f"{name}.{p}") for name in parts if f"{name}.{p}" in sd]
            if tensors:
                t = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
                out[f"{official}.{p}"] = swap_modulation(t, official, depth)
    if sd:
        raise UserError(f"unexpected keys in the diffusers transformer weights: {sorted(sd)[:5]}")
    return out


# diffusers `vae/` names -> official (SAI/LDM) names; the decoder's up blocks are numbered in reverse.
VAE_RENAMES = [
    (r"\.conv_norm_out\.", ".norm_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.", r"decoder.up.{\1}.block."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", r"decoder.up.{\1}.upsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
    (r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1."),
    (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
]


def vae_from_diffusers(sd: dict) -> dict:
    levels, out = _block_count(sd, "decoder.up_blocks."), {}
    for key, tensor in sd.items():
        for pattern, repl in VAE_RENAMES:
            key = re.sub(pattern, repl, key)
        key = re.sub(r"\{(\d+)\}", lambda m: str(levels - 1 - int(m.group(1))), key)
        if ".attn_1." in key and key.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]                     # Linear -> 1x1 conv
        out[key] = tensor
    return out


OTHER_MODELS = [  # key fragment -> what a file holding it is: the networks of other models (their LoRAs too)
    ("double_blocks.", "a FLUX transformer"), ("single_transformer_blocks.", "a FLUX transformer"),
    ("single_blocks.", "a FLUX transformer"),                   # a LoRA of single blocks alone (kohya's)
    ("input_blocks.", "an SD1.x/SDXL UNet"), ("output_blocks.", "an SD1.x/SDXL UNet"),
    ("down_blocks.1.attentions.", "a diffusers UNet (SD1.x/SDXL)")]
# the MMDiT's ahead of the VAE's and the text encoders': a whole checkpoint holds them too
CHECKPOINT_SIGNATURES = [("lora_", "a LoRA (load it with --lora)"), *OTHER_MODELS,
    ("joint_blocks.", "an SD3 MMDiT"), ("transformer_blocks.", "a diffusers transformer"),
    ("text_model.", "a CLIP text encoder"), ("encoder.block.", "a T5 text encoder"), ("decoder.up", "a VAE"),
    ("resblocks.", "an OpenCLIP text encoder (open_clip's names: use one with transformers' names, as "
                   "Stability AI's clip_g.safetensors)"),
    ("rng.cpu", "a training state (for --resume): its LoRA is lora.safetensors in the same folder")]


def checkpoint_kind(keys, signatures=CHECKPOINT_SIGNATURES) -> str | None:
    """What a file holding `keys` is by `signatures` ("." matches kohya LoRA names' "_" too), or None."""
    return next((kind for fragment, kind in signatures if any(re.search(fragment, k) for k in keys)), None)


def describe_checkpoint(keys, signatures=CHECKPOINT_SIGNATURES) -> str:
    """checkpoint_kind by `signatures` in words, or the first keys where none fits."""
    what, first = checkpoint_kind(keys, signatures), f"its first keys are {sorted(keys)[:3]}"
    return f"it looks like {what}" if what else first if keys else "it holds no tensors"


def file_path(path, what: str) -> Path:
    """`path` (str or Path) as a Path; None or an open file is a one-line error, not pathlib's TypeError."""
    if not isinstance(path, (str, os.PathLike)):
        raise UserError(f"give the path of {what} (str or Path), not {path!r:.60}")
    return Path(path)


def check_utf8_path(path, what: str = ""):
    """safetensors opens no path of bytes that are not UTF-8 (held by Python as lone surrogates). `what`: the
    key, as errors name it."""
    if LONE_SURROGATE.search(str(path)):
        raise UserError(f"{what}{str(path)!r} is not UTF-8 (bytes of another encoding), which safetensors "
                        f"cannot open: rename it, or the folder holding it, in UTF-8")


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")     # never read, never downloaded


def read_safetensors(path: str | Path, with_metadata: bool = False, prefix: str | None = "", convert=None):
    """The file's tensors named `prefix`* (stripped; only those are read; None: none, all names mapped to
    None), each through `convert(name, tensor)`, and with_metadata its metadata; what is wrong with the file:
    a UserError."""
    path = file_path(path, "a .safetensors file")
    if path.is_dir():                                   # e.g. a training run's folder given as the LoRA
        inside = sorted(p.name for p in path.glob("*.safetensors"))
        example = f" in it, e.g. {inside[0]}" if inside else ""
        raise UserError(f"{path} is a folder: give a .safetensors file{example}")
    if path.is_symlink() and not path.exists():         # e.g. a hub cache's snapshot copied without its blobs
        raise UserError(f"{path} is a link to a missing file ({os.readlink(path)}): copy the files "
                        f"themselves (cp -L), or download again")
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"{path}: pickle files can run code, so only .safetensors is read: use that release")
    check_utf8_path(path)               # else safetensors' error, read as a damaged file's
    try:
        with safe_open(str(path), framework="pt") as f:
            names = {k[len(prefix):]: k for k in f.keys() if prefix is not None and k.startswith(prefix)}
            sd = {n: convert(n, f.get_tensor(k)) if convert else f.get_tensor(k) for n, k in names.items()}
            sd = dict.fromkeys(f.keys()) if prefix is None else sd      # None: the header's names alone
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for truncated or foreign files
        if re.search("header ?too ?large", str(e), re.I):  # a header length no cut-short download has (<0.6:
            with open(path, "rb") as f:             # HeaderTooLarge): text, e.g. the ~130-byte pointers of a
                if f.read(23) == b"version https://git-lfs":    # hub repo cloned without git-lfs
                    raise UserError(f"{path} is a git-lfs pointer, not the file (cloned without git-lfs?): "
                                    f"run `git lfs pull` in the clone, or `hf download` it") from None
            raise UserError(f"{path} is no .safetensors file: a renamed .ckpt/.pt (pickles can run code: "
                            f"never read) or a web page saved by a failed download? get the file") from None
        raise UserError(f"{path} is not a readable .safetensors file ({str(e).splitlines()[0][:120]}); "
                        f"a truncated download? download it again") from None
    return (sd, meta) if with_metadata else sd


def read_weights_dir(folder: Path, stem: str, convert=None) -> dict:
    """Weights of a diffusers component: `stem.safetensors` or the shards in `stem.safetensors.index.json`."""
    return {k: v for file in weight_files(folder, stem) if file.suffix == ".safetensors"
            for k, v in read_safetensors(file, convert=convert).items()}


def weight_files(folder: Path, stem: str) -> list[Path]:
    """`stem.safetensors` or its shard index and shards, else the fp16 variant's (a variant="fp16" save)."""
    for variant in ("", ".fp16"):
        if os.path.lexists(folder / f"{stem}{variant}.safetensors"):  # a folder or dead link: named when read
            return [folder / f"{stem}{variant}.safetensors"]
        index = folder / f"{stem}.safetensors.index{variant}.json"
        if index.is_file():
            try:                                                # TypeError: a shard named by a number
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
                if any(Path(shard).name != shard or not shard.endswith(".safetensors") for shard in shards):
                    raise ValueError("shards must be .safetensors files beside it")   # ../, /, or a pickle
                return [index, *(folder / shard for shard in shards)]
            except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
                raise UserError(f"cannot read {index} as a shard index ({type(e).__name__}: {e}): download "
                                f"it again") from None
    found = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
    raise UserError(f"no {stem}.safetensors in {folder} (has {found[:5]}); only safetensors weights are read")


def _part_config(path: Path, part: str, class_name: str) -> tuple[Path, dict]:
    """(the folder, its config.json) of a diffusers root's `part`/ or that folder; another model's refused."""
    folder = path / part if (path / part).is_dir() else path
    if folder == path and (path / "model_index.json").is_file():       # a diffusers root: not the part's own
        unet = " (a UNet model's, e.g. SDXL's, has none: give an SD3 model)" * (part == "transformer")
        raise UserError(f"{path} has no {part}/ folder: an incomplete download? download it again{unet}")
    file = folder / "config.json"
    try:
        config = dict(json.loads(file.read_text(encoding="utf-8"))) if file.is_file() else {}
    except (OSError, ValueError, TypeError, RecursionError) as e:     # (json recurses per nesting level)
        raise UserError(f"cannot read {file} as a JSON object ({e}): download it again") from None
    if config.get("_class_name", class_name) != class_name:      # before reading gigabytes of another model
        above = folder == path and (path.parent / "model_index.json").is_file()    # e.g. --model ROOT/vae
        fix = (f"give the diffusers folder above it, {path.parent}" if above else "give the right folder "
               "(--model, or --vae for the VAE; in a config: model, vae)")
        raise UserError(f"{folder}'s config.json names {config['_class_name']}, not the {class_name} needed "
                        f"here: {fix}")
    # FLUX.1's VAE has SD3's names and shapes (a single file cannot be told apart); a folder's config.json can
    sd3, names = (VAEConfig.scaling_factor, VAEConfig.shift_factor), ("scaling_factor", "shift_factor")
    given = tuple(v if config.get(k) is None else config[k] for k, v in zip(names, sd3))     # VAEs' keys only
    if not all(type(g) in (int, float) and math.isclose(g, v, rel_tol=1e-3) for g, v in zip(given, sd3)):
        raise UserError(f"{path}: its config.json gives the latent scale and shift {given}, SD3's VAE "
                        f"{sd3}: another model's VAE (FLUX.1's: (0.3611, 0.1159))? use SD3's")
    return folder, config


def _read_part(path: Path, part: str, class_name: str, prefix: str, convert=None) -> tuple[dict, dict]:
    """(weights, checked config.json) of a diffusers root's `part`/ or that folder; a file: (tensors, {})."""
    if not path.is_dir():
        sd = read_safetensors(path, prefix=prefix, convert=convert)
        return sd or read_safetensors(path, convert=convert), {}   # none under `prefix`: a file of this part
    folder, config = _part_config(path, part, class_name)
    return read_weights_dir(folder, "diffusion_pytorch_model", convert), config


def _build(module_cls, cfg, sd: dict, what: str, path, device, dtype):
    """Build on meta, adopt the tensors cast to `dtype`, move; frozen: training adds its own LoRA layers."""
    with torch.device("meta"):
        model = module_cls(cfg)
    for name, tensor in sd.items():         # cast in place, one tensor at a time: never two copies in RAM
        if tensor.is_floating_point() and tensor.dtype != FP8:     # fp8 weights stay fp8 (see load_mmdit)
            sd[name] = tensor.to(dtype)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"{path}: {what} weights do not fit the detected architecture: "
                        f"{' '.join(str(e).splitlines()[1:]).strip()[:300] or e}") from None
    sd.clear()                                      # the model holds the last reference: quantizing frees
    return model.to(device).eval().requires_grad_(False)


def nan_advice(modules: list[nn.Module], otherwise: str) -> str:
    """What to do after a NaN/inf result: name a frozen weight holding NaN/inf, if any (looked for only now: a
    check while loading would cost seconds per gigabyte), else the usual advice `otherwise`. Trained weights
    are left out (NaN there is a diverged run's), and so is fp8 (no isfinite): its row scales show it."""
    for module in modules:
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            frozen = t.is_floating_point() and t.element_size() > 1 and not t.requires_grad
            if frozen and not t.isfinite().all():
                return (f"the weight {name} holds NaN/inf (a damaged model file, or a LoRA merged at too "
                        f"large a scale): download the model again, or lower the LoRA scale")
    return otherwise


def load_mmdit(path: str | Path, device="cpu", dtype=torch.float32, fp8: bool = False) -> MMDiT:
    """The transformer from a diffusers root folder, its `transformer/` folder, or a single .safetensors."""
    quantized = {}                      # fp8: matrices are quantized as they are read, never all in bf16
    sd, config = _read_part(file_path(path, "an MMDiT"), "transformer", "SD3Transformer2DModel",
                            "model.diffusion_model.",
                            functools.partial(_fp8_on_read, quantized) if fp8 else None)
    if "x_embedder.proj.weight" not in sd and "pos_embed.proj.weight" not in sd:
        raise UserError(f"{path} is not an SD3/SD3.5 checkpoint: {describe_checkpoint(sd)}")
    try:                                  # shapes and counts come from an untrusted header: check them first
        if "x_embedder.proj.weight" not in sd:                                   # diffusers names
            depth = _block_count(sd, "transformer_blocks.")
            sd = mmdit_from_diffusers(sd, depth)
            quantized = mmdit_from_diffusers(quantized, depth)     # row scales follow rows: qkv fused, swaps
        cfg = MMDiTConfig.from_state_dict(sd)
        if config:                # shapes show the head count only through qk_norm; config.json names it
            cfg = dataclasses.replace(cfg, depth=config["num_layers"], heads=config["num_attention_heads"])
        sizes = [v for v in dataclasses.astuple(cfg) if type(v) not in (bool, tuple)]  # but qk_norm, dual
        if (any(type(v) is not int or v < 1 for v in sizes) or cfg.hidden % cfg.heads      # 4.0: no model
                or cfg.depth != _block_count(sd, "joint_blocks.")):
            raise ValueError(f"sizes of no SD3 MMDiT: {cfg}")
    except (KeyError, ValueError, IndexError, TypeError, ZeroDivisionError) as e:
        raise UserError(f"{path}: bad SD3 MMDiT weights ({type(e).__name__}: {e}); download again") from None
    scales = {**_fp8_checkpoint(sd, fp8, dtype), **quantized}
    model = _build(MMDiT, cfg, sd, "MMDiT", path, "cpu" if fp8 else device, dtype)
    return quantize_mmdit(model, scales).to(device) if fp8 else model


def load_vae(path: str | Path, device="cpu", dtype=torch.float32) -> VAE:
    """The VAE from a diffusers root folder, its `vae/` folder, or an official single file."""
    sd, config = _read_part(file_path(path, "a VAE"), "vae", "AutoencoderKL", "first_stage_model.")
    names = {"groups": "norm_num_groups", "scaling_factor": "scaling_factor", "shift_factor": "shift_factor"}
    overrides = {k: config[d] for k, d in names.items() if config.get(d) is not None}
    if "decoder.conv_in.weight" not in sd:
        raise UserError(f"{path} holds no SD3 VAE ({describe_checkpoint(sd)}): pass --vae (config: vae)")
    _fp8_checkpoint(sd, False, dtype)                 # fp8 files: upcast (no fp8 convolutions), ints refused
    try:
        if any(k.startswith("decoder.up_blocks.") for k in sd):              # diffusers names
            sd = vae_from_diffusers(sd)
        cfg = VAEConfig.from_state_dict(sd, **overrides)
        sizes = (cfg.ch, cfg.num_res_blocks, cfg.latent_channels, cfg.groups, *cfg.ch_mult)
        if any(type(v) is not int or v < 1 for v in sizes) or cfg.ch % cfg.groups:  # groups 32.0: no model
            raise ValueError(f"sizes of no SD3 VAE: {cfg}")
    except (KeyError, ValueError, IndexError, TypeError, ZeroDivisionError) as e:
        raise UserError(f"{path}: bad SD3 VAE weights ({type(e).__name__}: {e}); download again") from None
    return _build(VAE, cfg, sd, "VAE", path, device, dtype)


# Text encoders as people have them. Key layouts, what files lack, sources: README, "Text encoder files".
TEXT_ENCODERS = {  # role: (diffusers subfolder, file name as distributed, a key only it has, its layers)
    "clip_l": ("text_encoder", r"clip.?l", "text_model.embeddings.token_embedding.weight",
               "text_model.encoder.layers."),
    "clip_g": ("text_encoder_2", r"clip.?g", "text_model.embeddings.token_embedding.weight",
               "text_model.encoder.layers."),
    "t5xxl": ("text_encoder_3", r"(?<!flan.)t5.?(v1_1.?)?xxl(?!.*flan)", "encoder.final_layer_norm.weight",
              "encoder.block.")}          # (FLAN-T5 has T5-XXL's names and shapes: another model)
PASS_TEXT_ENCODERS = ("pass --text-encoders DIR (config: text_encoders): clip_l, clip_g, t5xxl "
                      ".safetensors files or a diffusers-layout SD3.5 folder")


def _text_encoder(role: str, sd: dict, config, tok, path: Path, dtype: torch.dtype) -> nn.Module:
    """A transformers CLIP/T5 built on meta, adopting the tensors; a single file's config from its shapes."""
    import transformers
    other_half = ("vision_model.", "visual_projection.", "decoder.", "lm_head.")   # whole CLIP/T5 files: as
    sd = {k: v for k, v in sd.items()                                           # ComfyUI, the text part only
          if not k.endswith(("position_ids", "logit_scale")) and not k.startswith(other_half)}
    _fp8_checkpoint(sd, False, dtype)                                   # fp8 files: upcast, one at a time
    layers = _block_count(sd, TEXT_ENCODERS[role][3])
    if not layers or config and config.num_hidden_layers != layers:        # before a hostile count is built
        raise ValueError(f"weights of {counted(layers, 'layer')}, config of "
                         f"{getattr(config, 'num_hidden_layers', 0)}")
    rows = lambda name: sd[name].shape[0]
    if role == "t5xxl":                                                 # one tied tensor under both names
        embedding = sd.pop("encoder.embed_tokens.weight", None)
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"] = sd.get("shared.weight", embedding).to(dtype)
        buckets, heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
        config = config or transformers.T5Config(
            vocab_size=rows("shared.weight"), d_model=rows(TEXT_ENCODERS[role][2]), num_layers=layers,
            d_ff=rows("encoder.block.0.layer.1.DenseReluDense.wi_0.weight"), num_heads=heads,
            d_kv=rows("encoder.block.0.layer.0.SelfAttention.q.weight") // heads, layer_norm_epsilon=1e-6,
            relative_attention_num_buckets=buckets, feed_forward_proj="gated-gelu")
        t5 = _build(transformers.T5EncoderModel, config, sd, role, path, "cpu", dtype)
        for name, module in t5.named_modules():      # T5 v1.1's feed-forward outputs overflow fp16: as in
            if dtype == torch.float16 and name.endswith(".wo"):     # from_pretrained, they stay in fp32
                module.float()
        return t5
    vocab, width = sd[TEXT_ENCODERS[role][2]].shape
    # CLIP-L single files: SAI, ComfyUI and diffusers' converter apply no projection, even one the file has
    if role == "clip_l" and (not config or "text_projection.weight" not in sd):
        sd["text_projection.weight"] = torch.eye(width)
    if "text_projection.weight" not in sd:
        raise UserError(f"{path} has no text_projection.weight, which CLIP-G's pooled output goes through (a "
                        f"CLIP-L file?): use Stability AI's clip_g.safetensors")
    config = config or transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=width // 64,
        intermediate_size=rows("text_model.encoder.layers.0.mlp.fc1.weight"), layer_norm_eps=1e-5,
        projection_dim=rows("text_projection.weight"), hidden_act={"clip_g": "gelu"}.get(role, "quick_gelu"),
        max_position_embeddings=rows("text_model.embeddings.position_embedding.weight"),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    if config.max_position_embeddings < tok.model_max_length:          # a full-length prompt would overrun
        raise ValueError(f"{config.max_position_embeddings} positions, tokenizer's {tok.model_max_length}")

    def clip(cfg):                                                      # with the position ids no file holds
        model = transformers.CLIPTextModelWithProjection(cfg)
        positions = torch.arange(cfg.max_position_embeddings, device="cpu")[None]
        model.text_model.embeddings.register_buffer("position_ids", positions, persistent=False)
        return model
    return _build(clip, config, sd, role, path, "cpu", dtype)


def _transformers_names(sd: dict, key: str) -> dict:
    """`sd` without a prefix its `key` has (`model.`, an SD1 checkpoint's `cond_stage_model.transformer.`),
    ComfyUI's older CLIPSave `text_projection` (transposed) as the Linear's weight, as ComfyUI reads it."""
    prefix = "" if key in sd else next((k.removesuffix(key) for k in sd if k.endswith(f".{key}")), "")
    outer, _, inner = key.partition(".")    # the inner model saved alone (CLIP's text_model, T5's encoder)
    sd = {f"{outer}.{k}" if inner in sd else k.removeprefix(prefix): v for k, v in sd.items()}
    if "text_projection" in sd:
        sd["text_projection.weight"] = sd.pop("text_projection").T
    return sd


def _check_roles(weights: dict, picked: dict, source: Path):
    """Each file is the encoder its name says, whole, and CLIP-L and CLIP-G are not swapped."""
    for role, sd in weights.items():
        key, layers = TEXT_ENCODERS[role][2:]
        if any(k.startswith(layers) for k in sd) and key not in sd:
            raise UserError(f"{picked[role]} has {role}'s layers but no {key}: cut short? download it again")
        if key not in sd:
            problem = f"is not a {role} text encoder: {describe_checkpoint(sd)}" if sd else f"has no {role}"
            where = (f"looked for {role}*.safetensors or a diffusers-layout text_encoder*/" if source.is_dir()
                     else PASS_TEXT_ENCODERS)
            raise UserError(f"{picked[role]} {problem} ({where})"
                            + "; T5 may be skipped with --no-t5 (config: use_t5: false)" * (role == "t5xxl"))
    width = {r: (weights[r][TEXT_ENCODERS[r][2]].shape or (0,))[-1] for r in ("clip_l", "clip_g")}  # 0-dim: 0
    if width["clip_l"] > width["clip_g"]:       # swapped names: their pooled widths still add up to 2048
        raise UserError(f"{picked['clip_l']} is {width['clip_l']} wide, {picked['clip_g'].name} "
                        f"{width['clip_g']}: CLIP-L is the narrower (768; CLIP-G 1280): swap the two names")


def _file_id(path: Path, samples: int = 0) -> str:
    """Name, size and last MB of a file: a fine-tune swapped in under the same name differs there. No mtime:
    under torchrun across machines each has its own copy, and all must agree on the cache's file names.
    `samples`: also as many KiB spread over the file, at offsets hashed from the size (a copy's the same;
    not evenly spaced: the blocks repeat, and samples at even steps could all fall in one kind of layer)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        spread = []
        for start in sorted(int(_digest(size, i), 16) % (size + 1) for i in range(samples)):
            f.seek(start)
            spread.append(f.read(2**10))
        f.seek(max(0, size - 2**20))
        return _digest(path.name, size, *spread, f.read())


def model_id(root: Path | None) -> str:
    """Of the MMDiT's files under resolve_model's `root` (their _file_id: the same when moved or copied); ""
    for None (tiny, a hub id not downloaded). Recorded in the state: a resume knows a moved model by it."""
    files = [root] if root and root.is_file() else []                           # a single file
    if root and root.is_dir():
        folder = _part_config(root, "transformer", "SD3Transformer2DModel")[0]
        files = [*weight_files(folder, "diffusion_pytorch_model"), folder / "config.json"]   # config: heads
    # the last MB holds only the tensors last by name (an official file's y_embedder): a LoRA merged into the
    # attention (a fifth of the bytes) is missed by all 256 samples with odds 0.8**256 < 1e-24
    return _digest(*(_file_id(p, samples=256) for p in files if p.is_file())) if files else ""


def _from_pretrained_error(folder: Path, error: Exception, problem: str, fix: str) -> UserError:
    """A from_pretrained error as a UserError: its refusal of an auto_map's code, or `problem` and `fix`."""
    if "trust_remote_code" in str(error):
        return UserError(f"{folder} holds custom code (an auto_map in a text encoder or tokenizer config), "
                         f"which is never run: use a folder of the standard SD3.5 text encoders")
    return UserError(f"{folder}: {problem} ({' '.join(str(error).split())[:150]}): {fix}")


def check_pad_tokens(tokenizers, encoders: list[nn.Module]):
    """A padding id past the vocabulary (a hand-edited tokenizer) is refused: padding would index past it."""
    for tok, model in zip(tokenizers, encoders):
        if tok.pad_token_id >= model.get_input_embeddings().num_embeddings:
            raise UserError(f"{tok.name_or_path}: padding token {tok.pad_token!r} is past the text "
                            f"encoder's vocabulary: copy the tokenizer folders again from its download")


def load_text_encoders(source: str | Path, device="cpu", dtype=torch.float32, t5_length: int = T5_LENGTH,
                       use_t5: bool = True, context_dim: int = 4096) -> TextEncoders:
    """CLIP-L, CLIP-G, T5 and tokenizers from a diffusers-layout folder (text_encoder*/, tokenizer*/), a
    folder of single files (clip_l, clip_g, t5xxl_fp16/_fp8_e4m3fn .safetensors) or an all-in-one file."""
    import transformers
    source, roles = file_path(source, "text encoders"), ["clip_l", "clip_g", "t5xxl"][:2 + use_t5]
    if (source / "text_encoder").is_dir():
        picked = {r: source / TEXT_ENCODERS[r][0] for r in roles}
        weights = {r: read_weights_dir(p, "model") if p.is_dir() else {} for r, p in picked.items()}
        try:
            configs = {r: transformers.AutoConfig.from_pretrained(p, trust_remote_code=False)  # never ask to
                       for r, p in picked.items() if p.is_dir()}              # run a download's auto_map code
        except Exception as e:  # missing, cut short, of no model, a field's type (huggingface_hub error)
            raise _from_pretrained_error(source, e, "a text_encoder*/config.json is missing or damaged",
                                         "download it again") from None
    else:
        files = sorted(source.glob("*.safetensors"), key=lambda p: ("fp8" in p.name.lower(), p.name))
        picked = {r: next((p for p in files if re.search(rf"(?<![a-z]){TEXT_ENCODERS[r][1]}(?![a-z])",
                                                         p.name.lower())), source) for r in roles}
        weights, configs = {r: read_safetensors(p, prefix=f"text_encoders.{r}.transformer." * (p == source))
                            if p != source or p.is_file() else {} for r, p in picked.items()}, {}
    weights = {r: _transformers_names(sd, TEXT_ENCODERS[r][2]) for r, sd in weights.items()}
    _check_roles(weights, picked, source)
    folder = source if source.is_dir() else source.parent
    tokenizers = _tokenizers(folder, use_t5)
    try:
        encoders = [_text_encoder(r, weights.pop(r), configs.get(r), tok, picked[r], dtype).to(device)
                    if r in roles else None for r, tok in zip(TEXT_ENCODERS, tokenizers)]
    except UserError:
        raise
    except (KeyError, ValueError, IndexError, AttributeError, TypeError, ZeroDivisionError) as e:  # damaged
        raise UserError(f"{source}: bad text encoder weights ({type(e).__name__}: {e}); download them "
                        f"again") from None
    text = TextEncoders(*encoders, tokenizers, t5_length=t5_length, context_dim=context_dim)
    read = [file for p in picked.values()             # the files key the text cache, not the paths
            for file in ((*weight_files(p, "model"), p / "config.json") if p.is_dir() else (p,))]
    text.files = [_file_id(p) for p in [*read, *sorted(folder.glob("tokenizer*/*"))] if p.is_file()]
    return text


def pick_device(name: str = "auto", advice: str = "use --device cpu") -> torch.device:
    by_rank = name in ("auto", "cuda") and under_torchrun() and torch.cuda.is_available()
    if by_rank:
        name = f"cuda:{local_rank()}"                        # torchrun: one GPU per process
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    count = {"cpu": 1, "cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}
    try:
        device = torch.device(name)
        available = count[device.type]
    except (RuntimeError, KeyError):                    # no device name, or a type no run here can use
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if (device.index or 0) >= available:                # else torch fails at the first tensor moved there
        seen = counted(available, device.type + " device")
        fix = ("run at most one process per GPU (started without torchrun: export LOCAL_RANK, its GPU), or "
               "set device: cpu" if by_rank else f"{advice} or one it sees")     # else a typo
        raise UserError(f"device {name} asked for, but this torch sees {seen}: {fix}",
                        own=by_rank)                # torchrun: only the processes past the last GPU
    return device


def pick_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The weights' dtype: `name`, by default bf16 on a GPU that has it (SD3.5 Large + T5 in fp32: 54 GB,
    more than a 16-32 GB Mac holds), else fp32. MPS has bf16 from macOS 14 (torch 2.9+ has MPS only there)."""
    if name and not (isinstance(name, torch.dtype) and name.is_floating_point and name.itemsize > 1):
        check_choice("dtype", name, DTYPES)     # None or "": the default; float64 runs, int8/fp8 not
    bf16 = device.type == "cuda" or device.type == "mps" and torch.backends.mps.is_macos_or_newer(14, 0)
    default = torch.bfloat16 if bf16 else torch.float32
    dtype = DTYPES.get(name, name) if name else default                 # a torch.dtype: as is
    if dtype == torch.bfloat16 and device.type == "mps" and not bf16:     # else a TypeError moving a weight
        raise UserError("bf16 on MPS needs macOS 14 or newer: update macOS or set dtype fp32 (--dtype fp32)")
    return dtype


def check_compile(device: torch.device, fp8: bool):
    """A GPU's torch.compile needs Triton, and fp8 weights Triton's float8 (NVIDIA: Ada or newer; older cards
    fail pytorch#167082's way): refused before models load, not by the first step's inductor."""
    from importlib.util import find_spec
    off = "set train.compile false (sample.py: leave out --compile)"
    nvidia = device.type == "cuda" and not torch.version.hip
    if device.type == "cuda" and find_spec("triton") is None:         # PyTorch's Windows wheels bring none
        raise UserError("compile needs Triton, which this torch lacks (Windows: pip install triton-windows): "
                        + off)
    if fp8 and nvidia and torch.cuda.get_device_capability(device) < FP8_NVIDIA:
        raise UserError(f"compiled fp8 weights need an NVIDIA GPU of compute capability 8.9 or newer (Ada, "
                        f"Hopper), where Triton converts float8: {off}, or set fp8 false (sample.py: "
                        f"leave out --fp8)")


def too_large_for(device: torch.device, *modules: nn.Module) -> int:
    """The modules' weight bytes if over 85 % of the GPU's free memory (the rest: activations), else 0."""
    need = sum(t.nbytes for m in modules for t in [*m.parameters(), *m.buffers()])
    fits = device.type != "cuda" or need <= 0.85 * torch.cuda.mem_get_info(device)[0]
    return 0 if fits else need


def _header_groups(path: Path) -> set[str]:
    """First parts of a .safetensors header's names past `model.diffusion_model.`; empty for other files."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k.removeprefix("model.diffusion_model.").split(".")[0] for k in f.keys()}
    except Exception:                               # not safetensors: load_mmdit's error says what it is
        return set()


def load_pipeline(model: str, text_encoders: str | None = None, vae: str | None = None, device="auto",
                  dtype: str | torch.dtype | None = None, t5_length: int = T5_LENGTH, use_t5: bool = True,
                  variant: str = "", offload: bool | None = None, fp8: bool = False) -> Pipeline:
    """The one entry point: a diffusers folder, an official single file (+ text_encoders folder), a hub id, or
    "tiny". Models load on the CPU, then go to `device` (see Pipeline.place for `offload`)."""
    device = pick_device(str(device))
    use_t5, fp8 = read_flag(use_t5, "use_t5"), read_flag(fp8, "fp8")
    offload = offload if offload is None else read_flag(offload, "offload")    # None: as memory allows
    if fp8 and fp8_lacking(device):
        raise UserError(f"fp8 needs float8, which {fp8_lacking(device)} lacks: set fp8 false (sample.py: "
                        f"leave out --fp8)")
    dtype = pick_dtype(dtype, device)
    if variant:
        check_choice("variant", variant, PRESETS)
    t5_length = read_number(t5_length, True, "t5_length")          # "77" or None: no `<=` below takes them
    if not 1 <= t5_length <= T5_MAX_LENGTH:
        raise UserError(f"T5 length {t5_length} is outside 1..{T5_MAX_LENGTH}: use e.g. {T5_LENGTH}")
    if model == "tiny":
        if text_encoders or vae:                        # never silently unused
            raise UserError(TINY_OWN_PARTS.format("text_encoders", "vae"))
        pipe = tiny_pipeline(device, dtype, t5_length, use_t5)
        pipe.mmdit = quantize_mmdit(pipe.mmdit) if fp8 else pipe.mmdit
        pipe.variant = variant or pipe.variant
        return pipe.place(offload)
    text_parts = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    text_parts += ("text_encoder_3", "tokenizer_3") if use_t5 else ()
    root = resolve_model(model, ("transformer", "vae") + (() if text_encoders else text_parts))
    text_root = resolve_model(text_encoders, text_parts, key="text_encoders") if text_encoders else root
    vae_root = resolve_model(vae, ("vae",), key="vae") if vae else root    # a mistyped path: an error first
    groups = _header_groups(root) if root.is_file() else set()          # before gigabytes load
    mmdit_file = bool(groups & {"joint_blocks", "transformer_blocks"})
    if mmdit_file and "text_encoders" not in groups and not text_encoders:
        raise UserError(f"{root} holds no text encoders: {PASS_TEXT_ENCODERS}")
    if mmdit_file and "first_stage_model" not in groups and not vae:      # (not read whole a second time)
        raise UserError(f"{root} holds no VAE: pass --vae (config: vae; a diffusers SD3.5 folder or vae/)")
    if vae_root.is_dir():               # its config.json checked: e.g. FLUX.1's VAE, refused before the MMDiT
        _part_config(vae_root, "vae", "AutoencoderKL")
    mmdit = load_mmdit(root, "cpu", dtype, fp8)
    text = load_text_encoders(text_root, "cpu", dtype, t5_length, use_t5, mmdit.cfg.context_dim)
    pooled = text.clip_l.config.projection_dim + text.clip_g.config.projection_dim
    if pooled != mmdit.cfg.pooled_dim or text.t5 and text.t5.config.d_model != mmdit.cfg.context_dim:
        raise UserError(f"text encoders of the wrong width for this MMDiT (pooled CLIP-L + G: {pooled}; "
                        f"it takes {mmdit.cfg.pooled_dim} and a {mmdit.cfg.context_dim}-wide T5): use SD3's")
    vae_model = load_vae(vae_root, "cpu", dtype)
    if vae_model.cfg.latent_channels != mmdit.cfg.in_channels:
        raise UserError(f"the VAE has {vae_model.cfg.latent_channels} latent channels, the MMDiT expects "
                        f"{mmdit.cfg.in_channels}: use SD3's 16-channel VAE")
    pipe = Pipeline(mmdit, vae_model, text, variant or mmdit.cfg.variant(str(model)), device, root=root)
    return pipe.place(offload)


#################################################################################
#                                 Hub Downloads                                 #
#################################################################################

def _tokenizers(folder: Path, use_t5: bool) -> list:
    """tokenizer{,_2,_3}/ of a diffusers-layout folder if it has them, else the standard ones (cached)."""
    from transformers import AutoTokenizer
    names = ["tokenizer", "tokenizer_2", "tokenizer_3"][:2 + use_t5]
    missing = [f"{n}/" for n in names if not (folder / n).is_dir()]
    if not missing:
        try:
            tokenizers = [AutoTokenizer.from_pretrained(folder / n, trust_remote_code=False)
                          for n in names]                   # (never a download's code, as for configs)
            # refused here, not by a traceback at the first text: no padding token (a tokenizer.json without
            # its config; one past the vocabulary: check_pad_tokens), a CLIP length that is no count
            for name, tok in zip(names, tokenizers):
                length = tok.model_max_length               # (T5's is t5_length); transformers' 1e30: unset
                if tok.pad_token is None:
                    raise ValueError(f"{name}/ has no padding token")
                if name != "tokenizer_3" and (type(length) is not int or not 1 <= length < 2**31):
                    raise ValueError(f"{name}/tokenizer_config.json: model_max_length {length!r}, no length")
            return tokenizers + [None] * (not use_t5)
        except Exception as e:      # empty, half-copied; a newer tokenizers' file: a plain Exception
            raise _from_pretrained_error(folder, e, "tokenizer*/ folders are incomplete",
                                         "copy them again from a diffusers SD3.5 download") from None
    from huggingface_hub import snapshot_download
    repos = ("openai/clip-vit-large-patch14", "google-t5/t5-base")      # T5 v1.1 has t5-base's vocabulary
    try:
        clip, t5 = (snapshot_download(r, allow_patterns=["*.json", "merges.txt"]) for r in repos)
    except Exception:  # offline without a cached copy, mostly
        lacking = "tokenizer*/" if len(missing) == len(names) else ", ".join(missing)
        raise UserError(f"no {lacking} in {folder}, and downloading {repos} failed: go online"
                        f" once (they are cached) or copy tokenizer*/ of a diffusers SD3.5 there") from None
    return [AutoTokenizer.from_pretrained(clip), AutoTokenizer.from_pretrained(clip, pad_token="!"),  # as SD3
            AutoTokenizer.from_pretrained(t5) if use_t5 else None]


def local_model(name: str, key: str) -> Path | None:
    """`name` as a path that exists, None for a hub id (resolve_model's to look up), else a UserError."""
    name = str(name)                        # a Path from Python; None: "not found", not os.stat's TypeError
    if os.path.exists(name):
        return Path(name)
    local = name.lower().endswith((".safetensors", *PICKLE_SUFFIXES)) or os.path.exists(name.split("/")[0])
    if local or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        kinds = ".safetensors, hub id or 'tiny'" if key == "model" else ".safetensors or hub id"
        raise UserError(f"{key} not found: {name!r} (a diffusers folder, {kinds})")
    return None


def resolve_model(name: str, parts: tuple[str, ...], download=True, key: str = "model") -> Path | None:
    """A local path as is; a hub id: its `parts` downloaded (safetensors only); no `download`: cached/None.
    key: the setting given it, as errors name it (model, text_encoders or vae; sample.py's --model ...)."""
    name, local = str(name), local_model(name, key)     # (str: a Path from Python)
    if local:
        return local
    from huggingface_hub import snapshot_download
    # skipped: pickles in any case (hub patterns are case-sensitive), diffusers' fp16 copies (~11 GB, SD3.5)
    skipped = ["*." + "".join(f"[{c}{c.upper()}]" for c in suffix[1:]) for suffix in PICKLE_SUFFIXES]
    skipped += ["*.fp16.safetensors", "*.fp16-*-of-*.safetensors", "*.index.fp16.json"]
    try:
        return Path(snapshot_download(name, allow_patterns=["model_index.json", *(f"{p}/*" for p in parts)],
                                      ignore_patterns=skipped, local_files_only=not download))
    except Exception as e:  # offline, gated or no such repo; huggingface_hub's error classes vary by version
        if not download:                                    # not (completely) in the cache
            return None
        if out_of_space(e) or "os error 28" in str(e):      # (hf_xet: in its text)
            raise UserError(f"downloading {name} ran out of disk space: free some, or set HF_HOME to a "
                            f"folder on a bigger disk; then run again (finished files are kept)") from None
        raise UserError(f"could not download {name} ({type(e).__name__}): offline? run `hf download {name} "
                        f"--local-dir DIR` where there is a network, then --{key.replace('_', '-')} DIR "
                        f"(config: {key}: DIR); gated? accept the licence at https://huggingface.co/{name}, "
                        f"then `hf auth login`") from None


#################################################################################
#                                   LoRA Files                                  #
#################################################################################

def unwrap_mmdit(model, call: str, args: str, adds_layers: bool = False) -> MMDiT:
    """The MMDiT out of torch.compile's wrapper (it names layers "_orig_mod.*"), DataParallel or DDP
    (accelerate.prepare's; DDP syncs only the parameters it was given: no layers are added in it)."""
    if isinstance(model, Pipeline):                 # diffusers' LoRA calls take the pipeline: a habit
        raise UserError(f"{call} takes the MMDiT (pipe.mmdit), not a Pipeline: {call}(pipe.mmdit, {args})")
    model = getattr(model, "_orig_mod", model)      # accelerate compiles the DDP wrapper
    if adds_layers and isinstance(model, nn.parallel.DistributedDataParallel):
        raise UserError(f"{call} would add LoRA layers whose gradients DistributedDataParallel does not "
                        f"sync: call {call} on the MMDiT before wrapping it (DDP, accelerate.prepare)")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return getattr(model, "_orig_mod", model)


def save_lora(model: MMDiT, path: str | Path, format: str = "diffusers", metadata: dict | None = None):
    """The model's adapters -> a LoRA file (lora_file's tensors and header), written whole or not at all."""
    model = unwrap_mmdit(model, "save_lora", "path")
    if file_path(path, "the file to write").is_dir():                # save_lora(model, "runs")
        raise UserError(f"{path} is a folder: give the path of a file in it, e.g. "
                        f"{Path(path, 'lora.safetensors')}")
    if Path(path).suffix.lower() != ".safetensors":     # ComfyUI and diffusers would unpickle a .pt
        raise UserError(f"{path}: name the LoRA file .safetensors, e.g. "
                        f"{Path(path).with_suffix('.safetensors')}: ComfyUI and diffusers go by its name")
    tensors, header = lora_file(model, format, metadata, Path(path).stem)
    _atomic_save(tensors, path, header)


def lora_file(model: MMDiT, format: str, metadata: dict | None, title: str) -> tuple[dict, dict]:
    """Adapters -> tensors; rank, alpha, targets, `metadata`, ModelSpec keys -> header. diffusers: alpha in
    lora_B (loaders assume alpha = rank), qkv as to_q/k/v sharing lora_A; kohya: official names + alpha."""
    check_choice("LoRA format", format, LORA_FORMATS)
    layers, names, out = lora_layers(model), diffusers_names(model.cfg.depth), {}
    if not layers:
        raise UserError("the model has no LoRA layers to save (call add_lora first)")
    for name, layer in layers.items():
        down = layer.lora_down.weight.detach().float()
        # with an unmerged load_lora's scale, as the model runs (in lora_up: kohya reads alpha 0 as rank)
        up = layer.lora_up.weight.detach().float() * layer.multiplier
        if format == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            out.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(float(layer.alpha))})
        else:                                                    # diffusers
            up = swap_modulation(up * (layer.alpha / layer.rank), name, model.cfg.depth)
            for part, up_part in zip(names[name], up.chunk(len(names[name]))):
                out[f"transformer.{part}.lora_A.weight"] = down.clone()   # safetensors refuses shared memory
                out[f"transformer.{part}.lora_B.weight"] = up_part
    first = next(iter(layers.values()))
    info = {"format": format, "rank": first.rank, "alpha": first.alpha, "alpha_folded": format == "diffusers",
            "modules": sorted(layers)}
    try:                                # (ValueError: a dict that holds itself)
        header = json.dumps({**(metadata or {}), **info})        # the file's own entries win
    except (TypeError, ValueError) as e:        # e.g. numpy's numbers: json's bare "not JSON serializable"
        raise UserError(f"save_lora's metadata must be a dict of JSON values (text, numbers, lists, dicts; "
                        f"x.item() for a numpy number) ({e})") from None
    lora_metadata({"sd35_lora": header}, "save_lora", fix="give a value in that range")  # the loaders' check
    architecture = next(a for a, v in MODELSPEC_VARIANTS.items() if v == model.cfg.variant())   # its first
    implementation = "diffusers" if format == "diffusers" else "https://github.com/Stability-AI/sd3.5"
    return out, {"format": "pt", "sd35_lora": header, "modelspec.sai_model_spec": "1.0.1",
                 "modelspec.architecture": architecture, "modelspec.implementation": implementation,
                 "modelspec.title": title, "modelspec.date": time.strftime("%Y-%m-%d")}


# A LoRA tensor is `prefix + module + role suffix`. diffusers/PEFT: `transformer.`, `base_model.model.` or no
# prefix, lora_A/B; kohya: `lora_unet_` + official names flattened with "_", lora_down/up and alpha; ComfyUI:
# `diffusion_model.` + official names, or `lora_transformer_` (OneTrainer) or `lycoris_` (SimpleTuner's
# LyCORIS) + flattened diffusers names; OMI (OneTrainer's 2025 default): `transformer.` + official names.
LORA_PREFIXES = ("transformer.", "base_model.model.", "model.diffusion_model.", "diffusion_model.",
                 "lora_unet_", "lora_transformer_", "lycoris_")
TEXT_LORA = r"(lora_te\d*_|text_encoders?(_\d)?\.|clip_[lg]\.|t5\.)"     # the text encoders': CLIP-L, -G, T5
# Its layers' names in diffusers' pipeline -> their prefix in diffusers/PEFT (T5's too, though diffusers loads
# none), kohya sd-scripts (+ transformers' names flattened with "_"), ComfyUI's generic layout and OMI's
TEXT_LORA_NAMES = {
    "text_encoder": ("text_encoder.", "lora_te1_", "text_encoders.clip_l.transformer.", "clip_l."),
    "text_encoder_2": ("text_encoder_2.", "lora_te2_", "text_encoders.clip_g.transformer.", "clip_g."),
    "text_encoder_3": ("text_encoder_3.", "lora_te3_", "text_encoders.t5xxl.transformer.", "t5.")}
LORA_ROLES = {".lora_A.weight": "down", ".lora_down.weight": "down", ".lora.down.weight": "down",
              ".lora_B.weight": "up", ".lora_up.weight": "up", ".lora.up.weight": "up", ".alpha": "alpha",
              ".lora_A.default.weight": "down", ".lora_B.default.weight": "up"}  # PeftModel.state_dict()
ANOTHER_MODELS_LORA = "{} matches no layer of {}, a LoRA for another model? ({})"    # which, where known
# keeping either of a layer's two adapters would give other images than the tool that wrote the file
TWO_ADAPTERS = "{} has two adapters for '{}' (again as '{}'): a file of two layouts? keep one of them"
# DoRA, LyCORIS' LoHa, LoKr, OFT and trained norms, LoRA biases: the plain pairs beside them are another LoRA
NOT_PLAIN_LORA = r"dora_scale|lora_magnitude_vector|hada_w|lokr_w|oft_blocks|\.[wb]_norm$|\.lora_(B|up)\.bias"
# The model in SAI's ModelSpec header (modelspec.architecture): the variant of a LoRA whose shapes fit another
# (SD3 and SD3.5 Medium attention). save_lora writes each variant's first, the spec's spelling, which SwarmUI
# sorts by and OneTrainer (SD3) and OMI write; then sd-scripts' ("3-3-..." from Oct 2024 to Aug 2025). Large
# Turbo, a finetune of Large, has Large's, as in sd-scripts and SwarmUI. ComfyUI's ids name none.
MODELSPEC_VARIANTS = {"stable-diffusion-v3-medium/lora": "sd3-medium",
                      "stable-diffusion-3-medium/lora": "sd3-medium",
                      "stable-diffusion-3-3-medium/lora": "sd3-medium",
                      "stable-diffusion-v3.5-medium/lora": "sd3.5-medium",
                      "stable-diffusion-3-5-medium/lora": "sd3.5-medium",
                      "stable-diffusion-3-3-5-medium/lora": "sd3.5-medium",
                      "stable-diffusion-v3.5-large/lora": "sd3.5-large",
                      "stable-diffusion-3-5-large/lora": "sd3.5-large",
                      "stable-diffusion-3-3-5-large/lora": "sd3.5-large"}
T5_MAX_LENGTH = 512                        # T5's own training length; diffusers refuses more
LORA_METADATA = {"t5_length": ((int,), 1, T5_MAX_LENGTH), "use_t5": ((bool,), False, True),  # types, range
                 "rank": ((int,), 1, 2**20), "r": ((int,), 1, 2**20), "alpha": ((int, float), -1e9, 1e9),
                 "lora_alpha": ((int, float), -1e9, 1e9), "use_rslora": ((bool,), False, True)}


def lora_metadata(meta: dict, path, part: str = "transformer",
                  fix: str = "save it again") -> tuple[dict, dict]:
    """A LoRA's `sd35_lora` and PEFT's `lora_adapter_metadata` headers (flat: "transformer.r"), for `part`."""
    try:
        headers = tuple({k.removeprefix(f"{part}."): v for k, v in json.loads(meta.get(h, "{}")).items()}
                        for h in ("sd35_lora", "lora_adapter_metadata"))
    except (ValueError, AttributeError, RecursionError):
        raise UserError(f"{path}: its sd35_lora or PEFT metadata is no JSON object; {fix}") from None
    for header in headers:
        for key, (types, lo, hi) in LORA_METADATA.items():
            value = header.get(key, lo)
            if type(value) not in types or not lo <= value <= hi:    # type(): True is no rank
                raise UserError(f"{path}: metadata {key} = {value!r} is not in {lo}..{hi}; {fix}")
    return headers


def check_lora_keys(keys, path):
    """A LoRA file read here, by its tensor names alone (sample.py: before any model loads): no DoRA, LoHa,
    LoKr or OFT, no model given as the LoRA, no LoRA of another known model (each named for what it is;
    `.diff` files: _lora_groups says)."""
    unsupported = [key for key in keys if re.search(NOT_PLAIN_LORA, key)]
    if unsupported:
        raise UserError(f"{path}: '{unsupported[0]}' (DoRA, LoHa, LoKr, OFT, LyCORIS norms or PEFT "
                        f"lora_bias=True) is not supported: use a plain LoRA file")
    if not any(key.endswith((*LORA_ROLES, ".diff", ".diff_b")) for key in keys):
        lora = any("lora" in k for k in keys)           # "it looks like a LoRA" would say nothing here
        what = describe_checkpoint(keys, OTHER_MODELS if lora else CHECKPOINT_SIGNATURES)
        raise UserError(f"{path} is not a LoRA read here (no lora_A/B or lora_down/up .weight; {what})")
    if checkpoint_kind(keys, OTHER_MODELS):             # e.g. an SDXL or FLUX LoRA: no model need load
        raise UserError(ANOTHER_MODELS_LORA.format(path, "SD3's MMDiT",
                                                   describe_checkpoint(keys, OTHER_MODELS)))


def _lora_groups(sd: dict, path, spellings: dict) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """The LoRA tensors of `spellings`' modules, {module: {"down", "up", "alpha"}}; warnings of the rest."""
    groups, ignored, notes = {}, [], []
    for key, tensor in sd.items():
        if key.endswith((".diff", ".diff_b")):          # ComfyUI's LoraSave, a text-encoder part's too
            if tensor.any():                                # (bias_diff on): zero ones change nothing
                raise UserError(f"{path}: '{key}' is a whole weight/bias difference (ComfyUI TrainLoraNode, "
                                f"or LoraSave's bias_diff or full_diff): unsupported; from LoraSave, "
                                f"save it as standard, bias_diff off")
            continue
        suffix = next((s for s in LORA_ROLES if key.endswith(s)), "")
        module = key.removesuffix(suffix)
        module = module.removeprefix(next((p for p in LORA_PREFIXES if module.startswith(p)), ""))
        if not suffix or module not in spellings:
            ignored.append(key)
            continue
        # complex: .float() would drop the imaginary part; int/bool down/up: a quantized file's, or no weights
        if tensor.is_complex() or not tensor.is_floating_point() and LORA_ROLES[suffix] != "alpha":
            raise UserError(f"{path}: '{key}' is {str(tensor.dtype)[6:]}, no LoRA weight: use another file")
        tensor = tensor.float()                             # first: fp8 (e4m3) has no isfinite
        if not torch.isfinite(tensor).all():                # would merge into NaN weights: black images
            raise UserError(f"{path}: tensor '{key}' holds NaN/inf (diverged or damaged): use another file")
        if LORA_ROLES[suffix] in groups.get(module, {}):    # e.g. transformer. and base_model.model. both
            raise UserError(TWO_ADAPTERS.format(path, spellings[module][0], key))
        groups.setdefault(module, {})[LORA_ROLES[suffix]] = tensor
    text = [k for k in ignored if re.match(TEXT_LORA, k)]
    rest = [k for k in ignored if not re.match(TEXT_LORA, k)]
    if rest and all(re.match(TEXT_LORA, module) for module in groups):     # an unknown model's LoRA: its CLIP
        return {}, []                                           # part may fit alone: read_lora says why
    if text:                            # diffusers and ComfyUI apply it: their images differ from these
        example, unloaded = _text_lora_left_out(text, spellings)
        if not groups:
            raise UserError(f"{path} is a text-encoder LoRA only (e.g. {example}), {unloaded}")
        notes.append(f"warning: {path}: its text-encoder LoRA ({counted(len(text), 'tensor')}, e.g. "
                     f"{example}) is not applied, {unloaded}")
    if rest:
        notes.append(f"warning: ignored {counted(len(rest), 'tensor')} of {path}: no LoRA weights of this "
                     f"model, e.g. {rest[:3]}")
    return groups, notes


def _text_lora_left_out(text: list, spellings: dict) -> tuple[str, str]:
    """Text-encoder keys that fit no layer of `spellings` -> an example and why: not given, or not SD3's."""
    given = {official.partition(".")[0] for official, *_ in spellings.values()}
    absent = tuple(prefix for part in TEXT_LORA_NAMES.keys() - given for prefix in TEXT_LORA_NAMES[part])
    unfit = [key for key in text if not key.startswith(absent)]     # e.g. SD1.x's lora_te_ (ComfyUI: CLIP-L)
    if unfit:
        return unfit[0], "no layer of SD3's text encoders has such a name: a LoRA for another model?"
    t5 = any(key.startswith(TEXT_LORA_NAMES["text_encoder_3"]) for key in text)       # T5 off, or no `text`
    advice = "is T5 off (--no-t5, use_t5 false)? From Python: " if t5 else "give the text encoders: "
    return text[0], advice + "load_lora(..., text=pipe.text)"


def read_lora(model: MMDiT, path: str | Path, text: TextEncoders | None = None) -> dict[str, tuple]:
    """A LoRA file in any supported layout -> {loadable_layers' name: (down (r, in), up (out, r) * alpha / r)}
    checked against those layers. Raises UserError, touching nothing, when the file does not fit."""
    meta, sd = read_lora_header(path), read_safetensors(path)         # the header (checked) first
    # each part's (sd35_lora, PEFT) headers and PEFT alpha_pattern (for rank_pattern, the shapes give ranks)
    headers = {part: lora_metadata(meta, path, part) for part in ("transformer", *TEXT_LORA_NAMES)}
    pefts = {part: (peft, _alpha_pattern(peft, path)) for part, (_, peft) in headers.items()}
    ours, spec = headers["transformer"][0], MODELSPEC_VARIANTS.get(meta.get("modelspec.architecture"))
    depth, trained_on = model.cfg.depth, str(ours.get("variant", spec)).removesuffix("-turbo")
    targets = loadable_layers(model, text)
    spellings, pieces = _lora_spellings(depth, targets), {}
    groups, notes = _lora_groups(sd, path, spellings)
    if trained_on in PRESETS and trained_on != model.cfg.variant():   # a file's other text: escape codes?
        notes.insert(0, f"warning: {path} was trained on {trained_on}, this model is {model.cfg.variant()}: "
                        f"it may not work as intended")     # e.g. SD3.5 Medium's attention LoRA on SD3 Medium
    if not groups:                          # (another known model's: check_lora_keys named it unread)
        raise UserError(ANOTHER_MODELS_LORA.format(path, f"this {model.cfg.variant()} MMDiT (depth {depth})",
                                                   describe_checkpoint(sd, OTHER_MODELS)))
    for module, t in groups.items():
        if "down" not in t or "up" not in t:
            raise UserError(f"{path}: LoRA tensor pair for '{module}' is incomplete (has {sorted(t)})")
        down, up = t["down"], t["up"]
        if down.ndim == 4:                                  # x_embedder's 2x2 conv: sd-scripts' emb_dims, and
            if up.any() and down.any():                     # ComfyUI's LoraSave (zero when it is unchanged)
                raise UserError(f"{path}: '{module}' has a LoRA on a convolution (down {tuple(down.shape)}): "
                                f"not supported; use a LoRA without it (sd-scripts: emb_dims with x = 0)")
            continue
        if down.ndim != 2 or up.ndim != 2 or not 0 < down.shape[0] == up.shape[1]:
            raise UserError(f"{path}: '{module}' has down {tuple(down.shape)} and up {tuple(up.shape)}: a "
                            f"LoRA pair is down (r, in) and up (out, r), r >= 1")
        if "alpha" in t and t["alpha"].numel() != 1:
            raise UserError(f"{path}: '{module}' has {t['alpha'].numel()} alphas, not one; save it again")
        (official, index, n_parts, diffusers), rank = spellings[module], down.shape[0]
        peft, alphas = pefts.get(official.partition(".")[0], pefts["transformer"])
        key = next((pattern for pattern in alphas if pattern.match(module)), None)   # PEFT: the first
        alpha = float(t["alpha"] if "alpha" in t else alphas[key] if key else peft.get("lora_alpha", rank))
        divisor = math.sqrt(rank) if peft.get("use_rslora") else rank      # PEFT's rsLoRA: alpha / sqrt(r)
        bound = float(torch.linalg.norm(up)) * float(torch.linalg.norm(down)) * abs(alpha / divisor)
        if not bound <= torch.finfo(torch.float32).max:     # |(up down)_ij| <= |up| |down|: inf weights else
            raise UserError(f"{path}: '{module}' has alpha {alpha:g} (rank {rank}): its update would "
                            f"overflow to inf (a damaged file?); use another file")
        up = swap_modulation(up, official, depth) if diffusers else up
        slots = pieces.setdefault(official, [None] * n_parts)
        if len(slots) != n_parts or slots[index] is not None:   # official and diffusers names, qkv and to_q
            raise UserError(TWO_ADAPTERS.format(path, official, module))
        slots[index] = (down, up * (alpha / divisor))
    adapters = _fit_lora(model, pieces, path, targets)
    print("".join(f"{note}\n" for note in notes), end="", file=sys.stderr)   # for a file that fits only
    return adapters


def read_lora_header(path) -> dict:
    """A LoRA file's header, its tensor names checked first (a model given is refused unread; sample.py reads
    it before any model loads). PEFT's save_pretrained keeps lora_alpha, alpha_pattern and use_rslora in
    adapter_config.json beside adapter_model.safetensors: read as its lora_adapter_metadata, as PEFT does."""
    names, meta = read_safetensors(path, with_metadata=True, prefix=None)
    check_lora_keys(names, path)
    config = Path(path).with_name("adapter_config.json")
    peft_file = Path(path).name == "adapter_model.safetensors" and "lora_adapter_metadata" not in meta
    if peft_file and os.path.lexists(config):           # a folder or dead link: said, not skipped (alpha = r)
        try:
            meta = {**meta, "lora_adapter_metadata": config.read_text(encoding="utf-8", errors="replace")}
        except OSError as e:
            raise UserError(f"cannot read {config} ({e.strerror or e}), which holds the LoRA's scale "
                            f"(lora_alpha): make it readable, or download the adapter again") from None
        # checked here too, to name the file at fault: read_lora's checks name the .safetensors
        fix = "fix it, or download the adapter again"
        _alpha_pattern(lora_metadata(meta, config, fix=fix)[1], config, fix)
    return meta


def _lora_spellings(depth: int, targets: dict) -> dict[str, tuple[str, int, int, bool]]:
    """A layer's names in LoRA files, past LORA_PREFIXES (official or diffusers, "." or "_"; a text encoder's
    in each layout of TEXT_LORA_NAMES) -> (official name, its part, of how many, whether a diffusers name)."""
    spellings = {}
    for official, parts in diffusers_names(depth).items():
        spellings[official] = spellings[official.replace(".", "_")] = (official, 0, 1, False)
        for i, part in enumerate(parts):
            spellings[part] = spellings[part.replace(".", "_")] = (official, i, len(parts), True)
            if len(parts) > 1:                              # OMI's (OneTrainer's) q, k, v: qkv.0 to qkv.2
                spellings[f"{official}.{i}"] = (official, i, len(parts), False)
    for official in targets:
        part, _, name = official.partition(".")
        for prefix in TEXT_LORA_NAMES.get(part, ()):
            spelled = name.replace(".", "_") if prefix.endswith("_") else name       # kohya's, or as named
            spellings[prefix + spelled] = (official, 0, 1, False)
    return spellings


def _alpha_pattern(peft: dict, path, fix: str = "save it again") -> dict[re.Pattern, float]:
    """PEFT's per-module alphas, {module name: alpha}, checked: the metadata is untrusted. PEFT reads the keys
    as regexes, and one of nested repeats, (\\w|\\w)*y, runs for hours: only module names are taken (as PEFT
    and diffusers write them; "." still matches any character, as there): each match takes length^2 steps.
    Each compiled once (re's cache holds 512), and at most 10,000 (SD3.5 Large has ~540 LoRA-able layers)."""
    alphas = peft.get("alpha_pattern") or {}
    if type(alphas) is not dict or any(type(a) not in (int, float) or not abs(a) <= 1e9
                                       for a in alphas.values()):
        raise UserError(f"{path}: PEFT alpha_pattern is no {{module: alpha}} map: {fix}")
    if len(alphas) > 10_000:
        raise UserError(f"{path}: PEFT alpha_pattern has {len(alphas)} keys, more than any SD3 model has "
                        f"layers (at most 10,000 are read): a damaged file? use another")
    regex = next((k for k in alphas if not re.fullmatch(r"[\w.]*", k, re.ASCII)), None)
    if regex is not None:
        raise UserError(f"{path}: PEFT alpha_pattern key {regex!r} is a regex, not a module name; a file's "
                        f"regexes are not run (one can hang for hours): name the modules instead")
    return {re.compile(rf"(.*\.)?({k})$"): alpha for k, alpha in alphas.items()}      # as PEFT matches them


def _fit_lora(model: MMDiT, pieces: dict, path, modules: dict) -> dict[str, tuple]:
    """Check each module's (down, up) parts against its layer in `modules` and join them into one adapter;
    a file of adapters that are all zero is said to change nothing."""
    adapters = {}
    for official, parts in pieces.items():
        layer = modules.get(official)
        if not isinstance(layer, nn.Linear):
            raise UserError(f"{path}: no '{official}' in this model (depth {model.cfg.depth}, dual attention "
                            f"{list(model.cfg.dual_attention_layers)}): a LoRA for another variant?")
        rows = layer.out_features // len(parts)
        for down, up in filter(None, parts):
            if down.shape[1] != layer.in_features or up.shape[0] != rows:
                raise UserError(f"{path}: '{official}' takes ({layer.in_features} -> {rows}) per part, not "
                                f"down {tuple(down.shape)}, up {tuple(up.shape)}: another variant's LoRA?")
        downs, ups = zip(*(p or (torch.zeros(0, layer.in_features), torch.zeros(rows, 0)) for p in parts))
        if all(torch.equal(d, downs[0]) for d in downs):    # one shared A (as we save qkv): stays rank r
            adapters[official] = (downs[0], torch.cat(ups))
        else:                                               # separate A's: block-diagonal, ranks add up
            adapters[official] = (torch.cat(downs), torch.block_diag(*ups))
    if not any(down.any() and up.any() for down, up in adapters.values()):     # e.g. saved before a step
        print(f"warning: {path} changes no weight (all its LoRA products are zero: saved before training, "
              f"or alpha 0?)", file=sys.stderr)
    return adapters


def merge_delta(layer: nn.Module, delta: torch.Tensor):
    """layer.weight += delta; an fp8 weight is dequantized, added to and quantized again."""
    if getattr(layer, "weight_scale", None) is not None:
        weight = dequantize_fp8(layer.weight, layer.weight_scale, torch.float32)
        weight, row_scale = quantize_fp8(weight + delta.to(weight.device))
        layer.weight.copy_(weight)
        layer.weight_scale.copy_(row_scale)
    else:
        layer.weight += delta.to(layer.weight.device, layer.weight.dtype)


def loadable_layers(model: MMDiT, text: TextEncoders | None) -> dict[str, nn.Module]:
    """The layers a LoRA file may change: the MMDiT's by official name, the Linears of the text encoders given
    as diffusers' pipeline names them: text_encoder.* CLIP-L, text_encoder_2.* CLIP-G, text_encoder_3.* T5."""
    if text is not None and not isinstance(text, TextEncoders):        # e.g. the Pipeline
        raise UserError(f"load_lora's text takes the text encoders (pipe.text), not a {type(text).__name__}")
    targets = dict(model.named_modules())
    for part, encoder in zip(TEXT_LORA_NAMES, (text.clip_l, text.clip_g, text.t5) if text else ()):
        for name, layer in encoder.named_modules() if encoder is not None else ():
            if isinstance(layer, nn.Linear):
                targets[f"{part}.{name}"] = layer
    return targets


@torch.no_grad()
def load_lora(model: MMDiT, path: str | Path, scale: float = 1.0, merge: bool = True,
              text: TextEncoders | None = None) -> int:
    """Apply a LoRA file, merged (stackable, zero overhead) or as LoRALinear; returns the layer count. Its
    text-encoder part goes into `text` (pipe.text), merged: they run once per prompt. All or nothing: a
    failure part way (Ctrl-C, out of memory) undoes the layers done, so a notebook can retry."""
    merge = read_flag(merge, "merge")
    model = unwrap_mmdit(model, "load_lora", "path", adds_layers=not merge)
    scale = read_number(scale, False, "the LoRA scale")       # NaN or inf would be merged into every weight
    adapters, layers = read_lora(model, path, text), loadable_layers(model, text)   # read_lora checks it all
    dtype = model.compute_dtype                             # (fp8 weights dequantize to it)
    for name, (down, up) in adapters.items():       # |s (up down)_ij| <= |s| |up| |down|: inf weights else
        if not abs(scale) * float(torch.linalg.norm(up) * torch.linalg.norm(down)) <= torch.finfo(dtype).max:
            raise UserError(f"{path} at scale {scale:g} would make inf {'weights' if merge else 'outputs'} "
                            f"in {str(dtype)[6:]} at '{name}': lower the scale")
    unmerged = [] if merge else [name for name in adapters if not name.startswith(tuple(TEXT_LORA_NAMES))]
    taken = [name for name in unmerged if isinstance(layers[name], LoRALinear)]
    if taken:
        raise UserError(f"{taken[0]} already has an unmerged LoRA: only one per layer can stay unmerged, "
                        f"merge the others (sample.py: leave out --no-merge)")
    merged = []                                     # the layers merged so far: subtracted again on failure
    try:
        for name, (down, up) in adapters.items():
            layer = layers[name]
            if name not in unmerged:
                merge_delta(layer, (up @ down) * scale)
                merged.append(name)
            else:       # LoRALinear's random init, overwritten at once, must leave the caller's seed alone
                device = layer.weight.device
                accelerators = [] if device.index is None else [device.index]  # the CPU's is always forked
                with torch.random.fork_rng(accelerators, device_type=device.type):
                    wrapped = LoRALinear(layer, rank=len(down), alpha=len(down)).requires_grad_(False)
                wrapped.train(layer.training)                       # an eval() model's layers stay in eval
                wrapped.lora_down.weight.copy_(down)
                wrapped.lora_up.weight.copy_(up)
                wrapped.multiplier = scale
                _replace(model, name, wrapped)                      # for inference: add_lora leaves it frozen
    except BaseException:       # e.g. Ctrl-C or out of memory part way: the layers done are undone
        for name in unmerged:               # `layers` holds them as they were (one not yet replaced: a no-op)
            _replace(model, name, layers[name])
        for name in merged:     # subtracted, not restored from a copy (that would cost the model's size): as
            down, up = adapters[name]               # it was to within rounding (fp8: its rounding)
            merge_delta(layers[name], -(up @ down) * scale)
        raise
    return len(adapters)


#################################################################################
#                                  fp8 Weights                                  #
#################################################################################

# fp8: the frozen weight matrices of the joint blocks and the context embedder (90-98 % of bytes) are stored
# as float8_e4m3fn (3 mantissa bits, largest value 448) with one fp32 scale per output row: W[i] = w[i] * s[i]
FP8 = getattr(torch, "float8_e4m3fn", None)                  # None in a torch without float8 dtypes
FP8_WEIGHTS = r"^((joint|transformer)_blocks\.\d+\..+|context_embedder)$"  # Linears whose weight goes fp8
FP8_MATMUL = os.environ.get("SD35_FP8_MATMUL", "1") != "0"   # 0: always dequantize, never fp8 tensor cores
FP8_NVIDIA = (8, 9)              # compute capability of fp8 tensor cores and of Triton's float8_e4m3fn (Ada)


def fp8_lacking(device: torch.device) -> str:
    """What keeps fp8 weights off `device` ("this torch", "MPS"), or "" where they work."""
    return "this torch" if FP8 is None else "MPS" if device.type == "mps" else ""


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> (float8 w, fp32 scale (out,)): each row's largest |value| becomes 448."""
    scale = w.abs().amax(dim=1).float().clamp(min=1e-12) / 448
    return (w / scale[:, None]).to(FP8), scale                  # w / fp32 scale: computed in fp32


def dequantize_fp8(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W = w * s in fp32, rounded once to `dtype`: a scale rounded to bf16 would shift its whole row by up to
    0.4 %, and in fp16 the scale of a row of small weights is subnormal. Every e4m3 value is exact in `dtype`,
    so mul_ computes the same fp32 product as w.float() * s, in two kernels instead of three."""
    return w.to(dtype, copy=True).mul_(scale.float()[:, None])


@contextlib.contextmanager
def checkpointed():
    """A joint block under gradient checkpointing: its fp8 layers save their weights dequantized for the
    backward. Its forward saves nothing (no grad) and the recompute runs right before the block's backward:
    one block's weights at a time (~0.4 GB on Large), each dequantized twice a step, not three times.
    Compiled, the partitioner decides what the backward keeps."""
    FrozenLinear.checkpointed = True
    try:
        yield
    finally:
        FrozenLinear.checkpointed = False


def fp8_tensor_cores(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether (N, in) x fp8 W^T runs on fp8 tensor cores (compiled, on a card with them), not dequantized."""
    # Eager, quantizing x per token takes separate kernels that cost more than the fp8 GEMM saves (H200, Large
    # LoRA step: 0.60 s vs 0.56 s dequantized); compiled, they fuse into the kernel before it and the fp8 GEMM
    # wins. torch._scaled_mm with row-wise scales needs an NVIDIA card of compute capability >= 8.9 (ROCm's
    # takes other fp8 types), bf16, dims multiple of 16.
    return (FP8_MATMUL and torch.compiler.is_compiling() and x.is_cuda and not torch.version.hip
            and x.dtype == torch.bfloat16 and x.shape[-1] % 16 == 0 and weight.shape[0] % 16 == 0
            and torch.cuda.get_device_capability(x.device) >= FP8_NVIDIA)


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias) -> torch.Tensor:
    """(N, in) x fp8 W^T + b on fp8 tensor cores: x quantized per token, both scales applied in the GEMM."""
    rows, x_scale = quantize_fp8(x)
    return torch._scaled_mm(rows, weight.t(), scale_a=x_scale[:, None], scale_b=scale[None], bias=bias,
                            out_dtype=torch.bfloat16, use_fast_accum=True)


class Fp8Linear(nn.Linear):
    """A frozen nn.Linear whose weight is float8_e4m3fn, with one fp32 scale per row in `weight_scale`."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: nn.Parameter | None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight, self.bias = nn.Parameter(weight, requires_grad=False), bias
        self.register_buffer("weight_scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):     # an output of autocast's fp32 ops: back to bf16
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return FrozenLinear.apply(x, self.weight, self.weight_scale, self.bias)


@torch.no_grad()
def quantize_mmdit(model: MMDiT, scales: dict[str, torch.Tensor] | None = None) -> MMDiT:
    """Swap the FP8_WEIGHTS Linears for Fp8Linears, one at a time; weights already fp8 come with `scales`."""
    model = unwrap_mmdit(model, "quantize_mmdit", "scales=None")
    layers = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and re.match(FP8_WEIGHTS, n)]
    if lora_layers(model):          # its adapters would turn fp8 without their scales, its bases stay full
        raise UserError(f"fp8: {next(iter(lora_layers(model)))} already has a LoRA: quantize once, before "
                        f"add_lora or an unmerged load_lora (merged ones may come first)")
    if not layers:
        raise UserError("fp8: no plain joint-block Linear left to quantize: quantize once, before any LoRA")
    for name, layer in layers:
        scale = (scales or {}).get(f"{name}.weight")
        weight, scale = (layer.weight, scale) if scale is not None else quantize_fp8(layer.weight)
        _replace(model, name, Fp8Linear(weight.detach(), scale.to(weight.device), layer.bias))
    return model


def _fp8_on_read(scales: dict, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """An FP8_WEIGHTS matrix (official or diffusers name) quantized as it is read; row scales to `scales`."""
    module = name.removesuffix(".weight")
    is_matrix = name.endswith(".weight") and tensor.ndim == 2 and tensor.element_size() > 1
    if is_matrix and tensor.is_floating_point() and re.match(FP8_WEIGHTS, module):   # ints: refused later
        tensor, scales[name] = quantize_fp8(tensor)
    return tensor


def _fp8_checkpoint(sd: dict, fp8: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """ComfyUI's fp8 files: W = w * s, s per tensor in `X.scale_weight` (comfy-kitchen: `X.weight_scale`) or
    none (1); markers are dropped. fp8: matrices stay or become e4m3 -> {weight: row s}; else each: dtype."""
    for key in [k for k in sd if re.search(r"^scaled_fp8$|\.(scale_input|input_scale|comfy_quant)$", k)]:
        del sd[key]
    odd = next((str(t.dtype)[6:] for t in sd.values() if not t.is_floating_point()), "")    # "torch.int8"
    if odd:                                                 # ints: int8 or nvfp4 (uint8) quantized files
        what = f"{odd} (integer-quantized: int8, nvfp4)" if "int" in odd else odd    # else complex or bool
        raise UserError(f"weights stored as {what} are unsupported: use a bf16/fp16/fp8 file")
    scales = {}
    for key in [k for k, t in sd.items() if t.element_size() == 1 and t.ndim]:    # 0-dim: _build refuses
        module, weight = key.removesuffix(".weight"), sd[key]
        given = [sd.pop(f"{module}.{n}") for n in ("scale_weight", "weight_scale") if f"{module}.{n}" in sd]
        if given and given[0].numel() not in (1, weight.shape[0]):
            raise UserError(f"{key}: block-wise fp8 scales {tuple(given[0].shape)} (mxfp8) are unsupported: "
                            f"use a bf16/fp16 file or one with a scale per tensor")
        scale = (given[0] if given else torch.ones(())).float().flatten().expand(weight.shape[0]).clone()
        if not (fp8 and weight.ndim == 2 and re.match(FP8_WEIGHTS, module)):  # biases, norms, the rest,
            sd[key] = (weight.float() * scale.reshape(-1, *[1] * (weight.ndim - 1))).to(dtype)  # one by one
        elif weight.dtype == FP8:                       # e4m3 matrices stay (load_mmdit: on-read scales win)
            scales[key] = scale
        else:                                           # e5m2: to e4m3 now, not all upcast to dtype first
            sd[key], scales[key] = quantize_fp8(weight.float() * scale[:, None])
    return scales


#################################################################################
#                         Config Files and Resume Rules                         #
#################################################################################

# Part 1's checks of what its callers pass, kept out of its story
def check_image_fits(model: MMDiT, height: int, width: int, fix: str = "lower the width and height"):
    """Sides in pixels, against the position table; too large: a UserError that tells `fix`."""
    most = model.cfg.pos_embed_max_size * model.patch_px
    if height > most or width > most:
        raise UserError(f"{width}x{height} px is too large for this model (at most {most} px a side): {fix}")


def check_latent_size(latents: torch.Tensor, patch: int, patch_px: int):
    """MMDiT.forward's latents: sides the patch conv divides without dropping a last row or column."""
    if latents.shape[-2] % patch or latents.shape[-1] % patch:
        raise UserError(f"latents of {latents.shape[-1]}x{latents.shape[-2]} (width x height): both must be "
                        f"multiples of the patch size {patch} (of images: {patch_px} px)")


def check_no_lora_yet(layer: nn.Linear, name: str):
    """add_lora's layer: one LoRA per layer."""
    if isinstance(layer, LoRALinear):
        raise UserError(f"{name} already has a LoRA (add_lora's or an unmerged load_lora's): one per "
                        f"layer; target other layers, or load a file merged (load_lora(..., merge=True))")


def check_targets_found(names: list[str], targets: str, blocks: str):
    """lora_targets' result: at least one layer."""
    if not names:
        raise UserError(f"lora.targets {targets!r} (blocks {blocks or 'all'}) matches no Linear layer of the "
                        f"MMDiT; use attn, attn_mlp, all or a regex such as 'attn\\.qkv$'")


PATH_KEYS = ("model", "text_encoders", "vae", "output_dir", "dataset.path", "dataset.cache_dir")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")    # bytes that were not UTF-8, or YAML's "\ud800": no text
WINDOWS_PATHS = "in YAML's double quotes a backslash starts an escape (\\t, \\n): use 'single quotes' or /"


def _coerce(value, default, key: str):
    """Cast a YAML value to the type of the field's default, or explain why it cannot be."""
    name = f"config key '{key}'"
    if isinstance(default, list):
        return [_coerce(v, "", key) for v in ([] if value is None else listed(value, name))]
    if isinstance(default, str):
        if isinstance(value, (dict, list, tuple)):           # never its Python repr as a prompt or a path
            raise UserError(f"{name} must be text, got {value!r:.60}: quote it (YAML reads an unquoted "
                            f"'a: b' as a mapping)")
        text = "" if value is None else str(value)
        if key not in PATH_KEYS and LONE_SURROGATE.search(text):    # the tokenizers cannot encode it
            raise UserError(f"{name} is not UTF-8 text: {text!r:.60} (write the character itself, in UTF-8)")
        # "D:\runs\new": CR, line break; "D:\Projects\Lora", "D:\Neu", "D:\_data": U+2029, 2028, 0085, 00A0
        if key in PATH_KEYS and re.search(r"[\x00-\x1f\x7f-\xa0\u2028\u2029]", text):
            raise UserError(f"{name} holds a control character, {text!r:.60}: {WINDOWS_PATHS}")
        return expand_path(text, name) if key in PATH_KEYS else text
    if isinstance(default, bool):
        words = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
        value = words.get(value.lower(), value) if isinstance(value, str) else value   # YAML 1.1's words
        return read_flag(value, name)
    for parse in (int, float) if isinstance(value, str) else ():    # read_yaml leaves numbers as text
        with contextlib.suppress(ValueError):
            value = parse(value)                           # int first: seeds up to 2^64 - 1 exactly
            break
    return read_number(value, isinstance(default, int), name)


def expand_path(text: str, name: str) -> str:
    """A config path's ~, $X, ${X} (Windows' %X% too) expanded as a shell does; `name`: its key, in errors."""
    # Windows' expandvars skips all after a ' (O'Brien): $X and ${X} first, here
    text = re.sub(r"\$(\w+)|\$\{([^}]*)\}", lambda m: os.environ.get(m[1] or m[2], m[0]), text)
    text = os.path.expandvars(os.path.expanduser(text))
    # an unset $NAME would make a folder "$NAME"; lower-case "my$files" stays (else unwritable)
    if unset := re.search(r"\$([A-Z_][A-Z0-9_]*\b|\{[^}]*\})", text):
        raise UserError(f"{name} names {unset[0]}, an environment variable that is not set: set it "
                        f"or write the path out")
    return text


def listed(value, name: str) -> list:
    """The items of a list, tuple, numpy or pandas array (config lists, generate's prompts), or [value]."""
    if isinstance(value, (set, frozenset)):         # its order changes between runs: sample_00 another prompt
        raise UserError(f"{name} must be a list, not a set (its order changes between runs)")
    if getattr(value, "ndim", 1) > 1:           # a table: a DataFrame iterates over its column names
        raise UserError(f"{name} must be a list or a 1-D array, not a {value.ndim}-D {type(value).__name__}")
    many = (hasattr(value, "__iter__") and not isinstance(value, (str, bytes, dict))      # numpy's, pandas'
            and getattr(value, "ndim", 1) > 0)                      # a 0-d array is one value, not iterable
    return list(value) if many else [value]


def read_number(value, whole: bool, name: str) -> int | float:
    """`value` as an int (whole: 20.0 too) or a float, numpy's too; NaN or True would pass every `<` check."""
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    value = value.item() if number and hasattr(value, "item") else value  # numpy's: a float32 warns at `<=`
    if not number or not abs(value) <= sys.float_info.max or whole and value % 1:   # NaN, inf, 10**400: no
        raise UserError(f"{name} must be a {'whole' if whole else 'finite'} number, got {value!r:.60}")
    return int(value) if whole else float(value)


def read_flag(value, name: str) -> bool:
    """`value` as True or False, numpy's too; from Python the text "no" or "False" would be true to `if`."""
    value = bool(value) if type(value).__name__ in ("bool", "bool_") else value  # numpy's (1.x: bool_)
    if not isinstance(value, bool):
        raise UserError(f"{name} must be true or false, got {value!r}")
    return value


def _fill(obj, data: dict, prefix: str = ""):
    """Set dataclass fields from a nested dict -> `obj`; an unknown key is refused, naming the likely one."""
    if not isinstance(data, dict):
        raise UserError(f"config {prefix[:-1] or 'file'} needs `key: value` lines, got {data!r:.60}")
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        if key not in names:            # a key of another section first (`lr: 1e-5` of a flat config)
            own = [prefix + n for n in names if str(key) in n.split("_")]     # `sample.steps`: sample_steps
            moved = [k for k in flat_config(Config()) if k.rsplit(".", 1)[-1] == str(key)]
            close = own + moved or [prefix + k for k in difflib.get_close_matches(str(key), names, n=1)]
            hint = f"did you mean {' or '.join(map(repr, close))}?" if close else f"valid: {', '.join(names)}"
            shown = repr(f"{prefix}{key}")[1:-1]        # a pasted U+00A0 or BOM escaped, unlike an é
            raise UserError(f"unknown config key '{shown}' ({hint})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):           # a section with every line commented out: defaults
            _fill(current, {} if value is None else value, f"{prefix}{key}.")
        else:
            setattr(obj, key, _coerce(value, current, f"{prefix}{key}"))
    return obj


def flat_config(cfg: Config) -> dict:
    """Every setting under its config key: {"model": ..., "train.lr": ..., ...}."""
    flat = {}
    for key, value in dataclasses.asdict(cfg).items():
        flat.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    return flat


CHOICES = {"variant": ("", *PRESETS), "lora.format": LORA_FORMATS, "sample.sampler": ("", *SAMPLERS),
           "train.lr_schedule": LR_SCHEDULES, "train.timestep_sampling": TIMESTEP_SAMPLINGS,
           "train.weighting": WEIGHTINGS, "dtype": ("fp32", "bf16")}          # fp16 needs loss scaling


def check_size(width: int, height: int, name: str = "width and height"):
    """Image sides are positive multiples of 16: the VAE divides by 8, the MMDiT's 2x2 patches by 2 more."""
    if width % 16 or height % 16 or width <= 0 or height <= 0:
        raise UserError(f"{name} must be positive multiples of 16: {width}x{height}")


SHIFT_RANGE = (1e-3, 1e3)      # wide margins: at 2^-25 or less, fp32's 1 + (shift - 1) sigma is 0 at sigma 1
MAX_STEPS = 0x3F800000                     # fp32 has this many sigmas in (0, 1] (1.0's bits): more repeat one
MANY_STEPS = 2**30 // 45        # their sigma schedule takes a GiB of RAM (45 bytes a step: float64, a list)
# the config's numbers, lowest and highest allowed; validate checks those with other rules (lr > 0, ...)
RANGES = {**dict.fromkeys(("lora.rank", "train.steps", "train.batch_size", "train.grad_accum",
                           "train.save_every"), (1, math.inf)),
          **dict.fromkeys(("train.warmup_steps", "train.weight_decay", "train.max_grad_norm", "lora.dropout",
                           "sample.sample_every", "sample.guidance_scale", "sample.shift", "train.logit_std",
                           "train.keep_last"), (0, math.inf)),
          "t5_length": (1, T5_MAX_LENGTH), "dataset.caption_dropout": (0, 1), "train.seed": (0, 2**64 - 1),
          "sample.seed": (0, 2**64 - 1), "sample.sample_steps": (0, MAX_STEPS),
          "train.loss_bins": (1, 1000), "train.dist_timeout": (1, 10**9)}     # more: TBs of bins, an overflow


def check_skip_layer_guidance(s: SampleSettings, variant: str, depth: int | None, layers_given: bool):
    """SampleSettings.resolved's checks before it drops the preset's skip layers `depth` lacks (warned)."""
    if s.slg_scale is None or s.slg_scale and not s.slg_layers:       # --slg, or a scale without layers
        raise UserError(f"skip-layer guidance needs a scale and layers ({variant} has no recommended "
                        f"ones): give --slg-scale and --slg-layers, e.g. 2.5 and 7,8,9")
    wrong = [i for i in s.slg_layers if depth is not None and not 0 <= i < depth]
    if s.slg_scale and wrong and layers_given:                      # given, not the preset's: a typo
        raise UserError(f"skip-layer guidance layers {wrong} are not in this {depth}-block model's "
                        f"0..{depth - 1}: fix --slg-layers")
    if s.slg_scale and s.cfg <= 1.0:            # SLG guides the CFG step only; refused on any depth
        raise UserError(f"skip-layer guidance works only with CFG (cfg above 1, not {s.cfg}): raise "
                        f"--cfg or leave out --slg/--slg-scale")
    if s.slg_scale and wrong:                                       # the preset's, asked for by --slg
        print(f"warning: skip-layer guidance layers {wrong} ({variant}'s) are not in this {depth}-block "
              f"model: left out", file=sys.stderr)


def check_sample_settings(s: SampleSettings):
    """SampleSettings.resolved's refusals of the settings that will run."""
    check_size(s.width, s.height)
    lo, hi = SHIFT_RANGE
    if not 1 <= s.steps <= MAX_STEPS or not lo <= s.shift <= hi or not math.isfinite(s.cfg + s.slg_scale):
        raise UserError(f"steps must be in 1..{MAX_STEPS}, shift in {lo:g}..{hi:g}, cfg and slg scale "
                        f"finite: got {counted(s.steps, 'step')}, shift {s.shift}, cfg {s.cfg}, "
                        f"slg scale {s.slg_scale}")
    if s.slg_scale and not any(slg_acts(i, s.steps) for i in range(s.steps)):
        raise UserError(f"skip-layer guidance acts {SLG_WINDOW[0]:.0%}-{SLG_WINDOW[1]:.0%} into a run, "
                        f"on no step of a {s.steps}-step one: use more or leave out --slg/--slg-scale")
    check_choice("sampler", s.sampler, SAMPLERS)
    check_choice("schedule", s.schedule, SCHEDULES)


def check_seed(seed: int, images: int, name: str = "seed"):
    """Image i uses seed + i, and torch wraps seeds mod 2^64: out of range, two seeds would give one image."""
    if not 0 <= seed <= 2**64 - images:
        raise UserError(f"{name} {seed} is outside 0..2^64-{images} (image i uses seed + i)")


def counted(n: int, one: str, many: str = "") -> str:
    """'1 image', '2 images', '2 processes'; `many` for other plurals ('1 image is', '2 images are')."""
    return f"{n} {one if n == 1 else many or one + ('es' if one.endswith('s') else 's')}"


def warn_cut(text: TextEncoders, texts: list[str], what: str):
    """One warning for texts past CLIP's 77 tokens or T5's t5_length, which encode cuts (diffusers warns)."""
    limits = [("CLIP", text.tok_l, text.tok_l.model_max_length)]
    limits += [("T5", text.tok_t5, text.t5_length)] if text.t5 is not None else []
    cut = {}
    for name, tok, limit in limits if texts else ():
        lengths = map(len, tok(texts, verbose=False).input_ids)
        cut[f"{name}'s {limit}"] = {i for i, n in enumerate(lengths) if n > limit}
    over = sorted(set().union(*cut.values()))
    if over:
        told = ", ".join(f"{len(i)} at {window}" for window, i in cut.items() if i)
        # both tokenizers end a text with one special token, which the cut keeps: tokens [limit - 1:] are lost
        lost = {name: tok.decode(tok(texts[over[0]], verbose=False).input_ids[limit - 1:],
                                 skip_special_tokens=True) for name, tok, limit in limits}
        name = max(lost, key=lambda window: len(lost[window]))          # the shorter window: more words lost
        verb, pronoun = ("is", "it") if len(over) == 1 else ("are", "them")
        print(f"warning: {len(over)} of {len(texts)} {what} {verb} cut ({told} tokens): the rest of "
              f"{pronoun} is ignored, e.g. {name} does not read {lost[name]!r:.60}", file=sys.stderr)


def warn_prompts(text: TextEncoders, prompts: list[str], negative: str, cfg: float, previews: bool = False):
    """warn_cut for generate()'s texts or the previews' (by config key), and a negative prompt left unread."""
    warn_cut(text, prompts, "sample.prompts" if previews else "prompts")    # a user counts only the prompts
    if cfg > 1.0:
        warn_cut(text, [negative], "sample.neg prompts" if previews else "negative prompts")
    elif negative:                                      # without CFG: diffusers ignores it as silently
        what, whose, fix = (("sample.neg", "the previews' cfg", ": sample.guidance_scale") if previews
                            else ("the negative prompt", "cfg", ""))
        print(f"warning: {what} has no effect without CFG ({whose} {cfg} is 1 or less{fix})", file=sys.stderr)


def check_text_inputs(pipe: Pipeline, prompts: list[str], negative: str, embeddings, cfg: float):
    """generate()'s texts, one negative prompt for all (the tokenizers read a list as a text pair); without
    text encoders (train() drops its own) `embeddings` for as many prompts, uncond too where CFG runs."""
    if isinstance(negative, SampleSettings):            # generate(pipe, prompts, SampleSettings(...))
        raise UserError("generate's third argument is the negative prompt: pass the settings by name, "
                        "settings=SampleSettings(...)")
    if not all(isinstance(text, str) for text in [negative, *prompts]):    # e.g. None: no tokenizer reads it
        raise UserError(f"prompts and the negative prompt must be text (str), the negative one for all: got "
                        f"{prompts!r:.60} and {negative!r:.60}")
    if embeddings is None and pipe.text is None:
        raise UserError("this Pipeline has no text encoders (pipe.text is None): pass embeddings=(cond, "
                        "uncond) from TextEncoders.encode, or load the pipeline again")
    if embeddings is None:
        return
    widths = pipe.mmdit.cfg.context_dim, pipe.mmdit.cfg.pooled_dim
    try:                    # e.g. one (context, pooled) pair, as TextEncoders.encode gives: no (cond, uncond)
        cond, uncond = embeddings
        pairs = [cond] if uncond is None else [cond, uncond]        # (generate slices an unused one too)
        rows = [len(context) for context, _ in pairs]
        if not all((c.shape[2], p.shape[1]) == widths and len(p) == len(c) for c, p in pairs):
            raise ValueError                            # another model's: torch's error
    except (TypeError, ValueError, AttributeError, IndexError):
        raise UserError("embeddings must be (cond, uncond), each (context, pooled) from this pipeline's "
                        "TextEncoders.encode; uncond None without CFG") from None
    if rows[0] != len(prompts):
        raise UserError(f"embeddings for {counted(rows[0], 'prompt')}, not {len(prompts)}: encode these")
    if cfg > 1.0 and rows[-1] != len(prompts):  # a negative encoded once: the other images would go without
        raise UserError(f"embeddings' uncond half is for {counted(rows[-1], 'prompt')}, not {len(prompts)}: "
                        f"encode the negative prompt once per prompt ([negative] * {len(prompts)})")
    if uncond is None and cfg > 1.0:                # denoise() would run without CFG, silently
        raise UserError(f"embeddings with no uncond (negative prompt) half cannot run CFG at cfg {cfg}: pass "
                        f"(cond, uncond) or cfg=1")
    tokens = [context.shape[1] for context, _ in pairs]
    if cfg > 1.0 and tokens[0] != tokens[-1]:           # CFG runs them as one batch (torch.cat)
        raise UserError(f"embeddings' cond and uncond contexts have {tokens[0]} and {tokens[-1]} tokens: "
                        f"encode both with one TextEncoders (one t5_length)")


def read_generate_inputs(pipe: Pipeline, prompts, negative, settings, embeddings, batch_size, keep, progress):
    """generate()'s arguments checked -> (prompts as a list, the settings resolved for pipe, batch_size)."""
    if not isinstance(pipe, Pipeline):                  # e.g. pipe.mmdit, which load_lora takes
        raise UserError(f"generate takes the Pipeline from load_pipeline, not a {type(pipe).__name__}")
    if any(p.is_meta for model in pipe.modules() for p in model.parameters()):     # e.g. by free_models
        raise UserError("this Pipeline's models were freed (moved to the meta device, as train() and a "
                        "failed sample.main free theirs): load the pipeline again with load_pipeline")
    prompts = listed(prompts, "prompts")        # one prompt (as diffusers takes it), a numpy or pandas array
    read_flag(progress, "progress")
    settings, batch_size = read_sample_inputs(settings, batch_size, keep)   # from Python: checked, plain
    s = settings.resolved(pipe.variant, pipe.mmdit.cfg.depth)
    check_text_inputs(pipe, prompts, negative, embeddings, s.cfg)
    check_seed(s.seed, len(prompts))
    return prompts, s, batch_size


PROMPTS_AHEAD = 100     # generate() encodes this many (whole batches) at a time: SD3.5's 5.5 MB each in fp32


def embedded_batches(pipe: Pipeline, prompts: list[str], negative: str, s: SampleSettings, embeddings,
                     batch_size: int):
    """generate()'s batches: (seeds, cond, uncond) on pipe.device (uncond None if none), the prompts encoded
    PROMPTS_AHEAD at a time (thousands at once took GBs of RAM). With offload the text encoders visit the GPU
    once a chunk, the MMDiT and the VAE once where they fit there together, else in turn for each batch."""
    ahead = batch_size * math.ceil(PROMPTS_AHEAD / batch_size)
    fit_together = pipe.offload and not too_large_for(pipe.device, pipe.mmdit, pipe.vae)
    for start in range(0, len(prompts), ahead):
        if embeddings is None:
            with pipe.on_device(*pipe.text.modules()):
                cond, uncond = encode_in_batches(pipe.text, prompts[start:start + ahead], negative, s.cfg,
                                                 batch_size)
        else:                               # the caller's (training's previews): rows sliced, not copied
            cond, uncond = ([t[start:start + ahead] for t in half] if half else None for half in embeddings)
        with pipe.on_device(*((pipe.mmdit, pipe.vae) if fit_together else ())):
            for i in range(0, len(cond[0]), batch_size):
                c = [t[i:i + batch_size].to(pipe.device) for t in cond]
                u = [t[i:i + batch_size].to(pipe.device) for t in uncond] if uncond else None
                yield range(s.seed + start + i, s.seed + start + i + len(c[0])), c, u


@contextlib.contextmanager
def in_eval_mode(model: nn.Module):
    """generate's model in eval mode (LoRA dropout off, as the Trainer's previews), then each module's own."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield model.eval()
    finally:
        for module, training in modes:
            module.training = training


def read_prompts(prompts) -> list[str]:
    """TextEncoders.encode's prompts: one text, or a list, tuple, numpy or pandas array of texts."""
    prompts = listed(prompts, "prompts")
    if not all(isinstance(text, str) for text in prompts):       # None, bytes: else the tokenizers' traceback
        raise UserError(f"prompts must be text (str) or a list of texts, got {prompts!r:.60}")
    return prompts


def check_image_batch(images, call: str = "VAE.encode", channels: int = 3):
    """VAE.encode's images, VAE.decode's latents: GroupNorm's error for one (C, H, W) names neither the shape
    nor the fix; uint8 pixels in 0..255 would be encoded silently as if in [-1, 1]."""
    tensor = isinstance(images, torch.Tensor)
    if not (tensor and images.ndim == 4 and images.shape[1] == channels):
        shown = f"a tensor of shape {tuple(images.shape)}" if tensor else repr(images)
        what = (f"latents (B, {channels}, H/8, W/8) (one: latents[None])" if call == "VAE.decode" else
                "images (B, 3, H, W) in [-1, 1] (one: images[None]; load_image reads a file)")
        raise UserError(f"{call} takes {what}, not {shown:.60}")
    if call == "VAE.encode" and not images.is_floating_point():
        raise UserError(f"VAE.encode takes images in [-1, 1], not {str(images.dtype)[6:]} pixels: scale "
                        f"them, e.g. pixels / 127.5 - 1 for 0..255")


def nan_images_error(pipe: Pipeline, text_encoded: bool) -> UserError:
    """generate()'s error for NaN/inf images, naming a damaged weight of the models that ran, if any."""
    modules = [pipe.mmdit, pipe.vae, *(pipe.text.modules() if text_encoded else [])]
    fp32 = next(pipe.vae.parameters()).dtype == torch.float32      # the run's (fp8: only the MMDiT's weights)
    return UserError("sampling gave NaN/inf values (black images): " + nan_advice(
        modules, "lower the cfg/LoRA scale" + " or use fp32" * (not fp32)))


def read_sample_inputs(settings: SampleSettings | None, batch_size, keep=None) -> tuple[SampleSettings, int]:
    """generate()'s settings, batch_size and keep from Python, the numbers read as a config file's: text, None
    where no preset stands in, or a dict is a one-line error, not a TypeError from deep inside torch."""
    if not isinstance(settings, (SampleSettings, type(None))):
        raise UserError(f"settings must be a SampleSettings, e.g. SampleSettings(steps=20) or "
                        f"SampleSettings(**a_dict), not a {type(settings).__name__}")
    settings, plain = settings or SampleSettings(), {}
    preset = PRESETS["sd3.5-medium"]            # a setting a preset has may be None: the variant's value
    for f in dataclasses.fields(settings):      # whole or real as the preset's value, else as the default
        value, example = getattr(settings, f.name), getattr(preset, f.name, f.default)
        if isinstance(example, (int, float)) and not (value is None and hasattr(preset, f.name)):
            plain[f.name] = read_number(value, isinstance(example, int), f"settings.{f.name}")
    layers = settings.slg_layers               # 7, or "7,8,9" as sample.py's flag reads: no list of blocks
    if isinstance(layers, (str, bytes)) or not (layers is None or hasattr(layers, "__iter__")):
        raise UserError(f"settings.slg_layers must list joint blocks, e.g. (7, 8, 9), not {layers!r:.60}")
    if layers is not None:                                      # range(7, 10) too
        plain["slg_layers"] = tuple(read_number(i, True, "each of settings.slg_layers") for i in layers)
    batch_size = read_number(batch_size, True, "batch_size")
    if batch_size < 1:                                  # range() would say "arg 3 must not be zero"
        raise UserError(f"batch_size must be 1 or more, not {batch_size}")
    if keep and not callable(keep):                     # keep=True: a TypeError after the first batch's work
        raise UserError(f"keep takes a function of each batch's images, e.g. a_list.extend, not {keep!r:.60}")
    return dataclasses.replace(settings, **plain), batch_size


def read_lora_inputs(rank, alpha, dropout, targets) -> tuple[int, float | None, float]:
    """add_lora's arguments from Python, read as a config file's -> (rank, alpha, dropout): rank "4" or 4.0
    would fail in torch, alpha "8" at the first forward, dropout 1.5 in nn.Dropout (-0.1: silently none)."""
    rank, dropout = read_number(rank, True, "rank"), read_number(dropout, False, "dropout")
    alpha = alpha if alpha is None else check_alpha(read_number(alpha, False, "alpha"), rank)
    if not (0 <= dropout < 1 and isinstance(targets, str)):
        raise UserError(f"dropout must be in 0..1 (below 1) and targets text (attn, attn_mlp, all or "
                        f"regexes, comma-separated): got {dropout} and {targets!r:.60}")
    return rank, alpha, dropout


def check_alpha(alpha: float, rank: int, prefix: str = "") -> float:
    """`alpha` if a LoRA trained with it works (the config's lora.alpha, add_lora's), else a UserError."""
    most = LORA_METADATA["alpha"][2]                    # the alpha load_lora takes from the files a run saves
    if not (alpha and abs(alpha) <= most):              # (kohya reads 0 as alpha = rank)
        raise UserError(f"{prefix}alpha {alpha:g} is outside what works: 0 trains nothing, load_lora refuses "
                        f"more than {most:g} either way; use e.g. {prefix}alpha = {prefix}rank ({rank})")
    return alpha


def validate(cfg: Config) -> Config:
    """Reject bad values before any model is loaded, instead of hours into a run. -> a copy, its values read
    as a config file's: a Config made in Python may hold Path objects, which the state file's JSON cannot."""
    if not isinstance(cfg, Config):                    # e.g. train("config.yaml"), which asdict cannot read
        raise UserError(f"train() takes a Config, e.g. load_config('config.yaml'), not {cfg!r:.60}")
    cfg = _fill(type(cfg)(), dataclasses.asdict(cfg))
    flat = flat_config(cfg)
    for key, options in CHOICES.items():
        if flat[key] not in options:
            raise UserError(f"config key '{key}' is {flat[key]!r} (valid: {', '.join(map(repr, options))})")
    for key, (lowest, highest) in RANGES.items():
        if not lowest <= flat[key] <= highest:                          # `not`: NaN fails too
            bound = f"at least {lowest}" if highest == math.inf else f"in {lowest}..{highest}"
            raise UserError(f"config key '{key}' must be {bound}, got {flat[key]}")
    if not cfg.train.lr > 0:
        raise UserError(f"'train.lr' must be above 0, got {cfg.train.lr}")
    lo, hi = SHIFT_RANGE
    if cfg.sample.shift and not lo <= cfg.sample.shift <= hi:       # else refused once the model has loaded
        raise UserError(f"'sample.shift' must be 0 (the variant's preset) or in {lo:g}..{hi:g}, "
                        f"got {cfg.sample.shift}")
    if cfg.train.timestep_sampling == "mode" and not -1 <= cfg.train.mode_scale <= 2 / (math.pi - 2):
        raise UserError(f"'train.mode_scale' must be in -1..1.75 (SD3 paper), got {cfg.train.mode_scale}")
    if not cfg.lora.dropout < 1:                        # 1: every LoRA input is 0, it trains nothing
        raise UserError(f"'lora.dropout' must be below 1 (a fraction, e.g. 0.1), got {cfg.lora.dropout}")
    check_size(cfg.sample.width, cfg.sample.height, "sample.width and sample.height")   # else after loading
    check_seed(cfg.sample.seed, len(cfg.sample.prompts), "sample.seed")   # else every preview fails
    if len(cfg.sample.prompts) > 100:                   # previews sample_00..99
        raise UserError(f"sample.prompts lists {len(cfg.sample.prompts)} prompts: give at most 100")
    # SD3.5 Medium's position table, SD3's largest, covers 6144 px per side (Large's 3072: the model says so)
    if not 64 <= cfg.dataset.resolution <= 6144 or cfg.dataset.resolution % 64:
        raise UserError(f"dataset.resolution must be a multiple of 64 in 64..6144 (no SD3 model takes larger "
                        f"images), got {cfg.dataset.resolution}")
    check_alpha(cfg.lora.alpha, cfg.lora.rank, "lora.")
    # parsed now, not after the dataset is cached; no SD3 model has more than Large's 38 blocks
    if not target_regexes(cfg.lora.targets) or not parse_blocks(cfg.lora.blocks, 38):
        raise UserError(f"lora.targets {cfg.lora.targets!r} in lora.blocks {cfg.lora.blocks!r} select "
                        f"nothing: use attn, attn_mlp, all or regexes, and blocks such as '0-11'")
    return cfg


def check_sources(cfg: Config):
    """A device typo ('gpu') or one torchrun cannot use, or a missing model path: refused before the scan."""
    device, world = pick_device(cfg.device, "set device: cpu (--set device=cpu)"), rank_and_world()[1]
    if under_torchrun() and device.type == "cuda" and cfg.device not in ("auto", "cuda"):
        raise UserError(f"device {cfg.device} under torchrun puts every process on one GPU: use auto or cuda")
    if cfg.train.compile:
        check_compile(device, cfg.fp8)
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if world > 1 and missing and not dist.is_initialized():     # exported, then a plain `python`: traceback
        raise UserError(f"WORLD_SIZE is {world} but {', '.join(missing)} {'are' if missing[1:] else 'is'} "
                        f"not set: start the processes with torchrun (README: Several GPUs), or unset "
                        f"WORLD_SIZE to train in one", own=True)
    for key in ("model", "text_encoders", "vae") if cfg.model != "tiny" else ():    # tiny reads none
        if getattr(cfg, key):
            local_model(getattr(cfg, key), key)     # hub ids are looked up (downloaded) after the scan


def read_yaml(path: str, text: str | None = None):
    """A YAML file (or `text`, named `path` in errors), refusing a key given twice in one section: YAML would
    silently keep only the last. Numbers, dates and booleans stay text, as written: _coerce reads them."""
    import yaml

    def unique_keys(loader, node):
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value in seen:
                raise UserError(f"{path} line {key.start_mark.line + 1}: '{key.value}' is given twice in one "
                                f"section, and YAML keeps only the last: merge the two")
            seen.add(key.value if isinstance(key, yaml.ScalarNode) else id(key))
        return loader.construct_mapping(node, deep=True)
    loader = type("UniqueKeyLoader", (yaml.SafeLoader,), {})
    loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, unique_keys)
    # YAML 1.1 rewrites paths, prompts: `010` as 8, `2024_01` 202401, `1:30` 90, `2024-1-5` a date, `no` false
    drop = tuple(f"tag:yaml.org,2002:{kind}" for kind in ("int", "float", "timestamp", "bool"))
    loader.yaml_implicit_resolvers = {first: [(tag, regex) for tag, regex in resolvers if tag not in drop]
                                      for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    for tag in drop:                # `!!int x`, `!!bool maybe` too: text, which _coerce reads or refuses
        loader.add_constructor(tag, yaml.SafeLoader.construct_scalar)
    text = file_path(path, "a YAML config file").read_text(encoding="utf-8") if text is None else text
    return yaml.load(text, loader)


def yaml_escape_error(e: Exception) -> bool:
    """YAML's error for a backslash in double quotes that starts no escape ("C:\\Users": \\U)."""
    return "escape" in (getattr(e, "problem", None) or "")


def load_config(path: str | dict | None, overrides: list[str] | str | None = ()) -> Config:
    """Config from YAML (or a dict of its keys) plus `a.b=value` overrides (values as YAML), validated."""
    import yaml
    config = Config()
    if path is not None:            # None alone means no file: 0, False, "" or [] is a mistake
        if path == "" or not isinstance(path, (str, os.PathLike, dict)):
            raise UserError(f"give the path of a YAML config file or a dict of its keys, not {path!r:.60}")
        try:
            _fill(config, path if isinstance(path, dict) else read_yaml(path) or {})
        except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as e:    # (deep nesting)
            why = str(e).splitlines()[0]    # YAML's syntax errors put the line and the problem below this
            if getattr(e, "problem_mark", None) and e.problem:
                why = f"line {e.problem_mark.line + 1}: {e.problem}"
            if yaml_escape_error(e):
                why = f"{why}; {WINDOWS_PATHS}"
            raise UserError(f"cannot read {path} as UTF-8 YAML: {why}") from None
    for item in [overrides] if isinstance(overrides, str) else overrides or ():     # one as text, or None
        key, sep, raw = str(item).partition("=")
        if not (sep and isinstance(item, str)):         # ("train.lr", 1e-4), ["train.lr=1e-4"]: no --set text
            raise UserError(f"--set expects key=value (e.g. train.lr=5e-5), got {item!r}")
        if LONE_SURROGATE.search(item):                 # YAML would say "special characters are not allowed"
            raise UserError(f"--set {item!r:.60} is not UTF-8 text: set the terminal to UTF-8")
        try:
            nested = read_yaml(f"--set {item}", raw)    # "key=" is YAML's "key:" (null): prompts= -> none
        except (yaml.YAMLError, RecursionError) as e:   # (deep nesting, as in a file: no `problem`)
            problem, quoted = getattr(e, "problem", None), raw.strip().replace("'", "''")
            why = f" ({problem}): quote the value in YAML, e.g. --set \"{key.strip()}='{quoted}'\""
            if yaml_escape_error(e):
                why = f": {WINDOWS_PATHS}"
            elif raw.lstrip().startswith(("[", "'", '"')) or not problem:    # a shell split it at its spaces
                why = " (quote a list like '[a, b]' as a whole)"
            raise UserError(f"--set {item}: not valid YAML{why}") from None
        if raw.count("#") > str(nested).count("#"):     # a prompt's " #tag" and all after it: YAML's comment
            raise UserError(f"--set {item}: YAML drops ' #' and all after it as a comment: quote the value "
                            f"in YAML, e.g. --set \"{key.strip()}='a #b'\"")     # a shell removes bare quotes
        setting = key.strip().rpartition(".")[0]
        if setting in flat_config(Config()):            # model.x=1: not "quote it", as for a YAML mapping
            raise UserError(f"--set {item}: '{setting}' is a setting, not a section: --set {setting}=VALUE")
        for part in reversed(key.strip().split(".")):
            nested = {part: nested}
        _fill(config, nested)
    return validate(config)


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators LoRA dropout draws from: the CPU's, and the training GPU's where it trains on one."""
    states = {"rng.cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["rng.cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, torch.Tensor], device: torch.device):
    torch.set_rng_state(states["rng.cpu"])
    if "rng.cuda" in states and device.type == "cuda":                  # (saved and set on a GPU only)
        torch.cuda.set_rng_state(states["rng.cuda"], device)


def save_training_state(path: Path, params: list[nn.Parameter], opt: torch.optim.Optimizer, step: int,
                        cfg: Config, changes: list[str], data: str = "", model: str = ""):
    """LoRA, AdamW moments, step, RNG states, config, changes, model_id: one safetensors file (no pickle)."""
    moments = {f"opt.{i}.{k}": v for i, state in opt.state_dict()["state"].items() for k, v in state.items()}
    tensors = {f"param.{i}": p for i, p in enumerate(params)} | moments | rng_states(params[0].device)
    _atomic_save(tensors, path, {"step": str(step), "config": json.dumps(dataclasses.asdict(cfg)),
                                 "changes": json.dumps(changes), "world_size": str(rank_and_world()[1]),
                                 "data": data, "model": model})


def load_training_state(path: Path, params: list[nn.Parameter], opt: torch.optim.Optimizer, meta: dict):
    tensors = read_safetensors(path)             # `meta`: its header as prepare_resume read it -> the step
    def usable(t):      # copy_ would take bools as 0/1 and drop .imag; an inf exp_avg_sq stops its weight
        return t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) and t.isfinite().all()
    try:
        step, rng = int(meta["step"]), tensors["rng.cpu"]
        lora = [tensors[f"param.{i}"] for i in range(sum(k.startswith("param.") for k in tensors))]
        cuda = tensors.get("rng.cuda", rng)
        rng_intact = rng.shape == torch.get_rng_state().shape and rng.dtype == cuda.dtype == torch.uint8
        if not (rng_intact and all(map(usable, lora))):
            raise ValueError
    except (KeyError, ValueError, TypeError):
        raise UserError(f"{path} lacks step, config or RNG state, or a param.N, or one is damaged: start "
                        f"anew in another output_dir") from None
    if [t.shape for t in lora] != [p.shape for p in params]:
        raise UserError(f"{path} holds a LoRA of another shape (different lora.rank/targets/blocks?); "
                        f"resume with the run's config")
    with torch.no_grad():
        for p, saved in zip(params, lora):
            p.copy_(saved)
    state = {i: {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
             for i in range(len(params))}                  # load_state_dict moves them where AdamW wants them
    # a hand-edited file: AdamW would fail with a KeyError at the first step, or restart unnoticed
    def intact(m: dict, shape: torch.Size) -> bool:
        return (m.keys() == {"step", "exp_avg", "exp_avg_sq"} and m["step"].numel() == 1
                and all(map(usable, m.values())) and m["step"].item() >= 1  # AdamW's bias correction
                and m["exp_avg"].shape == m["exp_avg_sq"].shape == shape)
    bad = [i for i, m in state.items() if m and not intact(m, params[i].shape)]
    if bad or step and not any(state.values()):
        raise UserError(f"{path} holds damaged AdamW moments (opt.{bad[0] if bad else 0}.*): it cannot "
                        f"resume; start anew in another output_dir")
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    set_rng_states(tensors, params[0].device)
    print(f"resumed from {path} at step {step}")
    return step


STATE_FILE = "training_state.safetensors"        # in output_dir: what --resume continues from
# --resume refuses any changed key but these: trajectory-only ones (warned) and ones that change nothing saved
# (train.compile is warned: compiled kernels round differently, and with fp8 may run fp8 matmuls)
RESUME_WARN = ("text_encoders vae dataset.path dataset.resolution dataset.default_caption dataset.flip "
               "dataset.caption_dropout lora.dropout sample.shift").split() + [f"train.{k}" for k in (
                   "lr lr_schedule warmup_steps weight_decay max_grad_norm seed batch_size grad_accum "
                   "timestep_sampling logit_mean logit_std mode_scale weighting compile").split()]
RESUME_FREE = tuple("output_dir device dataset.cache_dir lora.format train.steps train.save_every "
                    "train.keep_last train.gradient_checkpointing train.loss_bins train.dist_timeout "
                    "sample.".split())


def drop_log_lines_after(log: Path, step: int):
    """log.jsonl without the lines past the checkpoint's step (a resume redoes them) and those that are no
    JSON object with a step (cut short, or stray bytes a crash left); lines of any JSON writer are kept.
    Line by line: a million steps' log read whole took 0.6 GB of RAM."""
    if log.is_file():
        _atomic_save(log_lines_up_to(log, step), log)


def log_lines_up_to(log: Path, step: int):
    """drop_log_lines_after's lines, read one at a time; the file is closed when the last is read. As bytes:
    written back as they were (Windows' CRLF stays CRLF; stray bytes, not UTF-8, fail json.loads)."""
    try:                                # (not _atomic_save's "cannot write": the write is not what failed)
        with open(log, "rb") as f:
            for line in f:
                with contextlib.suppress(ValueError, RecursionError):
                    entry = json.loads(line) if line.endswith(b"\n") else None    # the last may be cut short
                    if isinstance(entry, dict) and type(entry.get("step")) is int and entry["step"] <= step:
                        yield line
    except OSError as e:
        raise UserError(f"cannot read {log} ({e.strerror or e}): make it readable, or move it away to resume "
                        f"without its lines; it is unchanged") from None


def prepare_resume(path: Path, cfg: Config) -> tuple[list[str], dict]:
    """Refuse config changes that alter what the state `path` means. -> (the changes so far, its header)"""
    if not path.is_file():
        raise UserError(f"--resume: no {path} to resume from (no checkpoint yet, or another output_dir?): "
                        f"start the run anew without --resume, in an empty output_dir")
    try:                                       # the header only; keys added since the save get their defaults
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        config, step = json.loads(meta["config"]), int(meta["step"])
        was, world = int(meta.get("world_size", 1)), rank_and_world()[1]
        changes = json.loads(meta.get("changes", "[]"))
        if step < 0 or was < 1 or not (isinstance(changes, list) and isinstance(config, dict)):
            raise ValueError                                            # a hand-edited header
        saved = flat_config(_fill(Config(), config))
    except UserError as e:                  # _fill refused a key or value, e.g. one a newer version wrote
        raise UserError(f"{path}: this sd35_lora.py refuses its config ({e}); resume with the version that "
                        f"saved it, or start over in a new output_dir") from None
    except (OSError, SafetensorError, KeyError, TypeError, ValueError, RecursionError):
        raise UserError(f"{path} lacks a readable step and config: start over in a new output_dir") from None
    before = saved["train.batch_size"] * saved["train.grad_accum"] * was   # kept: exact on any world size
    kept = before == cfg.train.batch_size * cfg.train.grad_accum * world
    if world != was and not kept:
        recorded = f"{path} had a global batch of {before} on {counted(was, 'process')}"
        if before % world:                             # no whole batch_size x grad_accum keeps it
            counts = [str(n) for n in range(1, before + 1) if before % n == 0]
            raise UserError(f"{recorded}: {world} processes cannot share it; resume on a process count that "
                            f"divides {before} ({', '.join(counts)})")
        raise UserError(f"{recorded}: on {world}, keep it with train.batch_size x train.grad_accum = "
                        f"{before / world:g}, or resume on {was}")
    # the same global batch on another split: no change, unless LoRA dropout's masks follow the split
    split = ("train.batch_size", "train.grad_accum") if kept and not cfg.lora.dropout else ()
    changed = {k: f"{k} {saved[k]!r} -> {v!r}" for k, v in flat_config(cfg).items()
               if saved[k] != v and k not in split}
    warn = RESUME_WARN + ["train.steps"] * (cfg.train.lr_schedule == "cosine")     # it moves a cosine's decay
    if "model" in changed and meta.get("model"):     # (older versions recorded no id; tiny has none)
        root = resolve_model(cfg.model, ("transformer",), download=False) if cfg.model != "tiny" else None
        if meta["model"] == model_id(root):             # (a hub id: its download, if cached)
            changed["model"], warn = changed["model"] + " (the same weights, moved)", warn + ["model"]
    refused = [c for k, c in changed.items() if k not in warn and not k.startswith(RESUME_FREE)]
    if refused:
        raise UserError(f"--resume with changed {'; '.join(refused)}: the saved LoRA and optimizer state "
                        f"would mean something else. Resume with the run's values, or use another output_dir")
    warned = [c for k, c in changed.items() if k in warn]
    if warned and rank_and_world()[0] == 0:              # torchrun: once, not once per process
        print(f"warning: resumed with changed {'; '.join(warned)} (recorded in the LoRA)", file=sys.stderr)
    return changes + ([f"step {step}: {'; '.join(warned)}"] if warned else []), meta


def note_resume(trainer: Trainer, header: dict):
    """A resume's warnings: images or captions edited, added or removed under the same dataset.path (recorded,
    as a changed config key is), and no step left to train. `header`: the state file's ({} fresh: none)."""
    saved, steps = header.get("data", ""), trainer.cfg.train.steps  # older state files: no digest to compare
    if saved and saved != trainer.data.contents:
        trainer.changes.append(f"step {trainer.step}: the images or captions in dataset.path")
        if trainer.rank == 0:
            print("warning: resumed after the images or captions in dataset.path changed (recorded in "
                  "the LoRA)", file=sys.stderr)
    if header and trainer.step >= steps and trainer.rank == 0:     # e.g. a finished run resumed as it was
        print(f"warning: nothing to train: the checkpoint is at step {trainer.step} and train.steps is "
              f"{steps}; raise train.steps (--set train.steps=...) to train on", file=sys.stderr)


def check_one_checkpoint(header: dict, world: int, out: str):
    """torchrun: every process resumes from the same state file (`header`), not each machine's own output_dir
    (they would train apart, or hang at a collective the others never reach, when their steps differ)."""
    seen = [None] * world
    collective(dist.all_gather_object, seen, header)
    if any(other != header for other in seen):
        steps = sorted({int(other["step"]) for other in seen})
        differ = sorted({key for other in seen for key in other.keys() | header.keys()
                         if other.get(key) != header.get(key)})
        which = (f"steps {', '.join(map(str, steps))}" if len(steps) > 1 else
                 f"all at step {steps[0]}, saved with another {' and '.join(differ)}")
        raise UserError(f"--resume: the processes found different checkpoints in output_dir {out} ({which}): "
                        f"put output_dir on a file system every machine sees, or copy process 0's there to "
                        f"each machine")


#################################################################################
#                                 Dataset Files                                 #
#################################################################################

# thumbnails (Synology, QNAP), recycle bins (NAS, Windows), a Mac zip's metadata: no images to train on. In
# any case, as Windows finds them (its system drive's bin is $Recycle.Bin): casefolded names
NOT_DATA = {"@eadir", "@__thumb", "#recycle", "@recycle", "#snapshot", "@recently-snapshot", "$recycle.bin",
            "__macosx", "system volume information", "lost+found"}
# pictures in formats not read (phones' .heic, Windows' .jfif for web images): named, not left out unsaid
OTHER_IMAGE_EXTS = {".avif", ".gif", ".heic", ".heif", ".jfif", ".jpe", ".jxl", ".tif", ".tiff"}


def caption_files(files: list[Path]) -> dict[Path, Path]:
    """The .txt files of the scan's listing by path without it, of any case (of a.TXT and a.Txt, a.TXT: the
    last here): read_caption's, without a second listing or eight stats for each image without a caption."""
    txts = sorted((p for p in files if p.suffix.lower() == ".txt"), reverse=True)
    return {p.with_suffix(""): p for p in txts}


def read_caption(image: Path, captions: dict[Path, Path]) -> tuple[str | None, Path]:
    """-> (the image's .txt caption or None, that file), `captions` caption_files'. A bad byte is refused
    (no silent ?), and so is a NUL: UTF-16 without a BOM reads as UTF-8 silently, 'b\\x00l\\x00u\\x00e'."""
    path = image.with_suffix(".txt")
    if not path.exists():           # a.TXT, a.Txt: Windows and macOS open them as a.txt, Linux from a listing
        path = captions.get(image.with_suffix(""), path)
    if path.exists() and not (path.is_file() or path.is_dir()):    # a named pipe: reading it never ends
        return None, path               # (files_under leaves it out: its image is uncaptioned)
    try:
        text = path.read_text(encoding="utf-8-sig")
        if "\x00" in text:
            raise UnicodeError("it holds NUL characters (UTF-16 text without a BOM?)")
    except FileNotFoundError:
        return None, path
    except (OSError, UnicodeError) as e:          # (no permission; a folder named a.txt; a bad byte)
        fix = "save it as UTF-8 text" if isinstance(e, UnicodeError) else "make it a readable file"
        raise UserError(f"caption {path}: {getattr(e, 'strerror', None) or e}; {fix}") from None
    return text.strip(), path


def files_under(root: Path) -> tuple[list[Path], list[str]]:
    """Every file below root but macOS's ._name files and hidden images, through symlinked folders too (people
    link image folders into a dataset), each real folder once: a link to a parent is no loop. -> (files, what
    was left out, as the dataset line says: hidden images, hidden and NOT_DATA folders, named pipes);
    unreadable folders warned."""
    seen, files, folders, hidden, special, errors = set(), [], [], [], [], []
    for folder, subfolders, names in os.walk(root, followlinks=True, onerror=errors.append):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        # ._name: macOS's metadata twin of each file copied to a foreign disk or zipped, no image or caption
        for path in (Path(folder, name) for name in names if not name.startswith("._")):
            if path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTS:    # as kohya's glob and
                hidden.append(os.path.relpath(path, root))                    # Hugging Face datasets do
            elif os.path.isfile(path) or not os.path.exists(path):     # (a broken link: named by the scan)
                files.append(path)
            else:       # a named pipe, socket or device named like an image or caption: reading it never ends
                special.append(os.path.relpath(path, root))
        for name in [name for name in subfolders if name.startswith(".") or name.casefold() in NOT_DATA]:
            subfolders.remove(name)
            folders.append(os.path.relpath(os.path.join(folder, name), root))
    # os.walk passes by a folder it may not list (a dataset.path missing or a file: named by scan_dataset),
    # and lists a link to a missing folder (a drive not mounted) as a file (images and .txt: named apart)
    locked = [f"{e.filename} ({e.strerror})" for e in errors
              if not isinstance(e, (FileNotFoundError, NotADirectoryError))]
    locked += [f"{p} (a link to the missing {os.readlink(p)})" for p in files if p.suffix.lower() not in
               {*IMAGE_EXTS, ".txt"} and os.path.islink(p) and not os.path.exists(p)]
    if locked and rank_and_world()[0] == 0:                             # torchrun: process 0 prints for all
        print(f"warning: skipped {counted(len(locked), 'folder')} that cannot be read: "
              f"{', '.join(locked[:5])}", file=sys.stderr)
    left_out = [(sorted(folders), "hidden, thumbnail or recycle folder", ""),
                (sorted(hidden), "hidden image", ""),
                (sorted(special), "named pipe or other special file", "named pipes and other special files")]
    return files, [f"{counted(len(names), one, many)}: {', '.join(names[:5])}" + ", ..." * (len(names) > 5)
                   for names, one, many in left_out if names]


def runs_folders(root: Path, files: list[Path], output_dir: str, cache_dir: str) -> list[Path]:
    """This run's output_dir and dataset.cache_dir where they lie below root, and earlier runs' output_dirs
    there (a new output_dir for each run, kept in the dataset folder): marked by their lock or state file."""
    own = [d for d in (Path(x).resolve() for x in (output_dir, cache_dir)) if root.resolve() in d.parents]
    marks = (LOCK_FILE, STATE_FILE)
    return own + [Path(os.path.realpath(p.parent)) for p in files if p.name in marks and p.parent != root]


def dataset_summary(root: Path, items: list[dict], in_runs: int, left_out: list[str]):
    """scan_dataset's last word: an error saying why no image is usable, or one line of what it found."""
    if not items:
        missing = "" if root.is_dir() else " (a file, not a folder)" if root.exists() else " (no such folder)"
        raise UserError(f"no usable images in dataset.path {root}{missing}: give a folder of images "
                        f"({', '.join(sorted(IMAGE_EXTS))}) with same-name .txt captions")
    left = [f"{in_runs} in runs' output_dir and cache_dir"] * (in_runs > 0) + left_out
    if rank_and_world()[0] == 0:
        folders = counted(len({i["path"].parent for i in items}), "folder")
        print(f"dataset: {counted(len(items), 'image')} in {folders} under {root}, searched recursively"
              + (f" (left out: {'; '.join(left)})" if left else ""))


def dataset_warnings(cfg: DatasetConfig, files: list[Path], paths: list[Path], broken: list[str],
                     uncaptioned: list[str], empty: list[str], large: list[str], small: list[str],
                     cropped: list[str]):
    """What scan_dataset found odd, from process 0 only (torchrun: not once per process)."""
    if rank_and_world()[0] != 0:
        return
    stems = collections.defaultdict(list)                          # image names by path without extension
    for path in paths:
        stems[path.with_suffix("")].append(path.name)
    shared = [" + ".join(names) for names in stems.values() if len(names) > 1]
    # kohya's N_name folders: N repeats of each image per epoch, which weights folders against each other
    # (N as kohya users write it: not dated or numbered folders, 2024_trip, 01_faces)
    repeats = sorted({p.parent.name for p in paths if re.fullmatch(r"[1-9]\d{0,2}_.+", p.parent.name)})
    asked = {str(path.with_suffix("")).casefold(): path.with_suffix(".txt") for path in paths}

    def opened(txt: Path) -> bool:      # scan_dataset asks for a.png's a.txt: macOS and Windows open A.txt
        caption = asked.get(str(txt.with_suffix("")).casefold())
        return caption is not None and caption.exists() and txt.exists() and os.path.samefile(caption, txt)
    orphans = [p.name for p in files if p.suffix.lower() == ".txt" and p.with_suffix("") not in stems
               and not opened(p) and not p.name.startswith(".")]      # .a.txt: files_under's hidden .a.png's
    others = sorted(p.name for p in files if p.suffix.lower() in OTHER_IMAGE_EXTS)
    kohya = sum(p.suffix.lower() == ".caption" for p in files)                # sd-scripts' captions
    hint = f"; kohya's .caption files are not read ({kohya} here): rename them to .txt" if kohya else ""
    read = f"images are read from {', '.join(sorted(IMAGE_EXTS))} files only"

    def eg(names: list[str]) -> str:
        return ", ".join(names[:5])
    said = [
        (large, f"skipped {counted(len(large), 'image')} over the limit of {MAX_PIXELS / 1e6:g} megapixels "
                f"(a guard against decompression bombs), e.g. {eg(large)}; save them smaller or as JPEG"),
        (broken, f"skipped {counted(len(broken), 'unreadable image')}: {eg(broken)}"),
        (small, f"{counted(len(small), 'image is', 'images are')} upscaled over 2x to a bucket around "
                f"dataset.resolution {cfg.resolution} px, so the LoRA learns blur, e.g. {eg(small)}; use "
                f"larger images or a lower dataset.resolution"),
        (cropped, f"{counted(len(cropped), 'image is', 'images are')} cropped to under half the picture to "
                  f"fit the widest aspect bucket, e.g. {eg(cropped)}; cut such images into parts"),
        (uncaptioned, f"{counted(len(uncaptioned), 'image has', 'images have')} no .txt caption, e.g. "
                      f"{eg(uncaptioned)}; using dataset.default_caption {cfg.default_caption!r}{hint}"),
        (empty, f"{counted(len(empty), '.txt caption is', '.txt captions are')} empty, e.g. {eg(empty)}; "
                f"an image with one trains unconditioned; delete such a .txt to use dataset.default_caption"),
        (shared, f"images sharing one caption file: {eg(shared)}"),
        (len({int(name.split("_")[0]) for name in repeats}) > 1, f"kohya's repeat folders ({eg(repeats)}): "
         f"each image trains equally often here, whatever its folder's number; copy images to weight them"),
        (orphans, f"{counted(len(orphans), '.txt caption has', '.txt captions have')} no image, e.g. "
                  f"{eg(orphans)}; {read}"),                                     # e.g. a .heic's caption
        (others, f"skipped {counted(len(others), 'image')} in formats not read, e.g. {eg(others)}; {read}"),
        (cfg.caption_dropout == 1, "dataset.caption_dropout is 1: every sample trains on the empty caption, "
                                   "so the LoRA learns none of the captions; for a share use e.g. 0.1")]
    for text in (text for when, text in said if when):
        print(f"warning: {text}", file=sys.stderr)


# Pillow's bomb guard warns past 89 MP (108 MP phone photos), refuses 200 MP ones; past this, a small file
# claiming e.g. 50,000 x 50,000 pixels would take gigabytes of RAM
MAX_PIXELS = 300_000_000


class TooLarge(ValueError):
    """An image over MAX_PIXELS that cannot be read smaller: not decoded."""


def image_gone(path: Path, e: OSError | TooLarge, own: bool, cache: Path) -> UserError:
    """The error for an image the scan read that cannot be read when its latents are cached (edited or
    removed); the scan memo that vouched for it is deleted, so that the next scan decodes anew."""
    with contextlib.suppress(OSError):
        (cache / SCAN_MEMO).unlink()
    why = e.strerror or e if isinstance(e, OSError) else f"over {MAX_PIXELS / 1e6:g} megapixels"
    return UserError(f"image {path} cannot be read ({why}), though the dataset scan read it: restore it, or "
                     f"run again to scan anew", own=own)


@contextlib.contextmanager
def open_image(path: Path, data: bytes | None = None):
    """Image.open with MAX_PIXELS for Pillow's limit. A JPEG over it is decoded at 1/2..1/8 scale (its cheap
    DCT scaling); any other image over it raises TooLarge, before it is decoded. `data`: the file's bytes."""
    from PIL import Image, UnidentifiedImageError
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None                  # checked here instead
    try:
        im = Image.open(path if data is None else io.BytesIO(data))
    except UnidentifiedImageError:                          # from bytes, Pillow names a BytesIO object
        raise UnidentifiedImageError(f"cannot identify image file {str(path)!r}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    with im:
        width, height = im.size
        scale = 2 ** math.ceil(math.log2(max(1.0, width * height / MAX_PIXELS)) / 2)
        if scale > 1:                                                 # draft: a no-op but for JPEG (MPO too)
            im.draft(im.mode, (width // scale, height // scale))
        if im.width * im.height > MAX_PIXELS:
            raise TooLarge(f"{path.name} ({width} x {height})")
        yield im


SCAN_MEMO = "images_scanned.json"         # in dataset.cache_dir


def read_scan_memo(cache_dir: str) -> dict:
    """{real path: [bytes, mtime_ns, ctime_ns, width, height]} of the images decoded before, or {}."""
    try:
        memo = json.loads((Path(cache_dir) / SCAN_MEMO).read_text())
    except (OSError, ValueError, RecursionError):       # RecursionError: nested a thousand deep (hostile)
        return {}
    return memo if isinstance(memo, dict) else {}


def image_size(path: Path, decoded: dict) -> tuple[int, int]:
    """(width, height) after EXIF rotation (phones rotate), decoding the file: a broken one fails here, not
    hours into training. Not decoded again (128 ms for 12 MP, each start) where `decoded` holds it with this
    size, mtime and ctime (cp -p, rsync -a, tar and chmod keep mtimes, not ctimes); new ones are added."""
    from PIL import ImageOps
    real, stat = os.path.realpath(path), path.stat()       # before decoding: an edit meanwhile is seen
    seen, times = decoded.get(real), [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    if isinstance(seen, list) and len(seen) == 5 and seen[:3] == times:
        if all(isinstance(side, int) and 0 < side <= MAX_PIXELS for side in seen[3:]):     # not hand-edited
            return seen[3], seen[4]
    with open_image(path) as im:
        width, height = ImageOps.exif_transpose(im).size
    decoded[real] = [*times, width, height]
    return width, height


def write_scan_memo(cache_dir: str, decoded: dict):
    """Adds `decoded` to the memo, if it holds news and cache_dir exists (a training run made it). Process 0
    writes (torchrun's others scan the same files); a failed write only costs decoding again."""
    if rank_and_world()[0] == 0 and Path(cache_dir).is_dir():
        memo = read_scan_memo(cache_dir)            # another run's scan may have added other images
        if {**memo, **decoded} != memo:
            with contextlib.suppress(UserError, OSError):
                _atomic_save(json.dumps({**memo, **decoded}), Path(cache_dir) / SCAN_MEMO)


def from_16_bit(im, path: Path):
    """16-bit grey (PNG: mode I;16, Pillow < 10.3: I) as 8-bit L, or LA where PNG's colour key (16-bit) marks
    transparent pixels: convert("RGB") would clip it to white, and an 8-bit copy loses a key of 16-bit values
    (or matches it to other pixels). 32-bit integers past 16 bits, or floats (TIFF): no one range to map."""
    import numpy as np
    from PIL import Image
    low, high = im.getextrema()
    if im.mode == "F" or not 0 <= low <= high <= 65535:
        raise UserError(f"image {path} holds 32-bit {'floats' if im.mode == 'F' else 'integers'} ({low:g}.."
                        f"{high:g}): save it with 8 or 16 bits per channel")
    grey, key = im.point(lambda v: v / 257).convert("L"), im.info.get("transparency")
    alpha = None if key is None else Image.fromarray(np.asarray(im) != key).convert("L")    # 0: the key
    return grey if alpha is None else Image.merge("LA", (grey, alpha))


def as_rgb(im, path: Path):
    """A decoded image upright (its EXIF rotation), 16-bit grey as 8-bit, transparent pixels (they store any
    colour: black, an erased background) shown on white as viewers do -> RGB."""
    from PIL import Image, ImageOps
    im = ImageOps.exif_transpose(im)
    im = from_16_bit(im, path) if im.mode[0] in "IF" else im    # PNG's 16-bit grey; 32-bit refused
    alpha = "A" in im.getbands() or "transparency" in im.info          # RGBA, LA, palette, colour key
    if alpha and (rgba := im.convert("RGBA")).getextrema()[3][1]:  # all alpha 0: an unused alpha (BMP)
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), rgba)
    return im.convert("RGB")


def note_odd_image(odd: dict, path: Path, caption: str | None, caption_file: Path, size: tuple[int, int],
                   bucket: tuple[int, int]):
    """Adds to `odd` (dataset_warnings' lists) what scan_dataset found odd in one image and its caption."""
    width, height = size
    odd["uncaptioned"] += [path.name] * (caption is None)
    odd["empty"] += [caption_file.name] * (caption == "")      # meant (unconditional), or a tagger's miss?
    odd["small"] += [f"{path.name} ({width}x{height})"] * (max(bucket[0] / width, bucket[1] / height) > 2)
    odd["cropped"] += [path.name] * (not 0.5 <= bucket[0] * height / bucket[1] / width <= 2)   # 1:10 strips


#################################################################################
#                                  Output Files                                 #
#################################################################################

def _digest(*parts, after=None) -> str:
    """Of the parts joined; `after`: a sha256 of bytes that come first, hashed once for several digests."""
    h = hashlib.sha256() if after is None else after.copy()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
    return h.hexdigest()[:32]


def _weights_digest(module: nn.Module) -> str:
    """Of the weights as loaded (~0.5 s for SD3's VAE): a file replaced under the same path changes it."""
    h = hashlib.sha256()
    for t in module.state_dict().values():
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def cache_share(path: Path, compute, source: str, layout: dict, rank: int, world: int) -> Path:
    """cached() for this process's share of the cache files (by the name's hash), else just the path. A
    refusal met here is this process's own (UserError.own): process 0 may never see it."""
    try:
        return cached(path, compute, source, layout) if int(path.stem, 16) % world == rank else path
    except UserError as e:
        e.own = True
        raise


def check_cache_shared(files: list[Path], rank: int, world: int):
    """torchrun, the cache built: one file of each other process's share is here too (else dataset.cache_dir
    is each machine's own; one each: a stat each of 20,000 on a network file system would take a while, and
    a machine's own disk holds the shares of all its processes)."""
    first = {int(f.stem, 16) % world: f for f in reversed(files)}       # each share's first file
    missing = [f for share, f in sorted(first.items()) if share != rank and not os.path.isfile(f)]
    if missing:
        raise UserError(f"cache file {missing[0]}, another process's share, is not in dataset.cache_dir "
                        f"here: put it (and output_dir) on a file system every machine sees")


CHECKED_FINITE = {"sd35_lora": "checked finite"}    # cache files' metadata: cached() refused NaN/inf before
HEADER_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


def cached(path: Path, compute, source: str = "", layout: dict | None = None) -> Path:
    """`path` if it reads, is finite (an older version's, or damaged on disk) and holds `layout`'s tensors,
    {name: (shape, dtype)} (an edited file is stale: not a KeyError hours into training); else `compute()`,
    written atomically. A file marked CHECKED_FINITE is read by its header (a 20,000-image cache: minutes)."""
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:                 # reads the header only
                marked = (f.metadata() or {}).items() >= CHECKED_FINITE.items()
                slices = {k: f.get_slice(k) for k in f.keys()}
                found = {k: (list(s.get_shape()), s.get_dtype()) for k, s in slices.items()}
            wanted = {k: (list(size), HEADER_DTYPES.get(dt)) for k, (size, dt) in (layout or {}).items()}
            other = layout is not None and found != wanted
            tensors = {} if marked or other else load_file(str(path))      # an older version's: read whole
            if not other and all(t.isfinite().all() for t in tensors.values()):
                return path
            why = "its tensors are not those this run writes" if other else "it holds NaN/inf"
            tqdm.write(f"warning: rebuilding cache file {path}: {why}", file=sys.stderr)
        except Exception:
            tqdm.write(f"warning: rebuilding unreadable cache file {path}", file=sys.stderr)
    tensors = compute()
    if not all(t.isfinite().all() for t in tensors.values()):     # cached, a NaN would fail every later run
        raise UserError(f"encoding {source or path} gave NaN/inf: the VAE or text encoder weights are "
                        f"damaged or overflow in this dtype; use dtype fp32 or bf16, or download them again")
    _atomic_save(tensors, path, CHECKED_FINITE)
    return path


def load_tensors(path: Path, *names: str) -> list[torch.Tensor]:
    """`names`' tensors of a cache file, the others not read (with dataset.flip: half a latent file), checked
    for NaN/inf here: of a file this version wrote, cached() reads the header, not damage on disk since."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = [f.get_tensor(name) for name in names]
    except (OSError, SafetensorError) as e:     # deleted (a shared cache cleaned up) or cut short since
        why = "deleted" if isinstance(e, FileNotFoundError) else e      # (its text repeats the path)
        raise UserError(f"cache file {path} cannot be read ({why}): run again (with --resume once a "
                        f"checkpoint was saved); the next start rebuilds it", own=True) from None
    if not all(t.isfinite().all() for t in tensors):    # else a NaN loss at this step, again on each --resume
        raise UserError(f"cache file {path} holds NaN/inf (damaged on disk since it was written): delete it; "
                        f"the next start rebuilds it", own=True)
    return tensors


def _replace_file(tmp: Path, path: Path):
    """os.replace, tried again on Windows: a virus scanner or an indexer opens a new file for a moment."""
    for wait in (0.1, 0.3, 0.6) if sys.platform == "win32" else ():
        with contextlib.suppress(PermissionError):
            return os.replace(tmp, path)
        time.sleep(wait)
    os.replace(tmp, path)


def _atomic_save(data, path: str | Path, metadata=None):
    """Tensors, text (or a generator of its lines as bytes) or a PIL image to a tmp file of this process,
    fsynced, renamed: never a half file."""
    path = file_path(path, "the file to write")
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
    replacing = False
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, dict):
            save_file({k: t.detach().contiguous().cpu() for k, t in data.items()}, tmp, metadata=metadata)
        elif isinstance(data, str):
            tmp.write_text(data)
        elif hasattr(data, "__next__"):                        # lines, written as they are read
            with open(tmp, "wb") as f:
                f.writelines(data)
        else:
            data.save(tmp, format="PNG", pnginfo=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0o022)                     # reading the umask means setting it: put it back at once
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)               # safetensors makes owner-only files; a LoRA is shared
        replacing = True                            # the folder took the write: only `path` itself can refuse
        _replace_file(tmp, path)
    except (OSError, SafetensorError) as e:        # safetensors reports a full disk as its own error
        # ... and any other OS error: its code is in its text (Windows': OSError maps that system's to errno)
        code = re.search(r"\(os error (\d+)\)", str(e)) if isinstance(e, SafetensorError) else None
        e = OSError(int(code[1]), str(e), None, int(code[1])) if code else e     # e.g. PermissionError
        denied = isinstance(e, PermissionError)   # replacing, on Windows: a file open in another program
        misplaced = isinstance(e, (FileExistsError, NotADirectoryError))    # mkdir met a file on the path
        # Windows without long paths refuses a path of 260 characters or more: not found (WinError 3 or 206)
        written = len(os.path.abspath(tmp))         # tmp's, the longer path, written first
        too_long = sys.platform == "win32" and isinstance(e, FileNotFoundError) and written >= 260
        full = out_of_space(e) or isinstance(e, SafetensorError)
        long_paths = (f"its path, {written} characters as the temporary file written first, is too long for "
                      f"Windows (259 at most): enable long paths (LongPathsEnabled)")
        fix = ("remove the folder of that name" if os.path.isdir(path)   # e.g. a cache file (never raises)
               else "rename the file on its path where a folder belongs" if misplaced
               else "close what holds it open (a viewer, ComfyUI)" if denied and replacing
               else "make its folder writable" if denied else long_paths if too_long
               else "free disk space" if full else "")     # e.g. a read-only disk, a name too long: no advice
        fix += " or " * bool(fix)
        raise UserError(f"cannot write {path} ({getattr(e, 'strerror', None) or e}): {fix}choose another "
                        f"folder; older files are intact") from None
    finally:
        with contextlib.suppress(OSError):          # where mkdir failed, unlink fails too: not over its error
            tmp.unlink()


def writable_dir(path: str | Path, what: str, read_only_if: tuple[str, ...] = ()) -> list[Path]:
    """Create the folder `path` and write there before any model loads: a bad output path costs no work.
    -> the folders it made, innermost first; refused, it removes them (rmdir removes none written into).
    read_only_if: subfolders whose presence gets a folder that refuses writes read as it is (a team's cache,
    mounted read-only); one without them is refused at once (a wrong path: no run's files to read there)."""
    # os.path's: Path.exists raises PermissionError under a folder one may not enter (mkdir's to refuse)
    made = [d for d in (Path(path), *Path(path).parents) if not os.path.exists(d)]
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path) as probe:
            probe.write(b"0")       # a full disk makes the file but refuses a byte (its close writes it)
    except OSError as e:
        remove_empty(made)
        filled = read_only_if and all(os.path.isdir(Path(path, folder)) for folder in read_only_if)
        if filled and not made and e.errno in (errno.EROFS, errno.EACCES):
            if rank_and_world()[0] == 0:                    # torchrun: once, not once per process
                print(f"warning: {what} {path} is read-only ({e.strerror}): read as it is; a file missing "
                      f"there fails the run once the models have loaded", file=sys.stderr)
            return made
        fix = "free disk space or give another" if out_of_space(e) else "give another"
        raise UserError(f"{what} {path} is not a writable folder ({e.strerror or e}): {fix}") from None
    return made


def remove_empty(made: list[Path]):
    """The folders writable_dir made (innermost first), those left empty: rmdir removes none written into."""
    for folder in made:
        with contextlib.suppress(OSError):
            folder.rmdir()


def out_of_space(e: Exception) -> bool:
    """A full disk, or the user's disk quota used up."""
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)


LOCK_FILE = ".sd35_lora.lock"       # hidden: no "earlier run's file" to the next run's check
RUNS_HERE = {}   # output_dir -> train()'s run there in this process: the lock keeps out other processes only


def lock_output_dir(out: Path, tries: int = 3):
    """-> an open file holding a lock on output_dir for the run's life: a second run there, fresh or --resume,
    is refused. The OS drops the lock with its process, so a killed run leaves none; a POSIX lock belongs to
    the process, so a notebook's failed run (kept by its traceback) does not block its next (Windows' msvcrt
    lock belongs to the open file). None where locks are refused (some network mounts)."""
    file = None
    try:
        file = open(out / LOCK_FILE, "a")
        if sys.platform == "win32":                                     # no fcntl there
            import msvcrt
            msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)          # EACCES (PermissionError) when held
        else:
            import fcntl
            fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # a failed run ending here unlinks its lock file (and removes `out` if it made it) maybe after we
            # opened it: locked, it must still be the file the path names (else FileNotFoundError: again)
            if not os.path.samestat(os.fstat(file.fileno()), os.stat(out / LOCK_FILE)):
                raise FileNotFoundError
        return file
    except OSError as e:
        if file is not None:
            file.close()
        if isinstance(e, FileNotFoundError) and tries > 1:
            writable_dir(out, "output_dir")
            return lock_output_dir(out, tries - 1)
        if file is None and isinstance(e, PermissionError):     # open() refused: no lock was tried
            raise UserError(f"the lock file {out / LOCK_FILE} cannot be opened ({e.strerror or e}): its "
                            f"owner or permissions keep this user out; choose another output_dir "
                            f"(--set output_dir=...)") from None
        if isinstance(e, (BlockingIOError, PermissionError)):   # EAGAIN or EACCES: another process holds it
            raise UserError(f"another run is using output_dir {out}: wait for it to end, or choose another "
                            f"output_dir (--set output_dir=...)") from None
        return None


def unlock_output_dir(lock):
    """Closes lock_output_dir's file, unlocked first on Windows: it frees a lock closed "after a delay"."""
    if sys.platform == "win32":
        import msvcrt
        msvcrt.locking(lock.fileno(), msvcrt.LK_UNLCK, 1)      # (the byte locked: nothing moved)
    lock.close()


def remove_if_unused(out: Path, made: list[Path]):
    """A failed run's output_dir holding nothing but its lock file, when the run made it, is removed, and so
    are the other folders it made while empty (its cache_dir, those above): no empty folder per failed try."""
    remove_empty(made)                                  # first a cache_dir it made in out
    with contextlib.suppress(OSError):
        if out in made and [p.name for p in out.iterdir()] == [LOCK_FILE]:
            (out / LOCK_FILE).unlink()
            remove_empty(made)                          # out now, and those above


def remove_killed_writes(folder: Path):
    """Hidden temporary files (as large as a LoRA or the training state) of writes a kill -9 or power cut
    ended, in `folder` and its subfolders, if over an hour old: a younger one may be another run's at work."""
    named = (".*.*[0-9]-" + "[0-9a-f]" * 8 + ".tmp",     # _atomic_save's .NAME.PID-RANDOM.tmp, and the
             ".tmp" + "[0-9A-Za-z]" * 6)                 # .tmpXXXXXX safetensors' save_file writes it through
    for tmp in [path for name in named for path in (*folder.glob(name), *folder.glob(f"*/{name}"))]:
        with contextlib.suppress(OSError):                  # (another run removed it first)
            if time.time() - tmp.stat().st_mtime > 3600:
                tmp.unlink()


EMPTY_PATH_ADVICE = {"model": "a diffusers folder, .safetensors, a hub id or 'tiny'",
                     "output_dir": "a new folder", "dataset.path": "the folder of images ('.': this one)",
                     "dataset.cache_dir": "a folder for the cache (e.g. cache)"}


def refuse_early(trainer: Trainer, resume: bool) -> tuple[list[str], dict]:
    """Bad resumes, paths and outputs, refused before the dataset scan and loading (torchrun: process 0 checks
    output_dir); sets trainer.lock and .made (the folders it makes). -> prepare_resume's result."""
    cfg, out, first = trainer.cfg, trainer.out, rank_and_world()[0] == 0   # torchrun's init comes later
    resume = read_flag(resume, "resume")
    # an empty path is the current folder: a dataset.path left blank would train on all images below it
    for key, value in flat_config(cfg).items():
        if not value and key in EMPTY_PATH_ADVICE:
            raise UserError(f"config key '{key}' is empty (YAML reads a bare ~ as null: write '~/...' or a "
                            f"full path): set it to {EMPTY_PATH_ADVICE[key]}")
        if key in ("output_dir", "dataset.cache_dir"):      # safetensors files written there are read back
            check_utf8_path(value, f"config key '{key}' ")
    # a live run holds its lock: "in use", not "--resume"/"no checkpoint" (no lock file made: it marks a run)
    # os.path's tests: Path's raise PermissionError under a folder one may not enter (writable_dir refuses it)
    lock = lock_output_dir(out) if first and os.path.exists(out / LOCK_FILE) else None
    if lock:
        unlock_output_dir(lock)
    resumed = prepare_resume(trainer.state_path, cfg) if resume else ([], {})
    # hidden files (macOS's .DS_Store in a folder made for the run) are no earlier run's
    shown = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if os.path.isdir(out) else []
    if not resume and first and shown:
        saved, data = trainer.state_path.is_file(), Path(cfg.dataset.path).resolve()
        if not saved and out.resolve() in (data, *data.parents):     # "empty it" deletes the images
            raise UserError(f"output_dir {out} holds dataset.path {cfg.dataset.path}: choose "
                            f"another output_dir (--set output_dir=...), outside the dataset")
        loras = not saved and any(out.glob("lora*.safetensors"))    # not to be emptied away
        marks = (LOCK_FILE, "log.jsonl", "loss.png", "samples_step_*")   # a lock stays, even where a run
        ran = saved or loras or any(any(out.glob(n)) for n in marks)    # stopped while caching into `out`
        if not ran:                         # e.g. ~/Pictures: "empty it" would delete the user's files
            raise UserError(f"output_dir {out} holds files that no run wrote (e.g. {shown[0]!r}): choose "
                            f"a new or empty output_dir (--set output_dir=...)")
        fix = ("continue it with --resume" if saved else "it holds LoRA files but no training state: "
               "move them away" if loras else "it saved no checkpoint: empty it")
        raise UserError(f"output_dir {out} already holds files of an earlier run; {fix} or choose "
                        f"another output_dir (--set output_dir=...)")
    check_sources(cfg)
    trainer.made = writable_dir(out, "output_dir")      # end_training removes them if empty
    trainer.lock = lock_output_dir(out) if first else None     # end_training lets it go (and out, if unused)
    trainer.made[:0] = writable_dir(cfg.dataset.cache_dir, "dataset.cache_dir",   # first: it may lie in out's
                                    read_only_if=("latents", "text"))
    for folder in (out, Path(cfg.dataset.cache_dir)) if first else ():
        remove_killed_writes(folder)
    if resume and first:                        # after the lock: a refused resume keeps a live run's log
        drop_log_lines_after(trainer.log_path, int(resumed[1]["step"]))
    return resumed


def save_checkpoint(trainer: Trainer):
    """lora_step_XXXXXX.safetensors, lora.safetensors (latest) and the resumable training state."""
    c, step = trainer.cfg, trainer.step
    if trainer.rank > 0:                                   # one writer: process 0
        return
    trained = ("lr", "batch_size", "timestep_sampling", "weighting")
    meta = {"base_model": c.model, "text_encoders": c.text_encoders, "vae": c.vae, "fp8": c.fp8,
            "variant": trainer.pipe.variant, "t5_length": c.t5_length, "use_t5": c.use_t5, "step": step,
            "targets": c.lora.targets, "resumed_with_changes": trainer.changes, "world_size": trainer.world,
            "global_batch": trainer.global_batch, "training": {k: getattr(c.train, k) for k in trained}}
    title = trainer.out.resolve().name                  # the run's name, as sd-scripts titles by output_name
    lora, header = lora_file(trainer.mmdit, c.lora.format, meta, title)   # written as the run's other files
    try:                                # a full disk ends the run; its last checkpoint, if any, resumes it
        _atomic_save(lora, trainer.out / f"lora_step_{step:06d}.safetensors", header)
        try:                            # the latest's copy: ComfyUI holding it open must not end the run
            _atomic_save(lora, trainer.out / "lora.safetensors", header)
        except UserError as e:
            if not isinstance(e.__context__, PermissionError):      # e.g. a full disk: that ends the run
                raise
            tqdm.write(f"warning: {e}; lora_step_{step:06d}.safetensors is the latest", file=sys.stderr)
        save_training_state(trainer.state_path, trainer.params, trainer.opt, step, c, trainer.changes,
                            trainer.data.contents, trainer.model_id)
    except UserError as e:
        raise UserError(f"{e}{'; then continue with --resume' * has_checkpoint(c)}") from None
    if c.train.keep_last:                               # 0: all kept; before the line, which `| head` can end
        remove_old_checkpoints(trainer.out, step, c.train.keep_last)
    tqdm.write(f"saved {trainer.out / f'lora_step_{step:06d}.safetensors'}")


def remove_old_checkpoints(out: Path, step: int, keep: int):
    """train.keep_last: the lora_step_*.safetensors past the newest `keep` deleted: only names save_checkpoint
    writes (a user's lora_step_best stays), none past `step` (a killed run's, which this one may skip)."""
    written = re.compile(r"lora_step_([0-9]{6}|[1-9][0-9]{6,})\.safetensors")     # f"{step:06d}"'s names
    steps = {int(m[1]): out / m[0] for m in map(written.fullmatch, os.listdir(out))
             if m and os.path.isfile(out / m[0])}           # a folder so named: no checkpoint, kept
    for old in sorted(s for s in steps if s <= step)[:-keep]:
        try:
            steps[old].unlink()
        except OSError as e:                # e.g. a viewer holding it open (Windows): the run goes on
            tqdm.write(f"warning: old checkpoint kept ({e}); a later save deletes it", file=sys.stderr)


def save_previews(trainer: Trainer):
    """Validation images for the configured prompts, with the same seeds at every step, each saved when done.
    A Ctrl-C or SIGTERM (train()'s trainer.stop) stops them after the image at work, before the last step:
    up to 100 take minutes (a scheduler's SIGKILL follows; torchrun's after 30 s). One process: --resume
    makes them."""
    sample, step = trainer.cfg.sample, trainer.step
    if not sample.prompts or trainer.rank > 0:
        return
    folder = trainer.out / f"samples_step_{step:06d}"
    names = (f"step_{step:06d}_sample_{i:02d}.png" for i in itertools.count())

    def save(images: list):
        for image, name in zip(images, names):
            _atomic_save(image, folder / name)
            tqdm.write(f"sample: {folder / name}")
        if trainer.stop and step < trainer.cfg.train.steps:
            raise KeyboardInterrupt
    bar = getattr(trainer, "bar", None)         # train()'s; none on a Trainer a notebook samples by hand
    training = bar and bar.desc                 # train()'s words on the bar, put back after these
    try:            # loss.png first: with a preview missing (a killed run) --resume redoes both
        if trainer.log_path.is_file():
            plot_losses(trainer.log_path, trainer.out / "loss.png")
    except Exception as e:                      # e.g. a viewer holding it open on Windows: previews go on
        tqdm.write(f"warning: loss.png not redrawn ({type(e).__name__}: {e})", file=sys.stderr)
    try:
        if bar:                                                         # not a frozen bar
            bar.set_description(f"sampling {counted(len(sample.prompts), 'preview')}")
        trainer.pipe.vae.to(trainer.pipe.device)
        generate(trainer.pipe, sample.prompts, sample.neg, trainer.sample_settings,
                 embeddings=trainer.embeddings, progress=False, keep=save)
    except BrokenPipeError:                             # stdout's reader gone (`| head`): train() stops
        raise
    except KeyboardInterrupt:       # save()'s stop: one process saves this step; torchrun's others wait in
        if trainer.world == 1:      # the next step, whose stop flag ends every process after it
            raise
    except Exception as e:                              # a failed preview must not end a long run
        if out_of_memory(e):
            many = ["lower sample.sample_steps"] * (sample.sample_steps >= MANY_STEPS)   # GiBs of schedule
            e = memory_error(e, "in the previews", ["lower sample.width and sample.height"] + many)
        tqdm.write(f"warning: sampling at step {step} failed ({type(e).__name__}: {e}); training "
                   f"goes on", file=sys.stderr)
    finally:
        if bar:
            bar.set_description_str(training)
        trainer.pipe.vae.to("cpu")


def refuse_what_the_model_cannot_take(mmdit: MMDiT, cfg: Config, items: list[dict]):
    """Preview and bucket sizes past the loaded model's position table; LoRA targets it does not have."""
    if cfg.sample.prompts:                                              # else no previews use the size
        check_image_fits(mmdit, cfg.sample.height, cfg.sample.width, "lower sample.width and sample.height")
    w, h = max((item["size"] for item in items), key=max)               # the bucket with the longest side
    check_image_fits(mmdit, h, w, "lower dataset.resolution (a 4:1 bucket's long side is twice it)")
    lora_targets(mmdit, cfg.lora.rank, cfg.lora.targets, cfg.lora.blocks)


def start_trainer(cfg: Config, resume: bool) -> Trainer:
    """Trainer(cfg, resume), train()'s only run on its output_dir in this process (a notebook's or web UI's
    threads); failing (no images, a bad model, Ctrl-C while caching), end_training lets go of what it took."""
    trainer = Trainer.__new__(Trainer)
    trainer.claim = os.path.realpath(validate(cfg).output_dir)     # kept: a chdir would move a relative one
    if RUNS_HERE.setdefault(trainer.claim, trainer) is not trainer:    # atomic: one thread wins
        raise UserError(f"another run in this process (another thread) is using output_dir "
                        f"{cfg.output_dir}: wait for it to end, or choose another output_dir")
    try:
        trainer.__init__(cfg, resume)
    except BaseException as e:
        end_training(trainer, {})
        if not out_of_memory(e):
            raise
        raise stopped_by_memory(trainer, e)
    watch_updates(trainer)
    return trainer


def end_training(trainer: Trainer, old_handlers: dict):
    """train()'s last act: the signal handlers put back; the output_dir lock and the models' memory let go for
    the next run (after a fix, e.g. a smaller batch), though the Trainer lives on: in a notebook's traceback
    of the error, or until the garbage collector runs (its optimizer's hooks refer back to it)."""
    restore_signals(old_handlers)
    if getattr(trainer, "bar", None):   # also a failed run's: a notebook keeps it in the traceback, and tqdm
        trainer.bar.close()             # redraws an open bar with each line the next run prints
    if getattr(trainer, "lock", None):
        if sys.platform == "win32":
            unlock_output_dir(trainer.lock)     # before the unlink: Windows unlinks no open file
        remove_if_unused(trainer.out, trainer.made)     # POSIX: unlinked locked, which a run locking it next
        trainer.lock.close()                            # sees (lock_output_dir)
    if RUNS_HERE.get(getattr(trainer, "claim", None)) is trainer:      # a Trainer made by hand claims none
        del RUNS_HERE[trainer.claim]
    free_models(getattr(trainer, "pipe", None))
    if hasattr(trainer, "opt"):
        trainer.opt.state.clear()                   # AdamW's moments: twice the LoRA, in fp32


def free_models(pipe: Pipeline | None):
    """A call's own models to meta: no memory, and no copy to the CPU (train(), sample.py's main())."""
    for model in pipe.modules() if pipe else ():
        model.to("meta")


def watch_updates(trainer: Trainer):
    """trainer.rng_after_update: the RNG states after the last optimizer update (LoRA dropout draws on them);
    None inside an update, which an error can leave half done (AdamW's weight decay comes first)."""
    def after_update(*_):
        trainer.rng_after_update = rng_states(trainer.params[0].device)
    trainer.opt.register_step_pre_hook(lambda *_: setattr(trainer, "rng_after_update", None))
    trainer.opt.register_step_post_hook(after_update)
    after_update()


def out_of_memory(e: BaseException) -> bool:
    """The one test of running out of memory: torch's error (CUDA), a RuntimeError saying so (MPS), RAM's."""
    return (isinstance(e, torch.OutOfMemoryError) or isinstance(e, RuntimeError) and "out of memory" in str(e)
            or out_of_ram(e))


def out_of_ram(e: BaseException) -> bool:
    """Out of the CPU's memory: torch's CPU allocator says so, or Python raises MemoryError."""
    return isinstance(e, MemoryError) or isinstance(e, RuntimeError) and "DefaultCPUAllocator" in str(e)


def memory_error(e: BaseException, where: str, levers: list[str]) -> torch.OutOfMemoryError:
    """The one wording of running out of memory: which, where, how much more was asked for, the run's levers.
    The failed frames' tensors are let go: a notebook keeps the error, and its traceback, to its next one."""
    traceback.clear_frames(e.__traceback__)
    asked = re.search(r"[Tt]ried to allocate (?:([\d.]+ ?[KMGT]i?B)|(\d+) bytes)", str(e))
    size = asked and (asked[1] or f"{int(asked[2]) / 2**30:.2f} GiB")   # the CPU's in bytes; 0.00: RAM full
    others = "close other programs" if out_of_ram(e) or "MPS" in str(e) else "free the GPU of other programs"
    fixes = ", ".join(levers + ["or " * bool(levers) + others])      # (fp8 on: none)
    more = f" {size} more" if size not in (None, "0.00 GiB") else ""
    error = torch.OutOfMemoryError(f"out of {'memory (RAM)' if out_of_ram(e) else 'GPU memory'} {where}. "
                                   f"To fit{more}: {fixes}")
    error.__cause__ = e                             # torch's own message, in a traceback
    return error


def diverged(tr: Trainer, loss: float, grad_norm: float) -> UserError:
    """The error that stops a diverged run without saving: the last checkpoint on disk stays good."""
    last = tr.out / "lora.safetensors"                  # none before the first save_every
    last = (f"the last good checkpoint is {last}" if last.is_file()
            else "no checkpoint was saved yet: start again in a new or empty output_dir")
    fix = nan_advice([tr.mmdit], "lower train.lr or check the data")
    return UserError(f"loss became {loss} (gradient norm {grad_norm}) at step {tr.step + 1}; "
                     f"stopped without saving: {fix}; {last}")


def stopped_by_memory(tr: Trainer, e: BaseException) -> torch.OutOfMemoryError:
    """train()'s out-of-memory error in memory_error's words, with this config's levers for what ran out; in
    a step, or its checkpoint or previews, after a checkpoint of the last step completed (the LoRA whole)."""
    c, new, device = tr.cfg, " (a new run: --resume refuses it)", pick_device(tr.cfg.device)
    ram = out_of_ram(e) and device.type != "cpu"    # training on a GPU: RAM holds the models as they load
    bf16_runs = pick_dtype(None, device) == torch.bfloat16     # its default where it runs (MPS: macOS 14+)
    smaller = ([f"set fp8: true{new}"] * (not c.fp8 and not fp8_lacking(device))
               + [f"set dtype: bf16{new}"] * (c.dtype == "fp32" and bf16_runs))
    running = {frame.f_code for frame, _ in traceback.walk_tb(e.__traceback__)}  # what the error came through
    if not hasattr(tr, "embeddings"):           # the VAE, then the text encoders visit the GPU, in turn
        loaded, images = hasattr(tr, "pipe"), LatentDataset.encode_image.__code__ in running
        where = f"caching {'latents' if images else 'text embeddings'}" if loaded else "loading the models"
        t5_held = ram or not images or device.type == "cpu"     # in RAM all along; a GPU's in its own visit
        levers = smaller * (ram or not loaded) + [f"set use_t5: false{new}"] * (c.use_t5 and t5_held)
        levers += ["lower dataset.resolution"] * (images and not ram)
        return memory_error(e, f"while {where}; nothing new saved", levers)
    if not hasattr(tr, "bar"):
        return memory_error(e, "while moving the MMDiT to the GPU; nothing new saved", smaller)
    saving = save_checkpoint.__code__ in running
    if saving:
        where, levers = f"while saving the checkpoint of step {tr.step}", smaller
    elif save_previews.__code__ in running:             # in their finally: their own errors are warnings
        where, levers = f"in the previews at step {tr.step}", ["lower sample.width and sample.height"]
    else:                                               # the step's forward, backward or update
        w, h = tr.data.sizes[tr.order[tr.step % len(tr.order)][0]]
        where, tc = f"in training step {tr.step + 1} ({w}x{h} images)", c.train
        levers = (["lower train.batch_size (raise train.grad_accum to keep the batch)"] * (tc.batch_size > 1)
                  + ["lower dataset.resolution"]
                  + ["set train.gradient_checkpointing: true"] * (not tc.gradient_checkpointing) + smaller)
    saved = "it stopped inside the optimizer's update: nothing saved, the last checkpoint stays"
    if tr.rng_after_update:                         # the RNG as after that step: --resume continues exactly
        set_rng_states(tr.rng_after_update, tr.params[0].device)
        traceback.clear_frames(e.__traceback__)     # the failed tensors: the checkpoint may need their memory
        saved = checkpoint_after_memory(tr, second_try=saving)
    return memory_error(e, f"{where}; {saved}", [] if ram else levers)


def checkpoint_after_memory(tr: Trainer, second_try: bool) -> str:
    """stopped_by_memory's checkpoint of the last step, in words; out of memory again: what --resume has."""
    if tr.rank > 0:                             # (a step's images share a bucket: all usually ran out)
        return f"process 0 saves step {tr.step} if it ran out too"
    resume = "continue with --resume after a change below"
    try:
        save_checkpoint(tr)
        return f"checkpoint of step {tr.step} saved{' at a second try' * second_try} ({resume})"
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise
    latest = "none was saved before (start again in a new or empty output_dir)"
    with contextlib.suppress(OSError, SafetensorError, KeyError, TypeError):    # its header only
        with safe_open(str(tr.state_path), "pt") as f:
            latest = f"the latest is step {f.metadata()['step']}'s ({resume})"
    return f"the checkpoint of step {tr.step} could not be saved (out of memory again): {latest}"


def stop_with_checkpoint(tr: Trainer, terminated: bool):
    """train() stopped by Ctrl-C or SIGTERM: one checkpoint, then the shell's exit code for the signal. Out of
    memory saving it: as a step's checkpoint, a second try and the levers."""
    with contextlib.suppress(BrokenPipeError):      # stderr's reader gone too (`2>&1 | head`): saved still
        tr.bar.close()
    try:
        save_checkpoint(tr)
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise                                   # any other error: its own traceback
        raise stopped_by_memory(tr, e)
    exit_stopped(terminated, f" at step {tr.step}; checkpoint saved. Continue with --resume")


def plot_losses(log_path: Path, png_path: Path):
    """Loss curve (raw and moving average) against the step, with labelled axes, drawn with Pillow."""
    from PIL import Image, ImageDraw
    steps, losses = logged_losses(log_path)
    if len(losses) < 2:
        return
    window = max(2, len(losses) // 20)
    sums = [0.0, *itertools.accumulate(losses)]       # running sums: a window's sum is one subtraction
    smooth = [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(losses))]
    lo, hi, first, last = min(losses), max(losses), steps[0], steps[-1]
    W, H, left, pad = 800, 400, 70, 40

    def xy(step, loss):
        return (left + (W - left - pad) * (step - first) / ((last - first) or 1),
                H - pad - (H - 2 * pad) * (loss - lo) / ((hi - lo) or 1))
    im = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(im)
    draw.rectangle([left, pad, W - pad, H - pad], outline="gray")
    for k in range(5):                                   # tick values on both axes
        step, loss = first + (last - first) * k / 4, lo + (hi - lo) * k / 4
        x, y = xy(step, loss)
        draw.text((x - 10, H - pad + 5), f"{step:.0f}", fill="black")
        draw.text((5, y - 6), f"{loss:.4g}", fill="black")
    stride = math.ceil(len(losses) / (8 * (W - left - pad)))     # up to 16 points a pixel column: enough
    draw.line([xy(*point) for point in thinned(steps, losses, stride)], fill=(170, 190, 230), width=1)
    draw.line([xy(*point) for point in thinned(steps, smooth, stride)], fill=(20, 60, 180), width=2)
    draw.text((W // 2 - 15, H - 18), "steps", fill="black")
    draw.text((5, 10), f"loss (light: per step, dark: mean of {window}, last {smooth[-1]:.4f})", fill="black")
    _atomic_save(im, png_path)


def logged_losses(log_path: Path) -> tuple[list, list]:
    """(steps, losses) of log.jsonl, read line by line: a million steps' entries as dicts took 1 GB of RAM."""
    steps, losses = [], []
    with open(log_path) as f:
        for line in f:
            if line.strip():
                entry = json.loads(line)
                steps.append(entry.get("step", len(steps) + 1))      # a hand-made log: by line
                losses.append(entry["loss"])
    return steps, losses


def thinned(steps: list, values: list, stride: int):
    """(step, value) points to draw: the lowest and highest of each `stride` values, in their order, at the
    first one's step (stride 1: every point). A million steps in 690 pixel columns look the same (a few
    pixels differ)."""
    for start in range(0, len(values), stride):
        run = range(start, min(start + stride, len(values)))
        extremes = sorted({min(run, key=values.__getitem__), max(run, key=values.__getitem__)})
        yield from ((steps[start], values[i]) for i in extremes)


def previews_unfinished(trainer: Trainer) -> bool:
    """Whether this step (a run resumed) is a sample step whose previews a killed run left unfinished."""
    made = len(list(trainer.out.glob(f"samples_step_{trainer.step:06d}/*.png")))
    return trainer.every_or_last(trainer.cfg.sample.sample_every) and made < len(trainer.cfg.sample.prompts)


#################################################################################
#                          Several Processes (torchrun)                         #
#################################################################################

def under_torchrun() -> bool:
    """One of several processes: torchrun's, a job script's with MASTER_ADDR too (srun; a WORLD_SIZE alone
    may be a cluster's) or a caller's; else a plain run, whatever a stray RANK, LOCAL_RANK or job id says."""
    return env_number("WORLD_SIZE", 1) > 1 and ("MASTER_ADDR" in os.environ or dist.is_initialized())


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes): torchrun's. A plain run is process 0 whatever a stray RANK
    says (as process 1 it would hide its errors), of WORLD_SIZE if exported: check_sources refuses that."""
    rank = env_number("RANK", 0) if under_torchrun() else 0
    return rank, env_number("WORLD_SIZE", 1)


def env_number(name: str, unset: int) -> int:
    """torchrun's integer variable `name`; `unset` when it is absent or empty; a UserError if no integer."""
    try:
        return int(os.environ.get(name) or unset)         # empty (exported unset): not set
    except ValueError:
        raise UserError(f"the environment's {name}={os.environ[name]!r} is not a whole number: unset it (one "
                        f"process) or start the processes with torchrun, which sets it") from None


def local_rank() -> int:
    """This process's number on its machine, and its GPU: torchrun's LOCAL_RANK, 0 for a plain run."""
    return env_number("LOCAL_RANK", rank_and_world()[0]) if under_torchrun() else 0


def join_processes(cfg: Config):
    """Join the torchrun job, once: NCCL between GPUs, gloo on the CPU."""
    device = pick_device(cfg.device)
    if rank_and_world()[1] > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        collective(dist.init_process_group, "nccl" if device.type == "cuda" else "gloo",
                   timeout=datetime.timedelta(seconds=cfg.train.dist_timeout))


def init_distributed(cfg: Config, buckets: list[tuple[int, int]] = (), header: dict | None = None):
    """Join the torchrun job (join_processes); with --resume's `header`, refuse processes that found different
    checkpoints, before the caching (minutes to hours); print the global batch; warn where no aspect bucket
    (`buckets`: the images') fills it, or the run ends in the lr warmup. -> (rank, world)"""
    join_processes(cfg)
    (rank, world), tc = rank_and_world(), cfg.train
    if header and world > 1:
        check_one_checkpoint(header, world, cfg.output_dir)
    batch, most = tc.batch_size * tc.grad_accum * world, max(collections.Counter(buckets).values(), default=0)
    print(f"global batch {batch} = {counted(world, 'process')} x batch_size {tc.batch_size} x "
          f"grad_accum {tc.grad_accum}")
    if 0 < most < batch and rank == 0:
        print(f"warning: no aspect bucket holds a global batch of {batch} images (the largest holds {most}); "
              f"a step's images share one bucket, so steps train on {most} or fewer: lower the global batch "
              f"(batch_size x grad_accum x processes) or add images", file=sys.stderr)
    if tc.warmup_steps > tc.steps and rank == 0:    # e.g. --set train.steps=20 with the default 50: warned
        print(f"warning: train.warmup_steps {tc.warmup_steps} is more than train.steps {tc.steps}: the lr "
              f"peaks at {get_lr(tc.steps - 1, tc):.3g}, not train.lr {tc.lr:g}; lower train.warmup_steps "
              f"(e.g. --set train.warmup_steps={tc.steps // 10})", file=sys.stderr)
    return rank, world


def collective(call, *args, **kwargs):
    """`call` (joining, a barrier or an all-reduce of every process) -> its result; a process that died, or
    never came within train.dist_timeout, is a one-line UserError, in the training steps or out of them."""
    try:
        return call(*args, **kwargs)
    except RuntimeError as e:                       # a peer closed the connection (gloo), or the timeout
        lost = re.search("remote process|[Tt]imeout|[Tt]imed out", str(e))  # NCCL: a peer gone, a timeout
        if isinstance(e, dist.DistBackendError) and not lost:   # NCCL's own (at the first barrier: a small
            said = " ".join(str(e).split("Exception raised from")[0].split())  # /dev/shm), on one line
            raise UserError(f"{said} (NCCL's own error: fix what it names, then run again, with --resume "
                            f"once a checkpoint was saved)", own=True) from None
        # gloo's start with an 80-character "[/__w/.../tcp/pair.cc:553] ": dropped, so the cut keeps the cause
        said = re.sub(r"^\[\S+\] ", "", str(e).partition("\n")[0])
        said = said if len(said) <= 120 else said[:120].rsplit(". ", 1)[0]     # whole sentences if it can
        if "failed to listen" in said:      # process 0's store: MASTER_PORT taken, e.g. by another job
            raise UserError(f"{said}: MASTER_PORT {os.environ.get('MASTER_PORT')} is in use: pick another "
                            f"(torchrun: --master-port)", own=True) from None
        why = ("one died, or hung or was busy past train.dist_timeout (the others wait out process 0's "
               "previews and checkpoints: raise it if those take longer); run again, with --resume once a "
               "checkpoint was saved")
        if lost and call is dist.init_process_group:    # e.g. WORLD_SIZE=2 exported, and one process run
            why = ("the other processes never joined within train.dist_timeout: start them all (torchrun, "
                   "srun; one that failed says why), or unset WORLD_SIZE to train in one process")
        raise UserError(f"lost contact with the others ({said}): {why}", own=True) from None


def all_reduce_step(params: list[nn.Parameter], sums: torch.Tensor) -> torch.Tensor:
    """Sum the LoRA gradients and forward_backward's step sums over all processes in one collective."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]  # an empty slice adds nothing
    flat = torch.cat([g.flatten() for g in grads] + [sums.to(params[0].device)])
    collective(dist.all_reduce, flat)
    for p, grad in zip(params, flat[:-len(sums)].split([p.numel() for p in params])):
        p.grad = grad.view_as(p)
    return flat[-len(sums):].cpu()


#################################################################################
#                        Command Line and the Tiny Model                        #
#################################################################################

def tiny_tokenizer(t5: bool = False):
    """A character-level tokenizer (built in-process, no download) with CLIP's 77-token window. T5's, as T5's,
    ends a text with <eos> only: <bos> too could not be truncated to a t5_length of 1."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors, normalizers
    from transformers import PreTrainedTokenizerFast
    tokens = ["<pad>", "<unk>", "<bos>", "<eos>", *"abcdefghijklmnopqrstuvwxyz0123456789.,!-'"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"\s"), "")])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")            # one token per character
    tok.post_processor = (processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 3)])
                          if t5 else processors.BertProcessing(("<eos>", 3), ("<bos>", 2)))  # <bos> t <eos>
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<eos>", model_max_length=77)


@contextlib.contextmanager
def float32_on_cpu():
    """The caller's default dtype and device set aside: tensors made inside are float32, on the CPU."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(dtype)


@torch.random.fork_rng(devices=[])         # seeded: the same weights each time; the caller's RNG untouched
@float32_on_cpu()                           # and the same under a caller's float64 or GPU default (its RNG)
def tiny_pipeline(device="cpu", dtype=torch.float32, t5_length: int = 16, use_t5: bool = True) -> Pipeline:
    """A random tiny SD3.5 Medium (dual attention, qk-norm) with CLIP/T5: the real code paths on a CPU."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    torch.random.default_generator.manual_seed(0)        # torch.manual_seed would reseed every GPU's too
    tok = tiny_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=64, d_kv=16, d_ff=96, num_layers=2,
                                 num_heads=4, eos_token_id=3, decoder_start_token_id=0)) if use_t5 else None
    mmdit = MMDiT(MMDiTConfig(depth=3, hidden=64, heads=4, context_dim=64, pooled_dim=32 + 48,
                              pos_embed_max_size=32, qk_norm=True, dual_attention_layers=(0, 1)))
    vae = VAE(VAEConfig(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, groups=4))
    clip_l, clip_g = [CLIPTextModelWithProjection(CLIPTextConfig(     # 77 positions: CLIPTextConfig's default
        vocab_size=len(tok), hidden_size=w, intermediate_size=2 * w, projection_dim=w, num_hidden_layers=2,
        num_attention_heads=2, bos_token_id=2, eos_token_id=3, pad_token_id=3)) for w in (32, 48)]
    with torch.no_grad():  # a random encoder's posterior is as wide as its mean; narrow, like a trained one's
        vae.encoder.conv_out.bias[vae.cfg.latent_channels:] = -10.0
        for name, p in mmdit.named_parameters():  # small adaLN gates: near-identity blocks train well
            if "adaLN_modulation" in name:
                p.mul_(0.1)
    text = TextEncoders(clip_l, clip_g, t5, (tok, tok, tiny_tokenizer(t5=True)), t5_length=t5_length,
                        context_dim=64)
    for m in [mmdit, vae, *text.modules()]:
        m.to(dtype=dtype).eval().requires_grad_(False)
    return Pipeline(mmdit, vae, text, "sd3.5-medium", torch.device(device))


TINY_OWN_PARTS = "the tiny model has its own random text encoders and VAE: leave out {} and {}"
TINY_DATA = "runs/tiny_data"
TINY_RUN = ["model=tiny", "text_encoders=", "vae=", "device=cpu", "dtype=fp32", "t5_length=16",
            "dataset.cache_dir=runs/tiny_cache", f"dataset.path={TINY_DATA}", "dataset.resolution=64",
            "lora.targets=all", "train.save_every=30", "train.steps=60", "train.lr=1e-2",
            "train.warmup_steps=0", "sample.width=64", "sample.height=64", "sample.sample_every=30",
            "sample.sample_steps=8", "sample.prompts=[red stripes, blue disc]"]


def write_demo_dataset(folder: Path):
    """Two captioned 64x64 images (red stripes, a blue disc): enough for the tiny model to overfit."""
    from PIL import Image
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    images = {"red stripes": (torch.sin(xx * 9) > 0).float()[..., None] * torch.tensor([255.0, 40, 40]),
              "blue disc": (xx ** 2 + yy ** 2 < 0.4).float()[..., None] * torch.tensor([30.0, 60, 250])}
    for caption, pixels in images.items():
        name = caption.replace(" ", "_")
        _atomic_save(Image.fromarray(pixels.to(torch.uint8).numpy()), folder / f"{name}.png")  # whole files:
        _atomic_save(caption, folder / f"{name}.txt")              # under torchrun every process writes them


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, schedulers and torchrun send) raised by terminate(): ended as Ctrl-C is."""


def terminate(signum, frame):
    """SIGTERM as Ctrl-C, but not over an error ending the run (torchrun's SIGTERM after a peer died)."""
    if not isinstance(sys.exc_info()[1], (UserError, SystemExit)):
        raise Terminated


def exit_stopped(terminated: bool, message: str, file=None):
    """End a run stopped by SIGTERM or Ctrl-C with one line and the code a shell gives it: 128 + signal."""
    print(("terminated" if terminated else "interrupted") + message, file=file)
    sys.exit(143 if terminated else 130)


def exit_output_gone(cfg: Config | None = None):
    """End a run whose stdout lost its reader (`| head`, a pager quit) quietly, as Unix tools do: exit 1.
    Under torchrun, which then ends the others ("lost contact"), process 0 says why on stderr."""
    if cfg is not None and under_torchrun():
        then = "checkpoint saved (continue with --resume)" if has_checkpoint(cfg) else "before any checkpoint"
        with contextlib.suppress(BrokenPipeError):          # stderr's reader gone too (`2>&1 | head`)
            print(f"error: process {rank_and_world()[0]}: stdout lost its reader (`| head`, a pager quit): "
                  f"stopped, {then}; torchrun stops the others", file=sys.stderr)
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())    # Python flushes stdout at exit
    sys.exit(1)


def has_checkpoint(cfg: Config | None) -> bool:
    """Whether cfg's output_dir holds a training state. os.path.isfile, not Path.is_file: main() asks after an
    OSError, which Path's raises again for a name too long."""
    return cfg is not None and os.path.isfile(Path(cfg.output_dir, STATE_FILE))


def handle_signals(handler, signals=(signal.SIGINT, signal.SIGTERM)) -> dict:
    """Install `handler` for `signals` -> {signal: the handler it replaced}. Only the main thread may (else a
    ValueError ends train() after caching): in a web UI's or notebook's thread none is; Ctrl-C is theirs."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        return {}
    # one ignored stays so: a shell script's `job &` (Ctrl-C for the script in front) or the caller's choice
    taken = [sig for sig in signals if signal.getsignal(sig) is not signal.SIG_IGN]
    return {sig: signal.signal(sig, handler) for sig in taken}


def restore_signals(old_handlers: dict):
    for sig, handler in old_handlers.items():
        signal.signal(sig, handler)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train an SD3/SD3.5 LoRA; config.yaml lists every setting.")
    parser.add_argument("config", nargs="?", help="YAML config (default: built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. train.lr=5e-5")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir's last checkpoint")
    parser.add_argument("--tiny", action="store_true", help="smoke test: random tiny model and a 2-image "
                        "demo dataset on the CPU (seconds to minutes), through the same code paths")
    return parser.parse_args(read_argv(argv, "['config.yaml', '--resume']"))


def read_argv(argv, example: str) -> list[str] | None:
    """A CLI's main(argv) from Python: each item as typed (a Path, 5); one text is refused, not read by
    argparse a letter at a time (main("config.yaml"))."""
    if isinstance(argv, str):
        raise UserError(f"main takes a list of arguments, e.g. main({example}), not {argv!r:.60}")
    return None if argv is None else [str(a) for a in argv]


@contextlib.contextmanager
def cli_console():
    """A CLI script's console after its imports: Ctrl-C (silenced for them) raises KeyboardInterrupt again;
    pythonw's None stdout/stderr become os.devnull (reconfigure and progress bars need a file); a log gets
    lines in order, and what stdout cannot encode (Windows' cp1252 when redirected) as \\u escapes."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_DFL:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.stdout, sys.stderr = (f or open(os.devnull, "w") for f in (sys.stdout, sys.stderr))
    sys.stdout.reconfigure(line_buffering=True, errors="backslashreplace")
    try:
        yield
    except UserError as e:      # one outside main()'s except clauses: torchrun's variables (WORLD_SIZE=abc)
        sys.exit(f"error: {e}")
    finally:        # Ctrl-C while Python exits (torch's atexit callbacks): no traceback, as while importing
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:   # a script's `job &` ignores it
            signal.signal(signal.SIGINT, signal.SIG_DFL)


def main(argv=None):
    args, rank = parse_args(argv), rank_and_world()[0]
    stdout, joined = sys.stdout, dist.is_initialized()      # a library caller's: left as found
    if rank > 0:                                    # torchrun: process 0 speaks for all
        sys.stdout = open(os.devnull, "w")
    cfg = None
    old_handlers = handle_signals(terminate, (signal.SIGTERM,))   # loading, caching; train() takes it over
    try:
        # --tiny's output: a timestamp, or torchrun's job id (same in every process; "none" without --rdzv-id)
        job = os.environ.get("TORCHELASTIC_RUN_ID", "none") if under_torchrun() else "none"
        stamp = time.strftime("%Y%m%d-%H%M%S") if job == "none" else job[:15]
        if args.tiny and args.resume:                           # continue the newest tiny run that saved
            saved = sorted(Path("runs").glob(f"tiny_*/{STATE_FILE}"), key=os.path.getmtime)
            stamp = saved[-1].parent.name.removeprefix("tiny_") if saved else stamp
        tiny = TINY_RUN + [f"output_dir=runs/tiny_{stamp}"] if args.tiny else []
        cfg = load_config(args.config, tiny + args.set)
        if args.tiny and job == "none" and under_torchrun():    # srun, torchrun without --rdzv-id: each clock
            join_processes(cfg)                                 # named its own folder; all take process 0's
            shared = [cfg.output_dir]
            collective(dist.broadcast_object_list, shared)
            cfg.output_dir = shared[0]
        if args.tiny and (cfg.dataset.path == TINY_DATA or not Path(cfg.dataset.path).exists()):
            write_demo_dataset(Path(cfg.dataset.path))
        print(f"done: {train(cfg, args.resume)}")
    except (UserError, torch.OutOfMemoryError) as e:    # out of memory: train() words it, each process's own
        own = not isinstance(e, UserError) or e.own     # torchrun: others by each machine's first (its log)
        tag = f"process {rank}: " * (own and under_torchrun())      # not a plain run's (a WORLD_SIZE alone)
        sys.exit(f"error: {tag}{e}" if local_rank() == 0 or own else 1)    # a dataset missing on one machine
    except BrokenPipeError:     # stdout's reader gone (`| head`), a checkpoint saved
        exit_output_gone(cfg)
    except OSError as e:                                    # e.g. a full disk while logging
        then = ("continue with --resume" if has_checkpoint(cfg) else
                "start the run anew (it saved no checkpoint yet: empty output_dir or choose another)")
        sys.exit(f"error: {e}: free disk space (or fix the path), then {then}")
    except KeyboardInterrupt as e:              # models loading or caching; train() catches later ones
        term = isinstance(e, Terminated)
        why = " (if another process failed: see its error)" * (under_torchrun() and term)
        message = f" before training began{why}: nothing new to save (finished cache files are kept)"
        exit_stopped(term, message, sys.stderr if rank == 0 else sys.stdout)    # others' stdout: devnull
    finally:
        restore_signals(old_handlers)
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout
        if dist.is_initialized() and not joined:
            dist.destroy_process_group()


if __name__ == "__main__":
    with cli_console():
        main()
