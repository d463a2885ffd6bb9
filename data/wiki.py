"""The real-text recipe (README, "Real documents"): its levers side by side on one GPU, scored on held-out articles.

    python data/wiki.py script --out runs/wiki --clara "--base bfloat16" > wiki.sh
    END=$(($(date +%s) + 1200)) bash wiki.sh   # stop every run 20 minutes from now, then score

The script makes the data first (data/make_wiki.py: SQuAD v1.1 train and Natural Questions' QED paragraphs, whole
articles held out; SQUAD=FILE and NQ=FILE name the inputs, else ../shared/data) and runs the chains RUNS names (all six
by default) at once, each with S2 optimizer steps in all (batch 32, lr 1e-3, LoRA on every linear layer, as the
shipped fictional recipe):
  s2      stage 2 on the real questions, from the shipped fictional stage 1 (data/adapters/facts-stage1, its
          generator carried over): what the shipped recipe does with real data
  mix     the same with the qa records of 5,000 real paragraphs mixed in (sft --stage1-data), as the fictional
          recipe's stage 2 does
  s1s2    S1 steps of stage 1 on the real paragraphs first (qa + paraphrase, from the same adapters), then stage 2
  x4      the same at x4 (64 vectors per document), its stage 1 from the base (no x4 adapters are shipped)
  text / none   the baselines: the paragraphs as text in the prompt, or no documents, with the same LoRA and steps
Each is scored on N (default 400) questions of the held-out SQuAD articles and of the held-out NQ articles.
"""

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from ship import PRELUDE  # noqa: E402

STEPS = {"S1": 250, "S2": 1000, "S3": 300}  # S3: stage 3, a later lease's
LEVERS = "# the real-text levers (data/wiki.py script): chains side by side, RUNS picks them\n" + \
    'CADENCE="--eval-every 250 --save-every 500"\n' + PRELUDE + \
    r"""A="--lora-keys all"; F=${{FACTS:-{facts}}}
B="--batch-size 16 --grad-accum 2"  # batch 32 in two halves: at batch 32 one x16 stage 2 peaked at 36 GB
on() {{ [[ " ${{RUNS:-s2 s1s2 x4 mix text none}} " == *" $1 "* ]]; }}  # on CHAIN: RUNS names it
tests() {{ score $1 $R/test-squad.jsonl $2 squad & score $1 $R/test-nq.jsonl $2 nq & wait; }}  # tests RUN CONTEXT
stages() {{  # stages NAME INIT OPTIONS...: S1 steps of stage 1 on the real paragraphs, then stage 2 for the rest
  run=$1; init=$2; shift 2  # not "name": train sets that one
  train $run-s1 compress --data $R/stage1.jsonl $init $B "$@" --steps $S1 &&
  train $run sft --data $R/stage2.jsonl --init $R/$run-s1 --init-generator $B --compile on --steps $((S2 - S1)) "$@" &&
  tests $run compressed; }}
stage2() {{  # stage2 NAME OPTIONS...: stage 2 from the fictional stage 1, its generator carried over
  train $1 sft --data $R/stage2.jsonl --init $F --init-generator $B --compile on --steps $S2 "${{@:2}}" &&
  tests $1 compressed; }}
on s2 && stage2 s2 &
on mix && stage2 mix --stage1-data $R/mix.jsonl &  # the qa records of real paragraphs mixed in
on s1s2 && stages s1s2 "--init $F" &
on x4 && stages x4 "$A" --compression-rate 4 &
for base in none text; do
  on $base && ( train $base sft --data $R/stage2.jsonl --context $base $A $B --compile on --steps $S2 &&
                tests $base $base ) &
done
wait; echo ALL DONE >> $R/done.txt
"""

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("script",))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--clara", default="", help="further clara.py options of every run (--model, --base; given "
                        "after the recipe's, they win: --batch-size 2 for a CPU)")
    args = parser.parse_args()
    print(LEVERS.format(out=args.out, clara=args.clara, clara_py=HERE.parent / "clara.py",
                        facts=HERE / "adapters" / "facts-stage1",
                        make_data=f"python3 {HERE / 'make_wiki.py'} --out $R ${{SQUAD:+--squad $SQUAD}} "
                        "${NQ:+--nq $NQ}", **STEPS), end="")
