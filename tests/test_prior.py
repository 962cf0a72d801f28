"""prior.py and sample.py: every tokenizer's codes as one sequence and back, the causal mask, the loss against a
cross-entropy by hand, sampling, refusals, training through train.py (resume, two gloo ranks) and eval.py's
baselines."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import adaptive_vq
import data
import eval as evaluation
import mgvq
import pqvae
import prior
import sample
import train
import vqvae
import vqvae2
import warmup_vqgan

TINY_TOKENIZER = ["--image_size", "16", "--hidden", "16", "--res_hidden", "8", "--res_blocks", "1",
                  "--codebook_size", "16", "--code_dim", "4", "--batch_size", "8", "--eval_batches", "1"]
TINY_PRIOR = ["--n_layer", "2", "--n_head", "2", "--n_embd", "16", "--batch_size", "8", "--eval_batches", "1"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A vqvae checkpoint written by train.py: 16x16 shapes images, a 4x4 grid of codes (n = 16), K = 16."""
    out = str(tmp_path_factory.mktemp("tok") / "vqvae_tiny")
    train.main(["--model", "vqvae", *TINY_TOKENIZER, "--max_iters", "3", "--out_dir", out])
    return os.path.join(out, "ckpt.pt")


def images(n=4, channels=3, size=16):
    torch.manual_seed(0)
    return torch.rand(n, channels, size, size) * 2 - 1


def fitted(model, x, steps=1):
    """The model after a few training forwards (codebooks initialised from x), in eval mode."""
    model.train()
    for step in range(steps):
        if hasattr(model, "set_step"):
            model.set_step(step)
        model(x)
    return model.eval()


def small_prior(layout, **kw):
    """A prior over the codes `layout` describes, its tokenizer a tiny vqvae (used by encode / decode only)."""
    tok = vqvae.Config(image_size=16, hidden=16, res_hidden=8, res_blocks=1, codebook_size=16, code_dim=4)
    cfg = prior.Config(tokenizer_model="vqvae", tokenizer_config=dataclasses.asdict(tok), tokenizer_layout=layout,
                       image_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0, **kw)
    torch.manual_seed(0)
    return prior.Model(cfg).eval()


# -- codes as one sequence --------------------------------------------------------------------------------------------

TOKENIZERS = {
    "vqvae": lambda: vqvae.Model(vqvae.Config(image_size=16, hidden=16, res_hidden=8, res_blocks=1,
                                              codebook_size=16, code_dim=4)),
    "mgvq": lambda: mgvq.Model(mgvq.Config(image_size=16, hidden=16, res_hidden=8, res_blocks=1, codebook_size=8,
                                           code_dim=4, groups=2)),
    "vqvae2": lambda: vqvae2.Model(vqvae2.Config(image_size=16, hidden=16, res_hidden=8, res_blocks=1,
                                                 codebook_size=16, code_dim=4, downsample=2)),
    "pqvae": lambda: pqvae.Model(pqvae.Config(image_size=16, hidden=16, feature_dim=32, downsample=2, steps=8,
                                              codebook_size=32)),
    "warmup_vqgan": lambda: warmup_vqgan.Model(warmup_vqgan.Config(
        image_size=16, channels=8, ch_mult=(1, 2, 2), res_blocks=1, z_channels=8, code_dim=4, codebook_size=16,
        bank_size=256, warmup_steps=1, waterfill_every=0, disc_weight=0.0)),
}


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_every_tokenizers_codes_become_one_sequence_and_back_exactly(name):
    torch.manual_seed(0)
    x = images(8)
    model = fitted(TOKENIZERS[name](), x, steps=3)
    layout = model.code_layout()
    codes = model.encode(x)
    levels = codes if isinstance(codes, tuple) else (codes,)
    assert [tuple(c.shape[1:]) for c in levels] == [tuple(shape) for shape, _ in layout]
    assert all(0 <= int(c.min()) and int(c.max()) < K for c, (_, K) in zip(levels, layout))
    assert len({int(v) for c in levels for v in c.flatten()}) > 1, "every code alike: the round trip proves little"

    seq = evaluation.code_sequence(codes)
    assert seq.shape == (8, sum(math.prod(shape) for shape, _ in layout))
    # the documented order: level by level, each in raster order (groups last)
    first = levels[0]
    if first.dim() == 3:  # a grid: code (i, j) of the first level at i * w + j
        h, w = first.shape[1:]
        assert int(seq[5, 1 * w + 2]) == int(first[5, 1, 2])
    if first.dim() == 4:  # groups: code (i, j, g) at (i * w + j) * G + g
        _, h, w, G = first.shape
        assert int(seq[5, (1 * w + 2) * G + 1]) == int(first[5, 1, 2, 1])
    if len(levels) == 2:  # vqvae2: the bottom grid after the top one
        assert torch.equal(seq[:, levels[0][0].numel():], levels[1].flatten(1))
    back = evaluation.sequence_to_codes(seq, layout)
    for a, b in zip(back if isinstance(back, tuple) else (back,), levels):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="holds"):
        evaluation.sequence_to_codes(seq[:, 1:], layout)


