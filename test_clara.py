"""Properties of clara.py, in the module's order: truncation, LoRA, the memory path and padding, masking and
guarded divisions, stage 3, training and exact resume, the default model and the command line; then the
plumbing: model families, input reading, reliability, and the evidence experiment. Tiny models are built
inline; the default model is the real one."""

import errno
import gzip
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

import clara  # first: it loads the system's OpenBLAS before MLX is imported (3x faster CPU matmuls)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402
from mlx_lm.models import llama  # noqa: E402

ROOT = Path(__file__).parent
FAST = settings(max_examples=60, deadline=None)


# -----------------------------------------------------------------------------
# fixtures: the real tokenizer, a tiny llama on its vocabulary, the default model


@pytest.fixture(scope="session")
def default_model():
    return clara.load_model("smollm2")


@pytest.fixture(scope="session")
def tokenizer(default_model):
    return default_model[1]


def tiny_config(**overrides):
    # eager unless a test is about compiling: the command-line tests train with the default, --compile auto
    settings = dict(doc_max_len=32, compression_rate=8, max_len=160, lora_rank=4, lora_layers=2, lr=1e-2,
                    batch_size=2, steps=12, seed=0, compile="off")
    return clara.Config(**{**settings, **overrides})


# the tiny llama of most tests (and of the model folder the CLI tests use), on the real tokenizer's vocabulary
TINY_ARGS = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
             "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 49152,
             "rope_traditional": True, "tie_word_embeddings": True}


def tiny_clara(cfg, vocab_size=49152, seed=0):
    mx.random.seed(seed)
    return clara.CLaRa(llama.Model(llama.ModelArgs(**{**TINY_ARGS, "vocab_size": vocab_size})), cfg)


SFT_RECORDS = [
    {"question": "What colour is the sky?", "docs": ["The sky is blue on a clear day.", "Grass is green."],
     "answer": "blue"},
    {"question": "How many legs has a spider?", "docs": ["Cats purr.", "A spider has eight legs and spins silk."],
     "answer": "eight"},
]


# -----------------------------------------------------------------------------
# truncation


@FAST
@given(st.lists(st.integers(0, 9), max_size=40), st.lists(st.integers(0, 9), max_size=40), st.integers(1, 60))
def test_truncation_cuts_the_prompt_at_its_start_and_the_target_at_its_end_and_never_needlessly(prompt, target,
                                                                                                 max_len):
    kept_prompt, kept_target = clara.truncate_prompt_and_target(prompt, target, max_len)
    assert len(kept_prompt) + len(kept_target) == min(len(prompt) + len(target), max_len)  # nothing cut needlessly
    assert kept_prompt == prompt[len(prompt) - len(kept_prompt):]  # a suffix: dropped from the start only
    assert kept_target == target[: len(kept_target)]  # a prefix: cut at its end only
    if len(kept_target) < len(target):  # a target is cut only for a prompt that is whole or half of max_len
        assert len(kept_prompt) in (len(prompt), max_len // 2)
    if len(kept_prompt) < len(prompt):  # a prompt loses tokens only to a target that is whole or half of max_len
        assert len(kept_target) in (len(target), max_len - max_len // 2)


def test_a_long_prompt_loses_its_start_and_a_long_target_its_end_keeping_the_memory(tokenizer):
    cfg = tiny_config(max_len=24)
    example = clara.build_example(tokenizer, cfg, ["one two three " * 20], clara.USER_ANSWER, "because",
                                  question="why {docs}?")  # a placeholder inside the question stays text
    target = tokenizer.encode("because", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert len(example["ids"]) == 24 and example["ids"][-len(target):] == target
    assert example["n_prompt"] == 24 - len(target) and not example["target_cut"]
    cfg = tiny_config(max_len=120)  # a stage-1 target longer than max_len: Apple cuts it at its end
    long_target = "Question: who?\nAnswer: a village. " * 40
    overlong = clara.compress_examples(tokenizer, cfg, [{"kind": "qa", "doc": "doc", "target": long_target}])[0]
    prompt = clara.encode_prompt(tokenizer, clara.SYSTEM_QA, clara.fill(clara.USER_QA, docs=clara.slot_marks(1)), 1,
                                 cfg.n_mem)[0]
    assert overlong["target_cut"] and overlong["docs_dropped"] == 0 and len(overlong["ids"]) == 120
    assert overlong["ids"][: overlong["n_prompt"]] == prompt  # the whole prompt, memory slots and all
    assert overlong["ids"][overlong["n_prompt"]:] == tokenizer.encode(long_target, add_special_tokens=False)[
        : 120 - len(prompt)]


# -----------------------------------------------------------------------------
# LoRA


@pytest.mark.parametrize("quantized", [False, True])
def test_lora_with_zero_b_is_exactly_the_base_layer_and_roles_are_separate(quantized):
    mx.random.seed(1)
    base = nn.Linear(64, 32)
    if quantized:
        base = nn.QuantizedLinear.from_linear(base, group_size=32, bits=4)
    lora = clara.LoRALinear(base, rank=4, scale=2.0)
    x = mx.random.normal((3, 64))
    assert lora.adapters["generator"]["lora_a"].shape == (64, 4)  # packed weights unpacked to the true input width
    assert mx.array_equal(lora(x), base(x))
    lora.adapters["compressor"]["lora_b"] = mx.ones((4, 32))
    lora.role = "generator"
    assert mx.array_equal(lora(x), base(x))  # the compressor's update does not leak into the generator
    lora.role = "compressor"
    expected = base(x) + 2.0 * (x @ lora.adapters["compressor"]["lora_a"]) @ mx.ones((4, 32))
    assert mx.allclose(lora(x), expected, atol=1e-4)


def test_lora_dropout_acts_only_in_training_mode():
    mx.random.seed(2)
    lora = clara.LoRALinear(nn.Linear(64, 32), rank=4, scale=2.0, dropout=0.5)
    lora.adapters["generator"]["lora_b"] = mx.ones((4, 32))
    x = mx.random.normal((3, 64))
    lora.train()
    assert not mx.array_equal(lora(x), lora(x))  # a new mask per call
    lora.eval()
    expected = lora.linear(x) + 2.0 * (x @ lora.adapters["generator"]["lora_a"]) @ mx.ones((4, 32))
    assert mx.allclose(lora(x), expected, atol=1e-4)


def test_only_adapters_and_memory_are_trainable_with_the_exact_count():
    cfg = tiny_config()
    model = tiny_clara(cfg)
    names = [name for name, _ in tree_flatten(model.trainable_parameters())]
    per_layer = (64 * 4 + 4 * 64) + (64 * 4 + 4 * 32)  # q_proj (64 -> 64) + v_proj (64 -> 32: 2 kv heads of 16)
    assert sum(v.size for _, v in tree_flatten(model.trainable_parameters())) == \
        2 * 2 * per_layer + cfg.n_mem * 64  # 2 roles x 2 layers, + memory
    assert all(".adapters." in n or n == "memory" for n in names)


def test_memory_embeddings_start_as_apples_added_vocabulary_rows_at_the_mean_embedding_with_almost_no_spread():
    cfg = tiny_config()
    model = tiny_clara(cfg)
    table = np.array(model.llm.model.embed_tokens.weight, dtype=np.float64)  # (V, H)
    memory = np.array(model.memory, dtype=np.float64)  # (n_mem, H)
    assert memory.shape == (cfg.n_mem, table.shape[1]) and model.memory.dtype == mx.float32
    assert np.abs(memory.mean(0) - table.mean(0)).max() < 0.05 * table.std()  # the mean row (of a strided sample)
    spread = np.abs(memory - memory.mean(0)).max()
    assert 0 < spread < 1e-3 * table.std()  # distinct, but all but equal: N(0, 1e-9 x covariance)


# -----------------------------------------------------------------------------
# the memory path and padding


def test_memory_states_have_shape_n_mem_by_hidden_and_fill_exactly_the_slots(tokenizer):
    cfg = tiny_config()
    model = tiny_clara(cfg)
    examples = clara.sft_examples(tokenizer, cfg, SFT_RECORDS)
    batch = clara.make_batch(examples, cfg.n_mem, tokenizer.pad_token_id)
    memory_states, mse = clara.encode_into_memory(model, batch["doc_ids"], batch["doc_lens"])
    assert memory_states.shape == (4, cfg.n_mem, 64)  # 2 records x 2 docs
    assert mse.item() > 0
    slots = np.array(batch["slot_index"])
    assert sorted(slots[slots >= 0].tolist()) == list(range(4 * cfg.n_mem))  # every vector used once
    spliced = clara.splice_slots(model.llm.model.embed_tokens(batch["ids"]), batch["slot_index"],
                                 memory_states.reshape(-1, 64))
    b, t = np.argwhere(slots == 2 * cfg.n_mem + 3)[0]  # record 1's first doc (3rd doc overall), vector 3
    assert b == 1 and mx.array_equal(spliced[b, t], memory_states[2, 3])


@pytest.mark.parametrize("scale", ["embedding", "none"])
def test_spliced_memory_has_the_token_embedding_norm_or_is_left_as_it_is(tokenizer, scale):
    cfg = tiny_config(memory_scale=scale)
    model = tiny_clara(cfg)
    batch = clara.make_batch(clara.sft_examples(tokenizer, cfg, SFT_RECORDS), cfg.n_mem, tokenizer.pad_token_id)
    memory_states = 30.0 * clara.encode_into_memory(model, batch["doc_ids"], batch["doc_lens"])[0]  # (4, n_mem, H)
    spliced = clara.generator_embeddings(model, batch["ids"], batch["slot_index"], memory_states)
    slots = np.array(batch["slot_index"])
    b, t = np.argwhere(slots == 5)[0]
    embeddings = model.llm.model.embed_tokens.weight  # (V, H): the norm is that of a sample of its rows
    if scale == "none":  # Apple's splice: the final states as they are
        assert mx.array_equal(spliced[b, t], memory_states.reshape(-1, 64)[5])
    else:  # the direction kept, the norm that of an average token embedding
        assert mx.linalg.norm(spliced[b, t]).item() == pytest.approx(mx.linalg.norm(embeddings, axis=-1).mean().item(),
                                                                     rel=1e-2)
        cosine = clara.cosine_scores(spliced[b, t][None], memory_states.reshape(1, -1, 64)[:, 5:6])[0, 0].item()
        assert cosine == pytest.approx(1.0, abs=1e-5)
    b, t = np.argwhere(slots < 0)[0]
    assert mx.array_equal(spliced[b, t], model.llm.model.embed_tokens(batch["ids"][b, t]))  # tokens untouched


def test_projecting_only_labelled_positions_gives_the_full_masked_loss(tokenizer):
    cfg = tiny_config()
    model = tiny_clara(cfg)
    batch = clara.make_batch(clara.sft_examples(tokenizer, cfg, SFT_RECORDS), cfg.n_mem, tokenizer.pad_token_id)
    memory_states, mse = clara.encode_into_memory(model, batch["doc_ids"], batch["doc_lens"])
    full_ce, full_n = clara.masked_cross_entropy(
        clara.generator_logits(model, batch["ids"], batch["slot_index"], memory_states), batch["labels"])
    loss, ce, mse_again, n = clara.clara_loss(model, batch, cfg)
    assert n.item() == full_n.item() == batch["label_positions"].size
    assert abs(ce.item() - full_ce.item()) < 1e-5 and abs(loss.item() - (full_ce + 0.1 * mse).item()) < 1e-5
    unlabelled = clara.make_batch([{**clara.sft_examples(tokenizer, cfg, SFT_RECORDS)[0], "n_prompt": 10**6}],
                                  cfg.n_mem, tokenizer.pad_token_id)
    assert clara.clara_loss(model, unlabelled, cfg)[1].item() == 0.0  # no label at all: CE 0


def test_labels_are_exactly_the_target_tokens(tokenizer):
    cfg = tiny_config()
    examples = clara.sft_examples(tokenizer, cfg, SFT_RECORDS)
    batch = clara.make_batch(examples, cfg.n_mem, tokenizer.pad_token_id)
    for row, record in enumerate(SFT_RECORDS):
        labels = [x for x in np.array(batch["labels"][row]).tolist() if x != clara.IGNORE]
        assert labels == tokenizer.encode(record["answer"], add_special_tokens=False) + [tokenizer.eos_token_id]


def test_padding_does_not_change_any_real_tokens_result(tokenizer):
    cfg = tiny_config()
    model = tiny_clara(cfg)
    records = [SFT_RECORDS[0], {**SFT_RECORDS[1], "docs": ["A spider has eight legs. " * 3] + SFT_RECORDS[1]["docs"]}]
    examples = clara.sft_examples(tokenizer, cfg, records)
    together = clara.make_batch(examples, cfg.n_mem, tokenizer.pad_token_id)
    mem_together, _ = clara.encode_into_memory(model, together["doc_ids"], together["doc_lens"])
    logits_together = clara.generator_logits(model, together["ids"], together["slot_index"], mem_together)
    docs_done = 0
    for row, example in enumerate(examples):
        alone = clara.make_batch([example], cfg.n_mem, tokenizer.pad_token_id)
        mem_alone, _ = clara.encode_into_memory(model, alone["doc_ids"], alone["doc_lens"])
        n_docs, length = len(example["doc_ids"]), len(example["ids"])
        assert mx.allclose(mem_alone, mem_together[docs_done: docs_done + n_docs], atol=1e-5)
        logits_alone = clara.generator_logits(model, alone["ids"], alone["slot_index"], mem_alone)
        assert mx.allclose(logits_alone[0], logits_together[row, :length], atol=1e-4)
        docs_done += n_docs
    assert together["ids"].shape[1] > min(len(e["ids"]) for e in examples)  # some row really was padded


def test_padding_lengths_to_a_multiple_changes_no_loss(tokenizer):
    cfg = tiny_config()
    model = tiny_clara(cfg)
    examples = clara.sft_examples(tokenizer, cfg, SFT_RECORDS)
    plain = clara.make_batch(examples, cfg.n_mem, tokenizer.pad_token_id)
    padded = clara.make_batch(examples, cfg.n_mem, tokenizer.pad_token_id, multiple=64)
    assert padded["ids"].shape[1] % 64 == 0 and padded["doc_ids"].shape[1] % 64 == 0
    assert padded["label_positions"].size % 64 == 0 and padded["label_positions"].size > plain["label_positions"].size
    for a, b in zip(clara.clara_loss(model, plain, cfg), clara.clara_loss(model, padded, cfg)):
        assert abs(a.item() - b.item()) < 1e-5


@FAST
@given(st.integers(0, 20000), st.sampled_from([1, 2, 8, 64]), st.integers(0, 20000))
def test_length_buckets_hold_the_length_pad_under_an_eighth_and_never_pass_the_longest_row(n, multiple, longest):
    bucket = clara.length_bucket(n, multiple, longest)
    assert bucket >= n and (bucket % multiple == 0 or bucket == n)
    if multiple > 1 and n > 8 * multiple:
        assert bucket < 1.125 * n  # an eighth of the power of two at or below n is at most an eighth of n
    if multiple > 1 and longest >= n:
        assert bucket <= clara.round_up(longest, multiple)
    assert clara.length_bucket(n + 1, multiple) >= clara.length_bucket(n, multiple)  # monotone: a ladder


def test_lengths_up_to_4096_fall_into_24_buckets_at_multiple_128_and_a_full_document_row_is_padded_least():
    assert len({clara.length_bucket(n, 128) for n in range(1, 4097)}) == 24
    cfg = tiny_config(doc_max_len=1024, compression_rate=16)  # a full document and its memory: 1088 -> 1152, not 1280
    assert clara.length_bucket(cfg.doc_max_len + cfg.n_mem, 128, cfg.doc_max_len + cfg.n_mem) == 1152


@FAST
@given(st.lists(st.lists(st.integers(1, 1300), min_size=1, max_size=3), min_size=1, max_size=3),
       st.integers(0, 600))
def test_on_a_gpu_every_training_row_is_a_multiple_of_128_where_attention_backward_is_fused(tokenizer, doc_words,
                                                                                              answer_words):
    cfg = tiny_config(doc_max_len=1024, compression_rate=16, max_len=4096)
    records = [{"question": "Which words?", "docs": ["word " * n for n in docs], "answer": "yes " * answer_words}
               for docs in doc_words]
    examples = clara.sft_examples(tokenizer, cfg, records)
    with mock.patch.object(clara, "on_gpu", lambda: True):
        batch = clara.training_batch(examples, cfg, tokenizer.pad_token_id)
    longest_doc = max(len(d) for ex in examples for d in ex["doc_ids"])
    assert batch["doc_ids"].shape[1] % 128 == 0 and batch["doc_ids"].shape[1] >= longest_doc + cfg.n_mem
    assert batch["doc_ids"].shape[1] <= 1152  # the longest row the config allows (1024 + 64), rounded up
    assert batch["ids"].shape[1] % 128 == 0 and batch["ids"].shape[1] >= max(len(ex["ids"]) for ex in examples)
    cpu_batch = clara.training_batch(examples, cfg, tokenizer.pad_token_id)  # the CPU pads to the longest row only
    assert cpu_batch["ids"].shape[1] == max(len(ex["ids"]) for ex in examples)
    assert cpu_batch["doc_ids"].shape[1] == longest_doc + cfg.n_mem


# -----------------------------------------------------------------------------
# model families: tiny random models of each family that takes input embeddings, built as mlx-lm builds them

TINY_FAMILY = {**{k: v for k, v in TINY_ARGS.items() if k not in ("model_type", "rope_traditional")},
               "head_dim": 16, "rope_theta": 10000.0, "max_position_embeddings": 1024}
MINISTRAL3 = dict(rope_parameters={"rope_theta": 10000.0, "llama_4_scaling_beta": 0.1,
                                   "original_max_position_embeddings": 1024})
FAMILY_CONFIGS = {  # family -> config.json beyond TINY_FAMILY; some with a separate lm_head, as real ones have
    "llama": {}, "qwen2": {"tie_word_embeddings": False}, "qwen3": {}, "smollm3": {},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1,
                  "mlp_only_layers": [], "norm_topk_prob": True},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "tie_word_embeddings": False},
    "gemma3_text": {"query_pre_attn_scalar": 16, "sliding_window": 16, "sliding_window_pattern": 2},
    "ministral3": {**MINISTRAL3, "tie_word_embeddings": False},
    "mistral3": {"text_config": {**TINY_FAMILY, "model_type": "ministral3", **MINISTRAL3}},
    "gemma3": {"text_config": {**TINY_FAMILY, "model_type": "gemma3_text", "query_pre_attn_scalar": 16,
                               "sliding_window": 16, "sliding_window_pattern": 2}},
}


def family_config(family):
    return {**TINY_FAMILY, "model_type": family, **FAMILY_CONFIGS[family]}


def tiny_family_model(family, seed=0):
    from mlx_lm.utils import _get_classes

    mx.random.seed(seed)
    model_class, args_class = _get_classes(family_config(family))
    return model_class(args_class.from_dict(family_config(family)))


def test_every_tested_family_has_a_tiny_model_here():
    assert set(clara.TESTED_FAMILIES) - set(FAMILY_CONFIGS) == {"mistral"}  # mlx-lm loads it as llama


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_slots_filled_with_the_tokens_own_embeddings_give_exactly_the_plain_forward_pass(tokenizer, family):
    cfg = tiny_config(memory_scale="none")  # Apple's splice: the first block sees memory vectors as they are
    model = clara.CLaRa(tiny_family_model(family), cfg)
    ids = mx.array([tokenizer.encode("Memory vectors stand in for the tokens of a document here.")])  # (1, T)
    slots = mx.arange(ids.shape[1])[None] - 3
    slot_index = mx.where((slots >= 0) & (slots < 6), slots, -1)  # six slots from position 3
    # what the first block sees for those tokens: their embedding rows times the family's multiplier (Gemma's)
    own = clara.embedding_multiplier(model.llm) * clara.token_embeddings(model.llm, ids[0, 3:9])  # (6, H)
    logits = clara.generator_logits(model, ids, slot_index, own[None])  # (1, T, V)
    plain = model.llm(ids)  # the generator adapter starts at zero: the plain model
    assert mx.allclose(logits, plain, atol=1e-4).item()
    assert not mx.allclose(clara.generator_logits(model, ids, slot_index, 2 * own[None]), plain, atol=1e-2).item()
    if family.startswith("gemma3"):  # the family whose text model multiplies its input embeddings
        assert clara.embedding_multiplier(model.llm) == 8.0


def changed_roles(model, before):
    return {clara.adapter_role(name) for name, v in tree_flatten(model.parameters())
            if not np.array_equal(np.array(v), before[name])}


def snapshot(model):
    return {name: np.array(v) for name, v in tree_flatten(model.parameters())}


def train_three_stages(model, tokenizer, cfg):
    """A few steps of stage 1 (compress), 2 (sft) and 3 (e2e): -> {stage: (first ce, last ce, changed roles)}"""
    docs = ["Memory tokens follow every document.", "The generator reads compressed vectors."]
    stage1 = clara.compress_examples(tokenizer, cfg, [{"kind": "reconstruct", "doc": d, "target": d} for d in docs])
    result = {}
    for stage in ("compress", "sft", "e2e"):
        if stage == "e2e":
            clara.train_only(model, ("generator", "query"), memory=False)
            texts = sorted({d for r in E2E_RECORDS for d in r["docs"]})
            bank = clara.compress_corpus(model, tokenizer, cfg, texts)
            examples = clara.e2e_examples(tokenizer, replace(cfg, top_k=2), E2E_RECORDS, bank,
                                          {t: i for i, t in enumerate(texts)})
        else:
            examples = stage1 if stage == "compress" else clara.sft_examples(tokenizer, cfg, SFT_RECORDS)
        before = snapshot(model)
        history = clara.train(model, examples, replace(cfg, top_k=2), tokenizer.pad_token_id)
        result[stage] = history[0]["ce"], history[-1]["ce"], changed_roles(model, before)
    return result


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_each_family_trains_all_three_stages_and_each_stage_moves_only_its_roles(tokenizer, family):
    cfg = tiny_config(steps=2)  # both records in every batch: the second step sees the first one's batch again
    result = train_three_stages(clara.CLaRa(tiny_family_model(family), cfg), tokenizer, cfg)
    assert result["compress"][2] == result["sft"][2] == {"compressor", "generator", None}  # None: the memory
    assert result["e2e"][2] == {"generator", "query"}
    assert all(last < first for first, last, _ in result.values()), result


# float sums over a padded batch may round differently from one row's: last-position logits agree to this
BATCH_LOGITS_ATOL = 1e-4


def last_logits(llm, ids, embeddings, cache):
    return clara.output_logits(llm, clara.final_hidden(llm, ids, embeddings, cache)[:, -1])  # (B, V)


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_left_padded_prompts_decode_as_each_prompt_alone_in_every_family(family):
    """Left padding is masked out of attention and each row's positions (RoPE) start at its first real token: a
    batch's logits match each prompt's own to BATCH_LOGITS_ATOL and its greedy tokens are equal, longer prompts
    than gemma's sliding window included; the plain cache (padding attended, positions shifted) does not match."""
    from mlx_lm.models.cache import make_prompt_cache

    llm = tiny_family_model(family)
    mx.random.seed(1)
    rows = [mx.random.randint(0, 49152, (n,)).tolist() for n in (5, 23, 12)]
    ids, left_padding = clara.left_padded(rows, 0)
    def embeddings():  # (3, 23, H), the prompt as embeddings as memory arrives; new each time: gemma scales it in place
        return clara.token_embeddings(llm, ids)

    batched = last_logits(llm, ids, embeddings(), clara.batch_cache(llm, left_padding))  # (3, V)
    alone = mx.concatenate([last_logits(llm, mx.array([r]), None, make_prompt_cache(llm)) for r in rows])
    assert mx.abs(batched - alone).max().item() < BATCH_LOGITS_ATOL
    unmasked = last_logits(llm, ids, embeddings(), make_prompt_cache(llm))
    assert mx.abs(unmasked[0] - alone[0]).max().item() > 100 * BATCH_LOGITS_ATOL
    new = clara.greedy_generate(llm, ids, eos_id=-1, max_new_tokens=6, input_embeddings=embeddings(),
                                left_padding=left_padding)[0]
    assert new == [clara.greedy_generate(llm, mx.array([r]), -1, 6)[0][0] for r in rows] and len(new[1]) == 6
    eos = new[0][0]  # as end-of-sequence, the first row's first token ends it at once, the others on their own
    stopped = clara.greedy_generate(llm, ids, eos, 6, embeddings(), left_padding)[0]
    assert stopped[0] == [] and max(map(len, stopped)) == 6
    assert stopped == [clara.greedy_generate(llm, mx.array([r]), eos, 6)[0][0] for r in rows]


def test_a_model_whose_cache_has_no_batch_form_in_mlx_lm_answers_row_by_row_the_same():
    from mlx_lm.models.cache import ConcatenateKVCache

    llm = tiny_family_model("llama")
    rows = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
    ids, left_padding = clara.left_padded(rows, 0)
    batched = clara.greedy_generate(llm, ids, -1, 4, clara.token_embeddings(llm, ids), left_padding)[0]
    llm.make_cache = lambda: [ConcatenateKVCache() for _ in llm.layers]
    assert clara.batch_cache(llm, left_padding) is None
    assert clara.greedy_generate(llm, ids, -1, 4, clara.token_embeddings(llm, ids), left_padding)[0] == batched


def save_family_folder(folder, family, bits):
    """A tiny model of a family quantized as mlx-lm's convert does, saved as an mlx-lm model folder."""
    llm = tiny_family_model(family)
    nn.quantize(llm, group_size=32, bits=bits)
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(llm.parameters())))
    config = {**family_config(family), "quantization": {"group_size": 32, "bits": bits}}
    (folder / "config.json").write_text(json.dumps(config))
    return llm


