"""Training entry point.

  python -m launch.train [hydra overrides]                                  one process
  torchrun --standalone --nproc-per-node=N -m launch.train [overrides]      N processes on this machine
  torchrun --nnodes=M --nproc-per-node=N --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT --rdzv-id=JOB \
           --max-restarts=R -m launch.train [overrides]                   M nodes (launch/multinode.sh, slurm.sbatch)
  python -m launch.train -m optim.lr=1e-3,3e-3                              a sweep: one run (and W&B run) per job,
                                                                            grouped under the sweep's id
Exit status: 2 for bad input (configuration, data, checkpoint), reported in one line naming the culprit before any
process group starts where possible; 1 when training aborts (non-finite steps); 3 when a rank hung or died.
"""
from __future__ import annotations

import logging
import os
import socket
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
        cfg = compose(config_name="config", overrides=user + ["train.output_dir=outputs/check"])
    if cfg.model.init_from:  # the architecture from its config.json (command-line keys win)
        from framework.models.init_from import apply_init_from
        apply_init_from(cfg, user)
    reject_added_fields(user, cfg)
    return cfg


def reject_added_fields(overrides: list[str], cfg) -> None:
    """Hydra's `+key=value` adds a key even to a typed group, so `+train.stpes=5` would be accepted and ignored. A key
    may be added only inside a free-form dict (model.rope_scaling, rl.rewards); anywhere else it must be a field."""
    import dataclasses

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    for o in OverridesParser.create().parse_overrides(overrides):
        if not o.is_add() and not o.is_force_add():
            continue
        parent_key, _, name = o.key_or_group.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        schema = OmegaConf.get_type(parent) if OmegaConf.is_config(parent) else None
        if schema is None or not dataclasses.is_dataclass(schema):
            continue
        fields = [f.name for f in dataclasses.fields(schema)]
        if name not in fields:
            from framework.config import ConfigError, _closest

            where = parent_key or "the top level"
            raise ConfigError(f"{o.input_line}: {where} has no key {name!r}{_closest(name, fields)}; '+' adds keys "
                              f"only to free-form dicts (model.rope_scaling, rl.rewards)")


def hydra_overrides() -> list[str]:
    """The command-line overrides of the running Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def setup_logging(run_dir: Path, rank: int) -> None:
    """Rank 0 talks on the console; every rank keeps its own log file (ranks never share a file), appended to across
    restarts, each line tagged with torchrun's restart count."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    fmt = logging.Formatter(f"%(asctime)s rank{rank} restart{restart} %(levelname)s %(message)s")
    fh = logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")
    fh.setFormatter(fmt)
    ch = logging.StreamHandler(sys.stdout)
    ch.setFormatter(logging.Formatter("%(message)s"))
    ch.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root = logging.getLogger()
    root.handlers[:] = [fh, ch]
    root.setLevel(logging.INFO)


