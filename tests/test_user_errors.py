"""Every command answers a user mistake with one line `error: ...` naming what is wrong, and the right exit code.

Exit 2 for a wrong call (flag, override, value), 1 for a failure (missing or damaged file); a traceback
only with --debug or AKI_DEBUG=1. The bad inputs are built here: overrides, pretrained folders without
their files, images PIL refuses, read-only and occupied destinations, malicious and truncated PyTorch
checkpoints, damaged Orbax training checkpoints, temporary folders left by a killed conversion.
Each command's `main(argv)` runs in-process; no case compiles a model.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import aki_jax
from aki_jax.checkpoint import save_pretrained
from aki_jax.cli.convert import main as convert_main
from aki_jax.cli.evaluate import main as evaluate_main
from aki_jax.cli.export import main as export_main
from aki_jax.cli.generate import main as generate_main
from aki_jax.cli.train import main as train_main
from aki_jax.convert.torch_import import clean_stale_temp_dirs
from aki_jax.training.checkpointing import DAMAGED_DIR, Checkpointer, DamagedCheckpointError

CONFIG = aki_jax.tiny()


def one_error_line(capsys, code, expected_code, *fragments):
    """The command's stderr is one `error: ` line holding every fragment, and it exited with `expected_code`."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected_code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny saved model with a tokenizer (the params are never run here)."""
    from aki_jax.processing import SYSTEM_MESSAGE, train_tokenizer

    root = tmp_path_factory.mktemp("pretrained")
    tok = train_tokenizer([SYSTEM_MESSAGE, "What is in the picture? A cat."] * 10, 300, root / "tok")
    config = aki_jax.tiny(initial_tokenizer_len=tok.initial_tokenizer_len)
    params = aki_jax.init_params(config, jax.random.key(0))
    save_pretrained(root / "model", config, params, tokenizer_dir=root / "tok")
    image = root / "cat.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    return root / "model", image


def copy_folder(src: Path, dst: Path, skip=()) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*skip))
    return dst


# --- aki-train: overrides, config file, --init-from --------------------------------------------------------

TRAIN_USAGE = {
    "unknown_key": (["optim.lrr=1"], ["optim.lrr", "unknown field 'lrr'", "did you mean 'lr'"]),
    "unknown_section": (["optimm.lr=1"], ["did you mean 'optim'"]),
    "non_numeric": (["optim.lr=abc"], ["optim.lr", "'abc'", "expected a number"]),
    "float_for_int": (["model.decoder.num_layers=1.5"], ["num_layers", "expected an integer"]),
    "not_boolean": (["logging.plot=3"], ["logging.plot", "expected true or false"]),
    "no_equals": (["lr"], ["'lr' is not key=value"]),
    "out_of_range": (["data.batch_size=0"], ["DataConfig.batch_size must be >= 1"]),
    "bad_choice": (["attention=full"], ["must be 'mma' or 'causal'"]),
    "unknown_flag": (["--bogus"], ["unrecognized arguments: --bogus"]),
    "missing_config": (["--config", "nowhere/none.py"], ["--config nowhere/none.py: no such file"]),
}


@pytest.mark.parametrize("case", sorted(TRAIN_USAGE))
def test_train_usage_mistakes_exit_2_with_one_line(capsys, case):
    argv, fragments = TRAIN_USAGE[case]
    one_error_line(capsys, train_main([*argv, "--print-config"]), 2, *fragments)


def test_a_broken_config_file_is_named(tmp_path, capsys):
    (tmp_path / "cfg.py").write_text("def get_config(:\n")
    one_error_line(capsys, train_main(["--config", str(tmp_path / "cfg.py")]), 1, "cfg.py", "SyntaxError")
    (tmp_path / "cfg2.py").write_text("X = 1\n")
    one_error_line(capsys, train_main(["--config", str(tmp_path / "cfg2.py")]), 1, "must define get_config()")


