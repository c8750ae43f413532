"""Cluster recipes and failure handling, end to end with real torchrun processes on localhost.

Four jobs start together (they spend most of their time importing torch, so overlapping them saves minutes):
  nodes    launch/slurm.sbatch with stand-ins for srun/scontrol: two torchrun agents, one process each, meet at a
           c10d rendezvous as two "nodes" and train a tiny DeepSeek-V3 with DualPipe
  elastic  the same training under one agent with --max-restarts=2 as a user types it (no environment variable) and
           two injected crashes: rank 0 killed inside the checkpoint save of step 4, then rank 1 killed before step
           6; then SIGTERM to the agent before step 7 (a preemption): the workers finish step 7, save and exit 0;
           the test requeues the job, and the result must equal `nodes` exactly
  stall    data + expert parallel (ep=2); rank 1 stops responding before step 3 with parallel.timeout_s=10
  sweep    a Hydra sweep (-m) of two jobs in one process, W&B offline, a fake WANDB_API_KEY in the environment
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from parallel.mesh import free_port

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"
STEPS = 8


def tiny_moe(corpus, cache, *extra):
    """deepseek_v3_tiny shrunk: 1 dense + 1 MoE layer, MTP depth 1; 8 steps, a checkpoint every 2."""
    return ["model=deepseek_v3_tiny", f"data.path={corpus}", f"data.cache_dir={cache}", "data.vocab_size=512",
            "model.hidden_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=2",
            "model.intermediate_size=128", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batches=4",
            f"train.steps={STEPS}", "train.eval_interval=4", "train.eval_batches=2", "train.checkpoint_interval=2",
            "logging.console=plain", "logging.dashboard_interval=4", "logging.wandb.mode=disabled", *extra]


def fake_slurm(bin_dir: Path) -> None:
    """srun starts its command once per node (SLURM_NODEID set) and fails if any fails; scontrol names localhost."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\npids=()\n"
        "for ((i=0; i<SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i \"$@\" & pids+=($!); done\n"
        "rc=0; for p in \"${pids[@]}\"; do wait $p || rc=$?; done; exit $rc\n")
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)


@pytest.fixture(scope="module")
def jobs(corpus_dir, data_cache, tmp_path_factory):
    from framework.data.prepare import prepare

    prepare(str(corpus_dir), str(data_cache), 512, 0.05, 8_000_000)   # ready before any collective timeout runs
    tmp = tmp_path_factory.mktemp("cluster")
    fake_slurm(tmp / "bin")
    base = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    base.pop("DUET_FAULT", None)
    base.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    dirs = {k: tmp / k for k in ("nodes", "elastic", "stall", "sweep")}
    cmds = {
        "nodes": (["bash", "launch/slurm.sbatch", *tiny_moe(corpus_dir, data_cache, "parallel=dualpipe",
                                                            f"hydra.run.dir={dirs['nodes']}")],
                  {"PATH": f"{tmp / 'bin'}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242",
                   "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_SUBMIT_DIR": str(ROOT), "NPROC_PER_NODE": "1",
                   "MASTER_PORT": str(free_port()), "TORCHRUN": TORCHRUN, "MAX_RESTARTS": "0"}),
        "elastic": ([TORCHRUN, "--standalone", "--nproc-per-node=2", "--max-restarts=2", "-m", "launch.train",
                     *tiny_moe(corpus_dir, data_cache, "parallel=dualpipe", f"hydra.run.dir={dirs['elastic']}")],
                    {"DUET_FAULT": "save_kill:rank=0:step=4,kill:rank=1:step=6,term:rank=0:step=7"}),
        "stall": ([TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "launch.train",
                   *tiny_moe(corpus_dir, data_cache, "parallel.ep=2", "parallel.timeout_s=10",
                             "logging.dashboard_interval=1", f"hydra.run.dir={dirs['stall']}")],
                  {"DUET_FAULT": "stall:rank=1:step=3"}),
        "sweep": ([sys.executable, "-m", "launch.train", "-m", "optim.lr=1e-3,2e-3", "model=dense",
                   f"data.path={corpus_dir}", f"data.cache_dir={data_cache}", "data.vocab_size=512",
                   "model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
                   "model.intermediate_size=64", "train.seq_len=32", "train.global_batch_size=4",
                   "train.micro_batches=1", "train.steps=2", "train.eval_interval=0", "train.eval_batches=1",
                   "logging.console=none", "logging.wandb.mode=offline", f"hydra.sweep.dir={dirs['sweep']}"],
                  {"WANDB_API_KEY": FAKE_KEY, "WANDB_MODE": "offline"}),
    }
    procs, started = {}, time.monotonic()

    def start(name, cmd, env):
        log = open(tmp / f"{name}.out", "w")
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env={**base, **env}, stdout=log, stderr=subprocess.STDOUT), log)

    for name, (cmd, env) in cmds.items():
        start(name, cmd, env)
    dirs["requeue"] = dirs["elastic"]
    results = {}
    while len(results) < len(procs):
        for name, (p, log) in list(procs.items()):
            if name in results:
                continue
            rc = p.poll()
            if rc is None and time.monotonic() - started < 420:
                continue
            if rc is None:
                p.kill()
                p.wait()
                rc = "timeout"
            log.close()
            results[name] = (rc, (tmp / f"{name}.out").read_text(), dirs[name])
            if name == "elastic":          # the preempted job, requeued as soon as it is gone (the same command)
                start("requeue", *cmds["elastic"])
        time.sleep(0.5)
    return results


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint, read in this one process through the framework's safe reader."""
    from framework.checkpoint import load_tensors, read_metadata

    md = read_metadata(folder).state_dict_metadata
    out = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.items()}
    load_tensors(folder, out)
    return out


