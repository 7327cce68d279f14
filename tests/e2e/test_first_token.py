"""The first token from the producer (issue 19, part 2): a client cannot tell
the consumer from plain vLLM, whichever path the first token took.

Each case sends one request to the consumer and to the baseline: JSON answers
equal but for ``id``, ``created`` and ``system_fingerprint``; streams equal
event by event, ``[DONE]`` included (with several choices, each choice's
events in order). Each case also proves its path from the nodes' counters:
the first token from the producer's lease, a fallback by reason (the
consumer computes it; vLLM's CPU build runs the V1 model runner), or a local
prefill; the prompt prefilled remotely and pulled, the lease released, none
expired. Where token 1 ends the request (EOS, a stop token, ``max_tokens``
1, the context limit) the consumer's engine runs no forward: nothing is
pulled, the lease goes back.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import CONSUMER_MAX_LEN, random_prompt
from tests.e2e.helpers import TIMEOUT, post, wait_idle
from tests.eventually import Equal, eventually


def vllm_version() -> tuple[int, int]:
    import vllm

    major, minor = vllm.__version__.split(".")[:2]
    return int(major), int(minor)


def completions_take_bad_words() -> bool:
    """vLLM 0.25's completions API has no ``bad_words`` (its chat API has):
    it ignores the field, and so do both nodes."""
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return "bad_words" in CompletionRequest.model_fields


PROMPT = "The weather today is sunny and the network"
MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "How do I cook rice on a cold day?"},
]
MAX_TOKENS = 6
# The tiny model's tokenizer: "<|im_end|>" is its EOS; its generation config
# adds "<|endoftext|>" as a second end token (a stop token to vLLM).
EOS_ID, PAD_ID = 2, 0
FORCE_EOS = {"logit_bias": {str(EOS_ID): 100}}
# Fields that differ between any two answers of plain vLLM.
NOISE = ("id", "created", "system_fingerprint")
COUNTERS_WITHIN_SECONDS = 10
RETRIES = 4

COMPLETIONS, CHAT, GENERATE = "/v1/completions", "/v1/chat/completions", "/generate"
FIRST_TOKEN = "producer"  # the first token came in the producer's lease


def completion(**extra) -> dict:
    return {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}


def chat(**extra) -> dict:
    return {"messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}


def streamed(body: dict, **extra) -> dict:
    return dict(body, stream=True, **extra)


# ---- answers ----


def normalized(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k not in NOISE}


def sse(url: str, path: str, body: dict) -> list:
    """Every line of a stream: its events' JSON (normalized), ``[DONE]``, and
    any other non-empty line as it came."""
    with requests.post(url + path, json=body, stream=True, timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.text
        lines: list = []
        for line in r.iter_lines():
            if not line:
                continue
            data = line.removeprefix(b"data:").strip()
            if not line.startswith(b"data:"):
                lines.append(line.decode())
            elif data == b"[DONE]":
                lines.append("[DONE]")
            else:
                lines.append(normalized(json.loads(data)))
        return lines


def answer(url: str, path: str, body: dict) -> dict | list:
    if body.get("stream"):
        return sse(url, path, body)
    response = post(url, path, body)
    assert response.status_code == 200, response.text
    return normalized(response.json())


def generate_answer(url: str, body: dict) -> dict | list:
    """The consumer's legacy /generate: one JSON, or its ndjson lines."""
    if not body.get("stream"):
        response = post(url, GENERATE, body)
        assert response.status_code == 200, response.text
        return response.json()
    with requests.post(url + GENERATE, json=body, stream=True, timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/x-ndjson"
        return [json.loads(line) for line in r.iter_lines() if line]


def generate_from_baseline(url: str, body: dict) -> dict | list:
    """What /generate answers, from the baseline's completions (plain vLLM
    0.32 has no /generate): prompt + text; streamed, one line per event."""
    got = answer(url, COMPLETIONS, body)
    if isinstance(got, dict):
        return {"text": [PROMPT + got["choices"][0]["text"]]}
    text, lines = PROMPT, []
    for event in got:
        if event != "[DONE]":
            text += event["choices"][0]["text"]
            lines.append({"text": [text]})
    return lines


def ask(server, path: str, body: dict) -> dict | list:
    if path == GENERATE:
        if server.name == "baseline":
            return generate_from_baseline(server.url, body)
        return generate_answer(server.url, body)
    return answer(server.url, path, body)


def both(cluster, path: str, body: dict, route: Route) -> tuple:
    """(baseline's answer, consumer's answer). vLLM merges a stream's pending
    outputs into one event when its reader is behind, which a starved 2-core
    machine does to either server now and then: the side with fewer events
    is asked again (RETRIES times at most). A difference that persists is
    the consumer's."""
    expected = ask(cluster.baseline, path, body)
    got = ask(cluster.consumer, path, body)
    for _ in range(RETRIES):
        if not body.get("stream") or len(got) == len(expected):
            break
        if len(expected) < len(got):
            expected = ask(cluster.baseline, path, body)
        else:
            route.again()
            got = ask(cluster.consumer, path, body)
    return expected, got


def by_choice(answer: dict | list) -> dict | list:
    """A stream of several choices as each choice's events in order: how
    vLLM interleaves choices depends on when each reached the engine."""
    if isinstance(answer, dict):
        return answer
    other = [e for e in answer if not (isinstance(e, dict) and e.get("choices"))]
    choices: dict[int, list] = {}
    for event in answer:
        if isinstance(event, dict) and event.get("choices"):
            for choice in event["choices"]:
                choices.setdefault(choice["index"], []).append(
                    dict(event, choices=[choice])
                )
    return [other, *(choices[i] for i in sorted(choices))]


@pytest.fixture(scope="module", autouse=True)
def warm(cluster):
    """Each server's first requests with logprobs take seconds (vLLM warms
    up): a stream then falls behind its engine, whose outputs vLLM merges
    into fewer events. Warmed up here, outside the comparisons."""
    bodies = [
        (COMPLETIONS, completion(logprobs=5)),
        (COMPLETIONS, streamed(completion(logprobs=5))),
        (CHAT, chat(logprobs=True, top_logprobs=5)),
        (CHAT, streamed(chat(logprobs=True, top_logprobs=5))),
    ]
    for url in (cluster.baseline.url, cluster.consumer.url):
        for path, body in bodies:
            answer(url, path, body)


# ---- which path ran ----


def scrape(url: str) -> dict[str, float]:
    """The counters that tell a request's path, by name[:reason]."""
    wanted = {
        "pdserve:first_tokens_from_producer_total": "first_token",
        "pdserve:first_token_fallbacks_total": "fallback",
        "pdserve:remote_prefills_total": "remote",
        "pdserve:local_prefills_total": "local",
        "pdserve:kv_loads_total": "loads",
        "pdserve:kv_load_failures_total": "load_failures",
        "pdserve:kv_leases_released_total": "released",
        "pdserve:kv_leases_expired_total": "expired",
    }
    text = requests.get(url + "/metrics", timeout=30).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (name := wanted.get(sample.name)) is None:
                continue
            if reason := sample.labels.get("reason"):
                name = f"{name}:{reason}"
            found[name] = found.get(name, 0.0) + sample.value
    return found


def counters(cluster) -> dict[str, float]:
    return scrape(cluster.consumer.url) | {
        f"producer_{k}": v for k, v in scrape(cluster.producer.url).items()
    }


def settle(cluster) -> None:
    """Both nodes idle: no request running or waiting, no KV block held
    (on the producer: no lease left)."""
    for node in (cluster.consumer, cluster.producer):
        assert wait_idle(node.url) == (0, 0, 0)


def expected_moves(via: str, forward: bool = True) -> Counter[str]:
    """The counters one request moves. ``via``: FIRST_TOKEN,
    "fallback:REASON" or "local:REASON"; ``forward`` False: token 1 ends the
    request, the KV is never pulled."""
    if via.startswith("local:"):
        return Counter({via: 1})
    moved = Counter({"remote": 1, "producer_released": 1})
    moved["first_token" if via == FIRST_TOKEN else via] = 1
    if forward:
        moved["loads"] = 1
    return moved


class Route:
    """``with Route(cluster, via): ...`` asserts at exit (unless the block
    failed: a wrong answer is told first) that the request made in the block
    went ``via`` that path (see ``expected_moves``), with
    ``also`` the (via, forward) of more requests made there; ``any_loads``
    where whether the KV was pulled is a race (the frontend ends the request
    on token 1). Engine counters arrive after the answer: polled, bounded."""

    def __init__(
        self,
        cluster,
        via: str = FIRST_TOKEN,
        forward: bool = True,
        any_loads: bool = False,
        also: Iterable[tuple[str, bool]] = (),
    ) -> None:
        self.cluster = cluster
        self.one = expected_moves(via, forward)
        self.expected = self.one.copy()
        for other in also:
            self.expected += expected_moves(*other)
        self.any_loads = any_loads

    def again(self) -> None:
        """The request was made once more."""
        self.expected += self.one

    def __enter__(self) -> Route:
        # Earlier requests' releases may still be on their way (a consumer
        # sends the last ones from its watch thread, up to a second after
        # the answer): a lease ends when the producer's KV usage is back to 0.
        settle(self.cluster)
        self.before = counters(self.cluster)
        return self

    def moved(self) -> dict[str, float]:
        after = counters(self.cluster)
        moved = {k: v - self.before.get(k, 0.0) for k, v in after.items()}
        if self.any_loads:
            moved.pop("loads", None)
        return {k: v for k, v in moved.items() if v}

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            return
        expected = dict(self.expected)
        if self.any_loads:
            expected.pop("loads", None)
        settle(self.cluster)
        moved = eventually(
            lambda: Equal(self.moved(), expected),
            COUNTERS_WITHIN_SECONDS,
            "the path's counters",
            interval=0.05,
        ).got
        assert moved == expected, f"path: expected {expected}, counters moved {moved}"


# ---- the cases ----


@dataclass(frozen=True)
class Case:
    path: str
    body: dict
    via: str = FIRST_TOKEN
    # False: token 1 ends the request, the consumer engine runs no forward.
    forward: bool = True
    # What makes it the case it claims to be, in the baseline's answer: each
    # choice's finish_reason, and how many tokens it has (None: unchecked;
    # -1: max_tokens).
    finish: str | None = "length"
    tokens: int | None = -1


def cases(name: str, path: str, body: dict, via: str = FIRST_TOKEN, **kw) -> list:
    """The case as asked, and streamed."""
    return [
        pytest.param(Case(path, body, via, **kw), id=name),
        pytest.param(Case(path, streamed(body), via, **kw), id=name + "-stream"),
    ]


def choices_of(answer: dict | list) -> list[dict]:
    if isinstance(answer, dict):
        return answer["choices"]
    return [c for e in answer if e != "[DONE]" for c in e.get("choices", [])]


def check_case(case: Case, baseline: dict | list) -> None:
    """The baseline's answer shows the case is what it claims to be."""
    if case.path == GENERATE:
        return
    ends = [c["finish_reason"] for c in choices_of(baseline) if c["finish_reason"]]
    n = case.body.get("n", 1)
    if case.finish is not None:
        assert ends == [case.finish] * n, ends
    if isinstance(baseline, dict) and case.tokens is not None:
        limit = case.body.get("max_tokens") or case.body.get("max_completion_tokens")
        tokens = limit if case.tokens == -1 else case.tokens
        assert baseline["usage"]["completion_tokens"] == tokens * n


PENALTIES = "fallback:v1_runner_penalties"
SEEDED = "fallback:v1_runner_seeded_sampling"
BAD_WORDS = "fallback:v1_runner_bad_words"
PROMPT_LOGPROBS = "local:prompt_logprobs"
MANY = "local:multiple_choices"
CHOICES = {"choice": ["the cold wind", "the cold rain"]}
JSON_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "weather",
        "schema": {
            "type": "object",
            "properties": {"sky": {"type": "string"}},
            "required": ["sky"],
        },
    },
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "rain",
            "description": "Whether it rains.",
            "parameters": {"type": "object", "properties": {}},
        },
    }
]
NAMED_TOOL = {"type": "function", "function": {"name": "rain"}}
BAD_REGEX = {"regex": "("}
USAGE = {"include_usage": True}
CONTINUOUS_USAGE = {"include_usage": True, "continuous_usage_stats": True}
NO_FORWARD = {"forward": False}
# Token 1 is an end token: the engine stops the request on it.
ENDS_AT_1 = {"forward": False, "finish": "stop", "tokens": 1}
# Ends where a grammar says, within max_tokens.
ENDS_BY_GRAMMAR = {"finish": "stop", "tokens": None}
REGEX = {"regex": "[a-z]{2,5} [0-9]{3}"}

