"""Stable Diffusion 3 / 3.5 LoRA training and sampling in one readable file.

    python sd35_lora.py config.yaml                          # train a LoRA, sampling every N steps
    python sd35_lora.py config.yaml --set train.lr=5e-5      # override any config key
    python sd35_lora.py config.yaml --resume                 # continue the run in output_dir
    python sd35_lora.py config.yaml --tiny                   # ~1 minute CPU smoke run: random tiny model, demo data
    python sample.py --model stabilityai/stable-diffusion-3.5-medium --prompt "a fox" --lora lora.safetensors

Data flow:
    sampling:  prompts -> TextEncoders -> (context, pooled) -> denoise(MMDiT [+LoRA], sigmas) -> latents -> VAE -> images
    training:  images -> VAE.encode -> latents --+  (cached on disk; the encoders then leave the GPU)
               captions -> TextEncoders -> cond -+-> flow-matching loss on MMDiT+LoRA -> AdamW -> LoRA file

Sections, in reading order: presets and config, flow matching, MMDiT, LoRA, VAE, text encoders,
checkpoint I/O, sampling, data, training. Parameter names are those of Stability AI's official
checkpoints (minus `model.diffusion_model.`), so an official file loads by stripping that prefix;
the diffusers layout is converted on load through one key table.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint


class UserError(ValueError):
    """Bad input from the user: printed as one line by the command-line entry points, no traceback."""


#################################################################################
#                           Presets and Configuration                           #
#################################################################################

@dataclass(frozen=True)
class Preset:
    """Recommended sampling settings of one model variant (Stability AI's reference defaults)."""
    steps: int
    cfg: float
    shift: float
    sampler: str
    slg_scale: float = 0.0                 # skip-layer guidance, 0 = off
    slg_layers: tuple[int, ...] = ()


PRESETS = {  # Stability AI's reference settings (sd3_infer.py); SD3 Medium's from its model card
    "sd3-medium": Preset(steps=28, cfg=7.0, shift=3.0, sampler="dpmpp_2m"),
    "sd3.5-medium": Preset(steps=50, cfg=5.0, shift=3.0, sampler="dpmpp_2m", slg_scale=2.5, slg_layers=(7, 8, 9)),
    "sd3.5-large": Preset(steps=40, cfg=4.5, shift=3.0, sampler="dpmpp_2m"),
    "sd3.5-large-turbo": Preset(steps=4, cfg=1.0, shift=3.0, sampler="euler"),
}
SLG_WINDOW = (0.01, 0.20)                  # skip-layer guidance acts on steps inside this fraction of the run
T5_LENGTH = 256                            # T5 tokens; training, in-training samples and sample.py share it
SAMPLERS = ("euler", "dpmpp_2m")
SCHEDULES = ("linear", "cosine")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DatasetConfig:
    path: str = "data"                     # folder of images with same-name .txt captions
    resolution: int = 1024                 # bucket area ~ resolution^2, sides multiples of 64
    default_caption: str = ""              # used (and counted) where a .txt is missing
    caption_dropout: float = 0.1           # fraction of steps trained on the empty caption (keeps CFG working)
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
    timestep_sampling: str = "logit_normal"  # logit_normal | mode | uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    weighting: str = "none"                # none | sigma_sqrt | cosmap
    gradient_checkpointing: bool = True
    compile: bool = False                  # torch.compile the joint blocks (a one-off compile at the first steps)
    loss_bins: int = 5                     # loss is also tracked per timestep bin


@dataclass
class SampleConfig:
    sampler: str = ""                      # "" = the variant's preset
    sample_every: int = 250                # 0 = only at the start and the end
    sample_steps: int = 0                  # 0 = the variant's preset
    guidance_scale: float = 0.0            # 0 = the variant's preset
    shift: float = 0.0                     # 0 = the variant's preset
    prompts: list[str] = field(default_factory=lambda: ["a photo of a cat"])
    neg: str = ""
    width: int = 1024
    height: int = 1024
    seed: int = 42


@dataclass
class Config:
    model: str = ""                        # diffusers folder, official .safetensors, hub id, or "tiny"
    text_encoders: str = ""                # diffusers-layout folder with text_encoder*/tokenizer* ("" = model)
    vae: str = ""                          # "" = the VAE inside `model`
    variant: str = ""                      # "" = detected; one of PRESETS to override
    output_dir: str = "runs/lora"
    device: str = "auto"                   # auto | cpu | cuda | cuda:1 | mps
    dtype: str = "bf16"                    # frozen weights; LoRA and optimizer stay fp32
    t5_length: int = T5_LENGTH
    use_t5: bool = True                    # False: zeros instead of T5 (saves ~10 GB)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def _coerce(value, default, key: str):
    """Cast a YAML value to the type of the field's default, or explain why it cannot be."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)) and isinstance(value, str):
        try:                                   # YAML reads 1e-4 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if isinstance(default, (int, float)) and not isinstance(value, bool) and isinstance(value, (int, float)):
        if isinstance(default, int) and not float(value).is_integer():
            raise UserError(f"config key '{key}' must be a whole number, got {value!r}")
        return type(default)(value)
    if isinstance(default, list):
        return [str(v) for v in (value if isinstance(value, list) else [] if value is None else [value])]
    if isinstance(default, str):
        return "" if value is None else str(value)
    raise UserError(f"config key '{key}' has the wrong type: expected {type(default).__name__}, got {value!r}")


def _fill(obj, data: dict, prefix: str = ""):
    """Set dataclass fields from a nested dict; unknown keys name the closest valid key."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in (data or {}).items():
        full = prefix + str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid: {', '.join(fields)})"
            raise UserError(f"unknown config key '{full}'{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"config key '{full}' must be a section with keys, got {value!r}")
            _fill(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(value, current, full))
    return obj


CHOICES = {"variant": ("", *PRESETS), "dtype": tuple(DTYPES), "lora.format": ("diffusers", "kohya"),
           "train.lr_schedule": ("constant", "cosine"), "train.timestep_sampling": ("logit_normal", "mode", "uniform"),
           "train.weighting": ("none", "sigma_sqrt", "cosmap"), "sample.sampler": ("", *SAMPLERS)}
AT_LEAST_ONE = ("t5_length", "lora.rank", "train.steps", "train.batch_size", "train.grad_accum", "train.save_every",
                "train.loss_bins", "sample.width", "sample.height")
NOT_NEGATIVE = ("train.lr", "train.warmup_steps", "train.weight_decay", "train.max_grad_norm", "sample.sample_every",
                "sample.sample_steps", "sample.guidance_scale", "sample.shift", "lora.dropout", "dataset.caption_dropout")


def validate(cfg: Config) -> Config:
    """Reject bad values before any model is loaded, instead of hours into a run."""
    value = lambda key: functools.reduce(getattr, key.split("."), cfg)
    for key, options in CHOICES.items():
        if value(key) not in options:
            raise UserError(f"config key '{key}' is {value(key)!r}: use one of {', '.join(map(repr, options))}")
    for key in AT_LEAST_ONE:
        if value(key) < 1:
            raise UserError(f"config key '{key}' must be at least 1, got {value(key)}")
    for key in NOT_NEGATIVE:
        if not value(key) >= 0:
            raise UserError(f"config key '{key}' must be a number >= 0, got {value(key)}")
    if cfg.dataset.resolution < 64 or cfg.dataset.resolution % 64:
        raise UserError(f"dataset.resolution must be a multiple of 64, got {cfg.dataset.resolution}")
    if cfg.dtype == "fp16":
        raise UserError("dtype fp16 is not supported for training (it needs loss scaling): use bf16 or fp32")
    return cfg


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Config from YAML plus `a.b=value` overrides (values parsed as YAML)."""
    import yaml
    data = {}
    if path:
        if not os.path.isfile(path):
            raise UserError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    config = _fill(Config(), data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"--set expects key=value (e.g. train.lr=5e-5), got {item!r}")
        try:
            nested = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            raise UserError(f"--set {item}: the value is not valid YAML (quote lists like '[a, b]' as a whole)") from None
        for part in reversed(key.strip().split(".")):
            nested = {part: nested}
        _fill(config, nested)
    return validate(config)


#################################################################################
#                                 Flow Matching                                 #
#################################################################################
# Rectified flow: x_t = (1 - sigma) * x0 + sigma * noise, the model predicts v = noise - x0.

def shift_sigma(sigma, shift: float):
    """Time shift of SD3 (resolution-dependent in the paper, a constant 3.0 for SD3.5)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def get_schedule(steps: int, shift: float, spacing: str = "linear") -> torch.Tensor:
    """Sigmas from 1 to 0 (steps + 1 values), built as the references do: the end point
    shift(1/1000) is spaced, then shifted again. `cosine` spaces densely at both ends."""
    if spacing not in SCHEDULES:
        raise UserError(f"unknown schedule '{spacing}': choose one of {', '.join(SCHEDULES)}")
    end = shift_sigma(1 / 1000, shift)
    frac = torch.linspace(0, 1, steps, dtype=torch.float64)
    if spacing == "cosine":
        frac = (1 - torch.cos(math.pi * frac)) / 2
    sigmas = shift_sigma(1 - (1 - end) * frac, shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def sample_training_sigmas(n: int, cfg: TrainConfig, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Training noise levels: u in (0, 1) by density, then the shifted 1000-step table (diffusers' recipe)."""
    if cfg.timestep_sampling == "logit_normal":
        u = torch.sigmoid(torch.normal(cfg.logit_mean, cfg.logit_std, size=(n,), generator=generator))
    elif cfg.timestep_sampling == "mode":
        u = torch.rand(n, generator=generator)
        u = 1 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    elif cfg.timestep_sampling == "uniform":
        u = torch.rand(n, generator=generator)
    else:
        raise UserError(f"unknown train.timestep_sampling '{cfg.timestep_sampling}': use logit_normal, mode or uniform")
    index = (u * 1000).long().clamp(0, 999)
    return shift_sigma((1000 - index).float() / 1000, shift)


def loss_weight(sigmas: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-sample loss weights of SD3's paper: none, sigma_sqrt (sigma^-2) or cosmap."""
    if scheme == "none":
        return torch.ones_like(sigmas)
    if scheme == "sigma_sqrt":
        return sigmas ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    raise UserError(f"unknown train.weighting '{scheme}': use none, sigma_sqrt or cosmap")


#################################################################################
#                                     MMDiT                                     #
#################################################################################

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
    dual_attention_layers: tuple[int, ...] = ()
    mlp_ratio: int = 4

    @classmethod
    def from_state_dict(cls, sd: dict) -> "MMDiTConfig":
        """Architecture from official-name weight shapes (works on meta tensors)."""
        proj = sd["x_embedder.proj.weight"]                       # (hidden, in_ch, p, p)
        ln_q = sd.get("joint_blocks.0.x_block.attn.ln_q.weight")  # (head_dim,)
        hidden, patch = proj.shape[0], proj.shape[-1]
        return cls(
            depth=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("joint_blocks.")),
            hidden=hidden,
            heads=hidden // (ln_q.shape[0] if ln_q is not None else 64),
            patch_size=patch,
            in_channels=proj.shape[1],
            out_channels=sd["final_layer.linear.weight"].shape[0] // patch ** 2,
            context_dim=sd["context_embedder.weight"].shape[1],
            pooled_dim=sd["y_embedder.mlp.0.weight"].shape[1],
            pos_embed_max_size=math.isqrt(sd["pos_embed"].shape[1]),
            qk_norm=ln_q is not None,
            dual_attention_layers=tuple(sorted({int(k.split(".")[1]) for k in sd if ".x_block.attn2." in k})),
            mlp_ratio=sd["joint_blocks.0.x_block.mlp.fc1.weight"].shape[0] // hidden,
        )

    @classmethod
    def from_diffusers(cls, c: dict) -> "MMDiTConfig":
        """Architecture from a diffusers `transformer/config.json`."""
        return cls(depth=c["num_layers"], hidden=c["num_attention_heads"] * c["attention_head_dim"],
                   heads=c["num_attention_heads"], patch_size=c.get("patch_size", 2),
                   in_channels=c.get("in_channels", 16), out_channels=c.get("out_channels") or c.get("in_channels", 16),
                   context_dim=c.get("joint_attention_dim", 4096), pooled_dim=c.get("pooled_projection_dim", 2048),
                   pos_embed_max_size=c.get("pos_embed_max_size", 96), qk_norm=c.get("qk_norm") == "rms_norm",
                   dual_attention_layers=tuple(c.get("dual_attention_layers") or ()))

    def variant(self, hint: str = "") -> str:
        """The PRESETS entry for this architecture; Large and Large Turbo differ only in weights,
        so Turbo is recognised by its name (or set `variant` explicitly)."""
        if self.dual_attention_layers:
            return "sd3.5-medium"
        if not self.qk_norm:
            return "sd3-medium"
        return "sd3.5-large-turbo" if "turbo" in hint.lower() else "sd3.5-large"


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t = sigma * 1000, cosines first. (B,) -> (B, dim)"""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """2D sine-cosine table for a fresh model; real checkpoints store their own. -> (1, grid*grid, dim)"""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)[:, None] * omega[None]         # (grid, dim/4)
    emb = torch.cat([torch.sin(pos), torch.cos(pos)], dim=1)                       # (grid, dim/2)
    table = torch.cat([emb[None, :, :].expand(grid, -1, -1), emb[:, None, :].expand(-1, grid, -1)], dim=-1)
    return table.reshape(1, grid * grid, dim).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, x, 1 + scale)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        hidden = self.fc1(x)                                                     # (B, L, 4D): the block's largest
        if torch.is_grad_enabled():
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
        return self.ln_q(q), self.ln_k(k), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain self-attention (the dual `attn2` of MMDiT-X)."""
        return self.proj(attention(*self.qkv_heads(x)))


class StreamBlock(nn.Module):
    """One stream (image `x_block` or text `context_block`) of a joint block.

    adaLN turns the conditioning vector into shift/scale/gate chunks: 6 of them, 9 with the dual
    attention of SD3.5 Medium, 2 for the last text block, which is `pre_only` (its output is unused).
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool, mlp_ratio: int, pre_only: bool = False, dual: bool = False):
        super().__init__()
        self.pre_only, self.dual = pre_only, dual
        self.n_mod = 2 if pre_only else 9 if dual else 6
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm, pre_only)
        self.attn2 = Attention(dim, heads, qk_norm) if dual else None
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = MLP(dim, dim * mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.n_mod * dim))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """-> (q, k, v) of this stream and the state post_attention needs."""
        mods = self.adaLN_modulation(c).unsqueeze(1).chunk(self.n_mod, dim=-1)   # n_mod x (B, 1, D)
        normed = self.norm1(x)
        return self.attn.qkv_heads(modulate(normed, mods[0], mods[1])), (normed, mods)

    def post_attention(self, attn_out: torch.Tensor, x: torch.Tensor, state) -> torch.Tensor:
        normed, (_, _, gate_msa, shift_mlp, scale_mlp, gate_mlp, *mods2) = state
        x = torch.addcmul(x, gate_msa, self.attn.proj(attn_out))
        if self.dual:
            shift_msa2, scale_msa2, gate_msa2 = mods2
            x = torch.addcmul(x, gate_msa2, self.attn2(modulate(normed, shift_msa2, scale_msa2)))
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class JointBlock(nn.Module):
    """Text and image streams with their own weights, attending jointly over the concatenated sequence."""

    def __init__(self, cfg: MMDiTConfig, index: int):
        super().__init__()
        self.context_block = StreamBlock(cfg.hidden, cfg.heads, cfg.qk_norm, cfg.mlp_ratio,
                                         pre_only=index == cfg.depth - 1)
        self.x_block = StreamBlock(cfg.hidden, cfg.heads, cfg.qk_norm, cfg.mlp_ratio,
                                   dual=index in cfg.dual_attention_layers)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor):
        ctx_qkv, ctx_state = self.context_block.pre_attention(context, c)
        x_qkv, x_state = self.x_block.pre_attention(x, c)
        q, k, v = (torch.cat(pair, dim=1) for pair in zip(ctx_qkv, x_qkv))       # (B, Lc + Lx, H, d)
        del ctx_qkv, x_qkv                          # peak memory: the streams' q, k, v die before the attention
        out = attention(q, k, v)
        del q, k, v                                 # and the joined ones before the MLPs
        ctx_out, x_out = out.split([context.shape[1], x.shape[1]], dim=1)
        if not self.context_block.pre_only:
            context = self.context_block.post_attention(ctx_out, context, ctx_state)
        return context, self.x_block.post_attention(x_out, x, x_state)


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MMDiT(nn.Module):
    """The SD3 / SD3.5 diffusion transformer (MMDiT, and MMDiT-X with dual attention for SD3.5 Medium)."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(cfg.in_channels, D, cfg.patch_size, stride=cfg.patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed(D, cfg.pos_embed_max_size))
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.y_embedder = nn.Module()
        self.y_embedder.mlp = nn.Sequential(nn.Linear(cfg.pooled_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.context_embedder = nn.Linear(cfg.context_dim, D)
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(D, cfg.patch_size ** 2 * cfg.out_channels)
        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self, enabled: bool = True):
        """Recompute each joint block in the backward pass: activation memory ~1 block instead of all."""
        self.gradient_checkpointing = enabled
        return self

    def compile_blocks(self):
        """torch.compile each joint block ("regional" compilation): blocks of the same structure share one
        compiled graph, so the one-off compile covers a few blocks instead of the whole model."""
        # every (block structure, grad mode, input shape) is one more version of JointBlock.forward; past the
        # limit (8 by default) dynamo silently runs the rest eagerly, and training with buckets passes it
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for block in self.joint_blocks:
            block.compile()
        return self

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Centre crop of the stored (max x max) table for an h x w patch grid. -> (1, h*w, D)"""
        m = self.cfg.pos_embed_max_size
        if h > m or w > m:
            limit = m * self.cfg.patch_size * 8
            raise UserError(f"image of {h * self.cfg.patch_size * 8}x{w * self.cfg.patch_size * 8} px is too large "
                            f"for this model: at most {limit} px per side")
        top, left = (m - h) // 2, (m - w) // 2
        grid = self.pos_embed.view(1, m, m, -1)[:, top:top + h, left:left + w]
        return grid.reshape(1, h * w, -1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor,
                skip_layers=()) -> torch.Tensor:
        """x (B, 16, H/8, W/8) latents, t (B,) = sigma * 1000, context (B, L, 4096), y (B, 2048) -> velocity like x."""
        p = self.cfg.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        dtype = self.context_embedder.weight.dtype
        # (B, h*w, D), made contiguous: a residual stream left in the conv's channel-first layout makes
        # every LayerNorm and Linear downstream copy it first
        x = rearrange(self.x_embedder.proj(x.to(dtype)), "b d h w -> b (h w) d").contiguous()
        x = x + self.cropped_pos_embed(h, w).to(x.dtype)
        c = self.t_embedder.mlp(timestep_embedding(t).to(dtype)) + self.y_embedder.mlp(y.to(dtype))  # (B, D)
        context = self.context_embedder(context.to(dtype))                      # (B, L, D)
        for i, block in enumerate(self.joint_blocks):
            if i in skip_layers:
                continue
            if self.gradient_checkpointing and torch.is_grad_enabled():
                context, x = checkpoint(block, context, x, c, use_reentrant=False)
            else:
                context, x = block(context, x, c)
        x = self.final_layer(x, c)                                               # (B, h*w, p*p*C)
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p)


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


def is_swapped(official_name: str, depth: int) -> bool:
    """diffusers stores these two modulations as (scale, shift); the official files as (shift, scale)."""
    return official_name in ("final_layer.adaLN_modulation.1", f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1")


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first])


def mmdit_from_diffusers(sd: dict, depth: int) -> dict:
    """diffusers `transformer/` state dict -> official names (qkv fused, the two swaps undone)."""
    sd, out = dict(sd), {}
    if "pos_embed.pos_embed" in sd:
        out["pos_embed"] = sd.pop("pos_embed.pos_embed")
    for official, parts in diffusers_names(depth).items():
        for p in ("weight", "bias"):
            tensors = [sd.pop(f"{name}.{p}") for name in parts if f"{name}.{p}" in sd]
            if tensors:
                t = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
                out[f"{official}.{p}"] = swap_halves(t) if is_swapped(official, depth) else t
    if sd:
        raise UserError(f"unexpected keys in the diffusers transformer weights: {sorted(sd)[:5]}")
    return out


def mmdit_to_diffusers(sd: dict, depth: int) -> dict:
    """Official names -> diffusers `transformer/` names; the exact inverse of mmdit_from_diffusers."""
    sd, out = dict(sd), {}
    if "pos_embed" in sd:
        out["pos_embed.pos_embed"] = sd.pop("pos_embed")
    for official, parts in diffusers_names(depth).items():
        for p in ("weight", "bias"):
            if f"{official}.{p}" in sd:
                t = sd.pop(f"{official}.{p}")
                t = swap_halves(t) if is_swapped(official, depth) else t
                out.update(zip((f"{name}.{p}" for name in parts), t.chunk(len(parts))))
    if sd:
        raise UserError(f"unexpected keys in the official MMDiT weights: {sorted(sd)[:5]}")
    return out


#################################################################################
#                                      LoRA                                     #
#################################################################################
# W x + b + (alpha / rank) * multiplier * up(down(x)). `up` starts at zero, so a fresh adapter changes
# nothing and training starts from the base model. The fused qkv gets one adapter (rank r shared by q, k, v).

LORA_TARGETS = {
    "attn": r"joint_blocks\.\d+\.\w+_block\.attn\.(qkv|proj)$",
    "attn_mlp": r"joint_blocks\.\d+\.\w+_block\.(attn\.(qkv|proj)|mlp\.fc[12])$",
    "all": r"(attn2?\.(qkv|proj)|mlp\.fc[12]|adaLN_modulation\.1|_embedder(\.mlp\.[02])?|final_layer\.linear)$",
}


class LoRALinear(nn.Linear):
    """A frozen nn.Linear (same weight/bias names) plus a trainable fp32 low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.multiplier, self.merged = rank, alpha, 1.0, False
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = dict(bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_down = nn.Linear(self.in_features, rank, **kw)
        self.lora_up = nn.Linear(rank, self.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank * self.multiplier

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_up.weight @ self.lora_down.weight) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        dtype, lora_dtype = out.dtype, self.lora_down.weight.dtype
        if not torch.is_autocast_enabled(x.device.type):          # autocast would cast an fp32 copy straight back
            x, out = x.to(lora_dtype), out.to(lora_dtype)
        down = F.linear(self.dropout(x).flatten(0, -2), self.lora_down.weight)
        # out + scale * up(down) as one addmm on 2-D views: one kernel (and its backward) instead of three
        update = torch.addmm(out.flatten(0, -2), down, self.lora_up.weight.t(), alpha=self.scale)
        return update.view(out.shape).to(dtype)

    @torch.no_grad()
    def merge(self):
        """Fold the update into the base weight: inference at the cost of a plain Linear."""
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False


def parse_blocks(spec: str, depth: int) -> set[int]:
    """"" -> all blocks; "0-11" or "3,5,9-12" -> those joint blocks."""
    if not spec:
        return set(range(depth))
    blocks = set()
    for part in str(spec).split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise UserError(f"lora.blocks must look like '0-11' or '3,5,9-12', got {spec!r}")
        blocks.update(range(int(lo), int(hi or lo) + 1))
    return blocks & set(range(depth))


def lora_target_names(model: MMDiT, targets: str | list[str] = "attn", blocks: str = "") -> list[str]:
    """Names of the nn.Linear modules a preset (attn, attn_mlp, all) or a list of regexes selects."""
    if isinstance(targets, str):
        patterns = [LORA_TARGETS[targets]] if targets in LORA_TARGETS else targets.split(",")
    else:
        patterns = list(targets)
    try:
        regexes = [re.compile(p.strip()) for p in patterns if p.strip()]
    except re.error as e:
        raise UserError(f"lora.targets: invalid regex ({e}); use attn, attn_mlp, all or regexes") from None
    keep = parse_blocks(blocks, model.cfg.depth)
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and not name.endswith(("lora_down", "lora_up"))
             and any(r.search(name) for r in regexes)
             and (not name.startswith("joint_blocks.") or int(name.split(".")[1]) in keep)]
    if not names:
        raise UserError(f"lora.targets {targets!r} (blocks {blocks or 'all'}) matches no Linear layer of the MMDiT; "
                        f"use attn, attn_mlp, all or a regex such as 'attn\\.qkv$'")
    return names


def add_lora(model: MMDiT, rank: int = 16, alpha: float | None = None, targets="attn", blocks: str = "",
             dropout: float = 0.0) -> list[nn.Parameter]:
    """Freeze the model, wrap the targeted Linears in LoRALinear and return the trainable parameters."""
    if rank < 1:
        raise UserError(f"lora.rank must be at least 1, got {rank}")
    model.requires_grad_(False)
    params = []
    for name in lora_target_names(model, targets, blocks):
        base = model.get_submodule(name)
        if isinstance(base, LoRALinear):
            raise UserError(f"{name} already has a LoRA; merge it first (load_lora(..., merge=True))")
        layer = _replace(model, name, LoRALinear(base, rank, rank if alpha is None else alpha, dropout))
        params += [layer.lora_down.weight, layer.lora_up.weight]
    return params


def _replace(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
    return module


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def set_lora_merged(model: nn.Module, merged: bool):
    for layer in lora_layers(model).values():
        layer.merge() if merged else layer.unmerge()


def _atomic_save(tensors: dict, path: str | Path, metadata: dict | None = None):
    """Write to a temporary file, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def lora_state_dict(model: MMDiT, format: str = "diffusers") -> dict[str, torch.Tensor]:
    """The adapters as a LoRA file's tensors. diffusers: alpha folded into lora_B (loaders assume
    alpha = rank), the fused qkv written as to_q/to_k/to_v sharing lora_A. kohya: official names + alpha."""
    depth, names, out = model.cfg.depth, diffusers_names(model.cfg.depth), {}
    for name, layer in lora_layers(model).items():
        down, up = layer.lora_down.weight.detach().float(), layer.lora_up.weight.detach().float()
        if format == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            out.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(float(layer.alpha))})
        elif format == "diffusers":
            up = up * (layer.alpha / layer.rank)
            up = swap_halves(up) if is_swapped(name, depth) else up
            for part, up_part in zip(names[name], up.chunk(len(names[name]))):
                out[f"transformer.{part}.lora_A.weight"] = down.clone()   # safetensors refuses shared memory
                out[f"transformer.{part}.lora_B.weight"] = up_part
        else:
            raise UserError(f"unknown LoRA format '{format}': use diffusers or kohya")
    if not out:
        raise UserError("the model has no LoRA layers to save (call add_lora first)")
    return out


def save_lora(model: MMDiT, path: str | Path, format: str = "diffusers", metadata: dict | None = None):
    """Write the adapters as safetensors; rank/alpha/targets and `metadata` go into the header."""
    layers = list(lora_layers(model).values())
    info = {"format": format, "rank": layers[0].rank if layers else 0, "alpha": layers[0].alpha if layers else 0,
            "alpha_folded": format == "diffusers", "modules": sorted(lora_layers(model)), **(metadata or {})}
    _atomic_save(lora_state_dict(model, format), path, {"format": "pt", "sd35_lora": json.dumps(info)})


LORA_PREFIXES = ("transformer.", "base_model.model.", "model.diffusion_model.", "diffusion_model.", "lora_unet_",
                 "lora_transformer_")


def _lora_key(key: str):
    """A LoRA tensor name -> (module name as written, role) or None. Accepted: diffusers/PEFT (`transformer.`,
    `base_model.model.` or no prefix; lora_A/B), kohya (`lora_unet_` + flattened official names, lora_down/up,
    alpha), ComfyUI (`diffusion_model.` official names; `lora_transformer_` + flattened diffusers names)."""
    m = re.match(r"^(.*?)\.(lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up)\.weight$|^(.*)\.(alpha)$", key)
    if not m:
        return None
    module, role = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
    role = {"lora_A": "down", "lora_down": "down", "lora.down": "down", "alpha": "alpha"}.get(role, "up")
    prefix = next((p for p in LORA_PREFIXES if module.startswith(p)), "")
    return module[len(prefix):], role


def read_lora(model: MMDiT, path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A LoRA file in any supported layout -> {official module: (down (r, in), up (out, r) with alpha folded in)},
    checked against the model's layers. Raises UserError, touching nothing, when the file does not fit."""
    sd, meta = read_safetensors(path, with_metadata=True)
    depth = model.cfg.depth
    spellings = {}                         # any spelling -> (official name, part index, parts, diffusers spelling)
    for official, parts in diffusers_names(depth).items():
        spellings[official] = spellings[official.replace(".", "_")] = (official, 0, 1, False)
        for i, part in enumerate(parts):
            spellings[part] = spellings[part.replace(".", "_")] = (official, i, len(parts), True)
    # diffusers writes PEFT's config flat, as {"transformer.r": .., "transformer.lora_alpha": ..}
    peft = json.loads(meta.get("lora_adapter_metadata") or "{}")
    peft = {k.removeprefix("transformer."): v for k, v in peft.items()} if isinstance(peft, dict) else {}
    if peft.get("alpha_pattern") or peft.get("rank_pattern"):
        raise UserError(f"{path}: per-module rank/alpha patterns (PEFT rank_pattern/alpha_pattern) are not supported")
    groups, ignored = {}, []
    for key, tensor in sd.items():
        if "dora_scale" in key or "lora_magnitude_vector" in key:
            raise UserError(f"{path} is a DoRA ({key}); only plain LoRA files are supported")
        parsed = _lora_key(key)
        if parsed is None:
            ignored.append(key)
            continue
        module, role = parsed
        groups.setdefault(module, {})[role] = tensor.float()
    if not groups:
        raise UserError(f"{path} is not a LoRA (no lora_A/lora_B or lora_down/lora_up tensors; {describe_checkpoint(sd)})")
    pieces, unmatched = {}, []
    for module, t in groups.items():
        if "down" not in t or "up" not in t:
            raise UserError(f"{path}: LoRA tensor pair for '{module}' is incomplete (has {sorted(t)})")
        down, up = t["down"], t["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise UserError(f"{path}: rank mismatch at '{module}': down {tuple(down.shape)} vs up {tuple(up.shape)}")
        rank = down.shape[0]
        alpha = float(t["alpha"]) if "alpha" in t else float(peft.get("lora_alpha", rank))
        if module not in spellings:
            unmatched.append(module)
            continue
        official, index, n_parts, diffusers_spelling = spellings[module]
        if diffusers_spelling and is_swapped(official, depth):
            up = swap_halves(up)
        pieces.setdefault(official, [None] * n_parts)[index] = (down, up * (alpha / rank))
    if ignored:
        print(f"warning: ignored {len(ignored)} tensors of {path} that are not LoRA weights, e.g. {ignored[:3]}",
              file=sys.stderr)
    if not pieces:
        raise UserError(f"{path} matches no layer of this {model.cfg.variant()} MMDiT (depth {depth}): first keys "
                        f"{sorted(sd)[:3]}; expected e.g. 'transformer.transformer_blocks.0.attn.to_q.lora_A.weight' "
                        f"or 'lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight'")
    if unmatched:
        print(f"warning: {len(unmatched)} LoRA modules in {path} have no counterpart here, e.g. {unmatched[:3]}",
              file=sys.stderr)
    modules = dict(model.named_modules())
    adapters = {}
    for official, parts in pieces.items():
        layer = modules.get(official)
        if not isinstance(layer, nn.Linear):
            raise UserError(f"{path}: '{official}' does not exist in this model (depth {depth}, "
                            f"dual attention {list(model.cfg.dual_attention_layers)}): a LoRA for another variant?")
        rows = layer.out_features // len(parts)
        for down, up in filter(None, parts):
            if down.shape[1] != layer.in_features or up.shape[0] != rows:
                raise UserError(f"{path}: '{official}' takes ({layer.in_features} -> {rows}) per part, the LoRA has down "
                                f"{tuple(down.shape)} and up {tuple(up.shape)}: a LoRA for another variant?")
        downs, ups = zip(*(p or (torch.zeros(0, layer.in_features), torch.zeros(rows, 0)) for p in parts))
        if all(torch.equal(d, downs[0]) for d in downs):          # one shared A (as we save qkv): stays rank r
            adapters[official] = (downs[0], torch.cat(ups))
        else:                                                      # separate A's: block-diagonal, ranks add up
            adapters[official] = (torch.cat(downs), torch.block_diag(*ups))
    return adapters


@torch.no_grad()
def load_lora(model: MMDiT, path: str | Path, scale: float = 1.0, merge: bool = True) -> int:
    """Apply a LoRA file (diffusers/PEFT, kohya or ComfyUI layout). merge=True folds it into the weights
    (stackable, zero overhead); merge=False wraps the layers in LoRALinear. Returns the layer count."""
    adapters = read_lora(model, path)                      # validates everything before touching the model
    modules = dict(model.named_modules())
    for name, (down, up) in adapters.items():
        layer = modules[name]
        if merge:
            layer.weight += ((up @ down) * scale).to(layer.weight.device, layer.weight.dtype)
        else:
            if isinstance(layer, LoRALinear):
                raise UserError(f"{name} already has an unmerged LoRA: only one LoRA can stay unmerged (merge the others)")
            wrapped = _replace(model, name, LoRALinear(layer, rank=down.shape[0], alpha=down.shape[0]))
            wrapped.lora_down.weight.copy_(down)
            wrapped.lora_up.weight.copy_(up)
            wrapped.multiplier = scale
    return len(adapters)


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
    scaling_factor: float = 1.5305         # SD3's latents: (z - shift) * scale goes into the MMDiT
    shift_factor: float = 0.0609

    @classmethod
    def from_state_dict(cls, sd: dict, **overrides) -> "VAEConfig":
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
        return cls(ch=ch, ch_mult=tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)),
                   num_res_blocks=1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block.")),
                   latent_channels=sd["decoder.conv_in.weight"].shape[1], **overrides)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (the VAE's mid block)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "b 1 (h w) c -> b c h w", h=x.shape[2])
        return x + self.proj_out(out)


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(ch, ch, groups), AttnBlock(ch, groups), ResnetBlock(ch, ch, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Resample(nn.Module):
    """x2 down (asymmetric pad, stride-2 conv) or x2 up (nearest, conv)."""

    def __init__(self, ch: int, down: bool):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(ch, ch, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.down else F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(cin: int, cout: int, n_blocks: int, groups: int) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(n_blocks))
    return level


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        widths = [c.ch * m for m in c.ch_mult]
        self.conv_in = nn.Conv2d(3, c.ch, 3, padding=1)
        self.down = nn.ModuleList(_level(([c.ch] + widths)[i], w, c.num_res_blocks, c.groups) for i, w in enumerate(widths))
        for level, w in zip(self.down[:-1], widths):
            level.downsample = Resample(w, down=True)
        self.mid = MidBlock(widths[-1], c.groups)
        self.norm_out = nn.GroupNorm(c.groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        widths = [c.ch * m for m in c.ch_mult]
        self.conv_in = nn.Conv2d(c.latent_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], c.groups)
        # up[i] works at width widths[i]; it runs from the deepest level up, as in the official layout
        self.up = nn.ModuleList(_level((widths + [widths[-1]])[i + 1], w, c.num_res_blocks + 1, c.groups)
                                for i, w in enumerate(widths))
        for level, w in zip(self.up[1:], widths[1:]):
            level.upsample = Resample(w, down=False)
        self.norm_out = nn.GroupNorm(c.groups, widths[0], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    """SD3's 16-channel autoencoder; pixels in [-1, 1], latents 8x smaller and already scaled for the MMDiT."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 2*C, H/8, W/8): mean and log-variance, what the training cache stores."""
        return self.encoder(images.to(self.encoder.conv_in.weight.dtype)).float()

    def latents_from_moments(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample z ~ N(mean, var) and scale it into the MMDiT's latent space (the one place the scale lives)."""
        mean, logvar = moments.float().chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=generator).to(mean.device)
        z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise
        return (z - self.cfg.shift_factor) * self.cfg.scaling_factor

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents_from_moments(self.encode_moments(images), generator)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.cfg.scaling_factor + self.cfg.shift_factor
        return self.decoder(z.to(self.decoder.conv_in.weight.dtype)).float()


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
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks."))
    out = {}
    for key, tensor in sd.items():
        for pattern, repl in VAE_RENAMES:
            key = re.sub(pattern, repl, key)
        key = re.sub(r"\{(\d+)\}", lambda m: str(levels - 1 - int(m.group(1))), key)
        if ".attn_1." in key and key.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]                     # Linear -> 1x1 conv
        out[key] = tensor
    return out


#################################################################################
#                                 Text Encoders                                 #
#################################################################################

class TextEncoders:
    """CLIP-L and CLIP-G (penultimate hidden states, pooled projections) and T5-XXL, combined as SD3 expects:
    context = [CLIP-L | CLIP-G | zero pad to T5 width] ++ T5 along the sequence -> (B, 77 + t5_length, 4096),
    pooled = [CLIP-L pooled | CLIP-G pooled] -> (B, 2048). Without T5 its part is zeros."""

    def __init__(self, clip_l, clip_g, t5, tokenizers, t5_length: int = T5_LENGTH, context_dim: int = 4096):
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.tok_l, self.tok_g, self.tok_t5 = tokenizers
        self.t5_length, self.context_dim = t5_length, context_dim

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.clip_l, self.clip_g, self.t5) if m is not None]

    def _tokens(self, tokenizer, prompts: list[str], length: int) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        return ids.to(self.clip_l.device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> context (B, 77 + t5_length, D_t5), pooled (B, D_l + D_g), float32."""
        seqs, pooled = [], []
        for model, tokenizer in ((self.clip_l, self.tok_l), (self.clip_g, self.tok_g)):
            out = model(self._tokens(tokenizer, prompts, tokenizer.model_max_length), output_hidden_states=True)
            seqs.append(out.hidden_states[-2].float())
            pooled.append(out.text_embeds.float())
        clip = torch.cat(seqs, dim=-1)                                          # (B, 77, D_l + D_g)
        if self.t5 is not None:
            t5 = self.t5(self._tokens(self.tok_t5, prompts, self.t5_length)).last_hidden_state.float()
        else:
            t5 = clip.new_zeros(len(prompts), self.t5_length, self.context_dim)
        context = torch.cat([F.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5], dim=1)
        return context, torch.cat(pooled, dim=-1)


#################################################################################
#                                Checkpoint I/O                                 #
#################################################################################
# Accepted: a diffusers-layout folder (the Hugging Face SD3.5 repos), an official single .safetensors
# (MMDiT + VAE under `model.diffusion_model.` / `first_stage_model.`) with text encoders from a diffusers
# folder, or a Hugging Face repo id. Only safetensors are read: nothing downloaded is ever unpickled.

CHECKPOINT_SIGNATURES = [  # key fragment -> what a file holding it is
    ("lora_", "a LoRA (load it with --lora)"), ("double_blocks.", "a FLUX transformer"),
    ("input_blocks.", "an SD1.x/SDXL UNet"), ("down_blocks.0.attentions.", "a diffusers UNet (SD1.x/SDXL)"),
    ("text_model.", "a CLIP text encoder"), ("encoder.block.", "a T5 text encoder"),
    ("decoder.up", "a VAE"), ("joint_blocks.", "an SD3 MMDiT"), ("transformer_blocks.", "a diffusers transformer"),
]


def describe_checkpoint(sd: dict) -> str:
    for fragment, what in CHECKPOINT_SIGNATURES:
        if any(fragment in k for k in sd):
            return f"it looks like {what}"
    return f"its first keys are {sorted(sd)[:3]}"


def read_safetensors(path: str | Path, with_metadata: bool = False, prefix: str = ""):
    """The tensors of a .safetensors file whose names start with `prefix` (stripped), and its metadata;
    or a UserError saying what is wrong. Tensors outside `prefix` are never read."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
        raise UserError(f"{path}: only .safetensors files are read (pickle files can run code); use the .safetensors release")
    try:
        with safe_open(str(path), framework="pt") as f:
            sd = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for truncated or foreign files
        raise UserError(f"{path} is not a readable .safetensors file ({str(e).splitlines()[0][:120]}); "
                        f"a truncated download? download it again") from None
    return (sd, meta) if with_metadata else sd


def read_weights_dir(folder: Path, stem: str) -> dict:
    """A diffusers component's weights: `stem.safetensors` or shards listed in `stem.safetensors.index.json`."""
    if (folder / f"{stem}.safetensors").is_file():
        return read_safetensors(folder / f"{stem}.safetensors")
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in read_safetensors(folder / shard).items()}
    found = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
    raise UserError(f"no {stem}.safetensors in {folder} (found {found[:5]}); only safetensors weights are read")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _single_file(path: Path, prefix: str) -> dict:
    """Tensors under `prefix` of an official single file (prefix stripped); all tensors if none has it."""
    return read_safetensors(path, prefix=prefix) or read_safetensors(path)


def _build(module_cls, cfg, sd: dict, what: str, path, device, dtype):
    """Instantiate without allocating (meta), adopt the loaded tensors, then move and cast. Loaded models are
    frozen: training adds its own trainable LoRA parameters, and nothing else should build autograd graphs."""
    with torch.device("meta"):
        model = module_cls(cfg)
    for name, tensor in sd.items():                 # cast in place, one tensor at a time: never two copies in RAM
        if tensor.is_floating_point():
            sd[name] = tensor.to(dtype)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"{path}: {what} weights do not fit the detected architecture: "
                        f"{' '.join(str(e).splitlines()[1:]).strip()[:300] or e}") from None
    return model.to(device).eval().requires_grad_(False)


def _holds_mmdit(path: Path) -> bool:
    """Whether a .safetensors file has MMDiT weights, from its header alone."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return any("joint_blocks." in k or k.startswith("transformer_blocks.") for k in f.keys())
    except Exception:
        return False


def load_mmdit(path: str | Path, device="cpu", dtype=torch.float32) -> MMDiT:
    """The transformer from a diffusers root folder, its `transformer/` folder, or a single .safetensors."""
    path = Path(path)
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        if not (folder / "config.json").is_file():
            raise UserError(f"{path} has no transformer/config.json: not a diffusers SD3 folder")
        config = _read_json(folder / "config.json")
        if "joint_attention_dim" not in config:
            raise UserError(f"{folder} holds a {config.get('_class_name', 'non-SD3')} model, not an SD3 transformer")
        cfg = MMDiTConfig.from_diffusers(config)
        sd = mmdit_from_diffusers(read_weights_dir(folder, "diffusion_pytorch_model"), cfg.depth)
    else:
        sd = _single_file(path, "model.diffusion_model.")
        if "x_embedder.proj.weight" not in sd and "pos_embed.proj.weight" in sd:  # a diffusers-named single file
            sd = mmdit_from_diffusers(sd, 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")))
        if "x_embedder.proj.weight" not in sd:
            raise UserError(f"{path} is not an SD3/SD3.5 checkpoint: {describe_checkpoint(sd)}")
        try:
            cfg = MMDiTConfig.from_state_dict(sd)
        except (KeyError, ValueError) as e:
            raise UserError(f"{path}: incomplete SD3 MMDiT weights (missing {e}); download the file again") from None
    return _build(MMDiT, cfg, sd, "MMDiT", path, device, dtype)


def load_vae(path: str | Path, device="cpu", dtype=torch.float32) -> VAE:
    """The VAE from a diffusers root folder, its `vae/` folder, or an official single file."""
    path = Path(path)
    if path.is_dir():
        folder = path / "vae" if (path / "vae").is_dir() else path
        config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
        sd = vae_from_diffusers(read_weights_dir(folder, "diffusion_pytorch_model"))
        overrides = {k: config[d] for k, d in (("groups", "norm_num_groups"), ("scaling_factor", "scaling_factor"),
                                                ("shift_factor", "shift_factor")) if config.get(d) is not None}
    else:
        sd, overrides = _single_file(path, "first_stage_model."), {}
        if any(k.startswith("decoder.up_blocks.") for k in sd):
            sd = vae_from_diffusers(sd)
    if "decoder.conv_in.weight" not in sd:
        raise UserError(f"{path} holds no SD3 VAE ({describe_checkpoint(sd)}); pass --vae with the VAE file or folder")
    try:
        cfg = VAEConfig.from_state_dict(sd, **overrides)
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: incomplete SD3 VAE weights (missing {e}); download the file again") from None
    return _build(VAE, cfg, sd, "VAE", path, device, dtype)


def load_text_encoders(folder: str | Path, device="cpu", dtype=torch.float32, t5_length: int = T5_LENGTH,
                       use_t5: bool = True, context_dim: int = 4096) -> TextEncoders:
    """CLIP-L, CLIP-G and T5 with their tokenizers from a diffusers-layout folder (text_encoder{,_2,_3}/, tokenizer{,_2,_3}/)."""
    import transformers
    folder = Path(folder)
    parts = ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"] + (["text_encoder_3", "tokenizer_3"] if use_t5 else [])
    missing = [p for p in parts if not (folder / p).is_dir()]
    if missing:
        raise UserError(f"{folder} lacks {', '.join(missing)}: pass --text-encoders with a diffusers-layout SD3 folder "
                        f"(e.g. a download of stabilityai/stable-diffusion-3.5-medium)" +
                        (" or use --no-t5" if any(p.endswith("_3") for p in missing) else ""))
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}

    def component(name: str, default: str, **kw):
        cls = getattr(transformers, (index.get(name) or [None, default])[1], None) or getattr(transformers, default)
        return cls.from_pretrained(folder / name, **kw)

    model_kw = dict(dtype=dtype, use_safetensors=True)
    encoders = [component(n, cls, **model_kw).to(device).eval().requires_grad_(False) if use_t5 or n != "text_encoder_3" else None
                for n, cls in (("text_encoder", "CLIPTextModelWithProjection"), ("text_encoder_2", "CLIPTextModelWithProjection"),
                               ("text_encoder_3", "T5EncoderModel"))]
    tokenizers = [component(n, "AutoTokenizer") if use_t5 or n != "tokenizer_3" else None
                  for n in ("tokenizer", "tokenizer_2", "tokenizer_3")]
    return TextEncoders(*encoders, tokenizers, t5_length=t5_length, context_dim=context_dim)


def resolve_model(name: str, parts=("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                    "tokenizer_2", "text_encoder_3", "tokenizer_3")) -> Path:
    """A local path as is; a Hugging Face repo id has its diffusers-layout `parts` downloaded (safetensors only)."""
    if os.path.exists(name):
        return Path(name)
    looks_local = name.endswith((".safetensors", ".ckpt", ".pt", ".bin")) or os.path.exists(name.split("/")[0])
    if looks_local or not re.fullmatch(r"[\w.-]+/[\w.-]+", name or ""):
        raise UserError(f"model not found: {name!r} (give a diffusers folder, a .safetensors file or a Hugging Face repo id)")
    from huggingface_hub import snapshot_download
    patterns = ["model_index.json"] + [f"{part}/*" for part in parts]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, ignore_patterns=["*.bin", "*.pt", "*.ckpt"]))
    except Exception as e:  # huggingface_hub's error classes move between versions; dispatch on what it says
        text = f"{type(e).__name__}: {e}"
        if re.search(r"Gated|401|403|[Aa]uthenticat|token", text):
            hint = f"accept the licence at https://huggingface.co/{name}, then run `hf auth login` (or set HF_TOKEN)"
        elif re.search(r"RepositoryNotFound|404", text):
            hint = "no such repository: check the id, e.g. stabilityai/stable-diffusion-3.5-medium"
        else:
            hint = ("no network? download it where there is one (`hf download " + name + " --local-dir DIR`) "
                    "and pass --model DIR")
        raise UserError(f"could not download {name}: {hint}") from None


@dataclass
class Pipeline:
    """Everything sampling needs. With `offload`, components live on the CPU and visit `device` one at a time."""
    mmdit: MMDiT
    vae: VAE
    text: TextEncoders | None
    variant: str
    device: torch.device
    offload: bool = False

    def place(self, offload: bool | None = None) -> "Pipeline":
        """Move all models to `device`, or keep them on the CPU (offload). None: offload only when they do not
        fit into the GPU's free memory together (SD3.5 Large + T5-XXL in bf16 is ~27 GB)."""
        modules = [self.mmdit, self.vae, *(self.text.modules() if self.text else [])]
        if offload is None:
            need = sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])
            offload = self.device.type == "cuda" and need > 0.85 * torch.cuda.mem_get_info(self.device)[0]
            if offload:
                print(f"models ({need / 2**30:.1f} GB) exceed the free GPU memory: each visits the GPU only while it runs")
        self.offload = offload
        for m in modules:
            m.to("cpu" if offload else self.device)
        return self

    @contextlib.contextmanager
    def on_device(self, *modules: nn.Module):
        try:
            if self.offload:
                for m in modules:
                    m.to(self.device)
            yield
        finally:
            if self.offload:
                for m in modules:
                    m.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} asked for, but this torch sees no CUDA GPU; use --device cpu")
    return device


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if not name:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}: use {', '.join(DTYPES)}")
    return DTYPES[name]


