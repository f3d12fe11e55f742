"""Dev-only helpers shared by tests, benchmarks and the demo; not part of any wheel.

``procs`` (child processes that never leak), ``kube_api`` (the Kubernetes API test server), ``static_files``
(the endpoint-file writer), ``fakes`` (a scriptable fake lookaside and Greet backends), ``backends``
(in-process Greet servers), ``certs`` (a test CA), ``attack`` (raw HTTP/2 frames, server processes),
``server_helpers`` (async helpers for server tests), ``xds_client`` (a stock xds:/// client process).
"""
