"""Audio conversion and audio files: pure, numpy in and out."""
