"""
One plain training loop for every model in this repository.

  python train.py                                               # vqvae on the embedded `shapes` data, CPU or GPU
  python train.py --model vqvae --dataset mnist --data_dir data/mnist --codebook_size 1024
  torchrun --nproc_per_node=8 train.py --model pqvae --dataset celeba --data_dir data/celeba
  python train.py --resume --out_dir out/vqvae_shapes --max_iters 4000   # continue that run, longer

Settings are the fields of TrainConfig below and of the chosen model's Config, given as `--key value` or
`--key=value` (a bare `--flag` sets a bool to true). Each value is resolved in this order, later winning:
  the dataclass default  <  data.DATASETS (image_size, in_channels)  <  the model's PRESETS[dataset]  <  command line
The resolved config is printed and saved in every checkpoint.

train.py knows no model by name: it imports <model>.py and uses its Config, Model and optional PRESETS and hooks
(set_step, aux_module / aux_loss, inherited_settings). That protocol, with who calls each part and when, is written
once: the table under "Adding a model" in README.md.

Checkpoints (<out_dir>/ckpt.pt: model, optimizers, grad scalers, step, config, RNG state) are written to a temporary
file and renamed, before any validation: a crash or a kill never leaves a broken one. A resumed run continues the
same data order and equals an uninterrupted one; it keeps the run's model and dataset, refuses non-finite weights and
drops the log entries past the checkpoint's step; a new run will not replace a checkpoint without --overwrite. A
non-finite loss or gradient, or a failed write (a full disk), stops the run with a message and leaves the last good
checkpoint untouched. SIGINT or SIGTERM finish the step, save and exit with status 128 + the signal's number (130 or
143: a scheduler sees a preempted job); a second Ctrl-C quits at once.
"""

import contextlib
import dataclasses
import difflib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import eval as evaluation
from train_utils import (NonFiniteLoss, StopRequest, Unreadable, agree, amp_dtype, average_gradients, batches,
                         claim_out_dir, convert, cpu_threads, field_types, make_loaders, parse_argv, save_checkpoint,
                         setup_device, summed, trim_log, wrap_ddp)


