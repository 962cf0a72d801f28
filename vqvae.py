"""
Single-level VQ-VAE with codebook-collapse mitigation.

Papers: "Neural Discrete Representation Learning", van den Oord et al., 2017 (arXiv:1711.00937); "Is Hierarchical
Quantization Essential for Optimal Reconstruction?", 2026 (arXiv:2601.22244).

The idea. An encoder maps an image to a grid of D-dim vectors z; a decoder reconstructs it from their nearest codes e
in a codebook of K. The straight-through estimator hands the decoder's gradient at z_q to z (the argmin has none); a
commitment loss beta * ||z - sg(e)||^2 keeps the encoder near its codes; each code follows the mean of the vectors
that choose it (EMA). Left alone, most codes are never chosen (collapse); the hierarchy paper's remedies are switches
here: data initialisation, dead-code reset (a code chosen fewer than 2 times in 10 batches moves onto an encoder
output), a small D with a large K. mgvq.py adds groups (MGVQ) to this model.

Where this departs from the papers: the data initialisation is k-means on the first batch (`--init data`: plain
samples); the straight-through value is e + (z - sg(z)), exactly e forward.

Train it:  python train.py --model vqvae [--dataset mnist --data_dir DIR] [--codebook_size 1024 --code_dim 8]
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    # data (train.py fills these from the dataset)
    image_size: int = 32
    in_channels: int = 3
    # encoder / decoder (VQ-VAE: strided convs + residual blocks)
    hidden: int = 128  # channels of the main path; ours, half of VQ-VAE's 256, for a CPU
    res_blocks: int = 2  # residual blocks per side (VQ-VAE)
    res_hidden: int = 32  # channels inside a residual block; ours (VQ-VAE: 256)
    downsample: int = 4  # image side / latent side; a power of 2 (VQ-VAE: 4)
    # quantizer
    codebook_size: int = 512  # K (VQ-VAE: 512)
    code_dim: int = 8  # D (the hierarchy paper's best)
    beta: float = 0.25  # commitment weight (VQ-VAE)
    ema: bool = True  # EMA codebook updates; False learns the codebook by the loss ||sg(z) - e||^2
    decay: float = 0.99  # EMA decay (VQ-VAE)
    eps: float = 1e-5  # Laplace smoothing of the EMA counts
    init: str = "kmeans"  # "kmeans" | "data" (samples of the first batch) | "random" (N(0, 1), the baseline)
    kmeans_iters: int = 10  # Lloyd's iterations of the k-means init; ours
    dead_code_threshold: float = 2.0  # reset codes used fewer times than this per window; 0 disables
    dead_code_window: int = 10  # batches per window (hierarchy paper: 2 uses over 10 batches)


# Per-dataset settings (Config or train.py fields): over the defaults, under the command line.
PRESETS = {
    "shapes": dict(hidden=64, res_hidden=32, codebook_size=256, batch_size=32, lr=2e-3, max_iters=2000,
                   warmup_iters=100, eval_interval=500),
    "mnist": dict(hidden=64, codebook_size=512, batch_size=64, lr=1e-3, max_iters=3000),
    "fashion_mnist": dict(hidden=64, codebook_size=512, batch_size=64, lr=1e-3, max_iters=3000),
    "cifar10": dict(codebook_size=1024, batch_size=128, lr=3e-4, max_iters=50000),
    "celeba": dict(codebook_size=4096, batch_size=128, lr=3e-4, max_iters=100000),
    "lsun_church": dict(codebook_size=4096, downsample=8, batch_size=64, lr=3e-4, max_iters=100000),
    "imagenet": dict(codebook_size=8192, downsample=8, batch_size=64, lr=3e-4, max_iters=300000),
}


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with an EMA codebook (VQ-VAE, appendix A.1), data initialisation and
    dead-code reset (arXiv:2601.22244). Depends on torch only: copy it into your project.

    forward(z (..., D)) -> z_q (..., D), the codes with gradients straight through to z; codes (...); the loss
    beta * ||z - sg(e)||^2 (+ ||sg(z) - e||^2 without EMA); stats. Training then updates the codebook, equal on every
    torch.distributed rank (each must pass as many vectors). float32 in any autocast: bf16 distances pick other codes.
    Twins: vqvae.py's and vqvae2.py's copies are the same text; mgvq.py's with groups = 1 gives the same results bit
    for bit (tests/test_twins.py).
    """

    search_block = 2 ** 22  # distance entries per chunk of the search (16 MiB)

    def __init__(self, codebook_size, dim, beta=0.25, ema=True, decay=0.99, eps=1e-5, init="kmeans",
                 kmeans_iters=10, dead_code_threshold=2.0, dead_code_window=10):
        super().__init__()
        if init not in ("kmeans", "data", "random"):
            raise ValueError(f"init must be 'kmeans', 'data' or 'random', got {init!r}")
        if not 0 <= decay <= 1:  # an EMA weight (1: it never moves); outside [0, 1] it diverges
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.ema, self.decay, self.eps = ema, decay, eps
        self.init, self.kmeans_iters = init, kmeans_iters
        self.dead_code_threshold, self.dead_code_window = dead_code_threshold, dead_code_window

        codebook = torch.randn(codebook_size, dim)  # replaced from data on the first batch unless init="random"
        if ema:  # moved by EMA, not by the optimizer
            self.register_buffer("codebook", codebook)
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("ema_count", torch.ones(codebook_size))  # N_k, EMA of assignment counts
        self.register_buffer("ema_sum", codebook.clone())  # m_k, EMA of the sums of assigned vectors
        self.register_buffer("usage", torch.zeros(codebook_size))  # assignments in this dead-code window
        self.register_buffer("window_step", torch.zeros((), dtype=torch.long))  # batches seen in the window
        self.register_buffer("initialized", torch.tensor(init == "random"))
        # host copies of the last two, read once after construction or loading: a step then reads nothing from a GPU
        self._host_initialized = self._host_window_step = None

    # -- the VQ-VAE core: nearest code, straight-through, loss

    def forward(self, z):
        shape = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):  # the fp32 island
            z = z.float().reshape(-1, self.dim)  # (N, D)
            if self.training and self._host_initialized is None:  # once after construction or loading
                self._host_initialized, self._host_window_step = bool(self.initialized), int(self.window_step)
            if self.training and not self._host_initialized:
                self._init_codebook(z.detach())
            codes = self.nearest(z)  # (N,)
            e = self.codebook[codes]  # (N, D); indexing, not a one-hot matmul

            # beta moves the encoder toward its code; the codebook moves by EMA, or by its own loss without EMA
            commit = F.mse_loss(z, e.detach())
            loss = self.beta * commit
            if not self.ema:
                loss = loss + F.mse_loss(e, z.detach())
            # straight-through: exactly e forward (z + sg(e - z) is e up to rounding); the gradient to z, none to e
            z_q = e.detach() + (z - z.detach())

            counts = self._counts(codes)  # (K,) this rank's batch
            if self.training:  # quantize and compute losses first, then update the codebook
                self._update(z.detach(), codes, counts)
        p = counts / counts.sum()
        stats = {"commit": commit.detach(),
                 "perplexity": torch.exp(-(p * torch.log(p + 1e-10)).sum()),  # of this batch only
                 "code_usage": (counts > 0).float().mean()}
        return z_q.reshape(shape), codes.reshape(shape[:-1]), loss, stats

    def nearest(self, z, codebook=None):
        """Index of the nearest code for each row of z (N, D), ties to the lowest; chunked over rows so that the
        distances hold at most search_block entries."""
        e = self.codebook if codebook is None else codebook
        e = e.detach().float()
        e_sq = (e * e).sum(1)  # (K,)
        chunk = min(z.shape[0], max(1, self.search_block // e.shape[0]))  # rows per chunk
        codes = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
        d = torch.empty(chunk, e.shape[0], device=z.device)  # one buffer for all chunks
        for i in range(0, z.shape[0], chunk):
            zc = z[i:i + chunk].detach().float()
            dc = d[:zc.shape[0]]
            # ||z||^2 is the same for every code and does not change the argmin: d = ||e||^2 - 2 z.e
            torch.addmm(e_sq, zc, e.t(), alpha=-2.0, out=dc)  # (chunk, K)
            codes[i:i + chunk] = self._argmin(dc)
        return codes

    @staticmethod
    @torch.compiler.disable  # under --compile, torch 2.13's inductor fails on it: it runs eagerly, as it is
    def _argmin(d, block=64):
        """argmin over the last dim of d (..., K), exact, ties to the lowest index: the minimum of each block of `block`
        codes, then the argmin inside the first block holding the row's minimum (on a CPU faster than one argmin over
        K, whose reduction carries an index along). Twin: every quantizer file has this copy, kept equal by
        tests/test_search.py."""
        B = min(block, d.shape[-1] & -d.shape[-1])  # the largest power of 2 that divides K, at most `block`
        if B < 8:  # blocks this short would not pay
            return d.argmin(-1)
        blocks = d.unflatten(-1, (-1, B))  # (..., K/B, B)
        best = blocks.amin(-1).argmin(-1, keepdim=True)  # (..., 1) the first block holding the minimum
        inside = blocks.gather(-2, best[..., None].expand(*best.shape, B)).squeeze(-2)  # (..., B) that block
        return best.squeeze(-1) * B + inside.argmin(-1)

    def lookup(self, codes):
        """codes (...) -> code vectors (..., D)."""
        return self.codebook[codes]

    # -- fitting the codebook to data: EMA, dead-code reset, k-means init (training only)

    @torch.no_grad()
    def _update(self, z, codes, counts):
        counts = self._all_reduce(counts.clone())  # (K,) over all ranks
        if self.ema:
            sums = torch.zeros_like(self.ema_sum).index_add_(0, codes, z)  # (K, D)
            self._all_reduce(sums)
            self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            # Laplace smoothing: an unused code's count stays above zero
            n = self.ema_count.sum()
            count = (self.ema_count + self.eps) / (n + self.codebook_size * self.eps) * n
            self.codebook.copy_(self.ema_sum / count[:, None])
        if self.dead_code_threshold > 0:
            self.usage.add_(counts)
            self.window_step.add_(1)
            self._host_window_step += 1
            if self._host_window_step >= self.dead_code_window:
                self._reset_dead_codes(z)

    @torch.no_grad()
    def _reset_dead_codes(self, z):
        """Move each code used fewer than dead_code_threshold times in the window onto a random encoder output of the
        batch (of any rank, drawn on rank 0); reset its EMA count and sum, or the next EMA step drags it back."""
        dead = self.usage < self.dead_code_threshold  # (K,), equal on all ranks: usage is all-reduced
        z = self._gather(z)  # (world * N, D)
        # K candidates, used where a code is dead: no data-dependent branch, the same collectives every time
        candidates = z[torch.randint(0, z.shape[0], (self.codebook_size,), device=z.device)]  # (K, D)
        self._broadcast(candidates)
        self.codebook.copy_(torch.where(dead[:, None], candidates, self.codebook))
        self.ema_sum.copy_(torch.where(dead[:, None], candidates, self.ema_sum))
        self.ema_count.masked_fill_(dead, 1.0)
        self.usage.zero_()
        self.window_step.zero_()
        self._host_window_step = 0

    @torch.no_grad()
    def _init_codebook(self, z):
        """The codebook from the first batch: k-means on (or a sample of) every rank's encoder outputs, rank 0's
        result broadcast."""
        z = self._gather(z)  # (world * N, D)
        idx = torch.randperm(z.shape[0], device=z.device)[:self.codebook_size]
        if idx.numel() < self.codebook_size:  # fewer vectors than codes: sample with replacement
            idx = torch.randint(0, z.shape[0], (self.codebook_size,), device=z.device)
        codebook = z[idx].clone()  # (K, D)
        if self.init == "kmeans":  # Lloyd's iterations
            for _ in range(self.kmeans_iters):
                codes = self.nearest(z, codebook)
                counts = self._counts(codes)
                sums = torch.zeros_like(codebook).index_add_(0, codes, z)
                # an empty cluster keeps its previous centre
                codebook = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], codebook)
        self._broadcast(codebook)
        self.codebook.copy_(codebook)
        self.ema_sum.copy_(codebook)  # with ema_count = 1: the EMA starts at the new codebook
        self.ema_count.fill_(1.0)
        self.initialized.fill_(True)
        self._host_initialized = True

    # -- machinery: counts, collectives, host copies

    def _counts(self, codes):
        """Assignments per code, (K,): an index_add_ of ones, exact in float32 (to 2^24 per code) in any order
        (torch.bincount would read the largest index back to the host)."""
        ones = torch.ones(codes.shape[0], device=codes.device)
        return torch.zeros(self.codebook_size, device=codes.device).index_add_(0, codes, ones)

    # Collectives, no-ops without a process group.
    @staticmethod
    def _all_reduce(t):  # sum over ranks, in place
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        return t

    @staticmethod
    def _broadcast(t):  # rank 0's value everywhere, in place
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(t, src=0)
        return t

    @staticmethod
    def _gather(z):  # (N, D) per rank -> (world * N, D) on every rank; N equal on all ranks
        if not (dist.is_available() and dist.is_initialized()):
            return z
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        return torch.cat(parts)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_initialized = self._host_window_step = None  # the loaded buffers hold the truth now


