"""Does a passage copied from a PDF find the chunk it came from? The retrieval check of the memory work (README,
Evaluation), for any PDF and any trained adapters.

    python data/pdf_retrieval.py paper.pdf --adapters data/adapters/facts [runs/e2e ...]

The PDF is cut into chunks as `index --pdf` cuts it. From every chunk with at least three sentences of eight words
or more, two consecutive sentences from inside it (never its first) are the question; each adapters' query
reasoner encodes it, and the check ranks its own chunk among all the PDF's chunks by cosine, as `ask --index`
does. It prints, per adapters, how often that chunk comes first and in the top 3. The passages are drawn with a
random.Random seeded with a string, so every adapters get the same ones.
"""

import argparse
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import clara  # noqa: E402  (before mlx: OpenBLAS)
import mlx.core as mx  # noqa: E402

MIN_WORDS = 8  # a sentence of fewer words (a heading, a table cell) is not a passage


def passages(chunks, seed="pdfcheck"):
    """[(chunk index, passage)]: two consecutive sentences from inside each chunk that has three or more."""
    draw, picked = random.Random(seed), []
    for i, chunk in enumerate(chunks):
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", chunk["text"]) if len(s.split()) >= MIN_WORDS]
        if len(sentences) >= 3:
            first = draw.randrange(1, len(sentences) - 1)
            picked.append((i, " ".join(sentences[first:first + 2])))
    return picked


def ranks(reader, index, questions):
    """The rank (0 = first) of each (chunk index, question)'s own chunk among the index's, by the query reasoner."""
    found = []
    for i, question in questions:
        query = clara.encode_question(reader.model, reader.tokenizer, reader.cfg, question).astype(mx.float32)
        scores = index["keys"] @ clara.unit(query)  # (N,) cosine, as ask --index
        found.append((scores > scores[i]).sum().item())
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pdf", type=Path)
    parser.add_argument("--adapters", nargs="+", required=True, help="run folders (or checkpoints) to compare")
    args = parser.parse_args()
    try:
        pages = clara.extract_pdf_pages(args.pdf)
        for adapters in args.adapters:
            reader = clara.load(adapters)
            chunks = clara.pdf_chunks(pages, reader.tokenizer, reader.cfg)
            questions = passages(chunks)
            if not questions:
                raise clara.InputError(f"{args.pdf}: no chunk has three sentences of {MIN_WORDS} words or more")
            found = ranks(reader, reader.index(chunks), questions)
            first, top3, n = sum(r == 0 for r in found), sum(r < 3 for r in found), len(found)
            print(f"{adapters}: {len(chunks)} chunks, {n} passages: first {first}/{n} ({100 * first / n:.0f}%), "
                  f"top 3 {top3}/{n} ({100 * top3 / n:.0f}%)", flush=True)
    except clara.InputError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
