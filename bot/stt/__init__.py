"""cantonese.ai real-time speech-to-text: wire protocol (pure) and one session per speaker."""
