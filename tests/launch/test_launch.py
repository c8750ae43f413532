"""The real entry points, end to end: `python -m launch.train` and `torchrun -m launch.train`."""
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def tiny_args(corpus, cache, out):
    return ["model=dense", f"data.path={corpus}", f"data.cache_dir={cache}", "data.vocab_size=512", "model.hidden_size=32",
            "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.intermediate_size=64",
            "train.seq_len=32", "train.global_batch_size=8", "train.micro_batches=2", "train.steps=8",
            "train.eval_interval=4", "train.eval_batches=2", "logging.console=plain", f"hydra.run.dir={out}"]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def run(cmd, env=None):
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def test_single_process_and_torchrun_data_parallel_agree(corpus_dir, data_cache, tmp_path):
    one = tmp_path / "one"
    run([sys.executable, "-m", "launch.train", *tiny_args(corpus_dir, data_cache, one), "logging.wandb.mode=offline"])
    two = tmp_path / "two"
    run([TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "launch.train",
         *tiny_args(corpus_dir, data_cache, two), "logging.wandb.mode=disabled"])
    a, b = losses(one), losses(two)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))
    # 2 ranks x 4 sequences averaged == 8 sequences in one process, up to the order of float additions
    for (_, la), (_, lb) in zip(a, b):
        assert abs(la - lb) <= 1e-5 * abs(la), (a, b)
    # one shared run folder, a log per rank, a checkpoint, an offline wandb run for the single-process job
    assert sorted(p.name for p in (two / "logs").iterdir()) == ["rank0.log", "rank1.log"]
    assert (two / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    assert list((one / "wandb").glob("offline-run-*")), list(one.iterdir())
    saved = json.loads((two / "checkpoints" / "step_00000008" / "meta.json").read_text())
    assert saved["world_size"] == 2 and saved["sampler"]["samples_consumed"] == 64


def test_second_job_is_refused_sigterm_saves_and_the_requeue_loses_nothing(corpus_dir, data_cache, tmp_path, caplog):
    """Job A trains (constant LR, so the run length does not change the schedule); job B on A's folder is refused
    in one line naming A, and writes nothing there; SIGTERM makes A finish its step, save and exit 0; after a stale
    lock is left by a dead process, the requeued job takes it over and ends bit for bit where an uninterrupted run
    ends."""
    import signal
    import socket
    import time

    import torch

    from framework.checkpoint import Checkpointer
    from framework.trainer import Trainer
    from parallel.mesh import init_mesh
    from tests.conftest import compose_cfg

    run_dir = tmp_path / "run"
    args = ["model=dense", f"data.path={corpus_dir}", f"data.cache_dir={data_cache}", "data.vocab_size=512",
            "model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
            "model.intermediate_size=64", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batches=2",
            "train.eval_interval=0", "train.eval_batches=2", "train.checkpoint_interval=0", "optim.schedule=constant",
            "optim.warmup_steps=0", "logging.console=none", "logging.wandb.mode=disabled"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DUET_RUN_ID": "job-a"}
    a = subprocess.Popen([sys.executable, "-m", "launch.train", *args, "train.steps=1000000",
                          f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((run_dir / "metrics.jsonl").is_file() and len(losses(run_dir)) >= 1):
            assert a.poll() is None and time.monotonic() < deadline, a.stdout.read()
            time.sleep(0.2)
        assert json.loads((run_dir / "run.lock").read_text())["pid"] == a.pid
        before = {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
        log_before = (run_dir / "logs" / "rank0.log").read_bytes()
        b = subprocess.run([sys.executable, "-m", "launch.train", *args, "train.steps=2", f"hydra.run.dir={run_dir}"],
                           cwd=ROOT, env={**env, "DUET_RUN_ID": "job-b"}, capture_output=True, text=True, timeout=300)
        assert b.returncode == 2 and b.stderr.strip().splitlines() == [
            f"error: run folder {run_dir} is in use by host {socket.gethostname()} pid {a.pid} run job-a "
            f"({run_dir / 'run.lock'}); use another hydra.run.dir, or stop that job"], b.stderr
        assert {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == before
        assert (run_dir / "logs" / "rank0.log").read_bytes().startswith(log_before)  # A's own lines only
        a.send_signal(signal.SIGTERM)                           # what SLURM sends before preempting
        out, _ = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 0, out[-3000:]
    ck = Checkpointer(run_dir / "checkpoints")
    stopped = int(ck.latest().name.split("_")[1])
    assert [s for s, _ in losses(run_dir)] == list(range(1, stopped + 1))    # the step it was in finished and saved
    assert "SIGTERM: stopped after step" in out and not (run_dir / "run.lock").exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                  "run_id": "job-x"}))

    def job(out: Path) -> Trainer:            # the requeue and the uninterrupted reference, in this process
        cfg = compose_cfg(*args, f"train.steps={stopped + 2}")
        cfg.train.output_dir = str(out)
        return Trainer(cfg, init_mesh(1, 1, 1, "cpu"))

    with caplog.at_level("WARNING", logger="duet"):
        requeue = job(run_dir)
    assert [r.getMessage() for r in caplog.records if "stale lock" in r.getMessage()] == [
        f"run folder {run_dir}: taking over a stale lock of a dead process (host {socket.gethostname()} pid "
        f"{dead.stdout.strip()} run job-x)"]
    assert requeue.step == stopped
    requeue.fit()
    ref = job(tmp_path / "ref")
    ref_losses = [(h["step"], h["loss"]) for h in ref.fit() if "loss" in h]
    assert losses(run_dir) == ref_losses                      # exact: nothing lost, nothing replayed differently
    a_w, b_w = requeue.step_fn.state_tensors(), ref.step_fn.state_tensors()
    assert a_w and all(torch.equal(a_w[k], b_w[k]) for k in a_w)
