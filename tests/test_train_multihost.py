"""Multi-host training: `aki-train` (through tests/train_with_hooks.py: example ids and faults) as two real
JAX processes (2 CPU devices each, gloo collectives, `jax.distributed` initialised from
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) on one 2x2 (data x fsdp) mesh.

- On synthetic data (whose global batch does not depend on the process count) two processes end where one
  process with the same four devices ends.
- On the digits pipeline (each process reads its own shard) a run preempted by SIGTERM on one host (both
  save at an agreed step), resumed, killed by SIGKILL on both hosts and resumed again ends bit-identical
  to an uninterrupted two-process run, each process having seen the same
  examples at every step, none twice, and no example on both processes.
- Each process's data-iterator state travels through the checkpoint (Orbax writes JSON from process 0
  only) and comes back to that process; a different process count is refused by name.
- A process that finishes long before the other (slow host) waits for it and both exit cleanly, where
  JAX's own shutdown barrier (5 minutes, fixed) would abort the job.
- A host slower (by more than gloo's fixed 30 s) to build its data and to reach its first step holds the
  others back at barriers instead of failing their first collectives; one that does not arrive within
  AKI_BARRIER_TIMEOUT_S fails every process with an error naming the barrier and the timeout.
"""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "optim.warmup_steps=1",
    "data.batch_size=8",
    "data.seq_len=64",
    "mesh.data=2",
    "mesh.fsdp=2",
    "mesh.tensor=1",
    "checkpoint.every_steps=4",
    "logging.every_steps=1",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "logging.plot=false",
    "logging.peak_flops_per_device=1e12",
    "eval.max_batches=1",
]


def _env(cache: Path, devices: int) -> dict:
    env = dict(os.environ)
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key, None)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    return env


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return f"localhost:{s.getsockname()[1]}"


# Generous: on a loaded 2-core machine one launch has taken 8 minutes (mostly compilation).
LAUNCH_TIMEOUT_S = 1800


def launch(argv: list[str], cache: Path, processes: int = 2, env_extra=None) -> list[subprocess.CompletedProcess]:
    """Run `python <argv>` as `processes` JAX processes (2 devices each; 4 devices when alone).

    Output goes to files, not pipes (a process blocked on a full pipe would stall the others at their
    next collective). Past LAUNCH_TIMEOUT_S every process is killed and the test fails with their output.
    """
    address = _free_address()
    running = []
    with tempfile.TemporaryDirectory() as logs:
        for p in range(processes):
            env = _env(cache, 2 if processes > 1 else 4)
            if processes > 1:
                env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(p))
            env.update(env_extra or {})
            out, err = open(Path(logs) / f"{p}.out", "w+"), open(Path(logs) / f"{p}.err", "w+")
            proc = subprocess.Popen([sys.executable, *argv], env=env, cwd=ROOT, stdout=out, stderr=err, text=True)
            running.append((proc, out, err))
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        try:
            for proc, _, _ in running:
                proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            pass
        finally:
            timed_out = [proc.poll() is None for proc, _, _ in running]
            for proc, _, _ in running:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        done = []
        for proc, out, err in running:
            out.seek(0)
            err.seek(0)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read()))
            out.close()
            err.close()
    if any(timed_out):
        tails = "\n".join(f"process {p}: {run.stderr[-2000:]}" for p, run in enumerate(done))
        pytest.fail(f"launch did not finish within {LAUNCH_TIMEOUT_S} s (processes {timed_out} killed)\n{tails}")
    return done


def train(run_dir: Path, cache: Path, *extra: str, processes: int = 2, env=None) -> list[subprocess.CompletedProcess]:
    hooked = [str(ROOT / "tests" / "train_with_hooks.py"), "--record-example-ids"]
    return launch([*hooked, *COMMON, f"checkpoint.dir={run_dir}", *extra], cache, processes, env)


def assert_ok(runs, code: int = 0):
    """Every process exited with `code`; else each one's exit code, first error line and output tail."""
    if all(run.returncode == code for run in runs):
        return
    report = []
    for p, run in enumerate(runs):
        first = next((line for line in run.stderr.splitlines() if line.startswith("error:")), "")
        report.append(f"process {p}: exit {run.returncode}; {first}\n{run.stderr[-1500:]}")
    pytest.fail("\n\n".join(report))


