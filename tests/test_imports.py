"""No import circle in byzddp/: the module graph, imports inside functions included, is acyclic."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "byzddp"


def module_graph(root: Path) -> dict:
    """{module: set of byzddp modules it imports}, from an AST scan of every file under root."""
    names = {}
    for path in root.rglob("*.py"):
        parts = ("byzddp", *path.relative_to(root).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for mod, path in names.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                edges.add(base)
                edges |= {f"{base}.{a.name}" for a in node.names}
        graph[mod] = {e for e in edges if e in names and e != mod}
    return graph


def cycles(graph: dict) -> list:
    """Every edge a -> b that lies on a circle (b reaches a)."""
    def reaches(start, goal):
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return False
    return sorted((a, b) for a in graph for b in graph[a] if reaches(b, a))


def test_the_scan_sees_imports_inside_functions_and_finds_a_circle(tmp_path):
    root = tmp_path / "byzddp"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("def f():\n    from byzddp import b\n")
    (root / "b.py").write_text("from byzddp.a import f\n")
    (root / "c.py").write_text("import byzddp.a\n")
    graph = module_graph(root)
    assert "byzddp.b" in graph["byzddp.a"] and graph["byzddp.c"] == {"byzddp.a"}
    assert cycles(graph) == [("byzddp.a", "byzddp.b"), ("byzddp.b", "byzddp.a")]


def test_byzddp_has_no_import_circle():
    assert cycles(module_graph(PACKAGE)) == []
