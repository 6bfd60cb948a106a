"""Real text that needs no download (DESIGN §4), read at run time and never committed.

- ``pydoc``: the Python documentation topics that ship with the standard library.
- ``wikipedia``: the 2016 English Wikipedia excerpt inside the ``gensim`` wheel's test data
  (CC BY-SA), markup stripped; fetched with ``pip download`` once and cached like the models.
"""

from __future__ import annotations

import bz2
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from gear_dist.models import cache_dir

_GENSIM = "gensim==4.4.0"
_WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def pydoc_text() -> str:
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics.values())


def wikipedia_text() -> str:
    """Plain text of ~89 Wikipedia articles (~565k tokens), cached after the first fetch."""
    target = cache_dir() / "enwiki-excerpt.txt"
    if not target.exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                            "--only-binary=:all:", "--python-version", "3.11", _GENSIM, "-d", tmp], check=True)
            (wheel,) = Path(tmp).glob("*.whl")
            with zipfile.ZipFile(wheel) as zf:
                raw = bz2.decompress(zf.read(_WIKI_MEMBER)).decode("utf-8")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.with_suffix(".partial").write_text(_strip_wiki_markup(raw))
        target.with_suffix(".partial").rename(target)
    return target.read_text()


def _strip_wiki_markup(xml: str) -> str:
    """Article bodies of a MediaWiki XML dump as paragraphs of plain prose."""
    articles = re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S)
    out = []
    for body in articles:
        body = re.sub(r"&lt;ref[^&]*?/&gt;|&lt;ref.*?&lt;/ref&gt;", "", body, flags=re.S)  # citations
        body = re.sub(r"&lt;.*?&gt;", "", body, flags=re.S)  # other escaped html tags
        body = re.sub(r"\{\{.*?\}\}", "", body, flags=re.S)  # templates (one level)
        body = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", body)  # links -> their text
        body = re.sub(r"'{2,}|={2,}|&quot;|&amp;|\[https?:[^\]]*\]", "", body)
        paragraphs = [p.strip() for p in body.split("\n") if len(p.strip()) > 80 and not p.startswith(("|", "{", "!", "*"))]
        out.append("\n".join(paragraphs))
    return "\n\n".join(a for a in out if a)


TEXTS = {"pydoc": pydoc_text, "wikipedia": wikipedia_text}


def load_text(name: str) -> str:
    if name not in TEXTS:
        raise ValueError(f"text: unknown corpus {name!r}; choose from {sorted(TEXTS)}")
    return TEXTS[name]()
