"""GPU checks of the targets in issues 2, 4 and 10 that ../shared/bench/gpu_compare.py does not cover.

    PYTHONPATH=/tmp/site:. python3 .ci/bench_gpu.py [pipeline] [train] [compile] [fp8]   # default: the first three
    python3 .ci/bench_gpu.py fp8 compile train      # issues 9 and 10 (~5 min on one H200, 2026-11-30)
    python .ci/bench_gpu.py --smoke                                                  # tiny sizes on the CPU: the script runs

1. compile:  sampling step at SD3.5 Medium and Large size, bf16, 1024x1024, CFG batch 2, 333 text tokens, on the same
             random weights: diffusers eager, sd35_lora eager, sd35_lora compiled (as `sample.py --compile`); peak
             memory; and per-head RMSNorm on the layouts q can have (Medium shape).
2. pipeline: SD3.5 Large at 1024px inside a 24 GB budget (allocator capped with set_per_process_memory_fraction):
             random full-size CLIP-L, CLIP-G, T5-XXL, MMDiT and VAE through `generate()`, 2 steps with CFG;
             with T5 (offloaded: each model visits the GPU while it runs) and without T5 (everything resident).
3. train:    a LoRA training step (this project's flow_matching_loss, rank 16 on the attention projections, AdamW
             fp32, clipping) at 1024px, batch 1, gradient checkpointing, bf16 weights + autocast, Medium and Large
             sizes: sd35_lora (eager and compiled) vs diffusers + PEFT on the same step; time, peak memory,
             sd35_lora's device_time; eager also with the blocks' checkpoint as before 2026-11-30 (`_before`);
             compiled also with CUDA graphs (`_cudagraphs`: mode="reduce-overhead", cudagraph trees), with
             the relative difference of its loss and LoRA gradients from the plain compiled step's
             (`grad_rel_err`; the compiled step against itself: the noise floor) and torch's warnings.
             The fused qkv has one rank-16 adapter here (q, k, v share lora_A), PEFT puts one on each of to_q/k/v.
4. fp8:      issue 9's float8 weights: a compiled torch._scaled_mm row-wise check against the dequantized matmul;
             LoRA training steps of Large (bf16 and fp8, eager and compiled, fp8 compiled also dequantized) and Medium
             (fp8); a Medium CFG sampling step, eager and compiled, bf16 vs fp8 with the relative error of the output;
             Large sampling, T5 offloaded.
Peaks are max_memory_allocated since the stage's reset; `start_allocated_gib` is what was resident at the reset.
`device_time`: the kernels' summed time in one profiled call (busy_ms) and the costliest kernels, to tell a step
that waits on launches (busy_ms well under the step) from one that keeps the GPU busy.
Each stage prints a JSON line of its results so far as each of its parts (model size, fp8 check) finishes,
and rewrites bench_gpu.json in $OUT (or /tmp).
"""
import contextlib
import gc
import json
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sd35_lora as sd  # noqa: E402
from bench_cpu import checkpointed_block_before  # noqa: E402

SMOKE = "--smoke" in sys.argv
DEVICE = torch.device("cpu" if SMOKE else "cuda")
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    sys.exit("bench_gpu.py: no CUDA GPU here: run it on a GPU machine, or add --smoke for the tiny CPU check")
DTYPE = torch.float32 if SMOKE else torch.bfloat16
PX = 64 if SMOKE else 1024
BUDGET_GIB = 23.0                 # a 24 GB card less the CUDA context
# random-weight stand-ins with the real architectures (tiny ones for --smoke)
MMDIT = {"medium": sd.MMDiTConfig(depth=24, hidden=1536, heads=24, qk_norm=True, dual_attention_layers=tuple(range(13))),
         "large": sd.MMDiTConfig(depth=38, hidden=2432, heads=38, pos_embed_max_size=192, qk_norm=True)}
if SMOKE:
    MMDIT = {k: sd.MMDiTConfig(depth=2, hidden=64, heads=4, context_dim=64, pooled_dim=96, pos_embed_max_size=32,
                               qk_norm=True, dual_attention_layers=(0,) if k == "medium" else ()) for k in MMDIT}
results = {"device": torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "cpu", "torch": torch.__version__}


