"""A real OpenAI-compatible server for tests: llama.cpp's own HTTP server (xllamacpp) on a GGUF.

``python tests/llm_server.py MODEL.gguf PORT`` serves MODEL on ``http://127.0.0.1:PORT/v1`` until
killed; it prints ``ready <address>`` once the HTTP server listens.
"""

from __future__ import annotations

import sys
import time


def main() -> None:
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = sys.argv[1]
    params.hostnames = ["127.0.0.1"]
    params.port = int(sys.argv[2])
    params.n_ctx = 4096
    params.n_parallel = 2
    params.cpuparams.n_threads = 2
    params.cpuparams_batch.n_threads = 2
    server = xlc.Server(params)
    print(f"ready {server.listening_address}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
