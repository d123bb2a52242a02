"""One point of a sweep's test: notes its arguments, rank, world and times in OUT/RANK.json, and
fails with status 3 while the file FAIL exists."""

import argparse
import json
import os
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--fail", type=Path)
parser.add_argument("--sleep", type=float, default=1.0)
parser.add_argument("--checkpoint-dir")
parser.add_argument("rest", nargs="*")
args = parser.parse_args()
began = time.time()
time.sleep(args.sleep)
if args.fail is not None and args.fail.exists():
    print(f"failing on purpose: {args.fail} exists", flush=True)
    sys.exit(3)
rank = int(os.environ.get("RANK", "0"))
args.out.mkdir(parents=True, exist_ok=True)
(args.out / f"{rank}.json").write_text(json.dumps({
    "argv": sys.argv[1:], "rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1")),
    "began": began, "ended": time.time(),
    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}))
print(f"point {args.out.name} done", flush=True)
