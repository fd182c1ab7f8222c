"""Peak host RAM while loading weights, per checkpoint layout, against the loaded model's bytes (CPU only).

    python .ci/bench_ram.py [--blocks 6] [--t5-layers 3] [--dir /tmp]

Writes synthetic checkpoints of the real layouts with random weights (SD3.5 Medium's width, `--blocks` joint
blocks with dual attention in the first half; T5-XXL's width with `--t5-layers`; ~8 GB of files in all,
deleted at the end), then loads each in a fresh process. Per case, in units of the loaded model's bytes and
above what the process held after its imports (its RSS; for anon, its anonymous memory):

- rss: the kernel's peak RSS (VmHWM, reset before loading). It counts the pages of the memory-mapped
  file that were read: page cache, which the kernel drops under memory pressure instead of killing the
  process.
- anon: the peak of the process's own (anonymous) memory, sampled every 0.5 ms: what can run out.
- after: RSS once every weight has been read (the model as it is used).

A LoRA case starts from the model loaded and read, and measures the merge: a bf16 model's pages move from the
mapped file to anonymous memory as they are written (anon rises by the model, RSS only by the temporaries).

1.0 anon is the ideal (each tensor read from the mapped file and converted one at a time); 2 or more would
be a whole extra copy.
"""
import argparse
import json
import re
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sd35_lora as sd  # noqa: E402

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn
SAFETENSORS_DTYPES = {**sd.HEADER_DTYPES, FP8: "F8_E4M3"}     # header names: cached() reads the same


def write_streamed(path: Path, items: list):
    """A .safetensors file of (name, shape, dtype) random tensors, written one at a time (no whole dict)."""
    header, offset = {}, 0
    for name, shape, dtype in items:
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, shape, dtype in items:
            t = torch.randn(shape) * (0.02 if len(shape) >= 2 else 1)
            t = (t * 2e4).clamp(-448, 448).to(FP8) if dtype == FP8 else t.to(dtype)   # scale_weight 1e-5
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def shapes(build) -> list[tuple[str, tuple]]:
    with torch.device("meta"):
        return [(k, tuple(v.shape)) for k, v in build().state_dict().items() if "position_ids" not in k]


def layout(shape_list, dtype, prefix="", fp8_matrices=None) -> list:
    """(name, shape, dtype) items; matrices matching `fp8_matrices` as ComfyUI's scaled fp8 files do."""
    items = []
    for name, shape in shape_list:
        if fp8_matrices and len(shape) == 2 and re.match(fp8_matrices, name.removesuffix(".weight")):
            scale = prefix + name.removesuffix("weight") + "scale_weight"
            items += [(prefix + name, shape, FP8), (scale, (), torch.float32)]
        else:
            items.append((prefix + name, shape, dtype))
    return items + [(prefix + "scaled_fp8", (0,), FP8)] * bool(fp8_matrices)


