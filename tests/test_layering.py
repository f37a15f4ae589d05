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


def test_no_module_draws_with_pyplot():
    """One plotting style: Figure + the Agg canvas (analysis.plots.save_figure), never pyplot's global state."""
    bad = {str(f.relative_to(PKG.parent)): lines for f in sorted(PKG.rglob("*.py"))
           if (lines := upward(f.read_text(), "jaxpoison", ("matplotlib.pyplot", "pylab")))}
    assert bad == {}, f"pyplot imports (file: lines): {bad}"
    assert upward("def f():\n    import matplotlib.pyplot as plt\nfrom matplotlib import pyplot\n", "jaxpoison",
                  ("matplotlib.pyplot",)) == [2, 3]


def _is_module(dotted: str) -> bool:
    path = PKG.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def private_uses(source: str, package: str) -> list:
    """(line, name) where ``source`` reaches a private (``_name``) of another jaxpoison module: imports it
    (``from jaxpoison.x import _f``) or reads it off an imported module (``x._f``)."""
    tree = ast.parse(source)
    modules, out = set(), []
    for line, mod in imports(source, package):
        if mod.startswith("jaxpoison") and mod.rsplit(".", 1)[-1].startswith("_") and \
                not mod.rsplit(".", 1)[-1].startswith("__") and not _is_module(mod):
            out.append((line, mod))
    for node in ast.walk(tree):          # names bound to jaxpoison modules
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("jaxpoison")}
        elif isinstance(node, ast.ImportFrom):
            here = package.split(".")
            base = ".".join((here[:len(here) - node.level + 1] if node.level else []) + [node.module or ""]).strip(".")
            modules |= {a.asname or a.name for a in node.names
                        if base.startswith("jaxpoison") and _is_module(f"{base}.{a.name}")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            out.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return sorted(out)


def test_no_module_uses_another_modules_private_names():
    bad = {}
    for f in sorted(PKG.rglob("*.py")):
        package = ".".join(("jaxpoison", *f.relative_to(PKG).parent.parts))
        if found := private_uses(f.read_text(), package):
            bad[str(f.relative_to(PKG.parent))] = found
    assert bad == {}, f"private names used across modules (file: uses): {bad}"
    # a control: both forms are caught, relative imports resolved; own privates and dunders are not
    src = ("from jaxpoison.analysis.detection import _group_order\nfrom . import detector\nimport numpy as np\n"
           "x = detector._restrict(1)\ny = np._core\nz = detector.__name__\ndef _own():\n    return _own\n")
    assert private_uses(src, "jaxpoison.analysis") == [(1, "jaxpoison.analysis.detection._group_order"),
                                                       (4, "detector._restrict")]
