"""``python -m gpugate``: the gpugate command."""

from .cli import main

raise SystemExit(main())
