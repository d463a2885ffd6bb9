"""The GPU benchmark's recipe: model folders of real shapes with random weights, PyTorch+PEFT's step on the
same shapes, each piece of clara's step timed alone, each of its speed choices undone alone, its GPU kernels by
time, and training data whose lengths vary record to record.
The README's GPU tables come from it.

    python data/gpu_bench.py tokenizer --out TOK            # the default model's tokenizer, saved (needs clara.py's
                                                            # packaged GGUF: run it where `make test` ran)
    python data/gpu_bench.py model --shape llama-3.2-1b --tokenizer TOK --out models/llama-1b
    python data/bench.py --model models/llama-1b --base bfloat16 --batch-size 4 --doc-max-len 1024 --max-len 4096
    python data/gpu_bench.py torch --model models/llama-1b --batch-size 4 --length 3001 [--compile]
    python data/gpu_bench.py pieces --model models/llama-1b [--pad-to 64]   # each piece of clara's step alone
    python data/gpu_bench.py variants --model models/llama-1b   # each speed choice of the step undone alone
    python data/gpu_bench.py kernels --model models/llama-1b    # the step's GPU kernels by time (needs torch)
    python data/gpu_bench.py varlen --tokenizer TOK --records 2000 --out varlen.jsonl
    python clara.py sft --data varlen.jsonl --model models/smollm2 --base bfloat16 --batch-size 4 ...

Step times do not depend on the weights' values, so random weights of a model's exact shape give its step
time. The PyTorch reference trains what mlx-lm's trainer trains in `data/bench.py` (the sft text row): the
same LoRA targets, rank, scale and blocks, AdamW with the same betas, gradient clipping to 1.0, bf16 base,
SDPA attention, the loss on the last `--answer` tokens of each row; its rows are the same length.
"""

import argparse
import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent

# the shapes benchmarked (Hugging Face config.json fields, which mlx-lm's llama reads too)
SHAPES = {
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "rms_norm_eps": 1e-5,
                     "rope_theta": 100000.0, "tie_word_embeddings": True, "max_position_embeddings": 8192},
    "llama-3.2-1b": {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                     "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
                     "max_position_embeddings": 131072,
                     "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
}


def import_clara():
    """clara.py, imported only where MLX is needed: the torch command runs where MLX may not be installed."""
    sys.path.insert(0, str(HERE.parent))
    import clara

    return clara


def bench_examples(tokenizer, cfg, row):
    """data/bench.py's fixed-shape examples of a row (compress, compressed, text); imported where MLX is needed."""
    sys.path.insert(0, str(HERE))
    import bench

    return bench.bench_examples(tokenizer, cfg, row)


def save_tokenizer(out):
    import_clara().load_model("smollm2")[1].save_pretrained(str(out))


def save_model(shape, tokenizer, out, seed=0):
    """A model folder mlx-lm loads: config.json, random bf16 weights of the shape, the tokenizer's files."""
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    config = SHAPES[shape]
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(mx.bfloat16) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}, indent=1) + "\n")
    for f in Path(tokenizer).iterdir():
        shutil.copy(f, out / f.name)
    print(f"wrote {out}: {shape}, {sum(v.size for v in weights.values()) / 1e6:.0f}M parameters")