@pytest.mark.parametrize("family, bits", [("qwen3", 4), ("gemma3_text", 8)])
def test_quantized_bases_train_with_the_adapters_on_top_and_stay_quantized(tmp_path, tokenizer, family, bits):
    saved = save_family_folder(tmp_path / "model", family, bits)
    tokenizer.save_pretrained(str(tmp_path / "model"))
    llm, _ = clara.load_model(str(tmp_path / "model"), base="stored")
    ids = mx.array([tokenizer.encode("Quantized weights stay as they are.")])
    assert mx.array_equal(llm(ids), saved(ids)).item()
    cfg = tiny_config(steps=3)
    model = clara.CLaRa(llm, cfg)
    wrapped = [m.linear for _, m in model.named_modules() if isinstance(m, clara.LoRALinear)]
    assert wrapped and all(isinstance(layer, nn.QuantizedLinear) and layer.bits == bits for layer in wrapped)
    base = {name: v for name, v in snapshot(model).items() if clara.adapter_role(name) is None and name != "memory"}
    result = train_three_stages(model, tokenizer, cfg)
    assert all(last < first for first, last, _ in result.values()), result
    assert all(np.array_equal(np.array(v), base[name]) for name, v in tree_flatten(model.parameters())
               if name in base)  # the packed base weights never change


