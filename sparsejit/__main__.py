"""`python -m sparsejit`: the command line (see sparsejit.cli)."""

from .cli import main

raise SystemExit(main())