CASES = [
    # text, token ids, logprobs, usage, finish_reason length
    *cases("completions", COMPLETIONS, completion()),
    *cases("completions-token-ids", COMPLETIONS, completion(return_token_ids=True)),
    *cases("completions-logprobs-0", COMPLETIONS, completion(logprobs=0)),
    *cases("completions-logprobs-1", COMPLETIONS, completion(logprobs=1)),
    *cases("completions-logprobs-5", COMPLETIONS, completion(logprobs=5)),
    *cases("completions-logprobs-20", COMPLETIONS, completion(logprobs=20)),
    *cases(
        "completions-logprobs-token-ids",
        COMPLETIONS,
        completion(logprobs=2, return_tokens_as_token_ids=True),
    ),
    *cases(
        "completions-truncated-prompt",
        COMPLETIONS,
        completion(truncate_prompt_tokens=5, return_token_ids=True),
    ),
    *cases("completions-prompt-list", COMPLETIONS, completion(prompt=[PROMPT])),
    *cases("chat", CHAT, chat()),
    *cases("chat-token-ids", CHAT, chat(return_token_ids=True)),
    *cases("chat-logprobs", CHAT, chat(logprobs=True)),
    *cases("chat-top-logprobs", CHAT, chat(logprobs=True, top_logprobs=3)),
    pytest.param(
        Case(COMPLETIONS, streamed(completion(), stream_options=USAGE)),
        id="completions-stream-usage",
    ),
    pytest.param(
        Case(COMPLETIONS, streamed(completion(), stream_options=CONTINUOUS_USAGE)),
        id="completions-stream-continuous-usage",
    ),
    pytest.param(
        Case(CHAT, streamed(chat(), stream_options=USAGE)), id="chat-stream-usage"
    ),
    pytest.param(
        Case(CHAT, streamed(chat(), stream_options=CONTINUOUS_USAGE)),
        id="chat-stream-continuous-usage",
    ),
    *cases("generate", GENERATE, completion()),
    # echo needs the prompt's logprobs: prefilled here
    *cases("completions-echo", COMPLETIONS, completion(echo=True), PROMPT_LOGPROBS),
    *cases(
        "completions-echo-logprobs",
        COMPLETIONS,
        completion(echo=True, logprobs=2),
        PROMPT_LOGPROBS,
    ),
    pytest.param(  # vLLM refuses prompt_logprobs in a stream
        Case(COMPLETIONS, completion(prompt_logprobs=1, logprobs=1), PROMPT_LOGPROBS),
        id="completions-prompt-logprobs",
    ),
    # token 1 ends the request: EOS, the generation config's second end
    # token, max_tokens 1
    *cases("completions-eos-first", COMPLETIONS, completion(**FORCE_EOS), **ENDS_AT_1),
    *cases(
        "completions-eos-first-logprobs",
        COMPLETIONS,
        completion(logprobs=2, **FORCE_EOS),
        **ENDS_AT_1,
    ),
    *cases(
        "completions-pad-first",
        COMPLETIONS,
        completion(logit_bias={str(PAD_ID): 100}),
        **ENDS_AT_1,
    ),
    *cases("chat-eos-first", CHAT, chat(**FORCE_EOS), **ENDS_AT_1),
    *cases(
        "completions-eos-first-shown",
        COMPLETIONS,
        completion(skip_special_tokens=False, **FORCE_EOS),
        **ENDS_AT_1,
    ),
    *cases(
        "completions-max-tokens-1", COMPLETIONS, completion(max_tokens=1), **NO_FORWARD
    ),
    *cases(
        "completions-max-tokens-1-logprobs",
        COMPLETIONS,
        completion(max_tokens=1, logprobs=3, return_token_ids=True),
        **NO_FORWARD,
    ),
    *cases("chat-max-tokens-1", CHAT, chat(max_tokens=1), **NO_FORWARD),
    *cases(
        "chat-max-tokens-1-logprobs",
        CHAT,
        chat(max_tokens=1, logprobs=True, top_logprobs=5),
        **NO_FORWARD,
    ),
    *cases(
        "chat-max-completion-tokens-1",
        CHAT,
        chat(max_tokens=None, max_completion_tokens=1),
        **NO_FORWARD,
    ),
    *cases("generate-max-tokens-1", GENERATE, completion(max_tokens=1), **NO_FORWARD),
    # min_tokens keeps a forced EOS out of tokens 1..3 (EOS is token 4);
    # ignore_eos out of all
    *cases(
        "completions-min-tokens",
        COMPLETIONS,
        completion(min_tokens=3, **FORCE_EOS),
        finish="stop",
        tokens=4,
    ),
    *cases(
        "completions-min-tokens-1",
        COMPLETIONS,
        completion(min_tokens=1, **FORCE_EOS),
        finish="stop",
        tokens=2,
    ),
    *cases(
        "chat-min-tokens",
        CHAT,
        chat(min_tokens=3, **FORCE_EOS),
        finish="stop",
        tokens=4,
    ),
    *cases(
        "completions-ignore-eos",
        COMPLETIONS,
        completion(ignore_eos=True, return_token_ids=True, **FORCE_EOS),
    ),
    # penalties (more in test_penalties_and_bad_words_see_token_1)
    *cases(
        "chat-frequency-penalty",
        CHAT,
        chat(frequency_penalty=1.5, max_tokens=12),
        PENALTIES,
    ),
    *cases(
        "chat-repetition-penalty", CHAT, chat(repetition_penalty=1.8, max_tokens=12)
    ),
    # seeded random sampling: the same tokens as plain vLLM (fallback)
    *[
        param
        for seed in (1, 7, 1234)
        for param in cases(
            f"completions-seed-{seed}",
            COMPLETIONS,
            completion(temperature=1.0, seed=seed),
            SEEDED,
        )
    ],
    *cases(
        "chat-seed",
        CHAT,
        chat(temperature=1.0, top_p=0.9, seed=5, logprobs=True),
        SEEDED,
    ),
    # structured outputs: the grammar accepts token 1 before token 2
    *cases(
        "completions-choice",
        COMPLETIONS,
        completion(max_tokens=10, structured_outputs=CHOICES),
        **ENDS_BY_GRAMMAR,
    ),
    *cases(
        "chat-choice",
        CHAT,
        chat(max_tokens=16, structured_outputs=CHOICES),
        **ENDS_BY_GRAMMAR,
    ),
    *cases(
        "completions-regex",
        COMPLETIONS,
        completion(max_tokens=10, structured_outputs=REGEX),
        **ENDS_BY_GRAMMAR,
    ),
    # the grammar ends with token 1 (then only an end token is allowed), or
    # max_tokens does
    *cases(
        "completions-regex-one-token",
        COMPLETIONS,
        completion(structured_outputs={"regex": "[0-9]"}),
        **ENDS_BY_GRAMMAR,
    ),
    *cases(
        "completions-choice-max-tokens-1",
        COMPLETIONS,
        completion(max_tokens=1, structured_outputs=CHOICES),
        **NO_FORWARD,
    ),
    # token 1 a character's first byte: the grammar, then the detokenizer,
    # take bytes 2 and 3 after it
    *cases(
        "completions-regex-multibyte",
        COMPLETIONS,
        completion(max_tokens=10, structured_outputs={"regex": "—[a-z]{3}"}),
        **ENDS_BY_GRAMMAR,
    ),
    *cases(
        "chat-json-schema",
        CHAT,
        chat(max_tokens=12, response_format=JSON_SCHEMA),
        finish=None,
        tokens=None,
    ),
    *cases(
        "completions-choice-logprobs",
        COMPLETIONS,
        completion(max_tokens=10, structured_outputs=CHOICES, logprobs=3),
        **ENDS_BY_GRAMMAR,
    ),
    # sampling the V1 runner continues exactly: a seed without randomness,
    # random sampling that top_k makes deterministic, a token allow-list
    *cases("completions-greedy-seed", COMPLETIONS, completion(seed=3)),
    *cases("completions-top-k-1", COMPLETIONS, completion(temperature=1.0, top_k=1)),
    *cases(
        "chat-allowed-token-ids",
        CHAT,
        chat(allowed_token_ids=[290, 44, 351, 10, 11, 12, 13, 14]),
    ),
    # the stream's usage where token 1 ends it
    pytest.param(
        Case(
            COMPLETIONS,
            streamed(completion(max_tokens=1), stream_options=CONTINUOUS_USAGE),
            forward=False,
        ),
        id="completions-max-tokens-1-stream-continuous-usage",
    ),
    pytest.param(
        Case(
            CHAT,
            streamed(chat(**FORCE_EOS), stream_options=CONTINUOUS_USAGE),
            **ENDS_AT_1,
        ),
        id="chat-eos-first-stream-continuous-usage",
    ),
    # chat's echo (of the last message) is judged like completions' echo
    *cases("chat-echo", CHAT, chat(echo=True), PROMPT_LOGPROBS),
    # several choices: prefilled here (vLLM refuses n > 1 when greedy)
    *cases("chat-n-2", CHAT, chat(n=2, temperature=1.0, seed=3), MANY),
    *cases(
        "completions-n-2", COMPLETIONS, completion(n=2, temperature=1.0, seed=3), MANY
    ),
]


