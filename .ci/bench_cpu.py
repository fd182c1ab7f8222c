"""CPU side-by-side benchmark (fp32, one process, interleaved repeats; quote the ratios, not the times).

    python .ci/bench_cpu.py [--layers 4] [--size 512] [--reps 5] [--batch 1] [--threads N]

With `--threads 1` each call is timed in process CPU time, which time stolen by other tenants of a shared
VM does not inflate: the ratios then scatter about 1% instead of 3-5%.

1. MMDiT forward vs diffusers' SD3Transformer2DModel on the same weights and inputs (SD3.5 Medium width:
   hidden 1536, 24 heads, dual attention in the first blocks, qk-norm; `--layers` of its 24 blocks to fit a CPU).
2. LoRA cost: a training step (forward + backward) with an unmerged rank-16 `attn` LoRA vs the same step
   without a LoRA, training only the patch embedder's weight (so backward runs through every block), and a
   merged-LoRA forward vs the plain forward.

    python .ci/bench_cpu.py --count-ops

counts the aten operators one step dispatches (a GPU launches about one kernel per non-view operator, so on a
GPU a step with many small operators waits on launches) and the bytes they read and write, with a
TorchDispatchMode, at a small width (the counts do not depend on it): (a) one LoRA training step as `train`
runs it on SD3.5 Large's block structure (38 blocks, qk-norm): bf16 frozen weights, fp32 rank-16 `attn` LoRA,
bf16 autocast, gradient checkpointing, forward, recompute, backward, clip_grad_norm_, AdamW, the two .item()s;
(b) the same step without a LoRA, training only the image stream's q RMSNorm weights (so that backward runs
through every block); (c) one SD3.5 Medium CFG sampling step (batch 2, no grad, `denoise` with DPM++ 2M).

    python .ci/bench_cpu.py --checkpoint-step [--reps 5]

times a LoRA training step with gradient checkpointing (tiny width: the host's work, not the kernels') on SD3.5
Medium's block structure, eager and compiled (compile_blocks), as MMDiT runs it now vs torch's non-reentrant
checkpoint around each block (before 2026-11-30), and counts its Python calls: a GPU step that waits on
launches waits on these too. Compiling takes minutes.

    python .ci/bench_cpu.py --peak-memory

tracks the bytes of the live tensors that one CFG sampling forward allocates (weights and inputs left out),
sd35_lora vs diffusers on the same weights: Medium width (1536, 24 heads), 2 blocks (the first with dual
attention), batch 2, 1024 px + 333 tokens, fp32. RMSNorm counts as CUDA runs it, one fused kernel (plus a
contiguous copy of a strided input), not as the CPU's fp32 decomposition. The GPU allocator's rounding and
the attention kernels' workspaces are not in it: a proxy for the GPU peak, to compare the two codes.
"""
import argparse
import collections
import copy
import cProfile
import functools
import pstats
import statistics
import sys
import tempfile
import time
import traceback
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sd35_lora as sd  # noqa: E402


clock = time.perf_counter


def median_time(fn, reps: int, timer=None) -> float:
    times, timer = [], timer or clock
    for _ in range(reps):
        start = timer()
        fn()
        times.append(timer() - start)
    return statistics.median(times)


def report(label: str, ratios: list[float]):
    q = statistics.quantiles(ratios, n=4)
    print(f"  {label}: median {statistics.median(ratios):.3f}, quartiles {q[0]:.3f}-{q[2]:.3f} over {len(ratios)} pairs")


class OpCounter(TorchDispatchMode):
    """Counts aten operators and the bytes of the tensors non-view operators read and write."""

    def __init__(self):
        super().__init__()
        self.ops, self.bytes = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket).removeprefix("aten.")
        self.ops[name] += 1
        if not func.is_view and name not in ("detach", "_unsafe_view", "_local_scalar_dense"):
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            self.bytes[name] += sum(t.numel() * t.element_size() for t in tensors)
        return out


