"""Do memory vectors carry documents the model has never seen? CLaRa's table in miniature.

    python data/experiment.py --out runs/experiment                       # the full run (a GPU: about 25 min)
    python data/experiment.py --out runs/exp --train-docs 40 --eval-docs 20 --steps 4 4 4 --eval-records 8

It writes fictional documents with data/make_facts.py (training and evaluation documents disjoint), then
trains and scores every row with clara.py's own commands, each model in its own mode, on the evaluation
documents only:
  no documents   sft --context none           question -> answer; scored with no documents
  text           sft --context text           the documents as text in the prompt; scored reading text
  compressed xR  compress -> sft              stage 1 (qa + paraphrase records), then stage 2, at rate R;
                                              scored from the memory vectors of the unseen documents
                                              (--mix-docs: stage 2 as the shipped recipe trains it)
  stage 3        e2e from the x16 stage 2     recall@1/3/5 over the candidates; answers from the top-k
                                              retrieved memories and from the marked (oracle) documents
  code task      sft on code_task.jsonl       one question for every document: only memory can answer it
Every run and score lands in its own folder under --out; a run whose folder is complete is not redone, so
an interrupted experiment continues where it stopped. The table goes to --out/table.md and results.json.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import make_facts  # noqa: E402

CLARA = HERE.parent / "clara.py"
PARTS = ("baselines", "compressed", "stage3", "code")  # the table's parts, in the order they are run


def clara(*options):
    args = [sys.executable, str(CLARA), *map(str, options)]
    print("$", " ".join(args[1:]), flush=True)
    subprocess.run(args, check=True)


def train(command, out, *options):
    """clara.py COMMAND ... --out OUT, unless OUT already holds that run's result. Returns its wall seconds."""
    if not (out / "experiment.json").exists():
        tic = time.perf_counter()  # an interrupted run continues from its checkpoint
        resume = ["--resume", out] if (out / "checkpoint.safetensors").exists() else []
        clara(command, *options, "--out", out, *resume)
        (out / "experiment.json").write_text(json.dumps({"seconds": time.perf_counter() - tic}) + "\n")
    return json.loads((out / "experiment.json").read_text())["seconds"]