def test_train_init_from_a_missing_folder_names_the_flag(tmp_path, capsys):
    code = train_main(["--init-from", str(tmp_path / "nope"), f"checkpoint.dir={tmp_path / 'run'}"])
    one_error_line(capsys, code, 1, f"--init-from {tmp_path / 'nope'}: no such folder")
    assert not (tmp_path / "run").exists()  # refused before anything was created


def test_train_init_from_a_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    code = train_main(["--init-from", str(tmp_path / "notes"), f"checkpoint.dir={tmp_path / 'run'}"])
    one_error_line(capsys, code, 1, "--init-from", "no aki_config.json and no params", "not an aki-jax pretrained")


def test_debug_flag_and_environment_variable_show_the_traceback(monkeypatch, capsys):
    with pytest.raises(ValueError, match="unknown field 'lrr'"):
        train_main(["optim.lrr=1", "--debug"])
    monkeypatch.setenv("AKI_DEBUG", "1")
    with pytest.raises(ValueError, match="expected a number"):
        train_main(["optim.lr=abc"])


# --- aki-generate ------------------------------------------------------------------------------------------


def test_generate_missing_checkpoint(tmp_path, capsys):
    code = generate_main(["--checkpoint", str(tmp_path / "none"), "--prompt", "Hi"])
    one_error_line(capsys, code, 1, "--checkpoint", "no such folder")


def test_generate_checkpoint_without_config(tmp_path, pretrained, capsys):
    model = copy_folder(pretrained[0], tmp_path / "m", skip=["aki_config.json"])
    one_error_line(capsys, generate_main(["--checkpoint", str(model), "--prompt", "Hi"]), 1, "no aki_config.json")


def test_generate_checkpoint_without_tokenizer(tmp_path, pretrained, capsys):
    model = copy_folder(pretrained[0], tmp_path / "m", skip=["tokenizer*"])
    one_error_line(capsys, generate_main(["--checkpoint", str(model), "--prompt", "Hi"]), 1, "no tokenizer files")


def test_generate_checkpoint_with_damaged_config(tmp_path, pretrained, capsys):
    model = copy_folder(pretrained[0], tmp_path / "m")
    (model / "aki_config.json").write_text('{"decoder": ')
    code = generate_main(["--checkpoint", str(model), "--prompt", "Hi"])
    one_error_line(capsys, code, 1, "aki_config.json", "not valid JSON")


def test_generate_checkpoint_with_damaged_params(tmp_path, pretrained, capsys):
    import shutil

    model = copy_folder(pretrained[0], tmp_path / "m")
    shutil.rmtree(model / "params")
    (model / "params").mkdir()
    (model / "params" / "garbage").write_text("not orbax")
    code = generate_main(["--checkpoint", str(model), "--prompt", "Hi"])
    one_error_line(capsys, code, 1, "params", "cannot read the parameters", "damaged or incomplete")


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"GIF89a but not really", "not a readable image"),
        (b"", "not a readable image"),
        (None, "no such file"),
    ],
    ids=["garbage", "empty", "missing"],
)
def test_generate_image_pil_refuses(tmp_path, pretrained, capsys, content, fragment):
    image = tmp_path / "photo.png"
    if content is not None:
        image.write_bytes(content)
    argv = ["--checkpoint", str(pretrained[0]), "--image", str(image), "--prompt", "What?"]
    one_error_line(capsys, generate_main(argv), 1, f"--image {image}", fragment)


