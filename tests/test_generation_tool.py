"""aki-generate: a pretrained folder + image + prompt -> the answer, streamed, equal to the API."""

import jax
import numpy as np
from PIL import Image

from aki_jax import init_params, tiny
from aki_jax.checkpoint import load_pretrained, save_pretrained
from aki_jax.cli.generate import main as generate_main
from aki_jax.generation import generate_text
from aki_jax.processing import load_tokenizer


def test_tool_prints_the_streamed_answer(tmp_path, capsys, tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    config = tiny(initial_tokenizer_len=tok.initial_tokenizer_len)
    params = init_params(config, jax.random.key(3))
    params["decoder"]["lm_head_kernel"] = params["decoder"]["lm_head_kernel"] * 20.0
    save_pretrained(tmp_path / "model", config, params, tokenizer_dir=tiny_tokenizer_dir)
    image = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 40, 3), dtype=np.uint8)).save(image)

    argv = ["--checkpoint", str(tmp_path / "model"), "--image", str(image), "--prompt", "What is in the picture?"]
    assert generate_main(argv + ["--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out

    model, loaded, tokenizer = load_pretrained(tmp_path / "model")
    pieces = []  # the streaming path, as the tool runs it (reuses its compiled functions)
    expected = generate_text(
        model, loaded, tokenizer, "What is in the picture?", [image], max_new_tokens=5, on_text=pieces.append
    )
    assert printed == expected + "\n" and expected == "".join(pieces) and expected
