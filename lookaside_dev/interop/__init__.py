"""The interop test service: gRPC's interoperability test cases, served by the project's own test service.

``v1/test.proto`` holds only the services (``lookaside.interop.v1.TestService`` and the never-served
``UnimplementedService``); their messages are imported from ``v1/messages.proto`` and ``v1/empty.proto``, as
gRPC's own ``test.proto`` imports ``messages.proto`` and ``empty.proto``. ``server.InteropBackend`` runs the
servicer in process on 127.0.0.1, signing every reply with its address.

Regenerate the Python code after editing a .proto with ``python3 dev.py proto`` (``proto/generate.py``, the
one generator for every proto of the repository, run with the oldest supported grpcio-tools);
``tests/test_codegen.py`` fails when the committed code is stale.
"""
