"""Few-shot CODER-Adapter (METHODS.md §5) and its Tip-Adapter baseline."""
