"""Discord voice receive: RTP parsing, transport decryption, DAVE, jitter, Opus, SSRC -> member."""
