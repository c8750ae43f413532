"""Every bad configuration is refused with one line naming the key, before anything runs."""
import subprocess
import sys

import pytest

from framework.config import ConfigError, validate
from tests.conftest import ROOT, compose_cfg

BAD = [  # (overrides, world size, key the message must name)
    (["parallel.pp=3"], 2, "parallel.pp"),
    (["parallel.pp=2", "parallel.schedule=dualpipe", "train.micro_batches=3"], 2, "train.micro_batches"),
    (["parallel.pp=3", "parallel.schedule=dualpipe", "train.micro_batches=6", "train.global_batch_size=6"], 3, "parallel.pp"),
    (["model=dense", "parallel.ep=2"], 2, "parallel.ep"),
    (["model=deepseek_v3_tiny", "parallel.ep=3", "parallel.dp=3"], 3, "parallel.ep"),
    (["model=deepseek_v3_tiny", "model.n_routed_experts=6", "parallel.ep=4"], 4, "parallel.ep"),
    (["train.seq_len=100000"], 1, "train.seq_len"),
    (["train.global_batch_size=6", "train.micro_batches=4"], 1, "train.global_batch_size"),
    (["optim.lr=-1"], 1, "optim.lr"),
    (["optim.beta2=1.5"], 1, "optim.beta2"),
    (["optim.schedule=linear"], 1, "optim.schedule"),
    (["parallel.schedule=interleaved"], 1, "parallel.schedule"),
    (["model=dense", "model.num_attention_heads=3"], 1, "model.num_attention_heads"),
    (["data.vocab_size=100"], 1, "data.vocab_size"),
    (["model.vocab_size=300"], 1, "model.vocab_size"),
    (["logging.wandb.mode=sometimes"], 1, "logging.wandb.mode"),
    (["optim.state.exp_avg=fp4"], 1, "optim.state.exp_avg"),
    (["train.steps=0"], 1, "train.steps"),
    (["model=deepseek_v3_tiny", "model.num_experts_per_tok=99"], 1, "model.num_experts_per_tok"),
    (["model=deepseek_v3_tiny", "model.scoring_func=relu"], 1, "model.scoring_func"),
    (["model=deepseek_v3_tiny", "model.topk_group=5"], 1, "model.topk_group"),
    (["parallel.pp=2", "model.num_hidden_layers=1"], 2, "model.num_hidden_layers"),
    (["parallel=1f1b"], 2, "parallel.schedule"),   # MTP needs the embedding on the last stage's rank
    (["parallel=dualpipe", "parallel.layers_per_part=[1,2]"], 2, "parallel.layers_per_part"),
    (["rl.group_size=0"], 1, "rl.group_size"),
]


@pytest.mark.parametrize("overrides,world,key", BAD, ids=[b[2] + ":" + "|".join(b[0]) for b in BAD])
def test_validate_names_key(overrides, world, key):
    cfg = compose_cfg(*overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world)
    msg = str(e.value)
    assert msg.startswith(key + "="), msg
    assert "\n" not in msg


def test_defaults_are_valid():
    validate(compose_cfg(), 1)
    validate(compose_cfg(), 2)  # data parallel over 2 ranks
    validate(compose_cfg("parallel=dualpipe"), 2)  # what make train runs
    validate(compose_cfg("parallel=dualpipe"), 4)  # pp=2 x dp=2


@pytest.mark.parametrize("override,key", [
    ("train.steps=abc", "train.steps"),          # wrong type
    ("model.hidden_sise=64", "model.hidden_sise"),  # unknown key (typo)
    ("optim.lr=fast", "optim.lr"),
    ("fp8.enabled=maybe", "fp8.enabled"),
])
def test_composition_errors_one_line(override, key):
    from launch.train import _one_line
    with pytest.raises(Exception) as e:
        compose_cfg(override)
    line = _one_line(e.value)
    assert line.startswith(key), line
    assert "\n" not in line


def test_cli_exit_code_and_single_line(tmp_path):
    """The real entry point: exit status 2, one line on stderr naming the key, no run folder created."""
    for args, key in ((["train.steps=abc"], "train.steps"), (["optim.lr=-1"], "optim.lr"),
                      (["model=nonexistent"], "model")):
        r = subprocess.run([sys.executable, "-m", "launch.train", *args, f"hydra.run.dir={tmp_path}/run"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (args, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and key in lines[0], r.stderr
        assert not (tmp_path / "run" / "checkpoints").exists()
