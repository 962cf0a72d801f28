"""
Evaluate a trained model: reconstruction quality and how its codebooks are used; use it on your own images.

  python eval.py --ckpt out/vqvae_shapes/ckpt.pt [--split test] [--ablation]    # a split of the model's dataset
  python eval.py --ckpt CKPT --images DIR --out OUT [--codes]    # reconstruct (and tokenize) every image under DIR
  python eval.py --ckpt CKPT --decode OUT/codes.npy --out DIR    # codes back to images
  python eval.py --curves out/vqvae_shapes/log.jsonl             # a run's training curves, curves.csv and .png

A split's evaluation writes, next to the checkpoint, <ckpt>_<split>_metrics.json, a reconstruction grid, and per
codebook <ckpt>_<split>_usage_<name>.csv (each code's count, least used first, and the Lorenz curve) with its PNG.
Every picture needs matplotlib, an optional extra; the CSV behind it is always written.

What the numbers mean (images are scaled to [0, 1] for every pixel metric, reconstructions clamped to [0, 1]):
  mse             mean squared error over every pixel of the split
  psnr            10 log10(1 / mse) of that global MSE (what skimage's peak_signal_noise_ratio gives for the whole
                  split taken as one image, data_range=1)
  psnr_per_image  the mean over images of each image's PSNR (a different, usually larger, number)
  ssim            the mean over images of each image's SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5,
                  K1 0.01, K2 0.03, data range 1, mean over positions and channels; see per_image_ssim)
  mean_image_psnr the PSNR of predicting every image by the split's mean image: the floor any model must beat
  skipped         images of the split that could not be read (named on stderr), when there are any
For each codebook (named by the model: "vq", or "top" / "bottom", ...):
  perplexity      exp(entropy) of the code counts over the whole split (the mean of per-batch perplexities is a
                  different, smaller number); K when every code is used equally often
  usage, dead     fraction of codes used at least once over the split, and the number never used
  gini            twice the area between the Lorenz curve of code usage and the diagonal: 0 for equal use
  eff_dim_99      the smallest k whose top-k PCA eigenvalues explain >= 99% of the variance, of the pre-quantization
                  latents and of the codebook vectors
  pr              participation ratio (sum l)^2 / sum l^2 of the same spectra
  waterfill_dim   the number of latent dimensions that reverse water-filling gives bits at rate log2 K
For models that can decode from part of their codes (model.partial_decodes(x) -> {name: x_hat}, e.g. the first n
groups of mgvq, "groups_n"), the mse and psnr of each such reconstruction, as "<name>/mse", and a
PNG strip of the first batch: inputs on top, then one row per partial reconstruction in the model's order.
With --ablation, for models that can leave out one code at a time (model.code_ablation(x) -> {position: x_hat}, e.g.
pqvae's ordered codes): code_ablation/mse_increase, the split's mse with the code at each of code_ablation/positions
left out minus the mse with all codes (how much that position carries: large for early codes when codes are ordered).
For models with measurements of their own (model.eval_stats(x) -> {name: tensor}, each a mean over the batch, a
scalar or one value per position: how often adaptive_vq chooses each codebook, pqvae's entropy of q(z_l | x) per
position), the split's mean of each, weighted by batch size, under its name. The hook runs under torch.no_grad(); a
model that needs gradients for a measurement enables them itself.
A model that does not reconstruct (a prior, prior.py: forward gives x_hat None) has no pixel or codebook metrics:
it is measured by the split's mean of its forward's stats (bits_per_code, bits_per_image), and eval.py's main adds
  baseline/uniform_...  the bits of the same codes when every code at a position is equally likely (log2 K each)
  baseline/unigram_...  the bits of the same codes under a per-position unigram fitted on the train split's codes
                        (see unigram_bits): a prior that learned anything from the context beats both
eval.py's main also reads the codes (model.encode, every level in order, flattened per image into one sequence:
raster order for grids) and reports
  codes/entropy_bits   the entropy in bits of the code at each position over the split (mean, min and the first
                       positions in the table, every position in the JSON): a position that every image codes alike
                       carries 0 bits, which one perplexity pooled over all positions hides
  classify/...         for datasets with labels (mnist, fashion_mnist, cifar10): the PQ-VAE paper's classification
                       from codes (section 5.4.1), fitted on the train split's codes and labels, the accuracy on the
                       evaluated split from the first n codes, by the "independent" and the "1-step conditional"
                       naive Bayes estimators (see classify_from_codes); at a large K, up to the positions whose
                       count tables fit in memory (classifiable_positions)
"""

import argparse
import collections
import contextlib
import csv
import hashlib
import importlib
import itertools
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------------------------------------------------------------
# Metric functions: small, importable, each tested against numpy.


def per_image_mse(x, x_hat):
    """Images in [-1, 1], (B, C, H, W) -> (B,) MSE on the [0, 1] scale, the reconstruction clamped to [0, 1]."""
    x01 = (x.float() + 1) / 2
    x_hat01 = ((x_hat.float() + 1) / 2).clamp(0, 1)
    return ((x_hat01 - x01) ** 2).flatten(1).mean(1)


def psnr(mse):
    """PSNR in dB for images with data range 1. Works on floats and tensors."""
    if torch.is_tensor(mse):
        return 10 * torch.log10(1 / mse)
    return 10 * math.log10(1 / mse) if mse > 0 else float("inf")


def per_image_ssim(x, x_hat, window=11, sigma=1.5, k1=0.01, k2=0.03):
    """Images in [-1, 1], (B, C, H, W) -> (B,) SSIM (Wang et al. 2004) on the [0, 1] scale (data range 1), the
    reconstruction clamped to [0, 1]: local means, variances and covariance under a window x window Gaussian of
    std sigma at every position where the window fits (no padding), the SSIM map's mean over positions and channels.
    An image smaller than the window gets a window of its own size (our choice; SSIM is not defined there)."""
    a, b = (x.double() + 1) / 2, ((x_hat.double() + 1) / 2).clamp(0, 1)
    size = min(window, *a.shape[-2:])
    offsets = torch.arange(size, dtype=torch.float64, device=a.device) - (size - 1) / 2
    g = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    C = a.shape[1]

    def blur(t):  # the 2-D Gaussian as two 1-D passes, per channel
        t = torch.nn.functional.conv2d(t, g.view(1, 1, size, 1).expand(C, 1, size, 1), groups=C)
        return torch.nn.functional.conv2d(t, g.view(1, 1, 1, size).expand(C, 1, 1, size), groups=C)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = k1 ** 2, k2 ** 2
    ssim_map = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1)


