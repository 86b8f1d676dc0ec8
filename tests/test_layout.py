"""The repository's shape, as the design card states it: modules with one concern and no import cycle, stages
that import shared modules only, stages short enough to read, and no measurement history in the code."""
import ast
import re
from pathlib import Path

from conftest import ROOT

STAGES = sorted(p for p in ROOT.glob("0[1-5]_*.py"))
SHARED = sorted(p for p in ROOT.glob("*.py") if p not in STAGES)


def project_imports(path: Path) -> set[str]:
    """Every project module a file imports, at the top or inside a function."""
    names = {p.stem for p in SHARED}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & names


def test_the_import_graph_has_no_cycle_and_no_module_imports_a_stage():
    graph = {p.stem: project_imports(p) for p in SHARED + STAGES}
    assert all(not set(v) & {s.stem for s in STAGES} for v in graph.values())
    done, active = set(), []

    def visit(m):
        assert m not in active, "import cycle: " + " -> ".join(active[active.index(m):] + [m])
        if m in done:
            return
        active.append(m)
        for n in sorted(graph[m]):
            visit(n)
        active.pop()
        done.add(m)
    for m in graph:
        visit(m)
    assert graph["tiny_models"] == set() and graph["parallel"] == set()


def test_no_cpu_model_issue_number_or_outside_path_in_the_code():
    """History (CPUs, issues) lives in bench/*.md; nothing points outside the repository. The words are
    spelled in pieces here so that this file does not match itself."""
    history = re.compile("|".join(["Z" + "en", "EP" + "YC", "Sapph" + "ire", "[Ii]" + "ssue [0-9]"]))
    outside = re.compile(r"\.\./" + "sha" + "red|" + "sha" + "red/" + "PAPER")
    for p in [p for p in ROOT.rglob("*") if p.suffix in (".py", ".sh", ".md") and ".ci-venv" not in p.parts]:
        text = p.read_text()
        if p.suffix != ".md":
            assert not history.search(text), p
        assert not outside.search(text), p


def test_stages_are_short_enough_to_read():
    """A stage <= 550 lines, its main <= 80, no function of a stage over 80 (the design card's budgets); a
    shared module no longer than a stage."""
    assert all(len(p.read_text().splitlines()) <= 550 for p in SHARED), [p.name for p in SHARED]
    for p in STAGES:
        text = p.read_text()
        assert len(text.splitlines()) <= 550, p.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno + 1 <= 80, (p.name, node.name)
