"""Layering: no module imports a private name (``_x``) from another module, and the libraries
``teachers/`` and ``filters/`` import nothing from the jobs (``pipelines/``) or ``students/``.

Checked on the source with ``ast`` (every ``import`` statement, including those inside functions),
so nothing is imported to run it.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("teachers", "filters", "students", "pipelines", "diffusion_distill")
LIBRARIES = ("teachers", "filters")  # may not import the jobs or the students
FORBIDDEN_FOR_LIBRARIES = ("pipelines", "students")

# Violations in files this test's owner does not own, reported for the merge; remove each entry when
# its file is fixed (the test also fails when a listed violation no longer exists).
KNOWN: set[tuple[str, str]] = set()


def modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(encoding="utf-8"))


def _module_of(rel: str) -> str:
    return rel[:-3].replace("/", ".").removesuffix(".__init__")


def imports(tree):
    """(module imported from, name or None) for every import in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                yield node.module, alias.name


def private_imports():
    found = set()
    for rel, tree in modules():
        for module, name in imports(tree):
            if module.split(".")[0] not in PACKAGES or module == _module_of(rel):
                continue
            if name is not None and name.startswith("_") and not name.startswith("__"):
                found.add((rel, f"{module}.{name}"))
            elif any(part.startswith("_") and not part.startswith("__") for part in module.split(".")):
                found.add((rel, module))
    return found


def test_no_module_imports_a_private_name_from_another():
    found = private_imports()
    assert found - KNOWN == set(), "private names imported across modules (make them public or move them)"
    assert KNOWN - found == set(), "fixed: remove these from KNOWN"


def test_private_attribute_access_across_modules_is_caught_too():
    """``from x import mod; mod._name`` is the same violation as ``from x.mod import _name``."""
    found = set()
    for rel, tree in modules():
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] in PACKAGES:
                for alias in node.names:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in PACKAGES:
                        aliases[alias.asname or alias.name] = alias.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                found.add((rel, f"{aliases[node.value.id]}.{node.attr}"))
    assert found - KNOWN == set()


def test_libraries_import_no_job_and_no_student():
    bad = sorted((rel, module) for rel, tree in modules() if rel.split("/")[0] in LIBRARIES
                 for module, _ in imports(tree) if module.split(".")[0] in FORBIDDEN_FOR_LIBRARIES)
    assert bad == []


def test_the_checker_sees_a_planted_violation():
    tree = ast.parse("from teachers.shards import _fs\nimport pipelines.dump\n")
    assert ("teachers.shards", "_fs") in set(imports(tree)) and ("pipelines.dump", None) in set(imports(tree))
