"""mkdocs hook: a link from a doc page to a repository file outside docs/ becomes the file's path as text.

The Markdown pages link to ``../benchmarks/<domain>/README.md`` and the like, which GitHub renders as links; the
site holds only docs/, so ``mkdocs build --strict`` would reject them as broken. Links inside docs/ are left alone,
so a broken one still fails the strict build.
"""

from __future__ import annotations

import re
from typing import Any

# [text](../path) with no scheme: a relative link that climbs out of docs/.
OUTSIDE = re.compile(r"\[([^\]]+)\]\((\.\./[^)\s#]+)(#[^)\s]*)?\)")


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return OUTSIDE.sub(lambda m: f"{m.group(1)} (repository file `{m.group(2)[3:]}`)", markdown)
