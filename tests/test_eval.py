"""eval.py: every metric against an independent numpy computation on inputs whose answer is known."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev


def data_with_spectrum(eigs, n=2000, seed=0):
    """Rows whose sample covariance has exactly the eigenvalues `eigs`, in a random rotation."""
    rng = np.random.default_rng(seed)
    d = len(eigs)
    x = rng.standard_normal((n, d))
    x -= x.mean(0)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    white = u * math.sqrt(n - 1)  # covariance exactly I
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return torch.tensor(white * np.sqrt(eigs) @ q.T)


def test_eigenvalues_eff_dim_and_participation_ratio_on_a_known_spectrum():
    eigs = np.array([50.0, 30.0, 15.0, 3.5, 1.0, 0.5])  # sum 100; cumulative 50, 80, 95, 98.5, 99.5, 100
    v = data_with_spectrum(eigs)
    got = ev.eigenvalues(v)
    np.testing.assert_allclose(got.numpy(), eigs, rtol=1e-9)
    np.testing.assert_allclose(got.numpy(), np.sort(np.linalg.eigvalsh(np.cov(v.numpy().T)))[::-1], rtol=1e-9)
    assert ev.eff_dim(got) == 5  # 98.5% < 99% <= 99.5%
    assert ev.eff_dim(got, 0.9) == 3  # 80% < 90% <= 95%
    assert ev.participation_ratio(got) == pytest.approx(100 ** 2 / (eigs ** 2).sum())
    assert ev.participation_ratio(torch.ones(7)) == pytest.approx(7)  # isotropic: all dimensions


def test_waterfill_hand_solved_cases():
    # equal eigenvalues: every dimension active, theta = l * 2^(-2R/d)
    k, theta = ev.waterfill(torch.full((4,), 3.0), bits=6)
    assert k == 4 and theta == pytest.approx(3.0 * 2 ** (-2 * 6 / 4))
    # [16, 4, 1] at 2 bits: theta = 2 (1/2 log2(16/2) + 1/2 log2(4/2) = 1.5 + 0.5 = 2), so two dimensions
    k, theta = ev.waterfill(torch.tensor([1.0, 16.0, 4.0]), bits=2)
    assert k == 2 and theta == pytest.approx(2.0)
    # a tiny rate only reaches the largest
    assert ev.waterfill(torch.tensor([16.0, 4.0, 1.0]), bits=0.5)[0] == 1


def test_waterfill_against_a_numeric_search():
    rng = np.random.default_rng(1)
    eigs = np.exp(rng.normal(size=16))
    for bits in (1, 4, 10, 30):
        k, theta = ev.waterfill(torch.tensor(eigs), bits)
        thetas = np.exp(np.linspace(np.log(eigs.min()) - 30, np.log(eigs.max()), 200001))
        rate = np.maximum(0, 0.5 * np.log2(eigs[None, :] / thetas[:, None])).sum(1)
        ref = thetas[np.argmin(np.abs(rate - bits))]
        assert theta == pytest.approx(ref, rel=1e-3)
        assert k == int((eigs > ref).sum())


def test_perplexity_matches_numpy_entropy():
    counts = torch.tensor([10, 0, 30, 60, 0])
    p = np.array([10, 30, 60]) / 100
    assert ev.perplexity(counts) == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert ev.perplexity(torch.full((64,), 5)) == pytest.approx(64)


def test_mse_and_psnr_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (4, 3, 8, 8))
    x_hat = x + rng.normal(0, 0.1, x.shape)
    x_hat[0, 0, 0, 0] = 3.0  # out of range: clamped to 1 before the error is taken
    mse = ev.per_image_mse(torch.tensor(x), torch.tensor(x_hat)).numpy()
    x01, xh01 = (x + 1) / 2, np.clip((x_hat + 1) / 2, 0, 1)
    np.testing.assert_allclose(mse, ((x01 - xh01) ** 2).reshape(4, -1).mean(1), rtol=1e-6)
    assert ev.psnr(0.01) == pytest.approx(20.0)
    assert ev.psnr(1e-4) == pytest.approx(40.0)


class FixedModel(torch.nn.Module):
    """A stand-in whose reconstructions and codes are known: x_hat = x + offset per image, code = pixel's image index."""

    def __init__(self, offsets):
        super().__init__()
        self.offsets = offsets
        self.seen = 0  # images seen so far: the next batch takes the next offsets
        self.codebook = torch.eye(4)

    def forward(self, x):
        offsets = self.offsets[self.seen:self.seen + x.shape[0]]
        self.seen += x.shape[0]
        return x + offsets[:, None, None, None], torch.zeros(()), {}

    def latents(self, x):
        z = torch.randn(x.shape[0] * 4, 4, generator=torch.Generator().manual_seed(x.shape[0]))
        codes = torch.arange(x.shape[0] * 4) % 2  # codes 0 and 1 only
        return {"vq": (self.codebook, z, codes)}


