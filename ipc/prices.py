"""Model prices, and the cost of an event that did not report its own.

A ``PriceTable`` maps model names to USD per token: input, output and cached input (input
tokens read from the provider's prompt cache). It is built in layers, each later one taking
precedence per model:

1. our TOML table: ``[collector] price_file``, or the one shipped with the package
   (``ipc/data/prices.toml``, identical to ``etc/prices.toml``);
2. ``[collector] litellm_price_file``: LiteLLM's model_prices_and_context_window.json, which
   many users already maintain (entries without per-token prices, and "sample_spec", are
   skipped; tiered and cache-write prices are not modelled);
3. ``[collector] prices``: per-model overrides in the config.

An entry that gives no cached-input price keeps the one of the layer below for the same model;
failing that, cached input tokens are billed at the input price. The table's ``version`` names
every layer (the TOML version, then a digest of the LiteLLM file and of the overrides), and an
event whose cost was computed carries that version in ``price_version``.

Lookup (``PriceTable.lookup``) tries, in order: the exact model name, "provider/model", the model
without a "provider/" prefix, then each of those with a date or version suffix stripped
("gpt-4o-2024-08-06" -> "gpt-4o", "claude-3-5-haiku-20241022", "mistral-large-2411",
"-latest", "-001"), and finally a bare name that only one "provider/name" entry has.
Names are compared without regard to case.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from collections.abc import Mapping
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from msgspec import Meta, Struct

from ipc.events import LLMEvent

if TYPE_CHECKING:
    from ipc.config import CollectorSection

TokenPrice = Annotated[float, Meta(ge=0, le=1)]
LITELLM_SKIPPED_KEYS = frozenset({"sample_spec"})
_DATED_SUFFIX = re.compile(r"[-@](\d{4}-\d{2}-\d{2}|\d{8}|\d{4}|\d{3}|latest)$", re.IGNORECASE)
# OpenTelemetry gen_ai.system values and other spellings -> LiteLLM's provider prefixes.
PROVIDER_ALIASES = {
    "mistral_ai": "mistral", "mistralai": "mistral", "google": "gemini", "gcp.gemini": "gemini",
    "gcp.vertex_ai": "vertex_ai", "vertexai": "vertex_ai", "aws.bedrock": "bedrock",
    "az.ai.openai": "azure", "azure.ai.openai": "azure", "azure_openai": "azure",
}


class ModelPrice(Struct, frozen=True, kw_only=True):
    """USD per token. ``cached_input`` None: cached input tokens cost the input price."""

    input: float
    output: float
    cached_input: float | None = None
    provider: str = ""


class PriceFileError(ValueError):
    """A price file that cannot be read or is not valid: ``path``, and why."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


class _TomlPrice(Struct, kw_only=True, forbid_unknown_fields=True):
    input: TokenPrice
    output: TokenPrice
    cached_input: TokenPrice | None = None
    provider: str = ""


class _TomlHeader(Struct, kw_only=True, forbid_unknown_fields=True):
    version: Annotated[str, Meta(min_length=1)]
    source: str = ""
    models: dict[str, Any] = {}


def _strip_provider(name: str) -> str | None:
    return name.split("/", 1)[1] if "/" in name else None


