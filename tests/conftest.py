import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("QWEN_GPTQ_SHARED", ROOT.parent / "shared"))
# The shipped example model (a copy of shared/models/qwen2-tiny) keeps the tests
# runnable without ../shared; calibration and eval data come from examples/ too.
TINY = str(ROOT / "examples" / "qwen2-tiny")
CALIB = str(ROOT / "examples" / "calib.json")
EVAL_TEXT = str(ROOT / "examples" / "eval.txt")
