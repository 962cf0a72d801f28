import importlib.util
import inspect
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


def _gloo_rank(rank, work, init_file, out_dir, args):
    """One process of two_gloo_ranks: join the process group, run work(rank, *args), save what it returns."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        torch.save(work(rank, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture
def two_gloo_ranks(tmp_path):
    """two_gloo_ranks(work, *args) -> (rank 0's result, rank 1's result): runs work(rank, *args) in two processes
    joined in a gloo process group on the CPU, as torchrun would. `work` is a module-level function (the processes
    import it) returning tensors, numbers, lists or dicts of them."""
    def run(work, *args):
        mp.spawn(_gloo_rank, args=(work, str(tmp_path / "init"), str(tmp_path), args), nprocs=2, join=True)
        return tuple(torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    return run


@pytest.fixture
def assert_resume_equals_straight(tmp_path):
    """assert_resume_equals_straight(argv): train.py with argv for 6 steps straight, and for 3 steps then --resume to
    6; the two end with bitwise-equal weights and log the same training losses."""
    def run(argv):
        import json
        import train
        straight, parts = str(tmp_path / "straight"), str(tmp_path / "parts")
        train.main([*argv, "--out_dir", straight, "--max_iters", "6"])
        train.main([*argv, "--out_dir", parts, "--max_iters", "3"])
        train.main(["--out_dir", parts, "--resume", "--max_iters", "6"])
        a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (straight, parts))
        for name, value in a["model"].items():
            assert torch.equal(value, b["model"][name]), name
        losses = [[r["loss"] for r in map(json.loads, open(os.path.join(d, "log.jsonl"))) if r["split"] == "train"]
                  for d in (straight, parts)]
        assert losses[0] == losses[1]
    return run


@pytest.fixture
def reproduces_the_reference():
    """reproduces_the_reference(VQ): asserts that VQ (a quantizer class with vqvae.py's constructor) runs k-means init,
    EMA and a dead-code reset over 7 batches exactly as recorded in data/vq_reference.pt: the same codes, z_q, loss,
    gradient and state_dict, bit for bit (vqvae.py's quantizer, and mgvq.py's with groups = 1)."""
    def check(VQ):
        ref = torch.load(os.path.join(os.path.dirname(__file__), "data", "vq_reference.pt"), weights_only=True)
        torch.manual_seed(0)
        vq = VQ(16, 4, init="kmeans", dead_code_threshold=2, dead_code_window=3)
        for step in range(7):
            z = (torch.randn(64, 4) * (1 + step % 3)).requires_grad_()
            z_q, codes, loss, stats = vq(z)
            (z_q.sum() + loss).backward()
            assert torch.equal(codes, ref["codes"][step]) and codes.shape == (64,)
            assert torch.equal(z_q.detach(), ref["z_q"][step]) and torch.equal(loss.detach(), ref["loss"][step])
            assert torch.equal(z.grad, ref["grad"][step])
        state = vq.state_dict()
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in ref["state"].items()}
        for name, value in ref["state"].items():
            assert torch.equal(state[name], value), name
    return check


@pytest.fixture
def copied_class(tmp_path):
    """copied_class(cls, imports=""): cls's source alone, in a new module that imports torch (and `imports`) and
    nothing of this project: the class as a user copies it into another project."""
    def copy(cls, imports=""):
        source = (imports + "import torch\nimport torch.distributed as dist\nimport torch.nn as nn\n"
                  "import torch.nn.functional as F\n\n" + inspect.getsource(cls))
        path = tmp_path / "copied_quantizer.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("copied_quantizer", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return getattr(module, cls.__name__)
    return copy


@pytest.fixture
def copied_quantizer_learns(copied_class):
    """copied_quantizer_learns(cls, **kw): cls copied alone (copied_class) is a quantizer that learns 8 clusters in
    4-D together with a linear encoder."""
    def check(cls, **kw):
        torch.manual_seed(0)
        centres = torch.randn(8, 4) * 3
        vq = copied_class(cls)(16, 4, init="kmeans", **kw)
        enc = torch.nn.Linear(4, 4)
        opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
        losses = []
        for _ in range(100):
            x = centres[torch.randint(0, 8, (256,))] + 0.05 * torch.randn(256, 4)
            z_q, codes, loss, stats = vq(enc(x))
            recon = torch.nn.functional.mse_loss(z_q, x)  # the quantized vector should stand for the input
            opt.zero_grad()
            (recon + loss).backward()
            opt.step()
            losses.append(float(recon.detach()))
        assert sum(losses[-10:]) < 0.2 * sum(losses[:10])
        assert stats["perplexity"] > 6  # the 8 clusters are all in use
    return check
