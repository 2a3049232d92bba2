"""``LazyScheduler``: vLLM's scheduler, with documents cached once and placed anywhere.

A subclass of vLLM's own ``Scheduler`` (passed as ``scheduler_cls``). For a request
that names documents (:mod:`.request`) it

* resolves the documents (text is tokenized, ids are looked up) and lays the request
  out as ``[document | pad]… [prompt]`` (:mod:`.plan`), cached documents first;
* hashes the blocks with each document's chain restarted at the document's first
  block, so vLLM's own prefix cache finds a document's blocks whatever precedes it,
  and the prompt's blocks chained from a hash of the placed document set, so
  ordinary prefix caching keeps working for the prompt too;
* hands the plan to the workers in ``extra_args`` (the attention backend reads it).

Everything else is vLLM's: admission, chunked prefill, the KV budget, preemption
(a preempted request frees its blocks and, when resumed, finds its documents in the
cache again or recomputes them), eviction of unreferenced blocks through the free-block
queue. An uncached document is prefilled alone at 0 inside the first request that
needs it: its tokens attend only to their own document, at their local positions, so
the blocks are the same as a separate prefill of the document would write.

Ids: a document's id belongs to the request's ``cache_salt`` (:mod:`.registry`), as the
document's blocks do (their hash chain is rooted in the salt), so tenants neither read
nor block each other's ids, and the same text under two salts is cached apart.

Accounting: each finished request's output carries, in ``kv_transfer_params
["lazyattention"]``, its document blocks, how many were cache hits, the prompt's
prefix hits, the bytes copied (0: blocks are shared by reference) and, when the
length bound cut ``max_tokens``, the number it was cut to. vLLM's own
``num_cached_tokens`` (``usage.prompt_tokens_details.cached_tokens``) counts the
prompt's tokens only, as its definition says; document tokens are not prompt tokens.
A request the plugin cannot serve finishes at once (``finish_reason="abort"``) with
the reason in ``kv_transfer_params["lazyattention"]["error"]``; nothing is allocated
for it. A registry operation (:class:`~.request.ControlSpec`) finishes the same way,
its answer in the same place.

Two classes, one behaviour: :class:`LazyScheduler` over vLLM's ``Scheduler`` and
:class:`LazyAsyncScheduler` over its ``AsyncScheduler``; :func:`lazy_scheduler`
(the ``scheduler_cls`` of :func:`~.plugin.engine_args`) picks the one matching
vLLM's async-scheduling decision, so the plugin keeps async scheduling wherever vLLM
allows it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import vllm
from vllm.logger import init_logger
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import BlockHash, hash_block_tokens
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
from vllm.v1.request import Request

from lazyattention.reference import content_key

from .guard import short
from .model import model_rope
from .plan import LaidDocument, RequestPlan, Segment
from .plugin import LAZY_WORKERS, check_vllm_version
from .registry import DocumentRegistry
from .request import FIELD, PLAN_FIELD, ControlSpec, LazyRequestError, LazyRequestSpec, parse_request, request_tag

__all__ = ["LazyScheduler", "LazyAsyncScheduler", "lazy_scheduler", "RequestAccount", "Totals"]

logger = init_logger(__name__)


@dataclass
class RequestAccount:
    """Cache accounting of one request, counted when it is first scheduled."""

    document_blocks: int = 0
    document_blocks_hit: int = 0
    prefix_blocks_hit: int = 0
    max_tokens_cut_to: int | None = None
    admitted: bool = False

    def as_dict(self) -> dict:
        return {
            "document_blocks": self.document_blocks,
            "document_blocks_hit": self.document_blocks_hit,
            "prefix_blocks_hit": self.prefix_blocks_hit,
            "bytes_copied": 0,
            "max_tokens_cut_to": self.max_tokens_cut_to,
        }


@dataclass
class Totals:
    """Scheduler-wide sums of :class:`RequestAccount` (``LazyScheduler.totals``)."""

    requests: int = 0
    document_blocks: int = 0
    document_blocks_hit: int = 0
    prefix_blocks_hit: int = 0
    refused: int = 0
    preemptions: int = 0
    bytes_copied: int = 0

    def add(self, account: RequestAccount) -> None:
        self.requests += 1
        self.document_blocks += account.document_blocks
        self.document_blocks_hit += account.document_blocks_hit
        self.prefix_blocks_hit += account.prefix_blocks_hit


class _LazyScheduling:
    """The plugin's scheduling, mixed into vLLM's ``Scheduler`` or ``AsyncScheduler``;
    see the module docstring."""

    #: Bounds of the document-id registry (:mod:`.registry`); a subclass may change them.
    max_document_ids = 65536
    max_document_id_tokens = 1 << 24

    #: Finished requests' counters kept for an ``account`` query, by (salt, tag).
    max_tagged_accounts = 4096

    def __init__(self, vllm_config, kv_cache_config, structured_output_manager, block_size, *args, **kwargs):
        super().__init__(vllm_config, kv_cache_config, structured_output_manager, block_size, *args, **kwargs)
        _check_config(vllm_config, self.block_size, self.hash_block_size)
        self._hash_fn = get_hash_fn_by_name(vllm_config.cache_config.prefix_caching_hash_algo)
        self._max_model_len = vllm_config.model_config.max_model_len
        self._vocab_size = vllm_config.model_config.get_vocab_size()
        hf = vllm_config.model_config.hf_config
        self._pad_token = _pad_token(hf)
        self._tokenizer = None  # loaded on the first document given as text
        self.registry = DocumentRegistry(self.max_document_ids, self.max_document_id_tokens)
        self._accounts: dict[str, tuple[RequestAccount, RequestPlan | None, tuple | None]] = {}
        self._tagged: OrderedDict[tuple, dict] = OrderedDict()
        self._answers: list[tuple[Request, dict]] = []  # refusals and registry answers, sent next step
        self.totals = Totals()

    # ------------------------------------------------------------------ admission

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:  # a streaming continuation: vLLM's business
            super().add_request(request)
            return
        extra = request.sampling_params.extra_args if request.sampling_params is not None else None
        tag = request_tag(extra)
        try:
            spec = parse_request(extra)
            if isinstance(spec, ControlSpec):
                self._answers.append((request, self._control(spec, request.cache_salt)))
                return
            plan, cut = None, None
            if spec is not None:
                request, plan, cut = self._lay_out(request, spec)
        except Exception as e:  # no request's input may stop the engine: logged, and the client told
            if isinstance(e, LazyRequestError):
                message = str(e)
                logger.warning("lazyattention refused request %s: %s", request.request_id, message)
            else:
                message = f"lazyattention could not lay the request out: {type(e).__name__}: {short(str(e), 200)}"
                logger.exception("lazyattention refused request %s", request.request_id)
            answer = {"error": message}
            self._answers.append((request, answer))
            self._remember(request.cache_salt, tag, answer)
            self.totals.refused += 1
            return
        account = RequestAccount()
        if plan is not None:
            account.document_blocks = sum(len(plan.document_blocks(d)) for d in range(len(plan.documents)))
            account.max_tokens_cut_to = cut
        self._accounts[request.request_id] = (account, plan, None if tag is None else (request.cache_salt, tag))
        super().add_request(request)

    def _control(self, spec: ControlSpec, salt: str | None) -> dict:
        """Answer a registry operation of the tenant ``salt``."""
        if spec.list_ids:
            return {"ids": self.registry.ids(salt)}
        if spec.forget:
            return {"forgotten": self.registry.forget(salt, spec.forget)}
        account = self._tagged.pop((salt or "", spec.account), None)
        if account is None:
            return {"error": f"no finished request with tag {short(spec.account)} (each tag is answered once)"}
        return account

    def _remember(self, salt: str | None, tag: str | None, answer: dict) -> None:
        if tag is None:
            return
        self._tagged[(salt or "", tag)] = answer
        while len(self._tagged) > self.max_tagged_accounts:
            self._tagged.popitem(last=False)

    def _resolve(self, spec: LazyRequestSpec, salt: str | None) -> list[tuple[int, ...]]:
        """The token ids of each named document, registering and looking up ids of ``salt``."""
        resolved, given = [], {}
        for d, doc in enumerate(spec.documents):
            what = f"lazyattention.documents[{d}]"
            if doc.text is not None:
                tokens = tuple(self._tokenize(doc.text, what))
                if not tokens:
                    raise LazyRequestError(f"{what}.text tokenizes to no tokens")
            elif doc.token_ids is not None:
                tokens = doc.token_ids
                bad = [t for t in tokens if t >= self._vocab_size]
                if bad:
                    raise LazyRequestError(f"{what}.token_ids: {bad[0]} is outside the vocabulary ({self._vocab_size})")
            else:
                tokens = given.get(doc.id) or self.registry.get(salt, doc.id)
                if tokens is None:
                    raise LazyRequestError(
                        f"{what}: unknown document id {short(doc.id)} (give its 'text' or 'token_ids' once, with the "
                        "id, under the same cache_salt)"
                    )
            if doc.id is not None:
                if doc.id in given and given[doc.id] != tokens:
                    raise LazyRequestError(
                        f"{what}: id {short(doc.id)} is given twice in this request, with other content"
                    )
                known = self.registry.get(salt, doc.id)
                if known is not None and known != tokens:
                    raise LazyRequestError(f"{what}: id {short(doc.id)} was given earlier with other content")
                given[doc.id] = tokens
            resolved.append(tokens)
        if sum(len(t) for t in given.values()) > self.registry.max_tokens:
            raise LazyRequestError(
                f"the documents given with ids exceed the registry's {self.registry.max_tokens} tokens"
            )
        for doc_id, tokens in given.items():  # register only once all are valid
            self.registry.put(salt, doc_id, tokens)
        return resolved

    def _lay_out(self, request: Request, spec: LazyRequestSpec) -> tuple[Request, RequestPlan, int | None]:
        """The request laid out with its documents, its plan, and ``max_tokens`` if the
        length bound cut it (else None)."""
        params = request.sampling_params
        if request.prompt_token_ids is None or request.prompt_embeds is not None:
            raise LazyRequestError("requests with documents need prompt token ids, not prompt embeddings")
        if request.mm_features:
            raise LazyRequestError("requests with documents cannot carry multimodal inputs")
        if params.prompt_logprobs is not None:
            raise LazyRequestError("prompt_logprobs is not supported for requests with documents")
        if request.resumable:
            raise LazyRequestError("streaming-input sessions cannot name documents")
        if request.lora_request is not None:
            raise LazyRequestError("LoRA requests cannot name documents")
        tokens = self._resolve(spec, request.cache_salt)

        S = self.block_size
        starts, running = [], 0
        for doc, t in zip(spec.documents, tokens, strict=True):
            start = doc.start if doc.start is not None else running
            starts.append(start)
            running = start + len(t)
        ends = [s + len(t) for s, t in zip(starts, tokens, strict=True)]
        own_start = spec.query_start if spec.query_start is not None else max(ends)

        # Unique documents in vLLM's order: those whose blocks are all cached first.
        keys = [content_key(list(t)) for t in tokens]
        unique: dict[str, tuple[int, ...]] = {}
        for k, t in zip(keys, tokens, strict=True):
            unique.setdefault(k, t)
        order = sorted(unique, key=lambda k: not self._is_cached(unique[k], request.cache_salt))
        laid, sequence = [], []
        for k in order:
            t = unique[k]
            laid.append(LaidDocument(key=k, length=len(t), vllm_start=len(sequence)))
            sequence.extend(t)
            sequence.extend([self._pad_token] * (math.ceil(len(t) / S) * S - len(t)))
        index = {k: i for i, k in enumerate(order)}
        own_vllm_start = len(sequence)
        sequence.extend(request.prompt_token_ids)
        plan = RequestPlan(
            documents=tuple(laid),
            segments=tuple(Segment(index[k], s) for k, s in zip(keys, starts, strict=True)),
            own_vllm_start=own_vllm_start,
            own_start=own_start,
            block_size=S,
        )

        logical_end = plan.logical_end(len(sequence))
        limit = self._max_model_len
        if len(sequence) >= limit or logical_end >= limit:
            raise LazyRequestError(
                f"the request does not fit the model's length bound {limit}: documents and prompt take "
                f"{len(sequence)} sequence tokens (padded to blocks of {S}) and reach logical position "
                f"{logical_end - 1}; at least one position must remain for the output"
            )
        params = params.clone()
        allowed, cut = limit - max(len(sequence), logical_end), None
        if params.max_tokens > allowed:
            logger.info("lazyattention cut max_tokens of %s to %d (length bound)", request.request_id, allowed)
            params.max_tokens = cut = allowed
        params.extra_args = {**(params.extra_args or {}), PLAN_FIELD: plan.to_dict()}
        laid_request = Request(
            request_id=request.request_id,
            prompt_token_ids=sequence,
            sampling_params=params,
            pooling_params=None,
            client_index=request.client_index,
            arrival_time=request.arrival_time,
            cache_salt=request.cache_salt,
            priority=request.priority,
            trace_headers=request.trace_headers,
            block_hasher=self._plan_hasher(plan, request.cache_salt),
        )
        return laid_request, plan, cut

    def _tokenize(self, text: str, what: str) -> list[int]:
        if self._tokenizer is None:
            from vllm.tokenizers.registry import cached_tokenizer_from_config

            self._tokenizer = cached_tokenizer_from_config(self.vllm_config.model_config)
        try:
            return list(self._tokenizer.encode(text, add_special_tokens=False))
        except Exception as e:  # the tokenizer's own errors name no field
            raise LazyRequestError(f"{what}.text cannot be tokenized: {type(e).__name__}: {short(str(e))}") from None

    # ------------------------------------------------------------------ hashing

    def _document_root(self, cache_salt: str | None) -> BlockHash | None:
        """The parent of every document's first block: none, or the salt's hash."""
        return None if not cache_salt else BlockHash(self._hash_fn(("lazyattention.salt", cache_salt)))

    def _document_hashes(self, tokens: tuple[int, ...], cache_salt: str | None) -> list[BlockHash]:
        S = self.block_size
        padded = list(tokens) + [self._pad_token] * (math.ceil(len(tokens) / S) * S - len(tokens))
        parent, hashes = self._document_root(cache_salt), []
        for i in range(0, len(padded), S):
            parent = hash_block_tokens(self._hash_fn, parent, padded[i : i + S], None)
            hashes.append(parent)
        return hashes

    def _is_cached(self, tokens: tuple[int, ...], cache_salt: str | None) -> bool:
        pool = self.kv_cache_manager.block_pool
        groups = list(range(len(self.kv_cache_config.kv_cache_groups)))
        return all(pool.get_cached_block(h, groups) is not None for h in self._document_hashes(tokens, cache_salt))

    def _plan_hasher(self, plan: RequestPlan, cache_salt: str | None):
        """vLLM's block hasher, with each document's chain restarted at its first block
        and the prompt's chain rooted in the placed document set."""
        S, fn = self.block_size, self._hash_fn
        document_firsts = {d.vllm_start for d in plan.documents}
        root = self._document_root(cache_salt)
        own_root = BlockHash(
            fn(
                (
                    "lazyattention.own",
                    tuple((plan.documents[s.doc].key, s.start) for s in plan.segments),
                    plan.own_start,
                    plan.own_vllm_start,
                    cache_salt,
                )
            )
        )

        def hasher(request: Request) -> list[BlockHash]:
            start = len(request.block_hashes) * S
            parent = request.block_hashes[-1] if request.block_hashes else None
            hashes = []
            while start + S <= request.num_tokens:
                if start in document_firsts:
                    parent = root
                elif start == plan.own_vllm_start:
                    parent = own_root
                # No extra keys: LoRA and multimodal requests are refused, and the salt is in the roots.
                parent = hash_block_tokens(fn, parent, request.all_token_ids[start : start + S], None)
                hashes.append(parent)
                start += S
            return hashes

        return hasher

    # ------------------------------------------------------------------ accounting

    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
        self.totals.preemptions += len(output.preempted_req_ids or ())
        for new in output.scheduled_new_reqs:
            entry = self._accounts.get(new.req_id)
            if entry is None or entry[0].admitted:
                continue
            account, plan, _ = entry
            account.admitted = True
            hit_blocks = new.num_computed_tokens // self.block_size
            if plan is None:
                account.prefix_blocks_hit = hit_blocks
            else:
                own_first = plan.own_vllm_start // self.block_size
                account.document_blocks_hit = min(hit_blocks, own_first)
                account.prefix_blocks_hit = max(0, hit_blocks - own_first)
        return output

    def finish_requests(self, request_ids, finished_status):
        finished = super().finish_requests(request_ids, finished_status)
        for request in finished:
            self._accounts.pop(request.request_id, None)
        return finished

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for client_outputs in outputs.values():
            for out in client_outputs.outputs:
                entry = self._accounts.get(out.request_id)
                if entry is None:
                    continue
                if out.prefill_stats is not None and entry[1] is not None:
                    _count_prompt_only(out.prefill_stats, entry[1])
                if out.finish_reason is None:
                    continue
                account, _, tag = self._accounts.pop(out.request_id)
                self.totals.add(account)
                counters = account.as_dict()
                out.kv_transfer_params = {**(out.kv_transfer_params or {}), FIELD: counters}
                if tag is not None:
                    self._remember(tag[0], tag[1], counters)
        for request, answer in self._answers:
            refusal = EngineCoreOutput(
                request_id=request.request_id,
                new_token_ids=[],
                finish_reason=FinishReason.ABORT,
                kv_transfer_params={FIELD: answer},
            )
            outputs.setdefault(request.client_index, EngineCoreOutputs()).outputs.append(refusal)
        self._answers.clear()
        return outputs

    def has_requests(self) -> bool:
        return bool(self._answers) or super().has_requests()


