"""Where transcripts go in Discord: channel messages, webhooks, caption threads, minutes."""
