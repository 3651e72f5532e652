"""What the real-model quality benchmark asks: two new skills SmolLM2-135M-Instruct cannot do yet, and what it can.

New skills (chat prompts; every set is drawn from a seeded generator, so the same on every machine):
- ``rule``: write a sequence of letters backwards, asked as "Apply the quorp rule: c f a" (answer "a f c"): a
  procedure the model has not been asked for by that name, applied in context. Training, validation and test: 3 to 5
  letters; out of distribution (``rule_longer``): 6 to 8 letters.
- ``code``: encode a list of words with the "zent code", 8 made-up word-to-word associations ("red" is "window"):
  new facts, used compositionally. Training, validation and test: 2 or 3 words, asked in one of three wordings; out
  of distribution (``code_reworded``): the same kind of lists, asked in three wordings training never uses.
Answers are scored by exact match of the greedy answer (up to the end-of-turn token) with the expected text.

Retention:
- ``GENERAL_QUESTIONS``: short questions with the words a right answer contains. Only the questions the base model
  answers right (greedy) count; retention is how many of those stay right.
- ``GENERIC_INSTRUCTIONS``: open requests whose greedy answers by the base model are the reference of the drift
  measure (their per-token NLL under the fine-tuned model, against the base's).
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

LETTERS = string.ascii_lowercase
RULE_LENGTHS = range(3, 6)
RULE_LONGER_LENGTHS = range(6, 9)

# every word is one token of SmolLM2's tokenizer, with and without a leading space
CODE = dict(zip("red blue green cat dog tree sun book".split(), "window bread coin bridge salt horse glass card".split()))
CODE_LENGTHS = (2, 3)
CODE_WORDINGS = ("Encode with the zent code: {}", "Zent code for: {}", "Write in zent code: {}")
CODE_REWORDINGS = ('What is "{}" in the zent code?', "Please translate this into zent code: {}",
                   "Using the zent code, encode: {}")
SKILLS = ("rule", "code")
OUT_OF_DISTRIBUTION = {"rule": "rule_longer", "code": "code_reworded"}


@dataclass(frozen=True)
class Example:
    skill: str
    prompt: str
    answer: str


def rule_answer(letters: tuple[str, ...]) -> str:
    return " ".join(reversed(letters))


def rule_example(letters: tuple[str, ...]) -> Example:
    return Example("rule", "Apply the quorp rule: " + " ".join(letters), rule_answer(letters))


def code_example(words: tuple[str, ...], wording: str) -> Example:
    return Example("code", wording.format(" ".join(words)), " ".join(CODE[word] for word in words))


def splits(train: int, validation: int, test: int, out_of_distribution: int, seed: int) -> dict[str, list[Example]]:
    """Per skill, sets of distinct inputs, disjoint across all sets of the skill (a reworded list is never one
    training asks in other words either): ``{skill}_{split}`` for train/validation/test, and the two
    out-of-distribution sets."""
    rng = random.Random(seed)
    seen = set()

    def draw(count, make_input, make_example):
        examples = []
        while len(examples) < count:
            key = make_input()
            if key not in seen:
                seen.add(key)
                examples.append(make_example(key))
        return examples

    def letters(lengths):
        return lambda: tuple(rng.choice(LETTERS) for _ in range(rng.choice(lengths)))

    def words():
        return tuple(rng.sample(sorted(CODE), rng.choice(CODE_LENGTHS)))

    sets = {}
    for name, count in (("validation", validation), ("test", test), ("train", train)):
        sets[f"rule_{name}"] = draw(count, letters(RULE_LENGTHS), rule_example)
    sets["rule_longer"] = draw(out_of_distribution, letters(RULE_LONGER_LENGTHS), rule_example)
    for name, count in (("validation", validation), ("test", test), ("train", train)):
        sets[f"code_{name}"] = draw(count, words, lambda key: code_example(key, rng.choice(CODE_WORDINGS)))
    sets["code_reworded"] = draw(out_of_distribution, words, lambda key: code_example(key, rng.choice(CODE_REWORDINGS)))
    return sets


def exact_match(generated: str, example: Example) -> bool:
    return generated.strip() == example.answer


# (question, words one of which a right answer contains, matched as whole words, case-insensitively)
GENERAL_QUESTIONS = [
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of Spain?", ("Madrid",)),
    ("What is the capital of England?", ("London",)),
    ("What is the capital of Russia?", ("Moscow",)),
    ("What is the capital of Egypt?", ("Cairo",)),
    ("What is the capital of Canada?", ("Ottawa",)),
    ("What is the capital of China?", ("Beijing",)),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("What is the closest star to the Earth?", ("Sun",)),
    ("What natural satellite orbits the Earth?", ("Moon",)),
    ("What is the chemical symbol for water?", ("H2O",)),
    ("What gas do plants absorb from the air?", ("carbon dioxide", "CO2")),
    ("What gas do humans need to breathe to live?", ("oxygen",)),
    ("At what temperature in Celsius does water freeze?", ("0", "zero")),
    ("At what temperature in Celsius does water boil?", ("100",)),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("What is the tallest mountain in the world?", ("Everest",)),
    ("What is the longest river in Africa?", ("Nile",)),
    ("How many days are there in a week?", ("7", "seven")),
    ("How many months are there in a year?", ("12", "twelve")),
    ("How many hours are there in a day?", ("24", "twenty-four")),
    ("How many legs does a spider have?", ("8", "eight")),
    ("How many continents are there?", ("7", "seven")),
    ("What is 2 plus 2?", ("4", "four")),
    ("What is 5 times 3?", ("15", "fifteen")),
    ("What is 10 minus 4?", ("6", "six")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What color are ripe bananas?", ("yellow",)),
    ("What color is grass?", ("green",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What is the opposite of up?", ("down",)),
    ("What animal is known as the king of the jungle?", ("lion",)),
    ("What is the largest mammal?", ("blue whale", "whale")),
    ("What do bees make?", ("honey",)),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("Who painted the Mona Lisa?", ("Leonardo", "Vinci")),
    ("Who developed the theory of relativity?", ("Einstein",)),
    ("What is the freezing point of water in Fahrenheit?", ("32",)),
    ("What is the hardest natural substance?", ("diamond",)),
    ("What language is spoken in Brazil?", ("Portuguese",)),
    ("What is the main language spoken in Mexico?", ("Spanish",)),
    ("What is the currency of the United States?", ("dollar",)),
    ("What organ pumps blood through the body?", ("heart",)),
    ("What is the boiling point of water in Fahrenheit?", ("212",)),
    ("Which is the smallest prime number?", ("2", "two")),
    ("What is the square root of 9?", ("3", "three")),
]

GENERIC_INSTRUCTIONS = [
    "Give me a tip for staying focused while studying.",
    "Write one sentence about the ocean.",
    "Describe a cat in a few words.",
    "What should I pack for a day at the beach?",
    "Suggest a name for a small coffee shop.",
    "Explain what a computer is to a child.",
    "Write a short greeting for a birthday card.",
    "Why is exercise good for you?",
    "Give me an idea for a quick healthy breakfast.",
    "What is a good way to start a conversation with a stranger?",
    "Describe the weather in autumn.",
    "How do I make a cup of tea?",
]


def answers_right(generated: str, words: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<!\w){re.escape(word)}(?!\w)", generated, re.IGNORECASE) for word in words)
