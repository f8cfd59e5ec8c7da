"""The configuration schema: one msgspec Struct per TOML section, a default for every key.

Each field carries its documentation in ``Meta(description=...)``, so that
``optimizerd print-default-config`` and the docs are generated from the same place as the
validation. Loading, environment overrides and error reporting live in ``ipc.config_loader``.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from msgspec import Meta, Struct, field

PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
PositiveInt = Annotated[int, Meta(ge=1)]
TokenPrice = Annotated[float, Meta(ge=0, le=1)]
LISTEN_PATTERN = r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}$"
SERVICE_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
DEFAULT_PRELOAD = ["zmq", "msgspec", "prometheus_client", "aiohttp", "plyvel", "grpc",
                   "workers.runtime"]


def doc(text: str, **constraints: Any) -> Meta:
    """Field metadata: the annotation shown by print-default-config, plus msgspec constraints."""
    return Meta(description=text, **constraints)


class SupervisorSection(Struct, kw_only=True, forbid_unknown_fields=True):
    runtime_dir: Annotated[str, doc(
        "Sockets, pid file and metrics live here (mode 0700). Empty: "
        "$XDG_RUNTIME_DIR/llm-optimizer, or /run/llm-optimizer as root.")] = ""
    data_dir: Annotated[str, doc(
        "Durable state (the embedded store). Empty: ~/.local/share/llm-optimizer, "
        "or /var/lib/llm-optimizer as root.")] = ""
    heartbeat_interval: Annotated[float, doc("Seconds between a worker's heartbeats.", gt=0)] = 1.0
    heartbeat_timeout: Annotated[float, doc(
        "A worker silent this long is taken as hung: SIGTERM, SIGKILL, restart.", gt=0)] = 5.0
    start_timeout: Annotated[float, doc(
        "A worker that has not said READY this long after its start is restarted.", gt=0)] = 30.0
    shutdown_timeout: Annotated[float, doc(
        "Seconds a worker has to finish in-flight work after STOP before SIGTERM, "
        "then SIGKILL.", gt=0)] = 10.0
    backoff_base: Annotated[float, doc(
        "First restart delay; doubled per consecutive failure, with +-20% jitter.", gt=0)] = 0.1
    backoff_max: Annotated[float, doc("Upper bound of the restart delay.", gt=0)] = 30.0
    stable_after: Annotated[float, doc(
        "A worker ready this long has its backoff reset.", gt=0)] = 10.0
    max_restarts: Annotated[int, doc(
        "Automatic restarts allowed within restart_window; one more and the service "
        "is failed.", ge=0)] = 5
    restart_window: Annotated[float, doc("Seconds over which restarts are counted.", gt=0)] = 60.0
    failure_threshold: Annotated[int, doc(
        "Consecutive unhealthy heartbeats after which a worker is restarted.", ge=1)] = 3
    watch_config: Annotated[bool, doc(
        "Reload by itself when the config file changes (inotify, debounced).")] = False
    preload: Annotated[list[str], doc(
        "Modules the fork server imports once, so that every worker starts in milliseconds."
    )] = field(default_factory=lambda: list(DEFAULT_PRELOAD))


class ObservabilitySection(Struct, kw_only=True, forbid_unknown_fields=True):
    log_level: Annotated[Literal["debug", "info", "warning", "error"], doc(
        "Least severe level logged, by the supervisor and every worker.")] = "info"
    json_logs: Annotated[bool, doc("One JSON object per log line instead of text.")] = False
    otlp_endpoint: Annotated[str, doc(
        "OTLP/HTTP traces endpoint the services export their own spans to, e.g. "
        "http://otel-collector:4318/v1/traces (not this daemon's collector; needs the "
        "'tracing' extra). Empty: no tracing, at no cost.", pattern=r"^$|^https?://\S+$")] = ""
    otlp_headers_file: Annotated[str, doc(
        "File of 'Header: value' lines sent with every export (credentials). Empty: none."
    )] = ""
    trace_sample_ratio: Annotated[float, doc(
        "Share of new traces recorded; a trace continued from a caller follows the caller's "
        "choice.", ge=0, le=1)] = 1.0


class AdminSection(Struct, kw_only=True, forbid_unknown_fields=True):
    listen: Annotated[str, doc("Admin HTTP: /metrics, /health, /ready.",
                               pattern=LISTEN_PATTERN)] = "127.0.0.1:9090"


class ServiceSection(Struct, kw_only=True, forbid_unknown_fields=True):
    """Keys every service has. Restart-policy keys left unset inherit [supervisor]."""

    enabled: Annotated[bool, doc("Run this service.")] = True
    entrypoint: Annotated[str, doc(
        "module:Class of the worker (a workers.runtime.Worker subclass).",
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")] = ""
    depends_on: Annotated[list[str], doc(
        "Services that must be READY before this one starts.")] = field(default_factory=list)
    processes: Annotated[int, doc(
        "Processes of this service, each supervised on its own.", ge=1, le=64)] = 1
    restart_dependents: Annotated[bool, doc(
        "When this service restarts, restart its dependents once it is READY again.")] = False
    max_rss_mb: Annotated[int, doc(
        "Restart a process gracefully when its RSS exceeds this many MiB (0: no limit).",
        ge=0)] = 0
    heartbeat_timeout: Annotated[PositiveFloat | None, doc(
        "Overrides [supervisor] heartbeat_timeout.")] = None
    backoff_base: Annotated[PositiveFloat | None, doc(
        "Overrides [supervisor] backoff_base.")] = None
    backoff_max: Annotated[PositiveFloat | None, doc(
        "Overrides [supervisor] backoff_max.")] = None
    max_restarts: Annotated[NonNegativeInt | None, doc(
        "Overrides [supervisor] max_restarts.")] = None
    restart_window: Annotated[PositiveFloat | None, doc(
        "Overrides [supervisor] restart_window.")] = None
    failure_threshold: Annotated[PositiveInt | None, doc(
        "Overrides [supervisor] failure_threshold.")] = None


class StorageSection(ServiceSection, kw_only=True, forbid_unknown_fields=True):
    entrypoint: str = "workers.storage:StorageWorker"
    backend: Annotated[Literal["leveldb", "postgres"], doc(
        "Where state and the embedded event log are kept.")] = "leveldb"
    path: Annotated[str, doc("LevelDB directory. Empty: <data_dir>/leveldb.")] = ""
    sync: Annotated[bool, doc(
        "fsync every write group before acknowledging it (LevelDB).")] = True
    postgres_dsn: Annotated[str, doc(
        "PostgreSQL connection string (backend = \"postgres\"). Keep the password out of the "
        "file: LLM_OPTIMIZER__STORAGE__POSTGRES_DSN, or PGPASSWORD / ~/.pgpass.")] = ""
    postgres_pool_size: Annotated[int, doc(
        "Connections in the PostgreSQL pool.", ge=1, le=100)] = 4
    redis_url: Annotated[str, doc(
        "Redis for caches and config-change notifications (optional), e.g. "
        "redis://127.0.0.1:6379/0. Never the only copy of durable data.")] = ""
    log_retention_hours: Annotated[float, doc(
        "Event-log records older than this are dropped (0: keep).", ge=0)] = 168.0
    log_retention_records: Annotated[int, doc(
        "At most this many records are kept per log (0: no limit).", ge=0)] = 0


class PriceOverride(Struct, kw_only=True, forbid_unknown_fields=True):
    """One model's prices in [collector] prices, USD per token."""

    input: Annotated[float, doc("USD per input token.", ge=0, le=1)]
    output: Annotated[float, doc("USD per output token.", ge=0, le=1)]
    cached_input: Annotated[TokenPrice | None, doc(
        "USD per cached input token; unset: the price file's, else the input price.")] = None


