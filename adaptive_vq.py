"""
Adaptive choice among codebooks of equal capacity N x D.

Paper: "Balance of Number of Embedding and their Dimensions in Vector Quantization", 2024 (arXiv:2407.04939).

The idea. A codebook of N codes of D dims holds W = N * D numbers: few long codes ([512, 128]) or many short ones
([65536, 1]). Codebook i quantizes the 128 / D_i pieces of the encoder's 128-dim vector with its N_i codes (EMA) and
joins them into a candidate. The paper finds that reconstruction improves as N grows, up to a point, and lets every
vector choose: attention between the vector (query) and the candidates (keys) scores the codebooks, and a hard,
straight-through Gumbel-softmax picks one. `fixed = N` runs [N, W / N] alone: the baseline sweep.

    x -> Encoder -> z (B, h, w, 128) -> per codebook: cut, quantize, join -> candidates
      -> attention(z, candidates) -> Gumbel-softmax, hard -> chosen candidate -> Decoder

Where this departs from the paper (most are choices it leaves open):
- encoder and decoder: VQ-VAE's (the paper's "CNN + ResNet" is unspecified);
- selector: the 4 heads' attention weights are averaged; each key adds a learned per-codebook embedding;
- temperature: exponential decay, high early so every score gets gradient, low late so the soft sample nears the hard;
- every codebook learns by EMA from every vector, chosen or not: none starves, all ranks run the same collectives;
- commitment pulls a vector only toward its chosen candidate, not toward codebooks it does not use;
- rate_weight: an optional penalty on the chosen codebook's bits;
- evaluation takes the highest score without noise, so encode/decode and forward agree;
- exact fast searches: binary search for D = 1, grid cells for D = 2 on a CPU;
- CPU presets: W = 4096, not 65,536 (a sixteenth of the distance work), same eight shapes.

Train it:  python train.py --model adaptive_vq [--dataset mnist --data_dir DIR]    # adaptive, every [N, D]
           python train.py --model adaptive_vq --codebook_sizes 512,4096,65536       # adaptive, a subset
           python train.py --model adaptive_vq --fixed 4096                          # one [N, D] alone
Evaluate:  python eval.py --ckpt out/adaptive_vq_mnist/ckpt.pt --split test
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
    # encoder / decoder (ours: VQ-VAE's)
    hidden: int = 128  # channels of the main path
    res_blocks: int = 2  # residual blocks per side
    res_hidden: int = 32  # channels inside a residual block
    downsample: int = 4  # image side / latent side; a power of 2
    # the codebooks, all of capacity W = N * D
    vector_dim: int = 128  # paper: 128; vector_dim / D pieces for codebook [N, D]
    capacity: int = 65536  # paper: W = 65,536
    codebook_sizes: tuple[int, ...] = ()  # the N's (D = W / N); () is every power-of-2 D dividing vector_dim
    fixed: int = 0  # N of one codebook alone (the paper's baseline); 0 is adaptive
    # codebook selection
    heads: int = 4  # ours: the paper gives no number
    temp_start: float = 1.0  # ours: Gumbel-softmax temperature at step 0
    temp_end: float = 0.0625  # ours: the temperature from temp_anneal_iters on
    temp_anneal_iters: int = 25000  # ours: steps of the exponential decay
    rate_weight: float = 0.0  # ours: loss += rate_weight * chosen bits per vector / vector_dim
    # each codebook's quantizer (paper: EMA; init and dead-code reset as in vqvae.py)
    beta: float = 0.25  # commitment weight (VQ-VAE)
    decay: float = 0.99  # EMA decay (VQ-VAE)
    eps: float = 1e-5  # Laplace smoothing of the EMA counts
    init: str = "kmeans"  # "kmeans" | "data" (samples of the first batch) | "random" (N(0, 1))
    kmeans_iters: int = 10  # Lloyd iterations of the k-means init
    dead_code_threshold: float = 2.0  # reset codes used fewer times per window; 0 disables
    dead_code_window: int = 10  # batches per window


# Per-dataset settings (Config or train.py fields), over the defaults, under the command line.
_CPU = dict(hidden=64, res_hidden=32, capacity=4096, batch_size=32, lr=1e-3, max_iters=1500, warmup_iters=50,
            temp_anneal_iters=1500, eval_interval=500, eval_batches=10)
PRESETS = {
    "shapes": dict(_CPU),
    "mnist": dict(_CPU),  # 28x28 -> a 7x7 grid of 128-dim vectors
    "fashion_mnist": dict(_CPU),
    "cifar10": dict(batch_size=128, lr=3e-4, max_iters=50000, temp_anneal_iters=50000),
    "celeba": dict(batch_size=128, lr=3e-4, max_iters=100000, temp_anneal_iters=100000),
}


# One codebook [N, D]

class CodebookQuantizer(nn.Module):
    """EMA vector quantizer (VQ-VAE, arXiv:1711.00937, appendix A.1) with data init and dead-code reset.
    forward(z (P, D)) -> z_q (P, D) straight-through, codes (P,), counts (K,); the caller adds the commitment loss.
    Training updates the codebook, equal on all ranks. Runs in float32: bf16 distances pick other codes.
    Twin: vqvae.py's VectorQuantizer, adapted (EMA only, no loss, fast searches for D <= 2); tests/test_vqvae.py
    and tests/test_search.py check both."""

    search_block = 2 ** 22  # distance entries per chunk (16 MiB), whatever N and K are
    cells_on_cpu = True  # D = 2 on a CPU: the cell path

    def __init__(self, codebook_size, dim, decay=0.99, eps=1e-5, init="kmeans", kmeans_iters=10,
                 dead_code_threshold=2.0, dead_code_window=10):
        super().__init__()
        if init not in ("kmeans", "data", "random"):
            raise ValueError(f"init must be 'kmeans', 'data' or 'random', got {init!r}")
        if not 0 <= decay <= 1:  # an EMA weight (1: it never moves); outside [0, 1] it diverges
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.codebook_size, self.dim, self.decay, self.eps = codebook_size, dim, decay, eps
        self.init, self.kmeans_iters = init, kmeans_iters
        self.dead_code_threshold, self.dead_code_window = dead_code_threshold, dead_code_window
        codebook = torch.randn(codebook_size, dim)  # replaced from data on the first batch unless init="random"
        self.register_buffer("codebook", codebook)  # moved by EMA, not by the optimizer
        self.register_buffer("ema_count", torch.ones(codebook_size))  # N_k, EMA of assignment counts
        self.register_buffer("ema_sum", codebook.clone())  # m_k, EMA of the sums of assigned vectors
        self.register_buffer("usage", torch.zeros(codebook_size))  # assignments in this dead-code window
        self.register_buffer("window_step", torch.zeros((), dtype=torch.long))  # batches seen in the window
        self.register_buffer("initialized", torch.tensor(init == "random"))
        # host copies, read once after construction or loading: a step reads nothing back from a GPU
        self._host_initialized = self._host_window_step = None

    # -- the core: nearest code

    def forward(self, z):
        with torch.autocast(device_type=z.device.type, enabled=False):  # the fp32 island
            z = z.float()  # (P, D)
            if self.training and self._host_initialized is None:  # once after construction or loading
                self._host_initialized, self._host_window_step = bool(self.initialized), int(self.window_step)
            if self.training and not self._host_initialized:
                self._init_codebook(z.detach())
            codes = self.nearest(z)  # (P,)
            e = self.lookup(codes)  # (P, D), a copy: the update below does not change it
            # straight-through: exactly e forward, the gradient to z unchanged
            z_q = e + (z - z.detach())
            counts = self._counts(codes)  # (K,), this rank's batch
            if self.training:  # after the lookup, so the caller's losses see e
                self._update(z.detach(), codes, counts)
        return z_q, codes, counts

    def nearest(self, z, codebook=None):
        """Nearest code (P,) for each row of z (P, D), exact up to float32 rounding, with no (P, K) matrix; float32
        under any autocast too (eval.py searches under its autocast)."""
        e = (self.codebook if codebook is None else codebook).detach().float()  # (K, D)
        z = z.detach().float()
        with torch.autocast(device_type=z.device.type, enabled=False):
            if self.dim == 1:
                return self._nearest_sorted(z[:, 0], e[:, 0])
            if self.dim == 2 and z.device.type == "cpu" and self.cells_on_cpu:
                return self._nearest_cells(z, e)
            return self._nearest_chunked(z, e)

    def _nearest_chunked(self, z, e):
        """Distances in chunks of rows, at most `search_block` entries each, whatever P and K are."""
        e_sq = (e * e).sum(-1)  # (K,)
        P, K = z.shape[0], e.shape[0]
        chunk = min(P, max(1, self.search_block // K))  # rows per chunk
        codes = torch.empty(P, dtype=torch.long, device=z.device)
        d = self._buffer(chunk, K, z.device)  # reused by every chunk
        for i in range(0, P, chunk):
            zc = z[i:i + chunk]  # (c, D)
            dc = d[:zc.shape[0]]
            # ||z||^2 does not change the argmin: d = ||e||^2 - 2 z.e
            torch.addmm(e_sq, zc, e.t(), alpha=-2.0, out=dc)  # (c, K)
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

    def _nearest_cells(self, z, e, per_cell=256):
        """D = 2, in fewer than P * K distances: sort z into grid cells and compare each cell only with the codes
        that can be nearest to a point of its box. Reads sizes on the host, so a GPU (or a z that is not finite)
        takes the chunked path."""
        if not bool(torch.isfinite(z).all()):
            return self._nearest_chunked(z, e)
        P = z.shape[0]
        G = max(1, round(math.sqrt(P / per_cell)))  # G x G cells
        lo, hi = z.min(0).values, z.max(0).values
        cell = ((z - lo) / ((hi - lo) / G).clamp(min=1e-30)).floor().long().clamp(0, G - 1)  # (P, 2)
        key = cell[:, 0] * G + cell[:, 1]  # (P,)
        e_sq = (e * e).sum(-1)  # (K,)
        slack = 1e-5 * (z.abs().max() ** 2 + e.abs().max() ** 2)  # above float32 rounding of ||e||^2 - 2 z.e
        codes = torch.empty(P, dtype=torch.long)
        threads = torch.get_num_threads()
        # one thread: per-cell operations are too small to share
        torch.set_num_threads(1)
        try:
            for rows in key.argsort().split(torch.bincount(key, minlength=G * G).tolist()):
                if len(rows) == 0:
                    continue
                zc = z[rows]  # (c, 2)
                box_lo, box_hi = zc.min(0).values, zc.max(0).values
                near = ((box_lo - e).clamp(min=0) + (e - box_hi).clamp(min=0)).pow(2).sum(-1)  # (K,) box to code
                far = torch.maximum(e - box_lo, box_hi - e).pow(2).sum(-1)  # (K,) farthest point of the box
                candidates = (near <= far.min() + slack).nonzero()[:, 0]  # (k,) in index order: ties to the lowest
                d = torch.addmm(e_sq[candidates], zc, e[candidates].t(), alpha=-2.0)  # (c, k)
                codes[rows] = candidates[d.argmin(-1)]
        finally:
            torch.set_num_threads(threads)
        return codes

    @staticmethod
    def _nearest_sorted(z, e):
        """D = 1: binary search in the sorted codes e (K,) for each z (P,), O(P log K) instead of P * K. Ties go to
        the lowest index, as in the other searches."""
        K = e.shape[0]
        if K == 1:
            return torch.zeros_like(z, dtype=torch.long)
        values, order = e.sort(stable=True)  # (K,), (K,): equal values in index order
        lowest = order[torch.searchsorted(values, values)]  # (K,) per sorted position, the lowest index of its value
        right = torch.searchsorted(values, z).clamp(1, K - 1)  # (P,) first code >= z (clamped into 1..K-1)
        # distances to the codes on either side (one is negative when z lies outside the codes: the other side wins)
        gap_left, gap_right = z - values[right - 1], values[right] - z  # (P,)
        left, right = lowest[right - 1], lowest[right]  # (P,)
        return torch.where(gap_left < gap_right, left,
                           torch.where(gap_right < gap_left, right, torch.minimum(left, right)))

    def lookup(self, codes):  # (...) -> (..., D)
        return self.codebook[codes]

    # -- fitting the codebook to data (training; the same collectives on all ranks)

    @torch.no_grad()
    def _update(self, z, codes, counts):
        counts = self._all_reduce(counts.clone())  # (K,) over all ranks
        sums = torch.zeros_like(self.codebook).index_add_(0, codes, z)  # (K, D)
        sums = self._all_reduce(sums)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # Laplace smoothing: an unused code's count stays above zero
        n = self.ema_count.sum()
        count = (self.ema_count + self.eps) / (n + self.codebook_size * self.eps) * n  # (K,)
        self.codebook.copy_(self.ema_sum / count[:, None])
        if self.dead_code_threshold > 0:
            self.usage.add_(counts)
            self.window_step.add_(1)
            self._host_window_step += 1
            if self._host_window_step >= self.dead_code_window:
                self._reset_dead_codes(z)

    @torch.no_grad()
    def _reset_dead_codes(self, z):
        """Move each code used under `dead_code_threshold` times in the window onto a random piece (of any rank),
        with its EMA count and sum, or the next EMA step would drag it back."""
        dead = self.usage < self.dead_code_threshold  # (K,), equal on all ranks: usage is all-reduced
        z = self._gather(z)  # (world * P, D)
        # K candidates, used where a code is dead: no data-dependent branch or collective
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
        """From the first batch: k-means on (or a sample of) all ranks' pieces, broadcast from rank 0."""
        z = self._gather(z)  # (world * P, D)
        idx = torch.randperm(z.shape[0], device=z.device)[:self.codebook_size]
        if idx.numel() < self.codebook_size:  # fewer pieces than codes: sample with replacement
            idx = torch.randint(0, z.shape[0], (self.codebook_size,), device=z.device)
        codebook = z[idx].clone()  # (K, D)
        if self.init == "kmeans":  # Lloyd's iterations
            for _ in range(self.kmeans_iters):
                codes = self.nearest(z, codebook)
                counts = self._counts(codes)[:, None]  # (K, 1)
                sums = torch.zeros_like(codebook).index_add_(0, codes, z)  # (K, D)
                # an empty cluster keeps its previous centre
                codebook = torch.where(counts > 0, sums / counts.clamp(min=1), codebook)
        self._broadcast(codebook)
        self.codebook.copy_(codebook)
        self.ema_sum.copy_(codebook)  # with ema_count = 1: the EMA starts at the new codebook
        self.ema_count.fill_(1.0)
        self.initialized.fill_(True)
        self._host_initialized = True

    # -- machinery

    def _counts(self, codes):
        """Assignments per code, (K,); not torch.bincount, which on a GPU reads the largest index to the host."""
        ones = torch.ones(codes.shape[0], device=codes.device)
        return torch.zeros(self.codebook_size, device=codes.device).index_add_(0, codes, ones)

    @staticmethod
    def _buffer(rows, K, device):
        """The distance buffer (rows, K); its own method so that a test can see its size."""
        return torch.empty(rows, K, device=device)

    # Collectives: no-ops without a process group, so they are called unconditionally.
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
    def _gather(z):  # (P, D) from each rank -> (world * P, D) on all; P equal on all ranks
        if not (dist.is_available() and dist.is_initialized()):
            return z
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        return torch.cat(parts)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_initialized = self._host_window_step = None  # the loaded buffers hold the truth now


