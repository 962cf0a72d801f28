"""Copies that must stay in step (each model file stands alone, so the code is repeated on purpose): vqvae2.py's
VectorQuantizer is vqvae.py's, word for word; mgvq.py's with groups = 1 gives vqvae.py's results bit for bit; mgvq.py's
encoder and decoder are vqvae.py's. The nearest-code search of every copy is held to one reference in
tests/test_search.py."""

import inspect

import pytest
import torch

import mgvq
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


@pytest.mark.parametrize("twin", [vqvae2.VectorQuantizer, lambda *a, **kw: mgvq.VectorQuantizer(*a, groups=1, **kw)],
                         ids=["vqvae2", "mgvq_one_group"])
def test_quantizer_twins_give_vqvae_results_bit_for_bit(twin):
    for kw in ({}, {"ema": False}):
        ours, ours_out = run(vqvae.VectorQuantizer, **kw)
        theirs, theirs_out = run(twin, **kw)
        for a, b in zip(ours_out, theirs_out):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        for name, value in ours.state_dict().items():
            assert torch.equal(theirs.state_dict()[name], value), name


def test_the_copies_texts_are_identical():
    assert inspect.getsource(vqvae2.VectorQuantizer) == inspect.getsource(vqvae.VectorQuantizer)
    for name in ("ResBlock", "Encoder", "Decoder"):
        assert inspect.getsource(getattr(mgvq, name)) == inspect.getsource(getattr(vqvae, name)), name
    assert inspect.getsource(mgvq.VectorQuantizer._argmin) == inspect.getsource(vqvae.VectorQuantizer._argmin)
    assert mgvq.VectorQuantizer.search_block == vqvae.VectorQuantizer.search_block


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
