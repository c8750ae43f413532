"""Training entry point.

  python -m launch.train [hydra overrides]                                  one process
  torchrun --standalone --nproc-per-node=N -m launch.train [overrides]      N processes on this machine
Configuration problems are reported in one line naming the key, with exit status 2, before any process group starts.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("duet")


def _one_line(err: BaseException) -> str:
    """The first useful line of a Hydra/OmegaConf composition error, with the key it concerns."""
    from omegaconf.errors import OmegaConfBaseException

    e: BaseException | None = err
    while e is not None:
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            msg = str(getattr(e, "msg", "") or e).strip().splitlines()[0]
            return f"{e.full_key}: {msg}"
        e = e.__cause__ or e.__context__
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[1].startswith("Available options"):
        return f"{lines[0]}; available: {', '.join(lines[2:])}"
    return lines[0] if lines else type(err).__name__


def check_overrides(overrides: list[str]) -> object:
    """Compose the config as Hydra will, so a bad key or type fails here in one line."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from framework.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        user = [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]
        # outside a Hydra job ${hydra:...} does not resolve; the real run sets it
        return compose(config_name="config", overrides=user + ["train.output_dir=outputs/check"])


def setup_logging(run_dir: Path, rank: int) -> None:
    """Rank 0 talks on the console; every rank keeps its own log file (ranks never share a file)."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(message)s")
    fh = logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")
    fh.setFormatter(fmt)
    ch = logging.StreamHandler(sys.stdout)
    ch.setFormatter(logging.Formatter("%(message)s"))
    ch.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root = logging.getLogger()
    root.handlers[:] = [fh, ch]
    root.setLevel(logging.INFO)


def run(cfg) -> list[dict]:
    """Validate, build the mesh, train. Returns the metric history (rank 0's view)."""
    from framework.config import ConfigError, validate
    from parallel.mesh import env_world, init_mesh, shutdown

    rank, world, _ = env_world()
    try:
        validate(cfg, world)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    setup_logging(Path(cfg.train.output_dir), rank)
    p = cfg.parallel
    mesh = init_mesh(p.pp, p.dp, p.ep, cfg.train.device, p.backend, p.timeout_s, p.comm.sm_budget)
    try:
        from framework.trainer import Trainer

        step_factory = None
        if p.pp > 1:
            from framework.step import PipelineStep
            step_factory = PipelineStep
        history = Trainer(cfg, mesh, step_factory).fit()
    finally:
        shutdown()
    return history


def main() -> None:
    import hydra

    from framework.config import register_configs

    args = sys.argv[1:]
    if not any(a in ("-m", "--multirun", "--help", "-h", "--cfg", "-c", "--info") or a.startswith("--cfg")
               for a in args):
        try:
            check_overrides([a for a in args if not a.startswith("-")])
        except Exception as e:  # composition errors: unknown key, wrong type, missing option
            print(f"config error: {_one_line(e)}", file=sys.stderr, flush=True)
            sys.exit(2)
    register_configs()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def _main(cfg) -> None:
        try:
            run(cfg)
        except (ValueError, FileNotFoundError) as e:  # bad data / checkpoint / launch input: one line, exit 2
            if os.environ.get("DUET_TRACEBACK"):
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    _main()


if __name__ == "__main__":
    main()
