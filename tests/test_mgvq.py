"""Multi-group quantization (MGVQ) in mgvq.py: groups = 1 is vqvae.py's plain quantizer, G > 1 is G independent
sub-quantizers computed together, and nested masking drops exactly the groups it should."""

import pytest
import torch

import eval as ev
import mgvq
from mgvq import Config, Model, VectorQuantizer


def small_config(**kw):
    return Config(**{**dict(image_size=16, hidden=16, res_hidden=8, res_blocks=1, codebook_size=32, code_dim=4), **kw})


def test_one_group_reproduces_the_plain_quantizer_bitwise_and_its_checkpoint_format(reproduces_the_reference):
    reproduces_the_reference(VectorQuantizer)  # the class default, one group: vqvae.py's recorded run


def test_groups_are_independent_quantizers_of_the_parts():
    torch.manual_seed(0)
    G, K, D = 4, 8, 8
    d = D // G
    # a large eps makes the Laplace smoothing, which must be per group, visible
    grouped = VectorQuantizer(K, D, groups=G, init="random", dead_code_threshold=0, decay=0.9, eps=0.5)
    singles = [VectorQuantizer(K, d, init="random", dead_code_threshold=0, decay=0.9, eps=0.5) for _ in range(G)]
    for g, single in enumerate(singles):  # the same starting codebooks
        single.codebook.copy_(grouped.codebook[:, g * d:(g + 1) * d])
        single.ema_sum.copy_(single.codebook)
    for step in range(5):
        z = torch.randn(200, D) * torch.tensor([1.0, 1.0, 3.0, 3.0, 0.5, 0.5, 2.0, 2.0])
        z_q, codes, loss, _ = grouped(z)
        assert codes.shape == (200, G)
        parts = [single(z[:, g * d:(g + 1) * d]) for g, single in enumerate(singles)]
        assert torch.equal(codes, torch.stack([p[1] for p in parts], 1))
        assert torch.allclose(z_q, torch.cat([p[0] for p in parts], 1))
        assert torch.allclose(loss, torch.stack([p[2] for p in parts]).mean())  # equal dims: mean of group losses
    for g, single in enumerate(singles):
        assert torch.allclose(grouped.codebook[:, g * d:(g + 1) * d], single.codebook, atol=1e-6)
        assert torch.allclose(grouped.ema_count[g * K:(g + 1) * K], single.ema_count)


def test_chunked_grouped_nearest_equals_unchunked():
    torch.manual_seed(0)
    G, K, D = 4, 16384, 8  # 256-row chunks: four of them for 1000 vectors
    vq = VectorQuantizer(K, D, groups=G, init="random", dead_code_threshold=0)
    z = torch.randn(1000, D)
    codes = vq.nearest(z)
    for g in range(G):
        e, zg = vq.codebook[:, 2 * g:2 * g + 2], z[:, 2 * g:2 * g + 2]
        assert torch.equal(codes[:, g], torch.addmm((e * e).sum(1), zg, e.t(), alpha=-2).argmin(1))


def test_kmeans_init_runs_per_group():
    torch.manual_seed(0)
    # group 0 has clusters at +-5 on its two dims, group 1 at 0 and 10: k-means must find each group's own
    centres = torch.tensor([[-5., -5., 0., 0.], [5., 5., 10., 10.], [-5., -5., 10., 10.], [5., 5., 0., 0.]])
    z = (centres[:, None] + 0.05 * torch.randn(4, 100, 4)).reshape(-1, 4)
    vq = VectorQuantizer(2, 4, groups=2, init="kmeans", kmeans_iters=10, dead_code_threshold=0)
    vq._init_codebook(z)
    got0 = sorted(vq.codebook[:, 0].round().tolist())
    got1 = sorted(vq.codebook[:, 2].round().tolist())
    assert got0 == [-5.0, 5.0] and got1 == [0.0, 10.0]


def test_dead_code_reset_is_per_group():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 4, groups=2, init="random", dead_code_threshold=2, dead_code_window=2)
    with torch.no_grad():  # group 0: codes 0..3 spread over the data; group 1: codes 2 and 3 far away
        vq.codebook.copy_(torch.tensor([[0.1, 0.1, 0.2, 0.2], [0.9, 0.9, 0.8, 0.8],
                                        [0.1, 0.9, 50., 50.], [0.9, 0.1, -50., -50.]]))
        vq.ema_sum.copy_(vq.codebook)
    z = torch.rand(400, 4)
    vq(z)
    vq(z)  # the window closes
    assert torch.equal(vq.ema_count[4:], torch.tensor([vq.ema_count[4], vq.ema_count[5], 1.0, 1.0]))
    assert (vq.codebook[2:, 2:].abs() <= 1).all()  # group 1's dead codes moved onto the data
    assert torch.equal(vq.ema_sum[2:, 2:], vq.codebook[2:, 2:])
    assert (vq.ema_count[:4] != 1.0).all()  # group 0 used all its codes: no reset there


def test_group_mask_zeroes_dropped_groups_and_skips_their_loss():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 8, groups=4, beta=0.25, init="random", dead_code_threshold=0).eval()
    z = torch.randn(10, 8, requires_grad=True)
    mask = torch.tensor([True, True, False, False])
    z_q, codes, loss, _ = vq(z, group_mask=mask)
    e = vq.lookup(codes)
    assert torch.equal(z_q[:, :4], e[:, :4]) and (z_q[:, 4:] == 0).all()
    expected = 0.25 * ((z[:, :4] - e[:, :4]) ** 2).mean()  # groups 0 and 1 only
    assert torch.allclose(loss, expected)
    (z_q.sum() + loss).backward()
    assert (z.grad[:, 4:] == 0).all() and (z.grad[:, :4] != 0).all()


