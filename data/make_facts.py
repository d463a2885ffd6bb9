"""Writes a seeded corpus of FICTIONAL documents with question/answer pairs, for testing that clara-mlx
answers questions about unseen documents only through their memory vectors.

    python data/make_facts.py --out runs/facts [--train-docs 2000] [--eval-docs 200] [--seed 0]
                              [--distractors 2] [--candidates 20] [--code-docs 2000] [--code-eval 100]

Every document describes one invented entity (a town, a scholar, a company or a ship) through eight facts
drawn at random: invented names built from syllables, places, organisations, years, quantities, colours
and codes. Each fact gives one question that names the entity and whose answer is an exact span of the
text, so the question tells which document to read but not what the answer is. Facts are independent
draws, so no document can be inferred from another. The paraphrase of a document renders the same facts
with other sentence templates, in another order.

Files written into --out (JSON Lines):
  stage1.jsonl     a "qa" record and a "paraphrase" record per document (eval documents': "split": "eval", so
                   compress validates on them and never trains on them)
  stage2.jsonl     question + the relevant document among D distractors (eval records: "split": "eval")
  stage3.jsonl     question + N candidates, the relevant one in "pos_index" (same split marking)
  code_task.jsonl  filler documents that state a code; every record asks the same question, so the
                   answer can only come from the document (the last --code-eval records are "eval")
  name_task.jsonl  every fact document once, asked the same question: the invented name of its entity, which
                   only the document can give (the evaluation documents' records are "eval")
Training and evaluation documents are disjoint, and distractors/candidates come from the record's own pool.
The output depends only on the options: every random draw comes from a random.Random seeded with a string
(hashed with SHA-512, unlike the salted hash()), never from the global random module.
"""

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path

# Invented words are a prefix plus a suffix (728 of them). The set would drop a spelling two pairs shared, and
# sorting fixes the order, so index -> word is a bijection over WORDS.
PREFIXES = ["Vel", "Mir", "Kor", "Tav", "Brin", "Dul", "Esk", "Har", "Ilv", "Jor", "Kel", "Lun", "Mor", "Nal",
            "Orv", "Pell", "Quen", "Rav", "Sol", "Thal", "Ulm", "Vask", "Wen", "Yar", "Zel", "Cal", "Drev", "Fal"]
SUFFIXES = ["nor", "rath", "wen", "ith", "ane", "orin", "ast", "elle", "dun", "mira", "ov", "esk", "ara",
            "ington", "ul", "aro", "enna", "ix", "oth", "ley", "ander", "is", "umb", "erra", "vin", "ada"]
WORDS = sorted({p + s for p in PREFIXES for s in SUFFIXES})
PLACE_ENDINGS = ["holm", "mere", "wick", "ford", "stead", "vale", "haven", "moor", "bridge", "field"]
ORG_KINDS = ["Trust", "Guild", "Institute", "Society", "Academy", "Council", "Foundation", "League"]
# every colour starts with a consonant, so "a {colour} coat" never needs "an"
COLOURS = ["crimson", "teal", "violet", "scarlet", "saffron", "maroon", "cobalt", "silver", "copper", "lavender",
           "rust", "mustard", "beige", "turquoise", "magenta", "navy", "plum", "jade", "bronze", "sand"]
CODE_LETTERS = "ABCDEFGHJKLMNPRSTVWXZ"  # no I, O, Q, U, Y: they read like digits or vowels

VALUES = {  # value type -> draw(rng) -> the exact answer string
    "year": lambda rng: str(rng.randint(1700, 2020)),
    "person": lambda rng: f"{rng.choice(WORDS)} {rng.choice(WORDS)}",
    "place": lambda rng: rng.choice(WORDS) + rng.choice(PLACE_ENDINGS),
    "word": lambda rng: rng.choice(WORDS),
    "org": lambda rng: f"{rng.choice(WORDS)} {rng.choice(ORG_KINDS)}",
    "colour": lambda rng: rng.choice(COLOURS),
    "code": lambda rng: f"{rng.choice(CODE_LETTERS)}-{rng.randint(1000, 9999)}",
    "people": lambda rng: f"{rng.randint(800, 60000):,}",
    "count": lambda rng: str(rng.randint(40, 900)),
    "crew": lambda rng: str(rng.randint(8, 80)),
    "metres": lambda rng: f"{rng.randint(30, 240)} metres",
    "tonnes": lambda rng: f"{rng.randint(200, 9000):,} tonnes",
}