class LazyScheduler(_LazyScheduling, Scheduler):
    """vLLM's ``Scheduler`` with per-document block-hash chains; see the module docstring."""


class LazyAsyncScheduler(_LazyScheduling, AsyncScheduler):
    """vLLM's ``AsyncScheduler`` with per-document block-hash chains; see the module docstring."""


def lazy_scheduler(vllm_config, *args, **kwargs):
    """The ``scheduler_cls`` of :func:`~.plugin.engine_args`: :class:`LazyAsyncScheduler`
    where vLLM chose async scheduling, else :class:`LazyScheduler`."""
    cls = LazyAsyncScheduler if vllm_config.scheduler_config.async_scheduling else LazyScheduler
    return cls(vllm_config, *args, **kwargs)


def _count_prompt_only(stats, plan: RequestPlan) -> None:
    """Make vLLM's prefill counts those of the client's prompt: the documents' tokens
    precede it in vLLM's sequence and are not prompt tokens."""
    own = plan.own_vllm_start
    stats.num_prompt_tokens = max(0, stats.num_prompt_tokens - own)
    stats.num_local_cached_tokens = max(0, stats.num_local_cached_tokens - own)
    stats.num_external_cached_tokens = 0
    stats.num_cached_tokens = stats.num_local_cached_tokens
    stats.num_computed_tokens = stats.num_prompt_tokens - stats.num_cached_tokens
    stats.num_cache_creation_tokens = max(0, stats.num_cache_creation_tokens - own)


