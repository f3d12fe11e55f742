"""lookaside-grpc: lookaside load balancing for gRPC on Kubernetes, keeping long-lived connections."""
