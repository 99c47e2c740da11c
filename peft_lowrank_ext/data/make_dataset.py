"""Generate the small review-sentiment data set bundled with ``peft_lowrank_ext``.

The data is synthetic and written from scratch for this project: short English reviews of
products, films, restaurants and hotels, labelled ``1`` (positive) or ``0`` (negative). It is built
from templates crossed with vocabulary so that a frozen sentence encoder with a linear head does
not solve it at once, while a small adapter learns it in a couple of epochs:

* plain statements ("The battery life was superb."),
* negations that flip the polarity of the adjective ("The acting was not convincing at all."),
* contrasts where the clause after "but"/"although" decides the label,
* recommendations, return intentions and star ratings written in words,
* hedges and intensifiers, surface noise (typos, casing, punctuation) and, in the training split
  only, a few flipped labels.

Part of the adjective vocabulary only ever occurs in the evaluation split, so the evaluation also
measures how well the pretrained encoder transfers to words the adapter never saw.

Run ``python -m peft_lowrank_ext.data.make_dataset`` (or this file) to rewrite ``train.csv`` and
``eval.csv`` next to it; the output is byte-for-byte deterministic.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

SEED = 20240611
N_TRAIN = 800
N_EVAL = 200
TRAIN_LABEL_NOISE = 0.03

DOMAINS: dict[str, dict[str, list[str]]] = {
    "product": {
        "items": ["headphones", "blender", "laptop", "backpack", "phone case", "coffee grinder",
                  "vacuum cleaner", "desk lamp", "smartwatch", "kettle", "keyboard", "tent"],
        "aspects": ["battery life", "build quality", "sound", "price", "customer support",
                    "design", "packaging", "manual", "warranty service", "screen"],
        "verbs": ["bought", "ordered", "used", "tested", "returned"],
    },
    "film": {
        "items": ["movie", "documentary", "sequel", "thriller", "comedy", "animated film",
                  "drama", "horror film", "biopic", "mini-series"],
        "aspects": ["plot", "acting", "soundtrack", "pacing", "ending", "dialogue",
                    "cinematography", "script", "lead performance", "special effects"],
        "verbs": ["watched", "saw", "streamed", "sat through", "rented"],
    },
    "restaurant": {
        "items": ["restaurant", "cafe", "pizza place", "sushi bar", "bistro", "food truck",
                  "steakhouse", "bakery", "noodle shop", "diner"],
        "aspects": ["food", "service", "atmosphere", "wine list", "dessert", "portion size",
                    "staff", "menu", "coffee", "waiting time"],
        "verbs": ["visited", "tried", "ate at", "had dinner at", "booked"],
    },
    "hotel": {
        "items": ["hotel", "hostel", "guesthouse", "resort", "motel", "holiday flat"],
        "aspects": ["room", "breakfast", "location", "front desk", "bed", "bathroom",
                    "pool", "wifi", "view", "check-in"],
        "verbs": ["stayed at", "booked", "spent a week at", "checked into"],
    },
}

# Adjectives: the first part of each list is shared by both splits, the tail only appears in eval.
POS_ADJ = ["excellent", "wonderful", "fantastic", "superb", "impressive", "delightful", "great",
           "reliable", "outstanding", "lovely", "brilliant", "pleasant", "solid", "terrific",
           "enjoyable", "flawless", "charming", "remarkable", "top-notch", "first-rate",
           # eval-only
           "splendid", "stellar", "exquisite", "marvelous", "commendable"]
NEG_ADJ = ["awful", "terrible", "disappointing", "bland", "flimsy", "mediocre", "dreadful",
           "boring", "sloppy", "poor", "horrible", "frustrating", "useless", "lousy", "dull",
           "unpleasant", "shoddy", "annoying", "subpar", "forgettable",
           # eval-only
           "abysmal", "atrocious", "dismal", "lackluster", "appalling"]
N_SHARED_ADJ = 20

INTENSIFIERS = ["", "", "", "really ", "truly ", "quite ", "absolutely ", "genuinely ", "rather ",
                "pretty ", "surprisingly ", "honestly "]
NEGATORS = ["was not {i}{a}", "wasn't {a} at all", "was far from {a}", "was never {a}",
            "was hardly {a}", "was not exactly {a}"]
OVERALL_POS = ["Overall I was happy with it.", "I would buy it again.",
               "Worth every penny.", "Five stars from me.", "It exceeded my expectations.",
               "I left with a smile.", "Highly recommended."]
OVERALL_NEG = ["Overall I was unhappy with it.", "I want my money back.",
               "A complete waste of money.", "One star from me.", "It fell short of my expectations.",
               "I left annoyed.", "Avoid it."]
STARS = ["zero", "one", "two", "three", "four", "five"]
OPENERS = ["", "", "", "Honestly, ", "Well, ", "To be fair, ", "In short, ", "Update: ", "So, "]


def _polar_adj(rng: random.Random, positive: bool, split: str) -> str:
    words = POS_ADJ if positive else NEG_ADJ
    if split == "train":
        words = words[:N_SHARED_ADJ]
    elif rng.random() < 0.5:  # eval: half of the time draw from the unseen tail
        words = words[N_SHARED_ADJ:]
    return rng.choice(words)


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def _review(rng: random.Random, label: int, split: str) -> str:
    """Return one review whose sentiment is ``label`` (1 positive, 0 negative)."""
    dom = DOMAINS[rng.choice(sorted(DOMAINS))]
    item = rng.choice(dom["items"])
    a1, a2 = rng.sample(dom["aspects"], 2)
    verb = rng.choice(dom["verbs"])
    pos = bool(label)
    intens = rng.choice(INTENSIFIERS)
    kind = rng.choices(
        ["plain", "negated", "contrast", "although", "recommend", "stars", "return", "two", "question"],
        weights=[14, 14, 16, 10, 9, 8, 8, 13, 8],
    )[0]

    if kind == "plain":
        adj = _polar_adj(rng, pos, split)
        text = rng.choice([
            f"The {a1} of this {item} was {intens}{adj}.",
            f"I {verb} this {item} last week and the {a1} is {intens}{adj}.",
            f"What {_article(adj)} {adj} {item}, the {a1} especially.",
            f"{adj.capitalize()} {a1}, {adj} {item}.",
        ])
    elif kind == "negated":
        # negating an adjective of the opposite polarity gives this label
        adj = _polar_adj(rng, not pos, split)
        neg = rng.choice(NEGATORS).format(i=intens, a=adj)
        text = rng.choice([
            f"The {a1} {neg}.",
            f"I {verb} the {item}; the {a1} {neg}.",
            f"To my surprise, the {a1} of this {item} {neg}.",
        ])
    elif kind == "contrast":
        first = _polar_adj(rng, not pos, split)
        second = _polar_adj(rng, pos, split)
        text = rng.choice([
            f"The {a1} was {first}, but the {a2} was {intens}{second}.",
            f"The {a1} was {first}, but overall the {item} was {intens}{second}.",
            f"Some say the {item} is {first}, but I found it {intens}{second}.",
        ])
    elif kind == "although":
        first = _polar_adj(rng, not pos, split)
        second = _polar_adj(rng, pos, split)
        text = rng.choice([
            f"Although the {a1} was {first}, the {item} itself was {intens}{second}.",
            f"Even though the {a1} was {first}, I thought the {a2} was {second}.",
        ])
    elif kind == "recommend":
        adv = rng.choice(["definitely", "happily", "certainly", "gladly"]) if pos else rng.choice(
            ["never", "not", "in no way", "hardly"])
        text = rng.choice([
            f"I would {adv} recommend this {item} to a friend.",
            f"Would I recommend the {item}? I would {adv} do so.",
        ])
        if not pos and rng.random() < 0.5:
            text = rng.choice([f"I cannot recommend this {item}.", f"Do not bother with this {item}."])
    elif kind == "stars":
        n = rng.choice([4, 5]) if pos else rng.choice([0, 1, 2])
        text = rng.choice([
            f"{STARS[n].capitalize()} stars out of five for the {item}.",
            f"I {verb} the {item} and give it {STARS[n]} stars out of five.",
            f"Rating for the {a1}: {STARS[n]} out of five.",
        ])
    elif kind == "return":
        if pos:
            phrase = rng.choice(["would happily do it again", "can't wait for the next time",
                                 "will definitely be back for more", "would gladly repeat it"])
        else:
            phrase = rng.choice(["would not do it again", "regret every minute of it",
                                 "will never make that mistake again", "wish we had gone elsewhere"])
        text = f"We {verb} the {item} and {phrase}."
    elif kind == "two":
        adj = _polar_adj(rng, pos, split)
        closing = rng.choice(OVERALL_POS if pos else OVERALL_NEG)
        text = f"The {a1} was {intens}{adj}. {closing}"
    else:  # question + answer
        adj = _polar_adj(rng, pos, split)
        text = rng.choice([
            f"Was the {a1} any good? It was {intens}{adj}.",
            f"How was the {item}? {adj.capitalize()}, to be honest.",
        ])

    opener = rng.choice(OPENERS)
    if opener.endswith(", ") and not text.startswith(("I ", "I'")):
        text = text[0].lower() + text[1:]
    text = opener + text
    return _add_noise(rng, text)


def _add_noise(rng: random.Random, text: str) -> str:
    r = rng.random()
    if r < 0.06 and len(text) > 12:  # swap two adjacent letters
        i = rng.randrange(1, len(text) - 2)
        if text[i].isalpha() and text[i + 1].isalpha():
            text = text[:i] + text[i + 1] + text[i] + text[i + 2:]
    elif r < 0.10:
        text = text.lower()
    elif r < 0.13:
        text = text.rstrip(".") + "!!"
    elif r < 0.15:
        text = text.upper()
    return text


def generate(n: int, split: str, rng: random.Random, seen: set[str]) -> list[tuple[str, int]]:
    """Return ``n`` unique ``(text, label)`` rows (half positive) not already in ``seen``."""
    rows: list[tuple[str, int]] = []
    while len(rows) < n:
        label = len(rows) % 2
        text = _review(rng, label, split)
        if text in seen:
            continue
        seen.add(text)
        rows.append((text, label))
    rng.shuffle(rows)
    return rows


def build(seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL,
          label_noise: float = TRAIN_LABEL_NOISE) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Return ``(train_rows, eval_rows)``; evaluation texts never occur in the training split."""
    rng = random.Random(seed)
    seen: set[str] = set()
    eval_rows = generate(n_eval, "eval", rng, seen)
    train_rows = generate(n_train, "train", rng, seen)
    n_flip = round(label_noise * n_train)
    for i in rng.sample(range(n_train), n_flip):
        text, label = train_rows[i]
        train_rows[i] = (text, 1 - label)
    return train_rows, eval_rows


def write_csv(path: Path, rows: list[tuple[str, int]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["text", "label"])
        w.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--seed", type=int, default=SEED)
    args = p.parse_args(argv)
    train_rows, eval_rows = build(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(args.out_dir / "train.csv", train_rows)
    write_csv(args.out_dir / "eval.csv", eval_rows)
    print(f"wrote {len(train_rows)} training and {len(eval_rows)} evaluation rows to {args.out_dir}")


if __name__ == "__main__":
    main()