def test_two_nodes_through_slurm_train_dualpipe(jobs):
    rc, out, run = jobs["nodes"]
    assert rc == 0, out[-4000:]
    r = rows(run)
    assert [x["step"] for x in r if "loss" in x] == list(range(1, STEPS + 1))
    assert all(0 < x["loss"] < 10 for x in r if "loss" in x)
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["rank0.log", "rank1.log"]
    meta = json.loads((run / "checkpoints" / f"step_{STEPS:08d}" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["config"]["run_id"] == "slurm-4242"   # the job id names the run
    assert meta["config"]["parallel"]["schedule"] == "dualpipe"
    # dashboards: a pipeline timeline and an expert-load heatmap at steps 1, 4, 8; the bubble is a fraction
    pics = sorted(p.name for p in (run / "dashboards").iterdir())
    assert pics == [f"{k}_{s:08d}.png" for k in ("expert_load", "pipeline_timeline") for s in (1, 4, 8)]
    bubbles = [x["pipeline/bubble"] for x in r if "pipeline/bubble" in x]
    assert len(bubbles) == 3 and all(0 < b < 1 for b in bubbles)
    assert all(x["pipeline/bubble_max"] >= x["pipeline/bubble"] for x in r if "pipeline/bubble" in x)
    step8 = next(x for x in r if x["step"] == STEPS and "loss" in x)
    assert step8["optim/bytes_per_param"] == 16.0      # fp32 AdamW: weights, grads, m, v
    assert step8["moe/maxvio_batch"] >= 0 and step8["mem/rss_peak_gb"] > 0 and "loss/mtp" in step8


def test_elastic_restart_resumes_exactly(jobs):
    rc, out, run = jobs["elastic"]
    assert rc != 0 and "Received 15 death signal, shutting down workers" in out, out[-4000:]   # torchrun's own exit
    assert "kill while saving the checkpoint of step 4 on rank 0" in out and "kill at step 6 on rank 1" in out
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} at step 2" in out   # the step-4 save never completed
    assert f"resumed from {run / 'checkpoints' / 'step_00000004'} at step 4" in out
    assert "Gloo connectFullMesh failed" not in out                  # restarts work without the environment variable
    # preempted before step 7: both workers finished it, saved it and exited 0
    assert out.count("SIGTERM: stopped after step 7 with a checkpoint saved") == 2, out[-4000:]
    rc_requeue, requeue, _ = jobs["requeue"]
    assert rc_requeue == 0, requeue[-4000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000007'} at step 7" in requeue
    fired = sorted(p.name for p in (run / "faults").iterdir())
    assert fired == ["kill-rank1-step6.fired", "save_kill-rank0-step4.fired", "term-rank0-step7.fired"]
    # metrics.jsonl was cut back to the checkpoint on each resume: every step once, in order
    got = rows(run)
    assert [x["step"] for x in got] == [0, *range(1, STEPS + 1)]
    rc_ref, out_ref, ref_run = jobs["nodes"]
    assert rc_ref == 0, out_ref[-4000:]
    ref = rows(ref_run)
    keys = ("loss", "val/loss", "grad_norm", "loss/mtp", "moe/maxvio_batch")
    assert [{k: x.get(k) for k in keys} for x in got] == [{k: x.get(k) for k in keys} for x in ref]  # exact
    final = run / "checkpoints" / f"step_{STEPS:08d}"
    a, b = checkpoint_tensors(final), checkpoint_tensors(ref_run / "checkpoints" / f"step_{STEPS:08d}")
    assert a.keys() == b.keys() and len(a) > 20
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    # no sample skipped or seen twice: the sampler consumed exactly steps x global batch
    meta = json.loads((final / "meta.json").read_text())
    assert meta["sampler"]["samples_consumed"] == STEPS * 8
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000007", "step_00000008"]
    log0 = (run / "logs" / "rank0.log").read_text()
    assert "restart0" in log0 and "restart2" in log0                # one log per rank, appended across restarts
    assert not (run / "run.lock").exists()


def test_stalled_rank_is_named_and_every_rank_exits(jobs):
    rc, out, run = jobs["stall"]
    assert rc not in (0, "timeout"), out[-4000:]
    # torchrun's summary: both workers ended with an error status (the watchdog's 3, or torchrun's SIGTERM)
    codes = [int(ln.split(":")[1].split()[0]) for ln in out.splitlines() if ln.strip().startswith("exitcode")]
    assert len(codes) == 2 and all(c != 0 for c in codes), out[-3000:]
    assert 3 in codes
    hangs = [ln for ln in out.splitlines() if ln.startswith("hang:") or "hang: stalled" in ln]
    assert hangs, out[-3000:]
    assert all("stalled rank(s) [1]: rank 1 stalled" in ln and "in step 3 'data'" in ln for ln in hangs), hangs
    assert "parallel.timeout_s=10" in hangs[0]
    logs = (run / "logs" / "rank0.log").read_text() + (run / "logs" / "rank1.log").read_text()
    assert "stalled rank(s) [1]" in logs
    # steps 1 and 2 ran with expert parallelism: the all-to-all reported its exposed share
    done = [x for x in rows(run) if "loss" in x]
    assert [x["step"] for x in done] == [1, 2]
    assert all(0 <= x["comm/exposed_frac"] <= 1 and x["comm/comm_s"] > 0 for x in done)


def test_sweep_groups_wandb_runs_and_never_writes_the_api_key(jobs):
    rc, out, sweep = jobs["sweep"]
    assert rc == 0, out[-4000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0", "1"]
    lrs = []
    for job in runs:
        offline = list((job / "wandb").glob("offline-run-*"))
        assert len(offline) == 1, list(job.rglob("*"))
        record = next(offline[0].glob("*.wandb")).read_bytes()
        assert sweep.name.encode() in record and f"{sweep.name}-{job.name}".encode() in record   # group and name
        meta = json.loads((job / "checkpoints" / "step_00000002" / "meta.json").read_text())
        lrs.append(meta["config"]["optim"]["lr"])
    assert lrs == [1e-3, 2e-3]
    leaked = [str(p) for p in sweep.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert not leaked and FAKE_KEY not in out
