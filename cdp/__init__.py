"""The core library of the CDP engine: formats, stores, catalog, MSA, CLI (README.md, "What is here")."""

import os

# numpy serves us for element-wise work on record columns, never for linear algebra, but
# the OpenBLAS it loads at import starts a thread per core there, which cost each process
# 0.05-0.1 s of CPU for nothing (measured, medians of 15 interleaved starts: `import
# drva.daemon` 0.40 s of CPU, 0.30 s with one thread; `import iofilter_sim.__main__`
# 0.52 s, 0.42 s). We start a process per CLI verb, job, host and DRVA (the test suite
# about 800), so every one of them paid it. Set here, before anything imports numpy:
# drva, rocva, iofilter_sim and benchmarks import this package first. An operator's own
# value is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