def write_checkpoints(root: Path, blocks: int, t5_layers: int):
    import transformers
    cfg = sd.MMDiTConfig(depth=blocks, pos_embed_max_size=192,
                         dual_attention_layers=tuple(range(blocks // 2)))
    mmdit = shapes(lambda: sd.MMDiT(cfg))
    official = "model.diffusion_model."
    for dtype, name in ((BF16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32")):
        write_streamed(root / f"mmdit_{name}.safetensors", layout(mmdit, dtype, official))
    write_streamed(root / "mmdit_fp8_scaled.safetensors", layout(mmdit, BF16, official, sd.FP8_WEIGHTS))
    diffusers, per_module = [], {k: s for k, s in mmdit}                  # to_q/k/v split, in 3 shards
    diffusers.append(("pos_embed.pos_embed", per_module["pos_embed"], BF16))
    for module, names in sd.diffusers_names(blocks).items():
        for p in ("weight", "bias"):
            if f"{module}.{p}" in per_module:
                shape = per_module[f"{module}.{p}"]
                diffusers += [(f"{n}.{p}", (shape[0] // len(names), *shape[1:]), BF16) for n in names]
    folder, weight_map = root / "diffusers" / "transformer", {}
    for i in range(3):
        shard = f"diffusion_pytorch_model-0000{i + 1}-of-00003.safetensors"
        write_streamed(folder / shard, diffusers[i::3])
        weight_map.update({name: shard for name, *_ in diffusers[i::3]})
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"num_layers": blocks, "num_attention_heads": 24}))

    clip = lambda width: lambda: transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2, num_attention_heads=width // 64,
        projection_dim=width))
    clip_l = [(k, s) for k, s in shapes(clip(768)) if not k.startswith("text_projection")]
    clip_g = shapes(clip(1280))
    t5 = shapes(lambda: transformers.T5EncoderModel(transformers.T5Config(
        d_model=4096, d_kv=64, d_ff=10240, num_layers=t5_layers, num_heads=64,
        feed_forward_proj="gated-gelu")))
    t5_files = (("te_fp16", "t5xxl_fp16", None), ("te_fp8", "t5xxl_fp8_e4m3fn_scaled", r"encoder\.block"))
    for folder, t5_file, t5_fp8 in t5_files:
        write_streamed(root / folder / "clip_l.safetensors", layout(clip_l, torch.float16))
        write_streamed(root / folder / "clip_g.safetensors", layout(clip_g, torch.float16))
        write_streamed(root / folder / f"{t5_file}.safetensors",
                       layout(t5, torch.float16, fp8_matrices=t5_fp8))
    vae = shapes(lambda: sd.VAE(sd.VAEConfig()))
    text = "text_encoders.{}.transformer."
    write_streamed(root / "all_in_one" / "sd3.5_incl_clips_t5xxlfp8.safetensors", [
        *layout(mmdit, BF16, official), *layout(vae, BF16, "first_stage_model."),
        *layout(clip_l, torch.float16, text.format("clip_l")),
        *layout(clip_g, torch.float16, text.format("clip_g")),
        *layout(t5, torch.float16, text.format("t5xxl"), r"encoder\.block")])
    for folder in ("te_fp16", "te_fp8", "all_in_one"):
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            sd.tiny_tokenizer(t5=name == "tokenizer_3").save_pretrained(root / folder / name)
    model = sd.load_mmdit(root / "mmdit_bf16.safetensors", dtype=BF16)
    sd.add_lora(model, rank=16, targets="all")
    for name, p in model.named_parameters():
        if "lora_up" in name:                       # not all zero: the merge has something to add
            p.data.normal_(0, 0.01)
    sd.save_lora(model, root / "lora.safetensors")


CASES = {  # name: the loaded modules, from the checkpoints' folder
    "bf16 file -> bf16": lambda r: [sd.load_mmdit(r / "mmdit_bf16.safetensors", dtype=BF16)],
    "fp16 file -> bf16": lambda r: [sd.load_mmdit(r / "mmdit_fp16.safetensors", dtype=BF16)],
    "fp32 file -> bf16": lambda r: [sd.load_mmdit(r / "mmdit_fp32.safetensors", dtype=BF16)],
    "diffusers folder, 3 bf16 shards -> bf16": lambda r: [sd.load_mmdit(r / "diffusers", dtype=BF16)],
    "fp8: true from the bf16 file":
        lambda r: [sd.load_mmdit(r / "mmdit_bf16.safetensors", dtype=BF16, fp8=True)],
    "ComfyUI scaled fp8 file, fp8: true":
        lambda r: [sd.load_mmdit(r / "mmdit_fp8_scaled.safetensors", dtype=BF16, fp8=True)],
    "ComfyUI scaled fp8 file -> bf16":
        lambda r: [sd.load_mmdit(r / "mmdit_fp8_scaled.safetensors", dtype=BF16)],
    "text encoders, t5xxl_fp16 -> bf16": lambda r: encoders(sd.load_text_encoders(r / "te_fp16", dtype=BF16)),
    "text encoders, t5xxl fp8 scaled -> bf16":
        lambda r: encoders(sd.load_text_encoders(r / "te_fp8", dtype=BF16)),
    "all-in-one file, load_pipeline bf16": lambda r: pipeline_models(sd.load_pipeline(
        str(r / "all_in_one" / "sd3.5_incl_clips_t5xxlfp8.safetensors"), device="cpu", dtype=BF16)),
}
LORA_CASES = ("merge a rank-16 'all' LoRA into the bf16 model", "merge it into the fp8 model")


def encoders(text):
    return [text.clip_l, text.clip_g, text.t5]


def pipeline_models(pipe):
    return [pipe.mmdit, pipe.vae, *encoders(pipe.text)]


def status() -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon")}


def weight_bytes(modules) -> int:
    tensors = {t.data_ptr(): t for m in modules for t in [*m.parameters(), *m.buffers()]}
    return sum(t.nbytes for t in tensors.values())


def read_all(modules):
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            t.view(torch.uint8).sum()


def measure(case: str, root: Path) -> dict:
    """One case in this (fresh) process; a LoRA case measures the merge into a model loaded and read first."""
    import transformers                            # the loaders' lazy imports, before the baseline
    transformers.T5EncoderModel, transformers.CLIPTextModelWithProjection, transformers.AutoTokenizer
    if case in LORA_CASES:
        model = sd.load_mmdit(root / "mmdit_bf16.safetensors", dtype=BF16, fp8=case == LORA_CASES[1])
        read_all([model])
    open("/proc/self/clear_refs", "w").write("5")                       # resets VmHWM to the current RSS
    before, peak_anon, done = status(), [0], threading.Event()

    def sample():
        while not done.wait(0.0005):
            peak_anon[0] = max(peak_anon[0], status()["RssAnon"])
    sampler = threading.Thread(target=sample)
    sampler.start()
    if case in LORA_CASES:
        sd.load_lora(model, root / "lora.safetensors")
        modules = [model]
    else:
        modules = CASES[case](root)
    done.set()
    sampler.join()
    end, size = status(), weight_bytes(modules)
    read_all(modules)
    return dict(model_gib=size / 2**30, rss=(end["VmHWM"] - before["VmRSS"]) / size,
                anon=(max(peak_anon[0], end["RssAnon"]) - before["RssAnon"]) / size,
                after=(status()["VmRSS"] - before["VmRSS"]) / size)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--t5-layers", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (deleted after)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args.case, Path(args.dir))))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        write_checkpoints(Path(tmp), args.blocks, args.t5_layers)
        print("| case | model GiB | peak RSS | peak anon | RSS after reading all |")
        print("| --- | --- | --- | --- | --- |")
        for case in [*CASES, *LORA_CASES]:
            run = subprocess.run([sys.executable, __file__, "--case", case, "--dir", tmp],
                                 capture_output=True, text=True, check=True)
            r = json.loads(run.stdout.splitlines()[-1])
            ratios = " | ".join(f"{r[k]:.2f}x" for k in ("rss", "anon", "after"))
            print(f"| {case} | {r['model_gib']:.2f} | {ratios} |", flush=True)


if __name__ == "__main__":
    main()