@dataclass
class TrainConfig:
    model: str = "vqvae"  # a <model>.py next to this file
    dataset: str = "shapes"  # one of data.DATASETS
    data_dir: str = ""  # where the dataset lives (not needed for shapes)
    download: bool = False  # fetch mnist / fashion_mnist / cifar10 into data_dir first
    out_dir: str = ""  # default: out/<model>_<dataset>
    resume: bool = False  # continue from <out_dir>/ckpt.pt
    overwrite: bool = False  # start afresh even where <out_dir> holds a checkpoint (it is replaced)
    # optimisation
    batch_size: int = 64  # per rank and per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    max_iters: int = 2000  # optimizer steps
    lr: float = 3e-4
    lr_schedule: str = "cosine"  # "cosine" (after warm-up, down to lr * min_lr_ratio) | "exp" | "constant"
    warmup_iters: int = 0  # linear warm-up steps
    min_lr_ratio: float = 0.1
    lr_decay_iters: int = 25000  # "exp": lr * exp(-step / lr_decay_iters) (PQ-VAE)
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    # system
    device: str = "auto"  # "auto" (cuda when present), "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"  # "auto" (bfloat16 on a GPU that has it, else float32) | "float32" | "bfloat16" | "float16"
    compile: bool = False  # torch.compile the model
    num_workers: int = 0  # DataLoader workers per rank
    threads: int = 0  # CPU threads; 0: OMP_NUM_THREADS when set, else the usable cores less one (see cpu_threads)
    seed: int = 0
    # logging, validation, checkpoints
    log_interval: int = 50  # steps between log lines (and the non-finite-loss check)
    eval_interval: int = 500  # steps between validations (and reconstruction grids)
    eval_batches: int = 20  # validation batches
    ckpt_interval: int = 500  # steps between checkpoints


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    tcfg, mcfg, module, ckpt = resolve_config(argv)
    device, rank, world = setup_device(tcfg)
    torch.set_num_threads(cpu_threads(tcfg))
    master = rank == 0
    ckpt_path = os.path.join(tcfg.out_dir, "ckpt.pt")

    if ckpt is None and os.path.exists(ckpt_path) and not tcfg.overwrite:
        raise SystemExit(f"train.py: {ckpt_path} exists: pass --resume to continue that run, --overwrite to replace "
                         f"it, or another --out_dir")
    lock = claim_out_dir(tcfg.out_dir) if master else None  # before any work: a run that cannot save stops now
    if master and ckpt and tcfg.lr_schedule == "cosine" and tcfg.max_iters != ckpt["train_config"]["max_iters"]:
        before = lr_at(ckpt["step"], TrainConfig(**ckpt["train_config"]))
        print(f"note: the cosine schedule now spans {tcfg.max_iters} steps instead of "
              f"{ckpt['train_config']['max_iters']}: the lr moves from {before:.3g} to {lr_at(ckpt['step'], tcfg):.3g}")

    torch.manual_seed(tcfg.seed)  # the same on every rank: identical initial weights
    try:
        model = module.Model(mcfg).to(device)
    except ValueError as err:  # a setting the model cannot take, e.g. an image size its downsampling does not divide
        raise SystemExit(f"train.py: {tcfg.model}: {err}") from None
    raw_model = model  # the unwrapped model: hooks, checkpoints, validation
    aux = raw_model.aux_module() if hasattr(raw_model, "aux_module") else None
    aux_ids = {id(p) for p in aux.parameters()} if aux is not None else set()
    main_params = [p for p in raw_model.parameters() if p.requires_grad and id(p) not in aux_ids]

    dtype = amp_dtype(tcfg, device)
    if master and dtype == torch.float16 and device.type == "cpu":
        print("warning: --dtype float16 on a CPU is many times slower than float32 (CPUs lack fast float16 kernels); "
              "use float32, or bfloat16 on a CPU that has it")
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    adam = dict(lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), weight_decay=tcfg.weight_decay)
    optimizers = [torch.optim.AdamW(main_params, **adam)]
    if aux is not None:
        optimizers.append(torch.optim.AdamW(aux.parameters(), **adam))
    scalers = [torch.amp.GradScaler(device.type, enabled=dtype == torch.float16) for _ in optimizers]

    step = 0
    if ckpt is not None:
        evaluation.load_weights(raw_model, ckpt["model"], f"train.py: --resume: {ckpt_path}")
        for opt, state in zip(optimizers, ckpt["optimizers"]):
            opt.load_state_dict(state)
        for scaler, state in zip(scalers, ckpt["scalers"]):
            scaler.load_state_dict(state)
        step = ckpt["step"]
        if master and step >= tcfg.max_iters:
            print(f"train.py: the checkpoint is at step {step}, at or past --max_iters {tcfg.max_iters}: nothing to "
                  f"train (pass a larger --max_iters to continue)")
    # Each rank draws its own noise (dropout, Gumbel); rank 0 continues its saved stream after a resume.
    if ckpt is not None and master:
        torch.set_rng_state(ckpt["rng"]["cpu"].cpu())
        if device.type == "cuda" and len(ckpt["rng"]["cuda"]):
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
    else:  # a stream per rank, and a fresh one after a resume (7919, a prime, keeps seed + rank + 7919 step distinct)
        torch.manual_seed(tcfg.seed + rank + 7919 * step)

    if world > 1:
        model = wrap_ddp(model, aux_ids, device)
    if tcfg.compile:  # after DDP, as PyTorch recommends (so that wrap_ddp sees the model's own parameter names)
        model = torch.compile(model)

    train_loader, val_loader, sampler = make_loaders(tcfg, mcfg, device, rank, world)
    unreadable = Unreadable(images=ckpt.get("unreadable_images", 0) if ckpt is not None and master else 0)
    stream = batches(train_loader, sampler, tcfg.batch_size, step * tcfg.grad_accum, unreadable,
                     (mcfg.in_channels, mcfg.image_size, mcfg.image_size))

    config = {"train": dataclasses.asdict(tcfg), "model": dataclasses.asdict(mcfg)}
    if master:
        frozen = sum(p.numel() for p in raw_model.parameters() if not p.requires_grad)
        print(f"{tcfg.model} on {tcfg.dataset}: {sum(p.numel() for p in raw_model.parameters()) - frozen:,} "
              f"parameters" + (f" (and {frozen:,} frozen)" if frozen else "") + ", "
              f"{device}, {world} rank(s), {str(dtype).replace('torch.', '')}, from step {step}")
        print(json.dumps(config, indent=1))
    log_path = os.path.join(tcfg.out_dir, "log.jsonl")
    if master and ckpt is not None:
        trim_log(log_path, step)
    log_file = open(log_path, "a" if ckpt else "w") if master else None

    def log(record):
        if master:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    def checkpoint():
        skipped = summed(unreadable.images, world, device)  # called by every rank alike, like the saves
        if master:
            save_checkpoint({
                "unreadable_images": skipped,
                "model": raw_model.state_dict(),
                "optimizers": [o.state_dict() for o in optimizers],
                "scalers": [s.state_dict() for s in scalers],
                "step": step,
                "train_config": config["train"],
                "model_config": config["model"],
                "rng": {"cpu": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else torch.empty(0)},
            }, ckpt_path)

    def validate():
        try:
            metrics = evaluation.evaluate(raw_model, val_loader, device, autocast, max_batches=tcfg.eval_batches)
        except ValueError as err:  # not one readable image in the validation batches: training goes on
            tqdm.write(f"warning: step {step}: no validation: {err}")
            return
        grid = metrics.pop("_grid")
        if grid is not None:
            evaluation.save_grid(*grid, os.path.join(tcfg.out_dir, f"recon_{step:06d}.png"))
        log({"step": step, "split": "val", **metrics})
        if "psnr" not in metrics:  # a prior: its own measurements
            tqdm.write(f"step {step}: val " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                        if isinstance(v, float)))
            return
        ppl = "  ".join(f"{k} {v:.3g}" for k, v in metrics.items() if k.endswith(("perplexity", "usage")))
        tqdm.write(f"step {step}: val psnr {metrics['psnr']:.2f} dB (mean image {metrics['mean_image_psnr']:.2f})"
                   f"  ssim {metrics['ssim']:.3f}  {ppl}")

    stop, stopped = StopRequest(), False
    bad = torch.zeros((), dtype=torch.bool, device=device)  # a non-finite loss or gradient: checked, not synced
    bar = tqdm(total=tcfg.max_iters, initial=step, disable=not master, dynamic_ncols=True)
    last_stats, t0 = {}, time.time()
    try:
        while step < tcfg.max_iters:
            lr = lr_at(step, tcfg)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = lr
            if hasattr(raw_model, "set_step"):
                raw_model.set_step(step)

            for micro in range(tcfg.grad_accum):
                x = next(stream).to(device, non_blocking=True)
                last = micro == tcfg.grad_accum - 1
                sync = contextlib.nullcontext() if last or world == 1 else model.no_sync()
                with sync:
                    with autocast:
                        x_hat, loss, stats = model(x)
                    scalers[0].scale(loss / tcfg.grad_accum).backward()
                bad |= ~torch.isfinite(loss.detach())
            bad |= step_optimizer(optimizers[0], scalers[0], main_params, tcfg.grad_clip)

            if aux is not None:
                optimizers[1].zero_grad(set_to_none=True)  # drop what the main loss's backward left on the aux part
                with autocast:
                    aux_loss, aux_stats = raw_model.aux_loss(x, x_hat.detach())
                scalers[1].scale(aux_loss).backward()
                if world > 1:
                    average_gradients(aux.parameters(), world)
                bad |= ~torch.isfinite(aux_loss.detach())
                bad |= step_optimizer(optimizers[1], scalers[1], list(aux.parameters()), tcfg.grad_clip)
                stats = {**stats, "aux_loss": aux_loss.detach(), **{f"aux_{k}": v for k, v in aux_stats.items()}}
            step += 1
            bar.update(1)

            done = step == tcfg.max_iters
            stop_now, broken = agree(stop, bad, unreadable, world)
            log_now = step % tcfg.log_interval == 0 or done
            save_now = step % tcfg.ckpt_interval == 0 or done or stop_now
            if (log_now or save_now) and bad:  # the only host sync of the step: at log and checkpoint steps
                raise NonFiniteLoss(f"step {step}: the loss or its gradient is not finite")
            if log_now:
                last_stats = {k: float(v) for k, v in stats.items()}
                record = {"step": step, "split": "train", "loss": float(loss.detach()), "lr": lr,
                          "time": round(time.time() - t0, 2), **last_stats}
                skipped = summed(unreadable.images, world, device)  # every rank's, since the run began
                if skipped:
                    record["skipped_images"] = skipped
                if "recon" in last_stats:  # recon is MSE on [-1, 1]: /4 for [0, 1]
                    record["psnr"] = evaluation.psnr(last_stats["recon"] / 4)
                log(record)
                shown = {"psnr": record.get("psnr"), "ppl": last_stats.get("perplexity"),
                         "bits": last_stats.get("bits_per_code")}
                bar.set_postfix(loss=f"{record['loss']:.4f}",
                                **{k: f"{v:.2f}" for k, v in shown.items() if v is not None})
            if save_now:  # before validating: whatever validation does, the step's work is safe
                checkpoint()
            if master and (step % tcfg.eval_interval == 0 or done):
                validate()
            if broken:  # the checkpoint of this step is saved: say why the run stops
                raise SystemExit(f"train.py: {unreadable.broken or 'a batch on another rank was mostly unreadable'}"
                                 f" (checkpoint of step {step} in {ckpt_path})")
            if stop_now:
                if master:
                    tqdm.write(f"stopped by signal at step {step}; checkpoint saved to {ckpt_path}")
                stopped = True
                break
        if world > 1:  # the ranks end together; waiting here, with the GIL released, gloo's worker threads finish
            dist.barrier()  # letting go of the last collectives (see train_utils.kept)
    except (NonFiniteLoss, OSError) as err:  # OSError: a log line or a picture that cannot be written (a full disk)
        kept = f"the last good checkpoint {ckpt_path} is kept" if os.path.exists(ckpt_path) else "no checkpoint yet"
        if isinstance(err, OSError):
            raise SystemExit(f"train.py: {err.filename or tcfg.out_dir}: {err.strerror or err}; stopping ({kept})") \
                from None
        raise SystemExit(f"train.py: {err}; stopping ({kept}). Try a lower --lr, --grad_clip 1, or --dtype "
                         f"bfloat16/float32 instead of float16.") from None
    finally:
        bar.close()
        stop.restore()
        if log_file:
            log_file.close()
        if lock:
            lock.release()
        if world > 1:
            dist.destroy_process_group()
    if stopped:
        raise SystemExit(128 + (stop.signum or signal.SIGTERM))  # a rank that got no signal stopped with the others
    return last_stats


