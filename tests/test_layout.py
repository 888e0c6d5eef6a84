"""The package layers import one way: lopt < tasks < meta_train < benchmarks."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"lopt": 0, "tasks": 1, "meta_train": 2, "benchmarks": 3}


def test_no_module_imports_a_higher_layer():
    upward = []
    for package, level in LAYERS.items():
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if LAYERS.get(top, -1) > level:
                        upward.append(f"{path.relative_to(ROOT)} imports {name}")
    assert upward == []


def test_the_base_install_is_torch_numpy_and_tqdm():
    import configparser
    import subprocess
    import sys

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    required = cfg["options"]["install_requires"].split()
    assert [r.split(">")[0].split("=")[0] for r in required] == ["torch", "numpy", "tqdm"]
    meta = cfg["options.extras_require"]["meta"].split()
    assert sorted(meta) == ["mnist1d", "scikit-learn", "tensorboard"]
    # Using the optimizer imports none of the extras.
    probe = (
        "import sys, torch, lopt; m = torch.nn.Linear(3, 2);"
        "o = lopt.NFNOptimizer(m.parameters(), model=m); m(torch.ones(1, 3)).sum().backward();"
        "o.step(); print(sorted(k for k in ('sklearn', 'mnist1d', 'matplotlib', 'tensorboard')"
        " if k in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_the_product_does_not_talk_about_its_own_development():
    import re

    pattern = re.compile(r"session [0-9]|issue [0-9]|lent gpu|our machines", re.IGNORECASE)
    found = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if not path.is_file() or rel.parts[0] in ("tests", "runs", ".git", ".venv"):
            continue
        if path.suffix not in (".py", ".md", ".json", ".sh", ".cfg", ".toml", ".c", ".txt"):
            continue
        if any(part.endswith(".egg-info") or part.startswith(".") for part in rel.parts):
            continue
        found += [f"{rel}: {m.group(0)}" for m in pattern.finditer(path.read_text())]
    assert found == []
