"""The ``lookaside.Lookaside`` gRPC API: the servicer (Resolve, Watch, ReportLoad, Status), the status view
and the load board that turns client load reports into weights and picks."""
