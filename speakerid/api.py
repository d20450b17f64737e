"""The Python API: load a checkpoint once, then embed, score and verify audio in one line each.

    import speakerid
    model = speakerid.load_model("runs/resnet34")        # a run dir, its export/, or a .model file (+ model=…)
    e = model.embed("a.wav")                              # (D,) float32 tensor on the CPU
    s = model.score("a.wav", "b.wav")                     # cosine similarity
    same = model.verify("a.wav", "b.wav")                 # LLR of the checkpoint's calibration.json > Bayes threshold
    scores = model.score_trials("veri_test2.txt", audio="wav/")

An embedding is the one ``python -m evaluate`` computes with its default protocol: the whole utterance, trimmed
to the extraction grid (:func:`speakerid.evaluation.trim_length`), through the model at evaluate's precision,
batched only with utterances of the same trimmed length (so a batch never changes a result). Scores are cosine
similarities, as evaluate's whole-utterance scores, whatever the loss. ``load_model(…, eval_frames=400)`` gives
the seeds' crop protocol instead (evaluate's ``--eval-frames``: embeddings (num_eval, D), the seeds' distance
score, which follows the loss's test_normalize). Input checks (docs/python-api.md): another
sample rate is resampled (scipy's resample_poly) with a warning, several channels are averaged with a warning;
an empty, too short (< 0.1 s) or all-zero input is a :class:`SpeakeridError` naming it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from speakerid.audio import decode_file, float_to_int16, resample_int16
from speakerid.data.eval_reader import AudioSource, EvalConfig
from speakerid.data.lists import read_trials, scan_audio_tree
from speakerid.errors import SpeakeridError
from speakerid.evaluation.calibration import Calibration, quality_features, utterance_measures
from speakerid.evaluation.embeddings import Embeddings
from speakerid.evaluation.extract import MIN_SAMPLES, Embedder, ExtractConfig, prepare_item
from speakerid.evaluation.scoring import cosine_scores, crop_scores
from speakerid.evaluation.scoring import score_trials as score_lists
from speakerid.evaluation.trials import TrialList, wanted_utterances
from speakerid.inference import EXPORT_DIR, LoadedModel, load_inference_checkpoint
from speakerid.metrics import bayes_threshold

CALIBRATION_NAME = "calibration.json"  # looked for in the checkpoint directory (and a run directory)
PENDING_SECONDS = 600.0  # audio waiting for a full batch, at most; the fullest length group runs first

Audio = str | os.PathLike | np.ndarray | torch.Tensor


def load_model(path: str | os.PathLike, *, device: str | torch.device | None = None, model: str | None = None,
               loss: str | None = None, calibration: str | os.PathLike | None = None, precision: str = "auto",
               eval_frames: int = 0, num_eval: int = 10, **model_options) -> "SpeakerModel":
    """Load a checkpoint for inference: a speakerid checkpoint directory, a training run directory (its
    ``export/``), or a voxceleb_trainer ``.model`` file with its architecture named (``model="ResNetSE34L",
    loss="angleproto", nOut=512, encoder_type="SAP"``).

    ``device``: "cpu", "cuda", "cuda:1" or a torch.device; default cuda when available. ``calibration``: a
    ``calibration.json`` written by ``python -m evaluate --calibration-trials`` (default: the one in the checkpoint
    directory, if any) for :meth:`SpeakerModel.verify`. ``precision``: as evaluate's ``--precision`` (auto: bf16/fp16
    on a GPU, fp32 on the CPU). ``eval_frames``/``num_eval``: 0 (default) embeds whole utterances, as evaluate
    does by default; else the seeds' protocol, as ``--eval-frames``: ``num_eval`` crops of ``eval_frames``·160 + 240
    samples per utterance (an embedding is then ``(num_eval, D)``, a score the seeds' −mean crop distance).
    """
    path = Path(path)
    if path.is_file() and model is None and path.name not in ("speakerid.json", "model.safetensors"):
        raise SpeakeridError(
            f"{path}: not a speakerid checkpoint. A checkpoint is a directory holding speakerid.json and "
            "model.safetensors (a training run directory holds one in export/); a voxceleb_trainer .model file also "
            "loads, with its architecture named: load_model(path, model='ResNetSE34L', loss='angleproto', nOut=512, "
            "encoder_type='SAP')")
    if path.is_dir() and (model is not None or loss is not None or model_options):
        given = ", ".join([*(f"{k}=" for k, v in (("model", model), ("loss", loss)) if v is not None),
                           *(f"{k}=" for k in model_options)])
        raise SpeakeridError(f"{path}: a speakerid checkpoint describes its own model; {given} name the architecture "
                             "of a voxceleb_trainer .model file only: leave them out")
    loaded = load_inference_checkpoint(path, model=model, loss=loss, options=model_options or None)
    config = ExtractConfig(eval_frames=eval_frames, num_eval=num_eval, precision=precision,
                           sample_rate=int(loaded.meta.get("sample_rate", 16000)))
    return SpeakerModel(loaded, device=_device(device), calibration=_find_calibration(path, loaded, calibration),
                        config=config)


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise SpeakeridError(f"device={device!r}: not a device ({error}); use 'cpu', 'cuda' or 'cuda:N'") from error
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise SpeakeridError(f"device={device!r}: this torch sees no CUDA GPU; use device='cpu'")
    return chosen


def _find_calibration(path: Path, loaded: LoadedModel, given: str | os.PathLike | None) -> Path | None:
    if given is not None:
        if not Path(given).is_file():
            raise SpeakeridError(f"calibration={str(given)!r}: no such file; give the calibration.json written by "
                                 "speakerid evaluate --calibration-trials")
        return Path(given)
    if not loaded.source.is_dir():
        return None
    places = [loaded.source / CALIBRATION_NAME]
    if loaded.source.name == EXPORT_DIR:
        places.append(loaded.source.parent / CALIBRATION_NAME)
    return next((p for p in places if p.is_file()), None)


class SpeakerModel:
    """A loaded checkpoint on a device: :meth:`embed`, :meth:`score`, :meth:`verify`, :meth:`score_trials`."""

    def __init__(self, loaded: LoadedModel, *, device: torch.device, calibration: Path | None = None,
                 config: ExtractConfig = ExtractConfig()) -> None:
        self.loaded = loaded
        self.config = config  # evaluate's extraction settings: protocol, precision, sample rate
        self.sample_rate = config.sample_rate
        self.embedding_dim = int(loaded.meta["embedding_dim"])
        self._embedder = Embedder(loaded.model, device, self.config)
        self.calibration_path = calibration
        self.calibration = Calibration.load(calibration) if calibration is not None else None
        self._warned: set[tuple] = set()

    @property
    def device(self) -> torch.device:
        return self._embedder.device

    def __repr__(self) -> str:
        name = self.loaded.meta["model"]["name"]
        crops = f", eval_frames={self.config.eval_frames}, num_eval={self.config.num_eval}" if self.crops else ""
        calibrated = f", calibration={str(self.calibration_path)!r}" if self.calibration_path else ""
        return (f"SpeakerModel({name}, embedding_dim={self.embedding_dim}, sample_rate={self.sample_rate}, "
                f"device={str(self.device)!r}, source={str(self.loaded.source)!r}{crops}{calibrated})")

    @property
    def crops(self) -> bool:
        """The seeds' crop protocol (``eval_frames`` > 0) rather than whole utterances."""
        return self.config.eval_frames > 0

    # ------------------------------------------------------------------------------------------- embedding

    def embed(self, x: Audio | list[Audio], *, sample_rate: int | None = None,
              batch_size: int = 64) -> torch.Tensor | dict[str, torch.Tensor]:
        """Embed one input → ``(D,)``; a list → ``(N, D)`` in its order; a folder → {relative path: ``(D,)``}
        over its audio files (recursive, sorted); with crops each ``(D,)`` is ``(num_eval, D)``. An input is an
        audio file, or a 1-D numpy array / tensor (int16, or float in [-1, 1]) with its ``sample_rate``. Embeddings
        are float32 CPU tensors; utterances of one trimmed length run together, at most ``batch_size`` per pass."""
        if batch_size < 1:
            raise SpeakeridError(f"batch_size must be at least 1, got {batch_size}")
        if isinstance(x, (str, os.PathLike)) and Path(x).is_dir():
            relpaths = [entry.relpath for entry in scan_audio_tree(x)]
            found = self._embed_all(((rel, Path(x) / rel) for rel in relpaths), sample_rate, batch_size)
            return {rel: torch.from_numpy(found[rel][0]) for rel in relpaths}
        if isinstance(x, (list, tuple)):
            if not x:
                raise SpeakeridError("embed([]): the list is empty; give at least one file or array")
            found = self._embed_all(((str(i), item) for i, item in enumerate(x)), sample_rate, batch_size)
            return torch.from_numpy(np.stack([found[str(i)][0] for i in range(len(x))]))
        return torch.from_numpy(self._embed_all([("0", x)], sample_rate, batch_size)["0"][0])

    def _embed_all(self, items: Iterable[tuple[str, Audio]], sample_rate: int | None,
                   batch_size: int) -> dict[str, tuple[np.ndarray, int]]:
        """name → (embedding (D,), samples before trimming), each input read, checked and embedded once."""
        return self._run(((name, self._samples(item, sample_rate)) for name, item in items), batch_size)

    def _run(self, items: Iterable[tuple[str, tuple[np.ndarray, str]]], batch_size: int) -> dict:
        """Batch ``(name, (int16 samples, what to call them in an error))`` by trimmed length, as evaluate does."""
        out: dict[str, tuple[np.ndarray, int]] = {}
        groups: dict[int, list[tuple[str, np.ndarray, int]]] = {}
        pending, limit = 0, int(PENDING_SECONDS * self.sample_rate)

        def run(length: int) -> None:
            nonlocal pending
            group = groups.pop(length)
            pending -= length * len(group)
            for start in range(0, len(group), batch_size):
                part = group[start:start + batch_size]
                values = self._embedder.forward(torch.from_numpy(np.stack([a for _, a, _ in part])))  # (B, C, D)
                values = values if self.crops else values[:, 0]
                out.update((name, (value, n)) for (name, _, n), value in zip(part, values))

        for name, (samples, label) in items:
            _check_audio(samples, label)
            item = prepare_item(label, samples, self.config)  # (1, trimmed length) or (num_eval, crop length)
            groups.setdefault(item.shape[-1], []).append((name, item, len(samples)))
            pending += item.shape[-1]
            if len(groups[item.shape[-1]]) >= batch_size:
                run(item.shape[-1])
            while pending > limit:
                run(max(groups, key=lambda n: n * len(groups[n])))
        for length in sorted(groups):
            run(length)
        return out

    def _samples(self, x: Audio, sample_rate: int | None) -> tuple[np.ndarray, str]:
        """One input as mono int16 at the model's rate, and its name for errors."""
        if isinstance(x, (str, os.PathLike)):
            path = Path(x)
            if path.is_dir():
                raise SpeakeridError(f"{path}: a folder inside a list; embed the folder on its own (a dict back)")
            if not path.is_file():
                raise SpeakeridError(f"{path}: no such audio file")
            if sample_rate is not None:
                raise SpeakeridError(f"{path}: sample_rate= is for arrays; a file's rate is read from the file")
            samples, rate = decode_file(path)
            return self._conform(samples, rate, str(path)), str(path)
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        if not isinstance(x, np.ndarray):
            raise SpeakeridError(f"cannot embed a {type(x).__name__}: give an audio file path, a folder, a 1-D numpy "
                                 "array or tensor (with sample_rate=), or a list of them")
        label = f"array of shape {x.shape}"
        if x.ndim != 1:
            raise SpeakeridError(f"{label}: give one channel as a 1-D array (average the channels first, e.g. "
                                 "x.mean(axis=0), knowing which axis holds them)")
        if sample_rate is None:
            raise SpeakeridError(f"{label}: pass its sample_rate= (the model was trained at {self.sample_rate} Hz)")
        return self._conform(_to_int16(x, label)[:, None], int(sample_rate), label), label

    def _conform(self, samples: np.ndarray, rate: int, label: str) -> np.ndarray:
        """(n, channels) int16 at ``rate`` → mono int16 at the model's rate, warning once per kind of change."""
        if samples.size == 0:
            raise SpeakeridError(f"{label}: no audio samples (an empty file or array)")
        if samples.shape[1] > 1:
            self._warn_once(("channels", samples.shape[1]),
                            f"{label}: {samples.shape[1]} channels averaged to one (warned once)")
            samples = np.round(samples.astype(np.float64).mean(axis=1, keepdims=True)).astype(np.int16)
        mono = samples[:, 0]
        if rate != self.sample_rate:
            self._warn_once(("rate", rate), f"{label}: resampled from {rate} Hz to the model's {self.sample_rate} Hz "
                                            "(scipy resample_poly; warned once per rate)")
            mono = resample_int16(mono, rate, self.sample_rate)
        return np.ascontiguousarray(mono)

    def _warn_once(self, key: tuple, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=8)  # the caller of embed()

    # --------------------------------------------------------------------------------------------- scoring

    def score(self, a: Audio, b: Audio, *, sample_rate: int | None = None) -> float:
        """Cosine similarity of the two inputs' embeddings (evaluate's whole-utterance score); with crops the
        seeds' score, −mean of the crop pairs' distances (crops L2-normalised first if the loss's test_normalize)."""
        return self._pair(a, b, sample_rate)[0]

    def verify(self, a: Audio, b: Audio, *, threshold: float | None = None, sample_rate: int | None = None) -> bool:
        """Same speaker? ``threshold`` given: score > threshold. Else the calibration's LLR > its Bayes threshold
        −logit(p_target) (c_miss = c_fa = 1)."""
        if threshold is not None:
            return self.score(a, b, sample_rate=sample_rate) > threshold
        return self.llr(a, b, sample_rate=sample_rate) > self.bayes_threshold

    def llr(self, a: Audio, b: Audio, *, sample_rate: int | None = None) -> float:
        """The calibrated log-likelihood ratio of the trial (a, b) (needs a calibration)."""
        calibration = self._need_calibration()
        score, pair = self._pair(a, b, sample_rate)
        measures = utterance_measures(pair, calibration.quality, self.sample_rate)
        features = quality_features(measures, np.array([[0, 1]]))
        return float(calibration.apply(np.array([score]), features)[0])

    @property
    def bayes_threshold(self) -> float:
        """The LLR above which :meth:`verify` accepts: −logit(p_target) of the calibration's prior."""
        return bayes_threshold(self._need_calibration().p_target)

    def _need_calibration(self) -> Calibration:
        if self.calibration is None:
            raise SpeakeridError(
                f"{self.loaded.source}: no calibration to decide with. Give verify(a, b, threshold=…) (a cosine "
                "score), or fit one: speakerid evaluate --checkpoint … --trials … --audio … --calibration-trials "
                f"CAL.txt --calibration-audio TRAIN_SHARDS writes OUT/{CALIBRATION_NAME}; copy it into the "
                f"checkpoint directory or pass load_model(…, calibration='OUT/{CALIBRATION_NAME}')")
        self.calibration.check_scoring(self._scoring(), self.calibration_path)
        return self.calibration

    def _scoring(self) -> dict:
        """What produced the scores, as evaluate records it in a calibration (checked before it is used)."""
        return {"weights_sha256": self.loaded.fingerprint, "eval_frames": self.config.eval_frames,
                "normalisation": "none", "cohort": None}

    def _pair(self, a: Audio, b: Audio, sample_rate: int | None) -> tuple[float, Embeddings]:
        """The trial's score, and its two embeddings with their lengths (quality measures)."""
        found = self._embed_all([("a", a), ("b", b)], sample_rate, 2)
        pair = Embeddings(["a", "b"], np.stack([found["a"][0], found["b"][0]]), samples=[found[k][1] for k in "ab"])
        return float(self._scores(pair, np.array([[0, 1]]))[0]), pair

    def _scores(self, embeddings: Embeddings, pairs: np.ndarray) -> np.ndarray:
        if self.crops:
            return crop_scores(embeddings.values, pairs, normalize=self.loaded.test_normalize)
        return cosine_scores(embeddings.values, pairs)

    def score_trials(self, trial_list: str | os.PathLike, *, audio: str | os.PathLike,
                     batch_size: int = 64) -> np.ndarray:
        """Cosine scores ``(T,)`` of a trial list (``label enroll test`` or ``enroll test`` lines) in its order,
        the utterances read from ``audio`` (a folder, or eval shards / their index.json / URL), each embedded once."""
        path = Path(trial_list)
        trials = TrialList(path.stem, path, read_trials(path))
        wanted = wanted_utterances([trials])
        source = AudioSource.open(audio)
        source.check(wanted)
        relpaths = {key: rel for key, (rel, _) in wanted.items()}
        if source.shards is None:
            items = ((key, self._samples(source.root / rel, None)) for key, rel in relpaths.items())
        else:
            items = self._shard_items(source, relpaths)
        found = self._run(items, batch_size)
        keys = sorted(found)
        embeddings = Embeddings(keys, np.stack([found[k][0] for k in keys]))
        return score_lists(embeddings, [trials], crops=self.crops, test_normalize=self.loaded.test_normalize)[0]

    def _shard_items(self, source: AudioSource, relpaths: dict[str, str]) -> Iterator[tuple[str, tuple]]:
        rate = int(source.shards.sample_rate)
        if rate != self.sample_rate:
            raise SpeakeridError(f"{source.location}: eval shards at {rate} Hz, the model expects {self.sample_rate} "
                                 f"Hz: pack them again with shardify --sample-rate {self.sample_rate}")
        loader = source.loader(relpaths, EvalConfig(), sample_rate=self.sample_rate)
        for batch in loader:
            audio = batch["audio"].numpy()
            for row, (key, length) in enumerate(zip(batch["keys"], batch["lengths"].tolist())):
                yield key, (audio[row, :length], source.describe(key, relpaths[key]))


def _check_audio(samples: np.ndarray, label: str) -> None:
    if samples.size == 0:
        raise SpeakeridError(f"{label}: no audio samples (an empty file or array)")
    if len(samples) < MIN_SAMPLES:
        return  # prepare_item names it with the minimum
    if not samples.any():
        raise SpeakeridError(f"{label}: silent (every sample is zero): its embedding would say nothing about a "
                             "speaker; check the recording or drop it")


def _to_int16(x: np.ndarray, label: str) -> np.ndarray:
    """int16 as it is; floats in [-1, 1] scaled by 32768 and rounded, as a 16-bit file is read."""
    if x.dtype == np.int16:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise SpeakeridError(f"{label}: dtype {x.dtype}; give int16 samples or floats in [-1, 1]")
    if x.size and not np.isfinite(x).all():
        raise SpeakeridError(f"{label}: holds NaN or infinite samples")
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak > 1.0:
        raise SpeakeridError(f"{label}: float samples reach {peak:.4g}, outside [-1, 1]; floats are full-scale audio "
                             "(divide int16-valued floats by 32768, or pass them as int16)")
    return float_to_int16(x.astype(np.float64), 32768.0)


__all__ = ["SpeakerModel", "load_model"]