GENERATE_USAGE = {
    "placeholders": (["--prompt", "<image> and <image>?"], "2 <image> placeholders but 1 --image"),
    "max_new_tokens": (["--prompt", "Q", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    "temperature": (["--prompt", "Q", "--temperature", "-1"], "--temperature must be >= 0"),
    "top_p": (["--prompt", "Q", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    "top_k": (["--prompt", "Q", "--top-k", "0"], "--top-k must be >= 1"),
    "dtype": (["--prompt", "Q", "--dtype", "int8"], "invalid choice: 'int8'"),
    "no_prompt": ([], "the following arguments are required: --prompt"),
    "not_a_number": (["--prompt", "Q", "--seed", "x"], "--seed: invalid int value: 'x'"),
}


@pytest.mark.parametrize("case", sorted(GENERATE_USAGE))
def test_generate_usage_mistakes_exit_2(pretrained, capsys, case):
    extra, fragment = GENERATE_USAGE[case]
    argv = ["--checkpoint", str(pretrained[0]), "--image", str(pretrained[1]), *extra]
    one_error_line(capsys, generate_main(argv), 2, fragment)


# --- aki-convert / aki-export: PyTorch checkpoints and destinations -----------------------------------------


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A folder shaped like a released checkpoint (model.safetensors + config.json) and an aki config.

    Its tensors are not AKI's: every case here is refused before the keys are matched (the successful
    run is an export, below).
    """
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("released")
    (root / "src").mkdir()
    save_file({"w": np.arange(4096, dtype=np.float32)}, str(root / "src" / "model.safetensors"))
    (root / "src" / "config.json").write_text(json.dumps({"pad_token_id": CONFIG.pad_token_id}))
    CONFIG.to_json(root / "aki_config.json")
    return root / "src", root / "aki_config.json"


def convert_args(released, dst):
    return ["--src", str(released[0]), "--dst", str(dst), "--aki-config", str(released[1])]


def _read_only_dir(tmp_path: Path) -> Path:
    """A folder this process cannot write in (root ignores permission bits: then sysfs stands in)."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if sys.platform == "linux" and Path("/sys").is_dir():
        return Path("/sys")
    pytest.skip("no read-only folder available to root here")


def test_convert_into_a_read_only_folder(tmp_path, released, capsys):
    dst = _read_only_dir(tmp_path) / "out"
    one_error_line(capsys, convert_main(convert_args(released, dst)), 1, str(dst), "cannot write in", "writable")
    assert not dst.exists()


def test_convert_into_a_file_or_an_occupied_folder(tmp_path, released, capsys):
    (tmp_path / "file").write_text("x")
    one_error_line(capsys, convert_main(convert_args(released, tmp_path / "file")), 1, "is a file")
    one_error_line(capsys, convert_main(convert_args(released, tmp_path / "file" / "sub")), 1, "is a file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    one_error_line(capsys, convert_main(convert_args(released, tmp_path / "full")), 1, "not empty", "--overwrite")
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep"


def test_convert_missing_or_hostile_sources(tmp_path, released, capsys):
    args = ["--dst", str(tmp_path / "out"), "--aki-config", str(released[1])]
    one_error_line(capsys, convert_main(["--src", str(tmp_path / "none"), *args]), 1, "none")

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model_state_dict": {"x": Payload()}}, f)
    one_error_line(capsys, convert_main(["--src", str(tmp_path / "evil.pt"), *args]), 1, "refused")
    assert not (tmp_path / "pwned").exists()

    data = (released[0] / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    one_error_line(capsys, convert_main(["--src", str(tmp_path / "cut.safetensors"), *args]), 1, "truncated")
    assert not (tmp_path / "out").exists()


def test_convert_usage_mistakes(tmp_path, released, capsys):
    one_error_line(capsys, convert_main(["--src", str(released[0])]), 2, "required: --dst")
    argv = [*convert_args(released, tmp_path / "o"), "--dtype", "int4"]
    one_error_line(capsys, convert_main(argv), 2, "invalid choice: 'int4'")
    (tmp_path / "bad.json").write_text("{")
    argv = ["--src", str(released[0]), "--dst", str(tmp_path / "o"), "--aki-config", str(tmp_path / "bad.json")]
    one_error_line(capsys, convert_main(argv), 1, "bad.json", "not valid JSON")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_folders_of_a_killed_conversion_are_removed_on_the_next_run(tmp_path, pretrained, capsys):
    dst = tmp_path / "aki-torch"
    host = socket.gethostname()
    stale = tmp_path / f".aki-torch.converting-{_dead_pid()}@{host}@abc"  # SIGKILLed mid-write
    (stale / "params").mkdir(parents=True)
    (stale / "params" / "big").write_bytes(b"0" * 1000)
    stale_old = tmp_path / f".aki-torch.old-{_dead_pid()}@{host}@x"  # killed while replacing an older dst
    alive = tmp_path / f".aki-torch.converting-{os.getpid()}@{host}@def"  # a conversion still running
    elsewhere = tmp_path / ".aki-torch.exporting-123@another-host@ghi"
    legacy = tmp_path / ".aki-torch.converting-xyz123"
    unrelated = tmp_path / ".other.converting-1@x@y"
    for folder in (stale_old, alive, elsewhere, legacy, unrelated):
        folder.mkdir()
    assert export_main(["--src", str(pretrained[0]), "--dst", str(dst)]) == 0  # exports share the temp folders
    out = capsys.readouterr().out
    assert not stale.exists() and f"removed {stale}: left by an interrupted run" in out
    assert not stale_old.exists() and f"removed {stale_old}" in out
    assert alive.exists() and f"left {alive} alone (process {os.getpid()} is still running)" in out
    assert elsewhere.exists() and "made on host another-host" in out
    assert legacy.exists() and f"left {legacy} alone (made by an older version)" in out
    assert unrelated.exists() and str(unrelated) not in out
    assert (dst / "model.safetensors").is_file()
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".aki-torch."))
    assert leftovers == sorted(p.name for p in (alive, elsewhere, legacy))  # the run's own temp folder is gone
    removed, kept = clean_stale_temp_dirs(dst, log=lambda m: None)
    assert removed == [] and len(kept) == 3


def test_export_mistakes(tmp_path, pretrained, capsys):
    one_error_line(capsys, export_main(["--src", str(tmp_path), "--dst", str(tmp_path / "o")]), 1, "not an aki-jax")
    one_error_line(capsys, export_main(["--src", str(pretrained[0])]), 2, "required: --dst")
    dst = _read_only_dir(tmp_path) / "out"
    one_error_line(capsys, export_main(["--src", str(pretrained[0]), "--dst", str(dst)]), 1, "cannot write in")


def test_evaluate_mistakes(tmp_path, capsys):
    argv = ["--checkpoint", str(tmp_path / "none"), "--benchmark", str(tmp_path / "b.tsv")]
    one_error_line(capsys, evaluate_main([*argv, "--mode", "guess"]), 2, "invalid choice: 'guess'")
    one_error_line(capsys, evaluate_main([*argv, "--batch-size", "many"]), 2, "invalid int value")
    one_error_line(capsys, evaluate_main(["--benchmark", "b.tsv"]), 2, "required: --checkpoint")


# --- Orbax training checkpoints: resume ---------------------------------------------------------------------


def _abstract():
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {"x": jax.ShapeDtypeStruct((8,), np.float32, sharding=device)}


def _run_with_checkpoints(directory: Path, steps=(1, 2, 3)) -> None:
    checkpointer = Checkpointer(directory, 1, 5, False, False)
    for step in steps:
        checkpointer.maybe_save(step, {"x": np.arange(8, dtype=np.float32) + step}, {"position": step})
    checkpointer.wait()
    checkpointer.close()


def test_resume_without_checkpoints_says_it_starts_from_step_0(tmp_path, caplog):
    checkpointer = Checkpointer(tmp_path, 1, 2, False, False)
    with caplog.at_level(logging.WARNING):
        assert checkpointer.resume(_abstract(), resume=True) is None
    assert f"--resume: no checkpoint in {tmp_path / 'checkpoints'}, so this run starts from step 0" in caplog.text
    checkpointer.close()


def test_a_new_run_refuses_a_folder_with_checkpoints(tmp_path):
    _run_with_checkpoints(tmp_path, (1,))
    checkpointer = Checkpointer(tmp_path, 1, 2, False, False)
    with pytest.raises(FileExistsError, match=r"already holds checkpoints \(latest step 1\); pass --resume"):
        checkpointer.resume(_abstract(), resume=False)
    checkpointer.close()


def _truncate_arrays(step_dir: Path) -> None:
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            with open(path, "r+b") as f:
                f.truncate(5)


DAMAGES = {
    "truncated_arrays": (_truncate_arrays, "OUT_OF_RANGE"),
    "garbage_metadata": (lambda d: (d / "state" / "_METADATA").write_text("{oops"), "JSONDecodeError"),
    "garbage_data_state": (lambda d: (d / "data" / "metadata").write_text("{oops"), "JSONDecodeError"),
    "state_deleted": (lambda d: __import__("shutil").rmtree(d / "state"), "not found in the checkpoint"),
}


@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_resume_falls_back_past_a_damaged_latest_checkpoint(tmp_path, caplog, case):
    damage, reason = DAMAGES[case]
    _run_with_checkpoints(tmp_path)
    damage(tmp_path / "checkpoints" / "3")
    checkpointer = Checkpointer(tmp_path, 1, 5, False, False)
    with caplog.at_level(logging.WARNING):
        state, data_state, step = checkpointer.resume(_abstract(), resume=True)
    assert step == 2 and data_state == {"position": 2}
    np.testing.assert_array_equal(state["x"], np.arange(8, dtype=np.float32) + 2)
    assert "checkpoint 3 in" in caplog.text and "cannot be restored, skipping it" in caplog.text
    assert reason in caplog.text
    (aside,) = (tmp_path / DAMAGED_DIR).iterdir()  # kept for inspection, out of the way of new saves
    assert aside.name.startswith("3-") and checkpointer.manager.all_steps() == [1, 2]
    assert checkpointer.maybe_save(3, {"x": np.zeros(8, np.float32)}, {"position": 3})  # step 3 is saved anew
    checkpointer.wait()
    checkpointer.close()


def test_resume_with_every_checkpoint_damaged_names_the_folder(tmp_path):
    _run_with_checkpoints(tmp_path, (1, 2))
    for step in (1, 2):
        (tmp_path / "checkpoints" / str(step) / "data" / "metadata").write_text("{")
    checkpointer = Checkpointer(tmp_path, 1, 5, False, False)
    with pytest.raises(DamagedCheckpointError) as error:
        checkpointer.resume(_abstract(), resume=True)
    message = str(error.value)
    assert str(tmp_path / "checkpoints") in message and "no checkpoint can be restored" in message
    assert "step 2: JSONDecodeError" in message and "step 1: JSONDecodeError" in message
    checkpointer.close()


# --- the other commands ------------------------------------------------------------------------------------


def test_init_from_towers_and_demo_mistakes(tmp_path, capsys):
    from aki_jax.cli.demo import main as demo_main
    from aki_jax.cli.init_from_towers import main as towers_main

    one_error_line(capsys, towers_main(["--vision", str(tmp_path)]), 2, "required: --lm, --dst")
    argv = ["--vision", str(tmp_path / "none"), "--lm", str(tmp_path), "--dst", str(tmp_path / "o")]
    one_error_line(capsys, towers_main(argv), 1, f"{tmp_path / 'none'}: not a folder", "SigLIP")
    one_error_line(capsys, demo_main(["--port", "abc"]), 2, "--port: invalid int value: 'abc'")
    code = demo_main(["--checkpoint", str(tmp_path / "none")])
    err = capsys.readouterr().err  # the demo says what it loads on stdout first
    assert (
        code == 1
        and err.strip()
        == f"error: {tmp_path / 'none'}: no such folder (expected a pretrained folder with aki_config.json)"
    )
