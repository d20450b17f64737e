"""End to end on the CPU, through the demo's own code path: built-in corpus → shardify → train → evaluate.

The assertion is on the drop of the held-out speakers' EER; both figures are printed (pytest -s, or -rA).
"""

from __future__ import annotations

from rich.console import Console

from speakerid.data.synthetic import CorpusSpec
from speakerid.demo import print_report, run_demo


def test_demo_training_at_least_halves_the_held_out_eer(tmp_path, capsys):
    # The demo's recipe and schedule (configs/demo.yaml) on a smaller corpus: half the training speakers, 8
    # utterances each, of 2–6 s instead of 2–12 s, and 10 held-out speakers.
    spec = CorpusSpec(n_speakers=100, utts_per_speaker=8, n_test_speakers=10, test_utts_per_speaker=10, max_seconds=6.0)
    report = run_demo(tmp_path / "demo", spec=spec, workers=2)
    with capsys.disabled():
        print(f"\ndemo: EER {report.eer_before:.2f} % untrained → {report.eer_after:.2f} % after training "
              f"({report.utterances_per_s:.0f} utterances/s)")
    print_report(report, Console(stderr=True))
    assert report.eer_after <= report.eer_before / 2, (report.eer_before, report.eer_after)
    assert report.checkpoint.joinpath("speakerid.json").exists() and report.scores.exists()
    assert (tmp_path / "demo" / "run" / "metrics.jsonl").read_text().count('"eer"') == 2  # validated at epochs 6, 12

    # The trained checkpoint scores the same read from the audio tree as from the eval shards.
    from speakerid.evaluation import ExtractConfig, evaluate
    from speakerid.inference import load_inference_checkpoint

    corpus = tmp_path / "demo" / "corpus"
    from_tree = evaluate(load_inference_checkpoint(report.checkpoint), [corpus / "trials.txt"], corpus / "wav",
                         tmp_path / "eval-tree", ExtractConfig(), cache=None)
    assert from_tree.lists[0].metrics.eer == report.eer_after