def test_evaluate_global_and_per_image_psnr_and_mean_image_baseline():
    x = torch.zeros(6, 1, 4, 4)
    x[:3] = 0.5  # two groups of images
    offsets = torch.tensor([0.02, 0.04, 0.06, 0.08, 0.10, 0.12])
    loader = [x[:4], x[4:]]
    out = ev.evaluate(FixedModel(offsets), loader, torch.device("cpu"))

    per_image = (offsets.numpy() / 2) ** 2  # an offset on [-1, 1] is half as big on [0, 1]
    assert out["mse"] == pytest.approx(per_image.mean())
    assert out["psnr"] == pytest.approx(10 * np.log10(1 / per_image.mean()))
    assert out["psnr_per_image"] == pytest.approx(np.mean(10 * np.log10(1 / per_image)))
    x01 = (x.numpy() + 1) / 2
    assert out["mean_image_psnr"] == pytest.approx(10 * np.log10(1 / ((x01 - x01.mean(0)) ** 2).mean()))
    assert out["vq/perplexity"] == pytest.approx(2.0)  # codes 0 and 1 equally often
    assert out["vq/usage"] == 0.5 and out["vq/dead"] == 2
    assert out["images"] == 6


class ModelWithStats(FixedModel):
    """FixedModel plus eval_stats: per-batch means whose split average is known."""

    def eval_stats(self, x):
        return {"choice/a": x.mean(), "grad_gap": torch.tensor(float(x.shape[0]))}


def test_evaluate_averages_eval_stats_over_images_not_batches():
    x = torch.cat([torch.full((4, 1, 2, 2), 0.5), torch.full((2, 1, 2, 2), -1.0)])
    out = ev.evaluate(ModelWithStats(torch.zeros(6)), [x[:4], x[4:]], torch.device("cpu"))
    assert out["choice/a"] == pytest.approx((4 * 0.5 + 2 * -1.0) / 6)  # 0.0; the mean of batch means is -0.25
    assert out["grad_gap"] == pytest.approx((4 * 4 + 2 * 2) / 6)


def test_save_grid_writes_inputs_above_reconstructions(tmp_path):
    x = -torch.ones(2, 3, 4, 4)
    x_hat = torch.ones(2, 3, 4, 4)
    path = str(tmp_path / "grid.png")
    ev.save_grid(x, x_hat, path)
    img = np.array(Image.open(path))
    assert img.shape == (8, 8, 3)
    assert (img[:4] == 0).all() and (img[4:] == 255).all()


