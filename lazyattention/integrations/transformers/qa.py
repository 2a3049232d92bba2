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
import re
import string
from collections import Counter
from dataclasses import dataclass

__all__ = [
    "QAItem",
    "qa_set",
    "is_correct",
    "RELATIONS",
    "WikiItem",
    "wiki_set",
    "PROSE",
    "normalize_answer",
    "subspan_em",
    "token_f1",
]

_PUNCTUATION = set(string.punctuation)

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


# ---------------------------------------------------------------------- the 2Wiki-like set
#
# Each split draws its entities, values, passage sentences and question wordings from its
# own pools, so a held-out question shares no name, no fact and no template with training.

_POOLS = {
    "train": {
        "syllables": ["vel", "mor", "bran", "tis", "kal", "dor", "quen", "sar", "lio", "fen", "rav", "ost", "mir"],
        "cities": [
            "Brantfield",
            "Corvane",
            "Elmsworth",
            "Dunmere",
            "Halvik",
            "Pellingham",
            "Quarrow",
            "Ashby Cross",
            "Marlowe",
            "Tessaly",
            "Grimsund",
            "Valdora",
            "Kestrel Bay",
            "Norhaven",
            "Ulverton",
            "Fairholm",
        ],
        "first": [
            "Ada",
            "Tomas",
            "Ines",
            "Jonah",
            "Mira",
            "Oskar",
            "Lena",
            "Felix",
            "Nora",
            "Hugo",
            "Clara",
            "Emil",
            "Sofia",
            "Viktor",
            "Alma",
            "Rafael",
        ],
        "endings": ["berg", "son", "ström", "ley", "ford"],
        "years": range(1801, 2000, 2),
        "org_intro": ["{name} is {kind} based in {city}.", "{name}, {kind}, has its home in {city}."],
        "org_founding": ["It was founded in {year} by {founder}.", "{founder} established it in {year}."],
        "person_intro": [
            "{name} is {job} who was born in {city} in {year}.",
            "Born in {year} in {city}, {name} works as {job}.",
        ],
        "person_employer": ["{pron} works at {employer}.", "{pron} has a position at {employer}."],
        "questions": {
            "org_city": ["In which city is {org} based?", "Where is {org} located?"],
            "org_founder": ["Who founded {org}?"],
            "org_year": ["In which year was {org} founded?"],
            "person_city": ["Where was {person} born?"],
            "person_year": ["In which year was {person} born?"],
            "founder_city": ["Where was the founder of {org} born?"],
            "founder_year": ["In which year was the founder of {org} born?"],
            "employer_city": ["In which city is the organisation that {person} works for?"],
            "employer_founder": ["Who founded the organisation where {person} works?"],
        },
    },
    "heldout": {
        "syllables": ["zan", "pel", "gor", "wyn", "tha", "bel", "cor", "nim", "yar", "sil", "dro", "ket", "lum"],
        "cities": [
            "Westmarch",
            "Orrinford",
            "Sablehurst",
            "Idrisport",
            "Calloway",
            "Brightwater",
            "Thornby",
            "Lowenmark",
            "Rosskill",
            "Amberley",
            "Drummond Hill",
            "Vessington",
            "Harrowgate",
            "Selby Moor",
            "Penrith Vale",
            "Yarmouth Deep",
        ],
        "first": [
            "Agnes",
            "Bruno",
            "Celia",
            "Dmitri",
            "Elsa",
            "Franz",
            "Greta",
            "Henrik",
            "Irene",
            "Julius",
            "Karin",
            "Lorenzo",
            "Marta",
            "Nils",
            "Olga",
            "Pavel",
        ],
        "endings": ["wick", "man", "ssen", "hart", "dale"],
        "years": range(1802, 2001, 2),
        "org_intro": ["{name} is {kind} located in {city}.", "Based in {city}, {name} is {kind}."],
        "org_founding": ["{founder} founded it in {year}.", "It dates back to {year}, when {founder} set it up."],
        "person_intro": [
            "{name}, {job}, was born in {year} in the city of {city}.",
            "{name} was born in {city} in {year} and became {job}.",
        ],
        "person_employer": ["{pron} is employed by {employer}.", "{pron} is on the staff of {employer}."],
        "questions": {
            "org_city": ["Which city is {org} in?"],
            "org_founder": ["Who is the founder of {org}?"],
            "org_year": ["When was {org} established?"],
            "person_city": ["What is the birthplace of {person}?"],
            "person_year": ["When was {person} born?"],
            "founder_city": ["What is the birthplace of the person who founded {org}?"],
            "founder_year": ["When was the founder of {org} born?"],
            "employer_city": ["Which city is home to the employer of {person}?"],
            "employer_founder": ["Who is the founder of the organisation that employs {person}?"],
        },
    },
}