def counted(fn) -> OpCounter:
    fn()                                                    # warm-up: lazy state (optimizer moments) exists
    with OpCounter() as counter:
        fn()
    counter.python_calls = python_calls(fn)
    return counter


def small_mmdit(depth: int, dual: tuple[int, ...] = (), tokens: int = 4) -> tuple[sd.MMDiT, tuple]:
    torch.manual_seed(0)
    cfg = sd.MMDiTConfig(depth=depth, hidden=128, heads=2, context_dim=32, pooled_dim=32, pos_embed_max_size=16,
                         qk_norm=True, dual_attention_layers=dual)
    n = 2 * tokens
    bf16 = dict(dtype=torch.bfloat16)                       # text embeddings come from the cache in the weights' dtype
    return sd.MMDiT(cfg).to(torch.bfloat16), (torch.randn(1, 16, n, n), torch.randn(1, 77, 32, **bf16), torch.randn(1, 32, **bf16))


def count_train_step(lora: bool) -> OpCounter:
    """One `train` step at Large's block structure (see the module docstring)."""
    model, (latents, context, pooled) = small_mmdit(38)
    if lora:
        params = sd.add_lora(model, rank=16, alpha=16, targets="attn")
    else:
        params = [block.x_block.attn.ln_q.weight for block in model.joint_blocks]
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
    model.enable_gradient_checkpointing().train()
    tc, g = sd.TrainConfig(), torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=True)     # as `train` makes it
    return counted(functools.partial(train_step, model, params, opt, tc, g, latents, context, pooled))


def train_step(model, params, opt, tc, g, latents, context, pooled):
    """One step as `train` runs it: loss, backward, the two .item()s, clipping, AdamW."""
    loss = sd.flow_matching_loss(model, latents, context, pooled, tc, 3.0, g, torch.bfloat16)[0]
    loss.backward()
    loss.item()
    torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm).item()
    opt.step()
    opt.zero_grad(set_to_none=True)


def count_sampling_step() -> OpCounter:
    """One Medium CFG step as `generate` runs it: batch 2 (uncond, cond), no grad, bf16."""
    model, (x, context, pooled) = small_mmdit(24, dual=tuple(range(13)), tokens=16)
    model.eval().requires_grad_(False)
    cond = uncond = (context, pooled)
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    return counted(lambda: sd.denoise(model, x, sigmas[:2], cond, uncond, cfg=5.0, sampler="dpmpp_2m"))


class LiveBytes(TorchDispatchMode):
    """The peak of the summed sizes of the storages that operators allocate and Python still holds."""

    def __init__(self):
        super().__init__()
        self.refs, self.size, self.live, self.peak, self.where = collections.Counter(), {}, 0, 0, ""

    def hold(self, tensor: torch.Tensor, where: str):
        key = tensor.untyped_storage().data_ptr()
        if key not in self.size:
            self.size[key] = tensor.untyped_storage().nbytes()
            self.live += self.size[key]
        self.refs[key] += 1
        weakref.finalize(tensor, self.release, key)
        if self.live > self.peak:
            self.peak, self.where = self.live, where

    def release(self, key):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.size.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        caller = next((f"{f.name}:{f.lineno}" for f in reversed(traceback.extract_stack())
                       if f.filename == sd.__file__), "")
        for t in tree_flatten(out)[0]:
            new = isinstance(t, torch.Tensor) and not func.is_view and t.untyped_storage().data_ptr() not in inputs
            if new or isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.size:
                self.hold(t, f"{func.overloadpacket.__name__} in {caller or 'diffusers'}")
        return out


