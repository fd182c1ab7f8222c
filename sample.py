r"""Generate images with SD3 / SD3.5, optionally with LoRAs.

    python sample.py --model stabilityai/stable-diffusion-3.5-medium --prompt "a red fox in snow"
    python sample.py --model sd3.5_large.safetensors --text-encoders ./sd35-large-diffusers \
        --lora my.safetensors --prompt "a red fox in snow"
    python sample.py --model tiny --prompt "smoke test" --width 64 --height 64    # random tiny model
    python sample.py --lora runs/lora/lora.safetensors --prompt "a red fox"       # on the LoRA's own model

Unset sampling flags take the detected variant's recommended settings (PRESETS in sd35_lora.py); skip-layer
guidance is off unless asked for (--slg), as in diffusers and Stability AI's sd3_infer.py.
"""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
from pathlib import Path

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)    # Ctrl-C while torch imports (seconds): no traceback
import sd35_lora as sd


def positive_int(text: str) -> int:
    if not text.isdecimal() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def finite_float(text: str) -> float:
    value = float(text)                # a ValueError here is reported by argparse as an invalid value
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def home_path(text: str) -> str:
    """A path option's ~ expanded: no shell expands it after `=` (--out=~/x). Its $X the shell has expanded,
    after `=` too: a `$` left was quoted to stay (a file named 'style$V2.safetensors')."""
    return os.path.expanduser(text)


def lora_path(text: str) -> str:
    """A --lora file (its ~ expanded); ComfyUI's and A1111's habit, file:strength, is told what to type
    instead."""
    text = home_path(text)
    path, _, scale = text.rpartition(":")
    number = scale.lstrip("+-").replace(".", "", 1).isdecimal()
    if number and os.path.isfile(path) and not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text!r}: a scale goes apart: --lora {path} --lora-scale {scale}")
    return text


def schedule_shift(text: str) -> float:
    """Refused here, not after the models have loaded (minutes for Large): the range generate() takes."""
    value, (lo, hi) = finite_float(text), sd.SHIFT_RANGE
    if not lo <= value <= hi:
        raise argparse.ArgumentTypeError(f"expected a shift in {lo:g}..{hi:g}, got {text!r}")
    return value


def utf8_text(text: str) -> str:
    """A prompt from bytes that are not UTF-8 (a Latin-1 file or terminal) holds lone surrogates, which the
    tokenizers refuse with a bare TypeError, after the models have loaded (config prompts: sd._coerce)."""
    if sd.LONE_SURROGATE.search(text):
        raise argparse.ArgumentTypeError(f"not UTF-8 text: {text!r:.60} (save the file it came from as "
                                         f"UTF-8, or set the terminal to UTF-8)")
    return text


