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
    cached = next(m.parent for m in Path(data_cache).glob("*/meta.json")
                  if json.loads(m.read_text()).get("source") == str(corpus_dir)
                  and json.loads(m.read_text())["vocab_size"] == 512)
    for name in ("truncated_bin", "id_beyond_meta"):
        shutil.copytree(cached, root / "data" / name)
        folders[name] = root / "data" / name
    train_bin = folders["truncated_bin"] / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[: train_bin.stat().st_size // 2])
    val = np.fromfile(folders["id_beyond_meta"] / "val.bin", dtype="uint16")   # same size, max_id in meta.json lies
    val[7] = 600
    val.tofile(folders["id_beyond_meta"] / "val.bin")
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
    (["parallel.recompute=true"], 1, "parallel.recompute=True: recomputation runs in pipeline stages"),
    (["parallel.pp=2"], 1, "parallel.pp=2: must divide the world size 1"),            # launch: world too small
    (["parallel.dp=2"], 1, "parallel.dp=2: parallel.pp * parallel.dp must equal the world size 1"),
    # a finite number is required: inf passes a range check, nan every comparison
    (["optim.lr=inf"], 1, "optim.lr=inf: must be a finite number > 0"),
    (["optim.grad_clip=inf"], 1, "optim.grad_clip=inf: must be a finite number >= 0"),
    (["parallel.timeout_s=nan"], 1, "parallel.timeout_s=nan: must be a finite number > 0"),
    (["rl.rewards.accuracy=inf"], 1, "rl.rewards.accuracy=inf: weight must be a finite number"),
    (["model.initializer_range=0"], 1, "model.initializer_range=0.0: must be > 0"),
    (["model.initializer_range=inf"], 1, "model.initializer_range=inf: must be a finite number > 0"),
    (MOE + ["model.mtp_loss_weight=-0.3"], 1, "model.mtp_loss_weight=-0.3: must be >= 0"),
    (MOE + ["model.mtp_loss_weight_late=nan"], 1, "model.mtp_loss_weight_late=nan: must be a finite number >= 0"),
    # the BPE trainer allocates per vocabulary entry before it starts (2^32 aborted the process)
    (["data.vocab_size=4294967296"], 1, "data.vocab_size=4294967296: must be in [259, 2^20=1048576]"),
    # '+' adds keys only to free-form dicts; a typo in a typed group is named with the closest field
    (["+train.stpes=5"], 1, "+train.stpes=5: train has no key 'stpes' (did you mean steps?)"),
    (["++optim.lrr=0.1"], 1, "++optim.lrr=0.1: optim has no key 'lrr' (did you mean lr?)"),
    (["+parallel.comm.sm_budgt=8"], 1, "parallel.comm has no key 'sm_budgt' (did you mean sm_budget?)"),
    # dict-valued options (Hydra's override grammar): checked key by key
    (["model.rope_scaling={type: ntk, factor: 2}"], 1, "model.rope_scaling.type='ntk': allowed: yarn, default"),
    (["model.rope_scaling={type: yarn, factr: 2, original_max_position_embeddings: 16}"], 1,
     "model.rope_scaling.factr=2: unknown key (did you mean factor?)"),
    (["model.rope_scaling={type: yarn, factor: 2}"], 1, "model.rope_scaling={'type': 'yarn', 'factor': 2}: yarn needs"),
    (["model.rope_scaling=yarn"], 1, "model.rope_scaling='yarn': must be null or a dict"),
    (["parallel.comm.emulate_link={latency_us: 5, gbs: 10}"], 1,
     "parallel.comm.emulate_link.gbs=10: unknown key (did you mean gbps?)"),
    (["parallel.comm.emulate_link={latency_us: inf}"], 1, "parallel.comm.emulate_link.latency_us=inf: must be a finite"),
    (["parallel.comm.emulate_link={gbps: -1}"], 1, "parallel.comm.emulate_link.gbps=-1: must be >= 0"),
]


@pytest.mark.parametrize("overrides, world_size, culprit", CONFIG_ROWS, ids=[" ".join(r[0]) for r in CONFIG_ROWS])
def test_config(overrides, world_size, culprit, world, untouched):
    msg = config_error(TINY + world["data"] + overrides, world_size)
    assert msg is not None and "\n" not in msg and culprit in msg, msg