@pytest.mark.parametrize("case", CASES)
def test_same_answer_as_plain_vllm(cluster, case):
    with Route(cluster, case.via, forward=case.forward) as route:
        expected, got = both(cluster, case.path, case.body, route)
        check_case(case, expected)
        if case.body.get("n", 1) > 1:
            expected, got = by_choice(expected), by_choice(got)
        assert got == expected


def test_choice_options_share_the_first_token(cluster):
    """The choice cases are the ones asked for: token 1 lies within what both
    options share (the grammar accepts it and still allows both endings)."""
    body = completion(max_tokens=10, structured_outputs=CHOICES, logprobs=0)
    choice = post(cluster.baseline.url, COMPLETIONS, body).json()["choices"][0]
    first = choice["logprobs"]["tokens"][0]
    assert choice["text"] in CHOICES["choice"]
    assert "the cold ".startswith(first), first


# ---- cases built from the baseline's own first tokens ----


def first_tokens(cluster, path: str, body: dict) -> tuple[int, str, str]:
    """The baseline's token 1 (id, text) and token 2's text, for ``body``."""
    one = post(cluster.baseline.url, path, dict(body, max_tokens=1)).json()
    two = post(cluster.baseline.url, path, dict(body, max_tokens=2)).json()
    choice_one, choice_two = one["choices"][0], two["choices"][0]
    if path == CHAT:
        text1 = choice_one["message"]["content"]
        text12 = choice_two["message"]["content"]
    else:
        text1, text12 = choice_one["text"], choice_two["text"]
    assert text12.startswith(text1) and text1 and text12 != text1, (text1, text12)
    return choice_one["token_ids"][0], text1, text12[len(text1) :]


