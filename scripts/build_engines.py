#!/usr/bin/env python3
"""Export ONNX and build TensorRT engines for a model into Kiln's engine cache (same as `kiln build-engines`).

    python scripts/build_engines.py stable-diffusion-xl-base-1.0 --size 1024x1024 --size 832x1216 --max-batch 8
    python scripts/build_engines.py stable-diffusion-v1.5 --tiny --size 64x64 --max-batch 2

Without a CUDA GPU or TensorRT it exports the ONNX file and prints what it would build. See
engine/backends/build.py for the options.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from engine.backends.build import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
