"""Names the command line offers as choices, kept free of heavy imports so that ``--help`` is fast."""

# zero-shot methods of `eval` (evaluation/methods.py computes them)
ABLATIONS = {
    "P": ("name",),
    "P+Att": ("name", "attribute"),
    "P+Att+Ana": ("name", "attribute", "analogous"),
    "P+Att+Ana+Syn": ("name", "attribute", "analogous", "synonym"),
}
STAGE1_METHODS = ("clip", "vcd", "coder", *ABLATIONS)
RERANK_METHODS = ("coder*", "coder*-gated")
ALL_METHODS = STAGE1_METHODS + RERANK_METHODS
FEWSHOT_METHODS = ("tip-adapter", "coder-adapter")
XMORE_METHODS = ("xmore", "coder+xmore")

# prompt sets of the CLIP zero-shot weights (zeroshot.py)
PROMPT_CHOICES = ("auto", "clip", "names", "cvpr24")

# zero-shot methods of classify, explain and serve (methods/scorer_spec.py builds them)
ZERO_SHOT_METHODS = ("coder", "xmore", "coder+xmore")
# X-MoRe's confidence normalisers (methods/scorers.XMoreScorer)
XMORE_NORMALIZERS = ("corpus", "set", "running")
XMORE_RETRIEVALS = ("nearest", "released")

# --decode: the feed (pipeline/feed.py)
DECODE_CHOICES = ("auto", "cpu", "gpu")

PRESETS = ("default", "cvpr24")
TASKS = ("zero-shot", "few-shot")

# files that are classified (by extension, case-insensitive)
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
    ".pbm", ".pnm", ".jfif", ".ico", ".tga",
})
