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