class PriceTable:
    """Immutable; ``merged`` returns a new table."""

    def __init__(self, prices: Mapping[str, ModelPrice], version: str):
        self.version = version
        self._prices = dict(prices)
        self._lower = {name.lower(): price for name, price in self._prices.items()}
        bare: dict[str, set[ModelPrice]] = {}
        for name, price in self._lower.items():
            tail = name
            while (tail := _strip_provider(tail)) is not None:
                bare.setdefault(tail, set()).add(price)
        self._bare = {name: next(iter(ps)) for name, ps in bare.items() if len(ps) == 1}

    def __len__(self) -> int:
        return len(self._prices)

    def __contains__(self, model: str) -> bool:
        return model in self._prices

    def models(self) -> dict[str, ModelPrice]:
        return dict(self._prices)

    def lookup(self, model: str, provider: str | None = None) -> ModelPrice | None:
        candidates = self._candidates(model, provider)
        for name in candidates:
            price = self._lower.get(name)
            if price is not None:
                return price
        for name in candidates:
            price = self._bare.get(name)
            if price is not None:
                return price
        return None

    @staticmethod
    def _candidates(model: str, provider: str | None) -> list[str]:
        model = model.lower()
        names = [model]
        if provider:
            provider = provider.lower()
            names.append(f"{provider}/{model}")
            alias = PROVIDER_ALIASES.get(provider)
            if alias:
                names.append(f"{alias}/{model}")
        tail = model
        while (tail := _strip_provider(tail)) is not None:
            names.append(tail)
        for name in list(names):
            stripped = _DATED_SUFFIX.sub("", name)
            if stripped != name and stripped not in names:
                names.append(stripped)
        return names

    def cost(self, event: LLMEvent) -> float | None:
        """The event's cost at this table's prices; None for a model the table does not know.
        Ignores ``event.cost_usd``: see ``with_cost``."""
        price = self.lookup(event.model, event.provider)
        if price is None:
            return None
        cached = min(event.cached_input_tokens or 0, event.input_tokens)
        cached_price = price.input if price.cached_input is None else price.cached_input
        return ((event.input_tokens - cached) * price.input + cached * cached_price
                + event.output_tokens * price.output)

    def with_cost(self, event: LLMEvent) -> LLMEvent:
        """The event with cost_usd filled in (and price_version set) when it reported none and
        the model is known; otherwise the event itself."""
        if event.cost_usd is not None:
            return event
        cost = self.cost(event)
        if cost is None:
            return event
        return msgspec.structs.replace(event, cost_usd=cost, price_version=self.version)

    def merged(self, prices: Mapping[str, ModelPrice], version: str) -> PriceTable:
        """This table with ``prices`` taking precedence per model; ``version`` is appended.
        An entry without a cached-input price keeps this table's one for the same model."""
        merged = dict(self._prices)
        by_lower = {name.lower(): name for name in merged}
        for name, price in prices.items():
            old_name = by_lower.get(name.lower())
            old = merged.pop(old_name) if old_name is not None else None
            if price.cached_input is None and old is not None and old.cached_input is not None:
                price = msgspec.structs.replace(price, cached_input=old.cached_input)
            merged[name] = price
            by_lower[name.lower()] = name
        return PriceTable(merged, f"{self.version}+{version}" if version else self.version)


# --- loaders ----------------------------------------------------------------------------------

