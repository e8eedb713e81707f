"""The layout docs/architecture.md draws, checked: the import graph of ``llama_ref`` and ``verify`` (read with
``ast``, nothing imported) has no cycle, type-only imports included, imports only point down the layers, no module
imports another's private name, and no source file grows past ~350 lines without saying why at its top."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("llama_ref", "verify")
MAX_LINES = 350
REASON = "# Over 350 lines:"  # how a longer file says why, in its first lines
HARD_MAX_LINES = 450  # no reason carries a file past this: split it by concept

# Layers of llama_ref, lowest first: a module may import its own layer or a lower one, never a higher one. The
# package façades (``llama_ref/__init__.py``, ``verify/__init__.py``) re-export and are not a layer.
LAYERS = {
    0: ("llama_ref.args", "llama_ref.flex", "llama_ref.kv_cache", "llama_ref.loss", "llama_ref.model",
        "llama_ref.tokenizer"),
    1: ("llama_ref.formats", "llama_ref.lora", "llama_ref.generation", "llama_ref.default", "llama_ref.vocab"),
    2: ("llama_ref.train",),
    3: ("llama_ref.perf",),
    4: ("llama_ref.cli",),
    5: ("verify",),  # the checks read the product; the product never imports them
}


def _modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, tuple[Path, bool]]:
    """Dotted name → (file, is a package ``__init__``), for the packages under ``root``."""
    out = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def _imports(tree: ast.AST, type_only: bool = False) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth (a function-level import is a dependency too), except those under
    ``if TYPE_CHECKING:``, which never run; ``type_only=True``: those too (a type checker follows them)."""
    for node in ast.iter_child_nodes(tree):
        if not type_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _imports(ast.Module(body=node.orelse, type_ignores=[]))  # only the else branch runs
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node, type_only)


