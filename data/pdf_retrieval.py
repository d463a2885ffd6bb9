"""Does a passage copied from a PDF find the chunk it came from? The retrieval check of the memory work (README,
Evaluation), for any PDF and any trained adapters.

    python data/pdf_retrieval.py paper.pdf --adapters data/adapters/facts [runs/e2e ...]

The PDF is cut into chunks as `index --pdf` cuts it. From every chunk with at least three sentences of eight words
or more, two consecutive sentences from inside it (never its first) are the question; each adapters' query
reasoner encodes it, and the check ranks its own chunk among all the PDF's chunks by cosine, as `ask --index`
does, and as its default hybrid retrieval does (that ranking fused with BM25's). It prints, per adapters and
ranking, how often that chunk comes first and in the top 3 and 5. The passages are drawn with a
random.Random seeded with a string, so every adapters get the same ones.

    python data/pdf_retrieval.py data/ask/libtasn1.pdf --adapters data/adapters/wiki-reasoner \
        --questions data/ask/libtasn1-questions.jsonl

With --questions (JSON Lines of {"question", "answer", "evidence"}, the evidence copied from the PDF), the questions
are a user's instead: each one's own chunk is the one that holds its evidence, and `ask --index`'s answer from the
top-k chunks' memory (--context text: their text; --top-k: how many) is scored against "answer" (EM, F1, cover-EM).
Two such files ship: the Libtasn1 manual's is the test of the shipped reasoner; data/ask/shared-mime-info-spec.pdf's,
the development set that choices are made on. With --own-chunk there is no retrieval: each question is answered from
its own chunk alone, from its memory, from its text and with no document (eval's three contexts), which measures the
memory against the text on documents no run trained on.
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


def rankings(reader, index, questions, role="query", retrievals=("dense", "hybrid")):
    """The rank (0 = first) of each (chunk index, question)'s own chunk among the index's, in each of ask --index's
    rankings, the questions encoded once: {"dense": by the query reasoner's cosine (or the compressor's,
    role="compressor", as a reasoner's starting point), "hybrid": that fused with BM25's}."""
    texts = [question for _, question in questions]
    queries = [clara.encode_question(reader.model, reader.tokenizer, reader.cfg, q, role).astype(mx.float32)
               for q in texts]
    found = {}
    for retrieval in retrievals:
        ranked = clara.rank_chunks(index, texts, queries, reader.bm25(index) if retrieval == "hybrid" else None)
        found[retrieval] = [order.index(i) for (i, _), (order, _, _) in zip(questions, ranked)]
    return found


def ranks(reader, index, questions, role="query"):
    """The dense ranks alone (rankings): the query reasoner's cosine, CLaRa's retrieval."""
    return rankings(reader, index, questions, role, ("dense",))["dense"]


def own_chunks(chunks, path):
    """[(chunk index, question, answer)] of a --questions file: the one chunk holding each question's evidence."""
    flat = [" ".join(c["text"].split()) for c in chunks]
    found = []
    for n, obj in clara.read_jsonl(path):
        evidence = " ".join(str(obj.get("evidence", "")).split())
        holders = [i for i, text in enumerate(flat) if evidence and evidence in text]
        if len(holders) != 1:
            raise clara.InputError(f"{path}:{n}: its evidence is in {len(holders)} chunks, not one")
        found.append((holders[0], obj["question"], obj["answer"]))
    return found


def answer_scores(reader, index, questions, context="compressed"):
    """EM / F1 / cover-EM (%) of ask --index's answers to [(chunk index, question, answer)], read from the top-k
    chunks' memory (or their text: ask --index --context text)."""
    answers = [a for a, _ in reader.ask_index(index, [q for _, q, _ in questions], max_new_tokens=32,
                                              context=context)]
    golds = [gold for _, _, gold in questions]
    return {name: 100 * sum(metric(a, g) for a, g in zip(answers, golds)) / len(golds) for name, metric in
            (("EM", clara.exact_match), ("F1", clara.token_f1), ("cover-EM", clara.cover_exact_match))}, answers


def own_chunk_scores(reader, chunks, asked):
    """{context: eval's summary (em, f1, cover_em, ce)} of [(chunk index, question, answer)] answered from each one's
    own chunk alone: its memory, its text, no document."""
    records = [{"question": question, "docs": [chunks[i]["text"]], "gold": gold} for i, question, gold in asked]
    return reader.evaluate(records, list(clara.EVAL_CONTEXTS), max_new_tokens=32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pdf", type=Path)
    parser.add_argument("--adapters", nargs="+", required=True, help="run folders (or checkpoints) to compare")
    parser.add_argument("--questions", type=Path, help="a user's questions about the PDF (JSON Lines of question, "
                        "answer, evidence) instead of copied passages; their answers are scored too")
    parser.add_argument("--context", choices=clara.ANSWER_CONTEXTS, default="compressed",
                        help="with --questions: answer from the retrieved chunks' memory or their text")
    parser.add_argument("--top-k", type=int, help="chunks the answers read [default: the adapters']")
    parser.add_argument("--own-chunk", action="store_true", help="with --questions: no retrieval; answer each from "
                        "its own chunk's memory, its text and no document")
    args = parser.parse_args()
    try:
        if args.own_chunk and not args.questions:
            raise clara.InputError("--own-chunk needs --questions (whose evidence marks each question's own chunk)")
        pages = clara.extract_pdf_pages(args.pdf)
        for adapters in args.adapters:
            reader = clara.load(adapters, **({} if args.top_k is None else {"top_k": args.top_k}))
            chunks = clara.pdf_chunks(pages, reader.tokenizer, reader.cfg)
            asked = own_chunks(chunks, args.questions) if args.questions else None
            if args.own_chunk:
                for context, r in own_chunk_scores(reader, chunks, asked).items():
                    print(f"{adapters}: {len(asked)} questions, each from its own chunk, {context}: EM "
                          f"{100 * r['em']:.1f}, F1 {100 * r['f1']:.1f}, cover-EM {100 * r['cover_em']:.1f}, "
                          f"answer CE {r['ce']:.3f}", flush=True)
                continue
            questions = [(i, q) for i, q, _ in asked] if asked else passages(chunks)
            if not questions:
                raise clara.InputError(f"{args.pdf}: no chunk has three sentences of {MIN_WORDS} words or more")
            index = reader.index(chunks)
            by_retrieval = rankings(reader, index, questions)
            for retrieval, found in by_retrieval.items():
                n, k = len(found), reader.cfg.top_k
                counts = {"first": sum(r == 0 for r in found), "top 3": sum(r < 3 for r in found),
                          f"top {k}": sum(r < k for r in found)}
                line = ", ".join(f"{name} {c}/{n} ({100 * c / n:.0f}%)" for name, c in counts.items())
                print(f"{adapters}: {len(chunks)} chunks, {n} {'questions' if asked else 'passages'}, {retrieval}: "
                      f"{line}", flush=True)
            if asked:  # answered as ask --index answers (the adapters' retrieval: hybrid unless set)
                scores, answers = answer_scores(reader, index, asked, args.context)
                for (i, question, gold), answer, rank in zip(asked, answers, by_retrieval[reader.cfg.retrieval]):
                    print(f"  chunk {i} at rank {rank + 1} | {question} | gold: {gold} | answer: {answer}")
                read = "text" if args.context == "text" else "memory"
                print(f"{adapters}: answers from the top {k} chunks' {read}: " +
                      ", ".join(f"{name} {value:.1f}" for name, value in scores.items()), flush=True)
    except clara.InputError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