def load_pipeline(model: str, text_encoders: str | None = None, vae: str | None = None, device="auto",
                  dtype: str | torch.dtype | None = None, t5_length: int = T5_LENGTH, use_t5: bool = True,
                  variant: str = "", offload: bool | None = None) -> Pipeline:
    """The one entry point: a diffusers folder, an official single file (+ text_encoders folder), a hub id, or
    "tiny". Models load on the CPU, then go to `device` (see Pipeline.place for `offload`)."""
    device = pick_device(str(device))
    dtype = dtype if isinstance(dtype, torch.dtype) else pick_dtype(dtype, device)
    if variant and variant not in PRESETS:
        raise UserError(f"unknown variant {variant!r}: use one of {', '.join(PRESETS)}")
    if model == "tiny":
        pipe = tiny_pipeline(device, dtype, t5_length, use_t5)
        pipe.variant = variant or pipe.variant
        return pipe.place(offload)
    text_parts = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2") + (("text_encoder_3", "tokenizer_3") if use_t5 else ())
    root = resolve_model(model, ("transformer", "vae") + (() if text_encoders else text_parts))
    if text_encoders is None and not root.is_dir():
        if not _holds_mmdit(root):
            load_mmdit(root)                       # raises the error that says what the file is instead
        raise UserError(f"{root} is a single file without text encoders: pass --text-encoders DIR "
                        f"(a diffusers-layout SD3.5 folder with text_encoder*/ and tokenizer*/)")
    mmdit = load_mmdit(root, "cpu", dtype)
    text = load_text_encoders(resolve_model(text_encoders, text_parts) if text_encoders else root, "cpu", dtype,
                              t5_length, use_t5, mmdit.cfg.context_dim)
    vae_model = load_vae(resolve_model(vae, ("vae",)) if vae else root, "cpu", dtype)
    if vae_model.cfg.latent_channels != mmdit.cfg.in_channels:
        raise UserError(f"the VAE has {vae_model.cfg.latent_channels} latent channels, the MMDiT expects "
                        f"{mmdit.cfg.in_channels}: use SD3's 16-channel VAE")
    return Pipeline(mmdit, vae_model, text, variant or mmdit.cfg.variant(str(model)), device).place(offload)


