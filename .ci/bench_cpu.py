"""CPU side-by-side benchmark (fp32, one process, interleaved repeats; quote the ratios, not the times).

    python .ci/bench_cpu.py [--layers 4] [--size 512] [--reps 5] [--batch 1] [--threads N]

With `--threads 1` each call is timed in process CPU time, which time stolen by other tenants of a shared
VM does not inflate: the ratios then scatter about 1% instead of 3-5%.

1. MMDiT forward vs diffusers' SD3Transformer2DModel on the same weights and inputs (SD3.5 Medium width:
   hidden 1536, 24 heads, dual attention in the first blocks, qk-norm; `--layers` of its 24 blocks to fit a CPU).
2. LoRA cost: a training step (forward + backward) with an unmerged rank-16 `attn` LoRA vs the same step
   training nothing, and a merged-LoRA forward vs the plain forward.
"""
import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sd35_lora as sd  # noqa: E402


clock = time.perf_counter


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def report(label: str, ratios: list[float]):
    q = statistics.quantiles(ratios, n=4)
    print(f"  {label}: median {statistics.median(ratios):.3f}, quartiles {q[0]:.3f}-{q[2]:.3f} over {len(ratios)} pairs")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=1, help="2 = a CFG sampling step")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
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
    with torch.no_grad():
        sd.set_lora_merged(ours, True)
        plain_forward = lambda: plain(x, t, context, pooled)
        report("sampling forward, merged LoRA / no LoRA", ratios(run_ours, plain_forward))


if __name__ == "__main__":
    main()