def torch_step(model, batch_size, length, answer, steps, compiled, lora_layers=8, rank=16, scale=2.0):
    """PyTorch+PEFT's LoRA step (q and v of the last `lora_layers` blocks) on random tokens of the shape.
    Returns (seconds per step, peak GB): the median of `steps` timed steps after 3 warm-up steps."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SHAPES.get(model) or json.loads((Path(model) / "config.json").read_text())
    config = LlamaConfig.from_dict({k: v for k, v in shape.items() if k not in ("model_type", "torch_dtype")})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    layers = config.num_hidden_layers
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank * scale, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"],
                                             layers_to_transform=list(range(layers - lora_layers, layers))))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    ids = torch.randint(0, config.vocab_size, (batch_size, length), device="cuda")
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    forward = torch.compile(model) if compiled else model

    def step():
        loss = forward(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1000)
    return sorted(seconds)[len(seconds) // 2], torch.cuda.max_memory_allocated() / 1e9


def time_pieces(model_name, pad_to=0, repeats=10, batch_size=4, doc_max_len=1024, max_len=4096):
    """Each piece of clara's training step timed alone on `data/bench.py`'s fixed shapes, bucketed as training
    buckets them (--pad-to; 0: the default), every call waited for: the loss's forward pass and the forward and
    backward pass (both compiled), and the whole update of clara.Update, compiled and eager.
    -> {row: {"widths": (compressor, generator), "tokens", and the seconds of each piece: median of `repeats`}}"""
    from dataclasses import replace

    import mlx.core as mx
    import mlx.optimizers as optim

    clara, cfg, model, tokenizer = bench_model(model_name, pad_to, batch_size, doc_max_len, max_len)
    forward = mx.compile(lambda batch: clara.clara_loss(model, batch, cfg)[0])
    forward_backward = compiled_forward_backward(clara, model, cfg)
    results = {}
    for row in ("compress", "compressed", "text"):
        batches = clara.step_batches(bench_examples(tokenizer, cfg, row), cfg, 1, tokenizer.pad_token_id)
        (batch, tokens), = batches  # one batch per update (--grad-accum 1), as training builds it
        pieces = {"widths": (batch["doc_ids"].shape[1], batch["ids"].shape[1]), "tokens": tokens,
                  "forward": median_seconds(lambda: forward(batch), repeats),
                  "forward_backward": median_seconds(lambda: forward_backward(batch), repeats)}
        for compiled in ("on", "off"):
            optimizer = optim.AdamW(learning_rate=1e-4, betas=[0.9, 0.95], weight_decay=0.0)
            update = clara.Update(model, optimizer, replace(cfg, compile=compiled))
            pieces[f"update_compile_{compiled}"] = median_seconds(
                lambda: [update(batches, mx.array(True))["losses"], model.trainable_parameters()], repeats)
        results[row] = pieces
    return results


# the choices that clara's step made for speed, each undone alone: what `variants` times against today's code
VARIANTS = ("today", "quarter octaves", "float32 adapters", "float32 logits", "float32 adapters and logits")


@contextlib.contextmanager
def undone(clara, variant):
    """clara as it was before one of its speed choices: length buckets of a quarter octave, not an eighth; the
    adapters' update computed in float32, not in the input's dtype; a float32 copy of the logits before the
    cross-entropy. Everything is put back on leaving."""
    import mlx.core as mx
    import mlx.nn as nn

    def float32_adapters(self, x):
        adapter = self.adapters[self.role]
        y = self.linear(x)
        return y + (self.scale * (self.dropout(x) @ adapter.lora_a) @ adapter.lora_b).astype(y.dtype)

    def float32_logits(logits, labels):
        mask = labels != clara.IGNORE
        ce = nn.losses.cross_entropy(logits.astype(mx.float32), mx.where(mask, labels, 0)) * mask
        n_tokens = mask.sum()
        return ce.sum() / mx.maximum(n_tokens, 1), n_tokens

    saved = clara.BUCKETS_PER_OCTAVE, clara.LoRALinear.__call__, clara.masked_cross_entropy
    if variant == "quarter octaves":
        clara.BUCKETS_PER_OCTAVE = 4
    if "adapters" in variant:
        clara.LoRALinear.__call__ = float32_adapters
    if "logits" in variant:
        clara.masked_cross_entropy = float32_logits
    try:
        yield
    finally:
        clara.BUCKETS_PER_OCTAVE, clara.LoRALinear.__call__, clara.masked_cross_entropy = saved


def bench_model(model_name, pad_to, batch_size, doc_max_len, max_len):
    """clara, its config for the bench's shapes (bfloat16 base on a GPU), the model and the tokenizer."""
    clara = import_clara()  # first: on a CPU it loads the system OpenBLAS before MLX starts
    cfg = clara.Config(model=str(model_name), base="bfloat16" if clara.on_gpu() else "float32",
                       batch_size=batch_size, doc_max_len=doc_max_len, max_len=max_len, pad_to=pad_to)
    llm, tokenizer = clara.load_model(cfg.model, cfg.base)
    return clara, cfg, clara.CLaRa(llm, cfg), tokenizer


def compiled_forward_backward(clara, model, cfg):
    """clara's loss and its gradients as one compiled function of a batch, traced on its first call."""
    import mlx.core as mx
    import mlx.nn as nn

    loss_and_grad = nn.value_and_grad(model, clara.clara_loss)
    return mx.compile(lambda batch: loss_and_grad(model, batch, cfg))


