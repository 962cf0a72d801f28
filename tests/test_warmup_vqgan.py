"""warmup_vqgan.py: the warm-up bypass and the switch, water-filling, the adaptive rule, resume across the switch,
the GAN's adaptive weight, DDP sync of the quantizer, the Model contract and an end-to-end train.py + eval.py run."""

import csv
import json
import math
import os

import pytest
import torch

import data
import eval as ev
import train
import warmup_vqgan
from warmup_vqgan import Config, Model, WarmupQuantizer, waterfill


def small_config(**kw):
    """16x16 images -> 4x4 latents of D = 4, K = 16, no discriminator."""
    base = dict(image_size=16, in_channels=3, channels=8, ch_mult=(1, 2, 2), res_blocks=1, z_channels=8,
                code_dim=4, codebook_size=16, bank_size=256, warmup_steps=3, waterfill_every=0, disc_weight=0.0,
                disc_channels=8, disc_layers=2)
    return Config(**{**base, **kw})


def images(n=4, size=16):
    torch.manual_seed(0)
    return torch.rand(n, 3, size, size) * 2 - 1


def train_steps(model, steps, start=0, x=None):
    """`steps` optimizer steps on one batch, calling set_step as train.py does. Returns the stats of each."""
    x = images() if x is None else x
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith("discriminator")], lr=1e-3)
    out = []
    for step in range(start, start + steps):
        model.set_step(step)
        _, loss, stats = model(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(stats)
    return out


# -- the warm-up bypass and the switch -----------------------------------------------------------------------------

def test_warmup_bypass_passes_latents_unchanged_and_fills_the_bank():
    torch.manual_seed(0)
    q = WarmupQuantizer(8, 3, bank_size=100)
    z = torch.randn(2, 5, 3, requires_grad=True)
    z_q, codes, loss, _ = q(z)
    assert z_q is z and codes is None and float(loss.detach()) == 0
    z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # the decoder's gradient reaches the encoder as is
    assert torch.equal(q.bank_latents(), z.detach().reshape(-1, 3))  # the warm-up latents are kept for k-means
    # the model decodes exactly its encoder's latents
    model = Model(small_config()).eval()
    x = images()
    assert torch.equal(model(x)[0], model._decode_latents(model._latents(x)))


def test_bank_is_a_ring_of_the_latest_latents():
    q = WarmupQuantizer(4, 1, bank_size=5)
    for i in range(3):
        q(torch.arange(3 * i, 3 * i + 3, dtype=torch.float32)[:, None])  # 0..8 in three batches
    assert sorted(q.bank_latents().flatten().tolist()) == [4, 5, 6, 7, 8]


def test_switch_happens_at_the_configured_step_and_kmeans_initialises_every_code():
    torch.manual_seed(0)
    model = Model(small_config(warmup_steps=3))
    initial = model.quantizer.codebook.detach().clone()
    phases = [float(s["phase"]) for s in train_steps(model, 5)]
    assert phases == [0, 0, 0, 1, 1]  # steps 0, 1, 2 warm up; step 3 is the first VQ step
    assert int(model.switch_step) == 3
    codebook = model.quantizer.codebook.detach()
    assert not (codebook == initial).any(dim=1).any(), "some code kept its initial value"
    # every code sits inside the box of the warm-up latents: k-means centres are means of data vectors
    bank = model.quantizer.bank_latents()
    assert (codebook.min(0).values >= bank.min(0).values - 1e-4).all()
    assert (codebook.max(0).values <= bank.max(0).values + 1e-4).all()


def test_kmeans_at_the_switch_finds_clusters_and_seeds_usage_from_their_sizes():
    torch.manual_seed(0)
    centres = torch.tensor([[0., 0.], [10., 0.], [0., 10.], [10., 10.]])
    sizes = torch.tensor([100, 200, 300, 400])
    z = torch.cat([c + 0.1 * torch.randn(int(n), 2) for c, n in zip(centres, sizes)])
    q = WarmupQuantizer(4, 2, bank_size=2000, kmeans_iters=10)
    q(z)  # warm-up: into the bank
    q.switch(z[:0])
    assert int(q.phase) == 1
    dist_ = torch.cdist(centres, q.codebook.detach())
    assert (dist_.min(1).values < 0.1).all()  # every cluster has a code on it
    order = dist_.argmin(1)  # the code of each cluster
    torch.testing.assert_close(q.usage[order], sizes.float() / sizes.sum())


def test_warmup_steps_zero_is_the_cold_start():
    torch.manual_seed(0)
    model = Model(small_config(warmup_steps=0))
    stats = train_steps(model, 1)
    assert float(stats[0]["phase"]) == 1 and int(model.switch_step) == 0
    assert int(model.quantizer.bank_count) == 0  # never warmed up: k-means ran on the first batch alone


def test_the_faithful_cold_start_keeps_tamings_uniform_codebook_and_learns_it_by_its_loss():
    torch.manual_seed(0)
    model = Model(small_config(warmup_steps=0, switch_init="keep", respawn_threshold=0))
    K = model.cfg.codebook_size
    start = model.quantizer.codebook.detach().clone()
    assert start.abs().max() <= 1 / K  # taming's U(-1/K, 1/K)
    stats = train_steps(model, 1)
    assert float(stats[0]["phase"]) == 1 and int(model.switch_step) == 0
    moved = (model.quantizer.codebook.detach() - start).abs().sum(1) > 0
    # no k-means (which would move all K codes onto the latents): after one step only the codes that vectors chose
    # have moved, by the optimizer, from the codebook loss
    assert 0 < int(moved.sum()) < K
    with pytest.raises(ValueError, match="switch_init"):
        Model(small_config(switch_init="random"))


def test_vq_phase_quantizes_with_straight_through_and_gradients_on_the_right_terms():
    torch.manual_seed(0)
    q = WarmupQuantizer(8, 3, beta=0.25, respawn_threshold=0)
    q.switch(torch.randn(64, 3))
    z = torch.randn(10, 3, requires_grad=True)
    z_q, codes, loss, _ = q(z)
    e = q.codebook.detach()[codes]
    assert torch.equal(z_q, e)  # the forward value is the code itself
    loss.backward()
    n = z.numel()
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z.detach() - e) / n)  # beta on the encoder's term only
    expected = torch.zeros(8, 3).index_add_(0, codes, 2 * (e - z.detach()) / n)
    torch.testing.assert_close(q.codebook.grad, expected)


