"""
Two-level hierarchical VQ-VAE (VQ-VAE-2), capacity-matched against the single-level vqvae.py.

Papers:
  - "Generating Diverse High-Fidelity Images with VQ-VAE-2", Razavi, van den Oord and Vinyals, 2019
    (arXiv:1906.00446): the two-level model.
  - "Is Hierarchical Quantization Essential for Optimal Reconstruction?", 2026 (arXiv:2601.22244): a single-level
    VQ-VAE with codebook-collapse mitigation matches a two-level one of the same representational budget.

The idea. A bottom encoder maps the image to features on a grid 4 times smaller; a top encoder halves that grid
again. The top features are quantized first, with their own codebook. A small decoder brings the top codes back up to
the bottom grid, where they are joined to the bottom features (concatenated, then a 1x1 convolution) before the
bottom quantizer: the bottom codes need only carry what the top codes do not. The decoder sees both levels, the top
codes upsampled by a transposed convolution and concatenated with the bottom codes. Both quantizers are the same EMA
quantizer as in vqvae.py, with the same collapse mitigations (data initialisation, dead-code reset), so that a
comparison with vqvae.py isolates the hierarchy.

The comparison (arXiv:2601.22244) holds two budgets equal: the continuous one, the number of floats in the quantized
latent maps, and the discrete one, the number of floats in the codebooks. `matched_single_level(cfg)` gives the
vqvae.py settings that match a two-level config, and says when no exact match exists; `python vqvae2.py [settings]`
prints them as a train.py command line.

Train it:  python train.py --model vqvae2 [--dataset mnist --data_dir DIR] [--codebook_size 320 --code_dim 8]
Match it:  python vqvae2.py [--dataset mnist --data_dir DIR]   # the capacity-matched `train.py --model vqvae` command
"""

import math
from dataclasses import dataclass, fields
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    # data (train.py fills these from the dataset; override on the command line). image_size must be divisible by
    # 2 * downsample (8 by default): the top grid is half the bottom one.
    image_size: int = 32
    in_channels: int = 3
    # encoders / decoders (VQ-VAE-2: strided convs + residual blocks)
    hidden: int = 128  # channels of the encoders' and decoders' main paths
    res_blocks: int = 2  # residual blocks in each encoder and decoder
    res_hidden: int = 32  # channels inside a residual block
    downsample: int = 4  # image side / bottom latent side, a power of 2 (VQ-VAE-2: 4); the top grid is 2x smaller
    # quantizers: one codebook per level, both of K_h codes of dimension D_h (as the matching paper assumes)
    codebook_size: int = 512  # K_h, per level (VQ-VAE-2: 512)
    code_dim: int = 64  # D_h, per level (VQ-VAE-2: 64; arXiv:2601.22244 finds D = 8 better, see PRESETS)
    beta: float = 0.25  # commitment weight, at both levels (VQ-VAE-2)
    ema: bool = True  # EMA codebook updates; False learns the codebooks by the loss ||sg(z) - e||^2
    decay: float = 0.99  # EMA decay (VQ-VAE-2)
    eps: float = 1e-5  # Laplace smoothing of the EMA counts
    init: str = "kmeans"  # "kmeans" | "data" (samples of the first batch) | "random" (N(0, 1), the baseline)
    kmeans_iters: int = 10
    dead_code_threshold: float = 2.0  # reset codes used fewer times than this per window; 0 disables
    dead_code_window: int = 10  # batches per window (arXiv:2601.22244: 2 uses over 10 batches)


