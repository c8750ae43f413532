"""framework.parallelize in one process: the step function it returns, the surgery it applies, the combinations it
refuses (one line, before it changes the model), and the training capabilities the trainer reaches models through.

The pipeline side (a PipelineStep with this schedule's actions and, for DualPipe, the mesh's mirror groups) is
checked in the spawned groups of tests/framework/test_pipeline_step.py; the groups themselves in tests/parallel.
"""
import copy

import pytest
import torch

from framework.models import build_model
from framework.models.capabilities import TrainingCapabilities
from framework.parallelize import parallelize
from framework.train_step import LocalStep, StepOutput
from framework.trainer import Trainer
from parallel.mesh import Mesh, init_mesh
from tests.conftest import compose_cfg

DENSE = ["model=dense", "data.vocab_size=300", "model.hidden_size=16", "model.num_hidden_layers=2",
         "model.num_attention_heads=2", "model.intermediate_size=24", "train.seq_len=8",
         "model.max_position_embeddings=16"]
MOE = ["model=deepseek_v3_tiny", "model.hidden_size=32", "model.num_hidden_layers=2", "model.intermediate_size=64",
       "model.q_lora_rank=16", "model.kv_lora_rank=16"]


def fake_mesh(pp=1, dp=1, ep=1) -> Mesh:
    """A mesh as rank 0 of a pp x dp job would see it, without process groups: parallelize refuses before it needs
    one."""
    return Mesh(0, pp * dp, pp, dp, ep, 0, 0, torch.device("cpu"))


def batches(n=2):
    g = torch.Generator().manual_seed(7)
    return [(torch.randint(0, 300, (2, 8), generator=g), torch.randint(0, 300, (2, 8), generator=g)) for _ in range(n)]


def test_pp1_is_a_local_step_with_the_models_own_loss_and_gradients():
    cfg = compose_cfg(*DENSE)
    torch.manual_seed(0)
    model = build_model(cfg.model).double()
    ref = copy.deepcopy(model)
    step = parallelize(model, cfg, init_mesh(1, 1, 1, "cpu"))
    assert type(step) is LocalStep
    out = step.forward_backward(batches(), trace=True)
    total = 0.0
    for x, y in batches():
        loss, _ = ref.compute_loss(x, y)
        (loss / 2).backward()
        total += loss.item()
    assert isinstance(out, StepOutput) and out.count == 2 and out.timeline is None   # one process: no timeline
    assert out.loss_sum == total and out.metrics["loss/main"] == pytest.approx(total / 2, rel=1e-15)
    grads = dict(ref.named_parameters())
    assert all(torch.equal(p.grad, grads[n].grad) for n, p in step.named_parameters())


def test_fp8_swap_is_the_one_convert_to_fp8_makes():
    from framework.fp8 import convert_to_fp8

    cfg = compose_cfg(*DENSE, "fp8.enabled=true", "fp8.backend=torch")
    model = build_model(cfg.model)
    ref = copy.deepcopy(model)
    swapped = convert_to_fp8(ref, exclude=list(cfg.fp8.exclude), backend="torch")
    parallelize(model, cfg, init_mesh(1, 1, 1, "cpu"))
    kinds = lambda m: {n: type(x).__name__ for n, x in m.named_modules()}  # noqa: E731
    assert swapped and kinds(model) == kinds(ref)
    assert {kinds(model)[n] for n in swapped} == {"Fp8Linear"}


