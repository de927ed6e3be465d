"""adloop streams: event contracts, topics, the embedded Kafka broker and Kafka I/O helpers."""
