"""Sphinx configuration for ddpw's documentation."""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path[:0] = [str(DOCS.parent), str(DOCS / "_ext")]

import ddpw  # noqa: E402

project = "DDPW"
author = "the ddpw developers"
copyright = "2026, the ddpw developers"
release = ddpw.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.viewcode", "ddpw_docs"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
html_theme = "furo"
html_title = f"DDPW {release}"
exclude_patterns = ["_build", "snippets"]
