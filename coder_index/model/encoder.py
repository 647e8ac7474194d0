"""CLIP image and text encoders on top of open_clip, with a stable model fingerprint.

Text encoding exploits that CLIP's text tower is causal and read at the end-of-text token: tokens
after it cannot change the embedding, so texts are sorted by token length and each batch is cut
to its longest real length instead of always running the full 77-token context.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from coder_index.core.errors import ModelLoadError
from coder_index.core.startup import paused_gc, settle_imports
from coder_index.model import fingerprint_cache
from coder_index.model.hub import fetch_policy, weight_files
from coder_index.model.lazy_timm import import_open_clip

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"  # explicit opt-in to an untrained model (benchmarks, tests)
_OFFLINE_HELP = (
    "If this machine cannot reach the model hub, download the checkpoint elsewhere and pass its file "
    "as --pretrained /path/to/open_clip_pytorch_model.bin (Python: pretrained='/path/...'), or use "
    "--model local-dir:/path/to/dir with open_clip_config.json and open_clip_pytorch_model.bin "
    "(the layout of open_clip repositories on the Hugging Face hub)"
)
# How checkpoint files start: a zip archive (torch.save), a legacy pickle, or safetensors' header size.
_CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@dataclass(frozen=True)
class ModelFingerprint:
    """Identifies the exact weights behind embeddings; recorded in every index."""

    model: str
    pretrained: str | None
    weights_sha256: str
    embed_dim: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelFingerprint:
        return cls(d["model"], d.get("pretrained"), d["weights_sha256"], int(d["embed_dim"]))

    def describe(self) -> str:
        tag = f", pretrained={self.pretrained}" if self.pretrained else ""
        return f"{self.model}{tag} (weights sha256 {self.weights_sha256[:12]}…)"


def pick_device(device: str | None = None) -> torch.device:
    """CUDA, then Apple MPS, then CPU, unless the caller names one."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def weights_checksum(model: torch.nn.Module) -> str:
    """sha256 over parameter names, dtypes, shapes and bytes, in a fixed order.

    Hashing the loaded state dict (rather than a file) gives one fingerprint for the same weights
    whether they came from a tag, a .bin, a .safetensors or an hf-hub repository.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def _resolve_pretrained(model: str, pretrained: str | None) -> str | None:
    import open_clip

    if model.startswith(("local-dir:", "hf-hub:")):
        return None  # these schemas carry their own weights; open_clip ignores `pretrained`
    if model.replace("/", "-") not in open_clip.list_models():
        close = difflib.get_close_matches(model, open_clip.list_models(), n=5)
        raise ModelLoadError(
            f"Unknown open_clip model '{model}'. Close names: {close or 'none'}. "
            "Use a name from open_clip.list_models(), or local-dir:PATH / hf-hub:ORG/NAME.")
    if pretrained is None:
        tags = open_clip.list_pretrained_tags_by_model(model)
        if not tags:
            raise ModelLoadError(f"open_clip has no pretrained weights for '{model}'; pass --pretrained FILE")
        pretrained = "openai" if "openai" in tags else tags[0]
        log.info("no pretrained tag given for %s; using '%s'", model, pretrained)
    if pretrained == RANDOM_WEIGHTS:
        return pretrained
    known = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in known and not Path(pretrained).is_file():
        close = difflib.get_close_matches(pretrained, known, n=1, cutoff=0.3)
        suggestion = close[0] if close else (known[0] if known else "openai")
        raise ModelLoadError(
            f"'{pretrained}' is neither a pretrained tag of {model} nor an existing checkpoint file. Did you mean "
            f"--model {model} --pretrained {suggestion}? Tags of {model}: {', '.join(known) or 'none'}. "
            f"{_OFFLINE_HELP}.")
    if Path(pretrained).is_file():
        _check_checkpoint_file(Path(pretrained))
    return pretrained


def _check_checkpoint_file(path: Path) -> None:
    """A file given as --pretrained must look like a checkpoint before torch sees it (torch's own
    error on a text file advises weights_only=False, which would run code from the file)."""
    with open(path, "rb") as f:
        head = f.read(16)
    safetensors = len(head) >= 9 and head[8:9] == b"{"
    if not (head.startswith(_CHECKPOINT_MAGIC) or safetensors):
        raise ModelLoadError(f"{path} is not a checkpoint (neither a torch.save zip, a pickle nor safetensors); "
                             "pass the model's open_clip_pytorch_model.bin or .safetensors")


def _check_local_dir(model: str) -> None:
    if not model.startswith("local-dir:"):
        return
    path = Path(model[len("local-dir:"):])
    if not (path / "open_clip_config.json").is_file():
        raise ModelLoadError(f"{path} has no open_clip_config.json; a local-dir: model needs the config "
                             "and a weights file (open_clip_pytorch_model.bin or open_clip_model.safetensors)")
    weights = [p for p in path.iterdir() if p.suffix in (".bin", ".pth", ".safetensors")]
    special = [p for p in weights if not p.is_file()]
    if special:  # open_clip would pick it like a file: a FIFO blocks the load for ever
        raise ModelLoadError(f"{special[0]} is not a regular file (a folder, FIFO, socket, device or broken link); "
                             f"open_clip picks its weights from the files of {path} by name: move it out of the folder")
    if not weights:
        # open_clip would silently build a random model here; embeddings would be meaningless.
        raise ModelLoadError(f"{path} holds no weights file (.bin, .pth or .safetensors); "
                             "copy open_clip_pytorch_model.bin next to open_clip_config.json")


class _DropRandomNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_open_clip_random_notice():  # noqa: ANN202 - a context manager
    """open_clip logs "No pretrained weights loaded ... initialized randomly" on the root logger for
    every model built without weights; coder-index says it once, in its own words."""
    root = logging.getLogger()
    flt = _DropRandomNotice()
    root.addFilter(flt)
    for handler in root.handlers:
        handler.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)
        for handler in root.handlers:
            handler.removeFilter(flt)


@contextlib.contextmanager
def _skip_weight_init():  # noqa: ANN202 - a context manager
    """Building a model whose every parameter a checkpoint then overwrites: torch.nn.init's functions
    (which layers' reset_parameters and open_clip's init_parameters call) leave tensors as allocated.
    open_clip loads checkpoints strictly, so a parameter the file lacks is an error, never left
    uninitialised."""
    import torch.nn.init as init

    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
    saved = {n: getattr(init, n) for n in names}
    for n in names:
        setattr(init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(init, n, fn)


@contextlib.contextmanager
def _mapped_checkpoints(enabled: bool):  # noqa: ANN202 - a context manager
    """torch.load maps checkpoint files instead of reading them into fresh memory (torch's own switch,
    ``torch.utils.serialization.config.load.mmap``, where this torch has it); restored afterwards."""
    try:
        from torch.utils.serialization import config
    except ImportError:
        config = None
    if not enabled or config is None or not hasattr(config.load, "mmap"):
        yield
        return
    before = config.load.mmap
    config.load.mmap = True
    try:
        yield
    finally:
        config.load.mmap = before


_SAID_UNTRAINED: set[str] = set()


def _say_untrained_once(model: str) -> None:
    if model not in _SAID_UNTRAINED:
        _SAID_UNTRAINED.add(model)
        log.warning("%s has untrained (seeded) weights (--pretrained random): the whole pipeline runs, the labels "
                    "mean nothing; pass --pretrained openai or a checkpoint file for real predictions", model)


TEXT_GROUP = 32768  # texts tokenized at a time (int64 tokens: 20 MB), then sorted by token length
# Images per forward pass on the CPU. Activations of 64 ViT-B-32 images held 0.19 GB more at peak than
# four passes of 16, and the smaller passes were no slower (11.7 s against 12.7 s for 256 images).
CPU_IMAGE_ROWS = 16
# What open_clip's CLIP (first group) and CustomTextCLIP (``text``) hold for the text tower only.
_TEXT_PARTS = ("transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection",
               "attn_mask", "text")


class ClipEncoder:
    """Any open_clip model: ``ClipEncoder('ViT-B-32', 'openai')``, a checkpoint file as
    ``pretrained``, ``'local-dir:PATH'`` or ``'hf-hub:ORG/NAME'``.

    Device is picked automatically (cuda, mps, cpu). ``precision`` is fp32, fp16 or bf16; by default
    the towers run in fp16 on CUDA and in fp32 elsewhere. Embeddings are returned as L2-normalised
    float32 numpy arrays, and everything after the encoders (CODER, rerank, adapter) is float32.
    """

    def __init__(self, model: str, pretrained: str | None = None, device: str | None = None,
                 *, cache_dir: str | None = None, precision: str | None = None) -> None:
        with paused_gc():  # see core.startup: the collector finds nothing in these objects, at a cost
            open_clip = import_open_clip()  # timm deferred until a model needs it (lazy_timm)

            self.model_name = model
            self._cache_dir = cache_dir
            self._text_released = False
            self._tokenizer = None
            self.pretrained = _resolve_pretrained(model, pretrained)
            _check_local_dir(model)
            self.device = pick_device(device)
            files = weight_files(model, self.pretrained, cache_dir)
            reader = f"open_clip {getattr(open_clip, '__version__', '?')}"
            if self.pretrained == RANDOM_WEIGHTS:
                key = fingerprint_cache.seeded_key(model=model, config=open_clip.get_model_config(model),
                                                   reader=f"{reader}, torch {torch.__version__}")
            else:
                key = fingerprint_cache.identity_key(files or [], model=model, pretrained=self.pretrained,
                                                     reader=reader)
            net, preprocess = self._build(open_clip, model, cache_dir)
        if self.pretrained == RANDOM_WEIGHTS:
            _say_untrained_once(model)
        net.train(False)  # inference mode for dropout/batch-norm layers
        embed_dim = int(getattr(net, "embed_dim", 0) or _probe_embed_dim(net))
        # The files may have changed (or others appeared beside them) while they were read: only a key
        # that held before and after is used.
        if self.pretrained != RANDOM_WEIGHTS:
            files_after = weight_files(model, self.pretrained, cache_dir)
            if files_after != files or key != fingerprint_cache.identity_key(
                    files_after or [], model=model, pretrained=self.pretrained, reader=reader):
                key = None
        checksum = fingerprint_cache.lookup(key)
        if checksum is None:
            checksum = weights_checksum(net)
            fingerprint_cache.remember(key, checksum)
        self.fingerprint = ModelFingerprint(model, self.pretrained, checksum, embed_dim)
        self.precision = pick_precision(self.device, precision)
        self.dtype = PRECISIONS[self.precision]
        self.model = net.to(self.device, dtype=self.dtype)
        self.preprocess = preprocess
        self._fast_text = _supports_truncated_text(self.model)
        settle_imports()

    def _build(self, open_clip: Any, model: str, cache_dir: str | None) -> tuple[torch.nn.Module, Any]:
        """open_clip's model and preprocessing, on the CPU in float32, with the weights in place."""
        random = self.pretrained == RANDOM_WEIGHTS
        try:
            try:
                return self._create(open_clip, model, cache_dir, mmap=not random)
            except (RuntimeError, OSError) as exc:
                if "mmap" not in str(exc):
                    raise
                # a checkpoint in torch's legacy (non-zip) format cannot be mapped: read it whole
                return self._create(open_clip, model, cache_dir, mmap=False)
        except ModelLoadError:
            raise
        except Exception as exc:  # open_clip raises bare RuntimeErrors for download failures
            reason = str(exc).rstrip(". ")
            if "weights_only" in reason or "Unpickling" in type(exc).__name__:
                reason = "the checkpoint needs code to load, which is refused (not a plain state dict)"
            raise ModelLoadError(f"Could not load CLIP model {model} (pretrained={self.pretrained}): "
                                 f"{reason}. {_OFFLINE_HELP}.") from exc

    def _create(self, open_clip: Any, model: str, cache_dir: str | None, *, mmap: bool
                ) -> tuple[torch.nn.Module, Any]:
        # 'random' weights are seeded so that an index built with them can be reopened later; the
        # caller's RNG state is left as it was. Weights read from a checkpoint overwrite every parameter:
        # their random initialisation (0.76 of 1.36 s of building ViT-B-32 here) is skipped, and the
        # checkpoint is memory-mapped rather than copied once more before it is copied into the model
        # (build + load 0.52 s instead of 1.05 s). 'random' weights keep the seeded init, exactly as before
        # (indexes built with them record their fingerprint).
        random = self.pretrained == RANDOM_WEIGHTS
        init = contextlib.nullcontext() if random else _skip_weight_init()
        with torch.random.fork_rng(devices=[]), fetch_policy(model, self.pretrained, cache_dir), \
                _quiet_open_clip_random_notice(), init, _mapped_checkpoints(mmap):
            torch.manual_seed(0)
            net, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=None if random else self.pretrained,
                device="cpu", cache_dir=cache_dir, weights_only=True)
        return net, preprocess

    @property
    def tokenizer(self) -> Any:
        """open_clip's tokenizer for the model, made on first use (classifying images needs none)."""
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.model_name)
        return self._tokenizer

    @property
    def embed_dim(self) -> int:
        return self.fingerprint.embed_dim

    @property
    def image_size(self) -> tuple[int, int]:
        size = getattr(self.model.visual, "image_size", 224)
        return tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Any] | torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Embeddings ``[N, D]`` of PIL images (preprocessed here) or an already preprocessed tensor."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise ValueError(f"images tensor must be [N, 3, H, W], got shape {tuple(images.shape)}")
            batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
        else:
            images = list(images)
            batches = (torch.stack([self.preprocess(im) for im in images[i:i + batch_size]])
                       for i in range(0, len(images), batch_size))
        out = [self.encode_image_batch(b) for b in batches]
        if not out:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return np.concatenate(out)

    @torch.inference_mode()
    def encode_image_batch(self, batch: torch.Tensor, *, normalize: bool = True) -> np.ndarray:
        """Embeddings of a preprocessed batch; L2-normalised unless ``normalize=False`` (raw features,
        e.g. to average augmented views before normalising, as the released few-shot code does)."""
        batch = batch.to(self.device, non_blocking=True)
        rows = CPU_IMAGE_ROWS if self.device.type == "cpu" else max(1, len(batch))
        feats = torch.cat([self.model.encode_image(part.to(self.dtype)).float()
                           for part in batch.split(rows)]) if len(batch) else \
            torch.zeros((0, self.embed_dim))
        return (F.normalize(feats, dim=-1) if normalize else feats).cpu().numpy()

    def release_text_tower(self) -> bool:
        """Free the text tower's weights (a third of ViT-B-32, more of larger models) for work that only
        encodes images, such as classifying a folder against an index. A later ``encode_texts`` loads the
        model again, checked against the same fingerprint. Returns whether anything was freed."""
        if self._text_released:
            return True
        parts = [n for n in _TEXT_PARTS if getattr(self.model, n, None) is not None]
        if not parts or getattr(self.model, "visual", None) is None:
            return False  # a model of another shape: keep it whole
        for name in parts:
            setattr(self.model, name, None)
        self._text_released = True
        _return_freed_memory()
        log.debug("released the text tower of %s", self.model_name)
        return True

    def _ensure_text_tower(self) -> None:
        if not self._text_released:
            return
        log.info("loading %s again: its text tower was released and texts are to be encoded", self.model_name)
        again = ClipEncoder(self.model_name, self.pretrained, str(self.device), cache_dir=self._cache_dir,
                            precision=self.precision)
        if again.fingerprint != self.fingerprint:
            raise ModelLoadError(f"the weights of {self.fingerprint.describe()} changed on disk while in use "
                                 f"(now {again.fingerprint.describe()}); rerun with the files as they were")
        self.model, self._text_released = again.model, False

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    @property
    def text_batch_size(self) -> int:
        """Texts per forward pass by default. On the CPU 128 runs fastest (ViT-B-32, 2 cores: 175 texts/s
        against 143 at 256 and 88 at 1024 - larger activations fall out of the caches); a GPU wants more."""
        return 128 if self.device.type == "cpu" else 512

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int | None = None,
                     progress: Callable[[int], None] | None = None, *, normalize: bool = True) -> np.ndarray:
        """Embeddings ``[N, D]`` of texts, in input order; ``progress(n)`` after every batch of n.
        L2-normalised unless ``normalize=False`` (the text tower's raw features: X-MoRe's released
        caption order weighs captions by them).

        All texts are ordered by length first (characters, then tokens within groups of
        ``TEXT_GROUP``), so every batch is cut to nearly the context its texts need; tokens are made
        a group at a time, so memory stays bounded for any number of texts.
        """
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        if any(not isinstance(t, str) for t in texts):
            raise ValueError("encode_texts takes a list of str")
        batch_size = batch_size or self.text_batch_size
        self._ensure_text_tower()
        out = torch.empty((len(texts), self.embed_dim), dtype=torch.float32)
        by_chars = np.argsort(np.fromiter((len(t) for t in texts), np.int64, len(texts)), kind="stable")
        for g in range(0, len(texts), TEXT_GROUP):
            group = torch.from_numpy(by_chars[g:g + TEXT_GROUP])
            tokens = self.tokenize([texts[i] for i in group.tolist()])
            if self._fast_text:
                lengths = _real_lengths(self.model, tokens)
                order = torch.argsort(lengths, stable=True)
            else:
                lengths, order = None, torch.arange(len(group))
            for i in range(0, len(group), batch_size):
                idx = order[i:i + batch_size]
                if lengths is not None:
                    feats = _encode_text_truncated(self.model, tokens[idx, : int(lengths[idx].max())].to(self.device))
                else:
                    feats = self.model.encode_text(tokens[idx].to(self.device))
                out[group[idx]] = (F.normalize(feats.float(), dim=-1) if normalize else feats.float()).cpu()
                if progress is not None:
                    progress(len(idx))
        return out.numpy()


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_precision(device: torch.device, precision: str | None) -> str:
    if precision is None or precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}")
    if precision != "fp32" and device.type == "cpu":
        raise ValueError(f"{precision} encoders are for GPUs; on the CPU they are slower and change embeddings "
                         "for nothing: use fp32 (the default there)")
    return precision


def _return_freed_memory() -> None:
    """Hand memory freed by Python and torch back to the system (glibc keeps freed heap otherwise)."""
    import gc

    from coder_index.core.pages import trim_heap

    gc.collect()
    trim_heap()


def _probe_embed_dim(net: torch.nn.Module) -> int:
    proj = getattr(net, "text_projection", None)
    if isinstance(proj, torch.nn.Linear):
        return proj.out_features
    if proj is not None:
        return int(proj.shape[-1])
    raise ModelLoadError("cannot determine the embedding width of this model")


def _supports_truncated_text(model: torch.nn.Module) -> bool:
    """True for CLIP text towers where cutting the context is exact: causal attention, read at EOT."""
    import open_clip

    return (isinstance(model, open_clip.CLIP)
            and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", None) in ("argmax", "eos"))


def _real_lengths(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Number of tokens up to and including the token the embedding is read at."""
    if model.text_pool_type == "argmax":
        pos = tokens.argmax(dim=-1)
    else:
        pos = (tokens == model.text_eos_id).int().argmax(dim=-1)
    return pos + 1


def _encode_text_truncated(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` over a context of ``tokens.shape[1]`` positions."""
    from open_clip.transformer import text_global_pool

    n = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:n].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection
