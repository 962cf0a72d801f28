"""
Benchmarks that print numbers: the quantizer's forward+backward time and peak extra memory at given (N, K, D), and a
model's training throughput in images/s, on the current device.

  python bench.py                                        # default quantizer sizes, then vqvae training throughput
  python bench.py --quantizer 65536,65536,8              # one quantizer size: N vectors, K codes, D dims (repeatable)
  python bench.py --train_only --model vqvae --dataset celeba --batch_size 128 --dtype bfloat16 [--compile]
  python bench.py --train_only --model vqvae2 --dataset mnist --matched   # vqvae2 and its capacity-matched vqvae

Every flag that is not bench.py's own is a train.py setting (model, dataset, any Config field), resolved as train.py
resolves it. Training throughput uses random batches of the dataset's shape: it measures the model, not data loading.
Peak extra memory is the peak above what was allocated before the step: on CUDA from the caching allocator's
counters, on CPU from the process's peak resident memory (Linux /proc; the figure includes the allocator's slack).
"""

import argparse
import time

import torch

import train
import vqvae2
from vqvae import VectorQuantizer

DEFAULT_SIZES = [(16384, 512, 64), (65536, 8192, 8), (65536, 65536, 8)]


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


def bench_quantizer(N, K, D, device, repeat):
    """Mean seconds and peak extra bytes of one training-mode forward+backward (EMA update and dead-code bookkeeping
    included), after a first call that initialises the codebook from the batch."""
    torch.manual_seed(0)
    vq = VectorQuantizer(K, D, init="data").to(device)  # "data": a k-means init at K = 65,536 would dominate
    z = torch.randn(N, D, device=device, requires_grad=True)
    vq(z)  # initialisation and warm-up
    times, peak = [], 0
    for _ in range(repeat):
        with PeakMemory(device) as mem:
            sync(device)
            t0 = time.perf_counter()
            z_q, codes, loss, _ = vq(z)
            (z_q.sum() + loss).backward()
            sync(device)
            times.append(time.perf_counter() - t0)
        peak = max(peak, mem.peak)
        z.grad = None
    return sum(times) / len(times), peak


def bench_training(argv, steps, device):
    """Images per second of full training steps (forward, backward, optimizer) at train.py's resolved config."""
    tcfg, mcfg, module, _ = train.resolve_config(argv)
    torch.manual_seed(0)
    model = module.Model(mcfg).to(device)
    dtype = train.amp_dtype(tcfg, device)
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
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    sync(device)
    seconds = time.perf_counter() - t0
    return tcfg, mcfg, dtype, steps * tcfg.batch_size / seconds


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
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--quantizer_only", action="store_true")
    p.add_argument("--train_only", action="store_true")
    p.add_argument("--matched", action="store_true", help="with --model vqvae2: also time its capacity-matched vqvae")
    args, train_argv = p.parse_known_args()
    tcfg, _, _, _ = train.resolve_config(train_argv)
    device = torch.device(train.device_name(tcfg))
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    if not args.train_only:
        sizes = [tuple(int(v) for v in s.split(",")) for s in args.quantizer] if args.quantizer else DEFAULT_SIZES
        print(f"{'N':>8} {'K':>8} {'D':>4}  {'fwd+bwd ms':>10}  {'peak extra MiB':>14}")
        for N, K, D in sizes:
            seconds, peak = bench_quantizer(N, K, D, device, args.repeat)
            print(f"{N:>8} {K:>8} {D:>4}  {seconds * 1e3:>10.1f}  {peak / 2 ** 20:>14.1f}", flush=True)
    if not args.quantizer_only:
        rates = []
        for argv in [train_argv] + ([matched_argv(train_argv)] if args.matched else []):
            tcfg, mcfg, dtype, images_per_s = bench_training(argv, args.steps, device)
            print(f"train {tcfg.model} on {tcfg.dataset}-shaped batches ({mcfg.in_channels}x{mcfg.image_size}x"
                  f"{mcfg.image_size}), batch {tcfg.batch_size}, {str(dtype).replace('torch.', '')}"
                  f"{', compiled' if tcfg.compile else ''}: {images_per_s:.1f} images/s", flush=True)
            rates.append(images_per_s)
        if args.matched:
            print(f"vqvae2 takes {rates[1] / rates[0]:.2f}x the time per image of its matched vqvae")


if __name__ == "__main__":
    main()