def base_body(path: str) -> dict:
    return (chat if path == CHAT else completion)(return_token_ids=True)


# Each changes token 2 of the greedy answer only where the engine counts
# token 1 as an output (penalties: a bias makes token 1 what greedy would
# repeat; bad words: the two-token word of tokens 1 and 2): (name, bias on
# token 1, the feature, path). The V1 runner sees token 1 as a prompt token:
# frequency and presence penalties and bad words then take the fallback.
FEATURES = [
    ("repetition-penalty", 30, {"repetition_penalty": 2.0}, FIRST_TOKEN),
    ("frequency-penalty", 22, {"frequency_penalty": 2.0}, PENALTIES),
    ("presence-penalty", 22, {"presence_penalty": 2.0}, PENALTIES),
    ("bad-words", 0, {"bad_words": "TOKENS_1_2"}, BAD_WORDS),
]


@pytest.mark.parametrize("stream", [False, True], ids=["", "stream"])
@pytest.mark.parametrize(
    ("bias", "feature", "via"), [pytest.param(*f[1:], id=f[0]) for f in FEATURES]
)
def test_penalties_and_bad_words_see_token_1(cluster, bias, feature, via, stream):
    """Penalties and bad words that change token 2 because of token 1, as
    plain vLLM applies them."""
    if "bad_words" in feature and not completions_take_bad_words():
        pytest.skip("this vLLM's completions API has no bad_words")
    body = completion(max_tokens=8, return_token_ids=True)
    token1, text1, text2 = first_tokens(cluster, COMPLETIONS, body)
    if bias:
        body["logit_bias"] = {str(token1): bias}
    if feature.get("bad_words") == "TOKENS_1_2":
        feature = {"bad_words": [text1 + text2]}
    without = answer(cluster.baseline.url, COMPLETIONS, body)["choices"][0]
    body |= feature
    with Route(cluster, via) as route:
        expected, got = both(
            cluster, COMPLETIONS, streamed(body) if stream else body, route
        )
        if not stream:
            tokens = expected["choices"][0]["token_ids"]
            assert tokens[0] == token1
            assert tokens[1] != without["token_ids"][1], "token 2 did not change"
        assert got == expected


