"""The benchmark corpus: real English texts that any machine with this project installed already has.

The list lives in bench/corpus.json. Each entry names a text by where it comes from, not by
a copy of it, so the repo carries no third-party text:

  kind "file"       a whole file: an absolute Debian path (root "/"), or a path under the
                    Python standard library (root "stdlib") or site-packages (root "site-packages");
  kind "docstring"  the module docstring of a .py file under one of those roots (read with
                    `ast`, never imported; cleaned like `inspect.cleandoc`);
  kind "metadata"   the long description (body of METADATA) of an installed distribution.

An optional `start` string cuts off everything before its first occurrence (badges, logos and
licence headers at the top of READMEs). The sha256 of the extracted text is recorded; a text
that is missing or differs (another package version, another Python) stops the benchmark with
a message saying which entry, where it looked and what it expected.

None of these sources is `pydoc_data` (the codec calibrates on it, server/pack.py), and none
was written by this project. Four texts form the "dev" split, used to choose settings; the
rest are "test".

    python -m bench.corpus            # check every text, print its size in tokens
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

LIST = Path(__file__).with_name("corpus.json")
SPLITS = ("dev", "test")


class CorpusError(RuntimeError):
    """A corpus text cannot be found or is not the recorded one."""


@dataclass(frozen=True)
class Text:
    id: str
    split: str
    source: str  # human-readable origin
    licence: str
    text: str


def _site_packages() -> list[Path]:
    paths = [Path(p) for p in sys.path if p and Path(p).name in ("site-packages", "dist-packages")]
    purelib = Path(sysconfig.get_paths()["purelib"])
    return [p for p in dict.fromkeys(paths + [purelib]) if p.is_dir()]


def _locate(entry: dict) -> Path:
    root, rel = entry.get("root", "/"), entry["path"]
    if root == "/":
        candidates = [Path(rel)]
    elif root == "stdlib":
        candidates = [Path(sysconfig.get_paths()["stdlib"]) / rel]
    elif root == "site-packages":
        candidates = [sp / rel for sp in _site_packages()]
    else:
        raise CorpusError(f"corpus entry {entry['id']!r}: unknown root {root!r} (use '/', 'stdlib', 'site-packages')")
    for c in candidates:
        if c.is_file():
            return c
    raise CorpusError(f"corpus entry {entry['id']!r}: {rel} not found (looked at "
                      f"{', '.join(map(str, candidates)) or 'no site-packages directory'}); "
                      f"it comes from {entry.get('source', '?')}")


def extract(entry: dict) -> str:
    """The raw text of one entry, before any `start` cut."""
    kind = entry["kind"]
    if kind == "metadata":
        dist = entry["dist"]
        try:
            meta = importlib.metadata.distribution(dist).read_text("METADATA")
        except importlib.metadata.PackageNotFoundError:
            raise CorpusError(f"corpus entry {entry['id']!r}: distribution {dist!r} is not installed") from None
        if not meta or "\n\n" not in meta:
            raise CorpusError(f"corpus entry {entry['id']!r}: {dist} has no long description in METADATA")
        return meta.split("\n\n", 1)[1]
    path = _locate(entry)
    src = path.read_text(encoding="utf-8")
    if kind == "file":
        return src
    if kind == "docstring":
        doc = ast.get_docstring(ast.parse(src), clean=True)
        if not doc:
            raise CorpusError(f"corpus entry {entry['id']!r}: {path} has no module docstring")
        return doc
    raise CorpusError(f"corpus entry {entry['id']!r}: unknown kind {kind!r}")


def text_of(entry: dict) -> str:
    text = extract(entry)
    start = entry.get("start")
    if start:
        i = text.find(start)
        if i < 0:
            raise CorpusError(f"corpus entry {entry['id']!r}: start marker {start!r} not found in the text")
        text = text[i:]
    return text.strip() + "\n"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_list(path: Path = LIST) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CorpusError(f"cannot read corpus list {path}: {e}") from e
    entries = data["texts"] if isinstance(data, dict) else data
    ids = [e["id"] for e in entries]
    if len(set(ids)) != len(ids):
        raise CorpusError(f"corpus list {path} has duplicate ids")
    for e in entries:
        if e.get("split") not in SPLITS:
            raise CorpusError(f"corpus entry {e['id']!r}: split must be one of {SPLITS}")
    return entries


def load(split: str = "all", path: Path = LIST, limit: int | None = None) -> list[Text]:
    """The texts of a split ('dev', 'test' or 'all'), each checked against its recorded sha256."""
    if split not in ("all", *SPLITS):
        raise ValueError(f"split must be 'all', 'dev' or 'test', not {split!r}")
    out = []
    for e in load_list(path):
        if split != "all" and e["split"] != split:
            continue
        text = text_of(e)
        got = sha256(text)
        if got != e.get("sha256"):
            raise CorpusError(
                f"corpus entry {e['id']!r} ({e.get('source', '?')}): the extracted text has sha256 {got[:16]}..., "
                f"the list records {str(e.get('sha256'))[:16]}... (recorded with {e.get('recorded_with', '?')}). "
                f"The installed file differs from the one the benchmark was built on; install that version "
                f"or review the text and update {Path(path).name}.")
        out.append(Text(e["id"], e["split"], e.get("source", ""), e.get("licence", ""), text))
        if limit is not None and len(out) >= limit:
            break
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", default="all", choices=("all", *SPLITS))
    ap.add_argument("--fill-hashes", action="store_true",
                    help="record the sha256 of entries whose hash is empty (after reviewing their text)")
    args = ap.parse_args(argv)
    if args.fill_hashes:
        data = json.loads(LIST.read_text())
        for e in data["texts"]:
            if not e.get("sha256"):
                e["sha256"] = sha256(text_of(e))
                print("hashed", e["id"])
        LIST.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    from transformers import AutoTokenizer

    from hpi.models import default_model_path

    p = default_model_path()  # only the default model's tokenizer is needed
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    texts = load(args.texts)
    for t in texts:
        n = len(tok(t.text, add_special_tokens=False)["input_ids"])
        print(f"{t.id:28s} {t.split:5s} {n:6d} tokens  {t.source}")
    print(f"{len(texts)} texts ok")


if __name__ == "__main__":
    main()
