"""Step time of clara's compress and sft steps beside mlx-lm's own LoRA trainer on the same tokens, the
machine's matmul rate as the ceiling, and answering: questions per second batched against one by one (README,
Performance).

    python data/bench.py [--model M] [--base bfloat16] [--batch-size 4] [--bench-steps 5] [--out runs/bench]
    python data/bench.py --rows answers [--eval-batch-size 16] [--questions 32]   # the answering row alone
    python data/bench.py --rows bm25   # ask --index's hybrid ranking: BM25 over 1k and 10k chunks (seconds)

Each training row trains 2 x --bench-steps steps on fixed shapes and is timed over the second window; the answering
row scores the same questions as eval does, in batches and one at a time. bench.md and bench.json in --out hold the
table and the figures. The clara options (model, shapes, LoRA, --compile) are clara.py's own.
"""

import argparse
import contextlib
import io
import itertools
import random
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import clara  # noqa: E402  (before mlx: OpenBLAS)
import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

# the Config fields that do not apply to a benchmark: the rest are its options, as clara.py's commands take them
HIDDEN = {"val_data", "val_fraction", "context", "init", "init_generator", "steps", "warmup", "top_k", "temperature",
          "retrieval_loss", "resume", "overwrite", "log_every", "eval_every", "save_every"}


def matmul_rate(dtype, sizes, warmup_seconds=1.0, repeats=5, rounds=5):
    """FLOP/s of large square matmuls through MLX: the ceiling a training step is compared against. The best
    round over the sizes, each after a second of warm-up (kernels compiled, clocks up), so that a slow start or
    a busy moment does not lower the ceiling. Each round queues `repeats` products and waits once."""
    best = 0.0
    for size in sizes:
        a, b = mx.random.normal((size, size)).astype(dtype), mx.random.normal((size, size)).astype(dtype)
        mx.eval(a, b)
        tic = time.perf_counter()
        while time.perf_counter() - tic < warmup_seconds:
            mx.eval(a @ b)
        for _ in range(rounds):
            tic = time.perf_counter()
            mx.eval([a @ b for _ in range(repeats)])
            best = max(best, 2 * size**3 * repeats / (time.perf_counter() - tic))
        del a, b
    return best


def step_flops(llm, batch, projected):
    """Model FLOPs of one training step, counted from the shape: forward 2 x weights x tokens (the vocabulary
    projection at `projected` positions), backward about the same again, plus attention (QK^T and AV)."""
    args = clara.text_model(llm).args
    hidden, layers = args.hidden_size, len(llm.layers)
    per_layer = sum(v.size for k, v in tree_flatten(llm.layers[0].parameters()) if v.ndim == 2 and "lora" not in k)
    rows = [(batch["doc_ids"].shape[0], batch["doc_ids"].shape[1]), tuple(batch["ids"].shape)]
    tokens = sum(n * t for n, t in rows)
    attention = sum(n * 4 * t * t * hidden * layers for n, t in rows)
    forward = 2 * per_layer * layers * tokens + attention + 2 * hidden * args.vocab_size * projected
    return 2 * forward


def bench_examples(tokenizer, cfg, context):
    """Fixed shapes: documents of exactly doc_max_len tokens (cut from data/sample.pdf's text), 3 per sft record."""
    text = " ".join(t for _, t in clara.extract_pdf_pages(HERE / "sample.pdf"))
    ids = tokenizer.encode(text * 4, add_special_tokens=False)
    docs = [tokenizer.decode(ids[i * cfg.doc_max_len: (i + 1) * cfg.doc_max_len]) for i in range(3)]
    if context == "compress":
        record = {"kind": "reconstruct", "doc": docs[0], "target": docs[0]}
        return clara.compress_examples(tokenizer, cfg, [record] * cfg.batch_size)
    record = {"question": "What does the name CLaRa stand for?", "docs": docs, "answer": "Continuous Latent Reasoning"}
    return clara.sft_examples(tokenizer, replace(cfg, context=context), [record] * cfg.batch_size)


def mlx_lm_step_seconds(cfg, example, window):
    """mlx-lm's own trainer (mlx_lm.tuner.trainer.train) on the same base, LoRA targets, rank and tokens:
    plain next-token training with the loss on the answer tokens, its step compiled as mlx-lm compiles it.
    Runs two report windows of `window` steps; returns the seconds per step of the second, by mlx-lm's own
    timer (which leaves out building its batches)."""
    from mlx_lm.tuner.trainer import TrainingArgs
    from mlx_lm.tuner.trainer import train as mlx_lm_train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    llm, _ = clara.load_model(cfg.model, cfg.base)
    llm.freeze()
    linear_to_lora_layers(llm, cfg.lora_layers, {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": 0.0,
                                                 "keys": clara.lora_key_names(llm, cfg)})
    seconds = []

    class Timer:
        def on_train_loss_report(self, info):
            seconds.append(1 / info["iterations_per_second"])

        def on_val_loss_report(self, info):
            pass

    dataset = [(example["ids"], example["n_prompt"])] * cfg.batch_size
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
        args = TrainingArgs(batch_size=cfg.batch_size, iters=2 * window, steps_per_report=window,
                            steps_per_save=10**9, max_seq_length=cfg.max_len + 1,
                            adapter_file=f"{folder}/adapters.safetensors")
        mlx_lm_train(llm, optim.AdamW(learning_rate=cfg.lr), dataset, args=args, training_callback=Timer())
    return seconds[-1]