def tiny_tokenizer(vocab_words: str = "abcdefghijklmnopqrstuvwxyz0123456789.,!-'", pad_with_eos: bool = True):
    """A character-level tokenizer (built in-process, no download) with CLIP's 77-token window."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors, normalizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {t: i for i, t in enumerate(specials + list(vocab_words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), "isolated")])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<eos>" if pad_with_eos else "<pad>", model_max_length=77)


def tiny_pipeline(device="cpu", dtype=torch.float32, t5_length: int = 16, use_t5: bool = True, seed: int = 0) -> Pipeline:
    """A random miniature SD3.5 Medium (dual attention, qk-norm) with tiny CLIP/T5 and tokenizers: the whole
    program runs on a laptop CPU through the same code paths as the real weights."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    clip = lambda width: CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2,
        projection_dim=width, max_position_embeddings=77, bos_token_id=2, eos_token_id=3, pad_token_id=3))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                                 pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)) if use_t5 else None
    mmdit = MMDiT(MMDiTConfig(depth=3, hidden=64, heads=4, context_dim=64, pooled_dim=32 + 48, pos_embed_max_size=32,
                              qk_norm=True, dual_attention_layers=(0, 1)))
    vae = VAE(VAEConfig(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, groups=4))
    with torch.no_grad():  # a random encoder's posterior is as wide as its mean; make it narrow, as a trained one's
        vae.encoder.conv_out.bias[vae.cfg.latent_channels:] = -10.0
        for name, p in mmdit.named_parameters():  # small adaLN gates: a near-identity residual stream trains well
            if "adaLN_modulation" in name:
                p.mul_(0.1)
    text = TextEncoders(clip(32), clip(48), t5, (tok, tok, tok), t5_length=t5_length, context_dim=64)
    for m in [mmdit, vae, *text.modules()]:
        m.to(dtype=dtype).eval().requires_grad_(False)
    return Pipeline(mmdit, vae, text, "sd3.5-medium", torch.device(device))


