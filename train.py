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

Checkpoints (<out_dir>/ckpt.pt) hold the model, optimizer(s), grad scaler(s), step, config and RNG state. They are
written to a temporary file and renamed, so a crash or a kill never leaves a broken one behind, and before any
validation. A resumed run continues with the same data order and equals an uninterrupted one; a new run will not
replace an existing checkpoint without --overwrite; a resume keeps the run's model and dataset, refuses a checkpoint
whose weights are not finite, and drops the log entries past the checkpoint's step. A non-finite loss or gradient
stops the run with a message and leaves the last good checkpoint untouched; so does a failed write (a full disk).
SIGINT or SIGTERM finish the current step, save and exit with status 128 + the signal's number (130 or 143: a
scheduler sees a preempted job); a second Ctrl-C quits at once.
"""

import atexit
import contextlib
import dataclasses
import difflib
import itertools
import json
import math
import os
import signal
import socket
import sys
import tempfile
import time
import typing
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import eval as evaluation


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


class NonFiniteLoss(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------------------
# Command line and configuration


def parse_argv(argv):
    """['--a', '1', '--b=2', '--flag'] -> {'a': '1', 'b': '2', 'flag': None}"""
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise SystemExit(f"train.py: expected --key value or --key=value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            value = argv[i + 1] if has_value else None
            i += has_value
        out[key.replace("-", "_")] = value
        i += 1
    return out


def convert(key, raw, typ):
    """Turn the command-line string `raw` into `typ` (bool, int, float, str, or list[...]), or refuse clearly."""
    if type(None) in typing.get_args(typ):  # Optional[X] or X | None: "none" is None, anything else an X
        (inner,) = set(typing.get_args(typ)) - {type(None)}
        return None if raw is not None and raw.lower() == "none" else convert(key, raw, inner)
    if typ is bool:
        if raw is None:  # a bare --flag
            return True
        if raw.lower() in ("true", "1", "yes", "on"):
            return True
        if raw.lower() in ("false", "0", "no", "off"):
            return False
        raise SystemExit(f"train.py: --{key} expects true or false, got {raw!r}")
    if raw is None:
        raise SystemExit(f"train.py: --{key} needs a value")
    if typing.get_origin(typ) in (list, tuple):  # comma-separated, e.g. --probs 0,0.2,0.3
        (item,) = set(typing.get_args(typ)) - {Ellipsis}
        return typing.get_origin(typ)(convert(key, r, item) for r in raw.split(",") if r.strip())
    try:
        return typ(raw)
    except ValueError:
        raise SystemExit(f"train.py: --{key} expects {typ.__name__}, got {raw!r}") from None


def field_types(cls):
    return typing.get_type_hints(cls)


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
        ckpt = evaluation.read_checkpoint(os.path.join(tcfg.out_dir or default_out_dir(tcfg), "ckpt.pt"))
        for key in ("model", "dataset"):  # a run continues on its own data with its own model
            if early.get(key, ckpt["train_config"][key]) != ckpt["train_config"][key]:
                raise SystemExit(f"train.py: --resume: --{key} {early[key]} differs from the checkpoint's "
                                 f"{ckpt['train_config'][key]}")
        tcfg = TrainConfig(**{**ckpt["train_config"], **early})
    module = evaluation.import_model(tcfg.model)
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
        (0 < tcfg.lr < math.inf, "--lr must be positive and finite"),
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


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(state, path):
    """Write to a temporary file, flush it to disk, then rename over `path`: a crash at any point leaves either the
    old checkpoint or the new one, never a partial file. A write that fails (a full disk) removes the temporary file
    and exits with a message saying what is kept."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        kept = f"the previous checkpoint {path} is kept" if os.path.exists(path) else "no checkpoint is saved"
        reason = (err.strerror if isinstance(err, OSError) and err.strerror else str(err)).strip().splitlines()[0]
        raise SystemExit(f"train.py: cannot write {path} ({reason}); {kept}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Distributed set-up (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)


def device_name(tcfg):
    """--device, with "auto" meaning cuda when present, else cpu."""
    if tcfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return tcfg.device


def setup_device(tcfg):
    """Returns (device, rank, world_size). Starts a process group when launched by torchrun."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    name = device_name(tcfg)
    if ddp and name == "cuda":
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    device = evaluation.checked_device(name, "train.py")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, rank, world


def cpu_threads(tcfg):
    """--threads, else OMP_NUM_THREADS's number, else every usable core but one. A step waits for its slowest thread:
    with a thread on every core, one other busy process slows every step several times over, while a core left free
    absorbs it (RESULTS.md, "Threads on a CPU", has the figures)."""
    if tcfg.threads:
        return tcfg.threads
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


def amp_dtype(tcfg, device):
    if tcfg.dtype == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return getattr(torch, tcfg.dtype)


def average_gradients(params, world):
    """All-reduce and average the gradients of parameters that DDP does not sync (the aux part)."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


# ---------------------------------------------------------------------------------------------------------------------
# Data


class EpochSampler(torch.utils.data.Sampler):
    """This rank's shuffled order of the training set for epoch `epoch` (a DistributedSampler's share under DDP,
    reseeded by epoch), without its first `skip` indices: a resumed run goes on mid-epoch where it stopped, without
    loading the images it skips."""

    def __init__(self, dataset, seed, world, rank):
        self.generator = torch.Generator()
        self.base = (torch.utils.data.DistributedSampler(dataset, world, rank, shuffle=True, seed=seed, drop_last=True)
                     if world > 1 else torch.utils.data.RandomSampler(dataset, generator=self.generator))
        self.seed, self.epoch, self.skip = seed, 0, 0

    def __iter__(self):
        if isinstance(self.base, torch.utils.data.DistributedSampler):
            self.base.set_epoch(self.epoch)
        self.generator.manual_seed(self.seed + self.epoch)
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self):
        return len(self.base) - self.skip


