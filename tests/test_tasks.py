"""Tasks, task families, datasets and the registry."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

import tasks
from tasks import data
from tasks.families import SUITES, CNNFamily, MixtureFamily, MLPFamily
from tasks.models import cnn, mlp


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_same_seed_same_batches_and_inits():
    task = tasks.get_task("mlp-digits")
    a, b = task.init(gen(1)), task.init(gen(1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["1.weight"], task.init(gen(2))["1.weight"])
    xa, ya = task.sample_batch(gen(3))
    xb, yb = task.sample_batch(gen(3))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.shape == (task.batch_size, 1, 8, 8) and ya.shape == (task.batch_size,)
    fam = tasks.get_family("mixed-family-small")
    names = [fam.sample(gen(4)).name for _ in range(1)] + [fam.sample(gen(5)).name]
    again = [fam.sample(gen(4)).name, fam.sample(gen(5)).name]
    assert names == again


def test_init_shapes_and_scale():
    task = tasks.get_task("cnn-mnist1d")
    params = task.init(gen())
    assert {k: tuple(v.shape) for k, v in params.items()} == task.param_shapes
    assert sum(v.numel() for v in params.values()) == task.num_params
    w = params["0.weight"]
    bound = 1 / (1 * 5) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound
    assert task.loss(params, task.sample_batch(gen())).shape == ()
    assert task.spec.numel == task.num_params


@pytest.mark.parametrize("name", ["mlp-mnist1d", "cnn-digits", "mlp-teacher"])
def test_vmap_over_tasks_equals_a_loop(name):
    task = tasks.get_task(name)
    inits = [task.init(gen(i)) for i in range(3)]
    batches = [task.sample_batch(gen(10 + i)) for i in range(3)]
    params = {k: torch.stack([p[k] for p in inits]) for k in inits[0]}
    xs = torch.stack([b[0] for b in batches])
    ys = torch.stack([b[1] for b in batches])
    losses = torch.func.vmap(task.loss)(params, (xs, ys))
    grads = torch.func.vmap(torch.func.grad(task.loss))(params, (xs, ys))
    for i in range(3):
        torch.testing.assert_close(losses[i], task.loss(inits[i], batches[i]))
        single = torch.func.grad(task.loss)(inits[i], batches[i])
        for k in single:
            torch.testing.assert_close(grads[k][i], single[k])


@pytest.mark.slow
@pytest.mark.parametrize("name", SUITES["builtin"])
def test_adam_decreases_the_loss_of_every_builtin_task(name):
    task = tasks.get_task(name)
    params = {k: v.requires_grad_() for k, v in task.init(gen()).items()}
    opt = torch.optim.Adam(params.values(), lr=3e-3)
    start = task.eval_loss(params, "train").item()
    g = gen(1)
    for _ in range(300):
        opt.zero_grad()
        task.loss(params, task.sample_batch(g)).backward()
        opt.step()
    end = task.eval_loss(params, "train").item()
    assert end < 0.7 * start, (start, end)
    assert task.eval_loss(params, "test").item() < start


# ------------------------------------------------------------ file loaders
def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion(root, n_train=20, n_test=10, gz=True):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,)),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_test,)),
    }
    for name, arr in arrays.items():
        write_idx(root / (name + (".gz" if gz else "")), arr)
    return arrays


def test_fashion_mnist_reader_on_written_files(tmp_path):
    arrays = write_fashion(tmp_path / "fm")
    ds = data.fashion_mnist(tmp_path / "fm")
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)
    np.testing.assert_allclose(
        ds.x_train[3, 0].numpy(), arrays["train-images-idx3-ubyte"][3] / 255.0, rtol=1e-6
    )
    assert ds.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    small = data.fashion_mnist(tmp_path / "fm", size=8)
    assert small.x_train.shape == (20, 1, 8, 8)
    torch.testing.assert_close(small.x_train, data.downsample(ds.x_train, 8))
    # torchvision's layout, not gzipped
    write_fashion(tmp_path / "tv" / "FashionMNIST" / "raw", gz=False)
    assert data.fashion_mnist(tmp_path / "tv").x_train.shape == (20, 1, 28, 28)


def test_downsample_averages_blocks():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert data.downsample(x, 2)[0, 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]


def write_cifar(root, n=10):
    base = root / data.CIFAR_DIR
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {
            b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
            b"labels": rng.integers(0, 10, n).tolist(),
        }
        with open(base / name, "wb") as f:
            pickle.dump(d, f)
        batches[name] = d
    return batches


def test_cifar10_reader_on_written_files(tmp_path):
    batches = write_cifar(tmp_path)
    ds = data.cifar10(tmp_path)
    assert ds.x_train.shape == (50, 3, 32, 32) and ds.x_test.shape == (10, 3, 32, 32)
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32) / 255.0
    np.testing.assert_allclose(ds.x_train[0].numpy(), first, rtol=1e-6)
    assert ds.y_train[:10].tolist() == batches["data_batch_1"][b"labels"]
    assert data.cifar10(tmp_path, size=16).x_test.shape == (10, 3, 16, 16)


def test_file_tasks_through_the_registry(tmp_path, monkeypatch):
    write_fashion(tmp_path / "fashion_mnist")
    write_cifar(tmp_path / "cifar10")
    monkeypatch.setenv("LOPT_DATA", str(tmp_path))
    from tasks import families

    families._dataset_cpu.cache_clear()
    try:
        for name in ("mlp-fashion-8", "cnn-fashion-16", "cnn-cifar10-16"):
            task = tasks.get_task(name)
            params = task.init(gen())
            assert torch.isfinite(task.loss(params, task.sample_batch(gen())))
    finally:
        families._dataset_cpu.cache_clear()


def test_missing_and_broken_files_say_where_and_how(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"(?s)FashionMNIST files not found.*train-images-idx3-ubyte.*download=True",
    ):
        data.fashion_mnist(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"(?s)CIFAR-10 files not found.*data_batch_1.*download=True"
    ):
        data.cifar10(tmp_path)
    write_fashion(tmp_path / "fm")
    raw = gzip.open(tmp_path / "fm" / "train-images-idx3-ubyte.gz").read()
    with gzip.open(tmp_path / "fm" / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:500])
    with pytest.raises(ValueError, match="truncated"):
        data.fashion_mnist(tmp_path / "fm")


# ------------------------------------------------------------ bad input
def test_unknown_names_list_close_ones():
    with pytest.raises(KeyError, match="did you mean mlp-digits"):
        tasks.get_task("mlp-digit")
    with pytest.raises(KeyError, match="unknown task family 'mlp-famly-small'.*mlp-family-small"):
        tasks.get_family("mlp-famly-small")
    with pytest.raises(KeyError, match="unknown dataset"):
        tasks.get_dataset("imagenet")


def test_invalid_ranges_name_the_argument():
    with pytest.raises(ValueError, match="width must be >= 1"):
        MLPFamily(width=(0, 4))
    with pytest.raises(ValueError, match="depth must be a \\(low, high\\) pair"):
        MLPFamily(depth=(3, 1))
    with pytest.raises(ValueError, match="depth must be >= 1"):
        CNNFamily(depth=(0, 2))
    with pytest.raises(ValueError, match="activations: unknown 'swish'"):
        MLPFamily(activations=("swish",))
    with pytest.raises(ValueError, match="widths must all be >= 1"):
        mlp(4, [8, 0], 2)
    with pytest.raises(ValueError, match="kernels has 1 entries for 2 channels"):
        cnn((1, 8, 8), [4, 4], [3], 2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        tasks.Task("t", mlp(4, [], 2), data.gaussian_mixture(n=20, dim=4, classes=2), batch_size=0)
    with pytest.raises(ValueError, match="weights must be 2 non-negative"):
        MixtureFamily([MLPFamily(), MLPFamily()], [1.0])


@pytest.mark.parametrize(
    "spec,message",
    [
        ("mlp-family-small=x", "each part must be NAME=WEIGHT .* got 'mlp-family-small=x'"),
        ("mlp-family-small=1,", "each part must be NAME=WEIGHT .* got ''"),
        ("mlp-family-small=-1", "weight >= 0"),
        ("mlp-family-small=nan", "weight >= 0"),
        ("=1", "each part must be NAME=WEIGHT"),
        ("mlp-family-small=0,mlp-gmm=0", "the weights are all 0"),
    ],
)
def test_family_mixture_rejects_malformed_parts(spec, message):
    with pytest.raises(ValueError, match=message):
        tasks.get_family(spec)


def test_family_mixture_names_an_unknown_part():
    with pytest.raises(KeyError, match="unknown task family 'mlp-famly-small'.*mlp-family-small"):
        tasks.get_family("mlp-gmm=1,mlp-famly-small=1")


def test_family_mixture_samples_its_parts_at_their_weights():
    """``a=3,b=1``: a named family and a task, drawn 3:1 (relative weights)."""
    assert tasks.parse_mixture(" mlp-family-small = 3, mlp-gmm=1") == [
        ("mlp-family-small", 3.0),
        ("mlp-gmm", 1.0),
    ]
    fam = tasks.get_family("mlp-family-small=3,mlp-gmm=1")
    assert isinstance(fam, MixtureFamily) and fam.name == "mlp-family-small=3,mlp-gmm=1"
    g = gen(0)
    names = [fam.sample(g).name for _ in range(400)]
    share = names.count("mlp-gmm") / len(names)
    # The family's own draws never carry the fixed task's name.
    assert "mlp-gmm" not in {fam.families[0].sample(gen(i)).name for i in range(50)}
    assert 0.18 < share < 0.32


def test_families_sample_the_ranges():
    fam = MLPFamily(
        datasets=("gmm", "teacher"), depth=(0, 2), width=(4, 8), activations=("sin", "gelu")
    )
    g = gen(0)
    seen = set()
    for _ in range(30):
        t = fam.sample(g)
        linears = [m for m in t.model if isinstance(m, torch.nn.Linear)]
        assert 1 <= len(linears) <= 3
        assert all(4 <= m.out_features <= 8 for m in linears[:-1])
        seen.add(t.dataset.name)
        assert torch.isfinite(t.loss(t.init(g), t.sample_batch(g)))
    assert seen == {"gmm", "teacher"}
    cfam = CNNFamily(datasets=("mnist1d", "digits"), depth=(2, 2), channels=(3, 3), kernels=(5,))
    t = cfam.sample(gen(1))
    convs = [m for m in t.model if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d))]
    assert len(convs) == 2 and all(m.kernel_size[0] == 5 and m.out_channels == 3 for m in convs)


def test_tasks_cli_lists_every_name(capsys):
    from tasks.__main__ import main

    main(["list"])
    out = capsys.readouterr().out
    for name in list(tasks.TASKS) + list(tasks.FAMILIES) + list(tasks.SUITES):
        assert f"| {name} |" in out


def _architecture(task):
    """(kind, hidden widths or channels, activation names, dataset) of a named task."""
    layers = list(task.model)
    convs = [m for m in layers if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d))]
    linears = [m for m in layers if isinstance(m, torch.nn.Linear)]
    if convs:
        kind, hidden = "cnn", [m.out_channels for m in convs]
    else:
        kind, hidden = "mlp", [m.out_features for m in linears[:-1]]
    acts = {n for n, cls in tasks.models.ACTIVATIONS.items() for m in layers if type(m) is cls}
    return kind, hidden, acts, task.dataset


def _components(mixture, kind):
    """The mixture's families of that kind (nested mixtures flattened), each
    with the widest layer it samples."""
    cls = MLPFamily if kind == "mlp" else CNNFamily
    out = []
    for f in mixture.families:
        if isinstance(f, tasks.families.MixtureFamily):
            out += _components(f, kind)
        elif isinstance(f, cls):
            out.append((f, (f.width if kind == "mlp" else f.channels)[1]))
    return out


def _component(mixture, kind):
    """The mixture's one family of that kind, and the widest layer it samples."""
    (found,) = _components(mixture, kind)
    return found


