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
from pqvae import Config, Model, entropy_term, partition, unpartition


def small_config(**kw):
    """16x16 images, 8x8 map (downsample 2), one sub-map, 8 steps: 8 codes per image."""
    base = dict(image_size=16, hidden=16, feature_dim=32, downsample=2, steps=8, codebook_size=32,
                temp_anneal_iters=100)
    return Config(**{**base, **kw})


@pytest.mark.parametrize("tail_dropout", [False, True])
def test_training_steps_read_no_tensor_value_on_the_host(steps_without_host_reads, tail_dropout):
    torch.manual_seed(0)
    model = Model(small_config(tail_dropout=tail_dropout))
    model.set_step(10)
    steps_without_host_reads(model, torch.rand(4, 3, 16, 16) * 2 - 1, steps=2)
    assert all(torch.isfinite(p.grad).all() for p in model.encoder.parameters())  # the steps ran to the end


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


def test_training_mode_samples_with_gumbel_noise():
    torch.manual_seed(0)
    model = Model(small_config(temp_start=1.0))
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    _, codes_a, _, _ = model.quantizer(model._submaps(x))
    _, codes_b, _, _ = model.quantizer(model._submaps(x))
    assert not torch.equal(codes_a, codes_b)


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
    assert model.temperature_at(0) == pytest.approx(1.0)
    assert model.temperature_at(500) == pytest.approx(0.25)  # halfway, on a log scale
    assert model.temperature_at(1000) == pytest.approx(1 / 16)
    assert model.temperature_at(5000) == pytest.approx(1 / 16)
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
    e = model.quantizer.lookup(codes).clone()  # (B, L*P, D)
    e[:, k:] = model.null_code.detach() if tail_dropout else 0.0
    torch.testing.assert_close(got, model._decode_vectors(e.view(2, 8, 1, -1)), rtol=0, atol=1e-6)
    assert not torch.allclose(got, model.decode(codes))
    # leaving out one code (code_ablation, Fig. 5): only that code replaced, the tail kept
    e = model.quantizer.lookup(codes).clone()
    e[:, 2] = model.null_code.detach() if tail_dropout else 0.0
    torch.testing.assert_close(model.code_ablation(x)[2], model._decode_vectors(e.view(2, 8, 1, -1)), rtol=0,
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


def test_gradients_reach_encoder_transforms_and_codebook_through_the_gumbel_sample():
    torch.manual_seed(0)
    model = Model(small_config(lambda_h=0.0))  # the reconstruction alone: its gradient goes through the sample
    _, loss, _ = model(torch.rand(4, 3, 16, 16) * 2 - 1)
    loss.backward()
    for name in ("encoder.net.0.weight", "quantizer.w_c", "quantizer.w_s", "quantizer.codebook"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("kw", [dict(), dict(identity_gradient=False, beta=0.0)])  # ours, the paper's literal one
def test_model_learns_a_batch(overfit, kw):
    torch.manual_seed(0)
    first, last = overfit(Model(small_config(temp_anneal_iters=100, **kw)), steps=200)
    assert last < 0.5 * first


def test_identity_gradient_adds_the_decoders_gradient_to_e_and_changes_no_value():
    from pqvae import ProgressiveQuantizer
    e = torch.randn(32, 64)
    g = torch.randn(32, 64)  # the gradient arriving at e_hat
    out = {}
    for identity in (False, True):
        quantizer = ProgressiveQuantizer(16, 64, steps=1, codebook_size=8, temperature=0.5, identity_gradient=identity)
        quantizer.codebook.data = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
        leaf = e.clone().requires_grad_()
        torch.manual_seed(1)  # the same Gumbel noise for both
        e_hat, codes, _ = quantizer._quantize(leaf)
        (e_hat * g).sum().backward()
        out[identity] = (e_hat.detach(), codes, leaf.grad)
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
    torch.testing.assert_close(out[True][2] - out[False][2], g)  # the soft sample's part, plus g unchanged


def test_train_runs_pqvae_and_eval_reports_prefixes_ablation_and_strip(tmp_path):
    import train
    out = tmp_path / "run"
    train.main(["--model", "pqvae", "--max_iters", "3", "--batch_size", "4", "--image_size", "16", "--hidden", "8",
                "--feature_dim", "16", "--downsample", "2", "--steps", "4", "--codebook_size", "16",
                "--tail_dropout", "true", "--eval_batches", "1", "--out_dir", str(out)])
    json_path, strip_path = tmp_path / "m.json", tmp_path / "s.png"
    metrics = ev.main(["--ckpt", str(out / "ckpt.pt"), "--max_batches", "1", "--batch_size", "4",
                       "--json", str(json_path), "--grid", str(tmp_path / "g.png"), "--strip", str(strip_path)])
    saved = json.loads(json_path.read_text())
    assert saved["step"] == 3
    for n in (1, 2, 4):
        assert saved[f"codes_{n}/mse"] == pytest.approx(metrics[f"codes_{n}/mse"])
    assert saved["codes_4/mse"] == pytest.approx(saved["mse"])
    assert saved["code_ablation/positions"] == [0, 1, 2, 3]
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
    out = ev.evaluate(AblationModel(), [x[:3], x[3:]], torch.device("cpu"), diagnostics=True)
    assert out["code_ablation/positions"] == [0, 1, 2]
    # an offset of d on [-1, 1] is d / 2 on [0, 1]; the full reconstruction is exact
    np.testing.assert_allclose(out["code_ablation/mse_increase"], [0.0, 0.05 ** 2, 0.1 ** 2], rtol=1e-5, atol=1e-12)
    assert out["first/mse"] == pytest.approx(0.1 ** 2)
    strip = out["_strip"]
    assert len(strip) == 3 and torch.equal(strip[0], x[:3]) and torch.equal(strip[1], x[:3] + 0.2)
    # off by default (training's validation): no ablation, no strip
    plain = ev.evaluate(AblationModel(), [x], torch.device("cpu"))
    assert "code_ablation/positions" not in plain and "_strip" not in plain
    assert "code_ablation/mse_increase" in ev.format_table(out)


def test_save_rows_stacks_rows(tmp_path):
    path = str(tmp_path / "rows.png")
    ev.save_rows([-torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)], path)
    img = np.array(Image.open(path))
    assert img.shape == (12, 8)
    assert (img[:4] == 0).all() and (img[4:8] == 128).all() and (img[8:] == 255).all()
