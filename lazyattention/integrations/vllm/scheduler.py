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

Accounting: each finished request's output carries, in ``kv_transfer_params
["lazyattention"]``, its document blocks, how many were cache hits, the prompt's
prefix hits, and the bytes copied (0: blocks are shared by reference). A request the
plugin cannot serve finishes at once (``finish_reason="abort"``) with the reason in
``kv_transfer_params["lazyattention"]["error"]``; nothing is allocated for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vllm.logger import init_logger
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import BlockHash, hash_block_tokens
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
from vllm.v1.request import Request

from lazyattention.reference import content_key

from .model import model_rope
from .plan import LaidDocument, RequestPlan, Segment
from .plugin import LAZY_WORKERS
from .request import FIELD, PLAN_FIELD, LazyRequestError, LazyRequestSpec, parse_request

__all__ = ["LazyScheduler", "RequestAccount", "Totals"]

logger = init_logger(__name__)


@dataclass
class RequestAccount:
    """Cache accounting of one request, counted when it is first scheduled."""

    document_blocks: int = 0
    document_blocks_hit: int = 0
    prefix_blocks_hit: int = 0
    admitted: bool = False

    def as_dict(self) -> dict:
        return {
            "document_blocks": self.document_blocks,
            "document_blocks_hit": self.document_blocks_hit,
            "prefix_blocks_hit": self.prefix_blocks_hit,
            "bytes_copied": 0,
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


class LazyScheduler(Scheduler):
    """vLLM's ``Scheduler`` with per-document block-hash chains; see the module docstring."""

    def __init__(self, vllm_config, kv_cache_config, structured_output_manager, block_size, *args, **kwargs):
        super().__init__(vllm_config, kv_cache_config, structured_output_manager, block_size, *args, **kwargs)
        _check_config(vllm_config, self.block_size, self.hash_block_size)
        self._hash_fn = get_hash_fn_by_name(vllm_config.cache_config.prefix_caching_hash_algo)
        self._max_model_len = vllm_config.model_config.max_model_len
        self._vocab_size = vllm_config.model_config.get_vocab_size()
        hf = vllm_config.model_config.hf_config
        self._pad_token = _pad_token(hf)
        self._tokenizer = None  # loaded on the first document given as text
        self._documents_by_id: dict[str, tuple[int, ...]] = {}
        self._accounts: dict[str, tuple[RequestAccount, RequestPlan | None]] = {}
        self._refused: list[tuple[Request, str]] = []
        self.totals = Totals()

    # ------------------------------------------------------------------ admission

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:  # a streaming continuation: vLLM's business
            super().add_request(request)
            return
        try:
            extra = request.sampling_params.extra_args if request.sampling_params is not None else None
            spec = parse_request(extra)
            plan = None
            if spec is not None:
                request, plan = self._lay_out(request, spec)
        except LazyRequestError as e:
            logger.warning("lazyattention refused request %s: %s", request.request_id, e)
            self._refused.append((request, str(e)))
            self.totals.refused += 1
            return
        account = RequestAccount()
        if plan is not None:
            account.document_blocks = sum(len(plan.document_blocks(d)) for d in range(len(plan.documents)))
        self._accounts[request.request_id] = (account, plan)
        super().add_request(request)

    def _resolve(self, spec: LazyRequestSpec) -> list[tuple[int, ...]]:
        """The token ids of each named document, registering and looking up ids."""
        resolved = []
        for d, doc in enumerate(spec.documents):
            what = f"lazyattention.documents[{d}]"
            if doc.text is not None:
                tokens = tuple(self._tokenize(doc.text))
                if not tokens:
                    raise LazyRequestError(f"{what}.text tokenizes to no tokens")
            elif doc.token_ids is not None:
                tokens = doc.token_ids
                bad = [t for t in tokens if t >= self._vocab_size]
                if bad:
                    raise LazyRequestError(f"{what}.token_ids: {bad[0]} is outside the vocabulary ({self._vocab_size})")
            else:
                if doc.id not in self._documents_by_id:
                    raise LazyRequestError(
                        f"{what}: unknown document id {doc.id!r} (give its 'text' or 'token_ids' once, with the id)"
                    )
                tokens = self._documents_by_id[doc.id]
            if doc.id is not None:
                known = self._documents_by_id.get(doc.id)
                if known is not None and known != tokens:
                    raise LazyRequestError(f"{what}: id {doc.id!r} was given earlier with other content")
            resolved.append(tokens)
        for doc, tokens in zip(spec.documents, resolved, strict=True):  # register only once all are valid
            if doc.id is not None:
                self._documents_by_id[doc.id] = tokens
        return resolved

    def _lay_out(self, request: Request, spec: LazyRequestSpec) -> tuple[Request, RequestPlan]:
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
        tokens = self._resolve(spec)

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
        params.max_tokens = min(params.max_tokens, limit - max(len(sequence), logical_end))
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
        return laid_request, plan

    def _tokenize(self, text: str) -> list[int]:
        if self._tokenizer is None:
            from vllm.tokenizers.registry import cached_tokenizer_from_config

            self._tokenizer = cached_tokenizer_from_config(self.vllm_config.model_config)
        return list(self._tokenizer.encode(text, add_special_tokens=False))

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
            account, plan = entry
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
                if out.finish_reason is None or out.request_id not in self._accounts:
                    continue
                account, _ = self._accounts.pop(out.request_id)
                self.totals.add(account)
                out.kv_transfer_params = {**(out.kv_transfer_params or {}), FIELD: account.as_dict()}
        for request, message in self._refused:
            refusal = EngineCoreOutput(
                request_id=request.request_id,
                new_token_ids=[],
                finish_reason=FinishReason.ABORT,
                kv_transfer_params={FIELD: {"error": message}},
            )
            outputs.setdefault(request.client_index, EngineCoreOutputs()).outputs.append(refusal)
        self._refused.clear()
        return outputs

    def has_requests(self) -> bool:
        return bool(self._refused) or super().has_requests()


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
