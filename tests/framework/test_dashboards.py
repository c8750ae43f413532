"""Dashboard numbers against their definitions: exposed communication, optimizer bytes, MaxVio, memory, images."""
import json
import time

import pytest
import torch

from framework.dashboards import PANELS, comm_scalars, draw_expert_load, optimizer_bytes, rss_bytes
from framework.models.capabilities import max_vio
from framework.trainer import Trainer
from parallel.exchanges import TRACE, ExchangeRecord
from parallel.mesh import init_mesh
from tests.conftest import ROOT


def test_exposed_communication_fraction():
    since = time.perf_counter()
    TRACE.add(ExchangeRecord("old", 8, since - 10, since - 9, waited=1.0))          # before the step: ignored
    TRACE.add(ExchangeRecord("dispatch", 8, since + 1.0, since + 3.0, waited=0.5))    # 2 s in flight, 0.5 s waited
    TRACE.add(ExchangeRecord("combine", 8, since + 4.0, since + 5.0, waited=1.25))    # waited past its end: 1 s counts
    out = comm_scalars(since)
    assert out["comm/comm_s"] == pytest.approx(3.0) and out["comm/exposed_s"] == pytest.approx(1.5)
    assert out["comm/exposed_frac"] == pytest.approx(0.5)
    assert comm_scalars(since + 100) == {}


def test_optimizer_bytes_of_fp32_adamw_is_16():
    """weights 4 + gradients 4 + exp_avg 4 + exp_avg_sq 4 bytes per parameter (V3 §3.3.3's baseline)."""
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    opt = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert optimizer_bytes(opt, params) == {"optim/bytes_per_param": 16.0, "optim/moment_bytes_per_param": 8.0}

    class Managed:
        def memory_report(self):
            return {"total": 12.0, "moments": 4.0, "weights": 4.0}
    assert optimizer_bytes(Managed(), params) == {"optim/bytes_per_param": 12.0, "optim/moment_bytes_per_param": 4.0}


def test_rss_follows_an_allocation():
    current, peak = rss_bytes()
    big = torch.ones(64 * 2**20 // 4)          # 64 MiB, written (an mmap of its own: above glibc's threshold)
    after, peak_after = rss_bytes()
    assert after - current >= 0.9 * big.nbytes and peak_after >= after and peak >= current


def test_moe_training_reports_dashboards(make_cfg, tmp_path):
    cfg = make_cfg("model=deepseek_v3_tiny", "model.hidden_size=32", "model.num_hidden_layers=2",
                   "model.intermediate_size=64", "model.q_lora_rank=16", "model.kv_lora_rank=16",
                   "train.steps=4", "logging.dashboard_interval=2", out=tmp_path / "r")
    images = []

    class Images:
        def log_image(self, step, key, path):
            images.append((step, key, path))

    t = Trainer(cfg, init_mesh(1, 1, 1, "cpu"))
    t.metrics.sinks.append(Images())
    hist = t.fit()
    assert [(s, k) for s, k, _ in images] == [(1, "moe/expert_load"), (2, "moe/expert_load"), (4, "moe/expert_load")]
    assert all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for _, _, p in images)
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())}
    assert {s for s in rows if "optim/bytes_per_param" in rows[s]} == {1, 2, 4}
    assert rows[4]["optim/bytes_per_param"] == 16.0
    assert all(rows[s]["mem/rss_peak_gb"] >= rows[s]["mem/rss_gb"] > 0 for s in range(1, 5))
    loads = t.last_expert_loads                                      # the last step's [MoE layers, experts] counts
    assert loads.shape == (2, 8) and int(loads.sum()) == 2 * 8 * 32 * 2   # 2 routers x tokens x top-2
    assert hist[-1]["moe/maxvio_batch"] == pytest.approx(max_vio(loads).mean().item(), rel=1e-6)


def test_expert_load_heatmap(tmp_path):
    loads = torch.tensor([[10, 30, 20, 20], [0, 40, 40, 0]])
    draw_expert_load(loads, str(tmp_path / "h.png"), title="t")
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    assert max_vio(loads).tolist() == [0.5, 1.0]


def test_readme_documents_every_panel():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Dashboards"):]
    missing = [name for name in PANELS if f"`{name}`" not in section]
    assert missing == []