def test_warmup_vqgan_and_adaptive_vq_refuse_a_layout_they_cannot_give():
    model = TOKENIZERS["warmup_vqgan"]()
    with pytest.raises(ValueError, match="warm-up"):
        model.code_layout()
    model = adaptive_vq.Model(adaptive_vq.Config(image_size=16, hidden=16, res_hidden=8, res_blocks=1,
                                                 vector_dim=8, capacity=64))
    with pytest.raises(ValueError, match="fixed-length"):
        model.code_layout()


# -- the transformer --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("position_linear", [False, True])
def test_the_logits_at_a_position_see_only_the_codes_before_it(position_linear):
    model = small_prior([((4, 4), 16)], position_linear=position_linear)
    codes = torch.randint(0, 16, (3, 16), generator=torch.Generator().manual_seed(1))
    base = model.logits(codes)  # (3, 16, 16)
    for t in (0, 5, 14):
        changed = codes.clone()
        changed[:, t] = (changed[:, t] + 7) % 16
        logits = model.logits(changed)
        assert torch.allclose(logits[:, :t + 1], base[:, :t + 1], atol=1e-6), f"positions <= {t} saw code {t}"
        assert (logits[:, t + 1] - base[:, t + 1]).abs().max() > 1e-3, f"position {t + 1} ignores code {t}"


def test_the_loss_is_the_cross_entropy_of_each_code_given_those_before():
    layout = [((2,), 4), ((3,), 16)]  # two levels with different K: position 0 and 1 may only take codes 0..3
    model = small_prior(layout)
    codes = torch.tensor([[3, 1, 15, 0, 9], [0, 2, 4, 8, 12]])
    with torch.no_grad():
        loss, stats = model.loss(codes)
    logits = model.logits(codes).detach().double().numpy()  # (2, 5, 16)
    assert np.isneginf(logits[:, :2, 4:]).all() and np.isfinite(logits[:, 2:]).all()
    by_hand = 0.0
    for b in range(2):
        for t in range(5):
            row = logits[b, t][np.isfinite(logits[b, t])]
            by_hand -= logits[b, t, codes[b, t]] - (np.log(np.exp(row - row.max()).sum()) + row.max())
    by_hand /= 10
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    assert float(stats["bits_per_code"]) == pytest.approx(by_hand / math.log(2), rel=1e-5)
    assert float(stats["bits_per_image"]) == pytest.approx(5 * by_hand / math.log(2), rel=1e-5)
    # a prior that knows nothing (every logit 0) pays log K at each position
    with torch.no_grad():
        model.head.weight.zero_()
    assert model.loss(codes)[0].item() == pytest.approx((2 * math.log(4) + 3 * math.log(16)) / 5, rel=1e-6)


def test_position_linear_is_on_by_default_for_one_dimensional_codes_only():
    assert small_prior([((8,), 16)]).position_linear is not None  # pqvae's step order
    assert small_prior([((4, 4), 16)]).position_linear is None  # a grid
    assert small_prior([((4, 4), 16)], position_linear=True).position_linear.shape == (16, 16, 16)


