"""Speech to text (model/speech_to_text.py) on real speech: what it hears does not depend on how many threads NumPy's
BLAS may use in the calling process (Ray's workers limit them through OMP_NUM_THREADS; the service does not), so the
local and Ray engines give a call the same transcript. Needs the data directory (skips otherwise)."""

from __future__ import annotations

from pathlib import Path

from threadpoolctl import threadpool_limits

from benchmarks.call_builder import ravdess_utterances
from model.speech_to_text import SpeechToText


def test_the_transcript_does_not_depend_on_the_process_blas_threads(data_dir: Path) -> None:
    stt = SpeechToText("cpu", cpu_threads=1)
    waves = [utterance.wave for utterance in ravdess_utterances(data_dir, 4, seed=10)]
    heard = {}
    for threads in (1, 4):  # 4: as many as the host has, up to 4
        with threadpool_limits(limits=threads, user_api="blas"):
            heard[threads] = [[(w.text, w.probability) for w in stt.transcribe(wave).words] for wave in waves]
    assert all(heard[1]), heard[1]
    assert heard[1] == heard[4]
