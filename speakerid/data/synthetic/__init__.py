"""Deterministic synthetic speaker corpus, shaped like VoxCeleb (for the demo, the tests and the benchmarks).

Where each idea lives: ``spec.py`` says what a corpus is (:class:`CorpusSpec`: speakers, utterances, videos,
lengths, trials, seed), its speaker ids and the keys of its independent random streams; ``phones.py`` holds
the phone inventory (formant targets, sources, durations) as tables; ``voices.py`` draws a speaker's voice
(:func:`speaker_params`) and a video's recording channel (:func:`channel_params`); ``synthesis.py`` turns a
voice, a channel and a seed into one utterance of int16 samples (:func:`synthesize_utterance`: random
syllables, glottal source, formant filter, noise, loudness); ``corpus.py`` plans the corpus and writes it
(:func:`generate_corpus`: wav files in worker processes, lists, trials, ``corpus.json``); ``__main__.py``
is ``python -m speakerid.data.synthetic``. Every draw comes from a stream keyed by (seed, stream, speaker,
…), so a corpus is bit-identical whatever the number of worker processes.
"""

from speakerid.data.synthetic.corpus import CorpusInfo, generate_corpus, make_trials, plan_corpus
from speakerid.data.synthetic.spec import TEST_SPEAKER_OFFSET, CorpusSpec, speaker_id
from speakerid.data.synthetic.synthesis import BACKGROUND_SNR_DB, channel_response, synthesize_utterance
from speakerid.data.synthetic.voices import ChannelParams, SpeakerParams, channel_params, speaker_params, video_ids

__all__ = [
    "BACKGROUND_SNR_DB", "TEST_SPEAKER_OFFSET", "ChannelParams", "CorpusInfo", "CorpusSpec", "SpeakerParams",
    "channel_params", "channel_response", "generate_corpus", "make_trials", "plan_corpus", "speaker_id",
    "speaker_params", "synthesize_utterance", "video_ids",
]
