"""Endpoint sources behind one interface (``base``): a static file, or the Kubernetes API (EndpointSlices,
with core/v1 Endpoints as a fallback; ``kube_objects`` are pure functions over API objects)."""
