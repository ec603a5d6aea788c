"""Evaluation on a tiny random AKI: the sharded pipeline equals a direct per-item computation.

Benchmarks (real images: scikit-image samples, sklearn digits): an MMBench-style TSV (multiple
choice with hints), a POPE-style TSV (yes/no in three splits), an MME-style TSV (pairs per image,
perception and cognition categories) and a VQA JSONL (ten references per digit image).

"Direct" means: each row run alone through `AKI.apply` (batch 1, its own padding, no mesh), the
log-likelihood summed by hand in numpy, greedy decoding by re-running the full forward per token.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage import data as skdata
from skimage.transform import resize

from aki_jax import AKI, TEXT, init_params, tiny
from aki_jax.evaluation import job, prompts, runner
from aki_jax.evaluation.readers import encode_image, read_benchmark, write_benchmark
from aki_jax.evaluation.scoring import EvaluationScorer, ModelRunner
from aki_jax.processing import SYSTEM_MESSAGE, Processor, preprocess_images, train_tokenizer
from aki_jax.sharding import MeshConfig, logical_rules, make_mesh, param_shardings

# Runs a tiny model through every scoring mode and mesh (about 9 min on a loaded 2-core machine).
pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 3
DIRECT_LENGTH = 256


def _small(image, size=32):
    image = resize(image, (size, size) + image.shape[2:], anti_aliasing=True, preserve_range=True)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [
        SYSTEM_MESSAGE,
        "What is in the image?\nOptions:\nA. a cat\nB. a dog\nC. a cup\nD. a man\n" + prompts.MC_INSTRUCTION,
        "Is there a cat in the image? " + prompts.YES_NO_INSTRUCTION + " Yes No yes no",
        "Which digit is shown? " + prompts.VQA_INSTRUCTION + " 0 1 2 3 4 5 6 7 8 9",
    ] * 20
    return train_tokenizer(texts, 400)


@pytest.fixture(scope="module")
def model(tokenizer):
    return AKI(tiny(initial_tokenizer_len=tokenizer.initial_tokenizer_len))


@pytest.fixture(scope="module")
def processor(tokenizer, model):
    return Processor.from_config(model.config, tokenizer)


def forward_alone(model, params, example):
    """Logits f32[n, V] of one unpadded example, run alone (right-padded to one fixed length)."""
    n = len(example["input_ids"])
    ids = np.zeros((1, DIRECT_LENGTH), np.int32)
    modality = np.zeros((1, DIRECT_LENGTH), np.int32)
    ids[0, :n], modality[0, :n] = example["input_ids"], example["modality_ids"]
    logits = _forward_jit(params, example["pixel_values"][None], ids, modality, model=model)
    return np.asarray(logits)[0, :n]


@functools.partial(jax.jit, static_argnames=("model",))
def _forward_jit(params, pixel_values, input_ids, modality_ids, *, model):
    return model.apply({"params": params}, pixel_values, input_ids, modality_ids)


@pytest.fixture(scope="module")
def model_and_params(model, tokenizer, processor, benchmarks):
    """Random weights, with the head re-aimed so that generated answers vary with the input and end.

    A random tiny model's last hidden state barely depends on the image or question, so greedy
    decoding would print the same tokens for every item and a row mix-up would go unnoticed. So:
    1. the answer-like tokens get a large embedding component along one direction `u`, and the head
       writes `<|end|>` where the final hidden state points along `u`: an answer token is followed
       by the end of the turn ("B", "No", "3");
    2. the head's columns of those tokens are pointed along the directions in which the prompts'
       last hidden states differ most within a benchmark, centred and scaled: they lead the first
       step, and which one leads depends on the item.
    """
    params = init_params(model.config, jax.random.key(0))
    width = model.config.decoder.hidden_size
    vocab = tokenizer.backend.get_vocab()
    favoured = jnp.asarray([vocab[t] for t in ("A", "B", "C", "D", "No", "yes▁", "3") if t in vocab])
    end = tokenizer.end_token_id
    u = np.random.default_rng(1).normal(size=width)
    u /= np.linalg.norm(u)
    decoder = dict(params["decoder"])
    decoder["embed_tokens"] = decoder["embed_tokens"].at[favoured].add(jnp.asarray(100.0 * u, jnp.float32))
    decoder["lm_head_kernel"] = decoder["lm_head_kernel"].at[:, end].set(jnp.asarray(10.0 * u, jnp.float32))
    decoder["lm_head_bias"] = decoder["lm_head_bias"].at[end].set(-30.0)
    params["decoder"] = decoder
    # Probe: with an identity head the first `width` logits are the final hidden state itself.
    probe = jax.tree.map(lambda x: x, params)
    probe["decoder"] = dict(decoder)
    probe["decoder"]["lm_head_kernel"] = jnp.zeros_like(decoder["lm_head_kernel"]).at[:, :width].set(jnp.eye(width))
    probe["decoder"]["lm_head_bias"] = jnp.zeros_like(decoder["lm_head_bias"])
    groups = []
    for bench in benchmarks:
        states = []
        for item in bench.items:
            pixels = preprocess_images([item.image.load()], processor.image_size)
            user = {"role": "user", "content": prompts.user_prompt(item)}
            example = processor.prompt_example([user], pixel_values=pixels)
            states.append(forward_alone(model, probe, example)[-1, :width])
        groups.append(np.stack(states))
    # Directions of variation within a benchmark, with the differences between benchmarks (their
    # instructions differ) projected out, so that every benchmark gets varied answers.
    centre = np.concatenate(groups).mean(0)
    between, _ = np.linalg.qr(np.stack([g.mean(0) - centre for g in groups]).T)
    within = np.concatenate([g - g.mean(0) for g in groups])
    # ...and the end direction `u` and the mean state, so that after an answer token (where the
    # state is about `u`) these columns stay near their base logit and `<|end|>` wins.
    between, _ = np.linalg.qr(np.concatenate([between, u[:, None], centre[:, None]], axis=1))
    within -= within @ between @ between.T
    _, _, directions = np.linalg.svd(within, full_matrices=False)
    rng = np.random.default_rng(0)
    aims = rng.normal(size=(len(favoured), 3)) @ directions[:3]  # mixes of the 3 leading directions
    aims /= np.linalg.norm(aims, axis=1, keepdims=True)
    scale = 4.0 / (within @ aims.T).std()
    # 3. a term that tells yes/no prompts from the others (along the difference of their mean states,
    #    away from `u`) lifts "No"/"yes" by ~8 logits on yes/no prompts and the other favoured tokens
    #    elsewhere, so that answers parse on every host (which token wins in 2. rests on tiny state
    #    differences, so on the host's rounding).
    kinds = [bench.items[0].task for bench in benchmarks]
    yes_no = np.concatenate([g for g, k in zip(groups, kinds, strict=True) if k == "yes_no"])
    choice = np.concatenate([g for g, k in zip(groups, kinds, strict=True) if k != "yes_no"])
    kind = yes_no.mean(0) - choice.mean(0)
    kind -= (kind @ u) * u
    kind /= np.linalg.norm(kind)
    low, high = choice @ kind, yes_no @ kind
    assert high.min() > low.max(), "yes/no prompts should be separable from the others"
    middle, gap = (high.min() + low.max()) / 2, (high.min() - low.max()) / 2
    sign = np.asarray([1.0 if tokenizer.backend.id_to_token(int(t)) in ("No", "yes▁") else -1.0 for t in favoured])
    kind_kernel = 8.0 * np.outer(kind, sign) / gap
    kind_bias = -8.0 * sign * middle / gap
    kernel = decoder["lm_head_kernel"].at[:, favoured].set(jnp.asarray(scale * aims.T + kind_kernel, jnp.float32))
    bias = decoder["lm_head_bias"].at[favoured].set(jnp.asarray(20.0 - scale * aims @ centre + kind_bias, jnp.float32))
    params["decoder"] = dict(decoder, lm_head_kernel=kernel, lm_head_bias=bias)
    return model, params


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory):
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("bench")
    pictures = {
        name: encode_image(_small(getattr(skdata, name)()))
        for name in ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins")
    }
    names = list(pictures)
    mc = []
    for i, name in enumerate(names):
        options = ["a person", "a cat", "a cup", "a rocket"][: 2 + i % 3]
        row = {"index": 100 + i, "question": f"What is shown in picture {i}?", "hint": "Look closely." if i % 2 else ""}
        row |= {letter: (options[k] if k < len(options) else "") for k, letter in enumerate("ABCD")}
        row |= {"answer": "ABCD"[i % len(options)], "category": ["objects", "people"][i % 2], "image": pictures[name]}
        mc.append(row)
    write_benchmark(mc, folder / "mmbench.tsv")
    pope = [
        {
            "index": i,
            "question": f"Is there a {['cat', 'person', 'cup'][i % 3]} in the image?",
            "answer": ["yes", "no"][i % 2],
            "category": ["adversarial", "popular", "random"][i % 3],
            "image": pictures[names[i % 6]],
        }
        for i in range(7)
    ]
    write_benchmark(pope, folder / "pope.tsv")
    mme = []
    for k, (name, category) in enumerate(
        zip(names[:4], ["existence", "color", "code_reasoning", "existence"], strict=True)
    ):
        first = 2 * k
        for j, answer in enumerate(["Yes", "No"]):
            mme.append(
                {
                    "index": first + j,
                    "image": pictures[name] if j == 0 else str(first),
                    "question": f"Is this picture {k}{' really' * j}? Please answer yes or no.",
                    "answer": answer,
                    "category": category,
                }
            )
    write_benchmark(mme, folder / "MME.tsv")
    digits = load_digits()
    vqa = [
        {
            "index": f"d{i}",
            "image": encode_image((digits.images[i] * 255 / 16).astype(np.uint8)),
            "question": "Which digit is shown?",
            "answers": [str(digits.target[i])] * 7 + ["3"] * 3,
        }
        for i in range(3)
    ]
    write_benchmark(vqa, folder / "digits_vqa.jsonl")
    paths = [folder / f for f in ("mmbench.tsv", "pope.tsv", "MME.tsv", "digits_vqa.jsonl")]
    return [read_benchmark(p) for p in paths]


# --- the direct computation --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def direct_logits(model_and_params):
    model, params = model_and_params
    return lambda example: forward_alone(model, params, example)


def _log_softmax(x):
    x = x.astype(np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def direct_predictions(bench, processor, direct_logits, mode):
    """index -> prediction and its evidence, computed item by item without the evaluation package's runner."""
    from aki_jax.evaluation.answers import extract_choice, extract_short_answer, extract_yes_no

    tok = processor.tokenizer
    out = {}
    for item in bench.items:
        pixels = preprocess_images([item.image.load()], processor.image_size)
        user = {"role": "user", "content": prompts.user_prompt(item)}
        if mode == "likelihood" and item.task != "vqa":
            scores = {}
            for label, text in prompts.candidate_answers(item):
                example = processor.sft_example([user, {"role": "assistant", "content": text}], pixel_values=pixels)
                supervised = example["weights"] > 0
                # the supervised tokens are exactly the candidate and the turn's closing <|end|>
                assert tok.decode(example["targets"][supervised], skip_special_tokens=False) == text + "<|end|>"
                logp = _log_softmax(direct_logits(example))
                scores[label] = float(logp[np.arange(len(logp)), example["targets"]][supervised].sum())
            out[item.index] = {"prediction": max(scores, key=scores.get), "log_likelihoods": scores}
            continue
        example = processor.prompt_example([user], pixel_values=pixels)
        new = []
        for _ in range(MAX_NEW_TOKENS):  # greedy by full forward: no KV cache involved
            token = int(np.argmax(direct_logits(example)[-1]))
            if token in tok.stop_token_ids:
                break
            new.append(token)
            example = {
                **example,
                "input_ids": np.append(example["input_ids"], token),
                "modality_ids": np.append(example["modality_ids"], TEXT),
            }
        text = tok.decode(new)
        if item.task == "multiple_choice":
            prediction = extract_choice(text, item.options)
        elif item.task == "yes_no":
            prediction = extract_yes_no(text)
        else:
            prediction = extract_short_answer(text)
        out[item.index] = {"prediction": prediction, "output": text}
    return out


