"""A user's mistakes: one clear line (exit 2 on the command line), and
nothing written or changed."""

import contextlib
import errno
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lopt
from benchmarks.compare import main as compare_main
from lopt import cli
from meta_train.__main__ import RULES
from meta_train.__main__ import main as meta_train_main
from meta_train.trainer import MetaTrainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--net", "mlp", "--width", "4", "--family", "mlp-gmm", "--population", "1",
        "--truncation", "2", "--horizon", "2", "--outer-steps", "1", "--no-progress"]  # fmt: skip


def as_command(main, argv, prog="prog"):
    """``(exit status, stderr lines)`` of ``main(argv)`` run as its
    ``__main__`` block runs it."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.run(lambda: main(argv), prog)
        except SystemExit as e:
            code = e.code
    return code, [line for line in err.getvalue().splitlines() if line.strip()]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_usage_error(main, argv, message, prog="prog"):
    code, lines = as_command(main, argv, prog)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
    assert message in lines[0], lines


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--outer-steps", "-5"], "--outer-steps must be a whole number >= 1, got -5"),
        (["--outer-steps", "0"], "--outer-steps must be a whole number >= 1, got 0"),
        (["--family", "nope"], "--family: unknown 'nope'"),
        (["--family", "mlp-gm"], "did you mean mlp-gmm"),
        (["--family", "mlp-gmm=1,mlp-gm=1"], "--family: unknown task family 'mlp-gm'"),
        (["--family", "mlp-gmm=two"], "--family: family mixture 'mlp-gmm=two': each part"),
        (["--population", "0"], "--population must be a whole number >= 1"),
        (["--sigma", "-1"], "--sigma must be a finite number > 0"),
        (["--sigma", "nan"], "--sigma must be a finite number > 0"),
        (["--device", "gpu"], "--device must be a torch device"),
        (["--estimator", "sgd"], "invalid choice: 'sgd'"),
        (["--width", "four"], "invalid int value: 'four'"),
        (["--init-from", "no-such-net"], "--init-from: no optimizer checkpoint 'no-such-net'"),
        (["--term-schedule"], "--term-schedule reads the budget features: give --budget"),
        (["--orthogonal-snr"], "--orthogonal-snr scales the step of --orthogonal: give"),
        (["--budget", "--loss-anneal"], "--loss-anneal reads the loss features: give --loss-fe"),
        (["--meta-lr-decay-steps", "-1"], "--meta-lr-decay-steps must be a whole number >= 0"),
        (["--meta-lr-decay-steps", "4", "--meta-lr-final", "2"], "--meta-lr-final must be a"),
        (["--meta-lr-final", "0.5"], "--meta-lr-final is where --meta-lr-decay-steps ends"),
        (["--term-in-adam-units"], "--term-in-adam-units is a neuron statistic"),
        (["--tasks-per-step", "0"], "--tasks-per-step must be a whole number >= 1, got 0"),
        (["--population", "2", "--tasks-per-step", "3"],
         "--tasks-per-step 3 is more than --population 2: each task needs at least one"),
    ],
)  # fmt: skip
def test_meta_train_bad_flags(tmp_path, argv, message):
    out = tmp_path / "run"
    # A flag given twice: argparse keeps the last.
    assert_usage_error(meta_train_main, [*TINY, *argv, "--out", str(out)], message)
    assert not out.exists()


@pytest.mark.parametrize(
    "config,message",
    [
        ({"population": "eight"}, "--population must be a whole number >= 1, got 'eight'"),
        ({"population": 2.5}, "--population must be a whole number >= 1, got 2.5"),
        ({"neuron_stats": "yes"}, "--neuron-stats must be true or false, got 'yes'"),
        ({"freeze": "log_lr"}, "--freeze must be a list of strings"),
        ({"gain": "schedule.weight=10"}, "--gain must be a list of strings"),
        ({"budget_hidden": 2}, "--budget-hidden must be a number in [0, 1], got 2"),
        ({"populaton": 4}, "unknown option 'populaton'; did you mean population"),
    ],
)
def test_meta_train_bad_config_values(tmp_path, config, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "run"
    assert_usage_error(meta_train_main, ["--config", str(path), "--out", str(out)], message)
    assert not out.exists()
    path.write_text("[1, 2]")
    assert_usage_error(meta_train_main, ["--config", str(path), "--out", str(out)], "JSON object")


def test_an_existing_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    assert meta_train_main([*TINY, "--out", str(out)]) == 0
    before = snapshot(out)
    assert_usage_error(
        meta_train_main, [*TINY, "--out", str(out)], f"--out {out} already holds files"
    )
    assert snapshot(out) == before
    conflict = ["--resume", str(out), "--overwrite"]
    assert_usage_error(meta_train_main, conflict, "give one")
    assert snapshot(out) == before
    # --overwrite moves the old run aside, whole, and starts afresh.
    assert meta_train_main([*TINY, "--out", str(out), "--overwrite"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before
    assert len((out / "history.jsonl").read_text().splitlines()) == 1


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it(tmp_path):
    out = tmp_path / "run"
    assert meta_train_main([*TINY, "--out", str(out)]) == 0
    (out / "checkpoint.pt").unlink()
    assert meta_train_main(["--resume", str(out), "--no-progress"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 1


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "the file is empty (0 bytes"),
        (b"not a checkpoint" * 10, "not a readable checkpoint: corrupt, truncated or not a"),
    ],
)
def test_checkpoint_errors_say_what_is_wrong_in_plain_words(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        lopt.load(path)
    assert message in str(info.value) and "weights_only" not in str(info.value)
    # A resumed run whose checkpoint is damaged: one line, the file left as it was.
    out = tmp_path / "run"
    assert meta_train_main([*TINY, "--out", str(out)]) == 0
    (out / "checkpoint.pt").write_bytes(content)
    assert_usage_error(meta_train_main, ["--resume", str(out)], message)
    assert (out / "checkpoint.pt").read_bytes() == content


def test_a_file_holding_objects_is_refused_without_advice_to_load_it_unsafely(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"when": __import__("datetime").datetime(2020, 1, 1)}, path)
    with pytest.raises(ValueError) as info:
        lopt.load(path)
    text = str(info.value)
    assert "not loaded (loading them could run code)" in text and "weights_only" not in text


def test_model_that_does_not_hold_the_parameters_is_named():
    a, b = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), nn.Linear(3, 4)
    before = [p.detach().clone() for p in a.parameters()]
    with pytest.raises(ValueError, match=r"model= \(Linear\) does not hold 4 of the 4"):
        lopt.NFNOptimizer(a.parameters(), model=b)
    with pytest.raises(ValueError, match=r"group 0, parameter 2 \(2, 4\)"):
        lopt.NFNOptimizer(a.parameters(), model=a[0])
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
    lopt.NFNOptimizer(a[0].parameters(), model=a)  # a part of the model is fine


def test_a_run_of_skipped_steps_warns_once():
    model = nn.Linear(3, 2)
    opt = lopt.MLPOptimizer(model.parameters(), total_steps=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(opt.SKIPS_BEFORE_WARNING - 1):
            model.weight.grad = torch.full_like(model.weight, float("nan"))
            model.bias.grad = torch.zeros_like(model.bias)
            opt.step()
        assert not caught
        model.weight.grad = torch.zeros_like(model.weight)  # a good step resets the count
        opt.step()
        for _ in range(2 * opt.SKIPS_BEFORE_WARNING):
            model.weight.grad = torch.full_like(model.weight, float("inf"))
            opt.step()
    assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning)
    assert "5 steps in a row of parameter group 0 were skipped" in str(caught[0].message)
    assert caught[0].filename == __file__  # the line that called step()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--steps", "-5"], "--steps must be a whole number >= 1, got -5"),
        (["--steps", "0"], "--steps must be a whole number >= 1, got 0"),
        (["--quick", "--steps", "10"], "--quick runs 50 steps: drop --steps"),
        (["--suite", "nope"], "--suite: unknown suite 'nope'"),
        (["--seeds", "0"], "--seeds must be a whole number >= 1"),
    ],
)
def test_compare_bad_flags(tmp_path, argv, message):
    out = tmp_path / "cmp"
    assert_usage_error(compare_main, [*argv, "--out", str(out)], message)
    assert not out.exists()


def test_quickstart_bad_steps():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--steps", "-3"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "python examples/quickstart.py: error: --steps must be a whole number >= 1, got -3"
    )


def test_a_full_disk_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    from meta_train.estimators import make_estimator
    from meta_train.problems import LearnedOptimizerProblem
    from tasks import get_family

    net = lopt.PerParamMLP(width=4)
    problem = LearnedOptimizerProblem(net, get_family("mlp-gmm"), truncation=2, horizon=4)
    trainer = MetaTrainer(problem, make_estimator("pes"), pairs=1, out_dir=tmp_path,
                          checkpoint_every=0)  # fmt: skip
    trainer.train(2, progress=False)
    good = (tmp_path / "checkpoint.pt").read_bytes()

    def full_disk(obj, f):
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lopt.checkpoint.torch, "save", full_disk)
    trainer.outer_step()
    with pytest.raises(OSError, match="No space left on device"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "tb"]
    again = MetaTrainer(problem, make_estimator("pes"), pairs=1, out_dir=tmp_path)
    again.resume()
    assert again.step == 2


def test_the_command_line_reports_a_full_disk_in_one_line(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert meta_train_main([*TINY, "--out", str(out)]) == 0
    before = snapshot(out)

    def full_disk(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lopt.checkpoint.torch, "save", full_disk)
    code, lines = as_command(
        meta_train_main, ["--resume", str(out), "--outer-steps", "2", "--no-progress"]
    )
    assert code == 1 and len(lines) == 1, lines
    assert "No space left on device" in lines[0] and f"--resume {out}" in lines[0]
    monkeypatch.undo()
    assert before["checkpoint.pt"] == (out / "checkpoint.pt").read_bytes()


# ----------------------------------------------------------- property test
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 4),
    st.sampled_from([0.0, 0.5, -1.0, 2.0, float("nan"), float("inf")]),
    st.sampled_from(["", "mlp-gmm", "nope", "pes", "cpu", "nfn", "log", "x" * 3]),
    st.lists(st.sampled_from(["log_lr", "nope"]), max_size=2),
)
# Options whose valid values would make a run slow, or point elsewhere.
SKIP = {
    *("out", "init_from", "device", "outer_steps", "horizon", "horizon_max", "truncation"),
    *("population", "width", "eval_every", "eval_steps", "family", "eval_task", "vectorise"),
}


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    config=st.dictionaries(st.sampled_from(sorted(set(RULES) - SKIP)), VALUES, max_size=3),
    flags=st.lists(
        st.sampled_from(
            ["--outer-steps", "--population", "--horizon", "--sigma", "--bogus"]
        ).flatmap(lambda f: st.tuples(st.just(f), st.sampled_from(["-1", "0", "1", "2", "x"]))),
        max_size=2,
    ),
)
def test_any_arguments_either_run_or_exit_2_and_never_touch_a_run(tmp_path_factory, config, flags):
    """Random config values and flags: the command works (status 0) or says
    what is wrong in one line with status 2; an earlier run in the folder is
    never changed, and a new folder is only made by a run that works."""
    root = tmp_path_factory.mktemp("prop")
    existing = root / "existing"
    existing.mkdir()
    (existing / "checkpoint.pt").write_bytes(b"an earlier run's file")
    before = snapshot(existing)
    path = root / "c.json"
    path.write_text(json.dumps(config))
    argv = [*TINY, "--config", str(path), *(x for pair in flags for x in pair)]
    for out in (existing, root / "new"):
        code, lines = as_command(meta_train_main, [*argv, "--out", str(out)])
        assert code in (0, 2), (code, lines)
        if code == 2:
            assert len(lines) == 1 and lines[0].startswith("prog: error: "), lines
            if out != existing:
                assert not out.exists()
        assert snapshot(existing) == before
    assert code != 0 or (root / "new" / "optimizer.pt").exists()


# ------------------------------------------------------------- fault tests
def _checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _same(a, b) -> bool:
    """Equal nested checkpoints, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_reproduces_the_run(tmp_path):
    """Ten SIGKILLs at random points of a run (in a step, in a checkpoint
    write, before the first checkpoint), each followed by --resume: the
    final checkpoint equals the uninterrupted run's exactly."""
    import random
    import signal
    import time

    args = ["--net", "mlp", "--width", "4", "--family", "mlp-gmm", "--population", "2",
            "--truncation", "2", "--horizon", "6", "--outer-steps", "300",
            "--checkpoint-every", "1", "--no-progress"]  # fmt: skip
    command = [sys.executable, "-m", "meta_train"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run([*command, *args, "--out", str(ref)], check=True, env=env, cwd=ROOT,
                   capture_output=True)  # fmt: skip
    rng = random.Random(0)
    kills = 0
    while kills < 10:
        started = (run / "config.json").exists()
        argv = ["--resume", str(run), "--no-progress"] if started else [*args, "--out", str(run)]
        last = (run / "checkpoint.pt").stat().st_mtime_ns if (run / "checkpoint.pt").exists() else 0
        proc = subprocess.Popen([*command, *argv], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        # Wait for the run to make progress (a new checkpoint), unless this
        # kill is one of those that land before the first.
        deadline = time.time() + 60
        if kills % 4 != 3:
            while time.time() < deadline and proc.poll() is None:
                ck = run / "checkpoint.pt"
                if ck.exists() and ck.stat().st_mtime_ns != last:
                    break
                time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.2))
        if proc.poll() is not None:
            break  # finished before this kill: the run is complete
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills == 10, "the run finished before ten kills; make it longer"
    subprocess.run([*command, "--resume", str(run), "--no-progress"], check=True, env=env,
                   cwd=ROOT, capture_output=True)  # fmt: skip
    a, b = _checkpoint(ref / "checkpoint.pt"), _checkpoint(run / "checkpoint.pt")
    assert a["step"] == b["step"] == 300
    # What may differ: the wall time, and the folder the config names.
    for ck in (a, b):
        ck.pop("train_seconds", None)
        ck["config"].pop("out")
    assert [k for k in a if not _same(a[k], b.get(k))] == []
    net_a, _ = lopt.load(ref / "optimizer.pt")
    net_b, _ = lopt.load(run / "optimizer.pt")
    assert _same(net_a.state_dict(), net_b.state_dict())


def test_the_readmes_troubleshooting_lines_are_what_the_tools_print(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    block = text.split("## Troubleshooting", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "config.json").write_text("{}")
    (tmp_path / "c.json").write_text(json.dumps({"population": "eight"}))
    commands = [
        (meta_train_main, ["--outer-steps", "-5", "--out", "new"], "python -m meta_train"),
        (meta_train_main, ["--family", "mlp-gm", "--out", "new"], "python -m meta_train"),
        (meta_train_main, ["--config", "c.json", "--out", "new"], "python -m meta_train"),
        (meta_train_main, [*TINY, "--out", "runs/x"], "python -m meta_train"),
        (compare_main, ["--quick", "--steps", "10"], "python -m benchmarks.compare"),
    ]
    printed = []
    for main, argv, prog in commands:
        code, lines = as_command(main, argv, prog)
        assert code == 2
        printed += lines
    assert printed == block.strip().splitlines()
    assert not (tmp_path / "new").exists()