KafkaOptionValue = str | int | float | bool


class KafkaIngestSection(Struct, kw_only=True, forbid_unknown_fields=True):
    """[collector.kafka]: LLM events consumed from a Kafka topic, one event per record."""

    enabled: Annotated[bool, doc("Consume LLM events from the Kafka topic below.")] = False
    bootstrap_servers: Annotated[str, doc(
        "Kafka bootstrap servers, host:port[,host:port...].")] = "127.0.0.1:9092"
    topic: Annotated[str, doc(
        "Topic of the events: one event per record, in the JSON shape of POST /v1/events "
        "(or msgpack of the same).", pattern=r"^[A-Za-z0-9_.\-]{1,249}$")] = "llm-calls"
    group_id: Annotated[str, doc(
        "Consumer group; a new group starts at the topic's earliest offset.",
        min_length=1)] = "llm-optimizer-collector"
    dead_letter_topic: Annotated[str, doc(
        "Malformed records go here, with their original bytes and the reason and source "
        "topic/partition/offset in headers.", pattern=r"^[A-Za-z0-9_.\-]{1,249}$")] = \
        "llm-calls.dead-letters"
    value_format: Annotated[Literal["auto", "json", "msgpack"], doc(
        "Encoding of record values; auto: JSON or msgpack, told apart by the first byte.")] = \
        "auto"
    client_options: Annotated[dict[str, KafkaOptionValue], doc(
        "Extra librdkafka options for the consumer and the dead-letter producer (e.g. "
        "security.protocol, sasl.mechanism, ssl.ca.location); secrets through the "
        "environment.")] = field(default_factory=dict)


