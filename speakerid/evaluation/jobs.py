"""The two jobs behind ``python -m evaluate``: evaluate (embed, score, report) and embed (write embeddings).

    loaded = load_inference_checkpoint("runs/demo")                      # speakerid.inference
    report = evaluate(loaded, ["veri_test2.txt"], "shards/vox1-O", "eval/demo")
    report.lists[0].metrics.eer

Each reads as the flow: trial lists → audio source → extraction (+ cache) → cohort → scoring → metrics →
report. Under ``accelerate launch`` every process embeds its share and the main process does the rest.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path

from speakerid.config import parse_override
from speakerid.data.eval_reader import AudioSource
from speakerid.data.lists import read_eval_list, scan_audio_tree, utterance_key
from speakerid.errors import SpeakeridError
from speakerid.evaluation.calibration import Calibration, CalibrationConfig, fit_calibration, trial_quality
from speakerid.evaluation.calibration_trials import CalibrationAudio, calibration_embeddings
from speakerid.evaluation.cohort import cohort_embeddings
from speakerid.evaluation.embeddings import Embeddings
from speakerid.evaluation.extract import (ExtractConfig, Progress, cache_settings, extract, precision_name,
                                          process_state, source_items)
from speakerid.evaluation.report import EmbedReport, EvaluationReport, list_results, plot_det, write_summary
from speakerid.evaluation.scoring import ScoreConfig, check_protocol, describe_normalisation, score_trials
from speakerid.evaluation.trials import TrialList, read_trial_lists, wanted_utterances
from speakerid.inference import LoadedModel, load_inference_checkpoint
from speakerid.tempfiles import remove_dead_temporaries


def evaluate(loaded: LoadedModel, trials: Iterable[str | os.PathLike], audio: str | os.PathLike,
             out_dir: str | os.PathLike, extract_config: ExtractConfig = ExtractConfig(),
             scoring: ScoreConfig = ScoreConfig(), *, cache: str | os.PathLike | None = "default", accelerator=None,
             progress: Progress | None = None,
             calibration: CalibrationConfig = CalibrationConfig()) -> EvaluationReport | None:
    """Embed every utterance of ``trials`` from ``audio``, score, and write scores, summary.json and det.png.

    ``cache``: "default" (``out_dir/embeddings.safetensors``), a path, or None. Under ``accelerate launch``
    every process embeds its share; the main process returns the report, the others return None. With
    ``calibration.calibration_trials`` the calibration list is embedded and scored the same way, a calibration
    fitted on it (``calibration.json``) and applied to every list (``llr-NAME.txt``, Cllr and actual DCF).
    """
    started = time.perf_counter()
    state = process_state(accelerator)
    lists = read_trial_lists(trials)  # every check that needs no audio comes first, on every process
    cal_list = cal_audio = None
    if calibration.calibration_trials:
        cal_list = read_trial_lists([calibration.calibration_trials])[0]
        if not cal_list.labelled:
            raise SpeakeridError(f"{cal_list.path}: a calibration list needs labels ('1|0 enroll test')")
        cal_audio = CalibrationAudio.open(calibration.calibration_audio, cal_list)
    elif calibration.calibration:
        Calibration.load(calibration.calibration)  # readable, before any audio is read
    wanted = wanted_utterances(lists)
    source = AudioSource.open(audio)
    source.check(wanted)
    out_dir = Path(out_dir)
    cache_path = out_dir / "embeddings.safetensors" if cache == "default" else (Path(cache) if cache else None)
    if state.is_main_process:
        _clear_dead_outputs(out_dir, lists, cache_path)
    check_protocol(scoring, crops=extract_config.eval_frames > 0)

    relpaths = {key: rel for key, (rel, _) in wanted.items()}
    settings = cache_settings(loaded, extract_config, state.device, audio=source.identity())
    embeddings, stats = extract(
        loaded, lambda missing, w: source_items(source, {k: relpaths[k] for k in missing}, extract_config, w),
        sorted(wanted), extract_config, state, cache=cache_path, settings=settings, progress=progress,
        fingerprints=source.fingerprints(relpaths) if state.is_main_process and cache_path else None)
    cohort = None
    if scoring.cohort and (scoring.mean_subtraction or scoring.as_norm):
        cohort_cache = cache_path.with_name(f"cohort-{cache_path.name}") if cache_path else None
        cohort = cohort_embeddings(loaded, scoring, extract_config, state, cache=cohort_cache, progress=progress)
    cal_embeddings = None
    if cal_list is not None:
        cal_cache = cache_path.with_name(f"calibration-{cache_path.name}") if cache_path else None
        cal_embeddings = calibration_embeddings(loaded, cal_audio, extract_config, state, cache=cal_cache,
                                                progress=progress)
    if not state.is_main_process:
        return None  # no barrier: the main process may fail while scoring, and nobody should wait for it

    def score(embedded: Embeddings, score_lists: list[TrialList]):
        return score_trials(embedded, score_lists, crops=extract_config.eval_frames > 0,
                            test_normalize=loaded.test_normalize, cohort=cohort, scoring=scoring)

    all_scores = score(embeddings, lists)
    produced_by = {"weights_sha256": loaded.fingerprint, "eval_frames": extract_config.eval_frames,
                   "normalisation": describe_normalisation(scoring, cohort), "cohort": scoring.cohort}
    fitted = _fit_or_load(calibration, cal_list, cal_embeddings, score, produced_by, extract_config.sample_rate)
    all_llrs = None
    if fitted is not None:
        fitted.save(out_dir / "calibration.json")
        all_llrs = [fitted.apply(s, trial_quality(embeddings, t, fitted.quality, extract_config.sample_rate))
                    for t, s in zip(lists, all_scores)]
    results = list_results(lists, all_scores, out_dir, scoring.threshold, all_llrs)
    det = plot_det([(t.name, s, t.labels) for t, s in zip(lists, all_scores) if t.labelled], out_dir / "det.png") \
        if any(t.labelled for t in lists) else None
    report = EvaluationReport(results, out_dir, out_dir / "summary.json", det, stats, state.num_processes,
                              time.perf_counter() - started, describe_normalisation(scoring, cohort),
                              len(cohort.keys) if cohort is not None else 0, fitted)
    write_summary(report, loaded, audio, extract_config, scoring,
                  precision_name(extract_config.precision, state.device))
    return report


def _fit_or_load(calibration: CalibrationConfig, cal_list: TrialList | None, cal_embeddings: Embeddings | None,
                 score, produced_by: dict, sample_rate: int) -> Calibration | None:
    """The calibration fitted on the calibration list's scores (``score(embeddings, lists)``), the one
    ``--calibration`` names (checked against ``produced_by``), or None."""
    if cal_list is not None:
        return fit_calibration(score(cal_embeddings, [cal_list])[0], cal_list.labels,
                               trial_quality(cal_embeddings, cal_list, calibration.quality, sample_rate),
                               p_target=calibration.calibration_prior, trials=str(cal_list.path), scoring=produced_by)
    if calibration.calibration:
        fitted = Calibration.load(calibration.calibration)
        fitted.check_scoring(produced_by, calibration.calibration)
        return fitted
    return None


def _clear_dead_outputs(out_dir: Path, lists: list[TrialList], cache_path: Path | None) -> None:
    """What a run killed mid-write left of its outputs: scores, summary, DET plot, embedding caches."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(out_dir, [f"{kind}-{t.name}.txt" for t in lists for kind in ("scores", "llr")]
                            + ["summary.json", "det", "calibration.json"])
    if cache_path is not None:
        remove_dead_temporaries(cache_path.parent, [cache_path.name, f"cohort-{cache_path.name}",
                                                    f"calibration-{cache_path.name}"])