BENCH_STEPS = {"compress": "compress", "compressed": "sft (compressed)", "text": "sft (text context)",
               "mlx-lm": "mlx-lm trainer (sft text)"}


def bench_row(name, step, batch, flops, peak_rate, traces=0):
    return {"step": BENCH_STEPS[name], "seconds": step, "tokens": batch["n_tokens"],
            "tokens_per_s": batch["n_tokens"] / step, "gflop": flops / 1e9, "achieved_gflops": flops / step / 1e9,
            "fraction_of_matmul": flops / step / peak_rate, "peak_gb": mx.get_peak_memory() / 1e9, "traces": traces}


def bench_options(cfg):
    """The options that differ from the defaults, as flags: what a bench figure was measured with."""
    defaults = asdict(clara.Config())
    given = [(clara.option_flag(k), v) for k, v in asdict(cfg).items() if v != defaults[k] and k != "out"]
    return " ".join(flag if v is True else f"{flag} {' '.join(v) if isinstance(v, tuple) else v}"
                    for flag, v in given) or "(defaults)"


ANSWER_TOKENS = 32  # longest answer of the answering row; an untrained generator often runs to it


def answer_seconds(model, tokenizer, cfg, inputs, batch_size):
    """Seconds to answer every input (eval's work: compression, the answer's CE, greedy decoding) -> (seconds,
    answers)"""
    tic = time.perf_counter()
    answers = clara.answer_in_batches(model, tokenizer, cfg, inputs, ANSWER_TOKENS, batch_size)
    return time.perf_counter() - tic, [answer for answer, _, _ in answers]


def answering_row(model, tokenizer, cfg, args):
    """--questions records of data/sft.jsonl, from its first, cycling past its 50 (their questions and documents,
    mixed lengths), answered from compressed documents in batches of --eval-batch-size and one by one: questions per
    second and their ratio. Each way first answers the first batch's questions untimed (their one-off costs: kernel
    compilation on a GPU), so the figures are nearer the steady rate eval sees over hundreds of questions."""
    records = [r for _, r in clara.read_records(HERE / "sft.jsonl", clara.parse_e2e_record)]
    records = list(itertools.islice(itertools.cycle(records), args.questions))
    inputs = [(clara.question_example(tokenizer, cfg, {**r, "docs": r["docs"][: cfg.top_k]}, "compressed",
                                      r["gold"]), None) for r in records]
    size = clara.answer_batch_size(args.eval_batch_size)
    for n in (size, 1):  # warm-up, untimed: the first batch's questions each way
        clara.answer_in_batches(model, tokenizer, cfg, inputs[:size], ANSWER_TOKENS, n)
    (batched, answers), (single, alone) = (answer_seconds(model, tokenizer, cfg, inputs, n) for n in (size, 1))
    return {"questions": len(inputs), "eval_batch_size": size, "max_new_tokens": ANSWER_TOKENS,
            "batched_questions_per_s": len(inputs) / batched, "single_questions_per_s": len(inputs) / single,
            "answers_batched_vs_single": single / batched, "same_answers": answers == alone,
            "answers_differing": sum(a != b for a, b in zip(answers, alone))}


def answering_lines(row):
    return [f"answering {row['questions']} questions (eval's work, answers up to {row['max_new_tokens']} tokens): "
            f"{row['batched_questions_per_s']:.2f} questions/s in batches of {row['eval_batch_size']}, "
            f"{row['single_questions_per_s']:.2f} one by one: {row['answers_batched_vs_single']:.2f}x"
            + ("" if row["same_answers"] else f" | {row['answers_differing']} ANSWERS DIFFER")]


def bm25_row(sizes=(1_000, 10_000), words=200, questions=10):
    """clara.bm25_scorer (the lexical half of ask --index's hybrid ranking) on random chunks of `words` words drawn
    from 30,000 rare words and four common ones: the one-off build per index, then ms per 10-word question."""
    draw, row = random.Random(0), {}
    vocabulary = [f"w{i}" for i in range(30_000)] + ["the", "a", "of", "is"] * 2_000
    for n in sizes:
        texts = [" ".join(draw.choices(vocabulary, k=words)) for _ in range(n)]
        tic = time.perf_counter()
        score = clara.bm25_scorer(texts)
        built = time.perf_counter()
        for q in range(questions):
            score(f"what is the w{q} of w{q + 77} in w{q + 300} a test")
        row[n] = {"build_ms": 1000 * (built - tic), "question_ms": 1000 * (time.perf_counter() - built) / questions}
    return row


