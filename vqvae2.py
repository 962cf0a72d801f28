"""
Two-level VQ-VAE (VQ-VAE-2), against the single-level vqvae.py at matched capacity.

Papers: "Generating Diverse High-Fidelity Images with VQ-VAE-2", Razavi et al., 2019 (arXiv:1906.00446); "Is
Hierarchical Quantization Essential for Optimal Reconstruction?", 2026 (arXiv:2601.22244).

The idea. A bottom encoder maps the image to a grid 4 times smaller, a top encoder halves it again. The top level is
quantized first; its codes, decoded to the bottom grid and joined to the bottom features, feed the bottom quantizer,
so the bottom codes need only carry what the top codes do not. The decoder sees both levels. The hierarchy paper
compares this with one level at equal budgets (floats in the quantized maps, floats in the codebooks):
matched_single_level gives the vqvae.py settings that match a config.

Where this departs from the papers:
  - both quantizers are vqvae.py's, with its collapse mitigations (k-means initialisation, dead-code reset), so
    that only the hierarchy differs;
  - the presets use D = 8 (VQ-VAE-2: 64); no PixelCNN priors (prior.py instead);
  - the matching counts a map's channels C as the code dimension (the quantized map is all the decoder receives)
    and puts the single level on the bottom grid; the hierarchy paper says neither.

Train it:  python train.py --model vqvae2 [--dataset mnist --data_dir DIR]
Match it:  python vqvae2.py [--dataset mnist --data_dir DIR]   # prints the matched vqvae command
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
    # data (train.py fills these)
    image_size: int = 32
    in_channels: int = 3
    # encoders / decoders
    hidden: int = 128  # channels of the main paths
    res_blocks: int = 2  # per encoder and decoder
    res_hidden: int = 32  # channels inside a residual block
    downsample: int = 4  # image side / bottom side (VQ-VAE-2); the top side is half that
    # quantizers: one K_h x D_h codebook per level
    codebook_size: int = 512  # K_h (VQ-VAE-2)
    code_dim: int = 64  # D_h (VQ-VAE-2; the presets: 8)
    beta: float = 0.25  # commitment weight (VQ-VAE-2)
    ema: bool = True  # EMA codebooks (VQ-VAE-2); False: learned by ||sg(z) - e||^2
    decay: float = 0.99  # EMA decay (VQ-VAE-2)
    eps: float = 1e-5  # Laplace smoothing of the EMA counts
    init: str = "kmeans"  # "kmeans" | "data" | "random" (the baseline)
    kmeans_iters: int = 10
    dead_code_threshold: float = 2.0  # reset codes used fewer times per window (hierarchy paper: 2); 0: off
    dead_code_window: int = 10  # batches per window (hierarchy paper: 10)


# Per-dataset settings (Config or train.py fields) over the defaults, under the command line: training as vqvae.py's;
# D_h = 8 and K_h = 5/8 of its K match it exactly; MNIST is resized to 32 (a side divisible by 8).
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



# Encoders and decoders (VQ-VAE, section 4.1): vqvae.py's, for any channels

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
    """VQ-VAE-2, figure 2a:

      x -> bottom encoder (/downsample) -> h_b -> top encoder (/2) -> 1x1 to D -> top quantizer -> q_t
      [h_b, top decoder(q_t) (x2)] -> 1x1 to D -> bottom quantizer -> q_b
      [upsample(q_t) (x2), q_b] -> 1x1 to hidden -> decoder (x downsample) -> x_hat"""

    def __init__(self, cfg):
        super().__init__()
        sizes = ("image_size", "in_channels", "hidden", "res_hidden", "codebook_size", "code_dim", "dead_code_window")
        small = [f"{k} {getattr(cfg, k)}" for k in sizes if getattr(cfg, k) < 1]
        if small:  # else they fail far from their cause
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
        self.dec_t = Decoder(D, h, *blocks, D, 2)  # for the bottom quantizer
        self.pre_quant_b = nn.Conv2d(h + D, D, 1)  # joins the bottom features and the decoded top codes
        self.quant_b = VectorQuantizer(cfg.codebook_size, D, **quantizer)
        self.upsample_t = nn.ConvTranspose2d(D, D, 4, stride=2, padding=1)  # for the decoder
        self.post_quant = nn.Conv2d(2 * D, h, 1)
        self.decoder = Decoder(h, h, *blocks, cfg.in_channels, cfg.downsample)

    def forward(self, x):
        h_b, z_t = self._top(x)
        q_t, _, loss_t, stats_t = self.quant_t(z_t)  # (B, Ht, Wt, D)
        q_b, _, loss_b, stats_b = self.quant_b(self._bottom(h_b, q_t))  # (B, Hb, Wb, D)
        x_hat = self._decode_latents(q_t, q_b)  # (B, C, H, W)
        recon = F.mse_loss(x_hat.float(), x.float())
        stats = {"recon": recon.detach(),
                 "commit": stats_t["commit"] + stats_b["commit"],
                 "perplexity": stats_t["perplexity"] + stats_b["perplexity"],  # of 2 K_h codes
                 **{f"top_{k}": v for k, v in stats_t.items()},
                 **{f"bottom_{k}": v for k, v in stats_b.items()}}
        return x_hat, recon + loss_t + loss_b, stats

    @torch.no_grad()
    def encode(self, x):
        """(B, C, H, W) -> (top codes (B, Ht, Wt), bottom codes (B, Hb, Wb)); the codebooks do not move."""
        _, top, _, bottom = self._encode(x)
        return top, bottom

    @torch.no_grad()
    def decode(self, codes):
        """(top codes, bottom codes) -> (B, C, H, W)"""
        top, bottom = codes
        return self._decode_latents(self.quant_t.lookup(top), self.quant_b.lookup(bottom))

    def code_layout(self):
        """For prior.py: [(code shape, K)], top then bottom."""
        side, K = self.cfg.image_size // self.cfg.downsample, self.cfg.codebook_size
        return [((side // 2, side // 2), K), ((side, side), K)]

    @torch.no_grad()
    def latents(self, x):
        """For eval.py, which reports every metric per level: {"top" / "bottom": (codebook (K, D), pre-quantization
        vectors (N, D), codes (N,))}"""
        z_t, top, z_b, bottom = self._encode(x)
        D = self.cfg.code_dim
        return {"top": (self.quant_t.codebook.detach().float(), z_t.reshape(-1, D).float(), top.flatten()),
                "bottom": (self.quant_b.codebook.detach().float(), z_b.reshape(-1, D).float(), bottom.flatten())}

    def _encode(self, x):
        """-> top vectors (B, Ht, Wt, D), top codes (B, Ht, Wt), and the same at the bottom"""
        D = self.cfg.code_dim
        h_b, z_t = self._top(x)
        top = self.quant_t.nearest(z_t.reshape(-1, D)).reshape(z_t.shape[:-1])
        z_b = self._bottom(h_b, self.quant_t.lookup(top))
        bottom = self.quant_b.nearest(z_b.reshape(-1, D)).reshape(z_b.shape[:-1])
        return z_t, top, z_b, bottom

    def _top(self, x):
        """-> bottom features (B, hidden, Hb, Wb), top vectors (B, Ht, Wt, D)"""
        h_b = self.enc_b(x)
        return h_b, self.pre_quant_t(self.enc_t(h_b)).permute(0, 2, 3, 1)

    def _bottom(self, h_b, q_t):
        """-> bottom vectors (B, Hb, Wb, D)"""
        up = self.dec_t(q_t.permute(0, 3, 1, 2))  # (B, D, Hb, Wb)
        return self.pre_quant_b(torch.cat([h_b, up], 1)).permute(0, 2, 3, 1)

    def _decode_latents(self, q_t, q_b):
        """(B, Ht, Wt, D), (B, Hb, Wb, D) -> (B, C, H, W)"""
        up = self.upsample_t(q_t.permute(0, 3, 1, 2))  # (B, D, Hb, Wb)
        return self.decoder(self.post_quant(torch.cat([up, q_b.permute(0, 3, 1, 2)], 1)))


# Capacity matching (arXiv:2601.22244)

def matched_single_level(cfg, downsample=None):
    """vqvae.py settings matched to the two-level `cfg` (on its bottom grid unless `downsample` is given) by the
    paper's budgets, with C = D:

        continuous  Hs * Ws * Ds = (Hb * Wb + Ht * Wt) * Dh     (floats in the quantized maps)
        discrete    Ks * Ds      = 2 * Kh * Dh                  (floats in the codebooks)

    On the bottom grid Ds = 5/4 Dh and Ks = 8/5 Kh: exact when code_dim is a multiple of 4 and codebook_size of 5.
    Every other setting is copied, so both models get the same mitigations; the budgets say nothing about
    parameters (vqvae2 has more: the top encoder and decoder). Returns {"config", "exact", "continuous", "discrete",
    "message"}, the budgets as (single, two-level); when not exact, config is the nearest (Ds rounded, then Ks): the
    caller decides."""
    ds = cfg.downsample if downsample is None else downsample
    if cfg.image_size % (2 * cfg.downsample) or cfg.image_size % ds:
        raise ValueError(f"image_size {cfg.image_size} must be divisible by 2 x downsample ({2 * cfg.downsample}) and "
                         f"by the single-level downsample ({ds})")
    hb = cfg.image_size // cfg.downsample
    ht, hs = hb // 2, cfg.image_size // ds
    continuous_h = (hb * hb + ht * ht) * cfg.code_dim
    discrete_h = 2 * cfg.codebook_size * cfg.code_dim
    d = Fraction(continuous_h, hs * hs)  # Ds
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
    # the matched train.py command; train is imported here so the model needs torch only
    import dataclasses
    import sys

    import train

    tcfg, cfg, _, _ = train.resolve_config(["--model", "vqvae2", *sys.argv[1:]])
    match = matched_single_level(cfg)
    print(match["message"])
    # the same training: the settings off train.py's defaults, and always batch_size, max_iters and lr
    defaults = train.TrainConfig()
    keys = [f.name for f in dataclasses.fields(tcfg) if f.name not in ("model", "out_dir", "resume") and
            (getattr(tcfg, f.name) != getattr(defaults, f.name) or f.name in ("batch_size", "max_iters", "lr"))]
    args = [f"--{k} {getattr(tcfg, k)}" for k in keys] + [f"--{k} {v}" for k, v in match["config"].items()]
    print("python train.py --model vqvae " + " ".join(args))
