"""
Progressive quantization VAE (PQ-VAE), with ordered 1-D codes and nested tail dropout.

Papers:
  - "PQ-VAE: Learning Hierarchical Discrete Representations with Progressive Quantization", Huang, Qiu and Sapiro:
    progressive quantization with step-specific transforms, feature-map partitioning, an entropy regulariser (eq. 5).
  - "'Principal Components' Enable A New Language of Images" (Semanticist), Wen et al., 2025: nested tail dropout
    (its "nested CFG"): in training, every code after a random cut-off is replaced by a learnable null code, so
    that every prefix of the code sequence decodes to a sensible image.

The idea. An encoder maps the image to a feature map F of `feature_dim` channels (512 in the paper). Instead of
quantizing each spatial vector, PQ-VAE quantizes the whole map in L steps, coarse to fine (Algorithm 1):
    e_l = T_l(F_l) = W_c,l^T . F_l . W_s,l      a (channel_dim x spatial_dim) = 4 x 16 = 64-dim vector
    e^_l, z_l = VQ(e_l)                         one codebook of K = 256 codes shared by all steps, Gumbel-softmax
                                                over -||e_l - c_k||^2 in training, the nearest code in evaluation
    F^_l = T_l^-1(e^_l)                         with the pseudo-inverses of W_c,l^T and W_s,l
    F_(l+1) = F_l - F^_l                        the next step quantizes what is left
and the decoder sees sum_l F^_l. So z_1 carries the most, and any prefix z_1..z_l decodes to an approximation.
Large maps are first partitioned (Fig. 2): the map is cut into an 8 x 8 grid of patches, and the vectors at the same
relative position inside each patch form one (C, 8, 8) sub-map, P = HW / 64 of them, each spanning the whole image.
The P sub-maps are quantized in parallel, with the same transforms, so an image has L * P codes, ordered step by
step: code l * P + p is step l of sub-map p. The loss is the reconstruction error plus lambda_h times eq. 5's
mutual-information term, mean_x H(q(z|x)) - H(mean_x q(z|x)): confident for each image, uniform over the batch; and,
our addition (Config), VQ-VAE's commitment term, with the decoder's gradient passed to e straight through.

Train it:  python train.py --model pqvae [--dataset mnist --data_dir DIR] [--tail_dropout true]
Evaluate:  python eval.py --ckpt out/pqvae_mnist/ckpt.pt --split test   (MSE from the first n codes, and the MSE
           increase when one code is removed: the paper's Fig. 5)
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    # data (train.py fills these from the dataset; override on the command line)
    image_size: int = 32
    in_channels: int = 3
    # encoder / decoder (dVAE-style residual blocks, 3 per side)
    hidden: int = 256  # channels of the convolutional path
    res_blocks: int = 3  # residual blocks per side (paper: 3)
    downsample: int = 4  # image side / feature-map side, a power of 2. With 4, L = 64 steps give the paper's code
    # counts: 32x32 -> 8x8 map, P = 1, 64 codes; 64x64 -> P = 4, 256 codes; 128x128 -> P = 16, 1024 codes
    feature_dim: int = 512  # C, channels of the feature map that is quantized (paper: 512)
    # progressive quantizer
    submap: int = 8  # the map is cut into submap x submap patches; sub-maps are (C, submap, submap) (paper: 8)
    steps: int = 64  # L, quantization steps per sub-map; codes per image = steps * P
    spatial_dim: int = 16  # W_s,l: (submap^2 x spatial_dim) = 64 x 16 (paper)
    channel_dim: int = 4  # W_c,l: (feature_dim x channel_dim) = 512 x 4 (paper); code vectors have 4 * 16 = 64 dims
    codebook_size: int = 256  # K, one codebook shared by all steps (paper: 256)
    # eq. 5's weight. The paper is silent; we choose 1e-3 because the term lies in [-log K, log K] = [-5.5, 5.5]
    # and 1e-3 keeps it near the size of the reconstruction error late in training, so it shapes the code
    # distribution without outweighing the reconstruction. We average it over the L * P positions (the paper sums
    # over l), so the value does not depend on the number of codes.
    lambda_h: float = 1e-3
    # Gumbel-softmax temperature. The paper is silent; we choose dVAE's schedule shape (which the encoder/decoder
    # come from): exponential decay from temp_start to temp_end over temp_anneal_iters steps, then constant, because
    # a high temperature early lets gradients reach every code and a low one late makes the training samples
    # nearly the nearest code that evaluation uses. 1 -> 1/16 as in dVAE, over the lr's 25k-step time constant.
    temp_start: float = 1.0
    temp_end: float = 0.0625
    temp_anneal_iters: int = 25000
    # How the decoder's gradient reaches the encoder. The paper says Gumbel-softmax and no more. Through the sample
    # alone ("identity_gradient false", with beta 0 the paper's literal reading), the gradient to e is scaled by the
    # softmax's slope, which vanishes as the temperature falls: the encoder stops learning. We choose to also pass
    # it unchanged (VQ-VAE's straight-through), with VQ-VAE's commitment term beta * ||e - sg(code)||^2 so that e
    # stays near its codes. On MNIST (mnist preset, 2000 steps, test split) the full-code MSE fell from 16.8e-3 to
    # 7.8e-3 (12.1e-3 to 8.8e-3 with tail dropout, every prefix better too; README).
    identity_gradient: bool = True
    beta: float = 0.25  # commitment weight (VQ-VAE); applied whatever identity_gradient is, 0 to leave it out
    # nested tail dropout (Semanticist). We draw the cut-off k' ~ U{1..L*P} per image (not per batch), so each
    # batch trains many prefix lengths at once; codes k' and after are replaced by a learnable null code.
    tail_dropout: bool = False


# Per-dataset presets: train.py applies PRESETS[dataset] above the defaults and below the command line. The paper's
# optimiser settings everywhere (lr 1e-3, annealed by exp(-step / 25000)); the optimizer (AdamW, train.py's, with
# weight decay 0, i.e. Adam) and the step counts are not in the paper: chosen for the budgets. The CPU presets
# (shapes, mnist, fashion_mnist) are much narrower than the paper (feature_dim 64, hidden 32, batch 32) so that
# 2000 steps take minutes on a laptop CPU; the others keep the paper's 512 channels and batch sizes.
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


# ---------------------------------------------------------------------------------------------------------------------
# Feature-map partitioning (Fig. 2)

def partition(f, submap=8):
    """(B, C, H, W) -> (B, P, C, submap, submap), P = HW / submap^2. The map is an submap x submap grid of patches of
    (H/submap, W/submap) vectors; sub-map p = (i, j) gathers the vector at relative position (i, j) of every patch,
    i.e. f[:, :, i::H/submap, j::W/submap]."""
    B, C, H, W = f.shape
    sh, sw = H // submap, W // submap
    f = f.view(B, C, submap, sh, submap, sw)  # [b, c, patch row, i, patch col, j]
    return f.permute(0, 3, 5, 1, 2, 4).reshape(B, sh * sw, C, submap, submap)


def unpartition(s, height, width):
    """The inverse of partition: (B, P, C, submap, submap) -> (B, C, height, width)."""
    B, P, C, n, _ = s.shape
    sh, sw = height // n, width // n
    return s.view(B, sh, sw, C, n, n).permute(0, 3, 4, 1, 5, 2).reshape(B, C, height, width)


# ---------------------------------------------------------------------------------------------------------------------
# The progressive quantizer (Algorithm 1)

def entropy_term(q):
    """Eq. 5's term for q of shape (B, M, K): code probabilities of B images at M code positions. Returns the mean over
    positions of [mean over images of H(q(z|x))  -  H(mean over images of q(z|x))], in nats."""
    h_cond = -(q * torch.log(q + 1e-10)).sum(-1).mean(0)  # (M,)
    q_mean = q.mean(0)  # (M, K), the batch's aggregated posterior
    h_marg = -(q_mean * torch.log(q_mean + 1e-10)).sum(-1)  # (M,)
    return (h_cond - h_marg).mean()


class ProgressiveQuantizer(nn.Module):
    """PQ-VAE's progressive quantizer (Algorithm 1). Depends on torch only: copy it into your project.

    Step l turns each (C, S) sub-map F_l (S = submap^2 spatial positions) into e_l = W_c,l^T F_l W_s,l, a
    (channel_dim, spatial_dim) matrix read as one vector of D = channel_dim * spatial_dim dims, picks a code of the
    shared codebook (K, D), maps it back with the pseudo-inverses, F^_l = (W_c,l^T)^+ e^_l W_s,l^+, and passes on the
    residual F_l - F^_l. For full-rank W (almost surely), (W_c^T)^+ = W_c (W_c^T W_c)^-1 and W_s^+ = (W_s^T W_s)^-1
    W_s^T, computed by solves of small (channel_dim and spatial_dim square) systems, with gradients.

    Code choice: logits -||e - c_k||^2. Training draws a Gumbel-softmax sample at temperature `temperature` and uses
    it straight-through (the paper says Gumbel-softmax but not hard or soft; we choose hard, so that the decoder sees
    single codes in training as in evaluation, and the soft sample carries the gradient to the encoder and to the
    codebook). With identity_gradient the gradient of e^ also reaches e unchanged, as in VQ-VAE (see Config).
    Evaluation takes the nearest code: deterministic, and decode(codes) reproduces it bitwise.
    The codebook is an nn.Parameter learned by gradient, so under DDP it is averaged like any other parameter and
    stays equal on every rank; the only buffer, the temperature, is set from the step by every rank alike. All of it
    runs in float32 with autocast off: the distances, the argmin and the small solves are not safe in bf16/fp16.
    Memory: K is small (256), so the (N, K) distances and the soft sample are fine; lookups are by indexing.

    forward(s) takes sub-maps s (B, P, C, S) and returns (e_hat (B, L, P, D), codes (B, L, P), q (B, L*P, K),
    e (B, L, P, D)): the chosen code vectors, their indices, the code probabilities and the vectors before quantization.
    """

    def __init__(self, channels, positions, steps=64, channel_dim=4, spatial_dim=16, codebook_size=256,
                 temperature=1.0, identity_gradient=True):
        super().__init__()
        self.steps, self.channel_dim, self.spatial_dim = steps, channel_dim, spatial_dim
        self.identity_gradient = identity_gradient
        self.dim = channel_dim * spatial_dim
        # scaled so that e has about the size of F's entries
        self.w_c = nn.Parameter(torch.randn(steps, channels, channel_dim) / math.sqrt(channels))  # W_c,l (C, c)
        self.w_s = nn.Parameter(torch.randn(steps, positions, spatial_dim) / math.sqrt(positions))  # W_s,l (S, s)
        self.codebook = nn.Parameter(torch.randn(codebook_size, self.dim))
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def pinv(self):
        """The pseudo-inverses (W_c,l^T)^+ (L, C, c) and W_s,l^+ (L, s, S), for full-rank W."""
        wc, ws = self.w_c.float(), self.w_s.float()
        wc_pinv = torch.linalg.solve(wc.transpose(1, 2) @ wc, wc.transpose(1, 2)).transpose(1, 2)  # W_c (W_c^T W_c)^-1
        ws_pinv = torch.linalg.solve(ws.transpose(1, 2) @ ws, ws.transpose(1, 2))  # (W_s^T W_s)^-1 W_s^T
        return wc_pinv, ws_pinv

    # The sub-maps are kept transposed, (..., S, C), so that each product below is one large matrix product.

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

    def lookup(self, codes):
        """codes (...) -> code vectors (..., D), by indexing."""
        return self.codebook.float()[codes]

    def _quantize(self, e):
        """e (N, D) -> (e_hat (N, D), codes (N,), q (N, K))."""
        c = self.codebook.float()
        # -||e - c||^2 up to ||e||^2, which is the same for every code: changes neither the softmax nor the argmax
        logits = 2 * e @ c.t() - (c * c).sum(1)  # (N, K)
        q = logits.softmax(-1)  # q(z|x): what a Gumbel-softmax sample on these logits draws from, at any temperature
        if self.training:
            gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp(1e-10, 1 - 1e-7)))
            soft = ((logits + gumbel) / self.temperature).softmax(-1)  # (N, K)
            codes = soft.argmax(-1)
            e_soft = soft @ c
            e_hat = c[codes] + (e_soft - e_soft.detach())  # straight-through: forward the code, gradient of soft
            if self.identity_gradient:
                e_hat = e_hat + (e - e.detach())  # and the gradient to e unchanged, as in VQ-VAE (Config)
        else:
            codes = logits.argmax(-1)
            e_hat = c[codes]
        return e_hat, codes, q

    def forward(self, s):
        with torch.autocast(device_type=s.device.type, enabled=False):  # the fp32 island
            f = s.float().transpose(-1, -2)  # (B, P, S, C)
            B, P = f.shape[:2]
            pinv = self.pinv()
            es, e_hats, codes, qs = [], [], [], []
            for l in range(self.steps):
                e = self.transform(f, l)  # (B, P, D)
                e_hat, z, q = self._quantize(e.reshape(B * P, self.dim))
                e_hat = e_hat.view(B, P, self.dim)
                f = f - self.inverse(e_hat, l, pinv)  # F_(l+1) = F_l - F^_l
                es.append(e)
                e_hats.append(e_hat)
                codes.append(z.view(B, P))
                qs.append(q.view(B, P, -1))
            return torch.stack(e_hats, 1), torch.stack(codes, 1), torch.cat(qs, 1), torch.stack(es, 1)


# ---------------------------------------------------------------------------------------------------------------------
# Encoder and decoder (dVAE-style: residual blocks in bottleneck form; strided convolutions to resample)

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
    """Encoder -> partition -> ProgressiveQuantizer -> sum_l T_l^-1(e^_l) -> unpartition -> Decoder.

    Codes are (B, L*P), ordered step by step (code l*P + p is step l of sub-map p). Decoding a prefix of k codes
    leaves the rest out: they are replaced by the learned null code when the model was trained with tail_dropout,
    and by zero vectors otherwise, which is exactly leaving their residual steps out of the sum."""

    def __init__(self, cfg):
        super().__init__()
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
        self.quantizer = ProgressiveQuantizer(cfg.feature_dim, cfg.submap ** 2, cfg.steps, cfg.channel_dim,
                                              cfg.spatial_dim, cfg.codebook_size, cfg.temp_start,
                                              cfg.identity_gradient)
        self.decoder = Decoder(cfg)
        if cfg.tail_dropout:  # only then: an unused parameter would trouble DDP
            self.null_code = nn.Parameter(torch.zeros(self.quantizer.dim))

    # -- training hooks ---------------------------------------------------------------------------------------------

    def temperature_at(self, step):
        """Exponential decay from temp_start to temp_end over temp_anneal_iters steps, then temp_end."""
        c = self.cfg
        t = min(step / max(c.temp_anneal_iters, 1), 1.0)
        return c.temp_start * (c.temp_end / c.temp_start) ** t

    def set_step(self, step):
        """train.py calls this before every optimizer step; the temperature is a buffer, saved with the model."""
        self.quantizer.temperature.fill_(self.temperature_at(step))

    # -- parts ------------------------------------------------------------------------------------------------------

    def _submaps(self, x):
        """(B, C, H, W) -> sub-maps (B, P, feature_dim, submap^2)"""
        s = partition(self.encoder(x), self.cfg.submap)
        return s.flatten(3)

    def _decode_vectors(self, e_hat):
        """e_hat (B, L, P, D) -> (B, C, H, W)"""
        B = e_hat.shape[0]
        n = self.cfg.submap
        f = self.quantizer.inverse_sum(e_hat)  # (B, P, C, S)
        f = unpartition(f.reshape(B, self.positions, -1, n, n), self.side, self.side)
        return self.decoder(f)

    def _leave_out(self, e_hat, keep):
        """Replace the codes at positions >= keep (an int or a (B,) tensor) by the null code (tail_dropout) or by
        zeros. e_hat (B, L, P, D), in code order l*P + p."""
        B = e_hat.shape[0]
        flat = e_hat.reshape(B, self.num_codes, -1)
        keep = torch.as_tensor(keep, device=e_hat.device).reshape(-1, 1)  # (B or 1, 1)
        tail = (torch.arange(self.num_codes, device=e_hat.device) >= keep)[..., None]  # (B or 1, L*P, 1)
        null = self.null_code.float() if self.cfg.tail_dropout else torch.zeros_like(flat[0, 0])
        return torch.where(tail, null, flat).view_as(e_hat)

    # -- the model protocol -----------------------------------------------------------------------------------------

    def forward(self, x):
        e_hat, codes, q, e = self.quantizer(self._submaps(x))
        commit = F.mse_loss(e, self.quantizer.lookup(codes).detach())  # (VQ-VAE) keeps e near its codes
        if self.training and self.cfg.tail_dropout:  # k' ~ U{1..L*P} per image: codes k' and after become null
            keep = torch.randint(1, self.num_codes + 1, (x.shape[0],), device=x.device)
            e_hat = self._leave_out(e_hat, keep)
        x_hat = self._decode_vectors(e_hat)
        recon = F.mse_loss(x_hat.float(), x.float())
        ent = entropy_term(q)
        with torch.no_grad():
            # index_add_, not bincount: on a GPU bincount reads the largest index back to the host
            counts = torch.zeros(self.cfg.codebook_size, device=codes.device).index_add_(
                0, codes.flatten(), torch.ones(codes.numel(), device=codes.device))
            p = counts / counts.sum()
            stats = {"recon": recon.detach(), "entropy": ent.detach(), "commit": commit.detach(),
                     "perplexity": torch.exp(-(p * torch.log(p + 1e-10)).sum()),  # of this batch
                     "code_usage": (counts > 0).float().mean(), "temperature": self.quantizer.temperature.clone()}
        return x_hat, recon + self.cfg.lambda_h * ent + self.cfg.beta * commit, stats

    @torch.no_grad()
    def encode(self, x):
        """(B, C, H, W) -> ordered codes (B, L*P). Use in eval mode (training mode samples)."""
        return self.quantizer(self._submaps(x))[1].flatten(1)

    @torch.no_grad()
    def decode(self, codes, keep=None):
        """codes (B, k) with k <= L*P, the first k of the sequence -> (B, C, H, W). Only the first `keep` (default
        k) are used; the rest are left out (null code with tail_dropout, else zeros)."""
        B, k = codes.shape
        keep = k if keep is None else min(keep, k)
        full = torch.zeros(B, self.num_codes, dtype=torch.long, device=codes.device)
        full[:, :k] = codes
        e_hat = self.quantizer.lookup(full).view(B, self.cfg.steps, self.positions, -1)
        if keep < self.num_codes:
            e_hat = self._leave_out(e_hat, keep)
        return self._decode_vectors(e_hat)

    def _prefixes(self):
        n = self.num_codes
        return sorted({2 ** i for i in range(int(math.log2(n)) + 1)} | {n})

    @torch.no_grad()
    def partial_decodes(self, x):
        """For eval.py (the paper's Fig. 5 left): {"codes_n": reconstruction from the first n codes}, n = 1, 2, 4, ...
        up to L*P, and L*P."""
        codes = self.encode(x)
        return {f"codes_{n}": self.decode(codes, n) for n in self._prefixes()}

    @torch.no_grad()
    def code_ablation(self, x, max_positions=64):
        """For eval.py (the paper's Fig. 5): {i: reconstruction with only code i left out}, for every position when
        there are at most max_positions codes, else for max_positions positions evenly spread."""
        codes = self.encode(x)
        B, n = codes.shape
        e_hat = self.quantizer.lookup(codes)  # (B, L*P, D)
        m = min(n, max_positions)
        positions = sorted({round(i * (n - 1) / max(m - 1, 1)) for i in range(m)})
        null = self.null_code.float() if self.cfg.tail_dropout else torch.zeros_like(e_hat[0, 0])
        out = {}
        for i in positions:
            e = e_hat.clone()
            e[:, i] = null
            out[i] = self._decode_vectors(e.view(B, self.cfg.steps, self.positions, -1))
        return out

    @torch.no_grad()
    def latents(self, x):
        """For eval.py: {"pq": (codebook (K, D), the vectors e_l of every step and sub-map (N, D), codes (N,))}."""
        _, codes, _, e = self.quantizer(self._submaps(x))
        return {"pq": (self.quantizer.codebook.detach().float(), e.reshape(-1, self.quantizer.dim), codes.flatten())}