def peak_memory():
    """Peak live activation bytes of one no-grad CFG forward, sd35_lora vs diffusers (module docstring)."""
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    ref = SD3Transformer2DModel(sample_size=128, num_layers=2, attention_head_dim=64, num_attention_heads=24,
                                caption_projection_dim=1536, joint_attention_dim=4096, pooled_projection_dim=2048,
                                pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=(0,))
    ref = ref.eval().requires_grad_(False)
    cfg = sd.MMDiTConfig(depth=2, dual_attention_layers=(0,))
    weights = sd.mmdit_from_diffusers(ref.state_dict(), 2)
    ours = sd._build(sd.MMDiT, cfg, weights, "MMDiT", "bench", "cpu", torch.float32)
    x, t = torch.randn(2, 16, 128, 128), torch.full((2,), 500.0)
    context, pooled = torch.randn(2, 333, 4096), torch.randn(2, 2048)
    runs = {"sd35_lora": lambda: ours(x, t, context, pooled),
            "diffusers": lambda: ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                                     timestep=t, return_dict=False)[0]}
    rms_norm = torch.nn.functional.rms_norm
    print("peak live activations of one forward (Medium width, 2 blocks, batch 2, 1024 px, fp32):")
    for label, run in runs.items():
        tracker = LiveBytes()

        def fused_rms_norm(x, shape, weight=None, eps=None):     # as CUDA's _fused_rms_norm: one output tensor
            with torch.utils._python_dispatch._disable_current_modes():
                out = rms_norm(x, shape, weight, eps)
            copy = 0 if x.is_contiguous() else x.numel() * x.element_size()
            tracker.live += copy                                   # a strided input is copied first
            tracker.hold(out, "fused rms_norm")
            tracker.live -= copy
            return out
        torch.nn.functional.rms_norm = fused_rms_norm              # nn.RMSNorm calls F.rms_norm; diffusers does not
        try:
            with torch.no_grad(), tracker:
                run()
        finally:
            torch.nn.functional.rms_norm = rms_norm
        print(f"  {label}: {tracker.peak / 2**20:.1f} MiB, at {tracker.where}")


def python_calls(fn) -> int:
    """Python functions and builtins one call of fn makes (cProfile's count): host work, apart from kernels."""
    fn()
    profiler = cProfile.Profile()
    profiler.runcall(fn)
    return pstats.Stats(profiler).total_calls


def checkpointed_block_before(block, context, x, c, recompute: bool):
    """How MMDiT ran a block before 2026-11-30: torch's non-reentrant checkpoint around it (compiled or not)."""
    if not recompute:
        return block(context, x, c)
    return checkpoint(block, context, x, c, use_reentrant=False,
                      context_fn=lambda: (sd.checkpointed(), sd.checkpointed()))


def checkpoint_host_work(reps: int):
    """A LoRA training step on Medium's block structure with gradient checkpointing, eager and compiled: as
    run_joint_block runs it now vs `checkpointed_block_before`; Python calls and process time a step."""
    torch.set_num_threads(1)                        # process time: other tenants of a shared VM do not count
    for compiled in (False, True):
        steps = {}
        for label in ("now", "before"):
            model, (latents, context, pooled) = small_mmdit(24, dual=tuple(range(13)))
            params = sd.add_lora(model, rank=16, alpha=16, targets="attn")
            model.enable_gradient_checkpointing().train()
            if compiled:
                model.compile_blocks()
            if label == "before":
                for block in model.joint_blocks if compiled else ():
                    block.compile()
                model.run_block = checkpointed_block_before
            tc, g = sd.TrainConfig(), torch.Generator().manual_seed(0)
            opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
            steps[label] = functools.partial(train_step, model, params, opt, tc, g, latents, context, pooled)
            start = time.perf_counter()
            steps[label]()
            print(f"  {'compiled' if compiled else 'eager'} {label}: first step {time.perf_counter() - start:.0f} s, "
                  f"{python_calls(steps[label])} Python calls a step")
        ratios = []
        for i in range(reps):
            order = ("now", "before") if i % 2 else ("before", "now")
            times = {label: median_time(steps[label], 1, time.process_time) for label in order}
            ratios.append(times["now"] / times["before"])
        report(f"{'compiled' if compiled else 'eager'}: process time a step, now / before", ratios)