def _scorer(model_and_params, processor, mode, rows, mesh=None, shard_params=False):
    model, params = model_and_params
    rules = logical_rules() if mesh is not None else None
    if shard_params:
        params = jax.device_put(params, param_shardings(model.config, mesh, rules)[1])
    model_runner = ModelRunner(
        model,
        params,
        processor,
        rows_per_step=rows,
        mesh=mesh,
        rules=rules,
        max_new_tokens=MAX_NEW_TOKENS,
        length_multiple=DIRECT_LENGTH,  # one padded length for every row: one compilation per mode and mesh
    )
    return EvaluationScorer(model_runner, mode=mode)


def _records(folder, bench):
    return [json.loads(x) for x in (folder / bench.name / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_device_runs(model_and_params, processor, benchmarks, tmp_path_factory):
    outputs = {}
    for mode in ("likelihood", "generate"):
        folder = tmp_path_factory.mktemp(mode)
        scorer = _scorer(model_and_params, processor, mode, rows=3)
        results = job.evaluate(benchmarks, scorer, folder, progress=False)
        outputs[mode] = (folder, results, scorer.runner.calls)
    return outputs


@pytest.mark.parametrize("mode", ["likelihood", "generate"])
def test_scores_equal_a_direct_single_device_computation(
    mode, single_device_runs, benchmarks, processor, direct_logits
):
    folder, results, _ = single_device_runs[mode]
    for bench in benchmarks:
        expected = direct_predictions(bench, processor, direct_logits, mode)
        records = _records(folder, bench)
        assert [r["index"] for r in records] == [it.index for it in bench.items]
        for record in records:
            want = expected[record["index"]]
            assert record["prediction"] == want["prediction"], (bench.name, record["index"])
            if "log_likelihoods" in want:
                got = record["log_likelihoods"]
                assert got.keys() == want["log_likelihoods"].keys()
                labels = sorted(got)
                np.testing.assert_allclose(
                    [got[k] for k in labels], [want["log_likelihoods"][k] for k in labels], atol=2e-4
                )
            else:
                assert record["output"] == want["output"]
        # the scores follow from the direct predictions by the metric definitions
        from aki_jax.evaluation.metrics import item_score

        direct = [item_score(it.task, it.answers, expected[it.index]["prediction"]) for it in bench.items]
        assert results[bench.name]["scores"]["accuracy"] == pytest.approx(np.mean(direct))
    # The comparison has teeth only if answers differ between items and some parse.
    for bench in benchmarks:
        answers = {json.dumps(r.get("output", r.get("log_likelihoods"))) for r in _records(folder, bench)}
        assert len(answers) >= 2, bench.name
    everything = [r for bench in benchmarks for r in _records(folder, bench)]
    assert sum(r["prediction"] is not None and r["task"] != "vqa" for r in everything) >= 4
    assert {"pope", "per_category"} <= set(results["pope"]["scores"])
    assert {"perception", "cognition"} <= set(results["MME"]["scores"]["mme"])
    assert (folder / "results.md").read_text().startswith("| benchmark |")


def test_eight_devices_give_the_same_predictions_as_one(
    model_and_params, processor, benchmarks, tmp_path, single_device_runs
):
    assert len(jax.devices()) == 8
    meshes = {
        "data8": (make_mesh(MeshConfig(data=-1)), True),  # params placed as tools/evaluate.py does
        "data2_fsdp2_tensor2": (make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), True),
    }
    for mode, mesh_name in (("likelihood", "data8"), ("likelihood", "data2_fsdp2_tensor2"), ("generate", "data8")):
        mesh, shard_params = meshes[mesh_name]
        scorer = _scorer(model_and_params, processor, mode, rows=8, mesh=mesh, shard_params=shard_params)
        job.evaluate(benchmarks, scorer, tmp_path / f"{mode}-{mesh_name}", progress=False)
        reference = single_device_runs[mode][0]
        for bench in benchmarks:
            got, want = _records(tmp_path / f"{mode}-{mesh_name}", bench), _records(reference, bench)
            assert [r["prediction"] for r in got] == [r["prediction"] for r in want], (mode, mesh_name, bench.name)
            for a, b in zip(got, want, strict=True):
                if "log_likelihoods" in b:
                    np.testing.assert_allclose(
                        list(a["log_likelihoods"].values()), list(b["log_likelihoods"].values()), atol=1e-4
                    )
                else:
                    assert a["output"] == b["output"]


def test_killed_model_run_resumes_without_recomputing(
    model_and_params, processor, benchmarks, tmp_path, single_device_runs
):
    bench = benchmarks[0]  # MMBench-style: 2-4 candidates per item, one row each item
    scorer = _scorer(model_and_params, processor, "likelihood", rows=2)
    real = scorer.runner.log_likelihoods

    def dies_on_third_call(examples):
        if scorer.runner.calls == 2:
            raise KeyboardInterrupt("killed")
        return real(examples)

    scorer.runner.log_likelihoods = dies_on_third_call
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate_benchmark(bench, scorer, tmp_path, progress=False)
    shard = tmp_path / bench.name / "shards" / "process-00000.jsonl"
    finished = len(shard.read_text().splitlines())
    rows_left = len(bench.items) - finished  # one row per item

    resumed = _scorer(model_and_params, processor, "likelihood", rows=2)
    runner.evaluate_benchmark(bench, resumed, tmp_path, progress=False)
    assert 0 < finished < len(bench.items)
    assert resumed.runner.calls == -(-rows_left // 2)
    got, want = _records(tmp_path, bench), _records(single_device_runs["likelihood"][0], bench)
    assert [r["prediction"] for r in got] == [r["prediction"] for r in want]


@pytest.mark.parametrize("kind", ["mma", "causal"])
def test_shared_prefix_row_scores_each_candidate_as_its_own_row(model_and_params, processor, kind):
    """Candidates of different lengths (option texts) in one row score as each alone, for either mask."""
    from aki_jax.evaluation.scoring import shared_prefix_row

    model, params = model_and_params
    model = AKI(model.config.replace(attention=kind))
    pixels = preprocess_images([_small(skdata.astronaut())], processor.image_size)
    user = {"role": "user", "content": "<image>\nWhat is in the image?\nA. a cat\nB. a dog\n" + prompts.MC_INSTRUCTION}
    answers = ["A", "a dog in the image", "B. a cat", "no"]
    examples = [
        processor.sft_example([user, {"role": "assistant", "content": a}], pixel_values=pixels) for a in answers
    ]
    row = shared_prefix_row(examples)
    prefix = int((row["branch"] == 0).sum())
    supervised = [np.flatnonzero(e["weights"] > 0) for e in examples]
    assert prefix == min(s[0] for s in supervised) + 1  # the prompt, shared once
    assert len(row["input_ids"]) == prefix + sum(s[-1] + 1 - prefix for s in supervised)
    assert len(row["input_ids"]) < sum(len(e["input_ids"]) for e in examples) / 2

    scoring = ModelRunner(model, params, processor, rows_per_step=2, length_multiple=64)
    got = scoring.log_likelihoods([row])[0]
    want = []
    for e in examples:
        logp = _log_softmax(forward_alone(model, params, e))
        want.append(float((logp[np.arange(len(logp)), e["targets"]] * e["weights"]).sum()))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    assert np.ptp(want) > 1e-3  # the candidates really score differently


def test_shared_prefix_row_refuses_what_it_cannot_score(processor):
    from aki_jax.evaluation.scoring import shared_prefix_row

    user = {"role": "user", "content": "Which digit?"}
    a, b = (processor.sft_example([user, {"role": "assistant", "content": t}]) for t in ("1", "2"))
    with pytest.raises(ValueError, match="a candidate has no supervised token"):
        shared_prefix_row([a, {**b, "weights": np.zeros_like(b["weights"])}])
    bad = {**b, "modality_ids": np.where(b["weights"] > 0, 3, b["modality_ids"])}  # QUERY inside the answer
    with pytest.raises(ValueError, match="candidate 1: its tokens after the shared prompt are not all TEXT"):
        shared_prefix_row([a, bad])
    with pytest.raises(ValueError, match="no candidates"):
        shared_prefix_row([])


def test_evaluate_tool_on_a_saved_checkpoint_and_its_rerun(
    model_and_params, tokenizer, benchmarks, tmp_path, single_device_runs, monkeypatch, capsys
):
    from aki_jax.checkpoint import save_pretrained

    model, params = model_and_params
    tokenizer.save(tmp_path / "tok")
    save_pretrained(tmp_path / "ckpt", model.config, params, tokenizer_dir=tmp_path / "tok")
    files = [b.path for b in benchmarks[:3]]
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "out"), "--batch-size", "8"]
    argv += ["--length-multiple", str(DIRECT_LENGTH), "--no-progress"]
    for f in files:
        argv += ["--benchmark", f]
    from aki_jax.cli import evaluate as tool

    assert tool.main(argv) == 0
    table = capsys.readouterr().out
    assert "| mmbench | likelihood |" in table and "MME perception" in table and "POPE F1" in table
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results) == ["mmbench", "pope", "MME"]
    reference = single_device_runs["likelihood"][0]
    for bench in benchmarks[:3]:
        got, want = _records(tmp_path / "out", bench), _records(reference, bench)
        assert [r["prediction"] for r in got] == [r["prediction"] for r in want]
        assert results[bench.name]["scores"] == json.loads(
            json.dumps(single_device_runs["likelihood"][1][bench.name]["scores"])
        )

    def no_model_calls(self, examples):
        raise AssertionError("a finished item was recomputed")

    monkeypatch.setattr(ModelRunner, "log_likelihoods", no_model_calls)
    assert tool.main(argv) == 0
    assert tool.main(argv[:-6] + ["--mode", "generate", "--benchmark", files[0]]) == 1  # other settings refused
    assert "other settings (" in capsys.readouterr().err


