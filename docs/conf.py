"""Sphinx configuration for ddpw's documentation."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ddpw  # noqa: E402

project = "DDPW"
author = "the ddpw developers"
copyright = "2026, the ddpw developers"
release = ddpw.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.viewcode"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
html_theme = "furo"
html_title = f"DDPW {release}"
exclude_patterns = ["_build"]
