"""bench.py's measuring pieces on tiny sizes: they run the code they claim to time (no timing is asserted)."""

import sys
import time

import pytest
import torch

import bench
import vqvae2


def test_quantizer_replay_runs_each_outermost_quantizer_on_the_inputs_of_a_step():
    torch.manual_seed(0)
    model = vqvae2.Model(vqvae2.Config(image_size=32, hidden=16, res_hidden=8, res_blocks=1, codebook_size=16))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    seen = []
    for q in (model.quant_t, model.quant_b):
        q.register_forward_pre_hook(lambda q, args: seen.append((q, args[0].detach().clone())))

    replay = bench.quantizer_replay(model, lambda: model(x)[1].backward(), torch.autocast("cpu", enabled=False))
    step_inputs = list(seen)
    seen.clear()
    replay()
    assert [q for q, _ in seen] == [model.quant_t, model.quant_b]  # both levels, once each, nothing else
    for (_, a), (_, b) in zip(seen, step_inputs):
        assert torch.equal(a, b)  # on the very vectors the training step quantized


def test_ours_and_measure_time_a_training_forward_and_backward():
    vq, z, call = bench.ours(256, 16, 4, torch.device("cpu"), init="data")
    seconds, peak = bench.measure(call, torch.device("cpu"), repeat=2)
    assert seconds > 0 and peak >= 0
    assert bool(vq.initialized) and z.grad is None  # the untimed first call initialised the codebook


def test_timed_in_turn_alternates_the_calls_and_sums_each_ones_time():
    order = []

    def call(name, pause):
        return lambda: (order.append(name), time.sleep(pause))
    seconds = bench.timed_in_turn([call("step", 0.004), call("part", 0.002)], 3, torch.device("cpu"))
    assert order == ["step", "part"] * 3  # in turn, so that a drifting machine slows both alike
    assert seconds[0] >= 3 * 0.004 and seconds[1] >= 3 * 0.002  # each call's own time, summed


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "--repeat, --steps and --batches must be at least 1"),
    (["--quantizer", "8,a,2"], "--quantizer takes N,K,D and --loading W,W,...: integers"),
    (["--loading", "0,x"], "--quantizer takes N,K,D and --loading W,W,...: integers"),
    (["--quantizer", "8,2"], "--quantizer takes N,K,D, each at least 1"),
])
def test_bad_arguments_are_refused_before_any_work(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
    with pytest.raises(SystemExit):
        bench.main()
    assert message in capsys.readouterr().err


def test_bench_loading_reads_batches_through_train_pys_loader(capsys):
    bench.bench_loading(["--batch_size", "4", "--image_size", "16"], batches=2, workers=[0])
    assert "load shapes (3x16x16), batch 4, 0 workers:" in capsys.readouterr().out


def test_gpu_check_runs_every_setting_and_prints_one_table(capsys):
    # on a CPU, at a tiny size: the code path a CUDA machine runs (there with the celeba preset, fp16 and compile too;
    # its torchrun part is train.py under torchrun, which tests/test_train.py runs)
    tiny = ["--image_size", "16", "--hidden", "8", "--res_hidden", "4", "--res_blocks", "1", "--codebook_size", "8",
            "--batch_size", "2", "--num_workers", "0"]
    rows, launched = bench.gpu_check(1, torch.device("cpu"), dataset="shapes", models=["vqvae"],
                                     dtypes=["float32", "bfloat16"], compiles=[False], extra=tiny, launch=False)
    assert [r[:3] for r in rows] == [["vqvae", "float32", "no"], ["vqvae", "bfloat16", "no"]]
    assert all(float(r[3]) > 0 and r[4].endswith("%") for r in rows) and launched == []
    assert "| model | dtype | compiled | images/s | quantizer share | sync check |" in capsys.readouterr().out
