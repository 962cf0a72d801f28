"""
Progressive quantization VAE (PQ-VAE): ordered 1-D codes, coarse to fine, with optional nested tail dropout.

Papers: "PQ-VAE: Learning Hierarchical Discrete Representations with Progressive Quantization", Huang, Qiu and
Sapiro (ICLR 2024 submission, OpenReview); "'Principal Components' Enable A New Language of Images" (Semanticist),
Wen et al., 2025 (arXiv:2503.08685): nested tail dropout, the codes after a random cut-off become a null code.

The idea. An encoder maps the image to a feature map F, quantized as a whole in L steps, coarse to fine (Algorithm 1):
    e_l = T_l(F_l) = W_c,l^T . F_l . W_s,l      a (channel_dim x spatial_dim) = 4 x 16 = 64-dim vector
    e^_l, z_l = VQ(e_l)                         one codebook of K = 256 codes shared by all steps
    F^_l = T_l^-1(e^_l)                         with the pseudo-inverses of W_c,l^T and W_s,l
    F_(l+1) = F_l - F^_l                        the next step quantizes what is left
The decoder sees sum_l F^_l, so any prefix decodes. Large maps are cut into P = HW / 64 sub-maps (C, 8, 8), each
spanning the image (Fig. 2), quantized in parallel: code l * P + p is step l of sub-map p. The loss adds lambda_h
times eq. 5, mean_x H(q(z|x)) - H(mean_x q(z|x)): confident per image, uniform over the batch.

Where this departs from the papers:
  - The nearest code, straight-through with a commitment term (VQ-VAE), not the paper's Gumbel-softmax sample
    (`--code_choice gumbel` draws it, with the codebook still fitted as below): a random codebook learned by gradient
    alone never moves (the softmax is one-hot, unchosen codes get no gradient) and the positions carry nothing.
  - The codebook is fitted to data as in vqvae.py: k-means on the first batch, EMA, dead-code reset.
  - Per-step scale (`step_norm`, `center_weight`): the codebook sees e_l over its step's running scale, each
    step's batch mean pulled to 0 by a penalty (the scaling hides the mean from the loss, and it drifts: the steps'
    clouds move apart), so every step uses the whole codebook; else early steps sit off-centre and carry little.
  - Eq. 5 is averaged over the L * P positions (the paper sums over l), so lambda_h is independent of L * P.
  - lambda_h, the Gumbel schedule (dVAE's shape), AdamW and step counts are ours; the CPU presets are narrower.
  - Tail dropout draws the cut-off per image, not per batch: each batch trains many prefix lengths.

Train it:  python train.py --model pqvae [--dataset mnist --data_dir DIR] [--tail_dropout true]
Evaluate:  python eval.py --ckpt out/pqvae_mnist/ckpt.pt --split test   (Fig. 5: prefix MSE, one-code ablation,
           entropy per position; Fig. 4: classification from codes)
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
    # encoder / decoder (dVAE-style)
    hidden: int = 256  # channels of the convolutional path
    res_blocks: int = 3  # residual blocks per side (paper)
    downsample: int = 4  # image side / map side, a power of 2; 4 gives the paper's 64, 256, 1024 codes at 32, 64, 128
    feature_dim: int = 512  # C, channels of the quantized feature map (paper)
    # progressive quantizer (Algorithm 1)
    submap: int = 8  # sub-maps are (C, submap, submap) (paper)
    steps: int = 64  # L, steps per sub-map; codes per image = L * P
    spatial_dim: int = 16  # W_s,l is (submap^2, spatial_dim) (paper)
    channel_dim: int = 4  # W_c,l is (C, channel_dim) (paper); D = channel_dim * spatial_dim
    codebook_size: int = 256  # K, one codebook for all steps (paper)
    code_choice: str = "nearest"  # ours; "gumbel": the paper's hard Gumbel-softmax
    temp_start: float = 1.0  # Gumbel temperature, decayed exponentially (dVAE's shape; the paper is silent)
    temp_end: float = 0.0625  # ours
    temp_anneal_iters: int = 25000  # ours: steps of the decay
    # fitting the codebook to data (ours, as vqvae.py)
    beta: float = 0.25  # commitment weight (VQ-VAE)
    ema: bool = True  # EMA codebook (VQ-VAE); false: a codebook loss
    decay: float = 0.99  # EMA decay (VQ-VAE)
    eps: float = 1e-5  # Laplace smoothing of the EMA counts
    kmeans_iters: int = 10  # k-means on the first batch's u_l; 0: a random sample
    dead_code_threshold: float = 2.0  # codes used fewer times per window move onto a u_l; 0: never
    dead_code_window: int = 10  # batches per window
    step_norm: bool = True  # ours: the codebook sees e_l / its step's running scale
    center_weight: float = 0.002  # ours: weight of the steps' squared batch means
    lambda_h: float = 1e-3  # eq. 5's weight (ours: the paper is silent)
    tail_dropout: bool = False  # Semanticist's nested tail dropout


# train.py: PRESETS[dataset] over the defaults, under the command line. lr and schedule: the paper's.
_PAPER = dict(lr=1e-3, lr_schedule="exp", lr_decay_iters=25000, warmup_iters=0)
_CPU = dict(_PAPER, hidden=32, feature_dim=64, batch_size=32, max_iters=2000, temp_anneal_iters=2000,
            eval_interval=500)
PRESETS = {
    "shapes": dict(_CPU),
    "mnist": dict(_CPU, image_size=32),  # the paper resizes 28 -> 32: 8x8 map, 64 codes
    "fashion_mnist": dict(_CPU, image_size=32),
    "cifar10": dict(_PAPER, batch_size=128, max_iters=100000),  # 64 codes
    "celeba": dict(_PAPER, batch_size=512, max_iters=100000),  # 64x64: P = 4, 256 codes
    "lsun_church": dict(_PAPER, batch_size=128, max_iters=100000),  # 128x128: P = 16, 1024 codes
}


# Feature-map partitioning (Fig. 2)

def partition(f, submap=8):
    """(B, C, H, W) -> (B, P, C, submap, submap): sub-map (i, j) is f[:, :, i::H/submap, j::W/submap]."""
    B, C, H, W = f.shape
    sh, sw = H // submap, W // submap
    f = f.view(B, C, submap, sh, submap, sw)  # [b, c, patch row, i, patch col, j]
    return f.permute(0, 3, 5, 1, 2, 4).reshape(B, sh * sw, C, submap, submap)


def unpartition(s, height, width):
    """The inverse of partition: (B, P, C, submap, submap) -> (B, C, height, width)."""
    B, P, C, n, _ = s.shape
    sh, sw = height // n, width // n
    return s.view(B, sh, sw, C, n, n).permute(0, 3, 4, 1, 5, 2).reshape(B, C, height, width)


# The progressive quantizer (Algorithm 1)

class ProgressiveQuantizer(nn.Module):
    """PQ-VAE's progressive quantizer (Algorithm 1), codebook fitted to data; needs torch only.

    Step l: e_l = W_c,l^T F_l W_s,l per sub-map F_l (C, S), a D-dim vector; c, the code nearest to u_l = e_l / s_l
    (s_l: the step's running scale); F^_l = (W_c,l^T)^+ (s_l c) W_s,l^+; F_(l+1) = F_l - F^_l. Loss: beta *
    commitment + center_weight * (steps' batch means of u)^2 + lambda_h * eq. 5 (+ codebook loss if not ema).
    Float32; the codebook stays bitwise equal across DDP ranks. Twin: vqvae.py's VectorQuantizer fits its codebook
    by the same rules (pinned here by tests/test_pqvae.py).

    forward(submaps (B, P, C, S)) -> (e_hat (B, L, P, D), codes (B, L, P), loss, stats).
    """

    search_block = 2 ** 22  # distances per search chunk (16 MiB)

    def __init__(self, channels, positions, steps=64, channel_dim=4, spatial_dim=16, codebook_size=256,
                 code_choice="nearest", temperature=1.0, beta=0.25, lambda_h=1e-3, ema=True, decay=0.99, eps=1e-5,
                 kmeans_iters=10, dead_code_threshold=2.0, dead_code_window=10, step_norm=True, center_weight=0.002):
        super().__init__()
        if code_choice not in ("nearest", "gumbel"):
            raise ValueError(f"code_choice must be 'nearest' or 'gumbel', got {code_choice!r}")
        if not 0 <= decay <= 1:  # an EMA weight (1: it never moves); outside [0, 1] it diverges
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.steps, self.channel_dim, self.spatial_dim = steps, channel_dim, spatial_dim
        self.dim, self.codebook_size, self.code_choice = channel_dim * spatial_dim, codebook_size, code_choice
        self.beta, self.lambda_h, self.ema, self.decay, self.eps = beta, lambda_h, ema, decay, eps
        self.kmeans_iters, self.step_norm, self.center_weight = kmeans_iters, step_norm, center_weight
        self.dead_code_threshold, self.dead_code_window = dead_code_threshold, dead_code_window
        # so e has about the size of F's entries
        self.w_c = nn.Parameter(torch.randn(steps, channels, channel_dim) / math.sqrt(channels))  # W_c,l (C, c)
        self.w_s = nn.Parameter(torch.randn(steps, positions, spatial_dim) / math.sqrt(positions))  # W_s,l (S, s)
        codebook = torch.randn(codebook_size, self.dim)  # replaced by k-means
        if ema:  # moved by EMA, not by the optimizer
            self.register_buffer("codebook", codebook)
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("ema_count", torch.ones(codebook_size))  # N_k, EMA of assignment counts
        self.register_buffer("ema_sum", codebook.clone())  # m_k, EMA of assigned sums
        self.register_buffer("usage", torch.zeros(codebook_size))  # assignments in this dead-code window
        self.register_buffer("window_step", torch.zeros((), dtype=torch.long))  # batches seen in the window
        self.register_buffer("step_var", torch.ones(steps))  # s_l^2, EMA of each step's variance
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("temperature", torch.tensor(float(temperature)))  # Gumbel's; set by Model.set_step
        # host copies: training steps read nothing from the device
        self._host_initialized = self._host_window_step = None

    def forward(self, submaps):
        with torch.autocast(device_type=submaps.device.type, enabled=False):  # the fp32 island
            f = submaps.float().transpose(-1, -2).contiguous()  # (B, P, S, C), contiguous: no copy in any step
            pinv = self.pinv()
            if self.training and self._host_initialized is None:  # once after construction or loading
                self._host_initialized, self._host_window_step = bool(self.initialized), int(self.window_step)
            if self.training and not self._host_initialized:
                self._init_codebook(f.detach(), [p.detach() for p in pinv])
            e_hat, codes, q, e = self.progress(f, pinv)

            commit = F.mse_loss(e, e_hat.detach())  # e_hat's value is the code
            entropy = self.entropy_term(q)
            u = self.scaled(e)  # as the codebook sees e
            center = (u.mean((0, 2)) ** 2).mean()  # each step's squared batch mean
            loss = self.beta * commit + self.center_weight * center + self.lambda_h * entropy
            u = u.detach()
            if not self.ema:  # the codebook's own loss
                loss = loss + F.mse_loss(self.codebook.float()[codes], u)
            counts = self._counts(codes.flatten())  # (K,), this rank's batch
            if self.training:
                self._update(e.detach(), u.reshape(-1, self.dim), codes.flatten(), counts)
        p = counts / counts.sum()
        stats = {"commit": commit.detach(), "entropy": entropy.detach(),
                 "perplexity": torch.exp(-(p * torch.log(p + 1e-10)).sum()),  # of this batch
                 "code_usage": (counts > 0).float().mean()}
        if self.code_choice == "gumbel":
            stats["temperature"] = self.temperature.clone()
        return e_hat, codes, loss, stats

    def progress(self, f, pinv=None):
        """Algorithm 1 on transposed sub-maps f (B, P, S, C) -> e_hat (B, L, P, D), codes (B, L, P),
        q(z_l | x) (B, L*P, K), e (B, L, P, D)."""
        B, P = f.shape[:2]
        pinv = pinv or self.pinv()
        # pre-update copies: the update is in place
        codebook, scale = self.codebook.detach().float().clone(), self.step_var.sqrt()
        es, e_hats, codes, qs = [], [], [], []
        for l in range(self.steps):
            e = self.transform(f, l)  # (B, P, D)
            u_hat, z, q = self.choose((e / scale[l]).reshape(B * P, self.dim), codebook)
            e_hat = u_hat.view(B, P, self.dim) * scale[l]  # restored to step l's scale
            f = f - self.inverse(e_hat, l, pinv)  # F_(l+1) = F_l - F^_l
            es.append(e)
            e_hats.append(e_hat)
            codes.append(z.view(B, P))
            qs.append(q.view(B, P, -1))
        return torch.stack(e_hats, 1), torch.stack(codes, 1), torch.cat(qs, 1), torch.stack(es, 1)

    def choose(self, e, codebook):
        """e (N, D), codebook (K, D) -> (e_hat (N, D), codes (N,), q (N, K)); e_hat's value is the code."""
        # -||e - c||^2 + ||e||^2: the same softmax and argmax
        logits = 2 * e @ codebook.t() - (codebook * codebook).sum(1)  # (N, K)
        q = logits.softmax(-1)  # q(z | x), eq. 5
        if self.training and self.code_choice == "gumbel":
            gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp(1e-10, 1 - 1e-7)))
            soft = ((logits + gumbel) / self.temperature).softmax(-1)  # (N, K)
            codes = soft.argmax(-1)  # the temperature does not change the argmax
            e_soft = soft @ codebook
            e_hat = codebook[codes] + (e_soft - e_soft.detach())  # the code, with the soft sample's gradient
        else:
            codes = logits.argmax(-1)  # ties to the lowest index
            e_hat = codebook[codes]
        return e_hat + (e - e.detach()), codes, q  # straight-through: e^'s gradient reaches e

    @staticmethod
    def entropy_term(q):
        """Eq. 5 for q (B, M, K), B images at M positions: mean_x H(q(z|x)) - H(mean_x q(z|x)), mean over
        positions, in nats."""
        h_cond = -(q * torch.log(q + 1e-10)).sum(-1).mean(0)  # (M,)
        q_mean = q.mean(0)  # (M, K) aggregated posterior
        h_marg = -(q_mean * torch.log(q_mean + 1e-10)).sum(-1)  # (M,)
        return (h_cond - h_marg).mean()

    # -- the transforms T_l and their inverses

    def pinv(self):
        """(W_c,l^T)^+ (L, C, c) and W_s,l^+ (L, s, S), for full-rank W."""
        wc, ws = self.w_c.float(), self.w_s.float()
        wc_pinv = torch.linalg.solve(wc.transpose(1, 2) @ wc, wc.transpose(1, 2)).transpose(1, 2)  # W_c (W_c^T W_c)^-1
        ws_pinv = torch.linalg.solve(ws.transpose(1, 2) @ ws, ws.transpose(1, 2))  # (W_s^T W_s)^-1 W_s^T
        return wc_pinv, ws_pinv

    def transform(self, f, l):
        """T_l: transposed sub-maps F_l^T (..., S, C) -> e_l (..., D), e_l = W_c,l^T F_l W_s,l flattened."""
        return ((f @ self.w_c[l].float()).transpose(-1, -2) @ self.w_s[l].float()).flatten(-2)  # (..., c, s)

    def inverse(self, e, l, pinv=None):
        """T_l^-1: e (..., D) -> transposed sub-maps (..., S, C), ((W_c,l^T)^+ e W_s,l^+)^T."""
        wc_pinv, ws_pinv = pinv or self.pinv()
        e = e.unflatten(-1, (self.channel_dim, self.spatial_dim))  # (..., c, s)
        return (e @ ws_pinv[l]).transpose(-1, -2) @ wc_pinv[l].t()  # (..., S, c) @ (c, C)

    def inverse_sum(self, e_hat):
        """sum_l T_l^-1(e^_l) for e_hat (B, L, P, D) -> (B, P, C, S): the decoder's input, all steps at once."""
        with torch.autocast(device_type=e_hat.device.type, enabled=False):  # fp32, as in forward
            wc_pinv, ws_pinv = self.pinv()
            e = e_hat.float().unflatten(-1, (self.channel_dim, self.spatial_dim))  # (B, L, P, c, s)
            return torch.einsum("lca,blpad,lds->bpcs", wc_pinv, e, ws_pinv)

    def scaled(self, e):
        """e (..., L, P, D) -> e_l / step_scale_l, the space of the codebook."""
        return e / self.step_var.sqrt()[:, None, None]

    def lookup(self, codes):
        """codes (..., L, P) -> code vectors (..., L, P, D), each restored to its step's scale."""
        return self.codebook.detach().float()[codes] * self.step_var.sqrt()[:, None, None]

    # -- fitting the codebook to data (training only; the same collectives on every rank)

    @torch.no_grad()
    def _update(self, e, u, codes, counts):
        """EMA of counts and sums over all ranks, dead-code window, step scales. e (B, L, P, D), u (N, D) scaled."""
        counts = self._all_reduce(counts.clone())
        if self.ema:
            sums = self._all_reduce(torch.zeros_like(self.ema_sum).index_add_(0, codes, u))  # (K, D)
            self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            # Laplace smoothing: no count is zero
            n = self.ema_count.sum()
            count = (self.ema_count + self.eps) / (n + self.codebook_size * self.eps) * n
            self.codebook.copy_(self.ema_sum / count[:, None])
        if self.dead_code_threshold > 0:
            self.usage.add_(counts)
            self.window_step.add_(1)
            self._host_window_step += 1
            if self._host_window_step >= self.dead_code_window:
                self._reset_dead_codes(u)
        if self.step_norm:
            var = self._step_var(e.transpose(0, 1).reshape(self.steps, -1, self.dim))
            self.step_var.mul_(self.decay).add_(var, alpha=1 - self.decay)

    def _step_var(self, e):
        """Each step's variance per dim (L,) of e (L, N, D), over all ranks (N equal on all)."""
        n = e.shape[1] * (dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1)
        mean = self._all_reduce(e.sum(1)) / n
        var = self._all_reduce(((e - mean[:, None]) ** 2).sum((1, 2))) / (n * self.dim)
        return var.clamp(min=1e-12)

    @torch.no_grad()
    def _reset_dead_codes(self, u):
        """Move codes used < dead_code_threshold times in the window onto random u_l of the batch (all ranks',
        drawn on rank 0), EMA state too, or the EMA would drag them back."""
        dead = self.usage < self.dead_code_threshold  # (K,), equal on all ranks
        u = self._gather(u)  # (world * N, D)
        # K candidates, used where dead: every rank runs the same collectives
        candidates = self._broadcast(u[torch.randint(0, u.shape[0], (self.codebook_size,), device=u.device)])
        self.codebook.copy_(torch.where(dead[:, None], candidates, self.codebook))
        self.ema_sum.copy_(torch.where(dead[:, None], candidates, self.ema_sum))
        self.ema_count.masked_fill_(dead, 1.0)
        self.usage.zero_()
        self.window_step.zero_()
        self._host_window_step = 0

    @torch.no_grad()
    def _init_codebook(self, f, pinv):
        """Step scales, then k-means on all steps' scaled e_l of the batch (all ranks'), broadcast from rank 0.
        Algorithm 1 runs with e^_l = e_l: there is no codebook yet."""
        es = []
        for l in range(self.steps):
            e = self.transform(f, l)  # (B, P, D)
            es.append(e.reshape(-1, self.dim))
            f = f - self.inverse(e, l, pinv)
        e = torch.stack(es)  # (L, B * P, D)
        if self.step_norm:
            self.step_var.copy_(self._step_var(e))
        e = self._gather(self.scaled(e[None]).reshape(-1, self.dim))  # (world * L * B * P, D)
        idx = torch.randperm(e.shape[0], device=e.device)[:self.codebook_size]
        if idx.numel() < self.codebook_size:  # fewer vectors than codes: with replacement
            idx = torch.randint(0, e.shape[0], (self.codebook_size,), device=e.device)
        codebook = e[idx].clone()  # (K, D)
        for _ in range(self.kmeans_iters):  # Lloyd's; an empty cluster keeps its centre
            codes = self.nearest(e, codebook)
            counts = self._counts(codes)[:, None]
            sums = torch.zeros_like(codebook).index_add_(0, codes, e)
            codebook = torch.where(counts > 0, sums / counts.clamp(min=1), codebook)
        self._broadcast(codebook)
        self.codebook.copy_(codebook)
        self.ema_sum.copy_(codebook)  # with ema_count 1: the EMA starts here
        self.ema_count.fill_(1.0)
        self.initialized.fill_(True)
        self._host_initialized = True

    def nearest(self, e, codebook):
        """Nearest code (N,) for e (N, D), in chunks of search_block distances whatever N is."""
        c_sq = (codebook * codebook).sum(1)  # (K,)
        chunk = max(1, self.search_block // codebook.shape[0])
        return torch.cat([self._argmin(c_sq - 2 * e[i:i + chunk] @ codebook.t()) for i in range(0, e.shape[0], chunk)])

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

    def _counts(self, codes):
        """Assignments per code (K,): index_add_ of ones (exact to 2^24); bincount would sync with the host."""
        ones = torch.ones(codes.shape[0], device=codes.device)
        return torch.zeros(self.codebook_size, device=codes.device).index_add_(0, codes, ones)

    # -- machinery: collectives (no-ops without a process group), host copies

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
    def _gather(e):  # (N, D) per rank -> (world * N, D); N equal on all
        if not (dist.is_available() and dist.is_initialized()):
            return e
        parts = [torch.empty_like(e) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, e.contiguous())
        return torch.cat(parts)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_initialized = self._host_window_step = None  # re-read from the loaded buffers


def temperature_at(step, cfg):
    """Gumbel temperature: temp_start * (temp_end / temp_start)^(step / temp_anneal_iters), then temp_end."""
    frac = min(step / max(cfg.temp_anneal_iters, 1), 1.0)
    return cfg.temp_start * (cfg.temp_end / cfg.temp_start) ** frac


# Encoder and decoder (dVAE-style)

class ResBlock(nn.Module):
    """dVAE's block: x + conv1x1(relu(conv3x3(relu(conv3x3(relu(conv3x3(relu(x)))))))) at a quarter of the width."""

    def __init__(self, channels):
        super().__init__()
        h = max(channels // 4, 1)
        self.block = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, h, 3, padding=1),
            nn.ReLU(), nn.Conv2d(h, h, 3, padding=1),
            nn.ReLU(), nn.Conv2d(h, h, 3, padding=1),
            nn.ReLU(), nn.Conv2d(h, channels, 1),
        )

    def forward(self, x):
        return x + self.block(x)


