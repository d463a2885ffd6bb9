"""The data of the shipped-adapter recipe (README, "Making memory carry facts"), made in about a minute.

    python data/ship.py data --out runs/ship

The training and scoring commands that use it, and what each measured, are in the README.

Data (all made here, none downloaded; Apple's example files are not used):
  stage1.jsonl    qa + paraphrase records of TRAIN_DOCS fictional documents (data/make_facts.py, seed 0), and of
                  EVAL_DOCS documents never trained on ("split": "eval": compress validates on them)
  stage2.jsonl    QUESTIONS_PER_DOC questions of every training document, each with 2 distractors, and every
                  question of the evaluation documents ("split": "eval")
  mix.jsonl       the qa records of the first MIX_DOCS training documents (sft --stage1-data)
  heldout.jsonl   every question of 200 documents made with seed 1, which no run ever saw ("split": "eval")
  passages.jsonl  passage -> chunk retrieval records from the Python standard library's docstrings
                  (data/make_passages.py), for the query reasoner
"""

import argparse
import random
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import make_facts  # noqa: E402

TRAIN_DOCS, EVAL_DOCS, HELDOUT_SEED = 20_000, 200, 1
QUESTIONS_PER_DOC = 2  # of each training document's eight: more documents rather than more epochs
MIX_DOCS = 5_000  # sft --stage1-data: the qa records of this many training documents, mixed into stage 2


def stage2_records(rng, pool, per_doc, split):
    """per_doc questions of each document of pool (all eight: None), each beside two distractors of pool."""
    records = []
    for i, d in enumerate(pool):
        for question, answer in d["qa"] if per_doc is None else rng.sample(d["qa"], per_doc):
            docs, _ = make_facts.with_others(rng, pool, i, 2)
            records.append({"question": question, "docs": docs, "answer": answer, **split})
    return records


def write_data(out):
    out.mkdir(parents=True, exist_ok=True)
    train = make_facts.make_documents(TRAIN_DOCS, 0)
    evaluation = make_facts.make_documents(EVAL_DOCS, 0, start=TRAIN_DOCS)
    stage1 = [record for pool, split in ((train, {}), (evaluation, {"split": "eval"})) for d in pool
              for record in ({"data_type": "qa", "question": [q for q, _ in d["qa"]], "answers": [a for _, a in d["qa"]],
                              "docs": [d["text"]], **split},
                             {"data_type": "paraphrase", "docs": [d["text"]], "answers": [d["paraphrase"]], **split})]
    rng = random.Random("ship-stage2")
    stage2 = stage2_records(rng, train, QUESTIONS_PER_DOC, {}) + stage2_records(rng, evaluation, None, {"split": "eval"})
    heldout = stage2_records(random.Random("ship-heldout"), make_facts.make_documents(200, HELDOUT_SEED), None,
                             {"split": "eval"})
    mix = [r for r in stage1[:2 * MIX_DOCS] if r["data_type"] == "qa"]
    for name, records in (("stage1", stage1), ("stage2", stage2), ("heldout", heldout), ("mix", mix)):
        print(f"{out / name}.jsonl: {make_facts.write_jsonl(out / f'{name}.jsonl', records)} records")
    subprocess.run([sys.executable, str(HERE / "make_passages.py"), "--out", str(out / "passages.jsonl")], check=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("data",))
    parser.add_argument("--out", required=True, type=Path)
    write_data(parser.parse_args().out)
