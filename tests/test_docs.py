"""The README's option tables are generated from the settings table; they must not drift."""

import importlib.util
from importlib.machinery import SourceFileLoader
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _update_readme_module():
    loader = SourceFileLoader("update_readme", str(ROOT / "scripts" / "update-readme"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("update_readme", loader))
    loader.exec_module(module)
    return module


def test_readme_tables_match_the_settings():
    readme = (ROOT / "README.md").read_text()
    assert _update_readme_module().render(readme) == readme, "README tables are stale: run scripts/update-readme"
    assert "`--rps`" in readme and "`--env-idle-ttl`" in readme and "`--routing`" in readme
