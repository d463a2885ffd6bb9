"""Writes the English prose that this machine's Debian packages ship (info manuals, man pages of sections 3, 5, 7
and 8) as {"source", "text"} JSON lines: real technical text, unlike the fictional facts, for training a query
reasoner with data/make_passages.py --texts.

    python data/local_prose.py --out runs/prose.jsonl --exclude-packages shared-mime-info libtasn1-doc libtasn1-6
    python data/make_passages.py --texts runs/prose.jsonl --out runs/prose-passages.jsonl

Paragraphs are kept one per line-free block (an info manual's wrapped lines joined, a man page rendered by `man`
with one line per paragraph); headings, menus, node lines and indented blocks (code examples) are dropped, and
make_passages.py keeps only prose sentences. Every file of an --exclude-packages package is left out (by `dpkg
-L`), so that a check on those packages' own documents (data/pdf_retrieval.py on the PDFs they ship) tests text the
reasoner never saw. Only what is installed here is read; nothing is downloaded.
"""

import argparse
import gzip
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_facts import write_jsonl  # noqa: E402  (a sibling script, not a package)

INFO, MAN = Path("/usr/share/info"), Path("/usr/share/man")
MAN_SECTIONS = ("man3", "man5", "man7", "man8")  # library calls, file formats, overviews, administration
NOT_PROSE = re.compile(r"^(File: .*Node:|\* |INFO-DIR|START-INFO|END-INFO|Tag Table:|End Tag Table)")  # a line
UNDERLINE = re.compile(r"^[*=\-.]{3,}$")  # under a heading: the block is a heading


def package_files(packages):
    """Every path that `dpkg -L` lists for the packages (a package that is not installed lists nothing)."""
    files = set()
    for package in packages:
        listed = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
        files |= {os.path.realpath(line) for line in listed.stdout.splitlines() if line.startswith("/")}
    return files


def info_paragraphs(text):
    """An info manual's paragraphs, each on one line: blocks between blank lines, minus node lines, menus,
    headings (a block with an underline) and blocks indented as a whole (examples, quoted licences)."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text.replace("\x1f", "\n\n")):
        lines = [line for line in block.splitlines() if line.strip() and not NOT_PROSE.match(line.strip())]
        heading = any(UNDERLINE.match(line.strip()) for line in lines)
        if lines and not heading and not all(line.startswith("     ") for line in lines):
            paragraphs.append(" ".join(" ".join(lines).split()))
    return paragraphs


def man_paragraphs(path):
    """A man page rendered by `man` at a width no paragraph reaches, so each paragraph is one line; the header and
    footer lines (the page name twice) and section headings (no lower-case letter) are dropped."""
    rendered = subprocess.run(["man", "-l", "-P", "cat", str(path)], capture_output=True, text=True,
                              env={**os.environ, "MANWIDTH": "4000", "MAN_KEEP_FORMATTING": ""}, errors="replace")
    lines = rendered.stdout.splitlines()[1:-1]
    return [" ".join(line.split()) for line in lines if re.search(r"[a-z]", line) and len(line.split()) > 3]


def local_texts(excluded):
    """[(source, paragraphs)] of every info manual and man page here, sorted by source, minus excluded paths."""
    info = sorted(p for p in INFO.glob("*.info*.gz") if os.path.realpath(p) not in excluded)
    man = sorted(p for section in MAN_SECTIONS for p in (MAN / section).glob("*")
                 if p.is_file() and os.path.realpath(p) not in excluded)
    texts = [(str(p), info_paragraphs(gzip.open(p, "rt", errors="replace").read())) for p in info]
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # man pages render in a process each
        texts += zip(map(str, man), pool.map(man_paragraphs, man))
    return sorted((source, paragraphs) for source, paragraphs in texts if paragraphs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="the .jsonl file to write")
    parser.add_argument("--exclude-packages", nargs="*", default=[], help="Debian packages whose files are left out")
    args = parser.parse_args()
    texts = local_texts(package_files(args.exclude_packages))
    write_jsonl(args.out, [{"source": source, "text": "\n\n".join(paragraphs)} for source, paragraphs in texts])
    words = sum(len(p.split()) for _, paragraphs in texts for p in paragraphs)
    print(f"{args.out}: {len(texts)} texts, {words:,} words")


if __name__ == "__main__":
    main()
