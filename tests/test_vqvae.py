"""vqvae.py: the quantizer's rules and the Model contract (the protocol table in README.md)."""

import numpy as np
import pytest
import torch

import adaptive_vq
import data
import vqvae
import vqvae2
from vqvae import Config, Model, VectorQuantizer


def small_config(**kw):
    return Config(**{**dict(image_size=16, hidden=16, res_hidden=8, res_blocks=1, codebook_size=32, code_dim=4), **kw})


# -- a recorded run, bit for bit ---------------------------------------------------------------------------------------

def test_the_quantizer_reproduces_the_recorded_run_bitwise_and_its_checkpoint_format(reproduces_the_reference):
    reproduces_the_reference(VectorQuantizer)


# -- the commitment term and the codebook term ------------------------------------------------------------------------

def test_beta_weighs_the_encoder_term_and_not_the_codebook_term():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 3, beta=0.25, ema=False, init="random", dead_code_threshold=0)
    z = torch.randn(10, 3, requires_grad=True)
    _, codes, loss, _ = vq(z)
    loss.backward()
    e = vq.codebook.detach()[codes]
    n = z.numel()
    # d/dz of beta * mean((z - sg(e))^2) and d/de of mean((sg(z) - e)^2), computed by hand
    assert torch.allclose(z.grad, 0.25 * 2 * (z.detach() - e) / n, atol=1e-7)
    expected = torch.zeros(8, 3).index_add_(0, codes, 2 * (e - z.detach()) / n)
    assert torch.allclose(vq.codebook.grad, expected, atol=1e-7)


def test_decoder_gradient_reaches_the_encoder_and_not_a_learned_codebook():
    vq = VectorQuantizer(8, 3, ema=False, init="random", dead_code_threshold=0)
    z = torch.randn(10, 3, requires_grad=True)
    z_q, _, _, _ = vq(z)
    z_q.sum().backward()  # the decoder's gradient only: the codebook moves by its own loss, not by this
    assert torch.equal(z.grad, torch.ones(10, 3))
    assert vq.codebook.grad is None or not vq.codebook.grad.any()


def test_ema_codebook_gets_no_gradient_and_follows_the_ema_formula():
    torch.manual_seed(0)
    K, D, decay, eps = 6, 2, 0.9, 1e-5
    vq = VectorQuantizer(K, D, decay=decay, eps=eps, init="random", dead_code_threshold=0)
    assert "codebook" in dict(vq.named_buffers()) and not list(vq.parameters())
    cb0, count0, sum0 = (vq.codebook.clone().numpy().astype(np.float64), vq.ema_count.clone().numpy(),
                         vq.ema_sum.clone().numpy())
    z = torch.randn(50, D)
    _, codes, _, _ = vq(z)

    # numpy reference: nearest code, then EMA of counts and sums, Laplace-smoothed division
    zn = z.numpy().astype(np.float64)
    ref_codes = ((zn[:, None, :] - cb0[None]) ** 2).sum(-1).argmin(1)
    assert np.array_equal(codes.numpy(), ref_codes)
    counts = np.bincount(ref_codes, minlength=K)
    sums = np.zeros((K, D))
    np.add.at(sums, ref_codes, zn)
    count = decay * count0 + (1 - decay) * counts
    ema_sum = decay * sum0 + (1 - decay) * sums
    n = count.sum()
    smoothed = (count + eps) / (n + K * eps) * n
    np.testing.assert_allclose(vq.codebook.numpy(), ema_sum / smoothed[:, None], rtol=1e-5, atol=1e-6)


def test_straight_through_passes_the_gradient_unchanged_and_forward_is_the_code():
    vq = VectorQuantizer(4, 2, init="random", dead_code_threshold=0).eval()
    z = torch.randn(5, 2, requires_grad=True)
    z_q, codes, _, _ = vq(z)
    assert torch.equal(z_q, vq.codebook[codes])  # bitwise: the forward value is the code itself
    (z_q * torch.arange(10.).reshape(5, 2)).sum().backward()
    assert torch.equal(z.grad, torch.arange(10.).reshape(5, 2))


# -- fp32 island and chunked distances --------------------------------------------------------------------------------

