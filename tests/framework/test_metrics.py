"""Metrics sinks: a failing dashboard never stops training, replayed steps are cut on resume, secrets are masked."""
import json

from framework.metrics import JsonlSink, Metrics, redact, secret_values, truncate_jsonl
from framework.trainer import Trainer
from parallel.mesh import init_mesh


class Boom:
    """A sink that fails like a W&B client losing its connection."""
    calls = 0

    def log(self, step, metrics):
        Boom.calls += 1
        raise ConnectionError("wandb: upload failed")

    def log_image(self, step, key, path):
        raise ConnectionError("wandb: upload failed")


class Record:
    def __init__(self):
        self.steps, self.images = [], []

    def log(self, step, metrics):
        self.steps.append(step)

    def log_image(self, step, key, path):
        self.images.append((step, key))


def test_failing_sink_is_dropped_and_training_finishes(make_cfg, tmp_path, capsys):
    t = Trainer(make_cfg("logging.dashboard_interval=0", out=tmp_path / "r"), init_mesh(1, 1, 1, "cpu"))
    rec = Record()
    Boom.calls = 0
    t.metrics.sinks[:0] = [Boom(), rec]
    hist = t.fit()
    assert [h["step"] for h in hist] == list(range(7))          # step 0 = first validation, then 6 steps
    assert Boom.calls == 1 and rec.steps == list(range(7))
    assert "Boom.log failed (ConnectionError: wandb: upload failed); sink disabled" in capsys.readouterr().err
    rows = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(7))


def test_image_sink_failure_is_contained():
    rec = Record()
    m = Metrics([Boom(), rec])
    m.log_image(3, "moe/expert_load", "x.png")
    m.log_image(4, "moe/expert_load", "y.png")
    assert rec.images == [(3, "moe/expert_load"), (4, "moe/expert_load")] and len(m.sinks) == 1


def test_truncate_on_resume_keeps_rows_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    for step in [0, 1, 2, 3, 4, 5]:
        sink.log(step, {"loss": float(step)})
    sink.close()
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')                               # the crash cut this line short
    JsonlSink(path, start_step=4).close()                         # resumed from the step-4 checkpoint
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [0, 1, 2, 3, 4]
    assert truncate_jsonl(path, 0) == 0 and path.read_text() == ""   # a fresh run starts an empty history


def test_redact_masks_secret_values_everywhere(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("HF_TOKEN", "hf_abcdef")
    monkeypatch.setenv("MY_TOKEN", "abc")                        # too short to be a secret worth masking
    monkeypatch.setenv("HOME_DIR_KEYS", "not-a-secret-name")
    secrets = secret_values()
    assert secrets["k" * 40] == "WANDB_API_KEY" and secrets["hf_abcdef"] == "HF_TOKEN"
    assert "abc" not in secrets and "not-a-secret-name" not in secrets
    cfg = {"logging": {"wandb": {"name": "run-" + "k" * 40}}, "tags": ["hf_abcdef", 3], "lr": 1e-3}
    assert redact(cfg) == {"logging": {"wandb": {"name": "run-<WANDB_API_KEY redacted>"}},
                           "tags": ["<HF_TOKEN redacted>", 3], "lr": 1e-3}
