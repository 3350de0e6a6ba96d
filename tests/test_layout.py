# The layout the README promises: its file table's line counts are the files', the core stays small and
# readable, and imports run one way down (no cycle; no file imports an entry script).
import ast
import re

from conftest import ROOT

CORE = ["model.py", "qlora.py", "train.py"]  # the method and the loop
DEEP = ["kernels.py", "paged_adamw.py"]  # the deep dives
ENTRY = {"train", "sample", "eval", "bench"}  # scripts: run, never imported


def readme_table():
    """{file: lines} from the README's file table, in its order."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Files\n"):text.index("## How it works")]
    return {m[1]: int(m[2]) for m in re.finditer(r"^\| `([^`]+)` \| (\d+) \|", section, re.M)}


def lines(name):
    return (ROOT / name).read_text().splitlines()


def test_readme_file_table_counts_the_files():
    table = readme_table()
    assert list(table)[:5] == CORE + DEEP, "the reading path comes first, in order"
    wrong = {f: (n, len(lines(f))) for f, n in table.items() if len(lines(f)) != n}
    assert not wrong, f"README's line counts (said, actual): {wrong}"
    listed = set(table)
    top = {p.name for p in ROOT.glob("*.py")}
    assert top <= listed, f"top-level files missing from the README's table: {sorted(top - listed)}"


def test_the_core_is_small_and_reads_in_100_columns():
    core = sum(len(lines(f)) for f in CORE)
    assert core <= 1250, f"model.py + qlora.py + train.py: {core} lines"
    both = core + sum(len(lines(f)) for f in DEEP)
    assert both <= 2000, f"the five core files: {both} lines"
    wide = [f"{f}:{i + 1}" for f in CORE + DEEP for i, line in enumerate(lines(f)) if len(line) > 100]
    assert len(wide) <= 0.05 * both, f"{len(wide)} lines over 100 characters: {wide[:10]}"


def imports(path):
    """The project modules that the file at `path` imports (top level and inside functions)."""
    mods = {p.stem for p in ROOT.glob("*.py")} | {"data"}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        found |= {n.split(".")[0] if n.split(".")[0] != "data" else n for n in names
                  if n.split(".")[0] in mods}
    return found


def test_imports_run_one_way_down():
    files = [p for p in ROOT.glob("*.py")] + list((ROOT / "data").rglob("*.py"))
    graph = {}
    for p in files:
        rel = p.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts) if rel.parts[0] == "data" else rel.name
        graph[name] = imports(p)
    for name, deps in graph.items():
        assert not deps & ENTRY, f"{name} imports an entry script: {sorted(deps & ENTRY)}"
    assert graph["kernels"] == set(), "kernels.py imports only torch and triton"
    assert graph["model"] == set(), "model.py is the bottom of the stack"

    def cycle_from(start):  # depth-first search for a path back to start
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for dep in graph.get(node, ()):
                if dep == start:
                    return path + [dep]
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, path + [dep]))
        return None

    cycles = [c for name in graph if (c := cycle_from(name))]
    assert not cycles, f"import cycles: {cycles[:3]}"
