"""Writes data/sample.pdf, data/sft.jsonl and data/e2e.jsonl from the passages below (our own words about CLaRa).

    python data/make_sample.py

The PDF is written by hand (a few PDF objects and a text stream per page), so no PDF library is needed.
One long word is hyphenated across a line break on purpose: clara.py's text cleaning must join it again.
sft.jsonl: one record per question, docs = the passage that answers it plus two distractor passages
(picked by a fixed rule, so the file is reproducible); the last question of every passage is held out
("split": "eval") for evaluation. e2e.jsonl (stage 3): every question with all ten passages as candidates,
the relevant one marked in "pos_index", the same split. data/ask/ holds two documents for the demo's question.
"""

import json
import textwrap
from pathlib import Path

HERE = Path(__file__).parent

PASSAGES = [
    ("CLaRa is a retrieval-augmented generation method from Apple researchers, described in a 2025 paper. "
     "The name stands for Continuous Latent Reasoning. Instead of pasting retrieved documents into the prompt "
     "as text, CLaRa turns every document into a short sequence of continuous vectors and lets the language "
     "model read those vectors directly. Retrieval and generation then work in one shared latent space.",
     [("What does the name CLaRa stand for?", "Continuous Latent Reasoning"),
      ("Which company did the researchers behind CLaRa work for?", "Apple"),
      ("In what year was the CLaRa paper described?", "2025"),
      ("What does CLaRa turn every document into?", "a short sequence of continuous vectors"),
      ("In what kind of space do retrieval and generation work in CLaRa?", "one shared latent space")]),
    ("Each document is followed by a fixed number of memory tokens. Their count is the maximum document "
     "length divided by the compression rate, so a document of 256 tokens at a compression rate of 16 gets "
     "16 memory tokens. The memory tokens have learned embeddings, shared by all documents, that the model "
     "fills with the content of the particular document in front of them.",
     [("What follows each document in CLaRa?", "memory tokens"),
      ("How is the number of memory tokens computed?", "maximum document length divided by the compression rate"),
      ("How many memory tokens does a 256-token document get at compression rate 16?", "16"),
      ("Are the memory token embeddings fixed or learned?", "learned"),
      ("Are memory embeddings shared across documents?", "yes")]),
    ("The compressor is the base language model with its own LoRA adapter. It reads the document tokens "
     "followed by the memory tokens. The hidden states of the last layer at the memory positions become the "
     "compressed document. Because attention is causal, each memory position can see the whole document and "
     "the memory positions before it, but never the padding that follows.",
     [("What is the compressor made of?", "the base language model with its own LoRA adapter"),
      ("What does the compressor read?", "the document tokens followed by the memory tokens"),
      ("Which hidden states become the compressed document?", "the last layer's hidden states at the memory positions"),
      ("What kind of attention lets memory positions see the whole document?", "causal attention"),
      ("Can a memory position see the padding that follows it?", "no")]),
    ("The generator is the same base model with a second, separate LoRA adapter. Its prompt contains "
     "placeholder slots, one for every memory vector of every retrieved document, followed by the question. "
     "Before the forward pass, the input embeddings at the slots are replaced by the compressed vectors. "
     "The generator is trained with cross-entropy on the answer tokens only.",
     [("How many LoRA adapters share the base model in CLaRa?", "two"),
      ("What does the generator's prompt contain besides the question?", "placeholder slots for the memory vectors"),
      ("What replaces the input embeddings at the placeholder slots?", "the compressed vectors"),
      ("Which tokens does the generator's cross-entropy cover?", "the answer tokens only"),
      ("Is the generator a different base model from the compressor?", "no, the same base model")]),
    ("An alignment loss keeps the memory states close to ordinary hidden states. It is the mean squared "
     "error between the average memory state and the average state of the document tokens, and it enters "
     "the total loss with a weight of 0.1. If a document is empty or there are no memory tokens, the loss "
     "is defined as zero, so training never divides by zero.",
     [("What kind of error is the alignment loss?", "mean squared error"),
      ("Which two averages does the alignment loss compare?",
       "the average memory state and the average document state"),
      ("What weight does the alignment loss have in the total loss?", "0.1"),
      ("What is the alignment loss when a document is empty?", "zero"),
      ("What does the alignment loss keep memory states close to?", "ordinary hidden states")]),
    ("The first training stage is compression pretraining. The generator must reproduce a document, or "
     "question and answer pairs about it, from nothing but its memory vectors. This forces the compressor "
     "to pack the facts of the document into a handful of vectors. The authors call this stage salient "
     "compressor pretraining.",
     [("What is the first training stage called?", "compression pretraining"),
      ("What must the generator reproduce in the first stage?", "the document or question and answer pairs about it"),
      ("What may the generator use in stage one?", "only the memory vectors"),
      ("What does stage one force the compressor to do?", "pack the facts of the document into a handful of vectors"),
      ("What do the authors call the first stage?", "salient compressor pretraining")]),
    ("The second stage is instruction tuning. Each example has a question, several retrieved documents and "
     "a gold answer. Every document is compressed, the generator sees all their memory vectors and the "
     "question, and it learns to produce the answer. Distractor documents that do not contain the answer "
     "are mixed in so the generator learns to ignore them.",
     [("What is the second stage?", "instruction tuning"),
      ("What does a second-stage example contain?", "a question, several retrieved documents and a gold answer"),
      ("Which documents are compressed in stage two?", "every document"),
      ("Why are distractor documents mixed in?", "so the generator learns to ignore them"),
      ("What does the generator learn to produce in stage two?", "the answer")]),
    ("The third stage trains retrieval end to end. A query reasoner maps the question into the same space "
     "as the compressed documents, and documents are ranked by similarity. A differentiable top-k selection "
     "lets the answer loss flow back into the retriever, so retrieval is learned from generation quality "
     "without relevance labels.",
     [("What does the third stage train end to end?", "retrieval"),
      ("What maps the question into the space of compressed documents?", "a query reasoner"),
      ("How are documents ranked in stage three?", "by similarity"),
      ("What lets the answer loss reach the retriever?", "a differentiable top-k selection"),
      ("Does stage three need relevance labels?", "no")]),
    ("Compression pays off at inference time. Sixteen vectors replace two hundred and fifty-six document "
     "tokens, so the generator's prompt is much shorter and attention costs far less. Compressed "
     "documents can be computed once, stored, and reused for every question that retrieves them.",
     [("When does compression pay off?", "at inference time"),
      ("How many vectors replace 256 document tokens at rate 16?", "sixteen"),
      ("What becomes much shorter thanks to compression?", "the generator's prompt"),
      ("Can compressed documents be reused?", "yes, they can be stored and reused"),
      ("What costs far less with a shorter prompt?", "attention")]),
    ("This implementation, clara-mlx, runs on MLX. Its default base model is SmolLM2-135M-Instruct, "
     "shipped inside a Python package so that nothing is downloaded at run time. LoRA adapters of rank 16 "
     "are placed on the query and value projections of the last eight transformer blocks. Adapters and "
     "memory embeddings are saved in the safetensors format.",
     [("Which framework does clara-mlx run on?", "MLX"),
      ("What is the default base model of clara-mlx?", "SmolLM2-135M-Instruct"),
      ("What rank do the LoRA adapters have?", "16"),
      ("Which projections get LoRA adapters?", "the query and value projections"),
      ("In what format are adapters saved?", "safetensors")]),
]