def test_generation_keeps_the_prefix_and_draws_valid_codes():
    model = small_prior([((2,), 4), ((3,), 16)])
    prefix = torch.tensor([[3, 1], [0, 2]])
    g = torch.Generator().manual_seed(0)
    codes = model.generate(prefix, generator=g)
    assert codes.shape == (2, 5) and torch.equal(codes[:, :2], prefix)
    many = model.generate(torch.zeros(200, 0, dtype=torch.long), generator=g)
    assert int(many[:, :2].max()) < 4 and int(many.max()) < 16 and int(many.min()) >= 0
    assert len(set(many[:, 0].tolist())) == 4, "a temperature of 1 over an untrained prior draws every code"
    # top_k 1 keeps only the likeliest code: the same as temperature 0, whatever the random draws
    greedy = model.generate(prefix[:, :1], temperature=0)
    assert torch.equal(model.generate(prefix[:, :1], top_k=1, generator=g), greedy)


# -- refusals ---------------------------------------------------------------------------------------------------------

def test_missing_foreign_and_unfit_tokenizers_are_refused_naming_the_file(tmp_path, tokenizer):
    with pytest.raises(SystemExit, match="no tokenizer checkpoint at .*missing.pt"):
        train.resolve_config(["--model", "prior", "--tokenizer", str(tmp_path / "missing.pt")])
    with pytest.raises(SystemExit, match="no tokenizer checkpoint"):
        train.resolve_config(["--model", "prior"])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(SystemExit, match="foreign.pt is not a checkpoint written by train.py"):
        train.resolve_config(["--model", "prior", "--tokenizer", str(foreign)])
    unknown = tmp_path / "unknown.pt"
    torch.save({"model": {}, "model_config": {}, "train_config": {"model": "nosuchmodel"}}, unknown)
    with pytest.raises(SystemExit, match="unknown.pt holds a nosuchmodel model, and there is no nosuchmodel.py"):
        train.resolve_config(["--model", "prior", "--tokenizer", str(unknown)])
    cfg = adaptive_vq.Config(image_size=16, hidden=16, res_hidden=8, res_blocks=1, vector_dim=8, capacity=64)
    adaptive = tmp_path / "adaptive.pt"
    torch.save({"model": adaptive_vq.Model(cfg).state_dict(), "model_config": dataclasses.asdict(cfg),
                "train_config": {"model": "adaptive_vq", "dataset": "shapes", "data_dir": ""}}, adaptive)
    with pytest.raises(SystemExit, match="adaptive.pt: adaptive_vq: its codes are no fixed-length sequence"):
        train.resolve_config(["--model", "prior", "--tokenizer", str(adaptive)])
    with pytest.raises(SystemExit, match="--dataset mnist differs from the tokenizer's shapes"):
        train.resolve_config(["--model", "prior", "--tokenizer", tokenizer, "--dataset", "mnist"])


def test_the_dataset_image_size_and_out_dir_come_from_the_tokenizer(tokenizer):
    tcfg, mcfg, module, _ = train.resolve_config(["--model", "prior", "--tokenizer", tokenizer])
    assert tcfg.dataset == "shapes" and mcfg.image_size == 16 and mcfg.in_channels == 3
    assert tcfg.out_dir == os.path.join("out", "prior_vqvae_tiny")
    assert mcfg.tokenizer_model == "vqvae" and mcfg.tokenizer_layout == [((4, 4), 16)]
    assert tcfg.lr == module.PRESETS["shapes"]["lr"]


# -- training through train.py ----------------------------------------------------------------------------------------

def test_a_prior_trains_through_train_py_and_keeps_its_tokenizer_frozen(tmp_path, tokenizer):
    out = str(tmp_path / "p")
    train.main(["--model", "prior", "--tokenizer", tokenizer, *TINY_PRIOR, "--max_iters", "30", "--log_interval",
                "10", "--eval_interval", "30", "--warmup_iters", "0", "--lr", "3e-3", "--out_dir", out])
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    bits = [r["bits_per_code"] for r in log if r["split"] == "train"]
    assert bits[-1] < bits[0] < 4.01, bits  # log2 16 = 4 bits at the start, then the prior learns
    # an untrained prior pays about 4 bits a code; this one measured 3.63 at one and at two threads
    assert [r for r in log if r["split"] == "val"][0]["bits_per_code"] < 3.85
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"]
    original = torch.load(tokenizer, weights_only=True)["model"]
    for name, value in original.items():
        assert torch.equal(saved[f"tokenizer.{name}"], value), f"the tokenizer's {name} changed"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_prior_trains_under_autocast_with_float32_codes(tmp_path, tokenizer, dtype):
    stats = train.main(["--model", "prior", "--tokenizer", tokenizer, *TINY_PRIOR, "--max_iters", "4",
                        "--log_interval", "2", "--dtype", dtype, "--out_dir", str(tmp_path / dtype)])
    assert math.isfinite(stats["bits_per_code"]) and stats["bits_per_code"] < 4.2
    model = prior.Model(prior.Config(tokenizer=tokenizer))
    x = images(8)
    with torch.autocast("cpu", dtype=getattr(torch, dtype)):
        codes = model.encode(x)
        assert model.logits(codes).dtype == getattr(torch, dtype)
    assert torch.equal(codes, evaluation.code_sequence(model.tokenizer.encode(x)))  # the float32 codes


