"""onnxruntime session options shared by the workers, evaluation and the benchmarks, so that a benchmark
times the students exactly as the service runs them. onnxruntime is imported on call: the gateway imports
core/ and must not pull it in."""
from __future__ import annotations


def session_options(threads: int = 0):
    """Intra-op `threads` (0: onnxruntime decides), and idle threads that sleep instead of spinning.

    Spinning threads of one session keep a core busy after a run; with several sessions (three mechanisms,
    or a worker beside other processes) they steal it from the session that runs next.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options
