"""Which facts of a document does a stage-1 run's memory keep? The memory work's quick check of a stage-1 lever
(README, Evaluation), before any stage 2 is trained on it.

    python data/memory_facts.py --adapters data/adapters/facts-stage1 [--docs 12] [--seed 7]

Each fictional document (data/make_facts.py, of a seed no run trains on: 7 by default) is compressed, and the
generator paraphrases it from its memory alone, as stage 1 trains it to. A fact is kept when its answer appears
verbatim in the paraphrase. The same count with another document's memory is the chance level. Numbers (answers
with a digit) are counted apart from the rest, because they are what x16 memory loses first.
"""

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import clara  # noqa: E402  (before mlx: OpenBLAS)
import make_facts  # noqa: E402


def kept(facts, text):
    """{"numbers": (kept, of), "other": (kept, of)}: the facts (question, answer) whose answer is in `text`."""
    counts = {"numbers": [0, 0], "other": [0, 0]}
    for _, answer in facts:
        count = counts["numbers" if any(c.isdigit() for c in answer) else "other"]
        count[0] += answer.lower() in text.lower()
        count[1] += 1
    return {kind: tuple(count) for kind, count in counts.items()}


def paraphrase(reader, document, max_new_tokens):
    """The generator's paraphrase of `document` from its memory, with stage 1's first paraphrase request."""
    example = clara.build_example(reader.tokenizer, reader.cfg, [document], clara.PARAPHRASE_INSTRUCTIONS[0], None,
                                  clara.SYSTEM_PARAPHRASE)
    return clara.generate_answer(reader.model, reader.tokenizer, reader.cfg, example, max_new_tokens)[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", required=True, help="a stage-1 run's folder (or checkpoint)")
    parser.add_argument("--docs", type=int, default=12, help="fictional documents to paraphrase [default: 12]")
    parser.add_argument("--seed", type=int, default=7, help="their make_facts.py seed [default: 7]")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest paraphrase [default: 256]")
    args = parser.parse_args()
    try:
        if args.docs < 2 or args.max_new_tokens < 1:
            raise clara.InputError("--docs must be at least 2 (one is the other's chance level), --max-new-tokens 1")
        reader = clara.load(args.adapters)
    except clara.InputError as error:
        sys.exit(f"error: {error}")
    documents = make_facts.make_documents(args.docs, args.seed)
    paraphrases = [paraphrase(reader, d["text"], args.max_new_tokens) for d in documents]  # each generated once
    for name, shift in (("own memory", 0), ("another document's memory", 1)):
        counts = [kept(d["qa"], paraphrases[i - shift]) for i, d in enumerate(documents)]
        total = {kind: [sum(c[kind][j] for c in counts) for j in (0, 1)] for kind in ("numbers", "other")}
        print(f"{name}: numbers {total['numbers'][0]}/{total['numbers'][1]}, "
              f"other facts {total['other'][0]}/{total['other'][1]}", flush=True)


if __name__ == "__main__":
    main()