#: What the relations ask and how many hops each takes.
RELATIONS = {
    "org_city": 1,
    "org_founder": 1,
    "org_year": 1,
    "person_city": 1,
    "person_year": 1,
    "founder_city": 2,
    "founder_year": 2,
    "employer_city": 2,
    "employer_founder": 2,
}

_ORG_NOUNS = ["Institute", "Society", "Foundation", "Academy", "Company", "Guild", "Trust", "Works"]
_JOBS = ["chemist", "architect", "violinist", "engineer", "historian", "botanist", "sculptor", "surgeon", "pilot"]
_MONTHS = ["January", "March", "April", "May", "June", "August", "September", "October", "November"]
_TOPICS = ["rivers", "old maps", "glassmaking", "birds", "weather", "railways", "textiles", "clocks", "bridges"]
_ORG_FILLER = [
    "Its main building has {n} floors and a {adj} courtyard.",
    "Every {month}, it holds an open day that draws about {big} visitors.",
    "Its library holds {big} volumes, many of them about {topic}.",
    "The {adj} garden behind it is looked after by {n} volunteers.",
    "It publishes a yearly report on {topic} that is read well beyond the region.",
    "Around {n} hundred people work there in several departments.",
    "A small museum on the ground floor shows its collection of {topic}.",
    "Its members meet on the first Monday of every month to discuss {topic}.",
    "The {adj} hall on its upper floor is rented out for concerts and weddings.",
    "It runs a scholarship that pays for {n} students each year.",
    "Visitors often mention the {adj} staircase and the view over the square.",
    "It keeps a fleet of {n} vans for its work across the province.",
    "Its annual budget is spent mostly on {topic} and on training.",
    "Local newspapers have written about its projects on {topic} many times.",
]
_PERSON_FILLER = [
    "{pron} has written {n} books about {topic}.",
    "{pron} speaks {n} languages and travels often.",
    "In {pron_poss} free time, {pron_low} collects {topic} and walks in the hills.",
    "{pron} gives public lectures on {topic} every {month}.",
    "Friends describe {pron_obj} as {adj} and patient.",
    "{pron} once spent a whole year studying {topic} abroad.",
    "{pron} lives in a {adj} house with a large garden.",
    "{pron} has received {n} awards for {pron_poss} work.",
    "Colleagues say that {pron_low} answers every letter by hand.",
    "{pron} plays the piano at {adj} gatherings of friends.",
    "{pron} keeps a diary about {topic} and has done so for {n} years.",
    "Every {month}, {pron_low} visits relatives in the countryside.",
    "{pron} once led a team of {n} people on a survey of {topic}.",
    "Neighbours know {pron_obj} for a {adj} bicycle and a large dog.",
]
_ADJECTIVES = ["quiet", "bright", "narrow", "famous", "old", "modern", "green", "spacious", "cheerful", "careful"]


@dataclass(frozen=True)
class WikiItem:
    """One question of the 2Wiki-like set.

    Args:
        question: the question text.
        answer: the short expected answer.
        documents: the passages of the request (gold and distractors), shuffled.
        gold: indices in ``documents`` of the passages the answer needs (one, or two for a bridge).
        relation: what is asked (a key of :data:`RELATIONS`).
        split: ``"train"`` or ``"heldout"``.
    """

    question: str
    answer: str
    documents: tuple[str, ...]
    gold: tuple[int, ...]
    relation: str
    split: str

    @property
    def hops(self) -> int:
        """1 for a single-hop question, 2 for a bridge question (the passages it needs)."""
        return len(self.gold)