# ---------------------------------------------------------------------------------------------------------------------
# The pieces main() uses: the config, the learning rate, one optimizer step


def resolve_config(argv):
    """Command line -> (TrainConfig, model Config, model module, checkpoint or None).

    With --resume, the run's saved config takes the place of the defaults and presets: `python train.py --resume
    --out_dir DIR` continues DIR's run as it was, and the command line may change the training settings (more
    steps, another lr) but not the model."""
    args = parse_argv(argv)
    train_types = field_types(TrainConfig)
    early = {k: convert(k, args[k], train_types[k]) for k in ("model", "dataset", "out_dir", "resume") if k in args}
    tcfg = TrainConfig(**early)
    inherited = {}
    if not (tcfg.resume and "out_dir" in early):  # a prior's data and default out_dir are its tokenizer's
        inherited = getattr(evaluation.import_model(tcfg.model), "inherited_settings", lambda args: {})(args)
        tcfg = TrainConfig(**{**{k: v for k, v in inherited.items() if k in train_types}, **early})
    ckpt = None
    if tcfg.resume:
        ckpt_path = os.path.join(tcfg.out_dir or default_out_dir(tcfg), "ckpt.pt")
        ckpt = evaluation.read_checkpoint(ckpt_path, "train.py: --resume")
        for key in ("model", "dataset"):  # a run continues on its own data with its own model
            if early.get(key, ckpt["train_config"][key]) != ckpt["train_config"][key]:
                raise SystemExit(f"train.py: --resume: --{key} {early[key]} differs from the checkpoint's "
                                 f"{ckpt['train_config'][key]}")
        tcfg = TrainConfig(**{**ckpt["train_config"], **early})
    module = evaluation.import_model(tcfg.model)
    if ckpt is not None:
        evaluation.check_config(module, ckpt["model_config"], f"train.py: --resume: {ckpt_path}")
    model_types = field_types(module.Config)
    clash = set(train_types) & set(model_types)
    assert not clash, f"{tcfg.model}.Config reuses train.py setting names: {clash}"

    unknown = set(args) - set(train_types) - set(model_types)
    if unknown:
        key = sorted(unknown)[0]
        hint = difflib.get_close_matches(key, list(train_types) + list(model_types), n=1)
        raise SystemExit(f"train.py: unknown setting --{key}" + (f" (did you mean --{hint[0]}?)" if hint else "")
                         + f"; settings are TrainConfig's and {tcfg.model}.Config's fields")
    if tcfg.dataset not in data.DATASETS:
        raise SystemExit(f"train.py: unknown --dataset {tcfg.dataset!r}; choose from {', '.join(data.DATASETS)}")
    cli = {k: convert(k, v, train_types.get(k) or model_types[k]) for k, v in args.items()}

    if ckpt is not None:
        values = {**ckpt["train_config"], **ckpt["model_config"]}
        for key, value in cli.items():  # the architecture comes from the checkpoint
            if key in model_types and value != values.get(key):
                raise SystemExit(f"train.py: --resume: --{key} {value} differs from the checkpoint's {values.get(key)}")
    else:
        channels, image_size = data.DATASETS[tcfg.dataset]
        values = {k: v for k, v in (("in_channels", channels), ("image_size", image_size)) if k in model_types}
        values.update(inherited)
        preset = getattr(module, "PRESETS", {}).get(tcfg.dataset, {})
        bad = set(preset) - set(train_types) - set(model_types)
        assert not bad, f"{tcfg.model}.PRESETS[{tcfg.dataset!r}] has unknown keys {bad}"
        values.update(preset)
    values.update(cli)
    tcfg = TrainConfig(**{k: v for k, v in values.items() if k in train_types})
    mcfg = module.Config(**{k: v for k, v in values.items() if k in model_types})
    tcfg.out_dir = tcfg.out_dir or default_out_dir(tcfg)
    check(tcfg)
    return tcfg, mcfg, module, ckpt