def perplexity(counts):
    """exp of the entropy of the distribution counts / counts.sum(); unused codes contribute nothing."""
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def eigenvalues(v):
    """Eigenvalues of the covariance of the rows of v (N, D), largest first, in float64."""
    v = v.double()
    v = v - v.mean(0)
    cov = v.t() @ v / max(v.shape[0] - 1, 1)
    return torch.linalg.eigvalsh(cov).flip(0).clamp(min=0)


def eff_dim(eigs, fraction=0.99):
    """The smallest k whose k largest eigenvalues explain at least `fraction` of their sum (eff_dim_99)."""
    cum = eigs.cumsum(0) / eigs.sum()
    return int((cum < fraction).sum()) + 1


def participation_ratio(eigs):
    """(sum l)^2 / sum l^2: D for an isotropic spectrum, 1 when one direction holds all the variance."""
    return float(eigs.sum() ** 2 / (eigs ** 2).sum())


def waterfill(eigs, bits):
    """Reverse water-filling of a Gaussian source with variances `eigs` at rate `bits`: the level theta with
    sum_i max(0, 1/2 log2(l_i / theta)) = bits. Returns (#{l_i > theta}, theta), the number of dimensions that get any
    bits. Solved exactly: with the k largest active, log2 theta = (sum_{i<k} log2 l_i - 2 bits) / k, and the right k is
    the one whose theta lies between the k-th and (k+1)-th eigenvalue."""
    eigs = eigs[eigs > 0].double().sort(descending=True).values
    log_l = eigs.log2()
    for k in range(1, len(eigs) + 1):
        log_theta = (log_l[:k].sum() - 2 * bits) / k
        if k == len(eigs) or log_theta >= log_l[k]:
            return k, float(2 ** log_theta)
    return 0, 0.0  # no variance at all (a collapsed encoder): no dimension to spend bits on


def codebook_metrics(counts, latents, codebook):
    """Usage and effective dimension of one codebook. counts (K,), latents (N, D), codebook (K, D)."""
    K = counts.numel()
    lat_eigs, cb_eigs = eigenvalues(latents), eigenvalues(codebook)
    used = int((counts > 0).sum())
    return {
        "perplexity": perplexity(counts),
        "usage": used / K,
        "dead": K - used,
        "gini": gini(counts),
        "eff_dim_99_latent": eff_dim(lat_eigs),
        "eff_dim_99_codebook": eff_dim(cb_eigs),
        "pr_latent": participation_ratio(lat_eigs),
        "pr_codebook": participation_ratio(cb_eigs),
        "waterfill_dim": waterfill(lat_eigs, math.log2(K))[0],
    }


def code_sequence(codes):
    """A model's codes (a tensor (B, ...) or a tuple of them, one per level) -> (B, n) int64, one sequence per image:
    the levels in order, each flattened in raster order (groups last)."""
    levels = codes if isinstance(codes, (tuple, list)) else (codes,)
    return torch.cat([c.reshape(c.shape[0], -1).long() for c in levels], 1)


def sequence_to_codes(seq, layout):
    """code_sequence's inverse: (B, n) -> the codes as the model's encode gives them, for its code_layout() `layout`
    [(one image's code shape, K), ...]: a tensor for one level, a tuple for several."""
    sizes = [math.prod(shape) for shape, _ in layout]
    if seq.shape[1] != sum(sizes):
        raise ValueError(f"a sequence of {seq.shape[1]} codes, where the layout {layout} holds {sum(sizes)}")
    levels = tuple(part.reshape(seq.shape[0], *shape) for part, (shape, _) in zip(seq.split(sizes, 1), layout))
    return levels if len(levels) > 1 else levels[0]


def position_entropy(codes):
    """Entropy in bits of the empirical distribution of the code at each position: codes (N, n) -> (n,) float64."""
    codes = codes - codes.min()  # some models mark an unused slot with -1
    N, n = codes.shape
    K = int(codes.max()) + 1
    keys = (torch.arange(n) * K + codes).flatten()
    p = torch.zeros(n * K, dtype=torch.float64).index_add_(0, keys, torch.ones(keys.shape, dtype=torch.float64))
    p = p.view(n, K) / N
    return -(p * torch.log2(p.clamp(min=1e-300))).sum(1) + 0.0  # + 0.0: no -0 for a constant position