class CollectorSection(ServiceSection, kw_only=True, forbid_unknown_fields=True):
    entrypoint: str = "workers.collector:CollectorWorker"
    depends_on: list[str] = field(default_factory=lambda: ["storage"])
    listen: Annotated[str, doc("OTLP/HTTP and JSON ingest.", pattern=LISTEN_PATTERN)] = \
        "127.0.0.1:4318"
    otlp_grpc_listen: Annotated[str, doc("OTLP/gRPC ingest.", pattern=LISTEN_PATTERN)] = \
        "127.0.0.1:4317"
    max_in_flight: Annotated[int, doc(
        "Events accepted and not yet durable, per process; beyond it ingest answers 503 with "
        "Retry-After (memory stays bounded).", ge=1)] = 50_000
    max_body_mb: Annotated[float, doc(
        "Largest request body, in MiB; larger ones are answered 413.", gt=0, le=1024)] = 16.0
    price_file: Annotated[str, doc(
        "Price table (TOML, USD per token, as etc/prices.toml) for events that report no "
        "cost. Empty: the table shipped with the package.")] = ""
    litellm_price_file: Annotated[str, doc(
        "LiteLLM model_prices_and_context_window.json; its per-token prices take precedence "
        "over price_file. Empty: none.")] = ""
    prices: Annotated[dict[str, PriceOverride], doc(
        "Per-model prices taking precedence over both files, USD per token, e.g. "
        "prices = { \"gpt-4o\" = { input = 2.5e-6, output = 1e-5, cached_input = 1.25e-6 } }."
    )] = field(default_factory=dict)
    rate_limit_events_per_s: Annotated[float, doc(
        "Per-client budget on the push paths (JSON, OTLP/HTTP, OTLP/gRPC), in events or spans "
        "a second; over it the answer is 429 (gRPC RESOURCE_EXHAUSTED) with Retry-After. "
        "0: no limit.", ge=0)] = 0.0
    rate_limit_burst: Annotated[int, doc(
        "Events a client may send at once above its rate. 0: one second's worth.", ge=0)] = 0
    rate_limit_key_header: Annotated[str, doc(
        "Request header (gRPC metadata key) naming the client, e.g. an API key; requests "
        "without it are limited by peer address. Empty: always the peer address.")] = \
        "x-api-key"
    kafka: Annotated[KafkaIngestSection, doc(
        "Kafka ingest: a consumer group on a topic of events.")] = \
        field(default_factory=KafkaIngestSection)


STRATEGIES = ("model_selection", "caching", "rate_limiting", "batching", "prompt_optimization")


class DecisionsSection(Struct, kw_only=True, forbid_unknown_fields=True):
    """[processor.decisions]: which optimizations may be proposed, and under what limits."""

    strategies: Annotated[list[Literal[STRATEGIES]], doc(  # type: ignore[valid-type]
        "Strategies that may propose optimizations.")] = \
        field(default_factory=lambda: list(STRATEGIES))
    quality_tolerance: Annotated[float, doc(
        "Largest drop of mean quality (0..1 scale) a change may cost.", ge=0, le=1)] = 0.02
    latency_tolerance: Annotated[float, doc(
        "Largest relative rise of p95 latency a change may cost (0.2 = +20%).", ge=0)] = 0.2
    latency_budget_ms: Annotated[float, doc(
        "Absolute p95 latency no change may exceed. 0: none.", ge=0)] = 0.0
    min_samples: Annotated[int, doc(
        "Calls a model must have been seen on before its figures count.", ge=1)] = 200
    auto_deploy: Annotated[bool, doc(
        "Start a canary rollout for a proposal at once, without an operator.")] = False
    every_intervals: Annotated[int, doc(
        "Run the decision engine every this many analysis intervals: its inputs are "
        "lookbacks of many windows, which one interval barely moves.", ge=1)] = 5