def _family_datasets(fam, kind):
    conv = tasks.families.CONV_DATASETS if kind == "cnn" else {}
    return [tasks.families.get_dataset(conv.get(d, d)) for d in fam.datasets]


@pytest.mark.parametrize(
    "family",
    [
        "mixed-family-small",
        "mixed-family-deep",
        "mixed-family-broad",
        "mixed-family-deeper",
        "mixed-family-wide",
    ],
)
def test_heldout_tasks_lie_outside_the_training_families(family):
    mixture = tasks.get_family(family)
    for name in SUITES["heldout"]:
        kind, hidden, acts, ds = _architecture(tasks.get_task(name))
        for fam, widest in _components(mixture, kind):
            outside = (
                len(hidden) > fam.depth[1]
                or max(hidden) > widest
                or not acts <= set(fam.activations)
                or all(ds is not d for d in _family_datasets(fam, kind))
            )
            assert outside, f"{name} can be sampled by {family} ({fam.name})"


@pytest.mark.parametrize(
    "family, suite",
    [
        ("mixed-family-small", "stress"),
        ("mixed-family-deep", "stress-deep"),
        ("mixed-family-broad", "stress-deep"),
        ("mixed-family-deeper", "stress-deeper"),
        ("mixed-family-wide", "stress-wide"),
        ("mixed-family-broad", "stress-unseen"),
        ("mixed-family-broad", "stress-fresh"),
    ],
)
def test_stress_tasks_are_4x_wider_and_one_layer_deeper(family, suite):
    mixture = tasks.get_family(family)
    kinds = set()
    for name in SUITES[suite]:
        kind, hidden, _, _ = _architecture(tasks.get_task(name))
        comps = _components(mixture, kind)
        assert len(hidden) == max(f.depth[1] for f, _ in comps) + 1, name
        assert min(hidden) >= 4 * max(w for _, w in comps), name
        kinds.add(kind)
    assert kinds == {"mlp", "cnn"}


