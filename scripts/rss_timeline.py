#!/usr/bin/env python3
"""Run a command and sample its resident memory every 0.2 s:

    python scripts/rss_timeline.py TIMELINE.tsv LOG -- python -m qwen_gptq quantize ...

The command's stderr goes to LOG; TIMELINE.tsv gets one row a sample (seconds, VmRSS and its
anonymous, file and shared parts in MB, LOG's line count then, to line samples up with the
log). Prints the exit code, the wall time and each figure's peak. Linux (/proc).
"""

import subprocess
import sys
import time

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


def main():
    if "--" not in sys.argv or len(sys.argv) < 5:
        sys.exit(__doc__)
    tsv, log = sys.argv[1], sys.argv[2]
    cmd = sys.argv[sys.argv.index("--") + 1:]
    rows, peak = [], {}
    t0 = time.time()
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, stderr=err)
        while p.poll() is None:
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    now = {k: int(v.split()[0]) // 1024 for k, _, v in (line.partition(":") for line in f) if k in FIELDS}
                with open(log) as f:
                    lines = sum(1 for _ in f)
            except OSError:  # (the process just ended)
                break
            rows.append([round(time.time() - t0, 1)] + [now.get(k) for k in FIELDS[:4]] + [lines])
            for k, v in now.items():
                peak[k] = max(peak.get(k, 0), v)
            time.sleep(0.2)
        p.wait()
    with open(tsv, "w") as f:
        f.write("seconds\trss_mb\tanon_mb\tfile_mb\tshmem_mb\tlog_lines\n")
        f.writelines("\t".join(map(str, r)) + "\n" for r in rows)
    print(f"exit {p.returncode}, {time.time() - t0:.1f} s, peaks (MB): {peak}")
    sys.exit(p.returncode)


if __name__ == "__main__":
    main()
