"""python -m launch.plan: the ranked table, the files it writes, and one-line errors for bad input."""
from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from framework.config import validate
from launch.plan import main
from tests.conftest import ROOT

SMALL = ["cluster.gpu=h100", "cluster.gpus=16", "train.global_batch_size=64", "cluster.top=5"]


def test_plan_writes_a_config_launch_train_accepts(tmp_path, capsys):
    out = tmp_path / "plan"
    assert main([*SMALL, f"cluster.out_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "| 1 |" in printed and "GPU-h / 1T tok" in printed
    assert {p.name for p in out.iterdir()} == {"plan.md", "train_plan.yaml", "gantt.png"}
    # the written config, composed by launch.train's own Hydra entry, asks for the plan's first layout
    job = subprocess.run([sys.executable, "-m", "launch.train", "--config-dir", str(out), "--config-name",
                          "train_plan", "--cfg", "job"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stderr
    cfg = OmegaConf.create(job.stdout)
    row = next(line for line in printed.splitlines() if line.startswith("| 1 |")).split("|")
    schedule, pp, dp, ep = row[2].strip(), int(row[3]), int(row[4]), int(row[5])
    mb = int(row[6].split("x")[0])
    assert (cfg.parallel.schedule, cfg.parallel.pp, cfg.parallel.dp, cfg.parallel.ep) == \
        ((schedule if pp > 1 else "1f1b"), pp, dp, ep)
    assert cfg.train.micro_batches == mb and cfg.train.global_batch_size == 64
    cfg.train.output_dir = str(tmp_path / "run")
    validate(cfg, world_size=16)


def test_a_layout_that_does_not_fit_says_by_how_much(tmp_path, capsys):
    assert main([*SMALL, "cluster.memory_gb=1", f"cluster.out_dir={tmp_path}"]) == 0
    printed = capsys.readouterr().out
    assert "no: +" in printed and "no layout fits: the closest needs" in printed


@pytest.mark.parametrize("override,key", [
    ("cluster.gpu=tpu", "cluster.gpu"),
    ("cluster.gpus=0", "cluster.gpus"),
    ("cluster.schedules=[gpipe]", "cluster.schedules"),
    ("cluster.micro_batch_sizes=[0]", "cluster.micro_batch_sizes"),
    ("cluster.gpus=not_a_number", "cluster.gpus"),
    ("cluster.nodes=4", "cluster.nodes"),
    ("model=dense", "model.name"),
])
def test_bad_input_is_one_line_naming_the_key(tmp_path, capsys, override, key):
    out = tmp_path / "plan"
    try:
        rc = main([override, f"cluster.out_dir={out}"])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and key in err
    assert not out.exists()      # nothing half-written


def test_no_layout_for_the_batch_is_an_error(tmp_path, capsys):
    rc = main(["cluster.gpus=3", "cluster.micro_batch_sizes=[5]", f"cluster.out_dir={tmp_path / 'plan'}"])
    assert rc == 2 and "train.global_batch_size" in capsys.readouterr().err
