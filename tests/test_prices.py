"""Price tables: the shipped TOML, LiteLLM files, config overrides, lookup fallbacks, and the cost
of an event."""
from __future__ import annotations

import os
import tomllib

import pytest

from ipc.config import CollectorSection, PriceOverride
from ipc.config_loader import ConfigError, config_from_document
from ipc.events import LLMEvent
from ipc.prices import (
    ModelPrice,
    PriceFileError,
    PriceTable,
    build_price_table,
    load_litellm_prices,
    load_toml_prices,
    parse_litellm_prices,
    parse_toml_prices,
    price_table_from_config,
    shipped_price_text,
    shipped_prices,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LITELLM = os.path.join(ROOT, "tests", "fixtures", "litellm_model_prices.json")


def event(model: str = "gpt-4o", provider: str | None = None, **changes) -> LLMEvent:
    fields = {"event_id": "e-1", "time_ns": 0, "service": "search", "model": model,
              "provider": provider, "input_tokens": 1_000_000, "output_tokens": 100_000,
              "latency_ms": 1.0}
    fields.update(changes)
    return LLMEvent(**fields)


def table(**prices: ModelPrice) -> PriceTable:
    return PriceTable({name.replace("_", "-"): p for name, p in prices.items()}, "t1")


# --- the shipped table -------------------------------------------------------------------------

def test_the_packaged_table_is_etc_prices_toml() -> None:
    with open(os.path.join(ROOT, "etc", "prices.toml"), encoding="utf-8") as f:
        assert f.read() == shipped_price_text(), \
            "etc/prices.toml and ipc/data/prices.toml must be identical: cp one over the other"


def test_the_shipped_table_is_versioned_and_sane() -> None:
    text = shipped_price_text()
    assert "public list prices, per token, USD" in text.splitlines()[0]
    doc = tomllib.loads(text)
    prices = shipped_prices()
    assert prices.version == doc["version"] and doc["version"]
    assert doc["source"] == "public list prices, per token, USD"
    providers = {p.provider for p in prices.models().values()}
    assert {"openai", "anthropic", "gemini", "mistral"} <= providers
    for name, price in prices.models().items():
        # Per token, not per million: nothing costs a dollar per thousand tokens.
        assert 0 <= price.input < 1e-3 and 0 <= price.output < 1e-3, name
        if price.cached_input is not None:
            assert price.cached_input <= price.input, name


def test_the_shipped_table_prices_some_well_known_models() -> None:
    prices = shipped_prices()
    assert prices.lookup("gpt-4o") == ModelPrice(input=2.5e-6, output=1e-5, cached_input=1.25e-6,
                                                  provider="openai")
    assert prices.lookup("gpt-4o-mini-2024-07-18").input == 1.5e-7
    assert prices.lookup("claude-3-5-haiku-20241022").output == 4e-6
    assert prices.lookup("anthropic/claude-sonnet-4-20250514").input == 3e-6
    assert prices.lookup("gemini-2.0-flash-001").input == 1e-7
    assert prices.lookup("mistral-large-latest").output == 6e-6
    # An explicitly dated entry wins over the stripped name: gpt-4o's first snapshot cost more.
    assert prices.lookup("gpt-4o-2024-05-13").input == 5e-6
    # Older Mistral versions had other prices: no fallback to a base name that is not listed.
    assert prices.lookup("mistral-small-2402") is None


def test_the_shipped_table_is_found_through_the_package_not_the_checkout() -> None:
    from importlib import resources

    path = resources.files("ipc").joinpath("data/prices.toml")
    assert path.is_file()
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    assert "data/*.toml" in package_data["ipc"]


# --- our TOML format ---------------------------------------------------------------------------

def test_toml_table(tmp_path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('version = "v7"\n[models]\n'
                    '"m1" = { input = 1e-6, output = 2e-6, cached_input = 5e-7 }\n'
                    '"m2" = { provider = "acme", input = 0.0, output = 0 }\n')
    prices = load_toml_prices(str(path))
    assert prices.version == "v7" and len(prices) == 2
    assert prices.lookup("m1") == ModelPrice(input=1e-6, output=2e-6, cached_input=5e-7)
    assert prices.lookup("m2") == ModelPrice(input=0.0, output=0.0, provider="acme")


@pytest.mark.parametrize("text, reason", [
    ('[models]\n"m" = { input = 1e-6, output = 1e-6 }\n', "object missing required field version"),
    ('version = ""\n', "version: expected str of length >= 1"),
    ('version = "v"\ncurrency = "EUR"\n', "currency: unknown key"),
    ('version = "v"\n[models]\n"m" = { input = -1e-6, output = 1e-6 }\n',
     "models.m: input: expected float >= 0.0"),
    ('version = "v"\n[models]\n"m" = { input = 2.5, output = 1e-6 }\n',
     "models.m: input: expected float <= 1.0"),
    ('version = "v"\n[models]\n"m" = { input = 1e-6 }\n',
     "models.m: object missing required field output"),
    ('version = "v"\n[models]\n"m" = { input = 1e-6, output = 1e-6, per = "1M" }\n',
     "models.m: per: unknown key"),
    ('version = "v"\n[models]\n"m" = { input = "cheap", output = 1e-6 }\n',
     "models.m: input: expected float, got str"),
    ('version = v\n', "invalid TOML"),
])
def test_invalid_toml_tables(text: str, reason: str) -> None:
    with pytest.raises(PriceFileError) as info:
        parse_toml_prices(text, "p.toml")
    assert info.value.path == "p.toml"
    assert info.value.reason.startswith(reason), info.value.reason


def test_a_missing_price_file() -> None:
    with pytest.raises(PriceFileError) as info:
        load_toml_prices("/nonexistent/prices.toml")
    assert info.value.reason == "cannot read: No such file or directory"


# --- LiteLLM's format --------------------------------------------------------------------------

def test_litellm_file_loading() -> None:
    prices, version = load_litellm_prices(LITELLM)
    assert version.startswith("litellm-") and len(version) == len("litellm-") + 12
    assert prices["gpt-4o"] == ModelPrice(input=2e-6, output=8e-6, cached_input=1e-6,
                                          provider="openai")
    assert prices["gpt-4o-mini"] == ModelPrice(input=1e-7, output=5e-7, provider="openai")
    assert prices["azure/gpt-4o"].provider == "azure"
    assert prices["acme-quoted"] == ModelPrice(input=1e-6, output=3e-6, provider="acme")
    # sample_spec, per-pixel and per-second prices, a missing output price, a negative price.
    for skipped in ("sample_spec", "1024-x-1024/dall-e-2", "whisper-1", "acme-input-only",
                    "acme-bad"):
        assert skipped not in prices
    assert set(prices) == {"gpt-4o", "gpt-4o-mini", "azure/gpt-4o", "mistral/acme-large-latest",
                           "vertex_ai/acme-lite", "gemini/acme-lite", "acme-quoted"}


@pytest.mark.parametrize("data, reason", [(b"{", "invalid JSON"),
                                          (b"[1, 2]", "expected an object of model entries"),
                                          (b"\xff", "invalid JSON")])
def test_invalid_litellm_files(data: bytes, reason: str) -> None:
    with pytest.raises(PriceFileError) as info:
        parse_litellm_prices(data, "x.json")
    assert info.value.reason.startswith(reason)


def test_litellm_prices_take_precedence_over_the_shipped_table() -> None:
    prices = build_price_table(litellm_price_file=LITELLM)
    shipped = shipped_prices()
    assert prices.version.startswith(shipped.version + "+litellm-")
    assert prices.lookup("gpt-4o").input == 2e-6           # from the LiteLLM file
    assert prices.lookup("claude-3-haiku") == shipped.lookup("claude-3-haiku")  # kept
    # The LiteLLM entry for gpt-4o-mini has no cache price: the shipped one is kept.
    assert prices.lookup("gpt-4o-mini").cached_input == shipped.lookup("gpt-4o-mini").cached_input


# --- overrides ---------------------------------------------------------------------------------

def test_config_overrides_take_precedence_over_both_files(tmp_path) -> None:
    overrides = {"gpt-4o": PriceOverride(input=1e-6, output=4e-6),
                 "in-house-7b": PriceOverride(input=1e-8, output=2e-8, cached_input=0.0)}
    prices = build_price_table(litellm_price_file=LITELLM, overrides=overrides)
    assert prices.lookup("gpt-4o") == ModelPrice(input=1e-6, output=4e-6, cached_input=1e-6,
                                                 provider="")
    assert prices.lookup("in-house-7b") == ModelPrice(input=1e-8, output=2e-8, cached_input=0.0)
    assert "+config-" in prices.version
    # Another override gives another version; the same one the same version.
    again = build_price_table(litellm_price_file=LITELLM, overrides=dict(overrides))
    other = build_price_table(litellm_price_file=LITELLM,
                              overrides={"gpt-4o": PriceOverride(input=2e-6, output=4e-6)})
    assert again.version == prices.version != other.version


def test_overrides_match_names_without_regard_to_case() -> None:
    prices = table(gpt_4o=ModelPrice(input=1e-6, output=2e-6, cached_input=5e-7))
    merged = prices.merged({"GPT-4o": ModelPrice(input=3e-6, output=4e-6)}, "o")
    assert len(merged) == 1 and merged.version == "t1+o"
    assert merged.lookup("gpt-4o") == ModelPrice(input=3e-6, output=4e-6, cached_input=5e-7)


def test_price_table_from_the_config() -> None:
    config = config_from_document({"collector": {
        "litellm_price_file": LITELLM,
        "prices": {"acme-large": {"input": 1e-6, "output": 2e-6}}}}, {})
    prices = price_table_from_config(config.collector)
    assert prices.lookup("acme-large") == ModelPrice(input=1e-6, output=2e-6)
    assert prices.lookup("gpt-4o").input == 2e-6
    default = price_table_from_config(CollectorSection())
    assert default.version == shipped_prices().version


def test_a_custom_price_file_replaces_the_shipped_one(tmp_path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('version = "acme-3"\n[models]\n"m" = { input = 1e-6, output = 1e-6 }\n')
    prices = price_table_from_config(CollectorSection(price_file=str(path)))
    assert prices.version == "acme-3" and len(prices) == 1


def test_bad_price_files_are_config_errors_naming_the_key(tmp_path) -> None:
    with pytest.raises(ConfigError) as info:
        price_table_from_config(CollectorSection(price_file="/nonexistent.toml"))
    assert info.value.key == "collector.price_file"
    bad = tmp_path / "bad.json"
    bad.write_text("[")
    with pytest.raises(ConfigError) as info:
        price_table_from_config(CollectorSection(litellm_price_file=str(bad)))
    assert info.value.key == "collector.litellm_price_file"
    assert info.value.problem.startswith("invalid JSON")


@pytest.mark.parametrize("entry, key, problem", [
    ({"input": -1, "output": 1e-6}, "collector.prices.gpt-4o.input", "expected float >= 0.0"),
    ({"input": 1e-6}, "collector.prices.gpt-4o", "object missing required field output"),
    ({"input": 1e-6, "output": 1e-6, "cached": 0}, "collector.prices.gpt-4o.cached",
     "unknown key"),
    ({"input": 1e-6, "output": 1e-6, "cached_input": 3}, "collector.prices.gpt-4o.cached_input",
     "expected float <= 1.0"),
])
def test_invalid_overrides_in_the_config(entry, key, problem) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_document({"collector": {"prices": {"gpt-4o": entry}}}, {})
    assert info.value.key == key
    assert info.value.problem.startswith(problem)


# --- lookup ------------------------------------------------------------------------------------

def test_exact_names_come_first() -> None:
    exact, base = ModelPrice(input=1, output=1), ModelPrice(input=2, output=2)
    prices = PriceTable({"gpt-4o-2024-08-06": exact, "gpt-4o": base}, "v")
    assert prices.lookup("gpt-4o-2024-08-06") is exact
    assert prices.lookup("GPT-4o-2024-08-06") is exact
    assert prices.lookup("gpt-4o-2024-11-20") is base


@pytest.mark.parametrize("model", ["gpt-4o-2024-08-06", "gpt-4o-20240806", "gpt-4o-0806",
                                   "gpt-4o-latest", "gpt-4o@20240806", "gpt-4o-001",
                                   "openai/gpt-4o", "openai/gpt-4o-2024-08-06",
                                   "openrouter/openai/gpt-4o"])
def test_dated_and_prefixed_variants_fall_back_to_the_base_name(model: str) -> None:
    base = ModelPrice(input=1e-6, output=1e-6)
    assert PriceTable({"gpt-4o": base}, "v").lookup(model) is base


@pytest.mark.parametrize("model", ["gpt-4o-mini", "gpt-4", "o1-mini",
                                   "gpt-4o-2024-08-06-ft", "acme/gpt-4o-mini"])
def test_other_models_do_not_fall_back(model: str) -> None:
    assert PriceTable({"gpt-4o": ModelPrice(input=1, output=1)}, "v").lookup(model) is None


def test_provider_prefixed_names() -> None:
    openai, azure = ModelPrice(input=1, output=1), ModelPrice(input=2, output=2)
    mistral = ModelPrice(input=3, output=3)
    prices = PriceTable({"gpt-4o": openai, "azure/gpt-4o": azure,
                         "mistral/mistral-large-latest": mistral}, "v")
    assert prices.lookup("gpt-4o", "openai") is openai   # the exact name first
    assert prices.lookup("azure/gpt-4o") is azure
    assert prices.lookup("mistral-large-latest", "mistral") is mistral
    assert prices.lookup("mistral-large-latest", "mistral_ai") is mistral  # OTel's name
    assert prices.lookup("mistral-large-latest") is mistral  # the only entry of that name


def test_an_ambiguous_bare_name_is_not_guessed() -> None:
    prices, _ = load_litellm_prices(LITELLM)
    litellm = PriceTable(prices, "v")
    assert litellm.lookup("acme-lite") is None  # vertex_ai/ and gemini/ differ
    assert litellm.lookup("acme-lite", "gemini").input == 2e-7
    assert litellm.lookup("acme-lite", "gcp.gemini").input == 2e-7
    assert litellm.lookup("acme-lite", "vertex_ai").input == 1e-7


# --- cost --------------------------------------------------------------------------------------

PRICES = PriceTable({"gpt-4o": ModelPrice(input=2.5e-6, output=1e-5, cached_input=1.25e-6),
                     "plain": ModelPrice(input=1e-6, output=2e-6)}, "2025-11-01")


def test_cost_of_input_and_output_tokens() -> None:
    assert PRICES.cost(event()) == pytest.approx(2.5 + 1.0)
    assert PRICES.cost(event(input_tokens=0, output_tokens=0)) == 0


def test_cached_input_tokens_cost_the_cached_price() -> None:
    cost = PRICES.cost(event(cached_input_tokens=800_000))
    assert cost == pytest.approx(200_000 * 2.5e-6 + 800_000 * 1.25e-6 + 1.0)
    # Without a cached price they cost the input price.
    assert PRICES.cost(event("plain", cached_input_tokens=800_000)) == \
        pytest.approx(PRICES.cost(event("plain")))


def test_cost_of_an_unknown_model_is_none() -> None:
    assert PRICES.cost(event("llama-3-70b")) is None


def test_with_cost_fills_only_a_missing_cost() -> None:
    priced = PRICES.with_cost(event("gpt-4o-2024-08-06"))
    assert priced.cost_usd == pytest.approx(3.5)
    assert priced.price_version == "2025-11-01"
    reported = event(cost_usd=0.25)
    assert PRICES.with_cost(reported) is reported
    unknown = event("llama-3-70b")
    assert PRICES.with_cost(unknown) is unknown
    assert PRICES.with_cost(event(cost_usd=0.0)).cost_usd == 0.0


def test_cost_with_the_shipped_table() -> None:
    ev = event("claude-sonnet-4-5-20250929", "anthropic", input_tokens=10_000,
               cached_input_tokens=8_000, output_tokens=500)
    assert shipped_prices().cost(ev) == pytest.approx(2_000 * 3e-6 + 8_000 * 3e-7 + 500 * 1.5e-5)
