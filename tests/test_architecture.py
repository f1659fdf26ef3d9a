"""The shape the code must keep (`python tests/test_architecture.py --write` rewrites the code deps).
A stage's code deps in dvc.yaml are exactly the project-local import closure of its command's module,
so a change to any code a stage runs reruns it (and nothing else is listed). The closure is read with
`ast`: every import at any depth (inside functions too), relative ones resolved, and the `__init__.py` of
every package on the way, since Python runs those too. And layers point one way: flows/ -> tasks/ ->
loraflow/."""
import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("loraflow", "tasks", "flows")
# Files a module loads by path rather than by import: the evaluate metric modules (evaluate.load(path)),
# the chat templates shipped for base models.
LOADED_BY_PATH = {"loraflow/evaluation.py": {"loraflow/metrics"}, "loraflow/chat_format.py": {"loraflow/templates"}}


def module_file(module: str, root: Path = ROOT) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def with_parent_packages(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """The project-local modules one file imports, as dotted names (each parent package included)."""
    rel = path.relative_to(root).with_suffix("")
    package = list(rel.parts[:-1])  # the package a relative import starts from, for a module or an __init__
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import name`: name is a submodule when a file of that name exists, else an attribute
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] not in PACKAGES:
                continue
            for module in with_parent_packages(name):
                if module_file(module, root):
                    found.add(module)
    return found


def import_closure(module: str, root: Path = ROOT) -> set[str]:
    """Every project-local file that running `python -m <module>` can execute, relative to root."""
    todo, seen = with_parent_packages(module), set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(imported_modules(module_file(current, root), root) - seen)
    files = {module_file(m, root).relative_to(root).as_posix() for m in seen}
    for loader, targets in LOADED_BY_PATH.items():
        if loader in files:
            files |= targets
    return files


def code_deps(stage: dict) -> set[str]:
    return {d for d in stage.get("deps", []) if d.split("/")[0] in PACKAGES}


def stage_module(stage: dict) -> str:
    cmd = stage["cmd"].split()
    assert cmd[0] == "bin/stage" and len(cmd) == 2, f"{stage['cmd']}: expected `bin/stage <name>` (python -m tasks.<name>)"
    return f"tasks.{cmd[1]}"


def test_each_stage_lists_exactly_its_import_closure_as_code_deps():
    problems = []
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        closure, listed = import_closure(stage_module(stage)), code_deps(stage)
        if closure != listed:
            problems.append(f"{name}: missing {sorted(closure - listed)}, extra {sorted(listed - closure)}\n"
                            f"    code deps should be: [{', '.join(sorted(closure))}]")
    assert not problems, "dvc.yaml code deps differ from the import closure:\n" + "\n".join(problems)


def test_closure_follows_nested_relative_and_function_level_imports(tmp_path):
    """The walker itself, on a planted tree: a missed import here would mean a silently stale cache."""
    (tmp_path / "tasks").mkdir()
    (tmp_path / "loraflow" / "sub").mkdir(parents=True)
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "stage.py").write_text("def run():\n    from loraflow import a\n")
    (tmp_path / "loraflow" / "__init__.py").write_text("")
    (tmp_path / "loraflow" / "a.py").write_text("from .sub import b\nimport os\n")
    (tmp_path / "loraflow" / "sub" / "__init__.py").write_text("from . import c\n")
    (tmp_path / "loraflow" / "sub" / "b.py").write_text("from ..d import thing\n")
    (tmp_path / "loraflow" / "sub" / "c.py").write_text("")
    (tmp_path / "loraflow" / "d.py").write_text("thing = 1\n")
    (tmp_path / "loraflow" / "unused.py").write_text("")
    assert import_closure("tasks.stage", tmp_path) == {
        "tasks/__init__.py", "tasks/stage.py", "loraflow/__init__.py", "loraflow/a.py", "loraflow/sub/__init__.py",
        "loraflow/sub/b.py", "loraflow/sub/c.py", "loraflow/d.py"}


# Layers point one way: flows/ (wiring, the command line) -> tasks/ (stages) -> loraflow/ (the shared core).
LAYER_MAY_NOT_IMPORT = {"loraflow": {"tasks", "flows"}, "tasks": {"flows"}}


def layering_violations(root: Path = ROOT) -> list[str]:
    found = []
    for layer, forbidden in LAYER_MAY_NOT_IMPORT.items():
        for path in sorted((root / layer).rglob("*.py")):
            bad = sorted(m for m in imported_modules(path, root) if m.split(".")[0] in forbidden)
            found += [f"{path.relative_to(root).as_posix()} imports {m}" for m in bad]
    return found


def test_layers_only_point_down():
    assert layering_violations() == [], "the core imports a stage or a flow, or a stage imports a flow"


def test_layering_check_catches_an_upward_import(tmp_path):
    (tmp_path / "loraflow").mkdir()
    (tmp_path / "tasks").mkdir()
    (tmp_path / "loraflow" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "train.py").write_text("")
    (tmp_path / "loraflow" / "glue.py").write_text("def f():\n    from tasks import train\n")
    assert layering_violations(tmp_path) == ["loraflow/glue.py imports tasks", "loraflow/glue.py imports tasks.train"]


def write_code_deps(dvc_yaml: Path = ROOT / "dvc.yaml") -> list[str]:
    """Rewrite each stage's code deps in dvc.yaml to its import closure, keeping its inputs and comments;
    returns the stages changed. `python tests/test_architecture.py --write` runs it."""
    text, changed = dvc_yaml.read_text(), []
    for name, stage in yaml.safe_load(text)["stages"].items():
        closure, listed = sorted(import_closure(stage_module(stage))), code_deps(stage)
        if set(closure) == listed:
            continue
        begin = text.index(f"\n  {name}:\n")
        lines = text[begin:].split("\n")
        deps_at = next(i for i, line in enumerate(lines) if line.strip() == "deps:")
        end = deps_at + 1
        while end < len(lines) and lines[end].startswith("      "):
            end += 1
        kept = [line for line in lines[deps_at + 1:end]
                if not (line.strip().startswith("- ") and line.strip()[2:].split("/")[0] in PACKAGES)]
        code_at = next((i for i, line in enumerate(kept) if line.strip().startswith("# code")), None)
        new = [f"      - {path}" for path in closure]
        kept = kept[:code_at + 1] + new + kept[code_at + 1:] if code_at is not None else new + kept
        lines[deps_at + 1:end] = kept
        text = text[:begin] + "\n".join(lines)
        changed.append(name)
    dvc_yaml.write_text(text)
    return changed


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["--write"]:
        print("code deps rewritten for:", ", ".join(write_code_deps()) or "none (already the import closures)")
