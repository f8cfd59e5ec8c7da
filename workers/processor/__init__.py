"""The processor service: event-time windows over the event log, analyzers, decisions and
canary rollouts. The worker is ``worker.ProcessorWorker`` (its pure state: ``core``); this
package stays light to import, since the REST API uses its config code."""