def cmd_bench(cfg, args, trained=None, checkpoint=None):
    """Each row trains 2 x --bench-steps steps on fixed shapes and reads back once per --bench-steps: the first
    window warms up (traces, kernel compilations), the second is timed, wall clock, batches built as in training.
    mlx-lm's trainer gets the same two windows on the same tokens. Then the answering row (answering_row) and the BM25
    row (bm25_row)."""
    if min(args.bench_steps, args.questions, 1 if args.eval_batch_size is None else args.eval_batch_size) <= 0:
        raise clara.InputError("--bench-steps, --questions and --eval-batch-size must be positive")
    report, lines = {"device": str(mx.default_device()), "blas": clara.BLAS, "options": bench_options(cfg),
                     "config": asdict(cfg)}, []
    if "training" in args.rows:
        training_rows(cfg, args, report, lines)
    if "answers" in args.rows:
        model, tokenizer = clara.load_clara(cfg)  # new: the adapters as they start, not as the training rows left them
        report["answering"] = answering_row(model, tokenizer, cfg, args)
        report["answers_batched_vs_single"] = report["answering"]["answers_batched_vs_single"]
        lines += answering_lines(report["answering"])
    if "bm25" in args.rows:
        report["bm25"] = bm25_row()
        lines += [f"BM25 over {n:,} chunks of 200 words: built in {r['build_ms']:.0f} ms, {r['question_ms']:.1f} ms a "
                  "question" for n, r in report["bm25"].items()]
    print("\n".join(lines))
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    clara.write_report(Path(cfg.out) / "bench", report, "\n".join(lines) + "\n")


def training_rows(cfg, args, report, lines):
    """The training rows and mlx-lm's trainer on the same tokens, into report and lines."""
    model, tokenizer = clara.load_clara(cfg)
    dtype = mx.bfloat16 if clara.on_gpu() else mx.float32
    peak_rate, window, rows = matmul_rate(dtype, (8192, 16384) if clara.on_gpu() else (2048,)), args.bench_steps, []
    for name in ("compress", "compressed", "text"):
        examples = bench_examples(tokenizer, cfg, name)
        batch = clara.make_batch(examples, cfg.n_mem, tokenizer.pad_token_id)
        mx.reset_peak_memory()
        with contextlib.redirect_stdout(io.StringIO()):
            history = clara.train(model, examples, replace(cfg, steps=2 * window, log_every=window, warmup=0.0),
                            tokenizer.pad_token_id)
        flops = step_flops(model.llm, batch, batch["label_positions"].size)
        rows.append(bench_row(name, history[-1]["seconds"], batch, flops, peak_rate, model.traces))
    text_batch, flops = batch, step_flops(model.llm, batch, batch["ids"].size)  # mlx-lm projects every position
    del model, history  # one copy of the base weights at a time
    mx.clear_cache()
    mx.reset_peak_memory()
    rows.append(bench_row("mlx-lm", mlx_lm_step_seconds(cfg, examples[0], window), text_batch, flops, peak_rate))
    ratio = rows[2]["tokens_per_s"] / rows[3]["tokens_per_s"]
    lines += [f"{mx.default_device()} | BLAS: {clara.BLAS} | {dtype} matmul {peak_rate / 1e9:.0f} GFLOP/s | "
              f"options: {report['options']} | {window} steps timed after {window}",
              "| step | s/step | tokens | tok/s | GFLOP | GFLOP/s | of matmul | peak GB |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['seconds']:.3f} | {r['tokens']} | {r['tokens_per_s']:.0f} | {r['gflop']:.1f} | "
              f"{r['achieved_gflops']:.1f} | {100 * r['fraction_of_matmul']:.0f}% | {r['peak_gb']:.2f} |" for r in rows]
    lines.append(f"sft (text context) / mlx-lm trainer on the same tokens: {ratio:.2f}x")
    if any(r["traces"] for r in rows):
        lines.append(f"--compile: traces per row {', '.join(str(r['traces']) for r in rows[:3])}")
    report.update(matmul_gflops=peak_rate / 1e9, rows=rows, text_vs_mlx_lm=ratio)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    groups = {title: parser.add_argument_group(title) for title in clara.OPTION_GROUPS}
    clara.add_config_options(groups, HIDDEN)
    parser.add_argument("--bench-steps", type=int, default=5, help="timed steps per row, after as many warm-up steps")
    parser.add_argument("--rows", nargs="+", choices=("training", "answers", "bm25"),
                        default=("training", "answers", "bm25"), help="the rows to measure [default: all three]")
    parser.add_argument("--eval-batch-size", type=int, help="questions answered at once in the answering row [default: "
                        f"clara.py's, {clara.ANSWER_BATCH['cpu']} on a CPU, {clara.ANSWER_BATCH['gpu']} on a GPU]")
    parser.add_argument("--questions", type=int, default=32,
                        help="questions of the answering row (data/sft.jsonl's, cycled past its 50)")
    args = parser.parse_args(argv)
    args.command = "bench"  # clara.py runs it as one of its commands: the same config, errors and exit codes
    clara.COMMANDS["bench"] = cmd_bench
    return clara.run_command(args)


if __name__ == "__main__":
    sys.exit(main())