def test_a_resumed_prior_run_equals_a_straight_run(tokenizer, assert_resume_equals_straight):
    assert_resume_equals_straight(["--model", "prior", "--tokenizer", tokenizer, *TINY_PRIOR, "--log_interval", "1",
                                   "--eval_interval", "1000"])


def _ddp_prior_steps(rank, tokenizer_path):
    """Three DDP steps of a prior with dropout, each rank on its own images, as train.py wraps it."""
    torch.manual_seed(0)
    model = prior.Model(prior.Config(tokenizer=tokenizer_path, n_layer=1, n_head=2, n_embd=16, dropout=0.1))
    ddp = torch.nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(100 + rank)  # different images and dropout on each rank
    for _ in range(3):
        _, loss, _ = ddp(torch.rand(4, 3, 16, 16) * 2 - 1)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.state_dict()


def test_two_gloo_ranks_keep_the_prior_bitwise_equal(two_gloo_ranks, tokenizer):
    r0, r1 = two_gloo_ranks(_ddp_prior_steps, tokenizer)
    torch.manual_seed(0)  # as each rank starts
    start = prior.Model(prior.Config(tokenizer=tokenizer, n_layer=1, n_head=2, n_embd=16)).state_dict()
    assert not torch.equal(r0["head.weight"], start["head.weight"]), "the prior did not move"
    for name, value in r0.items():
        assert torch.equal(value, r1[name]), f"{name} differs between ranks"


# -- eval.py and sample.py --------------------------------------------------------------------------------------------

def test_unigram_baseline_against_counts_by_hand():
    train_codes = torch.tensor([[0, 2], [0, 1], [1, 1]])
    codes = torch.tensor([[0, 1], [2, 0]])
    bits = evaluation.unigram_bits(train_codes, codes, sizes=[3, 4], alpha=1.0)
    # position 0 (K 3): counts 2, 1, 0 of 3 -> (c + 1) / 6; position 1 (K 4): counts 0, 2, 1, 0 -> (c + 1) / 7
    expected = [-math.log2(3 / 6) - math.log2(3 / 7), -math.log2(1 / 6) - math.log2(1 / 7)]
    assert bits.tolist() == pytest.approx(expected)


