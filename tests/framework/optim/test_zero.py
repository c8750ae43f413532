"""ZeRO-1 on spawned gloo groups of 2 and 4 ranks against the unsharded manager on the same averaged gradients.

One spawn per world size runs every case (all three moment formats, bf16 params with master weights, fp32 params
without, gradients reduced by the manager or already reduced by the caller), dense parameters sharded over all
ranks and experts over their expert-data-parallel group:
  world 2: experts 0-1 on rank 0, 2-3 on rank 1 (expert groups of size 1: not sharded); saves a DCP checkpoint
  world 4: experts 0-1 on ranks 0 and 2, 2-3 on ranks 1 and 3 (sharded over 2); loads the world-2 checkpoint
and this process loads the same checkpoint at world 1. Gradients are multiples of 2^-10 times powers of two, so
every sum and mean is exact in bf16 and fp32 and the comparisons can be torch.equal.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from framework.optim import OptimizerStateManager

DENSE = {"embed.weight": (96, 80), "norm.weight": (300,), "attn.wq.weight": (5000,), "attn.wo.weight": (40, 130)}
EXPERT_SHAPE = (64, 72)
EXPERTS = [f"experts.{e}.w1" for e in range(4)]
ALL = list(DENSE) + EXPERTS
CASES = {"fp32": ("fp32", "fp32", torch.float32), "bf16": ("bf16", "bf16", torch.bfloat16),
         "fp8": ("fp8", "fp8", torch.bfloat16), "fp8-fp32-params": ("fp8", "fp8", torch.float32),
         "bf16-prereduced": ("bf16", "bf16", torch.bfloat16)}
PREREDUCED = {"bf16-prereduced"}   # the caller reduces .grad itself (average_grads=False)
STEPS = 4
OPTIONS = dict(lr=1e-2, weight_decay=0.1, small_tensor_threshold=1000, bucket_numel=6000)


def schedule(step: int) -> float:
    return (step + 1) / 3 if step < 2 else 0.9 ** step


def ep_rank_of(name: str) -> int:
    """Experts 0-1 live on expert-parallel rank 0, experts 2-3 on rank 1."""
    return int(name.split(".")[1]) // 2


def model(names, dtype) -> list[tuple[str, torch.nn.Parameter]]:
    out = []
    for name in names:
        g = torch.Generator().manual_seed(ALL.index(name))
        p = torch.nn.Parameter((torch.randn(DENSE.get(name, EXPERT_SHAPE), generator=g) * 0.1).to(dtype))
        p._duet_expert = name in EXPERTS
        out.append((name, p))
    return out


def local_grad(name: str, step: int, rank: int) -> torch.Tensor:
    """k * 2^(e-10): k in [-64, 64) per rank, e in [-6, 6] per element and the same on every rank, so the mean over
    up to 4 ranks is exact in bf16 (8 significant bits) and fp32."""
    shape = DENSE.get(name, EXPERT_SHAPE)
    e = torch.randint(-6, 7, shape, generator=torch.Generator().manual_seed(1000 + ALL.index(name))).float()
    k = torch.randint(-64, 64, shape, generator=torch.Generator().manual_seed(step * 10007 + rank * 101 +
                                                                               ALL.index(name))).float()
    return k * torch.exp2(e - 10)


def holders(name: str, world: int) -> list[int]:
    return list(range(world)) if name in DENSE else [r for r in range(world) if r % 2 == ep_rank_of(name)]


def averaged_grad(name: str, step: int, world: int) -> torch.Tensor:
    """The gradient of the global mean loss, by parallel/data_parallel.py's rule: the sum over the replicas of the
    parameter, divided by the data-parallel size (an expert's local .grad already holds its peers' tokens)."""
    return sum(local_grad(name, step, r) for r in holders(name, world)) / world


def state_bytes(sd: dict) -> dict:
    """Compare fp8 codes by their bits (float8 has no torch.equal)."""
    return {k: v.detach().clone().view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v.detach().clone()
            for k, v in sd.items()}


# -- the spawned ranks -----------------------------------------------------------------------------------------------
def _worker(rank: int, world: int, init_file: str, out_dir: str, ckpt_root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    expert_groups = [dist.new_group([r for r in range(world) if r % 2 == e]) for e in range(2)]
    ep_rank = rank % 2
    names = list(DENSE) + [n for n in EXPERTS if ep_rank_of(n) == ep_rank]
    zero = dict(OPTIONS, dp_group=dist.group.WORLD, expert_dp_group=expert_groups[ep_rank])
    out = {"results": {}, "names": names}
    for case, (exp_avg, exp_avg_sq, dtype) in CASES.items():
        named = model(names, dtype)
        prereduced = case in PREREDUCED
        opt = OptimizerStateManager(named, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, average_grads=not prereduced,
                                    **zero)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        for step in range(STEPS):
            for n, p in named:
                grad = averaged_grad(n, step, world) if prereduced else local_grad(n, step, rank)
                p.grad = grad.to(dtype)
            opt.step()
            sched.step()
        rec = {"params": {n: p.detach().clone() for n, p in named}, "report": opt.memory_report(),
               "formats": opt.param_formats(), "state": state_bytes(opt.sharded_state_dict())}
        ckpt = os.path.join(ckpt_root, case)
        if world == 2:
            dcp.save({**opt.sharded_state_dict(), **{f"model/{n}": p.detach() for n, p in named}}, checkpoint_id=ckpt)
        else:  # resume the world-2 checkpoint here, then take one more step
            fresh = model(names, dtype)
            opt2 = OptimizerStateManager(fresh, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, average_grads=not prereduced,
                                         **zero)
            sd = opt2.sharded_state_dict(like=ckpt)
            sd.update({f"model/{n}": p.detach() for n, p in fresh})
            dcp.load(sd, checkpoint_id=ckpt)
            opt2.load_sharded_state_dict(sd)
            rec["loaded_state"] = state_bytes(opt2.sharded_state_dict())
            for n, p in fresh:
                p.grad = (averaged_grad(n, STEPS, world) if prereduced else local_grad(n, STEPS, rank)).to(dtype)
            opt2.step()
            rec["resumed_params"] = {n: p.detach().clone() for n, p in fresh}
        out["results"][case] = rec
    try:
        OptimizerStateManager(model(names, torch.float32), dp_group=dist.group.WORLD)
    except ValueError as e:
        out["expert_error"] = str(e)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def spawn(world: int, root, ckpt_root) -> list[dict]:
    out_dir = root / f"world{world}"
    out_dir.mkdir()
    mp.spawn(_worker, args=(world, str(root / f"init{world}"), str(out_dir), str(ckpt_root)), nprocs=world)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("zero_ckpt")


@pytest.fixture(scope="module")
def world2(tmp_path_factory, ckpt_root):
    return spawn(2, tmp_path_factory.mktemp("zero2"), ckpt_root)


@pytest.fixture(scope="module")
def world4(tmp_path_factory, ckpt_root, world2):   # needs the checkpoint written by world 2
    return spawn(4, tmp_path_factory.mktemp("zero4"), ckpt_root)


# -- the unsharded reference in this process -------------------------------------------------------------------------
def unsharded(case: str, world: int, steps: int = STEPS):
    exp_avg, exp_avg_sq, dtype = CASES[case]
    named = model(ALL, dtype)
    opt = OptimizerStateManager(named, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, **OPTIONS)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    for step in range(steps):
        for n, p in named:
            p.grad = averaged_grad(n, step, world).to(dtype)
        opt.step()
        sched.step()
    return named, opt


@pytest.mark.parametrize("world", [2, 4])
def test_zero1_equals_unsharded_on_averaged_grads(world, world2, world4):
    ranks = world2 if world == 2 else world4
    for case in CASES:
        named, _ = unsharded(case, world)
        ref = dict(named)
        for rank, out in enumerate(ranks):
            rec = out["results"][case]
            assert set(rec["params"]) == set(out["names"])
            for n, p in rec["params"].items():
                assert torch.equal(p, ref[n].detach()), (case, world, rank, n)


@pytest.mark.parametrize("world", [2, 4])
def test_memory_report_shows_states_divided_by_shards(world, world2, world4):
    ranks = world2 if world == 2 else world4
    numel = {n: torch.Size(DENSE.get(n, EXPERT_SHAPE)).numel() for n in ALL}
    for case, per_value in (("fp32", 4.0), ("bf16", 2.0)):
        for rank, out in enumerate(ranks):
            rec = out["results"][case]
            local = sum(numel[n] for n in out["names"])
            shards = {n: len(holders(n, world)) for n in out["names"]}
            assert all(rec["formats"][n]["shards"] == shards[n] for n in out["names"])
            # small tensors keep fp32 moments: 4 bytes per value
            ideal = sum(numel[n] / shards[n] * (4.0 if numel[n] < 1000 else per_value) for n in out["names"]) / local
            # the flat buffers pad each bucket to a multiple of the number of shards: < 0.1% here
            assert ideal <= rec["report"]["exp_avg"] <= ideal * 1.001, (case, rank)
            assert rec["report"]["exp_avg"] == rec["report"]["exp_avg_sq"]
            master, ideal_master = rec["report"]["master"], sum(4.0 * numel[n] / shards[n] for n in shards) / local
            assert master == 0.0 if case == "fp32" else ideal_master <= master <= ideal_master * 1.001
    fp8 = ranks[0]["results"]["fp8"]["report"]
    unpadded = sum(numel[n] / len(holders(n, world)) * (8 if numel[n] < 1000 else 2 + 8 / 128)
                   for n in ranks[0]["names"]) / sum(numel[n] for n in ranks[0]["names"])
    assert unpadded <= fp8["moments"] <= unpadded * 1.05      # fp8 blocks also pad each tensor to 128 values


def test_checkpoint_saved_at_dp2_loads_at_dp4_and_dp1(world2, world4, ckpt_root):
    for case, (exp_avg, exp_avg_sq, dtype) in CASES.items():
        saved = {}
        for out in world2:
            saved.update(out["results"][case]["state"])
        for out in world4:                        # dp=4 holds exactly what dp=2 saved
            loaded = out["results"][case]["loaded_state"]
            for k, v in loaded.items():
                assert torch.equal(v, saved[k]), (case, k)
        # dp=1: this process loads the same checkpoint; one more step on dp=4's averaged gradients
        named = model(ALL, dtype)
        opt = OptimizerStateManager(named, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, **OPTIONS)
        sd = opt.sharded_state_dict(like=str(ckpt_root / case))
        sd.update({f"model/{n}": p.detach() for n, p in named})
        dcp.load(sd, checkpoint_id=str(ckpt_root / case))
        opt.load_sharded_state_dict(sd)
        assert opt.step_count == STEPS
        for k, v in state_bytes(opt.sharded_state_dict()).items():
            assert torch.equal(v, saved[k]), (case, k)
        for n, p in named:
            p.grad = averaged_grad(n, STEPS, 4).to(dtype)
        opt.step()
        ref = dict(named)
        for out in world4:
            for n, p in out["results"][case]["resumed_params"].items():
                assert torch.equal(p, ref[n].detach()), (case, n)


def test_expert_params_need_an_expert_group(world2):
    assert "expert_dp_group=None but 'experts.0.w1' is an expert parameter" in world2[0]["expert_error"]