SPAN_CASES = [
    pytest.param(path, stream, include, id=f"{name}{s}{i}")
    for path, name in ((COMPLETIONS, "completions"), (CHAT, "chat"))
    for stream, s in ((False, ""), (True, "-stream"))
    for include, i in ((False, ""), (True, "-include-stop"))
]


@pytest.mark.parametrize(("path", "stream", "include"), SPAN_CASES)
def test_stop_string_across_tokens_1_and_2(cluster, path, stream, include):
    """A stop string made of token 1's last character and token 2's first:
    vLLM's frontend sees it only once token 2 comes after the producer's
    token 1."""
    body = base_body(path)
    _, text1, text2 = first_tokens(cluster, path, body)
    body = dict(body, stop=[text1[-1] + text2[0]], include_stop_str_in_output=include)
    if stream:
        body = streamed(body)
    with Route(cluster, FIRST_TOKEN) as route:
        expected, got = both(cluster, path, body, route)
        assert got == expected


@pytest.mark.parametrize(
    ("path", "stream"),
    [
        pytest.param(p, s, id=f"{n}{'-stream' if s else ''}")
        for p, n in ((COMPLETIONS, "completions"), (CHAT, "chat"))
        for s in (False, True)
    ],
)
def test_token_1_ends_the_request(cluster, path, stream):
    """Token 1 is a stop token (the engine ends the request on it: no
    forward), or its text a stop string (vLLM's frontend ends it: whether the
    pull had started by then is a race)."""
    body = base_body(path)
    token1, text1, _ = first_tokens(cluster, path, body)
    wrap = streamed if stream else dict
    by_token = wrap(body, stop_token_ids=[token1])
    with Route(cluster, FIRST_TOKEN, forward=False) as route:
        expected, got = both(cluster, path, by_token, route)
        assert got == expected
    for include in (False, True):
        by_text = wrap(body, stop=[text1], include_stop_str_in_output=include)
        with Route(cluster, FIRST_TOKEN, any_loads=True) as route:
            expected, got = both(cluster, path, by_text, route)
            assert got == expected


