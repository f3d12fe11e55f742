"""Command-line flags of ``lookaside-server``, each falling back to an ``LB_*`` environment variable."""