class Encoder(nn.Module):
    """(B, C, H, W) -> (B, feature_dim, H/downsample, W/downsample)"""

    def __init__(self, cfg):
        super().__init__()
        layers = [nn.Conv2d(cfg.in_channels, cfg.hidden, 3, padding=1)]
        for _ in range(int(math.log2(cfg.downsample))):  # each halves the side
            layers += [nn.ReLU(), nn.Conv2d(cfg.hidden, cfg.hidden, 4, stride=2, padding=1)]
        layers += [ResBlock(cfg.hidden) for _ in range(cfg.res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(cfg.hidden, cfg.feature_dim, 1)]  # "transform the feature to 512-dim"
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """(B, feature_dim, h, w) -> (B, C, h*downsample, w*downsample)"""

    def __init__(self, cfg):
        super().__init__()
        layers = [nn.Conv2d(cfg.feature_dim, cfg.hidden, 1)]
        layers += [ResBlock(cfg.hidden) for _ in range(cfg.res_blocks)]
        for _ in range(int(math.log2(cfg.downsample))):  # each doubles the side
            layers += [nn.ReLU(), nn.ConvTranspose2d(cfg.hidden, cfg.hidden, 4, stride=2, padding=1)]
        layers += [nn.ReLU(), nn.Conv2d(cfg.hidden, cfg.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Model(nn.Module):
    """Encoder -> partition -> ProgressiveQuantizer -> sum_l T_l^-1(e^_l) -> unpartition -> Decoder. Codes (B, L*P)
    in step order; codes left out become the null code (tail_dropout) or zeros, i.e. dropped residual steps."""

    def __init__(self, cfg):
        super().__init__()
        sizes = ("image_size", "in_channels", "hidden", "feature_dim", "submap", "steps", "spatial_dim", "channel_dim",
                 "codebook_size", "dead_code_window")
        small = [f"{k} {getattr(cfg, k)}" for k in sizes if getattr(cfg, k) < 1]
        if small:  # a 0 would fail later, far from its cause
            raise ValueError(f"these sizes must be at least 1: {', '.join(small)}")
        ds = cfg.downsample
        if ds < 1 or ds & (ds - 1):
            raise ValueError(f"downsample must be a power of 2, got {ds}")
        side = cfg.image_size // ds
        if cfg.image_size % ds or side % cfg.submap:
            raise ValueError(f"image_size {cfg.image_size} / downsample {ds} must be a multiple of submap "
                             f"{cfg.submap}")
        self.cfg = cfg
        self.side = side
        self.positions = (side // cfg.submap) ** 2  # P
        self.num_codes = cfg.steps * self.positions  # L * P
        self.encoder = Encoder(cfg)
        self.quantizer = ProgressiveQuantizer(
            cfg.feature_dim, cfg.submap ** 2, cfg.steps, cfg.channel_dim, cfg.spatial_dim, cfg.codebook_size,
            code_choice=cfg.code_choice, temperature=cfg.temp_start, beta=cfg.beta, lambda_h=cfg.lambda_h, ema=cfg.ema,
            decay=cfg.decay, eps=cfg.eps, kmeans_iters=cfg.kmeans_iters, dead_code_threshold=cfg.dead_code_threshold,
            dead_code_window=cfg.dead_code_window, step_norm=cfg.step_norm,
            center_weight=cfg.center_weight)
        self.decoder = Decoder(cfg)
        if cfg.tail_dropout:  # only then: an unused parameter would trouble DDP
            self.null_code = nn.Parameter(torch.zeros(self.quantizer.dim))

    def set_step(self, step):
        """Called by train.py every step; the temperature is a buffer, saved with the model."""
        self.quantizer.temperature.fill_(temperature_at(step, self.cfg))

    # -- parts

    def _submaps(self, x):
        """(B, C, H, W) -> sub-maps (B, P, feature_dim, submap^2)"""
        s = partition(self.encoder(x), self.cfg.submap)
        return s.flatten(3)

    def _decode_latents(self, e_hat):
        """e_hat (B, L, P, D) -> (B, C, H, W)"""
        B = e_hat.shape[0]
        n = self.cfg.submap
        f = self.quantizer.inverse_sum(e_hat)  # (B, P, C, S)
        f = unpartition(f.reshape(B, self.positions, -1, n, n), self.side, self.side)
        return self.decoder(f)

    def _leave_out(self, e_hat, keep):
        """e_hat (B, L, P, D) with the codes at positions >= keep (int or (B,)) left out."""
        B = e_hat.shape[0]
        flat = e_hat.reshape(B, self.num_codes, -1)
        keep = torch.as_tensor(keep, device=e_hat.device).reshape(-1, 1)  # (B or 1, 1)
        tail = (torch.arange(self.num_codes, device=e_hat.device) >= keep)[..., None]  # (B or 1, L*P, 1)
        null = self.null_code.float() if self.cfg.tail_dropout else torch.zeros_like(flat[0, 0])
        return torch.where(tail, null, flat).view_as(e_hat)

    # -- the model protocol

    def forward(self, x):
        e_hat, codes, q_loss, q_stats = self.quantizer(self._submaps(x))
        if self.training and self.cfg.tail_dropout:  # k' ~ U{1..L*P} per image
            keep = torch.randint(1, self.num_codes + 1, (x.shape[0],), device=x.device)
            e_hat = self._leave_out(e_hat, keep)
        x_hat = self._decode_latents(e_hat)
        recon = F.mse_loss(x_hat.float(), x.float())
        return x_hat, recon + q_loss, {"recon": recon.detach(), **q_stats}

    @torch.no_grad()
    def encode(self, x):
        """(B, C, H, W) -> codes (B, L*P) (samples in training mode with code_choice "gumbel")."""
        return self._progress(x)[1].flatten(1)

    @torch.no_grad()
    def decode(self, codes, keep=None):
        """codes (B, k), the first k <= L*P of the sequence -> (B, C, H, W), from the first `keep` (default k)."""
        B, k = codes.shape
        keep = k if keep is None else min(keep, k)
        full = torch.zeros(B, self.num_codes, dtype=torch.long, device=codes.device)
        full[:, :k] = codes
        e_hat = self.quantizer.lookup(full.view(B, self.cfg.steps, self.positions))  # (B, L, P, D)
        if keep < self.num_codes:
            e_hat = self._leave_out(e_hat, keep)
        return self._decode_latents(e_hat)

    def code_layout(self):
        """For prior.py: one level, the L*P codes in step order."""
        return [((self.num_codes,), self.cfg.codebook_size)]

    def _prefixes(self):
        n = self.num_codes
        return sorted({2 ** i for i in range(int(math.log2(n)) + 1)} | {n})

    @torch.no_grad()
    def partial_decodes(self, x):
        """For eval.py (Fig. 5): {"codes_n": reconstruction from the first n codes}, n = 1, 2, 4, ..., L*P."""
        codes = self.encode(x)
        return {f"codes_{n}": self.decode(codes, n) for n in self._prefixes()}

    @torch.no_grad()
    def code_ablation(self, x, max_positions=64):
        """For eval.py (Fig. 5): {i: reconstruction without code i}, for at most max_positions evenly spread i."""
        codes = self.encode(x)
        B, n = codes.shape
        e_hat = self.quantizer.lookup(codes.view(B, self.cfg.steps, self.positions)).flatten(1, 2)  # (B, L*P, D)
        m = min(n, max_positions)
        positions = sorted({round(i * (n - 1) / max(m - 1, 1)) for i in range(m)})
        null = self.null_code.float() if self.cfg.tail_dropout else torch.zeros_like(e_hat[0, 0])
        out = {}
        for i in positions:
            e = e_hat.clone()
            e[:, i] = null
            out[i] = self._decode_latents(e.view(B, self.cfg.steps, self.positions, -1))
        return out

    def _progress(self, x):
        """ProgressiveQuantizer.progress on x, nothing updated."""
        s = self._submaps(x)  # under the caller's autocast, as in forward
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.quantizer.progress(s.float().transpose(-1, -2))

    @torch.no_grad()
    def latents(self, x):
        """For eval.py: {"pq": (codebook (K, D), scaled u_l (N, D), codes (N,))}."""
        _, codes, _, e = self._progress(x)
        u = self.quantizer.scaled(e).reshape(-1, self.quantizer.dim)
        return {"pq": (self.quantizer.codebook.detach().float(), u, codes.flatten())}

    @torch.no_grad()
    def eval_stats(self, x):
        """For eval.py (Fig. 5): {"cond_entropy_bits": (L*P,)}, the mean entropy of q(z_l | x) per position, in bits,
        given the earlier codes."""
        q = self._progress(x)[2]  # (B, L*P, K)
        return {"cond_entropy_bits": -(q * torch.log2(q + 1e-30)).sum(-1).mean(0)}