def test_a_family_that_cannot_take_input_embeddings_is_refused_before_its_weights_load(tmp_path):
    (tmp_path / "phi3").mkdir()
    (tmp_path / "phi3" / "config.json").write_text(json.dumps({**TINY_FAMILY, "model_type": "phi3"}))  # no weights
    run = run_cli("sft", "--model", tmp_path / "phi3", "--data", ROOT / "data" / "sft.jsonl", "--out", tmp_path / "out")
    assert_clean_failure(run, "mlx-lm's phi3 models cannot take input embeddings", tmp_path)
    assert "llama, mistral, qwen2" in run.stderr


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "clara.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """compress --pdf (2 steps), then sft --init it (1 step) on 6 + 2 records, through the CLI, default model."""
    root = tmp_path_factory.mktemp("cli")
    compress = run_cli("compress", "--pdf", "data/sample.pdf", "--steps", 2, "--out", root / "c")
    records = [json.loads(line) for line in (ROOT / "data" / "sft.jsonl").read_text().splitlines()]
    few = [r for r in records if r.get("split") != "eval"][:6] + [r for r in records if r.get("split") == "eval"][:2]
    (root / "few.jsonl").write_text("".join(json.dumps(r) + "\n" for r in few))  # validation in seconds
    sft = run_cli("sft", "--data", root / "few.jsonl", "--init", root / "c", "--steps", 1, "--out", root / "s")
    return {"root": root, "compress": compress, "sft": sft, "records": records}


def test_cli_compress_chunks_the_pdf_with_its_pages_into_its_out_folder_and_trains(cli_runs):
    run, root = cli_runs["compress"], cli_runs["root"]
    assert run.returncode == 0, run.stderr
    assert "step 2/2 | loss" in run.stdout and "BLAS:" in run.stdout
    chunks = [json.loads(line) for line in (root / "c" / "chunks.jsonl").read_text().splitlines()]  # beside the run
    assert chunks and all(c["text"] and c["pages"] for c in chunks)


def test_cli_sft_starts_from_init_and_records_its_config(cli_runs):
    run, root = cli_runs["sft"], cli_runs["root"]
    assert run.returncode == 0, run.stderr  # one step: the validation loss of step 1 is also the last one's
    assert "6 training record(s), 2 held out" in run.stdout and run.stdout.count("val_loss") == 1
    config = json.loads((root / "s" / "config.json").read_text())
    assert config["n_mem"] == 16 and config["init"] == str(root / "c") and config["steps"] == 1


def test_the_saved_generator_adapter_gives_mlx_lm_the_generators_logits(cli_runs, default_model):
    from mlx_lm.tuner.utils import load_adapters

    assert cli_runs["sft"].returncode == 0, cli_runs["sft"].stderr
    tokenizer = default_model[1]
    model = clara.CLaRa(clara.load_model("smollm2")[0], clara.Config())
    clara.load_trained(model, clara.read_trained(cli_runs["root"] / "s")[1])
    assert any(mx.abs(v).max().item() > 0 for k, v in tree_flatten(model.trainable_parameters()) if "lora_b" in k)
    plain = load_adapters(clara.load_model("smollm2")[0], str(cli_runs["root"] / "s"))
    ids = mx.array([tokenizer.encode("Memory tokens follow each document.", add_special_tokens=False)])
    clara.set_role(model, "generator")
    assert mx.allclose(plain(ids), model.llm(ids), atol=1e-4)


def test_cli_eval_scores_compressed_text_and_none_with_apples_metrics(cli_runs, tmp_path):
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cli_runs["records"][:2]))
    adapters = tmp_path / "s"
    shutil.copytree(cli_runs["root"] / "s", adapters)  # eval writes next to the adapters
    run = run_cli("eval", "--adapters", adapters, "--data", tmp_path / "qa.jsonl", "--max-new-tokens", 6)
    assert run.returncode == 0, run.stderr
    assert "| compressed (16 vectors / doc) |" in run.stdout and "| no documents |" in run.stdout
    results = json.loads((adapters / "eval.json").read_text())["results"]
    assert set(results) == {"compressed", "text", "none"}
    for summary in results.values():
        assert summary["records"] == 2 and 0 <= summary["f1"] <= 1 and 0 < summary["ce"] < 20
        assert summary["em"] == sum(clara.exact_match(a["prediction"], a["gold"]) for a in summary["answers"]) / 2
    assert (adapters / "eval.md").read_text().count("\n") == 5


def test_cli_ask_prints_the_answer_alone_on_stdout_and_its_messages_on_stderr(cli_runs, tmp_path):
    (tmp_path / "doc.txt").write_text("The alignment loss has a weight of 0.1 in the total loss.")
    run = run_cli("ask", "--adapters", cli_runs["root"] / "s", "--docs", tmp_path / "doc.txt", "--question",
                  "What weight?")
    assert run.returncode == 0, run.stderr
    expected = clara.load(cli_runs["root"] / "s").ask("What weight?", docs=[(tmp_path / "doc.txt").read_text()])
    assert run.stdout == expected + "\n" and run.stderr.count(" on Device(") == 1, (run.stdout, run.stderr)


def test_ask_questions_answers_each_line_of_a_file_as_json_lines_in_one_run(cli_runs, tmp_path):
    (tmp_path / "doc.txt").write_text("The alignment loss has a weight of 0.1 in the total loss.")
    (tmp_path / "questions.txt").write_text("What weight?\n\n  Which loss?  \n")
    ask = ["ask", "--adapters", cli_runs["root"] / "s", "--docs", tmp_path / "doc.txt", "--max-new-tokens", 3]
    run = run_cli(*ask, "--questions", tmp_path / "questions.txt")
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]  # stdout is JSON Lines and nothing else
    assert [a["question"] for a in lines] == ["What weight?", "Which loss?"]  # blank lines skipped, text stripped
    assert all(isinstance(a["answer"], str) for a in lines) and run.stderr.count(" on Device(") == 1  # loaded once
    (tmp_path / "blank.txt").write_text("\n \n")
    for extra, message in ((["--questions", tmp_path / "blank.txt"], "blank.txt: no questions in it"),
                           (["--questions", tmp_path / "questions.txt", "--question", "q"], "one of the two"),
                           ([], "ask needs --question TEXT or --questions FILE"),
                           (["--question", "q", "--eval-batch-size", "0"], "--eval-batch-size must be positive")):
        assert_clean_failure(run_cli(*ask, *extra), message, tmp_path)


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "data"))
    import bench

    return bench


BENCH_OPTIONS = {"doc_max_len": 32, "compression_rate": 8, "max_len": 160, "lora_rank": 4, "lora_layers": 2}


def test_bench_times_every_step_beside_mlx_lm_and_answers_batched_and_one_by_one_and_names_its_options(
        tmp_path, tiny_model_folder, tokenizer, bench):
    flags = [x for k, v in BENCH_OPTIONS.items() for x in (clara.option_flag(k), v)]
    run = subprocess.run([sys.executable, str(ROOT / "data" / "bench.py"), "--model", tiny_model_folder,
                          *map(str, flags), "--bench-steps", "1", "--questions", "6", "--eval-batch-size", "4", "--out",
                          tmp_path], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    cfg = clara.Config(model=str(tiny_model_folder), **BENCH_OPTIONS)
    tokens = [clara.make_batch(bench.bench_examples(tokenizer, cfg, name), cfg.n_mem,
                               tokenizer.pad_token_id)["n_tokens"] for name in ("compress", "compressed", "text")]
    rows = report["rows"]
    assert [r["tokens"] for r in rows] == tokens + tokens[2:]  # mlx-lm trains the text row's tokens
    assert all(r["seconds"] > 0 and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"]) for r in rows)
    assert report["text_vs_mlx_lm"] == pytest.approx(rows[2]["tokens_per_s"] / rows[3]["tokens_per_s"])
    assert report["options"] == f"--model {tiny_model_folder} " + " ".join(map(str, flags))
    assert report["options"] in (tmp_path / "bench.md").read_text() and report["matmul_gflops"] > 0
    answering = report["answering"]  # the same 6 questions in batches of 4 (4 + 2) and one by one, the same answers
    assert answering["questions"] == 6 and answering["eval_batch_size"] == 4 and answering["same_answers"]
    assert report["answers_batched_vs_single"] == pytest.approx(answering["batched_questions_per_s"]
                                                                / answering["single_questions_per_s"])


def test_bench_dp_times_one_process_against_two_on_the_same_batch_and_reports_their_ratio(tmp_path, tiny_model_folder):
    options = ["--steps", 4, "--out", tmp_path, "--clara", "--model", tiny_model_folder, "--doc-max-len", 32,
               "--compression-rate", 8]
    run = subprocess.run([sys.executable, str(ROOT / "data" / "dp_bench.py"), *map(str, options)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "bench-dp.json").read_text())
    one, two = report["rows"]
    assert (one["processes"], two["processes"]) == (1, 2) and one["tokens_per_s"] > 0 and two["tokens_per_s"] > 0
    assert report["efficiency"] == pytest.approx(two["tokens_per_s"] / (2 * one["tokens_per_s"]))
    assert report["adapters_max_abs_difference"] < 5e-4  # the same global batch trains the same adapters
    rows = [json.loads(line) for line in (tmp_path / "2" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["kind"] == "train"] == [2, 4]
    assert f"scaling efficiency {report['efficiency']:.2f}" in run.stdout


@pytest.fixture(scope="module")
def gpu_bench():
    sys.path.insert(0, str(ROOT / "data"))
    import gpu_bench

    return gpu_bench


def test_the_gpu_recipes_shapes_are_the_real_models_and_its_records_vary_in_length(tmp_path, tokenizer, gpu_bench):
    counts = {name: sum(v.size for _, v in tree_flatten(llama.Model(llama.ModelArgs.from_dict(shape)).parameters()))
              for name, shape in gpu_bench.SHAPES.items()}
    assert counts == {"smollm2-135m": 134_515_008, "llama-3.2-1b": 1_235_814_400}  # the released models' counts
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    gpu_bench.write_varlen(tmp_path / "tok", 40, tmp_path / "varlen.jsonl")
    records = [clara.parse_sft_record(json.loads(line), "varlen")
               for line in (tmp_path / "varlen.jsonl").read_text().splitlines()]
    lengths = [len(tokenizer.encode(d, add_special_tokens=False)) for r in records for d in r["docs"]]
    assert len(records) == 40 and {len(r["docs"]) for r in records} == {1, 2, 3, 4, 5}
    assert min(lengths) < 64 and max(lengths) > 512


def test_the_gpu_recipes_pieces_time_every_row_at_the_widths_training_buckets_it_to(tiny_model_folder, tokenizer,
                                                                                   gpu_bench, bench):
    sizes = {"batch_size": 2, "doc_max_len": 32, "max_len": 160}
    results = gpu_bench.time_pieces(tiny_model_folder, pad_to=64, repeats=1, **sizes)
    cfg = clara.Config(model=str(tiny_model_folder), **sizes)
    for row in ("compress", "compressed", "text"):
        batch = clara.make_batch(bench.bench_examples(tokenizer, cfg, row), cfg.n_mem, tokenizer.pad_token_id)
        widths = (clara.length_bucket(batch["doc_ids"].shape[1], 64, 32 + cfg.n_mem),
                  clara.length_bucket(batch["ids"].shape[1], 64, 160))
        assert tuple(results[row]["widths"]) == widths and results[row]["tokens"] == batch["n_tokens"]
        assert all(results[row][k] > 0 for k in ("forward", "forward_backward", "update_compile_on",
                                                 "update_compile_off"))
    assert results["compress"]["widths"][0] == 64  # 32 document tokens + 4 memory slots, in a bucket of 64


def test_the_gpu_recipes_variants_undo_one_speed_choice_each_and_put_clara_back(tiny_model_folder, tokenizer,
                                                                               gpu_bench, bench):
    saved = clara.BUCKETS_PER_OCTAVE, clara.LoRALinear.__call__, clara.masked_cross_entropy
    sizes = {"batch_size": 2, "doc_max_len": 32, "max_len": 160}
    results = gpu_bench.time_variants(tiny_model_folder, ("compress",), repeats=1, pad_to=8, **sizes)["compress"]
    assert (clara.BUCKETS_PER_OCTAVE, clara.LoRALinear.__call__, clara.masked_cross_entropy) == saved
    assert list(results) == list(gpu_bench.VARIANTS) and all(r["seconds"] > 0 for r in results.values())
    cfg = clara.Config(model=str(tiny_model_folder), pad_to=8, **sizes)
    batch = clara.make_batch(bench.bench_examples(tokenizer, cfg, "compress"), cfg.n_mem, tokenizer.pad_token_id)
    generator_row, labelled = batch["ids"].shape[1], batch["label_positions"].size  # unpadded

    def quarter(n, longest=0):  # the buckets before the eighth octaves
        bucket = clara.round_up(n, max(8, 2 ** (n.bit_length() - 3)))
        return max(n, min(bucket, clara.round_up(longest, 8))) if longest else bucket

    assert results["quarter octaves"]["widths"][1] == quarter(generator_row, 160)
    assert results["quarter octaves"]["labelled"] == quarter(labelled)
    assert results["today"]["widths"][1] == clara.length_bucket(generator_row, 8, 160)
    assert results["today"]["labelled"] < results["quarter octaves"]["labelled"]  # here 72, not 80
    assert all(results[v]["widths"] == results["today"]["widths"] for v in gpu_bench.VARIANTS[2:])


# -----------------------------------------------------------------------------
# masking and guarded divisions


@FAST
@given(st.integers(1, 3), st.integers(1, 7), st.integers(2, 6), st.data())
def test_masked_cross_entropy_is_the_mean_over_unmasked_tokens(batch, length, vocab, data):
    logits = np.array(data.draw(st.lists(st.floats(-5, 5), min_size=batch * length * vocab,
                                         max_size=batch * length * vocab)), dtype=np.float32)
    logits = logits.reshape(batch, length, vocab)
    labels = np.array(data.draw(st.lists(st.sampled_from([clara.IGNORE] + list(range(vocab))),
                                         min_size=batch * length, max_size=batch * length))).reshape(batch, length)
    loss, n_tokens = clara.masked_cross_entropy(mx.array(logits), mx.array(labels))
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = [-log_probs[b, t, labels[b, t]]
              for b in range(batch) for t in range(length) if labels[b, t] != clara.IGNORE]
    expected = float(np.mean(picked)) if picked else 0.0
    assert n_tokens.item() == len(picked)
    assert np.isfinite(loss.item()) and abs(loss.item() - expected) < 1e-4


@FAST
@given(st.integers(0, 2**31 - 1))
def test_masked_positions_contribute_nothing(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2, 6, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=(2, 6))
    labels[rng.random((2, 6)) < 0.5] = clara.IGNORE
    changed = logits.copy()
    changed[labels == clara.IGNORE] = rng.normal(size=(int((labels == clara.IGNORE).sum()), 5)) * 100
    a, _ = clara.masked_cross_entropy(mx.array(logits), mx.array(labels))
    b, _ = clara.masked_cross_entropy(mx.array(changed), mx.array(labels))
    assert a.item() == b.item()


def test_all_masked_cross_entropy_is_zero_not_nan():
    loss, n_tokens = clara.masked_cross_entropy(mx.ones((2, 3, 4)), mx.full((2, 3), clara.IGNORE))
    assert loss.item() == 0.0 and n_tokens.item() == 0


@FAST
@given(st.integers(0, 3), st.integers(0, 3), st.integers(0, 5), st.integers(0, 2**31 - 1))
def test_alignment_mse_is_finite_and_zero_when_a_side_is_empty(n_docs, n_mem, doc_len, seed):
    rng = np.random.default_rng(seed)
    memory = rng.normal(size=(n_docs, n_mem, 4)).astype(np.float32)
    states = rng.normal(size=(n_docs, doc_len, 4)).astype(np.float32)
    mask = rng.random((n_docs, doc_len)) < 0.6
    mse = clara.alignment_mse(mx.array(memory), mx.array(states), mx.array(mask)).item()
    rows = [((memory[d].mean(0) - states[d][mask[d]].mean(0)) ** 2).mean()
            for d in range(n_docs) if n_mem > 0 and mask[d].any()]
    assert np.isfinite(mse)
    assert abs(mse - (float(np.mean(rows)) if rows else 0.0)) < 1e-5


# -----------------------------------------------------------------------------
# stage 3: the differentiable top-k, the query reasoner, end-to-end training


def distinct_rows(batch, n):
    return st.lists(st.lists(st.floats(-30, 30, width=32), min_size=n, max_size=n, unique=True),
                    min_size=batch, max_size=batch)


@FAST
@given(st.integers(1, 3), st.integers(1, 8), st.data())
def test_top_k_forward_is_exactly_the_hard_selection_and_never_repeats_a_candidate(batch, n, data):
    k = data.draw(st.integers(1, n))
    logits = np.array(data.draw(distinct_rows(batch, n)), dtype=np.float32)
    selection = np.array(clara.differentiable_top_k(mx.array(logits), k))  # (B, k, N)
    expected = np.eye(n, dtype=np.float32)[np.argsort(-logits, axis=-1)[:, :k]]  # one-hots, best first
    assert np.array_equal(selection, expected)
    assert (selection.sum(axis=1) <= 1).all()  # no candidate chosen twice
    if k == n:
        assert (selection.sum(axis=1) == 1).all()  # k = N: a permutation


def test_top_k_gradient_reaches_the_scores_and_padding_is_never_chosen():
    scores = mx.array([[0.9, 0.2, 0.5, -0.3, 0.95]])  # (1, 5); the last one is padding, with the best raw score
    mask = mx.array([[True, True, True, True, False]])
    values = mx.array([1.0, 2.0, 3.0, 4.0, 5.0])

    def picked(scores):
        logits = mx.where(mask, scores / 0.02, -1e9)
        return (clara.differentiable_top_k(logits, 3) @ values).sum()  # sum of the chosen values, rank-weighted

    selection = clara.differentiable_top_k(mx.where(mask, scores / 0.02, -1e9), 3)
    assert selection[0, :, 4].sum().item() == 0  # padding never chosen
    assert selection.argmax(axis=-1).tolist() == [[0, 2, 1]]
    grad = mx.grad(picked)(scores)
    assert np.isfinite(np.array(grad)).all() and mx.abs(grad[0, :4]).max().item() > 0
    assert grad[0, 4].item() == 0


def randomize_adapters(model, role, seed):
    """Give one role non-zero B matrices, so that it differs from the base and from the other roles."""
    mx.random.seed(seed)
    for _, module in model.named_modules():
        if isinstance(module, clara.LoRALinear):
            module.adapters[role].lora_b = 0.5 * mx.random.normal(module.adapters[role].lora_b.shape)


def test_query_reasoner_starts_as_the_compressor_so_a_document_retrieves_itself(tokenizer):
    cfg = tiny_config()
    stage2 = tiny_clara(cfg)
    randomize_adapters(stage2, "compressor", seed=1)
    saved = clara.adapter_arrays(stage2)  # what an sft run writes: no query reasoner
    assert not any(".adapters.query." in name for name in saved)
    model = tiny_clara(cfg, seed=7)
    clara.load_trained(model, saved)
    docs = ["Memory tokens follow every document.", "The generator reads compressed vectors.", "Cats purr."]
    bank = clara.compress_corpus(model, tokenizer, cfg, docs)  # (3, n_mem, H)
    for i, doc in enumerate(docs):
        query = clara.encode_question(model, tokenizer, cfg, doc)
        scores = clara.cosine_scores(query[None], bank.reshape(1, 3, -1))[0]
        assert scores[i].item() == pytest.approx(1.0, abs=1e-5) and scores.argmax().item() == i


E2E_RECORDS = [
    {"question": "What colour is the sky?", "docs": ["Grass is green.", "The sky is blue on a clear day.",
                                                     "Cats purr."], "answer": "blue", "positives": [1]},
    {"question": "How many legs has a spider?", "docs": ["Cats purr.", "A spider has eight legs.", "Snow is cold.",
                                                         "Grass is green."], "answer": "eight", "positives": [1]},
]


def test_e2e_trains_only_the_generator_and_the_query_reasoner_and_lowers_the_loss(tokenizer):
    cfg = tiny_config(top_k=2, steps=8)
    model = tiny_clara(cfg)
    randomize_adapters(model, "compressor", seed=1)
    clara.train_only(model, ("generator", "query"), memory=False)
    texts = sorted({d for r in E2E_RECORDS for d in r["docs"]})
    bank = clara.compress_corpus(model, tokenizer, cfg, texts)
    examples = clara.e2e_examples(tokenizer, cfg, E2E_RECORDS, bank, {t: i for i, t in enumerate(texts)})
    before = {name: np.array(v) for name, v in tree_flatten(model.parameters())}
    history = clara.train(model, examples, cfg, tokenizer.pad_token_id)
    changed = {name for name, v in tree_flatten(model.parameters()) if not np.array_equal(np.array(v), before[name])}
    assert {clara.adapter_role(name) for name in changed} == {"generator", "query"}  # base, memory, compressor fixed
    assert history[-1]["ce"] < history[0]["ce"] and history[0]["mse"] == 0.0  # no MSE in stage 3
    assert any(".adapters.query." in name for name in clara.adapter_arrays(model))  # now saved with the run


def test_documents_that_lose_memory_slots_to_max_len_are_counted_and_a_record_with_none_is_left_out(tokenizer,
                                                                                                     capsys):
    full = clara.sft_examples(tokenizer, tiny_config(), SFT_RECORDS)[0]
    assert full["docs_dropped"] == 0 and full["n_slot_docs"] == 2
    seen = set()
    for max_len in range(8, len(full["ids"]) + 1):
        cfg = tiny_config(max_len=max_len)
        ex = clara.sft_examples(tokenizer, cfg, SFT_RECORDS[:1])[0]
        whole = [d for d in range(2) if all(d * cfg.n_mem + j in ex["slots"] for j in range(cfg.n_mem))]
        assert ex["docs_dropped"] == 2 - len(whole) and whole == list(range(2 - len(whole), 2))  # first ones go first
        assert clara.keeps_memory(ex) == (ex["docs_dropped"] < 2)
        seen.add(ex["docs_dropped"])
        clara.report_cuts(cfg, [ex, full])
        err = capsys.readouterr().err
        assert (f"warning: {ex['docs_dropped']} of 4 document(s) lost memory slots: their prompt did not fit --max-len "
                f"{max_len}" in err) == (ex["docs_dropped"] > 0)
        assert ("warning: 1 of 2 record(s) kept none of their documents' memory slots and are left out" in err) == \
            (ex["docs_dropped"] == 2)
    assert seen == {0, 1, 2}


def test_contrastive_retrieval_loss_is_the_log_softmax_mass_of_the_marked_candidates():
    logits = mx.array([[2.0, 1.0, 0.0, -1e9], [0.0, 3.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0]])  # (3, 4), one padded
    marked = mx.array([[True, False, False, False], [False, True, False, True], [False, False, False, False]])
    loss, n = clara.contrastive_retrieval_loss(logits, marked)
    rows = np.array(logits)
    expected = [np.log(np.exp(rows[0]).sum()) - 2.0, np.log(np.exp(rows[1]).sum()) - np.log(np.exp(3) + np.exp(2))]
    assert n.item() == 2 and loss.item() == pytest.approx(np.mean(expected), rel=1e-5)  # row 3: no mark, left out
    assert clara.contrastive_retrieval_loss(logits, mx.zeros((3, 4), dtype=mx.bool_))[0].item() == 0.0  # never NaN


@FAST
@given(st.integers(1, 4), st.integers(1, 6), st.randoms(use_true_random=False))
def test_contrastive_retrieval_gradient_is_finite_and_zero_on_questions_without_marks(n_batch, n_candidates, rng):
    logits = mx.array([[rng.uniform(-50, 50) for _ in range(n_candidates)] for _ in range(n_batch)])  # (B, N)
    marked = mx.array([[rng.random() < 0.4 for _ in range(n_candidates)] for _ in range(n_batch)])  # some rows none
    grad = np.array(mx.grad(lambda x: clara.contrastive_retrieval_loss(x, marked)[0])(logits))
    rows, mask = np.array(logits, dtype=np.float64), np.array(marked)
    n_valid = max(mask.any(axis=1).sum(), 1)
    for b in range(n_batch):  # d(-log softmax mass)/d logits = softmax - softmax over the marked, per valid row
        if not mask[b].any():
            assert np.all(grad[b] == 0.0)
            continue
        softmax = np.exp(rows[b] - rows[b].max()) / np.exp(rows[b] - rows[b].max()).sum()
        marked_softmax = np.where(mask[b], np.exp(rows[b] - rows[b][mask[b]].max()), 0.0)
        expected = (softmax - marked_softmax / marked_softmax.sum()) / n_valid
        np.testing.assert_allclose(grad[b], expected, atol=1e-5)


def test_contrastive_stage3_trains_the_query_reasoner_alone_on_mixed_batches_and_lowers_its_loss(tokenizer):
    cfg = tiny_config(top_k=2, steps=8, retrieval_loss="contrastive")
    model = tiny_clara(cfg)
    randomize_adapters(model, "compressor", seed=1)
    clara.train_only(model, clara.STAGE3_ROLES["contrastive"], memory=False)
    records = E2E_RECORDS + [{**E2E_RECORDS[0], "question": "Which colour?", "positives": []}]  # one without marks
    texts = sorted({d for r in records for d in r["docs"]})
    bank = clara.compress_corpus(model, tokenizer, cfg, texts)
    examples = clara.e2e_examples(tokenizer, cfg, records, bank, {t: i for i, t in enumerate(texts)})
    before = snapshot(model)
    history = clara.train(model, examples, cfg, tokenizer.pad_token_id)  # batches of 2 out of 3: mixed ones too
    assert changed_roles(model, before) == {"query"}  # no generator in this loss: it stays as it was
    assert all(math.isfinite(row["grad_norm"]) for row in history)
    assert history[-1]["loss"] < history[0]["loss"]


# -----------------------------------------------------------------------------
# training on a tiny model


def mean_loss(model, examples, cfg, pad_id):
    batch = clara.make_batch(examples, cfg.n_mem, pad_id)
    return clara.clara_loss(model, batch, cfg)[0].item()


@pytest.mark.parametrize("stage", ["compress", "sft"])
def test_a_few_steps_on_a_tiny_model_lower_the_loss(tokenizer, stage, capsys):
    cfg = tiny_config()
    model = tiny_clara(cfg)
    if stage == "compress":
        docs = ["Memory tokens follow every document.", "The generator reads compressed vectors."]
        records = [{"kind": "reconstruct", "doc": d, "target": d} for d in docs]
        examples = clara.compress_examples(tokenizer, cfg, records)
    else:
        examples = clara.sft_examples(tokenizer, cfg, SFT_RECORDS)
    before = mean_loss(model, examples, cfg, tokenizer.pad_token_id)
    history = clara.train(model, examples, cfg, tokenizer.pad_token_id)
    after = mean_loss(model, examples, cfg, tokenizer.pad_token_id)
    assert after < before - 1.0  # a random tiny base starts near ln(49152) = 10.8 nats
    assert len(history) == cfg.steps and all(np.isfinite(h["loss"]) for h in history)
    assert f"step {cfg.steps}/{cfg.steps} | loss" in capsys.readouterr().out


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_the_compiled_step_trains_exactly_like_the_eager_one(tokenizer, grad_accum):
    runs = []
    for compiled in ("off", "on"):
        cfg = tiny_config(steps=4, compile=compiled, grad_accum=grad_accum)
        model = tiny_clara(cfg)
        history = clara.train(model, clara.sft_examples(tokenizer, cfg, SFT_RECORDS), cfg, tokenizer.pad_token_id)
        runs.append(([h["loss"] for h in history], tree_flatten(model.trainable_parameters())))
        # every batch holds both records: one shape, traced once per place in the update (first, middle, last)
        assert model.traces == (min(grad_accum, 3) if compiled == "on" else 0)
    assert runs[0][0] == runs[1][0]
    assert all(mx.array_equal(a, b) for (_, a), (_, b) in zip(runs[0][1], runs[1][1]))


def test_on_a_bfloat16_base_the_adapters_stay_float32_and_keep_updates_below_bfloat16_resolution(tokenizer):
    cfg = tiny_config(steps=2, lr=1e-6, min_lr=1e-6, warmup=0.0)  # A moves from step 2 on (B = 0 at the start)
    mx.random.seed(0)
    llm = llama.Model(llama.ModelArgs(**TINY_ARGS))
    clara.convert_base(llm, mx.bfloat16)  # the frozen base as a GPU runs it, as load_model converts it
    model = clara.CLaRa(llm, cfg)
    before = {k: mx.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    clara.train(model, clara.sft_examples(tokenizer, cfg, SFT_RECORDS), cfg, tokenizer.pad_token_id)
    after = dict(tree_flatten(model.trainable_parameters()))
    lora_a = [k for k in after if k.endswith("generator.lora_a")]
    assert lora_a and all(after[k].dtype == mx.float32 for k in after)
    for k in lora_a:  # Adam moves each weight by about lr = 1e-6, far below bfloat16's spacing near |A| ~ 0.06
        change = after[k] - before[k]
        assert 0 < mx.abs(change).max().item() < 1e-5
        in_bfloat16 = before[k].astype(mx.bfloat16)
        assert mx.mean(in_bfloat16 + change.astype(mx.bfloat16) == in_bfloat16).item() > 0.9  # bf16 would lose it


VARIED_RECORDS = [{**SFT_RECORDS[i % 2], "question": "Why? " * i + SFT_RECORDS[i % 2]["question"]} for i in range(8)]


def notes(out):
    """The notes a run left in its metrics.jsonl (what --compile decided), which a normal run does not print."""
    return [row["note"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if row["kind"] == "note"]


def test_compile_auto_runs_eagerly_from_the_start_when_the_first_updates_show_more_than_four_shapes(tokenizer, capsys,
                                                                                                   tmp_path):
    cfg = tiny_config(steps=8, batch_size=1, pad_to=1, compile="auto")  # every record its own length
    model = tiny_clara(cfg)
    clara.train(model, clara.sft_examples(tokenizer, cfg, VARIED_RECORDS), cfg, tokenizer.pad_token_id,
                clara.RunFiles(tmp_path / "a"))
    assert model.traces == 0  # no shape compiled in vain
    assert notes(tmp_path / "a") == ["--compile auto: the batches of the first 8 updates come in 8 shapes, so the "
                                     "step runs eagerly (each new shape costs a trace and kernel compilations; "
                                     "--compile on compiles anyway)"]
    fixed = tiny_config(steps=8, compile="auto")  # every batch holds both records: one shape, compiled
    model = tiny_clara(fixed)
    clara.train(model, clara.sft_examples(tokenizer, fixed, SFT_RECORDS), fixed, tokenizer.pad_token_id,
                clara.RunFiles(tmp_path / "b"))
    assert model.traces == 1 and notes(tmp_path / "b") == ["--compile: the step was traced 1 time(s), once per batch "
                                                           "shape (--pad-to)"]
    captured = capsys.readouterr()
    assert "--compile" not in captured.err + captured.out  # a normal run keeps these notes off the screen
    clara.train(tiny_clara(fixed), clara.sft_examples(tokenizer, fixed, SFT_RECORDS), replace(fixed, compile="on"),
                tokenizer.pad_token_id)
    assert "--compile: the step was traced 1 time(s)" in capsys.readouterr().out  # asked for, it is shown


def test_compile_auto_turns_eager_after_the_fifth_batch_shape_and_trains_bitwise_the_same(tokenizer, tmp_path,
                                                                                           monkeypatch):
    monkeypatch.setattr(clara, "AUTO_LOOKAHEAD_UPDATES", 1)  # the first update alone: one shape, so compiled
    runs = []
    for compiled in ("off", "auto"):
        cfg = tiny_config(steps=8, batch_size=1, pad_to=1, compile=compiled)  # every record its own length
        model = tiny_clara(cfg)
        clara.train(model, clara.sft_examples(tokenizer, cfg, VARIED_RECORDS), cfg, tokenizer.pad_token_id,
                    clara.RunFiles(tmp_path / compiled))
        runs.append((model.traces, tree_flatten(model.trainable_parameters())))
    assert runs[0][0] == 0 and runs[1][0] == clara.AUTO_COMPILE_SHAPES + 1  # then no trace more
    warning = "--compile auto: the data has shown 5 batch shapes, so the rest of the run is eager"
    assert any(note.startswith(warning) for note in notes(tmp_path / "auto")) and not notes(tmp_path / "off")
    assert all(mx.array_equal(a, b) for (_, a), (_, b) in zip(runs[0][1], runs[1][1]))


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tokenizer):
    cfg = tiny_config()
    batch = clara.make_batch(clara.sft_examples(tokenizer, cfg, SFT_RECORDS), cfg.n_mem, tokenizer.pad_token_id)
    results = []
    for checkpointed in (False, True):
        model = tiny_clara(cfg)
        if checkpointed:
            clara.recompute_blocks_in_backward(model.llm)
        (loss, *_), grads = nn.value_and_grad(model, clara.clara_loss)(model, batch, cfg)
        results.append((loss, dict(tree_flatten(grads))))
    assert type(model.llm.layers[0]).__name__ == "CheckpointedTransformerBlock"
    assert abs(results[0][0].item() - results[1][0].item()) < 1e-6
    assert all(mx.allclose(results[0][1][k], results[1][1][k], atol=1e-6) for k in results[0][1])
    assert any(mx.abs(g).max().item() > 0 for g in results[0][1].values())


def test_a_memory_limit_caps_mlx_memory_and_its_buffer_cache_for_runs_that_share_a_card(tiny_model_folder):
    original_memory, original_cache = mx.set_memory_limit(2**40), mx.set_cache_limit(2**40)  # read, then put back
    try:
        clara.load_clara(tiny_config(model=str(tiny_model_folder), memory_limit=1.5))
        assert mx.set_memory_limit(original_memory) == 3 * 2**29 and mx.set_cache_limit(original_cache) == 3 * 2**25
        mx.set_memory_limit(2**40), mx.set_cache_limit(2**40)
        clara.load_clara(tiny_config(model=str(tiny_model_folder)))  # 0: MLX's own limits stay as they are
        assert mx.set_memory_limit(original_memory) == 2**40 and mx.set_cache_limit(original_cache) == 2**40
    finally:
        mx.set_memory_limit(original_memory), mx.set_cache_limit(original_cache)
    with pytest.raises(clara.InputError, match="--memory-limit must be a finite number of at least 0"):
        clara.validate_config(tiny_config(memory_limit=-1.0))


def test_text_context_compresses_nothing_and_its_mse_is_zero(tokenizer):
    cfg = tiny_config(context="text", max_len=400)
    model = tiny_clara(cfg)
    examples = clara.sft_examples(tokenizer, cfg, SFT_RECORDS)
    batch = clara.make_batch(examples, cfg.n_mem, tokenizer.pad_token_id)
    loss, ce, mse, _ = clara.clara_loss(model, batch, cfg)
    assert batch["doc_ids"].shape[0] == 0 and mse.item() == 0.0 and loss.item() == ce.item()
    assert "blue on a clear day" in tokenizer.decode(examples[0]["ids"])


# -----------------------------------------------------------------------------
# schedule, data order, and what a non-finite update does


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = clara.Config(steps=100, lr=1e-3, min_lr=1e-5, warmup=0.1)
    schedule = clara.lr_schedule(cfg)
    values = [schedule(mx.array(step)).item() for step in range(0, 101)]
    assert values[0] < values[5] < values[10] == pytest.approx(1e-3)  # warmup: 10 updates
    assert all(a >= b for a, b in zip(values[10:], values[11:]))  # then never rising
    assert values[55] == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-3)  # cosine: halfway at half the decay
    assert values[100] == pytest.approx(1e-5)


def test_the_first_update_moves_every_trained_weight_by_the_whole_learning_rate_as_bias_corrected_adam(tokenizer):
    cfg = tiny_config(steps=1, warmup=0.0, clip_norm=0.0, lr=1e-3)
    model = tiny_clara(cfg)
    before = snapshot(model)
    clara.train(model, clara.sft_examples(tokenizer, cfg, SFT_RECORDS), cfg, tokenizer.pad_token_id)
    moved = np.concatenate([np.abs(np.array(v) - before[name]).ravel()
                            for name, v in tree_flatten(model.trainable_parameters())])
    moved = moved[moved > 0]  # A matrices get no gradient while B = 0
    assert moved.size > 1000 and moved.max() < 1.001 * cfg.lr
    assert np.median(moved) == pytest.approx(cfg.lr, rel=1e-2)  # Adam without bias correction: 0.45 x lr


@FAST
@given(st.integers(1, 9), st.integers(1, 4), st.integers(0, 50), st.integers(0, 3))
def test_data_order_is_a_pure_function_of_seed_and_position_and_each_epoch_a_permutation(n, batch, position, seed):
    picked = clara.batch_indices(n, batch, seed, position)
    assert picked == clara.batch_indices(n, batch, seed, position)
    stream = [clara.batch_indices(n, 1, seed, i)[0] for i in range(3 * n)]
    assert picked == stream[position: position + batch] or position + batch > 3 * n
    for epoch in range(3):
        assert sorted(stream[epoch * n: (epoch + 1) * n]) == list(range(n))


def test_a_non_finite_loss_stops_before_the_update_and_names_the_step(tokenizer):
    cfg = tiny_config(steps=3)
    model = tiny_clara(cfg)
    model.memory = model.memory * float("nan")
    before = dict(tree_flatten(model.trainable_parameters()))
    with pytest.raises(clara.TrainingStopped, match="step 1: loss nan .* nothing was saved; run again with a lower"):
        clara.train(model, clara.sft_examples(tokenizer, cfg, SFT_RECORDS), cfg, tokenizer.pad_token_id)
    after = dict(tree_flatten(model.trainable_parameters()))
    assert all(mx.array_equal(before[k], after[k], equal_nan=True) for k in before)


@pytest.mark.parametrize("compiled", ["off", "on"])
def test_a_non_finite_update_never_reaches_the_weights_even_when_read_back_later(tokenizer, compiled):
    cfg = tiny_config(steps=4, lr=1e30, warmup=0.0, log_every=10, compile=compiled)  # step 1 blows the weights up
    examples = clara.sft_examples(tokenizer, cfg, SFT_RECORDS)
    one_step = tiny_clara(cfg)
    clara.train(one_step, examples, replace(cfg, steps=1), tokenizer.pad_token_id)
    model = tiny_clara(cfg)
    with pytest.raises(clara.TrainingStopped, match="step 2: loss .* is not finite"):
        clara.train(model, examples, cfg, tokenizer.pad_token_id)  # read back only at step 4: steps 2-4 ran
    expected = dict(tree_flatten(one_step.trainable_parameters()))
    assert all(mx.array_equal(v, expected[k]).item() for k, v in tree_flatten(model.trainable_parameters()))


# -----------------------------------------------------------------------------
# data parallel: N processes, each on its part of every batch (MLX's ring backend, here on one machine)

# unequal parts: answers of 1 to 12 tokens, one to three documents (the CE's and the MSE's divisors differ)
UNEVEN_DOCS = ["Short.", "A longer document about sixteen vectors."]
UNEVEN_RECORDS = [{"question": f"Question {i}?", "docs": UNEVEN_DOCS[: 1 + i % 2] + ["Third."] * (i % 3 == 0),
                   "answer": " ".join(["word"] * (1 + i + 6 * (i > 2)))} for i in range(6)]


@pytest.mark.parametrize("n_processes", [2, 3])
def test_the_mean_of_the_parts_scaled_losses_and_gradients_is_the_whole_batchs(tokenizer, n_processes):
    cfg = tiny_config(batch_size=6)
    model = tiny_clara(cfg)
    examples = clara.sft_examples(tokenizer, cfg, UNEVEN_RECORDS)
    clara.train(model, examples[::2], replace(cfg, batch_size=3, steps=30), tokenizer.pad_token_id)  # unequal parts
    (whole, *_), whole_grads = nn.value_and_grad(model, clara.clara_loss)(
        model, clara.training_batch(examples, cfg, tokenizer.pad_token_id), cfg)
    scaled, plain = [], []
    for rank in range(n_processes):
        part = examples[rank::n_processes]
        batch = clara.training_batch(part, cfg, tokenizer.pad_token_id)
        plain.append(clara.clara_loss(model, batch, cfg)[0])
        batch["loss_scales"] = clara.loss_scales(examples, part, n_processes, cfg)
        scaled.append(nn.value_and_grad(model, clara.scaled_loss)(model, batch, cfg))
    mean = lambda values: sum(values) / n_processes  # noqa: E731
    assert mean(loss for (loss, *_), _ in scaled).item() == pytest.approx(whole.item(), rel=1e-5)
    assert mean(plain).item() != pytest.approx(whole.item(), rel=1e-3)  # a plain mean over the parts is not
    for name, grad in tree_flatten(whole_grads):
        parts = mean(dict(tree_flatten(grads))[name] for _, grads in scaled)
        assert mx.linalg.norm(parts - grad).item() <= 1e-4 * mx.linalg.norm(grad).item() + 1e-9, name


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_processes(tmp_path, args, cwds):
    """One process per working folder, started as `mlx.launch --backend ring` starts them (MLX_RANK, MLX_HOSTFILE),
    so that each can be given its own folder and signal."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(len(cwds))]))
    return [subprocess.Popen([sys.executable, str(ROOT / "clara.py"), *map(str, args)], cwd=cwd, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile),
                                  "PYTHONUNBUFFERED": "1"})
            for rank, cwd in enumerate(cwds)]


def dp_args(tiny_model_folder, steps):
    return ["sft", "--data", ROOT / "data" / "sft.jsonl", "--model", tiny_model_folder, "--doc-max-len", 32,
            "--compression-rate", 8, "--batch-size", 4, "--lr", 1e-2, "--steps", steps, "--eval-every", 1000]


def assert_same_adapters(a, b, atol=2e-3):
    """To float tolerance: the processes pad their parts to other lengths and sum in another order, and Adam moves an
    entry whose gradient is near zero by up to lr whatever its size (seen after 4 steps at lr 1e-2: 3e-5 apart on one
    machine, 6.2e-4 on an AMD EPYC; averaging the parts' plain means instead: 4e-2)."""
    a, b = clara.read_trained(a)[1], clara.read_trained(b)[1]
    assert a.keys() == b.keys() and all(mx.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_model_folder):
    folder = tmp_path_factory.mktemp("one-process") / "run"
    run = run_cli(*dp_args(tiny_model_folder, 12), "--out", folder)
    assert run.returncode == 0, run.stderr
    return folder


def test_mlx_launch_over_two_processes_trains_the_adapters_of_one_process_at_the_same_global_batch(
        tmp_path, tiny_model_folder, one_process_run):
    launch = [Path(sys.executable).parent / "mlx.launch", "-n", 2, "--backend", "ring", "--python", sys.executable]
    run = subprocess.run([*map(str, launch), str(ROOT / "clara.py"),
                          *map(str, dp_args(tiny_model_folder, 12) + ["--out", tmp_path / "run"])],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0 and "Node with rank" not in run.stderr, run.stderr
    assert run.stdout.count("step 12/12 | loss") == 1 and run.stdout.count(" on Device(") == 1  # one reports
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if row["kind"] == "train"] == list(range(1, 13))  # one writes
    alone = [json.loads(line) for line in (one_process_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["trained_tokens"] for r in logged if r["kind"] == "train"] == \
        [r["trained_tokens"] for r in alone if r["kind"] == "train"]  # the whole batch's tokens, counted once
    assert_same_adapters(tmp_path / "run", one_process_run)


def two_processes_past_step_2(tmp_path, tiny_model_folder, steps, act):
    """Two processes of one run, each in a folder of its own (--out run in each); act(processes) as soon as the
    first one reports step 2. -> (processes, their folders)"""
    cwds = [tmp_path / "first", tmp_path / "second"]
    for cwd in cwds:
        cwd.mkdir()
    processes = start_processes(tmp_path, dp_args(tiny_model_folder, steps) + ["--out", "run"], cwds)
    for line in processes[0].stdout:
        if line.startswith(f"step 2/{steps} | loss"):
            act(processes)
            break
    return processes, cwds


def test_a_signal_to_one_process_stops_both_after_the_same_step_one_checkpoint_and_one_process_resumes(
        tmp_path, tiny_model_folder, one_process_run):
    processes, cwds = two_processes_past_step_2(tmp_path, tiny_model_folder, 12,
                                                lambda both: both[1].send_signal(signal.SIGTERM))  # the second only
    (_, first_err), (_, second_err) = (p.communicate(timeout=120) for p in processes)
    assert [p.returncode for p in processes] == [143, 143], first_err + second_err
    assert "stopped by SIGTERM after step" in first_err and not second_err.strip()
    assert not (cwds[1] / "run").exists()  # only the first process writes
    step = int(clara.read_checkpoint(cwds[0] / "run" / clara.CHECKPOINT)[1]["step"])
    assert 2 <= step < 12
    resume = run_cli(*dp_args(tiny_model_folder, 12), "--resume", cwds[0] / "run")  # one process continues the two's
    assert resume.returncode == 0, resume.stderr
    assert f"step {step + 1}/12 | loss" in resume.stdout and "step 1/12 | loss" not in resume.stdout
    assert_same_adapters(cwds[0] / "run", one_process_run)


def test_a_process_that_dies_ends_the_run_with_one_line_not_a_hang(tmp_path, tiny_model_folder):
    processes, _ = two_processes_past_step_2(tmp_path, tiny_model_folder, 500, lambda both: both[1].kill())
    _, stderr = processes[0].communicate(timeout=120)
    processes[1].wait()
    assert processes[0].returncode == 1 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: a process of this 2-process run ended or cannot be "
                                                      "reached"), stderr
    assert "--resume" in stderr


