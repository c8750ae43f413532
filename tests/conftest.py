"""Shared fixtures: a small text corpus prepared once per test session, and configs composed through Hydra."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)


def stdlib_sample(dest: Path, n_files: int = 40) -> Path:
    """A deterministic small text corpus: the first n stdlib files."""
    from framework.data.corpus import stdlib_files

    dest.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(stdlib_files()[:n_files]):
        shutil.copy(f, dest / f"{i:03d}_{f.name}")
    return dest


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return stdlib_sample(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def compose_cfg(*overrides: str):
    from launch.train import check_overrides

    cfg = check_overrides(list(overrides))
    return cfg


@pytest.fixture
def make_cfg(corpus_dir, data_cache, tmp_path):
    """Config of a tiny, fast run on the small corpus; extra overrides win."""
    def make(*overrides: str, out: Path | None = None):
        base = ["model=dense", f"data.path={corpus_dir}", f"data.cache_dir={data_cache}", "data.vocab_size=512",
                "model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
                "model.intermediate_size=64", "train.seq_len=32", "train.global_batch_size=8",
                "train.micro_batches=2", "train.steps=6", "train.eval_interval=3", "train.eval_batches=2",
                "train.checkpoint_interval=0", "logging.console=none", "logging.wandb.mode=disabled",
                "optim.warmup_steps=2"]
        cfg = compose_cfg(*base, *overrides)
        cfg.train.output_dir = str(out or tmp_path / "run")
        return cfg
    return make
