#!/usr/bin/env python3
"""Export ONNX and build TensorRT engines for a model into Kiln's engine cache (same as `kiln build-engines`).

    .venv/bin/python scripts/build_engines.py stable-diffusion-xl-base-1.0 --size 1024x1024 --size 832x1216 --max-batch 8
    .venv/bin/python scripts/build_engines.py stable-diffusion-v1.5 --tiny --size 64x64 --max-batch 2

Run it with the Python Kiln is installed in (`make install`). Without a CUDA GPU or TensorRT it exports the ONNX
file and prints what it would build. See engine/backends/build.py for the options.
"""

import sys

from kiln.engine.backends.build import main

if __name__ == "__main__":
    sys.exit(main())
