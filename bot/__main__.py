"""`python -m bot` is the same as the `cantobot` console script."""

from bot.cli import main

raise SystemExit(main())