def report(stage: str, values: dict):
    results[stage] = values
    Path(os.environ.get("OUT", "/tmp"), "bench_gpu.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({stage: values}), flush=True)


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(fn, n: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - start) / n


start_bytes = 0                           # allocated at the last reset_peak()


def reset_peak():
    global start_bytes
    gc.collect()                          # compiled modules sit in reference cycles: free them now
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()


def peak_gib() -> dict:
    if DEVICE.type != "cuda":
        return {}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "start_allocated_gib": round(start_bytes / 2**30, 2)}


def device_time(fn, n: int = 10) -> dict:
    """Where one call of fn spends device time: the sum over all kernels and the n costliest (ms), to aim work."""
    try:
        with torch.profiler.profile() as prof:
            fn()
            sync()
        cuda = DEVICE.type == "cuda"      # kernels only: an operator's own device time repeats its kernels'
        own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
        events = sorted((e for e in prof.key_averages() if own(e) > 0 and (e.device_type.name == "CUDA") == cuda),
                        key=own, reverse=True)
        return {"busy_ms": round(sum(map(own, events)) / 1e3, 2),
                "top_ms": [[e.key[:90], e.count, round(own(e) / 1e3, 2)] for e in events[:n]]}
    except Exception:
        return {"error": traceback.format_exc()[-500:]}


@contextlib.contextmanager
def building():
    """Create modules directly on the device in the benchmark dtype (no fp32 host copy of 8B parameters)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    torch.manual_seed(0)
    try:
        with torch.device(DEVICE):
            yield
    finally:
        torch.set_default_dtype(default)


def random_mmdit(name: str) -> sd.MMDiT:
    with building():
        return sd.MMDiT(MMDIT[name]).to(DTYPE).eval().requires_grad_(False)


def inputs(batch: int, cfg: sd.MMDiTConfig):
    g = torch.Generator(DEVICE).manual_seed(0)
    kw = dict(device=DEVICE, dtype=DTYPE, generator=g)
    return (torch.randn(batch, 16, PX // 8, PX // 8, **kw), torch.full((batch,), 500.0, device=DEVICE),
            torch.randn(batch, 333, cfg.context_dim, **kw), torch.randn(batch, cfg.pooled_dim, **kw))


def ours_from(ref, c: sd.MMDiTConfig) -> sd.MMDiT:
    """sd35_lora's MMDiT with the weights of a diffusers transformer, converted in memory."""
    return sd._build(sd.MMDiT, c, sd.mmdit_from_diffusers(ref.state_dict(), c.depth), "MMDiT", "bench", DEVICE, DTYPE)


