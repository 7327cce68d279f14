"""The consumer's first token is the producer's.

The producer samples the request's first token (t1) at the end of its
prefill and puts it (with its logprobs, when asked) in the lease. The
consumer's scheduler appends t1 to the request as an output token the moment
it admits the request (its KV pull starts), emits it as the request's first
output, and the request then computes t1's KV and samples t2, with the
prompt's KV from the producer: the first token never waits for the pull or a
consumer forward pass, and nothing of the prompt is recomputed.

t1 is a real output token to vLLM: its frontend detokenizes it with the
prompt as context, checks stop strings across t1 and t2, counts usage,
formats logprobs, runs tool and reasoning parsers, exactly as for a token
the consumer sampled. Stop checks run on t1 (EOS, a stop token, max_tokens
1, the context limit: the request then finishes without any forward and its
lease is released), a grammar accepts it before t2's mask is built.

vLLM offers no connector hook that emits a token, so this is a scheduler
class (vLLM's ``--scheduler-cls``, set by pdserve's entrypoint) built on the
one vLLM would use (``AsyncScheduler`` under asynchronous scheduling).
Requests where continuing from t1 cannot be exact on this model runner take
the path where the consumer computes t1 itself, counted by reason
(``pdserve:first_token_fallbacks_total``).

Producer side, the same class copies the logprobs of t1 into the lease.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.sched.utils import check_stop
from vllm.v1.engine import EngineCoreEventType, EngineCoreOutput, EngineCoreOutputs
from vllm.v1.outputs import LogprobsLists
from vllm.v1.request import Request, RequestStatus

from pdserve import vllm_compat
from pdserve.connector import v1_runner
from pdserve.connector.consumer_scheduler import WAIT
from pdserve.lease import LEASE_KEY, FirstToken, LogprobsRow
from pdserve.log import init_logger

logger = init_logger(__name__)

# Requests with a first token waiting to be applied, at most; beyond this
# they take the consumer-computed path (a bound, never reached in practice:
# vLLM's own waiting queue is bounded by the API server).
MAX_PENDING = 1 << 16
# Statuses in which a request has been taken on: its t1 may be shown.
_ADMITTED = (RequestStatus.WAITING_FOR_REMOTE_KVS, RequestStatus.RUNNING)


@dataclass
class _Pending:
    token: FirstToken
    arrived_at: float
    applied: bool = False


class FirstTokenMixin:
    """Mixed into vLLM's Scheduler or AsyncScheduler (``make_scheduler``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ft_pending: dict[str, _Pending] = {}
        # Requests admitted before their lease: their ticket has no answer.
        self._ft_awaiting: set[str] = set()
        self._ft_outputs: list[tuple[int, EngineCoreOutput]] = []
        # V1 runner: requests whose worker gets t1 as a prompt token.
        self._ft_v1: set[str] = set()
        self._ft_role = _role(self)
        self._ft_off = _why_off(self) if self._ft_role == "consumer" else None
        if self._ft_role == "consumer":
            logger.info(
                "pdserve: first token from the producer %s",
                f"off ({self._ft_off})" if self._ft_off else "on",
            )

    # ---- vLLM's scheduler interface ----

    def add_request(self, request: Request) -> None:
        super().add_request(request)
        if self._ft_role == "consumer":
            self._ft_arrived(request)

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        if self._ft_awaiting:
            self._ft_answered()
        if self._ft_pending:
            self._ft_apply()
        output = super().schedule(*args, **kwargs)
        if self._ft_pending or self._ft_v1:
            self._ft_after_schedule(output)
        return output

    def has_requests(self) -> bool:
        """Whether the engine has anything to step for. Requests that only
        wait for their ticket's answer do not count: the engine then sleeps
        on its input queue instead of stepping (and, on CPU, spinning its
        workers) while the producer prefills; the answer wakes it, as it
        comes through that same queue."""
        if not super().has_requests():
            return False
        if not self._ft_awaiting or self.has_finished_requests():
            return True
        return self.get_num_unfinished_requests() > len(self._ft_waiting_only())

    def _ft_waiting_only(self) -> list[str]:
        """Awaiting requests still waiting (not finished or gone)."""
        return [
            r
            for r in self._ft_awaiting
            if (request := self.requests.get(r)) is not None
            and not request.is_finished()
        ]

    def update_from_output(self, scheduler_output: Any, model_output: Any) -> Any:
        outputs = super().update_from_output(scheduler_output, model_output)
        if self._ft_role == "producer":
            _attach_logprobs(outputs)
        if self._ft_outputs:
            outputs = self._ft_merge(outputs)
        return outputs

    # ---- the consumer ----

    def _ft_arrived(self, request: Request) -> None:
        if request.abort_immediately:
            return  # a lease handed back by the frontend: it only ends
        connector = _connector_scheduler(self)
        found = connector.first_token_of(request)
        if found is None:
            return  # not a leased request
        if found is WAIT:
            self._ft_awaiting.add(request.request_id)
            return
        self._ft_decide(request, found)

    def _ft_answered(self) -> None:
        """Requests whose ticket got its answer since the last step."""
        connector = _connector_scheduler(self)
        for request_id in list(self._ft_awaiting):
            request = self.requests.get(request_id)
            if request is None or request.is_finished():
                self._ft_awaiting.discard(request_id)
                continue
            found = connector.first_token_of(request)
            if found is WAIT:
                continue
            self._ft_awaiting.discard(request_id)
            if found is not None:
                self._ft_decide(request, found)

    def _ft_decide(self, request: Request, found: FirstToken | str) -> None:
        connector = _connector_scheduler(self)
        reason = found if isinstance(found, str) else self._ft_off
        if reason is None:
            reason = self._ft_request_fallback(request, found)
        connector.count_first_token(reason)
        if reason is None:
            self._ft_pending[request.request_id] = _Pending(found, time.time())

    def _ft_request_fallback(self, request: Request, token: FirstToken) -> str | None:
        params = request.sampling_params
        if params is None or request.resumable:
            return "not_a_generation"
        if len(self._ft_pending) >= MAX_PENDING:
            return "too_many_pending"
        if params.logprobs is not None and not _row_fits(token, params.logprobs):
            return "no_logprobs_in_lease"
        if vllm_compat.uses_v2_model_runner(self.vllm_config):
            return None
        custom = bool(getattr(self.vllm_config.model_config, "logits_processors", 0))
        return v1_runner.fallback_reason(params, custom)

    def _ft_blocked(self, request: Request) -> bool:
        """A request whose t1 is not applied yet must not be admitted: it
        would sample a first token of its own."""
        pending = self._ft_pending.get(request.request_id)
        return pending is not None and not pending.applied

    def _ft_apply(self) -> None:
        """Append each arrived t1 whose request can take it now (its grammar,
        if any, is compiled: it must accept t1 before t2's mask is built)."""
        for request_id, pending in list(self._ft_pending.items()):
            request = self.requests.get(request_id)
            if request is None or request.is_finished():
                del self._ft_pending[request_id]
                continue
            if pending.applied or not _grammar_ready(request):
                continue
            if _grammar_failed(request):
                del self._ft_pending[request_id]  # vLLM answers the error
                continue
            pending.applied = True
            self._ft_append(request, pending)

    def _ft_append(self, request: Request, pending: _Pending) -> None:
        token_id = pending.token.token_id
        waiting_status = request.status
        request.append_output_token_ids(token_id)
        stopped = check_stop(request, self.max_model_len)
        if not vllm_compat.accept_output_tokens(self, request, [token_id]):
            logger.error(
                "pdserve: the grammar of %s rejected the producer's first token "
                "%d (do both nodes have the same structured-output backend?)",
                request.request_id,
                token_id,
            )
            request.status = RequestStatus.FINISHED_ERROR
            stopped = True
        if not stopped:
            if not vllm_compat.uses_v2_model_runner(self.vllm_config):
                self._ft_v1.add(request.request_id)
            return
        # t1 ends the request (EOS, a stop token, max_tokens 1, the context
        # limit): it finishes here, no forward; its lease goes back.
        final, request.status = request.status, waiting_status
        del self._ft_pending[request.request_id]
        self.finish_requests(request.request_id, final)
        self._ft_emit(request, pending, finished=True)

    def _ft_after_schedule(self, output: Any) -> None:
        for request_id, pending in list(self._ft_pending.items()):
            request = self.requests.get(request_id)
            if request is None or not pending.applied:
                continue
            if request.status in _ADMITTED:
                del self._ft_pending[request_id]
                self._ft_emit(request, pending, finished=False)
        if self._ft_v1:
            self._ft_adapt_for_v1(output)

    def _ft_adapt_for_v1(self, output: Any) -> None:
        self._ft_v1 = {r for r in self._ft_v1 if r in self.requests}
        for new_request in output.scheduled_new_reqs:
            if new_request.req_id in self._ft_v1:
                request = self.requests[new_request.req_id]
                v1_runner.adapt_new_request(new_request, request.output_token_ids[0])
        v1_runner.adapt_cached_requests(output.scheduled_cached_reqs, self._ft_v1)

    def _ft_emit(self, request: Request, pending: _Pending, finished: bool) -> None:
        """Queue t1's output (it leaves with the next update_from_output,
        ahead of the request's later tokens)."""
        if self.log_stats:
            # Its first scheduling, for the frontend's queue/prefill times.
            request.record_event(EngineCoreEventType.SCHEDULED)
        # A request t1 finished was never admitted: nothing was prefilled
        # here, its blocks are gone.
        stats = None
        if not finished:
            stats = vllm_compat.finalize_prefill_stats(
                request.take_prefill_stats(), self, request
            )
        row = pending.token.logprobs
        wants_logprobs = request.sampling_params.logprobs is not None
        output = EngineCoreOutput(
            request_id=request.request_id,
            new_token_ids=[pending.token.token_id],
            new_logprobs=_logprobs_lists(row) if row and wants_logprobs else None,
            finish_reason=request.get_finished_reason() if finished else None,
            stop_reason=request.stop_reason,
            events=request.take_events(),
            trace_headers=request.trace_headers,
            prefill_stats=stats,
        )
        self._ft_outputs.append((request.client_index, output))
        _connector_scheduler(self).first_token_emitted(
            request.request_id, pending.arrived_at
        )

    def _ft_merge(self, outputs: dict[int, EngineCoreOutputs]) -> Any:
        """t1 outputs first: a request's t2 may be in this same batch."""
        by_client: dict[int, list[EngineCoreOutput]] = defaultdict(list)
        for client, output in self._ft_outputs:
            by_client[client].append(output)
        self._ft_outputs = []
        for client, first in by_client.items():
            batch = outputs.setdefault(client, EngineCoreOutputs())
            batch.outputs = [*first, *batch.outputs]
        return outputs


