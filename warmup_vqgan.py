"""
VQGAN trained "continuous first, discrete later": an autoencoder warm-up before vector quantization.

Papers: "Continuous First, Discrete Later: VQ-VAEs Without Dimensional Collapse", Zhao, Karagodin et al., 2026
(arXiv:2605.06870); VQGAN, "Taming Transformers for High-Resolution Image Synthesis", Esser et al., 2021
(arXiv:2012.09841): the encoder/decoder, the PatchGAN with hinge loss, the adaptive GAN weight.

The idea. Trained VQ-VAEs are "dimensionally collapsed": their latents and codebooks span a tiny subspace of the code
space. From the first step the quantizer passes on only what log2 K bits can carry, and reverse water-filling says
that is nothing for the directions whose variance lies under the water level theta: the encoder gets no
reconstruction gradient there, so their variance never grows. The fix: train a plain autoencoder (quantizer
bypassed) for `warmup_steps`, so that the encoder first learns a high-rank representation, then switch the quantizer
on. eval.py computes the diagnostics, logged at every validation: eff_dim_99 (the smallest k whose top-k PCA
eigenvalues hold 99% of the variance) and the participation ratio pr, of latents and codebook; waterfill_dim,
#{l_i > theta} with sum_i max(0, 1/2 log2(l_i / theta)) = log2 K, the paper's predicted codebook dimension.

Where this departs from the papers:
  - The switch initialises the codebook by k-means on the warm-up latents. The cold start gets the same k-means and
    respawn, so that the two differ by the warm-up alone; `--switch_init keep --respawn_threshold 0` is taming's.
  - Respawn under respawn_threshold / K usage: our reading of the paper's "threshold scaled inversely with K" (a
    fixed count would call most codes dead at large K).
  - `--switch_rule adaptive` (switch when the prediction stops growing) is ours: the paper leaves the rule open.
  - No LPIPS (it needs downloaded weights); GroupNorm in the discriminator, not BatchNorm (DDP ranks would differ).

Train it:  python train.py --model warmup_vqgan                                  # shapes, warm-up then VQ
           python train.py --model warmup_vqgan --dataset mnist --data_dir DIR --warmup_steps 0   # cold start
Evaluate:  python eval.py --ckpt out/warmup_vqgan_mnist/ckpt.pt --split test
Curves:    python eval.py --curves out/warmup_vqgan_mnist/log.jsonl      # curves.csv and curves.png beside it
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
    # encoder / decoder (taming's layout; the paper's ImageNet VQGAN: 128, [1,1,2,2,4], 2 blocks, 256)
    channels: int = 128  # channels at full resolution
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # per level; the side halves between levels
    res_blocks: int = 2  # per level (the decoder: one more, as in taming)
    attention: bool = True  # at the lowest resolution and in the middle block
    z_channels: int = 256  # the encoder's output channels
    # quantizer (taming's: a learned codebook, not EMA)
    codebook_size: int = 1024  # K (paper: 2^10, 2^14, 2^16)
    code_dim: int = 256  # D (paper: 256)
    beta: float = 0.25  # commitment weight (taming)
    usage_decay: float = 0.99  # of the usage EMA that decides respawns (paper: 0.99)
    respawn_threshold: float = 0.1  # ours: respawn under this fraction of uniform usage 1/K; 0: never
    respawn_every: int = 10  # steps between respawn checks
    kmeans_iters: int = 10  # Lloyd iterations of the switch's k-means (ours)
    switch_init: str = "kmeans"  # codebook at the switch: "kmeans" (ours) | "keep" (taming's uniform start)
    bank_size: int = 65536  # warm-up latents kept per rank, for k-means and water-filling
    # warm-up
    warmup_steps: int = 10000  # AE steps before the switch (paper: 1k-40k); 0 cold start; adaptive's cap
    switch_rule: str = "fixed"  # "fixed" | "adaptive" (ours, see Model.set_step)
    waterfill_every: int = 500  # steps between water-filling predictions; 0: none
    patience: int = 3  # ours: adaptive's predictions in a row without a new maximum
    # discriminator (PatchGAN, hinge loss); disc_weight 0 removes it
    disc_weight: float = 0.8  # taming's ImageNet value; scales the adaptive weight
    disc_start: int = 30000  # GAN off before this step (taming starts late, once recon is good)
    disc_channels: int = 64  # ndf
    disc_layers: int = 3  # stride-2 conv layers of the PatchGAN


# Per-dataset presets (Config fields or train.py settings), over the defaults and under the command line. All use
# VQGAN's Adam betas (0.5, 0.9) and a constant lr; the small ones fit a CPU.
_ADAM = dict(beta1=0.5, beta2=0.9, lr_schedule="constant")
_SMALL = dict(channels=16, ch_mult=(1, 2, 4), res_blocks=1, z_channels=64, code_dim=32, kmeans_iters=10,
              disc_weight=0.0, disc_channels=32, disc_layers=2, waterfill_every=50, **_ADAM)
PRESETS = {
    # the embedded default: 32x32 -> 8x8 latents
    "shapes": dict(_SMALL, codebook_size=1024, warmup_steps=500, batch_size=32, lr=5e-4, max_iters=2000,
                   eval_interval=250),
    # 28x28 -> 7x7 latents. GAN off: the experiment measures the quantizer
    "mnist": dict(_SMALL, codebook_size=1024, warmup_steps=300, batch_size=32, lr=5e-4, max_iters=1000,
                  eval_interval=100),
    "fashion_mnist": dict(_SMALL, codebook_size=1024, warmup_steps=300, batch_size=32, lr=5e-4, max_iters=1000,
                          eval_interval=100),
    "cifar10": dict(channels=64, ch_mult=(1, 2, 2), z_channels=128, code_dim=128, disc_start=20000,
                    disc_layers=2, batch_size=64, lr=2e-4, max_iters=60000, warmup_steps=10000, **_ADAM),
    "celeba": dict(ch_mult=(1, 1, 2, 4), batch_size=32, lr=1e-4, max_iters=100000, **_ADAM),
    "lsun_church": dict(ch_mult=(1, 1, 2, 2, 4), batch_size=16, lr=1e-4, max_iters=200000, **_ADAM),
    "imagenet": dict(batch_size=16, lr=1e-4, max_iters=300000, **_ADAM),
}


# The quantizer

class WarmupQuantizer(nn.Module):
    """VQGAN's quantizer with an autoencoder warm-up and usage-EMA respawn. Needs torch and this file's eigenvalues and
    waterfill.

    Phase 0, warm-up: forward returns z itself and, in training, keeps it in `bank`, a ring buffer. Phase 1, VQ:
    nearest code, straight-through, loss beta * ||z - sg(e)||^2 + ||sg(z) - e||^2. switch(z) goes from 0 to 1.
    Codes whose usage EMA falls under respawn_threshold / K respawn onto encoder outputs at usage 1/K, which gives
    them ln(threshold) / ln(decay) steps to win vectors.
    forward(z (..., D)) -> (z_q, codes or None in warm-up, loss, stats). Under DDP every rank keeps the same
    codebook, usage and phase (ranks must pass equal numbers of vectors). Distances run in float32, autocast off:
    in bf16 some argmins differ.
    """

    search_block = 2 ** 22  # distances per chunk of the search (16 MiB)

    def __init__(self, codebook_size, dim, beta=0.25, usage_decay=0.99, respawn_threshold=0.1, respawn_every=10,
                 kmeans_iters=10, bank_size=65536, switch_init="kmeans"):
        super().__init__()
        if switch_init not in ("kmeans", "keep"):
            raise ValueError(f"switch_init must be 'kmeans' or 'keep', got {switch_init!r}")
        if not 0 <= usage_decay <= 1:  # an EMA weight (1: it never moves); outside [0, 1] it diverges
            raise ValueError(f"usage_decay must be in [0, 1], got {usage_decay}")
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.usage_decay, self.respawn_threshold, self.respawn_every = usage_decay, respawn_threshold, respawn_every
        self.kmeans_iters, self.switch_init = kmeans_iters, switch_init
        # taming's U(-1/K, 1/K)
        self.codebook = nn.Parameter(torch.empty(codebook_size, dim).uniform_(-1 / codebook_size, 1 / codebook_size))
        self.register_buffer("phase", torch.zeros((), dtype=torch.long))  # 0 warm-up, 1 VQ
        self.register_buffer("usage", torch.full((codebook_size,), 1 / codebook_size))  # EMA of assignment fractions
        self.register_buffer("respawn_step", torch.zeros((), dtype=torch.long))  # steps since the last check
        self.register_buffer("bank", torch.zeros(bank_size, dim))  # warm-up latents, a ring buffer
        self.register_buffer("bank_count", torch.zeros((), dtype=torch.long))  # vectors ever written to it
        # host copies of phase and respawn_step (see warming_up)
        self._host_phase = self._host_respawn_step = None

    def forward(self, z):
        if self.warming_up:  # the bypass: z itself, the very tensor
            if self.training:
                self._push(z.detach().float().reshape(-1, self.dim))
            # touches the codebook: DDP expects a gradient for every parameter
            zero = self.codebook.sum() * 0.0
            none = torch.zeros((), device=z.device)
            return z, None, zero, {"commit": none, "perplexity": none, "code_usage": none, "low_usage": none}
        shape = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):  # the fp32 island
            z = z.float().reshape(-1, self.dim)  # (N, D)

            codes = self.nearest(z)  # (N,)
            e = self.codebook[codes]  # (N, D), with gradient to the codebook
            commit = F.mse_loss(z, e.detach())
            loss = self.beta * commit + F.mse_loss(e, z.detach())
            z_q = e.detach() + (z - z.detach())  # straight-through: the value is exactly e
            counts = self._counts(codes)  # (K,) this rank's batch
            if self.training:  # after the loss: respawn changes the codebook
                self._update(z.detach(), counts)
        p = counts / counts.sum()
        stats = {"commit": commit.detach(),
                 "perplexity": torch.exp(-(p * torch.log(p + 1e-10)).sum()),  # of this batch
                 "code_usage": (counts > 0).float().mean(),
                 "low_usage": (self.usage < self.respawn_threshold / self.codebook_size).float().mean()}
        return z_q.reshape(shape), codes.reshape(shape[:-1]), loss, stats

    def nearest(self, z, codebook=None):
        """Nearest code (N,) for each row of z (N, D), in chunks of search_block distances, one reused buffer."""
        e = (self.codebook if codebook is None else codebook).detach().float()  # (K, D)
        z = z.detach().float()
        N, K = z.shape[0], e.shape[0]
        e_sq = (e * e).sum(1)  # (K,)
        chunk = min(N, max(1, self.search_block // K))
        codes = torch.empty(N, dtype=torch.long, device=z.device)
        d = torch.empty(chunk, K, device=z.device)
        for i in range(0, N, chunk):
            zc = z[i:i + chunk]  # (c, D)
            dc = d[:zc.shape[0]]
            # ||z||^2 does not change the argmin
            torch.addmm(e_sq, zc, e.t(), alpha=-2.0, out=dc)  # (c, K)
            codes[i:i + chunk] = self._argmin(dc)
        return codes

    # -- warm-up bank and the switch

    @torch.no_grad()
    def _push(self, z):
        """Write z (N, D) into the ring buffer (its last bank_size rows)."""
        size = self.bank.shape[0]
        z = z[-size:]
        rows = (self.bank_count + torch.arange(z.shape[0], device=z.device)) % size
        self.bank.index_copy_(0, rows, z)
        self.bank_count.add_(z.shape[0])

    def bank_latents(self):
        """The warm-up latents held, (n, D), in ring order."""
        return self.bank[:int(self.bank_count.clamp(max=self.bank.shape[0]))]

    @torch.no_grad()
    def predicted_dim(self):
        """Water-filling dimension at rate log2 K of the bank's covariance, summed over ranks so that every rank
        gets the same. Call it on every rank."""
        z = self.bank_latents().double()  # (n, D)
        stats = torch.cat([z.new_tensor([z.shape[0]]), z.sum(0), (z.t() @ z).flatten()])  # n, sum, sum of outer
        self._all_reduce(stats)
        n, D = stats[0], self.dim
        if n < 2:
            return 0
        mean = stats[1:D + 1] / n
        cov = (stats[D + 1:].view(D, D) - n * torch.outer(mean, mean)) / (n - 1)
        eigs = torch.linalg.eigvalsh(cov).flip(0).clamp(min=0)
        return waterfill(eigs, math.log2(self.codebook_size))[0]

    @torch.no_grad()
    def switch(self, z):
        """End the warm-up. With switch_init "kmeans", k-means on the bank plus z (N, D), this batch, sets every code,
        and the usage EMA starts at the cluster sizes (empty ones respawn at the first check)."""
        if self.switch_init == "kmeans":
            self._kmeans_init(z)
        self.respawn_step.zero_()
        self.phase.fill_(1)
        self._host_phase, self._host_respawn_step = 1, 0

    def _kmeans_init(self, z):
        data = self._gather(torch.cat([self.bank_latents(), z.float()]))  # (n, D), the same on every rank
        idx = torch.randperm(data.shape[0], device=data.device)[:self.codebook_size]
        if idx.numel() < self.codebook_size:  # fewer vectors than codes: draw with replacement
            idx = torch.randint(0, data.shape[0], (self.codebook_size,), device=data.device)
        codebook = data[idx].clone()  # (K, D)
        for _ in range(self.kmeans_iters):  # Lloyd's iterations
            codes = self.nearest(data, codebook)
            counts = self._counts(codes)  # (K,)
            sums = torch.zeros_like(codebook).index_add_(0, codes, data)  # (K, D)
            # an empty cluster keeps its centre, a data vector
            codebook = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], codebook)
        counts = self._counts(self.nearest(data, codebook))
        self._broadcast(codebook)
        self._broadcast(counts)
        self.codebook.copy_(codebook)
        self.usage.copy_(counts / counts.sum())

    # -- usage EMA and respawn (training only; every rank runs the same collectives)

    @torch.no_grad()
    def _update(self, z, counts):
        counts = self._all_reduce(counts.clone())  # (K,) over all ranks
        self.usage.mul_(self.usage_decay).add_(counts / counts.sum(), alpha=1 - self.usage_decay)
        self.respawn_step.add_(1)
        self._host_respawn_step += 1
        if self.respawn_threshold > 0 and self._host_respawn_step >= self.respawn_every:
            self._respawn(z)
            self.respawn_step.zero_()
            self._host_respawn_step = 0

    @torch.no_grad()
    def _respawn(self, z):
        """Move the low-usage codes onto random encoder outputs of all ranks, drawn on rank 0; usage restarts at 1/K."""
        K = self.codebook_size
        low = self.usage < self.respawn_threshold / K  # (K,), equal on all ranks
        z = self._gather(z)  # (world * N, D)
        # always K candidates: no data-dependent branch
        candidates = self._broadcast(z[torch.randint(0, z.shape[0], (K,), device=z.device)])  # (K, D)
        # (Adam's moments are not reset: the optimizer is train.py's)
        self.codebook.copy_(torch.where(low[:, None], candidates, self.codebook))
        self.usage.masked_fill_(low, 1 / K)

    # -- machinery: search helpers, host copies, DDP collectives

    def encode(self, z):
        """(..., D) -> codes (...), changing nothing."""
        return self.nearest(z.reshape(-1, self.dim)).reshape(z.shape[:-1])

    def lookup(self, codes):
        """codes (...) -> code vectors (..., D)"""
        return self.codebook[codes]

    def _counts(self, codes):
        """Assignments per code (K,). Not torch.bincount, which on a GPU reads back the largest index; sums of ones
        are exact whatever the order of atomic adds."""
        ones = torch.ones(codes.shape[0], device=codes.device)
        return torch.zeros(self.codebook_size, device=codes.device).index_add_(0, codes, ones)

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

    @property
    def warming_up(self):
        """From a host copy of `phase`: a read from a GPU would wait for its queued kernels. The buffers stay the
        truth for checkpoints."""
        if self._host_phase is None:  # once after construction or loading
            self._host_phase, self._host_respawn_step = int(self.phase), int(self.respawn_step)
        return self._host_phase == 0

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_phase = self._host_respawn_step = None  # reread from the loaded buffers

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
    def _gather(z):  # (N, D) from every rank -> (world * N, D) on every rank
        if not (dist.is_available() and dist.is_initialized()):
            return z
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        return torch.cat(parts)


# Spectra and water-filling. Twin: eval.py's copies, kept equal by tests/test_twins.py

def eigenvalues(v):
    """Eigenvalues of the covariance of the rows of v (N, D), largest first, in float64."""
    v = v.double()
    v = v - v.mean(0)
    return torch.linalg.eigvalsh(v.t() @ v / max(v.shape[0] - 1, 1)).flip(0).clamp(min=0)


def waterfill(eigs, bits):
    """Reverse water-filling of variances `eigs` at rate `bits`: (#{l_i > theta}, theta). With the k largest active,
    log2 theta = (sum_{i<k} log2 l_i - 2 bits) / k; k is the first whose theta is at least the (k+1)-th eigenvalue."""
    eigs = eigs[eigs > 0].double().sort(descending=True).values
    log_l = eigs.log2()
    for k in range(1, len(eigs) + 1):
        log_theta = (log_l[:k].sum() - 2 * bits) / k
        if k == len(eigs) or log_theta >= log_l[k]:
            return k, float(2 ** log_theta)
    return 0, 0.0


# Encoder and decoder: taming's layout (ResNet blocks, GroupNorm, swish, attention at the lowest resolution)

def Normalize(channels):
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)  # taming: 32 groups; gcd for small widths


class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.block = nn.Sequential(Normalize(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
                                   Normalize(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.block(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over the positions of (B, C, h, w), residual."""

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, h * w).transpose(-1, -2).unbind(1)  # (B, hw, C) each
        out = F.scaled_dot_product_attention(q, k, v)  # (B, hw, C)
        return x + self.proj(out.transpose(-1, -2).reshape(B, C, h, w))


