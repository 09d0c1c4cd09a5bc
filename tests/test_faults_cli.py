"""Fault injection, command line (issue #14): a bad `gkcore pretrain` value ends in one `error:` line
naming the flag or file and exit status 2, before any data is read or model built."""
import pytest

from gkcore.cli import main

BASE = ["pretrain", "--preset", "gk_mvlp_tiny", "--data", "synth:/nonexistent", "--no-progress"]


@pytest.mark.parametrize("flags,names", [
    (["--steps", "0"], "--steps must be an int >= 1, got 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--warmup", "-5"], "--warmup must be an int >= 0"),
    (["--grad-accum", "0"], "--grad-accum must be an int >= 1"),
    (["--alpha", "2"], "--alpha must be None or a number in"),
    (["--clip", "nan"], "--clip must be a finite number"),
    (["--ckpt-every", "-1"], "--ckpt-every must be an int >= 0"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    (["--batch-size", "0"], "--batch-size must be an int >= 1, got 0"),
    (["--num-threads", "-1"], "--num-threads must be >= 0"),
    (["--resume", "/nope.pt"], "--resume /nope.pt: checkpoint not found"),
])
def test_pretrain_misuse_is_one_error_line_and_exit_2(tmp_path, capsys, flags, names):
    rc = main(BASE + ["--out", str(tmp_path / "run")] + flags)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_invalid_config_file_is_named(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text("{not json")
    rc = main(["pretrain", "--config", str(cfg), "--data", "synth:/x", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: --config {cfg}:"), err


def test_out_that_is_a_file_is_named(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    for out in (f, f / "sub"):
        rc = main(BASE + ["--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"error: --out: output folder {out} is not writable"), err
    assert f.read_text() == "x"


def test_eval_refuses_an_empty_or_truncated_safetensors_naming_it(tmp_path, capsys):
    from gkcore import create_model
    from test_model_gk_mvlp import MICRO

    good = tmp_path / "model.safetensors"
    create_model("gk_mvlp_tiny", **MICRO).save(str(good))
    data = good.read_bytes()
    for name, content in (("empty", b""), ("junk", b"abc"), ("half", data[: len(data) // 2]),
                          ("short", data[:-1])):
        f = tmp_path / f"{name}.safetensors"
        f.write_bytes(content)
        rc = main(["eval", "--task", "zero-shot", "--checkpoint", str(f), "--data", "synth:/nonexistent"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"error: --checkpoint {f} is not a readable safetensors file"), (name, err)


@pytest.mark.parametrize("flags,names", [
    (["--steps", "0"], "steps must be an int >= 1"), (["--n", "-5"], "n must be an int >= 8"),
    (["--size", "10"], "size must be an int in [64, 2048]"), (["--batch-size", "0"], "batch_size must be"),
    (["--lr", "nan"], "lr must be a finite number > 0"), (["--warmup", "-1"], "warmup must be an int >= 0"),
])
def test_demo_misuse_fails_before_generating_data(tmp_path, capsys, flags, names):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--no-progress"] + flags)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: demo: ") and names in err, err
    assert not out.exists()


def test_cuda_device_without_a_gpu_is_one_error_line(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: --device cuda is valid here")
    for argv in (BASE + ["--out", str(tmp_path / "run"), "--device", "cuda"],
                 ["demo", "--out", str(tmp_path / "demo"), "--device", "cuda", "--no-progress"]):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: --device 'cuda': no CUDA device"), err
    rc = main(["demo", "--out", str(tmp_path / "demo"), "--device", "gpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --device must be"), err
    assert not (tmp_path / "demo" / "synthcxr").exists()


def test_info_unknown_model_and_synth_out_file_are_named(tmp_path, capsys):
    assert main(["info", "--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model 'nope' is not a preset; available: ") and "gk_mvlp_tiny" in err, err
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["data", "synth", "--out", str(f), "--n", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is a file, not a folder" in err, err
    assert f.read_text() == "x"