def test_low_usage_codes_respawn_onto_current_outputs():
    torch.manual_seed(0)
    q = WarmupQuantizer(4, 2, usage_decay=0.5, respawn_threshold=0.5, respawn_every=2)
    q.switch(torch.rand(32, 2))
    with torch.no_grad():
        q.codebook[2:] = torch.tensor([[100., 100.], [-100., -100.]])  # never chosen from here on
    z = torch.rand(32, 2)
    q(z)
    assert (q.codebook[2:].abs() > 90).all()  # not yet: a check every 2 steps
    q(z)
    for k in (2, 3):
        assert torch.cdist(q.codebook[k:k + 1].detach(), z).min() < 1e-6  # onto a vector of this step
        assert float(q.usage[k]) == pytest.approx(1 / 4)  # and its usage restarts at uniform


def test_bf16_autocast_picks_the_same_codes_as_fp32():
    torch.manual_seed(0)
    q = WarmupQuantizer(512, 8, kmeans_iters=0)
    q.switch(torch.randn(4096, 8))
    q.eval()
    z = torch.randn(4096, 8)
    _, codes32, _, _ = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, codes16, _, _ = q(z)
        naive = (z @ q.codebook.t() * -2 + (q.codebook ** 2).sum(1)).argmin(1)  # without the fp32 island
    assert torch.equal(codes32, codes16) and z_q.dtype == torch.float32
    assert (naive != codes32).any(), "bf16 distances should disagree somewhere, or this test proves nothing"


# -- water-filling and the adaptive switch --------------------------------------------------------------------------