class CanarySection(Struct, kw_only=True, forbid_unknown_fields=True):
    """[processor.canary]: how a change is rolled out and judged."""

    stages: Annotated[list[Annotated[float, Meta(gt=0, le=100)]], doc(
        "Canary traffic share of each stage, in percent, ending at 100.")] = \
        field(default_factory=lambda: [5.0, 25.0, 50.0, 100.0])
    min_samples: Annotated[int, doc(
        "Canary calls a stage needs before it is judged (and can fail).", ge=10)] = 200
    promote_min_samples: Annotated[int, doc(
        "Canary calls a stage needs before a pass moves it on, so that a harmful change is "
        "not waved through on thin evidence.", ge=10)] = 2500
    confidence: Annotated[float, doc(
        "Confidence of the judge's intervals (Mann-Whitney, proportions).", gt=0.5, lt=1)] = 0.98
    stage_timeout_intervals: Annotated[int, doc(
        "Analysis intervals a stage may wait for its samples before the rollout is rolled "
        "back.", ge=1)] = 10


class ProcessorSection(ServiceSection, kw_only=True, forbid_unknown_fields=True):
    entrypoint: str = "workers.processor.worker:ProcessorWorker"
    depends_on: list[str] = field(default_factory=lambda: ["storage", "collector"])
    tumbling_window_s: Annotated[int, doc(
        "Length of the tumbling windows, in seconds of event time.", ge=1)] = 60
    sliding_window_s: Annotated[int, doc(
        "Length of the sliding windows (a multiple of sliding_step_s).", ge=1)] = 300
    sliding_step_s: Annotated[int, doc("Step of the sliding windows.", ge=1)] = 60
    allowed_lateness_s: Annotated[int, doc(
        "How far behind the newest event time an event may arrive and still count; later "
        "ones are counted as late and recorded.", ge=0)] = 30
    analysis_interval_s: Annotated[int, doc(
        "Event time between two runs of the analyzers, decisions and canary judge (a multiple "
        "of tumbling_window_s).", ge=1)] = 60
    lookback_windows: Annotated[int, doc(
        "Tumbling windows per key the analyzers and decisions look back on.", ge=2)] = 60
    dedup_horizon_s: Annotated[int, doc(
        "How long (event time) an event id is remembered to drop re-sent duplicates.",
        ge=1)] = 3600
    dedup_max_ids: Annotated[int, doc(
        "Most event ids remembered at once (memory bound); the oldest go first.",
        ge=1000)] = 1_000_000
    checkpoint_interval_s: Annotated[float, doc(
        "Wall-clock time between checkpoints of the window state and read position.",
        gt=0)] = 2.0
    decisions: Annotated[DecisionsSection, doc(
        "Which optimizations may be proposed.")] = field(default_factory=DecisionsSection)
    canary: Annotated[CanarySection, doc(
        "How changes are rolled out.")] = field(default_factory=CanarySection)


class JwtSection(Struct, kw_only=True, forbid_unknown_fields=True):
    """[rest_api.jwt]: bearer tokens. Keys come from files (or the environment), never from
    this file."""

    issuer: Annotated[str, doc(
        "Required iss claim. Empty: JWTs are not accepted (API keys only).")] = ""
    audience: Annotated[str, doc("Required aud claim.")] = "llm-optimizer"
    algorithms: Annotated[list[Literal["HS256", "RS256", "ES256"]], doc(
        "Accepted signature algorithms.")] = field(default_factory=lambda: ["HS256"])
    secret_file: Annotated[str, doc(
        "HS256 shared secret, in a file (or LLM_OPTIMIZER__REST_API__JWT__SECRET_FILE).")] = ""
    public_key_file: Annotated[str, doc("RS256/ES256 verification key (PEM).")] = ""
    private_key_file: Annotated[str, doc(
        "RS256/ES256 signing key (PEM), for `optimizerctl token create` only.")] = ""
    leeway_s: Annotated[float, doc("Clock skew allowed on exp/nbf/iat.", ge=0)] = 30.0
    max_ttl_s: Annotated[int, doc("Longest token lifetime accepted and issued.", ge=60)] = 86400


