"""LazyRAG's generation options and text API: stop ids beside EOS, stop strings, max_time,
streaming, the system turn and the instruction, starts, documents, threads; and the
package's face (what ``import lazyattention`` gives, and what it does not import)."""

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from transformers import TextIteratorStreamer

import lazyattention
from lazyattention.integrations.transformers import LazyRAG, Sampling
from lazyattention.integrations.transformers.pretrained import tiny_random
from lazyattention.integrations.transformers.rag import INSTRUCTION, chat_parts, default_cpu_threads

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOCS = ["The lab is in Oslo .", "Ada Lind runs the lab ."]
QUESTION = "Who runs the lab ?"
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny random Llama and its word-level tokenizer (EOS id 1)."""
    return tiny_random(tmp_path_factory.mktemp("tiny"), [*DOCS, QUESTION, "system words here instead", INSTRUCTION])


@pytest.fixture
def rag(pair):
    model, tokenizer = pair
    return LazyRAG(model, tokenizer, num_blocks=64, block_size=4)


def free_run(rag, n=8):
    return rag.answer(QUESTION, DOCS, sampling=Sampling(max_new_tokens=n, ignore_eos=True))


def test_stop_token_ids_add_to_eos(rag):
    free = free_run(rag)
    eos, extra = free.tokens[2], free.tokens[5]
    rag.model.generation_config.eos_token_id = eos
    try:
        both = rag.answer(QUESTION, DOCS, sampling=Sampling(max_new_tokens=8, stop_token_ids=(extra,)))
        no_eos = Sampling(max_new_tokens=8, ignore_eos=True, stop_token_ids=(extra,))
        past_eos = rag.answer(QUESTION, DOCS, sampling=no_eos)
    finally:
        rag.model.generation_config.eos_token_id = 1
    assert both.tokens == free.tokens[: free.tokens.index(eos)] and both.finish_reason == "stop_token"
    assert past_eos.tokens == free.tokens[: free.tokens.index(extra)]
    assert free.finish_reason == "length"


def test_stop_strings_cut_the_text(rag):
    free = free_run(rag)
    word = rag.decode(free.tokens[3:4]).strip()
    out = rag.answer(QUESTION, DOCS, sampling=Sampling(max_new_tokens=8, ignore_eos=True, stop=(word,)))
    assert out.finish_reason == "stop_string"
    assert word not in out.text and free.text.startswith(out.text)
    assert len(out.tokens) <= 4 and out.tokens == free.tokens[: len(out.tokens)]


def test_max_time_ends_an_answer(rag):
    out = rag.answer(QUESTION, DOCS, sampling=Sampling(max_new_tokens=8, ignore_eos=True, max_time=1e-9))
    assert (len(out.tokens), out.finish_reason) == (1, "time")


def test_bad_options_are_refused():
    with pytest.raises(TypeError, match="stop must be a tuple of non-empty strings"):
        Sampling(stop="###")
    with pytest.raises(TypeError, match="ignore_eos=True turns EOS off"):
        Sampling(stop_token_ids=None)
    with pytest.raises(ValueError, match="max_time must be a positive"):
        Sampling(max_time=0)


def test_a_streamer_receives_the_answer_as_it_comes(rag):
    streamer = TextIteratorStreamer(rag.tokenizer, skip_prompt=True, timeout=60)
    sampling = Sampling(max_new_tokens=6, ignore_eos=True)
    result = {}

    def answer():
        result["out"] = rag.answer(QUESTION, DOCS, sampling=sampling, streamer=streamer)

    worker = threading.Thread(target=answer)
    worker.start()
    pieces = list(streamer)
    worker.join()
    assert len(pieces) >= 2, "the text arrives in pieces, not at the end"
    assert "".join(pieces).strip() == result["out"].text.strip()


def test_documents_must_be_a_list(rag):
    with pytest.raises(TypeError, match=r"got one str: pass \[text\]"):
        rag.answer(QUESTION, DOCS[0])
    with pytest.raises(TypeError, match="documents must be texts, got a int"):
        rag.answer(QUESTION, [DOCS[0], 3])


def test_starts_count_documents_and_follow_the_chat_head(rag):
    rag.tokenizer.chat_template = TEMPLATE
    try:
        with pytest.raises(ValueError, match="starts has 1 entries for 2 documents"):
            rag.request(QUESTION, DOCS, starts=[5])
        packed = rag.request(QUESTION, DOCS, offset=100)
        head = len(packed.segments[0])
        lengths = [len(s) for s in packed.segments[1:]]
        assert packed.starts == (100, 100 + head, 100 + head + lengths[0])
        placed = rag.request(QUESTION, DOCS, offset=100, starts=[0, lengths[0]])
        assert placed == packed  # starts count from the end of the head, which stays at offset
        gap = rag.request(QUESTION, DOCS, offset=100, starts=[50, 0])
        assert gap.starts == (100, 100 + head + 50, 100 + head)
    finally:
        rag.tokenizer.chat_template = None


def test_system_turn_and_instruction_reach_the_prompt(rag):
    tokenizer = rag.tokenizer
    head, tail = chat_parts(tokenizer, QUESTION, instruction="Say it .", system="system words here")
    assert head == "system words here\n\n" and tail.startswith("Say it .")
    tokenizer.chat_template = TEMPLATE
    try:
        head, tail = chat_parts(tokenizer, QUESTION, instruction="Say it .", system="system words here instead")
        assert head.startswith("<|system|>system words here instead<|end|><|user|>") and tail.startswith("Say it .")
        plain = rag.request(QUESTION, DOCS)
        custom = rag.request(QUESTION, DOCS, system="system words here instead", instruction="Say it .")
        assert custom.segments[0] != plain.segments[0] and custom.own != plain.own
        options = dict(system="system words here instead", instruction="Say it .", sampling=Sampling(max_new_tokens=2))
        out = rag.answer(QUESTION, DOCS, **options)
        assert out.stats.cache_misses >= 1  # a new head: a new cached segment
    finally:
        tokenizer.chat_template = None


def test_threads_are_set_for_the_call_and_restored(pair, monkeypatch):
    model, tokenizer = pair
    assert 1 <= default_cpu_threads() <= 8
    rag = LazyRAG(model, tokenizer, num_blocks=64, block_size=4, num_threads=3)
    seen = []
    real_forward = rag._forward
    monkeypatch.setattr(rag, "_forward", lambda *a, **k: seen.append(torch.get_num_threads()) or real_forward(*a, **k))
    before = torch.get_num_threads()
    rag.answer(QUESTION, DOCS, sampling=Sampling(max_new_tokens=2))
    assert set(seen) == {3} and torch.get_num_threads() == before
    cores = (os.cpu_count() or 2) // 2
    for set_before in (1, 2, 64):
        torch.set_num_threads(set_before)
        assert default_cpu_threads() == max(1, min(set_before, 8, cores))  # never above what torch was told
    torch.set_num_threads(before)
    with pytest.raises(ValueError, match="num_threads must be a positive int"):
        LazyRAG(model, tokenizer, num_threads=0)


def test_the_package_face_is_lazy_and_names_one_request():
    import lazyattention.integrations.transformers as integration

    assert lazyattention.LazyRAG is integration.LazyRAG and lazyattention.RAGRequest is integration.RAGRequest
    assert "Request" not in integration.__all__ and "Step" not in integration.__all__
    assert set(integration.__all__) <= {n for n in dir(integration) if not n.startswith("_")}
    for name in lazyattention.__all__:
        if name != "fast":  # Triton: covered by the fresh interpreter below
            assert getattr(lazyattention, name) is not None
    with pytest.raises(AttributeError, match="has no attribute 'Request'"):
        lazyattention.Request  # noqa: B018
    script = textwrap.dedent(
        """
        import sys
        import lazyattention
        heavy = [m for m in ("torch", "transformers", "triton") if m in sys.modules]
        assert not heavy, heavy
        assert "LazyRAG" in dir(lazyattention)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def test_without_transformers_the_integration_says_what_to_install():
    script = textwrap.dedent(
        """
        import sys
        sys.modules["transformers"] = None
        import importlib.util
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "transformers" else real(name, *a)
        try:
            import lazyattention.integrations.transformers
        except ModuleNotFoundError as exc:
            print(exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert "pip install 'lazyattention[transformers]'" in out.stdout
