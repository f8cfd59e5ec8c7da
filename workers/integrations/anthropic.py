"""Claude, asked through the Anthropic Messages API for prompt-optimization suggestions.

Not a notification destination: ``AnthropicClient.suggest`` hands Claude what the optimizer
measured about one service's prompts (tokens, cost, repeat share, quality, a prompt sample when
one was kept) and the user's question, and returns the suggestions it answered with. It makes
ONE attempt per call and raises ``TransientError`` (429, 529 overloaded, 5xx, timeouts) or
``PermanentError`` (400/401/403/404, with the API's ``error.type`` and message) like the
destination clients, so that callers retry and break circuits the same way.

Its own spending is accounted: totals of calls, errors, tokens and dollars (``usage()``) and
the Prometheus counters ``integrations_anthropic_tokens_total{kind}`` and
``integrations_anthropic_cost_usd_total``.
"""
from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from msgspec import Struct
from prometheus_client import Counter

from ipc.config import AnthropicSection
from workers.integrations.http import PermanentError, call, redact
from workers.integrations.secrets import read_secret, shown
from workers.resilience.retry import TransientError

API_VERSION = "2023-06-01"
MAX_PROMPT_SAMPLE = 8000  # characters of the prompt sample sent: a sample, not a whole corpus

TOKENS = Counter("integrations_anthropic_tokens",
                 "Tokens of the optimizer's own Claude calls, by kind.", ["kind"])
COST = Counter("integrations_anthropic_cost_usd",
               "Dollars spent on the optimizer's own Claude calls, at the configured prices.")

SYSTEM_PROMPT = """\
You are a cost and latency optimizer for applications that call large language models. \
You are given measurements of how one service uses one model for one operation, sometimes a \
sample of its prompt, and a question from the service's owner.

Suggest concrete prompt optimizations that reduce cost without hurting answer quality, such as:
- shortening the prompt (remove redundant instructions, examples or context; tighten output \
format to cut output tokens),
- caching (prompt caching of a stable prefix when many calls repeat it; response caching when \
identical requests repeat),
- a cheaper model when the task and the measured quality allow it.

Ground every suggestion in the numbers given; do not invent measurements. If the prompt sample \
is missing (prompts are often redacted), reason from the numbers alone.

Answer with ONLY a JSON array, most valuable suggestion first, each element an object:
{"title": "<short imperative title>", "rationale": "<why, citing the numbers>", \
"expected_savings_pct": <estimated cost reduction, a number from 0 to 100>, \
"change": "<the exact change to make: rewritten prompt text, cache setting or model name>"}"""


class SuggestionRequest(Struct, kw_only=True, frozen=True):
    """What the optimizer knows about one service's prompt usage, and what its owner asks."""

    service: str
    model: str
    operation: str
    avg_input_tokens: float
    avg_output_tokens: float
    cost_per_call_usd: float
    repeat_share: float | None = None  # share of calls repeating an earlier prompt, 0..1
    quality_mean: float | None = None  # mean quality score, when the service reports one
    prompt_sample: str = ""            # often empty: prompts are redacted by default
    question: str = ""


class SuggestionItem(Struct, kw_only=True, frozen=True):
    title: str
    rationale: str
    expected_savings_pct: float | None = None
    change: str = ""


class Suggestion(Struct, kw_only=True, frozen=True):
    """Claude's answer: the parsed suggestions, the raw text and what the call cost."""

    items: list[SuggestionItem]
    text: str
    model: str
    message_id: str
    stop_reason: str
    input_tokens: int
    output_tokens: int
    cost_usd: float


def user_message(request: SuggestionRequest) -> str:
    """The facts as plain lines, so that the model cites them rather than guesses."""
    quality = "not reported" if request.quality_mean is None else f"{request.quality_mean:.3f}"
    repeats = "not known" if request.repeat_share is None else f"{request.repeat_share:.1%}"
    lines = [
        f"Service: {request.service}",
        f"Model: {request.model}",
        f"Operation: {request.operation}",
        f"Average input tokens per call: {request.avg_input_tokens:.0f}",
        f"Average output tokens per call: {request.avg_output_tokens:.0f}",
        f"Cost per call: ${request.cost_per_call_usd:.6f}",
        f"Share of calls repeating an earlier prompt: {repeats}",
        f"Mean quality score: {quality}",
    ]
    sample = request.prompt_sample.strip()
    if sample:
        cut = " (truncated)" if len(sample) > MAX_PROMPT_SAMPLE else ""
        lines += ["", f"Prompt sample{cut}:", "<prompt>", sample[:MAX_PROMPT_SAMPLE], "</prompt>"]
    else:
        lines += ["", "Prompt sample: not available (redacted)."]
    question = request.question.strip() or "How can this service's prompts be made cheaper?"
    lines += ["", f"Question: {question}"]
    return "\n".join(lines)


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _percent(value: Any) -> float | None:
    if isinstance(value, str):
        value = value.strip().rstrip("%")
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return min(100.0, max(0.0, number)) if number == number else None  # NaN: unknown


