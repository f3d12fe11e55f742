"""Production safety of the gRPC port: TLS with reload, access rules, the guard interceptor and limits."""