def log_to_file(message: str) -> None:
    """Into this rank's log file only (the console already got it)."""
    record = logging.LogRecord("duet", logging.ERROR, __file__, 0, message, None, None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def scrub_secrets(run_dir: Path) -> None:
    """Hydra wrote the composed config before we ran: mask any secret an override interpolated into it."""
    from framework.metrics import redact

    for path in [*sorted((run_dir / ".hydra").glob("*.yaml")), run_dir.parent / "multirun.yaml"]:
        if path.is_file():
            text = path.read_text()
            clean = redact(text)
            if clean != text:
                path.write_text(clean)


def _is_fresh(run_dir: Path) -> bool:
    """Hydra creates the run folder (with .hydra/) before the config is validated: such a folder is this run's own."""
    try:
        return run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra"}
    except OSError:
        return False


_fresh_run_dir: Path | None = None   # the run folder when this run created it: removed again if the input is refused


def _drop_fresh_run_dir(run_dir: Path | None) -> None:
    """A refused run leaves nothing behind: the folder this run created goes, as long as it holds only what the run
    wrote while setting up (Hydra's .hydra/, the log files, an empty metrics file). A folder that held anything before
    this run started, or that training has written to (metrics rows, checkpoints), is left as it is."""
    import shutil

    if run_dir is None or not (run_dir == _fresh_run_dir or _is_fresh(run_dir)):
        return
    try:
        setup_only = all(p.name in (".hydra", "logs") or (p.name == "metrics.jsonl" and p.stat().st_size == 0)
                         for p in run_dir.iterdir())
    except OSError:
        return
    if setup_only:
        shutil.rmtree(run_dir, ignore_errors=True)


def report_bad_input(line: str) -> None:
    """Print the one line of a refused input, once per job: every rank of a torchrun job sees the same input, so
    only rank 0 prints it (the others keep it in their log file, if they have one), and a restarted attempt that
    fails with the same line stays quiet (torchrun --max-restarts would otherwise repeat it per restart)."""
    import hashlib
    import tempfile

    if int(os.environ.get("RANK", 0)) != 0:
        log_to_file(line)
        return
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    if job:
        digest = hashlib.sha256(f"{job}\n{line}".encode()).hexdigest()[:16]
        marker = Path(tempfile.gettempdir()) / f"duet-bad-input-{digest}"
        if marker.exists() and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            log_to_file(line)
            return
        try:
            marker.touch()
        except OSError:
            pass
    print(line, file=sys.stderr, flush=True)
    log_to_file(line)


def refuse(line: str, run_dir: Path | None = None) -> None:
    """Bad input: one line, no run folder left behind, exit status 2."""
    report_bad_input(line)
    if int(os.environ.get("RANK", 0)) == 0:
        _drop_fresh_run_dir(run_dir)
    sys.exit(2)


def run(cfg) -> list[dict]:
    """Validate, check the estimated memory, build the mesh, train. Returns the metric history (rank 0's view)."""
    global _fresh_run_dir
    from framework.config import ConfigError, validate
    from parallel.mesh import env_world, shutdown

    rank, world, _ = env_world()
    run_dir = Path(cfg.train.output_dir)
    _fresh_run_dir = run_dir if _is_fresh(run_dir) else None
    try:
        validate(cfg, world)
    except ConfigError as e:
        refuse(f"config error: {e}", run_dir)
    if cfg.train.memory_check:
        from framework.footprint import check_fits

        try:   # before any allocation, and before a process group: every rank reaches the same verdict
            check_fits(cfg, world, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        except ValueError as e:
            refuse(f"error: {e}", run_dir)
    try:
        setup_logging(run_dir, rank)
    except OSError as e:
        refuse(f"error: train.output_dir={str(run_dir)!r}: cannot write the run folder ({e.strerror or e})")
    if rank == 0:
        scrub_secrets(run_dir)
    log.info(f"rank {rank}/{world} on {socket.gethostname()} pid {os.getpid()}: run {cfg.run_id} in "
             f"{cfg.train.output_dir} (restart {os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')})")
    from framework.parallelize import build_mesh

    mesh = build_mesh(cfg)
    try:
        from framework.trainer import Trainer

        history = Trainer(cfg, mesh).fit()
        log.info(f"rank {rank}: finished at step {history[-1]['step'] if history else 0}")
    finally:
        shutdown()
    return history


def name_sweep_run(cfg) -> None:
    """In a Hydra sweep (-m) each job is its own W&B run, grouped under the sweep's id (the sweep folder's name)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return
    sweep = Path(hc.sweep.dir).name
    w = cfg.logging.wandb
    if w.group is None:
        w.group = sweep
    if w.name is None:
        w.name = f"{sweep}-{hc.job.num}"


def precheck(args: list[str]) -> None:
    """Compose the overrides before Hydra's own main does: a composition error (unknown key, wrong type, missing
    option) becomes one line and exit status 2. Sweeps and Hydra's informational flags are left to Hydra."""
    if any(a in ("-m", "--multirun", "--help", "-h", "--cfg", "-c", "--info") or a.startswith("--cfg") for a in args):
        return
    try:
        check_overrides([a for a in args if not a.startswith("-")])
    except Exception as e:
        refuse(f"config error: {_one_line(e)}")
    check_run_folder(args)


def check_run_folder(args: list[str]) -> None:
    """A run folder another live job holds is refused before Hydra writes its .hydra/ there (the trainer takes the
    lock itself; this only looks). Knowable here when hydra.run.dir is given or the run id comes from the launcher."""
    from framework.runlock import RunFolderLocked, RunLock

    given = [a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")]
    run_id = os.environ.get("DUET_RUN_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    run_dir = given[-1] if given else (f"outputs/{run_id}" if run_id else None)
    if run_dir is None or "${" in run_dir:
        return
    try:
        RunLock(run_dir, run_id or "").check_free()
    except RunFolderLocked as e:
        refuse(f"error: {e}")


def main() -> None:
    import hydra

    from framework.config import register_configs

    precheck(sys.argv[1:])
    register_configs()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def _main(cfg) -> None:
        name_sweep_run(cfg)
        try:
            if cfg.model.init_from:
                from framework.models.init_from import apply_init_from
                apply_init_from(cfg, hydra_overrides())
            run(cfg)
        except Exception as e:  # bad input and aborted training: one line, no traceback; anything else: traceback
            from framework.checkpoint import CheckpointError  # (imported here: a config error never loads torch)
            from framework.trainer import TrainingAborted

            if not isinstance(e, (ValueError, FileNotFoundError, CheckpointError, TrainingAborted)) \
                    or os.environ.get("DUET_TRACEBACK"):
                raise
            if not isinstance(e, TrainingAborted):
                refuse(f"error: {e}", Path(cfg.train.output_dir))
            print(f"training aborted: {e}", file=sys.stderr, flush=True)
            log_to_file(f"training aborted: {e}")
            sys.exit(e.exit_code)

    _main()


if __name__ == "__main__":
    main()
