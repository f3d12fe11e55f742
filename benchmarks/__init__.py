"""Benchmarks for lookaside-grpc: ``python -m benchmarks run [--quick]``.

Everything runs on 127.0.0.1 and is started by the harness itself: a lookaside server (static file), Greet
backends (one process each, or all in one process on several ports), and one client subprocess per
measurement so that client CPU per call can be measured. See ``benchmarks/README.md``.
"""