# kind -> what to call the entity besides its name, opening sentences, and facts as
# (value type, question, sentence templates). {Ref}/{ref} is the name or the noun, {v} the answer.
KINDS = {
    "town": ("the town", ["{name} is a small town in the hill country, far from the main roads.",
                          "{name} is a market town in a wide valley, surrounded by farms and orchards.",
                          "{name} is an old town with narrow, crooked streets and a busy harbour."], [
        ("year", "In what year was the town of {name} founded?",
         ["{Ref} was founded in {v}.", "Settlers founded {ref} in {v}.", "The founding of {ref} dates to {v}."]),
        ("person", "Who led the first settlers of {name}?",
         ["The first settlers of {ref} were led by {v}.", "{v} led the first settlers to {ref}.",
          "It was {v} who brought the first settlers to {ref}."]),
        ("people", "How many people live in {name}?",
         ["{Ref} has a population of {v}.", "About {v} people live in {ref} today.",
          "Today {v} residents call {ref} home."]),
        ("word", "Which river runs through {name}?",
         ["The River {v} runs through {ref}.", "{Ref} lies on both banks of the River {v}.",
          "The River {v} divides {ref} into two halves."]),
        ("colour", "What colour is the flag of {name}?",
         ["The flag of {ref} is {v}.", "{Ref} flies a plain {v} flag.",
          "A {v} flag hangs above the town hall of {ref}."]),
        ("place", "Which town is twinned with {name}?",
         ["{Ref} is twinned with {v}.", "The twin town of {ref} is {v}.",
          "For many years {v} has been the twin town of {ref}."]),
        ("code", "What is the postal code of {name}?",
         ["The postal code of {ref} is {v}.", "Letters to {ref} carry the postal code {v}.",
          "{Ref} uses the postal code {v}."]),
        ("person", "Who is the mayor of {name}?",
         ["The mayor of {ref} is {v}.", "{v} was elected mayor of {ref}.", "{Ref} is governed by its mayor, {v}."]),
    ]),
    "scholar": ("the scholar", ["{name} was a scholar of old maps and forgotten roads.",
                                "{name} was a mapmaker and a patient scholar who rarely left the study.",
                                "{name} was a scholar who spent a whole lifetime drawing maps of the coast."], [
        ("year", "In what year was {name} born?",
         ["{Ref} was born in {v}.", "Born in {v}, {ref} grew up far from any city.",
          "The parish records give {v} as the year of birth of {ref}."]),
        ("place", "In which village did {name} grow up?",
         ["{Ref} grew up in the village of {v}.", "The childhood home of {ref} stood in {v}.",
          "{Ref} spent a quiet childhood in {v}."]),
        ("org", "Which institution employed {name}?",
         ["{Ref} worked for the {v} for many years.", "For most of a long career, {ref} was employed by the {v}.",
          "The {v} employed {ref} as a senior archivist."]),
        ("person", "Who was the teacher of {name}?",
         ["{Ref} studied under {v}.", "The teacher of {ref} was {v}.", "{v} taught {ref} the craft of mapmaking."]),
        ("count", "How many maps did {name} draw?",
         ["{Ref} drew {v} maps in total.", "In all, {v} maps were drawn by {ref}.",
          "The archive holds {v} maps made by {ref}."]),
        ("colour", "What colour was the coat that {name} always wore?",
         ["{Ref} always wore a {v} coat.", "A {v} coat was the one thing {ref} wore every day.",
          "Friends remembered {ref} in a {v} coat."]),
        ("code", "Under which reference are the papers of {name} kept?",
         ["The papers of {ref} are kept under reference {v}.", "Archive reference {v} holds the letters of {ref}.",
          "Readers ask for box {v} to see the notes of {ref}."]),
        ("word", "What was the name of the dog of {name}?",
         ["{Ref} kept a dog named {v}.", "A dog called {v} followed {ref} everywhere.",
          "The faithful dog of {ref} was named {v}."]),
    ]),
    "company": ("the company", ["{name} is a small company that makes clocks for churches and schools.",
                                "{name} is a family firm that makes oil lamps and lanterns by hand.",
                                "{name} is a workshop company that makes rope and sails for fishing boats."], [
        ("year", "In what year was the company {name} founded?",
         ["{Ref} was founded in {v}.", "The company {ref} opened its doors in {v}.",
          "{Ref} has been trading since {v}."]),
        ("person", "Who founded the company {name}?",
         ["{Ref} was founded by {v}.", "{v} started {ref} with borrowed money.", "The founder of {ref} was {v}."]),
        ("place", "In which town is {name} based?",
         ["{Ref} is based in {v}.", "The head office of {ref} is in {v}.",
          "From its yard in {v}, {ref} ships its goods."]),
        ("count", "How many people work for {name}?",
         ["{Ref} employs {v} people.", "There are {v} people on the payroll of {ref}.",
          "A staff of {v} works for {ref}."]),
        ("colour", "What colour is the logo of {name}?",
         ["The logo of {ref} is {v}.", "{Ref} prints its name in {v} letters.",
          "A {v} logo marks every crate from {ref}."]),
        ("word", "What is the best-known product of {name} called?",
         ["The best-known product of {ref} is the {v}.", "Most people know {ref} for the {v}.",
          "The {v} is the product that made {ref} famous."]),
        ("code", "What is the registration number of {name}?",
         ["{Ref} is registered under number {v}.", "The registration number of {ref} is {v}.",
          "Official papers list {ref} under number {v}."]),
        ("org", "Which organisation gave {name} an award?",
         ["{Ref} once won an award from the {v}.", "The {v} gave {ref} an award for good work.",
          "An award from the {v} hangs in the office of {ref}."]),
    ]),
    "ship": ("the ship", ["{name} was a cargo ship that sailed the northern trade routes.",
                          "{name} was a sturdy merchant ship with three tall masts.",
                          "{name} was a ship that carried grain and timber along the coast."], [
        ("year", "In what year was the ship {name} launched?",
         ["{Ref} was launched in {v}.", "The ship {ref} first went to sea in {v}.", "{Ref} left the slipway in {v}."]),
        ("place", "In which port was {name} built?",
         ["{Ref} was built in the port of {v}.", "The shipwrights of {v} built {ref}.",
          "{Ref} came from the yards of {v}."]),
        ("person", "Who was the captain of {name}?",
         ["{Ref} was commanded by {v}.", "The captain of {ref} was {v}.", "{v} served as captain of {ref}."]),
        ("metres", "How long was the ship {name}?",
         ["{Ref} was {v} long.", "From bow to stern, {ref} measured {v}.", "The hull of {ref} was {v} long."]),
        ("tonnes", "How much cargo could {name} carry?",
         ["{Ref} could carry {v} of cargo.", "The holds of {ref} took {v} of cargo.",
          "Fully loaded, {ref} carried {v}."]),
        ("colour", "What colour was the hull of {name}?",
         ["The hull of {ref} was painted {v}.", "{Ref} had a {v} hull.", "Sailors knew {ref} by its {v} hull."]),
        ("code", "What number was painted on the bow of {name}?",
         ["The number {v} was painted on the bow of {ref}.", "{Ref} carried the number {v} on its bow.",
          "On the bow of {ref} stood the number {v}."]),
        ("crew", "How many sailors were in the crew of {name}?",
         ["{Ref} sailed with a crew of {v}.", "A crew of {v} sailors worked on {ref}.",
          "There were {v} sailors in the crew of {ref}."]),
    ]),
}
FILLER = [  # sentences that carry no answer (no names, numbers or colours)
    "Little else is recorded about the early years.", "Local accounts differ on many minor details.",
    "Most of what is known comes from a handful of old letters.", "Historians still argue about the finer points.",
    "The surviving records are kept in a damp cellar.", "Few people outside the region have heard the story.",
    "Visitors have written about those times with affection.", "Some of these details were confirmed by later surveys.",
    "A short account of all this appeared in a regional almanac.", "Not every story told in the region is true.",
    "The winters in that part of the country are long and dark.", "A fire once destroyed part of the old archive.",
    "Several families in the area still tell stories about those days.", "Travellers rarely stayed for long.",
]