class _World:
    """Fresh entities of one split for one question (names unique within the question)."""

    def __init__(self, rng: random.Random, pools: dict):
        self.rng, self.pools, self.names = rng, pools, set()

    def _unique(self, make) -> str:
        while True:
            name = make()
            if name not in self.names:
                self.names.add(name)
                return name

    def person(self) -> dict:
        rng, p = self.rng, self.pools

        def make():
            last = "".join(rng.sample(p["syllables"], 2)).capitalize() + rng.choice(p["endings"])
            return f"{rng.choice(p['first'])} {last}"

        return {
            "name": self._unique(make),
            "city": rng.choice(p["cities"]),
            "year": str(rng.choice(p["years"])),
            "job": _article(rng.choice(_JOBS)),
            "female": rng.random() < 0.5,
        }

    def org(self) -> dict:
        rng, p = self.rng, self.pools

        def make():
            return "The " + "".join(rng.sample(p["syllables"], 2)).capitalize() + " " + rng.choice(_ORG_NOUNS)

        return {
            "name": self._unique(make),
            "kind": _article(rng.choice(_KINDS)),
            "city": rng.choice(p["cities"]),
            "year": str(rng.choice(p["years"])),
            "founder": None,
        }

    def filler(self, templates: list[str], count: int, pronoun: dict) -> list[str]:
        rng = self.rng
        return [
            t.format(
                n=rng.randint(2, 40),
                big=f"{rng.randint(2, 90) * 1000:,}",
                adj=rng.choice(_ADJECTIVES),
                month=rng.choice(_MONTHS),
                topic=rng.choice(_TOPICS),
                **pronoun,
            )
            for t in rng.sample(templates, min(count, len(templates)))
        ]

    def org_passage(self, org: dict) -> str:
        rng, p = self.rng, self.pools
        facts = [rng.choice(p["org_intro"]).format(**org)]
        facts.append(rng.choice(p["org_founding"]).format(year=org["year"], founder=org["founder"]["name"]))
        filler = self.filler(_ORG_FILLER, rng.randint(8, 14), {})
        return _weave(rng, facts, filler)

    def person_passage(self, person: dict) -> str:
        rng, p = self.rng, self.pools
        she = person["female"]
        pronoun = {
            "pron": "She" if she else "He",
            "pron_low": "she" if she else "he",
            "pron_obj": "her" if she else "him",
            "pron_poss": "her" if she else "his",
        }
        facts = [rng.choice(p["person_intro"]).format(**person)]
        if person.get("employer"):
            facts.append(rng.choice(p["person_employer"]).format(pron=pronoun["pron"], employer=person["employer"]))
        filler = self.filler(_PERSON_FILLER, rng.randint(8, 14), pronoun)
        return _weave(rng, facts, filler)


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _weave(rng: random.Random, facts: list[str], filler: list[str]) -> str:
    """The facts in their order (the first opens the passage), filler sentences between."""
    sentences = [facts[0]]
    rest = filler[:]
    for fact in facts[1:]:
        cut = rng.randint(0, len(rest) // 2)
        sentences += [*rest[:cut], fact]
        rest = rest[cut:]
    return " ".join(sentences + rest)


def _question(rng: random.Random, world: _World, relation: str) -> tuple[str, str, list[str], list[str]]:
    """``(question, answer, gold passages, distractor-seed passages)`` for one relation."""
    templates = world.pools["questions"][relation]
    org, founder = world.org(), world.person()
    org["founder"] = founder
    if relation.startswith("org_"):
        fact = {"org_city": org["city"], "org_founder": founder["name"], "org_year": org["year"]}[relation]
        return rng.choice(templates).format(org=org["name"]), fact, [world.org_passage(org)], []
    if relation.startswith("person_"):
        fact = founder["city"] if relation == "person_city" else founder["year"]
        return rng.choice(templates).format(person=founder["name"]), fact, [world.person_passage(founder)], []
    if relation.startswith("founder_"):
        fact = founder["city"] if relation == "founder_city" else founder["year"]
        passages = [world.org_passage(org), world.person_passage(founder)]
        return rng.choice(templates).format(org=org["name"]), fact, passages, []
    employee = world.person()
    employee["employer"] = org["name"]
    fact = org["city"] if relation == "employer_city" else founder["name"]
    passages = [world.person_passage(employee), world.org_passage(org)]
    # the founder's own passage is a near-miss distractor: it names the organisation's founder, not its city
    return rng.choice(templates).format(person=employee["name"]), fact, passages, [world.person_passage(founder)]


def wiki_set(n: int, split: str = "train", seed: int = 0, passages: int = 10) -> list[WikiItem]:
    """``n`` 2Wiki-like questions of ``split``, deterministic in ``seed``.

    Each question has ``passages`` passages of about 100–300 tokens: the one or two it
    needs (a bridge question needs two: the organisation's and its founder's, or an
    employee's and the organisation's) and distractors about other invented people and
    organisations, shuffled. Single-hop and bridge relations alternate evenly
    (:data:`RELATIONS`). Splits share no entity, fact value, passage sentence about a
    fact or question wording.

    Raises:
        ValueError: an unknown split, ``n < 1`` or fewer than 2 passages.
    """
    if split not in _POOLS:
        raise ValueError(f"split must be one of {sorted(_POOLS)}, got {split!r}")
    if n < 1 or passages < 2:
        raise ValueError(f"need n >= 1 and passages >= 2, got {n}, {passages}")
    rng = random.Random(f"{split}:{seed}")
    relations = list(RELATIONS)
    items = []
    for i in range(n):
        relation = relations[i % len(relations)]
        world = _World(rng, _POOLS[split])
        question, answer, gold, near = _question(rng, world, relation)
        distractors = near[: passages - len(gold)]
        while len(gold) + len(distractors) < passages:
            if rng.random() < 0.5:
                org = world.org()
                org["founder"] = world.person()
                distractors.append(world.org_passage(org))
            else:
                person = world.person()
                if rng.random() < 0.4:
                    person["employer"] = world.org()["name"]
                distractors.append(world.person_passage(person))
        documents = gold + distractors
        order = list(range(len(documents)))
        rng.shuffle(order)
        shuffled = tuple(documents[j] for j in order)
        golds = tuple(sorted(order.index(j) for j in range(len(gold))))
        items.append(WikiItem(question, answer, shuffled, golds, relation, split))
    return items


# ---------------------------------------------------------------------- the field's metrics


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def subspan_em(reply: str, answer: str) -> bool:
    """Subspan exact match (Block-Attention's metric): the normalised answer appears in
    the normalised reply."""
    gold = normalize_answer(answer)
    return bool(gold) and f" {gold} " in f" {normalize_answer(reply)} "


def token_f1(reply: str, answer: str) -> float:
    """SQuAD token F1 between the normalised reply and answer."""
    pred, gold = normalize_answer(reply).split(), normalize_answer(answer).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def _prose(question: str, answer: str, documents: tuple[str, ...], gold: tuple[int, ...]) -> WikiItem:
    return WikiItem(question, answer, documents, gold, "prose_bridge" if len(gold) > 1 else "prose", "prose")


#: Questions written as plain prose, outside the generator's templates, entities and
#: sentences: how far a model tuned on the generated set carries.
PROSE = (
    _prose(
        "How much weight can the Mule-7 lift?",
        "340 kilograms",
        (
            "The Kestrel drone weighs 2 kilograms and can stay in the air for forty minutes on one battery.",
            "Warehouse teams like the Mule-7 robot because it is quiet. It can lift 340 kilograms and "
            "drives itself between the loading bays at night.",
            "The Otter-3 is a small cleaning robot for hospital corridors; it carries 12 litres of water.",
        ),
        (1,),
    ),
    _prose(
        "In which town did the author of The Salt Orchard grow up?",
        "Kessel",
        (
            "The Salt Orchard, a novel about three sisters who run a failing apple farm, was written by Imre Vasko "
            "and won a regional prize in its first year.",
            "Marta Lund wrote two books about lighthouses and lives near the northern coast.",
            "Imre Vasko grew up in the harbour town of Kessel, where his father repaired fishing nets. "
            "He moved to the capital at twenty.",
            "The town of Dorrin is known for its salt marshes and a small museum of farm tools.",
        ),
        (0, 2),
    ),
    _prose(
        "When does the first ferry to Gull Island leave?",
        "7:40",
        (
            "Buses to the airport leave the central square every half hour from 5:15.",
            "The first ferry from Tallin Point to Gull Island leaves at 7:40, and the last one returns at 19:05. "
            "Bicycles travel free.",
            "Gull Island has no cars; visitors walk or hire bicycles near the pier.",
        ),
        (1,),
    ),
    _prose(
        "In which city is the lab that Hana Ortiz leads?",
        "Port Veyra",
        (
            "Caldera University was founded by shipbuilders and stands on the hill above Port Veyra.",
            "Dr. Hana Ortiz leads the marine biology lab of Caldera University, which studies coral bleaching.",
            "Dr. Paul Lindgren leads a soil science lab in Ardmore and grows wheat on its roof.",
        ),
        (0, 1),
    ),
    _prose(
        "Who won the Bellwether Prize in 2024?",
        "Lina Marsh",
        (
            "The Bellwether Prize is given every two years to a book of poems. In 2022 it went to Tom Reyes, "
            "and in 2024 the jury chose the poet Lina Marsh for her collection Low Tide.",
            "Lina Marsh also teaches evening classes in creative writing at the city library.",
            "The Granary Award for short stories went to Ada Brenner in 2024.",
        ),
        (0,),
    ),
    _prose(
        "What colour is the door of the Blue Heron bakery?",
        "red",
        (
            "The Blue Heron bakery opens at six and sells rye bread until noon. Despite its name, "
            "its front door is painted bright red.",
            "The Heron Bridge across the canal was painted green last spring.",
            "Pell's bakery, two streets away, has a yellow door and sells only cakes.",
        ),
        (0,),
    ),
)
