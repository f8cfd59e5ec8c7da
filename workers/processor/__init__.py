"""The processor service: event-time windows over the event log, analyzers, decisions and
canary rollouts (``worker``, whose pure state is ``core``)."""
from workers.processor.worker import ProcessorWorker

__all__ = ["ProcessorWorker"]