@pytest.mark.parametrize("args, message", [
    (["--batch-size", 3], "--batch-size 3 (the batch of all processes together) does not split over 2 processes"),
    (["ask"], "ask runs in one process; mlx.launch (data-parallel training) is for compress, sft, e2e")])
def test_data_parallel_refuses_an_uneven_batch_and_commands_of_one_process_in_one_line(
        tmp_path, tiny_model_folder, args, message):
    args = ["ask", "--adapters", tmp_path, "--question", "q"] if args == ["ask"] else \
        dp_args(tiny_model_folder, 2) + args + ["--out", tmp_path / "out"]
    processes = start_processes(tmp_path, args, [tmp_path, tmp_path])
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 2 and stderr.count("\n") == 1 and message in stderr, stderr
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# the default model and the command line


def test_batched_answers_equal_one_by_one_answers_from_memory_text_retrieval_and_no_documents(tokenizer):
    """Records of mixed lengths answered 4 at a time (left-padded prompts, their documents compressed together) and
    one at a time: the same greedy answers in every context, the same CE up to float summation order."""
    cfg = tiny_config(top_k=2)
    model = tiny_clara(cfg)
    for seed, role in enumerate(clara.ROLES):
        randomize_adapters(model, role, seed)
    docs = ["The sky is blue on a clear day.", "Grass is green.", "A spider has eight legs and spins silk in the "
            "corners of old barns, where it waits for flies.", "Cats purr.", "Rivers run to the sea."]
    records = [{"question": q, "docs": [docs[i] for i in d], "gold": g, "positives": p} for q, d, g, p in [
        ("What colour is the sky?", [0, 1, 3], "blue", [0]), ("How many legs has a spider, in words?", [2, 3], "eight",
         [0]), ("Purr?", [3, 4, 1], "cats", [0]), ("Where do rivers run to, as the documents say it?", [4], "sea",
         [0]), ("Green?", [1, 0], "grass", [1])]]
    scores = {}
    for batch_size in (1, 4):
        scores[batch_size] = {**clara.evaluate(model, tokenizer, cfg, records, 8, batch_size=batch_size),
                              **clara.evaluate_retrieval(model, tokenizer, cfg, records, 8, ("retrieved", "oracle"),
                                                         batch_size)}
    for context in ("compressed", "text", "none", "retrieved", "oracle"):
        one, batched = (scores[size][context]["answers"] for size in (1, 4))
        assert [a["prediction"] for a in batched] == [a["prediction"] for a in one], context
        assert [a["ce"] for a in batched] == pytest.approx([a["ce"] for a in one], rel=1e-5)
    assert len({a["prediction"] for s in scores[4].values() if "answers" in s for a in s["answers"]}) > 3


def test_the_shipped_adapters_answer_a_real_set_the_same_batched_as_one_by_one():
    """The shipped adapters on SmolLM2, data/sft.jsonl's held-out records: equal tokens, answers that end at their
    own end-of-sequence token, from memory and from document text."""
    reader = clara.load(ROOT / "data" / "adapters" / "facts")
    records = [r for split, r in clara.read_records(ROOT / "data" / "sft.jsonl", clara.parse_e2e_record)
               if split == "eval"][:6]
    one, batched = (reader.evaluate(records, ["compressed", "text"], 12, size) for size in (1, 6))
    for context in ("compressed", "text"):
        predictions = [a["prediction"] for a in batched[context]["answers"]]
        assert predictions == [a["prediction"] for a in one[context]["answers"]], context
        assert len({len(p.split()) for p in predictions}) > 1  # rows of different lengths stopped on their own
        assert batched[context]["ce"] == pytest.approx(one[context]["ce"], rel=1e-5)


def test_default_model_answers_the_paris_prompt(default_model):
    llm, tokenizer = default_model
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer = tokenizer.decode(clara.greedy_generate(llm, mx.array([ids]), tokenizer.eos_token_id, 16)[0][0])
    assert answer.strip() == "The capital of France is Paris."
    assert llm.model.embed_tokens.weight.dtype == mx.float32  # dequantized for the CPU


def test_default_model_answers_prompts_of_mixed_lengths_the_same_batched_as_one_by_one(default_model):
    llm, tokenizer = default_model
    questions = ["What is the capital of France?", "Name a colour.", "In one short sentence, what does a library "
                 "lend to the people of the town it serves, and for how long?"]
    rows = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                           add_generation_prompt=True), add_special_tokens=False)
            for q in questions]
    ids, left_padding = clara.left_padded(rows, tokenizer.pad_token_id)
    batched = clara.greedy_generate(llm, ids, tokenizer.eos_token_id, 16, clara.token_embeddings(llm, ids),
                                    left_padding)[0]
    assert batched == [clara.greedy_generate(llm, mx.array([r]), tokenizer.eos_token_id, 16)[0][0] for r in rows]
    assert len({len(tokens) for tokens in batched}) > 1 and min(map(len, batched)) < 16  # each ended on its own


def save_tiny_mlx_lm_folder(folder, tokenizer, seed=3):
    """A tiny llama saved the way mlx-lm expects a model folder: config.json, weights, tokenizer files."""
    mx.random.seed(seed)
    base = llama.Model(llama.ModelArgs(**TINY_ARGS))
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(base.parameters())))
    (folder / "config.json").write_text(json.dumps(TINY_ARGS))
    tokenizer.save_pretrained(str(folder))
    return base


def test_any_mlx_lm_model_folder_loads_offline_with_its_tokenizer(tmp_path, tokenizer):
    base = save_tiny_mlx_lm_folder(tmp_path, tokenizer)
    llm, loaded_tokenizer = clara.load_model(str(tmp_path))
    ids = mx.array([tokenizer.encode("Memory follows the document.", add_special_tokens=False)])
    assert mx.allclose(llm(ids), base(ids), atol=1e-5)
    assert loaded_tokenizer.encode("Memory 42") == tokenizer.encode("Memory 42", add_special_tokens=False)
    with pytest.raises(clara.InputError, match="no such model folder"):
        clara.load_model(str(tmp_path / "missing"))


@pytest.mark.parametrize("lora", [{}, {"lora_keys": ("all",), "lora_layers": -1, "lora_dropout": 0.1}])
def test_saved_generator_adapter_loads_with_mlx_lm_load(tmp_path, tokenizer, lora):
    from mlx_lm import load

    save_tiny_mlx_lm_folder(tmp_path / "model", tokenizer)
    cfg = tiny_config(model=str(tmp_path / "model"), steps=3, out=str(tmp_path / "run"), **lora)
    llm, _ = clara.load_model(cfg.model)
    model = clara.CLaRa(llm, cfg)
    examples = clara.sft_examples(tokenizer, cfg, SFT_RECORDS)
    clara.train(model, examples, cfg, tokenizer.pad_token_id, clara.RunFiles(cfg.out))
    adapter_config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert adapter_config["fine_tune_type"] == "lora" and adapter_config["num_layers"] == cfg.lora_layers
    all_linear = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.down_proj", "mlp.up_proj"]
    keys = all_linear if lora else list(cfg.lora_keys)
    assert sorted(adapter_config["lora_parameters"]["keys"]) == sorted(keys)
    wrapped = [name for name, m in model.named_modules() if isinstance(m, clara.LoRALinear)]
    assert len(wrapped) == len(keys) * (2 if lora else cfg.lora_layers)  # every block of the tiny model has 2
    plain, _ = load(str(tmp_path / "model"), adapter_path=str(tmp_path / "run"))
    ids = mx.array([tokenizer.encode("The sky is blue.", add_special_tokens=False)])
    clara.set_role(model, "generator")
    assert not mx.allclose(plain(ids), clara.load_model(cfg.model)[0](ids), atol=1e-4)  # the adapter matters
    assert mx.allclose(plain(ids), model.llm(ids), atol=1e-5)


# =============================================================================
# the workshop, in clara.py's order: evaluation, input reading, checkpoint files, reliability, then the
# experiment script
# =============================================================================


# -----------------------------------------------------------------------------
# evaluation: Apple's answer metrics


@pytest.mark.parametrize("prediction, gold, em, f1, cover", [
    ("The Paris.", "paris", 1.0, 1.0, 1.0),
    ("It is Paris, France", "Paris", 0.0, 0.4, 1.0),  # precision 1/4, recall 1
    ("London", "Paris", 0.0, 0.0, 0.0),
    ("an apple a day", "Apple day", 1.0, 1.0, 1.0),
    ("sixteen vectors", "16", 0.0, 0.0, 0.0),
    ("France, Paris", "Paris France", 0.0, 1.0, 1.0),  # cover-EM is about tokens, not a substring
    ("Parisian", "Paris", 0.0, 0.0, 0.0),  # a substring is not a token: no cover
    ("True", "yes", 1.0, 1.0, 1.0),  # True / False read as yes / no
    ("yes it is", "yes", 0.0, 0.0, 1.0),  # F1 is 0 when one side is yes / no / noanswer and they differ
    ("no", "no way", 0.0, 0.0, 0.0),
    ("noanswer", "noanswer", 1.0, 1.0, 1.0),
])
def test_answer_metrics_are_apples_em_f1_and_cover_em(prediction, gold, em, f1, cover):
    assert clara.exact_match(prediction, gold) == em
    assert clara.token_f1(prediction, gold) == pytest.approx(f1)
    assert clara.cover_exact_match(prediction, gold) == cover


# -----------------------------------------------------------------------------
# data: PDF text and JSONL records


def test_pdf_extraction_joins_hyphenated_words_and_chunks_fit_the_document_length(tokenizer):
    pages = clara.extract_pdf_pages(ROOT / "data" / "sample.pdf")
    text = " ".join(t for _, t in pages)
    assert len(pages) == 4 and "particular" in text and "part-" not in text and "  " not in text
    count = lambda s: len(tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
    chunks = clara.chunk_pages(pages, count, 64)
    assert all(count(c["text"]) <= 64 + 2 for c in chunks)  # sentence-packed; BPE merges may shift a token
    assert " ".join(c["text"] for c in chunks).split() == text.split()  # nothing lost, nothing reordered
    assert chunks[0]["pages"] == [1] and chunks[-1]["pages"] == [4]


def test_sft_records_accept_claras_field_variants():
    where = "f.jsonl:1"
    variants = [{"question": "q", "context": ["d"], "answer": "a"},
                {"question": "q", "content": "d", "answers": ["a", "b"]},
                {"question": "q", "docs": ["d"], "golden_answers": ["a"]}]
    for obj in variants:
        assert clara.parse_sft_record(obj, where) == {"question": "q", "docs": ["d"], "answer": "a", "gold": "a"}
    for bad in [{"docs": ["d"], "answer": "a"}, {"question": "q", "docs": [1], "answer": "a"},
                {"question": "q", "docs": ["d"], "answer": ""}]:
        with pytest.raises(clara.InputError, match="f.jsonl:1: "):
            clara.parse_sft_record(bad, where)


@pytest.mark.parametrize("fields, target, gold", [
    ({"answer": "long answer", "gold_answer": "gold"}, "long answer", "gold"),  # Apple's stage 2: both
    ({"gold_answer": "gold", "answer": "long answer"}, "long answer", "gold"),  # field order does not matter
    ({"answer": "only"}, "only", "only"),  # no gold: scored against the target
    ({"gold_answer": "only"}, "only", "only"),  # no target: trained on the gold
    ({"golden_answers": ["g1", "g2"], "answer": "t"}, "t", "g1"),  # Apple scores golden_answers[0]
])
def test_training_reads_the_answer_field_and_scoring_the_gold_field(fields, target, gold):
    record = clara.parse_sft_record({"question": "q", "docs": ["d"], **fields}, "f.jsonl:1")
    assert (record["answer"], record["gold"]) == (target, gold)


def test_stage1_qa_records_target_the_question_answer_pairs():
    record = clara.parse_compress_record({"question": ["Q1", "Q2"], "answers": ["A1", "A2"], "docs": ["D"]}, "x")
    assert record == {"kind": "qa", "doc": "D", "target": "Question: Q1\nAnswer: A1\nQuestion: Q2\nAnswer: A2"}
    assert clara.parse_compress_record({"data_type": "qa", "question": ["Q1"], "answers": ["A1"], "docs": ["D"]},
                                       "x") == {"kind": "qa", "doc": "D", "target": "Question: Q1\nAnswer: A1"}
    assert clara.parse_compress_record({"data_type": "paraphrase", "docs": ["D"], "answers": ["P"]}, "x") == \
        {"kind": "paraphrase", "doc": "D", "target": "P"}
    assert clara.parse_compress_record({"text": "T"}, "x") == {"kind": "reconstruct", "doc": "T", "target": "T"}
    for bad, message in [({"data_type": "summary", "docs": ["D"]}, "'data_type' must be"),
                         ({"data_type": "qa", "question": ["Q"], "answers": ["A"], "docs": ["D", "E"]}, "one document"),
                         ({"data_type": "paraphrase", "docs": ["D"]}, "missing field 'answers'")]:
        with pytest.raises(clara.InputError, match=message):
            clara.parse_compress_record(bad, "x")


def test_stage1_prompts_are_apples_and_paraphrase_requests_are_seeded(tokenizer):
    cfg = tiny_config(doc_max_len=64, max_len=400)
    records = [{"kind": "qa", "doc": "D", "target": "Question: q\nAnswer: a"}] + \
        [{"kind": "paraphrase", "doc": "Doc.", "target": "P"} for i in range(12)]
    examples = clara.compress_examples(tokenizer, cfg, records)
    prompts = [tokenizer.decode(ex["ids"][: ex["n_prompt"]]) for ex in examples]
    assert clara.SYSTEM_QA in prompts[0] and "generate some single questions" in prompts[0]
    assert all(clara.SYSTEM_PARAPHRASE in p for p in prompts[1:])
    assert len(set(prompts[1:])) > 3  # the same document, but the request varies from record to record
    again = clara.compress_examples(tokenizer, cfg, records)
    assert [ex["ids"] for ex in again] == [ex["ids"] for ex in examples]  # and the same seed draws the same ones
    other = clara.compress_examples(tokenizer, replace(cfg, seed=1), records)
    assert [ex["ids"] for ex in other] != [ex["ids"] for ex in examples]
    assert len(clara.PARAPHRASE_INSTRUCTIONS) == 13 and all("{docs}" in t for t in clara.PARAPHRASE_INSTRUCTIONS)


# -----------------------------------------------------------------------------
# checkpoint files and exact resume (RunFiles)


def train_rows(out):
    """The reproducible part of metrics.jsonl (timings dropped)."""
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "it_per_s", "tokens_per_s", "peak_gb")} for r in rows]


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, tokenizer):
    """Three runs of one config: "a" straight through; "b" stopped by SIGINT after step 3 (its checkpoint kept
    aside), then resumed from that checkpoint into a model whose adapters were moved first."""
    root = tmp_path_factory.mktemp("resume")
    cfg = tiny_config(steps=6, grad_accum=2, batch_size=1, warmup=0.2, save_every=4, eval_every=2)
    examples = clara.sft_examples(tokenizer, cfg, SFT_RECORDS)
    straight = tiny_clara(cfg)
    clara.train(straight, examples, cfg, tokenizer.pad_token_id, clara.RunFiles(root / "a"), examples[:1])
    with pytest.raises(clara.TrainingStopped) as stopped:
        clara.train(tiny_clara(cfg), examples, cfg, tokenizer.pad_token_id, clara.RunFiles(root / "b"), examples[:1],
                    stop=lambda step: signal.SIGINT if step == 3 else None)
    checkpoint = clara.read_checkpoint(root / "b" / clara.CHECKPOINT)
    resumed = tiny_clara(cfg)  # the same frozen base; adapters and memory moved so they must come from the checkpoint
    resumed.update(tree_map(lambda p: p + 1.0, resumed.trainable_parameters()))
    clara.train(resumed, examples, cfg, tokenizer.pad_token_id, clara.RunFiles(root / "b", checkpoint), examples[:1])
    return {"root": root, "cfg": cfg, "examples": examples, "stopped": stopped.value, "checkpoint": checkpoint,
            "straight": straight, "resumed": resumed}


def test_a_signal_stops_after_the_step_with_a_checkpoint_of_that_step_and_data_position(interrupted_run):
    assert interrupted_run["stopped"].exit_code == 130 and "after step 3" in str(interrupted_run["stopped"])
    metadata = interrupted_run["checkpoint"][1]
    assert metadata["step"] == "3" and metadata["data_position"] == "6"  # 3 updates x 2 batches x 1 record


def test_resume_refuses_a_checkpoint_of_other_data(interrupted_run, tokenizer, tmp_path):
    cfg, examples = interrupted_run["cfg"], interrupted_run["examples"]
    with pytest.raises(clara.InputError, match=r"trained on other data \(2 examples, this data has 1"):
        clara.train(tiny_clara(cfg), examples[:1], cfg, tokenizer.pad_token_id,
                    clara.RunFiles(tmp_path, interrupted_run["checkpoint"]))


def test_resume_after_an_interrupt_gives_bitwise_the_same_adapters_and_loss_curve(interrupted_run):
    for (name, a), (_, b) in zip(tree_flatten(interrupted_run["straight"].trainable_parameters()),
                                 tree_flatten(interrupted_run["resumed"].trainable_parameters())):
        assert mx.array_equal(a, b), name
    root = interrupted_run["root"]
    assert train_rows(root / "a") == train_rows(root / "b")


def test_validation_runs_at_step_1_every_eval_every_and_the_end_and_best_keeps_the_lowest(interrupted_run):
    root = interrupted_run["root"]
    kinds = [(r["kind"], r["step"]) for r in train_rows(root / "a")]
    assert [s for k, s in kinds if k == "val"] == [1, 2, 4, 6]
    assert [s for k, s in kinds if k == "train"] == [1, 2, 3, 4, 5, 6]
    best = clara.read_checkpoint(root / "a" / clara.BEST)[1]
    val_rows = [r for r in train_rows(root / "a") if r["kind"] == "val"]
    assert float(best["best_val_loss"]) == min(r["val_loss"] for r in val_rows)


# -----------------------------------------------------------------------------
# reliability: bad input, signals, kills, fuzzed records


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-model")
    save_tiny_mlx_lm_folder(folder, tokenizer)
    return folder


def write_pdf_variants(folder):
    """Damaged, encrypted and blank PDFs made from data/sample.pdf."""
    from pypdf import PdfReader, PdfWriter

    sample = (ROOT / "data" / "sample.pdf").read_bytes()
    (folder / "empty.pdf").write_bytes(b"")
    (folder / "text.pdf").write_text("this is not a PDF\n")
    (folder / "cut.pdf").write_bytes(sample[:400])
    writer = PdfWriter(clone_from=PdfReader(ROOT / "data" / "sample.pdf"))
    writer.encrypt("secret", algorithm="RC4-128")
    writer.write(folder / "locked.pdf")
    blank = PdfWriter()
    blank.add_blank_page(612, 792)
    blank.write(folder / "blank.pdf")
    (folder / "a-folder.pdf").mkdir()


BAD_PDFS = [
    ("missing.pdf", [], "missing.pdf: no such PDF file"),
    ("a-folder.pdf", [], "a-folder.pdf: is a folder, not a PDF file"),
    ("empty.pdf", [], "empty.pdf: empty file, not a PDF"),
    ("text.pdf", [], "text.pdf: not a readable PDF"),
    ("cut.pdf", [], "cut.pdf: "),
    ("locked.pdf", [], "locked.pdf: the PDF is encrypted; give its password with --pdf-password"),
    ("locked.pdf", ["--pdf-password", "wrong"], "locked.pdf: wrong --pdf-password"),
    ("blank.pdf", [], "blank.pdf: no text could be extracted from its 1 page(s)"),
    ("text.pdf", ["--max-pages", "0"], "--max-pages must be positive"),
]


def assert_clean_failure(run, message, tmp_path, code=2):
    assert run.returncode == code, run.stdout + run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    assert message in run.stderr, run.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("**/*.chunks.jsonl"))


@pytest.mark.parametrize("name, extra, message", BAD_PDFS)
def test_bad_pdfs_give_one_line_exit_2_and_write_nothing(tmp_path, name, extra, message):
    write_pdf_variants(tmp_path)
    run = run_cli("compress", "--pdf", tmp_path / name, "--out", tmp_path / "out", *extra)
    assert_clean_failure(run, message, tmp_path)


def test_pdf_text_that_cannot_be_encoded_is_replaced_and_mostly_unreadable_text_is_warned_about(capsys):
    text = clara.clean_pdf_text("Caf\udce9 au lait, a \ud800 twice")  # lone surrogates from a broken font map
    assert text.encode("utf-8") and text.count("\ufffd") == 2
    clara.warn_if_unreadable("few.pdf", [(1, "x" * 40 + text)])  # 2 of 64 characters: 3%, no warning
    assert capsys.readouterr().err == ""
    clara.warn_if_unreadable("damaged.pdf", [(1, text), (2, "\ufffd" * 10)])
    share = round(100 * 12 / (len(text) + 10))
    assert capsys.readouterr().err == f"warning: damaged.pdf: {share}% of the extracted text is replacement " \
        "characters (a damaged file, or fonts without a text map): check the chunks before training on them\n"


def test_encrypted_pdf_opens_with_its_password_and_max_pages_bounds_the_work(tmp_path):
    write_pdf_variants(tmp_path)
    pages = clara.extract_pdf_pages(tmp_path / "locked.pdf", password="secret")
    assert [n for n, _ in pages] == [1, 2, 3, 4] and "Continuous Latent Reasoning" in pages[0][1]
    assert [n for n, _ in clara.extract_pdf_pages(ROOT / "data" / "sample.pdf", max_pages=2)] == [1, 2]


GOOD = {"question": "q", "docs": ["d"], "gold_answer": "a"}
BAD_JSONL = [
    (b"", "bad.jsonl: no records"),
    (b"\n  \n\n", "bad.jsonl: no records"),
    (json.dumps(GOOD).encode() + b"\n{oops\n", "bad.jsonl:2: not valid JSON"),
    (b"[1, 2]\n", "bad.jsonl:1: expected a JSON object, got list"),
    (json.dumps({**GOOD, "question": None}).encode(), "bad.jsonl:1: field 'question' must be a non-empty string"),
    (json.dumps({"docs": ["d"], "gold_answer": "a"}).encode(), "bad.jsonl:1: missing field 'question'"),
    (json.dumps({"question": "q", "gold_answer": "a"}).encode(), "bad.jsonl:1: missing field 'docs' / 'context'"),
    (json.dumps({"question": "q", "docs": ["d"]}).encode(), "bad.jsonl:1: missing field 'answer' / 'answers'"),
    (json.dumps({**GOOD, "docs": [1, 2]}).encode(), "bad.jsonl:1: field 'docs' must be a non-empty list"),
    (json.dumps({**GOOD, "docs": []}).encode(), "bad.jsonl:1: field 'docs' must be a non-empty list"),
    (json.dumps({**GOOD, "gold_answer": "  "}).encode(), "bad.jsonl:1: field 'gold_answer' must be a non-empty"),
    (json.dumps(GOOD).encode() + b"\n\xff\xfe bad bytes\n", "bad.jsonl:2: not UTF-8 text"),
]