def block_list(text: str) -> tuple[int, ...]:
    if not all(part.strip().isdecimal() for part in text.split(",")):
        raise argparse.ArgumentTypeError(f"expected joint block numbers such as 7,8,9, got {text!r}")
    return tuple(int(part) for part in text.split(","))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=home_path, help="diffusers folder, official .safetensors, Hugging Face "
                   "repo id, or 'tiny' (default: the model the --lora was trained on, as its file records)")
    p.add_argument("--text-encoders", type=home_path, help="folder of clip_l, clip_g, t5xxl .safetensors or "
                   "diffusers layout (for single-file models without them; without --model: the --lora's)")
    p.add_argument("--vae", type=home_path, help="VAE file or folder (default: the one in --model; without "
                   "--model: the --lora's)")
    p.add_argument("--variant", default="", choices=list(sd.PRESETS), help="default: the detected one")
    p.add_argument("--prompt", action="append", type=utf8_text, help="repeatable: one image each")
    p.add_argument("--negative", default="", type=utf8_text,
                   help="negative prompt (default: empty; used only with CFG)")
    p.add_argument("--steps", type=positive_int)
    p.add_argument("--cfg", type=finite_float,
                   help="classifier-free guidance scale (1 or less = off, as in diffusers)")
    p.add_argument("--shift", type=schedule_shift, help="sigma shift of the schedule (0.001..1000)")
    p.add_argument("--sampler", choices=sd.SAMPLERS)
    p.add_argument("--schedule", choices=sd.SCHEDULES, default="linear")
    p.add_argument("--slg", action="store_true", help="skip-layer guidance at the variant's recommended "
                   "scale and layers (Stability AI's, SD3.5 Medium only; off by default in both references)")
    p.add_argument("--slg-scale", type=finite_float, help="skip-layer guidance scale (default 0 = off)")
    p.add_argument("--slg-layers", type=block_list, help="joint blocks to skip, e.g. 7,8,9")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--batch-size", type=positive_int, default=1, help="prompts encoded and images denoised "
                   "at once (more: faster on a large GPU, more memory; the same images to within 1/255: "
                   "matmuls round differently)")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--t5-length", type=positive_int,
                   help=f"T5 tokens (default: the LoRAs' training length, else {sd.T5_LENGTH}; needed for "
                   "LoRAs trained with different lengths)")
    p.add_argument("--no-t5", action="store_true",
                   help="skip T5 (zeros instead; saves ~10 GB; the default for LoRAs trained without it)")
    p.add_argument("--lora", type=lora_path, action="append", default=[],
                   help="LoRA .safetensors (repeatable)")
    p.add_argument("--lora-scale", type=finite_float, action="append", default=[],
                   help="one per --lora, or one for all")
    p.add_argument("--no-merge", action="store_true", help="keep the LoRA's MMDiT part unmerged (slower; for "
                   "checking; one unmerged LoRA per layer)")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                   help="keep models on the CPU, each visiting the GPU only while it runs (the MMDiT and the "
                   f"VAE together, once every {sd.PROMPTS_AHEAD} prompts, where they fit; default: when all "
                   "models do not fit)")
    p.add_argument("--fp8", action="store_true", help="MMDiT joint-block weights in float8 (half the memory; "
                   "with --compile, fp8 matmuls on NVIDIA GPUs of compute capability >= 8.9)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the MMDiT's joint blocks (a one-off compile before the first step)")
    p.add_argument("--device", default="auto", help="auto (the default: cuda, else mps, else cpu), cpu, "
                   "cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=list(sd.DTYPES), help="default: bf16 on CUDA and MPS (macOS 14+), fp32 "
                   "on the CPU")
    p.add_argument("--out", type=home_path, default="samples", help="output folder (default: samples)")
    args = p.parse_args(sd.read_argv(argv, "['--model', 'tiny', '--prompt', 'a fox']"))
    if not args.prompt:
        p.error("give at least one --prompt")
    if not args.model and not args.lora:
        p.error("give --model (or a --lora trained by sd35_lora.py: it records its model)")
    if args.lora_scale and (not args.lora or len(args.lora_scale) not in (1, len(args.lora))):
        p.error("give one --lora-scale per --lora, or a single one for all (and at least one --lora)")
    if args.slg_layers is not None and args.slg_scale is None and not args.slg:     # else silently no SLG
        p.error("--slg-layers needs --slg-scale S (or --slg for the variant's recommended scale)")
    return args


RECORDED_AS = {"model": "base_model", "text_encoders": "text_encoders", "vae": "vae"}   # flag: metadata key


