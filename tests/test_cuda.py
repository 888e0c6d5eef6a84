"""The CUDA path against the CPU: the same numbers to float32 rounding.

Skipped where no GPU is present (CI has none); on a GPU machine run
``pytest tests/test_cuda.py``. TF32 is switched off here because it rounds
matrix products and convolutions to ~1e-3, far above float32's differences.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lopt
from lopt.nets import NFNNet
from meta_train import LearnedOptimizerProblem, MetaTrainer, make_estimator
from tasks import get_family, get_task
from tasks.runs import run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("weights", lopt.pretrained_names())
@pytest.mark.parametrize("task_name", ["mlp-digits", "cnn-digits"])
def test_shipped_optimizers_train_the_same_on_cuda(weights, task_name):
    kind = lopt.NFNOptimizer if weights.startswith("nfn") else lopt.MLPOptimizer
    losses = {}
    for device in ("cpu", "cuda"):
        task = get_task(task_name, device)
        curve = run(task, lambda m: kind(m.parameters(), weights=weights, model=m), 20, seed=0)
        losses[device] = torch.tensor(curve.train)
    assert losses["cuda"][-1] < losses["cuda"][0]
    # Rounding differences grow over the steps (2.5e-4 after 20 on an H200).
    torch.testing.assert_close(losses["cuda"], losses["cpu"], rtol=1e-3, atol=1e-5)


def test_bfloat16_parameters_on_cuda_keep_float32_state():
    task = get_task("mlp-digits", "cuda")
    model = task.module_with(task.init(torch.Generator().manual_seed(0))).to(torch.bfloat16)
    opt = lopt.NFNOptimizer(model.parameters(), weights="nfn-real", model=model)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(30):
        x, y = task.sample_batch(g)
        opt.zero_grad()
        loss = task.loss(dict(model.named_parameters()), (x.to(torch.bfloat16), y))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.bfloat16 and p.is_cuda for p in model.parameters())
    states = [s for s in opt.state.values() for s in s.values() if torch.is_tensor(s)]
    assert states and all(s.is_cuda and s.dtype == torch.float32 for s in states)
    assert sum(losses[-5:]) < sum(losses[:5])


def _first_outer_step(estimator: str, device: str):
    torch.manual_seed(0)
    net = NFNNet(width=4, depth=1, out_scale=1.0, step_mult=1e-2).to(device)
    problem = LearnedOptimizerProblem(
        net, get_family("mixed-family-small", device), truncation=3, horizon=6, seed=3
    )
    trainer = MetaTrainer(problem, make_estimator(estimator, 0.05), pairs=2, meta_lr=1e-2)
    metrics = trainer.outer_step()
    return metrics, trainer.theta.grad.cpu(), problem.task.name


@pytest.mark.parametrize("estimator", ["pes", "backprop"])
def test_meta_gradient_on_cuda_matches_the_cpu(estimator):
    cpu, grad_cpu, name = _first_outer_step(estimator, "cpu")
    cuda, grad_cuda, name_cuda = _first_outer_step(estimator, "cuda")
    assert name == name_cuda  # the same task was sampled
    assert cuda["meta_loss"] == pytest.approx(cpu["meta_loss"], rel=1e-5)
    torch.testing.assert_close(
        torch.tensor(cuda["inner_losses"]), torch.tensor(cpu["inner_losses"]), rtol=1e-5, atol=0
    )
    # ES divides loss differences by sigma, so rounding shows more there
    # (1.3e-3 on an H200).
    tol = 5e-3 if estimator == "pes" else 1e-4
    assert (grad_cuda - grad_cpu).norm() <= tol * grad_cpu.norm()


def test_cli_on_cuda_writes_a_net_that_loads_on_the_cpu(tmp_path):
    from meta_train.__main__ import main

    out = tmp_path / "run"
    args = ["--net", "nfn", "--width", "4", "--family", "mixed-family-small", "--device", "cuda"]
    args += ["--truncation", "2", "--horizon", "4", "--population", "2", "--eval-every", "2"]
    args += ["--eval-steps", "10", "--snapshot-every", "2", "--no-progress", "--out", str(out)]
    assert main(args + ["--outer-steps", "2"]) == 0
    assert main(["--resume", str(out), "--outer-steps", "3", "--no-progress"]) == 0
    net, meta = lopt.load(out / "optimizer.pt")
    assert meta["outer_steps"] == 3 and meta["device"] == "cuda"
    assert all(p.device.type == "cpu" for p in net.parameters())
    task = get_task("mlp-digits")
    curve = run(task, lambda m: lopt.NFNOptimizer(m.parameters(), net=net, model=m), 5, seed=0)
    assert all(torch.isfinite(torch.tensor(curve.train)))


def test_cli_run_on_cuda_resumes_on_the_cpu(tmp_path):
    # How a lent GPU's runs are finished on a CPU: --resume DIR --device cpu
    # goes on from the GPU's checkpoint as the run kept on the GPU does.
    from meta_train.__main__ import main

    args = ["--net", "nfn", "--width", "4", "--family", "mixed-family-small", "--budget"]
    args += ["--truncation", "2", "--horizon", "4", "--population", "4", "--no-progress"]
    moved, kept = tmp_path / "moved", tmp_path / "kept"
    assert main(args + ["--device", "cuda", "--outer-steps", "2", "--out", str(moved)]) == 0
    at_2 = lopt.load(moved / "optimizer.pt")[0]
    resume = ["--resume", str(moved), "--device", "cpu", "--outer-steps", "4", "--no-progress"]
    assert main(resume) == 0
    assert main(args + ["--device", "cuda", "--outer-steps", "4", "--out", str(kept)]) == 0
    net_moved, meta = lopt.load(moved / "optimizer.pt")
    net_kept = lopt.load(kept / "optimizer.pt")[0]
    assert meta["outer_steps"] == 4 and meta["device"] == "cpu" and net_moved.reads_budget

    def flat(net):
        return torch.nn.utils.parameters_to_vector(net.parameters()).detach()

    # PES divides by sigma, so device rounding can flip the sign of a few tiny
    # meta-gradient entries (a full meta step each); a lost estimator or
    # meta-optimizer state would move every entry.
    went = (flat(net_kept) - flat(at_2)).norm()
    assert went > 0 and (flat(net_moved) - flat(net_kept)).norm() <= 0.3 * went


@pytest.mark.parametrize("weights", ["nfn-real", "mlp-real"])
def test_whole_tensor_slices_on_cuda_match_the_chunked_cpu(weights):
    # 400 x 300 entries: two slices on the CPU (nets.CHUNK), one on a GPU.
    from lopt import nets

    assert nets.CHUNK < 400 * 300 <= nets.slice_entries(torch.device("cuda"))
    kind = lopt.NFNOptimizer if weights.startswith("nfn") else lopt.MLPOptimizer
    params = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(20, 400), torch.nn.ReLU(), torch.nn.Linear(400, 300)
        ).to(device)
        opt = kind(model.parameters(), weights=weights, model=model, fused=False)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g).to(device) * 1e-2
            opt.step()
        params[device] = [p.detach().cpu() for p in model.parameters()]
    for cpu, cuda in zip(params["cpu"], params["cuda"]):
        torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-6)


def _transformer_and_grads(seed: int):
    from tasks.models import TransformerLM

    torch.manual_seed(seed)
    model = TransformerLM(13, 8, 16, 4, 2).cuda()
    g = torch.Generator().manual_seed(seed)
    grads = [[torch.randn(p.shape, generator=g).cuda() * 1e-2 for p in model.parameters()]
             for _ in range(6)]  # fmt: skip
    return model, grads


@pytest.mark.parametrize("cls", [lopt.NFNOptimizer, lopt.MLPOptimizer])
def test_a_step_on_cuda_never_synchronises_with_the_host(cls):
    model, grads = _transformer_and_grads(0)
    opt = cls(model.parameters(), model=model, total_steps=100)
    for p, g in zip(model.parameters(), grads[0]):
        p.grad = g
    opt.step()  # the first step builds the plan and the state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # the skip count is read on every 5th step only
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("cls", [lopt.NFNOptimizer, lopt.MLPOptimizer])
def test_a_step_captured_in_a_cuda_graph_replays_as_eager_steps_do(cls):
    model, grads = _transformer_and_grads(1)
    twin = copy.deepcopy(model)
    eager = cls(twin.parameters(), model=twin, total_steps=100)
    opt = cls(model.parameters(), model=model, total_steps=100)
    static = [torch.zeros_like(p) for p in model.parameters()]
    for p, s in zip(model.parameters(), static):
        p.grad = s
    for step in range(6):
        for s, g in zip(static, grads[step]):
            s.copy_(g)
        for p, g in zip(twin.parameters(), grads[step]):
            p.grad = g.clone()
        eager.step()
        if step < 2:  # warm-up on a side stream, as torch.cuda.graphs asks
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                opt.step()
            torch.cuda.current_stream().wait_stream(side)
        elif step == 2:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
            graph.replay()
        else:
            graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
