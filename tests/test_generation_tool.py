"""tools/generate.py: a pretrained folder + image + prompt -> the answer, streamed, equal to the API."""

import importlib.util
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from aki_jax import init_params, tiny
from aki_jax.checkpoint import load_pretrained, save_pretrained
from aki_jax.generation import generate_text
from aki_jax.processing import SYSTEM_MESSAGE, train_tokenizer


def load_tool():
    path = Path(__file__).resolve().parents[1] / "tools" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_prints_the_streamed_answer(tmp_path, capsys):
    tok = train_tokenizer([SYSTEM_MESSAGE, "What is in the picture? A cat on a mat."] * 20, 400, tmp_path / "tok")
    config = tiny(initial_tokenizer_len=tok.initial_tokenizer_len)
    params = init_params(config, jax.random.key(3))
    params["decoder"]["lm_head_kernel"] = params["decoder"]["lm_head_kernel"] * 20.0
    save_pretrained(tmp_path / "model", config, params, tokenizer_dir=tmp_path / "tok")
    image = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 40, 3), dtype=np.uint8)).save(image)

    argv = ["--checkpoint", str(tmp_path / "model"), "--image", str(image), "--prompt", "What is in the picture?"]
    answer = load_tool().main(argv + ["--max-new-tokens", "5"])
    printed = capsys.readouterr().out
    assert printed == answer + "\n"

    model, loaded, tokenizer = load_pretrained(tmp_path / "model")
    pieces = []  # the streaming path, as the tool runs it (reuses its compiled functions)
    expected = generate_text(
        model, loaded, tokenizer, "What is in the picture?", [image], max_new_tokens=5, on_text=pieces.append
    )
    assert answer == expected == "".join(pieces)
