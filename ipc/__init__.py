"""The shared language of optimizerd's processes: messages, config schema, endpoints, log records.

Both the supervisor and the workers depend on this package; it depends on neither of them.
"""