@pytest.mark.parametrize(
    "suite, earlier",
    [("stress-unseen", ["stress-deep"]), ("stress-fresh", ["stress-deep", "stress-unseen"])],
)
def test_later_stress_tasks_differ_from_earlier_ones_in_data_or_activation(suite, earlier):
    seen = [_architecture(tasks.get_task(n)) for s in earlier for n in SUITES[s]]
    for name in SUITES[suite]:
        kind, _, acts, ds = _architecture(tasks.get_task(name))
        assert all(ds is not d or acts != a for k, _, a, d in seen if k == kind), name


def test_deep_family_samples_depth_4_and_gelu():
    fam = tasks.get_family("mlp-family-deep")
    archs = [_architecture(fam.sample(gen(i))) for i in range(60)]
    assert max(len(h) for _, h, _, _ in archs) == 4
    assert any("gelu" in a for _, _, a, _ in archs)


def test_wide_family_samples_past_the_broad_widths():
    fam = tasks.get_family("mixed-family-wide")
    archs = [_architecture(fam.sample(gen(i))) for i in range(120)]
    mlp_widths = [w for k, h, _, _ in archs if k == "mlp" for w in h]
    cnn_channels = [c for k, h, _, _ in archs if k == "cnn" for c in h]
    assert 64 < max(mlp_widths) <= 128 and min(mlp_widths) >= 8
    assert 16 < max(cnn_channels) <= 24 and min(cnn_channels) >= 4