#################################################################################
#                                   Sampling                                    #
#################################################################################

def dpmpp_2m_step(x, denoised, old_denoised, sigmas: list[float], i: int):
    """DPM-Solver++(2M) as in k-diffusion / the SD3.5 reference: second order in t = -log(sigma).
    `sigmas` are Python floats: branching on device tensors would stall the GPU at every step."""
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    if sigma_next == 0:
        return denoised
    h = math.log(sigma / sigma_next)
    if old_denoised is not None:
        r = math.log(sigmas[i - 1] / sigma) / h
        denoised = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return (sigma_next / sigma) * x - math.expm1(-h) * denoised


@torch.no_grad()
def denoise(model: MMDiT, x: torch.Tensor, sigmas: torch.Tensor, cond, uncond=None, cfg: float = 1.0,
            sampler: str = "euler", slg_scale: float = 0.0, slg_layers=(), progress: bool = False) -> torch.Tensor:
    """Integrate the flow from sigmas[0] to 0. cond/uncond = (context, pooled); CFG runs both in one batch,
    skip-layer guidance adds a cond pass without `slg_layers` in the early-middle steps."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler '{sampler}': choose one of {', '.join(SAMPLERS)}")
    from tqdm import tqdm
    use_cfg = uncond is not None and cfg != 1.0
    context, pooled = (torch.cat([u, c]) for u, c in zip(uncond, cond)) if use_cfg else cond
    steps, previous, sigma_values = len(sigmas) - 1, None, sigmas.tolist()
    x = x.float()
    for i in tqdm(range(steps), desc="denoising", disable=not progress, leave=False):
        sigma = sigmas[i]
        batch = torch.cat([x, x]) if use_cfg else x
        v = model(batch, (sigma * 1000).expand(batch.shape[0]), context, pooled).float()
        if use_cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + cfg * (v_cond - v_uncond)
            if slg_scale and slg_layers and SLG_WINDOW[0] * steps < i < SLG_WINDOW[1] * steps:
                v_skip = model(x, (sigma * 1000).expand(x.shape[0]), *cond, skip_layers=tuple(slg_layers)).float()
                v = v + slg_scale * (v_cond - v_skip)
        if sampler == "euler":
            x = x + (sigmas[i + 1] - sigma) * v
        else:
            denoised = x - sigma * v
            x, previous = dpmpp_2m_step(x, denoised, previous, sigma_values, i), denoised
    return x


def initial_noise(seeds: list[int], channels: int, height: int, width: int) -> torch.Tensor:
    """Reference noise recipe: float32 CPU generator per image, so a seed gives the same image everywhere."""
    return torch.cat([torch.randn((1, channels, height // 8, width // 8), generator=torch.Generator("cpu").manual_seed(s))
                      for s in seeds])


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> PIL images, rounded as diffusers does."""
    from PIL import Image
    arrays = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