def default_out_dir(tcfg):
    return os.path.join("out", f"{tcfg.model}_{tcfg.dataset}")


def check(tcfg):
    """Refuse settings that cannot work, before any work is done."""
    rules = [
        (tcfg.lr_schedule in ("cosine", "exp", "constant"), "--lr_schedule must be cosine, exp or constant"),
        (tcfg.dtype in ("auto", "float32", "bfloat16", "float16"), "--dtype must be auto, float32, bfloat16 or float16"),
        (tcfg.batch_size >= 1 and tcfg.grad_accum >= 1, "--batch_size and --grad_accum must be at least 1"),
        (tcfg.max_iters >= 0, "--max_iters must be at least 0"),
        (min(tcfg.log_interval, tcfg.eval_interval, tcfg.ckpt_interval, tcfg.eval_batches) >= 1,
         "--log_interval, --eval_interval, --ckpt_interval and --eval_batches must be at least 1"),
        (0 < tcfg.lr < 3.4e38, "--lr must be positive and finite (in float32)"),
        (0 <= tcfg.min_lr_ratio <= 1, "--min_lr_ratio must be between 0 and 1"),
        (0 <= tcfg.beta1 < 1 and 0 <= tcfg.beta2 < 1, "--beta1 and --beta2 must be in [0, 1)"),
        (0 <= tcfg.weight_decay < math.inf, "--weight_decay must be at least 0 and finite"),
        (0 <= tcfg.grad_clip < math.inf, "--grad_clip must be at least 0 (0: no clipping) and finite"),
        (tcfg.num_workers >= 0, "--num_workers must be at least 0"),
        (tcfg.warmup_iters >= 0 and tcfg.lr_decay_iters >= 1, "--warmup_iters >= 0 and --lr_decay_iters >= 1"),
        (tcfg.data_dir or not tcfg.download, "--download needs --data_dir, the folder to download into"),
        (tcfg.threads >= 0, "--threads must be at least 0 (0: the default)"),
    ]
    for ok, message in rules:
        if not ok:
            raise SystemExit(f"train.py: {message}")