def classify_from_codes(train_codes, train_labels, codes, prefixes, alpha=1.0):
    """The PQ-VAE paper's classification from codes (section 5.4.1): count the codes of each class on the training
    codes (N, n) and labels (N,), then give each row of `codes` (M, n) the class of highest posterior by Bayes' rule
    from its first m codes, for each m in prefixes. Returns {"independent": (M, len(prefixes)), "1step": ...} int64
    class predictions.
      independent   p(c) prod_l p(z_l | c)
      1step         p(c) p(z_1 | c) prod_(l>1) p(z_l | z_(l-1), c)
    Smoothing (the paper is silent; our choice): p(z_l = k | c) = (count + alpha) / (N_c + alpha K), K = the largest
    code + 1; the 1-step estimate adds alpha K pseudo-counts spread as p(z_l | c), so that a rarely seen z_(l-1)
    falls back on the independent estimate."""
    lo = min(int(train_codes.min()), int(codes.min()))
    train = (train_codes - lo).numpy().astype(np.int64)
    test = (codes - lo).numpy().astype(np.int64)
    y = np.asarray(train_labels, dtype=np.int64)
    N, n = train.shape
    K, C = int(max(train.max(), test.max())) + 1, int(y.max()) + 1
    pos, classes = np.arange(n), np.arange(C)
    counts = np.zeros((n, C, K))  # counts[l, c, k]: training images of class c with code k at position l
    np.add.at(counts, (pos[None, :], y[:, None], train), 1)
    n_class = np.bincount(y, minlength=C).astype(np.float64)  # (C,)
    p_indep = (counts + alpha) / (n_class[None, :, None] + alpha * K)  # (n, C, K)
    # pairs (z_(l-1), z_l) per position l >= 1 and class, counted sparsely: n C K^2 counts would not fit
    keys, pair_counts = np.unique(pair_key(pos[None, 1:], y[:, None], train[:, :-1], train[:, 1:], C, K),
                                  return_counts=True)
    with np.errstate(divide="ignore"):  # a class without training images gets probability 0: never chosen
        log_prior = np.log(n_class / N)
    out = {"independent": [], "1step": []}
    for i in range(0, len(test), 1024):  # in chunks of rows, so that the (rows, n, C) arrays stay small
        rows = test[i:i + 1024]
        log_indep = np.log(p_indep[pos[None, :, None], classes[None, None, :], rows[:, :, None]])  # (M, n, C)
        query = pair_key(pos[None, 1:, None], classes[None, None, :], rows[:, :-1, None], rows[:, 1:, None], C, K)
        at = np.clip(np.searchsorted(keys, query), 0, max(len(keys) - 1, 0))
        pair = np.where(keys[at] == query, pair_counts[at], 0) if len(keys) else np.zeros(query.shape)
        prev = counts[pos[None, :-1, None], classes[None, None, :], rows[:, :-1, None]]  # (M, n-1, C): z_(l-1)'s
        log_step = np.log((pair + alpha * K * np.exp(log_indep[:, 1:])) / (prev + alpha * K))
        log_1step = np.concatenate([log_indep[:, :1], log_step], 1)  # (M, n, C)
        for name, log_p in (("independent", log_indep), ("1step", log_1step)):
            cum = log_prior + np.cumsum(log_p, 1)  # (M, n, C): log posterior, up to a constant, from the first l codes
            out[name].append(np.stack([cum[:, m - 1].argmax(1) for m in prefixes], 1))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def pair_key(l, c, prev, cur, C, K):
    """One int64 key for (position l, class c, code z_(l-1), code z_l), of C classes and K codes."""
    return ((l * C + c) * K + prev) * K + cur


def unigram_bits(train_codes, codes, sizes, alpha=1.0):
    """Bits of each row of `codes` (M, n) under a per-position unigram model fitted on train_codes (N, n): code k at
    position t has probability (count + alpha) / (N + alpha K_t), K_t = sizes[t] (add-alpha smoothing, our choice:
    a code unseen in training costs finite bits). Returns (M,) float64."""
    N, n = train_codes.shape
    sizes = torch.as_tensor(sizes, dtype=torch.float64)
    counts = torch.zeros(n, int(sizes.max()), dtype=torch.float64)  # counts[t, k]: training rows with code k at t
    counts.scatter_add_(1, train_codes.t().long(), torch.ones(n, N, dtype=torch.float64))
    p = (counts + alpha) / (N + alpha * sizes[:, None])  # (n, K_max); entries past K_t are never looked up
    return -torch.log2(p.gather(1, codes.t().long())).sum(0)  # (n, M) -> (M,)


