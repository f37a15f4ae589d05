"""Imports run one way: the studies sit on top, and no module of the lower layers imports them (nor the CLI).

Parsed with ast, so imports inside functions count too."""
import ast
import pathlib

import jaxpoison

PKG = pathlib.Path(jaxpoison.__file__).parent
LOWER = ("analysis", "eval", "train", "data", "models")
TOP = ("jaxpoison.studies", "jaxpoison.cli")


def imports(source: str, package: str) -> list:
    """(line, module) of every import in ``source``, a module of ``package``; relative imports resolved, and
    ``from X import y`` also gives ``X.y`` (``from jaxpoison import studies``)."""
    here = package.split(".")
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out += [(node.lineno, mod)] + [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def upward(source: str, package: str, banned=TOP) -> list:
    """The lines of ``source`` that import one of ``banned`` (or a module under it)."""
    return sorted({line for line, mod in imports(source, package)
                   if any(mod == b or mod.startswith(b + ".") for b in banned)})


def test_lower_layers_never_import_the_studies_or_the_cli():
    files = [f for layer in LOWER for f in sorted((PKG / layer).rglob("*.py"))]
    assert len(files) > 20                              # the walk found the packages
    bad = {}
    for f in files:
        package = ".".join(("jaxpoison", *f.relative_to(PKG).parent.parts))
        lines = upward(f.read_text(), package)
        if lines:
            bad[str(f.relative_to(PKG.parent))] = lines
    assert bad == {}, f"upward imports (file: lines): {bad}"


def test_the_check_sees_every_form_of_an_upward_import():
    """A control: the parser catches absolute, package-level and relative imports, also inside functions."""
    src = ("import jaxpoison.studies.common\nfrom jaxpoison import studies\nimport numpy\n"
           "def f():\n    from ..studies.rationale import grid\n    from ..eval import score\n"
           "from jaxpoison.cli import main\n")
    assert upward(src, "jaxpoison.analysis") == [1, 2, 5, 7]
    assert upward("from . import adapters\nfrom .. import configs\n", "jaxpoison.analysis") == []
