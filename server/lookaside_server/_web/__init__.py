"""The HTTP listener (status page, ``/status.json``, ``/healthz``, ``/metrics``) and server logging."""
