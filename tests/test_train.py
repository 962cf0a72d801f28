"""train.py: configuration, the model protocol, checkpoints, signals, non-finite losses, AMP and torchrun."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import eval as evaluation
import train
import train_utils
import vqvae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--hidden", "16", "--res_hidden", "8", "--res_blocks", "1", "--codebook_size", "16", "--batch_size", "8",
        "--eval_batches", "1", "--eval_interval", "1000", "--ckpt_interval", "1000"]


def read_log(out_dir, split="train"):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


# -- configuration ----------------------------------------------------------------------------------------------------

def test_both_argument_forms_bare_flags_and_types():
    tcfg, mcfg, module, _ = train.resolve_config(["--lr=0.01", "--max_iters", "5", "--compile", "--ema", "false",
                                                  "--codebook-size", "64", "--beta", "-0.5"])
    assert module is vqvae
    assert tcfg.lr == 0.01 and tcfg.max_iters == 5 and tcfg.compile is True
    assert mcfg.ema is False and mcfg.codebook_size == 64 and mcfg.beta == -0.5
    assert tcfg.out_dir == os.path.join("out", "vqvae_shapes")


@pytest.mark.parametrize("argv, message", [
    (["--codebok_size", "64"], "unknown setting --codebok_size (did you mean --codebook_size?)"),
    (["--lr", "fast"], "--lr expects float, got 'fast'"),
    (["--max_iters", "1.5"], "--max_iters expects int"),
    (["--ema", "maybe"], "--ema expects true or false"),
    (["--lr"], "--lr needs a value"),
    (["lr", "1"], "expected --key value"),
    (["--model", "nosuchmodel"], "unknown --model 'nosuchmodel'"),
    (["--dataset", "nosuchdata"], "unknown --dataset 'nosuchdata'"),
    (["--dtype", "float8"], "--dtype must be"),
])
def test_bad_command_lines_are_refused_clearly(argv, message):
    with pytest.raises(SystemExit) as err:
        train.resolve_config(argv)
    assert message in str(err.value)


def test_dataset_fills_image_settings_and_presets_sit_below_the_command_line():
    tcfg, mcfg, _, _ = train.resolve_config(["--dataset", "mnist"])
    assert (mcfg.in_channels, mcfg.image_size) == (1, 28)  # from data.DATASETS
    preset = vqvae.PRESETS["mnist"]
    assert mcfg.codebook_size == preset["codebook_size"] and tcfg.batch_size == preset["batch_size"]
    tcfg, mcfg, _, _ = train.resolve_config(["--dataset", "mnist", "--codebook_size", "99", "--batch_size", "3"])
    assert mcfg.codebook_size == 99 and tcfg.batch_size == 3


def test_optional_types_and_bounds():
    from typing import Optional
    assert train_utils.convert("k", "none", Optional[int]) is None and train_utils.convert("k", "5", int | None) == 5
    for argv, message in [(["--eval_batches", "0"], "--eval_batches must be at least 1"),
                          (["--lr", "inf"], "--lr must be positive and finite"),
                          (["--lr", "1e300"], "--lr must be positive and finite"),
                          (["--min_lr_ratio", "-5"], "--min_lr_ratio must be between 0 and 1"),
                          (["--min_lr_ratio", "nan"], "--min_lr_ratio must be between 0 and 1"),
                          (["--beta1", "2"], "--beta1 and --beta2 must be in"),
                          (["--beta2", "nan"], "--beta1 and --beta2 must be in"),
                          (["--weight_decay", "-1"], "--weight_decay must be at least 0"),
                          (["--grad_clip", "nan"], "--grad_clip must be at least 0"),
                          (["--num_workers", "-1"], "--num_workers must be at least 0"),
                          (["--lr_decay_iters", "0"], "--lr_decay_iters >= 1"),
                          (["--download"], "--download needs --data_dir")]:
        with pytest.raises(SystemExit, match=message):
            train.resolve_config(argv)


def test_compile_trains_on_cpu(tmp_path):
    # --compile through torch.compile's inductor: training steps, validation and a checkpoint. In a process of its
    # own: inductor leaves settings in os.environ that later subprocesses of this one (torchrun's tests) would inherit
    out = str(tmp_path / "run")
    # 4 images (256 vectors) and 256 codes: shapes at which torch 2.13's inductor failed on the blocked argmin
    result = subprocess.run([sys.executable, "train.py", *TINY, "--batch_size", "4", "--codebook_size", "256",
                             "--compile", "--max_iters", "2", "--eval_interval", "2", "--out_dir", out],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2: val psnr" in result.stdout + result.stderr
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 2


def test_a_setting_the_model_refuses_is_reported_without_a_traceback(tmp_path):
    with pytest.raises(SystemExit, match="train.py: vqvae: downsample must be a power of 2"):
        train.main(["--downsample", "3", "--out_dir", str(tmp_path)])


@pytest.mark.parametrize("model,flag", [("vqvae", "decay"), ("vqvae2", "decay"), ("mgvq", "decay"),
                                        ("pqvae", "decay"), ("adaptive_vq", "decay"), ("warmup_vqgan", "usage_decay")])
@pytest.mark.parametrize("value", ["1.5", "-1"])
def test_an_ema_decay_outside_0_1_is_refused_in_one_line(tmp_path, model, flag, value):
    with pytest.raises(SystemExit, match=rf"train.py: {model}: {flag} must be in \[0, 1\], got {value}"):
        train.main(["--model", model, f"--{flag}", value, "--out_dir", str(tmp_path)])


def test_lr_schedules():
    cfg = train.TrainConfig(lr=1.0, max_iters=110, warmup_iters=10, min_lr_ratio=0.1)
    assert train.lr_at(0, cfg) == pytest.approx(0.1) and train.lr_at(9, cfg) == pytest.approx(1.0)
    assert train.lr_at(10, cfg) == pytest.approx(1.0)
    assert train.lr_at(60, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert train.lr_at(110, cfg) == pytest.approx(0.1)
    exp = train.TrainConfig(lr=1e-3, lr_schedule="exp", lr_decay_iters=25000)
    assert train.lr_at(25000, exp) == pytest.approx(1e-3 * math.exp(-1))
    assert train.lr_at(123, train.TrainConfig(lr=0.5, lr_schedule="constant")) == 0.5


# -- the model protocol: set_step and an aux part with its own optimizer -------------------------------------------

TOY_MODEL = '''
from dataclasses import dataclass
import torch
import torch.nn as nn

@dataclass
class Config:
    image_size: int = 32
    in_channels: int = 3
    target: float = 3.0

class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.scale = nn.Parameter(torch.tensor(0.2))
        self.critic = nn.Linear(1, 1, bias=False)  # the aux part
        self.register_buffer("last_step", torch.tensor(-1))
        self.steps = []

    def forward(self, x):
        x_hat = self.scale * x
        recon = ((x_hat - x) ** 2).mean()
        # the main loss reaches the critic's weight too, as a GAN's generator loss reaches its discriminator; were
        # the critic in the main optimizer, or its gradient left over for the aux step, this term would drag its
        # weight away from the aux loss's target
        loss = recon + 10 * self.critic(x_hat.detach().mean().reshape(1, 1)).sum()
        return x_hat, loss, {"recon": recon.detach()}

    def set_step(self, step):
        self.steps.append(step)
        self.last_step.fill_(step)

    def aux_module(self):
        return self.critic

    def aux_loss(self, x, x_hat):
        w = self.critic.weight.squeeze()
        return (w - self.cfg.target) ** 2, {"w": w.detach()}

    def latents(self, x):
        z = x.flatten(1)[:, :2]
        return {"id": (torch.eye(2), z, torch.zeros(len(z), dtype=torch.long))}
'''


def test_set_step_and_aux_optimizer_protocol(tmp_path, monkeypatch):
    (tmp_path / "toy_aux.py").write_text(TOY_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = str(tmp_path / "run")
    args = ["--model", "toy_aux", "--lr", "0.05", "--lr_schedule", "constant", "--grad_clip", "0", "--batch_size", "4",
            "--eval_batches", "1", "--out_dir", out, "--log_interval", "10"]
    stats = train.main(args + ["--max_iters", "150"])
    assert stats["aux_w"] == pytest.approx(3.0, abs=0.02)  # the aux optimizer minimised the aux loss alone
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["model"]["scale"] == pytest.approx(1.0, abs=0.05)  # the main optimizer trained the main part
    assert len(ckpt["optimizers"]) == 2 and int(ckpt["model"]["last_step"]) == 149
    train.main(["--out_dir", out, "--resume", "--max_iters", "153"])  # the model and settings come from the run
    assert [r["step"] for r in read_log(out)][-2:] == [150, 153]
    assert int(torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"]["last_step"]) == 152


# -- checkpoints, signals, non-finite losses ---------------------------------------------------------------------------

def start(args, out_dir):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--out_dir", out_dir, *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_steps(out_dir, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if len(read_log(out_dir)) >= n:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"fewer than {n} steps logged in {timeout} s")


def test_sigterm_saves_and_resume_continues_from_the_saved_step(tmp_path):
    out = str(tmp_path / "run")
    proc = start(["--max_iters", "100000", "--log_interval", "1"], out)
    wait_for_steps(out, 5, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output  # saved, and preempted: not done
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    step = saved["step"]
    assert step == read_log(out)[-1]["step"] >= 5 and "stopped by signal" in output

    # the run's settings (the tiny model among them) come back from the checkpoint, not from the command line
    resumed = subprocess.run([sys.executable, "train.py", "--out_dir", out, "--resume", "--max_iters", str(step + 3)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"from step {step}" in resumed.stdout
    steps = [r["step"] for r in read_log(out)]
    assert steps[-3:] == [step + 1, step + 2, step + 3] and steps.count(step + 1) == 1  # log_interval 1, restored
    final = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert final["step"] == step + 3


def test_a_resumed_run_equals_a_straight_run(assert_resume_equals_straight):
    # batch 8 of 20,000 shapes: mid-epoch, so the resumed run must continue the epoch's order, not restart it
    assert_resume_equals_straight([*TINY, "--log_interval", "1", "--init", "data", "--dead_code_window", "2",
                                   "--grad_accum", "2"])


def test_validating_does_not_change_the_training_run(tmp_path):
    runs = []
    for eval_interval in ("2", "1000"):
        out = str(tmp_path / eval_interval)
        # dead-code resets, which draw random vectors, at every step: a stray draw in validation would show
        train.main([*TINY, "--init", "data", "--dead_code_window", "1", "--dead_code_threshold", "40",
                    "--out_dir", out, "--max_iters", "5", "--eval_interval", eval_interval])
        runs.append(torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_sigkill_while_training_leaves_a_checkpoint_that_loads(tmp_path):
    out = str(tmp_path / "run")
    proc = start(["--max_iters", "100000", "--log_interval", "1", "--ckpt_interval", "1"], out)
    wait_for_steps(out, 20, proc)  # a checkpoint is being written at every step
    # the kill lands mid-save only sometimes; test_a_crash_while_saving_keeps_the_previous_checkpoint covers that case
    # deterministically, this one that a run killed at a random moment leaves a loadable checkpoint
    proc.kill()
    proc.communicate(timeout=60)
    import eval as ev
    model, ckpt = ev.load_model(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] >= 19 and isinstance(model, vqvae.Model)


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    train_utils.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)

    def crashing_save(obj, f):  # writes half a checkpoint, then the process "dies"
        f.write(b"\x80\x02partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        train_utils.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1


def test_a_new_run_does_not_overwrite_an_existing_one(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main([*TINY, "--out_dir", out, "--max_iters", "3"])
    with pytest.raises(SystemExit, match="ckpt.pt exists: pass --resume"):
        train.main([*TINY, "--out_dir", out, "--max_iters", "1"])
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 3
    train.main(["--out_dir", out, "--resume", "--max_iters", "2"])  # nothing left to train: said, nothing changed
    assert "the checkpoint is at step 3, at or past --max_iters 2: nothing to train" in capsys.readouterr().out
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 3
    train.main([*TINY, "--out_dir", out, "--max_iters", "1", "--overwrite"])
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 1
    assert [r["step"] for r in read_log(out)] == [1]  # a fresh log for a fresh run


def test_the_checkpoint_is_written_before_validation(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("validation failed")

    monkeypatch.setattr(train.evaluation, "evaluate", broken)
    out = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="validation failed"):
        train.main([*TINY, "--out_dir", out, "--max_iters", "10", "--eval_interval", "4", "--ckpt_interval", "4"])
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 4


def image_folder(folder, n, bad=(), size=32, mode="RGB"):
    """n small PNGs img0..img{n-1} in folder, those numbered in `bad` cut short (unreadable)."""
    from PIL import Image
    folder.mkdir(parents=True)
    for i in range(n):
        colour = (30 * i, 100, 200) if mode == "RGB" else 25 * i
        Image.new(mode, (size, size), colour).save(folder / f"img{i}.png")
        if i in bad:
            (folder / f"img{i}.png").write_bytes((folder / f"img{i}.png").read_bytes()[:60])
    return str(folder)


def test_a_corrupt_image_mid_run_is_named_skipped_and_counted_while_training_goes_on(tmp_path, capfd):
    # no split folders: every 20th image (img0) is held out for val, the other 7 train, one of them cut short. No
    # loader workers: a worker reads batches ahead, naming a file before the step that counts it
    folder = image_folder(tmp_path / "images", 8, bad={5})
    out = str(tmp_path / "run")
    train.main([*TINY, "--dataset", "folder", "--data_dir", folder, "--image_size", "32", "--batch_size", "3",
                "--out_dir", out, "--max_iters", "12", "--log_interval", "1", "--num_workers", "0"])
    named = capfd.readouterr().err.count("img5.png: cannot read image")
    log = read_log(out)
    assert log[-1]["step"] == 12 and named >= 1
    assert log[-1]["skipped_images"] == named  # each skip named once and counted once
    assert all(math.isfinite(r["loss"]) for r in log)


def test_a_batch_mostly_unreadable_stops_the_run_and_keeps_the_work(tmp_path):
    folder = image_folder(tmp_path / "images", 8, bad={2, 3, 4, 5, 6})
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit, match="of the 3 images of one batch are unreadable") as err:
        train.main([*TINY, "--dataset", "folder", "--data_dir", folder, "--image_size", "32", "--batch_size", "3",
                    "--out_dir", out, "--max_iters", "50"])
    assert "checkpoint of step" in str(err.value)
    assert os.path.exists(os.path.join(out, "ckpt.pt"))


def test_a_broken_batch_on_one_rank_stops_every_rank_together_and_keeps_the_work(tmp_path):
    # 24 images img00..img23; every 20th in sorted order (img00, img20) is held out, the other 22 train. Rank 1's
    # first batch of 3 is drawn as train.py's sampler draws it; two of its images are cut short, rank 0's are fine.
    names = [f"img{i:02d}.png" for i in range(24) if i % 20]
    rank1 = list(torch.utils.data.DistributedSampler(names, 2, 1, shuffle=True, seed=0, drop_last=True))[:3]
    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image
    for i in range(24):
        Image.new("RGB", (32, 32), (10 * i, 100, 200)).save(folder / f"img{i:02d}.png")
    for index in rank1[:2]:
        (folder / names[index]).write_bytes((folder / names[index]).read_bytes()[:60])
    out = str(tmp_path / "run")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *TINY, "--dataset", "folder", "--data_dir", str(folder), "--image_size", "32",
                             "--batch_size", "3", "--seed", "0", "--out_dir", out, "--max_iters", "50"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    said = result.stdout + result.stderr
    assert result.returncode != 0 and "a batch on another rank was mostly unreadable" in said, said[-3000:]
    assert "checkpoint of step 1" in said
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 1  # both ranks stopped at step 1


def test_a_folder_with_train_and_test_but_no_val_validates_on_test(tmp_path, capsys):
    image_folder(tmp_path / "data" / "train", 6)
    image_folder(tmp_path / "data" / "test", 3)
    out = str(tmp_path / "run")
    train.main([*TINY, "--dataset", "folder", "--data_dir", str(tmp_path / "data"), "--image_size", "32",
                "--batch_size", "3", "--out_dir", out, "--max_iters", "2", "--eval_interval", "2"])
    assert "has no val/: validating on" in capsys.readouterr().out
    val = read_log(out, "val")
    assert len(val) == 1 and val[0]["images"] == 3 and 0 < val[0]["ssim"] <= 1


def test_a_grayscale_folder_trains_and_evaluates_with_one_channel(tmp_path):
    import eval as ev
    folder = image_folder(tmp_path / "gray", 21, mode="L")
    out = str(tmp_path / "run")
    train.main([*TINY, "--dataset", "folder", "--data_dir", folder, "--image_size", "32", "--in_channels", "1",
                "--out_dir", out, "--max_iters", "2"])
    metrics = ev.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--split", "val"])
    assert metrics["images"] == 2 and math.isfinite(metrics["psnr"])
    recon = ev.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--images", folder, "--out", str(tmp_path / "r")])
    assert recon["images"] == 21
    from PIL import Image
    assert Image.open(tmp_path / "r" / "img3.png").mode == "L"


def test_resume_refuses_a_different_architecture(tmp_path):
    out = str(tmp_path / "run")
    train.main([*TINY, "--out_dir", out, "--max_iters", "2"])
    with pytest.raises(SystemExit, match="--codebook_size 32 differs from the checkpoint's 16"):
        train.main([*TINY, "--out_dir", out, "--max_iters", "4", "--resume", "--codebook_size", "32"])
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.main([*TINY, "--out_dir", str(tmp_path / "empty"), "--resume"])


@pytest.mark.parametrize("poison, poisoned_at, log_interval, caught_at", [
    ("loss", 8, 1, 8),  # caught at the next log step
    ("loss", 8, 100, 10),  # or at the next checkpoint, which it must not overwrite
    ("gradient", 10, 1, 10),  # a finite loss with an infinite gradient, at a checkpoint step: the weights are NaN
    ("gradient", 10, 100, 10),  # now, so that checkpoint must not be written
])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, poison, poisoned_at,
                                                                  log_interval, caught_at):
    forward, calls = vqvae.Model.forward, []

    def poisoned(self, x):
        x_hat, loss, stats = forward(self, x)
        calls.append(1)
        if len(calls) == poisoned_at and poison == "loss":
            loss = loss * float("nan")
        if len(calls) == poisoned_at and poison == "gradient":
            x_hat.register_hook(lambda g: g * float("inf"))
        return x_hat, loss, stats

    monkeypatch.setattr(vqvae.Model, "forward", poisoned)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit, match=f"step {caught_at}: the loss or its gradient is not finite.*last good checkpoint"):
        train.main([*TINY, "--out_dir", out, "--max_iters", "50", "--ckpt_interval", "5",
                    "--log_interval", str(log_interval)])
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# -- mixed precision, accumulation and torchrun -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_amp_runs_with_a_scaler_for_float16_only(tmp_path, dtype, capsys):
    out = str(tmp_path / dtype)
    train.main([*TINY, "--out_dir", out, "--max_iters", "8", "--dtype", dtype, "--grad_accum", "2",
                "--log_interval", "2"])
    # float16 on a CPU is slow (no fast float16 kernels): the run says so
    assert ("--dtype float16 on a CPU is many times slower" in capsys.readouterr().out) == (dtype == "float16")
    assert all(math.isfinite(r["loss"]) for r in read_log(out))
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["model"]["quantizer.codebook"].dtype == torch.float32  # the fp32 island keeps its buffers fp32
    scaler = ckpt["scalers"][0]
    if dtype == "float16":  # the scaler was on and its scale is saved for the resume
        assert math.isfinite(scaler["scale"]) and scaler["scale"] > 0
    else:
        assert scaler == {}  # bfloat16 has float32's range: no scaling


NAN_ON_RANK_1 = '''
import os
from vqvae import Config, Model as Base

class Model(Base):  # rank 1 alone gets a NaN loss at its 5th forward
    calls = 0

    def forward(self, x):
        x_hat, loss, stats = super().forward(x)
        Model.calls += 1
        if os.environ.get("RANK") == "1" and Model.calls == 5:  # on a log step: rank 0 has not seen it yet
            loss = loss * float("nan")
        return x_hat, loss, stats
'''


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    (tmp_path / "nan_rank1.py").write_text(NAN_ON_RANK_1)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", "--model", "nan_rank1", *TINY, "--out_dir", str(tmp_path / "ddp"),
                             "--max_iters", "50", "--log_interval", "5"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{tmp_path}:{ROOT}"})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    # rank 0, whose own loss stays finite, stops at rank 1's step: the flag reached it. Rank 0 alone says so, and
    # neither rank dies in a collective its peer has left
    assert output.count("step 5: the loss or its gradient is not finite") == 1, output[-3000:]
    assert "Connection closed by peer" not in output


def test_torchrun_two_ranks_on_cpu(tmp_path):
    out = str(tmp_path / "ddp")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *TINY, "--out_dir", out, "--max_iters", "12", "--log_interval", "4",
                             "--grad_accum", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [r["step"] for r in read_log(out)] == [4, 8, 12]  # one writer: rank 0
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 12


# -- faults and bad input: one clear line, nothing lost ---------------------------------------------------------------

@pytest.mark.parametrize("device, gpus, message", [
    ("cuda", 0, "--device cuda: no CUDA GPU here"),
    ("cuda:1", 1, "--device cuda:1: there is 1 CUDA GPU"),
    ("tpu9", 0, "--device tpu9 is not a device"),
])
def test_an_unusable_device_is_refused_in_one_line(monkeypatch, device, gpus, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(SystemExit, match=message):
        evaluation.checked_device(device, "train.py")
    with pytest.raises(SystemExit, match=message):
        train.main([*TINY, "--device", device, "--out_dir", "unused", "--max_iters", "1"])
    with pytest.raises(SystemExit, match=message.replace("train.py", "eval.py")):
        evaluation.main(["--ckpt", "unused.pt", "--device", device])


def test_a_checkpoint_of_another_version_of_the_model_file_is_refused_with_the_reason(tmp_path):
    out = str(tmp_path / "run")
    train.main([*TINY, "--out_dir", out, "--max_iters", "1"])
    path = os.path.join(out, "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    resume = ["--out_dir", out, "--resume", "--max_iters", "2"]
    # settings this vqvae.py does not have (as a checkpoint from before MGVQ had its own file holds)
    torch.save(dict(ckpt, model_config={**ckpt["model_config"], "groups": 1, "groups_to_use": 0}), path)
    for call in (lambda: evaluation.load_model(path), lambda: train.main(resume)):
        with pytest.raises(SystemExit, match="another version of vqvae.py: its settings groups, groups_to_use are not"):
            call()
    # weights under names this vqvae.py does not use
    renamed = {k.replace("pre_quant.", "quant_conv."): v for k, v in ckpt["model"].items()}
    torch.save(dict(ckpt, model=renamed), path)
    for call in (lambda: evaluation.load_model(path), lambda: train.main(resume)):
        with pytest.raises(SystemExit, match=r"of vqvae.py: Missing key\(s\) in state_dict: \"pre_quant"):
            call()


def test_eval_refuses_a_missing_output_folder_before_evaluating(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    train.main([*TINY, "--out_dir", out, "--max_iters", "1"])

    def no_work(*args, **kwargs):
        raise AssertionError("evaluated before the output paths were checked")
    monkeypatch.setattr(evaluation, "evaluate", no_work)
    with pytest.raises(SystemExit, match="--grid: the folder .*missing/dir does not exist"):
        evaluation.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--grid", str(tmp_path / "missing/dir/g.png")])
    with pytest.raises(SystemExit, match=f"--json {out} is a folder; give a file name"):
        evaluation.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--json", out])
    with pytest.raises(SystemExit, match="--out .*ckpt.pt is a file; give a folder"):
        evaluation.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--images", out, "--out", os.path.join(out, "ckpt.pt")])
    with pytest.raises(SystemExit):
        evaluation.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--max_batches", "0"])
    assert "--batch_size and --max_batches must be at least 1" in capsys.readouterr().err


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    train_utils.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    for error in (OSError(28, "No space left on device"), RuntimeError("PytorchStreamWriter failed writing file")):
        def full_disk(obj, f):  # writes part of the checkpoint, then the disk is full
            f.write(b"\x80\x02partial")
            raise error
        monkeypatch.setattr(torch, "save", full_disk)
        with pytest.raises(SystemExit, match=r"cannot write .*ckpt.pt.*the previous checkpoint .*ckpt.pt is kept"):
            train_utils.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
        monkeypatch.undo()
        assert not os.path.exists(path + ".tmp")
        assert torch.load(path, weights_only=True)["step"] == 1


def test_a_full_disk_while_validating_stops_with_a_message_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = Image.Image.save

    def full_disk(image, path, *args, **kwargs):  # the picture's write starts, then the disk is full
        real_save(image, path, *args, **kwargs)
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(SystemExit, match=r"^train.py: .*recon_000002.png.tmp.png: No space left on device; stopping "
                                         r"\(the last good checkpoint .*ckpt.pt is kept\)$"):
        train.main([*TINY, "--out_dir", str(out), "--max_iters", "2", "--eval_interval", "2"])
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2  # written before validating
    assert not list(out.glob("*.png"))  # no half-written picture left


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the output folder was checked")
    monkeypatch.setattr(train, "make_loaders", no_work)
    with pytest.raises(SystemExit, match="cannot write to --out_dir .*file/run"):
        train.main([*TINY, "--out_dir", str(blocker / "run"), "--max_iters", "1"])


def test_resume_refuses_another_dataset(tmp_path):
    out = str(tmp_path / "run")
    train.main([*TINY, "--out_dir", out, "--max_iters", "2"])
    with pytest.raises(SystemExit, match="--resume: --dataset mnist differs from the checkpoint's shapes"):
        train.main(["--out_dir", out, "--resume", "--dataset", "mnist"])


def test_non_finite_weights_in_a_checkpoint_are_refused_naming_the_tensors(tmp_path):
    out = str(tmp_path / "run")
    train.main([*TINY, "--out_dir", out, "--max_iters", "2"])
    path = os.path.join(out, "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["post_quant.weight"][0] = math.nan
    torch.save(ckpt, path)
    with pytest.raises(SystemExit, match=r"ckpt.pt holds non-finite values in post_quant.weight"):
        train.main(["--out_dir", out, "--resume", "--max_iters", "4"])
    with pytest.raises(SystemExit, match=r"ckpt.pt holds non-finite values in"):
        evaluation.main(["--ckpt", path, "--max_batches", "1"])


def test_after_a_resume_the_log_holds_each_step_once_in_order(tmp_path):
    out = str(tmp_path / "run")
    train.main([*TINY, "--out_dir", out, "--max_iters", "4", "--log_interval", "1"])
    with open(os.path.join(out, "log.jsonl"), "a") as f:  # steps a killed run logged after its last checkpoint
        for step in (5, 6):
            f.write(json.dumps({"step": step, "split": "train", "loss": 1.0}) + "\n")
    train.main(["--out_dir", out, "--resume", "--max_iters", "7"])
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4, 5, 6, 7]
    assert all(r["loss"] != 1.0 for r in read_log(out))


@pytest.mark.parametrize("model, setting", [("vqvae", "codebook_size"), ("vqvae", "code_dim"), ("vqvae2", "hidden"),
                                            ("pqvae", "steps"), ("adaptive_vq", "heads"),
                                            ("warmup_vqgan", "codebook_size")])
def test_a_zero_size_is_refused_in_one_line(tmp_path, model, setting):
    with pytest.raises(SystemExit, match=f"train.py: {model}: these sizes must be at least 1: {setting} 0"):
        train.main(["--model", model, f"--{setting}", "0", "--out_dir", str(tmp_path), "--max_iters", "1"])


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_other_pid(tmp_path):
    out = str(tmp_path / "run")
    proc = start(["--max_iters", "100000", "--log_interval", "1"], out)
    try:
        wait_for_steps(out, 2, proc)
        for argv in ([], ["--overwrite"]):  # a new run (no checkpoint yet), and one that would replace it
            with pytest.raises(SystemExit, match=f"is in use by the run of pid {proc.pid} on"):
                train.main([*TINY, "--out_dir", out, "--max_iters", "3", *argv])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert not os.path.exists(os.path.join(out, "lock"))  # released by the stopped run
    train.main(["--out_dir", out, "--resume", "--max_iters", str(read_log(out)[-1]["step"] + 1)])


def test_a_stale_lock_from_a_killed_run_does_not_block(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "lock").write_text(f"{socket.gethostname()} {int(gone.stdout)}")
    train.main([*TINY, "--out_dir", str(out), "--max_iters", "2"])
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
    assert not (out / "lock").exists()


def test_a_garbled_lock_is_taken_as_stale(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "lock").write_text(f"{socket.gethostname()} notapid")
    train.main([*TINY, "--out_dir", str(out), "--max_iters", "1"])
    assert not (out / "lock").exists()


@pytest.mark.parametrize("content,message", [
    (b"", "cannot read checkpoint"),  # empty
    (b"garbage", "cannot read checkpoint"),
    ({"a": 1}, "is not a checkpoint written by train.py"),
    ([1, 2], "is not a checkpoint written by train.py"),
])
def test_a_checkpoint_that_is_not_train_pys_is_refused_in_one_line(tmp_path, content, message):
    path = tmp_path / "ckpt.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    for program, call in [("eval.py", lambda: evaluation.main(["--ckpt", str(path)])),
                          ("train.py: --resume", lambda: train.main(["--out_dir", str(tmp_path), "--resume"]))]:
        with pytest.raises(SystemExit, match=f"^{program}: ") as refused:
            call()
        assert "\n" not in str(refused.value) and message in str(refused.value)


def test_a_refusal_under_torchrun_is_printed_once(tmp_path):
    out = str(tmp_path / "run")
    train.main([*TINY, "--out_dir", out, "--max_iters", "1"])
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *TINY, "--out_dir", out, "--max_iters", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert (result.stdout + result.stderr).count("ckpt.pt exists: pass --resume") == 1, result.stderr[-3000:]


def test_cpu_threads_leave_one_core_free_unless_told(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for cores, expected in ((1, 1), (2, 1), (16, 15)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
        assert train_utils.cpu_threads(train.TrainConfig()) == expected
    assert train_utils.cpu_threads(train.TrainConfig(threads=3)) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert train_utils.cpu_threads(train.TrainConfig()) == torch.get_num_threads()  # the environment's choice stands