CODE_QUESTION = "What is the code in the background?"
NAME_QUESTION = "What is the name of the subject of the background?"
CODE_SENTENCES = ["The code is {c}.", "A note on the door says that the code is {c}.",
                  "The code is {c}, written in chalk."]
CODE_FILLER = [  # neutral sentences about invented things, without digits, for the code task
    "The road to {place} winds past fields of barley and low stone walls.",
    "Every spring the {word} birds return to the marshes near {place}.",
    "A small ferry crosses the lake at {place} early in the morning.",
    "The bakers of {place} are known for a dark and sticky bread.",
    "Most houses in {place} have red roofs and blue shutters.",
    "An old lighthouse keeper in {place} collects shells of every shape.",
    "The {word} festival fills the square with music and lanterns.",
    "Nobody remembers who planted the orchard behind the school in {place}.",
    "In winter the canals of {place} freeze and children skate on them.",
    "A weaver called {word} sells thick woollen blankets at the market.",
    "The museum of {place} shows a large collection of clocks.",
    "Fog rolls in from the sea on most mornings.",
]


def entity_name(index, seed):
    """A two-word name that no other index gets: an affine map (a * index + b) mod M with a coprime to M is
    a permutation of range(M), so the names look random but never repeat, whatever the call split."""
    space = len(WORDS) ** 2
    rng = random.Random(f"{seed}-names")
    a = rng.randrange(1, space)
    while math.gcd(a, space) != 1:
        a = rng.randrange(1, space)
    j = (a * index + rng.randrange(space)) % space
    return f"{WORDS[j // len(WORDS)]} {WORDS[j % len(WORDS)]}"


