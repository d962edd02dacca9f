"""Sphinx configuration for the trio-drain documentation.

Built by ``nox -s docs`` with warnings as errors: a renamed function, a
public name left out of the reference or a broken link breaks the build,
not the reader.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

import trio_drain

project = "trio-drain"
author = "trio-drain developers"
copyright = "trio-drain developers"
release = trio_drain.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "trio_drain_docs",  # docs/_ext/trio_drain_docs.py
]

exclude_patterns = ["_build"]

# Single backticks: a link where the text names a documented object, code
# otherwise (see docs/_ext/trio_drain_docs.py).
default_role = "pyobj-or-code"
# Every cross-reference must resolve...
nitpicky = True
# ... except to the types of other projects: without intersphinx (no
# network at build time) there is nothing to link them to. Never list a
# trio_drain name here.
nitpick_ignore_regex = [
    ("py:.*", r"(trio|trio_websocket|outcome|attrs|attr|psycopg|wsproto|nacl)(\..*)?"),
]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = False
autodoc_inherit_docstrings = False
# Napoleon supplies the parser and its settings; the pass itself runs in
# docs/_ext/trio_drain_docs.py (see google_docstrings there).
napoleon_google_docstring = False
napoleon_numpy_docstring = False
napoleon_use_ivar = False
napoleon_attr_annotations = True

html_theme = "furo"
html_title = f"trio-drain {release}"