@dataclass
class SampleSettings:
    """Sampling parameters; None means the variant's preset."""
    steps: int | None = None
    cfg: float | None = None
    shift: float | None = None
    sampler: str | None = None
    schedule: str = "linear"
    slg_scale: float | None = None
    slg_layers: tuple[int, ...] | None = None
    width: int = 1024
    height: int = 1024
    seed: int = 0

    def resolved(self, variant: str) -> "SampleSettings":
        preset = PRESETS[variant]
        out = dataclasses.replace(self, **{k: getattr(preset, k) for k in ("steps", "cfg", "shift", "sampler", "slg_scale", "slg_layers")
                                           if getattr(self, k) is None})
        if out.width % 16 or out.height % 16 or out.width <= 0 or out.height <= 0:
            raise UserError(f"width and height must be positive multiples of 16, got {out.width}x{out.height}")
        if out.steps < 1 or out.shift <= 0:
            raise UserError(f"steps must be at least 1 and shift above 0, got {out.steps} and {out.shift}")
        if out.slg_scale and not out.slg_layers:
            raise UserError(f"skip-layer guidance scale {out.slg_scale} without layers ({variant} has no preset): "
                            f"add --slg-layers, e.g. 7,8,9")
        if out.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler '{out.sampler}': choose one of {', '.join(SAMPLERS)}")
        if out.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule '{out.schedule}': choose one of {', '.join(SCHEDULES)}")
        return out