def median_seconds(run, repeats, warmup=2):
    """The median wall time of `repeats` calls of run(), each evaluated and waited for, after `warmup` calls."""
    import statistics

    import mlx.core as mx

    for _ in range(warmup):
        mx.eval(run())
    seconds = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(run())
        seconds.append(time.perf_counter() - tic)
    return statistics.median(seconds)


def time_variants(model_name, rows=("compress", "compressed", "text"), variants=VARIANTS, repeats=10, pad_to=0,
                  batch_size=4, doc_max_len=1024, max_len=4096):
    """The compiled forward and backward pass of each bench row with each speed choice undone alone (VARIANTS).
    -> {row: {variant: {"widths": (compressor, generator), "labelled": positions projected, "seconds"}}}"""
    clara, cfg, model, tokenizer = bench_model(model_name, pad_to, batch_size, doc_max_len, max_len)
    results = {}
    for row in rows:
        examples = bench_examples(tokenizer, cfg, row)
        for variant in variants:
            with undone(clara, variant):
                (batch, _), = clara.step_batches(examples, cfg, 1, tokenizer.pad_token_id)
                forward_backward = compiled_forward_backward(clara, model, cfg)  # traced anew per variant
                seconds = median_seconds(lambda: forward_backward(batch), repeats)
            results.setdefault(row, {})[variant] = {
                "widths": (batch["doc_ids"].shape[1], batch["ids"].shape[1]),
                "labelled": batch["label_positions"].size, "seconds": seconds}
    return results


def kernel_table(model_name, row="compress", rows_shown=40, batch_size=4, doc_max_len=1024, max_len=4096):
    """The GPU kernels of one row's compiled forward and backward pass (3 calls), by total time: torch's CUPTI
    profiler records every kernel of the process, MLX's included. Needs torch (the GPU machine's image has it)."""
    import mlx.core as mx
    import torch
    from torch.profiler import ProfilerActivity, profile

    clara, cfg, model, tokenizer = bench_model(model_name, 0, batch_size, doc_max_len, max_len)
    (batch, _), = clara.step_batches(bench_examples(tokenizer, cfg, row), cfg, 1, tokenizer.pad_token_id)
    forward_backward = compiled_forward_backward(clara, model, cfg)
    torch.cuda.init()
    median_seconds(lambda: forward_backward(batch), 1)
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        for _ in range(3):
            mx.eval(forward_backward(batch))
    return trace.key_averages().table(sort_by="cuda_time_total", row_limit=rows_shown, max_name_column_width=90)