class RestApiSection(ServiceSection, kw_only=True, forbid_unknown_fields=True):
    entrypoint: str = "workers.rest_api:RestApiWorker"
    depends_on: list[str] = field(default_factory=lambda: ["processor", "storage"])
    listen: Annotated[str, doc("REST API.", pattern=LISTEN_PATTERN)] = "127.0.0.1:8080"
    max_body_kb: Annotated[int, doc("Largest request body, in KiB (413 beyond).",
                                    ge=1)] = 1024
    request_timeout_s: Annotated[float, doc("A request taking longer answers 503.",
                                            gt=0)] = 30.0
    max_in_flight: Annotated[int, doc(
        "Requests handled at once per process; beyond it 503 with Retry-After.", ge=1)] = 256
    cors_origins: Annotated[list[str], doc(
        "Origins allowed by CORS (exact, e.g. https://console.example.com). Empty: none.")] = \
        field(default_factory=list)
    rate_limit_per_s: Annotated[float, doc(
        "Requests a second per API key or token subject (token bucket); 429 beyond. "
        "0: no limit.", ge=0)] = 50.0
    rate_limit_burst: Annotated[int, doc("Requests above the rate allowed at once.",
                                         ge=1)] = 100
    rate_limit_storage: Annotated[str, doc(
        "Where rate-limit counters live: empty for this process's memory, or a redis:// URL "
        "so that several processes and replicas share them.")] = ""
    cache_ttl_s: Annotated[float, doc(
        "How long a process reuses list and read answers and resolved configs; a change made "
        "through another process or by the processor shows after at most this. 0: no cache.",
        ge=0, le=60)] = 1.0
    jwt: Annotated[JwtSection, doc("Bearer tokens (JWT).")] = field(default_factory=JwtSection)


class GrpcTlsSection(Struct, kw_only=True, forbid_unknown_fields=True):
    cert_file: Annotated[str, doc(
        "Server certificate chain (PEM). With key_file: TLS; empty: plaintext.")] = ""
    key_file: Annotated[str, doc("Server private key (PEM).")] = ""
    client_ca_file: Annotated[str, doc(
        "CA bundle (PEM) that client certificates must chain to; set: mutual TLS, every "
        "client shows a certificate.")] = ""
    client_roles: Annotated[dict[str, Literal["viewer", "operator", "admin"]], doc(
        "Role of a client certificate by its subject's common name, for calls without a "
        "bearer credential; unlisted names are viewers.")] = field(default_factory=dict)


class GrpcApiSection(ServiceSection, kw_only=True, forbid_unknown_fields=True):
    entrypoint: str = "workers.grpc_api:GrpcApiWorker"
    depends_on: list[str] = field(default_factory=lambda: ["processor", "storage"])
    listen: Annotated[str, doc("gRPC API.", pattern=LISTEN_PATTERN)] = "127.0.0.1:50051"
    max_message_kb: Annotated[int, doc(
        "Largest request or answer message, in KiB (RESOURCE_EXHAUSTED beyond).",
        ge=1, le=65536)] = 4096
    reflection: Annotated[Literal["auto", "on", "off"], doc(
        "Server reflection: auto serves it when listen is a loopback address.")] = "auto"
    tls: Annotated[GrpcTlsSection, doc(
        "TLS; certificates are read again on reload.")] = field(default_factory=GrpcTlsSection)


NOTIFICATION_KINDS = ("proposal_created", "canary_started", "promoted", "rolled_back",
                      "anomaly_found", "service_failed")
Severity = Literal["info", "warning", "critical"]


class RoutingSection(Struct, kw_only=True, forbid_unknown_fields=True):
    """Which optimizer events a destination gets, and how often at most."""

    enabled: Annotated[bool, doc("Deliver to this destination.")] = False
    events: Annotated[list[Literal[NOTIFICATION_KINDS]], doc(  # type: ignore[valid-type]
        "Event kinds sent here: proposal_created, canary_started, promoted, rolled_back, "
        "anomaly_found, service_failed.")] = field(
        default_factory=lambda: ["rolled_back", "anomaly_found", "service_failed"])
    min_severity: Annotated[Severity, doc(
        "Events below this severity are not sent here.")] = "info"
    rate_limit_per_min: Annotated[float, doc(
        "Messages a minute at most; beyond, they wait in the outbox. 0: no limit.",
        ge=0)] = 30.0
    templates: Annotated[dict[Literal[NOTIFICATION_KINDS], str], doc(  # type: ignore[valid-type]
        "Message text per event kind, with $placeholders (see docs/integrations.md).")] = \
        field(default_factory=dict)


