"""Turns real question-answering data into Apple's record formats for the three stages: SQuAD v1.1 in the official
file's format and Natural Questions paragraphs in the QED release's format. Whole articles are held out.

    python data/make_wiki.py --out runs/wiki \\
        [--squad ../shared/data/squad/train-v1.1.json.gz] [--nq ../shared/data/nq/qed-train.jsonl.gz]

The official train-v1.1.json (plain or gzipped) reads the same way; `--nq ""` leaves Natural Questions out.
Every article (a SQuAD title, an NQ paragraph's Wikipedia title; the same title in both is one article) goes to
one split by a hash of its name: VAL_SHARE of them validate, TEST_SHARE are the test set that the README's
real-text table scores, the rest train. A paragraph longer than MAX_CHARS is cut at the last sentence end before
it (the compressor reads 256 tokens: 1,000 characters of English keep 99% of paragraphs whole in tokens), and a
question whose answer lies past the cut is dropped, so every kept answer is in what the compressor reads.

Files written into --out (JSON Lines; "split": "eval" marks validation records, which training never takes):
  stage1.jsonl        per training and validation paragraph: a "qa" record (its questions and answers) and a
                      "paraphrase" record whose target is the paragraph itself (there is no paraphrasing model
                      offline: it is Apple's paraphrase prompt with a verbatim target, README)
  mix.jsonl           the qa records of MIX_PARAGRAPHS training paragraphs drawn at random, which sft --stage1-data
                      mixes into stage 2 (the shipped fictional recipe does so)
  stage2.jsonl        each training question with its paragraph among DISTRACTORS others of its own article
                      (fewer there: others of its source and split), then VAL_QUESTIONS validation ones
  stage3.jsonl        each training question among CANDIDATES paragraphs, up to SAME_ARTICLE of them from its own
                      article, the rest of its source and split, "pos_index" marking its own; then validation ones
  test-squad.jsonl    the SQuAD test articles' questions in stage 2's shape, shuffled ("split": "eval"), so
  test-nq.jsonl       `eval --max-records 400` takes a spread of articles; and the same for Natural Questions
  test-squad-stage3.jsonl, test-nq-stage3.jsonl   the test questions in stage 3's shape
  test-squad-own.jsonl, test-nq-own.jsonl   the test questions with their own paragraph alone (the gold passage)
The output depends only on the inputs and the options: every draw comes from a random.Random seeded with a string.
"""

import argparse
import gzip
import hashlib
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import make_facts  # noqa: E402
from make_facts import run_main, write_jsonl  # noqa: E402

SHARED = HERE.parent.parent / "shared" / "data"
VAL_SHARE, TEST_SHARE = 0.04, 0.07  # of the articles: validation, and the test set (7% of NQ's gives ~500)
MAX_CHARS = 1000  # a paragraph is cut at the last sentence end before this (the compressor reads 256 tokens)
DISTRACTORS, CANDIDATES, SAME_ARTICLE = 2, 20, 7  # stage 2's other paragraphs; stage 3's candidates, hard ones
MIX_PARAGRAPHS = 5_000  # mix.jsonl: the qa records of this many training paragraphs (sft --stage1-data)
VAL_QUESTIONS = 800  # validation questions in stage 2 and 3 (a validation pass scores each one)
STAGE3_QUESTIONS = 20_000  # training questions in stage 3 (each carries 20 paragraphs: 0.3 GB)
TEST_QUESTIONS = 1_000  # test questions kept per source, shuffled across its articles


def split_of(title):
    """'train', 'val' or 'test' for an article, from a hash of its name (stable across runs and machines)."""
    key = title.replace("_", " ").strip().lower()
    share = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "val" if share < VAL_SHARE else "test" if share < VAL_SHARE + TEST_SHARE else "train"


def cut_paragraph(text):
    """text up to the last sentence end before MAX_CHARS (a space if it has none); shorter text is kept whole."""
    text = " ".join(text.split())
    if len(text) <= MAX_CHARS:
        return text
    end = text.rfind(". ", 0, MAX_CHARS)
    return text[: end + 1] if end > 0 else text[: text.rfind(" ", 0, MAX_CHARS)]