def _validation_problem(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    text = text[:1].lower() + text[1:]
    match = re.search(r" - at `\$\.?(?P<path>[^`]*)`$", text)
    if match:
        text = f"{match.group('path')}: {text[:match.start()]}" if match.group("path") else \
            text[:match.start()]
    unknown = re.match(r"object contains unknown field `(.+)`", text)
    if unknown:
        text = f"{unknown.group(1)}: unknown key"
    return text.replace("`", "")


def parse_toml_prices(text: str, source: str = "<string>") -> PriceTable:
    """Our price table format (see etc/prices.toml): ``version``, ``source`` and one
    ``[models]`` entry per model with ``input``, ``output``, optional ``cached_input`` (USD per
    token) and ``provider``."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PriceFileError(source, f"invalid TOML: {exc}") from None
    try:
        header = msgspec.convert(doc, _TomlHeader)
    except msgspec.ValidationError as exc:
        raise PriceFileError(source, _validation_problem(exc)) from None
    prices = {}
    for name, entry in header.models.items():
        try:
            item = msgspec.convert(entry, _TomlPrice)
        except msgspec.ValidationError as exc:
            raise PriceFileError(source, f"models.{name}: {_validation_problem(exc)}") from None
        prices[name] = ModelPrice(input=item.input, output=item.output,
                                  cached_input=item.cached_input, provider=item.provider)
    return PriceTable(prices, header.version)


def load_toml_prices(path: str) -> PriceTable:
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PriceFileError(path, f"cannot read: {getattr(exc, 'strerror', None) or exc}") \
            from None
    return parse_toml_prices(text, path)


SHIPPED_PRICE_RESOURCE = "data/prices.toml"


def shipped_price_text() -> str:
    """The price table shipped inside the ipc package (works installed or editable)."""
    return resources.files("ipc").joinpath(SHIPPED_PRICE_RESOURCE).read_text(encoding="utf-8")


def shipped_prices() -> PriceTable:
    return parse_toml_prices(shipped_price_text(), "ipc/" + SHIPPED_PRICE_RESOURCE)


def _per_token(value: Any) -> float | None:
    """A LiteLLM cost field as a float, or None when absent or not a sane price."""
    if isinstance(value, str):  # a few hand-edited files quote their numbers
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and 0 <= value <= 1 else None


def parse_litellm_prices(data: bytes, source: str = "<bytes>") -> dict[str, ModelPrice]:
    """The per-token prices in a LiteLLM model_prices_and_context_window.json document.

    Uses input_cost_per_token, output_cost_per_token, cache_read_input_token_cost and
    litellm_provider; skips "sample_spec" and entries without both per-token prices (images,
    audio seconds, per-character prices...)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PriceFileError(source, f"invalid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PriceFileError(source, "expected an object of model entries at the top level")
    prices = {}
    for name, entry in doc.items():
        if name in LITELLM_SKIPPED_KEYS or not isinstance(entry, dict):
            continue
        input_price = _per_token(entry.get("input_cost_per_token"))
        output_price = _per_token(entry.get("output_cost_per_token"))
        if input_price is None or output_price is None:
            continue
        provider = entry.get("litellm_provider")
        prices[name] = ModelPrice(
            input=input_price, output=output_price,
            cached_input=_per_token(entry.get("cache_read_input_token_cost")),
            provider=provider if isinstance(provider, str) else "")
    return prices


def load_litellm_prices(path: str) -> tuple[dict[str, ModelPrice], str]:
    """The file's prices and a version tag for them: "litellm-" and a digest of the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise PriceFileError(path, f"cannot read: {exc.strerror}") from None
    return parse_litellm_prices(data, path), "litellm-" + hashlib.sha256(data).hexdigest()[:12]


def _digest(prices: Mapping[str, ModelPrice]) -> str:
    canonical = msgspec.json.encode({k: prices[k] for k in sorted(prices)})
    return hashlib.sha256(canonical).hexdigest()[:12]


def build_price_table(price_file: str = "", litellm_price_file: str = "",
                      overrides: Mapping[str, Any] | None = None) -> PriceTable:
    """The layered table (see the module doc). ``overrides`` maps a model to a Struct or
    mapping with input, output and optional cached_input. Raises PriceFileError."""
    table = load_toml_prices(price_file) if price_file else shipped_prices()
    if litellm_price_file:
        prices, version = load_litellm_prices(litellm_price_file)
        table = table.merged(prices, version)
    if overrides:
        prices = {name: _as_price(value) for name, value in overrides.items()}
        table = table.merged(prices, "config-" + _digest(prices))
    return table


def _as_price(value: Any) -> ModelPrice:
    if isinstance(value, ModelPrice):
        return value
    get = value.get if isinstance(value, Mapping) else lambda key: getattr(value, key, None)
    return ModelPrice(input=float(get("input")), output=float(get("output")),
                      cached_input=None if get("cached_input") is None
                      else float(get("cached_input")))


def price_table_from_config(section: CollectorSection) -> PriceTable:
    """The collector's table from its config section; a bad file is a ConfigError naming the
    key that points at it."""
    from ipc.config_loader import ConfigError

    try:
        return build_price_table(section.price_file, section.litellm_price_file,
                                 section.prices)
    except PriceFileError as exc:
        key = "litellm_price_file" if section.litellm_price_file and \
            exc.path == section.litellm_price_file else "price_file"
        raise ConfigError(f"collector.{key}", exc.reason, exc.path) from None