class SlackSection(RoutingSection, kw_only=True, forbid_unknown_fields=True):
    webhook_url: Annotated[str, doc(
        "Incoming-webhook URL (a secret): LLM_OPTIMIZER__INTEGRATIONS__SLACK__WEBHOOK_URL, or "
        "webhook_url_file.")] = ""
    webhook_url_file: Annotated[str, doc("File holding the webhook URL.")] = ""


class JiraSection(RoutingSection, kw_only=True, forbid_unknown_fields=True):
    base_url: Annotated[str, doc("Jira Cloud or Server, e.g. https://acme.atlassian.net.")] = ""
    project: Annotated[str, doc("Project key of the issues created, e.g. OPS.")] = ""
    issue_type: Annotated[str, doc("Type of the issues created.")] = "Task"
    labels: Annotated[list[str], doc("Labels of the issues created.")] = field(
        default_factory=lambda: ["llm-optimizer"])
    email: Annotated[str, doc(
        "Account e-mail for basic auth (with api_token); empty: bearer token.")] = ""
    api_token: Annotated[str, doc(
        "API token (Cloud) or personal access token (Server), a secret: "
        "LLM_OPTIMIZER__INTEGRATIONS__JIRA__API_TOKEN, or api_token_file.")] = ""
    api_token_file: Annotated[str, doc("File holding the API token.")] = ""
    transition_on_promoted: Annotated[str, doc(
        "Transition applied to an optimization's issue once it is promoted (e.g. Done); "
        "empty: none.")] = ""


class GithubSection(RoutingSection, kw_only=True, forbid_unknown_fields=True):
    base_url: Annotated[str, doc("GitHub REST API (Enterprise: https://HOST/api/v3).")] = \
        "https://api.github.com"
    repository: Annotated[str, doc("owner/name where issues are opened.",
                                   pattern=r"^$|^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")] = ""
    labels: Annotated[list[str], doc("Labels of the issues opened.")] = field(
        default_factory=lambda: ["llm-optimizer"])
    token: Annotated[str, doc(
        "A token with issues:write, a secret: LLM_OPTIMIZER__INTEGRATIONS__GITHUB__TOKEN, or "
        "token_file.")] = ""
    token_file: Annotated[str, doc("File holding the token.")] = ""


class AnthropicSection(Struct, kw_only=True, forbid_unknown_fields=True):
    """The Anthropic Messages API, asked for prompt-optimization suggestions."""

    enabled: Annotated[bool, doc("Ask Claude for suggestions.")] = False
    base_url: Annotated[str, doc("Messages API base URL.")] = "https://api.anthropic.com"
    api_key: Annotated[str, doc(
        "A secret: LLM_OPTIMIZER__INTEGRATIONS__ANTHROPIC__API_KEY, or api_key_file.")] = ""
    api_key_file: Annotated[str, doc("File holding the API key.")] = ""
    model: Annotated[str, doc("Model asked.")] = "claude-sonnet-4-5"
    max_tokens: Annotated[int, doc("Longest answer, in tokens.", ge=1, le=64000)] = 1024
    input_usd_per_mtok: Annotated[float, doc(
        "Price of input tokens, for the cost accounting of its own calls.", ge=0)] = 3.0
    output_usd_per_mtok: Annotated[float, doc("Price of output tokens.", ge=0)] = 15.0


class WebhookSection(RoutingSection, kw_only=True, forbid_unknown_fields=True):
    url: Annotated[str, doc("Where events are POSTed as signed JSON.")] = ""
    secret: Annotated[str, doc(
        "HMAC-SHA256 key of the signature, a secret: "
        "LLM_OPTIMIZER__INTEGRATIONS__WEBHOOKS__NAME__SECRET, or secret_file.")] = ""
    secret_file: Annotated[str, doc("File holding the key.")] = ""