def write_varlen(tokenizer, records, out, seed=0, doc_max_len=1024):
    """sft records whose lengths vary record to record, as real QA data does: 1 to 5 documents each, their
    lengths log-uniform from 32 to doc_max_len tokens of data/sample.pdf's text, questions and answers of
    varying length. For wall time per step on such data; the content teaches nothing."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    text = " ".join(t for _, t in import_clara().extract_pdf_pages(HERE / "sample.pdf"))
    ids = tok.encode(text * 8, add_special_tokens=False)
    draw = random.Random(seed)

    def piece(n):
        start = draw.randrange(0, len(ids) - n)
        return tok.decode(ids[start: start + n]).strip() or "none"

    def length(low, high):
        return int(math.exp(draw.uniform(math.log(low), math.log(high))))

    with open(out, "w") as f:
        for _ in range(records):
            docs = [piece(length(32, doc_max_len)) for _ in range(draw.randint(1, 5))]
            f.write(json.dumps({"question": piece(length(8, 40)) + "?", "docs": docs,
                                "answer": piece(length(1, 40))}) + "\n")
    print(f"wrote {out}: {records} records")


def append_json_line(path, obj):
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(obj) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("tokenizer").add_argument("--out", type=Path, required=True)
    model = commands.add_parser("model")
    model.add_argument("--shape", choices=SHAPES, required=True)
    model.add_argument("--tokenizer", type=Path, required=True)
    model.add_argument("--out", type=Path, required=True)
    torch_ = commands.add_parser("torch")
    torch_.add_argument("--model", required=True, help="a folder written by the model command, or a shape's name")
    torch_.add_argument("--batch-size", type=int, default=4)
    torch_.add_argument("--length", type=int, default=3017, help="tokens per row (bench's sft text rows: 3017)")
    torch_.add_argument("--answer", type=int, default=8, help="trained tokens at the end of each row")
    torch_.add_argument("--steps", type=int, default=10)
    torch_.add_argument("--compile", action="store_true", help="torch.compile the model")
    torch_.add_argument("--out", type=Path, help="append the result as a JSON line here")
    timed = {"pieces": commands.add_parser("pieces"), "variants": commands.add_parser("variants"),
             "kernels": commands.add_parser("kernels")}
    for name, sub in timed.items():  # clara's step on the bench's shapes
        sub.add_argument("--model", required=True, help="a folder written by the model command, or clara's --model")
        sub.add_argument("--batch-size", type=int, default=4)
        sub.add_argument("--doc-max-len", type=int, default=1024)
        sub.add_argument("--max-len", type=int, default=4096)
        if name != "kernels":
            sub.add_argument("--pad-to", type=int, default=0, help="clara's --pad-to (0: 128 on a GPU, none on a CPU)")
            sub.add_argument("--repeats", type=int, default=10, help="timed calls, after 2 warm-up calls")
            sub.add_argument("--out", type=Path, help="append the result as a JSON line here")
    timed["variants"].add_argument("--rows", default="compress,compressed,text")
    timed["kernels"].add_argument("--row", default="compress", choices=("compress", "compressed", "text"))
    varlen = commands.add_parser("varlen")
    varlen.add_argument("--tokenizer", type=Path, required=True)
    varlen.add_argument("--records", type=int, default=2000)
    varlen.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    shape = {"batch_size": args.batch_size, "doc_max_len": args.doc_max_len, "max_len": args.max_len} \
        if args.command in timed else {}
    options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in shape.items())
    if args.command == "tokenizer":
        save_tokenizer(args.out)
    elif args.command == "model":
        save_model(args.shape, args.tokenizer, args.out)
    elif args.command == "varlen":
        write_varlen(args.tokenizer, args.records, args.out)
    elif args.command == "pieces":
        results = time_pieces(args.model, args.pad_to, args.repeats, **shape)
        print(f"{args.model} | --pad-to {args.pad_to} {options} | ms, median of {args.repeats}, each call waited for")
        print("| row | widths (compressor, generator) | tokens | forward | forward+backward | update compiled "
              "| eager |")
        print("|---|---|---|---|---|---|---|")
        for row, r in results.items():
            print(f"| {row} | {r['widths']} | {r['tokens']} | " + " | ".join(
                f"{1000 * r[k]:.1f}" for k in ("forward", "forward_backward", "update_compile_on",
                                                "update_compile_off")) + " |")
        append_json_line(args.out, {**vars(args), "out": str(args.out), "rows": results})
    elif args.command == "variants":
        results = time_variants(args.model, args.rows.split(","), VARIANTS, args.repeats, args.pad_to, **shape)
        print(f"{args.model} | --pad-to {args.pad_to} {options} | compiled forward+backward, ms, median of "
              f"{args.repeats}, each call waited for")
        print("| row | variant | widths (compressor, generator) | labelled positions | ms |")
        print("|---|---|---|---|---|")
        for row, variants in results.items():
            for variant, r in variants.items():
                print(f"| {row} | {variant} | {r['widths']} | {r['labelled']} | {1000 * r['seconds']:.1f} |")
        append_json_line(args.out, {**vars(args), "out": str(args.out), "rows": results})
    elif args.command == "kernels":
        print(kernel_table(args.model, args.row, **shape))
    else:
        tic = time.perf_counter()
        seconds, peak = torch_step(args.model, args.batch_size, args.length, args.answer, args.steps, args.compile)
        tokens = args.batch_size * args.length
        row = {"model": args.model, "compile": args.compile, "batch_size": args.batch_size, "length": args.length,
               "seconds": seconds, "tokens_per_s": tokens / seconds, "peak_gb": peak,
               "wall_s": time.perf_counter() - tic}
        print(f"PyTorch+PEFT {'torch.compile' if args.compile else 'eager'} | {args.model} | {tokens} tok | "
              f"{seconds:.4f} s/step | {tokens / seconds:.0f} tok/s | peak {peak:.2f} GB")
        append_json_line(args.out, row)


if __name__ == "__main__":
    main()
