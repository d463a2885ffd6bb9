"""Writes stage-3 retrieval data from real English text that ships with Python, the standard library's
docstrings: each record asks which of --candidates chunks a passage was copied from.

    python data/make_passages.py --out runs/passages.jsonl [--chunks-out runs/passages.chunks.jsonl]
    python clara.py e2e --data runs/passages.jsonl --init runs/sft --retrieval-loss contrastive --out runs/e2e
    python clara.py eval --adapters runs/e2e --data runs/passages.jsonl     # recall@k on the "eval" records
    python clara.py index --data runs/passages.chunks.jsonl --adapters runs/e2e --out runs/stdlib-index

A module's documentation (its docstring, then its public classes, methods and functions by name; code
examples and doctests dropped, non-prose sentences too) is packed into chunks of at most --chunk-words words,
cut between sentences, which keeps a chunk under CLaRa's 256-token documents. A record's "question" is one or
two consecutive sentences copied verbatim from a chunk; "docs" holds that chunk among --candidates - 1 others
of the same split, none containing the passage, and "pos_index" says where it is. "answer", the module's
name, is there because clara.py's parser requires one: --retrieval-loss contrastive ignores it. Every
--eval-every-th module is "split": "eval", so no eval chunk is trained on. The output depends only on the
options and the Python version (printed): everything is sorted, and every draw comes from a random.Random
seeded with a string, never from the global random module.
"""

import argparse
import contextlib
import inspect
import io
import json
import random
import re
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_facts import run_main, write_jsonl  # noqa: E402  (a sibling script, not a package)

# Pure-Python modules whose import only defines things. Left out: those with side effects at import (this,
# antigravity, idlelib, tkinter, turtle, ensurepip) and those deprecated in 3.11, which later Pythons remove.
MODULES = sorted("""
    abc argparse ast asyncio.base_events asyncio.events asyncio.futures asyncio.locks asyncio.queues
    asyncio.streams asyncio.subprocess asyncio.tasks base64 bdb bisect bz2 calendar cmd code codecs codeop
    collections collections.abc colorsys compileall concurrent.futures concurrent.futures.process
    concurrent.futures.thread configparser contextlib copy copyreg cProfile csv dataclasses datetime dbm
    difflib dis doctest email email.charset email.errors email.feedparser email.generator email.header
    email.headerregistry email.message email.parser email.policy email.utils enum filecmp fileinput fnmatch
    fractions ftplib functools getopt getpass gettext glob graphlib gzip hashlib heapq hmac html html.parser
    http http.client http.cookiejar http.cookies http.server imaplib importlib importlib.abc
    importlib.machinery importlib.metadata importlib.resources importlib.util inspect io ipaddress json
    json.decoder json.encoder keyword linecache locale logging logging.config logging.handlers lzma mailbox
    mimetypes modulefinder multiprocessing.connection multiprocessing.managers multiprocessing.pool
    multiprocessing.process multiprocessing.queues multiprocessing.shared_memory netrc numbers opcode operator
    optparse os pathlib pdb pickle pickletools pkgutil platform plistlib poplib posixpath pprint profile
    pstats pty py_compile pyclbr pydoc queue quopri random re reprlib rlcompleter runpy sched secrets
    selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string
    stringprep struct subprocess symtable sysconfig tabnanny tarfile tempfile textwrap threading timeit token
    tokenize tomllib trace traceback tracemalloc tty types typing unittest.case unittest.loader unittest.mock
    unittest.result unittest.runner unittest.suite urllib.parse urllib.request urllib.robotparser uuid
    warnings wave weakref webbrowser wsgiref.handlers wsgiref.headers wsgiref.simple_server wsgiref.util
    wsgiref.validate xml.dom.minidom xml.dom.pulldom xml.etree.ElementTree xml.sax xml.sax.handler
    xml.sax.saxutils xml.sax.xmlreader xmlrpc.client xmlrpc.server zipapp zipfile zipimport zoneinfo
""".split())
MIN_CHUNK_WORDS = 40  # a shorter chunk (a module's tail, a module with tiny docs) is dropped: too little to tell apart
PASSAGE_WORDS = (8, 40)  # long enough to point at one chunk, short enough to read as a query
# a sentence ends at . ! or ? before a space and a capital, a quote or a bracket ("e.g. the" stays whole)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(\[`])")
# A plain English word: letters, a capital at most first, punctuation around. A sentence of mostly other words
# is code, a signature or a list of constants, at 2-10 tokens a word instead of English's ~1.4.
PLAIN_WORD = re.compile(r"[(\"'`]*[A-Za-z]?[a-z]+(['-][a-z]+)*[)\"'`]*[,.;:!?]*[)\"'`]*")
PROSE_SHARE = 0.8  # the share of plain words that makes a sentence prose


