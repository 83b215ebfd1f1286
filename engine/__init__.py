"""The shared core of clone-agent. It imports nothing from donor/ or recipient/.

| module     | owns                                                                      |
|------------|---------------------------------------------------------------------------|
| errors     | error classes: MySQL number, SQLSTATE, message, hint, exit status         |
| config     | clone_* variables: defaults, ranges, loading (flag > env > TOML > default) |
| ring       | shared-memory ring: fixed slots, explicit capacity, stats(), no leftovers |
| ipc        | clone-local's endpoint: a socket file in a 0700 directory of our own      |
| stage      | a pool of worker processes: run loop, descriptor channel, outcomes, stop  |
| worker     | a stage worker's entry point (`python -m engine.worker FD`)               |
| codec      | block framing, xxh3 checksums, compression (none / lz4 / zstd)            |
| protocol   | message types, framing, limits, version negotiation, locators            |
| messages   | the body of every message: one frozen dataclass each, checked on receipt  |
| transport  | ZeroMQ sockets and options; zmq errors translated at this edge            |
| fsutil     | durable writes, syncfs, name checks, paths of any length beneath a descriptor |
| acl        | POSIX ACLs as Linux stores them: parsed, checked, remapped, narrowed      |
| status     | clone_status / clone_progress, persisted under #clone/                   |
| throttle   | bandwidth limits shared by several processes (a token bucket in shm)      |
| faults     | kill points: a named place where a test has the process SIGKILL itself   |
| swap       | replace mode's swap: the journal, its roll-back and roll-forward, locks   |
| control    | a serve's local control channel: finding it, asking it (RESTART)          |
| metrics    | donor and recipient counts, their Prometheus exposition (--metrics-addr)  |
| pagestore/ | the emulated InnoDB-style store: pages, redo, tracking, archiving, recovery |
"""
