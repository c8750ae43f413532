"""The rl config group refuses bad values in one line naming `rl.<key>`; launch.rl runs SFT -> eval -> GRPO -> eval
end to end and writes its run folder; launch.sample turns the checkpoint into distillation data that SFT reads."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from framework.config import ConfigError, validate
from framework.rl.config import validate_rl_run
from launch.rl import with_defaults
from tests.conftest import ROOT, compose_cfg

BAD = [  # (overrides, key the message must name)
    (["rl.group_size=1"], "rl.group_size"),
    (["rl.beta=-0.1"], "rl.beta"),
    (["rl.clip_eps=0"], "rl.clip_eps"),
    (["rl.top_p=1.5"], "rl.top_p"),
    (["rl.tokenizer=bpe"], "rl.tokenizer"),
    (["rl.task_ops=*"], "rl.task_ops"),
    (["rl.task_min_digits=4", "rl.task_max_digits=2"], "rl.task_min_digits"),
    (["rl.task_heldout_mod=1"], "rl.task_heldout_mod"),
    (["rl.sft_reason_fraction=0.8", "rl.sft_bad_format_fraction=0.3"], "rl.sft_bad_format_fraction"),
    (["rl.sft_wrong_fraction=2"], "rl.sft_wrong_fraction"),
    (["+rl.rewards.vibes=1.0"], "rl.rewards.vibes"),
    (["rl.max_new_tokens=0"], "rl.max_new_tokens"),
    (["rl.stop=['']"], "rl.stop"),
    (["rl.updates_per_batch=0"], "rl.updates_per_batch"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[b[1] for b in BAD])
def test_rl_config_errors_name_the_key(overrides, key):
    cfg = compose_cfg(*overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, 1)
    msg = str(e.value)
    assert msg.startswith(key + "=") and "\n" not in msg, msg


def test_run_level_checks_name_the_key():
    from framework.rl.config import RLConfig, validate_rl

    with pytest.raises(ConfigError, match=r"^rl\.rewards=\{\}: at least one reward"):
        validate_rl(RLConfig(rewards={}))
    cfg = compose_cfg("rl.prompts_per_step=5")
    with pytest.raises(ConfigError, match=r"^rl\.prompts_per_step=5: must be a multiple of the world size 2"):
        validate_rl_run(cfg.rl, cfg.model, cfg.parallel, 2)
    cfg = compose_cfg("rl.sft_seq_len=1024")
    with pytest.raises(ConfigError, match=r"^rl\.sft_seq_len=1024"):
        validate_rl_run(cfg.rl, cfg.model, cfg.parallel, 1)
    validate(compose_cfg(*with_defaults([])), 1)                       # the launcher's defaults are valid
    validate_rl_run(compose_cfg(*with_defaults([])).rl, compose_cfg().model, compose_cfg().parallel, 2)


def test_launcher_reports_a_bad_key_in_one_line():
    r = subprocess.run([sys.executable, "-m", "launch.rl", "rl.group_size=1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip() == "config error: rl.group_size=1: must be >= 2 (advantages compare samples within a group)"


def test_post_training_end_to_end_then_sample_then_distill(tmp_path):
    from launch.rl import run
    from launch.sample import main as sample_main

    tiny = ["model.hidden_size=32", "model.num_hidden_layers=1", "model.num_attention_heads=2",
            "model.intermediate_size=64", "logging.console=none", "logging.wandb.mode=disabled",
            "rl.sft_steps=8", "rl.sft_batch_size=8", "rl.sft_examples=100", "rl.sft_seq_len=64", "rl.grpo_steps=2",
            "rl.prompts_per_step=4", "rl.group_size=4", "rl.max_new_tokens=24", "rl.eval_problems=12",
            "rl.task_max_digits=2", "optim.warmup_steps=2"]
    cfg = compose_cfg(*with_defaults(tiny))
    cfg.train.output_dir = str(tmp_path / "run")
    summary = run(cfg)
    run_dir = tmp_path / "run"
    for name in ("metrics.jsonl", "reward_curve.png", "length_curve.png", "summary.json", "grpo_history.json"):
        assert (run_dir / name).is_file(), name
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "sft/loss" in r] == list(range(1, 9))
    grpo_rows = [r for r in rows if "grpo/reward/mean" in r]
    assert [r["step"] for r in grpo_rows] == [9, 10]
    for k in ("grpo/accuracy", "grpo/format_rate", "grpo/kl", "grpo/clip_fraction", "grpo/response_length",
              "grpo/entropy", "grpo/reward/std", "grpo/groups/skipped"):
        assert k in grpo_rows[0], k
    assert any("eval/before/greedy/accuracy" in r for r in rows)
    assert any("eval/after/greedy/accuracy" in r for r in rows)
    assert 0 <= summary["before"]["greedy"]["accuracy"] <= 1 and summary["after"]["sampled_t1"]["problems"] == 12
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_00000008", "step_00000010"]

    out = tmp_path / "teacher.jsonl"
    assert sample_main(["--checkpoint", str(ckpts[-1]), "--out", str(out), "--problems", "6", "--samples", "2"]) == 0
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(lines) == 12 and {"prompt", "completion", "accuracy", "format", "reward"} <= set(lines[0])
    # distillation: SFT on the sampled file, starting from the SFT checkpoint
    cfg2 = compose_cfg(*with_defaults(tiny + [f"rl.sft_data={out}", f"rl.init={ckpts[0]}", "rl.grpo_steps=0",
                                              "rl.sft_steps=3"]))
    cfg2.train.output_dir = str(tmp_path / "student")
    s2 = run(cfg2)
    assert s2["sft"]["examples"] == 12 and s2["sft"]["steps"] == 3 and "grpo" not in s2
    assert sample_main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
