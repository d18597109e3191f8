"""A small, seeded synthetic world: a general corpus with facts to know and instruction tasks to learn.

The general corpus mixes generated fact sentences (made-up countries, cities, people, digit sums) with
real text (tinyshakespeare), so a tiny model pretrained on it has knowledge that fine-tuning can use or
forget (`knowledge_probe` lists capital facts as plain-text prompts). Each task has short exact-match
answers and disjoint train/eval splits.

`format_rows` are chat examples the base model sees during pretraining, so it knows the chat template
and some skills; they are never the evaluated tasks, so fine-tuning still has something to teach.
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.paths import shared_data_dir

SHAKESPEARE_FILE = "tinyshakespeare.txt"
TASKS = ("first_letter", "max3", "sort3", "add")

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "kr", "st", "th", "dr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "k"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass
class Country:
    name: str
    capital: str
    language: str
    flag_color: str
    cities: list[str]


@dataclass
class Person:
    name: str
    city: str
    country: str
    age: int
    favorite_color: str


@dataclass
class LabWorld:
    seed: int
    countries: list[Country]
    people: list[Person]
    mayors: dict[str, str]  # city -> person name
    general_train: str
    general_heldout: str
    fact_docs: list[str]  # the synthetic part of general_train (pretraining samples it at its own rate)
    real_docs: list[str]  # the real-text part of general_train
    tasks: dict[str, dict[str, list[dict[str, str]]]]  # task -> split ("train"/"eval") -> alpaca rows
    format_rows: list[dict[str, str]]  # chat-format examples for pretraining (not the evaluated tasks)
    notes: list[str] = field(default_factory=list)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def _unique_names(rng: random.Random, n: int, syllables: tuple[int, int], taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = _word(rng, rng.randint(*syllables)).capitalize()
        if w not in taken and 3 <= len(w) <= 10:
            taken.add(w)
            out.append(w)
    return out


def _capital_sentence(rng: random.Random, c: Country) -> str:
    return rng.choice(
        [
            f"The capital of {c.name} is {c.capital}.",
            f"{c.capital} is the capital of {c.name}.",
            f"{c.name} is a country whose capital city is {c.capital}.",
            f"Travellers to {c.name} usually arrive in {c.capital}, its capital.",
        ]
    )


def _other_sentences(c: Country, people: list[Person], mayors: dict[str, str]) -> list[str]:
    s = [f"In {c.name} people speak {c.language}.", f"The flag of {c.name} is {c.flag_color}."]
    for city in c.cities:
        s.append(f"{city} is a city in {c.name}.")
        s.append(f"The mayor of {city} is {mayors[city]}.")
    for p in people:
        if p.country == c.name:
            s.append(f"{p.name} lives in {p.city} and is {p.age} years old.")
            s.append(f"The favorite color of {p.name} is {p.favorite_color}.")
    return s


def _sum_sentence(rng: random.Random, a: int, b: int) -> str:
    return rng.choice(
        [f"{a} plus {b} equals {a + b}.", f"The sum of {a} and {b} is {a + b}.", f"Adding {a} and {b} gives {a + b}."]
    )


def _synthetic_paragraphs(
    rng: random.Random, countries: list[Country], people: list[Person], mayors: dict[str, str], n: int
) -> list[str]:
    """Every paragraph states a few capitals and sums (knowledge to probe and to use) among other facts."""
    others = {c.name: _other_sentences(c, people, mayors) for c in countries}
    paras = []
    for _ in range(n):
        sents = []
        for c in rng.sample(countries, k=4):
            sents.append(_capital_sentence(rng, c))
            sents += rng.sample(others[c.name], k=1)
        sents += [_sum_sentence(rng, rng.randint(0, 9), rng.randint(0, 9)) for _ in range(3)]
        rng.shuffle(sents)
        paras.append(" ".join(sents))
    return paras


def _read_shakespeare(notes: list[str]) -> str:
    path = shared_data_dir(required=False) / SHAKESPEARE_FILE
    if not path.is_file():
        msg = f"lab: {path} not found; the general corpus is synthetic only (set LORAFORGE_SHARED_DATA)"
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)
        return ""
    return path.read_text(encoding="utf-8")


def _split_shakespeare(text: str, heldout_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """Blocks of speech, split by position so held-out passages are never seen in pretraining."""
    blocks = [b.strip() for b in text.split("\n\n") if b.strip()]
    cut = int(len(blocks) * (1 - heldout_fraction))
    return blocks[:cut], blocks[cut:]


ADD_PHRASINGS = ("What is {a} + {b}?", "Add {a} and {b}.", "What is {a} plus {b}?")


def _add_rows(a: int, b: int) -> list[dict[str, str]]:
    return [{"instruction": p.format(a=a, b=b), "input": "", "output": str(a + b)} for p in ADD_PHRASINGS]


def _first_letter_row(letters: tuple[str, ...]) -> dict[str, str]:
    return {"instruction": "Which letter comes first?", "input": " ".join(letters), "output": letters[0]}


def _max3_row(digits: tuple[int, ...]) -> dict[str, str]:
    return {
        "instruction": "Which number is the largest?",
        "input": " ".join(map(str, digits)),
        "output": str(max(digits)),
    }


def _sort3_row(digits: tuple[int, ...]) -> dict[str, str]:
    return {
        "instruction": "Sort these numbers from smallest to largest.",
        "input": " ".join(map(str, digits)),
        "output": " ".join(map(str, sorted(digits))),
    }


def _make_tasks(rng: random.Random) -> dict[str, dict[str, list[dict[str, str]]]]:
    """Four tasks for a LoRA on the lab model, easiest first; eval inputs never occur in train.

    first_letter, max3 and sort3 build on skills from pretraining (copying, ordering digits); add asks
    for sums the base model knows from pretraining, but only in another wording and answer format.
    """
    tasks: dict[str, dict[str, list[dict[str, str]]]] = {}
    # first_letter: 3 to 5 distinct letters.
    seqs: set[tuple[str, ...]] = set()
    while len(seqs) < 1200:
        seqs.add(tuple(rng.sample(LETTERS, rng.randint(3, 5))))
    seq_list = sorted(seqs)
    rng.shuffle(seq_list)
    tasks["first_letter"] = {
        "train": [_first_letter_row(s) for s in seq_list[200:]],
        "eval": [_first_letter_row(s) for s in seq_list[:200]],
    }
    # add: every ordered digit pair; held-out pairs are still stated as facts in the general corpus.
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(pairs)
    tasks["add"] = {
        "train": [r for a, b in pairs[25:] for r in _add_rows(a, b)],
        "eval": [r for a, b in pairs[:25] for r in _add_rows(a, b)],
    }
    # max3 and sort3: ordered triples of distinct digits, each task with its own held-out triples.
    triples = [(a, b, c) for a in range(10) for b in range(10) for c in range(10) if len({a, b, c}) == 3]
    rng.shuffle(triples)
    tasks["max3"] = {
        "train": [_max3_row(t) for t in triples[150:]],
        "eval": [_max3_row(t) for t in triples[:150]],
    }
    rng.shuffle(triples)
    tasks["sort3"] = {
        "train": [_sort3_row(t) for t in triples[150:]],
        "eval": [_sort3_row(t) for t in triples[:150]],
    }
    return tasks


def knowledge_probe(world: LabWorld) -> list[dict[str, str]]:
    """Facts the base model learned from the corpus, as plain-text prompts (for measuring forgetting)."""
    return [{"prompt": f"The capital of {c.name} is", "answer": c.capital} for c in world.countries]


def _format_rows(
    rng: random.Random, countries: list[Country], people: list[Person], mayors: dict[str, str], n: int
) -> list[dict]:
    """Chat examples for pretraining: the template, copying, reordering and recalling facts in chat.

    They teach skills and knowledge the tasks build on but never the tasks themselves: recalled facts
    come as whole sentences, sorted lists have 4 items and commas (sort3: 3 items, spaces).
    So the base model starts near 0 exact-match on the tasks and fine-tuning has something to teach.
    """
    cities = sorted(mayors)
    random.Random(1).shuffle(cities)
    rows = []
    for _ in range(n):
        kind = rng.randrange(8)
        if kind == 0:
            w = _word(rng, rng.randint(1, 3))
            rows.append({"instruction": "Repeat this word exactly.", "input": w, "output": w})
        elif kind == 1:  # only half the cities: answering the others needs recall of corpus facts
            city = rng.choice(cities[: len(cities) // 2])
            rows.append({"instruction": f"Who is the mayor of {city}?", "input": "", "output": mayors[city]})
        elif kind == 2:  # copying is the skill most tasks build on, so it gets two slots
            letters = rng.sample(LETTERS, rng.choice([2, 4, 6]))
            rows.append(
                {"instruction": "Repeat these letters.", "input": " ".join(letters), "output": " ".join(letters)}
            )
        elif kind == 3:  # facts recalled in chat, not only in running text
            c = rng.choice(countries)
            rows.append(
                {"instruction": f"Tell me about the capital of {c.name}.", "input": "", "output": f"It is {c.capital}."}
            )
        elif kind == 4:  # the sums add asks for, in another wording and answer format
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            rows.append({"instruction": f"Tell me the sum of {a} and {b}.", "input": "", "output": f"{a + b}."})
        elif kind == 5:
            letters = rng.sample(LETTERS, rng.choice([2, 4, 6]))
            rows.append(
                {"instruction": "Repeat these letters.", "input": " ".join(letters), "output": " ".join(letters)}
            )
        elif kind == 6:
            digits = [rng.randint(0, 9) for _ in range(4)]
            rows.append(
                {
                    "instruction": "Repeat these numbers.",
                    "input": " ".join(map(str, digits)),
                    "output": " ".join(map(str, digits)),
                }
            )
        else:
            digits = [rng.randint(0, 9) for _ in range(4)]
            rows.append(
                {
                    "instruction": "Put these numbers in increasing order, with commas.",
                    "input": " ".join(map(str, digits)),
                    "output": ", ".join(map(str, sorted(digits))),
                }
            )
    return rows


def generate_world(seed: int = 0, n_countries: int = 30, n_people: int = 40) -> LabWorld:
    """Build the whole world deterministically from `seed`."""
    rng = random.Random(seed)
    notes: list[str] = []
    taken: set[str] = set()
    country_names = _unique_names(rng, n_countries, (2, 3), taken)
    countries = []
    for name in country_names:
        capital, *others = _unique_names(rng, 3, (1, 2), taken)
        language = _unique_names(rng, 1, (2, 2), taken)[0] + "ic"
        countries.append(Country(name, capital, language, rng.choice(COLORS), [capital, *others]))
    all_cities = [(c.name, city) for c in countries for city in c.cities]
    people = []
    for name in _unique_names(rng, n_people, (2, 2), taken):
        country, city = rng.choice(all_cities)
        people.append(Person(name, city, country, rng.randint(18, 90), rng.choice(COLORS)))
    mayors = {city: rng.choice(people).name for _, city in all_cities}

    syn_train = _synthetic_paragraphs(rng, countries, people, mayors, n=1500)
    syn_heldout = _synthetic_paragraphs(rng, countries, people, mayors, n=60)
    shake_train, shake_heldout = _split_shakespeare(_read_shakespeare(notes))
    train_docs = syn_train + shake_train
    rng.shuffle(train_docs)
    heldout_docs = syn_heldout + shake_heldout[:300]
    rng.shuffle(heldout_docs)

    return LabWorld(
        seed=seed,
        countries=countries,
        people=people,
        mayors=mayors,
        general_train="\n\n".join(train_docs) + "\n",
        general_heldout="\n\n".join(heldout_docs) + "\n",
        fact_docs=syn_train,
        real_docs=shake_train,
        tasks=_make_tasks(rng),
        format_rows=_format_rows(rng, countries, people, mayors, n=8000),
        notes=notes,
    )


def alpaca_to_messages(row: dict[str, str]) -> list[dict[str, str]]:
    """The project-wide conversion: user = instruction (+ blank line + input), assistant = output."""
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_lab_data(out_dir: Path, world: LabWorld) -> None:
    """Write general_{train,heldout}.txt, tasks/<task>_{train,eval}.jsonl, pretrain_chat.jsonl (the chat
    rows pretraining used), knowledge_probe.jsonl ({"prompt","answer"} fact completions) and world.json."""
    out_dir = Path(out_dir)
    (out_dir / "tasks").mkdir(parents=True, exist_ok=True)
    (out_dir / "general_train.txt").write_text(world.general_train, encoding="utf-8")
    (out_dir / "general_heldout.txt").write_text(world.general_heldout, encoding="utf-8")
    for task, splits in world.tasks.items():
        for split, rows in splits.items():
            _write_jsonl(out_dir / "tasks" / f"{task}_{split}.jsonl", rows)
    _write_jsonl(out_dir / "pretrain_chat.jsonl", world.format_rows)
    _write_jsonl(out_dir / "knowledge_probe.jsonl", knowledge_probe(world))
    facts = {
        "seed": world.seed,
        "countries": [c.__dict__ for c in world.countries],
        "people": [p.__dict__ for p in world.people],
        "mayors": world.mayors,
        "notes": world.notes,
    }
    (out_dir / "world.json").write_text(json.dumps(facts, indent=1), encoding="utf-8")


BOS, EOS, PAD, END_OF_TURN = "<|bos|>", "<|eos|>", "<|pad|>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")


def chat_template() -> str:
    """Jinja chat template: `<|role|>\\ncontent` turns; assistant turns end with eos so generation stops.

    The prompt rendered with add_generation_prompt=True is an exact prefix of the full conversation,
    so the assistant tokens (loss mask) are everything after it.
    """
    return (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown chat role: ' + message['role']) }}"
        "{% endif %}"
        "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
        "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '" + END_OF_TURN + "' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    )