def _pad_token(hf_config) -> int:
    """The token written after a document to fill its last block (never attended)."""
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(hf_config, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return 0


def _check_config(vllm_config, block_size: int, hash_block_size: int) -> None:
    """Refuse configurations the plugin cannot serve, naming the setting."""
    check_vllm_version(vllm.__version__)
    if vllm_config.device_config.device_type == "cuda" and vllm_config.use_v2_model_runner:
        raise ValueError(
            "lazyattention's GPU worker runs with vLLM's V1 model runner (its builder reads the runner's "
            "input batch): start the server with VLLM_USE_V2_MODEL_RUNNER=0"
        )
    cache = vllm_config.cache_config
    if not cache.enable_prefix_caching:
        raise ValueError("LazyScheduler needs prefix caching: drop --no-enable-prefix-caching")
    if hash_block_size != block_size:
        raise ValueError(f"LazyScheduler needs hash_block_size == block_size, got {hash_block_size} and {block_size}")
    worker_cls = vllm_config.parallel_config.worker_cls
    if worker_cls not in LAZY_WORKERS:
        raise ValueError(
            f"LazyScheduler needs the plugin's worker (it hands each step's plans to the attention backend): "
            f"pass --worker-cls {LAZY_WORKERS[0]} (CPU) or {LAZY_WORKERS[1]} (GPU), got {worker_cls!r}"
        )
    if vllm_config.speculative_config is not None:
        raise ValueError("LazyScheduler does not support speculative decoding")
    model_rope(vllm_config.model_config.hf_config.to_dict())
