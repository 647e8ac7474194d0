"""Few-shot CODER-Adapter (METHODS.md §5) and its Tip-Adapter baseline: the numeric adapters and
the search of their hyper-parameters (``adapter``), a fitted adapter directory read back and used
for prediction (``model``). Fitting one from images is ``pipeline.fit_adapter``."""
