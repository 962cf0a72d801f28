"""adaptive_vq.py: pieces, the codebooks' configurations, nearest codes (exact, chunked, bounded memory), EMA,
the hard Gumbel-softmax choice and its gradients, the temperature schedule, encode/decode, fixed mode, eval_stats,
two gloo ranks, and train.py + eval.py end to end."""

import json
import os

import pytest
import torch

import adaptive_vq
import eval as evaluation
import train
from adaptive_vq import CodebookQuantizer, Config, Model, codebook_shapes, join_pieces, split_pieces


def small_config(**kw):
    """16x16 images, an 8x8 grid of 8-dim vectors, capacity 32: [4, 8], [8, 4], [16, 2], [32, 1]."""
    base = dict(image_size=16, in_channels=3, hidden=16, res_hidden=8, res_blocks=1, downsample=2, vector_dim=8,
                capacity=32, heads=2, temp_anneal_iters=100)
    return Config(**{**base, **kw})


def images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1


# -- pieces and configurations ----------------------------------------------------------------------------------------

def test_pieces_are_consecutive_slices_and_join_undoes_split():
    z = torch.arange(16.0).view(2, 8)  # two 8-dim vectors
    pieces = split_pieces(z, 2)
    assert pieces.shape == (8, 2)
    # piece j of vector m is z[m, 2j:2j+2], at row 4m + j
    assert pieces[0].tolist() == [0, 1] and pieces[3].tolist() == [6, 7] and pieces[5].tolist() == [10, 11]
    for d in (1, 2, 4, 8):
        z = torch.randn(5, 8)
        assert split_pieces(z, d).shape == (5 * 8 // d, d)
        assert torch.equal(join_pieces(split_pieces(z, d), 8), z)


def test_default_configurations_are_the_papers_and_subsets_and_fixed_select_from_them():
    assert codebook_shapes(Config()) == [(512, 128), (1024, 64), (2048, 32), (4096, 16), (8192, 8), (16384, 4),
                                         (32768, 2), (65536, 1)]
    assert all(n * d == 65536 for n, d in codebook_shapes(Config()))
    assert codebook_shapes(Config(codebook_sizes=(65536, 512, 4096))) == [(512, 128), (4096, 16), (65536, 1)]
    assert codebook_shapes(Config(fixed=4096, codebook_sizes=(512,))) == [(4096, 16)]
    for bad in (dict(fixed=3000), dict(fixed=256), dict(codebook_sizes=(512, 100))):  # N ∤ W, or D ∤ 128
        with pytest.raises(ValueError):
            codebook_shapes(Config(**bad))


def test_mnist_preset_keeps_the_eight_shapes_at_a_smaller_capacity():
    _, mcfg, _, _ = train.resolve_config(["--model", "adaptive_vq", "--dataset", "mnist"])
    assert (mcfg.image_size, mcfg.in_channels, mcfg.capacity, mcfg.vector_dim) == (28, 1, 4096, 128)
    assert [d for _, d in codebook_shapes(mcfg)] == [128, 64, 32, 16, 8, 4, 2, 1]
    Model(mcfg)  # 28 is divisible by the downsampling


# -- one codebook ------------------------------------------------------------------------------------------------------

def brute_force_nearest(z, e):
    return torch.cdist(z.double(), e.double()).argmin(1)


def test_sorted_path_for_scalar_codes_finds_the_nearest_code():
    q = CodebookQuantizer(4, 1, init="random")
    q.codebook.copy_(torch.tensor([[3.0], [-1.0], [10.0], [0.5]]))
    z = torch.tensor([[-5.0], [-1.0], [0.0], [0.8], [1.7], [2.0], [6.4], [6.6], [99.0]])
    assert q.nearest(z).tolist() == [1, 1, 3, 3, 3, 0, 0, 2, 2]
    q = CodebookQuantizer(1000, 1, init="random")
    z = torch.randn(5000, 1) * 2
    got = q.nearest(z)
    dist_got = (z - q.codebook[got]).abs()
    dist_best = (z - q.codebook[brute_force_nearest(z, q.codebook)]).abs()
    assert torch.equal(dist_got, dist_best)


def test_the_sorted_path_breaks_ties_to_the_lowest_index_like_brute_force():
    # integer codes and half-integer vectors: a vector halfway between two codes ties them, and duplicated codes tie
    # among themselves; the lowest index wins, whichever side of the vector it lies on
    q = CodebookQuantizer(2, 1, init="random")
    q.codebook.copy_(torch.tensor([[2.0], [0.0]]))
    assert q.nearest(torch.tensor([[1.0]])).tolist() == [0]  # the higher code, index 0
    g = torch.Generator().manual_seed(0)
    q = CodebookQuantizer(64, 1, init="random")
    q.codebook.copy_(torch.randint(-6, 7, (64, 1), generator=g).float())
    z = torch.randint(-9, 10, (3000, 1), generator=g).float() + 0.5 * torch.randint(0, 2, (3000, 1), generator=g)
    d = (z.double() - q.codebook.double().t()).abs()  # (N, K)
    lowest_tied = (d == d.min(1, keepdim=True).values).int().argmax(1)
    assert torch.equal(q.nearest(z), lowest_tied)


@pytest.mark.parametrize("dim", [1, 2, 4])
def test_the_search_ignores_autocast(dim):
    # eval.py and train.py's validation call nearest under their autocast: the codes must be forward's float32 ones
    torch.manual_seed(0)
    q = CodebookQuantizer(2048, dim, init="random")
    z = torch.randn(20_000, dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = q.nearest(z)
    assert torch.equal(under_autocast, q.nearest(z))


@pytest.mark.parametrize("layout", ["gaussian", "clustered", "wide", "far off", "one point"])
def test_the_cell_path_for_2d_codes_is_as_exact_as_the_chunked_path(layout, buffer_shapes):
    torch.manual_seed(0)
    q = CodebookQuantizer(2048, 2, init="random")
    z = torch.randn(100_000, 2)
    if layout == "clustered":  # codes and vectors in a few tight clusters: many codes per cell
        centres = torch.randn(5, 2) * 4
        q.codebook.copy_(centres[torch.randint(5, (2048,))] + 0.01 * torch.randn(2048, 2))
        z = centres[torch.randint(5, (100_000,))] + 0.02 * torch.randn(100_000, 2)
    elif layout == "wide":  # vectors far outside the codes
        z = z * 50
    elif layout == "far off":  # everything far from the origin: ||e||^2 - 2 z.e rounds coarsely
        q.codebook.mul_(0.01).add_(300)
        z = z * 0.01 + 300
    elif layout == "one point":  # a box of zero size
        z = torch.full((5000, 2), 0.3)
    got = q.nearest(z)
    assert buffer_shapes == []  # not the chunked path
    # both paths compare ||e||^2 - 2 z.e in float32: each choice is as near as the best up to that rounding
    d = torch.cdist(z.double(), q.codebook.double()) ** 2
    best = d.min(1).values
    rounding = 4e-7 * (z.double().norm(dim=1) ** 2 + q.codebook.double().norm(dim=1).max() ** 2)
    for codes in (got, q._nearest_chunked(z, q.codebook)):
        assert (d.gather(1, codes[:, None])[:, 0] - best <= rounding).all()
    assert (got == q._nearest_chunked(z, q.codebook)).float().mean() > 0.99


def test_the_cell_path_breaks_ties_to_the_lowest_index_like_brute_force(buffer_shapes):
    # codes and vectors on an integer lattice, where every distance is exact in float32: many exact ties, and
    # duplicated codes
    g = torch.Generator().manual_seed(0)
    q = CodebookQuantizer(300, 2, init="random")
    q.codebook.copy_(torch.randint(-6, 7, (300, 2), generator=g).float())
    z = torch.randint(-9, 10, (20_000, 2), generator=g).float() + 0.5 * torch.randint(0, 2, (20_000, 2), generator=g)
    d = torch.cdist(z.double(), q.codebook.double())
    lowest_tied = (d == d.min(1, keepdim=True).values).int().argmax(1)  # the first index at the minimum
    assert torch.equal(q.nearest(z), lowest_tied) and buffer_shapes == []


def test_a_non_finite_vector_takes_the_chunked_path_rather_than_failing():
    q = CodebookQuantizer(64, 2, init="random")
    z = torch.randn(1000, 2)
    z[7, 1] = float("nan")
    assert q.nearest(z).shape == (1000,)


@pytest.fixture
def buffer_shapes(monkeypatch):
    """The (rows, K) of every distance buffer CodebookQuantizer allocates while the test runs."""
    shapes = []
    real = CodebookQuantizer._buffer
    monkeypatch.setattr(CodebookQuantizer, "_buffer",
                        staticmethod(lambda rows, K, device: shapes.append((rows, K)) or real(rows, K, device)))
    return shapes


def test_chunked_distances_agree_with_brute_force_and_keep_to_their_block(buffer_shapes):
    torch.manual_seed(0)
    q = CodebookQuantizer(64, 4, init="random")
    q.search_block = 1000  # 15 rows of 64 codes per chunk
    z = torch.randn(300, 4)
    assert torch.equal(q.nearest(z), brute_force_nearest(z, q.codebook))
    assert buffer_shapes == [(15, 64)]  # one buffer, reused for all 20 chunks


def test_the_65536_codebook_runs_in_bounded_memory(buffer_shapes):
    """K = 65,536: the chunked path never holds more than `block` distances (a (P, K) matrix for the P = 65,536
    pieces below would be 16 GiB), and training on 65,536 scalar pieces takes the sorted path, which builds none."""
    torch.manual_seed(0)
    q = CodebookQuantizer(65536, 1, init="data")
    z = torch.randn(65536, 1)
    q.train()
    z_q, codes, counts = q(z)  # data init + nearest + EMA on the full codebook
    assert buffer_shapes == [] and bool(q.initialized) and counts.sum() == 65536
    assert float(((z_q - z) ** 2).mean()) < 1e-4  # 65,536 scalar codes drawn from the data quantize it finely
    sub = z[:2048]
    chunked = q._nearest_chunked(sub, q.codebook)  # the path every D > 1 takes, here at K = 65,536
    assert buffer_shapes == [(CodebookQuantizer.search_block // 65536, 65536)]  # a fixed block, not 2048 rows
    # the chunked path's ||e||^2 - 2 z.e is exact up to float32 rounding (~1e-6 here, where 65,536 codes lie about
    # 1e-4 apart): its choice is as near as the best up to that rounding
    excess = (sub - q.codebook[chunked]) ** 2 - (sub - q.codebook[q.nearest(sub)]) ** 2
    assert excess.min() >= 0 and excess.max() < 1e-5


def test_ema_moves_each_code_to_the_running_mean_of_its_vectors():
    q = CodebookQuantizer(2, 1, decay=0.5, eps=0.0, init="random", dead_code_threshold=0)
    q.codebook.copy_(torch.tensor([[0.0], [10.0]]))
    q.ema_sum.copy_(q.codebook)
    q.train()
    z_q, codes, _ = q(torch.tensor([[1.0], [3.0], [9.0]]))
    assert codes.tolist() == [0, 0, 1]
    assert z_q[:, 0].tolist() == [0.0, 0.0, 10.0]  # the codes as they were before the update
    # counts 0.5 * 1 + 0.5 * [2, 1] = [1.5, 1]; sums 0.5 * [0, 10] + 0.5 * [4, 9] = [2, 9.5]
    torch.testing.assert_close(q.codebook[:, 0], torch.tensor([2 / 1.5, 9.5]))


@pytest.mark.parametrize("kw", [dict(dead_code_window=2), dict(fixed=16, dead_code_window=2)])
def test_training_steps_after_the_first_read_no_tensor_value_on_the_host(steps_without_host_reads, kw, monkeypatch):
    monkeypatch.setattr(CodebookQuantizer, "cells_on_cpu", False)  # the path a GPU takes (the CPU's reads sizes)
    torch.manual_seed(0)
    model = Model(small_config(**kw))
    model.set_step(0)
    steps_without_host_reads(model, images(), steps=3)  # EMA updates, dead-code resets, the Gumbel-softmax
    assert all(int(q.window_step) == 0 for q in model.quantizers)  # 4 batches in windows of 2: resets ran


def test_quantizers_and_scores_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    q = CodebookQuantizer(512, 8, init="random").eval()
    z = torch.randn(4096, 8)
    want = q(z)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, codes, _ = q(z)
    assert z_q.dtype == torch.float32 and torch.equal(codes, want)
    model = Model(small_config(capacity=256, vector_dim=16, heads=4)).eval()  # 5 candidates, bf16 scores would tie
    z = torch.randn(4096, 16)
    want = model._quantize(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model._quantize(z)
    assert got[0].dtype == torch.float32 and torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


# -- choosing a codebook -----------------------------------------------------------------------------------------------

def test_hard_gumbel_choice_is_one_hot_and_gradients_reach_the_attention():
    torch.manual_seed(0)
    model = Model(small_config()).train()
    z = torch.randn(256, 8, requires_grad=True)
    z_q, y, candidates, _, _ = model._quantize(z)
    assert y.shape == (256, 4)
    torch.testing.assert_close(y, torch.nn.functional.one_hot(y.argmax(1), 4).float())  # one-hot up to rounding
    assert len(set(y.argmax(1).tolist())) > 1  # noise and scores spread the choices at temperature 1
    torch.testing.assert_close(z_q, candidates[torch.arange(256), y.argmax(1)])  # the chosen candidate, exactly
    (z_q * torch.randn_like(z_q)).sum().backward()
    for name, p in model.selector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached selector.{name}"
    assert z.grad.abs().sum() > 0  # and the straight-through path reaches the encoder's vectors


def test_hard_gumbel_samples_the_softmax_and_takes_the_soft_samples_gradient():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.2])
    for tau in (1.0, 0.1):  # the hard sample is argmax(logits + g) whatever the temperature (Gumbel-max)
        y = adaptive_vq.gumbel_softmax_hard(probs.log().expand(40000, 3), torch.tensor(tau))
        torch.testing.assert_close(y.mean(0), probs, atol=0.01, rtol=0)
    logits = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(5, 3)
    torch.manual_seed(1)
    (adaptive_vq.gumbel_softmax_hard(logits, torch.tensor(0.5)) * w).sum().backward()
    torch.manual_seed(1)  # the same Gumbel noise, by hand
    g = -torch.empty(5, 3).exponential_().log()
    want = torch.autograd.grad((((logits + g) / 0.5).softmax(-1) * w).sum(), logits)[0]
    torch.testing.assert_close(logits.grad, want)


def test_the_training_loss_trains_the_selector():
    torch.manual_seed(0)
    model = Model(small_config())
    _, loss, stats = model(images())
    loss.backward()
    assert model.selector.query.weight.grad.abs().sum() > 0
    assert sum(float(stats[f"choice_{name}"]) for name in model.names) == pytest.approx(1.0)


def test_temperature_schedule_and_it_survives_a_state_dict_round_trip():
    cfg = small_config(temp_start=1.0, temp_end=1 / 16, temp_anneal_iters=100)
    for step, want in ((0, 1.0), (50, 0.25), (100, 1 / 16), (1000, 1 / 16)):
        assert adaptive_vq.temperature_at(step, cfg) == pytest.approx(want)
    model = Model(cfg)
    model.set_step(50)
    fresh = Model(cfg)
    assert float(fresh.temperature) == 1.0
    fresh.load_state_dict(model.state_dict())
    assert float(fresh.temperature) == pytest.approx(0.25)


# -- encode / decode, fixed mode -------------------------------------------------------------------------------------

def test_encode_in_training_mode_changes_nothing_and_gives_the_eval_codes():
    # like every model's encode: no EMA step, no Gumbel draw, whatever the mode
    torch.manual_seed(0)
    model = Model(small_config())
    model(images())  # the data init
    before = {k: v.clone() for k, v in model.state_dict().items()}
    choice, codes = model.encode(images(seed=1))
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    eval_choice, eval_codes = model.eval().encode(images(seed=1))
    assert torch.equal(choice, eval_choice) and torch.equal(codes, eval_codes)


@pytest.mark.parametrize("kw", [{}, {"fixed": 16}])
def test_decode_of_encode_equals_forward_in_eval_mode(kw):
    torch.manual_seed(0)
    model = Model(small_config(**kw))
    for step in range(3):  # train mode: data init and EMA, so the codebooks are the data's
        model.set_step(step)
        model(images(seed=step))
    model.eval()
    x = images(seed=9)
    choice, codes = model.encode(x)
    assert choice.shape == (4, 8, 8) and codes.shape == (4, 8, 8, 8)
    pieces = torch.tensor([8 // d for _, d in model.shapes])[choice]  # (4, 8, 8), V / D of the chosen codebook
    used = torch.arange(8) < pieces[..., None]
    assert (codes[used] >= 0).all() and (codes[~used] == -1).all()
    assert torch.equal(model.decode((choice, codes)), model(x)[0])
    if not kw:
        assert len(set(choice.flatten().tolist())) > 1  # the test covers more than one codebook's decode


def test_fixed_mode_is_one_codebook_without_a_selector():
    torch.manual_seed(0)
    model = Model(small_config(fixed=8))
    assert model.shapes == [(8, 4)] and model.selector is None and len(model.quantizers) == 1
    _, loss, stats = model(images())
    loss.backward()
    assert not any(k.startswith("choice") for k in stats) and "temperature" not in stats
    model.eval()
    choice, codes = model.encode(images())
    assert (choice == 0).all() and (codes[..., :2] >= 0).all() and (codes[..., 2:] == -1).all()
    assert not any(k.startswith("choice") for k in model.eval_stats(images()))


def test_beta_weighs_the_commitment_to_the_chosen_candidate_and_codebooks_take_no_gradient():
    torch.manual_seed(0)
    model = Model(small_config(beta=0.3))
    model(images())  # initialise the codebooks
    model.eval()
    x = images(seed=1)
    _, loss, stats = model(x)
    z = model._latents(x).detach().reshape(-1, 8)
    chosen = model._quantize(z)[0]  # (M, V), the candidate each vector chose
    assert float(stats["commit"]) == pytest.approx(float(((z - chosen) ** 2).mean()), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(stats["recon"] + 0.3 * stats["commit"]), rel=1e-6)
    assert all(not p.requires_grad for name, p in model.named_buffers() if "codebook" in name)  # EMA only


def test_the_rate_penalty_adds_the_chosen_bits_and_moves_the_choice_to_cheaper_codebooks():
    # small_config's codebooks [4, 8], [8, 4], [16, 2], [32, 1] on 8-dim vectors: (8 / D) log2 N bits per vector
    torch.manual_seed(0)
    model = Model(small_config(rate_weight=0.5))
    assert model.bits.tolist() == [2.0, 6.0, 16.0, 40.0]
    model(images())  # initialise the codebooks
    model.eval()
    x = images(seed=1)
    _, loss, stats = model(x)
    chosen = model.bits[model.encode(x)[0]].float().mean()  # the bits each vector's choice costs, by hand
    assert float(stats["bits"]) == pytest.approx(float(chosen), rel=1e-6)
    assert float(model.eval_stats(x)["bits"]) == pytest.approx(float(chosen), rel=1e-6)
    by_hand = stats["recon"] + 0.25 * stats["commit"] + 0.5 * chosen / 8  # recon + beta commit + rate_weight bits / V
    assert float(loss.detach()) == pytest.approx(float(by_hand), rel=1e-6)
    # a heavy rate weight: the selector learns to take the cheapest codebook, [4, 8]
    model = Model(small_config(rate_weight=5.0, temp_start=0.5, temp_end=0.5))
    opt = torch.optim.Adam(model.selector.parameters(), lr=0.05)
    model(images())
    for step in range(40):
        _, loss, stats = model(images(seed=step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert float(model.eval_stats(images(seed=99))["choice/4x8"]) > 0.9


def test_model_learns_a_batch(overfit):
    first, last = overfit(Model(small_config(image_size=16)), steps=60)
    assert last < 0.5 * first


# -- eval_stats ------------------------------------------------------------------------------------------------------

def test_eval_stats_choice_frequencies_quant_error_and_gradient_gap(monkeypatch):
    torch.manual_seed(0)
    model = Model(small_config())
    model(images())  # initialise the codebooks from data
    model.eval()
    x = images(seed=1)
    with torch.no_grad():  # as eval.py calls it
        stats = model.eval_stats(x)
    assert sum(float(stats[f"choice/{n}"]) for n in model.names) == pytest.approx(1.0)
    assert 0 < float(stats["grad_gap"]) and 0 < float(stats["grad_gap_rel"])
    # the chosen quantization error, against the decoder's own input: the choice of forward
    z = model._latents(x).detach().reshape(-1, 8)
    z_q = model._quantize(z)[0]
    assert float(stats["quant_error"]) == pytest.approx(float(((z - z_q) ** 2).mean()), rel=1e-5)
    assert float(stats["quant_error/32x1"]) < float(stats["quant_error/4x8"])  # 32 scalar codes beat 4 8-dim ones

    # quantization that changes nothing: no error and no gap between the two gradients
    def identity(z):
        return z, torch.ones(z.shape[0], 1), z.unsqueeze(1), [], torch.zeros(())
    fixed = Model(small_config(fixed=32)).eval()
    monkeypatch.setattr(fixed, "_quantize", identity)
    with torch.no_grad():
        stats = fixed.eval_stats(x)
    assert float(stats["quant_error"]) == 0 and float(stats["grad_gap"]) == 0


# -- two gloo ranks ----------------------------------------------------------------------------------------------------

DEAD_BELOW = 150  # uses per window of 2 batches below which a code is reset: high, so that some codes are reset


def _ddp_worker(rank):
    torch.manual_seed(0)
    model = Model(small_config(dead_code_window=2, dead_code_threshold=DEAD_BELOW))
    torch.manual_seed(1000 + rank)  # from here on each rank draws different numbers (data, Gumbel noise, resets)
    resets = []
    for q in model.quantizers:  # count the dead codes at each reset
        def spy(z, q=q, reset=q._reset_dead_codes):
            resets.append(int((q.usage < q.dead_code_threshold).sum()))
            reset(z)
        q._reset_dead_codes = spy
    for step in range(4):
        model.set_step(step)
        model(images(seed=100 * rank + step) * 0.5 + 0.4 * rank)  # different data on each rank
    return {"state": model.state_dict(), "resets": resets}


def test_two_gloo_ranks_keep_every_codebook_identical(two_gloo_ranks):
    r0, r1 = two_gloo_ranks(_ddp_worker)
    assert r0["resets"] == r1["resets"] and len(r0["resets"]) == 8  # 4 codebooks, resets at batches 2 and 4
    assert sum(r0["resets"]) > 0, "no code was ever dead: the reset path was not exercised"
    n = 0
    for key, value in r0["state"].items():
        if key.startswith("quantizers."):
            assert torch.equal(value, r1["state"][key]), f"{key} differs between ranks"
            n += 1
    assert n == 4 * 6 and all(bool(r0["state"][f"quantizers.{i}.initialized"]) for i in range(4))


# -- train.py and eval.py ------------------------------------------------------------------------------------------

def test_train_py_runs_adaptive_and_fixed_and_eval_reports_choices(tmp_path):
    common = ["--model", "adaptive_vq", "--image_size", "16", "--hidden", "16", "--res_hidden", "8", "--res_blocks",
              "1", "--downsample", "2", "--vector_dim", "8", "--capacity", "32", "--heads", "2", "--batch_size", "4",
              "--max_iters", "3", "--log_interval", "3", "--eval_batches", "1"]
    for mode, extra in (("adaptive", []), ("fixed", ["--fixed", "16"])):
        out = str(tmp_path / mode)
        train.main(common + extra + ["--out_dir", out])
        with open(os.path.join(out, "log.jsonl")) as f:
            records = [json.loads(line) for line in f]
        assert [r["step"] for r in records if r["split"] == "train"] == [3]
        metrics = evaluation.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--max_batches", "1", "--batch_size", "4",
                                   "--json", str(tmp_path / f"{mode}.json"), "--grid", str(tmp_path / f"{mode}.png")])
        saved = json.loads((tmp_path / f"{mode}.json").read_text())
        assert saved["step"] == 3 and saved["mse"] == pytest.approx(metrics["mse"])
        names = ["4x8", "8x4", "16x2", "32x1"] if mode == "adaptive" else ["16x2"]
        for name in names:
            for key in ("perplexity", "usage", "dead", "eff_dim_99_latent"):
                assert f"{name}/{key}" in saved
            assert f"quant_error/{name}" in saved
        assert "grad_gap" in saved and "quant_error" in saved
        if mode == "adaptive":
            assert sum(saved[f"choice/{n}"] for n in names) == pytest.approx(1.0)
            ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
            # set_step ran before the steps 0, 1, 2; the temperature of step 2 is in the checkpoint
            cfg = Config(**ckpt["model_config"])
            assert float(ckpt["model"]["temperature"]) == pytest.approx(adaptive_vq.temperature_at(2, cfg))
        else:
            assert not any(k.startswith("choice/") for k in saved)