def render(rng, name, noun, opening, sentences):
    """One text: the opening, then (template, value) sentences in the given order, five filler sentences
    put anywhere after the opening. The entity is mostly called by name, sometimes "the town" etc."""
    parts = []
    for template, v in sentences:
        ref = name if rng.random() < 0.7 else noun
        parts.append(template.format(Ref=ref[0].upper() + ref[1:], ref=ref, v=v))
    for filler in rng.sample(FILLER, 5):
        parts.insert(rng.randint(0, len(parts)), filler)
    return " ".join([opening.format(name=name)] + parts)


def another(rng, count, taken):
    """A random index in range(count) other than `taken`: the paraphrase never reuses a template."""
    return rng.choice([i for i in range(count) if i != taken])


def make_document(index, seed):
    """The document with global index `index`: its own rng, so it does not depend on its neighbours."""
    rng = random.Random(f"{seed}-doc-{index}")
    name = entity_name(index, seed)
    noun, openings, facts = KINDS[rng.choice(sorted(KINDS))]
    values = [VALUES[value_type](rng) for value_type, _, _ in facts]
    opening, picks = rng.randrange(len(openings)), [rng.randrange(len(t)) for _, _, t in facts]
    order = rng.sample(range(len(facts)), len(facts))
    text = render(rng, name, noun, openings[opening], [(facts[k][2][picks[k]], values[k]) for k in order])
    # the paraphrase: the same facts, another template for every sentence, another order
    opening = another(rng, len(openings), opening)
    picks = [another(rng, len(t), p) for (_, _, t), p in zip(facts, picks)]
    paraphrase_order = order
    while paraphrase_order == order:
        paraphrase_order = rng.sample(range(len(facts)), len(facts))
    paraphrase = render(rng, name, noun, openings[opening],
                        [(facts[k][2][picks[k]], values[k]) for k in paraphrase_order])
    qa = [(question.format(name=name), v) for (_, question, _), v in zip(facts, values)]
    return {"entity": name, "text": text, "paraphrase": paraphrase, "qa": qa}


