"""Transcript model (segments, words) and minutes writers (Markdown, SRT, WebVTT, JSON)."""
