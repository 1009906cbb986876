#!/usr/bin/env python3
"""Writes the embedded demo dataset, python/moetune/train/assets/demo.jsonl.

A few hundred short chat records (`messages`: user / assistant) of simple
deterministic tasks a tiny randomly initialised MoE model can learn with LoRA
in a couple of CPU minutes: look-up facts asked in several phrasings
(animal sounds, opposites, colours, next number). Each fact appears in several
phrasings, so a held-out record is a new phrasing of a fact seen in training
and the eval loss falls too. Seeded and deterministic: rerunning it rewrites
the same file.
"""

import json
import os
import random

SOUNDS = {
    "cow": "moo",
    "dog": "woof",
    "cat": "meow",
    "duck": "quack",
    "sheep": "baa",
    "pig": "oink",
    "horse": "neigh",
    "owl": "hoot",
    "lion": "roar",
    "snake": "hiss",
    "bee": "buzz",
    "frog": "ribbit",
    "mouse": "squeak",
    "crow": "caw",
}
OPPOSITES = {
    "hot": "cold",
    "up": "down",
    "big": "small",
    "fast": "slow",
    "day": "night",
    "happy": "sad",
    "open": "closed",
    "light": "dark",
    "old": "new",
    "wet": "dry",
    "early": "late",
    "full": "empty",
    "hard": "soft",
    "loud": "quiet",
    "left": "right",
    "high": "low",
}
COLOURS = {
    "sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "banana": "yellow",
    "blood": "red",
    "orange": "orange",
    "chocolate": "brown",
    "lemon": "yellow",
    "leaf": "green",
    "cloud": "white",
    "tomato": "red",
}
NUMBERS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
]

TEMPLATES = {
    "sound": (
        SOUNDS,
        [
            "What does a {k} say?",
            "What sound does a {k} make?",
            "Which sound is made by a {k}?",
            "Tell me the sound of a {k}.",
            "How does a {k} sound?",
        ],
        ["A {k} says {v}.", "{v}"],
    ),
    "opposite": (
        OPPOSITES,
        [
            "What is the opposite of {k}?",
            "Give the opposite of {k}.",
            "Name the opposite of {k}.",
            "What word means the opposite of {k}?",
            "Opposite of {k}?",
        ],
        ["The opposite of {k} is {v}.", "{v}"],
    ),
    "colour": (
        COLOURS,
        [
            "What colour is the {k}?",
            "Which colour does the {k} have?",
            "Tell me the colour of the {k}.",
            "Name the colour of the {k}.",
            "The {k} is what colour?",
        ],
        ["The {k} is {v}.", "{v}"],
    ),
    "next": (
        {NUMBERS[i]: NUMBERS[i + 1] for i in range(len(NUMBERS) - 1)},
        [
            "What number comes after {k}?",
            "Which number follows {k}?",
            "What is {k} plus one?",
            "Count on from {k}: what is next?",
            "Say the number after {k}.",
        ],
        ["After {k} comes {v}.", "{v}"],
    ),
}


def records():
    out = []
    for task, (facts, questions, answers) in TEMPLATES.items():
        for k, v in facts.items():
            for q in questions:
                # One answer style per task: the full sentence (the short form would
                # make the target ambiguous for the same question).
                a = answers[0].format(k=k, v=v)
                a = a[0].upper() + a[1:]
                out.append(
                    {
                        "messages": [{"role": "user", "content": q.format(k=k)}, {"role": "assistant", "content": a}],
                        "task": task,
                    }
                )
    random.Random(1234).shuffle(out)
    return out


def main():
    path = os.path.join(os.path.dirname(__file__), "..", "python", "moetune", "train", "assets", "demo.jsonl")
    recs = records()
    with open(path, "w") as fh:
        for r in recs:
            fh.write(json.dumps(r) + "\n")
    print(f"wrote {len(recs)} records to {os.path.normpath(path)}")


if __name__ == "__main__":
    main()