def make_documents(n, seed, start=0):
    """Documents start .. start+n-1; train and eval pools are disjoint ranges of indices."""
    return [make_document(index, seed) for index in range(start, start + n)]


def make_code_documents(n, seed):
    """(text, code) pairs for the code task: 60-120 words of filler with one sentence stating the code."""
    docs, seen = [], set()
    for k in range(n):
        for attempt in range(100):  # a repeated text would leak an eval document into training
            rng = random.Random(f"{seed}-code-{k}-{attempt}")
            code = str(rng.randint(1000, 9999)) if rng.random() < 0.8 else rng.choice(WORDS)
            sentences = [t.format(place=VALUES["place"](rng), word=rng.choice(WORDS))
                         for t in rng.sample(CODE_FILLER, rng.randint(6, 9))]
            sentences.insert(rng.randint(0, len(sentences)), rng.choice(CODE_SENTENCES).format(c=code))
            text = " ".join(sentences)
            if text not in seen:
                break
        seen.add(text)
        docs.append((text, code))
    return docs


def with_others(rng, pool, i, count):
    """The text of pool[i] plus `count` other texts of `pool`, pool[i] at a random position.
    Returns (texts, that position)."""
    others = [pool[j + (j >= i)]["text"] for j in rng.sample(range(len(pool) - 1), count)]  # skips i itself
    position = rng.randint(0, count)
    return others[:position] + [pool[i]["text"]] + others[position:], position


def check_options(train_docs, eval_docs, distractors, candidates, code_docs, code_eval):
    """Raises ValueError with a one-line reason for options that cannot make the files."""
    if train_docs < 1 or eval_docs < 1 or code_docs < 0 or distractors < 0 or candidates < 1:
        raise ValueError("--train-docs, --eval-docs and --candidates must be >= 1; the other counts >= 0")
    for pool, size in (("train", train_docs), ("eval", eval_docs)):
        if candidates > size:
            raise ValueError(f"--candidates {candidates} is larger than the {pool} pool ({size} documents)")
        if distractors + 1 > size:
            raise ValueError(f"--distractors {distractors} needs {distractors + 1} documents in the {pool} pool, "
                             f"which has {size}")
    if not 0 <= code_eval <= code_docs:
        raise ValueError(f"--code-eval {code_eval} must be between 0 and --code-docs {code_docs}")
    if train_docs + eval_docs > len(WORDS) ** 2:
        raise ValueError(f"at most {len(WORDS) ** 2} documents have unique names")


def question_records(rng, pool, per_doc, split, others, marked=False):
    """per_doc questions of each document of pool (all eight: None), each beside `others` other documents of pool
    drawn with rng; marked (stage 3): the record says where its own document is ("pos_index")."""
    records = []
    for i, d in enumerate(pool):
        for question, answer in d["qa"] if per_doc is None else rng.sample(d["qa"], per_doc):
            docs, position = with_others(rng, pool, i, others)
            records.append({"question": question, "docs": docs, "answer": answer,
                            **({"pos_index": [position]} if marked else {}), **split})
    return records


def stage1_records(pool, split):
    """Apple's stage-1 records of each document of pool: one "qa" (its eight questions) and one "paraphrase"."""
    return [record for d in pool
            for record in ({"data_type": "qa", "question": [q for q, _ in d["qa"]], "answers": [a for _, a in d["qa"]],
                            "docs": [d["text"]], **split},
                           {"data_type": "paraphrase", "docs": [d["text"]], "answers": [d["paraphrase"]], **split})]


