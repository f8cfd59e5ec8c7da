"""The pieces of scripts/bench_supervisor.py, one question each.

    figures         how samples are kept, summarised and printed
    env             which programs, environment, ports and machine
    processes       everything started is tracked and killed; stop timing; orphans
    usage           CPU and memory of a process while idle
    logs            timestamps read from a daemon's log as it grows
    notify          our own NOTIFY_SOCKET, to see READY=1 arrive
    dealer          a request/reply round trip over a ZeroMQ DEALER
    optimizerd      one optimizerd in a directory of its own
    optimizerd_runs the measurements of optimizerd
    other_daemons   supervisord and circusd driven the same way
    compare         the same measurements of supervisord and circusd
    report          the target-vs-measured table and the JSON of raw samples
"""
