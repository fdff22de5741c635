"""Sans-IO Server-Sent Events: the encoder, the decoder, line and UTF-8 splitting."""