@pytest.mark.parametrize("content, message", BAD_JSONL)
def test_bad_jsonl_gives_one_line_naming_file_line_and_field(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    run = run_cli("sft", "--data", tmp_path / "bad.jsonl", "--out", tmp_path / "out")
    assert_clean_failure(run, message, tmp_path)


@pytest.mark.parametrize("options, message", [
    (["--steps", "0"], "--steps must be positive, got 0"),
    (["--doc-max-len", "-5"], "--doc-max-len must be positive"),
    (["--compression-rate", "0"], "--compression-rate must be positive"),
    (["--lr", "-1"], "--lr must be a finite number above 0, got -1.0"),
    (["--warmup", "1.5"], "--warmup is a fraction"),
    (["--compression-rate", "512"], "--compression-rate 512 is larger than --doc-max-len 256"),
    (["--model", "./no/such/model"], "--model ./no/such/model: no such model folder"),
    (["--model", "missing.gguf"], "--model missing.gguf: no such file"),
    (["--resume", "data"], "checkpoint.safetensors: no such checkpoint"),
    (["--out", "data/sft.jsonl/sub"], "cannot be created"),
    (["--lr", "inf"], "--lr must be a finite number above 0, got inf"),
    (["--min-lr", "nan"], "--min-lr must be a finite number"),
    (["--lora-scale", "inf"], "--lora-scale must be a finite number"),
    (["--mse-weight", "inf"], "--mse-weight must be a finite number"),
    (["--seed", "-1"], "--seed must be from 0 to 4294967295, got -1"),
    (["--compression-rate", "1", "--max-len", "100"], "gives 256 memory slots per document, more than the whole"),
    (["--lora-rank", "100000"], "--lora-rank 100000 is above the model's hidden size 576"),
    (["--max-len", "24"], "no record can hold even one document's 16 memory slots in --max-len 24"),
])
def test_bad_options_give_one_line_exit_2_and_write_nothing(tmp_path, options, message):
    if "--out" not in options:
        options = options + ["--out", str(tmp_path / "out")]
    run = run_cli("sft", "--data", "data/sft.jsonl", *options)
    assert_clean_failure(run, message, tmp_path)


def test_an_option_is_never_taken_from_a_prefix_of_its_name(tmp_path):
    run = run_cli("sft", "--data", "data/sft.jsonl", "--step", "2", "--out", tmp_path / "out")
    assert run.returncode == 2 and "unrecognized arguments: --step 2" in run.stderr, run.stderr
    assert not (tmp_path / "out").exists()


STAGE_OPTIONS = {"compress": {"--pdf", "--data"}, "sft": {"--context", "--stage1-data", "--init-generator"},
                 "e2e": {"--top-k", "--temperature", "--retrieval-loss"}}


@pytest.mark.parametrize("command", ["compress", "sft", "e2e", "index", "ask", "eval"])
def test_each_commands_help_lists_only_its_options_required_first_in_groups_that_fit_a_screen(command, capsys):
    with pytest.raises(SystemExit):
        clara.parse_args([command, "--help"])
    text = capsys.readouterr().out
    blocks = text.split("\n\n")
    assert all(block.count("\n") < 40 for block in blocks), max(blocks, key=len)  # one screen a group
    options = re.findall(r"^  (--[\w-]+)", text, flags=re.M)
    assert len(options) == len(set(options)) and text.startswith(f"usage: clara.py {command} ")  # a short usage
    for other, only_there in STAGE_OPTIONS.items():  # what one stage uses is in no other training command's help
        if command in ("compress", "sft", "e2e") and command != other:
            assert not (only_there - {"--data", "--pdf"}) & set(options), options
    if command in ("sft", "e2e", "eval"):
        assert options[0] in ("--data", "--adapters")  # a required option first
    for entry in re.split(r"\n  (?=-)", text):  # no option says its default twice
        assert entry.count("default") <= 1, entry


def test_the_clara_part_above_the_workshop_banner_uses_no_name_defined_below_it():
    """A reader who stops at the banner has read every module-level name the code above it uses."""
    import ast

    source = (ROOT / "clara.py").read_text()
    banner = source.splitlines().index(next(line for line in source.splitlines() if line.startswith("# THE WORKSHOP")))
    defined_at = {}
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node]
        for target in targets:
            name = getattr(target, "id", getattr(target, "name", None))
            if name:
                defined_at[name] = node.lineno
    used_above = {(n.id, n.lineno) for node in ast.parse(source).body if node.lineno < banner
                  for n in ast.walk(node) if isinstance(n, ast.Name) and defined_at.get(n.id, 0) > banner}
    assert 500 < banner and not used_above, sorted(used_above)


def test_a_special_file_is_never_taken_as_an_output(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    run = run_cli("compress", "--pdf", "data/sample.pdf", "--chunks-out", tmp_path / "fifo", "--out", tmp_path / "out")
    assert_clean_failure(run, "is a special file", tmp_path)
    assert (tmp_path / "fifo").is_fifo()


@pytest.mark.parametrize("content, message", [
    (b"[" * 100_000 + b"]" * 100_000, "bad.jsonl:1: JSON this reader cannot take (RecursionError"),
    (b'{"question": ' + b"9" * 5000 + b"}", "bad.jsonl:1: JSON this reader cannot take (ValueError"),
    (b'{"question": "\\ud800", "docs": ["d"], "answer": "a"}', "bad.jsonl:1: JSON this reader cannot take"),
])
def test_json_pythons_parser_rejects_oddly_is_one_line_naming_the_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(clara.InputError, match=re.escape(message)):
        clara.read_jsonl(tmp_path / "bad.jsonl")


def test_inputs_that_are_folders_special_or_unreadable_say_so_not_no_such_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "secret.jsonl").write_text("{}\n")
    (tmp_path / "secret.jsonl").chmod(0)
    cases = [(tmp_path, "is a folder, not a JSONL file"), (tmp_path / "fifo", "is a special file"),
             (tmp_path / "missing.jsonl", "no such JSONL file")]
    if os.geteuid() != 0:  # root reads any file
        cases.append((tmp_path / "secret.jsonl", "cannot be read (Permission denied)"))
    for path, message in cases:
        with pytest.raises(clara.InputError, match=re.escape(message)):
            clara.read_jsonl(path)
    with pytest.raises(clara.InputError, match="is a folder, not a document file"):
        clara.read_documents([tmp_path])


def test_the_slot_marker_never_comes_in_from_the_input(tokenizer):
    record = clara.parse_sft_record({"question": "q\x00slot\x00?", "docs": ["a\x00slot\x00b"], "answer": "x"}, "f:1")
    assert "\x00" not in record["question"] + record["docs"][0]
    example = clara.question_example(tokenizer, tiny_config(), record, "compressed", "x")
    assert example["n_slot_docs"] == 1  # exactly one document's slots


@pytest.mark.parametrize("make, message", [
    (lambda folder: folder.mkdir(), "cannot be loaded by mlx-lm"),  # an empty folder
    (lambda folder: (folder.mkdir(), (folder / "config.json").write_text('{"model_type": "llama"}')),
     "cannot be loaded by mlx-lm"),  # a folder without weights
])
def test_model_folders_that_cannot_load_are_one_line(tmp_path, make, message):
    make(tmp_path / "model")
    with pytest.raises(clara.InputError, match=message):
        clara.load_model(str(tmp_path / "model"))


def test_a_truncated_or_foreign_gguf_is_one_line(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "cut.gguf").write_bytes(clara.packaged_gguf_path().read_bytes()[:1000])
    for name in ("empty.gguf", "cut.gguf"):
        with pytest.raises(clara.InputError, match="not a readable llama GGUF"):
            clara.load_model(str(tmp_path / name))


def test_overlong_documents_are_cut_with_a_warning_that_counts_them(tmp_path, tiny_model_folder):
    records = [{"question": "q?", "docs": ["word " * 3000, "short"], "gold_answer": "a"}, GOOD]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = run_cli("sft", "--data", tmp_path / "long.jsonl", "--model", tiny_model_folder, "--steps", 1,
                  "--out", tmp_path / "run")
    assert run.returncode == 0, run.stderr
    assert "warning: 1 document(s) were cut to --doc-max-len 256 tokens" in run.stderr


