"""pqvae.py: partitioning, the progressive quantizer's transforms, eq. 5, prefixes and tail dropout; eval.py's code
ablation and partial-reconstruction strip."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as ev
import pqvae
from pqvae import Config, Model, ProgressiveQuantizer, partition, unpartition

entropy_term = ProgressiveQuantizer.entropy_term


def small_quantizer(**kw):
    """A ProgressiveQuantizer alone: sub-maps of 4 channels x 4 positions, 3 steps of 8-dim vectors, 8 codes."""
    base = dict(channels=4, positions=4, steps=3, channel_dim=2, spatial_dim=4, codebook_size=8)
    return ProgressiveQuantizer(**{**base, **kw})


def small_config(**kw):
    """16x16 images, 8x8 map (downsample 2), one sub-map, 8 steps: 8 codes per image."""
    base = dict(image_size=16, hidden=16, feature_dim=32, downsample=2, steps=8, codebook_size=32,
                temp_anneal_iters=100)
    return Config(**{**base, **kw})


@pytest.mark.parametrize("kw", [dict(), dict(tail_dropout=True), dict(code_choice="gumbel", ema=False)])
def test_training_steps_after_the_first_read_no_tensor_value_on_the_host(steps_without_host_reads, kw):
    torch.manual_seed(0)
    model = Model(small_config(dead_code_window=2, **kw))
    model.set_step(10)
    steps_without_host_reads(model, torch.rand(4, 3, 16, 16) * 2 - 1, steps=4)  # EMA updates, dead-code resets
    assert model.quantizer.window_step == 1  # 5 batches in windows of 2: the steps ran, with their resets
    assert all(torch.isfinite(p.grad).all() for p in model.encoder.parameters())


def test_partition_then_unpartition_is_the_identity():
    for shape, n in (((2, 3, 8, 8), 8), ((1, 5, 16, 16), 8), ((2, 4, 32, 16), 8), ((1, 1, 8, 8), 4)):
        f = torch.randn(shape)
        s = partition(f, n)
        assert s.shape == (shape[0], (shape[2] // n) * (shape[3] // n), shape[1], n, n)
        assert torch.equal(unpartition(s, shape[2], shape[3]), f)


def test_partition_groups_the_same_relative_position_of_every_patch():
    # Fig. 2: a (1, 8, 8) map as a 4 x 4 grid of 2 x 2 patches gives 4 sub-maps of (1, 4, 4)
    f = torch.arange(64.0).view(1, 1, 8, 8)
    s = partition(f, 4)
    assert s.shape == (1, 4, 1, 4, 4)
    for p, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert torch.equal(s[0, p, 0], f[0, 0, i::2, j::2])


def test_inverse_transform_is_the_pseudo_inverse_projection():
    torch.manual_seed(0)
    q = pqvae.ProgressiveQuantizer(channels=512, positions=64, steps=3, channel_dim=4, spatial_dim=16)
    f = torch.randn(2, 3, 512, 64, dtype=torch.float32)  # (B, P, C, S)
    for l in range(3):
        wc, ws = q.w_c[l].detach().double(), q.w_s[l].detach().double()
        want = torch.linalg.pinv(wc.t()) @ wc.t() @ f.double() @ ws @ torch.linalg.pinv(ws)
        with torch.no_grad():  # the quantizer holds sub-maps transposed, (B, P, S, C)
            got = q.inverse(q.transform(f.transpose(-1, -2), l), l).transpose(-1, -2)
        assert got.shape == f.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
        # and it is a projection: applying it twice changes nothing more
        with torch.no_grad():
            again = q.inverse(q.transform(got.transpose(-1, -2), l), l).transpose(-1, -2)
        torch.testing.assert_close(again, got, rtol=1e-4, atol=1e-4)


def test_eval_mode_is_deterministic_and_decode_of_encode_is_forward():
    torch.manual_seed(0)
    model = Model(small_config()).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    codes = model.encode(x)
    assert codes.shape == (3, 8) and codes.dtype == torch.long
    assert torch.equal(model.encode(x), codes)
    assert torch.equal(model.decode(codes), model(x)[0])
    assert torch.equal(model(x)[0], model(x)[0])


def test_nearest_code_in_training_and_evaluation_gumbel_samples_in_training_only():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    model = Model(small_config())
    model(x)  # the first training batch initialises the codebook
    f = model._submaps(x).transpose(-1, -2)
    _, codes, q, _ = model.quantizer.progress(f)  # training mode
    assert torch.equal(codes.flatten(1), model.eval().encode(x))  # the nearest code either way
    assert torch.equal(codes.flatten(1), q.argmax(-1))  # the most probable code under q(z|x)
    gumbel = Model(small_config(code_choice="gumbel"))
    gumbel.load_state_dict(model.state_dict())
    assert torch.equal(gumbel.eval().quantizer.progress(f)[1], codes)  # the nearest code in evaluation (the
    # training samples: test_gumbel_temperature_shapes_the_gradient_not_the_code)


def test_gumbel_temperature_shapes_the_gradient_not_the_code():
    torch.manual_seed(0)
    e, c, g = torch.randn(32, 8), torch.randn(16, 8), torch.randn(32, 8)
    out = {}
    for tau in (1.0, 1 / 16):
        quantizer = small_quantizer(steps=1, codebook_size=16, code_choice="gumbel", temperature=tau)
        leaf = e.clone().requires_grad_()
        torch.manual_seed(1)  # the same noise for both temperatures
        e_hat, codes, _ = quantizer.choose(leaf, c)
        (e_hat * g).sum().backward()
        out[tau] = (e_hat.detach(), codes, leaf.grad)
        assert torch.equal(e_hat.detach(), c[codes])  # forward: exactly the drawn code
    assert torch.equal(out[1.0][1], out[1 / 16][1])  # the same codes at both temperatures
    assert not torch.allclose(out[1.0][2], out[1 / 16][2])  # different gradients
    nearest = ((e[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    assert (out[1.0][1] != nearest).any()  # and the sample is not always the nearest code


def test_straight_through_forward_is_the_nearest_code_and_the_gradient_reaches_e_unchanged():
    torch.manual_seed(0)
    quantizer = small_quantizer(steps=1, codebook_size=16)
    e, c, g = torch.randn(32, 8, requires_grad=True), torch.randn(16, 8), torch.randn(32, 8)
    e_hat, codes, q = quantizer.choose(e, c)
    (e_hat * g).sum().backward()
    ref = ((e.detach().double()[:, None] - c.double()[None]) ** 2).sum(-1)  # (N, K) distances in float64
    assert torch.equal(codes, ref.argmin(1))
    assert torch.equal(e_hat.detach(), c[codes])
    assert torch.equal(e.grad, g)
    torch.testing.assert_close(q.double(), torch.softmax(-ref, 1), rtol=1e-4, atol=1e-6)


def test_a_learned_codebook_moves_by_its_own_loss_only():
    torch.manual_seed(0)
    model = Model(small_config(ema=False, lambda_h=0.0, beta=0.25))
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    model(x)  # initialise
    s = model._submaps(x)
    codebook_before = model.quantizer.codebook.detach().clone()
    u = model.quantizer.scaled(model._progress(x)[3].detach())  # what the codebook sees, before the update
    e_hat, codes, loss, _ = model.quantizer(s)
    model.quantizer.codebook.grad = None
    loss.backward()
    # d/dc of mean((sg(u) - c_z)^2), by hand: only the chosen codes, toward their vectors
    n = u.numel()
    want = torch.zeros_like(codebook_before).index_add_(
        0, codes.flatten(), 2 * (codebook_before[codes].reshape(-1, u.shape[-1]) - u.reshape(-1, u.shape[-1])) / n)
    torch.testing.assert_close(model.quantizer.codebook.grad, want, rtol=1e-4, atol=1e-8)
    # the decoder's gradient through e_hat reaches no codebook
    model.quantizer.codebook.grad = None
    e_hat, _, _, _ = model.quantizer(model._submaps(x))
    e_hat.sum().backward()
    assert model.quantizer.codebook.grad is None or not model.quantizer.codebook.grad.any()


def test_ema_codebook_gets_no_gradient_and_follows_the_ema_formula():
    torch.manual_seed(0)
    q = small_quantizer(decay=0.9, eps=1e-5, dead_code_threshold=0)
    assert "codebook" in dict(q.named_buffers()) and "codebook" not in dict(q.named_parameters())
    s = torch.randn(6, 2, 4, 4)  # (B, P, C, S)
    q(s)  # initialises from this batch
    count0, sum0 = q.ema_count.clone().double().numpy(), q.ema_sum.clone().double().numpy()
    s = torch.randn(6, 2, 4, 4)
    with torch.no_grad():
        e = q.scaled(q.progress(s.transpose(-1, -2))[3])  # before the update, as the codebook sees them
    _, codes, _, _ = q(s)
    e, z = e.reshape(-1, 8).double().numpy(), codes.flatten().numpy()
    counts = np.bincount(z, minlength=8)
    sums = np.zeros((8, 8))
    np.add.at(sums, z, e)
    count = 0.9 * count0 + 0.1 * counts
    ema_sum = 0.9 * sum0 + 0.1 * sums
    smoothed = (count + 1e-5) / (count.sum() + 8e-5) * count.sum()
    np.testing.assert_allclose(q.ema_count.numpy(), count, rtol=1e-5)
    np.testing.assert_allclose(q.codebook.numpy(), ema_sum / smoothed[:, None], rtol=1e-4, atol=1e-5)


def test_step_scale_follows_the_ema_of_each_steps_variance_and_the_center_term_by_hand():
    torch.manual_seed(0)
    q = small_quantizer(decay=0.9, beta=0.0, lambda_h=0.0, center_weight=1.0, dead_code_threshold=0)
    q(torch.randn(6, 2, 4, 4))  # initialises from this batch
    var0 = q.step_var.clone().double()
    s = torch.randn(6, 2, 4, 4) * 2
    with torch.no_grad():
        e = q.progress(s.transpose(-1, -2))[3].double()  # (B, L, P, D), before the update
    _, _, loss, _ = q(s)
    e = e.transpose(0, 1).reshape(3, -1, 8)  # (L, B * P, D)
    var = ((e - e.mean(1, keepdim=True)) ** 2).mean((1, 2))  # each step's variance per dimension
    torch.testing.assert_close(q.step_var.double(), 0.9 * var0 + 0.1 * var, rtol=1e-5, atol=0)
    # the only term left: each step's batch mean in units of its (old) scale, squared, averaged over steps and dims
    want = ((e.mean(1) / var0.sqrt()[:, None]) ** 2).mean()
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-4)


def test_kmeans_init_takes_the_codebook_from_the_first_batch_of_every_step_once():
    torch.manual_seed(0)
    # decay 1: the EMA step after the initialisation leaves the codes where it put them
    q = small_quantizer(kmeans_iters=0, decay=1.0)
    s = torch.randn(5, 1, 4, 4) * 3
    # Algorithm 1 without quantization (e^_l = e_l), by hand: the vectors the codebook is drawn from
    f, pinv, es = s.transpose(-1, -2), q.pinv(), []
    with torch.no_grad():
        for l in range(3):
            es.append(q.transform(f, l).reshape(-1, 8))
            f = f - q.inverse(es[-1].view(5, 1, 8), l, pinv)
    # each step divided by its own scale, the root of its variance per dimension, by hand
    es = torch.cat([e / ((e - e.mean(0)) ** 2).mean().sqrt() for e in es])  # (15, 8)
    assert not q.initialized
    q(s)
    assert q.initialized
    assert (torch.cdist(q.codebook.double(), es.double()).min(1).values < 1e-4).all()  # every code is one of them
    assert torch.cdist(es[:5].double(), q.codebook.double()).min() < 1e-4  # step 1's vectors are among them
    # and not again: a state-dict round trip keeps the codebook, a new batch does not re-initialise it
    fresh = small_quantizer(kmeans_iters=0, decay=1.0)
    fresh.load_state_dict(q.state_dict())
    trained = q.codebook.clone()
    far = torch.randn(5, 1, 4, 4) * 100
    fresh(far), q(far)
    assert torch.equal(q.codebook, trained) and torch.equal(fresh.codebook, trained)  # decay 1: the EMA moves nothing


def test_dead_codes_move_onto_vectors_of_the_batch_and_their_ema_is_reset():
    torch.manual_seed(0)
    q = small_quantizer(steps=2, kmeans_iters=0, dead_code_threshold=1, dead_code_window=2)
    s = torch.randn(6, 1, 4, 4)
    q(s)
    with torch.no_grad():  # two codes far from every vector: never chosen
        q.codebook[6:] = 1000.0
        q.ema_sum[6:] = 1000.0
        q.usage.zero_()
        q.window_step.zero_()
    q._host_window_step = 0
    q(s)
    assert (q.codebook[6:] > 500).all()  # the window of 2 is not over
    with torch.no_grad():
        e = q.scaled(q.progress(s.transpose(-1, -2))[3])  # where the codebook sees this batch
    q(s)
    assert q.window_step == 0 and (q.usage == 0).all()
    e = e.reshape(-1, 8)
    for k in (6, 7):
        assert torch.cdist(q.codebook[k:k + 1], e).min() < 1e-4  # onto a vector of this batch
        assert q.ema_count[k] == 1.0 and torch.equal(q.ema_sum[k], q.codebook[k])


def test_eval_mode_changes_no_buffer():
    model = Model(small_config())
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    model(x)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(x), model.encode(x), model.latents(x), model.eval_stats(x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_progressive_quantizer_class_stands_alone(copied_class):
    torch.manual_seed(0)
    q = copied_class(ProgressiveQuantizer, imports="import math\n")(8, 16, steps=4, channel_dim=2, spatial_dim=4,
                                                                     codebook_size=16)
    s = torch.randn(8, 1, 8, 16, requires_grad=True)
    e_hat, codes, loss, stats = q(s)
    (e_hat.sum() + loss).backward()
    assert e_hat.shape == (8, 4, 1, 8) and codes.shape == (8, 4, 1)
    assert bool(q.initialized) and torch.isfinite(s.grad).all() and q.w_c.grad is not None


def test_eval_stats_is_the_entropy_of_q_per_position_in_bits():
    torch.manual_seed(0)
    model = Model(small_config())
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    model(x)
    model.eval()
    with torch.no_grad():  # codes drawn close together: q(z|x) is spread, not one-hot, so its entropy is not 0
        model.quantizer.codebook.mul_(0.05)
    q = model._progress(x)[2].detach().double()  # (B, L*P, K)
    want = [float(np.mean([-(p[p > 0] * np.log2(p[p > 0])).sum() for p in q[:, i].numpy()])) for i in range(8)]
    assert min(want) > 0.01
    np.testing.assert_allclose(model.eval_stats(x)["cond_entropy_bits"].double().numpy(), want, rtol=1e-4, atol=1e-6)


def _ddp_worker(rank):
    torch.manual_seed(0)
    q = small_quantizer(codebook_size=16, dead_code_threshold=2, dead_code_window=3)
    torch.manual_seed(1000 + rank)  # each rank its own data and random draws from here on, as in training
    resets = []
    reset = q._reset_dead_codes
    q._reset_dead_codes = lambda e: (resets.append(int((q.usage < q.dead_code_threshold).sum())), reset(e))
    for _ in range(9):
        s = torch.randn(8, 1, 4, 4) + 3 * rank  # rank 1's vectors far from rank 0's
        q(s)
    with torch.no_grad():
        u = q.scaled(q.progress(s.transpose(-1, -2))[3]).reshape(-1, 8)  # its last batch, as the codebook sees it
    return {"state": q.state_dict(), "resets": resets, "u": u}


def _step_var_worker(rank):
    torch.manual_seed(rank)
    e = torch.randn(3, 50, 8) + 3 * rank  # (L, N, D): rank 1's vectors far from rank 0's
    return {"e": e, "var": small_quantizer()._step_var(e)}


def test_step_variance_is_taken_over_both_ranks_vectors(two_gloo_ranks):
    r0, r1 = two_gloo_ranks(_step_var_worker)
    both = torch.cat([r0["e"], r1["e"]], 1).double()  # (L, 2N, D)
    want = ((both - both.mean(1, keepdim=True)) ** 2).mean((1, 2))  # about the pooled mean, not each rank's
    torch.testing.assert_close(r0["var"].double(), want, rtol=1e-5, atol=0)
    assert torch.equal(r0["var"], r1["var"])


def test_two_gloo_ranks_keep_the_codebook_bitwise_equal(two_gloo_ranks):
    r0, r1 = two_gloo_ranks(_ddp_worker)
    assert r0["resets"] == r1["resets"] and len(r0["resets"]) == 3 and sum(r0["resets"]) > 0
    for name, value in r0["state"].items():
        assert torch.equal(value, r1["state"][name]), f"{name} differs between ranks"
    # and the codebook learned from both ranks' data: each rank's vectors have codes of their own nearby
    nearest = torch.cdist(torch.cat([r0["u"], r1["u"]]), r0["state"]["codebook"]).argmin(1).view(2, -1)
    assert len(set(nearest[0].tolist()) - set(nearest[1].tolist())) > 2
    assert len(set(nearest[1].tolist()) - set(nearest[0].tolist())) > 2


def test_encode_runs_the_encoder_under_autocast_as_forward_does():
    torch.manual_seed(0)
    model = Model(small_config())
    x = torch.rand(256, 3, 16, 16) * 2 - 1  # 2,048 codes: an fp32 encoder would pick others for some of them
    model(x)
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, codes, _, _ = model.quantizer(model._submaps(x))  # what forward quantizes
        assert torch.equal(model.encode(x), codes.flatten(1))


def test_entropy_term_matches_a_hand_computation():
    # two images, one position, two codes: q(z|x1) = (0.9, 0.1), q(z|x2) = (0.2, 0.8)
    q = torch.tensor([[[0.9, 0.1]], [[0.2, 0.8]]])
    h = lambda p: -sum(v * math.log(v) for v in p)
    want = (h([0.9, 0.1]) + h([0.2, 0.8])) / 2 - h([0.55, 0.45])
    assert float(entropy_term(q)) == pytest.approx(want, abs=1e-6)
    # confident and spread over the batch: -log K; the same uniform q for every image: 0
    assert float(entropy_term(torch.eye(4)[:, None, :])) == pytest.approx(-math.log(4), abs=1e-6)
    assert float(entropy_term(torch.full((3, 2, 4), 0.25))) == pytest.approx(0.0, abs=1e-6)
    # averaged over positions
    both = torch.cat([q, torch.full((2, 1, 2), 0.5)], 1)
    assert float(entropy_term(both)) == pytest.approx(want / 2, abs=1e-6)


@pytest.mark.parametrize("dataset,codes", [("mnist", 64), ("cifar10", 64), ("celeba", 256), ("lsun_church", 1024)])
def test_codes_per_image_at_the_presets(dataset, codes):
    preset = {k: v for k, v in pqvae.PRESETS[dataset].items() if k in Config.__dataclass_fields__}
    in_channels, size = data.DATASETS[dataset]
    cfg = Config(**{"image_size": size, "in_channels": in_channels, **preset, "hidden": 8, "feature_dim": 8,
                    "res_blocks": 1})
    model = Model(cfg).eval()
    assert model.num_codes == codes
    assert model.encode(torch.zeros(1, in_channels, cfg.image_size, cfg.image_size)).shape == (1, codes)


def test_paper_recipe_in_presets():
    assert set(pqvae.PRESETS) <= set(data.DATASETS)
    for name in ("mnist", "cifar10", "celeba", "lsun_church"):
        p = pqvae.PRESETS[name]
        assert p["lr"] == 1e-3 and p["lr_schedule"] == "exp" and p["lr_decay_iters"] == 25000
    assert pqvae.PRESETS["celeba"]["batch_size"] == 512 and pqvae.PRESETS["cifar10"]["batch_size"] == 128
    cfg = Config()
    assert (cfg.feature_dim, cfg.submap, cfg.spatial_dim, cfg.channel_dim, cfg.codebook_size) == (512, 8, 16, 4, 256)


def test_temperature_schedule_and_it_survives_a_state_dict_round_trip():
    model = Model(small_config(temp_start=1.0, temp_end=1 / 16, temp_anneal_iters=1000))
    assert pqvae.temperature_at(0, model.cfg) == pytest.approx(1.0)
    assert pqvae.temperature_at(500, model.cfg) == pytest.approx(0.25)  # halfway, on a log scale
    assert pqvae.temperature_at(1000, model.cfg) == pytest.approx(1 / 16)
    assert pqvae.temperature_at(5000, model.cfg) == pytest.approx(1 / 16)
    model.set_step(250)
    assert float(model.quantizer.temperature) == pytest.approx(0.5)
    fresh = Model(small_config(temp_start=1.0, temp_end=1 / 16, temp_anneal_iters=1000))
    fresh.load_state_dict(model.state_dict())
    assert float(fresh.quantizer.temperature) == pytest.approx(0.5)


@pytest.mark.parametrize("tail_dropout", [False, True])
def test_prefix_decoding_leaves_the_tail_out(tail_dropout):
    torch.manual_seed(0)
    model = Model(small_config(tail_dropout=tail_dropout)).eval()
    if tail_dropout:
        with torch.no_grad():
            model.null_code.normal_()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = model.encode(x)
    k = 3
    other = codes.clone()
    other[:, k:] = (other[:, k:] + 1) % model.cfg.codebook_size  # a different tail
    got = model.decode(codes[:, :k])
    assert torch.equal(got, model.decode(other, keep=k))
    # by hand: the first k code vectors, then the null code (tail_dropout) or zeros (the steps left out)
    e = model.quantizer.lookup(codes.view(2, 8, 1)).flatten(1, 2).clone()  # (B, L*P, D)
    e[:, k:] = model.null_code.detach() if tail_dropout else 0.0
    torch.testing.assert_close(got, model._decode_latents(e.view(2, 8, 1, -1)), rtol=0, atol=1e-6)
    assert not torch.allclose(got, model.decode(codes))
    # leaving out one code (code_ablation, Fig. 5): only that code replaced, the tail kept
    e = model.quantizer.lookup(codes.view(2, 8, 1)).flatten(1, 2).clone()
    e[:, 2] = model.null_code.detach() if tail_dropout else 0.0
    torch.testing.assert_close(model.code_ablation(x)[2], model._decode_latents(e.view(2, 8, 1, -1)), rtol=0,
                               atol=1e-6)
    assert sorted(model.code_ablation(x)) == list(range(8))
    assert sorted(model.code_ablation(x, max_positions=3)) == [0, 4, 7]
    parts = model.partial_decodes(x)
    assert list(parts) == ["codes_1", "codes_2", "codes_4", "codes_8"]
    assert torch.equal(parts["codes_2"], model.decode(codes[:, :2]))
    assert torch.equal(parts["codes_8"], model(x)[0])


def test_tail_dropout_replaces_exactly_the_tail():
    torch.manual_seed(0)
    model = Model(small_config(tail_dropout=True))
    with torch.no_grad():
        model.null_code.normal_()
    e = torch.randn(3, 8, 1, model.quantizer.dim)
    keep = torch.tensor([1, 5, 8])
    out = model._leave_out(e, keep).view(3, 8, -1)
    for b, k in enumerate(keep.tolist()):
        assert torch.equal(out[b, :k], e.view(3, 8, -1)[b, :k])
        assert torch.equal(out[b, k:], model.null_code.detach().expand(8 - k, -1))
    # in training, the decoder sees a per-image random prefix: the null code gets gradient
    _, loss, _ = model(torch.rand(8, 3, 16, 16) * 2 - 1)
    loss.backward()
    assert model.null_code.grad is not None and model.null_code.grad.abs().sum() > 0
    # without the option there is no null code to learn
    assert not hasattr(Model(small_config()), "null_code")


def test_gradients_reach_encoder_and_transforms_and_not_the_ema_codebook():
    torch.manual_seed(0)
    model = Model(small_config())
    _, loss, _ = model(torch.rand(4, 3, 16, 16) * 2 - 1)
    loss.backward()
    for name in ("encoder.net.0.weight", "quantizer.w_c", "quantizer.w_s", "decoder.net.0.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert "quantizer.codebook" not in dict(model.named_parameters())


# ours, its codebook learned by its loss, and the paper's Gumbel-softmax
@pytest.mark.parametrize("kw", [dict(), dict(ema=False), dict(code_choice="gumbel")])
def test_model_learns_a_batch(overfit, kw):
    torch.manual_seed(0)
    first, last = overfit(Model(small_config(temp_anneal_iters=100, **kw)), steps=200)
    assert last < 0.3 * first


def test_train_runs_pqvae_and_eval_reports_prefixes_ablation_and_strip(tmp_path):
    import train
    out = tmp_path / "run"
    train.main(["--model", "pqvae", "--max_iters", "3", "--batch_size", "4", "--image_size", "16", "--hidden", "8",
                "--feature_dim", "16", "--downsample", "2", "--steps", "4", "--codebook_size", "16",
                "--tail_dropout", "true", "--eval_batches", "1", "--out_dir", str(out)])
    json_path, strip_path = tmp_path / "m.json", tmp_path / "s.png"
    metrics = ev.main(["--ckpt", str(out / "ckpt.pt"), "--max_batches", "1", "--batch_size", "4", "--ablation",
                       "--json", str(json_path), "--grid", str(tmp_path / "g.png"), "--strip", str(strip_path)])
    saved = json.loads(json_path.read_text())
    assert saved["step"] == 3
    for n in (1, 2, 4):
        assert saved[f"codes_{n}/mse"] == pytest.approx(metrics[f"codes_{n}/mse"])
    assert saved["codes_4/mse"] == pytest.approx(saved["mse"])
    assert saved["code_ablation/positions"] == [0, 1, 2, 3]
    assert len(saved["codes/entropy_bits"]) == 4 and len(saved["cond_entropy_bits"]) == 4
    assert saved["codes/entropy_bits_mean"] == pytest.approx(np.mean(saved["codes/entropy_bits"]))
    assert saved["codes/entropy_bits_min"] == pytest.approx(min(saved["codes/entropy_bits"]))
    assert len(saved["code_ablation/mse_increase"]) == 4
    assert Image.open(strip_path).size == (4 * 16, 4 * 16)  # inputs + 3 prefixes, 4 images each


class AblationModel(torch.nn.Module):
    """A stand-in with known answers: reconstruction x; leaving out code i adds i / 10 to every pixel;
    partial decodes add 0.2 and 0.1."""

    def forward(self, x):
        return x.clone(), torch.zeros(()), {}

    def latents(self, x):
        return {}

    def partial_decodes(self, x):
        return {"first": x + 0.2, "all": x + 0.1}

    def code_ablation(self, x):
        return {i: x + i / 10 for i in range(3)}


def test_evaluate_reports_code_ablation_and_strip_rows():
    x = torch.zeros(5, 1, 4, 4)
    out = ev.evaluate(AblationModel(), [x[:3], x[3:]], torch.device("cpu"), diagnostics=True, ablation=True)
    assert out["code_ablation/positions"] == [0, 1, 2]
    # an offset of d on [-1, 1] is d / 2 on [0, 1]; the full reconstruction is exact
    np.testing.assert_allclose(out["code_ablation/mse_increase"], [0.0, 0.05 ** 2, 0.1 ** 2], rtol=1e-5, atol=1e-12)
    assert out["first/mse"] == pytest.approx(0.1 ** 2)
    strip = out["_strip"]
    assert len(strip) == 3 and torch.equal(strip[0], x[:3]) and torch.equal(strip[1], x[:3] + 0.2)
    # off by default (training's validation): no ablation, no strip; the ablation only when asked for
    plain = ev.evaluate(AblationModel(), [x], torch.device("cpu"))
    assert "code_ablation/positions" not in plain and "_strip" not in plain
    assert "code_ablation/positions" not in ev.evaluate(AblationModel(), [x], torch.device("cpu"), diagnostics=True)
    assert "code_ablation/mse_increase" in ev.format_table(out)


def test_save_rows_stacks_rows(tmp_path):
    path = str(tmp_path / "rows.png")
    ev.save_rows([-torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)], path)
    img = np.array(Image.open(path))
    assert img.shape == (12, 8)
    assert (img[:4] == 0).all() and (img[4:8] == 128).all() and (img[8:] == 255).all()
