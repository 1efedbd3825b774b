"""The package's architecture, as its imports show it: one direction, and the core free of the
infrastructure."""
import ast
import subprocess
import sys

from conftest import repo_root

# Top to bottom. A module imports its own folder or what lies strictly below its layer, lazy
# (function-level) imports included; never above.
LAYERS = [
    ["__main__", "__init__"],  # the package's Python API (raysweep.train, .sweep, ...): a front end, as cli
    ["cli"],
    ["reproduce"],
    ["sweeps"],
    ["run"],
    ["training", "tracking"],
    ["config"],
    ["evaluation", "methods"],
    ["regularisers", "attacks"],
    ["members", "core", "plugins", "plots", "cluster_check", "presets"],
    ["errors", "terminal"],
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_imports_run_one_way():
    package = repo_root() / "raysweep"
    wrong = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).with_suffix("")
        here = ".".join(rel.parts)
        unit = _unit(here)
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if not name.startswith("raysweep.") or name == "raysweep":
                    continue
                target = _unit(name)
                if target != unit and LAYER[target] <= LAYER[unit]:
                    wrong.append(f"{here} imports {name} (layer {LAYER[target]} is not below {LAYER[unit]})")
    assert not wrong, "\n".join(wrong)


def test_loading_a_checkpoint_imports_neither_mlflow_nor_ray(trained_synthetic, tmp_path):
    cfg, data, ensemble = trained_synthetic
    from raysweep.core.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "ck", ensemble, cfg, data.image_shape, data.num_classes, data.mean, data.std)
    code = ("import sys, raysweep\n"
            f"e = raysweep.load({str(tmp_path / 'ck')!r})\n"
            "print(e.k, sorted(m for m in ('mlflow', 'ray', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "[]"]
