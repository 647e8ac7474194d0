"""X-MoRe: retrieval-augmented zero-shot from an external image-text corpus (METHODS.md §6)."""