def _grammar_ready(request: Request) -> bool:
    structured = request.structured_output_request
    return structured is None or structured.grammar is not None


def _grammar_failed(request: Request) -> bool:
    structured = request.structured_output_request
    return structured is not None and isinstance(structured.grammar, Exception)


def _row_fits(token: FirstToken, num_logprobs: int) -> bool:
    """The lease's row covers the logprobs asked for (-1: the whole
    vocabulary, which a lease never carries)."""
    row = token.logprobs
    return row is not None and num_logprobs >= 0 and len(row.token_ids) > num_logprobs


def _logprobs_lists(row: LogprobsRow) -> LogprobsLists:
    return LogprobsLists(
        np.array([row.token_ids], dtype=np.int32),
        np.array([row.values()], dtype=np.float32),
        np.array([row.rank], dtype=np.int32),
    )


def _attach_logprobs(outputs: dict[int, EngineCoreOutputs]) -> None:
    """Producer: each lease issued in this batch carries t1's logprobs row
    (the sampler's, exactly as this node's frontend receives it)."""
    for batch in outputs.values():
        for output in batch.outputs:
            params = output.kv_transfer_params
            lease = params.get(LEASE_KEY) if isinstance(params, dict) else None
            first = lease.get("first_token") if isinstance(lease, dict) else None
            logprobs = output.new_logprobs
            if not isinstance(first, dict) or logprobs is None:
                continue
            row = LogprobsRow.of(
                logprobs.logprob_token_ids[0].tolist(),
                logprobs.logprobs[0].tolist(),
                int(logprobs.sampled_token_ranks[0]),
            )
            first["logprobs"] = {
                "token_ids": row.token_ids,
                "logprobs": row.logprobs,
                "rank": row.rank,
            }


