"""Checkpoint retention: the last `keep` saves always stay (resume continues from the latest), and with
`keep_best` the save with the best held-out accuracy stays too; metric-less saves never count as best."""

import jax.numpy as jnp
import numpy as np

from aki_jax.training.checkpointing import Checkpointer


def _state(value: float) -> dict:
    return {"step": jnp.int32(value), "params": {"w": jnp.full((3,), value, jnp.float32)}}


def _save_all(directory, keep_best: bool, accuracies: dict[int, float | None]) -> Checkpointer:
    ckpt = Checkpointer(directory, every_steps=1, keep=2, keep_best=keep_best, async_save=False)
    for step, acc in accuracies.items():
        metrics = None if acc is None else {"eval_accuracy": acc}
        assert ckpt.maybe_save(step, _state(step), {"position": step}, metrics=metrics)
    ckpt.wait()
    return ckpt


def test_keep_best_keeps_the_latest_and_the_best(tmp_path):
    accuracies = {1: 0.2, 2: 0.9, 3: None, 4: 0.4, 5: 0.1, 6: 0.3}
    ckpt = _save_all(tmp_path, keep_best=True, accuracies=accuracies)
    assert sorted(ckpt.manager.all_steps()) == [2, 5, 6]
    assert ckpt.best_step() == 2
    assert ckpt.latest_step() == 6
    state, data_state = ckpt.restore(_state(0))
    assert int(state["step"]) == 6 and data_state == {"position": 6}
    np.testing.assert_array_equal(state["params"]["w"], np.full((3,), 6.0, np.float32))
    ckpt.close()


def test_without_keep_best_only_the_latest_stay(tmp_path):
    ckpt = _save_all(tmp_path, keep_best=False, accuracies={1: 0.9, 2: 0.1, 3: 0.2})
    assert sorted(ckpt.manager.all_steps()) == [2, 3]
    assert ckpt.best_step() is None
    ckpt.close()


def test_a_step_is_saved_once_and_only_on_the_interval(tmp_path):
    ckpt = Checkpointer(tmp_path, every_steps=3, keep=5, keep_best=False, async_save=False)
    assert [ckpt.due(s) for s in range(1, 7)] == [False, False, True, False, False, True]
    assert not ckpt.maybe_save(2, _state(2), {})
    assert ckpt.maybe_save(3, _state(3), {})
    ckpt.wait()
    assert not ckpt.due(3) and not ckpt.maybe_save(3, _state(3), {}, force=True)
    assert ckpt.maybe_save(4, _state(4), {}, force=True)
    ckpt.wait()
    assert sorted(ckpt.manager.all_steps()) == [3, 4]
    ckpt.close()
