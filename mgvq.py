"""
Multi-group quantization (MGVQ) on the VQ-VAE of vqvae.py.

Paper: "MGVQ: Could VQ-VAE Beat VAE? A Generalizable Tokenizer with Multi-group Quantization", Jia et al., 2025
(arXiv:2507.07997). The backbone: vqvae.py (arXiv:1711.00937, with the collapse mitigations of arXiv:2601.22244).

The idea. One codebook of K codes gives log2 K bits per position, and a large K is hard to keep in use. MGVQ keeps the
latent dimension D and cuts each vector into G parts, each quantized by its own sub-codebook of K codes: G log2 K bits
per position from G small codebooks. Nested masking (`group_mask_probs`) draws u ~ U(0, 1) per batch and drops group i
(zeroed, its loss left out) when u < p_i; the p_i do not decrease, so the first groups learn the coarse content and
every prefix of groups decodes (`groups_to_use`; eval.py's groups_n/mse).

Where this departs from the paper: all but the groups is vqvae.py's (encoder, decoder, loss, straight-through value;
EMA codebooks with k-means init and dead-code reset, here per group); the nested masking is that of the paper's first
training stage, its later stage is not reproduced.

Train it:  python train.py --model mgvq --code_dim 16 --groups 4 --codebook_size 8 --group_mask_probs 0,0.2,0.3,0.4
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
    # multi-group quantization (MGVQ); groups = 1 is vqvae.py's plain VQ
    groups: int = 4  # G parts of code_dim, each with a sub-codebook of codebook_size codes; ours: a default G > 1
    group_mask_probs: tuple[float, ...] = ()  # drop group i when u < p_i, non-decreasing (stage 1: 0,0.2,0.3,0.4)
    groups_to_use: int = 0  # in eval mode, decode from the first groups only; 0 uses all


# Per-dataset settings (Config or train.py fields), over the defaults and under the command line: vqvae.py's.
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
    """vqvae.py's quantizer with MGVQ's groups: G sub-codebooks of K codes, one per D/G dims, each with its own EMA,
    data init and dead-code reset; torch only. forward(z (..., D), group_mask=None) -> (z_q (..., D) with gradients
    straight through to z, codes (...) or (..., G) when G > 1, loss, stats). A (G,) bool group_mask zeroes the groups
    where it is False and leaves out their loss (nested masking); their codes still follow the encoder. Training then
    updates the codebook, equal on every torch.distributed rank (each passing as many vectors). float32 in any autocast.
    Twin: vqvae.py's VectorQuantizer, which is this with groups = 1, bit for bit (tests/test_twins.py).
    """

    search_block = 2 ** 22  # distance entries per chunk of the search (16 MiB)

    def __init__(self, codebook_size, dim, groups=1, beta=0.25, ema=True, decay=0.99, eps=1e-5, init="kmeans",
                 kmeans_iters=10, dead_code_threshold=2.0, dead_code_window=10):
        super().__init__()
        if init not in ("kmeans", "data", "random"):
            raise ValueError(f"init must be 'kmeans', 'data' or 'random', got {init!r}")
        if not 0 <= decay <= 1:  # an EMA weight (1: it never moves); outside [0, 1] it diverges
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if groups < 1 or dim % groups:
            raise ValueError(f"dim {dim} must be divisible by groups {groups}")
        self.codebook_size, self.dim, self.groups, self.beta = codebook_size, dim, groups, beta
        self.ema, self.decay, self.eps = ema, decay, eps
        self.init, self.kmeans_iters = init, kmeans_iters
        self.dead_code_threshold, self.dead_code_window = dead_code_threshold, dead_code_window

        codebook = torch.randn(codebook_size, dim)  # replaced from data on the first batch unless init="random"
        if ema:  # moved by EMA, not by the optimizer
            self.register_buffer("codebook", codebook)
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("ema_count", torch.ones(groups * codebook_size))  # N_k, EMA of assignment counts
        self.register_buffer("ema_sum", codebook.clone())  # m_k, EMA of the sums of assigned vectors
        self.register_buffer("usage", torch.zeros(groups * codebook_size))  # assignments in this dead-code window
        self.register_buffer("window_step", torch.zeros((), dtype=torch.long))  # batches seen in the window
        self.register_buffer("initialized", torch.tensor(init == "random"))
        # host copies of the last two, read once after construction or loading: a step then reads nothing from a GPU
        self._host_initialized = self._host_window_step = None

    # -- the VQ-VAE core: nearest code, straight-through, loss

    def forward(self, z, group_mask=None):
        shape = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):  # the fp32 island
            z = z.float().reshape(-1, self.dim)  # (N, D)
            if self.training and self._host_initialized is None:  # once after construction or loading
                self._host_initialized, self._host_window_step = bool(self.initialized), int(self.window_step)
            if self.training and not self._host_initialized:
                self._init_codebook(z.detach())
            codes = self.nearest(z)  # (N, G)
            e = self._lookup(codes)  # (N, D)
            keep = None if group_mask is None else group_mask.repeat_interleave(self.dim // self.groups).float()

            # beta moves the encoder toward its code; the codebook moves by EMA, or by its own loss without EMA
            commit = self._mse(z, e.detach(), keep)
            loss = self.beta * commit
            if not self.ema:
                loss = loss + self._mse(e, z.detach(), keep)
            # straight-through: exactly e forward (z + sg(e - z) is e up to rounding); the gradient to z, none to e
            z_q = e.detach() + (z - z.detach())
            if keep is not None:
                z_q = z_q * keep  # dropped groups are zero: the decoder sees nothing of them

            counts = self._counts(codes)  # (G*K,), this rank's batch
            if self.training:  # quantize and compute losses first, then update the codebook
                self._update(z.detach(), codes, counts)
        p = counts.view(self.groups, -1)
        p = p / p.sum(1, keepdim=True)
        stats = {"commit": commit.detach(),
                 # of this batch, averaged over groups (usually below the perplexity over a whole split)
                 "perplexity": torch.exp(-(p * torch.log(p + 1e-10)).sum(1)).mean(),
                 "code_usage": (counts > 0).float().mean()}
        return z_q.reshape(shape), self._shape_codes(codes, shape), loss, stats

    def nearest(self, z, codebook=None):
        """Index of the nearest code of each group for each row of z (N, D): (N, G), ties to the lowest; chunked over
        rows so that the (G, rows, K) distances hold at most search_block entries."""
        e = self._by_group((self.codebook if codebook is None else codebook).detach().float())  # (G, K, d)
        e_sq = (e * e).sum(-1, keepdim=True).transpose(1, 2)  # (G, 1, K)
        z = self._by_group(z.detach().float())  # (G, N, d)
        G, N, K = z.shape[0], z.shape[1], e.shape[1]
        chunk = min(N, max(1, self.search_block // (G * K)))  # rows per chunk
        codes = torch.empty(N, G, dtype=torch.long, device=z.device)
        d = torch.empty(G, chunk, K, device=z.device)  # one buffer for all chunks
        for i in range(0, N, chunk):
            zc = z[:, i:i + chunk]  # (G, c, d)
            dc = d[:, :zc.shape[1]]
            # ||z||^2 is the same for every code and does not change the argmin: d = ||e||^2 - 2 z.e
            torch.baddbmm(e_sq, zc, e.transpose(1, 2), alpha=-2.0, out=dc)  # (G, c, K)
            codes[i:i + chunk] = self._argmin(dc).t()
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

    def encode(self, z):
        """(..., D) -> codes (...), or (..., G) when G > 1. Changes nothing: for eval and tokenizers."""
        return self._shape_codes(self.nearest(z.reshape(-1, self.dim)), z.shape)

    def lookup(self, codes):
        """codes as encode gives them -> code vectors (..., D)."""
        batch = codes.shape[:-1] if self.groups > 1 else codes.shape
        return self._lookup(codes.reshape(-1, self.groups)).reshape(*batch, self.dim)

    @staticmethod
    def _mse(a, b, keep):
        """Mean squared error over all dims, or over the dims where keep (D,) is 1."""
        if keep is None:
            return F.mse_loss(a, b)
        return ((a - b) ** 2 * keep).sum() / (a.shape[0] * keep.sum())

    # -- fitting the codebook to data: EMA, dead-code reset, k-means init (training only)

    @torch.no_grad()
    def _update(self, z, codes, counts):
        counts = self._all_reduce(counts.clone())  # (G*K,) over all ranks
        if self.ema:  # the sums are needed only here: evaluation and a learned codebook skip them
            sums = self._all_reduce(self._sums(z, codes))  # (K, D)
            self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            # Laplace smoothing, per group: an unused code's count stays above zero
            count = self.ema_count.view(self.groups, -1)  # (G, K)
            n = count.sum(1, keepdim=True)  # (G, 1)
            count = (count + self.eps) / (n + self.codebook_size * self.eps) * n
            self.codebook.copy_(self.ema_sum / self._per_dim(count.reshape(-1)))
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
        dead = self.usage < self.dead_code_threshold  # (G*K,), equal on all ranks: usage is all-reduced
        z = self._gather(z)  # (world * N, D)
        # K candidates, used where a code is dead: no data-dependent branch, the same collectives every time
        candidates = z[torch.randint(0, z.shape[0], (self.codebook_size,), device=z.device)]  # (K, D)
        self._broadcast(candidates)
        dead_dims = self._per_dim(dead)  # (K, D)
        self.codebook.copy_(torch.where(dead_dims, candidates, self.codebook))
        self.ema_sum.copy_(torch.where(dead_dims, candidates, self.ema_sum))
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
        if self.init == "kmeans":  # Lloyd's iterations, every group at once
            for _ in range(self.kmeans_iters):
                codes = self.nearest(z, codebook)
                counts, sums = self._per_dim(self._counts(codes)), self._sums(z, codes)  # (K, D) each
                # an empty cluster keeps its previous centre
                codebook = torch.where(counts > 0, sums / counts.clamp(min=1), codebook)
        self._broadcast(codebook)
        self.codebook.copy_(codebook)
        self.ema_sum.copy_(codebook)  # with ema_count = 1: the EMA starts at the new codebook
        self.ema_count.fill_(1.0)
        self.initialized.fill_(True)
        self._host_initialized = True

    # -- machinery: groups' layout, counts, collectives, host copies
    # The G sub-codebooks live in one (K, D) matrix: code k of group g is codebook[k, g*D/G:(g+1)*D/G]; counts are
    # (G*K,), group by group. With G = 1 this is vqvae.py's quantizer.

    def _lookup(self, codes):
        """(N, G) -> (N, D); indexing, not a one-hot matmul."""
        groups = torch.arange(self.groups, device=codes.device)
        return self._by_group(self.codebook)[groups, codes].reshape(codes.shape[0], self.dim)  # via (N, G, d)

    def _shape_codes(self, codes, shape):
        """(N, G) codes of vectors of `shape` (..., D) -> (...), or (..., G) when G > 1."""
        return codes.reshape(*shape[:-1], *([self.groups] if self.groups > 1 else []))

    def _flat(self, codes):
        """codes (N, G) -> (G*N,) rows of the (G*K,) counts, group by group: code k of group g is row g*K + k."""
        offsets = torch.arange(self.groups, device=codes.device) * self.codebook_size
        return (codes + offsets).t().reshape(-1)

    def _counts(self, codes):
        """Assignments per code of each group, (G*K,): an index_add_ of ones, exact in float32 (to 2^24 per code) in
        any order (torch.bincount would read the largest index back to the host)."""
        flat = self._flat(codes)
        ones = torch.ones(flat.shape[0], device=codes.device)
        return torch.zeros(self.groups * self.codebook_size, device=codes.device).index_add_(0, flat, ones)

    def _sums(self, z, codes):
        """Sums of the parts of z (N, D) assigned to each code, (K, D) in the codebook's layout: one index_add_."""
        K, G = self.codebook_size, self.groups
        parts = self._by_group(z).reshape(G * z.shape[0], -1)  # (G*N, d), in the order of _flat
        sums = torch.zeros(G * K, parts.shape[1], device=z.device).index_add_(0, self._flat(codes), parts)
        return sums.view(G, K, -1).transpose(0, 1).reshape(K, self.dim)

    def _by_group(self, x):
        """(N, D) -> (G, N, D/G), a view: the groups side by side."""
        return x.view(x.shape[0], self.groups, -1).transpose(0, 1)

    def _per_dim(self, per_code):
        """(G*K,) values per code of each group -> (K, D), each value repeated over its group's dims."""
        d = self.dim // self.groups
        return per_code.view(self.groups, -1).t().repeat_interleave(d, dim=1)

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


