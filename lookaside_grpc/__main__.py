"""``python -m lookaside_grpc``: the ``lookaside`` operator CLI (see ``lookaside --help``)."""

from lookaside_grpc._cli import main

if __name__ == "__main__":
    main()
