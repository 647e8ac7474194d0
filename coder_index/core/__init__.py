"""Plain helpers and plain data, the bottom layer: errors, input validation, untrusted files
(JSON, images, class lists) read safely, crash points for tests, records, the text recipes
(presets), durable file writes and locks, SQLite damage reports.

Nothing here imports another layer of coder-index, loads a model or opens a store.
"""