def exported_params(run_dir: Path) -> dict:
    from aki_jax import load_pretrained

    _, params, _ = load_pretrained(run_dir / "model")
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def ids_per_step(run_dir: Path, process: int) -> dict[int, list]:
    out = {}
    for line in (run_dir / f"example_ids.process{process}-of-2.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["ids"]  # a step redone after a crash keeps its last execution's ids
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("multihost_jax_cache")


def test_two_processes_end_where_one_process_ends(tmp_path, cache):
    synthetic = ("synthetic_data=true", "steps=4")
    two = train(tmp_path / "two", cache, *synthetic)
    assert_ok(two)
    one = train(tmp_path / "one", cache, *synthetic, processes=1)
    assert_ok(one)
    a, b = exported_params(tmp_path / "two"), exported_params(tmp_path / "one")
    assert a.keys() == b.keys() and a
    for key in a:  # gloo's cross-process sums may round differently from the in-process ones
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    summary_two = json.loads((tmp_path / "two" / "summary.json").read_text())
    summary_one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary_two["heldout_examples"] == summary_one["heldout_examples"] == 8  # both processes' rows
    assert summary_two["heldout_loss"] == pytest.approx(summary_one["heldout_loss"], rel=1e-5)
    assert "run summary" in two[0].stdout and "run summary" not in two[1].stdout  # process 0 reports
    first = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(
        json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[0])["loss"], rel=1e-6
    )


def test_preempted_and_killed_two_process_run_resumes_bit_identical(tmp_path, cache):
    steps = 10
    digits = (f"steps={steps}",)
    straight = train(tmp_path / "straight", cache, *digits)
    assert_ok(straight)
    interrupted = tmp_path / "interrupted"
    # A preemption notice reaching process 1 only: the processes agree on a later step (when depends on
    # timing), both save it and exit cleanly.
    preempted = train(interrupted, cache, *digits, "--sigterm-at-step=1", "--hook-process=1")
    assert_ok(preempted)
    saved_steps = sorted(int(p.name) for p in (interrupted / "checkpoints").iterdir() if p.name.isdigit())
    stop = saved_steps[-1]
    assert 1 < stop < steps - 1 and set(saved_steps) <= {4, stop}, saved_steps
    assert f"SIGTERM: saving checkpoint at step {stop} before exiting" in preempted[0].stdout
    saved = json.loads((interrupted / "checkpoints" / str(stop) / "data" / "metadata").read_text())
    assert len(saved["processes"]) == 2
    killed = train(interrupted, cache, *digits, "--resume", f"--kill-at-step={stop + 1}")
    assert_ok(killed, -9)  # both hosts die with no cleanup, one step after the last save
    assert_ok(train(interrupted, cache, *digits, "--resume"))

    a, b = exported_params(tmp_path / "straight"), exported_params(interrupted)
    assert a.keys() == b.keys() and a
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    seen = []
    for process in (0, 1):
        expected, got = ids_per_step(tmp_path / "straight", process), ids_per_step(interrupted, process)
        assert sorted(got) == list(range(1, steps + 1))
        assert got == expected
        seen += [i for step in sorted(got) for i in got[step]]
    assert len(seen) == len(set(seen)) == steps * 8  # 4 rows per process per step, none twice or on both


def test_without_the_preemption_service_a_one_host_sigterm_still_stops_both(tmp_path, cache):
    """JAX's preemption service off: the SIGTERM flag is all-gathered each step, so both stop at that step."""
    runs = train(
        tmp_path / "run",
        cache,
        "synthetic_data=true",
        "steps=6",
        "--sigterm-at-step=2",
        "--hook-process=1",
        env={"JAX_ENABLE_PREEMPTION_SERVICE": "false"},
    )
    assert_ok(runs)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert "SIGTERM: saving checkpoint at step 2 before exiting" in runs[0].stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
    assert "preemption sync point" not in runs[0].stderr + runs[1].stderr  # the service really was off


