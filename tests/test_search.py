"""The nearest-code search of every quantizer copy against a brute-force reference: the nearest code, ties to the
lowest index, on integer lattices where every squared distance is exact in float32, so that any difference is the
search's, not rounding's. The copies of `_argmin` must stay identical (each file stands alone)."""

import inspect

import pytest
import torch

import adaptive_vq
import mgvq
import pqvae
import vqvae
import vqvae2
import warmup_vqgan


def lowest_tied(z, e):
    """Brute force in float64: for each row of z (N, D), the first index of the nearest row of e (K, D)."""
    d = ((z.double()[:, None, :] - e.double()[None]) ** 2).sum(-1)  # (N, K)
    return (d == d.min(1, keepdim=True).values).int().argmax(1)


def lattice(N, K, D, seed=0):
    """Integer vectors in a small range: many exact ties and duplicated codes."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-3, 4, (N, D), generator=g).float(),
            torch.randint(-3, 4, (K, D), generator=g).float())


def searches():
    """(name, nearest(z, e) -> (N,)) for every copy of the chunked search."""
    def vq(cls):
        return lambda z, e: cls(e.shape[0], e.shape[1], init="random").nearest(z, e).reshape(-1)

    def pq(z, e):
        q = pqvae.ProgressiveQuantizer(8, 64, steps=2, codebook_size=e.shape[0], channel_dim=1, spatial_dim=e.shape[1])
        return q.nearest(z, e)

    def avq(z, e):
        q = adaptive_vq.CodebookQuantizer(e.shape[0], e.shape[1], init="random")
        return q._nearest_chunked(z, e)

    def wq(z, e):
        return warmup_vqgan.WarmupQuantizer(e.shape[0], e.shape[1]).nearest(z, e)

    return [("vqvae", vq(vqvae.VectorQuantizer)), ("vqvae2", vq(vqvae2.VectorQuantizer)),
            ("mgvq", vq(mgvq.VectorQuantizer)), ("pqvae", pq), ("adaptive_vq", avq), ("warmup_vqgan", wq)]


@pytest.mark.parametrize("name,nearest", searches())
@pytest.mark.parametrize("K", [4096, 1000, 37])  # blocks of 64 codes, of 8 (gcd), and the plain argmin
def test_every_copy_finds_the_lowest_nearest_code_over_many_chunks(name, nearest, K):
    z, e = lattice(3000, K, 8)  # 4096 codes: 1024 rows per chunk, three chunks
    assert torch.equal(nearest(z, e), lowest_tied(z, e)), name


def test_groups_search_each_group_like_brute_force():
    z, e = lattice(2000, 512, 8, seed=1)
    q = mgvq.VectorQuantizer(512, 8, groups=4, init="random")
    codes = q.nearest(z, e)  # (N, 4)
    for g in range(4):
        assert torch.equal(codes[:, g], lowest_tied(z[:, 2 * g:2 * g + 2], e[:, 2 * g:2 * g + 2]))


@pytest.mark.parametrize("K", [4096, 1000, 64, 8, 37])
def test_blocked_argmin_equals_argmin_with_ties_infinities_and_nans(K):
    g = torch.Generator().manual_seed(K)
    d = torch.randint(0, 5, (300, K), generator=g).float()  # ties everywhere
    d[0] = 7.0  # a row of equal values: index 0
    d[1, -1] = -1.0  # the minimum in the last block
    d[2, K // 2] = float("-inf")
    d[3, 5], d[3, K - 1] = float("nan"), -1.0  # a NaN wins, as in torch.argmin
    d[4] = float("inf")
    assert torch.equal(vqvae.VectorQuantizer._argmin(d), d.argmin(-1))
    assert torch.equal(vqvae.VectorQuantizer._argmin(d.view(3, 100, K)), d.view(3, 100, K).argmin(-1))


def test_the_argmin_copies_are_identical():
    copies = [vqvae.VectorQuantizer, vqvae2.VectorQuantizer, mgvq.VectorQuantizer, pqvae.ProgressiveQuantizer,
              adaptive_vq.CodebookQuantizer, warmup_vqgan.WarmupQuantizer]
    sources = {inspect.getsource(cls._argmin) for cls in copies}
    assert len(sources) == 1
    assert len({cls.search_block for cls in copies}) == 1
