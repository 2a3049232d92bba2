"""A multi-document question-answering set in plain English, deterministic in a seed.

No PyPI package ships a RAG set with its passages, so we generate one: short documents,
each about one invented organisation (so the model cannot answer from memory), with
three checkable facts — its city, its founder, its founding year. A question asks one
fact of one organisation; its documents are the one that holds the answer and
distractors about other organisations, in shuffled order.

An answer counts as correct when the expected string appears in the reply
(case-insensitive): the replies are free text such as "It was founded by Ada Lind.".

Example:
    >>> items = qa_set(3, seed=0)
    >>> len(items), len(items[0].documents)
    (3, 3)
    >>> items[0].answer in items[0].documents[items[0].gold]
    True
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["QAItem", "qa_set", "is_correct"]

_SYLLABLES = ["vel", "mor", "bran", "tis", "kal", "dor", "quen", "sar", "lio", "fen", "rav", "ost", "mir", "tal"]
_KINDS = ["research institute", "music school", "shipping company", "botanical garden", "public library", "observatory"]
_CITIES = ["Brantfield", "Corvane", "Elmsworth", "Dunmere", "Halvik", "Ostrava Nova", "Pellingham", "Quarrow"]
_FIRST = ["Ada", "Tomas", "Ines", "Jonah", "Mira", "Oskar", "Lena", "Felix", "Nora", "Hugo"]
_LAST = ["Lind", "Marek", "Okafor", "Brandt", "Castell", "Ferreira", "Holm", "Varga", "Quist", "Ruiz"]

_QUESTIONS = {
    "city": "In which city is {name}?",
    "founder": "Who founded {name}?",
    "year": "In which year was {name} founded?",
}


@dataclass(frozen=True)
class QAItem:
    """One question.

    Args:
        question: the question text.
        answer: the short expected answer.
        documents: the documents of the request, in their shuffled order.
        gold: the index in ``documents`` of the one holding the answer.
        fact: which fact is asked (``"city"``, ``"founder"`` or ``"year"``).
    """

    question: str
    answer: str
    documents: tuple[str, ...]
    gold: int
    fact: str


def _organisation(rng: random.Random, used: set[str]) -> dict[str, str]:
    while True:
        name = "The " + "".join(rng.sample(_SYLLABLES, 2)).capitalize() + " " + rng.choice(["Institute", "Society"])
        if name not in used:
            used.add(name)
            break
    return {
        "name": name,
        "kind": rng.choice(_KINDS),
        "city": rng.choice(_CITIES),
        "founder": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
        "year": str(rng.randint(1850, 2010)),
    }


def _document(org: dict[str, str]) -> str:
    return (
        f"{org['name']} is a {org['kind']} in {org['city']}. "
        f"It was founded in {org['year']} by {org['founder']}, "
        f"and it is known in {org['city']} for its open days."
    )


def qa_set(n: int, seed: int = 0, documents_per_question: int = 3) -> list[QAItem]:
    """``n`` questions, each with ``documents_per_question`` documents (one gold, the
    rest distractors from a shared pool), shuffled, deterministic in ``seed``."""
    if n < 1 or documents_per_question < 1:
        raise ValueError(f"need n >= 1 and documents_per_question >= 1, got {n}, {documents_per_question}")
    rng = random.Random(seed)
    used: set[str] = set()
    pool = [_organisation(rng, used) for _ in range(max(2 * documents_per_question, n // 2 + documents_per_question))]
    items = []
    for _ in range(n):
        orgs = rng.sample(pool, documents_per_question)
        fact = rng.choice(sorted(_QUESTIONS))
        rng.shuffle(orgs)
        gold = rng.randrange(documents_per_question)
        target = orgs[gold]
        items.append(
            QAItem(
                question=_QUESTIONS[fact].format(name=target["name"]),
                answer=target[fact],
                documents=tuple(_document(o) for o in orgs),
                gold=gold,
                fact=fact,
            )
        )
    return items


def is_correct(reply: str, answer: str) -> bool:
    """The expected answer appears in the reply, case-insensitive."""
    return answer.lower() in reply.lower()