class Downsample(nn.Module):
    """Halve the side: taming pads right and bottom, then a stride-2 3x3 conv without padding."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def middle(c, attention):
    """taming's middle block: ResNet, attention, ResNet."""
    return [ResnetBlock(c, c), AttnBlock(c) if attention else nn.Identity(), ResnetBlock(c, c)]


class Encoder(nn.Module):
    """(B, C, H, W) -> (B, z_channels, H / 2^(levels-1), W / 2^(levels-1))"""

    def __init__(self, cfg):
        super().__init__()
        c = cfg.channels
        layers = [nn.Conv2d(cfg.in_channels, c, 3, padding=1)]
        for i, mult in enumerate(cfg.ch_mult):
            lowest = i == len(cfg.ch_mult) - 1
            for _ in range(cfg.res_blocks):
                layers.append(ResnetBlock(c, cfg.channels * mult))
                c = cfg.channels * mult
                if lowest and cfg.attention:
                    layers.append(AttnBlock(c))
            if not lowest:
                layers.append(Downsample(c))
        layers += middle(c, cfg.attention)
        layers += [Normalize(c), nn.SiLU(), nn.Conv2d(c, cfg.z_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, C, H, W). conv_out is the "last layer" of the adaptive GAN weight."""

    def __init__(self, cfg):
        super().__init__()
        c = cfg.channels * cfg.ch_mult[-1]
        layers = [nn.Conv2d(cfg.z_channels, c, 3, padding=1)] + middle(c, cfg.attention)
        for i in reversed(range(len(cfg.ch_mult))):
            lowest = i == len(cfg.ch_mult) - 1
            for _ in range(cfg.res_blocks + 1):
                layers.append(ResnetBlock(c, cfg.channels * cfg.ch_mult[i]))
                c = cfg.channels * cfg.ch_mult[i]
                if lowest and cfg.attention:
                    layers.append(AttnBlock(c))
            if i > 0:
                layers.append(Upsample(c))
        layers += [Normalize(c), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(self, x):
        return self.conv_out(self.net(x))


class Discriminator(nn.Module):
    """PatchGAN (taming's NLayerDiscriminator): (B, C, H, W) -> (B, 1, h, w) logits, one per patch."""

    def __init__(self, in_channels, channels=64, layers=3):
        super().__init__()
        seq = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < layers else 1  # the last of these keeps the side, as in taming
            seq += [nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False),
                    Normalize(channels * mult), nn.LeakyReLU(0.2)]
        seq += [nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1)]
        self.net = nn.Sequential(*seq)
        for m in self.modules():  # taming's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x):
        return self.net(x)


