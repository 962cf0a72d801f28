"""eval.py on your own images (--images, --codes, --decode), its pictures (code usage, training curves) and their
CSVs, and data.py's folder readers on the files users have: grayscale, palette, RGBA, CMYK, 16-bit, unreadable."""

import csv
import io
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as ev
import train

TINY = ["--hidden", "16", "--res_hidden", "8", "--res_blocks", "1", "--codebook_size", "16", "--batch_size", "8",
        "--eval_batches", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny vqvae, 6 steps on shapes (32x32, 8x8 codes), validated at step 3 and 6."""
    out = tmp_path_factory.mktemp("run")
    train.main([*TINY, "--max_iters", "6", "--eval_interval", "3", "--log_interval", "1", "--out_dir", str(out)])
    return out


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def photo(seed, size):
    """A smooth random RGB image of size (width, height): something an autoencoder can be asked to reconstruct."""
    rng = np.random.default_rng(seed)
    w, h = size
    return Image.fromarray((np.outer(np.linspace(0, 1, h), np.ones(w))[:, :, None] * rng.uniform(0, 255, 3)
                            ).astype(np.uint8))


def test_a_folder_is_reconstructed_and_bad_files_are_named_and_skipped(trained, tmp_path, capsys):
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    photo(0, (40, 30)).save(folder / "a.jpg")
    photo(1, (32, 32)).save(folder / "a.png")  # same stem as a.jpg: both keep their extension in the output
    photo(2, (64, 48)).convert("P").save(folder / "sub" / "b.bmp")
    photo(3, (50, 50)).save(folder / "sub" / "c.webp")
    buffer = io.BytesIO()
    photo(4, (32, 32)).save(buffer, format="PNG")
    (folder / "cut.png").write_bytes(buffer.getvalue()[:100])  # truncated
    (folder / "text.jpg").write_text("not an image")
    (folder / "notes.txt").write_text("left out: not an image extension")
    out = tmp_path / "recon"
    summary = ev.main(["--ckpt", str(trained / "ckpt.pt"), "--images", str(folder), "--out", str(out), "--codes"])
    err = capsys.readouterr().err
    assert "cut.png: cannot read image" in err and "text.jpg: cannot read image" in err
    assert sorted(summary["skipped_files"]) == ["cut.png", "text.jpg"] and summary["images"] == 4
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == ["a.jpg.png", "a.png.png", "sub/b.png", "sub/c.png"]
    assert all(Image.open(out / name).size == (32, 32) for name in written)
    rows = read_csv(out / "reconstructions.csv")
    assert [r["file"] for r in rows] == ["a.jpg", "a.png", "sub/b.bmp", "sub/c.webp"]
    assert summary == json.loads((out / "summary.json").read_text())
    # the CSV's numbers are the metrics of the model's input (the recipe applied) against its reconstruction
    x = data.to_tensor(data.resize_center_crop(Image.open(folder / "a.jpg").convert("RGB"), 32))[None]
    with torch.no_grad():
        model, _ = ev.load_model(str(trained / "ckpt.pt"))
        x_hat = model(x)[0]
    assert float(rows[0]["mse"]) == pytest.approx(float(ev.per_image_mse(x, x_hat)), rel=1e-5)
    assert float(rows[0]["ssim"]) == pytest.approx(float(ev.per_image_ssim(x, x_hat)), rel=1e-5)
    assert summary["mse"] == pytest.approx(np.mean([float(r["mse"]) for r in rows]))
    # the codes: one row per image read, in the CSV's order; decoded, they give the same reconstructions
    codes = np.load(out / "codes.npy")
    meta = json.loads((out / "codes.json").read_text())
    assert codes.shape == (4, 64) and meta["files"] == [r["file"] for r in rows]
    assert meta["code_layout"] == [[[8, 8], 16]] and meta["model_config"]["codebook_size"] == 16
    for i, name in ((0, "a.jpg"), (3, "sub/c.webp")):  # row i holds the codes of the i-th file
        x = data.to_tensor(data.resize_center_crop(Image.open(folder / name).convert("RGB"), 32))[None]
        assert codes[i].tolist() == ev.code_sequence(model.encode(x))[0].tolist()
    decoded = tmp_path / "decoded"
    ev.main(["--ckpt", str(trained / "ckpt.pt"), "--decode", str(out / "codes.npy"), "--out", str(decoded)])
    for name in written:
        a, b = (np.asarray(Image.open(d / name), dtype=np.int16) for d in (out, decoded))
        assert np.abs(a - b).max() <= 1  # the straight-through estimator's float rounding, at most one level


def test_output_names_are_distinct_and_outputs_never_land_among_the_inputs(trained, tmp_path):
    assert ev.output_names(["a.jpg", "a.png", "a.jpg.png", "s/b.bmp"]) == ["a.jpg.png", "a.png.png", "a.jpg_2.png",
                                                                          "s/b.png"]
    folder = tmp_path / "mine"
    folder.mkdir()
    photo(0, (32, 32)).save(folder / "one.png")
    for out in (folder, folder / "recon"):
        with pytest.raises(SystemExit, match="lies inside --images"):
            ev.main(["--ckpt", str(trained / "ckpt.pt"), "--images", str(folder), "--out", str(out)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no image files under"):
        ev.main(["--ckpt", str(trained / "ckpt.pt"), "--images", str(empty), "--out", str(tmp_path / "o")])


def test_a_folder_with_nothing_readable_exits_non_zero(trained, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "text.png").write_text("not an image")
    result = os.system(f"{sys.executable} {os.path.join(os.path.dirname(ev.__file__), 'eval.py')} --ckpt "
                       f"{trained / 'ckpt.pt'} --images {folder} --out {tmp_path / 'o'} > /dev/null 2>&1")
    assert result != 0
    with pytest.raises(SystemExit, match="no image under .* could be read"):
        ev.main(["--ckpt", str(trained / "ckpt.pt"), "--images", str(folder), "--out", str(tmp_path / "o")])


def test_decode_refuses_codes_of_another_shape_range_or_model(trained, tmp_path):
    np.save(tmp_path / "wide.npy", np.zeros((2, 65), np.int32))
    with pytest.raises(SystemExit, match=r"shape \(2, 65\).*\(images, 64\)"):
        ev.main(["--ckpt", str(trained / "ckpt.pt"), "--decode", str(tmp_path / "wide.npy"), "--out", str(tmp_path)])
    big = np.zeros((2, 64), np.int32)
    big[1, 5] = 16
    np.save(tmp_path / "big.npy", big)
    with pytest.raises(SystemExit, match="code 16 at image 1, position 5 is outside 0..15"):
        ev.main(["--ckpt", str(trained / "ckpt.pt"), "--decode", str(tmp_path / "big.npy"), "--out", str(tmp_path)])
    np.save(tmp_path / "float.npy", np.zeros((2, 64), np.float32))
    with pytest.raises(SystemExit, match="float32 values; codes are integers"):
        ev.main(["--ckpt", str(trained / "ckpt.pt"), "--decode", str(tmp_path / "float.npy"), "--out", str(tmp_path)])
    np.savez(tmp_path / "archive.npz", codes=np.zeros((2, 64), np.int32))
    with pytest.raises(SystemExit, match="is not one array of codes"):
        ev.main(["--ckpt", str(trained / "ckpt.pt"), "--decode", str(tmp_path / "archive.npz"), "--out", str(tmp_path)])
    np.save(tmp_path / "fine.npy", np.zeros((2, 64), np.int32))
    for sidecar in ("{bad", "[1, 2]"):  # a JSON beside the codes that --codes did not write
        (tmp_path / "fine.json").write_text(sidecar)
        with pytest.raises(SystemExit, match="fine.json, beside the codes, is not the JSON that --codes writes"):
            ev.main(["--ckpt", str(trained / "ckpt.pt"), "--decode", str(tmp_path / "fine.npy"), "--out", str(tmp_path)])
    # codes written by a model of the same config but other weights (another seed) are refused
    folder = tmp_path / "mine"
    folder.mkdir()
    photo(0, (32, 32)).save(folder / "one.png")
    other = tmp_path / "other_run"
    train.main([*TINY, "--max_iters", "2", "--seed", "1", "--out_dir", str(other)])
    ev.main(["--ckpt", str(other / "ckpt.pt"), "--images", str(folder), "--out", str(tmp_path / "o"), "--codes"])
    with pytest.raises(SystemExit, match="whose weights differ"):
        ev.main(["--ckpt", str(trained / "ckpt.pt"), "--decode", str(tmp_path / "o" / "codes.npy"),
                 "--out", str(tmp_path / "d")])


def test_the_usage_csv_behind_the_lorenz_curve_counts_every_code_of_the_split(trained, tmp_path):
    metrics = ev.main(["--ckpt", str(trained / "ckpt.pt"), "--max_batches", "2", "--batch_size", "8",
                       "--json", str(tmp_path / "m.json"), "--grid", str(tmp_path / "g.png")])
    rows = read_csv(trained / "ckpt_val_usage_vq.csv")
    counts = [int(r["count"]) for r in rows]
    assert len(rows) == 16 and sorted(int(r["code"]) for r in rows) == list(range(16))
    assert sum(counts) == metrics["images"] * 64  # 16 images of 8x8 codes
    assert counts == sorted(counts) and float(rows[-1]["usage_fraction"]) == pytest.approx(1)
    assert metrics["vq/dead"] == counts.count(0)
    assert metrics["vq/gini"] == pytest.approx(ev.gini(torch.tensor(counts)))


def test_training_curves_are_written_as_csv_and_drawn_when_matplotlib_is_there(trained, tmp_path, monkeypatch,
                                                                               capsys):
    records = [json.loads(line) for line in open(trained / "log.jsonl")]
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)  # as on a machine without the optional extra
        ev.main(["--curves", str(trained / "log.jsonl"), "--out", str(tmp_path / "c")])
    assert "need matplotlib" in capsys.readouterr().out and not (tmp_path / "c" / "curves.png").exists()
    rows = read_csv(tmp_path / "c" / "curves.csv")
    assert len(rows) == len(records) == 6 + 2  # 6 train steps, 2 validations
    assert [float(r["loss"]) for r in rows if r["split"] == "train"] == [r["loss"] for r in records
                                                                         if r["split"] == "train"]
    assert [float(r["ssim"]) for r in rows if r["split"] == "val"] == [r["ssim"] for r in records
                                                                       if r["split"] == "val"]
    pytest.importorskip("matplotlib")  # the picture itself: only where the optional extra is installed
    ev.main(["--curves", str(trained / "log.jsonl"), "--out", str(tmp_path / "c")])
    assert Image.open(tmp_path / "c" / "curves.png").size[0] > 100


def test_curves_leave_out_a_last_line_cut_short_and_refuse_a_line_that_is_no_record(trained, tmp_path, capsys):
    text = open(trained / "log.jsonl").read()
    (tmp_path / "cut.jsonl").write_text(text + '{"step": 99, "spl')  # a run killed mid-write
    ev.main(["--curves", str(tmp_path / "cut.jsonl"), "--out", str(tmp_path / "c")])
    assert "line 9, the last, is cut short: left out" in capsys.readouterr().out
    assert len(read_csv(tmp_path / "c" / "curves.csv")) == 8
    for bad in ('{"step": 99, "spl\n' + text, "[1, 2]\n"):  # cut short mid-file; valid JSON, not a record
        (tmp_path / "bad.jsonl").write_text(bad)
        with pytest.raises(SystemExit, match="bad.jsonl, line 1: not a train.py log record"):
            ev.main(["--curves", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "c")])


# -- data.py: the files users have ------------------------------------------------------------------------------------

def test_conversions_are_said_once_per_kind_and_16_bit_is_scaled(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "conversions_said", set())
    Image.fromarray(np.array([[0, 32896, 65535]], np.uint16)).save(tmp_path / "deep.png")  # 16-bit grayscale
    assert np.asarray(data.load_image(tmp_path / "deep.png", "L")).tolist() == [[0, 128, 255]]
    photo(0, (8, 8)).convert("P").save(tmp_path / "palette.png")
    photo(0, (8, 8)).convert("RGBA").save(tmp_path / "alpha.png")
    photo(0, (8, 8)).convert("CMYK").save(tmp_path / "print.jpg")
    for name in ("palette.png", "palette.png", "alpha.png", "print.jpg"):
        assert data.load_image(tmp_path / name).mode == "RGB"
    err = capsys.readouterr().err
    assert err.count("note:") == 4 and err.count("palette.png") == 1  # the second palette image said nothing
    for kind in ("16-bit", "palette", "alpha channel is dropped", "CMYK"):
        assert kind in err
    photo(0, (8, 8)).save(tmp_path / "colour.png")
    assert data.load_image(tmp_path / "colour.png", "L").mode == "L"
    assert "made gray" in capsys.readouterr().err


def test_channels_are_honoured_and_checked(tmp_path):
    gray = data.get_dataset("shapes", "train", image_size=16, channels=1)[0]
    rgb = data.get_dataset("shapes", "train", image_size=16)[0]
    assert gray.shape == (1, 16, 16) and rgb.shape == (3, 16, 16)
    # ITU-R 601 luma, as PIL computes it, on the [0, 255] scale
    luma = ((rgb + 1) * 127.5 * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0)
    assert ((gray[0] + 1) * 127.5 - luma).abs().max() <= 1
    with pytest.raises(data.DataError, match="channels must be 1"):
        data.get_dataset("shapes", "train", channels=2)


def test_unreadable_files_give_none_when_skipping_and_the_collate_leaves_them_out(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    for i in range(3):
        photo(i, (16, 16)).save(tmp_path / "train" / f"{i}.png")
    (tmp_path / "train" / "1.png").write_text("broken")
    ds = data.get_dataset("folder", "train", tmp_path, image_size=16, skip_unreadable=True)
    items = [ds[i] for i in range(3)]
    assert items[1] is None and "1.png: cannot read image" in capsys.readouterr().err
    assert data.collate_readable(items).shape == (2, 3, 16, 16)
    assert data.collate_readable([None, None]).shape == (0,)
    with pytest.raises(data.DataError, match="1.png"):
        data.get_dataset("folder", "train", tmp_path, image_size=16)[1]  # raising is the default