def lr_at(step, tcfg):
    """Learning rate for the optimizer step `step` (0-based)."""
    if step < tcfg.warmup_iters:
        return tcfg.lr * (step + 1) / tcfg.warmup_iters
    if tcfg.lr_schedule == "exp":  # PQ-VAE: lr * exp(-step / 25000)
        return tcfg.lr * math.exp(-step / tcfg.lr_decay_iters)
    if tcfg.lr_schedule == "cosine":
        progress = (step - tcfg.warmup_iters) / max(1, tcfg.max_iters - tcfg.warmup_iters)
        ratio = tcfg.min_lr_ratio + (1 - tcfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return tcfg.lr * ratio
    return tcfg.lr


def step_optimizer(opt, scaler, params, grad_clip):
    """Unscale, clip (grad_clip 0: measure only), step. Returns a bool tensor: the gradient norm is not finite while
    no float16 grad scaler guards the step (the scaler skips such steps by design, so for it they are no error)."""
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return (~torch.isfinite(norm) & (not scaler.is_enabled())).to(norm.device)


if __name__ == "__main__":
    try:
        main()
    except SystemExit as stop:
        if isinstance(stop.code, str) and int(os.environ.get("RANK", "0")) != 0:
            sys.exit(1)  # a refusal every rank reaches alike: rank 0 says it, once
        raise
