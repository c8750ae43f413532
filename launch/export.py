"""Write a training checkpoint as a Hugging Face DeepSeek-V3 folder.

  python -m launch.export <run>/checkpoints/step_N <out>

<out> receives config.json, model.safetensors (hub layout: per-expert weights, MTP depths as layers L..L+D-1) and
the tokenizer files of the run's data.tokenizer (or rl.tokenizer), so `framework.models.from_pretrained(<out>)`,
transformers and `model.init_from=<out>` read it. Any training layout exports: checkpoint tensors are keyed by the
model's fully-qualified names (pipeline parts, DualPipe's two copies and data-parallel replicas write each name once;
ZeRO shards hold optimizer state, which is not exported), and they are read through framework.checkpoint, which
checks the folder before anything is read. The folder is written under a temporary name and renamed when complete.
Exit status 2 on bad input, with one line naming the culprit.
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

USAGE = "usage: python -m launch.export <run>/checkpoints/step_N <out folder>"


def model_config_of(meta: dict, where: str):
    """The checkpoint's ModelConfig: launch.rl stores it as 'model', launch.train inside the resolved 'config'."""
    from framework.config import ModelConfig

    fields = meta.get("model") or (meta.get("config") or {}).get("model")
    if not isinstance(fields, dict):
        raise ValueError(f"{where}: its meta.json holds no model configuration (not a duet checkpoint?)")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in fields.items() if k in known})
    if cfg.name != "deepseek_v3":
        raise ValueError(f"{where}: model.name={cfg.name!r}; export writes the Hugging Face DeepSeek-V3 layout, "
                         f"allowed: deepseek_v3")
    return cfg


def tokenizer_files(meta: dict) -> list[Path]:
    """The run's tokenizer files (data.tokenizer, else a Hugging Face rl.tokenizer); [] when it trained its own."""
    from framework.data.hf_tokenizer import load_tokenizer

    config = meta.get("config") or {}
    data_tok = (config.get("data") or {}).get("tokenizer")
    rl_tok = meta.get("tokenizer") or (config.get("rl") or {}).get("tokenizer")
    for key, path in (("data.tokenizer", data_tok), ("rl.tokenizer", rl_tok)):
        if path and path != "char":
            return load_tokenizer(path, key).files
    return []


def export(checkpoint: str | Path, out: str | Path) -> Path:
    import torch

    from framework.checkpoint import Checkpointer
    from framework.models import build_model, save_pretrained

    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint={str(checkpoint)!r}: no such folder (expected <run>/checkpoints/step_N)")
    meta = Checkpointer.verify(checkpoint)
    cfg = model_config_of(meta, str(checkpoint))
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out={str(out)!r}: exists and is not empty (choose a new folder)")
    dtype = {"bfloat16": torch.bfloat16}.get(((meta.get("config") or {}).get("train") or {}).get("dtype"),
                                             torch.float32)
    model = build_model(cfg).to(dtype)
    Checkpointer.load(checkpoint, {f"model/{k}": v for k, v in model.state_dict().items()})
    files = tokenizer_files(meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        save_pretrained(model, str(tmp))
        for f in files:
            shutil.copy(f, tmp / ("tokenizer.json" if f.suffix == ".json" and f is files[0] else f.name))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or any(a.startswith("-") for a in args):
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    import warnings

    from framework.checkpoint import CheckpointError

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process reads: expected
    try:
        out = export(args[0], args[1])
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"exported {args[0]} -> {out}")


if __name__ == "__main__":
    main()
