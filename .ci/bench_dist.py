"""Cost of torchrun training on the CPU (gloo), on the tiny model: a 2-process batch-1 step vs a 1-process batch-2
step (same global batch, one thread per process), and the time of the one all-reduce per step.

    python .ci/bench_dist.py [--steps 40] [--reps 3]

Step times are the median gaps between log.jsonl lines after 5 warm-up steps; runs alternate so that a busy
shared VM slows both alike. Prints JSON.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import sd35_lora as sd  # noqa: E402


def step_time(folder: Path, nproc: int, batch: int, steps: int) -> float:
    run = folder / f"run_{nproc}_{time.monotonic_ns()}"
    sets = ["model=tiny", "device=cpu", "dtype=fp32", "t5_length=16", f"dataset.path={folder / 'data'}",
            "dataset.resolution=64", f"dataset.cache_dir={folder / 'cache'}", f"output_dir={run}", "lora.targets=attn",
            f"train.steps={steps}", f"train.save_every={steps}", "train.gradient_checkpointing=false",
            f"train.batch_size={batch}", "sample.prompts=[]", "train.warmup_steps=0"]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, str(ROOT / "sd35_lora.py"), *(a for s in sets for a in ("--set", s))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run_or_exit(cmd, env)
    times = [json.loads(line)["time"] for line in (run / "log.jsonl").read_text().splitlines()]
    return statistics.median(b - a for a, b in zip(times[5:], times[6:]))


def run_or_exit(cmd: list[str], env: dict) -> str:
    """cmd's stdout; if it fails, exit with its stderr's end (a failure under CI's load shows its cause)."""
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"{' '.join(cmd[1:4])} ... exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result.stdout


def all_reduce_time(reps: int = 200) -> dict:
    """Run under torchrun: the tiny model's LoRA gradients all-reduced as one buffer, like a training step."""
    torch.set_num_threads(1)
    sd.init_distributed(sd.load_config(None, ["device=cpu", "train.dist_timeout=60"]))
    torch.manual_seed(0)
    params = sd.add_lora(sd.tiny_pipeline().mmdit, 16, 16, "attn")
    for p in params:
        p.grad = torch.randn_like(p)
    numbers = torch.zeros(13)
    sd.all_reduce_step(params, numbers)
    start = time.perf_counter()
    for _ in range(reps):
        sd.all_reduce_step(params, numbers)
    return {"lora_params": sum(p.numel() for p in params), "all_reduce_ms": (time.perf_counter() - start) / reps * 1e3}


def main():
    if "RANK" in os.environ:
        result = all_reduce_time()
        if os.environ["RANK"] == "0":
            print(json.dumps(result))
        return
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sd.write_demo_dataset(folder / "data")
        one, two = [], []
        for _ in range(args.reps):
            one.append(step_time(folder, 1, 2, args.steps))
            two.append(step_time(folder, 2, 1, args.steps))
    reduce = run_or_exit([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          __file__], {**os.environ, "OMP_NUM_THREADS": "1"})
    reduce = next(line for line in reduce.splitlines() if line.startswith("{"))   # after "global batch" lines
    one_s, two_s = statistics.median(one), statistics.median(two)
    print(json.dumps({"one_process_batch2_step_s": one_s, "two_process_batch1_step_s": two_s,
                      "ratio_two_vs_one": two_s / one_s, "cores": os.cpu_count(), **json.loads(reduce)}, indent=1))


if __name__ == "__main__":
    main()