def trained(out):
    """(optimizer steps, target tokens trained) of a run, from its metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["kind"] == "train"][-1]
    return last["step"], last["trained_tokens"]


def score(adapters, data, contexts, args):
    """eval of one trained model on the evaluation records, in the given contexts. -> its results dict."""
    kept = adapters / f"eval-{data.stem}-{'-'.join(contexts)}.json"
    if not kept.exists():
        clara("eval", "--adapters", adapters, "--data", data, "--contexts", *contexts,
              "--max-records", args.eval_records)  # up to 64 new tokens, as Apple's evaluate.py
        (adapters / "eval.json").rename(kept)  # eval never replaces a report: the next one needs the name free
        (adapters / "eval.md").unlink()
    return json.loads(kept.read_text())["results"]


def row(name, result, runs, minutes):
    steps = " + ".join(str(trained(r)[0]) for r in runs)
    tokens = sum(trained(r)[1] for r in runs)
    return {"row": name, "em": 100 * result["em"], "f1": 100 * result["f1"], "cover_em": 100 * result["cover_em"],
            "ce": result["ce"], "prompt_tokens": result["prompt_tokens"],
            "first_token_ms": 1000 * result["first_token_s"], "steps": steps, "trained_tokens": tokens,
            "minutes": minutes, "records": result["records"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the data, every run and the table")
    parser.add_argument("--model", default="smollm2", help="clara.py --model (default: smollm2)")
    parser.add_argument("--rates", type=int, nargs="+", default=[4, 16, 32],
                        help="compression rates (default 4 16 32)")
    parser.add_argument("--train-docs", type=int, default=2000, help="training documents (default 2000)")
    parser.add_argument("--eval-docs", type=int, default=200, help="evaluation documents, never trained on (200)")
    parser.add_argument("--steps", type=int, nargs=3, default=[500, 1500, 300], metavar=("S1", "S2", "S3"),
                        help="optimizer steps of stage 1, 2 and 3 (default 500 1500 300); baselines get S1 + S2")
    parser.add_argument("--batch-size", type=int, default=8, help="records per step (default 8)")
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate of stages 1 and 2 (default 2e-4)")
    parser.add_argument("--e2e-lr", type=float, default=5e-4, help="learning rate of stage 3 (default 5e-4)")
    parser.add_argument("--eval-records", type=int, default=300, help="evaluation questions scored per row (300)")
    parser.add_argument("--code-docs", type=int, default=2000, help="documents of the code task (default 2000)")
    parser.add_argument("--mix-docs", type=int, default=0,
                        help="stage 2 as the shipped recipe (data/ship.py) trains it: stage 1's generator carried over "
                             "(sft --init-generator) and the qa records of this many training documents mixed in "
                             "(sft --stage1-data); 0 (the default): Apple's stage 2, a fresh generator")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS),
                        help="train and score only these parts (default: all); finished parts are reused, so two "
                             "machines can share one --out and a last run without --only assembles the whole table")
    parser.add_argument("--clara", nargs=argparse.REMAINDER, default=[],
                        help="further clara.py training options for every run, last (e.g. --base bfloat16)")
    args = parser.parse_args(argv)
    out, data = Path(args.out), Path(args.out) / "data"
    if not (data / "code_task.jsonl").exists():
        data.mkdir(parents=True, exist_ok=True)
        for line in make_facts.write_all(data, train_docs=args.train_docs, eval_docs=args.eval_docs,
                                         candidates=min(20, args.eval_docs), code_docs=args.code_docs,
                                         code_eval=max(1, args.code_docs // 10)):
            print(line)
    mixed = []
    if args.mix_docs:  # the qa records of the first --mix-docs training documents, written once like the data
        mix = data / f"mix-{args.mix_docs}.jsonl"
        if not mix.exists():
            records = [json.loads(line) for line in (data / "stage1.jsonl").read_text().splitlines()]
            make_facts.write_jsonl(mix, make_facts.first_qa_records(records, args.mix_docs))
        mixed = ["--init-generator", "--stage1-data", mix]
    common = ["--model", args.model, "--batch-size", args.batch_size, "--lr", args.lr, "--log-every", 50,
              "--eval-every", 10**6, "--save-every", 500, *args.clara]
    s1, s2, s3 = args.steps

    def stages_1_and_2(rate):
        """Stage 1 then stage 2 at this compression rate (reused when done). -> (stage 2 folder, wall seconds)"""
        stage1, stage2 = out / f"x{rate}-stage1", out / f"x{rate}-stage2"
        seconds = train("compress", stage1, "--data", data / "stage1.jsonl", "--compression-rate", rate,
                        "--steps", s1, *common)
        return stage2, seconds + train("sft", stage2, "--data", data / "stage2.jsonl", "--init", stage1, *mixed,
                                       "--steps", s2, *common)

    rows = []
    for context in ("none", "text") if "baselines" in args.only else ():  # trained as long as stages 1 + 2
        folder = out / f"baseline-{context}"
        seconds = train("sft", folder, "--data", data / "stage2.jsonl", "--context", context, "--steps", s1 + s2,
                        *common)
        result = score(folder, data / "stage2.jsonl", [context], args)[context]
        rows.append(row("no documents" if context == "none" else "document text", result, [folder], seconds / 60))
    for rate in args.rates if "compressed" in args.only else ():
        stage2, seconds = stages_1_and_2(rate)
        result = score(stage2, data / "stage2.jsonl", ["compressed"], args)["compressed"]
        rows.append(row(f"compressed x{rate} ({256 // rate} vectors / doc)", result, [out / f"x{rate}-stage1", stage2],
                        seconds / 60))
    if "stage3" in args.only:  # from the x16 stage 2
        (stage2, seconds), stage3 = stages_1_and_2(16), out / "x16-stage3"
        before = score(stage2, data / "stage3.jsonl", ["retrieved"], args)
        seconds += train("e2e", stage3, "--data", data / "stage3.jsonl", "--init", stage2, "--steps", s3,
                      *common, "--lr", args.e2e_lr)
        after = score(stage3, data / "stage3.jsonl", ["retrieved", "oracle"], args)
        for context, name in (("retrieved", "stage 3: retrieved top-5"), ("oracle", "stage 3: marked documents")):
            rows.append(row(name, after[context], [out / "x16-stage1", stage2, stage3], seconds / 60))
        rows[-2]["recall"] = after["retrieval"]
        rows[-2]["recall_before_stage3"] = before["retrieval"]
    if "code" in args.only:
        code = out / "code-task"
        seconds = train("sft", code, "--data", data / "code_task.jsonl", "--steps", s2, *common)
        for context in ("compressed", "none"):
            result = score(code, data / "code_task.jsonl", ["compressed", "none"], args)[context]
            rows.append(row(f"code task: {'memory' if context == 'compressed' else 'no documents'}", result,
                            [code], seconds / 60))
    write_table(out, rows, args)


def write_table(out, rows, args):
    mixed = f"; stage 2 with stage 1's generator and {args.mix_docs} documents' qa records mixed in" \
        if args.mix_docs else ""
    lines = [f"Evaluation documents never seen in training; {rows[0]['records']} questions per row. "
             f"Batch {args.batch_size}, lr {args.lr} (stage 3: {args.e2e_lr}), model {args.model}{mixed}.", "",
             "| row | EM | F1 | cover-EM | answer CE | prompt tokens | first token ms | steps | trained tokens | "
             "minutes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['em']:.1f} | {r['f1']:.1f} | {r['cover_em']:.1f} | {r['ce']:.3f} | "
                     f"{r['prompt_tokens']:.0f} | {r['first_token_ms']:.0f} | {r['steps']} | {r['trained_tokens']} | "
                     f"{r['minutes']:.1f} |")
    for r in rows:
        if "recall" in r:
            fmt = lambda recall: " / ".join(f"{100 * v:.1f}" for v in recall.values())  # noqa: E731
            lines += ["", f"Stage 3 retrieval, recall@1/3/5: {fmt(r['recall_before_stage3'])} before stage 3 "
                      f"(query reasoner = compressor), {fmt(r['recall'])} after."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"options": vars(args), "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'table.md'} and {out / 'results.json'}")


if __name__ == "__main__":
    main()