class IntegrationsSection(ServiceSection, kw_only=True, forbid_unknown_fields=True):
    entrypoint: str = "workers.integrations:IntegrationsWorker"
    depends_on: list[str] = field(default_factory=lambda: ["storage"])
    timeout_s: Annotated[float, doc("Each outbound HTTP call's time limit.", gt=0)] = 10.0
    max_attempts: Annotated[int, doc(
        "Deliveries tried per message before it is dead-lettered.", ge=1)] = 8
    retry_base_s: Annotated[float, doc(
        "First wait after a failed delivery; it doubles per attempt (full jitter, at most 300 "
        "s), unless the destination's Retry-After says otherwise.", gt=0)] = 1.0
    breaker_failures: Annotated[int, doc(
        "Consecutive failures that open a destination's circuit breaker.", ge=1)] = 5
    breaker_recovery_s: Annotated[float, doc(
        "How long an open breaker refuses before a trial delivery.", gt=0)] = 30.0
    slack: Annotated[SlackSection, doc("Slack incoming webhook (Block Kit).")] = field(
        default_factory=SlackSection)
    jira: Annotated[JiraSection, doc("Jira issues.")] = field(default_factory=JiraSection)
    github: Annotated[GithubSection, doc("GitHub issues.")] = field(
        default_factory=GithubSection)
    anthropic: Annotated[AnthropicSection, doc("Claude suggestions.")] = field(
        default_factory=AnthropicSection)
    webhooks: Annotated[dict[str, WebhookSection], doc(
        "Generic signed webhooks by name.")] = field(default_factory=dict)


class ExtraServiceSection(ServiceSection, kw_only=True, forbid_unknown_fields=True):
    """A service beyond the six built-in ones, e.g. a plug-in or the test stub."""

    settings: Annotated[dict[str, Any], doc(
        "Free-form settings handed to the worker.")] = field(default_factory=dict)


_SUPERVISOR_OWNED = frozenset(ServiceSection.__struct_fields__) - {"entrypoint"}


def supervisor_owned_keys() -> frozenset[str]:
    """Keys of a service section that the supervisor applies itself (restart policy, process
    count, dependencies); a change to any other key is the worker's to apply."""
    return _SUPERVISOR_OWNED


def worker_view(section: ServiceSection) -> dict[str, Any]:
    """A section without the supervisor's keys: what a worker compares on reload."""
    return {k: getattr(section, k) for k in section.__struct_fields__
            if k not in _SUPERVISOR_OWNED}


class EventLogSection(Struct, kw_only=True, forbid_unknown_fields=True):
    backend: Annotated[Literal["embedded", "kafka"], doc(
        "embedded: in the storage worker's backend; kafka: a Kafka topic (scale-out).")] = \
        "embedded"
    log: Annotated[str, doc("Name of the embedded log, or of the Kafka topic.",
                            pattern=r"^[A-Za-z0-9_.\-]{1,128}$")] = "llm-events"
    kafka_bootstrap: Annotated[str, doc(
        "Kafka bootstrap servers, host:port[,host:port...].")] = "127.0.0.1:9092"
    kafka_client_options: Annotated[dict[str, str], doc(
        "Extra librdkafka options for producer and consumer (e.g. security.protocol); "
        "secrets through the environment.")] = field(default_factory=dict)


BUILTIN_SERVICES = ("storage", "collector", "processor", "rest_api", "grpc_api", "integrations")


class Config(Struct, kw_only=True, forbid_unknown_fields=True):
    supervisor: SupervisorSection = field(default_factory=SupervisorSection)
    observability: ObservabilitySection = field(default_factory=ObservabilitySection)
    admin: AdminSection = field(default_factory=AdminSection)
    storage: StorageSection = field(default_factory=StorageSection)
    collector: CollectorSection = field(default_factory=CollectorSection)
    processor: ProcessorSection = field(default_factory=ProcessorSection)
    rest_api: RestApiSection = field(default_factory=RestApiSection)
    grpc_api: GrpcApiSection = field(default_factory=GrpcApiSection)
    integrations: IntegrationsSection = field(default_factory=IntegrationsSection)
    event_log: EventLogSection = field(default_factory=EventLogSection)
    services: Annotated[dict[str, ExtraServiceSection], doc(
        "Further services, one [services.NAME] table each.")] = field(default_factory=dict)

    def service_sections(self) -> dict[str, ServiceSection]:
        """Every service by name, built-in first, enabled or not."""
        sections: dict[str, ServiceSection] = {n: getattr(self, n) for n in BUILTIN_SERVICES}
        sections.update(self.services)
        return sections

    def enabled_services(self) -> dict[str, ServiceSection]:
        return {n: s for n, s in self.service_sections().items() if s.enabled}


def split_listen(listen: str) -> tuple[str, int]:
    """'127.0.0.1:8080' -> ('127.0.0.1', 8080); '[::1]:80' -> ('::1', 80)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def is_valid_service_name(name: str) -> bool:
    return re.match(SERVICE_NAME_PATTERN, name) is not None
