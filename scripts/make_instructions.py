"""Generate the embedded default instruction data set, llama_ref/assets/instructions.json.

    python scripts/make_instructions.py            # writes llama_ref/assets/instructions.json
    python scripts/make_instructions.py --check    # exit 1 if the shipped file differs from a fresh generation

Every example is written here, from small word lists and a seeded `random.Random`, so the data set is ours to
ship and checkable by anyone: English to French word translation (in the few-shot style of the seed's fourth
prompt), small arithmetic, list manipulation (sort, reverse, count, largest, smallest) and word tasks (capital
letters, spelling backwards, counting letters). Records use the Alpaca layout: `instruction`, `input` ("" where
there is none), `output`. Answers are short so that every formatted example fits the tiny preset's 256 tokens.
The output is byte-identical on every run (fixed seed, fixed order, no timestamps); `--check` proves it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from llama_ref.formats.atomic import atomic_write

ASSETS = Path(__file__).resolve().parent.parent / "llama_ref" / "assets"
OUTPUT = ASSETS / "instructions.json"
SEED = 0

# English => French, everyday words and the three pairs of the seed's few-shot prompt (its "girafe" spelling kept).
FRENCH = [
    ("sea otter", "loutre de mer"), ("peppermint", "menthe poivrée"), ("plush girafe", "girafe peluche"),
    ("cheese", "fromage"), ("cat", "chat"), ("dog", "chien"), ("house", "maison"), ("water", "eau"),
    ("bread", "pain"), ("apple", "pomme"), ("book", "livre"), ("tree", "arbre"), ("sun", "soleil"),
    ("moon", "lune"), ("car", "voiture"), ("milk", "lait"), ("fish", "poisson"), ("bird", "oiseau"),
    ("flower", "fleur"), ("red", "rouge"), ("green", "vert"), ("blue", "bleu"), ("white", "blanc"),
    ("black", "noir"), ("chair", "chaise"), ("door", "porte"), ("window", "fenêtre"), ("school", "école"),
    ("friend", "ami"), ("mother", "mère"), ("father", "père"), ("sister", "sœur"), ("brother", "frère"),
    ("child", "enfant"), ("city", "ville"), ("river", "rivière"), ("sea", "mer"), ("mountain", "montagne"),
    ("snow", "neige"), ("rain", "pluie"), ("wind", "vent"), ("night", "nuit"), ("morning", "matin"),
    ("evening", "soir"), ("week", "semaine"), ("hand", "main"), ("head", "tête"), ("heart", "cœur"),
    ("horse", "cheval"), ("cow", "vache"), ("mouse", "souris"), ("egg", "œuf"), ("butter", "beurre"),
    ("sugar", "sucre"), ("salt", "sel"), ("coffee", "café"), ("tea", "thé"), ("wine", "vin"),
    ("chocolate", "chocolat"), ("strawberry", "fraise"), ("lemon", "citron"), ("garden", "jardin"),
    ("kitchen", "cuisine"), ("bed", "lit"), ("key", "clé"), ("music", "musique"), ("ice cream", "glace"),
    ("red wine", "vin rouge"), ("green apple", "pomme verte"), ("good morning", "bonjour"),
    ("thank you", "merci"), ("goodbye", "au revoir"),
]
WORDS = [
    "apple", "river", "garden", "window", "bread", "cloud", "table", "music", "orange", "pencil", "kettle",
    "summer", "winter", "forest", "bridge", "letter", "yellow", "number", "basket", "candle", "market", "planet",
    "rabbit", "silver", "tomato", "violin", "island", "ladder", "jacket", "butter", "lemon", "tiger", "pear",
    "plum", "cat", "dog", "train", "boat", "chair", "spoon",
]
NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

Record = dict[str, str]


def _join(items: list) -> str:
    return ", ".join(str(x) for x in items)


def _few_shot(rng: random.Random, target: tuple[str, str]) -> str:
    shots = rng.sample([p for p in FRENCH if p != target], 2)
    return "".join(f"{en} => {fr}\n" for en, fr in shots) + f"{target[0]} =>"


def translation(rng: random.Random) -> list[Record]:
    out = []
    for pair in FRENCH:
        out.append(dict(instruction="Translate English to French.", input=_few_shot(rng, pair), output=pair[1]))
        out.append(dict(instruction=f"Translate to French: {pair[0]}", input="", output=pair[1]))
        if rng.random() < 0.5:
            out.append(dict(instruction="What is the French word for this?", input=pair[0], output=pair[1]))
    return out


def arithmetic(rng: random.Random) -> list[Record]:
    out = []
    for _ in range(45):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        out.append(dict(instruction=f"What is {a} + {b}?", input="", output=str(a + b)))
    for _ in range(30):
        a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
        out.append(dict(instruction=f"What is {a} - {b}?", input="", output=str(a - b)))
    for _ in range(30):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        out.append(dict(instruction=f"What is {a} times {b}?", input="", output=str(a * b)))
    for _ in range(20):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        out.append(dict(instruction="Add the two numbers.", input=f"{a}, {b}", output=str(a + b)))
    return out


def lists(rng: random.Random) -> list[Record]:
    out = []
    for _ in range(25):
        xs = rng.sample(range(100), rng.randint(3, 5))
        if rng.random() < 0.5:
            out.append(dict(instruction=f"Sort these numbers: {_join(xs)}", input="", output=_join(sorted(xs))))
        else:
            out.append(dict(instruction="Sort these numbers from smallest to largest.", input=_join(xs),
                            output=_join(sorted(xs))))
    for _ in range(15):
        xs = rng.sample(range(100), rng.randint(3, 5))
        out.append(dict(instruction="Sort these numbers from largest to smallest.", input=_join(xs),
                        output=_join(sorted(xs, reverse=True))))
    for _ in range(25):
        xs = rng.sample(WORDS, rng.randint(3, 4))
        out.append(dict(instruction="Reverse the order of this list.", input=_join(xs), output=_join(xs[::-1])))
    for _ in range(20):
        xs = rng.sample(WORDS, rng.randint(2, 6))
        out.append(dict(instruction="How many items are in this list?", input=_join(xs), output=str(len(xs))))
    for _ in range(15):
        xs = rng.sample(range(100), rng.randint(3, 5))
        which, pick = rng.choice([("largest", max), ("smallest", min)])
        out.append(dict(instruction=f"Which is the {which} number: {_join(xs)}?", input="", output=str(pick(xs))))
    return out


def words(rng: random.Random) -> list[Record]:
    out = []
    for w in rng.sample(WORDS, 20):
        out.append(dict(instruction=f"Write this word in capital letters: {w}", input="", output=w.upper()))
    for w in rng.sample(WORDS, 20):
        out.append(dict(instruction="Spell this word backwards.", input=w, output=w[::-1]))
    for w in rng.sample(WORDS, 15):
        out.append(dict(instruction=f"How many letters are in the word {w}?", input="", output=str(len(w))))
    for n, w in enumerate(NUMBER_WORDS, start=1):
        out.append(dict(instruction="Write this number as a digit.", input=w, output=str(n)))
    return out


def build(seed: int = SEED) -> list[Record]:
    """All examples, shuffled with `seed`; an (instruction, input) pair never appears twice."""
    rng = random.Random(seed)
    records: list[Record] = []
    seen: set[tuple[str, str]] = set()
    for make in (translation, arithmetic, lists, words):
        for r in make(rng):
            if (r["instruction"], r["input"]) not in seen:
                seen.add((r["instruction"], r["input"]))
                records.append(r)
    rng.shuffle(records)
    return records


def dumps(records: list[Record]) -> bytes:
    """A JSON array with one record per line (readable diffs), UTF-8, no ASCII escaping, final newline."""
    lines = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    return f"[\n{lines}\n]\n".encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help="data set file (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="compare with --output instead of writing it")
    args = parser.parse_args(argv)

    records = build()
    data = dumps(records)
    if args.check:
        shipped = args.output.read_bytes() if args.output.exists() else None
        if shipped != data:
            print(f"{args.output} differs from a fresh generation; rerun without --check", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date ({len(records)} examples, {len(data)} bytes)")
        return 0
    atomic_write(args.output, data)
    print(f"wrote {args.output} ({len(records)} examples, {len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