# Choosing a codebook per vector

class CodebookSelector(nn.Module):
    """Scores candidate i of a vector by log mean_h softmax_i(q_h . k_ih / sqrt(d_h)): the vector is the query, the
    candidate plus its codebook's learned embedding the key."""

    def __init__(self, dim, n, heads):
        super().__init__()
        if dim % heads:
            raise ValueError(f"vector_dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.codebook_embedding = nn.Parameter(torch.zeros(n, dim))

    def forward(self, z, candidates):
        """z (M, V), candidates (M, n, V) -> log attention weights (M, n)."""
        M, n, V = candidates.shape
        q = self.query(z).view(M, 1, self.heads, -1)  # (M, 1, H, V/H)
        k = self.key(candidates + self.codebook_embedding).view(M, n, self.heads, -1)  # (M, n, H, V/H)
        attn = ((q * k).sum(-1) / math.sqrt(V // self.heads)).softmax(1)  # (M, n, H), over the candidates
        return attn.mean(-1).clamp(min=1e-20).log()  # (M, n)


def gumbel_softmax_hard(logits, tau):
    """Hard, straight-through Gumbel-softmax (arXiv:1611.01144): logits (M, n) -> a one-hot sample with the soft
    sample's gradient. tau is a tensor, never read to the host (unlike F.gumbel_softmax's)."""
    g = -torch.empty_like(logits).exponential_().log()  # -log of an Exp(1) draw is Gumbel(0, 1)
    soft = ((logits + g) / tau).softmax(-1)  # (M, n)
    hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)  # (M, n), one-hot
    return hard - soft.detach() + soft  # hard in value (up to rounding), soft in gradient


def temperature_at(step, cfg):
    """temp_start * (temp_end / temp_start)^(step / temp_anneal_iters), then temp_end."""
    frac = min(step / max(cfg.temp_anneal_iters, 1), 1.0)
    return cfg.temp_start * (cfg.temp_end / cfg.temp_start) ** frac


# The configurations [N, D] and the pieces of a vector

def codebook_shapes(cfg):
    """cfg's configurations [(N, D), ...], smallest N first, checked."""
    W, V = cfg.capacity, cfg.vector_dim
    if cfg.fixed:
        sizes = (cfg.fixed,)
    elif cfg.codebook_sizes:
        sizes = tuple(sorted(set(cfg.codebook_sizes)))
    else:
        sizes = tuple(W // 2 ** i for i in range(int(math.log2(V)), -1, -1) if W % 2 ** i == 0)
    shapes = []
    for n in sizes:
        if n < 1 or W % n or V % (W // n):
            raise ValueError(f"codebook size N = {n} does not fit: N must divide the capacity W = {W} and "
                             f"D = W / N must divide vector_dim = {V}")
        shapes.append((n, W // n))
    if not shapes:
        raise ValueError(f"no codebook fits capacity {W} with vector_dim {V}")
    return shapes


def split_pieces(z, d):
    """(M, V) -> (M * V / d, d): piece j of vector m is z[m, j*d:(j+1)*d], at row m * V/d + j. A view."""
    return z.reshape(-1, d)


def join_pieces(pieces, v):
    """(M * V / d, d) -> (M, V): the inverse of split_pieces."""
    return pieces.reshape(-1, v)


# Encoder and decoder (VQ-VAE, section 4.1)

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
    """Encoder -> a CodebookQuantizer per [N, D] -> the selector's choice of candidate -> Decoder."""

    def __init__(self, cfg):
        super().__init__()
        sizes = ("image_size", "in_channels", "hidden", "res_hidden", "vector_dim", "capacity", "heads",
                 "dead_code_window")
        small = [f"{k} {getattr(cfg, k)}" for k in sizes if getattr(cfg, k) < 1]
        if small:  # a 0 would fail later, far from its cause
            raise ValueError(f"these sizes must be at least 1: {', '.join(small)}")
        if cfg.downsample < 2 or cfg.downsample & (cfg.downsample - 1):
            raise ValueError(f"downsample must be a power of 2 and at least 2, got {cfg.downsample}")
        if cfg.image_size % cfg.downsample:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by downsample {cfg.downsample}")
        self.cfg = cfg
        self.shapes = codebook_shapes(cfg)  # [(N, D), ...]
        self.names = [f"{n}x{d}" for n, d in self.shapes]
        bits = [cfg.vector_dim // d * math.log2(n) for n, d in self.shapes]  # per vector, each codebook
        self.register_buffer("bits", torch.tensor(bits), persistent=False)  # (n,)
        self.encoder = Encoder(cfg)
        self.pre_quant = nn.Conv2d(cfg.hidden, cfg.vector_dim, 1)
        self.quantizers = nn.ModuleList(
            CodebookQuantizer(n, d, decay=cfg.decay, eps=cfg.eps, init=cfg.init, kmeans_iters=cfg.kmeans_iters,
                              dead_code_threshold=cfg.dead_code_threshold, dead_code_window=cfg.dead_code_window)
            for n, d in self.shapes)
        # one codebook: no selector, so no unused parameters under DDP
        self.selector = CodebookSelector(cfg.vector_dim, len(self.shapes), cfg.heads) if self.adaptive else None
        self.post_quant = nn.Conv2d(cfg.vector_dim, cfg.hidden, 1)
        self.decoder = Decoder(cfg)
        # set by set_step; a buffer, so a resumed run continues with it
        self.register_buffer("temperature", torch.tensor(float(cfg.temp_start)))

    @property
    def adaptive(self):
        return len(self.shapes) > 1

    def set_step(self, step):
        """train.py's hook before every optimizer step: sets this step's temperature."""
        self.temperature.fill_(temperature_at(step, self.cfg))

    def _latents(self, x):
        """(B, C, H, W) -> encoder vectors (B, h, w, V), channels last."""
        return self.pre_quant(self.encoder(x)).permute(0, 2, 3, 1)

    def _decode_latents(self, z_q):
        """(B, h, w, V) -> (B, C, H, W)"""
        return self.decoder(self.post_quant(z_q.permute(0, 3, 1, 2)))

    def _candidates(self, z):
        """z (M, V) -> candidates (M, n, V), codes (M, V / D_i) per codebook, mean code perplexity of the batch."""
        V = self.cfg.vector_dim
        candidates, codes, perplexities = [], [], []
        for quantizer, (n, d) in zip(self.quantizers, self.shapes):
            z_q, c, counts = quantizer(split_pieces(z, d))  # (M * V/d, d), (M * V/d,), (N,)
            candidates.append(join_pieces(z_q, V))  # (M, V)
            codes.append(c.view(-1, V // d))  # (M, V/d)
            p = counts / counts.sum()
            perplexities.append(torch.exp(-(p * torch.log(p + 1e-10)).sum()))
        return torch.stack(candidates, 1), codes, torch.stack(perplexities).mean()

    def _choose(self, z, candidates):
        """One-hot choice (M, n) of a candidate per vector: the hard Gumbel-softmax in training, the highest score
        in eval."""
        M, n = candidates.shape[:2]
        if not self.adaptive:
            return torch.ones(M, 1, device=z.device, dtype=candidates.dtype)
        logits = self.selector(z, candidates)  # (M, n)
        if self.training:
            return gumbel_softmax_hard(logits, self.temperature)
        return torch.zeros_like(logits).scatter_(1, logits.argmax(1, keepdim=True), 1.0)  # (M, n), one-hot

    def _quantize(self, z):
        """z (M, V) -> z_q (M, V) the chosen candidate, choice (M, n), candidates (M, n, V), codes, perplexity."""
        with torch.autocast(device_type=z.device.type, enabled=False):  # scores and choice in float32 as well
            z = z.float()
            candidates, codes, perplexity = self._candidates(z)  # (M, n, V)
            y = self._choose(z, candidates)  # (M, n)
            # exactly the chosen candidate; the gradient reaches y through <dL/dz_q, candidate_i>
            z_q = (y.unsqueeze(-1) * candidates).sum(1)  # (M, V)
        return z_q, y, candidates, codes, perplexity.detach()

    def forward(self, x):
        z = self._latents(x)  # (B, h, w, V)
        B, h, w, V = z.shape
        z_flat = z.reshape(-1, V)  # (M, V)
        z_q, y, candidates, _, perplexity = self._quantize(z_flat)
        x_hat = self._decode_latents(z_q.view(B, h, w, V))  # (B, C, H, W)
        recon = F.mse_loss(x_hat.float(), x.float())
        # commitment beta * ||z - sg(e)||^2 to the chosen candidate only (the codebooks move by EMA)
        per_candidate = ((z_flat.float().unsqueeze(1) - candidates.detach()) ** 2).mean(-1)  # (M, n)
        commit = (y.detach() * per_candidate).sum(1).mean()
        # (V / D) log2 N bits per vector, per dim: without it the selector takes the finest codebook
        rate = (y * self.bits).sum(1).mean() / V
        stats = {"recon": recon.detach(), "commit": commit.detach(), "perplexity": perplexity,
                 "bits": rate.detach() * V}
        if self.adaptive:
            stats["temperature"] = self.temperature.detach().clone()
            freq = y.detach().mean(0)  # (n,)
            stats.update({f"choice_{name}": freq[i] for i, name in enumerate(self.names)})
        return x_hat, recon + self.cfg.beta * commit + self.cfg.rate_weight * rate, stats

    @torch.no_grad()
    def encode(self, x):
        """(B, C, H, W) -> (choice (B, h, w), codes (B, h, w, V): the chosen codebook's V / D codes, padded with
        -1), forward's choice in eval mode, in either mode: no EMA step, no Gumbel draw."""
        training = self.training
        self.eval()
        try:
            z = self._latents(x)  # (B, h, w, V)
            _, y, _, codes, _ = self._quantize(z.reshape(-1, z.shape[-1]))
        finally:
            self.train(training)
        B, h, w, V = z.shape
        choice = y.argmax(1)  # (M,)
        out = torch.full((B * h * w, V), -1, dtype=torch.long, device=z.device)
        for i, c in enumerate(codes):  # (M, V/D_i)
            rows = choice == i
            out[rows, :c.shape[1]] = c[rows]
        return choice.view(B, h, w), out.view(B, h, w, V)

    @torch.no_grad()
    def decode(self, codes):
        """(choice, codes) as encode gives them -> (B, C, H, W)."""
        choice, codes = codes
        B, h, w, V = codes.shape
        choice, codes = choice.reshape(-1), codes.reshape(-1, V)  # (M,), (M, V)
        z_q = torch.zeros(B * h * w, V, device=codes.device)
        for i, (quantizer, (n, d)) in enumerate(zip(self.quantizers, self.shapes)):
            rows = choice == i
            z_q[rows] = join_pieces(quantizer.lookup(codes[rows, :V // d]), V)  # (m, V/d, d) -> (m, V)
        return self._decode_latents(z_q.view(B, h, w, V))

    def code_layout(self):
        """For prior.py: refused, as a position's code count depends on its codebook."""
        raise ValueError("adaptive_vq: its codes are no fixed-length sequence (each position has V / D codes of the "
                         "codebook it chooses), so prior.py cannot model them")

    @torch.no_grad()
    def latents(self, x):
        """For eval.py: {"<N>x<D>": (codebook (N, D), pieces (P, D), codes (P,))} per codebook, over every vector."""
        V = self.cfg.vector_dim
        z = self._latents(x).reshape(-1, V).float()  # (M, V)
        out = {}
        for name, quantizer, (n, d) in zip(self.names, self.quantizers, self.shapes):
            pieces = split_pieces(z, d)  # (M * V/d, d)
            out[name] = (quantizer.codebook.detach().float(), pieces, quantizer.nearest(pieces))
        return out

    def eval_stats(self, x):
        """For eval.py, batch means: choice/<N>x<D>, bits, quant_error ||z - z_q||^2 / V (also per codebook), and
        grad_gap, per image ||dl/dz_q - dl/dz||: the straight-through gradient against the continuous z's
        (grad_gap_rel: over ||dl/dz||). Enables gradients itself."""
        z = self._latents(x).detach().contiguous()  # (B, h, w, V), laid out as z_q: the same decoder arithmetic
        B, h, w, V = z.shape
        z_q, y, candidates, _, _ = self._quantize(z.reshape(-1, V))
        z_flat = z.reshape(-1, 1, V).float()
        per_candidate = ((z_flat - candidates) ** 2).mean(-1)  # (M, n)
        out = {"quant_error": (y * per_candidate).sum(1).mean(), "bits": (y * self.bits).sum(1).mean()}
        for i, name in enumerate(self.names):
            out[f"quant_error/{name}"] = per_candidate[:, i].mean()
            if self.adaptive:
                out[f"choice/{name}"] = y[:, i].mean()
        grads = []
        for latent in (z_q.view(B, h, w, V), z.float()):  # straight-through, then continuous
            with torch.enable_grad():
                latent = latent.detach().requires_grad_(True)
                per_image = ((self._decode_latents(latent).float() - x.float()) ** 2).flatten(1).mean(1)  # (B,)
                # summed: each image's gradient is that of its own loss
                grads.append(torch.autograd.grad(per_image.sum(), latent)[0].flatten(1))  # (B, h*w*V)
        gap = (grads[0] - grads[1]).norm(dim=1)  # (B,)
        out["grad_gap"] = gap.mean()
        out["grad_gap_rel"] = (gap / grads[1].norm(dim=1).clamp(min=1e-12)).mean()
        return out