def trained_settings(paths: list[str], t5_length: int | None = None) -> dict:
    """T5 length and use, and the model (with the text encoders and VAE given apart), as the LoRAs that record
    them were trained (so sampling matches training), each only when all the LoRAs record the same. LoRAs of
    different lengths need --t5-length (`t5_length`, which main() then uses): no one length is right for both.
    T5 is left out only when all were trained without it."""
    found, recorded = {}, {flag: set() for flag in RECORDED_AS}
    for path in paths:
        # what load_lora refuses by the header (names, adapter_config.json): refused before the models load
        info = sd.lora_metadata(sd.read_lora_header(path), path)[0]
        if "t5_length" in info:
            found[path] = (info["t5_length"], info.get("use_t5", True))
        for flag, key in RECORDED_AS.items():   # a hostile file's: not text, with control characters (an
            value = info.get(key)               # escape sequence could hide it where main() prints it), or
            usable = isinstance(value, str) and value.isprintable() and 0 < len(value) <= 4096   # too long
            recorded[flag].add(value if usable else None)
    if len({length for length, _ in found.values()}) > 1 and t5_length is None:
        told = ", ".join(f"{path}: {length}" for path, (length, _) in found.items())
        raise sd.UserError(f"the LoRAs were trained with different T5 lengths ({told}): choose one with "
                           f"--t5-length")
    without = [path for path, (_, use_t5) in found.items() if not use_t5]
    if without and len(without) < len(found):
        print(f"warning: {', '.join(without)} trained without T5, the other LoRAs with it: T5 stays on "
              f"unless --no-t5", file=sys.stderr)
    agreed = {flag: next(iter(values)) for flag, values in recorded.items()
              if len(values) == 1 and None not in values}
    if found:
        agreed.update(t5_length=next(iter(found.values()))[0], use_t5=len(without) < len(found))
    return agreed


def main(argv=None) -> list[Path]:
    args, (rank, world) = parse_args(argv), sd.rank_and_world()
    if sd.under_torchrun():     # each process made every image, with its own bar and "saved to" line
        raise sd.UserError(f"sample.py makes all its images in one process, on one GPU: run it with python, "
                           f"not torchrun or srun, with WORLD_SIZE unset (it is {world}; a job script may "
                           f"export it); --device cuda:N picks the GPU") if rank == 0 else SystemExit(1)
    trained = trained_settings(args.lora, args.t5_length)
    if not args.model:
        if "model" not in trained:                      # a LoRA made elsewhere, or LoRAs of different models
            raise sd.UserError(f"no one model recorded as trained on in {', '.join(args.lora)}: give --model")
        args.model = trained["model"]
        print(f"model: {args.model} (the --lora's, as trained; --model to choose another)")
        for flag in ("text_encoders", "vae"):               # a single-file model's, unless given (tiny: none)
            option = "--" + flag.replace("_", "-")
            if flag in trained and getattr(args, flag) is None and args.model != "tiny":
                setattr(args, flag, trained[flag])
                print(f"{option} {trained[flag]} (the --lora's, as trained; {option} to choose another)")
    if args.model == "tiny" and (args.text_encoders or args.vae):      # else silently unused
        raise sd.UserError(sd.TINY_OWN_PARTS.format("--text-encoders", "--vae"))
    t5_length = args.t5_length or trained.get("t5_length", sd.T5_LENGTH)
    if not trained.get("use_t5", True) and not args.no_t5:
        print("the LoRA was trained without T5: sampling without it too (as --no-t5)")
        args.no_t5 = True
    sd.check_seed(args.seed, len(args.prompt), "--seed")     # before loading models
    sd.check_size(args.width, args.height)              # before loading models (generate checks it late)
    if args.steps and args.steps > sd.MAX_STEPS:        # before loading models (generate checks it late)
        raise sd.UserError(f"--steps must be in 1..{sd.MAX_STEPS}, got {args.steps}")
    if args.compile:
        sd.check_compile(sd.pick_device(args.device), args.fp8)   # before loading models (compiles fail late)
    made = sd.writable_dir(args.out, "--out")           # before loading models: no image may be lost
    sd.remove_killed_writes(Path(args.out))             # a killed sample.py's hidden temporary files
    pipe = None
    try:
        pipe = sd.load_pipeline(args.model, args.text_encoders, args.vae, args.device, args.dtype, t5_length,
                                use_t5=not args.no_t5, variant=args.variant, offload=args.offload,
                                fp8=args.fp8)
        return sample_with(pipe, args, t5_length)
    except BaseException as e:  # a notebook keeps the traceback, and with it the models, to its next error:
        sd.free_models(pipe)                        # the next call ran out of GPU memory
        sd.remove_empty(made)                       # the --out folders made, if no image went there
        if sd.out_of_memory(e):
            where = "while sampling; the images finished are saved" if pipe else "while loading the models"
            raise sd.memory_error(e, where, memory_levers(args, pipe, ram=sd.out_of_ram(e)))
        raise


