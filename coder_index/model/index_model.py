"""An index's CLIP model: loaded when first used, checked against the fingerprint the index records,
its text tower released when only images will be encoded. The store records which model built it;
loading and checking that model lives here, with the model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from coder_index.core.errors import ModelMismatchError

if TYPE_CHECKING:
    from coder_index.model.encoder import ClipEncoder, ModelFingerprint


class IndexModel:
    """The model of an index whose fingerprint is ``fingerprint`` (``device``, ``precision``: where and
    how it runs once loaded; ``encoder``: one already loaded, checked here)."""

    def __init__(self, fingerprint: ModelFingerprint, *, device: str | None = None, precision: str | None = None,
                 encoder: ClipEncoder | None = None) -> None:
        self.fingerprint, self.device, self.precision = fingerprint, device, precision
        self._encoder: ClipEncoder | None = None
        self._images_only = False  # release the text tower as soon as the model loads
        if encoder is not None:
            self.use(encoder)

    @property
    def loaded(self) -> ClipEncoder | None:
        """The encoder if it is loaded (None: loading it is still to come, and costs seconds)."""
        return self._encoder

    @property
    def encoder(self) -> ClipEncoder:
        if self._encoder is None:
            from coder_index.model.encoder import ClipEncoder

            fp = self.fingerprint
            self.use(ClipEncoder(fp.model, fp.pretrained, device=self.device, precision=self.precision))
        assert self._encoder is not None
        return self._encoder

    def use(self, encoder: ClipEncoder) -> None:
        """Take ``encoder`` as this index's model, once its weights are checked to be the index's."""
        self.check(encoder.fingerprint)
        if self._images_only:
            encoder.release_text_tower()
        self._encoder = encoder

    def check(self, fp: ModelFingerprint) -> None:
        mine = self.fingerprint
        if fp.weights_sha256 != mine.weights_sha256 or fp.embed_dim != mine.embed_dim:
            raise ModelMismatchError(
                f"This index was built with CLIP model {mine.describe()}, but the model in use is "
                f"{fp.describe()}. Embeddings of different models are not comparable: use "
                f"--model {mine.model}" + (f" --pretrained {mine.pretrained}" if mine.pretrained else "")
                + ", or build a new index for this model.")

    def require(self, model: str | None, pretrained: str | None) -> None:
        """Refuse to go on unless ``model`` / ``pretrained`` (what the caller expects; None: anything)
        name this index's model. A model that can be loaded locally (``local-dir:``, or a checkpoint
        file) is compared by its weights, so a moved model folder is still accepted (and then used); a
        different hub name is refused without a download."""
        from coder_index.model.encoder import ClipEncoder

        fp = self.fingerprint
        if model is None and pretrained is None:
            return
        if (model or fp.model) == fp.model and (pretrained is None or pretrained == fp.pretrained):
            return
        local = (model or "").startswith("local-dir:") or (pretrained is not None and Path(pretrained).is_file())
        if not local:
            asked = f"{model or fp.model}" + (f" (pretrained={pretrained})" if pretrained else "")
            raise ModelMismatchError(
                f"This index was built with CLIP model {fp.describe()}, not {asked}. Embeddings of different "
                f"models are not comparable: omit --model to use the index's model, or build a new index "
                f"with --model {model or fp.model}.")
        self.use(ClipEncoder(model or fp.model, pretrained, device=self.device, precision=self.precision))

    def images_only(self) -> None:
        """Only images will be encoded from here on: free the text tower now, or when the model loads
        (which this does not cause: a run with nothing to encode never loads it)."""
        self._images_only = True
        if self._encoder is not None:
            self._encoder.release_text_tower()

    def compute_device(self) -> Any:
        """Where the per-image numeric work runs: the encoder's device (or the one it will load on)."""
        if self._encoder is not None:
            return self._encoder.device
        from coder_index.model.compute import resolve_device

        return resolve_device(self.device)

    def precision_in_use(self) -> str | None:
        """The precision texts are encoded in: the loaded encoder's, or the one it will load with."""
        if self._encoder is not None:
            return self._encoder.precision
        from coder_index.model.encoder import pick_device, pick_precision

        return pick_precision(pick_device(self.device), self.precision)