def refusal(model, cfg, mesh) -> str:
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError) as e:
        parallelize(model, cfg, mesh)
    assert {n: type(m) for n, m in model.named_modules()} == before      # refused before any surgery
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unsupported_combinations_fail_in_one_line_before_any_surgery():
    fp8 = ["fp8.enabled=true", "fp8.backend=torch"]
    dense = build_model(compose_cfg(*DENSE).model)
    # a mesh built for another layout
    msg = refusal(dense, compose_cfg(*DENSE, *fp8, "parallel.pp=2", "parallel.schedule=1f1b"), fake_mesh())
    assert msg.startswith("parallel.pp=2: the mesh was built with 1;"), msg
    msg = refusal(dense, compose_cfg(*DENSE, *fp8, "parallel.dp=2"), fake_mesh(dp=4))
    assert msg.startswith("parallel.dp=2: the mesh was built with 4;"), msg
    # expert parallelism of a model without experts, found by capability rather than by name
    msg = refusal(dense, compose_cfg(*DENSE, *fp8, "parallel.dp=2", "parallel.ep=2"), fake_mesh(dp=2, ep=2))
    assert msg == "parallel.ep=2: DenseLM has no MoE layers to shard; use parallel.ep=1", msg
    # multi-token prediction reads the embedding: 1F1B puts the first and last stages on different ranks
    moe_cfg = compose_cfg(*MOE, *fp8, "parallel.pp=2", "parallel.schedule=1f1b", "train.micro_batches=4")
    msg = refusal(build_model(moe_cfg.model), moe_cfg, fake_mesh(pp=2))
    assert msg.startswith("parallel.schedule=1f1b: multi-token prediction needs the embedding"), msg
    # a schedule that cannot run the asked number of micro-batches
    msg = refusal(dense, compose_cfg(*DENSE, "parallel.pp=2", "parallel.schedule=dualpipe", "train.micro_batches=2"),
                  fake_mesh(pp=2))
    assert "micro" in msg, msg

    class Bare(torch.nn.Module):       # a model that does not say what the trainer may ask of it
        pass
    msg = refusal(Bare(), compose_cfg(*DENSE), fake_mesh())
    assert msg.startswith("model Bare: lacks set_progress, moe_layers, expert_loads, update_balance"), msg


def test_dense_and_moe_models_go_through_the_same_trainer_code(make_cfg, tmp_path):
    """Balancing, expert loads and MaxVio are reached through the capabilities: the dense model has none, the V3 bias
    update equals a direct call of the balancing rule on the step's loads."""
    from framework.models.deepseek_v3 import balance

    dense = Trainer(make_cfg(out=tmp_path / "dense"), init_mesh(1, 1, 1, "cpu"))
    assert isinstance(dense.model, TrainingCapabilities) and dense.model.moe_layers() == 0
    out = dense.train_step(dense.sampler.next_batch())
    assert dense.last_expert_loads is None and not [k for k in out if k.startswith("moe/")]

    cfg = make_cfg(*MOE, out=tmp_path / "moe")
    t = Trainer(cfg, init_mesh(1, 1, 1, "cpu"))
    assert isinstance(t.model, TrainingCapabilities) and t.model.moe_layers() == 2   # layer 1 and the MTP depth
    before = copy.deepcopy(t.model)
    out = t.train_step(t.sampler.next_batch())
    loads = t.last_expert_loads
    assert loads.shape == (2, 8) and int(loads.sum()) == 2 * 8 * 32 * 2    # 2 routers x tokens x top-2
    balance.update_biases(before, loads, cfg.model.bias_update_rate)      # u = 1e-3 at step 1 of 6
    biases = [r.e_score_correction_bias for r in balance.routers(t.model)]
    assert all(torch.equal(b, r.e_score_correction_bias) for b, r in zip(biases, balance.routers(before)))
    assert all(b.abs().max() == cfg.model.bias_update_rate for b in biases)   # they moved, by u each
    assert int(t.model.expert_loads().sum()) == 0                         # the counts restart after the update
    mean = loads.double().mean(-1)
    assert out["moe/maxvio_batch"] == pytest.approx(((loads.double().amax(-1) - mean) / mean).mean().item(), rel=1e-6)
    # u = 0 from bias_update_stop_fraction (1.0) of the steps on
    t.model.update_balance(loads, cfg.train.steps, cfg.train.steps)
    assert all(torch.equal(b, r.e_score_correction_bias) for b, r in zip(biases, balance.routers(before)))