def test_bf16_autocast_picks_the_same_codes_as_fp32():
    torch.manual_seed(0)
    vq = VectorQuantizer(512, 8, init="random", dead_code_threshold=0).eval()
    z = torch.randn(4096, 8)
    _, codes32, _, _ = vq(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, codes16, _, _ = vq(z)
        # what a quantizer without the fp32 island would compute: the distance matmul in bf16
        naive = (z @ vq.codebook.t() * -2 + (vq.codebook ** 2).sum(1)).argmin(1)
    assert torch.equal(codes32, codes16)
    assert z_q.dtype == torch.float32
    assert (naive != codes32).any(), "bf16 distances should disagree somewhere, or this test proves nothing"


def test_chunked_nearest_equals_unchunked_and_the_true_nearest():
    torch.manual_seed(0)
    K, D, N = 65536, 8, 1000  # K = 65,536 gives 256-row chunks: four of them here
    vq = VectorQuantizer(K, D, init="random", dead_code_threshold=0)
    z = torch.randn(N, D)
    codes = vq.nearest(z)
    e = vq.codebook
    unchunked = torch.addmm((e * e).sum(1), z, e.t(), alpha=-2).argmin(1)
    assert torch.equal(codes, unchunked)
    exact = torch.cdist(z.double(), e.double())  # float64 reference: the chosen code is the nearest up to rounding
    assert torch.allclose(exact.gather(1, codes[:, None]).squeeze(1), exact.min(1).values, atol=1e-5)


# -- initialisation from data, dead-code reset, state in buffers ------------------------------------------------------

def test_data_init_takes_codes_from_the_first_batch_once():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 3, init="data", dead_code_threshold=0)
    assert not vq.initialized
    z = torch.randn(100, 3) * 5 + 10  # far from the N(0, 1) placeholder codebook
    vq(z)
    assert vq.initialized
    # every code is one of the batch's vectors (then moved by one EMA step toward its cluster mean: still close)
    d = torch.cdist(vq.codebook, z).min(1).values
    assert (d < 1.0).all()
    before = vq.codebook.clone()
    vq(torch.randn(100, 3) * 5 + 10)
    assert torch.allclose(vq.codebook, before, atol=1.0)  # not re-initialised: only an EMA step


def test_kmeans_init_finds_well_separated_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[0., 0.], [10., 0.], [0., 10.], [10., 10.]])
    z = (centres[:, None, :] + 0.1 * torch.randn(4, 200, 2)).reshape(-1, 2)
    vq_k = VectorQuantizer(4, 2, init="kmeans", kmeans_iters=10, dead_code_threshold=0)
    vq_k._init_codebook(z)
    dist = torch.cdist(centres, vq_k.codebook)
    assert (dist.min(1).values < 0.1).all()  # every true centre has a code on it


def test_initialized_flag_and_ema_state_survive_a_state_dict_round_trip():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 2, init="kmeans")
    vq(torch.randn(64, 2))
    state = vq.state_dict()
    assert {"codebook", "ema_count", "ema_sum", "usage", "window_step", "initialized"} <= set(state)
    fresh = VectorQuantizer(8, 2, init="kmeans")
    fresh.load_state_dict(state)
    z = torch.randn(64, 2) + 100  # a batch that re-initialisation would jump to
    fresh(z)
    vq(z)
    assert torch.equal(fresh.codebook, vq.codebook)
    assert (fresh.codebook.abs() < 50).all()  # no jump to the new batch: still the trained codebook, moved by EMA


def test_dead_codes_move_onto_batch_vectors_and_their_ema_is_reset():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, decay=0.99, init="random", dead_code_threshold=2, dead_code_window=3)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0., 0.], [1., 1.], [100., 100.], [-100., -100.]]))
        vq.ema_sum.copy_(vq.codebook)
    z = torch.rand(32, 2)  # in [0, 1]^2: codes 2 and 3 are never chosen
    for _ in range(2):
        vq(z)
    assert (vq.codebook[2:].abs() > 90).all()  # not yet: the window has 3 batches
    vq(z)  # third batch: the window closes, codes 2 and 3 are dead
    assert vq.window_step == 0 and (vq.usage == 0).all()
    for k in (2, 3):
        assert torch.cdist(vq.codebook[k:k + 1], z).min() < 1e-6  # moved onto a vector of the batch
        assert vq.ema_count[k] == 1.0 and torch.equal(vq.ema_sum[k], vq.codebook[k])
    moved = vq.codebook[2:].clone()
    vq(torch.full((8, 2), 0.0))  # a batch that does not use codes 2 and 3: EMA must not drag them back
    assert torch.allclose(vq.codebook[2:], moved, atol=1e-3)


