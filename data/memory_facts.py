"""Which facts of a document does a stage-1 run's memory keep? The memory work's quick check of a stage-1 lever
(README, Evaluation), before any stage 2 is trained on it.

    python data/memory_facts.py --adapters data/adapters/facts-stage1 [--docs 12] [--seed 7]

Each fictional document (data/make_facts.py, of a seed no run trains on: 7 by default) is compressed, and the
generator paraphrases it from its memory alone, as stage 1 trains it to. A fact is kept when its answer appears
verbatim in the paraphrase. The same count with another document's memory is the chance level. Numbers (answers
with a digit) are counted apart from the rest, because they are what x16 memory loses first. A finer measure, for
runs that keep no number verbatim yet: the cross-entropy of stage 1's qa target (every question and answer of the
document), teacher-forced, over its digit tokens and over the rest, from each memory. A memory that carries the
digits makes their CE lower from its own document than from another's.

    python data/memory_facts.py --adapters data/adapters/wiki --wiki runs/wiki/stage1.jsonl

With --wiki (data/make_wiki.py's stage1.jsonl) the documents are real Wikipedia paragraphs instead: the first --docs
qa records of its validation articles ("split": "eval"), each paragraph's facts its SQuAD / NQ questions and answers.
"""

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import clara  # noqa: E402  (before mlx: OpenBLAS)
import make_facts  # noqa: E402
import mlx.core as mx  # noqa: E402


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
    return clara.generate_answers(reader.model, reader.tokenizer, reader.cfg, [example], max_new_tokens)[0][0]


def target_ce(reader, documents):
    """{memory: {"digits": CE, "other": CE}}: stage 1's qa target of each document, teacher-forced, from its own
    memory and from the next document's; the mean CE over the target's digit tokens and over its other tokens."""
    tokenizer, cfg = reader.tokenizer, reader.cfg
    records = [clara.parse_compress_record({"data_type": "qa", "question": [q for q, _ in d["qa"]],
                                            "answers": [a for _, a in d["qa"]], "docs": [d["text"]]}, d["entity"])
               for d in documents]  # as stage 1 reads Apple's qa records
    batch = clara.make_batch(clara.compress_examples(tokenizer, cfg, records), cfg.n_mem, tokenizer.pad_token_id)
    memory, _ = clara.encode_into_memory(reader.model, batch["doc_ids"], batch["doc_lens"])  # (D, n_mem, H)
    positions, labels = batch["label_positions"], batch["labels"].reshape(-1)[batch["label_positions"]]  # (N,)
    is_digit = mx.array([tokenizer.decode([t]).strip().isdigit() for t in labels.tolist()])  # (N,)
    result = {}
    for name, states in (("own memory", memory), ("another document's memory", mx.roll(memory, 1, axis=0))):
        hidden = clara.generator_hidden(reader.model, batch["ids"], batch["slot_index"], states)  # (B, T, H)
        logits = clara.output_logits(reader.model.llm, hidden.reshape(-1, hidden.shape[-1])[positions])  # (N, V)
        result[name] = {kind: clara.masked_cross_entropy(logits, mx.where(mask, labels, clara.IGNORE))[0].item()
                        for kind, mask in (("digits", is_digit), ("other", ~is_digit))}  # the loss's own masked CE
    return result


def wiki_documents(path, n):
    """The first n qa records of the validation articles of a data/make_wiki.py stage1.jsonl, as make_facts'
    documents: {"text", "qa": [(question, answer)], "entity" (where the record is, for messages)}."""
    documents = []
    for number, obj in clara.read_jsonl(path):
        if len(documents) == n:
            break
        if obj.get("split") == "eval" and obj.get("data_type") == "qa":
            documents.append({"text": obj["docs"][0], "qa": list(zip(obj["question"], obj["answers"])),
                              "entity": f"{path}:{number}"})
    if len(documents) < n:
        raise clara.InputError(f"{path}: {len(documents)} qa record(s) marked \"split\": \"eval\", not {n}")
    return documents


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", required=True, help="a stage-1 run's folder (or checkpoint)")
    parser.add_argument("--docs", type=int, default=12, help="fictional documents to paraphrase [default: 12]")
    parser.add_argument("--seed", type=int, default=7, help="their make_facts.py seed [default: 7]")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest paraphrase [default: 256]")
    parser.add_argument("--wiki", type=Path, help="real paragraphs instead: data/make_wiki.py's stage1.jsonl")
    args = parser.parse_args()
    try:
        if args.docs < 2 or args.max_new_tokens < 1:
            raise clara.InputError("--docs must be at least 2 (one is the other's chance level), --max-new-tokens 1")
        reader = clara.load(args.adapters)
        documents = (wiki_documents(args.wiki, args.docs) if args.wiki
                     else make_facts.make_documents(args.docs, args.seed))
    except clara.InputError as error:
        sys.exit(f"error: {error}")
    paraphrases = [paraphrase(reader, d["text"], args.max_new_tokens) for d in documents]  # each generated once
    for name, shift in (("own memory", 0), ("another document's memory", 1)):
        counts = [kept(d["qa"], paraphrases[i - shift]) for i, d in enumerate(documents)]
        total = {kind: [sum(c[kind][j] for c in counts) for j in (0, 1)] for kind in ("numbers", "other")}
        print(f"{name}: numbers {total['numbers'][0]}/{total['numbers'][1]}, "
              f"other facts {total['other'][0]}/{total['other'][1]}", flush=True)
    for name, ce in target_ce(reader, documents).items():
        print(f"{name}: qa target CE, digit tokens {ce['digits']:.3f}, other tokens {ce['other']:.3f}")


if __name__ == "__main__":
    main()