@pytest.mark.parametrize("stream", [False, True], ids=["", "stream"])
def test_unseeded_sampling_takes_the_first_token_path(cluster, stream):
    """Random without a seed: no answer to compare, but a whole one, and the
    first token is the producer's."""
    body = completion(temperature=1.0, return_token_ids=True)
    with Route(cluster, FIRST_TOKEN):
        got = answer(
            cluster.consumer.url, COMPLETIONS, streamed(body) if stream else body
        )
    if stream:
        assert got[-1] == "[DONE]"
        token_ids = [t for e in got[:-1] for t in e["choices"][0]["token_ids"]]
    else:
        token_ids = got["choices"][0]["token_ids"]
    assert len(token_ids) == MAX_TOKENS


# ---- prompts at the edges, several requests at once ----


def test_prompt_whose_blocks_the_consumer_holds(cluster):
    """A block-aligned prompt sent twice: the second time the consumer has
    every block of it in its prefix cache (what it still pulls is vLLM's to
    say), and continues from the producer's token 1 all the same."""
    body = completion(prompt=random_prompt(64, seed=1901), return_token_ids=True)
    for _ in range(2):
        with Route(cluster, any_loads=True) as route:
            expected, got = both(cluster, COMPLETIONS, body, route)
            assert got == expected