# The same EMA quantizer, copied into each model file that uses it: each copy keeps host copies of its window.
@pytest.mark.parametrize("quantizer", [VectorQuantizer, vqvae2.VectorQuantizer, adaptive_vq.CodebookQuantizer])
def test_the_dead_code_window_survives_a_state_dict_round_trip(quantizer):
    torch.manual_seed(0)
    vq = quantizer(4, 2, init="random", dead_code_threshold=2, dead_code_window=3)
    with torch.no_grad():
        vq.codebook[2:] = 100.0
        vq.ema_sum[2:] = 100.0
    z = torch.rand(32, 2)
    vq(z), vq(z)  # two batches of the window of three
    fresh = quantizer(4, 2, init="random", dead_code_threshold=2, dead_code_window=3)
    fresh(z)  # its own window has started: loading must replace that position, not add to it
    fresh.load_state_dict(vq.state_dict())
    assert fresh.window_step == 2
    fresh(z)  # the third batch of the restored window: codes 2 and 3 are reset now, as in the original
    assert fresh.window_step == 0 and (fresh.codebook[2:] < 1.5).all()


def test_training_steps_after_the_first_read_no_tensor_value_on_the_host(steps_without_host_reads):
    torch.manual_seed(0)
    model = Model(small_config(dead_code_window=2))
    steps_without_host_reads(model, torch.rand(4, 3, 16, 16) * 2 - 1, steps=4)  # EMA updates, dead-code resets
    assert model.quantizer.window_step == 1  # 5 batches in windows of 2: the steps ran, with their resets


def test_threshold_zero_disables_dead_code_reset():
    vq = VectorQuantizer(4, 2, init="random", dead_code_threshold=0, dead_code_window=1)
    with torch.no_grad():
        vq.codebook[3] = 100.0
        vq.ema_sum[3] = 100.0
    for _ in range(3):
        vq(torch.rand(16, 2))
    assert vq.codebook[3].min() > 50


def test_eval_mode_changes_no_buffer():
    vq = VectorQuantizer(8, 2, init="kmeans").eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(32, 2))
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())


# -- the class copied alone -------------------------------------------------------------------------------------------

def test_vector_quantizer_class_stands_alone(copied_quantizer_learns):
    copied_quantizer_learns(VectorQuantizer)


# -- the Model contract -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("downsample", [2, 4, 8])
def test_model_shapes_and_decode_of_encode_equals_forward(downsample):
    torch.manual_seed(0)
    cfg = small_config(downsample=downsample, image_size=32, in_channels=3)
    model = Model(cfg)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    model.train()
    x_hat, loss, stats = model(x)  # one training step initialises the codebook from data
    assert x_hat.shape == x.shape and loss.dim() == 0
    assert {"recon", "commit", "perplexity"} <= set(stats)
    model.eval()
    codes = model.encode(x)
    assert codes.shape == (3, 32 // downsample, 32 // downsample) and codes.dtype == torch.long
    assert torch.equal(model.decode(codes), model(x)[0])


def test_latents_view_for_eval():
    model = Model(small_config()).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    views = model.latents(x)
    codebook, z, codes = views["vq"]
    assert codebook.shape == (32, 4) and z.shape == (2 * 4 * 4, 4)
    assert torch.equal(codes, model.encode(x).flatten())


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="power of 2"):
        Model(small_config(downsample=3))
    with pytest.raises(ValueError, match="divisible"):
        Model(small_config(image_size=18))
    with pytest.raises(ValueError, match="init"):
        Model(small_config(init="zeros"))


def test_model_learns_a_batch(overfit):
    torch.manual_seed(0)
    first, last = overfit(Model(small_config()))
    assert last < 0.5 * first


def test_presets_name_known_datasets():
    assert set(vqvae.PRESETS) <= set(data.DATASETS)
