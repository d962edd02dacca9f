"""Local Sphinx extension for the trio-drain documentation.

- Resolves references to our private module paths (what autodoc writes for
  a type hint such as ``trio_drain._model.OutboxRow``) to the public name
  the object is documented under (``trio_drain.OutboxRow``), when that
  public name is the same object. A private type with no public name stays
  an error.
- Links standard-library names in type hints to docs.python.org (no
  intersphinx: the build must not need the network).
- The default role (single backticks in docstrings) links to a documented
  object where the text names one, and is shown as code otherwise: the
  docstrings use single backticks Markdown-style, for names and values
  alike (`pending`, `callback`).
- Parses Google-style docstrings (napoleon's parser; conf.py turns
  napoleon's own pass off) without reading a property's first line as
  ``type: description``.
- ``.. command-help:: outbox list`` includes ``trio-drain outbox list
  --help`` as it is printed today, so the command reference cannot drift.
- ``.. error-tree::`` draws the exported exceptions as a tree.
- Fails the build (a warning, and the build runs with ``-W``) when a name
  that ``trio_drain`` exports is not documented anywhere.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from typing import Any

from docutils import nodes
from docutils.parsers.rst import Directive
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.util import logging

log = logging.getLogger(__name__)

PACKAGE = "trio_drain"

#: Standard-library modules whose names in type hints link to docs.python.org.
STDLIB = (
    "collections.abc",
    "contextlib",
    "datetime",
    "os",
    "pathlib",
    "random",
    "re",
    "socket",
    "sqlite3",
    "ssl",
    "types",
    "typing",
)


def public_names() -> dict[str, Any]:
    """What ``trio_drain`` exports: its ``__all__`` if it has one, else
    every name not starting with an underscore, plus ``__version__``."""
    package = importlib.import_module(PACKAGE)
    names = getattr(package, "__all__", None)
    if names is None:
        names = [n for n in vars(package) if not n.startswith("_")]
        names.append("__version__")
    return {n: getattr(package, n) for n in names if not isinstance(getattr(package, n), type(sys))}


def _public_alias(target: str) -> str | None:
    """``trio_drain.X[.attr]`` for ``trio_drain._private.module.X[.attr]``,
    when ``trio_drain.X`` is that very object."""
    if not target.startswith(PACKAGE + "._"):
        return None
    parts = target.split(".")
    exported = public_names()
    # The longest prefix that imports is the module; the rest is the qualified name.
    for cut in range(len(parts) - 1, 1, -1):
        module_name, qualname = ".".join(parts[:cut]), parts[cut:]
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        head = qualname[0]
        if head in exported and getattr(obj, head, None) is exported[head]:
            return ".".join([PACKAGE, *qualname])
        return None
    return None


def _stdlib_url(target: str) -> str | None:
    for module in sorted(STDLIB, key=len, reverse=True):
        if target == module or target.startswith(module + "."):
            return f"https://docs.python.org/3/library/{module}.html#{target}"
    return None


def resolve_missing(app: Sphinx, env: Any, node: pending_xref, contnode: nodes.Element) -> nodes.Node | None:
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    public = _public_alias(target)
    if public is not None:
        domain = env.get_domain("py")
        new = node.deepcopy()
        new["reftarget"] = public
        docname = node.get("refdoc", "")
        found = domain.resolve_xref(env, docname, app.builder, node["reftype"], public, new, contnode)
        if found is None:
            matches = domain.resolve_any_xref(env, docname, app.builder, public, new, contnode)
            found = matches[0][1] if matches else None
        return found
    url = _stdlib_url(target)
    if url is not None:
        ref = nodes.reference("", "", internal=False, refuri=url, reftitle=target)
        ref += contnode
        return ref
    if node.get("trio_drain_soft"):
        # A single-backtick span in a docstring that names nothing documented:
        # a value or a parameter name, shown as code.
        return nodes.literal(node.astext(), node.astext())
    return None


def soft_role(
    name: str, rawtext: str, text: str, lineno: int, inliner: Any, options: Any = None, content: Any = None
) -> tuple[list[nodes.Node], list[nodes.system_message]]:
    """The default role: a py:obj reference that, when it resolves to
    nothing, is shown as inline code instead of failing the build."""
    env = inliner.document.settings.env
    title = target = text
    if target.endswith("()"):
        target = target[:-2]
    node = pending_xref(
        rawtext,
        refdomain="py",
        reftype="obj",
        reftarget=target.lstrip("~"),
        refexplicit=False,
        refwarn=False,
        trio_drain_soft=True,
    )
    node["py:module"] = env.ref_context.get("py:module")
    node["py:class"] = env.ref_context.get("py:class")
    node["refdoc"] = env.docname
    shown = title.split(".")[-1] if title.startswith("~") else title
    node += nodes.literal(rawtext, shown, classes=["xref", "py", "py-obj"])
    return [node], []


class CommandHelp(Directive):
    """``.. command-help:: outbox list``: the ``--help`` text of that command."""

    required_arguments = 0
    optional_arguments = 10
    has_content = False

    def run(self) -> list[nodes.Node]:
        argv = [sys.executable, "-m", PACKAGE, *self.arguments, "--help"]
        env = {**os.environ, "COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb"}
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise self.error(f"{' '.join(['trio-drain', *self.arguments])} --help failed:\n{done.stderr}")
        text = done.stdout
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def google_docstrings(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Napoleon's Google-style parsing, except that an attribute's or a
    property's first line is a sentence, never ``type: description``:
    this project's types are annotations, and its docstrings say "Claim
    order: lower ranks are claimed first"."""
    from sphinx.ext.napoleon.docstring import GoogleDocstring

    if what in {"attribute", "property", "data"}:
        what = "method"
    lines[:] = GoogleDocstring(lines, app.config, app, what, name, obj, options).lines()


class ErrorTree(Directive):
    """``.. error-tree::``: the exported exceptions as a tree under
    ``TrioDrainError``, drawn from the classes themselves."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        errors = {
            name: obj
            for name, obj in public_names().items()
            if isinstance(obj, type) and issubclass(obj, BaseException)
        }
        by_class = {obj: name for name, obj in errors.items()}

        def parent(cls: type) -> type | None:
            return next((b for b in cls.__bases__ if b in by_class), None)

        def label(cls: type) -> str:
            foreign = [b.__name__ for b in cls.__bases__ if b not in by_class and b is not Exception]
            return by_class[cls] + (f" (also {', '.join(foreign)})" if foreign else "")

        lines: list[str] = []

        def draw(cls: type, prefix: str, last: bool, root: bool) -> None:
            lines.append(label(cls) if root else prefix + ("└── " if last else "├── ") + label(cls))
            children = [c for c in errors.values() if parent(c) is cls]
            inner = "" if root else prefix + ("    " if last else "│   ")
            for i, child in enumerate(children):
                draw(child, inner, i == len(children) - 1, False)

        for root in [c for c in errors.values() if parent(c) is None]:
            draw(root, "", True, True)
        text = "\n".join(lines)
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def check_coverage(app: Sphinx, env: Any) -> None:
    documented = set(env.get_domain("py").objects)
    for name in sorted(public_names()):
        if f"{PACKAGE}.{name}" not in documented:
            log.warning("trio_drain.%s is exported but not documented in the reference", name)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_role("pyobj-or-code", soft_role)
    app.add_directive("command-help", CommandHelp)
    app.add_directive("error-tree", ErrorTree)
    app.connect("missing-reference", resolve_missing)
    app.connect("autodoc-process-docstring", google_docstrings)
    app.connect("env-check-consistency", check_coverage)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
