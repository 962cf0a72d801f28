"""
What train.py needs that its loop need not show: the command line, devices and DDP, the data stream, and the
machinery that keeps a run's work safe (atomic checkpoints, the log trimmed on resume, the run lock, signals).
"""

import atexit
import contextlib
import dataclasses
import itertools
import json
import os
import signal
import socket
import tempfile
import typing
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import eval as evaluation


# ---------------------------------------------------------------------------------------------------------------------
# The command line


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


# ---------------------------------------------------------------------------------------------------------------------
# Devices and DDP (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)


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


def wrap_ddp(model, ignored_ids, device):
    """DistributedDataParallel around `model`, leaving out the parameters whose ids are in `ignored_ids` (the aux
    part, which has its own optimizer and gradient averaging, average_gradients). The quantizers keep their buffers
    equal across ranks themselves, so DDP need not sync them at every forward; gradients as views into DDP's buckets
    save a copy."""
    # A 1x1 convolution's first gradient differs from its bucket view only in the strides of size-1 dims: the
    # warning about it is harmless, and after the first step gradients accumulate in the views directly.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    names = [n for n, p in model.named_parameters() if id(p) in ignored_ids]
    # DDP has no public way to leave parameters out of its sync; this private one is what PyTorch's own wrappers use
    DDP._set_params_and_buffers_to_ignore_for_model(model, names)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False,
               gradient_as_bucket_view=True)


def agree(stop, bad, unreadable, world):
    """(stop now, a batch was mostly unreadable). Under DDP every rank must decide alike, or one would wait forever in
    a collective: the stop request, the non-finite flag (set in place) and the broken batch are maxed over the ranks,
    one small all-reduce per step."""
    if world == 1:
        return stop.requested or bool(unreadable.broken), bool(unreadable.broken)
    flags = kept("agree", (3,), bad.device)
    flags[0], flags[2] = float(stop.requested), float(bool(unreadable.broken))
    flags[1] = bad.float()
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad.copy_(flags[1] > 0)
    return bool(flags[0] or flags[2]), bool(flags[2])


def summed(count, world, device):
    """An integer count summed over the ranks (an all-reduce under DDP, so every rank calls it alike)."""
    if world == 1:
        return count
    total = kept("summed", (), device).fill_(float(count))
    dist.all_reduce(total)
    return int(total)


_KEPT = {}


def kept(name, shape, device):
    """A tensor for the collectives above, made once and kept for the run. gloo's worker threads let go of a
    collective's tensors a moment after it completes; a tensor that Python has already dropped then needs the GIL to
    be freed, which an interpreter on its way out no longer gives, and the process aborts at exit."""
    key = (name, str(device))
    if key not in _KEPT:
        _KEPT[key] = torch.zeros(shape, device=device)
    return _KEPT[key]


# ---------------------------------------------------------------------------------------------------------------------
# The data stream: a resumed run sees the batches an uninterrupted one would


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
# Nothing lost: atomic checkpoints, the log, the run lock, signals


class NonFiniteLoss(Exception):
    pass


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
        reason = (err.strerror if isinstance(err, OSError) and err.strerror
                  else f"the write failed, is the disk full? {str(err).strip().splitlines()[0]}")
        raise SystemExit(f"train.py: cannot write {path} ({reason}); {kept}") from None


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


def claim_out_dir(folder):
    """Make `folder`, check that a file can be written there, and take its RunLock: a run that could not save, or
    that would share the folder with a live run, is refused before any work."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise SystemExit(f"train.py: cannot write to --out_dir {folder} ({err.strerror})") from None
    return RunLock(folder)


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
        except (ProcessLookupError, ValueError):  # gone, or a garbled lock: stale either way
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
