"""The final number of a GSM8K-style solution, and accuracy against the references.

MetaMathQA responses end with "The answer is: 18" and GSM8K references with "#### 18", so a model fine-tuned on
MetaMathQA states its answer after one of these markers. Numbers compare as exact rationals: "18.00" equals "18" and
"20/14" equals "10/7".
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

ANSWER_MARKERS = ("The answer is", "The final answer is", "####")
# an optionally signed number with thousands separators and decimals, or a fraction of two such numbers
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*-?\d[\d,]*(?:\.\d+)?)?")


def extract_answer(text: str) -> Optional[str]:
    """The rest of the line after the last answer marker (colon and spaces dropped), or None without a marker."""
    position, marker = max((text.rfind(marker), marker) for marker in ANSWER_MARKERS)
    if position < 0:
        return None
    answer = text[position + len(marker):].split("\n", 1)[0]
    return answer.lstrip(": ").strip()


def answer_value(text: str) -> Optional[Fraction]:
    """The first number of the stated answer as an exact rational, or None when there is none."""
    answer = extract_answer(text)
    match = _NUMBER.search(answer) if answer is not None else None
    if match is None:
        return None
    numerator, _, denominator = match.group().replace(",", "").replace(" ", "").partition("/")
    if denominator and Fraction(denominator) == 0:
        return None
    return Fraction(numerator) / (Fraction(denominator) if denominator else 1)


def accuracy(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions whose stated number equals the reference's; a prediction without one is wrong."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
    if not references:
        raise ValueError("No references to score.")
    correct = 0
    for prediction, reference in zip(predictions, references):
        expected = answer_value(reference)
        if expected is None:
            raise ValueError(f"Reference without a final answer after {ANSWER_MARKERS}: {reference[-200:]!r}")
        correct += answer_value(prediction) == expected
    return correct / len(references)