# Encoder and decoder (VQ-VAE, section 4.1: strided convolutions and residual blocks)

class ResBlock(nn.Module):
    def __init__(self, channels, hidden):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(), nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x):
        return x + self.block(x)


class Encoder(nn.Module):
    """(B, C, H, W) -> (B, hidden, H/downsample, W/downsample)"""

    def __init__(self, cfg):
        super().__init__()
        steps = int(math.log2(cfg.downsample))
        layers, ch = [], cfg.in_channels
        for i in range(steps):  # each stride-2 conv halves the side
            out = cfg.hidden if i == steps - 1 else cfg.hidden // 2
            layers += [nn.Conv2d(ch, out, 4, stride=2, padding=1), nn.ReLU()]
            ch = out
        layers += [nn.Conv2d(ch, cfg.hidden, 3, padding=1)]
        layers += [ResBlock(cfg.hidden, cfg.res_hidden) for _ in range(cfg.res_blocks)]
        layers += [nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """(B, hidden, h, w) -> (B, C, h*downsample, w*downsample)"""

    def __init__(self, cfg):
        super().__init__()
        steps = int(math.log2(cfg.downsample))
        layers = [nn.Conv2d(cfg.hidden, cfg.hidden, 3, padding=1)]
        layers += [ResBlock(cfg.hidden, cfg.res_hidden) for _ in range(cfg.res_blocks)]
        ch = cfg.hidden
        for i in range(steps):  # each transposed conv doubles the side
            last = i == steps - 1
            out = cfg.in_channels if last else cfg.hidden // 2
            layers += [nn.ReLU(), nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1)]
            ch = out
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Model(nn.Module):
    """Encoder -> 1x1 projection to D (the paper's P_w) -> VectorQuantizer -> 1x1 projection back -> Decoder."""

    def __init__(self, cfg):
        super().__init__()
        sizes = ("image_size", "in_channels", "hidden", "res_hidden", "codebook_size", "code_dim", "dead_code_window")
        small = [f"{k} {getattr(cfg, k)}" for k in sizes if getattr(cfg, k) < 1]
        if small:  # a size of 0 would fail later, in a reshape or a convolution, far from its cause
            raise ValueError(f"these sizes must be at least 1: {', '.join(small)}")
        if cfg.downsample < 2 or cfg.downsample & (cfg.downsample - 1):
            raise ValueError(f"downsample must be a power of 2 and at least 2, got {cfg.downsample}")
        if cfg.image_size % cfg.downsample:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by downsample {cfg.downsample}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.pre_quant = nn.Conv2d(cfg.hidden, cfg.code_dim, 1)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, beta=cfg.beta, ema=cfg.ema, decay=cfg.decay,
                                         eps=cfg.eps, init=cfg.init, kmeans_iters=cfg.kmeans_iters,
                                         dead_code_threshold=cfg.dead_code_threshold,
                                         dead_code_window=cfg.dead_code_window)
        self.post_quant = nn.Conv2d(cfg.code_dim, cfg.hidden, 1)
        self.decoder = Decoder(cfg)

    def _latents(self, x):
        """(B, C, H, W) -> z (B, h, w, D), before quantization, channels last."""
        return self.pre_quant(self.encoder(x)).permute(0, 2, 3, 1)

    def _decode_latents(self, z_q):
        """(B, h, w, D) -> (B, C, H, W)"""
        return self.decoder(self.post_quant(z_q.permute(0, 3, 1, 2)))

    def forward(self, x):
        z = self._latents(x)  # (B, h, w, D)
        z_q, codes, q_loss, q_stats = self.quantizer(z)
        x_hat = self._decode_latents(z_q)  # (B, C, H, W)
        recon = F.mse_loss(x_hat.float(), x.float())
        stats = {"recon": recon.detach(), **q_stats}
        return x_hat, recon + q_loss, stats

    @torch.no_grad()
    def encode(self, x):
        """(B, C, H, W) -> codes (B, h, w); the codebook is left as it is."""
        z = self._latents(x)
        return self.quantizer.nearest(z.reshape(-1, self.cfg.code_dim)).reshape(z.shape[:-1])

    @torch.no_grad()
    def decode(self, codes):
        """codes (B, h, w) -> (B, C, H, W)"""
        return self._decode_latents(self.quantizer.lookup(codes))

    def code_layout(self):
        """For prior.py: [((h, w), K)], one level."""
        side = self.cfg.image_size // self.cfg.downsample
        return [((side, side), self.cfg.codebook_size)]

    @torch.no_grad()
    def latents(self, x):
        """For eval.py: {"vq": (codebook (K, D), pre-quantization vectors (N, D), codes (N,))}."""
        z = self._latents(x).reshape(-1, self.cfg.code_dim).float()
        return {"vq": (self.quantizer.codebook.detach().float(), z, self.quantizer.nearest(z))}