def test_eval_and_sample_on_a_prior_checkpoint(tmp_path, tokenizer, capsys, monkeypatch):
    out = str(tmp_path / "p")
    train.main(["--model", "prior", "--tokenizer", tokenizer, *TINY_PRIOR, "--max_iters", "20", "--out_dir", out])
    ckpt = os.path.join(out, "ckpt.pt")
    metrics = evaluation.main(["--ckpt", ckpt, "--split", "test", "--max_batches", "2", "--batch_size", "16",
                               "--json", str(tmp_path / "m.json")])
    assert metrics["images"] == 32 and "psnr" not in metrics
    assert metrics["bits_per_image"] == pytest.approx(16 * metrics["bits_per_code"])
    assert metrics["baseline/uniform_bits_per_code"] == pytest.approx(4.0)  # log2 K, K = 16
    model, _ = evaluation.load_model(ckpt)
    first = {split: torch.stack([data.get_dataset("shapes", split, image_size=16)[i] for i in range(32)])
             for split in ("train", "test")}  # the 2 batches of 16 that --max_batches 2 reads of each split
    train_codes, test_codes = model.encode(first["train"]), model.encode(first["test"])
    expected = float(evaluation.unigram_bits(train_codes, test_codes, [16] * 16).mean())
    assert metrics["baseline/unigram_bits_per_image"] == pytest.approx(expected)
    assert abs(float(evaluation.unigram_bits(test_codes, test_codes, [16] * 16).mean()) - expected) > 0.1
    assert json.load(open(tmp_path / "m.json"))["bits_per_code"] == metrics["bits_per_code"]

    codes = sample.main(["--ckpt", ckpt, "--num", "10", "--seed", "3", "--out", str(tmp_path / "s.png")])
    assert codes.shape == (10, 16) and int(codes.max()) < 16
    assert Image.open(tmp_path / "s.png").size == (8 * 16, 2 * 16)  # 8 to a row
    assert np.array_equal(np.load(tmp_path / "s.npy"), codes.numpy())
    again = sample.main(["--ckpt", ckpt, "--num", "10", "--seed", "3", "--out", str(tmp_path / "t.png")])
    assert torch.equal(again, codes)  # the seed decides the samples
    with pytest.raises(SystemExit, match="does not reconstruct: give its tokenizer's checkpoint"):
        evaluation.main(["--ckpt", ckpt, "--images", str(tmp_path), "--out", str(tmp_path.parent / "recon")])
    # the saved codes decode, by eval.py --decode with the prior's checkpoint or its tokenizer's, into the samples
    for i, source in enumerate((ckpt, tokenizer)):
        evaluation.main(["--ckpt", source, "--decode", str(tmp_path / "s.npy"), "--out", str(tmp_path / f"d{i}")])
    grid = np.asarray(Image.open(tmp_path / "s.png"))
    for i in range(10):
        row, col = divmod(i, 8)
        for d in ("d0", "d1"):
            assert np.array_equal(np.asarray(Image.open(tmp_path / d / f"{i:06d}.png")),
                                  grid[16 * row:16 * row + 16, 16 * col:16 * col + 16])

    codes = sample.main(["--ckpt", ckpt, "--prefix", "0,4,16", "--num", "3", "--out", str(tmp_path / "c.png")])
    posterior = codes[:3]
    assert torch.equal(codes[3 + 3:3 + 6, :4], posterior[:, :4])  # l = 4: the first 4 codes are the image's
    assert torch.equal(codes[3 + 6:], posterior)  # l = n: nothing left to sample
    assert Image.open(tmp_path / "c.png").size == (3 * 16, 5 * 16)  # images, reconstructions, 3 prefix rows
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", ckpt, "--prefix", "17"])
    assert "--prefix lengths must lie in 0..16" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not a prior"):
        sample.main(["--ckpt", tokenizer])
    with pytest.raises(SystemExit, match="sample.py: --device foo is not a device"):
        sample.main(["--ckpt", ckpt, "--device", "foo"])

    # an unreadable image of the split (the dataset gives None for it) is passed over, as in eval.py
    real = data.get_dataset

    def first_unreadable(*args, **kwargs):
        dataset = real(*args, **kwargs)
        assert kwargs.get("skip_unreadable")
        return [None] + [dataset[i] for i in range(1, 5)]
    monkeypatch.setattr(data, "get_dataset", first_unreadable)
    codes = sample.main(["--ckpt", ckpt, "--prefix", "16", "--num", "3", "--out", str(tmp_path / "u.png")])
    assert torch.equal(codes[:3], model.encode(first["test"][1:4]))  # images 1, 2, 3


def test_a_prior_checkpoint_needs_no_tokenizer_file(tmp_path, tokenizer):
    copy = tmp_path / "tok" / "ckpt.pt"
    copy.parent.mkdir()
    copy.write_bytes(open(tokenizer, "rb").read())
    out = str(tmp_path / "p")
    train.main(["--model", "prior", "--tokenizer", str(copy), *TINY_PRIOR, "--max_iters", "2", "--out_dir", out])
    model, _ = evaluation.load_model(os.path.join(out, "ckpt.pt"))
    x = images(4)
    before = model.decode(model.encode(x))
    for replacement in (b"not a checkpoint", None):  # the file overwritten, then gone
        if replacement is None:
            copy.unlink()
        else:
            copy.write_bytes(replacement)
        model, _ = evaluation.load_model(os.path.join(out, "ckpt.pt"))
        assert torch.equal(model.decode(model.encode(x)), before)
    with pytest.raises(SystemExit, match="--tokenizer_layout comes from the tokenizer's checkpoint"):
        train.resolve_config(["--model", "prior", "--tokenizer", tokenizer, "--tokenizer_layout", "4"])
