"""The compressed KV cache: storage formats, cache objects, attention over them."""
