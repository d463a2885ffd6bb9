"""The shipped-adapter recipe (README, "Does the generator read memory of documents it has never seen?"):
its data (4 minutes on 2 cores) and its runs.

    python data/ship.py data --out runs/ship
    python data/ship.py script --out runs/ship --clara "--base bfloat16" > ship.sh
    END=$(($(date +%s) + 1500)) bash ship.sh   # stop every run 25 minutes from now
    python data/ship.py levers --out runs/ship --clara "--base bfloat16" > levers.sh && bash levers.sh

`script` prints the recipe's training and scoring commands as one bash script that runs four chains side by side on
one GPU, which together are the README's evidence table: stage 1 with LoRA on every linear layer
(data/adapters/facts-stage1) and the mixed stage 2 from it (stage 1's generator carried over, stage-1 records mixed
in: data/adapters/facts) at x16, and the same two stages at x4 and x32; the no-documents and text baselines with the
same LoRA and steps; the name task and the code task from the x16 stage 1; stage 3 and the query reasoner
(data/adapters/reasoner) from the x16 stage 2; each scored on documents no run trained on. `levers` prints the
stage-1 experiment that chose every linear layer: three stage-1 runs side by side (x4, x8, and x16 with every linear
layer adapted) that each end with data/memory_facts.py, whose control is the q/v stage 1 of the earlier recipe (0 of
40 numbers, 24 of 56 other facts). Measured (README): x16 with every linear layer keeps 14 of 40 numbers after 1,000
steps, x4 with q/v 12 after 2,000. In every script, END (epoch seconds: a device lease's end) stops each run cleanly
then, with its adapters saved, so the scores still run.

Data (all made here, none downloaded; Apple's example files are not used):
  stage1.jsonl     qa + paraphrase records of TRAIN_DOCS fictional documents (data/make_facts.py, seed 0), and of
                   EVAL_DOCS documents never trained on ("split": "eval": compress validates on them)
  stage2.jsonl     QUESTIONS_PER_DOC questions of every training document, each with 2 distractors, and every
                   question of the evaluation documents ("split": "eval")
  mix.jsonl        the qa records of the first MIX_DOCS training documents (sft --stage1-data)
  heldout.jsonl    every question of 200 documents made with seed 1, which no run ever saw ("split": "eval")
  stage3.jsonl     QUESTIONS_PER_DOC questions of the first STAGE3_DOCS training documents and every question of
                   the 200 held-out ones ("split": "eval"), each among CANDIDATES documents of its own pool
  code_task.jsonl  "What is the code in the background?" about CODE_DOCS filler documents, the last CODE_EVAL
                   never trained on: only the memory can answer
  name_task.jsonl  "What is the name of the subject of the background?" about each held-out document
  prose-passages.jsonl  passage -> chunk retrieval records (data/make_passages.py --texts, up to 7 of a record's
                   19 other candidates from its own text) of the prose this machine's Debian packages ship
                   (data/local_prose.py; --prose FILE gives one made elsewhere), every file of the packages of
                   the README's two PDFs left out, for the query reasoner
  prose-val.jsonl  the first VAL_PASSAGES held-out ones of those: the query reasoner's validation set
"""

import argparse
import json
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
STAGE3_DOCS, CANDIDATES = 2_000, 20  # stage 3 trains on the questions of this many documents, each among 20
PDF_PACKAGES = ("shared-mime-info", "libtasn1-doc", "libtasn1-6")  # the README's PDF check: their text never trains
SAME_SOURCE, VAL_PASSAGES = 7, 320  # the query reasoner's hard candidates from a passage's own text; its validation
CODE_DOCS, CODE_EVAL = 2_000, 200  # the code task's documents, the last CODE_EVAL of them never trained on


