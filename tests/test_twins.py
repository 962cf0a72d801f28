"""Quantizer copies that must stay in step (each model file stands alone, so the code is repeated on purpose):
vqvae2.py's VectorQuantizer is vqvae.py's without groups, and both must give the same results bit for bit. The
nearest-code search of every copy is held to one reference in tests/test_search.py."""

import torch

import vqvae
import vqvae2


def run(VQ, steps=7, **kw):
    """k-means init, EMA and dead-code resets over a few batches of changing scale; every output of every step."""
    torch.manual_seed(0)
    vq = VQ(16, 4, init="kmeans", dead_code_threshold=3, dead_code_window=2, **kw)
    out = []
    for step in range(steps):
        z = (torch.randn(64, 4) * (1 + step % 3)).requires_grad_()
        z_q, codes, loss, stats = vq(z)
        (z_q.sum() + loss).backward()
        out.append((z_q.detach(), codes, loss.detach(), z.grad, stats["perplexity"]))
    return vq, out


def test_vqvae2_quantizer_is_vqvae_quantizer_without_groups():
    for kw in ({}, {"ema": False}):
        ours, ours_out = run(vqvae2.VectorQuantizer, **kw)
        twin, twin_out = run(vqvae.VectorQuantizer, **kw)
        for a, b in zip(ours_out, twin_out):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        for name, value in twin.state_dict().items():
            assert torch.equal(ours.state_dict()[name], value), name


def test_warmup_vqgan_spectra_are_eval_spectra():
    # warmup_vqgan.py keeps its own eigenvalues and waterfill (its switch rule needs them and the file stands alone)
    import eval as ev
    import warmup_vqgan
    g = torch.Generator().manual_seed(0)
    for n, d in ((500, 16), (40, 64), (3, 8)):
        v = torch.randn(n, d, generator=g) * torch.rand(d, generator=g) * 5
        eigs = ev.eigenvalues(v)
        assert torch.equal(warmup_vqgan.eigenvalues(v), eigs)
        for bits in (0.5, 3.0, 10.0, 80.0):
            assert warmup_vqgan.waterfill(eigs, bits) == ev.waterfill(eigs, bits)