def bench_rmsnorm(c: sd.MMDiTConfig) -> dict:
    """Per-head RMSNorm of q at the Medium CFG step's shape, on the layouts q can have (microseconds per call)."""
    L, H = (PX // 16) ** 2 + 333, c.heads
    qkv = torch.randn(2, L, 3, H, c.hidden // H, device=DEVICE, dtype=DTYPE)
    norm = torch.nn.RMSNorm(c.hidden // H, eps=1e-6, device=DEVICE, dtype=DTYPE)
    views = {"head_major_view": qkv[:, :, 0].transpose(1, 2), "token_major_view": qkv[:, :, 0],
             "contiguous": qkv[:, :, 0].contiguous()}
    with torch.no_grad():
        return {f"rmsnorm_{k}_us": round(seconds_per_call(lambda: norm(v), 20) * 1e6, 1) for k, v in views.items()}


def bench_compile():
    """CFG sampling step (batch 2) at Medium and Large size: diffusers eager, sd35_lora eager and compiled."""
    from diffusers import SD3Transformer2DModel
    for name in ("medium", "large"):
        c, out = MMDIT[name], {}
        results.setdefault("compile", {})[name] = out
        try:
            with building():
                ref = SD3Transformer2DModel(**diffusers_config(c))
            ref = ref.eval().requires_grad_(False)
            ours = ours_from(ref, c)
            x, t, context, pooled = inputs(2, c)
            runs = {"diffusers_eager": lambda: ref(hidden_states=x, encoder_hidden_states=context,
                                                   pooled_projections=pooled, timestep=t, return_dict=False)[0],
                    "sd35_lora_eager": lambda: ours(x, t, context, pooled)}
            with torch.no_grad():
                a, b = runs["sd35_lora_eager"]().float(), runs["diffusers_eager"]().float()
                out["rel_err"] = ((a - b).norm() / b.norm()).item()
                a = b = None
                for label, fn in runs.items():
                    reset_peak()
                    out[f"{label}_step_s"] = seconds_per_call(fn, 5)
                    out[f"{label}_memory"] = peak_gib()
                ref = runs = None
                start = time.perf_counter()
                ours.compile_blocks()                                   # what sample.py --compile does
                ours(x, t, context, pooled)
                sync()
                out["compile_s"] = round(time.perf_counter() - start, 1)
                reset_peak()
                out["sd35_lora_compiled_step_s"] = seconds_per_call(lambda: ours(x, t, context, pooled), 5)
                out["sd35_lora_compiled_memory"] = peak_gib()
                out["sd35_lora_compiled_device_time"] = device_time(lambda: ours(x, t, context, pooled))
            for label in ("sd35_lora_eager", "sd35_lora_compiled"):
                out[f"ratio_{label}_vs_diffusers_eager"] = round(out[f"{label}_step_s"] / out["diffusers_eager_step_s"], 3)
            if name == "medium":
                out.update(bench_rmsnorm(c))
        except Exception:
            out["error"] = traceback.format_exc()[-1500:]
        ref = ours = runs = None
        torch._dynamo.reset()
        reset_peak()
        report("compile", results["compile"])


def random_text_encoders(use_t5: bool) -> sd.TextEncoders:
    """CLIP-L, CLIP-G and T5-XXL at their real sizes, random weights, character-level tokenizers."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    tok = sd.tiny_tokenizer()
    if SMOKE:
        widths, t5_cfg = ((32, 64, 2, 2), (64, 128, 2, 2)), T5Config(d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4)
    else:
        widths = ((768, 3072, 12, 12), (1280, 5120, 32, 20))
        t5_cfg = T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
    clips = [CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=w, intermediate_size=f, num_hidden_layers=n,
                                                        num_attention_heads=h, projection_dim=w, bos_token_id=2,
                                                        eos_token_id=3, pad_token_id=3)) for w, f, n, h in widths]
    t5 = T5EncoderModel(t5_cfg) if use_t5 else None
    for m in [*clips, t5]:
        if m is not None:
            m.eval().requires_grad_(False)
    return sd.TextEncoders(*clips, t5, (tok, tok, tok), t5_length=256, context_dim=t5_cfg.d_model)


def cap_memory(gib: float | None):
    """Emulate a smaller card: the caching allocator refuses to hold more than `gib` (None: the whole GPU)."""
    if DEVICE.type == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(1.0 if gib is None else gib * 2**30 / total)


def bench_pipeline():
    out = {"budget_gib": BUDGET_GIB}
    settings = sd.SampleSettings(steps=2, width=PX, height=PX)
    for use_t5, offload in ((True, True), (False, False)):
        label = f"large_{'t5' if use_t5 else 'no_t5'}_{'offload' if offload else 'resident'}"
        try:
            mmdit = random_mmdit("large")
            with building():
                vae = sd.VAE(sd.VAEConfig(ch=8, groups=4) if SMOKE else sd.VAEConfig()).eval()
                text = random_text_encoders(use_t5)
            pipe = sd.Pipeline(mmdit, vae, text, "sd3.5-large", DEVICE).place(offload)
            reset_peak()
            cap_memory(BUDGET_GIB)
            start = time.perf_counter()
            sd.generate(pipe, ["a lighthouse on a cliff"], "", settings, progress=False)
            sync()
            out[label] = {"seconds": round(time.perf_counter() - start, 1), **peak_gib()}
        except Exception:
            out[label] = {"error": traceback.format_exc()[-1500:]}
        finally:
            pipe = mmdit = vae = text = None
            cap_memory(None)
        report("pipeline", out)


def diffusers_config(c: sd.MMDiTConfig) -> dict:
    return dict(sample_size=PX // 8, num_layers=c.depth, attention_head_dim=c.hidden // c.heads, num_attention_heads=c.heads,
                joint_attention_dim=c.context_dim, caption_projection_dim=c.hidden, pooled_projection_dim=c.pooled_dim,
                pos_embed_max_size=c.pos_embed_max_size, qk_norm="rms_norm", dual_attention_layers=c.dual_attention_layers)


TRAIN_CONFIG = sd.TrainConfig()


def lora_loss(forward, latents, context, pooled, g: torch.Generator) -> torch.Tensor:
    """This project's loss (timestep sampling, flow target), starting a training step, for either model."""
    # A new generation of CUDA graph trees: they may overwrite what the last step's graphs returned (its
    # gradients are None by now). Without it they guess a step's end from a backward having run. A no-op
    # with no CUDA graphs.
    torch.compiler.cudagraph_mark_step_begin()
    autocast = None if DTYPE == torch.float32 else DTYPE
    return sd.flow_matching_loss(forward, latents.float(), context, pooled, TRAIN_CONFIG, 3.0, g, autocast)[0]


def lora_train_step(forward, params, latents, context, pooled, fused: bool | None = None):
    """One step of this project's loss + AdamW, for either model."""
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused)
    g = torch.Generator().manual_seed(0)

    def step():
        lora_loss(forward, latents, context, pooled, g).backward()
        torch.nn.utils.clip_grad_norm_(params, TRAIN_CONFIG.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def lora_gradients(model, params, start, latents, context, pooled) -> list[torch.Tensor]:
    """[loss, *LoRA gradients] (on the CPU) of one step from the LoRA weights `start` with the same timestep
    and noise each call: what any variant of `model` must agree on. The weights are copied in, in place as
    AdamW updates them (a CUDA graph reads its parameters where it recorded them)."""
    with torch.no_grad():
        for p, value in zip(params, start):
            p.copy_(value)
    loss = lora_loss(model, latents, context, pooled, torch.Generator().manual_seed(1))
    loss.backward()
    found = [loss.detach().reshape(1)] + [p.grad for p in params]
    found = [t.to("cpu", copy=True) for t in found]         # a graph's next replay overwrites its outputs
    for p in params:
        p.grad = None
    return found


def max_rel_err(found: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """The largest |found - expected| / |expected| (L2 norms) over the tensors."""
    return max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(found, expected))


@contextlib.contextmanager
def torch_warnings():
    """Collects what torch warns inside: Python warnings and its loggers' warnings (inductor logs there why it
    skips or re-records a CUDA graph), the list filled on exit."""
    notes = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: notes.append(record.getMessage())
    names = ("torch._inductor", "torch._inductor.cudagraph_trees", "torch._dynamo")   # none propagates up
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield notes
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
            notes += [f"{w.category.__name__}: {w.message}" for w in caught]


def cuda_graphs_recorded() -> int | None:
    """How many CUDA graphs the cudagraph trees hold (re-recordings included); None on a CPU."""
    if DEVICE.type != "cuda":
        return None
    from torch._inductor import cudagraph_trees
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    nodes = [node for roots in manager.roots.values() for node in roots] if manager else []
    return sum(1 + node.num_descendants() for node in nodes)


def train_sd35_lora(name: str, r: dict):
    """sd35_lora's LoRA step at `name`'s size into r: eager, eager as before 2026-11-30, compiled, compiled
    with CUDA graphs. -> the step's inputs"""
    model = random_mmdit(name)
    params = sd.add_lora(model, rank=16, alpha=16, targets="attn")
    model.enable_gradient_checkpointing().train()
    latents, _, context, pooled = inputs(1, model.cfg)
    reset_peak()
    step = lora_train_step(model, params, latents, context, pooled, fused=True)   # as `train` makes it
    r["sd35_lora_step_s"] = seconds_per_call(step, 5)
    r["sd35_lora_memory"] = peak_gib()
    r["sd35_lora_device_time"] = device_time(step)
    model.run_block = checkpointed_block_before             # the same step as it ran before 2026-11-30
    r["sd35_lora_before_step_s"] = seconds_per_call(step, 5)
    r["sd35_lora_before_device_time"] = device_time(step)
    r["ratio_sd35_lora_vs_before"] = round(r["sd35_lora_step_s"] / r["sd35_lora_before_step_s"], 3)
    model.run_block = sd.run_joint_block
    if SMOKE and name != "medium":                          # one compiled size is enough on a CPU
        return latents, context, pooled
    model.compile_blocks()                                  # train.compile: true
    reset_peak()
    r["sd35_lora_compiled_step_s"] = seconds_per_call(step, 5, warmup=3)
    r["sd35_lora_compiled_memory"] = peak_gib()
    r["sd35_lora_compiled_device_time"] = device_time(step)
    start = [p.detach().to("cpu", copy=True) for p in params]   # trained a few steps: no lora_up is 0
    gradients = lambda: lora_gradients(model, params, start, latents, context, pooled)
    expected = gradients()
    r["sd35_lora_compiled_repeat_grad_rel_err"] = max_rel_err(gradients(), expected)
    report("train", results["train"])                      # kept if the CUDA graphs take the process down
    train_cudagraphs(model, step, r, lambda: max_rel_err(gradients(), expected))
    return latents, context, pooled


def train_cudagraphs(model: sd.MMDiT, step, r: dict, grad_rel_err):
    """The compiled step with CUDA graphs (mode="reduce-overhead": cudagraph trees) into r; a failure as one
    line in `sd35_lora_cudagraphs_error`, and the stage goes on."""
    # The trees record a graph per call in call order: each block's forward, then each block's backward, is
    # its own node holding its block's parameters (dynamo marks nn.Parameters static inputs), so the blocks
    # sharing compiled code do not re-record one another, and cudagraph_unexpected_rerecord_limit stays
    # untouched. Step 1 warms up, step 2 records, later steps replay: `_graphs` stays at about 2 x depth (x
    # partitions) unless replays re-record. AdamW updates the LoRA weights in place, where the graphs read
    # them; eager inputs (x, c, the last block's output gradient) are copied into the graphs' own.
    torch._dynamo.reset()                                  # the plain compiled blocks go: one clean compile
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    model.run_block = torch.compile(sd.run_joint_block, mode="reduce-overhead")
    notes = []
    try:
        with torch_warnings() as notes:                    # compiling, warming up, recording, replaying
            reset_peak()
            r["sd35_lora_cudagraphs_step_s"] = seconds_per_call(step, 5, warmup=3)
        r["sd35_lora_cudagraphs_memory"] = peak_gib()
        r["ratio_sd35_lora_cudagraphs_vs_compiled"] = round(
            r["sd35_lora_cudagraphs_step_s"] / r["sd35_lora_compiled_step_s"], 3)
        r["sd35_lora_cudagraphs_device_time"] = device_time(step)
        r["sd35_lora_cudagraphs_grad_rel_err"] = grad_rel_err()
        r["sd35_lora_cudagraphs_graphs"] = cuda_graphs_recorded()
    except Exception as e:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        lines = [line.strip() for line in f"{type(e).__name__}: {e}".splitlines() if line.strip()]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        r["sd35_lora_cudagraphs_error"] = f"{' | '.join(lines)[:600]} (at {where})"
    finally:
        r["sd35_lora_cudagraphs_skips"] = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] - skips
        r["sd35_lora_cudagraphs_notes"] = " | ".join(dict.fromkeys(note[:300] for note in notes))[:1500]
        torch._dynamo.reset()                              # the trees' graphs and memory pool go


def bench_train():
    """Rank-16 LoRA on the attention projections of both streams, as diffusers' training scripts target them."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig
    out = results["train"] = {}
    for name in ("medium", "large"):
        r = out[name] = {}
        try:
            latents, context, pooled = train_sd35_lora(name, r)
            reset_peak()
            with building():
                ref = SD3Transformer2DModel(**diffusers_config(MMDIT[name])).requires_grad_(False)
            ref.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=[
                "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]))
            params = [p for p in ref.parameters() if p.requires_grad]
            for p in params:
                p.data = p.data.float()
            ref.enable_gradient_checkpointing()
            ref.train()
            forward = lambda x, t, c, y: ref(hidden_states=x, encoder_hidden_states=c, pooled_projections=y, timestep=t,
                                             return_dict=False)[0]
            reset_peak()
            r["diffusers_peft_step_s"] = seconds_per_call(lora_train_step(forward, params, latents, context, pooled), 5)
            r["diffusers_peft_memory"] = peak_gib()
            for label in ("sd35_lora", "sd35_lora_compiled", "sd35_lora_cudagraphs"):
                if f"{label}_step_s" in r:
                    r[f"ratio_{label}_vs_diffusers_peft"] = round(r[f"{label}_step_s"] / r["diffusers_peft_step_s"], 3)
        except Exception:
            r["error"] = traceback.format_exc()[-1500:]
        params = ref = forward = None
        reset_peak()
        report("train", out)


def fp8_scaled_mm_check() -> dict:
    """Compiled, torch._scaled_mm row-wise runs (the fp8 path is taken) and matches the dequantized matmul, grad_x
    included; eager, the layer dequantizes (fp8_tensor_cores says why). Times: fp8 compiled, dequantized eager, bf16."""
    g = torch.Generator(DEVICE).manual_seed(0)
    rows, dim, out_dim = (64, 64, 192) if SMOKE else (2 * 4429, 1536, 6144)   # Medium's fc1, CFG batch 2
    x = torch.randn(rows, dim, device=DEVICE, dtype=DTYPE, generator=g, requires_grad=True)
    weight, scale = sd.quantize_fp8(torch.randn(out_dim, dim, device=DEVICE, generator=g) / dim ** 0.5)
    bias = torch.randn(out_dim, device=DEVICE, dtype=DTYPE, generator=g)
    dequantized = sd.dequantize_fp8(weight, scale, DTYPE)
    ref = torch.nn.functional.linear(x, dequantized, bias)
    compiled = torch.compile(lambda *args: sd.FrozenLinear.apply(*args))
    with torch.profiler.profile() as prof:
        out = compiled(x, weight, scale, bias)
        out.float().square().sum().backward()
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    grad_ref = 2 * ref.float().to(DTYPE) @ dequantized
    r = {"scaled_mm_used": any("scaled_mm" in e.key for e in prof.key_averages()),
         "rel_err_vs_dequantized": rel(out, ref), "grad_rel_err": rel(x.grad, grad_ref)}
    with torch.no_grad():
        r["fp8_compiled_matmul_s"] = seconds_per_call(lambda: compiled(x, weight, scale, bias), 20)
        r["dequantized_eager_matmul_s"] = seconds_per_call(lambda: sd.FrozenLinear.apply(x, weight, scale, bias), 20)
        r["bf16_matmul_s"] = seconds_per_call(lambda: torch.nn.functional.linear(x, dequantized, bias), 20)
    return r


def fp8_train(name: str, baseline: bool) -> dict:
    """LoRA training step as in `train` (rank 16, attn, grad ckpt, 1024 px): fp8 weights vs bf16 in the same run,
    eager (fp8 dequantized) and, with `baseline`, compiled (fp8 tensor cores, and dequantized as
    SD35_FP8_MATMUL=0 makes it); the GPU's kernel time of each: the step waits on launches."""
    r = {}
    labels = ["bf16", "fp8", "bf16_compiled", "fp8_compiled", "fp8_compiled_dequantized"] if baseline else ["fp8"]
    for label in labels:
        model = random_mmdit(name)
        model = sd.quantize_mmdit(model) if label.startswith("fp8") else model
        params = sd.add_lora(model, rank=16, alpha=16, targets="attn")
        model.enable_gradient_checkpointing().train()
        if "compiled" in label and not SMOKE:
            model.compile_blocks()
        latents, _, context, pooled = inputs(1, model.cfg)
        reset_peak()
        step = lora_train_step(model, params, latents, context, pooled, fused=True)       # as `train` makes it
        matmul, sd.FP8_MATMUL = sd.FP8_MATMUL, sd.FP8_MATMUL and not label.endswith("dequantized")
        try:
            r[f"{label}_step_s"] = seconds_per_call(step, 5, warmup=3)
            r[f"{label}_memory"] = peak_gib()
            r[f"{label}_device_time"] = device_time(step)
        finally:
            sd.FP8_MATMUL = matmul
        model = params = step = None
        torch._dynamo.reset()
    for label in ("", "_compiled", "_compiled_dequantized") if baseline else ():
        bf16 = r[f"bf16{label.removesuffix('_dequantized')}_step_s"]
        r[f"ratio_fp8_vs_bf16{label}_step"] = round(r[f"fp8{label}_step_s"] / bf16, 3)
    return r


def fp8_sampling_step() -> dict:
    """Medium CFG sampling step (batch 2, 333 text tokens), compiled: bf16 vs fp8 matmuls on the same weights."""
    r, outputs = {}, {}
    for label in ("bf16", "fp8"):
        model = random_mmdit("medium")                       # same seed: the same weights for both
        model = sd.quantize_mmdit(model) if label == "fp8" else model
        x, t, context, pooled = inputs(2, model.cfg)
        with torch.no_grad():
            outputs[label] = model(x, t, context, pooled).float()
            r[f"{label}_eager_step_s"] = seconds_per_call(lambda: model(x, t, context, pooled), 5)
            if not SMOKE:                                    # a CPU compile takes minutes
                model.compile_blocks()
            start = time.perf_counter()
            outputs[f"{label}_compiled"] = model(x, t, context, pooled).float()
            r[f"{label}_compile_s"] = round(time.perf_counter() - start, 1)
            reset_peak()
            r[f"{label}_compiled_step_s"] = seconds_per_call(lambda: model(x, t, context, pooled), 10)
            r[f"{label}_compiled_memory"] = peak_gib()
            r[f"{label}_compiled_device_time"] = device_time(lambda: model(x, t, context, pooled))
        model = None
        torch._dynamo.reset()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    r["rel_err_fp8_vs_bf16"] = rel(outputs["fp8"], outputs["bf16"])
    r["rel_err_fp8_compiled_vs_bf16"] = rel(outputs["fp8_compiled"], outputs["bf16"])
    r["ratio_fp8_vs_bf16_compiled_step"] = round(r["fp8_compiled_step_s"] / r["bf16_compiled_step_s"], 3)
    return r


def fp8_pipeline() -> dict:
    """Large at 1024 px through generate(), 2 steps with CFG, T5 offloaded (as in `pipeline`), fp8 MMDiT."""
    mmdit = sd.quantize_mmdit(random_mmdit("large"))
    with building():
        vae = sd.VAE(sd.VAEConfig(ch=8, groups=4) if SMOKE else sd.VAEConfig()).eval()
        text = random_text_encoders(True)
    pipe = sd.Pipeline(mmdit, vae, text, "sd3.5-large", DEVICE).place(True)
    reset_peak()
    start = time.perf_counter()
    sd.generate(pipe, ["a lighthouse on a cliff"], "", sd.SampleSettings(steps=2, width=PX, height=PX), progress=False)
    sync()
    return {"seconds": round(time.perf_counter() - start, 1), **peak_gib()}


def bench_fp8():
    """Issue 9 targets: Large training <= 11 GiB, Medium <= 4 GiB, Large sampling (T5 offloaded) <= 11 GiB,
    Medium CFG step compiled with fp8 matmuls <= 38 ms (H200). Each part is reported even if another fails."""
    out = {}
    parts = {"scaled_mm": fp8_scaled_mm_check, "train_large": lambda: fp8_train("large", baseline=True),
             "train_medium": lambda: fp8_train("medium", baseline=False), "sample_medium": fp8_sampling_step,
             "pipeline_large_t5_offload": fp8_pipeline}
    for label, part in parts.items():
        start = time.perf_counter()
        try:
            out[label] = part()
        except Exception:
            out[label] = {"error": traceback.format_exc()[-1500:]}
        out[label]["part_s"] = round(time.perf_counter() - start, 1)       # building and compiling included
        torch._dynamo.reset()
        reset_peak()
        report("fp8", out)


if __name__ == "__main__":
    stages = [a for a in sys.argv[1:] if not a.startswith("--")] or ["pipeline", "train", "compile"]
    for stage in stages:
        stage_start = time.perf_counter()
        try:
            {"compile": bench_compile, "pipeline": bench_pipeline, "train": bench_train, "fp8": bench_fp8}[stage]()
        except Exception:
            report(stage, {"error": traceback.format_exc()[-1500:]})
        torch._dynamo.reset()
        reset_peak()
        print(f"bench_gpu.py: stage {stage} took {time.perf_counter() - stage_start:.0f} s", flush=True)
