"""Host side of the guest agent protocol: channel (transport) and client."""