def _connector_scheduler(scheduler: Any) -> Any:
    return scheduler.connector.scheduler


def _role(scheduler: Any) -> str | None:
    connector = getattr(scheduler, "connector", None)
    half = getattr(connector, "_scheduler", None)
    return getattr(getattr(half, "settings", None), "role", None)


def _why_off(scheduler: Any) -> str | None:
    """Why this consumer never emits the producer's token, or None."""
    config = scheduler.vllm_config
    if config.speculative_config is not None:
        return "speculative_decoding"
    return None


def _blocked_hook(base: type) -> Any:
    name = vllm_compat.blocked_waiting_hook(base)
    inherited = getattr(base, name)

    def hook(self: Any, request: Request) -> bool:
        if self._ft_blocked(request):
            return False
        return inherited(self, request)

    hook.__name__ = name
    return name, hook


def _build(base: type) -> type:
    name, hook = _blocked_hook(base)
    body = {name: hook, "__module__": __name__}
    return type(f"PDServe{base.__name__}", (FirstTokenMixin, base), body)


SCHEDULERS = {base: _build(base) for base in (Scheduler, AsyncScheduler)}


def make_scheduler(*args: Any, **kwargs: Any) -> Any:
    """vLLM's ``--scheduler-cls`` for pdserve nodes: the scheduler vLLM would
    have used, with the first-token behaviour."""
    config = kwargs["vllm_config"]
    base = AsyncScheduler if config.scheduler_config.async_scheduling else Scheduler
    return SCHEDULERS[base](*args, **kwargs)