def memory_levers(args: argparse.Namespace, pipe, ram: bool) -> list[str]:
    """The flags that lower sample.py's GPU memory (ram: RAM's, which --offload raises), of those not given
    yet (pipe: None if it did not load). --offload only on CUDA: MPS shares one memory with the CPU."""
    device = sd.pick_device(args.device)
    offload = device.type == "cuda" and not (pipe.offload if pipe else args.offload) and not ram
    fp8 = not args.fp8 and not sd.fp8_lacking(device)
    bf16 = device.type != "mps" or sd.pick_dtype(None, device) == sd.DTYPES["bf16"]    # MPS: macOS 14+
    sampling = (["lower --batch-size"] * (args.batch_size > 1) + ["lower --width and --height"]
                + ["lower --steps"] * ((args.steps or 0) >= sd.MANY_STEPS))       # GiBs of sigma schedule
    return (sampling * (pipe is not None)
            + ["add --offload"] * offload + ["add --fp8"] * fp8 + ["add --no-t5"] * (not args.no_t5)
            + ["use --dtype bf16"] * (args.dtype == "fp32" and bf16))


def sample_with(pipe: sd.Pipeline, args: argparse.Namespace, t5_length: int) -> list[Path]:
    """main() once the models have loaded: the LoRAs, then the images, each saved as soon as it is done."""
    sd.check_image_fits(pipe.mmdit, args.height, args.width, "lower --width and --height")  # ahead of LoRAs
    used = next(pipe.vae.parameters()).dtype            # the PNG records the dtype used (the default's
    args.dtype = next(name for name, dtype in sd.DTYPES.items() if dtype == used)     # depends on the device)
    if len(args.lora_scale) < 2:                        # one scale (none: 1.0) for all the LoRAs; the PNG
        args.lora_scale = (args.lora_scale or [1.0]) * len(args.lora)     # records each one's, not the flags
    for path, scale in zip(args.lora, args.lora_scale):
        n = sd.load_lora(pipe.mmdit, path, scale, merge=not args.no_merge, text=pipe.text)
        print(f"loaded {path} on {sd.counted(n, 'layer')} (scale {scale})")
    if args.compile:
        pipe.mmdit.compile_blocks()
    slg_scale = 0.0 if args.slg_scale is None and not args.slg else args.slg_scale     # None: the preset's
    settings = sd.SampleSettings(args.steps, args.cfg, args.shift, args.sampler, args.schedule, slg_scale,
                                 args.slg_layers, args.width, args.height, args.seed)
    settings = settings.resolved(pipe.variant, pipe.mmdit.cfg.depth)    # as it runs: the PNG records it
    earlier, paths = len(taken_numbers(Path(args.out))), []

    def keep(images):                                   # each batch is saved when done: a Ctrl-C keeps them
        save_images(images, args, settings, pipe.variant, t5_length, paths)
    try:
        sd.generate(pipe, args.prompt, args.negative, settings, batch_size=args.batch_size, keep=keep)
    finally:
        kept = " (the earlier samples there are kept)" if earlier else ""
        if paths:
            print(f"saved to {Path(args.out)}: {', '.join(p.name for p in paths)}{kept}")
    return paths


def taken_numbers(out: Path) -> list[int]:
    return [int(p.stem[7:]) for p in out.glob("sample_*.png") if p.stem[7:].isdecimal()]


