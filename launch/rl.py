"""Post-training entry point: the R1-Zero-like loop on the embedded arithmetic task.

  python -m launch.rl [hydra overrides]                                 one process (what `make rl` runs)
  torchrun --standalone --nproc-per-node=N -m launch.rl [overrides]     data parallel over N processes

Stages: SFT of a tiny model on the task's format (rl.sft_steps; a noisy mix of reasoning, direct and broken
completions, so the policy starts neither at 0% nor at 100%), evaluation on held-out problems, GRPO with rule-based
rewards (rl.grpo_steps), evaluation again. The run folder (train.output_dir, outputs/<run_id> by default) receives
metrics.jsonl, reward_curve.png, length_curve.png, summary.json and checkpoints/step_*/ (after SFT and after GRPO;
rl.init=<that folder> starts another run from it, launch.sample reads it).

Unless a model preset is chosen (model=...), a tiny dense model is used: RL_MODEL_DEFAULTS below, each overridable
(model=deepseek_v3_tiny post-trains the DeepSeek-V3 architecture instead; its MTP depths are not trained here).
On CPU the process uses one intra-op thread unless OMP_NUM_THREADS says otherwise: these models are too small for
threading to pay, and on a busy machine extra threads make every step many times slower.
Distillation: `python -m launch.sample` writes a checkpoint's completions as JSONL; `rl.sft_data=<it>` fine-tunes on it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

RL_MODEL_DEFAULTS = ["model=dense", "model.hidden_size=128", "model.num_hidden_layers=3",
                     "model.num_attention_heads=4", "model.intermediate_size=384", "model.max_position_embeddings=256"]


def with_defaults(overrides: list[str]) -> list[str]:
    """The tiny dense model's settings first (later overrides win), unless the command line picks a model preset
    (model=deepseek_v3_tiny, ...) or a Hugging Face folder (model.init_from=...): then that model as it is."""
    if any(o.startswith(("model=", "+model=", "model.init_from=")) for o in overrides):
        return list(overrides)
    return RL_MODEL_DEFAULTS + list(overrides)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints of a post-trained policy
# ---------------------------------------------------------------------------------------------------------------------

def save_policy(ckpt, step: int, model, model_cfg, cfg, stage: str, extra: dict | None = None) -> Path:
    from framework.config import to_container

    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    meta = {"stage": stage, "model": dataclasses.asdict(model_cfg), "tokenizer": cfg.rl.tokenizer,
            "config": to_container(cfg), **(extra or {})}
    return ckpt.save(step, tensors, meta)


def load_policy(folder: str | Path, device=None):
    """-> (model, model_cfg, meta) of a launch.rl checkpoint folder (step_*/), the architecture read from its meta."""
    import torch

    from framework.checkpoint import Checkpointer, check_complete
    from framework.config import ModelConfig
    from framework.models import build_model

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"rl.init={str(folder)!r}: no such checkpoint folder")
    meta = check_complete(folder)
    if "model" not in meta:
        raise ValueError(f"rl.init={str(folder)!r}: not a launch.rl checkpoint (its meta.json has no 'model')")
    model_cfg = ModelConfig(**meta["model"])
    model = build_model(model_cfg).to(device or torch.device("cpu"))
    Checkpointer.load(folder, {f"model/{k}": v for k, v in model.state_dict().items()}, verified=meta)
    return model, model_cfg, meta


# ---------------------------------------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------------------------------------

def plot_curves(history: list[dict], run_dir: Path) -> list[Path]:
    """reward_curve.png (mean reward and accuracy per GRPO round) and length_curve.png (mean response length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return []
    x = [h["round"] for h in history]
    out = []
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(x, [h["reward/mean"] for h in history], label="mean reward")
    ax.plot(x, [h["accuracy"] for h in history], label="accuracy (sampled)")
    ax.plot(x, [h["format_rate"] for h in history], label="format rate", alpha=0.6)
    ax.set_xlabel("GRPO round")
    ax.set_title("GRPO reward on training prompts")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.append(run_dir / "reward_curve.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(x, [h["response_length"] for h in history])
    ax.set_xlabel("GRPO round")
    ax.set_ylabel("tokens")
    ax.set_title("mean response length")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.append(run_dir / "length_curve.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------

def _broadcast_parameters(model, group=None) -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size(group) > 1:
        for t in model.state_dict().values():
            dist.broadcast(t, src=0, group=group)


def post_train(cfg, mesh) -> dict:
    """SFT -> eval -> GRPO -> eval on this rank. Returns the summary (the same dict on every rank)."""
    import torch
    from omegaconf import OmegaConf

    from framework.checkpoint import Checkpointer
    from framework.config import to_container
    from framework.metrics import build_metrics
    from framework.models import build_model
    from framework.rl import rewards as rewards_mod
    from framework.rl.grpo import GRPO, evaluate
    from framework.rl.sft import run_sft
    from framework.rl.task import ArithmeticTask, build_tokenizer, load_jsonl

    rl, t = cfg.rl, cfg.train
    rank, world, group, device = mesh.rank, mesh.world_size, mesh.dp_group, mesh.device
    torch.manual_seed(t.seed)
    tok = build_tokenizer(rl.tokenizer)
    task = ArithmeticTask.from_config(rl)
    run_dir = Path(t.output_dir)
    if rl.init:
        model, model_cfg, meta = load_policy(rl.init, device)
        if model_cfg.vocab_size < tok.vocab_size or (rl.tokenizer == "char" and model_cfg.vocab_size != tok.vocab_size):
            raise ValueError(f"rl.init={rl.init!r}: its vocabulary ({model_cfg.vocab_size}) is not the "
                             f"{rl.tokenizer} tokenizer's ({tok.vocab_size})")
        if rank == 0:
            print(f"starting from {rl.init} ({meta.get('stage', '?')} checkpoint)", flush=True)
    elif cfg.model.init_from:  # a Hugging Face model: its own vocabulary, which must cover the tokenizer's
        from framework.models.init_from import load_init_from

        model_cfg = OmegaConf.to_object(cfg.model)
        if model_cfg.vocab_size < tok.vocab_size:
            raise ValueError(f"model.init_from={cfg.model.init_from!r}: vocab_size={model_cfg.vocab_size} is smaller "
                             f"than rl.tokenizer={rl.tokenizer!r}'s {tok.vocab_size} tokens")
        model = build_model(model_cfg)
        load_init_from(model, cfg.model.init_from)
        model = model.to(device)
    else:
        model_cfg = dataclasses.replace(OmegaConf.to_object(cfg.model), vocab_size=tok.vocab_size)
        model = build_model(model_cfg).to(device)
    _broadcast_parameters(model, group)
    n_params = sum(p.numel() for p in model.parameters())

    log_cfg = OmegaConf.merge(cfg.logging, {"console": "none"})  # the console lines are printed here
    total_steps = rl.sft_steps + rl.grpo_steps
    metrics = build_metrics(log_cfg, run_dir, rank, total_steps, 0, to_container(cfg))
    ckpt = Checkpointer(run_dir / "checkpoints", t.keep_checkpoints)
    eval_problems = task.problems(rl.eval_problems, seed=t.seed + 7, heldout=True)
    summary: dict = {"model": model_cfg.name, "parameters": n_params, "world_size": world}
    if rank == 0:
        print(f"post-training a {model_cfg.name} model of {n_params / 1e6:.2f}M parameters on {world} process(es); "
              f"run folder {run_dir}", flush=True)

    def both_evals(tag: str, step: int) -> dict:
        res = {"greedy" if rl.eval_temperature == 0 else f"t{rl.eval_temperature:g}":
               evaluate(model, tok, eval_problems, rl, rl.eval_temperature, rank, world, group, t.seed),
               "sampled_t1": evaluate(model, tok, eval_problems, rl, 1.0, rank, world, group, t.seed)}
        metrics.log(step, {f"eval/{tag}/{mode}/{k}": v for mode, r in res.items() for k, v in r.items()})
        if rank == 0:
            for mode, r in res.items():
                print(f"eval {tag:6s} {mode:10s} accuracy {r['accuracy']:.3f} | format {r['format_rate']:.3f} | "
                      f"reasoning {r['reason_rate']:.3f} | length {r['response_length']:.1f} "
                      f"({int(r['problems'])} held-out problems)", flush=True)
        return res

    try:
        t0 = time.perf_counter()
        if rl.sft_steps:
            if rl.sft_data:
                examples = load_jsonl(rl.sft_data)
            else:
                examples = task.sft_examples(rl.sft_examples, t.seed, rl.sft_reason_fraction,
                                             rl.sft_bad_format_fraction, rl.sft_wrong_fraction)
            every = max(cfg.logging.log_interval, rl.sft_steps // 10)
            hist = run_sft(model, tok, examples, rl, cfg.optim, metrics, rank, world, group, t.seed, 0, every, device)
            summary["sft"] = {"steps": rl.sft_steps, "examples": len(examples), "final_loss": hist[-1]["sft/loss"],
                              "seconds": time.perf_counter() - t0}
            save_policy(ckpt, rl.sft_steps, model, model_cfg, cfg, "sft")
        summary["before"] = both_evals("before", rl.sft_steps)

        history = []
        if rl.grpo_steps:
            t1 = time.perf_counter()
            grpo = GRPO(model, tok, task, rewards_mod.from_config(rl), rl, cfg.optim, rank, world, group, t.seed)
            every = max(1, min(cfg.logging.log_interval, rl.grpo_steps // 20))
            for r in range(1, rl.grpo_steps + 1):
                m = grpo.step()
                history.append({"round": r, **m})
                metrics.log(rl.sft_steps + r, {f"grpo/{k}": v for k, v in m.items()})
                if rank == 0 and (r % every == 0 or r == rl.grpo_steps or r == 1):
                    print(f"grpo round {r}/{rl.grpo_steps} | reward {m['reward/mean']:.3f} | accuracy "
                          f"{m['accuracy']:.3f} | format {m['format_rate']:.3f} | length {m['response_length']:.1f}"
                          f" | kl {m['kl']:.4f} | clip {m['clip_fraction']:.4f} | entropy {m['entropy']:.3f} | "
                          f"skipped groups {int(m['groups/skipped'])} | {m['sampling/tokens_per_s']:.0f} tok/s",
                          flush=True)
            summary["grpo"] = {"rounds": rl.grpo_steps, "seconds": time.perf_counter() - t1,
                               "sampling_tokens_per_s": sum(h["sampling/tokens_per_s"] for h in history) / len(history),
                               "reward_errors": {k: v for k, v in grpo.rewards.errors.items()}}
            save_policy(ckpt, total_steps, model, model_cfg, cfg, "grpo")
        summary["after"] = both_evals("after", total_steps)
        summary["seconds"] = time.perf_counter() - t0
        if rank == 0:
            for p in plot_curves(history, run_dir):
                metrics.log_image(total_steps, f"curves/{p.stem}", str(p))
            (run_dir / "grpo_history.json").write_text(json.dumps(history, indent=1))
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            for mode in summary["before"]:
                b, a = summary["before"][mode]["accuracy"], summary["after"][mode]["accuracy"]
                print(f"held-out accuracy ({mode}): before GRPO {b:.3f} -> after GRPO {a:.3f} "
                      f"({100 * (a - b):+.1f} points)", flush=True)
    finally:
        metrics.close()
    return summary


def run(cfg) -> dict:
    """Validate, build the mesh, post-train."""
    import torch

    from framework.config import ConfigError, validate
    from framework.rl.config import validate_rl_run
    from parallel.mesh import env_world, init_mesh, shutdown

    rank, world, _ = env_world()
    try:
        validate(cfg, world)
        validate_rl_run(cfg.rl, cfg.model, cfg.parallel, world)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    if world == 1:  # DCP notes at every save that it runs without a process group: expected here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    p = cfg.parallel
    mesh = init_mesh(1, p.dp, 1, cfg.train.device, p.backend, p.timeout_s)
    try:
        return post_train(cfg, mesh)
    finally:
        shutdown()


def main() -> None:
    import hydra

    from framework.config import register_configs
    from launch.train import CONF_DIR, precheck

    args = with_defaults(sys.argv[1:])
    precheck(args)
    sys.argv = sys.argv[:1] + args
    register_configs()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def _main(cfg) -> None:
        try:
            if cfg.model.init_from:
                from framework.models.init_from import apply_init_from
                from launch.train import hydra_overrides
                apply_init_from(cfg, hydra_overrides())
            run(cfg)
        except (ValueError, FileNotFoundError) as e:  # bad data / checkpoint: one line, exit 2
            if os.environ.get("DUET_TRACEBACK"):
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    _main()


if __name__ == "__main__":
    main()
