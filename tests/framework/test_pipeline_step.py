"""The framework's models through every pipeline schedule vs. one process, in float64.

One spawned gloo group of 2 ranks and one of 4 run all the checks: the loss and every parameter gradient a rank
holds must equal the single-process gradient of the mean loss over the same global batch. Every weight (embedding,
norms, router, experts, MLA naive and absorbed, MTP, head) defers its gradient to W where a schedule splits B and W.
"""
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import ROOT, compose_cfg
from parallel.mesh import free_port

SCHEDULES = ("gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev")


def model_overrides(name: str) -> list[str]:
    common = ["data.vocab_size=300", "train.seq_len=8", "model.max_position_embeddings=16"]
    if name == "dense":
        return common + ["model=dense", "model.hidden_size=16", "model.num_hidden_layers=8", "model.num_attention_heads=2",
                         "model.intermediate_size=24"]
    moe = common + ["model=deepseek_v3_tiny", "model.hidden_size=16", "model.num_hidden_layers=8",
                    "model.expert_impl=loop", "model.moe_intermediate_size=8", "model.first_k_dense_replace=1",
                    "model.intermediate_size=24"]
    if name == "deepseek_v3_absorb":  # absorbed MLA: kv_b_proj's halves used per head, their gradients deferred too
        return moe + ["model.attn_impl=absorb"]
    # with a balance loss, earlier stages' share of it rides on their activation's gradient (AttachLoss)
    return moe + (["model.seq_aux_loss_alpha=0.01"] if name == "deepseek_v3_aux" else [])


def reference_grads(cfg, micro_batches, world_batches):
    from framework.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model).double()
    n = len(world_batches)
    total = 0.0
    for x, y in world_batches:
        loss, _ = model.compute_loss(x, y)
        (loss / n).backward()
        total += loss.item()
    return total / n, {name: p.grad for name, p in model.named_parameters()}


def check(mesh, cfg, label, compare_loss=True):
    from framework.models import build_model
    from framework.parallelize import mirror_pairs, parallelize
    from framework.train_step import PipelineStep
    from schedules import build
    from schedules.actions import COMM_OPS

    n = cfg.train.micro_batches
    g = torch.Generator().manual_seed(123)
    world_batches = [(torch.randint(0, 300, (2, 8), generator=g), torch.randint(0, 300, (2, 8), generator=g))
                     for _ in range(n * mesh.dp)]
    mine = world_batches[mesh.dp_rank * n:(mesh.dp_rank + 1) * n]
    torch.manual_seed(0)
    model = build_model(cfg.model).double()
    step = parallelize(model, cfg, mesh)
    # parallelize's pipeline: this schedule's actions, DualPipe's copies summed over the mesh's mirror groups
    assert isinstance(step, PipelineStep) and step.actions == build(cfg.parallel.schedule, mesh.pp, n)[mesh.pp_rank]
    assert (step.mirror is not None) == (cfg.parallel.schedule == "dualpipe"), label
    if step.mirror is not None:   # its exchanges run on the mesh's groups, one per duplicated part this rank holds
        groups = mesh.mirror_groups(mirror_pairs(cfg.parallel.schedule, mesh.pp))
        assert {id(b.group) for buckets in step.mirror.parts for b in buckets} == {id(g) for g in groups.values()}
        assert len(groups) == len(step.mirror.parts) == len(step.stages), label
    res = step.forward_backward(mine, trace=True)
    loss_sum, count = res.loss_sum, res.count
    # the traced timeline is this step's: one span per computing action, in list order
    assert [w for _, _, w in res.timeline[1] if not w.startswith("wait")] == \
        [str(a) for a in step.actions if a.op not in COMM_OPS], label
    t = torch.tensor([loss_sum, float(count)], dtype=torch.float64)
    dist.all_reduce(t)
    ref_loss, ref = reference_grads(cfg, None, world_batches)
    # the reported loss is the last stage's; a balance loss of earlier stages only shows in the gradients
    if compare_loss:
        assert abs(t[0] / t[1] - ref_loss) <= 1e-12 * abs(ref_loss), (label, float(t[0] / t[1]), ref_loss)
    checked = 0
    for name, p in step.named_parameters():
        assert p.grad is not None, (label, name)
        err = (p.grad - ref[name]).abs().max() / ref[name].abs().max().clamp_min(1e-30)
        assert err <= 1e-10, (label, name, float(err))
        checked += 1
    assert checked > 0
    # forward-only evaluation gives the same mean loss as the reference's forward
    with torch.no_grad():
        s, c = step.evaluate(mine)
    t = torch.tensor([s, float(c)], dtype=torch.float64)
    dist.all_reduce(t)
    if compare_loss:
        assert abs(t[0] / t[1] - ref_loss) <= 1e-12 * abs(ref_loss), (label, "eval")


def worker(rank, world, port, jobs, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        from parallel.mesh import init_mesh

        meshes = {}
        for pp, dp, model_name, schedule in jobs:
            if (pp, dp) not in meshes:
                meshes[(pp, dp)] = init_mesh(pp, dp, 1, "cpu")
            mesh = meshes[(pp, dp)]
            n = 2 * pp * (2 if schedule in ("dualpipe", "dualpipev") else 1)
            over = model_overrides(model_name) + [f"parallel.pp={pp}", f"parallel.dp={dp}",
                                                  f"parallel.schedule={schedule}", f"train.micro_batches={n}",
                                                  f"train.global_batch_size={2 * n * dp}"]
            if model_name != "dense" and schedule not in ("dualpipe", "dualpipev"):
                over.append("model.num_nextn_predict_layers=0")
            check(mesh, compose_cfg(*over), f"{model_name}/{schedule}/pp{pp}dp{dp}", model_name != "deepseek_v3_aux")
            dist.barrier()
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(world, jobs):
    errors = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(worker, args=(world, free_port(), jobs, errors), nprocs=world, join=True)
    except Exception:
        msgs = []
        while not errors.empty():
            msgs.append(errors.get())
        pytest.fail("\n".join(msgs) or "worker failed")


def models():
    return ["dense"] + (["deepseek_v3"] if (ROOT / "conf/model/deepseek_v3_tiny.yaml").exists() else [])


def test_two_ranks_every_schedule():
    jobs = [(2, 1, m, s) for m in models() for s in SCHEDULES]
    jobs += [(2, 1, "deepseek_v3_aux", s) for s in ("1f1b", "dualpipe")][: 2 * (len(models()) - 1)]
    jobs += [(2, 1, "deepseek_v3_absorb", s) for s in ("zb1p", "dualpipev")][: 2 * (len(models()) - 1)]
    spawn(2, jobs)


def test_four_ranks_pp4_and_pp2_dp2():
    jobs = [(4, 1, "dense", s) for s in SCHEDULES]
    jobs += [(2, 2, m, "dualpipe") for m in models()]
    jobs += [(4, 1, m, "dualpipe") for m in models()[1:]]
    spawn(4, jobs)