def save_images(images, args, settings, variant: str, t5_length: int, paths: list[Path]):
    """The images of args.prompt[len(paths):] as the next free sample_NN.png of --out (the parameters in
    each), added to `paths` one by one."""
    from PIL.PngImagePlugin import PngInfo
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    number = max(taken_numbers(out), default=-1) + 1    # never overwrite earlier samples: number on
    for i, (image, prompt) in enumerate(zip(images, args.prompt[len(paths):]), len(paths)):
        # t5_length matters without T5 too: the context then holds that many zero tokens
        params = {"prompt": prompt, "negative": args.negative, "model": args.model, "variant": variant,
                  "seed": settings.seed + i, "t5_length": t5_length, "use_t5": not args.no_t5,
                  **{flag: getattr(args, flag) for flag in ("lora", "lora_scale", "fp8", "no_merge", "dtype",
                                                            "text_encoders", "vae")},       # all change it
                  **{k: v for k, v in vars(settings).items() if k != "seed"}}
        info = PngInfo()
        info.add_text("parameters", json.dumps(params))
        # hidden until complete; named as _atomic_save's temporary files: a kill's is removed by the next run
        written = out / f".sample.png.{os.getpid()}-{os.urandom(4).hex()}.tmp"
        try:
            with open(written, "xb") as file:               # complete and on the disk before it is named
                image.save(file, format="PNG", pnginfo=info)
                file.flush()
                os.fsync(file.fileno())
            path, number = publish(written, out, number)
        except OSError as e:                            # the write's, or publish's (or its fallback's)
            fix = "free disk space or " if sd.out_of_space(e) else ""
            raise sd.UserError(f"cannot save image {i + 1} in {out} ({e.strerror or e}): {fix}choose "
                               f"another --out") from None
        finally:                                        # full disk, Ctrl-C, or published: none left behind
            with contextlib.suppress(OSError):
                written.unlink()
        paths.append(path)
        number += 1


def publish(written: Path, out: Path, number: int) -> tuple[Path, int]:
    """The complete image `written` as the first free sample_NN.png from `number` on, hard-linked: a killed
    sample.py (kill -9, the OOM killer) leaves no empty or partial sample_NN.png."""
    try:
        return first_free(out, number, lambda path: os.link(written, path))
    except OSError:             # no hard links here (FAT, some network shares): the name taken empty first
        created = os.O_CREAT | os.O_EXCL | os.O_WRONLY          # (only a kill now leaves it empty)
        path, number = first_free(out, number, lambda path: os.close(os.open(path, created)))
        try:
            sd._replace_file(written, path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path, number


def first_free(out: Path, number: int, make) -> tuple[Path, int]:
    """The first sample_NN.png from `number` on that make(path) creates (FileExistsError where it is taken, as
    a hard link or O_EXCL refuse it): another sample.py writing into the same --out at the same time takes
    the next number instead of overwriting this one."""
    while True:
        path = out / f"sample_{number:02d}.png"
        try:
            make(path)
            return path, number
        except FileExistsError:
            number += 1


if __name__ == "__main__":
    # Ctrl-C as usual again, pythonw's missing streams, a log's line order; and SIGTERM (what `timeout` and
    # schedulers send) as Ctrl-C: else the process died at once, without its "saved to" line, leaving the
    # image being written as a hidden file. Both are handed back as the process exits (no traceback then).
    with sd.cli_console():
        inherited = sd.handle_signals(sd.terminate, (signal.SIGTERM,))
        try:
            try:
                main()
            finally:            # a SIGTERM as they are put back (main() done) is handled below too
                sd.restore_signals(inherited)       # the default, or ignored as the parent set it
        except (sd.UserError, sd.torch.OutOfMemoryError) as e:     # main() words running out of memory
            sys.exit(f"error: {e}")
        except KeyboardInterrupt as e:
            stopped = ": images already written stay in --out"
            sd.exit_stopped(isinstance(e, sd.Terminated), stopped, sys.stderr)
        except BrokenPipeError:     # the reader of stdout gone (`| head`)
            sd.exit_output_gone()
