"""Corpus preparation: MediaWiki stripping on small samples, the text file format, and the real
corpora's fixed by-document splits (disjoint, complete, deterministic)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qserve.cli import main
from qserve.corpus import (CorpusError, build_splits, corpus_path, fetch_members, format_texts,
                           load_texts, prepare, strip_wikitext, wiki_articles)
from qserve.pull import DownloadError


def test_templates_refs_comments_and_emphasis() -> None:
    src = ("{{Infobox animal\n| name = X\n| status_ref = {{refn|deep {{harvnb|A|2008}}}}\n}}\n"
           "The '''aardwolf''' (''Proteles'') is small.<ref name=\"a\">{{cite|x}}</ref> "
           "It eats termites.<ref name=b/><!-- hidden\nnote --> It weighs {{convert|7|–|10|kg|lb}}, "
           "up to {{convert|15|kg|lb}} ({{lang|af|maanhaar}}).")
    assert strip_wikitext(src) == ("The aardwolf (Proteles) is small. It eats termites. "
                                   "It weighs 7–10 kg, up to 15 kg (maanhaar).")


def test_links_files_categories_and_interwiki() -> None:
    src = ("[[File:A.jpg|thumb|left|A [[hyena]] [above] in [[Namibia|the park]].]]\n"
           "Native to [[East Africa|East]] and [[Southern Africa]]s, see [[wikt:mane|mane]] and "
           "[[Hyena#Diet]]. [http://example.org Web page] http://bare.example.org\n"
           "[[Category:Hyenas]]\n[[de:Erdwolf]]")
    assert strip_wikitext(src) == ("Native to East and Southern Africas, see mane and Hyena. Web page")


def test_tables_headings_lists_and_dropped_sections() -> None:
    src = ("Intro line.\n\n== History ==\nIt began.\n{| class=\"wikitable\"\n|-\n! A !! B\n|-\n"
           "| {{flag|x}} || 2\n{|\n| nested\n|}\n|}\n* first item\n* second item\n"
           "=== Empty section ===\n{{main|Other}}\n== See also ==\n* [[Hyena]]\n=== Sub ===\nref list\n"
           "== Legacy ==\n<math>x^2</math>Text after math.<br/>Done.\n== References ==\n{{reflist}}")
    assert strip_wikitext(src) == ("Intro line.\n\nHistory\n\nIt began.\nfirst item\nsecond item\n\n"
                                   "Legacy\n\nText after math. Done.")


def test_text_format_round_trip(tmp_path: Path) -> None:
    docs = ["Title A\n\nFirst paragraph.\n\nSecond paragraph.", "Title B\n\nOnly paragraph."]
    path = tmp_path / "t.txt"
    path.write_text(format_texts(docs))
    assert load_texts(path) == docs
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)) + "\n")
    assert load_texts(jsonl) == docs


@pytest.mark.parametrize("name,body,match", [
    ("absent.txt", None, "does not exist"),
    ("empty.txt", "\n\n  \n", "holds no text"),
    ("bad.jsonl", '{"text": "ok"}\nnot json\n', r"bad\.jsonl:2"),
    ("nokey.jsonl", '{"body": "x"}\n', "text"),
    ("latin1.txt", b"caf\xe9", "UTF-8"),
])
def test_load_texts_errors(tmp_path: Path, name: str, body, match: str) -> None:
    path = tmp_path / name
    if isinstance(body, bytes):
        path.write_bytes(body)
    elif body is not None:
        path.write_text(body)
    with pytest.raises(CorpusError, match=match):
        load_texts(path)


def test_unknown_corpus_and_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QSERVE_HOME", str(tmp_path))
    with pytest.raises(CorpusError, match="known: canterbury, wiki"):
        corpus_path("pile")
    with pytest.raises(CorpusError, match="eval, calib"):
        corpus_path("wiki", "train")


# --- the real corpora (gensim wheel, brotli sdist from PyPI; ~10 s) ---------------------------------

@pytest.fixture(scope="module")
def members() -> dict[str, dict[str, bytes]]:
    try:
        return {name: fetch_members(name) for name in ("wiki", "canterbury")}
    except DownloadError as e:
        pytest.skip(f"cannot fetch the corpus packages from PyPI: {e}")


def test_wiki_split_rule(members: dict[str, dict[str, bytes]]) -> None:
    import bz2

    articles = wiki_articles(bz2.decompress(next(iter(members["wiki"].values()))))
    splits = build_splits("wiki", members["wiki"])
    assert splits == build_splits("wiki", members["wiki"])  # deterministic
    ids = [pid for pid, _, _ in articles]
    assert ids == sorted(ids) and len(articles) > 90
    docs = [doc for _, _, doc in articles]
    assert splits["eval"] == docs[0::4]  # every 4th article by page id
    assert set(splits["eval"]).isdisjoint(splits["calib"])
    assert len(splits["eval"]) + len(splits["calib"]) == len(docs)
    titles = {doc.split("\n", 1)[0] for doc in splits["eval"]}
    assert titles.isdisjoint(doc.split("\n", 1)[0] for doc in splits["calib"])
    text = "\n".join(docs)
    assert len(text) > 2_000_000
    for debris in ("[[", "{{", "<ref", "}}", "'''", "[[Category:", "thumb|"):
        assert debris not in text, debris


def test_canterbury_split_rule(members: dict[str, dict[str, bytes]]) -> None:
    splits = build_splits("canterbury", members["canterbury"])
    assert len(splits["eval"]) == len(splits["calib"]) == 2
    assert splits["eval"][0].lstrip().startswith("ALICE'S ADVENTURES IN WONDERLAND")
    assert set(splits["eval"]).isdisjoint(splits["calib"])
    assert all("\r" not in d and not re.search(r"\n\n\n", d) for docs in splits.values() for d in docs)


def test_prepared_files_hold_the_splits(members: dict[str, dict[str, bytes]], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QSERVE_HOME", str(tmp_path))
    fetched: list[str] = []
    monkeypatch.setattr("qserve.corpus.fetch_members", lambda name: fetched.append(name) or members[name])
    for name in ("wiki", "canterbury"):
        paths = prepare(name)
        want = build_splits(name, members[name])
        for split, path in paths.items():
            assert path == tmp_path / "data" / f"{name}.{split}.txt" == corpus_path(name, split)
            assert load_texts(path) == want[split]
    assert fetched == ["wiki", "canterbury"]  # corpus_path reused the prepared files


def test_data_command_prints_paths(members: dict[str, dict[str, bytes]], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("QSERVE_HOME", str(tmp_path))
    monkeypatch.setattr("qserve.corpus.fetch_members", lambda name: members[name])
    assert main(["data", "all"]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(tmp_path / "data" / f"{n}.{s}.txt")
                                     for n in ("wiki", "canterbury") for s in ("eval", "calib"))