def _first_array(text: str) -> list[dict[str, Any]] | None:
    """The first JSON array of objects in ``text``, wherever it is (fenced, after prose)."""
    decoder = json.JSONDecoder()
    for found in re.finditer(r"\[", text):
        try:
            value, _ = decoder.raw_decode(text, found.start())
        except ValueError:
            continue
        if isinstance(value, list) and any(isinstance(item, dict) for item in value):
            return [item for item in value if isinstance(item, dict)]
    return None


def parse_suggestions(text: str) -> list[SuggestionItem]:
    """The suggestions of an answer; the whole text as one suggestion when it holds no JSON
    array, so that an answer in prose is still shown rather than lost."""
    text = text.strip()
    if not text:
        return []
    found = _first_array(text)
    if found is None:
        return [SuggestionItem(title="Suggestion", rationale=text)]
    return [SuggestionItem(title=_text(item.get("title")).strip() or "Suggestion",
                           rationale=_text(item.get("rationale")),
                           expected_savings_pct=_percent(item.get("expected_savings_pct")),
                           change=_text(item.get("change")))
            for item in found]


def _api_error(message: str) -> str:
    """``error.type: error.message`` in place of the JSON error body at the end of an
    ``http.call`` error message; the message as it is when the body is not the API's JSON."""
    start = message.find("{")
    if start < 0:
        return message
    try:
        body = json.loads(message[start:])
    except ValueError:
        return message
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return message
    return f"{message[:start]}{_text(error.get('type'))}: {_text(error.get('message'))}"


class AnthropicClient:
    name = "anthropic"

    def __init__(self, section: AnthropicSection, timeout_s: float) -> None:
        self.section = section
        self.timeout_s = timeout_s
        self.api_key = read_secret("integrations.anthropic.api_key", section.api_key,
                                   section.api_key_file)
        self.base_url = section.base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        if section.enabled:
            if not self.api_key:
                raise ValueError("integrations.anthropic.api_key is empty: set it "
                                 "(LLM_OPTIMIZER__INTEGRATIONS__ANTHROPIC__API_KEY) "
                                 "or integrations.anthropic.api_key_file")
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"integrations.anthropic.base_url = {section.base_url!r} "
                                 "is not an http(s) URL")
            if not section.model:
                raise ValueError("integrations.anthropic.model is empty")
        self.host = parts.netloc
        self.calls = 0
        self.errors = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost_usd = 0.0

    @property
    def secrets(self) -> list[str]:
        return [self.api_key] if self.api_key else []

    def describe(self) -> dict[str, Any]:
        return {"target": self.host, "model": self.section.model,
                "max_tokens": self.section.max_tokens, "api_key": shown(self.api_key)}

    def usage(self) -> dict[str, Any]:
        """Totals of this client's calls since it was made: ``calls`` counts attempts,
        ``errors`` the failed ones; dollars at the configured per-million-token prices."""
        return {"calls": self.calls, "errors": self.errors, "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens, "cost_usd": self.cost_usd}

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.section.input_usd_per_mtok
                + output_tokens * self.section.output_usd_per_mtok) / 1e6

    async def suggest(self, session: aiohttp.ClientSession,
                      request: SuggestionRequest) -> Suggestion:
        """One Messages API call (no retry here: the caller's policy decides)."""
        self.calls += 1
        try:
            answer = await self._ask(session, user_message(request))
        except TransientError as exc:
            self.errors += 1
            raise TransientError(redact(_api_error(str(exc)), self.secrets),
                                 retry_after=exc.retry_after) from None
        except PermanentError as exc:
            self.errors += 1
            raise PermanentError(redact(_api_error(str(exc)), self.secrets),
                                 exc.status) from None
        usage = answer.get("usage") or {}
        input_tokens = int(usage.get("input_tokens") or 0)
        output_tokens = int(usage.get("output_tokens") or 0)
        cost = self.cost(input_tokens, output_tokens)
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.cost_usd += cost
        TOKENS.labels(kind="input").inc(input_tokens)
        TOKENS.labels(kind="output").inc(output_tokens)
        COST.inc(cost)
        text = "".join(block.get("text") or "" for block in answer["content"]
                       if isinstance(block, dict) and block.get("type") == "text")
        return Suggestion(items=parse_suggestions(text), text=text,
                          model=_text(answer.get("model")), message_id=_text(answer.get("id")),
                          stop_reason=_text(answer.get("stop_reason")),
                          input_tokens=input_tokens, output_tokens=output_tokens, cost_usd=cost)

    async def _ask(self, session: aiohttp.ClientSession, text: str) -> dict[str, Any]:
        url = f"{self.base_url}/v1/messages"
        answer = await call(session, "POST", url, timeout_s=self.timeout_s, headers={
            "x-api-key": self.api_key, "anthropic-version": API_VERSION,
            "content-type": "application/json"}, json={
            "model": self.section.model, "max_tokens": self.section.max_tokens,
            "system": SYSTEM_PROMPT, "messages": [{"role": "user", "content": text}]})
        if not isinstance(answer, dict) or not isinstance(answer.get("content"), list):
            # a proxy or an outage page answering 200: not the API, so maybe not next time
            raise TransientError(f"POST {url}: 200 but not a Messages API answer")
        return answer