@pytest.mark.parametrize("room", [1, 2])
def test_prompt_at_the_context_limit(cluster, room):
    """No max_tokens: the context limit ends the request after ``room``
    tokens; at 1, token 1 ends it (no forward)."""
    prompt = random_prompt(CONSUMER_MAX_LEN - room, seed=1900 + room)
    body = {"prompt": prompt, "temperature": 0, "return_token_ids": True}
    refused = post(cluster.baseline.url, COMPLETIONS, body)
    if refused.status_code == 400 and "maximum context length" in refused.text:
        # vLLM 0.25 takes max_tokens' default (16) and refuses the prompt;
        # later versions let the context limit end the request.
        pytest.skip("this vLLM refuses a prompt without room for max_tokens")
    with Route(cluster, forward=room > 1) as route:
        expected, got = both(cluster, COMPLETIONS, body, route)
        assert expected["choices"][0]["finish_reason"] == "length"
        assert len(expected["choices"][0]["token_ids"]) == room
        assert got == expected


# (path, body, via, forward): one of each kind, answered at once.
MIX = [
    (COMPLETIONS, completion(), FIRST_TOKEN, True),
    (CHAT, chat(max_tokens=9), FIRST_TOKEN, True),
    (COMPLETIONS, completion(logprobs=2, max_tokens=3), FIRST_TOKEN, True),
    (CHAT, chat(logprobs=True, top_logprobs=2), FIRST_TOKEN, True),
    (COMPLETIONS, completion(max_tokens=1), FIRST_TOKEN, False),
    (CHAT, chat(**FORCE_EOS), FIRST_TOKEN, False),
    (COMPLETIONS, completion(min_tokens=3, **FORCE_EOS), FIRST_TOKEN, True),
    (COMPLETIONS, completion(stop=["li"]), FIRST_TOKEN, True),
    (COMPLETIONS, completion(ignore_eos=True, **FORCE_EOS), FIRST_TOKEN, True),
    (COMPLETIONS, completion(repetition_penalty=1.5), FIRST_TOKEN, True),
    (
        COMPLETIONS,
        completion(max_tokens=10, structured_outputs=CHOICES),
        FIRST_TOKEN,
        True,
    ),
    (CHAT, chat(max_tokens=12, response_format=JSON_SCHEMA), FIRST_TOKEN, True),
    (COMPLETIONS, completion(temperature=1.0, seed=11), SEEDED, True),
    (CHAT, chat(frequency_penalty=1.0), PENALTIES, True),
    (COMPLETIONS, completion(bad_words=["ime"]), BAD_WORDS, True),
    (COMPLETIONS, completion(echo=True), PROMPT_LOGPROBS, True),
    (COMPLETIONS, completion(prompt=random_prompt(100, seed=1902)), FIRST_TOKEN, True),
]
if not completions_take_bad_words():
    MIX = [m for m in MIX if "bad_words" not in m[1]]