@pytest.mark.parametrize("D,bits", [(8, 3.0), (32, 10.0), (5, 0.5)])
def test_waterfill_equal_eigenvalues_spends_bits_on_every_dimension(D, bits):
    # with D equal variances l, theta = l * 2^(-2R/D) < l for any R > 0: all D directions are active
    count, theta = waterfill(torch.full((D,), 2.0), bits)
    assert count == D
    assert theta == pytest.approx(2.0 * 2 ** (-2 * bits / D))


def test_waterfill_hand_solved_spectrum():
    eigs = torch.tensor([16.0, 4.0, 1.0])
    # R = 1: theta = 16 / 2^2 = 4, not above the second eigenvalue: one active direction
    assert waterfill(eigs, 1.0) == (1, pytest.approx(4.0))
    # R = 2: two active, log2 theta = (4 + 2 - 4) / 2 = 1: theta = 2; check 1/2 log2(16/2) + 1/2 log2(4/2) = 2
    assert waterfill(eigs, 2.0) == (2, pytest.approx(2.0))
    # and it agrees with eval.py's copy on a random spectrum
    spectrum = torch.rand(40).double() ** 4
    assert waterfill(spectrum, 10.0) == ev.waterfill(spectrum, 10.0)


def test_predicted_dim_is_waterfill_of_the_bank_covariance():
    torch.manual_seed(0)
    q = WarmupQuantizer(2 ** 6, 8, bank_size=4000)
    q(torch.randn(4000, 8) * torch.tensor([8., 4., 2., 1., .5, .25, .1, .05]))
    expected = ev.waterfill(ev.eigenvalues(q.bank_latents()), 6.0)[0]
    assert q.predicted_dim() == expected and 1 < expected < 8


def test_adaptive_rule_switches_when_the_prediction_stops_growing(monkeypatch):
    torch.manual_seed(0)
    model = Model(small_config(switch_rule="adaptive", warmup_steps=100, waterfill_every=2, patience=2))
    predictions = iter([1, 2, 3, 3, 2, 5])  # grows, then two predictions without a new maximum
    monkeypatch.setattr(model.quantizer, "predicted_dim", lambda: next(predictions))
    phases = [float(s["phase"]) for s in train_steps(model, 12)]
    # predictions at steps 2, 4, 6 (1, 2, 3: growing), 8 (3) and 10 (2): the second without a new maximum is at
    # step 10, whose forward switches
    assert phases.index(1.0) == 10 and int(model.switch_step) == 10
    assert int(model.wf_best) == 3
    # the fixed rule ignores the predictions (but still records them)
    fixed = Model(small_config(switch_rule="fixed", warmup_steps=100, waterfill_every=2, patience=2))
    monkeypatch.setattr(fixed.quantizer, "predicted_dim", lambda: 3)
    assert all(float(s["phase"]) == 0 for s in train_steps(fixed, 10))
    assert float(train_steps(fixed, 1, start=10)[0]["waterfill_dim"]) == 3


# -- the discriminator -----------------------------------------------------------------------------------------------

def test_adaptive_weight_is_zero_before_disc_start_and_finite_after():
    torch.manual_seed(0)
    model = Model(small_config(disc_weight=0.8, disc_start=2, warmup_steps=0))
    x = images()
    assert model.aux_module() is model.discriminator
    model.set_step(1)
    _, _, stats = model(x)
    assert float(stats["gan_weight"]) == 0 and float(stats["g_loss"]) == 0
    d_loss, _ = model.aux_loss(x, x)
    assert float(d_loss.detach()) == 0 and d_loss.requires_grad  # the discriminator does not learn before disc_start
    model.set_step(2)
    _, loss, stats = model(x)
    w = float(stats["gan_weight"])
    assert math.isfinite(w) and w > 0
    # lambda balances the two gradients at the decoder's last layer: recompute it by hand
    model.zero_grad()
    z_q = model.quantizer(model._latents(x))[0]
    x_hat = model._decode_latents(z_q)
    rec = (x_hat - x).abs().mean()
    g = -model.discriminator(x_hat).mean()
    last = model.decoder.conv_out.weight
    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g, last)[0]
    assert w == pytest.approx(0.8 * float(g_rec.norm() / (g_gan.norm() + 1e-4)), rel=1e-4)
    d_loss, _ = model.aux_loss(x, x_hat)
    assert float(d_loss.detach()) > 0
    assert Model(small_config(disc_weight=0.0)).aux_module() is None