def test_evaluate_tool_skips_and_lists_undecodable_images(model_and_params, tokenizer, benchmarks, tmp_path, capsys):
    """A truncated image and a decompression bomb among POPE's rows: listed, never scored; the rest as before."""
    import base64

    from test_eval_bad_inputs import _bomb_png, _truncated_png

    from aki_jax.checkpoint import save_pretrained
    from aki_jax.cli import evaluate as tool

    model, params = model_and_params
    tokenizer.save(tmp_path / "tok")
    save_pretrained(tmp_path / "ckpt", model.config, params, tokenizer_dir=tmp_path / "tok")
    pope = benchmarks[1]
    text = open(pope.path, encoding="utf-8").read()
    assert text.splitlines()[0].split("\t") == ["index", "question", "answer", "category", "image"]
    lines = text.splitlines()
    for index, data in ((90, _truncated_png()), (91, _bomb_png())):
        lines.append(f"{index}\tIs there a cat in the image?\tyes\trandom\t{base64.b64encode(data).decode()}")
    (tmp_path / "pope.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "out"), "--batch-size", "8"]
    argv += ["--length-multiple", str(DIRECT_LENGTH), "--no-progress", "--benchmark", str(tmp_path / "pope.tsv")]
    assert tool.main(argv) == 0
    assert "skipped (unreadable) 2" in capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "results.json").read_text())["pope"]
    errors = result["read_errors"]
    assert len(errors) == 2 and "truncated" in errors[0] and "decompression bomb" in errors[1]
    assert errors[0].startswith(f"{tmp_path / 'pope.tsv'}:{len(lines) - 1}: index '90'")
    assert result["scores"]["items"] == len(pope.items) and result["scores"]["read_errors"] == 2
    got = [json.loads(x) for x in (tmp_path / "out" / "pope" / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in got] == [it.index for it in pope.items]


WORKER = """
import sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from aki_jax.evaluation import job
job.evaluate_checkpoint(sys.argv[3], [sys.argv[4]], sys.argv[5], batch_size=8, length_multiple=256, progress=False)
"""


@pytest.mark.slow
def test_two_processes_split_the_work_and_agree_with_one(
    model_and_params, tokenizer, benchmarks, tmp_path, single_device_runs
):
    """Two real JAX processes (4 CPU devices each, gloo collectives) on one mesh of 8 devices."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from aki_jax.checkpoint import save_pretrained

    model, params = model_and_params
    tokenizer.save(tmp_path / "tok")
    save_pretrained(tmp_path / "ckpt", model.config, params, tokenizer_dir=tmp_path / "tok")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}"
    bench = benchmarks[1]
    args = [str(tmp_path / "ckpt"), bench.path, str(tmp_path / "out")]
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, address, str(p), *args], env=env, stderr=subprocess.PIPE)
        for p in (0, 1)
    ]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err.decode()[-3000:]
    shards = sorted((tmp_path / "out" / bench.name / "shards").glob("*.jsonl"))
    assert [len(s.read_text().splitlines()) for s in shards] == [4, 3]  # 7 items, round robin
    got, want = _records(tmp_path / "out", bench), _records(single_device_runs["likelihood"][0], bench)
    assert [r["prediction"] for r in got] == [r["prediction"] for r in want]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(
            [a["log_likelihoods"][k] for k in sorted(b["log_likelihoods"])],
            [b["log_likelihoods"][k] for k in sorted(b["log_likelihoods"])],
            atol=1e-4,
        )
