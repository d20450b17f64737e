"""What an evaluation leaves behind: per list its scores file and metrics (EER, minDCF, actual DCF, minCllr), the
DET plot, summary.json, and the reports the jobs return. With a calibration, per list also its calibrated LLRs
(``llr-NAME.txt``) and their Cllr, minCllr, EER, minDCF and actual DCF at the Bayes threshold −logit(p_target).
Raw scores get no Cllr: cosine scores are not log-likelihood ratios, so their Cllr says nothing; their minCllr
(after the best monotone map) does."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from speakerid.data.index import write_json_atomic
from speakerid.evaluation.calibration import Calibration
from speakerid.evaluation.extract import ExtractConfig, ExtractionStats
from speakerid.evaluation.scoring import ScoreConfig
from speakerid.evaluation.trials import TrialList
from speakerid.inference import LoadedModel
from speakerid.metrics import DCF_P_TARGETS, Metrics, actual_dcf, bayes_threshold, cllr, det_curve, min_cllr


@dataclass
class ListResult:
    name: str
    path: Path
    n_trials: int
    scores_path: Path
    metrics: Metrics | None = None  # None for an unlabelled list (scores only)
    actual_dcf: dict[str, float] | None = None  # p_target → actual DCF at `threshold`
    threshold: float | None = None
    min_cllr: float | None = None  # of the raw scores (labelled lists)
    calibrated: dict | None = None  # with a calibration: llr file; labelled: cllr, min_cllr, eer, min_dcf_*, actual_dcf

    def as_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "trials": self.n_trials, "scores": str(self.scores_path),
                "metrics": self.metrics.as_dict() if self.metrics else None,
                "actual_dcf": {"threshold": self.threshold, **(self.actual_dcf or {})} if self.actual_dcf else None,
                "min_cllr": self.min_cllr, "calibrated": self.calibrated}


def list_results(lists: list[TrialList], all_scores: list[np.ndarray], out_dir: Path,
                 threshold: float | None, all_llrs: list[np.ndarray] | None = None) -> list[ListResult]:
    """Write each list's scores; EER, minDCF, minCllr and actual DCF of the labelled ones, at ``threshold`` or
    else at the EER threshold of the first labelled list. ``all_llrs``: calibrated scores, written and measured
    too (actual DCF at the Bayes threshold of each p_target)."""
    results: list[ListResult] = []
    for i, (trial_list, scores) in enumerate(zip(lists, all_scores)):
        result = ListResult(trial_list.name, trial_list.path, len(scores),
                            write_scores(out_dir / f"scores-{trial_list.name}.txt", trial_list, scores))
        if trial_list.labelled:
            result.metrics = Metrics.compute(scores, trial_list.labels)
            threshold = result.metrics.eer_threshold if threshold is None else threshold
            result.threshold = threshold
            result.actual_dcf = {f"p_target_{p:g}": actual_dcf(scores, trial_list.labels, threshold, p)
                                 for p in DCF_P_TARGETS}
            result.min_cllr = min_cllr(scores, trial_list.labels)
        if all_llrs is not None:
            result.calibrated = calibrated_metrics(trial_list, all_llrs[i], out_dir)
        results.append(result)
    return results


def calibrated_metrics(trial_list: TrialList, llrs: np.ndarray, out_dir: Path) -> dict:
    """The calibrated LLRs' file and, for a labelled list, what calibration is judged by."""
    result: dict = {"llr": str(write_scores(out_dir / f"llr-{trial_list.name}.txt", trial_list, llrs))}
    if trial_list.labelled:
        labels = trial_list.labels
        metrics = Metrics.compute(llrs, labels)
        result.update({
            "cllr": cllr(llrs, labels), "min_cllr": min_cllr(llrs, labels), "eer": metrics.eer,
            "min_dcf_05": metrics.min_dcf_05, "min_dcf_01": metrics.min_dcf_01,
            "actual_dcf": {f"p_target_{p:g}": actual_dcf(llrs, labels, bayes_threshold(p), p) for p in DCF_P_TARGETS},
        })
    return result


