"""aki-demo end to end: a served tiny checkpoint answers through gradio_client and in headless Chromium
exactly what `generate_text` answers, streams, shows what the model sees, and survives bad requests."""

import re
import shutil
import socket
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from aki_jax import init_params, tiny
from aki_jax.checkpoint import load_pretrained, save_pretrained
from aki_jax.cli.demo import main as demo_main
from aki_jax.data.digits import question as digits_question
from aki_jax.data.digits import render
from aki_jax.generation import Sampling, generate_text
from aki_jax.processing import SYSTEM_MESSAGE, Processor, train_tokenizer
from aki_jax.serving import Answerer, AskSettings, model_view
from aki_jax.serving.answerer import PROMPT_BUCKET

MAX_NEW_TOKENS = 6
QUESTION = "What digit is this?"
WAIT_S = 180  # generous: the machine running the tests may be busy
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random checkpoint (sharpened logits, so answers are several tokens) and digits images."""
    from sklearn.datasets import load_digits

    tmp = tmp_path_factory.mktemp("demo")
    texts = [SYSTEM_MESSAGE] + [" ".join(digits_question(d, k, 3)) for d in range(10) for k in range(4)] * 5
    tok = train_tokenizer(texts, 400, tmp / "tok")
    config = tiny(initial_tokenizer_len=tok.initial_tokenizer_len)
    params = init_params(config, jax.random.key(3))
    # Sharpened logits, and byte-fallback pieces never win (they decode only in groups), so a random
    # model's answer is several whole-text tokens that stream one by one.
    byte_pieces = [i for i in range(len(tok)) if (tok.backend.id_to_token(i) or "").startswith("<0x")]
    head = params["decoder"]["lm_head_kernel"] * 20.0
    params["decoder"]["lm_head_kernel"] = head.at[:, np.asarray(byte_pieces)].set(0.0)
    save_pretrained(tmp / "model", config, params, tokenizer_dir=tmp / "tok")
    digits = load_digits()
    images = []
    for index in (7, 12):  # scans of a 7 and a 2, drawn like the training data, larger than the model's input
        images.append(tmp / f"digit{digits.target[index]}.png")
        Image.fromarray(render(digits.images[index], 64)).save(images[-1])
    bad = tmp / "bad.png"
    bad.write_bytes(b"this is not a PNG")
    return {"model": tmp / "model", "images": images, "bad": bad, "tmp": tmp}


@pytest.fixture(scope="module")
def server(files):
    from aki_jax.serving.demo import build_demo, launch

    answerer = Answerer.from_pretrained(files["model"], warm_up=False)
    answerer.warm_up(AskSettings(max_new_tokens=MAX_NEW_TOKENS))
    demo = build_demo(answerer, note="test")
    url = launch(demo, port=free_port(), block=False, quiet=True)
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def reference(files):
    """The checkpoint loaded on its own, to answer with `generate_text` directly."""
    return load_pretrained(files["model"])


@pytest.fixture(scope="module")
def client(server, files):
    from gradio_client import Client

    return Client(server, verbose=False, analytics_enabled=False, download_files=str(files["tmp"] / "downloads"))


def ask(client, images, question=QUESTION, mode="greedy", temperature=0.7, top_k=0, top_p=1.0, seed=0):
    from gradio_client import handle_file

    controls = (mode, temperature, top_k, top_p, seed, MAX_NEW_TOKENS)
    return client.submit([handle_file(str(p)) for p in images], question, *controls, api_name="/ask")


def expected_answer(reference, images, question=QUESTION, pad_to_multiple=PROMPT_BUCKET, **sampling):
    """`generate_text` on the same inputs and settings (by default padded like the demo, to share its programs)."""
    model, params, tokenizer = reference
    kwargs = {} if pad_to_multiple is None else {"pad_to_multiple": pad_to_multiple}
    return generate_text(
        model, params, tokenizer, question, images, max_new_tokens=MAX_NEW_TOKENS, **kwargs,
        sampling=Sampling(**sampling),
    )  # fmt: skip


@pytest.mark.slow
def test_the_answer_streams_and_equals_generate_text_with_the_pictures_of_its_prompt(client, files, reference):
    job = ask(client, files["images"][:1])
    answer, *_, status = job.result(timeout=WAIT_S)
    _, strip, mma, causal, summary, _ = job.outputs()[0]  # the pictures come with the first message
    expected = expected_answer(reference, files["images"][:1], pad_to_multiple=None)  # generate_text's own padding
    assert answer == expected and len(expected) > 0
    streamed = [out[0] for out in job.outputs()]
    assert len(set(streamed)) > 2, streamed  # "" first, then the answer growing token by token
    assert all(later.startswith(earlier) for earlier, later in zip(streamed, streamed[1:], strict=False))
    assert streamed[-1] == expected and status.startswith("done in ")

    model, _, tokenizer = reference
    example = Processor.from_config(model.config, tokenizer).prompt_example(QUESTION, files["images"][:1])
    view = model_view(example["modality_ids"])
    for served, key in ((strip, "strip"), (mma, "mma"), (causal, "causal")):
        assert (np.asarray(Image.open(served).convert("RGB")) == view[key]).all(), key  # PNG: exact pixels
    assert summary == view["summary"]


@pytest.mark.slow
def test_sampling_controls_and_several_images_reach_generation(client, files, reference):
    question = "Is <image> greater than <image>?"
    settings = {"temperature": 1.3, "top_k": 50, "top_p": 0.9, "seed": 5}
    job = ask(client, files["images"], question, mode="sampling", **settings)
    assert job.result(timeout=WAIT_S)[0] == expected_answer(reference, files["images"], question, **settings)


@pytest.mark.slow
def test_bad_requests_show_their_reason_and_the_server_answers_the_next_one(client, files, reference):
    from gradio_client.exceptions import AppError

    too_long = "seven " * 300
    for images, question, message in [
        ([files["bad"]], QUESTION, "image 1 of 1: bad.png: not a readable image"),
        (files["images"][:1], "   ", "the question is empty"),
        (files["images"][:1], too_long, "new tokens were asked for: more than the model's 256 positions"),
        (files["images"][:1], "<image> and <image>?", "2 <image> placeholder(s) but 1 image(s)"),
    ]:
        with pytest.raises(AppError, match=re.escape(message)):
            ask(client, images, question).result(timeout=WAIT_S)
    assert ask(client, files["images"][:1]).result(timeout=WAIT_S)[0] == expected_answer(reference, files["images"][:1])


@pytest.mark.slow
def test_concurrent_requests_are_queued_and_each_gets_its_own_answer(client, files, reference):
    questions = [QUESTION, "Is it even?", "What is this digit plus 3?"]
    jobs = [ask(client, files["images"][:1], q) for q in questions]  # submitted together, served one by one
    answers = [job.result(timeout=WAIT_S)[0] for job in jobs]
    assert answers == [expected_answer(reference, files["images"][:1], q) for q in questions]


def chromium(tmp_path):
    """Headless Chromium under selenium, offline: no first-run, sync, component updates or QUIC."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1100",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@pytest.mark.slow
@pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()) or shutil.which("chromium") is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)",
)
def test_a_browser_uploads_asks_and_reads_the_streamed_answer(server, files, reference, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium(tmp_path)
    try:
        wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.05)
        driver.get(server)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#images input[type=file]"))
        upload.send_keys(str(files["images"][0]))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#preview img"))  # uploaded and previewed
        driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(QUESTION)
        tokens = driver.find_element(By.CSS_SELECTOR, "#max-new-tokens input[type=number]")
        tokens.send_keys(Keys.CONTROL, "a")
        tokens.send_keys(str(MAX_NEW_TOKENS), Keys.TAB)
        wait.until(lambda d: tokens.get_property("value") == str(MAX_NEW_TOKENS))
        driver.find_element(By.ID, "ask").click()

        seen = []

        def finished(d):
            value = d.find_element(By.CSS_SELECTOR, "#answer textarea").get_property("value")
            if not seen or seen[-1] != value:
                seen.append(value)
            return "done in" in d.find_element(By.ID, "status").text

        wait.until(finished)
        answer = driver.find_element(By.CSS_SELECTOR, "#answer textarea").get_property("value")
        assert answer == expected_answer(reference, files["images"][:1])
        assert all(answer.startswith(value) for value in seen)  # whatever was seen while streaming led to it
        assert driver.find_elements(By.CSS_SELECTOR, "img[src*='.png']"), "the layout and mask pictures"
        shot = tmp_path / "demo.png"
        assert driver.save_screenshot(str(shot))
        assert Image.open(shot).size[0] > 0
    finally:
        driver.quit()


def test_the_command_says_how_to_get_a_model_when_there_is_none(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert demo_main([]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "error: no --checkpoint given and the default training job's model runs/tiny_digits_mma/model"
    )
    assert "`aki-train`" in err and len(err.splitlines()) == 1
    assert demo_main(["--port", "70000"]) == 2
    assert "--port must be in 0..65535, got 70000" in capsys.readouterr().err
