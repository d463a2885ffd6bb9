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
  s1wiki  s1s2 from PREV (data/adapters/wiki: its stage-2 steps kept), at LONG_LR when set: a stage-2 run's memory
          trained to keep the words (the paraphrase target is the paragraph) and all the questions of a paragraph
          at once (one compressor pass for several questions), then stage 2 again
  x4      s1s2 at x4 (64 vectors per document), its stage 1 from the base (no x4 adapters are shipped)
  x4s2    stage 2 alone at x4, from the base
  x4long  x4 stage 2 continued for LONG more steps (at LONG_LR) from the x4 stage-2 run PREV4 (lease 2's x4s2)
  long    stage 2 continued for LONG more steps (at LONG_LR, default 1e-3; seed SEED, default 1) from the stage-2
          run PREV (data/adapters/wiki), then its query reasoner (contrastive, stage 3's question -> own paragraph
          among 20): data/adapters/wiki (lease 3)
  reasoner  that query reasoner alone, for PREV (lease 3: given-reasoner, for the wiki before that lease)
  preasoner the same with technical prose mixed in: PROSE=FILE (data/local_prose.py's texts) gives a quarter of its
          records as data/make_passages.py's copied sentence -> own chunk (data/adapters/wiki-reasoner); with PROSE
          set, `long`'s reasoner mixes them in too
  phalf   the same with half of its records prose (SHARE=2 where the others have 4), to be chosen on the
          development PDF (data/ask/shared-mime-info-spec.pdf) before the test PDF sees it
  longmix long's continuation with the real stage-1 records (qa + paraphrase of every training paragraph) mixed in
          (sft --stage1-data), as the fictional recipe's stage 2 mixes its own; no reasoner after it
  text / none   the baselines: the paragraphs as text in the prompt, or no documents, with the same LoRA and
          BASE_STEPS (default S2) steps
Each is scored on N (default 300; the README's tables: 400) questions of the held-out SQuAD articles and of the held-out
NQ articles, among two others of their article and with their own paragraph alone. B overrides the batch's split
(default "--batch-size 16 --grad-accum 2"); RESERVE (seconds) stops `long` that long before END, for its reasoner;
CADENCE (default "--eval-every 250 --save-every 500") sets how often runs validate and save: a lease sets saves every
100 steps and brings back the latest before its first call ends (lease 7 lost everything when its machine went back).
Lease 2 (README) ran:
    END=$(($(date +%s) + 720)) RESERVE=210 RUNS="long x4s2 text none" PREV=LEASE1_S2 LONG=600 S2=700 \
      BASE_STEPS=900 S3=150 N=400 B="--batch-size 8 --grad-accum 4" bash wiki.sh
and lease 3 (data/adapters/wiki, and the wiki-reasoner shipped until lease 5; the reasoner's 400 steps ran by hand
after the lease's END, as `reasoner long` with S3=400 would):
    END=$(($(date +%s) + 760)) RUNS="long x4long" PREV=data/adapters/wiki PREV4=LEASE2_X4S2 LONG=550 LONG_LR=3e-4 \
      N=400 B="--batch-size 8 --grad-accum 4" bash wiki.sh
and lease 4 (the shipped reasoner's recipe again and with prose; s1s2; the card ran out of memory once the four
scorers of the two reasoners started beside two training runs, and all six died: scoring now goes one at a time):
    END=$(($(date +%s) + 720)) RUNS="long s1s2 reasoner preasoner" PREV=data/adapters/wiki PROSE=prose.jsonl \
      LONG=600 LONG_LR=3e-4 SEED=2 RESERVE=200 S1=200 S2=1200 S3=400 N=400 \
      B="--batch-size 8 --grad-accum 4" bash wiki.sh
and lease 5 (data/adapters/wiki-reasoner as shipped: the prose-mixed reasoner of data/adapters/wiki; PROSE from
`data/local_prose.py --out prose.jsonl --exclude-packages shared-mime-info libtasn1-doc libtasn1-6`):
    END=$(($(date +%s) + 470)) RUNS=preasoner PREV=data/adapters/wiki PROSE=prose.jsonl S3=400 N=400 bash wiki.sh
and lease 6 (a real stage 1 before stage 2, at x16 and at x4; the half-prose reasoner, checked on the development PDF):
    END=$(($(date +%s) + 1250)) RUNS="phalf s1s2 x4" PREV=data/adapters/wiki PROSE=prose.jsonl S1=200 S2=1200 \
      S3=400 N=400 B="--batch-size 8 --grad-accum 4" bash wiki.sh
and lease 7 (lease 6's s1s2 and x4 continued; lost with its machine before anything came back):
    END=$(($(date +%s) + 760)) RUNS="long x4long" PREV=S1S2_STEP403 PREV4=X4_STEP405 LONG=600 LONG_LR=5e-4 \
      N=400 B="--batch-size 8 --grad-accum 4" bash wiki.sh
and lease 8 (data/adapters/wiki continued again, with and without the real stage-1 records mixed in; both stopped by
END before their scoring, and before long's reasoner, which did not fit):
    END=$(($(date +%s) + 950)) RUNS="long longmix" PREV=data/adapters/wiki LONG=700 LONG_LR=3e-4 SEED=2 N=400 MEM=30 \
      B="--batch-size 16 --grad-accum 2" CADENCE="--eval-every 250 --save-every 100" bash wiki.sh
"""

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from ship import PRELUDE  # noqa: E402

STEPS = {"S1": 250, "S2": 1000, "S3": 300}  # S3: stage 3, a later lease's
LEVERS = "# the real-text levers (data/wiki.py script): chains side by side, RUNS picks them\n" + \
    'CADENCE=${{CADENCE:-"--eval-every 250 --save-every 500"}}  # a lease brings back a save mid-run\n' + PRELUDE + \
    r"""A="--lora-keys all"; F=${{FACTS:-{facts}}}
B=${{B:-"--batch-size 16 --grad-accum 2"}}  # batch 32 in parts: at batch 32 one x16 stage 2 peaked at 36 GB
# a continuation (long, x4long): LONG more steps at LONG_LR, its start's generator carried over, the records drawn in
# another order (with its start's seed it first re-reads the records its start trained on; lease 3: training loss 0.9
# while the validation loss rose from 2.36 to 2.47)
CONTINUE="--init-generator $B --compile on --steps ${{LONG:-$S2}} ${{LONG_LR:+--lr $LONG_LR}} --seed ${{SEED:-1}}"
on() {{ [[ " ${{RUNS:-s2 s1s2 x4 mix text none}} " == *" $1 "* ]]; }}  # on CHAIN: RUNS names it
tests() {{  # tests RUN CONTEXT: the test questions among 2 others of their article, and with their own paragraph alone.
  # A chain scores its run also when END stopped it (train's rc 124: lease 6's two stage-2 runs went unscored by `&&`)
  for set in squad nq; do score $1 $R/test-$set.jsonl $2 $set & score $1 $R/test-$set-own.jsonl $2 $set-own & done
  wait; }}
reasoner() {{  # reasoner RUN [ADAPTERS] [PROSE]: the query reasoner of RUN's adapters (or of ADAPTERS, any
  # stage-2 folder) learns question -> own paragraph among 20 (contrastive) as RUN-reasoner, on 32 x S3 stage-3
  # records (one epoch) and a 24th as many validation ones (a candidate bank of them all is compressed first); scored
  # on the test questions. With PROSE (data/make_passages.py --texts records of technical prose: a copied sentence ->
  # its chunk among 20) one in SHARE (default 4) of both are those, drawn at random, in place of the last Wikipedia
  # ones
  V=$(((4 * S3 + 2) / 3)); n=0; v=0; data=$R/stage3-head.jsonl  # n, v: the prose training and validation records
  k=${{SHARE:-4}}; [ -z "$3" ] || {{ n=$((32 * S3 / k)); v=$((V / k)); data=$R/stage3-prose$k.jsonl; }}
  [ -f $data ] || {{
    head -n $((32 * S3 - n)) $R/stage3.jsonl
    [ $n = 0 ] || grep -v '"split": "eval"' $3 | shuf -n $n --random-source=<(yes)
    tail -n $((V - v)) $R/stage3.jsonl; [ $v = 0 ] || grep '"split": "eval"' $3 | shuf -n $v --random-source=<(yes)
    }} > $data
  train $1-reasoner e2e --data $data --init ${{2:-$R/$1}} --retrieval-loss contrastive --steps $S3
  {{ score $1-reasoner $R/test-squad-stage3.jsonl "retrieved oracle" squad3 &
    score $1-reasoner $R/test-nq-stage3.jsonl "retrieved oracle" nq3 & wait; }}; }}
stages() {{  # stages NAME INIT OPTIONS...: S1 steps of stage 1 on the real paragraphs, then stage 2 for the rest
  run=$1; init=$2; shift 2  # not "name": train sets that one
  train $run-s1 compress --data $R/stage1.jsonl $init $B "$@" --steps $S1 &&
  train $run sft --data $R/stage2.jsonl --init $R/$run-s1 --init-generator $B --compile on --steps $((S2 - S1)) "$@"
  tests $run compressed; }}
stage2() {{  # stage2 NAME OPTIONS...: stage 2 from the fictional stage 1, its generator carried over
  train $1 sft --data $R/stage2.jsonl --init $F --init-generator $B --compile on --steps $S2 "${{@:2}}"
  tests $1 compressed; }}
PASSAGES=${{PROSE:+$R/prose-passages.jsonl}}  # PROSE's passage records (data/make_passages.py), made once
[ -z "$PASSAGES" ] || [ -f $PASSAGES ] ||
  python3 {make_passages} --texts $PROSE --same-source 7 --out $PASSAGES > $R/prose.log 2>&1 || exit 1
on s2 && stage2 s2 &
on mix && stage2 mix --stage1-data $R/mix.jsonl &  # the qa records of real paragraphs mixed in
on s1s2 && stages s1s2 "--init $F" &
on s1wiki && stages s1wiki "--init ${{PREV:-$R/s2}}" ${{LONG_LR:+--lr $LONG_LR}} &
on long && (  # stage 2 continued for LONG more steps from PREV (a stage-2 run: lease 1's s2), then its query reasoner;
  # it stops RESERVE seconds before END, to leave the reasoner its time
  END=${{END:+$((END - ${{RESERVE:-0}}))}} train long sft --data $R/stage2.jsonl --init ${{PREV:-$R/s2}} $CONTINUE
  tests long compressed & reasoner long "" $PASSAGES; wait ) &
on longmix && ( train longmix sft --data $R/stage2.jsonl --init ${{PREV:-$R/s2}} $CONTINUE --stage1-data $R/stage1.jsonl
                tests longmix compressed ) &  # long's continuation with the real stage-1 records mixed in
on reasoner && reasoner given ${{PREV:-$R/s2}} &  # the query reasoner alone, for PREV (data/adapters/wiki)
on preasoner && reasoner prose ${{PREV:-$R/s2}} ${{PASSAGES:?preasoner needs PROSE=FILE}} &  # PROSE's mixed in
on phalf && SHARE=2 reasoner phalf ${{PREV:-$R/s2}} ${{PASSAGES:?phalf needs PROSE=FILE}} &  # half of it PROSE's
on x4 && stages x4 "$A" --compression-rate 4 &
on x4s2 && ( train x4s2 sft --data $R/stage2.jsonl $A --compression-rate 4 $B --compile on --steps $S2  # no stage 1
             tests x4s2 compressed ) &
on x4long && ( train x4long sft --data $R/stage2.jsonl --init ${{PREV4:-$R/x4s2}} $CONTINUE
               tests x4long compressed ) &
for base in none text; do
  on $base && ( train $base sft --data $R/stage2.jsonl --context $base $A $B --compile on \
                  --steps ${{BASE_STEPS:-$S2}}
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
                        facts=HERE / "adapters" / "facts-stage1", make_passages=HERE / "make_passages.py",
                        make_data=f"python3 {HERE / 'make_wiki.py'} --out $R ${{SQUAD:+--squad $SQUAD}} "
                        "${NQ:+--nq $NQ}", **STEPS), end="")
