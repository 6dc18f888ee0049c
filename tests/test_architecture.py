"""The package's shape (ARCHITECTURE.md), checked on its source: what each layer of the
package may import, who reads what, and the size of functions."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sparsekern.ops import registry

PACKAGE = Path(__file__).resolve().parents[1] / "sparsekern"

# What the modules of each part may import from the package (ARCHITECTURE.md); a part
# always may import itself.
ALLOWED = {
    "paths": set(), "files": set(), "locations": set(), "host_memory": set(), "delta_slot": {"paths", "files"},
    "ops": {"paths", "delta_slot", "files"},
    "layers": {"ops", "paths", "delta_slot"},
    "patching": {"layers", "ops", "paths", "delta_slot", "integrations"},
    "finetune": {"patching", "layers", "ops", "paths", "delta_slot", "files", "locations", "host_memory",
                 "integrations", "magnetism"},
    "integrations": {"finetune", "patching", "layers", "ops", "paths", "delta_slot", "files", "locations"},
    "cli": {"finetune", "integrations", "patching", "layers", "ops", "paths", "delta_slot", "files", "locations",
            "host_memory", "magnetism"},
    "magnetism": {"integrations", "files", "locations"},
    "demo": {"finetune", "locations", "files", "cli"},  # (a command: its errors said as `finetune`'s, cli._guarded)
}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        yield rel, ast.parse(path.read_text()), path.read_text()


def part(rel: Path) -> str:
    return rel.parts[0].removesuffix(".py")


def imported_parts(rel: Path, tree: ast.AST):
    """The top-level parts of the package a module imports (relative or absolute)."""
    package = list(rel.parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
                names = [target[0]] if target else [alias.name for alias in node.names]
            elif node.module and node.module.split(".")[0] == "sparsekern":
                target = node.module.split(".")[1:]
                names = [target[0]] if target else [alias.name for alias in node.names]
            else:
                continue
            yield from (n.removesuffix(".py") for n in names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "sparsekern" and len(parts) > 1:
                    yield parts[1]


def test_imports_follow_the_layers():
    bad = []
    for rel, tree, _ in modules():
        me = part(rel)
        if me in ("__init__", "__main__"):
            continue
        allowed = ALLOWED[me] | {me, "_C", "__version__"}
        bad += [f"{rel} imports {p}" for p in set(imported_parts(rel, tree)) - allowed]
    assert not bad, "\n".join(sorted(bad))


def test_no_function_longer_than_60_lines():
    long = []
    for rel, tree, _ in modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if any("jit" in ast.unparse(d) for d in node.decorator_list):
                    continue  # a Triton kernel is one unit
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{rel}:{node.lineno} {node.name} has {n} lines")
    assert not long, "\n".join(long)


def grep(pattern: str, where=lambda rel: True):
    regex = re.compile(pattern)
    return [f"{rel}:{i}: {line.strip()}" for rel, _, text in modules() if where(rel)
            for i, line in enumerate(text.splitlines(), 1) if regex.search(line)]


def test_ops_never_see_a_layer():
    assert not grep(r"\blayer\.\w|_modules", lambda rel: part(rel) == "ops")


def test_layers_ask_the_registry():
    assert not grep(r"self\.backend\s*==|backend\s*==\s*['\"]", lambda rel: part(rel) == "layers")


def test_one_owner_of_the_delta_slot():
    outside = lambda rel: part(rel) != "delta_slot"  # noqa: E731
    assert not grep(r"""replace\(["']\.["'], ["']__["']\)|["']__["'], ["']\.["']""", outside)
    assert not grep(r"""\.deltas\b|["']deltas["']|sparsekern_config""", outside)


def test_model_families_stay_in_their_folders():
    assert not grep(r"""startswith\(["']7net""", lambda rel: rel.parts[:2] != ("integrations", "sevennet"))
    assert not grep(r"^\s*(from|import) (mace|sevenn)\b", lambda rel: part(rel) not in ("integrations", "cli"))


# names the pages give that belong to other packages (torch, e3nn, MACE)
_OTHERS = {"GraphModule", "allow_in_graph", "extract_model", "simplify"}


@pytest.mark.parametrize("page", ["ARCHITECTURE.md", "README.md"])
def test_the_pages_name_what_exists(page):
    """Every code name a page gives (`name`, `module.name`, `call(...)`) is a word of the
    source: a function renamed leaves no stale name behind."""
    root = PACKAGE.parent
    source = "\n".join(p.read_text() for d in ("sparsekern", "tests", "benchmarks") for p in (root / d).rglob("*.py"))
    words = set(re.findall(r"\w+", source))
    names = {tok.split("(")[0].split(".")[-1] for tok in re.findall(r"`([^`\n]*)`", (root / page).read_text())
             if re.fullmatch(r"[A-Za-z_][\w.]*(\(.*\))?", tok)}
    assert not sorted(n for n in names if n and n not in words and n not in _OTHERS)


@pytest.mark.parametrize("module", [f"sparsekern.ops.{name}" for name in registry.BACKENDS]
                         + ["sparsekern.layers", "sparsekern.patching"])
def test_importing_a_kernel_does_not_import_finetune(module):
    if module.endswith("triton"):
        pytest.importorskip("triton")
    if module.endswith("cueq"):
        pytest.importorskip("cuequivariance_torch")
    code = (f"import sys, {module}; "
            "print(sorted(m for m in sys.modules if m.startswith(('sparsekern.finetune', 'sparsekern.cli'))))")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout
