"""The documentation builds without a warning, follows the seed's table of contents, and
documents every public name of the package."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ddpw

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    """The documentation built as CI builds it: ``sphinx-build -W``."""
    out = tmp_path_factory.mktemp("docs") / "html"
    built = subprocess.run([sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", str(DOCS),
                            str(out)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    return out


def test_the_docs_build_with_warnings_as_errors(html):
    assert (html / "api" / "trainer.html").is_file()


def test_the_table_of_contents_follows_the_seed(html):
    index = (html / "index.html").read_text()
    captions = re.findall(r'<p class="caption[^"]*"[^>]*><span class="caption-text">([^<]+)<',
                          index)
    assert captions == ["Introduction", "Guides", "API", "Contribution", "Miscellaneous",
                        "Bureau"]
    for page in ("quickstart/installation", "quickstart/quick-start",
                 "guides/machines", "guides/pausing-and-resuming", "guides/checkpoints",
                 "guides/migrating-from-accelerate", "guides/troubleshooting", "api/wrapper",
                 "api/job", "api/types", "api/trainer", "api/utils", "api/launch",
                 "contribution/source", "contribution/documentation", "quickstart/mnist",
                 "LICENCE"):
        assert (html / f"{page}.html").is_file(), page


def test_the_licence_page_shows_the_licence_file(html):
    licence = (DOCS.parent / "LICENCE").read_text().splitlines()[0]
    assert licence in (html / "LICENCE.html").read_text()


def test_the_launch_page_shows_every_option_of_ddpw_launch(html):
    import click

    from ddpw.cli import main

    page = (html / "api" / "launch.html").read_text()
    for option in main.params:
        for name in option.opts if isinstance(option, click.Option) else ():
            assert name in page, f"ddpw-launch {name} is not on the launch page"


def public_objects():
    """``(qualified name, object)`` of every public module (those of subpackages included),
    and of every public class, function, method and property defined in one."""
    for info in pkgutil.walk_packages(ddpw.__path__, "ddpw."):
        if "._" in info.name:
            continue
        module = importlib.import_module(info.name)
        yield f"module-{module.__name__}", module
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            yield f"{module.__name__}.{name}", obj
            if inspect.isclass(obj):
                for member, value in vars(obj).items():
                    value = value.fget if isinstance(value, property) else value
                    value = getattr(value, "__func__", value)
                    if not member.startswith("_") and inspect.isfunction(value):
                        yield f"{module.__name__}.{name}.{member}", value


def test_every_public_name_has_a_docstring_and_a_place_in_the_api_pages(html):
    anchors = set()
    for page in html.rglob("*.html"):
        anchors |= set(re.findall(r'id="([^"]+)"', page.read_text()))
    undocumented = [name for name, obj in public_objects() if not inspect.getdoc(obj)]
    assert not undocumented, f"public names without a docstring: {undocumented}"
    missing = [name for name, _ in public_objects() if name not in anchors]
    assert not missing, f"public names on no API page: {missing}"
