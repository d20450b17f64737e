"""Batched on-device augmentation: MUSAN noise/speech/music and RIR reverberation, as voxceleb_trainer does it.

What the seed computes (clovaai/voxceleb_trainer, DatasetLoader.py: ``train_dataset_loader.__getitem__`` and
``AugmentWAV``), per training utterance on the CPU, when ``--augment`` is on:

- ``augtype = random.randint(0, 4)`` (both ends included): 0 nothing, 1 reverberation, 2 music, 3 speech
  (babble), 4 noise, each with probability 1/5, so one utterance in five stays clean.
- additive noise of category c: ``clean_db = 10·log10(mean(audio²) + 1e-4)``; k clips with
  ``k = random.randint(*numnoise[c])`` (noise [1, 1], speech [3, 7], music [1, 1]; so speech sums 3 to 7 clips),
  distinct files (``random.sample``), each a random crop as long as the utterance (``loadWAV``); every clip draws
  its own ``snr = random.uniform(*noisesnr[c])`` (noise [0, 15], speech [13, 20], music [5, 15] dB), has
  ``noise_db = 10·log10(mean(clip²) + 1e-4)`` and is scaled by ``sqrt(10**((clean_db − noise_db − snr)/10))``;
  the scaled clips are summed and added to the utterance, with no clipping or re-normalisation. The SNR range
  therefore holds per clip: a speech row's summed babble lies some 10·log10 k dB louder.
- reverberation: one RIR file, ``random.choice`` over all of them; ``rir / sqrt(sum(rir²))``;
  ``scipy.signal.convolve(audio, rir, mode='full')[:, :len]``: the first ``len`` samples, no delay compensation.
- float64 throughout, on soundfile's full-scale floats (int16 / 32768).

speakerid does the same to a whole batch on the training device: one type draw per utterance, then one batched
operation per type (mixing with per-row dB and per-clip SNRs; FFT convolution). Deliberate differences:

- float32 arithmetic instead of float64 (about 1e-6 relative);
- clips come from a :class:`~speakerid.data.noise.NoiseBank` reservoir, drawn with replacement (the seed's speech
  clips are distinct files; with a reservoir of hundreds a repeat is rare); speech rows always fetch 7 clips and
  mask the ones beyond their k;
- an RIR bank's categories (first folder under the packed root, e.g. smallroom/mediumroom/largeroom) are chosen in
  proportion to their file counts, so every RIR file is about equally likely as with ``random.choice``; RIRs
  longer than the bank's ``max_samples`` (1 s by default) are cut.

Determinism: every decision (type, clip count, SNRs, RIR category, which reservoir clips) is drawn from a CPU
``torch.Generator``. In training, :meth:`Augmenter.at_step` seeds it from (seed, rank, step) and puts the banks'
reservoirs where they are after that step, so a resumed run draws what an uninterrupted one draws, on every rank,
with nothing to checkpoint.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from speakerid.data.noise import NoiseBank
from speakerid.errors import SpeakeridError
from speakerid.features import frontend_context, int16_to_float

AUG_TYPES = ("none", "reverb", "music", "speech", "noise")  # index = the seed's augtype
NOISE_TYPES = ("music", "speech", "noise")  # also the MUSAN bank's category names


@dataclass(frozen=True)
class AugmentConfig:
    """The seed's AugmentWAV settings; every default is voxceleb_trainer's."""

    enabled: bool = True  # the seed's --augment
    p_none: float = 0.2  # augtype = random.randint(0, 4): five equally likely outcomes
    p_reverb: float = 0.2
    p_music: float = 0.2
    p_speech: float = 0.2
    p_noise: float = 0.2
    noise_snr: tuple[float, float] = (0.0, 15.0)  # dB, drawn per clip (noisesnr)
    speech_snr: tuple[float, float] = (13.0, 20.0)
    music_snr: tuple[float, float] = (5.0, 15.0)
    noise_clips: tuple[int, int] = (1, 1)  # clips summed per utterance, both ends included (numnoise)
    speech_clips: tuple[int, int] = (3, 7)
    music_clips: tuple[int, int] = (1, 1)
    db_floor: float = 1e-4  # dB = 10·log10(mean(x²) + db_floor)
    rir_categories: tuple[str, ...] = ()  # empty: every category of the RIR bank

    def __post_init__(self) -> None:
        for name in ("noise_snr", "speech_snr", "music_snr", "noise_clips", "speech_clips", "music_clips", "rir_categories"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # YAML gives lists
        if any(p < 0 for p in self.probabilities) or abs(sum(self.probabilities) - 1.0) > 1e-6:
            raise SpeakeridError(
                f"augment probabilities p_none/p_reverb/p_music/p_speech/p_noise must be ≥ 0 and sum to 1, "
                f"got {self.probabilities}"
            )
        for kind in NOISE_TYPES:
            low, high = self.snr(kind)
            if low > high:
                raise SpeakeridError(f"augment {kind}_snr must be (low, high) with low ≤ high, got {(low, high)}")
            low, high = self.clips(kind)
            if not 1 <= low <= high:
                raise SpeakeridError(f"augment {kind}_clips must be (low, high) with 1 ≤ low ≤ high, got {(low, high)}")

    @property
    def probabilities(self) -> tuple[float, ...]:
        """In AUG_TYPES order."""
        return tuple(getattr(self, f"p_{kind}") for kind in AUG_TYPES)

    def snr(self, kind: str) -> tuple[float, float]:
        return getattr(self, f"{kind}_snr")

    def clips(self, kind: str) -> tuple[int, int]:
        return getattr(self, f"{kind}_clips")

    @property
    def max_clips(self) -> int:
        return max(self.clips(kind)[1] for kind in NOISE_TYPES)


@dataclass
class AugmentPlan:
    """Everything random about one batch; :meth:`Augmenter.apply` is a pure function of it and the waveforms."""

    types: Tensor  # (B,) int64, index into AUG_TYPES
    n_clips: Tensor  # (B,) int64: clips summed (0 on none/reverb rows)
    snr_db: Tensor  # (B, max_clips) float32: one SNR per clip; columns ≥ n_clips unused
    clips: dict[str, Tensor] = field(default_factory=dict)
    # "music"/"speech"/"noise": int16 (rows of that type, kmax of that type, clip samples), rows in batch order;
    # "reverb": int16 (rows, rir samples), zero-padded

    def rows(self, kind: str) -> Tensor:
        return torch.nonzero(self.types == AUG_TYPES.index(kind)).squeeze(1)

    def counts(self) -> dict[str, int]:
        """Utterances per type, for the metrics log."""
        found = torch.bincount(self.types, minlength=len(AUG_TYPES)).tolist()
        return dict(zip(AUG_TYPES, found))


def fft_length(n: int) -> int:
    """Smallest 2^a·3^b·5^c ≥ n: sizes every FFT library handles fast, often far below the next power of 2."""
    best = 1 << max(n - 1, 0).bit_length()
    power5 = 1
    while power5 < best:
        power3 = power5
        while power3 < best:
            size = power3 << max(0, (n - 1) // power3).bit_length()  # power3 · smallest 2^a with product ≥ n
            best = min(best, size)
            power3 *= 3
        power5 *= 5
    return best


def step_generator(seed: int, stream: int, step: int, purpose: int = 13) -> torch.Generator:
    """A CPU generator seeded from (seed, stream, step) alone (numpy's SeedSequence mixes them into 64 bits);
    ``purpose`` keeps the draws of different augmentations (13: MUSAN/RIR) independent of each other."""
    high, low = np.random.SeedSequence([seed, stream, purpose, step]).generate_state(2)
    return torch.Generator().manual_seed(int(high) << 32 | int(low))


def level_db(x: Tensor, floor: float = 1e-4) -> Tensor:
    """The seed's loudness: 10·log10(mean(x²) + floor) over the last axis."""
    return 10 * torch.log10(x.square().mean(-1) + floor)


def mix_noise(clean: Tensor, clips: Tensor, snr_db: Tensor, n_clips: Tensor, floor: float = 1e-4) -> Tensor:
    """clean (R, L) + Σ_{j < n_clips} clips[:, j] scaled so each clip lies snr_db[:, j] dB under clean.

    clips (R, K, L), snr_db (R, K), n_clips (R,); float32 throughout.
    """
    clean_db = level_db(clean, floor).unsqueeze(1)  # (R, 1)
    noise_db = level_db(clips, floor)  # (R, K)
    gain = torch.sqrt(10 ** ((clean_db - noise_db - snr_db) / 10))
    used = torch.arange(clips.shape[1], device=clips.device) < n_clips.unsqueeze(1)
    return clean + torch.einsum("rk,rkl->rl", gain * used, clips)


def reverberate(clean: Tensor, rirs: Tensor) -> Tensor:
    """The first L samples of clean (R, L) convolved with its row's energy-normalised RIR (R, T), by FFT."""
    length = clean.shape[-1]
    rirs = rirs / rirs.square().sum(-1, keepdim=True).sqrt().clamp_min(1e-12)
    n = fft_length(length + rirs.shape[-1] - 1)
    spectrum = torch.fft.rfft(clean, n=n) * torch.fft.rfft(rirs, n=n)
    return torch.fft.irfft(spectrum, n=n)[:, :length]


def _fit(clips: Tensor, length: int) -> Tensor:
    """Clips of another length: cut, or wrap-tile (a bank built with clip_samples = L needs neither)."""
    if clips.shape[-1] == length:
        return clips
    return clips[..., torch.arange(length, device=clips.device) % clips.shape[-1]]


class Augmenter:
    """``augmenter(waveforms (…, L) float, generator) → (…, L)``, same dtype and device; no loop over utterances."""

    def __init__(self, config: AugmentConfig, noise_bank: NoiseBank | None = None, rir_bank: NoiseBank | None = None,
                 seed: int = 0, stream: int = 0) -> None:
        self.config = config
        self.seed, self.stream = seed, stream
        self.noise_bank = noise_bank
        self.rir_bank = rir_bank
        self.generator = torch.Generator().manual_seed(seed)  # used when a call passes none
        self._rir_categories: list[str] = []
        self._rir_weights = torch.ones(1)
        if not config.enabled:
            return
        for kind in NOISE_TYPES:
            if getattr(config, f"p_{kind}") > 0:
                if noise_bank is None:
                    raise SpeakeridError(
                        f"augmentation p_{kind} > 0 needs MUSAN shards (a noise bank); give them or set p_{kind}=0"
                    )
                if kind not in noise_bank.categories:
                    raise SpeakeridError(
                        f"{noise_bank.shards.location}: no {kind!r} clips for p_{kind} > 0 (categories: "
                        f"{', '.join(noise_bank.categories)}); pack MUSAN's {kind}/ folder or set p_{kind}=0"
                    )
        if config.p_reverb > 0:
            if rir_bank is None:
                raise SpeakeridError("augmentation p_reverb > 0 needs RIR shards (an RIR bank); give them or set p_reverb=0")
            files = Counter(k.split("/", 1)[0] for s in rir_bank.shards.index["shards"] for k in s["keys"])
            chosen = list(config.rir_categories) or rir_bank.categories
            unknown = sorted(set(chosen) - set(rir_bank.categories))
            if unknown:
                raise SpeakeridError(
                    f"{rir_bank.shards.location}: no RIR category {', '.join(unknown)}; it has {', '.join(rir_bank.categories)}"
                )
            self._rir_categories = chosen
            self._rir_weights = torch.tensor([float(files[c]) for c in chosen])

    def at_step(self, step: int) -> torch.Generator:
        """The banks as they are after ``step`` training steps, and that step's generator: (seed, stream, step) alone
        decide the step's augmentation, so resuming needs no saved state."""
        for bank in (self.noise_bank, self.rir_bank):
            if bank is not None:
                bank.seek(step)
        return step_generator(self.seed, self.stream, step)

    def __call__(self, waveforms: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if not self.config.enabled:
            return waveforms
        return self.apply(waveforms, self.draw(waveforms[..., 0].numel(), generator))

    def draw(self, batch: int, generator: torch.Generator | None = None) -> AugmentPlan:
        """Types, clip counts and SNRs for ``batch`` utterances from ``generator`` (CPU), then the clips from the banks."""
        config = self.config
        g = self.generator if generator is None else generator
        cumulative = torch.tensor(config.probabilities, dtype=torch.float64).cumsum(0)
        cumulative /= cumulative[-1].clone()  # u < 1 = the last edge: a zero-probability type is never drawn
        u_type = torch.rand(batch, generator=g, dtype=torch.float64)
        u_count = torch.rand(batch, generator=g, dtype=torch.float64)
        u_snr = torch.rand(batch, config.max_clips, generator=g, dtype=torch.float64)
        rir_category = torch.multinomial(self._rir_weights, batch, replacement=True, generator=g)
        types = torch.searchsorted(cumulative, u_type, right=True)
        n_clips = torch.zeros(batch, dtype=torch.int64)
        snr_db = torch.zeros(batch, config.max_clips)
        for kind in NOISE_TYPES:
            rows = types == AUG_TYPES.index(kind)
            (low, high), (k_low, k_high) = config.snr(kind), config.clips(kind)
            snr_db[rows] = (low + (high - low) * u_snr[rows]).float()
            n_clips[rows] = (k_low + (u_count[rows] * (k_high - k_low + 1)).long()).clamp_max(k_high)
        plan = AugmentPlan(types, n_clips, snr_db)
        for kind in NOISE_TYPES:
            n = int((types == AUG_TYPES.index(kind)).sum())
            if n:
                k = config.clips(kind)[1]
                clips = torch.from_numpy(self.noise_bank.take(kind, n * k, g))
                plan.clips[kind] = clips.reshape(n, k, -1)
        reverb_rows = plan.rows("reverb")
        if len(reverb_rows):
            plan.clips["reverb"] = self._take_rirs(rir_category[reverb_rows], g)
        return plan

    def _take_rirs(self, categories: Tensor, generator: torch.Generator) -> Tensor:
        """int16 (rows, longest), row i an RIR of category ``self._rir_categories[categories[i]]``."""
        taken: list[tuple[Tensor, Tensor]] = []
        for c, name in enumerate(self._rir_categories):
            rows = torch.nonzero(categories == c).squeeze(1)
            if len(rows):
                taken.append((rows, torch.from_numpy(self.rir_bank.take(name, len(rows), generator))))
        out = torch.zeros(len(categories), max(r.shape[1] for _, r in taken), dtype=torch.int16)
        for rows, rirs in taken:
            out[rows, : rirs.shape[1]] = rirs
        return out

    def apply(self, waveforms: Tensor, plan: AugmentPlan) -> Tensor:
        """The augmented batch: one batched operation per type, in float32 on the waveforms' device."""
        if not waveforms.is_floating_point():
            raise TypeError(f"augmentation takes float waveforms at full scale [-1, 1), got {waveforms.dtype}")
        with frontend_context(waveforms.device.type):  # no autocast: einsum would otherwise run in bf16/fp16
            return self._apply(waveforms, plan)

    def _apply(self, waveforms: Tensor, plan: AugmentPlan) -> Tensor:
        shape, device = waveforms.shape, waveforms.device
        x = waveforms.reshape(-1, shape[-1])
        out = x.clone()  # untouched rows stay bit-exact
        for kind in (*NOISE_TYPES, "reverb"):
            if kind not in plan.clips:
                continue
            rows = plan.rows(kind)
            on_device = rows.to(device)
            clean = x[on_device].float()
            taken = int16_to_float(plan.clips[kind].to(device, non_blocking=True))
            if kind == "reverb":
                augmented = reverberate(clean, taken)
            else:
                clips = _fit(taken, shape[-1])
                snr_db = plan.snr_db[rows, : clips.shape[1]].to(device)
                augmented = mix_noise(clean, clips, snr_db, plan.n_clips[rows].to(device), self.config.db_floor)
            out[on_device] = augmented.to(out.dtype)
        return out.reshape(shape)
