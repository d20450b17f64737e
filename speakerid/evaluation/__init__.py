"""Evaluation, checkpoint → extraction → scoring → metrics → report: the library behind ``python -m evaluate``.

One job per file, in the order of the flow. ``trials.py`` reads and checks the trial lists and names the utterances
they need; the audio comes from :class:`speakerid.data.eval_reader.AudioSource` (a folder or eval shards).
``extract.py`` embeds each utterance once across the processes (:class:`ExtractConfig`, the trimming grid, the
length-batching :class:`Embedder`, :func:`extract`); ``embeddings.py`` holds :class:`Embeddings`, their file and the
cache's check. ``cohort.py`` chooses the score-normalisation cohort from the shards' index (reading only the shards
that hold it) and embeds it; ``scoring.py`` is the score arithmetic (cosine, the seeds' crop score, mean
subtraction, AS-Norm) and :func:`score_trials` over whole lists. ``calibration.py`` maps scores (and quality
measures) to log-likelihood ratios (:class:`Calibration`, :func:`fit_calibration`); ``calibration_trials.py`` draws
a calibration list from training shards and reads its audio back. Metrics come from :mod:`speakerid.metrics`.
``report.py`` writes score files and the DET plot and holds the reports; ``jobs.py`` is the two jobs,
:func:`evaluate` and :func:`embed`, and :func:`run_command`, the command line's choice between them.
"""

from speakerid.evaluation.calibration import Calibration, CalibrationConfig, fit_calibration
from speakerid.evaluation.calibration_trials import make_calibration_trials
from speakerid.evaluation.embeddings import Embeddings
from speakerid.evaluation.extract import (GRID_START, MIN_SAMPLES, Embedder, ExtractConfig, ExtractionStats, extract,
                                          prepare_item, trim_length)
from speakerid.evaluation.jobs import default_out, embed, evaluate, run_command
from speakerid.evaluation.report import EmbedReport, EvaluationReport, ListResult, plot_det, write_scores
from speakerid.evaluation.scoring import ScoreConfig, score_trials, speaker_means
from speakerid.evaluation.trials import TrialList, read_trial_lists, wanted_utterances

__all__ = ["GRID_START", "MIN_SAMPLES", "Calibration", "CalibrationConfig", "Embedder", "Embeddings", "EmbedReport",
           "EvaluationReport", "ExtractConfig", "ExtractionStats", "ListResult", "ScoreConfig", "TrialList", "default_out",
           "embed", "evaluate", "extract", "fit_calibration", "make_calibration_trials", "plot_det", "prepare_item",
           "read_trial_lists", "run_command", "score_trials", "speaker_means", "trim_length", "wanted_utterances",
           "write_scores"]
