"""vqvae2.py: the two levels, the Model contract, capacity matching against vqvae.py, DDP, and train.py / eval.py."""

import json
import os

import pytest
import torch

import data
import eval as evaluation
import train
import train_utils
import vqvae
import vqvae2
from vqvae2 import Config, Model, VectorQuantizer, matched_single_level


def small_config(**kw):
    return Config(**{**dict(image_size=16, hidden=16, res_hidden=8, res_blocks=1, codebook_size=32, code_dim=4), **kw})


# -- the two levels and the Model contract ----------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 64])
def test_grids_of_both_levels_and_decode_of_encode_equals_forward(size):
    torch.manual_seed(0)
    model = Model(small_config(image_size=size))
    x = torch.rand(3, 3, size, size) * 2 - 1
    x_hat, loss, _ = model(x)  # a training step initialises both codebooks from data
    assert x_hat.shape == x.shape and loss.dim() == 0
    model.eval()
    top, bottom = model.encode(x)
    assert top.shape == (3, size // 8, size // 8) and bottom.shape == (3, size // 4, size // 4)
    assert top.dtype == bottom.dtype == torch.long
    assert torch.equal(model.decode((top, bottom)), model(x)[0])


def test_training_steps_after_the_first_read_no_tensor_value_on_the_host(steps_without_host_reads):
    torch.manual_seed(0)
    model = Model(small_config(image_size=32, dead_code_window=2))
    steps_without_host_reads(model, torch.rand(4, 3, 32, 32) * 2 - 1, steps=4)  # EMA updates, dead-code resets
    assert model.quant_t.window_step == model.quant_b.window_step == 1  # 5 batches in windows of 2


def test_the_bottom_codes_depend_on_the_top_codes():
    # the bottom quantizer sees the decoded top codes: other top codes, other bottom vectors
    torch.manual_seed(0)
    model = Model(small_config(image_size=32))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    model(x)
    model.eval()
    h_b, _ = model._top(x)
    top, _ = model.encode(x)
    z_b = model._bottom(h_b, model.quant_t.lookup(top))
    assert not torch.allclose(z_b, model._bottom(h_b, model.quant_t.lookup((top + 1) % 32)))


def test_per_level_stats_and_latents_for_eval():
    torch.manual_seed(0)
    model = Model(small_config(image_size=32))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    _, loss, stats = model(x)
    for level in ("top", "bottom"):
        assert {f"{level}_commit", f"{level}_perplexity", f"{level}_code_usage"} <= set(stats)
    assert {"recon", "commit", "perplexity"} <= set(stats)
    assert torch.allclose(stats["commit"], stats["top_commit"] + stats["bottom_commit"])
    assert torch.allclose(loss, stats["recon"] + 0.25 * stats["commit"])  # beta on both levels' commitment
    model.eval()
    views = model.latents(x)
    assert set(views) == {"top", "bottom"}
    top, bottom = model.encode(x)
    for name, codes, grid in (("top", top, 4), ("bottom", bottom, 8)):
        codebook, z, c = views[name]
        assert codebook.shape == (32, 4) and z.shape == (2 * grid * grid, 4)
        assert torch.equal(c, codes.flatten())


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="power of 2"):
        Model(small_config(downsample=3))
    with pytest.raises(ValueError, match="divisible by 8"):
        Model(small_config(image_size=28))  # 28 / 4 = 7: no top grid


def test_the_decoder_gradient_moves_the_encoder_and_not_a_learned_codebook():
    vq = VectorQuantizer(8, 3, ema=False, init="random", dead_code_threshold=0)
    z = torch.randn(10, 3, requires_grad=True)
    vq(z)[0].sum().backward()  # the codebook moves by its own loss, ||sg(z) - e||^2, not by the decoder's gradient
    assert torch.equal(z.grad, torch.ones(10, 3))
    assert vq.codebook.grad is None or not vq.codebook.grad.any()


def test_model_learns_a_batch(overfit):
    torch.manual_seed(0)
    first, last = overfit(Model(small_config()))
    assert last < 0.5 * first


# -- capacity matching ------------------------------------------------------------------------------------------------

def test_matching_on_the_papers_configuration_equals_both_budgets():
    # 256x256 images, bottom 64x64, top 32x32 (as VQ-VAE-2 on ImageNet), with K_h = 320, D_h = 64
    cfg = Config(image_size=256, downsample=4, codebook_size=320, code_dim=64)
    match = matched_single_level(cfg)
    assert match["exact"] and match["message"].startswith("exact match")
    s = match["config"]
    Hb, Ht, Ch, Kh, Dh = 64, 32, 64, 320, 64
    Hs = 256 // s["downsample"]
    assert Hs * Hs * s["code_dim"] == Hb * Hb * Ch + Ht * Ht * Ch  # continuous: Hs Ws Cs = Hb Wb Ch + Ht Wt Ch
    assert s["codebook_size"] * s["code_dim"] == 2 * Kh * Dh  # discrete: Ks Ds = 2 Kh Dh
    assert (Hs, s["codebook_size"], s["code_dim"]) == (64, 512, 80)
    assert match["continuous"] == (64 * 64 * 80,) * 2 and match["discrete"] == (512 * 80,) * 2

    # the grids and channels the formulas assume are those of the two models (small widths: only shapes matter)
    narrow = dict(hidden=8, res_hidden=4, res_blocks=1, in_channels=1)
    two = Model(Config(**{**vars(cfg), **narrow})).eval()
    one = vqvae.Model(vqvae.Config(**{**s, **narrow})).eval()
    x = torch.zeros(1, 1, 256, 256)
    top, bottom = two.encode(x)
    assert top.shape[1:] == (Ht, Ht) and bottom.shape[1:] == (Hb, Hb)
    assert one._latents(x).shape == (1, Hs, Hs, s["code_dim"])
    assert one.quantizer.codebook.shape == (s["codebook_size"], s["code_dim"])