# -- DDP: two gloo ranks on different data ---------------------------------------------------------------------------

def _ddp_worker(rank):
    torch.manual_seed(0)
    q = WarmupQuantizer(32, 4, usage_decay=0.9, respawn_threshold=0.5, respawn_every=2, bank_size=256)
    torch.manual_seed(1000 + rank)  # from here on each rank draws different random numbers, as in training
    preds = []
    for step in range(8):
        z = torch.randn(48, 4) * 0.5 + 2 * rank  # different data on each rank
        if step == 3:
            preds.append(q.predicted_dim())
            q.switch(z)
        q(z)
    return {"state": q.state_dict(), "preds": preds}


def test_two_gloo_ranks_keep_identical_codebook_and_usage(two_gloo_ranks):
    r0, r1 = two_gloo_ranks(_ddp_worker)
    assert r0["preds"] == r1["preds"]  # the same switch decision on every rank
    shared = ("codebook", "usage", "phase", "respawn_step")
    for name in shared:
        assert torch.equal(r0["state"][name], r1["state"][name]), f"{name} differs between ranks"
    assert int(r0["state"]["phase"]) == 1
    assert not torch.equal(r0["state"]["bank"], r1["state"]["bank"])  # each rank's bank holds its own data
    # the codebook learned from both ranks' data (means near 0 and near 2), not from rank 0's alone
    means = r0["state"]["codebook"].mean(1)
    assert (means > 1).sum() > 5 and (means < 1).sum() > 5


# -- the Model contract, resume and an end-to-end run ----------------------------------------------------------------

def test_decode_of_encode_equals_forward_in_eval_after_the_switch():
    torch.manual_seed(0)
    model = Model(small_config(warmup_steps=1))
    train_steps(model, 3)
    model.eval()
    x = images()
    codes = model.encode(x)
    assert codes.shape == (4, 4, 4) and codes.dtype == torch.long
    assert torch.equal(model.decode(codes), model(x)[0])
    codebook, z, flat = model.latents(x)["vq"]
    assert codebook.shape == (16, 4) and z.shape == (64, 4) and torch.equal(flat, codes.flatten())


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="divisible"):
        Model(small_config(image_size=18))
    with pytest.raises(ValueError, match="switch_rule"):
        Model(small_config(switch_rule="sometimes"))


def test_presets_name_known_datasets_and_use_vqgan_betas():
    assert set(warmup_vqgan.PRESETS) <= set(data.DATASETS)
    for preset in warmup_vqgan.PRESETS.values():
        assert (preset["beta1"], preset["beta2"]) == (0.5, 0.9)


TINY = ["--model", "warmup_vqgan", "--image_size", "16", "--batch_size", "4", "--channels", "8", "--ch_mult", "1,2",
        "--z_channels", "8", "--code_dim", "4", "--codebook_size", "16", "--bank_size", "64", "--eval_batches", "1",
        "--lr_schedule", "constant", "--log_interval", "1", "--waterfill_every", "2", "--disc_weight", "0.8",
        "--disc_channels", "8", "--disc_layers", "2", "--disc_start", "4", "--warmup_steps", "3"]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("stop", [2, 4])  # stopped before the switch at step 3, and after it
