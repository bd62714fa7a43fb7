"""The package layout: imports only go downward through the layers the package docstrings name,
internal modules never import the `dsv3_jax` facade, and the kernels import none of dsv3_jax."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
# layer -> the layers its modules may import (besides their own)
ALLOWED = {
    "config": set(),
    "tokenizer": set(),
    "checkpoints": {"config", "tokenizer"},
    "parallel": {"config"},
    "model": {"config", "parallel"},
    "train": {"config", "tokenizer", "checkpoints", "parallel", "model"},
    "convert": {"config", "tokenizer", "checkpoints", "model"},
    "infer": {"config", "tokenizer", "checkpoints", "model"},
    "rl": {"config", "tokenizer", "checkpoints", "parallel", "model", "train", "infer"},
}


def imported(path: pathlib.Path) -> list[str]:
    """Every module a file imports (function-level imports too), absolute dotted names."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out += [f"{node.module}.{a.name}" for a in node.names]
    return out


def layer_of(dotted: str) -> str | None:
    parts = dotted.split(".")
    return parts[1] if parts[0] == "dsv3_jax" and len(parts) > 1 else None


def test_imports_only_go_downward_and_never_through_the_facade():
    problems = []
    for path in sorted((ROOT / "dsv3_jax").rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.name == "__init__.py" and rel.parent.name == "dsv3_jax":
            continue  # the facade itself
        own = rel.parts[1].removesuffix(".py")
        for name in imported(path):
            if name == "dsv3_jax" or (name.startswith("dsv3_jax.") and layer_of(name) not in
                                      ALLOWED):
                problems.append(f"{rel}: imports the facade ({name})")
            elif (layer := layer_of(name)) and layer != own and layer not in ALLOWED[own]:
                problems.append(f"{rel}: {own} imports {layer} ({name})")
    assert not problems, "\n".join(problems)


def test_every_module_belongs_to_a_layer_with_a_docstring():
    for path in sorted((ROOT / "dsv3_jax").iterdir()):
        if path.name.startswith(("_", ".")):
            continue
        name = path.name.removesuffix(".py")
        assert name in ALLOWED, f"dsv3_jax/{path.name} is in no layer of this test"
        source = path / "__init__.py" if path.is_dir() else path
        assert ast.get_docstring(ast.parse(source.read_text())), f"{source} has no docstring"


def test_the_kernels_import_nothing_of_dsv3_jax():
    for path in sorted((ROOT / "pallas_kernels").rglob("*.py")):
        assert not [n for n in imported(path) if n.split(".")[0] == "dsv3_jax"], path
