"""The bad-input catalogue: every row is a mistake a user can make, and each must end in ONE line that names the
culprit (the key, file or tensor, and the value), before anything is written, leaving existing checkpoints and data
untouched. Most rows call what the entry point calls (compose, validate, prepare, Trainer/Checkpointer); the CLI rows
run the real commands for their exit status.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

TINY = ["model=dense", "data.vocab_size=512", "model.hidden_size=32", "model.num_hidden_layers=2",
        "model.num_attention_heads=2", "model.intermediate_size=64", "train.seq_len=32", "train.global_batch_size=8",
        "train.micro_batches=2", "train.steps=2", "train.eval_interval=0", "train.eval_batches=1",
        "logging.console=none", "logging.wandb.mode=disabled"]
MOE = ["model=deepseek_v3_tiny", "model.num_nextn_predict_layers=0"]


# -- fixtures: a prepared corpus, a user-data folder, a good checkpoint and broken copies of them --------------------
@pytest.fixture(scope="module")
def world(corpus_dir, data_cache, tmp_path_factory):
    from framework.trainer import Trainer
    from launch.train import check_overrides
    from parallel.mesh import init_mesh

    root = tmp_path_factory.mktemp("bad_inputs")
    data = [f"data.path={corpus_dir}", f"data.cache_dir={data_cache}"]
    cfg = check_overrides(TINY + data + ["train.checkpoint_interval=1"])
    cfg.train.output_dir = str(root / "good")
    t = Trainer(cfg, init_mesh(1, 1, 1, "cpu"))
    t.train_step(t.sampler.next_batch())
    good = t.save_checkpoint()
    t.metrics.close()

    def user_data(name, train, val=np.arange(40), meta=None, dtype="uint16", write_meta=True):
        folder = root / "data" / name
        folder.mkdir(parents=True)
        np.asarray(train, dtype=dtype).tofile(folder / "train.bin")
        np.asarray(val, dtype=dtype).tofile(folder / "val.bin")
        if write_meta:
            (folder / "meta.json").write_text(json.dumps(meta or {"vocab_size": 512, "dtype": dtype}))
        return folder

    ok = np.arange(400) % 500
    folders = {
        "beyond_vocab": user_data("beyond_vocab", np.r_[ok, 600]),
        "wrong_dtype": user_data("wrong_dtype", np.arange(401), meta={"vocab_size": 512, "dtype": "uint32"}),
        "empty": user_data("empty", []),
        "no_meta": user_data("no_meta", ok, write_meta=False),
        "big_vocab": user_data("big_vocab", ok, meta={"vocab_size": 1000, "dtype": "uint16"}),
        "short": user_data("short", np.arange(20)),
    }
    (root / "data" / "no_text").mkdir()
    (root / "data" / "no_text" / "image.png").write_bytes(b"\x89PNG")
    (root / "data" / "one_doc").mkdir()
    (root / "data" / "one_doc" / "a.txt").write_text("only one document here")
    folders["no_text"], folders["one_doc"] = root / "data" / "no_text", root / "data" / "one_doc"

    def broken(name, damage):
        copy = root / "ckpt" / name
        shutil.copytree(good, copy)
        damage(copy)
        return copy

    def flip(path: Path):
        b = bytearray(path.read_bytes())
        b[len(b) // 2] ^= 0xFF
        path.write_bytes(bytes(b))

    shard = lambda c: next(p for p in c.iterdir() if p.suffix == ".distcp")  # noqa: E731
    ckpts = {
        "good": good,
        "truncated": broken("truncated", lambda c: shard(c).write_bytes(shard(c).read_bytes()[:64])),
        "flipped_metadata": broken("flipped_metadata", lambda c: flip(c / ".metadata")),
        "bad_meta_json": broken("bad_meta_json", lambda c: (c / "meta.json").write_text('{"step": 1, ')),
        "no_meta_json": broken("no_meta_json", lambda c: (c / "meta.json").unlink()),
    }
    watched = [Path(data_cache), root / "data", root / "ckpt", good]
    return {"data": data, "folders": folders, "ckpts": ckpts, "watched": watched, "root": root}


def tree_hash(folders) -> dict[str, str]:
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def untouched(world):
    """No row may change an existing checkpoint or data file."""
    before = tree_hash(world["watched"])
    yield
    assert tree_hash(world["watched"]) == before


# -- the catalogue ------------------------------------------------------------------------------------------------
def config_error(overrides, world_size=1) -> str | None:
    """The one line the entry point prints for a configuration, or None if it is accepted."""
    from framework.config import ConfigError, validate
    from launch.train import _one_line, check_overrides

    try:
        cfg = check_overrides(list(overrides))
    except Exception as e:
        return _one_line(e)
    try:
        validate(cfg, world_size)
    except ConfigError as e:
        return str(e)
    return None


CONFIG_ROWS = [  # (overrides, world size, what the line must say)
    (["train.steps=abc"], 1, "train.steps"),                                           # wrong type
    (["train.stepz=3"], 1, "stepz"),                                                   # unknown key
    (["model=gpt5"], 1, "model/gpt5"),                                                 # unknown preset
    (["train.steps=0"], 1, "train.steps=0: must be > 0"),
    (["optim.lr=-1"], 1, "optim.lr=-1.0: must be > 0"),
    (["optim.beta2=1.0"], 1, "optim.beta2=1.0: must be in (0, 1)"),
    (["data.val_fraction=0"], 1, "data.val_fraction=0.0"),
    (["parallel.schedule=zigzag"], 1, "parallel.schedule='zigzag': allowed: dualpipe"),
    (["parallel.comm.dispatch=sparse"], 1, "parallel.comm.dispatch='sparse': allowed: counts, padded"),
    (["logging.wandb.mode=cloud"], 1, "logging.wandb.mode='cloud'"),
    (["logging.dashboard_interval=-1"], 1, "logging.dashboard_interval=-1: must be >= 0"),
    (["train.dtype=fp16"], 1, "train.dtype='fp16'"),
    (["fp8.enabled=true", "train.dtype=bf16_emulated"], 1, "train.dtype='bf16_emulated': fp8.enabled=true"),
    (["data.vocab_size=100"], 1, "data.vocab_size=100"),
    (["train.seq_len=1024"], 1, "train.seq_len=1024: must be <= model.max_position_embeddings=512"),
    (["train.global_batch_size=10", "train.micro_batches=4"], 1, "train.global_batch_size=10: must be a multiple"),
    (["parallel=dualpipe", "parallel.pp=3"], 3, "parallel.pp=3: dualpipe needs an even number"),      # odd pp
    (["parallel.ep=2"], 3, "parallel.ep=2: must divide parallel.dp=3"),               # ep does not divide dp
    (MOE + ["model.n_routed_experts=6", "parallel.ep=4"], 4, "parallel.ep=4: must divide model.n_routed_experts=6"),
    (MOE + ["model.num_experts_per_tok=9"], 1, "model.num_experts_per_tok=9"),
    (["parallel=dualpipe", "train.micro_batches=2"], 2, "train.micro_batches=2: dualpipe with pp=2"),  # < 2*pp
    (["parallel=dualpipe", "train.micro_batches=4", "model.num_hidden_layers=1"], 2, "model.num_hidden_layers=1"),
    (["model=deepseek_v3_tiny", "parallel=1f1b"], 2, "parallel.schedule='1f1b': multi-token prediction"),
    (["parallel.pp=2"], 1, "parallel.pp=2: must divide the world size 1"),            # launch: world too small
    (["parallel.dp=2"], 1, "parallel.dp=2: parallel.pp * parallel.dp must equal the world size 1"),
]


@pytest.mark.parametrize("overrides, world_size, culprit", CONFIG_ROWS, ids=[" ".join(r[0]) for r in CONFIG_ROWS])
def test_config(overrides, world_size, culprit, world, untouched):
    msg = config_error(TINY + world["data"] + overrides, world_size)
    assert msg is not None and "\n" not in msg and culprit in msg, msg


DATA_ROWS = [  # (folder key or literal path, what the line must say)
    ("/nonexistent/corpus", "data.path='/nonexistent/corpus': no such file or folder"),
    ("no_text", "folder holds no text files"),
    ("one_doc", "needs at least 2 non-empty documents (found 1)"),
    ("empty", "train.bin: empty token file"),
    ("wrong_dtype", "is not a multiple of uint32 (4 bytes): wrong dtype?"),
    ("beyond_vocab", "token id 600 >= vocab_size=512"),
    ("no_meta", "missing meta.json"),
    ("big_vocab", "model.vocab_size=512: smaller than the data's vocabulary (1000"),
    ("short", "train.seq_len=32: longer than the data in"),
    ("wrong_dtype/train.bin", "point at the folder holding train.bin"),
]


@pytest.mark.parametrize("source, culprit", DATA_ROWS, ids=[r[0] for r in DATA_ROWS])
def test_data(source, culprit, world, untouched):
    from framework.trainer import Trainer
    from launch.train import check_overrides
    from parallel.mesh import init_mesh

    key, _, rest = source.partition("/")
    path = world["folders"][key] / rest if key in world["folders"] else Path(source)
    cfg = check_overrides(TINY + [f"data.path={path}", f"data.cache_dir={world['root'] / 'cache'}"])
    cfg.train.output_dir = str(world["root"] / "runs" / key)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        Trainer(cfg, init_mesh(1, 1, 1, "cpu"))
    msg = str(e.value)
    assert "\n" not in msg and culprit in msg, msg


CKPT_ROWS = [  # (checkpoint key or path, extra overrides, what the line must say)
    ("/nonexistent/step_00000001", [], "train.resume='/nonexistent/step_00000001': no such checkpoint folder"),
    ("truncated", [], "has 64 bytes, expected"),
    ("flipped_metadata", [], "file .metadata does not match its sha256 in meta.json (corrupt)"),
    ("bad_meta_json", [], "meta.json is corrupt"),
    ("no_meta_json", [], "no meta.json (incomplete or not a duet checkpoint)"),
    ("good", ["model.hidden_size=48"],
     "was written for another model shape: model/embed.weight (512, 32) vs model (512, 48)"),
    ("good", ["train.seed=7"], "train.seed=7: the checkpoint's sampler was seeded with 1234"),
]


@pytest.mark.parametrize("ckpt, extra, culprit", CKPT_ROWS, ids=[f"{r[0]} {' '.join(r[1])}" for r in CKPT_ROWS])
def test_checkpoint(ckpt, extra, culprit, world, untouched):
    from framework.checkpoint import CheckpointError
    from framework.trainer import Trainer
    from launch.train import check_overrides
    from parallel.mesh import init_mesh

    folder = world["ckpts"].get(ckpt, ckpt)
    cfg = check_overrides(TINY + world["data"] + [f"train.resume={folder}", *extra])
    cfg.train.output_dir = str(world["root"] / "runs" / f"resume-{ckpt.strip('/').replace('/', '_')}")
    with pytest.raises((CheckpointError, ValueError)) as e:
        Trainer(cfg, init_mesh(1, 1, 1, "cpu"))
    msg = str(e.value)
    assert "\n" not in msg and culprit in msg, msg


def test_fault_spec_is_checked_before_training(world, untouched, monkeypatch):
    from framework.trainer import Trainer
    from launch.train import check_overrides
    from parallel.mesh import init_mesh

    monkeypatch.setenv("DUET_FAULT", "explode:step=1")
    cfg = check_overrides(TINY + world["data"])
    cfg.train.output_dir = str(world["root"] / "runs" / "fault")
    with pytest.raises(ValueError, match=r"^DUET_FAULT='explode:step=1': unknown fault 'explode'; allowed: kill"):
        Trainer(cfg, init_mesh(1, 1, 1, "cpu"))


# -- the real commands: exit status 2 and one line on stderr (these run in parallel: ~one interpreter start) ------
def test_command_line(world, untouched):
    root, data = world["root"], world["data"]
    train = [sys.executable, "-m", "launch.train", *TINY]
    rows = {
        "world size": (train + data + ["parallel.pp=2", f"hydra.run.dir={root}/cli0"],
                       "config error: parallel.pp=2: must divide the world size 1"),
        "type": (train + data + ["train.steps=abc", f"hydra.run.dir={root}/cli1"], "config error: train.steps: "),
        "missing data": (train + ["data.path=/nonexistent/corpus", f"hydra.run.dir={root}/cli2"],
                         "error: data.path='/nonexistent/corpus': no such file or folder"),
        "corrupt checkpoint": (train + data + [f"train.resume={world['ckpts']['truncated']}",
                                               f"hydra.run.dir={root}/cli3"], "error: checkpoint "),
        "no gpu": (train + data + ["train.device=cuda", f"hydra.run.dir={root}/cli4"], "error: train.device='cuda'"),
        "prepare empty": ([sys.executable, "-m", "launch.prepare_data", f"data.path={world['folders']['no_text']}",
                           f"data.cache_dir={root}/cache"], "error: data.path="),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("DUET_FAULT", None)
    if rows["no gpu"] and _has_cuda():
        rows.pop("no gpu")
    procs = {k: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, (cmd, _) in rows.items()}
    for name, p in procs.items():
        out, err = p.communicate(timeout=240)
        lines = [ln for ln in err.splitlines() if ln.strip() and "Warning" not in ln and not ln.startswith("  ")]
        assert p.returncode == 2, (name, p.returncode, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith(rows[name][1]), (name, err[-2000:])
    assert not (root / "cli0" / "checkpoints").exists() and not (root / "cli3" / "checkpoints").exists()
    assert not (root / "cli0").exists()  # a config refused by validation leaves no run folder behind


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