def count_ops():
    print("aten operators per step (bytes: read + written by non-view operators, at this small width):")
    for label, counter in (("LoRA training step, Large structure", count_train_step(True)),
                           ("training step without LoRA (q RMSNorm weights)", count_train_step(False)),
                           ("Medium CFG sampling step, batch 2", count_sampling_step())):
        top = ", ".join(f"{k} {v}" for k, v in counter.ops.most_common(8))
        print(f"  {label}: {sum(counter.ops.values())} ops, {sum(counter.bytes.values()) / 2**20:.1f} MiB, "
              f"{counter.python_calls} Python calls ({top})")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=1, help="2 = a CFG sampling step")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--count-ops", action="store_true", help="count the operators of a step instead of timing")
    p.add_argument("--peak-memory", action="store_true", help="peak live activations of a CFG forward vs diffusers")
    p.add_argument("--checkpoint-step", action="store_true", help="a checkpointed training step's host work")
    args = p.parse_args()
    if args.count_ops:
        return count_ops()
    if args.checkpoint_step:
        return checkpoint_host_work(args.reps)
    if args.peak_memory:
        return peak_memory()
    global clock
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.get_num_threads() == 1:
        clock = time.process_time
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    ref = SD3Transformer2DModel(sample_size=128, num_layers=args.layers, attention_head_dim=64, num_attention_heads=24,
                                caption_projection_dim=1536, joint_attention_dim=4096, pooled_projection_dim=2048,
                                pos_embed_max_size=384, qk_norm="rms_norm",
                                dual_attention_layers=tuple(range(min(2, args.layers)))).eval().requires_grad_(False)
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(Path(folder) / "transformer")
        ours = sd.load_mmdit(folder).requires_grad_(False)
    n = args.size // 8
    b = args.batch
    x, t = torch.randn(b, 16, n, n), torch.full((b,), 500.0)
    context, pooled = torch.randn(b, 333, 4096), torch.randn(b, 2048)
    run_ref = lambda: ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                          return_dict=False)[0]
    run_ours = lambda: ours(x, t, context, pooled)
    ref_copy = copy.deepcopy(ref)
    run_copy = lambda: ref_copy(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                                return_dict=False)[0]

    def ratios(first, second):
        """first/second time per pair, alternating which runs first."""
        out = []
        for i in range(args.reps):
            if i % 2:
                a, b = median_time(first, 1), median_time(second, 1)
            else:
                b, a = median_time(second, 1), median_time(first, 1)
            out.append(a / b)
        return out

    with torch.no_grad():
        err = ((run_ours() - run_ref()).norm() / run_ref().norm()).item()
        project, noise = ratios(run_ours, run_ref), ratios(run_copy, run_ref)
        ours_s, ref_s = median_time(run_ours, args.reps), median_time(run_ref, args.reps)
    print(f"forward, {args.layers} of 24 Medium blocks, batch {b}, {args.size}px + 333 tokens, fp32, "
          f"{torch.get_num_threads()} threads, {clock.__name__}:")
    print(f"  sd35_lora {ours_s:.3f} s, diffusers {ref_s:.3f} s; relative error {err:.1e}")
    report("sd35_lora / diffusers", project)
    report("diffusers / diffusers (noise floor)", noise)

    target = torch.randn_like(x)
    plain = copy.deepcopy(ours)
    plain.x_embedder.proj.weight.requires_grad_(True)       # baseline: backward through every block, no LoRA
    sd.add_lora(ours, rank=16, targets="attn")

    def train_step(model):
        return lambda: ((model(x, t, context, pooled) - target) ** 2).mean().backward()

    print("LoRA cost, same model with and without a rank-16 attn LoRA:")
    report("training step (forward + backward), unmerged LoRA / no LoRA", ratios(train_step(ours), train_step(plain)))
    with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
        sd.save_lora(ours, Path(folder) / "lora.safetensors")
        merged = copy.deepcopy(plain)
        sd.load_lora(merged, Path(folder) / "lora.safetensors")      # merged into the weights, as sample.py does
        report("sampling forward, merged LoRA / no LoRA",
               ratios(lambda: merged(x, t, context, pooled), lambda: plain(x, t, context, pooled)))


if __name__ == "__main__":
    main()
