"""Core of the server: the data model, the registry of endpoint sets per target, port selection and
the pick strategies, and ending RPCs with a status."""