def test_load_model_refuses_missing_and_corrupt_files(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        ev.load_model(str(tmp_path / "none.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="bad.pt"):
        ev.load_model(str(bad))


def test_eval_cli_on_a_trained_checkpoint(tmp_path):
    import train
    out = tmp_path / "run"
    train.main(["--max_iters", "4", "--batch_size", "8", "--hidden", "16", "--codebook_size", "16",
                "--eval_batches", "1", "--out_dir", str(out)])
    json_path = tmp_path / "m.json"
    metrics = ev.main(["--ckpt", str(out / "ckpt.pt"), "--max_batches", "2", "--batch_size", "8",
                       "--json", str(json_path), "--grid", str(tmp_path / "g.png")])
    saved = json.loads(json_path.read_text())
    assert saved["step"] == 4 and saved["images"] == 16
    for key in ("mse", "psnr", "psnr_per_image", "mean_image_psnr", "vq/perplexity", "vq/usage", "vq/dead",
                "vq/eff_dim_99_latent", "vq/eff_dim_99_codebook", "vq/pr_latent", "vq/waterfill_dim"):
        assert key in saved and saved[key] == pytest.approx(metrics[key])
    assert Image.open(tmp_path / "g.png").size == (8 * 32, 2 * 32)


def test_eval_stats_may_give_one_value_per_position():
    class PerPosition(FixedModel):
        def eval_stats(self, x):
            return {"per_position": x.flatten(1)[:, :3].mean(0)}  # (3,): the batch's mean of 3 pixels

    x = torch.cat([torch.full((4, 1, 2, 2), 0.5), torch.full((2, 1, 2, 2), -1.0)])
    x[:, 0, 0, 0] = torch.arange(6.0)
    out = ev.evaluate(PerPosition(torch.zeros(6)), [x[:4], x[4:]], torch.device("cpu"))
    np.testing.assert_allclose(out["per_position"], [2.5, 0.0, 0.0], atol=1e-12)


def test_code_sequence_and_position_entropy_against_numpy():
    top, bottom = torch.randint(0, 3, (5, 2, 2)), torch.randint(0, 7, (5, 4, 4))
    seq = ev.code_sequence((top, bottom))
    assert seq.shape == (5, 20)
    assert torch.equal(seq[:, :4], top.flatten(1)) and torch.equal(seq[:, 4:], bottom.flatten(1))
    codes = torch.tensor([[0, 5, 3], [0, 5, 4], [0, 6, 3], [0, 7, 4]])  # constant, 3 values, 2 values
    np.testing.assert_allclose(ev.position_entropy(codes).numpy(), [0.0, 1.5, 1.0], atol=1e-12)
    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 9, size=(200, 6))
    want = []
    for col in codes.T:
        p = np.unique(col, return_counts=True)[1] / len(col)
        want.append(-(p * np.log2(p)).sum())
    np.testing.assert_allclose(ev.position_entropy(torch.tensor(codes)).numpy(), want, rtol=1e-12)


def brute_force_bayes(train, y, codes, m, alpha=1.0):
    """The two estimators of classify_from_codes, written out with loops over classes and positions."""
    K, C = max(train.max(), codes.max()) + 1, y.max() + 1
    out = {"independent": [], "1step": []}
    for row in codes:
        scores = {"independent": [], "1step": []}
        for c in range(C):
            mine = train[y == c]
            p_c = len(mine) / len(train)
            indep = [((mine[:, l] == row[l]).sum() + alpha) / (len(mine) + alpha * K) for l in range(m)]
            step = [indep[0]]
            for l in range(1, m):
                after = mine[mine[:, l - 1] == row[l - 1]]
                step.append(((after[:, l] == row[l]).sum() + alpha * K * indep[l]) / (len(after) + alpha * K))
            scores["independent"].append(math.log(p_c) + sum(map(math.log, indep)))
            scores["1step"].append(math.log(p_c) + sum(map(math.log, step)))
        for name in out:
            out[name].append(int(np.argmax(scores[name])))
    return out


def test_classify_from_codes_matches_a_brute_force_bayes_rule():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    train = (rng.integers(0, 4, (60, 5)) + y[:, None]) % 6  # codes that depend on the class
    train[:, 2] = train[:, 1]  # and a position that repeats the one before it
    codes = rng.integers(0, 6, (25, 5))
    got = ev.classify_from_codes(torch.tensor(train), y, torch.tensor(codes), [1, 2, 4, 5])
    for j, m in enumerate([1, 2, 4, 5]):
        want = brute_force_bayes(train, y, codes, m)
        for name in ("independent", "1step"):
            assert got[name][:, j].tolist() == want[name], (name, m)


def test_classify_from_codes_reads_a_class_from_one_code():
    y = np.array([0, 0, 1, 1, 2, 2])
    train = torch.tensor([[0, 9], [0, 8], [1, 9], [1, 8], [2, 9], [2, 8]])  # the first code is the class
    got = ev.classify_from_codes(train, y, torch.tensor([[2, 8], [1, 9], [0, 9]]), [1, 2])
    for name in ("independent", "1step"):
        assert got[name].tolist() == [[2, 2], [1, 1], [0, 0]]
    assert ev.prefix_lengths(64) == [1, 2, 4, 8, 16, 32, 64] and ev.prefix_lengths(6) == [1, 2, 4, 6]


def test_eval_cli_classifies_from_codes_when_the_dataset_has_labels(tmp_path, monkeypatch):
    import gzip
    import struct

    import train
    rng = np.random.default_rng(0)
    for stem, n in (("train", 24), ("t10k", 12)):
        labels = np.arange(n) % 3
        images = rng.integers(0, 30, size=(n, 28, 28))
        for i, c in enumerate(labels):  # a bright band whose row says the class
            images[i, 8 * c:8 * c + 6] = 250
        raw = struct.pack(">iiii", 2051, n, 28, 28) + images.astype(np.uint8).tobytes()
        (tmp_path / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
        labels_raw = struct.pack(">ii", 2049, n) + labels.astype(np.uint8).tobytes()
        (tmp_path / f"{stem}-labels-idx1-ubyte").write_bytes(labels_raw)
    out = tmp_path / "run"
    train.main(["--dataset", "mnist", "--data_dir", str(tmp_path), "--max_iters", "3", "--batch_size", "8",
                "--hidden", "16", "--codebook_size", "16", "--eval_batches", "1", "--out_dir", str(out)])
    common = ["--ckpt", str(out / "ckpt.pt"), "--split", "test", "--batch_size", "8",
              "--json", str(tmp_path / "m.json"), "--grid", str(tmp_path / "g.png")]
    metrics = ev.main(common)
    n = metrics["classify/n"]
    assert n == [1, 2, 4, 8, 16, 32, 49]  # 7x7 codes per image
    for name in ("independent", "1step"):
        acc = metrics[f"classify/{name}"]
        assert len(acc) == len(n) and all(0 <= a <= 1 for a in acc)
        assert acc[-1] > 0.5  # three classes that differ in every row of codes: far above chance (1/3)
    assert len(metrics["codes/entropy_bits"]) == 49
    assert "classify/n" not in ev.main(common + ["--classify", "off"])
    # count tables (positions, classes, K) that would not fit: only the leading positions that do are used (at
    # K = 65,536 and 6,321 positions the tables would take 31 GiB)
    with monkeypatch.context() as m:
        m.setattr(ev.classifiable_positions, "__defaults__", (3 * 16 * 10,))  # room for 10 to 40 positions
        capped = ev.main(common)
    cap = capped["classify/n"][-1]
    assert 10 <= cap < 49 and capped["classify/n"] == ev.prefix_lengths(cap)
    for name in ("independent", "1step"):  # the leading positions' answers are those of the whole table
        assert capped[f"classify/{name}"][:-1] == metrics[f"classify/{name}"][:len(capped["classify/n"]) - 1]
    few = ev.main(common + ["--max_batches", "1"])  # 8 images of each split, their labels the first 8
    assert few["images"] == 8 and len(few["classify/1step"]) == 7
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, 11) + bytes(11))
    with pytest.raises(SystemExit, match="12 images but 11 labels"):
        ev.main(common)


def ssim_reference(a, b, window=11, sigma=1.5, k1=0.01, k2=0.03):
    """SSIM of two (C, H, W) float64 images in [0, 1], straight from Wang et al. (2004): at every position where the
    window fits, the Gaussian-weighted means, variances and covariance of the two patches; the mean of the map."""
    size = min(window, *a.shape[1:])
    g = np.exp(-(np.arange(size) - (size - 1) / 2) ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = k1 ** 2, k2 ** 2
    values = []
    for c in range(a.shape[0]):
        for i in range(a.shape[1] - size + 1):
            for j in range(a.shape[2] - size + 1):
                pa, pb = a[c, i:i + size, j:j + size], b[c, i:i + size, j:j + size]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return np.mean(values)


def test_ssim_against_a_numpy_reference_and_hand_values():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, (2, 3, 16, 20))
    a[1] = np.cumsum(a[1], axis=2) / 20  # a smooth image beside a noisy one
    shifted = np.roll(a, 1, axis=3)
    noisy = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    to_pm1 = lambda v: torch.tensor(v * 2 - 1)  # noqa: E731: eval.py takes images in [-1, 1]
    assert ev.per_image_ssim(to_pm1(a), to_pm1(a)).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    for b in (shifted, noisy):
        got = ev.per_image_ssim(to_pm1(a), to_pm1(b)).numpy()
        want = [ssim_reference(a[i], b[i]) for i in range(2)]
        np.testing.assert_allclose(got, want, rtol=1e-9)
        assert (got < 0.99).all()
    # constant images 0.2 and 0.6: no variance, so SSIM = (2 * 0.2 * 0.6 + C1) / (0.2^2 + 0.6^2 + C1)
    flat = ev.per_image_ssim(*(torch.full((1, 1, 12, 12), v, dtype=torch.float64) for v in (-0.6, 0.2)))
    assert float(flat) == pytest.approx((0.24 + 1e-4) / (0.40 + 1e-4), rel=1e-12)
    # an image smaller than the window: a window of its own size (our choice), as the reference does
    small = rng.uniform(0, 1, (1, 1, 8, 8))
    got = ev.per_image_ssim(to_pm1(small), to_pm1(np.roll(small, 1, axis=2)))
    assert float(got) == pytest.approx(ssim_reference(small[0], np.roll(small, 1, axis=2)[0]), rel=1e-9)
    # the reconstruction is clamped to [0, 1], as for the MSE
    beyond = to_pm1(a[:1]) * 1.5  # reaches -1.5 and 1.5
    assert float(ev.per_image_ssim(to_pm1(a[:1]), beyond)) == pytest.approx(
        ssim_reference(a[0], np.clip((beyond[0].numpy() + 1) / 2, 0, 1)), rel=1e-9)


def test_evaluate_reports_the_mean_of_per_image_ssim():
    x = torch.rand(5, 3, 12, 12) * 2 - 1
    x_hat = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)

    class Fixed(torch.nn.Module):
        def forward(self, inputs):
            return x_hat, torch.zeros(()), {}
    out = ev.evaluate(Fixed(), [x], torch.device("cpu"))
    assert out["ssim"] == pytest.approx(np.mean([ssim_reference((x[i].double().numpy() + 1) / 2,
                                                                (x_hat[i].double().numpy() + 1) / 2)
                                                 for i in range(5)]), rel=1e-9)


def test_lorenz_curve_and_gini_by_hand():
    x, y = ev.lorenz(torch.tensor([3, 1]))
    assert x.tolist() == [0, 0.5, 1] and y.tolist() == [0, 0.25, 1]
    assert ev.gini(torch.tensor([3, 1])) == pytest.approx(0.25)  # 1 - 2 (0.0625 + 0.3125)
    assert ev.gini(torch.tensor([5, 5, 5, 5])) == pytest.approx(0)
    assert ev.gini(torch.tensor([0, 0, 0, 7])) == pytest.approx(0.75)  # one code takes every use: 1 - 1/K