def embed(loaded: LoadedModel, audio: str | os.PathLike, out_path: str | os.PathLike,
          extract_config: ExtractConfig = ExtractConfig(), *, audio_list: str | os.PathLike | None = None,
          accelerator=None, progress: Progress | None = None) -> EmbedReport | None:
    """Embed every utterance of ``audio`` (or of ``audio_list``: ``relpath`` / ``speaker relpath`` lines) into
    ``out_path``: safetensors (keys in its header) or ``.npy`` (+ ``.keys.txt``). (U, D), or (U, C, D) for crops."""
    state = process_state(accelerator)
    source = AudioSource.open(audio)
    if state.is_main_process:
        remove_dead_temporaries(Path(out_path).parent, [Path(out_path).name])
    if audio_list is not None:
        wanted = {utterance_key(e.relpath): (e.relpath, e.where) for e in read_eval_list(audio_list)}
        source.check(wanted)
    elif source.shards is not None:
        wanted = {key: (key, source.location) for key in sorted(source.available_keys())}
    else:
        wanted = {utterance_key(e.relpath): (e.relpath, e.where) for e in scan_audio_tree(source.root)}
    relpaths = {key: rel for key, (rel, _) in wanted.items()}
    embeddings, stats = extract(
        loaded, lambda missing, w: source_items(source, {k: relpaths[k] for k in missing}, extract_config, w),
        sorted(wanted), extract_config, state, progress=progress)
    if not state.is_main_process:
        return None
    if not extract_config.eval_frames:
        embeddings = Embeddings(embeddings.keys, embeddings.values[:, 0])
    path = embeddings.save(out_path, {"settings": cache_settings(loaded, extract_config, state.device),
                                      "checkpoint": loaded.meta})
    return EmbedReport(path, len(embeddings.keys), int(embeddings.values.shape[-1]), stats)


def default_out(checkpoint: str | os.PathLike) -> Path:
    """eval/NAME: the run directory's name for a run or its export/, the file's stem for a .model file."""
    path = Path(checkpoint)
    name = path.parent.name if path.name == "export" else (path.stem if path.is_file() else path.name)
    return Path("eval") / (name or "checkpoint")


def run_command(*, checkpoint: str, audio: str, trials: list[str], out: str | None, embed_only: bool,
                audio_list: str | None, model: str | None, loss: str | None, options: list[str], cache: str | None,
                no_cache: bool, progress: Progress | None = None, **settings) -> EvaluationReport | EmbedReport | None:
    """``python -m evaluate`` with its options as keywords: load the checkpoint (a .model file's ``options`` as
    seed-spelled KEY=VALUE texts), then :func:`embed` or :func:`evaluate`. ``settings`` are the fields of
    :class:`ExtractConfig` and (evaluation only) :class:`ScoreConfig` and :class:`CalibrationConfig`."""
    loaded = load_inference_checkpoint(checkpoint, model=model, loss=loss,
                                       options=dict(parse_override(text) for text in options))
    extract_config = ExtractConfig(**{f.name: settings.pop(f.name) for f in fields(ExtractConfig)
                                      if f.name in settings})
    calibration = CalibrationConfig(**{f.name: settings.pop(f.name) for f in fields(CalibrationConfig)
                                       if f.name in settings})
    if embed_only:
        return embed(loaded, audio, out or "embeddings.safetensors", extract_config, audio_list=audio_list,
                     progress=progress)
    if not trials:
        raise SpeakeridError("--trials is required (or --embed to write embeddings only)")
    return evaluate(loaded, trials, audio, out or default_out(checkpoint), extract_config, ScoreConfig(**settings),
                    cache=None if no_cache else (cache or "default"), progress=progress, calibration=calibration)
