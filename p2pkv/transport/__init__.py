"""Data plane: pulls KV chunk bytes straight from the peer that holds them."""