def make_loaders(tcfg, mcfg, device, rank, world):
    """Unreadable images are skipped (named on stderr by the dataset): see batches."""
    shape = dict(image_size=getattr(mcfg, "image_size", None), channels=getattr(mcfg, "in_channels", None),
                 skip_unreadable=True)
    try:
        if tcfg.download:
            data.download(tcfg.dataset, tcfg.data_dir)
        train_set = data.get_dataset(tcfg.dataset, "train", tcfg.data_dir or None, **shape)
        val_set = data.get_dataset(tcfg.dataset, "val", tcfg.data_dir or None, **shape)
    except data.DataError as err:
        raise SystemExit(f"train.py: {err}") from err
    if rank == 0 and getattr(val_set, "note", None):
        print(f"note: {val_set.note}")
    if len(train_set) < tcfg.batch_size * world:
        raise SystemExit(f"train.py: the {tcfg.dataset} train split has {len(train_set)} images, fewer than one "
                         f"batch ({tcfg.batch_size} x {world} ranks)")
    sampler = EpochSampler(train_set, tcfg.seed, world, rank)
    common = dict(batch_size=tcfg.batch_size, num_workers=tcfg.num_workers, pin_memory=device.type == "cuda",
                  persistent_workers=tcfg.num_workers > 0, collate_fn=data.collate_readable)
    # its own generator: each new iterator (at the start, every epoch, after a resume) draws its workers' base seed
    # from it, not from the global RNG, which a resume restores from the checkpoint and must then equal the
    # uninterrupted run's
    train_loader = torch.utils.data.DataLoader(train_set, sampler=sampler, drop_last=True,
                                               generator=torch.Generator().manual_seed(tcfg.seed), **common)
    # its own generator: a validation draws nothing from the global RNG, so it does not change the training run
    val_loader = torch.utils.data.DataLoader(val_set, shuffle=False, generator=torch.Generator(), **common)
    return train_loader, val_loader, sampler


@dataclasses.dataclass
class Unreadable:
    """The unreadable training images this rank has met (see batches), and what broke a batch, if one was."""
    images: int = 0
    broken: str = ""


def batches(loader, sampler, batch_size, start, unreadable, image_shape):
    """Endless stream of batches, from the `start`-th batch of the run on (epochs of len(sampler.base) // batch_size
    batches): a resumed run sees the batches the uninterrupted run would have seen.

    A batch with unreadable images (left out by data.collate_readable) is filled up by repeating its readable ones
    (one with none becomes black images of `image_shape`), so that every batch on every rank keeps its shape and every
    rank takes the step; `unreadable` counts the images left out. When more than half of one batch is unreadable,
    the data is broken rather than a file or two: unreadable.broken says so, and the ranks stop together after this
    step (agree)."""
    per_epoch = len(sampler.base) // batch_size
    sampler.epoch, skip = divmod(start, per_epoch)
    sampler.skip = skip * batch_size
    while True:
        for x in loader:
            missing = batch_size - len(x)
            unreadable.images += missing
            if missing > batch_size // 2:
                unreadable.broken = f"{missing} of the {batch_size} images of one batch are unreadable (named above)"
            if missing:
                x = x[torch.arange(batch_size) % len(x)] if len(x) else torch.zeros(batch_size, *image_shape)
            yield x
        sampler.epoch, sampler.skip = sampler.epoch + 1, 0


# ---------------------------------------------------------------------------------------------------------------------
# Training


