import os
import sys

import pytest
import torch

# the tests import the project's files (vqvae.py, train.py, ...) from the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def overfit():
    """overfit(model) -> reconstruction MSE of the first and the last of 100 Adam steps on the same 8 shapes images
    (16x16): a model that learns brings the last far below the first."""
    def run(model, steps=100):
        import data
        torch.manual_seed(0)
        shapes = data.get_dataset("shapes", "train", image_size=16)
        x = torch.stack([shapes[i] for i in range(8)])
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        recons = []
        for _ in range(steps):
            _, loss, stats = model(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            recons.append(float(stats["recon"]))
        return recons[0], recons[-1]
    return run


@pytest.fixture
def steps_without_host_reads(monkeypatch):
    """steps_without_host_reads(model, x, steps): one training step (forward, backward), then `steps` more during
    which every Python-level read of a tensor's value fails. On a GPU each such read (if t:, t.item(), int(t), ...)
    waits for all queued kernels: a host-device synchronisation in the hot path. The first step may read (a
    codebook's initialisation)."""
    def run(model, x, steps):
        model.train()
        model(x)[1].backward()

        def refuse(*args, **kwargs):
            raise AssertionError("a tensor's value was read on the host during a training step")
        with monkeypatch.context() as m:
            for name in ("__bool__", "item", "__int__", "__float__", "__index__", "tolist"):
                m.setattr(torch.Tensor, name, refuse)
            for _ in range(steps):
                model(x)[1].backward()
    return run
