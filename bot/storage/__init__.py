"""Storage of committed lines, meetings and opt-outs (SQLite; numbered migrations)."""