@torch.no_grad()
def generate(pipe: Pipeline, prompts: list[str], negative: str = "", settings: SampleSettings | None = None,
             embeddings=None, progress: bool = True) -> list:
    """Prompts -> PIL images (image i uses seed + i). `embeddings` = (cond, uncond) skips the text encoders."""
    s = (settings or SampleSettings()).resolved(pipe.variant)
    if embeddings is None:
        with pipe.on_device(*pipe.text.modules()):
            cond = pipe.text.encode(prompts)
            uncond = pipe.text.encode([negative] * len(prompts)) if s.cfg != 1.0 else None
    else:
        cond, uncond = embeddings
    device = pipe.device
    cond = tuple(t.to(device) for t in cond)
    uncond = tuple(t.to(device) for t in uncond) if uncond is not None else None
    x = initial_noise([s.seed + i for i in range(len(prompts))], pipe.mmdit.cfg.in_channels, s.height, s.width).to(device)
    sigmas = get_schedule(s.steps, s.shift, s.schedule).to(device)
    with pipe.on_device(pipe.mmdit):
        slg_layers = [i for i in s.slg_layers if i < pipe.mmdit.cfg.depth]    # preset layers may exceed a tiny model
        latents = denoise(pipe.mmdit, x, sigmas, cond, uncond, s.cfg, s.sampler, s.slg_scale, slg_layers, progress)
    with pipe.on_device(pipe.vae):                         # one image at a time: VAE activations are large
        return to_pil(torch.cat([pipe.vae.decode(z[None]) for z in latents]))