def test_no_exact_match_is_reported_with_the_nearest_settings():
    # VQ-VAE-2's own K_h = 512, D_h = 64: the budgets want K_s = 819.2
    match = matched_single_level(Config(image_size=256, codebook_size=512, code_dim=64))
    assert not match["exact"] and match["message"].startswith("no exact match")
    assert "819.2" in match["message"]
    assert (match["config"]["codebook_size"], match["config"]["code_dim"]) == (819, 80)
    assert match["discrete"] == (819 * 80, 2 * 512 * 64)
    # D_h = 6: the continuous budget wants D_s = 7.5
    match = matched_single_level(Config(image_size=32, codebook_size=320, code_dim=6))
    assert not match["exact"] and "D = 7.5" in match["message"]
    assert match["continuous"][0] != match["continuous"][1]


def test_matched_settings_are_vqvae_fields_and_copy_every_shared_setting():
    cfg = Config(image_size=32, hidden=24, codebook_size=160, code_dim=8, init="data", dead_code_threshold=3.0)
    s = matched_single_level(cfg)["config"]
    assert set(s) <= {f for f in train_utils.field_types(vqvae.Config)}
    assert (s["hidden"], s["init"], s["dead_code_threshold"]) == (24, "data", 3.0)
    # another grid for the single level: the top one (4x4 for 32x32 images)
    match = matched_single_level(cfg, downsample=8)
    assert match["exact"] and match["config"]["code_dim"] == 40 and match["config"]["codebook_size"] == 64


def test_presets_fit_their_datasets_and_match_exactly():
    assert set(vqvae2.PRESETS) <= set(data.DATASETS)
    for dataset in vqvae2.PRESETS:
        _, cfg, _, _ = train.resolve_config(["--model", "vqvae2", "--dataset", dataset])
        assert cfg.image_size % (2 * cfg.downsample) == 0, dataset
        assert matched_single_level(cfg)["exact"], dataset


# -- DDP: both codebooks stay bitwise equal ---------------------------------------------------------------------------

def _ddp_worker(rank):
    torch.manual_seed(0)
    model = Model(small_config(dead_code_window=2))  # the same weights on every rank
    torch.manual_seed(1000 + rank)  # from here on each rank draws different data

    dead_at_reset = []
    for name in ("quant_t", "quant_b"):
        q = getattr(model, name)

        def spy(z, q=q, reset=q._reset_dead_codes, name=name):  # count the dead codes at each reset
            dead_at_reset.append((name, int((q.usage < q.dead_code_threshold).sum())))
            reset(z)

        q._reset_dead_codes = spy
    for _ in range(4):
        x = (torch.rand(4, 3, 16, 16) * 2 - 1) * (0.5 + 0.5 * rank)  # different data on each rank
        model(x)  # train mode: data init, EMA updates, dead-code resets at batches 2 and 4
    return {"state": model.state_dict(), "dead": dead_at_reset}


def test_two_gloo_ranks_keep_both_codebooks_identical(two_gloo_ranks):
    r0, r1 = two_gloo_ranks(_ddp_worker)
    assert r0["dead"] == r1["dead"]
    for name in ("quant_t", "quant_b"):
        dead = [n for level, n in r0["dead"] if level == name]
        assert len(dead) == 2 and sum(dead) > 0, f"{name}: the reset path was not exercised"
        assert bool(r0["state"][f"{name}.initialized"])
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), f"{key} differs between ranks"


# -- train.py and eval.py ---------------------------------------------------------------------------------------------

def test_train_py_runs_vqvae2_and_eval_reports_both_levels(tmp_path):
    out = str(tmp_path / "run")
    train.main(["--model", "vqvae2", "--hidden", "16", "--res_hidden", "8", "--res_blocks", "1", "--codebook_size",
                "16", "--code_dim", "4", "--batch_size", "8", "--max_iters", "4", "--log_interval", "2",
                "--eval_batches", "1", "--out_dir", out])
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in steps] == [2, 4] and "top_perplexity" in steps[-1]
    metrics = evaluation.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--max_batches", "1",
                               "--json", str(tmp_path / "m.json"), "--grid", str(tmp_path / "g.png")])
    for level in ("top", "bottom"):
        for key in ("perplexity", "usage", "dead", "eff_dim_99_latent"):
            assert f"{level}/{key}" in metrics
