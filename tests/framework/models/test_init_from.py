"""Bring your own model: `model.init_from=<hf folder>` starts a run from its weights under every layout, and
`launch.export` turns any run's checkpoint back into a Hugging Face folder.

References: `from_pretrained` on the same folder, the same sampler batch and the same validation windows, in one
float32 process. Two torchrun jobs cover DualPipe's two copies with data parallelism and ZeRO-1 shards (pp=2 x dp=2,
4 ranks) and expert parallelism (dp=2, ep=2); the single-process cases cover FP8 and the exact export round trip.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, compose_cfg
from tests.framework.hf_folder import documents, make_model_folder, make_tokenizer

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    docs = documents()
    tok = make_tokenizer(root / "tok", docs)
    from framework.data.hf_tokenizer import load_tokenizer
    model = make_model_folder(root / "model", load_tokenizer(str(tok)).vocab_size)
    (root / "docs").mkdir()
    for i, d in enumerate(docs):
        (root / "docs" / f"{i:03d}.txt").write_text(d)
    return root


def run_args(root: Path, *extra: str) -> list[str]:
    return [f"model.init_from={root / 'model'}", f"data.tokenizer={root / 'tok'}", f"data.path={root / 'docs'}",
            f"data.cache_dir={root / 'cache'}", "train.seq_len=32", "train.global_batch_size=8",
            "train.micro_batches=4", "train.steps=1", "train.eval_batches=2", "logging.console=none",
            "logging.wandb.mode=disabled", "optim.warmup_steps=0", *extra]


def reference(cfg, fp8: bool = False) -> tuple[float, float]:
    """(step-0 validation loss, first-step training loss) of from_pretrained on the run's data, one process."""
    from framework.data.dataset import Sampler, TokenWindows, validation_batches
    from framework.data.prepare import prepare
    from framework.models import from_pretrained

    d, t = cfg.data, cfg.train
    p = prepare(d.path, d.cache_dir, d.vocab_size, d.val_fraction, d.max_bytes, d.dtype, d.tokenizer, d.text_field)
    model = from_pretrained(cfg.model.init_from, expert_impl=cfg.model.expert_impl)
    if fp8:
        from framework.fp8 import convert_to_fp8
        convert_to_fp8(model, exclude=list(cfg.fp8.exclude), backend="torch")
    with torch.no_grad():
        val = validation_batches(TokenWindows(p.val_bin, p.dtype, t.seq_len), t.eval_batches, t.global_batch_size,
                                 micro_batches=t.micro_batches)
        val_loss = sum(model.compute_loss(x, y)[0].item() for x, y in val) / len(val)
        train = TokenWindows(p.train_bin, p.dtype, t.seq_len)
        x, y = train.get(Sampler(train, t.seed, t.global_batch_size, 0, 1, 1).sample_ids(0, t.global_batch_size))
        loss = model.compute_loss(x, y)[0].item()
    return val_loss, loss


def assert_close(a: float, b: float, rtol: float = 2e-6) -> None:
    assert abs(a - b) <= rtol * abs(b), (a, b)


def test_config_comes_from_the_folder_and_overrides_win(hf):
    cfg = compose_cfg(*run_args(hf, "model.n_group=1", "model.topk_group=1"))
    saved = json.loads((hf / "model" / "config.json").read_text())
    assert cfg.model.name == "deepseek_v3"
    for k in ("hidden_size", "num_hidden_layers", "q_lora_rank", "n_routed_experts", "vocab_size",
              "num_nextn_predict_layers"):
        assert cfg.model[k] == saved[k], k
    assert saved["n_group"] == 2 and cfg.model.n_group == 1   # the command line wins over config.json
    from framework.config import ConfigError, validate
    with pytest.raises(ConfigError, match=r"model.topk_group=3"):
        validate(compose_cfg(*run_args(hf, "model.topk_group=3")))   # an override is validated like any other


def test_single_process_matches_from_pretrained_and_exports_exactly(hf, tmp_path):
    from framework.models import from_pretrained
    from framework.trainer import Trainer
    from launch.export import export
    from parallel.mesh import init_mesh

    for fp8 in (False, True):
        cfg = compose_cfg(*run_args(hf, f"fp8.enabled={str(fp8).lower()}", "fp8.backend=torch"))
        cfg.train.output_dir = str(tmp_path / f"run{int(fp8)}")
        trainer = Trainer(cfg, init_mesh(1, 1, 1, "cpu"))
        hist = trainer.fit()
        ref_val, ref_loss = reference(cfg, fp8=fp8)
        assert_close(hist[0]["val/loss"], ref_val)
        assert_close(hist[1]["loss"], ref_loss)
        # export -> from_pretrained is exact: every tensor of the trained model, bit for bit
        out = export(tmp_path / f"run{int(fp8)}" / "checkpoints" / "step_00000001", tmp_path / f"export{int(fp8)}")
        back = from_pretrained(str(out)).state_dict()
        mine = trainer.model.state_dict()
        for k, v in back.items():
            assert torch.equal(v, mine[k].float()), k
        assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= \
            {p.name for p in out.iterdir()}


