"""Build the two shipped corpora from the CPython standard library (PSF-2.0): the classroom corpus (a fixed list
of 176 modules, 3.7 MB: tests, notebooks, the tokenizer) and the pretraining corpus (every pure-Python file of
Lib/, test suite included, about 29 MB: the recipe of the shipped classroom-base model, `--pretrain`).

The pretraining corpus (``--pretrain``): every ``*.py`` under Lib/ except
    * site-packages/ and __pycache__/ (not the standard library);
    * encodings/ and pydoc_data/ (generated codec tables and help text, not code anyone writes);
    * files that are not valid UTF-8, or larger than 320 KB (generated tables), or whose name says they are
      broken on purpose (badsyntax_*, bad_coding*, bad_getattr*, *_bad*.py in test data folders);
    * exact duplicates (by content: the first path in sorted order is kept).
It is written compressed, one {"path", "text"} object per line, sorted by path: python_stdlib_full.jsonl.gz
(gzip mtime 0, so the bytes are reproducible), with MANIFEST_full.json (license, counts, sha256 of the
uncompressed jsonl and of the .gz). Documents are split into train / validation / test by a hash of their path
(tokenizer.corpus_split3); the split is by document, so a module's text is never in two splits.

The corpus is small (about 3.5 MB), redistributable (PSF-2.0) and looks like the
kind of text a code model is trained on. Every source file is one document.

Output (relative to the repository root):

* ``glm5_ref/assets/corpus/python_stdlib.jsonl``: one ``{"path", "text"}`` object
  per line, sorted by path, UTF-8, ``\\n`` line endings.
* ``glm5_ref/assets/corpus/MANIFEST.json``: source version, license, counts and
  the sha256 of the jsonl file (checked by ``glm5_ref.tokenizer.corpus_documents``).
* ``glm5_ref/assets/corpus/LICENSE-PSF.txt``: the interpreter's LICENSE.txt.

The file list is explicit so the corpus is reproducible: the same interpreter
version gives a byte-identical jsonl. Run with the interpreter the corpus was
built from (CPython 3.11.7) or pass ``--stdlib DIR``.

    python scripts/build_corpus.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "glm5_ref" / "assets" / "corpus"
JSONL_NAME = "python_stdlib.jsonl"
EXPECTED_VERSION = "3.11.7"

# Pure-Python modules only, about 3.7 MB of text. Left out on purpose: test
# suites, idlelib, tkinter, turtle/turtledemo, lib2to3, ensurepip, distutils,
# encodings, generated tables (html/entities.py, stringprep.py, locale.py's
# alias table, _sysconfigdata*, keyword.py, token.py, re/_casefix.py), tiny
# compatibility shims and jokes, and (for size only) the largest or most
# platform-specific modules: _pydecimal, _pyio, doctest, pydoc, tarfile,
# zipfile, optparse, pdb, ssl, multiprocessing, unittest.mock, ...
TOP_LEVEL = """
__future__ _collections_abc _compression _markupbase _py_abc _strptime
_threading_local _weakrefset abc argparse ast base64 bisect bz2 calendar cmd
code codecs codeop colorsys configparser contextlib copy copyreg csv
dataclasses datetime difflib dis enum filecmp fileinput fnmatch fractions
functools genericpath getopt gettext glob graphlib gzip hashlib heapq hmac
inspect io ipaddress linecache lzma numbers opcode operator os pathlib pickle
pkgutil posixpath pprint queue quopri random reprlib runpy sched secrets
selectors shelve shlex shutil signal socketserver stat statistics string
subprocess tempfile textwrap threading timeit tokenize traceback types typing
uuid warnings weakref
""".split()

PACKAGE_FILES = """
asyncio/__init__.py asyncio/base_futures.py asyncio/base_tasks.py
asyncio/coroutines.py asyncio/events.py asyncio/exceptions.py
asyncio/futures.py asyncio/locks.py asyncio/protocols.py asyncio/queues.py
asyncio/runners.py asyncio/streams.py asyncio/taskgroups.py asyncio/tasks.py
asyncio/timeouts.py asyncio/transports.py
collections/__init__.py
concurrent/futures/__init__.py concurrent/futures/_base.py
concurrent/futures/process.py concurrent/futures/thread.py
email/__init__.py email/_encoded_words.py email/_parseaddr.py
email/_policybase.py email/base64mime.py email/charset.py
email/contentmanager.py email/encoders.py email/errors.py email/feedparser.py
email/generator.py email/header.py email/headerregistry.py email/iterators.py
email/message.py email/parser.py email/policy.py email/quoprimime.py
email/utils.py
http/__init__.py http/client.py http/cookies.py
importlib/__init__.py importlib/_bootstrap.py importlib/abc.py
importlib/util.py importlib/metadata/__init__.py
importlib/resources/_common.py importlib/resources/abc.py
json/__init__.py json/decoder.py json/encoder.py json/scanner.py json/tool.py
logging/__init__.py logging/config.py
re/__init__.py re/_compiler.py re/_constants.py re/_parser.py
tomllib/_parser.py tomllib/_re.py
unittest/__init__.py unittest/async_case.py unittest/case.py
unittest/loader.py unittest/main.py unittest/result.py unittest/runner.py
unittest/suite.py unittest/util.py
urllib/error.py urllib/parse.py urllib/response.py urllib/robotparser.py
wsgiref/handlers.py wsgiref/headers.py wsgiref/simple_server.py
wsgiref/util.py
xml/etree/ElementPath.py xml/etree/ElementTree.py xml/sax/__init__.py
xml/sax/expatreader.py xml/sax/handler.py xml/sax/saxutils.py
xml/sax/xmlreader.py
zoneinfo/_common.py zoneinfo/_tzpath.py zoneinfo/_zoneinfo.py
""".split()

SOURCE_FILES = tuple(sorted([f"{m}.py" for m in TOP_LEVEL] + PACKAGE_FILES))


def read_document(path: Path) -> str:
    text = path.read_bytes().decode("utf-8")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


FULL_NAME = "python_stdlib_full.jsonl.gz"
SKIP_DIRS = {"site-packages", "__pycache__", "encodings", "pydoc_data"}
MAX_BYTES = 320_000


def broken_on_purpose(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name.startswith(("badsyntax_", "bad_coding", "bad_getattr")) or (
        "/test" in f"/{rel}" and "_bad" in name and "data" in rel)


def pretrain_documents(stdlib: Path) -> tuple[list[tuple[str, str]], dict]:
    """(path, text) of every kept file, sorted by path, and the counts of what was left out and why."""
    kept, seen, skipped = [], set(), {"not utf-8": 0, "too large": 0, "broken on purpose": 0, "duplicate": 0,
                                      "generated or not stdlib": 0}
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if SKIP_DIRS & set(rel.split("/")[:-1]):
            skipped["generated or not stdlib"] += 1
            continue
        if broken_on_purpose(rel):
            skipped["broken on purpose"] += 1
            continue
        data = path.read_bytes()
        if len(data) > MAX_BYTES:
            skipped["too large"] += 1
            continue
        try:
            text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        except UnicodeDecodeError:
            skipped["not utf-8"] += 1
            continue
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if digest in seen or not text.strip():
            skipped["duplicate"] += 1
            continue
        seen.add(digest)
        kept.append((rel, text))
    return kept, skipped


def build_pretrain(stdlib: Path, out: Path, version: str) -> None:
    import gzip
    import io

    docs, skipped = pretrain_documents(stdlib)
    raw = "".join(json.dumps({"path": p, "text": t}, ensure_ascii=False) + "\n" for p, t in docs).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(raw)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (FULL_NAME + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(out / FULL_NAME)
    manifest = {
        "name": "python_stdlib_full",
        "description": "Every pure-Python file of the CPython standard library, test suite included, one document "
                       "per file (see scripts/build_corpus.py for what is left out and why).",
        "source": f"CPython {version} Lib/", "python_version": version, "license": "PSF-2.0",
        "attribution": "Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved. "
                       "Used under the PSF License Agreement, see LICENSE-PSF.txt.",
        "file": FULL_NAME, "num_documents": len(docs), "skipped": skipped,
        "total_text_bytes": sum(len(t.encode("utf-8")) for _, t in docs),
        "jsonl_sha256": hashlib.sha256(raw).hexdigest(), "gz_bytes": len(buf.getvalue()),
        "gz_sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
    }
    (out / "MANIFEST_full.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {FULL_NAME}: {len(docs)} documents, {manifest['total_text_bytes'] / 1e6:.1f} MB text, "
          f"{manifest['gz_bytes'] / 1e6:.1f} MB compressed; skipped {skipped}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                    help="CPython Lib directory to read (default: this interpreter's)")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--pretrain", action="store_true", help="build the pretraining corpus instead")
    args = ap.parse_args()
    if args.pretrain:
        build_pretrain(args.stdlib, args.out, ".".join(map(str, sys.version_info[:3])))
        return

    version = ".".join(map(str, sys.version_info[:3]))
    if version != EXPECTED_VERSION:
        print(f"warning: running Python {version}; the shipped corpus was built "
              f"from {EXPECTED_VERSION}, so the sha256 will differ", file=sys.stderr)

    missing = [p for p in SOURCE_FILES if not (args.stdlib / p).is_file()]
    if missing:
        sys.exit(f"missing from {args.stdlib}: {missing}")
    if len(set(SOURCE_FILES)) != len(SOURCE_FILES):
        sys.exit("duplicate entries in SOURCE_FILES")

    args.out.mkdir(parents=True, exist_ok=True)
    jsonl = args.out / JSONL_NAME
    total_bytes = 0
    with open(jsonl, "w", encoding="utf-8", newline="\n") as f:
        for rel in SOURCE_FILES:  # already sorted by path
            text = read_document(args.stdlib / rel)
            total_bytes += len(text.encode("utf-8"))
            f.write(json.dumps({"path": rel, "text": text}, ensure_ascii=False) + "\n")

    license_src = args.stdlib / "LICENSE.txt"
    if license_src.is_file():
        shutil.copyfile(license_src, args.out / "LICENSE-PSF.txt")

    manifest = {
        "name": "python_stdlib",
        "description": "Pure-Python modules of the CPython standard library, one document per file.",
        "source": f"CPython {version} Lib/ ({args.stdlib.name})",
        "python_version": version,
        "license": "PSF-2.0",
        "attribution": "Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved. "
                       "Used under the PSF License Agreement, see LICENSE-PSF.txt.",
        "file": JSONL_NAME,
        "num_documents": len(SOURCE_FILES),
        "total_text_bytes": total_bytes,
        "jsonl_bytes": jsonl.stat().st_size,
        "sha256": sha256_file(jsonl),
    }
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {jsonl.relative_to(REPO) if jsonl.is_relative_to(REPO) else jsonl}: "
          f"{len(SOURCE_FILES)} documents, {total_bytes / 1e6:.2f} MB text, "
          f"sha256 {manifest['sha256']}")


if __name__ == "__main__":
    main()