def write_scores(path: Path, trial_list: TrialList, scores: np.ndarray) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(f"{s:.6f} {t.enroll} {t.test}\n" for s, t in zip(scores.tolist(), trial_list.trials)))
    os.replace(tmp, path)
    return path


def plot_det(curves: list[tuple[str, np.ndarray, np.ndarray]], path: Path) -> Path | None:
    """A DET plot (probit axes) of each labelled list; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from scipy.special import ndtri

    ticks = np.array([0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 40, 60, 80, 95])
    figure, axes = plt.subplots(figsize=(5.5, 5.5))
    worst = 0.0
    for name, scores, labels in curves:
        fpr, fnr, _ = det_curve(scores, labels)
        keep = (fpr > 0) & (fpr < 1) & (fnr > 0) & (fnr < 1)
        worst = max(worst, float(np.min(np.maximum(fpr, fnr))))  # about the EER
        axes.plot(ndtri(fpr[keep]), ndtri(fnr[keep]), label=name)
    top = 0.5 if worst < 0.3 else 0.99  # a poor system still shows on the plot
    ticks = ticks[ticks / 100 < top]
    axes.plot(ndtri(ticks / 100), ndtri(ticks / 100), color="grey", linewidth=0.5, linestyle=":")
    axes.set_xticks(ndtri(ticks / 100), [f"{t:g}" for t in ticks])
    axes.set_yticks(ndtri(ticks / 100), [f"{t:g}" for t in ticks])
    axes.set_xlim(ndtri(0.0005), ndtri(top))
    axes.set_ylim(ndtri(0.0005), ndtri(top))
    axes.set_xlabel("false acceptance rate (%)")
    axes.set_ylabel("miss rate (%)")
    axes.grid(True, linewidth=0.3)
    axes.legend(loc="upper right")
    figure.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    os.replace(tmp, path)
    return path


@dataclass
class EvaluationReport:
    lists: list[ListResult]
    out_dir: Path
    summary_path: Path
    det_path: Path | None
    extraction: ExtractionStats
    world_size: int
    seconds: float
    normalisation: str  # "none", "mean subtraction", "AS-Norm (top-k …)" …
    cohort_size: int = 0
    calibration: Calibration | None = None


def write_summary(report: EvaluationReport, loaded: LoadedModel, audio: str | os.PathLike,
                  extract_config: ExtractConfig, scoring: ScoreConfig, precision: str) -> None:
    """summary.json: the checkpoint, audio, protocol and settings beside every list's figures."""
    write_json_atomic(report.summary_path, {
        "checkpoint": {"source": str(loaded.source), "model": loaded.meta.get("model"), "loss": loaded.meta.get("loss"),
                       "weights_sha256": loaded.fingerprint},
        "audio": str(audio),
        "protocol": ({"eval_frames": extract_config.eval_frames, "num_eval": extract_config.num_eval,
                      "score": "-mean crop distance", "test_normalize": loaded.test_normalize}
                     if extract_config.eval_frames else
                     {"whole_utterances": True, "trim_tolerance": extract_config.trim_tolerance, "score": "cosine"}),
        "precision": precision,
        "normalisation": report.normalisation, "cohort": scoring.cohort, "cohort_utterances": report.cohort_size,
        "threshold_source": "given" if scoring.threshold is not None else "EER threshold of the first labelled list",
        "extraction": asdict(report.extraction), "processes": report.world_size, "seconds": round(report.seconds, 3),
        "lists": [r.as_dict() for r in report.lists], "det": str(report.det_path) if report.det_path else None,
        "calibration": ({**asdict(report.calibration), "file": str(report.out_dir / "calibration.json"),
                         "monotone": report.calibration.monotone} if report.calibration else None),
    })


@dataclass
class EmbedReport:
    path: Path
    n_utterances: int
    embedding_dim: int
    extraction: ExtractionStats
