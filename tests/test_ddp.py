"""The quantizer under torch.distributed: two gloo ranks on different data keep bitwise-equal codebooks."""

import pytest
import torch

import mgvq
import vqvae


def _worker(rank, groups):
    torch.manual_seed(0)
    kw = dict(init="kmeans", dead_code_threshold=2, dead_code_window=3)
    vq = vqvae.VectorQuantizer(64, 4, **kw) if groups == 1 else mgvq.VectorQuantizer(64, 4, groups=groups, **kw)
    torch.manual_seed(1000 + rank)  # from here on each rank draws different random numbers, as in training

    dead_at_reset = []
    reset = vq._reset_dead_codes

    def spy(z):  # count the dead codes at each reset
        dead_at_reset.append(int((vq.usage < vq.dead_code_threshold).sum()))
        reset(z)

    vq._reset_dead_codes = spy
    for step in range(10):
        # different data on each rank: rank 1's vectors sit one unit away from rank 0's
        z = torch.randn(96, 4) * 0.5 + rank
        vq(z)
    return {"state": vq.state_dict(), "dead": dead_at_reset}


@pytest.mark.parametrize("groups", [1, 2])  # vqvae.py's quantizer; mgvq.py's, a sub-codebook per group
def test_two_gloo_ranks_keep_identical_codebooks(two_gloo_ranks, groups):
    r0, r1 = two_gloo_ranks(_worker, groups)
    assert r0["dead"] == r1["dead"] and len(r0["dead"]) == 3  # resets at batches 3, 6 and 9
    assert sum(r0["dead"]) > 0, "no code was ever dead: the reset path was not exercised"
    assert bool(r0["state"]["initialized"])
    for name, value in r0["state"].items():
        assert torch.equal(value, r1["state"][name]), f"{name} differs between ranks"
    # and every sub-codebook learned from both ranks' data (means near 0 and near 1), not from rank 0 alone
    for part in r0["state"]["codebook"].chunk(groups, dim=1):
        means = part.mean(1)
        assert (means > 0.5).sum() > 5 and (means < 0.5).sum() > 5