def test_deeper_family_samples_depth_6_only_narrow():
    fam = tasks.get_family("mlp-family-deeper")
    archs = [_architecture(fam.sample(gen(i))) for i in range(80)]
    depths = [len(h) for _, h, _, _ in archs]
    assert max(depths) == 6 and min(depths) == 1
    assert all(max(h) <= 32 for _, h, _, _ in archs if len(h) >= 5)
    assert any(max(h) > 32 for _, h, _, _ in archs if len(h) <= 4)


def test_broad_family_varies_the_input_width():
    fam = tasks.get_family("mlp-family-broad")
    inputs = {fam.sample(gen(i)).model[1].in_features for i in range(80)}
    assert {8, 16, 32, 40, 64} <= inputs


@pytest.mark.parametrize(
    "family, suite",
    [
        ("mixed-family-broad", "validation"),
        ("mixed-family-wide", "validation-wide"),
        ("mixed-family-broad", "validation-small"),
    ],
)
def test_validation_tasks_lie_inside_their_family(family, suite):
    mixture = tasks.get_family(family)
    for name in SUITES[suite]:
        task = tasks.get_task(name)
        kind, hidden, acts, ds = _architecture(task)
        fam, widest = _component(mixture, kind)
        narrowest = (fam.width if kind == "mlp" else fam.channels)[0]
        assert fam.depth[0] <= len(hidden) <= fam.depth[1], name
        assert narrowest <= min(hidden) and max(hidden) <= widest, name
        assert acts <= set(fam.activations), name
        assert any(ds is d for d in _family_datasets(fam, kind)), name
        assert fam.batch_size[0] <= task.batch_size <= fam.batch_size[1], name
        convs = [m for m in task.model if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d))]
        assert all(m.kernel_size[0] in fam.kernels for m in convs), name