def test_nested_masking_drops_group_i_when_u_is_below_p_i(monkeypatch):
    model = Model(Config(image_size=16, hidden=16, res_hidden=8, code_dim=8, groups=4, codebook_size=8,
                         group_mask_probs=(0.0, 0.2, 0.3, 0.4)))
    monkeypatch.setattr(mgvq.torch, "rand", lambda *a, **k: torch.tensor(0.25))
    assert model._group_mask().tolist() == [True, True, False, False]  # 0.25 < 0.3 and < 0.4
    monkeypatch.undo()
    masks = torch.stack([model._group_mask() for _ in range(20000)]).float()
    dropped = 1 - masks.mean(0)
    assert torch.allclose(dropped, torch.tensor([0.0, 0.2, 0.3, 0.4]), atol=0.015)
    nested = masks[:, 1:] <= masks[:, :-1]  # with increasing p, a dropped group's successors are dropped too
    assert nested.all()
    model.eval()
    assert model._group_mask() is None  # evaluation keeps every group unless groups_to_use says otherwise


def test_groups_to_use_decodes_from_a_prefix_and_matches_forward():
    torch.manual_seed(0)
    cfg = Config(image_size=16, hidden=16, res_hidden=8, code_dim=8, groups=4, codebook_size=8, groups_to_use=2)
    model = Model(cfg)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    model(x)  # initialise the codebooks
    model.eval()
    codes = model.encode(x)
    assert codes.shape == (2, 4, 4, 4)
    assert torch.equal(model.decode(codes), model(x)[0])  # the first two groups, as configured
    partial = model.partial_decodes(x)
    assert list(partial) == ["groups_1", "groups_2", "groups_3", "groups_4"]
    assert torch.equal(partial["groups_2"], model(x)[0])
    model.cfg.groups_to_use = 0
    assert torch.equal(partial["groups_4"], model(x)[0])
    assert not torch.equal(partial["groups_1"], partial["groups_4"])


def test_decode_uses_the_groups_asked_for_in_training_mode_too():
    # the nested masking's random draw is for forward's training steps; decode is asked for a prefix
    torch.manual_seed(0)
    cfg = Config(image_size=16, hidden=16, res_hidden=8, code_dim=8, groups=4, codebook_size=8,
                 group_mask_probs=(0.0, 0.5, 0.5, 0.5))
    model = Model(cfg)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    model(x)  # initialise the codebooks
    codes = model.encode(x)
    wanted = model.eval().decode(codes, 1)
    model.train()
    assert all(torch.equal(model.decode(codes, 1), wanted) for _ in range(20))
    assert all(torch.equal(a, b) for a, b in zip(model.partial_decodes(x).values(),
                                                 model.eval().partial_decodes(x).values()))


def test_latents_per_group_and_eval_reports_groups():
    torch.manual_seed(0)
    model = Model(Config(image_size=16, hidden=16, res_hidden=8, code_dim=8, groups=2, codebook_size=8))
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    model(x)
    views = model.eval().latents(x)
    assert list(views) == ["group0", "group1"]
    codebook, z, codes = views["group1"]
    assert codebook.shape == (8, 4) and z.shape == (4 * 16, 4)
    assert torch.equal(codes, model.encode(x)[..., 1].flatten())
    metrics = ev.evaluate(model, [x], torch.device("cpu"))
    for key in ("group0/perplexity", "group1/usage", "group1/eff_dim_99_latent", "groups_1/mse", "groups_2/psnr"):
        assert key in metrics
    assert metrics["groups_2/mse"] == pytest.approx(metrics["mse"])  # all groups: the full reconstruction


@pytest.mark.parametrize("kwargs, message", [
    (dict(code_dim=8, groups=3), "divisible"),
    (dict(groups=4, code_dim=8, group_mask_probs=(0.1, 0.2, 0.3, 0.4)), "the first 0"),
    (dict(groups=4, code_dim=8, group_mask_probs=(0.0, 0.2)), "needs 4 probabilities"),
    (dict(groups=4, code_dim=8, group_mask_probs=(0.0, 0.3, 0.2, 0.4)), "non-decreasing"),
    (dict(groups=2, code_dim=8, groups_to_use=3), "groups_to_use"),
])
def test_bad_group_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Model(Config(image_size=16, **kwargs))


def test_group_mask_probs_from_the_command_line():
    import train
    _, mcfg, _, _ = train.resolve_config(["--model", "mgvq", "--groups", "4", "--code_dim", "16",
                                          "--group_mask_probs", "0,0.2,0.3,0.4"])
    assert mcfg.group_mask_probs == (0.0, 0.2, 0.3, 0.4)


# -- a training step reads nothing on the host; the class copied alone -----------------------------------------------

def test_training_steps_after_the_first_read_no_tensor_value_on_the_host(steps_without_host_reads):
    torch.manual_seed(0)
    model = Model(small_config(dead_code_window=2, groups=2, group_mask_probs=(0.0, 0.5)))
    steps_without_host_reads(model, torch.rand(4, 3, 16, 16) * 2 - 1, steps=4)  # EMA updates, dead-code resets
    assert model.quantizer.window_step == 1  # 5 batches in windows of 2: the steps ran, with their resets


@pytest.mark.parametrize("groups", [1, 2])
def test_vector_quantizer_class_stands_alone(copied_quantizer_learns, groups):
    copied_quantizer_learns(VectorQuantizer, groups=groups)