STATES = """
import sys
import jax
import numpy as np
from aki_jax.sharding import initialize_distributed
initialize_distributed()
from aki_jax.training.checkpointing import Checkpointer
mesh = jax.make_mesh((4,), ("data",))
sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
state = {"x": jax.make_array_from_callback((8,), sharding, lambda i: np.arange(8.0)[i])}
me = jax.process_index()
checkpointer = Checkpointer(sys.argv[1], 1, 2, False, True)
# Unequal per-process states, as streaming shards of different sizes give.
assert checkpointer.maybe_save(1, state, {"position": 10 * (me + 1), "shard": f"part-{me}"})
checkpointer.wait()
abstract = {"x": jax.ShapeDtypeStruct((8,), np.float32, sharding=sharding)}
restored, data_state = checkpointer.restore(abstract, 1)
assert data_state == {"position": 10 * (me + 1), "shard": f"part-{me}"}, data_state
np.testing.assert_array_equal(np.concatenate([s.data for s in restored["x"].addressable_shards]),
                              np.arange(8.0)[4 * me: 4 * me + 4])
checkpointer.close()
print("ok", me)
from aki_jax.sharding import finish_distributed
finish_distributed()
"""


def test_each_process_gets_back_its_own_data_state(tmp_path, cache):
    runs = launch(["-c", STATES, str(tmp_path / "run")], cache)
    assert_ok(runs)
    assert [r.stdout.split()[-2:] for r in runs] == [["ok", "0"], ["ok", "1"]]  # gloo logs to stdout too
    saved = json.loads((tmp_path / "run" / "checkpoints" / "1" / "data" / "metadata").read_text())
    assert [s["state"] for s in saved["processes"]] == [
        {"position": 10, "shard": "part-0"},
        {"position": 20, "shard": "part-1"},
    ]

    from aki_jax.training.checkpointing import Checkpointer

    checkpointer = Checkpointer(tmp_path / "run", 1, 2, False, False)  # this test process: 1 process
    abstract = {
        "x": jax.ShapeDtypeStruct((8,), np.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    }
    with pytest.raises(
        ValueError, match=r"checkpoints/1/data: the data iterator state was saved by 2 processes but this run has 1"
    ):
        checkpointer.restore(abstract, 1)
    checkpointer.close()


SLOW_HOST = """
import sys
import time
from aki_jax.sharding import finish_distributed, initialize_distributed
# JAX's shutdown barrier cut to 2 s, so that a host 10 s late is far past it, however loaded the machine.
initialize_distributed(shutdown_timeout_seconds=2)
import jax
if jax.process_index() == 1:
    time.sleep(10)  # a slow host: the work it still has to do
if sys.argv[1] == "finish":
    finish_distributed()
print("done", jax.process_index(), flush=True)
"""


@pytest.mark.parametrize("finish", [True, False])
def test_a_process_done_early_waits_for_a_slow_one_before_shutdown(cache, finish):
    runs = launch(["-c", SLOW_HOST, "finish" if finish else "plain"], cache)
    if finish:
        assert_ok(runs)
        assert [r.stdout.split()[-2:] for r in runs] == [["done", "0"], ["done", "1"]]
    else:  # JAX's own teardown: process 0 gives up at its shutdown barrier and the job aborts
        assert runs[0].returncode == -6 and "Shutdown barrier has failed" in runs[0].stderr, runs[0].stderr[-2000:]


def test_a_slow_host_holds_the_others_back_instead_of_failing_their_first_collectives(tmp_path, cache):
    """Process 1 is 35 s late twice: at the first collective (Orbax's, when the checkpointer is made) and at
    the first step's. Without the barriers before them, process 0 gives up there after gloo's fixed 30 s
    ("Gloo context initialization failed: DEADLINE_EXCEEDED")."""
    runs = train(tmp_path / "run", cache, "synthetic_data=true", "steps=4", "--slow-host=35", "--hook-process=1")
    assert_ok(runs)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4


def test_a_host_that_never_arrives_fails_every_process_at_the_barrier_within_its_timeout(tmp_path, cache):
    runs = train(
        tmp_path / "run",
        cache,
        "synthetic_data=true",
        "steps=4",
        "--slow-host=20",  # stuck for longer than the timeout; it fails too when it gets there
        "--hook-process=1",
        env={"AKI_BARRIER_TIMEOUT_S": "5"},
    )
    assert_ok(runs, 1)
    for p, run in enumerate(runs):
        errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
        # Process 1 normally misses the setup barrier; were it to make it, it would miss the first step's.
        assert len(errors) == 1 and re.fullmatch(
            rf"error: process {p}: not all 2 processes reached the barrier 'aki-train-(setup|first-step)' within 5 s; "
            r"one is stuck or died \(see its log\), or raise the timeout \(AKI_BARRIER_TIMEOUT_S; "
            r"AKI_FINISH_TIMEOUT_S for the final barrier\)",
            errors[0],
        ), run.stderr[-2000:]