def torchrun(args: list[str], out: Path, nproc: int = 2) -> list[dict]:
    r = subprocess.run([TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", "-m", "launch.train", *args,
                        f"hydra.run.dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("layout", [
    # DualPipe (each part on two ranks of a pipeline) x 2 data-parallel pipelines, ZeRO-1 optimizer shards: 4 ranks
    ("parallel=dualpipe", "parallel.pp=2", "parallel.dp=2", "optim.zero=true"),
    ("parallel.dp=2", "parallel.ep=2", "optim.zero=true"),          # experts sharded, optimizer state sharded
])
def test_torchrun_layouts_match_from_pretrained_and_export(hf, tmp_path, layout):
    from framework.data.dataset import TokenWindows, validation_batches
    from framework.models import from_pretrained
    from launch.export import export

    args = run_args(hf, *layout, "train.eval_interval=1")
    rows = torchrun(args, tmp_path / "run", nproc=4 if "parallel.pp=2" in layout else 2)
    cfg = compose_cfg(*args)
    ref_val, ref_loss = reference(cfg)
    step0 = next(r for r in rows if r["step"] == 0)
    step1 = next(r for r in rows if r["step"] == 1 and "loss" in r)
    assert_close(step0["val/loss"], ref_val, 1e-5)
    assert_close(step1["loss"], ref_loss, 1e-5)
    # the exported folder scores the validation set exactly as the run's layout did after its step
    if "parallel.ep=2" in layout:
        # each ep rank's experts are in the checkpoint under their own range: preempted after step 2 (SIGTERM saves)
        # and resumed, the run's step 3 equals an uninterrupted run's bit for bit (with one key per name, rank 1 would
        # silently resume rank 0's experts); the export below stacks the slices back
        three = [*args[:-1], "train.steps=3", "train.checkpoint_interval=1"] if args[-1] == "train.eval_interval=1" \
            else [*args, "train.steps=3", "train.checkpoint_interval=1"]
        subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "launch.train", *three,
                        f"hydra.run.dir={tmp_path / 'preempted'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "DUET_FAULT": "term:step=2"})
        assert (tmp_path / "preempted" / "checkpoints" / "step_00000002").is_dir()
        again = torchrun(three, tmp_path / "preempted")
        straight = torchrun(three, tmp_path / "straight")
        last = lambda rows: [r["loss"] for r in rows if r.get("step") == 3 and "loss" in r]  # noqa: E731
        assert last(again) == last(straight) != []
    out = export(tmp_path / "run" / "checkpoints" / "step_00000001", tmp_path / "export")
    model = from_pretrained(str(out))
    model.set_progress(1.0)   # the run's last step: the late MTP loss weight (V3 §2.2), as its evaluation used
    p = Path(cfg.data.cache_dir)
    prepared = next(f for f in p.iterdir() if f.name.startswith("docs-"))
    val = validation_batches(TokenWindows(prepared / "val.bin", "uint16", cfg.train.seq_len), cfg.train.eval_batches,
                             cfg.train.global_batch_size, micro_batches=cfg.train.micro_batches)
    with torch.no_grad():
        val_loss = sum(model.compute_loss(x, y)[0].item() for x, y in val) / len(val)
    assert_close(val_loss, step1["val/loss"], 1e-5)


def test_bad_inputs_one_line_exit_2(hf, tmp_path, capsys):
    from launch.export import main as export_main
    from launch.train import precheck

    (tmp_path / "no_config").mkdir()
    for folder, pattern in ((tmp_path / "missing", "no such folder"), (tmp_path / "no_config", "no config.json")):
        with pytest.raises(SystemExit) as e:
            precheck(run_args(hf)[1:] + [f"model.init_from={folder}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "model.init_from=" in err[0] and pattern in err[0], err
    # an override that changes a weight's shape: named when the weights are read, before any step
    from framework.trainer import Trainer
    from parallel.mesh import init_mesh
    cfg = compose_cfg(*run_args(hf, "model.moe_intermediate_size=24"))
    cfg.train.output_dir = str(tmp_path / "run")
    with pytest.raises(ValueError, match=r"model.init_from=.*has shape \(32, 16\), the model's is \(32, 24\)"):
        Trainer(cfg, init_mesh(1, 1, 1, "cpu"))
    for args, pattern in (([str(tmp_path / "nope"), str(tmp_path / "out")], "checkpoint=.*no such folder"),
                          ([str(tmp_path / "no_config"), str(tmp_path / "out")], "no meta.json"),
                          ([str(tmp_path)], "usage")):
        with pytest.raises(SystemExit) as e:
            export_main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and re.search(pattern, err[0]), err
    assert not (tmp_path / "out").exists()