def clean_docstring(doc):
    """A docstring's paragraphs, each on one line, the last ending in a stop. A paragraph indented as a whole
    is a code example or a literal block, and a doctest (a >>> line and its output) runs to its paragraph's
    end: both are dropped."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = block.splitlines()
        doctest = next((k for k, line in enumerate(lines) if line.lstrip().startswith(">>>")), len(lines))
        text = " ".join(" ".join(lines[:doctest]).replace("::", ":").split())
        if text and not all(line.startswith((" ", "\t")) for line in lines):
            paragraphs.append(text)
    if paragraphs and not paragraphs[-1].endswith((".", "!", "?", ":")):  # one-line docstrings often lack it,
        paragraphs[-1] += "."  # and the next docstring's first sentence would run on from this one
    return paragraphs


def public_docs(module):
    """The module's docstring, then its own public classes (each with its methods) and functions, by name.
    Names imported from elsewhere are skipped, so a docstring belongs to one module only."""
    docs = [module.__doc__]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):  # vars(), not dir(): an inherited method's docstring is its base's
            docs += [obj.__doc__] + [m.__doc__ for n, m in sorted(vars(obj).items()) if not n.startswith("_") and
                                     (inspect.isfunction(m) or isinstance(m, (classmethod, staticmethod, property)))]
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            docs.append(obj.__doc__)
    return [d for d in docs if isinstance(d, str) and d.strip()]


def is_prose(sentence):
    words = sentence.split()
    return sum(PLAIN_WORD.fullmatch(w) is not None for w in words) >= PROSE_SHARE * len(words)


def module_sentences(name, seen):
    """The module's prose sentences, or [] if it fails to import. `seen` holds earlier modules' paragraphs:
    a repeated one (a shared base-class docstring) would give two chunks one passage."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # deprecated names (typing.io) warn when their docs are read
        try:
            docs = public_docs(__import__(name, fromlist=["_"]))
        except Exception:  # a module this build lacks (sqlite3 without _sqlite3, say) is skipped
            return []
    return prose_sentences((p for doc in docs for p in clean_docstring(doc)), seen)


def prose_sentences(paragraphs, seen):
    """The prose sentences of paragraphs (one line each) not in `seen`, which then holds them."""
    sentences = []
    for paragraph in paragraphs:
        if paragraph not in seen:
            seen.add(paragraph)
            sentences += [s for s in SENTENCE_END.split(paragraph) if is_prose(s)]
    return sentences


def texts_sentences(path):
    """(source, prose sentences) of each {"source", "text"} line of a --texts file (data/local_prose.py writes
    one), its paragraphs separated by blank lines."""
    seen = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)
            yield text["source"], prose_sentences(text["text"].split("\n\n"), seen)


def pack_chunks(sentences, chunk_words):
    """Consecutive sentences packed greedily into chunks of at most chunk_words words. A longer sentence (a
    table flattened into one line, usually) is left out rather than cut in the middle."""
    chunks, current, n_current = [], [], 0
    for sentence in sentences:
        n = len(sentence.split())
        if n > chunk_words:
            continue
        if current and n_current + n > chunk_words:
            chunks.append(current)
            current, n_current = [], 0
        current, n_current = current + [sentence], n_current + n
    return [c for c in chunks + [current] if sum(len(s.split()) for s in c) >= MIN_CHUNK_WORDS]


def module_sentences_all():
    """(module, prose sentences) of every module of MODULES, in order."""
    seen = set()
    return ((name, module_sentences(name, seen)) for name in MODULES)


def source_chunks(sources, chunk_words=130, max_chunks=None, eval_every=10):
    """[(source, split, the sentences of one chunk)] in source order, from (source, sentences) pairs; split is
    "eval" for every eval_every-th source that gives a chunk, else "train". max_chunks caps each split."""
    out, counts, kept = [], {"train": 0, "eval": 0}, 0
    for name, sentences in sources:
        chunks = pack_chunks(sentences, chunk_words)
        split = "eval" if kept % eval_every == eval_every - 1 else "train"
        kept += bool(chunks)  # only sources that give chunks count, so the eval share stays ~1/eval_every
        for sentences in chunks[:sys.maxsize if max_chunks is None else max_chunks - counts[split]]:
            counts[split] += 1
            out.append((name, split, sentences))
    return out


def passages(rng, sentences, count):
    """Up to `count` distinct passages: one or two consecutive sentences of PASSAGE_WORDS words, verbatim."""
    spans = [" ".join(sentences[i:i + k]) for k in (1, 2) for i in range(len(sentences) - k + 1)]
    spans = [s for s in spans if PASSAGE_WORDS[0] <= len(s.split()) <= PASSAGE_WORDS[1]]
    return rng.sample(spans, min(count, len(spans)))