if vllm_version() < (0, 26):
    # vLLM 0.25's seeded sampling on the CPU (V1) runner depends on the
    # batch: plain vLLM, the same 15 requests sent at once, answered the
    # seeded one differently from alone in 1 of 3 tries. Alone it is exact
    # (test_same_answer_as_plain_vllm[completions-seed-*]); in a batch there
    # is nothing to compare with.
    MIX = [m for m in MIX if "seed" not in m[1]]


def test_mixed_requests_at_once(cluster):
    """The kinds above in one batch of the consumer's engine: token 1 of
    some, token 2 of others, requests ending on token 1, fallbacks."""
    expected = [answer(cluster.baseline.url, path, body) for path, body, *_ in MIX]
    also = [(via, forward) for *_, via, forward in MIX[1:]]
    with (
        Route(cluster, MIX[0][2], MIX[0][3], also=also),
        ThreadPoolExecutor(len(MIX)) as pool,
    ):
        got = list(pool.map(lambda m: answer(cluster.consumer.url, m[0], m[1]), MIX))
        for i, (want, have) in enumerate(zip(expected, got, strict=True)):
            assert have == want, f"request {i}: {MIX[i][:2]}"


# ---- what a client sends that is not the first token's to decide ----


def test_client_kv_params_choose_no_first_token(cluster):
    """A client's own lease with a first token of its choosing is dropped;
    the answer is plain vLLM's, token 1 the producer's."""
    forged = {
        "do_remote_prefill": True,
        "pdserve_lease": {"first_token": {"token_id": 5}, "mac": "0" * 64},
    }
    body = completion(return_token_ids=True, kv_transfer_params=forged)
    with Route(cluster) as route:
        expected, got = both(cluster, COMPLETIONS, body, route)
        assert got == expected


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param(COMPLETIONS, completion(structured_outputs=BAD_REGEX), id="regex"),
        pytest.param(COMPLETIONS, completion(logprobs=50), id="too-many-logprobs"),
        pytest.param(COMPLETIONS, completion(min_tokens=9, max_tokens=3), id="min-max"),
        # vLLM 0.32 parses tool calls only with a --tool-call-parser
        pytest.param(CHAT, chat(tools=TOOLS, tool_choice="required"), id="tools"),
        pytest.param(CHAT, chat(tools=TOOLS, tool_choice=NAMED_TOOL), id="named-tool"),
    ],
)
def test_refused_like_plain_vllm(cluster, path, body):
    """Requests vLLM refuses: the consumer's answer is the baseline's."""
    expected = post(cluster.baseline.url, path, body)
    got = post(cluster.consumer.url, path, body)
    assert expected.status_code == 400
    assert (got.status_code, got.json()) == (expected.status_code, expected.json())
