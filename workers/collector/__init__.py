"""The collector service: how the optimizer sees an organisation's LLM calls.

Ingest paths validate what arrives, append the valid events to the event log and acknowledge
their clients only once the events are durable; rejected inputs are answered with the field at
fault and kept in the dead-letter log. For now: JSON batches on ``POST /v1/events``, OTLP/HTTP
traces on ``POST /v1/traces`` and OTLP/gRPC on ``otlp_grpc_listen`` (spans with gen_ai.*
attributes become events: ``otlp_mapping``), feedback on ``POST /v1/feedback``, and records of
a Kafka topic with ``[collector.kafka] enabled`` (``kafka_ingest``: offsets committed once the
events are durable, malformed records to a dead-letter topic, paused partitions as backpressure).
"""
from __future__ import annotations

from typing import Any

from aiohttp import web

from ipc.config import CollectorSection, split_listen
from ipc.prices import price_table_from_config
from workers.collector import otlp_grpc
from workers.collector.admission import ClientLimits
from workers.collector.json_ingest import post_events, post_feedback
from workers.collector.kafka_ingest import KafkaIngest
from workers.collector.otlp_http import post_traces
from workers.collector.pipeline import IngestPipeline
from workers.eventlog import open_producer
from workers.runtime import Worker
from workers.storage_client import StorageClient


class CollectorWorker(Worker):
    runner: web.AppRunner | None = None
    kafka: KafkaIngest | None = None
    grpc_server: Any = None

    async def start(self) -> None:
        section = self.context.section
        assert isinstance(section, CollectorSection)
        self.producer = open_producer(self.context.config, self.context.runtime_dir)
        self.storage = StorageClient(self.context.runtime_dir)
        self.pipeline = IngestPipeline(self.producer, self.storage,
                                       price_table_from_config(section), section.max_in_flight)
        max_body = int(section.max_body_mb * (1 << 20))
        app = web.Application(client_max_size=max_body)
        app["pipeline"] = self.pipeline
        limits = ClientLimits.from_section(section)
        app["limits"] = limits
        app.router.add_post("/v1/events", post_events)
        app.router.add_post("/v1/traces", post_traces)
        app.router.add_post("/v1/feedback", post_feedback)
        app.router.add_get("/health", self.health_handler)
        if section.kafka.enabled:
            self.kafka = KafkaIngest(section.kafka, self.pipeline)
            await self.kafka.start()
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self.runner.setup()
        host, port = split_listen(section.listen)
        await web.TCPSite(self.runner, host, port, reuse_port=section.processes > 1).start()
        self.grpc_server = await otlp_grpc.start_server(
            section.otlp_grpc_listen, self.pipeline, limits, section.processes, max_body)
        self.log.info("collector on http://%s, OTLP/gRPC on %s", section.listen,
                      section.otlp_grpc_listen)

    async def stop(self) -> None:
        if self.kafka is not None:
            await self.kafka.stop()  # the batch in hand is appended and committed first
            self.kafka = None
        if self.runner is not None:
            await self.runner.cleanup()  # in-flight requests finish: their appends complete
            self.runner = None
        if self.grpc_server is not None:
            await otlp_grpc.stop_server(self.grpc_server)
            self.grpc_server = None
        await self.producer.close()
        await self.storage.close()

    async def health_handler(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "service": "collector"})

    def status(self) -> dict[str, Any]:
        return {"listen": self.context.section.listen, "in_flight": self.pipeline.in_flight,
                **({"kafka": self.kafka.status()} if self.kafka is not None else {})}
