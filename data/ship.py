"""The data of the shipped-adapter recipe (README, "Making memory carry facts"), made in about a minute.

    python data/ship.py data --out runs/ship
    python data/ship.py script --out runs/ship --clara "--base bfloat16" > ship.sh
    END=$(($(date +%s) + 1500)) bash ship.sh   # stop every run 25 minutes from now
    python data/ship.py levers --out runs/ship --clara "--base bfloat16" > levers.sh && bash levers.sh

`script` prints the recipe's training and scoring commands as one bash script that runs them side by side on
one GPU: stage 1 with LoRA on every linear layer (data/adapters/facts-stage1), the mixed stage 2 from it (stage
1's generator carried over, stage-1 records mixed in: data/adapters/facts), the query reasoner, the no-documents
and text baselines with the same LoRA and steps, and the scores on unseen documents; what each measured is in the
README. `levers` prints the stage-1 experiment that chose every linear layer: three stage-1 runs side by side (x4,
x8, and x16 with every linear layer adapted) that each end with data/memory_facts.py, whose control is the q/v
stage 1 of the earlier recipe (0 of 40 numbers, 24 of 56 other facts). Measured (README): x16 with every linear
layer keeps 14 of 40 numbers after 1,000 steps, x4 with q/v 12 after 2,000. In every script, END (epoch seconds:
a device lease's end) stops each run cleanly then, with its adapters saved, so the scores still run.

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

TRAIN_DOCS, EVAL_DOCS, HELDOUT_SEED = 40_000, 200, 1
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


STEPS = {"S1": 1000, "S2": 1800, "S3": 300}  # stage 1, stage 2 and the reasoner's steps (the baselines: S1 + S2)
PRELUDE = r"""mkdir -p {out}; R={out}; S1=${{S1:-{S1}}}; S2=${{S2:-{S2}}}; S3=${{S3:-{S3}}}
M="--batch-size 32 --lr 1e-3 --warmup 0.1 --log-every 50 --memory-limit 24 $CADENCE {clara}"  # --clara last: it wins
[ -f $R/stage1.jsonl ] || python3 {ship} data --out $R > $R.data.log 2>&1 || exit 1
train() {{  # train NAME COMMAND OPTIONS...: its log in $R/NAME.log, its exit code in $R/done.txt; with END set
  # (epoch seconds, a device lease's end) the run gets SIGTERM then, finishes its step and checkpoints
  name=$1; shift; ${{END:+timeout -s TERM $((END - $(date +%s)))}} python3 {clara_py} "$@" $M --out $R/$name \
    > $R/$name.log 2>&1; echo "$name rc=$? $(date +%T)" >> $R/done.txt; }}
score() {{  # score RUN DATA CONTEXT TAG: eval writes beside the adapters, so it scores a copy of them in RUN-TAG
  mkdir -p $R/$1-$4 && cp $R/$1/clara.safetensors $R/$1/config.json $R/$1-$4/ &&
  python3 {clara_py} eval --adapters $R/$1-$4 --data $2 --contexts $3 --max-records 300 > $R/$1-$4.log 2>&1
  echo "eval $1-$4 rc=$?" >> $R/done.txt; }}
"""
RECIPE = "# the shipped-adapter recipe (data/ship.py script): every run in the background, side by side\n" + \
    'CADENCE="--eval-every 250 --save-every 500"\n' + PRELUDE + \
    r"""A="--lora-keys all"  # Apple's LoRA on every linear layer: what makes x16 memory carry numbers (README)
for base in none text; do  # the baselines, with the same LoRA and as many steps as stages 1 + 2
  ( train $base sft --data $R/stage2.jsonl --context $base $A --steps $((S1 + S2))
    score $base $R/stage2.jsonl $base e0 & score $base $R/heldout.jsonl $base e1 & wait ) &
done
( train s1 compress --data $R/stage1.jsonl $A --steps $S1  # data/adapters/facts-stage1
  # stage 2: stage 1's generator carried over, stage-1 records mixed in; the adapted layers come with --init
  train s2 sft --data $R/stage2.jsonl --init $R/s1 --init-generator --stage1-data $R/mix.jsonl --compile on \
    --steps $S2  # data/adapters/facts
  score s2 $R/stage2.jsonl compressed e0 & score s2 $R/heldout.jsonl compressed e1 &
  train r-s2 e2e --data $R/passages.jsonl --init $R/s2 --retrieval-loss contrastive --steps $S3 --batch-size 16
  score r-s2 $R/passages.jsonl retrieved e0; wait ) &
wait; echo ALL DONE >> $R/done.txt
"""

LEVERS = "# stage-1 levers (data/ship.py levers): which memory keeps a document's numbers? side by side\n" + \
    'CADENCE="--eval-every 500 --save-every 1000"\n' + PRELUDE + \
    r"""facts() {{  # facts RUN: data/memory_facts.py on its adapters
  python3 {memory_facts} --adapters $R/$1 > $R/$1.facts.log 2>&1; echo "facts $1 rc=$?" >> $R/done.txt; }}
( train x4 compress --data $R/stage1.jsonl --compression-rate 4 --steps $S1; facts x4 ) &
( train x8 compress --data $R/stage1.jsonl --compression-rate 8 --steps $S1; facts x8 ) &
( train x16all compress --data $R/stage1.jsonl --lora-keys all --steps $((S1 / 2)); facts x16all ) &
wait; echo ALL DONE >> $R/done.txt
"""


def write_data(out, train_docs=None):
    out.mkdir(parents=True, exist_ok=True)
    train_docs = train_docs or TRAIN_DOCS
    train = make_facts.make_documents(train_docs, 0)
    evaluation = make_facts.make_documents(EVAL_DOCS, 0, start=train_docs)
    stage1 = [record for pool, split in ((train, {}), (evaluation, {"split": "eval"})) for d in pool
              for record in ({"data_type": "qa", "question": [q for q, _ in d["qa"]],
                              "answers": [a for _, a in d["qa"]],
                              "docs": [d["text"]], **split},
                             {"data_type": "paraphrase", "docs": [d["text"]], "answers": [d["paraphrase"]], **split})]
    rng = random.Random("ship-stage2")
    stage2 = stage2_records(rng, train, QUESTIONS_PER_DOC, {}) + \
        stage2_records(rng, evaluation, None, {"split": "eval"})
    heldout = stage2_records(random.Random("ship-heldout"), make_facts.make_documents(200, HELDOUT_SEED), None,
                             {"split": "eval"})
    mix = make_facts.first_qa_records(stage1, MIX_DOCS)
    for name, records in (("stage1", stage1), ("stage2", stage2), ("heldout", heldout), ("mix", mix)):
        print(f"{out / name}.jsonl: {make_facts.write_jsonl(out / f'{name}.jsonl', records)} records")
    subprocess.run([sys.executable, str(HERE / "make_passages.py"), "--out", str(out / "passages.jsonl")], check=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("data", "script", "levers"))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--train-docs", type=int, help=f"data: training documents of seed 0 (default: {TRAIN_DOCS:,})")
    parser.add_argument("--clara", default="", help="script, levers: further clara.py options of every run "
                        "(--model, --base; given after the recipe's, they win: --batch-size 2 for a CPU)")
    args = parser.parse_args()
    if args.step == "data":
        write_data(args.out, args.train_docs)
    else:
        print({"script": RECIPE, "levers": LEVERS}[args.step].format(
            out=args.out, clara=args.clara, ship=Path(__file__), clara_py=HERE.parent / "clara.py",
            memory_facts=HERE / "memory_facts.py", **STEPS), end="")