DATA_ROWS = [  # (folder key or literal path, what the line must say)
    ("/nonexistent/corpus", "data.path='/nonexistent/corpus': no such file or folder"),
    ("no_text", "folder holds no text files"),
    ("one_doc", "train.seq_len=32: longer than the data in"),           # one file is allowed, this one is short
    ("truncated_bin", "bytes but meta.json says num_train_tokens="),
    ("id_beyond_meta", "val.bin: token id 600 >= vocab_size=512 (meta.json) at position 7"),
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


def test_small_corpora_are_allowed(world, corpus_dir, tmp_path):
    """A folder of 2-19 documents, or a single file, trains: fewer documents than 1/data.val_fraction are split by
    tokens (the last val_fraction of the stream is held out)."""
    from framework.trainer import Trainer
    from launch.train import check_overrides
    from parallel.mesh import init_mesh

    texts = [p.read_text() for p in sorted(corpus_dir.iterdir())[:3]]
    few = tmp_path / "three_docs"
    few.mkdir()
    for i, text in enumerate(texts):
        (few / f"doc{i}.py").write_text(text)
    single = tmp_path / "one_file.txt"
    single.write_text("\n".join(texts))
    for path in (few, single):
        cache = tmp_path / f"cache-{path.name}"
        cfg = check_overrides(TINY + [f"data.path={path}", f"data.cache_dir={cache}"])
        cfg.train.output_dir = str(tmp_path / f"run-{path.name}")
        t = Trainer(cfg, init_mesh(1, 1, 1, "cpu"))
        meta = json.loads(next(cache.glob("*/meta.json")).read_text())
        total = meta["num_train_tokens"] + meta["num_val_tokens"]
        assert meta["num_documents"] == (3 if path == few else 1)
        assert meta["num_val_tokens"] == round(0.05 * total) >= 33, meta      # one window of seq_len + 1
        loss = t.train_step(t.sampler.next_batch())["loss"]
        val = t.evaluate()["val/loss"]
        t.metrics.close()
        assert 0 < loss < 10 and 0 < val < 10, (path, loss, val)              # ln(512) = 6.2 at the start


def test_dict_valued_overrides_are_applied(world):
    """Hydra's override grammar for the dict-valued options the README shows (they failed inside OmegaConf when the
    field defaulted to null)."""
    from framework.config import validate
    from framework.models import build_model
    from launch.train import check_overrides
    from omegaconf import OmegaConf
    from parallel.exchanges import EmulatedLink

    yarn = "{type: yarn, factor: 4, original_max_position_embeddings: 32, mscale: 1, mscale_all_dim: 1}"
    cfg = check_overrides(TINY + world["data"] + MOE + [f"model.rope_scaling={yarn}",
                                                         "parallel.comm.emulate_link={latency_us: 50, gbps: 10}"])
    validate(cfg, 1)
    assert dict(cfg.model.rope_scaling) == {"type": "yarn", "factor": 4, "original_max_position_embeddings": 32,
                                            "mscale": 1, "mscale_all_dim": 1}
    link = EmulatedLink.from_config(cfg.parallel.comm.emulate_link)
    assert link.seconds(10**6) == pytest.approx(50e-6 + 8e6 / 10e9, rel=1e-12)
    model = build_model(OmegaConf.to_object(cfg.model))
    assert model.rotary.softmax_mult == pytest.approx((0.1 * np.log(4) + 1) ** 2, rel=1e-12)   # YaRN's mscale^2
    # a preset's dict is merged key by key, and null switches it off
    cfg = check_overrides(["model=deepseek_v3_671b", "model.rope_scaling.factor=8"])
    assert cfg.model.rope_scaling.factor == 8 and cfg.model.rope_scaling.original_max_position_embeddings == 4096
    assert check_overrides(["model=deepseek_v3_671b", "model.rope_scaling=null"]).model.rope_scaling is None


MEMORY_ROWS = [  # (overrides, what the line must say), against 8 GB available; the larger part names the culprit
    (["model.hidden_size=65536", "model.intermediate_size=65536"],    # 60.2 G parameters x 16 B (fp32 AdamW)
     "model=dense (60.2 G parameters per rank) does not fit in memory: about 964 GB per rank (parameters, gradients "
     "and optimizer state 963 GB; activations of 1 micro-batch(es) 1.14 GB, of which logits over "
     "model.vocab_size=512 786 KB)"),
    (["model.vocab_size=2147483648"],                                  # 128 tokens x 2^31 x 12 B of logits
     "train.global_batch_size=8 x train.seq_len=32 (128 tokens per micro-batch) does not fit in memory: about 5.5 TB "
     "per rank (parameters, gradients and optimizer state 2.2 TB; activations of 1 micro-batch(es) 3.3 TB, of which "
     "logits over model.vocab_size=2147483648 3.3 TB)"),
    (["train.global_batch_size=65536", "train.micro_batches=1"],      # 2.1 M tokens in one micro-batch
     "train.global_batch_size=65536 x train.seq_len=32 (2097152 tokens per micro-batch) does not fit in memory: "
     "about 24.7 GB per rank"),
]


@pytest.mark.parametrize("overrides, culprit", MEMORY_ROWS, ids=[" ".join(r[0]) for r in MEMORY_ROWS])
def test_memory(overrides, culprit, world, untouched):
    from framework.footprint import check_fits
    from launch.train import check_overrides

    cfg = check_overrides(TINY + world["data"] + overrides)
    with pytest.raises(ValueError) as e:
        check_fits(cfg, 1, available=8e9)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(culprit) and "vs 8 GB given" in msg, msg


def test_unwritable_metrics_file(world, untouched):
    from framework.trainer import Trainer
    from launch.train import check_overrides
    from parallel.mesh import init_mesh

    run = world["root"] / "runs" / "metrics_blocked"
    (run / "metrics.jsonl").mkdir(parents=True)                       # root ignores permissions: a folder in the way
    cfg = check_overrides(TINY + world["data"])
    cfg.train.output_dir = str(run)
    with pytest.raises(ValueError, match=r"^\S+/metrics.jsonl: cannot write the metrics file \(Is a directory\); "
                                         r"make it writable or choose another train.output_dir$"):
        Trainer(cfg, init_mesh(1, 1, 1, "cpu"))


def test_refused_run_removes_only_its_own_setup(tmp_path, monkeypatch):
    """The run folder goes when it holds only what setting up wrote; training output or an earlier run's files stay."""
    import launch.train as entry

    def folder(name, *files):
        run = tmp_path / name
        (run / ".hydra").mkdir(parents=True)
        monkeypatch.setattr(entry, "_fresh_run_dir", run if entry._is_fresh(run) else None)
        for f, text in files:
            (run / f).parent.mkdir(parents=True, exist_ok=True)
            (run / f).write_text(text)
        return run

    fresh = folder("fresh", ("logs/rank0.log", "started\n"), ("metrics.jsonl", ""))
    entry._drop_fresh_run_dir(fresh)
    assert not fresh.exists()
    trained = folder("trained", ("logs/rank0.log", "started\n"), ("metrics.jsonl", '{"step": 0}\n'))
    entry._drop_fresh_run_dir(trained)                                 # a failure mid-run keeps what was learnt
    assert (trained / "metrics.jsonl").read_text() == '{"step": 0}\n'
    earlier = tmp_path / "earlier"
    (earlier / "checkpoints").mkdir(parents=True)
    folder("earlier")                                                  # not this run's: never removed
    entry._drop_fresh_run_dir(earlier)
    assert (earlier / "checkpoints").is_dir()


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
        "prepare vocab": ([sys.executable, "-m", "launch.prepare_data", "data.vocab_size=4294967296",
                           f"data.cache_dir={root}/cache"], "config error: data.vocab_size=4294967296: must be in"),
        "typo added": (train + data + ["+train.stpes=5", f"hydra.run.dir={root}/cli5"],
                       "config error: +train.stpes=5: train has no key 'stpes' (did you mean steps?)"),
        "too big": (train + data + ["model.vocab_size=2147483648", f"hydra.run.dir={root}/cli6"],
                    "error: train.global_batch_size=8 x train.seq_len=32 (128 tokens per micro-batch) does not fit in "
                    "memory: about 5.5 TB per rank"),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("DUET_FAULT", None)
    if rows["no gpu"] and _has_cuda():
        rows.pop("no gpu")
    # under torchrun, a bad input is said once: by rank 0 only, and not again by the attempt --max-restarts starts
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
         "-m", "launch.train", *TINY, *data, "+train.stpes=5", f"hydra.run.dir={root}/cli_torchrun"],
        cwd=ROOT, env={**env, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    procs = {k: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, (cmd, _) in rows.items()}
    for name, p in procs.items():
        out, err = p.communicate(timeout=240)
        lines = [ln for ln in err.splitlines() if ln.strip() and "Warning" not in ln and not ln.startswith("  ")]
        assert p.returncode == 2, (name, p.returncode, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith(rows[name][1]), (name, err[-2000:])
    assert not (root / "cli0" / "checkpoints").exists() and not (root / "cli3" / "checkpoints").exists()
    for refused in ("cli0", "cli1", "cli2", "cli3", "cli5", "cli6"):    # a refused run leaves no run folder behind
        assert not (root / refused).exists(), refused
    out, err = torchrun.communicate(timeout=240)
    said = [ln for ln in (out + err).splitlines() if "config error" in ln]
    attempts = [ln for ln in err.splitlines() if "failed (exitcode: 2)" in ln]
    assert torchrun.returncode == 1, (torchrun.returncode, err[-3000:])    # torchrun's own status for a failed job
    assert len(said) == 1 and said[0].startswith(rows["typo added"][1]), err[-3000:]
    assert len(attempts) == 2, err[-3000:]             # the restarted attempt failed the same way, and stayed quiet
    assert not (root / "cli_torchrun").exists()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