def open_text(path):
    path = Path(path)
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_squad(path):
    """The official SQuAD file -> [{"source", "title", "text", "qa": [(question, answer)]}], one per paragraph."""
    try:
        with open_text(path) as f:
            articles = json.load(f)["data"]
        paragraphs = []
        for article in articles:
            for paragraph in article["paragraphs"]:
                text = " ".join(paragraph["context"].split())
                qa = [(q["question"].strip(), q["answers"][0]["text"].strip()) for q in paragraph["qas"]]
                paragraphs.append({"source": "squad", "title": article["title"], "text": text, "qa": qa})
    except (OSError, EOFError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{path}: not a SQuAD file in the official format ({type(e).__name__}: {e})") from None
    return paragraphs


def read_qed(path):
    """The QED release of Natural Questions (JSON Lines) -> paragraphs as read_squad's, one question each."""
    paragraphs = []
    try:
        with open_text(path) as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    r = json.loads(line)
                    answers = r["answer_text"]
                    answers = json.loads(answers) if isinstance(answers, str) else answers
                    paragraphs.append({"source": "nq", "title": r["title_text"], "text": r["paragraph_text"],
                                       "qa": [(r["question_text"].strip().rstrip("?") + "?", answers[0].strip())]})
    except (OSError, EOFError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{path}: not the QED release's JSON Lines ({type(e).__name__}: {e})") from None
    return paragraphs


def kept(paragraphs):
    """Each paragraph cut to MAX_CHARS, keeping the questions whose answer is still in it; ones with none dropped."""
    out = []
    for p in paragraphs:
        text = cut_paragraph(p["text"])
        qa = [(q, a) for q, a in p["qa"] if q.strip("? ") and a and a.lower() in text.lower()]
        if qa:
            out.append({**p, "text": text, "qa": qa})
    return out


def with_others(rng, paragraph, article, pool, count, hard):
    """The paragraph's text among `count` others, up to `hard` of them from its own article, the rest drawn from pool;
    at a random place. -> (texts, its index)"""
    own = [p["text"] for p in article if p["text"] != paragraph["text"]]
    others = rng.sample(own, min(hard, len(own)))
    while len(others) < count:
        text = rng.choice(pool)["text"]
        if text != paragraph["text"] and text not in others:
            others.append(text)
    rng.shuffle(others)
    position = rng.randint(0, count)
    return others[:position] + [paragraph["text"]] + others[position:], position


def question_records(rng, paragraphs, count, split, marked=False):
    """Every question of the paragraphs, each among `count` others (marked: stage 3, SAME_ARTICLE of them at most
    from its own article, and its position as "pos_index"; else all it can from its own article)."""
    articles, pools = {}, {}
    for p in paragraphs:
        articles.setdefault((p["source"], p["title"]), []).append(p)
        pools.setdefault(p["source"], []).append(p)
    for source, pool in pools.items():
        if len(pool) <= count:
            raise ValueError(f"{len(pool)} {source} paragraph(s) in a split, but a record needs {count + 1}: "
                             "give more articles")
    records = []
    for p in paragraphs:
        for question, answer in p["qa"]:
            docs, position = with_others(rng, p, articles[(p["source"], p["title"])], pools[p["source"]], count,
                                         SAME_ARTICLE if marked else count)
            records.append({"question": question, "docs": docs, "answer": answer,
                            **({"pos_index": [position]} if marked else {}), **split})
    return records


def stage1_records(paragraphs, split):
    """Apple's stage-1 records of each paragraph (make_facts.stage1_records): a "qa" one and a "paraphrase" one,
    whose target is the paragraph itself."""
    return make_facts.stage1_records([{**p, "paraphrase": p["text"]} for p in paragraphs], split)


def sample(rng, records, n):
    """n of the records drawn with rng, in their order (all of them if there are fewer)."""
    return [records[i] for i in sorted(rng.sample(range(len(records)), min(n, len(records))))]


def write_all(out, squad=str(SHARED / "squad" / "train-v1.1.json.gz"),
              nq=str(SHARED / "nq" / "qed-train.jsonl.gz")):
    """Writes the files into `out`; returns one summary line per file and one of the splits' counts."""
    paragraphs = kept(read_squad(squad) + (read_qed(nq) if nq else []))
    parts = {name: [p for p in paragraphs if split_of(p["title"]) == name] for name in ("train", "val", "test")}
    if not parts["train"] or not parts["val"]:
        raise ValueError("too few articles to hold some out: training and validation need one each")
    rng = random.Random("wiki")
    val = {"split": "eval"}
    files = {"stage1": stage1_records(parts["train"], {}) + stage1_records(parts["val"], val),
             "mix": stage1_records(sample(random.Random("wiki-mix"), parts["train"], MIX_PARAGRAPHS), {})[::2],
             "stage2": question_records(rng, parts["train"], DISTRACTORS, {}) +
             sample(rng, question_records(rng, parts["val"], DISTRACTORS, val), VAL_QUESTIONS),
             "stage3": sample(rng, question_records(rng, parts["train"], CANDIDATES - 1, {}, True), STAGE3_QUESTIONS) +
             sample(rng, question_records(rng, parts["val"], CANDIDATES - 1, val, True), VAL_QUESTIONS)}
    for source in ("squad", "nq"):
        test = [p for p in parts["test"] if p["source"] == source]
        if not test:  # --nq "": no NQ files
            continue
        order = list(range(sum(len(p["qa"]) for p in test)))
        random.Random(f"wiki-test-{source}").shuffle(order)  # the same questions in both shapes
        for suffix, count, marked in (("", DISTRACTORS, False), ("-stage3", CANDIDATES - 1, True)):
            records = question_records(rng, test, count, val, marked)
            files[f"test-{source}{suffix}"] = [records[i] for i in order[:TEST_QUESTIONS]]
        own = question_records(random.Random(0), test, 0, val)  # no others: nothing is drawn
        files[f"test-{source}-own"] = [own[i] for i in order[:TEST_QUESTIONS]]
    lines = [f"{Path(out) / name}.jsonl: {write_jsonl(Path(out) / f'{name}.jsonl', records)} records"
             for name, records in files.items()]
    return lines + ["; ".join(f"{name}: {len({p['title'] for p in part})} articles, {len(part)} paragraphs, "
                              f"{sum(len(p['qa']) for p in part)} questions" for name, part in parts.items())]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the .jsonl files")
    parser.add_argument("--squad", default=str(SHARED / "squad" / "train-v1.1.json.gz"),
                        help="SQuAD v1.1 in the official format (.json or .json.gz)")
    parser.add_argument("--nq", default=str(SHARED / "nq" / "qed-train.jsonl.gz"),
                        help='the QED release of Natural Questions (.jsonl or .jsonl.gz); "" leaves it out')
    run_main(parser, write_all, argv)


if __name__ == "__main__":
    main()