# The model

class Model(nn.Module):
    """Encoder -> 1x1 conv -> WarmupQuantizer -> 1x1 conv -> Decoder; loss L1 + the quantizer's + (from disc_start)
    the adaptive-weighted GAN loss. train.py trains the discriminator through aux_module() / aux_loss()."""

    def __init__(self, cfg):
        super().__init__()
        sizes = ("image_size", "in_channels", "channels", "z_channels", "codebook_size", "code_dim", "bank_size",
                 "respawn_every")
        small = [f"{k} {getattr(cfg, k)}" for k in sizes if getattr(cfg, k) < 1]
        if small:  # 0 would fail later, far from its cause
            raise ValueError(f"these sizes must be at least 1: {', '.join(small)}")
        down = 2 ** (len(cfg.ch_mult) - 1)
        if not cfg.ch_mult or cfg.image_size % down:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by 2^(levels-1) = {down} "
                             f"(ch_mult {cfg.ch_mult})")
        if cfg.switch_rule not in ("fixed", "adaptive"):
            raise ValueError(f"switch_rule must be 'fixed' or 'adaptive', got {cfg.switch_rule!r}")
        if cfg.warmup_steps < 0:
            raise ValueError("warmup_steps must be at least 0 (0 is the cold start)")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.pre_quant = nn.Conv2d(cfg.z_channels, cfg.code_dim, 1)
        self.quantizer = WarmupQuantizer(cfg.codebook_size, cfg.code_dim, beta=cfg.beta, usage_decay=cfg.usage_decay,
                                         respawn_threshold=cfg.respawn_threshold, respawn_every=cfg.respawn_every,
                                         kmeans_iters=cfg.kmeans_iters, bank_size=cfg.bank_size,
                                         switch_init=cfg.switch_init)
        self.post_quant = nn.Conv2d(cfg.code_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)
        self.discriminator = (Discriminator(cfg.in_channels, cfg.disc_channels, cfg.disc_layers)
                              if cfg.disc_weight > 0 else None)
        # the warm-up's record, saved with the model
        self.register_buffer("switch_step", torch.tensor(-1))  # -1 before the switch
        self.register_buffer("wf_last", torch.tensor(0))  # latest water-filling prediction
        self.register_buffer("wf_best", torch.tensor(0))  # the largest so far
        self.register_buffer("wf_stale", torch.tensor(0))  # predictions in a row without a new largest
        self.step = 0  # not a buffer: train.py sets it on resume too
        self._host_stale = None  # host copy of wf_stale (see switch_due)

    # -- the warm-up schedule

    def set_step(self, step):
        """train.py calls this before every step, on every rank. Every `waterfill_every` warm-up steps, predict the
        codebook dimension (on the host: only those steps read tensors back); the adaptive rule switches after
        `patience` predictions without a new maximum (not "no increase": the prediction is noisy). warmup_steps
        stays the longest warm-up."""
        self.step = step
        every = self.cfg.waterfill_every
        if self.quantizer.warming_up and every > 0 and step > 0 and step % every == 0:
            pred = self.quantizer.predicted_dim()  # the same on every rank (a collective)
            self.wf_last.fill_(pred)
            if pred > self.wf_best:
                self.wf_best.fill_(pred)
                self.wf_stale.zero_()
            else:
                self.wf_stale.add_(1)
            self._host_stale = None

    def switch_due(self):
        """From a host copy of wf_stale, reread after a prediction or a load: not a read from the GPU every step."""
        if self.step >= self.cfg.warmup_steps:
            return True
        if self._host_stale is None:
            self._host_stale = int(self.wf_stale)
        return self.cfg.switch_rule == "adaptive" and self._host_stale >= self.cfg.patience

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_stale = None  # reread from the loaded buffer

    def gan_active(self):
        return self.discriminator is not None and self.training and self.step >= self.cfg.disc_start

    # -- forward

    def _latents(self, x):
        """(B, C, H, W) -> pre-quantization vectors (B, h, w, D)"""
        return self.pre_quant(self.encoder(x)).permute(0, 2, 3, 1)

    def _decode_latents(self, z_q):
        """(B, h, w, D) -> (B, C, H, W)"""
        return self.decoder(self.post_quant(z_q.permute(0, 3, 1, 2)))

    def forward(self, x):
        z = self._latents(x)  # (B, h, w, D)
        if self.training and self.quantizer.warming_up and self.switch_due():
            self.quantizer.switch(z.detach().reshape(-1, self.cfg.code_dim))
            self.switch_step.fill_(self.step)
        z_q, _, q_loss, q_stats = self.quantizer(z)  # in warm-up z_q is z itself
        x_hat = self._decode_latents(z_q)  # (B, C, H, W)
        rec = (x_hat.float() - x.float()).abs().mean()  # VQGAN's L1 reconstruction loss
        loss = rec + q_loss
        gan_weight = torch.zeros((), device=x.device)
        g_loss = torch.zeros((), device=x.device)
        if self.gan_active():
            g_loss = -self.discriminator(x_hat).float().mean()  # hinge generator loss
            gan_weight = self.cfg.disc_weight * self.adaptive_weight(rec, g_loss)
            loss = loss + gan_weight * g_loss
        stats = {"recon": F.mse_loss(x_hat.float(), x.float()).detach(),  # MSE on [-1, 1], as train.py logs it
                 "l1": rec.detach(), "phase": self.quantizer.phase.float(), "waterfill_dim": self.wf_last.float(),
                 "g_loss": g_loss.detach(), "gan_weight": gan_weight, **q_stats}
        return x_hat, loss, stats

    def adaptive_weight(self, rec, g_loss):
        """taming's lambda = ||grad rec|| / (||grad g|| + 1e-4) at the decoder's last layer. autograd.grad leaves
        .grad alone for train.py's backward; per rank under DDP, as in taming."""
        last = self.decoder.conv_out.weight
        rec_grad = torch.autograd.grad(rec, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4).detach()

    # -- the discriminator, behind train.py's aux hooks

    def aux_module(self):
        """The discriminator, for train.py's second optimizer; None when disc_weight is 0."""
        return self.discriminator

    def aux_loss(self, x, x_hat):
        """The discriminator's hinge loss on real x and detached x_hat; zero before disc_start."""
        if self.step < self.cfg.disc_start:
            # a zero with a graph, for train.py's backward, without a pass through the discriminator
            zero = sum(p.sum() for p in self.discriminator.parameters()) * 0.0
            return zero, {"d_real": zero.detach(), "d_fake": zero.detach()}
        real, fake = self.discriminator(x).float(), self.discriminator(x_hat.detach()).float()
        loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
        return loss, {"d_real": real.mean().detach(), "d_fake": fake.mean().detach()}

    # -- tokenizer and eval.py interface

    @torch.no_grad()
    def encode(self, x):
        """(B, C, H, W) -> codes (B, h, w); before the switch, of the untrained codebook."""
        return self.quantizer.encode(self._latents(x))

    @torch.no_grad()
    def decode(self, codes):
        """codes (B, h, w) -> (B, C, H, W)"""
        return self._decode_latents(self.quantizer.lookup(codes))

    def code_layout(self):
        """For prior.py: [((h, w), K)]. Refused during warm-up, before the codes are trained."""
        if self.quantizer.warming_up:
            raise ValueError("warmup_vqgan: the model is still in its warm-up (no trained codes before the switch)")
        side = self.cfg.image_size // 2 ** (len(self.cfg.ch_mult) - 1)
        return [((side, side), self.cfg.codebook_size)]

    @torch.no_grad()
    def latents(self, x):
        """For eval.py: {"vq": (codebook (K, D), pre-quantization vectors (N, D), codes (N,))}."""
        z = self._latents(x).reshape(-1, self.cfg.code_dim).float()
        return {"vq": (self.quantizer.codebook.detach().float(), z, self.quantizer.nearest(z))}

    @torch.no_grad()
    def eval_stats(self, x):
        """For eval.py: the phase, logged with each validation."""
        return {"phase": self.quantizer.phase.float()}
