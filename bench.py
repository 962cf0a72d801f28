"""
Benchmarks that print numbers: the quantizer's forward+backward time and peak extra memory at given (N, K, D), next
to vector-quantize-pytorch's at matched settings when that package is installed, and its nearest-code search next to
faiss's exact search (IndexFlatL2, CPU) when faiss-cpu is installed; a model's training throughput in
images/s and the share of its step spent in the quantizer; the data loader's throughput. On the current device.

  python bench.py                                        # default quantizer sizes, then vqvae training throughput
  python bench.py --quantizer 65536,65536,8              # one quantizer size: N vectors, K codes, D dims (repeatable)
  python bench.py --train_only --model vqvae --dataset celeba --batch_size 128 --dtype bfloat16 [--compile]
  python bench.py --train_only --model vqvae2 --dataset mnist --matched   # vqvae2 and its capacity-matched vqvae
  python bench.py --train_only --model prior --tokenizer out/pqvae_mnist/ckpt.pt  # a prior, and its tokenizer's share
  python bench.py --loading 0,2,4 --dataset celeba --data_dir DIR        # images/s of the loader, per worker count
  python bench.py --gpu_check --steps 10    # a CUDA machine: every model, bf16/fp16, eager/compiled, torchrun

Every flag that is not bench.py's own is a train.py setting (model, dataset, any Config field), resolved as train.py
resolves it. Training throughput uses random batches of the dataset's shape: it measures the model, not data loading,
which --loading measures on its own; loading keeps up when its images/s exceed the training step's.
Peak extra memory is the peak above what was allocated before the step: on CUDA from the caching allocator's
counters, on CPU from the process's peak resident memory (Linux /proc; the figure includes the allocator's slack).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

import train
import train_utils
import vqvae2
from vqvae import VectorQuantizer

DEFAULT_SIZES = [(16384, 512, 64), (65536, 8192, 8), (65536, 65536, 8), (65536, 4096, 2)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory above the level at entry, in bytes, while the block runs."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:  # resets the peak resident set size (VmHWM)
                f.write("5")
            self.start = self._rss("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.peak = self._rss("VmHWM") - self.start

    @staticmethod
    def _rss(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc/self/status")


def measure(call, device, repeat):
    """Mean seconds and peak extra bytes of `repeat` calls of call() (a forward+backward), after one untimed call
    (which initialises a codebook from the batch and warms up the allocator)."""
    call()
    times, peak = [], 0
    for _ in range(repeat):
        with PeakMemory(device) as mem:
            times.append(timed(call, 1, device))
        peak = max(peak, mem.peak)
    return sum(times) / len(times), peak


def ours(N, K, D, device, init="kmeans"):
    """Our VectorQuantizer at the settings the comparison matches, and a call doing one training forward+backward
    (EMA update and dead-code bookkeeping included) on N random vectors."""
    torch.manual_seed(0)
    vq = VectorQuantizer(K, D, beta=0.25, decay=0.99, init=init, kmeans_iters=10, dead_code_threshold=2).to(device)
    z = torch.randn(N, D, device=device, requires_grad=True)

    def call():
        z_q, _, loss, _ = vq(z)
        (z_q.sum() + loss).backward()
        z.grad = None
    return vq, z, call


def peer(K, D, z, device):
    """vector-quantize-pytorch's VectorQuantize at the same settings (EMA decay, commitment weight, k-means init with
    10 iterations, dead-code threshold 2, the plain straight-through estimator rather than its default rotation
    trick), with the same kind of call, or None when that package is not installed: it is only ever compared with,
    never needed. Its dead-code rule differs in kind: a code is dead when the EMA of its count falls under 2, ours
    when it is used fewer than 2 times in 10 batches."""
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        return None, None
    torch.manual_seed(0)
    vq = VectorQuantize(dim=D, codebook_size=K, decay=0.99, commitment_weight=0.25, kmeans_init=True,
                        kmeans_iters=10, threshold_ema_dead_code=2, rotation_trick=False).to(device)
    z = z.detach()[None].clone().requires_grad_()  # (1, N, D): it takes (batch, sequence, dim)

    def call():
        z_q, _, loss = vq(z)
        (z_q.sum() + loss).backward()
        z.grad = None
    return vq, call


def faiss_search(vq, z, device):
    """faiss's exact search (IndexFlatL2) for the nearest of our codebook's codes to every row of z, with as many
    threads as torch: a call returning the codes, or None when faiss is not installed (a benchmark-only comparator,
    never needed) or the device is not a CPU."""
    try:
        import faiss
    except ImportError:
        return None
    if device.type != "cpu":
        return None
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatL2(vq.dim)
    index.add(vq.codebook.detach().float().numpy())
    queries = z.detach().float().numpy()
    return lambda: torch.from_numpy(index.search(queries, 1)[1][:, 0])


@torch.no_grad()
def same_codes(vq, other, z, rows=4096):
    """The fraction of the first `rows` vectors of z for which the two quantizers, both in eval mode and holding our
    codebook, pick the same code (its eval forward builds a rows x K distance matrix, hence only some rows)."""
    other._codebook.embed.copy_(vq.codebook[None])
    other._codebook.initted.fill_(True)
    vq.eval(), other.eval()
    z = z[:rows].detach()
    return float((vq.nearest(z) == other(z[None])[1][0]).float().mean())


def limit_memory(gib):
    """Cap this process's address space at its current size plus `gib` GiB (Linux), so that a quantizer that needs
    more raises an out-of-memory error here instead of drawing the whole machine into swap or the OOM killer."""
    import resource
    with open("/proc/self/status") as f:
        vm_size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm_size + int(gib * 2 ** 30), resource.RLIM_INFINITY))


def compare_quantizers(sizes, device, repeat):
    """For each size, one table row: our training forward+backward (time, peak extra memory) and, when installed,
    vector-quantize-pytorch's at matched settings; our nearest-code search alone (eval mode) and, on a CPU with
    faiss installed, faiss's exact search over the same codebook and vectors, with the share of vectors where the
    two choose the same code."""
    print(f"{'N':>6} {'K':>6} {'D':>3}  {'ours ms':>8} {'MiB':>5}  {'peer ms':>8} {'MiB':>5} {'x':>5} {'same':>7}  "
          f"{'search ms':>9} {'MiB':>5}  {'faiss ms':>8} {'MiB':>5} {'ours/faiss':>10} {'same':>7}")
    for N, K, D in sizes:
        vq, z, call = ours(N, K, D, device)
        seconds, peak = measure(call, device, repeat)
        line = f"{N:>6} {K:>6} {D:>3}  {seconds * 1e3:>8.1f} {peak / 2 ** 20:>5.0f}"
        other, other_call = peer(K, D, z, device)
        if other is None:
            line += f"  {'(vector-quantize-pytorch not installed)':>38}"
        else:
            try:
                other_seconds, other_peak = measure(other_call, device, repeat)
                line += (f"  {other_seconds * 1e3:>8.1f} {other_peak / 2 ** 20:>5.0f} {other_seconds / seconds:>4.1f}x"
                         f" {same_codes(vq, other, z):>7.2%}")
            except RuntimeError as err:  # CPU: "can't allocate memory"; CUDA: torch.OutOfMemoryError
                line += f"  peer failed: {str(err).splitlines()[0][:30]:<25}"
        vq.eval()
        search_seconds, search_peak = measure(lambda: vq.nearest(z.detach()), device, repeat)
        line += f"  {search_seconds * 1e3:>9.1f} {search_peak / 2 ** 20:>5.0f}"
        search = faiss_search(vq, z, device)
        if search is None:
            line += "  (faiss not installed, or not a CPU)"
        else:
            faiss_seconds, faiss_peak = measure(search, device, repeat)
            agree = float((search() == vq.nearest(z.detach()).cpu()).float().mean())
            line += (f"  {faiss_seconds * 1e3:>8.1f} {faiss_peak / 2 ** 20:>5.0f} "
                     f"{search_seconds / faiss_seconds:>9.1f}x {agree:>7.2%}")
        print(line, flush=True)


def bench_training(argv, steps, device):
    """Images per second of full training steps (forward, backward, optimizer) at train.py's resolved config."""
    tcfg, mcfg, module, _ = train.resolve_config(argv)
    torch.manual_seed(0)
    model = module.Model(mcfg).to(device)
    dtype = train_utils.amp_dtype(tcfg, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step_model = torch.compile(model) if tcfg.compile else model
    x = torch.rand(tcfg.batch_size, mcfg.in_channels, mcfg.image_size, mcfg.image_size, device=device) * 2 - 1

    def one_step():
        with autocast:
            _, loss, _ = step_model(x)
        scaler.scale(loss).backward()
        train.step_optimizer(opt, scaler, params, tcfg.grad_clip)

    for _ in range(3):  # warm-up: data init, compilation, allocator
        one_step()
    if hasattr(model, "tokenizer"):  # a prior: the share of its step spent in the frozen tokenizer's encode
        part, part_call = "the frozen tokenizer", lambda: model.encode(x)
    else:
        part, part_call = "the quantizer", quantizer_replay(model, one_step, autocast)
    seconds, part_seconds = timed_in_turn([one_step, part_call], steps, device)
    share = part_seconds / seconds
    # last: a step that raises mid-way (a synchronisation) leaves the optimizer and scaler unusable for timing
    verdict = sync_check(one_step) if device.type == "cuda" else None
    return tcfg, mcfg, dtype, steps * tcfg.batch_size / seconds, share, part, verdict


def sync_check(one_step):
    """CUDA: one training step with PyTorch's sync debug mode set to "error", so that any host-device
    synchronisation (a .item(), an `if` on a CUDA tensor, a bincount, a nonzero, ...) raises. Returns the verdict."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        one_step()
    except RuntimeError as err:
        return f"synchronises: {str(err).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "no host-device synchronisation"


MODELS = ("vqvae", "mgvq", "vqvae2", "pqvae", "adaptive_vq", "warmup_vqgan")


def gpu_check(steps, device, dataset="celeba", models=MODELS, dtypes=("bfloat16", "float16"), compiles=(False, True),
              extra=(), ranks=None, launch=True):
    """The checks a CUDA machine is for, in one run and one table: for every model at the dataset's preset, images/s
    of training steps in bf16 autocast and in fp16 with the gradient scaler, eager and compiled, with the quantizer's
    share (eager steps) and whether a step synchronises with the host; then (with `launch`) a few steps of every model
    under torchrun on `ranks` processes (default: every GPU; NCCL on GPUs, gloo on a CPU). `extra`: more train.py
    settings."""
    rows = []
    for model in models:
        for dtype in dtypes:
            for compiled in compiles:
                argv = ["--model", model, "--dataset", dataset, "--dtype", dtype, *(["--compile"] if compiled else []),
                        *extra]
                try:
                    _, _, _, rate, share, _, verdict = bench_training(argv, steps, device)
                    rows.append([model, dtype, "yes" if compiled else "no", f"{rate:.0f}",
                                 "" if compiled else f"{share:.0%}", verdict or ""])
                except Exception as err:  # one failing setting must not hide the others' results
                    rows.append([model, dtype, "yes" if compiled else "no", "failed", "",
                                 f"{type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}"])
                print(" | ".join(rows[-1]), flush=True)
    ranks = ranks or max(torch.cuda.device_count(), 1)
    launched = []
    for model in models if launch else ():
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"), "--model", model,
                   "--image_size", "64", "--max_iters", "4", "--eval_interval", "4", "--eval_batches", "1",
                   "--ckpt_interval", "4", "--out_dir", out, *extra]
            try:
                run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                errors = [line for line in run.stderr.splitlines() if "Error" in line] or [""]
                verdict = "ok" if run.returncode == 0 else f"failed ({run.returncode}): {errors[-1].strip()[:100]}"
            except subprocess.TimeoutExpired:
                verdict = "failed: no end within 300 s"
            launched.append([model, f"torchrun, {ranks} rank(s), 4 steps", verdict])
            print(" | ".join(launched[-1]), flush=True)
    print("\n| model | dtype | compiled | images/s | quantizer share | sync check |\n|---|---|---|---:|---:|---|")
    print("\n".join("| " + " | ".join(r) + " |" for r in rows))
    print("\n| model | run | result |\n|---|---|---|")
    print("\n".join("| " + " | ".join(r) + " |" for r in launched))
    return rows, launched


def timed(call, repeat, device):
    """Seconds for `repeat` calls of call(), the device's queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        call()
    sync(device)
    return time.perf_counter() - t0


def timed_in_turn(calls, repeat, device):
    """Seconds for `repeat` calls of each of `calls`, taken in turn (one of each, `repeat` times): a machine whose
    speed drifts during the run slows them alike, so that their ratio stays true."""
    seconds = [0.0] * len(calls)
    for _ in range(repeat):
        for i, call in enumerate(calls):
            seconds[i] += timed(call, 1, device)
    return seconds


def quantizer_replay(model, one_step, autocast):
    """A call that runs forward+backward of the model's quantizers alone (the outermost modules whose class name ends
    in "Quantizer"), on copies of the inputs they received in one training step: timed against the whole step, the
    share of the step spent quantizing."""
    quantizers, inside = [], ()
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Quantizer") and not name.startswith(inside):
            quantizers.append(module)
            inside += (name + ".",)  # its own sub-quantizers, if any, are part of it
    captured = []
    def keep(q, args):
        captured.append((q, [a.detach().clone() if torch.is_tensor(a) else a for a in args]))
    hooks = [q.register_forward_pre_hook(keep) for q in quantizers]
    one_step()
    for hook in hooks:
        hook.remove()

    def replay():
        for q, args in captured:
            args = [a.clone().requires_grad_(a.is_floating_point()) if torch.is_tensor(a) else a for a in args]
            with autocast:
                out = q(*args)
            out = out if isinstance(out, (tuple, list)) else [out]
            sum(t.float().sum() for t in out if torch.is_tensor(t) and t.requires_grad).backward()
    return replay


def bench_loading(argv, batches, workers):
    """Images per second that train.py's training loader delivers (reading, decoding, resizing, batching), for each
    number of DataLoader workers, on the dataset and data_dir of the train.py settings."""
    for n in workers:
        tcfg, mcfg, _, _ = train.resolve_config(argv + ["--num_workers", str(n)])
        loader, _, sampler = train_utils.make_loaders(tcfg, mcfg, torch.device("cpu"), 0, 1)
        stream = train_utils.batches(loader, sampler, tcfg.batch_size, 0, train_utils.Unreadable(),
                                     (mcfg.in_channels, mcfg.image_size, mcfg.image_size))
        next(stream)  # workers started, files opened
        t0 = time.perf_counter()
        for _ in range(batches):
            next(stream)
        rate = batches * tcfg.batch_size / (time.perf_counter() - t0)
        print(f"load {tcfg.dataset} ({mcfg.in_channels}x{mcfg.image_size}x{mcfg.image_size}), batch "
              f"{tcfg.batch_size}, {n} workers: {rate:.0f} images/s", flush=True)


def matched_argv(argv):
    """train.py settings of a vqvae2 run -> those of its capacity-matched vqvae (vqvae2.matched_single_level), with
    the same training settings: later keys win, so the matched model's fields are appended."""
    tcfg, mcfg, _, _ = train.resolve_config(argv)
    if tcfg.model != "vqvae2":
        raise SystemExit("bench.py: --matched needs --model vqvae2")
    match = vqvae2.matched_single_level(mcfg)
    print(match["message"])
    return argv + ["--model", "vqvae", "--batch_size", str(tcfg.batch_size)] + \
        [f"--{k}={v}" for k, v in match["config"].items()]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quantizer", action="append", default=None, metavar="N,K,D", help="quantizer size to time")
    p.add_argument("--repeat", type=int, default=3, help="timed quantizer calls per size")
    p.add_argument("--memory_limit_gib", type=float, default=12, help="CPU: cap on extra memory; 0 for none")
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--quantizer_only", action="store_true")
    p.add_argument("--train_only", action="store_true")
    p.add_argument("--loading", default=None, metavar="W,W,...", help="instead: time train.py's training loader "
                   "on the dataset and data_dir given, with each of these numbers of workers")
    p.add_argument("--batches", type=int, default=50, help="timed batches per loader")
    p.add_argument("--matched", action="store_true", help="with --model vqvae2: also time its capacity-matched vqvae")
    p.add_argument("--gpu_check", action="store_true", help="instead: every model in bf16 and fp16, eager and "
                   "compiled, at the celeba preset, with a sync check, then torchrun on every GPU: one table")
    args, train_argv = p.parse_known_args()
    if min(args.repeat, args.steps, args.batches) < 1:
        p.error("--repeat, --steps and --batches must be at least 1")
    try:
        sizes = [tuple(int(v) for v in s.split(",")) for s in args.quantizer] if args.quantizer else DEFAULT_SIZES
        workers = [int(w) for w in args.loading.split(",")] if args.loading else []
    except ValueError:
        p.error("--quantizer takes N,K,D and --loading W,W,...: integers")
    if any(len(size) != 3 or min(size) < 1 for size in sizes) or any(w < 0 for w in workers):
        p.error("--quantizer takes N,K,D, each at least 1, and --loading numbers of workers, each at least 0")
    tcfg, _, _, _ = train.resolve_config(train_argv)
    device = torch.device(train_utils.device_name(tcfg))
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if args.loading:
        bench_loading(train_argv, args.batches, workers)
        return
    if args.gpu_check:
        gpu_check(args.steps, device, extra=train_argv)
        return

    if not args.train_only:
        if device.type == "cpu" and args.memory_limit_gib > 0:
            limit_memory(args.memory_limit_gib)
        compare_quantizers(sizes, device, args.repeat)
    if not args.quantizer_only:
        rates = []
        for argv in [train_argv] + ([matched_argv(train_argv)] if args.matched else []):
            tcfg, mcfg, dtype, images_per_s, share, part, verdict = bench_training(argv, args.steps, device)
            if verdict:
                print(f"sync check: {verdict}")
            print(f"train {tcfg.model} on {tcfg.dataset}-shaped batches ({mcfg.in_channels}x{mcfg.image_size}x"
                  f"{mcfg.image_size}), batch {tcfg.batch_size}, {str(dtype).replace('torch.', '')}"
                  f"{', compiled' if tcfg.compile else ''}: {images_per_s:.1f} images/s, "
                  f"{share:.1%} of the step in {part}", flush=True)
            rates.append(images_per_s)
        if args.matched:
            print(f"vqvae2 takes {rates[1] / rates[0]:.2f}x the time per image of its matched vqvae")


if __name__ == "__main__":
    main()