#################################################################################
#                                     Data                                      #
#################################################################################

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def bucket_sizes(resolution: int, step: int = 64, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `step`, with area close to resolution^2 and aspect up to 4:1."""
    sizes = []
    for w in range(step, 4 * resolution + 1, step):
        h = (resolution * resolution // w) // step * step
        if h >= step and max(w / h, h / w) <= max_aspect:
            sizes.append((w, h))
    return sizes


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """Resize to cover `size` (width, height), centre-crop, -> (3, H, W) in [-1, 1]."""
    from PIL import Image, ImageOps
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        w, h = size
        scale = max(w / im.width, h / im.height)
        im = im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.BICUBIC)
        left, top = (im.width - w) // 2, (im.height - h) // 2
        im = im.crop((left, top, left + w, top + h))
        pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(h, w, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1


def scan_dataset(cfg: DatasetConfig) -> list[dict]:
    """Images with their captions and aspect bucket. Unreadable images are skipped and reported."""
    from PIL import Image, ImageOps
    root = Path(cfg.path)
    if not root.is_dir():
        raise UserError(f"dataset.path {root} is not a folder (it should hold images with same-name .txt captions)")
    buckets = bucket_sizes(cfg.resolution)
    items, broken, uncaptioned = [], [], 0
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
        try:
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:
                width, height = ImageOps.exif_transpose(im).size      # phone photos are stored rotated
        except Exception as e:
            broken.append(f"{path.name} ({type(e).__name__})")
            continue
        caption_file = path.with_suffix(".txt")
        if caption_file.is_file():
            caption = caption_file.read_text(encoding="utf-8", errors="replace").strip()
        else:
            caption, uncaptioned = cfg.default_caption, uncaptioned + 1
        bucket = min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(width / height)))
        items.append({"path": path, "caption": caption, "size": bucket})
    if broken:
        print(f"warning: skipped {len(broken)} unreadable images: {', '.join(broken[:5])}", file=sys.stderr)
    if uncaptioned:
        print(f"warning: {uncaptioned} images have no .txt caption; using dataset.default_caption "
              f"{cfg.default_caption!r}", file=sys.stderr)
    if not items:
        raise UserError(f"no usable images in {root} ({', '.join(sorted(IMAGE_EXTS))}, with .txt captions)")
    return items


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
    return h.hexdigest()[:32]


def cached(path: Path, compute) -> Path:
    """`path`, after checking that it reads; computed from `compute()` and written atomically if not."""
    if path.is_file():
        try:
            load_file(str(path))
            return path
        except Exception:
            print(f"warning: rebuilding unreadable cache file {path}", file=sys.stderr)
    _atomic_save(compute(), path)
    return path


class LatentDataset:
    """VAE moments and text embeddings of every image, computed once (cached on disk, keyed by the file's
    content and every setting that changes the result), then read back per batch as same-bucket batches:
    RAM does not grow with the dataset (~5 MB per 1024 px image)."""

    def __init__(self, items: list[dict], pipe: Pipeline, cfg: Config, model_id: str):
        cache = Path(cfg.dataset.cache_dir)
        vae_id = _digest(model_id, cfg.vae, cfg.dtype, json.dumps(dataclasses.asdict(pipe.vae.cfg)))
        text_id = _digest(model_id, cfg.text_encoders, cfg.dtype, cfg.t5_length, cfg.use_t5)
        self.latent_files, self.text_files, self.sizes = [], [], []
        flip = cfg.dataset.flip
        from tqdm import tqdm
        for item in tqdm(items, desc="caching latents and text", leave=False):
            image_key = _digest(item["path"].read_bytes(), item["size"], flip, vae_id)

            @torch.no_grad()
            def encode_image():
                pixels = load_image(item["path"], item["size"])[None].to(pipe.device)
                versions = {"moments": pixels, **({"flipped": pixels.flip(-1)} if flip else {})}
                return {name: pipe.vae.encode_moments(p)[0].cpu() for name, p in versions.items()}
            self.latent_files.append(cached(cache / "latents" / f"{image_key}.safetensors", encode_image))
            self.text_files.append(self.text(pipe, cache, item["caption"], text_id))
            self.sizes.append(item["size"])
        self.empty = load_file(str(self.text(pipe, cache, "", text_id)))

    @staticmethod
    def text(pipe: Pipeline, cache: Path, caption: str, text_id: str) -> Path:
        def encode():
            context, pooled = pipe.text.encode([caption])
            dtype = pipe.mmdit.context_embedder.weight.dtype                 # bf16 halves the cache
            return {"context": context[0].to(dtype).cpu(), "pooled": pooled[0].to(dtype).cpu()}
        return cached(cache / "text" / f"{_digest(caption, text_id)}.safetensors", encode)

    def batches(self, batch_size: int, epoch_seed: int) -> list[list[int]]:
        """One epoch: indices shuffled within each bucket, cut into batches, batches shuffled."""
        g = torch.Generator().manual_seed(epoch_seed)
        by_bucket = {}
        for i in torch.randperm(len(self.sizes), generator=g).tolist():
            by_bucket.setdefault(self.sizes[i], []).append(i)
        batches = [ids[j:j + batch_size] for ids in by_bucket.values() for j in range(0, len(ids), batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def get(self, ids: list[int], vae: VAE, cfg: Config, g: torch.Generator):
        """-> latents (B, 16, h, w), context (B, L, D), pooled (B, P), with flips and caption dropout drawn from g."""
        flip = (torch.rand(len(ids), generator=g) < 0.5) & cfg.dataset.flip
        drop = torch.rand(len(ids), generator=g) < cfg.dataset.caption_dropout
        moments = torch.stack([load_file(str(self.latent_files[i]))["flipped" if f else "moments"] for i, f in zip(ids, flip)])
        embeds = [self.empty if d else load_file(str(self.text_files[i])) for i, d in zip(ids, drop)]
        return (vae.latents_from_moments(moments, g), torch.stack([e["context"] for e in embeds]),
                torch.stack([e["pooled"] for e in embeds]))


#################################################################################
#                                   Training                                    #
#################################################################################

def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then constant or cosine decay to zero."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.lr_schedule != "constant":
        raise UserError(f"unknown train.lr_schedule '{cfg.lr_schedule}': use constant or cosine")
    return cfg.lr


def flow_matching_loss(model: MMDiT, latents, context, pooled, cfg: TrainConfig, shift: float, g: torch.Generator,
                       autocast_dtype: torch.dtype | None):
    """Rectified-flow loss: x_t = (1 - s) x0 + s noise, target v = noise - x0. -> (mean loss, per-sample losses, sigmas)"""
    device = latents.device
    sigmas = sample_training_sigmas(latents.shape[0], cfg, shift, g).to(device)
    noise = torch.randn(latents.shape, generator=g).to(device)
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        pred = model(noisy, sigmas * 1000, context, pooled)
    per_sample = ((pred.float() - (noise - latents)) ** 2).mean(dim=(1, 2, 3))
    return (per_sample * loss_weight(sigmas, cfg.weighting)).mean(), per_sample.detach(), sigmas


def save_training_state(path: Path, params: list[nn.Parameter], opt: torch.optim.Optimizer, step: int, cfg: Config):
    """LoRA, AdamW moments, step, RNG states and config in one safetensors file (no pickle)."""
    tensors = {f"param.{i}": p for i, p in enumerate(params)}
    for i, p in enumerate(params):
        for name, value in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.cpu"] = torch.get_rng_state()
    if params[0].device.type == "cuda":                 # LoRA dropout draws from the training GPU's generator
        tensors["rng.cuda"] = torch.cuda.get_rng_state(params[0].device)
    _atomic_save(tensors, path, {"step": str(step), "config": json.dumps(dataclasses.asdict(cfg))})


def load_training_state(path: Path, params: list[nn.Parameter], opt: torch.optim.Optimizer) -> tuple[int, dict]:
    tensors, meta = read_safetensors(path, with_metadata=True)
    saved = [tensors[f"param.{i}"].shape for i in range(sum(k.startswith("param.") for k in tensors))]
    if saved != [p.shape for p in params]:
        raise UserError(f"{path} holds a LoRA of another shape (different lora.rank/targets/blocks?); "
                        f"resume with the run's config")
    fused = opt.defaults.get("fused")                  # AdamW keeps `step` on the CPU, fused AdamW on the GPU
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"])
            state = {k.split(".", 2)[2]: v if k.endswith(".step") and not fused else v.to(p.device)
                     for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
            if state:
                opt.state[p] = state
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and params[0].device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], params[0].device)
    return int(meta["step"]), json.loads(meta["config"])


def plot_losses(log_path: Path, png_path: Path, size=(800, 400)):
    """Loss curve (raw and moving average) as a PNG, drawn with Pillow."""
    from PIL import Image, ImageDraw
    losses = [json.loads(line)["loss"] for line in log_path.read_text().splitlines() if line.strip()]
    if len(losses) < 2:
        return
    window = max(2, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]
    lo, hi = min(losses), max(losses)
    W, H, pad = size[0], size[1], 40
    point = lambda i, v: (pad + (W - 2 * pad) * i / (len(losses) - 1), H - pad - (H - 2 * pad) * (v - lo) / ((hi - lo) or 1))
    im = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(im)
    draw.rectangle([pad, pad, W - pad, H - pad], outline="gray")
    draw.line([point(i, v) for i, v in enumerate(losses)], fill=(170, 190, 230), width=1)
    draw.line([point(i, v) for i, v in enumerate(smooth)], fill=(20, 60, 180), width=2)
    draw.text((pad, 10), f"loss  steps 1-{len(losses)}  min {lo:.4f}  max {hi:.4f}  last (avg) {smooth[-1]:.4f}", fill="black")
    tmp = png_path.with_name(png_path.name + ".tmp")
    im.save(tmp, format="PNG")
    os.replace(tmp, png_path)


class Trainer:
    """State shared by the loop's helpers: the pipeline, the LoRA parameters, the optimizer and the output folder."""

    def __init__(self, cfg: Config, resume: bool = False):
        self.cfg, self.out = cfg, Path(cfg.output_dir)
        self.state_path = self.out / "training_state.safetensors"
        if resume and not self.state_path.is_file():
            raise UserError(f"--resume: no {self.state_path} to resume from")
        if not resume and self.out.is_dir() and any(self.out.iterdir()):
            raise UserError(f"output_dir {self.out} already holds files of an earlier run; continue it with --resume "
                            f"or choose another output_dir (--set output_dir=...)")
        if not cfg.model:
            raise UserError("config key 'model' is empty: set it to a diffusers folder, an official .safetensors, "
                            "a hub id, or 'tiny'")
        items = scan_dataset(cfg.dataset)                  # fail on a bad dataset before loading gigabytes
        self.pipe = load_pipeline(cfg.model, cfg.text_encoders or None, cfg.vae or None, cfg.device, cfg.dtype,
                                  cfg.t5_length, cfg.use_t5, cfg.variant, offload=True)
        self.device = self.pipe.device
        s = cfg.sample
        self.sample_settings = SampleSettings(s.sample_steps or None, s.guidance_scale or None, s.shift or None,
                                              s.sampler or None, width=s.width, height=s.height,
                                              seed=s.seed).resolved(self.pipe.variant)
        largest = max(side for item in items for side in item["size"])     # too large for the model: fail now
        self.pipe.mmdit.cropped_pos_embed(largest // 16, largest // 16)
        with self.pipe.on_device(self.pipe.vae, *self.pipe.text.modules()):    # the encoders visit the GPU once
            self.data = LatentDataset(items, self.pipe, cfg, cfg.model)
            cond = self.pipe.text.encode(s.prompts) if s.prompts else None      # validation prompts, encoded once
            uncond = self.pipe.text.encode([s.neg] * len(s.prompts)) if s.prompts else None
        self.embeddings = (cond, uncond if self.sample_settings.cfg != 1.0 else None)
        self.pipe.text = None                                      # text encoders are no longer needed
        self.pipe.offload = False
        self.mmdit = self.pipe.mmdit.to(self.device)
        torch.manual_seed(cfg.train.seed)                          # LoRA init (and dropout) follow train.seed
        self.params = add_lora(self.mmdit, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.blocks, cfg.lora.dropout)
        self.mmdit.enable_gradient_checkpointing(cfg.train.gradient_checkpointing)
        if cfg.train.compile:
            self.mmdit.compile_blocks()
        fused = self.device.type in ("cpu", "cuda")              # one kernel per step, not ~12 per parameter
        self.opt = torch.optim.AdamW(self.params, cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                     fused=fused)
        self.step = 0
        if resume:
            self.step, saved = load_training_state(self.state_path, self.params, self.opt)
            now = dataclasses.asdict(cfg)
            changed = [f"{section}.{k}" for section in ("dataset", "lora", "train") for k, v in saved[section].items()
                       if now[section].get(k) != v and k not in ("steps", "save_every")]
            if changed:
                print(f"warning: resuming with changed settings {changed}: the run will differ from an uninterrupted one",
                      file=sys.stderr)
            print(f"resumed from {self.state_path} at step {self.step}")
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "log.jsonl"
        weights_dtype = self.pipe.mmdit.context_embedder.weight.dtype
        self.autocast = None if weights_dtype == torch.float32 else weights_dtype
        # an epoch's batch order is drawn once (not per micro-step); its length depends only on the buckets
        tc = cfg.train
        self.epoch_batches = functools.lru_cache(maxsize=1)(lambda epoch: self.data.batches(tc.batch_size, tc.seed + epoch))
        self.batches_per_epoch = len(self.epoch_batches(0))

    def batch(self, micro_step: int, g: torch.Generator):
        """The micro-batch of a global micro-step: a pure function of (seed, step), so resume is exact."""
        epoch, index = divmod(micro_step, self.batches_per_epoch)
        ids = self.epoch_batches(epoch)[index]
        latents, context, pooled = self.data.get(ids, self.pipe.vae, self.cfg, g)
        return latents.to(self.device), context.to(self.device), pooled.to(self.device)

    def sample_images(self):
        """Validation images for the configured prompts, with the same seeds at every step."""
        if not self.cfg.sample.prompts:
            return
        folder = self.out / f"samples_step_{self.step:06d}"
        try:
            self.mmdit.eval()
            self.pipe.vae.to(self.device)
            images = generate(self.pipe, self.cfg.sample.prompts, self.cfg.sample.neg, self.sample_settings,
                              embeddings=self.embeddings, progress=False)
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                path = folder / f"step_{self.step:06d}_sample_{i:02d}.png"
                image.save(path)
                print(f"sample: {path}")
            if self.log_path.is_file():
                plot_losses(self.log_path, self.out / "loss.png")
        except Exception as e:                              # a failed preview must not end a long run
            print(f"warning: sampling at step {self.step} failed ({type(e).__name__}: {e}); training continues",
                  file=sys.stderr)
        finally:
            self.pipe.vae.to("cpu")
            self.mmdit.train()

    def save(self):
        """lora_step_XXXXXX.safetensors, lora.safetensors (latest) and the resumable training state."""
        c = self.cfg
        meta = {"variant": self.pipe.variant, "t5_length": c.t5_length, "use_t5": c.use_t5, "targets": c.lora.targets,
                "base_model": c.model, "step": self.step,
                "training": {k: getattr(c.train, k) for k in ("lr", "batch_size", "timestep_sampling", "weighting")}}
        save_lora(self.mmdit, self.out / f"lora_step_{self.step:06d}.safetensors", c.lora.format, meta)
        save_lora(self.mmdit, self.out / "lora.safetensors", c.lora.format, meta)
        save_training_state(self.state_path, self.params, self.opt, self.step, c)
        print(f"saved {self.out / f'lora_step_{self.step:06d}.safetensors'}")


def train(cfg: Config, resume: bool = False) -> Path:
    """The training loop. Returns the path of the final LoRA."""
    from tqdm import tqdm
    tr = Trainer(cfg, resume)
    tc, shift = cfg.train, tr.sample_settings.shift
    bins = torch.zeros(tc.loss_bins), torch.zeros(tc.loss_bins)          # per-timestep-bin loss sums, counts
    if tr.step == 0:
        tr.sample_images()                                                # baseline before any update
    tr.mmdit.train()
    bar = tqdm(total=tc.steps, initial=tr.step, desc="training", dynamic_ncols=True)
    try:
        while tr.step < tc.steps:
            # per-step randomness (noise, timesteps, flips, dropout) from (seed, step): resume reproduces it
            g = torch.Generator().manual_seed(tc.seed * 1_000_003 + tr.step)
            lr = get_lr(tr.step, tc)
            for group in tr.opt.param_groups:
                group["lr"] = lr
            # forward and backward over the accumulated micro-batches
            total = 0.0
            for micro in range(tc.grad_accum):
                latents, context, pooled = tr.batch(tr.step * tc.grad_accum + micro, g)
                loss, per_sample, sigmas = flow_matching_loss(tr.mmdit, latents, context, pooled, tc, shift, g, tr.autocast)
                (loss / tc.grad_accum).backward()
                total += loss.item() / tc.grad_accum
                index = (sigmas.cpu() * tc.loss_bins).long().clamp(max=tc.loss_bins - 1)
                bins[0].index_add_(0, index, per_sample.cpu())
                bins[1].index_add_(0, index, torch.ones_like(per_sample.cpu()))
            # clip (max_grad_norm 0 = off); a diverged run stops here and the last checkpoint on disk stays intact
            grad_norm = torch.nn.utils.clip_grad_norm_(tr.params, tc.max_grad_norm or math.inf).item()
            if not (math.isfinite(total) and math.isfinite(grad_norm)):
                raise UserError(f"loss became {total} (gradient norm {grad_norm}) at step {tr.step + 1}; stopped without "
                                f"saving. Lower train.lr or check the data; the last good checkpoint is "
                                f"{tr.out / 'lora.safetensors'}")
            # update
            tr.opt.step()
            tr.opt.zero_grad(set_to_none=True)
            tr.step += 1
            # log
            with open(tr.log_path, "a") as f:
                f.write(json.dumps({"step": tr.step, "loss": total, "lr": lr, "grad_norm": grad_norm,
                                    "sigma": sigmas.mean().item(), "time": time.time()}) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}")
            # checkpoint, then validation samples (with the loss per timestep bin since the last ones)
            if tr.step % tc.save_every == 0 or tr.step == tc.steps:
                tr.save()
            if (cfg.sample.sample_every and tr.step % cfg.sample.sample_every == 0) or tr.step == tc.steps:
                means = (bins[0] / bins[1].clamp(min=1)).tolist()
                print("loss by sigma bin: " + "  ".join(f"[{i / tc.loss_bins:.1f},{(i + 1) / tc.loss_bins:.1f}) {m:.4f}"
                                                        for i, m in enumerate(means)))
                bins[0].zero_(), bins[1].zero_()
                tr.sample_images()
    except KeyboardInterrupt:
        bar.close()
        tr.save()
        print(f"interrupted at step {tr.step}; checkpoint saved. Continue with --resume")
        raise SystemExit(130)
    bar.close()
    return tr.out / "lora.safetensors"


TINY_RUN = ["model=tiny", "device=cpu", "dtype=fp32", "t5_length=16", "dataset.path=runs/tiny_data",
            "dataset.resolution=64", "dataset.cache_dir=runs/tiny_cache", "lora.targets=all", "train.steps=60",
            "train.lr=1e-2", "train.warmup_steps=0", "train.save_every=30", "sample.sample_every=30",
            "sample.sample_steps=8", "sample.width=64", "sample.height=64", "sample.prompts=[red stripes, blue disc]"]


def write_demo_dataset(folder: Path):
    """Two captioned 64x64 images (red stripes, a blue disc): enough for the tiny model to overfit."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    images = {"red stripes": (torch.sin(xx * 9) > 0).float()[..., None] * torch.tensor([255.0, 40, 40]),
              "blue disc": (xx ** 2 + yy ** 2 < 0.4).float()[..., None] * torch.tensor([30.0, 60, 250])}
    for caption, pixels in images.items():
        name = caption.replace(" ", "_")
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train an SD3/SD3.5 LoRA (see config.yaml for every setting).")
    parser.add_argument("config", nargs="?", help="YAML config (default: built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=5e-5")
    parser.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    parser.add_argument("--tiny", action="store_true", help="smoke test: random tiny model and a 2-image demo dataset "
                        "on the CPU (~1 minute), through the same code paths")
    args = parser.parse_args(argv)
    try:
        overrides = args.set
        if args.tiny:
            overrides = TINY_RUN + [f"output_dir=runs/tiny_{time.strftime('%Y%m%d-%H%M%S')}"] + args.set
        cfg = load_config(args.config, overrides)
        if args.tiny and not Path(cfg.dataset.path).exists():
            write_demo_dataset(Path(cfg.dataset.path))
        path = train(cfg, args.resume)
        print(f"done: {path}")
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