def test_resume_across_the_switch_keeps_the_phase_and_equals_a_straight_run(tmp_path, stop):
    straight, parts = str(tmp_path / "straight"), str(tmp_path / "parts")
    train.main([*TINY, "--out_dir", straight, "--max_iters", "6", "--eval_interval", "100"])
    train.main([*TINY, "--out_dir", parts, "--max_iters", str(stop), "--eval_interval", "100"])
    saved = torch.load(os.path.join(parts, "ckpt.pt"), weights_only=True)["model"]
    assert int(saved["quantizer.phase"]) == (stop > 3)
    train.main(["--out_dir", parts, "--resume", "--max_iters", "6"])
    a = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(parts, "ckpt.pt"), weights_only=True)["model"]
    assert int(b["switch_step"]) == 3 and int(b["quantizer.phase"]) == 1  # switched once, at step 3
    phases = [r["phase"] for r in read_log(parts) if r["split"] == "train"]
    assert phases == [0, 0, 0, 1, 1, 1]  # logged after steps 1..6: steps 0-2 warm up
    # resumed before the switch (the k-means then draws from the restored RNG and uses the warm-up latents that came
    # through the checkpoint) or after it: the resumed run is the straight run, bit for bit
    assert int(b["quantizer.bank_count"]) == int(a["quantizer.bank_count"]) > 0
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


def test_train_and_eval_end_to_end_report_eff_dims_and_curves(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    train.main([*TINY, "--out_dir", out, "--max_iters", "6", "--eval_interval", "2"])
    log = read_log(out)
    val = [r for r in log if r["split"] == "val"]
    assert [r["step"] for r in val] == [2, 4, 6] and [r["phase"] for r in val] == [0, 1, 1]
    dims = ("vq/eff_dim_99_latent", "vq/eff_dim_99_codebook", "vq/pr_latent", "vq/waterfill_dim")
    for key in dims:
        assert all(key in r for r in val), key
    train_records = [r for r in log if r["split"] == "train"]
    assert train_records[-1]["gan_weight"] > 0 and "aux_d_real" in train_records[-1]  # the GAN is on from step 4
    panels = []  # what curves.png would show, without needing matplotlib
    monkeypatch.setattr(ev, "plot", lambda path, title, drawn: panels.extend(drawn) or False)
    ev.main(["--curves", os.path.join(out, "log.jsonl"), "--out", str(tmp_path / "curves")])
    with open(tmp_path / "curves" / "curves.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "val"]
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    for key in ("phase", *dims):
        assert [float(r[key]) for r in rows] == [r[key] for r in val], key
    dim_lines = {label for title, _, _, lines in panels if title.startswith("dimensions") for label, *_ in lines}
    assert {f"val {key}" for key in dims} <= dim_lines
    metrics = ev.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--max_batches", "2", "--batch_size", "4",
                       "--json", str(tmp_path / "m.json"), "--grid", str(tmp_path / "g.png")])
    assert metrics["phase"] == 1 and 1 <= metrics["vq/eff_dim_99_codebook"] <= 4
    assert metrics["mse"] > 0 and metrics["vq/waterfill_dim"] >= 1


# the VQ phase (with respawns), the warm-up under either switch rule (water-filling predictions, which read their
# spectrum on the host, come only every waterfill_every steps: none here)
@pytest.mark.parametrize("warmup_steps,rule", [(0, "fixed"), (100, "fixed"), (100, "adaptive")])
def test_training_steps_after_the_first_read_no_tensor_value_on_the_host(steps_without_host_reads, warmup_steps,
                                                                         rule):
    torch.manual_seed(0)
    model = Model(small_config(warmup_steps=warmup_steps, respawn_every=2, switch_rule=rule))
    steps_without_host_reads(model, images(), steps=4)
    assert model.quantizer.respawn_step == (1 if warmup_steps == 0 else 0)  # 5 VQ steps: checks at the 2nd, 4th


def test_loading_a_state_dict_replaces_the_phase_a_model_had():
    torch.manual_seed(0)
    switched = Model(small_config(warmup_steps=0))
    switched(images())  # switches at its first step
    fresh = Model(small_config(warmup_steps=0))
    fresh.quantizer.eval()
    assert fresh.quantizer.warming_up  # read, and remembered on the host
    fresh.load_state_dict(switched.state_dict())
    assert not fresh.quantizer.warming_up