# Encoder and decoder (VQ-VAE, section 4.1): vqvae.py's, word for word (tests/test_twins.py)

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
    """vqvae.py's Model with groups: Encoder -> 1x1 to D -> VectorQuantizer (G groups) -> 1x1 back -> Decoder."""

    def __init__(self, cfg):
        super().__init__()
        sizes = ("image_size", "in_channels", "hidden", "res_hidden", "codebook_size", "code_dim", "groups",
                 "dead_code_window")
        small = [f"{k} {getattr(cfg, k)}" for k in sizes if getattr(cfg, k) < 1]
        if small:  # a size of 0 would fail later, in a reshape or a convolution, far from its cause
            raise ValueError(f"these sizes must be at least 1: {', '.join(small)}")
        if cfg.downsample < 2 or cfg.downsample & (cfg.downsample - 1):
            raise ValueError(f"downsample must be a power of 2 and at least 2, got {cfg.downsample}")
        if cfg.image_size % cfg.downsample:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by downsample {cfg.downsample}")
        probs = cfg.group_mask_probs
        if probs and (len(probs) != cfg.groups or probs[0] != 0 or not all(0 <= p <= 1 for p in probs)):
            raise ValueError(f"group_mask_probs needs {cfg.groups} probabilities in [0, 1], the first 0 (group 0 "
                             f"is always kept), got {probs}")
        if any(later < earlier for earlier, later in zip(probs, probs[1:])):  # one u drops every group with u < p_i
            raise ValueError(f"group_mask_probs must be non-decreasing, so that the groups kept are always the first "
                             f"ones (nested masks), got {probs}")
        if not 0 <= cfg.groups_to_use <= cfg.groups:
            raise ValueError(f"groups_to_use must be between 0 (all) and groups = {cfg.groups}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.pre_quant = nn.Conv2d(cfg.hidden, cfg.code_dim, 1)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, groups=cfg.groups, beta=cfg.beta,
                                         ema=cfg.ema, decay=cfg.decay, eps=cfg.eps, init=cfg.init,
                                         kmeans_iters=cfg.kmeans_iters, dead_code_threshold=cfg.dead_code_threshold,
                                         dead_code_window=cfg.dead_code_window)
        self.post_quant = nn.Conv2d(cfg.code_dim, cfg.hidden, 1)
        self.decoder = Decoder(cfg)
        # not saved: the config holds it, and a one-group state_dict is vqvae.py's
        self.register_buffer("mask_probs", torch.tensor(probs or [0.0] * cfg.groups), persistent=False)

    def _latents(self, x):
        """(B, C, H, W) -> z (B, h, w, D), before quantization, channels last."""
        return self.pre_quant(self.encoder(x)).permute(0, 2, 3, 1)

    def _decode_latents(self, z_q):
        """(B, h, w, D) -> (B, C, H, W)"""
        return self.decoder(self.post_quant(z_q.permute(0, 3, 1, 2)))

    def _group_mask(self):
        """(G,) bool, the groups forward keeps, or None for all of them. Training with group_mask_probs: MGVQ's
        nested masking, one u per batch (and per rank), drawn on the device so that no value comes back to the host.
        Evaluation: the first `groups_to_use` groups."""
        if self.training and self.cfg.group_mask_probs:
            return torch.rand((), device=self.mask_probs.device) >= self.mask_probs  # u < p_i drops group i
        return None if self.training else self._prefix(self.cfg.groups_to_use)

    def _prefix(self, n):
        """(G,) bool, the first n groups, or None for all of them (n = 0 or G)."""
        return torch.arange(self.cfg.groups, device=self.mask_probs.device) < n if 0 < n < self.cfg.groups else None

    def forward(self, x):
        z = self._latents(x)  # (B, h, w, D)
        z_q, codes, q_loss, q_stats = self.quantizer(z, self._group_mask())
        x_hat = self._decode_latents(z_q)  # (B, C, H, W)
        recon = F.mse_loss(x_hat.float(), x.float())
        stats = {"recon": recon.detach(), **q_stats}
        return x_hat, recon + q_loss, stats

    @torch.no_grad()
    def encode(self, x):
        """(B, C, H, W) -> codes (B, h, w), or (B, h, w, G) with groups. The codebook is left as it is."""
        return self.quantizer.encode(self._latents(x))

    @torch.no_grad()
    def decode(self, codes, groups_to_use=None):
        """codes as encode gives them -> (B, C, H, W), from the first groups_to_use groups (default: the config's),
        in training mode too."""
        z_q = self.quantizer.lookup(codes)  # (B, h, w, D)
        mask = self._prefix(self.cfg.groups_to_use if groups_to_use is None else groups_to_use)
        if mask is not None:
            z_q = z_q * mask.repeat_interleave(self.cfg.code_dim // self.cfg.groups).to(z_q.dtype)
        return self._decode_latents(z_q)

    def code_layout(self):
        """For prior.py: [((h, w), K)], or [((h, w, G), K)] when G > 1 (groups last in the sequence)."""
        side = self.cfg.image_size // self.cfg.downsample
        shape = (side, side, self.cfg.groups) if self.cfg.groups > 1 else (side, side)
        return [(shape, self.cfg.codebook_size)]

    @torch.no_grad()
    def partial_decodes(self, x):
        """For eval.py: {"groups_n": reconstruction from the first n groups} for n = 1..G, when G > 1."""
        if self.cfg.groups == 1:
            return {}
        codes = self.encode(x)
        return {f"groups_{n}": self.decode(codes, n) for n in range(1, self.cfg.groups + 1)}

    @torch.no_grad()
    def latents(self, x):
        """For eval.py: {name: (codebook (K, d), pre-quantization vectors (N, d), codes (N,))}, one entry per
        codebook: "vq", or "group0", "group1", ... with groups."""
        D, G = self.cfg.code_dim, self.cfg.groups
        z = self._latents(x).reshape(-1, D).float()
        codebook, codes = self.quantizer.codebook.detach().float(), self.quantizer.nearest(z)  # (K, D), (N, G)
        if G == 1:
            return {"vq": (codebook, z, codes[:, 0])}
        d = D // G
        return {f"group{g}": (codebook[:, g * d:(g + 1) * d], z[:, g * d:(g + 1) * d], codes[:, g])
                for g in range(G)}
