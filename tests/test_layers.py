"""The layers of bert_jax point one way: a module imports only from its own unit or from
units in lower layers, at module top or inside a function alike. The table is here, once;
README's layout table names every unit of it (and nothing else)."""

import ast
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]

# Lowest first. A unit is a package (every module in it) or a top-level module.
LAYERS = (
    ("errors",),
    ("paths", "storage", "options", "sharding"),  # the ground: no jax model code, no data
    ("model",),                                   # the encoder, heads, objectives, configs
    ("checkpoint", "data"),                       # the checkpoint format; corpora, tokenizers, instances
    ("interop", "tasks"),                         # Hugging Face conversion; fine-tuning tasks and their files
    ("training",),                                # the sharded state and step, both loops
    ("flags",),                                   # options -> absl flags, job start-up
    ("peers",),                                   # the Hugging Face peers
    ("jobs",),                                    # one module per ./launch.sh job
)
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def imports(path: pathlib.Path) -> set[str]:
    """Every bert_jax module `path` imports, anywhere in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bert_jax"):
            out |= {f"{node.module}.{a.name}" if node.module == "bert_jax" else node.module for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("bert_jax.")}
    return out


def sources():
    for path in sorted((REPO / "bert_jax").rglob("*.py")):
        rel = path.relative_to(REPO / "bert_jax")
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue
        if rel.parts[0] in ("corpus",):
            continue
        yield path, rel.parts[0].removesuffix(".py")


def test_every_unit_has_a_layer():
    units = {unit for _, unit in sources()}
    assert units == set(LAYER), f"units without a layer: {units - set(LAYER)}; layers naming no unit: {set(LAYER) - units}"


def test_imports_point_down():
    wrong = []
    for path, unit in sources():
        for module in imports(path):
            other = unit_of(module)
            if other and other != unit and LAYER[other] >= LAYER[unit]:
                wrong.append(f"{path.relative_to(REPO)} ({unit}, layer {LAYER[unit]}) imports {module} "
                             f"({other}, layer {LAYER[other]})")
    assert not wrong, "\n".join(wrong)


def test_the_readme_layout_table_matches_the_tree():
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Layout", 1)[1].split("\n### ", 1)[0]
    named = set(re.findall(r"^\| `bert_jax/([a-z_]+)(?:/|\.py)`", section, re.M))
    units = {unit for _, unit in sources()} | {"corpus"}
    assert named == units, (f"in the tree, not in README's layout table: {units - named}; "
                            f"in the table, not in the tree: {named - units}")
    # and the layout table lists them in the order of LAYERS
    order = [u for u in re.findall(r"^\| `bert_jax/([a-z_]+)(?:/|\.py)`", section, re.M) if u in LAYER]
    assert [LAYER[u] for u in order] == sorted(LAYER[u] for u in order), order
