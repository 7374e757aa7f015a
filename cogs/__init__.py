"""Discord command surface: cogs parse interactions, call `bot/`, and reply."""