def pdf_lines(text, width=88):
    lines = []
    for paragraph in text:
        lines += textwrap.wrap(paragraph, width) + [""]
    return lines


def write_pdf(path, pages):
    """A minimal PDF: one Helvetica text stream per page, a line per Tj."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for lines in pages:
        ops = ["BT", "/F1 11 Tf", "14 TL", "60 780 Td"]
        for line in lines:
            escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            ops.append(f"({escaped}) Tj T*")
        ops.append("ET")
        stream = "\n".join(ops)
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 842] "
                       f"/Resources << /Font << /F1 3 0 R >> >> /Contents {len(objects)} 0 R >>")
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = "%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out.encode("latin-1")))
        out += f"{number} 0 obj\n{body}\nendobj\n"
    xref = len(out.encode("latin-1"))
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n" + "".join(f"{o:010d} 00000 n \n" for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
    path.write_bytes(out.encode("latin-1"))


def main():
    texts = [p for p, _ in PASSAGES]
    pages = [pdf_lines(texts[i:i + 3]) for i in range(0, len(texts), 3)]
    # hyphenate one word across a line break, as typeset PDFs do: the first long last word of page 1
    n = next(n for n, line in enumerate(pages[0]) if line and len(line.split()[-1]) >= 9 and line.split()[-1].isalpha())
    word = pages[0][n].split()[-1]
    pages[0][n] = pages[0][n][: -len(word)] + word[:4] + "-"
    pages[0][n + 1] = word[4:] + " " + pages[0][n + 1]
    write_pdf(HERE / "sample.pdf", [["CLaRa explained: compressing documents into memory", ""] + p for p in pages])

    records = []
    for i, (passage, qas) in enumerate(PASSAGES):
        distractors = [texts[(i + 3) % len(texts)], texts[(i + 7) % len(texts)]]
        for j, (question, answer) in enumerate(qas):
            docs = distractors[:]
            docs.insert(j % 3, passage)  # the relevant passage moves around
            record = {"question": question, "docs": docs, "gold_answer": answer}
            if j == len(qas) - 1:
                record["split"] = "eval"
            records.append(record)
    # two documents for `make demo`'s question (ask): the alignment-loss passage and a distractor
    (HERE / "ask").mkdir(exist_ok=True)
    (HERE / "ask" / "doc1.txt").write_text(texts[4] + "\n")
    (HERE / "ask" / "doc2.txt").write_text(texts[8] + "\n")
    (HERE / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    # stage 3: every question with all passages as candidates, in an order that moves with the question
    e2e = []
    for i, (passage, qas) in enumerate(PASSAGES):
        for j, (question, answer) in enumerate(qas):
            shift = (3 * i + j) % len(texts)
            candidates = texts[shift:] + texts[:shift]
            record = {"question": question, "docs": candidates, "answer": answer,
                      "pos_index": [candidates.index(passage)]}
            if j == len(qas) - 1:
                record["split"] = "eval"
            e2e.append(record)
    (HERE / "e2e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in e2e))
    print(f"wrote {HERE / 'sample.pdf'} ({len(pages)} pages), {HERE / 'sft.jsonl'} ({len(records)} records) and "
          f"{HERE / 'e2e.jsonl'} ({len(e2e)} records)")


if __name__ == "__main__":
    main()