# Per-dataset presets: train.py applies PRESETS[dataset] above the defaults and below the command line. Keys may be
# Config fields or train.py settings. Training settings are vqvae.py's for the same dataset. The codebooks use D_h = 8
# and K_h = 5/8 of vqvae.py's K there, so that the capacity-matched single-level model (`python vqvae2.py --dataset
# ...`) is exact: vqvae.py's K with D = 10 on the bottom grid. MNIST and Fashion-MNIST are resized from 28 to 32:
# the two grids need a side divisible by 8.
PRESETS = {
    "shapes": dict(hidden=64, res_hidden=32, codebook_size=160, code_dim=8, batch_size=32, lr=2e-3, max_iters=2000,
                   warmup_iters=100, eval_interval=500),
    "mnist": dict(image_size=32, hidden=64, codebook_size=320, code_dim=8, batch_size=64, lr=1e-3, max_iters=3000),
    "fashion_mnist": dict(image_size=32, hidden=64, codebook_size=320, code_dim=8, batch_size=64, lr=1e-3,
                          max_iters=3000),
    "cifar10": dict(codebook_size=640, code_dim=8, batch_size=128, lr=3e-4, max_iters=50000),
    "celeba": dict(codebook_size=2560, code_dim=8, batch_size=128, lr=3e-4, max_iters=100000),
    "lsun_church": dict(codebook_size=2560, code_dim=8, batch_size=64, lr=3e-4, max_iters=100000),
    "imagenet": dict(codebook_size=5120, code_dim=8, batch_size=64, lr=3e-4, max_iters=300000),  # 64x64 + 32x32
}


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with an EMA codebook (VQ-VAE, arXiv:1711.00937, appendix A.1), data
    initialisation and dead-code reset (arXiv:2601.22244). Depends on torch only: copy it into your project.

    forward(z) takes z of shape (..., D) and returns (z_q, codes, loss, stats):
      z_q   (..., D)  the quantized vectors, with straight-through gradients to z
      codes (...)     int64 index of the chosen code
      loss  scalar    beta * ||z - sg(e)||^2, plus ||sg(z) - e||^2 when the codebook is learned by gradient
      stats dict      scalar tensors for logging

    In training mode it also updates the codebook (after the loss is computed), and under torch.distributed it keeps
    the codebook bitwise equal on every rank: counts and sums are all-reduced, and the vectors for initialisation and
    dead-code reset are gathered from all ranks, picked on rank 0 and broadcast (so every rank must pass the same
    number of vectors, as with equal batches). Everything inside runs in float32 with autocast off: a bf16 distance
    matmul picks a different code for about 1% of vectors. Twin: vqvae.py's VectorQuantizer with groups = 1
    (tests/test_twins.py keeps them equal bit for bit; tests/test_search.py holds every quantizer's search).
    """

    search_block = 2 ** 22  # distance entries per chunk of the search (16 MiB), whatever N and K are

    def __init__(self, codebook_size, dim, beta=0.25, ema=True, decay=0.99, eps=1e-5, init="kmeans",
                 kmeans_iters=10, dead_code_threshold=2.0, dead_code_window=10):
        super().__init__()
        if init not in ("kmeans", "data", "random"):
            raise ValueError(f"init must be 'kmeans', 'data' or 'random', got {init!r}")
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
        self.register_buffer("usage", torch.zeros(codebook_size))  # assignments in the current dead-code window
        self.register_buffer("window_step", torch.zeros((), dtype=torch.long))  # batches seen in the window
        self.register_buffer("initialized", torch.tensor(init == "random"))
        # Host copies of `initialized` and `window_step`, so that a training step reads no value back from the device
        # (on a GPU every such read, even an `if tensor:`, waits for all queued kernels). The buffers stay the truth
        # for checkpoints; the copies are read from them at the first training step after construction or loading.
        self._host_initialized = self._host_window_step = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_initialized = self._host_window_step = None  # the loaded buffers hold the truth now

    # Collectives that become no-ops without a process group, so the code below calls them unconditionally.
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
    def _gather(z):  # (N, D) from every rank -> (world * N, D), the same on every rank; N must be equal on all ranks
        if not (dist.is_available() and dist.is_initialized()):
            return z
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        return torch.cat(parts)

    # -- nearest code -----------------------------------------------------------------------------------------------

    def nearest(self, z, codebook=None):
        """Index of the nearest code for each row of z (N, D), ties to the lowest index. Chunked over rows so that the
        (rows, K) distance block stays at search_block entries whatever N and K are: K = 65,536 codes for 65,536
        vectors needs no (N, K) matrix."""
        e = self.codebook if codebook is None else codebook
        e = e.detach().float()
        e_sq = (e * e).sum(1)  # (K,)
        chunk = min(z.shape[0], max(1, self.search_block // e.shape[0]))  # rows per chunk
        codes = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
        d = torch.empty(chunk, e.shape[0], device=z.device)  # one buffer for every chunk: no allocation per chunk
        for i in range(0, z.shape[0], chunk):
            zc = z[i:i + chunk].detach().float()
            dc = d[:zc.shape[0]]
            # ||z||^2 is the same for every code and does not change the argmin: d = ||e||^2 - 2 z.e
            torch.addmm(e_sq, zc, e.t(), alpha=-2.0, out=dc)  # (chunk, K)
            codes[i:i + chunk] = self._argmin(dc)
        return codes

    @staticmethod
    def _argmin(d, block=64):
        """argmin over the last dim of d (..., K), ties to the lowest index, in two steps: the minimum of each block of
        `block` codes (a plain vectorised min), then the argmin inside the first block holding the row's minimum.
        Exact, and several times faster on a CPU than one argmin over K, whose reduction carries an index along.
        Twins: every quantizer file has this copy; tests/test_search.py holds them all to a brute-force reference."""
        B = min(block, d.shape[-1] & -d.shape[-1])  # the largest power of 2 that divides K, at most `block`
        if B < 8:  # blocks this short would not pay
            return d.argmin(-1)
        blocks = d.unflatten(-1, (-1, B))  # (..., K/B, B)
        best = blocks.amin(-1).argmin(-1, keepdim=True)  # (..., 1) the first block holding the minimum
        inside = blocks.gather(-2, best[..., None].expand(*best.shape, B)).squeeze(-2)  # (..., B) that block
        return best.squeeze(-1) * B + inside.argmin(-1)

    # -- forward ----------------------------------------------------------------------------------------------------

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
            # straight-through: the forward value is exactly e (z - sg(z) is exactly 0, where the common
            # z + sg(e - z) is e only up to rounding), and the gradient of z_q goes to z unchanged, none to e
            z_q = e.detach() + (z - z.detach())

            counts = self._counts(codes)  # (K,) this rank's batch
            if self.training:  # quantize and compute losses first, then update the codebook
                self._update(z.detach(), codes, counts)
        p = counts / counts.sum()
        stats = {"commit": commit.detach(),
                 "perplexity": torch.exp(-(p * torch.log(p + 1e-10)).sum()),  # of this batch only
                 "code_usage": (counts > 0).float().mean()}
        return z_q.reshape(shape), codes.reshape(shape[:-1]), loss, stats

    def lookup(self, codes):
        """codes (...) -> code vectors (..., D)."""
        return self.codebook[codes]

    def _counts(self, codes):
        """Assignments per code, (K,). An index_add_ of ones rather than torch.bincount, which on a GPU reads the
        largest index back to the host; sums of ones are exact in float32 (up to 2^24 per code), so the order of the
        GPU's atomic adds cannot change the result."""
        ones = torch.ones(codes.shape[0], device=codes.device)
        return torch.zeros(self.codebook_size, device=codes.device).index_add_(0, codes, ones)

    # -- codebook updates (training mode only; every rank runs the same collectives) ---------------------------------

    @torch.no_grad()
    def _update(self, z, codes, counts):
        counts = self._all_reduce(counts.clone())  # (K,) over all ranks
        if self.ema:
            sums = torch.zeros_like(self.ema_sum).index_add_(0, codes, z)  # (K, D)
            self._all_reduce(sums)
            self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            # Laplace smoothing keeps an unused code's count above zero so the division is safe
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
        """Move every code used fewer than `dead_code_threshold` times in the window onto a random encoder output of
        this batch, drawn from all ranks' vectors by rank 0 and broadcast. Its EMA count and sum are reset with it,
        or the next EMA step would drag the code back to where it was."""
        dead = self.usage < self.dead_code_threshold  # (K,), equal on all ranks: usage is all-reduced
        z = self._gather(z)  # (world * N, D)
        # always K candidates, used where a code is dead: no data-dependent branch, the same collectives every time
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
        """Initialise the codebook from the first batch: k-means on (or a random sample of) the encoder outputs of
        all ranks, computed on each and broadcast from rank 0 so that every rank starts from the same codebook."""
        z = self._gather(z)  # (world * N, D)
        idx = torch.randperm(z.shape[0], device=z.device)[:self.codebook_size]
        if idx.numel() < self.codebook_size:  # fewer vectors than codes: sample with replacement
            idx = torch.randint(0, z.shape[0], (self.codebook_size,), device=z.device)
        codebook = z[idx].clone()  # (K, D)
        if self.init == "kmeans":
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



# ---------------------------------------------------------------------------------------------------------------------
# Encoders and decoders (VQ-VAE, section 4.1, as VQ-VAE-2 uses them: strided convolutions and residual blocks). The
# bottom encoder and the image decoder are vqvae.py's, so that the two models differ only in the hierarchy.

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
    """(B, in_ch, H, W) -> (B, hidden, H/downsample, W/downsample)"""

    def __init__(self, in_ch, hidden, res_blocks, res_hidden, downsample):
        super().__init__()
        steps = int(math.log2(downsample))
        layers, ch = [], in_ch
        for i in range(steps):  # each stride-2 conv halves the side
            out = hidden if i == steps - 1 else hidden // 2
            layers += [nn.Conv2d(ch, out, 4, stride=2, padding=1), nn.ReLU()]
            ch = out
        layers += [nn.Conv2d(ch, hidden, 3, padding=1)]
        layers += [ResBlock(hidden, res_hidden) for _ in range(res_blocks)]
        layers += [nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """(B, in_ch, h, w) -> (B, out_ch, h*upsample, w*upsample)"""

    def __init__(self, in_ch, hidden, res_blocks, res_hidden, out_ch, upsample):
        super().__init__()
        steps = int(math.log2(upsample))
        layers = [nn.Conv2d(in_ch, hidden, 3, padding=1)]
        layers += [ResBlock(hidden, res_hidden) for _ in range(res_blocks)]
        ch = hidden
        for i in range(steps):  # each transposed conv doubles the side
            out = out_ch if i == steps - 1 else hidden // 2
            layers += [nn.ReLU(), nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1)]
            ch = out
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Model(nn.Module):
    """VQ-VAE-2 (arXiv:1906.00446, figure 2a), two levels:

      x -> bottom encoder (/downsample) -> h_b -> top encoder (/2) -> 1x1 to D -> top quantizer -> q_t
      [h_b, top decoder(q_t) (x2)] -> 1x1 to D -> bottom quantizer -> q_b
      [upsample(q_t) (x2, transposed conv), q_b] -> 1x1 to hidden -> decoder (x downsample) -> x_hat

    The top level is quantized first: the bottom quantizer sees the top codes, decoded to its grid."""

    def __init__(self, cfg):
        super().__init__()
        sizes = ("image_size", "in_channels", "hidden", "res_hidden", "codebook_size", "code_dim", "dead_code_window")
        small = [f"{k} {getattr(cfg, k)}" for k in sizes if getattr(cfg, k) < 1]
        if small:  # a size of 0 would fail later, in a reshape or a convolution, far from its cause
            raise ValueError(f"these sizes must be at least 1: {', '.join(small)}")
        if cfg.downsample < 2 or cfg.downsample & (cfg.downsample - 1):
            raise ValueError(f"downsample must be a power of 2 and at least 2, got {cfg.downsample}")
        if cfg.image_size % (2 * cfg.downsample):
            raise ValueError(f"image_size {cfg.image_size} is not divisible by {2 * cfg.downsample} (2 x downsample): "
                             f"the top grid is half the bottom grid")
        self.cfg = cfg
        h, D, blocks = cfg.hidden, cfg.code_dim, (cfg.res_blocks, cfg.res_hidden)
        quantizer = dict(beta=cfg.beta, ema=cfg.ema, decay=cfg.decay, eps=cfg.eps, init=cfg.init,
                         kmeans_iters=cfg.kmeans_iters, dead_code_threshold=cfg.dead_code_threshold,
                         dead_code_window=cfg.dead_code_window)
        self.enc_b = Encoder(cfg.in_channels, h, *blocks, cfg.downsample)
        self.enc_t = Encoder(h, h, *blocks, 2)
        self.pre_quant_t = nn.Conv2d(h, D, 1)
        self.quant_t = VectorQuantizer(cfg.codebook_size, D, **quantizer)
        self.dec_t = Decoder(D, h, *blocks, D, 2)  # top codes up to the bottom grid, for the bottom quantizer
        self.pre_quant_b = nn.Conv2d(h + D, D, 1)  # joins the bottom features and the decoded top codes
        self.quant_b = VectorQuantizer(cfg.codebook_size, D, **quantizer)
        self.upsample_t = nn.ConvTranspose2d(D, D, 4, stride=2, padding=1)  # top codes up to the bottom grid
        self.post_quant = nn.Conv2d(2 * D, h, 1)
        self.decoder = Decoder(h, h, *blocks, cfg.in_channels, cfg.downsample)

    def _top(self, x):
        """(B, C, H, W) -> bottom features (B, hidden, Hb, Wb), top pre-quantization vectors (B, Ht, Wt, D)"""
        h_b = self.enc_b(x)
        return h_b, self.pre_quant_t(self.enc_t(h_b)).permute(0, 2, 3, 1)

    def _bottom(self, h_b, q_t):
        """Bottom features (B, hidden, Hb, Wb), quantized top (B, Ht, Wt, D) -> bottom pre-quantization vectors
        (B, Hb, Wb, D)"""
        up = self.dec_t(q_t.permute(0, 3, 1, 2))  # (B, D, Hb, Wb)
        return self.pre_quant_b(torch.cat([h_b, up], 1)).permute(0, 2, 3, 1)

    def _decode_latents(self, q_t, q_b):
        """(B, Ht, Wt, D), (B, Hb, Wb, D) -> (B, C, H, W)"""
        up = self.upsample_t(q_t.permute(0, 3, 1, 2))  # (B, D, Hb, Wb)
        return self.decoder(self.post_quant(torch.cat([up, q_b.permute(0, 3, 1, 2)], 1)))

    def forward(self, x):
        h_b, z_t = self._top(x)
        q_t, _, loss_t, stats_t = self.quant_t(z_t)  # (B, Ht, Wt, D)
        q_b, _, loss_b, stats_b = self.quant_b(self._bottom(h_b, q_t))  # (B, Hb, Wb, D)
        x_hat = self._decode_latents(q_t, q_b)  # (B, C, H, W)
        recon = F.mse_loss(x_hat.float(), x.float())
        stats = {"recon": recon.detach(),
                 "commit": stats_t["commit"] + stats_b["commit"],  # the two levels' terms, as in the loss
                 # codes in use over both codebooks (out of 2 K_h), to set beside a single level's (out of K_s)
                 "perplexity": stats_t["perplexity"] + stats_b["perplexity"],
                 **{f"top_{k}": v for k, v in stats_t.items()},
                 **{f"bottom_{k}": v for k, v in stats_b.items()}}
        return x_hat, recon + loss_t + loss_b, stats

    def _encode(self, x):
        """(B, C, H, W) -> top vectors (B, Ht, Wt, D), top codes (B, Ht, Wt), bottom vectors, bottom codes"""
        D = self.cfg.code_dim
        h_b, z_t = self._top(x)
        top = self.quant_t.nearest(z_t.reshape(-1, D)).reshape(z_t.shape[:-1])
        z_b = self._bottom(h_b, self.quant_t.lookup(top))
        bottom = self.quant_b.nearest(z_b.reshape(-1, D)).reshape(z_b.shape[:-1])
        return z_t, top, z_b, bottom

    @torch.no_grad()
    def encode(self, x):
        """(B, C, H, W) -> (top codes (B, Ht, Wt), bottom codes (B, Hb, Wb)). The codebooks are left as they are."""
        _, top, _, bottom = self._encode(x)
        return top, bottom

    @torch.no_grad()
    def decode(self, codes):
        """(top codes (B, Ht, Wt), bottom codes (B, Hb, Wb)) -> (B, C, H, W)"""
        top, bottom = codes
        return self._decode_latents(self.quant_t.lookup(top), self.quant_b.lookup(bottom))

    def code_layout(self):
        """For prior.py: [(one image's code shape, K)] per level, in encode's order: the top grid, then the bottom
        grid. The model protocol (README.md) says how codes become one sequence."""
        side, K = self.cfg.image_size // self.cfg.downsample, self.cfg.codebook_size
        return [((side // 2, side // 2), K), ((side, side), K)]

    @torch.no_grad()
    def latents(self, x):
        """For eval.py: {name: (codebook (K, D), pre-quantization vectors (N, D), codes (N,))} for "top" and
        "bottom"; eval.py reports every metric per level."""
        z_t, top, z_b, bottom = self._encode(x)
        D = self.cfg.code_dim
        return {"top": (self.quant_t.codebook.detach().float(), z_t.reshape(-1, D).float(), top.flatten()),
                "bottom": (self.quant_b.codebook.detach().float(), z_b.reshape(-1, D).float(), bottom.flatten())}


# ---------------------------------------------------------------------------------------------------------------------
# Capacity matching (arXiv:2601.22244): the single-level vqvae.py model with the same representational budget

def matched_single_level(cfg, downsample=None):
    """The vqvae.py settings capacity-matched to the two-level `cfg`, by the paper's two budgets:

        continuous  Hs * Ws * Cs = Hb * Wb * Ch + Ht * Wt * Ch      (floats in the quantized latent maps)
        discrete    Ks * Ds      = 2 * Kh * Dh                      (floats in the codebooks)

    What C is. The paper writes C for the channels of a latent map and D for the code dimension, and does not say
    whether C is counted before its projection P_w to the code space or after it. Here C is the quantized map's:
    that map is all the decoder receives, and with one code per position its channel count is the code dimension.
    So Ch = Dh = `code_dim` here, and Cs = Ds = `code_dim` of vqvae.py, and the budgets fix both single-level values:

        Ds = Dh * (Hb * Wb + Ht * Wt) / (Hs * Ws)          Ks = 2 * Kh * Dh / Ds

    The paper does not say which grid the single-level model uses either; the default is the bottom grid (the same
    `downsample`), where Ds = 5/4 Dh and Ks = 8/5 Kh: an exact match needs `code_dim` a multiple of 4 and
    `codebook_size` a multiple of 5 (Kh = 320, Dh = 8 matches Ks = 512, Ds = 10). Another grid can be asked for with
    `downsample`. The encoder and decoder widths (`hidden`, ...) and every quantizer setting are copied unchanged, so
    both models get the same collapse mitigations; the budgets say nothing about parameters (vqvae2 has more: the top
    encoder and decoder).

    Returns a dict:
      config      vqvae.py Config fields (vqvae.Config(**config), or `--key value` for train.py --model vqvae);
                  when no exact match exists, the nearest: Ds rounded, then Ks rounded
      exact       True when both budgets are equal exactly
      continuous  (single-level, two-level) budgets of `config`;  discrete  the same for the codebooks
      message     one line saying which, with the numbers
    A config with no exact match is not an error: the caller decides (train.py can run the nearest one)."""
    ds = cfg.downsample if downsample is None else downsample
    if cfg.image_size % (2 * cfg.downsample) or cfg.image_size % ds:
        raise ValueError(f"image_size {cfg.image_size} must be divisible by 2 x downsample ({2 * cfg.downsample}) and "
                         f"by the single-level downsample ({ds})")
    hb = cfg.image_size // cfg.downsample  # bottom side; the top side is hb / 2
    ht, hs = hb // 2, cfg.image_size // ds
    continuous_h = (hb * hb + ht * ht) * cfg.code_dim
    discrete_h = 2 * cfg.codebook_size * cfg.code_dim
    d = Fraction(continuous_h, hs * hs)  # Ds as the budgets want it
    k = discrete_h / d  # Ks
    exact = d.denominator == 1 and k.denominator == 1
    D = max(1, round(d))
    K = max(1, round(Fraction(discrete_h, D)))
    config = {f.name: getattr(cfg, f.name) for f in fields(cfg)}  # vqvae.py's Config has the same fields
    config.update(downsample=ds, codebook_size=K, code_dim=D)
    continuous, discrete = (hs * hs * D, continuous_h), (K * D, discrete_h)
    budgets = (f"continuous {hs}x{hs}x{D} = {continuous[0]} vs {hb}x{hb}x{cfg.code_dim} + {ht}x{ht}x{cfg.code_dim} = "
               f"{continuous[1]}, discrete {K}x{D} = {discrete[0]} vs 2x{cfg.codebook_size}x{cfg.code_dim} = "
               f"{discrete[1]}")
    if exact:
        message = f"exact match: vqvae K = {K}, D = {D} on the {hs}x{hs} grid; {budgets}"
    else:
        message = (f"no exact match: the budgets want D = {float(d):g} and K = {float(k):g}, not whole numbers; "
                   f"nearest vqvae K = {K}, D = {D} on the {hs}x{hs} grid; {budgets}")
    return {"config": config, "exact": exact, "continuous": continuous, "discrete": discrete, "message": message}


if __name__ == "__main__":
    # python vqvae2.py [train.py settings]: prints the train.py command of the capacity-matched single-level model.
    # The settings resolve as train.py resolves them (dataset, PRESETS, command line); the code above needs torch only.
    import dataclasses
    import sys

    import train

    tcfg, cfg, _, _ = train.resolve_config(["--model", "vqvae2", *sys.argv[1:]])
    match = matched_single_level(cfg)
    print(match["message"])
    # equal training: the settings of this run that differ from train.py's defaults, and those presets set
    defaults = train.TrainConfig()
    keys = [f.name for f in dataclasses.fields(tcfg) if f.name not in ("model", "out_dir", "resume") and
            (getattr(tcfg, f.name) != getattr(defaults, f.name) or f.name in ("batch_size", "max_iters", "lr"))]
    args = [f"--{k} {getattr(tcfg, k)}" for k in keys] + [f"--{k} {v}" for k, v in match["config"].items()]
    print("python train.py --model vqvae " + " ".join(args))
