"""The package's layers (docs/design.md, "Layers"): no import circle, `variants/` imports nothing of the project
outside itself, `eval/` nothing of the runner (train loop, sweeps, CLI, report, benchmarks)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "eval", "variants")
# the runner: what trains, sweeps, reports and talks to people; nothing below it may import these
RUNNER = ("harness.train", "harness.distributed", "harness.bench", "harness.spec", "harness.plan", "harness.jobs",
          "harness.sweep", "harness.local", "harness.slurm", "harness.scale_plan", "harness.report", "harness.results",
          "harness.findings", "harness.stats", "harness.curves", "harness.scaling", "harness.plots",
          "harness.cli", "harness.commands", "harness.tokenizer_folder", "harness.__main__")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the project's modules it imports, at the top or inside functions (both count)."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
        targets = {resolve(n) for n in names if n.split(".")[0] in PACKAGES}
        # `from pkg import mod` names the package too; a package's __init__ is not a dependency of its modules
        graph[module] = {t for t in targets if t and t != module and not module.startswith(t + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, if there is any (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle():
    graph = import_graph()
    assert len(graph) > 50  # the scan sees the package
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_circle_check_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_variants_import_nothing_of_harness_or_eval():
    wrong = [(m, d) for m, deps in import_graph().items() if m.startswith("variants")
             for d in deps if not d.startswith("variants")]
    assert not wrong, wrong


def test_eval_imports_nothing_of_the_runner():
    wrong = [(m, d) for m, deps in import_graph().items() if m.startswith("eval")
             for d in deps if d.startswith(RUNNER)]
    assert not wrong, wrong


# Layers from the bottom (docs/design.md): a module imports only from its own layer or the ones below it.
LAYERS = [
    ("base", ("harness.errors", "harness.atomic", "harness.hashing", "harness.devices", "harness.schema",
              "eval.geneval_rules")),
    ("models", ("variants",)),
    ("data and runs", ("harness.config", "harness.checkpoint", "harness.data", "harness.cache", "harness.runs")),
    ("measures", ("eval",)),
    ("runner", ("harness",)),
]


def layer(module: str) -> int:
    """The index of the first layer whose prefixes match `module` (so eval.geneval_rules is base, not measures)."""
    return next(i for i, (_, prefixes) in enumerate(LAYERS)
                if any(module == p or module.startswith(p + ".") for p in prefixes))


def test_imports_point_down_the_layers():
    wrong = [f"{m} ({LAYERS[layer(m)][0]}) imports {d} ({LAYERS[layer(d)][0]})"
             for m, deps in import_graph().items() for d in deps if layer(d) > layer(m)]
    assert not wrong, wrong


def test_the_harness_never_asks_which_kind_of_tokens_or_data_it_has():
    """Behaviour that differs by token kind or data kind lives on the objects (the tokenizer's token layout in
    the cache, the head, harness.data.profile), not in string comparisons."""
    import re

    test = re.compile(r"""[!=]=\s*["'](vq|kl|shapes)["']|["'](vq|kl|shapes)["']\s*[!=]=""")
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for path in sorted((ROOT / "harness").rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if test.search(line)]
    assert not found, found