# stage 1, stage 2, and stage 3's (the code task's, the query reasoner's) steps; the baselines get S1 + S2. The
# shipped facts are step 751 of an 1800-step schedule (the lease ended); the table's stage 2 runs 751 of 751.
STEPS = {"S1": 1000, "S2": 751, "S3": 300}
PRELUDE = r"""mkdir -p {out}; R={out}; S1=${{S1:-{S1}}}; S2=${{S2:-{S2}}}; S3=${{S3:-{S3}}}
M="--batch-size 32 --lr 1e-3 --warmup 0.1 --log-every 50 --memory-limit ${{MEM:-16}} $CADENCE"
[ -f $R/stage1.jsonl ] || {make_data} > $R.data.log 2>&1 || exit 1
train() {{  # train NAME COMMAND OPTIONS...: its log in $R/NAME.log, its exit code in $R/done.txt; with END set
  # (epoch seconds, a device lease's end) the run gets SIGTERM then, finishes its step and checkpoints. It returns
  # the run's exit code, so a chain can stop at a failed run. Options win from left to right: the recipe's ($M),
  # the run's, then --clara's
  name=$1; command=$2; shift 2; ${{END:+timeout -s TERM $((END - $(date +%s)))}} python3 {clara_py} $command $M \
    "$@" {clara} --out $R/$name > $R/$name.log 2>&1; rc=$?; echo "$name rc=$rc $(date +%T)" >> $R/done.txt; return $rc; }}
score() {{  # score RUN DATA "CONTEXTS" TAG: eval writes beside the adapters, so it scores a copy of them in RUN-TAG;
  # one at a time where flock exists (not on macOS): lease 4's four scorers beside two training runs ran one card out
  # of memory and all six died
  mkdir -p $R/$1-$4 && cp $R/$1/clara.safetensors $R/$1/config.json $R/$1-$4/ &&
  $(command -v flock > /dev/null && echo flock $R/.score.lock) python3 {clara_py} eval --adapters $R/$1-$4 --data $2 \
    --contexts $3 --max-records ${{N:-300}} > $R/$1-$4.log 2>&1
  echo "eval $1-$4 rc=$?" >> $R/done.txt; }}
"""
RECIPE = "# the shipped-adapter recipe and its evidence table (data/ship.py script): four chains side by side\n" + \
    'CADENCE="--eval-every 250 --save-every 500"\n' + PRELUDE + \
    r"""A="--lora-keys all"  # Apple's LoRA on every linear layer: what makes x16 memory carry numbers (README)
stages() {{  # stages RATE STAGE1 STAGE2: stage 1, then stage 2 with stage 1's generator carried over and stage-1
  # records mixed in (the adapted layers come with --init)
  train $2 compress --data $R/stage1.jsonl --compression-rate $1 $A --steps $S1
  train $3 sft --data $R/stage2.jsonl --init $R/$2 --init-generator --stage1-data $R/mix.jsonl --compile on \
    --steps $S2; }}
( for base in none text; do  # the baselines, with the same LoRA and as many steps as stages 1 + 2
    train $base sft --data $R/stage2.jsonl --context $base $A --compile on --steps $((S1 + S2))
    score $base $R/stage2.jsonl $base e0 & score $base $R/heldout.jsonl $base e1 &
  done; wait ) &
( for rate in 4 32; do stages $rate x$rate-s1 x$rate-s2; score x$rate-s2 $R/heldout.jsonl compressed e1 & done; wait ) &
after() {{ while ! grep -q "^$1 rc=" $R/done.txt 2>/dev/null; do sleep 10; done; }}  # after RUN: once it ended
( stages 16 s1 s2 &  # data/adapters/facts-stage1 and data/adapters/facts
  after s1; score s1 $R/name_task.jsonl "compressed none" e1 &  # the name task: only the memory holds the name
  train code sft --data $R/code_task.jsonl --init $R/s1 --init-generator --compile on --steps $S3  # the code task
  score code $R/code_task.jsonl "compressed none" e1; wait ) &
( after s2; score s2 $R/stage2.jsonl compressed e0 & score s2 $R/heldout.jsonl compressed e1 &
  score s2 $R/stage3.jsonl retrieved r1 &  # recall before stage 3: the query reasoner is still the compressor
  ( train stage3 e2e --data $R/stage3.jsonl --init $R/s2 --steps $S3 --lr 5e-4  # stage 3 on the facts
    score stage3 $R/stage3.jsonl "retrieved oracle" e1 ) &
  train reasoner e2e --data $R/prose-passages.jsonl --init $R/s2 --retrieval-loss contrastive --steps $S3 \
    --val-data $R/prose-val.jsonl  # the query reasoner for real text: data/adapters/reasoner
  score reasoner $R/prose-passages.jsonl retrieved e1; wait ) &
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


def write_data(out, train_docs=None, prose=None):
    out.mkdir(parents=True, exist_ok=True)
    train_docs = train_docs or TRAIN_DOCS
    train = make_facts.make_documents(train_docs, 0)
    evaluation = make_facts.make_documents(EVAL_DOCS, 0, start=train_docs)
    heldout_docs = make_facts.make_documents(200, HELDOUT_SEED)
    stage1 = make_facts.stage1_records(train, {}) + make_facts.stage1_records(evaluation, {"split": "eval"})
    rng = random.Random("ship-stage2")
    stage2 = make_facts.question_records(rng, train, QUESTIONS_PER_DOC, {}, 2) + \
        make_facts.question_records(rng, evaluation, None, {"split": "eval"}, 2)
    heldout = make_facts.question_records(random.Random("ship-heldout"), heldout_docs, None, {"split": "eval"}, 2)
    mix = make_facts.first_qa_records(stage1, MIX_DOCS)
    rng = random.Random("ship-stage3")  # candidates from the record's own pool: training or held-out documents
    stage3 = make_facts.question_records(rng, train[:STAGE3_DOCS], QUESTIONS_PER_DOC, {}, CANDIDATES - 1, True) + \
        make_facts.question_records(rng, heldout_docs, None, {"split": "eval"}, CANDIDATES - 1, True)
    code = make_facts.code_records(CODE_DOCS, 0, CODE_EVAL)
    names = make_facts.name_records(heldout_docs, {"split": "eval"})
    for name, records in (("stage1", stage1), ("stage2", stage2), ("heldout", heldout), ("mix", mix),
                          ("stage3", stage3), ("code_task", code), ("name_task", names)):
        print(f"{out / name}.jsonl: {make_facts.write_jsonl(out / f'{name}.jsonl', records)} records")
    if prose is None:
        prose = out / "prose.jsonl"
        run_script("local_prose.py", "--out", prose, "--exclude-packages", *PDF_PACKAGES)
    run_script("make_passages.py", "--texts", prose, "--same-source", SAME_SOURCE,
               "--out", out / "prose-passages.jsonl")
    with open(out / "prose-passages.jsonl") as passages:  # 0.4 GB: only the held-out lines are parsed
        held_out = [json.loads(line) for line in passages if '"split": "eval"' in line][:VAL_PASSAGES]
    print(f"{out / 'prose-val.jsonl'}: {make_facts.write_jsonl(out / 'prose-val.jsonl', held_out)} records")


def run_script(name, *arguments):
    """Runs one of data/'s scripts, which prints what it wrote; a failure ends this one."""
    subprocess.run([sys.executable, str(HERE / name), *map(str, arguments)], check=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("data", "script", "levers"))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--train-docs", type=int, help=f"data: training documents of seed 0 (default: {TRAIN_DOCS:,})")
    parser.add_argument("--prose", type=Path, help="data: a data/local_prose.py file for the query reasoner's passages "
                        "(default: made here, from this machine's info manuals and man pages)")
    parser.add_argument("--clara", default="", help="script, levers: further clara.py options of every run "
                        "(--model, --base; given after the recipe's, they win: --batch-size 2 for a CPU)")
    args = parser.parse_args()
    if args.step == "data":
        write_data(args.out, args.train_docs, args.prose)
    else:
        print({"script": RECIPE, "levers": LEVERS}[args.step].format(
            out=args.out, clara=args.clara, make_data=f"python3 {Path(__file__)} data --out $R",
            clara_py=HERE.parent / "clara.py",
            memory_facts=HERE / "memory_facts.py", **STEPS), end="")
