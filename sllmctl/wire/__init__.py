"""The ZeroMQ layer the CLI, the daemon and (later) cluster code share: the envelope and error
codes, one typed message per operation, the client with its deadlines, and the runtime folder
with the connection file. No torch: it imports only the standard library, zmq, sllmctl.errors,
sllmctl.paths and sllmctl.procs. The specification is docs/protocol.md."""