def _from_base(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute name of the module a ``from … import`` statement of ``module`` imports from."""
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        pkg = module.split(".") if is_pkg else module.split(".")[:-1]
        pkg = pkg[:len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    return base


def _targets(module: str, is_pkg: bool, node: ast.Import | ast.ImportFrom, modules: dict) -> set[str]:
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = _from_base(module, is_pkg, node)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = set()
    for name in names:
        if name.split(".")[0] not in PACKAGES:
            continue
        while name not in modules and "." in name:  # an attribute of a module: the module
            name = name.rsplit(".", 1)[0]
        if name != module:
            out.add(name)
    return out


def import_graph(type_only: bool = False, root: Path = ROOT) -> dict[str, set[str]]:
    """Module → the project modules it imports; ``type_only=True``: imports under ``if TYPE_CHECKING:`` too."""
    modules = _modules(root)
    return {m: set().union(*(_targets(m, is_pkg, node, modules)
                             for node in _imports(ast.parse(f.read_text()), type_only)))
            for m, (f, is_pkg) in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(m: str) -> Optional[list[str]]:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def layer_of(module: str) -> Optional[int]:
    for rank, prefixes in LAYERS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_reader_sees_imports_and_cycles():
    # The reader itself, on known cases: relative imports resolve, type-only imports are skipped (their else branch
    # is not), and a planted cycle is found.
    tree = ast.parse("import a\nif TYPE_CHECKING:\n    import b\nelse:\n    import c\ndef f():\n    import d\n")
    assert [n.names[0].name for n in _imports(tree)] == ["a", "c", "d"]
    g = import_graph()
    assert {"llama_ref.args", "llama_ref.kv_cache", "llama_ref.loss"} <= g["llama_ref.model"]
    assert "verify.mutants.base" in g["verify.mutants.kv_cache"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_there_is_no_import_cycle(graph):
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_reader_finds_a_type_only_cycle(tmp_path):
    # Two planted modules: a imports b only for type checking, b imports a. The runtime graph has no cycle; the
    # graph with type-only imports has it.
    (tmp_path / "llama_ref").mkdir()
    (tmp_path / "llama_ref" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                                 "    from .b import B\n")
    (tmp_path / "llama_ref" / "b.py").write_text("from .a import A\n")
    assert find_cycle(import_graph(root=tmp_path)) is None
    assert find_cycle(import_graph(type_only=True, root=tmp_path)) == ["llama_ref.a", "llama_ref.b", "llama_ref.a"]


def test_there_is_no_type_only_import_cycle():
    # A cycle closed only by ``if TYPE_CHECKING:`` imports still ties the modules together: neither can be read,
    # typed or moved without the other.
    graph = import_graph(type_only=True)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


# The packages whose modules may not import each other's private names; ``scripts/`` files import their siblings by
# their bare names (``from bench_common import …``: the directory is on sys.path when they run).
PRIVATE_NAME_PACKAGES = ("llama_ref", "verify", "scripts")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(root: Path = ROOT) -> list[str]:
    """Every import, in a module of ``PRIVATE_NAME_PACKAGES``, of another project module's private name (``_x``),
    as ``module: imports name from module``. A third-party name aliased to a private one is not a private name."""
    modules = _modules(root, PRIVATE_NAME_PACKAGES)
    scripts = {m.split(".", 1)[1] for m in modules if m.startswith("scripts.")}
    found = []
    for module, (f, is_pkg) in modules.items():
        def project(name: str) -> bool:
            top = name.split(".")[0]
            return top in PRIVATE_NAME_PACKAGES or (module.startswith("scripts.") and top in scripts)

        for node in _imports(ast.parse(f.read_text()), type_only=True):
            if isinstance(node, ast.ImportFrom):
                base = _from_base(module, is_pkg, node)
                found += [f"{module}: imports {a.name} from {base}" for a in node.names
                          if project(base) and _is_private(a.name)]
            else:
                found += [f"{module}: imports {a.name}" for a in node.names
                          if project(a.name) and any(_is_private(part) for part in a.name.split("."))]
    return found


def test_the_reader_finds_private_imports(tmp_path):
    for pkg, text in {"llama_ref": "from .b import _hidden, shown\nfrom safetensors.torch import save as _save\n"
                                   "from . import b as _b\n",
                      "scripts": "from bench_common import _helper\nimport os as _os\n"}.items():
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "a.py").write_text(text)
    (tmp_path / "scripts" / "bench_common.py").write_text("")
    assert private_imports(tmp_path) == ["llama_ref.a: imports _hidden from llama_ref.b",
                                         "scripts.a: imports _helper from bench_common"]


def test_no_module_imports_another_modules_private_name():
    found = private_imports()
    assert not found, "\n".join(found)


def test_imports_only_point_down_the_layers(graph):
    up = []
    for module, deps in sorted(graph.items()):
        rank = layer_of(module)
        if rank is None:  # the llama_ref façade (test_every_module_has_a_layer: nothing else is unplaced)
            continue
        up += [f"{module} (layer {rank}) imports {d} (layer {layer_of(d)})" for d in sorted(deps)
               if layer_of(d) is not None and layer_of(d) > rank]
        up += [f"{module} imports the façade {d} (import the module that defines the name)" for d in sorted(deps)
               if d in PACKAGES]
    assert not up, "\n".join(up)


def test_every_module_has_a_layer():
    unplaced = [m for m in _modules() if layer_of(m) is None and m not in PACKAGES]
    assert not unplaced, f"modules outside every layer of docs/architecture.md: {unplaced}"


def test_importing_the_model_loads_no_tokenizer_data_or_training_code():
    # A fresh interpreter: this process has imported everything already. IGNORE_INDEX lives with the loss, and the
    # package's Llama/Tokenizer are imported on first use (PEP 562).
    code = ("import sys, llama_ref.model, llama_ref.kv_cache, llama_ref.loss, llama_ref; "
            "loaded = {'sentencepiece', 'tiktoken', 'llama_ref.train.data', 'llama_ref.tokenizer', "
            "'llama_ref.train', 'llama_ref.perf', 'llama_ref.cli', 'verify'} & set(sys.modules); "
            "assert not loaded, sorted(loaded); from llama_ref import Llama, Tokenizer")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_source_files_are_short_or_say_why():
    long = []
    for f in sorted(p for pkg in (*PACKAGES, "scripts", "tests") for p in (ROOT / pkg).rglob("*.py")):
        lines = f.read_text().splitlines()
        if len(lines) > MAX_LINES and not any(line.startswith(REASON) for line in lines[:5]):
            long.append(f"{f.relative_to(ROOT)}: {len(lines)} lines")
    assert not long, f"over {MAX_LINES} lines without a '{REASON} …' line at the top: {long}"


def test_no_source_file_is_over_the_hard_limit():
    too_long = [f"{f.relative_to(ROOT)}: {n} lines" for f in sorted(
        p for pkg in (*PACKAGES, "scripts", "tests") for p in (ROOT / pkg).rglob("*.py"))
        if (n := len(f.read_text().splitlines())) > HARD_MAX_LINES]
    assert not too_long, f"over {HARD_MAX_LINES} lines, whatever the reason (split by concept): {too_long}"


# Checks that run on any target (verify.targets): they reach the implementation only through a target, so they
# import nothing of llama_ref. The other checks still take llama_ref's Transformer; each joins this list as it
# moves onto targets.
TARGET_CHECK_MODULES = ("verify.checks.kv_cache", "verify.checks.lora_merge",
                        "verify.checks.gradient_checkpointing", "verify.checks.grad_accum")


def test_checks_on_targets_import_nothing_of_llama_ref(graph):
    direct = {m: sorted(d for d in graph[m] if d == "llama_ref" or d.startswith("llama_ref."))
              for m in TARGET_CHECK_MODULES}
    assert not any(direct.values()), direct
    adapters = {m for m, deps in graph.items() if m.startswith("verify.targets.")
                and any(d.startswith("llama_ref") for d in deps)}
    assert adapters == {"verify.targets.llama_ref"}, adapters
