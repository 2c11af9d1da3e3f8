"""Sphinx configuration for the distexec documentation.

Build with ``python -m sphinx -W --keep-going -b html docs <output dir>``. The build must work
offline: no intersphinx, no theme packages beyond Sphinx's own.
"""

from __future__ import annotations

import os
import sys

# Document the checkout this file belongs to, even when another distexec is installed.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import distexec  # noqa: E402

project = "distexec"
author = "distexec developers"
copyright = "2026, distexec developers"
release = distexec.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# No intersphinx (the build has no network). References to standard-library objects therefore
# stay plain text; nitpicky mode stays off so that they do not produce warnings.
nitpicky = False

# -- autodoc / napoleon ------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
autodoc_default_options = {"show-inheritance": True}
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
napoleon_use_rtype = False

# -- MyST --------------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# -- HTML --------------------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"distexec {release}"
html_theme_options = {
    "description": "A concurrent.futures executor whose workers survive crashes",
    "fixed_sidebar": True,
}
html_static_path: list[str] = []