def classifiable_positions(n, classes, K, max_entries=2 ** 25):
    """How many leading code positions classify_from_codes can take: its two count tables are (positions, classes, K)
    float64 (256 MiB each at max_entries), so at a large K, adaptive_vq's 65,536, only the first positions fit."""
    return max(1, min(n, max_entries // (classes * K)))


def prefix_lengths(n):
    """1, 2, 4, ... up to n, and n."""
    return sorted({2 ** i for i in range(int(math.log2(n)) + 1)} | {n})


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation over a split


@torch.no_grad()
def evaluate(model, loader, device, autocast=None, max_batches=None, max_latents=50_000, diagnostics=False,
             ablation=False):
    """Run `model` (in eval mode) over `loader`; returns a flat dict of the metrics in the module docstring, plus the
    first batch's inputs and reconstructions under the key "_grid" for save_grid. Latent spectra use about
    `max_latents` vectors per codebook, drawn evenly from every batch with a fixed seed. With `diagnostics`, also,
    under "_strip", the rows of partial reconstructions of the first batch for save_rows, each codebook's code counts
    under "_counts", and each image's code sequence under "_codes" with the per-position entropy (eval.py's main asks
    for them; validation during training does not). With `ablation`, the costlier code ablation (one decode per code
    position). A loader whose dataset skips unreadable images (data.collate_readable) gives smaller batches: the
    images missing are counted as "skipped"."""
    n_batches = len(loader) if max_batches is None else min(len(loader), max_batches)
    picker = torch.Generator().manual_seed(0)
    was_training = model.training
    model.eval()
    mse_sum = n_images = 0.0
    px_sum = px_sq_sum = None  # per-pixel sums for the mean-image baseline
    per_image_psnr, per_image_ssims = [], []
    counts, latents, codebooks, partial_sse = {}, {}, {}, {}  # per codebook, or per partial decode
    grid = strip = None
    ablation_sse = {}  # position -> summed increase of the per-image mse when that code is left out
    stat_sums = {}  # name -> sum over batches of (the model's own batch-mean measurement) x (batch size)
    sequences = []  # each batch's codes, (B, n), with diagnostics
    for i, x in enumerate(tqdm(loader, total=n_batches, desc="evaluating", leave=False, disable=not diagnostics)):
        if max_batches is not None and i >= max_batches:
            break
        if not len(x):  # every image of the batch was unreadable
            continue
        x = x.to(device, non_blocking=True)
        with autocast or torch.autocast(device.type, enabled=False):
            x_hat, _, forward_stats = model(x)
            views = model.latents(x) if hasattr(model, "latents") else {}  # {name: (codebook, z (N, D), codes (N,))}
            partial = model.partial_decodes(x) if hasattr(model, "partial_decodes") else {}
            ablated = model.code_ablation(x) if ablation and hasattr(model, "code_ablation") else {}
            own = model.eval_stats(x) if hasattr(model, "eval_stats") else {}
            if diagnostics and hasattr(model, "encode"):
                sequences.append(code_sequence(model.encode(x)).cpu())
        if x_hat is None:  # a model that does not reconstruct (a prior) is measured by its forward's stats
            own = {**forward_stats, **own}
        for name, value in own.items():
            stat_sums[name] = stat_sums.get(name, 0.0) + torch.as_tensor(value).detach().double().cpu() * x.shape[0]
        n_images += x.shape[0]
        for name, (codebook, z, codes) in views.items():
            codebooks[name] = codebook.float().cpu()
            c = torch.bincount(codes.flatten(), minlength=codebook.shape[0]).cpu()
            counts[name] = c if name not in counts else counts[name] + c
            rows = torch.randperm(z.shape[0], generator=picker)[:math.ceil(max_latents / n_batches)]
            latents.setdefault(name, []).append(z.cpu()[rows].float())
        if x_hat is None:
            continue
        for name, x_part in partial.items():  # reconstructions from part of the codes: MSE per variant
            partial_sse[name] = partial_sse.get(name, 0.0) + float(per_image_mse(x, x_part).double().sum())
        mse = per_image_mse(x, x_hat).double()  # (B,)
        for pos, x_abl in ablated.items():
            ablation_sse[pos] = ablation_sse.get(pos, 0.0) + float((per_image_mse(x, x_abl).double() - mse).sum())
        mse_sum += float(mse.sum())
        per_image_psnr.append(psnr(mse.clamp(min=1e-12)))
        per_image_ssims.append(per_image_ssim(x, x_hat).cpu())
        x01 = (x.double() + 1) / 2
        px_sum = x01.sum(0) if px_sum is None else px_sum + x01.sum(0)
        px_sq_sum = (x01 ** 2).sum(0) if px_sq_sum is None else px_sq_sum + (x01 ** 2).sum(0)
        if grid is None:
            grid = (x.cpu(), x_hat.float().cpu())
            strip = [x.cpu()] + [x_part.float().cpu() for x_part in partial.values()] if partial else None
    if not n_images:
        raise ValueError("evaluate: the loader gave no images (none, or none readable)")
    model.train(was_training)

    out = {"images": int(n_images)}
    if getattr(loader, "batch_size", None) is not None:  # images the loader should have given, less those it gave
        skipped = min(len(loader.dataset), n_batches * loader.batch_size) - int(n_images)
        out.update({"skipped": skipped} if skipped else {})
    if per_image_psnr:
        mse = mse_sum / n_images
        mean_image_mse = float((px_sq_sum / n_images - (px_sum / n_images) ** 2).mean())
        out = {"mse": mse, "psnr": psnr(mse), "psnr_per_image": float(torch.cat(per_image_psnr).mean()),
               "ssim": float(torch.cat(per_image_ssims).mean()), "mean_image_psnr": psnr(mean_image_mse), **out}
    for name, c in counts.items():
        for key, value in codebook_metrics(c, torch.cat(latents[name]), codebooks[name]).items():
            out[f"{name}/{key}"] = value
    for name, sse in partial_sse.items():
        out[f"{name}/mse"] = sse / n_images
        out[f"{name}/psnr"] = psnr(sse / n_images)
    for name, total in stat_sums.items():
        out[name] = (total / n_images).tolist()  # a float, or a list of one value per position
    if sequences:
        codes = torch.cat(sequences)
        bits = position_entropy(codes)
        out.update({"codes/entropy_bits_mean": float(bits.mean()), "codes/entropy_bits_min": float(bits.min()),
                    "codes/entropy_bits": bits.tolist()})
    if ablation_sse:
        positions = sorted(ablation_sse)
        out["code_ablation/positions"] = positions
        out["code_ablation/mse_increase"] = [ablation_sse[p] / n_images for p in positions]
    out["_grid"] = grid
    if diagnostics:
        out["_strip"] = strip
        out["_counts"] = counts
        out["_codes"] = torch.cat(sequences) if sequences else None
    return out


def save_grid(x, x_hat, path, n=8):
    """A PNG with the first n inputs on the top row and their reconstructions below; images in [-1, 1]."""
    save_rows([x, x_hat], path, n)


def save_rows(rows, path, n=8):
    """A PNG with one row per batch of images in `rows` (each (B, C, H, W) in [-1, 1]), the first n of each."""
    rows = [((r[:n].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8) for r in rows]  # (n, C, H, W)
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (C, rows * H, nW)
    grid = grid.permute(1, 2, 0).numpy()  # (rows * H, nW, C)
    if grid.shape[2] == 1:
        grid = grid[:, :, 0]
    tmp = path + ".tmp.png"
    try:
        Image.fromarray(np.ascontiguousarray(grid)).save(tmp)
        os.replace(tmp, path)
    except OSError:  # a full disk: no half-written file left behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def format_table(metrics):
    """Two columns, metric and value, in the order of the dict; private keys (starting with _) left out."""
    lines = []
    for key, value in metrics.items():
        if key.startswith("_"):
            continue
        if isinstance(value, list):  # per-position values: one compact line, the first 16 of a long list
            shown = " ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in value[:16])
            value = shown + (f" ... ({len(value)} values)" if len(value) > 16 else "")
        lines.append(f"{key:<28} {value:.6g}" if isinstance(value, float) else f"{key:<28} {value}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Loading a checkpoint written by train.py


def import_model(name, program="train.py"):
    """Import <name>.py from this directory (or sys.path) and check it has Config and Model; `program` names the
    caller in the message otherwise."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:
            raise
        models = sorted(f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and f[:-3] not in
                        ("train", "train_utils", "eval", "data", "bench", "sample", "setup", "conftest"))
        raise SystemExit(f"{program}: unknown --model {name!r}: no {name}.py (models here: {', '.join(models)})")
    for attr in ("Config", "Model"):
        if not hasattr(module, attr):
            raise SystemExit(f"{program}: {name}.py has no {attr}: it is not a model file")
    return module


def checked_device(name, program):
    """torch.device(name), or an exit in one line when there is no such device here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"{program}: --device {name} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{program}: --device {name}: no CUDA GPU here (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise SystemExit(f"{program}: --device {name}: there {'is' if count == 1 else 'are'} {count} CUDA "
                         f"GPU{'' if count == 1 else 's'} here, numbered from 0")
    return device


def read_checkpoint(path, program="eval.py"):
    """A checkpoint written by train.py, loaded on the CPU (weights only), or an exit in one line naming the file
    (or the non-finite tensors among its weights)."""
    if not os.path.isfile(path):
        raise SystemExit(f"{program}: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which file, not a pickle traceback
        reason = (str(err).strip() or type(err).__name__).splitlines()[0][:200]
        raise SystemExit(f"{program}: cannot read checkpoint {path} (truncated, corrupt, or not train.py's): "
                         f"{reason}") from None
    if not isinstance(ckpt, dict) or not {"model", "model_config", "train_config"} <= set(ckpt):
        raise SystemExit(f"{program}: {path} is not a checkpoint written by train.py")
    bad = [name for name, t in ckpt["model"].items() if torch.is_tensor(t) and t.is_floating_point()
           and not bool(torch.isfinite(t).all())]
    if bad:  # a run saved after its weights diverged: nothing to resume or evaluate
        raise SystemExit(f"{program}: {path} holds non-finite values in {', '.join(bad[:5])}"
                         + (f" and {len(bad) - 5} more tensors" if len(bad) > 5 else ""))
    return ckpt


def load_model(path, device="cpu", program="eval.py"):
    """Rebuild the model saved in a train.py checkpoint. Returns (model in eval mode, checkpoint dict)."""
    ckpt = read_checkpoint(path, program)
    module = import_model(ckpt["train_config"]["model"], program)
    model = build_model(module, ckpt["model_config"], path, ckpt["model"])
    return model.to(device).eval(), ckpt


def build_model(module, config, source, weights=None):
    """module.Model(module.Config(**config)) with `weights` loaded (see check_config and load_weights)."""
    check_config(module, config, source)
    model = module.Model(module.Config(**config))
    if weights is not None:
        load_weights(model, weights, source)
    return model


def check_config(module, config, source):
    """Exit, naming them, when `source` (a checkpoint) holds settings that module.Config lacks: it was written by
    another version of the model file."""
    unknown = sorted(set(config) - set(module.Config.__dataclass_fields__))
    if unknown:
        raise SystemExit(f"{source} was written by another version of {module.__name__}.py: its settings "
                         f"{', '.join(unknown)} are not {module.__name__}.Config's")


def load_weights(model, weights, source):
    """model.load_state_dict(weights), or an exit saying which weights of `source` do not fit (other names or shapes:
    a checkpoint written by another version of the model file)."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise SystemExit(f"{source} was written by another version of {type(model).__module__}.py: "
                         + "; ".join(line.rstrip(".") for line in lines[1:] or lines)) from None


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a train.py checkpoint on a split of its dataset, reconstruct or "
                                "tokenize a folder of your own images, decode codes, or draw a run's training curves.")
    p.add_argument("--ckpt", default=None, help="checkpoint written by train.py")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--data_dir", default=None, help="default: the one the model was trained with")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--max_batches", type=int, default=None, help="evaluate only this many batches")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write the metrics here (default: next to the checkpoint)")
    p.add_argument("--grid", default=None, help="reconstruction grid PNG (default: next to the checkpoint)")
    p.add_argument("--strip", default=None, help="partial reconstructions PNG, for models with partial_decodes "
                   "(default: next to the checkpoint)")
    p.add_argument("--classify", default="auto", choices=["auto", "off"],
                   help="classification from codes, fitted on the train split: auto = when the dataset has labels")
    p.add_argument("--ablation", action="store_true",
                   help="also the code ablation (one decode per code position: costly for long codes)")
    p.add_argument("--images", default=None,
                   help="reconstruct every image file under this folder (recursively; PNG, JPEG, BMP, WebP, any size) "
                        "into --out, each first brought to the model's input as its dataset does: celeba's central "
                        "140x140 resized, any other dataset's shorter side scaled to image_size and the central square "
                        "kept; grayscale for a 1-channel model")
    p.add_argument("--codes", action="store_true", help="with --images: also write the codes, --out/codes.npy (one "
                   "row per image, the code sequence of eval.code_sequence) and codes.json (checkpoint, config, files)")
    p.add_argument("--decode", default=None, help="a codes .npy (from --codes or sample.py): decode it into --out")
    p.add_argument("--curves", default=None, help="a run's log.jsonl: draw its training curves (CSV and PNG) into "
                   "--out (default: beside the log)")
    p.add_argument("--out", default=None, help="output folder for --images, --decode and --curves")
    args = p.parse_args(argv)
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f"eval.py: --out {args.out} is a file; give a folder")
    if args.curves:
        return draw_curves(args.curves, args.out or os.path.dirname(os.path.abspath(args.curves)))
    if not args.ckpt:
        p.error("give --ckpt (or --curves LOG)")
    if (args.images or args.decode) and not args.out:
        p.error("--images and --decode need --out, the folder to write into")
    if args.codes and not args.images:
        p.error("--codes goes with --images")
    if args.batch_size < 1 or (args.max_batches is not None and args.max_batches < 1):
        p.error("--batch_size and --max_batches must be at least 1")

    device = checked_device(args.device, "eval.py")
    for option in ("json", "grid", "strip"):  # before the work: a path that cannot be written is refused now
        path = getattr(args, option)
        folder = os.path.dirname(os.path.abspath(path or args.ckpt))
        if path and not os.path.isdir(folder):
            raise SystemExit(f"eval.py: --{option}: the folder {folder} does not exist")
        if path and os.path.isdir(path):
            raise SystemExit(f"eval.py: --{option} {path} is a folder; give a file name")
    model, ckpt = load_model(args.ckpt, device)
    if args.images:
        return reconstruct_folder(model, ckpt, args, device)
    if args.decode:
        return decode_codes(model, ckpt, args, device)
    return evaluate_split(model, ckpt, args, device)


def evaluate_split(model, ckpt, args, device):
    import data  # here, not at the top: the metric functions above need nothing from data.py
    tcfg, mcfg = ckpt["train_config"], ckpt["model_config"]
    data_dir = args.data_dir or tcfg["data_dir"] or None
    sizes = getattr(model, "code_sizes", None)  # a prior: K at each position, for its baselines
    shape = dict(image_size=mcfg["image_size"], channels=mcfg.get("in_channels"), skip_unreadable=True)
    try:
        dataset = data.get_dataset(tcfg["dataset"], args.split, data_dir, **shape)
        labels = data.get_labels(tcfg["dataset"], args.split, data_dir) if args.classify == "auto" else None
        train_labels = data.get_labels(tcfg["dataset"], "train", data_dir) if labels is not None else None
        train_set = None
        if train_labels is not None or sizes is not None:
            train_set = data.get_dataset(tcfg["dataset"], "train", data_dir, **shape)
        if train_labels is not None:
            for split, images, found in ((args.split, dataset, labels), ("train", train_set, train_labels)):
                if len(found) != len(images):
                    raise data.DataError(f"{tcfg['dataset']} {split}: {len(images)} images but {len(found)} labels")
    except data.DataError as err:
        raise SystemExit(f"eval.py: {err}") from err
    if getattr(dataset, "note", None):
        print(f"note: {dataset.note}")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=data.collate_readable)
    try:
        metrics = evaluate(model, loader, device, max_batches=args.max_batches, diagnostics=True,
                           ablation=args.ablation)
    except ValueError as err:  # nothing readable in the split
        raise SystemExit(f"eval.py: {tcfg['dataset']} {args.split}: {err}") from None
    codes = metrics.pop("_codes")
    if train_set is not None and codes is not None:
        train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size,
                                                   collate_fn=data.collate_readable)
        n_batches = min(len(train_loader), args.max_batches or len(train_loader))  # --max_batches: the train split too
        batches = tqdm(itertools.islice(train_loader, n_batches), total=n_batches, desc="codes of the train split",
                       leave=False)
        with torch.no_grad():
            train_codes = torch.cat([code_sequence(model.encode(x.to(device))).cpu() for x in batches if len(x)])
    if sizes is not None and codes is not None:  # the same codes under uniform and per-position unigram models
        uniform = float(torch.log2(sizes.double()).sum())
        unigram = float(unigram_bits(train_codes, codes, sizes.cpu()).mean())
        for name, bits in (("uniform", uniform), ("unigram", unigram)):
            metrics[f"baseline/{name}_bits_per_image"] = bits
            metrics[f"baseline/{name}_bits_per_code"] = bits / len(sizes)
    if train_labels is not None and codes is not None:  # labelled datasets are arrays: no image is ever skipped
        K = int(max(train_codes.max(), codes.max())) - int(min(train_codes.min(), codes.min())) + 1
        n = classifiable_positions(codes.shape[1], int(max(train_labels.max(), labels.max())) + 1, K)
        prefixes = prefix_lengths(n)
        predicted = classify_from_codes(train_codes[:, :n], train_labels[:len(train_codes)], codes[:, :n], prefixes)
        metrics["classify/n"] = prefixes
        for name, pred in predicted.items():  # the evaluated images are the split's first len(codes), in order
            metrics[f"classify/{name}"] = (pred == labels[:len(codes), None]).mean(0).tolist()

    stem = f"{os.path.splitext(args.ckpt)[0]}_{args.split}"
    grid_path = args.grid or f"{stem}_recon.png"
    json_path = args.json or f"{stem}_metrics.json"
    grid = metrics.pop("_grid")
    if grid is not None:
        save_grid(*grid, grid_path)
    strip = metrics.pop("_strip")
    if strip:
        strip_path = args.strip or f"{stem}_partial.png"
        save_rows(strip, strip_path)
        print(f"wrote {strip_path}: inputs, then the partial reconstructions in order")
    for name, counts in metrics.pop("_counts").items():
        usage_path = f"{stem}_usage_{name.replace('/', '_')}"
        drawn = write_usage(counts, usage_path, f"{tcfg['model']} {name}, {args.split} split")
        print(f"wrote {usage_path}.csv" + (" and .png" if drawn else "")
              + f": the Lorenz curve and sorted counts of codebook {name!r}")
    print(f"{tcfg['model']} on {tcfg['dataset']} ({args.split}, {metrics['images']} images), step {ckpt['step']}")
    print(format_table(metrics))
    with open(json_path, "w") as f:
        json.dump({"checkpoint": args.ckpt, "split": args.split, "step": ckpt["step"], **metrics}, f, indent=2)
    print(f"wrote {json_path}" + (f" and {grid_path}" if grid is not None else ""))
    return metrics


# ---------------------------------------------------------------------------------------------------------------------
# Your own images: reconstruct a folder, write its codes, decode codes


def reconstruct_folder(model, ckpt, args, device):
    """eval.py --images DIR --out OUT [--codes]: see main's help. Unreadable files are named and skipped; exits
    non-zero only when no image could be read."""
    import data
    root, out = os.path.abspath(args.images), os.path.abspath(args.out)
    if not os.path.isdir(root):
        raise SystemExit(f"eval.py: --images {args.images} is not a folder")
    if os.path.commonpath([root, out]) == root:  # the outputs would land among (or over) the inputs
        raise SystemExit(f"eval.py: --out {args.out} lies inside --images {args.images}: choose a folder outside it")
    if getattr(model, "tokenizer", None) is not None:
        raise SystemExit(f"eval.py: {args.ckpt} is a {ckpt['train_config']['model']}, which does not reconstruct: "
                         "give its tokenizer's checkpoint")
    paths = data.list_images(root)
    if not paths:
        raise SystemExit(f"eval.py: no image files under {args.images} (ending in {' '.join(data.IMAGE_EXTENSIONS)})")
    others = sum(len(files) for _, _, files in os.walk(root)) - len(paths)
    if others:
        print(f"note: {others} files under {args.images} do not end in {' '.join(data.IMAGE_EXTENSIONS)} and are "
              "left out")
    layout = code_layout(model) if args.codes else None
    # the dataset's reader on these files: its recipe, grayscale for a 1-channel model, unreadable files named and None
    images = data.ImageFiles(paths, ckpt["model_config"]["image_size"],
                             data.input_transform(ckpt["train_config"]["dataset"]))
    images.mode = "L" if ckpt["model_config"].get("in_channels") == 1 else "RGB"
    images.skip_unreadable = True
    files = [os.path.relpath(path, root) for path in paths]
    names = output_names(files)
    rows, skipped, sequences = [], [], []  # rows: (file, output, mse, psnr, ssim) of each image read
    for start in tqdm(range(0, len(paths), args.batch_size), desc="reconstructing", unit="batch"):
        batch = [(i, images[i]) for i in range(start, min(start + args.batch_size, len(paths)))]
        skipped += [files[i] for i, image in batch if image is None]
        batch = [(i, image) for i, image in batch if image is not None]
        if not batch:
            continue
        kept = [i for i, _ in batch]
        x = torch.stack([image for _, image in batch]).to(device)
        with torch.no_grad():
            x_hat = model(x)[0]
            if layout is not None:
                sequences.append(code_sequence(model.encode(x)).cpu())
        mse, ssim = per_image_mse(x, x_hat).cpu().tolist(), per_image_ssim(x, x_hat).cpu().tolist()
        for i, image, m, s in zip(kept, x_hat.cpu(), mse, ssim):
            save_image(image, os.path.join(out, names[i]))
            rows.append((files[i], names[i], m, psnr(max(m, 1e-12)), s))  # the per-image PSNR as evaluate's
    if not rows:
        raise SystemExit(f"eval.py: no image under {args.images} could be read ({len(skipped)} skipped)")
    write_csv(os.path.join(out, "reconstructions.csv"), ["file", "output", "mse", "psnr", "ssim"], rows)
    mse = float(np.mean([r[2] for r in rows]))
    summary = {"checkpoint": os.path.abspath(args.ckpt), "images": len(rows), "skipped": len(skipped),
               "skipped_files": skipped, "mse": mse, "psnr": psnr(mse),
               "psnr_per_image": float(np.mean([r[3] for r in rows])), "ssim": float(np.mean([r[4] for r in rows]))}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(format_table({k: v for k, v in summary.items() if k not in ("checkpoint", "skipped_files")}))
    if layout is not None:
        codes = torch.cat(sequences).numpy()
        np.save(os.path.join(out, "codes.npy"), codes.astype(np.int32))
        with open(os.path.join(out, "codes.json"), "w") as f:
            json.dump({"checkpoint": os.path.abspath(args.ckpt), "weights_sha256": fingerprint(model),
                       "model": ckpt["train_config"]["model"], "model_config": ckpt["model_config"],
                       "code_layout": [[list(shape), k] for shape, k in layout], "files": [r[0] for r in rows]},
                      f, indent=1)
        print(f"wrote {os.path.join(args.out, 'codes.npy')}: {codes.shape[0]} images x {codes.shape[1]} codes")
    print(f"wrote {len(rows)} reconstructions, reconstructions.csv and summary.json to {args.out}"
          + (f"; skipped {len(skipped)} unreadable files" if skipped else ""))
    return summary


def decode_codes(model, ckpt, args, device):
    """eval.py --decode CODES.npy --out OUT: one PNG per row of codes, named as the codes.json beside it says."""
    try:
        array = np.load(args.decode, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise SystemExit(f"eval.py: cannot read codes from {args.decode}: {err}") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise SystemExit(f"eval.py: {args.decode} is not one array of codes (an .npy file, as --codes writes)")
    if not np.issubdtype(array.dtype, np.integer):
        raise SystemExit(f"eval.py: {args.decode} holds {array.dtype} values; codes are integers")
    codes = torch.from_numpy(array).long()
    tokenizer = getattr(model, "tokenizer", None)  # a prior decodes through its tokenizer
    sizes = model.code_sizes.cpu() if tokenizer is not None else position_sizes(code_layout(model))
    if codes.ndim != 2 or codes.shape[1] != len(sizes):
        raise SystemExit(f"eval.py: {args.decode} holds an array of shape {tuple(codes.shape)}; this model's codes "
                         f"are (images, {len(sizes)})")
    bad = (codes < 0) | (codes >= sizes)
    if bad.any():
        row, col = (int(v) for v in bad.nonzero()[0])
        raise SystemExit(f"eval.py: {args.decode}: code {int(codes[row, col])} at image {row}, position {col} is "
                         f"outside 0..{int(sizes[col]) - 1}")
    meta_path = os.path.splitext(args.decode)[0] + ".json"
    names = [f"{i:06d}.png" for i in range(len(codes))]
    if os.path.isfile(meta_path):  # written by --codes: the tokenizer's weights must be the ones that encoded
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            meta = None
        if not isinstance(meta, dict):
            raise SystemExit(f"eval.py: {meta_path}, beside the codes, is not the JSON that --codes writes: move it "
                             f"away to decode the codes alone")
        if meta.get("weights_sha256") != fingerprint(tokenizer or model):
            raise SystemExit(f"eval.py: {args.decode} holds the codes of {meta.get('checkpoint')}, whose weights "
                             f"differ from those {args.ckpt} decodes with")
        if len(meta.get("files", [])) == len(codes):
            names = output_names(meta["files"])
        else:
            print(f"note: {meta_path} names {len(meta.get('files', []))} files for {len(codes)} rows of codes: the "
                  "images are numbered instead")
    decode = model.decode if tokenizer is not None else lambda seq: model.decode(
        sequence_to_codes(seq, model.code_layout()))
    for start in tqdm(range(0, len(codes), args.batch_size), desc="decoding", unit="batch"):
        with torch.no_grad():
            images = decode(codes[start:start + args.batch_size].to(device)).cpu()
        for image, name in zip(images, names[start:start + args.batch_size]):
            save_image(image, os.path.join(args.out, name))
    print(f"wrote {len(codes)} images to {args.out}")
    return len(codes)


def fingerprint(model):
    """sha256 of a model's weights and buffers (its state dict, in key order): which weights made a set of codes."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def code_layout(model):
    """The model's code_layout(), or a clear exit for a model whose codes have no fixed layout."""
    if not hasattr(model, "code_layout"):
        raise SystemExit(f"eval.py: {type(model).__module__} has no code layout to write or read codes with")
    try:
        return model.code_layout()
    except ValueError as err:  # adaptive_vq, or warmup_vqgan before its switch
        raise SystemExit(f"eval.py: no codes to write or read: {err}") from None


def position_sizes(layout):
    """K at each position of code_sequence's order, for a code_layout() [(shape, K), ...] -> (n,) int64."""
    return torch.cat([torch.full((math.prod(shape),), k) for shape, k in layout])


def output_names(files):
    """Input file names (relative) -> distinct output PNG names: the same name with .png for its extension, or with
    .png added where two inputs share a stem (a.jpg and a.png), and _2, _3, ... where that still collides."""
    stems = collections.Counter(os.path.splitext(f)[0] for f in files)
    names, taken = [], set()
    for f in files:
        stem = os.path.splitext(f)[0] if stems[os.path.splitext(f)[0]] == 1 else f
        name, n = f"{stem}.png", 1
        while name in taken:
            n += 1
            name = f"{stem}_{n}.png"
        taken.add(name)
        names.append(name)
    return names


def save_image(image, path):
    """One image (C, H, W) in [-1, 1] -> a PNG at path, its folders made as needed."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_rows([image[None]], path, n=1)


# ---------------------------------------------------------------------------------------------------------------------
# Pictures, each with the CSV of its numbers: code usage (Lorenz curves) and training curves


def lorenz(counts):
    """counts (K,) -> (x, y), float64 (K + 1,) each: the Lorenz curve of code usage. With the codes sorted from least
    to most used, y[i] is the share of all uses that the i least used codes take, x[i] = i / K. The diagonal when every
    code is used equally; a collapsed codebook stays near 0 and rises only at the end."""
    c = counts.double().sort().values
    x = torch.arange(len(c) + 1, dtype=torch.float64) / len(c)
    return x, torch.cat([torch.zeros(1, dtype=torch.float64), c.cumsum(0) / c.sum()])


def gini(counts):
    """Twice the area between the diagonal and the Lorenz curve: 0 when every code is used equally, 1 - 1/K when one
    code takes every use."""
    x, y = lorenz(counts)
    return float(1 - ((y[1:] + y[:-1]) * (x[1:] - x[:-1])).sum())


def write_usage(counts, stem, title):
    """stem.csv: each code's count, least used first, with the Lorenz curve's point (the counts column read bottom up
    is the sorted usage histogram); stem.png: the Lorenz curve beside the histogram, when matplotlib is there (then
    returns True)."""
    order = counts.argsort(stable=True)
    x, y = lorenz(counts)
    rows = [(i, int(order[i]), int(counts[order[i]]), float(x[i + 1]), float(y[i + 1])) for i in range(len(counts))]
    write_csv(stem + ".csv", ["rank_from_least_used", "code", "count", "code_fraction", "usage_fraction"], rows)
    ranked = counts.sort(descending=True).values.tolist()
    return plot(stem + ".png", title, [
        ("Lorenz curve of code usage", "fraction of codes, least used first", "fraction of uses",
         [("equal use", [0, 1], [0, 1], "--"), (f"gini {gini(counts):.2f}", x.tolist(), y.tolist(), "-")]),
        ("codes by use", "rank", "uses (log scale)", [("count", list(range(1, len(ranked) + 1)), ranked, "bar")]),
    ])


def draw_curves(log_path, out_dir):
    """eval.py --curves LOG: the training curves of a train.py log.jsonl, curves.csv (one row per record, a column per
    number logged) and curves.png (loss, PSNR, perplexity and the logged dimensions: eff-dim of latents and codebook,
    participation ratio, water-filling)."""
    try:
        with open(log_path) as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise SystemExit(f"eval.py: cannot read the log {log_path}: {err}") from None
    records = []
    for n, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == lines[-1][0]:  # cut short by a killed run, as train.py's resume also expects
                print(f"note: {log_path}: line {n}, the last, is cut short: left out")
                continue
            record = None
        if not isinstance(record, dict) or "step" not in record:
            raise SystemExit(f"eval.py: {log_path}, line {n}: not a train.py log record")
        records.append(record)
    if not records:
        raise SystemExit(f"eval.py: {log_path} holds no records")
    os.makedirs(out_dir, exist_ok=True)
    columns = ["step", "split"] + sorted({k for r in records for k, v in r.items()
                                          if isinstance(v, (int, float)) and k not in ("step", "split")})
    write_csv(os.path.join(out_dir, "curves.csv"), columns, [[r.get(c, "") for c in columns] for r in records])

    def series(split, key):  # (steps, values) of one logged number; short ones get markers, or one point shows not
        points = [(r["step"], r[key]) for r in records if r.get("split") == split
                  and isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        return [p[0] for p in points], [p[1] for p in points], "-" if len(points) > 20 else ".-"

    panels = []
    for title, wanted in (("loss", lambda k: k in ("loss", "bits_per_code")), ("PSNR (dB)", lambda k: k == "psnr"),
                          ("perplexity", lambda k: k.endswith("perplexity")),
                          ("dimensions (eff-dim 99%, PR, water-fill)",
                           lambda k: k.endswith(("eff_dim_99_latent", "eff_dim_99_codebook", "pr_latent",
                                                 "waterfill_dim")))):
        lines = [(f"{split} {key}", *line) for key in columns[2:] if wanted(key) for split in ("train", "val")
                 for line in [series(split, key)] if line[0]]
        if lines:
            panels.append((title, "step", "", lines))
    drawn = panels and plot(os.path.join(out_dir, "curves.png"), log_path, panels)
    print(f"wrote {os.path.join(out_dir, 'curves.csv')}" + (" and curves.png" if drawn else ""))
    return records


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def plot(path, title, panels):
    """Panels [(title, xlabel, ylabel, [(label, xs, ys, style "-", "--" or "bar"), ...]), ...] side by side in one
    PNG. Needs matplotlib, an optional extra: without it, says so in one line and draws nothing (the CSV is written
    anyway)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: {os.path.basename(path)} not drawn: the pictures need matplotlib (pip install matplotlib); "
              "the CSV beside it holds the numbers")
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (name, xlabel, ylabel, lines) in zip(axes[0], panels):
        for label, xs, ys, style in lines:
            if style == "bar":
                ax.bar(xs, ys, width=1.0, label=label)
                ax.set_yscale("log")
            else:
                ax.plot(xs, ys, style, label=label)
        ax.set(title=name, xlabel=xlabel, ylabel=ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


if __name__ == "__main__":
    main()