def draw_candidates(rng, pool, i, passage, count, siblings=(), n_near=0):
    """pool[i] and `count` other chunks of the pool, none containing the passage, pool[i] at a random
    position; up to n_near of them drawn from `siblings` (indices of other chunks of pool[i]'s own source, the
    hardest to tell apart, as a PDF's chunks are among each other). Returns (texts, that position)."""
    near = rng.sample(siblings, min(n_near, len(siblings))) if n_near else []
    drawn = [j + (j >= i) for j in rng.sample(range(len(pool) - 1), min(count + len(near), len(pool) - 1))]  # not i
    others = [pool[j] for j in (near + [j for j in drawn if j not in near])[:count]]
    if any(passage in text for text in others):  # rare (repeated paragraphs were dropped), so filter only then
        others = rng.sample([text for j, text in enumerate(pool) if j != i and passage not in text], count)
    position = rng.randint(0, count)
    return others[:position] + [pool[i]] + others[position:], position


def check_options(chunk_words, n_candidates, eval_every, passages_per_chunk, max_chunks):
    """Raises ValueError with a one-line reason for options that cannot make the file."""
    cap = 1 if max_chunks is None else max_chunks
    if chunk_words < MIN_CHUNK_WORDS or eval_every < 2 or min(n_candidates, passages_per_chunk, cap) < 1:
        raise ValueError(f"--chunk-words must be >= {MIN_CHUNK_WORDS}, --eval-every >= 2 (1 would hold out every "
                         "module), --candidates, --passages-per-chunk and --max-chunks >= 1")


def write_passages(out, seed=0, chunk_words=130, candidates=20, eval_every=10, passages_per_chunk=2,
                   max_chunks=None, chunks_out=None, texts=None, same_source=0):
    """Writes the records to `out` (and the chunks, as clara.py index --data reads them, to `chunks_out`);
    returns the summary lines. The text is the standard library's docstrings, or the --texts file's."""
    check_options(chunk_words, candidates, eval_every, passages_per_chunk, max_chunks)
    sources = module_sentences_all() if texts is None else texts_sentences(texts)
    chunks = source_chunks(sources, chunk_words, max_chunks, eval_every)
    records, counts = [], {}
    for split in ("train", "eval"):
        mine = [(name, sentences) for name, s, sentences in chunks if s == split]
        pool = [" ".join(sentences) for _, sentences in mine]
        if len(pool) < candidates:
            raise ValueError(f"the {split} split has {len(pool)} chunks, fewer than --candidates {candidates}")
        n_before, by_source = len(records), {}
        for i, (name, _) in enumerate(mine):
            by_source.setdefault(name, []).append(i)
        for i, (name, sentences) in enumerate(mine):
            rng = random.Random(f"{seed}-{split}-{i}")  # its own rng: a record does not depend on its neighbours
            siblings = [j for j in by_source[name] if j != i] if same_source else []
            for passage in passages(rng, sentences, passages_per_chunk):
                docs, position = draw_candidates(rng, pool, i, passage, candidates - 1, siblings, same_source)
                records.append({"question": passage, "docs": docs, "answer": name, "pos_index": [position],
                                **({"split": "eval"} if split == "eval" else {})})
        counts[split] = (len(records) - n_before, len(pool), len({name for name, _ in mine}))
    rows = [{"text": " ".join(sentences), "source": name} for name, _, sentences in chunks]
    for path, lines in [(out, records)] + ([(chunks_out, rows)] if chunks_out else []):
        write_jsonl(path, lines)  # its folder made, renamed when complete: a killed run leaves no half file
    (r, c, m), (er, ec, em) = counts["train"], counts["eval"]
    return [f"{out}: {r + er} records ({r} train / {er} eval), {c + ec} chunks ({c} / {ec}), {m + em} "
            f"{'modules' if texts is None else 'texts'} ({m} / {em}); Python {' '.join(sys.version.split())}"] + \
        ([f"{chunks_out}: {len(rows)} chunks, for clara.py index --data"] if chunks_out else [])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the .jsonl file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-words", type=int, default=130,  # docstrings run 1.3-1.8 SmolLM2 tokens a word
                        help="most words per chunk (130: at most 212 tokens on Python 3.11; 150 gives 266)")
    parser.add_argument("--candidates", type=int, default=20, help="chunks per record, the positive included")
    parser.add_argument("--eval-every", type=int, default=10, help="every Nth documented module is held out")
    parser.add_argument("--passages-per-chunk", type=int, default=2, help="records per chunk, at most")
    parser.add_argument("--max-chunks", type=int, default=None, help="chunks per split, at most (for tests)")
    parser.add_argument("--chunks-out", default=None, help="also write the chunks as {text, source} lines")
    parser.add_argument("--texts", default=None, help="a JSONL of {source, text} (data/local_prose.py writes one) "
                        "instead of the standard library's docstrings; every Nth source is held out")
    parser.add_argument("--same-source", type=int, default=0,
                        help="up to this many of a record's other candidates come from its chunk's own source")
    run_main(parser, write_passages, argv)


if __name__ == "__main__":
    main()
