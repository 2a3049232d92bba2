"""The 2Wiki-like generated set and the field's metrics."""

import re

import pytest

from lazyattention.integrations.transformers.qa import (
    PROSE,
    RELATIONS,
    normalize_answer,
    subspan_em,
    token_f1,
    wiki_set,
)


@pytest.fixture(scope="module")
def splits():
    return {split: wiki_set(90, split, seed=1) for split in ("train", "heldout")}


def test_deterministic_in_the_seed():
    assert wiki_set(9, "train", seed=4) == wiki_set(9, "train", seed=4)
    assert wiki_set(9, "train", seed=4) != wiki_set(9, "train", seed=5)


def test_each_question_has_its_passages_and_golds(splits):
    for items in splits.values():
        assert {it.relation for it in items} == set(RELATIONS)
        for it in items:
            assert len(it.documents) == 10 and len(set(it.documents)) == 10
            assert it.hops == RELATIONS[it.relation] == len(it.gold)
            assert any(it.answer in it.documents[g] for g in it.gold)
            for doc in it.documents:
                assert 70 <= len(doc.split()) <= 260, len(doc.split())


def test_a_bridge_question_needs_both_passages(splits):
    """The entity the question names is in one gold passage only, the answer in the other."""
    bridges = [it for items in splits.values() for it in items if it.hops == 2]
    assert bridges
    for it in bridges:
        entity = re.search(r"(The [A-Z]\w+ [A-Z]\w+|[A-Z][a-z]+ [A-Z]\w+)", it.question).group(1)
        named = [g for g in it.gold if entity in it.documents[g]]
        assert len(named) == 1, (it.question, entity)
        (other,) = set(it.gold) - set(named)
        assert it.answer in it.documents[other]


def _names(items) -> set[str]:
    """Capitalised word runs (entities and cities) of every passage and answer."""
    words = set()
    for it in items:
        for text in (*it.documents, it.answer):
            words |= set(re.findall(r"\b[A-Z][a-zö]+(?: [A-Z][a-zö]+)*", text))
    return words


def test_splits_share_no_entity_value_or_question_wording(splits):
    train, heldout = splits["train"], splits["heldout"]
    shared_names = _names(train) & _names(heldout)
    allowed = {"It", "He", "She", "The", "Its", "Every", "Born", "Based", "Friends", "Colleagues", "Visitors"}
    allowed |= {"Local", "Around", "In", "Neighbours", "A", "Monday"} | {
        m for m in shared_names if m in {"January", "March", "April", "May", "June", "August"}
    }
    allowed |= {"September", "October", "November"}
    assert not {n for n in shared_names if n.split()[0] not in allowed}
    assert {it.answer for it in train}.isdisjoint({it.answer for it in heldout})

    def wording(it):
        return re.sub(r"The [A-Z]\w+ \w+|[A-Z][a-z]+ [A-Z]\w+", "X", it.question)

    assert {wording(it) for it in train}.isdisjoint({wording(it) for it in heldout})


def test_refuses_what_it_cannot_make():
    with pytest.raises(ValueError, match="split"):
        wiki_set(3, "dev")
    with pytest.raises(ValueError, match="passages"):
        wiki_set(3, passages=1)


def test_prose_questions_are_answerable():
    for it in PROSE:
        assert any(it.answer in it.documents[g] for g in it.gold)


@pytest.mark.parametrize(
    ("reply", "answer", "em", "f1"),
    [
        ("It is in The Brantfield.", "brantfield", True, 0.4),
        ("Ada Lindberg", "Ada  Lindberg!", True, 1.0),
        ("Ada", "Ada Lindberg", False, 2 / 3),
        ("Adam Lindberg", "Ada", False, 0.0),
        ("the", "The", False, 0.0),
    ],
)
def test_subspan_em_and_token_f1_use_squad_normalisation(reply, answer, em, f1):
    assert subspan_em(reply, answer) is em
    assert token_f1(reply, answer) == pytest.approx(f1)


def test_normalisation():
    assert normalize_answer("  The  Quick, brown fox! ") == "quick brown fox"