class RunLock:
    """<out_dir>/lock names the host and pid of the run using the folder: a second run into it is refused, naming that
    pid, and a lock whose process is gone (a killed run) is taken over. Released when the run ends, or at exit."""

    def __init__(self, folder):
        self.path, self.me = os.path.join(folder, "lock"), f"{socket.gethostname()} {os.getpid()}"
        tmp = f"{self.path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(self.me)
        try:
            while True:
                try:
                    os.link(tmp, self.path)  # creates the lock, with its content, only where there is none
                    break
                except FileExistsError:
                    holder = self.holder()
                    if holder is not None:
                        raise SystemExit(f"train.py: {folder} is in use by the run of pid {holder[1]} on {holder[0]}; "
                                         f"wait for it, or pass another --out_dir (if no such run exists, delete "
                                         f"{self.path})") from None
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path)  # stale: its run was killed
        finally:
            os.remove(tmp)
        atexit.register(self.release)

    def holder(self):
        """(host, pid) of another live run holding the lock, or None when the lock is stale or this process's."""
        try:
            with open(self.path) as f:
                host, pid = f.read().split()
        except (OSError, ValueError):
            return None
        if f"{host} {pid}" == self.me:
            return None
        if host != socket.gethostname():
            return host, pid  # another machine's run: its liveness cannot be checked from here
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return None
        except PermissionError:  # alive, another user's
            pass
        return host, pid

    def release(self):
        with contextlib.suppress(OSError, ValueError):
            with open(self.path) as f:
                mine = f.read() == self.me
            if mine:
                os.remove(self.path)


class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop finishes its step, saves and exits with status 128 + the signal's number
    (130, 143), as a shell reports a job the signal ended: a scheduler sees a preempted job, not a finished one. A
    second SIGINT quits at once."""

    def __init__(self):
        self.signum = None
        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)

    @property
    def requested(self):
        return self.signum is not None

    def handle(self, signum, frame):
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


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
    lock = None
    if master:  # before any work: a run that cannot save is refused now, not at its first checkpoint
        try:
            os.makedirs(tcfg.out_dir, exist_ok=True)
            tempfile.TemporaryFile(dir=tcfg.out_dir).close()
        except OSError as err:
            raise SystemExit(f"train.py: cannot write to --out_dir {tcfg.out_dir} ({err.strerror})") from None
        lock = RunLock(tcfg.out_dir)
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
        raw_model.load_state_dict(ckpt["model"])
        for opt, state in zip(optimizers, ckpt["optimizers"]):
            opt.load_state_dict(state)
        for scaler, state in zip(scalers, ckpt["scalers"]):
            scaler.load_state_dict(state)
        step = ckpt["step"]
    # Each rank draws its own noise (dropout, Gumbel); rank 0 continues its saved stream after a resume.
    if ckpt is not None and master:
        torch.set_rng_state(ckpt["rng"]["cpu"].cpu())
        if device.type == "cuda" and len(ckpt["rng"]["cuda"]):
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
    else:  # a stream per rank, and a fresh one after a resume (7919, a prime, keeps seed + rank + 7919 step distinct)
        torch.manual_seed(tcfg.seed + rank + 7919 * step)

    if world > 1:
        # The quantizers keep their buffers equal across ranks themselves: DDP need not sync them at every forward.
        # Gradients as views into DDP's buckets save a copy, whatever memory layout a convolution gives them.
        # (A 1x1 convolution's first gradient differs from its bucket view only in the strides of size-1 dims: the
        # warning about it is harmless, and after the first step gradients accumulate in the views directly.)
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        names = [n for n, p in raw_model.named_parameters() if id(p) in aux_ids]
        # the aux part has its own optimizer and gradient averaging (average_gradients); DDP has no public way to
        # leave parameters out of its sync, and this private one is what PyTorch's own wrappers use
        DDP._set_params_and_buffers_to_ignore_for_model(model, names)
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False,
                    gradient_as_bucket_view=True)
    if tcfg.compile:  # after DDP, as PyTorch recommends (and so that the parameter names above are the model's)
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
    except NonFiniteLoss as err:
        kept = f"the last good checkpoint {ckpt_path} is kept" if os.path.exists(ckpt_path) else "no checkpoint yet"
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


def trim_log(path, step):
    """Keep the entries of log.jsonl up to `step`, the resumed checkpoint's: a run killed after its last checkpoint
    logged steps that the resumed run does again (and a line cut short by the kill)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def agree(stop, bad, unreadable, world):
    """(stop now, a batch was mostly unreadable). Under DDP every rank must decide alike, or one would wait forever in
    a collective: the stop request, the non-finite flag (set in place) and the broken batch are maxed over the ranks,
    one small all-reduce per step."""
    if world == 1:
        return stop.requested or bool(unreadable.broken), bool(unreadable.broken)
    flags = torch.tensor([float(stop.requested), 0.0, float(bool(unreadable.broken))], device=bad.device)
    flags[1] = bad.float()
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad.copy_(flags[1] > 0)
    return bool(flags[0] or flags[2]), bool(flags[2])


def summed(count, world, device):
    """An integer count summed over the ranks (an all-reduce under DDP, so every rank calls it alike)."""
    if world == 1:
        return count
    total = torch.tensor(float(count), device=device)
    dist.all_reduce(total)
    return int(total)


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