def code_records(n, seed, n_eval):
    """The code task: CODE_QUESTION about each of n code documents; the last n_eval are marked "split": "eval"."""
    code = [{"question": CODE_QUESTION, "docs": [text], "answer": answer}
            for text, answer in make_code_documents(n, seed)]
    for record in code[len(code) - n_eval:]:
        record["split"] = "eval"
    return code


def name_records(pool, split):
    """The name task: NAME_QUESTION about each document of pool, answered by its entity's invented name."""
    return [{"question": NAME_QUESTION, "docs": [d["text"]], "answer": d["entity"], **split} for d in pool]


def first_qa_records(stage1, n_docs):
    """The qa records of the first n_docs training documents among stage-1 records: what sft --stage1-data mixes
    into stage 2 in the shipped recipe (data/ship.py, data/experiment.py --mix-docs)."""
    return [r for r in stage1 if r["data_type"] == "qa" and r.get("split") != "eval"][:n_docs]


def write_jsonl(path, records):
    """One JSON line per record, written beside the file (its folder made if missing) and renamed when complete, so
    a killed run leaves no half file. Returns the number of records."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(tmp, path)
    return len(records)


def write_all(out, train_docs=2000, eval_docs=200, seed=0, distractors=2, candidates=20, code_docs=2000,
              code_eval=100):
    """Writes the five files into `out`; returns one summary line per file."""
    check_options(train_docs, eval_docs, distractors, candidates, code_docs, code_eval)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train = make_documents(train_docs, seed)
    evaluation = make_documents(eval_docs, seed, start=train_docs)  # the indices after train: unseen names
    stage1 = stage1_records(train, {}) + stage1_records(evaluation, {"split": "eval"})
    stage2, stage3 = [], []
    rng2, rng3 = random.Random(f"{seed}-stage2"), random.Random(f"{seed}-stage3")  # one each: stage 2 draws the same
    for pool, split in ((train, {}), (evaluation, {"split": "eval"})):  # distractors with or without stage 3
        stage2 += question_records(rng2, pool, None, split, distractors)
        stage3 += question_records(rng3, pool, None, split, candidates - 1, marked=True)
    code = code_records(code_docs, seed, code_eval)
    names = name_records(train, {}) + name_records(evaluation, {"split": "eval"})
    n_docs = train_docs + eval_docs
    return [f"{out / 'stage1.jsonl'}: {write_jsonl(out / 'stage1.jsonl', stage1)} records, {n_docs} documents",
            f"{out / 'stage2.jsonl'}: {write_jsonl(out / 'stage2.jsonl', stage2)} records, {n_docs} documents",
            f"{out / 'stage3.jsonl'}: {write_jsonl(out / 'stage3.jsonl', stage3)} records, {n_docs} documents",
            f"{out / 'code_task.jsonl'}: {write_jsonl(out / 'code_task.jsonl', code)} records, {code_docs} documents",
            f"{out / 'name_task.jsonl'}: {write_jsonl(out / 'name_task.jsonl', names)} records, {n_docs} documents"]


def run_main(parser, write, argv=None):
    """The scripts' main: write(out, **options) and print its summary lines; a ValueError is one line, exit 2."""
    options = vars(parser.parse_args(argv))
    try:
        lines = write(options.pop("out"), **options)
    except ValueError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the .jsonl files")
    parser.add_argument("--train-docs", type=int, default=2000)
    parser.add_argument("--eval-docs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distractors", type=int, default=2, help="stage 2: other documents per record")
    parser.add_argument("--candidates", type=int, default=20,
                        help="stage 3: documents per record, relevant one included")
    parser.add_argument("--code-docs", type=int, default=2000)
    parser.add_argument("--code-eval", type=int, default=100, help="the last records of code_task.jsonl held out")
    run_main(parser, write_all, argv)


if __name__ == "__main__":
    main()