def start_cli(*args):
    return subprocess.Popen([sys.executable, str(ROOT / "clara.py"), *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_step_checkpoints_and_resume_continues(tmp_path, tiny_model_folder, signum, code):
    steps = 80  # far more than run in the moment between reading step 2's line and the signal landing
    common = ["--data", "data/sft.jsonl", "--model", tiny_model_folder, "--doc-max-len", 32, "--compression-rate", 8,
              "--out", tmp_path / "run", "--save-every", 1000, "--eval-every", 1000, "--steps", steps]
    process = start_cli("sft", *common)
    for line in process.stdout:
        if line.startswith(f"step 2/{steps} | loss"):
            process.send_signal(signum)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert f"stopped by {signal.Signals(signum).name} after step" in stderr and "--resume" in stderr
    step = int(clara.read_checkpoint(tmp_path / "run" / clara.CHECKPOINT)[1]["step"])
    assert 2 <= step < steps
    run = run_cli("sft", *common, "--resume", tmp_path / "run")
    assert run.returncode == 0, run.stderr
    assert f"step {step + 1}/{steps} | loss" in run.stdout and f"step 1/{steps} | loss" not in run.stdout
    assert clara.read_checkpoint(tmp_path / "run" / clara.CHECKPOINT)[1]["step"] == str(steps)
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"train"' in line]
    assert logged == list(range(1, steps + 1))


@pytest.fixture(scope="session")
def tiny_sft_run(tmp_path_factory, tiny_model_folder):
    """The output folder of a two-step sft run on the tiny model (documents of 32 tokens, 4 memory vectors)."""
    folder = tmp_path_factory.mktemp("tiny-sft") / "run"
    run = run_cli("sft", "--data", "data/sft.jsonl", "--model", tiny_model_folder, "--doc-max-len", 32,
                  "--compression-rate", 8, "--steps", 2, "--out", folder)
    assert run.returncode == 0, run.stderr
    return folder


E2E_GOOD = {"question": "q", "docs": ["a", "b", "c"], "answer": "a", "pos_index": [0]}


@pytest.mark.parametrize("record, message", [
    ({**E2E_GOOD, "pos_index": [3]}, "bad.jsonl:1: field 'pos_index' must be a list of candidate indices"),
    ({**E2E_GOOD, "pos_index": "0"}, "bad.jsonl:1: field 'pos_index' must be a list"),
    ({**E2E_GOOD, "docs": []}, "bad.jsonl:1: field 'docs' must be a non-empty list"),
    ({**E2E_GOOD, "docs": ["a", "b"]}, "bad.jsonl:1: 2 candidate document(s) in 'docs', but --top-k 3"),
])
def test_bad_e2e_records_give_one_line_exit_2_and_write_nothing(tmp_path, tiny_sft_run, record, message):
    (tmp_path / "bad.jsonl").write_text(json.dumps(E2E_GOOD) + "\n" + json.dumps(record) + "\n")
    run = run_cli("e2e", "--data", tmp_path / "bad.jsonl", "--init", tiny_sft_run, "--top-k", 3,
                  "--out", tmp_path / "out")
    assert_clean_failure(run, message.replace("bad.jsonl:1", "bad.jsonl:2"), tmp_path)


def fresh_arrays(model_folder, seed=0):
    cfg = clara.Config(model=str(model_folder), doc_max_len=32, compression_rate=8, seed=seed)
    return clara.adapter_arrays(clara.load_clara(cfg)[0])


@pytest.mark.parametrize("carry", [False, True])
def test_sft_init_takes_the_compressor_and_memory_and_the_generator_only_when_asked(tmp_path, tiny_sft_run,
                                                                                   tiny_model_folder, carry):
    run = run_cli("sft", "--data", "data/sft.jsonl", "--init", tiny_sft_run, "--steps", 1, "--lr", 1e-30,
                  "--seed", 4, "--out", tmp_path / "run", *(["--init-generator"] if carry else []))
    assert run.returncode == 0, run.stderr
    saved, stage1, fresh = clara.read_trained(tmp_path / "run")[1], clara.read_trained(tiny_sft_run)[1], \
        fresh_arrays(tiny_model_folder, seed=4)
    for name, value in saved.items():  # lora_a and memory: an lr of 1e-30 moves nothing the step touches
        if name.endswith("lora_a") or name == "memory":
            source = fresh if ".adapters.generator." in name and not carry else stage1
            assert mx.array_equal(value, source[name]), name
    assert not mx.array_equal(stage1["memory"], fresh["memory"])  # the two sources do differ


def test_apples_stage1_file_format_trains_through_compress_data(tmp_path, tiny_model_folder):
    records = [{"data_type": "qa", "question": ["Who keeps the lighthouse?", "What colour is its lamp?"],
                "answers": ["Ada Morrow", "green"],
                "docs": ["The lighthouse on Kell Point is kept by Ada Morrow. Its lamp shines green."]},
               {"data_type": "paraphrase", "docs": ["Snow fell on Tarn for nine days."],
                "answers": ["For nine days, snow came down on Tarn."]}]
    villages = [f"Village {i}" for i in range(60)]  # one record lists dozens of villages, a question each
    records.append({"data_type": "qa", "question": [f"Which river runs past {v}?" for v in villages],
                    "answers": [f"The Orv, as for every village of {v}'s valley." for v in villages],
                    "docs": ["The Orv runs past sixty villages."]})
    (tmp_path / "stage1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = run_cli("compress", "--data", tmp_path / "stage1.jsonl", "--model", tiny_model_folder, "--doc-max-len", 32,
                  "--compression-rate", 8, "--steps", 2, "--max-len", 512, "--out", tmp_path / "run")
    assert run.returncode == 0, run.stderr
    assert "3 training example(s)" in run.stdout and "step 2/2 | loss" in run.stdout  # the long record trains too
    assert "warning: 1 target(s) were cut at their end to fit --max-len 512; prompts and memory kept" in run.stderr
    assert "lost memory slots" not in run.stderr


def test_sft_stage1_data_mixes_its_training_records_into_stage_2_and_skips_its_eval_ones(tmp_path,
                                                                                        tiny_model_folder):
    stage1 = [{"data_type": "qa", "question": ["Who keeps the lighthouse?"], "answers": ["Ada Morrow"],
               "docs": ["The lighthouse on Kell Point is kept by Ada Morrow."]},
              {"data_type": "paraphrase", "docs": ["Snow fell on Tarn."], "answers": ["It snowed on Tarn."]},
              {"data_type": "paraphrase", "docs": ["Rain fell."], "answers": ["It rained."], "split": "eval"}]
    (tmp_path / "stage1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stage1))
    common = ["--data", "data/sft.jsonl", "--model", tiny_model_folder, "--doc-max-len", 32, "--compression-rate", 8,
              "--steps", 1]
    run = run_cli("sft", *common, "--stage1-data", tmp_path / "stage1.jsonl", "--out", tmp_path / "run")
    assert run.returncode == 0, run.stderr
    assert f"{tmp_path / 'stage1.jsonl'}: 2 stage-1 record(s) mixed in" in run.stdout
    assert "42 training example(s), 10 for validation" in run.stdout  # data/sft.jsonl: 40 training, 10 eval
    (tmp_path / "bad.jsonl").write_text(json.dumps(stage1[0]) + "\n" + json.dumps({"data_type": "qa"}) + "\n")
    bad = run_cli("sft", *common, "--stage1-data", tmp_path / "bad.jsonl", "--out", tmp_path / "out")
    assert_clean_failure(bad, "bad.jsonl:2: ", tmp_path)


def test_e2e_needs_an_earlier_run_to_start_from(tmp_path):
    run = run_cli("e2e", "--data", "data/e2e.jsonl", "--out", tmp_path / "out")
    assert_clean_failure(run, "give --init with the --out folder of an sft run", tmp_path)


def test_e2e_stops_on_a_signal_and_resumes_in_the_folder_it_is_given(tmp_path, tiny_sft_run):
    steps = 100
    common = ["--data", "data/e2e.jsonl", "--out", tmp_path / "run", "--save-every", 1000, "--eval-every", 1000,
              "--steps", steps, "--batch-size", 2]
    process = start_cli("e2e", "--init", tiny_sft_run, *common)
    for line in process.stdout:
        if line.startswith(f"step 2/{steps} | loss"):
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    step = int(clara.read_checkpoint(tmp_path / "run" / clara.CHECKPOINT)[1]["step"])
    shutil.copytree(tmp_path / "run", tmp_path / "copy")  # a copied run resumes in the copy, not the original
    original = (tmp_path / "run" / clara.CHECKPOINT).read_bytes()
    run = run_cli("e2e", "--data", "data/e2e.jsonl", "--resume", tmp_path / "copy")
    assert run.returncode == 0, run.stderr
    assert f"step {step + 1}/{steps} | loss" in run.stdout and "mse 0.0000" in run.stdout
    assert (tmp_path / "run" / clara.CHECKPOINT).read_bytes() == original
    assert clara.read_checkpoint(tmp_path / "copy" / clara.CHECKPOINT)[1]["step"] == str(steps)
    saved = clara.read_trained(tmp_path / "copy")[1]
    initial = clara.read_trained(tiny_sft_run)[1]
    for name, value in saved.items():  # the compressor and the memory are the sft run's, bit for bit
        if name == "memory" or ".adapters.compressor." in name:
            assert mx.array_equal(value, initial[name]), name
    assert any(".adapters.query." in name for name in saved)


def test_the_python_api_loads_once_and_answers_as_the_commands_do(tmp_path, tiny_sft_run):
    docs = ["The alignment loss has a weight of 0.1 in the total loss.", "Sixteen vectors replace a document."]
    questions = ["What weight?", "How many vectors?"]
    for i, doc in enumerate(docs):
        (tmp_path / f"doc{i}.txt").write_text(doc)
    (tmp_path / "questions.txt").write_text("\n".join(questions) + "\n")
    cli = run_cli("ask", "--adapters", tiny_sft_run, "--docs", tmp_path / "doc0.txt", tmp_path / "doc1.txt",
                  "--questions", tmp_path / "questions.txt", "--max-new-tokens", 4)
    assert cli.returncode == 0, cli.stderr
    reader = clara.load(tiny_sft_run)
    memory = reader.compress(docs)
    assert memory.shape == (2, reader.cfg.n_mem, 64)
    answers = [reader.ask(q, memory=memory, max_new_tokens=4) for q in questions]
    assert [json.loads(line)["answer"] for line in cli.stdout.splitlines() if line.startswith("{")] == answers
    assert answers == [reader.ask(q, docs=docs, max_new_tokens=4) for q in questions]  # compressed here or before
    chunks = [{"text": d, "source": "notes.txt", "pages": [i + 1]} for i, d in enumerate(docs * 3)]
    index = reader.index(chunks)
    answer, sources = reader.ask_index(index, docs[1], max_new_tokens=4)
    assert isinstance(answer, str) and len(sources) == reader.cfg.top_k == 5
    assert sources[0]["text"] == docs[1] and sources[0]["score"] == pytest.approx(1.0, abs=1e-5)  # its own text
    assert reader.cfg.retrieval == "hybrid" and sources[0]["bm25"] == max(s["bm25"] for s in sources) > 0
    _, dense = clara.load(tiny_sft_run, retrieval="dense").ask_index(index, docs[1], max_new_tokens=4)
    assert [s["score"] for s in dense] == sorted((s["score"] for s in dense), reverse=True) and "bm25" not in dense[0]
    assert [s["text"] for s in dense[:3]] == [docs[1]] * 3  # the three copies of its text
    read, same_sources = reader.ask_index(index, docs[1], max_new_tokens=4, context="text")  # the chunks' text
    assert same_sources == sources and read == reader.ask(docs[1], [s["text"] for s in sources], max_new_tokens=4,
                                                          context="text") != answer
    records = [{"question": q, "docs": docs, "gold": a} for q, a in zip(questions, ["0.1", "Sixteen"])]
    results = reader.evaluate(records, ["compressed", "none"], max_new_tokens=4)
    assert set(results) == {"compressed", "none"} and [a["prediction"] for a in results["compressed"]["answers"]] \
        == answers and results["none"]["records"] == 2
    assert clara.load(tiny_sft_run, top_k=2).cfg.top_k == 2  # options override the saved config


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 12), st.data())
def test_hybrid_retrieval_puts_the_one_chunk_sharing_a_word_first_and_dense_keeps_the_cosine_order(n, data):
    """rank_chunks on random unit keys and a random query (no model): "dense" is the cosine order; under "hybrid" a
    chunk that alone shares a word with the question (in any case) comes first whatever its cosine, the others
    keep their cosine order, and a question that shares no word with any chunk is ranked as dense ranks it."""
    seed, target = data.draw(st.integers(0, 2**31 - 1)), data.draw(st.integers(0, n - 1))
    keys = clara.unit(mx.random.normal((n, 8), key=mx.random.key(seed)))  # (N, D) unit keys, as an index's
    query = mx.random.normal((8,), key=mx.random.key(seed + 1))
    index = {"keys": keys, "chunks": [{"text": f"alpha{i} beta{i} beta{i}"} for i in range(n)]}
    bm25 = clara.bm25_scorer([chunk["text"] for chunk in index["chunks"]])
    [(dense, cosine, no_bm25)] = clara.rank_chunks(index, ["gamma beta0"], [query])
    assert no_bm25 is None and cosine == pytest.approx((keys @ clara.unit(query)).tolist(), abs=1e-6)
    assert dense == sorted(range(n), key=lambda i: -cosine[i])
    [(hybrid, _, scores)] = clara.rank_chunks(index, [f"gamma BETA{target}?"], [query], bm25)
    assert hybrid[0] == target and hybrid[1:] == [i for i in dense if i != target]
    assert [score > 0 for score in scores] == [i == target for i in range(n)]
    [(unmatched, _, scores)] = clara.rank_chunks(index, ["gamma delta"], [query], bm25)
    assert unmatched == dense and set(scores) == {0.0}


def test_adapters_trained_with_a_bfloat16_base_are_read_with_this_machines_base(tmp_path, tiny_sft_run):
    """A GPU run saves "base": "bfloat16"; ask / eval / index / load() on a CPU must not inherit it (50x slower)."""
    shutil.copytree(tiny_sft_run, tmp_path / "gpu-run")
    config = json.loads((tmp_path / "gpu-run" / "config.json").read_text())
    (tmp_path / "gpu-run" / "config.json").write_text(json.dumps({**config, "base": "bfloat16"}))
    dtypes = {name: {v.dtype for _, v in tree_flatten(clara.load(tmp_path / "gpu-run", **options).model.parameters())}
              for name, options in (("saved", {}), ("asked", {"base": "bfloat16"}))}
    assert dtypes["saved"] == {mx.float32} and mx.bfloat16 in dtypes["asked"]  # load(base=...) still wins
    shutil.copytree(tiny_sft_run, tmp_path / "cpu-run")  # eval writes beside the adapters: not into the fixture
    folders = (tmp_path / "cpu-run", tmp_path / "gpu-run")
    scores = [run_cli("eval", "--adapters", folder, "--data", "data/sft.jsonl", "--max-records", 2,
                      "--contexts", "compressed") for folder in folders]
    assert all(s.returncode == 0 for s in scores), scores[1].stderr
    results = [json.loads((folder / "eval.json").read_text())["results"]["compressed"] for folder in folders]
    assert results[0]["ce"] == results[1]["ce"]  # the same float32 base, to the last bit


def test_the_pdf_retrieval_check_draws_verbatim_passages_and_ranks_a_chunk_by_its_own_text_first(tmp_path,
                                                                                                  tiny_sft_run):
    sys.path.insert(0, str(ROOT / "data"))
    import pdf_retrieval

    reader = clara.load(tiny_sft_run)  # 32-token documents: chunks cut at 256 tokens, as the default model's
    chunks = clara.pdf_chunks(clara.extract_pdf_pages(ROOT / "data" / "sample.pdf"), reader.tokenizer,
                              replace(reader.cfg, doc_max_len=256))
    drawn = pdf_retrieval.passages(chunks)
    assert drawn and drawn == pdf_retrieval.passages(chunks)  # the same passages for every adapters
    assert all(passage in chunks[i]["text"] and not chunks[i]["text"].startswith(passage) for i, passage in drawn)
    index = reader.index(chunks)
    own_text = [(i, chunk["text"]) for i, chunk in enumerate(chunks)]
    assert pdf_retrieval.ranks(reader, index, own_text) == [0] * len(chunks)  # the reasoner is still the compressor
    found = pdf_retrieval.ranks(reader, index, drawn)
    assert len(found) == len(drawn) and all(0 <= r < len(chunks) for r in found)
    blank = tmp_path / "blank.pdf"
    blank.write_bytes(b"")
    run = subprocess.run([sys.executable, str(ROOT / "data" / "pdf_retrieval.py"), blank, "--adapters", tiny_sft_run],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and run.stderr.count("\n") == 1 and "blank.pdf" in run.stderr, run.stderr


def test_the_pdf_check_answers_each_question_from_its_own_chunks_memory_text_and_nothing(tiny_sft_run):
    """pdf_retrieval.py --own-chunk: the memory against the text on a PDF's chunks, no retrieval in between."""
    sys.path.insert(0, str(ROOT / "data"))
    import pdf_retrieval

    reader = clara.load(tiny_sft_run)
    chunks = clara.pdf_chunks(clara.extract_pdf_pages(ROOT / "data" / "sample.pdf"), reader.tokenizer, reader.cfg)
    asked = [(len(chunks) - 1, "What is CLaRa?", "a method"), (0, "Who wrote it?", "Apple")]
    scores = pdf_retrieval.own_chunk_scores(reader, chunks, asked)
    assert set(scores) == set(clara.EVAL_CONTEXTS) and all(s["records"] == 2 for s in scores.values())
    doc_tokens = sum(len(clara.token_ids(reader.tokenizer, chunks[i]["text"])) for i, _, _ in asked) / len(asked)
    none, memory, text = (scores[c]["prompt_tokens"] for c in ("none", "compressed", "text"))
    # the text context reads each question's own chunk where the memory context has its n_mem slots
    assert none < memory and abs((text - memory) - (doc_tokens - reader.cfg.n_mem)) <= 1, (none, memory, text)
    run = subprocess.run([sys.executable, str(ROOT / "data" / "pdf_retrieval.py"), ROOT / "data" / "sample.pdf",
                          "--adapters", tiny_sft_run, "--own-chunk"], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and run.stderr.count("\n") == 1 and "--own-chunk needs --questions" in run.stderr


def test_the_memory_facts_check_counts_the_facts_a_paraphrase_keeps_from_own_and_another_memory(tiny_sft_run):
    sys.path.insert(0, str(ROOT / "data"))
    import make_facts
    import memory_facts

    document = make_facts.make_documents(1, 7)[0]
    numbers = sum(any(c.isdigit() for c in answer) for _, answer in document["qa"])
    others = len(document["qa"]) - numbers
    assert numbers and others  # both kinds are counted
    assert memory_facts.kept(document["qa"], document["text"]) == {"numbers": (numbers, numbers),
                                                                     "other": (others, others)}
    assert memory_facts.kept(document["qa"], "") == {"numbers": (0, numbers), "other": (0, others)}
    run = subprocess.run([sys.executable, str(ROOT / "data" / "memory_facts.py"), "--adapters", str(tiny_sft_run),
                          "--docs", "2", "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    counts = re.findall(r"^(own memory|another document's memory): numbers (\d+)/(\d+), other facts (\d+)/(\d+)$",
                        run.stdout, flags=re.M)
    facts = sum(len(d["qa"]) for d in make_facts.make_documents(2, 7))
    assert [c[0] for c in counts] == ["own memory", "another document's memory"], run.stdout
    assert all(int(c[1]) <= int(c[2]) and int(c[3]) <= int(c[4]) and int(c[2]) + int(c[4]) == facts for c in counts)
    ce = re.findall(r"^(own memory|another document's memory): qa target CE, digit tokens (\S+), other tokens (\S+)$",
                    run.stdout, flags=re.M)
    assert [c[0] for c in ce] == ["own memory", "another document's memory"], run.stdout
    assert all(0 < float(value) < 30 for c in ce for value in c[1:]), run.stdout  # finite: both kinds of token exist
    bad = subprocess.run([sys.executable, str(ROOT / "data" / "memory_facts.py"), "--adapters", str(tiny_sft_run),
                          "--docs", "1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "--docs" in bad.stderr, bad.stderr


def test_the_memory_facts_check_reads_real_paragraphs_of_the_validation_articles_only(tmp_path, tiny_sft_run):
    """memory_facts.py --wiki: a make_wiki.py stage1.jsonl's held-out qa records become the documents, each with
    its questions and answers as the facts; training records and paraphrase records are not read."""
    sys.path.insert(0, str(ROOT / "data"))
    import memory_facts

    def qa(text, split=None):
        return {"data_type": "qa", "question": [f"q of {text}?"], "answers": [f"{text} 1"], "docs": [f"{text} 1."],
                **({"split": split} if split else {})}
    rows = [qa("train"), qa("a", "eval"), {"data_type": "paraphrase", "docs": ["p"], "answers": ["p"], "split": "eval"},
            qa("b", "eval"), qa("c", "eval")]
    path = tmp_path / "stage1.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    documents = memory_facts.wiki_documents(path, 2)
    assert [(d["text"], d["qa"]) for d in documents] == [("a 1.", [("q of a?", "a 1")]), ("b 1.", [("q of b?", "b 1")])]
    run = subprocess.run([sys.executable, str(ROOT / "data" / "memory_facts.py"), "--adapters", str(tiny_sft_run),
                          "--wiki", path, "--docs", "3", "--max-new-tokens", "2"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and re.search(r"^own memory: numbers \d/3, other facts 0/0$", run.stdout, flags=re.M), \
        (run.stdout, run.stderr)  # every answer has a digit: three numbers, no other facts
    bad = subprocess.run([sys.executable, str(ROOT / "data" / "memory_facts.py"), "--adapters", str(tiny_sft_run),
                          "--wiki", path, "--docs", "4"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "stage1.jsonl: 3 qa record(s)" in bad.stderr


def test_ask_index_finds_a_chunk_by_its_text_then_by_a_passage_and_refuses_other_adapters(tmp_path, tiny_sft_run,
                                                                                          tiny_model_folder):
    run = run_cli("index", "--pdf", "data/sample.pdf", "--adapters", tiny_sft_run, "--out", tmp_path / "index")
    assert run.returncode == 0, run.stderr
    chunks = [json.loads(line) for line in (tmp_path / "index" / "chunks.jsonl").read_text().splitlines()]
    arrays = mx.load(str(tmp_path / "index" / "index.safetensors"))
    assert arrays["memory"].shape == (len(chunks), 4, 64) and arrays["keys"].shape == (len(chunks), 4 * 64)
    assert mx.allclose(mx.linalg.norm(arrays["keys"], axis=-1), mx.ones(len(chunks)), atol=1e-5)
    assert all(c["source"] == "sample.pdf" and c["pages"] for c in chunks)
    progress = [int(n) for n in re.findall(r"^index: (\d+)/%d compressed \| [\d.]+ docs/s$" % len(chunks), run.stdout,
                                            flags=re.M)]
    assert progress == sorted(progress) and progress[-1] == len(chunks)  # a greppable line as it goes

    def first_hit(adapters, question):
        run = run_cli("ask", "--index", tmp_path / "index", "--adapters", adapters, "--question", question,
                      "--max-new-tokens", 2)
        assert run.returncode == 0, run.stderr
        return next(line for line in run.stdout.splitlines() if line.strip().startswith("[1]"))

    def opening(chunk):
        return " ".join(chunk["text"].split()[:6])

    middle = len(chunks) // 2  # before stage 3 the query reasoner is the compressor: a chunk's text finds it
    hit = first_hit(tiny_sft_run, chunks[middle]["text"])
    assert "score 1.000" in hit and opening(chunks[middle]) in hit
    read = run_cli("ask", "--index", tmp_path / "index", "--adapters", tiny_sft_run, "--question",
                   chunks[middle]["text"], "--context", "text", "--max-new-tokens", 2)  # the retrieved chunks' text
    index = clara.read_index(tmp_path / "index")[1]
    assert read.returncode == 0 and read.stdout.startswith(clara.load(tiny_sft_run).ask_index(
        index, chunks[middle]["text"], 2, context="text")[0] + "\n\nsources"), read.stderr

    def passage(chunk):  # the middle half of a chunk's words: a sentence-sized piece copied from it
        words = chunk["text"].split()
        return " ".join(words[len(words) // 4: len(words) // 4 + max(4, len(words) // 2)])

    records = [{"question": passage(c), "docs": [d["text"] for d in chunks], "answer": "-", "pos_index": [i]}
               for i, c in enumerate(chunks)]
    records.append({"question": "A question with no marked chunk", "docs": records[0]["docs"], "answer": "-"})
    (tmp_path / "passages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = run_cli("e2e", "--data", tmp_path / "passages.jsonl", "--init", tiny_sft_run, "--retrieval-loss",
                  "contrastive", "--steps", 60, "--lr", 1e-2, "--batch-size", 8, "--log-every", 60, "--out",
                  tmp_path / "retrieval")
    assert run.returncode == 0, run.stderr  # batches that mix marked and unmarked questions train
    assert f"1 of {len(records)} training record(s) have no 'pos_index'" in run.stderr
    for i in (0, len(chunks) - 1):  # Apple's retrieval pretraining: a passage now finds its chunk first
        assert opening(chunks[i]) in first_hit(tmp_path / "retrieval", passage(chunks[i]))
    (tmp_path / "questions.txt").write_text(f"{passage(chunks[0])}\n{passage(chunks[-1])}\n")
    run = run_cli("ask", "--index", tmp_path / "index", "--adapters", tmp_path / "retrieval", "--questions",
                  tmp_path / "questions.txt", "--max-new-tokens", 2)
    assert run.returncode == 0, run.stderr
    answers = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [a["sources"][0]["text"] for a in answers] == [chunks[0]["text"], chunks[-1]["text"]]
    assert all(a["sources"][0]["pages"] and len(a["sources"]) == 5 for a in answers)
    # the compressor did not move, so the index stays valid for the retrained query reasoner
    other = run_cli("sft", "--data", "data/sft.jsonl", "--model", tiny_model_folder, "--doc-max-len", 32,
                    "--compression-rate", 8, "--steps", 1, "--seed", 5, "--out", tmp_path / "other")
    assert other.returncode == 0, other.stderr
    run = run_cli("ask", "--index", tmp_path / "index", "--adapters", tmp_path / "other", "--question", "q")
    assert_clean_failure(run, "built with other adapters", tmp_path)
    run = run_cli("index", "--pdf", "data/sample.pdf", "--adapters", tiny_sft_run, "--out", tmp_path / "index")
    assert_clean_failure(run, "already holds files", tmp_path)


def test_a_new_run_never_replaces_an_earlier_one_unless_told_to(tmp_path, tiny_sft_run):
    shutil.copytree(tiny_sft_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    run = run_cli("sft", "--data", "data/sft.jsonl", "--init", tiny_sft_run, "--steps", 1, "--out", tmp_path / "run")
    assert run.returncode == 2 and "already holds a run" in run.stderr and "--resume" in run.stderr, run.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before  # untouched
    run = run_cli("sft", "--data", "data/sft.jsonl", "--init", tiny_sft_run, "--steps", 1, "--out", tmp_path / "run",
                  "--overwrite", "--eval-every", 1000)
    assert run.returncode == 0, run.stderr
    for name in (clara.CHECKPOINT, clara.BEST):  # nothing of the earlier run is left to mistake for this one
        assert clara.read_checkpoint(tmp_path / "run" / name)[1]["step"] == "1"
    assert {json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()} == {1}


def test_a_second_run_on_the_same_out_is_refused_and_a_killed_one_leaves_no_stale_lock(tmp_path, tiny_model_folder):
    common = ["--data", "data/sft.jsonl", "--model", tiny_model_folder, "--doc-max-len", 32, "--compression-rate", 8,
              "--out", tmp_path / "run", "--save-every", 1, "--eval-every", 1000, "--steps", 1000]
    first = start_cli("sft", *common)
    next(line for line in first.stdout if line.startswith("step 2/"))  # running, a checkpoint on disk
    second = run_cli("sft", *common, "--overwrite")
    assert second.returncode == 2 and "another run is writing there right now" in second.stderr, second.stderr
    first.kill()
    first.wait()
    third = run_cli("sft", *common[:-1], 3, "--resume", tmp_path / "run")  # the dead run's lock is gone with it
    assert third.returncode == 0, third.stderr


def test_resume_refuses_other_data_or_another_command_before_writing_anything(tmp_path, tiny_model_folder):
    common = ["--model", tiny_model_folder, "--doc-max-len", 32, "--compression-rate", 8, "--steps", 2]
    run = run_cli("sft", "--data", "data/sft.jsonl", *common, "--out", tmp_path / "run")
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in (ROOT / "data" / "sft.jsonl").read_text().splitlines()]
    records[0]["gold_answer"] = "something else"  # the same number of records, other contents
    (tmp_path / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    run = run_cli("sft", "--data", tmp_path / "other.jsonl", "--steps", 4, "--resume", tmp_path / "run")
    assert run.returncode == 2 and "trained on other data" in run.stderr and run.stderr.count("\n") == 1, run.stderr
    run = run_cli("compress", "--pdf", "data/sample.pdf", "--chunks-out", tmp_path / "chunks.jsonl", "--steps", 4,
                  "--resume", tmp_path / "run")
    assert run.returncode == 2 and "written by `sft`, not `compress`" in run.stderr, run.stderr
    assert not (tmp_path / "chunks.jsonl").exists() and (tmp_path / "run" / "metrics.jsonl").read_bytes() == before


# -----------------------------------------------------------------------------
# reliability round three (issue 41): earlier runs are never lost, refusals leave nothing, edited folders and the
# Python API are one line


def main_cli(capsys, *args):
    """clara.main in this process (no interpreter to start): (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = clara.main([str(a) for a in args])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def folder_bytes(folder):
    """The files of a folder and their bytes (the lock file a run holds there aside)."""
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file() and p.name != ".lock"}


def assert_one_line(code, err, message, expected_code=2):
    assert code == expected_code and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err


def test_no_option_combination_replaces_or_deletes_an_earlier_run(tmp_path, tiny_sft_run, capsys):
    run, other = tmp_path / "run", tmp_path / "other"
    shutil.copytree(tiny_sft_run, run)
    shutil.copytree(tiny_sft_run, other)
    code, _, err = main_cli(capsys, "sft", "--data", "data/sft.jsonl", "--init", tiny_sft_run, "--steps", 1,
                            "--eval-every", 1000, "--out", run, "--overwrite")  # replaces, and saves overwrite: true
    assert code == 0, err
    kept, others = folder_bytes(run), folder_bytes(other)
    records = (ROOT / "data" / "sft.jsonl").read_text().splitlines()
    (tmp_path / "other.jsonl").write_text("\n".join(records[:5]) + "\n")
    code, _, err = main_cli(capsys, "sft", "--data", tmp_path / "other.jsonl", "--steps", 2, "--resume", run)
    assert_one_line(code, err, "trained on other data")  # the saved overwrite: true did not come back
    code, _, err = main_cli(capsys, "sft", "--data", "data/sft.jsonl", "--steps", 2, "--resume", run, "--out", other)
    assert_one_line(code, err, f"--out {other}: already holds a run")
    (tmp_path / "bad.jsonl").write_text(records[0] + "\n{\"question\": 3}\n")
    code, _, err = main_cli(capsys, "sft", "--data", tmp_path / "bad.jsonl", "--init", tiny_sft_run, "--out", run,
                            "--overwrite")
    assert_one_line(code, err, "bad.jsonl:2: field 'question'")  # --overwrite, then refused: nothing deleted
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = main_cli(capsys, "compress", "--pdf", "data/sample.pdf", "--init", tiny_sft_run, "--chunks-out",
                            tmp_path / "notes.txt", "--out", tmp_path / "c")
    assert_one_line(code, err, "notes.txt: already exists")
    assert folder_bytes(run) == kept and folder_bytes(other) == others and not (tmp_path / "c").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "qa.jsonl").write_text(records[0] + "\n")
    for n in (1, 2):  # a second eval keeps the first one's report
        code, out, err = main_cli(capsys, "eval", "--adapters", run, "--data", tmp_path / "qa.jsonl", "--contexts",
                                  "none", "--max-new-tokens", 1)
        assert code == 0, err
        if n == 1:
            first = {name: (run / name).read_bytes() for name in ("eval.json", "eval.md")}
    assert {name: (run / name).read_bytes() for name in ("eval.json", "eval.md")} == first
    assert f"wrote {run / 'eval-2.json'} and {run / 'eval-2.md'}" in out
    assert json.loads((run / "eval-2.json").read_text())["results"]["none"]["records"] == 1
    code, _, err = main_cli(capsys, "sft", "--data", "data/sft.jsonl", "--steps", 2, "--resume", run)
    assert code == 0, err  # the same data: it goes on, and keeps the metrics rows of its first step
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"train"' in line] == [1, 2]


def test_an_index_run_that_finds_its_out_taken_meanwhile_is_refused_and_leaves_no_temporary_folder(
        tmp_path, tiny_sft_run, capsys, monkeypatch):
    (tmp_path / "chunks.jsonl").write_text("".join(json.dumps({"text": f"chunk {i}"}) + "\n" for i in range(3)))
    index = clara.Reader.index

    def another_run_finishes_first(reader, chunks, progress=""):  # a second `index` on the same --out, faster
        (tmp_path / "idx").mkdir()
        (tmp_path / "idx" / "index.json").write_text("{}")
        return index(reader, chunks, progress)

    monkeypatch.setattr(clara.Reader, "index", another_run_finishes_first)
    code, _, err = main_cli(capsys, "index", "--data", tmp_path / "chunks.jsonl", "--adapters", tiny_sft_run,
                            "--out", tmp_path / "idx")
    assert_one_line(code, err, f"--out {tmp_path / 'idx'}: already holds files")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunks.jsonl", "idx"]  # no .idx.*.tmp left
    assert (tmp_path / "idx" / "index.json").read_text() == "{}"  # the other run's index, untouched


def test_a_run_that_ends_before_its_first_checkpoint_leaves_nothing_behind(tmp_path, tiny_model_folder, capsys):
    tiny = ["--model", tiny_model_folder, "--doc-max-len", 32, "--compression-rate", 8]
    code, _, err = main_cli(capsys, "compress", "--pdf", "data/sample.pdf", *tiny, "--max-len", 6, "--chunks-out",
                            tmp_path / "chunks.jsonl", "--out", tmp_path / "c")  # refused after the PDF was chunked
    assert_one_line(code, err, "no record can hold even one document's 4 memory slots in --max-len 6")
    assert not (tmp_path / "c").exists() and not (tmp_path / "chunks.jsonl").exists()
    code, _, err = main_cli(capsys, "sft", "--data", "data/sft.jsonl", *tiny, "--lr", 1e30, "--steps", 3,
                            "--out", tmp_path / "nan")  # stopped by a non-finite update after metrics.jsonl
    assert code == 1 and "is not finite; nothing was saved; run again with a lower --lr" in err, err
    assert not (tmp_path / "nan").exists()  # so the fixed command runs as it is, no --resume or --overwrite needed
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "notes.txt").write_text("mine")  # a folder of the user's: only the run's files go
    code, _, err = main_cli(capsys, "sft", "--data", "data/sft.jsonl", *tiny, "--lr", 1e30, "--steps", 3,
                            "--out", tmp_path / "earlier")
    assert code == 1 and folder_bytes(tmp_path / "earlier") == {"notes.txt": b"mine"}, err

    def full_disk(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(clara.WriteFailed, match=r"new.json: could not be written \(No space left on device\); "
                       "nothing was written$"):  # not "the previous version is intact": there was none
        clara.save_atomically(tmp_path / "new.json", full_disk)


def test_edited_run_and_index_folders_are_one_line_naming_the_file_and_field(tmp_path, tiny_sft_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_sft_run, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "doc_max_len": "32"}))
    (tmp_path / "doc.txt").write_text("The sky is blue.")
    message = f"{run / 'config.json'}: field 'doc_max_len' must be an integer, got \"32\""
    for args in (["ask", "--adapters", run, "--docs", tmp_path / "doc.txt", "--question", "q"],
                 ["eval", "--adapters", run, "--data", "data/sft.jsonl"],
                 ["sft", "--data", "data/sft.jsonl", "--init", run, "--out", tmp_path / "next"]):
        assert_one_line(*main_cli(capsys, *args)[::2], message)
    with pytest.raises(clara.InputError, match=re.escape(message)):
        clara.load(run)
    arrays, metadata = clara.read_checkpoint(tiny_sft_run / clara.CHECKPOINT)
    mx.save_safetensors(str(run / clara.CHECKPOINT), arrays, metadata={**metadata, "step": "two"})
    code, _, err = main_cli(capsys, "sft", "--data", "data/sft.jsonl", "--steps", 3, "--resume", run)
    assert_one_line(code, err, "checkpoint.safetensors: metadata 'step' must be an integer, got 'two'")
    code, _, err = main_cli(capsys, "sft", "--data", "data/sft.jsonl", "--memory-limit", 1e12, "--out", tmp_path / "m")
    assert_one_line(code, err, "--memory-limit is in GB and at most 1048576")

    chunks = [{"text": f"Chunk {i} says the sky is blue.", "source": "notes.txt", "pages": [i + 1]} for i in range(6)]
    (tmp_path / "chunks.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chunks))
    (tmp_path / "here").mkdir()
    os.chdir(tmp_path / "here")  # --out . : the empty folder it is run in
    try:
        code, _, err = main_cli(capsys, "index", "--data", tmp_path / "chunks.jsonl", "--adapters", tiny_sft_run,
                                "--out", ".")
    finally:
        os.chdir(ROOT)
    assert code == 0 and (tmp_path / "here" / "index.json").is_file(), err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    index = tmp_path / "here"
    for name, edit, message in [
            ("chunks.jsonl", lambda c: [{**c[0], "pages": 3}, *c[1:]], "chunks.jsonl:1: field 'pages' must be a list"),
            ("chunks.jsonl", lambda c: [{**c[0], "source": None}, *c[1:]], "chunks.jsonl:1: field 'source' must be"),
            ("chunks.jsonl", lambda c: c[1:], "its parts disagree: memory (6, 4, 64), keys (6, 256), 5 chunk(s)"),
            ("index.json", lambda info: {**info, "fingerprint": 7}, "field 'fingerprint' must be a string")]:
        edited = tmp_path / f"edited-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(index, edited)
        if name == "chunks.jsonl":
            rows = edit([json.loads(line) for line in (index / name).read_text().splitlines()])
            (edited / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            (edited / name).write_text(json.dumps(edit(json.loads((index / name).read_text()))))
        code, _, err = main_cli(capsys, "ask", "--index", edited, "--question", "q")
        assert_one_line(code, err, message)


BAD_SINCE_ISSUE_41 = [
    (["ask", "--docs", "{tmp}/blank.txt", "--question", "q"], "blank.txt: the document is empty"),
    (["ask", "--docs", "{tmp}/doc.txt", "--question", " "], "--question: a question must be a non-empty string"),
    (["ask", "--index", "{tmp}/index", "--docs", "{tmp}/doc.txt", "--question", "q"], "--docs does not go with it"),
    (["ask", "--docs", "{tmp}/doc.txt", "--retrieval", "dense", "--question", "q"], "--retrieval goes with --index"),
    (["sft", "--data", "{tmp}/split.jsonl", "--out", "{tmp}/out"], "split.jsonl:2: field 'split' must be \"train\""),
    (["sft", "--data", "data/sft.jsonl", "--pad-to", "-5", "--out", "{tmp}/out"], "--pad-to must be 0"),
    (["sft", "--data", "data/sft.jsonl", "--lora-layers", "some", "--out", "{tmp}/out"],
     "--lora-layers: a number of blocks or 'all', got 'some'"),
    (["eval", "--data", "data/sft.jsonl", "--max-records", "-1"], "--max-records must be 0 (all) or positive"),
    (["eval", "--data", "{tmp}/e2e.jsonl"], "e2e.jsonl:1: 2 candidate document(s) in 'docs', but --top-k 5"),
    (["index", "--data", "{tmp}/pages.jsonl", "--out", "{tmp}/out"], "pages.jsonl:1: field 'pages' must be a list"),
    (["index", "--data", "{tmp}/source.jsonl", "--out", "{tmp}/out"], "source.jsonl:1: field 'source' must be a"),
]


@pytest.mark.parametrize("args, message", BAD_SINCE_ISSUE_41)
def test_input_once_accepted_is_refused_in_one_line(tmp_path, tiny_sft_run, capsys, args, message):
    good = {"question": "q", "docs": ["d"], "answer": "a"}
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    (tmp_path / "doc.txt").write_text("The sky is blue.")
    (tmp_path / "split.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "split": "Eval"}) + "\n")
    (tmp_path / "e2e.jsonl").write_text(json.dumps({**good, "docs": ["d", "e"], "pos_index": [1]}) + "\n")
    (tmp_path / "pages.jsonl").write_text(json.dumps({"text": "t", "pages": 3}) + "\n")
    (tmp_path / "source.jsonl").write_text(json.dumps({"text": "t", "source": None}) + "\n")
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "index.json").write_text(json.dumps({"adapters": str(tiny_sft_run)}))
    args = [a.format(tmp=tmp_path) for a in args]
    if args[0] in ("ask", "eval", "index"):
        args += ["--adapters", str(tiny_sft_run)]
    code, _, err = main_cli(capsys, *args)
    assert code == 2 and "Traceback" not in err and message in err.splitlines()[-1], err
    assert not (tmp_path / "out").exists()


def test_a_question_that_pushes_the_memory_out_of_max_len_is_answered_with_a_warning(tiny_sft_run, capsys):
    reader = clara.load(tiny_sft_run, max_len=40)
    capsys.readouterr()
    assert isinstance(reader.ask("Why " * 60, docs=["The sky is blue."], max_new_tokens=1), str)
    assert "1 of 1 document(s) lost memory slots: the question and prompt do not fit --max-len 40" in \
        capsys.readouterr().err
    reader.ask("Why?", docs=["The sky is blue."], max_new_tokens=1)
    assert "lost memory slots" not in capsys.readouterr().err


def test_a_non_finite_stage_3_update_names_the_temperature_beside_the_learning_rate(tmp_path):
    assert "a lower --lr or a higher --temperature" in clara.RunFiles(tmp_path / "e", command="e2e").advice(True)
    assert "--temperature" not in clara.RunFiles(tmp_path / "s", command="sft").advice(True)


ROUND_41_OPTIONS = [
    (["sft", "--data", "data/sft.jsonl", "--out", ""], "--out is empty: give a path"),
    (["compress", "--data", "{tmp}/text.jsonl", "--chunks-out", "{tmp}/chunks.jsonl", "--out", "{tmp}/out"],
     "--chunks-out goes with --pdf"),
    (["sft", "--data", "data/sft.jsonl", "--lr", "1e-320", "--out", "{tmp}/out"], "(float32 computes it as 0)"),
    (["sft", "--data", "data/sft.jsonl", "--lora-layers", "50", "--model", "{model}", "--out", "{tmp}/out"],
     "--lora-layers 50 is more than the model's 2 blocks"),
]


@pytest.mark.parametrize("args, message", ROUND_41_OPTIONS)
def test_options_the_round_of_issue_41_found_accepted_are_refused_in_one_line(tmp_path, tiny_sft_run,
                                                                             tiny_model_folder, capsys, args, message):
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": "a chunk"}) + "\n")
    fill = {"tmp": tmp_path, "model": tiny_model_folder, "run": tiny_sft_run}
    code, _, err = main_cli(capsys, *[a.format(**fill) for a in args])
    assert_one_line(code, err, message.format(**fill))
    assert not (tmp_path / "out").exists() and not (tmp_path / "chunks.jsonl").exists()


def test_a_finished_run_resumes_as_a_no_op_and_an_edited_checkpoint_or_metrics_file_is_no_bug(tmp_path, tiny_sft_run,
                                                                                            capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_sft_run, run)
    before = folder_bytes(run)
    for steps in ([], ["--steps", 1]):  # its own --steps 2, or fewer
        code, out, err = main_cli(capsys, "sft", "--data", "data/sft.jsonl", "--resume", run, *steps)
        assert code == 0 and "the checkpoint is at step 2" in out and "nothing left to train" in out, err
        assert folder_bytes(run) == before and "saved" not in out
    arrays, metadata = clara.read_checkpoint(run / clara.CHECKPOINT)
    without_optimizer = {name: value for name, value in arrays.items() if name.startswith("model.")}
    mx.save_safetensors(str(run / clara.CHECKPOINT), without_optimizer, metadata=metadata)
    code, _, err = main_cli(capsys, "sft", "--data", "data/sft.jsonl", "--steps", 3, "--resume", run)
    assert code == 2 and "error: --resume: the checkpoint's optimizer state (0 arrays) does not fit this model's" in \
        err.splitlines()[-1], err  # after the warning that the sample's documents are cut to 32 tokens
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": "x"}\n[1]\n"text"\n{"step": 2}\n{"step": 3}\n')
    clara.MetricsLog(run, keep_until=2)  # a resume keeps the rows up to its step and drops lines edited into others
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_byte_order_mark_is_no_text_and_eval_scores_each_context_once(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "t"}).encode() + b"\r\n")
    assert clara.read_jsonl(tmp_path / "bom.jsonl") == [(1, {"text": "t"})]
    records = [{"positives": []}]
    assert clara.eval_contexts(records, ["none", "text", "none"], "--contexts") == (False, ("none", "text"))
    assert clara.eval_contexts(records, "none", "contexts") == (False, ("none",))  # a string is one context


API_MISTAKES = [
    (lambda r: r.ask("q", docs="one document"), "docs: expected a list of documents (strings), got one string"),
    (lambda r: r.ask(None, docs=["d"]), "question: a question must be a non-empty string, got None"),
    (lambda r: r.ask(5, docs=["d"]), "question: a question must be a non-empty string, got 5"),
    (lambda r: r.ask("q", docs=["d", " "]), "docs[1]: the document is empty (no text to compress)"),
    (lambda r: r.ask("q", docs=["d"], max_new_tokens=0), "max_new_tokens must be a positive integer, got 0"),
    (lambda r: r.ask("q", memory=mx.zeros((2, 3))), "memory: expected memory vectors of shape (documents, 4, 64)"),
    (lambda r: r.ask("q", memory=mx.zeros((1, 4, 64), dtype=mx.int32)), "memory: expected memory vectors of shape"),
    (lambda r: r.index([]), "chunks: expected a non-empty list"),
    (lambda r: r.index([{"text": "t", "pages": 3}]), "chunks[0]: field 'pages' must be a list of page numbers"),
    (lambda r: r.evaluate([]), "records: expected a non-empty list of records to score"),
    (lambda r: r.evaluate([{"question": "q", "docs": ["d"]}]), "records[0]: missing field 'answer'"),
    (lambda r: r.evaluate([{"question": "q", "docs": ["d"], "gold": "a"}], ["retrieved"]),
     "contexts retrieved: not for stage 2 records"),
    (lambda r: r.ask_index({"memory": 1}, "q"), "index: expected what index() or clara.read_index returns"),
    (lambda r: r.ask_index({"memory": 1}, "q", context="memory"), "context must be 'compressed' or 'text', got"),
    (lambda r: r.ask("q", docs=["d"], context="none"), "context must be 'compressed' or 'text', got 'none'"),
    (lambda r: clara.load(r.adapters, top_k="3"), "load(): field 'top_k' must be an integer, got \"3\""),
    (lambda r: clara.load(r.adapters, topk=3), "load(): no option 'topk'"),
    (lambda r: clara.load(r.adapters, overwrite=True), "load(): no option 'overwrite' (it belongs to a training"),
    (lambda r: clara.load(r.adapters, top_k=0), "--top-k must be positive, got 0"),
]


@pytest.fixture(scope="module")
def tiny_reader(tiny_sft_run):
    reader = clara.load(tiny_sft_run)
    reader.adapters = tiny_sft_run
    return reader


@pytest.mark.parametrize("call, message", API_MISTAKES)
def test_the_python_api_raises_input_error_with_the_clis_one_line_messages(tiny_reader, call, message):
    with pytest.raises(clara.InputError) as raised:
        call(tiny_reader)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_make_installs_openblas_as_root_or_prints_the_command_that_does(tmp_path):
    # CLARA_NO_BLAS=1 makes clara.py ignore any OpenBLAS; APT=false stands for an apt-get that cannot install
    run = subprocess.run(["make", "-s", "blas", "APT=false"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "CLARA_NO_BLAS": "1"}, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1].endswith("fix it with: sudo apt-get install libopenblas0-pthread "
                                                        "(Fedora: sudo dnf install openblas)")
    quiet = subprocess.run(["make", "-s", "blas"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (quiet.stdout == "") == ("reference" not in clara.BLAS)  # nothing to say where OpenBLAS is loaded


def test_the_blas_label_says_reference_when_mlx_was_imported_before_clara():
    code = "import mlx.core, clara; print(clara.BLAS)"  # too late for OpenBLAS: the label must not claim it
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "reference" in run.stdout and "import clara before mlx" in run.stdout, run.stderr


def test_an_unexpected_error_is_one_line_exit_1_with_the_traceback_in_a_file(monkeypatch, capsys):
    def broken(cfg, args, trained, checkpoint):
        raise RuntimeError("a bug deep inside")

    monkeypatch.setitem(clara.COMMANDS, "eval", broken)
    monkeypatch.delenv("CLARA_DEBUG", raising=False)
    assert clara.main(["eval", "--adapters", str(ROOT / "no-such-run"), "--data", "data/sft.jsonl"]) == 2  # input first
    monkeypatch.setattr(clara, "read_trained", lambda path: ({}, None))
    assert clara.main(["eval", "--adapters", "x", "--data", "data/sft.jsonl"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unexpected RuntimeError: a bug deep inside" in err
    report = Path(err.split("traceback is in ")[1].split(";")[0])
    assert "Traceback" in report.read_text() and "a bug deep inside" in report.read_text()
    monkeypatch.setenv("CLARA_DEBUG", "1")
    with pytest.raises(RuntimeError):
        clara.main(["eval", "--adapters", "x", "--data", "data/sft.jsonl"])


def test_running_out_of_device_memory_is_one_line_that_names_the_options_that_fit_the_step(monkeypatch, capsys):
    def too_big(cfg, args, trained, checkpoint):  # the words MLX's CUDA backend uses (measured on an H100)
        raise RuntimeError("cudaMallocAsync(&data, size, stream) failed: out of memory")

    monkeypatch.setitem(clara.COMMANDS, "eval", too_big)
    monkeypatch.setattr(clara, "read_trained", lambda path: ({}, None))
    monkeypatch.delenv("CLARA_DEBUG", raising=False)
    assert clara.main(["eval", "--adapters", "x", "--data", "data/sft.jsonl"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ran out of memory" in err[0] and "--batch-size" in err[0] and "--memory-limit" in err[0]
    assert "unexpected" not in err[0] and "traceback" not in err[0]


def test_a_closed_standard_output_stops_the_reports_not_the_training(tmp_path, tiny_model_folder):
    process = start_cli("sft", "--data", "data/sft.jsonl", "--model", tiny_model_folder, "--doc-max-len", 32,
                        "--compression-rate", 8, "--steps", 30, "--out", tmp_path / "run")
    process.stdout.readline()  # like `| head -1`
    process.stdout.close()
    assert process.wait(timeout=300) == 0
    assert "Traceback" not in process.stderr.read()
    assert clara.read_checkpoint(tmp_path / "run" / clara.CHECKPOINT)[1]["step"] == "30"


def test_kill_9_at_any_moment_never_leaves_a_checkpoint_that_fails_to_load(tmp_path, tiny_model_folder):
    rng = np.random.default_rng(0)
    common = ["--data", "data/sft.jsonl", "--model", tiny_model_folder, "--doc-max-len", 32, "--compression-rate", 8,
              "--out", tmp_path / "run", "--save-every", 1, "--eval-every", 1000, "--steps", 1000]
    model = tiny_clara(tiny_config(doc_max_len=32, compression_rate=8, lora_rank=16, lora_layers=-1))
    for round_ in range(4):
        resume = ["--resume", tmp_path / "run"] if (tmp_path / "run" / clara.CHECKPOINT).exists() else []
        process = start_cli("sft", *common, *resume)
        reports = (line for line in process.stdout if line.startswith("step "))
        next(reports), next(reports)  # a second report: the first step's checkpoint is on disk
        time.sleep(rng.uniform(0.0, 1.5))  # then kill at a random moment: mid-step, mid-save, anywhere
        process.kill()
        process.wait()
        arrays, metadata = clara.read_checkpoint(tmp_path / "run" / clara.CHECKPOINT)
        clara.load_trained(model, clara.checkpoint_part(arrays, "model."))
        assert int(metadata["step"]) >= 1


def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint_and_whole_metrics(tmp_path, tokenizer,
                                                                                         monkeypatch):
    import errno

    cfg = tiny_config(steps=4, save_every=1, eval_every=1000)
    examples = clara.sft_examples(tokenizer, cfg, SFT_RECORDS)
    clara.train(tiny_clara(cfg), examples, replace(cfg, steps=2), tokenizer.pad_token_id, clara.RunFiles(tmp_path))
    before = (tmp_path / clara.CHECKPOINT).read_bytes()
    real_save = mx.save_safetensors

    def full_disk(path, arrays, metadata=None):
        with open(path, "wb") as f:  # half a file, then the disk is full
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(clara.mx, "save_safetensors", full_disk)
    checkpoint = clara.read_checkpoint(tmp_path / clara.CHECKPOINT)
    with pytest.raises(clara.WriteFailed, match="checkpoint.safetensors: could not be written \\(No space left"):
        clara.train(tiny_clara(cfg), examples, cfg, tokenizer.pad_token_id, clara.RunFiles(tmp_path, checkpoint))
    monkeypatch.setattr(clara.mx, "save_safetensors", real_save)
    assert (tmp_path / clara.CHECKPOINT).read_bytes() == before  # the last good checkpoint, whole
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]  # and no temp file left behind
    log = clara.MetricsLog(tmp_path, keep_until=10)
    with open(log.path, "a") as f:
        f.write('{"kind": "train", "st')  # a line torn by an earlier crash
    monkeypatch.setattr(clara.os, "write", lambda fd, data: os.pwrite(fd, data[:5], os.lseek(fd, 0, os.SEEK_END)))
    with pytest.raises(clara.WriteFailed, match="metrics.jsonl: could not be written"):
        log.write({"kind": "train", "step": 3})  # a short write: cut back off, no torn line added
    monkeypatch.undo()
    lines = log.path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines[:-1]] == [1, 2, 3]
    clara.MetricsLog(tmp_path, keep_until=2)  # a resume drops the torn line instead of crashing
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")
def test_a_real_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, tiny_model_folder):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        common = ["--data", "data/sft.jsonl", "--model", tiny_model_folder, "--doc-max-len", 32, "--compression-rate",
                  8, "--out", disk / "run", "--save-every", 1, "--eval-every", 1000]
        assert run_cli("sft", *common, "--steps", 1).returncode == 0
        checkpoint = (disk / "run" / clara.CHECKPOINT).read_bytes()
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - len(checkpoint) // 2))  # room for half a checkpoint
        run = run_cli("sft", *common, "--steps", 20, "--resume", disk / "run")
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        last = run.stderr.splitlines()[-1]  # after the warning that the sample's documents are cut to 32 tokens
        assert "checkpoint.safetensors: could not be written (No space left on device" in last, run.stderr
        assert (disk / "run" / clara.CHECKPOINT).read_bytes() == checkpoint  # the last good one, whole
        assert not [p.name for p in (disk / "run").iterdir() if ".tmp" in p.name]  # no temp file left behind
        rows = [json.loads(line) for line in (disk / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r["kind"] == "train"][:2] == [1, 2]  # whole lines only
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_write_that_dies_halfway_leaves_the_previous_file_whole(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    mx.save_safetensors(str(path), {"w": mx.ones(3)})

    def dies_halfway(tmp):
        tmp.write_bytes(path.read_bytes()[:10])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        clara.save_atomically(path, dies_halfway)
    assert mx.array_equal(mx.load(str(path))["w"], mx.ones(3))


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                           max_leaves=8)
FIELDS = ["question", "docs", "context", "content", "gold_answer", "answer", "answers", "golden_answers", "text"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), JSON_VALUES | st.lists(st.text(), max_size=3),
                       max_size=5))
def test_record_parsers_return_a_valid_record_or_raise_input_error_for_any_json_object(obj):
    for parse in (clara.parse_sft_record, clara.parse_compress_record):
        try:
            record = parse(obj, "fuzz.jsonl:1")
        except clara.InputError as e:
            assert str(e).startswith("fuzz.jsonl:1: ")
            continue
        texts = [record["question"], record["answer"], *record["docs"]] if "docs" in record else \
            [record["doc"], record["target"]]
        assert all(isinstance(t, str) and t.strip() for t in texts)


# -----------------------------------------------------------------------------
# the evidence experiment (data/experiment.py), at test size on the tiny model


def test_fictional_documents_hold_their_answers_and_evaluation_documents_are_never_trained_on(tmp_path):
    sys.path.insert(0, str(ROOT / "data"))
    import make_facts

    make_facts.write_all(tmp_path, train_docs=30, eval_docs=25, code_docs=40, code_eval=5)
    read = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    stage1, stage2, stage3, code, names = (read(f"{n}.jsonl") for n in ("stage1", "stage2", "stage3", "code_task",
                                                                         "name_task"))
    trained_docs = {r["docs"][0] for r in stage1 if r.get("split") != "eval"}
    assert len(trained_docs) == 30 and len(stage1) == 2 * (30 + 25)
    for r in stage2 + stage3:
        relevant = r["docs"][r["pos_index"][0]] if "pos_index" in r else next(d for d in r["docs"] if r["answer"] in d)
        assert r["answer"] in relevant  # every answer is a span of its document
        assert (relevant in trained_docs) == (r.get("split") != "eval")  # and eval documents are never trained on
        assert all((d in trained_docs) == (r.get("split") != "eval") for d in r["docs"])  # nor their distractors
    assert len(stage3[0]["docs"]) == 20 and {len(r["docs"]) for r in stage2} == {3}
    assert {r["question"] for r in code} == {"What is the code in the background?"}
    assert all(r["answer"] in r["docs"][0] for r in code)
    assert not {r["docs"][0] for r in code if r.get("split") == "eval"} & \
        {r["docs"][0] for r in code if r.get("split") != "eval"}
    assert {r["question"] for r in names} == {make_facts.NAME_QUESTION} and len(names) == 30 + 25
    assert all(r["answer"] in r["docs"][0] and r["answer"] not in r["question"] for r in names)
    assert all((r["docs"][0] in trained_docs) == (r.get("split") != "eval") for r in names)
    make_facts.write_all(tmp_path / "again", train_docs=30, eval_docs=25, code_docs=40, code_eval=5)
    assert (tmp_path / "again" / "stage3.jsonl").read_bytes() == (tmp_path / "stage3.jsonl").read_bytes()


def test_passage_records_copy_their_question_from_the_marked_chunk_only_and_hold_out_whole_modules(tmp_path):
    sys.path.insert(0, str(ROOT / "data"))
    import make_passages

    options = dict(candidates=6, max_chunks=30, chunks_out=tmp_path / "chunks.jsonl")
    make_passages.write_passages(tmp_path / "p.jsonl", **options)
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert records and {len(r["docs"]) for r in records} == {6}
    for r in records:
        (position,) = r["pos_index"]
        assert r["question"] in r["docs"][position]  # copied verbatim from the marked chunk
        assert sum(r["question"] in d for d in r["docs"]) == 1  # and from no other candidate
    modules = {split: {r["answer"] for r in records if (r.get("split") == "eval") == (split == "eval")}
               for split in ("train", "eval")}
    assert modules["train"] and modules["eval"] and not modules["train"] & modules["eval"]
    chunk_texts = {json.loads(line)["text"] for line in (tmp_path / "chunks.jsonl").read_text().splitlines()}
    assert {d for r in records for d in r["docs"]} <= chunk_texts
    make_passages.write_passages(tmp_path / "again.jsonl", **options)
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "p.jsonl").read_bytes()
    with pytest.raises(ValueError, match="--eval-every >= 2"):
        make_passages.write_passages(tmp_path / "bad.jsonl", eval_every=1)
    assert not (tmp_path / "bad.jsonl").exists()


def write_texts(path, sources=24):
    """A data/local_prose.py file of invented manuals: eight paragraphs of six sentences each."""
    words = "river stone garden window letter market summer bridge lantern orchard harbour meadow".split()
    rng = random.Random("texts")
    texts = [{"source": f"manual-{k}", "text": "\n\n".join(
        " ".join(f"The {rng.choice(words)} of part {k}.{p}.{i} keeps the {rng.choice(words)} near the "
                 f"{rng.choice(words)} and the {rng.choice(words)}." for i in range(6)) for p in range(8))}
             for k in range(sources)]
    path.write_text("".join(json.dumps(t) + "\n" for t in texts))


def test_passages_from_a_texts_file_hold_out_whole_sources_and_draw_hard_candidates_from_their_own(tmp_path):
    sys.path.insert(0, str(ROOT / "data"))
    import local_prose
    import make_passages

    info = ("File: x.info,  Node: Top,  Next: Intro\n\nIntro\n*****\n\n* Menu:\n\n* Intro::   the start\n\n"
            "   The tool reads a file\nand writes it back.\n\n     an example, indented\n     as code is\n")
    assert local_prose.info_paragraphs(info) == ["The tool reads a file and writes it back."]
    write_texts(tmp_path / "texts.jsonl")
    make_passages.write_passages(tmp_path / "p.jsonl", candidates=6, eval_every=4, texts=tmp_path / "texts.jsonl",
                                 same_source=3, chunks_out=tmp_path / "chunks.jsonl")
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    chunks = [json.loads(line) for line in (tmp_path / "chunks.jsonl").read_text().splitlines()]
    source = {c["text"]: c["source"] for c in chunks}
    assert records and {len(r["docs"]) for r in records} == {6}
    for r in records:
        (position,) = r["pos_index"]
        assert sum(r["question"] in d for d in r["docs"]) == 1 and r["question"] in r["docs"][position]
        own = source[r["docs"][position]]  # every source here has more than 3 chunks: 3 siblings at least
        assert sum(source[d] == own for d in r["docs"]) >= 4 and r["answer"] == own
    held_out = {split: {r["answer"] for r in records if (r.get("split") == "eval") == split} for split in (True, False)}
    assert held_out[True] and held_out[False] and not held_out[True] & held_out[False]


def test_the_shipped_recipes_data_never_trains_on_its_evaluation_or_heldout_documents(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "data"))
    import ship

    monkeypatch.setattr(ship, "TRAIN_DOCS", 40)
    monkeypatch.setattr(ship, "EVAL_DOCS", 10)
    monkeypatch.setattr(ship, "MIX_DOCS", 5)
    monkeypatch.setattr(ship, "STAGE3_DOCS", 30)
    write_texts(tmp_path / "prose.jsonl", sources=60)  # 6 held out: enough chunks for 20 candidates
    ship.write_data(tmp_path, prose=tmp_path / "prose.jsonl")
    read = lambda name: [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]  # noqa: E731
    stage1, stage2, heldout, mix = (read(n) for n in ("stage1", "stage2", "heldout", "mix"))
    stage3, code, names = (read(n) for n in ("stage3", "code_task", "name_task"))
    trained = {d for r in stage1 + stage2 if r.get("split") != "eval" for d in r["docs"]}
    assert len({r["docs"][0] for r in stage1 if r.get("split") != "eval"}) == 40
    assert len(stage2) == 40 * ship.QUESTIONS_PER_DOC + 10 * 8 and len(mix) == 5
    for r in stage2 + heldout:
        assert r["answer"] in next(d for d in r["docs"] if r["answer"] in d) and len(r["docs"]) == 3
        assert all((d in trained) == (r.get("split") != "eval") for d in r["docs"])
    assert all(r.get("split") == "eval" for r in heldout) and not {d for r in heldout for d in r["docs"]} & trained
    assert {r["docs"][0] for r in mix} <= trained and all(r["data_type"] == "qa" for r in mix)
    assert len(stage3) == 30 * ship.QUESTIONS_PER_DOC + len(heldout)  # stage 3: the marked candidate holds the answer
    for r in stage3:
        assert len(r["docs"]) == ship.CANDIDATES and r["answer"] in r["docs"][r["pos_index"][0]]
        assert all((d in trained) == (r.get("split") != "eval") for d in r["docs"])
    assert {d for r in stage3 if r.get("split") == "eval" for d in r["docs"]} == {r["docs"][0] for r in names}
    assert [r["question"] for r in stage3 if r.get("split") == "eval"] == [r["question"] for r in heldout]
    assert all(r.get("split") == "eval" and r["answer"] in r["docs"][0] for r in names) and len(names) == 200
    assert sum(r.get("split") == "eval" for r in code) == ship.CODE_EVAL and len(code) == ship.CODE_DOCS
    assert all(r["answer"] in r["docs"][0] for r in code)
    passages, val = read("prose-passages"), read("prose-val")  # the query reasoner's, from real text
    assert passages and val == [r for r in passages if r.get("split") == "eval"][:ship.VAL_PASSAGES]
    script = subprocess.run([sys.executable, str(ROOT / "data" / "ship.py"), "script", "--out", tmp_path / "r"],
                            capture_output=True, text=True, check=True).stdout
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # a script bash can run
    assert f"R={tmp_path / 'r'};" in script and "for base in none text" in script and "--lora-keys all" in script
    assert "--init $R/$2 --init-generator --stage1-data $R/mix.jsonl" in script and "--retrieval-loss contrastive" \
        in script and "score s2 $R/heldout.jsonl compressed e1" in script and "timeout -s TERM" in script
    assert "e2e --data $R/prose-passages.jsonl --init $R/s2 --retrieval-loss contrastive --steps $S3" in script
    assert "stages 16 s1 s2" in script and "for rate in 4 32" in script and "score s1 $R/name_task.jsonl" in script
    assert "train code sft --data $R/code_task.jsonl --init $R/s1" in script and "e2e --data $R/stage3.jsonl" in script
    levers = subprocess.run([sys.executable, str(ROOT / "data" / "ship.py"), "levers", "--out", tmp_path / "r"],
                            capture_output=True, text=True, check=True).stdout
    assert subprocess.run(["bash", "-n"], input=levers, text=True).returncode == 0
    assert "--compression-rate 4 " in levers and "--compression-rate 8 " in levers and "--lora-keys all" in levers
    assert levers.count("; facts x") == 3 and "memory_facts.py --adapters $R/$1" in levers  # each run ends checked


def write_squad_and_qed(folder, articles=40):
    """A tiny SQuAD file in the official format (gzipped) and a QED file: every paragraph names its article, one long
    paragraph has an answer past MAX_CHARS, and one QED paragraph belongs to a SQuAD article (same title)."""
    sentence = "The {what} of article {k} part {j} is {value}."
    data = []
    for k in range(articles):
        paragraphs = []
        for j in range(3):
            facts = [("colour", f"colour{k}x{j}"), ("river", f"river{k}x{j}")]
            text = " ".join(sentence.format(what=w, k=k, j=j, value=v) for w, v in facts)
            if k == 0 and j == 0:  # the long one: its second answer lies past the cut
                text = sentence.format(what="colour", k=k, j=j, value=facts[0][1]) + " Filler words go on." * 60 + \
                    " " + sentence.format(what="river", k=k, j=j, value=facts[1][1])
            qas = [{"question": f"What is the {w} of article {k} part {j}?", "id": f"q{k}-{j}-{w}",
                    "answers": [{"text": v, "answer_start": text.index(v)}]} for w, v in facts]
            paragraphs.append({"context": text, "qas": qas})
        data.append({"title": f"Article_{k}", "paragraphs": paragraphs})
    with gzip.open(folder / "squad.json.gz", "wt") as f:
        json.dump({"version": "1.1", "data": data}, f)
    qed = [{"paragraph_text": f"The bell of article {k} part 9 is bell{k}.", "question_text": f"bell of article {k}",
            "title_text": f"Article {k}", "answer_text": json.dumps([f"bell{k}"]) if k % 2 else [f"bell{k}"]}
           for k in range(articles)]
    (folder / "qed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qed))


def test_real_qa_records_hold_out_whole_articles_and_every_answer_is_in_what_the_compressor_reads(tmp_path,
                                                                                                   monkeypatch):
    sys.path.insert(0, str(ROOT / "data"))
    import make_wiki

    for name, value in (("VAL_SHARE", 0.2), ("TEST_SHARE", 0.3), ("CANDIDATES", 6), ("SAME_ARTICLE", 2)):
        monkeypatch.setattr(make_wiki, name, value)
    write_squad_and_qed(tmp_path)
    make_wiki.write_all(tmp_path / "w", squad=tmp_path / "squad.json.gz", nq=tmp_path / "qed.jsonl")
    read = lambda name: [json.loads(line) for line in (tmp_path / "w" / f"{name}.jsonl").read_text().splitlines()]  # noqa: E731
    article = lambda text: re.search(r"article (\d+) part", text).group(1)  # noqa: E731
    stage1, stage2, stage3 = read("stage1"), read("stage2"), read("stage3")
    tests = {name: read(name) for name in ("test-squad", "test-nq", "test-squad-stage3", "test-nq-stage3")}
    by_split = {"train": set(), "val": set(), "test": set()}
    for records, split in ((stage1 + stage2 + stage3, None), ([r for t in tests.values() for r in t], "test")):
        for r in records:
            by_split[split or ("val" if r.get("split") == "eval" else "train")] |= {article(d) for d in r["docs"]}
    assert all(by_split.values()) and not any(by_split[a] & by_split[b] for a, b in
                                              (("train", "val"), ("train", "test"), ("val", "test")))
    assert all(r.get("split") == "eval" for t in tests.values() for r in t)
    for r in stage2 + stage3 + [r for t in tests.values() for r in t]:
        own = r["docs"][r["pos_index"][0]] if "pos_index" in r else next(d for d in r["docs"] if r["answer"] in d)
        assert r["answer"] in own and len(own) <= make_wiki.MAX_CHARS  # the answer is in what the compressor reads
        assert len(r["docs"]) == (make_wiki.CANDIDATES if "pos_index" in r else make_wiki.DISTRACTORS + 1)
        same = sum(article(d) == article(own) for d in r["docs"]) - 1  # SQuAD: both others of its article
        assert same == 2 or "bell" in own  # NQ (one paragraph an article): others of its source
    docs = {d for r in stage1 + stage2 + [r for t in tests.values() for r in t] for d in r["docs"]}
    (cut,) = [d for d in docs if "article 0 part 0 is colour" in d]
    assert cut.endswith("Filler words go on.") and len(cut) <= make_wiki.MAX_CHARS  # cut at a sentence end
    questions = [q for r in stage1 if r["data_type"] == "qa" for q in r["question"]] + \
        [r["question"] for t in tests.values() for r in t]
    assert "What is the river of article 0 part 0?" not in questions  # its answer was past the cut: dropped
    assert "What is the colour of article 0 part 0?" in questions
    assert all(r["answers"] == r["docs"] for r in stage1 if r["data_type"] == "paraphrase")
    assert {r["answer"] for r in tests["test-nq"]} == {r["answer"] for r in tests["test-nq-stage3"]} > set()
    make_wiki.write_all(tmp_path / "again", squad=tmp_path / "squad.json.gz", nq=tmp_path / "qed.jsonl")
    assert all((tmp_path / "again" / f.name).read_bytes() == f.read_bytes() for f in (tmp_path / "w").iterdir())
    mix = read("mix")
    assert mix and all(r["data_type"] == "qa" and article(r["docs"][0]) in by_split["train"] for r in mix)
    script = subprocess.run([sys.executable, str(ROOT / "data" / "wiki.py"), "script", "--out", tmp_path / "r"],
                            capture_output=True, text=True, check=True).stdout
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # a script bash can run
    assert "make_wiki.py --out $R" in script and "--stage1-data $R/mix.jsonl" in script and "--max-records ${N:-" \
        in script and "stages x4" in script and "--compression-rate 4" in script and "for base in none text" in script \
        and 'stages s1wiki "--init ${PREV:-$R/s2}"' in script
    (tmp_path / "bad.json").write_text('{"data": [{"title": "x"}]}')
    run = subprocess.run([sys.executable, str(ROOT / "data" / "make_wiki.py"), "--out", tmp_path / "b", "--squad",
                          tmp_path / "bad.json", "--nq", ""], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "bad.json: not a SQuAD file" in run.stderr
    assert not (tmp_path / "b").exists()


def test_a_lease_brings_back_each_runs_latest_save_as_bf16_adapters_that_eval_reads(tmp_path, tiny_sft_run):
    """data/lease.sh back (what every lease call ends with): a run's checkpoint, less its optimizer state, comes back
    in parts under 16 MiB as bf16 adapters + config.json at the checkpoint's step, with the runs' logs."""
    runs = tmp_path / "root" / "runs" / "wiki"
    shutil.copytree(tiny_sft_run, runs / "x")
    (runs / "x.log").write_text("step 2/2 | loss 1\n")
    (tmp_path / "out").mkdir()
    env = {**os.environ, "R": str(runs), "OUT": str(tmp_path / "out"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    back = subprocess.run(["bash", str(ROOT / "data" / "lease.sh"), "back"], env=env, capture_output=True, text=True)
    assert back.returncode == 0, back.stderr
    parts = sorted((tmp_path / "out").iterdir())
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    subprocess.run(f"cat {' '.join(map(str, parts))} | tar x", shell=True, cwd=tmp_path, check=True)
    arrays, metadata = clara.read_checkpoint(tiny_sft_run / clara.CHECKPOINT)
    model = clara.checkpoint_part(arrays, "model.")
    came_back = mx.load(str(tmp_path / "runs" / "wiki" / "x" / "clara.safetensors"))
    assert set(came_back) == set(model) and all(v.dtype == mx.bfloat16 for v in came_back.values())
    assert all(mx.array_equal(came_back[k], v.astype(mx.bfloat16)).item() for k, v in model.items())
    config = json.loads((tmp_path / "runs" / "wiki" / "x" / "config.json").read_text())
    assert config["step"] == int(metadata["step"]) == 2 and config["n_mem"] == 4
    subprocess.run(["tar", "xf", "logs.tar"], cwd=tmp_path, check=True)
    assert (tmp_path / "runs" / "wiki" / "x.log").read_text() == "step 2/2 | loss 1\n"
    run = run_cli("eval", "--adapters", tmp_path / "runs" / "wiki" / "x", "--data", "data/sft.jsonl",
                  "--max-records", 2, "--contexts", "compressed", "--max-new-tokens", 2)
    assert run.returncode == 0 and "| compressed" in run.stdout, run.stderr


def test_the_shipped_adapters_answer_from_the_memory_of_documents_no_run_saw():
    """data/adapters/facts (README, Evaluation) on fictional documents of seed 7, which no run trained or tuned on:
    every question is answered from its own document's memory, from another document's and from none. The memory
    issue's bar: F1 from memory at least 3x F1 without documents."""
    sys.path.insert(0, str(ROOT / "data"))
    import make_facts

    documents = make_facts.make_documents(4, 7)
    reader = clara.load(ROOT / "data" / "adapters" / "facts")
    scores = {}
    for name, shift in (("own", 0), ("another", 1)):
        records = [{"question": question, "docs": [documents[i - shift]["text"]], "gold": answer}
                   for i, d in enumerate(documents) for question, answer in d["qa"]]
        scores[name] = reader.evaluate(records, ["compressed", "none"] if shift == 0 else ["compressed"],
                                       max_new_tokens=16)
    own, another, none = scores["own"]["compressed"], scores["another"]["compressed"], scores["own"]["none"]
    assert own["records"] == another["records"] == none["records"] == 32
    assert own["ce"] < 0.6 * another["ce"] and own["f1"] > another["f1"] and own["em"] > 0, (own, another)
    assert own["ce"] < 0.6 * none["ce"] and own["f1"] >= 3 * none["f1"] and own["f1"] >= 0.4, (own, none)


def test_the_shipped_query_reasoner_finds_copied_passages_of_text_it_never_saw_better_than_the_compressor(tmp_path):
    """data/adapters/reasoner (README, Evaluation) is facts plus a query reasoner trained on Debian's prose only:
    its compressor, generator and memory are facts' own, bit for bit, and on the Python standard library's
    docstrings, which it never saw, a passage copied from a chunk finds that chunk more often than with facts,
    whose query reasoner is still its compressor (measured on Python 3.11: first for 47 of 58 against 33)."""
    sys.path.insert(0, str(ROOT / "data"))
    import make_passages
    import pdf_retrieval

    facts, reasoner = (mx.load(str(ROOT / "data" / "adapters" / name / "clara.safetensors"))
                       for name in ("facts", "reasoner"))
    query = {name for name in reasoner if clara.adapter_role(name) == "query"}
    assert query and set(reasoner) - query == set(facts)
    assert all(mx.array_equal(facts[name], reasoner[name]).item() for name in facts)
    make_passages.write_passages(tmp_path / "passages.jsonl", chunks_out=tmp_path / "chunks.jsonl")
    chunks = [json.loads(line) for line in (tmp_path / "chunks.jsonl").read_text().splitlines()][-60:]
    passages = pdf_retrieval.passages(chunks)
    readers = {name: clara.load(ROOT / "data" / "adapters" / name) for name in ("facts", "reasoner")}
    index = readers["reasoner"].index(chunks)  # the same compressor: one index serves both
    first = {name: sum(rank == 0 for rank in pdf_retrieval.ranks(reader, index, passages))
             for name, reader in readers.items()}
    assert len(passages) >= 40 and first["reasoner"] >= first["facts"] + 0.1 * len(passages), (first, len(passages))


def test_the_shipped_wiki_adapters_answer_real_questions_about_articles_no_run_saw_far_better_from_memory():
    """data/adapters/wiki (README, Real documents) on data/wiki-heldout.jsonl: 60 SQuAD and 40 Natural Questions
    questions of articles held out of every run (data/make_wiki.py's test split), each with its own paragraph
    compressed to 16 vectors. From memory the answers score far above no documents (measured: F1 25.2 against 6.0),
    and the memory of another question's paragraph does not do it (the first 40 questions)."""
    records = [json.loads(line) for line in (ROOT / "data" / "wiki-heldout.jsonl").read_text().splitlines()]
    own = [{"question": r["question"], "docs": r["docs"], "gold": r["answer"]} for r in records]
    another = [{**r, "docs": own[i - 1]["docs"]} for i, r in enumerate(own[:40])]  # the previous one's paragraph
    reader = clara.load(ROOT / "data" / "adapters" / "wiki")
    scores = reader.evaluate(own, ["compressed", "none"], max_new_tokens=24)
    shifted = reader.evaluate(another, ["compressed"], max_new_tokens=24)["compressed"]
    memory, none = scores["compressed"], scores["none"]
    assert memory["records"] == none["records"] == 100 and shifted["records"] == 40
    assert memory["f1"] >= 2 * none["f1"] and memory["f1"] >= none["f1"] + 0.1, (memory["f1"], none["f1"])
    own_f1 = sum(a["f1"] for a in memory["answers"][:40]) / 40
    assert memory["ce"] < none["ce"] and own_f1 >= shifted["f1"] + 0.05, (own_f1, shifted["f1"])


def test_the_shipped_wiki_reasoner_finds_the_chunk_of_a_real_pdf_that_answers_a_users_question():
    """`index` + `ask --index` with data/adapters/wiki-reasoner on the GNU Libtasn1 manual (data/ask/libtasn1.pdf, 83
    chunks; no run trained on it) and 48 questions a user would ask about it (data/ask/libtasn1-questions.jsonl, each
    with the sentence that answers it): the chunk holding that sentence comes back in the top 5 for most of them,
    and more often with ask --index's default hybrid ranking, BM25's fused in (measured: the query reasoner alone 38
    of 48, first for 19; hybrid 41, first for 24; by chance 3)."""
    sys.path.insert(0, str(ROOT / "data"))
    import pdf_retrieval

    reader = clara.load(ROOT / "data" / "adapters" / "wiki-reasoner")
    chunks = clara.pdf_chunks(clara.extract_pdf_pages(ROOT / "data" / "ask" / "libtasn1.pdf"), reader.tokenizer,
                              reader.cfg)
    asked = pdf_retrieval.own_chunks(chunks, ROOT / "data" / "ask" / "libtasn1-questions.jsonl")
    found = pdf_retrieval.rankings(reader, reader.index(chunks), [(i, question) for i, question, _ in asked])
    ranks, hybrid = found["dense"], found["hybrid"]
    assert len(chunks) == 83 and len(asked) == 48 and len(set(i for i, _, _ in asked)) == 48
    assert sum(rank < 5 for rank in ranks) >= 32 and sum(rank == 0 for rank in ranks) >= 12, ranks
    assert sum(rank < 5 for rank in hybrid) >= max(36, sum(rank < 5 for rank in ranks)), hybrid


def test_the_shipped_wiki_reasoner_ranks_a_held_out_paragraph_first_more_often_than_its_compressor_alone():
    """Stage 3's point on real text: data/adapters/wiki-reasoner's query reasoner (contrastive, training questions
    against 20 paragraphs) against the compressor it started from, encoding the same questions of
    data/wiki-heldout.jsonl (articles held out of every run), each question's own paragraph ranked among all 99 of
    the file's paragraphs in one index (measured: first for 89 of 100 against 75, in the top 5 for 100 against 96)."""
    sys.path.insert(0, str(ROOT / "data"))
    import pdf_retrieval

    records = [json.loads(line) for line in (ROOT / "data" / "wiki-heldout.jsonl").read_text().splitlines()]
    paragraphs = sorted({r["docs"][0] for r in records})
    row = {paragraph: i for i, paragraph in enumerate(paragraphs)}
    questions = [(row[r["docs"][0]], r["question"]) for r in records]
    reader = clara.load(ROOT / "data" / "adapters" / "wiki-reasoner")
    index = reader.index([{"text": p, "source": "wiki-heldout.jsonl", "pages": [1]} for p in paragraphs])
    first = {role: sum(rank == 0 for rank in pdf_retrieval.ranks(reader, index, questions, role))
             for role in ("query", "compressor")}
    assert len(questions) == 100 and len(paragraphs) == 99
    assert first["query"] >= first["compressor"] + 5 and first["query"] >= 80, first


def test_memory_alone_gives_the_invented_name_of_a_document_no_run_saw():
    """The name task (data/make_facts.py): every question asks for the invented name of its document's entity, which
    no model can guess. The shipped stage-1 adapters, never asked this question in training, on fictional documents
    of seed 7, which no run saw: the name comes out of the document's own memory, and never out of another
    document's memory or out of no documents. (A tiny random model cannot be this test: a frozen random base never
    learns to write invented names; README, Evaluation.)"""
    sys.path.insert(0, str(ROOT / "data"))
    import make_facts

    documents = make_facts.make_documents(8, 7)
    reader = clara.load(ROOT / "data" / "adapters" / "facts-stage1")

    def score(shift, context):
        records = [{"question": make_facts.NAME_QUESTION, "docs": [documents[i - shift]["text"]], "gold": d["entity"]}
                   for i, d in enumerate(documents)]
        return reader.evaluate(records, [context], max_new_tokens=12)[context]

    own, another, none = score(0, "compressed"), score(1, "compressed"), score(0, "none")
    assert own["records"] == another["records"] == none["records"] == 8
    assert own["cover_em"] >= 0.5 and another["cover_em"] == none["cover_em"] == 0, (own, another, none)
    assert own["ce"] < another["ce"] and own["ce"] < none["ce"]


def test_the_evidence_experiment_runs_end_to_end_in_parts_and_writes_every_row(tmp_path, tiny_model_folder):
    options = ["--out", tmp_path / "exp", "--model", tiny_model_folder, "--train-docs", 12, "--eval-docs", 6,
               "--steps", 2, 2, 2, "--batch-size", 2, "--eval-records", 3, "--code-docs", 40, "--rates", 16,
               "--mix-docs", 4]
    experiment = lambda *more: subprocess.run(  # noqa: E731
        [sys.executable, str(ROOT / "data" / "experiment.py"), *map(str, options + list(more))],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    part = experiment("--only", "stage3")  # one part (as on one of two machines): stage 3 and the x16 it needs
    assert part.returncode == 0, part.stdout[-3000:] + part.stderr[-3000:]
    rows = json.loads((tmp_path / "exp" / "results.json").read_text())["rows"]
    assert [r["row"] for r in rows] == ["stage 3: retrieved top-5", "stage 3: marked documents"]
    run = experiment()  # the rest, reusing the x16 runs
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "x16-stage1" not in run.stdout
    rows = json.loads((tmp_path / "exp" / "results.json").read_text())["rows"]
    assert [r["row"] for r in rows] == ["no documents", "document text", "compressed x16 (16 vectors / doc)",
                                        "stage 3: retrieved top-5", "stage 3: marked documents", "code task: memory",
                                        "code task: no documents"]
    assert all(r["records"] == 3 and 0 <= r["f1"] <= 100 and r["ce"] > 0 for r in rows), rows
    by_name = {r["row"]: r for r in rows}
    # what compression buys: 16 vectors per document in the prompt instead of the document's ~190 tokens
    assert by_name["compressed x16 (16 vectors / doc)"]["prompt_tokens"] + 100 < \
        by_name["document text"]["prompt_tokens"]
    assert set(by_name["stage 3: retrieved top-5"]["recall"]) == {"recall@1", "recall@3", "recall@5"}
    assert by_name["compressed x16 (16 vectors / doc)"]["steps"] == "2 + 2"
    assert (tmp_path / "exp" / "table.md").read_text().count("\n| ") == 8  # the header and seven rows
    # stage 2 as the shipped recipe trains it: stage 1's generator, 4 training documents' qa records mixed in
    assert json.loads((tmp_path / "exp" / "x16-stage2" / "config.json").read_text())["init_generator"]
    assert "mix-4.jsonl: 4 stage-1 record(s) mixed in" in part.stdout
    mix = [json.loads(line) for line in (tmp_path / "exp" / "data" / "mix-4.jsonl").read_text().splitlines()]
    assert len(mix) == 4 and all(r["data_type"] == "qa" and "split" not in r for r in mix)
    again = experiment()
    assert again.returncode == 0 and "$ " not in again.stdout  # a finished experiment is not run again
